//! The admin API and the CLI verbs that use it, against a running daemon.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;

use common::Harness;
use serde_json::Value;

const SIGTERM: i32 = 15;

async fn get(url: String) -> (u16, String) {
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_metrics_and_rerun_on_a_running_daemon() {
    let mut h = Harness::new("[defaults]\nbuild_time = \"50ms\"\n").await;
    h.env
        .push(("HARVESTD_ADMIN_LISTEN".into(), "127.0.0.1:0".into()));
    h.write_inputs("in.csv", 6);
    h.write_job(
        "nightly.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_nightly001\"\ninputs_file = \"in.csv\"\nchunk_size = 2\ncron = \"0 2 * * *\"\n",
    );
    h.write_job(
        "bad.toml",
        "provider = \"scraper_studio\"\ncolector = \"c_x\"\n",
    );

    // No daemon yet: the CLI says so with exit 69.
    let (code, _, stderr) = h.run(&["status"]).await;
    assert_eq!(code, 69, "{stderr}");

    let mut d = h.start_daemon().await;
    d.wait_for_line("run complete").await;
    let addr = std::fs::read_to_string(h.path("state/admin.addr"))
        .unwrap()
        .trim()
        .to_string();
    let base = format!("http://{addr}");
    assert_eq!(get(format!("{base}/healthz")).await.0, 200);
    assert_eq!(get(format!("{base}/readyz")).await.0, 200);
    let mode = std::fs::metadata(h.path("state/admin.token"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    let (code, out, stderr) = h.run(&["status", "--json"]).await;
    assert_eq!(code, 0, "{stderr}");
    let status: Value = serde_json::from_str(&out).unwrap();
    let jobs = status["jobs"].as_array().unwrap();
    let nightly = jobs.iter().find(|j| j["job"] == "nightly").unwrap();
    assert_eq!(nightly["latest_run"]["state"], "complete");
    assert_eq!(nightly["latest_run"]["chunks"]["downloaded"], 3);
    assert_eq!(nightly["latest_run"]["rows"], 6);
    assert!(
        nightly["next_due"].as_str().unwrap().contains("T02:00:00"),
        "{nightly}"
    );
    let bad = jobs.iter().find(|j| j["job"] == "bad").unwrap();
    assert_eq!(bad["state"], "invalid");

    let (code, table, _) = h.run(&["status"]).await;
    assert_eq!(code, 0);
    assert!(table.starts_with("JOB"), "{table}");
    let line = table.lines().find(|l| l.starts_with("nightly")).unwrap();
    assert!(
        line.contains("complete") && line.contains("3/3") && line.contains("T02:00:00"),
        "{line}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("bad") && l.contains("colector")),
        "{table}"
    );

    // Metrics: Prometheus text, every sample parses, no remote ids as labels.
    let (code, metrics) = get(format!("{base}/metrics")).await;
    assert_eq!(code, 200);
    for line in metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line.rsplit_once(' ').unwrap();
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("bad sample: {line}"));
        let metric = name.split('{').next().unwrap();
        assert!(metric.starts_with("harvestd_"), "{line}");
        assert!(
            metrics.contains(&format!("# TYPE {metric} ")),
            "untyped: {line}"
        );
    }
    assert!(
        metrics.contains("harvestd_runs{state=\"complete\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("harvestd_triggers_total 3"), "{metrics}");
    assert!(
        metrics.contains("endpoint=\"dca_trigger\",class=\"2xx\""),
        "{metrics}"
    );
    assert!(!metrics.contains("j_"), "remote ids never become labels");

    // Mutating calls need the token; the CLI reads it from admin.token.
    let unauthorised = reqwest::Client::new()
        .post(format!("{base}/v1/jobs/nightly/rerun"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorised.status().as_u16(), 401);
    assert_eq!(h.ledger().len(), 3);
    let (code, out, stderr) = h.run(&["rerun", "nightly"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(out.contains("started run"), "{out}");
    d.wait_for_line("run complete").await;
    assert_eq!(
        h.ledger().len(),
        6,
        "the rerun triggered the unchanged job again"
    );

    d.signal(SIGTERM);
    assert_eq!(d.wait().await, 0);
    assert!(
        !h.path("state/admin.addr").exists(),
        "a stopped daemon leaves no stale address"
    );
}

/// Every file below `dir`, recursively.
fn files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_symlink() {
            continue;
        }
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_appears_nowhere() {
    const TOKEN: &str = "tok-SECRET-7f3a9c21e8b4";
    let mut h = Harness::new(&format!(
        "tokens = [\"{TOKEN}\"]\n[defaults]\nbuild_time = \"50ms\"\n"
    ))
    .await;
    h.token = TOKEN.into();
    h.env
        .push(("HARVESTD_ADMIN_LISTEN".into(), "127.0.0.1:0".into()));
    // Every level, every crate: nothing may print it, not even at trace.
    h.env.push(("RUST_LOG".into(), "trace".into()));
    h.write_inputs("in.csv", 6);
    h.write_job(
        "secret.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_secret0001\"\ninputs_file = \"in.csv\"\nchunk_size = 3\n",
    );
    let mut d = h.start_daemon().await;
    d.wait_for_line("run complete").await;
    let (code, status, status_err) = h.run(&["status", "--json"]).await;
    assert_eq!(code, 0, "{status_err}");
    d.signal(SIGTERM);
    let (code, logs) = d.wait_all().await;
    assert_eq!(code, 0);
    assert!(
        logs.len() > 50,
        "trace logging was on: {} lines",
        logs.len()
    );

    for line in logs.iter().chain([&status, &status_err]) {
        assert!(!line.contains(TOKEN), "token in output: {line}");
    }
    let mut checked = 0;
    for file in files(&h.path("state"))
        .into_iter()
        .chain(files(&h.path("out")))
    {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !bytes.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()),
            "token in {}",
            file.display()
        );
        checked += 1;
    }
    assert!(
        checked > 10,
        "state and outputs were searched ({checked} files)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_finishes_a_partial_run_and_cancel_stops_one() {
    // The first trigger is refused (422): that chunk fails, the run is partial.
    let mut h = Harness::new(
        "[defaults]\nbuild_time = \"50ms\"\n[collectors.c_slow00001]\nbuild_time = \"1h\"\n\
         [[faults]]\nendpoint = \"trigger\"\nkey = \"c_retry00001\"\nkind = \"status\"\nstatus = 422\nbody = \"text\"\nfirst = 1\n",
    )
    .await;
    h.env
        .push(("HARVESTD_ADMIN_LISTEN".into(), "127.0.0.1:0".into()));
    h.write_inputs("in.csv", 9);
    h.write_job(
        "flaky.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_retry00001\"\ninputs_file = \"in.csv\"\nchunk_size = 3\n",
    );
    let mut d = h.start_daemon().await;
    d.wait_for_line("run did not complete").await;
    let run = h.run_dir("flaky");
    assert_eq!(
        common::read_json(&run.join("manifest.json"))["state"],
        "partial"
    );

    let (code, out, stderr) = h.run(&["retry", "flaky"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(out.contains("1 chunk(s)"), "{out}");
    d.wait_for_line("run complete").await;
    let manifest = common::read_json(&run.join("manifest.json"));
    assert_eq!(
        manifest["state"], "complete",
        "same run directory, now complete"
    );
    assert_eq!(manifest["rows"], 9);
    assert!(run.join("_SUCCESS").exists());
    assert_eq!(
        h.ledger().len(),
        3,
        "only the failed chunk was triggered again"
    );
    let (code, _, _) = h.run(&["retry", "flaky"]).await;
    assert_eq!(code, 1, "nothing left to retry");

    // Cancel: two collections building for an hour.
    h.write_job(
        "slow.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_slow00001\"\ninputs_file = \"in.csv\"\nchunk_size = 5\n",
    );
    h.emulator.wait_for_ledger(5, common::WAIT).await.unwrap();
    let (code, out, stderr) = h.run(&["cancel", "slow"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(out.contains("cancelling"), "{out}");
    d.wait_for_line("state\":\"cancelled").await;
    let manifest = h.manifest("slow");
    assert_eq!(manifest["state"], "cancelled");
    assert!(manifest["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["state"] == "cancelled"));
    assert_eq!(
        h.emulator.stats().requests["cancel"],
        2,
        "both collections cancelled at the provider"
    );
    assert_eq!(h.ledger().len(), 5);
    d.signal(SIGTERM);
    assert_eq!(d.wait().await, 0);
}
