//! Delivery: the loop and its workers move stored envelopes to their next
//! hop and receipts back towards the origin, with exponential backoff and
//! jitter until the message expires (DESIGN.md §6).
//!
//! Work is claimed from the store with a lease, so a crashed worker's items
//! come back; receiving is idempotent by message id, so an item delivered
//! just before a crash and delivered again makes no second inbox entry.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use exchange_core::PartyUri;
use exchange_core::audit::{AuditAction, AuditOutcome};
use exchange_core::envelope::EnvelopeHead;
use exchange_core::receipt::Disposition;
use tokio::sync::{Semaphore, watch};
use tonic::{Code, Status};

use super::{Node, position};
use crate::accountability::{self, peer_actor};
use crate::clock::{Clock, from_unix_ms, unix_ms};
use crate::error::{Error, MAX_STATUS_MESSAGE, RECEIPT_METADATA, StoreError, status_reason};
use crate::proto::peer_client::PeerClient;
use crate::proto::{DeliverRequest, ReturnReceiptsRequest, deliver_request};
use crate::store::{AttemptOutcome, DeliveryKind, DeliveryRecord, MessageKind, NewReceipt, Store};

/// How long running attempts may finish at shutdown before they are stopped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// How often the queue is polled when nothing wakes the loop.
const POLL: Duration = Duration::from_millis(200);
/// Ciphertext slice per gRPC message.
const SLICE: usize = 256 * 1024;
/// Longest reason code of a peer's error status that is kept (bytes).
const MAX_PEER_REASON: usize = 64;
/// The reason of the REJECTED receipt a relay signs when it gives up
/// forwarding an envelope and holds no signed refusal from downstream.
pub(crate) const UNDELIVERABLE: &str = "undeliverable";

/// The delay before attempt `attempts + 1`: doubling from `initial`, capped,
/// with up to 25% random jitter so that retries from many senders spread out.
pub(crate) fn backoff(attempts: u32, initial_ms: u64, max_ms: u64) -> u64 {
    let base = initial_ms
        .saturating_mul(1u64 << attempts.min(30))
        .min(max_ms);
    let mut r = [0u8; 8];
    let jitter = match getrandom::fill(&mut r) {
        Ok(()) => u64::from_le_bytes(r) % (base / 4 + 1),
        Err(_) => 0,
    };
    base - base / 8 + jitter
}

/// Runs until `shutdown` turns true.
pub(crate) async fn run(node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    let owner = node.config.delivery.node_name.clone();
    let lease = node.config.delivery.lease();
    let permits = Arc::new(Semaphore::new(node.config.delivery.concurrency));
    let in_flight = Arc::new(InFlight::default());
    let mut attempts = tokio::task::JoinSet::new();
    let mut renewed = tokio::time::Instant::now();
    loop {
        while let Some(done) = attempts.try_join_next() {
            if let Err(e) = done
                && e.is_panic()
            {
                tracing::error!("a delivery attempt panicked; it is retried once its claim lapses");
            }
        }
        if *shutdown.borrow() {
            break;
        }
        if renewed.elapsed() >= lease / 3 {
            renewed = tokio::time::Instant::now();
            renew(&node, &owner, lease, &in_flight).await;
        }
        let free = permits.available_permits();
        let mut full = false;
        if free > 0 {
            match claim(
                node.store.as_ref(),
                node.clock.as_ref(),
                &owner,
                lease,
                free,
                node.config.delivery.per_peer_concurrency,
                &in_flight,
            )
            .await
            {
                Ok((started, claimed)) => {
                    full = claimed == free;
                    for (item, guard) in started {
                        let Ok(permit) = permits.clone().acquire_owned().await else {
                            return;
                        };
                        let node = node.clone();
                        attempts.spawn(async move {
                            // Released when the attempt ends, panics or is
                            // cancelled at shutdown, in reverse order: the
                            // entry, the permit, then the loop is woken.
                            let _wake = Wake(node.clone());
                            let _permit = permit;
                            let _running = guard;
                            node.attempt(item).await;
                        });
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot claim deliveries"),
            }
        }
        if full {
            // More may be due: claim again once a worker frees up (or
            // look at the claims to renew).
            tokio::select! {
                () = node.work.notified() => {}
                () = tokio::time::sleep(lease / 3) => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        tokio::select! {
            () = node.work.notified() => {}
            () = tokio::time::sleep(POLL) => {}
            _ = shutdown.changed() => {}
        }
    }
    // Let running attempts finish for a moment, then stop the rest: their
    // claims lapse (or are released at the next start) and they are
    // attempted again, so nothing is lost; and the store is released.
    let drain = async { while attempts.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        tracing::info!(
            running = attempts.len(),
            "stopping deliveries still running; they resume at the next start"
        );
        attempts.shutdown().await;
    }
}

/// Claims up to `free` due deliveries and marks them running; returns
/// them with their guards, and how many the store handed out (some may be
/// running here already and are not started again).
///
/// The running set is read before the claim: an attempt that ends after
/// that point has recorded its outcome before it leaves the set, so an id
/// missing from it was either never started or is seen by the claim as it
/// now stands; an id in it is skipped even if its claim lapsed. Only this
/// loop starts attempts, so nothing starts between the claim and `start`.
async fn claim(
    store: &dyn Store,
    clock: &dyn Clock,
    owner: &str,
    lease: Duration,
    free: usize,
    per_peer: usize,
    in_flight: &Arc<InFlight>,
) -> Result<(Vec<(DeliveryRecord, InFlightGuard)>, usize), StoreError> {
    let (running, busy) = in_flight.snapshot();
    let now = unix_ms(clock.now());
    let items = store
        .claim_fair(owner, now, now + unix_ms_of(lease), free, per_peer, busy)
        .await?;
    let claimed = items.len();
    let mut skipped = Vec::new();
    let started = items
        .into_iter()
        .filter_map(|item| {
            let guard = if running.contains_key(&item.id) {
                None
            } else {
                in_flight.start(item.id, item.claim, &item.target)
            };
            if guard.is_none() {
                skipped.push((item.id, item.claim));
            }
            Some((item, guard?))
        })
        .collect();
    // A claim not started here is given back at once: its previous attempt
    // may have ended (a retry due again) between the snapshot and the
    // claim, and the item would otherwise wait a whole lease.
    if !skipped.is_empty() {
        store.release_claim(owner, skipped).await?;
    }
    Ok((started, claimed))
}

/// Extends the claims of the attempts running here, so that a transfer
/// outlasting the lease is not taken by another worker.
async fn renew(node: &Node, owner: &str, lease: Duration, in_flight: &InFlight) {
    let (running, _) = in_flight.snapshot();
    if running.is_empty() {
        return;
    }
    let until = unix_ms(node.now()) + unix_ms_of(lease);
    if let Err(e) = node
        .store
        .renew_claims(owner, running.into_iter().collect(), until)
        .await
    {
        tracing::error!(error = %e, "cannot renew the claims of running deliveries");
    }
}

/// Wakes the claim loop when dropped: a worker is free.
struct Wake(Arc<Node>);

impl Drop for Wake {
    fn drop(&mut self) {
        self.0.work.notify_one();
    }
}

/// Deliveries being attempted by this process, and how many per target.
#[derive(Debug, Default)]
struct InFlight(std::sync::Mutex<Running>);

#[derive(Debug, Default)]
struct Running {
    /// The running deliveries' ids, with the fencing token of each claim.
    ids: HashMap<i64, u64>,
    per_target: HashMap<PartyUri, usize>,
}

/// One running attempt's place in [`InFlight`]: released when dropped,
/// whether the attempt returned, panicked or was cancelled.
#[derive(Debug)]
struct InFlightGuard {
    registry: Arc<InFlight>,
    id: i64,
    target: PartyUri,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.registry.end(self.id, &self.target);
    }
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, Running> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Marks `id` (to `target`, under claim `claim`) running until the
    /// guard is dropped; `None` if it already was.
    fn start(self: &Arc<Self>, id: i64, claim: u64, target: &PartyUri) -> Option<InFlightGuard> {
        let mut r = self.lock();
        if r.ids.contains_key(&id) {
            return None;
        }
        r.ids.insert(id, claim);
        *r.per_target.entry(target.clone()).or_insert(0) += 1;
        Some(InFlightGuard {
            registry: Arc::clone(self),
            id,
            target: target.clone(),
        })
    }

    fn end(&self, id: i64, target: &PartyUri) {
        let mut r = self.lock();
        if r.ids.remove(&id).is_some()
            && let Some(n) = r.per_target.get_mut(target)
        {
            *n -= 1;
            if *n == 0 {
                r.per_target.remove(target);
            }
        }
    }

    /// The running ids (with their claims' fencing tokens) and the attempts
    /// running per target, read together.
    fn snapshot(&self) -> (HashMap<i64, u64>, HashMap<PartyUri, usize>) {
        let r = self.lock();
        (r.ids.clone(), r.per_target.clone())
    }
}

fn unix_ms_of(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The name of a status code a peer answered with when it refused the call
/// itself (as opposed to failing to answer); `None` for codes that say the
/// call did not get through (unavailable, cancelled, deadline, unknown).
fn answered_code(code: Code) -> Option<&'static str> {
    Some(match code {
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::NotFound => "NOT_FOUND",
        Code::Unauthenticated => "UNAUTHENTICATED",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Aborted => "ABORTED",
        Code::DataLoss => "DATA_LOSS",
        _ => return None,
    })
}

/// What a peer's error status means for a delivery. A status alone is
/// never final, whatever its code: only a signed REJECTED receipt (which
/// the caller looks for first) is a refusal the peer can be held to. So a
/// refusal without one, the peer's own internal failure and a failure to
/// reach it are all retried until the delivery expires; they differ only in
/// how they are reported. The peer's reason code is bounded and escaped:
/// it ends up in our log, our audit log and the delivery's last error.
fn peer_error(target: &PartyUri, status: &Status) -> Error {
    let reason = status_reason(status).map(|r| exchange_core::audit::log_text(r, MAX_PEER_REASON));
    match (status.code(), reason) {
        // The peer answered, with a reason code: it is up, and failing.
        (Code::Internal, Some(reason)) => Error::PeerInternal {
            party: target.to_string(),
            reason,
        },
        (code, reason) => match answered_code(code) {
            Some(name) => Error::UnsignedRefusal {
                party: target.to_string(),
                code: name.to_owned(),
                reason: reason.unwrap_or_else(|| "none".to_owned()),
            },
            None => Error::Transport(format!(
                "{target}: {}",
                exchange_core::audit::log_text(status.message(), MAX_STATUS_MESSAGE)
            )),
        },
    }
}

/// An attempt that reached its deadline unanswered (retried later).
fn no_answer(target: &PartyUri, deadline: Duration) -> Error {
    Error::Transport(format!(
        "{target}: no answer within {} ms (the attempt's deadline)",
        deadline.as_millis()
    ))
}

impl Node {
    async fn attempt(&self, item: DeliveryRecord) {
        let id = item.message_id;
        let result = match &item.kind {
            DeliveryKind::Envelope => self.deliver_envelope(&item).await,
            DeliveryKind::Receipt(r) => self.return_receipt(&item, r).await.map(|()| Vec::new()),
        };
        crash_point!("delivery::answered");
        let now = unix_ms(self.now());
        let what = match &item.kind {
            DeliveryKind::Envelope => "envelope",
            DeliveryKind::Receipt(_) => "receipt",
        };
        let audit = |outcome, reason: Option<&str>, detail: String| {
            vec![self.entry(
                accountability::DAEMON,
                AuditAction::Forward,
                Some(id),
                outcome,
                reason,
                Some(detail),
            )]
        };
        let (outcome, receipts, audit) = match result {
            Ok(receipts) => (
                AttemptOutcome::Done,
                receipts,
                audit(
                    AuditOutcome::Ok,
                    None,
                    format!("{what} to {} (attempt {})", item.target, item.attempts + 1),
                ),
            ),
            Err((e, receipts)) => {
                let next = now.saturating_add(backoff(
                    item.attempts,
                    self.config.delivery.initial_backoff_ms,
                    self.config.delivery.max_backoff_ms,
                ));
                if e.is_transient() && next < item.expires_ms {
                    if matches!(e, Error::PeerInternal { .. }) {
                        tracing::error!(message = %id, to = %item.target, attempt = item.attempts + 1, error = %e, "delivery failed inside the peer; will retry");
                    } else {
                        tracing::info!(message = %id, to = %item.target, attempt = item.attempts + 1, error = %e, "delivery failed; will retry");
                    }
                    let entry = audit(
                        AuditOutcome::Failed,
                        Some(e.reason_code()),
                        format!(
                            "{what} to {} (attempt {}, will retry): {e}",
                            item.target,
                            item.attempts + 1
                        ),
                    );
                    (
                        AttemptOutcome::Retry {
                            error: e.to_string(),
                            next_attempt_ms: next,
                        },
                        receipts,
                        entry,
                    )
                } else {
                    let reason = match (&e, &item.last_error) {
                        (Error::Core(exchange_core::Error::Expired { .. }), Some(last)) => {
                            format!(
                                "expired after {} attempts; last error: {last}",
                                item.attempts
                            )
                        }
                        _ if e.is_transient() => format!("expired: {e}"),
                        _ => e.to_string(),
                    };
                    tracing::warn!(message = %id, to = %item.target, reason = %reason, "delivery failed for good");
                    let entry = audit(
                        AuditOutcome::Failed,
                        Some(e.reason_code()),
                        format!("{what} to {} given up: {reason}", item.target),
                    );
                    let mut receipts = receipts;
                    if item.kind == DeliveryKind::Envelope
                        && let Some(own) = self.undeliverable(&item, &reason, &receipts).await
                    {
                        receipts.push(own);
                    }
                    (AttemptOutcome::Failed(reason), receipts, entry)
                }
            }
        };
        if let Err(e) = self
            .store
            .finish_attempt(item.id, item.claim, outcome, receipts, audit)
            .await
        {
            tracing::error!(message = %id, error = %e, "cannot record delivery attempt");
        }
        let _ = self.events.send(item.message);
    }

    /// One attempt to deliver an envelope; the receipts it brought back.
    async fn deliver_envelope(
        &self,
        item: &DeliveryRecord,
    ) -> Result<Vec<NewReceipt>, (Error, Vec<NewReceipt>)> {
        let fail = |e: Error| (e, Vec::new());
        let record = self
            .store
            .message(item.message)
            .await
            .map_err(|e| fail(e.into()))?
            .ok_or_else(|| fail(Error::NotFound(item.message_id.to_string())))?;
        let head = self.verify_for_delivery(&record).map_err(fail)?;
        let now = self.now();
        if now > head.header().expires {
            return Err(fail(Error::Core(exchange_core::Error::Expired {
                at: head.header().expires,
            })));
        }
        let channel = self.channel(&item.target).map_err(fail)?;
        let ciphertext = self
            .store
            .ciphertext(item.message)
            .await
            .map_err(|e| fail(e.into()))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<DeliverRequest>(4);
        let head_bytes = EnvelopeHead::as_bytes(head.head()).to_vec();
        let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Read;
            let msg = |part| DeliverRequest { part: Some(part) };
            if tx
                .blocking_send(msg(deliver_request::Part::Head(head_bytes)))
                .is_err()
            {
                return Ok(());
            }
            let mut r = ciphertext.reader()?;
            loop {
                let mut buf = vec![0u8; SLICE];
                let mut n = 0;
                while n < SLICE {
                    match r.read(&mut buf[n..])? {
                        0 => break,
                        k => n += k,
                    }
                }
                if n == 0 {
                    return Ok(());
                }
                buf.truncate(n);
                if tx
                    .blocking_send(msg(deliver_request::Part::Chunk(buf)))
                    .is_err()
                {
                    return Ok(());
                }
            }
        });
        // A peer that takes the call and never answers must not hold this
        // worker: the attempt ends at a deadline that grows with the size.
        let deadline = self.config.delivery.attempt_deadline(record.ciphertext_len);
        let response = tokio::time::timeout(
            deadline,
            PeerClient::new(channel)
                .max_decoding_message_size(exchange_core::receipt::MAX_RECEIPT_LEN * 2)
                .deliver(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await
        .map_err(|_| fail(no_answer(&item.target, deadline)))?;
        match reader.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(fail(Error::Store(crate::error::StoreError::Io {
                    op: "read ciphertext",
                    path: std::path::PathBuf::from(item.message_id.to_string()),
                    source: e,
                })));
            }
            Err(_) => return Err(fail(Error::Shutdown)),
        }
        let receipt = match response {
            Ok(r) => r.into_inner().receipt,
            // A refusal with a signed REJECTED receipt: keep it as evidence.
            Err(status) if status.metadata().get_bin(RECEIPT_METADATA).is_some() => status
                .metadata()
                .get_bin(RECEIPT_METADATA)
                .and_then(|v| v.to_bytes().ok())
                .map(|b| b.to_vec())
                .unwrap_or_default(),
            Err(status) => return Err(fail(peer_error(&item.target, &status))),
        };
        // Verified on the blocking pool, off the runtime threads.
        let verified = self
            .check_receipts(&head, vec![receipt])
            .await
            .and_then(|mut v| {
                v.pop()
                    .ok_or_else(|| Error::Protocol("no receipt in the answer".into()))
            })
            .map_err(|e| {
                fail(Error::Transport(format!(
                    "{} returned an unacceptable receipt: {e}",
                    item.target
                )))
            })?;
        if verified.issuer() != &item.target {
            return Err(fail(Error::Transport(format!(
                "receipt issued by {}, not {}",
                verified.issuer(),
                item.target
            ))));
        }
        let mut kept = vec![self.keep_receipt(&record, &verified, &peer_actor(&item.target))];
        if record.kind == MessageKind::Outbound {
            let provisions = self
                .boundary_provisions(&record, &head, std::slice::from_ref(&verified))
                .await
                .map_err(fail)?;
            for (k, p) in kept.iter_mut().zip(provisions) {
                k.provisions = p;
            }
        }
        let route = head.route();
        let is_relay = route.relays.iter().any(|h| h.party == item.target);
        match verified.disposition() {
            Disposition::Rejected(reason) => Err((
                Error::Refused {
                    party: item.target.to_string(),
                    reason: reason.clone(),
                },
                kept,
            )),
            Disposition::AcceptedForRelay if is_relay => Ok(kept),
            Disposition::Delivered | Disposition::Processed if !is_relay => Ok(kept),
            other => Err((
                Error::Transport(format!(
                    "{} returned {other}, not a custody receipt",
                    item.target
                )),
                kept,
            )),
        }
    }

    /// What a relay that gives up forwarding an envelope tells the hop
    /// before it. A signed refusal from downstream that came back with the
    /// attempt is kept and passed upstream like every receipt; without one,
    /// the relay signs its own REJECTED receipt, reason [`UNDELIVERABLE`],
    /// and queues it upstream through the same receipt-return queue, so
    /// that the origin sees FAILED with signed evidence instead of RELAYED
    /// forever. `why` (the last error) goes into the audit entry and the
    /// log: a receipt's reason is a code, with no room for free text.
    /// `None` for an origin or a recipient, when one was signed before (one
    /// per message, whichever next hop failed first), or when it cannot be
    /// signed (logged: the delivery still ends FAILED here).
    async fn undeliverable(
        &self,
        item: &DeliveryRecord,
        why: &str,
        brought: &[NewReceipt],
    ) -> Option<NewReceipt> {
        let rejected = Disposition::Rejected(UNDELIVERABLE.to_owned());
        if brought.iter().any(|r| r.disposition == rejected.as_str()) {
            return None;
        }
        let id = item.message_id;
        let signed = async {
            let Some(record) = self.store.message(item.message).await? else {
                return Ok(None);
            };
            if record.kind != MessageKind::Relay {
                return Ok(None);
            }
            let held = self.store.receipts(item.message).await?;
            if held
                .iter()
                .any(|r| r.issuer == self.party && r.disposition == rejected.as_str())
            {
                return Ok(None);
            }
            // The head was verified on arrival; a revocation since must not
            // keep the relay from saying that it gave up.
            let trust = self.trust().without_revocation();
            let head = EnvelopeHead::decode(&record.head)?
                .verify_ignoring_expiry(&trust, from_unix_ms(record.received_ms))?;
            let pos = position(&head, &self.party)?;
            let receipt = self
                .sign_receipt(&head, pos.role, rejected.clone(), self.now())
                .verify(&trust)?;
            let mut keep = self.keep_receipt(&record, &receipt, accountability::DAEMON);
            let upstream = record
                .upstream
                .as_ref()
                .map_or_else(|| "nobody".to_owned(), ToString::to_string);
            keep.audit = Some(self.entry(
                accountability::DAEMON,
                AuditAction::Receipt,
                Some(id),
                AuditOutcome::Failed,
                Some(UNDELIVERABLE),
                Some(format!(
                    "{} signed and queued to {upstream}: forwarding to {} given up: {why}",
                    receipt.disposition(),
                    item.target
                )),
            ));
            Ok::<_, Error>(Some(keep))
        }
        .await;
        match signed {
            Ok(Some(keep)) => {
                tracing::warn!(message = %id, to = %item.target, upstream = ?keep.forward.as_ref().map(|f| f.target.to_string()), "forwarding given up: REJECTED (undeliverable) receipt signed and returned upstream");
                Some(keep)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::error!(message = %id, error = %e, "forwarding given up, but no REJECTED (undeliverable) receipt could be signed for the hop before us");
                None
            }
        }
    }

    /// Returns one receipt to the party upstream.
    async fn return_receipt(
        &self,
        item: &DeliveryRecord,
        receipt: &[u8],
    ) -> Result<(), (Error, Vec<NewReceipt>)> {
        let fail = |e: Error| (e, Vec::new());
        let channel = self.channel(&item.target).map_err(fail)?;
        let deadline = self.config.delivery.attempt_deadline(0);
        tokio::time::timeout(
            deadline,
            PeerClient::new(channel).return_receipts(ReturnReceiptsRequest {
                message_id: item.message_id.as_bytes().to_vec(),
                receipts: vec![receipt.to_vec()],
            }),
        )
        .await
        .map_err(|_| fail(no_answer(&item.target, deadline)))?
        .map_err(|status| fail(peer_error(&item.target, &status)))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_empty(registry: &InFlight) -> bool {
        let (ids, per_target) = registry.snapshot();
        ids.is_empty() && per_target.is_empty()
    }

    #[tokio::test]
    async fn a_panicking_or_cancelled_attempt_leaves_no_in_flight_entry() {
        let registry = Arc::new(InFlight::default());
        let target = PartyUri::new("urn:test:next").unwrap();

        let guard = registry.start(1, 1, &target).unwrap();
        assert!(registry.start(1, 1, &target).is_none(), "started twice");
        assert_eq!(registry.snapshot().1.get(&target), Some(&1));
        let attempt = tokio::spawn(async move {
            let _running = guard;
            panic!("an attempt fails unexpectedly");
        });
        assert!(attempt.await.unwrap_err().is_panic());
        assert!(is_empty(&registry), "{:?}", registry.snapshot());

        // Cancelled while running (a shutdown stopping attempts).
        let guard = registry.start(2, 1, &target).unwrap();
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let attempt = tokio::spawn(async move {
            let _running = guard;
            let _ = started_tx.send(());
            std::future::pending::<()>().await;
        });
        started.await.unwrap();
        attempt.abort();
        assert!(attempt.await.unwrap_err().is_cancelled());
        assert!(is_empty(&registry), "{:?}", registry.snapshot());

        // Both may run again.
        let again = (registry.start(1, 1, &target), registry.start(2, 1, &target));
        assert!(again.0.is_some() && again.1.is_some());
        assert_eq!(registry.snapshot().1.get(&target), Some(&2));
        drop(again);
        assert!(is_empty(&registry));
    }

    /// The claim loop's race: an attempt whose lease lapsed is still
    /// running when the loop claims; its outcome is recorded in the same
    /// writer batch right after the claim, and it leaves the running set
    /// before the loop looks at what it claimed. It must not start again.
    #[tokio::test]
    async fn an_attempt_ending_during_a_claim_is_not_started_again() {
        use crate::clock::TestClock;
        use crate::store::sqlite::SqliteStore;
        use crate::store::sqlite::tests::{hold_writer, inline, mid, wait_submitted};
        use std::time::SystemTime;

        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
        store
            .accept(inline(mid(1), MessageKind::Relay))
            .await
            .unwrap();
        let registry = Arc::new(InFlight::default());
        let lease = Duration::from_millis(50);
        let clock = TestClock::at(SystemTime::now());
        let (started, _) = claim(store.as_ref(), &clock, "local", lease, 4, 4, &registry)
            .await
            .unwrap();
        let [(item, guard)] = <[_; 1]>::try_from(started).unwrap();
        // The lease lapses while the attempt runs.
        clock.advance(lease * 3);

        let before = store.writer_stats().ops_submitted;
        let (release, blocker) = hold_writer(&store).await;
        let mut again = std::pin::pin!(claim(
            store.as_ref(),
            &clock,
            "local",
            lease,
            4,
            4,
            &registry
        ));
        tokio::select! {
            biased;
            _ = &mut again => panic!("the claim finished while the writer was held"),
            () = wait_submitted(&store, before + 2) => {}
        }
        // The attempt records its outcome, queued behind the claim.
        let s = Arc::clone(&store);
        let finish = tokio::spawn(async move {
            s.finish_attempt(
                item.id,
                item.claim,
                AttemptOutcome::Done,
                Vec::new(),
                Vec::new(),
            )
            .await
        });
        wait_submitted(&store, before + 3).await;
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        finish.await.unwrap().unwrap();
        // ... and then leaves the running set, before the claim goes on.
        drop(guard);
        let (started, claimed) = again.await.unwrap();
        assert_eq!(claimed, 1, "the lapsed claim was not handed out again");
        assert!(
            started.is_empty(),
            "a delivery already done was started again: {:?}",
            started.iter().map(|(d, _)| d.id).collect::<Vec<_>>()
        );
        assert!(is_empty(&registry));
        // The attempt's lease had lapsed and the delivery was claimed again,
        // but the next hop took it: it is done, not attempted once more.
        let row = &store
            .deliveries(crate::store::MessageKey::of_id(mid(1)))
            .await
            .unwrap()[0];
        assert_eq!(row.state, crate::store::DeliveryState::Done);
    }

    /// An attempt that records a retry (due at once) after the claim loop
    /// took its snapshot of the running set, but before the claim reads the
    /// queue: the claim takes the item, which the snapshot still shows as
    /// running, so it is not started. It must be given back, not held for
    /// a whole lease.
    #[tokio::test]
    async fn a_retry_recorded_during_a_claim_is_attempted_again_without_waiting_a_lease() {
        use crate::store::sqlite::SqliteStore;
        use crate::store::sqlite::tests::{hold_writer, inline, mid, wait_submitted};

        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
        store
            .accept(inline(mid(1), MessageKind::Relay))
            .await
            .unwrap();
        let registry = Arc::new(InFlight::default());
        let lease = Duration::from_secs(600);
        let (started, _) = claim(
            store.as_ref(),
            &crate::clock::SystemClock,
            "local",
            lease,
            4,
            4,
            &registry,
        )
        .await
        .unwrap();
        let [(item, guard)] = <[_; 1]>::try_from(started).unwrap();

        let before = store.writer_stats().ops_submitted;
        let (release, blocker) = hold_writer(&store).await;
        wait_submitted(&store, before + 1).await;
        // The attempt's retry is queued first ...
        let s = Arc::clone(&store);
        let finish = tokio::spawn(async move {
            let retry = AttemptOutcome::Retry {
                error: "refused".into(),
                next_attempt_ms: 0,
            };
            s.finish_attempt(item.id, item.claim, retry, Vec::new(), Vec::new())
                .await
        });
        wait_submitted(&store, before + 2).await;
        // ... then the claim, whose snapshot still shows the attempt running.
        let mut again = std::pin::pin!(claim(
            store.as_ref(),
            &crate::clock::SystemClock,
            "local",
            lease,
            4,
            4,
            &registry
        ));
        tokio::select! {
            biased;
            _ = &mut again => panic!("the claim finished while the writer was held"),
            () = wait_submitted(&store, before + 3) => {}
        }
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        finish.await.unwrap().unwrap();
        let (started, claimed) = again.await.unwrap();
        assert_eq!((started.len(), claimed), (0, 1));
        drop(guard);
        // The next claim takes it and starts it, at once.
        let (started, _) = claim(
            store.as_ref(),
            &crate::clock::SystemClock,
            "local",
            lease,
            4,
            4,
            &registry,
        )
        .await
        .unwrap();
        assert_eq!(
            started.iter().map(|(d, _)| d.id).collect::<Vec<_>>(),
            vec![item.id],
            "the retried delivery waits for a lease it holds but nobody attempts"
        );
    }

    /// Backoff and expiry are read from the node's clock: a failed attempt
    /// is due again once the clock passes its backoff, and the attempt
    /// after the envelope's expiry gives up, without waiting for either.
    #[tokio::test]
    async fn a_failed_attempt_is_due_after_its_backoff_and_given_up_once_expired() {
        use crate::node::fixture::{self, Chunks};
        use crate::store::DeliveryState;

        let f = fixture::node("[delivery]\ninitial_backoff_ms = 1000\nmax_backoff_ms = 60000\n");
        let node = &f.node;
        node.send(
            &f.client(),
            fixture::order(Duration::from_secs(3600)),
            Chunks::of(b"referral"),
        )
        .await
        .unwrap();
        let registry = Arc::new(InFlight::default());
        let lease = Duration::from_secs(60);
        let claim_due = || async {
            let (started, claimed) = claim(
                node.store.as_ref(),
                f.clock.as_ref(),
                "local",
                lease,
                4,
                4,
                &registry,
            )
            .await
            .unwrap();
            assert_eq!(started.len(), claimed);
            started
        };
        let hop = |message| async move {
            let mut d = node.store.deliveries(message).await.unwrap();
            assert_eq!(d.len(), 1);
            d.remove(0)
        };

        // Nothing listens at the peer's address: the attempt fails, to be
        // retried after the first backoff (1 s, less 12.5% to plus 12.5%).
        let [(item, guard)] = <[_; 1]>::try_from(claim_due().await).unwrap();
        let message = item.message;
        let t0 = unix_ms(f.clock.now());
        node.attempt(item).await;
        drop(guard);
        let d = hop(message).await;
        assert_eq!(d.attempts, 1);
        assert!(matches!(d.state, DeliveryState::Pending), "{:?}", d.state);
        assert!(
            (t0 + 875..=t0 + 1125).contains(&d.next_attempt_ms),
            "next attempt {} ms after the first",
            d.next_attempt_ms - t0
        );

        // Not due before its backoff, due after.
        assert!(claim_due().await.is_empty(), "due at once");
        f.clock.advance(Duration::from_millis(850));
        assert!(claim_due().await.is_empty(), "due before its backoff");
        f.clock.advance(Duration::from_millis(300));
        let [(item, guard)] = <[_; 1]>::try_from(claim_due().await).unwrap();

        // The clock passes the envelope's expiry: this attempt gives up.
        f.clock.advance(Duration::from_secs(3600));
        node.attempt(item).await;
        drop(guard);
        let d = hop(message).await;
        assert_eq!(d.attempts, 2);
        match &d.state {
            DeliveryState::Failed(reason) => assert!(
                reason.starts_with("expired after 1 attempts; last error: "),
                "{reason}"
            ),
            other => panic!("not given up: {other:?}"),
        }
        assert!(claim_due().await.is_empty());
        assert!(is_empty(&registry));
    }
}
