//! `exchanged` configuration (TOML), loaded once at start.
//!
//! Paths are relative to the configuration file's directory. The reference
//! with every key and its default is in docs/operations.md §Configuration.
//!
//! Network profiles (DESIGN.md §6): `open` (the internet) admits no
//! relaxation at all: TLS 1.3 only, client certificates required, CRLs
//! required and fresh, peers pinned to their party URI. `closed` (IP-VPN,
//! 専用線) has the same defaults; each relaxation must be written in the
//! file and is logged at start. Envelopes are sealed and signed in both.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use exchange_core::PartyUri;
use serde::Deserialize;

use crate::error::Error;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory of the store (SQLite file, blobs). Created if missing.
    pub data_dir: PathBuf,
    /// This facility's credentials.
    pub identity: IdentityConfig,
    /// Trust anchors and CRLs.
    pub trust: TrustConfig,
    /// Network profile and its relaxations.
    #[serde(default)]
    pub network: NetworkConfig,
    /// Listen addresses.
    pub listen: ListenConfig,
    /// Size limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Delivery workers.
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// The peer directory: where other parties are reached.
    #[serde(default, rename = "peer")]
    pub peers: Vec<PeerConfig>,
    /// Local client identities and their roles.
    #[serde(default, rename = "client")]
    pub clients: Vec<ClientConfig>,
    /// How long stored envelopes are kept.
    #[serde(default)]
    pub retention: RetentionConfig,
    /// Where the store is: the embedded SQLite store in `data_dir` (the
    /// default), or a PostgreSQL database shared by replicas.
    #[serde(default)]
    pub store: StoreConfig,
    /// Log level: error, warn, info, debug, trace.
    #[serde(default = "default_log")]
    pub log: String,
    #[serde(skip)]
    base: PathBuf,
}

fn default_log() -> String {
    "info".into()
}

/// The store backend.
#[derive(Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `postgres://user@host:port/database`: the PostgreSQL store, which
    /// several replicas of this facility may share (each with its own
    /// `delivery.node_name`). Unset: the SQLite store in `data_dir`. The
    /// local files (keys, the pseudonym key, the kept checkpoint, spool
    /// files) stay in `data_dir` either way.
    pub url: Option<String>,
    /// Most connections this daemon opens to PostgreSQL (default 16).
    #[serde(default = "default_store_connections")]
    pub max_connections: usize,
    /// PEM file of the CA that issued the PostgreSQL server's certificate.
    /// Set: every connection to the database is TLS, the server's chain and
    /// host name verified against it. Unset: plain connections, allowed
    /// only to this machine (loopback, Unix socket) unless the URL says
    /// `sslmode=disable` (see docs/operations.md §3.1).
    pub ca: Option<PathBuf>,
    /// PEM certificate chain (leaf first) presented to the server, for
    /// PostgreSQL `cert` authentication; goes with `key` and needs `ca`.
    pub cert: Option<PathBuf>,
    /// PKCS#8 PEM private key of `cert`.
    pub key: Option<PathBuf>,
}

fn default_store_connections() -> usize {
    16
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: only whether it is set is shown.
        f.debug_struct("StoreConfig")
            .field("url", &self.url.as_ref().map(|_| "(set)"))
            .field("max_connections", &self.max_connections)
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish()
    }
}

/// Identity and encryption credentials.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Identity certificate chain (PEM, leaf first): signs, and is the TLS certificate.
    pub cert: PathBuf,
    /// Identity private key (PKCS#8 PEM).
    pub key: PathBuf,
    /// Encryption certificate (PEM).
    pub encryption_cert: PathBuf,
    /// Encryption private key (PKCS#8 PEM).
    pub encryption_key: PathBuf,
    /// Earlier encryption credentials, kept to open messages stored before a rotation.
    #[serde(default)]
    pub previous_encryption: Vec<KeyPairConfig>,
}

/// Retention (保存期間) of stored envelopes. The audit log and the
/// provision records are never purged by the daemon.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Remove envelopes (ciphertext, deliveries, receipts) this many days
    /// after they were received, once no delivery of theirs is pending, an
    /// inbox item once it has been fetched, and a sent or relayed envelope
    /// once `receipt_grace_days` have passed since its expiry.
    /// Unset: kept until removed by hand. 0: removed at the next purge
    /// (checked at start and every minute).
    pub messages_days: Option<u64>,
    /// How long after its expiry a sent or relayed envelope is kept for
    /// receipts still on their way (days).
    #[serde(default = "default_receipt_grace")]
    pub receipt_grace_days: u64,
    /// The purge does nothing (and says so at error level and in the audit
    /// log) while the clock is more than this far ahead of the newest time
    /// it accepted before (seconds): a clock jumped forward would otherwise
    /// purge everything at once. After a longer downtime, raise it once.
    #[serde(default = "default_max_clock_jump")]
    pub max_clock_jump_seconds: u64,
}

fn default_receipt_grace() -> u64 {
    7
}
fn default_max_clock_jump() -> u64 {
    7 * 86_400
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            messages_days: None,
            receipt_grace_days: default_receipt_grace(),
            max_clock_jump_seconds: default_max_clock_jump(),
        }
    }
}

/// A certificate and its key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPairConfig {
    /// Certificate (PEM).
    pub cert: PathBuf,
    /// Private key (PKCS#8 PEM).
    pub key: PathBuf,
}

/// Trust anchors and revocation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// Network CA certificates (PEM files).
    pub anchors: Vec<PathBuf>,
    /// CRL files (PEM). Required by the open profile.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    /// CA of local client certificates (default: the network anchors).
    #[serde(default)]
    pub client_anchors: Vec<PathBuf>,
    /// CRLs of the client CA (required with `client_anchors`, unless the
    /// closed profile allows missing CRLs).
    #[serde(default)]
    pub client_crls: Vec<PathBuf>,
}

/// `open` or `closed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// The internet: no relaxation permitted.
    #[default]
    Open,
    /// A closed network (IP-VPN, leased line): explicit relaxations permitted.
    Closed,
}

/// The network profile and relaxations (closed profile only).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// The profile.
    #[serde(default)]
    pub profile: Profile,
    /// Relaxation: accept TLS 1.2 as well as 1.3.
    #[serde(default)]
    pub allow_tls12: bool,
    /// Relaxation: run without CRLs (revocation unchecked).
    #[serde(default)]
    pub allow_missing_crls: bool,
    /// Relaxation: accept CRLs past their nextUpdate.
    #[serde(default)]
    pub allow_stale_crls: bool,
}

impl NetworkConfig {
    /// The relaxations in force, by name.
    pub fn relaxations(&self) -> Vec<&'static str> {
        let mut r = Vec::new();
        if self.allow_tls12 {
            r.push("allow_tls12");
        }
        if self.allow_missing_crls {
            r.push("allow_missing_crls");
        }
        if self.allow_stale_crls {
            r.push("allow_stale_crls");
        }
        r
    }
}

/// Listen addresses.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// Peer service (other facilities), e.g. `0.0.0.0:7443`.
    pub peer: String,
    /// Client service (local applications), e.g. `127.0.0.1:7444`.
    pub client: String,
    /// TLS server certificate chain (PEM, leaf first) the client listener
    /// presents instead of the identity certificate: one valid for the DNS
    /// names and addresses applications dial (`exchange ca issue-server`),
    /// which stock gRPC clients check. Set with `client_key`.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// Private key (PKCS#8 PEM) of `client_cert`.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// Also serve the client service on this Unix domain socket (TLS with
    /// client certificates, as on TCP). A stale socket left by an earlier
    /// run is replaced; any other file there is refused.
    #[serde(default)]
    pub client_socket: Option<PathBuf>,
    /// Mode of `client_socket`: `"0600"` (the daemon's user only, the
    /// default) or `"0660"` (its group too).
    #[serde(default = "default_socket_mode")]
    pub client_socket_mode: String,
}

fn default_socket_mode() -> String {
    "0600".into()
}

impl ListenConfig {
    /// The permission bits of [`ListenConfig::client_socket`].
    pub(crate) fn socket_mode(&self) -> Result<u32, Error> {
        match self.client_socket_mode.as_str() {
            "0600" => Ok(0o600),
            "0660" => Ok(0o660),
            other => Err(Error::Config(format!(
                "listen.client_socket_mode = {other:?}: use \"0600\" (the daemon's user) or \"0660\" (and its group)"
            ))),
        }
    }
}

/// Size limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest envelope ciphertext accepted (bytes).
    #[serde(default = "default_max_envelope")]
    pub max_envelope_bytes: u64,
    /// Ciphertexts up to this size are kept in the database row; larger ones in blob files.
    #[serde(default = "default_inline")]
    pub inline_ciphertext_bytes: u64,
    /// A Deliver or Send stream that sends nothing for this long (seconds)
    /// is abandoned: refused with reason `stalled`, its spool file removed.
    #[serde(default = "default_progress_timeout")]
    pub progress_timeout_seconds: u64,
    /// Connections each listener holds at once (counting handshakes);
    /// more are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections one party (peer facility or local client) may hold on a
    /// listener at once.
    #[serde(default = "default_max_connections_per_party")]
    pub max_connections_per_party: usize,
    /// Concurrent gRPC streams one connection may open on either listener.
    #[serde(default = "default_max_streams")]
    pub max_streams_per_connection: u32,
    /// HTTP/2 keepalive PING interval on both listeners (seconds); a
    /// connection whose peer does not answer within
    /// `keepalive_timeout_seconds` is closed.
    #[serde(default = "default_keepalive_interval")]
    pub keepalive_interval_seconds: u64,
    /// How long a keepalive PING may go unanswered (seconds).
    #[serde(default = "default_keepalive_timeout")]
    pub keepalive_timeout_seconds: u64,
    /// Receipts one ReturnReceipts call may carry; a call with more is
    /// refused whole (`too-many-receipts`) before any is verified.
    #[serde(default = "default_max_receipts_per_call")]
    pub max_receipts_per_call: usize,
    /// Free space (bytes) kept on the store's filesystem: a Deliver whose
    /// envelope would leave less, and any Send while less is free, is
    /// refused with `disk-reserve`. 0 turns the check off.
    #[serde(default = "default_min_free_disk")]
    pub min_free_disk_bytes: u64,
    /// Largest single gRPC message either listener decodes (bytes): one
    /// Send or Deliver piece, or one whole unary request. A larger piece is
    /// refused with INVALID_ARGUMENT, reason `piece-too-large`.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
}

impl LimitsConfig {
    /// [`LimitsConfig::progress_timeout_seconds`] as a duration.
    pub(crate) fn progress_timeout(&self) -> Duration {
        Duration::from_secs(self.progress_timeout_seconds)
    }
}

fn default_progress_timeout() -> u64 {
    60
}
fn default_max_streams() -> u32 {
    100
}
fn default_max_connections() -> usize {
    1024
}
fn default_max_connections_per_party() -> usize {
    16
}
fn default_keepalive_interval() -> u64 {
    30
}
fn default_keepalive_timeout() -> u64 {
    20
}

fn default_max_receipts_per_call() -> usize {
    64
}
fn default_min_free_disk() -> u64 {
    1 << 30
}

/// The default of [`LimitsConfig::max_message_bytes`]: 4 MiB, gRPC's
/// customary limit, sixteen times the 256 KiB pieces the CLI and daemons send.
pub(crate) const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 << 20;

/// The smallest [`LimitsConfig::max_message_bytes`] accepted: 2 MiB (an
/// envelope head may take 1 MiB).
pub(crate) const MIN_MAX_MESSAGE_BYTES: usize = 2 << 20;

fn default_max_message() -> usize {
    DEFAULT_MAX_MESSAGE_BYTES
}
fn default_max_envelope() -> u64 {
    4 << 30
}
fn default_inline() -> u64 {
    1 << 20
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_envelope_bytes: default_max_envelope(),
            inline_ciphertext_bytes: default_inline(),
            progress_timeout_seconds: default_progress_timeout(),
            max_streams_per_connection: default_max_streams(),
            max_connections: default_max_connections(),
            max_connections_per_party: default_max_connections_per_party(),
            keepalive_interval_seconds: default_keepalive_interval(),
            keepalive_timeout_seconds: default_keepalive_timeout(),
            max_receipts_per_call: default_max_receipts_per_call(),
            min_free_disk_bytes: default_min_free_disk(),
            max_message_bytes: default_max_message(),
        }
    }
}

/// The shortest `delivery.lease_ms`: claims are renewed every third of
/// the lease, and a renewal must not be due more often than the claim loop
/// looks at it.
pub(crate) const MIN_LEASE_MS: u64 = 600;

/// Delivery workers and retry policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Deliveries attempted at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Deliveries attempted at once to any one next hop (at most
    /// `concurrency`): a peer that stops answering holds no more than this.
    #[serde(default = "default_per_peer_concurrency")]
    pub per_peer_concurrency: usize,
    /// Deadline of one delivery attempt (ms) before its size is counted:
    /// an attempt still unanswered after `attempt_timeout_ms` plus the
    /// envelope's size at `attempt_min_bytes_per_second` is abandoned and
    /// retried later.
    #[serde(default = "default_attempt_timeout")]
    pub attempt_timeout_ms: u64,
    /// The slowest transfer rate an attempt is given time for (bytes/s).
    #[serde(default = "default_attempt_min_rate")]
    pub attempt_min_bytes_per_second: u64,
    /// First retry delay (ms); doubles each attempt, with jitter.
    #[serde(default = "default_initial_backoff")]
    pub initial_backoff_ms: u64,
    /// Longest retry delay (ms).
    #[serde(default = "default_max_backoff")]
    pub max_backoff_ms: u64,
    /// Lifetime of envelopes sent without one (seconds).
    #[serde(default = "default_lifetime")]
    pub default_lifetime_seconds: u64,
    /// Longest envelope lifetime (expiry minus creation, seconds): a Send
    /// asking for more is refused, and an envelope declaring more is
    /// refused with a REJECTED receipt. It bounds how long the ids of
    /// purged messages must be remembered.
    #[serde(default = "default_max_lifetime")]
    pub max_lifetime_seconds: u64,
    /// TCP + TLS connect timeout (ms).
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// Name of this daemon when claiming work in a shared store.
    #[serde(default = "default_node")]
    pub node_name: String,
    /// How long a claim on a delivery lasts (ms) before another worker may
    /// take it. A running attempt renews its claim every third of this, so
    /// only a crashed or stuck worker's claims lapse.
    #[serde(default = "default_lease")]
    pub lease_ms: u64,
    /// How often a status watch (`WatchStatus`) reads its message's status
    /// again when no change woke it (ms). Changes this daemon makes, and on
    /// PostgreSQL those its fellow replicas announce, wake it at once; this
    /// poll is the fallback for a change missed under load.
    #[serde(default = "default_status_poll")]
    pub status_poll_ms: u64,
}

fn default_concurrency() -> usize {
    32
}
fn default_per_peer_concurrency() -> usize {
    16
}
fn default_attempt_timeout() -> u64 {
    60_000
}
fn default_attempt_min_rate() -> u64 {
    256 * 1024
}
fn default_initial_backoff() -> u64 {
    500
}
fn default_max_backoff() -> u64 {
    300_000
}
fn default_lifetime() -> u64 {
    7 * 86_400
}
fn default_max_lifetime() -> u64 {
    30 * 86_400
}
fn default_connect_timeout() -> u64 {
    5_000
}
fn default_node() -> String {
    "local".into()
}
fn default_lease() -> u64 {
    120_000
}
fn default_status_poll() -> u64 {
    2_000
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            concurrency: default_concurrency(),
            per_peer_concurrency: default_per_peer_concurrency(),
            attempt_timeout_ms: default_attempt_timeout(),
            attempt_min_bytes_per_second: default_attempt_min_rate(),
            initial_backoff_ms: default_initial_backoff(),
            max_backoff_ms: default_max_backoff(),
            default_lifetime_seconds: default_lifetime(),
            max_lifetime_seconds: default_max_lifetime(),
            connect_timeout_ms: default_connect_timeout(),
            node_name: default_node(),
            lease_ms: default_lease(),
            status_poll_ms: default_status_poll(),
        }
    }
}

impl DeliveryConfig {
    /// How long a claim on a delivery lasts.
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }

    /// How often a status watch polls (see `status_poll_ms`).
    pub(crate) fn status_poll(&self) -> Duration {
        Duration::from_millis(self.status_poll_ms)
    }

    /// The connect timeout.
    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// The deadline of one attempt to move `bytes` (an envelope's
    /// ciphertext; 0 for a receipt): the base timeout plus the time the
    /// bytes take at the slowest rate allowed.
    pub(crate) fn attempt_deadline(&self, bytes: u64) -> Duration {
        let rate = self.attempt_min_bytes_per_second.max(1);
        Duration::from_millis(self.attempt_timeout_ms)
            .saturating_add(Duration::from_secs(bytes / rate))
    }
}

/// One peer directory entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The party URI its certificate must name.
    pub party: String,
    /// `host:port` of its peer listener. May be left out for a party reached
    /// only through relays (we need its encryption certificate, not its address).
    #[serde(default)]
    pub address: Option<String>,
    /// Its encryption certificate (PEM): needed to send to it as a final recipient.
    #[serde(default)]
    pub encryption_cert: Option<PathBuf>,
    /// What the facility's contract with it makes it on any route:
    /// `third-party` (第三者提供, the default) or `entrusted` (委託). A local
    /// application cannot choose otherwise per message.
    #[serde(default)]
    pub role: PeerRole,
}

/// The contracted role of a peer (see [`PeerConfig::role`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerRole {
    /// A third party: a transfer to it is a provision (第三者提供).
    #[default]
    ThirdParty,
    /// An agent acting for us under contract (委託): not a provision.
    Entrusted,
}

impl PeerRole {
    /// As a hop role on a route.
    pub(crate) fn hop_role(self) -> exchange_core::route::HopRole {
        match self {
            Self::ThirdParty => exchange_core::route::HopRole::ThirdParty,
            Self::Entrusted => exchange_core::route::HopRole::Entrusted,
        }
    }
}

/// One local client and its role.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// A name for logs.
    pub name: String,
    /// The party URI in the client's certificate.
    pub party: String,
    /// Recipients it may send to (`*`: any in the peer directory).
    #[serde(default)]
    pub send_to: Vec<String>,
    /// Purposes it may send for (`*`: any).
    #[serde(default)]
    pub purposes: Vec<String>,
    /// Purposes of inbox items it may list, fetch and acknowledge (`*`: any).
    #[serde(default)]
    pub read_purposes: Vec<String>,
}

fn allows(list: &[String], item: &str) -> bool {
    list.iter().any(|x| x == "*" || x == item)
}

impl ClientConfig {
    /// May it send to `recipient`?
    pub(crate) fn may_send_to(&self, recipient: &PartyUri) -> bool {
        allows(&self.send_to, recipient.as_str())
    }
    /// May it send for `purpose`?
    pub(crate) fn may_send_for(&self, purpose: &str) -> bool {
        allows(&self.purposes, purpose)
    }
    /// May it read inbox items sent for `purpose`?
    pub(crate) fn may_read(&self, purpose: &str) -> bool {
        allows(&self.read_purposes, purpose)
    }
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        let base = path
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("."));
        Self::parse(&text, &base)
    }

    /// Parses configuration text; relative paths resolve against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, Error> {
        let mut config: Self =
            toml::from_str(text).map_err(|e| Error::Config(e.message().to_owned()))?;
        config.base = base.to_owned();
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), Error> {
        let relaxed = self.network.relaxations();
        if self.network.profile == Profile::Open && !relaxed.is_empty() {
            return Err(Error::Config(format!(
                "the open profile permits no relaxation, but {} is set (use profile = \"closed\" on a closed network)",
                relaxed.join(", ")
            )));
        }
        if self.listen.client_cert.is_some() != self.listen.client_key.is_some() {
            return Err(Error::Config(
                "listen.client_cert and listen.client_key go together: set both or neither".into(),
            ));
        }
        self.listen.socket_mode()?;
        if self.trust.anchors.is_empty() {
            return Err(Error::Config("trust.anchors is empty".into()));
        }
        if self.trust.crls.is_empty() && !self.network.allow_missing_crls {
            return Err(Error::Config(
                "trust.crls is empty: CRLs are required (closed profile only: network.allow_missing_crls = true)".into(),
            ));
        }
        if !self.trust.client_anchors.is_empty()
            && self.trust.client_crls.is_empty()
            && !self.network.allow_missing_crls
        {
            return Err(Error::Config(
                "trust.client_anchors is set but trust.client_crls is empty: local client certificates need a CRL from their own CA".into(),
            ));
        }
        let mut parties = BTreeMap::new();
        for p in &self.peers {
            let party = PartyUri::new(p.party.clone())
                .map_err(|e| Error::Config(format!("peer {:?}: {e}", p.party)))?;
            if parties.insert(party, ()).is_some() {
                return Err(Error::Config(format!("peer {} listed twice", p.party)));
            }
        }
        let mut clients = BTreeMap::new();
        for c in &self.clients {
            PartyUri::new(c.party.clone())
                .map_err(|e| Error::Config(format!("client {:?}: {e}", c.name)))?;
            if clients.insert(c.party.clone(), ()).is_some() {
                return Err(Error::Config(format!(
                    "client party {} listed twice",
                    c.party
                )));
            }
        }
        if self.log.parse::<tracing::Level>().is_err() {
            return Err(Error::Config(format!(
                "log = {:?}: use error, warn, info, debug or trace",
                self.log
            )));
        }
        self.check_store()?;
        let d = &self.delivery;
        if d.max_lifetime_seconds == 0 || d.default_lifetime_seconds > d.max_lifetime_seconds {
            return Err(Error::Config(format!(
                "delivery.default_lifetime_seconds ({}) must be at most delivery.max_lifetime_seconds ({}), which must be positive",
                d.default_lifetime_seconds, d.max_lifetime_seconds
            )));
        }
        if d.lease_ms < MIN_LEASE_MS {
            return Err(Error::Config(format!(
                "delivery.lease_ms ({}) must be at least {MIN_LEASE_MS}",
                d.lease_ms
            )));
        }
        if d.concurrency == 0 || d.initial_backoff_ms == 0 || d.status_poll_ms == 0 {
            return Err(Error::Config(
                "delivery.concurrency, delivery.initial_backoff_ms and delivery.status_poll_ms \
                 must be positive"
                    .into(),
            ));
        }
        let l = &self.limits;
        if l.max_message_bytes < MIN_MAX_MESSAGE_BYTES {
            return Err(Error::Config(format!(
                "limits.max_message_bytes ({}) must be at least {MIN_MAX_MESSAGE_BYTES}: \
                 256 KiB pieces, envelope heads and receipts must fit",
                l.max_message_bytes
            )));
        }
        if l.progress_timeout_seconds == 0
            || l.max_connections == 0
            || l.max_connections_per_party == 0
            || l.max_streams_per_connection == 0
            || l.keepalive_interval_seconds == 0
            || l.keepalive_timeout_seconds == 0
            || l.max_receipts_per_call == 0
        {
            return Err(Error::Config(
                "limits.progress_timeout_seconds, max_connections, max_connections_per_party, \
                 max_streams_per_connection, keepalive_interval_seconds, \
                 keepalive_timeout_seconds and max_receipts_per_call must be positive"
                    .into(),
            ));
        }
        let d = &self.delivery;
        if d.per_peer_concurrency == 0 || d.per_peer_concurrency > d.concurrency {
            return Err(Error::Config(format!(
                "delivery.per_peer_concurrency = {} must be between 1 and delivery.concurrency ({})",
                d.per_peer_concurrency, d.concurrency
            )));
        }
        if d.attempt_timeout_ms == 0 || d.attempt_min_bytes_per_second == 0 {
            return Err(Error::Config(
                "delivery.attempt_timeout_ms and delivery.attempt_min_bytes_per_second must be positive"
                    .into(),
            ));
        }
        Ok(())
    }

    /// `[store]`: TLS settings only with a URL, and the URL and TLS settings
    /// usable together (the CA and client files are read here, so a missing
    /// one is a configuration error, not a failure at the first connection).
    fn check_store(&self) -> Result<(), Error> {
        let s = &self.store;
        match &s.url {
            None if s.ca.is_some() || s.cert.is_some() || s.key.is_some() => Err(Error::Config(
                "[store] ca, cert and key are for a PostgreSQL store: set [store] url too".into(),
            )),
            None => Ok(()),
            Some(url) => crate::store::postgres::check_tls(url, &self.store_tls())
                .map_err(|e| Error::Config(format!("[store]: {e}"))),
        }
    }

    /// The `[store]` TLS files, resolved against the file's directory.
    pub fn store_tls(&self) -> crate::store::postgres::PgTls {
        let s = &self.store;
        crate::store::postgres::PgTls {
            ca: s.ca.as_deref().map(|p| self.path(p)),
            cert: s.cert.as_deref().map(|p| self.path(p)),
            key: s.key.as_deref().map(|p| self.path(p)),
        }
    }

    /// Anchor and CRL files of local client certificates, when they differ
    /// from the network's.
    pub(crate) fn client_trust_files(&self) -> Option<(&[PathBuf], &[PathBuf])> {
        if self.trust.client_anchors.is_empty() {
            return None;
        }
        Some((&self.trust.client_anchors, &self.trust.client_crls))
    }

    /// Every trust file (anchors and CRLs, network and client), to watch for changes.
    pub(crate) fn trust_files(&self) -> Vec<PathBuf> {
        let t = &self.trust;
        t.anchors
            .iter()
            .chain(&t.crls)
            .chain(&t.client_anchors)
            .chain(&t.client_crls)
            .map(|p| self.path(p))
            .collect()
    }

    /// Resolves a configured path against the file's directory.
    pub fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base.join(p)
        }
    }

    /// Reads a configured file into a buffer that is zeroized when dropped
    /// (private keys are read through here, so every file is treated so).
    pub fn read(&self, p: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>, Error> {
        let path = self.path(p);
        std::fs::read(&path)
            .map(zeroize::Zeroizing::new)
            .map_err(|source| Error::ReadFile { path, source })
    }
}
