//! Several `exchanged` replicas of one facility on one PostgreSQL database,
//! behind one address: three replicas of the sending clinic and three of
//! the receiving hospital, each side on a database of its own, each side
//! reached by its peers through a TCP front that spreads connections over
//! the live replicas. One replica of each side is SIGKILLed under load;
//! every accepted message must still reach the hospital exactly once,
//! intact, with its DELIVERED receipt back at the clinic. And a change one
//! replica takes in reaches a status watch on another at once.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;
mod crash_harness;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::pg::{TestDb, count, query};
use common::replicas::{front, replica_settings, replicas_of};
use common::*;
use crash_harness::Exchanged;
use exchange_daemon::proto::{
    AckRequest, FetchRequest, MessageState, StatusRequest, fetch_response,
};
use tokio::time::{Instant, sleep};

const REPLICAS: usize = 3;
const TASKS: usize = 4;
const PER_TASK: usize = 30;
/// A short lease (a killed replica's claims lapse in three seconds), and
/// ciphertexts above 32 KiB in chunks.
const SETTINGS: &str = "lease_ms = 3000\n\n[limits]\ninline_ciphertext_bytes = 32768\n";

/// Message `i` of task `task`: its first line names it; every third one
/// is larger than the inline limit (its ciphertext goes to chunks).
fn payload(task: usize, i: usize) -> Vec<u8> {
    let mut data = format!("replica-payload {task} {i}\n").into_bytes();
    let len = if i.is_multiple_of(3) { 100_000 } else { 2_000 };
    let mut x = (task * 1_000 + i) as u32;
    while data.len() < len {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(len);
    data
}

/// Sends `data` with idempotency key `key` through the live replicas in
/// turn until one answers: a replica killed mid-Send leaves the client
/// to retry the same key on another.
async fn send_once(
    net: &Net,
    replicas: &[Party],
    client: &LocalClient,
    hospital: &Party,
    key: &str,
    data: &[u8],
    start_at: usize,
) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut k = start_at;
    loop {
        let replica = &replicas[k % replicas.len()];
        let mut c = client_of(net, replica, client);
        let mut start = referral_start(&[hospital], &[], "treatment");
        start.idempotency_key = key.to_owned();
        start.size_hint = data.len() as u64;
        match tokio::time::timeout(Duration::from_secs(10), send(&mut c, start, data)).await {
            Ok(Ok(id)) => return id,
            Ok(Err(e)) if e.code() == tonic::Code::InvalidArgument => {
                panic!("send {key} refused: {e:?}")
            }
            _ => {}
        }
        assert!(Instant::now() < deadline, "send {key} never accepted");
        k += 1;
        sleep(Duration::from_millis(100)).await;
    }
}

async fn fetch(net: &Net, replica: &Party, client: &LocalClient, id: &[u8]) -> Vec<u8> {
    let mut c = client_of(net, replica, client);
    let mut stream = c
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_of_each_side_killed_under_load_loses_and_duplicates_nothing() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:jp:example:app:emr-01");
    let his = net.client("his", "urn:jp:example:app:his-01");
    let (clinic_db, hospital_db) = (TestDb::new(), TestDb::new());
    let clinics = replicas_of(&net, &clinic, REPLICAS);
    let hospitals = replicas_of(&net, &hospital, REPLICAS);
    let ports = |ps: &[Party]| ps.iter().map(|p| p.peer_port).collect::<Vec<_>>();
    // Each side is known to the other by one address: its front.
    let clinic_front = Party {
        peer_port: front(free_port(), ports(&clinics)).await,
        ..clinic.clone()
    };
    let hospital_front = Party {
        peer_port: front(free_port(), ports(&hospitals)).await,
        ..hospital.clone()
    };
    let mut procs = Vec::new();
    for (r, p) in clinics.iter().enumerate() {
        let settings = replica_settings(&format!("clinic-{r}"), &clinic_db, SETTINGS);
        net.configure(p, &[&hospital_front], &[&emr], &settings);
        procs.push(Exchanged::new(p.clone(), emr.clone()));
    }
    for (r, p) in hospitals.iter().enumerate() {
        let settings = replica_settings(&format!("hospital-{r}"), &hospital_db, SETTINGS);
        net.configure(p, &[&clinic_front], &[&his], &settings);
        procs.push(Exchanged::new(p.clone(), his.clone()));
    }
    // Replicas started together migrate the schema once between them.
    for p in &mut procs {
        p.spawn(None);
    }
    for p in &mut procs {
        p.wait_ready(&net).await;
    }

    let net = Arc::new(net);
    let sent = Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = (0..TASKS)
        .map(|task| {
            let (net, clinics, emr, hospital) = (
                Arc::clone(&net),
                clinics.clone(),
                emr.clone(),
                hospital.clone(),
            );
            let sent = Arc::clone(&sent);
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..PER_TASK {
                    let key = format!("claims-{task}-{i}");
                    let id = send_once(
                        &net,
                        &clinics,
                        &emr,
                        &hospital,
                        &key,
                        &payload(task, i),
                        task + i,
                    )
                    .await;
                    ids.push(((task, i), id));
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                ids
            })
        })
        .collect();
    // Under load, with deliveries pending: SIGKILL one replica of each side.
    let deadline = Instant::now() + Duration::from_secs(60);
    while sent.load(Ordering::Relaxed) < TASKS * PER_TASK / 3 {
        assert!(Instant::now() < deadline, "the senders made no progress");
        sleep(Duration::from_millis(20)).await;
    }
    let pending_at_kill = count(
        &clinic_db.url(),
        "SELECT count(*) FROM deliveries WHERE state = 'pending'",
    );
    procs[0].kill();
    procs[REPLICAS + 1].kill();
    let killed_after = sent.load(Ordering::Relaxed);

    let mut ids: HashMap<(usize, usize), Vec<u8>> = HashMap::new();
    for s in senders {
        for (key, id) in s.await.unwrap() {
            assert!(ids.insert(key, id).is_none());
        }
    }
    let total = TASKS * PER_TASK;
    assert_eq!(ids.len(), total);
    assert!(
        killed_after < total,
        "the kill came after the last send ({killed_after} of {total})"
    );

    // Every message is DELIVERED, as a surviving clinic replica reports
    // (its receipt may have come back through any replica).
    let live_clinic = &clinics[1];
    let live_hospital = &hospitals[0];
    let deadline = Instant::now() + Duration::from_secs(120);
    for id in ids.values() {
        loop {
            let mut c = client_of(&net, live_clinic, &emr);
            let status = c
                .status(StatusRequest {
                    message_id: id.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            if status.state == MessageState::Delivered as i32 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} not delivered: {status:?}",
                hex::encode(id)
            );
            sleep(Duration::from_millis(100)).await;
        }
    }

    // Exactly once at the hospital, intact.
    let inbox: Vec<Vec<u8>> = query(
        &hospital_db.url(),
        "SELECT wire_id FROM messages WHERE kind = 'inbound'",
        |r| r.get(0),
    );
    assert_eq!(inbox.len(), total, "inbox rows");
    let sent_ids: HashSet<&Vec<u8>> = ids.values().collect();
    assert_eq!(inbox.iter().collect::<HashSet<_>>(), sent_ids);
    for ((task, i), id) in &ids {
        let data = fetch(&net, live_hospital, &his, id).await;
        assert!(data == payload(*task, *i), "{task}-{i} came back changed");
    }
    // One Send stored per idempotency key, however often a client retried
    // on another replica.
    assert_eq!(
        count(
            &clinic_db.url(),
            "SELECT count(*) FROM messages WHERE kind = 'outbound'"
        ),
        total as u64
    );
    // The DELIVERED receipts went back and nothing is left to do.
    let deadline = Instant::now() + Duration::from_secs(60);
    for db in [&clinic_db, &hospital_db] {
        loop {
            let pending = count(
                &db.url(),
                "SELECT count(*) FROM deliveries WHERE state = 'pending'",
            );
            if pending == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "{pending} deliveries pending");
            sleep(Duration::from_millis(200)).await;
        }
        // One audit log per facility, gap-free, whichever replica wrote.
        let (n, next) = (
            count(&db.url(), "SELECT count(*) FROM audit_log"),
            count(&db.url(), "SELECT COALESCE(MAX(seq) + 1, 0) FROM audit_log"),
        );
        assert_eq!(n, next, "audit log has gaps");
        assert!(n > total as u64);
    }
    // Every replica stops gracefully (each signs a last checkpoint over the
    // shared log) and starts again, the killed ones too: each accepts the
    // log's history, whichever replica signed its latest checkpoint.
    for p in &mut procs {
        if p.is_running() {
            assert!(
                p.terminate().await,
                "{} did not stop cleanly:\n{}",
                p.party.name,
                p.stderr()
            );
        }
    }
    let checkpoints = count(&clinic_db.url(), "SELECT count(*) FROM audit_checkpoints");
    assert!(checkpoints >= 2, "{checkpoints} checkpoints");
    for p in &mut procs {
        p.spawn(None);
    }
    for p in &mut procs {
        p.wait_ready(&net).await;
    }
    eprintln!(
        "replicas: {total} sent, all delivered once; killed clinic-0 and hospital-1 after {killed_after} sends with {pending_at_kill} deliveries pending"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_taken_by_one_replica_wakes_a_status_watch_on_another() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:jp:example:app:emr-01");
    let his = net.client("his", "urn:jp:example:app:his-01");
    let db = TestDb::new();
    let clinics = replicas_of(&net, &clinic, 2);
    // Status watches poll once in ten minutes: within this test only an
    // announced change can reach them.
    for (r, p) in clinics.iter().enumerate() {
        let settings = replica_settings(&format!("clinic-{r}"), &db, "status_poll_ms = 600000\n");
        net.configure(p, &[&hospital], &[&emr], &settings);
    }
    // The hospital knows the clinic by its second replica's address only:
    // every receipt it sends back on its own is taken in there.
    net.configure(&hospital, &[&clinics[1]], &[&his], "");
    let _hospital = start(&hospital).await;
    let _replicas = (start(&clinics[0]).await, start(&clinics[1]).await);

    // Sent through the first replica, and watched there.
    let mut app = client_of(&net, &clinics[0], &emr);
    let id = send(
        &mut app,
        referral_start(&[&hospital], &[], "treatment"),
        b"a referral watched on one replica",
    )
    .await
    .unwrap();
    let mut watch = app
        .watch_status(StatusRequest {
            message_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut next_state = async || {
        let status = tokio::time::timeout(Duration::from_secs(60), watch.message())
            .await
            .expect("no status change within 60 s")
            .unwrap()
            .expect("the watch ended early");
        status.state()
    };
    let mut seen = vec![next_state().await];
    // The hospital reads the message and says it has processed it; its
    // PROCESSED receipt goes to the second replica.
    let mut reader = client_of(&net, &hospital, &his);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let fetched = reader
            .fetch(FetchRequest {
                message_id: id.clone(),
                ..Default::default()
            })
            .await;
        if let Ok(stream) = fetched {
            let mut stream = stream.into_inner();
            while stream.message().await.unwrap().is_some() {}
            break;
        }
        assert!(Instant::now() < deadline, "never reached the hospital");
        sleep(Duration::from_millis(50)).await;
    }
    reader
        .ack(AckRequest {
            message_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    while *seen.last().unwrap() != MessageState::Processed {
        let state = next_state().await;
        assert_ne!(state, MessageState::Failed, "{seen:?}");
        seen.push(state);
    }
    let processed_on_the_other: u64 = count(
        &db.url(),
        "SELECT count(*) FROM receipts WHERE disposition = 'PROCESSED'",
    );
    assert_eq!(processed_on_the_other, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_loses_the_connection_holding_its_name_stops_and_starts_again() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:jp:example:app:emr-01");
    let db = TestDb::new();
    let clinics = replicas_of(&net, &clinic, 2);
    let mut procs = Vec::new();
    for (r, p) in clinics.iter().enumerate() {
        net.configure(
            p,
            &[&hospital],
            &[&emr],
            &replica_settings(&format!("clinic-{r}"), &db, ""),
        );
        procs.push(Exchanged::new(p.clone(), emr.clone()));
    }
    for p in &mut procs {
        p.spawn(None);
        p.wait_ready(&net).await;
    }
    // The database ends the session holding clinic-0's name (as an
    // administrator, a failover or a network cut would).
    let holders: Vec<i32> = query(
        &db.url(),
        "SELECT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
         WHERE l.locktype = 'advisory' AND l.granted AND d.datname = current_database() \
         AND l.objid = (SELECT id FROM nodes WHERE name = 'clinic-0')",
        |r| r.get(0),
    );
    assert_eq!(holders.len(), 1, "{holders:?}");
    let ended = count(
        &db.url(),
        &format!(
            "SELECT count(*) FROM (SELECT pg_terminate_backend({})) t",
            holders[0]
        ),
    );
    assert_eq!(ended, 1);
    // It stops, non-zero, for its supervisor to start it again; the other
    // replica serves on.
    let status = procs[0]
        .wait_exit(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("still running:\n{}", procs[0].stderr()));
    assert!(!status.success(), "{status}");
    let log = procs[0].stderr();
    assert!(
        log.contains("lost the database connection that holds this replica's name"),
        "{log}"
    );
    let mut other = client_of(&net, &clinics[1], &emr);
    other
        .list_inbox(exchange_daemon::proto::ListInboxRequest::default())
        .await
        .unwrap();
    // Started again, it takes its name back and serves.
    procs[0].spawn(None);
    procs[0].wait_ready(&net).await;
}
