//! `exchange send` retries by itself when the answer to a Send is lost, with
//! the same idempotency key, and the recipient gets the message once.
//!
//! The daemon's `client::send-reply` crash point (the daemon's test-only
//! `failpoints` feature, which this crate's dev-dependency turns on) holds
//! the first answer back after the envelope is committed; meanwhile a
//! loopback TCP proxy between the CLI and the daemon cuts that connection,
//! as a VPN link that drops would. The CLI then sees a broken call, waits
//! and sends again through a new connection. Its own process is a real
//! `exchange` binary; the daemons are real, in this process (the crash
//! point is configured here, so this test has its own binary).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use exchange_daemon::{Config, Daemon};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

const HOSPITAL: &str = "urn:jp:mhlw:facility:1310000021";

/// Forwards every connection to `to`; the abort handles of each
/// connection's copy task are kept, in order, so the test can cut one.
async fn proxy(to: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<AbortHandle>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
    let kept = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let task = tokio::spawn(async move {
                let mut outbound = TcpStream::connect(to).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
            kept.lock().unwrap().push(task.abort_handle());
        }
    });
    (addr, conns)
}

fn exchange(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_exchange"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

#[test]
fn a_send_whose_answer_is_lost_is_retried_by_the_cli_and_stored_once() {
    let d = tempfile::tempdir().unwrap();
    let out = exchange(d.path(), &["demo", "--dir", "net", "--burst", "0"]);
    assert!(out.status.success(), "{out:?}");
    let net = d.path().join("net");
    let payload = b"a lab result for one patient\n".repeat(100);
    std::fs::write(net.join("result.txt"), &payload).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (clinic, hospital) = rt.block_on(async {
        let start = |site: &str| {
            let config = Config::load(&net.join(site).join("exchanged.toml")).unwrap();
            Daemon::start(config)
        };
        (
            start("clinic").await.unwrap(),
            start("hospital").await.unwrap(),
        )
    });
    let inbox_len =
        |d: &Daemon| rt.block_on(async { d.node().store().inbox(true).await.unwrap().len() });
    let before = inbox_len(&hospital);

    // The application's settings, pointed at the proxy (the certificate
    // still names localhost, so the host-name check is unchanged).
    let (proxy_addr, conns) = rt.block_on(proxy(clinic.client_addr()));
    let settings = std::fs::read_to_string(net.join("clinic/app/client.toml")).unwrap();
    let settings = settings
        .lines()
        .map(|l| {
            if l.starts_with("server =") {
                format!("server = \"localhost:{}\"", proxy_addr.port())
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(net.join("clinic/app/via-proxy.toml"), settings).unwrap();

    // The first answer is held back for 8 s after the commit; later ones
    // are not.
    fail::cfg("client::send-reply", "1*sleep(8000)").unwrap();
    let cli = Command::new(env!("CARGO_BIN_EXE_exchange"))
        .args([
            "send",
            "--to",
            HOSPITAL,
            "--content-type",
            "text/plain",
            "--purpose",
            "treatment",
            "--in",
            "result.txt",
            "--client-config",
            "clinic/app/via-proxy.toml",
        ])
        .current_dir(&net)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Committed: the clinic has a delivery pending, or the hospital already
    // has the message. Then the connection that carries the answer is cut.
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let pending = rt.block_on(async { clinic.node().store().pending_count().await.unwrap() });
        if pending > 0 || inbox_len(&hospital) > before {
            break;
        }
        assert!(Instant::now() < deadline, "the Send was never committed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let cut = conns.lock().unwrap().len();
    assert_eq!(cut, 1, "one connection so far");
    conns.lock().unwrap()[0].abort();
    let cut_at = Instant::now();

    let out = cli.wait_with_output().unwrap();
    eprintln!("the CLI ended {:?} after the cut", cut_at.elapsed());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stderr.contains("trying again with idempotency key"),
        "the CLI retried by itself: {stderr}"
    );
    assert!(
        conns.lock().unwrap().len() >= 2,
        "the retry came on a new connection"
    );
    let id = stdout.lines().next().unwrap().trim().to_owned();
    assert_eq!(id.len(), 36, "{stdout}");

    // Every delivery done, then exactly one new inbox item: the one whose
    // id the CLI printed, with the bytes sent.
    let deadline = Instant::now() + Duration::from_secs(30);
    while rt.block_on(async { clinic.node().store().pending_count().await.unwrap() }) > 0 {
        assert!(Instant::now() < deadline, "deliveries still pending");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        inbox_len(&hospital),
        before + 1,
        "stored and delivered once"
    );
    let fetched = exchange(
        &net,
        &[
            "fetch",
            &id,
            "--out",
            "fetched.txt",
            "--client-config",
            "hospital/app/client.toml",
        ],
    );
    assert!(fetched.status.success(), "{fetched:?}");
    assert_eq!(std::fs::read(net.join("fetched.txt")).unwrap(), payload);

    fail::remove("client::send-reply");
    rt.block_on(async {
        clinic.shutdown().await;
        hospital.shutdown().await;
    });
}
