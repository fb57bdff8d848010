//! The database side of backup and restore (`exchange admin backup`,
//! `restore`): a consistent copy of a live store's database, and the checks
//! of a database extracted from a backup archive. The archive itself (its
//! members, manifest and checks against them) is [`crate::admin`]'s.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use super::{BLOBS_DIR, DB_FILE, SqliteSnapshot, open_read_only_any_version};
use crate::error::StoreError;

/// The database of a live store, opened read-only without the store lock
/// (any schema version this build knows), to be copied.
#[derive(Debug)]
pub struct BackupSource {
    conn: Connection,
    blobs: PathBuf,
}

impl BackupSource {
    /// Opens the database of the store in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let (conn, _) = open_read_only_any_version(data_dir)?;
        Ok(Self {
            conn,
            blobs: data_dir.join(BLOBS_DIR),
        })
    }

    /// Writes a consistent copy of the database into the new file `dest`
    /// (`VACUUM INTO`, one read transaction: self-contained, no `-wal`
    /// file) and opens the copy read-only: its rows name the live store's
    /// blob files, which are immutable, so a copy of one taken after this
    /// is the one the copy's row names.
    pub fn copy_into(self, dest: &Path) -> Result<SqliteSnapshot, StoreError> {
        let dest_str = dest
            .to_str()
            .ok_or_else(|| StoreError::Invalid(format!("{} is not valid UTF-8", dest.display())))?;
        self.conn.execute("VACUUM INTO ?1", [dest_str])?;
        drop(self.conn);
        let copy = Connection::open_with_flags(
            dest,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        SqliteSnapshot::begin(copy, self.blobs)
    }
}

/// Opens the database that a restore extracted into `dir` (with its blob
/// files in `dir/blobs`) read-only, after SQLite's integrity check.
/// Outer error: the file cannot be opened; inner: what is wrong with the
/// database, to be reported against the archive member.
pub fn open_restored(dir: &Path) -> Result<Result<SqliteSnapshot, String>, StoreError> {
    let conn = Connection::open_with_flags(
        dir.join(DB_FILE),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let check: String = match conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)) {
        Ok(check) => check,
        Err(e) => return Ok(Err(format!("not a readable database: {e}"))),
    };
    if check != "ok" {
        return Ok(Err(format!("integrity check: {check}")));
    }
    SqliteSnapshot::begin(conn, dir.join(BLOBS_DIR)).map(Ok)
}
