//! `output_dir = "s3://…"` (`docs/object-storage.md`) against a real
//! S3-compatible server on loopback (moto's server mode; see
//! `tests/common/s3.rs`): the layout with each object's sha256, the upload
//! order, Parquet read back by pyarrow from the bucket, `kill -9` during
//! an upload, the store going away and coming back, refused credentials,
//! and throttling.
#![allow(clippy::unwrap_used)]

mod common;

use common::receiver::Receiver;
use common::s3::{venv, BUCKET, S3};
use common::{assert_agree, Harness};
use serde_json::Value;
use sha2::{Digest, Sha256};

const SCENARIO: &str = "[defaults]\nbuild_time = \"100ms\"\nerror_every = 9\n";

/// A Scraper Studio job of `inputs` URLs in chunks of 50, to csv, json and
/// parquet.
fn write_job(h: &Harness, job: &str, inputs: usize) {
    let urls: String = (0..inputs)
        .map(|i| format!("https://shop.example.com/p/{i:04}\n"))
        .collect();
    std::fs::write(h.path(&format!("jobs/{job}.txt")), urls).unwrap();
    h.write_job(
        &format!("{job}.toml"),
        &format!(
            "provider = \"scraper_studio\"\ncollector = \"c_lake00001\"\nchunk_size = 50\n\
             inputs_file = \"{job}.txt\"\nformats = [\"csv\", \"json\", \"parquet\"]\n"
        ),
    );
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Every object of the job's one run, checked against its manifest: the
/// objects the layout names and no other, each with the manifest's
/// sha256, `_SUCCESS` empty and `latest` naming the run. Returns the
/// run id and the manifest.
async fn assert_run_in_bucket(s3: &S3, prefix: &str, job: &str) -> (String, Value) {
    let latest = s3
        .get(&format!("{prefix}/{job}/latest"))
        .await
        .expect("latest written");
    let run_id = String::from_utf8(latest).unwrap();
    assert!(run_id.ends_with('\n'), "latest is the run id and a newline");
    let run_id = run_id.trim().to_string();
    let at = |file: &str| format!("{prefix}/{job}/{run_id}/{file}");
    let manifest: Value =
        serde_json::from_slice(&s3.get(&at("manifest.json")).await.unwrap()).unwrap();
    assert_eq!(manifest["state"], "complete");
    let mut expected: Vec<String> = vec![
        format!("{prefix}/{job}/latest"),
        at("_SUCCESS"),
        at("manifest.json"),
    ];
    for output in manifest["outputs"].as_array().unwrap() {
        let file = output["file"].as_str().unwrap();
        let body = s3.get(&at(file)).await.expect(file);
        assert_eq!(
            sha256(&body),
            output["sha256"].as_str().unwrap(),
            "{file}: the object is what the manifest says"
        );
        assert_eq!(body.len() as u64, output["bytes"].as_u64().unwrap());
        expected.push(at(file));
    }
    expected.sort();
    assert_eq!(
        s3.keys(&format!("{prefix}/{job}")).await,
        expected,
        "the layout's objects and nothing else (no parts)"
    );
    assert_eq!(s3.get(&at("_SUCCESS")).await.unwrap(), b"");
    (run_id, manifest)
}

/// Rows of a Parquet object read by pyarrow straight from the bucket, as
/// a reader of the lake would, as JSON.
fn pyarrow_rows(s3: &S3, key: &str) -> Vec<Value> {
    let script = format!(
        "import json, sys, pyarrow.fs as fs, pyarrow.parquet as pq\n\
         s3 = fs.S3FileSystem(endpoint_override='{}', scheme='http', access_key='testing', secret_key='testing', region='us-east-1')\n\
         t = pq.read_table('{BUCKET}/{key}', filesystem=s3)\n\
         for row in t.to_pylist():\n    print(json.dumps(row, default=str))\n",
        s3.server_addr
    );
    let out = std::process::Command::new(venv().join("bin/python"))
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pyarrow: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            // pyarrow lists a struct's null fields as null; the JSON rows
            // leave them out, as the Rust reader does.
            let mut v: Value = serde_json::from_str(l).unwrap();
            drop_nulls(&mut v);
            v
        })
        .collect()
}

fn drop_nulls(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.retain(|_, x| !x.is_null());
            map.values_mut().for_each(drop_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

/// The whole layout lands in the bucket, objects in the order readers
/// depend on (data, errors, manifest, `_SUCCESS`, `latest`), each with the
/// manifest's sha256; Parquet reads back from the bucket with pyarrow as
/// `data.json` says, row by row; staging is emptied; nothing is written
/// to a local `out/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_lands_in_the_bucket_in_order_and_reads_back() {
    let s3 = S3::start(false).await;
    let mut h = Harness::new(SCENARIO).await;
    s3.attach(&mut h, "harvest/team-a");
    write_job(&h, "shop", 120);

    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");
    let (run_id, manifest) = assert_run_in_bucket(&s3, "harvest/team-a", "shop").await;
    assert_eq!(manifest["inputs"], 120);
    assert!(
        manifest["error_rows"].as_u64().unwrap() > 0,
        "errors.ndjson has rows"
    );

    // The order of the PUTs as the server got them.
    let puts: Vec<String> = s3
        .proxy
        .passed()
        .into_iter()
        .filter(|r| r.starts_with("PUT "))
        .map(|r| r.rsplit('/').next().unwrap().to_string())
        .collect();
    assert_eq!(
        puts,
        [
            "data.csv",
            "data.json",
            "data.parquet",
            "errors.ndjson",
            "manifest.json",
            "_SUCCESS",
            "latest"
        ],
        "upload order"
    );

    let json: Value = serde_json::from_slice(
        &s3.get(&format!("harvest/team-a/shop/{run_id}/data.json"))
            .await
            .unwrap(),
    )
    .unwrap();
    let back = pyarrow_rows(&s3, &format!("harvest/team-a/shop/{run_id}/data.parquet"));
    assert_agree(&back, json.as_array().unwrap());

    assert!(
        !h.path(&format!("state/staging/shop/{run_id}")).exists(),
        "staging of the run removed once latest is written"
    );
    assert!(!h.path("out").exists(), "no local output directory");
    assert_eq!(h.ledger().len(), 3, "one trigger per chunk");
}

/// `kill -9` with a multipart upload begun (its id stored, no part sent),
/// then again after the first object: each restart goes on from the
/// record without a new trigger, aborts the upload the crash left, and
/// the bucket ends with every object whole and as the manifest says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_the_upload_finishes_later_without_a_new_trigger() {
    let s3 = S3::start(false).await;
    // Rows of ~4 KB: data.json of 2,400 rows is ~10 MB, past one part.
    let mut h = Harness::new("[defaults]\nbuild_time = \"100ms\"\nrow_bytes = 4096\n").await;
    s3.attach(&mut h, "kill");
    write_job(&h, "big", 2400);
    let base_env = h.env.clone();

    for point in ["after-multipart-begun", "after-upload-object"] {
        h.env = base_env.clone();
        h.env.push(("FAILPOINTS".into(), format!("{point}=return")));
        let (code, _, stderr) = h.run_once().await;
        assert_ne!(code, 0, "{point}: killed\n{stderr}");
        if point == "after-multipart-begun" {
            assert_eq!(
                s3.open_multipart_uploads().await,
                1,
                "the kill left a multipart upload open"
            );
        }
    }
    let triggers = h.ledger().len();
    assert_eq!(triggers, 48, "every chunk triggered once before the kills");
    assert!(
        s3.keys("kill/big")
            .await
            .iter()
            .all(|k| !k.ends_with("_SUCCESS")),
        "no _SUCCESS before the upload is done"
    );

    h.env = base_env;
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");
    assert_run_in_bucket(&s3, "kill", "big").await;
    assert_eq!(h.ledger().len(), triggers, "no new trigger after the kills");
    assert_eq!(
        s3.open_multipart_uploads().await,
        0,
        "the multipart upload the kill left was aborted"
    );
}

/// The store goes away under a running daemon: the run's upload fails,
/// `status` and `/metrics` say so and why, `upload.failing` is told once;
/// the store comes back and the upload finishes, with nothing triggered
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_goes_away_and_comes_back_gets_the_run() {
    let s3 = S3::start(false).await;
    let receiver = Receiver::start(([127, 0, 0, 1], 0).into(), &[]).await;
    let mut h = Harness::new(SCENARIO).await;
    s3.attach(&mut h, "down");
    h.write_config(&format!(
        "{}\n[[notify]]\nurl = \"http://{}/hook\"\nevents = [\"upload.failing\", \"run.complete\"]\n",
        s3.config(),
        receiver.addr
    ));
    h.env
        .push(("HARVESTD_ADMIN_LISTEN".into(), "127.0.0.1:0".into()));
    s3.proxy.down();
    let mut daemon = h.start_daemon().await;
    write_job(&h, "shop", 60);

    daemon.wait_for_line("upload failing").await;
    let got = receiver.wait_for(1).await;
    assert_eq!(got[0].body["event"], "upload.failing");
    assert_eq!(got[0].body["job"], "shop");

    let (code, out, stderr) = h.run(&["status", "--json"]).await;
    assert_eq!(code, 0, "{stderr}");
    let status: Value = serde_json::from_str(&out).unwrap();
    let upload = &status["jobs"][0]["latest_run"]["upload"];
    assert_eq!(upload["state"], "failing", "{status}");
    assert_eq!(upload["to"], "s3://lake/down");
    assert!(!upload["error"].as_str().unwrap().is_empty());
    let (_, table, _) = h.run(&["status"]).await;
    assert!(table.contains("complete (upload failing)"), "{table}");
    assert!(table.contains("UPLOAD FAILING"), "{table}");
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("harvestd_uploads{state=\"failing\"} 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("harvestd_upload_failures_total 0\n"),
        "{metrics}"
    );

    s3.proxy.up().await;
    daemon.wait_for_line("upload recovered").await;
    daemon.wait_for_line("run complete").await;
    assert_run_in_bucket(&s3, "down", "shop").await;
    let got = receiver.wait_for(2).await;
    let events: Vec<&str> = got
        .iter()
        .map(|g| g.body["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        ["upload.failing", "run.complete"],
        "failing told once, then the end"
    );
    assert_eq!(h.ledger().len(), 2);
    daemon.signal(15);
    assert_eq!(daemon.wait().await, 0);
}

/// Credentials the store refuses: the upload fails with the store's
/// reason, the run's files stay in staging, and once the daemon is given a
/// store that takes them the run lands without a new trigger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_fail_with_the_reason_and_lose_nothing() {
    let strict = S3::start(true).await;
    let mut h = Harness::new(SCENARIO).await;
    strict.attach(&mut h, "creds");
    // Distinctive values, to look for: the server's error names the key id.
    h.env.retain(|(k, _)| !k.starts_with("AWS_"));
    h.env
        .push(("AWS_ACCESS_KEY_ID".into(), "AKIAHARVESTD0TEST001".into()));
    h.env.push((
        "AWS_SECRET_ACCESS_KEY".into(),
        "harvestd-secret-never-shown".into(),
    ));
    h.env
        .push(("HARVESTD_ADMIN_LISTEN".into(), "127.0.0.1:0".into()));
    let mut daemon = h.start_daemon().await;
    write_job(&h, "shop", 60);
    let line = daemon.wait_for_line("upload failing").await;
    assert!(
        line.contains("InvalidAccessKeyId") || line.contains("403"),
        "the store's reason is named: {line}"
    );
    let (_, status, _) = h.run(&["status", "--json"]).await;
    assert!(status.contains("InvalidAccessKeyId"), "{status}");
    daemon.signal(15);
    let (code, lines) = daemon.wait_all().await;
    assert_eq!(code, 0);
    for text in lines.iter().chain(std::iter::once(&status)) {
        assert!(
            !text.contains("AKIAHARVESTD0TEST001") && !text.contains("harvestd-secret-never-shown"),
            "credentials are never logged or shown: {text}"
        );
    }
    let staged = std::fs::read_dir(h.path("state/staging/shop"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .expect("the run is staged");
    assert!(staged.join("manifest.json").exists() && staged.join("data.parquet").exists());

    let good = S3::start(false).await;
    h.env.clear();
    good.attach(&mut h, "creds");
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");
    assert_run_in_bucket(&good, "creds", "shop").await;
    assert_eq!(h.ledger().len(), 2);
}

/// `503 SlowDown` answers are waited out and retried; the run lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_answers_are_retried() {
    let s3 = S3::start(false).await;
    let mut h = Harness::new(SCENARIO).await;
    s3.attach(&mut h, "slow");
    write_job(&h, "shop", 60);
    s3.proxy.throttle(3);
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        s3.proxy.throttled.load(std::sync::atomic::Ordering::SeqCst),
        3
    );
    assert_run_in_bucket(&s3, "slow", "shop").await;
}

/// `run --once` with the store down does not wait without bound: it ends
/// with exit 1 naming the upload, the run kept in staging; the next
/// `run --once` with the store back uploads it without a new trigger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_with_the_store_down_ends_and_the_next_one_uploads() {
    let s3 = S3::start(false).await;
    let mut h = Harness::new(SCENARIO).await;
    s3.attach(&mut h, "once");
    write_job(&h, "shop", 60);
    s3.proxy.down();
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("its upload failing"), "{stderr}");
    assert!(s3.keys("once").await.is_empty());

    s3.proxy.up().await;
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");
    assert_run_in_bucket(&s3, "once", "shop").await;
    assert_eq!(h.ledger().len(), 2, "no new trigger");
}

/// A partial run lands without `_SUCCESS` or `latest` and keeps its parts
/// in staging; `retry` rebuilds its files from them and the complete run
/// lands over it, with `_SUCCESS` and `latest`, only the failed chunk
/// triggered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_run_retried_lands_complete() {
    let s3 = S3::start(false).await;
    // The first trigger is refused (422): that chunk fails.
    let mut h = Harness::new(
        "[defaults]\nbuild_time = \"50ms\"\n\
         [[faults]]\nendpoint = \"trigger\"\nkey = \"c_lake00001\"\nkind = \"status\"\nstatus = 422\nbody = \"text\"\nfirst = 1\n",
    )
    .await;
    s3.attach(&mut h, "retry");
    h.env
        .push(("HARVESTD_ADMIN_LISTEN".into(), "127.0.0.1:0".into()));
    let mut daemon = h.start_daemon().await;
    write_job(&h, "shop", 150);
    daemon.wait_for_line("run did not complete").await;
    let keys = s3.keys("retry/shop").await;
    assert!(
        keys.iter().any(|k| k.ends_with("/manifest.json")),
        "{keys:?}"
    );
    assert!(
        !keys
            .iter()
            .any(|k| k.ends_with("_SUCCESS") || k.ends_with("latest")),
        "no _SUCCESS or latest for a partial run: {keys:?}"
    );
    let run_id = keys[0].split('/').nth(2).unwrap().to_string();
    assert!(
        h.path(&format!("state/staging/shop/{run_id}/parts"))
            .exists(),
        "a partial run keeps its parts in staging"
    );

    let (code, out, stderr) = h.run(&["retry", "shop"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(out.contains("1 chunk(s)"), "{out}");
    daemon.wait_for_line("run complete").await;
    let (again, manifest) = assert_run_in_bucket(&s3, "retry", "shop").await;
    assert_eq!(again, run_id, "the same run, now complete");
    assert_eq!(manifest["inputs"], 150);
    assert_eq!(
        h.ledger().len(),
        3,
        "only the failed chunk was triggered again"
    );
    daemon.signal(15);
    assert_eq!(daemon.wait().await, 0);
}

/// `output_dir` changed while a run was half uploaded: the new place gets
/// the whole run, not the rest of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_output_dir_gets_the_whole_run() {
    let s3 = S3::start(false).await;
    let mut h = Harness::new(SCENARIO).await;
    s3.attach(&mut h, "first");
    write_job(&h, "shop", 60);
    let base_env = h.env.clone();
    h.env
        .push(("FAILPOINTS".into(), "after-upload-object=return".into()));
    let (code, _, stderr) = h.run_once().await;
    assert_ne!(code, 0, "killed after the first object\n{stderr}");
    assert_eq!(s3.keys("first/shop").await.len(), 1, "one object sent");

    h.env = base_env;
    h.env.retain(|(k, _)| k != "HARVESTD_OUTPUT_DIR");
    h.env.push((
        "HARVESTD_OUTPUT_DIR".into(),
        format!("s3://{BUCKET}/second"),
    ));
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("output_dir changed"), "{stderr}");
    assert_run_in_bucket(&s3, "second", "shop").await;
    assert_eq!(h.ledger().len(), 2, "no new trigger");
}

/// `run --recover` after the store is lost: a run killed before its
/// upload began is uploaded (its end read from the staged manifest); a run
/// already uploaded, whose staging is gone, stays finished (its end kept
/// in `run.json`) and costs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_finishes_an_upload_and_leaves_an_uploaded_run_alone() {
    let s3 = S3::start(false).await;
    let mut h = Harness::new(SCENARIO).await;
    s3.attach(&mut h, "recover");
    write_job(&h, "shop", 60);
    let base_env = h.env.clone();
    // Killed with the run's files staged and the run not yet recorded
    // finished: only the staged manifest says it is.
    h.env
        .push(("FAILPOINTS".into(), "after-success=return".into()));
    let (code, _, stderr) = h.run_once().await;
    assert_ne!(code, 0, "killed after _SUCCESS was staged\n{stderr}");

    for round in ["mid-upload", "uploaded"] {
        // The store is lost: sled's data file emptied.
        let data = common::sled_data_file(&h.path("state"));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&data)
            .unwrap()
            .set_len(0)
            .unwrap();
        h.env = base_env.clone();
        let (code, _, stderr) = h.run(&["run", "--once", "--recover"]).await;
        assert_eq!(code, 0, "{round}: {stderr}");
        assert_run_in_bucket(&s3, "recover", "shop").await;
        assert_eq!(h.ledger().len(), 2, "{round}: no new trigger");
        assert!(
            !stderr.contains("upload failing"),
            "{round}: nothing left to upload from a staging that is gone: {stderr}"
        );
    }
}
