//! Tests of the SQLite store against real files.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use std::fs;

use exchange_core::suite::sha256;
use tokio::sync::oneshot;

use super::*;
use crate::store::{DeliveryKind, DeliveryState, NewDelivery};

fn key(id: MessageId) -> MessageKey {
    MessageKey::of_id(id)
}

fn uri(s: &str) -> PartyUri {
    PartyUri::new(s).unwrap()
}

pub(crate) fn mid(n: u32) -> MessageId {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&n.to_be_bytes());
    b[15] = 0x5a;
    MessageId::from_bytes(b)
}

fn forward(target: &str, kind: DeliveryKind) -> NewDelivery {
    NewDelivery {
        target: uri(target),
        kind,
        expires_ms: 9_000_000,
    }
}

fn envelope(id: MessageId, kind: MessageKind, ciphertext: Ciphertext, len: u64) -> NewEnvelope {
    NewEnvelope {
        id,
        header_sha256: sha256(id.as_bytes()),
        kind,
        head: b"head bytes".to_vec(),
        ciphertext,
        ciphertext_len: len,
        sender: uri("urn:test:sender"),
        upstream: Some(uri("urn:test:upstream")),
        local_client: Some("client-1".into()),
        content_type: "application/fhir+json".into(),
        purpose: "treatment".into(),
        created_ms: 1_000,
        expires_ms: 9_000_000,
        received_ms: 2_000,
        our_receipt: Some(b"our receipt".to_vec()),
        deliveries: vec![forward("urn:test:next", DeliveryKind::Envelope)],
        awaited: Vec::new(),
        meta: None,
        provision: None,
        audit: Vec::new(),
        send_key: None,
    }
}

pub(crate) fn inline(id: MessageId, kind: MessageKind) -> NewEnvelope {
    let ct = format!("ciphertext of {id}").into_bytes();
    let len = ct.len() as u64;
    envelope(id, kind, Ciphertext::Inline(ct), len)
}

/// A receipt whose issuer is named after its bytes (one issuer, one
/// receipt): `b"r1"` is issued by `urn:test:7231`.
fn receipt(signed: &[u8], fwd: Option<NewDelivery>) -> NewReceipt {
    receipt_by(
        &format!("urn:test:{}", hex::encode(signed)),
        "DELIVERED",
        signed,
        fwd,
    )
}

fn receipt_by(
    issuer: &str,
    disposition: &str,
    signed: &[u8],
    fwd: Option<NewDelivery>,
) -> NewReceipt {
    NewReceipt {
        signed: signed.to_vec(),
        issuer: uri(issuer),
        disposition: disposition.into(),
        issued_ms: 3_000,
        verified_ms: 2_500,
        forward: fwd,
        provisions: Vec::new(),
        audit: None,
    }
}

fn spooled(store: &SqliteStore, data: &[u8]) -> Ciphertext {
    let mut s = store.spool().unwrap();
    s.file.write_all(data).unwrap();
    Ciphertext::Spooled(s)
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn read_all(c: &StoredCiphertext) -> Vec<u8> {
    let mut v = Vec::new();
    c.reader().unwrap().read_to_end(&mut v).unwrap();
    v
}

/// Blocks the writer thread until the returned sender is dropped or sent to.
pub(crate) async fn hold_writer(
    store: &Arc<SqliteStore>,
) -> (
    mpsc::Sender<()>,
    tokio::task::JoinHandle<Result<(), StoreError>>,
) {
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let (started_tx, started_rx) = oneshot::channel();
    let s = Arc::clone(store);
    let h = tokio::spawn(async move {
        s.write(move |_| {
            let _ = started_tx.send(());
            let _ = release_rx.recv();
            Ok(())
        })
        .await
    });
    started_rx.await.unwrap();
    (release_tx, h)
}

pub(crate) async fn wait_submitted(store: &SqliteStore, n: u64) {
    for _ in 0..10_000 {
        if store.writer_stats().ops_submitted >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("operations were not submitted");
}

#[tokio::test]
async fn accept_inline_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let id = mid(1);
    let env = inline(id, MessageKind::Relay);
    let ct = match &env.ciphertext {
        Ciphertext::Inline(v) => v.clone(),
        Ciphertext::Spooled(_) => unreachable!(),
    };
    assert_eq!(store.accept(env).await.unwrap(), Accepted::Stored);

    let m = store.message(key(id)).await.unwrap().unwrap();
    assert_eq!(
        m,
        MessageRecord {
            key: key(id),
            id,
            header_sha256: sha256(id.as_bytes()),
            kind: MessageKind::Relay,
            head: b"head bytes".to_vec(),
            ciphertext_len: ct.len() as u64,
            sender: uri("urn:test:sender"),
            upstream: Some(uri("urn:test:upstream")),
            local_client: Some("client-1".into()),
            content_type: "application/fhir+json".into(),
            purpose: "treatment".into(),
            created_ms: 1_000,
            expires_ms: 9_000_000,
            received_ms: 2_000,
            our_receipt: Some(b"our receipt".to_vec()),
            acked_ms: None,
            fetched_ms: None,
        }
    );
    match store.ciphertext(key(id)).await.unwrap() {
        StoredCiphertext::Inline(v) => assert_eq!(v, ct),
        other => panic!("expected inline, got {other:?}"),
    }
    let d = store.deliveries(key(id)).await.unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].message_id, id);
    assert_eq!(d[0].target, uri("urn:test:next"));
    assert_eq!(d[0].kind, DeliveryKind::Envelope);
    assert_eq!(d[0].state, DeliveryState::Pending);
    assert_eq!((d[0].attempts, d[0].next_attempt_ms), (0, 0));
    assert_eq!(d[0].expires_ms, 9_000_000);
    assert_eq!(store.pending_count().await.unwrap(), 1);
    assert!(store.message(key(mid(2))).await.unwrap().is_none());
    assert!(matches!(
        store.ciphertext(key(mid(2))).await,
        Err(StoreError::NotFound(_))
    ));
}

#[tokio::test]
async fn accept_spooled_moves_file_into_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let id = mid(7);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let ct = spooled(&store, &data);
    let env = envelope(id, MessageKind::Inbound, ct, data.len() as u64);
    assert_eq!(store.accept(env).await.unwrap(), Accepted::Stored);

    let stored = store.ciphertext(key(id)).await.unwrap();
    let StoredCiphertext::File(path) = &stored else {
        panic!("expected a blob file, got {stored:?}");
    };
    assert_eq!(path.parent().unwrap(), dir.path().join("blobs"));
    let expected_name = format!(
        "{}-{}",
        hex::encode(id.as_bytes()),
        hex::encode(&sha256(id.as_bytes())[..8])
    );
    assert_eq!(path.file_name().unwrap().to_str().unwrap(), expected_name);
    assert_eq!(fs::read(path).unwrap(), data);
    assert_eq!(read_all(&stored), data);
    assert!(files_in(&dir.path().join("spool")).is_empty());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "blob readable by others: {mode:o}");
    }
}

#[tokio::test]
async fn spooled_with_wrong_length_is_refused_and_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let env = envelope(mid(1), MessageKind::Relay, spooled(&store, b"abc"), 4);
    assert!(matches!(
        store.accept(env).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(files_in(&dir.path().join("spool")).is_empty());
    assert!(files_in(&dir.path().join("blobs")).is_empty());
    assert!(store.message(key(mid(1))).await.unwrap().is_none());
}

#[tokio::test]
async fn duplicate_accept_returns_stored_record_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let id = mid(3);
    store.accept(inline(id, MessageKind::Relay)).await.unwrap();
    let stored = store.message(key(id)).await.unwrap().unwrap();

    // Same id, different header and ciphertext, spooled, more deliveries.
    let mut again = envelope(id, MessageKind::Inbound, spooled(&store, b"other"), 5);
    again.header_sha256 = [9; 32];
    again
        .deliveries
        .push(forward("urn:test:other", DeliveryKind::Envelope));
    match store.accept(again).await.unwrap() {
        Accepted::Duplicate(r) => assert_eq!(*r, stored),
        Accepted::Stored => panic!("stored twice"),
        Accepted::Purged(_) => panic!("never purged"),
    }
    assert_eq!(store.message(key(id)).await.unwrap().unwrap(), stored);
    assert_eq!(store.deliveries(key(id)).await.unwrap().len(), 1);
    assert_eq!(store.pending_count().await.unwrap(), 1);
    assert!(files_in(&dir.path().join("blobs")).is_empty());
    assert!(files_in(&dir.path().join("spool")).is_empty());
}

#[tokio::test]
async fn same_header_spooled_redelivery_keeps_the_stored_blob() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let id = mid(4);
    let env = envelope(id, MessageKind::Relay, spooled(&store, b"first"), 5);
    store.accept(env).await.unwrap();
    let env = envelope(id, MessageKind::Relay, spooled(&store, b"again"), 5);
    assert!(matches!(
        store.accept(env).await.unwrap(),
        Accepted::Duplicate(_)
    ));
    assert_eq!(files_in(&dir.path().join("blobs")).len(), 1);
    assert_eq!(
        read_all(&store.ciphertext(key(id)).await.unwrap()),
        b"first"
    );
    assert_eq!(store.deliveries(key(id)).await.unwrap().len(), 1);
}

#[tokio::test]
async fn claim_due_respects_next_attempt_lease_and_limit() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    for n in 1..=4 {
        store
            .accept(inline(mid(n), MessageKind::Relay))
            .await
            .unwrap();
    }
    let ids: Vec<i64> = {
        let mut v = Vec::new();
        for n in 1..=4 {
            v.push(store.deliveries(key(mid(n))).await.unwrap()[0].id);
        }
        v
    };
    // Delivery 0 is not due before 1000.
    store
        .finish_attempt(
            ids[0],
            0,
            AttemptOutcome::Retry {
                error: "down".into(),
                next_attempt_ms: 1_000,
            },
            vec![],
            vec![],
        )
        .await
        .unwrap();

    assert!(store.claim_due("a", 500, 600, 0).await.unwrap().is_empty());
    let a = store.claim_due("a", 500, 600, 1).await.unwrap();
    assert_eq!(a.iter().map(|d| d.id).collect::<Vec<_>>(), vec![ids[1]]);
    let b = store.claim_due("b", 500, 600, 10).await.unwrap();
    assert_eq!(
        b.iter().map(|d| d.id).collect::<Vec<_>>(),
        vec![ids[2], ids[3]]
    );
    // Everything due is claimed while the leases hold (also at their end).
    assert!(store.claim_due("c", 600, 700, 10).await.unwrap().is_empty());
    // After the leases: the three come back, in order; the retry is still not due.
    let c = store.claim_due("c", 601, 2_000, 10).await.unwrap();
    assert_eq!(
        c.iter().map(|d| d.id).collect::<Vec<_>>(),
        vec![ids[1], ids[2], ids[3]]
    );
    // At 2001 c's leases have lapsed and the retry is due: ordered by
    // next attempt (0, 0, 0, 1000), then id.
    let d = store.claim_due("d", 2_001, 3_000, 10).await.unwrap();
    assert_eq!(
        d.iter().map(|d| d.id).collect::<Vec<_>>(),
        vec![ids[1], ids[2], ids[3], ids[0]]
    );
    assert_eq!(d[3].attempts, 1);
    assert_eq!(d[3].next_attempt_ms, 1_000);
    assert_eq!(d[3].last_error.as_deref(), Some("down"));
}

#[tokio::test]
async fn claim_fair_takes_targets_in_turn_and_caps_each() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    // Six items for a busy target queued before two for a quiet one.
    for n in 1..=8 {
        let mut e = inline(mid(n), MessageKind::Relay);
        let target = if n <= 6 {
            "urn:test:busy"
        } else {
            "urn:test:quiet"
        };
        e.deliveries = vec![forward(target, DeliveryKind::Envelope)];
        store.accept(e).await.unwrap();
    }
    let targets = |v: &[DeliveryRecord]| {
        v.iter()
            .map(|d| d.target.as_str().to_owned())
            .collect::<Vec<_>>()
    };
    // Taking turns: the quiet target's first item comes second, not seventh.
    let a = store
        .claim_fair("a", 10, 1_000, 3, usize::MAX, HashMap::new())
        .await
        .unwrap();
    assert_eq!(
        targets(&a),
        vec!["urn:test:busy", "urn:test:quiet", "urn:test:busy"]
    );
    assert_eq!(a[0].message_id, mid(1));
    assert_eq!(a[1].message_id, mid(7));
    assert_eq!(a[2].message_id, mid(2));
    // At most two per target, counting the one already running there.
    let busy = HashMap::from([(uri("urn:test:busy"), 1)]);
    let b = store.claim_fair("b", 10, 1_000, 10, 2, busy).await.unwrap();
    assert_eq!(targets(&b), vec!["urn:test:busy", "urn:test:quiet"]);
    assert_eq!(b[0].message_id, mid(3));
    assert_eq!(b[1].message_id, mid(8));
    // A target at its cap gets nothing; the rest stay unclaimed for later.
    let busy = HashMap::from([(uri("urn:test:busy"), 2)]);
    assert!(
        store
            .claim_fair("c", 10, 1_000, 10, 2, busy)
            .await
            .unwrap()
            .is_empty()
    );
    let d = store
        .claim_fair("d", 10, 1_000, 10, 2, HashMap::new())
        .await
        .unwrap();
    assert_eq!(
        d.iter().map(|d| d.message_id).collect::<Vec<_>>(),
        vec![mid(4), mid(5)]
    );
    assert!(
        store
            .claim_fair("e", 10, 1_000, 10, 0, HashMap::new())
            .await
            .unwrap()
            .is_empty()
    );
}

/// Claiming runs after every finished attempt: it must read each next hop's
/// oldest due items from an index, never scan and sort the whole backlog.
#[test]
fn claiming_reads_each_targets_due_items_from_an_index() {
    let dir = tempfile::tempdir().unwrap();
    drop(SqliteStore::open(dir.path()).unwrap());
    let conn = Connection::open(dir.path().join("store.sqlite3")).unwrap();
    let plan = |sql: &str| {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let n = stmt.parameter_count();
        stmt.query_map(rusqlite::params_from_iter(vec![0; n]), |r| {
            r.get::<_, String>(3)
        })
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
        .join("; ")
    };
    for sql in [
        super::NEXT_PENDING_TARGET.to_owned(),
        super::due_for_target_sql(),
    ] {
        let p = plan(&sql);
        assert!(p.contains("INDEX deliveries_target_due"), "{sql}: {p}");
        assert!(!p.contains("TEMP B-TREE"), "{sql}: {p}");
    }
}

#[tokio::test]
async fn release_claims_frees_only_that_owner() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    for n in 1..=3 {
        store
            .accept(inline(mid(n), MessageKind::Relay))
            .await
            .unwrap();
    }
    assert_eq!(store.claim_due("a", 10, 1_000, 2).await.unwrap().len(), 2);
    assert_eq!(store.claim_due("b", 10, 1_000, 2).await.unwrap().len(), 1);
    assert_eq!(store.release_claims("a").await.unwrap(), 2);
    assert_eq!(store.release_claims("a").await.unwrap(), 0);
    // a's two are claimable again at once; b's is not.
    assert_eq!(store.claim_due("c", 11, 1_000, 10).await.unwrap().len(), 2);
    assert_eq!(store.release_claims("b").await.unwrap(), 1);
}

#[tokio::test]
async fn finish_attempt_sets_state_and_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    store
        .accept(inline(mid(1), MessageKind::Relay))
        .await
        .unwrap();
    store
        .accept(inline(mid(2), MessageKind::Relay))
        .await
        .unwrap();
    let first = store.claim_due("w", 0, 100, 1).await.unwrap()[0].clone();
    let d1 = first.id;
    assert_eq!(first.claim, 1);
    let d2 = store.deliveries(key(mid(2))).await.unwrap()[0].id;

    store
        .finish_attempt(
            d1,
            first.claim,
            AttemptOutcome::Retry {
                error: "timeout".into(),
                next_attempt_ms: 5_000,
            },
            vec![],
            vec![],
        )
        .await
        .unwrap();
    let r = &store.deliveries(key(mid(1))).await.unwrap()[0];
    assert_eq!(r.state, DeliveryState::Pending);
    assert_eq!(r.attempts, 1);
    assert_eq!(r.next_attempt_ms, 5_000);
    assert_eq!(r.last_error.as_deref(), Some("timeout"));
    // The claim was cleared: due again at 5000 without waiting for the lease.
    let again = store.claim_due("x", 5_000, 5_001, 10).await.unwrap();
    assert_eq!(again.len(), 2);
    let token = |id| again.iter().find(|d| d.id == id).unwrap().claim;
    assert_eq!((token(d1), token(d2)), (2, 1));

    store
        .finish_attempt(d1, token(d1), AttemptOutcome::Done, vec![], vec![])
        .await
        .unwrap();
    let r = &store.deliveries(key(mid(1))).await.unwrap()[0];
    assert_eq!((r.state.clone(), r.attempts), (DeliveryState::Done, 2));

    store
        .finish_attempt(
            d2,
            token(d2),
            AttemptOutcome::Failed("refused".into()),
            vec![],
            vec![],
        )
        .await
        .unwrap();
    let r = &store.deliveries(key(mid(2))).await.unwrap()[0];
    assert_eq!(r.state, DeliveryState::Failed("refused".into()));
    assert_eq!(r.attempts, 1);
    assert_eq!(store.pending_count().await.unwrap(), 0);

    // A late report does not reopen a finished delivery.
    store
        .finish_attempt(
            d1,
            token(d1),
            AttemptOutcome::Retry {
                error: "late".into(),
                next_attempt_ms: 1,
            },
            vec![],
            vec![],
        )
        .await
        .unwrap();
    let r = &store.deliveries(key(mid(1))).await.unwrap()[0];
    assert_eq!((r.state.clone(), r.attempts), (DeliveryState::Done, 2));
    assert!(matches!(
        store
            .finish_attempt(d2 + 100, 0, AttemptOutcome::Done, vec![], vec![])
            .await,
        Err(StoreError::NotFound(_))
    ));
}

#[tokio::test]
async fn receipts_are_deduplicated_and_forwarded_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let id = mid(1);
    store.accept(inline(id, MessageKind::Relay)).await.unwrap();
    let fwd = |bytes: &[u8]| {
        Some(forward(
            "urn:test:upstream",
            DeliveryKind::Receipt(bytes.to_vec()),
        ))
    };

    let n = store
        .add_receipts(
            key(id),
            vec![
                receipt(b"r1", fwd(b"r1")),
                receipt(b"r1", fwd(b"r1")),
                receipt(b"r2", None),
            ],
        )
        .await
        .unwrap();
    assert_eq!(n, 2);
    assert_eq!(
        store
            .add_receipts(key(id), vec![receipt(b"r1", fwd(b"r1"))])
            .await
            .unwrap(),
        0
    );

    // finish_attempt brings r3 (new) and r1 (known) back.
    let envelope_delivery = store.deliveries(key(id)).await.unwrap()[0].id;
    store
        .finish_attempt(
            envelope_delivery,
            0,
            AttemptOutcome::Done,
            vec![receipt(b"r3", fwd(b"r3")), receipt(b"r1", fwd(b"r1"))],
            vec![],
        )
        .await
        .unwrap();

    let rs = store.receipts(key(id)).await.unwrap();
    assert_eq!(
        rs.iter().map(|r| r.signed.as_slice()).collect::<Vec<_>>(),
        vec![&b"r1"[..], b"r2", b"r3"]
    );
    assert_eq!(rs[0].issuer, uri("urn:test:7231"));
    assert_eq!(rs[0].disposition, "DELIVERED");
    assert_eq!(rs[0].issued_ms, 3_000);
    assert_eq!(rs[0].verified_ms, Some(2_500));

    let ds = store.deliveries(key(id)).await.unwrap();
    let kinds: Vec<DeliveryKind> = ds.iter().map(|d| d.kind.clone()).collect();
    assert_eq!(
        kinds,
        vec![
            DeliveryKind::Envelope,
            DeliveryKind::Receipt(b"r1".to_vec()),
            DeliveryKind::Receipt(b"r3".to_vec()),
        ]
    );
    assert_eq!(ds[1].state, DeliveryState::Pending);
    assert_eq!(ds[1].target, uri("urn:test:upstream"));
    assert_eq!(store.pending_count().await.unwrap(), 2);

    assert!(matches!(
        store
            .add_receipts(key(mid(99)), vec![receipt(b"x", None)])
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert!(store.receipts(key(mid(99))).await.unwrap().is_empty());
}

#[tokio::test]
async fn one_receipt_per_issuer_and_disposition_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let id = mid(1);
    store.accept(inline(id, MessageKind::Relay)).await.unwrap();
    let fwd = |bytes: &[u8]| {
        Some(forward(
            "urn:test:upstream",
            DeliveryKind::Receipt(bytes.to_vec()),
        ))
    };
    let audited = |issuer: &str, disposition: &str, bytes: &[u8]| {
        let mut r = receipt_by(issuer, disposition, bytes, fwd(bytes));
        r.audit = Some(AuditEntry {
            seq: 0,
            time_ms: 0,
            party: "urn:test:us".into(),
            actor: "peer:urn:test:c".into(),
            action: exchange_core::audit::AuditAction::Receipt,
            message_id: Some(id.to_string()),
            subjects: Vec::new(),
            outcome: exchange_core::audit::AuditOutcome::Ok,
            reason: None,
            detail: None,
            subject_set: None,
        });
        r
    };
    // Two variants of one DELIVERED in one call, a REJECTED of the same
    // issuer and a DELIVERED of another: three are new.
    let n = store
        .add_receipts(
            key(id),
            vec![
                audited("urn:test:c", "DELIVERED", b"d1"),
                audited("urn:test:c", "DELIVERED", b"d2"),
                audited("urn:test:c", "REJECTED", b"x1"),
                audited("urn:test:d", "DELIVERED", b"e1"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(n, 3);
    // Later variants with other bytes, in other calls and through an
    // attempt's outcome: none is new.
    for i in 0..20u8 {
        let n = store
            .add_receipts(
                key(id),
                vec![audited("urn:test:c", "DELIVERED", &[b'v', i])],
            )
            .await
            .unwrap();
        assert_eq!(n, 0);
    }
    let envelope_delivery = store.deliveries(key(id)).await.unwrap()[0].id;
    store
        .finish_attempt(
            envelope_delivery,
            0,
            AttemptOutcome::Done,
            vec![audited("urn:test:d", "DELIVERED", b"e2")],
            vec![],
        )
        .await
        .unwrap();
    let rs = store.receipts(key(id)).await.unwrap();
    assert_eq!(
        rs.iter().map(|r| r.signed.as_slice()).collect::<Vec<_>>(),
        vec![&b"d1"[..], b"x1", b"e1"]
    );
    // Forwarded once each, audited once each.
    let forwarded = store
        .deliveries(key(id))
        .await
        .unwrap()
        .into_iter()
        .filter(|d| matches!(d.kind, DeliveryKind::Receipt(_)))
        .count();
    assert_eq!(forwarded, 3);
    assert_eq!(store.audit_tail().await.unwrap().entries.len(), 3);
}

#[tokio::test]
async fn migration_7_keeps_the_first_of_duplicate_receipts() {
    let dir = tempfile::tempdir().unwrap();
    let conn = Connection::open(dir.path().join("store.sqlite3")).unwrap();
    for m in &MIGRATIONS[..6] {
        conn.execute_batch(m).unwrap();
    }
    conn.execute_batch("PRAGMA user_version = 6").unwrap();
    conn.execute(
        "INSERT INTO messages (id, header_sha256, kind, head, ciphertext, ciphertext_len, sender, \
         content_type, purpose, created_ms, expires_ms, received_ms) \
         VALUES (?1, ?2, 'relay', x'01', x'02', 1, 'urn:test:s', 'c', 'p', 1, 2, 3)",
        rusqlite::params![[9u8; 16], [0u8; 32]],
    )
    .unwrap();
    for (i, (issuer, disposition)) in [
        ("urn:test:c", "DELIVERED"),
        ("urn:test:c", "DELIVERED"),
        ("urn:test:c", "PROCESSED"),
        ("urn:test:c", "DELIVERED"),
    ]
    .iter()
    .enumerate()
    {
        let signed = vec![u8::try_from(i).unwrap()];
        conn.execute(
            "INSERT INTO receipts (message_id, digest, issuer, disposition, issued_ms, signed) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            rusqlite::params![[9u8; 16], sha256(&signed), issuer, disposition, 5, signed],
        )
        .unwrap();
    }
    drop(conn);
    let store = SqliteStore::open(dir.path()).unwrap();
    let id = MessageId::from_slice(&[9u8; 16]).unwrap();
    let rs = store.receipts(key(id)).await.unwrap();
    assert_eq!(
        rs.iter()
            .map(|r| (r.signed.clone(), r.disposition.as_str(), r.verified_ms))
            .collect::<Vec<_>>(),
        vec![(vec![0], "DELIVERED", None), (vec![2], "PROCESSED", None)]
    );
    assert_eq!(
        store
            .add_receipts(
                key(id),
                vec![receipt_by("urn:test:c", "DELIVERED", b"n", None)]
            )
            .await
            .unwrap(),
        0
    );
}

#[tokio::test]
async fn acknowledge_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let id = mid(1);
    store
        .accept(inline(id, MessageKind::Inbound))
        .await
        .unwrap();
    store
        .accept(inline(mid(2), MessageKind::Relay))
        .await
        .unwrap();
    let back = || {
        Some(forward(
            "urn:test:upstream",
            DeliveryKind::Receipt(b"processed".to_vec()),
        ))
    };

    assert!(
        store
            .acknowledge(key(id), 7_000, receipt(b"processed", back()))
            .await
            .unwrap()
    );
    assert!(
        !store
            .acknowledge(key(id), 8_000, receipt(b"processed again", back()))
            .await
            .unwrap()
    );
    assert_eq!(
        store.message(key(id)).await.unwrap().unwrap().acked_ms,
        Some(7_000)
    );
    let rs = store.receipts(key(id)).await.unwrap();
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].signed, b"processed");
    assert_eq!(store.deliveries(key(id)).await.unwrap().len(), 2);

    assert!(store.inbox(false).await.unwrap().is_empty());
    assert_eq!(store.inbox(true).await.unwrap().len(), 1);
    assert!(matches!(
        store.acknowledge(key(mid(2)), 1, receipt(b"p", None)).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.acknowledge(key(mid(3)), 1, receipt(b"p", None)).await,
        Err(StoreError::NotFound(_))
    ));
}

#[tokio::test]
async fn inbox_is_ordered_by_received_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    for (n, t) in [(1, 300), (2, 100), (3, 200)] {
        let mut e = inline(mid(n), MessageKind::Inbound);
        e.received_ms = t;
        store.accept(e).await.unwrap();
    }
    store
        .accept(inline(mid(4), MessageKind::Relay))
        .await
        .unwrap();
    let ids: Vec<MessageId> = store
        .inbox(false)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, vec![mid(2), mid(3), mid(1)]);
}

#[tokio::test]
async fn everything_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (msg1, msg2, ds, rs) = {
        let store = SqliteStore::open(dir.path()).unwrap();
        store
            .accept(inline(mid(1), MessageKind::Relay))
            .await
            .unwrap();
        let env = envelope(mid(2), MessageKind::Inbound, spooled(&store, b"blob"), 4);
        store.accept(env).await.unwrap();
        let d = store.claim_due("w", 0, 100, 1).await.unwrap()[0].clone();
        store
            .finish_attempt(
                d.id,
                d.claim,
                AttemptOutcome::Retry {
                    error: "e".into(),
                    next_attempt_ms: 50,
                },
                vec![receipt(b"r", None)],
                vec![],
            )
            .await
            .unwrap();
        store
            .acknowledge(key(mid(2)), 60, receipt(b"p", None))
            .await
            .unwrap();
        (
            store.message(key(mid(1))).await.unwrap().unwrap(),
            store.message(key(mid(2))).await.unwrap().unwrap(),
            store.deliveries(key(mid(1))).await.unwrap(),
            store.receipts(key(mid(1))).await.unwrap(),
        )
    };
    let store = SqliteStore::open(dir.path()).unwrap();
    assert_eq!(store.message(key(mid(1))).await.unwrap().unwrap(), msg1);
    assert_eq!(store.message(key(mid(2))).await.unwrap().unwrap(), msg2);
    assert_eq!(msg2.acked_ms, Some(60));
    assert_eq!(store.deliveries(key(mid(1))).await.unwrap(), ds);
    assert_eq!(ds[0].attempts, 1);
    assert_eq!(store.receipts(key(mid(1))).await.unwrap(), rs);
    assert_eq!(rs.len(), 1);
    assert_eq!(
        read_all(&store.ciphertext(key(mid(2))).await.unwrap()),
        b"blob"
    );
    assert_eq!(store.pending_count().await.unwrap(), 2);
}

#[tokio::test]
async fn open_removes_orphans_and_keeps_referenced_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = dir.path().join("blobs");
    let spool = dir.path().join("spool");
    let kept = {
        let store = SqliteStore::open(dir.path()).unwrap();
        let env = envelope(mid(1), MessageKind::Relay, spooled(&store, b"keep me"), 7);
        store.accept(env).await.unwrap();
        let kept = files_in(&blobs);
        assert_eq!(kept.len(), 1);
        // A spool file a caller never finished (kept alive past the drop).
        let left = store.spool().unwrap();
        std::mem::forget(left);
        kept
    };
    fs::write(blobs.join("00112233-orphan"), b"orphan").unwrap();
    fs::write(spool.join("stray.spool"), b"partial").unwrap();
    assert_eq!(files_in(&spool).len(), 2);

    let store = SqliteStore::open(dir.path()).unwrap();
    assert_eq!(files_in(&blobs), kept);
    assert!(files_in(&spool).is_empty());
    assert_eq!(
        read_all(&store.ciphertext(key(mid(1))).await.unwrap()),
        b"keep me"
    );
}

#[tokio::test]
async fn a_directory_opens_once_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    assert!(matches!(
        SqliteStore::open(dir.path()),
        Err(StoreError::Io { .. })
    ));
    drop(store);
    SqliteStore::open(dir.path()).unwrap();
}

#[tokio::test]
async fn a_version_1_store_migrates_keeping_its_messages() {
    let dir = tempfile::tempdir().unwrap();
    let conn = Connection::open(dir.path().join("store.sqlite3")).unwrap();
    conn.execute_batch(MIGRATIONS[0]).unwrap();
    conn.execute_batch("PRAGMA user_version = 1").unwrap();
    conn.execute(
        "INSERT INTO messages (id, header_sha256, kind, head, ciphertext, ciphertext_len, sender, \
         content_type, purpose, created_ms, expires_ms, received_ms) \
         VALUES (?1, ?2, 'inbound', x'01', x'02', 1, 'urn:test:s', 'c', 'p', 1, 2, 3)",
        rusqlite::params![[9u8; 16], [0u8; 32]],
    )
    .unwrap();
    drop(conn);
    let store = SqliteStore::open(dir.path()).unwrap();
    let id = MessageId::from_slice(&[9u8; 16]).unwrap();
    assert_eq!(store.message(key(id)).await.unwrap().unwrap().purpose, "p");
    // A row from before keys existed: its key is its id, found by (sender, id).
    let found = store.find(uri("urn:test:s"), id).await.unwrap().unwrap();
    assert_eq!((found.key, found.id), (key(id), id));
    // The new tables work on the migrated store.
    store.append_audit(None, vec![]).await.unwrap();
    assert_eq!(store.audit_tail().await.unwrap(), AuditTail::default());
    drop(store);
    let conn = Connection::open(dir.path().join("store.sqlite3")).unwrap();
    let v: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, MIGRATIONS.len() as i64);
}

#[tokio::test]
async fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(SqliteStore::open(dir.path()).unwrap());
    let conn = Connection::open(dir.path().join("store.sqlite3")).unwrap();
    conn.execute_batch("PRAGMA user_version = 99").unwrap();
    drop(conn);
    match SqliteStore::open(dir.path()) {
        Err(StoreError::SchemaTooNew { found, supported }) => {
            assert_eq!((found, supported), (99, MIGRATIONS.len() as u32));
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_accepts_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
    let before = store.writer_stats();
    let (release, blocker) = hold_writer(&store).await;

    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..200 {
        let s = Arc::clone(&store);
        tasks.spawn(async move { s.accept(inline(mid(n), MessageKind::Relay)).await });
    }
    wait_submitted(&store, before.ops_submitted + 201).await;
    release.send(()).unwrap();
    blocker.await.unwrap().unwrap();
    while let Some(r) = tasks.join_next().await {
        assert_eq!(r.unwrap().unwrap(), Accepted::Stored);
    }

    for n in 0..200 {
        assert!(
            store.message(key(mid(n))).await.unwrap().is_some(),
            "{n} missing"
        );
    }
    assert_eq!(store.pending_count().await.unwrap(), 200);
    let after = store.writer_stats();
    // One commit for the blocker, one for the 200 queued behind it.
    assert_eq!(
        after.transactions_committed - before.transactions_committed,
        2
    );
}

#[tokio::test]
async fn a_failing_operation_loses_only_itself() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
    let m = mid(100);
    store.accept(inline(m, MessageKind::Relay)).await.unwrap();
    let before = store.writer_stats();
    let (release, blocker) = hold_writer(&store).await;

    let s = Arc::clone(&store);
    let a = tokio::spawn(async move { s.accept(inline(mid(1), MessageKind::Relay)).await });
    // Writes a receipt, then fails: its savepoint must undo the receipt.
    let s = Arc::clone(&store);
    let partial = tokio::spawn(async move {
        let r = ReceiptRow::new(receipt(b"undone", None)).unwrap();
        s.write(move |conn| {
            assert_eq!(insert_receipts(conn, &key(m), &[r])?, 1);
            Err::<(), _>(StoreError::Invalid("fail after writing".into()))
        })
        .await
    });
    // Violates the foreign key (no such message) inside the writer.
    let s = Arc::clone(&store);
    let fk = tokio::spawn(async move {
        let r = ReceiptRow::new(receipt(b"orphan", None)).unwrap();
        s.write(move |conn| insert_receipts(conn, &key(mid(999)), &[r]))
            .await
    });
    let s = Arc::clone(&store);
    let missing = tokio::spawn(async move {
        s.add_receipts(key(mid(998)), vec![receipt(b"x", None)])
            .await
    });
    let s = Arc::clone(&store);
    let b = tokio::spawn(async move { s.accept(inline(mid(2), MessageKind::Relay)).await });
    let s = Arc::clone(&store);
    let kept =
        tokio::spawn(async move { s.add_receipts(key(m), vec![receipt(b"kept", None)]).await });

    wait_submitted(&store, before.ops_submitted + 7).await;
    release.send(()).unwrap();
    blocker.await.unwrap().unwrap();

    assert_eq!(a.await.unwrap().unwrap(), Accepted::Stored);
    assert!(matches!(
        partial.await.unwrap(),
        Err(StoreError::Invalid(_))
    ));
    // SQLite's own words, under the backend's name.
    match fk.await.unwrap() {
        Err(e @ StoreError::Backend { .. }) => {
            assert_eq!(e.to_string(), "sqlite: FOREIGN KEY constraint failed");
        }
        other => panic!("expected a backend error, got {other:?}"),
    }
    assert!(matches!(
        missing.await.unwrap(),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(b.await.unwrap().unwrap(), Accepted::Stored);
    assert_eq!(kept.await.unwrap().unwrap(), 1);

    assert!(store.message(key(mid(1))).await.unwrap().is_some());
    assert!(store.message(key(mid(2))).await.unwrap().is_some());
    let rs = store.receipts(key(m)).await.unwrap();
    assert_eq!(
        rs.iter().map(|r| r.signed.as_slice()).collect::<Vec<_>>(),
        vec![&b"kept"[..]]
    );
    assert!(store.receipts(key(mid(999))).await.unwrap().is_empty());
    let after = store.writer_stats();
    assert_eq!(
        after.transactions_committed - before.transactions_committed,
        2
    );
}

#[tokio::test]
async fn out_of_range_values_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let mut e = inline(mid(1), MessageKind::Relay);
    e.expires_ms = u64::MAX;
    assert!(matches!(store.accept(e).await, Err(StoreError::Invalid(_))));
    assert!(store.message(key(mid(1))).await.unwrap().is_none());
}

#[tokio::test]
async fn two_senders_envelopes_under_one_id_are_two_messages() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let id = mid(40);
    let first = inline(id, MessageKind::Inbound);
    assert_eq!(store.accept(first).await.unwrap(), Accepted::Stored);
    let mut other = envelope(id, MessageKind::Inbound, spooled(&store, b"other"), 5);
    other.sender = uri("urn:test:squatter");
    other.header_sha256 = [7; 32];
    assert_eq!(store.accept(other).await.unwrap(), Accepted::Stored);

    let both = store.messages_by_id(id).await.unwrap();
    assert_eq!(both.len(), 2);
    assert!(both.iter().all(|m| m.id == id));
    assert_ne!(both[0].key, both[1].key, "each its own key");
    let a = store
        .find(uri("urn:test:sender"), id)
        .await
        .unwrap()
        .unwrap();
    let b = store
        .find(uri("urn:test:squatter"), id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.key, key(id), "the first keeps its id as key");
    assert_eq!(b.header_sha256, [7; 32]);
    assert_eq!(read_all(&store.ciphertext(b.key).await.unwrap()), b"other");
    assert_eq!(store.deliveries(b.key).await.unwrap().len(), 1);
    assert_eq!(store.deliveries(b.key).await.unwrap()[0].message_id, id);

    // The same sender under the same id is still the one stored message.
    let mut again = envelope(id, MessageKind::Inbound, spooled(&store, b"third"), 5);
    again.sender = uri("urn:test:squatter");
    again.header_sha256 = [8; 32];
    match store.accept(again).await.unwrap() {
        Accepted::Duplicate(r) => assert_eq!(*r, b),
        other => panic!("{other:?}"),
    }
    assert_eq!(store.messages_by_id(id).await.unwrap().len(), 2);
    assert_eq!(store.messages_by_id(mid(41)).await.unwrap(), Vec::new());
}

#[tokio::test]
async fn a_full_writer_queue_makes_writers_wait_then_serves_them_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
    let before = store.writer_stats();
    let (release, blocker) = hold_writer(&store).await;

    // A current-thread runtime polls the tasks in the order spawned, so
    // they reach the queue (or its wait list) in that order.
    let order = Arc::new(Mutex::new(Vec::new()));
    let n = WRITER_QUEUE + 40;
    let mut tasks = Vec::new();
    for i in 0..n {
        let s = Arc::clone(&store);
        let order = Arc::clone(&order);
        tasks.push(tokio::spawn(async move {
            s.write(move |_| {
                order.lock().unwrap().push(i);
                Ok(i)
            })
            .await
        }));
    }
    wait_submitted(&store, before.ops_submitted + 1 + WRITER_QUEUE as u64).await;
    // The queue is full: the others wait for a place instead of piling up.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        store.writer_stats().ops_submitted,
        before.ops_submitted + 1 + WRITER_QUEUE as u64,
        "writers beyond the queue's capacity did not wait"
    );
    assert!(order.lock().unwrap().is_empty());

    release.send(()).unwrap();
    blocker.await.unwrap().unwrap();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().unwrap(), i);
    }
    assert_eq!(*order.lock().unwrap(), (0..n).collect::<Vec<_>>());
    assert_eq!(
        store.writer_stats().ops_submitted,
        before.ops_submitted + 1 + n as u64
    );
}

#[tokio::test]
async fn a_panicking_operation_fails_alone_and_the_writer_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
    let m = mid(100);
    store.accept(inline(m, MessageKind::Relay)).await.unwrap();
    let before = store.writer_stats();
    let (release, blocker) = hold_writer(&store).await;

    let s = Arc::clone(&store);
    let a = tokio::spawn(async move { s.accept(inline(mid(1), MessageKind::Relay)).await });
    // Writes a receipt, then panics: its savepoint must undo the receipt.
    let s = Arc::clone(&store);
    let boom = tokio::spawn(async move {
        let r = ReceiptRow::new(receipt(b"undone", None)).unwrap();
        s.write(move |conn| -> Result<(), StoreError> {
            assert_eq!(insert_receipts(conn, &key(m), &[r])?, 1);
            panic!("a bug in one write operation");
        })
        .await
    });
    let s = Arc::clone(&store);
    let b = tokio::spawn(async move { s.accept(inline(mid(2), MessageKind::Relay)).await });
    wait_submitted(&store, before.ops_submitted + 4).await;
    release.send(()).unwrap();
    blocker.await.unwrap().unwrap();

    assert_eq!(a.await.unwrap().unwrap(), Accepted::Stored);
    match boom.await.unwrap() {
        Err(StoreError::Panicked(why)) => {
            assert!(why.contains("a bug in one write operation"), "{why}");
        }
        other => panic!("expected a Panicked error, got {other:?}"),
    }
    assert_eq!(b.await.unwrap().unwrap(), Accepted::Stored);
    assert!(store.receipts(key(m)).await.unwrap().is_empty());
    assert!(store.message(key(mid(1))).await.unwrap().is_some());
    assert!(store.message(key(mid(2))).await.unwrap().is_some());
    // The writer still serves.
    assert_eq!(
        store
            .accept(inline(mid(3), MessageKind::Relay))
            .await
            .unwrap(),
        Accepted::Stored
    );
    let after = store.writer_stats();
    // The blocker's, the batch with the panic, the last accept.
    assert_eq!(
        after.transactions_committed - before.transactions_committed,
        3
    );
    // Nothing says the store failed.
    let failed = tokio::time::timeout(Duration::from_millis(100), store.failure()).await;
    assert!(failed.is_err(), "store reported a failure: {failed:?}");
}

/// A job that kills the writer thread: it panics outside any one
/// operation (in its reply).
struct KillWriter;

impl Job for KillWriter {
    fn run(&mut self, _conn: &Connection) -> bool {
        true
    }
    fn reply(self: Box<Self>, _batch: Option<&rusqlite::Error>) {
        panic!("the writer thread is killed");
    }
}

#[tokio::test]
async fn a_dead_writer_closes_the_store_and_reports_its_failure() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    store
        .accept(inline(mid(1), MessageKind::Relay))
        .await
        .unwrap();
    store
        .writer_tx
        .as_ref()
        .unwrap()
        .send(Box::new(KillWriter))
        .await
        .unwrap();
    let why = tokio::time::timeout(Duration::from_secs(5), store.failure())
        .await
        .expect("the writer's death was not reported");
    assert!(why.contains("the writer thread is killed"), "{why}");
    assert!(matches!(
        store.accept(inline(mid(2), MessageKind::Relay)).await,
        Err(StoreError::Closed)
    ));
    // Reads still work.
    assert!(store.message(key(mid(1))).await.unwrap().is_some());
}

#[tokio::test]
async fn inbox_pages_follow_received_time_then_id() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    // Five at the same time (the id decides), one earlier, one acked.
    for n in [5, 3, 1, 4, 2] {
        store
            .accept(inline(mid(n), MessageKind::Inbound))
            .await
            .unwrap();
    }
    let mut early = inline(mid(9), MessageKind::Inbound);
    early.received_ms = 1_500;
    store.accept(early).await.unwrap();
    store
        .accept(inline(mid(7), MessageKind::Relay))
        .await
        .unwrap();
    assert!(
        store
            .acknowledge(key(mid(3)), 7_000, receipt(b"processed", None))
            .await
            .unwrap()
    );

    let all = |acked: bool| {
        let store = &store;
        async move {
            let mut pages = Vec::new();
            let mut after = None;
            loop {
                let page = store.inbox_page(acked, after, 2).await.unwrap();
                if page.is_empty() {
                    return pages;
                }
                after = page.last().map(|m| (m.received_ms, m.key));
                pages.push(page.iter().map(|m| m.id).collect::<Vec<_>>());
            }
        }
    };
    assert_eq!(
        all(true).await,
        vec![
            vec![mid(9), mid(1)],
            vec![mid(2), mid(3)],
            vec![mid(4), mid(5)]
        ]
    );
    assert_eq!(
        all(false).await,
        vec![vec![mid(9), mid(1)], vec![mid(2), mid(4)], vec![mid(5)]]
    );
    // A position between items: the page starts after it.
    let page = store
        .inbox_page(true, Some((2_000, key(mid(3)))), 10)
        .await
        .unwrap();
    assert_eq!(
        page.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![mid(4), mid(5)]
    );
}

#[tokio::test]
async fn renewed_claims_are_not_taken() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    store
        .accept(inline(mid(1), MessageKind::Relay))
        .await
        .unwrap();
    let d = store.claim_due("a", 10, 600, 10).await.unwrap();
    assert_eq!(d.len(), 1);
    // Only the owner's claim is renewed.
    assert_eq!(
        store
            .renew_claims("b", vec![(d[0].id, d[0].claim)], 5_000)
            .await
            .unwrap(),
        0
    );
    // Nor under another fencing token.
    assert_eq!(
        store
            .renew_claims("a", vec![(d[0].id, d[0].claim + 1)], 5_000)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .renew_claims("a", vec![(d[0].id, d[0].claim)], 2_000)
            .await
            .unwrap(),
        1
    );
    assert!(
        store
            .claim_due("c", 1_000, 3_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.claim_due("c", 2_001, 3_000, 10).await.unwrap().len(),
        1
    );
}

/// A worker whose lease lapsed, and whose delivery another worker claimed
/// since, reports late: its outcome must not overwrite the live claim (nor
/// finish the delivery under it), and its renewal must not extend it.
#[tokio::test]
async fn a_lapsed_claims_late_report_does_not_touch_the_new_claim() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    store
        .accept(inline(mid(1), MessageKind::Relay))
        .await
        .unwrap();
    let stale = store.claim_due("a", 10, 600, 10).await.unwrap().remove(0);
    // a's lease lapses; b claims the delivery.
    let live = store
        .claim_due("b", 601, 5_000, 10)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(live.id, stale.id);
    assert!(live.claim > stale.claim, "{} {}", live.claim, stale.claim);
    // a reports a failure for good, then a retry: neither lands.
    for outcome in [
        AttemptOutcome::Failed("stale".into()),
        AttemptOutcome::Retry {
            error: "stale".into(),
            next_attempt_ms: 0,
        },
    ] {
        store
            .finish_attempt(stale.id, stale.claim, outcome, vec![], vec![])
            .await
            .unwrap();
    }
    let row = &store.deliveries(key(mid(1))).await.unwrap()[0];
    assert_eq!(row.state, DeliveryState::Pending);
    assert_eq!((row.attempts, row.last_error.as_deref()), (0, None));
    assert_eq!(row.claim, live.claim);
    // b's claim still holds: nobody else gets the delivery before 5000.
    assert!(
        store
            .claim_due("c", 700, 9_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // b's outcome is recorded.
    store
        .finish_attempt(live.id, live.claim, AttemptOutcome::Done, vec![], vec![])
        .await
        .unwrap();
    let row = &store.deliveries(key(mid(1))).await.unwrap()[0];
    assert_eq!((row.state.clone(), row.attempts), (DeliveryState::Done, 1));
}

#[tokio::test]
async fn a_snapshot_walks_every_row_across_pages() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
    let page = usize::try_from(snapshot::PAGE).unwrap();
    let entries = 2 * page + 7;
    let entry = |n: usize| AuditEntry {
        seq: 0,
        time_ms: 0,
        party: "urn:test:us".into(),
        actor: "admin".into(),
        action: exchange_core::audit::AuditAction::Receipt,
        message_id: None,
        subjects: Vec::new(),
        outcome: exchange_core::audit::AuditOutcome::Ok,
        reason: None,
        detail: Some(format!("entry {n}")),
        subject_set: None,
    };
    store
        .append_audit(None, (0..entries).map(entry).collect())
        .await
        .unwrap();
    // More messages than a page, several per received time (the walk's
    // position is the time and the key).
    let messages = u32::try_from(page + 3).unwrap();
    let accepts: Vec<_> = (0..messages)
        .map(|n| {
            let s = Arc::clone(&store);
            tokio::spawn(async move {
                let mut e = inline(mid(n), MessageKind::Inbound);
                e.received_ms = 2_000 + u64::from(n % 5);
                s.accept(e).await
            })
        })
        .collect();
    for a in accepts {
        assert_eq!(a.await.unwrap().unwrap(), Accepted::Stored);
    }

    let snap = crate::store::open_read_only(
        &crate::store::StoreLocation::Dir(dir.path().to_owned()),
        crate::store::SchemaNeed::Current,
    )
    .unwrap();
    let all: Vec<i64> = snap
        .audit_entries(None, None)
        .map(|r| r.unwrap().seq)
        .collect();
    assert_eq!(
        all,
        (0..i64::try_from(entries).unwrap()).collect::<Vec<_>>()
    );
    let some: Vec<i64> = snap
        .audit_entries(Some(500), Some(1030))
        .map(|r| r.unwrap().seq)
        .collect();
    assert_eq!(some, (500..1030).collect::<Vec<_>>());
    let rows: Vec<_> = snap
        .audit_entries(None, Some(u64::try_from(entries - 1).unwrap()))
        .map(Result::unwrap)
        .collect();
    let hashes: Vec<[u8; 32]> = snap
        .audit_leaf_hashes(u64::try_from(entries - 1).unwrap())
        .map(Result::unwrap)
        .collect();
    assert_eq!(hashes.len(), entries - 1);
    for (row, hash) in rows.iter().zip(&hashes) {
        assert_eq!(row.leaf_hash.as_slice(), hash.as_slice());
        assert_eq!(*hash, exchange_core::suite::merkle_leaf_hash(&row.entry));
    }
    assert_eq!(
        snap.audit_len().unwrap(),
        Some(u64::try_from(entries).unwrap())
    );

    let walked: Vec<(i64, Vec<u8>)> = snap
        .messages()
        .map(|m| {
            let m = m.unwrap();
            (m.received_ms, m.key)
        })
        .collect();
    assert_eq!(walked.len(), usize::try_from(messages).unwrap());
    assert!(walked.windows(2).all(|w| w[0] < w[1]), "not in order");
    assert_eq!(snap.counts().unwrap().messages, u64::from(messages));
}
