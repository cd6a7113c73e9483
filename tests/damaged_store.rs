//! A damaged or stale state store, and a state directory that disappears
//! (`docs/durability.md`): the real binary against an emulator that outlives it, so the
//! emulator's ledger counts every trigger across the daemon's lives.
//!
//! - A store truncated to half, to zero, or with garbage written into it
//!   after a clean stop is refused (exit 1, the problem and `--recover`
//!   named) with no new trigger; `run --recover` then finishes the run
//!   without paying for any chunk twice.
//! - The state directory removed under a running daemon stops it within
//!   10 s, with no trigger after the removal.
//! - A `kill -9` loop in which the store is damaged between lives and the
//!   daemon restarted with `--recover`: no duplicate trigger, no lost input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{lines, sled_data_file, Harness};
use rand::{RngExt, SeedableRng};
use serde_json::Value;

#[derive(Clone, Copy, Debug)]
enum Damage {
    TruncateToHalf,
    TruncateToZero,
    Garbage,
}

fn damage(state: &Path, how: Damage) {
    let path = sled_data_file(state);
    let len = std::fs::metadata(&path).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    match how {
        Damage::TruncateToHalf => file.set_len(len / 2).unwrap(),
        Damage::TruncateToZero => file.set_len(0).unwrap(),
        Damage::Garbage => {
            // 32 bytes of garbage in the middle of the file.
            use std::os::unix::fs::FileExt;
            let garbage: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(97) ^ 0x5a).collect();
            file.write_all_at(&garbage, len / 2).unwrap();
        }
    }
    file.sync_all().unwrap();
}

const INPUTS: usize = 80;
const CHUNK: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Api {
    ScraperStudio,
    WebScraper,
    FirecrawlV1,
}

/// Every collection takes an hour to build: the tests move the emulator's
/// clock instead of waiting.
const LONG_BUILDS: &str = "[defaults]\nbuild_time = \"1h\"\n[firecrawl]\nbuild_time = \"1h\"\n";

fn write_job(h: &Harness, api: Api, key: &str) -> Vec<String> {
    let urls: Vec<String> = (0..INPUTS)
        .map(|i| format!("https://damaged.example.com/item/{i:05}"))
        .collect();
    std::fs::write(h.path("jobs").join("in.txt"), urls.join("\n") + "\n").unwrap();
    let head = match api {
        Api::ScraperStudio => format!("provider = \"scraper_studio\"\ncollector = \"{key}\"\n"),
        Api::WebScraper => format!("provider = \"web_scraper\"\ndataset_id = \"{key}\"\n"),
        Api::FirecrawlV1 => "provider = \"firecrawl\"\napi_version = \"v1\"\n".to_string(),
    };
    h.write_job(
        "long.toml",
        &format!("{head}inputs_file = \"in.txt\"\nchunk_size = {CHUNK}\nformats = [\"ndjson\"]\n"),
    );
    urls
}

/// The input a data or error row stands for, whatever the API.
fn input_of(row: &Value) -> String {
    [
        &row["input"]["url"],
        &row["metadata"]["sourceURL"],
        &row["url"],
    ]
    .into_iter()
    .find_map(Value::as_str)
    .unwrap_or_else(|| panic!("a row naming no input: {row}"))
    .to_string()
}

/// Ledger entries per chunk name, beyond the first.
fn duplicate_triggers(h: &Harness) -> usize {
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    for e in h.ledger() {
        *per.entry(e.name.clone().unwrap_or_default()).or_default() += 1;
    }
    per.values().map(|n| n - 1).sum()
}

/// Inputs with no data or error row and in no failed/expired chunk.
fn lost_inputs(h: &Harness, job: &str, urls: &[String]) -> usize {
    let run = h.run_dir(job);
    let manifest = common::read_json(&run.join("manifest.json"));
    let mut rows: BTreeMap<String, usize> = BTreeMap::new();
    for file in ["data.ndjson", "errors.ndjson"] {
        let path = run.join(file);
        if path.exists() {
            for line in lines(&path) {
                let row: Value = serde_json::from_str(&line).unwrap();
                *rows.entry(input_of(&row)).or_default() += 1;
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
    let doubled = rows.values().filter(|n| **n > 1).count();
    assert_eq!(doubled, 0, "inputs with rows twice");
    urls.iter()
        .filter(|u| !rows.contains_key(*u))
        .count()
        .saturating_sub(in_lost_chunks)
}

/// Four chunks triggered on a long build, then SIGTERM: a clean stop.
async fn four_chunks_triggered_then_stopped(h: &Harness) {
    let mut d = h.start_daemon().await;
    h.emulator
        .wait_for_ledger(INPUTS / CHUNK, common::WAIT)
        .await
        .unwrap();
    for _ in 0..INPUTS / CHUNK {
        d.wait_for_line("\"message\":\"triggered\"").await;
    }
    d.signal(15);
    assert_eq!(d.wait().await, 0, "a clean stop");
}

async fn a_damaged_store_is_refused_then_recovered(api: Api, how: Damage) {
    let h = Harness::new(LONG_BUILDS).await;
    let key = match api {
        Api::WebScraper => "gd_damaged001",
        _ => "c_damaged001",
    };
    let urls = write_job(&h, api, key);
    four_chunks_triggered_then_stopped(&h).await;
    assert_eq!(h.ledger().len(), 4);

    damage(&h.path("state"), how);
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(
        code, 1,
        "{api:?} {how:?}: the damaged store is refused: {stderr}"
    );
    assert!(
        stderr.contains("harvestd run --recover")
            && (stderr.contains("damaged") || stderr.contains("older than the state")),
        "{api:?} {how:?}: the problem and the way out are named: {stderr}"
    );
    assert_eq!(
        h.ledger().len(),
        4,
        "{api:?} {how:?}: no trigger from a damaged store"
    );
    // Refused again: the refusal changed nothing.
    let (code, _, _) = h.run_once().await;
    assert_eq!(code, 1, "{api:?} {how:?}: still refused without --recover");

    // The collections finish building; --recover settles each chunk at
    // the provider before any trigger and saves what it finds.
    h.emulator.advance(Duration::from_secs(2 * 3600));
    let (code, _, stderr) = h.run(&["run", "--once", "--recover"]).await;
    assert_eq!(
        h.ledger().len(),
        4,
        "{api:?} {how:?}: no chunk paid twice after --recover (4 chunks, 4 triggers): {stderr}"
    );
    assert_eq!(
        lost_inputs(&h, "long", &urls),
        0,
        "{api:?} {how:?}: no input lost"
    );
    let manifest = h.manifest("long");
    if api == Api::FirecrawlV1 {
        // Firecrawl v1 answers a used idempotency key with 409 and not the
        // batch's id: each chunk found to exist fails rather than pay twice.
        assert_eq!(code, 1, "{api:?} {how:?}: {stderr}");
        let failed = manifest["chunks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["state"] == "failed")
            .count();
        assert_eq!(failed, INPUTS / CHUNK, "{manifest}");
    } else {
        assert_eq!(
            code, 0,
            "{api:?} {how:?}: --recover finishes the run: {stderr}"
        );
        assert_eq!(manifest["state"], "complete");
    }

    // The recovered store is whole again: a plain start takes it and does
    // nothing new (the job's content is still marked as run).
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(
        code, 0,
        "{api:?} {how:?}: the recovered store opens: {stderr}"
    );
    assert_eq!(h.ledger().len(), 4, "{api:?} {how:?}: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_truncated_to_half_is_refused_and_recover_pays_nothing_twice() {
    a_damaged_store_is_refused_then_recovered(Api::ScraperStudio, Damage::TruncateToHalf).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_truncated_to_zero_is_refused_and_recover_pays_nothing_twice() {
    a_damaged_store_is_refused_then_recovered(Api::ScraperStudio, Damage::TruncateToZero).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_the_store_is_refused_and_recover_pays_nothing_twice() {
    a_damaged_store_is_refused_then_recovered(Api::ScraperStudio, Damage::Garbage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_scraper_recover_finds_each_snapshot_by_its_inputs() {
    a_damaged_store_is_refused_then_recovered(Api::WebScraper, Damage::TruncateToZero).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecrawl_v1_recover_fails_found_batches_rather_than_pay_twice() {
    a_damaged_store_is_refused_then_recovered(Api::FirecrawlV1, Damage::TruncateToHalf).await;
}

/// `cp -a`: a file the daemon removes during the copy (sled drops old
/// snapshot files) is left out, as `cp` would report and go on.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let Ok(entry) = entry else { continue };
        let path = entry.path();
        let target = to.join(entry.file_name());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else if let Err(e) = std::fs::copy(&path, &target) {
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::NotFound,
                "{}: {e}",
                path.display()
            );
        }
    }
}

/// `rm -rf`, run again while it fails on a file the daemon made during it
/// (sled makes its snapshot files as it likes): what an operator does.
fn remove_tree(dir: &Path) {
    for _ in 0..50 {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => continue,
            Err(e) => panic!("{}: {e}", dir.display()),
        }
    }
    panic!("{}: still not empty after 50 removals", dir.display());
}

#[derive(Clone, Copy, Debug)]
enum Gone {
    /// `rm -rf state`.
    Removed,
    /// `cp -a state state.new; rm -rf state; mv state.new state`: the
    /// inputs are still there, the lock file is a new one.
    Replaced,
}

/// The state directory removed or replaced under a running daemon: it
/// exits 1 within 10 s and triggers nothing more. One trigger every 5 s,
/// so the change falls between two of them and the next would be due
/// before 10 s.
async fn state_dir_gone_under_the_daemon(how: Gone) {
    let h = Harness::new(LONG_BUILDS).await;
    h.write_config("[limits.keys.\"c_removed001\"]\ntriggers_per_minute = 12\n");
    write_job(&h, Api::ScraperStudio, "c_removed001");
    let mut d = h.start_daemon().await;
    d.wait_for_line("\"message\":\"triggered\"").await;
    let before = h.ledger().len();
    let state = h.path("state");
    let changed = Instant::now();
    match how {
        Gone::Removed => remove_tree(&state),
        Gone::Replaced => {
            let copy = h.path("state.new");
            copy_dir(&state, &copy);
            remove_tree(&state);
            std::fs::rename(&copy, &state).unwrap();
        }
    }
    let exited = tokio::time::timeout(Duration::from_secs(15), d.child.wait()).await;
    let took = changed.elapsed();
    let after = h.ledger().len();
    if exited.is_err() {
        d.signal(9);
    }
    let (code, logs) = d.wait_all().await;
    assert!(
        exited.is_ok() && took < Duration::from_secs(10),
        "{how:?}: the daemon must stop within 10 s (still running after {took:?}; {} trigger(s) since)",
        after - before
    );
    assert_eq!(code, 1, "{how:?}: {}", logs.join("\n"));
    assert!(
        logs.iter()
            .any(|l| l.contains("removed or replaced under the running daemon")),
        "{how:?}: the problem is named: {}",
        logs.join("\n")
    );
    assert_eq!(
        after, before,
        "{how:?}: no trigger after the state directory was changed"
    );
    if let Gone::Removed = how {
        assert!(
            !state.exists(),
            "the daemon made its removed state directory again"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_dir_removed_under_the_daemon_stops_it_before_any_further_trigger() {
    state_dir_gone_under_the_daemon(Gone::Removed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_dir_replaced_under_the_daemon_stops_it_before_any_further_trigger() {
    state_dir_gone_under_the_daemon(Gone::Replaced).await;
}

/// The `kill -9` loop with the store damaged between lives: each damaged
/// life starts with `--recover`. Scraper Studio settles every doubt by the
/// chunk's name, so no chunk may be paid twice and no input lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loop_with_the_store_damaged_between_lives_pays_once_and_loses_nothing() {
    const LIVES: usize = 6;
    const LOOP_INPUTS: usize = 400;
    let h = Harness::new(
        "seed = 7\n[defaults]\nbuild_time = \"1500ms\"\nerror_every = 13\n\
         [[faults]]\nendpoint = \"trigger\"\nkind = \"lost_ack\"\nprobability = 0.15\n",
    )
    .await;
    let urls: Vec<String> = (0..LOOP_INPUTS)
        .map(|i| format!("https://damaged.example.com/loop/{i:05}"))
        .collect();
    std::fs::write(h.path("jobs").join("in.txt"), urls.join("\n") + "\n").unwrap();
    h.write_job(
        "loop.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_dmgloop001\"\ninputs_file = \"in.txt\"\n\
         chunk_size = 20\nformats = [\"ndjson\"]\n",
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let damages = [
        Damage::TruncateToHalf,
        Damage::Garbage,
        Damage::TruncateToZero,
    ];
    let mut damaged = false;
    let mut recoveries = 0;
    let mut logs: Vec<String> = Vec::new();
    for life in 0..LIVES {
        let args: &[&str] = if damaged {
            &["run", "--recover"]
        } else {
            &["run"]
        };
        let d = h.start_with(args).await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        d.signal(9);
        logs.extend(d.wait_all().await.1);
        // Every other life ends with its store damaged.
        damaged = life % 2 == 0;
        if damaged {
            damage(&h.path("state"), damages[(life / 2) % damages.len()]);
            recoveries += 1;
        }
    }
    let args: &[&str] = if damaged {
        &["run", "--once", "--recover"]
    } else {
        &["run", "--once"]
    };
    let (code, _, stderr) = h.run(args).await;
    assert!(code == 0 || code == 1, "the last life: {stderr}");
    logs.extend(stderr.lines().map(str::to_string));
    let count = |needle: &str| logs.iter().filter(|l| l.contains(needle)).count();
    let settled = count("in-doubt chunk settled: the collection exists\"");
    eprintln!(
        "lives {LIVES}, recoveries {recoveries}, recover starts {}, in-doubt settled as existing {settled}, \
         triggers {} for {} chunks",
        count("recover: started from what is left"),
        h.ledger().len(),
        LOOP_INPUTS / 20
    );
    assert_eq!(count("recover: started from what is left"), recoveries);
    assert!(
        settled > 0,
        "some recovered chunk was found at the provider, not triggered again"
    );
    assert_eq!(
        duplicate_triggers(&h),
        0,
        "no chunk paid twice: {:#?}",
        h.ledger()
            .iter()
            .map(|e| e.name.clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(lost_inputs(&h, "loop", &urls), 0, "no input lost: {stderr}");
}
