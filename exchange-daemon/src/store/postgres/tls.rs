//! TLS for every connection to PostgreSQL: the replica's name-holding
//! connection, the pool, and the offline tools' read-only snapshot all
//! connect through [`prepare`], so they share one decision and one rustls
//! configuration.
//!
//! # The decision (fail closed)
//!
//! The URL's `sslmode` and the CA decide; tokio-postgres's own `prefer`
//! (try TLS, fall back to plain text if the server declines) is never
//! used, since an attacker on the path can decline for the server:
//!
//! | `sslmode` | CA given | host | connection |
//! |---|---|---|---|
//! | `disable` | no | any | plain text (a WARN when the host is not this machine) |
//! | `disable` | yes | any | refused: contradictory |
//! | unset or `prefer` | yes | any | verified TLS, required |
//! | unset or `prefer` | no | loopback or Unix socket | plain text |
//! | unset or `prefer` | no | another machine | refused: say `sslmode=disable` to send in clear knowingly |
//! | `require`, `verify-ca`, `verify-full` | yes | any | verified TLS, required |
//! | `require`, `verify-ca`, `verify-full` | no | any | refused: no CA to verify against |
//!
//! Verified TLS always checks the server's chain against the CA file and
//! the host name (or IP address) the URL names, with rustls' WebPKI
//! verifier on the daemon's crypto provider: `require` and `verify-ca`
//! mean `verify-full` here. There is no way to accept an unverified
//! certificate. TLS 1.2 and 1.3 are offered (PostgreSQL's own minimum is
//! 1.2), ALPN `postgresql`. A client certificate (PostgreSQL `cert`
//! authentication) is sent when one is given. Channel binding
//! (`SCRAM-SHA-256-PLUS`) is not offered: with the server's certificate
//! verified, it adds nothing against a man in the middle.
//!
//! # Where the settings come from
//!
//! [`PgTls`] (the daemon's `[store] ca`, `cert`, `key`), and the libpq
//! parameters of the URL itself — `sslrootcert`, `sslcert`, `sslkey`, and
//! `sslmode` with libpq's values — which is how the offline tools'
//! `--store URL` says it. A file named in both places is refused.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::Host;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

use crate::error::{DbTlsError, StoreError};

/// TLS files for the connections to PostgreSQL (`[store] ca`, `cert`,
/// `key`; the URL's libpq `sslrootcert`, `sslcert`, `sslkey` say the same,
/// and naming a file in both places is refused).
///
/// With a CA, every connection is TLS and the server's chain and host name
/// are verified against it (`sslmode=disable` is then refused). Without
/// one, connections are plain text, and only to this machine (loopback,
/// Unix socket) unless the URL says `sslmode=disable`; `sslmode=require`,
/// `verify-ca` or `verify-full` without a CA is refused. There is no
/// fallback from TLS to plain text and no unverified TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgTls {
    /// PEM file of the CA certificates the server's certificate must chain
    /// to. Given, every connection is verified TLS.
    pub ca: Option<PathBuf>,
    /// PEM certificate chain (leaf first) presented to the server, for
    /// PostgreSQL `cert` authentication. Goes with `key`.
    pub cert: Option<PathBuf>,
    /// PKCS#8 PEM private key of `cert`.
    pub key: Option<PathBuf>,
}

/// `sslmode` as this module reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Disable,
    Prefer,
    /// `require`, `verify-ca` and `verify-full`: all verify fully.
    Require,
}

/// The libpq TLS parameters taken out of a URL.
#[derive(Debug, Default)]
struct UrlTls {
    mode: Option<Mode>,
    root_cert: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

/// The parameters this module reads (and removes before the driver parses
/// the rest, which would refuse the libpq-only ones).
const TLS_PARAMS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

impl UrlTls {
    fn set(&mut self, key: &str, value: String) -> Result<(), DbTlsError> {
        match key {
            "sslmode" => {
                self.mode = Some(match value.as_str() {
                    "disable" => Mode::Disable,
                    "prefer" => Mode::Prefer,
                    "require" | "verify-ca" | "verify-full" => Mode::Require,
                    other => {
                        return Err(DbTlsError::Settings(format!(
                            "sslmode={other} is not supported: use disable, prefer, require, \
                             verify-ca or verify-full (the last three all verify the server's \
                             certificate and name)"
                        )));
                    }
                });
            }
            "sslrootcert" => self.root_cert = Some(value.into()),
            "sslcert" => self.cert = Some(value.into()),
            "sslkey" => self.key = Some(value.into()),
            _ => {}
        }
        Ok(())
    }
}

/// Decodes `%XX` escapes (an invalid one stays as it is, as the driver
/// reads it).
fn percent_decode(s: &str) -> Result<String, DbTlsError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(&h), Some(&l)) = (bytes.get(i + 1), bytes.get(i + 2))
            && let (Some(h), Some(l)) = (hex(h), hex(l))
        {
            // Two hex digits make at most 255.
            out.push(u8::try_from(h * 16 + l).unwrap_or(u8::MAX));
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out)
        .map_err(|_| DbTlsError::Settings("a TLS parameter of the url is not UTF-8".into()))
}

/// Escapes a value for a URL's query (unreserved characters and `/` stay).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Where a `postgres://` URL's query starts (the index of its `?`), read
/// as the driver reads it: the credentials run to the first `@`, the
/// query starts at the first `?` after them. `None` for the key=value form.
fn uri_query(url: &str) -> Option<Option<usize>> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))?;
    let start = url.len() - rest.len();
    let after_credentials = rest.find('@').map_or(0, |i| i + 1);
    Some(
        rest[after_credentials..]
            .find('?')
            .map(|q| start + after_credentials + q),
    )
}

/// One `key=value` of the key=value form: the key, the unescaped value and
/// where the pair stands in the string.
struct Pair<'a> {
    key: &'a str,
    value: String,
    span: std::ops::Range<usize>,
}

/// The pairs of a key=value connection string, read with the driver's
/// grammar (values may be quoted with `'`, `\` escapes the next
/// character). `None` if it does not parse: the driver then says why.
fn key_value_pairs(s: &str) -> Option<Vec<Pair<'_>>> {
    let mut pairs = Vec::new();
    let mut it = s.char_indices().peekable();
    let skip_ws = |it: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while it.next_if(|&(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_ws(&mut it);
        let Some(&(start, _)) = it.peek() else {
            return Some(pairs);
        };
        let mut key_end = start;
        while let Some((i, c)) = it.next_if(|&(_, c)| !c.is_whitespace() && c != '=') {
            key_end = i + c.len_utf8();
        }
        if key_end == start {
            return None;
        }
        skip_ws(&mut it);
        it.next_if(|&(_, c)| c == '=')?;
        skip_ws(&mut it);
        let mut value = String::new();
        let end;
        if it.next_if(|&(_, c)| c == '\'').is_some() {
            loop {
                match it.next()? {
                    (i, '\'') => {
                        end = i + 1;
                        break;
                    }
                    (_, '\\') => value.push(it.next()?.1),
                    (_, c) => value.push(c),
                }
            }
        } else {
            let mut last = None;
            while let Some((i, c)) = it.next_if(|&(_, c)| !c.is_whitespace()) {
                last = Some(i + c.len_utf8());
                if c == '\\' {
                    if let Some((j, escaped)) = it.next() {
                        value.push(escaped);
                        last = Some(j + escaped.len_utf8());
                    }
                } else {
                    value.push(c);
                }
            }
            end = last?;
        }
        pairs.push(Pair {
            key: &s[start..key_end],
            value,
            span: start..end,
        });
    }
}

/// The URL without its libpq TLS parameters, and those parameters.
fn split_url(url: &str) -> Result<(String, UrlTls), DbTlsError> {
    let mut tls = UrlTls::default();
    match uri_query(url) {
        Some(None) => Ok((url.to_owned(), tls)),
        Some(Some(q)) => {
            let mut kept = Vec::new();
            for part in url[q + 1..].split('&') {
                let (key, value) = part.split_once('=').unwrap_or((part, ""));
                let key = percent_decode(key)?;
                if TLS_PARAMS.contains(&key.as_str()) {
                    tls.set(&key, percent_decode(value)?)?;
                } else {
                    kept.push(part);
                }
            }
            let head = &url[..q];
            let out = if kept.is_empty() {
                head.to_owned()
            } else {
                format!("{head}?{}", kept.join("&"))
            };
            Ok((out, tls))
        }
        None => {
            let Some(pairs) = key_value_pairs(url) else {
                return Ok((url.to_owned(), tls));
            };
            let mut kept = Vec::new();
            for pair in pairs {
                if TLS_PARAMS.contains(&pair.key) {
                    tls.set(pair.key, pair.value)?;
                } else {
                    kept.push(&url[pair.span]);
                }
            }
            Ok((kept.join(" "), tls))
        }
    }
}

/// `url` with the files of `tls` added as its libpq parameters
/// (`sslrootcert`, `sslcert`, `sslkey`): how a daemon's `[store]` reaches
/// the offline tools through one URL
/// ([`crate::store::StoreLocation::of_config`]).
pub(crate) fn url_with_files(url: &str, tls: &PgTls) -> String {
    let files = [
        ("sslrootcert", &tls.ca),
        ("sslcert", &tls.cert),
        ("sslkey", &tls.key),
    ];
    let mut out = url.to_owned();
    for (key, path) in files {
        let Some(path) = path else { continue };
        let path = path.to_string_lossy();
        match uri_query(&out) {
            Some(query) => {
                let sep = if query.is_some() { '&' } else { '?' };
                out = format!("{out}{sep}{key}={}", percent_encode(&path));
            }
            None => {
                let quoted = path.replace('\\', "\\\\").replace('\'', "\\'");
                out = format!("{out} {key}='{quoted}'");
            }
        }
    }
    out
}

/// One file from the settings or the URL; both is refused.
fn one_of(
    configured: Option<&PathBuf>,
    from_url: Option<PathBuf>,
    key: &str,
    param: &str,
) -> Result<Option<PathBuf>, DbTlsError> {
    match (configured, from_url) {
        (Some(_), Some(_)) => Err(DbTlsError::Settings(format!(
            "[store] {key} and the url's {param} are both set: give the file once"
        ))),
        (Some(p), None) => Ok(Some(p.clone())),
        (None, p) => Ok(p),
    }
}

/// Whether every host of `config` is this machine: a Unix socket, a
/// loopback address, or `localhost`.
fn all_local(config: &tokio_postgres::Config) -> bool {
    let addrs = config.get_hostaddrs();
    config.get_hosts().iter().enumerate().all(|(i, host)| {
        if let Some(addr) = addrs.get(i) {
            return addr.is_loopback();
        }
        match host {
            Host::Tcp(name) => {
                name.eq_ignore_ascii_case("localhost")
                    || name
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<IpAddr>()
                        .is_ok_and(|a| a.is_loopback())
            }
            #[cfg(unix)]
            Host::Unix(_) => true,
        }
    })
}

/// The hosts of `config`, for messages.
fn hosts(config: &tokio_postgres::Config) -> String {
    config
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            #[cfg(unix)]
            Host::Unix(path) => path.display().to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn file_error(path: &Path, problem: impl Into<String>) -> DbTlsError {
    DbTlsError::File {
        path: path.to_owned(),
        problem: problem.into(),
    }
}

/// The CA certificates of a PEM file.
fn roots(path: &Path) -> Result<RootCertStore, DbTlsError> {
    let pem = std::fs::read(path).map_err(|e| file_error(path, e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(path, "holds no PEM certificate"));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| file_error(path, format!("certificate unusable as a CA: {e}")))?;
    }
    Ok(roots)
}

/// The one rustls configuration of the connections to PostgreSQL.
fn client_config(
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, DbTlsError> {
    let builder = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| DbTlsError::Settings(format!("crypto provider: {e}")))?
        .with_root_certificates(roots(ca)?);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = std::fs::read(cert).map_err(|e| file_error(cert, e.to_string()))?;
            let key_pem = std::fs::read(key)
                .map(zeroize::Zeroizing::new)
                .map_err(|e| file_error(key, e.to_string()))?;
            let identity = crate::tls::TlsIdentity::from_pem(&chain, &key_pem)
                .map_err(|e| file_error(key, e.to_string()))?;
            builder.with_client_cert_resolver(identity.resolver())
        }
    };
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Arc::new(config))
}

/// How to connect: the driver's settings (with its `sslmode` set to
/// `require` or `disable`, never `prefer`) and the connector.
pub(crate) struct Prepared {
    /// The driver's settings.
    pub(crate) config: tokio_postgres::Config,
    /// The connector (unused when the connection is plain).
    pub(crate) tls: MakeRustls,
    /// Plain text to another machine, as `sslmode=disable` asked.
    pub(crate) clear_to_remote: bool,
}

/// Reads `url` and `tls` into connection settings, applying the decision
/// of the module documentation; reads the TLS files. Logs nothing (see
/// [`prepare`]).
pub(crate) fn resolve(url: &str, tls: &PgTls) -> Result<Prepared, StoreError> {
    let (rest, from_url) = split_url(url)?;
    let mut config: tokio_postgres::Config = rest
        .parse()
        .map_err(|e| StoreError::Invalid(format!("store url: {e}")))?;
    let ca = one_of(tls.ca.as_ref(), from_url.root_cert, "ca", "sslrootcert")?;
    let cert = one_of(tls.cert.as_ref(), from_url.cert, "cert", "sslcert")?;
    let key = one_of(tls.key.as_ref(), from_url.key, "key", "sslkey")?;
    let client = match (&cert, &key) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        (None, None) => None,
        _ => {
            return Err(DbTlsError::Settings(
                "a client certificate and its key go together: give both or neither".into(),
            )
            .into());
        }
    };
    let local = all_local(&config);
    let use_tls = match from_url.mode {
        Some(Mode::Disable) => {
            if ca.is_some() || client.is_some() {
                return Err(DbTlsError::Settings(
                    "sslmode=disable, but a CA or client certificate is given: remove one or the other"
                        .into(),
                )
                .into());
            }
            false
        }
        Some(Mode::Require) if ca.is_none() => {
            return Err(DbTlsError::Settings(
                "sslmode requires TLS, but no CA is given to verify the server against: \
                 set [store] ca (or the url's sslrootcert) to the PEM file of the CA that \
                 issued the server's certificate"
                    .into(),
            )
            .into());
        }
        Some(Mode::Require) => true,
        Some(Mode::Prefer) | None => {
            if ca.is_some() {
                true
            } else if client.is_some() {
                return Err(DbTlsError::Settings(
                    "a client certificate is given but no CA: the certificate is only sent over \
                     TLS, which needs the CA that issued the server's certificate ([store] ca \
                     or the url's sslrootcert)"
                        .into(),
                )
                .into());
            } else if local {
                false
            } else {
                return Err(DbTlsError::Settings(format!(
                    "the database at {} is not on this machine and no CA is given: set \
                     [store] ca (or the url's sslrootcert) to connect over verified TLS, or \
                     sslmode=disable in the url to send the store's contents in clear \
                     knowingly",
                    hosts(&config)
                ))
                .into());
            }
        }
    };
    #[cfg(unix)]
    if use_tls
        && config
            .get_hosts()
            .iter()
            .all(|h| matches!(h, Host::Unix(_)))
    {
        return Err(DbTlsError::Settings(
            "the url names a Unix socket, where PostgreSQL offers no TLS: connect over TCP \
             to use TLS, or give no CA and sslmode for the socket"
                .into(),
        )
        .into());
    }
    let connector = match &ca {
        Some(ca) if use_tls => {
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
            MakeRustls {
                config: Some(client_config(ca, client)?),
            }
        }
        _ => {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
            MakeRustls { config: None }
        }
    };
    Ok(Prepared {
        config,
        tls: connector,
        clear_to_remote: !use_tls && !local,
    })
}

/// [`resolve`], warning when the store's traffic will cross the network in
/// clear: what each connecting path calls.
pub(crate) fn prepare(url: &str, tls: &PgTls) -> Result<Prepared, StoreError> {
    let prepared = resolve(url, tls)?;
    if prepared.clear_to_remote {
        tracing::warn!(
            hosts = %hosts(&prepared.config),
            "the store's connections to PostgreSQL are not encrypted (sslmode=disable): \
             audit metadata and stored envelopes cross the network in clear"
        );
    }
    Ok(prepared)
}

/// Checks a `[store]` configuration without connecting: the same errors
/// [`prepare`] would give, at configuration time.
pub(crate) fn check(url: &str, tls: &PgTls) -> Result<(), StoreError> {
    resolve(url, tls).map(|_| ())
}

/// A connection error, with the TLS failure named when there was one,
/// and the cause of a failure the server did not report (the driver's own
/// message says only "error performing TLS handshake", "error connecting
/// to server").
pub(crate) fn connect_error(e: tokio_postgres::Error) -> StoreError {
    let source = std::error::Error::source(&e);
    if let Some(f) = source.and_then(|s| s.downcast_ref::<HandshakeFailure>()) {
        return StoreError::DatabaseTls(f.kind());
    }
    match source {
        Some(cause) if e.as_db_error().is_none() => StoreError::Backend {
            backend: "postgres",
            detail: format!("{e}: {cause}"),
        },
        _ => super::pg_error(e),
    }
}

/// Why our connector did not complete a handshake.
#[derive(Debug)]
pub(crate) enum HandshakeFailure {
    /// Asked for TLS with no configuration (never, since the driver's
    /// `sslmode` is `disable` then; refused all the same).
    NotConfigured,
    /// The host name cannot be a TLS server name.
    BadName(String),
    /// rustls refused.
    Tls { host: String, error: rustls::Error },
    /// The connection failed under the handshake.
    Io(io::Error),
}

impl HandshakeFailure {
    fn kind(&self) -> DbTlsError {
        match self {
            Self::NotConfigured => {
                DbTlsError::Settings("TLS was asked for without a TLS configuration".into())
            }
            Self::BadName(host) => DbTlsError::Settings(format!(
                "{host:?} cannot be checked against a certificate: connect by host name or IP address"
            )),
            Self::Tls { host, error } => match error {
                rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                ) => DbTlsError::WrongServerName {
                    host: host.clone(),
                    detail: error.to_string(),
                },
                rustls::Error::InvalidCertificate(_) => {
                    DbTlsError::UntrustedServer(error.to_string())
                }
                _ => DbTlsError::Handshake(error.to_string()),
            },
            Self::Io(e) => DbTlsError::Handshake(e.to_string()),
        }
    }
}

impl std::fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.kind())
    }
}

impl std::error::Error for HandshakeFailure {}

/// Makes a [`RustlsConnect`] per host (a `tokio_postgres` TLS connector).
#[derive(Clone)]
pub(crate) struct MakeRustls {
    config: Option<Arc<ClientConfig>>,
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = HandshakeFailure;

    /// Never fails here: the driver asks for a connector even for a plain
    /// connection (and with an empty name for a Unix socket), so a problem
    /// is reported when a handshake is attempted.
    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, HandshakeFailure> {
        Ok(RustlsConnect {
            config: self.config.clone(),
            host: domain.to_owned(),
        })
    }
}

/// One handshake with one host.
pub(crate) struct RustlsConnect {
    config: Option<Arc<ClientConfig>>,
    host: String,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = HandshakeFailure;
    type Future = Pin<
        Box<dyn std::future::Future<Output = Result<RustlsStream<S>, HandshakeFailure>> + Send>,
    >;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let config = self.config.ok_or(HandshakeFailure::NotConfigured)?;
            let host = self.host;
            let name = ServerName::try_from(host.clone())
                .map_err(|_| HandshakeFailure::BadName(host.clone()))?;
            let connected = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await;
            match connected {
                Ok(tls) => Ok(RustlsStream(tls)),
                Err(e) => Err(
                    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                        Some(error) => HandshakeFailure::Tls {
                            host,
                            error: error.clone(),
                        },
                        None => HandshakeFailure::Io(e),
                    },
                ),
            }
        })
    }
}

/// A verified TLS connection to PostgreSQL.
pub(crate) struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn split(url: &str) -> (String, UrlTls) {
        split_url(url).unwrap()
    }

    #[test]
    fn the_libpq_parameters_are_taken_out_of_a_uri() {
        let (rest, tls) = split(
            "postgres://app:p%3Fw@db.example:5432/exchange?sslmode=verify-full&\
             connect_timeout=5&sslrootcert=%2Fetc%2Fpg%20ca.pem&sslcert=c.pem&sslkey=k.pem",
        );
        assert_eq!(
            rest,
            "postgres://app:p%3Fw@db.example:5432/exchange?connect_timeout=5"
        );
        assert_eq!(tls.mode, Some(Mode::Require));
        assert_eq!(tls.root_cert, Some(PathBuf::from("/etc/pg ca.pem")));
        assert_eq!(tls.cert, Some(PathBuf::from("c.pem")));
        assert_eq!(tls.key, Some(PathBuf::from("k.pem")));
        let (rest, tls) = split("postgresql://db/x?sslmode=disable");
        assert_eq!(rest, "postgresql://db/x");
        assert_eq!(tls.mode, Some(Mode::Disable));
        let (rest, tls) = split("postgres://db/x");
        assert_eq!(rest, "postgres://db/x");
        assert_eq!(tls.mode, None);
        // A '?' in the password is not the query.
        let (rest, tls) = split("postgres://u:a?b@db/x?sslmode=prefer");
        assert_eq!(rest, "postgres://u:a?b@db/x");
        assert_eq!(tls.mode, Some(Mode::Prefer));
    }

    #[test]
    fn the_libpq_parameters_are_taken_out_of_key_value_form() {
        let (rest, tls) = split(
            "host=db.example  user=app sslmode=require sslrootcert='/etc/my ca\\'s.pem' \
             password=a\\ b sslkey=/k.pem sslcert = /c.pem dbname=exchange",
        );
        assert_eq!(
            rest,
            "host=db.example user=app password=a\\ b dbname=exchange"
        );
        assert_eq!(tls.mode, Some(Mode::Require));
        assert_eq!(tls.root_cert, Some(PathBuf::from("/etc/my ca's.pem")));
        assert_eq!(tls.cert, Some(PathBuf::from("/c.pem")));
        assert_eq!(tls.key, Some(PathBuf::from("/k.pem")));
        let parsed: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(parsed.get_password(), Some(b"a b".as_slice()));
    }

    #[test]
    fn an_unknown_sslmode_is_refused() {
        let e = split_url("host=db sslmode=allow").unwrap_err();
        assert!(
            e.to_string().contains("sslmode=allow is not supported"),
            "{e}"
        );
    }

    #[test]
    fn files_added_to_a_url_read_back() {
        let tls = PgTls {
            ca: Some("/etc/pg ca&x.pem".into()),
            cert: Some("/c.pem".into()),
            key: Some("/it's.pem".into()),
        };
        for url in [
            "postgres://db/x",
            "postgres://db/x?sslmode=require",
            "host=db dbname=x",
        ] {
            let (_, read) = split(&url_with_files(url, &tls));
            assert_eq!(read.root_cert, tls.ca, "{url}");
            assert_eq!(read.cert, tls.cert, "{url}");
            assert_eq!(read.key, tls.key, "{url}");
        }
    }

    fn resolve_err(url: &str, tls: &PgTls) -> String {
        match resolve(url, tls) {
            Err(StoreError::DatabaseTls(e)) => e.to_string(),
            Err(e) => panic!("{url}: not a TLS settings error: {e}"),
            Ok(_) => panic!("{url}: accepted"),
        }
    }

    #[test]
    fn plain_text_is_only_for_this_machine_unless_asked_for() {
        for url in [
            "postgres://127.0.0.1/x",
            "postgres://localhost:5433/x",
            "postgres://[::1]/x",
            "host=/run/postgresql dbname=x",
            "host=db.example hostaddr=127.0.0.1 dbname=x",
        ] {
            let p = resolve(url, &PgTls::default()).unwrap();
            assert_eq!(
                p.config.get_ssl_mode(),
                tokio_postgres::config::SslMode::Disable,
                "{url}"
            );
            assert!(!p.clear_to_remote, "{url}");
        }
        let e = resolve_err("postgres://db.example/x", &PgTls::default());
        assert!(e.contains("db.example is not on this machine"), "{e}");
        let e = resolve_err("postgres://db.example/x?sslmode=prefer", &PgTls::default());
        assert!(e.contains("not on this machine"), "{e}");
        let e = resolve_err("host=127.0.0.1,db.example dbname=x", &PgTls::default());
        assert!(e.contains("not on this machine"), "{e}");
        let p = resolve("postgres://db.example/x?sslmode=disable", &PgTls::default()).unwrap();
        assert!(p.clear_to_remote);
    }

    #[test]
    fn contradictory_settings_are_refused() {
        let ca = PgTls {
            ca: Some("/nonexistent/ca.pem".into()),
            ..PgTls::default()
        };
        let e = resolve_err("postgres://127.0.0.1/x?sslmode=require", &PgTls::default());
        assert!(e.contains("no CA is given"), "{e}");
        let e = resolve_err("host=/run/postgresql dbname=x sslmode=require", &ca);
        assert!(e.contains("Unix socket"), "{e}");
        let e = resolve_err("postgres://127.0.0.1/x?sslmode=disable", &ca);
        assert!(e.contains("sslmode=disable, but a CA"), "{e}");
        let e = resolve_err("postgres://127.0.0.1/x?sslrootcert=/other.pem", &ca);
        assert!(e.contains("both set"), "{e}");
        let e = resolve_err(
            "postgres://127.0.0.1/x",
            &PgTls {
                cert: Some("/c.pem".into()),
                ..PgTls::default()
            },
        );
        assert!(e.contains("give both or neither"), "{e}");
        let e = resolve_err(
            "postgres://127.0.0.1/x",
            &PgTls {
                cert: Some("/c.pem".into()),
                key: Some("/k.pem".into()),
                ca: None,
            },
        );
        assert!(e.contains("no CA"), "{e}");
        // A CA given means TLS: its file is read (and here missing).
        let e = resolve_err("postgres://127.0.0.1/x", &ca);
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }
}
