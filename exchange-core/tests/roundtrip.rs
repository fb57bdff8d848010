//! Seal/open round trips at the sizes around chunk boundaries, several
//! recipients, the streaming and push APIs, and relay-side verification.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;

use common::*;
use exchange_core::PartyUri;
use exchange_core::envelope::{DEFAULT_CHUNK_SIZE, EnvelopeHead, SealerBuilder, open_slice};
use exchange_core::route::{Hop, HopRole};
use proptest::prelude::*;

/// A reader that returns at most `step` bytes per call.
struct Dribble<'a> {
    data: &'a [u8],
    step: usize,
}

impl Read for Dribble<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

#[test]
fn round_trip_at_chunk_boundaries() {
    let net = Net::new("Test CA");
    let clinic = net.party("urn:jp:mhlw:facility:1310000013");
    let hospital = net.party("urn:jp:mhlw:facility:1310000021");
    let cs = DEFAULT_CHUNK_SIZE as usize;
    for len in [0, 1, cs - 1, cs, cs + 1, 5 * 1024 * 1024 + 3] {
        let plain = payload(len);
        let env = seal(
            &net,
            &clinic,
            &[&hospital],
            &plain,
            DEFAULT_CHUNK_SIZE,
            len as u64,
        );
        let (head, meta, out) = open_slice(
            &env,
            &net.trust(),
            std::slice::from_ref(&hospital.key),
            now(),
        )
        .unwrap();
        assert_eq!(out, plain, "len {len}");
        assert_eq!(meta, metadata());
        let h = head.header();
        assert_eq!(h.payload_length, len as u64);
        assert_eq!(h.sender, clinic.uri);
        assert_eq!(head.sender().party(), &clinic.uri);
        assert_eq!(h.content_type, "application/fhir+json");
        assert_eq!(h.purpose, "treatment");
        let chunks = (len as u64).div_ceil(u64::from(DEFAULT_CHUNK_SIZE)).max(1);
        assert_eq!(
            env.len() as u64,
            12 + head.head().as_bytes().len() as u64 + len as u64 + 16 * chunks
        );
    }
}

#[test]
fn streaming_apis_agree_with_in_memory() {
    let net = Net::new("Test CA");
    let clinic = net.party("urn:jp:mhlw:facility:1310000013");
    let hospital = net.party("urn:jp:mhlw:facility:1310000021");
    let plain = payload(3 * 1024 * 1024 + 17);
    let sealer = SealerBuilder::new(&clinic.identity, "application/dicom")
        .recipient(net.recipient_key(&hospital), HopRole::ThirdParty)
        .metadata(metadata())
        .start(now(), &mut rng(9))
        .unwrap();
    let mut ct = Vec::new();
    let mut seen = 0;
    let head = sealer
        .seal_stream(
            &mut Dribble {
                data: &plain,
                step: 7777,
            },
            &mut ct,
            |n| seen = n,
        )
        .unwrap();
    assert_eq!(seen, plain.len() as u64);
    // Same seed, in-memory path: byte-identical envelope.
    let mut file = head.file_prefix();
    file.extend_from_slice(&ct);
    let again = SealerBuilder::new(&clinic.identity, "application/dicom")
        .recipient(net.recipient_key(&hospital), HopRole::ThirdParty)
        .metadata(metadata())
        .start(now(), &mut rng(9))
        .unwrap()
        .seal_to_vec(&plain);
    assert_eq!(file, again);

    let mut r = Dribble {
        data: &file,
        step: 5000,
    };
    let head = EnvelopeHead::read_from(&mut r)
        .unwrap()
        .verify(&net.trust(), now())
        .unwrap();
    let opener = head.open(std::slice::from_ref(&hospital.key)).unwrap();
    let mut out = Vec::new();
    let meta = opener.decrypt_stream(&mut r, &mut out, |_| {}).unwrap();
    assert_eq!(out, plain);
    assert_eq!(meta.title, "診療情報提供書");
}

#[test]
fn several_recipients_each_open_and_outsider_cannot() {
    let net = Net::new("Test CA");
    let clinic = net.party("urn:jp:mhlw:facility:1310000013");
    let a = net.party("urn:jp:mhlw:facility:1310000021");
    let b = net.party("urn:jp:mhlw:facility:1310000039");
    let c = net.party("urn:jp:mhlw:facility:1310000047");
    let outsider = net.party("urn:jp:mhlw:facility:1310000054");
    let plain = payload(200_000);
    let env = SealerBuilder::new(&clinic.identity, "application/pdf")
        .recipient(net.recipient_key(&a), HopRole::ThirdParty)
        .recipient(net.recipient_key(&b), HopRole::Entrusted)
        .recipient(net.recipient_key(&c), HopRole::ThirdParty)
        .metadata(metadata())
        .start(now(), &mut rng(1))
        .unwrap()
        .seal_to_vec(&plain);
    for (p, role) in [
        (&a, HopRole::ThirdParty),
        (&b, HopRole::Entrusted),
        (&c, HopRole::ThirdParty),
    ] {
        let mut r = env.as_slice();
        let head = EnvelopeHead::read_from(&mut r)
            .unwrap()
            .verify(&net.trust(), now())
            .unwrap();
        let mut opener = head.open(std::slice::from_ref(&p.key)).unwrap();
        assert_eq!(opener.recipient(), &p.uri);
        assert_eq!(opener.role(), role);
        let mut out = Vec::new();
        opener.update(r, &mut out).unwrap();
        opener.finish().unwrap();
        assert_eq!(out, plain);
    }
    let err = open_slice(
        &env,
        &net.trust(),
        std::slice::from_ref(&outsider.key),
        now(),
    )
    .unwrap_err();
    assert!(
        matches!(err, exchange_core::Error::NotARecipient),
        "{err:?}"
    );
}

#[test]
fn relay_verifies_without_decrypting() {
    let net = Net::new("Test CA");
    let clinic = net.party("urn:jp:mhlw:facility:1310000013");
    let payer = net.party("urn:jp:payer:ssk");
    let agent = net.party("urn:jp:agent:claims-1");
    let plain = payload(300_000);
    let env = SealerBuilder::new(&clinic.identity, "text/x-uke")
        .recipient(net.recipient_key(&payer), HopRole::ThirdParty)
        .relay(Hop {
            party: agent.uri.clone(),
            role: HopRole::Entrusted,
        })
        .purpose("claims")
        .start(now(), &mut rng(2))
        .unwrap()
        .seal_to_vec(&plain);
    let mut r = env.as_slice();
    let head = EnvelopeHead::read_from(&mut r)
        .unwrap()
        .verify(&net.trust(), now())
        .unwrap();
    let route = head.route();
    assert_eq!(
        route.relays,
        vec![Hop {
            party: agent.uri.clone(),
            role: HopRole::Entrusted
        }]
    );
    assert_eq!(route.role_of(&payer.uri), Some(HopRole::ThirdParty));
    assert_eq!(route.role_of(&PartyUri::new("urn:x:y").unwrap()), None);
    // The agent holds no recipient key: it cannot open.
    assert!(matches!(
        head.open(std::slice::from_ref(&agent.key)),
        Err(exchange_core::Error::NotARecipient)
    ));
    // But it can check the ciphertext against the signed digest, in pieces.
    let mut v = head.ciphertext_verifier();
    for piece in r.chunks(4096) {
        v.update(piece).unwrap();
    }
    v.finish().unwrap();
    // The relay's plaintext-free view never contains the payload.
    assert!(!env.windows(32).any(|w| w == &plain[1000..1032]));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn push_api_round_trip_any_split(len in 0usize..3000, splits in proptest::collection::vec(1usize..700, 1..12)) {
        let net = Net::new("Test CA");
        let s = net.party("urn:t:s");
        let r = net.party("urn:t:r");
        let plain = payload(len);
        let env = seal(&net, &s, &[&r], &plain, 256, len as u64);
        let mut rest = env.as_slice();
        let head = EnvelopeHead::read_from(&mut rest).unwrap().verify(&net.trust(), now()).unwrap();
        let mut opener = head.open(std::slice::from_ref(&r.key)).unwrap();
        let mut out = Vec::new();
        let mut i = 0;
        while !rest.is_empty() {
            let n = splits[i % splits.len()].min(rest.len());
            opener.update(&rest[..n], &mut out).unwrap();
            rest = &rest[n..];
            i += 1;
        }
        opener.finish().unwrap();
        prop_assert_eq!(out, plain);
    }
}

#[test]
fn sender_under_an_intermediate_ca() {
    use exchange_core::ca::Validity;
    use exchange_core::identity::{Certificate, Identity};
    use exchange_core::trust::TrustStore;
    use exchange_core::{Error, TrustError};

    let root = Net::new("Root CA");
    let validity = Validity {
        not_before: now() - 30 * DAY,
        not_after: now() + 365 * DAY,
    };
    let sub = root
        .ca
        .issue_subordinate("Prefecture Sub CA", validity)
        .unwrap();
    let sub_cert = Certificate::from_pem(sub.certificate_pem().as_bytes())
        .unwrap()
        .remove(0);
    let creds = sub
        .issue_party(
            &PartyUri::new("urn:jp:mhlw:facility:1310000013").unwrap(),
            "clinic",
            validity,
        )
        .unwrap();
    let leaf = Certificate::from_pem(creds.identity.cert_pem.as_bytes())
        .unwrap()
        .remove(0);
    let hospital = root.party("urn:jp:mhlw:facility:1310000021");

    let seal_with = |chain: Vec<Certificate>| {
        let id = Identity::new(
            chain,
            exchange_core::identity::IdentityKey::from_pkcs8_pem(creds.identity.key_pem.as_bytes())
                .unwrap(),
        )
        .unwrap();
        SealerBuilder::new(&id, "text/plain")
            .recipient(root.recipient_key(&hospital), HopRole::ThirdParty)
            .start(now(), &mut rng(4))
            .unwrap()
            .seal_to_vec(b"via the prefecture CA")
    };
    let keys = std::slice::from_ref(&hospital.key);
    // The head carries [leaf, intermediate]: the root alone is enough to verify.
    let (head, _, plain) = open_slice(
        &seal_with(vec![leaf.clone(), sub_cert.clone()]),
        &root.trust(),
        keys,
        now(),
    )
    .unwrap();
    assert_eq!(plain, b"via the prefecture CA");
    assert_eq!(
        head.sender().party().as_str(),
        "urn:jp:mhlw:facility:1310000013"
    );
    // Leaf only: the intermediate is missing...
    let bare = seal_with(vec![leaf]);
    let err = open_slice(&bare, &root.trust(), keys, now()).unwrap_err();
    assert!(
        matches!(err, Error::Trust(TrustError::UnknownIssuer)),
        "{err:?}"
    );
    // ...unless the verifier has it configured.
    let with_sub = TrustStore::builder()
        .anchors_pem(root.ca_pem.as_bytes())
        .unwrap()
        .intermediate_der(sub_cert.der().to_vec())
        .build()
        .unwrap();
    open_slice(&bare, &with_sub, keys, now()).unwrap();
}
