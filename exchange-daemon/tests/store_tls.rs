//! TLS to PostgreSQL, against a cluster of the test's own that refuses
//! plain TCP connections (tests/common/pg_tls.rs): the store and the
//! offline snapshot work over verified TLS, and every way the server's
//! certificate can fail to verify is refused, promptly and by name.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::fixtures::{audit_entry, relayed};
use common::pg_tls::{CERT_USER, TlsCluster};
use exchange_core::MessageId;
use exchange_core::audit::AuditEntry;
use exchange_daemon::store::postgres::{PgOptions, PgStore, PgTls};
use exchange_daemon::store::{
    Accepted, Ciphertext, NewEnvelope, SchemaNeed, Store, StoreLocation, open_read_only,
};
use exchange_daemon::{Config, DbTlsError, Error, StoreError};

/// A refusal must come at once, not after a connect timeout.
const PROMPTLY: Duration = Duration::from_secs(20);

fn entry(detail: &str) -> AuditEntry {
    audit_entry("daemon", detail.into())
}

fn envelope(n: u8) -> NewEnvelope {
    let ciphertext = format!("ciphertext {n} that crossed TLS").into_bytes();
    let len = ciphertext.len() as u64;
    relayed(
        MessageId::from_bytes([n; 16]),
        "urn:test:sender",
        Ciphertext::Inline(ciphertext),
        len,
    )
}

fn ca_only(ca: &Path) -> PgTls {
    PgTls {
        ca: Some(ca.to_owned()),
        ..PgTls::default()
    }
}

async fn open(url: String, tls: PgTls, spool: &Path) -> Result<PgStore, StoreError> {
    tokio::time::timeout(
        PROMPTLY,
        PgStore::open(PgOptions {
            url,
            tls,
            node_name: "a".into(),
            max_connections: 4,
            spool_dir: spool.to_owned(),
        }),
    )
    .await
    .expect("opening the store hung instead of failing")
}

fn tls_error(r: Result<PgStore, StoreError>) -> DbTlsError {
    match r {
        Err(StoreError::DatabaseTls(e)) => e,
        Err(e) => panic!("expected a TLS refusal, got another error: {e}"),
        Ok(_) => panic!("expected a TLS refusal, but the store opened"),
    }
}

/// (a) With the CA that issued the server's certificate the store opens,
/// every connection it holds is TLS, and real operations (accept, audit
/// append, read back) go over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_opens_over_verified_tls_and_works() {
    let pg = TlsCluster::start();
    pg.create_db("tls_a", "postgres");
    let spool = tempfile::tempdir().unwrap();
    let store = open(
        pg.url("postgres", "tls_a", ""),
        ca_only(&pg.ca()),
        spool.path(),
    )
    .await
    .unwrap();

    let e = envelope(1);
    let (id, sender, len) = (e.id, e.sender.clone(), e.ciphertext_len);
    assert!(matches!(store.accept(e).await.unwrap(), Accepted::Stored));
    store
        .append_audit(None, vec![entry("over TLS")])
        .await
        .unwrap();
    let found = store.find(sender, id).await.unwrap().expect("stored");
    assert_eq!(found.ciphertext_len, len);
    let tail = store.audit_tail().await.unwrap();
    assert_eq!(tail.entries.len(), 2);
    assert!(
        AuditEntry::from_json(&tail.entries[1].1)
            .unwrap()
            .detail
            .is_some_and(|d| d == "over TLS")
    );

    // The name holder and the pooled connections: all TLS, none plain.
    let (tls, plain) = pg.connections("tls_a");
    assert!(
        tls >= 2,
        "expected the name holder and a pooled connection over TLS, saw {tls}"
    );
    assert_eq!(plain, 0);

    // The same, said by the URL in libpq's words.
    drop(store);
    let store = open(
        pg.url(
            "postgres",
            "tls_a",
            &format!("sslmode=verify-full&sslrootcert={}", pg.ca().display()),
        ),
        PgTls::default(),
        spool.path(),
    )
    .await
    .unwrap();
    assert_eq!(store.audit_tail().await.unwrap().entries.len(), 2);
}

/// (b) A CA that did not issue the server's certificate: refused as an
/// untrusted server, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_another_ca_is_refused() {
    let pg = TlsCluster::start();
    pg.create_db("tls_b", "postgres");
    let spool = tempfile::tempdir().unwrap();
    let e = tls_error(
        open(
            pg.url("postgres", "tls_b", "sslmode=require"),
            ca_only(&pg.other_ca()),
            spool.path(),
        )
        .await,
    );
    match &e {
        DbTlsError::UntrustedServer(why) => assert!(why.contains("UnknownIssuer"), "{why}"),
        other => panic!("expected an untrusted server, got {other:?}"),
    }
    // Not a statement reached the database: no schema was made.
    assert_eq!(
        pg.count(
            "tls_b",
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ),
        0
    );
}

/// (c) The right CA, but a certificate for another host name than the one
/// connected to: refused as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_for_another_name_is_refused() {
    let pg = TlsCluster::start_for("DNS:db.other.example");
    pg.create_db("tls_c", "postgres");
    let spool = tempfile::tempdir().unwrap();
    let e = tls_error(
        open(
            pg.url("postgres", "tls_c", ""),
            ca_only(&pg.ca()),
            spool.path(),
        )
        .await,
    );
    match &e {
        DbTlsError::WrongServerName { host, detail } => {
            assert_eq!(host, "127.0.0.1");
            assert!(detail.contains("db.other.example"), "{detail}");
        }
        other => panic!("expected a wrong server name, got {other:?}"),
    }
    // Connecting by the name the certificate does carry works (the TCP
    // connection still goes to 127.0.0.1).
    let url = format!(
        "host=db.other.example hostaddr=127.0.0.1 port={} user=postgres dbname=tls_c",
        pg.port
    );
    open(url, ca_only(&pg.ca()), spool.path()).await.unwrap();
}

/// (d) The harness really refuses plain text: a store told to connect
/// without TLS (explicitly, or by default to this machine without a CA) is
/// turned away by the server, so the TLS tests above are meaningful.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_refuses_plain_connections() {
    let pg = TlsCluster::start();
    pg.create_db("tls_d", "postgres");
    let spool = tempfile::tempdir().unwrap();
    for params in ["sslmode=disable", ""] {
        match open(
            pg.url("postgres", "tls_d", params),
            PgTls::default(),
            spool.path(),
        )
        .await
        {
            Err(StoreError::Backend { detail, .. }) => assert!(
                detail.contains("no encryption") && detail.contains("28000"),
                "{params}: {detail}"
            ),
            Err(e) => panic!("{params}: expected the server's refusal, got {e}"),
            Ok(_) => panic!("{params}: a plain connection was accepted"),
        }
    }
    assert!(pg.log().contains("no encryption"));
}

/// (e) The offline tools' read-only snapshot connects over verified TLS
/// too: with the URL's libpq parameters (`--store URL`), and with the
/// daemon's `[store] ca` (`--config`); a wrong CA is refused there as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_reads_over_verified_tls() {
    let pg = TlsCluster::start();
    pg.create_db("tls_e", "postgres");
    let spool = tempfile::tempdir().unwrap();
    let store = open(
        pg.url("postgres", "tls_e", ""),
        ca_only(&pg.ca()),
        spool.path(),
    )
    .await
    .unwrap();
    store.accept(envelope(5)).await.unwrap();
    store
        .append_audit(None, vec![entry("for the snapshot")])
        .await
        .unwrap();

    let by_url = StoreLocation::Url(pg.url(
        "postgres",
        "tls_e",
        &format!("sslmode=verify-full&sslrootcert={}", pg.ca().display()),
    ));
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(pg.ca(), dir.path().join("pg-ca.pem")).unwrap();
    let config = config_with_store(
        dir.path(),
        &format!(
            "url = \"{}\"\nca = \"pg-ca.pem\"",
            pg.url("postgres", "tls_e", "")
        ),
    )
    .unwrap();
    let by_config = StoreLocation::of_config(&config);
    for location in [by_url, by_config] {
        tokio::task::block_in_place(|| {
            let snap = open_read_only(&location, SchemaNeed::Current)
                .unwrap_or_else(|e| panic!("{location}: {e}"));
            let messages: Vec<_> = snap.messages().collect::<Result<_, _>>().unwrap();
            assert_eq!(messages.len(), 1, "{location}");
            assert_eq!(messages[0].message_id, vec![5; 16]);
            assert_eq!(snap.audit_len().unwrap(), Some(2), "{location}");
            // While the snapshot is open, nothing reaches the database in clear.
            assert_eq!(pg.connections("tls_e").1, 0, "{location}");
        });
    }

    let wrong = StoreLocation::Url(pg.url(
        "postgres",
        "tls_e",
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            pg.other_ca().display()
        ),
    ));
    let r = tokio::task::block_in_place(|| open_read_only(&wrong, SchemaNeed::Current).err());
    match r {
        Some(StoreError::DatabaseTls(DbTlsError::UntrustedServer(_))) => {}
        other => panic!("expected an untrusted server, got {other:?}"),
    }
}

/// A client certificate the CA issued authenticates a role whose
/// `pg_hba.conf` line says `cert`; without it the server refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_authenticates_to_the_server() {
    let pg = TlsCluster::start();
    pg.create_db("tls_g", CERT_USER);
    let spool = tempfile::tempdir().unwrap();
    let url = pg.url(CERT_USER, "tls_g", "");
    match open(url.clone(), ca_only(&pg.ca()), spool.path()).await {
        Err(StoreError::Backend { detail, .. }) => {
            assert!(detail.contains("certificate"), "{detail}");
        }
        Err(e) => panic!("expected the server's refusal, got {e}"),
        Ok(_) => panic!("{CERT_USER} was admitted without a client certificate"),
    }
    let (cert, key) = pg.client_cert();
    let tls = PgTls {
        ca: Some(pg.ca()),
        cert: Some(cert),
        key: Some(key),
    };
    let store = open(url, tls, spool.path()).await.unwrap();
    store
        .append_audit(None, vec![entry("as certuser")])
        .await
        .unwrap();
    assert_eq!(store.audit_tail().await.unwrap().entries.len(), 1);
}

/// A configuration with `[store]` set to `store` (in `dir`).
fn config_with_store(dir: &Path, store: &str) -> Result<Config, Error> {
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
peer = "127.0.0.1:7443"
client = "127.0.0.1:7444"
[store]
{store}
"#
    );
    Config::parse(&text, dir)
}

/// (f) TLS settings that cannot work are configuration errors, each saying
/// what to do.
#[test]
fn unusable_tls_settings_are_configuration_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("garbage.pem"), "not a certificate\n").unwrap();
    let refused = |store: &str| match config_with_store(d, store) {
        Err(Error::Config(m)) => m,
        Err(e) => panic!("{store}: expected a configuration error, got {e}"),
        Ok(_) => panic!("{store}: accepted"),
    };

    let m = refused("url = \"postgres://127.0.0.1/x?sslmode=require\"");
    assert!(
        m.contains("no CA is given") && m.contains("[store] ca"),
        "{m}"
    );
    let m = refused("url = \"postgres://127.0.0.1/x\"\nca = \"missing.pem\"");
    assert!(
        m.contains(&d.join("missing.pem").display().to_string()) && m.contains("No such file"),
        "{m}"
    );
    let m = refused("url = \"postgres://127.0.0.1/x\"\nca = \"garbage.pem\"");
    assert!(
        m.contains("garbage.pem") && m.contains("no PEM certificate"),
        "{m}"
    );
    let m = refused("url = \"postgres://db.example/x\"");
    assert!(
        m.contains("not on this machine") && m.contains("sslmode=disable"),
        "{m}"
    );
    let m = refused("url = \"postgres://127.0.0.1/x?sslmode=verify-full\"\ncert = \"c.pem\"");
    assert!(m.contains("give both or neither"), "{m}");
    let m = refused("ca = \"ca.pem\"");
    assert!(m.contains("set [store] url"), "{m}");
    let m = refused("url = \"postgres://127.0.0.1/x?sslmode=allow\"");
    assert!(m.contains("sslmode=allow is not supported"), "{m}");

    // Said knowingly, plain text to another machine is accepted (and
    // logged as a warning when the store connects).
    config_with_store(d, "url = \"postgres://db.example/x?sslmode=disable\"").unwrap();
    // The default for this machine stays plain and needs no CA.
    config_with_store(d, "url = \"postgres://127.0.0.1/x\"").unwrap();
}

/// `exchanged` with `[store] ca`: the daemon keeps its store over TLS
/// (every connection it holds, the first start's read of the store for
/// its pseudonym key included), and with a CA that did not issue the
/// server's certificate it does not start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_with_a_store_ca_connects_over_tls_only() {
    let pg = TlsCluster::start();
    pg.create_db("tls_daemon", "postgres");
    let net = common::Net::new();
    let party = net.party("clinic", "urn:test:clinic");
    let url = pg.url("postgres", "tls_daemon", "");

    net.configure(
        &party,
        &[],
        &[],
        &format!(
            "\n[store]\nurl = \"{url}\"\nca = \"{}\"\n",
            pg.other_ca().display()
        ),
    );
    match exchange_daemon::Daemon::start(party.config()).await {
        Err(Error::Store(StoreError::DatabaseTls(DbTlsError::UntrustedServer(_)))) => {}
        Err(e) => panic!("expected an untrusted server, got {e}"),
        Ok(_) => panic!("the daemon started with a CA that did not issue the server's certificate"),
    }

    net.configure(
        &party,
        &[],
        &[],
        &format!(
            "\n[store]\nurl = \"{url}\"\nca = \"{}\"\n",
            pg.ca().display()
        ),
    );
    let daemon = common::start(&party).await;
    let (tls, plain) = pg.connections("tls_daemon");
    assert!(tls >= 1, "no TLS connection from the daemon");
    assert_eq!(plain, 0);
    daemon.shutdown().await;
}
