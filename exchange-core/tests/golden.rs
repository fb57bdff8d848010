//! Golden vectors (testdata/): a format change cannot pass unnoticed.
//!
//! The committed envelope must open to the committed plaintext, every
//! key-schedule value must re-derive from the seeded RNG, re-sealing with the
//! same keys, seed and time must give the same bytes, the committed receipt
//! must verify, and every case in `vectors/v1/cases` must fail (or pass)
//! exactly as its `.expect` file says. `testdata/pki/expect.txt` does the same
//! for the test PKI.
//!
//! Regenerate (new keys, so every vector changes; commit them with the format
//! change and its spec):
//! `cargo test -p exchange-core --test golden -- --ignored regenerate`
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit};
use common::metadata;
use exchange_core::ca::{CertificateAuthority, CrlState, LeafSpec, RevokedSerial, Validity};
use exchange_core::envelope::{EnvelopeHead, SealerBuilder, open_slice};
use exchange_core::identity::{Certificate, DecryptionKey, Identity, KeyRole};
use exchange_core::receipt::{Disposition, ReceiptContent, SignedReceipt};
use exchange_core::route::HopRole;
use exchange_core::suite::{KeySchedule, SecretKey32};
use exchange_core::trust::TrustStore;
use exchange_core::{MessageId, PartyUri};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};

/// 2026-06-01T00:00:00Z: when the vectors are sealed.
const SEALED_AT: u64 = 1_780_272_000;
const SEED: u64 = 2026;
const MULTI_SEED: u64 = 7;
const CLINIC: &str = "urn:jp:mhlw:facility:1310000013";
const HOSPITAL: &str = "urn:jp:mhlw:facility:1310000021";

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// When the vectors are opened and checked.
fn check_time() -> SystemTime {
    at(SEALED_AT + 3600)
}

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata")
}

fn read(rel: &str) -> Vec<u8> {
    let p = testdata().join(rel);
    fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn identity(dir: &str) -> Identity {
    Identity::from_pem(
        &read(&format!("pki/{dir}/identity.pem")),
        &read(&format!("pki/{dir}/identity.key.pem")),
    )
    .unwrap()
}

fn decryption_key(dir: &str) -> DecryptionKey {
    DecryptionKey::from_pem(
        &read(&format!("pki/{dir}/encryption.pem")),
        &read(&format!("pki/{dir}/encryption.key.pem")),
    )
    .unwrap()
}

fn trust() -> TrustStore {
    TrustStore::builder()
        .anchors_pem(&read("pki/ca.pem"))
        .unwrap()
        .crls_pem(&read("pki/crl.pem"))
        .unwrap()
        .require_crls()
        .build()
        .unwrap()
}

/// The one recipe both the generator and the checks use.
fn seal_vector(
    from: &Identity,
    plaintext: &[u8],
    chunk: u32,
    seed: u64,
    trust: &TrustStore,
) -> Vec<u8> {
    let to = Certificate::from_pem(&read("pki/hospital/encryption.pem"))
        .unwrap()
        .remove(0);
    SealerBuilder::new(from, "application/fhir+json")
        .recipient(
            trust.verify_encryption(&to, at(SEALED_AT)).unwrap(),
            HopRole::ThirdParty,
        )
        .purpose("treatment")
        .metadata(metadata())
        .chunk_size(chunk)
        .start(at(SEALED_AT), &mut ChaCha20Rng::seed_from_u64(seed))
        .unwrap()
        .seal_to_vec(plaintext)
}

fn receipt_content(head: &exchange_core::envelope::VerifiedHead) -> ReceiptContent {
    ReceiptContent::for_head(
        head,
        HopRole::ThirdParty,
        Disposition::Delivered,
        at(SEALED_AT + 600),
    )
}

fn keyschedule() -> Vec<(String, String)> {
    String::from_utf8(read("vectors/v1/keyschedule.txt"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect()
}

fn ks(name: &str) -> String {
    keyschedule()
        .into_iter()
        .find(|(k, _)| k == name)
        .unwrap_or_else(|| panic!("no {name}"))
        .1
}

#[test]
fn committed_envelope_opens_to_committed_plaintext() {
    let env = read("vectors/v1/referral.exenv");
    let (head, meta, plain) =
        open_slice(&env, &trust(), &[decryption_key("hospital")], check_time()).unwrap();
    assert_eq!(plain, read("vectors/v1/referral.json"));
    assert_eq!(meta, metadata());
    assert_eq!(head.sender().party().as_str(), CLINIC);
}

#[test]
fn key_schedule_rederives_from_the_seed() {
    let env = read("vectors/v1/referral.exenv");
    let head = EnvelopeHead::read_from(&mut env.as_slice()).unwrap();
    let h = head.header_unverified().unwrap();
    assert_eq!(ks("seed"), SEED.to_string());
    assert_eq!(ks("created_ms"), (SEALED_AT * 1000).to_string());

    let mut rng = ChaCha20Rng::seed_from_u64(SEED);
    let mut id = [0u8; 16];
    rng.fill_bytes(&mut id);
    let mut cek = [0u8; 32];
    rng.fill_bytes(&mut cek);
    let message_id = MessageId::from_bytes(id);
    assert_eq!(ks("message_id"), hex::encode(id));
    assert_eq!(h.message_id, message_id);
    assert_eq!(ks("cek"), hex::encode(cek));

    let s = KeySchedule::derive(&SecretKey32::from_bytes(cek), &message_id);
    assert_eq!(ks("commitment"), hex::encode(s.commitment));
    assert_eq!(h.key_commitment, s.commitment);
    assert_eq!(
        ks("payload_key"),
        hex::encode(s.payload_key.expose_secret())
    );
    assert_eq!(
        ks("metadata_key"),
        hex::encode(s.metadata_key.expose_secret())
    );
    assert_eq!(ks("hpke_enc"), hex::encode(h.recipients[0].enc()));
    assert_eq!(
        ks("wrapped_key"),
        hex::encode(h.recipients[0].wrapped_key())
    );
    assert_eq!(ks("header_sha256"), hex::encode(head.header_sha256()));
    assert_eq!(ks("ciphertext_sha256"), hex::encode(h.ciphertext_sha256));
    assert_eq!(ks("signature"), hex::encode(head.signature()));

    // The payload key and nonce layout, checked with AES-GCM directly
    // (docs/envelope-format.md §6): one chunk, index 0, last flag set.
    let ct = &env[12 + head.as_bytes().len()..];
    let (body, tag) = ct.split_at(ct.len() - 16);
    let mut buf = body.to_vec();
    let mut nonce = [0u8; 12];
    nonce[11] = 1;
    Aes256Gcm::new(&(*s.payload_key.expose_secret()).into())
        .decrypt_inout_detached(
            &nonce.into(),
            &[],
            buf.as_mut_slice().into(),
            tag.try_into().unwrap(),
        )
        .unwrap();
    assert_eq!(buf, read("vectors/v1/referral.json"));
}

#[test]
fn resealing_reproduces_the_committed_bytes() {
    let same = |a: &[u8], b: &[u8], what: &str| {
        assert!(
            a == b,
            "re-sealed {what} differs from the committed vector (format change?)"
        );
    };
    let plain = read("vectors/v1/referral.json");
    same(
        &seal_vector(&identity("clinic"), &plain, 65_536, SEED, &trust()),
        &read("vectors/v1/referral.exenv"),
        "referral.exenv",
    );
    let multi = seal_vector(
        &identity("clinic"),
        &multi_plaintext(),
        256,
        MULTI_SEED,
        &trust(),
    );
    same(&multi, &read("vectors/v1/cases/ok.exenv"), "cases/ok.exenv");
}

#[test]
fn committed_receipt_verifies_and_reissues_identically() {
    let env = read("vectors/v1/referral.exenv");
    let head = EnvelopeHead::read_from(&mut env.as_slice())
        .unwrap()
        .verify(&trust(), check_time())
        .unwrap();
    let r = SignedReceipt::from_file(&read("vectors/v1/referral.exrcpt"))
        .unwrap()
        .verify(&trust())
        .unwrap();
    r.check_for(&head).unwrap();
    assert_eq!(r.issuer().as_str(), HOSPITAL);
    assert_eq!(r.disposition(), &Disposition::Delivered);
    assert!(r.is_third_party_custody());
    let again = SignedReceipt::issue(&identity("hospital"), &receipt_content(&head));
    assert_eq!(again.to_file(), read("vectors/v1/referral.exrcpt"));
}

fn expectation(text: &str) -> Option<&str> {
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("expect:"))?
        .trim();
    if line == "ok" {
        Some("ok")
    } else {
        line.strip_prefix("error =").map(str::trim)
    }
}

#[test]
fn every_case_fails_as_expected() {
    let dir = testdata().join("vectors/v1/cases");
    let mut n = 0;
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("exenv") {
            continue;
        }
        let expect = fs::read_to_string(path.with_extension("expect")).unwrap();
        let want =
            expectation(&expect).unwrap_or_else(|| panic!("{}: no expect line", path.display()));
        let got = match open_slice(
            &fs::read(&path).unwrap(),
            &trust(),
            &[decryption_key("hospital")],
            check_time(),
        ) {
            Ok(_) => "ok".to_owned(),
            Err(e) => e.reason_code().to_owned(),
        };
        assert_eq!(got, want, "{}", path.display());
        n += 1;
    }
    assert!(n >= 12, "only {n} cases");
}

#[test]
fn test_pki_certificates_validate_as_labelled() {
    let expect = String::from_utf8(read("pki/expect.txt")).unwrap();
    let mut n = 0;
    for line in expect
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (file, rest) = line.split_once(' ').unwrap();
        let want = expectation(rest).unwrap();
        let cert = Certificate::from_pem(&read(&format!("pki/{file}"))).unwrap();
        let res = if file.ends_with("encryption.pem") {
            trust().verify_encryption(&cert[0], check_time()).map(drop)
        } else {
            trust().verify_identity(&cert, check_time()).map(drop)
        };
        let got = res.map_or_else(|e| e.reason_code().to_owned(), |()| "ok".to_owned());
        assert_eq!(got, want, "{file}");
        n += 1;
    }
    assert!(n >= 8);
}

fn multi_plaintext() -> Vec<u8> {
    (0..1000u32).map(|i| (i * 7 % 251) as u8).collect()
}

// ---------------------------------------------------------------- generator

fn write(rel: &str, data: impl AsRef<[u8]>) {
    let p = testdata().join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

fn write_leaf(
    ca: &CertificateAuthority,
    dir: &str,
    uri: &str,
    name: &str,
    role: KeyRole,
    validity: Validity,
) {
    let c = ca
        .issue_leaf(&LeafSpec {
            party: Some(PartyUri::new(uri).unwrap()),
            name: name.into(),
            role,
            validity,
        })
        .unwrap();
    // wrong-usage/ deliberately holds an encryption-profile certificate in the identity slot.
    let file = if role == KeyRole::Identity || dir == "wrong-usage" {
        "identity"
    } else {
        "encryption"
    };
    write(&format!("pki/{dir}/{file}.pem"), &c.cert_pem);
    write(&format!("pki/{dir}/{file}.key.pem"), c.key_pem.as_bytes());
}

fn year(y: i32) -> SystemTime {
    let t = time::Date::from_calendar_date(y, time::Month::January, 1)
        .unwrap()
        .midnight()
        .assume_utc();
    at(u64::try_from(t.unix_timestamp()).unwrap())
}

#[test]
#[ignore = "rewrites testdata/: run by hand when the format changes"]
fn regenerate() {
    let normal = Validity {
        not_before: year(2026),
        not_after: year(2031),
    };
    let ca = CertificateAuthority::generate(
        "Exchange Test Network CA",
        Validity {
            not_before: year(2026),
            not_after: year(2036),
        },
    )
    .unwrap();
    write("pki/ca.pem", ca.certificate_pem());
    write("pki/ca.key.pem", ca.key_pem().as_bytes());
    let foreign = CertificateAuthority::generate(
        "Foreign CA",
        Validity {
            not_before: year(2026),
            not_after: year(2036),
        },
    )
    .unwrap();
    write("pki/foreign-ca.pem", foreign.certificate_pem());

    let parties = [
        ("clinic", CLINIC, "Sakura Clinic"),
        ("hospital", HOSPITAL, "Minato General Hospital"),
    ];
    for (dir, uri, name) in parties {
        write_leaf(&ca, dir, uri, name, KeyRole::Identity, normal);
        write_leaf(&ca, dir, uri, name, KeyRole::Encryption, normal);
    }
    write_leaf(
        &ca,
        "expired",
        "urn:jp:mhlw:facility:1310000039",
        "Expired Clinic",
        KeyRole::Identity,
        Validity {
            not_before: year(2024),
            not_after: year(2025),
        },
    );
    write_leaf(
        &ca,
        "not-yet-valid",
        "urn:jp:mhlw:facility:1310000047",
        "Future Clinic",
        KeyRole::Identity,
        Validity {
            not_before: year(2027),
            not_after: year(2028),
        },
    );
    write_leaf(
        &ca,
        "revoked",
        "urn:jp:mhlw:facility:1310000054",
        "Revoked Clinic",
        KeyRole::Identity,
        normal,
    );
    // An encryption-profile (keyAgreement) certificate in the identity slot.
    write_leaf(
        &ca,
        "wrong-usage",
        "urn:jp:mhlw:facility:1310000062",
        "Wrong Usage Clinic",
        KeyRole::Encryption,
        normal,
    );
    write_leaf(
        &foreign,
        "foreign",
        CLINIC,
        "Look-alike Clinic",
        KeyRole::Identity,
        normal,
    );

    let revoked = Certificate::from_pem(&read("pki/revoked/identity.pem"))
        .unwrap()
        .remove(0);
    let crl = ca
        .crl(
            &CrlState {
                number: 1,
                revoked: vec![RevokedSerial {
                    serial: hex::decode(revoked.serial_hex()).unwrap(),
                    revoked_at: at(SEALED_AT - 86_400 * 30),
                }],
            },
            at(SEALED_AT - 86_400 * 31),
            year(2036),
        )
        .unwrap();
    write("pki/crl.pem", crl);
    write(
        "pki/expect.txt",
        "# certificate  expect: ok | error = <reason code>, validated at 2026-06-01T01:00:00Z against ca.pem + crl.pem\n\
         clinic/identity.pem expect: ok\n\
         clinic/encryption.pem expect: ok\n\
         hospital/identity.pem expect: ok\n\
         hospital/encryption.pem expect: ok\n\
         expired/identity.pem expect: error = certificate-expired\n\
         not-yet-valid/identity.pem expect: error = certificate-not-yet-valid\n\
         revoked/identity.pem expect: error = revoked\n\
         wrong-usage/identity.pem expect: error = wrong-key-usage\n\
         foreign/identity.pem expect: error = untrusted-chain\n",
    );

    // Vectors.
    let trust = trust();
    let plain = read("vectors/v1/referral.json");
    let env = seal_vector(&identity("clinic"), &plain, 65_536, SEED, &trust);
    write("vectors/v1/referral.exenv", &env);
    let head = EnvelopeHead::read_from(&mut env.as_slice())
        .unwrap()
        .verify(&trust, check_time())
        .unwrap();
    write(
        "vectors/v1/referral.exrcpt",
        SignedReceipt::issue(&identity("hospital"), &receipt_content(&head)).to_file(),
    );

    let mut rng = ChaCha20Rng::seed_from_u64(SEED);
    let mut id = [0u8; 16];
    rng.fill_bytes(&mut id);
    let mut cek = [0u8; 32];
    rng.fill_bytes(&mut cek);
    let s = KeySchedule::derive(&SecretKey32::from_bytes(cek), &MessageId::from_bytes(id));
    let h = head.header();
    let lines = [
        ("seed", SEED.to_string()),
        ("created_ms", (SEALED_AT * 1000).to_string()),
        ("message_id", hex::encode(id)),
        ("cek", hex::encode(cek)),
        ("commitment", hex::encode(s.commitment)),
        ("payload_key", hex::encode(s.payload_key.expose_secret())),
        ("metadata_key", hex::encode(s.metadata_key.expose_secret())),
        ("hpke_enc", hex::encode(h.recipients[0].enc())),
        ("wrapped_key", hex::encode(h.recipients[0].wrapped_key())),
        ("header_sha256", hex::encode(head.head().header_sha256())),
        ("ciphertext_sha256", hex::encode(h.ciphertext_sha256)),
        ("signature", hex::encode(head.head().signature())),
    ];
    let mut ks = String::from(
        "# Key schedule of referral.exenv (docs/envelope-format.md §5, §10).\n# ChaCha20Rng::seed_from_u64(seed) draws message_id (16 bytes), then cek (32), then the HPKE ephemeral key.\n",
    );
    for (k, v) in lines {
        ks.push_str(&format!("{k} = {v}\n"));
    }
    write("vectors/v1/keyschedule.txt", ks);

    // Cases: a 4-chunk envelope (1000 bytes, 256-byte chunks), and variants.
    let ok = seal_vector(
        &identity("clinic"),
        &multi_plaintext(),
        256,
        MULTI_SEED,
        &trust,
    );
    let mhead = EnvelopeHead::read_from(&mut ok.as_slice()).unwrap();
    let ct = 12 + mhead.as_bytes().len();
    let chunk = |i: usize| {
        let start = ct + i * 272;
        start..(start + 272).min(ok.len())
    };
    let header_at = ok
        .windows(mhead.header_bytes().len())
        .position(|w| w == mhead.header_bytes())
        .unwrap();
    let flip = |at: usize| {
        let mut e = ok.clone();
        e[at] ^= 1;
        e
    };
    let reorder = |order: &[usize]| {
        let mut e = ok[..ct].to_vec();
        for &i in order {
            e.extend_from_slice(&ok[chunk(i)]);
        }
        e
    };
    let mut extended = ok.clone();
    extended.push(0);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("ok", ok.clone(), "ok"),
        ("header-flip", flip(header_at + 40), "bad-signature"),
        (
            "signature-flip",
            flip(header_at + mhead.header_bytes().len() + 12),
            "bad-signature",
        ),
        ("chain-flip", flip(ct - 1), "bad-certificate-signature"),
        ("chunk0-flip", flip(chunk(0).start + 5), "decryption-failed"),
        ("chunk3-tag-flip", flip(ok.len() - 1), "decryption-failed"),
        ("reordered", reorder(&[1, 0, 2, 3]), "decryption-failed"),
        ("dropped", reorder(&[0, 2, 3]), "decryption-failed"),
        ("duplicated", reorder(&[0, 1, 1, 2, 3]), "decryption-failed"),
        ("truncated", ok[..ok.len() - 10].to_vec(), "truncated"),
        ("last-chunk-dropped", reorder(&[0, 1, 2]), "truncated"),
        ("extended", extended, "trailing-data"),
        (
            "bad-magic",
            {
                let mut e = ok.clone();
                e[0] = b'Z';
                e
            },
            "malformed",
        ),
        (
            "expired-sender",
            seal_vector(&identity("expired"), b"x", 256, 1, &trust),
            "certificate-expired",
        ),
        (
            "revoked-sender",
            seal_vector(&identity("revoked"), b"x", 256, 1, &trust),
            "revoked",
        ),
        (
            "wrong-usage-sender",
            seal_vector(&identity("wrong-usage"), b"x", 256, 1, &trust),
            "wrong-key-usage",
        ),
        (
            "foreign-sender",
            seal_vector(&identity("foreign"), b"x", 256, 1, &trust),
            "untrusted-chain",
        ),
    ];
    let _ = fs::remove_dir_all(testdata().join("vectors/v1/cases"));
    for (name, bytes, want) in cases {
        write(&format!("vectors/v1/cases/{name}.exenv"), bytes);
        let expect = if want == "ok" {
            "expect: ok\n".to_owned()
        } else {
            format!("expect: error = {want}\n")
        };
        write(&format!("vectors/v1/cases/{name}.expect"), expect);
    }
}
