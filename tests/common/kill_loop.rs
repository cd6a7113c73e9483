//! The `kill -9` loop (crash-safety issue, item 4), shared by the CI test
//! (N = 20, debug binary) and the benchmark (N = 200, release binary):
//! a 5,000-input Scraper Studio job against the emulator with faults on
//! (lost acknowledgements, 5xx, 429, resets), the daemon killed with
//! SIGKILL at a random moment after each start, N times, then run to the
//! end. The report says what a skeptic asks: how many kills, how many
//! triggers were in doubt and how each was settled, duplicate triggers in
//! the ledger, lost inputs, and how long each restart took to be ready.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};
use serde_json::Value;

use super::{lines, Harness};

pub const INPUTS: usize = 5_000;
pub const CHUNK: usize = 100;

#[derive(Debug, Default)]
pub struct Report {
    pub kills: usize,
    /// Start to "state loaded; ready", one per start.
    pub ready: Vec<Duration>,
    /// Triggers whose outcome was unknown (lost answer, reset, 5xx, crash).
    pub in_doubt: usize,
    pub settled_found: usize,
    pub settled_not_created: usize,
    pub settled_unreachable: usize,
    pub chunks: usize,
    /// Ledger entries (paid collections).
    pub triggers: usize,
    /// Ledger entries beyond the first for the same chunk.
    pub duplicate_triggers: usize,
    /// Inputs with no row, no error row and no failed/expired chunk.
    pub lost_inputs: usize,
    /// Inputs whose rows appear more than once.
    pub doubled_inputs: usize,
    pub final_state: String,
    pub elapsed: Duration,
}

impl Report {
    pub fn ready_percentile(&self, p: f64) -> Duration {
        let mut v = self.ready.clone();
        v.sort();
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or_default()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "kills                 {}", self.kills)?;
        writeln!(
            f,
            "in-doubt triggers     {} (settled: {} found, {} not created, {} unreachable)",
            self.in_doubt, self.settled_found, self.settled_not_created, self.settled_unreachable
        )?;
        writeln!(
            f,
            "triggers              {} for {} chunks; duplicates {}",
            self.triggers, self.chunks, self.duplicate_triggers
        )?;
        writeln!(
            f,
            "lost inputs           {}; inputs with rows twice {}",
            self.lost_inputs, self.doubled_inputs
        )?;
        writeln!(
            f,
            "restart to ready      p50 {:?}, p99 {:?}, max {:?} over {} starts",
            self.ready_percentile(0.5),
            self.ready_percentile(0.99),
            self.ready.iter().max().copied().unwrap_or_default(),
            self.ready.len()
        )?;
        write!(
            f,
            "final run state       {} after {:?}",
            self.final_state, self.elapsed
        )
    }
}

/// Faults on every endpoint; the build time stretches with `kills` so the
/// job is still running when the last kill comes. The 429s hit triggers
/// only: random 429s on every call would get any client banned by the
/// emulator (25 in 5 minutes) over 200 restarts, each of which starts
/// with a fresh brake.
fn scenario(kills: usize, seed: u64) -> String {
    let build_ms = (kills as u64 * 150).max(1500);
    format!(
        r#"
seed = {seed}
[defaults]
build_time = "{build_ms}ms"
error_every = 13
early_404 = "100ms"
[[faults]]
endpoint = "trigger"
kind = "lost_ack"
probability = 0.15
[[faults]]
endpoint = "any"
kind = "status"
status = 502
body = "html"
probability = 0.05
[[faults]]
endpoint = "any"
kind = "status"
status = 503
body = "empty"
probability = 0.03
[[faults]]
endpoint = "any"
kind = "reset"
probability = 0.04
[[faults]]
endpoint = "trigger"
kind = "rate_limit"
retry_after = "seconds"
retry_after_secs = 1
probability = 0.1
"#
    )
}

fn count(lines: &[String], needle: &str) -> usize {
    lines.iter().filter(|l| l.contains(needle)).count()
}

pub async fn run(kills: usize, seed: u64) -> Report {
    let began = Instant::now();
    let h = Harness::new(&scenario(kills, seed)).await;
    let urls: Vec<String> = (0..INPUTS)
        .map(|i| format!("https://kill.example.com/item/{i:05}"))
        .collect();
    std::fs::write(h.path("jobs").join("in.txt"), urls.join("\n") + "\n").unwrap();
    h.write_job(
        "loop.toml",
        &format!(
            "provider = \"scraper_studio\"\ncollector = \"c_killloop01\"\ninputs_file = \"in.txt\"\n\
             chunk_size = {CHUNK}\nformats = [\"csv\", \"json\", \"ndjson\"]\n"
        ),
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut report = Report {
        chunks: INPUTS / CHUNK,
        ..Report::default()
    };
    let mut logs: Vec<String> = Vec::new();
    for _ in 0..kills {
        let started = Instant::now();
        let d = h.start_daemon().await;
        report.ready.push(started.elapsed());
        // A random moment in the daemon's life: mid-trigger, mid-poll,
        // mid-download or mid-write, whatever it is doing then.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..1200))).await;
        d.signal(9);
        let (_, seen) = d.wait_all().await;
        logs.extend(seen);
        report.kills += 1;
    }
    // Then to the end, whether the run finished under an earlier process or not.
    let (code, _, stderr) = h.run_once().await;
    assert!(
        code == 0 || code == 1,
        "run --once after the kills: {stderr}"
    );
    logs.extend(stderr.lines().map(str::to_string));

    report.in_doubt = count(&logs, "chunk is in doubt");
    report.settled_found = count(&logs, "in-doubt chunk settled: the collection exists\"");
    report.settled_not_created = count(&logs, "in-doubt chunk settled: the provider has no such");
    report.settled_unreachable = count(&logs, "cannot be reached");

    let ledger = h.ledger();
    report.triggers = ledger.len();
    let mut per_chunk: BTreeMap<String, usize> = BTreeMap::new();
    for e in &ledger {
        *per_chunk
            .entry(e.name.clone().unwrap_or_default())
            .or_default() += 1;
    }
    report.duplicate_triggers = per_chunk.values().map(|n| n - 1).sum();

    let run = h.run_dir("loop");
    let manifest_path = run.join("manifest.json");
    assert!(
        manifest_path.exists(),
        "the run did not finish after the kills (exit {code}):\n{}",
        stderr.lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );
    let manifest: Value = super::read_json(&manifest_path);
    report.final_state = manifest["state"].as_str().unwrap_or("?").to_string();
    let mut rows: BTreeMap<String, usize> = BTreeMap::new();
    for file in ["data.ndjson", "errors.ndjson"] {
        let path = run.join(file);
        if path.exists() {
            for line in lines(&path) {
                let row: Value = serde_json::from_str(&line).unwrap();
                let url = row["input"]["url"].as_str().unwrap().to_string();
                *rows.entry(url).or_default() += 1;
            }
        }
    }
    let in_lost_chunks: usize = manifest["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["state"] == "failed" || c["state"] == "expired")
        .map(|c| c["inputs"].as_u64().unwrap() as usize)
        .sum();
    let without_rows = urls.iter().filter(|u| !rows.contains_key(*u)).count();
    report.lost_inputs = without_rows.saturating_sub(in_lost_chunks);
    report.doubled_inputs = rows.values().filter(|n| **n > 1).count();
    report.elapsed = began.elapsed();
    report
}
