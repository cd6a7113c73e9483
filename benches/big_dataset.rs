//! Benchmark: one big dataset (N rows of ~1 KB, one collection) from the
//! emulator, downloaded, saved as a part file and written as `data.csv` and
//! `data.json` by the release binary's `run --once`. Reports, median of
//! RUNS per size: wall time, MB/s of JSON, CPU time, peak RSS (GNU time),
//! and the yardstick measured in the same run: CPU time of streaming the
//! same bytes (the saved `data.ndjson`) through serde_json alone, and the
//! ratio of harvestd's CPU time to it (target ≤ 3).
//!
//! `cargo bench --bench big_dataset [-- RUNS]` (default 3);
//! `HARVESTD_BENCH_ROWS=100000,1000000` sets the sizes (the default).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::BufRead;
use std::process::Command;
use std::time::Instant;

use harvestd::emulator::{Emulator, Scenario, DEMO_BRIGHTDATA_TOKEN};

fn sizes() -> Vec<usize> {
    std::env::var("HARVESTD_BENCH_ROWS")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| vec![100_000, 1_000_000])
}

struct Sample {
    wall: f64,
    cpu: f64,
    rss_mb: f64,
    json_mb: f64,
    yardstick_cpu: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// CPU seconds this process has used (user + system), from /proc.
fn own_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    // utime and stime are fields 14 and 15 (1-based), 12 and 13 after ")".
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// The yardstick: stream the bytes through serde_json, one value per line,
/// as a tool that only parses would; returns CPU seconds.
fn yardstick(path: &std::path::Path) -> f64 {
    let start = own_cpu();
    let file = std::io::BufReader::with_capacity(256 * 1024, std::fs::File::open(path).unwrap());
    let mut n = 0usize;
    for line in file.split(b'\n') {
        let line = line.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        n += usize::from(v.is_object());
    }
    assert!(n > 0);
    own_cpu() - start
}

fn one_run(rt: &tokio::runtime::Runtime, rows: usize) -> Sample {
    let scenario: Scenario = toml::from_str(&format!(
        "[defaults]\nbuild_time = \"0s\"\nrows_per_input = {rows}\nrow_bytes = 1000\n"
    ))
    .unwrap();
    let emulator = rt
        .block_on(Emulator::start(([127, 0, 0, 1], 0).into(), scenario))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let jobs = dir.path().join("jobs");
    std::fs::create_dir_all(&jobs).unwrap();
    std::fs::write(
        jobs.join("big.toml"),
        "provider = \"scraper_studio\"\ncollector = \"c_bigdata001\"\n\
         inputs = [{url = \"https://big.example/catalog\"}]\nformats = [\"csv\", \"json\"]\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("harvestd.toml"),
        "admin_listen = \"off\"\n[limits]\npoll_min_interval = \"100ms\"\npoll_max_interval = \"200ms\"\n",
    )
    .unwrap();
    let began = Instant::now();
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
    let _ = began;
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
    let run = dir.path().join("out/big/latest");
    let part = run.join("parts/chunk-000000.ndjson");
    let json_bytes = std::fs::metadata(&part).unwrap().len();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["rows"], rows, "every row saved");
    let yardstick_cpu = yardstick(&part);
    drop(emulator);
    Sample {
        wall: f[0],
        cpu: f[1] + f[2],
        rss_mb: f[3] / 1024.0,
        json_mb: json_bytes as f64 / 1e6,
        yardstick_cpu,
    }
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3);
    let rt = tokio::runtime::Runtime::new().unwrap();
    println!("rows      MB_json  wall_s  MB/s   cpu_s  serde_cpu_s  cpu_ratio  peak_rss_mb   (median of {runs})");
    for rows in sizes() {
        let samples: Vec<Sample> = (0..runs).map(|_| one_run(&rt, rows)).collect();
        let wall = median(samples.iter().map(|s| s.wall).collect());
        let cpu = median(samples.iter().map(|s| s.cpu).collect());
        let yard = median(samples.iter().map(|s| s.yardstick_cpu).collect());
        let ratio = median(samples.iter().map(|s| s.cpu / s.yardstick_cpu).collect());
        let rss = median(samples.iter().map(|s| s.rss_mb).collect());
        let mb = samples[0].json_mb;
        println!(
            "{rows:>8} {mb:>8.0} {wall:>7.2} {:>6.0} {cpu:>7.2} {yard:>12.2} {ratio:>10.2} {rss:>12.1}",
            mb / wall
        );
    }
}
