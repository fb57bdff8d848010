//! Starting and stopping a daemon: store, listeners, services, workers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tonic::transport::Server;

use crate::client_service::ClientService;
use crate::config::{Config, Profile};
use crate::error::{Error, StoreError};
use crate::node::{self, Node, audit, deliver};
use crate::peer::PeerService;
use crate::proto::client_server::ClientServer;
use crate::proto::peer_server::PeerServer;
use crate::store::Store;
use crate::store::postgres::{PgOptions, PgStore};
use crate::store::sqlite::SqliteStore;
use crate::{accountability, proto, tls};
use exchange_core::audit::{AuditAction, AuditOutcome};

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    node: Arc<Node>,
    peer_addr: SocketAddr,
    client_addr: SocketAddr,
    client_socket: Option<SocketFile>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    health: tonic_health::server::HealthReporter,
    /// Set, with the reason, once the daemon can no longer work.
    fatal: watch::Receiver<Option<String>>,
}

async fn bind(addr: &str) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen {
            addr: addr.to_owned(),
            source,
        })
}

/// The client socket's file, removed when the daemon stops (or fails to
/// start after binding it).
#[derive(Debug)]
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds the client service's Unix socket at `path` with `mode`.
///
/// The socket is bound under a temporary name beside `path`, given its mode,
/// then renamed into place, so that it is never reachable at `path` with
/// the looser mode the process's umask would give. A socket already at
/// `path` that nothing answers on (left by a daemon that did not stop
/// cleanly) is replaced; a live one, or any other kind of file, is refused.
fn bind_unix(path: &Path, mode: u32) -> Result<UnixListener, Error> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let fail = |source: std::io::Error| Error::Listen {
        addr: path.display().to_string(),
        source,
    };
    let stale_socket = |p: &Path| -> Result<(), Error> {
        match std::fs::symlink_metadata(p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(fail(e)),
            Ok(m) if !m.file_type().is_socket() => Err(fail(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket: not replaced", p.display()),
            ))),
            Ok(_) if std::os::unix::net::UnixStream::connect(p).is_ok() => {
                Err(fail(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another process is listening on this socket",
                )))
            }
            Ok(_) => std::fs::remove_file(p).map_err(fail),
        }
    };
    stale_socket(path)?;
    let name = path
        .file_name()
        .ok_or_else(|| {
            fail(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no file name",
            ))
        })?
        .to_string_lossy()
        .into_owned();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    stale_socket(&tmp)?;
    let listener = UnixListener::bind(&tmp).map_err(fail)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail(e));
    }
    Ok(listener)
}

fn log_profile(config: &Config) {
    let relaxed = config.network.relaxations();
    match config.network.profile {
        Profile::Open => tracing::info!(
            "network profile open: TLS 1.3 only, client certificates required, fresh CRLs required, peers pinned"
        ),
        Profile::Closed if relaxed.is_empty() => tracing::info!(
            "network profile closed with no relaxation: TLS 1.3 only, client certificates required, fresh CRLs required, peers pinned"
        ),
        Profile::Closed => {
            for r in relaxed {
                tracing::warn!(
                    relaxation = r,
                    "network profile closed: relaxation in force"
                );
            }
        }
    }
}

/// How often trust files (CRLs above all) are checked for changes.
const TRUST_RELOAD: std::time::Duration = std::time::Duration::from_secs(10);

/// Size and modification time of each trust file: a change means reload.
fn trust_files_stamp(config: &Config) -> Vec<Option<(u64, std::time::SystemTime)>> {
    config
        .trust_files()
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.len(), m.modified().ok()?)))
        })
        .collect()
}

/// Re-reads anchors and CRLs when their files change, so that a refreshed
/// CRL takes effect without a restart. A file that fails to load leaves the
/// trust in force unchanged (a stale CRL then keeps failing closed).
async fn reload_trust(node: Arc<Node>, mut stop: watch::Receiver<bool>) {
    let mut stamp = trust_files_stamp(&node.config);
    loop {
        tokio::select! {
            () = tokio::time::sleep(TRUST_RELOAD) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let now = trust_files_stamp(&node.config);
        if now == stamp {
            continue;
        }
        stamp = now;
        match node.reload_trust() {
            Ok(()) => {
                tracing::info!("trust anchors and CRLs reloaded");
                let entry = node.entry(
                    accountability::DAEMON,
                    AuditAction::Admin,
                    None,
                    AuditOutcome::Ok,
                    None,
                    Some("trust anchors and CRLs reloaded (files changed)".into()),
                );
                if let Err(e) = node.audit(vec![entry]).await {
                    tracing::error!(error = %e, "cannot record the trust reload in the audit log");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "trust files changed but cannot be loaded; the previous ones stay in force")
            }
        }
    }
}

/// Waits for the store to fail for good; then reports NOT_SERVING on both
/// listeners and sets `fatal` (see [`Daemon::failed`]).
async fn watch_store(
    node: Arc<Node>,
    health: tonic_health::server::HealthReporter,
    fatal: watch::Sender<Option<String>>,
    mut stop: watch::Receiver<bool>,
) {
    tokio::select! {
        why = node.store.failure() => {
            tracing::error!(error = %why, "the store can no longer write: reporting NOT_SERVING and stopping");
            health.set_not_serving::<PeerServer<PeerService>>().await;
            health.set_not_serving::<ClientServer<ClientService>>().await;
            fatal.send_replace(Some(why));
        }
        () = async {
            let _ = stop.wait_for(|s| *s).await;
        } => {}
    }
}

impl Daemon {
    /// Opens the configured store (PostgreSQL at `store.url`, else SQLite
    /// in `data_dir`) and starts.
    pub async fn start(config: Config) -> Result<Self, Error> {
        let dir = config.path(&config.data_dir);
        let store: Arc<dyn Store> = match &config.store.url {
            Some(url) => Arc::new(
                PgStore::open(PgOptions {
                    url: url.clone(),
                    tls: config.store_tls(),
                    node_name: config.delivery.node_name.clone(),
                    max_connections: config.store.max_connections,
                    spool_dir: dir.join("spool"),
                })
                .await?,
            ),
            None => Arc::new(
                tokio::task::spawn_blocking(move || SqliteStore::open(&dir))
                    .await
                    .map_err(|_| Error::Shutdown)??,
            ),
        };
        Self::start_with_store(config, store).await
    }

    /// Starts over a given store.
    pub async fn start_with_store(config: Config, store: Arc<dyn Store>) -> Result<Self, Error> {
        tls::install_provider();
        log_profile(&config);
        let peer_listener = bind(&config.listen.peer).await?;
        let client_listener = bind(&config.listen.client).await?;
        let local = |l: &TcpListener, a: &str| {
            l.local_addr().map_err(|source| Error::Listen {
                addr: a.to_owned(),
                source,
            })
        };
        let peer_addr = local(&peer_listener, &config.listen.peer)?;
        let client_addr = local(&client_listener, &config.listen.client)?;
        let (client_socket, socket_listener) = match &config.listen.client_socket {
            Some(p) => {
                let path = config.path(p);
                let listener = bind_unix(&path, config.listen.socket_mode()?)?;
                (Some(SocketFile(path)), Some(listener))
            }
            None => (None, None),
        };
        let released = store.release_claims(&config.delivery.node_name).await?;
        if released > 0 {
            tracing::info!(released, "resuming deliveries claimed before a restart");
        }
        let node = Arc::new(Node::new(config, store)?);
        node.store
            .bind_pseudonym_key(node.pseudonym_key_check())
            .await?;
        // Refuse to run (and sign) over an audit log that no longer matches
        // the checkpoints this daemon signed.
        node.check_audit_history().await?;
        let versions = node.versions();
        let peer_tls = tls::server_config(node.trust_source.clone(), &node.tls_identity, versions)?;
        // The client listener presents its own server certificate when one
        // is configured (host names for stock gRPC clients), else the identity.
        let listen = &node.config.listen;
        let client_identity = match (&listen.client_cert, &listen.client_key) {
            (Some(cert), Some(key)) => Some(tls::TlsIdentity::from_pem(
                &node.config.read(cert)?,
                &node.config.read(key)?,
            )?),
            _ => None,
        };
        let client_tls = tls::server_config(
            node.client_trust.clone(),
            client_identity.as_ref().unwrap_or(&node.tls_identity),
            versions,
        )?;

        let (shutdown, rx) = watch::channel(false);
        let mut tasks = Vec::new();

        let (reporter, health) = tonic_health::server::health_reporter();
        reporter.set_serving::<PeerServer<PeerService>>().await;
        reporter.set_serving::<ClientServer<ClientService>>().await;
        // Reflection in both versions: grpc.reflection.v1, and v1alpha for
        // the clients that speak only it (grpcio-reflection, older grpcurl).
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = || {
            reflection()
                .build_v1()
                .map_err(|e| Error::Config(format!("reflection: {e}")))
        };
        let reflection_v1alpha = || {
            reflection()
                .build_v1alpha()
                .map_err(|e| Error::Config(format!("reflection: {e}")))
        };

        let limits = &node.config.limits;
        let connection_limits = tls::ConnectionLimits {
            total: limits.max_connections,
            per_party: limits.max_connections_per_party,
        };
        let peer_router = Server::builder()
            .initial_stream_window_size(tls::STREAM_WINDOW)
            .initial_connection_window_size(tls::CONNECTION_WINDOW)
            .max_concurrent_streams(Some(limits.max_streams_per_connection))
            .http2_keepalive_interval(Some(Duration::from_secs(limits.keepalive_interval_seconds)))
            .http2_keepalive_timeout(Some(Duration::from_secs(limits.keepalive_timeout_seconds)))
            .add_service(health.clone())
            .add_service(reflection_v1()?)
            .add_service(reflection_v1alpha()?)
            .add_service(
                PeerServer::new(PeerService::new(node.clone()))
                    .max_decoding_message_size(limits.max_message_bytes),
            );
        let client_router = Server::builder()
            .initial_stream_window_size(tls::STREAM_WINDOW)
            .initial_connection_window_size(tls::CONNECTION_WINDOW)
            .max_concurrent_streams(Some(limits.max_streams_per_connection))
            .http2_keepalive_interval(Some(Duration::from_secs(limits.keepalive_interval_seconds)))
            .http2_keepalive_timeout(Some(Duration::from_secs(limits.keepalive_timeout_seconds)))
            .add_service(health)
            .add_service(reflection_v1()?)
            .add_service(reflection_v1alpha()?)
            .add_service(
                ClientServer::new(ClientService::new(node.clone()))
                    .max_decoding_message_size(limits.max_message_bytes),
            );
        let peer_incoming = tls::incoming(
            tls::Listener::Tcp(peer_listener),
            peer_tls,
            node.trust_source.clone(),
            "peer",
            connection_limits,
        );
        let client_incoming = tls::incoming(
            tls::Listener::Tcp(client_listener),
            client_tls.clone(),
            node.client_trust.clone(),
            "client",
            connection_limits,
        );
        // The socket's connections join the TCP listener's: one client
        // service, the same TLS and client certificates, caps of its own.
        type Incoming = std::pin::Pin<
            Box<dyn tokio_stream::Stream<Item = Result<tls::TlsConn, std::io::Error>> + Send>,
        >;
        let client_incoming: Incoming = match socket_listener {
            Some(l) => Box::pin(client_incoming.merge(tls::incoming(
                tls::Listener::Unix(l),
                client_tls,
                node.client_trust.clone(),
                "client-socket",
                connection_limits,
            ))),
            None => Box::pin(client_incoming),
        };
        let mut stop = rx.clone();
        tasks.push(tokio::spawn(async move {
            let signal = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = peer_router
                .serve_with_incoming_shutdown(peer_incoming, signal)
                .await
            {
                tracing::error!(service = "peer", error = %e, "server stopped");
            }
        }));
        let mut stop = rx.clone();
        tasks.push(tokio::spawn(async move {
            let signal = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = client_router
                .serve_with_incoming_shutdown(client_incoming, signal)
                .await
            {
                tracing::error!(service = "client", error = %e, "server stopped");
            }
        }));
        let (fatal_tx, fatal) = watch::channel(None);
        tasks.push(tokio::spawn(watch_store(
            node.clone(),
            reporter.clone(),
            fatal_tx,
            rx.clone(),
        )));
        tasks.push(tokio::spawn(deliver::run(node.clone(), rx.clone())));
        tasks.push(tokio::spawn(node::follow_changes(node.clone(), rx.clone())));
        tasks.push(tokio::spawn(reload_trust(node.clone(), rx.clone())));
        tasks.push(tokio::spawn(audit::run(node.clone(), rx)));
        node.audit(vec![node.entry(
            accountability::DAEMON,
            AuditAction::Start,
            None,
            AuditOutcome::Ok,
            None,
            Some(format!("peer {peer_addr}, client {client_addr}")),
        )])
        .await?;
        match &client_socket {
            Some(SocketFile(path)) => {
                tracing::info!(party = %node.party(), peer = %peer_addr, client = %client_addr, socket = %path.display(), "exchanged started")
            }
            None => {
                tracing::info!(party = %node.party(), peer = %peer_addr, client = %client_addr, "exchanged started")
            }
        }
        Ok(Self {
            node,
            peer_addr,
            client_addr,
            client_socket,
            shutdown,
            tasks,
            health: reporter,
            fatal,
        })
    }

    /// The bound peer listener address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// The bound client listener address.
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// The client service's Unix socket, if configured.
    pub fn client_socket(&self) -> Option<&Path> {
        self.client_socket.as_ref().map(|s| s.0.as_path())
    }

    /// Re-reads trust anchors and CRLs now (SIGHUP); on error the ones in
    /// force stay.
    pub fn reload_trust(&self) -> Result<(), Error> {
        self.node.reload_trust()
    }

    /// The daemon's state (party, store).
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Resolves if the daemon can no longer work (its store's writer
    /// died): health already says NOT_SERVING. The caller shuts the daemon
    /// down and exits non-zero so that its supervisor restarts it.
    pub async fn failed(&self) -> Error {
        let mut fatal = self.fatal.clone();
        let why = fatal
            .wait_for(Option::is_some)
            .await
            .map(|why| why.clone().unwrap_or_default());
        match why {
            Ok(why) => Error::Store(StoreError::WriterDied(why)),
            Err(_) => std::future::pending().await,
        }
    }

    /// Stops accepting, lets running requests finish, stops the workers.
    pub async fn shutdown(self) {
        self.health
            .set_not_serving::<PeerServer<PeerService>>()
            .await;
        self.health
            .set_not_serving::<ClientServer<ClientService>>()
            .await;
        let _ = self.shutdown.send(true);
        // Long-lived client streams (WatchStatus) must not hold the stop up.
        for t in self.tasks {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), t).await;
        }
        drop(self.client_socket);
        // The last entry, then a checkpoint that covers everything.
        let stop = self.node.entry(
            accountability::DAEMON,
            AuditAction::Stop,
            None,
            AuditOutcome::Ok,
            None,
            None,
        );
        if let Err(e) = self.node.audit(vec![stop]).await {
            tracing::error!(error = %e, "cannot record the stop in the audit log");
        }
        if let Err(e) = self.node.checkpoint().await {
            tracing::error!(error = %e, "cannot sign the final audit checkpoint");
        }
        tracing::info!(party = %self.node.party(), "exchanged stopped");
    }
}
