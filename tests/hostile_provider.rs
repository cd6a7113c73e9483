//! A hostile or broken provider, against the real binary (`docs/outputs.md`, `docs/limits.md`):
//! unreadable rows, huge `Retry-After` values, endless bodies, hostile
//! remote ids, a full disk, and what `status` says meanwhile. Each
//! behaviour is an emulator scenario option (docs/emulator-scenarios.md).

// Test helpers panic on purpose: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{lines, Harness};
use serde_json::Value;

const SIGTERM: i32 = 15;
const SIGHUP: i32 = 1;

fn job(collector: &str, inputs_file: &str, chunk_size: u32) -> String {
    format!(
        "provider = \"scraper_studio\"\ncollector = \"{collector}\"\ninputs_file = \"{inputs_file}\"\n\
         chunk_size = {chunk_size}\nformats = [\"csv\", \"json\", \"ndjson\"]\n"
    )
}

/// `harvestd run --once` that must end within `limit` (a wedged chunk is
/// a failure, not a 90-second wait).
async fn run_once_within(h: &Harness, limit: Duration) -> (i32, String) {
    let out = tokio::time::timeout(limit, h.command(&["run", "--once"]).output())
        .await
        .unwrap_or_else(|_| panic!("run --once did not finish within {limit:?}"))
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Requests the emulator answered, by endpoint.
fn requests(h: &Harness, endpoint: &str) -> u64 {
    h.emulator
        .stats()
        .requests
        .get(endpoint)
        .copied()
        .unwrap_or(0)
}

/// `harvestd status --json`, parsed.
async fn status(h: &Harness) -> Value {
    let (code, out, err) = h.run(&["status", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// Asks `status --json` until `pick` finds something in it, for at most
/// `limit`; returns it.
async fn status_until(
    h: &Harness,
    limit: Duration,
    pick: impl Fn(&Value) -> Option<String>,
) -> String {
    let start = Instant::now();
    let mut last = Value::Null;
    while start.elapsed() < limit {
        last = status(h).await;
        if let Some(found) = pick(&last) {
            return found;
        }
    }
    panic!("status never showed it within {limit:?}; last: {last:#}");
}

fn last_error(job: &str) -> impl Fn(&Value) -> Option<String> + '_ {
    move |s: &Value| {
        s["jobs"].as_array()?.iter().find(|j| j["job"] == job)?["latest_run"]["last_error"]
            .as_str()
            .map(str::to_string)
    }
}

/// Each kind of unreadable row goes to errors.ndjson as a malformed_row
/// record with its bytes; the other rows are saved, the dataset is
/// downloaded once, and the run is complete (`docs/outputs.md`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_row_is_kept_as_malformed_and_the_rest_saved_once() {
    let kinds = ["invalid_utf8", "control_char", "deep_nesting", "huge"];
    let mut scenario = String::new();
    for (i, kind) in kinds.iter().enumerate() {
        scenario.push_str(&format!(
            "[collectors.c_malformed0{i}]\nbuild_time = \"50ms\"\nmalformed_row = \"{kind}\"\n\
             malformed_at = 2\nhuge_row_bytes = 3000000\n"
        ));
    }
    scenario.push_str(
        "[collectors.gd_malformedws]\nbuild_time = \"50ms\"\nmalformed_row = \"control_char\"\nmalformed_at = 1\n",
    );
    let h = Harness::new(&scenario).await;
    h.write_config("max_row_bytes = \"1MiB\"\n");
    h.write_inputs("in.csv", 5);
    for i in 0..kinds.len() {
        h.write_job(
            &format!("m{i}.toml"),
            &job(&format!("c_malformed0{i}"), "in.csv", 5),
        );
    }
    h.write_job(
        "ws.toml",
        "provider = \"web_scraper\"\ndataset_id = \"gd_malformedws\"\ninputs_file = \"in.csv\"\nchunk_size = 5\n\
         formats = [\"ndjson\"]\n",
    );

    let (code, stderr) = run_once_within(&h, Duration::from_secs(40)).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(h.ledger().len(), 5, "one trigger per job");
    assert_eq!(requests(&h, "dataset"), 4, "each dataset downloaded once");
    assert_eq!(
        requests(&h, "v3_snapshot"),
        1,
        "the snapshot downloaded once"
    );

    for (i, kind) in kinds
        .iter()
        .enumerate()
        .map(|(i, k)| (format!("m{i}"), *k))
        .chain([("ws".to_string(), "control_char")])
    {
        let manifest = h.manifest(&i);
        assert_eq!(manifest["state"], "complete", "{kind}: {manifest:#}");
        assert_eq!(manifest["malformed_rows"], 1, "{kind}");
        assert_eq!(manifest["rows"], 4, "{kind}: the other rows are saved");
        assert_eq!(manifest["error_rows"], 0, "{kind}");
        let run = h.run_dir(&i);
        assert_eq!(lines(&run.join("data.ndjson")).len(), 4, "{kind}");
        let errors: Vec<Value> = lines(&run.join("errors.ndjson"))
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(errors.len(), 1, "{kind}: {errors:?}");
        let e = &errors[0];
        assert_eq!(e["error_code"], "malformed_row", "{kind}");
        assert_eq!(e["chunk"], 0, "{kind}");
        assert!(e["byte_offset"].as_u64().unwrap() > 0, "{kind}: {e}");
        let error = e["error"].as_str().unwrap();
        match kind {
            "invalid_utf8" => {
                assert!(e["raw_base64"].is_string() && e.get("raw").is_none(), "{e}")
            }
            "control_char" => assert!(e["raw"].as_str().unwrap().contains("tab\u{1}here"), "{e}"),
            "deep_nesting" => assert!(error.contains("deeper than 128"), "{error}"),
            _ => {
                assert!(error.contains("max_row_bytes"), "{error}");
                assert_eq!(e["raw"].as_str().unwrap().len(), 1 << 20);
                assert!(e["length"].as_u64().unwrap() > 3_000_000, "{}", e["length"]);
            }
        }
    }
}

/// Firecrawl: a document that is not JSON makes its page invalid JSON;
/// the page is read around it, the document kept as a malformed row, the
/// others saved, and each page fetched once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecrawl_an_unreadable_document_is_kept_as_malformed_and_the_rest_saved() {
    for kind in ["invalid_utf8", "control_char"] {
        let h = Harness::new(&format!(
            "[firecrawl]\nbuild_time = \"100ms\"\nmalformed_document = \"{kind}\"\nmalformed_at = 3\n"
        ))
        .await;
        let urls: String = (0..6)
            .map(|i| format!("https://docs.example/{i}\n"))
            .collect();
        std::fs::write(h.path("jobs/urls.txt"), urls).unwrap();
        h.write_job(
            "fc.toml",
            "provider = \"firecrawl\"\ninputs_file = \"urls.txt\"\nchunk_size = 6\nformats = [\"ndjson\"]\n",
        );
        let (code, stderr) = run_once_within(&h, Duration::from_secs(40)).await;
        assert_eq!(code, 0, "{kind}: {stderr}");
        let manifest = h.manifest("fc");
        assert_eq!(manifest["state"], "complete", "{kind}: {manifest:#}");
        assert_eq!(manifest["malformed_rows"], 1, "{kind}");
        assert_eq!(manifest["rows"], 5, "{kind}");
        let errors = lines(&h.run_dir("fc").join("errors.ndjson"));
        assert_eq!(errors.len(), 1, "{kind}: {errors:?}");
        assert!(errors[0].contains("\"malformed_row\""), "{}", errors[0]);
        let url_shown = if kind == "control_char" {
            "docs.example/3"
        } else {
            // base64 of `{"url":"https://docs.example/3"`, as the row starts.
            "eyJ1cmwiOiJodHRwczovL2RvY3MuZXhhbXBsZS8zI"
        };
        assert!(errors[0].contains(url_shown), "{}", errors[0]);
        assert_eq!(requests(&h, "fc_errors"), 1, "{kind}: downloaded once");
    }
}

/// `Retry-After: 18446744073709551615` (u64::MAX seconds) panicked the
/// chunk task; `99999999999` paused the provider for 3,000 years, unseen.
/// Both now wait `retry_after_cap`, and `status` shows the pause and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_retry_after_waits_the_cap_and_status_shows_the_pause() {
    for value in ["18446744073709551615", "99999999999"] {
        let mut h = Harness::new(&format!(
            "[defaults]\nbuild_time = \"50ms\"\n[[faults]]\nendpoint = \"log\"\nkind = \"rate_limit\"\n\
             retry_after_header = \"{value}\"\nfirst = 1\n"
        ))
        .await;
        h.env
            .push(("HARVESTD_ADMIN_LISTEN".into(), "127.0.0.1:0".into()));
        h.write_config("retry_after_cap = \"4s\"\n");
        h.write_inputs("in.csv", 3);
        h.write_job("paused.toml", &job("c_paused00001", "in.csv", 3));
        let mut d = h.start_daemon().await;
        let start = Instant::now();
        let paused = status_until(&h, Duration::from_secs(20), |s| {
            s["providers"]
                .as_array()?
                .iter()
                .find_map(|p| p["paused"]["reason"].as_str().map(str::to_string))
        })
        .await;
        assert!(
            paused.contains(value) && paused.contains("retry_after_cap"),
            "{paused}"
        );
        let (_, table, _) = h.run(&["status"]).await;
        assert!(table.contains("PAUSED"), "{table}");
        d.wait_for_line("run complete").await;
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{value}: waited {:?}, more than the 4 s cap allows",
            start.elapsed()
        );
        assert_eq!(h.ledger().len(), 1);
        d.signal(SIGTERM);
        let (code, logs) = d.wait_all().await;
        assert_eq!(code, 0);
        assert!(!logs.iter().any(|l| l.contains("panicked")), "{logs:#?}");
    }
}

/// A status answer that never ends is cut at 1 MiB or at
/// `request_timeout`, recorded as the chunk's last error, and retried;
/// SIGTERM is not held up by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_status_body_is_a_transient_error_shown_in_status() {
    // Fast pieces hit the 1 MiB cap; slow ones (16 s to 1 MiB) the
    // whole-call timeout of 5 s.
    for (delay, why) in [("0s", "larger than"), ("1s", "request_timeout")] {
        let mut h = Harness::new(&format!(
            "[defaults]\nbuild_time = \"50ms\"\n[[faults]]\nendpoint = \"log\"\nkind = \"endless\"\n\
             delay = \"{delay}\"\nfirst = 1000000\n"
        ))
        .await;
        h.env
            .push(("HARVESTD_ADMIN_LISTEN".into(), "127.0.0.1:0".into()));
        h.write_inputs("in.csv", 3);
        h.write_job("endless.toml", &job("c_endless0001", "in.csv", 3));
        let d = h.start_daemon().await;
        let error = status_until(&h, Duration::from_secs(20), last_error("endless")).await;
        assert!(
            error.contains("status poll") && error.contains(why),
            "{error}"
        );
        h.emulator
            .wait_until(Duration::from_secs(20), |s| {
                s.requests.get("log").copied().unwrap_or(0) >= 2
            })
            .await
            .expect("the poll is retried");
        let start = Instant::now();
        d.signal(SIGTERM);
        let code = d.wait().await;
        assert_eq!(code, 0);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "shutdown took {:?}",
            start.elapsed()
        );
    }
}

/// A dataset body that never ends fails its chunk at `max_dataset_bytes`
/// with that reason, leaving no part file behind; the other chunk is saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_dataset_fails_its_chunk_at_max_dataset_bytes() {
    let h = Harness::new(
        "[defaults]\nbuild_time = \"50ms\"\n[[faults]]\nendpoint = \"dataset\"\nkey = \"c_endless0002\"\n\
         kind = \"endless\"\ndelay = \"0s\"\nprobability = 1.0\n",
    )
    .await;
    h.write_config("max_dataset_bytes = \"8MiB\"\n");
    h.write_inputs("in.csv", 3);
    h.write_job("endless.toml", &job("c_endless0002", "in.csv", 3));
    h.write_job("fine.toml", &job("c_fine0000001", "in.csv", 3));
    let (code, stderr) = run_once_within(&h, Duration::from_secs(40)).await;
    assert_ne!(code, 0, "an incomplete run is not a success: {stderr}");
    let manifest = h.manifest("endless");
    assert_eq!(manifest["state"], "failed", "{manifest:#}");
    let error = manifest["chunks"][0]["error"].as_str().unwrap();
    assert!(error.contains("max_dataset_bytes"), "{error}");
    assert_eq!(requests(&h, "dataset"), 2, "one endless download, one fine");
    assert_eq!(h.manifest("fine")["state"], "complete");
    let run = h.run_dir("endless");
    let left: u64 = std::fs::read_dir(run.join("parts"))
        .map(|d| d.map(|e| e.unwrap().metadata().unwrap().len()).sum())
        .unwrap_or(0);
    assert_eq!(left, 0, "nothing of the endless dataset stays on disk");
}

/// An endless download in progress does not hold SIGTERM past a moment,
/// however large `max_dataset_bytes` is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_an_endless_download_at_once() {
    let h = Harness::new(
        "[defaults]\nbuild_time = \"50ms\"\n[[faults]]\nendpoint = \"dataset\"\nkind = \"endless\"\n\
         delay = \"20ms\"\nprobability = 1.0\n",
    )
    .await;
    h.write_inputs("in.csv", 3);
    h.write_job("endless.toml", &job("c_endless0003", "in.csv", 3));
    let d = h.start_daemon().await;
    h.emulator
        .wait_until(Duration::from_secs(20), |s| {
            s.requests.get("dataset").copied().unwrap_or(0) >= 1
        })
        .await
        .unwrap();
    let start = Instant::now();
    d.signal(SIGTERM);
    let code = d.wait().await;
    assert_eq!(code, 0);
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "shutdown took {:?} (grace 10 s)",
        start.elapsed()
    );
}

/// A remote id is only ever one path segment: `../../../admin/x` is sent
/// encoded (the token never reaches another path), and ids over 256 bytes
/// or with control characters are unreadable answers, settled without a
/// second trigger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_remote_ids_never_leave_their_path_segment() {
    let long = "j".repeat(300);
    let h = Harness::new(&format!(
        "[collectors.c_traversal01]\nbuild_time = \"50ms\"\nremote_id = \"../../../admin/x\"\n\
         [collectors.c_longid00001]\nbuild_time = \"50ms\"\nremote_id = \"{long}\"\n\
         [collectors.c_ctrlid00001]\nbuild_time = \"50ms\"\nremote_id = \"j_\\u0007bell\"\n"
    ))
    .await;
    h.write_inputs("in.csv", 2);
    h.write_job("traversal.toml", &job("c_traversal01", "in.csv", 2));
    h.write_job("long.toml", &job("c_longid00001", "in.csv", 2));
    h.write_job("ctrl.toml", &job("c_ctrlid00001", "in.csv", 2));
    let (_, stderr) = run_once_within(&h, Duration::from_secs(40)).await;
    assert_eq!(requests(&h, "unknown"), 0, "no call left the API's paths");
    assert_eq!(h.ledger().len(), 3, "never triggered twice: {stderr}");
    assert_eq!(h.manifest("traversal")["state"], "complete");
    assert_eq!(h.manifest("traversal")["rows"], 2);
    for (job, why) in [("long", "300 bytes"), ("ctrl", "control characters")] {
        let manifest = h.manifest(job);
        assert_eq!(manifest["chunks"][0]["state"], "failed", "{manifest:#}");
        let error = manifest["chunks"][0]["error"].as_str().unwrap();
        assert!(error.contains(why), "{error}");
    }
}

/// Below `min_free_space` a ready chunk waits, with the reason in
/// `status` and the log, without downloading; once the limit is lowered
/// (SIGHUP), it downloads and the run completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_wait_for_disk_space_and_resume() {
    let mut h = Harness::new("[defaults]\nbuild_time = \"50ms\"\n").await;
    h.env
        .push(("HARVESTD_ADMIN_LISTEN".into(), "127.0.0.1:0".into()));
    // More than any disk has.
    h.write_config("min_free_space = \"1000000TiB\"\n");
    h.write_inputs("in.csv", 4);
    h.write_job("disk.toml", &job("c_diskfull001", "in.csv", 4));
    let mut d = h.start_daemon().await;
    d.wait_for_line("download waits for disk space").await;
    let error = status_until(&h, Duration::from_secs(20), last_error("disk")).await;
    assert!(error.contains("min_free_space"), "{error}");
    let status = status(&h).await;
    assert_eq!(
        status["jobs"][0]["latest_run"]["chunks"]["ready"], 1,
        "{status:#}"
    );
    assert_eq!(requests(&h, "dataset"), 0, "nothing downloaded meanwhile");
    h.write_config("min_free_space = \"1KiB\"\n");
    d.signal(SIGHUP);
    d.wait_for_line("run complete").await;
    assert_eq!(h.manifest("disk")["rows"], 4);
    assert_eq!(h.ledger().len(), 1);
    assert_eq!(requests(&h, "dataset"), 1);
    d.signal(SIGTERM);
    assert_eq!(d.wait().await, 0);
}

/// A chunk that cannot write its part file (here its job's output path
/// is a file, as a read-only disk would refuse it too) shows why in
/// `status` while it retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_stuck_on_its_part_file_shows_why_in_status() {
    let mut h = Harness::new("[defaults]\nbuild_time = \"50ms\"\n").await;
    h.env
        .push(("HARVESTD_ADMIN_LISTEN".into(), "127.0.0.1:0".into()));
    h.write_inputs("in.csv", 2);
    h.write_job("stuck.toml", &job("c_stuck000001", "in.csv", 2));
    std::fs::create_dir_all(h.path("out")).unwrap();
    std::fs::write(h.path("out/stuck"), b"not a directory").unwrap();
    let d = h.start_daemon().await;
    let error = status_until(&h, Duration::from_secs(20), last_error("stuck")).await;
    assert!(error.contains("part file"), "{error}");
    let table = h.run(&["status"]).await.1;
    assert!(table.contains("part file"), "{table}");
    d.signal(SIGTERM);
    assert_eq!(d.wait().await, 0);
}
