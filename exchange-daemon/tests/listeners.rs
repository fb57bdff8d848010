//! The client listener as stock gRPC clients see it: a server certificate
//! valid for host names, and the client service on a Unix domain socket.
//! The peer side keeps its party-URI pin.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use exchange_core::ca::CertificateAuthority;
use exchange_daemon::client::{ClientSettings, connect};
use exchange_daemon::proto::ListInboxRequest;
use exchange_daemon::tls;
use exchange_daemon::{Config, Daemon};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::AsyncReadExt;

/// Issues a server certificate for `dns` and 127.0.0.1 into `dir`.
fn server_cert(net: &Net, dir: &Path, dns: &[&str]) -> (PathBuf, PathBuf) {
    server_cert_for(net, dir, None, dns)
}

/// [`server_cert`], naming `party` too.
fn server_cert_for(
    net: &Net,
    dir: &Path,
    party: Option<&Party>,
    dns: &[&str],
) -> (PathBuf, PathBuf) {
    let party = party.map(Party::party);
    let issued = net
        .ca
        .issue_tls_server(
            "client listener",
            party.as_ref(),
            &dns.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
            &[std::net::IpAddr::from([127, 0, 0, 1])],
            validity(net.now),
        )
        .unwrap();
    let (cert, key) = (dir.join("server.pem"), dir.join("server.key.pem"));
    std::fs::write(&cert, &issued.cert_pem).unwrap();
    std::fs::write(&key, issued.key_pem.as_bytes()).unwrap();
    (cert, key)
}

/// Adds `keys` (TOML lines) to the `[listen]` table of `party`'s config.
fn add_listen_keys(party: &Party, keys: &str) {
    let text = std::fs::read_to_string(party.config_path())
        .unwrap()
        .replace("[listen]\n", &format!("[listen]\n{keys}\n"));
    std::fs::write(party.config_path(), text).unwrap();
}

/// A client that checks the server the way stock gRPC libraries do:
/// rustls's standard web-PKI verifier over the network CA and the host name
/// dialled, presenting `client`'s certificate. `Ok` once the server has
/// accepted the handshake (it then waits for the HTTP/2 preface).
async fn stock_handshake(
    net: &Net,
    addr: &str,
    name: &str,
    client: &LocalClient,
) -> Result<(), String> {
    tls::install_provider();
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_file_iter(net.path("ca.pem")).unwrap() {
        roots.add(der.unwrap()).unwrap();
    }
    let chain = CertificateDer::pem_file_iter(&client.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&client.key).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(tls::versions(false))
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| error_chain(&e))?;
    verdict(&mut stream).await
}

/// After a completed client handshake: `Ok` once the server sent HTTP/2
/// data (its SETTINGS: it accepted our certificate) or stayed silent for a
/// second; `Err` with the alert when it refused.
async fn verdict<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Result<(), String> {
    let mut buf = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await {
        Err(_) | Ok(Ok(1..)) => Ok(()),
        Ok(Ok(0)) => Err("closed without an alert".into()),
        Ok(Err(e)) => Err(error_chain(&e)),
    }
}

/// A handshake as a peer daemon makes it: the server must validate and
/// name `expected` (the party-URI pin), presenting `identity`.
async fn pinned_handshake(
    net: &Net,
    addr: &str,
    expected: &Party,
    identity: &tls::TlsIdentity,
) -> Result<(), String> {
    tls::install_provider();
    let config = tls::client_config(
        Arc::new(net_trust(net)),
        expected.party(),
        Some(identity),
        tls::versions(false),
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
    let mut stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| error_chain(&e))?;
    verdict(&mut stream).await
}

fn settings(net: &Net, address: String, server: &Party, client: &LocalClient) -> ClientSettings {
    ClientSettings {
        address,
        server_party: server.party(),
        anchors_pem: std::fs::read(net.path("ca.pem")).unwrap(),
        crls_pem: Some(std::fs::read(net.path("crl.pem")).unwrap()),
        identity: client_tls_identity(client),
        allow_tls12: false,
    }
}

/// A host-name-checking client (as grpcio, grpc-java and grpc-dotnet are)
/// completes the handshake with a client listener that presents a server
/// certificate for the name it dials; against the identity certificate
/// (a URI SAN only), which the listener presents without one, it cannot.
#[tokio::test]
async fn stock_client_checks_the_client_listener_by_host_name() {
    let net = Net::new();
    let clinic = net.party("clinic", "urn:test:clinic");
    let app = net.client("app", "urn:local:clinic:app");

    // Without a server certificate: the identity certificate, no DNS name.
    net.configure(&clinic, &[], &[&app], "");
    let daemon = start(&clinic).await;
    let refused = stock_handshake(&net, &clinic.client_addr(), "localhost", &app)
        .await
        .unwrap_err();
    assert!(refused.contains("NotValidForName"), "{refused}");
    daemon.shutdown().await;

    let (cert, key) = server_cert(&net, &clinic.dir, &["localhost", "exchange.clinic.test"]);
    add_listen_keys(
        &clinic,
        &format!(
            "client_cert = \"{}\"\nclient_key = \"{}\"",
            cert.display(),
            key.display()
        ),
    );
    let daemon = start(&clinic).await;
    for name in ["localhost", "exchange.clinic.test", "127.0.0.1"] {
        stock_handshake(&net, &clinic.client_addr(), name, &app)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // A name the certificate does not carry is refused by the client.
    let wrong = stock_handshake(&net, &clinic.client_addr(), "other.test", &app)
        .await
        .unwrap_err();
    assert!(wrong.contains("NotValidForName"), "{wrong}");

    // The daemon's own client (the CLI's) accepts the server certificate
    // for the name it dials, and the service answers.
    let mut c = connect(&settings(
        &net,
        format!("localhost:{}", clinic.client_port),
        &clinic,
        &app,
    ))
    .unwrap();
    c.list_inbox(ListInboxRequest::default()).await.unwrap();
    daemon.shutdown().await;
}

/// The peer listener keeps presenting the identity certificate, and a
/// party-pinned client (as every outbound peer connection is) refuses the
/// client listener's server certificate even though it chains to the same
/// CA: it names no party, so it can never stand in for a facility.
#[tokio::test]
async fn peer_pinning_refuses_a_server_certificate() {
    let net = Net::new();
    let clinic = net.party("clinic", "urn:test:clinic");
    let hospital = net.party("hospital", "urn:test:hospital");
    let app = net.client("app", "urn:local:clinic:app");
    net.configure(&clinic, &[&hospital], &[&app], "");
    let (cert, key) = server_cert(&net, &clinic.dir, &["localhost"]);
    add_listen_keys(
        &clinic,
        &format!(
            "client_cert = \"{}\"\nclient_key = \"{}\"",
            cert.display(),
            key.display()
        ),
    );
    let daemon = start(&clinic).await;
    let hospital_id = hospital.tls_identity();
    // The peer listener: the identity certificate, pinned to the clinic.
    pinned_handshake(&net, &clinic.peer_addr(), &clinic, &hospital_id)
        .await
        .unwrap();
    // A peer that pins the clinic, dialling the listener with the server
    // certificate, refuses it.
    let refused = pinned_handshake(
        &net,
        &clinic.client_addr(),
        &clinic,
        &client_tls_identity(&app),
    )
    .await
    .unwrap_err();
    assert!(refused.contains("InvalidCertificate"), "{refused}");
    // And a pin on another party fails on the peer listener as before.
    let other = pinned_handshake(&net, &clinic.peer_addr(), &hospital, &hospital_id)
        .await
        .unwrap_err();
    assert!(other.contains("NotValidForName"), "{other}");
    daemon.shutdown().await;
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// The client service on a Unix socket: created with mode 0600 (or 0660
/// when configured), the same TLS and client certificates as on TCP: a
/// listed application is served, an unlisted one and one from another CA
/// are refused; the socket file is removed at shutdown.
#[tokio::test]
async fn client_socket_serves_listed_applications_only() {
    let net = Net::new();
    let clinic = net.party("clinic", "urn:test:clinic");
    let app = net.client("app", "urn:local:clinic:app");
    let stranger = net.client("stranger", "urn:local:clinic:stranger");
    let socket = clinic.dir.join("client.sock");
    net.configure(&clinic, &[], &[&app], "");
    let (cert, key) = server_cert(&net, &clinic.dir, &["localhost"]);
    add_listen_keys(
        &clinic,
        &format!(
            "client_cert = \"{}\"\nclient_key = \"{}\"\nclient_socket = \"{}\"",
            cert.display(),
            key.display(),
            socket.display()
        ),
    );
    let daemon = start(&clinic).await;
    assert_eq!(daemon.client_socket(), Some(socket.as_path()));
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(mode_of(&socket), 0o600);
    // No temporary name is left beside it.
    let names: Vec<String> = std::fs::read_dir(&clinic.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("client.sock"))
        .collect();
    assert_eq!(names, ["client.sock"]);

    let address = format!("unix:{}", socket.display());
    let mut c = connect(&settings(&net, address.clone(), &clinic, &app)).unwrap();
    let inbox = c.list_inbox(ListInboxRequest::default()).await.unwrap();
    assert!(inbox.into_inner().items.is_empty());

    // A valid certificate whose party is not a [[client]]: refused.
    let mut s = connect(&settings(&net, address.clone(), &clinic, &stranger)).unwrap();
    let err = s.list_inbox(ListInboxRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    // A certificate from another CA: the handshake is refused.
    let other_ca = CertificateAuthority::generate("Another CA", validity(net.now)).unwrap();
    let outsider = issue_client(
        &other_ca,
        net.now,
        &net.path("outsider"),
        "urn:local:clinic:app",
    );
    let mut o = connect(&settings(&net, address, &clinic, &outsider)).unwrap();
    let err = o.list_inbox(ListInboxRequest::default()).await.unwrap_err();
    assert!(format!("{err:?}").contains("UnknownCA"), "{err:?}");

    daemon.shutdown().await;
    assert!(!socket.exists(), "the socket is removed at shutdown");

    // 0660 when configured (the group may connect too).
    add_listen_keys(&clinic, "client_socket_mode = \"0660\"");
    let daemon = start(&clinic).await;
    assert_eq!(mode_of(&socket), 0o660);
    daemon.shutdown().await;
}

/// A stale socket from a daemon that did not stop cleanly is replaced; a
/// live one, or a file that is not a socket, is refused and left as it is.
#[tokio::test]
async fn client_socket_replaces_only_a_stale_socket() {
    let net = Net::new();
    let clinic = net.party("clinic", "urn:test:clinic");
    let app = net.client("app", "urn:local:clinic:app");
    let socket = clinic.dir.join("client.sock");
    net.configure(&clinic, &[], &[&app], "");
    add_listen_keys(
        &clinic,
        &format!("client_socket = \"{}\"", socket.display()),
    );

    // A regular file there: refused, untouched.
    std::fs::write(&socket, b"not a socket").unwrap();
    let err = Daemon::start(clinic.config()).await.unwrap_err();
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&socket).unwrap(), b"not a socket");
    std::fs::remove_file(&socket).unwrap();

    // A live socket there (another process listening): refused.
    let live = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let err = Daemon::start(clinic.config()).await.unwrap_err();
    assert!(err.to_string().contains("another process"), "{err}");
    // The same socket, no longer listened on: stale, replaced.
    drop(live);
    assert!(socket.exists());
    let daemon = Daemon::start(clinic.config()).await.unwrap();
    assert_eq!(mode_of(&socket), 0o600);
    let mut c = connect(&settings(
        &net,
        format!("unix:{}", socket.display()),
        &clinic,
        &app,
    ))
    .unwrap();
    c.list_inbox(ListInboxRequest::default()).await.unwrap();
    daemon.shutdown().await;
    assert!(!socket.exists());

    // A start that fails after binding the socket leaves no socket behind.
    add_listen_keys(
        &clinic,
        "client_cert = \"missing.pem\"\nclient_key = \"missing.key.pem\"",
    );
    let err = Daemon::start(clinic.config()).await.unwrap_err();
    assert!(err.to_string().contains("missing.pem"), "{err}");
    assert!(!socket.exists(), "a failed start left its socket");
}

/// Listener settings that cannot work are refused at load, naming the key.
#[test]
fn listener_settings_are_checked() {
    let net = Net::new();
    let clinic = net.party("clinic", "urn:test:clinic");
    net.configure(&clinic, &[], &[], "");
    let base = std::fs::read_to_string(clinic.config_path()).unwrap();
    for (keys, expected) in [
        (
            "client_cert = \"server.pem\"",
            "client_cert and listen.client_key go together",
        ),
        (
            "client_key = \"server.key.pem\"",
            "client_cert and listen.client_key go together",
        ),
        (
            "client_socket = \"s.sock\"\nclient_socket_mode = \"0666\"",
            "client_socket_mode",
        ),
    ] {
        let text = base.replace("[listen]\n", &format!("[listen]\n{keys}\n"));
        let err = Config::parse(&text, &clinic.dir).unwrap_err();
        assert!(err.to_string().contains(expected), "{keys}: {err}");
    }
}

/// A server certificate may name the facility's party too: stock clients
/// still check the host name, and the daemon's own client (the CLI's)
/// then also pins `server_party`, refusing a daemon of another facility.
#[tokio::test]
async fn a_server_certificate_naming_the_party_is_pinned_by_the_cli_client() {
    let net = Net::new();
    let clinic = net.party("clinic", "urn:test:clinic");
    let hospital = net.party("hospital", "urn:test:hospital");
    let app = net.client("app", "urn:local:clinic:app");
    net.configure(&clinic, &[], &[&app], "");
    let (cert, key) = server_cert_for(&net, &clinic.dir, Some(&clinic), &["localhost"]);
    add_listen_keys(
        &clinic,
        &format!(
            "client_cert = \"{}\"\nclient_key = \"{}\"",
            cert.display(),
            key.display()
        ),
    );
    let daemon = start(&clinic).await;
    stock_handshake(&net, &clinic.client_addr(), "localhost", &app)
        .await
        .unwrap();
    let address = format!("localhost:{}", clinic.client_port);
    let mut c = connect(&settings(&net, address.clone(), &clinic, &app)).unwrap();
    c.list_inbox(ListInboxRequest::default()).await.unwrap();
    // Expecting the hospital, reaching the clinic: refused.
    let mut wrong = connect(&settings(&net, address, &hospital, &app)).unwrap();
    let err = wrong
        .list_inbox(ListInboxRequest::default())
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("NotValidForName"), "{err:?}");
    // The certificate is no identity: it cannot pass a peer's pin.
    let pinned = pinned_handshake(
        &net,
        &clinic.client_addr(),
        &clinic,
        &hospital.tls_identity(),
    )
    .await
    .unwrap_err();
    assert!(pinned.contains("InvalidCertificate"), "{pinned}");
    daemon.shutdown().await;
}
