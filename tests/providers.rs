//! The Web Scraper API and Firecrawl behind the same job model: the real
//! binary against the emulator, end to end, with the faults each API has.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::{lines, read_json, Harness};
use serde_json::Value;

const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;

fn rows(path: &Path) -> Vec<Value> {
    lines(path)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn web_scraper_job(dataset: &str, inputs_file: &str, chunk_size: u32, extra: &str) -> String {
    format!(
        "provider = \"web_scraper\"\ndataset_id = \"{dataset}\"\ninputs_file = \"{inputs_file}\"\n\
         chunk_size = {chunk_size}\nformats = [\"csv\", \"json\", \"ndjson\"]\n{extra}"
    )
}

fn firecrawl_job(inputs_file: &str, chunk_size: u32, extra: &str) -> String {
    format!(
        "provider = \"firecrawl\"\ninputs_file = \"{inputs_file}\"\nchunk_size = {chunk_size}\n\
         formats = [\"json\", \"ndjson\"]\n{extra}"
    )
}

fn write_urls(h: &Harness, name: &str, urls: &[String]) {
    std::fs::write(h.path("jobs").join(name), urls.join("\n") + "\n").unwrap();
}

fn doc_urls(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("https://docs.example.com/p/{i:05}"))
        .collect()
}

/// The `sourceURL` of every document, in file order.
fn source_urls(docs: &[Value]) -> Vec<String> {
    docs.iter()
        .map(|d| d["metadata"]["sourceURL"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_scraper_end_to_end_with_error_records_params_and_a_refused_whole_download() {
    // A whole download over 100 records is refused (the 5 GB cap, scaled
    // down), so the daemon must switch to parts by itself.
    let h = Harness::new(
        "[collectors.gd_reviews0001]\nbuild_time = \"100ms\"\nerror_every = 10\n\
         whole_download_max_records = 100\nprogress_word = \"collecting\"\n",
    )
    .await;
    h.write_inputs("in.csv", 2500);
    h.write_job(
        "reviews.toml",
        &web_scraper_job(
            "gd_reviews0001",
            "in.csv",
            1000,
            "[params]\ntype = \"discover_new\"\ndiscover_by = \"keyword\"\nlimit_per_input = 2\n",
        ),
    );
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");

    let ledger = h.ledger();
    assert_eq!(ledger.len(), 3, "one snapshot per chunk");
    for entry in &ledger {
        assert_eq!(entry.provider, "web_scraper");
        let p = &entry.params;
        assert_eq!(p["dataset_id"], "gd_reviews0001");
        assert_eq!(p["include_errors"], "true", "on by default");
        assert_eq!(p["type"], "discover_new");
        assert_eq!(p["discover_by"], "keyword");
        assert_eq!(p["limit_per_input"], "2");
    }
    let run = h.run_dir("reviews");
    let data = rows(&run.join("data.ndjson"));
    let errors = rows(&run.join("errors.ndjson"));
    assert_eq!((data.len(), errors.len()), (2250, 250));
    assert!(errors.iter().all(|e| e["error_code"] == "dead_page"));
    assert!(data.iter().all(|d| d.get("error").is_none()));
    // Every input exactly once, as a record or an error record.
    let mut urls: Vec<String> = data
        .iter()
        .chain(&errors)
        .map(|r| r["input"]["url"].as_str().unwrap().to_string())
        .collect();
    urls.sort();
    let n = urls.len();
    urls.dedup();
    assert_eq!((n, urls.len()), (2500, 2500));
    assert_eq!(lines(&run.join("data.csv")).len(), 2251);
    let m = h.manifest("reviews");
    assert_eq!(m["state"], "complete");
    assert_eq!(m["provider"], "web_scraper");
    assert!(m["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["remote_id"].as_str().unwrap().starts_with("sd_")));
    assert!(
        h.emulator.stats().requests["v3_parts"] >= 3,
        "the refused whole downloads went through /parts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_scraper_parts_download_resumes_after_kill_9_between_parts() {
    // 3,500 records in parts of 1,000; the second part's body stalls, and
    // the daemon is killed while it waits for it.
    let h = Harness::new(
        "[collectors.gd_parts00001]\nbuild_time = \"100ms\"\n\
         [[faults]]\nendpoint = \"v3_snapshot\"\nkind = \"stall\"\nskip = 1\nfirst = 1\ndelay = \"60s\"\n",
    )
    .await;
    // FAST_LIMITS ends inside [limits].
    h.write_config("snapshot_batch_size = 1000\n");
    h.write_inputs("in.csv", 3500);
    h.write_job(
        "parts.toml",
        &web_scraper_job("gd_parts00001", "in.csv", 5000, ""),
    );

    let mut daemon = h.start_daemon().await;
    daemon.wait_for_line("page saved").await;
    h.emulator
        .wait_until(common::WAIT, |s| {
            s.requests.get("v3_snapshot").copied().unwrap_or(0) >= 2
        })
        .await
        .unwrap();
    daemon.signal(SIGKILL);
    daemon.wait().await;

    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(h.ledger().len(), 1, "resumed; no new trigger");
    let stats = h.emulator.stats();
    assert_eq!(
        stats.requests["v3_snapshot"], 5,
        "parts 1–4 once each, plus the part cut by the kill: part 1 was never fetched again"
    );
    let run = h.run_dir("parts");
    let data = rows(&run.join("data.ndjson"));
    let names: BTreeSet<&str> = data.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!((data.len(), names.len()), (3500, 3500), "each record once");
    let m = h.manifest("parts");
    assert_eq!(
        (m["state"].as_str(), m["rows"].as_u64()),
        (Some("complete"), Some(3500))
    );
    // The pages were joined into the chunk's part file and removed.
    let parts: Vec<String> = std::fs::read_dir(run.join("parts"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(parts, ["chunk-000000.ndjson"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_scraper_early_404s_and_build_lag_are_waited_out() {
    // /progress 404s for the first second; /snapshot answers 202 four more
    // times after /progress says ready.
    let h = Harness::new(
        "[collectors.gd_lagging001]\nbuild_time = \"1500ms\"\nearly_404 = \"1s\"\n\
         dataset_lag_polls = 4\nprogress_word = \"digesting\"\n",
    )
    .await;
    h.write_inputs("in.csv", 30);
    h.write_job(
        "lag.toml",
        &web_scraper_job("gd_lagging001", "in.csv", 10, ""),
    );
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        h.ledger().len(),
        3,
        "an early 404 is not a reason to trigger again"
    );
    let data = rows(&h.run_dir("lag").join("data.ndjson"));
    assert_eq!(data.len(), 30, "a 202 status object never became a row");
    assert!(data.iter().all(|r| r.get("status").is_none()));
    let stats = h.emulator.stats();
    assert!(stats.requests["v3_snapshot"] >= 3 * 5, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_scraper_failed_snapshot_fails_its_chunk_with_the_message() {
    let h = Harness::new(
        "[collectors.gd_failing001]\nbuild_time = \"100ms\"\nfail = true\n\
         fail_message = \"No data found in discovery\"\n",
    )
    .await;
    h.write_inputs("in.csv", 4);
    h.write_job(
        "failing.toml",
        &web_scraper_job("gd_failing001", "in.csv", 4, ""),
    );
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 1, "{stderr}");
    let m = h.manifest("failing");
    assert_eq!(m["state"], "failed");
    let chunk = &m["chunks"][0];
    assert_eq!(chunk["state"], "failed");
    assert!(
        chunk["error"]
            .as_str()
            .unwrap()
            .contains("No data found in discovery"),
        "{chunk}"
    );
    assert!(!h.run_dir("failing").join("_SUCCESS").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecrawl_end_to_end_v2_and_v1_with_refused_and_failed_urls() {
    let h = Harness::new(
        "[firecrawl]\nbuild_time = \"300ms\"\nfail_every = 7\nhttp_error_every = 11\n",
    )
    .await;
    // Two URLs Firecrawl refuses (no top-level domain) among 250.
    let mut urls = doc_urls(248);
    urls.insert(10, "http://127.0.0.1:8080/".into());
    urls.insert(200, "http://localhost:3000/x".into());
    write_urls(&h, "v2.txt", &urls);
    h.write_job(
        "docs.toml",
        &firecrawl_job(
            "v2.txt",
            250,
            "[params]\nformats = [\"markdown\"]\nonlyMainContent = true\n",
        ),
    );
    write_urls(&h, "v1.txt", &doc_urls(30));
    h.write_job(
        "old.toml",
        &firecrawl_job("v1.txt", 10, "api_version = \"v1\"\n"),
    );
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");

    let ledger = h.ledger();
    let v2: Vec<_> = ledger
        .iter()
        .filter(|e| e.params["version"] == "v2")
        .collect();
    let v1: Vec<_> = ledger
        .iter()
        .filter(|e| e.params["version"] == "v1")
        .collect();
    assert_eq!((v2.len(), v1.len()), (1, 3));
    assert_eq!(v2[0].params["ignoreInvalidURLs"], "true", "sent explicitly");
    assert_eq!(v2[0].params["onlyMainContent"], "true");
    assert_eq!(
        v2[0].inputs, 248,
        "the two invalid URLs were never accepted"
    );
    // v1 chunks carry distinct UUID idempotency keys.
    let keys: BTreeSet<&str> = v1.iter().map(|e| e.name.as_deref().unwrap()).collect();
    assert_eq!(keys.len(), 3);
    assert!(keys.iter().all(|k| k.len() == 36));

    let run = h.run_dir("docs");
    let docs = rows(&run.join("data.ndjson"));
    let errors = rows(&run.join("errors.ndjson"));
    let failed = (1..=248).filter(|i| i % 7 == 0).count();
    assert_eq!(docs.len(), 248 - failed);
    let invalid: Vec<&Value> = errors
        .iter()
        .filter(|e| e["error_code"] == "invalid_url")
        .collect();
    assert_eq!(invalid.len(), 2);
    let timeouts = errors
        .iter()
        .filter(|e| e["code"] == "SCRAPE_TIMEOUT")
        .count();
    assert_eq!(timeouts, failed, "failed URLs come from /errors");
    // Every input once: a document, a failed URL or a refused URL.
    let mut seen = source_urls(&docs);
    seen.extend(
        errors
            .iter()
            .map(|e| e["url"].as_str().unwrap().to_string()),
    );
    seen.sort();
    let mut want = urls.clone();
    want.sort();
    assert_eq!(seen, want);
    // Pages with an HTTP error are documents, as upstream.
    assert!(docs.iter().any(|d| d["metadata"]["statusCode"] == 404));
    // Completion order is kept: not sorted by input.
    let order = source_urls(&docs);
    let mut sorted = order.clone();
    sorted.sort();
    assert_ne!(order, sorted);
    let json = read_json(&run.join("data.json"));
    assert_eq!(json.as_array().unwrap().len(), docs.len());
    assert_eq!(h.manifest("docs")["state"], "complete");
    assert_eq!(
        h.manifest("old")["rows"],
        30 - (1..=10).filter(|i| i % 7 == 0).count() * 3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecrawl_pages_over_100_documents_and_10_mib_are_all_followed() {
    // 260 documents of ~150 KB: 39 MB, so pages are cut by the 10 MiB cap
    // (about 69 documents each) and by nothing else.
    let h = Harness::new("[firecrawl]\nbuild_time = \"200ms\"\ndoc_bytes = 150000\n").await;
    write_urls(&h, "big.txt", &doc_urls(260));
    h.write_job("big.toml", &firecrawl_job("big.txt", 260, ""));
    // And 250 small ones in one chunk: pages of 100 documents.
    write_urls(
        &h,
        "many.txt",
        &(0..250)
            .map(|i| format!("https://many.example.org/{i}"))
            .collect::<Vec<_>>(),
    );
    h.write_job("many.toml", &firecrawl_job("many.txt", 250, ""));
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");
    for (job, n, min_pages) in [("big", 260, 4), ("many", 250, 3)] {
        let docs = rows(&h.run_dir(job).join("data.ndjson"));
        let urls: BTreeSet<String> = source_urls(&docs).into_iter().collect();
        assert_eq!(
            (docs.len(), urls.len()),
            (n, n),
            "{job}: every document once"
        );
        let pages = stderr
            .lines()
            .filter(|l| l.contains("\"page saved\"") && l.contains(&format!("\"job\":\"{job}\"")))
            .count();
        assert!(pages >= min_pages, "{job}: {pages} pages");
    }
    let bytes = std::fs::metadata(h.run_dir("big").join("data.ndjson"))
        .unwrap()
        .len();
    assert!(bytes > 30 * 1024 * 1024, "{bytes}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecrawl_page_failures_mid_pagination_lose_and_repeat_nothing() {
    // Pages of 40; a third of the page fetches fail (500) or are cut.
    let h = Harness::new(
        "seed = 7\n[firecrawl]\nbuild_time = \"200ms\"\npage_docs = 40\n\
         [[faults]]\nendpoint = \"fc_status\"\nkind = \"status\"\nstatus = 500\nbody = \"text\"\nprobability = 0.2\n\
         [[faults]]\nendpoint = \"fc_status\"\nkind = \"truncate\"\nprobability = 0.15\n",
    )
    .await;
    write_urls(&h, "in.txt", &doc_urls(400));
    h.write_job("flaky.toml", &firecrawl_job("in.txt", 400, ""));
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");
    let docs = rows(&h.run_dir("flaky").join("data.ndjson"));
    let urls: BTreeSet<String> = source_urls(&docs).into_iter().collect();
    assert_eq!(
        (docs.len(), urls.len()),
        (400, 400),
        "each document exactly once"
    );
    // A fetch failed after a page had been saved, and the download went on.
    let first_saved = stderr
        .lines()
        .position(|l| l.contains("\"page saved\""))
        .unwrap();
    assert!(
        stderr
            .lines()
            .skip(first_saved)
            .any(|l| l.contains("download failed; retrying")),
        "no mid-pagination failure happened: {stderr}"
    );
    assert_eq!(h.ledger().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecrawl_expiry_before_download_is_an_expired_chunk_and_a_partial_run() {
    // One batch at a time: the first is saved, the second is still
    // scraping when the daemon stops, and the data expires while it is down.
    let h = Harness::new("[firecrawl]\nbuild_time = \"3s\"\n").await;
    h.write_config("[limits.keys.account]\nmax_in_flight = 1\n");
    write_urls(&h, "in.txt", &doc_urls(20));
    h.write_job("late.toml", &firecrawl_job("in.txt", 10, ""));
    let daemon = h.start_daemon().await;
    h.emulator.wait_for_ledger(2, common::WAIT).await.unwrap();
    daemon.signal(SIGTERM);
    assert_eq!(daemon.wait().await, 0);
    h.emulator.advance(Duration::from_secs(26 * 3600));

    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 1, "a run with lost data is not a success: {stderr}");
    let m = h.manifest("late");
    assert_eq!(m["state"], "partial");
    let states: Vec<&str> = m["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["downloaded", "expired"]);
    assert!(m["chunks"][1]["error"]
        .as_str()
        .unwrap()
        .contains("Job expired"));
    assert_eq!(m["rows"], 10);
    assert_eq!(h.ledger().len(), 2, "nothing re-triggered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecrawl_402_blocks_the_provider_and_fails_nothing() {
    let h = Harness::new("[firecrawl]\nbuild_time = \"100ms\"\ncredits = 5\n").await;
    write_urls(&h, "in.txt", &doc_urls(10));
    h.write_job("broke.toml", &firecrawl_job("in.txt", 10, ""));
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("Insufficient credits"), "{stderr}");
    assert!(stderr.contains("waits on a blocked provider"), "{stderr}");
    assert!(h.ledger().is_empty());
    assert!(!h.path("out/broke").join("latest").exists());

    // Credits topped up: the same run finishes; nothing had failed.
    h.emulator.set_firecrawl_credits(None);
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");
    let m = h.manifest("broke");
    assert_eq!(
        (m["state"].as_str(), m["rows"].as_u64()),
        (Some("complete"), Some(10))
    );
    assert_eq!(h.ledger().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_scraper_empty_snapshot_is_a_complete_run_with_zero_rows() {
    // Snapshot is empty: a 400 that means "finished, nothing found".
    let h = Harness::new("[collectors.gd_nothing0001]\nbuild_time = \"100ms\"\nzero_rows = true\n")
        .await;
    h.write_inputs("in.csv", 6);
    h.write_job(
        "nothing.toml",
        &web_scraper_job("gd_nothing0001", "in.csv", 3, ""),
    );
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");
    let m = h.manifest("nothing");
    assert_eq!(
        (m["state"].as_str(), m["rows"].as_u64()),
        (Some("complete"), Some(0))
    );
    assert_eq!(
        read_json(&h.run_dir("nothing").join("data.json")),
        serde_json::json!([])
    );
    assert_eq!(h.ledger().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecrawl_429_waits_for_the_time_in_its_message() {
    // No Retry-After header: the wait is only in "…retry after 1s…".
    let h = Harness::new(
        "retry_after_slack = \"50ms\"\n[firecrawl]\nbuild_time = \"200ms\"\n\
         [[faults]]\nendpoint = \"fc_status\"\nkind = \"rate_limit\"\nretry_after_secs = 1\nskip = 1\nfirst = 2\n\
         [[faults]]\nendpoint = \"fc_batch\"\nkind = \"rate_limit\"\nretry_after_secs = 1\nfirst = 1\n",
    )
    .await;
    // The harness's rate_limit_pause (100 ms) is far shorter than the 1 s
    // the message asks for: only reading the message keeps calls away.
    write_urls(&h, "in.txt", &doc_urls(30));
    h.write_job("limited.toml", &firecrawl_job("in.txt", 10, ""));
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");
    let stats = h.emulator.stats();
    assert_eq!(stats.rate_limited, 3);
    assert_eq!(stats.early_requests, 0, "a call came before the wait ended");
    assert_eq!(
        h.ledger().len(),
        3,
        "a 429 created nothing: no doubt, one batch per chunk"
    );
    assert_eq!(rows(&h.run_dir("limited").join("data.ndjson")).len(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecrawl_v1_settles_doubts_with_its_idempotency_key() {
    // Chunk 0: the first submission is reset before Firecrawl sees it; the
    // same key again creates the batch. Chunk 1: the batch is created but the
    // answer is lost; the same key again gets 409, and Firecrawl never gives
    // the id back, so the chunk fails rather than pay twice.
    let h = Harness::new(
        "[firecrawl]\nbuild_time = \"200ms\"\n\
         [[faults]]\nendpoint = \"fc_batch\"\nkind = \"reset\"\nfirst = 1\n\
         [[faults]]\nendpoint = \"fc_batch\"\nkind = \"lost_ack\"\nskip = 1\nfirst = 1\n",
    )
    .await;
    h.write_config("[limits.keys.account]\nmax_in_flight = 1\n");
    write_urls(&h, "in.txt", &doc_urls(20));
    h.write_job(
        "v1.toml",
        &firecrawl_job("in.txt", 10, "api_version = \"v1\"\n"),
    );
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 1, "{stderr}");
    let ledger = h.ledger();
    assert_eq!(ledger.len(), 2, "one batch per chunk: {ledger:?}");
    assert_ne!(ledger[0].name, ledger[1].name, "each chunk has its own key");
    let m = h.manifest("v1");
    assert_eq!(m["state"], "partial");
    assert_eq!(m["chunks"][0]["state"], "downloaded");
    assert_eq!(m["chunks"][1]["state"], "failed");
    assert!(
        m["chunks"][1]["error"]
            .as_str()
            .unwrap()
            .contains("Idempotency key already used"),
        "{}",
        m["chunks"][1]
    );
    assert!(
        stderr.contains("in-doubt chunk settled: the collection exists"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_scraper_lost_trigger_answers_are_found_by_their_inputs() {
    // Two of three triggers create a snapshot whose answer is lost; a
    // reset one creates nothing. The snapshot listing plus each candidate's
    // inputs tell them apart.
    let h = Harness::new(
        "[collectors.gd_doubts00001]\nbuild_time = \"200ms\"\n\
         [[faults]]\nendpoint = \"v3_trigger\"\nkind = \"lost_ack\"\nfirst = 2\n\
         [[faults]]\nendpoint = \"v3_trigger\"\nkind = \"reset\"\nfirst = 1\n",
    )
    .await;
    h.write_inputs("in.csv", 30);
    h.write_job(
        "doubts.toml",
        &web_scraper_job("gd_doubts00001", "in.csv", 10, ""),
    );
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");
    let ledger = h.ledger();
    assert_eq!(ledger.len(), 3, "no chunk paid twice: {ledger:?}");
    let data = rows(&h.run_dir("doubts").join("data.ndjson"));
    let urls: BTreeSet<&str> = data.iter().map(|r| r["url"].as_str().unwrap()).collect();
    assert_eq!((data.len(), urls.len()), (30, 30));
    let stats = h.emulator.stats();
    assert!(stats.requests["v3_snapshots"] >= 3, "{stats:?}");
    assert!(stats.requests["v3_input"] >= 2, "{stats:?}");
}

/// What a Firecrawl run cost is what Firecrawl reported: per chunk and per
/// run in the manifest, in `status` and in `/metrics`; `validate` said it
/// beforehand. Bright Data reports nothing, and its manifest says `null`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecrawl_credits_are_recorded_per_chunk_and_run_and_estimated_beforehand() {
    let mut h = Harness::new(
        "[defaults]\nbuild_time = \"100ms\"\n[firecrawl]\nbuild_time = \"100ms\"\nfail_every = 5\n",
    )
    .await;
    write_urls(&h, "docs.txt", &doc_urls(30));
    h.write_job(
        "docs.toml",
        &firecrawl_job("docs.txt", 10, "[params]\nformats = [\"markdown\"]\n"),
    );
    h.write_inputs("in.csv", 4);
    h.write_job(
        "studio.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_credits001\"\ninputs_file = \"in.csv\"\nchunk_size = 2\n",
    );
    let extract = "[params]\nformats = [{ type = \"json\", prompt = \"the title\" }]\n";
    h.write_job("extract.json.toml", &firecrawl_job("docs.txt", 10, extract));

    // Before anything is paid: a credit a page, five with a JSON format.
    let job = |name: &str| h.path("jobs").join(name).display().to_string();
    let (code, out, err) = h
        .run(&["validate", "--json", &job("docs.toml"), &job("studio.toml")])
        .await;
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let files = report["files"].as_array().unwrap();
    assert_eq!(files[0]["valid"], true, "{report}");
    assert_eq!(files[0]["problems"], serde_json::json!([]));
    assert_eq!(files[0]["inputs"], 30);
    assert_eq!(files[0]["chunks"], 3);
    assert_eq!(files[0]["credits_estimate"], 30, "{report}");
    assert!(files[1].get("credits_estimate").is_none(), "{report}");
    let (_, out, _) = h.run(&["validate", &job("extract.json.toml")]).await;
    assert!(out.contains("about 150 Firecrawl credit(s)"), "{out}");

    h.env = vec![("HARVESTD_ADMIN_LISTEN".into(), "127.0.0.1:0".into())];
    let mut d = h.start_with(&["run"]).await;
    for _ in 0..3 {
        d.wait_for_line("run complete").await;
    }
    // The emulator bills each saved page once, as Firecrawl does.
    let manifest = h.manifest("docs");
    let docs = rows(&h.run_dir("docs").join("data.ndjson")).len() as u64;
    assert_eq!(docs, 30 - 6, "every fifth URL fails");
    assert_eq!(manifest["credits_used"], docs, "{manifest}");
    let per_chunk: u64 = manifest["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["credits_used"].as_u64().expect("each chunk's credits"))
        .sum();
    assert_eq!(per_chunk, docs);
    let extract = h.manifest("extract.json");
    assert_eq!(extract["credits_used"], docs * 5, "{extract}");
    let studio = h.manifest("studio");
    assert_eq!(studio["credits_used"], Value::Null, "{studio}");
    assert_eq!(studio["chunks"][0]["credits_used"], Value::Null);

    let (code, out, _) = h.run(&["status", "--json"]).await;
    assert_eq!(code, 0);
    let status: Value = serde_json::from_str(&out).unwrap();
    let run_of = |name: &str| {
        status["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["job"] == name)
            .map(|j| j["latest_run"].clone())
            .unwrap()
    };
    assert_eq!(run_of("docs")["credits_used"], docs, "{status}");
    assert_eq!(run_of("studio")["credits_used"], Value::Null);
    let (_, table, _) = h.run(&["status"]).await;
    assert!(table.lines().next().unwrap().contains("CREDITS"), "{table}");

    let metrics = h.metrics().await;
    let total = docs * 6;
    let line = format!("harvestd_credits_used_total{{provider=\"firecrawl\"}} {total}");
    assert!(metrics.lines().any(|l| l == line), "{metrics}");
    d.signal(SIGTERM);
    assert_eq!(d.wait().await, 0);
}
