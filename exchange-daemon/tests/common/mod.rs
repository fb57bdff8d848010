//! A test network on loopback: a CA, parties with real certificate files,
//! configuration files, daemons started in-process or as `exchanged`
//! processes, and clients speaking real mutual TLS.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs
)]

use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use exchange_core::PartyUri;
use exchange_core::ca::{CertificateAuthority, CrlState, RevokedSerial, Validity};
use exchange_core::identity::{Certificate, Identity};
use exchange_core::trust::TrustStore;
use exchange_daemon::client::{ClientSettings, connect};
use exchange_daemon::proto::client_client::ClientClient;
use exchange_daemon::proto::peer_client::PeerClient;
use exchange_daemon::proto::{
    MessageStatus, SendRequest, SendStart, StatusRequest, SubjectIdentifier, send_request,
};
use exchange_daemon::store::{ReadOnlyStore, SchemaNeed, StoreLocation};
use exchange_daemon::tls::{self, TlsIdentity};
use exchange_daemon::{Config, Daemon};
use tonic::transport::Channel;

pub mod fixtures;
pub mod openssl_pki;
pub mod pg;
pub mod pg_tls;
pub mod replicas;

pub const CLINIC: &str = "urn:jp:mhlw:facility:1310000013";
pub const HOSPITAL: &str = "urn:jp:mhlw:facility:1310000021";
pub const AGENT: &str = "urn:jp:example:agent:claims-agent-01";
pub const PAYER: &str = "urn:jp:example:payer:shiharai-kikin-13";
pub const OTHER: &str = "urn:jp:mhlw:facility:1310000039";

/// A free loopback port for a daemon to listen on. Taken below the
/// kernel's ephemeral range (32768-60999 on Linux), so that the outgoing
/// connections of tests running in parallel cannot grab it between this
/// check and the daemon's bind; each call in a process gets another port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = (std::process::id() % 200) * 60;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(LOW + (base + n) % SPAN).unwrap();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// One party's files and addresses.
#[derive(Debug, Clone)]
pub struct Party {
    pub name: String,
    pub uri: String,
    pub dir: PathBuf,
    pub peer_port: u16,
    pub client_port: u16,
}

impl Party {
    pub fn party(&self) -> PartyUri {
        PartyUri::new(self.uri.clone()).unwrap()
    }
    pub fn peer_addr(&self) -> String {
        format!("127.0.0.1:{}", self.peer_port)
    }
    pub fn client_addr(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("exchanged.toml")
    }
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
    pub fn identity(&self) -> Identity {
        Identity::from_pem(
            &std::fs::read(self.file("identity.pem")).unwrap(),
            &std::fs::read(self.file("identity.key.pem")).unwrap(),
        )
        .unwrap()
    }
    pub fn tls_identity(&self) -> TlsIdentity {
        TlsIdentity::from_pem(
            &std::fs::read(self.file("identity.pem")).unwrap(),
            &std::fs::read(self.file("identity.key.pem")).unwrap(),
        )
        .unwrap()
    }
    pub fn config(&self) -> Config {
        Config::load(&self.config_path()).unwrap()
    }
}

/// A local client certificate.
#[derive(Debug, Clone)]
pub struct LocalClient {
    pub uri: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA and the parties it certified, under one temporary directory.
pub struct Net {
    pub dir: tempfile::TempDir,
    pub ca: CertificateAuthority,
    pub now: SystemTime,
    revoked: Vec<RevokedSerial>,
    /// With `EXCHANGE_TEST_STORE=postgres`: each party's database, by name
    /// (dropped with the network).
    databases: std::sync::Mutex<std::collections::HashMap<String, Arc<pg::TestDb>>>,
}

pub fn validity(now: SystemTime) -> Validity {
    Validity::days_from(now, 30)
}

impl Net {
    pub fn new() -> Self {
        let now = SystemTime::now();
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("Test Regional Network CA", validity(now)).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.certificate_pem()).unwrap();
        let net = Self {
            dir,
            ca,
            now,
            revoked: Vec::new(),
            databases: std::sync::Mutex::default(),
        };
        net.write_crl();
        net
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write_crl(&self) {
        let state = CrlState {
            number: self.revoked.len() as u64 + 1,
            revoked: self.revoked.clone(),
        };
        let crl = self
            .ca
            .crl(
                &state,
                self.now - Duration::from_secs(60),
                self.now + Duration::from_secs(86_400),
            )
            .unwrap();
        std::fs::write(self.path("crl.pem"), crl).unwrap();
    }

    /// Revokes a certificate file (rewrites crl.pem; daemons read it at start).
    pub fn revoke(&mut self, cert: &Path) {
        let c = Certificate::from_pem(&std::fs::read(cert).unwrap())
            .unwrap()
            .remove(0);
        self.revoked.push(RevokedSerial {
            serial: hex::decode(c.serial_hex()).unwrap(),
            revoked_at: self.now - Duration::from_secs(30),
        });
        self.write_crl();
    }

    /// Issues a party's credentials into `<dir>/<name>/`.
    pub fn party(&self, name: &str, uri: &str) -> Party {
        let dir = self.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        let creds = self
            .ca
            .issue_party(&PartyUri::new(uri).unwrap(), name, validity(self.now))
            .unwrap();
        std::fs::write(dir.join("identity.pem"), &creds.identity.cert_pem).unwrap();
        std::fs::write(
            dir.join("identity.key.pem"),
            creds.identity.key_pem.as_bytes(),
        )
        .unwrap();
        std::fs::write(dir.join("encryption.pem"), &creds.encryption.cert_pem).unwrap();
        std::fs::write(
            dir.join("encryption.key.pem"),
            creds.encryption.key_pem.as_bytes(),
        )
        .unwrap();
        Party {
            name: name.into(),
            uri: uri.into(),
            dir,
            peer_port: free_port(),
            client_port: free_port(),
        }
    }

    /// A local client certificate (identity profile) from this CA.
    pub fn client(&self, name: &str, uri: &str) -> LocalClient {
        issue_client(
            &self.ca,
            self.now,
            &self.path(&format!("client-{name}")),
            uri,
        )
    }

    /// Writes `party`'s configuration: it knows `peers`, serves `clients`;
    /// `extra` is appended verbatim (TOML).
    pub fn configure(
        &self,
        party: &Party,
        peers: &[&Party],
        clients: &[&LocalClient],
        extra: &str,
    ) {
        self.configure_roles(party, peers, clients, extra, &[]);
    }

    /// [`Net::configure`], with the contracted role of some peers
    /// (`entrusted` or `third-party`; the others are left to the default).
    pub fn configure_roles(
        &self,
        party: &Party,
        peers: &[&Party],
        clients: &[&LocalClient],
        extra: &str,
        roles: &[(&Party, &str)],
    ) {
        let mut s = String::new();
        writeln!(
            s,
            r#"data_dir = "data"
log = "debug"

[identity]
cert = "identity.pem"
key = "identity.key.pem"
encryption_cert = "encryption.pem"
encryption_key = "encryption.key.pem"

[trust]
anchors = ["{ca}"]
crls = ["{crl}"]

[listen]
peer = "127.0.0.1:{pp}"
client = "127.0.0.1:{cp}"

[delivery]
initial_backoff_ms = 100
max_backoff_ms = 1000
"#,
            ca = self.path("ca.pem").display(),
            crl = self.path("crl.pem").display(),
            pp = party.peer_port,
            cp = party.client_port,
        )
        .unwrap();
        s.push_str(extra);
        if pg::suites_on_postgres() && !extra.contains("[store]") {
            let db = Arc::clone(
                self.databases
                    .lock()
                    .unwrap()
                    .entry(party.name.clone())
                    .or_insert_with(|| Arc::new(pg::TestDb::new())),
            );
            let url = db.url();
            writeln!(s, "\n[store]\nurl = \"{url}\"").unwrap();
            std::fs::write(party.dir.join(STORE_URL_FILE), url).unwrap();
        }
        for p in peers {
            writeln!(
                s,
                "\n[[peer]]\nparty = \"{}\"\naddress = \"{}\"\nencryption_cert = \"{}\"",
                p.uri,
                p.peer_addr(),
                p.file("encryption.pem").display()
            )
            .unwrap();
            if let Some((_, role)) = roles.iter().find(|(r, _)| r.uri == p.uri) {
                writeln!(s, "role = \"{role}\"").unwrap();
            }
        }
        for c in clients {
            writeln!(
                s,
                "\n[[client]]\nname = \"app\"\nparty = \"{}\"\nsend_to = [\"*\"]\npurposes = [\"treatment\", \"claims\"]\nread_purposes = [\"*\"]",
                c.uri
            )
            .unwrap();
        }
        std::fs::write(party.config_path(), s).unwrap();
    }
}

pub fn issue_client(
    ca: &CertificateAuthority,
    now: SystemTime,
    dir: &Path,
    uri: &str,
) -> LocalClient {
    std::fs::create_dir_all(dir).unwrap();
    let creds = ca
        .issue_party(
            &PartyUri::new(uri).unwrap(),
            "local application",
            validity(now),
        )
        .unwrap();
    let cert = dir.join("client.pem");
    let key = dir.join("client.key.pem");
    std::fs::write(&cert, &creds.identity.cert_pem).unwrap();
    std::fs::write(&key, creds.identity.key_pem.as_bytes()).unwrap();
    LocalClient {
        uri: uri.into(),
        cert,
        key,
    }
}

/// Starts `party`'s daemon in-process from its configuration file.
pub async fn start(party: &Party) -> Daemon {
    Daemon::start(party.config()).await.unwrap()
}

/// A client of `party`'s daemon as `client`.
pub fn client_of(net: &Net, party: &Party, client: &LocalClient) -> ClientClient<Channel> {
    connect(&ClientSettings {
        address: party.client_addr(),
        server_party: party.party(),
        anchors_pem: std::fs::read(net.path("ca.pem")).unwrap(),
        crls_pem: Some(std::fs::read(net.path("crl.pem")).unwrap()),
        identity: TlsIdentity::from_pem(
            &std::fs::read(&client.cert).unwrap(),
            &std::fs::read(&client.key).unwrap(),
        )
        .unwrap(),
        allow_tls12: false,
    })
    .unwrap()
}

/// A peer-service client to `to`, authenticating as `as_party`'s identity.
pub fn peer_client(net: &Net, to: &Party, identity: &TlsIdentity) -> PeerClient<Channel> {
    tls::install_provider();
    let trust = TrustStore::builder()
        .anchors_pem(&std::fs::read(net.path("ca.pem")).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let config = tls::client_config(
        Arc::new(trust),
        to.party(),
        Some(identity),
        tls::versions(false),
    )
    .unwrap();
    PeerClient::new(tls::channel(&to.peer_addr(), config, Duration::from_secs(5)).unwrap())
}

pub fn referral_start(to: &[&Party], relays: &[&str], purpose: &str) -> SendStart {
    SendStart {
        recipients: to.iter().map(|p| p.uri.clone()).collect(),
        relays: relays.iter().map(|s| (*s).to_owned()).collect(),
        content_type: "application/fhir+json".into(),
        purpose: purpose.into(),
        subject_ids: vec![SubjectIdentifier {
            system: "urn:oid:1.2.392.100495.20.3.51.11310000013".into(),
            value: "P-000123".into(),
        }],
        title: "診療情報提供書".into(),
        document_type: "57133-1".into(),
        file_name: "referral.json".into(),
        ..SendStart::default()
    }
}

/// Sends `data` in 64 KiB slices; returns the message id.
pub async fn send(
    client: &mut ClientClient<Channel>,
    start: SendStart,
    data: &[u8],
) -> Result<Vec<u8>, tonic::Status> {
    let mut msgs = vec![SendRequest {
        part: Some(send_request::Part::Start(start)),
    }];
    for c in data.chunks(64 * 1024) {
        msgs.push(SendRequest {
            part: Some(send_request::Part::Chunk(c.to_vec())),
        });
    }
    let r = client.send(tokio_stream::iter(msgs)).await?;
    Ok(r.into_inner().message_id)
}

/// Polls the status until `until` holds (or 30 s pass: then panics with the last status).
pub async fn wait_status(
    client: &mut ClientClient<Channel>,
    id: &[u8],
    until: impl Fn(&MessageStatus) -> bool,
) -> MessageStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = client
            .status(StatusRequest {
                message_id: id.to_vec(),
            })
            .await
            .unwrap()
            .into_inner();
        if until(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "status never reached the expected state: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// Helpers for the rejection and crash tests (appended; nothing above changed).
// ---------------------------------------------------------------------------

/// A `[[client]]` block with an explicit role, to pass in `configure`'s
/// `extra` (arrays of tables may come before the `[[peer]]` blocks).
pub fn client_block(
    name: &str,
    client: &LocalClient,
    send_to: &[&str],
    purposes: &[&str],
    read_purposes: &[&str],
) -> String {
    let list = |l: &[&str]| {
        l.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "\n[[client]]\nname = \"{name}\"\nparty = \"{}\"\nsend_to = [{}]\npurposes = [{}]\nread_purposes = [{}]\n",
        client.uri,
        list(send_to),
        list(purposes),
        list(read_purposes)
    )
}

/// The network's trust anchors and current CRL.
pub fn net_trust(net: &Net) -> TrustStore {
    TrustStore::builder()
        .anchors_pem(&std::fs::read(net.path("ca.pem")).unwrap())
        .unwrap()
        .crls_pem(&std::fs::read(net.path("crl.pem")).unwrap())
        .unwrap()
        .build()
        .unwrap()
}

/// Seals `payload` as `sender` to `to` (THIRD_PARTY) with exchange-core
/// directly: created at `created`, valid for `lifetime`.
pub fn seal_to(
    net: &Net,
    sender: &Party,
    to: &Party,
    purpose: &str,
    payload: &[u8],
    created: SystemTime,
    lifetime: Duration,
) -> (exchange_core::envelope::EnvelopeHead, Vec<u8>) {
    let identity = sender.identity();
    // Anchors only: the sender may be revoked on purpose; the recipient's
    // encryption certificate is what is checked here.
    let trust = TrustStore::builder()
        .anchors_pem(&std::fs::read(net.path("ca.pem")).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let cert = Certificate::from_pem(&std::fs::read(to.file("encryption.pem")).unwrap())
        .unwrap()
        .remove(0);
    let key = trust.verify_encryption(&cert, SystemTime::now()).unwrap();
    let mut rng = rand_core::UnwrapErr(getrandom::SysRng);
    let mut sealer = exchange_core::envelope::SealerBuilder::new(&identity, "application/pdf")
        .recipient(key, exchange_core::route::HopRole::ThirdParty)
        .purpose(purpose)
        .lifetime(lifetime)
        .start(created, &mut rng)
        .unwrap();
    let mut ct = Vec::new();
    sealer.update(payload, &mut ct);
    let head = sealer.finish(&mut ct);
    (head, ct)
}

/// Seals `payload` as `sender` to `to` for "treatment", now, for an hour.
pub fn seal_now(
    net: &Net,
    sender: &Party,
    to: &Party,
    payload: &[u8],
) -> (exchange_core::envelope::EnvelopeHead, Vec<u8>) {
    seal_to(
        net,
        sender,
        to,
        "treatment",
        payload,
        SystemTime::now(),
        Duration::from_secs(3600),
    )
}

/// Delivers a sealed envelope over the peer service (head, then 64 KiB slices).
pub async fn deliver(
    peer: &mut PeerClient<Channel>,
    head: &exchange_core::envelope::EnvelopeHead,
    ct: &[u8],
) -> Result<Vec<u8>, tonic::Status> {
    use exchange_daemon::proto::{DeliverRequest, deliver_request};
    let mut msgs = vec![DeliverRequest {
        part: Some(deliver_request::Part::Head(head.as_bytes().to_vec())),
    }];
    for c in ct.chunks(64 * 1024) {
        msgs.push(DeliverRequest {
            part: Some(deliver_request::Part::Chunk(c.to_vec())),
        });
    }
    let r = peer.deliver(tokio_stream::iter(msgs)).await?;
    Ok(r.into_inner().receipt)
}

/// A client-service client of `party` with full control over what it
/// presents: `identity` (None: no client certificate) and TLS `versions`.
/// It validates the daemon's certificate exactly as [`client_of`] does.
pub fn raw_client(
    net: &Net,
    party: &Party,
    identity: Option<&TlsIdentity>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> ClientClient<Channel> {
    tls::install_provider();
    let config =
        tls::client_config(Arc::new(net_trust(net)), party.party(), identity, versions).unwrap();
    ClientClient::new(tls::channel(&party.client_addr(), config, Duration::from_secs(5)).unwrap())
}

/// A local client's certificate and key as a TLS identity.
pub fn client_tls_identity(client: &LocalClient) -> TlsIdentity {
    TlsIdentity::from_pem(
        &std::fs::read(&client.cert).unwrap(),
        &std::fs::read(&client.key).unwrap(),
    )
    .unwrap()
}

/// Every error in `e`'s source chain, Debug-formatted, for assertions on
/// where a failure came from (e.g. the TLS alert a daemon sent).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = format!("{e:?}");
    let mut source = e.source();
    while let Some(s) = source {
        write!(out, " <- {s:?}").unwrap();
        source = s.source();
    }
    out
}

/// What a party's store directory holds, read from the documented on-disk
/// format (store/sqlite/mod.rs and schema.rs module docs) with a read-only
/// connection.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StoreCounts {
    pub messages: u64,
    pub deliveries: u64,
    pub pending_deliveries: u64,
    pub receipts: u64,
    pub blob_files: usize,
    pub spool_files: usize,
}

/// Where [`Net::configure`] notes a party's PostgreSQL database.
const STORE_URL_FILE: &str = "store-url";

/// The URL of `party`'s PostgreSQL database, if it runs on one.
pub fn store_url(party: &Party) -> Option<String> {
    std::fs::read_to_string(party.dir.join(STORE_URL_FILE)).ok()
}

/// Where the offline tools read `party`'s store: its PostgreSQL database
/// if it runs on one, else its data directory.
pub fn store_location(party: &Party) -> StoreLocation {
    match store_url(party) {
        Some(url) => StoreLocation::Url(url),
        None => StoreLocation::Dir(party.data_dir()),
    }
}

/// `party`'s store, read-only, as the offline tools read it (one
/// consistent view until `end_snapshot`).
pub fn read_store(party: &Party) -> Box<dyn ReadOnlyStore> {
    exchange_daemon::store::open_read_only(&store_location(party), SchemaNeed::Current).unwrap()
}

/// Runs statements on `party`'s store behind the daemon's back (to damage
/// it on purpose): `sqlite` on its SQLite database, or `postgres` on its
/// PostgreSQL database.
pub fn tamper(party: &Party, sqlite: &str, postgres: &str) {
    match store_url(party) {
        Some(url) => pg::execute(&url, postgres),
        None => {
            let conn = rusqlite::Connection::open(party.data_dir().join("store.sqlite3")).unwrap();
            conn.busy_timeout(Duration::from_secs(10)).unwrap();
            conn.execute_batch(sqlite).unwrap();
        }
    }
}

/// Runs `sql`, a query whose one column is an integer (`bigint` on
/// PostgreSQL), on `party`'s store; its values.
pub fn store_ints(party: &Party, sql: &str) -> Vec<i64> {
    match store_url(party) {
        Some(url) => pg::query(&url, sql, |r| r.get(0)),
        None => {
            let conn = rusqlite::Connection::open_with_flags(
                party.data_dir().join("store.sqlite3"),
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .unwrap();
            conn.prepare(sql)
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        }
    }
}

/// Runs `sql`, a query whose columns are all text, on `party`'s store;
/// its rows.
pub fn store_texts(party: &Party, sql: &str) -> Vec<Vec<String>> {
    fn pg_row(r: &tokio_postgres::Row) -> Vec<String> {
        (0..r.len()).map(|i| r.get(i)).collect()
    }
    match store_url(party) {
        Some(url) => pg::query(&url, sql, pg_row),
        None => {
            let conn = rusqlite::Connection::open_with_flags(
                party.data_dir().join("store.sqlite3"),
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .unwrap();
            let mut stmt = conn.prepare(sql).unwrap();
            let n = stmt.column_count();
            stmt.query_map([], |r| (0..n).map(|i| r.get(i)).collect())
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        }
    }
}

/// `bytes` as an SQL literal of `party`'s store (for [`tamper`]).
pub fn bytes_sql(party: &Party, bytes: &[u8]) -> String {
    if store_url(party).is_some() {
        format!("'\\x{}'::bytea", hex::encode(bytes))
    } else {
        format!("x'{}'", hex::encode(bytes))
    }
}

/// Every byte `party` stores: the files of its data directory (database,
/// WAL, blobs, keys) and, on PostgreSQL, every value of every row of its
/// database (`bytea` as stored, the rest as text).
pub fn stored_bytes(party: &Party) -> Vec<u8> {
    fn files(dir: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(files(&p));
            } else {
                out.extend(std::fs::read(&p).unwrap());
            }
        }
        out
    }
    let mut out = files(&party.data_dir());
    if let Some(url) = store_url(party) {
        out.extend(pg::all_values(&url));
    }
    out
}

pub fn store_counts(party: &Party) -> StoreCounts {
    let dir = party.data_dir();
    let files = |d: &str| {
        std::fs::read_dir(dir.join(d))
            .map(|r| r.count())
            .unwrap_or(0)
    };
    if let Some(url) = store_url(party) {
        let count = |sql: &str| pg::count(&url, sql);
        return StoreCounts {
            messages: count("SELECT count(*) FROM messages"),
            deliveries: count("SELECT count(*) FROM deliveries"),
            pending_deliveries: count("SELECT count(*) FROM deliveries WHERE state = 'pending'"),
            receipts: count("SELECT count(*) FROM receipts"),
            // Ciphertexts kept in chunks (PostgreSQL has no blob files).
            blob_files: usize::try_from(count("SELECT count(*) FROM messages WHERE chunked"))
                .unwrap(),
            spool_files: files("spool"),
        };
    }
    let conn = rusqlite::Connection::open_with_flags(
        dir.join("store.sqlite3"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let count = |sql: &str| -> u64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
    StoreCounts {
        messages: count("SELECT count(*) FROM messages"),
        deliveries: count("SELECT count(*) FROM deliveries"),
        pending_deliveries: count("SELECT count(*) FROM deliveries WHERE state = 'pending'"),
        receipts: count("SELECT count(*) FROM receipts"),
        blob_files: files("blobs"),
        spool_files: files("spool"),
    }
}

/// Asserts that `daemon` (serving `party`) holds nothing at all: no inbox
/// item, no pending work, no row in any table, no blob and no spool file.
/// A spool file of a refused stream is removed when its writer task ends,
/// so the file counts are polled for a moment.
pub async fn assert_nothing_stored(daemon: &Daemon, party: &Party) {
    let store = daemon.node().store();
    assert!(
        store.inbox(true).await.unwrap().is_empty(),
        "inbox not empty"
    );
    assert_eq!(
        store.pending_count().await.unwrap(),
        0,
        "pending deliveries"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let counts = store_counts(party);
        if counts == StoreCounts::default() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} stored something: {counts:?}",
            party.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Makes a bare TLS handshake with `addr` (a listener of `server`'s daemon)
/// presenting `identity` and offering `versions`, then waits a second for
/// the server's verdict without sending anything. `Err` carries the error
/// chain when the server refused (with TLS 1.3 a refused client certificate
/// shows only as an alert after the client's side of the handshake is done;
/// over gRPC that alert can be lost to a connection reset, here it cannot).
pub async fn tls_verdict(
    net: &Net,
    server: &Party,
    addr: &str,
    identity: Option<&TlsIdentity>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    tls::install_provider();
    let config =
        tls::client_config(Arc::new(net_trust(net)), server.party(), identity, versions).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(
        std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST).into(),
    );
    let mut stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| error_chain(&e))?;
    let mut buf = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await {
        Err(_) => Ok(()),
        Ok(Ok(0)) => Err("closed without an alert".into()),
        Ok(Ok(_)) => Err("unexpected application data".into()),
        Ok(Err(e)) => Err(error_chain(&e)),
    }
}

/// A TLS connection as a test's own gRPC server sees it.
pub struct ServerIo(pub tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for ServerIo {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl tokio::io::AsyncRead for ServerIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for ServerIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Serves a test's own peer service on `party`'s peer address, over real
/// TLS with `party`'s identity certificate (the daemon connecting to it
/// checks that it is `party`), without client authentication: a peer that
/// misbehaves in ways a real daemon does not.
pub async fn serve_peer<S>(party: &Party, service: S)
where
    S: exchange_daemon::proto::peer_server::Peer,
{
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    tls::install_provider();
    let chain = CertificateDer::pem_file_iter(party.file("identity.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(party.file("identity.key.pem")).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(tls::versions(false))
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(party.peer_addr())
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<ServerIo, std::io::Error>>(16);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = tx.send(Ok(ServerIo(tls))).await;
                }
            });
        }
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(exchange_daemon::proto::peer_server::PeerServer::new(
                service,
            ))
            .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(rx)),
    );
}

/// The audit log entries of a party's store (their canonical JSON), in order.
pub fn audit_entries(party: &Party) -> Vec<String> {
    read_store(party)
        .audit_entries(None, None)
        .map(|row| String::from_utf8_lossy(&row.unwrap().entry).into_owned())
        .collect()
}
