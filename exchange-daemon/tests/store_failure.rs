//! A daemon whose store can no longer write: health turns NOT_SERVING on
//! both listeners and the daemon reports that it failed (the `exchanged`
//! binary then stops and exits non-zero). The store is the real SQLite
//! store behind a wrapper that can announce the writer's death; and an
//! `exchanged` process whose real writer thread dies.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;
mod crash_harness;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use exchange_core::audit::{AuditEntry, Pseudonym};
use exchange_core::{MessageId, PartyUri};
use exchange_daemon::store::sqlite::SqliteStore;
use exchange_daemon::store::*;
use exchange_daemon::{Daemon, Error, StoreError};
use tokio::sync::watch;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The SQLite store, whose [`Store::failure`] resolves when told to.
struct Dying {
    inner: SqliteStore,
    dead: watch::Receiver<Option<String>>,
}

impl Store for Dying {
    fn failure(&self) -> Pin<Box<dyn Future<Output = String> + Send + '_>> {
        let mut dead = self.dead.clone();
        Box::pin(async move {
            let why = dead.wait_for(Option::is_some).await.map(|w| w.clone());
            match why {
                Ok(why) => why.unwrap_or_default(),
                Err(_) => std::future::pending().await,
            }
        })
    }
    fn spool(&self) -> Result<SpoolFile, StoreError> {
        self.inner.spool()
    }
    fn accept(&self, e: NewEnvelope) -> StoreFuture<'_, Accepted> {
        self.inner.accept(e)
    }
    fn message(&self, key: MessageKey) -> StoreFuture<'_, Option<MessageRecord>> {
        self.inner.message(key)
    }
    fn find(&self, sender: PartyUri, id: MessageId) -> StoreFuture<'_, Option<MessageRecord>> {
        self.inner.find(sender, id)
    }
    fn messages_by_id(&self, id: MessageId) -> StoreFuture<'_, Vec<MessageRecord>> {
        self.inner.messages_by_id(id)
    }
    fn send_key(&self, client: String, key: String) -> StoreFuture<'_, Option<SendKeyRecord>> {
        self.inner.send_key(client, key)
    }
    fn ciphertext(&self, key: MessageKey) -> StoreFuture<'_, StoredCiphertext> {
        self.inner.ciphertext(key)
    }
    fn claim_fair(
        &self,
        owner: &str,
        now_ms: u64,
        lease_until_ms: u64,
        limit: usize,
        per_target: usize,
        busy: HashMap<PartyUri, usize>,
    ) -> StoreFuture<'_, Vec<DeliveryRecord>> {
        self.inner
            .claim_fair(owner, now_ms, lease_until_ms, limit, per_target, busy)
    }
    fn renew_claims(
        &self,
        owner: &str,
        claims: Vec<(i64, u64)>,
        until: u64,
    ) -> StoreFuture<'_, u64> {
        self.inner.renew_claims(owner, claims, until)
    }
    fn release_claim(&self, owner: &str, claims: Vec<(i64, u64)>) -> StoreFuture<'_, u64> {
        self.inner.release_claim(owner, claims)
    }
    fn release_claims(&self, owner: &str) -> StoreFuture<'_, u64> {
        self.inner.release_claims(owner)
    }
    fn finish_attempt(
        &self,
        delivery: i64,
        claim: u64,
        outcome: AttemptOutcome,
        receipts: Vec<NewReceipt>,
        audit: Vec<AuditEntry>,
    ) -> StoreFuture<'_, ()> {
        self.inner
            .finish_attempt(delivery, claim, outcome, receipts, audit)
    }
    fn add_receipts(&self, key: MessageKey, receipts: Vec<NewReceipt>) -> StoreFuture<'_, usize> {
        self.inner.add_receipts(key, receipts)
    }
    fn receipts(&self, key: MessageKey) -> StoreFuture<'_, Vec<ReceiptRecord>> {
        self.inner.receipts(key)
    }
    fn deliveries(&self, key: MessageKey) -> StoreFuture<'_, Vec<DeliveryRecord>> {
        self.inner.deliveries(key)
    }
    fn inbox(&self, include_acked: bool) -> StoreFuture<'_, Vec<MessageRecord>> {
        self.inner.inbox(include_acked)
    }
    fn inbox_page(
        &self,
        include_acked: bool,
        after: Option<(u64, MessageKey)>,
        limit: usize,
    ) -> StoreFuture<'_, Vec<MessageRecord>> {
        self.inner.inbox_page(include_acked, after, limit)
    }
    fn acknowledge(&self, key: MessageKey, now_ms: u64, r: NewReceipt) -> StoreFuture<'_, bool> {
        self.inner.acknowledge(key, now_ms, r)
    }
    fn mark_fetched(&self, key: MessageKey, now_ms: u64) -> StoreFuture<'_, ()> {
        self.inner.mark_fetched(key, now_ms)
    }
    fn pending_count(&self) -> StoreFuture<'_, u64> {
        self.inner.pending_count()
    }
    fn append_audit(
        &self,
        about: Option<MessageKey>,
        entries: Vec<AuditEntry>,
    ) -> StoreFuture<'_, ()> {
        self.inner.append_audit(about, entries)
    }
    fn audit_tail(&self) -> StoreFuture<'_, AuditTail> {
        self.inner.audit_tail()
    }
    fn audit_entries(&self, from: u64, limit: usize) -> StoreFuture<'_, Vec<(u64, Vec<u8>)>> {
        self.inner.audit_entries(from, limit)
    }
    fn add_checkpoint(&self, checkpoint: NewCheckpoint) -> StoreFuture<'_, bool> {
        self.inner.add_checkpoint(checkpoint)
    }
    fn provisions(&self, subject: Pseudonym) -> StoreFuture<'_, Vec<ProvisionRecord>> {
        self.inner.provisions(subject)
    }
    fn purge(
        &self,
        policy: PurgePolicy,
        audit: AuditEntry,
        suspended: AuditEntry,
    ) -> StoreFuture<'_, PurgeSummary> {
        self.inner.purge(policy, audit, suspended)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_write_turns_health_not_serving_and_fails_the_daemon() {
    let net = Net::new();
    let hospital = net.party("hospital", HOSPITAL);
    let clinic = net.party("clinic", CLINIC);
    let his = net.client("his", "urn:local:hospital:his");
    net.configure(&hospital, &[&clinic], &[&his], "");
    let (kill, dead) = watch::channel(None);
    let store = Dying {
        inner: SqliteStore::open(&hospital.data_dir()).unwrap(),
        dead,
    };
    let h = Daemon::start_with_store(hospital.config(), Arc::new(store))
        .await
        .unwrap();

    let channel = |addr: String, id: exchange_daemon::tls::TlsIdentity| {
        let config = exchange_daemon::tls::client_config(
            Arc::new(net_trust(&net)),
            hospital.party(),
            Some(&id),
            exchange_daemon::tls::versions(false),
        )
        .unwrap();
        exchange_daemon::tls::channel(&addr, config, Duration::from_secs(5)).unwrap()
    };
    let mut peer = HealthClient::new(channel(hospital.peer_addr(), clinic.tls_identity()));
    let mut client = HealthClient::new(channel(hospital.client_addr(), client_tls_identity(&his)));
    let status = |name: &str| HealthCheckRequest {
        service: name.to_owned(),
    };
    for (c, name) in [
        (&mut peer, "exchange.v1.Peer"),
        (&mut client, "exchange.v1.Client"),
    ] {
        let r = c.check(status(name)).await.unwrap().into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{name}");
    }
    // Not failed while the store works.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), h.failed())
            .await
            .is_err()
    );

    kill.send_replace(Some("the store writer stopped: simulated".into()));
    let e = tokio::time::timeout(Duration::from_secs(5), h.failed())
        .await
        .expect("the daemon did not report the store's failure");
    assert!(
        matches!(&e, Error::Store(StoreError::WriterDied(why)) if why.contains("simulated")),
        "{e:?}"
    );
    assert_eq!(e.reason_code(), "store");
    for (c, name) in [
        (&mut peer, "exchange.v1.Peer"),
        (&mut client, "exchange.v1.Client"),
    ] {
        let r = c.check(status(name)).await.unwrap().into_inner();
        assert_eq!(r.status, ServingStatus::NotServing as i32, "{name}");
    }
    h.shutdown().await;
}

/// The writer thread itself dies (a panic between two commits, where no
/// single operation can take the blame): the `exchanged` process stops,
/// exits non-zero for its supervisor, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchanged_exits_non_zero_when_its_store_writer_dies() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:jp:example:app:emr-01");
    net.configure(&clinic, &[&hospital], &[&emr], "");
    let mut daemon = crash_harness::Exchanged::new(clinic.clone(), emr.clone());
    // The writer panics after its 40th commit: after the start's few, on
    // one of the Sends below.
    daemon.spawn(Some(
        "store::after-commit=40*off->panic(the writer is gone)",
    ));
    daemon.wait_ready(&net).await;
    let mut app = client_of(&net, &clinic, &emr);
    let mut refused = None;
    for i in 0..200 {
        let sent = send(
            &mut app,
            referral_start(&[&hospital], &[], "treatment"),
            format!("referral {i}").as_bytes(),
        )
        .await;
        if let Err(e) = sent {
            refused = Some(e);
            break;
        }
    }
    let refused = refused.expect("the writer never died");
    assert_ne!(refused.code(), tonic::Code::Ok);
    let status = daemon
        .wait_exit(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("exchanged kept running:\n{}", daemon.stderr()));
    assert!(!status.success(), "{status}");
    let log = daemon.stderr();
    assert!(
        log.contains("the store writer stopped") && log.contains("the writer is gone"),
        "{log}"
    );
}
