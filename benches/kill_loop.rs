//! Benchmark: the `kill -9` loop at N = 200 on the release binary (the CI
//! test runs N = 20 on the debug one). Prints kills, in-doubt triggers and
//! how each was settled, duplicate triggers in the ledger, lost inputs and
//! restart-to-ready p50/p99 (target p99 < 2 s).
//!
//! `cargo bench --bench kill_loop [-- N [SEED]]`

// A benchmark is a measuring process, not the daemon: it sleeps through its
// measurement windows and between samples, and exits with its verdict.
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

#[path = "../tests/common/mod.rs"]
mod common;

fn main() {
    // `cargo bench` passes `--bench`; numbers are ours.
    let numbers: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let kills = numbers.first().copied().unwrap_or(200) as usize;
    let seed = numbers.get(1).copied().unwrap_or(7);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let report = rt.block_on(common::kill_loop::run(kills, seed));
    println!(
        "kill -9 loop: {kills} kills, seed {seed}, {} inputs",
        common::kill_loop::INPUTS
    );
    println!("{report}");
    let ok = report.lost_inputs == 0
        && report.doubled_inputs == 0
        && report.duplicate_triggers == 0
        && report.final_state == "complete";
    println!("verdict               {}", if ok { "ok" } else { "FAILED" });
    if !ok {
        std::process::exit(1);
    }
}
