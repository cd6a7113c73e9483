//! Shapes the real APIs answer in that the documented default does not
//! (`docs/emulator-scenarios.md`), each switched on in the emulator and
//! met by the daemon: it must cope, and tell what it could not save.
#![allow(clippy::unwrap_used)]

mod common;

use common::{lines, Harness};
use serde_json::Value;

/// A Firecrawl job of `urls` URLs in one chunk through `api_version`, run
/// once against an emulator with `firecrawl` scenario keys (small pages,
/// so `next` is followed). Returns the exit code, stderr and the harness.
async fn firecrawl_run(firecrawl: &str, api: &str, urls: usize) -> (i32, String, Harness) {
    let h = Harness::new(&format!(
        "[firecrawl]\nbuild_time = \"100ms\"\npage_docs = 3\n{firecrawl}\n"
    ))
    .await;
    let list: String = (0..urls)
        .map(|i| format!("https://docs.example.com/p/{i:03}\n"))
        .collect();
    std::fs::write(h.path("jobs/pages.txt"), list).unwrap();
    h.write_job(
        "pages.toml",
        &format!(
            "provider = \"firecrawl\"\napi_version = \"{api}\"\ninputs_file = \"pages.txt\"\nchunk_size = {urls}\nformats = [\"json\"]\n"
        ),
    );
    let (code, _, stderr) = h.run_once().await;
    (code, stderr, h)
}

/// The URLs of the run's documents, sorted.
fn saved_urls(h: &Harness) -> Vec<String> {
    let rows = common::read_json(&h.run_dir("pages").join("data.json"));
    let mut urls: Vec<String> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["metadata"]["sourceURL"].as_str().unwrap().to_string())
        .collect();
    urls.sort();
    urls
}

fn every_url(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("https://docs.example.com/p/{i:03}"))
        .collect()
}

/// `next` naming another scheme and host (a self-hosted server behind a
/// proxy, issue #930): followed by its `skip` against the configured base,
/// every document once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecrawl_next_links_to_another_host_are_followed_at_our_own() {
    for api in ["v2", "v1"] {
        let (code, stderr, h) = firecrawl_run(
            "next_base = \"https://firecrawl.proxy.example:8443\"",
            api,
            10,
        )
        .await;
        assert_eq!(code, 0, "{api}: {stderr}");
        assert_eq!(saved_urls(&h), every_url(10), "{api}: each document once");
    }
}

/// `creditsUsed: -1` (billing unreadable) is no figure: the run records
/// none rather than a huge number; a `warning` is no failure; `expiresAt`
/// in whole seconds reads as well as with milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecrawl_odd_status_fields_are_taken_in_stride() {
    let (code, stderr, h) = firecrawl_run(
        "credits_unknown = true\nwarning = \"robots.txt disallows some pages\"\nexpires_at_seconds = true",
        "v2",
        7,
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(saved_urls(&h), every_url(7));
    let manifest = h.manifest("pages");
    assert_eq!(manifest["credits_used"], Value::Null, "{manifest}");
    assert_eq!(manifest["chunks"][0]["credits_used"], Value::Null);
}

/// A 200 with `success: false`, `status: "failed"` (kickoff failed): the
/// chunk fails with the provider's error, once, never taken for ready and
/// never polled forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecrawl_a_kickoff_failure_fails_the_chunk_with_its_error() {
    let (code, stderr, h) = firecrawl_run("kickoff_failure = true", "v1", 5).await;
    assert_eq!(code, 1, "{stderr}");
    let manifest = h.manifest("pages");
    assert_eq!(manifest["state"], "failed", "{manifest}");
    let error = manifest["chunks"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("queue full"), "{manifest}");
    assert_eq!(h.ledger().len(), 1, "one batch, not retried");
}

/// Self-hosted Firecrawl forgets documents an hour after they finish while
/// `completed` still counts them: the daemon saves what is served and
/// says, in `errors.ndjson`, how many it was told of and never got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecrawl_vanished_documents_are_named_not_lost_silently() {
    let (code, stderr, h) = firecrawl_run("docs_vanish_after = \"1ms\"", "v1", 6).await;
    assert_eq!(code, 0, "{stderr}");
    let errors = lines(&h.run_dir("pages").join("errors.ndjson"));
    assert!(
        errors
            .iter()
            .any(|l| l.contains("\"missing_documents\"") && l.contains("reported 6 completed")),
        "{errors:?}"
    );
}

/// A Web Scraper API job of `inputs` URLs in chunks of 5 against an
/// emulator scenario, run once.
async fn web_scraper_run(scenario: &str, inputs: usize) -> (i32, String, Harness) {
    let h = Harness::new(scenario).await;
    h.write_inputs("in.csv", inputs);
    h.write_job(
        "web.toml",
        "provider = \"web_scraper\"\ndataset_id = \"gd_diverge001\"\ninputs_file = \"in.csv\"\nchunk_size = 5\n",
    );
    let (code, _, stderr) = h.run_once().await;
    (code, stderr, h)
}

/// The OpenAPI's 409 `Snapshot is not ready for download` where the 202
/// table says 202: still only "not yet", the run completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_scraper_409_not_ready_is_waited_out() {
    let (code, stderr, h) = web_scraper_run(
        "[defaults]\nbuild_time = \"100ms\"\nnot_ready_409 = true\ndataset_lag_polls = 0\n",
        10,
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(h.manifest("web")["rows"], 10);
    assert_eq!(h.ledger().len(), 2);
}

/// An `x-brd-error` header on a 200 (Bright Data's proxy layers): a
/// failure whatever the status, retried; a trigger answered so is settled
/// at the provider, never paid twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_scraper_an_x_brd_error_header_is_a_failure_whatever_the_status() {
    for endpoint in ["v3_trigger", "v3_progress", "v3_snapshot"] {
        let (code, stderr, h) = web_scraper_run(
            &format!(
                "[defaults]\nbuild_time = \"100ms\"\n[[faults]]\nendpoint = \"{endpoint}\"\nkind = \"brd_error\"\nstatus = 200\nfirst = 2\n"
            ),
            10,
        )
        .await;
        assert_eq!(code, 0, "{endpoint}: {stderr}");
        assert!(
            stderr.contains("x-brd-error"),
            "{endpoint}: said why: {stderr}"
        );
        assert_eq!(h.manifest("web")["rows"], 10, "{endpoint}");
        assert_eq!(h.ledger().len(), 2, "{endpoint}: one trigger per chunk");
    }
    // On a 429 the header changes nothing: the pause the status asks for.
    let (code, stderr, h) = web_scraper_run(
        "[defaults]\nbuild_time = \"100ms\"\n[[faults]]\nendpoint = \"v3_progress\"\nkind = \"brd_error\"\nstatus = 429\nfirst = 1\n",
        10,
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("429 from provider"),
        "a 429 stays a 429: {stderr}"
    );
    assert_eq!(h.manifest("web")["rows"], 10);
}

/// A refused token answered as JSON (`/progress`'s documented 401): the
/// provider is blocked with the provider's own words, nothing fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bright_data_a_json_401_blocks_with_its_message() {
    let mut h = Harness::new("auth_error_json = true\n[defaults]\nbuild_time = \"100ms\"\n").await;
    h.token = "not-the-token".into();
    h.write_inputs("in.csv", 4);
    h.write_job(
        "web.toml",
        "provider = \"web_scraper\"\ndataset_id = \"gd_diverge001\"\ninputs_file = \"in.csv\"\nchunk_size = 5\n",
    );
    let (code, _, stderr) = h.run_once().await;
    assert_ne!(code, 0, "{stderr}");
    assert!(
        stderr.contains("User authentication is required"),
        "the provider's message is kept: {stderr}"
    );
    assert!(h.ledger().is_empty(), "nothing triggered");
}

/// Scraper Studio's dataset answering 404 (or 400) for a while after
/// `/dca/log` said done, as seen live: "not yet", within the grace, never
/// a lost collection or a second trigger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraper_studio_a_dataset_lagging_with_4xx_is_waited_out() {
    for status in [404, 400] {
        let h = Harness::new(&format!(
            "[defaults]\nbuild_time = \"100ms\"\ndataset_lag_polls = 3\ndataset_lag_status = {status}\n"
        ))
        .await;
        h.write_inputs("in.csv", 6);
        h.write_job(
            "studio.toml",
            "provider = \"scraper_studio\"\ncollector = \"c_lag4xx0001\"\ninputs_file = \"in.csv\"\nchunk_size = 3\n",
        );
        let (code, _, stderr) = h.run_once().await;
        assert_eq!(code, 0, "{status}: {stderr}");
        assert_eq!(h.manifest("studio")["rows"], 6, "{status}");
        assert_eq!(h.ledger().len(), 2, "{status}: one trigger per chunk");
    }
}
