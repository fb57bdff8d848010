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
    /// Log level: error, warn, info, debug, trace.
    #[serde(default = "default_log")]
    pub log: String,
    #[serde(skip)]
    base: PathBuf,
}

fn default_log() -> String {
    "info".into()
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
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Remove envelopes (ciphertext, deliveries, receipts) this many days
    /// after they were received, once no delivery of theirs is pending.
    /// Unset: kept until removed by hand. 0: removed at the next purge
    /// (checked at start and every minute).
    pub messages_days: Option<u64>,
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
        }
    }
}

/// Delivery workers and retry policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Deliveries attempted at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// First retry delay (ms); doubles each attempt, with jitter.
    #[serde(default = "default_initial_backoff")]
    pub initial_backoff_ms: u64,
    /// Longest retry delay (ms).
    #[serde(default = "default_max_backoff")]
    pub max_backoff_ms: u64,
    /// Lifetime of envelopes sent without one (seconds).
    #[serde(default = "default_lifetime")]
    pub default_lifetime_seconds: u64,
    /// TCP + TLS connect timeout (ms).
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// Name of this daemon when claiming work in a shared store.
    #[serde(default = "default_node")]
    pub node_name: String,
}

fn default_concurrency() -> usize {
    32
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
fn default_connect_timeout() -> u64 {
    5_000
}
fn default_node() -> String {
    "local".into()
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            concurrency: default_concurrency(),
            initial_backoff_ms: default_initial_backoff(),
            max_backoff_ms: default_max_backoff(),
            default_lifetime_seconds: default_lifetime(),
            connect_timeout_ms: default_connect_timeout(),
            node_name: default_node(),
        }
    }
}

impl DeliveryConfig {
    /// The connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
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
    pub fn may_send_to(&self, recipient: &PartyUri) -> bool {
        allows(&self.send_to, recipient.as_str())
    }
    /// May it send for `purpose`?
    pub fn may_send_for(&self, purpose: &str) -> bool {
        allows(&self.purposes, purpose)
    }
    /// May it read inbox items sent for `purpose`?
    pub fn may_read(&self, purpose: &str) -> bool {
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
        if self.delivery.concurrency == 0 || self.delivery.initial_backoff_ms == 0 {
            return Err(Error::Config(
                "delivery.concurrency and delivery.initial_backoff_ms must be positive".into(),
            ));
        }
        Ok(())
    }

    /// Anchor and CRL files of local client certificates, when they differ
    /// from the network's.
    pub fn client_trust_files(&self) -> Option<(&[PathBuf], &[PathBuf])> {
        if self.trust.client_anchors.is_empty() {
            return None;
        }
        Some((&self.trust.client_anchors, &self.trust.client_crls))
    }

    /// Every trust file (anchors and CRLs, network and client), to watch for changes.
    pub fn trust_files(&self) -> Vec<PathBuf> {
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
