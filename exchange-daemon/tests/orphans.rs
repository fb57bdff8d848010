//! Large envelopes (above `limits.inline_ciphertext_bytes`, kept as blob
//! files) whose Deliver or Send stream is reset just as the store takes the
//! ciphertext over: without a restart, `blobs/` must hold only files that
//! rows name, `spool/` nothing, and a retry must store the envelope once.
//! Real daemons, real TLS on loopback, real resets (the calling task is
//! dropped, so the stream is cancelled) at delays spread over the moments
//! after the last slice.
//!
//! On PostgreSQL (`EXCHANGE_TEST_STORE=postgres`) large ciphertexts are
//! chunks in the database, not files: there `blobs/` does not exist, every
//! chunked message's chunks must add up to its length, and `spool/` must
//! be empty all the same.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use exchange_daemon::proto::{DeliverRequest, SendRequest, deliver_request, send_request};

/// Resets per test, at delays from 0 to `TRIALS * STEP` after the last slice.
const TRIALS: u32 = 80;
const STEP: Duration = Duration::from_micros(250);
const LARGE: usize = 300 * 1024;
const INLINE_LIMIT: &str = "\n[limits]\ninline_ciphertext_bytes = 4096\n";

/// The files in `dir` of `party`'s data directory (none if it is missing).
fn files(party: &Party, dir: &str) -> HashSet<String> {
    match std::fs::read_dir(party.data_dir().join(dir)) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
        Err(e) => panic!("{dir}: {e}"),
    }
}

/// The blob files rows name (none on PostgreSQL).
fn named_blobs(party: &Party) -> HashSet<String> {
    read_store(party)
        .named_blobs()
        .unwrap()
        .into_iter()
        .map(|b| b.name)
        .collect()
}

/// Messages whose ciphertext is kept outside their row: blob files on
/// SQLite (counted on disk), chunked on PostgreSQL.
fn large_ciphertexts(party: &Party) -> usize {
    if store_url(party).is_some() {
        usize::try_from(read_store(party).counts().unwrap().blobs).unwrap()
    } else {
        files(party, "blobs").len()
    }
}

/// Chunked messages whose chunks do not add up to their length (none
/// unless chunks were lost; always none on SQLite).
fn incomplete_chunked(party: &Party) -> i64 {
    if store_url(party).is_none() {
        return 0;
    }
    store_ints(
        party,
        "SELECT count(*) FROM messages m WHERE chunked AND ciphertext_len <> \
         (SELECT COALESCE(sum(length(c.data)), 0) FROM blob_chunks c WHERE c.message_id = m.id)",
    )[0]
}

fn outbound(party: &Party) -> u64 {
    let n = store_ints(
        party,
        "SELECT count(*) FROM messages WHERE kind = 'outbound'",
    )[0];
    u64::try_from(n).unwrap()
}

/// Waits (up to 5 s, for transfers still finishing) until `blobs/` holds
/// exactly the files rows name and `spool/` is empty; panics with the
/// difference otherwise.
async fn assert_no_orphans(party: &Party) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let on_disk = files(party, "blobs");
        let named = named_blobs(party);
        let spool = files(party, "spool");
        if on_disk == named && spool.is_empty() {
            assert_eq!(
                incomplete_chunked(party),
                0,
                "{}: chunks missing",
                party.name
            );
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: blobs no row names: {:?}; rows without a blob: {:?}; spool files: {spool:?}",
            party.name,
            on_disk.difference(&named).collect::<Vec<_>>(),
            named.difference(&on_disk).collect::<Vec<_>>(),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits `d` precisely (a timer wheel's millisecond is too coarse here).
async fn pause(d: Duration) {
    tokio::task::spawn_blocking(move || std::thread::sleep(d))
        .await
        .unwrap();
}

/// Streams `msgs` on a call made by `call`, closes the stream after the
/// last one, waits `after` and drops the call (the stream is reset).
async fn reset_after<T, F, Fut, R>(msgs: Vec<T>, after: Duration, call: F)
where
    T: Send + 'static,
    F: FnOnce(tokio_stream::wrappers::ReceiverStream<T>) -> Fut,
    Fut: std::future::Future<Output = R> + Send + 'static,
    R: Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let task = tokio::spawn(call(tokio_stream::wrappers::ReceiverStream::new(rx)));
    for m in msgs {
        if tx.send(m).await.is_err() {
            break;
        }
    }
    drop(tx);
    pause(after).await;
    task.abort();
    let _ = task.await;
}

fn deliver_msgs(head: &exchange_core::envelope::EnvelopeHead, ct: &[u8]) -> Vec<DeliverRequest> {
    let mut msgs = vec![DeliverRequest {
        part: Some(deliver_request::Part::Head(head.as_bytes().to_vec())),
    }];
    for c in ct.chunks(64 * 1024) {
        msgs.push(DeliverRequest {
            part: Some(deliver_request::Part::Chunk(c.to_vec())),
        });
    }
    msgs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deliver_reset_while_its_blob_is_adopted_leaves_no_orphan_and_a_retry_stores_it_once() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    net.configure(&hospital, &[&clinic], &[], INLINE_LIMIT);
    let h = start(&hospital).await;
    let peer = peer_client(&net, &hospital, &clinic.tls_identity());

    let envelopes: Vec<_> = (0..TRIALS)
        .map(|i| {
            let mut payload = vec![0u8; LARGE];
            payload[..4].copy_from_slice(&i.to_be_bytes());
            seal_now(&net, &clinic, &hospital, &payload)
        })
        .collect();
    for (i, (head, ct)) in envelopes.iter().enumerate() {
        let mut peer = peer.clone();
        reset_after(deliver_msgs(head, ct), STEP * i as u32, |s| async move {
            peer.deliver(s).await
        })
        .await;
    }
    let reset_stored = h.node().store().inbox(true).await.unwrap().len();
    assert_no_orphans(&hospital).await;

    // The retries: each envelope stored once, each blob named once; a
    // second retry gets the very same receipt.
    let mut peer = peer.clone();
    for (head, ct) in &envelopes {
        let first = deliver(&mut peer, head, ct).await.unwrap();
        let again = deliver(&mut peer, head, ct).await.unwrap();
        assert_eq!(first, again);
    }
    assert_eq!(
        h.node().store().inbox(true).await.unwrap().len(),
        TRIALS as usize
    );
    assert_no_orphans(&hospital).await;
    assert_eq!(large_ciphertexts(&hospital), TRIALS as usize);
    eprintln!("{reset_stored} of {TRIALS} reset deliveries were stored before the retries");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_reset_while_its_blob_is_adopted_leaves_no_orphan_and_a_retry_stores_it_once() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:local:clinic:emr");
    // The hospital stays down: the sent messages simply wait.
    net.configure(&clinic, &[&hospital], &[&emr], INLINE_LIMIT);
    let c = start(&clinic).await;
    let app = client_of(&net, &clinic, &emr);
    let requests = |i: u32| {
        let mut start = referral_start(&[&hospital], &[], "treatment");
        start.idempotency_key = format!("reset-{i}");
        start.size_hint = LARGE as u64;
        let mut payload = vec![0u8; LARGE];
        payload[..4].copy_from_slice(&i.to_be_bytes());
        let mut msgs = vec![SendRequest {
            part: Some(send_request::Part::Start(start)),
        }];
        for c in payload.chunks(64 * 1024) {
            msgs.push(SendRequest {
                part: Some(send_request::Part::Chunk(c.to_vec())),
            });
        }
        msgs
    };
    for i in 0..TRIALS {
        let mut app = app.clone();
        reset_after(requests(i), STEP * i, |s| async move { app.send(s).await }).await;
    }
    assert_no_orphans(&clinic).await;

    // The application retries each Send under its key: one message each.
    let mut ids = HashSet::new();
    for i in 0..TRIALS {
        let mut app = app.clone();
        let id = app
            .send(tokio_stream::iter(requests(i)))
            .await
            .unwrap()
            .into_inner()
            .message_id;
        let again = app
            .send(tokio_stream::iter(requests(i)))
            .await
            .unwrap()
            .into_inner()
            .message_id;
        assert_eq!(id, again);
        ids.insert(id);
    }
    assert_eq!(ids.len(), TRIALS as usize);
    let stored = outbound(&clinic);
    assert_eq!(stored, u64::from(TRIALS));
    assert_no_orphans(&clinic).await;
    assert_eq!(large_ciphertexts(&clinic), TRIALS as usize);
    c.shutdown().await;
}

/// A stream cut off by the transport can end like a finished one; a Send
/// that declared its length and ended at another is refused, stores nothing
/// and leaves no spool file, on both sides of the declared length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_that_ends_at_another_length_than_it_declared_stores_nothing() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:local:clinic:emr");
    net.configure(&clinic, &[&hospital], &[&emr], INLINE_LIMIT);
    let c = start(&clinic).await;
    let mut app = client_of(&net, &clinic, &emr);
    let outbound = || outbound(&clinic);
    let large = LARGE as u64;
    for (declared, sent) in [(large, 0), (large, LARGE - 1), (large, LARGE + 1), (10, 9)] {
        let mut start = referral_start(&[&hospital], &[], "treatment");
        start.size_hint = declared;
        let err = send(&mut app, start, &vec![7u8; sent]).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert_eq!(
            exchange_daemon::error::status_reason(&err),
            Some("size-mismatch"),
            "{err:?}"
        );
        assert_eq!(outbound(), 0, "declared {declared}, sent {sent}");
        assert_no_orphans(&clinic).await;
    }
    // The declared length sent whole is stored, inline and as a blob.
    for len in [10, LARGE] {
        let mut start = referral_start(&[&hospital], &[], "treatment");
        start.size_hint = len as u64;
        send(&mut app, start, &vec![7u8; len]).await.unwrap();
    }
    assert_eq!(outbound(), 2);
    assert_no_orphans(&clinic).await;
    c.shutdown().await;
}
