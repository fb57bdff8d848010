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
//! peer party as their connect info ([`PeerInfo`]). Failed handshakes are
//! logged with their reason and dropped.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use exchange_core::identity::Certificate;
use exchange_core::trust::TrustStore;
use exchange_core::{PartyUri, TrustError};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme,
    SupportedProtocolVersion,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
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

/// Installs [`provider`] as the process default (idempotent).
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
pub struct TlsIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("chain_len", &self.chain.len())
            .field("key", &"[redacted]")
            .finish()
    }
}

impl TlsIdentity {
    /// From a PEM chain (leaf first) and a PEM PKCS#8 key.
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, Error> {
        let chain = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| Error::Tls("certificate PEM unreadable".into()))?;
        if chain.is_empty() {
            return Err(Error::Tls("no certificate in PEM".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|_| Error::Tls("private key PEM unreadable".into()))?;
        Ok(Self { chain, key })
    }

    fn parts(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (self.chain.clone(), self.key.clone_key())
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
/// every handshake reads the current one.
#[derive(Debug)]
pub struct SharedTrust {
    current: std::sync::RwLock<Arc<TrustStore>>,
}

impl SharedTrust {
    /// Starts with `trust`.
    pub fn new(trust: TrustStore) -> Arc<Self> {
        Arc::new(Self {
            current: std::sync::RwLock::new(Arc::new(trust)),
        })
    }

    /// The store in force now.
    pub fn get(&self) -> Arc<TrustStore> {
        // A poisoned lock still holds a complete store (replacement is one assignment).
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts `trust` in force for every later check.
    pub fn replace(&self, trust: TrustStore) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(trust);
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
pub fn server_config(
    trust: Arc<SharedTrust>,
    identity: &TlsIdentity,
    versions: &[&'static SupportedProtocolVersion],
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let verifier = Arc::new(PartyClientVerifier {
        trust,
        algorithms: algorithms(),
    });
    let (chain, key) = identity.parts();
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| Error::Tls(e.to_string()))?;
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
        current: std::sync::RwLock::new(trust),
    });
    client_config_shared(trust, expected, identity, versions)
}

/// [`client_config`] over a replaceable trust store.
pub fn client_config_shared(
    trust: Arc<SharedTrust>,
    expected: PartyUri,
    identity: Option<&TlsIdentity>,
    versions: &[&'static SupportedProtocolVersion],
) -> Result<Arc<rustls::ClientConfig>, Error> {
    let verifier = Arc::new(PinnedServerVerifier {
        trust,
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
        Some(id) => {
            let (chain, key) = id.parts();
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| Error::Tls(e.to_string()))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Who is on the other end of an accepted connection (tonic connect info).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The party URI of its validated certificate.
    pub party: PartyUri,
    /// Its TCP address.
    pub remote: SocketAddr,
}

/// An accepted connection whose TLS handshake (and certificate validation) completed.
#[derive(Debug)]
pub struct TlsConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
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

fn peer_party(stream: &tokio_rustls::server::TlsStream<TcpStream>) -> Option<PartyUri> {
    let der = stream.get_ref().1.peer_certificates()?.first()?;
    Certificate::from_der(der.as_ref().to_vec())
        .ok()?
        .party()
        .ok()
        .cloned()
}

/// Accepts TCP connections on `listener`, handshakes each in its own task and
/// yields those that completed. `service` names the listener in logs.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    service: &'static str,
) -> ReceiverStream<Result<TlsConn, io::Error>> {
    let acceptor = TlsAcceptor::from(config);
    let (tx, rx) = mpsc::channel(64);
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
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => match peer_party(&stream) {
                        Some(party) => {
                            tracing::debug!(service, %remote, %party, "TLS connection");
                            let info = PeerInfo { party, remote };
                            let _ = tx.send(Ok(TlsConn { stream, info })).await;
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

/// A lazily connecting gRPC channel to `address` (`host:port`) over `config`.
pub fn channel(
    address: &str,
    config: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
) -> Result<Channel, Error> {
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
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
        async move {
            let host = uri.host().unwrap_or_default().to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            let name = match host.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
                Ok(ip) => ServerName::IpAddress(ip.into()),
                Err(_) => ServerName::try_from(host)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
            };
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(tls))
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
