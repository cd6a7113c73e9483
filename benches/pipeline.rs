//! Benchmark: `harvestd run --once` over N inputs × 1 row of ~1 KB, emulator
//! build time 0. Reports wall time, CPU time and peak RSS (GNU time) for each
//! N, median of several runs, and the RSS ratio between the sizes: memory must
//! not grow with the data.
//!
//! `cargo bench --bench pipeline [-- RUNS]` (default 3 runs per size).

// A benchmark is a measuring process, not the daemon: it sleeps through its
// measurement windows and between samples, and exits with its verdict.
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

#[path = "support/mod.rs"]
mod support;
use support::median;

/// Input counts measured; `HARVESTD_BENCH_SIZES=10000,300000` overrides.
fn sizes() -> Vec<usize> {
    Some(support::sizes_from(
        "HARVESTD_BENCH_SIZES",
        &[10_000, 100_000],
    ))
    .filter(|v| v.len() >= 2)
    .unwrap_or_else(|| vec![10_000, 100_000])
}

struct Sample {
    wall: f64,
    cpu: f64,
    rss_mb: f64,
}

fn one_run(rt: &tokio::runtime::Runtime, inputs: usize) -> Sample {
    let (emulator, dir, jobs) =
        support::setup(rt, "[defaults]\nbuild_time = \"0s\"\nrow_bytes = 1000\n");
    let mut csv = String::with_capacity(inputs * 40);
    csv.push_str("url\n");
    for i in 0..inputs {
        csv.push_str(&format!("https://bench.example/item/{i}\n"));
    }
    std::fs::write(jobs.join("bench.csv"), csv).unwrap();
    std::fs::write(
        jobs.join("bench.toml"),
        "provider = \"scraper_studio\"\ncollector = \"c_bench00001\"\ninputs_file = \"bench.csv\"\n\
         chunk_size = 1000\nformats = [\"csv\", \"json\", \"ndjson\"]\n",
    )
    .unwrap();
    // Etiquette limits raised so the figure measures harvestd, not its pacing.
    std::fs::write(
        dir.path().join("harvestd.toml"),
        "admin_listen = \"off\"\nintake_settle = \"0s\"\n[limits]\nmax_in_flight = 10\ntriggers_per_minute = 6000\n\
         requests_per_second = 200\npoll_min_interval = \"100ms\"\npoll_max_interval = \"500ms\"\n",
    )
    .unwrap();
    let t = support::run_once_timed(dir.path(), &emulator);
    let rows = std::fs::read_to_string(dir.path().join("out/bench/latest/data.ndjson"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(rows, inputs, "every input became a row");
    assert_eq!(emulator.ledger().len(), inputs.div_ceil(1000));
    drop(emulator);
    Sample {
        wall: t.wall,
        cpu: t.cpu(),
        rss_mb: t.rss_mb,
    }
}

fn main() {
    let runs = support::runs_arg(3);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut rss = Vec::new();
    println!("inputs   wall_s  cpu_s  peak_rss_mb  MB/s   (median of {runs})");
    let sizes = sizes();
    for &n in &sizes {
        let samples: Vec<Sample> = (0..runs).map(|_| one_run(&rt, n)).collect();
        let wall = median(samples.iter().map(|s| s.wall).collect());
        let cpu = median(samples.iter().map(|s| s.cpu).collect());
        let peak = median(samples.iter().map(|s| s.rss_mb).collect());
        let mb = n as f64 * 1000.0 / 1e6;
        println!(
            "{n:>7} {wall:>7.2} {cpu:>6.2} {peak:>12.1} {:>6.1}",
            mb / wall
        );
        rss.push(peak);
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "peak RSS ratio {}/{}: {:.2}",
        sizes[sizes.len() - 1],
        sizes[0],
        rss[rss.len() - 1] / rss[0]
    );
}
