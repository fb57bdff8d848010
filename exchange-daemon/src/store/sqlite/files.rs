//! The files of a store directory: private directories and files, the
//! spool, the adoption of a spooled ciphertext as a blob (fsync, link,
//! fsync the directory), the orphan sweep and the directory lock. The
//! durability rules are in the [module documentation](super).

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::Connection;

use super::LOCK_FILE;
use super::rows::check_len;
use crate::error::StoreError;
use crate::store::SpoolFile;

/// A failed file operation: what was done, on which path, and why.
pub(crate) fn io_err(op: &'static str, path: &Path, source: io::Error) -> StoreError {
    StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `dir` (mode 0700 on unix) unless it exists.
pub(super) fn create_dir(dir: &Path) -> Result<(), StoreError> {
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

/// Removes a blob no row names, off the runtime threads.
pub(super) async fn remove_blob(path: PathBuf) {
    let _ = tokio::task::spawn_blocking(move || remove_quietly(&path)).await;
}

pub(super) fn remove_quietly(path: &Path) {
    // Failure leaves an orphan blob, which the next open removes.
    let _ = fs::remove_file(path);
    crate::failpoints::forgotten(path);
}

/// Takes the directory's exclusive lock: an SQLite file in exclusive
/// locking mode keeps its lock until the connection closes.
pub(super) fn lock_dir(dir: &Path) -> Result<Connection, StoreError> {
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

/// Deletes everything in `spool/` (files of calls that never finished).
pub(super) fn clear_spool(spool: &Path) -> Result<(), StoreError> {
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
pub(super) fn sweep_blobs(conn: &Connection, blobs: &Path) -> Result<(), StoreError> {
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
pub(super) fn adopt_spool(
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
