//! The Python example client (examples/python/), written only from the
//! protos with the stock grpcio library, against a live pair of daemons set
//! up by `exchange demo --dir`.
//!
//! It runs under the virtual environment that .ci/run creates
//! (`target/pyenv`, from examples/python/requirements.txt). The test is
//! skipped, saying so, only when .ci/run recorded that the package registry
//! could not be reached (`target/pyenv-unavailable`); a missing environment
//! otherwise fails it, with the commands that create it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/live_net.rs"]
mod live_net;
use live_net::LiveNet;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const HOSPITAL: &str = "urn:jp:mhlw:facility:1310000021";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The environment's Python, or None when the test is to be skipped.
fn python() -> Option<PathBuf> {
    let target = repo().join("target");
    let python = target.join("pyenv").join("bin").join("python");
    if python.exists() {
        return Some(python);
    }
    let marker = target.join("pyenv-unavailable");
    if let Ok(why) = std::fs::read_to_string(&marker) {
        println!(
            "SKIPPED: the Python example client was not run: .ci/run could not install its \
             packages because the package registry was unreachable ({}): {}",
            marker.display(),
            why.trim()
        );
        return None;
    }
    panic!(
        "{} is missing. Create it (as .ci/run does):\n  python3 -m venv target/pyenv && \
         target/pyenv/bin/pip install -r examples/python/requirements.txt",
        python.display()
    );
}

fn exchange(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_exchange"))
        .current_dir(dir)
        .args(args)
        .env_remove("EXCHANGE_CLIENT_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "exchange {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run_python(python: &Path, net: &Path, extra: &[&str]) -> Output {
    let script = repo().join("examples/python/exchange_client.py");
    Command::new(python)
        .arg(script)
        .args([
            "--sender",
            "clinic/app/client.toml",
            "--recipient",
            "hospital/app/client.toml",
            "--to",
            HOSPITAL,
        ])
        .args(extra)
        .current_dir(net)
        .output()
        .unwrap()
}

#[test]
fn python_example_client_against_live_daemons() {
    let Some(python) = python() else { return };
    let d = tempfile::tempdir().unwrap();
    exchange(d.path(), &["demo", "--dir", "net", "--burst", "0"]);
    let net = d.path().join("net");
    let readme = std::fs::read_to_string(net.join("clinic/app/README.txt")).unwrap();
    assert!(readme.contains("localhost:"), "{readme}");

    let live = LiveNet::start_sites(&net, &["clinic", "hospital"]);
    let daemons = &live.daemons;
    let socket = daemons[0]
        .client_socket()
        .expect("the demo configures a client socket")
        .to_owned();
    let peer_port = daemons[0].peer_addr().port();

    let out = run_python(
        &python,
        &net,
        &["--sender-socket", &socket.display().to_string()],
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    println!("{stdout}{stderr}");
    assert!(
        out.status.success(),
        "the Python client failed:\n{stdout}\n{stderr}"
    );
    for expected in [
        "health localhost:",
        "SERVING",
        "exchange.v1.Client",
        "health socket",
        "ListInbox over the socket: answered",
        "Send 5242880 bytes",
        "provision boundary",
        "the fetched bytes are the bytes sent",
        "Ack: PROCESSED receipt",
        "state PROCESSED",
        "OK: health, reflection, send, delivered, inbox, fetch, ack, processed",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing from:\n{stdout}"
        );
    }

    // The same stock client against the peer listener, which presents the
    // party certificate (a URI, no host name): grpcio's host-name check
    // refuses it, as it refused the client listener before it had a
    // server certificate.
    let out = run_python(
        &python,
        &net,
        &["--sender-server", &format!("localhost:{peer_port}")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("FAILED: UNAVAILABLE"), "{stderr}");

    live.stop();
}
