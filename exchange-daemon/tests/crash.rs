//! Crash safety on real processes: a clinic, an ENTRUSTED relay agent and a
//! hospital, each a real `exchanged` with its own SQLite store, talking
//! mutual TLS on loopback, while applications keep sending and retry every
//! Send under its idempotency key. In turn, at random moments, each process
//! is SIGKILLed, or started with a crash point armed and left to abort
//! there (between the fsync, link, directory fsync and commit of an accept,
//! and before the answer to a peer or a client), then started again. The
//! harness (`crash_harness/mod.rs`, shared with the long run
//! `cargo bench -p exchange-daemon --bench crash -- CYCLES`) then checks
//! that every Send that returned an id is in the hospital's inbox exactly
//! once with the bytes sent, both receipts reached the origin, no blob file
//! lacks a row, no spool file is left and nothing is pending; and this test
//! checks that the kills came while deliveries were pending, and that crash
//! points were reached, so that the run proves something.
//!
//! The seed is printed; `CRASH_SEED=N cargo test -p exchange-daemon --test
//! crash` replays a run's choices (the timing of a real run still varies).
//!
//! How the processes get their crash points: exchange-daemon names itself
//! as a dev-dependency with its test-only `failpoints` feature, so every
//! test build (`cargo test --workspace`, what the README and CI run) builds
//! the library and the `exchanged` binary the tests start with the crash
//! points compiled in, armed only by the FAILPOINTS environment variable of
//! the process. No second build and no extra CI step are needed, and a build
//! without tests (`cargo build --release`, `cargo install`) has no crash
//! point at all: `crash_point!` expands to nothing there.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;
mod crash_harness;

use crash_harness::{run, seed_from_env};

/// Six cycles: each process SIGKILLed once, then each crashed once at a
/// crash point, under three concurrent applications.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_crashed_processes_lose_nothing_and_duplicate_nothing() {
    let seed = seed_from_env();
    let tally = run(seed, 6, 3).await;
    eprintln!("{}", tally.details());
    eprintln!("{}", tally.line());
    assert!(tally.clean(), "{}\n{}", tally.details(), tally.line());
    assert!(tally.sent >= 20, "too little load: {}", tally.details());
    assert!(
        tally.large > 0 && tally.large < tally.sent,
        "payloads on both sides of the blob threshold: {}",
        tally.details()
    );
    // Deliveries were in flight when the processes died, for each of them.
    for (role, n) in tally.kills_with_pending.iter().enumerate() {
        assert!(
            *n > 0,
            "no kill of process {role} came while deliveries were pending: {}",
            tally.details()
        );
    }
    // And the crash points were reached (armed with a random skip count,
    // each is reached within seconds under this load).
    let reached: usize = tally.crash_points.values().sum();
    assert!(
        reached >= 2,
        "crash points not reached: {}",
        tally.details()
    );
}
