//! `exchange demo`: the whole offline exchange, step by step, with the same
//! functions the subcommands use. A clinic refers a (synthetic) patient to a
//! hospital; the hospital opens the referral and signs a DELIVERED receipt,
//! which marks the provision boundary; a tampered copy is refused.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use exchange_core::route::HopRole;

use crate::envelope_cmd::{self, SealArgs};
use crate::error::{CliError, Result};
use crate::{ca, files};

const CLINIC: &str = "urn:jp:mhlw:facility:1310000013";
const HOSPITAL: &str = "urn:jp:mhlw:facility:1310000021";

const REFERRAL: &str = r#"{
  "resourceType": "Bundle",
  "type": "document",
  "meta": { "tag": [{ "code": "synthetic", "display": "Synthetic demo data: not a real patient" }] },
  "entry": [
    { "resource": { "resourceType": "Composition", "status": "final", "title": "診療情報提供書",
        "type": { "coding": [{ "system": "http://loinc.org", "code": "57133-1", "display": "Referral note" }] },
        "subject": { "display": "山田 太郎 (synthetic)" },
        "section": [{ "title": "紹介目的", "text": { "status": "generated", "div": "<div>精査加療のお願い (synthetic)</div>" } }] } },
    { "resource": { "resourceType": "Patient", "identifier": [{ "value": "P-000123" }],
        "name": [{ "text": "山田 太郎 (synthetic)" }], "birthDate": "1970-01-01" } }
  ]
}
"#;

fn step(n: u32, what: &str) {
    println!("\n[{n}] {what}");
}

/// Runs the demo in `dir`, or in a temporary directory removed afterwards.
pub(crate) fn run(dir: Option<&Path>) -> Result<()> {
    let tmp;
    let root: PathBuf = match dir {
        Some(d) => {
            files::create_dir(d)?;
            d.to_owned()
        }
        None => {
            tmp = tempfile::tempdir().map_err(|source| CliError::Write {
                path: std::env::temp_dir(),
                source,
            })?;
            tmp.path().to_owned()
        }
    };
    let now = SystemTime::now();
    let p = |name: &str| root.join(name);
    println!("exchange demo in {}", root.display());

    step(
        1,
        "A regional care network creates its CA (trust anchor, key, empty CRL).",
    );
    ca::init(&p("ca"), "Regional Care Network CA (demo)", 3650, now)?;

    step(
        2,
        "The CA issues credentials to Sakura Clinic and Minato General Hospital (医療機関コード in the party URI).",
    );
    ca::issue(&p("ca"), CLINIC, "Sakura Clinic", &p("clinic"), 730, now)?;
    ca::issue(
        &p("ca"),
        HOSPITAL,
        "Minato General Hospital",
        &p("hospital"),
        730,
        now,
    )?;

    step(
        3,
        "The hospital's encryption certificate checks out against the CA and its CRL.",
    );
    ca::verify(
        &p("ca/ca.pem"),
        Some(&p("ca/crl.pem")),
        now,
        &p("hospital/encryption.pem"),
    )?;

    step(
        4,
        "The clinic writes a referral letter (診療情報提供書, synthetic FHIR JSON) and seals it to the hospital.",
    );
    files::write_atomic(&p("referral.json"), REFERRAL.as_bytes())?;
    envelope_cmd::seal(
        &SealArgs {
            from: p("clinic"),
            to: vec![p("hospital/encryption.pem")],
            recipient_role: HopRole::ThirdParty,
            trust: p("ca/ca.pem"),
            crl: Some(p("ca/crl.pem")),
            content_type: "application/fhir+json".into(),
            subjects: vec!["P-000123".into()],
            subject_system: envelope_cmd::DEFAULT_SUBJECT_SYSTEM.into(),
            title: "診療情報提供書".into(),
            document_type: "57133-1 Referral note".into(),
            purpose: "treatment (referral)".into(),
            route: Vec::new(),
            expires_in: Duration::from_secs(7 * 86_400),
            input: p("referral.json"),
            output: p("referral.exenv"),
        },
        now,
    )?;

    step(
        5,
        "Anyone on the way sees only the public head: no patient, no title. With the CA certificate it verifies.",
    );
    envelope_cmd::inspect(
        &p("referral.exenv"),
        Some((&p("ca/ca.pem"), Some(&p("ca/crl.pem")))),
        false,
        now,
    )?;

    step(
        6,
        "The hospital opens it: signature, chain, recipient entry and key commitment first, then the payload; it signs a DELIVERED receipt.",
    );
    files::create_dir(&p("inbox"))?;
    let opened = envelope_cmd::open(
        &p("hospital"),
        &p("ca/ca.pem"),
        Some(&p("ca/crl.pem")),
        &p("referral.exenv"),
        &p("inbox/referral.json"),
        Some(&p("referral.exrcpt")),
        false,
        now,
    )?;
    let same = files::read(&p("inbox/referral.json"))? == REFERRAL.as_bytes();
    println!("  plaintext identical to what the clinic sealed: {same}");

    step(
        7,
        "The clinic (or an auditor, offline) verifies the receipt: it marks the provision boundary (責任分界点).",
    );
    envelope_cmd::verify_receipt(
        &p("ca/ca.pem"),
        Some(&p("ca/crl.pem")),
        Some(&p("referral.exenv")),
        &p("referral.exrcpt"),
        now,
    )?;

    step(
        8,
        "Someone flips one byte of the ciphertext on the way: the hospital refuses it and writes nothing.",
    );
    let mut bytes = files::read(&p("referral.exenv"))?;
    let last = bytes.len() - 20;
    bytes[last] ^= 0x01;
    files::write_atomic(&p("tampered.exenv"), &bytes)?;
    let out = p("inbox/tampered.json");
    match envelope_cmd::open(
        &p("hospital"),
        &p("ca/ca.pem"),
        Some(&p("ca/crl.pem")),
        &p("tampered.exenv"),
        &out,
        None,
        false,
        now,
    ) {
        Err(e) => println!("  refused: {e}; {} exists: {}", out.display(), out.exists()),
        Ok(_) => return Err(CliError::Usage("the tampered envelope was accepted".into())),
    }
    if !same || out.exists() || opened.is_none() {
        return Err(CliError::Usage("demo check failed".into()));
    }

    println!(
        "\nDone. Files: CA in ca/, credentials in clinic/ and hospital/, referral.exenv, referral.exrcpt, inbox/."
    );
    if dir.is_none() {
        println!(
            "(They were in a temporary directory; run `exchange demo --dir DIR` to keep them.)"
        );
    }
    Ok(())
}
