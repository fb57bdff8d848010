//! Every rejection the envelope format promises, each with its specific error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use exchange_core::ca::Validity;
use exchange_core::envelope::{EnvelopeHead, SealerBuilder, open_slice};
use exchange_core::identity::{
    Certificate, DecryptionKey, EncryptionKey, Identity, IdentityKey, KeyRole,
};
use exchange_core::route::HopRole;
use exchange_core::trust::TrustStore;
use exchange_core::{Error, FormatError, TrustError};
use proptest::prelude::*;

const CS: u32 = 256;
/// 3.5 chunks: chunks 0-2 full, chunk 3 half.
const LEN: usize = 3 * CS as usize + 128;

struct Fixture {
    net: Net,
    clinic: Party,
    hospital: Party,
    env: Vec<u8>,
    head: EnvelopeHead,
    /// Offset of the first ciphertext byte.
    ct: usize,
}

fn fixture() -> Fixture {
    let net = Net::new("Test CA");
    let clinic = net.party("urn:jp:mhlw:facility:1310000013");
    let hospital = net.party("urn:jp:mhlw:facility:1310000021");
    let env = seal(&net, &clinic, &[&hospital], &payload(LEN), CS, 7);
    let head = EnvelopeHead::read_from(&mut env.as_slice()).unwrap();
    let ct = 12 + head.as_bytes().len();
    Fixture {
        net,
        clinic,
        hospital,
        env,
        head,
        ct,
    }
}

impl Fixture {
    fn open(&self, env: &[u8]) -> Error {
        open_slice(
            env,
            &self.net.trust(),
            std::slice::from_ref(&self.hospital.key),
            now(),
        )
        .expect_err("tampered envelope opened")
    }

    /// Byte range of ciphertext chunk `i` (ciphertext || tag).
    fn chunk(&self, i: usize) -> std::ops::Range<usize> {
        let full = CS as usize + 16;
        let start = self.ct + i * full;
        let end = if i == 3 { self.env.len() } else { start + full };
        start..end
    }

    fn flipped(&self, at: usize) -> Vec<u8> {
        let mut e = self.env.clone();
        e[at] ^= 0x01;
        e
    }
}

#[test]
fn untampered_fixture_opens() {
    let f = fixture();
    let (_, _, plain) = open_slice(
        &f.env,
        &f.net.trust(),
        std::slice::from_ref(&f.hospital.key),
        now(),
    )
    .unwrap();
    assert_eq!(plain, payload(LEN));
    assert_eq!(f.chunk(3).len(), 128 + 16);
}

#[test]
fn flipped_header_byte_is_bad_signature() {
    let f = fixture();
    let at = find(&f.env, f.head.header_bytes());
    for off in [
        0,
        5,
        f.head.header_bytes().len() / 2,
        f.head.header_bytes().len() - 1,
    ] {
        assert!(
            matches!(f.open(&f.flipped(at + off)), Error::BadSignature),
            "offset {off}"
        );
    }
}

#[test]
fn flipped_recipient_entry_is_bad_signature() {
    let f = fixture();
    let h = f.head.header_unverified().unwrap();
    let entry = &h.recipients[0];
    for field in [
        entry.enc(),
        entry.wrapped_key(),
        entry.key_fingerprint.as_bytes().as_slice(),
    ] {
        let at = find(&f.env, field);
        assert!(matches!(f.open(&f.flipped(at + 3)), Error::BadSignature));
    }
}

#[test]
fn flipped_signature_is_bad_signature() {
    let f = fixture();
    let sig_at = find(&f.env, f.head.header_bytes()) + f.head.header_bytes().len() + 2;
    for off in [0, 31, 32, 63] {
        assert!(
            matches!(f.open(&f.flipped(sig_at + off)), Error::BadSignature),
            "offset {off}"
        );
    }
}

#[test]
fn flipped_sender_chain_byte_is_rejected() {
    let f = fixture();
    let leaf = f.clinic.identity.certificate().der().to_vec();
    let at = find(&f.env, &leaf);
    // Last byte: inside the CA's signature over the certificate.
    let err = f.open(&f.flipped(at + leaf.len() - 1));
    assert!(
        matches!(err, Error::Trust(TrustError::BadCertificateSignature)),
        "{err:?}"
    );
    // A different, valid certificate of the same party: the header's fingerprint pins the signer.
    // (ECDSA signatures vary in DER length: issue until the length matches, to keep the framing.)
    let other_leaf = (0..64)
        .map(|_| {
            f.net
                .party(f.clinic.uri.as_str())
                .identity
                .certificate()
                .clone()
        })
        .find(|c| c.der().len() == leaf.len())
        .unwrap();
    assert_ne!(other_leaf.der().as_ref(), leaf.as_slice());
    let mut e = f.env.clone();
    e[at..at + leaf.len()].copy_from_slice(other_leaf.der());
    assert!(matches!(
        f.open(&e),
        Error::BadSignature | Error::SenderMismatch
    ));
    // The leaf's public key: the header signature no longer verifies under it.
    let pk = f
        .clinic
        .identity
        .certificate()
        .public_key()
        .unwrap()
        .to_sec1_bytes();
    let err = f.open(&f.flipped(find(&f.env, &pk) + 10));
    assert!(
        matches!(
            err,
            Error::BadSignature | Error::Trust(TrustError::UnsupportedKey)
        ),
        "{err:?}"
    );
}

#[test]
fn flipped_byte_in_each_chunk_is_rejected_at_that_chunk() {
    let f = fixture();
    for i in 0..4 {
        let r = f.chunk(i);
        for at in [r.start, r.start + 100, r.end - 1] {
            let err = f.open(&f.flipped(at));
            assert!(
                matches!(err, Error::ChunkDecryption { index } if index == i as u64),
                "chunk {i}: {err:?}"
            );
        }
    }
}

#[test]
fn relay_detects_flipped_chunk_by_digest() {
    let f = fixture();
    for i in 0..4 {
        let env = f.flipped(f.chunk(i).start + 1);
        let head = f.head.verify(&f.net.trust(), now()).unwrap();
        let mut v = head.ciphertext_verifier();
        v.update(&env[f.ct..]).unwrap();
        assert!(matches!(v.finish(), Err(Error::DigestMismatch)));
    }
}

fn rebuild(f: &Fixture, order: &[usize]) -> Vec<u8> {
    let mut e = f.env[..f.ct].to_vec();
    for &i in order {
        e.extend_from_slice(&f.env[f.chunk(i)]);
    }
    e
}

#[test]
fn reordered_chunks_are_rejected() {
    let f = fixture();
    assert!(matches!(
        f.open(&rebuild(&f, &[1, 0, 2, 3])),
        Error::ChunkDecryption { index: 0 }
    ));
    assert!(matches!(
        f.open(&rebuild(&f, &[0, 2, 1, 3])),
        Error::ChunkDecryption { index: 1 }
    ));
}

#[test]
fn dropped_chunks_are_rejected() {
    let f = fixture();
    // A middle chunk: the next one arrives at the wrong position.
    assert!(matches!(
        f.open(&rebuild(&f, &[0, 2, 3])),
        Error::ChunkDecryption { index: 1 }
    ));
    // The final chunk: the stream ends early.
    assert!(matches!(
        f.open(&rebuild(&f, &[0, 1, 2])),
        Error::Truncated { .. }
    ));
}

#[test]
fn duplicated_chunk_is_rejected() {
    let f = fixture();
    assert!(matches!(
        f.open(&rebuild(&f, &[0, 1, 1, 2, 3])),
        Error::ChunkDecryption { index: 2 }
    ));
    // A full-size chunk where the short last chunk belongs.
    assert!(matches!(
        f.open(&rebuild(&f, &[0, 1, 2, 2])),
        Error::ChunkDecryption { index: 3 }
    ));
}

#[test]
fn truncated_stream_is_rejected() {
    let f = fixture();
    for cut in [1, 16, 100, f.env.len() - f.ct] {
        let err = f.open(&f.env[..f.env.len() - cut]);
        assert!(
            matches!(err, Error::Truncated { expected, received } if received < expected),
            "cut {cut}: {err:?}"
        );
    }
    // Truncated inside the head.
    assert!(matches!(
        f.open(&f.env[..f.ct - 1]),
        Error::Format(FormatError::UnexpectedEof(_))
    ));
}

#[test]
fn extended_stream_is_rejected() {
    let f = fixture();
    let mut e = f.env.clone();
    e.push(0);
    assert!(matches!(f.open(&e), Error::TrailingData));
    // An extra copy of the (genuine) last chunk.
    assert!(matches!(
        f.open(&rebuild(&f, &[0, 1, 2, 3, 3])),
        Error::TrailingData
    ));
}

#[test]
fn recipient_not_in_list_is_rejected() {
    let f = fixture();
    let stranger = f.net.party("urn:jp:mhlw:facility:1310000099");
    let err = open_slice(
        &f.env,
        &f.net.trust(),
        std::slice::from_ref(&stranger.key),
        now(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::NotARecipient));
    // The sender itself is not a recipient either.
    let err = open_slice(
        &f.env,
        &f.net.trust(),
        std::slice::from_ref(&f.clinic.key),
        now(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::NotARecipient));
}

#[test]
fn wrong_decryption_key_is_rejected() {
    let f = fixture();
    // The hospital's certificate paired with someone else's private key.
    let other = f.net.party("urn:jp:mhlw:facility:1310000099");
    let err = DecryptionKey::new(
        f.hospital.encryption_cert(),
        EncryptionKey::from_pkcs8_pem(other.encryption_key_pem.as_bytes()).unwrap(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::KeyMismatch));
    // Same for identities.
    let err = Identity::new(
        vec![f.hospital.identity.certificate().clone()],
        IdentityKey::from_pkcs8_pem(other.identity_key_pem.as_bytes()).unwrap(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::KeyMismatch));
}

#[test]
fn sender_from_untrusted_ca_is_rejected() {
    let f = fixture();
    let foreign = Net::new("Foreign CA");
    let mallory = foreign.party("urn:jp:mhlw:facility:1310000013");
    // Mallory (same party URI, other CA) can still encrypt to the hospital's real key.
    let env = SealerBuilder::new(&mallory.identity, "application/fhir+json")
        .recipient(f.net.recipient_key(&f.hospital), HopRole::ThirdParty)
        .start(now(), &mut rng(1))
        .unwrap()
        .seal_to_vec(b"forged referral");
    let err = f.open(&env);
    assert!(
        matches!(err, Error::Trust(TrustError::UnknownIssuer)),
        "{err:?}"
    );
    // And a recipient certificate from the foreign CA is refused at seal time.
    let err = f
        .net
        .trust()
        .verify_encryption(&mallory.encryption_cert(), now())
        .unwrap_err();
    assert!(matches!(err, Error::Trust(TrustError::UnknownIssuer)));
}

#[test]
fn expired_or_not_yet_valid_sender_certificate_is_rejected() {
    let net = Net::new("Test CA");
    let hospital = net.party("urn:h");
    let expired = net.party_with(
        "urn:e",
        Validity {
            not_before: now() - 400 * DAY,
            not_after: now() - DAY,
        },
    );
    let future = net.party_with(
        "urn:f",
        Validity {
            not_before: now() + DAY,
            not_after: now() + 400 * DAY,
        },
    );
    for (p, want) in [
        (&expired, TrustError::Expired),
        (&future, TrustError::NotYetValid),
    ] {
        let env = seal(&net, p, &[&hospital], b"x", CS, 1);
        let err = open_slice(
            &env,
            &net.trust(),
            std::slice::from_ref(&hospital.key),
            now(),
        )
        .unwrap_err();
        assert!(matches!(&err, Error::Trust(t) if *t == want), "{err:?}");
    }
    // An expired recipient encryption certificate cannot be sealed to.
    let err = net
        .trust()
        .verify_encryption(&expired.encryption_cert(), now())
        .unwrap_err();
    assert!(matches!(err, Error::Trust(TrustError::Expired)));
}

#[test]
fn expired_envelope_is_rejected_unless_reading_an_archive() {
    let f = fixture();
    let later = now() + 8 * DAY; // default lifetime is 7 days
    let head = EnvelopeHead::read_from(&mut f.env.as_slice()).unwrap();
    assert!(matches!(
        head.verify(&f.net.trust(), later),
        Err(Error::Expired { .. })
    ));
    head.verify_ignoring_expiry(&f.net.trust(), later).unwrap();
    // Created in the future beyond the clock-skew allowance.
    let early = now() - std::time::Duration::from_secs(3600);
    assert!(matches!(
        head.verify(&f.net.trust(), early),
        Err(Error::NotYetValid)
    ));
}

#[test]
fn revoked_sender_is_rejected() {
    let f = fixture();
    let crl = f.net.crl(&[&f.clinic], now() + 30 * DAY);
    let err = open_slice(
        &f.env,
        &f.net.trust_with_crl(&crl),
        std::slice::from_ref(&f.hospital.key),
        now(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Trust(TrustError::Revoked)), "{err:?}");
    // A CRL that revokes someone else lets it through.
    let other = f.net.party("urn:o");
    let crl = f.net.crl(&[&other], now() + 30 * DAY);
    open_slice(
        &f.env,
        &f.net.trust_with_crl(&crl),
        std::slice::from_ref(&f.hospital.key),
        now(),
    )
    .unwrap();
}

#[test]
fn stale_or_missing_crl_fails_closed() {
    let f = fixture();
    let stale = f.net.crl(&[], now() - std::time::Duration::from_secs(60));
    let err = f
        .net
        .trust_with_crl(&stale)
        .verify_identity(f.clinic.identity.chain(), now())
        .unwrap_err();
    assert!(
        matches!(err, Error::Trust(TrustError::CrlExpired)),
        "{err:?}"
    );
    // Explicit relaxation.
    TrustStore::builder()
        .anchors_pem(f.net.ca_pem.as_bytes())
        .unwrap()
        .crls_pem(stale.as_bytes())
        .unwrap()
        .allow_stale_crls()
        .build()
        .unwrap()
        .verify_identity(f.clinic.identity.chain(), now())
        .unwrap();
    // Required but absent.
    let strict = TrustStore::builder()
        .anchors_pem(f.net.ca_pem.as_bytes())
        .unwrap()
        .require_crls()
        .build()
        .unwrap();
    let err = strict
        .verify_identity(f.clinic.identity.chain(), now())
        .unwrap_err();
    assert!(matches!(
        err,
        Error::Trust(TrustError::UnknownRevocationStatus)
    ));
    // A CRL from another CA does not cover our certificates.
    let foreign = Net::new("Foreign CA");
    let foreign_crl = foreign.crl(&[], now() + 30 * DAY);
    let mixed = TrustStore::builder()
        .anchors_pem(f.net.ca_pem.as_bytes())
        .unwrap()
        .crls_pem(foreign_crl.as_bytes())
        .unwrap()
        .build()
        .unwrap();
    let err = mixed
        .verify_identity(f.clinic.identity.chain(), now())
        .unwrap_err();
    assert!(
        matches!(err, Error::Trust(TrustError::UnknownRevocationStatus)),
        "{err:?}"
    );
}

#[test]
fn wrong_key_usage_is_rejected() {
    let net = Net::new("Test CA");
    let hospital = net.party("urn:h");
    // An encryption (keyAgreement) certificate used to sign an envelope.
    let (cert, key) = net.leaf("urn:s", KeyRole::Encryption);
    let signer = Identity::from_pem(cert.as_bytes(), key.as_bytes()).unwrap();
    let env = SealerBuilder::new(&signer, "text/plain")
        .recipient(net.recipient_key(&hospital), HopRole::ThirdParty)
        .start(now(), &mut rng(1))
        .unwrap()
        .seal_to_vec(b"x");
    let err = open_slice(
        &env,
        &net.trust(),
        std::slice::from_ref(&hospital.key),
        now(),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::Trust(TrustError::WrongKeyUsage("identity"))),
        "{err:?}"
    );
    // An identity certificate offered as a recipient encryption key.
    let id_cert = hospital.identity.certificate().clone();
    let err = net.trust().verify_encryption(&id_cert, now()).unwrap_err();
    assert!(
        matches!(err, Error::Trust(TrustError::WrongKeyUsage("encryption"))),
        "{err:?}"
    );
    assert_eq!(id_cert.key_role(), Some(KeyRole::Identity));
    assert_eq!(
        hospital.encryption_cert().key_role(),
        Some(KeyRole::Encryption)
    );
}

#[test]
fn bad_file_prefixes_are_rejected() {
    let f = fixture();
    let mut e = f.env.clone();
    e[0] = b'X';
    assert!(matches!(
        f.open(&e),
        Error::Format(FormatError::BadMagic(_))
    ));
    let mut e = f.env.clone();
    e[7] = 2;
    assert!(matches!(
        f.open(&e),
        Error::Format(FormatError::UnsupportedVersion(2))
    ));
    let mut e = f.env.clone();
    e[8] = 0x7f;
    assert!(matches!(
        f.open(&e),
        Error::Format(FormatError::TooLarge { what: "head", .. })
    ));
    assert!(matches!(
        Certificate::from_pem(b"nothing"),
        Err(Error::Format(FormatError::Pem(_)))
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any single flipped bit anywhere in the file is rejected.
    #[test]
    fn any_flipped_bit_is_rejected(pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        thread_local!(static F: Fixture = fixture());
        F.with(|f| {
            let at = pos.index(f.env.len());
            let mut e = f.env.clone();
            e[at] ^= 1 << bit;
            let res = open_slice(&e, &f.net.trust(), std::slice::from_ref(&f.hospital.key), now());
            prop_assert!(res.is_err(), "flip at {} accepted", at);
            Ok(())
        })?;
    }
}

#[test]
fn relay_stream_check_rejects_truncated_and_extended_streams() {
    let f = fixture();
    let head = f.head.verify(&f.net.trust(), now()).unwrap();
    let ct = &f.env[f.ct..];
    head.ciphertext_verifier()
        .verify_stream(&mut &ct[..])
        .unwrap();
    let err = head
        .ciphertext_verifier()
        .verify_stream(&mut &ct[..ct.len() - 1])
        .unwrap_err();
    assert!(matches!(err, Error::Truncated { .. }), "{err:?}");
    let mut longer = ct.to_vec();
    longer.push(0);
    let err = head
        .ciphertext_verifier()
        .verify_stream(&mut longer.as_slice())
        .unwrap_err();
    assert!(matches!(err, Error::TrailingData), "{err:?}");
}
