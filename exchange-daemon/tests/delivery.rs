//! End-to-end deliveries between real daemons on loopback with real mutual
//! TLS and real SQLite stores: direct, through an agent, with the recipient
//! down for a while, and redelivery of the same envelope.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use common::*;
use exchange_core::MessageId;
use exchange_core::envelope::{EnvelopeHead, SealerBuilder};
use exchange_core::receipt::SignedReceipt;
use exchange_core::route::HopRole;
use exchange_core::trust::TrustStore;
use exchange_daemon::proto::{
    AckRequest, DeliverRequest, FetchRequest, ListInboxRequest, deliver_request, fetch_response,
};

fn trust(net: &Net) -> TrustStore {
    TrustStore::builder()
        .anchors_pem(&std::fs::read(net.path("ca.pem")).unwrap())
        .unwrap()
        .crls_pem(&std::fs::read(net.path("crl.pem")).unwrap())
        .unwrap()
        .build()
        .unwrap()
}

async fn fetch_all(
    client: &mut exchange_daemon::proto::client_client::ClientClient<tonic::transport::Channel>,
    id: &[u8],
) -> (exchange_daemon::proto::FetchHeader, Vec<u8>) {
    let mut stream = client
        .fetch(FetchRequest {
            message_id: id.to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut header = None;
    let mut data = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        match m.part.unwrap() {
            fetch_response::Part::Header(h) => header = Some(h),
            fetch_response::Part::Chunk(c) => data.extend_from_slice(&c),
        }
    }
    (header.unwrap(), data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_delivery_returns_a_delivered_receipt_marking_the_boundary() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:local:clinic:emr");
    let his = net.client("his", "urn:local:hospital:his");
    net.configure(&clinic, &[&hospital], &[&emr], "");
    net.configure(&hospital, &[&clinic], &[&his], "");
    let c = start(&clinic).await;
    let h = start(&hospital).await;

    let mut app = client_of(&net, &clinic, &emr);
    // 300 KiB: several chunks, larger than one gRPC slice.
    let payload: Vec<u8> = (0..300 * 1024).map(|i| (i % 251) as u8).collect();
    let id = send(
        &mut app,
        referral_start(&[&hospital], &[], "treatment"),
        &payload,
    )
    .await
    .unwrap();
    let status = wait_status(&mut app, &id, |s| {
        s.state() == exchange_daemon::proto::MessageState::Delivered
    })
    .await;

    assert_eq!(status.receipts.len(), 1);
    let r = &status.receipts[0];
    assert_eq!(r.issuer, HOSPITAL);
    assert_eq!(
        r.disposition(),
        exchange_daemon::proto::Disposition::Delivered
    );
    assert_eq!(r.role(), exchange_daemon::proto::HopRole::ThirdParty);
    assert!(
        r.provision_boundary,
        "the hospital's DELIVERED receipt is the boundary"
    );
    assert_eq!(status.provisions.len(), 1);
    assert_eq!(
        status.provisions[0].provision(),
        exchange_daemon::proto::ProvisionState::Passed
    );
    assert_eq!(status.provisions[0].receipt, Some(0));
    assert_eq!(
        status.hops[0].state(),
        exchange_daemon::proto::HopDeliveryState::Delivered
    );

    // The receipt verifies offline and belongs to this message.
    let receipt = SignedReceipt::from_bytes(&r.signed)
        .unwrap()
        .verify(&trust(&net))
        .unwrap();
    assert_eq!(receipt.message_id(), MessageId::from_slice(&id).unwrap());

    // The hospital's application finds, fetches and acknowledges it.
    let mut his_app = client_of(&net, &hospital, &his);
    let inbox = his_app
        .list_inbox(ListInboxRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(inbox.items.len(), 1);
    assert_eq!(inbox.items[0].message_id, id);
    assert_eq!(inbox.items[0].sender, CLINIC);
    let (header, data) = fetch_all(&mut his_app, &id).await;
    assert_eq!(data, payload);
    assert_eq!(header.sender, CLINIC);
    assert_eq!(header.subject_ids[0].value, "P-000123");
    assert_eq!(header.title, "診療情報提供書");
    let ack = his_app
        .ack(AckRequest {
            message_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Acknowledging again returns the same receipt.
    let again = his_app
        .ack(AckRequest {
            message_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.receipt, again.receipt);

    // The PROCESSED receipt travels back to the clinic.
    let status = wait_status(&mut app, &id, |s| {
        s.state() == exchange_daemon::proto::MessageState::Processed
    })
    .await;
    assert_eq!(status.receipts.len(), 2);
    assert_eq!(
        status.receipts[1].disposition(),
        exchange_daemon::proto::Disposition::Processed
    );
    assert_eq!(status.receipts[1].signed, ack.receipt);
    // The boundary stays the first custody receipt.
    assert!(status.receipts[0].provision_boundary);
    assert!(!status.receipts[1].provision_boundary);

    let inbox = his_app
        .list_inbox(ListInboxRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        inbox.items.is_empty(),
        "acknowledged items leave the default listing"
    );
    c.shutdown().await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_through_an_agent_returns_both_receipts() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let agent = net.party("agent", AGENT);
    let payer = net.party("payer", PAYER);
    let emr = net.client("emr", "urn:local:clinic:emr");
    let payer_app = net.client("payer-app", "urn:local:payer:intake");
    // The clinic entrusts the agent by contract (委託).
    net.configure_roles(
        &clinic,
        &[&agent, &payer],
        &[&emr],
        "",
        &[(&agent, "entrusted")],
    );
    // The agent knows both ends; the payer only the agent (receipts go back the way they came).
    net.configure(&agent, &[&clinic, &payer], &[], "");
    net.configure(&payer, &[&agent], &[&payer_app], "");
    let c = start(&clinic).await;
    let a = start(&agent).await;
    let p = start(&payer).await;

    let mut app = client_of(&net, &clinic, &emr);
    let claim = b"UKE claim file (synthetic)".repeat(100);
    let relay = format!("{AGENT}=entrusted");
    let mut start_msg = referral_start(&[&payer], &[relay.as_str()], "claims");
    start_msg.content_type = "text/plain".into();
    let id = send(&mut app, start_msg, &claim).await.unwrap();
    let status = wait_status(&mut app, &id, |s| {
        s.state() == exchange_daemon::proto::MessageState::Delivered
    })
    .await;

    assert_eq!(status.receipts.len(), 2, "{status:#?}");
    let by = |issuer: &str| {
        status
            .receipts
            .iter()
            .find(|r| r.issuer == issuer)
            .unwrap()
            .clone()
    };
    let agent_r = by(AGENT);
    let payer_r = by(PAYER);
    assert_eq!(
        agent_r.disposition(),
        exchange_daemon::proto::Disposition::AcceptedForRelay
    );
    assert_eq!(agent_r.role(), exchange_daemon::proto::HopRole::Entrusted);
    assert!(
        !agent_r.provision_boundary,
        "an entrusted agent is not a provision"
    );
    assert_eq!(
        payer_r.disposition(),
        exchange_daemon::proto::Disposition::Delivered
    );
    assert_eq!(payer_r.role(), exchange_daemon::proto::HopRole::ThirdParty);
    assert!(payer_r.provision_boundary);
    assert_eq!(status.provisions[0].boundary, PAYER);
    assert_eq!(status.hops.len(), 1);
    assert_eq!(status.hops[0].party, AGENT);

    // The agent holds the envelope only to relay it: nothing in its inbox,
    // and no key of its can open it.
    let agent_inbox = a.node().store().inbox(true).await.unwrap();
    assert!(agent_inbox.is_empty());
    let stored = a
        .node()
        .store()
        .messages_by_id(MessageId::from_slice(&id).unwrap())
        .await
        .unwrap()
        .remove(0);
    let head = EnvelopeHead::decode(&stored.head)
        .unwrap()
        .verify(&trust(&net), std::time::SystemTime::now())
        .unwrap();
    let agent_key = exchange_core::identity::DecryptionKey::from_pem(
        &std::fs::read(agent.file("encryption.pem")).unwrap(),
        &std::fs::read(agent.file("encryption.key.pem")).unwrap(),
    )
    .unwrap();
    assert!(matches!(
        head.open(&[agent_key]),
        Err(exchange_core::Error::NotARecipient)
    ));

    // The payer's PROCESSED receipt comes back through the agent.
    let mut intake = client_of(&net, &payer, &payer_app);
    let (_, data) = fetch_all(&mut intake, &id).await;
    assert_eq!(data, claim);
    intake
        .ack(AckRequest {
            message_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let status = wait_status(&mut app, &id, |s| {
        s.state() == exchange_daemon::proto::MessageState::Processed
    })
    .await;
    assert_eq!(status.receipts.len(), 3);
    c.shutdown().await;
    a.shutdown().await;
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipient_down_then_up_gets_the_message_once() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:local:clinic:emr");
    let his = net.client("his", "urn:local:hospital:his");
    net.configure(&clinic, &[&hospital], &[&emr], "");
    net.configure(&hospital, &[&clinic], &[&his], "");
    let c = start(&clinic).await;
    let mut app = client_of(&net, &clinic, &emr);
    let id = send(
        &mut app,
        referral_start(&[&hospital], &[], "treatment"),
        b"lab result",
    )
    .await
    .unwrap();
    // The hospital is down: attempts fail and are retried.
    let status = wait_status(&mut app, &id, |s| s.hops[0].attempts >= 2).await;
    assert_eq!(
        status.state(),
        exchange_daemon::proto::MessageState::Pending
    );
    assert!(!status.hops[0].last_error.is_empty());

    let h = start(&hospital).await;
    let status = wait_status(&mut app, &id, |s| {
        s.state() == exchange_daemon::proto::MessageState::Delivered
    })
    .await;
    assert_eq!(status.receipts.len(), 1);
    let inbox = h.node().store().inbox(true).await.unwrap();
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox[0].id.as_bytes().as_slice(), id.as_slice());
    // Nothing more to do on either side.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(c.node().store().pending_count().await.unwrap(), 0);
    c.shutdown().await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_returns_the_original_receipt_and_one_inbox_entry() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    net.configure(&hospital, &[&clinic], &[], "");
    let h = start(&hospital).await;

    let identity = clinic.identity();
    let trust = trust(&net);
    let to = exchange_core::identity::Certificate::from_pem(
        &std::fs::read(hospital.file("encryption.pem")).unwrap(),
    )
    .unwrap()
    .remove(0);
    let key = trust
        .verify_encryption(&to, std::time::SystemTime::now())
        .unwrap();
    let mut rng = rand_core::UnwrapErr(getrandom::SysRng);
    let mut sealer = SealerBuilder::new(&identity, "application/pdf")
        .recipient(key, HopRole::ThirdParty)
        .purpose("treatment")
        .start(std::time::SystemTime::now(), &mut rng)
        .unwrap();
    let mut ct = Vec::new();
    sealer.update(b"discharge summary (synthetic)", &mut ct);
    let head = sealer.finish(&mut ct);

    let mut peer = peer_client(&net, &hospital, &clinic.tls_identity());
    let deliver = |head: &EnvelopeHead, ct: &[u8]| {
        tokio_stream::iter(vec![
            DeliverRequest {
                part: Some(deliver_request::Part::Head(head.as_bytes().to_vec())),
            },
            DeliverRequest {
                part: Some(deliver_request::Part::Chunk(ct.to_vec())),
            },
        ])
    };
    let first = peer
        .deliver(deliver(&head, &ct))
        .await
        .unwrap()
        .into_inner();
    let second = peer
        .deliver(deliver(&head, &ct))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        first.receipt, second.receipt,
        "the original receipt, byte for byte"
    );
    let inbox = h.node().store().inbox(true).await.unwrap();
    assert_eq!(inbox.len(), 1);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refreshed_crl_takes_effect_without_a_restart() {
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

    // The CA revokes the clinic; the hospital picks the new CRL up while running.
    net.revoke(&clinic.file("identity.pem"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let mut peer = peer_client(&net, &hospital, &clinic.tls_identity());
    loop {
        // A fresh connection each time: the handshake is where revocation bites.
        let probe = peer
            .return_receipts(exchange_daemon::proto::ReturnReceiptsRequest {
                message_id: vec![0; 16],
                receipts: vec![],
            })
            .await;
        match probe {
            // Until the reload the clinic is still trusted: the message is unknown.
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => {
                // The TLS 1.3 client learns of the refused certificate only when
                // the server closes the connection.
                // (Unavailable, Cancelled or a broken pipe, by timing): never an
                // answer from the service, which always carries a reason code.
                assert!(
                    matches!(
                        s.code(),
                        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
                    ) && exchange_daemon::error::status_reason(&s).is_none(),
                    "{s:?}"
                );
                break;
            }
            Ok(_) => panic!("an empty receipt return for an unknown message succeeded"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the CRL was never reloaded"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        peer = peer_client(&net, &hospital, &clinic.tls_identity());
    }
    // The clinic's later messages are refused at the handshake and stay pending.
    let second = send(
        &mut app,
        referral_start(&[&hospital], &[], "treatment"),
        b"after",
    )
    .await;
    // The clinic's own daemon has reloaded the same CRL by now or soon: either
    // it refuses to seal with a revoked identity, or the hospital refuses it.
    if let Ok(id) = second {
        let s = wait_status(&mut app, &id, |s| s.hops[0].attempts >= 1).await;
        assert_ne!(s.state(), exchange_daemon::proto::MessageState::Delivered);
    }
    assert_eq!(h.node().store().inbox(true).await.unwrap().len(), 1);
    c.shutdown().await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_comes_back_as_a_signed_rejected_receipt() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:local:clinic:emr");
    net.configure(&clinic, &[&hospital], &[&emr], "");
    net.configure(
        &hospital,
        &[&clinic],
        &[],
        "\n[limits]\nmax_envelope_bytes = 2000\n",
    );
    let c = start(&clinic).await;
    let h = start(&hospital).await;
    let mut app = client_of(&net, &clinic, &emr);
    let id = send(
        &mut app,
        referral_start(&[&hospital], &[], "treatment"),
        &[7u8; 10_000],
    )
    .await
    .unwrap();
    let status = wait_status(&mut app, &id, |s| {
        s.state() == exchange_daemon::proto::MessageState::Failed
    })
    .await;
    assert_eq!(status.receipts.len(), 1, "{status:#?}");
    let r = &status.receipts[0];
    assert_eq!(r.issuer, HOSPITAL);
    assert_eq!(
        r.disposition(),
        exchange_daemon::proto::Disposition::Rejected
    );
    assert_eq!(r.reason, "oversize");
    assert!(!r.provision_boundary, "a refusal passes no responsibility");
    assert_eq!(
        status.provisions[0].provision(),
        exchange_daemon::proto::ProvisionState::Rejected
    );
    assert_eq!(
        status.hops[0].state(),
        exchange_daemon::proto::HopDeliveryState::Failed
    );
    assert_eq!(status.hops[0].attempts, 1, "a refusal is not retried");
    // The evidence verifies offline.
    let receipt = SignedReceipt::from_bytes(&r.signed)
        .unwrap()
        .verify(&trust(&net))
        .unwrap();
    assert_eq!(
        receipt.disposition(),
        &exchange_core::receipt::Disposition::Rejected("oversize".into())
    );
    assert!(h.node().store().inbox(true).await.unwrap().is_empty());
    c.shutdown().await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_served_on_both_listeners() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    let net = Net::new();
    let hospital = net.party("hospital", HOSPITAL);
    let clinic = net.party("clinic", CLINIC);
    let his = net.client("his", "urn:local:hospital:his");
    net.configure(&hospital, &[&clinic], &[&his], "");
    let h = start(&hospital).await;
    let channel = |addr: String, id: exchange_daemon::tls::TlsIdentity| {
        let trust = exchange_core::trust::TrustStore::builder()
            .anchors_pem(&std::fs::read(net.path("ca.pem")).unwrap())
            .unwrap()
            .build()
            .unwrap();
        let config = exchange_daemon::tls::client_config(
            std::sync::Arc::new(trust),
            hospital.party(),
            Some(&id),
            exchange_daemon::tls::versions(false),
        )
        .unwrap();
        exchange_daemon::tls::channel(&addr, config, Duration::from_secs(5)).unwrap()
    };
    let service = |name: &str| HealthCheckRequest {
        service: name.to_owned(),
    };
    let mut peer = HealthClient::new(channel(hospital.peer_addr(), clinic.tls_identity()));
    let local = exchange_daemon::tls::TlsIdentity::from_pem(
        &std::fs::read(&his.cert).unwrap(),
        &std::fs::read(&his.key).unwrap(),
    )
    .unwrap();
    let mut client = HealthClient::new(channel(hospital.client_addr(), local));
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    for (c, name) in [
        (&mut peer, "exchange.v1.Peer"),
        (&mut client, "exchange.v1.Client"),
    ] {
        let r = c.check(service(name)).await.unwrap().into_inner();
        assert_eq!(r.status, serving, "{name}");
    }
    // A service the daemon does not offer is unknown, not serving.
    let err = peer
        .check(service("exchange.v1.Nothing"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sees_only_the_messages_it_sent() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    // The harness names both clients "app": ownership must not go by name.
    let emr = net.client("emr", "urn:local:clinic:emr");
    let billing = net.client("billing", "urn:local:clinic:billing");
    net.configure(&clinic, &[&hospital], &[&emr, &billing], "");
    let c = start(&clinic).await;
    let mut app = client_of(&net, &clinic, &emr);
    let id = send(
        &mut app,
        referral_start(&[&hospital], &[], "treatment"),
        b"x",
    )
    .await
    .unwrap();
    let request = || exchange_daemon::proto::StatusRequest {
        message_id: id.clone(),
    };
    assert!(app.status(request()).await.is_ok());
    let mut other = client_of(&net, &clinic, &billing);
    let err = other.status(request()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = other.watch_status(request()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_sends_share_one_client_connection() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:local:clinic:emr");
    net.configure(&clinic, &[&hospital], &[&emr], "");
    net.configure(&hospital, &[&clinic], &[], "");
    let c = start(&clinic).await;
    let h = start(&hospital).await;
    let app = client_of(&net, &clinic, &emr);
    let mut tasks = Vec::new();
    for i in 0..300u32 {
        let mut app = app.clone();
        let to = hospital.clone();
        tasks.push(tokio::spawn(async move {
            send(
                &mut app,
                referral_start(&[&to], &[], "treatment"),
                &i.to_be_bytes(),
            )
            .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while c.node().store().pending_count().await.unwrap() > 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(h.node().store().inbox(true).await.unwrap().len(), 300);
    c.shutdown().await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undeliverable_message_fails_with_the_reason_when_it_expires() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:local:clinic:emr");
    net.configure(&clinic, &[&hospital], &[&emr], "");
    // The hospital never starts.
    let c = start(&clinic).await;
    let mut app = client_of(&net, &clinic, &emr);
    let mut start_msg = referral_start(&[&hospital], &[], "treatment");
    start_msg.lifetime_seconds = 2;
    let id = send(&mut app, start_msg, b"lab result").await.unwrap();
    let status = wait_status(&mut app, &id, |s| {
        s.state() != exchange_daemon::proto::MessageState::Pending
    })
    .await;
    assert_eq!(
        status.state(),
        exchange_daemon::proto::MessageState::Failed,
        "{status:#?}"
    );
    let hop = &status.hops[0];
    assert_eq!(
        hop.state(),
        exchange_daemon::proto::HopDeliveryState::Failed
    );
    assert!(hop.attempts >= 2, "retried before giving up: {hop:?}");
    assert!(
        hop.last_error.starts_with("expired") && hop.last_error.contains("transport"),
        "the reason names expiry and the last error: {hop:?}"
    );
    assert!(status.receipts.is_empty());
    assert_eq!(c.node().store().pending_count().await.unwrap(), 0);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returned_receipts_are_taken_only_from_the_next_hop_and_for_this_message() {
    use exchange_daemon::error::status_reason;
    use exchange_daemon::proto::ReturnReceiptsRequest;

    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let other = net.party("other", OTHER);
    let emr = net.client("emr", "urn:local:clinic:emr");
    net.configure(&clinic, &[&hospital], &[&emr], "");
    net.configure(&hospital, &[&clinic], &[], "");
    let c = start(&clinic).await;
    let h = start(&hospital).await;
    let mut app = client_of(&net, &clinic, &emr);
    let first = send(
        &mut app,
        referral_start(&[&hospital], &[], "treatment"),
        b"one",
    )
    .await
    .unwrap();
    let second = send(
        &mut app,
        referral_start(&[&hospital], &[], "treatment"),
        b"two",
    )
    .await
    .unwrap();
    let status = wait_status(&mut app, &first, |s| {
        s.state() == exchange_daemon::proto::MessageState::Delivered
    })
    .await;
    wait_status(&mut app, &second, |s| {
        s.state() == exchange_daemon::proto::MessageState::Delivered
    })
    .await;
    let receipt_of_first = status.receipts[0].signed.clone();

    // A party not after the clinic on the route: refused, nothing kept.
    let mut outsider = peer_client(&net, &clinic, &other.tls_identity());
    let err = outsider
        .return_receipts(ReturnReceiptsRequest {
            message_id: first.clone(),
            receipts: vec![receipt_of_first.clone()],
        })
        .await
        .unwrap_err();
    assert_eq!(status_reason(&err), Some("identity-mismatch"), "{err:?}");

    // The right hop, but a receipt that belongs to another message.
    let mut hop = peer_client(&net, &clinic, &hospital.tls_identity());
    let err = hop
        .return_receipts(ReturnReceiptsRequest {
            message_id: second.clone(),
            receipts: vec![receipt_of_first.clone()],
        })
        .await
        .unwrap_err();
    assert_eq!(status_reason(&err), Some("receipt-mismatch"), "{err:?}");

    // Neither left a trace; the same receipt for its own message is a duplicate.
    let s = wait_status(&mut app, &second, |_| true).await;
    assert_eq!(s.receipts.len(), 1);
    let stored = hop
        .return_receipts(ReturnReceiptsRequest {
            message_id: first.clone(),
            receipts: vec![receipt_of_first],
        })
        .await
        .unwrap()
        .into_inner()
        .stored;
    assert_eq!(stored, 0, "already kept once");
    c.shutdown().await;
    h.shutdown().await;
}
