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
//! The schema and its versions are documented in [`schema`]; the times it
//! keeps are Unix milliseconds.
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
//! The offline tools read through [`SqliteSnapshot`], a read-only
//! connection without the lock; backup and restore through [`BackupSource`]
//! and [`open_restored`].
//!
//! One process per store directory (enforced by `store.lock`).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use exchange_core::audit::{AuditEntry, Pseudonym};
use exchange_core::{MessageId, PartyUri};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::{
    Accepted, AttemptOutcome, AuditTail, Ciphertext, DeliveryRecord, MessageKey, MessageKind,
    MessageRecord, NewCheckpoint, NewEnvelope, NewReceipt, ProvisionRecord, PurgePolicy,
    PurgeSummary, ReceiptRecord, SendKeyRecord, SpoolFile, Store, StoreFuture, StoredCiphertext,
};
use crate::error::StoreError;
use files::{
    adopt_spool, clear_spool, create_dir, lock_dir, remove_blob, remove_quietly, sweep_blobs,
};
use purge::{PurgeLimits, purge};
use rows::{
    DELIVERY_COLUMNS, MESSAGE_COLUMNS, NEXT_PENDING_TARGET, check_len, delivery_from_row,
    due_for_target_sql, find_message, load_kind_acked, load_message, message_from_row, message_id,
    message_key, party, to_i64, to_u64,
};
use schema::{configure, migrate};
use write::{
    Body, DeliveryRow, Finish, MessageRow, ProvisionRow, ReceiptRow, append_audit, insert_message,
    insert_receipts,
};
use writer::{Job, submit_to, writer_thread};

mod backup;
mod files;
mod purge;
mod rows;
pub mod schema;
mod snapshot;
#[cfg(test)]
pub(crate) mod tests;
mod write;
mod writer;

pub use backup::{BackupSource, open_restored};
pub(crate) use files::{create_private, io_err, sync_dir, valid_blob_name};
pub use purge::PURGE_BATCH;
pub use rows::{audit_tail, provisions_for};
pub use schema::{MIGRATIONS, supported_schema_version};
pub use snapshot::{SqliteSnapshot, open_read_only, open_read_only_any_version};
pub use writer::{MAX_BATCH, WRITER_QUEUE, WriterStats};

/// SQLite's errors as the store reports them: what SQLite said, under the
/// backend's name (the same text for every caller of a failed batch).
fn sqlite_error(e: &rusqlite::Error) -> StoreError {
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

const DB_FILE: &str = "store.sqlite3";
const LOCK_FILE: &str = "store.lock";
const BLOBS_DIR: &str = "blobs";
const SPOOL_DIR: &str = "spool";

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
            self.write(move |conn| {
                // Each target's due items, oldest first, read from the
                // (target, next_attempt_ms, id) index: the cost of a claim
                // grows with the number of targets and of items taken, not
                // with the backlog.
                let busy: HashMap<String, usize> = busy
                    .into_iter()
                    .map(|(t, n)| (t.as_str().to_owned(), n))
                    .collect();
                let mut next_target = conn.prepare_cached(NEXT_PENDING_TARGET)?;
                let mut due_of = conn.prepare_cached(&due_for_target_sql())?;
                let mut queues = Vec::new();
                let mut after = String::new();
                while let Some(target) = next_target
                    .query_row(params![after], |r| r.get::<_, String>(0))
                    .optional()?
                {
                    let running = busy.get(target.as_str()).copied().unwrap_or(0);
                    let room = per_target.saturating_sub(running).min(limit);
                    if room > 0 {
                        let room = i64::try_from(room).unwrap_or(i64::MAX);
                        let queue = due_of
                            .query_map(params![target, now, room], delivery_from_row)?
                            .collect::<Result<Vec<_>, _>>()?
                            .into_iter()
                            .collect::<Result<Vec<_>, _>>()?;
                        if !queue.is_empty() {
                            queues.push(queue.into_iter());
                        }
                    }
                    after = target;
                }
                // Targets take turns (oldest first within each turn).
                let mut due = crate::store::values::take_turns(queues, limit);
                let mut claim = conn.prepare_cached(
                    "UPDATE deliveries SET claimed_by = ?1, claim_until_ms = ?2, \
                     claim = claim + 1 WHERE id = ?3 RETURNING claim",
                )?;
                for d in &mut due {
                    let token: i64 = claim.query_row(params![owner, until, d.id], |r| r.get(0))?;
                    d.claim = to_u64(token, "delivery claim")?;
                }
                Ok(due)
            })
            .await
        })
    }

    fn renew_claims(
        &self,
        owner: &str,
        claims: Vec<(i64, u64)>,
        lease_until_ms: u64,
    ) -> StoreFuture<'_, u64> {
        let owner = owner.to_owned();
        Box::pin(async move {
            let until = to_i64(lease_until_ms, "lease_until_ms")?;
            let claims = claims
                .into_iter()
                .map(|(id, token)| Ok((id, to_i64(token, "claim")?)))
                .collect::<Result<Vec<_>, StoreError>>()?;
            self.write(move |conn| {
                let mut renew = conn.prepare_cached(
                    "UPDATE deliveries SET claim_until_ms = ?3 \
                     WHERE id = ?2 AND claimed_by = ?1 AND claim = ?4 AND state = 'pending'",
                )?;
                let mut n = 0u64;
                for (id, token) in claims {
                    n += u64::try_from(renew.execute(params![owner, id, until, token])?)
                        .unwrap_or(0);
                }
                Ok(n)
            })
            .await
        })
    }

    fn release_claim(&self, owner: &str, claims: Vec<(i64, u64)>) -> StoreFuture<'_, u64> {
        let owner = owner.to_owned();
        Box::pin(async move {
            let claims = claims
                .into_iter()
                .map(|(id, token)| Ok((id, to_i64(token, "claim")?)))
                .collect::<Result<Vec<_>, StoreError>>()?;
            self.write(move |conn| {
                let mut release = conn.prepare_cached(
                    "UPDATE deliveries SET claimed_by = NULL, claim_until_ms = NULL \
                     WHERE id = ?1 AND claimed_by = ?2 AND claim = ?3 AND state = 'pending'",
                )?;
                let mut n = 0u64;
                for (id, token) in claims {
                    n += u64::try_from(release.execute(params![id, owner, token])?).unwrap_or(0);
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
        claim: u64,
        outcome: AttemptOutcome,
        receipts: Vec<NewReceipt>,
        audit: Vec<AuditEntry>,
    ) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let claim = to_i64(claim, "claim")?;
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
                // Only a pending delivery under this claim changes: a late
                // report from a worker whose lease lapsed must neither
                // reopen a finished delivery nor overwrite a live claim.
                match &outcome {
                    Finish::Done => conn
                        .prepare_cached(
                            "UPDATE deliveries SET state = 'done', attempts = attempts + 1, \
                             claimed_by = NULL, claim_until_ms = NULL \
                             WHERE id = ?1 AND state = 'pending'",
                        )?
                        .execute(params![delivery])?,
                    Finish::Retry(error, next) => conn
                        .prepare_cached(
                            "UPDATE deliveries SET attempts = attempts + 1, last_error = ?2, \
                             next_attempt_ms = ?3, claimed_by = NULL, claim_until_ms = NULL \
                             WHERE id = ?1 AND state = 'pending' AND claim = ?4",
                        )?
                        .execute(params![delivery, error, next, claim])?,
                    Finish::Failed(reason) => conn
                        .prepare_cached(
                            "UPDATE deliveries SET state = 'failed', failure = ?2, \
                             attempts = attempts + 1, claimed_by = NULL, claim_until_ms = NULL \
                             WHERE id = ?1 AND state = 'pending' AND claim = ?3",
                        )?
                        .execute(params![delivery, reason, claim])?,
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
        super::values::failure_of(self.writer_failed.clone())
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

    fn audit_entries(&self, from: u64, limit: usize) -> StoreFuture<'_, Vec<(u64, Vec<u8>)>> {
        Box::pin(async move {
            let from = to_i64(from, "audit seq")?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            self.read(move |conn| {
                conn.prepare_cached(
                    "SELECT seq, entry FROM audit_log WHERE seq >= ?1 ORDER BY seq LIMIT ?2",
                )?
                .query_map(params![from, limit], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
                })?
                .map(|row| {
                    let (seq, entry) = row?;
                    Ok((to_u64(seq, "audit seq")?, entry))
                })
                .collect()
            })
            .await
        })
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
