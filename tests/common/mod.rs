//! Test harness: an emulator on port 0 in the test process, and the real
//! `harvestd` binary as a child process pointed at it with fast limits.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod kill_loop;
pub mod receiver;
pub mod s3;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use harvestd::emulator::{
    Emulator, LedgerEntry, Scenario, DEMO_BRIGHTDATA_TOKEN, DEMO_FIRECRAWL_TOKEN,
};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const WAIT: Duration = Duration::from_secs(90);

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub emulator: Emulator,
    pub token: String,
    /// Extra environment for every harvestd command.
    pub env: Vec<(String, String)>,
}

/// Limits short enough that tests never wait long, still the same code paths.
pub const FAST_LIMITS: &str = r#"
admin_listen = "off"
shutdown_grace = "10s"
rescan_interval = "200ms"
intake_settle = "100ms"
[limits]
max_in_flight = 10
triggers_per_minute = 60000
requests_per_second = 1000
poll_min_interval = "20ms"
poll_max_interval = "200ms"
backoff_base = "10ms"
backoff_cap = "200ms"
brake_after_429 = 3
brake_pause = "300ms"
brake_pause_max = "2s"
rate_limit_pause = "100ms"
not_found_grace = "3s"
in_doubt_recheck = "100ms"
request_timeout = "5s"
"#;

impl Harness {
    pub async fn new(scenario: &str) -> Harness {
        let scenario: Scenario = toml::from_str(scenario).expect("scenario");
        let emulator = Emulator::start(([127, 0, 0, 1], 0).into(), scenario)
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("jobs")).unwrap();
        let h = Harness {
            dir,
            emulator,
            token: DEMO_BRIGHTDATA_TOKEN.to_string(),
            env: Vec::new(),
        };
        h.write_config("");
        h
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes the config: fast limits plus `extra` TOML.
    pub fn write_config(&self, extra: &str) {
        let body = format!(
            "jobs_dir = \"{}\"\nstate_dir = \"{}\"\noutput_dir = \"{}\"\n{FAST_LIMITS}\n{extra}",
            self.path("jobs").display(),
            self.path("state").display(),
            self.path("out").display()
        );
        std::fs::write(self.path("harvestd.toml"), body).unwrap();
    }

    pub fn write_job(&self, name: &str, body: &str) {
        std::fs::write(self.path("jobs").join(name), body).unwrap();
    }

    pub fn write_inputs(&self, name: &str, urls: usize) {
        let mut s = String::from("url\n");
        for i in 0..urls {
            s.push_str(&format!("https://site.example/item/{i}\n"));
        }
        std::fs::write(self.path("jobs").join(name), s).unwrap();
    }

    pub fn command(&self, args: &[&str]) -> Command {
        self.command_of(env!("CARGO_BIN_EXE_harvestd"), args)
    }

    /// `harvestd args…` with at most `fds` open files (soft and hard
    /// limit), through the shell's `ulimit`; the daemon keeps the pid.
    pub fn command_with_fd_limit(&self, fds: u32, args: &[&str]) -> Command {
        let script = format!("ulimit -n {fds} && exec \"$0\" \"$@\"");
        let mut all = vec!["-c", &script, env!("CARGO_BIN_EXE_harvestd")];
        all.extend_from_slice(args);
        self.command_of("bash", &all)
    }

    /// `program args…` with the harness's environment.
    pub fn command_of(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new(program);
        c.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HARVESTD_CONFIG", self.path("harvestd.toml"))
            .env("HARVESTD_BRIGHTDATA_URL", self.emulator.url())
            .env("BRIGHT_DATA_API_TOKEN", &self.token)
            .env("HARVESTD_FIRECRAWL_URL", self.emulator.url())
            .env("FIRECRAWL_API_KEY", DEMO_FIRECRAWL_TOKEN)
            .env("HARVESTD_LOG_FORMAT", "json")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// `harvestd run --once`: (exit code, stdout, stderr).
    pub async fn run_once(&self) -> (i32, String, String) {
        self.run(&["run", "--once"]).await
    }

    pub async fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = tokio::time::timeout(WAIT, self.command(args).output())
            .await
            .expect("harvestd finished in time")
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Starts the daemon (no `--once`) and waits until it says it is ready.
    pub async fn start_daemon(&self) -> Daemon {
        self.start_with(&["run"]).await
    }

    /// Starts `harvestd args…` and waits until it says it is ready.
    pub async fn start_with(&self, args: &[&str]) -> Daemon {
        self.start_command(self.command(args)).await
    }

    /// Starts `command` and waits until it says it is ready.
    pub async fn start_command(&self, mut command: Command) -> Daemon {
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // Reads the child's log until it closes stderr.
        #[allow(clippy::disallowed_methods)]
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut d = Daemon {
            child,
            lines: rx,
            seen: Vec::new(),
        };
        d.wait_for_line("state loaded; ready").await;
        d
    }

    pub fn ledger(&self) -> Vec<LedgerEntry> {
        self.emulator.ledger()
    }

    /// The only run directory of `job`.
    pub fn run_dir(&self, job: &str) -> PathBuf {
        let dir = self.path("out").join(job);
        let mut runs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap() != "latest")
            .collect();
        runs.sort();
        assert_eq!(runs.len(), 1, "one run of {job}: {runs:?}");
        runs.pop().unwrap()
    }

    /// `GET path` on the running daemon's admin API (admin listening).
    pub async fn admin_get(&self, path: &str) -> String {
        let addr = std::fs::read_to_string(self.path("state/admin.addr")).unwrap();
        reqwest::get(format!("http://{}{path}", addr.trim()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `GET /metrics` of the running daemon.
    pub async fn metrics(&self) -> String {
        self.admin_get("/metrics").await
    }

    pub fn manifest(&self, job: &str) -> Value {
        read_json(&self.run_dir(job).join("manifest.json"))
    }
}

pub fn read_json(path: &Path) -> Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

pub fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(str::to_string)
        .collect()
}

pub struct Daemon {
    pub child: Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    pub seen: Vec<String>,
}

impl Daemon {
    pub async fn wait_for_line(&mut self, needle: &str) -> String {
        let found = tokio::time::timeout(WAIT, async {
            while let Some(line) = self.lines.recv().await {
                self.seen.push(line.clone());
                if line.contains(needle) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            _ => panic!(
                "daemon never logged {needle:?}; saw:\n{}",
                self.seen.join("\n")
            ),
        }
    }

    pub fn signal(&self, signal: i32) {
        let pid = self.child.id().expect("running") as i32;
        let rc = send_signal(pid, signal);
        assert_eq!(rc, 0, "kill({pid}, {signal})");
    }

    /// Waits for exit; returns the exit code and every log line it printed.
    pub async fn wait_all(mut self) -> (i32, Vec<String>) {
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("daemon exited in time")
            .unwrap();
        while let Ok(Some(line)) = tokio::time::timeout(WAIT, self.lines.recv()).await {
            self.seen.push(line);
        }
        (status.code().unwrap_or(-1), self.seen)
    }

    pub async fn wait(mut self) -> i32 {
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("daemon exited in time")
            .unwrap();
        status.code().unwrap_or(-1)
    }
}

/// The crate forbids unsafe code, so tests send real signals with kill(1).
fn send_signal(pid: i32, signal: i32) -> i32 {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    if status.success() {
        0
    } else {
        -1
    }
}

/// Whether a row read back from Parquet says what its JSON row says:
/// numbers by value (an integer field may have been widened to float), a
/// field kept as JSON text by the JSON it holds, a null the same as a
/// missing field (the reader leaves nulls out). A row that is not an object
/// is the `value` column.
pub fn agrees(back: &Value, json: &Value) -> bool {
    match (back, json) {
        (Value::Object(a), b) if !b.is_object() => {
            a.len() <= 1 && agrees(a.get("value").unwrap_or(&Value::Null), b)
        }
        (Value::Null, Value::Null) => true,
        (Value::String(text), other) => {
            other.as_str() == Some(text)
                || serde_json::from_str::<Value>(text).is_ok_and(|v| v == *other)
        }
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| agrees(x, y))
        }
        (Value::Object(a), Value::Object(b)) => {
            b.iter()
                .all(|(k, v)| agrees(a.get(k).unwrap_or(&Value::Null), v))
                && a.iter().all(|(k, v)| v.is_null() || b.contains_key(k))
        }
        (a, b) => a == b,
    }
}

pub fn assert_agree(back: &[Value], json: &[Value]) {
    assert_eq!(back.len(), json.len(), "as many rows in Parquet as in JSON");
    for (i, (b, j)) in back.iter().zip(json).enumerate() {
        assert!(agrees(b, j), "row {i}: read back {b}\nfor {j}");
    }
}

/// sled's largest file under `state/db`: its data.
pub fn sled_data_file(state: &Path) -> PathBuf {
    let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(state.join("db"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (std::fs::metadata(&p).unwrap().len(), p))
        .collect();
    files.sort();
    files.pop().expect("sled has a data file").1
}
