//! Benchmark: a huge inputs file. A 1,000,000-URL `.txt` inputs file (35 MB)
//! is dropped in the jobs directory of a fresh release daemon; reports,
//! median of RUNS: time from start until the emulator has recorded the
//! first trigger (target ≤ 5 s: validation with the duplicate check, the
//! plan of 1,000 chunks and their inputs in the store, the first call), and
//! the daemon's peak RSS by then (target ≤ 200 MB). A yardstick measured
//! in the same run: reading the file line by line into a set of hashes,
//! the least any duplicate check can do.
//!
//! `cargo bench --bench huge_inputs [-- RUNS]` (default 3);
//! `HARVESTD_BENCH_INPUTS` sets the number of URLs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::BufRead;
use std::time::Instant;

#[path = "support/mod.rs"]
mod support;
use support::median;

fn inputs() -> usize {
    std::env::var("HARVESTD_BENCH_INPUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

struct Sample {
    first_trigger: f64,
    peak_mb: f64,
    yardstick: f64,
}

fn one_run(rt: &tokio::runtime::Runtime) -> Sample {
    // Builds never finish within the run: only planning and triggering count.
    let (emulator, dir, jobs) = support::setup(rt, "[collectors.c_huge]\nbuild_time = \"30m\"\n");
    let n = inputs();
    let mut urls = String::with_capacity(n * 40);
    for i in 0..n {
        urls.push_str(&format!("https://huge.example.com/item/{i}\n"));
    }
    let file = jobs.join("huge.txt");
    std::fs::write(&file, urls).unwrap();
    // The yardstick, on the same (now cached) file.
    let start = Instant::now();
    let mut seen = std::collections::HashSet::with_capacity(n);
    for line in std::io::BufReader::new(std::fs::File::open(&file).unwrap())
        .lines()
        .map_while(Result::ok)
    {
        seen.insert(hash_line(&line));
    }
    assert_eq!(seen.len(), n);
    let yardstick = start.elapsed().as_secs_f64();
    std::fs::write(
        jobs.join("huge.toml"),
        "provider = \"scraper_studio\"\ncollector = \"c_huge\"\ninputs_file = \"huge.txt\"\nchunk_size = 1000\n",
    )
    .unwrap();
    support::write_config(dir.path(), "");
    let mut peak_mb = 0.0;
    let first_trigger = support::until_first_trigger(rt, dir.path(), &emulator, |pid| {
        peak_mb = support::peak_mb(pid)
    });
    Sample {
        first_trigger,
        peak_mb,
        yardstick,
    }
}

/// A 64-bit hash of a line (what a duplicate check keeps per input).
fn hash_line(line: &str) -> u64 {
    use std::hash::{BuildHasher, RandomState};
    thread_local!(static STATE: RandomState = RandomState::new());
    STATE.with(|s| s.hash_one(line))
}

fn main() {
    let runs = support::runs_arg(3);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let samples: Vec<Sample> = (0..runs).map(|_| one_run(&rt)).collect();
    let m = |f: &dyn Fn(&Sample) -> f64| median(samples.iter().map(f).collect());
    println!(
        "{} inputs, 1,000 per chunk (median of {runs}):\n\
         start → first trigger received    {:.2} s (each run: {})\n\
         peak RSS by then                  {:.1} MB\n\
         yardstick: read + hash every line {:.2} s",
        inputs(),
        m(&|s| s.first_trigger),
        samples
            .iter()
            .map(|s| format!("{:.2}", s.first_trigger))
            .collect::<Vec<_>>()
            .join(", "),
        m(&|s| s.peak_mb),
        m(&|s| s.yardstick),
    );
}
