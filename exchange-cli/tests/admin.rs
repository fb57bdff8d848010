//! `exchange admin backup | restore | verify-store` on the demo network's
//! real stores: an online backup taken while a daemon keeps receiving, its
//! restore, a daemon started on the restored store, and every rejection.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use exchange_core::{MessageId, PartyUri};
use exchange_daemon::client::{ClientSettings, connect};
use exchange_daemon::proto::client_client::ClientClient;
use exchange_daemon::proto::{
    AckRequest, FetchRequest, ListInboxRequest, SendRequest, SendStart, SubjectIdentifier,
    fetch_response, send_request,
};
use exchange_daemon::tls::TlsIdentity;
use exchange_daemon::{Config, Daemon};
use tonic::transport::Channel;

const CLINIC: &str = "urn:jp:mhlw:facility:1310000013";
const HOSPITAL: &str = "urn:jp:mhlw:facility:1310000021";

struct Run {
    out: Output,
}

impl Run {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    fn ok(self) -> Self {
        assert!(
            self.out.status.success(),
            "failed: {}\n{}",
            self.stderr(),
            self.stdout()
        );
        self
    }
    /// Fails with one `error:` line on stderr containing each of `reasons`.
    fn fails_with(self, reasons: &[&str]) -> Self {
        assert_eq!(
            self.out.status.code(),
            Some(1),
            "expected failure; stdout: {}",
            self.stdout()
        );
        let err = self.stderr();
        assert_eq!(err.lines().count(), 1, "not one line: {err}");
        assert!(err.starts_with("error: "), "{err}");
        for r in reasons {
            assert!(err.contains(r), "expected {r:?} in {err}");
        }
        self
    }
}

fn exchange(dir: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_exchange"))
        .current_dir(dir)
        .args(args)
        .env_remove("EXCHANGE_CLIENT_CONFIG")
        .output()
        .unwrap();
    Run { out }
}

/// A client of the daemon configured in `site`/exchanged.toml, as the
/// site's demo application (`site`/app/client.pem).
fn app_client(net: &Path, site: &str, party: &str) -> ClientClient<Channel> {
    let config = Config::load(&net.join(site).join("exchanged.toml")).unwrap();
    let app = net.join(site).join("app");
    connect(&ClientSettings {
        address: config.listen.client.clone(),
        server_party: PartyUri::new(party).unwrap(),
        anchors_pem: std::fs::read(net.join("ca/ca.pem")).unwrap(),
        crls_pem: Some(std::fs::read(net.join("ca/crl.pem")).unwrap()),
        identity: TlsIdentity::from_pem(
            &std::fs::read(app.join("client.pem")).unwrap(),
            &std::fs::read(app.join("client.key.pem")).unwrap(),
        )
        .unwrap(),
        allow_tls12: false,
    })
    .unwrap()
}

/// The clinic's application sends `data` to the hospital; returns the id.
async fn send(client: &mut ClientClient<Channel>, n: usize, data: &[u8]) -> Vec<u8> {
    let start = SendStart {
        recipients: vec![HOSPITAL.into()],
        content_type: "application/octet-stream".into(),
        purpose: "treatment".into(),
        subject_ids: vec![SubjectIdentifier {
            system: "urn:oid:1.2.392.100495.20.3.51.11310000013".into(),
            value: format!("P-{n:06}"),
        }],
        title: format!("検査結果 {n}"),
        ..SendStart::default()
    };
    let mut msgs = vec![SendRequest {
        part: Some(send_request::Part::Start(start)),
    }];
    for c in data.chunks(64 * 1024) {
        msgs.push(SendRequest {
            part: Some(send_request::Part::Chunk(c.to_vec())),
        });
    }
    client
        .send(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner()
        .message_id
}

async fn inbox(client: &mut ClientClient<Channel>) -> Vec<Vec<u8>> {
    client
        .list_inbox(ListInboxRequest {
            include_acked: true,
            ..ListInboxRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .items
        .into_iter()
        .map(|i| i.message_id)
        .collect()
}

/// Waits until every id in `ids` is in the hospital's inbox.
async fn wait_delivered(client: &mut ClientClient<Channel>, ids: &[Vec<u8>]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let have = inbox(client).await;
        if ids.iter().all(|id| have.contains(id)) {
            return;
        }
        assert!(Instant::now() < deadline, "not all delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn fetch(client: &mut ClientClient<Channel>, id: &[u8]) -> Vec<u8> {
    let mut stream = client
        .fetch(FetchRequest {
            message_id: id.to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut data = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        if let Some(fetch_response::Part::Chunk(c)) = m.part {
            data.extend_from_slice(&c);
        }
    }
    data
}

/// Distinct content per message: `n` repeated, `len` bytes.
fn payload(n: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 31 + n * 7) % 251) as u8).collect()
}

fn id_text(id: &[u8]) -> String {
    MessageId::from_slice(id).unwrap().to_string()
}

/// Inbound message ids in a store directory (read-only SQLite).
fn stored_ids(data: &Path) -> Vec<Vec<u8>> {
    let conn = rusqlite::Connection::open_with_flags(
        data.join("store.sqlite3"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    conn.prepare("SELECT id FROM messages WHERE kind = 'inbound' ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Names in `dir` (sorted).
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn start_daemon(rt: &tokio::runtime::Runtime, config: &Path) -> Daemon {
    rt.block_on(Daemon::start(Config::load(config).unwrap()))
        .unwrap()
}

#[test]
fn online_backup_restore_and_verify_store() {
    let d = tempfile::tempdir().unwrap();
    exchange(d.path(), &["demo", "--dir", "net", "--burst", "0"]).ok();
    let net = d.path().join("net");
    // Small ciphertexts inline, larger ones in blob files, at the hospital.
    let hospital_toml = net.join("hospital/exchanged.toml");
    let mut text = std::fs::read_to_string(&hospital_toml).unwrap();
    text.push_str("\n[limits]\ninline_ciphertext_bytes = 4096\n");
    std::fs::write(&hospital_toml, text).unwrap();

    // What the demo itself delivered to the hospital (its referral).
    let demo_ids = stored_ids(&net.join("hospital/data"));
    assert!(!demo_ids.is_empty());
    let referral = std::fs::read(net.join("hospital/app/inbox/referral.json")).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let clinic = start_daemon(&rt, &net.join("clinic/exchanged.toml"));
    let hospital = start_daemon(&rt, &hospital_toml);
    let sent: Arc<Mutex<HashMap<Vec<u8>, Vec<u8>>>> = Arc::default();

    // Before the backup: a mix of inline and blob messages, two acknowledged
    // (PROCESSED receipts stored at the hospital).
    let before: Vec<Vec<u8>> = rt.block_on(async {
        let mut emr = app_client(&net, "clinic", CLINIC);
        let mut his = app_client(&net, "hospital", HOSPITAL);
        let mut ids = Vec::new();
        for n in 0..8 {
            let data = payload(n, if n % 2 == 0 { 1_000 } else { 20_000 + n });
            let id = send(&mut emr, n, &data).await;
            sent.lock().unwrap().insert(id.clone(), data);
            ids.push(id);
        }
        wait_delivered(&mut his, &ids).await;
        for id in &ids[..2] {
            // An acknowledgement needs a completed fetch.
            fetch(&mut his, id).await;
            his.ack(AckRequest {
                message_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        ids
    });

    // The clinic keeps sending while the backup runs.
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (stop, sent, net) = (stop.clone(), sent.clone(), net.clone());
        rt.spawn(async move {
            let mut emr = app_client(&net, "clinic", CLINIC);
            let mut n = 100;
            while !stop.load(Ordering::Relaxed) {
                let data = payload(n, if n % 3 == 0 { 30_000 } else { 800 });
                let id = send(&mut emr, n, &data).await;
                sent.lock().unwrap().insert(id, data);
                n += 1;
            }
            n - 100
        })
    };
    let wait_for_sends = |at_least: usize| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while sent.lock().unwrap().len() < at_least {
            assert!(Instant::now() < deadline, "the sender stalled");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for_sends(before.len() + 5);
    let out = exchange(
        &net,
        &[
            "admin",
            "backup",
            "--data",
            "hospital/data",
            "--out",
            "backup.tar",
        ],
    )
    .ok()
    .stdout();
    assert!(
        out.contains("backup of hospital/data written to backup.tar"),
        "{out}"
    );
    let after_backup = sent.lock().unwrap().len();
    wait_for_sends(after_backup + 5);
    stop.store(true, Ordering::Relaxed);
    let streamed = rt.block_on(sender).unwrap();
    assert!(streamed >= 10, "{streamed}");
    let archive = net.join("backup.tar");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&archive).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    assert!(
        !names(&net).iter().any(|n| n.starts_with('.')),
        "temporary files left: {:?}",
        names(&net)
    );

    // Never overwritten.
    let archive_bytes = std::fs::read(&archive).unwrap();
    exchange(
        &net,
        &[
            "admin",
            "backup",
            "--data",
            "hospital/data",
            "--out",
            "backup.tar",
        ],
    )
    .fails_with(&["backup.tar already exists"]);
    assert_eq!(std::fs::read(&archive).unwrap(), archive_bytes);

    // Everything sent reached the hospital; then the network stops.
    let all: Vec<Vec<u8>> = sent.lock().unwrap().keys().cloned().collect();
    rt.block_on(async {
        let mut his = app_client(&net, "hospital", HOSPITAL);
        wait_delivered(&mut his, &all).await;
    });
    rt.block_on(async {
        hospital.shutdown().await;
        clinic.shutdown().await;
    });

    // Restore into a new directory.
    let out = exchange(
        &net,
        &[
            "admin",
            "restore",
            "--from",
            "backup.tar",
            "--data",
            "restored-data",
        ],
    )
    .ok()
    .stdout();
    assert!(
        out.contains("restored backup.tar into restored-data"),
        "{out}"
    );
    let restored = net.join("restored-data");
    let snapshot = stored_ids(&restored);
    // The snapshot holds everything stored before the backup began, and
    // fewer messages than were finally delivered (the daemon kept writing).
    for id in before.iter().chain(&demo_ids) {
        assert!(snapshot.contains(id), "{} missing", id_text(id));
    }
    assert!(snapshot.len() >= before.len());
    assert!(
        snapshot.len() < all.len() + demo_ids.len(),
        "{} of {}",
        snapshot.len(),
        all.len()
    );
    assert!(!names(&restored.join("blobs")).is_empty());
    // The facility's pseudonym secret comes back with the store (schema 2 on).
    let key = net.join("hospital/data/pseudonym.key");
    if key.exists() {
        let restored_key = restored.join("pseudonym.key");
        assert_eq!(
            std::fs::read(&restored_key).unwrap(),
            std::fs::read(&key).unwrap()
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&restored_key)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        }
    }

    // A daemon on the restored store serves every message of the snapshot.
    let restored_toml = net.join("hospital/restored.toml");
    let text = std::fs::read_to_string(&hospital_toml)
        .unwrap()
        .replace("data_dir = \"data\"", "data_dir = \"../restored-data\"");
    std::fs::write(&restored_toml, text).unwrap();
    let daemon = start_daemon(&rt, &restored_toml);
    rt.block_on(async {
        let mut his = app_client(&net, "hospital", HOSPITAL);
        let mut listed = inbox(&mut his).await;
        listed.sort();
        assert_eq!(listed, snapshot);
        let mut demo_plaintexts = Vec::new();
        for id in &snapshot {
            let got = fetch(&mut his, id).await;
            if demo_ids.contains(id) {
                demo_plaintexts.push(got);
                continue;
            }
            let want = sent.lock().unwrap().get(id).cloned();
            assert_eq!(Some(got), want, "{}", id_text(id));
        }
        assert_eq!(demo_plaintexts.len(), demo_ids.len());
        assert!(demo_plaintexts.contains(&referral));
    });
    // verify-store beside the running daemon, from its configuration.
    let out = exchange(
        &net,
        &[
            "admin",
            "verify-store",
            "--config",
            "hospital/restored.toml",
        ],
    )
    .ok()
    .stdout();
    assert!(out.contains("all verified"), "{out}");
    assert!(
        out.contains(&format!("{} message(s)", snapshot.len())),
        "{out}"
    );
    assert!(out.contains("; 0 failure(s)"), "{out}");
    rt.block_on(daemon.shutdown());

    // Restore refuses a non-empty target and changes nothing there.
    std::fs::create_dir(net.join("occupied")).unwrap();
    std::fs::write(net.join("occupied/keep.txt"), b"mine").unwrap();
    exchange(
        &net,
        &[
            "admin",
            "restore",
            "--from",
            "backup.tar",
            "--data",
            "occupied",
        ],
    )
    .fails_with(&["occupied is not empty"]);
    assert_eq!(names(&net.join("occupied")), ["keep.txt"]);
    let store_before = std::fs::read(restored.join("store.sqlite3")).unwrap();
    exchange(
        &net,
        &[
            "admin",
            "restore",
            "--from",
            "backup.tar",
            "--data",
            "restored-data",
        ],
    )
    .fails_with(&["restored-data is not empty"]);
    assert_eq!(
        std::fs::read(restored.join("store.sqlite3")).unwrap(),
        store_before
    );

    // A corrupted archive (one byte of a blob member flipped) is refused,
    // naming the member, and no data directory is created.
    let blob = names(&restored.join("blobs")).remove(0);
    let blob_bytes = std::fs::read(restored.join("blobs").join(&blob)).unwrap();
    let mut bad = archive_bytes.clone();
    let at = bad
        .windows(64)
        .position(|w| w == &blob_bytes[..64])
        .expect("blob bytes in the archive");
    bad[at + 10] ^= 0x01;
    std::fs::write(net.join("bad.tar"), &bad).unwrap();
    let listing = names(&net);
    exchange(
        &net,
        &[
            "admin", "restore", "--from", "bad.tar", "--data", "from-bad",
        ],
    )
    .fails_with(&[&format!("blobs/{blob}"), "does not match the manifest"]);
    assert!(!net.join("from-bad").exists());
    assert_eq!(names(&net), listing, "something was left behind");

    // verify-store finds a flipped byte in a blob file, an inline ciphertext,
    // a stored receipt and a message's own receipt, naming each message.
    let conn = rusqlite::Connection::open(restored.join("store.sqlite3")).unwrap();
    let blob_id: Vec<u8> = conn
        .query_row("SELECT id FROM messages WHERE blob = ?1", [&blob], |r| {
            r.get(0)
        })
        .unwrap();
    let mut blob_file = blob_bytes.clone();
    blob_file[100] ^= 0x80;
    std::fs::write(restored.join("blobs").join(&blob), &blob_file).unwrap();
    let (inline_id, mut ct): (Vec<u8>, Vec<u8>) = conn
        .query_row(
            "SELECT id, ciphertext FROM messages WHERE ciphertext IS NOT NULL ORDER BY id LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    ct[5] ^= 0x01;
    conn.execute(
        "UPDATE messages SET ciphertext = ?2 WHERE id = ?1",
        rusqlite::params![inline_id, ct],
    )
    .unwrap();
    let (seq, receipt_id, mut signed): (i64, Vec<u8>, Vec<u8>) = conn
        .query_row(
            "SELECT seq, message_id, signed FROM receipts ORDER BY seq LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    let last = signed.len() - 1;
    signed[last] ^= 0x01;
    conn.execute(
        "UPDATE receipts SET signed = ?2 WHERE seq = ?1",
        rusqlite::params![seq, signed],
    )
    .unwrap();
    let (own_id, mut own): (Vec<u8>, Vec<u8>) = conn
        .query_row(
            "SELECT id, our_receipt FROM messages WHERE id NOT IN (?1, ?2, ?3) \
             AND our_receipt IS NOT NULL ORDER BY id LIMIT 1",
            rusqlite::params![blob_id, inline_id, receipt_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let mid = own.len() / 2;
    own[mid] ^= 0x01;
    conn.execute(
        "UPDATE messages SET our_receipt = ?2 WHERE id = ?1",
        rusqlite::params![own_id, own],
    )
    .unwrap();
    drop(conn);
    let run = exchange(
        &net,
        &[
            "admin",
            "verify-store",
            "--data",
            "restored-data",
            "--ca",
            "ca/ca.pem",
            "--crl",
            "ca/crl.pem",
        ],
    )
    .fails_with(&["store restored-data: 4 check(s) failed"]);
    let out = run.stdout();
    let failed: Vec<&str> = out.lines().filter(|l| l.starts_with("FAILED")).collect();
    assert_eq!(failed.len(), 4, "{out}");
    let line = |id: &[u8], what: &str| {
        let id = id_text(id);
        assert!(
            failed
                .iter()
                .any(|l| l.contains(&format!("message {id}: {what}"))),
            "no failure {what} for {id} in\n{out}"
        );
    };
    line(&blob_id, &format!("ciphertext (blob file {blob}): "));
    line(&inline_id, "ciphertext (inline): ");
    line(&receipt_id, &format!("receipt #{seq}: "));
    line(&own_id, "our receipt");
    assert!(out.contains("FAILURES"), "{out}");
    // The untouched original store still verifies.
    let out = exchange(
        &net,
        &[
            "admin",
            "verify-store",
            "--data",
            "hospital/data",
            "--ca",
            "ca/ca.pem",
            "--crl",
            "ca/crl.pem",
        ],
    )
    .ok()
    .stdout();
    assert!(out.contains("all verified"), "{out}");
}

#[test]
fn usage_and_missing_store_errors_are_one_line() {
    let d = tempfile::tempdir().unwrap();
    let dir: PathBuf = d.path().to_owned();
    exchange(
        &dir,
        &["admin", "backup", "--data", "nowhere", "--out", "b.tar"],
    )
    .fails_with(&["no store in nowhere"]);
    assert!(!dir.join("b.tar").exists());
    assert!(names(&dir).is_empty(), "{:?}", names(&dir));
    std::fs::write(dir.join("junk.tar"), b"not an archive at all").unwrap();
    exchange(
        &dir,
        &["admin", "restore", "--from", "junk.tar", "--data", "new"],
    )
    .fails_with(&["junk.tar"]);
    assert!(!dir.join("new").exists());
    assert_eq!(names(&dir), ["junk.tar"]);
    let run = exchange(&dir, &["admin", "verify-store", "--data", "x"]);
    assert_eq!(run.out.status.code(), Some(2), "{}", run.stderr());
    assert!(run.stderr().contains("--ca"), "{}", run.stderr());
}
