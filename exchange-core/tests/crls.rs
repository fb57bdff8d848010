//! Several CRLs from one issuer: the newest (highest crlNumber) is the one
//! in force, whatever order the files are listed in.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use exchange_core::ca::{CrlState, RevokedSerial};
use exchange_core::trust::TrustStore;
use exchange_core::{Error, TrustError};

/// A CRL numbered `number` revoking `revoked`, issued a day ago, valid 30 days.
fn crl(net: &Net, number: u64, revoked: &[&Party]) -> String {
    let state = CrlState {
        number,
        revoked: revoked
            .iter()
            .map(|p| RevokedSerial {
                serial: hex::decode(p.identity.certificate().serial_hex()).unwrap(),
                revoked_at: now() - DAY,
            })
            .collect(),
    };
    net.ca.crl(&state, now() - DAY, now() + 30 * DAY).unwrap()
}

fn trust(net: &Net, crls: &[&str]) -> Result<TrustStore, Error> {
    let mut b = TrustStore::builder().anchors_pem(net.ca_pem.as_bytes())?;
    for c in crls {
        b = b.crls_pem(c.as_bytes())?;
    }
    b.require_crls().build()
}

#[test]
fn newest_crl_of_an_issuer_wins_in_either_order() {
    let net = Net::new("Test CA");
    let clinic = net.party("urn:jp:mhlw:facility:1310000013");
    let hospital = net.party("urn:jp:mhlw:facility:1310000021");
    // CRL 1 revokes nobody; CRL 2 revokes the clinic.
    let old = crl(&net, 1, &[]);
    let new = crl(&net, 2, &[&clinic]);
    for order in [[&old, &new], [&new, &old]] {
        let t = trust(&net, &[order[0], order[1]]).unwrap();
        let err = t
            .verify_identity(clinic.identity.chain(), now())
            .unwrap_err();
        assert!(matches!(err, Error::Trust(TrustError::Revoked)), "{err:?}");
        t.verify_identity(hospital.identity.chain(), now()).unwrap();
    }
    // Both in one PEM document, old first.
    let both = format!("{old}{new}");
    let t = trust(&net, &[&both]).unwrap();
    let err = t
        .verify_identity(clinic.identity.chain(), now())
        .unwrap_err();
    assert!(matches!(err, Error::Trust(TrustError::Revoked)), "{err:?}");
}

#[test]
fn a_lower_numbered_crl_cannot_unrevoke() {
    let net = Net::new("Test CA");
    let clinic = net.party("urn:jp:mhlw:facility:1310000013");
    // An older CRL that revoked the clinic, and a newer one that does not
    // (a revocation lifted, e.g. certificateHold removed): the newer wins.
    let old = crl(&net, 5, &[&clinic]);
    let new = crl(&net, 6, &[]);
    for order in [[&old, &new], [&new, &old]] {
        trust(&net, &[order[0], order[1]])
            .unwrap()
            .verify_identity(clinic.identity.chain(), now())
            .unwrap();
    }
}

#[test]
fn two_different_crls_with_the_same_number_are_refused() {
    let net = Net::new("Test CA");
    let clinic = net.party("urn:jp:mhlw:facility:1310000013");
    let a = crl(&net, 3, &[]);
    let b = crl(&net, 3, &[&clinic]);
    for order in [[&a, &b], [&b, &a]] {
        let err = trust(&net, &[order[0], order[1]]).unwrap_err();
        assert!(
            matches!(err, Error::Trust(TrustError::ConflictingCrls)),
            "{err:?}"
        );
    }
    // The same CRL listed twice is not a conflict.
    trust(&net, &[&b, &b])
        .unwrap()
        .verify_identity(clinic.identity.chain(), now())
        .unwrap_err();
}

#[test]
fn crls_of_different_issuers_are_all_kept() {
    let net = Net::new("Test CA");
    let foreign = Net::new("Foreign CA");
    let clinic = net.party("urn:jp:mhlw:facility:1310000013");
    let stranger = foreign.party("urn:jp:example:stranger");
    let ours = crl(&net, 1, &[&clinic]);
    let theirs = crl(&foreign, 9, &[]);
    let t = TrustStore::builder()
        .anchors_pem(net.ca_pem.as_bytes())
        .unwrap()
        .anchors_pem(foreign.ca_pem.as_bytes())
        .unwrap()
        .crls_pem(theirs.as_bytes())
        .unwrap()
        .crls_pem(ours.as_bytes())
        .unwrap()
        .require_crls()
        .build()
        .unwrap();
    let err = t
        .verify_identity(clinic.identity.chain(), now())
        .unwrap_err();
    assert!(matches!(err, Error::Trust(TrustError::Revoked)), "{err:?}");
    t.verify_identity(stranger.identity.chain(), now()).unwrap();
}
