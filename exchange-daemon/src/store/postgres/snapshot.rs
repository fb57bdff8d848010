//! The read-only view of a PostgreSQL store that the offline tools use
//! ([`ReadOnlyStore`]): one connection, reading in one `REPEATABLE READ
//! READ ONLY` transaction until [`ReadOnlyStore::end_snapshot`] (the
//! snapshot is taken at the first read after the open), then each
//! statement on its own. It takes no replica name and no lock: running
//! replicas never wait for it.
//!
//! The trait is synchronous and its callers may be inside a tokio runtime
//! (the daemon, tests, an async CLI). So the connection lives on a thread
//! of its own with its own current-thread runtime, and each call sends it
//! a statement over a channel and blocks until the rows come back; nothing
//! here enters the caller's runtime.
//!
//! Walks over many rows read pages of [`PAGE`] rows by key, so their
//! memory stays bounded; a chunked ciphertext is read a chunk at a time.
//!
//! A PostgreSQL store has no blob files: its large ciphertexts are chunks
//! in `blob_chunks` ([`ReadOnlyStore::ciphertext_chunks`]). So
//! [`ReadOnlyStore::named_blobs`] and [`ReadOnlyStore::blob_files`] are
//! empty, [`ReadOnlyStore::is_blob_named`] is false and
//! [`ReadOnlyStore::blob_path`] is an empty path, and every
//! [`RawMessage::blob`] is `None`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc;

use exchange_core::audit::Pseudonym;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};

use super::pg_error;
use super::rows::{PROVISIONS_OF_SUBJECT, col, provision_from_row, to_u64};
use super::schema::supported_schema_version;
use super::tls::{self, PgTls};
use crate::error::StoreError;
use crate::store::{
    CiphertextChunk, NamedBlob, ProvisionRecord, RawAuditEntry, RawCheckpoint, RawMessage,
    RawProvision, RawReceipt, ReadOnlyStore, RowCounts, Rows, SchemaNeed, paged,
};

/// Rows one page of a walk reads.
pub const PAGE: i64 = 512;

/// How long a connection may take unless the URL says (`connect_timeout`).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A statement parameter, moved to the connection's thread.
type Param = Box<dyn ToSql + Send + Sync>;

/// What the connection's thread is asked to do.
enum Request {
    /// Run a query, answer with its rows.
    Query {
        sql: String,
        params: Vec<Param>,
        reply: mpsc::SyncSender<Result<Vec<Row>, StoreError>>,
    },
    /// Run statements without results (`BEGIN`, `COMMIT`).
    Batch {
        sql: String,
        reply: mpsc::SyncSender<Result<(), StoreError>>,
    },
}

/// The connection's thread: it owns the runtime, the connection and the
/// prepared statements; it ends when the [`PgSnapshot`] is dropped (its
/// sender with it), closing the connection (which rolls back an open
/// transaction).
fn serve(
    runtime: &tokio::runtime::Runtime,
    client: Client,
    mut requests: tokio::sync::mpsc::UnboundedReceiver<Request>,
) {
    let mut statements: HashMap<String, Statement> = HashMap::new();
    runtime.block_on(async move {
        while let Some(request) = requests.recv().await {
            match request {
                Request::Query { sql, params, reply } => {
                    let result = async {
                        let stmt = match statements.get(&sql) {
                            Some(s) => s.clone(),
                            None => {
                                let s = client.prepare(&sql).await.map_err(pg_error)?;
                                statements.insert(sql.clone(), s.clone());
                                s
                            }
                        };
                        let refs: Vec<&(dyn ToSql + Sync)> = params
                            .iter()
                            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                            .collect();
                        client.query(&stmt, &refs).await.map_err(pg_error)
                    }
                    .await;
                    let _ = reply.send(result);
                }
                Request::Batch { sql, reply } => {
                    let _ = reply.send(client.batch_execute(&sql).await.map_err(pg_error));
                }
            }
        }
    });
}

/// A read-only snapshot of a PostgreSQL store (see the module
/// documentation).
pub struct PgSnapshot {
    requests: tokio::sync::mpsc::UnboundedSender<Request>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Whether the read transaction is still open.
    in_snapshot: bool,
    /// The schema version found at the open.
    version: u32,
}

impl std::fmt::Debug for PgSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSnapshot")
            .field("in_snapshot", &self.in_snapshot)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Drop for PgSnapshot {
    fn drop(&mut self) {
        // Closing the channel ends the thread, which closes the connection.
        let (closed, _) = tokio::sync::mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.requests, closed));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The thread's failure to start, as a store error.
fn thread_error(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend {
        backend: "postgres",
        detail: format!("{what}: {e}"),
    }
}

/// The answer of a connection thread that is gone.
fn gone() -> StoreError {
    StoreError::Backend {
        backend: "postgres",
        detail: "the snapshot's connection thread has stopped".into(),
    }
}

impl PgSnapshot {
    /// Connects to the store at `url` and checks its schema version (see
    /// [`crate::store::open_read_only`]), then opens the read transaction.
    /// TLS is as the URL's libpq parameters (`sslmode`, `sslrootcert`,
    /// `sslcert`, `sslkey`) say, decided as for the daemon (see [`PgTls`]).
    pub fn open(url: &str, schema: SchemaNeed) -> Result<Self, StoreError> {
        let tls::Prepared {
            mut config,
            tls: connector,
            ..
        } = tls::prepare(url, &PgTls::default())?;
        if config.get_connect_timeout().is_none() {
            // A tool should say the server is unreachable, not hang.
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let (opened_tx, opened_rx) = mpsc::sync_channel(1);
        let (requests, requests_rx) = tokio::sync::mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("pg-snapshot".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = opened_tx.send(Err(thread_error("runtime", e)));
                        return;
                    }
                };
                let connected = runtime.block_on(config.connect(connector));
                let client = match connected {
                    Ok((client, connection)) => {
                        runtime.spawn(connection);
                        client
                    }
                    Err(e) => {
                        let _ = opened_tx.send(Err(tls::connect_error(e)));
                        return;
                    }
                };
                if opened_tx.send(Ok(())).is_ok() {
                    serve(&runtime, client, requests_rx);
                }
            })
            .map_err(|e| thread_error("cannot start the snapshot's thread", e))?;
        let mut snapshot = Self {
            requests,
            thread: Some(thread),
            in_snapshot: false,
            version: 0,
        };
        opened_rx.recv().map_err(|_| gone())??;
        snapshot.version = snapshot.check_schema(schema)?;
        snapshot.batch("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")?;
        snapshot.in_snapshot = true;
        Ok(snapshot)
    }

    /// The schema version, refused as [`SchemaNeed`] says.
    fn check_schema(&self, schema: SchemaNeed) -> Result<u32, StoreError> {
        let exists: bool = col(
            &self.query_one("SELECT to_regclass('exchange_schema') IS NOT NULL", vec![])?,
            0,
        )?;
        let version = if exists {
            let rows = self.query("SELECT version FROM exchange_schema WHERE id = 1", vec![])?;
            match rows.first() {
                Some(r) => col::<i32>(r, 0)?,
                None => 0,
            }
        } else {
            0
        };
        let version = u32::try_from(version)
            .map_err(|_| StoreError::Corrupt(format!("schema version {version}")))?;
        let supported = supported_schema_version();
        if version > supported {
            return Err(StoreError::SchemaTooNew {
                found: version,
                supported,
            });
        }
        if version == 0 {
            return Err(StoreError::NotFound(
                "no store schema in this database (a daemon creates it at its first start)".into(),
            ));
        }
        if schema == SchemaNeed::Current && version < supported {
            return Err(StoreError::Invalid(format!(
                "store schema version {version} predates this build ({supported}): start the daemon once to migrate it"
            )));
        }
        Ok(version)
    }

    fn send(&self, request: Request) -> Result<(), StoreError> {
        self.requests.send(request).map_err(|_| gone())
    }

    fn query(&self, sql: &str, params: Vec<Param>) -> Result<Vec<Row>, StoreError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.send(Request::Query {
            sql: sql.to_owned(),
            params,
            reply,
        })?;
        answer.recv().map_err(|_| gone())?
    }

    fn query_one(&self, sql: &str, params: Vec<Param>) -> Result<Row, StoreError> {
        self.query(sql, params)?
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::Corrupt(format!("no row from {sql}")))
    }

    fn batch(&self, sql: &str) -> Result<(), StoreError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.send(Request::Batch {
            sql: sql.to_owned(),
            reply,
        })?;
        answer.recv().map_err(|_| gone())?
    }

    fn count(&self, sql: &str) -> Result<u64, StoreError> {
        to_u64(col(&self.query_one(sql, vec![])?, 0)?, "count")
    }
}

fn key_param(key: &[u8]) -> Param {
    Box::new(key.to_vec())
}

impl ReadOnlyStore for PgSnapshot {
    fn schema_version(&self) -> Result<u32, StoreError> {
        Ok(self.version)
    }

    fn end_snapshot(&mut self) -> Result<(), StoreError> {
        if self.in_snapshot {
            self.batch("COMMIT")?;
            self.in_snapshot = false;
        }
        Ok(())
    }

    fn counts(&self) -> Result<RowCounts, StoreError> {
        let r = self.query_one(
            "SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM receipts), \
             (SELECT count(*) FROM deliveries), (SELECT count(*) FROM messages WHERE chunked), \
             (SELECT count(*) FROM audit_log), (SELECT count(*) FROM provisions)",
            vec![],
        )?;
        let n = |i: usize| -> Result<u64, StoreError> { to_u64(col(&r, i)?, "count") };
        Ok(RowCounts {
            schema_version: self.version,
            messages: n(0)?,
            receipts: n(1)?,
            deliveries: n(2)?,
            blobs: n(3)?,
            audit_entries: Some(n(4)?),
            provisions: Some(n(5)?),
        })
    }

    /// No blob files on PostgreSQL: an empty path (no row names one).
    fn blob_path(&self, _name: &str) -> PathBuf {
        PathBuf::new()
    }

    /// No blob files on PostgreSQL: none.
    fn named_blobs(&self) -> Result<Vec<NamedBlob>, StoreError> {
        Ok(Vec::new())
    }

    /// No blob directory on PostgreSQL: none.
    fn blob_files(&self) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }

    /// No blob files on PostgreSQL: false.
    fn is_blob_named(&self, _name: &str) -> Result<bool, StoreError> {
        Ok(false)
    }

    fn messages(&self) -> Rows<'_, RawMessage> {
        let mut after: Option<(i64, Vec<u8>)> = None;
        const COLUMNS: &str = "SELECT id, header_sha256, head, ciphertext_len, received_ms, \
                               our_receipt, wire_id FROM messages";
        paged(PAGE, move || {
            let rows = match &after {
                None => self.query(
                    &format!("{COLUMNS} ORDER BY received_ms, id LIMIT $1"),
                    vec![Box::new(PAGE)],
                )?,
                Some((received_ms, key)) => self.query(
                    &format!(
                        "{COLUMNS} WHERE (received_ms, id) > ($1, $2) \
                         ORDER BY received_ms, id LIMIT $3"
                    ),
                    vec![Box::new(*received_ms), key_param(key), Box::new(PAGE)],
                )?,
            };
            let page = rows
                .iter()
                .map(|r| {
                    Ok(RawMessage {
                        key: col(r, 0)?,
                        header_sha256: col(r, 1)?,
                        head: col(r, 2)?,
                        blob: None,
                        ciphertext_len: col(r, 3)?,
                        received_ms: col(r, 4)?,
                        our_receipt: col(r, 5)?,
                        message_id: col(r, 6)?,
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            after = page.last().map(|m| (m.received_ms, m.key.clone()));
            Ok(page)
        })
    }

    fn inline_ciphertext(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let rows = self.query(
            "SELECT ciphertext FROM messages WHERE id = $1",
            vec![key_param(key)],
        )?;
        match rows.first() {
            Some(r) => col(r, 0),
            None => Err(StoreError::NotFound(format!(
                "message {}",
                hex::encode(key)
            ))),
        }
    }

    fn ciphertext_chunks(
        &self,
        key: &[u8],
    ) -> Result<Option<Rows<'_, CiphertextChunk>>, StoreError> {
        let rows = self.query(
            "SELECT chunked FROM messages WHERE id = $1",
            vec![key_param(key)],
        )?;
        let Some(r) = rows.first() else {
            return Err(StoreError::NotFound(format!(
                "message {}",
                hex::encode(key)
            )));
        };
        if !col::<bool>(r, 0)? {
            return Ok(None);
        }
        let key = key.to_vec();
        let mut next = Some(i32::MIN);
        // One chunk a page: a chunk is up to a MiB.
        Ok(Some(paged(1, move || {
            let Some(from) = next else {
                return Ok(Vec::new());
            };
            let page = self
                .query(
                    "SELECT n, data FROM blob_chunks WHERE message_id = $1 AND n >= $2 \
                     ORDER BY n LIMIT 1",
                    vec![key_param(&key), Box::new(from)],
                )?
                .iter()
                .map(|r| {
                    Ok(CiphertextChunk {
                        n: i64::from(col::<i32>(r, 0)?),
                        data: col(r, 1)?,
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            next = page
                .last()
                .and_then(|c| i32::try_from(c.n).ok())
                .and_then(|n| n.checked_add(1));
            Ok(page)
        })))
    }

    fn receipts_of(&self, key: &[u8]) -> Result<Vec<RawReceipt>, StoreError> {
        self.query(
            "SELECT seq, digest, signed FROM receipts WHERE message_id = $1 ORDER BY seq",
            vec![key_param(key)],
        )?
        .iter()
        .map(|r| {
            Ok(RawReceipt {
                seq: col(r, 0)?,
                digest: col(r, 1)?,
                signed: col(r, 2)?,
            })
        })
        .collect()
    }

    fn orphan_receipts(&self) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
        self.query(
            "SELECT r.seq, r.message_id FROM receipts r \
             WHERE NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = r.message_id) \
             ORDER BY r.seq",
            vec![],
        )?
        .iter()
        .map(|r| Ok((col(r, 0)?, col(r, 1)?)))
        .collect()
    }

    fn message_head(&self, key: &[u8]) -> Result<Option<(Vec<u8>, i64)>, StoreError> {
        self.query(
            "SELECT head, received_ms FROM messages WHERE id = $1",
            vec![key_param(key)],
        )?
        .first()
        .map(|r| Ok((col(r, 0)?, col(r, 1)?)))
        .transpose()
    }

    fn provision_evidence(&self) -> Result<Option<Rows<'_, RawProvision>>, StoreError> {
        let mut next = Some(i64::MIN);
        Ok(Some(paged(PAGE, move || {
            let Some(from) = next else {
                return Ok(Vec::new());
            };
            let page = self
                .query(
                    "SELECT id, message_id, receipt, wire_id FROM provisions \
                     WHERE id >= $1 ORDER BY id LIMIT $2",
                    vec![Box::new(from), Box::new(PAGE)],
                )?
                .iter()
                .map(|r| {
                    Ok(RawProvision {
                        id: col(r, 0)?,
                        message_key: col(r, 1)?,
                        receipt: col(r, 2)?,
                        message_id: col(r, 3)?,
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            next = page.last().and_then(|p| p.id.checked_add(1));
            Ok(page)
        })))
    }

    fn provisions_for(&self, subject: &Pseudonym) -> Result<Vec<ProvisionRecord>, StoreError> {
        self.query(PROVISIONS_OF_SUBJECT, vec![key_param(subject.as_bytes())])?
            .iter()
            .map(provision_from_row)
            .collect()
    }

    fn audit_len(&self) -> Result<Option<u64>, StoreError> {
        Ok(Some(self.count("SELECT count(*) FROM audit_log")?))
    }

    fn audit_entries(&self, from: Option<u64>, to: Option<u64>) -> Rows<'_, RawAuditEntry> {
        let to = to.map(saturating_i64);
        let mut next = Some(from.map_or(i64::MIN, saturating_i64));
        paged(PAGE, move || {
            let Some(from) = next else {
                return Ok(Vec::new());
            };
            let rows = match to {
                Some(to) => self.query(
                    "SELECT seq, entry, leaf_hash FROM audit_log \
                     WHERE seq >= $1 AND seq < $2 ORDER BY seq LIMIT $3",
                    vec![Box::new(from), Box::new(to), Box::new(PAGE)],
                )?,
                None => self.query(
                    "SELECT seq, entry, leaf_hash FROM audit_log \
                     WHERE seq >= $1 ORDER BY seq LIMIT $2",
                    vec![Box::new(from), Box::new(PAGE)],
                )?,
            };
            let page = rows
                .iter()
                .map(|r| {
                    Ok(RawAuditEntry {
                        seq: col(r, 0)?,
                        entry: col(r, 1)?,
                        leaf_hash: col(r, 2)?,
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            next = page.last().and_then(|e| e.seq.checked_add(1));
            Ok(page)
        })
    }

    fn audit_leaf_hashes(&self, to: u64) -> Rows<'_, [u8; 32]> {
        let to = saturating_i64(to);
        let mut next = Some(i64::MIN);
        let rows = paged(PAGE, move || {
            let Some(from) = next else {
                return Ok(Vec::new());
            };
            let page = self
                .query(
                    "SELECT seq, leaf_hash FROM audit_log \
                     WHERE seq >= $1 AND seq < $2 ORDER BY seq LIMIT $3",
                    vec![Box::new(from), Box::new(to), Box::new(PAGE)],
                )?
                .iter()
                .map(|r| Ok((col::<i64>(r, 0)?, col::<Vec<u8>>(r, 1)?)))
                .collect::<Result<Vec<_>, StoreError>>()?;
            next = page.last().and_then(|(seq, _)| seq.checked_add(1));
            Ok(page)
        });
        Box::new(rows.map(|row| {
            let (_, hash) = row?;
            <[u8; 32]>::try_from(hash.as_slice())
                .map_err(|_| StoreError::Corrupt("audit leaf hash length".into()))
        }))
    }

    fn audit_entry(&self, seq: u64) -> Result<Vec<u8>, StoreError> {
        let rows = self.query(
            "SELECT entry FROM audit_log WHERE seq = $1",
            vec![Box::new(saturating_i64(seq))],
        )?;
        match rows.first() {
            Some(r) => col(r, 0),
            None => Err(StoreError::NotFound(format!("audit entry {seq}"))),
        }
    }

    fn audit_seq_from_time(&self, time_ms: u64, to: u64) -> Result<u64, StoreError> {
        let seq: i64 = col(
            &self.query_one(
                "SELECT COALESCE(MIN(seq), $2) FROM audit_log WHERE time_ms >= $1 AND seq < $2",
                vec![
                    Box::new(saturating_i64(time_ms)),
                    Box::new(saturating_i64(to)),
                ],
            )?,
            0,
        )?;
        Ok(u64::try_from(seq).unwrap_or(0))
    }

    fn latest_checkpoint(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.query(
            "SELECT signed FROM audit_checkpoints ORDER BY tree_size DESC LIMIT 1",
            vec![],
        )?
        .first()
        .map(|r| col(r, 0))
        .transpose()
    }

    fn checkpoints_dated(
        &self,
        below: u64,
        from_ms: Option<u64>,
        to_ms: Option<u64>,
        newest: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        self.query(
            "SELECT signed FROM (SELECT tree_size, signed FROM audit_checkpoints \
             WHERE tree_size < $1 AND time_ms >= $2 AND time_ms < $3 \
             ORDER BY tree_size DESC LIMIT $4) newest ORDER BY tree_size",
            vec![
                Box::new(saturating_i64(below)),
                Box::new(from_ms.map_or(0, saturating_i64)),
                Box::new(to_ms.map_or(i64::MAX, saturating_i64)),
                Box::new(i64::try_from(newest).unwrap_or(i64::MAX)),
            ],
        )?
        .iter()
        .map(|r| col(r, 0))
        .collect()
    }

    fn checkpoints(&self) -> Result<Vec<RawCheckpoint>, StoreError> {
        self.query(
            "SELECT tree_size, root, signed, frontier FROM audit_checkpoints ORDER BY tree_size",
            vec![],
        )?
        .iter()
        .map(|r| {
            Ok(RawCheckpoint {
                tree_size: col(r, 0)?,
                root: col(r, 1)?,
                signed: col(r, 2)?,
                frontier: col(r, 3)?,
            })
        })
        .collect()
    }
}

/// A `u64` bound as a `bigint` (at most `i64::MAX`).
fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `url` with its password (if any) replaced by `***`, for messages: the
/// URL form (`postgres://user:secret@host/db`) and the key=value form
/// (`password=secret`).
pub fn redacted_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (authority, tail) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let authority = match authority.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***@{host}"),
                None => authority.to_owned(),
            },
            None => authority.to_owned(),
        };
        let tail = tail
            .split_inclusive(['?', '&'])
            .map(|part| {
                if part.starts_with("password=") {
                    let end = if part.ends_with('&') { "&" } else { "" };
                    format!("password=***{end}")
                } else {
                    part.to_owned()
                }
            })
            .collect::<String>();
        return format!("{scheme}://{authority}{tail}");
    }
    url.split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::redacted_url;

    #[test]
    fn a_url_is_shown_without_its_password() {
        assert_eq!(
            redacted_url("postgres://app:s3cret@db:5432/exchange?sslmode=disable&password=x"),
            "postgres://app:***@db:5432/exchange?sslmode=disable&password=***"
        );
        assert_eq!(
            redacted_url("postgres://app@db/exchange"),
            "postgres://app@db/exchange"
        );
        assert_eq!(
            redacted_url("host=db user=app password=s3cret dbname=exchange"),
            "host=db user=app password=*** dbname=exchange"
        );
    }
}
