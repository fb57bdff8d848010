//! Attacks that need a malicious *sender* (one who signs what it likes):
//! these build headers by hand, so they live inside the crate.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use super::*;
use crate::ca::{CertificateAuthority, Validity};
use crate::identity::{DecryptionKey, Identity};
use crate::trust::TrustStore;

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_780_272_000)
}

struct Net {
    trust: TrustStore,
    sender: Identity,
    a: DecryptionKey,
    b: DecryptionKey,
}

fn net() -> Net {
    let validity = Validity::days_from(now(), 30);
    let ca = CertificateAuthority::generate("CA", validity).unwrap();
    let trust = TrustStore::builder()
        .anchors_pem(ca.certificate_pem().as_bytes())
        .unwrap()
        .build()
        .unwrap();
    let issue = |uri: &str| {
        ca.issue_party(&PartyUri::new(uri).unwrap(), uri, validity)
            .unwrap()
    };
    let s = issue("urn:t:sender");
    let a = issue("urn:t:a");
    let b = issue("urn:t:b");
    let dk = |c: &crate::ca::PartyCredentials| {
        DecryptionKey::from_pem(
            c.encryption.cert_pem.as_bytes(),
            c.encryption.key_pem.as_bytes(),
        )
        .unwrap()
    };
    Net {
        sender: Identity::from_pem(
            s.identity.cert_pem.as_bytes(),
            s.identity.key_pem.as_bytes(),
        )
        .unwrap(),
        a: dk(&a),
        b: dk(&b),
        trust,
    }
}

/// Seals to A and B, then lets `tamper` rewrite the header; re-signs as the sender.
fn malicious(net: &Net, tamper: impl FnOnce(&mut Header, &Net)) -> Vec<u8> {
    let key = |k: &DecryptionKey| net.trust.verify_encryption(k.certificate(), now()).unwrap();
    let env = SealerBuilder::new(&net.sender, "text/plain")
        .recipient(key(&net.a), HopRole::ThirdParty)
        .recipient(key(&net.b), HopRole::ThirdParty)
        .start(now(), &mut ChaCha20Rng::seed_from_u64(5))
        .unwrap()
        .seal_to_vec(b"the same plaintext for everyone");
    let mut r = env.as_slice();
    let head = EnvelopeHead::read_from(&mut r).unwrap();
    let mut header = head.header_unverified().unwrap();
    tamper(&mut header, net);
    let header_bytes = header.to_proto().encode_to_vec();
    let signature = suite::sign(
        net.sender.key().signing_key(),
        suite::HEADER_CONTEXT,
        &header_bytes,
    );
    let bytes = proto::Head {
        header: header_bytes,
        signature: signature.to_vec(),
        sender_chain: head.chain.clone(),
    }
    .encode_to_vec();
    let mut out = EnvelopeHead::decode(&bytes).unwrap().file_prefix();
    out.extend_from_slice(r);
    out
}

#[test]
fn different_content_key_for_one_recipient_is_commitment_mismatch() {
    let net = net();
    let env = malicious(&net, |h, net| {
        // B gets a different content key; the header still commits to A's.
        let other = SecretKey32::from_bytes([9; 32]);
        let b_pub = net.b.certificate().public_key().unwrap();
        let fp = h.recipients[1].key_fingerprint;
        let (enc, wrapped) = suite::wrap_key(
            &other,
            b_pub,
            &h.message_id,
            fp.as_bytes(),
            &mut ChaCha20Rng::seed_from_u64(6),
        )
        .unwrap();
        h.recipients[1].enc = enc.to_vec();
        h.recipients[1].wrapped = wrapped;
    });
    let (_, _, plain) = open_slice(&env, &net.trust, std::slice::from_ref(&net.a), now()).unwrap();
    assert_eq!(plain, b"the same plaintext for everyone");
    let err = open_slice(&env, &net.trust, std::slice::from_ref(&net.b), now()).unwrap_err();
    assert!(matches!(err, Error::CommitmentMismatch), "{err:?}");
}

#[test]
fn entry_wrapped_to_another_key_is_key_unwrap_failure() {
    let net = net();
    let env = malicious(&net, |h, _| {
        // B's entry carries A's wrap: B's key cannot open it.
        h.recipients[1].enc = h.recipients[0].enc.clone();
        h.recipients[1].wrapped = h.recipients[0].wrapped.clone();
    });
    let err = open_slice(&env, &net.trust, std::slice::from_ref(&net.b), now()).unwrap_err();
    assert!(matches!(err, Error::KeyUnwrap), "{err:?}");
}

#[test]
fn sealed_metadata_swapped_in_is_rejected() {
    let net = net();
    let env = malicious(&net, |h, _| {
        let last = h.sealed_metadata.len() - 1;
        h.sealed_metadata[last] ^= 1;
    });
    let err = open_slice(&env, &net.trust, std::slice::from_ref(&net.a), now()).unwrap_err();
    assert!(matches!(err, Error::MetadataDecryption), "{err:?}");
}

#[test]
fn header_decode_rejects_inconsistent_fields() {
    let net = net();
    let env = malicious(&net, |_, _| {});
    let head = EnvelopeHead::read_from(&mut env.as_slice()).unwrap();
    let good = head.header_unverified().unwrap().to_proto();
    type Mutation = fn(&mut proto::Header);
    let cases: Vec<(Mutation, &str)> = vec![
        (|h| h.version = 2, "unsupported format version 2"),
        (|h| h.recipients.clear(), "missing field recipients"),
        (
            |h| h.message_id.pop().map(drop).unwrap_or(()),
            "invalid field message_id",
        ),
        (|h| h.expires_ms = h.created_ms, "invalid field expires"),
        (|h| h.chunk_size = 16, "invalid field chunk_size"),
        (|h| h.content_type.clear(), "invalid field content_type"),
        (
            |h| {
                let r = h.recipients[0].clone();
                h.recipients.push(r);
            },
            "invalid field recipients (duplicate key)",
        ),
        (
            |h| h.recipients[0].enc.truncate(64),
            "invalid field recipient entry",
        ),
        (|h| h.recipients[0].role = 0, "invalid field recipient role"),
        (|h| h.sender = "not a uri".into(), "invalid party URI"),
        (
            |h| {
                h.route.push(proto::Hop {
                    party: h.recipients[0].party.clone(),
                    role: 1,
                })
            },
            "party named twice",
        ),
        (
            |h| {
                h.route = vec![
                    proto::Hop {
                        party: "urn:x:y".into(),
                        role: 1
                    };
                    MAX_RELAYS + 1
                ]
            },
            "invalid field route",
        ),
    ];
    for (mutate, want) in cases {
        let mut p = good.clone();
        mutate(&mut p);
        let err = Header::decode(&p.encode_to_vec()).unwrap_err();
        assert!(err.to_string().contains(want), "{want}: got {err}");
    }
}
