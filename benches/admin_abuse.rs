//! Benchmark: the admin API under local abuse (issue 17, `docs/admin-api.md`).
//!
//! 1. Run completions per second on 5,000 one-chunk jobs, in one daemon:
//!    5 s without admin requests, then while 300 `GET /v1/jobs` are sent 16
//!    at a time, then 5 s without again. Completions are counted from the
//!    daemon's `run complete` lines.
//! 2. `/healthz` latency (p50, p99, max of 200 requests, one at a time)
//!    with 1,100 connections open that each sent half a request and
//!    stopped, the daemon limited to 1,024 descriptors (`ulimit -n 1024`,
//!    soft and hard); this process raises its own soft limit to hold them.
//!
//! `cargo bench --bench admin_abuse [-- RUNS]` (default 3).

// A benchmark is a measuring process, not the daemon: it sleeps through its
// measurement windows and between samples, and exits with its verdict.
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "support/mod.rs"]
mod support;
use support::median;

const JOBS: usize = 5_000;
const FLOOD: usize = 300;
const CONCURRENCY: usize = 16;
const IDLE: usize = 1_100;

/// Starts the daemon in `dir` under `ulimit -n fds`, with the admin API on
/// a free port; counts its `run complete` lines. Returns the child, the
/// counter and the admin address.
fn start(dir: &std::path::Path, url: &str, fds: u32) -> (Child, Arc<AtomicU64>, String) {
    let script = format!("ulimit -n {fds} && exec \"$0\" \"$@\"");
    let mut child = support::daemon(dir, url, "info", &["bash", "-c", &script])
        .env("HARVESTD_ADMIN_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let counter = done.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("\"run complete\"") {
                counter.fetch_add(1, Ordering::Relaxed);
            } else if line.contains("state loaded; ready") {
                let _ = ready_tx.send(());
            } else if line.contains("\"level\":\"ERROR\"") {
                eprintln!("{line}");
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(120))
        .expect("daemon ready");
    let addr = std::fs::read_to_string(dir.join("state/admin.addr")).unwrap();
    (child, done, addr.trim().to_string())
}

/// Kills the daemon if the benchmark panics, so that it does not outlive
/// its directory.
struct Stop(Child);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// Completions per second over `window`.
fn rate(done: &AtomicU64, window: Duration) -> f64 {
    let (n0, t0) = (done.load(Ordering::Relaxed), Instant::now());
    // The benchmark's clock: completions are counted over a fixed window.
    std::thread::sleep(window);
    (done.load(Ordering::Relaxed) - n0) as f64 / t0.elapsed().as_secs_f64()
}

struct Flood {
    before: f64,
    during: f64,
    after: f64,
    seconds: f64,
    request_ms_p50: f64,
}

fn flood(rt: &tokio::runtime::Runtime) -> Flood {
    let (emulator, dir, jobs) = support::setup(rt, "[defaults]\nbuild_time = \"200ms\"\n");
    for i in 0..JOBS {
        std::fs::write(
            jobs.join(format!("j{i:05}.toml")),
            format!(
                "provider = \"scraper_studio\"\ncollector = \"c_flood0001\"\ninputs = [{{ url = \"https://flood.example/{i}\" }}]\nchunk_size = 1\n",
            ),
        )
        .unwrap();
    }
    support::write_config(
        dir.path(),
        "[limits]\nmax_in_flight = 8\ntriggers_per_minute = 600000\nrequests_per_second = 1000\npoll_min_interval = \"50ms\"\npoll_max_interval = \"200ms\"\n",
    );
    // admin_listen = "off" comes first in the file; the environment wins.
    let (child, done, addr) = start(dir.path(), &emulator.url(), 4096);
    let mut child = Stop(child);
    while done.load(Ordering::Relaxed) < 20 {
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = rate(&done, Duration::from_secs(5));
    let (n0, t0) = (done.load(Ordering::Relaxed), Instant::now());
    let latencies = rt.block_on(async {
        let client = reqwest::Client::new();
        let url = format!("http://{addr}/v1/jobs");
        let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
        let mut tasks = Vec::new();
        for _ in 0..FLOOD {
            let (client, url, sem) = (client.clone(), url.clone(), sem.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = sem.acquire_owned().await.unwrap();
                let t = Instant::now();
                let body = client
                    .get(&url)
                    .send()
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap();
                assert!(body.len() > JOBS * 50, "every job listed");
                t.elapsed().as_secs_f64()
            }));
        }
        let mut l = Vec::new();
        for t in tasks {
            l.push(t.await.unwrap());
        }
        l
    });
    let seconds = t0.elapsed().as_secs_f64();
    let during = (done.load(Ordering::Relaxed) - n0) as f64 / seconds;
    let after = rate(&done, Duration::from_secs(5));
    assert!(
        done.load(Ordering::Relaxed) < JOBS as u64,
        "the jobs lasted the whole measurement"
    );
    stop(&mut child.0);
    Flood {
        before,
        during,
        after,
        seconds,
        request_ms_p50: median(latencies) * 1000.0,
    }
}

struct Idle {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn idle(rt: &tokio::runtime::Runtime) -> Idle {
    let (emulator, dir, _jobs) = support::setup(rt, "");
    support::write_config(dir.path(), "");
    let (child, _, addr) = start(dir.path(), &emulator.url(), 1024);
    let mut child = Stop(child);
    let mut latencies = rt.block_on(async {
        use tokio::io::AsyncWriteExt;
        let mut held = Vec::new();
        for _ in 0..IDLE {
            let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            s.write_all(b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
            held.push(s);
        }
        let mut l = Vec::new();
        for _ in 0..200 {
            // A new connection each time, as a health checker makes.
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap();
            let t = Instant::now();
            let r = client.get(format!("http://{addr}/healthz")).send().await;
            let ok = matches!(r, Ok(ref r) if r.status() == 200);
            l.push(if ok {
                t.elapsed().as_secs_f64()
            } else {
                f64::INFINITY
            });
        }
        drop(held);
        l
    });
    stop(&mut child.0);
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize] * 1000.0;
    Idle {
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        max_ms: at(1.0),
    }
}

/// Raises this process's soft descriptor limit to its hard limit, through
/// `prlimit` on our own pid (the crate forbids unsafe code).
fn raise_own_fd_limit() {
    let hard = Command::new("bash")
        .args(["-c", "ulimit -Hn"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let _ = Command::new("prlimit")
        .args(["--pid", &std::process::id().to_string()])
        .arg(format!("--nofile={hard}:"))
        .status();
}

fn main() {
    let runs = support::runs_arg(3);
    raise_own_fd_limit();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let floods: Vec<Flood> = (0..runs).map(|_| flood(&rt)).collect();
    let idles: Vec<Idle> = (0..runs).map(|_| idle(&rt)).collect();
    println!("run completions per second, {JOBS} one-chunk jobs; {FLOOD} GET /v1/jobs, {CONCURRENCY} at a time:");
    println!("  run  before  during  after  flood(s)  request p50(ms)");
    for (i, f) in floods.iter().enumerate() {
        println!(
            "  {:>3}  {:>6.1}  {:>6.1}  {:>5.1}  {:>8.2}  {:>15.1}",
            i + 1,
            f.before,
            f.during,
            f.after,
            f.seconds,
            f.request_ms_p50
        );
    }
    println!("/healthz with {IDLE} half requests open, daemon at ulimit -n 1024 (200 requests):");
    println!("  run  p50(ms)  p99(ms)  max(ms)");
    for (i, r) in idles.iter().enumerate() {
        println!(
            "  {:>3}  {:>7.2}  {:>7.2}  {:>7.2}",
            i + 1,
            r.p50_ms,
            r.p99_ms,
            r.max_ms
        );
    }
}
