//! `exchange`: CA and certificate tools, offline seal/open/inspect of
//! envelopes, receipt verification, the client of a facility's daemon
//! (send, status, inbox, fetch, ack), and a live demo network.
//!
//! Every failure prints one line, `error: <reason>`, and exits with status 1;
//! nothing is written to an output unless the whole operation succeeded.

#![forbid(unsafe_code)]

// Output macros for the whole crate (they shadow std's, textually, in every
// module declared below): a closed pipe ends the command quietly (see `out`).
/// Prints to standard output; a closed pipe ends the command quietly.
macro_rules! print {
    ($($arg:tt)*) => { $crate::out::write(format_args!($($arg)*)) };
}
/// Prints a line to standard output; a closed pipe ends the command quietly.
macro_rules! println {
    () => { $crate::out::write_line(format_args!("")) };
    ($($arg:tt)*) => { $crate::out::write_line(format_args!($($arg)*)) };
}
/// Prints a line to standard error; never panics.
macro_rules! eprintln {
    () => { $crate::out::write_err_line(format_args!("")) };
    ($($arg:tt)*) => { $crate::out::write_err_line(format_args!($($arg)*)) };
}

mod admin_cmd;
mod audit_cmd;
mod ca;
mod client_cmd;
mod demo;
mod envelope_cmd;
mod error;
mod files;
mod out;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Parser, Subcommand};

use crate::client_cmd::{ConnArgs, SendArgs};
use crate::envelope_cmd::SealArgs;
use exchange_daemon::store::StoreLocation;

use crate::error::{CliError, Result};

#[derive(Parser)]
#[command(
    name = "exchange",
    version,
    about = "Secure exchange of medical records between facilities"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Network CA: create, issue party credentials, revoke, refresh the CRL.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Certificate checks.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// Encrypt and sign a file for one or more recipients.
    Seal(SealArgs),
    /// Verify and decrypt an envelope; optionally sign a DELIVERED receipt.
    Open {
        /// Recipient credentials directory (encryption*.pem and keys; identity for --receipt).
        #[arg(long = "as")]
        as_dir: PathBuf,
        /// CA certificate (trust anchor).
        #[arg(long)]
        trust: PathBuf,
        /// CRL to check the sender against.
        #[arg(long)]
        crl: Option<PathBuf>,
        /// Envelope input.
        #[arg(long = "in")]
        input: PathBuf,
        /// Plaintext output (written only if everything verifies).
        #[arg(long = "out")]
        output: PathBuf,
        /// Where to write the signed DELIVERED receipt (.exrcpt).
        #[arg(long)]
        receipt: Option<PathBuf>,
        /// Print the patient / subject identifiers.
        #[arg(long)]
        show_subjects: bool,
    },
    /// Show an envelope's public head; verify it with --trust.
    Inspect {
        /// CA certificate: verify signature, sender chain and ciphertext digest.
        #[arg(long)]
        trust: Option<PathBuf>,
        /// CRL (with --trust).
        #[arg(long, requires = "trust")]
        crl: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The envelope.
        file: PathBuf,
    },
    /// Delivery receipts.
    Receipt {
        #[command(subcommand)]
        command: ReceiptCommand,
    },
    /// Send a file through this facility's daemon: it seals, signs and delivers it.
    Send(SendArgs),
    /// A sent message's state, hops, receipts and provision records.
    Status {
        #[command(flatten)]
        conn: ConnArgs,
        /// The message id.
        id: String,
        /// Follow it until it is PROCESSED or FAILED.
        #[arg(long)]
        watch: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Messages delivered to this facility that this application may read.
    Inbox {
        #[command(flatten)]
        conn: ConnArgs,
        /// Include acknowledged items.
        #[arg(long)]
        all: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Fetch one inbox item (verified and decrypted by the daemon) into a file.
    Fetch {
        #[command(flatten)]
        conn: ConnArgs,
        /// The message id.
        id: String,
        /// The sender's party URI (as `exchange inbox` lists it): needed when
        /// several senders' items carry the same message id.
        #[arg(long = "from", value_name = "URI")]
        from: Option<String>,
        /// Output (written only if the whole item arrived and verified).
        #[arg(long = "out")]
        output: PathBuf,
        /// Print the patient / subject identifiers.
        #[arg(long)]
        show_subjects: bool,
    },
    /// Acknowledge an inbox item: the daemon signs a PROCESSED receipt for the sender.
    Ack {
        #[command(flatten)]
        conn: ConnArgs,
        /// The message id.
        id: String,
        /// The sender's party URI: needed when several senders' items carry
        /// the same message id.
        #[arg(long = "from", value_name = "URI")]
        from: Option<String>,
        /// Also save the PROCESSED receipt here (.exrcpt).
        #[arg(long)]
        receipt: Option<PathBuf>,
    },
    /// The tamper-evident audit log: export it with proofs, verify an export offline.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Disclosure report: every provision (第三者提供記録) and receipt
    /// (確認記録) about one patient in a facility's store, with the signed
    /// receipts as evidence.
    Provisions {
        /// The facility's data directory (`data_dir` of exchanged.toml): the
        /// pseudonym key, and the SQLite store unless --store is given.
        #[arg(long)]
        data: PathBuf,
        /// The facility's PostgreSQL store, when its daemon has `[store] url`
        /// (postgres://user@host:port/database, or key=value form): the rows
        /// are read there, read-only, in one transaction. A password in the
        /// URL is visible to other local users (in the process list):
        /// prefer peer authentication over a Unix socket (host=/run/postgresql).
        /// TLS as libpq takes it, in the URL: `sslmode=verify-full&sslrootcert=CA.pem`
        /// (and `sslcert`, `sslkey` for a client certificate); without a CA,
        /// only a database on this machine is reached in plain text.
        #[arg(long, value_name = "URL")]
        store: Option<String>,
        /// The patient identifier, [SYSTEM|]VALUE as given to `exchange send --subject`.
        #[arg(long)]
        subject: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = audit_cmd::ReportFormat::Text)]
        format: audit_cmd::ReportFormat,
        /// Also write each receipt as a .exrcpt file (for `exchange receipt verify`) into this new directory.
        #[arg(long)]
        receipts: Option<PathBuf>,
    },
    /// Store administration beside a running daemon: backup, restore, integrity scrub.
    Admin {
        #[command(subcommand)]
        command: admin_cmd::AdminCommand,
    },
    /// Run a live network on loopback: a CA, a clinic, a hospital, a claims
    /// agent and a payer, each with its own daemon and store; send a referral
    /// and a claim, show every receipt and the provision boundary.
    Demo {
        /// Keep the network (CA, certificates, configs, stores) in this new directory.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Messages in the throughput burst (0: skip it).
        #[arg(long, default_value_t = 200)]
        burst: usize,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a CA: DIR/ca.pem, DIR/ca.key.pem, DIR/crl.pem. With --issuer,
    /// a subordinate (intermediate, path length 0) CA signed by the CA in
    /// that directory, and DIR/chain.pem, which every certificate it issues
    /// carries after its leaf.
    Init {
        /// Directory for the CA files.
        #[arg(long)]
        dir: PathBuf,
        /// CA name.
        #[arg(long)]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// The directory of the (root) CA that signs this one as its subordinate.
        #[arg(long, value_name = "CA_DIR")]
        issuer: Option<PathBuf>,
    },
    /// Issue identity and encryption credentials for a party.
    Issue {
        /// CA directory.
        #[arg(long)]
        ca: PathBuf,
        /// Party URI, e.g. urn:jp:mhlw:facility:1310000013.
        #[arg(long)]
        party: String,
        /// Display name.
        #[arg(long)]
        name: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 730)]
        days: u32,
    },
    /// Revoke a certificate (adds it to CA_DIR/crl.pem).
    Revoke {
        /// CA directory.
        #[arg(long)]
        ca: PathBuf,
        /// The certificate to revoke.
        #[arg(long)]
        cert: PathBuf,
    },
    /// Issue a local application's client certificate (client.pem, client.key.pem).
    IssueClient {
        /// CA directory.
        #[arg(long)]
        ca: PathBuf,
        /// Client URI, e.g. urn:local:clinic:emr (listed as a `[[client]]` in the daemon's config).
        #[arg(long)]
        client: String,
        /// Display name.
        #[arg(long, default_value = "local application")]
        name: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Issue a TLS server certificate for a daemon's client listener
    /// (server.pem, server.key.pem), valid for host names and addresses that
    /// stock gRPC clients check. It cannot sign or serve as an identity.
    IssueServer {
        /// CA directory.
        #[arg(long)]
        ca: PathBuf,
        /// Also name the facility's party URI (the `exchange` CLI then keeps
        /// pinning `server_party`; stock gRPC clients ignore it).
        #[arg(long, value_name = "URI")]
        party: Option<String>,
        /// A DNS name the applications dial (repeatable), e.g. localhost.
        #[arg(long, value_name = "NAME")]
        dns: Vec<String>,
        /// An IP address the applications dial (repeatable), e.g. 127.0.0.1.
        #[arg(long, value_name = "ADDR")]
        ip: Vec<std::net::IpAddr>,
        /// Display name (the certificate's CN).
        #[arg(long, default_value = "exchanged client listener")]
        name: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Re-issue the CRL with a fresh nextUpdate.
    Crl {
        /// CA directory.
        #[arg(long)]
        ca: PathBuf,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Validate a certificate; print its party URI.
    Verify {
        /// CA certificate (trust anchor).
        #[arg(long)]
        trust: PathBuf,
        /// CRL.
        #[arg(long)]
        crl: Option<PathBuf>,
        /// Validation time (RFC 3339); default now.
        #[arg(long)]
        at: Option<String>,
        /// The certificate (PEM; chain after the leaf allowed).
        cert: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Export the audit log (JSON lines: entries with inclusion proofs, the
    /// latest signed checkpoint); works while the daemon runs.
    Export {
        /// The facility's data directory (`data_dir` of exchanged.toml),
        /// which holds its SQLite store.
        #[arg(long, value_name = "DIR", required_unless_present = "store")]
        data: Option<PathBuf>,
        /// The facility's PostgreSQL store, when its daemon has `[store] url`
        /// (postgres://user@host:port/database, or key=value form): the rows
        /// are read there, read-only, in one transaction. A password in the
        /// URL is visible to other local users (in the process list):
        /// prefer peer authentication over a Unix socket (host=/run/postgresql).
        /// TLS as libpq takes it, in the URL: `sslmode=verify-full&sslrootcert=CA.pem`
        /// (and `sslcert`, `sslkey` for a client certificate); without a CA,
        /// only a database on this machine is reached in plain text.
        #[arg(long, value_name = "URL", conflicts_with = "data")]
        store: Option<String>,
        /// Only entries at or after this time (RFC 3339).
        #[arg(long)]
        from: Option<String>,
        /// Only entries before this time (RFC 3339).
        #[arg(long)]
        to: Option<String>,
        /// An earlier export kept elsewhere: include its checkpoint with a
        /// consistency proof (fails if the log was rewritten since). Repeatable.
        #[arg(long = "witness", value_name = "EARLIER_EXPORT")]
        witnesses: Vec<PathBuf>,
        /// Write here (a new file) instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Verify an export offline: signature, inclusion of every entry,
    /// completeness; reports modified, deleted, inserted, reordered and
    /// truncated entries.
    Verify {
        /// The log owner's identity certificate (PEM), obtained independently.
        #[arg(long)]
        cert: PathBuf,
        /// An earlier export kept elsewhere: require that this export proves
        /// the log only grew since its checkpoint. Repeatable.
        #[arg(long = "witness", value_name = "EARLIER_EXPORT")]
        witnesses: Vec<PathBuf>,
        /// The export file.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum ReceiptCommand {
    /// Verify a receipt offline; with --envelope, check it belongs to it and
    /// say whether it marks the provision boundary.
    Verify {
        /// CA certificate (trust anchor).
        #[arg(long)]
        trust: PathBuf,
        /// CRL.
        #[arg(long)]
        crl: Option<PathBuf>,
        /// The envelope the receipt is for.
        #[arg(long)]
        envelope: Option<PathBuf>,
        /// The receipt: a .exrcpt file, or the bare signed receipt (the bytes
        /// of Receipt.signed or AckResponse.receipt from the daemon's API).
        file: PathBuf,
    },
}

fn run(cli: Cli) -> Result<()> {
    let now = SystemTime::now();
    match cli.command {
        Command::Ca { command } => match command {
            CaCommand::Init {
                dir,
                name,
                days,
                issuer,
            } => ca::init(&dir, &name, days, issuer.as_deref(), now),
            CaCommand::Issue {
                ca,
                party,
                name,
                out,
                days,
            } => ca::issue(&ca, &party, &name, &out, days, now).map(drop),
            CaCommand::IssueClient {
                ca,
                client,
                name,
                out,
                days,
            } => ca::issue_client(&ca, &client, &name, &out, days, now).map(drop),
            CaCommand::IssueServer {
                ca,
                party,
                dns,
                ip,
                name,
                out,
                days,
            } => {
                ca::issue_server(&ca, party.as_deref(), &dns, &ip, &name, &out, days, now).map(drop)
            }
            CaCommand::Revoke { ca, cert } => ca::revoke(&ca, &cert, now),
            CaCommand::Crl { ca } => ca::refresh_crl(&ca, now),
        },
        Command::Cert {
            command:
                CertCommand::Verify {
                    trust,
                    crl,
                    at,
                    cert,
                },
        } => {
            let at = at
                .as_deref()
                .map(files::parse_time)
                .transpose()?
                .unwrap_or(now);
            ca::verify(&trust, crl.as_deref(), at, &cert)
        }
        Command::Seal(args) => envelope_cmd::seal(&args, now).map(drop),
        Command::Open {
            as_dir,
            trust,
            crl,
            input,
            output,
            receipt,
            show_subjects,
        } => envelope_cmd::open(
            &as_dir,
            &trust,
            crl.as_deref(),
            &input,
            &output,
            receipt.as_deref(),
            show_subjects,
            now,
        )
        .map(drop),
        Command::Inspect {
            trust,
            crl,
            json,
            file,
        } => envelope_cmd::inspect(
            &file,
            trust.as_deref().map(|t| (t, crl.as_deref())),
            json,
            now,
        )
        .map(drop),
        Command::Receipt {
            command:
                ReceiptCommand::Verify {
                    trust,
                    crl,
                    envelope,
                    file,
                },
        } => envelope_cmd::verify_receipt(&trust, crl.as_deref(), envelope.as_deref(), &file, now)
            .map(drop),
        Command::Send(args) => block_on(client_cmd::send(&args)),
        Command::Status {
            conn,
            id,
            watch,
            json,
        } => block_on(client_cmd::status(&conn, &id, watch, json)),
        Command::Inbox { conn, all, json } => block_on(client_cmd::inbox(&conn, all, json)),
        Command::Fetch {
            conn,
            id,
            from,
            output,
            show_subjects,
        } => block_on(client_cmd::fetch(
            &conn,
            &id,
            from.as_deref(),
            &output,
            show_subjects,
        )),
        Command::Ack {
            conn,
            id,
            from,
            receipt,
        } => block_on(client_cmd::ack(
            &conn,
            &id,
            from.as_deref(),
            receipt.as_deref(),
        )),
        Command::Audit { command } => match command {
            AuditCommand::Export {
                data,
                store,
                from,
                to,
                witnesses,
                out,
            } => audit_cmd::export(
                &store_location(data, store)?,
                from.as_deref(),
                to.as_deref(),
                &witnesses,
                out.as_deref(),
            ),
            AuditCommand::Verify {
                cert,
                witnesses,
                file,
            } => audit_cmd::verify(&cert, &file, &witnesses),
        },
        Command::Provisions {
            data,
            store,
            subject,
            format,
            receipts,
        } => {
            let location = store_location(Some(data.clone()), store)?;
            audit_cmd::provisions(&data, &location, &subject, format, receipts.as_deref())
        }
        Command::Admin { command } => admin_cmd::run(command),
        Command::Demo { dir, burst } => block_on(demo::run(dir.as_deref(), burst)),
    }
}

/// Runs a client command or the demo on a multi-threaded runtime.
fn block_on(f: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(error::CliError::Runtime)?;
    runtime.block_on(f)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match out::catching_closed_pipe(|| run(cli)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
        // The reader of standard output went away: end quietly, as cat does.
        Err(status) => ExitCode::from(status),
    }
}

/// Where an offline command reads the store: `--store URL` (PostgreSQL) if
/// given, else the SQLite store in `--data DIR`.
pub(crate) fn store_location(
    data: Option<PathBuf>,
    store: Option<String>,
) -> Result<StoreLocation> {
    match (store, data) {
        (Some(url), _) => Ok(StoreLocation::Url(url)),
        (None, Some(dir)) => Ok(StoreLocation::Dir(dir)),
        (None, None) => Err(CliError::Usage("--data or --store is required".into())),
    }
}
