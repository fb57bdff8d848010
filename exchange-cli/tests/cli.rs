//! The `exchange` binary as a user runs it: real files, real processes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/live_net.rs"]
mod live_net;
use live_net::LiveNet;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Run {
    out: Output,
}

impl Run {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    fn ok(self) -> Self {
        assert!(
            self.out.status.success(),
            "failed: {}\n{}",
            self.stderr(),
            self.stdout()
        );
        self
    }
    /// Fails with one `error:` line on stderr containing `reason`.
    fn fails_with(self, reason: &str) -> Self {
        assert_eq!(
            self.out.status.code(),
            Some(1),
            "expected failure; stdout: {}",
            self.stdout()
        );
        let err = self.stderr();
        assert_eq!(err.lines().count(), 1, "not one line: {err}");
        assert!(err.starts_with("error: "), "{err}");
        assert!(err.contains(reason), "expected {reason:?} in {err}");
        self
    }
}

fn exchange(dir: &Path, args: &[&str]) -> Run {
    exchange_env(dir, args, &[])
}

fn exchange_env(dir: &Path, args: &[&str], env: &[(&str, &Path)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_exchange"));
    cmd.current_dir(dir)
        .args(args)
        .env_remove("EXCHANGE_CLIENT_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Run {
        out: cmd.output().unwrap(),
    }
}

/// A CA, a clinic and a hospital in a temporary directory.
fn network() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    exchange(
        d.path(),
        &["ca", "init", "--dir", "ca", "--name", "Test CA"],
    )
    .ok();
    exchange(
        d.path(),
        &[
            "ca",
            "issue",
            "--ca",
            "ca",
            "--party",
            "urn:jp:mhlw:facility:1310000013",
            "--name",
            "Sakura Clinic",
            "--out",
            "clinic",
        ],
    )
    .ok();
    exchange(
        d.path(),
        &[
            "ca",
            "issue",
            "--ca",
            "ca",
            "--party",
            "urn:jp:mhlw:facility:1310000021",
            "--name",
            "Minato General Hospital",
            "--out",
            "hospital",
        ],
    )
    .ok();
    d
}

fn seal(d: &Path, input: &str, out: &str) -> Run {
    exchange(
        d,
        &[
            "seal",
            "--from",
            "clinic",
            "--to",
            "hospital/encryption.pem",
            "--trust",
            "ca/ca.pem",
            "--crl",
            "ca/crl.pem",
            "--content-type",
            "application/fhir+json",
            "--subject",
            "P-000123",
            "--title",
            "診療情報提供書",
            "--purpose",
            "treatment",
            "--in",
            input,
            "--out",
            out,
        ],
    )
}

fn open(d: &Path, envelope: &str, out: &str, receipt: &str) -> Run {
    exchange(
        d,
        &[
            "open",
            "--as",
            "hospital",
            "--trust",
            "ca/ca.pem",
            "--crl",
            "ca/crl.pem",
            "--in",
            envelope,
            "--out",
            out,
            "--receipt",
            receipt,
        ],
    )
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

fn path(d: &Path, f: &str) -> PathBuf {
    d.join(f)
}

#[test]
fn seal_inspect_open_receipt_round_trip() {
    let net = network();
    let d = net.path();
    let plain = payload(3 * 1024 * 1024 + 5);
    std::fs::write(path(d, "referral.json"), &plain).unwrap();
    seal(d, "referral.json", "referral.exenv").ok();

    let inspect = exchange(
        d,
        &[
            "inspect",
            "--trust",
            "ca/ca.pem",
            "--json",
            "referral.exenv",
        ],
    )
    .ok();
    let v: serde_json::Value = serde_json::from_str(&inspect.stdout()).unwrap();
    assert_eq!(v["sender"], "urn:jp:mhlw:facility:1310000013");
    assert_eq!(v["sender_name"], "Sakura Clinic");
    assert_eq!(
        v["recipients"][0]["party"],
        "urn:jp:mhlw:facility:1310000021"
    );
    assert_eq!(v["recipients"][0]["role"], "THIRD_PARTY");
    assert_eq!(v["payload_length"], plain.len());
    assert_eq!(v["content_type"], "application/fhir+json");
    assert_eq!(v["purpose"], "treatment");
    assert_eq!(v["verified"], true);
    assert_eq!(v["ciphertext_length"], v["ciphertext_length_in_file"]);
    // The public head never carries the patient id or the title.
    let raw = std::fs::read(path(d, "referral.exenv")).unwrap();
    for secret in ["P-000123".as_bytes(), "診療情報提供書".as_bytes()] {
        assert!(!raw.windows(secret.len()).any(|w| w == secret));
    }
    let unverified = exchange(d, &["inspect", "referral.exenv"]).ok();
    assert!(unverified.stdout().contains("UNVERIFIED"));

    let opened = open(d, "referral.exenv", "out.json", "referral.exrcpt").ok();
    assert!(
        opened.stdout().contains("Sakura Clinic"),
        "{}",
        opened.stdout()
    );
    assert!(
        !opened.stdout().contains("P-000123"),
        "subject printed without --show-subjects"
    );
    assert_eq!(std::fs::read(path(d, "out.json")).unwrap(), plain);

    let rv = exchange(
        d,
        &[
            "receipt",
            "verify",
            "--trust",
            "ca/ca.pem",
            "--envelope",
            "referral.exenv",
            "referral.exrcpt",
        ],
    )
    .ok();
    let text = rv.stdout();
    assert!(text.contains("DELIVERED"), "{text}");
    assert!(text.contains("Minato General Hospital"), "{text}");
    assert!(text.contains("MARKS THE PROVISION BOUNDARY"), "{text}");
}

#[test]
fn tampered_envelope_is_refused_and_nothing_is_written() {
    let net = network();
    let d = net.path();
    std::fs::write(path(d, "in.txt"), payload(200_000)).unwrap();
    seal(d, "in.txt", "good.exenv").ok();
    let good = std::fs::read(path(d, "good.exenv")).unwrap();
    let head_len = u32::from_be_bytes(good[8..12].try_into().unwrap()) as usize;
    for (name, at, reason) in [
        ("ct", good.len() - 100, "decryption failed"),
        ("head", 12 + head_len / 2, "signature verification failed"),
    ] {
        let mut bad = good.clone();
        bad[at] ^= 1;
        let env = format!("bad-{name}.exenv");
        std::fs::write(path(d, &env), &bad).unwrap();
        open(d, &env, "out.bin", "r.exrcpt").fails_with(reason);
        assert!(!path(d, "out.bin").exists());
        assert!(!path(d, "r.exrcpt").exists());
        // No temporary files left behind either.
        let stray: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(".tmp"))
            .collect();
        assert!(stray.is_empty(), "{stray:?}");
    }
    let truncated = &good[..good.len() - 1];
    std::fs::write(path(d, "short.exenv"), truncated).unwrap();
    open(d, "short.exenv", "out.bin", "r.exrcpt").fails_with("truncated");
    assert!(!path(d, "out.bin").exists());
}

#[test]
fn certificate_checks() {
    let net = network();
    let d = net.path();
    let v = exchange(
        d,
        &[
            "cert",
            "verify",
            "--trust",
            "ca/ca.pem",
            "--crl",
            "ca/crl.pem",
            "clinic/identity.pem",
        ],
    )
    .ok();
    assert_eq!(
        v.stdout().lines().next(),
        Some("urn:jp:mhlw:facility:1310000013")
    );
    // An envelope sealed before the clinic is revoked.
    std::fs::write(path(d, "x"), b"x").unwrap();
    seal(d, "x", "x.exenv").ok();
    // Revoked.
    exchange(
        d,
        &[
            "ca",
            "revoke",
            "--ca",
            "ca",
            "--cert",
            "clinic/identity.pem",
        ],
    )
    .ok();
    exchange(
        d,
        &[
            "cert",
            "verify",
            "--trust",
            "ca/ca.pem",
            "--crl",
            "ca/crl.pem",
            "clinic/identity.pem",
        ],
    )
    .fails_with("revoked");
    // Revoking twice is harmless; the hospital is unaffected.
    assert!(
        exchange(
            d,
            &[
                "ca",
                "revoke",
                "--ca",
                "ca",
                "--cert",
                "clinic/identity.pem"
            ]
        )
        .ok()
        .stdout()
        .contains("already revoked")
    );
    exchange(
        d,
        &[
            "cert",
            "verify",
            "--trust",
            "ca/ca.pem",
            "--crl",
            "ca/crl.pem",
            "hospital/identity.pem",
        ],
    )
    .ok();
    // Another CA.
    exchange(d, &["ca", "init", "--dir", "other", "--name", "Other CA"]).ok();
    exchange(
        d,
        &[
            "cert",
            "verify",
            "--trust",
            "other/ca.pem",
            "hospital/identity.pem",
        ],
    )
    .fails_with("issuer not trusted");
    // Expired at a later time.
    exchange(
        d,
        &[
            "cert",
            "verify",
            "--trust",
            "ca/ca.pem",
            "--at",
            "2099-01-01T00:00:00Z",
            "hospital/identity.pem",
        ],
    )
    .fails_with("expired");
    // A revoked sender's envelope is refused by a recipient with the CRL...
    open(d, "x.exenv", "x.out", "x.rcpt").fails_with("revoked");
    assert!(!path(d, "x.out").exists());
    // ...and the revoked sender cannot seal any more.
    seal(d, "x", "y.exenv").fails_with("revoked");
    assert!(!path(d, "y.exenv").exists());
}

#[test]
fn seal_to_an_identity_certificate_is_wrong_key_usage() {
    let net = network();
    let d = net.path();
    std::fs::write(path(d, "x"), b"x").unwrap();
    exchange(
        d,
        &[
            "seal",
            "--from",
            "clinic",
            "--to",
            "hospital/identity.pem",
            "--trust",
            "ca/ca.pem",
            "--content-type",
            "text/plain",
            "--in",
            "x",
            "--out",
            "x.exenv",
        ],
    )
    .fails_with("wrong key usage");
    assert!(!path(d, "x.exenv").exists());
}

#[test]
fn outsider_and_wrong_envelope_are_refused() {
    let net = network();
    let d = net.path();
    exchange(
        d,
        &[
            "ca",
            "issue",
            "--ca",
            "ca",
            "--party",
            "urn:jp:mhlw:facility:1310000039",
            "--name",
            "Other",
            "--out",
            "other",
        ],
    )
    .ok();
    std::fs::write(path(d, "a"), b"first").unwrap();
    std::fs::write(path(d, "b"), b"second").unwrap();
    seal(d, "a", "a.exenv").ok();
    seal(d, "b", "b.exenv").ok();
    exchange(
        d,
        &[
            "open",
            "--as",
            "other",
            "--trust",
            "ca/ca.pem",
            "--in",
            "a.exenv",
            "--out",
            "o",
        ],
    )
    .fails_with("not a recipient");
    assert!(!path(d, "o").exists());
    open(d, "a.exenv", "a.out", "a.exrcpt").ok();
    exchange(
        d,
        &[
            "receipt",
            "verify",
            "--trust",
            "ca/ca.pem",
            "--envelope",
            "b.exenv",
            "a.exrcpt",
        ],
    )
    .fails_with("another message");
}

#[test]
fn ca_init_refuses_to_overwrite() {
    let d = tempfile::tempdir().unwrap();
    exchange(d.path(), &["ca", "init", "--dir", "ca", "--name", "A"]).ok();
    let key = std::fs::read(d.path().join("ca/ca.key.pem")).unwrap();
    exchange(d.path(), &["ca", "init", "--dir", "ca", "--name", "B"]).fails_with("already exists");
    assert_eq!(std::fs::read(d.path().join("ca/ca.key.pem")).unwrap(), key);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.path().join("ca/ca.key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn usage_errors_are_one_line() {
    let d = tempfile::tempdir().unwrap();
    exchange(
        d.path(),
        &["cert", "verify", "--trust", "missing.pem", "x.pem"],
    )
    .fails_with("cannot read missing.pem");
    let net = network();
    std::fs::write(net.path().join("x"), b"x").unwrap();
    exchange(
        net.path(),
        &[
            "seal",
            "--from",
            "clinic",
            "--to",
            "hospital/encryption.pem",
            "--trust",
            "ca/ca.pem",
            "--content-type",
            "t",
            "--route",
            "nonsense",
            "--in",
            "x",
            "--out",
            "y",
        ],
    )
    .fails_with("expected ROLE:URI");
    // Rejected by the argument parser: usage errors exit 2.
    let run = exchange(
        net.path(),
        &[
            "seal",
            "--from",
            "clinic",
            "--to",
            "hospital/encryption.pem",
            "--trust",
            "ca/ca.pem",
            "--content-type",
            "t",
            "--expires-in",
            "soon",
            "--in",
            "x",
            "--out",
            "y",
        ],
    );
    assert_eq!(run.out.status.code(), Some(2));
    assert!(
        run.stderr().contains("invalid duration"),
        "{}",
        run.stderr()
    );
}

/// The one line of `text` that contains every one of `parts`.
fn line_with<'a>(text: &'a str, parts: &[&str]) -> &'a str {
    let found: Vec<&str> = text
        .lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .collect();
    assert_eq!(found.len(), 1, "lines with {parts:?}: {found:?} in\n{text}");
    found[0]
}

const HOSPITAL: &str = "urn:jp:mhlw:facility:1310000021";
const CLINIC: &str = "urn:jp:mhlw:facility:1310000013";
const AGENT: &str = "urn:jp:example:agent:claims-agent-01";
const PAYER: &str = "urn:jp:example:payer:shiharai-kikin-13";
const BOUNDARY: &str = "<- provision boundary";

#[test]
fn demo_runs_a_live_network_and_marks_the_provision_boundaries() {
    let d = tempfile::tempdir().unwrap();
    let text = exchange(d.path(), &["demo", "--dir", "net"]).ok().stdout();
    for step in 1..=11 {
        assert!(
            text.contains(&format!("\n[{step}] ")),
            "step {step} in\n{text}"
        );
    }
    // Referral: the hospital's DELIVERED receipt is the boundary, its PROCESSED is not.
    let hospital = format!("Minato General Hospital <{HOSPITAL}>");
    let l = line_with(&text, &["1. DELIVERED", "THIRD_PARTY", &hospital]);
    assert!(l.ends_with(&format!("{BOUNDARY} (責任分界点)")), "{l}");
    assert!(!line_with(&text, &["2. PROCESSED", &hospital]).contains(BOUNDARY));
    // Claim: the entrusted agent's receipt is not a boundary, the payer's DELIVERED is.
    let agent = format!("Demo Claims Agent <{AGENT}>");
    let payer = format!("Demo Claims Review Office <{PAYER}>");
    assert!(!line_with(&text, &["1. ACCEPTED_FOR_RELAY", "ENTRUSTED", &agent]).contains(BOUNDARY));
    assert!(line_with(&text, &["2. DELIVERED", "THIRD_PARTY", &payer]).contains(BOUNDARY));
    assert!(!line_with(&text, &["3. PROCESSED", &payer]).contains(BOUNDARY));
    line_with(
        &text,
        &[&format!(
            "boundary: responsibility for the referral passed to {HOSPITAL} with receipt 1"
        )],
    );
    line_with(
        &text,
        &[&format!(
            "boundary: responsibility for the claim passed to {PAYER} with receipt 2"
        )],
    );
    assert_eq!(
        text.matches("identical to what the clinic sent: true")
            .count(),
        2,
        "{text}"
    );
    line_with(
        &text,
        &["the agent's own inbox (including acknowledged items): 0 item(s)"],
    );
    // A real measurement, labelled.
    let burst = line_with(&text, &["200 messages in ", " s = ", " msg/s"]);
    let rate: f64 = burst
        .split(" = ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(rate > 0.0, "{burst}");
    assert!(
        !text.contains(" INFO ") && !text.contains(" WARN "),
        "daemon logs leaked:\n{text}"
    );

    let net = d.path().join("net");
    for site in ["clinic", "hospital", "agent", "payer"] {
        for f in [
            "identity.pem",
            "encryption.pem",
            "exchanged.toml",
            "data/store.sqlite3",
            "app/client.pem",
            "app/client.key.pem",
            "app/client.toml",
        ] {
            assert!(net.join(site).join(f).exists(), "{site}/{f}");
        }
    }
    for f in [
        "ca/ca.pem",
        "ca/crl.pem",
        "README.txt",
        "hospital/app/inbox/referral.json",
        "payer/app/inbox/claim.uke",
    ] {
        assert!(net.join(f).exists(), "{f}");
    }
    let readme = std::fs::read_to_string(net.join("README.txt")).unwrap();
    assert!(
        readme.contains("exchanged --config clinic/exchanged.toml"),
        "{readme}"
    );
    assert!(
        readme.contains("--client-config clinic/app/client.toml"),
        "{readme}"
    );
    // The boundary receipts it kept verify offline with the CA certificate alone.
    let rv = exchange(
        &net,
        &[
            "receipt",
            "verify",
            "--trust",
            "ca/ca.pem",
            "receipts/claim-2-DELIVERED.exrcpt",
        ],
    )
    .ok()
    .stdout();
    assert!(rv.contains(PAYER), "{rv}");
    // It never writes over an existing network.
    exchange(d.path(), &["demo", "--dir", "net"]).fails_with("is not empty");
}

#[test]
fn demo_without_dir_leaves_nothing_behind() {
    let d = tempfile::tempdir().unwrap();
    let tmp = d.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let text = exchange_env(d.path(), &["demo", "--burst", "5"], &[("TMPDIR", &tmp)])
        .ok()
        .stdout();
    line_with(&text, &["5 messages in ", " msg/s"]);
    assert!(text.contains("now removed"), "{text}");
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
}

fn status_json(dir: &Path, id: &str) -> serde_json::Value {
    let out = exchange(
        dir,
        &[
            "status",
            id,
            "--json",
            "--client-config",
            "clinic/app/client.toml",
        ],
    )
    .ok()
    .stdout();
    serde_json::from_str(&out).unwrap()
}

fn stray_temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(".tmp"))
        .collect()
}

#[test]
fn send_status_inbox_fetch_ack_against_live_daemons() {
    let d = tempfile::tempdir().unwrap();
    exchange(d.path(), &["demo", "--dir", "net", "--burst", "0"]).ok();
    let net = d.path().join("net");
    let live = LiveNet::start(&net);
    let clinic = ["--client-config", "clinic/app/client.toml"];
    let hospital = ["--client-config", "hospital/app/client.toml"];

    // 2 MiB + 3: several 256 KiB slices each way.
    let plain = payload(2 * 1024 * 1024 + 3);
    std::fs::write(net.join("study.bin"), &plain).unwrap();
    let sent = exchange(
        &net,
        &[
            &[
                "send",
                "--to",
                HOSPITAL,
                "--content-type",
                "application/octet-stream",
                "--purpose",
                "treatment",
                "--subject",
                "urn:oid:1.2.392.100495.20.3.51.11310000013|P-000777",
                "--title",
                "検査結果 (synthetic)",
                "--in",
                "study.bin",
                "--wait",
            ],
            &clinic[..],
        ]
        .concat(),
    )
    .ok()
    .stdout();
    let id = sent.lines().next().unwrap().trim().to_owned();
    assert_eq!(id.len(), 36, "{sent}");
    assert!(line_with(&sent, &["DELIVERED", "THIRD_PARTY", HOSPITAL]).contains(BOUNDARY));
    line_with(&sent, &[&format!("message {id}  DELIVERED")]);

    let s = status_json(&net, &id);
    assert_eq!(s["state"], "DELIVERED");
    assert_eq!(s["receipts"][0]["issuer"], HOSPITAL);
    assert_eq!(s["receipts"][0]["issuer_name"], "Minato General Hospital");
    assert_eq!(s["receipts"][0]["provision_boundary"], true);
    assert_eq!(s["provisions"][0]["provision"], "PASSED");

    // The hospital's application, its settings from the environment this time.
    let env = [(
        "EXCHANGE_CLIENT_CONFIG",
        net.join("hospital/app/client.toml"),
    )];
    let env: Vec<(&str, &Path)> = env.iter().map(|(k, v)| (*k, v.as_path())).collect();
    let inbox = exchange_env(&net, &["inbox", "--json"], &env).ok().stdout();
    let items: serde_json::Value = serde_json::from_str(&inbox).unwrap();
    let item = items
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["message_id"] == id.as_str())
        .unwrap();
    assert_eq!(item["sender"], CLINIC);
    assert_eq!(item["purpose"], "treatment");
    assert_eq!(item["acked"], false);

    let fetched = exchange(
        &net,
        &[&["fetch", &id, "--out", "got.bin"], &hospital[..]].concat(),
    )
    .ok()
    .stdout();
    assert_eq!(std::fs::read(net.join("got.bin")).unwrap(), plain);
    assert!(fetched.contains("Sakura Clinic"), "{fetched}");
    assert!(fetched.contains("検査結果 (synthetic)"), "{fetched}");
    assert!(
        !fetched.contains("P-000777"),
        "subject printed without --show-subjects"
    );
    let shown = exchange(
        &net,
        &[
            &["fetch", &id, "--out", "again.bin", "--show-subjects"],
            &hospital[..],
        ]
        .concat(),
    )
    .ok()
    .stdout();
    assert!(shown.contains("P-000777"), "{shown}");

    let acked = exchange(
        &net,
        &[
            &["ack", &id, "--receipt", "processed.exrcpt"],
            &hospital[..],
        ]
        .concat(),
    )
    .ok()
    .stdout();
    assert!(acked.contains("PROCESSED"), "{acked}");
    let rv = exchange(
        &net,
        &[
            "receipt",
            "verify",
            "--trust",
            "ca/ca.pem",
            "processed.exrcpt",
        ],
    )
    .ok()
    .stdout();
    assert!(rv.contains("PROCESSED") && rv.contains(HOSPITAL), "{rv}");
    // The PROCESSED receipt travels back to the clinic.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let s = status_json(&net, &id);
        if s["state"] == "PROCESSED" {
            assert_eq!(s["receipts"][1]["disposition"], "PROCESSED");
            assert_eq!(s["receipts"][1]["provision_boundary"], false);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never PROCESSED: {s}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let all = exchange(&net, &[&["inbox", "--all"], &hospital[..]].concat())
        .ok()
        .stdout();
    assert!(line_with(&all, &[&id]).contains(" yes "), "{all}");

    // An unknown id: a specific error, and nothing left where the output would go.
    let before = std::fs::read_dir(&net).unwrap().count();
    exchange(
        &net,
        &[
            &[
                "fetch",
                "00000000-0000-0000-0000-000000000000",
                "--out",
                "unknown.bin",
            ],
            &hospital[..],
        ]
        .concat(),
    )
    .fails_with("no inbox item 00000000-0000-0000-0000-000000000000 for this client");
    assert!(!net.join("unknown.bin").exists());
    assert!(stray_temp_files(&net).is_empty());
    assert_eq!(std::fs::read_dir(&net).unwrap().count(), before);
    // The clinic's client may not read the hospital's purposes, nor see other clients' messages.
    exchange(&net, &[&["status", &id], &hospital[..]].concat()).fails_with("no such message");

    // Bad connection settings: one clear line each.
    exchange(
        &net,
        &[
            "inbox",
            "--server",
            "127.0.0.1:9",
            "--server-party",
            HOSPITAL,
            "--ca",
            "ca/ca.pem",
            "--key",
            "hospital/app/client.key.pem",
        ],
    )
    .fails_with("missing --cert");
    exchange(
        &net,
        &[&["inbox", "--server-party", CLINIC], &hospital[..]].concat(),
    )
    .fails_with(&format!("its certificate does not name {CLINIC}"));
    exchange(
        &net,
        &[
            &[
                "inbox",
                "--cert",
                "clinic/app/client.pem",
                "--key",
                "clinic/app/client.key.pem",
            ],
            &hospital[..],
        ]
        .concat(),
    )
    .fails_with("unknown local client urn:local:clinic:emr");
    exchange(
        &net,
        &[
            &[
                "send",
                "--to",
                HOSPITAL,
                "--content-type",
                "text/plain",
                "--purpose",
                "research",
                "--in",
                "study.bin",
            ],
            &clinic[..],
        ]
        .concat(),
    )
    .fails_with("may not send for purpose \"research\"");

    live.stop();
    exchange(&net, &[&["status", &id], &clinic[..]].concat()).fails_with("connection refused");
}

#[test]
fn inbox_lists_every_page() {
    let d = tempfile::tempdir().unwrap();
    // 250 referrals stay unacknowledged in the hospital's inbox: more than
    // the daemon's default page (100).
    exchange(d.path(), &["demo", "--dir", "net", "--burst", "250"]).ok();
    let net = d.path().join("net");
    let live = LiveNet::start(&net);
    let stored: Vec<String> = live.runtime.block_on(async {
        live.daemons[1]
            .node()
            .store()
            .inbox(false)
            .await
            .unwrap()
            .iter()
            .map(|m| m.id.to_string())
            .collect()
    });
    assert!(stored.len() >= 250, "{} stored", stored.len());
    let hospital = ["--client-config", "hospital/app/client.toml"];

    let json = exchange(&net, &[&["inbox", "--json"], &hospital[..]].concat())
        .ok()
        .stdout();
    // One JSON document, every item once, in the daemon's order.
    let items: serde_json::Value = serde_json::from_str(&json).unwrap();
    let listed: Vec<String> = items
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["message_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, stored);

    let text = exchange(&net, &[&["inbox"], &hospital[..]].concat())
        .ok()
        .stdout();
    assert_eq!(text.lines().count(), stored.len() + 1, "{text}");
    for id in &stored {
        line_with(&text, &[id]);
    }
    live.stop();
}

#[test]
fn ca_issue_client_writes_a_client_certificate() {
    let net = network();
    let d = net.path();
    let out = exchange(
        d,
        &[
            "ca",
            "issue-client",
            "--ca",
            "ca",
            "--client",
            "urn:local:clinic:emr",
            "--out",
            "emr",
        ],
    )
    .ok()
    .stdout();
    assert!(out.contains("urn:local:clinic:emr"), "{out}");
    let v = exchange(
        d,
        &["cert", "verify", "--trust", "ca/ca.pem", "emr/client.pem"],
    )
    .ok()
    .stdout();
    assert_eq!(v.lines().next(), Some("urn:local:clinic:emr"));
    assert!(v.contains("identity certificate"), "{v}");
    exchange(
        d,
        &[
            "ca",
            "issue-client",
            "--ca",
            "ca",
            "--client",
            "urn:local:clinic:emr",
            "--out",
            "emr",
        ],
    )
    .fails_with("already exists");
}

#[test]
fn ca_issue_server_writes_a_host_name_certificate_that_is_no_identity() {
    let net = network();
    let d = net.path();
    let out = exchange(
        d,
        &[
            "ca",
            "issue-server",
            "--ca",
            "ca",
            "--party",
            CLINIC,
            "--dns",
            "localhost",
            "--dns",
            "exchange.clinic.test",
            "--ip",
            "127.0.0.1",
            "--out",
            "srv",
        ],
    )
    .ok()
    .stdout();
    assert!(
        out.contains("valid for: localhost, exchange.clinic.test, 127.0.0.1"),
        "{out}"
    );
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(d.join("srv/server.key.pem"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600);
    // Host names for stock clients (checked by openssl where it exists).
    if let Ok(o) = Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-ext",
            "subjectAltName,extendedKeyUsage",
            "-in",
        ])
        .arg(d.join("srv/server.pem"))
        .output()
    {
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.contains("DNS:localhost"), "{text}");
        assert!(text.contains("DNS:exchange.clinic.test"), "{text}");
        assert!(text.contains("IP Address:127.0.0.1"), "{text}");
        assert!(text.contains(&format!("URI:{CLINIC}")), "{text}");
        assert!(text.contains("TLS Web Server Authentication"), "{text}");
        assert!(!text.contains("Client Authentication"), "{text}");
    }
    // It is not an identity: it can sign nothing and serve no peer.
    exchange(
        d,
        &["cert", "verify", "--trust", "ca/ca.pem", "srv/server.pem"],
    )
    .fails_with("wrong key usage");
    // Bad requests: one clear line, nothing written.
    exchange(d, &["ca", "issue-server", "--ca", "ca", "--out", "none"])
        .fails_with("at least one DNS name or IP address");
    exchange(
        d,
        &[
            "ca",
            "issue-server",
            "--ca",
            "ca",
            "--dns",
            "not a host",
            "--out",
            "bad",
        ],
    )
    .fails_with("is not a valid DNS name");
    assert!(!d.join("none").exists() && !d.join("bad").exists());
    exchange(
        d,
        &[
            "ca",
            "issue-server",
            "--ca",
            "ca",
            "--dns",
            "localhost",
            "--out",
            "srv",
        ],
    )
    .fails_with("already exists");
}
