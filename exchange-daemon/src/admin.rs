//! Administration of a store directory beside a running daemon: an online
//! backup into one verifiable archive, its restore, and an integrity scrub
//! of everything stored (DESIGN.md §6 "backup/restore, integrity scrub";
//! docs/operations.md §7).
//!
//! None of these takes `store.lock`: [`backup`] and [`verify_store`] open the
//! database read-only and read in one transaction (a WAL reader never blocks
//! the daemon's writer), and [`restore`] only writes a directory that holds
//! no store yet.
//!
//! [`verify_store`] reads a PostgreSQL store too (in one `REPEATABLE READ
//! READ ONLY` transaction, see [`crate::store::StoreLocation`]); backup and
//! restore are of SQLite stores only (a PostgreSQL store is backed up with
//! the database's own tools, `pg_dump`, with the data directory's
//! `pseudonym.key`).
//!
//! # Backup archive format
//!
//! A POSIX ustar archive (`tar`), mode 0600, whose members are, in order:
//!
//! * `store.sqlite3`: a snapshot of the database taken with `VACUUM INTO` in
//!   one read transaction (self-contained: no `-wal` file);
//! * `blobs/<name>`: every blob file a row of *that snapshot* names (blob
//!   files are immutable, so a copy taken after the snapshot is the one the
//!   snapshot saw; one that is gone, purged after the snapshot, fails the
//!   backup, naming it);
//! * `pseudonym.key`: the facility's pseudonym secret, when the store has one;
//! * `MANIFEST`: UTF-8 text, one `key value` per line: first
//!   `exchange-store-backup 1`, then `created_ms`, `schema_version`,
//!   `messages`, `receipts`, `deliveries`, `blobs`, `blob_bytes`,
//!   `pseudonym_key` (`present` | `absent`), `audit_entries` and
//!   `provisions` (only when those tables exist), and one
//!   `member <SHA-256 hex> <size> <name>` line per member above.
//!
//! [`restore`] accepts exactly these names (no other path can be written),
//! each once, the manifest last, and checks every member's size and SHA-256
//! against it before anything is moved into place.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use exchange_core::MessageId;
use exchange_core::envelope::{EnvelopeHead, VerifiedHead};
use exchange_core::receipt::SignedReceipt;
use exchange_core::suite::{Hasher, sha256};
use exchange_core::trust::TrustStore;

use crate::clock::{from_unix_ms, unix_ms};
use crate::config::Config;
use crate::error::{Error, StoreError};
use crate::store::sqlite::{
    BackupSource, create_private, io_err, open_restored, supported_schema_version, sync_dir,
    valid_blob_name,
};
use crate::store::{
    CiphertextChunk, RawAuditEntry, RawCheckpoint, RawMessage, RawProvision, RawReceipt,
    ReadOnlyStore, RowCounts, SchemaNeed, StoreLocation,
};

const DB_FILE: &str = "store.sqlite3";
const BLOBS_DIR: &str = "blobs";
const PSEUDONYM_KEY: &str = "pseudonym.key";
const MANIFEST: &str = "MANIFEST";
const FORMAT_LINE: &str = "exchange-store-backup 1";
/// Largest manifest accepted (a line per blob).
const MAX_MANIFEST: u64 = 256 << 20;

/// What a store (or a backup of one) holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreCounts {
    /// The store's schema version.
    pub schema_version: u32,
    /// Stored envelopes.
    pub messages: u64,
    /// Stored receipts (the `receipts` table).
    pub receipts: u64,
    /// Deliveries in the work queue (any state).
    pub deliveries: u64,
    /// Envelopes whose ciphertext is a blob file.
    pub blobs: u64,
    /// Total size of those blob files.
    pub blob_bytes: u64,
    /// Whether `pseudonym.key` is there.
    pub pseudonym_key: bool,
    /// Audit log entries, when the store has an audit log (schema 2 on).
    pub audit_entries: Option<u64>,
    /// Provision records, when the store has them (schema 2 on).
    pub provisions: Option<u64>,
}

impl From<RowCounts> for StoreCounts {
    /// The rows' counts; the blob bytes and the key file are the caller's.
    fn from(c: RowCounts) -> Self {
        Self {
            schema_version: c.schema_version,
            messages: c.messages,
            receipts: c.receipts,
            deliveries: c.deliveries,
            blobs: c.blobs,
            blob_bytes: 0,
            pseudonym_key: false,
            audit_entries: c.audit_entries,
            provisions: c.provisions,
        }
    }
}

impl fmt::Display for StoreCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "schema {}, {} message(s) ({} in blob files, {} bytes), {} receipt(s), {} deliveries",
            self.schema_version,
            self.messages,
            self.blobs,
            self.blob_bytes,
            self.receipts,
            self.deliveries
        )?;
        if let Some(n) = self.audit_entries {
            write!(f, ", {n} audit entries")?;
        }
        if let Some(n) = self.provisions {
            write!(f, ", {n} provision record(s)")?;
        }
        write!(
            f,
            ", pseudonym.key {}",
            if self.pseudonym_key {
                "included"
            } else {
                "absent"
            }
        )
    }
}

/// What [`backup`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSummary {
    /// The archive.
    pub archive: PathBuf,
    /// Size of the archive in bytes.
    pub archive_bytes: u64,
    /// What the snapshot holds.
    pub counts: StoreCounts,
}

/// What [`restore`] put in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreSummary {
    /// The new store directory.
    pub data_dir: PathBuf,
    /// Archive members checked against the manifest.
    pub members: usize,
    /// What the restored store holds.
    pub counts: StoreCounts,
}

// ---------------------------------------------------------------------------
// Backup.

/// Takes a consistent online backup of the SQLite store in `data_dir` into
/// the new archive `out` (see the module documentation for the format).
///
/// Works while a daemon runs on the directory: the database is opened
/// read-only without the store lock and copied with `VACUUM INTO` in one
/// read transaction; then every blob file the copy's rows name is added.
/// The archive is written to a temporary file beside `out` (mode 0600: it
/// holds the facility's pseudonym secret), fsynced and linked into place,
/// never replacing an existing file. On any error nothing is left behind.
pub fn backup(data_dir: &Path, out: &Path) -> Result<BackupSummary, Error> {
    if out.symlink_metadata().is_ok() {
        return Err(StoreError::Exists(out.to_owned()).into());
    }
    let source = BackupSource::open(data_dir)?;
    let out_dir = dir_of(out);
    let work = TempPath::new_dir(&out_dir, "exchange-backup")?;
    let snapshot = work.path.join(DB_FILE);
    let snap = source.copy_into(&snapshot)?;
    let blob_rows = snap
        .named_blobs()?
        .into_iter()
        .map(|b| {
            let path = snap.blob_path(&b.name);
            (b.message, b.name, path)
        })
        .collect::<Vec<_>>();
    let mut counts = StoreCounts::from(snap.counts()?);
    drop(snap);
    let key = data_dir.join(PSEUDONYM_KEY);
    counts.pseudonym_key = key.is_file();

    let tmp = TempPath::new_file(&out_dir, "exchange-backup")?;
    let file = create_private(&tmp.path)?;
    let mut builder = tar::Builder::new(BufWriter::new(file));
    let mut members = Vec::new();
    members.push(append_file(&mut builder, DB_FILE, &snapshot, &tmp.path)?);
    for (id, name, path) in blob_rows {
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::BlobMissing { message: id, path }.into());
            }
            Err(e) => return Err(io_err("open", &path, e).into()),
        };
        let member = append_open(
            &mut builder,
            &format!("{BLOBS_DIR}/{name}"),
            file,
            &path,
            &tmp.path,
        )?;
        counts.blob_bytes += member.size;
        members.push(member);
    }
    if counts.pseudonym_key {
        members.push(append_file(&mut builder, PSEUDONYM_KEY, &key, &tmp.path)?);
    }
    let manifest = Manifest {
        created_ms: unix_ms(SystemTime::now()),
        counts: counts.clone(),
        members,
    }
    .to_text();
    let mut header = member_header(u64::try_from(manifest.len()).unwrap_or(u64::MAX));
    builder
        .append_data(&mut header, MANIFEST, manifest.as_bytes())
        .map_err(|e| io_err("write", &tmp.path, e))?;
    let file = builder
        .into_inner()
        .and_then(|w| w.into_inner().map_err(io::IntoInnerError::into_error))
        .map_err(|e| io_err("write", &tmp.path, e))?;
    file.sync_all().map_err(|e| io_err("fsync", &tmp.path, e))?;
    let archive_bytes = file
        .metadata()
        .map_err(|e| io_err("stat", &tmp.path, e))?
        .len();
    drop(file);
    // A link never replaces an existing file.
    fs::hard_link(&tmp.path, out).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            StoreError::Exists(out.to_owned())
        } else {
            io_err("link", out, e)
        }
    })?;
    drop(tmp);
    drop(work);
    sync_dir(&out_dir)?;
    Ok(BackupSummary {
        archive: out.to_owned(),
        archive_bytes,
        counts,
    })
}

fn member_header(size: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size);
    header.set_mode(0o600);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(unix_ms(SystemTime::now()) / 1000);
    header
}

/// One archive member: name, size, SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Member {
    name: String,
    size: u64,
    sha256: [u8; 32],
}

fn append_file<W: Write>(
    builder: &mut tar::Builder<W>,
    name: &str,
    path: &Path,
    archive: &Path,
) -> Result<Member, StoreError> {
    let file = File::open(path).map_err(|e| io_err("open", path, e))?;
    append_open(builder, name, file, path, archive)
}

fn append_open<W: Write>(
    builder: &mut tar::Builder<W>,
    name: &str,
    file: File,
    path: &Path,
    archive: &Path,
) -> Result<Member, StoreError> {
    let size = file.metadata().map_err(|e| io_err("stat", path, e))?.len();
    let mut header = member_header(size);
    let mut reader = Hashing::new(file.take(size));
    builder
        .append_data(&mut header, name, &mut reader)
        .map_err(|e| io_err("write", archive, e))?;
    if reader.len != size {
        // tar pads a short read: the archive would be wrong.
        return Err(StoreError::Corrupt(format!(
            "{} changed while it was copied ({size} bytes expected, {} read)",
            path.display(),
            reader.len
        )));
    }
    Ok(Member {
        name: name.to_owned(),
        size,
        sha256: reader.finish(),
    })
}

// ---------------------------------------------------------------------------
// Restore.

/// Restores the archive `archive` (written by [`backup`]) as the store
/// directory `data_dir`, which must not exist yet or be empty.
///
/// Every member is extracted into a temporary directory beside `data_dir`
/// and checked against the manifest (only the expected names, each once,
/// sizes and SHA-256); the database's integrity, schema version and blob
/// names are checked too. Only then is the directory renamed into place.
/// On any error nothing is left behind and `data_dir` is untouched.
pub fn restore(archive: &Path, data_dir: &Path) -> Result<RestoreSummary, Error> {
    check_empty_target(data_dir)?;
    let parent = dir_of(data_dir);
    let file = File::open(archive).map_err(|e| io_err("open", archive, e))?;
    let work = TempPath::new_dir(&parent, "exchange-restore")?;
    create_dir(&work.path.join(BLOBS_DIR))?;
    let bad = |member: &str, problem: String| StoreError::Archive {
        archive: archive.to_owned(),
        member: member.to_owned(),
        problem,
    };

    let mut extracted: BTreeMap<String, Member> = BTreeMap::new();
    let mut manifest_text: Option<String> = None;
    let mut tar = tar::Archive::new(file);
    let entries = tar
        .entries()
        .map_err(|e| bad("(archive)", format!("not a readable tar archive: {e}")))?;
    for entry in entries {
        let mut entry =
            entry.map_err(|e| bad("(archive)", format!("not a readable tar archive: {e}")))?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let shown = name.escape_debug().to_string();
        if !allowed_member(&name) {
            return Err(bad(
                &shown,
                "unexpected member (a backup holds only store.sqlite3, blobs/<name>, \
                 pseudonym.key and MANIFEST)"
                    .into(),
            )
            .into());
        }
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(bad(&shown, "not a regular file".into()).into());
        }
        if manifest_text.is_some() {
            return Err(bad(&shown, "follows the manifest (the manifest is last)".into()).into());
        }
        if extracted.contains_key(&name) {
            return Err(bad(&shown, "appears twice".into()).into());
        }
        if name == MANIFEST {
            let mut text = String::new();
            (&mut entry)
                .take(MAX_MANIFEST)
                .read_to_string(&mut text)
                .map_err(|e| bad(MANIFEST, format!("unreadable: {e}")))?;
            manifest_text = Some(text);
            continue;
        }
        let dest = work.path.join(&name);
        let out = create_private(&dest)?;
        let mut reader = Hashing::new(&mut entry);
        let mut writer = BufWriter::new(out);
        io::copy(&mut reader, &mut writer)
            .map_err(|e| bad(&shown, format!("cannot extract: {e}")))?;
        let out = writer
            .into_inner()
            .map_err(|e| io_err("write", &dest, e.into_error()))?;
        out.sync_all().map_err(|e| io_err("fsync", &dest, e))?;
        let size = reader.len;
        extracted.insert(
            name.clone(),
            Member {
                name,
                size,
                sha256: reader.finish(),
            },
        );
    }
    let text = manifest_text.ok_or_else(|| {
        bad(
            MANIFEST,
            "missing: not a complete backup written by `exchange admin backup`".into(),
        )
    })?;
    let manifest = Manifest::parse(&text).map_err(|p| bad(MANIFEST, p))?;
    for m in &manifest.members {
        let Some(got) = extracted.get(&m.name) else {
            return Err(bad(
                &m.name,
                "listed in the manifest but not in the archive".into(),
            )
            .into());
        };
        if got.size != m.size || got.sha256 != m.sha256 {
            return Err(bad(
                &m.name,
                format!(
                    "SHA-256 {} ({} bytes) does not match the manifest's {} ({} bytes): \
                     the archive is damaged or was altered",
                    hex::encode(got.sha256),
                    got.size,
                    hex::encode(m.sha256),
                    m.size
                ),
            )
            .into());
        }
    }
    let listed: BTreeSet<&str> = manifest.members.iter().map(|m| m.name.as_str()).collect();
    if let Some(extra) = extracted.keys().find(|n| !listed.contains(n.as_str())) {
        return Err(bad(extra, "not listed in the manifest".into()).into());
    }
    if !extracted.contains_key(DB_FILE) {
        return Err(bad(DB_FILE, "missing".into()).into());
    }

    // The database itself: intact, a schema we know, blobs as its rows say.
    let counts = {
        let db = open_restored(&work.path)?.map_err(|problem| bad(DB_FILE, problem))?;
        let mut counts = db
            .counts()
            .map(StoreCounts::from)
            .map_err(|e| bad(DB_FILE, e.to_string()))?;
        counts.pseudonym_key = extracted.contains_key(PSEUDONYM_KEY);
        counts.blob_bytes = extracted
            .values()
            .filter(|m| m.name.starts_with("blobs/"))
            .map(|m| m.size)
            .sum();
        if counts != manifest.counts {
            return Err(bad(
                DB_FILE,
                format!("holds {counts}; the manifest says {}", manifest.counts),
            )
            .into());
        }
        let named: BTreeSet<String> = db
            .named_blobs()
            .map_err(|e| bad(DB_FILE, e.to_string()))?
            .into_iter()
            .map(|b| format!("{BLOBS_DIR}/{}", b.name))
            .collect();
        for name in &named {
            if !extracted.contains_key(name) {
                return Err(bad(name, "named by a message but not in the archive".into()).into());
            }
        }
        if let Some(extra) = extracted
            .keys()
            .find(|n| n.starts_with("blobs/") && !named.contains(*n))
        {
            return Err(bad(extra, "named by no message in the database".into()).into());
        }
        counts
    };
    if counts.schema_version > supported_schema_version() {
        return Err(StoreError::SchemaTooNew {
            found: counts.schema_version,
            supported: supported_schema_version(),
        }
        .into());
    }

    sync_dir(&work.path.join(BLOBS_DIR))?;
    sync_dir(&work.path)?;
    // Renaming onto an empty directory replaces it; onto a non-empty one fails.
    fs::rename(&work.path, data_dir).map_err(|e| match e.kind() {
        io::ErrorKind::DirectoryNotEmpty | io::ErrorKind::AlreadyExists => {
            StoreError::NotEmpty(data_dir.to_owned())
        }
        _ => io_err("rename into place", data_dir, e),
    })?;
    work.keep();
    sync_dir(&parent)?;
    Ok(RestoreSummary {
        data_dir: data_dir.to_owned(),
        members: extracted.len() + 1,
        counts,
    })
}

/// Refuses a target that exists and is not an empty directory.
fn check_empty_target(data_dir: &Path) -> Result<(), StoreError> {
    match fs::symlink_metadata(data_dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("stat", data_dir, e)),
        Ok(m) if !m.is_dir() => Err(StoreError::Exists(data_dir.to_owned())),
        Ok(_) => {
            let mut entries =
                fs::read_dir(data_dir).map_err(|e| io_err("read directory", data_dir, e))?;
            if entries.next().is_some() {
                Err(StoreError::NotEmpty(data_dir.to_owned()))
            } else {
                Ok(())
            }
        }
    }
}

fn allowed_member(name: &str) -> bool {
    match name {
        DB_FILE | PSEUDONYM_KEY | MANIFEST => true,
        _ => name.strip_prefix("blobs/").is_some_and(valid_blob_name),
    }
}

/// The manifest of an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Manifest {
    created_ms: u64,
    counts: StoreCounts,
    members: Vec<Member>,
}

impl Manifest {
    fn to_text(&self) -> String {
        let c = &self.counts;
        let mut s = format!(
            "{FORMAT_LINE}\ncreated_ms {}\nschema_version {}\nmessages {}\nreceipts {}\n\
             deliveries {}\nblobs {}\nblob_bytes {}\npseudonym_key {}\n",
            self.created_ms,
            c.schema_version,
            c.messages,
            c.receipts,
            c.deliveries,
            c.blobs,
            c.blob_bytes,
            if c.pseudonym_key { "present" } else { "absent" }
        );
        if let Some(n) = c.audit_entries {
            s.push_str(&format!("audit_entries {n}\n"));
        }
        if let Some(n) = c.provisions {
            s.push_str(&format!("provisions {n}\n"));
        }
        for m in &self.members {
            s.push_str(&format!(
                "member {} {} {}\n",
                hex::encode(m.sha256),
                m.size,
                m.name
            ));
        }
        s
    }

    fn parse(text: &str) -> Result<Self, String> {
        let mut lines = text.lines();
        if lines.next() != Some(FORMAT_LINE) {
            return Err(format!("does not start with {FORMAT_LINE:?}"));
        }
        let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
        let mut members = Vec::new();
        for (i, line) in lines.enumerate() {
            let at = || format!("line {}: {:?}", i + 2, line.escape_debug().to_string());
            let (key, value) = line.split_once(' ').ok_or_else(at)?;
            if key == "member" {
                let mut parts = value.splitn(3, ' ');
                let (Some(sha), Some(size), Some(name)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    return Err(at());
                };
                let sha256 = hex::decode(sha)
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
                    .ok_or_else(at)?;
                let size = size.parse().map_err(|_| at())?;
                if !allowed_member(name) || name == MANIFEST {
                    return Err(at());
                }
                if members.iter().any(|m: &Member| m.name == name) {
                    return Err(format!("{} (listed twice)", at()));
                }
                members.push(Member {
                    name: name.to_owned(),
                    size,
                    sha256,
                });
            } else if fields.insert(key, value).is_some() {
                return Err(format!("{} (repeated)", at()));
            }
        }
        let mut take = |k: &str| fields.remove(k);
        let number = |k: &str, v: Option<&str>| -> Result<u64, String> {
            v.ok_or_else(|| format!("no {k}"))?
                .parse()
                .map_err(|_| format!("{k} is not a number"))
        };
        let created_ms = number("created_ms", take("created_ms"))?;
        let schema_version = u32::try_from(number("schema_version", take("schema_version"))?)
            .map_err(|_| "schema_version out of range".to_owned())?;
        let messages = number("messages", take("messages"))?;
        let receipts = number("receipts", take("receipts"))?;
        let deliveries = number("deliveries", take("deliveries"))?;
        let blobs = number("blobs", take("blobs"))?;
        let blob_bytes = number("blob_bytes", take("blob_bytes"))?;
        let pseudonym_key = match take("pseudonym_key") {
            Some("present") => true,
            Some("absent") => false,
            _ => return Err("pseudonym_key is not present or absent".into()),
        };
        let audit_entries = take("audit_entries")
            .map(|v| number("audit_entries", Some(v)))
            .transpose()?;
        let provisions = take("provisions")
            .map(|v| number("provisions", Some(v)))
            .transpose()?;
        if let Some(k) = fields.keys().next() {
            return Err(format!("unknown field {k:?}"));
        }
        Ok(Self {
            created_ms,
            counts: StoreCounts {
                schema_version,
                messages,
                receipts,
                deliveries,
                blobs,
                blob_bytes,
                pseudonym_key,
                audit_entries,
                provisions,
            },
            members,
        })
    }
}

// ---------------------------------------------------------------------------
// Integrity scrub.

/// One thing that did not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The message concerned, when there is one.
    pub message: Option<MessageId>,
    /// What was checked: `head`, `ciphertext (inline)`, `ciphertext (blob
    /// file …)`, `receipt #seq`, `our receipt`, `provision record …`,
    /// `audit log …`.
    pub what: String,
    /// Why it failed.
    pub error: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.message {
            Some(id) => write!(f, "message {id}: {}: {}", self.what, self.error),
            None => write!(f, "{}: {}", self.what, self.error),
        }
    }
}

/// What [`verify_store`] checked and what failed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyStoreReport {
    /// Schema version of the database.
    pub schema_version: u32,
    /// Message rows examined.
    pub messages: u64,
    /// Heads whose signature and sender chain verified.
    pub heads_verified: u64,
    /// Inline ciphertexts whose length and SHA-256 matched their head.
    pub inline_ciphertexts_verified: u64,
    /// Blob files whose length and SHA-256 matched their head.
    pub blob_ciphertexts_verified: u64,
    /// Chunked ciphertexts (PostgreSQL) whose chunks are all there and
    /// whose length and SHA-256 matched their head.
    pub chunked_ciphertexts_verified: u64,
    /// Bytes of ciphertext read and hashed.
    pub ciphertext_bytes: u64,
    /// Stored receipts examined (`receipts` rows and each message's own receipt).
    pub receipts: u64,
    /// Of those, the ones that verified and belong to their message.
    pub receipts_verified: u64,
    /// Provision records examined (`None`: the store has no provision table).
    pub provisions: Option<u64>,
    /// Provision receipts that verified (tied to their message when it is
    /// still stored; a purged message's receipt is verified on its own).
    pub provision_receipts_verified: u64,
    /// Audit log entries present (`None`: the store has no audit log).
    pub audit_entries: Option<u64>,
    /// Blob files no message row names: left by an accept that did not
    /// commit, or being accepted right now. Harmless (the daemon deletes
    /// orphans at its next start) and not counted as failures.
    pub orphan_blobs: Vec<String>,
    /// Everything that did not verify, in the order found.
    pub failures: Vec<Failure>,
}

impl VerifyStoreReport {
    /// True when nothing failed.
    pub fn is_ok(&self) -> bool {
        self.failures.is_empty()
    }

    fn fail(
        &mut self,
        message: Option<MessageId>,
        what: impl Into<String>,
        error: impl fmt::Display,
    ) {
        self.failures.push(Failure {
            message,
            what: what.into(),
            error: error.to_string(),
        });
    }
}

impl fmt::Display for VerifyStoreReport {
    /// One line saying what was checked.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A store has blob files (SQLite) or chunks (PostgreSQL).
        let (large, kind) = if self.chunked_ciphertexts_verified > 0 {
            (self.chunked_ciphertexts_verified, "chunked")
        } else {
            (self.blob_ciphertexts_verified, "blob files")
        };
        write!(
            f,
            "schema {}: {} message(s): {} head(s), {} ciphertext(s) ({} inline, {large} {kind}, {} bytes) \
             verified; {} of {} receipt(s) verified",
            self.schema_version,
            self.messages,
            self.heads_verified,
            self.inline_ciphertexts_verified
                + self.blob_ciphertexts_verified
                + self.chunked_ciphertexts_verified,
            self.inline_ciphertexts_verified,
            self.ciphertext_bytes,
            self.receipts_verified,
            self.receipts
        )?;
        match self.provisions {
            Some(n) => write!(
                f,
                "; {} of {n} provision receipt(s) verified",
                self.provision_receipts_verified
            )?,
            None => write!(f, "; no provision records (schema {})", self.schema_version)?,
        }
        match self.audit_entries {
            Some(n) => write!(f, "; audit log: {n} entries")?,
            None => write!(f, "; no audit log")?,
        }
        if !self.orphan_blobs.is_empty() {
            write!(f, "; {} orphan blob file(s)", self.orphan_blobs.len())?;
        }
        write!(f, "; {} failure(s)", self.failures.len())
    }
}

/// The network trust a daemon configured with `config` uses (anchors, CRLs,
/// the profile's revocation policy): what [`verify_store`] should check
/// against.
pub fn config_trust(config: &Config) -> Result<TrustStore, Error> {
    crate::node::trust_store(config, &config.trust.anchors, &config.trust.crls)
}

/// Re-verifies everything in the store at `store`, read-only (it may run
/// beside the daemon), with the checkpoint kept in `data_dir`: every envelope head (signature and sender chain at
/// the time it was received, against `trust`'s CRLs of today, as the daemon
/// does before serving it), every ciphertext against its head's length and
/// SHA-256 (inline rows, blob files and chunks, streamed), every stored receipt
/// (signature, issuer chain at its issue time, and that it is about that
/// message's head), every provision record's receipt, missing blob files
/// and missing chunks (chunks that do not add up to the message's
/// ciphertext length), and the audit log (each entry against its leaf
/// hash, the tree against every signed checkpoint).
///
/// It does not stop at the first failure: the report lists each one.
/// `Err` only when the store cannot be read at all.
pub fn verify_store(
    data_dir: &Path,
    store: &StoreLocation,
    trust: &TrustStore,
) -> Result<VerifyStoreReport, Error> {
    // Every read until `end_snapshot` sees one snapshot, taken at the
    // first read (after the kept checkpoint below is read).
    let mut store = crate::store::open_read_only(store, SchemaNeed::AnyKnown)?;
    let mut report = VerifyStoreReport::default();
    // Read before the snapshot: a running daemon replaces the file only
    // after the checkpoint it holds is committed.
    let kept = crate::accountability::read_kept_checkpoint(data_dir)?;
    let named = scrub(store.as_ref(), trust, kept.as_deref(), &mut report)?;
    store.end_snapshot()?;

    // Blob files no row of the snapshot names. One linked just before its
    // row committed (after the snapshot) is not an orphan: look again.
    let mut files = store.blob_files()?;
    files.retain(|name| !named.contains(name));
    files.sort();
    for name in files {
        if !store.is_blob_named(&name)? {
            report.orphan_blobs.push(name);
        }
    }
    Ok(report)
}

/// The checks inside the read transaction; returns the blob names rows use.
fn scrub(
    store: &dyn ReadOnlyStore,
    trust: &TrustStore,
    kept: Option<&[u8]>,
    report: &mut VerifyStoreReport,
) -> Result<BTreeSet<String>, StoreError> {
    report.schema_version = store.schema_version()?;
    let mut named = BTreeSet::new();
    for row in store.messages() {
        let RawMessage {
            key: id_bytes,
            message_id: wire_bytes,
            header_sha256,
            head: head_bytes,
            blob,
            ciphertext_len,
            received_ms,
            our_receipt,
        } = row?;
        report.messages += 1;
        let Ok(id) = MessageId::from_slice(&wire_bytes) else {
            report.fail(
                None,
                format!("message row {}", hex::encode(&id_bytes)),
                "id is not 16 bytes",
            );
            continue;
        };
        let head = verify_head(&head_bytes, received_ms, trust);
        let head = match head {
            Ok(h) => {
                report.heads_verified += 1;
                Some(h)
            }
            Err(e) => {
                report.fail(Some(id), "head (signature and sender chain)", e);
                None
            }
        };
        if let Some(h) = &head {
            if h.header().message_id != id {
                report.fail(
                    Some(id),
                    "head",
                    format!("signed for message {}", h.header().message_id),
                );
            }
            if h.head().header_sha256().as_slice() != header_sha256.as_slice() {
                report.fail(Some(id), "head", "header SHA-256 column does not match it");
            }
            if u64::try_from(ciphertext_len).ok() != Some(h.header().ciphertext_length()) {
                report.fail(
                    Some(id),
                    "ciphertext_len column",
                    format!(
                        "{ciphertext_len}, the head declares {}",
                        h.header().ciphertext_length()
                    ),
                );
            }
        }

        // The ciphertext, streamed through the head's verifier.
        match blob {
            Some(name) => {
                let what = format!("ciphertext (blob file {name})");
                if !valid_blob_name(&name) {
                    report.fail(Some(id), what, "not a valid blob name");
                } else {
                    let path = store.blob_path(&name);
                    named.insert(name);
                    match File::open(&path) {
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {
                            report.fail(Some(id), what, "file missing");
                        }
                        Err(e) => report.fail(Some(id), what, e),
                        Ok(file) => {
                            if let Some(h) = &head {
                                let mut r = Hashing::new(file);
                                match h.ciphertext_verifier().verify_stream(&mut r) {
                                    Ok(()) => report.blob_ciphertexts_verified += 1,
                                    Err(e) => report.fail(Some(id), what, e),
                                }
                                report.ciphertext_bytes += r.len;
                            }
                        }
                    }
                }
            }
            None => {
                let bytes = store.inline_ciphertext(&id_bytes)?;
                match (bytes, &head) {
                    (None, _) => match store.ciphertext_chunks(&id_bytes)? {
                        Some(chunks) => {
                            verify_chunks(chunks, id, ciphertext_len, head.as_ref(), report)?;
                        }
                        None => report.fail(
                            Some(id),
                            "ciphertext",
                            "neither inline ciphertext nor blob file nor chunks",
                        ),
                    },
                    (Some(bytes), Some(h)) => {
                        let mut v = h.ciphertext_verifier();
                        match v.update(&bytes).and_then(|()| v.finish()) {
                            Ok(()) => report.inline_ciphertexts_verified += 1,
                            Err(e) => report.fail(Some(id), "ciphertext (inline)", e),
                        }
                        report.ciphertext_bytes += bytes.len() as u64;
                    }
                    (Some(_), None) => {}
                }
            }
        }

        // Receipts: ours, and every one kept for the message.
        if let Some(bytes) = our_receipt {
            report.receipts += 1;
            match check_receipt(&bytes, head.as_ref(), trust) {
                Ok(()) => report.receipts_verified += 1,
                Err(e) => report.fail(Some(id), "our receipt (issued on accepting it)", e),
            }
        }
        for RawReceipt {
            seq,
            digest,
            signed,
        } in store.receipts_of(&id_bytes)?
        {
            report.receipts += 1;
            let what = format!("receipt #{seq}");
            if sha256(&signed).as_slice() != digest.as_slice() {
                report.fail(
                    Some(id),
                    what,
                    "its bytes do not match its stored digest (altered)",
                );
                continue;
            }
            match check_receipt(&signed, head.as_ref(), trust) {
                Ok(()) => report.receipts_verified += 1,
                Err(e) => report.fail(Some(id), what, e),
            }
        }
    }

    // Receipts whose message is not stored.
    for (seq, message) in store.orphan_receipts()? {
        report.receipts += 1;
        report.fail(
            MessageId::from_slice(&message).ok(),
            format!("receipt #{seq}"),
            "its message is not stored",
        );
    }

    verify_provisions(store, trust, report)?;

    report.audit_entries = store.audit_len()?;
    report.failures.extend(verify_audit_log(store, trust, kept));
    Ok(named)
}

/// A chunked ciphertext (PostgreSQL): the chunks must be numbered 0, 1,
/// 2 … and add up to the `ciphertext_len` column (else chunks are missing,
/// the equivalent of a missing blob file), and, when the head verified,
/// their bytes must be the ciphertext it signed.
fn verify_chunks(
    chunks: crate::store::Rows<'_, CiphertextChunk>,
    id: MessageId,
    ciphertext_len: i64,
    head: Option<&VerifiedHead>,
    report: &mut VerifyStoreReport,
) -> Result<(), StoreError> {
    let what = "ciphertext (chunked)";
    let mut verifier = head.map(VerifiedHead::ciphertext_verifier);
    let mut total = 0u64;
    let mut expected = 0i64;
    let mut broken: Option<String> = None;
    for chunk in chunks {
        let CiphertextChunk { n, data } = chunk?;
        if n != expected {
            broken.get_or_insert_with(|| format!("chunk {expected} is missing (next is {n})"));
        }
        expected = n.saturating_add(1);
        total += data.len() as u64;
        if let Some(v) = &mut verifier
            && let Err(e) = v.update(&data)
        {
            broken.get_or_insert_with(|| e.to_string());
            verifier = None;
        }
    }
    report.ciphertext_bytes += total;
    if u64::try_from(ciphertext_len).ok() != Some(total) {
        report.fail(
            Some(id),
            what,
            format!("chunks missing: the chunks hold {total} bytes of {ciphertext_len}"),
        );
        return Ok(());
    }
    if let Some(problem) = broken {
        report.fail(Some(id), what, problem);
        return Ok(());
    }
    if let Some(v) = verifier {
        match v.finish() {
            Ok(()) => report.chunked_ciphertexts_verified += 1,
            Err(e) => report.fail(Some(id), what, e),
        }
    }
    Ok(())
}

fn verify_head(
    head: &[u8],
    received_ms: i64,
    trust: &TrustStore,
) -> Result<VerifiedHead, exchange_core::Error> {
    let received = u64::try_from(received_ms).unwrap_or(0);
    EnvelopeHead::decode(head)?.verify_ignoring_expiry(trust, from_unix_ms(received))
}

/// Verifies a receipt (signature, issuer chain at its issue time) and, when
/// its message's head verified, that it is about that head.
fn check_receipt(
    bytes: &[u8],
    head: Option<&VerifiedHead>,
    trust: &TrustStore,
) -> Result<(), exchange_core::Error> {
    let receipt = SignedReceipt::from_bytes(bytes)?.verify(trust)?;
    if let Some(h) = head {
        receipt.check_for(h)?;
    }
    Ok(())
}

/// Every provision record's receipt (schema 2 on; absent tables are skipped).
fn verify_provisions(
    store: &dyn ReadOnlyStore,
    trust: &TrustStore,
    report: &mut VerifyStoreReport,
) -> Result<(), StoreError> {
    let Some(rows) = store.provision_evidence()? else {
        return Ok(());
    };
    let mut n = 0;
    for row in rows {
        let RawProvision {
            id: pid,
            message_key: message,
            message_id: wire,
            receipt,
        } = row?;
        n += 1;
        let id = MessageId::from_slice(&wire).ok();
        let what = format!("provision record {pid}: receipt");
        let Some(bytes) = receipt else {
            report.fail(id, what, "no receipt");
            continue;
        };
        let verified = match SignedReceipt::from_bytes(&bytes).and_then(|r| r.verify(trust)) {
            Ok(v) => v,
            Err(e) => {
                report.fail(id, what, e);
                continue;
            }
        };
        if Some(verified.message_id()) != id {
            report.fail(
                id,
                what,
                format!("is about message {}", verified.message_id()),
            );
            continue;
        }
        // Tied to the head while the message is stored (it may be purged).
        if let Some((head, received_ms)) = store.message_head(&message)? {
            match verify_head(&head, received_ms, trust) {
                Ok(h) => {
                    if let Err(e) = verified.check_for(&h) {
                        report.fail(id, what, e);
                        continue;
                    }
                }
                // Reported with the message itself.
                Err(_) => continue,
            }
        }
        report.provision_receipts_verified += 1;
    }
    report.provisions = Some(n);
    Ok(())
}

/// Verifies the tamper-evident audit log (schema 2 on): each `audit_log`
/// row's `seq` follows the one before, its `entry` parses and names that
/// `seq`, and its leaf hash recomputed from the entry equals `leaf_hash`;
/// the Merkle tree rebuilt in `seq` order from the recomputed leaf hashes
/// has, at every `audit_checkpoints` row's `tree_size`, that row's `root`
/// and `frontier`, and the row's signed checkpoint verifies against
/// `trust` (signature, signer chain at the checkpoint's time) and says the
/// same size and root; so each checkpoint is a prefix of the next.
///
/// `kept` is the signed checkpoint kept outside the database
/// (`checkpoint.latest` in the data directory), if there is one: it must
/// verify, the rebuilt tree must have its root at its size, and the
/// database must still hold a checkpoint at least that large (else
/// checkpoint rows were deleted, or the database was restored from an
/// older copy).
///
/// Returns no failure when the audit tables are absent (schema 1 stores).
/// A database error is reported as a failure too.
pub(crate) fn verify_audit_log(
    store: &dyn ReadOnlyStore,
    trust: &TrustStore,
    kept: Option<&[u8]>,
) -> Vec<Failure> {
    let mut failures = Vec::new();
    if let Err(e) = audit_checks(store, trust, kept, &mut failures) {
        failures.push(Failure {
            message: None,
            what: "audit log".into(),
            error: format!("cannot be read: {e}"),
        });
    }
    failures
}

fn audit_checks(
    store: &dyn ReadOnlyStore,
    trust: &TrustStore,
    kept: Option<&[u8]>,
    failures: &mut Vec<Failure>,
) -> Result<(), StoreError> {
    use exchange_core::audit::{AuditEntry, Frontier};

    if store.audit_len()?.is_none() {
        return Ok(());
    }
    let mut fail = |what: String, error: String| {
        failures.push(Failure {
            message: None,
            what,
            error,
        });
    };
    let checkpoints = store.checkpoints()?;
    // The copy outside the database: checked like a row, at its size.
    let kept_what = format!(
        "audit checkpoint kept in {}",
        crate::accountability::CHECKPOINT_FILE
    );
    let mut kept_at: Option<(u64, [u8; 32])> = None;
    if let Some(bytes) = kept {
        match exchange_core::audit::SignedCheckpoint::from_bytes(bytes)
            .and_then(|c| c.verify(trust))
        {
            Err(e) => fail(kept_what.clone(), format!("signature: {e}")),
            Ok(cp) => {
                let stored_max = checkpoints.last().map_or(0, |c| c.tree_size);
                if i64::try_from(cp.tree_size).unwrap_or(i64::MAX) > stored_max {
                    fail(
                        kept_what.clone(),
                        format!(
                            "covers {} entries but the database's latest checkpoint covers {stored_max}: \
                             signed checkpoints were deleted, or the database was restored from an older copy",
                            cp.tree_size
                        ),
                    );
                }
                if cp.tree_size == 0 {
                    if cp.root != exchange_core::audit::MerkleTree::from_leaf_hashes(vec![]).root()
                    {
                        fail(kept_what.clone(), "its root is not the empty tree's".into());
                    }
                } else {
                    kept_at = Some((cp.tree_size, cp.root));
                }
            }
        }
    }
    let mut pending = checkpoints.into_iter().peekable();
    let mut frontier = Frontier::new();
    for row in store.audit_entries(None, None) {
        let RawAuditEntry {
            seq,
            entry,
            leaf_hash: stored,
        } = row?;
        let what = format!("audit entry {seq}");
        if u64::try_from(seq).ok() != Some(frontier.size()) {
            fail(
                what.clone(),
                format!("expected entry {} here (a gap in the log)", frontier.size()),
            );
        }
        let leaf = match AuditEntry::from_json(&entry) {
            Ok(e) => {
                if u64::try_from(seq).ok() != Some(e.seq) {
                    fail(what.clone(), format!("the entry says seq {}", e.seq));
                }
                let h = e.leaf_hash();
                if h.as_slice() != stored.as_slice() {
                    fail(
                        what,
                        "its leaf hash does not match its entry (altered)".into(),
                    );
                }
                h
            }
            Err(e) => {
                fail(what, format!("unreadable entry: {e}"));
                <[u8; 32]>::try_from(stored.as_slice()).unwrap_or([0; 32])
            }
        };
        frontier.push(leaf);
        if let Some((size, root)) = kept_at
            && size == frontier.size()
        {
            kept_at = None;
            if root != frontier.root() {
                fail(
                    kept_what.clone(),
                    "its root is not the head of the entries before it (entries altered)".into(),
                );
            }
        }
        while let Some(next) = pending.peek() {
            if u64::try_from(next.tree_size).ok() != Some(frontier.size()) {
                break;
            }
            if let Some(RawCheckpoint {
                tree_size: size,
                root,
                signed,
                frontier: stored_frontier,
            }) = pending.next()
            {
                check_checkpoint(size, &root, &signed, frontier.root(), trust, &mut fail);
                if stored_frontier != frontier.to_bytes() {
                    fail(
                        format!("audit checkpoint at {size}"),
                        "its stored frontier is not the tree of the entries before it (rewritten)"
                            .into(),
                    );
                }
            }
        }
    }
    if let Some((size, _)) = kept_at {
        fail(
            kept_what,
            format!("covers {size} entries, the log holds {}", frontier.size()),
        );
    }
    for RawCheckpoint {
        tree_size: size, ..
    } in pending
    {
        fail(
            format!("audit checkpoint at {size}"),
            format!("covers {size} entries, the log holds {}", frontier.size()),
        );
    }
    Ok(())
}

fn check_checkpoint(
    size: i64,
    root: &[u8],
    signed: &[u8],
    rebuilt: [u8; 32],
    trust: &TrustStore,
    fail: &mut impl FnMut(String, String),
) {
    use exchange_core::audit::SignedCheckpoint;

    let what = format!("audit checkpoint at {size}");
    if root != rebuilt.as_slice() {
        fail(
            what.clone(),
            "its root is not the head of the entries before it (entries altered)".into(),
        );
    }
    match SignedCheckpoint::from_bytes(signed).and_then(|c| c.verify(trust)) {
        Err(e) => fail(what, format!("signature: {e}")),
        Ok(cp) => {
            if u64::try_from(size).ok() != Some(cp.tree_size) || cp.root != rebuilt {
                fail(
                    what,
                    format!(
                        "the signed checkpoint says size {} and another root",
                        cp.tree_size
                    ),
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Shared helpers.

fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

fn create_dir(dir: &Path) -> Result<(), StoreError> {
    let mut b = fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
        .map_err(|e| io_err("create directory", dir, e))
}

/// A temporary file or directory, removed on drop unless kept.
struct TempPath {
    path: PathBuf,
    dir: bool,
    keep: bool,
}

impl TempPath {
    fn name(parent: &Path, what: &str) -> Result<PathBuf, StoreError> {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r)
            .map_err(|e| io_err("random name in", parent, io::Error::other(e.to_string())))?;
        Ok(parent.join(format!(".{what}-{}.tmp", hex::encode(r))))
    }

    /// A new private directory (0700) in `parent`.
    fn new_dir(parent: &Path, what: &str) -> Result<Self, StoreError> {
        let path = Self::name(parent, what)?;
        create_dir(&path)?;
        Ok(Self {
            path,
            dir: true,
            keep: false,
        })
    }

    /// A name for a new file in `parent` (the caller creates it).
    fn new_file(parent: &Path, what: &str) -> Result<Self, StoreError> {
        Ok(Self {
            path: Self::name(parent, what)?,
            dir: false,
            keep: false,
        })
    }

    fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let _ = if self.dir {
            fs::remove_dir_all(&self.path)
        } else {
            fs::remove_file(&self.path)
        };
    }
}

/// A reader that hashes and counts what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Hasher,
    len: u64,
}

impl<R> Hashing<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Hasher::new(),
            len: 0,
        }
    }

    fn finish(self) -> [u8; 32] {
        self.hasher.finish()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn manifest_round_trip_and_strictness() {
        let m = Manifest {
            created_ms: 1,
            counts: StoreCounts {
                schema_version: 2,
                messages: 3,
                receipts: 4,
                deliveries: 5,
                blobs: 1,
                blob_bytes: 9,
                pseudonym_key: true,
                audit_entries: Some(7),
                provisions: None,
            },
            members: vec![Member {
                name: "blobs/00ab-cd".into(),
                size: 9,
                sha256: [7; 32],
            }],
        };
        let text = m.to_text();
        assert_eq!(Manifest::parse(&text).unwrap(), m);
        assert!(Manifest::parse(&text.replace("blobs/00ab-cd", "../etc/passwd")).is_err());
        assert!(Manifest::parse(&format!("{text}surprise 1\n")).is_err());
        assert!(Manifest::parse(&text.replace(FORMAT_LINE, "exchange-store-backup 2")).is_err());
    }

    #[test]
    fn only_expected_member_names() {
        for ok in [
            "store.sqlite3",
            "pseudonym.key",
            "MANIFEST",
            "blobs/0123-abcd",
        ] {
            assert!(allowed_member(ok), "{ok}");
        }
        for bad in [
            "../store.sqlite3",
            "/store.sqlite3",
            "blobs/../../x",
            "blobs/",
            "blobs/ABC",
            "blobs/a/b",
            "spool/x",
            "store.sqlite3-wal",
        ] {
            assert!(!allowed_member(bad), "{bad}");
        }
    }
}
