//! `exchanged --config FILE.toml`: one facility's exchange daemon.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use exchange_daemon::{Config, Daemon};

const USAGE: &str = "usage: exchanged --config FILE.toml";

fn args() -> Result<PathBuf, String> {
    let mut args = std::env::args_os().skip(1);
    match (args.next(), args.next(), args.next()) {
        (Some(flag), Some(path), None) if flag == "--config" => Ok(PathBuf::from(path)),
        (Some(flag), None, None) if flag == "--help" || flag == "-h" => Err(String::new()),
        (Some(flag), None, None) if flag == "--version" || flag == "-V" => {
            Err(format!("exchanged {}", env!("CARGO_PKG_VERSION")))
        }
        _ => Err(USAGE.to_owned()),
    }
}

fn init_logging(level: &str) {
    let level = level
        .parse::<tracing::Level>()
        .unwrap_or(tracing::Level::INFO);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
}

async fn run(config: Config) -> Result<(), exchange_daemon::Error> {
    let daemon = Daemon::start(config).await?;
    let failed = wait_for_signal(&daemon).await;
    daemon.shutdown().await;
    // A daemon that can no longer work exits non-zero: its supervisor
    // restarts it.
    failed.map_or(Ok(()), Err)
}

/// Waits for SIGINT or SIGTERM (`None`) or for the daemon to fail for good
/// (`Some`); SIGHUP re-reads trust anchors and CRLs.
#[cfg(unix)]
async fn wait_for_signal(daemon: &Daemon) -> Option<exchange_daemon::Error> {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        return tokio::select! {
            _ = tokio::signal::ctrl_c() => None,
            e = daemon.failed() => Some(e),
        };
    };
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return None,
            _ = term.recv() => return None,
            e = daemon.failed() => return Some(e),
            _ = hup.recv() => match daemon.reload_trust() {
                Ok(()) => tracing::info!("SIGHUP: trust anchors and CRLs reloaded"),
                Err(e) => tracing::error!(error = %e, "SIGHUP: cannot reload trust; the previous ones stay in force"),
            },
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal(daemon: &Daemon) -> Option<exchange_daemon::Error> {
    tokio::select! {
        _ = tokio::signal::ctrl_c() => None,
        e = daemon.failed() => Some(e),
    }
}

fn main() -> ExitCode {
    let path = match args() {
        Ok(p) => p,
        Err(msg) if msg.is_empty() => {
            println!("{USAGE}\n\nSee docs/operations.md for the configuration reference.");
            return ExitCode::SUCCESS;
        }
        Err(msg) if msg.starts_with("exchanged ") => {
            println!("{msg}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(&config.log);
    // Crash points for the crash tests: only in a build with the test-only
    // `failpoints` feature (see exchange-daemon/src/failpoints.rs).
    #[cfg(feature = "failpoints")]
    let _crash_points = fail::FailScenario::setup();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(reason = e.reason_code(), "{e}");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
