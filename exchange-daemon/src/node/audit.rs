//! Node's side of accountability: audit entries and their appending, the
//! patient pseudonyms of what it stores, provision records at the
//! boundary, signed checkpoints over the audit log, the retention purge,
//! and the task that runs the last two (the rules and the offline reports
//! are in [`crate::accountability`]).

use exchange_core::MessageId;
use exchange_core::audit::{
    AuditAction, AuditEntry, AuditOutcome, Checkpoint, Frontier, MAX_ACTOR, MAX_DETAIL, Pseudonym,
    SignedCheckpoint, log_text,
};
use exchange_core::envelope::{InnerMetadata, VerifiedHead};
use exchange_core::receipt::VerifiedReceipt;
use exchange_core::route::Provision;
use tokio::sync::watch;

use super::Node;
use crate::accountability::{
    CHECKPOINT_FILE, CHECKPOINT_INTERVAL, DAEMON, certificate_name, pseudonym,
    read_kept_checkpoint, write_kept_checkpoint,
};
use crate::clock::unix_ms;
use crate::error::{Error, StoreError};
use crate::store::{
    MessageKey, MessageMeta, MessageRecord, NewCheckpoint, NewProvision, ProvisionDirection,
};

impl Node {
    /// An audit entry by `actor`, dated now (its `seq` is set when it is
    /// appended, and its time raised to the last entry's if that is later).
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
            time_ms: unix_ms(self.now()),
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
                let size = kept.tree_size;
                let root = self.audit_root_at(size).await?;
                if root != Some(kept.root) {
                    return Err(history(format!(
                        "the first {size} entries are not those of the checkpoint kept in \
                         {CHECKPOINT_FILE} (entries altered)"
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
        let now = unix_ms(self.now());
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
        let now = unix_ms(self.now());
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

/// One checkpointer at a time (the periodic one and the one at shutdown),
/// so that [`CHECKPOINT_FILE`] only moves forward.
static CHECKPOINTING: std::sync::LazyLock<tokio::sync::Mutex<()>> =
    std::sync::LazyLock::new(|| tokio::sync::Mutex::new(()));

fn history(what: String) -> Error {
    Error::Store(StoreError::AuditHistory(what))
}

/// How often the retention purge runs (when retention is configured).
const PURGE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use exchange_core::audit::{AuditAction, AuditEntry, AuditOutcome};

    use crate::clock::{Clock, unix_ms};
    use crate::node::fixture;
    use crate::store::MessageKind;
    use crate::store::sqlite::tests::{inline, mid};

    const HOUR_MS: u64 = 3_600_000;

    /// The purge decides at the node's clock: a fetched inbox item is kept
    /// until its retention has passed, then purged, and the purge's audit
    /// entry is dated at that clock.
    #[tokio::test]
    async fn a_message_is_purged_once_the_clock_passes_its_retention() {
        let f = fixture::node("[retention]\nmessages_days = 30\n");
        let store = &f.node.store;
        let now = unix_ms(f.clock.now());
        // One fetched inbox item received 30 days less an hour ago, one
        // just now (the newest time the purge's clock check starts from).
        let (id, recent) = (mid(1), mid(2));
        for (id, received_ms) in [(id, now - 30 * 24 * HOUR_MS + HOUR_MS), (recent, now)] {
            let mut e = inline(id, MessageKind::Inbound);
            e.received_ms = received_ms;
            e.deliveries = Vec::new();
            store.accept(e).await.unwrap();
            let key = store.messages_by_id(id).await.unwrap()[0].key;
            store.mark_fetched(key, now).await.unwrap();
        }

        assert_eq!(f.node.purge_expired().await.unwrap(), 0, "purged early");
        assert_eq!(store.messages_by_id(id).await.unwrap().len(), 1);

        f.clock.advance(Duration::from_millis(2 * HOUR_MS));
        assert_eq!(f.node.purge_expired().await.unwrap(), 1);
        assert!(store.messages_by_id(id).await.unwrap().is_empty());
        assert_eq!(store.messages_by_id(recent).await.unwrap().len(), 1);
        let entries: Vec<AuditEntry> = store
            .audit_tail()
            .await
            .unwrap()
            .entries
            .iter()
            .map(|(_, e, _)| AuditEntry::from_json(e).unwrap())
            .collect();
        let [purge] = &entries[..] else {
            panic!("one purge entry expected: {entries:?}");
        };
        assert_eq!(purge.action, AuditAction::Purge);
        assert_eq!(purge.outcome, AuditOutcome::Ok);
        assert_eq!(purge.time_ms, unix_ms(f.clock.now()));
    }
}
