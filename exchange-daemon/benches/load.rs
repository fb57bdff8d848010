//! Load generator: two facilities on loopback (real mutual TLS, real SQLite
//! with synchronous=FULL, or PostgreSQL), one local client sending small
//! referrals concurrently.
//!
//! Prints accepted messages per second (Send returns once the sealed envelope
//! is durable) and end-to-end messages per second (until every message has
//! its DELIVERED receipt back at the sender), with the ratio to the bound set
//! by the public-key operations of one round trip.
//!
//!     cargo bench -p exchange-daemon --bench load -- [MESSAGES] [CONCURRENCY] [BYTES]
//!         [--store POSTGRES-URL] [--replicas N]
//!
//! `--store` puts each facility on a database of its own on that
//! PostgreSQL server (the URL of a database to create them from; they are
//! dropped afterwards); `--replicas N` (with `--store`) runs N daemons of
//! each facility on its database, each reached by its peer through a TCP
//! front that spreads connections over them, and spreads the senders over
//! the clinic's replicas.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::pg::TestDb;
use common::replicas::{front, replica_settings, replicas_of};
use common::*;
use exchange_daemon::Daemon;
use exchange_daemon::proto::StatusRequest;

/// The command line: positional numbers, `--store URL`, `--replicas N`.
struct Args {
    numbers: Vec<usize>,
    store: Option<String>,
    replicas: usize,
}

fn args() -> Args {
    let mut a = Args {
        numbers: Vec::new(),
        store: None,
        replicas: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--store" => a.store = Some(it.next().expect("--store URL")),
            "--replicas" => {
                a.replicas = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("--replicas N (a number)");
            }
            other => {
                if let Ok(n) = other.parse() {
                    a.numbers.push(n);
                }
            }
        }
    }
    assert!(a.replicas >= 1, "--replicas is at least 1");
    assert!(
        a.replicas == 1 || a.store.is_some(),
        "--replicas needs --store: replicas share a PostgreSQL database"
    );
    a
}

fn main() {
    let a = args();
    let number = |n: usize, default: usize| a.numbers.get(n).copied().unwrap_or(default);
    let (messages, concurrency, bytes) = (number(0, 1000), number(1, 32), number(2, 4096));
    if let Some(url) = &a.store {
        // The databases are created from (and dropped through) this one.
        common::pg::set_admin_url(url);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(
        messages,
        concurrency,
        bytes,
        a.store.is_some(),
        a.replicas,
    ));
}

/// One facility's daemons: one on SQLite (`store` None), or one per
/// replica party on the facility's database.
async fn facility(
    net: &Net,
    parties: &[Party],
    peer: &Party,
    clients: &[&LocalClient],
    extra: &str,
    store: Option<&TestDb>,
) -> Vec<Daemon> {
    let mut daemons = Vec::new();
    for (r, p) in parties.iter().enumerate() {
        match store {
            None => net.configure(p, &[peer], clients, extra),
            Some(db) => {
                let settings = replica_settings(&format!("{}-{r}", p.name), db, extra);
                net.configure(p, &[peer], clients, &settings);
            }
        }
    }
    for p in parties {
        daemons.push(start(p).await);
    }
    daemons
}

async fn run(messages: usize, concurrency: usize, bytes: usize, postgres: bool, replicas: usize) {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:local:clinic:emr");
    let dbs = postgres.then(|| (TestDb::new(), TestDb::new()));
    // With PostgreSQL, each facility runs as replicas, and its peer reaches
    // them through a front (a TCP load balancer) on one address.
    let (clinics, hospitals, clinic_peer, hospital_peer) = if postgres {
        let clinics = replicas_of(&net, &clinic, replicas);
        let hospitals = replicas_of(&net, &hospital, replicas);
        let ports = |ps: &[Party]| ps.iter().map(|p| p.peer_port).collect::<Vec<_>>();
        let clinic_peer = Party {
            peer_port: front(free_port(), ports(&clinics)).await,
            ..clinic.clone()
        };
        let hospital_peer = Party {
            peer_port: front(free_port(), ports(&hospitals)).await,
            ..hospital.clone()
        };
        (clinics, hospitals, clinic_peer, hospital_peer)
    } else {
        (
            vec![clinic.clone()],
            vec![hospital.clone()],
            clinic.clone(),
            hospital.clone(),
        )
    };
    // Each concurrent sender has a connection of its own (as separate
    // application processes would), all with one client certificate: allow
    // that many, above the per-party default.
    let clinic_extra = format!(
        "\n[limits]\nmax_connections_per_party = {}\n",
        concurrency + 1
    );
    let cds = facility(
        &net,
        &clinics,
        &hospital_peer,
        &[&emr],
        &clinic_extra,
        dbs.as_ref().map(|d| &d.0),
    )
    .await;
    let hds = facility(
        &net,
        &hospitals,
        &clinic_peer,
        &[],
        "",
        dbs.as_ref().map(|d| &d.1),
    )
    .await;
    let c = &cds[0];
    let h = &hds[0];
    let payload = vec![b'x'; bytes];

    let store = if postgres {
        format!("PostgreSQL, {replicas} replica(s) per facility")
    } else {
        "SQLite".to_owned()
    };
    println!(
        "load: {messages} messages of {bytes} bytes, {concurrency} concurrent senders, clinic -> hospital on loopback, {store}"
    );
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    let per = messages.div_ceil(concurrency);
    for w in 0..concurrency {
        let mut app = client_of(&net, &clinics[w % clinics.len()], &emr);
        let payload = payload.clone();
        let hospital = hospital.clone();
        let n = per.min(messages.saturating_sub(w * per));
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::with_capacity(n);
            for _ in 0..n {
                ids.push(
                    send(
                        &mut app,
                        referral_start(&[&hospital], &[], "treatment"),
                        &payload,
                    )
                    .await
                    .unwrap(),
                );
            }
            ids
        }));
    }
    let mut ids = Vec::with_capacity(messages);
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    let accepted = t0.elapsed();
    // Every delivery done (no pending work) means every DELIVERED receipt is stored.
    while c.node().store().pending_count().await.unwrap() > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let delivered = t0.elapsed();
    let mut app = client_of(&net, &clinics[0], &emr);
    for id in ids.iter().step_by((ids.len() / 20).max(1)) {
        let s = app
            .status(StatusRequest {
                message_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            s.state(),
            exchange_daemon::proto::MessageState::Delivered,
            "{s:#?}"
        );
    }
    let inbox = h.node().store().inbox(true).await.unwrap().len();
    assert_eq!(inbox, ids.len());

    let rate = |d: Duration| ids.len() as f64 / d.as_secs_f64();
    println!(
        "accepted (sealed + durable):      {:>8.0} msg/s  ({} in {:.2} s)",
        rate(accepted),
        ids.len(),
        accepted.as_secs_f64()
    );
    println!(
        "end to end (DELIVERED receipts):  {:>8.0} msg/s  ({} in {:.2} s)",
        rate(delivered),
        ids.len(),
        delivered.as_secs_f64()
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let bound = core_round_trips(&net, &clinic, &hospital, &payload) * cores as f64;
    println!(
        "bound: exchange-core round trip (seal, open, receipt sign + verify) {:.0}/s per core x {cores} cores = {:.0}/s",
        bound / cores as f64,
        bound
    );
    println!(
        "ratio: end to end / bound = {:.2} (both daemons and the client share the {cores} cores)",
        rate(delivered) / bound
    );
    for d in cds.into_iter().chain(hds) {
        d.shutdown().await;
    }
}

/// Round trips per second of the bare library on one core, measured now.
fn core_round_trips(net: &Net, clinic: &Party, hospital: &Party, payload: &[u8]) -> f64 {
    use exchange_core::envelope::{SealerBuilder, open_slice};
    use exchange_core::identity::{Certificate, DecryptionKey};
    use exchange_core::receipt::{Disposition, ReceiptContent, SignedReceipt};
    use exchange_core::route::HopRole;
    use exchange_core::trust::TrustStore;

    let trust = TrustStore::builder()
        .anchors_pem(&std::fs::read(net.path("ca.pem")).unwrap())
        .unwrap()
        .crls_pem(&std::fs::read(net.path("crl.pem")).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let sender = clinic.identity();
    let receiver = hospital.identity();
    let key = DecryptionKey::from_pem(
        &std::fs::read(hospital.file("encryption.pem")).unwrap(),
        &std::fs::read(hospital.file("encryption.key.pem")).unwrap(),
    )
    .unwrap();
    let to = Certificate::from_pem(&std::fs::read(hospital.file("encryption.pem")).unwrap())
        .unwrap()
        .remove(0);
    let mut rng = rand_core::UnwrapErr(getrandom::SysRng);
    let n = 300;
    let t = Instant::now();
    for _ in 0..n {
        let now = std::time::SystemTime::now();
        let env = SealerBuilder::new(&sender, "application/fhir+json")
            .recipient(
                trust.verify_encryption(&to, now).unwrap(),
                HopRole::ThirdParty,
            )
            .purpose("treatment")
            .start(now, &mut rng)
            .unwrap()
            .seal_to_vec(payload);
        let (head, _, _) = open_slice(&env, &trust, std::slice::from_ref(&key), now).unwrap();
        let r = SignedReceipt::issue(
            &receiver,
            &ReceiptContent::for_head(&head, HopRole::ThirdParty, Disposition::Delivered, now),
        );
        r.verify(&trust).unwrap().check_for(&head).unwrap();
    }
    f64::from(n) / t.elapsed().as_secs_f64()
}
