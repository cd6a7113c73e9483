//! Benchmark: `harvestd run --once` over N inputs × 1 row of ~1 KB, emulator
//! build time 0. Reports wall time, CPU time and peak RSS (GNU time) for each
//! N, median of several runs, and the RSS ratio between the sizes: memory must
//! not grow with the data.
//!
//! `cargo bench --bench pipeline [-- RUNS]` (default 3 runs per size).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use harvestd::emulator::{Emulator, Scenario, DEMO_BRIGHTDATA_TOKEN};

/// Input counts measured; `HARVESTD_BENCH_SIZES=10000,300000` overrides.
fn sizes() -> Vec<usize> {
    std::env::var("HARVESTD_BENCH_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| v.len() >= 2)
        .unwrap_or_else(|| vec![10_000, 100_000])
}

struct Sample {
    wall: f64,
    cpu: f64,
    rss_mb: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn one_run(rt: &tokio::runtime::Runtime, inputs: usize) -> Sample {
    let scenario: Scenario =
        toml::from_str("[defaults]\nbuild_time = \"0s\"\nrow_bytes = 1000\n").unwrap();
    let emulator = rt
        .block_on(Emulator::start(([127, 0, 0, 1], 0).into(), scenario))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let jobs = dir.path().join("jobs");
    std::fs::create_dir_all(&jobs).unwrap();
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
        "admin_listen = \"off\"\n[limits]\nmax_in_flight = 10\ntriggers_per_minute = 6000\n\
         requests_per_second = 200\npoll_min_interval = \"100ms\"\npoll_max_interval = \"500ms\"\n",
    )
    .unwrap();
    let out = Command::new("/usr/bin/time")
        .args([
            "-f",
            "BENCH %e %U %S %M",
            env!("CARGO_BIN_EXE_harvestd"),
            "run",
            "--once",
        ])
        .arg("--config")
        .arg(dir.path().join("harvestd.toml"))
        .current_dir(dir.path())
        .env("HARVESTD_BRIGHTDATA_URL", emulator.url())
        .env("BRIGHT_DATA_API_TOKEN", DEMO_BRIGHTDATA_TOKEN)
        .env("HARVESTD_LOG_FORMAT", "json")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "run failed:\n{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("BENCH "))
        .expect("GNU time output");
    let f: Vec<f64> = line[6..]
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    let rows = std::fs::read_to_string(dir.path().join("out/bench/latest/data.ndjson"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(rows, inputs, "every input became a row");
    assert_eq!(emulator.ledger().len(), inputs.div_ceil(1000));
    drop(emulator);
    Sample {
        wall: f[0],
        cpu: f[1] + f[2],
        rss_mb: f[3] / 1024.0,
    }
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3);
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
