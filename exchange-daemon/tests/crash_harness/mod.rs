//! The crash harness shared by `tests/crash.rs` (a short run in CI) and
//! `benches/crash.rs` (the long run): three real `exchanged` processes (a
//! clinic that sends, an ENTRUSTED relay agent, a hospital that receives),
//! real mutual TLS on loopback, real SQLite stores, and an application that
//! keeps sending and retries every Send under its idempotency key until it
//! gets an id. Cycle after cycle, at moments drawn from a seeded RNG, one
//! process in turn is ended: by SIGKILL, or at a crash point (see
//! `src/failpoints.rs`) where it aborts, with or without losing what it had
//! not fsynced; then it is started again. At the end every message must be
//! in the hospital's inbox exactly once with the bytes that were sent, every
//! receipt at the origin, no blob file without a row, no spool file left,
//! nothing pending.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs
)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{Instant, sleep};

use crate::common::*;
use exchange_daemon::proto::client_client::ClientClient;
use exchange_daemon::proto::{FetchRequest, ListInboxRequest, StatusRequest, fetch_response};
use tonic::transport::Channel;

/// Ciphertexts above this many bytes go to blob files (set in every
/// daemon's `[limits]`; the payloads straddle it).
pub const INLINE_LIMIT: usize = 32 * 1024;

/// A small, seedable RNG (SplitMix64): the same seed replays the same
/// choices of moments, victims, crash points and payloads.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo).max(1)
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[usize::try_from(self.range(0, items.len() as u64)).unwrap()]
    }
}

/// A seed from the environment (`CRASH_SEED`, to replay a run) or the clock.
pub fn seed_from_env() -> u64 {
    match std::env::var("CRASH_SEED") {
        Ok(s) => s.trim().parse().expect("CRASH_SEED: a decimal u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    }
}

/// The payload of message `i` of sender task `task`: a readable header
/// naming it (so that any inbox item can be traced to its Send), then
/// bytes from the seed. Below or above [`INLINE_LIMIT`] depending on `i`'s draw.
pub fn payload(seed: u64, task: usize, i: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed ^ ((task as u64) << 48) ^ (i as u64).wrapping_mul(0x51_7cc1));
    let limit = INLINE_LIMIT as u64;
    let len = if rng.next_u64().is_multiple_of(2) {
        rng.range(100, limit - 1024)
    } else {
        rng.range(limit + 1024, 4 * limit)
    };
    let mut data = format!("crash-payload {task} {i}\n").into_bytes();
    while (data.len() as u64) < len {
        data.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    data.truncate(usize::try_from(len).unwrap());
    data
}

/// The (task, i) a payload names in its first line.
fn payload_key(data: &[u8]) -> Option<(usize, usize)> {
    let line = data.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.strip_prefix("crash-payload ")?.split(' ');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// One `exchanged` process of a party, started again after each crash.
pub struct Exchanged {
    pub party: Party,
    client: LocalClient,
    child: Option<Child>,
    starts: usize,
}

/// How the last process ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// It aborted at the crash point (the line it wrote is in its log).
    CrashPoint,
    /// Still running when waited for: SIGKILLed.
    Killed,
}

impl Exchanged {
    pub fn new(party: Party, client: LocalClient) -> Self {
        Self {
            party,
            client,
            child: None,
            starts: 0,
        }
    }

    fn log_path(&self, n: usize) -> std::path::PathBuf {
        self.party.dir.join(format!("exchanged-{n}.log"))
    }

    /// Starts the process; `failpoints` goes to its FAILPOINTS variable.
    pub fn spawn(&mut self, failpoints: Option<&str>) {
        assert!(self.child.is_none());
        self.starts += 1;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_exchanged"));
        cmd.arg("--config")
            .arg(self.party.config_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(self.log_path(self.starts)).unwrap())
            .env_remove("FAILPOINTS");
        if let Some(f) = failpoints {
            cmd.env("FAILPOINTS", f);
        }
        self.child = Some(cmd.spawn().unwrap());
    }

    /// SIGKILL (what `Child::kill` sends on unix), then reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            child.wait().unwrap();
        }
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process was started and not yet ended.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGTERM (a graceful stop: the daemon signs a last checkpoint), then
    /// waits for the exit; `true` if it exited with status 0 in time.
    pub async fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .is_ok_and(|s| s.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        while sent && Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        child.wait().unwrap();
        false
    }

    /// Waits up to `limit` for the process to exit on its own: its exit
    /// status, or `None` (then it is killed).
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.as_mut()?.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                self.kill();
                return None;
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.log_path(self.starts)).unwrap_or_default()
    }

    /// Waits up to `limit` for the process to end at its crash point; if it
    /// is still running then, kills it.
    pub async fn wait_crash(&mut self, limit: Duration) -> Ended {
        let deadline = Instant::now() + limit;
        loop {
            let child = self.child.as_mut().unwrap();
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                let log = self.stderr();
                assert!(
                    log.contains("crash point "),
                    "{} exited ({status}) without reaching its crash point:\n{log}",
                    self.party.name
                );
                return Ended::CrashPoint;
            }
            if Instant::now() > deadline {
                self.kill();
                return Ended::Killed;
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the client service answers (a real mTLS call).
    pub async fn wait_ready(&mut self, net: &Net) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "{} exited ({status}) while starting:\n{}",
                    self.party.name,
                    self.stderr()
                );
            }
            let mut c = client_of(net, &self.party, &self.client);
            if c.list_inbox(ListInboxRequest::default()).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} never served:\n{}",
                self.party.name,
                self.stderr()
            );
            sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Exchanged {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- {} exchanged stderr (start {}) ---\n{}",
                self.party.name,
                self.starts,
                self.stderr()
            );
        }
    }
}

/// Pending deliveries in a party's store, read with a read-only connection
/// while its daemon runs (None if the store cannot be read right now).
pub fn pending(party: &Party) -> Option<u64> {
    if let Some(url) = store_url(party) {
        return Some(pg::count(
            &url,
            "SELECT count(*) FROM deliveries WHERE state = 'pending'",
        ));
    }
    let conn = rusqlite::Connection::open_with_flags(
        party.data_dir().join("store.sqlite3"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .ok()?;
    conn.busy_timeout(Duration::from_secs(2)).ok()?;
    conn.query_row(
        "SELECT count(*) FROM deliveries WHERE state = 'pending'",
        [],
        |r| r.get(0),
    )
    .ok()
}

/// The pending deliveries of a party, described (for a failure report).
pub fn pending_rows(party: &Party) -> Vec<String> {
    const SQL: &str = "SELECT id || ' to ' || target || ': attempts ' || attempts \
         || ', next ' || next_attempt_ms || ', claimed by ' || COALESCE(claimed_by, '-') \
         || ' until ' || COALESCE(CAST(claim_until_ms AS TEXT), '-') || ' (claim ' || claim \
         || '), last error ' || COALESCE(last_error, '-') \
         FROM deliveries WHERE state = 'pending' ORDER BY id";
    if let Some(url) = store_url(party) {
        return pg::query(&url, SQL, |r| r.get::<_, String>(0));
    }
    let Ok(conn) = rusqlite::Connection::open_with_flags(
        party.data_dir().join("store.sqlite3"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    ) else {
        return Vec::new();
    };
    let Ok(mut stmt) = conn.prepare(SQL) else {
        return Vec::new();
    };
    stmt.query_map([], |r| r.get::<_, String>(0))
        .map(|rows| rows.filter_map(Result::ok).collect())
        .unwrap_or_default()
}

/// Files in a party's `blobs/` that no message row names, rows whose blob
/// file is missing, and files left in `spool/`.
pub fn orphans(party: &Party) -> (Vec<String>, Vec<String>, Vec<String>) {
    let dir = party.data_dir();
    let files = |d: &Path| -> Vec<String> {
        std::fs::read_dir(d)
            .map(|r| {
                r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    if let Some(url) = store_url(party) {
        // Chunks are rows: a chunk without its message cannot exist (a
        // foreign key); a message whose chunks do not add up to its length
        // is the counterpart of a blob file gone missing.
        let missing = pg::query(
            &url,
            "SELECT encode(id, 'hex') FROM messages m WHERE chunked AND ciphertext_len <> \
             COALESCE((SELECT sum(length(data)) FROM blob_chunks c WHERE c.message_id = m.id), 0)",
            |r| r.get::<_, String>(0),
        );
        return (Vec::new(), missing, files(&dir.join("spool")));
    }
    let conn = rusqlite::Connection::open_with_flags(
        dir.join("store.sqlite3"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let named: HashSet<String> = conn
        .prepare("SELECT blob FROM messages WHERE blob IS NOT NULL")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let blobs: HashSet<String> = files(&dir.join("blobs")).into_iter().collect();
    let unnamed = blobs.difference(&named).cloned().collect();
    let missing = named.difference(&blobs).cloned().collect();
    (unnamed, missing, files(&dir.join("spool")))
}

/// The crash points each role passes through, and how many passes to let
/// by before the crash (at most) so that it comes at a random one.
fn crash_points(role: usize) -> &'static [(&'static str, u64)] {
    if pg::suites_on_postgres() {
        // The PostgreSQL store's points: after a large ciphertext's chunks
        // are written, before and after each commit.
        const PG: [(&str, u64); 3] = [
            ("store::chunks-written", 4),
            ("store::before-commit", 40),
            ("store::after-commit", 40),
        ];
        return match role {
            0 => &[
                PG[0],
                PG[1],
                PG[2],
                ("client::send-reply", 10),
                ("delivery::answered", 10),
                ("peer::receipts-reply", 10),
            ],
            1 => &[
                PG[0],
                PG[1],
                PG[2],
                ("peer::deliver-reply", 10),
                ("delivery::answered", 10),
            ],
            _ => &[PG[0], PG[1], PG[2], ("peer::deliver-reply", 10)],
        };
    }
    const STORE: [(&str, u64); 5] = [
        ("store::spool-fsynced", 4),
        ("store::blob-linked", 4),
        ("store::blob-dir-synced", 4),
        ("store::before-commit", 40),
        ("store::after-commit", 40),
    ];
    match role {
        0 => &[
            STORE[0],
            STORE[1],
            STORE[2],
            STORE[3],
            STORE[4],
            ("client::send-reply", 10),
            ("delivery::answered", 10),
            ("peer::receipts-reply", 10),
        ],
        1 => &[
            STORE[0],
            STORE[1],
            STORE[2],
            STORE[3],
            STORE[4],
            ("peer::deliver-reply", 10),
            ("delivery::answered", 10),
        ],
        _ => &[
            STORE[0],
            STORE[1],
            STORE[2],
            STORE[3],
            STORE[4],
            ("peer::deliver-reply", 10),
        ],
    }
}

/// What a run did and found.
#[derive(Debug, Default)]
pub struct Tally {
    pub seed: u64,
    pub cycles: usize,
    pub sent: usize,
    pub large: usize,
    pub retried_sends: usize,
    pub delivered_once: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub orphans: usize,
    pub receipts_wrong: usize,
    pub pending_left: u64,
    /// SIGKILLs per role (clinic, agent, hospital), and of those how many
    /// came while deliveries were pending to, at or from that process.
    pub kills: [usize; 3],
    pub kills_with_pending: [usize; 3],
    /// Crash points reached (name: action -> count), and armed but not reached.
    pub crash_points: BTreeMap<String, usize>,
    pub crash_points_missed: usize,
    pub problems: Vec<String>,
}

impl Tally {
    /// The one-line summary the long run ends with.
    pub fn line(&self) -> String {
        format!(
            "crash: {} cycles, {} sent, {} delivered once, {} lost, {} duplicated, {} orphans",
            self.cycles, self.sent, self.delivered_once, self.lost, self.duplicated, self.orphans
        )
    }

    /// Everything else, for the log.
    pub fn details(&self) -> String {
        format!(
            "seed {}; {} large (blob) payloads, {} sends retried; kills clinic/agent/hospital {:?}, with deliveries pending {:?}; crash points reached {:?}, armed but not reached {}; receipts wrong {}; pending left {}; problems: {:?}",
            self.seed,
            self.large,
            self.retried_sends,
            self.kills,
            self.kills_with_pending,
            self.crash_points,
            self.crash_points_missed,
            self.receipts_wrong,
            self.pending_left,
            self.problems
        )
    }

    pub fn clean(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.orphans == 0
            && self.receipts_wrong == 0
            && self.pending_left == 0
            && self.delivered_once == self.sent
            && self.problems.is_empty()
    }
}

/// An inbox item traced to a Send: its id, and whether its bytes are the ones sent.
type Found = (Vec<u8>, bool);

/// One accepted Send.
#[derive(Debug, Clone)]
struct Sent {
    task: usize,
    i: usize,
    id: Vec<u8>,
}

/// Runs `cycles` crash cycles with `senders` concurrent applications.
pub async fn run(seed: u64, cycles: usize, senders: usize) -> Tally {
    eprintln!("crash: seed {seed} (replay with CRASH_SEED={seed})");
    let mut rng = Rng::new(seed);
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let agent = net.party("agent", AGENT);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:local:clinic:emr");
    let ops = net.client("ops", "urn:local:agent:ops");
    let his = net.client("his", "urn:local:hospital:his");
    let limits = format!("\n[limits]\ninline_ciphertext_bytes = {INLINE_LIMIT}\n");
    // The clinic entrusts the agent by contract; receipts go back the way
    // they came.
    net.configure_roles(
        &clinic,
        &[&agent, &hospital],
        &[&emr],
        &limits,
        &[(&agent, "entrusted")],
    );
    net.configure(&agent, &[&clinic, &hospital], &[&ops], &limits);
    net.configure(&hospital, &[&agent], &[&his], &limits);

    let mut procs = [
        Exchanged::new(clinic.clone(), emr.clone()),
        Exchanged::new(agent.clone(), ops.clone()),
        Exchanged::new(hospital.clone(), his.clone()),
    ];
    for p in &mut procs {
        p.spawn(None);
    }
    for p in &mut procs {
        p.wait_ready(&net).await;
    }

    // The applications: each sends message after message, retrying each
    // until it has an id.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(Mutex::new(Vec::<Sent>::new()));
    let retried = Arc::new(Mutex::new(0usize));
    let in_send = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let relay = format!("{AGENT}=entrusted");
    let mut tasks = Vec::new();
    for task in 0..senders {
        let (stop, sent, retried, in_send) =
            (stop.clone(), sent.clone(), retried.clone(), in_send.clone());
        let (net_ca, net_crl) = (net.path("ca.pem"), net.path("crl.pem"));
        let (clinic, hospital, emr, relay) =
            (clinic.clone(), hospital.clone(), emr.clone(), relay.clone());
        tasks.push(tokio::spawn(async move {
            let connect = || app_client(&net_ca, &net_crl, &clinic, &emr);
            let mut app = connect();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let data = payload(seed, task, i);
                let mut start = referral_start(&[&hospital], &[relay.as_str()], "treatment");
                start.idempotency_key = format!("crash-{task}-{i}");
                in_send.fetch_add(1, Ordering::SeqCst);
                let deadline = Instant::now() + Duration::from_secs(120);
                let mut tries = 0;
                let id = loop {
                    tries += 1;
                    match send(&mut app, start.clone(), &data).await {
                        Ok(id) => break id,
                        Err(e) => {
                            assert!(
                                Instant::now() < deadline,
                                "send {task}-{i} never succeeded: {e:?}"
                            );
                            sleep(Duration::from_millis(100)).await;
                            app = connect();
                        }
                    }
                };
                in_send.fetch_sub(1, Ordering::SeqCst);
                if tries > 1 {
                    *retried.lock().unwrap() += 1;
                }
                sent.lock().unwrap().push(Sent { task, i, id });
                i += 1;
            }
        }));
    }

    let mut tally = Tally {
        seed,
        cycles,
        ..Tally::default()
    };
    let parties = [&clinic, &agent, &hospital];
    for cycle in 0..cycles {
        let role = cycle % 3;
        let by_crash_point = (cycle / 3) % 2 == 1;
        // Under load for a random moment.
        sleep(Duration::from_millis(rng.range(150, 1500))).await;
        // Deliveries at the process, to it, or from it (the hops around it).
        let around: &[usize] = match role {
            0 => &[0],
            1 => &[0, 1],
            _ => &[1],
        };
        let pending_now: u64 = around.iter().filter_map(|&r| pending(parties[r])).sum();
        let sends_now = in_send.load(Ordering::SeqCst);
        procs[role].kill();
        tally.kills[role] += 1;
        if pending_now > 0 || (role == 0 && sends_now > 0) {
            tally.kills_with_pending[role] += 1;
        }
        sleep(Duration::from_millis(rng.range(0, 400))).await;
        if by_crash_point {
            let (point, most) = *rng.pick(crash_points(role));
            let action = if rng.next_u64().is_multiple_of(2) {
                "abort"
            } else {
                "power-loss"
            };
            let skip = rng.range(0, most);
            let spec = format!("{point}={skip}*off->return({action})");
            procs[role].spawn(Some(&spec));
            match procs[role].wait_crash(Duration::from_secs(8)).await {
                Ended::CrashPoint => {
                    *tally
                        .crash_points
                        .entry(format!("{point}:{action}"))
                        .or_default() += 1;
                }
                Ended::Killed => tally.crash_points_missed += 1,
            }
        }
        procs[role].spawn(None);
        procs[role].wait_ready(&net).await;
        eprintln!(
            "crash: cycle {cycle}: {} {} ({} pending around it, {} sends in flight); {} sent so far",
            parties[role].name,
            if by_crash_point {
                "killed, then crashed at a crash point"
            } else {
                "killed"
            },
            pending_now,
            sends_now,
            sent.lock().unwrap().len()
        );
    }

    // Stop the applications (each finishes the Send it is in) and let every
    // delivery and receipt settle.
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(180), t)
            .await
            .expect("a sender hung")
            .unwrap();
    }
    let sent = sent.lock().unwrap().clone();
    tally.sent = sent.len();
    tally.retried_sends = *retried.lock().unwrap();
    tally.large = sent
        .iter()
        .filter(|s| payload(seed, s.task, s.i).len() > INLINE_LIMIT)
        .count();
    // A liveness bound, not a timing: the backlog of a long run may take
    // minutes to drain, but it must keep shrinking.
    let (mut fewest, mut progress) = (u64::MAX, Instant::now());
    loop {
        let left: u64 = parties.iter().map(|p| pending(p).unwrap_or(1)).sum();
        if left == 0 {
            break;
        }
        if left < fewest {
            (fewest, progress) = (left, Instant::now());
        }
        if progress.elapsed() > Duration::from_secs(60) {
            tally.pending_left = left;
            tally.problems.push(format!(
                "{left} deliveries still pending at {}",
                exchange_daemon::unix_ms(std::time::SystemTime::now())
            ));
            for p in &parties {
                tally.problems.extend(
                    pending_rows(p)
                        .into_iter()
                        .map(|row| format!("{}: {row}", p.name)),
                );
            }
            break;
        }
        sleep(Duration::from_millis(200)).await;
    }

    check(
        &net, &mut tally, &sent, seed, &clinic, &hospital, &emr, &his,
    )
    .await;

    // Orphans while the daemons run (what a restart would sweep is counted
    // too: a blob without a row must not wait for a restart).
    for p in parties {
        let (unnamed, missing, spool) = orphans(p);
        tally.orphans += unnamed.len() + spool.len();
        tally.lost += missing.len();
        if !(unnamed.is_empty() && missing.is_empty() && spool.is_empty()) {
            tally.problems.push(format!(
                "{}: blobs without a row {unnamed:?}, rows without their blob {missing:?}, spool files {spool:?}",
                p.name
            ));
        }
    }
    for p in &mut procs {
        p.kill();
    }
    tally
}

/// A client of the clinic from the network's files (for the sender tasks).
fn app_client(ca: &Path, crl: &Path, clinic: &Party, emr: &LocalClient) -> ClientClient<Channel> {
    use exchange_daemon::client::{ClientSettings, connect};
    use exchange_daemon::tls::TlsIdentity;
    connect(&ClientSettings {
        address: clinic.client_addr(),
        server_party: clinic.party(),
        anchors_pem: std::fs::read(ca).unwrap(),
        crls_pem: Some(std::fs::read(crl).unwrap()),
        identity: TlsIdentity::from_pem(
            &std::fs::read(&emr.cert).unwrap(),
            &std::fs::read(&emr.key).unwrap(),
        )
        .unwrap(),
        allow_tls12: false,
    })
    .unwrap()
}

/// Exactly once, bytes identical, receipts at the origin.
#[allow(clippy::too_many_arguments)]
async fn check(
    net: &Net,
    tally: &mut Tally,
    sent: &[Sent],
    seed: u64,
    clinic: &Party,
    hospital: &Party,
    emr: &LocalClient,
    his: &LocalClient,
) {
    // The hospital's inbox, read from its store (every inbound row), each
    // item fetched through the client service and traced to its Send by
    // the payload's first line.
    let inbox: Vec<Vec<u8>> = if let Some(url) = store_url(hospital) {
        pg::query(
            &url,
            "SELECT wire_id FROM messages WHERE kind = 'inbound'",
            |r| r.get::<_, Vec<u8>>(0),
        )
    } else {
        let conn = rusqlite::Connection::open_with_flags(
            hospital.data_dir().join("store.sqlite3"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn.prepare("SELECT wire_id FROM messages WHERE kind = 'inbound'")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let mut reader = client_of(net, hospital, his);
    let mut found: HashMap<(usize, usize), Vec<Found>> = HashMap::new();
    for id in &inbox {
        let data = match fetch(&mut reader, id).await {
            Ok(data) => data,
            Err(e) => {
                // Stored but unreadable (e.g. a blob cut short): counted
                // as lost below, as its Send finds no intact copy.
                tally.problems.push(format!(
                    "inbox item {} cannot be fetched: {} ({:?})",
                    hex::encode(id),
                    e.message(),
                    e.code()
                ));
                continue;
            }
        };
        match payload_key(&data) {
            Some((task, i)) => {
                let intact = data == payload(seed, task, i);
                found
                    .entry((task, i))
                    .or_default()
                    .push((id.clone(), intact));
            }
            None => {
                tally.duplicated += 1;
                tally
                    .problems
                    .push(format!("inbox item {} is no payload", hex::encode(id)));
            }
        }
    }
    let keys: HashSet<(usize, usize)> = sent.iter().map(|s| (s.task, s.i)).collect();
    for (key, copies) in &found {
        if !keys.contains(key) {
            tally.duplicated += copies.len();
            tally
                .problems
                .push(format!("inbox holds {key:?}, which no Send returned"));
        }
    }
    let mut origin = client_of(net, clinic, emr);
    for s in sent {
        let copies = found.get(&(s.task, s.i)).map_or(&[][..], Vec::as_slice);
        match copies {
            [(id, true)] if *id == s.id => tally.delivered_once += 1,
            [] => {
                tally.lost += 1;
                tally
                    .problems
                    .push(format!("lost: {}-{} ({})", s.task, s.i, hex::encode(&s.id)));
            }
            [(id, intact)] => {
                tally.lost += 1;
                tally.problems.push(format!(
                    "{}-{}: delivered as {} (sent as {}), bytes intact: {intact}",
                    s.task,
                    s.i,
                    hex::encode(id),
                    hex::encode(&s.id)
                ));
            }
            more => {
                tally.duplicated += more.len() - 1;
                tally.problems.push(format!(
                    "duplicated: {}-{} in the inbox {} times",
                    s.task,
                    s.i,
                    more.len()
                ));
            }
        }
        // Both receipts, once each, at the origin.
        let status = origin
            .status(StatusRequest {
                message_id: s.id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut got: Vec<(String, String)> = status
            .receipts
            .iter()
            .map(|r| (r.issuer.clone(), r.disposition().as_str_name().to_owned()))
            .collect();
        got.sort();
        let want = vec![
            (
                AGENT.to_owned(),
                "DISPOSITION_ACCEPTED_FOR_RELAY".to_owned(),
            ),
            (HOSPITAL.to_owned(), "DISPOSITION_DELIVERED".to_owned()),
        ];
        if status.state() != exchange_daemon::proto::MessageState::Delivered || got != want {
            tally.receipts_wrong += 1;
            tally.problems.push(format!(
                "{}-{}: state {} with receipts {got:?}",
                s.task, s.i, status.state
            ));
        }
    }
}

async fn fetch(client: &mut ClientClient<Channel>, id: &[u8]) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = client
        .fetch(FetchRequest {
            message_id: id.to_vec(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut data = Vec::new();
    while let Some(m) = stream.message().await? {
        if let Some(fetch_response::Part::Chunk(c)) = m.part {
            data.extend_from_slice(&c);
        }
    }
    Ok(data)
}
