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
