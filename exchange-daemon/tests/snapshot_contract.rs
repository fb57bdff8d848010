//! The read-only view the offline tools use (`ReadOnlyStore`), checked on
//! both backends: walks page through more rows than a page in order, every
//! read sees one state until `end_snapshot`, a newer schema is refused;
//! and what only the PostgreSQL one has: chunked ciphertexts, read and
//! checked by verify-store.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::io::Write;
use std::sync::Arc;

use common::fixtures::{audit_entry, relayed};
use common::pg::{TestDb, execute};
use exchange_core::MessageId;
use exchange_core::audit::AuditEntry;
use exchange_core::suite::merkle_leaf_hash;
use exchange_daemon::StoreError;
use exchange_daemon::store::postgres::{CHUNK, PgOptions, PgStore, SNAPSHOT_PAGE};
use exchange_daemon::store::sqlite::SqliteStore;
use exchange_daemon::store::{
    Accepted, Ciphertext, MessageKind, NewEnvelope, SchemaNeed, Store, StoreLocation,
    open_read_only,
};

/// A store under test and where the offline tools find it.
struct Under {
    store: Arc<dyn Store>,
    location: StoreLocation,
    _dir: tempfile::TempDir,
    _db: Option<TestDb>,
}

fn sqlite() -> Under {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    Under {
        store: Arc::new(store),
        location: StoreLocation::Dir(dir.path().to_owned()),
        _dir: dir,
        _db: None,
    }
}

async fn postgres() -> Under {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new();
    let store = PgStore::open(PgOptions {
        url: db.url(),
        tls: Default::default(),
        node_name: "a".into(),
        max_connections: 4,
        spool_dir: dir.path().join("spool"),
    })
    .await
    .unwrap();
    Under {
        store: Arc::new(store),
        location: StoreLocation::Url(db.url()),
        _dir: dir,
        _db: Some(db),
    }
}

fn mid(n: u32) -> MessageId {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&n.to_be_bytes());
    b[15] = 0x3c;
    MessageId::from_bytes(b)
}

fn envelope(id: MessageId, ciphertext: Ciphertext, len: u64, received_ms: u64) -> NewEnvelope {
    NewEnvelope {
        kind: MessageKind::Inbound,
        received_ms,
        our_receipt: None,
        deliveries: Vec::new(),
        audit: Vec::new(),
        ..relayed(id, "urn:test:sender", ciphertext, len)
    }
}

fn entry(n: usize) -> AuditEntry {
    audit_entry("admin", format!("entry {n}"))
}

fn page() -> usize {
    usize::try_from(SNAPSHOT_PAGE).unwrap()
}

async fn walks_page_through_every_row_in_order(u: Under) {
    let entries = 2 * page() + 7;
    u.store
        .append_audit(None, (0..entries).map(entry).collect())
        .await
        .unwrap();
    // More messages than a page, several per received time (the walk's
    // position is the time and the key).
    let messages = u32::try_from(page() + 3).unwrap();
    for n in 0..messages {
        let ct = format!("ciphertext {n}").into_bytes();
        let len = ct.len() as u64;
        let e = envelope(
            mid(n),
            Ciphertext::Inline(ct),
            len,
            2_000 + u64::from(n % 5),
        );
        assert_eq!(u.store.accept(e).await.unwrap(), Accepted::Stored);
    }

    let location = u.location.clone();
    // The trait is synchronous: the PostgreSQL one must not need this
    // runtime (it runs its own), so it is called right here, in a task.
    let snap = open_read_only(&location, SchemaNeed::Current).unwrap();
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
        assert_eq!(*hash, merkle_leaf_hash(&row.entry));
    }
    assert_eq!(
        snap.audit_len().unwrap(),
        Some(u64::try_from(entries).unwrap())
    );
    assert_eq!(
        snap.audit_entry(1000).unwrap(),
        rows[1000].entry,
        "one entry by seq"
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
    let counts = snap.counts().unwrap();
    assert_eq!(counts.messages, u64::from(messages));
    assert_eq!(counts.audit_entries, Some(u64::try_from(entries).unwrap()));
    // Inline ciphertexts are read back by key.
    let first = &walked[0].1;
    let ct = snap.inline_ciphertext(first).unwrap().unwrap();
    assert!(ct.starts_with(b"ciphertext "), "{ct:?}");
    assert!(snap.ciphertext_chunks(first).unwrap().is_none());
}

#[tokio::test]
async fn sqlite_walks_page_through_every_row_in_order() {
    walks_page_through_every_row_in_order(sqlite()).await;
}

#[tokio::test]
async fn postgres_walks_page_through_every_row_in_order() {
    walks_page_through_every_row_in_order(postgres().await).await;
}

async fn reads_see_one_state_until_end_snapshot(u: Under) {
    u.store
        .append_audit(None, (0..3).map(entry).collect())
        .await
        .unwrap();
    let mut snap = open_read_only(&u.location, SchemaNeed::Current).unwrap();
    // The first read takes the snapshot.
    assert_eq!(snap.audit_len().unwrap(), Some(3));
    u.store
        .append_audit(None, (3..5).map(entry).collect())
        .await
        .unwrap();
    let ct = b"late".to_vec();
    u.store
        .accept(envelope(mid(1), Ciphertext::Inline(ct), 4, 5_000))
        .await
        .unwrap();
    assert_eq!(snap.audit_len().unwrap(), Some(3), "a later append shows");
    assert_eq!(snap.audit_entries(None, None).count(), 3);
    assert_eq!(snap.messages().count(), 0, "a later message shows");
    assert_eq!(snap.counts().unwrap().messages, 0);
    snap.end_snapshot().unwrap();
    assert_eq!(snap.audit_len().unwrap(), Some(5));
    assert_eq!(snap.audit_entries(None, None).count(), 5);
    assert_eq!(snap.messages().count(), 1);
    // Ending it twice is harmless, and reads go on seeing the present.
    snap.end_snapshot().unwrap();
    u.store.append_audit(None, vec![entry(5)]).await.unwrap();
    assert_eq!(snap.audit_len().unwrap(), Some(6));
}

#[tokio::test]
async fn sqlite_reads_see_one_state_until_end_snapshot() {
    reads_see_one_state_until_end_snapshot(sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_reads_see_one_state_until_end_snapshot() {
    reads_see_one_state_until_end_snapshot(postgres().await).await;
}

#[tokio::test]
async fn postgres_refuses_a_newer_schema_and_a_database_without_one() {
    let u = postgres().await;
    let url = match &u.location {
        StoreLocation::Url(url) => url.clone(),
        StoreLocation::Dir(_) => unreachable!(),
    };
    let supported = exchange_daemon::store::postgres::supported_schema_version();
    for need in [SchemaNeed::Current, SchemaNeed::AnyKnown] {
        let snap = open_read_only(&u.location, need).unwrap();
        assert_eq!(snap.schema_version().unwrap(), supported);
    }
    execute(
        &url,
        &format!("UPDATE exchange_schema SET version = {}", supported + 1),
    );
    for need in [SchemaNeed::Current, SchemaNeed::AnyKnown] {
        match open_read_only(&u.location, need) {
            Err(StoreError::SchemaTooNew {
                found,
                supported: s,
            }) => {
                assert_eq!((found, s), (supported + 1, supported));
            }
            other => panic!("{need:?}: {:?}", other.map(|_| ())),
        }
    }

    // A database no daemon has started on.
    let empty = TestDb::new();
    for need in [SchemaNeed::Current, SchemaNeed::AnyKnown] {
        match open_read_only(&StoreLocation::Url(empty.url()), need) {
            Err(StoreError::NotFound(what)) => assert!(what.contains("no store schema"), "{what}"),
            other => panic!("{need:?}: {:?}", other.map(|_| ())),
        }
    }
    // A server that is not there.
    let nowhere = StoreLocation::Url("host=127.0.0.1 port=1 user=postgres dbname=x".into());
    assert!(matches!(
        open_read_only(&nowhere, SchemaNeed::AnyKnown),
        Err(StoreError::Backend { .. })
    ));
}

#[tokio::test]
async fn postgres_reads_a_chunked_ciphertext_a_chunk_at_a_time() {
    let u = postgres().await;
    let data: Vec<u8> = (0..2 * CHUNK + 100)
        .map(|i| (i * 7 + i / CHUNK) as u8)
        .collect();
    let mut s = u.store.spool().unwrap();
    s.file.write_all(&data).unwrap();
    let e = envelope(mid(7), Ciphertext::Spooled(s), data.len() as u64, 3_000);
    assert_eq!(u.store.accept(e).await.unwrap(), Accepted::Stored);

    let snap = open_read_only(&u.location, SchemaNeed::Current).unwrap();
    let m = snap.messages().next().unwrap().unwrap();
    assert_eq!(m.blob, None, "no blob files on PostgreSQL");
    assert_eq!(snap.inline_ciphertext(&m.key).unwrap(), None);
    assert!(snap.named_blobs().unwrap().is_empty());
    assert!(snap.blob_files().unwrap().is_empty());
    assert_eq!(snap.counts().unwrap().blobs, 1);
    let chunks: Vec<_> = snap
        .ciphertext_chunks(&m.key)
        .unwrap()
        .expect("chunked")
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        chunks.iter().map(|c| c.n).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(chunks.concat_data(), data);
}

/// The chunks' bytes, in the order given.
trait ConcatData {
    fn concat_data(&self) -> Vec<u8>;
}

impl ConcatData for Vec<exchange_daemon::store::CiphertextChunk> {
    fn concat_data(&self) -> Vec<u8> {
        self.iter().flat_map(|c| c.data.iter().copied()).collect()
    }
}

#[tokio::test]
async fn verify_store_reports_missing_chunks_on_postgres() {
    let net = common::Net::new();
    let u = postgres().await;
    let url = match &u.location {
        StoreLocation::Url(url) => url.clone(),
        StoreLocation::Dir(_) => unreachable!(),
    };
    let data = vec![0x5au8; CHUNK + 10];
    let mut s = u.store.spool().unwrap();
    s.file.write_all(&data).unwrap();
    u.store
        .accept(envelope(
            mid(9),
            Ciphertext::Spooled(s),
            data.len() as u64,
            3_000,
        ))
        .await
        .unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    let trust = common::net_trust(&net);
    let report =
        exchange_daemon::admin::verify_store(data_dir.path(), &u.location, &trust).unwrap();
    // The head is not a real one (that is reported), but every chunk is there.
    assert!(
        !report
            .failures
            .iter()
            .any(|f| f.to_string().contains("chunks missing")),
        "{:?}",
        report.failures
    );
    assert_eq!(report.ciphertext_bytes, data.len() as u64);

    execute(&url, "DELETE FROM blob_chunks WHERE n = 1");
    let report =
        exchange_daemon::admin::verify_store(data_dir.path(), &u.location, &trust).unwrap();
    let missing: Vec<String> = report
        .failures
        .iter()
        .map(ToString::to_string)
        .filter(|f| f.contains("chunks missing"))
        .collect();
    assert_eq!(missing.len(), 1, "{:?}", report.failures);
    assert!(
        missing[0].contains(&format!("{} bytes of {}", CHUNK, data.len())),
        "{}",
        missing[0]
    );
    assert!(report.orphan_blobs.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_store_with_history_refuses_a_new_pseudonym_key() {
    use exchange_daemon::accountability::{SUBJECT_KEY_FILE, load_or_create_subject_key_at};

    let data_dir = tempfile::tempdir().unwrap();
    let key = data_dir.path().join(SUBJECT_KEY_FILE);
    // A database no daemon has started on: the key is made.
    let empty = TestDb::new();
    load_or_create_subject_key_at(data_dir.path(), &StoreLocation::Url(empty.url())).unwrap();
    assert!(key.exists());
    std::fs::remove_file(&key).unwrap();

    let u = postgres().await;
    u.store.append_audit(None, vec![entry(0)]).await.unwrap();
    let e = load_or_create_subject_key_at(data_dir.path(), &u.location).unwrap_err();
    assert!(e.to_string().contains("is missing"), "{e}");
    assert!(!key.exists(), "no new key was made");
    // Nor when the database cannot be asked.
    let nowhere = StoreLocation::Url("host=127.0.0.1 port=1 user=postgres dbname=x".into());
    assert!(load_or_create_subject_key_at(data_dir.path(), &nowhere).is_err());
    assert!(!key.exists());
}
