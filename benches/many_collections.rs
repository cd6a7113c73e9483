//! Benchmark: many collections in flight (issue #7). harvestd triggers
//! 10,000 collections of one collector (build time 30 min) and polls them
//! under the `[limits]` rules (`docs/limits.md`); once every collection waits at the `poll_max_interval`
//! cap (steady state), reports over a window of three poll rounds:
//!
//! - the daemon's CPU per status poll, and what that is as a share of one
//!   core at the real-time steady rate (10,000 polls a minute);
//! - resident memory per tracked collection, against an idle daemon;
//! - the most requests the emulator saw in any one second, against
//!   `requests_per_second`.
//!
//! Time is compressed by `HARVESTD_BENCH_SCALE` (default 10): the build
//! time and every `[limits]` interval are divided by it and `requests_per_second`
//! (200) multiplied, so the daemon does K× the real-time work per second;
//! the measured CPU share is divided by K to give the real-time figure.
//! `HARVESTD_BENCH_SCALE=1` measures real time (about 13 minutes a run).
//! `HARVESTD_BENCH_POLL_60S=1` polls every collection once a minute from
//! its trigger (`poll_min_interval = poll_max_interval`): the same steady
//! rate, reached after 2 minutes instead of 10, window one minute (a
//! real-time run then takes about 4 minutes).
//!
//! `cargo bench --bench many_collections [-- RUNS]` (default 3).

// A benchmark is a measuring process, not the daemon: it sleeps through its
// measurement windows and between samples, and exits with its verdict.
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

#[path = "support/mod.rs"]
mod support;
use support::{cpu_seconds, idle_rss, median, micros, rss_mb};

const COLLECTIONS: usize = 10_000;
const RPS: f64 = 200.0;

fn scale() -> f64 {
    support::scale(10.0)
}

fn scaled(secs: f64) -> Duration {
    support::scaled(secs, scale())
}

/// `HARVESTD_BENCH_POLL_60S`: the steady state from the first poll on.
fn poll_60s() -> bool {
    std::env::var_os("HARVESTD_BENCH_POLL_60S").is_some_and(|v| v == "1")
}

struct Sample {
    /// Daemon CPU seconds per status poll in the window.
    cpu_per_poll: f64,
    /// Share of one core during the window, at this time scale.
    cpu_share: f64,
    polls_per_second: f64,
    per_collection_kb: f64,
    steady_mb: f64,
    peak_mb: f64,
    max_rps: u64,
}

fn one_run(rt: &tokio::runtime::Runtime, idle_mb: f64) -> Sample {
    let (emulator, dir, jobs) = support::setup(
        rt,
        &format!(
            "[collectors.c_many]\nbuild_time = \"{}\"\n",
            micros(scaled(1800.0))
        ),
    );
    let inputs: String = (0..COLLECTIONS)
        .map(|i| format!("https://many.example/{i}\n"))
        .collect();
    std::fs::write(jobs.join("many.txt"), inputs).unwrap();
    std::fs::write(
        jobs.join("many.toml"),
        "provider = \"scraper_studio\"\ncollector = \"c_many\"\ninputs_file = \"many.txt\"\nchunk_size = 1\n",
    )
    .unwrap();
    let rps = (RPS * scale()).round() as u64;
    std::fs::write(
        dir.path().join("harvestd.toml"),
        format!(
            "jobs_dir = \"{0}/jobs\"\nstate_dir = \"{0}/state\"\noutput_dir = \"{0}/out\"\nadmin_listen = \"off\"\nintake_settle = \"0s\"\n\
             [limits]\nmax_in_flight = {COLLECTIONS}\ntriggers_per_minute = 6000000\nrequests_per_second = {rps}\n\
             poll_min_interval = \"{1}\"\npoll_max_interval = \"{2}\"\n",
            dir.path().display(),
            micros(scaled(if poll_60s() { 60.0 } else { 5.0 })),
            micros(scaled(60.0)),
        ),
    )
    .unwrap();
    let mut child = support::daemon(dir.path(), &emulator.url(), "warn", &[])
        .spawn()
        .unwrap();
    let pid = child.id();
    support::drain_stderr(&mut child);
    rt.block_on(emulator.wait_for_ledger(COLLECTIONS, Duration::from_secs(600)))
        .expect("every collection triggered");
    let all_triggered = Instant::now();
    // Every collection has waited 10 minutes (scaled): each now waits the
    // 60 s cap between polls. Sleeping here is the benchmark's clock, not
    // a wait for an event.
    // With every poll 60 s apart from the start, the last collection
    // triggered is polled within 65 s.
    std::thread::sleep(scaled(if poll_60s() { 65.0 } else { 600.0 }));
    let window = scaled(if poll_60s() { 60.0 } else { 180.0 });
    let polls = || emulator.stats().requests.get("log").copied().unwrap_or(0);
    let (cpu0, polls0, t0) = (cpu_seconds(pid), polls(), Instant::now());
    std::thread::sleep(window);
    let (cpu1, polls1, elapsed) = (cpu_seconds(pid), polls(), t0.elapsed().as_secs_f64());
    assert!(
        all_triggered.elapsed() < scaled(1800.0),
        "the window ended before the builds did"
    );
    let steady_mb = rss_mb(&pid.to_string());
    let peak_mb = support::peak_mb(&pid.to_string());
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = child.wait();
    let polled = (polls1 - polls0) as f64;
    Sample {
        cpu_per_poll: (cpu1 - cpu0) / polled,
        cpu_share: (cpu1 - cpu0) / elapsed,
        polls_per_second: polled / elapsed,
        per_collection_kb: (steady_mb - idle_mb) * 1024.0 / COLLECTIONS as f64,
        steady_mb,
        peak_mb,
        max_rps: emulator.stats().max_requests_per_second,
    }
}

fn main() {
    let runs = support::runs_arg(3);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let idle = idle_rss(&rt);
    let samples: Vec<Sample> = (0..runs).map(|_| one_run(&rt, idle)).collect();
    let m = |f: &dyn Fn(&Sample) -> f64| median(samples.iter().map(f).collect());
    let per_poll = m(&|s| s.cpu_per_poll);
    println!(
        "{COLLECTIONS} collections at the 60 s poll cap, time compressed {}× (median of {runs}):\n\
         status polls per second           {:.0} (real-time steady rate: {:.0})\n\
         daemon CPU per poll               {:.0} µs\n\
         daemon CPU, share of one core     {:.2} % measured; {:.2} % at real-time rates\n\
         RSS at steady state (peak)        {:.1} MB ({:.1} MB)\n\
         per tracked collection            {:.2} KB (idle daemon: {idle:.1} MB)\n\
         most requests in any second       {} (requests_per_second = {})",
        scale(),
        m(&|s| s.polls_per_second),
        COLLECTIONS as f64 / 60.0,
        per_poll * 1e6,
        100.0 * m(&|s| s.cpu_share),
        100.0 * per_poll * COLLECTIONS as f64 / 60.0,
        m(&|s| s.steady_mb),
        m(&|s| s.peak_mb),
        m(&|s| s.per_collection_kb),
        samples.iter().map(|s| s.max_rps).max().unwrap_or(0),
        (RPS * scale()).round(),
    );
}
