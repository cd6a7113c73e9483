//! Benchmark: what a hostile provider costs (issue #16 items 4 and 5).
//! Three figures, each from one `harvestd run --once` against the
//! emulator:
//!
//! - downloads of a 5-row dataset with one row that is not UTF-8, within
//!   20 s (one when the row is kept as a malformed row; the old daemon
//!   retried the whole dataset without end);
//! - peak RSS of the daemon for a dataset holding one row of
//!   `HARVESTD_BENCH_ROW_MB` MB (default 500), and how long it took;
//! - the most bytes on disk while an endless dataset is downloaded, over
//!   5 s, with `max_dataset_bytes = "8MiB"`.
//!
//! `cargo bench --bench hostile_provider`

// A benchmark is a measuring process, not the daemon: it sleeps through its
// measurement windows and between samples, and exits with its verdict.
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/mod.rs"]
mod support;

use harvestd::emulator::{Emulator, DEMO_BRIGHTDATA_TOKEN};

const JOB: &str = "provider = \"scraper_studio\"\ncollector = \"c_hostile0001\"\n\
                   inputs_file = \"in.csv\"\nchunk_size = 5\nformats = [\"ndjson\"]\n";

/// `run --once` of the built binary in `dir`, started, not awaited.
fn start(dir: &Path, emulator: &Emulator) -> Child {
    Command::new(env!("CARGO_BIN_EXE_harvestd"))
        .args(["run", "--once", "--config"])
        .arg(dir.join("harvestd.toml"))
        .current_dir(dir)
        .env("HARVESTD_BRIGHTDATA_URL", emulator.url())
        .env("BRIGHT_DATA_API_TOKEN", DEMO_BRIGHTDATA_TOKEN)
        .env("HARVESTD_LOG_FORMAT", "json")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A job of 5 inputs under `scenario`, with `extra` config.
fn prepare(
    rt: &tokio::runtime::Runtime,
    scenario: &str,
    extra: &str,
) -> (Emulator, tempfile::TempDir) {
    let (emulator, dir, jobs) = support::setup(rt, scenario);
    let urls: String = (0..5)
        .map(|i| format!("https://site.example/{i}\n"))
        .collect();
    std::fs::write(jobs.join("in.csv"), format!("url\n{urls}")).unwrap();
    std::fs::write(jobs.join("hostile.toml"), JOB).unwrap();
    support::write_config(
        dir.path(),
        &format!("[limits]\nbackoff_base = \"10ms\"\nbackoff_cap = \"200ms\"\npoll_min_interval = \"20ms\"\npoll_max_interval = \"200ms\"\n{extra}"),
    );
    (emulator, dir)
}

fn dir_bytes(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let requests = |e: &Emulator| e.stats().requests.get("dataset").copied().unwrap_or(0);

    let (emulator, dir) = prepare(
        &rt,
        "[defaults]\nbuild_time = \"50ms\"\nmalformed_row = \"invalid_utf8\"\n",
        "",
    );
    let mut child = start(dir.path(), &emulator);
    let begin = Instant::now();
    while begin.elapsed() < Duration::from_secs(20) && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    println!(
        "one malformed row: {} download(s) of the dataset",
        requests(&emulator)
    );

    let row_mb: usize = std::env::var("HARVESTD_BENCH_ROW_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let (emulator, dir) = prepare(
        &rt,
        &format!(
            "[defaults]\nbuild_time = \"50ms\"\nmalformed_row = \"huge\"\nhuge_row_bytes = {}\n",
            row_mb * 1_000_000
        ),
        "",
    );
    let mut child = start(dir.path(), &emulator);
    let pid = child.id().to_string();
    let begin = Instant::now();
    let mut peak = 0.0f64;
    while child.try_wait().unwrap().is_none() && begin.elapsed() < Duration::from_secs(120) {
        peak = peak.max(support::peak_mb(&pid));
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    println!(
        "one {row_mb} MB row: peak RSS {peak:.0} MB, {:.1} s",
        begin.elapsed().as_secs_f64()
    );

    let (emulator, dir) = prepare(
        &rt,
        "[defaults]\nbuild_time = \"50ms\"\n[[faults]]\nendpoint = \"dataset\"\nkind = \"endless\"\ndelay = \"0s\"\nprobability = 1.0\n",
        "max_dataset_bytes = \"8MiB\"\n",
    );
    let mut child = start(dir.path(), &emulator);
    let begin = Instant::now();
    let mut most = 0;
    while begin.elapsed() < Duration::from_secs(5) && child.try_wait().unwrap().is_none() {
        most = most.max(dir_bytes(&dir.path().join("out")));
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    println!(
        "endless dataset: at most {:.1} MB on disk; {} download(s)",
        most as f64 / 1e6,
        requests(&emulator)
    );
}
