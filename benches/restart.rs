//! Benchmark: restart at scale. A state store holding one run of 100,000
//! chunks, 90,000 downloaded and 10,000 collections still building, is
//! handed to the release binary; reports, median of RUNS: time from start
//! to ready (the `state loaded; ready` line, which is also READY=1 and
//! `/readyz` 200; target ≤ 1 s), time until every unfinished chunk has
//! polled its collection once, and the time to read all chunk records
//! from the store (what resuming pays for the finished ones).
//!
//! `cargo bench --bench restart [-- RUNS]` (default 3).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::BufRead;
use std::process::Command;
use std::time::{Duration, Instant};

use harvestd::chunk::{next, ChunkEvent};
use harvestd::emulator::{Emulator, Scenario};
use harvestd::store::Store;

#[path = "support/mod.rs"]
mod support;
use support::{idle_rss, median, rss_mb};

/// `HARVESTD_BENCH_CHUNKS` overrides (at least 10,000).
fn chunks() -> usize {
    std::env::var("HARVESTD_BENCH_CHUNKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
        .max(UNFINISHED)
}
const UNFINISHED: usize = 10_000;

/// Plans the run with harvestd's own intake, then moves its chunks on with
/// the state machine, as 100,000 chunks of history would have.
fn build_store(dir: &std::path::Path) -> f64 {
    let jobs = dir.join("jobs");
    std::fs::create_dir_all(&jobs).unwrap();
    let total = chunks();
    let mut urls = String::with_capacity(total * 40);
    for i in 0..total {
        urls.push_str(&format!("https://restart.example.com/item/{i}\n"));
    }
    std::fs::write(jobs.join("urls.txt"), urls).unwrap();
    std::fs::write(
        jobs.join("big.toml"),
        "provider = \"scraper_studio\"\ncollector = \"c_restart001\"\ninputs_file = \"urls.txt\"\nchunk_size = 1\n",
    )
    .unwrap();
    let store = Store::open(&dir.join("state")).unwrap();
    let now = harvestd::clock::now_ms();
    let scan = harvestd::intake::scan(&jobs, &store, now).unwrap();
    let run = &scan.new_runs[0];
    let mut chunks = store.chunks(&run.job, &run.run_id).unwrap();
    assert_eq!(chunks.len(), total);
    for (i, c) in chunks.iter_mut().enumerate() {
        let mut s = next(&c.state, ChunkEvent::Intent { at: now }).unwrap();
        s = next(
            &s,
            ChunkEvent::Accepted {
                remote_id: format!("j_restart{i:09}"),
                at: now,
            },
        )
        .unwrap();
        if i >= UNFINISHED {
            s = next(
                &s,
                ChunkEvent::Ready {
                    at: now,
                    expires_at: now + 86_400_000,
                    start: None,
                },
            )
            .unwrap();
            s = next(
                &s,
                ChunkEvent::PageSaved {
                    next: None,
                    rows: 1,
                    error_rows: 0,
                    columns: Default::default(),
                },
            )
            .unwrap();
            s = next(&s, ChunkEvent::Saved { at: now }).unwrap();
        }
        c.state = s;
        store.put_chunk(&run.job, &run.run_id, c).unwrap();
    }
    store.flush_blocking().unwrap();
    let start = Instant::now();
    let read = store.chunks(&run.job, &run.run_id).unwrap();
    assert_eq!(read.len(), total);
    start.elapsed().as_secs_f64()
}

struct Sample {
    ready: f64,
    all_polled: f64,
    read_all: f64,
    rss_mb: f64,
    /// Resident memory once every unfinished chunk has polled (steady).
    steady_mb: f64,
}

fn one_run(rt: &tokio::runtime::Runtime) -> Sample {
    // The collections are unknown to this emulator: it answers 404, which
    // is a poll all the same (and, within the grace, an early 404).
    let scenario: Scenario = toml::from_str("").unwrap();
    let emulator = rt
        .block_on(Emulator::start(([127, 0, 0, 1], 0).into(), scenario))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let read_all = build_store(dir.path());
    std::fs::write(
        dir.path().join("harvestd.toml"),
        format!(
            "jobs_dir = \"{0}/jobs\"\nstate_dir = \"{0}/state\"\noutput_dir = \"{0}/out\"\nadmin_listen = \"off\"\nintake_settle = \"0s\"\n\
             [limits]\nmax_in_flight = {UNFINISHED}\nrequests_per_second = 500\npoll_min_interval = \"1s\"\n\
             not_found_grace = \"1h\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let started = Instant::now();
    let mut child = support::daemon(
        dir.path(),
        &emulator.url(),
        "info",
        &["/usr/bin/time", "-f", "BENCH %M"],
    )
    .spawn()
    .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut ready = None;
    let mut rss_kb = 0.0;
    let polled = loop {
        let requests = emulator.stats().requests.get("log").copied().unwrap_or(0);
        if requests >= UNFINISHED as u64 {
            break started.elapsed().as_secs_f64();
        }
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(20)) {
            if ready.is_none() && line.contains("state loaded; ready") {
                ready = Some(started.elapsed().as_secs_f64());
            }
        }
        assert!(started.elapsed() < Duration::from_secs(120), "no resume");
    };
    // Stop the daemon (GNU time's child), not time itself: time then prints
    // its line and exits.
    let daemon = Command::new("pgrep")
        .args(["-P", &child.id().to_string()])
        .output()
        .unwrap();
    let daemon = String::from_utf8_lossy(&daemon.stdout).trim().to_string();
    assert!(!daemon.is_empty(), "the daemon runs under time");
    let steady_mb = rss_mb(&daemon);
    let _ = Command::new("kill").args(["-TERM", &daemon]).status();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) {
        if let Some(kb) = line.strip_prefix("BENCH ") {
            rss_kb = kb.trim().parse().unwrap_or(0.0);
            break;
        }
    }
    let _ = child.wait();
    Sample {
        ready: ready.expect("ready line"),
        all_polled: polled,
        read_all,
        rss_mb: rss_kb / 1024.0,
        steady_mb,
    }
}

fn main() {
    let runs = support::runs_arg(3);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let samples: Vec<Sample> = (0..runs).map(|_| one_run(&rt)).collect();
    let idle = median((0..runs).map(|_| idle_rss(&rt)).collect());
    let steady = median(samples.iter().map(|s| s.steady_mb).collect());
    println!(
        "{} chunks, {UNFINISHED} unfinished (median of {runs}):\n\
         start → ready                     {:.3} s\n\
         start → every unfinished polled   {:.3} s\n\
         reading all chunk records         {:.3} s\n\
         peak RSS                          {:.1} MB\n\
         RSS once all have polled          {steady:.1} MB (idle daemon: {idle:.1} MB)\n\
         per tracked collection            {:.2} KB",
        chunks(),
        median(samples.iter().map(|s| s.ready).collect()),
        median(samples.iter().map(|s| s.all_polled).collect()),
        median(samples.iter().map(|s| s.read_all).collect()),
        median(samples.iter().map(|s| s.rss_mb).collect()),
        (steady - idle) * 1024.0 / UNFINISHED as f64,
    );
}
