//! Receipts: issue, verify offline, bind to one envelope, and locate the
//! provision boundary (責任分界点) on a route.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use exchange_core::envelope::{EnvelopeHead, SealerBuilder, VerifiedHead};
use exchange_core::receipt::{Disposition, ReceiptContent, SignedReceipt, VerifiedReceipt};
use exchange_core::route::{Hop, HopRole, Provision};
use exchange_core::{Error, FormatError, ReceiptError, TrustError};

struct Claim {
    net: Net,
    clinic: Party,
    agent: Party,
    payer: Party,
    head: VerifiedHead,
}

/// A claim from a clinic to a payer through an entrusted agent (代行請求).
fn claim(seed: u64, body: &[u8]) -> Claim {
    let net = Net::new("Test CA");
    let clinic = net.party("urn:jp:mhlw:facility:1310000013");
    let agent = net.party("urn:jp:agent:claims-1");
    let payer = net.party("urn:jp:payer:ssk-tokyo");
    let head = claim_head(&net, &clinic, &agent, &payer, seed, body);
    Claim {
        net,
        clinic,
        agent,
        payer,
        head,
    }
}

fn claim_head(
    net: &Net,
    clinic: &Party,
    agent: &Party,
    payer: &Party,
    seed: u64,
    body: &[u8],
) -> VerifiedHead {
    let env = SealerBuilder::new(&clinic.identity, "text/x-uke")
        .recipient(net.recipient_key(payer), HopRole::ThirdParty)
        .relay(Hop {
            party: agent.uri.clone(),
            role: HopRole::Entrusted,
        })
        .purpose("claims (療養の給付費請求)")
        .start(now(), &mut rng(seed))
        .unwrap()
        .seal_to_vec(body);
    EnvelopeHead::read_from(&mut env.as_slice())
        .unwrap()
        .verify(&net.trust(), now())
        .unwrap()
}

fn receipt(c: &Claim, by: &Party, role: HopRole, d: Disposition, after: u64) -> VerifiedReceipt {
    let content = ReceiptContent::for_head(&c.head, role, d, now() + Duration::from_secs(after));
    let signed = SignedReceipt::issue(&by.identity, &content);
    // Through the file form, as an auditor would receive it.
    SignedReceipt::from_file(&signed.to_file())
        .unwrap()
        .verify(&c.net.trust())
        .unwrap()
}

#[test]
fn receipt_verifies_offline_and_binds_to_its_envelope() {
    let c = claim(1, b"UKE claim file");
    let r = receipt(
        &c,
        &c.payer,
        HopRole::ThirdParty,
        Disposition::Delivered,
        60,
    );
    assert_eq!(r.issuer(), &c.payer.uri);
    assert_eq!(r.message_id(), c.head.header().message_id);
    assert_eq!(r.header_sha256(), &c.head.head().header_sha256());
    assert_eq!(r.disposition(), &Disposition::Delivered);
    assert_eq!(r.issued(), now() + Duration::from_secs(60));
    assert!(r.is_third_party_custody());
    r.check_for(&c.head).unwrap();
    // Deterministic (RFC 6979): the same content signs to the same bytes.
    let content = ReceiptContent::for_head(
        &c.head,
        HopRole::ThirdParty,
        Disposition::Delivered,
        now() + Duration::from_secs(60),
    );
    assert_eq!(
        SignedReceipt::issue(&c.payer.identity, &content),
        *r.signed()
    );
}

#[test]
fn receipt_for_another_envelope_is_rejected() {
    let c = claim(1, b"claim A");
    let other = claim_head(&c.net, &c.clinic, &c.agent, &c.payer, 2, b"claim B");
    let r = receipt(&c, &c.payer, HopRole::ThirdParty, Disposition::Delivered, 1);
    assert!(matches!(
        r.check_for(&other),
        Err(Error::Receipt(ReceiptError::WrongMessage))
    ));
    // Same message id (same seed), different content: a different header.
    let twin = claim_head(
        &c.net,
        &c.clinic,
        &c.agent,
        &c.payer,
        1,
        b"claim A, altered",
    );
    assert_eq!(twin.header().message_id, c.head.header().message_id);
    assert!(matches!(
        r.check_for(&twin),
        Err(Error::Receipt(ReceiptError::WrongHeader))
    ));
}

#[test]
fn receipt_from_off_route_party_or_wrong_role_is_rejected() {
    let c = claim(1, b"claim");
    let stranger = c.net.party("urn:jp:other");
    let r = receipt(
        &c,
        &stranger,
        HopRole::ThirdParty,
        Disposition::Delivered,
        1,
    );
    assert!(
        matches!(r.check_for(&c.head), Err(Error::Receipt(ReceiptError::IssuerNotOnRoute(p))) if p == "urn:jp:other")
    );
    // The entrusted agent claiming to be a third party (to fake the boundary).
    let r = receipt(
        &c,
        &c.agent,
        HopRole::ThirdParty,
        Disposition::AcceptedForRelay,
        1,
    );
    assert!(matches!(
        r.check_for(&c.head),
        Err(Error::Receipt(ReceiptError::RoleMismatch))
    ));
}

#[test]
fn forged_receipts_are_rejected() {
    let c = claim(1, b"claim");
    let content =
        ReceiptContent::for_head(&c.head, HopRole::ThirdParty, Disposition::Delivered, now());
    let file = SignedReceipt::issue(&c.payer.identity, &content).to_file();
    // Any flipped byte in the signed body or signature.
    let body_at = 8 + 3; // magic + version, then the protobuf tag and length of `body`
    for at in [body_at, body_at + 20, body_at + 60] {
        let mut f = file.clone();
        f[at] ^= 1;
        let res = SignedReceipt::from_file(&f).and_then(|r| r.verify(&c.net.trust()));
        assert!(
            matches!(res, Err(Error::BadSignature | Error::Format(_))),
            "byte {at}: {res:?}"
        );
    }
    let sig_at = file.len() - c.payer.identity.certificate().der().len() - 3 - 64;
    let mut f = file.clone();
    f[sig_at + 10] ^= 1;
    assert!(matches!(
        SignedReceipt::from_file(&f).unwrap().verify(&c.net.trust()),
        Err(Error::BadSignature)
    ));
    // A look-alike payer from another CA.
    let foreign = Net::new("Foreign CA");
    let fake_payer = foreign.party(c.payer.uri.as_str());
    let forged = SignedReceipt::issue(&fake_payer.identity, &content);
    assert!(matches!(
        forged.verify(&c.net.trust()),
        Err(Error::Trust(TrustError::UnknownIssuer))
    ));
    // Not a receipt file at all.
    assert!(matches!(
        SignedReceipt::from_file(b"EXENV\0..."),
        Err(Error::Format(FormatError::BadMagic(_)))
    ));
}

#[test]
fn revoked_issuer_receipt_is_rejected() {
    let c = claim(1, b"claim");
    let r = SignedReceipt::issue(
        &c.payer.identity,
        &ReceiptContent::for_head(&c.head, HopRole::ThirdParty, Disposition::Delivered, now()),
    );
    let crl = c.net.crl(&[&c.payer], now() + 30 * DAY);
    assert!(matches!(
        r.verify(&c.net.trust_with_crl(&crl)),
        Err(Error::Trust(TrustError::Revoked))
    ));
}

#[test]
fn boundary_is_the_payers_delivery_not_the_agents_custody() {
    let c = claim(1, b"claim");
    let route = c.head.route();
    let agent_rx = receipt(
        &c,
        &c.agent,
        HopRole::Entrusted,
        Disposition::AcceptedForRelay,
        10,
    );
    assert!(!agent_rx.is_third_party_custody());
    let b = route.provision_boundaries(std::slice::from_ref(&agent_rx));
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].recipient, c.payer.uri);
    assert_eq!(
        b[0].provision,
        Provision::Pending {
            boundary: Hop {
                party: c.payer.uri.clone(),
                role: HopRole::ThirdParty
            }
        }
    );

    let payer_rx = receipt(
        &c,
        &c.payer,
        HopRole::ThirdParty,
        Disposition::Delivered,
        20,
    );
    let processed = receipt(
        &c,
        &c.payer,
        HopRole::ThirdParty,
        Disposition::Processed,
        30,
    );
    let all = [agent_rx, processed, payer_rx];
    for r in &all {
        r.check_for(&c.head).unwrap();
    }
    let b = route.provision_boundaries(&all);
    // The earliest custody receipt of the payer (DELIVERED at +20 s), not PROCESSED.
    assert!(
        matches!(&b[0].provision, Provision::Passed { receipt: 2, boundary } if boundary.party == c.payer.uri)
    );
}

#[test]
fn boundary_outcomes_for_other_routes() {
    let net = Net::new("Test CA");
    let clinic = net.party("urn:c");
    let lab = net.party("urn:lab");
    let hospital = net.party("urn:h");
    let gateway = net.party("urn:gw");
    let sealed = |b: SealerBuilder<'_>| {
        let env = b.start(now(), &mut rng(3)).unwrap().seal_to_vec(b"x");
        EnvelopeHead::read_from(&mut env.as_slice())
            .unwrap()
            .verify(&net.trust(), now())
            .unwrap()
    };
    let issue = |head: &VerifiedHead, by: &Party, role, d| {
        SignedReceipt::issue(
            &by.identity,
            &ReceiptContent::for_head(head, role, d, now()),
        )
        .verify(&net.trust())
        .unwrap()
    };

    // Entrusted only (委託: an outsourced lab): never a provision.
    let head = sealed(
        SealerBuilder::new(&clinic.identity, "text/plain")
            .recipient(net.recipient_key(&lab), HopRole::Entrusted),
    );
    let r = issue(&head, &lab, HopRole::Entrusted, Disposition::Delivered);
    assert_eq!(
        head.route().provision_boundaries(&[r])[0].provision,
        Provision::NotAProvision
    );

    // Refused by the third party.
    let head = sealed(
        SealerBuilder::new(&clinic.identity, "text/plain")
            .recipient(net.recipient_key(&hospital), HopRole::ThirdParty),
    );
    let r = issue(
        &head,
        &hospital,
        HopRole::ThirdParty,
        Disposition::Rejected("expired".into()),
    );
    assert!(matches!(
        head.route().provision_boundaries(&[r])[0].provision,
        Provision::Rejected { receipt: 0, .. }
    ));

    // A third-party gateway relay: responsibility passes when it takes custody.
    let head = sealed(
        SealerBuilder::new(&clinic.identity, "text/plain")
            .relay(Hop {
                party: gateway.uri.clone(),
                role: HopRole::ThirdParty,
            })
            .recipient(net.recipient_key(&hospital), HopRole::ThirdParty),
    );
    let r = issue(
        &head,
        &gateway,
        HopRole::ThirdParty,
        Disposition::AcceptedForRelay,
    );
    let b = head.route().provision_boundaries(&[r]);
    assert!(
        matches!(&b[0].provision, Provision::Passed { boundary, receipt: 0 } if boundary.party == gateway.uri)
    );
}

#[test]
fn receipt_dated_before_its_envelope_is_rejected() {
    let c = claim(1, b"claim");
    let content = ReceiptContent::for_head(
        &c.head,
        HopRole::ThirdParty,
        Disposition::Delivered,
        now() - Duration::from_secs(3600),
    );
    let r = SignedReceipt::issue(&c.payer.identity, &content)
        .verify(&c.net.trust())
        .unwrap();
    assert!(matches!(
        r.check_for(&c.head),
        Err(Error::Receipt(ReceiptError::IssuedBeforeEnvelope))
    ));
}

#[test]
fn a_party_cannot_appear_twice_on_a_route() {
    let c = claim(1, b"claim");
    let err = SealerBuilder::new(&c.clinic.identity, "text/x-uke")
        .recipient(c.net.recipient_key(&c.payer), HopRole::ThirdParty)
        .relay(Hop {
            party: c.payer.uri.clone(),
            role: HopRole::Entrusted,
        })
        .start(now(), &mut rng(1))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(m) if m.contains("twice")));
}
