//! One large message through two `exchanged` processes on loopback: sent
//! by a local client, delivered clinic -> hospital, fetched back, with
//! the time of each stage and each daemon's peak resident memory (VmHWM):
//! the ciphertext is streamed in constant memory both ways, into and out
//! of the store (SQLite blob files, or PostgreSQL chunks).
//!
//!     cargo bench -p exchange-daemon --bench large -- [BYTES] [--store POSTGRES-URL]
//!
//! BYTES defaults to 1 GiB. `--store` puts each daemon on a database of
//! its own on that PostgreSQL server (created from the database the URL
//! names, dropped afterwards) and reports the database's growth.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/crash_harness/mod.rs"]
mod crash_harness;

use std::time::{Duration, Instant};

use common::pg::{TestDb, count};
use common::*;
use crash_harness::Exchanged;
use exchange_core::suite::Hasher;
use exchange_daemon::proto::{
    FetchRequest, MessageState, SendRequest, StatusRequest, fetch_response, send_request,
};

const PIECE: usize = 256 * 1024;

/// Byte `i` of the payload (cheap to make again while reading back).
fn piece(n: u64) -> Vec<u8> {
    let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..PIECE / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let mut bytes: u64 = 1 << 30;
    let mut store = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--store" => store = Some(args.next().expect("--store URL")),
            other => {
                if let Ok(n) = other.parse() {
                    bytes = n;
                }
            }
        }
    }
    if let Some(url) = &store {
        common::pg::set_admin_url(url);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(bytes, store.is_some()));
}

async fn run(bytes: u64, postgres: bool) {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:local:clinic:emr");
    let his = net.client("his", "urn:local:hospital:his");
    let dbs = postgres.then(|| (TestDb::new(), TestDb::new()));
    let store_of = |db: Option<&TestDb>| {
        db.map(|d| format!("\n[store]\nurl = \"{}\"\n", d.url()))
            .unwrap_or_default()
    };
    let limits = format!("\n[limits]\nmax_envelope_bytes = {}\n", bytes * 2);
    net.configure(
        &clinic,
        &[&hospital],
        &[&emr],
        &format!("{limits}{}", store_of(dbs.as_ref().map(|d| &d.0))),
    );
    net.configure(
        &hospital,
        &[&clinic],
        &[&his],
        &format!("{limits}{}", store_of(dbs.as_ref().map(|d| &d.1))),
    );
    let mut c = Exchanged::new(clinic.clone(), emr.clone());
    let mut h = Exchanged::new(hospital.clone(), his.clone());
    c.spawn(None);
    h.spawn(None);
    c.wait_ready(&net).await;
    h.wait_ready(&net).await;
    let db_size = |d: &TestDb| count(&d.url(), "SELECT pg_database_size(current_database())");
    let before = dbs.as_ref().map(|(a, b)| (db_size(a), db_size(b)));
    let store_name = if postgres { "PostgreSQL" } else { "SQLite" };
    println!("large: one message of {bytes} bytes, clinic -> hospital, {store_name}");

    // Send, streamed: the client holds one piece at a time.
    let pieces = bytes.div_ceil(PIECE as u64);
    let mut start = referral_start(&[&hospital], &[], "treatment");
    start.size_hint = bytes;
    let first = SendRequest {
        part: Some(send_request::Part::Start(start)),
    };
    let stream =
        futures_util::stream::iter(std::iter::once(first).chain((0..pieces).map(move |n| {
            let mut p = piece(n);
            p.truncate(
                usize::try_from(bytes - n * PIECE as u64)
                    .unwrap_or(PIECE)
                    .min(PIECE),
            );
            SendRequest {
                part: Some(send_request::Part::Chunk(p)),
            }
        })));
    let t0 = Instant::now();
    let mut app = client_of(&net, &clinic, &emr);
    let id = app.send(stream).await.unwrap().into_inner().message_id;
    let sent = t0.elapsed();

    // Delivered: the hospital's DELIVERED receipt is back at the clinic.
    loop {
        let s = app
            .status(StatusRequest {
                message_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if s.state == MessageState::Delivered as i32 {
            break;
        }
        assert!(s.state != MessageState::Failed as i32, "{s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let delivered = t0.elapsed();

    // Fetched at the hospital, checked against what was sent.
    let t1 = Instant::now();
    let mut reader = client_of(&net, &hospital, &his);
    let mut stream = reader
        .fetch(FetchRequest {
            message_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (mut got, mut digest) = (0u64, Hasher::new());
    while let Some(m) = stream.message().await.unwrap() {
        if let Some(fetch_response::Part::Chunk(c)) = m.part {
            got += c.len() as u64;
            digest.update(&c);
        }
    }
    let fetched = t1.elapsed();
    let mut expected = Hasher::new();
    for n in 0..pieces {
        let mut p = piece(n);
        p.truncate(
            usize::try_from(bytes - n * PIECE as u64)
                .unwrap_or(PIECE)
                .min(PIECE),
        );
        expected.update(&p);
    }
    assert_eq!(got, bytes);
    assert_eq!(
        digest.finish(),
        expected.finish(),
        "the payload came back changed"
    );

    let mib = bytes as f64 / (1024.0 * 1024.0);
    let rate = |d: Duration| mib / d.as_secs_f64();
    println!(
        "send (sealed + durable at the clinic): {:>7.2} s  {:>7.1} MiB/s",
        sent.as_secs_f64(),
        rate(sent)
    );
    println!(
        "delivered (receipt back):              {:>7.2} s  {:>7.1} MiB/s from the start",
        delivered.as_secs_f64(),
        rate(delivered)
    );
    println!(
        "fetch (decrypted at the hospital):     {:>7.2} s  {:>7.1} MiB/s",
        fetched.as_secs_f64(),
        rate(fetched)
    );
    for (name, p) in [("clinic", &c), ("hospital", &h)] {
        let kib = p.pid().map_or(0, peak_rss_kib);
        println!("peak RSS {name:>8}: {:>7.1} MiB", kib as f64 / 1024.0);
    }
    if let (Some((a0, b0)), Some((a, b))) = (before, dbs.as_ref()) {
        let gib = bytes as f64 / (1u64 << 30) as f64;
        println!(
            "database growth per GiB of payload: clinic {:.2} GiB, hospital {:.2} GiB",
            (db_size(a) - a0) as f64 / (1u64 << 30) as f64 / gib,
            (db_size(b) - b0) as f64 / (1u64 << 30) as f64 / gib
        );
    }
}
