//! The embedded store: one SQLite database in WAL mode plus a directory of
//! ciphertext blob files.
//!
//! # On-disk format
//!
//! A store directory holds:
//!
//! * `store.sqlite3` (with its `-wal` and `-shm` files): the database,
//!   created with mode 0600;
//! * `store.lock`: a small SQLite file this process keeps exclusively locked
//!   while the store is open, so a second process (or a second
//!   [`SqliteStore`] in this one) cannot open the directory and sweep files
//!   the first one is still writing;
//! * `blobs/`: large ciphertexts, one file each, named
//!   `<32 hex digits of the message id>-<16 hex digits: first 8 bytes of the
//!   header SHA-256>`; if that name is taken (a concurrent redelivery, or an
//!   orphan of a failed commit), a third part `-<16 random hex digits>` is
//!   added. Only the characters `0-9a-f-` ever appear in a blob name; a name
//!   read back from the database is checked against that set;
//! * `spool/`: files being written by callers ([`Store::spool`]), random names.
//!
//! Directories are created with mode 0700, files with 0600 (unix).
//!
//! The schema version is kept in `PRAGMA user_version`; [`MIGRATIONS`]`[i]`
//! takes version `i` to `i + 1`, each in its own transaction. A database with
//! a newer version is refused ([`StoreError::SchemaTooNew`]). Version 1:
//!
//! * `messages`: one row per envelope. `id` (16-byte BLOB, primary key),
//!   `header_sha256` (32 bytes), `kind` (`outbound` | `relay` | `inbound`),
//!   `head`, the ciphertext either inline in `ciphertext` or in the blob file
//!   named by `blob` (exactly one of the two is non-NULL), `ciphertext_len`,
//!   `sender`, `upstream`, `local_client`, `content_type`, `purpose`,
//!   `created_ms`, `expires_ms`, `received_ms`, `our_receipt`, `acked_ms`.
//! * `deliveries`: the work queue. `id` (INTEGER PRIMARY KEY AUTOINCREMENT:
//!   never reused, so a stale id cannot name another delivery), `message_id`,
//!   `kind` (`envelope` | `receipt`, the receipt bytes in `payload`),
//!   `target`, `state` (`pending` | `done` | `failed`, the reason of a
//!   failure in `failure`), `attempts`, `next_attempt_ms`, `claimed_by`,
//!   `claim_until_ms`, `last_error`, `expires_ms`. Partial index
//!   `deliveries_due` over pending rows by (`next_attempt_ms`, `id`).
//! * `receipts`: `seq` (AUTOINCREMENT: insertion order), `message_id`,
//!   `digest` (SHA-256 of `signed`, unique per message), `issuer`,
//!   `disposition`, `issued_ms`, `signed`.
//!
//! Version 2 (accountability):
//!
//! * `audit_log`: `seq` (0-based leaf index), `time_ms`, `entry` (the
//!   canonical JSON of an `exchange_core::audit::AuditEntry`: the Merkle
//!   leaf), `leaf_hash`. Triggers refuse UPDATE and DELETE. Entries are
//!   appended in the same transaction as the action they record.
//! * `audit_checkpoints`: `tree_size`, `time_ms`, `root`, `frontier` (the
//!   compact range to extend the tree), `signed` (a `SignedCheckpoint`).
//! * `message_meta` (`document_type`, `title`) and `message_subjects`
//!   (`pseudonym`: HMAC-SHA256 of a patient identifier under the facility's
//!   `pseudonym.key`) per message the facility can read. Clear patient
//!   identifiers are never stored outside the sealed envelope.
//! * `provisions`: records of provision (`provided`, at the origin, when the
//!   boundary receipt arrives) and of receipt (`received`, at the final
//!   recipient), each with its receipt as evidence; `provision_subjects`
//!   indexes them by pseudonym. Neither references `messages`: they outlive a
//!   retention purge.
//!
//! Version 3: `audit_subject_sets` (`digest`, `pseudonym`): the patient
//! pseudonyms of a message naming more than an audit entry lists, stored
//! once under the digest its entries carry (`exchange_core::audit::SubjectSet`);
//! append-only, kept by the retention purge.
//!
//! Version 4 (custody and retention):
//!
//! * `messages.fetched_ms`: when a local client last completed a fetch of
//!   an inbox item (an acknowledgement needs one).
//! * `purged_messages`: what a purge removed (`id`, `sender`,
//!   `header_sha256`, `expires_ms`, `our_receipt`, `purged_ms`), kept until
//!   the envelope has expired, so that a redelivery is answered with the
//!   original verdict instead of being stored again.
//! * `message_awaited` (`message_id`, `party`): the final recipients whose
//!   own DELIVERED, PROCESSED or REJECTED receipt a sent or relayed message
//!   awaits; until each has answered (or the receipt grace period after the
//!   expiry has passed) the purge keeps the message.
//! * `purge_clock`: one row, `last_ms`: the newest wall-clock time a purge
//!   accepted; a later time too far beyond it stops the purge, and
//!   `suspended_ms` says since when (the stop is audited once).
//!
//! Version 5: `send_keys` (`client`, `key`, `request_sha256`, `message_id`,
//! `expires_ms`): the idempotency key of each Send that gave one, with a
//! digest of what it asked for, kept until a day after the envelope's
//! expiry; a repeat answers with the same message id.
//!
//! Version 6 (a received envelope is identified by its sender and its id):
//!
//! * `messages.id` is now the message's local key (16 opaque bytes, never
//!   reused: not by a message, a purged message's record or a provision
//!   record), which `deliveries`, `receipts`, `message_meta`,
//!   `message_subjects`, `message_awaited`, `send_keys` and `provisions`
//!   reference; `messages.wire_id` is the message id the envelope carries,
//!   unique with `sender` (index `messages_sender_wire`; `messages_wire`
//!   lists every sender's message under an id). A new message's key is its
//!   message id when no row uses that key yet, else random. Rows from
//!   before keep `id = wire_id`.
//! * `purged_messages` is keyed by (`sender`, `wire_id`), with the purged
//!   message's `key` kept (so that it is not reused while the record lasts).
//! * `provisions.wire_id`: the message id of the record's message
//!   (`message_id` holds its key); NULL in records from before, whose key
//!   is their message id.
//!
//! Version 7: `receipts` holds at most one receipt per (`message_id`,
//! `issuer`, `disposition`) (unique index `receipts_issuer_disposition`;
//! the migration keeps the first of any duplicates stored before it): a
//! later one, whatever its bytes or time, is not stored, forwarded or
//! audited again. `receipts.verified_ms`: when the receipt's signature and
//! issuer chain verified with the full policy, before it was stored; it is
//! read back without checking them again (NULL in rows from before version
//! 7, which are verified when read).
//!
//! Times are Unix milliseconds stored as SQLite integers (i64); a `u64`
//! above `i64::MAX` is refused on the way in, a negative value read back is
//! reported as [`StoreError::Corrupt`].
//!
//! # Durability
//!
//! `synchronous = FULL`: every commit fsyncs the WAL. A spooled ciphertext
//! is fsynced, hard-linked into `blobs/` under its final name (a link never
//! replaces an existing file), and `blobs/` is fsynced, all *before* the
//! row naming it is committed; the spool name is then removed. A crash
//! between the link and the commit leaves a blob no row names: opening the
//! store deletes such orphans and empties `spool/`. An accept whose commit
//! reported an error (outcome uncertain) leaves its blob in place for the
//! same sweep rather than risk deleting a committed row's file.
//!
//! The link and the commit of an accept run in a task of their own, not in
//! the caller's future: a caller dropped half-way (a peer that resets its
//! stream, a client that goes away) leaves either the committed row with
//! its blob or no blob at all, so that while the store is open `blobs/`
//! holds only files that rows name (apart from a commit whose outcome is
//! unknown, above) without waiting for the next open.
//!
//! # Group commit
//!
//! Every write runs on one writer thread that owns the write connection.
//! It takes the first queued operation, drains up to [`MAX_BATCH`] more,
//! runs them all in one transaction, each inside its own `SAVEPOINT` (a
//! failing operation rolls back only itself and gets its own error),
//! commits once (one fsync for the batch) and only then answers every
//! operation. If the transaction cannot be committed, every operation of
//! the batch gets the error. An operation that panics fails alone, like
//! one that returns an error (its savepoint is rolled back; its caller
//! gets [`StoreError::Panicked`]). Should the writer thread die all the
//! same, every write fails with [`StoreError::Closed`] and
//! [`Store::failure`] resolves. The queue in front of the writer holds at
//! most [`WRITER_QUEUE`] operations; further callers wait for a place.
//! Reads use a second, read-only connection (WAL readers do not block the
//! writer) on the blocking thread pool.
//!
//! One process per store directory (enforced by `store.lock`).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use exchange_core::suite::sha256;
use exchange_core::{MessageId, PartyUri};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};
use tokio::sync::oneshot;

use exchange_core::audit::{AuditEntry, MAX_INLINE_SUBJECTS, Pseudonym, SubjectSet};

use super::{
    Accepted, AttemptOutcome, AuditTail, Ciphertext, ClockJump, DeliveryKind, DeliveryRecord,
    DeliveryState, MessageKey, MessageKind, MessageMeta, MessageRecord, NewCheckpoint, NewDelivery,
    NewEnvelope, NewProvision, NewReceipt, ProvisionRecord, PurgePolicy, PurgeSummary,
    PurgedRecord, ReceiptRecord, SendKey, SendKeyRecord, SpoolFile, Store, StoreFuture,
    StoredCiphertext,
};
use crate::error::StoreError;

mod backup;
mod snapshot;
#[cfg(test)]
pub(crate) mod tests;

pub use backup::{BackupSource, open_restored};
pub use snapshot::{SqliteSnapshot, open_read_only, open_read_only_any_version, provisions_for};

/// SQLite's errors as the store reports them: what SQLite said, under the
/// backend's name (the same text for every caller of a failed batch).
pub(crate) fn sqlite_error(e: &rusqlite::Error) -> StoreError {
    StoreError::Backend {
        backend: "sqlite",
        detail: e.to_string(),
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        sqlite_error(&e)
    }
}

/// Schema migrations: entry `i` takes `PRAGMA user_version` from `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    r"
CREATE TABLE messages (
    id             BLOB PRIMARY KEY NOT NULL CHECK (length(id) = 16),
    header_sha256  BLOB NOT NULL CHECK (length(header_sha256) = 32),
    kind           TEXT NOT NULL CHECK (kind IN ('outbound', 'relay', 'inbound')),
    head           BLOB NOT NULL,
    ciphertext     BLOB,
    blob           TEXT,
    ciphertext_len INTEGER NOT NULL CHECK (ciphertext_len >= 0),
    sender         TEXT NOT NULL,
    upstream       TEXT,
    local_client   TEXT,
    content_type   TEXT NOT NULL,
    purpose        TEXT NOT NULL,
    created_ms     INTEGER NOT NULL,
    expires_ms     INTEGER NOT NULL,
    received_ms    INTEGER NOT NULL,
    our_receipt    BLOB,
    acked_ms       INTEGER,
    CHECK ((ciphertext IS NULL) <> (blob IS NULL))
);
CREATE INDEX messages_inbox ON messages (received_ms, id) WHERE kind = 'inbound';
CREATE UNIQUE INDEX messages_blob ON messages (blob) WHERE blob IS NOT NULL;

CREATE TABLE deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id      BLOB NOT NULL REFERENCES messages (id),
    kind            TEXT NOT NULL CHECK (kind IN ('envelope', 'receipt')),
    payload         BLOB,
    target          TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'done', 'failed')),
    failure         TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_ms INTEGER NOT NULL,
    claimed_by      TEXT,
    claim_until_ms  INTEGER,
    last_error      TEXT,
    expires_ms      INTEGER NOT NULL,
    CHECK ((kind = 'receipt') = (payload IS NOT NULL)),
    CHECK ((state = 'failed') = (failure IS NOT NULL))
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_ms, id) WHERE state = 'pending';
CREATE INDEX deliveries_message ON deliveries (message_id);
CREATE INDEX deliveries_claimed ON deliveries (claimed_by) WHERE claimed_by IS NOT NULL;

CREATE TABLE receipts (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id  BLOB NOT NULL REFERENCES messages (id),
    digest      BLOB NOT NULL CHECK (length(digest) = 32),
    issuer      TEXT NOT NULL,
    disposition TEXT NOT NULL,
    issued_ms   INTEGER NOT NULL,
    signed      BLOB NOT NULL,
    UNIQUE (message_id, digest)
);
",
    // 2: accountability: audit log, checkpoints, pseudonymous
    // message subjects, provision records.
    r"
CREATE TABLE audit_log (
    seq        INTEGER PRIMARY KEY CHECK (seq >= 0),
    time_ms    INTEGER NOT NULL,
    entry      BLOB NOT NULL,
    leaf_hash  BLOB NOT NULL CHECK (length(leaf_hash) = 32)
);
CREATE INDEX audit_log_time ON audit_log (time_ms);
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;

CREATE TABLE audit_checkpoints (
    tree_size  INTEGER PRIMARY KEY CHECK (tree_size > 0),
    time_ms    INTEGER NOT NULL,
    root       BLOB NOT NULL CHECK (length(root) = 32),
    frontier   BLOB NOT NULL,
    signed     BLOB NOT NULL
);

CREATE TABLE message_meta (
    message_id    BLOB PRIMARY KEY NOT NULL REFERENCES messages (id),
    document_type TEXT NOT NULL,
    title         TEXT NOT NULL
);

CREATE TABLE message_subjects (
    message_id BLOB NOT NULL REFERENCES messages (id),
    pseudonym  BLOB NOT NULL CHECK (length(pseudonym) = 32),
    PRIMARY KEY (message_id, pseudonym)
);
CREATE INDEX message_subjects_pseudonym ON message_subjects (pseudonym);

CREATE TABLE provisions (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    direction         TEXT NOT NULL CHECK (direction IN ('provided', 'received')),
    message_id        BLOB NOT NULL CHECK (length(message_id) = 16),
    time_ms           INTEGER NOT NULL,
    counterparty      TEXT NOT NULL,
    counterparty_name TEXT NOT NULL,
    recipient         TEXT NOT NULL,
    role              TEXT NOT NULL,
    document_type     TEXT NOT NULL,
    title             TEXT NOT NULL,
    purpose           TEXT NOT NULL,
    content_type      TEXT NOT NULL,
    receipt           BLOB NOT NULL,
    UNIQUE (message_id, direction, recipient)
);

CREATE TABLE provision_subjects (
    provision_id INTEGER NOT NULL REFERENCES provisions (id),
    pseudonym    BLOB NOT NULL CHECK (length(pseudonym) = 32),
    PRIMARY KEY (pseudonym, provision_id)
);
",
    // 3: the subject sets audit entries refer to (a message naming more
    // patients than an entry lists), each stored once; append-only like the
    // log, and kept by the retention purge.
    r"
CREATE TABLE audit_subject_sets (
    digest    BLOB NOT NULL CHECK (length(digest) = 32),
    pseudonym BLOB NOT NULL CHECK (length(pseudonym) = 32),
    PRIMARY KEY (digest, pseudonym)
);
CREATE INDEX audit_subject_sets_pseudonym ON audit_subject_sets (pseudonym);
CREATE TRIGGER audit_subject_sets_no_update BEFORE UPDATE ON audit_subject_sets
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_subject_sets_no_delete BEFORE DELETE ON audit_subject_sets
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
",
    // 4: custody and retention: when a local client completed a fetch,
    // ids of purged messages until their expiry, the purge's clock.
    r"
ALTER TABLE messages ADD COLUMN fetched_ms INTEGER;

CREATE TABLE purged_messages (
    id            BLOB PRIMARY KEY NOT NULL CHECK (length(id) = 16),
    sender        TEXT NOT NULL,
    header_sha256 BLOB NOT NULL CHECK (length(header_sha256) = 32),
    expires_ms    INTEGER NOT NULL,
    our_receipt   BLOB,
    purged_ms     INTEGER NOT NULL
);
CREATE INDEX purged_messages_expiry ON purged_messages (expires_ms);

CREATE TABLE message_awaited (
    message_id BLOB NOT NULL REFERENCES messages (id),
    party      TEXT NOT NULL,
    PRIMARY KEY (message_id, party)
);

CREATE TABLE purge_clock (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    last_ms      INTEGER NOT NULL,
    suspended_ms INTEGER
);
",
    // 5: idempotent Send: each client's keys with what they asked for.
    r"
CREATE TABLE send_keys (
    client         TEXT NOT NULL,
    key            TEXT NOT NULL,
    request_sha256 BLOB NOT NULL CHECK (length(request_sha256) = 32),
    message_id     BLOB NOT NULL CHECK (length(message_id) = 16),
    expires_ms     INTEGER NOT NULL,
    PRIMARY KEY (client, key)
);
CREATE INDEX send_keys_expiry ON send_keys (expires_ms);
",
    // 6: a received envelope is identified by (sender, message id): the
    // primary key becomes an opaque local key, the id on the wire a column.
    r"
ALTER TABLE messages ADD COLUMN wire_id BLOB NOT NULL
    DEFAULT x'00000000000000000000000000000000' CHECK (length(wire_id) = 16);
UPDATE messages SET wire_id = id;
CREATE UNIQUE INDEX messages_sender_wire ON messages (sender, wire_id);
CREATE INDEX messages_wire ON messages (wire_id);

CREATE TABLE purged_messages_v6 (
    key           BLOB PRIMARY KEY NOT NULL CHECK (length(key) = 16),
    wire_id       BLOB NOT NULL CHECK (length(wire_id) = 16),
    sender        TEXT NOT NULL,
    header_sha256 BLOB NOT NULL CHECK (length(header_sha256) = 32),
    expires_ms    INTEGER NOT NULL,
    our_receipt   BLOB,
    purged_ms     INTEGER NOT NULL,
    UNIQUE (sender, wire_id)
);
INSERT INTO purged_messages_v6
    (key, wire_id, sender, header_sha256, expires_ms, our_receipt, purged_ms)
    SELECT id, id, sender, header_sha256, expires_ms, our_receipt, purged_ms
    FROM purged_messages;
DROP TABLE purged_messages;
ALTER TABLE purged_messages_v6 RENAME TO purged_messages;
CREATE INDEX purged_messages_expiry ON purged_messages (expires_ms);

ALTER TABLE provisions ADD COLUMN wire_id BLOB
    CHECK (wire_id IS NULL OR length(wire_id) = 16);
",
    // 7: at most one receipt per issuer and disposition per message (the
    // first kept), and when each receipt's signature and chain verified.
    r"
DELETE FROM receipts WHERE seq NOT IN (
    SELECT MIN(seq) FROM receipts GROUP BY message_id, issuer, disposition
);
CREATE UNIQUE INDEX receipts_issuer_disposition ON receipts (message_id, issuer, disposition);
ALTER TABLE receipts ADD COLUMN verified_ms INTEGER;
",
];

/// The newest schema version this build knows (and writes).
pub fn supported_schema_version() -> u32 {
    u32::try_from(MIGRATIONS.len()).unwrap_or(u32::MAX)
}

/// Most messages one [`Store::purge`] call removes (its audit entry lists them).
pub const PURGE_BATCH: i64 = 500;

/// Most operations the writer commits in one transaction.
pub const MAX_BATCH: usize = 256;

/// Write operations that may wait for the writer beyond the batch it is
/// running. A caller finding the queue full waits (asynchronously, in
/// order) for a place, so a burst of writes holds at most this many
/// operations, each with its row (an inline ciphertext is at most
/// `limits.inline_ciphertext_bytes`), in memory. One full batch: when the
/// writer commits, the next batch is ready, so the bound costs no
/// throughput (a transaction takes at most [`MAX_BATCH`] anyway).
pub const WRITER_QUEUE: usize = MAX_BATCH;

/// How long a connection waits for a lock held by another connection.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

const DB_FILE: &str = "store.sqlite3";
const LOCK_FILE: &str = "store.lock";
const BLOBS_DIR: &str = "blobs";
const SPOOL_DIR: &str = "spool";

const MESSAGE_COLUMNS: &str = "id, header_sha256, kind, head, ciphertext_len, sender, upstream, \
     local_client, content_type, purpose, created_ms, expires_ms, received_ms, our_receipt, acked_ms, \
     fetched_ms, wire_id";

/// The last column is the message id of the delivery's message (`message_id`
/// is its key).
const DELIVERY_COLUMNS: &str = "id, message_id, target, kind, payload, state, failure, attempts, \
     next_attempt_ms, last_error, expires_ms, \
     (SELECT m.wire_id FROM messages m WHERE m.id = message_id)";

/// Counters of the writer thread (metrics, tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterStats {
    /// Write operations handed to the writer since open.
    pub ops_submitted: u64,
    /// Transactions the writer committed since open (one per batch).
    pub transactions_committed: u64,
}

/// The embedded SQLite [`Store`] (see the module documentation).
pub struct SqliteStore {
    blobs: PathBuf,
    spool: PathBuf,
    /// `None` only while dropping.
    writer_tx: Option<tokio::sync::mpsc::Sender<Box<dyn Job>>>,
    writer: Option<JoinHandle<()>>,
    /// Set, with the reason, if the writer thread died.
    writer_failed: tokio::sync::watch::Receiver<Option<String>>,
    reader: Arc<Mutex<Connection>>,
    submitted: Arc<AtomicU64>,
    committed: Arc<AtomicU64>,
    /// Held for its file lock until the store is dropped.
    _lock: Mutex<Connection>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("blobs", &self.blobs)
            .field("spool", &self.spool)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if missing) the store in `dir`: migrates the schema,
    /// empties `spool/`, deletes blob files no row names, and starts the
    /// writer thread. Blocking. Fails if the directory is already open.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let blobs = dir.join(BLOBS_DIR);
        let spool = dir.join(SPOOL_DIR);
        for d in [dir, &blobs, &spool] {
            create_dir(d)?;
        }
        let lock = lock_dir(dir)?;

        let db = dir.join(DB_FILE);
        // Create the file ourselves so it (and the -wal / -shm files SQLite
        // derives from it) get mode 0600.
        let mut create = OpenOptions::new();
        create.write(true).create(true).truncate(false);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut create, 0o600);
        create.open(&db).map_err(|e| io_err("create", &db, e))?;

        let mut conn = Connection::open_with_flags(
            &db,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        configure(&conn)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt(format!(
                "cannot enable WAL (journal_mode is {mode})"
            )));
        }
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")?;
        migrate(&mut conn)?;

        clear_spool(&spool)?;
        sweep_blobs(&conn, &blobs)?;
        sync_dir(dir)?;

        let reader = Connection::open_with_flags(
            &db,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        configure(&reader)?;

        let (tx, rx) = tokio::sync::mpsc::channel::<Box<dyn Job>>(WRITER_QUEUE);
        let (failed_tx, writer_failed) = tokio::sync::watch::channel(None);
        let committed = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&committed);
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_thread(conn, rx, &counter, &failed_tx))
            .map_err(|e| io_err("spawn writer for", dir, e))?;

        Ok(Self {
            blobs,
            spool,
            writer_tx: Some(tx),
            writer: Some(writer),
            writer_failed,
            reader: Arc::new(Mutex::new(reader)),
            submitted: Arc::new(AtomicU64::new(0)),
            committed,
            _lock: Mutex::new(lock),
        })
    }

    /// The writer's counters.
    pub fn writer_stats(&self) -> WriterStats {
        WriterStats {
            ops_submitted: self.submitted.load(Ordering::Relaxed),
            transactions_committed: self.committed.load(Ordering::Relaxed),
        }
    }

    /// Hands `work` to the writer. Outer error: the batch was not committed
    /// (or its outcome is unknown); inner: the operation's own result (its
    /// savepoint was rolled back if it is an error).
    async fn submit<T, F>(&self, work: F) -> Result<Result<T, StoreError>, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let tx = self.writer_tx.as_ref().ok_or(StoreError::Closed)?;
        submit_to(tx, &self.submitted, work).await
    }

    /// [`submit`](Self::submit) with both errors merged.
    async fn write<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.submit(work).await?
    }

    /// Runs `work` on the read connection on the blocking pool.
    async fn read<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let reader = Arc::clone(&self.reader);
        tokio::task::spawn_blocking(move || {
            // A panic while reading leaves no transaction open (statements
            // are reset on unwind), so a poisoned lock is still usable.
            let conn = reader.lock().unwrap_or_else(PoisonError::into_inner);
            work(&conn)
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }

    async fn accept_envelope(&self, envelope: NewEnvelope) -> Result<Accepted, StoreError> {
        let NewEnvelope {
            id,
            header_sha256,
            kind,
            head,
            ciphertext,
            ciphertext_len,
            sender,
            upstream,
            local_client,
            content_type,
            purpose,
            created_ms,
            expires_ms,
            received_ms,
            our_receipt,
            deliveries,
            awaited,
            meta,
            provision,
            audit,
            send_key,
        } = envelope;
        let row = MessageRow {
            id,
            header_sha256,
            kind,
            head,
            // Set below: values are checked before any file is moved.
            body: Body::Inline(Vec::new()),
            ciphertext_len: to_i64(ciphertext_len, "ciphertext_len")?,
            sender,
            upstream,
            local_client,
            content_type,
            purpose,
            created_ms: to_i64(created_ms, "created_ms")?,
            expires_ms: to_i64(expires_ms, "expires_ms")?,
            received_ms: to_i64(received_ms, "received_ms")?,
            our_receipt,
            deliveries: deliveries
                .into_iter()
                .map(DeliveryRow::new)
                .collect::<Result<_, _>>()?,
            awaited,
            meta,
            provision: provision.map(ProvisionRow::new).transpose()?,
            audit,
            send_key,
        };
        match ciphertext {
            Ciphertext::Inline(bytes) => {
                check_len(u64::try_from(bytes.len()).ok(), ciphertext_len)?;
                let row = MessageRow {
                    body: Body::Inline(bytes),
                    ..row
                };
                self.write(move |conn| insert_message(conn, &row)).await
            }
            Ciphertext::Spooled(spooled) => {
                let blobs = self.blobs.clone();
                let base = format!(
                    "{}-{}",
                    hex::encode(id.as_bytes()),
                    hex::encode(&header_sha256[..8])
                );
                let tx = self.writer_tx.clone().ok_or(StoreError::Closed)?;
                let submitted = Arc::clone(&self.submitted);
                // The caller may be dropped at any await (a peer that resets
                // its stream, a client that goes away), but the link into
                // blobs/ and the commit run on without it. So they run in a
                // task of their own, which owns the file from the link to
                // the end: it either commits the row that names the blob or
                // removes the blob, whatever becomes of the caller.
                let adoption = tokio::spawn(async move {
                    let (name, path) = tokio::task::spawn_blocking(move || {
                        adopt_spool(spooled, &blobs, &base, ciphertext_len)
                    })
                    .await
                    .map_err(|_| StoreError::Closed)??;
                    let row = MessageRow {
                        body: Body::Blob(name),
                        ..row
                    };
                    let outcome =
                        submit_to(&tx, &submitted, move |conn| insert_message(conn, &row)).await;
                    match outcome {
                        Ok(Ok(Accepted::Stored)) => Ok(Accepted::Stored),
                        // The file is ours alone (the link created its name),
                        // and no row names it: the id was stored already, or
                        // our savepoint was rolled back.
                        Ok(Ok(dup @ (Accepted::Duplicate(_) | Accepted::Purged(_)))) => {
                            remove_blob(path).await;
                            Ok(dup)
                        }
                        Ok(Err(e)) => {
                            remove_blob(path).await;
                            Err(e)
                        }
                        // Not committed, or outcome unknown (commit error,
                        // writer gone): keep the blob; if no row names it,
                        // the next open deletes it.
                        Err(e) => Err(e),
                    }
                });
                adoption.await.map_err(|_| StoreError::Closed)?
            }
        }
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Closing the channel ends the writer after its current batch.
        drop(self.writer_tx.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Store for SqliteStore {
    fn spool(&self) -> Result<SpoolFile, StoreError> {
        let mut name = [0u8; 16];
        getrandom::fill(&mut name).map_err(|e| {
            io_err(
                "random name in",
                &self.spool,
                io::Error::other(e.to_string()),
            )
        })?;
        let path = self.spool.join(format!("{}.spool", hex::encode(name)));
        let file = create_private(&path)?;
        crate::failpoints::created(&path);
        Ok(SpoolFile::new(path, file))
    }

    fn accept(&self, envelope: NewEnvelope) -> StoreFuture<'_, Accepted> {
        Box::pin(self.accept_envelope(envelope))
    }

    fn message(&self, key: MessageKey) -> StoreFuture<'_, Option<MessageRecord>> {
        Box::pin(self.read(move |conn| load_message(conn, &key)))
    }

    fn find(&self, sender: PartyUri, id: MessageId) -> StoreFuture<'_, Option<MessageRecord>> {
        Box::pin(self.read(move |conn| find_message(conn, &sender, &id)))
    }

    fn messages_by_id(&self, id: MessageId) -> StoreFuture<'_, Vec<MessageRecord>> {
        Box::pin(self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE wire_id = ?1 \
                 ORDER BY received_ms, id"
            ))?
            .query_map([id.as_bytes()], message_from_row)?
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .collect()
        }))
    }

    fn send_key(&self, client: String, key: String) -> StoreFuture<'_, Option<SendKeyRecord>> {
        Box::pin(self.read(move |conn| {
            conn.prepare_cached(
                "SELECT m.wire_id, k.request_sha256, m.ciphertext_len FROM send_keys k \
                 JOIN messages m ON m.id = k.message_id WHERE k.client = ?1 AND k.key = ?2",
            )?
            .query_row(params![client, key], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .optional()?
            .map(|(id, digest, len)| {
                Ok(SendKeyRecord {
                    message_id: message_id(&id)?,
                    request_sha256: <[u8; 32]>::try_from(digest.as_slice()).map_err(|_| {
                        StoreError::Corrupt("send_keys.request_sha256 is not 32 bytes".into())
                    })?,
                    ciphertext_len: to_u64(len, "ciphertext_len")?,
                })
            })
            .transpose()
        }))
    }

    fn ciphertext(&self, id: MessageKey) -> StoreFuture<'_, StoredCiphertext> {
        let blobs = self.blobs.clone();
        Box::pin(self.read(move |conn| {
            let row: Option<(Option<Vec<u8>>, Option<String>)> = conn
                .prepare_cached("SELECT ciphertext, blob FROM messages WHERE id = ?1")?
                .query_row([id.as_bytes()], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            match row {
                None => Err(StoreError::NotFound(format!("message {id}"))),
                Some((Some(bytes), None)) => Ok(StoredCiphertext::Inline(bytes)),
                Some((None, Some(name))) if valid_blob_name(&name) => {
                    Ok(StoredCiphertext::File(blobs.join(name)))
                }
                Some((None, Some(name))) => Err(StoreError::Corrupt(format!(
                    "message {id}: bad blob name {:?}",
                    name.escape_debug().to_string()
                ))),
                Some(_) => Err(StoreError::Corrupt(format!(
                    "message {id}: not exactly one of inline ciphertext and blob"
                ))),
            }
        }))
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
        let owner = owner.to_owned();
        Box::pin(async move {
            let now = to_i64(now_ms, "now_ms")?;
            let until = to_i64(lease_until_ms, "lease_until_ms")?;
            if limit == 0 || per_target == 0 {
                return Ok(Vec::new());
            }
            let per_target_sql = i64::try_from(per_target).unwrap_or(i64::MAX);
            self.write(move |conn| {
                // Each target's due items ranked oldest first; then rank 1
                // of every target, rank 2 of every target, and so on.
                let candidates = conn
                    .prepare_cached(&format!(
                        "SELECT {DELIVERY_COLUMNS} FROM ( \
                           SELECT *, ROW_NUMBER() OVER \
                             (PARTITION BY target ORDER BY next_attempt_ms, id) AS turn \
                           FROM deliveries \
                           WHERE state = 'pending' AND next_attempt_ms <= ?1 \
                             AND (claim_until_ms IS NULL OR claim_until_ms < ?1)) \
                         WHERE turn <= ?2 ORDER BY turn, next_attempt_ms, id"
                    ))?
                    .query_map(params![now, per_target_sql], delivery_from_row)?
                    .collect::<Result<Vec<_>, _>>()?
                    .into_iter()
                    .collect::<Result<Vec<_>, _>>()?;
                let mut taken: HashMap<PartyUri, usize> = busy;
                let mut due = Vec::new();
                for d in candidates {
                    if due.len() == limit {
                        break;
                    }
                    let n = taken.entry(d.target.clone()).or_insert(0);
                    if *n < per_target {
                        *n += 1;
                        due.push(d);
                    }
                }
                let mut claim = conn.prepare_cached(
                    "UPDATE deliveries SET claimed_by = ?1, claim_until_ms = ?2 WHERE id = ?3",
                )?;
                for d in &due {
                    claim.execute(params![owner, until, d.id])?;
                }
                Ok(due)
            })
            .await
        })
    }

    fn renew_claims(
        &self,
        owner: &str,
        ids: Vec<i64>,
        lease_until_ms: u64,
    ) -> StoreFuture<'_, u64> {
        let owner = owner.to_owned();
        Box::pin(async move {
            let until = to_i64(lease_until_ms, "lease_until_ms")?;
            self.write(move |conn| {
                let mut renew = conn.prepare_cached(
                    "UPDATE deliveries SET claim_until_ms = ?3 \
                     WHERE id = ?2 AND claimed_by = ?1 AND state = 'pending'",
                )?;
                let mut n = 0u64;
                for id in ids {
                    n += u64::try_from(renew.execute(params![owner, id, until])?).unwrap_or(0);
                }
                Ok(n)
            })
            .await
        })
    }

    fn release_claims(&self, owner: &str) -> StoreFuture<'_, u64> {
        let owner = owner.to_owned();
        Box::pin(self.write(move |conn| {
            let n = conn
                .prepare_cached(
                    "UPDATE deliveries SET claimed_by = NULL, claim_until_ms = NULL \
                     WHERE claimed_by = ?1",
                )?
                .execute([owner])?;
            Ok(u64::try_from(n).unwrap_or(u64::MAX))
        }))
    }

    fn finish_attempt(
        &self,
        delivery: i64,
        outcome: AttemptOutcome,
        receipts: Vec<NewReceipt>,
        audit: Vec<AuditEntry>,
    ) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let receipts = receipts
                .into_iter()
                .map(ReceiptRow::new)
                .collect::<Result<Vec<_>, _>>()?;
            let outcome = match outcome {
                AttemptOutcome::Done => Finish::Done,
                AttemptOutcome::Retry {
                    error,
                    next_attempt_ms,
                } => Finish::Retry(error, to_i64(next_attempt_ms, "next_attempt_ms")?),
                AttemptOutcome::Failed(reason) => Finish::Failed(reason),
            };
            self.write(move |conn| {
                let message: Option<Vec<u8>> = conn
                    .prepare_cached("SELECT message_id FROM deliveries WHERE id = ?1")?
                    .query_row([delivery], |r| r.get(0))
                    .optional()?;
                let Some(message) = message else {
                    return Err(StoreError::NotFound(format!("delivery {delivery}")));
                };
                // Only a pending delivery changes: a late report from a
                // worker whose lease lapsed must not reopen a finished one.
                match &outcome {
                    Finish::Done => conn
                        .prepare_cached(
                            "UPDATE deliveries SET state = 'done', attempts = attempts + 1, \
                             claimed_by = NULL, claim_until_ms = NULL \
                             WHERE id = ?1 AND state = 'pending'",
                        )?
                        .execute([delivery])?,
                    Finish::Retry(error, next) => conn
                        .prepare_cached(
                            "UPDATE deliveries SET attempts = attempts + 1, last_error = ?2, \
                             next_attempt_ms = ?3, claimed_by = NULL, claim_until_ms = NULL \
                             WHERE id = ?1 AND state = 'pending'",
                        )?
                        .execute(params![delivery, error, next])?,
                    Finish::Failed(reason) => conn
                        .prepare_cached(
                            "UPDATE deliveries SET state = 'failed', failure = ?2, \
                             attempts = attempts + 1, claimed_by = NULL, claim_until_ms = NULL \
                             WHERE id = ?1 AND state = 'pending'",
                        )?
                        .execute(params![delivery, reason])?,
                };
                let message = message_key(&message)?;
                insert_receipts(conn, &message, &receipts)?;
                for e in audit {
                    append_audit(conn, e, Some(&message))?;
                }
                Ok(())
            })
            .await
        })
    }

    fn add_receipts(&self, id: MessageKey, receipts: Vec<NewReceipt>) -> StoreFuture<'_, usize> {
        Box::pin(async move {
            let receipts = receipts
                .into_iter()
                .map(ReceiptRow::new)
                .collect::<Result<Vec<_>, _>>()?;
            self.write(move |conn| {
                if load_kind_acked(conn, &id)?.is_none() {
                    return Err(StoreError::NotFound(format!("message {id}")));
                }
                insert_receipts(conn, &id, &receipts)
            })
            .await
        })
    }

    fn receipts(&self, id: MessageKey) -> StoreFuture<'_, Vec<ReceiptRecord>> {
        Box::pin(self.read(move |conn| {
            conn.prepare_cached(
                "SELECT signed, issuer, disposition, issued_ms, verified_ms FROM receipts \
                 WHERE message_id = ?1 ORDER BY seq",
            )?
            .query_map([id.as_bytes()], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                ))
            })?
            .map(|row| -> Result<ReceiptRecord, StoreError> {
                let (signed, issuer, disposition, issued_ms, verified_ms) = row?;
                Ok(ReceiptRecord {
                    signed,
                    issuer: party(issuer, "receipt issuer")?,
                    disposition,
                    issued_ms: to_u64(issued_ms, "issued_ms")?,
                    verified_ms: verified_ms.map(|v| to_u64(v, "verified_ms")).transpose()?,
                })
            })
            .collect()
        }))
    }

    fn deliveries(&self, id: MessageKey) -> StoreFuture<'_, Vec<DeliveryRecord>> {
        Box::pin(self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE message_id = ?1 ORDER BY id"
            ))?
            .query_map([id.as_bytes()], delivery_from_row)?
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .collect()
        }))
    }

    fn inbox(&self, include_acked: bool) -> StoreFuture<'_, Vec<MessageRecord>> {
        Box::pin(self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE kind = 'inbound' \
                 AND (?1 OR acked_ms IS NULL) ORDER BY received_ms, id"
            ))?
            .query_map([include_acked], message_from_row)?
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .collect()
        }))
    }

    fn inbox_page(
        &self,
        include_acked: bool,
        after: Option<(u64, MessageKey)>,
        limit: usize,
    ) -> StoreFuture<'_, Vec<MessageRecord>> {
        Box::pin(async move {
            // Keyset pagination over the inbox index: the page after the
            // last position seen, however many rows came or went before it.
            let (after_ms, after_id) = match after {
                Some((ms, id)) => (to_i64(ms, "page position")?, id.as_bytes().to_vec()),
                None => (-1, Vec::new()),
            };
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            self.read(move |conn| {
                conn.prepare_cached(&format!(
                    "SELECT {MESSAGE_COLUMNS} FROM messages WHERE kind = 'inbound' \
                     AND (?1 OR acked_ms IS NULL) AND (received_ms, id) > (?2, ?3) \
                     ORDER BY received_ms, id LIMIT ?4"
                ))?
                .query_map(
                    params![include_acked, after_ms, after_id, limit],
                    message_from_row,
                )?
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .collect()
            })
            .await
        })
    }

    fn failure(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send + '_>> {
        let mut failed = self.writer_failed.clone();
        Box::pin(async move {
            let why = failed
                .wait_for(Option::is_some)
                .await
                .map(|why| why.clone().unwrap_or_default());
            match why {
                Ok(why) => why,
                // The store was closed normally.
                Err(_) => std::future::pending().await,
            }
        })
    }

    fn acknowledge(
        &self,
        id: MessageKey,
        now_ms: u64,
        receipt: NewReceipt,
    ) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let now = to_i64(now_ms, "now_ms")?;
            let receipt = ReceiptRow::new(receipt)?;
            self.write(move |conn| match load_kind_acked(conn, &id)? {
                Some((MessageKind::Inbound, None)) => {
                    conn.prepare_cached(
                        "UPDATE messages SET acked_ms = ?2 WHERE id = ?1 AND acked_ms IS NULL",
                    )?
                    .execute(params![id.as_bytes(), now])?;
                    insert_receipts(conn, &id, std::slice::from_ref(&receipt))?;
                    Ok(true)
                }
                Some((MessageKind::Inbound, Some(_))) => Ok(false),
                _ => Err(StoreError::NotFound(format!("inbound message {id}"))),
            })
            .await
        })
    }

    fn mark_fetched(&self, id: MessageKey, now_ms: u64) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let now = to_i64(now_ms, "now_ms")?;
            self.write(move |conn| {
                let n = conn
                    .prepare_cached(
                        "UPDATE messages SET fetched_ms = ?2 WHERE id = ?1 AND kind = 'inbound'",
                    )?
                    .execute(params![id.as_bytes(), now])?;
                if n == 0 {
                    return Err(StoreError::NotFound(format!("inbound message {id}")));
                }
                Ok(())
            })
            .await
        })
    }

    fn pending_count(&self) -> StoreFuture<'_, u64> {
        Box::pin(self.read(|conn| {
            let n: i64 = conn
                .prepare_cached("SELECT count(*) FROM deliveries WHERE state = 'pending'")?
                .query_row([], |r| r.get(0))?;
            to_u64(n, "pending count")
        }))
    }

    fn append_audit(
        &self,
        about: Option<MessageKey>,
        entries: Vec<AuditEntry>,
    ) -> StoreFuture<'_, ()> {
        Box::pin(self.write(move |conn| {
            for e in entries {
                append_audit(conn, e, about.as_ref())?;
            }
            Ok(())
        }))
    }

    fn audit_tail(&self) -> StoreFuture<'_, AuditTail> {
        Box::pin(self.read(|conn| {
            // One read transaction: the checkpoint and the leaves after it agree.
            conn.execute_batch("BEGIN")?;
            let tail = audit_tail(conn);
            conn.execute_batch("COMMIT")?;
            tail
        }))
    }

    fn add_checkpoint(&self, checkpoint: NewCheckpoint) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let size = to_i64(checkpoint.tree_size, "tree_size")?;
            let time = to_i64(checkpoint.time_ms, "checkpoint time_ms")?;
            self.write(move |conn| {
                let (latest, leaves): (i64, i64) = conn
                    .prepare_cached(
                        "SELECT COALESCE((SELECT MAX(tree_size) FROM audit_checkpoints), 0), \
                         COALESCE((SELECT MAX(seq) + 1 FROM audit_log), 0)",
                    )?
                    .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                if size <= latest {
                    return Ok(false);
                }
                if size > leaves {
                    return Err(StoreError::Invalid(format!(
                        "checkpoint of {size} entries but the log holds {leaves}"
                    )));
                }
                conn.prepare_cached(
                    "INSERT INTO audit_checkpoints (tree_size, time_ms, root, frontier, signed) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![
                    size,
                    time,
                    checkpoint.root,
                    checkpoint.frontier,
                    checkpoint.signed
                ])?;
                Ok(true)
            })
            .await
        })
    }

    fn provisions(&self, subject: Pseudonym) -> StoreFuture<'_, Vec<ProvisionRecord>> {
        Box::pin(self.read(move |conn| provisions_for(conn, &subject)))
    }

    fn purge(
        &self,
        policy: PurgePolicy,
        audit: AuditEntry,
        suspended: AuditEntry,
    ) -> StoreFuture<'_, PurgeSummary> {
        Box::pin(async move {
            let policy = PurgeLimits::new(policy)?;
            let blobs = self.blobs.clone();
            let (summary, files) = self
                .write(move |conn| purge(conn, &policy, audit, suspended))
                .await?;
            // After the commit: no row names these files any more. Deleting
            // a large file can take long: not on a runtime thread.
            if !files.is_empty() {
                let removed = tokio::task::spawn_blocking(move || {
                    for name in files {
                        remove_quietly(&blobs.join(name));
                    }
                })
                .await;
                if removed.is_err() {
                    // The files stay until the next open's orphan sweep.
                    tracing::warn!("purged blob files not removed; the next start removes them");
                }
            }
            Ok(summary)
        })
    }
}

/// See [`Store::audit_tail`]; call inside a read transaction.
pub fn audit_tail(conn: &Connection) -> Result<AuditTail, StoreError> {
    let checkpoint: Option<(i64, Vec<u8>, Vec<u8>)> = conn
        .prepare_cached(
            "SELECT tree_size, frontier, signed FROM audit_checkpoints \
             ORDER BY tree_size DESC LIMIT 1",
        )?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let from = checkpoint.as_ref().map_or(0, |c| c.0);
    let entries = conn
        .prepare_cached("SELECT seq, entry, leaf_hash FROM audit_log WHERE seq >= ?1 ORDER BY seq")?
        .query_map([from], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?
        .map(|row| {
            let (seq, entry, leaf) = row?;
            let leaf = <[u8; 32]>::try_from(leaf.as_slice())
                .map_err(|_| StoreError::Corrupt("audit leaf hash is not 32 bytes".into()))?;
            Ok((to_u64(seq, "audit seq")?, entry, leaf))
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(AuditTail {
        checkpoint: checkpoint
            .map(|(size, f, signed)| Ok::<_, StoreError>((to_u64(size, "tree_size")?, f, signed)))
            .transpose()?,
        entries,
    })
}

/// A redelivery is still answered from a purged message's record this long
/// after its expiry (clocks of peers differ).
const PURGED_RECORD_MARGIN_MS: i64 = 86_400_000;

/// [`PurgePolicy`] in database integers.
struct PurgeLimits {
    now: i64,
    received_before: i64,
    /// Sent and relayed messages expiring before this are past their grace period.
    expired_before: i64,
    max_jump: i64,
}

impl PurgeLimits {
    fn new(p: PurgePolicy) -> Result<Self, StoreError> {
        let now = to_i64(p.now_ms, "now_ms")?;
        // Periods beyond the integer range mean "for ever".
        let period = |ms: u64| i64::try_from(ms).unwrap_or(i64::MAX);
        Ok(Self {
            now,
            received_before: to_i64(p.received_before_ms, "received_before_ms")?,
            expired_before: now.saturating_sub(period(p.receipt_grace_ms)),
            max_jump: period(p.max_clock_jump_ms),
        })
    }
}

/// Checks the clock against the newest time a purge accepted (before the
/// first purge: the newest time a message was received); `Some` if it is
/// too far ahead (the suspension recorded, `suspended` appended the first
/// time). Otherwise the clock is accepted as the newest time.
fn check_purge_clock(
    conn: &Connection,
    p: &PurgeLimits,
    suspended: AuditEntry,
) -> Result<Option<ClockJump>, StoreError> {
    let row: Option<(i64, Option<i64>)> = conn
        .prepare_cached("SELECT last_ms, suspended_ms FROM purge_clock WHERE id = 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let (last, since) = match row {
        Some(r) => r,
        None => {
            let newest: Option<i64> = conn
                .prepare_cached("SELECT MAX(received_ms) FROM messages")?
                .query_row([], |r| r.get(0))?;
            (newest.unwrap_or(p.now), None)
        }
    };
    if p.now > last.saturating_add(p.max_jump) {
        conn.prepare_cached(
            "INSERT INTO purge_clock (id, last_ms, suspended_ms) VALUES (1, ?1, ?2) \
             ON CONFLICT (id) DO UPDATE SET suspended_ms = COALESCE(suspended_ms, ?2)",
        )?
        .execute([last, p.now])?;
        if since.is_none() {
            append_audit(conn, suspended, None)?;
        }
        return Ok(Some(ClockJump {
            last_ms: to_u64(last, "purge_clock.last_ms")?,
            now_ms: to_u64(p.now, "now_ms")?,
            first: since.is_none(),
        }));
    }
    conn.prepare_cached(
        "INSERT INTO purge_clock (id, last_ms, suspended_ms) VALUES (1, ?1, NULL) \
         ON CONFLICT (id) DO UPDATE SET last_ms = max(last_ms, ?1), suspended_ms = NULL",
    )?
    .execute([p.now])?;
    Ok(None)
}

/// Deletes what the policy makes due (see [`Store::purge`]), keeping a
/// record of each message until its expiry; returns what went and the
/// blob files to remove after the commit.
fn purge(
    conn: &Connection,
    p: &PurgeLimits,
    mut audit: AuditEntry,
    suspended: AuditEntry,
) -> Result<(PurgeSummary, Vec<String>), StoreError> {
    if let Some(jump) = check_purge_clock(conn, p, suspended)? {
        return Ok((
            PurgeSummary {
                clock_jump: Some(jump),
                ..PurgeSummary::default()
            },
            Vec::new(),
        ));
    }
    conn.prepare_cached("DELETE FROM purged_messages WHERE expires_ms < ?1")?
        .execute([p.now.saturating_sub(PURGED_RECORD_MARGIN_MS)])?;
    conn.prepare_cached("DELETE FROM send_keys WHERE expires_ms < ?1")?
        .execute([p.now.saturating_sub(PURGED_RECORD_MARGIN_MS)])?;
    let due = conn
        .prepare_cached(
            "SELECT id, blob, ciphertext_len, wire_id FROM messages m WHERE received_ms < ?1 \
             AND NOT EXISTS (SELECT 1 FROM deliveries d \
                             WHERE d.message_id = m.id AND d.state = 'pending') \
             AND NOT (kind = 'inbound' AND fetched_ms IS NULL) \
             AND NOT (kind IN ('outbound', 'relay') AND expires_ms >= ?3 AND ( \
                 NOT EXISTS (SELECT 1 FROM message_awaited a WHERE a.message_id = m.id) \
                 OR EXISTS (SELECT 1 FROM message_awaited a WHERE a.message_id = m.id \
                     AND NOT EXISTS (SELECT 1 FROM receipts x \
                         WHERE x.message_id = m.id AND x.issuer = a.party \
                         AND x.disposition IN ('DELIVERED', 'PROCESSED', 'REJECTED'))))) \
             ORDER BY received_ms, id LIMIT ?2",
        )?
        .query_map(
            params![p.received_before, PURGE_BATCH, p.expired_before],
            |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                ))
            },
        )?
        .collect::<Result<Vec<_>, _>>()?;
    let mut summary = PurgeSummary::default();
    let mut files = Vec::new();
    for (id, blob, len, wire_id) in due {
        conn.prepare_cached(
            "INSERT OR REPLACE INTO purged_messages \
             (key, wire_id, sender, header_sha256, expires_ms, our_receipt, purged_ms) \
             SELECT id, wire_id, sender, header_sha256, expires_ms, our_receipt, ?2 \
             FROM messages WHERE id = ?1",
        )?
        .execute(params![&id, p.now])?;
        for sql in [
            "DELETE FROM deliveries WHERE message_id = ?1",
            "DELETE FROM receipts WHERE message_id = ?1",
            "DELETE FROM message_awaited WHERE message_id = ?1",
            "DELETE FROM message_subjects WHERE message_id = ?1",
            "DELETE FROM message_meta WHERE message_id = ?1",
            "DELETE FROM messages WHERE id = ?1",
        ] {
            conn.prepare_cached(sql)?.execute([&id])?;
        }
        summary.messages.push(message_id(&wire_id)?);
        summary.bytes += to_u64(len, "ciphertext_len")?;
        if let Some(name) = blob.filter(|n| valid_blob_name(n)) {
            files.push(name);
        }
    }
    if !summary.messages.is_empty() {
        let ids = summary
            .messages
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ");
        let detail = format!(
            "{} message(s), {} ciphertext bytes: {ids}",
            summary.messages.len(),
            summary.bytes
        );
        audit.detail = Some(match audit.detail.take() {
            Some(d) => format!("{d}; {detail}"),
            None => detail,
        });
        append_audit(conn, audit, None)?;
    }
    Ok((summary, files))
}

/// What remains of a purged message `sender` sent under `id`, if any.
fn load_purged(
    conn: &Connection,
    sender: &PartyUri,
    id: &MessageId,
) -> Result<Option<PurgedRecord>, StoreError> {
    conn.prepare_cached(
        "SELECT sender, header_sha256, expires_ms, our_receipt, purged_ms \
         FROM purged_messages WHERE sender = ?1 AND wire_id = ?2",
    )?
    .query_row(params![sender.as_str(), id.as_bytes()], |r| {
        let sender: String = r.get(0)?;
        let header: Vec<u8> = r.get(1)?;
        let expires: i64 = r.get(2)?;
        let our_receipt: Option<Vec<u8>> = r.get(3)?;
        let purged: i64 = r.get(4)?;
        Ok((|| -> Result<PurgedRecord, StoreError> {
            Ok(PurgedRecord {
                id: *id,
                sender: party(sender, "sender")?,
                header_sha256: <[u8; 32]>::try_from(header.as_slice())
                    .map_err(|_| StoreError::Corrupt("header_sha256 is not 32 bytes".into()))?,
                expires_ms: to_u64(expires, "expires_ms")?,
                our_receipt,
                purged_ms: to_u64(purged, "purged_ms")?,
            })
        })())
    })
    .optional()?
    .transpose()
}

// ---------------------------------------------------------------------------
// Writer thread.

/// One write operation queued for the writer.
trait Job: Send {
    /// Runs the operation inside the batch transaction and keeps its
    /// result; true if it succeeded.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answers the caller once the batch is settled: `None` if it committed,
    /// else why not.
    fn reply(self: Box<Self>, batch: Option<&rusqlite::Error>);
}

type Work<T> = Box<dyn FnOnce(&Connection) -> Result<T, StoreError> + Send>;
type Reply<T> = oneshot::Sender<Result<Result<T, StoreError>, StoreError>>;

struct Pending<T> {
    work: Option<Work<T>>,
    out: Option<Result<T, StoreError>>,
    reply: Option<Reply<T>>,
}

impl<T: Send> Job for Pending<T> {
    fn run(&mut self, conn: &Connection) -> bool {
        let out = match self.work.take() {
            // A panicking operation fails alone: its savepoint is rolled
            // back like any failing operation's, and the writer goes on.
            Some(work) => {
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(conn))) {
                    Ok(out) => out,
                    Err(panic) => {
                        let why = panic_text(panic.as_ref());
                        tracing::error!(panic = %why, "a store write operation panicked; it alone is undone");
                        Err(StoreError::Panicked(why))
                    }
                }
            }
            None => Err(StoreError::Corrupt("write operation run twice".into())),
        };
        let ok = out.is_ok();
        self.out = Some(out);
        ok
    }

    fn reply(mut self: Box<Self>, batch: Option<&rusqlite::Error>) {
        let answer = match batch {
            None => Ok(self
                .out
                .take()
                .unwrap_or_else(|| Err(StoreError::Corrupt("write operation not run".into())))),
            Some(e) => Err(sqlite_error(e)),
        };
        if let Some(reply) = self.reply.take() {
            // The caller may have gone away; its operation stands.
            let _ = reply.send(answer);
        }
    }
}

/// What a panic said, for the log and the caller's error.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    let text = if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    };
    exchange_core::audit::log_text(&text, 512)
}

/// The writer thread: runs [`writer_loop`] until the store is dropped. If
/// it dies instead (a panic outside any one operation), the queue is
/// closed, so every caller gets [`StoreError::Closed`], and `failed` says
/// why (the daemon then reports NOT_SERVING and exits).
fn writer_thread(
    conn: Connection,
    mut rx: tokio::sync::mpsc::Receiver<Box<dyn Job>>,
    committed: &AtomicU64,
    failed: &tokio::sync::watch::Sender<Option<String>>,
) {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        writer_loop(&conn, &mut rx, committed);
    }));
    if let Err(panic) = outcome {
        drop(rx);
        let why = format!("the store writer stopped: {}", panic_text(panic.as_ref()));
        tracing::error!(error = %why, "store writer died; no write can be made");
        failed.send_replace(Some(why));
    }
}

fn writer_loop(
    conn: &Connection,
    rx: &mut tokio::sync::mpsc::Receiver<Box<dyn Job>>,
    committed: &AtomicU64,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = Vec::with_capacity(16);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        match run_batch(conn, &mut batch) {
            Ok(()) => {
                crash_point!("store::after-commit");
                committed.fetch_add(1, Ordering::Relaxed);
                for job in batch {
                    job.reply(None);
                }
            }
            Err(e) => {
                for job in batch {
                    job.reply(Some(&e));
                }
            }
        }
    }
}

/// Runs `batch` in one transaction, one savepoint per job, and commits.
/// On error nothing of the batch is committed (or, if COMMIT itself failed,
/// the outcome is unknown).
fn run_batch(conn: &Connection, batch: &mut [Box<dyn Job>]) -> Result<(), rusqlite::Error> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = batch
        .iter_mut()
        .try_for_each(|job| run_one(conn, job.as_mut()))
        .and_then(|()| {
            crash_point!("store::before-commit");
            conn.execute_batch("COMMIT")
        });
    if result.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    result
}

fn run_one(conn: &Connection, job: &mut dyn Job) -> Result<(), rusqlite::Error> {
    conn.execute_batch("SAVEPOINT op")?;
    if job.run(conn) {
        conn.execute_batch("RELEASE op")
    } else if conn.is_autocommit() {
        // Some errors (disk full, I/O) make SQLite roll back the whole
        // transaction: the jobs before this one are lost too.
        Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
            Some("transaction rolled back by a failing operation".into()),
        ))
    } else {
        conn.execute_batch("ROLLBACK TO op; RELEASE op")
    }
}

// ---------------------------------------------------------------------------
// Rows and statements (run on the writer or the reader connection).

enum Body {
    Inline(Vec<u8>),
    Blob(String),
}

/// A [`NewEnvelope`] with its values converted for SQLite.
struct MessageRow {
    id: MessageId,
    header_sha256: [u8; 32],
    kind: MessageKind,
    head: Vec<u8>,
    body: Body,
    ciphertext_len: i64,
    sender: PartyUri,
    upstream: Option<PartyUri>,
    local_client: Option<String>,
    content_type: String,
    purpose: String,
    created_ms: i64,
    expires_ms: i64,
    received_ms: i64,
    our_receipt: Option<Vec<u8>>,
    deliveries: Vec<DeliveryRow>,
    awaited: Vec<PartyUri>,
    meta: Option<MessageMeta>,
    provision: Option<ProvisionRow>,
    audit: Vec<AuditEntry>,
    send_key: Option<SendKey>,
}

/// A [`NewProvision`] with its values converted for SQLite.
struct ProvisionRow {
    p: NewProvision,
    time_ms: i64,
}

impl ProvisionRow {
    fn new(p: NewProvision) -> Result<Self, StoreError> {
        Ok(Self {
            time_ms: to_i64(p.time_ms, "provision time_ms")?,
            p,
        })
    }
}

/// An [`AttemptOutcome`] with its values converted for SQLite.
enum Finish {
    Done,
    Retry(String, i64),
    Failed(String),
}

/// A [`NewDelivery`] with its values converted for SQLite.
struct DeliveryRow {
    target: PartyUri,
    kind: DeliveryKind,
    expires_ms: i64,
}

impl DeliveryRow {
    fn new(d: NewDelivery) -> Result<Self, StoreError> {
        Ok(Self {
            expires_ms: to_i64(d.expires_ms, "delivery expires_ms")?,
            target: d.target,
            kind: d.kind,
        })
    }
}

/// A [`NewReceipt`] with its digest and values converted for SQLite.
struct ReceiptRow {
    digest: [u8; 32],
    signed: Vec<u8>,
    issuer: PartyUri,
    disposition: String,
    issued_ms: i64,
    verified_ms: i64,
    forward: Option<DeliveryRow>,
    provisions: Vec<ProvisionRow>,
    audit: Option<AuditEntry>,
}

impl ReceiptRow {
    fn new(r: NewReceipt) -> Result<Self, StoreError> {
        Ok(Self {
            digest: sha256(&r.signed),
            issued_ms: to_i64(r.issued_ms, "receipt issued_ms")?,
            verified_ms: to_i64(r.verified_ms, "receipt verified_ms")?,
            forward: r.forward.map(DeliveryRow::new).transpose()?,
            provisions: r
                .provisions
                .into_iter()
                .map(ProvisionRow::new)
                .collect::<Result<_, _>>()?,
            audit: r.audit,
            signed: r.signed,
            issuer: r.issuer,
            disposition: r.disposition,
        })
    }
}

/// Whether a key is used by a message, a purged message's record or a
/// provision record.
fn key_used(conn: &Connection, key: &[u8; 16]) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM messages WHERE id = ?1) \
             OR EXISTS (SELECT 1 FROM purged_messages WHERE key = ?1) \
             OR EXISTS (SELECT 1 FROM provisions WHERE message_id = ?1)",
        )?
        .query_row([key.as_slice()], |r| r.get::<_, bool>(0))?)
}

/// A key for a new message: its id if no row uses that key, else random.
fn new_key(conn: &Connection, id: &MessageId) -> Result<MessageKey, StoreError> {
    if !key_used(conn, id.as_bytes())? {
        return Ok(MessageKey::of_id(*id));
    }
    for _ in 0..8 {
        let mut k = [0u8; 16];
        getrandom::fill(&mut k)
            .map_err(|e| StoreError::Corrupt(format!("no randomness for a message key: {e}")))?;
        if !key_used(conn, &k)? {
            return Ok(MessageKey::from_bytes(k));
        }
    }
    Err(StoreError::Corrupt(
        "no unused message key after 8 random draws".into(),
    ))
}

/// Inserts a message with its deliveries under a new key, or returns the
/// record stored (or purged) for the same sender and id.
fn insert_message(conn: &Connection, m: &MessageRow) -> Result<Accepted, StoreError> {
    if let Some(stored) = find_message(conn, &m.sender, &m.id)? {
        return Ok(Accepted::Duplicate(Box::new(stored)));
    }
    if let Some(purged) = load_purged(conn, &m.sender, &m.id)? {
        return Ok(Accepted::Purged(Box::new(purged)));
    }
    let key = new_key(conn, &m.id)?;
    let (inline, blob) = match &m.body {
        Body::Inline(bytes) => (Some(bytes.as_slice()), None),
        Body::Blob(name) => (None, Some(name.as_str())),
    };
    conn.prepare_cached(
        "INSERT INTO messages (id, header_sha256, kind, head, ciphertext, blob, ciphertext_len, \
         sender, upstream, local_client, content_type, purpose, created_ms, expires_ms, \
         received_ms, our_receipt, acked_ms, wire_id) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, NULL, ?17)",
    )?
    .execute(params![
        key.as_bytes(),
        m.header_sha256,
        m.kind.as_str(),
        m.head,
        inline,
        blob,
        m.ciphertext_len,
        m.sender.as_str(),
        m.upstream.as_ref().map(PartyUri::as_str),
        m.local_client,
        m.content_type,
        m.purpose,
        m.created_ms,
        m.expires_ms,
        m.received_ms,
        m.our_receipt,
        m.id.as_bytes(),
    ])?;
    for d in &m.deliveries {
        insert_delivery(conn, key.as_bytes(), d)?;
    }
    if let Some(k) = &m.send_key {
        // The primary key (client, key) makes a concurrent repeat fail
        // here rather than store a second envelope.
        conn.prepare_cached(
            "INSERT INTO send_keys (client, key, request_sha256, message_id, expires_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            k.client,
            k.key,
            k.request_sha256,
            key.as_bytes(),
            m.expires_ms
        ])?;
    }
    for party in &m.awaited {
        conn.prepare_cached(
            "INSERT OR IGNORE INTO message_awaited (message_id, party) VALUES (?1, ?2)",
        )?
        .execute(params![key.as_bytes(), party.as_str()])?;
    }
    if let Some(meta) = &m.meta {
        insert_meta(conn, key.as_bytes(), meta)?;
    }
    if let Some(p) = &m.provision {
        insert_provision(conn, &key, p)?;
    }
    for e in &m.audit {
        append_audit(conn, e.clone(), Some(&key))?;
    }
    Ok(Accepted::Stored)
}

fn insert_meta(conn: &Connection, message: &[u8], meta: &MessageMeta) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO message_meta (message_id, document_type, title) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![message, meta.document_type, meta.title])?;
    let mut subject = conn.prepare_cached(
        "INSERT INTO message_subjects (message_id, pseudonym) VALUES (?1, ?2) \
         ON CONFLICT DO NOTHING",
    )?;
    for p in &meta.subjects {
        subject.execute(params![message, p.as_bytes()])?;
    }
    Ok(())
}

/// Keeps a provision record (once per message, direction and recipient),
/// copying what was provided from the message's meta and header fields.
fn insert_provision(
    conn: &Connection,
    message: &MessageKey,
    row: &ProvisionRow,
) -> Result<(), StoreError> {
    let p = &row.p;
    let what: Option<(String, String, String, String, Vec<u8>)> = conn
        .prepare_cached(
            "SELECT COALESCE(mm.document_type, ''), COALESCE(mm.title, ''), m.purpose, \
             m.content_type, m.wire_id FROM messages m \
             LEFT JOIN message_meta mm ON mm.message_id = m.id WHERE m.id = ?1",
        )?
        .query_row([message.as_bytes()], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .optional()?;
    let Some((document_type, title, purpose, content_type, wire_id)) = what else {
        return Err(StoreError::NotFound(format!("message {message}")));
    };
    let inserted = conn
        .prepare_cached(
            "INSERT INTO provisions (direction, message_id, time_ms, counterparty, \
             counterparty_name, recipient, role, document_type, title, purpose, content_type, \
             receipt, wire_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) \
             ON CONFLICT (message_id, direction, recipient) DO NOTHING",
        )?
        .execute(params![
            p.direction.as_str(),
            message.as_bytes(),
            row.time_ms,
            p.counterparty.as_str(),
            p.counterparty_name,
            p.recipient.as_str(),
            p.role,
            document_type,
            title,
            purpose,
            content_type,
            p.receipt,
            wire_id,
        ])?;
    if inserted == 1 {
        // The provision's id is read once, before the copy: inside
        // `INSERT ... SELECT`, `last_insert_rowid()` would change after each
        // copied row.
        let provision_id = conn.last_insert_rowid();
        conn.prepare_cached(
            "INSERT INTO provision_subjects (provision_id, pseudonym) \
             SELECT ?1, pseudonym FROM message_subjects WHERE message_id = ?2",
        )?
        .execute(params![provision_id, message.as_bytes()])?;
        if let Some(e) = &p.audit {
            append_audit(conn, e.clone(), Some(message))?;
        }
    }
    Ok(())
}

/// Appends one audit entry: the next `seq`, a time never before the last
/// entry's, and the message's pseudonyms if the entry names none: listed
/// when they are at most [`MAX_INLINE_SUBJECTS`], else by reference (a
/// [`SubjectSet`], the set itself kept once in `audit_subject_sets`). The
/// entry must then pass [`AuditEntry::validate`], the rule exports and
/// verifiers apply, or nothing is appended.
///
/// The pseudonyms are those of the message with key `about`; without one,
/// those of the only message stored under the entry's message id (none if
/// several senders' messages carry it: the entry is never linked to the
/// patients of another sender's message).
fn append_audit(
    conn: &Connection,
    mut entry: AuditEntry,
    about: Option<&MessageKey>,
) -> Result<(), StoreError> {
    let (next, last_ms): (i64, i64) = conn
        .prepare_cached(
            "SELECT COALESCE(MAX(seq) + 1, 0), \
             COALESCE((SELECT time_ms FROM audit_log ORDER BY seq DESC LIMIT 1), 0) FROM audit_log",
        )?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let now = to_i64(crate::clock::unix_ms(std::time::SystemTime::now()), "now")?;
    let time_ms = now.max(last_ms);
    entry.seq = to_u64(next, "audit seq")?;
    entry.time_ms = to_u64(time_ms, "audit time")?;
    let key = match (about, entry.message_id.as_deref()) {
        _ if !entry.subjects.is_empty() => None,
        (_, None) => None,
        (Some(key), Some(_)) => Some(key.as_bytes().to_vec()),
        (None, Some(id)) => match hex::decode(id.replace('-', "")) {
            Ok(id) => {
                let keys = conn
                    .prepare_cached("SELECT id FROM messages WHERE wire_id = ?1 LIMIT 2")?
                    .query_map([id], |r| r.get::<_, Vec<u8>>(0))?
                    .collect::<Result<Vec<_>, _>>()?;
                match <[Vec<u8>; 1]>::try_from(keys) {
                    Ok([key]) => Some(key),
                    Err(_) => None,
                }
            }
            Err(_) => None,
        },
    };
    if let Some(key) = key {
        entry.subjects = conn
            .prepare_cached(
                "SELECT pseudonym FROM message_subjects WHERE message_id = ?1 \
                 ORDER BY pseudonym",
            )?
            .query_map([key], |r| r.get::<_, Vec<u8>>(0))?
            .map(|p| Ok(hex::encode(p?)))
            .collect::<Result<_, StoreError>>()?;
    }
    if entry.subjects.len() > MAX_INLINE_SUBJECTS {
        let set = entry
            .subjects
            .iter()
            .map(|h| {
                let mut p = [0u8; 32];
                hex::decode_to_slice(h, &mut p).map_err(|_| {
                    StoreError::Invalid("audit subject is not 64 hex digits".into())
                })?;
                Ok(p)
            })
            .collect::<Result<Vec<[u8; 32]>, StoreError>>()?;
        let reference = SubjectSet::of(&set);
        let digest = hex::decode(&reference.sha256)
            .map_err(|_| StoreError::Invalid("subject set digest".into()))?;
        let known = conn
            .prepare_cached("SELECT 1 FROM audit_subject_sets WHERE digest = ?1 LIMIT 1")?
            .query_row([&digest], |_| Ok(()))
            .optional()?
            .is_some();
        if !known {
            let mut insert = conn.prepare_cached(
                "INSERT OR IGNORE INTO audit_subject_sets (digest, pseudonym) VALUES (?1, ?2)",
            )?;
            for p in &set {
                insert.execute(params![digest, p.as_slice()])?;
            }
        }
        entry.subjects.clear();
        entry.subject_set = Some(reference);
    }
    entry
        .validate()
        .map_err(|e| StoreError::Invalid(format!("audit entry {}: {e}", entry.seq)))?;
    let json = entry.to_canonical_json();
    let leaf = exchange_core::suite::merkle_leaf_hash(&json);
    conn.prepare_cached(
        "INSERT INTO audit_log (seq, time_ms, entry, leaf_hash) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![next, time_ms, json, leaf])?;
    Ok(())
}

/// A new pending delivery, due at once.
fn insert_delivery(conn: &Connection, message: &[u8], d: &DeliveryRow) -> Result<(), StoreError> {
    let (kind, payload) = match &d.kind {
        DeliveryKind::Envelope => ("envelope", None),
        DeliveryKind::Receipt(bytes) => ("receipt", Some(bytes.as_slice())),
    };
    conn.prepare_cached(
        "INSERT INTO deliveries (message_id, kind, payload, target, state, attempts, \
         next_attempt_ms, expires_ms) VALUES (?1, ?2, ?3, ?4, 'pending', 0, 0, ?5)",
    )?
    .execute(params![
        message,
        kind,
        payload,
        d.target.as_str(),
        d.expires_ms
    ])?;
    Ok(())
}

/// Keeps the receipts not yet stored for `message` (and creates their
/// forward deliveries, provision records and audit entries); returns how
/// many were new. A receipt whose bytes, or whose issuer and disposition,
/// are already held for the message is ignored with all it brings.
fn insert_receipts(
    conn: &Connection,
    key: &MessageKey,
    receipts: &[ReceiptRow],
) -> Result<usize, StoreError> {
    let message = key.as_bytes().as_slice();
    let mut new = 0;
    for r in receipts {
        let inserted = conn
            .prepare_cached(
                "INSERT INTO receipts \
                 (message_id, digest, issuer, disposition, issued_ms, signed, verified_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING",
            )?
            .execute(params![
                message,
                r.digest,
                r.issuer.as_str(),
                r.disposition,
                r.issued_ms,
                r.signed,
                r.verified_ms
            ])?;
        if inserted == 1 {
            new += 1;
            if let Some(forward) = &r.forward {
                insert_delivery(conn, message, forward)?;
            }
            for p in &r.provisions {
                insert_provision(conn, key, p)?;
            }
            if let Some(e) = &r.audit {
                append_audit(conn, e.clone(), Some(key))?;
            }
        }
    }
    Ok(new)
}

fn load_message(conn: &Connection, key: &MessageKey) -> Result<Option<MessageRecord>, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?1"
    ))?
    .query_row([key.as_bytes()], message_from_row)
    .optional()?
    .transpose()
}

/// The message `sender` sent under `id`.
fn find_message(
    conn: &Connection,
    sender: &PartyUri,
    id: &MessageId,
) -> Result<Option<MessageRecord>, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages WHERE sender = ?1 AND wire_id = ?2"
    ))?
    .query_row(params![sender.as_str(), id.as_bytes()], message_from_row)
    .optional()?
    .transpose()
}

/// The kind and acknowledgement time of a stored message.
fn load_kind_acked(
    conn: &Connection,
    id: &MessageKey,
) -> Result<Option<(MessageKind, Option<i64>)>, StoreError> {
    let row: Option<(String, Option<i64>)> = conn
        .prepare_cached("SELECT kind, acked_ms FROM messages WHERE id = ?1")?
        .query_row([id.as_bytes()], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    row.map(|(kind, acked)| Ok((message_kind(&kind)?, acked)))
        .transpose()
}

/// Reads a row of [`MESSAGE_COLUMNS`]. Outer error: SQLite; inner: content.
fn message_from_row(r: &Row<'_>) -> rusqlite::Result<Result<MessageRecord, StoreError>> {
    let id: Vec<u8> = r.get(0)?;
    let header: Vec<u8> = r.get(1)?;
    let kind: String = r.get(2)?;
    let head: Vec<u8> = r.get(3)?;
    let ciphertext_len: i64 = r.get(4)?;
    let sender: String = r.get(5)?;
    let upstream: Option<String> = r.get(6)?;
    let local_client: Option<String> = r.get(7)?;
    let content_type: String = r.get(8)?;
    let purpose: String = r.get(9)?;
    let created_ms: i64 = r.get(10)?;
    let expires_ms: i64 = r.get(11)?;
    let received_ms: i64 = r.get(12)?;
    let our_receipt: Option<Vec<u8>> = r.get(13)?;
    let acked_ms: Option<i64> = r.get(14)?;
    let fetched_ms: Option<i64> = r.get(15)?;
    let wire_id: Vec<u8> = r.get(16)?;
    Ok((|| -> Result<MessageRecord, StoreError> {
        Ok(MessageRecord {
            key: message_key(&id)?,
            id: message_id(&wire_id)?,
            header_sha256: <[u8; 32]>::try_from(header.as_slice())
                .map_err(|_| StoreError::Corrupt("header_sha256 is not 32 bytes".into()))?,
            kind: message_kind(&kind)?,
            head,
            ciphertext_len: to_u64(ciphertext_len, "ciphertext_len")?,
            sender: party(sender, "sender")?,
            upstream: upstream.map(|u| party(u, "upstream")).transpose()?,
            local_client,
            content_type,
            purpose,
            created_ms: to_u64(created_ms, "created_ms")?,
            expires_ms: to_u64(expires_ms, "expires_ms")?,
            received_ms: to_u64(received_ms, "received_ms")?,
            our_receipt,
            acked_ms: acked_ms.map(|a| to_u64(a, "acked_ms")).transpose()?,
            fetched_ms: fetched_ms.map(|f| to_u64(f, "fetched_ms")).transpose()?,
        })
    })())
}

/// Reads a row of [`DELIVERY_COLUMNS`]. Outer error: SQLite; inner: content.
fn delivery_from_row(r: &Row<'_>) -> rusqlite::Result<Result<DeliveryRecord, StoreError>> {
    let id: i64 = r.get(0)?;
    let message: Vec<u8> = r.get(1)?;
    let target: String = r.get(2)?;
    let kind: String = r.get(3)?;
    let payload: Option<Vec<u8>> = r.get(4)?;
    let state: String = r.get(5)?;
    let failure: Option<String> = r.get(6)?;
    let attempts: i64 = r.get(7)?;
    let next_attempt_ms: i64 = r.get(8)?;
    let last_error: Option<String> = r.get(9)?;
    let expires_ms: i64 = r.get(10)?;
    let wire_id: Option<Vec<u8>> = r.get(11)?;
    Ok((|| -> Result<DeliveryRecord, StoreError> {
        let kind = match (kind.as_str(), payload) {
            ("envelope", None) => DeliveryKind::Envelope,
            ("receipt", Some(bytes)) => DeliveryKind::Receipt(bytes),
            (k, _) => {
                return Err(StoreError::Corrupt(format!(
                    "delivery {id}: kind {:?} with or without payload",
                    k.escape_debug().to_string()
                )));
            }
        };
        let state = match (state.as_str(), failure) {
            ("pending", _) => DeliveryState::Pending,
            ("done", _) => DeliveryState::Done,
            ("failed", Some(reason)) => DeliveryState::Failed(reason),
            (s, _) => {
                return Err(StoreError::Corrupt(format!(
                    "delivery {id}: state {:?}",
                    s.escape_debug().to_string()
                )));
            }
        };
        Ok(DeliveryRecord {
            id,
            message: message_key(&message)?,
            message_id: message_id(wire_id.as_deref().unwrap_or_default())?,
            target: party(target, "delivery target")?,
            kind,
            state,
            attempts: u32::try_from(attempts)
                .map_err(|_| StoreError::Corrupt(format!("delivery {id}: attempts {attempts}")))?,
            next_attempt_ms: to_u64(next_attempt_ms, "next_attempt_ms")?,
            last_error,
            expires_ms: to_u64(expires_ms, "delivery expires_ms")?,
        })
    })())
}

fn message_id(b: &[u8]) -> Result<MessageId, StoreError> {
    MessageId::from_slice(b).map_err(|_| StoreError::Corrupt("message id is not 16 bytes".into()))
}

fn message_key(b: &[u8]) -> Result<MessageKey, StoreError> {
    <[u8; 16]>::try_from(b)
        .map(MessageKey::from_bytes)
        .map_err(|_| StoreError::Corrupt("message key is not 16 bytes".into()))
}

fn message_kind(s: &str) -> Result<MessageKind, StoreError> {
    MessageKind::parse(s).ok_or_else(|| {
        StoreError::Corrupt(format!("message kind {:?}", s.escape_debug().to_string()))
    })
}

fn party(s: String, what: &str) -> Result<PartyUri, StoreError> {
    PartyUri::new(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// A `u64` for an INTEGER column (which holds at most `i64::MAX`).
fn to_i64(v: u64, what: &'static str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Invalid(format!("{what} {v} exceeds i64::MAX")))
}

/// An INTEGER column read back as `u64`: negative means corrupt.
fn to_u64(v: i64, what: &'static str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} is negative ({v})")))
}

fn check_len(actual: Option<u64>, declared: u64) -> Result<(), StoreError> {
    if actual == Some(declared) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "ciphertext is {actual:?} bytes, envelope declares {declared}"
        )))
    }
}

// ---------------------------------------------------------------------------
// Files.

pub(crate) fn io_err(op: &'static str, path: &Path, source: io::Error) -> StoreError {
    StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `dir` (mode 0700 on unix) unless it exists.
fn create_dir(dir: &Path) -> Result<(), StoreError> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
        .map_err(|e| io_err("create directory", dir, e))
}

/// A new file that must not exist yet (mode 0600 on unix).
pub(crate) fn create_private(path: &Path) -> Result<File, StoreError> {
    let mut o = OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o.open(path).map_err(|e| io_err("create", path, e))
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("fsync directory", dir, e))
}

/// Hands `work` to the writer through `tx` (see [`SqliteStore::submit`]).
/// Once sent, the job runs and commits whether or not its answer is awaited.
async fn submit_to<T, F>(
    tx: &tokio::sync::mpsc::Sender<Box<dyn Job>>,
    submitted: &AtomicU64,
    work: F,
) -> Result<Result<T, StoreError>, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
{
    let (reply, rx) = oneshot::channel();
    let job: Box<dyn Job> = Box::new(Pending {
        work: Some(Box::new(work)),
        out: None,
        reply: Some(reply),
    });
    // Waits for a place when the queue is full (backpressure).
    tx.send(job).await.map_err(|_| StoreError::Closed)?;
    submitted.fetch_add(1, Ordering::Relaxed);
    rx.await.map_err(|_| StoreError::Closed)?
}

/// Removes a blob no row names, off the runtime threads.
async fn remove_blob(path: PathBuf) {
    let _ = tokio::task::spawn_blocking(move || remove_quietly(&path)).await;
}

fn remove_quietly(path: &Path) {
    // Failure leaves an orphan blob, which the next open removes.
    let _ = fs::remove_file(path);
    crate::failpoints::forgotten(path);
}

/// Takes the directory's exclusive lock: an SQLite file in exclusive
/// locking mode keeps its lock until the connection closes.
fn lock_dir(dir: &Path) -> Result<Connection, StoreError> {
    let path = dir.join(LOCK_FILE);
    let lock = Connection::open(&path)?;
    lock.busy_timeout(Duration::ZERO)?;
    let _: String = lock.query_row("PRAGMA locking_mode = EXCLUSIVE", [], |r| r.get(0))?;
    lock.execute_batch(
        "BEGIN EXCLUSIVE; CREATE TABLE IF NOT EXISTS lock (x); DELETE FROM lock; COMMIT;",
    )
    .map_err(|e| match e {
        rusqlite::Error::SqliteFailure(code, _)
            if code.code == rusqlite::ErrorCode::DatabaseBusy =>
        {
            StoreError::Io {
                op: "lock (already open elsewhere)",
                path: path.clone(),
                source: io::Error::new(io::ErrorKind::WouldBlock, "store directory in use"),
            }
        }
        other => other.into(),
    })?;
    Ok(lock)
}

/// Connection settings shared by the writer and the reader.
fn configure(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
    conn.execute_batch("PRAGMA trusted_schema = OFF;")?;
    Ok(())
}

/// Brings the schema to the newest version, one transaction per step.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let supported = u32::try_from(MIGRATIONS.len())
        .map_err(|_| StoreError::Corrupt("too many migrations".into()))?;
    loop {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let version = u32::try_from(version)
            .map_err(|_| StoreError::Corrupt(format!("schema version {version}")))?;
        if version > supported {
            return Err(StoreError::SchemaTooNew {
                found: version,
                supported,
            });
        }
        let Some(sql) = usize::try_from(version)
            .ok()
            .and_then(|v| MIGRATIONS.get(v))
        else {
            return Ok(());
        };
        tx.execute_batch(sql)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", version + 1))?;
        tx.commit()?;
    }
}

/// Deletes everything in `spool/` (files of calls that never finished).
fn clear_spool(spool: &Path) -> Result<(), StoreError> {
    for entry in fs::read_dir(spool).map_err(|e| io_err("read directory", spool, e))? {
        let entry = entry.map_err(|e| io_err("read directory", spool, e))?;
        let path = entry.path();
        let file_type = entry.file_type().map_err(|e| io_err("stat", &path, e))?;
        if !file_type.is_dir() {
            fs::remove_file(&path).map_err(|e| io_err("remove", &path, e))?;
        }
    }
    Ok(())
}

/// Deletes the files in `blobs/` that no message row names.
fn sweep_blobs(conn: &Connection, blobs: &Path) -> Result<(), StoreError> {
    let named: HashSet<String> = conn
        .prepare("SELECT blob FROM messages WHERE blob IS NOT NULL")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for entry in fs::read_dir(blobs).map_err(|e| io_err("read directory", blobs, e))? {
        let entry = entry.map_err(|e| io_err("read directory", blobs, e))?;
        let path = entry.path();
        let file_type = entry.file_type().map_err(|e| io_err("stat", &path, e))?;
        if file_type.is_dir() {
            continue;
        }
        let keep = entry
            .file_name()
            .to_str()
            .is_some_and(|n| named.contains(n));
        if !keep {
            fs::remove_file(&path).map_err(|e| io_err("remove orphan", &path, e))?;
        }
    }
    Ok(())
}

pub(crate) fn valid_blob_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 80
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b'-')
}

/// Makes a fully written spool file a blob: fsync, hard-link under a free
/// name in `blobs/` (never replacing a file), fsync `blobs/`, drop the spool
/// name. Returns the blob's name and path.
fn adopt_spool(
    mut spooled: SpoolFile,
    blobs: &Path,
    base: &str,
    declared_len: u64,
) -> Result<(String, PathBuf), StoreError> {
    let spool_path = spooled.path.clone();
    spooled
        .file
        .flush()
        .and_then(|()| spooled.file.sync_all())
        .map_err(|e| io_err("fsync", &spool_path, e))?;
    crate::failpoints::synced(&spool_path);
    crash_point!("store::spool-fsynced");
    let len = spooled
        .file
        .metadata()
        .map_err(|e| io_err("stat", &spool_path, e))?
        .len();
    check_len(Some(len), declared_len)?;

    let mut name = base.to_owned();
    let mut tries = 0;
    let path = loop {
        let path = blobs.join(&name);
        match fs::hard_link(&spool_path, &path) {
            Ok(()) => break path,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 8 => {
                tries += 1;
                let mut suffix = [0u8; 8];
                getrandom::fill(&mut suffix).map_err(|e| {
                    io_err("random name in", blobs, io::Error::other(e.to_string()))
                })?;
                name = format!("{base}-{}", hex::encode(suffix));
            }
            Err(e) => return Err(io_err("link blob", &path, e)),
        }
    };
    crate::failpoints::linked(&spool_path, &path);
    crash_point!("store::blob-linked");
    if let Err(e) = sync_dir(blobs) {
        remove_quietly(&path);
        return Err(e);
    }
    crate::failpoints::dir_synced(&path);
    crash_point!("store::blob-dir-synced");
    // The blob holds the data now; the spool name goes (the SpoolFile must
    // not remove anything itself any more).
    spooled.kept = true;
    let _ = fs::remove_file(&spool_path);
    Ok((name, path))
}
