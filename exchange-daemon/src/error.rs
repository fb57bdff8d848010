//! The crate's one error type and its single mapping to gRPC status.
//!
//! Every rejection has a stable reason code (the same codes exchange-core
//! uses where the reason is the core's), carried to the peer in the status
//! message and the `x-exchange-reason` metadata, and written to the log.

use std::path::PathBuf;

use tonic::{Code, Status};

/// Metadata key carrying the stable reason code on every error status.
pub const REASON_METADATA: &str = "x-exchange-reason";

/// Longest message on an error status (bytes); longer ones are cut.
pub const MAX_STATUS_MESSAGE: usize = 1024;

/// Binary metadata key carrying a signed REJECTED receipt on a refused delivery.
pub const RECEIPT_METADATA: &str = "x-exchange-receipt-bin";

/// Everything that can go wrong in the daemon.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration file is unreadable or inconsistent.
    #[error("configuration: {0}")]
    Config(String),
    /// A file named by the configuration could not be read.
    #[error("cannot read {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An envelope, receipt or certificate was rejected by exchange-core.
    #[error(transparent)]
    Core(#[from] exchange_core::Error),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// TLS setup failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// Binding or accepting on a listener failed.
    #[error("listener {addr}: {source}")]
    Listen {
        /// Address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS peer is not the hop before us on the envelope's route.
    #[error("peer {peer} may not deliver this envelope (expected {expected})")]
    PeerNotUpstream {
        /// The authenticated peer.
        peer: String,
        /// Who the route says delivers to us.
        expected: String,
    },
    /// This daemon is neither a relay nor a recipient on the envelope's route.
    #[error("this facility is not on the envelope's route")]
    NotOnRoute,
    /// An envelope exceeds the configured size limit.
    #[error("envelope too large: {len} bytes (limit {limit})")]
    TooLarge {
        /// Declared or received length.
        len: u64,
        /// Configured limit.
        limit: u64,
    },
    /// A message id already stored with a different header.
    #[error("message id {0} already received with a different header")]
    Replay(String),
    /// A local client asked for something its role does not allow.
    #[error("not permitted: {0}")]
    Forbidden(String),
    /// A local client's certificate names no configured client.
    #[error("unknown local client {0}")]
    UnknownClient(String),
    /// No address is configured for a party.
    #[error("no peer directory entry for {0}")]
    UnknownPeer(String),
    /// The message does not exist (or is not visible to this client).
    #[error("no such message {0}")]
    NotFound(String),
    /// Several senders' inbox items carry the message id a client named
    /// without a sender: it must name the sender too.
    #[error("{senders} senders' messages carry the id {id}: name the sender")]
    AmbiguousId {
        /// The message id.
        id: String,
        /// How many readable messages carry it.
        senders: usize,
    },
    /// A request is malformed.
    #[error("invalid request: {0}")]
    BadRequest(String),
    /// A request stream broke the protocol (order, missing head, extra data).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Connecting to or talking with a peer failed.
    #[error("transport: {0}")]
    Transport(String),
    /// A peer refused the envelope with a signed REJECTED receipt, verified
    /// and tied to the envelope: final.
    #[error("refused by {party}: {reason}")]
    Refused {
        /// Who refused.
        party: String,
        /// Its reason code.
        reason: String,
    },
    /// A peer answered with an error status that carries no signed REJECTED
    /// receipt (a refusal it cannot be held to, from a misconfigured or
    /// overloaded peer, or from something posing as it on the way): not
    /// final. Retried with backoff until the delivery expires.
    #[error("{party} answered {code} ({reason}) without a signed REJECTED receipt")]
    UnsignedRefusal {
        /// The peer.
        party: String,
        /// The gRPC status code it answered.
        code: String,
        /// The reason code it sent (`none` if it sent none).
        reason: String,
    },
    /// A peer failed internally while taking the envelope (its store or
    /// its configuration): not a network failure. Retried, since the peer
    /// may recover, but logged at error level and audited under its own
    /// reason so that an operator sees it long before the envelope expires.
    #[error(
        "peer-internal: {party} failed internally ({reason}); its operator must look at its log"
    )]
    PeerInternal {
        /// The peer.
        party: String,
        /// The reason code it sent.
        reason: String,
    },
    /// A local client asked for a hop role that the facility's contract
    /// with that party (its `role` in the peer directory) does not allow.
    #[error("{party} is {contracted} by contract; a message may not name it {asked}")]
    RoleMismatch {
        /// The party.
        party: String,
        /// The role the client asked for.
        asked: String,
        /// The role configured for the party.
        contracted: String,
    },
    /// A request stream sent nothing for the configured progress timeout:
    /// the transfer is abandoned and what it had sent removed.
    #[error("no {what} received for {seconds} s; transfer abandoned")]
    Stalled {
        /// What was awaited (ciphertext, plaintext).
        what: &'static str,
        /// The progress timeout.
        seconds: u64,
    },
    /// A Send reused an idempotency key for a different request.
    #[error("idempotency key {0:?} was used for a different request")]
    IdempotencyConflict(String),
    /// A Send's plaintext ended at another length than its SendStart
    /// declared: a stream cut short must not be taken for a whole one.
    #[error("the request declared {declared} plaintext bytes and {received} arrived")]
    SizeMismatch {
        /// `size_hint` of the SendStart.
        declared: u64,
        /// Plaintext bytes that arrived before the stream ended.
        received: u64,
    },
    /// A ListInbox page token that this daemon did not issue.
    #[error("page_token is not a token from a previous ListInbox response")]
    BadPageToken,
    /// The daemon is shutting down.
    #[error("shutting down")]
    Shutdown,
    /// An inbox item was acknowledged before any fetch of it completed.
    #[error("message {0} has not been fetched completely; fetch it before acknowledging it")]
    NotFetched(String),
    /// An envelope's lifetime (expiry minus creation) exceeds the configured maximum.
    #[error("envelope lifetime {seconds} s exceeds the maximum of {max} s")]
    LifetimeTooLong {
        /// The requested or declared lifetime (seconds).
        seconds: u64,
        /// The configured maximum (seconds).
        max: u64,
    },
    /// The store's filesystem would keep less free space than the
    /// configured reserve: new envelopes are refused until space is freed
    /// (reads, acknowledgements and receipts still work).
    #[error(
        "free disk space {free} bytes is below the reserve of {reserve} bytes (plus {incoming} incoming); new envelopes are refused"
    )]
    DiskReserve {
        /// Free bytes on the store's filesystem.
        free: u64,
        /// `limits.min_free_disk_bytes`.
        reserve: u64,
        /// The declared size of the refused envelope (0 if not yet known).
        incoming: u64,
    },
    /// A call returned more receipts than one call may carry.
    #[error("{count} receipts in one call; at most {limit} are taken")]
    TooManyReceipts {
        /// How many the call carried.
        count: usize,
        /// `limits.max_receipts_per_call`.
        limit: usize,
    },
    /// One message of a request stream (a Send or Deliver piece) is larger
    /// than the configured `limits.max_message_bytes`: the request is
    /// refused, not retried.
    #[error(
        "a {what} piece is larger than the limit of {limit} bytes per message (limits.max_message_bytes): {detail}"
    )]
    PieceTooLarge {
        /// What the stream carried (plaintext, ciphertext, the head).
        what: &'static str,
        /// The limit in force (bytes).
        limit: usize,
        /// What the gRPC decoder reported.
        detail: String,
    },
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database backend reported an error (a failed statement, a
    /// violated constraint, a busy or unreadable database).
    #[error("{backend}: {detail}")]
    Backend {
        /// Which backend (`sqlite`, `postgres`).
        backend: &'static str,
        /// What it reported, in its own words.
        detail: String,
    },
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The database holds something we cannot read back.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// The database was written by a newer version.
    #[error("store schema version {found} is newer than this daemon's ({supported})")]
    SchemaTooNew {
        /// Version in the file.
        found: u32,
        /// Newest known here.
        supported: u32,
    },
    /// The store's writer has stopped.
    #[error("store closed")]
    Closed,
    /// A write operation panicked: it alone was undone (its savepoint
    /// rolled back) and the store goes on serving the others.
    #[error("store operation failed unexpectedly and was undone: {0}")]
    Panicked(String),
    /// The store's writer thread died: nothing can be written any more.
    #[error("{0}")]
    WriterDied(String),
    /// The message or delivery an operation names is not stored.
    #[error("not found: {0}")]
    NotFound(String),
    /// This daemon's pseudonym key is not the one the shared store's other
    /// replicas use.
    #[error(
        "this daemon's pseudonym.key is not the key the store's other replicas use: copy pseudonym.key from a replica of this facility into the data directory"
    )]
    PseudonymKeyMismatch,
    /// Another running replica uses this replica's name on the shared store.
    #[error(
        "another running replica is named {0:?} on this database: give each replica its own delivery.node_name"
    )]
    NodeNameTaken(String),
    /// A value the store cannot keep (out of range or inconsistent).
    #[error("invalid value: {0}")]
    Invalid(String),
    /// The audit log, its stored frontier or its checkpoints disagree with
    /// the checkpoints the daemon signed (the database was rewritten, or
    /// signed checkpoints were deleted): nothing is signed over it.
    #[error("the audit log disagrees with its signed checkpoints: {0}")]
    AuditHistory(String),
    /// An output (backup archive, restore target) already exists; it is
    /// never overwritten.
    #[error("{} already exists; refusing to overwrite it", .0.display())]
    Exists(PathBuf),
    /// A restore target directory already holds files.
    #[error("{} is not empty; restore only into a new or empty directory", .0.display())]
    NotEmpty(PathBuf),
    /// A backup archive is damaged, altered, incomplete or not a backup.
    #[error("backup archive {}: {member}: {problem}", archive.display())]
    Archive {
        /// The archive.
        archive: PathBuf,
        /// The member at fault (`(archive)` for the tar structure itself).
        member: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A blob file that a message row names is gone (purged after the
    /// snapshot, or deleted behind the daemon's back).
    #[error("message {message}: its blob file {} is missing", path.display())]
    BlobMissing {
        /// The message id.
        message: String,
        /// The missing file.
        path: PathBuf,
    },
    /// TLS to the PostgreSQL server: settings that cannot be used, or a
    /// server that could not be verified.
    #[error("TLS to the database: {0}")]
    DatabaseTls(#[from] DbTlsError),
}

/// Why TLS to the PostgreSQL server was refused (the kinds of
/// [`StoreError::DatabaseTls`]). Every one fails closed: no statement is
/// sent over a connection that did not pass.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbTlsError {
    /// The settings contradict each other or leave the connection
    /// unprotected without saying so (a database on another host with no CA
    /// and no `sslmode=disable`, `sslmode=require` without a CA, ...).
    #[error("{0}")]
    Settings(String),
    /// A CA, certificate or key file is unreadable or holds nothing usable.
    #[error("{}: {problem}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The server's certificate does not chain to the configured CA, or the
    /// chain is expired, not yet valid or otherwise invalid.
    #[error("the server's certificate is not trusted: {0}")]
    UntrustedServer(String),
    /// The server's certificate is valid, but not for the host name (or
    /// address) the store connects to.
    #[error("the server's certificate is not valid for {host:?}: {detail}")]
    WrongServerName {
        /// The host the store connected to.
        host: String,
        /// What the certificate names instead.
        detail: String,
    },
    /// The handshake failed otherwise (an alert from the server, for
    /// example because it refused the client certificate; no common
    /// protocol version; the connection dropped).
    #[error("the TLS handshake failed: {0}")]
    Handshake(String),
}

impl Error {
    /// A stable, short reason code (status metadata, logs, REJECTED receipts).
    pub fn reason_code(&self) -> &'static str {
        match self {
            Self::Core(e) => e.reason_code(),
            Self::Store(StoreError::NotFound(_)) => "not-found",
            Self::Config(_) | Self::ReadFile { .. } => "config",
            Self::Store(_) => "store",
            Self::Tls(_) => "tls",
            Self::Listen { .. } => "listen",
            Self::PeerNotUpstream { .. } => "identity-mismatch",
            Self::NotOnRoute => "not-on-route",
            Self::TooLarge { .. } => "oversize",
            Self::Replay(_) => "replay",
            Self::Forbidden(_) => "policy-violation",
            Self::UnknownClient(_) => "unknown-client",
            Self::UnknownPeer(_) => "unknown-peer",
            Self::NotFound(_) => "not-found",
            Self::AmbiguousId { .. } => "ambiguous-id",
            Self::BadRequest(_) => "invalid-argument",
            Self::Protocol(_) => "malformed",
            Self::Transport(_) => "transport",
            Self::Refused { .. } => "refused",
            Self::UnsignedRefusal { .. } => "unsigned-refusal",
            Self::Shutdown => "shutdown",
            Self::PeerInternal { .. } => "peer-internal",
            Self::RoleMismatch { .. } => "role-mismatch",
            Self::IdempotencyConflict(_) => "idempotency-conflict",
            Self::SizeMismatch { .. } => "size-mismatch",
            Self::BadPageToken => "bad-page-token",
            Self::Stalled { .. } => "stalled",
            Self::NotFetched(_) => "not-fetched",
            Self::LifetimeTooLong { .. } => "lifetime-too-long",
            Self::DiskReserve { .. } => "disk-reserve",
            Self::TooManyReceipts { .. } => "too-many-receipts",
            Self::PieceTooLarge { .. } => "piece-too-large",
        }
    }

    /// The error as a log line may carry it: text quoted from a request
    /// (a party URI, a purpose) bounded to [`MAX_STATUS_MESSAGE`] bytes and
    /// escaped, so that a peer cannot fill the log or forge lines in it.
    pub fn bounded(&self) -> String {
        exchange_core::audit::log_text(&self.to_string(), MAX_STATUS_MESSAGE)
    }

    /// Whether this is our own failure (store, configuration, TLS setup)
    /// rather than something wrong with the request.
    pub(crate) fn is_internal(&self) -> bool {
        self.code() == Code::Internal
    }

    /// Whether retrying the same delivery later can succeed.
    pub(crate) fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Transport(_)
                | Self::Store(_)
                | Self::Shutdown
                | Self::UnknownPeer(_)
                | Self::PeerInternal { .. }
                | Self::UnsignedRefusal { .. }
        )
    }

    fn code(&self) -> Code {
        match self {
            Self::Core(exchange_core::Error::Trust(_))
            | Self::PeerNotUpstream { .. }
            | Self::UnknownClient(_) => Code::PermissionDenied,
            Self::Core(exchange_core::Error::Expired { .. }) => Code::FailedPrecondition,
            Self::Core(exchange_core::Error::Io(_)) => Code::Internal,
            Self::Core(_)
            | Self::BadRequest(_)
            | Self::Protocol(_)
            | Self::NotOnRoute
            | Self::SizeMismatch { .. } => Code::InvalidArgument,
            Self::Forbidden(_) | Self::RoleMismatch { .. } => Code::PermissionDenied,
            Self::TooLarge { .. } | Self::DiskReserve { .. } | Self::TooManyReceipts { .. } => {
                Code::ResourceExhausted
            }
            Self::Replay(_) | Self::IdempotencyConflict(_) => Code::AlreadyExists,
            Self::Stalled { .. } => Code::DeadlineExceeded,
            Self::NotFound(_) | Self::Store(StoreError::NotFound(_)) => Code::NotFound,
            Self::UnknownPeer(_)
            | Self::Refused { .. }
            | Self::NotFetched(_)
            | Self::AmbiguousId { .. } => Code::FailedPrecondition,
            Self::LifetimeTooLong { .. } | Self::PieceTooLarge { .. } | Self::BadPageToken => {
                Code::InvalidArgument
            }
            Self::Transport(_)
            | Self::Shutdown
            | Self::PeerInternal { .. }
            | Self::UnsignedRefusal { .. } => Code::Unavailable,
            Self::Config(_)
            | Self::ReadFile { .. }
            | Self::Store(_)
            | Self::Tls(_)
            | Self::Listen { .. } => Code::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let reason = e.reason_code();
        // Internal detail (paths, SQL) stays in our log; the peer gets the
        // reason. Text quoted from the request (a party URI, a purpose) is
        // bounded and escaped: a status is a header the peer must accept.
        let message = match e.code() {
            Code::Internal => format!("{reason}: internal error"),
            _ => exchange_core::audit::log_text(&format!("{reason}: {e}"), MAX_STATUS_MESSAGE),
        };
        let mut status = Status::new(e.code(), message);
        if let Ok(v) = reason.parse() {
            status.metadata_mut().insert(REASON_METADATA, v);
        }
        status
    }
}

/// The reason code a peer or daemon put on an error status, if any.
pub fn status_reason(status: &Status) -> Option<&str> {
    status
        .metadata()
        .get(REASON_METADATA)
        .and_then(|v| v.to_str().ok())
}
