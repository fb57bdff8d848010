//! Mutual TLS for both services (DESIGN.md §6, §9).
//!
//! Certificates are judged in one place: exchange-core's [`TrustStore`]
//! (rustls-webpki path validation, CRLs, the exchange key-usage profile). The
//! rustls verifiers here only adapt it: the server side requires a client
//! certificate that validates; the client side validates the server's and
//! pins it to the party URI it meant to reach (our certificates name parties
//! by URI, not by DNS name, so the server name is not used).
//!
//! tonic's own TLS settings cannot take CRLs, so we run the handshake
//! ourselves: each accepted TCP connection is handshaken in its own task and
//! only connections that completed it reach tonic, carrying the verified
//! peer party as their connect info (`PeerInfo`). Failed handshakes are
//! logged with their reason and dropped.
//!
//! Revocation bites on open connections too. No TLS session is ever resumed
//! (the servers keep no session state and issue no tickets, the clients
//! offer none), so every connection starts with a full certificate check.
//! Every accepted connection is registered with the `SharedTrust` that
//! admitted it, with the chain its peer presented; each time that trust is
//! replaced (a CRL or anchor reload) every registered chain is validated
//! again against the new store, and the connections that no longer pass are
//! closed at once (their next read or write fails, which ends the HTTP/2
//! connection and every call on it).
//!
//! The TLS private key is parsed once, from a zeroizing buffer, into the
//! provider's signing key ([`TlsIdentity`]); no DER or PEM copy of it is kept.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use exchange_core::identity::Certificate;
use exchange_core::trust::TrustStore;
use exchange_core::{PartyUri, TrustError};
use futures_util::task::AtomicWaker;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme,
    SupportedProtocolVersion,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::error::Error;

/// HTTP/2 flow-control windows, both ends. Large enough for 256 KiB slices
/// in flight; the connection window also sizes h2's budget for small DATA
/// frames (half of it), which many concurrent small unary responses on one
/// connection would otherwise exhaust (GOAWAY `too_many_data_frames`).
pub(crate) const STREAM_WINDOW: u32 = 2 << 20;
/// See [`STREAM_WINDOW`].
pub(crate) const CONNECTION_WINDOW: u32 = 16 << 20;

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The one signature scheme of the exchange profile (P-256 identity keys).
const SCHEMES: &[SignatureScheme] = &[SignatureScheme::ECDSA_NISTP256_SHA256];

/// The process-wide rustls provider: aws-lc-rs, whose default key exchange
/// groups put the hybrid post-quantum X25519MLKEM768 first.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Installs the aws-lc-rs provider as the process default (idempotent).
pub fn install_provider() {
    // Err means one is installed already; ours is the only one compiled in.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

static TLS13_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// TLS protocol versions for a profile.
pub fn versions(allow_tls12: bool) -> &'static [&'static SupportedProtocolVersion] {
    if allow_tls12 {
        rustls::ALL_VERSIONS
    } else {
        TLS13_ONLY
    }
}

/// A certificate chain and its private key for TLS.
///
/// The key is held only as the crypto provider's parsed signing key
/// (aws-lc, which cleanses key memory when it is freed); the DER it was
/// parsed from lives in a zeroizing buffer for the duration of
/// [`TlsIdentity::from_pem`] and no other copy is made.
pub struct TlsIdentity {
    certified: Arc<CertifiedKey>,
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("chain_len", &self.certified.cert.len())
            .field("key", &"[redacted]")
            .finish()
    }
}

impl TlsIdentity {
    /// From a PEM chain (leaf first) and a PEM PKCS#8 key (the caller should
    /// keep `key_pem` in a zeroizing buffer: it is not copied here).
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, Error> {
        let chain = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| Error::Tls("certificate PEM unreadable".into()))?;
        if chain.is_empty() {
            return Err(Error::Tls("no certificate in PEM".into()));
        }
        let der = exchange_core::identity::private_key_der(key_pem)
            .map_err(|_| Error::Tls("private key PEM unreadable".into()))?;
        // Borrowed from the zeroizing buffer: the key DER is not copied.
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der.as_slice()));
        let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)
            .map_err(|_| Error::Tls("private key unusable".into()))?;
        let certified = CertifiedKey::new(chain, signing);
        certified
            .keys_match()
            .map_err(|e| Error::Tls(format!("certificate and private key: {e}")))?;
        Ok(Self {
            certified: Arc::new(certified),
        })
    }

    pub(crate) fn resolver(&self) -> Arc<SingleCertAndKey> {
        Arc::new(SingleCertAndKey::from(self.certified.clone()))
    }
}

fn system_time(now: UnixTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(now.as_secs())
}

fn chain_of(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<Vec<Certificate>, rustls::Error> {
    std::iter::once(end_entity)
        .chain(intermediates)
        .map(|c| {
            Certificate::from_der(c.as_ref().to_vec())
                .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))
        })
        .collect()
}

/// exchange-core's verdict as a rustls certificate error (which picks the TLS alert).
fn cert_error(e: exchange_core::Error) -> rustls::Error {
    use exchange_core::Error as E;
    let kind = match &e {
        E::Trust(TrustError::Revoked) => CertificateError::Revoked,
        E::Trust(TrustError::Expired) => CertificateError::Expired,
        E::Trust(TrustError::NotYetValid) => CertificateError::NotValidYet,
        E::Trust(TrustError::UnknownIssuer | TrustError::NoAnchors) => {
            CertificateError::UnknownIssuer
        }
        E::Trust(TrustError::BadCertificateSignature) => CertificateError::BadSignature,
        E::Trust(TrustError::UnknownRevocationStatus) => CertificateError::UnknownRevocationStatus,
        E::Trust(TrustError::CrlExpired) => CertificateError::ExpiredRevocationList,
        E::Trust(TrustError::WrongKeyUsage(_)) => CertificateError::InvalidPurpose,
        _ => CertificateError::Other(rustls::OtherError(Arc::new(e))),
    };
    rustls::Error::InvalidCertificate(kind)
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms
}

/// The trust store in force, replaceable while running (CRL refresh):
/// every handshake reads the current one, and every connection it admitted
/// is checked again when it is replaced.
#[derive(Debug)]
pub(crate) struct SharedTrust {
    current: RwLock<Arc<TrustStore>>,
    live: Mutex<LiveConnections>,
}

/// The open connections admitted under one [`SharedTrust`].
#[derive(Debug, Default)]
struct LiveConnections {
    next_id: u64,
    open: HashMap<u64, LiveConnection>,
}

/// What is needed to judge an open connection again, and to close it.
#[derive(Debug)]
struct LiveConnection {
    /// The chain the peer presented, leaf first.
    chain: Vec<Certificate>,
    party: PartyUri,
    remote: Remote,
    service: &'static str,
    closer: Arc<Closer>,
}

/// Closes one connection from outside the task that drives it.
#[derive(Debug, Default)]
struct Closer {
    closed: AtomicBool,
    waker: AtomicWaker,
}

impl Closer {
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Whether the connection was closed; if not, `cx` is woken when it is.
    fn poll_closed(&self, cx: &Context<'_>) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return true;
        }
        self.waker.register(cx.waker());
        self.closed.load(Ordering::Acquire)
    }
}

/// The error a closed connection's reads and writes fail with.
fn closed_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "peer certificate no longer validates under the trust in force",
    )
}

/// Removes a connection from its registry when it ends.
#[derive(Debug)]
struct Registration {
    trust: Arc<SharedTrust>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.trust.live().open.remove(&self.id);
    }
}

impl SharedTrust {
    /// Starts with `trust`.
    pub(crate) fn new(trust: TrustStore) -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::new(Arc::new(trust)),
            live: Mutex::new(LiveConnections::default()),
        })
    }

    /// The store in force now.
    pub(crate) fn get(&self) -> Arc<TrustStore> {
        // A poisoned lock still holds a complete store (replacement is one assignment).
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn live(&self) -> std::sync::MutexGuard<'_, LiveConnections> {
        // Every change to the registry is one insert or remove.
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts `trust` in force for every later check, then validates the peer
    /// chain of every open connection it admitted against it (at the current
    /// time) and closes each one that no longer passes (each is logged).
    pub(crate) fn replace(&self, trust: TrustStore) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(trust);
        let mut live = self.live();
        // Read under the registry lock: a connection registered after this
        // point was checked against this store or a newer one (see `register`).
        let trust = self.get();
        let now = SystemTime::now();
        let mut closed = 0;
        live.open.retain(|_, c| match trust.verify_identity(&c.chain, now) {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(
                    service = c.service,
                    remote = %c.remote,
                    party = %c.party,
                    reason = e.reason_code(),
                    error = %e,
                    "closing a connection: its peer certificate no longer validates after the trust reload"
                );
                c.closer.close();
                closed += 1;
                false
            }
        });
        if closed > 0 {
            tracing::warn!(
                closed,
                "trust reload closed connections whose peer no longer validates"
            );
        }
    }

    /// Registers an open connection whose handshake validated `chain`. The
    /// chain is checked again, under the registry lock, against the store
    /// in force now, so that a replacement that happened during the
    /// handshake cannot be missed.
    fn register(
        self: &Arc<Self>,
        chain: Vec<Certificate>,
        party: PartyUri,
        remote: Remote,
        service: &'static str,
    ) -> Result<(Registration, Arc<Closer>), exchange_core::Error> {
        let mut live = self.live();
        self.get().verify_identity(&chain, SystemTime::now())?;
        let closer = Arc::new(Closer::default());
        let id = live.next_id;
        live.next_id += 1;
        live.open.insert(
            id,
            LiveConnection {
                chain,
                party,
                remote,
                service,
                closer: closer.clone(),
            },
        );
        Ok((
            Registration {
                trust: self.clone(),
                id,
            },
            closer,
        ))
    }
}

/// Server side: a client certificate is mandatory and must validate.
#[derive(Debug)]
struct PartyClientVerifier {
    trust: Arc<SharedTrust>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for PartyClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let chain = chain_of(end_entity, intermediates)?;
        self.trust
            .get()
            .verify_identity(&chain, system_time(now))
            .map_err(cert_error)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

/// Client side: the server certificate must validate and name `expected`.
#[derive(Debug)]
struct PinnedServerVerifier {
    trust: Arc<SharedTrust>,
    expected: PartyUri,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain = chain_of(end_entity, intermediates)?;
        let party = self
            .trust
            .get()
            .verify_identity(&chain, system_time(now))
            .map_err(cert_error)?;
        if party.party() != &self.expected {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

/// A server configuration requiring client certificates that `trust` accepts.
pub(crate) fn server_config(
    trust: Arc<SharedTrust>,
    identity: &TlsIdentity,
    versions: &[&'static SupportedProtocolVersion],
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let verifier = Arc::new(PartyClientVerifier {
        trust,
        algorithms: algorithms(),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(identity.resolver());
    // No resumption: a resumed session would restore the client's
    // certificate without checking it against the trust in force.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Client side of a daemon's client listener: the server certificate is
/// either the daemon's identity certificate naming `pinned.expected`, or a
/// TLS server certificate (see `exchange ca issue-server`) that `by_name`,
/// a standard web-PKI verifier over the same anchors and CRLs, accepts for
/// the host name or address dialled and that, if it names a party at all,
/// names `pinned.expected`.
#[derive(Debug)]
struct LocalServerVerifier {
    pinned: PinnedServerVerifier,
    by_name: Arc<rustls::client::WebPkiServerVerifier>,
}

impl ServerCertVerifier for LocalServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let pinned = match self.pinned.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let leaf = Certificate::from_der(end_entity.as_ref().to_vec()).ok();
        let party = leaf.as_ref().and_then(|c| c.party().ok().cloned());
        let identity = leaf
            .as_ref()
            .is_some_and(|c| c.key_role() == Some(exchange_core::identity::KeyRole::Identity));
        match self.by_name.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            // A server certificate that names a party must name ours.
            Ok(_) if party.as_ref().is_some_and(|p| p != &self.pinned.expected) => Err(
                rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
            ),
            Ok(v) => Ok(v),
            // An identity certificate is judged by its pin.
            Err(_) if identity => Err(pinned),
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.pinned.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.pinned.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

/// A client configuration for a daemon's client listener: presents
/// `identity` and accepts the daemon's identity certificate naming
/// `expected`, or a TLS server certificate valid for the name dialled,
/// issued under `anchors_pem` and checked against `crls_pem` (every CRL
/// given must cover the chain).
pub(crate) fn local_client_config(
    trust: Arc<TrustStore>,
    anchors_pem: &[u8],
    crls_pem: Option<&[u8]>,
    expected: PartyUri,
    identity: &TlsIdentity,
    versions: &[&'static SupportedProtocolVersion],
) -> Result<Arc<rustls::ClientConfig>, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(anchors_pem) {
        let der = der.map_err(|_| Error::Tls("trust anchor PEM unreadable".into()))?;
        roots
            .add(der)
            .map_err(|e| Error::Tls(format!("trust anchor: {e}")))?;
    }
    let mut builder =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider());
    if let Some(crls) = crls_pem {
        let crls = rustls_pki_types::CertificateRevocationListDer::pem_slice_iter(crls)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| Error::Tls("CRL PEM unreadable".into()))?;
        builder = builder.with_crls(crls).enforce_revocation_expiration();
    }
    let by_name = builder
        .build()
        .map_err(|e| Error::Tls(format!("server verifier: {e}")))?;
    let verifier = Arc::new(LocalServerVerifier {
        pinned: PinnedServerVerifier {
            trust: Arc::new(SharedTrust {
                current: RwLock::new(trust),
                live: Mutex::new(LiveConnections::default()),
            }),
            expected,
            algorithms: algorithms(),
        },
        by_name,
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| Error::Tls(e.to_string()))?
        .dangerous()
        // Not a relaxation: a party pin or the standard host-name check.
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(identity.resolver());
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A client configuration that presents `identity` (if any) and accepts only
/// a server whose certificate validates and names `expected`.
pub fn client_config(
    trust: Arc<TrustStore>,
    expected: PartyUri,
    identity: Option<&TlsIdentity>,
    versions: &[&'static SupportedProtocolVersion],
) -> Result<Arc<rustls::ClientConfig>, Error> {
    let trust = Arc::new(SharedTrust {
        current: RwLock::new(trust),
        live: Mutex::new(LiveConnections::default()),
    });
    Ok(client_config_shared(trust, expected, identity, versions)?.config)
}

/// A client TLS configuration, with the replaceable trust its server
/// certificates are checked against when there is one: [`channel`] then
/// registers each connection with that trust, so that a reload closes those
/// whose server no longer validates.
#[derive(Debug, Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    trust: Option<Arc<SharedTrust>>,
}

impl From<Arc<rustls::ClientConfig>> for ClientTls {
    /// A configuration over a fixed trust store: connections are not re-checked.
    fn from(config: Arc<rustls::ClientConfig>) -> Self {
        Self {
            config,
            trust: None,
        }
    }
}

/// [`client_config`] over a replaceable trust store.
pub(crate) fn client_config_shared(
    trust: Arc<SharedTrust>,
    expected: PartyUri,
    identity: Option<&TlsIdentity>,
    versions: &[&'static SupportedProtocolVersion],
) -> Result<ClientTls, Error> {
    let verifier = Arc::new(PinnedServerVerifier {
        trust: trust.clone(),
        expected,
        algorithms: algorithms(),
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| Error::Tls(e.to_string()))?
        .dangerous()
        // Not a relaxation: the verifier is stricter than name checks (full
        // path validation with CRLs, then a party-URI pin).
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some(id) => builder.with_client_cert_resolver(id.resolver()),
        None => builder.with_no_client_auth(),
    };
    // No resumption: every connection checks the server's certificate
    // against the trust in force.
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(ClientTls {
        config: Arc::new(config),
        trust: Some(trust),
    })
}

/// Who is on the other end of an accepted connection (tonic connect info).
#[derive(Debug, Clone)]
pub(crate) struct PeerInfo {
    /// The party URI of its validated certificate.
    pub(crate) party: PartyUri,
}

/// Where a connection comes from: a TCP address, or the credentials of the
/// process on the other end of a Unix domain socket (for logs only: the
/// party is proven by its certificate on both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Remote {
    /// A TCP peer.
    Tcp(SocketAddr),
    /// A Unix socket peer: its user and process, when the kernel told.
    Unix {
        /// The peer process's user id.
        uid: Option<u32>,
        /// The peer process's id.
        pid: Option<i32>,
    },
}

impl fmt::Display for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => a.fmt(f),
            Self::Unix { uid, pid } => {
                f.write_str("unix")?;
                if let Some(uid) = uid {
                    write!(f, " uid {uid}")?;
                }
                if let Some(pid) = pid {
                    write!(f, " pid {pid}")?;
                }
                Ok(())
            }
        }
    }
}

/// A listening socket the client or peer service accepts on.
#[derive(Debug)]
pub(crate) enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A Unix domain socket (the client service only).
    Unix(UnixListener),
}

impl Listener {
    async fn accept(&self) -> io::Result<(Stream, Remote)> {
        match self {
            Self::Tcp(l) => {
                let (tcp, addr) = l.accept().await?;
                let _ = tcp.set_nodelay(true);
                Ok((Stream::Tcp(tcp), Remote::Tcp(addr)))
            }
            Self::Unix(l) => {
                let (unix, _) = l.accept().await?;
                let cred = unix.peer_cred().ok();
                let remote = Remote::Unix {
                    uid: cred.map(|c| c.uid()),
                    pid: cred.and_then(|c| c.pid()),
                };
                Ok((Stream::Unix(unix), remote))
            }
        }
    }
}

/// An accepted byte stream, before TLS.
#[derive(Debug)]
pub(crate) enum Stream {
    /// Over TCP.
    Tcp(TcpStream),
    /// Over a Unix domain socket.
    Unix(UnixStream),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(s) => s.is_write_vectored(),
            Self::Unix(s) => s.is_write_vectored(),
        }
    }
}

/// A TLS stream registered with the trust that admitted its peer: once a
/// trust reload closed it, its reads and writes fail, which ends the HTTP/2
/// connection and every call on it.
#[derive(Debug)]
struct Watched<S> {
    stream: S,
    closer: Arc<Closer>,
    /// None for connections made over a fixed trust store (never reloaded).
    _registration: Option<Registration>,
    /// Its place under the listener's connection caps (accepted ones).
    _slot: Option<Slot>,
}

/// Caps on the connections one listener holds at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnectionLimits {
    /// In all (counting those still in their handshake).
    pub(crate) total: usize,
    /// From any one party (peer facility or local client).
    pub(crate) per_party: usize,
}

#[derive(Debug, Default)]
struct ConnectionCount {
    total: usize,
    per_party: HashMap<PartyUri, usize>,
}

/// One connection's place under a listener's caps, given back on drop.
#[derive(Debug)]
struct Slot {
    counts: Arc<Mutex<ConnectionCount>>,
    party: Option<PartyUri>,
}

impl Slot {
    /// A place among `limits.total`, if one is free.
    fn take(counts: &Arc<Mutex<ConnectionCount>>, limits: ConnectionLimits) -> Option<Self> {
        let mut c = counts.lock().unwrap_or_else(PoisonError::into_inner);
        if c.total >= limits.total {
            return None;
        }
        c.total += 1;
        Some(Self {
            counts: counts.clone(),
            party: None,
        })
    }

    /// Counts this connection for `party` too, if it has room.
    fn claim(&mut self, party: &PartyUri, limits: ConnectionLimits) -> bool {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let n = c.per_party.entry(party.clone()).or_insert(0);
        if *n >= limits.per_party {
            return false;
        }
        *n += 1;
        self.party = Some(party.clone());
        true
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.total = c.total.saturating_sub(1);
        if let Some(p) = &self.party
            && let Some(n) = c.per_party.get_mut(p)
        {
            *n -= 1;
            if *n == 0 {
                c.per_party.remove(p);
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.closer.poll_closed(cx) {
            return Poll::Ready(Err(closed_error()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.closer.poll_closed(cx) {
            return Poll::Ready(Err(closed_error()));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.closer.poll_closed(cx) {
            return Poll::Ready(Err(closed_error()));
        }
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.closer.poll_closed(cx) {
            return Poll::Ready(Err(closed_error()));
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// An accepted connection whose TLS handshake (and certificate validation)
/// completed. It is closed (reads and writes fail) when a trust reload
/// finds that its peer's chain no longer validates.
#[derive(Debug)]
pub(crate) struct TlsConn {
    stream: Watched<tokio_rustls::server::TlsStream<Stream>>,
    info: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The chain the peer presented (leaf first) and the party its leaf names.
fn peer_chain(certs: Option<&[CertificateDer<'_>]>) -> Option<(Vec<Certificate>, PartyUri)> {
    let chain = certs?
        .iter()
        .map(|der| Certificate::from_der(der.as_ref().to_vec()).ok())
        .collect::<Option<Vec<_>>>()?;
    let party = chain.first()?.party().ok()?.clone();
    Some((chain, party))
}

#[cfg(test)]
fn peer_party(stream: &tokio_rustls::server::TlsStream<TcpStream>) -> Option<PartyUri> {
    peer_chain(stream.get_ref().1.peer_certificates()).map(|(_, party)| party)
}

/// Accepts connections (TCP or Unix socket) on `listener`, handshakes each in its own task and
/// yields those that completed, registered with `trust` (which must be the
/// store `config` verifies clients with) so that a reload closes those
/// whose peer no longer validates. `service` names the listener in logs.
/// Connections over `limits` (in all, or from one party) are closed at once
/// and logged with reason `connection-limit`.
pub(crate) fn incoming(
    listener: Listener,
    config: Arc<rustls::ServerConfig>,
    trust: Arc<SharedTrust>,
    service: &'static str,
    limits: ConnectionLimits,
) -> ReceiverStream<Result<TlsConn, io::Error>> {
    let acceptor = TlsAcceptor::from(config);
    let (tx, rx) = mpsc::channel(64);
    let counts = Arc::new(Mutex::new(ConnectionCount::default()));
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(service, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = tx.closed() => break,
            };
            let Some(mut slot) = Slot::take(&counts, limits) else {
                tracing::warn!(service, %remote, reason = "connection-limit", limit = limits.total, "connection refused: the listener holds its maximum of connections");
                drop(tcp);
                continue;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let trust = trust.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => match peer_chain(stream.get_ref().1.peer_certificates()) {
                        Some((_, party)) if !slot.claim(&party, limits) => {
                            // Its place is free before the peer sees the close.
                            drop(slot);
                            tracing::warn!(
                                service, %remote, %party, reason = "connection-limit", limit = limits.per_party,
                                "connection refused: the party holds its maximum of connections"
                            );
                        }
                        Some((chain, party)) => {
                            match trust.register(chain, party.clone(), remote, service) {
                                Ok((registration, closer)) => {
                                    tracing::debug!(service, %remote, %party, "TLS connection");
                                    let info = PeerInfo { party };
                                    let stream = Watched {
                                        stream,
                                        closer,
                                        _registration: Some(registration),
                                        _slot: Some(slot),
                                    };
                                    let conn = TlsConn { stream, info };
                                    let _ = tx.send(Ok(conn)).await;
                                }
                                Err(e) => tracing::warn!(
                                    service, %remote, %party, reason = e.reason_code(),
                                    "TLS peer no longer validates after a trust reload during its handshake"
                                ),
                            }
                        }
                        None => tracing::warn!(service, %remote, "TLS peer without a party URI"),
                    },
                    Ok(Err(e)) => {
                        tracing::warn!(service, %remote, reason = %e, "TLS handshake rejected");
                    }
                    Err(_) => tracing::warn!(service, %remote, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A lazily connecting gRPC channel to `address` (`host:port`, or
/// `unix:PATH` for a daemon's client socket, whose certificate is then
/// checked for the name `localhost`) over `config`.
/// With a replaceable trust (the daemon's own channels) each connection is
/// registered with it and closed by a reload that its server no longer passes.
pub fn channel(
    address: &str,
    config: impl Into<ClientTls>,
    connect_timeout: Duration,
) -> Result<Channel, Error> {
    let ClientTls { config, trust } = config.into();
    let socket = address.strip_prefix("unix:").map(std::path::PathBuf::from);
    let uri = match socket {
        Some(_) => "http://localhost".to_owned(),
        None => format!("http://{address}"),
    };
    let endpoint = Endpoint::from_shared(uri)
        .map_err(|e| Error::Config(format!("peer address {address:?}: {e}")))?
        .connect_timeout(connect_timeout)
        // A peer that stops answering mid-transfer is noticed and the
        // attempt retried, instead of holding a worker forever.
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(false)
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    let connector = TlsConnector::from(config);
    let service = tower::service_fn(move |uri: Uri| {
        let connector = connector.clone();
        let trust = trust.clone();
        let socket = socket.clone();
        async move {
            let host = uri.host().unwrap_or_default().to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let (stream, remote) = match socket {
                Some(path) => (
                    Stream::Unix(UnixStream::connect(path).await?),
                    Remote::Unix {
                        uid: None,
                        pid: None,
                    },
                ),
                None => {
                    let tcp = TcpStream::connect((host.as_str(), port)).await?;
                    let _ = tcp.set_nodelay(true);
                    let remote = Remote::Tcp(tcp.peer_addr()?);
                    (Stream::Tcp(tcp), remote)
                }
            };
            let name = match host.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
                Ok(ip) => ServerName::IpAddress(ip.into()),
                Err(_) => ServerName::try_from(host)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
            };
            let tls = connector.connect(name, stream).await?;
            // Registered under the trust that checked the server, if replaceable.
            let (closer, registration) = match &trust {
                None => (Arc::new(Closer::default()), None),
                Some(trust) => {
                    let refused =
                        |why: String| io::Error::new(io::ErrorKind::PermissionDenied, why);
                    let (chain, party) = peer_chain(tls.get_ref().1.peer_certificates())
                        .ok_or_else(|| refused("server certificate names no party".into()))?;
                    let (registration, closer) = trust
                        .register(chain, party, remote, "outbound")
                        .map_err(|e| refused(e.to_string()))?;
                    (closer, Some(registration))
                }
            };
            let stream = Watched {
                stream: tls,
                closer,
                _registration: registration,
                _slot: None,
            };
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(service))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::SystemTime;

    use exchange_core::ca::{CertificateAuthority, Validity};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn party(ca: &CertificateAuthority, uri: &str) -> TlsIdentity {
        let creds = ca
            .issue_party(
                &PartyUri::new(uri).unwrap(),
                uri,
                Validity::days_from(SystemTime::now(), 1),
            )
            .unwrap();
        TlsIdentity::from_pem(
            creds.identity.cert_pem.as_bytes(),
            creds.identity.key_pem.as_bytes(),
        )
        .unwrap()
    }

    /// The open profile's handshake: TLS 1.3, hybrid post-quantum key
    /// exchange, the client's party visible to the server.
    #[tokio::test]
    async fn handshake_is_tls13_with_hybrid_post_quantum_key_exchange() {
        install_provider();
        let ca = CertificateAuthority::generate("CA", Validity::days_from(SystemTime::now(), 1))
            .unwrap();
        let trust = || {
            TrustStore::builder()
                .anchors_pem(ca.certificate_pem().as_bytes())
                .unwrap()
                .build()
                .unwrap()
        };
        let server_id = party(&ca, "urn:test:server");
        let client_id = party(&ca, "urn:test:client");
        let server = server_config(SharedTrust::new(trust()), &server_id, versions(false)).unwrap();
        let client = client_config(
            Arc::new(trust()),
            PartyUri::new("urn:test:server").unwrap(),
            Some(&client_id),
            versions(false),
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = TlsAcceptor::from(server).accept(tcp).await.unwrap();
            let party = peer_party(&tls).unwrap();
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.unwrap();
            (party, buf)
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut tls = TlsConnector::from(client)
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .unwrap();
        let (_, conn) = tls.get_ref();
        assert_eq!(
            conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        assert_eq!(
            conn.negotiated_key_exchange_group().map(|g| g.name()),
            Some(rustls::NamedGroup::X25519MLKEM768)
        );
        assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
        tls.write_all(b"ping").await.unwrap();
        let (party, buf) = accept.await.unwrap();
        assert_eq!(party.as_str(), "urn:test:client");
        assert_eq!(&buf, b"ping");
    }

    /// The kind of handshake of one connection from `client` to a server
    /// over `server` that first sends one byte (which the client reads, so
    /// any session ticket sent before it has been processed).
    async fn handshake_kind(
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    ) -> rustls::HandshakeKind {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = TlsAcceptor::from(server).accept(tcp).await.unwrap();
            tls.write_all(b"x").await.unwrap();
            tls.flush().await.unwrap();
            let mut rest = Vec::new();
            let _ = tls.read_to_end(&mut rest).await;
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut tls = TlsConnector::from(client)
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .unwrap();
        let mut buf = [0u8; 1];
        tls.read_exact(&mut buf).await.unwrap();
        let kind = tls.get_ref().1.handshake_kind().unwrap();
        tls.shutdown().await.unwrap();
        drop(tls);
        accept.await.unwrap();
        kind
    }

    fn test_configs(
        ca: &CertificateAuthority,
    ) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let trust = || {
            TrustStore::builder()
                .anchors_pem(ca.certificate_pem().as_bytes())
                .unwrap()
                .build()
                .unwrap()
        };
        let server = server_config(
            SharedTrust::new(trust()),
            &party(ca, "urn:test:server"),
            versions(false),
        )
        .unwrap();
        let client = client_config(
            Arc::new(trust()),
            PartyUri::new("urn:test:server").unwrap(),
            Some(&party(ca, "urn:test:client")),
            versions(false),
        )
        .unwrap();
        (server, client)
    }

    /// The servers never resume a session, even for a client that keeps
    /// them and offers one: every client certificate is checked.
    #[tokio::test]
    async fn server_never_resumes_a_session() {
        install_provider();
        let ca = CertificateAuthority::generate("CA", Validity::days_from(SystemTime::now(), 1))
            .unwrap();
        let (server, client) = test_configs(&ca);
        let mut resuming = (*client).clone();
        resuming.resumption = rustls::client::Resumption::in_memory_sessions(16);
        let resuming = Arc::new(resuming);
        for _ in 0..3 {
            assert_eq!(
                handshake_kind(server.clone(), resuming.clone()).await,
                rustls::HandshakeKind::Full
            );
        }
    }

    /// The daemon's outbound connections never offer to resume, even to a
    /// server that would: every server certificate is checked.
    #[tokio::test]
    async fn client_never_offers_to_resume() {
        install_provider();
        let ca = CertificateAuthority::generate("CA", Validity::days_from(SystemTime::now(), 1))
            .unwrap();
        let (server, client) = test_configs(&ca);
        let mut resuming = (*server).clone();
        resuming.session_storage = rustls::server::ServerSessionMemoryCache::new(16);
        resuming.send_tls13_tickets = 2;
        let resuming = Arc::new(resuming);
        // The same server would resume a client that keeps sessions (so the
        // check below is not vacuous).
        let mut keeping = (*client).clone();
        keeping.resumption = rustls::client::Resumption::in_memory_sessions(16);
        let keeping = Arc::new(keeping);
        handshake_kind(resuming.clone(), keeping.clone()).await;
        assert_eq!(
            handshake_kind(resuming.clone(), keeping).await,
            rustls::HandshakeKind::Resumed
        );
        for _ in 0..3 {
            assert_eq!(
                handshake_kind(resuming.clone(), client.clone()).await,
                rustls::HandshakeKind::Full
            );
        }
    }

    /// A server certificate naming another party is refused even though it validates.
    #[tokio::test]
    async fn client_refuses_a_server_naming_another_party() {
        install_provider();
        let ca = CertificateAuthority::generate("CA", Validity::days_from(SystemTime::now(), 1))
            .unwrap();
        let trust = || {
            TrustStore::builder()
                .anchors_pem(ca.certificate_pem().as_bytes())
                .unwrap()
                .build()
                .unwrap()
        };
        let server = server_config(
            SharedTrust::new(trust()),
            &party(&ca, "urn:test:impostor"),
            versions(false),
        )
        .unwrap();
        let client = client_config(
            Arc::new(trust()),
            PartyUri::new("urn:test:server").unwrap(),
            Some(&party(&ca, "urn:test:client")),
            versions(false),
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = TlsAcceptor::from(server).accept(tcp).await;
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let err = TlsConnector::from(client)
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .unwrap_err();
        let inner = err.into_inner().unwrap();
        assert_eq!(
            inner.downcast_ref::<rustls::Error>(),
            Some(&rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName
            ))
        );
    }
}
