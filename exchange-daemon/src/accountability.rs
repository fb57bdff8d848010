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

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use exchange_core::MessageId;
use exchange_core::audit::{
    AuditAction, AuditEntry, AuditOutcome, Checkpoint, Frontier, MAX_ACTOR, MAX_DETAIL, Pseudonym,
    SignedCheckpoint, SubjectKey, log_text,
};
use exchange_core::envelope::{InnerMetadata, SubjectId, VerifiedHead};
use exchange_core::identity::Certificate;
use exchange_core::receipt::VerifiedReceipt;
use exchange_core::route::Provision;
use tokio::sync::watch;

use crate::clock::unix_ms;
use crate::error::{Error, StoreError};
use crate::node::Node;
use crate::store::{
    MessageKey, MessageMeta, MessageRecord, NewCheckpoint, NewProvision, ProvisionDirection,
    SchemaNeed, StoreLocation,
};

/// The facility secret's file name in the data directory.
pub const SUBJECT_KEY_FILE: &str = "pseudonym.key";

/// How often the checkpointer signs a new checkpoint when the log grew.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);

/// How often the retention purge runs (when retention is configured).
pub const PURGE_INTERVAL: Duration = Duration::from_secs(60);

/// The text a patient identifier is pseudonymised from: `SYSTEM`, a NUL,
/// `VALUE` (unambiguous: neither part may contain a control character).
pub fn subject_text(system: &str, value: &str) -> String {
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

/// Reads the facility's pseudonym key, creating it (32 random bytes, mode
/// 0600, written to a temporary file, fsynced, then linked into place so a
/// concurrent start cannot clobber it) if there is none and the store in
/// `data_dir` has no audit entry yet. A store that already has entries
/// refuses to start without its key: a new key would silently make every
/// earlier pseudonym unsearchable (restore the key from a backup).
///
/// This looks at the SQLite store in `data_dir`; a daemon on another store
/// calls [`load_or_create_subject_key_at`].
pub fn load_or_create_subject_key(data_dir: &Path) -> Result<SubjectKey, Error> {
    load_or_create_subject_key_at(data_dir, &StoreLocation::Dir(data_dir.to_owned()))
}

/// [`load_or_create_subject_key`] for the store at `store` (a PostgreSQL
/// database, or the SQLite store in a data directory): the key file is in
/// `data_dir` either way. A store without a schema yet counts as one
/// without entries; a database that cannot be reached is an error.
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

impl Node {
    /// An audit entry by `actor` (its `seq` and time are set when appended).
    /// The actor and the free text are bounded and escaped here
    /// ([`log_text`]): they may quote what a peer or a client sent.
    pub(crate) fn entry(
        &self,
        actor: &str,
        action: AuditAction,
        message: Option<MessageId>,
        outcome: AuditOutcome,
        reason: Option<&str>,
        detail: Option<String>,
    ) -> AuditEntry {
        AuditEntry {
            seq: 0,
            time_ms: 0,
            party: self.party.to_string(),
            actor: log_text(actor, MAX_ACTOR),
            action,
            message_id: message.map(|m| m.to_string()),
            subjects: Vec::new(),
            outcome,
            reason: reason.map(ToOwned::to_owned),
            detail: detail.map(|d| log_text(&d, MAX_DETAIL)),
            subject_set: None,
        }
    }

    /// An entry for a refusal of `actor`'s request.
    pub(crate) fn refusal(
        &self,
        actor: &str,
        action: AuditAction,
        message: Option<MessageId>,
        error: &Error,
    ) -> AuditEntry {
        self.entry(
            actor,
            action,
            message,
            AuditOutcome::Rejected,
            Some(error.reason_code()),
            Some(error.to_string()),
        )
    }

    /// An entry for a refusal of a peer's request about a message it only
    /// claims (an unverified head, receipts from off the route): the claimed
    /// id is named in the detail, not as the entry's message, so the entry
    /// is never linked to the patients of a stored message with that id.
    pub(crate) fn claimed_refusal(
        &self,
        actor: &str,
        action: AuditAction,
        claimed: Option<MessageId>,
        error: &Error,
    ) -> AuditEntry {
        let detail = match claimed {
            Some(id) => format!("claimed message id {id} (not verified): {error}"),
            None => error.to_string(),
        };
        self.entry(
            actor,
            action,
            None,
            AuditOutcome::Rejected,
            Some(error.reason_code()),
            Some(detail),
        )
    }

    /// Appends entries now (reads, refusals, daemon events).
    pub(crate) async fn audit(&self, entries: Vec<AuditEntry>) -> Result<(), Error> {
        Ok(self.store.append_audit(None, entries).await?)
    }

    /// Appends entries about the stored message with key `about` now: their
    /// patients are that message's (never another sender's message under
    /// the same id).
    pub(crate) async fn audit_about(
        &self,
        about: MessageKey,
        entries: Vec<AuditEntry>,
    ) -> Result<(), Error> {
        Ok(self.store.append_audit(Some(about), entries).await?)
    }

    /// Appends a refusal; a failure to record it is logged (the request is
    /// refused anyway).
    pub(crate) async fn audit_refusal(&self, entry: AuditEntry) {
        if let Err(e) = self.audit(vec![entry]).await {
            tracing::error!(error = %e, "cannot append a refusal to the audit log");
        }
    }

    /// What an envelope carries, with the identifiers pseudonymised.
    pub(crate) fn meta(&self, inner: &InnerMetadata) -> MessageMeta {
        let mut subjects: Vec<Pseudonym> = inner
            .subject_ids
            .iter()
            .map(|s| pseudonym(&self.subject_key, s))
            .collect();
        subjects.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        subjects.dedup();
        MessageMeta {
            document_type: inner.document_type.clone(),
            title: inner.title.clone(),
            subjects,
        }
    }

    /// The provision records `new` receipts complete for an outbound
    /// message, aligned with `new`: for each new receipt, the recipients
    /// whose boundary it marks (several recipients behind one third-party
    /// relay share its receipt, and each gets its own record).
    pub(crate) async fn boundary_provisions(
        &self,
        record: &MessageRecord,
        head: &VerifiedHead,
        new: &[VerifiedReceipt],
    ) -> Result<Vec<Vec<NewProvision>>, Error> {
        let mut out: Vec<Vec<NewProvision>> = vec![Vec::new(); new.len()];
        // Only a THIRD_PARTY custody receipt can be a boundary receipt; for
        // any other (an entrusted agent's ACCEPTED_FOR_RELAY, a REJECTED)
        // skip reading the stored receipts.
        if !new.iter().any(VerifiedReceipt::is_third_party_custody) {
            return Ok(out);
        }
        // Verified when they arrived: a later revocation of one's issuer
        // must not cost the new receipts their records.
        let mut all = self.stored_receipts(record, head).await?;
        let first_new = all.len();
        all.extend(new.iter().cloned());
        for p in head.route().provision_boundaries(&all) {
            let Provision::Passed { boundary, receipt } = p.provision else {
                continue;
            };
            let Some(slot) = receipt.checked_sub(first_new).and_then(|i| out.get_mut(i)) else {
                continue;
            };
            let r = &all[receipt];
            let audit = self.entry(
                DAEMON,
                AuditAction::Provision,
                Some(record.id),
                AuditOutcome::Ok,
                None,
                Some(format!(
                    "provided: responsibility passed to {} ({}) with its {} receipt issued at {} ms, for recipient {}",
                    boundary.party,
                    boundary.role,
                    r.disposition(),
                    unix_ms(r.issued()),
                    p.recipient
                )),
            );
            slot.push(NewProvision {
                direction: ProvisionDirection::Provided,
                counterparty: boundary.party.clone(),
                counterparty_name: certificate_name(r.issuer_certificate()),
                recipient: p.recipient.clone(),
                role: boundary.role.as_str().to_owned(),
                time_ms: unix_ms(r.issued()),
                receipt: r.signed().to_bytes(),
                audit: Some(audit),
            });
        }
        Ok(out)
    }

    /// Checks a checkpoint this daemon signed: with its identity
    /// certificate, or (after a rotation) with the chain it carries,
    /// path-validated against the trust anchors; it must be this party's.
    fn own_checkpoint(&self, bytes: &[u8]) -> Result<Checkpoint, Error> {
        let signed = SignedCheckpoint::from_bytes(bytes)?;
        let cp = match signed.verify_with_certificate(self.identity.certificate()) {
            Ok(cp) => cp,
            Err(_) => signed.verify(&self.trust())?,
        };
        if cp.party != self.party {
            return Err(history(format!("a checkpoint of {}", cp.party)));
        }
        Ok(cp)
    }

    /// The data directory (where the store and [`CHECKPOINT_FILE`] live).
    fn data_dir(&self) -> std::path::PathBuf {
        self.config.path(&self.config.data_dir)
    }

    /// Checks the audit log against what this daemon signed, without
    /// signing: the daemon runs it at start and refuses to start if the
    /// log was rewritten or signed checkpoints were deleted.
    pub(crate) async fn check_audit_history(&self) -> Result<(), Error> {
        self.verified_tail().await.map(|_| ())
    }

    /// The tree as last signed and the leaf hashes of the entries after
    /// it, every part checked against what this daemon signed: the stored
    /// frontier must have the latest signed checkpoint's size and root; the
    /// leaf hashes are recomputed from the entries' bytes (and must equal
    /// the stored ones); the checkpoint kept in [`CHECKPOINT_FILE`] must be
    /// the latest stored one or, if the daemon stopped between the commit
    /// and the file's update, the head of the first entries recomputed from
    /// their bytes.
    async fn verified_tail(&self) -> Result<(Frontier, Vec<[u8; 32]>), Error> {
        let tail = self.store.audit_tail().await?;
        let frontier = match &tail.checkpoint {
            Some((size, frontier, signed)) => {
                let cp = self.own_checkpoint(signed).map_err(|e| {
                    history(format!(
                        "the stored checkpoint of {size} entries does not verify: {e}"
                    ))
                })?;
                let f = Frontier::from_bytes(frontier)?;
                if cp.tree_size != *size || f.size() != *size || f.root() != cp.root {
                    return Err(history(format!(
                        "the stored frontier at {size} entries is not the tree that was signed"
                    )));
                }
                f
            }
            None => Frontier::new(),
        };
        let mut leaves = Vec::with_capacity(tail.entries.len());
        for (seq, entry, stored) in &tail.entries {
            let expected = frontier.size() + leaves.len() as u64;
            if *seq != expected {
                return Err(history(format!("entry {seq} where {expected} belongs")));
            }
            let leaf = exchange_core::suite::merkle_leaf_hash(entry);
            if &leaf != stored {
                return Err(history(format!(
                    "entry {seq} does not match its stored leaf hash"
                )));
            }
            leaves.push(leaf);
        }
        let data_dir = self.data_dir();
        if let Some(kept) = read_kept_checkpoint(&data_dir)? {
            let kept = self
                .own_checkpoint(&kept)
                .map_err(|e| history(format!("{CHECKPOINT_FILE} does not verify: {e}")))?;
            if kept.tree_size > frontier.size() {
                return Err(history(format!(
                    "the latest signed checkpoint ({} entries, kept in {CHECKPOINT_FILE}) is not in \
                     the database, whose latest covers {}: checkpoints were deleted or the database \
                     was restored from an older copy",
                    kept.tree_size,
                    frontier.size()
                )));
            }
            if kept.tree_size == frontier.size() {
                if kept.root != frontier.root() {
                    return Err(history(format!(
                        "the checkpoint kept in {CHECKPOINT_FILE} has another root than the \
                         stored one at {} entries",
                        kept.tree_size
                    )));
                }
            } else {
                let root = self.audit_root_at(kept.tree_size).await?;
                if root != Some(kept.root) {
                    return Err(history(format!(
                        "the first {} entries are not those of the checkpoint kept in \
                         {CHECKPOINT_FILE} (entries altered)",
                        kept.tree_size
                    )));
                }
            }
        }
        Ok((frontier, leaves))
    }

    /// The root of the tree over the first `size` entries, recomputed from
    /// their stored bytes a page at a time (whichever daemon stored them:
    /// replicas on a shared store sign checkpoints in turn); `None` if the
    /// log has fewer entries or a gap.
    async fn audit_root_at(&self, size: u64) -> Result<Option<[u8; 32]>, Error> {
        const PAGE: usize = 4096;
        let mut frontier = Frontier::new();
        while frontier.size() < size {
            let left = usize::try_from(size - frontier.size()).unwrap_or(usize::MAX);
            let page = self
                .store
                .audit_entries(frontier.size(), PAGE.min(left))
                .await?;
            if page.is_empty() {
                return Ok(None);
            }
            for (seq, entry) in page {
                if seq != frontier.size() {
                    return Ok(None);
                }
                frontier.push(exchange_core::suite::merkle_leaf_hash(&entry));
            }
        }
        Ok(Some(frontier.root()))
    }

    /// Signs a checkpoint over the whole log if it grew since the last one;
    /// returns the new tree size. The tree is extended only from a state
    /// checked against what was signed before ([`Self::check_audit_history`]'s
    /// rules): a rewritten log, frontier or deleted checkpoint is an
    /// [`StoreError::AuditHistory`] error and nothing is signed. The new
    /// checkpoint is stored, then written to [`CHECKPOINT_FILE`].
    pub(crate) async fn checkpoint(&self) -> Result<Option<u64>, Error> {
        let _one_at_a_time = CHECKPOINTING.lock().await;
        let (mut frontier, leaves) = self.verified_tail().await?;
        if leaves.is_empty() {
            return Ok(None);
        }
        for h in leaves {
            frontier.push(h);
        }
        let now = unix_ms(SystemTime::now());
        let checkpoint = Checkpoint {
            party: self.party.clone(),
            tree_size: frontier.size(),
            root: frontier.root(),
            time_ms: now,
        };
        let signed = SignedCheckpoint::sign(&self.identity, &checkpoint)?;
        let bytes = signed.to_bytes();
        let stored = self
            .store
            .add_checkpoint(NewCheckpoint {
                tree_size: checkpoint.tree_size,
                time_ms: now,
                root: checkpoint.root,
                frontier: frontier.to_bytes(),
                signed: bytes.clone(),
            })
            .await?;
        if stored {
            let dir = self.data_dir();
            tokio::task::spawn_blocking(move || write_kept_checkpoint(&dir, &bytes))
                .await
                .map_err(|e| history(format!("writing {CHECKPOINT_FILE}: {e}")))??;
        }
        Ok(stored.then_some(checkpoint.tree_size))
    }

    /// Removes messages older than the retention period (if one is set),
    /// recording what went in the audit log. Inbox items never fetched,
    /// sent or relayed messages within the receipt grace period, and
    /// everything while the clock is too far ahead of the newest time a
    /// purge accepted, are kept.
    pub(crate) async fn purge_expired(&self) -> Result<usize, Error> {
        let retention = &self.config.retention;
        let Some(days) = retention.messages_days else {
            return Ok(0);
        };
        let day_ms = |d: u64| d.saturating_mul(86_400_000);
        let now = unix_ms(SystemTime::now());
        let policy = crate::store::PurgePolicy {
            now_ms: now,
            received_before_ms: now.saturating_sub(day_ms(days)),
            receipt_grace_ms: day_ms(retention.receipt_grace_days),
            max_clock_jump_ms: retention.max_clock_jump_seconds.saturating_mul(1000),
        };
        let mut total = 0;
        loop {
            let entry = self.entry(
                DAEMON,
                AuditAction::Purge,
                None,
                AuditOutcome::Ok,
                None,
                Some(format!("retention {days} day(s)")),
            );
            let suspended = self.entry(
                DAEMON,
                AuditAction::Purge,
                None,
                AuditOutcome::Failed,
                Some("clock-jump"),
                Some(format!(
                    "purge suspended: the clock is more than {} s ahead of the newest time a purge accepted",
                    retention.max_clock_jump_seconds
                )),
            );
            let purged = self.store.purge(policy, entry, suspended).await?;
            if let Some(jump) = purged.clock_jump {
                tracing::error!(
                    last_accepted_ms = jump.last_ms,
                    now_ms = jump.now_ms,
                    max_clock_jump_seconds = retention.max_clock_jump_seconds,
                    "retention purge suspended: the clock jumped forward; nothing purged \
                     (fix the clock, or after a long downtime raise retention.max_clock_jump_seconds once)"
                );
                return Ok(total);
            }
            if purged.messages.is_empty() {
                return Ok(total);
            }
            total += purged.messages.len();
            tracing::info!(
                messages = purged.messages.len(),
                bytes = purged.bytes,
                retention_days = days,
                "retention purge"
            );
        }
    }
}

/// The file in the data directory that keeps a copy of the latest signed
/// checkpoint outside the database (its signed form), replaced atomically
/// after each new checkpoint is stored: deleting checkpoint rows or
/// rewriting the log behind the daemon's back is detected against it.
pub const CHECKPOINT_FILE: &str = "checkpoint.latest";

/// One checkpointer at a time (the periodic one and the one at shutdown),
/// so that [`CHECKPOINT_FILE`] only moves forward.
static CHECKPOINTING: std::sync::LazyLock<tokio::sync::Mutex<()>> =
    std::sync::LazyLock::new(|| tokio::sync::Mutex::new(()));

fn history(what: String) -> Error {
    Error::Store(StoreError::AuditHistory(what))
}

/// The signed checkpoint kept in `data_dir`'s [`CHECKPOINT_FILE`], if any.
pub fn read_kept_checkpoint(data_dir: &Path) -> Result<Option<Vec<u8>>, Error> {
    let path = data_dir.join(CHECKPOINT_FILE);
    match fs::read(&path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::ReadFile { path, source }),
    }
}

/// Replaces [`CHECKPOINT_FILE`] with `signed`: a temporary file, fsynced,
/// renamed into place, the directory fsynced.
fn write_kept_checkpoint(data_dir: &Path, signed: &[u8]) -> Result<(), Error> {
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

/// Signs checkpoints every [`CHECKPOINT_INTERVAL`] and purges expired
/// messages every [`PURGE_INTERVAL`] until `stop`.
pub(crate) async fn run(node: std::sync::Arc<Node>, mut stop: watch::Receiver<bool>) {
    let mut last_purge: Option<tokio::time::Instant> = None;
    loop {
        if last_purge.is_none_or(|t| t.elapsed() >= PURGE_INTERVAL) {
            last_purge = Some(tokio::time::Instant::now());
            if let Err(e) = node.purge_expired().await {
                tracing::error!(error = %e, "retention purge failed");
            }
        }
        match node.checkpoint().await {
            Ok(Some(size)) => tracing::debug!(size, "audit checkpoint signed"),
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "cannot sign an audit checkpoint"),
        }
        tokio::select! {
            () = tokio::time::sleep(CHECKPOINT_INTERVAL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
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
pub const MAX_EXPORTED_CHECKPOINTS: usize = 1000;

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
