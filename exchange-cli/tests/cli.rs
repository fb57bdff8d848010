//! The `exchange` binary as a user runs it: real files, real processes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

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
    let out = Command::new(env!("CARGO_BIN_EXE_exchange"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    Run { out }
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
fn demo_runs_and_keeps_its_files() {
    let d = tempfile::tempdir().unwrap();
    let run = exchange(d.path(), &["demo", "--dir", "net"]).ok();
    let text = run.stdout();
    for expected in [
        "[1]",
        "[8]",
        "MARKS THE PROVISION BOUNDARY",
        "refused: decryption failed",
        "identical to what the clinic sealed: true",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
    for f in [
        "ca/ca.pem",
        "clinic/identity.pem",
        "hospital/encryption.pem",
        "referral.exenv",
        "referral.exrcpt",
        "inbox/referral.json",
    ] {
        assert!(d.path().join("net").join(f).exists(), "{f}");
    }
    assert!(!d.path().join("net/inbox/tampered.json").exists());
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
