//! `exchange admin`: operations on a facility's store directory, beside its
//! running daemon (docs/operations.md §7): an online backup into one
//! verifiable archive, its restore into a new directory, and an integrity
//! scrub of every stored envelope, ciphertext and receipt.
//!
//! The work is `exchange_daemon::admin`'s; these commands parse the flags,
//! load trust and print what happened.

use std::path::{Path, PathBuf};

use exchange_core::trust::TrustStore;
use exchange_daemon::admin::{self, VerifyStoreReport};
use exchange_daemon::config::Config;
use exchange_daemon::store::StoreLocation;

use crate::error::{CliError, Result};
use crate::files;

/// `exchange admin …`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum AdminCommand {
    /// Back up a store while its daemon runs: one archive (mode 0600) with a
    /// consistent database snapshot, the blob files it names, pseudonym.key
    /// and a manifest of SHA-256 digests. Never overwrites FILE.
    Backup {
        /// The store directory (`data_dir` of exchanged.toml).
        #[arg(long, value_name = "DIR", required_unless_present = "store")]
        data: Option<PathBuf>,
        /// A PostgreSQL store: refused (this backup is of SQLite stores;
        /// back up a PostgreSQL store with pg_dump, and pseudonym.key with it).
        #[arg(long, value_name = "URL")]
        store: Option<String>,
        /// The archive to create.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Restore a backup archive as a new store directory: every member is
    /// checked against the manifest before anything is put in place.
    Restore {
        /// The archive written by `exchange admin backup`.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// The store directory to create (must not exist, or be empty).
        #[arg(long, value_name = "DIR", required_unless_present = "store")]
        data: Option<PathBuf>,
        /// A PostgreSQL store: refused (restore a PostgreSQL store with
        /// pg_restore).
        #[arg(long, value_name = "URL")]
        store: Option<String>,
    },
    /// Re-verify everything stored (read-only; the daemon may run): every
    /// envelope's signature and sender chain, every ciphertext's SHA-256,
    /// every receipt, provision records and blob files. Lists each failure
    /// and exits non-zero if there is any.
    VerifyStore(VerifyStoreArgs),
}

/// Where the store is and what to trust.
#[derive(Debug, clap::Args)]
pub(crate) struct VerifyStoreArgs {
    /// The facility's data directory (`data_dir` of exchanged.toml): the
    /// checkpoint it keeps, and the SQLite store unless --store is given.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "config",
        conflicts_with = "config"
    )]
    data: Option<PathBuf>,
    /// The facility's PostgreSQL store, when its daemon has `[store] url`
    /// (postgres://user@host:port/database, or key=value form): the rows
    /// are read there, read-only, in one transaction. A password in the
    /// URL is visible to other local users (in the process list):
    /// prefer peer authentication over a Unix socket (host=/run/postgresql).
    /// TLS as libpq takes it, in the URL: `sslmode=verify-full&sslrootcert=CA.pem`
    /// (and `sslcert`, `sslkey` for a client certificate); without a CA,
    /// only a database on this machine is reached in plain text.
    #[arg(long, value_name = "URL", conflicts_with = "config")]
    store: Option<String>,
    /// CA certificate (trust anchor); repeat for several.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "config",
        conflicts_with = "config"
    )]
    ca: Vec<PathBuf>,
    /// CRL; repeat for several. With none, revocation is not checked.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    crl: Vec<PathBuf>,
    /// Take the data directory, the store (`[store] url` if set), anchors
    /// and CRLs from the daemon's configuration.
    #[arg(long, value_name = "exchanged.toml")]
    config: Option<PathBuf>,
}

/// Runs an `exchange admin` command.
pub(crate) fn run(command: AdminCommand) -> Result<()> {
    match command {
        AdminCommand::Backup { data, store, out } => backup(&sqlite_only(data, store)?, &out),
        AdminCommand::Restore { from, data, store } => restore(&from, &sqlite_only(data, store)?),
        AdminCommand::VerifyStore(args) => verify_store(&args),
    }
}

fn admin_err(what: String) -> impl FnOnce(exchange_daemon::Error) -> CliError {
    move |source| CliError::Admin { what, source }
}

/// The store directory of a SQLite-only command; `--store URL` is refused.
fn sqlite_only(data: Option<PathBuf>, store: Option<String>) -> Result<PathBuf> {
    if store.is_some() {
        return Err(CliError::Usage(
            "exchange admin backup and restore handle SQLite stores only: back up a PostgreSQL \
             store with pg_dump (and restore it with pg_restore), and keep the data directory's \
             pseudonym.key with it"
                .into(),
        ));
    }
    data.ok_or_else(|| CliError::Usage("--data is required".into()))
}

fn backup(data: &Path, out: &Path) -> Result<()> {
    let s = admin::backup(data, out).map_err(admin_err(format!("backup of {}", data.display())))?;
    println!(
        "backup of {} written to {} ({})",
        data.display(),
        s.archive.display(),
        files::bytes(s.archive_bytes)
    );
    println!("  {}", s.counts);
    Ok(())
}

fn restore(from: &Path, data: &Path) -> Result<()> {
    let s =
        admin::restore(from, data).map_err(admin_err(format!("restore of {}", from.display())))?;
    println!(
        "restored {} into {}: {} members matched the manifest",
        from.display(),
        s.data_dir.display(),
        s.members
    );
    println!("  {}", s.counts);
    Ok(())
}

fn verify_store(args: &VerifyStoreArgs) -> Result<()> {
    let (dir, location, trust, note) = match &args.config {
        Some(path) => {
            let config = Config::load(path)
                .map_err(admin_err(format!("configuration {}", path.display())))?;
            let trust = admin::config_trust(&config)
                .map_err(admin_err(format!("trust of {}", path.display())))?;
            (
                config.path(&config.data_dir),
                StoreLocation::of_config(&config),
                trust,
                "",
            )
        }
        None => {
            let dir = args
                .data
                .clone()
                .ok_or_else(|| CliError::Usage("--data or --config is required".into()))?;
            let note = if args.crl.is_empty() {
                " (no --crl: revocation not checked)"
            } else {
                ""
            };
            let location = crate::store_location(Some(dir.clone()), args.store.clone())?;
            (dir, location, trust(&args.ca, &args.crl)?, note)
        }
    };
    let report = admin::verify_store(&dir, &location, &trust)
        .map_err(admin_err(format!("verify-store {location}")))?;
    print_report(&location, &report, note);
    if report.is_ok() {
        Ok(())
    } else {
        Err(CliError::StoreProblems {
            store: location.to_string(),
            count: report.failures.len(),
        })
    }
}

fn print_report(location: &StoreLocation, report: &VerifyStoreReport, note: &str) {
    for f in &report.failures {
        println!("FAILED {f}");
    }
    for name in &report.orphan_blobs {
        println!(
            "note: blob file {name} is named by no message (an orphan; the daemon deletes it at its next start)"
        );
    }
    let verdict = if report.is_ok() {
        "all verified"
    } else {
        "FAILURES"
    };
    println!("store {location}: {verdict}: {report}{note}");
}

/// Anchors from every `--ca`, CRLs from every `--crl` (then required for
/// every certificate).
fn trust(cas: &[PathBuf], crls: &[PathBuf]) -> Result<TrustStore> {
    let mut b = TrustStore::builder();
    for ca in cas {
        b = b
            .anchors_pem(&files::read(ca)?)
            .map_err(CliError::about(ca.display().to_string()))?;
    }
    for crl in crls {
        b = b
            .crls_pem(&files::read(crl)?)
            .map_err(CliError::about(crl.display().to_string()))?;
    }
    if !crls.is_empty() {
        b = b.require_crls();
    }
    Ok(b.build()?)
}
