//! The read-only view of a store directory that the offline tools use
//! ([`ReadOnlyStore`]): a read-only connection, without the store lock
//! (a WAL reader never blocks the daemon's writer), reading in one
//! transaction until [`ReadOnlyStore::end_snapshot`]. Walks over many rows
//! read pages of [`PAGE`] rows by key, so their memory stays bounded.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use exchange_core::MessageId;
use exchange_core::audit::Pseudonym;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};

use super::{BLOBS_DIR, DB_FILE, MIGRATIONS, configure, io_err, provisions_for, valid_blob_name};
use crate::error::StoreError;
use crate::store::{
    NamedBlob, ProvisionRecord, RawAuditEntry, RawCheckpoint, RawMessage, RawProvision, RawReceipt,
    ReadOnlyStore, RowCounts, Rows, SchemaNeed, paged,
};

/// Rows one page of a walk reads.
pub(super) const PAGE: i64 = 512;

/// Opens the database of the store in `dir` read-only, without taking the
/// store lock: for offline tools (audit export, provision reports, backup)
/// that run beside a live daemon. Refuses a directory without a store and a
/// schema this build does not know.
pub fn open_read_only(dir: &Path) -> Result<Connection, StoreError> {
    let (conn, version) = open_read_only_any_version(dir)?;
    let known = u32::try_from(MIGRATIONS.len()).unwrap_or(u32::MAX);
    if version < known {
        return Err(StoreError::Invalid(format!(
            "store schema version {version} predates this build ({known}): start the daemon once to migrate it"
        )));
    }
    Ok(conn)
}

/// [`open_read_only`] for tools that can read older schemas too (backup,
/// scrub): refuses only a directory without a store and a newer schema;
/// returns the schema version found.
pub fn open_read_only_any_version(dir: &Path) -> Result<(Connection, u32), StoreError> {
    let db = dir.join(DB_FILE);
    if !db.is_file() {
        return Err(StoreError::NotFound(format!(
            "no store in {} (expected {})",
            dir.display(),
            db.display()
        )));
    }
    let conn = Connection::open_with_flags(
        &db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    configure(&conn)?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let version = u32::try_from(version)
        .map_err(|_| StoreError::Corrupt(format!("schema version {version}")))?;
    let known = u32::try_from(MIGRATIONS.len()).unwrap_or(u32::MAX);
    if version > known {
        return Err(StoreError::SchemaTooNew {
            found: version,
            supported: known,
        });
    }
    if version == 0 {
        return Err(StoreError::NotFound(format!(
            "no store schema in {}",
            db.display()
        )));
    }
    Ok((conn, version))
}

/// A read-only snapshot of a store (see the module documentation).
pub struct SqliteSnapshot {
    conn: Connection,
    blobs: PathBuf,
    /// Whether the read transaction is still open.
    in_snapshot: bool,
}

impl std::fmt::Debug for SqliteSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteSnapshot")
            .field("blobs", &self.blobs)
            .field("in_snapshot", &self.in_snapshot)
            .finish_non_exhaustive()
    }
}

impl SqliteSnapshot {
    /// Opens the store in `data_dir` (see [`crate::store::open_read_only`]).
    pub fn open(data_dir: &Path, schema: SchemaNeed) -> Result<Self, StoreError> {
        let conn = match schema {
            SchemaNeed::Current => open_read_only(data_dir)?,
            SchemaNeed::AnyKnown => open_read_only_any_version(data_dir)?.0,
        };
        Self::begin(conn, data_dir.join(BLOBS_DIR))
    }

    /// A snapshot over `conn`, whose rows name blob files in `blobs`.
    pub(crate) fn begin(conn: Connection, blobs: PathBuf) -> Result<Self, StoreError> {
        conn.execute_batch("BEGIN")?;
        Ok(Self {
            conn,
            blobs,
            in_snapshot: true,
        })
    }
}

impl ReadOnlyStore for SqliteSnapshot {
    fn schema_version(&self) -> Result<u32, StoreError> {
        schema_version(&self.conn)
    }

    fn end_snapshot(&mut self) -> Result<(), StoreError> {
        if self.in_snapshot {
            self.conn.execute_batch("COMMIT")?;
            self.in_snapshot = false;
        }
        Ok(())
    }

    fn counts(&self) -> Result<RowCounts, StoreError> {
        let conn = &self.conn;
        Ok(RowCounts {
            schema_version: schema_version(conn)?,
            messages: count(conn, "SELECT count(*) FROM messages")?,
            receipts: count(conn, "SELECT count(*) FROM receipts")?,
            deliveries: count(conn, "SELECT count(*) FROM deliveries")?,
            blobs: count(conn, "SELECT count(*) FROM messages WHERE blob IS NOT NULL")?,
            audit_entries: if table_exists(conn, "audit_log")? {
                Some(count(conn, "SELECT count(*) FROM audit_log")?)
            } else {
                None
            },
            provisions: if table_exists(conn, "provisions")? {
                Some(count(conn, "SELECT count(*) FROM provisions")?)
            } else {
                None
            },
        })
    }

    fn blob_path(&self, name: &str) -> PathBuf {
        self.blobs.join(name)
    }

    fn named_blobs(&self) -> Result<Vec<NamedBlob>, StoreError> {
        self.conn
            .prepare("SELECT id, blob FROM messages WHERE blob IS NOT NULL ORDER BY blob")?
            .query_map([], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, String>(1)?))
            })?
            .map(|row| {
                let (id, name) = row?;
                let message = id_string(&id);
                if !valid_blob_name(&name) {
                    return Err(StoreError::Corrupt(format!(
                        "message {message}: bad blob name {:?}",
                        name.escape_debug().to_string()
                    )));
                }
                Ok(NamedBlob { message, name })
            })
            .collect()
    }

    fn blob_files(&self) -> Result<Vec<String>, StoreError> {
        let mut files = Vec::new();
        match fs::read_dir(&self.blobs) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry.map_err(|e| io_err("read directory", &self.blobs, e))?;
                    files.push(entry.file_name().to_string_lossy().into_owned());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("read directory", &self.blobs, e)),
        }
        Ok(files)
    }

    fn is_blob_named(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM messages WHERE blob = ?1")?
            .query_row([name], |r| r.get::<_, i64>(0))
            .optional()?
            .is_some())
    }

    fn messages(&self) -> Rows<'_, RawMessage> {
        let conn = &self.conn;
        let mut after: Option<(i64, Vec<u8>)> = None;
        paged(PAGE, move || {
            // From schema 6 on, `id` is the row's local key and `wire_id`
            // the message id its envelope carries; before, they were one.
            let wire_id = if schema_version(conn)? >= 6 {
                "wire_id"
            } else {
                "id"
            };
            let columns = format!(
                "SELECT id, header_sha256, head, blob, ciphertext_len, received_ms, our_receipt, \
                 {wire_id} FROM messages"
            );
            let page = match &after {
                None => conn
                    .prepare_cached(&format!("{columns} ORDER BY received_ms, id LIMIT ?1"))?
                    .query_map([PAGE], raw_message)?
                    .collect::<Result<Vec<_>, _>>()?,
                Some((received_ms, key)) => conn
                    .prepare_cached(&format!(
                        "{columns} WHERE (received_ms, id) > (?1, ?2) \
                         ORDER BY received_ms, id LIMIT ?3"
                    ))?
                    .query_map(params![received_ms, key, PAGE], raw_message)?
                    .collect::<Result<Vec<_>, _>>()?,
            };
            after = page.last().map(|m| (m.received_ms, m.key.clone()));
            Ok(page)
        })
    }

    fn inline_ciphertext(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT ciphertext FROM messages WHERE id = ?1")?
            .query_row([key], |r| r.get(0))?)
    }

    fn receipts_of(&self, key: &[u8]) -> Result<Vec<RawReceipt>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT seq, digest, signed FROM receipts WHERE message_id = ?1 ORDER BY seq",
            )?
            .query_map([key], |r| {
                Ok(RawReceipt {
                    seq: r.get(0)?,
                    digest: r.get(1)?,
                    signed: r.get(2)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?)
    }

    fn orphan_receipts(&self) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
        Ok(self
            .conn
            .prepare(
                "SELECT seq, message_id FROM receipts \
                 WHERE message_id NOT IN (SELECT id FROM messages) ORDER BY seq",
            )?
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?)
    }

    fn message_head(&self, key: &[u8]) -> Result<Option<(Vec<u8>, i64)>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT head, received_ms FROM messages WHERE id = ?1")?
            .query_row([key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?)
    }

    fn provision_evidence(&self) -> Result<Option<Rows<'_, RawProvision>>, StoreError> {
        let conn = &self.conn;
        if !table_exists(conn, "provisions")? {
            return Ok(None);
        }
        // From schema 6 on, `message_id` is the message's local key and
        // `wire_id` (NULL in older records: the key) its message id.
        let wire_id = if schema_version(conn)? >= 6 {
            "COALESCE(wire_id, message_id)"
        } else {
            "message_id"
        };
        let sql = format!(
            "SELECT id, message_id, receipt, {wire_id} FROM provisions \
             WHERE id >= ?1 ORDER BY id LIMIT ?2"
        );
        let mut next = Some(i64::MIN);
        Ok(Some(paged(PAGE, move || {
            let Some(from) = next else {
                return Ok(Vec::new());
            };
            let page = conn
                .prepare_cached(&sql)?
                .query_map(params![from, PAGE], |r| {
                    Ok(RawProvision {
                        id: r.get(0)?,
                        message_key: r.get(1)?,
                        receipt: r.get(2)?,
                        message_id: r.get(3)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            next = page.last().and_then(|p| p.id.checked_add(1));
            Ok(page)
        })))
    }

    fn provisions_for(&self, subject: &Pseudonym) -> Result<Vec<ProvisionRecord>, StoreError> {
        provisions_for(&self.conn, subject)
    }

    fn audit_len(&self) -> Result<Option<u64>, StoreError> {
        if table_exists(&self.conn, "audit_log")? {
            Ok(Some(count(&self.conn, "SELECT count(*) FROM audit_log")?))
        } else {
            Ok(None)
        }
    }

    fn audit_entries(&self, from: Option<u64>, to: Option<u64>) -> Rows<'_, RawAuditEntry> {
        let conn = &self.conn;
        let to = to.map(saturating_i64);
        let mut next = Some(from.map_or(i64::MIN, saturating_i64));
        paged(PAGE, move || {
            let Some(from) = next else {
                return Ok(Vec::new());
            };
            let row = |r: &Row<'_>| {
                Ok(RawAuditEntry {
                    seq: r.get(0)?,
                    entry: r.get(1)?,
                    leaf_hash: r.get(2)?,
                })
            };
            let page = match to {
                Some(to) => conn
                    .prepare_cached(
                        "SELECT seq, entry, leaf_hash FROM audit_log \
                         WHERE seq >= ?1 AND seq < ?2 ORDER BY seq LIMIT ?3",
                    )?
                    .query_map(params![from, to, PAGE], row)?
                    .collect::<Result<Vec<_>, _>>()?,
                None => conn
                    .prepare_cached(
                        "SELECT seq, entry, leaf_hash FROM audit_log \
                         WHERE seq >= ?1 ORDER BY seq LIMIT ?2",
                    )?
                    .query_map(params![from, PAGE], row)?
                    .collect::<Result<Vec<_>, _>>()?,
            };
            next = page.last().and_then(|e| e.seq.checked_add(1));
            Ok(page)
        })
    }

    fn audit_leaf_hashes(&self, to: u64) -> Rows<'_, [u8; 32]> {
        let conn = &self.conn;
        let to = saturating_i64(to);
        let mut next = Some(i64::MIN);
        let rows = paged(PAGE, move || {
            let Some(from) = next else {
                return Ok(Vec::new());
            };
            let page = conn
                .prepare_cached(
                    "SELECT seq, leaf_hash FROM audit_log \
                     WHERE seq >= ?1 AND seq < ?2 ORDER BY seq LIMIT ?3",
                )?
                .query_map(params![from, to, PAGE], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
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
        Ok(self
            .conn
            .prepare_cached("SELECT entry FROM audit_log WHERE seq = ?1")?
            .query_row([saturating_i64(seq)], |r| r.get(0))?)
    }

    fn audit_seq_from_time(&self, time_ms: u64, to: u64) -> Result<u64, StoreError> {
        let seq: i64 = self
            .conn
            .prepare_cached(
                "SELECT COALESCE(MIN(seq), ?2) FROM audit_log WHERE time_ms >= ?1 AND seq < ?2",
            )?
            .query_row(params![saturating_i64(time_ms), saturating_i64(to)], |r| {
                r.get(0)
            })?;
        Ok(u64::try_from(seq).unwrap_or(0))
    }

    fn latest_checkpoint(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT signed FROM audit_checkpoints ORDER BY tree_size DESC LIMIT 1")?
            .query_row([], |r| r.get(0))
            .optional()?)
    }

    fn checkpoints_dated(
        &self,
        below: u64,
        from_ms: Option<u64>,
        to_ms: Option<u64>,
        newest: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT signed FROM (SELECT tree_size, signed FROM audit_checkpoints \
                 WHERE tree_size < ?1 AND time_ms >= ?2 AND time_ms < ?3 \
                 ORDER BY tree_size DESC LIMIT ?4) ORDER BY tree_size",
            )?
            .query_map(
                params![
                    saturating_i64(below),
                    from_ms.map_or(0, saturating_i64),
                    to_ms.map_or(i64::MAX, saturating_i64),
                    i64::try_from(newest).unwrap_or(i64::MAX)
                ],
                |r| r.get::<_, Vec<u8>>(0),
            )?
            .collect::<Result<Vec<_>, _>>()?)
    }

    fn checkpoints(&self) -> Result<Vec<RawCheckpoint>, StoreError> {
        if !table_exists(&self.conn, "audit_checkpoints")? {
            return Ok(Vec::new());
        }
        Ok(self
            .conn
            .prepare(
                "SELECT tree_size, root, signed, frontier FROM audit_checkpoints \
                 ORDER BY tree_size",
            )?
            .query_map([], |r| {
                Ok(RawCheckpoint {
                    tree_size: r.get(0)?,
                    root: r.get(1)?,
                    signed: r.get(2)?,
                    frontier: r.get(3)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?)
    }
}

fn raw_message(r: &Row<'_>) -> rusqlite::Result<RawMessage> {
    Ok(RawMessage {
        key: r.get(0)?,
        header_sha256: r.get(1)?,
        head: r.get(2)?,
        blob: r.get(3)?,
        ciphertext_len: r.get(4)?,
        received_ms: r.get(5)?,
        our_receipt: r.get(6)?,
        message_id: r.get(7)?,
    })
}

/// A `u64` bound as an INTEGER (at most `i64::MAX`).
fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn schema_version(conn: &Connection) -> Result<u32, StoreError> {
    let v: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("schema version {v}")))
}

fn table_exists(conn: &Connection, name: &str) -> Result<bool, StoreError> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [name],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

fn count(conn: &Connection, sql: &str) -> Result<u64, StoreError> {
    let n: i64 = conn.query_row(sql, [], |r| r.get(0))?;
    u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("negative count from {sql}")))
}

/// The message id of a row, as it is shown (or hex when it is not 16 bytes).
fn id_string(b: &[u8]) -> String {
    MessageId::from_slice(b).map_or_else(|_| hex::encode(b), |id| id.to_string())
}
