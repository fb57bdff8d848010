//! The CLI's one error type: each variant names what failed and where.

use std::path::PathBuf;

/// Everything the `exchange` command can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum CliError {
    /// A rejection or failure from the core library.
    #[error("{0}")]
    Core(#[from] exchange_core::Error),
    /// A core error about a specific input.
    #[error("{what}: {source}")]
    About {
        /// What was being processed (a file, a recipient).
        what: String,
        /// Why it failed.
        source: exchange_core::Error,
    },
    /// Reading a file failed.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Writing a file failed.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The output exists and the command never overwrites it.
    #[error("{} already exists; refusing to overwrite it", .0.display())]
    Exists(PathBuf),
    /// A command-line value is invalid.
    #[error("{0}")]
    Usage(String),
    /// The client connection settings are incomplete or unreadable.
    #[error("client settings: {0}")]
    ClientSettings(String),
    /// The daemon could not be reached, or the TLS handshake with it failed.
    #[error("cannot talk to the daemon at {address}: {reason}")]
    Connect {
        /// `host:port` of its client listener.
        address: String,
        /// Why (refused, wrong party, untrusted certificate …).
        reason: String,
    },
    /// The daemon refused or failed a request.
    #[error("{what}: {message}")]
    Refused {
        /// The request (`send`, `fetch 0193…`).
        what: String,
        /// Its stable reason code (`not-found`, `policy-violation` …).
        reason: String,
        /// The daemon's message.
        message: String,
    },
    /// A transfer stream broke the client protocol (order, length).
    #[error("{what}: {problem}")]
    Protocol {
        /// The request.
        what: String,
        /// What was wrong.
        problem: String,
    },
    /// A daemon could not be configured or started (the demo network).
    #[error("{what}: {source}")]
    Daemon {
        /// Which daemon or file.
        what: String,
        /// Why.
        source: exchange_daemon::Error,
    },
    /// An audit export does not match the signed log it claims to be.
    #[error("{}: {problems} problem(s): the export does not match the signed audit log", file.display())]
    Tampered {
        /// The export file.
        file: PathBuf,
        /// How many problems the verifier found.
        problems: usize,
    },
    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// A bounded wait ran out.
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout {
        /// What did not happen.
        what: String,
        /// How long we waited.
        secs: u64,
    },
    /// A store administration command failed (`exchange admin`).
    #[error("{what}: {source}")]
    Admin {
        /// The operation and its input.
        what: String,
        /// Why.
        source: exchange_daemon::Error,
    },
    /// `exchange admin verify-store` found failures (listed on stdout).
    #[error("store {store}: {count} check(s) failed (listed above)")]
    StoreProblems {
        /// The store (directory, or URL without its password).
        store: String,
        /// How many failures.
        count: usize,
    },
    /// A message ended FAILED (a hop refused it or it expired).
    #[error("message {id} failed: {reason}")]
    Failed {
        /// The message id.
        id: String,
        /// The hop's or receipt's reason.
        reason: String,
    },
}

impl CliError {
    /// Attaches a description of the input to a core error.
    pub(crate) fn about(what: impl Into<String>) -> impl FnOnce(exchange_core::Error) -> Self {
        let what = what.into();
        move |source| Self::About { what, source }
    }
}

/// Result alias for the CLI.
pub(crate) type Result<T, E = CliError> = std::result::Result<T, E>;
