//! The long crash run: the harness of `tests/crash.rs` for CYCLES cycles.
//!
//!     cargo bench -p exchange-daemon --bench crash -- CYCLES [SENDERS]
//!
//! The seed is printed first (`CRASH_SEED=N` replays its choices). The last
//! line reads `crash: CYCLES cycles, N sent, N delivered once, 0 lost, 0
//! duplicated, 0 orphans`; the exit status is non-zero if anything was
//! lost, duplicated or left behind (the line before it says what).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/crash_harness/mod.rs"]
mod crash_harness;

use std::process::ExitCode;

fn arg(n: usize, default: usize) -> usize {
    std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn main() -> ExitCode {
    let cycles = arg(0, 30);
    let senders = arg(1, 3);
    let seed = crash_harness::seed_from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let tally = runtime.block_on(crash_harness::run(seed, cycles, senders));
    println!("{}", tally.details());
    println!("{}", tally.line());
    if tally.clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
