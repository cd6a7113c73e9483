//! What the benchmarks share: the RUNS argument, medians, and `harvestd run
//! --once` under GNU time against an emulator.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};

use harvestd::emulator::{Emulator, DEMO_BRIGHTDATA_TOKEN};

/// The first number among the arguments (`cargo bench` adds `--bench`).
pub fn runs_arg(default: usize) -> usize {
    std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(default)
}

/// Sizes from a comma-separated environment variable, else `default`.
pub fn sizes_from(var: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(var)
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| default.to_vec())
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// An emulator playing `scenario` (TOML) and a fresh directory with an
/// empty `jobs/` in it.
pub fn setup(
    rt: &tokio::runtime::Runtime,
    scenario: &str,
) -> (Emulator, tempfile::TempDir, std::path::PathBuf) {
    let scenario: harvestd::emulator::Scenario = toml::from_str(scenario).unwrap();
    let emulator = rt
        .block_on(Emulator::start(([127, 0, 0, 1], 0).into(), scenario))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let jobs = dir.path().join("jobs");
    std::fs::create_dir_all(&jobs).unwrap();
    (emulator, dir, jobs)
}

/// What GNU time says of one `harvestd run --once`.
pub struct Timed {
    pub wall: f64,
    pub user: f64,
    pub sys: f64,
    pub rss_mb: f64,
}

impl Timed {
    pub fn cpu(&self) -> f64 {
        self.user + self.sys
    }
}

/// Runs the release binary's `run --once` in `dir` (its `harvestd.toml`)
/// against `emulator`; panics unless it succeeds.
pub fn run_once_timed(dir: &Path, emulator: &Emulator) -> Timed {
    run_once_timed_with(dir, emulator, &[])
}

/// [`run_once_timed`] with more environment.
pub fn run_once_timed_with(dir: &Path, emulator: &Emulator, env: &[(&str, String)]) -> Timed {
    let out = Command::new("/usr/bin/time")
        .args([
            "-f",
            "BENCH %e %U %S %M",
            env!("CARGO_BIN_EXE_harvestd"),
            "run",
            "--once",
        ])
        .arg("--config")
        .arg(dir.join("harvestd.toml"))
        .current_dir(dir)
        .env("HARVESTD_BRIGHTDATA_URL", emulator.url())
        .env("BRIGHT_DATA_API_TOKEN", DEMO_BRIGHTDATA_TOKEN)
        .env("HARVESTD_LOG_FORMAT", "json")
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "run failed:\n{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("BENCH "))
        .expect("GNU time output");
    let f: Vec<f64> = line[6..]
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    Timed {
        wall: f[0],
        user: f[1],
        sys: f[2],
        rss_mb: f[3] / 1024.0,
    }
}

/// VmRSS of a process, MB.
pub fn rss_mb(pid: &str) -> f64 {
    status_mb(pid, "VmRSS:")
}

/// VmHWM of a process, MB: its peak resident memory so far.
pub fn peak_mb(pid: &str) -> f64 {
    status_mb(pid, "VmHWM:")
}

/// A memory figure from `/proc/PID/status` (given in kB), MB.
fn status_mb(pid: &str, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// `DIR/harvestd.toml` with the jobs, state and output directories under
/// `dir`, no admin server, then `extra`. Job files are planned at once
/// (`intake_settle = "0s"`): the benchmarks write them before the daemon
/// starts and measure its work, not the wait a user sets.
pub fn write_config(dir: &Path, extra: &str) {
    std::fs::write(
        dir.join("harvestd.toml"),
        format!(
            "jobs_dir = \"{0}/jobs\"\nstate_dir = \"{0}/state\"\noutput_dir = \"{0}/out\"\nadmin_listen = \"off\"\nintake_settle = \"0s\"\n{extra}",
            dir.display()
        ),
    )
    .unwrap();
}

/// Shows a daemon's stderr as it comes, so that it never blocks on a full
/// pipe and its warnings are seen.
pub fn drain_stderr(child: &mut std::process::Child) {
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            eprintln!("{line}");
        }
    });
}

/// The daemon's resident memory with nothing to track, for the baseline.
pub fn idle_rss(rt: &tokio::runtime::Runtime) -> f64 {
    let emulator = rt
        .block_on(Emulator::start(
            ([127, 0, 0, 1], 0).into(),
            toml::from_str("").unwrap(),
        ))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("jobs")).unwrap();
    write_config(dir.path(), "");
    let mut child = daemon(dir.path(), &emulator.url(), "info", &[])
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    for line in std::io::BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
    {
        if line.contains("state loaded; ready") {
            break;
        }
    }
    let rss = rss_mb(&child.id().to_string());
    let _ = child.kill();
    let _ = child.wait();
    rss
}

/// User + system CPU seconds a process has used (`/proc/PID/stat`, in
/// clock ticks of 1/100 s on Linux).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    (ticks(11) + ticks(12)) / 100.0
}

/// Time compression for benchmarks that wait on builds and polls:
/// `HARVESTD_BENCH_SCALE`, else `default`.
pub fn scale(default: f64) -> f64 {
    std::env::var("HARVESTD_BENCH_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `secs` of real time, compressed by `scale`.
pub fn scaled(secs: f64, scale: f64) -> std::time::Duration {
    std::time::Duration::from_secs_f64(secs / scale)
}

/// A duration as a config or scenario value.
pub fn micros(d: std::time::Duration) -> String {
    format!("{}us", d.as_micros())
}

/// `harvestd run --config DIR/harvestd.toml` against the emulator at `url`,
/// JSON logs at `log`, stderr piped; `under`: a wrapper such as GNU time.
pub fn daemon(dir: &Path, url: &str, log: &str, under: &[&str]) -> Command {
    let program = env!("CARGO_BIN_EXE_harvestd");
    let mut c = match under.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(program);
            c
        }
        None => Command::new(program),
    };
    c.args(["run", "--config"])
        .arg(dir.join("harvestd.toml"))
        .env("HARVESTD_BRIGHTDATA_URL", url)
        .env("BRIGHT_DATA_API_TOKEN", DEMO_BRIGHTDATA_TOKEN)
        .env("HARVESTD_LOG_FORMAT", "json")
        .env("RUST_LOG", log)
        .stderr(Stdio::piped());
    c
}

/// Starts a daemon on `dir`'s config against `emulator`, waits until the
/// emulator has recorded its first trigger, calls `at_trigger` with the
/// daemon's pid then (to read its memory), stops it, and returns the
/// seconds from start to that trigger.
pub fn until_first_trigger(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    emulator: &Emulator,
    at_trigger: impl FnOnce(&str),
) -> f64 {
    let started = std::time::Instant::now();
    let mut child = daemon(dir, &emulator.url(), "warn", &[]).spawn().unwrap();
    drain_stderr(&mut child);
    rt.block_on(emulator.wait_for_ledger(1, std::time::Duration::from_secs(120)))
        .expect("a first trigger");
    let elapsed = started.elapsed().as_secs_f64();
    let pid = child.id().to_string();
    at_trigger(&pid);
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let _ = child.wait();
    elapsed
}
