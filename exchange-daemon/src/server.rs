//! Starting and stopping a daemon: store, listeners, services, workers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Server;

use crate::client_service::ClientService;
use crate::config::{Config, Profile};
use crate::error::Error;
use crate::node::Node;
use crate::peer::PeerService;
use crate::proto::client_server::ClientServer;
use crate::proto::peer_server::PeerServer;
use crate::store::Store;
use crate::store::sqlite::SqliteStore;
use crate::{accountability, delivery, proto, tls};
use exchange_core::audit::{AuditAction, AuditOutcome};

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    node: Arc<Node>,
    peer_addr: SocketAddr,
    client_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    health: tonic_health::server::HealthReporter,
}

async fn bind(addr: &str) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen {
            addr: addr.to_owned(),
            source,
        })
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

impl Daemon {
    /// Opens the SQLite store in `config.data_dir` and starts.
    pub async fn start(config: Config) -> Result<Self, Error> {
        let dir = config.path(&config.data_dir);
        let store = tokio::task::spawn_blocking(move || SqliteStore::open(&dir))
            .await
            .map_err(|_| Error::Shutdown)??;
        Self::start_with_store(config, Arc::new(store)).await
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
        let released = store.release_claims(&config.delivery.node_name).await?;
        if released > 0 {
            tracing::info!(released, "resuming deliveries claimed before a restart");
        }
        let node = Arc::new(Node::new(config, store)?);
        // Refuse to run (and sign) over an audit log that no longer matches
        // the checkpoints this daemon signed.
        node.check_audit_history().await?;
        let versions = node.versions();
        let peer_tls = tls::server_config(node.trust_source.clone(), &node.tls_identity, versions)?;
        let client_tls =
            tls::server_config(node.client_trust.clone(), &node.tls_identity, versions)?;

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
        for (name, router, listener, config, trust) in [
            (
                "peer",
                peer_router,
                peer_listener,
                peer_tls,
                node.trust_source.clone(),
            ),
            (
                "client",
                client_router,
                client_listener,
                client_tls,
                node.client_trust.clone(),
            ),
        ] {
            let mut stop = rx.clone();
            let incoming = tls::incoming(listener, config, trust, name, connection_limits);
            tasks.push(tokio::spawn(async move {
                let signal = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                if let Err(e) = router.serve_with_incoming_shutdown(incoming, signal).await {
                    tracing::error!(service = name, error = %e, "server stopped");
                }
            }));
        }
        tasks.push(tokio::spawn(delivery::run(node.clone(), rx.clone())));
        tasks.push(tokio::spawn(reload_trust(node.clone(), rx.clone())));
        tasks.push(tokio::spawn(accountability::run(node.clone(), rx)));
        node.audit(vec![node.entry(
            accountability::DAEMON,
            AuditAction::Start,
            None,
            AuditOutcome::Ok,
            None,
            Some(format!("peer {peer_addr}, client {client_addr}")),
        )])
        .await?;
        tracing::info!(party = %node.party(), peer = %peer_addr, client = %client_addr, "exchanged started");
        Ok(Self {
            node,
            peer_addr,
            client_addr,
            shutdown,
            tasks,
            health: reporter,
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

    /// Re-reads trust anchors and CRLs now (SIGHUP); on error the ones in
    /// force stay.
    pub fn reload_trust(&self) -> Result<(), Error> {
        self.node.reload_trust()
    }

    /// The daemon's state (party, store).
    pub fn node(&self) -> &Arc<Node> {
        &self.node
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
