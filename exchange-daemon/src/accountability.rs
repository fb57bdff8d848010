//! Accountability: the audit log, signed checkpoints, patient pseudonyms,
//! provision records and the retention purge.
//!
//! * Every access and transfer is appended to the store's audit log (who,
//!   what, when, which message, which patient pseudonyms, outcome, reason).
//!   Entries that go with a state change are committed in the same
//!   transaction (a stored envelope and its `receive` entry exist together or
//!   not at all); reads (`list`, `status`, `fetch`) and refusals are appended
//!   before the answer goes out, and a request whose entry cannot be written
//!   is refused (fail closed).
//! * The log is a Merkle tree (RFC 9162, `exchange_core::audit`); the daemon
//!   signs a checkpoint (size, root, time) with its identity key every
//!   [`CHECKPOINT_INTERVAL`] when the log grew, and at shutdown.
//! * Patient identifiers are kept only as HMAC-SHA256 pseudonyms under the
//!   facility's secret `pseudonym.key` in the data directory, created at
//!   first start (mode 0600). The clear identifiers stay in the sealed
//!   envelope's inner header.
//!
//! This module holds the rules, the files and the offline reports (they
//! read a store beside a running daemon or without one); what a running
//! [`Node`](crate::node::Node) does (entries, checkpoints, the purge) is in
//! the node's `audit` module.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use exchange_core::audit::{AuditEntry, Checkpoint, Pseudonym, SignedCheckpoint, SubjectKey};
use exchange_core::envelope::SubjectId;
use exchange_core::identity::Certificate;

use crate::error::{Error, StoreError};
use crate::store::{SchemaNeed, StoreLocation};

/// The facility secret's file name in the data directory.
pub const SUBJECT_KEY_FILE: &str = "pseudonym.key";

/// How often the checkpointer signs a new checkpoint when the log grew.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);

/// The text a patient identifier is pseudonymised from: `SYSTEM`, a NUL,
/// `VALUE` (unambiguous: neither part may contain a control character).
pub(crate) fn subject_text(system: &str, value: &str) -> String {
    format!("{system}\u{0}{value}")
}

/// The pseudonym of one subject identifier under `key`.
pub fn pseudonym(key: &SubjectKey, subject: &SubjectId) -> Pseudonym {
    key.pseudonym(&subject_text(&subject.system, &subject.value))
}

/// Reads the facility's pseudonym key from `data_dir` (never creates it).
pub fn load_subject_key(data_dir: &Path) -> Result<SubjectKey, Error> {
    let path = data_dir.join(SUBJECT_KEY_FILE);
    let bytes = zeroize::Zeroizing::new(fs::read(&path).map_err(|source| Error::ReadFile {
        path: path.clone(),
        source,
    })?);
    let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
        Error::Config(format!(
            "{}: a pseudonym key is 32 bytes, this file has {}",
            path.display(),
            bytes.len()
        ))
    })?;
    Ok(SubjectKey::from_bytes(key))
}

/// Reads the facility's pseudonym key from `data_dir`, creating it (32
/// random bytes, mode 0600, written to a temporary file, fsynced, then
/// linked into place so a concurrent start cannot clobber it) if there is
/// none and the store at `store` (a PostgreSQL database, or the SQLite
/// store in a data directory) has no audit entry yet. A store that already
/// has entries refuses to start without its key: a new key would silently
/// make every earlier pseudonym unsearchable (restore the key from a
/// backup, or copy it from another replica). A store without a schema yet
/// counts as one without entries; a database that cannot be reached is an
/// error.
pub fn load_or_create_subject_key_at(
    data_dir: &Path,
    store: &StoreLocation,
) -> Result<SubjectKey, Error> {
    let path = data_dir.join(SUBJECT_KEY_FILE);
    if path.exists() {
        return load_subject_key(data_dir);
    }
    let location = store;
    let opened = match crate::store::open_read_only(location, SchemaNeed::Current) {
        Ok(store) => Some(store),
        // No store yet (or, for a directory, none this build reads).
        Err(StoreError::NotFound(_)) => None,
        Err(_) if matches!(location, StoreLocation::Dir(_)) => None,
        // A database that cannot be asked now: no key is made on a guess.
        Err(e) => return Err(e.into()),
    };
    if let Some(store) = opened {
        let entries = store.audit_len()?.unwrap_or(0);
        if entries > 0 {
            return Err(Error::Config(format!(
                "{} is missing but the store in {location} already holds {entries} audit entries: \
                 restore the facility's pseudonym key from a backup (a new key would make \
                 every earlier patient pseudonym unsearchable)",
                path.display(),
            )));
        }
    }
    let io = |op: &'static str, p: &Path, source: std::io::Error| {
        Error::Store(StoreError::Io {
            op,
            path: p.to_path_buf(),
            source,
        })
    };
    fs::create_dir_all(data_dir).map_err(|e| io("create", data_dir, e))?;
    let mut secret = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::fill(secret.as_mut_slice())
        .map_err(|e| Error::Config(format!("no randomness for the pseudonym key: {e}")))?;
    let tmp = tempfile_in(data_dir).map_err(|e| io("create a temporary file in", data_dir, e))?;
    {
        let mut f = tmp.as_file();
        f.write_all(secret.as_slice())
            .and_then(|()| f.sync_all())
            .map_err(|e| io("write", tmp.path(), e))?;
    }
    match fs::hard_link(tmp.path(), &path) {
        Ok(()) => {
            if let Ok(d) = fs::File::open(data_dir) {
                let _ = d.sync_all();
            }
            tracing::info!(path = %path.display(), "created the facility's patient pseudonym key");
            Ok(SubjectKey::from_bytes(*secret))
        }
        // Someone else created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_subject_key(data_dir),
        Err(e) => Err(io("link", &path, e)),
    }
}

/// A private temporary file (mode 0600), removed on drop.
fn tempfile_in(dir: &Path) -> std::io::Result<TempFile> {
    let mut name = [0u8; 12];
    getrandom::fill(&mut name).map_err(|e| std::io::Error::other(e.to_string()))?;
    let path = dir.join(format!(".{}.tmp", hex::encode(name)));
    let mut o = fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    let file = o.open(&path)?;
    Ok(TempFile { path, file })
}

struct TempFile {
    path: std::path::PathBuf,
    file: fs::File,
}

impl TempFile {
    fn path(&self) -> &Path {
        &self.path
    }
    fn as_file(&self) -> &fs::File {
        &self.file
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Who did something, as the audit log names them.
pub(crate) fn client_actor(party: &str) -> String {
    format!("client:{party}")
}

/// A peer facility, as the audit log names it.
pub(crate) fn peer_actor(party: &exchange_core::PartyUri) -> String {
    format!("peer:{party}")
}

/// The daemon itself.
pub(crate) const DAEMON: &str = "daemon";

/// A display name from a certificate: its common name, else its subject.
pub(crate) fn certificate_name(cert: &Certificate) -> String {
    cert.common_name()
        .map_or_else(|| cert.subject().to_owned(), ToOwned::to_owned)
}

/// The file in the data directory that keeps a copy of the latest signed
/// checkpoint outside the database (its signed form), replaced atomically
/// after each new checkpoint is stored: deleting checkpoint rows or
/// rewriting the log behind the daemon's back is detected against it.
pub const CHECKPOINT_FILE: &str = "checkpoint.latest";

/// The signed checkpoint kept in `data_dir`'s [`CHECKPOINT_FILE`], if any.
pub(crate) fn read_kept_checkpoint(data_dir: &Path) -> Result<Option<Vec<u8>>, Error> {
    let path = data_dir.join(CHECKPOINT_FILE);
    match fs::read(&path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::ReadFile { path, source }),
    }
}

/// Replaces [`CHECKPOINT_FILE`] with `signed`: a temporary file, fsynced,
/// renamed into place, the directory fsynced.
pub(crate) fn write_kept_checkpoint(data_dir: &Path, signed: &[u8]) -> Result<(), Error> {
    let io = |op: &'static str, p: &Path, source: std::io::Error| {
        Error::Store(StoreError::Io {
            op,
            path: p.to_path_buf(),
            source,
        })
    };
    let path = data_dir.join(CHECKPOINT_FILE);
    let tmp = tempfile_in(data_dir).map_err(|e| io("create a temporary file in", data_dir, e))?;
    {
        let mut f = tmp.as_file();
        f.write_all(signed)
            .and_then(|()| f.sync_all())
            .map_err(|e| io("write", tmp.path(), e))?;
    }
    fs::rename(tmp.path(), &path).map_err(|e| io("rename", &path, e))?;
    if let Ok(d) = fs::File::open(data_dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The provision records about one patient in the store at `store`
/// (read-only; works beside a running daemon): the disclosure report's
/// content. The identifier is pseudonymised with the facility's key (read
/// from `data_dir`) and looked up by pseudonym; it is not stored or logged.
pub fn provision_report(
    data_dir: &Path,
    store: &StoreLocation,
    subject: &SubjectId,
) -> Result<Vec<crate::store::ProvisionRecord>, Error> {
    let key = load_subject_key(data_dir)?;
    let store = crate::store::open_read_only(store, SchemaNeed::Current)?;
    Ok(store.provisions_for(&pseudonym(&key, subject))?)
}

/// Most earlier checkpoints an export carries (the newest ones in its range).
pub(crate) const MAX_EXPORTED_CHECKPOINTS: usize = 1000;

/// What [`export_audit`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    /// The latest checkpoint the export is proven against.
    pub checkpoint: Checkpoint,
    /// Entries exported: seqs `first..end`.
    pub first: u64,
    /// One past the last exported seq.
    pub end: u64,
    /// Earlier checkpoints included, with consistency proofs.
    pub earlier_checkpoints: usize,
    /// Entries appended after the latest checkpoint (not exported: the next
    /// checkpoint will cover them).
    pub not_yet_checkpointed: u64,
}

/// Writes the audit log of the store at `store` (read-only; works
/// beside a running daemon) as an export file (`exchange_core::audit`
/// format): the entries dated in `[from_ms, to_ms)` (all if both are
/// `None`), each with its inclusion proof, witnesses at the range's ends,
/// earlier checkpoints of the range with consistency proofs, and the latest
/// signed checkpoint. Everything is read in one transaction.
///
/// `witnesses` are checkpoints of this log kept elsewhere (from earlier
/// exports): each is included with its consistency proof to the latest, so
/// a verifier holding it can check that the log only grew since. If the log
/// does not extend one of them (it was rewritten), the export fails with
/// [`Error::Core`] carrying the consistency error, and nothing is written
/// after the header.
pub fn export_audit(
    store: &StoreLocation,
    from_ms: Option<u64>,
    to_ms: Option<u64>,
    witnesses: &[SignedCheckpoint],
    out: impl Write,
) -> Result<ExportSummary, Error> {
    use exchange_core::audit::{ExportRange, ExportWriter, MerkleTree};

    if let (Some(f), Some(t)) = (from_ms, to_ms)
        && f >= t
    {
        return Err(Error::BadRequest(
            "the start of the range must be before its end".into(),
        ));
    }
    let location = store;
    let store = crate::store::open_read_only(location, SchemaNeed::Current)?;
    let Some(latest) = store.latest_checkpoint()? else {
        return Err(Error::NotFound(format!(
            "no signed audit checkpoint in {location} yet (a running daemon signs one within {} s; a stopped one signed its last at shutdown)",
            CHECKPOINT_INTERVAL.as_secs()
        )));
    };
    let latest = SignedCheckpoint::from_bytes(&latest)?;
    let checkpoint = latest.unverified()?;
    let n = checkpoint.tree_size;

    let leaves = store
        .audit_leaf_hashes(n)
        .collect::<Result<Vec<_>, StoreError>>()?;
    if leaves.len() as u64 != checkpoint.tree_size {
        return Err(Error::Store(StoreError::Corrupt(format!(
            "the latest checkpoint covers {} entries, the log holds {}",
            checkpoint.tree_size,
            leaves.len()
        ))));
    }
    let tree = MerkleTree::from_leaf_hashes(leaves);
    let seq_at = |time: Option<u64>, default: u64| -> Result<u64, Error> {
        match time {
            None => Ok(default),
            Some(t) => Ok(store.audit_seq_from_time(t, n)?),
        }
    };
    let first = seq_at(from_ms, 0)?;
    let end = seq_at(to_ms, n)?.max(first);
    let range = ExportRange {
        from_ms,
        to_ms,
        first,
        end,
    };
    // A witness whose stored entry cannot be exported is left out (the
    // verifier reports the range's completeness as unproven).
    let entry_at = |seq: u64| -> Result<Option<AuditEntry>, Error> {
        let bytes = store.audit_entry(seq)?;
        Ok(AuditEntry::from_json(&bytes)
            .ok()
            .filter(|e| e.to_canonical_json() == bytes))
    };
    let mut writer = ExportWriter::new(out, &tree, &latest, range)?;
    if from_ms.is_some() && first > 0 {
        match entry_at(first - 1)? {
            Some(e) => writer.before(&e)?,
            None => writer.witness_unavailable(),
        }
    }
    for row in store.audit_entries(Some(first), Some(end)) {
        let row = row?;
        let seq = u64::try_from(row.seq).unwrap_or(u64::MAX);
        let bytes = row.entry;
        // An entry that cannot be exported as it is (one written before
        // entries were checked on append) is exported as its proven
        // leaf hash: the verifier reports it and goes on.
        match AuditEntry::from_json(&bytes) {
            Ok(e) if e.to_canonical_json() == bytes => writer.entry(&e)?,
            Ok(_) => {
                writer.unreadable(seq, &bytes, "the stored entry is not in canonical form")?;
            }
            Err(e) => writer.unreadable(seq, &bytes, &e.to_string())?,
        }
    }
    if to_ms.is_some() && end < checkpoint.tree_size {
        match entry_at(end)? {
            Some(e) => writer.after(&e)?,
            None => writer.witness_unavailable(),
        }
    }
    let mut earlier = store
        .checkpoints_dated(n, from_ms, to_ms, MAX_EXPORTED_CHECKPOINTS)?
        .iter()
        .map(|b| SignedCheckpoint::from_bytes(b))
        .collect::<Result<Vec<_>, _>>()?;
    for w in witnesses {
        let c = w.unverified()?;
        if c.party != checkpoint.party {
            return Err(Error::BadRequest(format!(
                "the witnessed checkpoint is {}'s, this log is {}'s",
                c.party, checkpoint.party
            )));
        }
        if c.tree_size > checkpoint.tree_size {
            return Err(Error::BadRequest(format!(
                "the witnessed checkpoint covers {} entries, more than this log's latest checkpoint ({}): the log was rolled back or the witness is of another store",
                c.tree_size, checkpoint.tree_size
            )));
        }
        earlier.push(w.clone());
    }
    let key = |c: &SignedCheckpoint| c.unverified().map(|c| (c.tree_size, c.root, c.time_ms));
    let mut keyed = earlier
        .into_iter()
        .map(|c| Ok((key(&c)?, c)))
        .collect::<Result<Vec<_>, exchange_core::Error>>()?;
    keyed.sort_by_key(|a| a.0);
    keyed.dedup_by(|a, b| a.0 == b.0);
    let earlier: Vec<SignedCheckpoint> = keyed
        .into_iter()
        .map(|(_, c)| c)
        .filter(|c| key(c).is_ok_and(|k| k.0 < checkpoint.tree_size || k.1 != checkpoint.root))
        .collect();
    for signed in &earlier {
        writer.earlier_checkpoint(signed)?;
    }
    writer.finish()?;
    let total = store.audit_len()?.unwrap_or(0);
    Ok(ExportSummary {
        checkpoint: checkpoint.clone(),
        first,
        end,
        earlier_checkpoints: earlier.len(),
        not_yet_checkpointed: total.saturating_sub(n),
    })
}
