//! A node for unit tests: fresh credentials and store in a temporary
//! directory, one peer that never answers, one local client, and a test
//! clock that the test advances.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use exchange_core::PartyUri;
use exchange_core::ca::{CertificateAuthority, CrlState, Validity};

use super::send::SendOrder;
use super::{Node, Pieces};
use crate::clock::TestClock;
use crate::config::{ClientConfig, Config};
use crate::error::Error;
use crate::store::sqlite::SqliteStore;

/// The node's party.
pub(crate) const US: &str = "urn:t:clinic";
/// Its only peer, at an address nothing listens on.
pub(crate) const PEER: &str = "urn:t:hospital";
/// Its only local client (may send anything to anyone for treatment).
pub(crate) const CLIENT: &str = "urn:local:clinic:emr";

/// A node, its clock, and the directory holding its files.
pub(crate) struct Fixture {
    pub(crate) node: Arc<Node>,
    pub(crate) clock: Arc<TestClock>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// The local client's configuration.
    pub(crate) fn client(&self) -> ClientConfig {
        let party = PartyUri::new(CLIENT).unwrap();
        self.node.client(&party).unwrap().clone()
    }
}

/// A node configured with `extra` (TOML tables) on a clock standing at the
/// system's time now.
pub(crate) fn node(extra: &str) -> Fixture {
    crate::tls::install_provider();
    let now = SystemTime::now();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| std::fs::write(dir.path().join(name), bytes).unwrap();
    let validity = Validity::days_from(now - Duration::from_secs(60), 30);
    let ca = CertificateAuthority::generate("Test CA", validity).unwrap();
    write("ca.pem", ca.certificate_pem().as_bytes());
    let crl = ca
        .crl(
            &CrlState {
                number: 1,
                revoked: Vec::new(),
            },
            now - Duration::from_secs(60),
            now + Duration::from_secs(86_400),
        )
        .unwrap();
    write("crl.pem", crl.as_bytes());
    let issue = |uri: &str| {
        ca.issue_party(&PartyUri::new(uri).unwrap(), uri, validity)
            .unwrap()
    };
    let us = issue(US);
    write("identity.pem", us.identity.cert_pem.as_bytes());
    write("identity.key.pem", us.identity.key_pem.as_bytes());
    write("encryption.pem", us.encryption.cert_pem.as_bytes());
    write("encryption.key.pem", us.encryption.key_pem.as_bytes());
    write(
        "peer-encryption.pem",
        issue(PEER).encryption.cert_pem.as_bytes(),
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let text = format!(
        r#"data_dir = "data"

[identity]
cert = "identity.pem"
key = "identity.key.pem"
encryption_cert = "encryption.pem"
encryption_key = "encryption.key.pem"

[trust]
anchors = ["ca.pem"]
crls = ["crl.pem"]

[listen]
peer = "127.0.0.1:0"
client = "127.0.0.1:0"

[limits]
min_free_disk_bytes = 0

{extra}

[[peer]]
party = "{PEER}"
address = "{closed}"
encryption_cert = "peer-encryption.pem"

[[client]]
name = "app"
party = "{CLIENT}"
send_to = ["*"]
purposes = ["treatment"]
read_purposes = ["*"]
"#
    );
    let config = Config::parse(&text, dir.path()).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let store = Arc::new(SqliteStore::open(&data).unwrap());
    let clock = Arc::new(TestClock::at(now));
    let node = Arc::new(Node::with_clock(config, store, clock.clone()).unwrap());
    Fixture {
        node,
        clock,
        _dir: dir,
    }
}

/// A Send to [`PEER`] for treatment, living `lifetime`.
pub(crate) fn order(lifetime: Duration) -> SendOrder {
    SendOrder {
        recipients: vec![PEER.to_owned()],
        content_type: "text/plain".into(),
        purpose: "treatment".into(),
        lifetime_seconds: lifetime.as_secs(),
        ..SendOrder::default()
    }
}

/// A body streamed in the given pieces.
pub(crate) struct Chunks(pub(crate) VecDeque<Vec<u8>>);

impl Chunks {
    /// `data` in one piece.
    pub(crate) fn of(data: &[u8]) -> Self {
        Self(VecDeque::from([data.to_vec()]))
    }
}

impl Pieces for Chunks {
    async fn next_piece(&mut self) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.0.pop_front())
    }
}
