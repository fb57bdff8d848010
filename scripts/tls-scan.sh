#!/usr/bin/env bash
# Scans both listeners of a demo daemon with an external TLS scanner
# (testssl.sh, from the distribution's packages: apt-get install testssl.sh)
# and with openssl s_client, and checks what the open profile promises:
# only TLS 1.3 is offered, and no connection gets past the handshake
# without a client certificate the listener trusts.
#
#   scripts/tls-scan.sh [OUT_DIR]     (default: target/tls-scan)
#
# Builds the debug binaries, writes a demo network into OUT_DIR/net, starts
# the clinic's daemon, scans its peer and client listeners, stops it.
# Full testssl output goes to OUT_DIR/{peer,client}.testssl.txt; a summary
# is printed. Exits non-zero if an expectation fails. Not run in CI (it
# needs testssl.sh and takes a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/tls-scan}"
testssl="$(command -v testssl || command -v testssl.sh || true)"
[ -n "$testssl" ] || { echo "testssl.sh is not installed (apt-get install testssl.sh)" >&2; exit 2; }

cargo build --quiet -p exchange-cli -p exchange-daemon
rm -rf "$out"
mkdir -p "$out"
target/debug/exchange demo --dir "$out/net" --burst 0 >"$out/demo.txt"
config="$out/net/clinic/exchanged.toml"
peer="$(sed -n 's/^peer = "\(.*\)"$/\1/p' "$config")"
client="$(sed -n 's/^client = "\(.*\)"$/\1/p' "$config")"
target/debug/exchanged --config "$config" >"$out/exchanged.log" 2>&1 &
daemon=$!
trap 'kill "$daemon" 2>/dev/null; wait "$daemon" 2>/dev/null || true' EXIT
for _ in $(seq 50); do
    grep -q "exchanged started" "$out/exchanged.log" && break
    sleep 0.2
done
grep -q "exchanged started" "$out/exchanged.log" || { cat "$out/exchanged.log" >&2; exit 1; }

failed=0
check() { # check WHAT COMMAND...: prints PASS/FAIL
    local what="$1"; shift
    if "$@"; then echo "  PASS  $what"; else echo "  FAIL  $what"; failed=1; fi
}
offered() { grep -E "^ *$2 +offered" "$1" >/dev/null; }
not_offered() { grep -E "^ *$2 +not offered" "$1" >/dev/null; }

echo "testssl $("$testssl" --version 2>/dev/null | sed -n 's/.*testssl *\([0-9][0-9.]*\) .*/\1/p' | head -1), $(openssl version), $(date -u +%F)"
for listener in peer client; do
    addr="${!listener}"
    report="$out/$listener.testssl.txt"
    echo "== $listener listener $addr"
    # --warnings off: with TLS 1.3 and a mandatory client certificate,
    # testssl's first openssl probe may end before the session is printed
    # and it would then stop asking whether to go on.
    "$testssl" --quiet --color 0 --warnings off --protocols --server-defaults \
        --server-preference "$addr" >"$report" 2>&1 || true
    sed -n -E '/^ *(SSLv2|SSLv3|TLS 1(\.[0-3])?|NPN\/SPDY|ALPN\/HTTP2) /p; /Negotiated protocol/p; /Negotiated cipher/p; /Client Auth/p; /Session Ticket|SSL Session ID|Session Resumption/p; /Server extended key usage|subjectAltName|Trust \(hostname\)/p' "$report" | sed 's/^/  | /'
    for p in "SSLv2" "SSLv3" "TLS 1 " "TLS 1.1" "TLS 1.2"; do
        check "$p not offered" not_offered "$report" "${p% }"
    done
    check "TLS 1.3 offered" offered "$report" "TLS 1.3"
    # openssl: TLS 1.2 refused outright; TLS 1.3 without a client
    # certificate ends in the alert certificate_required (116).
    check "openssl -tls1_2: refused" bash -c "! openssl s_client -connect $addr -tls1_2 </dev/null >/dev/null 2>&1"
    openssl s_client -connect "$addr" -tls1_3 -alpn h2 -msg -ign_eof </dev/null >"$out/$listener.nocert.txt" 2>&1 || true
    check "openssl: the server sends a CertificateRequest" \
        grep -q "CertificateRequest" "$out/$listener.nocert.txt"
    check "openssl without a client certificate: alert certificate required" \
        grep -q "alert certificate required\|alert number 116" "$out/$listener.nocert.txt"
done
echo "full reports: $out/peer.testssl.txt, $out/client.testssl.txt"
exit "$failed"
