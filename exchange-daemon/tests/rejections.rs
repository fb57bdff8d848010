//! Every rejection, on real daemons with real mutual TLS on loopback and real
//! SQLite stores: each is refused with its specific reason (a TLS alert
//! before any service is reached, or a gRPC status carrying the stable
//! `x-exchange-reason`), and the daemon that refused stores nothing (no row,
//! no work, no blob, no spool file). Each test also runs the accepted
//! counterpart of what it refuses, in the same set-up, so that it can only
//! pass because of the one thing it changes.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use common::*;
use exchange_core::MessageId;
use exchange_core::ca::CertificateAuthority;
use exchange_daemon::config::Profile;
use exchange_daemon::error::status_reason;
use exchange_daemon::proto::{AckRequest, FetchRequest, ListInboxRequest};
use exchange_daemon::tls;
use exchange_daemon::{Config, Error};
use tonic::{Code, Status};

/// The call failed before any service answered: a transport failure, with
/// no reason code from the daemon. (Which alert the daemon sent is checked
/// with [`assert_alert`]: over gRPC the alert can be lost to a reset.)
fn assert_transport_failure(status: &Status) {
    let chain = error_chain(status);
    assert_eq!(
        status_reason(status),
        None,
        "a service answered, so the handshake succeeded: {chain}"
    );
    assert!(
        matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        ),
        "not a transport failure: {chain}"
    );
}

/// A bare handshake was refused with the TLS alert `alert` (as rustls names it).
fn assert_alert(verdict: Result<(), String>, alert: &str) {
    match verdict {
        Ok(()) => panic!("the handshake was accepted, expected the alert {alert}"),
        Err(chain) => assert!(
            chain.contains(&format!("AlertReceived({alert})")),
            "expected the TLS alert {alert} in: {chain}"
        ),
    }
}

/// A status with this code and reason code.
fn assert_refused(status: &Status, code: Code, reason: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(status_reason(status), Some(reason), "{status:?}");
    assert!(
        status.message().starts_with(&format!("{reason}: ")),
        "{status:?}"
    );
}

fn id_of(head: &exchange_core::envelope::EnvelopeHead) -> MessageId {
    head.header_unverified().unwrap().message_id
}

// 1. No client certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_certificate_is_refused_at_the_handshake() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let his = net.client("his", "urn:local:hospital:his");
    net.configure(&hospital, &[&clinic], &[&his], "");
    let h = start(&hospital).await;

    // A fresh channel per call: each call makes its own handshake.
    let anonymous = || raw_client(&net, &hospital, None, tls::versions(false));
    let e = anonymous()
        .list_inbox(ListInboxRequest::default())
        .await
        .unwrap_err();
    assert_transport_failure(&e);
    let e = send(
        &mut anonymous(),
        referral_start(&[&clinic], &[], "treatment"),
        b"referral",
    )
    .await
    .unwrap_err();
    assert_transport_failure(&e);
    assert_alert(
        tls_verdict(
            &net,
            &hospital,
            &hospital.client_addr(),
            None,
            tls::versions(false),
        )
        .await,
        "CertificateRequired",
    );
    assert_nothing_stored(&h, &hospital).await;

    // The same request over the same kind of connection, with the
    // configured client's certificate, is accepted and stored.
    let mut his_app = raw_client(
        &net,
        &hospital,
        Some(&client_tls_identity(&his)),
        tls::versions(false),
    );
    send(
        &mut his_app,
        referral_start(&[&clinic], &[], "treatment"),
        b"referral",
    )
    .await
    .unwrap();
    assert_eq!(store_counts(&hospital).messages, 1);
    h.shutdown().await;
}

// 2. A certificate from another CA, on the client and on the peer listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_another_ca_are_refused_at_the_handshake() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let his = net.client("his", "urn:local:hospital:his");
    net.configure(&hospital, &[&clinic], &[&his], "");
    let h = start(&hospital).await;

    // A CA nobody configured issues a client certificate naming the very
    // client URI the hospital serves, and party credentials naming the clinic.
    let foreign = CertificateAuthority::generate("Foreign CA", validity(net.now)).unwrap();
    let impostor = issue_client(&foreign, net.now, &net.path("foreign-client"), &his.uri);
    let app = || {
        raw_client(
            &net,
            &hospital,
            Some(&client_tls_identity(&impostor)),
            tls::versions(false),
        )
    };
    let e = app()
        .list_inbox(ListInboxRequest::default())
        .await
        .unwrap_err();
    assert_transport_failure(&e);
    let e = send(
        &mut app(),
        referral_start(&[&clinic], &[], "treatment"),
        b"x",
    )
    .await
    .unwrap_err();
    assert_transport_failure(&e);
    let impostor_identity = client_tls_identity(&impostor);
    assert_alert(
        tls_verdict(
            &net,
            &hospital,
            &hospital.client_addr(),
            Some(&impostor_identity),
            tls::versions(false),
        )
        .await,
        "UnknownCA",
    );

    let fake_dir = net.path("foreign-clinic");
    let fake = issue_client(&foreign, net.now, &fake_dir, CLINIC);
    let fake_identity = exchange_daemon::tls::TlsIdentity::from_pem(
        &std::fs::read(&fake.cert).unwrap(),
        &std::fs::read(&fake.key).unwrap(),
    )
    .unwrap();
    let (head, ct) = seal_now(&net, &clinic, &hospital, b"discharge summary");
    let e = deliver(
        &mut peer_client(&net, &hospital, &fake_identity),
        &head,
        &ct,
    )
    .await
    .unwrap_err();
    assert_transport_failure(&e);
    assert_alert(
        tls_verdict(
            &net,
            &hospital,
            &hospital.peer_addr(),
            Some(&fake_identity),
            tls::versions(false),
        )
        .await,
        "UnknownCA",
    );
    assert_nothing_stored(&h, &hospital).await;
    assert!(
        h.node()
            .store()
            .messages_by_id(id_of(&head))
            .await
            .unwrap()
            .is_empty()
    );

    // The genuine certificates get through.
    let mut app = client_of(&net, &hospital, &his);
    app.list_inbox(ListInboxRequest::default()).await.unwrap();
    deliver(
        &mut peer_client(&net, &hospital, &clinic.tls_identity()),
        &head,
        &ct,
    )
    .await
    .unwrap();
    assert!(
        h.node()
            .store()
            .messages_by_id(id_of(&head))
            .await
            .unwrap()
            .len()
            == 1
    );
    h.shutdown().await;
}

// 3. The TLS peer is not the envelope's sender.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_other_than_the_sender_is_an_identity_mismatch() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let other = net.party("other", OTHER);
    net.configure(&hospital, &[&clinic, &other], &[], "");
    let h = start(&hospital).await;

    let (head, ct) = seal_now(&net, &clinic, &hospital, b"discharge summary");
    let e = deliver(
        &mut peer_client(&net, &hospital, &other.tls_identity()),
        &head,
        &ct,
    )
    .await
    .unwrap_err();
    assert_refused(&e, Code::PermissionDenied, "identity-mismatch");
    assert!(
        e.message().contains(OTHER) && e.message().contains(CLINIC),
        "{e:?}"
    );
    assert_nothing_stored(&h, &hospital).await;
    assert!(
        h.node()
            .store()
            .messages_by_id(id_of(&head))
            .await
            .unwrap()
            .is_empty()
    );

    // The same envelope from its sender is accepted.
    deliver(
        &mut peer_client(&net, &hospital, &clinic.tls_identity()),
        &head,
        &ct,
    )
    .await
    .unwrap();
    assert_eq!(h.node().store().inbox(true).await.unwrap().len(), 1);
    h.shutdown().await;
}

// 4. A revoked peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_peer_is_refused_at_the_handshake() {
    let mut net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let other = net.party("other", OTHER);
    // Before the hospital reads the CRL (at start).
    net.revoke(&clinic.file("identity.pem"));
    net.configure(&hospital, &[&clinic, &other], &[], "");
    let h = start(&hospital).await;

    let (head, ct) = seal_now(&net, &clinic, &hospital, b"discharge summary");
    let e = deliver(
        &mut peer_client(&net, &hospital, &clinic.tls_identity()),
        &head,
        &ct,
    )
    .await
    .unwrap_err();
    assert_transport_failure(&e);
    assert_alert(
        tls_verdict(
            &net,
            &hospital,
            &hospital.peer_addr(),
            Some(&clinic.tls_identity()),
            tls::versions(false),
        )
        .await,
        "CertificateRevoked",
    );
    assert_nothing_stored(&h, &hospital).await;
    assert!(
        h.node()
            .store()
            .messages_by_id(id_of(&head))
            .await
            .unwrap()
            .is_empty()
    );

    // An unrevoked party, same CA, same CRL, same daemon, same way of
    // sealing and delivering, is accepted.
    let (head, ct) = seal_now(&net, &other, &hospital, b"discharge summary");
    deliver(
        &mut peer_client(&net, &hospital, &other.tls_identity()),
        &head,
        &ct,
    )
    .await
    .unwrap();
    let inbox = h.node().store().inbox(true).await.unwrap();
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox[0].sender.as_str(), OTHER);
    h.shutdown().await;
}

// 5. TLS 1.2: refused by the open profile, accepted where a closed network allows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_is_refused_by_the_open_profile_and_allowed_on_a_closed_network() {
    static TLS12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
    let net = Net::new();
    let open = net.party("open", HOSPITAL);
    let closed = net.party("closed", OTHER);
    let app = net.client("app", "urn:local:app");
    net.configure(&open, &[], &[&app], "");
    net.configure(
        &closed,
        &[],
        &[&app],
        "\n[network]\nprofile = \"closed\"\nallow_tls12 = true\n",
    );
    assert_eq!(open.config().network.profile, Profile::Open);
    assert_eq!(closed.config().network.profile, Profile::Closed);
    let o = start(&open).await;
    let c = start(&closed).await;
    let id = client_tls_identity(&app);

    let e = raw_client(&net, &open, Some(&id), TLS12)
        .list_inbox(ListInboxRequest::default())
        .await
        .unwrap_err();
    assert_transport_failure(&e);
    assert_alert(
        tls_verdict(&net, &open, &open.client_addr(), Some(&id), TLS12).await,
        "ProtocolVersion",
    );
    assert_alert(
        tls_verdict(&net, &open, &open.peer_addr(), Some(&id), TLS12).await,
        "ProtocolVersion",
    );
    // The same client offering TLS 1.3 is served.
    raw_client(&net, &open, Some(&id), tls::versions(false))
        .list_inbox(ListInboxRequest::default())
        .await
        .unwrap();

    // The closed daemon with the relaxation serves a client offering only TLS 1.2.
    raw_client(&net, &closed, Some(&id), TLS12)
        .list_inbox(ListInboxRequest::default())
        .await
        .unwrap();
    assert_nothing_stored(&o, &open).await;
    o.shutdown().await;
    c.shutdown().await;
}

// 6. Configuration: the open profile admits no relaxation; CRLs are required.
#[test]
fn config_refuses_relaxations_outside_the_closed_profile_and_missing_crls() {
    let text = |network: &str, crls: &str| {
        format!(
            r#"data_dir = "data"
[identity]
cert = "identity.pem"
key = "identity.key.pem"
encryption_cert = "encryption.pem"
encryption_key = "encryption.key.pem"
[trust]
anchors = ["ca.pem"]
crls = [{crls}]
[listen]
peer = "127.0.0.1:7443"
client = "127.0.0.1:7444"
{network}
"#
        )
    };
    let parse = |network: &str, crls: &str| Config::parse(&text(network, crls), Path::new("/etc"));
    let config_error = |r: Result<Config, Error>| match r {
        Err(Error::Config(m)) => m,
        other => panic!("expected a configuration error, got {other:?}"),
    };
    let crl = "\"crl.pem\"";

    // The baseline parses; the profile defaults to open.
    let c = parse("", crl).unwrap();
    assert_eq!(c.network.profile, Profile::Open);
    assert!(c.network.relaxations().is_empty());

    for relaxation in ["allow_tls12", "allow_missing_crls", "allow_stale_crls"] {
        for profile in ["", "profile = \"open\"\n"] {
            let m = config_error(parse(
                &format!("[network]\n{profile}{relaxation} = true"),
                crl,
            ));
            assert!(
                m.contains("open profile") && m.contains(relaxation),
                "{relaxation}: {m}"
            );
        }
        // Permitted, and reported, on a closed network.
        let c = parse(
            &format!("[network]\nprofile = \"closed\"\n{relaxation} = true"),
            crl,
        )
        .unwrap();
        assert_eq!(c.network.relaxations(), vec![relaxation]);
    }

    // No CRL: refused in both profiles unless a closed network says so.
    for network in ["", "[network]\nprofile = \"closed\""] {
        let m = config_error(parse(network, ""));
        assert!(m.contains("trust.crls"), "{m}");
    }
    parse(
        "[network]\nprofile = \"closed\"\nallow_missing_crls = true",
        "",
    )
    .unwrap();
    let m = config_error(parse("[network]\nallow_missing_crls = true", ""));
    assert!(m.contains("allow_missing_crls"), "{m}");

    // Unknown keys are errors, not silently ignored relaxations.
    config_error(parse(
        "[network]\nprofile = \"closed\"\nallow_tls10 = true",
        crl,
    ));
    config_error(parse("[network]\nprofile = \"internet\"", crl));

    // A status watch that never polls again is refused; a slow one is not.
    let m = config_error(parse("[delivery]\nstatus_poll_ms = 0", crl));
    assert!(m.contains("delivery.status_poll_ms"), "{m}");
    let c = parse("[delivery]\nstatus_poll_ms = 600000", crl).unwrap();
    assert_eq!(c.delivery.status_poll_ms, 600_000);
    assert_eq!(parse("", crl).unwrap().delivery.status_poll_ms, 2_000);
}

// 7. Over the size limit, from a peer and from a local client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_over_the_size_limit_are_refused() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let his = net.client("his", "urn:local:hospital:his");
    net.configure(
        &hospital,
        &[&clinic],
        &[&his],
        "\n[limits]\nmax_envelope_bytes = 4096\n",
    );
    let h = start(&hospital).await;

    let mut peer = peer_client(&net, &hospital, &clinic.tls_identity());
    let (head, ct) = seal_now(&net, &clinic, &hospital, &[7u8; 8192]);
    assert!(ct.len() > 4096);
    let e = deliver(&mut peer, &head, &ct).await.unwrap_err();
    assert_refused(&e, Code::ResourceExhausted, "oversize");
    assert!(e.message().contains("limit 4096"), "{e:?}");

    let mut app = client_of(&net, &hospital, &his);
    // Over the limit at the last chunk, and in the middle of the stream.
    for len in [8 * 1024, 300 * 1024] {
        let e = send(
            &mut app,
            referral_start(&[&clinic], &[], "treatment"),
            &vec![1u8; len],
        )
        .await
        .unwrap_err();
        assert_refused(&e, Code::ResourceExhausted, "oversize");
    }
    assert_nothing_stored(&h, &hospital).await;
    assert!(
        h.node()
            .store()
            .messages_by_id(id_of(&head))
            .await
            .unwrap()
            .is_empty()
    );

    // Under the limit, both are accepted.
    let (head, ct) = seal_now(&net, &clinic, &hospital, &[7u8; 1024]);
    deliver(&mut peer, &head, &ct).await.unwrap();
    send(
        &mut app,
        referral_start(&[&clinic], &[], "treatment"),
        &[1u8; 1024],
    )
    .await
    .unwrap();
    assert_eq!(store_counts(&hospital).messages, 2);
    h.shutdown().await;
}

// 8. Expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_envelope_is_refused() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    net.configure(&hospital, &[&clinic], &[], "");
    let h = start(&hospital).await;
    let mut peer = peer_client(&net, &hospital, &clinic.tls_identity());

    // Sealed ten minutes ago (within the certificates' validity, which
    // starts an hour before `net.now`) for one minute.
    let (head, ct) = seal_to(
        &net,
        &clinic,
        &hospital,
        "treatment",
        b"lab result",
        SystemTime::now() - Duration::from_secs(600),
        Duration::from_secs(60),
    );
    let e = deliver(&mut peer, &head, &ct).await.unwrap_err();
    assert_refused(&e, Code::FailedPrecondition, "expired");
    assert_nothing_stored(&h, &hospital).await;
    assert!(
        h.node()
            .store()
            .messages_by_id(id_of(&head))
            .await
            .unwrap()
            .is_empty()
    );

    // Sealed at the same time for an hour: still valid, accepted.
    let (head, ct) = seal_to(
        &net,
        &clinic,
        &hospital,
        "treatment",
        b"lab result",
        SystemTime::now() - Duration::from_secs(600),
        Duration::from_secs(3600),
    );
    deliver(&mut peer, &head, &ct).await.unwrap();
    assert!(
        h.node()
            .store()
            .messages_by_id(id_of(&head))
            .await
            .unwrap()
            .len()
            == 1
    );
    h.shutdown().await;
}

// 9. A local client outside its role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_client_outside_its_role_is_a_policy_violation() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let payer = net.party("payer", PAYER);
    let agent = net.party("agent", AGENT);
    let billing = net.client("billing", "urn:local:clinic:billing");
    let rece = net.client("rece", "urn:local:clinic:rece");
    let roles = client_block("billing", &billing, &[PAYER], &["claims"], &["*"])
        + &client_block("rece", &rece, &[PAYER, AGENT], &["claims"], &["*"]);
    net.configure(&clinic, &[&hospital, &payer, &agent], &[], &roles);
    let c = start(&clinic).await;
    let mut app = client_of(&net, &clinic, &billing);

    // A recipient not in send_to (for an allowed purpose).
    let e = send(&mut app, referral_start(&[&hospital], &[], "claims"), b"x")
        .await
        .unwrap_err();
    assert_refused(&e, Code::PermissionDenied, "policy-violation");
    assert!(e.message().contains(HOSPITAL), "{e:?}");
    // An allowed recipient among others that are not.
    let e = send(
        &mut app,
        referral_start(&[&payer, &hospital], &[], "claims"),
        b"x",
    )
    .await
    .unwrap_err();
    assert_refused(&e, Code::PermissionDenied, "policy-violation");
    // A purpose not in purposes (to an allowed recipient).
    let e = send(&mut app, referral_start(&[&payer], &[], "treatment"), b"x")
        .await
        .unwrap_err();
    assert_refused(&e, Code::PermissionDenied, "policy-violation");
    assert!(e.message().contains("treatment"), "{e:?}");
    // A relay not in send_to (allowed recipient and purpose): send_to covers
    // the parties a client routes its records through, not only the last.
    let relay = AGENT.to_owned();
    let e = send(
        &mut app,
        referral_start(&[&payer], &[relay.as_str()], "claims"),
        b"x",
    )
    .await
    .unwrap_err();
    assert_refused(&e, Code::PermissionDenied, "policy-violation");
    assert!(e.message().contains(AGENT), "{e:?}");
    assert_nothing_stored(&c, &clinic).await;

    // Within its role it sends.
    let id = send(&mut app, referral_start(&[&payer], &[], "claims"), b"x")
        .await
        .unwrap();
    let id = MessageId::from_slice(&id).unwrap();
    assert!(c.node().store().messages_by_id(id).await.unwrap().len() == 1);
    let counts = store_counts(&clinic);
    assert_eq!((counts.messages, counts.deliveries), (1, 1), "{counts:?}");
    // A client whose send_to lists the agent sends through it.
    let mut rece_app = client_of(&net, &clinic, &rece);
    send(
        &mut rece_app,
        referral_start(&[&payer], &[relay.as_str()], "claims"),
        b"x",
    )
    .await
    .unwrap();
    assert_eq!(store_counts(&clinic).messages, 2);
    c.shutdown().await;
}

// 10. A tampered ciphertext chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_ciphertext_is_a_digest_mismatch() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    // Small inline limit: the ciphertext is spooled to a file while it
    // streams in, so the test also sees that the spool file goes away.
    net.configure(
        &hospital,
        &[&clinic],
        &[],
        "\n[limits]\ninline_ciphertext_bytes = 1024\n",
    );
    let h = start(&hospital).await;
    let mut peer = peer_client(&net, &hospital, &clinic.tls_identity());

    let payload: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();
    let (head, ct) = seal_now(&net, &clinic, &hospital, &payload);
    let mut tampered = ct.clone();
    let i = tampered.len() / 2;
    tampered[i] ^= 0x01;
    let e = deliver(&mut peer, &head, &tampered).await.unwrap_err();
    assert_refused(&e, Code::InvalidArgument, "digest-mismatch");
    assert_nothing_stored(&h, &hospital).await;
    assert!(
        h.node()
            .store()
            .messages_by_id(id_of(&head))
            .await
            .unwrap()
            .is_empty()
    );

    // The untouched ciphertext is accepted (into a blob file).
    deliver(&mut peer, &head, &ct).await.unwrap();
    let counts = store_counts(&hospital);
    assert_eq!((counts.messages, counts.blob_files), (1, 1), "{counts:?}");
    h.shutdown().await;
}

// 11. Delivered to a party that is not on the route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_for_someone_else_is_not_on_route() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let payer = net.party("payer", PAYER);
    net.configure(&payer, &[&clinic], &[], "");
    let p = start(&payer).await;
    let mut peer = peer_client(&net, &payer, &clinic.tls_identity());

    let (head, ct) = seal_now(&net, &clinic, &hospital, b"referral");
    let e = deliver(&mut peer, &head, &ct).await.unwrap_err();
    assert_refused(&e, Code::InvalidArgument, "not-on-route");
    assert_nothing_stored(&p, &payer).await;
    assert!(
        p.node()
            .store()
            .messages_by_id(id_of(&head))
            .await
            .unwrap()
            .is_empty()
    );

    // Addressed to the payer, the same delivery is accepted.
    let (head, ct) = seal_now(&net, &clinic, &payer, b"referral");
    deliver(&mut peer, &head, &ct).await.unwrap();
    assert!(
        p.node()
            .store()
            .messages_by_id(id_of(&head))
            .await
            .unwrap()
            .len()
            == 1
    );
    p.shutdown().await;
}

// 12. A valid certificate that names no configured client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_certificate_of_an_unconfigured_client_is_unknown_client() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let his = net.client("his", "urn:local:hospital:his");
    let stranger = net.client("stranger", "urn:local:hospital:stranger");
    net.configure(&hospital, &[&clinic], &[&his], "");
    let h = start(&hospital).await;

    let mut app = client_of(&net, &hospital, &stranger);
    let e = app
        .list_inbox(ListInboxRequest::default())
        .await
        .unwrap_err();
    assert_refused(&e, Code::PermissionDenied, "unknown-client");
    let e = send(&mut app, referral_start(&[&clinic], &[], "treatment"), b"x")
        .await
        .unwrap_err();
    assert_refused(&e, Code::PermissionDenied, "unknown-client");
    assert_nothing_stored(&h, &hospital).await;

    // The configured client, same CA and same daemon, sends.
    let mut app = client_of(&net, &hospital, &his);
    send(&mut app, referral_start(&[&clinic], &[], "treatment"), b"x")
        .await
        .unwrap();
    assert_eq!(store_counts(&hospital).messages, 1);
    h.shutdown().await;
}

// 13. Inbox isolation by read_purposes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_items_outside_read_purposes_are_invisible() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let claims = net.client("claims", "urn:local:hospital:claims");
    let ward = net.client("ward", "urn:local:hospital:ward");
    let extra = client_block("claims", &claims, &[], &[], &["claims"])
        + &client_block("ward", &ward, &[], &[], &["*"]);
    net.configure(&hospital, &[&clinic], &[], &extra);
    let h = start(&hospital).await;
    let mut peer = peer_client(&net, &hospital, &clinic.tls_identity());
    let (head, ct) = seal_now(&net, &clinic, &hospital, b"referral");
    deliver(&mut peer, &head, &ct).await.unwrap();
    let (claim_head, claim_ct) = seal_to(
        &net,
        &clinic,
        &hospital,
        "claims",
        b"claim",
        SystemTime::now(),
        Duration::from_secs(3600),
    );
    deliver(&mut peer, &claim_head, &claim_ct).await.unwrap();
    let treatment = id_of(&head).as_bytes().to_vec();
    let claim = id_of(&claim_head).as_bytes().to_vec();

    let ids = |items: Vec<exchange_daemon::proto::InboxItem>| {
        items.into_iter().map(|i| i.message_id).collect::<Vec<_>>()
    };
    let mut ward_app = client_of(&net, &hospital, &ward);
    let mut claims_app = client_of(&net, &hospital, &claims);
    let all = ListInboxRequest {
        include_acked: true,
        ..ListInboxRequest::default()
    };
    let seen = ids(ward_app
        .list_inbox(all.clone())
        .await
        .unwrap()
        .into_inner()
        .items);
    assert_eq!(seen, vec![treatment.clone(), claim.clone()]);
    let seen = ids(claims_app.list_inbox(all).await.unwrap().into_inner().items);
    assert_eq!(seen, vec![claim.clone()]);

    // Fetch and Ack of the hidden item: NotFound, exactly as for an id that
    // does not exist (its existence is not disclosed).
    let absent = [0x5au8; 16].to_vec();
    for id in [&treatment, &absent] {
        let e = claims_app
            .fetch(FetchRequest {
                message_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_refused(&e, Code::NotFound, "not-found");
        let e = claims_app
            .ack(AckRequest {
                message_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_refused(&e, Code::NotFound, "not-found");
    }
    let record = h
        .node()
        .store()
        .messages_by_id(id_of(&head))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(record.acked_ms, None, "the refused Ack changed nothing");
    assert!(
        h.node()
            .store()
            .receipts(record.key)
            .await
            .unwrap()
            .is_empty(),
        "the refused Ack signed no PROCESSED receipt"
    );

    // Its own purpose it fetches (to the end) and acknowledges; the ward
    // client reads the other.
    let mut s = claims_app
        .fetch(FetchRequest {
            message_id: claim.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while s.message().await.unwrap().is_some() {}
    claims_app
        .ack(AckRequest {
            message_id: claim,
            ..Default::default()
        })
        .await
        .unwrap();
    ward_app
        .fetch(FetchRequest {
            message_id: treatment,
            ..Default::default()
        })
        .await
        .unwrap();
    h.shutdown().await;
}
