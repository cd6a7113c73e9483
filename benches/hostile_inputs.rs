//! Benchmark: an inputs file without newlines. Reports, median of RUNS:
//!
//! - peak RSS and wall time of `harvestd validate` on a job whose inputs
//!   file is 1 GB with no newline (a sparse file, as `truncate -s 1G`
//!   makes), against `validate` of a one-input job in the same run: the
//!   1 MiB cap per line must keep the first near the second;
//! - a daemon with that job beside a good one: time from start to the good
//!   job's first trigger, against a daemon with the good job alone, in the
//!   same run: the big file must not hold the good job up.
//!
//! `cargo bench --bench hostile_inputs [-- RUNS]` (default 3);
//! `HARVESTD_BENCH_BYTES` sets the size of the file (default 1 GiB).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

#[path = "support/mod.rs"]
mod support;
use support::median;

const GOOD: &str = "provider = \"scraper_studio\"\ncollector = \"c_good\"\ninputs = [{url = \"https://good.example/\"}]\n";
const BIG: &str =
    "provider = \"scraper_studio\"\ncollector = \"c_big\"\ninputs_file = \"big.txt\"\n";

fn bytes() -> u64 {
    std::env::var("HARVESTD_BENCH_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 30)
}

/// (wall seconds, peak RSS MB) of `harvestd validate FILE`, by GNU time.
fn validate(file: &Path) -> (f64, f64) {
    let out = Command::new("/usr/bin/time")
        .args([
            "-f",
            "BENCH %e %M",
            env!("CARGO_BIN_EXE_harvestd"),
            "validate",
        ])
        .arg(file)
        .output()
        .expect("GNU time (/usr/bin/time) runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.starts_with("BENCH "))
        .unwrap_or_else(|| panic!("no GNU time line in:\n{stderr}"));
    let f: Vec<f64> = line[6..]
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    (f[0], f[1] / 1024.0)
}

/// Seconds from a daemon's start to the good job's first trigger.
fn first_good_trigger(rt: &tokio::runtime::Runtime, with_big: bool) -> f64 {
    let (emulator, dir, jobs) = support::setup(rt, "");
    std::fs::write(jobs.join("good.toml"), GOOD).unwrap();
    if with_big {
        std::fs::File::create(jobs.join("big.txt"))
            .unwrap()
            .set_len(bytes())
            .unwrap();
        // Sorted first: a daemon that read job by job would read it first.
        std::fs::write(jobs.join("a-big.toml"), BIG).unwrap();
    }
    support::write_config(dir.path(), "");
    let elapsed = support::until_first_trigger(rt, dir.path(), &emulator, |_| {});
    assert!(emulator.ledger().iter().all(|e| e.key == "c_good"));
    elapsed
}

fn main() {
    let runs = support::runs_arg(3);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("big.txt"))
        .unwrap()
        .set_len(bytes())
        .unwrap();
    std::fs::write(dir.path().join("big.toml"), BIG).unwrap();
    std::fs::write(dir.path().join("good.toml"), GOOD).unwrap();

    let mut big = Vec::new();
    let mut small = Vec::new();
    let mut beside = Vec::new();
    let mut alone = Vec::new();
    for _ in 0..runs {
        big.push(validate(&dir.path().join("big.toml")));
        small.push(validate(&dir.path().join("good.toml")));
        beside.push(first_good_trigger(&rt, true));
        alone.push(first_good_trigger(&rt, false));
    }
    let m = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| median(v.iter().map(f).collect());
    println!(
        "{} MB inputs file without a newline (median of {runs}):\n\
         validate: peak RSS {:.1} MB, {:.3} s   (a one-input job: {:.1} MB, {:.3} s)\n\
         daemon: a good job beside it triggered after {:.3} s   (alone: {:.3} s)",
        bytes() >> 20,
        m(&big, |s| s.1),
        m(&big, |s| s.0),
        m(&small, |s| s.1),
        m(&small, |s| s.0),
        median(beside),
        median(alone),
    );
}
