//! Daemons on a network whose PKI was made by the openssl command line: a
//! root, an intermediate with pathlen 0, party certificates issued by
//! `openssl ca` whose PEM files hold the leaf then the intermediate, and CRLs
//! from `openssl ca -gencrl`. Two daemons deliver to each other; a revoked
//! party is refused.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::openssl_pki::{OpensslPki, daemon_config, openssl_available};
use common::*;
use exchange_core::trust::TrustStore;
use exchange_daemon::client::{ClientSettings, connect};
use exchange_daemon::proto::client_client::ClientClient;
use exchange_daemon::proto::peer_client::PeerClient;
use exchange_daemon::proto::{FetchRequest, ListInboxRequest, fetch_response};
use exchange_daemon::tls::{self, TlsIdentity};
use exchange_daemon::{Config, Daemon};
use tonic::transport::Channel;

struct Site {
    party: Party,
    client_uri: String,
    client_dir: std::path::PathBuf,
}

fn site(pki: &OpensslPki, name: &str, uri: &str, display: &str) -> Site {
    let dir = pki.party(name, uri, display);
    let client_uri = format!("urn:local:{name}:app");
    let client_dir = pki.client(&format!("{name}-app"), &client_uri);
    Site {
        party: Party {
            name: name.into(),
            uri: uri.into(),
            dir,
            peer_port: free_port(),
            client_port: free_port(),
        },
        client_uri,
        client_dir,
    }
}

/// `site`'s configuration: the openssl root as anchor, both CRLs, each
/// peer's encryption certificate file (leaf then intermediate) as given.
fn configure(pki: &OpensslPki, site: &Site, peers: &[&Site]) {
    let peers: Vec<_> = peers
        .iter()
        .map(|p| {
            (
                p.party.uri.clone(),
                p.party.peer_addr(),
                p.party.file("encryption.pem"),
            )
        })
        .collect();
    let text = daemon_config(
        pki,
        &site.party.peer_addr(),
        &site.party.client_addr(),
        &peers,
        &site.client_uri,
    );
    std::fs::write(site.party.config_path(), text).unwrap();
}

fn client(pki: &OpensslPki, site: &Site) -> ClientClient<Channel> {
    connect(&ClientSettings {
        address: site.party.client_addr(),
        server_party: site.party.party(),
        anchors_pem: std::fs::read(pki.anchor()).unwrap(),
        crls_pem: Some(std::fs::read(pki.crls()).unwrap()),
        identity: TlsIdentity::from_pem(
            &std::fs::read(site.client_dir.join("client.pem")).unwrap(),
            &std::fs::read(site.client_dir.join("client.key.pem")).unwrap(),
        )
        .unwrap(),
        allow_tls12: false,
    })
    .unwrap()
}

fn peer_client(pki: &OpensslPki, to: &Site, identity: &TlsIdentity) -> PeerClient<Channel> {
    tls::install_provider();
    let trust = TrustStore::builder()
        .anchors_pem(&std::fs::read(pki.anchor()).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let config = tls::client_config(
        Arc::new(trust),
        to.party.party(),
        Some(identity),
        tls::versions(false),
    )
    .unwrap();
    PeerClient::new(tls::channel(&to.party.peer_addr(), config, Duration::from_secs(5)).unwrap())
}

// The struct update keeps this test compiling when FetchRequest gains fields.
#[allow(clippy::needless_update)]
async fn fetch_all(c: &mut ClientClient<Channel>, id: &[u8]) -> (String, Vec<u8>) {
    let mut stream = c
        .fetch(FetchRequest {
            message_id: id.to_vec(),
            ..FetchRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut sender = String::new();
    let mut data = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        match m.part {
            Some(fetch_response::Part::Header(h)) => sender = h.sender,
            Some(fetch_response::Part::Chunk(c)) => data.extend(c),
            None => {}
        }
    }
    (sender, data)
}

fn skip_without_openssl() -> bool {
    if openssl_available() {
        return false;
    }
    eprintln!("SKIPPED: the openssl command line is not installed");
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_deliver_both_ways_over_an_openssl_pki_with_an_intermediate() {
    if skip_without_openssl() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pki = OpensslPki::new(tmp.path());
    let clinic = site(&pki, "clinic", CLINIC, "Sakura Clinic");
    let hospital = site(&pki, "hospital", HOSPITAL, "Minato General Hospital");
    let revoked = site(&pki, "revoked", OTHER, "Revoked Clinic");
    // The revoked party loses both certificates.
    pki.revoke(&revoked.party.file("identity.leaf.crt"));
    pki.revoke(&revoked.party.file("encryption.leaf.crt"));
    // Each certificate file holds two certificates: the leaf, then the intermediate.
    for f in ["identity.pem", "encryption.pem"] {
        let text = std::fs::read_to_string(clinic.party.file(f)).unwrap();
        assert_eq!(text.matches("BEGIN CERTIFICATE").count(), 2, "{f}");
    }
    configure(&pki, &clinic, &[&hospital, &revoked]);
    configure(&pki, &hospital, &[&clinic]);
    configure(&pki, &revoked, &[&hospital]);
    let c = start(&clinic.party).await;
    let h = start(&hospital.party).await;
    let mut clinic_app = client(&pki, &clinic);
    let mut hospital_app = client(&pki, &hospital);

    // Clinic to hospital and back: each seals to the other's encryption
    // certificate, whose chain is the rest of its file.
    let there = send(
        &mut clinic_app,
        referral_start(&[&hospital.party], &[], "treatment"),
        b"referral over an openssl PKI",
    )
    .await
    .expect("send to the hospital");
    let back = send(
        &mut hospital_app,
        referral_start(&[&clinic.party], &[], "treatment"),
        b"reply over an openssl PKI",
    )
    .await
    .expect("send to the clinic");
    wait_status(&mut clinic_app, &there, |s| {
        s.state() == exchange_daemon::proto::MessageState::Delivered
    })
    .await;
    wait_status(&mut hospital_app, &back, |s| {
        s.state() == exchange_daemon::proto::MessageState::Delivered
    })
    .await;
    let (sender, data) = fetch_all(&mut hospital_app, &there).await;
    assert_eq!(
        (sender.as_str(), data.as_slice()),
        (CLINIC, &b"referral over an openssl PKI"[..])
    );
    let (sender, data) = fetch_all(&mut clinic_app, &back).await;
    assert_eq!(
        (sender.as_str(), data.as_slice()),
        (HOSPITAL, &b"reply over an openssl PKI"[..])
    );

    // Sending to the revoked party: its encryption certificate is refused.
    let err = send(
        &mut clinic_app,
        referral_start(&[&revoked.party], &[], "treatment"),
        b"never sealed",
    )
    .await
    .unwrap_err();
    assert!(err.message().contains("revoked"), "{err:?}");
    let inbox = hospital_app
        .list_inbox(ListInboxRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(inbox.items.len(), 1, "only the clinic's message arrived");

    // The revoked party's daemon refuses to start on its own credentials...
    let Err(e) = Daemon::start(Config::load(&revoked.party.config_path()).unwrap()).await else {
        panic!("a revoked party's daemon must not start");
    };
    assert!(e.to_string().contains("revoked"), "{e}");
    // ...and its TLS identity is refused by the hospital's peer listener in
    // the handshake (the connection is closed; no gRPC answer), while the
    // clinic's, from the same intermediate, gets an answer from the service.
    let ask = |identity: TlsIdentity| {
        let mut peer = peer_client(&pki, &hospital, &identity);
        async move {
            peer.return_receipts(exchange_daemon::proto::ReturnReceiptsRequest {
                message_id: vec![0; 16],
                receipts: Vec::new(),
            })
            .await
        }
    };
    let refused = ask(revoked.party.tls_identity()).await.unwrap_err();
    // The alert may arrive, or be lost to the connection's reset.
    let chain = error_chain(&refused);
    assert!(
        matches!(
            refused.code(),
            tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
        ) && (!chain.contains("alert") || chain.contains("CertificateRevoked")),
        "{chain}"
    );
    assert!(
        exchange_daemon::error::status_reason(&refused).is_none(),
        "answered by the service: {refused:?}"
    );
    match ask(clinic.party.tls_identity()).await {
        Ok(_) => {}
        Err(e) => assert!(
            exchange_daemon::error::status_reason(&e).is_some(),
            "the clinic was not answered by the service: {e:?}"
        ),
    }
    assert!(h.node().store().inbox(true).await.unwrap().len() == 1);

    c.shutdown().await;
    h.shutdown().await;
}

/// What `exchange ca` would not do: the same files, checked by the trust
/// store directly, fail without the intermediate (the leaf alone).
#[test]
fn an_openssl_encryption_certificate_needs_its_chain() {
    if skip_without_openssl() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pki = OpensslPki::new(tmp.path());
    let dir = pki.party("hospital", HOSPITAL, "Minato General Hospital");
    let trust = TrustStore::builder()
        .anchors_pem(&std::fs::read(pki.anchor()).unwrap())
        .unwrap()
        .crls_pem(&std::fs::read(pki.crls()).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let chain = exchange_core::identity::Certificate::from_pem(
        &std::fs::read(dir.join("encryption.pem")).unwrap(),
    )
    .unwrap();
    let now = std::time::SystemTime::now();
    let key = trust.verify_encryption_chain(&chain, now).unwrap();
    assert_eq!(key.party().as_str(), HOSPITAL);
    let err = trust.verify_encryption(&chain[0], now).unwrap_err();
    assert!(err.to_string().contains("issuer"), "{err}");
}
