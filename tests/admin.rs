//! The admin API and the CLI verbs that use it, against a running daemon.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;

use common::Harness;
use serde_json::Value;

const SIGTERM: i32 = 15;
const SIGHUP: i32 = 1;

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
    assert_eq!(code, 200, "{metrics}");
    for line in metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line.rsplit_once(' ').unwrap();
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("bad sample: {line}"));
        let sample = name.split('{').next().unwrap();
        // A histogram's samples carry suffixes its TYPE line does not.
        let metric = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                sample
                    .strip_suffix(s)
                    .filter(|m| metrics.contains(&format!("# TYPE {m} histogram")))
            })
            .unwrap_or(sample);
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
        metrics
            .lines()
            .any(|l| l.starts_with("harvestd_requests_total{")
                && l.contains("class=\"2xx\"")
                && l.contains("endpoint=\"dca_trigger\"")),
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
    let (code, out, _) = h.run(&["retry", "flaky", "--json"]).await;
    assert_eq!(code, 1, "nothing left to retry");
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (&answer["job"], &answer["action"], &answer["ok"]),
        (&"flaky".into(), &"retry".into(), &false.into()),
        "{answer}"
    );
    assert!(!answer["error"].as_str().unwrap().is_empty(), "{answer}");

    // Cancel: two collections building for an hour.
    h.write_job(
        "slow.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_slow00001\"\ninputs_file = \"in.csv\"\nchunk_size = 5\n",
    );
    h.emulator.wait_for_ledger(5, common::WAIT).await.unwrap();
    let (code, out, stderr) = h.run(&["cancel", "slow", "--json"]).await;
    assert_eq!(code, 0, "{stderr}");
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
    assert!(answer["error"].is_null(), "{answer}");
    assert!(!answer["result"].as_str().unwrap().is_empty(), "{answer}");
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

/// `promtool check metrics` on an answer of `/metrics`: clean, with
/// nothing to say.
fn promtool_check(metrics: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new(common::s3::venv().join("bin/promtool"))
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}\n{metrics}"
    );
}

/// `/metrics` follows Prometheus's conventions, as `promtool check
/// metrics` lints them, before any work and after a run: units last,
/// `_total` counters, a build info gauge, histograms of request latency
/// and build time, no breakdown beside its own sum, a charset, and no
/// last-poll time before the first poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_prometheus_conventions() {
    let mut h = Harness::new("[defaults]\nbuild_time = \"50ms\"\n").await;
    h.env
        .push(("HARVESTD_ADMIN_LISTEN".into(), "127.0.0.1:0".into()));
    let mut d = h.start_daemon().await;
    let base = format!("http://{}", admin_addr(&h));
    let answer = reqwest::get(format!("{base}/metrics")).await.unwrap();
    assert_eq!(
        answer.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let before = answer.text().await.unwrap();
    promtool_check(&before);
    assert!(
        before.contains(&format!(
            "harvestd_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{before}"
    );
    assert!(
        !before.contains("harvestd_last_successful_poll_timestamp_seconds "),
        "no poll yet, so no time of one: {before}"
    );

    h.write_inputs("in.csv", 6);
    h.write_job(
        "m.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_metrics001\"\ninputs_file = \"in.csv\"\nchunk_size = 2\n",
    );
    d.wait_for_line("run complete").await;
    let after = h.metrics().await;
    promtool_check(&after);
    for needle in [
        "# TYPE harvestd_request_duration_seconds histogram",
        "harvestd_request_duration_seconds_count{api=\"scraper_studio\",endpoint=\"dca_trigger\"} 3",
        "# TYPE harvestd_build_duration_seconds histogram",
        "harvestd_build_duration_seconds_count{provider=\"scraper_studio\"} 3",
        "harvestd_build_duration_seconds_bucket{provider=\"scraper_studio\",le=\"+Inf\"} 3",
        "# TYPE harvestd_written_bytes_total counter",
        "harvestd_last_successful_poll_timestamp_seconds ",
    ] {
        assert!(after.contains(needle), "{needle}\n{after}");
    }
    assert!(!after.contains("bytes_written"), "the unit comes last");
    assert!(
        !after.contains("settled=\"any\""),
        "no sum beside its breakdown"
    );
    d.signal(SIGTERM);
    assert_eq!(d.wait().await, 0);
}

/// The daemon's admin address once it is ready.
fn admin_addr(h: &Harness) -> String {
    std::fs::read_to_string(h.path("state/admin.addr"))
        .unwrap()
        .trim()
        .to_string()
}

/// Seconds of CPU the process has used (utime + stime from /proc).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which ends with the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // USER_HZ is 100 on every Linux this runs on.
    ticks / 100.0
}

/// `/healthz` answers 200 within `within`, on a new connection.
async fn healthz_within(addr: &str, within: std::time::Duration) -> bool {
    let client = reqwest::Client::builder().timeout(within).build().unwrap();
    matches!(
        client.get(format!("http://{addr}/healthz")).send().await,
        Ok(r) if r.status() == 200
    )
}

/// Opens `n` connections that each send half a request and stop.
async fn half_requests(addr: &str, n: usize) -> Vec<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut held = Vec::new();
    for _ in 0..n {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        held.push(s);
    }
    held
}

/// Waits until the server closes `s` (EOF or reset); false if it has not
/// within `within`.
async fn closed_within(s: &mut tokio::net::TcpStream, within: std::time::Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_its_headers_is_closed_after_the_header_timeout() {
    let mut h = Harness::new("").await;
    h.env
        .push(("HARVESTD_ADMIN_LISTEN".into(), "127.0.0.1:0".into()));
    h.env
        .push(("HARVESTD_ADMIN_HEADER_TIMEOUT_MS".into(), "300".into()));
    let d = h.start_daemon().await;
    let addr = admin_addr(&h);
    let mut half = half_requests(&addr, 1).await.pop().unwrap();
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let within = std::time::Duration::from_secs(15);
    assert!(
        closed_within(&mut half, within).await,
        "half a request still open after {within:?}"
    );
    assert!(
        closed_within(&mut silent, within).await,
        "a silent connection still open after {within:?}"
    );
    assert!(healthz_within(&addr, std::time::Duration::from_secs(5)).await);
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_beyond_the_cap_do_not_lock_out_healthz() {
    let mut h = Harness::new("").await;
    h.env
        .push(("HARVESTD_ADMIN_LISTEN".into(), "127.0.0.1:0".into()));
    // 128 descriptors: the cap is 32, far fewer than the 300 below, and
    // without a cap the daemon would run out of descriptors.
    let mut d = h
        .start_command(h.command_with_fd_limit(128, &["run"]))
        .await;
    let addr = admin_addr(&h);
    let held = half_requests(&addr, 300).await;
    assert!(
        healthz_within(&addr, std::time::Duration::from_secs(5)).await,
        "/healthz did not answer with 300 half requests open"
    );
    // The daemon still does its work: a job dropped now runs.
    h.write_inputs("in.csv", 4);
    h.write_job(
        "after.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_after0001\"\ninputs_file = \"in.csv\"\nchunk_size = 2\n",
    );
    d.wait_for_line("run complete").await;
    drop(held);
    d.signal(SIGTERM);
    assert_eq!(d.wait().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_does_not_spin() {
    let mut h = Harness::new("").await;
    h.env
        .push(("HARVESTD_ADMIN_LISTEN".into(), "127.0.0.1:0".into()));
    // A cap above the descriptor limit, so accepting fails with EMFILE.
    h.env
        .push(("HARVESTD_ADMIN_MAX_CONNECTIONS".into(), "10000".into()));
    let d = h.start_command(h.command_with_fd_limit(96, &["run"])).await;
    let pid = d.child.id().unwrap();
    let addr = admin_addr(&h);
    let held = half_requests(&addr, 200).await;
    // Every descriptor is taken: accepting fails with EMFILE from now on.
    let open_fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    tokio::time::timeout(common::WAIT, async {
        while open_fds() < 96 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the daemon never ran out of descriptors: {}", open_fds()));
    let (cpu, wall) = (cpu_seconds(pid), std::time::Instant::now());
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let used = cpu_seconds(pid) - cpu;
    let share = used / wall.elapsed().as_secs_f64();
    assert!(
        share < 0.2,
        "the daemon used {:.0} % of a core while out of descriptors",
        share * 100.0
    );
    drop(held);
    assert!(
        healthz_within(&addr, std::time::Duration::from_secs(10)).await,
        "/healthz answers once the connections are gone"
    );
    d.signal(SIGTERM);
    assert_eq!(d.wait().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_others_can_read_is_refused_at_start_and_on_reload() {
    let mut h = Harness::new("").await;
    h.token = String::new();
    let token_file = h.path("bd-token");
    std::fs::write(
        &token_file,
        format!("{}\n", harvestd::emulator::DEMO_BRIGHTDATA_TOKEN),
    )
    .unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    h.write_config(&format!(
        "[providers.brightdata]\ntoken_file = \"{}\"\n",
        token_file.display()
    ));
    h.env
        .push(("HARVESTD_ADMIN_LISTEN".into(), "127.0.0.1:0".into()));
    let (code, _, stderr) = h.run(&["run"]).await;
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains(&token_file.display().to_string()),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("chmod 600 {}", token_file.display())),
        "{stderr}"
    );

    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut d = h.start_daemon().await;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o640)).unwrap();
    d.signal(SIGHUP);
    let line = d.wait_for_line("configuration not reloaded").await;
    assert!(line.contains("chmod 600"), "{line}");
    // The daemon keeps running with the configuration in force.
    assert!(healthz_within(&admin_addr(&h), std::time::Duration::from_secs(5)).await);
    d.signal(SIGTERM);
    assert_eq!(d.wait().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_mode_is_restored_and_lower_case_bearer_is_accepted() {
    let mut h = Harness::new("").await;
    h.env
        .push(("HARVESTD_ADMIN_LISTEN".into(), "127.0.0.1:0".into()));
    let token_path = h.path("state/admin.token");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let d = h.start_daemon().await;
    d.signal(SIGTERM);
    assert_eq!(d.wait().await, 0);

    // Changed while stopped: restored at start.
    std::fs::set_permissions(&token_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut d = h.start_daemon().await;
    assert_eq!(mode(&token_path), 0o600);
    assert!(
        d.seen
            .iter()
            .any(|l| l.contains("admin token was readable")),
        "warned"
    );

    // Changed while running: restored at SIGHUP.
    std::fs::set_permissions(&token_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    d.signal(SIGHUP);
    d.wait_for_line("admin token was readable").await;
    assert_eq!(mode(&token_path), 0o600);

    // The scheme's case does not matter; the token still does.
    let token = std::fs::read_to_string(&token_path).unwrap();
    let url = format!("http://{}/v1/jobs/nothing/cancel", admin_addr(&h));
    let client = reqwest::Client::new();
    for (header, status) in [
        (format!("bearer {}", token.trim()), 409),
        (format!("BEARER {}", token.trim()), 409),
        ("bearer wrong".to_string(), 401),
    ] {
        let r = client
            .post(&url)
            .header("Authorization", &header)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            status,
            "{}",
            header.split(' ').next().unwrap()
        );
    }
    d.signal(SIGTERM);
    assert_eq!(d.wait().await, 0);
}
