//! Exactly-once delivery across a retention purge, bounded envelope
//! lifetimes, and what the purge must keep, on real daemons over mutual TLS
//! with real stores. The purge runs when a daemon starts (and every minute),
//! so each test restarts a daemon to run it.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use exchange_core::MessageId;
use exchange_core::audit::{AuditAction, AuditEntry, AuditOutcome};
use exchange_core::receipt::{Disposition, SignedReceipt};
use exchange_daemon::error::{RECEIPT_METADATA, status_reason};
use exchange_daemon::proto::{FetchRequest, ListInboxRequest};
use exchange_daemon::{Config, Daemon};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

const DAY_MS: u64 = 86_400_000;

fn id_of(head: &exchange_core::envelope::EnvelopeHead) -> MessageId {
    head.header_unverified().unwrap().message_id
}

/// Fetches an inbox item to its end; returns the plaintext length.
async fn fetch_all(
    app: &mut exchange_daemon::proto::client_client::ClientClient<Channel>,
    id: MessageId,
) -> usize {
    let mut stream = app
        .fetch(FetchRequest {
            message_id: id.as_bytes().to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(part) = stream.next().await {
        if let Some(exchange_daemon::proto::fetch_response::Part::Chunk(c)) = part.unwrap().part {
            n += c.len();
        }
    }
    n
}

/// Waits until `id` is gone from `daemon`'s store.
async fn wait_purged(daemon: &Daemon, id: MessageId) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while daemon
        .node()
        .store()
        .messages_by_id(id)
        .await
        .unwrap()
        .len()
        == 1
    {
        assert!(tokio::time::Instant::now() < deadline, "never purged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The audit log of `party`'s store (read-only).
fn audit_log(party: &Party) -> Vec<AuditEntry> {
    audit_entries(party)
        .iter()
        .map(|e| AuditEntry::from_json(e.as_bytes()).unwrap())
        .collect()
}

/// Purge entries with `outcome`.
fn purges(party: &Party, outcome: AuditOutcome) -> Vec<AuditEntry> {
    audit_log(party)
        .into_iter()
        .filter(|e| e.action == AuditAction::Purge && e.outcome == outcome)
        .collect()
}

/// Waits until the purge has run since `daemon` started: the maintenance
/// loop purges, then signs a checkpoint over every entry appended before
/// it, and `start` returned only after appending its own entry.
async fn purge_ran(party: &Party) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        // One snapshot: the count and the checkpoints of one state.
        let store = read_store(party);
        let entries = i64::try_from(store.audit_len().unwrap().unwrap()).unwrap();
        let covered = store
            .checkpoints()
            .unwrap()
            .last()
            .map_or(0, |c| c.tree_size);
        if covered > 0 && covered == entries {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no checkpoint after the purge"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_after_a_purge_returns_the_original_receipt_and_stores_nothing() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let his = net.client("his", "urn:local:hospital:his");
    net.configure(&hospital, &[&clinic], &[&his], "");
    let h = start(&hospital).await;
    let mut peer = peer_client(&net, &hospital, &clinic.tls_identity());
    let (head, ct) = seal_now(&net, &clinic, &hospital, b"referral letter");
    let id = id_of(&head);
    let original = deliver(&mut peer, &head, &ct).await.unwrap();
    let mut app = client_of(&net, &hospital, &his);
    assert_eq!(fetch_all(&mut app, id).await, b"referral letter".len());
    h.shutdown().await;

    net.configure(
        &hospital,
        &[&clinic],
        &[&his],
        "\n[retention]\nmessages_days = 0\n",
    );
    let h = start(&hospital).await;
    wait_purged(&h, id).await;

    // The envelope is still valid for an hour: a sender that did not see
    // our receipt delivers it again.
    let mut peer = peer_client(&net, &hospital, &clinic.tls_identity());
    let again = deliver(&mut peer, &head, &ct).await.unwrap();
    assert_eq!(again, original, "the original verdict, not a new receipt");
    assert!(
        h.node()
            .store()
            .messages_by_id(id)
            .await
            .unwrap()
            .is_empty()
    );
    let mut app = client_of(&net, &hospital, &his);
    let inbox = app
        .list_inbox(ListInboxRequest {
            include_acked: true,
            ..ListInboxRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(inbox.items.is_empty(), "{inbox:?}");
    assert_eq!(store_counts(&hospital).messages, 0);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_lifetime_is_bounded_on_send_and_on_receive() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:local:clinic:emr");
    net.configure(&clinic, &[&hospital], &[&emr], "");
    net.configure(&hospital, &[&clinic], &[], "");
    let c = start(&clinic).await;
    let h = start(&hospital).await;

    // Send: the default maximum is 30 days.
    let mut app = client_of(&net, &clinic, &emr);
    let mut too_long = referral_start(&[&hospital], &[], "treatment");
    too_long.lifetime_seconds = 31 * 86_400;
    let e = send(&mut app, too_long, b"x").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(status_reason(&e), Some("lifetime-too-long"), "{e:?}");
    assert_eq!(store_counts(&clinic).messages, 0);
    let mut ok = referral_start(&[&hospital], &[], "treatment");
    ok.lifetime_seconds = 30 * 86_400;
    let id = send(&mut app, ok, b"x").await.unwrap();
    wait_status(&mut app, &id, |s| {
        s.state() == exchange_daemon::proto::MessageState::Delivered
    })
    .await;

    // Receive: an envelope declaring more is refused with a REJECTED receipt.
    let mut peer = peer_client(&net, &hospital, &clinic.tls_identity());
    let (head, ct) = seal_to(
        &net,
        &clinic,
        &hospital,
        "treatment",
        b"y",
        SystemTime::now(),
        Duration::from_secs(365 * 86_400),
    );
    let e = deliver(&mut peer, &head, &ct).await.unwrap_err();
    assert_eq!(status_reason(&e), Some("lifetime-too-long"), "{e:?}");
    let receipt = SignedReceipt::from_bytes(
        &e.metadata()
            .get_bin(RECEIPT_METADATA)
            .expect("a REJECTED receipt")
            .to_bytes()
            .unwrap(),
    )
    .unwrap()
    .verify(&net_trust(&net))
    .unwrap();
    assert_eq!(
        receipt.disposition(),
        &Disposition::Rejected("lifetime-too-long".into())
    );
    assert!(
        h.node()
            .store()
            .messages_by_id(id_of(&head))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store_counts(&hospital).messages, 1);
    c.shutdown().await;
    h.shutdown().await;

    // A configured maximum applies to both, and a default above it is a
    // configuration error.
    let text = std::fs::read_to_string(clinic.config_path())
        .unwrap()
        .replace(
            "[delivery]\n",
            "[delivery]\ndefault_lifetime_seconds = 600\nmax_lifetime_seconds = 3600\n",
        );
    std::fs::write(clinic.config_path(), &text).unwrap();
    let c = start(&clinic).await;
    let mut app = client_of(&net, &clinic, &emr);
    let mut hours = referral_start(&[&hospital], &[], "treatment");
    hours.lifetime_seconds = 7200;
    let e = send(&mut app, hours, b"z").await.unwrap_err();
    assert_eq!(status_reason(&e), Some("lifetime-too-long"), "{e:?}");
    c.shutdown().await;
    let text = text.replace(
        "default_lifetime_seconds = 600",
        "default_lifetime_seconds = 7200",
    );
    assert!(matches!(
        Config::parse(&text, &clinic.dir),
        Err(exchange_daemon::Error::Config(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_keeps_unfetched_inbox_items_and_messages_awaiting_receipts() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let agent = net.party("agent", AGENT);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:local:clinic:emr");
    let his = net.client("his", "urn:local:hospital:his");
    let purge_now = "\n[retention]\nmessages_days = 0\n";
    net.configure(&clinic, &[&agent, &hospital], &[&emr], "");
    net.configure(&agent, &[&clinic, &hospital], &[], "");
    net.configure(&hospital, &[&agent], &[&his], "");
    let c = start(&clinic).await;
    let a = start(&agent).await;

    // Sent through the agent while the hospital is down: the clinic's
    // delivery is done (the agent took custody), the hospital's DELIVERED
    // receipt is still to come.
    let mut app = client_of(&net, &clinic, &emr);
    let id = send(
        &mut app,
        referral_start(&[&hospital], &[AGENT], "treatment"),
        b"referral",
    )
    .await
    .unwrap();
    wait_status(&mut app, &id, |s| {
        s.state() == exchange_daemon::proto::MessageState::Relayed
    })
    .await;
    let mid = MessageId::from_slice(&id).unwrap();
    c.shutdown().await;

    // The purge at start keeps it: a late receipt needs it.
    net.configure(&clinic, &[&agent, &hospital], &[&emr], purge_now);
    let c = start(&clinic).await;
    purge_ran(&clinic).await;
    assert!(c.node().store().messages_by_id(mid).await.unwrap().len() == 1);

    // The hospital comes up; its receipt arrives and is kept.
    let h = start(&hospital).await;
    let mut app = client_of(&net, &clinic, &emr);
    wait_status(&mut app, &id, |s| {
        s.state() == exchange_daemon::proto::MessageState::Delivered
    })
    .await;
    assert!(h.node().store().messages_by_id(mid).await.unwrap().len() == 1);
    h.shutdown().await;
    c.shutdown().await;

    // Now answered by its recipient: the next purge removes it.
    let c = start(&clinic).await;
    wait_purged(&c, mid).await;
    c.shutdown().await;

    // At the hospital, the inbox item stays until a client fetched it.
    net.configure(&hospital, &[&agent], &[&his], purge_now);
    let h = start(&hospital).await;
    purge_ran(&hospital).await;
    assert!(h.node().store().messages_by_id(mid).await.unwrap().len() == 1);
    let mut his_app = client_of(&net, &hospital, &his);
    assert_eq!(fetch_all(&mut his_app, mid).await, b"referral".len());
    h.shutdown().await;
    let h = start(&hospital).await;
    wait_purged(&h, mid).await;
    h.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_does_nothing_when_the_clock_jumped_far_ahead_of_the_store() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let his = net.client("his", "urn:local:hospital:his");
    net.configure(&hospital, &[&clinic], &[&his], "");
    let h = start(&hospital).await;
    let mut peer = peer_client(&net, &hospital, &clinic.tls_identity());
    let (head, ct) = seal_now(&net, &clinic, &hospital, b"referral");
    let id = id_of(&head);
    deliver(&mut peer, &head, &ct).await.unwrap();
    let mut app = client_of(&net, &hospital, &his);
    fetch_all(&mut app, id).await;
    h.shutdown().await;

    // Seen from the store, the clock has jumped 400 days forward: every
    // time it holds is 400 days before now.
    let shift = 400 * DAY_MS;
    let sql = format!(
        "UPDATE messages SET received_ms = received_ms - {shift}, created_ms = created_ms - {shift}"
    );
    tamper(&hospital, &sql, &sql);
    net.configure(
        &hospital,
        &[&clinic],
        &[&his],
        "\n[retention]\nmessages_days = 30\n",
    );
    let h = start(&hospital).await;
    purge_ran(&hospital).await;
    assert!(
        h.node().store().messages_by_id(id).await.unwrap().len() == 1,
        "purged after a clock jump"
    );
    h.shutdown().await;
    let failed = purges(&hospital, AuditOutcome::Failed);
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].reason.as_deref(), Some("clock-jump"));
    assert!(purges(&hospital, AuditOutcome::Ok).is_empty());

    // Still suspended at the next start: audited once, nothing purged.
    let h = start(&hospital).await;
    purge_ran(&hospital).await;
    assert!(h.node().store().messages_by_id(id).await.unwrap().len() == 1);
    h.shutdown().await;
    assert_eq!(purges(&hospital, AuditOutcome::Failed).len(), 1);

    // The operator accepts the jump (a long downtime): the purge resumes.
    net.configure(
        &hospital,
        &[&clinic],
        &[&his],
        "\n[retention]\nmessages_days = 30\nmax_clock_jump_seconds = 40000000\n",
    );
    let h = start(&hospital).await;
    wait_purged(&h, id).await;
    h.shutdown().await;
    assert_eq!(purges(&hospital, AuditOutcome::Ok).len(), 1);
}

/// Delivers `head` and `ct` as `deliver` does, counting the ciphertext bytes
/// the call took from the stream before the answer came.
async fn deliver_counting(
    peer: &mut exchange_daemon::proto::peer_client::PeerClient<Channel>,
    head: &exchange_core::envelope::EnvelopeHead,
    ct: &[u8],
) -> (Result<Vec<u8>, tonic::Status>, usize) {
    use exchange_daemon::proto::{DeliverRequest, deliver_request};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let taken = Arc::new(AtomicUsize::new(0));
    let mut msgs = vec![DeliverRequest {
        part: Some(deliver_request::Part::Head(head.as_bytes().to_vec())),
    }];
    for c in ct.chunks(256 * 1024) {
        msgs.push(DeliverRequest {
            part: Some(deliver_request::Part::Chunk(c.to_vec())),
        });
    }
    let count = taken.clone();
    let stream = tokio_stream::iter(msgs).map(move |m| {
        if let Some(deliver_request::Part::Chunk(c)) = &m.part {
            count.fetch_add(c.len(), Ordering::SeqCst);
        }
        m
    });
    let r = peer.deliver(stream).await.map(|r| r.into_inner().receipt);
    (r, taken.load(Ordering::SeqCst))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_is_answered_with_the_original_receipt_before_its_body_even_after_expiry() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    net.configure(&hospital, &[&clinic], &[], "");
    let h = start(&hospital).await;
    let mut peer = peer_client(&net, &hospital, &clinic.tls_identity());

    // A 64 MiB study, delivered once; the answer to it is lost, and the
    // sender tries again.
    let study = vec![0x5au8; 64 << 20];
    let (head, ct) = seal_now(&net, &clinic, &hospital, &study);
    let (first, _) = deliver_counting(&mut peer, &head, &ct).await;
    let first = first.unwrap();
    let (again, taken) = deliver_counting(&mut peer, &head, &ct).await;
    assert_eq!(again.unwrap(), first, "the original receipt, byte for byte");
    // The answer came before the body was read: the sender got no further
    // than what HTTP/2 flow control let it push unread (a 2 MiB stream
    // window, plus what was in flight), not 64 MiB.
    assert!(taken < 4 << 20, "{taken} bytes taken before the answer");
    eprintln!("redelivery answered after {taken} of {} bytes", ct.len());

    // A small envelope delivered just before it expires, and redelivered
    // after: the answer is still the original DELIVERED.
    let (head, ct) = seal_to(
        &net,
        &clinic,
        &hospital,
        "treatment",
        b"referral",
        SystemTime::now(),
        Duration::from_secs(2),
    );
    let first = deliver(&mut peer, &head, &ct).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let again = deliver(&mut peer, &head, &ct).await.unwrap();
    assert_eq!(again, first);
    let receipt = SignedReceipt::from_bytes(&again)
        .unwrap()
        .verify(&net_trust(&net))
        .unwrap();
    assert_eq!(receipt.disposition(), &Disposition::Delivered);
    // Each redelivery is in the log; one inbox item each.
    let redeliveries = audit_log(&hospital)
        .into_iter()
        .filter(|e| {
            e.action == AuditAction::Receive
                && e.detail
                    .as_deref()
                    .is_some_and(|d| d.starts_with("redelivery"))
        })
        .count();
    assert_eq!(redeliveries, 2);
    assert_eq!(h.node().store().inbox(true).await.unwrap().len(), 2);
    h.shutdown().await;
}
