//! The shared store: one PostgreSQL database that several daemon replicas
//! of one facility use at once (`[store] url = "postgres://…"`).
//!
//! # What each replica may rely on
//!
//! * Every operation is one transaction, committed before it returns: with
//!   PostgreSQL's default `synchronous_commit = on` a returned `Ok` is
//!   durable (and, with synchronous replication, on the standby too).
//! * Idempotency is enforced by unique constraints, never by a check and
//!   then an insert: a received envelope by (sender, message id), a Send
//!   by (client, idempotency key), a receipt by its digest and by
//!   (issuer, disposition), a provision record by (message, direction,
//!   recipient). Of two replicas inserting the same thing, the second waits
//!   for the first's transaction and then finds its row.
//! * Work is claimed with `FOR UPDATE SKIP LOCKED`: replicas never wait for
//!   each other's claims and never take the same item. Lease times are
//!   reckoned by the database's clock, so replicas whose clocks differ agree
//!   on when a lease lapses; the lease's length is the caller's. Every claim
//!   increments the delivery's fencing token, which renewing and finishing
//!   must present: a replica whose lease lapsed cannot change a delivery
//!   another one has claimed since.
//! * Each replica has a name (`delivery.node_name`), unique among the running
//!   replicas of a database: a replica holds a session advisory lock for its
//!   name on a connection of its own for as long as it runs, and a second
//!   one under the same name is refused (after waiting five seconds for a
//!   predecessor's session to end). If that connection is lost, the
//!   replica's [`Store::failure`] resolves and it stops (its supervisor
//!   restarts it): it never runs without holding its name.
//! * The same connection listens for the changes the schema's triggers
//!   announce (see [`schema`]), whichever replica made them: they reach
//!   [`Store::changes`], so that a delivery stored or given back by one
//!   replica is claimed at once by an idle one, and a receipt taken by one
//!   replica wakes the status watches on all of them.
//! * The audit log stays one Merkle log for the facility: appends take the
//!   audit head's row lock last in their transaction, just before it commits.
//! * Large ciphertexts are kept in the database in chunks of [`CHUNK`] bytes;
//!   spool files are local scratch (a directory of the replica's own).
//!
//! The connection pool holds at most `[store] max_connections`
//! connections; an operation waits for a free one.

mod blobs;
mod purge;
mod rows;
pub mod schema;
mod snapshot;
mod tls;
mod write;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use exchange_core::audit::{AuditEntry, Pseudonym};
use exchange_core::{MessageId, PartyUri};

use super::{
    Accepted, AttemptOutcome, AuditTail, Ciphertext, DeliveryRecord, MessageKey, MessageKind,
    MessageRecord, NewCheckpoint, NewEnvelope, NewReceipt, ProvisionRecord, PurgePolicy,
    PurgeSummary, ReceiptRecord, SendKeyRecord, SpoolFile, Store, StoreChange, StoreFuture,
    StoredCiphertext,
};
use crate::error::StoreError;
use crate::store::sqlite::{create_private, io_err};
use rows::{
    DB_NOW_MS, DELIVERY_COLUMNS, MESSAGE_COLUMNS, PROVISIONS_OF_SUBJECT, col, delivery_from_row,
    digest, find_message, load_kind_acked, load_message, message_from_row, message_id, message_key,
    party, provision_from_row, query_map, to_i64, to_u64,
};
use write::{
    Audits, ReceiptRow, append_audits, check_envelope, insert_message_rest, insert_message_row,
    insert_receipts,
};

pub use blobs::CHUNK;
pub use schema::{MIGRATIONS, supported_schema_version};
pub use snapshot::{PAGE as SNAPSHOT_PAGE, PgSnapshot, redacted_url};
pub use tls::PgTls;
pub(crate) use tls::{check as check_tls, url_with_files};

/// A transaction on a pooled connection: every statement runs in one.
pub(crate) type Conn<'a> = deadpool_postgres::Transaction<'a>;

/// The advisory lock key (first half) of a replica's name.
const NODE_LOCK: i32 = 0x6578_6368; // "exch"

/// How often opening tries to take the replica's name (250 ms apart)
/// before it is refused as taken.
const NAME_TRIES: u32 = 20;

/// Announced changes held for a slow listener; beyond this it misses
/// some (and its polls catch up).
const CHANGES_BUFFER: usize = 1024;

/// PostgreSQL's errors as the store reports them: the server's message and
/// SQLSTATE when it sent one, else the driver's.
pub(crate) fn pg_error(e: tokio_postgres::Error) -> StoreError {
    let detail = match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    };
    StoreError::Backend {
        backend: "postgres",
        detail,
    }
}

/// A connection the pool could not give.
pub(crate) fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_error(e),
        e => StoreError::Backend {
            backend: "postgres",
            detail: format!("connection pool: {e}"),
        },
    }
}

/// How to reach the database and how much of it to hold.
#[derive(Clone)]
pub struct PgOptions {
    /// `postgres://user@host:port/database` (or key=value form).
    pub url: String,
    /// TLS to the database (with the URL's `sslmode`; see [`PgTls`]).
    pub tls: PgTls,
    /// This replica's name (unique among the running replicas).
    pub node_name: String,
    /// Most pooled connections.
    pub max_connections: usize,
    /// A local directory for spool files.
    pub spool_dir: PathBuf,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: it is never printed.
        f.debug_struct("PgOptions")
            .field("tls", &self.tls)
            .field("node_name", &self.node_name)
            .field("max_connections", &self.max_connections)
            .field("spool_dir", &self.spool_dir)
            .finish_non_exhaustive()
    }
}

/// The PostgreSQL [`Store`] (see the module documentation).
pub struct PgStore {
    pool: Pool,
    spool: PathBuf,
    /// Resolves (with the reason) when the connection holding this
    /// replica's name is lost.
    name_lost: tokio::sync::watch::Receiver<Option<String>>,
    /// The changes other replicas announce, heard on the name connection.
    changes: tokio::sync::broadcast::Sender<StoreChange>,
    /// Ends the name connection when the store is dropped.
    _name_holder: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("spool", &self.spool)
            .finish_non_exhaustive()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self._name_holder.abort();
    }
}

/// Opens a connection (TLS as `tls::prepare` decided) and drives it in a
/// task of its own, which passes the changes announced on it to `changes`.
async fn connect(
    config: &tokio_postgres::Config,
    connector: &tls::MakeRustls,
    changes: tokio::sync::broadcast::Sender<StoreChange>,
) -> Result<
    (
        tokio_postgres::Client,
        tokio::task::JoinHandle<Option<String>>,
    ),
    StoreError,
> {
    let (client, connection) = config
        .connect(connector.clone())
        .await
        .map_err(tls::connect_error)?;
    let task = tokio::spawn(drive(connection, changes));
    Ok((client, task))
}

/// Drives a connection until it ends (with the error that ended it, if
/// one did), passing on the changes announced on it.
async fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    changes: tokio::sync::broadcast::Sender<StoreChange>,
) -> Option<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                match parse_change(n.channel(), n.payload()) {
                    // No receiver (nothing listens yet) is not an error.
                    Some(change) => drop(changes.send(change)),
                    None => tracing::warn!(
                        channel = n.channel(),
                        "ignoring an unknown change announcement"
                    ),
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Some(e.to_string()),
            None => return None,
        }
    }
}

/// A change as the schema's triggers announce it (see [`schema`]).
fn parse_change(channel: &str, payload: &str) -> Option<StoreChange> {
    if channel != schema::CHANGES_CHANNEL {
        return None;
    }
    if payload == "w" {
        return Some(StoreChange::Work);
    }
    let key = <[u8; 16]>::try_from(hex::decode(payload.strip_prefix('m')?).ok()?).ok()?;
    Some(StoreChange::Message(MessageKey::from_bytes(key)))
}

impl PgStore {
    /// Connects, migrates the schema, takes this replica's name (refused if
    /// another running replica holds it) and opens the pool.
    pub async fn open(options: PgOptions) -> Result<Self, StoreError> {
        let tls::Prepared {
            config,
            tls: connector,
            ..
        } = tls::prepare(&options.url, &options.tls)?;
        let spool = &options.spool_dir;
        std::fs::create_dir_all(spool).map_err(|e| io_err("create", spool, e))?;
        clear_spool(&options.spool_dir)?;
        let (changes, _) = tokio::sync::broadcast::channel(CHANGES_BUFFER);
        let (mut client, connection) = connect(&config, &connector, changes.clone()).await?;
        schema::migrate(&mut client).await?;
        let name = options.node_name.clone();
        let id: i32 = client
            .query_one(
                &format!(
                    "INSERT INTO nodes (name, seen_ms) VALUES ($1, {DB_NOW_MS}) \
                     ON CONFLICT (name) DO UPDATE SET seen_ms = EXCLUDED.seen_ms RETURNING id"
                ),
                &[&name],
            )
            .await
            .map_err(pg_error)?
            .get(0);
        // A predecessor under this name that has just stopped may still
        // have its session for a moment: wait a little for it to end.
        let mut tries = 0;
        loop {
            let locked: bool = client
                .query_one("SELECT pg_try_advisory_lock($1, $2)", &[&NODE_LOCK, &id])
                .await
                .map_err(pg_error)?
                .get(0);
            if locked {
                break;
            }
            tries += 1;
            if tries >= NAME_TRIES {
                return Err(StoreError::NodeNameTaken(name));
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
        // The name connection also hears the other replicas' changes.
        client
            .batch_execute(&format!("LISTEN {}", schema::CHANGES_CHANNEL))
            .await
            .map_err(pg_error)?;
        let (lost_tx, name_lost) = tokio::sync::watch::channel(None);
        // The client must live as long as the lock: it is moved into the
        // task that watches its connection.
        let holder = tokio::spawn(async move {
            let _client = client;
            let why = match connection.await {
                Ok(Some(e)) => e,
                Ok(None) => "the connection closed".to_owned(),
                Err(e) => e.to_string(),
            };
            let _ = lost_tx.send(Some(format!(
                "lost the database connection that holds this replica's name: {why}"
            )));
        });
        let manager = Manager::from_config(
            config,
            connector,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.max_connections.max(2))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Backend {
                backend: "postgres",
                detail: format!("connection pool: {e}"),
            })?;
        Ok(Self {
            pool,
            spool: options.spool_dir,
            name_lost,
            changes,
            _name_holder: holder,
        })
    }
}

/// Removes what a previous run left in the spool directory.
fn clear_spool(dir: &Path) -> Result<(), StoreError> {
    let entries = std::fs::read_dir(dir).map_err(|e| io_err("read", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_err("read", dir, e))?;
        let path = entry.path();
        if path.extension().is_some_and(|x| x == "spool") {
            std::fs::remove_file(&path).map_err(|e| io_err("remove", &path, e))?;
        }
    }
    Ok(())
}

/// Runs a body in one transaction on a pooled connection: `tx` is the
/// transaction, `audits` the entries to append at its end (last, under the
/// audit head's lock); commits if the body's value is `Ok`, else rolls
/// back (the transaction is dropped).
macro_rules! in_tx {
    ($pool:expr, |$tx:ident, $audits:ident| $body:expr) => {{
        let mut client = $pool.get().await.map_err(pool_error)?;
        let transaction = client.transaction().await.map_err(pg_error)?;
        let mut collected = Audits::new();
        let out: Result<_, StoreError> = {
            let $tx = &transaction;
            let $audits = &mut collected;
            let _ = &$audits;
            $body
        };
        let out = out?;
        append_audits(&transaction, collected).await?;
        crash_point!("store::before-commit");
        transaction.commit().await.map_err(pg_error)?;
        crash_point!("store::after-commit");
        Ok(out)
    }};
}

impl Store for PgStore {
    fn spool(&self) -> Result<SpoolFile, StoreError> {
        let mut name = [0u8; 16];
        getrandom::fill(&mut name).map_err(|e| {
            io_err(
                "random name in",
                &self.spool,
                std::io::Error::other(e.to_string()),
            )
        })?;
        let path = self.spool.join(format!("{}.spool", hex::encode(name)));
        let file = create_private(&path)?;
        Ok(SpoolFile::new(path, file))
    }

    fn accept(&self, envelope: NewEnvelope) -> StoreFuture<'_, Accepted> {
        let pool = self.pool.clone();
        Box::pin(async move {
            check_envelope(&envelope)?;
            // The transaction runs to its end in a task of its own even if
            // the caller goes away: the envelope is then stored or not.
            let store = TxRunner { pool };
            tokio::spawn(async move { store.accept(envelope).await })
                .await
                .map_err(|_| StoreError::Closed)?
        })
    }

    fn message(&self, key: MessageKey) -> StoreFuture<'_, Option<MessageRecord>> {
        Box::pin(async move { in_tx!(self.pool, |tx, audits| load_message(tx, &key).await) })
    }

    fn find(&self, sender: PartyUri, id: MessageId) -> StoreFuture<'_, Option<MessageRecord>> {
        Box::pin(
            async move { in_tx!(self.pool, |tx, audits| find_message(tx, &sender, &id).await) },
        )
    }

    fn messages_by_id(&self, id: MessageId) -> StoreFuture<'_, Vec<MessageRecord>> {
        Box::pin(async move {
            in_tx!(self.pool, |tx, audits| {
                query_map(
                    tx,
                    &format!(
                        "SELECT {MESSAGE_COLUMNS} FROM messages WHERE wire_id = $1 \
                     ORDER BY received_ms, id"
                    ),
                    &[&id.as_bytes().as_slice()],
                    message_from_row,
                )
                .await
            })
        })
    }

    fn send_key(&self, client: String, key: String) -> StoreFuture<'_, Option<SendKeyRecord>> {
        Box::pin(async move {
            in_tx!(self.pool, |tx, audits| {
                let rows = query_map(
                    tx,
                    "SELECT m.wire_id, k.request_sha256, m.ciphertext_len FROM send_keys k \
                 JOIN messages m ON m.id = k.message_id WHERE k.client = $1 AND k.key = $2",
                    &[&client, &key],
                    |r| {
                        Ok(SendKeyRecord {
                            message_id: message_id(col::<&[u8]>(r, 0)?)?,
                            request_sha256: digest(
                                col::<&[u8]>(r, 1)?,
                                "send_keys.request_sha256",
                            )?,
                            ciphertext_len: to_u64(col(r, 2)?, "ciphertext_len")?,
                        })
                    },
                )
                .await?;
                Ok(rows.into_iter().next())
            })
        })
    }

    fn ciphertext(&self, key: MessageKey) -> StoreFuture<'_, StoredCiphertext> {
        let pool = self.pool.clone();
        Box::pin(async move {
            in_tx!(self.pool, |tx, audits| {
                let rows = query_map(
                    tx,
                    "SELECT ciphertext, chunked, ciphertext_len FROM messages WHERE id = $1",
                    &[&key.as_bytes().as_slice()],
                    |r| {
                        Ok((
                            col::<Option<Vec<u8>>>(r, 0)?,
                            col::<bool>(r, 1)?,
                            col::<i64>(r, 2)?,
                        ))
                    },
                )
                .await?;
                match rows.into_iter().next() {
                    None => Err(StoreError::NotFound(format!("message {key}"))),
                    Some((Some(bytes), false, _)) => Ok(StoredCiphertext::Inline(bytes)),
                    Some((None, true, len)) => {
                        Ok(StoredCiphertext::Source(Arc::new(blobs::Chunks {
                            pool,
                            key,
                            len: to_u64(len, "ciphertext_len")?,
                            runtime: tokio::runtime::Handle::current(),
                        })))
                    }
                    Some(_) => Err(StoreError::Corrupt(format!(
                        "message {key}: not exactly one of inline and chunked ciphertext"
                    ))),
                }
            })
        })
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
            let lease = to_i64(lease_until_ms.saturating_sub(now_ms), "lease")?;
            if limit == 0 || per_target == 0 {
                return Ok(Vec::new());
            }
            async move { in_tx!(self.pool, |tx, audits| {
                let busy: HashMap<String, usize> = busy
                    .into_iter()
                    .map(|(t, n)| (t.as_str().to_owned(), n))
                    .collect();
                // Each next hop's due items, oldest first, from the
                // (target, next_attempt_ms, id) index; rows another replica
                // is claiming right now are skipped, not waited for.
                let mut queues = Vec::new();
                let mut after = String::new();
                loop {
                    let next = query_map(
                        tx,
                        "SELECT target FROM deliveries WHERE state = 'pending' AND target > $1 \
                         ORDER BY target LIMIT 1",
                        &[&after],
                        |r| col::<String>(r, 0),
                    )
                    .await?;
                    let Some(target) = next.into_iter().next() else {
                        break;
                    };
                    let running = busy.get(target.as_str()).copied().unwrap_or(0);
                    let room = per_target.saturating_sub(running).min(limit);
                    if room > 0 {
                        let room = i64::try_from(room).unwrap_or(i64::MAX);
                        let queue = query_map(
                            tx,
                            &format!(
                                "SELECT {DELIVERY_COLUMNS} FROM deliveries d \
                                 WHERE d.state = 'pending' AND d.target = $1 \
                                   AND d.next_attempt_ms <= $2 \
                                   AND (d.claim_until_ms IS NULL OR d.claim_until_ms < {DB_NOW_MS}) \
                                 ORDER BY d.next_attempt_ms, d.id LIMIT $3 \
                                 FOR UPDATE SKIP LOCKED"
                            ),
                            &[&target, &now, &room],
                            delivery_from_row,
                        )
                        .await?;
                        if !queue.is_empty() {
                            queues.push(queue.into_iter());
                        }
                    }
                    after = target;
                }
                // Targets take turns (oldest first within each turn).
                let mut due = crate::store::values::take_turns(queues, limit);
                let claim = tx
                    .prepare_cached(&format!(
                        "UPDATE deliveries SET claimed_by = $1, \
                         claim_until_ms = {DB_NOW_MS} + $2, claim = claim + 1 \
                         WHERE id = $3 RETURNING claim"
                    ))
                    .await
                    .map_err(pg_error)?;
                for d in &mut due {
                    let row = tx
                        .query_one(&claim, &[&owner, &lease, &d.id])
                        .await
                        .map_err(pg_error)?;
                    d.claim = to_u64(col(&row, 0)?, "delivery claim")?;
                }
                Ok(due)
            }) }
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
            // The lease's length by the caller's clock, its end by the database's.
            let now = crate::clock::unix_ms(std::time::SystemTime::now());
            let lease = to_i64(lease_until_ms.saturating_sub(now), "lease")?;
            let claims = claims
                .into_iter()
                .map(|(id, token)| Ok((id, to_i64(token, "claim")?)))
                .collect::<Result<Vec<_>, StoreError>>()?;
            async move {
                in_tx!(self.pool, |tx, audits| {
                    let renew = tx
                        .prepare_cached(&format!(
                            "UPDATE deliveries SET claim_until_ms = {DB_NOW_MS} + $3 \
                         WHERE id = $2 AND claimed_by = $1 AND claim = $4 AND state = 'pending'"
                        ))
                        .await
                        .map_err(pg_error)?;
                    let mut n = 0u64;
                    for (id, token) in claims {
                        n += tx
                            .execute(&renew, &[&owner, &id, &lease, &token])
                            .await
                            .map_err(pg_error)?;
                    }
                    Ok(n)
                })
            }
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
            in_tx!(self.pool, |tx, audits| {
                let mut n = 0;
                for (id, token) in &claims {
                    n += tx
                        .execute(
                            "UPDATE deliveries SET claimed_by = NULL, claim_until_ms = NULL \
                             WHERE id = $1 AND claimed_by = $2 AND claim = $3 \
                             AND state = 'pending'",
                            &[id, &owner, token],
                        )
                        .await
                        .map_err(pg_error)?;
                }
                Ok(n)
            })
        })
    }

    fn release_claims(&self, owner: &str) -> StoreFuture<'_, u64> {
        let owner = owner.to_owned();
        Box::pin(async move {
            in_tx!(self.pool, |tx, audits| {
                tx.execute(
                    "UPDATE deliveries SET claimed_by = NULL, claim_until_ms = NULL \
                 WHERE claimed_by = $1",
                    &[&owner],
                )
                .await
                .map_err(pg_error)
            })
        })
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
            if let AttemptOutcome::Retry {
                next_attempt_ms, ..
            } = &outcome
            {
                to_i64(*next_attempt_ms, "next_attempt_ms")?;
            }
            async move {
                in_tx!(self.pool, |tx, audits| {
                    let message = query_map(
                        tx,
                        "SELECT message_id FROM deliveries WHERE id = $1",
                        &[&delivery],
                        |r| message_key(col::<&[u8]>(r, 0)?),
                    )
                    .await?;
                    let Some(message) = message.into_iter().next() else {
                        return Err(StoreError::NotFound(format!("delivery {delivery}")));
                    };
                    // Only a pending delivery under this claim changes.
                    match &outcome {
                        AttemptOutcome::Done => {
                            tx.execute(
                                "UPDATE deliveries SET state = 'done', attempts = attempts + 1, \
                             claimed_by = NULL, claim_until_ms = NULL \
                             WHERE id = $1 AND state = 'pending'",
                                &[&delivery],
                            )
                            .await
                        }
                        AttemptOutcome::Retry {
                            error,
                            next_attempt_ms,
                        } => {
                            let next = to_i64(*next_attempt_ms, "next_attempt_ms")?;
                            tx.execute(
                                "UPDATE deliveries SET attempts = attempts + 1, last_error = $3, \
                             next_attempt_ms = $4, claimed_by = NULL, claim_until_ms = NULL \
                             WHERE id = $1 AND state = 'pending' AND claim = $2",
                                &[&delivery, &claim, error, &next],
                            )
                            .await
                        }
                        AttemptOutcome::Failed(reason) => {
                            tx.execute(
                                "UPDATE deliveries SET state = 'failed', failure = $3, \
                             attempts = attempts + 1, claimed_by = NULL, claim_until_ms = NULL \
                             WHERE id = $1 AND state = 'pending' AND claim = $2",
                                &[&delivery, &claim, reason],
                            )
                            .await
                        }
                    }
                    .map_err(pg_error)?;
                    finish_rest(tx, audits, message, receipts, audit).await
                })
            }
            .await
        })
    }

    fn add_receipts(&self, key: MessageKey, receipts: Vec<NewReceipt>) -> StoreFuture<'_, usize> {
        Box::pin(async move {
            let receipts = receipts
                .into_iter()
                .map(ReceiptRow::new)
                .collect::<Result<Vec<_>, _>>()?;
            async move {
                in_tx!(self.pool, |tx, audits| {
                    if load_kind_acked(tx, &key, false).await?.is_none() {
                        return Err(StoreError::NotFound(format!("message {key}")));
                    }
                    insert_receipts(tx, &key, receipts, audits).await
                })
            }
            .await
        })
    }

    fn receipts(&self, key: MessageKey) -> StoreFuture<'_, Vec<ReceiptRecord>> {
        Box::pin(async move {
            in_tx!(self.pool, |tx, audits| {
                query_map(
                    tx,
                    "SELECT signed, issuer, disposition, issued_ms, verified_ms FROM receipts \
                 WHERE message_id = $1 ORDER BY seq",
                    &[&key.as_bytes().as_slice()],
                    |r| {
                        Ok(ReceiptRecord {
                            signed: col(r, 0)?,
                            issuer: party(col(r, 1)?, "receipt issuer")?,
                            disposition: col(r, 2)?,
                            issued_ms: to_u64(col(r, 3)?, "issued_ms")?,
                            verified_ms: col::<Option<i64>>(r, 4)?
                                .map(|v| to_u64(v, "verified_ms"))
                                .transpose()?,
                        })
                    },
                )
                .await
            })
        })
    }

    fn deliveries(&self, key: MessageKey) -> StoreFuture<'_, Vec<DeliveryRecord>> {
        Box::pin(async move {
            in_tx!(self.pool, |tx, audits| {
                query_map(
                    tx,
                    &format!(
                        "SELECT {DELIVERY_COLUMNS} FROM deliveries d WHERE d.message_id = $1 \
                     ORDER BY d.id"
                    ),
                    &[&key.as_bytes().as_slice()],
                    delivery_from_row,
                )
                .await
            })
        })
    }

    fn inbox(&self, include_acked: bool) -> StoreFuture<'_, Vec<MessageRecord>> {
        Box::pin(async move {
            in_tx!(self.pool, |tx, audits| {
                query_map(
                    tx,
                    &format!(
                        "SELECT {MESSAGE_COLUMNS} FROM messages WHERE kind = 'inbound' \
                     AND ($1 OR acked_ms IS NULL) ORDER BY received_ms, id"
                    ),
                    &[&include_acked],
                    message_from_row,
                )
                .await
            })
        })
    }

    fn inbox_page(
        &self,
        include_acked: bool,
        after: Option<(u64, MessageKey)>,
        limit: usize,
    ) -> StoreFuture<'_, Vec<MessageRecord>> {
        Box::pin(async move {
            let (after_ms, after_id) = match after {
                Some((ms, id)) => (to_i64(ms, "page position")?, id.as_bytes().to_vec()),
                None => (-1, Vec::new()),
            };
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            async move {
                in_tx!(self.pool, |tx, audits| {
                    query_map(
                        tx,
                        &format!(
                            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE kind = 'inbound' \
                         AND ($1 OR acked_ms IS NULL) AND (received_ms, id) > ($2, $3) \
                         ORDER BY received_ms, id LIMIT $4"
                        ),
                        &[&include_acked, &after_ms, &after_id, &limit],
                        message_from_row,
                    )
                    .await
                })
            }
            .await
        })
    }

    fn failure(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send + '_>> {
        super::values::failure_of(self.name_lost.clone())
    }

    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<StoreChange>> {
        Some(self.changes.subscribe())
    }

    fn acknowledge(
        &self,
        key: MessageKey,
        now_ms: u64,
        receipt: NewReceipt,
    ) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let now = to_i64(now_ms, "now_ms")?;
            let receipt = ReceiptRow::new(receipt)?;
            async move {
                in_tx!(self.pool, |tx, audits| {
                    match load_kind_acked(tx, &key, true).await? {
                        Some((MessageKind::Inbound, None)) => {
                            tx.execute(
                            "UPDATE messages SET acked_ms = $2 WHERE id = $1 AND acked_ms IS NULL",
                            &[&key.as_bytes().as_slice(), &now],
                        )
                        .await
                        .map_err(pg_error)?;
                            insert_receipts(tx, &key, vec![receipt], audits).await?;
                            Ok(true)
                        }
                        Some((MessageKind::Inbound, Some(_))) => Ok(false),
                        _ => Err(StoreError::NotFound(format!("inbound message {key}"))),
                    }
                })
            }
            .await
        })
    }

    fn mark_fetched(&self, key: MessageKey, now_ms: u64) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let now = to_i64(now_ms, "now_ms")?;
            async move {
                in_tx!(self.pool, |tx, audits| {
                    let n = tx
                    .execute(
                        "UPDATE messages SET fetched_ms = $2 WHERE id = $1 AND kind = 'inbound'",
                        &[&key.as_bytes().as_slice(), &now],
                    )
                    .await
                    .map_err(pg_error)?;
                    if n == 0 {
                        return Err(StoreError::NotFound(format!("inbound message {key}")));
                    }
                    Ok(())
                })
            }
            .await
        })
    }

    fn bind_pseudonym_key(&self, check: [u8; 32]) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            in_tx!(self.pool, |tx, audits| {
                tx.execute(
                    "INSERT INTO facility (id, pseudonym_key_check) VALUES (1, $1) \
                     ON CONFLICT DO NOTHING",
                    &[&check.as_slice()],
                )
                .await
                .map_err(pg_error)?;
                let kept = query_map(
                    tx,
                    "SELECT pseudonym_key_check FROM facility WHERE id = 1",
                    &[],
                    |r| col::<Vec<u8>>(r, 0),
                )
                .await?;
                if kept.first().map(Vec::as_slice) == Some(check.as_slice()) {
                    Ok(())
                } else {
                    Err(StoreError::PseudonymKeyMismatch)
                }
            })
        })
    }

    fn pending_count(&self) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            in_tx!(self.pool, |tx, audits| {
                let n = query_map(
                    tx,
                    "SELECT count(*) FROM deliveries WHERE state = 'pending'",
                    &[],
                    |r| col::<i64>(r, 0),
                )
                .await?;
                to_u64(n.into_iter().next().unwrap_or(0), "pending count")
            })
        })
    }

    fn append_audit(
        &self,
        about: Option<MessageKey>,
        entries: Vec<AuditEntry>,
    ) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            in_tx!(self.pool, |_tx, audits| {
                audits.extend(entries.into_iter().map(|e| (e, about)));
                Ok(())
            })
        })
    }

    fn audit_tail(&self) -> StoreFuture<'_, AuditTail> {
        Box::pin(async move {
            let mut client = self.pool.get().await.map_err(pool_error)?;
            // One snapshot: the checkpoint and the leaves after it agree.
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(pg_error)?;
            let checkpoint = query_map(
                &tx,
                "SELECT tree_size, frontier, signed FROM audit_checkpoints \
                 ORDER BY tree_size DESC LIMIT 1",
                &[],
                |r| {
                    Ok((
                        to_u64(col(r, 0)?, "tree_size")?,
                        col::<Vec<u8>>(r, 1)?,
                        col::<Vec<u8>>(r, 2)?,
                    ))
                },
            )
            .await?
            .into_iter()
            .next();
            let from = to_i64(checkpoint.as_ref().map_or(0, |c| c.0), "tree_size")?;
            let entries = query_map(
                &tx,
                "SELECT seq, entry, leaf_hash FROM audit_log WHERE seq >= $1 ORDER BY seq",
                &[&from],
                |r| {
                    Ok((
                        to_u64(col(r, 0)?, "audit seq")?,
                        col::<Vec<u8>>(r, 1)?,
                        digest(col::<&[u8]>(r, 2)?, "audit leaf hash")?,
                    ))
                },
            )
            .await?;
            tx.commit().await.map_err(pg_error)?;
            Ok(AuditTail {
                checkpoint,
                entries,
            })
        })
    }

    fn audit_entries(&self, from: u64, limit: usize) -> StoreFuture<'_, Vec<(u64, Vec<u8>)>> {
        Box::pin(async move {
            let from = to_i64(from, "audit seq")?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            in_tx!(self.pool, |tx, audits| {
                query_map(
                    tx,
                    "SELECT seq, entry FROM audit_log WHERE seq >= $1 ORDER BY seq LIMIT $2",
                    &[&from, &limit],
                    |r| Ok((to_u64(col(r, 0)?, "audit seq")?, col::<Vec<u8>>(r, 1)?)),
                )
                .await
            })
        })
    }

    fn add_checkpoint(&self, checkpoint: NewCheckpoint) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let size = to_i64(checkpoint.tree_size, "tree_size")?;
            let time = to_i64(checkpoint.time_ms, "checkpoint time_ms")?;
            async move {
                in_tx!(self.pool, |tx, audits| {
                    // The audit head's lock orders this after every append that
                    // committed before it (and keeps two replicas' checkpoints
                    // of one size from racing).
                    let head = query_map(
                    tx,
                    "SELECT next_seq, COALESCE((SELECT MAX(tree_size) FROM audit_checkpoints), 0) \
                     FROM audit_head WHERE id = 1 FOR UPDATE",
                    &[],
                    |r| Ok((col::<i64>(r, 0)?, col::<i64>(r, 1)?)),
                )
                .await?;
                    let Some(&(leaves, latest)) = head.first() else {
                        return Err(StoreError::Corrupt("the audit head row is missing".into()));
                    };
                    if size <= latest {
                        return Ok(false);
                    }
                    if size > leaves {
                        return Err(StoreError::Invalid(format!(
                            "checkpoint of {size} entries but the log holds {leaves}"
                        )));
                    }
                    tx.execute(
                    "INSERT INTO audit_checkpoints (tree_size, time_ms, root, frontier, signed) \
                     VALUES ($1, $2, $3, $4, $5)",
                    &[
                        &size,
                        &time,
                        &checkpoint.root.as_slice(),
                        &checkpoint.frontier,
                        &checkpoint.signed,
                    ],
                )
                .await
                .map_err(pg_error)?;
                    Ok(true)
                })
            }
            .await
        })
    }

    fn provisions(&self, subject: Pseudonym) -> StoreFuture<'_, Vec<ProvisionRecord>> {
        Box::pin(async move { in_tx!(self.pool, |tx, audits| provisions_for(tx, &subject).await) })
    }

    fn purge(
        &self,
        policy: PurgePolicy,
        audit: AuditEntry,
        suspended: AuditEntry,
    ) -> StoreFuture<'_, PurgeSummary> {
        Box::pin(async move {
            in_tx!(self.pool, |tx, audits| {
                purge::purge(tx, policy, audit, suspended, audits).await
            })
        })
    }
}

/// The end of [`Store::finish_attempt`]: the receipts and audit entries.
async fn finish_rest(
    tx: &Conn<'_>,
    audits: &mut Audits,
    message: MessageKey,
    receipts: Vec<ReceiptRow>,
    audit: Vec<AuditEntry>,
) -> Result<(), StoreError> {
    insert_receipts(tx, &message, receipts, audits).await?;
    audits.extend(audit.into_iter().map(|e| (e, Some(message))));
    Ok(())
}

/// Provision records naming `subject`, oldest first.
async fn provisions_for(
    tx: &Conn<'_>,
    subject: &Pseudonym,
) -> Result<Vec<ProvisionRecord>, StoreError> {
    query_map(
        tx,
        PROVISIONS_OF_SUBJECT,
        &[&subject.as_bytes().as_slice()],
        provision_from_row,
    )
    .await
}

/// The pool, for the accept task (which outlives its caller).
struct TxRunner {
    pool: Pool,
}

impl TxRunner {
    async fn accept(self, envelope: NewEnvelope) -> Result<Accepted, StoreError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let (inline, spooled) = match &envelope.ciphertext {
            Ciphertext::Inline(bytes) => {
                if u64::try_from(bytes.len()).ok() != Some(envelope.ciphertext_len) {
                    return Err(StoreError::Invalid(format!(
                        "ciphertext is {} bytes, envelope declares {}",
                        bytes.len(),
                        envelope.ciphertext_len
                    )));
                }
                (Some(bytes.as_slice()), None)
            }
            Ciphertext::Spooled(s) => (None, Some(s)),
        };
        let key = match insert_message_row(&tx, &envelope, inline).await? {
            Ok(key) => key,
            // Stored (or purged) already: nothing changes.
            Err(known) => {
                tx.rollback().await.map_err(pg_error)?;
                return Ok(known);
            }
        };
        if let Some(spool) = spooled {
            blobs::write_chunks(&tx, &key, spool, envelope.ciphertext_len).await?;
            crash_point!("store::chunks-written");
        }
        let mut audits = Audits::new();
        insert_message_rest(&tx, &key, envelope, &mut audits).await?;
        append_audits(&tx, audits).await?;
        crash_point!("store::before-commit");
        tx.commit().await.map_err(pg_error)?;
        crash_point!("store::after-commit");
        Ok(Accepted::Stored)
    }
}
