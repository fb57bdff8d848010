//! Durable store: envelopes as received (still sealed and signed), the work
//! queue of deliveries, and every receipt (DESIGN.md §6).
//!
//! The [`Store`] trait is what the daemon calls; [`sqlite::SqliteStore`] is
//! the embedded default. The trait is written for a shared backend too
//! (PostgreSQL with several daemon replicas): work is *claimed* with a lease
//! by an owner name, so two replicas never deliver the same item at once and
//! a crashed replica's claims lapse.
//!
//! Guarantees every backend gives:
//!
//! * a call that returns `Ok` is durable (committed and fsynced);
//! * [`Store::accept`] stores the envelope row, its ciphertext and its first
//!   deliveries atomically: after a crash either all exist or none;
//! * a received envelope is identified by its sender *and* its message id:
//!   accepting a (sender, message id) already stored changes nothing and
//!   returns the stored record ([`Accepted::Duplicate`]): receiving is
//!   idempotent; so is accepting the (sender, id) of a purged message until
//!   its expiry ([`Accepted::Purged`]). Another sender's envelope under the
//!   same message id is a different message, stored beside it: a sender
//!   cannot squat an id that another sender's envelope will carry;
//! * each stored message has an opaque local [`MessageKey`], which every
//!   other row about it references; lookups by what a peer or a client
//!   names go through (sender, message id) ([`Store::find`]) or list every
//!   sender's message under an id ([`Store::messages_by_id`]);
//! * receipts are kept once each (by the SHA-256 of their bytes).
//!
//! The store does not interpret envelopes or receipts: the daemon verifies
//! them with exchange-core before they get here, and again when it reads them.

pub mod postgres;
pub mod sqlite;
mod values;

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::future::Future;
use std::io::Read;
use std::path::PathBuf;
use std::pin::Pin;

use exchange_core::audit::{AuditEntry, Pseudonym};
use exchange_core::{MessageId, PartyUri};

use crate::error::StoreError;

/// A boxed future returned by [`Store`] methods.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// The local key of a stored message: opaque, unique in the store, never
/// reused (not even after a retention purge). It is not the message id
/// (two senders' envelopes may carry the same id); a message stored before
/// keys existed, and most messages since, have their message id as key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageKey([u8; 16]);

impl MessageKey {
    /// A key from its 16 bytes.
    pub fn from_bytes(b: [u8; 16]) -> Self {
        Self(b)
    }

    /// Its 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The key equal to a message id (the key a message gets when its id is
    /// not yet used as a key).
    pub fn of_id(id: MessageId) -> Self {
        Self(*id.as_bytes())
    }
}

impl fmt::Display for MessageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for MessageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageKey({self})")
    }
}

/// Why this daemon holds an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// A local client sent it: we are the origin.
    Outbound,
    /// We are a relay on its route: we forward it.
    Relay,
    /// We are a final recipient: it is in our inbox.
    Inbound,
}

impl MessageKind {
    /// Stable name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Relay => "relay",
            Self::Inbound => "inbound",
        }
    }

    /// Parses [`as_str`](Self::as_str).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "outbound" => Some(Self::Outbound),
            "relay" => Some(Self::Relay),
            "inbound" => Some(Self::Inbound),
            _ => None,
        }
    }
}

/// The ciphertext of an envelope being stored.
pub enum Ciphertext {
    /// Small: kept in the database row (batched commits, no extra fsync).
    Inline(Vec<u8>),
    /// Large: a spool file from [`Store::spool`], already fully written.
    /// The store fsyncs it and moves it into its blob directory before the
    /// row that names it commits.
    Spooled(SpoolFile),
}

impl fmt::Debug for Ciphertext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Inline(v) => write!(f, "Inline({} bytes)", v.len()),
            Self::Spooled(s) => write!(f, "Spooled({})", s.path.display()),
        }
    }
}

/// A temporary file in the store's spool directory. Removed on drop unless
/// the store took it over.
#[derive(Debug)]
pub struct SpoolFile {
    /// Where it is.
    pub path: PathBuf,
    /// The open file (write ciphertext here).
    pub file: File,
    pub(crate) kept: bool,
}

impl SpoolFile {
    /// Wraps a freshly created spool file.
    pub fn new(path: PathBuf, file: File) -> Self {
        Self {
            path,
            file,
            kept: false,
        }
    }
}

impl Drop for SpoolFile {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_file(&self.path);
        }
        crate::failpoints::forgotten(&self.path);
    }
}

/// What travels on a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryKind {
    /// The envelope, to the next hop.
    Envelope,
    /// One signed receipt, back towards the origin.
    Receipt(Vec<u8>),
}

/// A delivery to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDelivery {
    /// The party to deliver to.
    pub target: PartyUri,
    /// What to deliver.
    pub kind: DeliveryKind,
    /// Give up (state FAILED) after this time (Unix ms).
    pub expires_ms: u64,
}

/// An envelope to store.
#[derive(Debug)]
pub struct NewEnvelope {
    /// Message id (with `sender`, what identifies it; the store picks its key).
    pub id: MessageId,
    /// SHA-256 of the signed header bytes (tells two envelopes with one id apart).
    pub header_sha256: [u8; 32],
    /// Why we hold it.
    pub kind: MessageKind,
    /// The envelope head, network form, exactly as received.
    pub head: Vec<u8>,
    /// Ciphertext, exactly as received.
    pub ciphertext: Ciphertext,
    /// Ciphertext length in bytes.
    pub ciphertext_len: u64,
    /// The (verified) sending party.
    pub sender: PartyUri,
    /// The peer that delivered it to us (relay, inbound).
    pub upstream: Option<PartyUri>,
    /// The local client that sent it (outbound): its certificate's party URI.
    pub local_client: Option<String>,
    /// Content type from the header.
    pub content_type: String,
    /// Purpose from the header.
    pub purpose: String,
    /// Header created time (Unix ms).
    pub created_ms: u64,
    /// Header expiry (Unix ms).
    pub expires_ms: u64,
    /// When we accepted it (Unix ms).
    pub received_ms: u64,
    /// The receipt we issued on accepting it (relay, inbound).
    pub our_receipt: Option<Vec<u8>>,
    /// Work created with it: forwarding to the next hops.
    pub deliveries: Vec<NewDelivery>,
    /// Final recipients whose answer (a DELIVERED, PROCESSED or REJECTED
    /// receipt of their own) a sent or relayed message awaits: the purge
    /// keeps it until each has answered or the receipt grace period after
    /// its expiry has passed. Empty for an inbox item.
    pub awaited: Vec<PartyUri>,
    /// What it carries, as far as this facility can tell (origin and final
    /// recipient; a relay cannot open it): kept for provision records.
    pub meta: Option<MessageMeta>,
    /// The record of receipt (確認記録) a final recipient keeps.
    pub provision: Option<NewProvision>,
    /// Audit entries committed with it (only if it is newly stored).
    pub audit: Vec<AuditEntry>,
    /// The idempotency key of the Send that made it (outbound only),
    /// stored with it in the same transaction.
    pub send_key: Option<SendKey>,
}

/// A local client's idempotency key for one Send, and what that Send asked
/// for: a repeat with the same key is the same request only if it asks for
/// exactly the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendKey {
    /// The client (its certificate's party URI): keys are per client.
    pub client: String,
    /// The key the client chose.
    pub key: String,
    /// SHA-256 over the Send's parameters and its plaintext.
    pub request_sha256: [u8; 32],
}

/// A stored idempotency key: the Send it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendKeyRecord {
    /// The message id of the message that Send made.
    pub message_id: MessageId,
    /// SHA-256 over that Send's parameters and its plaintext.
    pub request_sha256: [u8; 32],
    /// Its ciphertext length.
    pub ciphertext_len: u64,
}

/// What an envelope carries (from the inner header), minus the clear
/// patient identifiers: those are kept only as pseudonyms.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MessageMeta {
    /// Document type from the inner header.
    pub document_type: String,
    /// Title from the inner header.
    pub title: String,
    /// Keyed pseudonyms of the patient identifiers.
    pub subjects: Vec<Pseudonym>,
}

/// Which side of a provision a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProvisionDirection {
    /// We provided the data (第三者提供記録): kept by the origin when the
    /// boundary receipt arrives.
    Provided,
    /// We received it (確認記録): kept by the final recipient on accepting it.
    Received,
}

impl ProvisionDirection {
    /// Stable name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Provided => "provided",
            Self::Received => "received",
        }
    }

    /// Parses [`as_str`](Self::as_str).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "provided" => Some(Self::Provided),
            "received" => Some(Self::Received),
            _ => None,
        }
    }
}

/// A provision record to keep. What was provided (document type, title,
/// purpose, patients) is taken from the message's stored meta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewProvision {
    /// Provided or received.
    pub direction: ProvisionDirection,
    /// The other party: who took responsibility (provided) or who provided it (received).
    pub counterparty: PartyUri,
    /// Its name, from its certificate.
    pub counterparty_name: String,
    /// The final recipient the data was for.
    pub recipient: PartyUri,
    /// The counterparty's role on the route (`THIRD_PARTY` …).
    pub role: String,
    /// When responsibility passed: the receipt's issue time (Unix ms).
    pub time_ms: u64,
    /// The evidence: the boundary receipt (provided), or the DELIVERED
    /// receipt we issued (received).
    pub receipt: Vec<u8>,
    /// Appended only if the record is new.
    pub audit: Option<AuditEntry>,
}

/// A stored provision record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionRecord {
    /// Provided or received.
    pub direction: ProvisionDirection,
    /// The message's id (its sender: `counterparty` for a received one,
    /// this facility for a provided one).
    pub message_id: MessageId,
    /// When responsibility passed (Unix ms).
    pub time_ms: u64,
    /// The other party.
    pub counterparty: PartyUri,
    /// Its name from its certificate.
    pub counterparty_name: String,
    /// The final recipient.
    pub recipient: PartyUri,
    /// The counterparty's role.
    pub role: String,
    /// Document type.
    pub document_type: String,
    /// Title.
    pub title: String,
    /// Purpose (legal basis) from the header.
    pub purpose: String,
    /// Content type.
    pub content_type: String,
    /// The receipt (evidence).
    pub receipt: Vec<u8>,
    /// Patient pseudonyms.
    pub subjects: Vec<Pseudonym>,
}

/// The audit log's tail not yet covered by a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditTail {
    /// The latest checkpoint: its tree size, its stored frontier and its
    /// signed form. Nothing here is trusted: the frontier is checked
    /// against the signed root before it is extended.
    pub checkpoint: Option<(u64, Vec<u8>, Vec<u8>)>,
    /// The entries after it, in order: seq, stored entry bytes (the leaf
    /// data: its hash is recomputed from them) and stored leaf hash.
    pub entries: Vec<(u64, Vec<u8>, [u8; 32])>,
}

/// A signed checkpoint to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCheckpoint {
    /// Entries covered.
    pub tree_size: u64,
    /// Signed at (Unix ms).
    pub time_ms: u64,
    /// Root hash.
    pub root: [u8; 32],
    /// The compact frontier at `tree_size` (to extend the tree later).
    pub frontier: Vec<u8>,
    /// `SignedCheckpoint::to_bytes()`.
    pub signed: Vec<u8>,
}

/// What a retention purge may remove, and the clock it runs by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurgePolicy {
    /// The wall clock now (Unix ms).
    pub now_ms: u64,
    /// Messages received before this are due (now minus the retention period).
    pub received_before_ms: u64,
    /// Sent and relayed messages are kept until this long after their
    /// expiry, for receipts still on their way (ms).
    pub receipt_grace_ms: u64,
    /// Nothing is purged while `now_ms` is more than this far beyond the
    /// newest time a purge accepted (ms).
    pub max_clock_jump_ms: u64,
}

/// The clock was too far ahead of the newest time a purge accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockJump {
    /// The newest time a purge accepted (Unix ms).
    pub last_ms: u64,
    /// The clock now (Unix ms).
    pub now_ms: u64,
    /// True the first time this suspension was seen (its audit entry was
    /// written now).
    pub first: bool,
}

/// What a retention purge removed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PurgeSummary {
    /// Messages removed (their message ids).
    pub messages: Vec<MessageId>,
    /// Ciphertext bytes removed.
    pub bytes: u64,
    /// Set when nothing was purged because the clock jumped forward.
    pub clock_jump: Option<ClockJump>,
}

/// What remains of a purged message: enough to answer a redelivery of it
/// until it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgedRecord {
    /// Message id.
    pub id: MessageId,
    /// Sending party.
    pub sender: PartyUri,
    /// SHA-256 of the signed header bytes.
    pub header_sha256: [u8; 32],
    /// Expires (Unix ms): the record is kept until then.
    pub expires_ms: u64,
    /// The receipt we issued on accepting it (relay, inbound).
    pub our_receipt: Option<Vec<u8>>,
    /// When it was purged (Unix ms).
    pub purged_ms: u64,
}

/// A stored envelope's row (without its ciphertext).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRecord {
    /// Its local key.
    pub key: MessageKey,
    /// Message id (unique with `sender`).
    pub id: MessageId,
    /// SHA-256 of the signed header bytes.
    pub header_sha256: [u8; 32],
    /// Why we hold it.
    pub kind: MessageKind,
    /// The envelope head, network form.
    pub head: Vec<u8>,
    /// Ciphertext length.
    pub ciphertext_len: u64,
    /// Sending party.
    pub sender: PartyUri,
    /// Who delivered it to us.
    pub upstream: Option<PartyUri>,
    /// Which local client sent it.
    pub local_client: Option<String>,
    /// Content type.
    pub content_type: String,
    /// Purpose.
    pub purpose: String,
    /// Created (Unix ms).
    pub created_ms: u64,
    /// Expires (Unix ms).
    pub expires_ms: u64,
    /// Accepted (Unix ms).
    pub received_ms: u64,
    /// The receipt we issued on accepting it.
    pub our_receipt: Option<Vec<u8>>,
    /// When a local client acknowledged it (inbound).
    pub acked_ms: Option<u64>,
    /// When a local client last completed a fetch of it (inbound).
    pub fetched_ms: Option<u64>,
}

/// Result of [`Store::accept`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// Newly stored.
    Stored,
    /// The (sender, id) was already stored; nothing changed. The stored record.
    Duplicate(Box<MessageRecord>),
    /// The (sender, id) was stored and purged since, and has not expired;
    /// nothing changed. What remains of it.
    Purged(Box<PurgedRecord>),
}

/// State of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryState {
    /// Waiting for its next attempt (or being attempted).
    Pending,
    /// The target took it (a custody receipt came back, or the receipt was stored).
    Done,
    /// Given up: expired or refused, with the reason.
    Failed(String),
}

impl DeliveryState {
    /// `PENDING`, `DELIVERED` or `FAILED`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Done => "DELIVERED",
            Self::Failed(_) => "FAILED",
        }
    }
}

/// A delivery as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRecord {
    /// Row id.
    pub id: i64,
    /// The message's local key.
    pub message: MessageKey,
    /// The message's id (what a peer knows it by).
    pub message_id: MessageId,
    /// Target party.
    pub target: PartyUri,
    /// What it carries.
    pub kind: DeliveryKind,
    /// Where it stands.
    pub state: DeliveryState,
    /// Attempts made so far.
    pub attempts: u32,
    /// Next attempt (Unix ms).
    pub next_attempt_ms: u64,
    /// Error of the last failed attempt.
    pub last_error: Option<String>,
    /// Give up after (Unix ms).
    pub expires_ms: u64,
    /// The fencing token of its latest claim: it grows with every claim,
    /// and only the holder of the current one may renew the claim or
    /// record the attempt's outcome (0: never claimed).
    pub claim: u64,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// Delivered.
    Done,
    /// Failed for now; try again at `next_attempt_ms`.
    Retry {
        /// Why it failed.
        error: String,
        /// When to try next (Unix ms).
        next_attempt_ms: u64,
    },
    /// Failed for good.
    Failed(String),
}

/// A receipt to keep, with the deliveries it causes (a relay passes every
/// new receipt on upstream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewReceipt {
    /// The signed receipt bytes (already verified by the caller).
    pub signed: Vec<u8>,
    /// Its issuer.
    pub issuer: PartyUri,
    /// Its disposition name (`DELIVERED` …).
    pub disposition: String,
    /// Issued (Unix ms).
    pub issued_ms: u64,
    /// When its signature and issuer chain verified (Unix ms): it is read
    /// back without checking them again.
    pub verified_ms: u64,
    /// Created only if the receipt is new to the store.
    pub forward: Option<NewDelivery>,
    /// Kept only if the receipt is new: the provision records it proves
    /// (one per recipient whose boundary it marks; several recipients can
    /// share one boundary, a third-party relay).
    pub provisions: Vec<NewProvision>,
    /// Appended only if the receipt is new.
    pub audit: Option<AuditEntry>,
}

/// A stored receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptRecord {
    /// The signed receipt bytes.
    pub signed: Vec<u8>,
    /// Issuer.
    pub issuer: PartyUri,
    /// Disposition name.
    pub disposition: String,
    /// Issued (Unix ms).
    pub issued_ms: u64,
    /// When its signature and issuer chain verified, before it was stored
    /// (Unix ms); `None` for a receipt stored before that was recorded.
    pub verified_ms: Option<u64>,
}

/// Ciphertext to read back.
#[derive(Debug)]
pub enum StoredCiphertext {
    /// Kept in the row.
    Inline(Vec<u8>),
    /// Kept in a blob file.
    File(PathBuf),
    /// Kept by the backend in pieces, read one piece at a time.
    Source(std::sync::Arc<dyn CiphertextSource>),
}

/// A ciphertext a backend streams from wherever it keeps it (the
/// PostgreSQL store: chunks in the database). Its reader blocks: read it
/// on the blocking thread pool, as the daemon does every ciphertext.
pub trait CiphertextSource: fmt::Debug + Send + Sync {
    /// A reader from the first byte; an error if the ciphertext is gone
    /// or shorter than its row says.
    fn open(&self) -> std::io::Result<Box<dyn Read + Send>>;
}

impl StoredCiphertext {
    /// A reader over the ciphertext.
    pub fn reader(&self) -> std::io::Result<Box<dyn Read + Send>> {
        match self {
            Self::Inline(v) => Ok(Box::new(std::io::Cursor::new(v.clone()))),
            Self::File(p) => Ok(Box::new(std::io::BufReader::with_capacity(
                256 * 1024,
                File::open(p)?,
            ))),
            Self::Source(s) => s.open(),
        }
    }
}

/// A change to the store, announced to the replicas that share it (see
/// [`Store::changes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreChange {
    /// A delivery is due and unclaimed: stored, or given back by a replica
    /// that let its claim go.
    Work,
    /// A message's delivery state changed or a receipt for it was stored:
    /// its status may read differently.
    Message(MessageKey),
}

/// The durable store.
pub trait Store: Send + Sync + 'static {
    /// A new spool file for a large ciphertext (see [`Ciphertext::Spooled`]).
    fn spool(&self) -> Result<SpoolFile, StoreError>;

    /// Stores an envelope with its deliveries, atomically and durably,
    /// under a new key; a (sender, id) already stored changes nothing.
    /// Once polled, it runs to its end even if the returned future is
    /// dropped: the envelope is then stored or not, and a spooled
    /// ciphertext is either named by its row or removed, never left behind.
    fn accept(&self, envelope: NewEnvelope) -> StoreFuture<'_, Accepted>;

    /// The row of one message.
    fn message(&self, key: MessageKey) -> StoreFuture<'_, Option<MessageRecord>>;

    /// The message `sender` sent under `id`, if stored.
    fn find(&self, sender: PartyUri, id: MessageId) -> StoreFuture<'_, Option<MessageRecord>>;

    /// Every stored message under `id`, whoever sent it, oldest first.
    fn messages_by_id(&self, id: MessageId) -> StoreFuture<'_, Vec<MessageRecord>>;

    /// The Send a client made under an idempotency key, if it is still kept
    /// (until its envelope's expiry).
    fn send_key(&self, client: String, key: String) -> StoreFuture<'_, Option<SendKeyRecord>>;

    /// One message's ciphertext.
    fn ciphertext(&self, key: MessageKey) -> StoreFuture<'_, StoredCiphertext>;

    /// Claims up to `limit` due pending deliveries for `owner` until
    /// `lease_until_ms`; nobody else gets them before then.
    fn claim_due(
        &self,
        owner: &str,
        now_ms: u64,
        lease_until_ms: u64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<DeliveryRecord>> {
        self.claim_fair(
            owner,
            now_ms,
            lease_until_ms,
            limit,
            usize::MAX,
            HashMap::new(),
        )
    }

    /// [`Store::claim_due`], fair across next hops: targets take turns
    /// (each one's oldest due item first, then each one's second …), and
    /// no target gets more than `per_target` items counting the `busy`
    /// ones it already has running.
    fn claim_fair(
        &self,
        owner: &str,
        now_ms: u64,
        lease_until_ms: u64,
        limit: usize,
        per_target: usize,
        busy: HashMap<PartyUri, usize>,
    ) -> StoreFuture<'_, Vec<DeliveryRecord>>;

    /// Extends `owner`'s claims on pending deliveries (attempts still
    /// running), each named by its id and the fencing token its claim
    /// returned ([`DeliveryRecord::claim`]), until `lease_until_ms`;
    /// returns how many it extended (a claim taken over since is not).
    fn renew_claims(
        &self,
        owner: &str,
        claims: Vec<(i64, u64)>,
        lease_until_ms: u64,
    ) -> StoreFuture<'_, u64>;

    /// Releases `owner`'s claims on these deliveries (id and fencing
    /// token), if they still hold: a claim taken and then not attempted.
    fn release_claim(&self, owner: &str, claims: Vec<(i64, u64)>) -> StoreFuture<'_, u64>;

    /// Releases every claim `owner` holds (a single-node daemon at start).
    fn release_claims(&self, owner: &str) -> StoreFuture<'_, u64>;

    /// Records an attempt's outcome with the receipts it brought back and
    /// its audit entries, atomically. Only a pending delivery changes. A
    /// retry or a failure is recorded only if `claim` is still the
    /// delivery's fencing token: a worker whose lease lapsed (and whose
    /// delivery another worker has claimed since) cannot overwrite the live
    /// claim, and changes nothing but the receipts and audit entries it
    /// brings, which are facts whoever reports them. A delivery done is
    /// recorded whatever the token: the next hop took it, and the live
    /// claim's attempt would only repeat it.
    fn finish_attempt(
        &self,
        delivery: i64,
        claim: u64,
        outcome: AttemptOutcome,
        receipts: Vec<NewReceipt>,
        audit: Vec<AuditEntry>,
    ) -> StoreFuture<'_, ()>;

    /// Keeps receipts for a message; returns how many were new. One whose
    /// bytes, or whose issuer and disposition, the message already has is
    /// not stored, and nothing it brings (forward delivery, provision
    /// records, audit entry) is kept.
    fn add_receipts(&self, key: MessageKey, receipts: Vec<NewReceipt>) -> StoreFuture<'_, usize>;

    /// Every receipt for a message, in the order received.
    fn receipts(&self, key: MessageKey) -> StoreFuture<'_, Vec<ReceiptRecord>>;

    /// Every delivery of a message.
    fn deliveries(&self, key: MessageKey) -> StoreFuture<'_, Vec<DeliveryRecord>>;

    /// Inbound messages, newest last; acknowledged ones only if asked.
    fn inbox(&self, include_acked: bool) -> StoreFuture<'_, Vec<MessageRecord>>;

    /// One page of [`Store::inbox`]: at most `limit` messages that come
    /// after `after` (a `(received_ms, key)` position, exclusive; `None`:
    /// from the start) in `(received_ms, key)` order.
    fn inbox_page(
        &self,
        include_acked: bool,
        after: Option<(u64, MessageKey)>,
        limit: usize,
    ) -> StoreFuture<'_, Vec<MessageRecord>>;

    /// Resolves, with the reason, if the store stops working for good (its
    /// writer is gone): the daemon then reports NOT_SERVING and exits so
    /// that its supervisor restarts it. Never resolves by default.
    fn failure(&self) -> Pin<Box<dyn Future<Output = String> + Send + '_>> {
        Box::pin(std::future::pending())
    }

    /// Changes that other writers of this store (the facility's other
    /// replicas) made, as they commit: the daemon wakes its delivery loop
    /// and its status watches on them instead of waiting for its next
    /// poll. `None` (the default) when this daemon is the store's only
    /// writer and wakes itself. A receiver that falls behind misses
    /// changes (the polls then catch up); it never blocks the store.
    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<StoreChange>> {
        None
    }

    /// Marks an inbound message acknowledged at `now_ms`, keeping our
    /// PROCESSED receipt (and its way back upstream). False if already acked.
    fn acknowledge(
        &self,
        key: MessageKey,
        now_ms: u64,
        receipt: NewReceipt,
    ) -> StoreFuture<'_, bool>;

    /// Records that a local client received the whole, authenticated
    /// plaintext of an inbound message at `now_ms`.
    fn mark_fetched(&self, key: MessageKey, now_ms: u64) -> StoreFuture<'_, ()>;

    /// Binds the store to the facility's pseudonym key by a check value
    /// derived from it (never the key): the first call keeps it, and a later
    /// one with another value fails with
    /// [`StoreError::PseudonymKeyMismatch`]. A shared store needs this:
    /// every replica must pseudonymize patients with the same key, or
    /// their records could not be found together. The SQLite store keeps
    /// the key file beside its database and checks nothing.
    fn bind_pseudonym_key(&self, check: [u8; 32]) -> StoreFuture<'_, ()> {
        let _ = check;
        Box::pin(async { Ok(()) })
    }

    /// How many pending deliveries there are (health, tests, the demo).
    fn pending_count(&self) -> StoreFuture<'_, u64>;

    /// Appends entries to the audit log (their `seq` is set by the store;
    /// their `time_ms`, the caller's time, is raised to the last entry's
    /// if that is later). Empty `subjects` of an entry naming a message are
    /// filled from the pseudonyms of the message `about` (its key), or, if
    /// `about` is `None`, of the one message stored under the entry's
    /// message id (none if several senders' messages carry that id).
    fn append_audit(
        &self,
        about: Option<MessageKey>,
        entries: Vec<AuditEntry>,
    ) -> StoreFuture<'_, ()>;

    /// The latest checkpoint (frontier, signed form) and the entries after it.
    fn audit_tail(&self) -> StoreFuture<'_, AuditTail>;

    /// Up to `limit` audit log entries from `from` on, in order: seq and
    /// stored entry bytes (to recompute the tree a checkpoint was signed
    /// over, a page at a time).
    fn audit_entries(&self, from: u64, limit: usize) -> StoreFuture<'_, Vec<(u64, Vec<u8>)>>;

    /// Stores a checkpoint if it extends the latest one; false if not newer.
    fn add_checkpoint(&self, checkpoint: NewCheckpoint) -> StoreFuture<'_, bool>;

    /// Provision records about the patient with this pseudonym, oldest first.
    fn provisions(&self, subject: Pseudonym) -> StoreFuture<'_, Vec<ProvisionRecord>>;

    /// Removes messages received before `policy.received_before_ms` that
    /// have no pending delivery, except inbox items never fetched and sent
    /// or relayed messages within the receipt grace period after their
    /// expiry (their deliveries, receipts and ciphertext go; provision
    /// records and the audit log stay; the id, sender, header digest, expiry
    /// and our receipt are kept until the expiry), with `audit` (its detail
    /// completed with what was removed) in the same transaction. Nothing is
    /// removed if nothing is due, nor while the clock is too far ahead of
    /// the newest time a purge accepted: then `suspended` is appended (once
    /// per suspension) and [`PurgeSummary::clock_jump`] is set.
    fn purge(
        &self,
        policy: PurgePolicy,
        audit: AuditEntry,
        suspended: AuditEntry,
    ) -> StoreFuture<'_, PurgeSummary>;
}

/// Which schema versions [`open_read_only`] accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaNeed {
    /// Only the schema this build writes (reports and exports read tables
    /// an older one lacks): an older store is refused until a daemon has
    /// started on it once and migrated it.
    Current,
    /// Any version this build knows (backup, verify-store: what an older
    /// schema lacks is skipped). A newer one is refused all the same.
    AnyKnown,
}

/// Where the offline tools read a store's rows: the SQLite store in a data
/// directory, or a PostgreSQL database. The files beside the store (the
/// pseudonym key, the kept checkpoint, the identity) are in the data
/// directory either way.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// The SQLite store in this data directory.
    Dir(PathBuf),
    /// The PostgreSQL store at this URL (`postgres://user@host:port/database`
    /// or the key=value form). TLS as its libpq parameters say (`sslmode`,
    /// `sslrootcert`, `sslcert`, `sslkey`; see [`postgres::PgTls`]).
    Url(String),
}

impl StoreLocation {
    /// Where the daemon configured by `config` keeps its store: its
    /// `[store] url` if set (with the `[store]` TLS files as the URL's
    /// libpq parameters), else its data directory.
    pub fn of_config(config: &crate::config::Config) -> Self {
        match &config.store.url {
            Some(url) => Self::Url(postgres::url_with_files(url, &config.store_tls())),
            None => Self::Dir(config.path(&config.data_dir)),
        }
    }
}

impl fmt::Display for StoreLocation {
    /// The directory, or the URL without its password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dir(dir) => write!(f, "{}", dir.display()),
            Self::Url(url) => f.write_str(&postgres::redacted_url(url)),
        }
    }
}

impl fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dir(dir) => f.debug_tuple("Dir").field(dir).finish(),
            Self::Url(_) => f.debug_tuple("Url").field(&self.to_string()).finish(),
        }
    }
}

/// Opens the store at `location` read-only, without taking its lock: for
/// the offline tools (audit export, provision reports, verify-store,
/// backup) that run beside a live daemon and never block its writes.
/// Refuses a location without a store and a schema this build does not
/// know (see [`SchemaNeed`]).
pub fn open_read_only(
    location: &StoreLocation,
    schema: SchemaNeed,
) -> Result<Box<dyn ReadOnlyStore>, StoreError> {
    Ok(match location {
        StoreLocation::Dir(dir) => Box::new(sqlite::SqliteSnapshot::open(dir, schema)?),
        StoreLocation::Url(url) => Box::new(postgres::PgSnapshot::open(url, schema)?),
    })
}

/// Rows of a walk over a [`ReadOnlyStore`], read in bounded pages: memory
/// stays constant however many rows there are. A walk stops after its
/// first error.
pub type Rows<'a, T> = Box<dyn Iterator<Item = Result<T, StoreError>> + 'a>;

/// A walk that reads its rows a page at a time: `fetch` returns the next
/// page (keeping its own position), fewer than `page_size` rows at the end.
pub(crate) fn paged<'a, T: 'a>(
    page_size: i64,
    fetch: impl FnMut() -> Result<Vec<T>, StoreError> + 'a,
) -> Rows<'a, T> {
    Box::new(Paged {
        page: Vec::new().into_iter(),
        page_size,
        fetch,
        done: false,
    })
}

struct Paged<T, F> {
    page: std::vec::IntoIter<T>,
    page_size: i64,
    fetch: F,
    done: bool,
}

impl<T, F: FnMut() -> Result<Vec<T>, StoreError>> Iterator for Paged<T, F> {
    type Item = Result<T, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(row) = self.page.next() {
                return Some(Ok(row));
            }
            if self.done {
                return None;
            }
            match (self.fetch)() {
                Ok(page) => {
                    self.done = i64::try_from(page.len()).map_or(true, |n| n < self.page_size);
                    self.page = page.into_iter();
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// A read-only view of a store for the offline tools: what the audit
/// export, the provision report, verify-store and backup read. Every read
/// sees one consistent state (one read transaction) until
/// [`end_snapshot`](Self::end_snapshot): the state as of the first read
/// after the open (what a caller reads elsewhere before that is older).
///
/// The `Raw…` rows are the values as stored, unchecked: verify-store
/// reports what is wrong with them instead of failing on the first one.
///
/// Large ciphertexts are blob files beside a SQLite store (the `blob…`
/// methods) and numbered chunks in a PostgreSQL store
/// ([`ciphertext_chunks`](Self::ciphertext_chunks)); a store of one kind
/// has none of the other.
pub trait ReadOnlyStore {
    /// The store's schema version.
    fn schema_version(&self) -> Result<u32, StoreError>;

    /// Ends the consistent view: every later read sees the store as it is
    /// at that moment (to look again at what changed since).
    fn end_snapshot(&mut self) -> Result<(), StoreError>;

    /// How many rows the store holds.
    fn counts(&self) -> Result<RowCounts, StoreError>;

    /// The path of a blob file a message row names.
    fn blob_path(&self, name: &str) -> std::path::PathBuf;

    /// Every message whose ciphertext is a blob file, by blob name; an
    /// invalid name is [`StoreError::Corrupt`].
    fn named_blobs(&self) -> Result<Vec<NamedBlob>, StoreError>;

    /// The names of the files in the blob directory (none if it is
    /// missing), whether or not a row names them.
    fn blob_files(&self) -> Result<Vec<String>, StoreError>;

    /// Whether a message row names the blob file `name`.
    fn is_blob_named(&self, name: &str) -> Result<bool, StoreError>;

    /// Every message row, by received time then key.
    fn messages(&self) -> Rows<'_, RawMessage>;

    /// The inline ciphertext of the message with key `key` (`None`: its
    /// ciphertext is a blob file or chunked). An error if there is no such
    /// row.
    fn inline_ciphertext(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// The chunks of the message with key `key` whose ciphertext the store
    /// keeps in the database in numbered pieces (PostgreSQL), in order, a
    /// chunk at a time (memory stays that of one chunk); `None` if its
    /// ciphertext is not chunked (inline, or a blob file). The chunks are
    /// as stored: whether they are numbered 0, 1, 2 … and add up to the
    /// message's `ciphertext_len` is the caller's to check. By default (a
    /// store without chunks) `None`.
    fn ciphertext_chunks(
        &self,
        key: &[u8],
    ) -> Result<Option<Rows<'_, CiphertextChunk>>, StoreError> {
        let _ = key;
        Ok(None)
    }

    /// The receipts kept for the message with key `key`, in the order
    /// received.
    fn receipts_of(&self, key: &[u8]) -> Result<Vec<RawReceipt>, StoreError>;

    /// The receipts whose message is not stored: `(seq, message key)`.
    fn orphan_receipts(&self) -> Result<Vec<(i64, Vec<u8>)>, StoreError>;

    /// The head and received time of the message with key `key`, if stored.
    fn message_head(&self, key: &[u8]) -> Result<Option<(Vec<u8>, i64)>, StoreError>;

    /// Every provision record's evidence by record id; `None` if the
    /// schema has no provision records.
    fn provision_evidence(&self) -> Result<Option<Rows<'_, RawProvision>>, StoreError>;

    /// Provision records naming `subject`, oldest first (see
    /// [`Store::provisions`]).
    fn provisions_for(&self, subject: &Pseudonym) -> Result<Vec<ProvisionRecord>, StoreError>;

    /// Audit log entries; `None` if the schema has no audit log.
    fn audit_len(&self) -> Result<Option<u64>, StoreError>;

    /// The audit log rows with `from <= seq < to`, in `seq` order. Without
    /// `from`, every row before `to`, even one with a negative `seq` (which
    /// only a damaged store holds); without `to`, every row from `from`.
    fn audit_entries(&self, from: Option<u64>, to: Option<u64>) -> Rows<'_, RawAuditEntry>;

    /// The stored leaf hashes of the audit log rows before `to`, in `seq`
    /// order; one that is not 32 bytes is [`StoreError::Corrupt`].
    fn audit_leaf_hashes(&self, to: u64) -> Rows<'_, [u8; 32]>;

    /// The stored entry bytes of audit log row `seq`; an error if there is
    /// no such row.
    fn audit_entry(&self, seq: u64) -> Result<Vec<u8>, StoreError>;

    /// The first `seq` before `to` of an entry dated at or after `time_ms`;
    /// `to` if there is none.
    fn audit_seq_from_time(&self, time_ms: u64, to: u64) -> Result<u64, StoreError>;

    /// The signed form of the latest checkpoint, if any.
    fn latest_checkpoint(&self) -> Result<Option<Vec<u8>>, StoreError>;

    /// The signed forms of the (at most `newest`, the largest ones)
    /// checkpoints covering fewer than `below` entries and signed in
    /// `[from_ms, to_ms)` (unbounded where `None`), by tree size.
    fn checkpoints_dated(
        &self,
        below: u64,
        from_ms: Option<u64>,
        to_ms: Option<u64>,
        newest: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError>;

    /// Every stored checkpoint, by tree size (none if the schema has no
    /// checkpoints).
    fn checkpoints(&self) -> Result<Vec<RawCheckpoint>, StoreError>;
}

/// Row counts of a store (see [`ReadOnlyStore::counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowCounts {
    /// The schema version.
    pub schema_version: u32,
    /// Stored envelopes.
    pub messages: u64,
    /// Stored receipts.
    pub receipts: u64,
    /// Deliveries in the work queue (any state).
    pub deliveries: u64,
    /// Envelopes whose ciphertext is a blob file (SQLite) or chunked
    /// (PostgreSQL).
    pub blobs: u64,
    /// Audit log entries (`None`: the schema has no audit log).
    pub audit_entries: Option<u64>,
    /// Provision records (`None`: the schema has none).
    pub provisions: Option<u64>,
}

/// A message whose ciphertext is a blob file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedBlob {
    /// The message's key, shown as a message id (hex if it is not 16 bytes).
    pub message: String,
    /// The blob file's name (checked: only `0-9a-f-`).
    pub name: String,
}

/// A message row as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawMessage {
    /// Its local key.
    pub key: Vec<u8>,
    /// The message id its envelope carries.
    pub message_id: Vec<u8>,
    /// The header SHA-256 column.
    pub header_sha256: Vec<u8>,
    /// The envelope head, network form.
    pub head: Vec<u8>,
    /// The blob file holding its ciphertext (`None`: inline).
    pub blob: Option<String>,
    /// The ciphertext length column.
    pub ciphertext_len: i64,
    /// When it was accepted (Unix ms).
    pub received_ms: i64,
    /// The receipt we issued on accepting it.
    pub our_receipt: Option<Vec<u8>>,
}

/// A piece of a chunked ciphertext as stored (see
/// [`ReadOnlyStore::ciphertext_chunks`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CiphertextChunk {
    /// Its number (the first is 0).
    pub n: i64,
    /// Its bytes.
    pub data: Vec<u8>,
}

/// A kept receipt as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawReceipt {
    /// Its insertion number.
    pub seq: i64,
    /// The stored SHA-256 of its bytes.
    pub digest: Vec<u8>,
    /// The signed receipt bytes.
    pub signed: Vec<u8>,
}

/// A provision record's evidence as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawProvision {
    /// The record's id.
    pub id: i64,
    /// Its message's local key.
    pub message_key: Vec<u8>,
    /// The message id of its message.
    pub message_id: Vec<u8>,
    /// The receipt kept as evidence.
    pub receipt: Option<Vec<u8>>,
}

/// An audit log row as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawAuditEntry {
    /// Its leaf index.
    pub seq: i64,
    /// The entry's bytes (canonical JSON: the Merkle leaf).
    pub entry: Vec<u8>,
    /// The stored leaf hash.
    pub leaf_hash: Vec<u8>,
}

/// A checkpoint row as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawCheckpoint {
    /// Entries covered.
    pub tree_size: i64,
    /// Root hash.
    pub root: Vec<u8>,
    /// `SignedCheckpoint::to_bytes()`.
    pub signed: Vec<u8>,
    /// The compact frontier at `tree_size`.
    pub frontier: Vec<u8>,
}
