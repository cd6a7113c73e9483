//! The core pipeline end to end on Scraper Studio: the real binary against
//! the emulator, checking what users see (ledger, files, manifest, exit codes).

// Test helpers panic on purpose: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use common::{lines, read_json, Harness};
use serde_json::Value;

const SIGTERM: i32 = 15;
const SIGKILL: i32 = 9;

fn job(collector: &str, inputs_file: &str, chunk_size: u32) -> String {
    format!(
        "provider = \"scraper_studio\"\ncollector = \"{collector}\"\ninputs_file = \"{inputs_file}\"\n\
         chunk_size = {chunk_size}\nformats = [\"csv\", \"json\", \"ndjson\"]\n"
    )
}

fn urls_in(path: &std::path::Path) -> Vec<String> {
    let mut urls: Vec<String> = lines(path)
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["input"]["url"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    urls.sort();
    urls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_five_hundred_inputs_in_five_chunks() {
    let h = Harness::new("[defaults]\nbuild_time = \"100ms\"\n").await;
    h.write_inputs("speakers.csv", 2500);
    h.write_job("speakers.toml", &job("c_speakers01", "speakers.csv", 500));

    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");

    // Logs: JSON lines with the chunk's context as top-level fields.
    let mut triggered = 0;
    for line in stderr.lines().filter(|l| !l.starts_with("harvestd: ")) {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["message"] == "triggered" {
            assert_eq!(v["job"], "speakers", "{line}");
            assert!(v["run"].is_string() && v["chunk"].is_u64(), "{line}");
            assert!(v["remote_id"].as_str().unwrap().starts_with("j_"), "{line}");
            triggered += 1;
        }
    }
    assert_eq!(triggered, 5);
    // Not a terminal: progress comes as log lines with the same numbers.
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("\"message\":\"progress\"") && l.contains("\"chunks_total\":5")),
        "a progress line"
    );

    let ledger = h.ledger();
    assert_eq!(ledger.len(), 5, "exactly one trigger per chunk");
    assert!(ledger
        .iter()
        .all(|e| e.inputs == 500 && e.key == "c_speakers01"));
    let run = h.run_dir("speakers");
    let csv = lines(&run.join("data.csv"));
    assert_eq!(csv.len(), 2501, "header + 2,500 rows");
    assert!(csv[0].starts_with("input.url,url,title"), "{}", csv[0]);
    let json = read_json(&run.join("data.json"));
    assert_eq!(json.as_array().unwrap().len(), 2500);
    let mut urls = urls_in(&run.join("data.ndjson"));
    urls.dedup();
    assert_eq!(urls.len(), 2500, "every input once");
    let manifest = h.manifest("speakers");
    assert_eq!(manifest["state"], "complete");
    assert_eq!(manifest["inputs"], 2500);
    assert_eq!(manifest["rows"], 2500);
    assert_eq!(manifest["chunks"].as_array().unwrap().len(), 5);
    for c in manifest["chunks"].as_array().unwrap() {
        assert_eq!(c["state"], "downloaded");
        assert!(c["remote_id"].as_str().unwrap().starts_with("j_"));
    }
    assert!(run.join("_SUCCESS").exists());
    assert_eq!(
        std::fs::read_link(h.path("out/speakers/latest")).unwrap(),
        std::path::PathBuf::from(run.file_name().unwrap())
    );
    // Same content again: nothing new is triggered.
    let (code, _, _) = h.run_once().await;
    assert_eq!(code, 0);
    assert_eq!(h.ledger().len(), 5);
}

async fn restart_while_building(signal: i32) {
    let h = Harness::new("[defaults]\nbuild_time = \"1h\"\n").await;
    h.write_inputs("big.csv", 2500);
    h.write_job("big.toml", &job("c_restart01", "big.csv", 500));

    let mut daemon = h.start_daemon().await;
    h.emulator.wait_for_ledger(5, common::WAIT).await.unwrap();
    // Let at least one poll happen against a collection that is still building.
    daemon.wait_for_line("\"message\":\"triggered\"").await;
    daemon.signal(signal);
    let code = daemon.wait().await;
    if signal == SIGTERM {
        assert_eq!(code, 0, "SIGTERM drains and exits 0");
    }
    assert_eq!(h.ledger().len(), 5);
    assert!(
        !h.path("out/big").join("latest").exists(),
        "nothing finished before the restart"
    );

    // The collections finish while the daemon is down.
    h.emulator.advance(std::time::Duration::from_secs(2 * 3600));
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        h.ledger().len(),
        5,
        "the restart resumed polling; no new trigger"
    );
    assert_eq!(h.manifest("big")["state"], "complete");
    assert_eq!(lines(&h.run_dir("big").join("data.csv")).len(), 2501);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_building_then_restart_triggers_nothing_new() {
    restart_while_building(SIGTERM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_building_then_restart_triggers_nothing_new() {
    restart_while_building(SIGKILL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_row_collection_is_a_complete_empty_run() {
    let h = Harness::new(
        "[collectors.c_empty001]\nbuild_time = \"100ms\"\nzero_rows = true\n\
         building_reply = \"200_empty\"\nlog_keys = \"lower\"\n",
    )
    .await;
    h.write_inputs("few.csv", 7);
    h.write_job("empty.toml", &job("c_empty001", "few.csv", 5));
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");
    let run = h.run_dir("empty");
    assert_eq!(read_json(&run.join("data.json")), serde_json::json!([]));
    let m = h.manifest("empty");
    assert_eq!(
        (m["state"].as_str(), m["rows"].as_u64()),
        (Some("complete"), Some(0))
    );
    assert!(run.join("_SUCCESS").exists());
    assert_eq!(h.ledger().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_rows_go_to_errors_ndjson_only() {
    let h = Harness::new(
        "[collectors.c_errors01]\nbuild_time = \"50ms\"\nerror_every = 5\n\
         unknown_status_word = \"crunching\"\nbuilding_reply = \"202_collecting\"\n",
    )
    .await;
    h.write_inputs("in.csv", 50);
    h.write_job("errs.toml", &job("c_errors01", "in.csv", 20));
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");
    let run = h.run_dir("errs");
    let errors = lines(&run.join("errors.ndjson"));
    assert_eq!(errors.len(), 10);
    assert!(errors
        .iter()
        .all(|l| l.contains("\"error_code\":\"dead_page\"")));
    for file in ["data.ndjson", "data.csv"] {
        let text = std::fs::read_to_string(run.join(file)).unwrap();
        assert!(!text.contains("dead_page"), "{file} holds an error row");
    }
    assert_eq!(lines(&run.join("data.ndjson")).len(), 40);
    let m = h.manifest("errs");
    assert_eq!(
        (m["rows"].as_u64(), m["error_rows"].as_u64()),
        (Some(40), Some(10))
    );
    // Every input is accounted for: a data row or an error row.
    let mut all = urls_in(&run.join("data.ndjson"));
    all.extend(urls_in(&run.join("errors.ndjson")));
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_storm_of_5xx_resets_cut_bodies_and_lost_acks() {
    let h = Harness::new(
        r#"
seed = 11
[defaults]
build_time = "50ms"
row_bytes = 2000
dataset_lag_polls = 2
early_404 = "100ms"
[[faults]]
endpoint = "trigger"
kind = "lost_ack"
first = 2
[[faults]]
endpoint = "dataset"
kind = "truncate"
probability = 0.2
[[faults]]
endpoint = "any"
kind = "status"
status = 502
body = "html"
probability = 0.15
[[faults]]
endpoint = "any"
kind = "status"
status = 503
body = "empty"
probability = 0.1
[[faults]]
endpoint = "any"
kind = "reset"
probability = 0.1
[[faults]]
endpoint = "log"
kind = "html"
probability = 0.05
"#,
    )
    .await;
    h.write_inputs("storm.csv", 600);
    h.write_job("storm.toml", &job("c_storm0001", "storm.csv", 50));
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");
    let m = h.manifest("storm");
    assert_eq!(m["state"], "complete");
    let ledger = h.ledger();
    let mut names: Vec<_> = ledger.iter().map(|e| e.name.clone().unwrap()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 12, "every chunk triggered");
    assert_eq!(
        ledger.len(),
        12,
        "lost acknowledgements were settled, not re-triggered"
    );
    let mut urls = urls_in(&h.run_dir("storm").join("data.ndjson"));
    assert_eq!(urls.len(), 600);
    urls.dedup();
    assert_eq!(urls.len(), 600, "each input's row exactly once");
    assert!(
        stderr.contains("in doubt"),
        "lost acknowledgements were noticed"
    );
    assert!(
        stderr.contains("502 Bad Gateway"),
        "5xx answers were retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_and_stalled_bodies_are_downloaded_again_whole() {
    let h = Harness::new(
        r#"
[defaults]
build_time = "50ms"
row_bytes = 1500
[[faults]]
endpoint = "dataset"
kind = "truncate"
first = 2
[[faults]]
endpoint = "dataset"
kind = "stall"
delay = "300ms"
skip = 2
first = 1
"#,
    )
    .await;
    h.write_inputs("cut.csv", 200);
    h.write_job("cut.toml", &job("c_cutbody01", "cut.csv", 100));
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("dataset download cut"),
        "the cut bodies were noticed:\n{stderr}"
    );
    let run = h.run_dir("cut");
    let mut urls = urls_in(&run.join("data.ndjson"));
    assert_eq!(urls.len(), 200);
    urls.dedup();
    assert_eq!(urls.len(), 200, "no row twice from a half-saved part");
    assert_eq!(h.ledger().len(), 2);
    let parts: Vec<_> = std::fs::read_dir(run.join("parts"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(parts.len(), 2, "only finished part files remain: {parts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_storm_honours_retry_after_and_stays_under_the_ban() {
    let h = Harness::new(
        r#"
retry_after_slack = "5ms"
[defaults]
build_time = "50ms"
[[faults]]
endpoint = "any"
kind = "rate_limit"
retry_after = "seconds"
retry_after_secs = 1
first = 3
[[faults]]
endpoint = "any"
kind = "rate_limit"
retry_after = "date"
retry_after_secs = 2
skip = 6
first = 2
[[faults]]
endpoint = "any"
kind = "rate_limit"
retry_after = "none"
skip = 12
first = 2
"#,
    )
    .await;
    // One collection at a time: no call can be in flight when a 429 is sent,
    // so the emulator may count any request before the wait as early.
    h.write_config("[limits.keys.\"c_ratelim01\"]\nmax_in_flight = 1\n");
    h.write_inputs("rl.csv", 300);
    h.write_job("rl.toml", &job("c_ratelim01", "rl.csv", 50));
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(h.manifest("rl")["state"], "complete");
    assert_eq!(
        h.ledger().len(),
        6,
        "a 429 on a trigger created nothing; no double trigger"
    );
    let stats = h.emulator.stats();
    assert_eq!(stats.rate_limited, 7);
    assert_eq!(
        stats.early_requests, 0,
        "no request before a Retry-After had passed"
    );
    assert!(!stats.banned);
    assert!(stats.max_429_in_5min <= 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_chunk_fails_alone_and_the_run_is_partial() {
    // The collector wants a `keyword` on every input: the chunk without one
    // gets 422 and fails for good; the other chunk goes on.
    let h = Harness::new(
        "[collectors.c_strict001]\nbuild_time = \"50ms\"\ninput_fields = [\"url\", \"keyword\"]\n",
    )
    .await;
    let mut rows = String::new();
    for i in 0..4 {
        rows.push_str(&format!(
            "{{\"url\":\"https://a.example/{i}\",\"keyword\":\"k{i}\"}}\n"
        ));
    }
    for i in 4..8 {
        rows.push_str(&format!("{{\"url\":\"https://a.example/{i}\"}}\n"));
    }
    std::fs::write(h.path("jobs/strict.ndjson"), rows).unwrap();
    h.write_job("strict.toml", &job("c_strict001", "strict.ndjson", 4));
    let (code, _, _) = h.run_once().await;
    assert_eq!(code, 1, "a partial run makes --once exit 1");
    let m = h.manifest("strict");
    assert_eq!(m["state"], "partial");
    let chunks = m["chunks"].as_array().unwrap();
    assert_eq!(chunks[0]["state"], "downloaded");
    assert_eq!(chunks[1]["state"], "failed");
    assert!(
        chunks[1]["error"].as_str().unwrap().contains("422"),
        "{}",
        chunks[1]["error"]
    );
    assert!(!h.run_dir("strict").join("_SUCCESS").exists());
    assert!(
        !h.path("out/strict/latest").exists(),
        "latest only points at complete runs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_token_blocks_the_provider_and_fails_nothing() {
    let mut h = Harness::new("[defaults]\nbuild_time = \"50ms\"\n").await;
    h.token = "wrong-token".into();
    h.write_inputs("in.csv", 10);
    h.write_job("blocked.toml", &job("c_blocked01", "in.csv", 5));
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("Invalid credentials"), "{stderr}");
    assert!(h.ledger().is_empty());
    assert!(!h.path("out/blocked").join("latest").exists());

    // With the right token the same run finishes: nothing had failed.
    h.token = harvestd::emulator::DEMO_BRIGHTDATA_TOKEN.into();
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(h.manifest("blocked")["state"], "complete");
    assert_eq!(h.ledger().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_state_dir_exits_75() {
    let h = Harness::new("").await;
    let daemon = h.start_daemon().await;
    // A job the second daemon would trigger at once if it went ahead.
    h.write_inputs("in.csv", 3);
    h.write_job("second.toml", &job("c_second001", "in.csv", 5));
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 75, "{stderr}");
    assert!(stderr.contains("state directory"), "{stderr}");
    assert!(
        !stderr.contains("state loaded") && !stderr.contains("run planned"),
        "{stderr}"
    );
    daemon.signal(SIGTERM);
    assert_eq!(daemon.wait().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_sharing_a_collector_share_its_limits() {
    let h = Harness::new("[defaults]\nbuild_time = \"300ms\"\n").await;
    // 10 triggers a second for this key, at most 3 collections in flight.
    h.write_config("[limits.keys.\"c_shared001\"]\nmax_in_flight = 3\ntriggers_per_minute = 600\n");
    h.write_inputs("a.csv", 40);
    h.write_inputs("b.csv", 40);
    h.write_job("a.toml", &job("c_shared001", "a.csv", 10));
    h.write_job("b.toml", &job("c_shared001", "b.csv", 10));
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(h.manifest("a")["state"], "complete");
    assert_eq!(h.manifest("b")["state"], "complete");
    let stats = h.emulator.stats();
    assert_eq!(
        stats.max_in_flight["c_shared001"], 3,
        "the cap was reached and never passed"
    );
    let mut times: Vec<i64> = h.ledger().iter().map(|e| e.time).collect();
    assert_eq!(times.len(), 8);
    times.sort();
    let min_gap = times.windows(2).map(|w| w[1] - w[0]).min().unwrap();
    // Triggers are 100 ms apart; half that allows for loopback jitter and
    // still catches any burst.
    assert!(min_gap >= 50, "triggers {min_gap} ms apart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_daemon_picks_up_renamed_files_and_changed_inputs() {
    let h = Harness::new("[defaults]\nbuild_time = \"50ms\"\n").await;
    let mut daemon = h.start_daemon().await;
    // Written under a temporary name, then renamed in: the documented way.
    h.write_inputs("drop.csv", 30);
    h.write_job("drop.toml.tmp", &job("c_dropped01", "drop.csv", 10));
    std::fs::rename(h.path("jobs/drop.toml.tmp"), h.path("jobs/drop.toml")).unwrap();
    daemon.wait_for_line("run complete").await;
    assert_eq!(h.ledger().len(), 3);

    // New inputs under the same job file: new content, a new run.
    h.write_inputs("drop.csv", 40);
    daemon.wait_for_line("run complete").await;
    assert_eq!(h.ledger().len(), 7);
    let runs = std::fs::read_dir(h.path("out/drop")).unwrap().count();
    assert_eq!(runs, 3, "two run directories and latest");
    daemon.signal(SIGTERM);
    assert_eq!(daemon.wait().await, 0);
}

/// Polling learns a collector's build time (README "Polling"): once one
/// build has been seen, later collections of that collector skip the polls
/// that could only have answered "building", in the same run and, from the
/// store, in the next process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_learns_the_build_time_and_asks_less() {
    let h = Harness::new("[defaults]\nbuild_time = \"1500ms\"\n").await;
    // One collection at a time, so each one can learn from the one before.
    h.write_config("[limits.keys.\"c_learn01\"]\nmax_in_flight = 1\n");
    h.write_inputs("a.csv", 3);
    h.write_job("a.toml", &job("c_learn01", "a.csv", 1));
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");
    h.write_inputs("b.csv", 1);
    h.write_job("b.toml", &job("c_learn01", "b.csv", 1));
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");

    let mut collections = h.emulator.collections();
    collections.sort_by_key(|c| c.triggered_ms);
    let polls: Vec<u32> = collections.iter().map(|c| c.status_polls).collect();
    assert_eq!(polls.len(), 4);
    // The first build is polled by the tenth rule alone (~30 times at a
    // 20 ms floor); the others, expected, about a third as often.
    for (i, &p) in polls.iter().enumerate().skip(1) {
        assert!(
            p * 2 <= polls[0],
            "collection {i} polled {p} times: {polls:?}"
        );
    }
    for c in &collections {
        let late = c.fetched_ms.expect("fetched") - c.ready_ms;
        // Never later than the 200 ms cap (+10 % jitter) and the call itself.
        assert!(
            late <= 400,
            "{} fetched {late} ms after ready: {polls:?}",
            c.id
        );
    }
}
