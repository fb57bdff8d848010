//! The store's contract (the guarantees `store/mod.rs` lists), checked on
//! both backends: the SQLite store in a temporary directory and the
//! PostgreSQL store in a database of its own on the local server. Then what
//! only a shared store has: several replicas on one database.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::sync::Arc;

use common::fixtures::{audit_entry, relayed, uri};
use common::pg::{TestDb, count, execute};
use exchange_core::MessageId;
use exchange_core::audit::AuditEntry;
use exchange_core::suite::merkle_leaf_hash;
use exchange_daemon::StoreError;
use exchange_daemon::store::postgres::{CHUNK, MIGRATIONS, PgOptions, PgStore};
use exchange_daemon::store::sqlite::SqliteStore;
use exchange_daemon::store::{
    Accepted, AttemptOutcome, Ciphertext, DeliveryKind, DeliveryState, MessageKey, MessageKind,
    NewDelivery, NewEnvelope, NewReceipt, PurgePolicy, SendKey, Store, StoreChange,
};

/// A store under test, with what keeps it alive.
struct Under {
    store: Arc<dyn Store>,
    _dir: tempfile::TempDir,
    db: Option<Arc<TestDb>>,
}

async fn sqlite() -> Under {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    Under {
        store: Arc::new(store),
        _dir: dir,
        db: None,
    }
}

async fn replica(db: &TestDb, node: &str, dir: &std::path::Path) -> Result<PgStore, StoreError> {
    PgStore::open(PgOptions {
        url: db.url(),
        tls: Default::default(),
        node_name: node.into(),
        max_connections: 8,
        spool_dir: dir.join(format!("spool-{node}")),
    })
    .await
}

async fn postgres() -> Under {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(TestDb::new());
    let store = replica(&db, "a", dir.path()).await.unwrap();
    Under {
        store: Arc::new(store),
        _dir: dir,
        db: Some(db),
    }
}

fn mid(n: u32) -> MessageId {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&n.to_be_bytes());
    b[15] = 0x5a;
    MessageId::from_bytes(b)
}

fn entry(detail: &str) -> AuditEntry {
    audit_entry("daemon", detail.into())
}

fn inline(id: MessageId, sender: &str) -> NewEnvelope {
    let ct = format!("ciphertext of {id} from {sender}").into_bytes();
    let len = ct.len() as u64;
    relayed(id, sender, Ciphertext::Inline(ct), len)
}

fn receipt(issuer: &str, signed: &[u8], forward: bool) -> NewReceipt {
    NewReceipt {
        signed: signed.to_vec(),
        issuer: uri(issuer),
        disposition: "DELIVERED".into(),
        issued_ms: 3_000,
        verified_ms: 2_500,
        forward: forward.then(|| NewDelivery {
            target: uri("urn:test:upstream"),
            kind: DeliveryKind::Receipt(signed.to_vec()),
            expires_ms: 9_000_000,
        }),
        provisions: Vec::new(),
        audit: Some(entry("receipt")),
    }
}

/// Data that is not the same in every chunk (a misplaced chunk shows).
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / CHUNK) as u8).collect()
}

fn spooled(store: &dyn Store, data: &[u8]) -> Ciphertext {
    let mut s = store.spool().unwrap();
    s.file.write_all(data).unwrap();
    Ciphertext::Spooled(s)
}

async fn read_all(store: &dyn Store, key: MessageKey) -> Vec<u8> {
    let c = store.ciphertext(key).await.unwrap();
    tokio::task::spawn_blocking(move || {
        let mut v = Vec::new();
        c.reader().unwrap().read_to_end(&mut v).unwrap();
        v
    })
    .await
    .unwrap()
}

/// Every audit entry is in order, gap-free, and its stored leaf hash is
/// that of its bytes.
async fn assert_audit_log_whole(store: &dyn Store, expected: usize) {
    let tail = store.audit_tail().await.unwrap();
    assert!(tail.checkpoint.is_none());
    let seqs: Vec<u64> = tail.entries.iter().map(|e| e.0).collect();
    assert_eq!(seqs, (0..expected as u64).collect::<Vec<_>>());
    let mut last_time = 0;
    for (seq, bytes, leaf) in &tail.entries {
        assert_eq!(*leaf, merkle_leaf_hash(bytes), "leaf {seq}");
        let e = AuditEntry::from_json(bytes).unwrap();
        assert_eq!(e.seq, *seq);
        assert!(e.time_ms >= last_time, "time went back at {seq}");
        last_time = e.time_ms;
    }
}

/// Runs each contract check on both backends.
macro_rules! on_both_backends {
    ($($check:ident),* $(,)?) => {
        mod sqlite_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::$check(super::sqlite().await).await;
                }
            )*
        }
        mod postgres_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::$check(super::postgres().await).await;
                }
            )*
        }
    };
}

on_both_backends!(
    receiving_is_idempotent_by_sender_and_id,
    a_large_ciphertext_round_trips_and_a_wrong_length_stores_nothing,
    claims_take_due_work_once_and_a_lapsed_claim_cannot_report,
    receipts_are_kept_once_and_forwarded_once,
    an_idempotency_key_names_one_send,
    a_purged_message_is_answered_from_its_record,
    a_batch_of_messages_in_a_row_keeps_one_whole_audit_log,
);

async fn receiving_is_idempotent_by_sender_and_id(u: Under) {
    let s = u.store.as_ref();
    assert_eq!(
        s.accept(inline(mid(1), "urn:test:a")).await.unwrap(),
        Accepted::Stored
    );
    // The same sender and id again: nothing changes, the stored record comes back.
    match s.accept(inline(mid(1), "urn:test:a")).await.unwrap() {
        Accepted::Duplicate(r) => {
            assert_eq!((r.id, r.sender.as_str()), (mid(1), "urn:test:a"));
        }
        other => panic!("expected a duplicate, got {other:?}"),
    }
    // Another sender's envelope under the same id is another message.
    assert_eq!(
        s.accept(inline(mid(1), "urn:test:b")).await.unwrap(),
        Accepted::Stored
    );
    let both = s.messages_by_id(mid(1)).await.unwrap();
    assert_eq!(both.len(), 2);
    assert_ne!(both[0].key, both[1].key);
    let b = s.find(uri("urn:test:b"), mid(1)).await.unwrap().unwrap();
    assert_eq!(
        read_all(s, b.key).await,
        format!("ciphertext of {} from urn:test:b", mid(1)).into_bytes()
    );
    // One delivery each, and one audit entry each (the duplicate added none).
    assert_eq!(s.pending_count().await.unwrap(), 2);
    assert_audit_log_whole(s, 2).await;
}

async fn a_large_ciphertext_round_trips_and_a_wrong_length_stores_nothing(u: Under) {
    let s = u.store.as_ref();
    // Sizes on both sides of the chunk size, and several chunks.
    let sizes = [CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 12_345];
    for (n, len) in sizes.iter().enumerate() {
        let data = pattern(*len);
        let id = mid(10 + n as u32);
        let e = relayed(id, "urn:test:a", spooled(s, &data), *len as u64);
        assert_eq!(s.accept(e).await.unwrap(), Accepted::Stored, "{len}");
        let key = s.find(uri("urn:test:a"), id).await.unwrap().unwrap().key;
        assert!(
            read_all(s, key).await == data,
            "{len} bytes came back changed"
        );
    }
    // A spool file longer or shorter than the envelope declares.
    for (n, (actual, declared)) in [(CHUNK + 10, CHUNK + 9), (CHUNK, CHUNK + 1)]
        .into_iter()
        .enumerate()
    {
        let id = mid(20 + n as u32);
        let e = relayed(
            id,
            "urn:test:a",
            spooled(s, &pattern(actual)),
            declared as u64,
        );
        let err = s.accept(e).await.unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{err}");
        assert!(s.find(uri("urn:test:a"), id).await.unwrap().is_none());
    }
    assert_eq!(s.pending_count().await.unwrap(), sizes.len() as u64);
    assert_audit_log_whole(s, sizes.len()).await;
    if let Some(db) = &u.db {
        let chunks = count(&db.url(), "SELECT count(*) FROM blob_chunks");
        assert_eq!(chunks, 1 + 1 + 2 + 3, "chunks of the stored messages only");
    }
}

async fn claims_take_due_work_once_and_a_lapsed_claim_cannot_report(u: Under) {
    let s = u.store.as_ref();
    for n in 1..=3 {
        s.accept(inline(mid(n), "urn:test:a")).await.unwrap();
    }
    let now = exchange_daemon::unix_ms(std::time::SystemTime::now());
    let first = s.claim_due("w1", now, now + 60_000, 2).await.unwrap();
    assert_eq!(first.len(), 2);
    let second = s.claim_due("w2", now, now + 60_000, 10).await.unwrap();
    assert_eq!(second.len(), 1, "only the unclaimed one");
    let ids: HashSet<i64> = first.iter().chain(&second).map(|d| d.id).collect();
    assert_eq!(ids.len(), 3);
    // w2's lease is renewed only with its fencing token.
    let d = &second[0];
    assert_eq!(
        s.renew_claims("w2", vec![(d.id, d.claim + 1)], now + 60_000)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        s.renew_claims("w2", vec![(d.id, d.claim)], now + 60_000)
            .await
            .unwrap(),
        1
    );
    // w1's leases lapse (a 1 ms lease, claimed again after it).
    s.release_claims("w1").await.unwrap();
    let short = s.claim_due("w1", now, now + 1, 10).await.unwrap();
    assert_eq!(short.len(), 2);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let later = exchange_daemon::unix_ms(std::time::SystemTime::now());
    let taken = s.claim_due("w3", later, later + 60_000, 10).await.unwrap();
    assert_eq!(taken.len(), 2, "lapsed claims are taken over");
    // w1's late reports change nothing; w3's land.
    for stale in &short {
        s.finish_attempt(
            stale.id,
            stale.claim,
            AttemptOutcome::Failed("stale".into()),
            vec![],
            vec![],
        )
        .await
        .unwrap();
    }
    for d in &taken {
        let row = s
            .deliveries(d.message)
            .await
            .unwrap()
            .into_iter()
            .find(|r| r.id == d.id)
            .unwrap();
        assert_eq!(
            (row.state, row.attempts, row.claim),
            (DeliveryState::Pending, 0, d.claim)
        );
        s.finish_attempt(d.id, d.claim, AttemptOutcome::Done, vec![], vec![])
            .await
            .unwrap();
    }
    assert_eq!(s.pending_count().await.unwrap(), 1);
    assert!(matches!(
        s.finish_attempt(i64::MAX, 1, AttemptOutcome::Done, vec![], vec![])
            .await,
        Err(StoreError::NotFound(_))
    ));
}

async fn receipts_are_kept_once_and_forwarded_once(u: Under) {
    let s = u.store.as_ref();
    s.accept(inline(mid(1), "urn:test:a")).await.unwrap();
    let key = s
        .find(uri("urn:test:a"), mid(1))
        .await
        .unwrap()
        .unwrap()
        .key;
    let new = s
        .add_receipts(
            key,
            vec![
                receipt("urn:test:r1", b"r1", true),
                receipt("urn:test:r2", b"r2", true),
            ],
        )
        .await
        .unwrap();
    assert_eq!(new, 2);
    // The same bytes again, and another receipt of r1 with the same disposition.
    let again = s
        .add_receipts(
            key,
            vec![
                receipt("urn:test:r1", b"r1", true),
                receipt("urn:test:r1", b"r1 later", true),
            ],
        )
        .await
        .unwrap();
    assert_eq!(again, 0);
    let kept = s.receipts(key).await.unwrap();
    assert_eq!(
        kept.iter().map(|r| r.signed.clone()).collect::<Vec<_>>(),
        vec![b"r1".to_vec(), b"r2".to_vec()]
    );
    let forwards = s
        .deliveries(key)
        .await
        .unwrap()
        .into_iter()
        .filter(|d| matches!(d.kind, DeliveryKind::Receipt(_)))
        .count();
    assert_eq!(forwards, 2);
    // The envelope's accept, and one entry per new receipt.
    assert_audit_log_whole(s, 3).await;
}

async fn an_idempotency_key_names_one_send(u: Under) {
    let s = u.store.as_ref();
    let key = SendKey {
        client: "urn:test:app".into(),
        key: "claim-2026-11-0001".into(),
        request_sha256: [7; 32],
    };
    let mut first = inline(mid(1), "urn:test:us");
    first.kind = MessageKind::Outbound;
    first.send_key = Some(key.clone());
    assert_eq!(s.accept(first).await.unwrap(), Accepted::Stored);
    // Another message under the same key is refused, and leaves nothing.
    let mut second = inline(mid(2), "urn:test:us");
    second.kind = MessageKind::Outbound;
    second.send_key = Some(key.clone());
    assert!(s.accept(second).await.is_err());
    assert!(s.find(uri("urn:test:us"), mid(2)).await.unwrap().is_none());
    let record = s
        .send_key(key.client.clone(), key.key.clone())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (record.message_id, record.request_sha256),
        (mid(1), [7; 32])
    );
    assert!(
        s.send_key(key.client, "another".into())
            .await
            .unwrap()
            .is_none()
    );
    assert_audit_log_whole(s, 1).await;
}

async fn a_purged_message_is_answered_from_its_record(u: Under) {
    let s = u.store.as_ref();
    let now = exchange_daemon::unix_ms(std::time::SystemTime::now());
    let mut e = inline(mid(1), "urn:test:a");
    e.kind = MessageKind::Inbound;
    e.deliveries.clear();
    e.received_ms = now - 10_000;
    e.expires_ms = now + 86_400_000;
    s.accept(e).await.unwrap();
    let key = s
        .find(uri("urn:test:a"), mid(1))
        .await
        .unwrap()
        .unwrap()
        .key;
    let policy = PurgePolicy {
        now_ms: now,
        received_before_ms: now - 1_000,
        receipt_grace_ms: 0,
        max_clock_jump_ms: 86_400_000,
    };
    // Never fetched: kept.
    let none = s
        .purge(policy, entry("purge"), entry("suspended"))
        .await
        .unwrap();
    assert!(none.messages.is_empty());
    s.mark_fetched(key, now - 5_000).await.unwrap();
    let done = s
        .purge(policy, entry("purge"), entry("suspended"))
        .await
        .unwrap();
    assert_eq!(done.messages, vec![mid(1)]);
    assert!(s.message(key).await.unwrap().is_none());
    let mut again = inline(mid(1), "urn:test:a");
    again.kind = MessageKind::Inbound;
    match s.accept(again).await.unwrap() {
        Accepted::Purged(r) => {
            assert_eq!(r.our_receipt.as_deref(), Some(&b"our receipt"[..]));
        }
        other => panic!("expected the purged record, got {other:?}"),
    }
    // The accept and the purge are audited; the repeat is not stored.
    assert_audit_log_whole(s, 2).await;
    // A clock far ahead of the last purge suspends it, audited once.
    let jump = PurgePolicy {
        now_ms: now + 10 * 86_400_000,
        ..policy
    };
    for first in [true, false] {
        let sum = s
            .purge(jump, entry("purge"), entry("suspended"))
            .await
            .unwrap();
        assert_eq!(sum.clock_jump.unwrap().first, first);
    }
    assert_audit_log_whole(s, 3).await;
}

async fn a_batch_of_messages_in_a_row_keeps_one_whole_audit_log(u: Under) {
    let s = Arc::clone(&u.store);
    // A claims batch: many messages at once, from concurrent callers.
    let accepts: Vec<_> = (0..60u32)
        .map(|n| {
            let s = Arc::clone(&s);
            tokio::spawn(async move { s.accept(inline(mid(n), "urn:test:a")).await })
        })
        .collect();
    for a in accepts {
        assert_eq!(a.await.unwrap().unwrap(), Accepted::Stored);
    }
    s.append_audit(None, (0..5).map(|n| entry(&format!("extra {n}"))).collect())
        .await
        .unwrap();
    assert_audit_log_whole(s.as_ref(), 65).await;
    let page = s.inbox_page(true, None, 10).await.unwrap();
    assert!(page.is_empty(), "relayed messages are not in the inbox");
}

// What only a shared store has: replicas on one database.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replica_under_a_running_replicas_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let a = replica(&db, "node-a", dir.path()).await.unwrap();
    let err = replica(&db, "node-a", dir.path()).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::NodeNameTaken(n) if n == "node-a"),
        "{err}"
    );
    // Another name is welcome; the name is free again once its holder stops.
    let b = replica(&db, "node-b", dir.path()).await.unwrap();
    drop(a);
    let mut again = None;
    for _ in 0..50 {
        match replica(&db, "node-a", dir.path()).await {
            Ok(r) => {
                again = Some(r);
                break;
            }
            Err(StoreError::NodeNameTaken(_)) => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        again.is_some(),
        "the name stayed taken after its replica stopped"
    );
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_work_and_the_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let replicas: Vec<Arc<dyn Store>> = vec![
        Arc::new(replica(&db, "r1", dir.path()).await.unwrap()),
        Arc::new(replica(&db, "r2", dir.path()).await.unwrap()),
        Arc::new(replica(&db, "r3", dir.path()).await.unwrap()),
    ];
    // Every message arrives at every replica at once (a peer retrying
    // through a load balancer): each is stored exactly once.
    let mut tasks = Vec::new();
    for n in 0..40u32 {
        for r in &replicas {
            let r = Arc::clone(r);
            tasks.push(tokio::spawn(async move {
                (n, r.accept(inline(mid(n), "urn:test:a")).await.unwrap())
            }));
        }
    }
    let mut stored = HashMap::new();
    for t in tasks {
        let (n, a) = t.await.unwrap();
        if a == Accepted::Stored {
            *stored.entry(n).or_insert(0) += 1;
        } else {
            assert!(matches!(a, Accepted::Duplicate(_)), "{a:?}");
        }
    }
    assert_eq!(stored.len(), 40);
    assert!(stored.values().all(|&c| c == 1), "{stored:?}");
    let url = db.url();
    assert_eq!(count(&url, "SELECT count(*) FROM messages"), 40);
    // The replicas claim at once: no item twice, none left out.
    let now = exchange_daemon::unix_ms(std::time::SystemTime::now());
    let claims: Vec<_> = replicas
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let r = Arc::clone(r);
            tokio::spawn(async move {
                let mut all = Vec::new();
                loop {
                    let got = r
                        .claim_due(&format!("r{}", i + 1), now, now + 60_000, 3)
                        .await
                        .unwrap();
                    if got.is_empty() {
                        return all;
                    }
                    all.extend(got);
                }
            })
        })
        .collect();
    let mut seen = HashSet::new();
    for c in claims {
        for d in c.await.unwrap() {
            assert!(seen.insert(d.id), "delivery {} claimed twice", d.id);
        }
    }
    assert_eq!(seen.len(), 40);
    // One audit log for the facility, whole, whichever replica appended.
    assert_audit_log_whole(replicas[0].as_ref(), 40).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_reckoned_by_the_database_clock() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let a = replica(&db, "a", dir.path()).await.unwrap();
    let b = replica(&db, "b", dir.path()).await.unwrap();
    a.accept(inline(mid(1), "urn:test:a")).await.unwrap();
    let now = exchange_daemon::unix_ms(std::time::SystemTime::now());
    assert_eq!(
        a.claim_due("a", now, now + 60_000, 10).await.unwrap().len(),
        1
    );
    // b's clock runs ten minutes ahead: by its own clock a's lease has
    // lapsed, by the database's it holds for another minute.
    let skewed = now + 600_000;
    assert!(
        b.claim_due("b", skewed, skewed + 60_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

/// The next `n` changes `rx` hears (each within ten seconds).
async fn next_changes(
    rx: &mut tokio::sync::broadcast::Receiver<StoreChange>,
    n: usize,
) -> Vec<StoreChange> {
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv()).await {
            Ok(Ok(change)) => got.push(change),
            Ok(Err(e)) => panic!("after {got:?}: {e}"),
            Err(_) => panic!("after {got:?}: no change announced within 10 s"),
        }
    }
    got
}

async fn key_of(s: &dyn Store, n: u32) -> MessageKey {
    s.find(uri("urn:test:a"), mid(n))
        .await
        .unwrap()
        .unwrap()
        .key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_announced_to_every_replica_and_claims_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let a = replica(&db, "a", dir.path()).await.unwrap();
    let b = replica(&db, "b", dir.path()).await.unwrap();
    let mut heard = a.changes().expect("a PostgreSQL replica hears changes");
    let mut heard_by_b = b.changes().unwrap();
    let now = || exchange_daemon::unix_ms(std::time::SystemTime::now());

    // Stored work is announced.
    b.accept(inline(mid(1), "urn:test:a")).await.unwrap();
    let k1 = key_of(&b, 1).await;
    // Claiming and renewing are not; an attempt counted is, as the
    // message's change, but a retry due later is not work yet.
    let t = now();
    let d1 = b.claim_due("b", t, t + 60_000, 10).await.unwrap().remove(0);
    assert_eq!(
        b.renew_claims("b", vec![(d1.id, d1.claim)], t + 90_000)
            .await
            .unwrap(),
        1
    );
    let retry = AttemptOutcome::Retry {
        error: "peer down".into(),
        next_attempt_ms: t + 3_600_000,
    };
    b.finish_attempt(d1.id, d1.claim, retry, vec![], vec![])
        .await
        .unwrap();
    // A claim given back is work again for whoever is idle.
    b.accept(inline(mid(2), "urn:test:a")).await.unwrap();
    let k2 = key_of(&b, 2).await;
    let t = now();
    let d2 = b.claim_due("b", t, t + 60_000, 10).await.unwrap();
    assert_eq!(d2.len(), 1, "only the second message is due");
    b.release_claim("b", vec![(d2[0].id, d2[0].claim)])
        .await
        .unwrap();
    // A receipt is a change of its message, whoever stores it (a too).
    a.add_receipts(k1, vec![receipt("urn:test:r1", b"r1", false)])
        .await
        .unwrap();
    // A delivery done is.
    let t = now();
    let d2 = b.claim_due("b", t, t + 60_000, 10).await.unwrap().remove(0);
    b.finish_attempt(d2.id, d2.claim, AttemptOutcome::Done, vec![], vec![])
        .await
        .unwrap();

    // Both replicas hear the same, in commit order, whichever made them.
    use StoreChange::{Message, Work};
    let expected = vec![Work, Message(k1), Work, Work, Message(k1), Message(k2)];
    assert_eq!(next_changes(&mut heard, 6).await, expected);
    assert_eq!(next_changes(&mut heard_by_b, 6).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_of_the_first_schema_is_migrated_and_keeps_its_messages() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let url = db.url();
    // A database as the first release left it, with a message waiting.
    execute(
        &url,
        "CREATE TABLE exchange_schema (id integer PRIMARY KEY CHECK (id = 1), \
         version integer NOT NULL); INSERT INTO exchange_schema VALUES (1, 1)",
    );
    execute(&url, MIGRATIONS[0]);
    {
        let old = replica(&db, "a", dir.path()).await.unwrap();
        assert_eq!(
            count(&url, "SELECT version::bigint FROM exchange_schema"),
            MIGRATIONS.len() as u64
        );
        old.accept(inline(mid(1), "urn:test:a")).await.unwrap();
    }
    execute(&url, "UPDATE exchange_schema SET version = 1");
    execute(
        &url,
        "DROP TRIGGER deliveries_announce ON deliveries; \
         DROP TRIGGER receipts_announce ON receipts; \
         DROP FUNCTION exchange_announce_delivery(); DROP FUNCTION exchange_announce_receipt()",
    );
    // Opened by this build: migrated, the waiting message kept, and its
    // changes announced.
    let a = replica(&db, "a", dir.path()).await.unwrap();
    assert_eq!(
        count(&url, "SELECT version::bigint FROM exchange_schema"),
        MIGRATIONS.len() as u64
    );
    assert_eq!(a.pending_count().await.unwrap(), 1);
    let mut heard = a.changes().unwrap();
    a.accept(inline(mid(2), "urn:test:a")).await.unwrap();
    assert_eq!(next_changes(&mut heard, 1).await, vec![StoreChange::Work]);
}
