//! Delivery against a peer that takes calls and never answers (real TLS on
//! loopback, a real gRPC server whose handlers never return): it must not
//! hold the workers that other peers' deliveries need, and each attempt to
//! it ends at a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use exchange_daemon::proto::peer_client::PeerClient;
use exchange_daemon::proto::peer_server::Peer;
use exchange_daemon::proto::{
    DeliverRequest, DeliverResponse, ReturnReceiptsRequest, ReturnReceiptsResponse, deliver_request,
};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

/// A peer service that accepts every call and never answers.
#[derive(Clone, Default)]
struct Stall {
    calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Peer for Stall {
    async fn deliver(
        &self,
        req: Request<Streaming<DeliverRequest>>,
    ) -> Result<Response<DeliverResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let _held = req;
        std::future::pending().await
    }

    async fn return_receipts(
        &self,
        _req: Request<ReturnReceiptsRequest>,
    ) -> Result<Response<ReturnReceiptsResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        std::future::pending().await
    }
}

/// Serves [`Stall`] on `party`'s peer address with its identity
/// certificate; returns the count of calls it took.
async fn stalling_peer(party: &Party) -> Arc<AtomicUsize> {
    let stall = Stall::default();
    let calls = stall.calls.clone();
    serve_peer(party, stall).await;
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_answers_does_not_hold_delivery_to_the_others() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let payer = net.party("payer", PAYER);
    let emr = net.client("emr", "urn:local:clinic:emr");
    // Default concurrency and deadlines.
    net.configure(&clinic, &[&hospital, &payer], &[&emr], "");
    net.configure(&payer, &[&clinic], &[], "");
    let calls = stalling_peer(&hospital).await;
    let c = start(&clinic).await;
    let p = start(&payer).await;
    let mut app = client_of(&net, &clinic, &emr);
    // More messages to the stuck hospital than the daemon runs at once.
    for i in 0..50 {
        send(
            &mut app,
            referral_start(&[&hospital], &[], "treatment"),
            format!("referral {i}").as_bytes(),
        )
        .await
        .unwrap();
    }
    // Let the stuck peer take every call it is offered.
    let share = exchange_daemon::config::DeliveryConfig::default().per_peer_concurrency;
    assert!(
        share < 50,
        "the test must queue more than the per-hop share"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while calls.load(Ordering::SeqCst) < share && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        calls.load(Ordering::SeqCst) >= 1,
        "the stuck peer got no call"
    );
    // Then a message to the healthy payer.
    let sent = tokio::time::Instant::now();
    let id = send(&mut app, referral_start(&[&payer], &[], "treatment"), b"x")
        .await
        .unwrap();
    let status = tokio::time::timeout(
        Duration::from_secs(10),
        wait_status(&mut app, &id, |s| {
            s.state() == exchange_daemon::proto::MessageState::Delivered
        }),
    )
    .await
    .expect("the healthy peer's message was not delivered within 10 s");
    assert_eq!(
        status.state(),
        exchange_daemon::proto::MessageState::Delivered
    );
    let taken = sent.elapsed();
    // The stuck peer holds no more than its share of the workers.
    assert!(
        calls.load(Ordering::SeqCst) <= share,
        "the stuck peer holds {} attempts at once",
        calls.load(Ordering::SeqCst)
    );
    eprintln!("delivered to the healthy peer in {taken:?}");
    c.shutdown().await;
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_that_gets_no_answer_ends_at_its_deadline_and_is_retried() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:local:clinic:emr");
    net.configure(&clinic, &[&hospital], &[&emr], "attempt_timeout_ms = 500\n");
    let calls = stalling_peer(&hospital).await;
    let c = start(&clinic).await;
    let mut app = client_of(&net, &clinic, &emr);
    let id = send(
        &mut app,
        referral_start(&[&hospital], &[], "treatment"),
        b"x",
    )
    .await
    .unwrap();
    let status = wait_status(&mut app, &id, |s| s.hops.iter().any(|h| h.attempts >= 2)).await;
    let hop = &status.hops[0];
    assert_eq!(
        hop.state(),
        exchange_daemon::proto::HopDeliveryState::Pending
    );
    assert!(
        hop.last_error.contains("no answer within 500 ms"),
        "{hop:?}"
    );
    assert!(calls.load(Ordering::SeqCst) >= 2);
    c.shutdown().await;
}

/// Deliver calls of one envelope: running now, most at once, in all.
#[derive(Debug, Default, Clone, Copy)]
struct Calls {
    running: usize,
    most: usize,
    total: usize,
}

/// A peer slower than the sender's claim lease: it reads each Deliver
/// call, holds it for `delay`, then passes it on to the real daemon behind
/// it (as the sender) and answers with what that one answered. It counts
/// the calls of each envelope (by its head).
#[derive(Clone)]
struct Slow {
    delay: Duration,
    behind: PeerClient<Channel>,
    calls: Arc<Mutex<HashMap<Vec<u8>, Calls>>>,
}

/// Counts a call as ended when dropped (also if the caller goes away).
struct Ended(Arc<Mutex<HashMap<Vec<u8>, Calls>>>, Vec<u8>);

impl Drop for Ended {
    fn drop(&mut self) {
        if let Some(c) = self.0.lock().unwrap().get_mut(&self.1) {
            c.running -= 1;
        }
    }
}

#[tonic::async_trait]
impl Peer for Slow {
    async fn deliver(
        &self,
        req: Request<Streaming<DeliverRequest>>,
    ) -> Result<Response<DeliverResponse>, Status> {
        let mut stream = req.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no head"))?;
        let Some(deliver_request::Part::Head(head)) = &first.part else {
            return Err(Status::invalid_argument("head first"));
        };
        let key = head.clone();
        {
            let mut calls = self.calls.lock().unwrap();
            let c = calls.entry(key.clone()).or_default();
            c.running += 1;
            c.total += 1;
            c.most = c.most.max(c.running);
        }
        let _ended = Ended(self.calls.clone(), key);
        let mut parts = vec![first];
        while let Some(part) = stream.message().await? {
            parts.push(part);
        }
        tokio::time::sleep(self.delay).await;
        self.behind.clone().deliver(tokio_stream::iter(parts)).await
    }

    async fn return_receipts(
        &self,
        req: Request<ReturnReceiptsRequest>,
    ) -> Result<Response<ReturnReceiptsResponse>, Status> {
        self.behind.clone().return_receipts(req.into_inner()).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_outlasting_its_lease_is_attempted_once() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    // The address the clinic knows is the slow peer's; the hospital's
    // daemon listens behind it.
    let hospital = net.party("hospital", HOSPITAL);
    let mut behind = hospital.clone();
    behind.peer_port = free_port();
    let emr = net.client("emr", "urn:local:clinic:emr");
    // A lease far shorter than the peer takes to answer.
    net.configure(&clinic, &[&hospital], &[&emr], "lease_ms = 600\n");
    net.configure(&behind, &[&clinic], &[], "");
    let h = start(&behind).await;
    let slow = Slow {
        delay: Duration::from_millis(2_500),
        behind: peer_client(&net, &behind, &clinic.tls_identity()),
        calls: Arc::default(),
    };
    let calls = slow.calls.clone();
    serve_peer(&hospital, slow).await;
    let c = start(&clinic).await;
    let mut app = client_of(&net, &clinic, &emr);

    let mut ids = Vec::new();
    for i in 0..6 {
        let id = send(
            &mut app,
            referral_start(&[&hospital], &[], "treatment"),
            format!("referral {i}").as_bytes(),
        )
        .await
        .unwrap();
        ids.push(id);
    }
    for id in &ids {
        // The hop's own record of the attempt, not only the message's
        // state: the hospital also sends its receipt back on its own
        // (ReturnReceipts), which may arrive before the slow answer does.
        let status = wait_status(&mut app, id, |s| {
            s.state() == exchange_daemon::proto::MessageState::Delivered
                && s.hops
                    .iter()
                    .all(|h| h.state() == exchange_daemon::proto::HopDeliveryState::Delivered)
        })
        .await;
        assert_eq!(status.hops[0].attempts, 1, "{status:#?}");
    }
    // Time for a second attempt to show, were one started.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), ids.len(), "{calls:?}");
    for c in calls.values() {
        assert_eq!(c.most, 1, "attempts of one delivery at once: {calls:?}");
        assert_eq!(c.total, 1, "attempts of one delivery in all: {calls:?}");
    }
    assert_eq!(h.node().store().inbox(true).await.unwrap().len(), ids.len());
    for id in &ids {
        let s = app
            .status(exchange_daemon::proto::StatusRequest {
                message_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.hops.len(), 1);
        assert_eq!(s.hops[0].attempts, 1, "{s:#?}");
    }
    c.shutdown().await;
    h.shutdown().await;
}
