//! Revocation bites on connections that already exist: once a daemon has
//! reloaded a CRL that revokes a peer or a local client, that party can
//! neither resume an earlier TLS session (no handshake without a full
//! certificate check) nor make another call on a connection it opened
//! before (the daemon re-checks every open connection at each reload and
//! closes those whose certificate no longer validates). Real daemons, real
//! mutual TLS on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use exchange_daemon::error::status_reason;
use exchange_daemon::proto::client_client::ClientClient;
use exchange_daemon::proto::peer_client::PeerClient;
use exchange_daemon::proto::{ListInboxRequest, ReturnReceiptsRequest};
use exchange_daemon::tls::{self, TlsIdentity};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// The call failed before any service answered (no reason code): the
/// connection was refused or closed at the TLS layer.
fn assert_transport_failure(status: &Status) {
    let chain = error_chain(status);
    assert_eq!(
        status_reason(status),
        None,
        "a service answered, so the connection was still accepted: {chain}"
    );
    assert!(
        matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        ),
        "not a transport failure: {chain}"
    );
}

/// A rustls client configuration for `server` presenting `identity` that,
/// unlike the daemon's own, keeps TLS sessions and offers to resume them:
/// what a revoked party holding an earlier session would do.
fn resuming_config(net: &Net, server: &Party, identity: &TlsIdentity) -> Arc<rustls::ClientConfig> {
    tls::install_provider();
    let base = tls::client_config(
        Arc::new(net_trust(net)),
        server.party(),
        Some(identity),
        tls::versions(false),
    )
    .unwrap();
    let mut config = (*base).clone();
    config.resumption = rustls::client::Resumption::in_memory_sessions(64);
    Arc::new(config)
}

fn channel(addr: &str, config: &Arc<rustls::ClientConfig>) -> Channel {
    tls::channel(addr, config.clone(), Duration::from_secs(5)).unwrap()
}

/// A peer-service call every trusted peer may make: returning no receipt
/// for an unknown message is answered NotFound by the service.
async fn peer_probe(peer: &mut PeerClient<Channel>) -> Result<(), Status> {
    match peer
        .return_receipts(ReturnReceiptsRequest {
            message_id: vec![0; 16],
            receipts: vec![],
        })
        .await
    {
        Err(s) if s.code() == Code::NotFound && status_reason(&s).is_some() => Ok(()),
        Err(s) => Err(s),
        Ok(_) => panic!("an empty receipt return for an unknown message succeeded"),
    }
}

/// A client-service call the configured client may make.
async fn client_probe(app: &mut ClientClient<Channel>) -> Result<(), Status> {
    app.list_inbox(ListInboxRequest::default()).await.map(drop)
}

/// (a) A session resumed after the reload is refused, on both listeners;
/// an unrevoked party's full handshake on the same daemon still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_party_cannot_resume_an_earlier_tls_session() {
    let mut net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let other = net.party("other", OTHER);
    let his = net.client("his", "urn:local:hospital:his");
    let ris = net.client("ris", "urn:local:hospital:ris");
    let extra = client_block("ris", &ris, &["*"], &["treatment"], &["*"]);
    net.configure(&hospital, &[&clinic, &other], &[&his], &extra);
    let h = start(&hospital).await;

    let peer_config = resuming_config(&net, &hospital, &clinic.tls_identity());
    let client_config = resuming_config(&net, &hospital, &client_tls_identity(&his));
    // Connections made while both are trusted: the daemon answers, and the
    // client side keeps whatever session it was offered.
    for _ in 0..2 {
        peer_probe(&mut PeerClient::new(channel(
            &hospital.peer_addr(),
            &peer_config,
        )))
        .await
        .unwrap();
        client_probe(&mut ClientClient::new(channel(
            &hospital.client_addr(),
            &client_config,
        )))
        .await
        .unwrap();
    }

    net.revoke(&clinic.file("identity.pem"));
    net.revoke(&his.cert);
    h.reload_trust().unwrap();

    // New connections with the same session stores: refused.
    let e = peer_probe(&mut PeerClient::new(channel(
        &hospital.peer_addr(),
        &peer_config,
    )))
    .await
    .unwrap_err();
    assert_transport_failure(&e);
    let e = client_probe(&mut ClientClient::new(channel(
        &hospital.client_addr(),
        &client_config,
    )))
    .await
    .unwrap_err();
    assert_transport_failure(&e);

    // The bare handshakes show why: the certificate is checked and refused.
    for (addr, config) in [
        (hospital.peer_addr(), &peer_config),
        (hospital.client_addr(), &client_config),
    ] {
        let verdict = handshake_verdict(&addr, config).await;
        match verdict {
            Ok(kind) => panic!("handshake accepted ({kind:?}) for a revoked certificate"),
            Err(chain) => assert!(
                chain.contains("AlertReceived(CertificateRevoked)"),
                "expected the CertificateRevoked alert in: {chain}"
            ),
        }
    }

    // Unrevoked parties on the same daemon, same way of connecting: accepted.
    let other_config = resuming_config(&net, &hospital, &other.tls_identity());
    peer_probe(&mut PeerClient::new(channel(
        &hospital.peer_addr(),
        &other_config,
    )))
    .await
    .unwrap();
    let ris_config = resuming_config(&net, &hospital, &client_tls_identity(&ris));
    client_probe(&mut ClientClient::new(channel(
        &hospital.client_addr(),
        &ris_config,
    )))
    .await
    .unwrap();
    h.shutdown().await;
}

/// A bare TLS handshake over `config` (which may resume); `Ok` carries the
/// kind of handshake when the server accepted it, `Err` the error chain when
/// it refused (TLS 1.3 shows a refused client certificate only as an alert
/// after the client's side is done, so this waits a second for it).
async fn handshake_verdict(
    addr: &str,
    config: &Arc<rustls::ClientConfig>,
) -> Result<Option<rustls::HandshakeKind>, String> {
    use tokio::io::AsyncReadExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(
        std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST).into(),
    );
    let mut stream = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| error_chain(&e))?;
    let kind = stream.get_ref().1.handshake_kind();
    let mut buf = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await {
        Err(_) => Ok(kind),
        Ok(Ok(0)) => Err("closed without an alert".into()),
        Ok(Ok(_)) => Err("unexpected application data".into()),
        Ok(Err(e)) => Err(error_chain(&e)),
    }
}

/// (b) A connection established before the reload cannot carry another
/// call after it: the daemon closes it. Connections of unrevoked parties,
/// opened at the same time, stay open and keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_closes_established_connections_of_revoked_parties() {
    let mut net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let other = net.party("other", OTHER);
    let his = net.client("his", "urn:local:hospital:his");
    let ris = net.client("ris", "urn:local:hospital:ris");
    let extra = client_block("ris", &ris, &["*"], &["treatment"], &["*"]);
    net.configure(&hospital, &[&clinic, &other], &[&his], &extra);
    let h = start(&hospital).await;

    let mut revoked_peer = peer_client(&net, &hospital, &clinic.tls_identity());
    let mut kept_peer = peer_client(&net, &hospital, &other.tls_identity());
    let mut revoked_app = client_of(&net, &hospital, &his);
    let mut kept_app = client_of(&net, &hospital, &ris);
    peer_probe(&mut revoked_peer).await.unwrap();
    peer_probe(&mut kept_peer).await.unwrap();
    client_probe(&mut revoked_app).await.unwrap();
    client_probe(&mut kept_app).await.unwrap();

    net.revoke(&clinic.file("identity.pem"));
    net.revoke(&his.cert);
    h.reload_trust().unwrap();

    // The next call on each established connection of a revoked party fails
    // without reaching a service.
    assert_transport_failure(&peer_probe(&mut revoked_peer).await.unwrap_err());
    assert_transport_failure(&client_probe(&mut revoked_app).await.unwrap_err());
    // And so does every later one (a reconnect is a full handshake).
    assert_transport_failure(&peer_probe(&mut revoked_peer).await.unwrap_err());
    assert_transport_failure(&client_probe(&mut revoked_app).await.unwrap_err());
    // The others' connections were re-checked, passed, and still work.
    peer_probe(&mut kept_peer).await.unwrap();
    client_probe(&mut kept_app).await.unwrap();
    h.shutdown().await;
}

/// The periodic check (no SIGHUP, no call into the daemon) picks up a
/// rewritten CRL and closes the revoked client's open connection within
/// one check interval (10 s) of the change, as docs/security-model.md says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_crl_file_closes_connections_within_the_check_interval() {
    let mut net = Net::new();
    let hospital = net.party("hospital", HOSPITAL);
    let clinic = net.party("clinic", CLINIC);
    let his = net.client("his", "urn:local:hospital:his");
    net.configure(&hospital, &[&clinic], &[&his], "");
    let h = start(&hospital).await;
    let mut app = client_of(&net, &hospital, &his);
    client_probe(&mut app).await.unwrap();
    net.revoke(&his.cert);
    // Liveness bound: two check intervals plus slack.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(25);
    loop {
        match client_probe(&mut app).await {
            Ok(()) => {}
            Err(s) => {
                assert_transport_failure(&s);
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the revoked client's connection was never closed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    h.shutdown().await;
}

/// Outbound: the daemon's own open connection to a peer whose certificate
/// has since been revoked is closed by its reload, and the reconnection is
/// refused, so nothing more reaches that peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_closes_the_daemons_own_connection_to_a_revoked_peer() {
    let mut net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:local:clinic:emr");
    net.configure(&clinic, &[&hospital], &[&emr], "");
    net.configure(&hospital, &[&clinic], &[], "");
    let c = start(&clinic).await;
    let h = start(&hospital).await;
    let mut app = client_of(&net, &clinic, &emr);
    let first = send(
        &mut app,
        referral_start(&[&hospital], &[], "treatment"),
        b"before",
    )
    .await
    .unwrap();
    wait_status(&mut app, &first, |s| {
        s.state() == exchange_daemon::proto::MessageState::Delivered
    })
    .await;
    assert_eq!(h.node().store().inbox(true).await.unwrap().len(), 1);

    // The hospital's identity (its TLS certificate) is revoked; the clinic
    // reloads while its connection to the hospital is open.
    net.revoke(&hospital.file("identity.pem"));
    c.reload_trust().unwrap();
    let second = send(
        &mut app,
        referral_start(&[&hospital], &[], "treatment"),
        b"after",
    )
    .await
    .unwrap();
    let s = wait_status(&mut app, &second, |s| s.hops[0].attempts >= 1).await;
    assert_ne!(
        s.state(),
        exchange_daemon::proto::MessageState::Delivered,
        "{s:#?}"
    );
    // The attempt never reached the hospital.
    assert_eq!(h.node().store().inbox(true).await.unwrap().len(), 1);
    c.shutdown().await;
    h.shutdown().await;
}
