//! `exchange send`, `status`, `inbox`, `fetch` and `ack`: a local
//! application's side of its facility's daemon (the `Client` service of
//! proto/exchange/v1/daemon.proto), over mutual TLS with a local client
//! certificate. The daemon seals, signs and delivers; these commands stream
//! plaintext in and out and show what came back.
//!
//! Connection settings come from flags or a client config file (TOML with
//! the same keys, paths relative to the file); flags win.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use exchange_core::receipt::{SignedReceipt, VerifiedReceipt};
use exchange_core::route::HopRole;
use exchange_core::trust::TrustStore;
use exchange_core::{MessageId, PartyUri};
use exchange_daemon::client::{ClientSettings, connect};
use exchange_daemon::error::status_reason;
use exchange_daemon::from_unix_ms;
use exchange_daemon::proto::client_client::ClientClient;
use exchange_daemon::proto::{
    AckRequest, FetchHeader, FetchRequest, HopState, InboxItem, ListInboxRequest, MessageStatus,
    Receipt, RecipientProvision, SendRequest, SendResponse, SendStart, StatusRequest,
    SubjectIdentifier, fetch_response, send_request,
};
use exchange_daemon::tls::TlsIdentity;
use serde::Deserialize;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::envelope_cmd::DEFAULT_SUBJECT_SYSTEM;
use crate::error::{CliError, Result};
use crate::files::{self, fmt_time};

/// Plaintext slice per streamed message (the daemon's own slice size).
const SLICE: usize = 256 * 1024;
/// Transfers larger than this show a progress bar (on a terminal).
const PROGRESS_OVER: u64 = 1 << 20;
/// The environment variable naming the default client config file.
pub(crate) const CONFIG_ENV: &str = "EXCHANGE_CLIENT_CONFIG";

/// How to reach and trust the daemon (flags; each overrides the config file).
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct ConnArgs {
    /// The daemon's client listener.
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) server: Option<String>,
    /// The facility party URI the daemon's certificate must name.
    #[arg(long, value_name = "URI")]
    pub(crate) server_party: Option<String>,
    /// CA certificate: trust anchor for the daemon's certificate.
    #[arg(long, value_name = "FILE")]
    pub(crate) ca: Option<PathBuf>,
    /// CRL to check the daemon's certificate against.
    #[arg(long, value_name = "FILE")]
    pub(crate) crl: Option<PathBuf>,
    /// This application's client certificate (PEM).
    #[arg(long, value_name = "FILE")]
    pub(crate) cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub(crate) key: Option<PathBuf>,
    /// Client config file: TOML with keys server, server_party, ca, crl, cert,
    /// key (paths relative to the file). Default: $EXCHANGE_CLIENT_CONFIG.
    #[arg(long, value_name = "FILE")]
    pub(crate) client_config: Option<PathBuf>,
}

/// The client config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFile {
    server: Option<String>,
    server_party: Option<String>,
    ca: Option<PathBuf>,
    crl: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    /// Accept TLS 1.2 (a daemon on a closed network that permits it).
    #[serde(default)]
    allow_tls12: bool,
}

/// The text of a client config file (paths written as given).
pub(crate) fn client_config_toml(
    server: &str,
    server_party: &str,
    ca: &Path,
    crl: Option<&Path>,
    cert: &Path,
    key: &Path,
) -> String {
    let q = |p: &Path| toml_string(&p.display().to_string());
    let mut s = format!(
        "# exchange client settings: `exchange status ID --client-config THIS_FILE`\n\
         server = {}\nserver_party = {}\nca = {}\n",
        toml_string(server),
        toml_string(server_party),
        q(ca)
    );
    if let Some(crl) = crl {
        s.push_str(&format!("crl = {}\n", q(crl)));
    }
    s.push_str(&format!("cert = {}\nkey = {}\n", q(cert), q(key)));
    s
}

/// A TOML basic string (quotes and backslashes escaped).
pub(crate) fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Resolved settings, every required one present.
#[derive(Debug, Clone)]
struct Conn {
    address: String,
    server_party: PartyUri,
    ca: PathBuf,
    crl: Option<PathBuf>,
    cert: PathBuf,
    key: PathBuf,
    allow_tls12: bool,
}

impl ConnArgs {
    fn resolve(&self) -> Result<Conn> {
        let path = self
            .client_config
            .clone()
            .or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from));
        let (file, base) = match &path {
            Some(p) => {
                let text = String::from_utf8(files::read(p)?).map_err(|_| {
                    CliError::ClientSettings(format!("{} is not UTF-8 text", p.display()))
                })?;
                let file: ClientFile = toml::from_str(&text).map_err(|e| {
                    CliError::ClientSettings(format!("{}: {}", p.display(), e.message()))
                })?;
                (file, files::dir_of(p))
            }
            None => (ClientFile::default(), PathBuf::new()),
        };
        let rel = |p: Option<PathBuf>| p.map(|p| if p.is_absolute() { p } else { base.join(p) });
        let missing = |flag: &str| {
            CliError::ClientSettings(format!(
                "missing --{flag} (or `{}` in a --client-config file)",
                flag.replace('-', "_")
            ))
        };
        let server_party = self
            .server_party
            .clone()
            .or(file.server_party)
            .ok_or_else(|| missing("server-party"))?;
        Ok(Conn {
            address: self
                .server
                .clone()
                .or(file.server)
                .ok_or_else(|| missing("server"))?,
            server_party: PartyUri::new(server_party.clone())
                .map_err(CliError::about(format!("server party {server_party:?}")))?,
            ca: self
                .ca
                .clone()
                .or_else(|| rel(file.ca))
                .ok_or_else(|| missing("ca"))?,
            crl: self.crl.clone().or_else(|| rel(file.crl)),
            cert: self
                .cert
                .clone()
                .or_else(|| rel(file.cert))
                .ok_or_else(|| missing("cert"))?,
            key: self
                .key
                .clone()
                .or_else(|| rel(file.key))
                .ok_or_else(|| missing("key"))?,
            allow_tls12: file.allow_tls12,
        })
    }

    /// Connects (lazily: the first request dials and handshakes).
    pub(crate) fn connect(&self) -> Result<Client> {
        let conn = self.resolve()?;
        let trust = files::trust(&conn.ca, conn.crl.as_deref())?;
        let identity =
            TlsIdentity::from_pem(&files::read(&conn.cert)?, &files::read_secret(&conn.key)?)
                .map_err(|source| CliError::Daemon {
                    what: format!(
                        "client certificate {} / {}",
                        conn.cert.display(),
                        conn.key.display()
                    ),
                    source,
                })?;
        let settings = ClientSettings {
            address: conn.address.clone(),
            server_party: conn.server_party.clone(),
            anchors_pem: files::read(&conn.ca)?,
            crls_pem: conn.crl.as_deref().map(files::read).transpose()?,
            identity,
            allow_tls12: conn.allow_tls12,
        };
        let rpc = connect(&settings).map_err(|source| CliError::Daemon {
            what: format!("connecting to {}", conn.address),
            source,
        })?;
        Ok(Client {
            rpc,
            address: Arc::from(conn.address.as_str()),
            server_party: conn.server_party,
            trust: Arc::new(trust),
        })
    }
}

/// A connection to one daemon's client service.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    rpc: ClientClient<Channel>,
    address: Arc<str>,
    server_party: PartyUri,
    trust: Arc<TrustStore>,
}

impl Client {
    /// The trust store built from the settings' CA and CRL (for receipts).
    pub(crate) fn trust(&self) -> &TrustStore {
        &self.trust
    }

    /// Turns a gRPC status into one line: the daemon's reason when it gave
    /// one, else what went wrong reaching it.
    fn error(&self, what: &str, status: &tonic::Status) -> CliError {
        if let Some(reason) = status_reason(status) {
            let message = status.message();
            let message = message
                .strip_prefix(reason)
                .and_then(|m| m.strip_prefix(": "))
                .unwrap_or(message);
            return CliError::Refused {
                what: what.to_owned(),
                reason: reason.to_owned(),
                message: message.to_owned(),
            };
        }
        let chain = error_chain(status);
        let lower = chain.join(" / ").to_ascii_lowercase();
        let reason = if lower.contains("notvalidforname") || lower.contains("not valid for name") {
            format!(
                "its certificate does not name {} (check --server-party)",
                self.server_party
            )
        } else if lower.contains("unknownissuer") || lower.contains("unknown issuer") {
            "its certificate was not issued by the CA given with --ca".to_owned()
        } else if lower.contains("connection refused") {
            "connection refused (is exchanged running, and is this its client listener?)".to_owned()
        } else if lower.contains("broken pipe") || lower.contains("connection reset") {
            "it closed the connection during the TLS handshake (did it refuse our client \
             certificate? it must come from the network CA, be in date and not revoked)"
                .to_owned()
        } else if lower.contains("alert") {
            format!(
                "it refused our client certificate ({})",
                chain.last().map_or("TLS alert", String::as_str)
            )
        } else {
            chain
                .last()
                .cloned()
                .unwrap_or_else(|| format!("{:?}", status.code()))
        };
        match status.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown => CliError::Connect {
                address: self.address.to_string(),
                reason,
            },
            code => CliError::Refused {
                what: what.to_owned(),
                reason: format!("{code:?}"),
                message: reason,
            },
        }
    }
}

/// Every message in an error's source chain, outermost first, without
/// repeats (io::Error hides its inner error from `source()`; look inside).
fn error_chain(status: &tonic::Status) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |s: String| {
        if !s.is_empty() && !out.contains(&s) {
            out.push(s);
        }
    };
    push(status.message().to_owned());
    let mut next: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = next {
        push(e.to_string());
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            push(inner.to_string());
            let mut deeper = inner.source();
            while let Some(d) = deeper {
                push(d.to_string());
                deeper = d.source();
            }
        }
        next = e.source();
    }
    out
}

fn parse_id(s: &str) -> Result<MessageId> {
    s.parse().map_err(|_| {
        CliError::Usage(format!(
            "{s:?} is not a message id (32 hex digits, dashes allowed)"
        ))
    })
}

fn id_of(bytes: &[u8]) -> String {
    MessageId::from_slice(bytes).map_or_else(|_| hex::encode(bytes), |id| id.to_string())
}

/// A recipient or relay, `URI[=ROLE]`: checked here so that a typo is one
/// clear line before anything is sent. No role: the daemon's contract for
/// the party decides.
fn parse_party_role(s: &str, flag: &str) -> Result<(PartyUri, Option<HopRole>)> {
    let (party, role) = match s.split_once('=') {
        Some((p, r)) => (
            p,
            Some(
                r.parse::<HopRole>()
                    .map_err(CliError::about(format!("--{flag} {s:?}")))?,
            ),
        ),
        None => (s, None),
    };
    let party =
        PartyUri::new(party.to_owned()).map_err(CliError::about(format!("--{flag} {s:?}")))?;
    Ok((party, role))
}

fn role_word(role: HopRole) -> &'static str {
    match role {
        HopRole::Entrusted => "entrusted",
        HopRole::ThirdParty => "third-party",
    }
}

/// `exchange send`'s arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct SendArgs {
    #[command(flatten)]
    pub(crate) conn: ConnArgs,
    /// A final recipient, URI[=third-party|entrusted] (repeatable). The role is
    /// the one the daemon's peer directory contracts for the party (default
    /// third-party, 第三者提供); naming another is refused.
    #[arg(long = "to", required = true, value_name = "URI[=ROLE]")]
    pub(crate) to: Vec<String>,
    /// A relay in travel order, URI[=entrusted|third-party] (repeatable). The
    /// role is the one the daemon's peer directory contracts for the party;
    /// naming another is refused.
    #[arg(long = "via", value_name = "URI[=ROLE]")]
    pub(crate) via: Vec<String>,
    /// Payload content type, e.g. application/fhir+json.
    #[arg(long)]
    pub(crate) content_type: String,
    /// Purpose or legal basis (public header; the daemon checks this client may send for it).
    #[arg(long)]
    pub(crate) purpose: String,
    /// Patient / subject identifier, SYSTEM|VALUE or VALUE (repeatable; sealed in the inner header).
    #[arg(long = "subject", value_name = "[SYSTEM|]VALUE")]
    pub(crate) subjects: Vec<String>,
    /// Document title (sealed).
    #[arg(long, default_value = "")]
    pub(crate) title: String,
    /// Document type (sealed).
    #[arg(long, default_value = "")]
    pub(crate) document_type: String,
    /// How long the envelope may be delivered: 30m, 12h, 7d (default: the daemon's).
    #[arg(long, value_parser = files::parse_duration)]
    pub(crate) expires_in: Option<Duration>,
    /// The file to send.
    #[arg(long = "in")]
    pub(crate) input: PathBuf,
    /// Follow the message until it is DELIVERED (or FAILED) and print its receipts.
    #[arg(long)]
    pub(crate) wait: bool,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
    /// Idempotency key (1-128 printable ASCII characters). The daemon answers
    /// a repeat with the same key and the same request with the original
    /// message, storing nothing. Default: a fresh random key, reused for
    /// this command's own retries.
    #[arg(long, value_name = "KEY")]
    pub(crate) idempotency_key: Option<String>,
}

impl SendArgs {
    fn start(&self, size_hint: u64) -> Result<SendStart> {
        let mut recipients = Vec::new();
        let mut entrusted = Vec::new();
        for to in &self.to {
            let (party, role) = parse_party_role(to, "to")?;
            if role == Some(HopRole::Entrusted) {
                entrusted.push(party.to_string());
            }
            recipients.push(party.to_string());
        }
        let relays = self
            .via
            .iter()
            .map(|v| {
                let (party, role) = parse_party_role(v, "via")?;
                Ok(match role {
                    Some(role) => format!("{party}={}", role_word(role)),
                    None => party.to_string(),
                })
            })
            .collect::<Result<_>>()?;
        Ok(SendStart {
            recipients,
            relays,
            entrusted_recipients: entrusted,
            content_type: self.content_type.clone(),
            purpose: self.purpose.clone(),
            subject_ids: self
                .subjects
                .iter()
                .map(|s| match s.split_once('|') {
                    Some((system, value)) => SubjectIdentifier {
                        system: system.to_owned(),
                        value: value.to_owned(),
                    },
                    None => SubjectIdentifier {
                        system: DEFAULT_SUBJECT_SYSTEM.to_owned(),
                        value: s.clone(),
                    },
                })
                .collect(),
            title: self.title.clone(),
            document_type: self.document_type.clone(),
            file_name: self
                .input
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            lifetime_seconds: self.expires_in.map_or(0, |d| d.as_secs()),
            size_hint,
            idempotency_key: self.idempotency_key.clone().unwrap_or_default(),
        })
    }
}

/// Streams `path` to the daemon after `start`; returns once the daemon has
/// stored the sealed envelope. A read error cancels the call, so the daemon
/// never seals a truncated file.
pub(crate) async fn send_file(
    client: &Client,
    mut start: SendStart,
    path: &Path,
) -> Result<SendResponse> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|source| CliError::Read {
            path: path.to_owned(),
            source,
        })?;
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    start.size_hint = len;
    let bar = files::progress_over(len, PROGRESS_OVER, "sending");
    let (tx, rx) = mpsc::channel::<SendRequest>(4);
    let (fail_tx, fail_rx) = oneshot::channel::<CliError>();
    let reader_bar = bar.clone();
    let owned_path = path.to_owned();
    tokio::spawn(async move {
        let mut file = file;
        let read_err = |source| CliError::Read {
            path: owned_path.clone(),
            source,
        };
        let first = SendRequest {
            part: Some(send_request::Part::Start(start)),
        };
        if tx.send(first).await.is_err() {
            return;
        }
        let mut sent = 0u64;
        loop {
            let mut buf = Vec::with_capacity(SLICE);
            let r = (&mut file).take(SLICE as u64).read_to_end(&mut buf).await;
            match r {
                Ok(0) => return,
                Ok(n) => {
                    sent += n as u64;
                    if let Some(b) = &reader_bar {
                        b.set_position(sent);
                    }
                    let msg = SendRequest {
                        part: Some(send_request::Part::Chunk(buf)),
                    };
                    if tx.send(msg).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    // Keep the request stream open: ending it would let the
                    // daemon seal what it has. The caller drops the call.
                    let _ = fail_tx.send(read_err(e));
                    tx.closed().await;
                    return;
                }
            }
        }
    });
    let mut rpc = client.rpc.clone();
    let result = tokio::select! {
        r = rpc.send(ReceiverStream::new(rx)) => {
            r.map(tonic::Response::into_inner).map_err(|s| client.error("send", &s))
        }
        Ok(e) = fail_rx => Err(e),
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    result
}

/// Sends a small in-memory payload (the demo's burst).
pub(crate) async fn send_bytes(
    client: &Client,
    mut start: SendStart,
    data: &[u8],
) -> Result<SendResponse> {
    start.size_hint = data.len() as u64;
    let mut msgs = vec![SendRequest {
        part: Some(send_request::Part::Start(start)),
    }];
    msgs.extend(data.chunks(SLICE).map(|c| SendRequest {
        part: Some(send_request::Part::Chunk(c.to_vec())),
    }));
    let mut rpc = client.rpc.clone();
    rpc.send(tokio_stream::iter(msgs))
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| client.error("send", &s))
}

/// How many times `exchange send` tries when the daemon could not be
/// reached or the answer was lost (same idempotency key each time).
const SEND_TRIES: u32 = 3;

/// A fresh idempotency key for one `exchange send` (and its own retries).
fn new_idempotency_key() -> Result<String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b)
        .map_err(|e| CliError::Usage(format!("no randomness for an idempotency key: {e}")))?;
    Ok(format!("exchange-cli-{}", hex::encode(b)))
}

/// Whether a failed Send may be tried again with the same key: the daemon
/// was not reached, the connection broke, or it is restarting or failed
/// inside (a repeat is answered with the original message if it had been
/// stored).
fn retryable(e: &CliError) -> bool {
    match e {
        CliError::Connect { .. } => true,
        CliError::Refused { reason, .. } => {
            matches!(reason.as_str(), "transport" | "shutdown" | "store")
        }
        _ => false,
    }
}

/// `exchange send`.
pub(crate) async fn send(a: &SendArgs) -> Result<()> {
    let mut start = a.start(0)?;
    if start.idempotency_key.is_empty() {
        start.idempotency_key = new_idempotency_key()?;
    }
    let client = a.conn.connect()?;
    let mut tries = 0;
    let sent = loop {
        tries += 1;
        match send_file(&client, start.clone(), &a.input).await {
            Ok(sent) => break sent,
            Err(e) if tries < SEND_TRIES && retryable(&e) => {
                eprintln!(
                    "send failed ({e}); trying again with idempotency key {}",
                    start.idempotency_key
                );
                tokio::time::sleep(std::time::Duration::from_secs(u64::from(tries))).await;
            }
            Err(e) => return Err(e),
        }
    };
    let id = id_of(&sent.message_id);
    if !a.wait {
        if a.json {
            println!(
                "{:#}",
                json!({"message_id": id, "ciphertext_length": sent.ciphertext_length})
            );
        } else {
            println!("{id}");
            println!(
                "  sent {}: sealed and stored by the daemon ({} of ciphertext); `exchange status {id}` follows it",
                a.input.display(),
                files::bytes(sent.ciphertext_length)
            );
        }
        return Ok(());
    }
    if !a.json {
        println!("{id}");
    }
    let status = watch_until(
        &client,
        &sent.message_id,
        &["DELIVERED", "PROCESSED"],
        |_| (),
    )
    .await?;
    if a.json {
        println!("{:#}", status_json(&status));
    } else {
        print_status(&status);
    }
    failed_check(&status)
}

/// Follows WatchStatus until the state is one of `until` or FAILED; calls
/// `each` on every update.
pub(crate) async fn watch_until(
    client: &Client,
    id: &[u8],
    until: &[&str],
    mut each: impl FnMut(&MessageStatus),
) -> Result<MessageStatus> {
    let what = format!("status {}", id_of(id));
    let mut rpc = client.rpc.clone();
    let mut stream = rpc
        .watch_status(StatusRequest {
            message_id: id.to_vec(),
        })
        .await
        .map_err(|s| client.error(&what, &s))?
        .into_inner();
    let mut last = None;
    while let Some(s) = stream
        .message()
        .await
        .map_err(|s| client.error(&what, &s))?
    {
        each(&s);
        let done = state_name(&s) == "FAILED" || until.contains(&state_name(&s));
        last = Some(s);
        if done {
            break;
        }
    }
    last.ok_or_else(|| CliError::Protocol {
        what,
        problem: "the daemon ended the status stream without a status".into(),
    })
}

/// One status request.
pub(crate) async fn status_of(client: &Client, id: &[u8]) -> Result<MessageStatus> {
    let mut rpc = client.rpc.clone();
    rpc.status(StatusRequest {
        message_id: id.to_vec(),
    })
    .await
    .map(tonic::Response::into_inner)
    .map_err(|s| client.error(&format!("status {}", id_of(id)), &s))
}

fn failed_check(s: &MessageStatus) -> Result<()> {
    if state_name(s) != "FAILED" {
        return Ok(());
    }
    let reason = s
        .receipts
        .iter()
        .find(|r| disposition_name(r) == "REJECTED")
        .map(|r| format!("REJECTED by {}: {}", r.issuer, r.reason))
        .or_else(|| {
            s.hops
                .iter()
                .find(|h| hop_state_name(h) == "FAILED")
                .map(|h| format!("delivery to {} failed: {}", h.party, h.last_error))
        })
        .unwrap_or_else(|| "no reason given".into());
    Err(CliError::Failed {
        id: id_of(&s.message_id),
        reason,
    })
}

/// The short name of an API enum value (`DELIVERED` for
/// `MESSAGE_STATE_DELIVERED`): what the CLI prints and its JSON carries.
fn short(name: &'static str, prefix: &str) -> &'static str {
    name.strip_prefix(prefix).unwrap_or(name)
}

/// A message's state: PENDING, RELAYED, DELIVERED, PROCESSED or FAILED.
pub(crate) fn state_name(s: &MessageStatus) -> &'static str {
    short(s.state().as_str_name(), "MESSAGE_STATE_")
}

/// A hop's delivery state: PENDING, DELIVERED or FAILED.
pub(crate) fn hop_state_name(h: &HopState) -> &'static str {
    short(h.state().as_str_name(), "HOP_DELIVERY_STATE_")
}

/// A receipt's disposition: ACCEPTED_FOR_RELAY, DELIVERED, PROCESSED or REJECTED.
pub(crate) fn disposition_name(r: &Receipt) -> &'static str {
    short(r.disposition().as_str_name(), "DISPOSITION_")
}

/// A receipt issuer's role: ENTRUSTED or THIRD_PARTY.
pub(crate) fn role_name(r: &Receipt) -> &'static str {
    short(r.role().as_str_name(), "HOP_ROLE_")
}

/// A recipient's provision: NOT_A_PROVISION, PENDING, PASSED or REJECTED.
pub(crate) fn provision_name(p: &RecipientProvision) -> &'static str {
    short(p.provision().as_str_name(), "PROVISION_STATE_")
}

fn ms(t: u64) -> String {
    fmt_time(from_unix_ms(t))
}

/// One receipt line: disposition, role, time, issuer name and URI, and the
/// boundary mark.
pub(crate) fn receipt_line(r: &Receipt) -> String {
    let disposition = if r.reason.is_empty() {
        disposition_name(r).to_owned()
    } else {
        format!("{} ({})", disposition_name(r), r.reason)
    };
    format!(
        "{disposition:<18} {:<11}  {:<24}  {} <{}>{}{}",
        role_name(r),
        ms(r.issued_ms),
        if r.issuer_name.is_empty() {
            "?"
        } else {
            &r.issuer_name
        },
        r.issuer,
        if r.provision_boundary {
            "  <- provision boundary (責任分界点)"
        } else {
            ""
        },
        if r.issuer_revoked_since {
            "  (issuer revoked since; valid when it arrived)"
        } else {
            ""
        }
    )
}

/// The human-readable status.
pub(crate) fn print_status(s: &MessageStatus) {
    println!("message {}  {}", id_of(&s.message_id), state_name(s));
    println!(
        "  created     {}, expires {}",
        ms(s.created_ms),
        ms(s.expires_ms)
    );
    for h in &s.hops {
        println!(
            "  hop         {} {} (attempts {}){}",
            h.party,
            hop_state_name(h),
            h.attempts,
            if h.last_error.is_empty() {
                String::new()
            } else {
                format!(", last error: {}", h.last_error)
            }
        );
    }
    if s.receipts.is_empty() {
        println!("  receipts    none yet");
    }
    for r in &s.receipts {
        println!("  receipt     {}", receipt_line(r));
    }
    for p in &s.provisions {
        let detail = match provision_name(p) {
            "NOT_A_PROVISION" => {
                "entrusted hops only (委託): not a third-party provision".to_owned()
            }
            "PENDING" => format!("waiting for {}'s custody receipt", p.boundary),
            "PASSED" => format!("responsibility passed to {}", p.boundary),
            "REJECTED" => format!("{} refused it", p.boundary),
            other => other.to_owned(),
        };
        println!(
            "  provision   {} {}: {detail}",
            p.recipient,
            provision_name(p)
        );
    }
}

/// The status as JSON.
pub(crate) fn status_json(s: &MessageStatus) -> serde_json::Value {
    json!({
        "message_id": id_of(&s.message_id),
        "state": state_name(s),
        "created": ms(s.created_ms),
        "expires": ms(s.expires_ms),
        "hops": s.hops.iter().map(|h| json!({
            "party": h.party, "state": hop_state_name(h), "attempts": h.attempts,
            "last_error": h.last_error,
        })).collect::<Vec<_>>(),
        "receipts": s.receipts.iter().map(|r| json!({
            "issuer": r.issuer, "issuer_name": r.issuer_name, "role": role_name(r),
            "disposition": disposition_name(r), "reason": r.reason, "time": ms(r.issued_ms),
            "provision_boundary": r.provision_boundary,
            "issuer_revoked_since": r.issuer_revoked_since,
        })).collect::<Vec<_>>(),
        "provisions": s.provisions.iter().map(|p| json!({
            "recipient": p.recipient, "provision": provision_name(p), "boundary": p.boundary,
            "receipt": p.receipt,
        })).collect::<Vec<_>>(),
    })
}

/// `exchange status`.
pub(crate) async fn status(conn: &ConnArgs, id: &str, watch: bool, as_json: bool) -> Result<()> {
    let id = parse_id(id)?;
    let client = conn.connect()?;
    let show = |s: &MessageStatus| {
        if as_json {
            println!("{}", status_json(s));
        } else {
            print_status(s);
        }
    };
    let last = if watch {
        watch_until(&client, id.as_bytes(), &["PROCESSED"], |s| {
            show(s);
            if !as_json {
                println!();
            }
        })
        .await?
    } else {
        let s = status_of(&client, id.as_bytes()).await?;
        if as_json {
            println!("{:#}", status_json(&s));
        } else {
            print_status(&s);
        }
        s
    };
    failed_check(&last)
}

/// The inbox listing: every page, in order.
pub(crate) async fn list_inbox(client: &Client, all: bool) -> Result<Vec<InboxItem>> {
    let mut rpc = client.rpc.clone();
    let mut items = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = rpc
            .list_inbox(ListInboxRequest {
                include_acked: all,
                // The daemon's default page size.
                page_size: 0,
                page_token,
            })
            .await
            .map_err(|s| client.error("inbox", &s))?
            .into_inner();
        items.extend(page.items);
        if page.next_page_token.is_empty() {
            return Ok(items);
        }
        page_token = page.next_page_token;
    }
}

fn short_size(n: u64) -> String {
    match n {
        n if n < 1024 => format!("{n} B"),
        n if n < 1 << 20 => format!("{:.1} KiB", n as f64 / 1024.0),
        n if n < 1 << 30 => format!("{:.1} MiB", n as f64 / f64::from(1u32 << 20)),
        n => format!("{:.1} GiB", n as f64 / f64::from(1u32 << 30)),
    }
}

/// `exchange inbox`.
pub(crate) async fn inbox(conn: &ConnArgs, all: bool, as_json: bool) -> Result<()> {
    let client = conn.connect()?;
    let items = list_inbox(&client, all).await?;
    if as_json {
        let v: Vec<_> = items
            .iter()
            .map(|i| {
                json!({
                    "message_id": id_of(&i.message_id), "sender": i.sender,
                    "content_type": i.content_type, "purpose": i.purpose,
                    "received": ms(i.received_ms), "sealed_size": i.payload_length, "acked": i.acked,
                })
            })
            .collect();
        println!("{:#}", serde_json::Value::Array(v));
        return Ok(());
    }
    if items.is_empty() {
        println!(
            "inbox empty{}",
            if all {
                ""
            } else {
                " (--all includes acknowledged items)"
            }
        );
        return Ok(());
    }
    println!(
        "{:<36}  {:<24}  {:>9}  {:<5}  {:<32}  {:<24}  PURPOSE",
        "ID", "RECEIVED", "SEALED", "ACKED", "SENDER", "CONTENT TYPE"
    );
    for i in &items {
        println!(
            "{:<36}  {:<24}  {:>9}  {:<5}  {:<32}  {:<24}  {}",
            id_of(&i.message_id),
            ms(i.received_ms),
            short_size(i.payload_length),
            if i.acked { "yes" } else { "no" },
            i.sender,
            i.content_type,
            i.purpose
        );
    }
    Ok(())
}

/// Fetches an inbox item into `out`: a temporary file in the same directory,
/// renamed onto `out` only when the daemon ended the stream OK (its last
/// chunk and digest checks passed) and the length matches.
pub(crate) async fn fetch_to(
    client: &Client,
    id: &MessageId,
    from: Option<&str>,
    out: &Path,
) -> Result<FetchHeader> {
    let what = format!("fetch {id}");
    let mut rpc = client.rpc.clone();
    let map = |s: tonic::Status| match client.error(&what, &s) {
        CliError::Refused { reason, .. } if reason == "not-found" => CliError::Refused {
            what: what.clone(),
            reason,
            message: format!("no inbox item {id} for this client"),
        },
        e => e,
    };
    let mut stream = rpc
        .fetch(FetchRequest {
            message_id: id.as_bytes().to_vec(),
            sender: from.unwrap_or_default().to_owned(),
        })
        .await
        .map_err(map)?
        .into_inner();
    let header = match stream.message().await.map_err(map)? {
        Some(m) => match m.part {
            Some(fetch_response::Part::Header(h)) => h,
            _ => {
                return Err(CliError::Protocol {
                    what,
                    problem: "the stream did not start with a header".into(),
                });
            }
        },
        None => {
            return Err(CliError::Protocol {
                what,
                problem: "empty stream".into(),
            });
        }
    };
    let mut tmp = files::temp_for(out)?;
    let write_err = |source| CliError::Write {
        path: out.to_owned(),
        source,
    };
    let bar = files::progress_over(header.payload_length, PROGRESS_OVER, "fetching");
    let mut got = 0u64;
    let result: Result<()> = async {
        while let Some(m) = stream.message().await.map_err(map)? {
            match m.part {
                Some(fetch_response::Part::Chunk(data)) => {
                    got += data.len() as u64;
                    if got > header.payload_length {
                        return Err(CliError::Protocol {
                            what: what.clone(),
                            problem: format!(
                                "more plaintext than the {} bytes the envelope declares",
                                header.payload_length
                            ),
                        });
                    }
                    tmp.write_all(&data).map_err(write_err)?;
                    if let Some(b) = &bar {
                        b.set_position(got);
                    }
                }
                _ => {
                    return Err(CliError::Protocol {
                        what: what.clone(),
                        problem: "a second header".into(),
                    });
                }
            }
        }
        if got != header.payload_length {
            return Err(CliError::Protocol {
                what: what.clone(),
                problem: format!(
                    "{got} bytes received, the envelope declares {}",
                    header.payload_length
                ),
            });
        }
        Ok(())
    }
    .await;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    // On error `tmp` is dropped here, which deletes it.
    result?;
    files::publish(tmp, out)?;
    Ok(header)
}

/// `exchange fetch`.
pub(crate) async fn fetch(
    conn: &ConnArgs,
    id: &str,
    from: Option<&str>,
    out: &Path,
    show_subjects: bool,
) -> Result<()> {
    let id = parse_id(id)?;
    let client = conn.connect()?;
    let h = fetch_to(&client, &id, from, out).await?;
    print_fetched(&h, out, show_subjects, "");
    Ok(())
}

/// What `fetch` prints (patient identifiers only when asked), each line after
/// `indent`.
pub(crate) fn print_fetched(h: &FetchHeader, out: &Path, show_subjects: bool, indent: &str) {
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    let out_line = |line: String| println!("{indent}{line}");
    out_line(format!(
        "fetched {} -> {} ({})",
        id_of(&h.message_id),
        out.display(),
        files::bytes(h.payload_length)
    ));
    out_line(format!(
        "  from         {} ({}), signature and certificate chain verified by the daemon",
        h.sender,
        dash(&h.sender_name)
    ));
    out_line(format!(
        "  content      {}, purpose: {}",
        h.content_type,
        dash(&h.purpose)
    ));
    out_line(format!(
        "  document     {} / {}",
        dash(&h.title),
        dash(&h.document_type)
    ));
    out_line(format!("  created      {}", ms(h.created_ms)));
    if show_subjects {
        for s in &h.subject_ids {
            out_line(format!("  subject      {} ({})", s.value, s.system));
        }
    } else {
        out_line(format!(
            "  subjects     {} identifier(s) (--show-subjects to print them)",
            h.subject_ids.len()
        ));
    }
}

/// Acknowledges an inbox item; returns the daemon's PROCESSED receipt, verified.
pub(crate) async fn ack_item(
    client: &Client,
    id: &MessageId,
    from: Option<&str>,
) -> Result<VerifiedReceipt> {
    let what = format!("ack {id}");
    let mut rpc = client.rpc.clone();
    let resp = rpc
        .ack(AckRequest {
            message_id: id.as_bytes().to_vec(),
            sender: from.unwrap_or_default().to_owned(),
        })
        .await
        .map_err(|s| match client.error(&what, &s) {
            CliError::Refused { reason, .. } if reason == "not-found" => CliError::Refused {
                what: what.clone(),
                reason,
                message: format!("no inbox item {id} for this client"),
            },
            e => e,
        })?
        .into_inner();
    let receipt = SignedReceipt::from_bytes(&resp.receipt)
        .and_then(|r| r.verify(client.trust()))
        .map_err(CliError::about(format!("the receipt for {id}")))?;
    if receipt.message_id() != *id {
        return Err(CliError::Protocol {
            what,
            problem: format!(
                "the receipt is for another message ({})",
                receipt.message_id()
            ),
        });
    }
    Ok(receipt)
}

/// `exchange ack`.
pub(crate) async fn ack(
    conn: &ConnArgs,
    id: &str,
    from: Option<&str>,
    receipt_out: Option<&Path>,
) -> Result<()> {
    let id = parse_id(id)?;
    let client = conn.connect()?;
    let r = ack_item(&client, &id, from).await?;
    if let Some(path) = receipt_out {
        files::write_atomic(path, &r.signed().to_file())?;
    }
    println!("acknowledged {id}");
    println!(
        "  receipt      {} ({}) by {} ({}) at {}",
        r.disposition(),
        r.role(),
        r.issuer(),
        r.issuer_certificate().common_name().unwrap_or("?"),
        fmt_time(r.issued())
    );
    match receipt_out {
        Some(p) => println!(
            "  saved        {} (verify offline: exchange receipt verify --trust CA.pem {})",
            p.display(),
            p.display()
        ),
        None => println!("  returned to the sender through its route"),
    }
    Ok(())
}
