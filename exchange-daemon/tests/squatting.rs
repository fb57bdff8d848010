//! A received envelope is identified by its sender and its message id
//! together (with its header digest): another sender's envelope under the
//! same id must not make a recipient or a relay refuse the genuine one.
//! Real daemons on loopback, real mutual TLS, real stores.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::convert::Infallible;
use std::time::{Duration, SystemTime};

use common::*;
use exchange_core::MessageId;
use exchange_core::envelope::{EnvelopeHead, SealerBuilder};
use exchange_core::identity::Certificate;
use exchange_core::receipt::{Disposition, SignedReceipt};
use exchange_core::route::{Hop, HopRole};
use exchange_core::trust::TrustStore;
use exchange_daemon::error::{RECEIPT_METADATA, status_reason};
use exchange_daemon::proto::client_client::ClientClient;
use exchange_daemon::proto::{
    AckRequest, FetchRequest, ListInboxRequest, MessageStatus, fetch_response,
};
use tonic::Code;
use tonic::transport::Channel;

/// A random-number source whose first 16 bytes are a chosen message id
/// (the sealer draws the id first), then the system's randomness: seals an
/// envelope of one's own under someone else's id, as a squatter would.
struct ChosenId {
    id: Option<[u8; 16]>,
    rest: rand_core::UnwrapErr<getrandom::SysRng>,
}

impl rand_core::TryRng for ChosenId {
    type Error = Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(rand_core::Rng::next_u32(&mut self.rest))
    }
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(rand_core::Rng::next_u64(&mut self.rest))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        match self.id.take() {
            Some(id) if dst.len() == 16 => dst.copy_from_slice(&id),
            other => {
                self.id = other;
                rand_core::Rng::fill_bytes(&mut self.rest, dst);
            }
        }
        Ok(())
    }
}

impl rand_core::TryCryptoRng for ChosenId {}

/// Seals `payload` as `sender` to `to` (THIRD_PARTY), through `relay`
/// (ENTRUSTED) if given, under message id `id`.
fn seal_with_id(
    net: &Net,
    sender: &Party,
    relay: Option<&Party>,
    to: &Party,
    id: MessageId,
    payload: &[u8],
) -> (EnvelopeHead, Vec<u8>) {
    let identity = sender.identity();
    let trust = TrustStore::builder()
        .anchors_pem(&std::fs::read(net.path("ca.pem")).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let cert = Certificate::from_pem(&std::fs::read(to.file("encryption.pem")).unwrap())
        .unwrap()
        .remove(0);
    let key = trust.verify_encryption(&cert, SystemTime::now()).unwrap();
    let mut builder = SealerBuilder::new(&identity, "application/pdf")
        .recipient(key, HopRole::ThirdParty)
        .purpose("treatment")
        .lifetime(Duration::from_secs(3600));
    if let Some(r) = relay {
        builder = builder.relay(Hop {
            party: r.party(),
            role: HopRole::Entrusted,
        });
    }
    let mut rng = ChosenId {
        id: Some(*id.as_bytes()),
        rest: rand_core::UnwrapErr(getrandom::SysRng),
    };
    let mut sealer = builder.start(SystemTime::now(), &mut rng).unwrap();
    assert_eq!(sealer.message_id(), id, "sealed under the chosen id");
    let mut ct = Vec::new();
    sealer.update(payload, &mut ct);
    let head = sealer.finish(&mut ct);
    (head, ct)
}

fn fetch_request(id: MessageId, sender: Option<&str>) -> FetchRequest {
    FetchRequest {
        message_id: id.as_bytes().to_vec(),
        sender: sender.unwrap_or_default().to_owned(),
    }
}

/// Fetches to the end: the sender the daemon names, and the plaintext.
async fn fetch(
    app: &mut ClientClient<Channel>,
    id: MessageId,
    sender: Option<&str>,
) -> Result<(String, Vec<u8>), tonic::Status> {
    let mut stream = app.fetch(fetch_request(id, sender)).await?.into_inner();
    let mut from = None;
    let mut data = Vec::new();
    while let Some(m) = stream.message().await? {
        match m.part.unwrap() {
            fetch_response::Part::Header(h) => from = Some(h.sender),
            fetch_response::Part::Chunk(c) => data.extend_from_slice(&c),
        }
    }
    Ok((from.unwrap(), data))
}

/// Waits until the status is final for this test: delivered (or more), or
/// refused (REJECTED/FAILED).
async fn settled(
    app: &mut ClientClient<Channel>,
    id: &[u8],
    target: exchange_daemon::proto::MessageState,
) -> MessageStatus {
    wait_status(app, id, |s| {
        s.state() == target
            || s.state() == exchange_daemon::proto::MessageState::Failed
            || s.state() == exchange_daemon::proto::MessageState::Processed
    })
    .await
}

/// Waits until the origin's first attempt to its first hop has failed
/// (that hop is down).
async fn first_attempt_failed(app: &mut ClientClient<Channel>, id: &[u8]) {
    wait_status(app, id, |s| s.hops.first().is_some_and(|h| h.attempts >= 1)).await;
}

/// Inbox items (id, sender) of `app`.
async fn inbox(app: &mut ClientClient<Channel>) -> Vec<(Vec<u8>, String)> {
    app.list_inbox(ListInboxRequest {
        include_acked: true,
        ..ListInboxRequest::default()
    })
    .await
    .unwrap()
    .into_inner()
    .items
    .into_iter()
    .map(|i| (i.message_id, i.sender))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_senders_envelope_under_a_pending_id_does_not_block_the_genuine_one() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC); // A
    let other = net.party("other", OTHER); // B, the squatter
    let hospital = net.party("hospital", HOSPITAL); // C
    let emr = net.client("emr", "urn:local:clinic:emr");
    let his = net.client("his", "urn:local:hospital:his");
    net.configure(&clinic, &[&hospital], &[&emr], "");
    net.configure(&hospital, &[&clinic, &other], &[&his], "");

    // A sends to C while C is down; A stops before it can retry.
    let c_daemon = start(&clinic).await;
    let mut emr_app = client_of(&net, &clinic, &emr);
    let genuine = b"genuine referral from the clinic".to_vec();
    let raw_id = send(
        &mut emr_app,
        referral_start(&[&hospital], &[], "treatment"),
        &genuine,
    )
    .await
    .unwrap();
    let id = MessageId::from_slice(&raw_id).unwrap();
    first_attempt_failed(&mut emr_app, &raw_id).await;
    c_daemon.shutdown().await;

    // C comes up; B seals its own envelope to C under A's id and delivers it first.
    let h = start(&hospital).await;
    let squat = b"squatter's envelope".to_vec();
    let (head_b, ct_b) = seal_with_id(&net, &other, None, &hospital, id, &squat);
    let mut from_b = peer_client(&net, &hospital, &other.tls_identity());
    let receipt_b = deliver(&mut from_b, &head_b, &ct_b).await.unwrap();
    let receipt_b = SignedReceipt::from_bytes(&receipt_b)
        .unwrap()
        .verify(&net_trust(&net))
        .unwrap();
    assert_eq!(receipt_b.disposition(), &Disposition::Delivered);

    // A comes back and retries: its genuine envelope is delivered.
    let c_daemon = start(&clinic).await;
    let mut emr_app = client_of(&net, &clinic, &emr);
    let status = settled(
        &mut emr_app,
        &raw_id,
        exchange_daemon::proto::MessageState::Delivered,
    )
    .await;
    assert_eq!(
        status.state(),
        exchange_daemon::proto::MessageState::Delivered,
        "{status:#?}"
    );
    let c_receipt = status
        .receipts
        .iter()
        .find(|r| r.issuer == HOSPITAL)
        .unwrap();
    assert_eq!(
        c_receipt.disposition(),
        exchange_daemon::proto::Disposition::Delivered
    );

    // C's inbox holds both, each under its own sender.
    let mut his_app = client_of(&net, &hospital, &his);
    let mut items = inbox(&mut his_app).await;
    items.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        items,
        vec![
            (raw_id.clone(), CLINIC.to_owned()),
            (raw_id.clone(), OTHER.to_owned())
        ]
    );

    // Without the sender the id is ambiguous: refused, nothing picked.
    let e = fetch(&mut his_app, id, None).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(status_reason(&e), Some("ambiguous-id"), "{e:?}");
    let e = his_app
        .ack(AckRequest {
            message_id: raw_id.clone(),
            sender: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status_reason(&e), Some("ambiguous-id"), "{e:?}");

    // With the sender, each gets its own bytes.
    let (from, data) = fetch(&mut his_app, id, Some(CLINIC)).await.unwrap();
    assert_eq!((from.as_str(), data), (CLINIC, genuine));
    let (from, data) = fetch(&mut his_app, id, Some(OTHER)).await.unwrap();
    assert_eq!((from.as_str(), data), (OTHER, squat));

    // A's acknowledgement reaches A; B's PROCESSED does not touch A's status.
    his_app
        .ack(AckRequest {
            message_id: raw_id.clone(),
            sender: CLINIC.to_owned(),
        })
        .await
        .unwrap();
    let status = settled(
        &mut emr_app,
        &raw_id,
        exchange_daemon::proto::MessageState::Processed,
    )
    .await;
    assert_eq!(
        status.state(),
        exchange_daemon::proto::MessageState::Processed,
        "{status:#?}"
    );
    his_app
        .ack(AckRequest {
            message_id: raw_id.clone(),
            sender: OTHER.to_owned(),
        })
        .await
        .unwrap();
    let status = settled(
        &mut emr_app,
        &raw_id,
        exchange_daemon::proto::MessageState::Processed,
    )
    .await;
    assert!(
        status.receipts.iter().all(|r| r.reason.is_empty()),
        "{status:#?}"
    );

    c_daemon.shutdown().await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_forwards_both_envelopes_and_matches_their_receipts() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC); // A
    let other = net.party("other", OTHER); // B, the squatter
    let agent = net.party("agent", AGENT); // the relay
    let payer = net.party("payer", PAYER); // C
    let emr = net.client("emr", "urn:local:clinic:emr");
    let intake = net.client("intake", "urn:local:payer:intake");
    net.configure_roles(
        &clinic,
        &[&agent, &payer],
        &[&emr],
        "",
        &[(&agent, "entrusted")],
    );
    net.configure_roles(
        &agent,
        &[&clinic, &other, &payer],
        &[],
        "",
        &[(&clinic, "entrusted"), (&other, "entrusted")],
    );
    net.configure(&payer, &[&agent], &[&intake], "");

    // A sends through the agent while the agent is down, then stops.
    let c_daemon = start(&clinic).await;
    let mut emr_app = client_of(&net, &clinic, &emr);
    let genuine = b"claim from the clinic".to_vec();
    let relay = format!("{AGENT}=entrusted");
    let raw_id = send(
        &mut emr_app,
        referral_start(&[&payer], &[relay.as_str()], "treatment"),
        &genuine,
    )
    .await
    .unwrap();
    let id = MessageId::from_slice(&raw_id).unwrap();
    first_attempt_failed(&mut emr_app, &raw_id).await;
    c_daemon.shutdown().await;

    // B's envelope under A's id goes through the agent to the payer first.
    let a = start(&agent).await;
    let p = start(&payer).await;
    let squat = b"squatter's claim".to_vec();
    let (head_b, ct_b) = seal_with_id(&net, &other, Some(&agent), &payer, id, &squat);
    let mut from_b = peer_client(&net, &agent, &other.tls_identity());
    let receipt_b = deliver(&mut from_b, &head_b, &ct_b).await.unwrap();
    let receipt_b = SignedReceipt::from_bytes(&receipt_b)
        .unwrap()
        .verify(&net_trust(&net))
        .unwrap();
    assert_eq!(receipt_b.disposition(), &Disposition::AcceptedForRelay);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while p.node().store().inbox(true).await.unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "B's never reached C"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A retries: the agent takes it, the payer gets it, the payer's
    // DELIVERED comes back to A.
    let c_daemon = start(&clinic).await;
    let mut emr_app = client_of(&net, &clinic, &emr);
    let status = settled(
        &mut emr_app,
        &raw_id,
        exchange_daemon::proto::MessageState::Delivered,
    )
    .await;
    assert_eq!(
        status.state(),
        exchange_daemon::proto::MessageState::Delivered,
        "{status:#?}"
    );
    assert_eq!(a.node().store().messages_by_id(id).await.unwrap().len(), 2);

    let mut intake_app = client_of(&net, &payer, &intake);
    let mut items = inbox(&mut intake_app).await;
    items.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        items,
        vec![
            (raw_id.clone(), CLINIC.to_owned()),
            (raw_id.clone(), OTHER.to_owned())
        ]
    );
    let (_, data) = fetch(&mut intake_app, id, Some(OTHER)).await.unwrap();
    assert_eq!(data, squat);
    let (_, data) = fetch(&mut intake_app, id, Some(CLINIC)).await.unwrap();
    assert_eq!(data, genuine);

    // PROCESSED receipts travel back through the agent, each to its own
    // message: B's first, which must not reach A.
    intake_app
        .ack(AckRequest {
            message_id: raw_id.clone(),
            sender: OTHER.to_owned(),
        })
        .await
        .unwrap();
    intake_app
        .ack(AckRequest {
            message_id: raw_id.clone(),
            sender: CLINIC.to_owned(),
        })
        .await
        .unwrap();
    let status = settled(
        &mut emr_app,
        &raw_id,
        exchange_daemon::proto::MessageState::Processed,
    )
    .await;
    assert_eq!(
        status.state(),
        exchange_daemon::proto::MessageState::Processed,
        "{status:#?}"
    );
    assert_eq!(status.receipts.len(), 3, "{status:#?}");
    // Both PROCESSED receipts reached the agent, each kept with its own message.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut per_message = Vec::new();
        for m in a.node().store().messages_by_id(id).await.unwrap() {
            let receipts = a.node().store().receipts(m.key).await.unwrap();
            let ok = receipts.iter().all(|r| {
                let v = SignedReceipt::from_bytes(&r.signed)
                    .unwrap()
                    .verify(&net_trust(&net))
                    .unwrap();
                v.header_sha256() == &m.header_sha256
            });
            assert!(ok, "a receipt kept with the wrong message");
            per_message.push(
                receipts
                    .iter()
                    .filter(|r| r.disposition == "PROCESSED")
                    .count(),
            );
        }
        if per_message == [1, 1] {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{per_message:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    c_daemon.shutdown().await;
    a.shutdown().await;
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_sender_under_the_same_id_is_a_replay_or_a_redelivery() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let other = net.party("other", OTHER);
    let hospital = net.party("hospital", HOSPITAL);
    let his = net.client("his", "urn:local:hospital:his");
    net.configure(&hospital, &[&clinic, &other], &[&his], "");
    let h = start(&hospital).await;
    let id = MessageId::from_bytes([0x5a; 16]);

    let mut from_b = peer_client(&net, &hospital, &other.tls_identity());
    let (first, ct_first) = seal_with_id(&net, &other, None, &hospital, id, b"first");
    let original = deliver(&mut from_b, &first, &ct_first).await.unwrap();

    // Another head from the same sender under the same id: a replay.
    let (second, ct_second) = seal_with_id(&net, &other, None, &hospital, id, b"second");
    let e = deliver(&mut from_b, &second, &ct_second).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert_eq!(status_reason(&e), Some("replay"), "{e:?}");
    let rejected = e
        .metadata()
        .get_bin(RECEIPT_METADATA)
        .unwrap()
        .to_bytes()
        .unwrap();
    let rejected = SignedReceipt::from_bytes(&rejected)
        .unwrap()
        .verify(&net_trust(&net))
        .unwrap();
    assert_eq!(
        rejected.disposition(),
        &Disposition::Rejected("replay".into())
    );

    // The very same envelope again: the original receipt, byte for byte.
    let again = deliver(&mut from_b, &first, &ct_first).await.unwrap();
    assert_eq!(again, original);

    // Still one envelope from B; another sender's id reuse is its own.
    let (from_a, ct_a) = seal_with_id(&net, &clinic, None, &hospital, id, b"clinic's");
    let mut peer_a = peer_client(&net, &hospital, &clinic.tls_identity());
    let receipt_a = deliver(&mut peer_a, &from_a, &ct_a).await.unwrap();
    assert_ne!(receipt_a, original);
    let stored = h.node().store().messages_by_id(id).await.unwrap();
    assert_eq!(stored.len(), 2);
    let mut app = client_of(&net, &hospital, &his);
    let (_, data) = fetch(&mut app, id, Some(OTHER)).await.unwrap();
    assert_eq!(data, b"first");
    let (_, data) = fetch(&mut app, id, Some(CLINIC)).await.unwrap();
    assert_eq!(data, b"clinic's");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_record_answers_its_sender_and_no_other() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let other = net.party("other", OTHER);
    let hospital = net.party("hospital", HOSPITAL);
    let his = net.client("his", "urn:local:hospital:his");
    net.configure(&hospital, &[&clinic, &other], &[&his], "");
    let h = start(&hospital).await;
    let id = MessageId::from_bytes([0xa5; 16]);

    // The clinic's envelope is delivered, fetched, then purged.
    let (genuine, ct) = seal_with_id(&net, &clinic, None, &hospital, id, b"genuine");
    let mut from_a = peer_client(&net, &hospital, &clinic.tls_identity());
    let original = deliver(&mut from_a, &genuine, &ct).await.unwrap();
    let mut app = client_of(&net, &hospital, &his);
    fetch(&mut app, id, None).await.unwrap();
    h.shutdown().await;
    net.configure(
        &hospital,
        &[&clinic, &other],
        &[&his],
        "\n[retention]\nmessages_days = 0\n",
    );
    let h = start(&hospital).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !h
        .node()
        .store()
        .messages_by_id(id)
        .await
        .unwrap()
        .is_empty()
    {
        assert!(tokio::time::Instant::now() < deadline, "never purged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The genuine sender's redelivery: the original receipt, nothing stored.
    let mut from_a = peer_client(&net, &hospital, &clinic.tls_identity());
    let again = deliver(&mut from_a, &genuine, &ct).await.unwrap();
    assert_eq!(again, original);
    assert!(
        h.node()
            .store()
            .messages_by_id(id)
            .await
            .unwrap()
            .is_empty()
    );

    // Another sender's envelope under that id is its own: stored, DELIVERED.
    let (squat, ct_squat) = seal_with_id(&net, &other, None, &hospital, id, b"squat");
    let mut from_b = peer_client(&net, &hospital, &other.tls_identity());
    let receipt_b = deliver(&mut from_b, &squat, &ct_squat).await.unwrap();
    let receipt_b = SignedReceipt::from_bytes(&receipt_b)
        .unwrap()
        .verify(&net_trust(&net))
        .unwrap();
    assert_eq!(receipt_b.disposition(), &Disposition::Delivered);
    let stored = h.node().store().messages_by_id(id).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].sender.as_str(), OTHER);
    let mut app = client_of(&net, &hospital, &his);
    let (from, data) = fetch(&mut app, id, None).await.unwrap();
    assert_eq!((from.as_str(), data.as_slice()), (OTHER, &b"squat"[..]));

    // And the genuine sender's other head under that id is still a replay.
    let (second, ct_second) = seal_with_id(&net, &clinic, None, &hospital, id, b"second");
    let e = deliver(&mut from_a, &second, &ct_second).await.unwrap_err();
    assert_eq!(status_reason(&e), Some("replay"), "{e:?}");
    h.shutdown().await;
}
