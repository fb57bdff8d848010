//! The `exchange` command on a network whose PKI was made by the openssl
//! command line (a root, an intermediate with pathlen 0, parties issued by
//! `openssl ca`, PEM files holding the leaf then the intermediate, CRLs from
//! `openssl ca -gencrl`), and `openssl verify` on what `exchange ca` issues.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/live_net.rs"]
mod live_net;
#[path = "../../exchange-daemon/tests/common/openssl_pki.rs"]
mod openssl_pki;
use live_net::LiveNet;

use std::path::Path;
use std::process::{Command, Output};

use openssl_pki::{OpensslPki, daemon_config, openssl, openssl_available};

const CLINIC: &str = "urn:jp:mhlw:facility:1310000013";
const HOSPITAL: &str = "urn:jp:mhlw:facility:1310000021";
const REVOKED: &str = "urn:jp:mhlw:facility:1310000039";

struct Run(Output);

impl Run {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    fn ok(self) -> Self {
        assert!(
            self.0.status.success(),
            "failed: {}\n{}",
            String::from_utf8_lossy(&self.0.stderr),
            self.stdout()
        );
        self
    }
    /// Fails with one `error:` line containing `reason`.
    fn fails_with(self, reason: &str) -> Self {
        let err = String::from_utf8_lossy(&self.0.stderr).into_owned();
        assert_eq!(self.0.status.code(), Some(1), "expected failure: {err}");
        assert!(
            err.starts_with("error: ") && err.contains(reason),
            "expected {reason:?} in {err}"
        );
        self
    }
}

fn exchange(dir: &Path, args: &[&str]) -> Run {
    Run(Command::new(env!("CARGO_BIN_EXE_exchange"))
        .current_dir(dir)
        .args(args)
        .env_remove("EXCHANGE_CLIENT_CONFIG")
        .output()
        .unwrap())
}

fn skip_without_openssl() -> bool {
    if openssl_available() {
        return false;
    }
    eprintln!("SKIPPED: the openssl command line is not installed");
    true
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const TRUST: [&str; 4] = ["--trust", "root/ca.pem", "--crl", "crls.pem"];

#[test]
fn every_command_works_over_an_openssl_pki_and_refuses_the_revoked_party() {
    if skip_without_openssl() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pki = OpensslPki::new(tmp.path());
    let d = pki.dir.clone();
    pki.party("clinic", CLINIC, "Sakura Clinic");
    pki.party("hospital", HOSPITAL, "Minato General Hospital");
    pki.party("revoked", REVOKED, "Revoked Clinic");
    pki.client("clinic-app", "urn:local:clinic:app");
    pki.client("hospital-app", "urn:local:hospital:app");
    pki.revoke(&d.join("revoked/identity.leaf.crt"));
    pki.revoke(&d.join("revoked/encryption.leaf.crt"));

    // cert verify: identity and encryption certificates with their chains.
    for (file, party, role) in [
        ("clinic/identity.pem", CLINIC, "identity"),
        ("hospital/encryption.pem", HOSPITAL, "encryption"),
    ] {
        let out = exchange(&d, &[&["cert", "verify"], &TRUST[..], &[file]].concat())
            .ok()
            .stdout();
        assert!(out.starts_with(party), "{out}");
        assert!(out.contains(&format!("{role} certificate of")), "{out}");
    }
    for file in ["revoked/identity.pem", "revoked/encryption.pem"] {
        exchange(&d, &[&["cert", "verify"], &TRUST[..], &[file]].concat()).fails_with("revoked");
    }

    // seal to the hospital's encryption certificate (leaf then intermediate).
    std::fs::write(d.join("referral.json"), br#"{"resourceType":"Bundle"}"#).unwrap();
    let seal = |from: &str, to: &str, out: &str| {
        exchange(
            &d,
            &[
                &["seal", "--from", from, "--to", to][..],
                &TRUST[..],
                &[
                    "--content-type",
                    "application/fhir+json",
                    "--subject",
                    "P-000123",
                    "--in",
                    "referral.json",
                    "--out",
                    out,
                ],
            ]
            .concat(),
        )
    };
    seal("clinic", "hospital/encryption.pem", "referral.exenv").ok();
    // The leaf alone cannot be placed under the root: its chain is the rest of the file.
    seal("clinic", "hospital/encryption.leaf.crt", "leaf.exenv").fails_with("issuer");
    assert!(!d.join("leaf.exenv").exists());
    // The revoked party: neither a recipient nor a sender.
    seal("clinic", "revoked/encryption.pem", "revoked.exenv").fails_with("revoked");
    seal("revoked", "hospital/encryption.pem", "from-revoked.exenv").fails_with("revoked");
    assert!(!d.join("revoked.exenv").exists() && !d.join("from-revoked.exenv").exists());

    // inspect, open with a receipt, receipt verify (file and bare forms).
    let out = exchange(
        &d,
        &[&["inspect"], &TRUST[..], &["referral.exenv"]].concat(),
    )
    .ok()
    .stdout();
    assert!(out.contains("verified: signature, sender chain"), "{out}");
    exchange(
        &d,
        &[
            &["open", "--as", "hospital"][..],
            &TRUST[..],
            &[
                "--in",
                "referral.exenv",
                "--out",
                "opened.json",
                "--receipt",
                "delivered.exrcpt",
            ],
        ]
        .concat(),
    )
    .ok();
    assert_eq!(
        std::fs::read(d.join("opened.json")).unwrap(),
        std::fs::read(d.join("referral.json")).unwrap()
    );
    let rv = exchange(
        &d,
        &[
            &["receipt", "verify"][..],
            &TRUST[..],
            &["--envelope", "referral.exenv", "delivered.exrcpt"],
        ]
        .concat(),
    )
    .ok()
    .stdout();
    assert!(rv.contains("DELIVERED") && rv.contains(HOSPITAL), "{rv}");
    assert!(rv.contains("MARKS THE PROVISION BOUNDARY"), "{rv}");
    // The bare form (Receipt.signed of the API): the file form less its 8-byte prefix.
    let file = std::fs::read(d.join("delivered.exrcpt")).unwrap();
    std::fs::write(d.join("delivered.bare"), &file[8..]).unwrap();
    let rv = exchange(
        &d,
        &[&["receipt", "verify"][..], &TRUST[..], &["delivered.bare"]].concat(),
    )
    .ok()
    .stdout();
    assert!(rv.contains("DELIVERED") && rv.contains(HOSPITAL), "{rv}");

    // The daemons' client commands: send, status, inbox, fetch, ack.
    let sites = [
        (
            "clinic",
            CLINIC,
            "urn:local:clinic:app",
            free_port(),
            free_port(),
        ),
        (
            "hospital",
            HOSPITAL,
            "urn:local:hospital:app",
            free_port(),
            free_port(),
        ),
    ];
    for (i, (name, _, client, peer, client_port)) in sites.iter().enumerate() {
        let (_, other_uri, _, other_peer, _) = sites[1 - i];
        let other_name = sites[1 - i].0;
        let text = daemon_config(
            &pki,
            &format!("127.0.0.1:{peer}"),
            &format!("127.0.0.1:{client_port}"),
            &[(
                other_uri.to_owned(),
                format!("127.0.0.1:{other_peer}"),
                d.join(other_name).join("encryption.pem"),
            )],
            client,
        );
        std::fs::write(d.join(name).join("exchanged.toml"), text).unwrap();
        std::fs::write(
            d.join(format!("{name}-app/client.toml")),
            format!(
                "server = \"127.0.0.1:{client_port}\"\nserver_party = \"{}\"\nca = \"../root/ca.pem\"\ncrl = \"../crls.pem\"\ncert = \"client.pem\"\nkey = \"client.key.pem\"\n",
                sites[i].1
            ),
        )
        .unwrap();
    }
    let names: Vec<&str> = sites.iter().map(|(name, ..)| *name).collect();
    let live = LiveNet::start_sites(&d, &names);
    let clinic = ["--client-config", "clinic-app/client.toml"];
    let hospital = ["--client-config", "hospital-app/client.toml"];
    let sent = exchange(
        &d,
        &[
            &[
                "send",
                "--to",
                HOSPITAL,
                "--content-type",
                "application/fhir+json",
                "--purpose",
                "treatment",
                "--in",
                "referral.json",
                "--wait",
            ][..],
            &clinic[..],
        ]
        .concat(),
    )
    .ok()
    .stdout();
    let id = sent.lines().next().unwrap().trim().to_owned();
    let status: serde_json::Value = serde_json::from_str(
        &exchange(&d, &[&["status", &id, "--json"][..], &clinic[..]].concat())
            .ok()
            .stdout(),
    )
    .unwrap();
    assert_eq!(status["state"], "DELIVERED", "{status:#}");
    assert_eq!(status["receipts"][0]["issuer"], HOSPITAL);
    let inbox = exchange(&d, &[&["inbox"][..], &hospital[..]].concat())
        .ok()
        .stdout();
    assert!(inbox.contains(&id) && inbox.contains(CLINIC), "{inbox}");
    exchange(
        &d,
        &[&["fetch", &id, "--out", "fetched.json"][..], &hospital[..]].concat(),
    )
    .ok();
    assert_eq!(
        std::fs::read(d.join("fetched.json")).unwrap(),
        std::fs::read(d.join("referral.json")).unwrap()
    );
    exchange(
        &d,
        &[
            &["ack", &id, "--receipt", "processed.exrcpt"][..],
            &hospital[..],
        ]
        .concat(),
    )
    .ok();
    let rv = exchange(
        &d,
        &[
            &["receipt", "verify"][..],
            &TRUST[..],
            &["processed.exrcpt"],
        ]
        .concat(),
    )
    .ok()
    .stdout();
    assert!(rv.contains("PROCESSED"), "{rv}");
    // A send to the revoked party is refused before anything is sealed: the
    // clinic's daemon has no peer entry for it, and its certificate is revoked.
    exchange(
        &d,
        &[
            &[
                "send",
                "--to",
                REVOKED,
                "--content-type",
                "text/plain",
                "--purpose",
                "treatment",
                "--in",
                "referral.json",
            ][..],
            &clinic[..],
        ]
        .concat(),
    )
    .fails_with(REVOKED);
    live.stop();
}

/// `openssl verify` accepts what `exchange ca` issues: a root's parties, a
/// subordinate CA, and its parties' chains (leaf, then the subordinate).
#[test]
fn openssl_verify_accepts_what_exchange_ca_issues() {
    if skip_without_openssl() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    exchange(d, &["ca", "init", "--dir", "root", "--name", "Test Root"]).ok();
    exchange(
        d,
        &[
            "ca",
            "init",
            "--dir",
            "sub",
            "--name",
            "Test Issuing CA",
            "--issuer",
            "root",
        ],
    )
    .ok();
    for (ca, out) in [("root", "direct"), ("sub", "under-sub")] {
        exchange(
            d,
            &[
                "ca", "issue", "--ca", ca, "--party", HOSPITAL, "--name", "Hospital", "--out", out,
            ],
        )
        .ok();
        exchange(
            d,
            &[
                "ca",
                "issue-client",
                "--ca",
                ca,
                "--client",
                "urn:local:hospital:app",
                "--out",
                &format!("{out}-app"),
            ],
        )
        .ok();
    }
    // The subordinate's CRL and the root's, in one file.
    let crls = std::fs::read_to_string(d.join("root/crl.pem")).unwrap()
        + &std::fs::read_to_string(d.join("sub/crl.pem")).unwrap();
    std::fs::write(d.join("crls.pem"), crls).unwrap();
    // Each issued file is the leaf, then (under the subordinate) its chain.
    let split = |file: &str| {
        let text = std::fs::read_to_string(d.join(file)).unwrap();
        let blocks: Vec<String> = text
            .split_inclusive("-----END CERTIFICATE-----\n")
            .map(str::to_owned)
            .filter(|b| b.contains("BEGIN CERTIFICATE"))
            .collect();
        let leaf = d.join(format!("{}.leaf", file.replace('/', "_")));
        let chain = d.join(format!("{}.chain", file.replace('/', "_")));
        std::fs::write(&leaf, &blocks[0]).unwrap();
        std::fs::write(&chain, blocks[1..].concat()).unwrap();
        (leaf, chain, blocks.len())
    };
    for (file, purpose, depth) in [
        ("direct/identity.pem", Some("sslclient"), 1),
        ("direct/encryption.pem", None, 1),
        ("direct-app/client.pem", Some("sslclient"), 1),
        ("under-sub/identity.pem", Some("sslclient"), 2),
        ("under-sub/identity.pem", Some("sslserver"), 2),
        ("under-sub/encryption.pem", None, 2),
        ("under-sub-app/client.pem", Some("sslclient"), 2),
    ] {
        let (leaf, chain, blocks) = split(file);
        assert_eq!(blocks, depth, "{file}");
        let mut args = vec![
            "verify".to_owned(),
            "-x509_strict".into(),
            "-crl_check_all".into(),
            "-CRLfile".into(),
            d.join("crls.pem").display().to_string(),
            "-CAfile".into(),
            d.join("root/ca.pem").display().to_string(),
        ];
        if blocks > 1 {
            args.extend(["-untrusted".into(), chain.display().to_string()]);
        }
        if let Some(p) = purpose {
            args.extend(["-purpose".into(), p.into()]);
        }
        args.push(leaf.display().to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = openssl(d, &args, &[]);
        assert!(out.contains(": OK"), "{file}: {out}");
    }
    // The subordinate itself, under the root.
    let out = openssl(
        d,
        &[
            "verify",
            "-x509_strict",
            "-CAfile",
            "root/ca.pem",
            "sub/ca.pem",
        ],
        &[],
    );
    assert!(out.contains(": OK"), "{out}");
    // And exchange's own check of the same chains.
    for file in ["under-sub/identity.pem", "under-sub/encryption.pem"] {
        exchange(
            d,
            &[
                "cert",
                "verify",
                "--trust",
                "root/ca.pem",
                "--crl",
                "crls.pem",
                file,
            ],
        )
        .ok();
    }
    // A revocation by the subordinate is seen by openssl too.
    exchange(
        d,
        &[
            "ca",
            "revoke",
            "--ca",
            "sub",
            "--cert",
            "under-sub/identity.pem",
        ],
    )
    .ok();
    let crls = std::fs::read_to_string(d.join("root/crl.pem")).unwrap()
        + &std::fs::read_to_string(d.join("sub/crl.pem")).unwrap();
    std::fs::write(d.join("crls.pem"), crls).unwrap();
    let (leaf, chain, _) = split("under-sub/identity.pem");
    let refused = Command::new("openssl")
        .current_dir(d)
        .args([
            "verify",
            "-crl_check_all",
            "-CRLfile",
            "crls.pem",
            "-CAfile",
            "root/ca.pem",
            "-untrusted",
        ])
        .arg(&chain)
        .arg(&leaf)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stdout).contains("revoked")
            || String::from_utf8_lossy(&refused.stderr).contains("revoked"),
        "{refused:?}"
    );
}
