//! A sending daemon killed with SIGKILL in the middle of a batch of sends
//! (DESIGN.md §6: "a killed daemon resumes where it stopped"; §7: "loses
//! nothing already accepted"). The clinic runs as a real `exchanged`
//! process; the hospital in-process; real mutual TLS on loopback and real
//! SQLite stores on both sides.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use exchange_core::MessageId;
use exchange_daemon::proto::ListInboxRequest;
use exchange_daemon::store::Store;
use exchange_daemon::store::sqlite::SqliteStore;
use tokio::time::{Instant, sleep, timeout};

/// An `exchanged` process; killed on drop. If the test panics, its stderr
/// (kept in a file next to its configuration) is printed.
struct Exchanged {
    child: Child,
    log: PathBuf,
}

impl Exchanged {
    fn spawn(party: &Party, log_name: &str) -> Self {
        let log = party.dir.join(log_name);
        let child = Command::new(env!("CARGO_BIN_EXE_exchanged"))
            .arg("--config")
            .arg(party.config_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { child, log }
    }

    /// SIGKILL (what `Child::kill` sends on unix), then reap.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the client service answers (a real mTLS call).
    async fn wait_ready(&mut self, net: &Net, party: &Party, client: &LocalClient) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("exchanged exited ({status}):\n{}", self.stderr());
            }
            // A fresh channel each time: no reconnect state carried over.
            let mut c = client_of(net, party, client);
            if c.list_inbox(ListInboxRequest::default()).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "exchanged never served:\n{}",
                self.stderr()
            );
            sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Exchanged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- exchanged stderr ({}) ---\n{}",
                self.log.display(),
                self.stderr()
            );
        }
    }
}

const TASKS: usize = 6;
const PER_TASK: usize = 10;
const KILL_AFTER: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_loses_nothing_accepted_and_duplicates_nothing() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:local:clinic:emr");
    net.configure(&clinic, &[&hospital], &[&emr], "");
    net.configure(&hospital, &[&clinic], &[], "");
    let h = start(&hospital).await;

    let mut first = Exchanged::spawn(&clinic, "exchanged-1.log");
    first.wait_ready(&net, &clinic, &emr).await;

    // Several tasks send concurrently; each stops at its first failure.
    let accepted = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    let (count_tx, mut count_rx) = tokio::sync::watch::channel(0usize);
    let count_tx = Arc::new(count_tx);
    let app = client_of(&net, &clinic, &emr);
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let mut app = app.clone();
        let accepted = accepted.clone();
        let count_tx = count_tx.clone();
        let start_msg = referral_start(&[&hospital], &[], "treatment");
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_TASK {
                let payload = format!("lab result {t}-{i} ").repeat(200);
                match send(&mut app, start_msg.clone(), payload.as_bytes()).await {
                    Ok(id) => {
                        accepted.lock().unwrap().push(id);
                        count_tx.send_modify(|n| *n += 1);
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    timeout(
        Duration::from_secs(30),
        count_rx.wait_for(|n| *n >= KILL_AFTER),
    )
    .await
    .expect("the first sends were never accepted")
    .unwrap();
    first.kill();
    for t in tasks {
        timeout(Duration::from_secs(20), t)
            .await
            .expect("a send hung after the kill")
            .unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    assert!(accepted.len() >= KILL_AFTER);
    assert!(
        accepted.len() < TASKS * PER_TASK,
        "every send finished before the kill: nothing was in flight"
    );

    // Restart with the same configuration and store.
    let mut second = Exchanged::spawn(&clinic, "exchanged-2.log");
    second.wait_ready(&net, &clinic, &emr).await;

    // Every accepted message reaches the hospital.
    let deadline = Instant::now() + Duration::from_secs(60);
    let inbox = loop {
        let inbox = h.node().store().inbox(true).await.unwrap();
        let ids: Vec<Vec<u8>> = inbox.iter().map(|r| r.id.as_bytes().to_vec()).collect();
        if accepted.iter().all(|a| ids.contains(a)) {
            break ids;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} accepted messages reached the hospital",
            accepted.iter().filter(|a| ids.contains(a)).count(),
            accepted.len()
        );
        sleep(Duration::from_millis(100)).await;
    };
    let mut seen: HashMap<&[u8], usize> = HashMap::new();
    for id in &inbox {
        *seen.entry(id.as_slice()).or_default() += 1;
    }
    assert!(
        seen.values().all(|&n| n == 1),
        "duplicate inbox entries: {seen:?}"
    );
    for id in &accepted {
        assert_eq!(seen.get(id.as_slice()), Some(&1));
    }
    // Sends that were committed but killed before answering may also
    // arrive (once each, checked above); nothing else can.
    assert!(inbox.len() <= TASKS * PER_TASK);

    // The sender sees each accepted message DELIVERED, with exactly one
    // DELIVERED receipt (a redelivery after the crash returns the original
    // receipt, which is kept once).
    let mut app = client_of(&net, &clinic, &emr);
    for id in &accepted {
        let status = wait_status(&mut app, id, |s| s.state == "DELIVERED").await;
        let delivered: Vec<_> = status
            .receipts
            .iter()
            .filter(|r| r.disposition == "DELIVERED")
            .collect();
        assert_eq!(delivered.len(), 1, "{status:#?}");
        assert_eq!(delivered[0].issuer, HOSPITAL);
        assert_eq!(status.receipts.len(), 1, "{status:#?}");
        assert_eq!(status.hops.len(), 1);
        assert_eq!(status.hops[0].state, "DELIVERED");
    }

    // Nothing left to do: wait for the last (unaccepted but committed)
    // deliveries, then stop the daemon and read its store.
    let deadline = Instant::now() + Duration::from_secs(30);
    while store_counts(&clinic).pending_deliveries > 0 {
        assert!(
            Instant::now() < deadline,
            "deliveries still pending: {:?}",
            store_counts(&clinic)
        );
        sleep(Duration::from_millis(100)).await;
    }
    second.kill();
    let store = SqliteStore::open(&clinic.data_dir()).unwrap();
    assert_eq!(store.pending_count().await.unwrap(), 0);
    for id in &accepted {
        let id = MessageId::from_slice(id).unwrap();
        let sent = store.find(clinic.party(), id).await.unwrap().unwrap();
        let receipts = store.receipts(sent.key).await.unwrap();
        assert_eq!(receipts.len(), 1);
        assert_eq!(receipts[0].disposition, "DELIVERED");
    }
    // Every message the clinic stored (accepted or not) is in the
    // hospital's inbox, once.
    let counts = store_counts(&clinic);
    let final_inbox = h.node().store().inbox(true).await.unwrap();
    assert_eq!(counts.messages, final_inbox.len() as u64, "{counts:?}");
    assert_eq!(h.node().store().pending_count().await.unwrap(), 0);
    // Shown with --nocapture: how much the kill interrupted.
    eprintln!(
        "accepted before the kill: {}; stored by the clinic: {}",
        accepted.len(),
        counts.messages
    );
    drop(store);
    h.shutdown().await;
}
