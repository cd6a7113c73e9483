//! The command line (`docs/cli.md`): parsing with clap, then one library call per
//! subcommand, each returning the process exit code.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::admin::api::{JobList, JobView, Reply};
use crate::config::{Config, LogFormat, ProcessEnv};
use crate::daemon::{self, RunOptions};
use crate::emulator::{Emulator, Scenario};
use crate::exit;

#[derive(Debug, Parser)]
#[command(
    name = "harvestd",
    version,
    about = "Durable batch ingestion from Bright Data and Firecrawl"
)]
pub struct Cli {
    /// The configuration file (TOML). Else `HARVESTD_CONFIG`, else none:
    /// defaults and the environment.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: watch the jobs directory until SIGTERM/SIGINT.
    Run {
        /// Run the job files present at start once, wait for every run, exit.
        #[arg(long)]
        once: bool,
        /// Serve the built-in emulator in-process and use it for every provider.
        #[arg(long)]
        emulator: bool,
        /// Start from what is left of a damaged or stale state store: every
        /// chunk not proven unpaid is settled at the provider before any trigger.
        #[arg(long)]
        recover: bool,
    },
    /// Check job files and their inputs without calling any API.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// One JSON document on stdout: every file, valid or not, with its
        /// problems (and, for Firecrawl jobs, the credits it should cost).
        #[arg(long)]
        json: bool,
    },
    /// Show jobs, their latest runs and next due times (from the running daemon).
    Status {
        job: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Start a new run of an unchanged job (on the running daemon).
    Rerun {
        job: String,
        /// The daemon's answer as one JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Re-submit the failed and expired chunks of the latest (or named) run.
    Retry {
        job: String,
        #[arg(long = "run")]
        run_id: Option<String>,
        /// The daemon's answer as one JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Cancel the job's runs in progress (data already saved stays).
    Cancel {
        job: String,
        /// The daemon's answer as one JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Serve the built-in emulator of the provider APIs.
    Emulator {
        #[arg(long, default_value = "127.0.0.1:8990")]
        listen: SocketAddr,
        /// A TOML scenario: behaviour per collector or dataset and for the Firecrawl account, faults, seed.
        #[arg(long)]
        scenario: Option<PathBuf>,
    },
    /// Print a shell completion script: `harvestd completions bash >
    /// /etc/bash_completion.d/harvestd`.
    Completions { shell: clap_complete::Shell },
}

/// Runs a parsed command; returns the exit code.
pub fn execute(cli: Cli) -> u8 {
    let config = cli.config;
    match cli.command {
        Command::Validate { files, json } => {
            init_logging(None);
            validate(&files, json)
        }
        Command::Status { job, json } => {
            init_logging(None);
            admin_call(config, |admin| async move {
                status(&admin, job.as_deref(), json).await
            })
        }
        Command::Rerun { job, json } => {
            init_logging(None);
            admin_call(config, |admin| async move {
                action(&admin, &job, "rerun", None, json).await
            })
        }
        Command::Retry { job, run_id, json } => {
            init_logging(None);
            admin_call(config, |admin| async move {
                action(&admin, &job, "retry", run_id.as_deref(), json).await
            })
        }
        Command::Cancel { job, json } => {
            init_logging(None);
            admin_call(config, |admin| async move {
                action(&admin, &job, "cancel", None, json).await
            })
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut command = Cli::command();
            clap_complete::generate(shell, &mut command, "harvestd", &mut std::io::stdout());
            exit::OK
        }
        Command::Emulator { listen, scenario } => {
            init_logging(None);
            let scenario = match scenario.map(|p| Scenario::from_file(&p)).transpose() {
                Ok(s) => s.unwrap_or_default(),
                Err(e) => {
                    eprintln!("harvestd: scenario: {e}");
                    return exit::CONFIG;
                }
            };
            runtime(None).map_or(exit::FAILURE, |rt| {
                rt.block_on(serve_emulator(listen, scenario))
            })
        }
        Command::Run {
            once,
            emulator,
            recover,
        } => {
            // Under journald these lines carry a priority like the log's.
            let err = || crate::logging::journal_prefix(tracing::Level::ERROR);
            let info = || crate::logging::journal_prefix(tracing::Level::INFO);
            let path = config.clone();
            let reload: daemon::Reload =
                Box::new(move || Config::load(path.as_deref(), &ProcessEnv));
            let config = match Config::load(config.as_deref(), &ProcessEnv) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{}harvestd: configuration: {e}", err());
                    return exit::CONFIG;
                }
            };
            init_logging(config.log_format);
            let Some(rt) = runtime(Some(config.worker_threads as usize)) else {
                return exit::FAILURE;
            };
            let code = rt.block_on(async {
                let signals = match crate::signals::listen() {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("{}harvestd: cannot listen for signals: {e}", err());
                        return exit::FAILURE;
                    }
                };
                match daemon::run(config, RunOptions { once, emulator, recover }, &ProcessEnv, signals, reload).await {
                    Ok(summary) => {
                        if once && summary.complete + summary.incomplete + summary.stopped == 0 && summary.parked.is_empty() {
                            eprintln!(
                                "{}harvestd: nothing to do: no new job content and no unfinished run ({} invalid job file(s))",
                                info(),
                                summary.invalid_jobs
                            );
                            summary.exit_code()
                        } else if once {
                            eprintln!(
                                "{}harvestd: {} run(s) complete, {} incomplete, {} waiting on a blocked provider, {} invalid job file(s)",
                                info(),
                                summary.complete,
                                summary.incomplete,
                                summary.parked.len(),
                                summary.invalid_jobs
                            );
                            for p in &summary.parked {
                                eprintln!("{}harvestd: blocked: {p}", err());
                            }
                            summary.exit_code()
                        } else {
                            exit::OK
                        }
                    }
                    Err(e) => {
                        eprintln!("{}harvestd: {e}", err());
                        e.exit_code()
                    }
                }
            });
            // The daemon has drained within shutdown_grace; a job still
            // being read (a big inputs file being hashed) is not waited
            // for: its half-made plan is discarded at the next start.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            code
        }
    }
}

/// `workers`: async worker threads (the config's `worker_threads`);
/// `None`: one per core.
fn runtime(workers: Option<usize>) -> Option<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    // Blocking work is file writes and store flushes, which queue on the
    // disk anyway; tokio's default of 512 threads let a burst of 10,000
    // triggers start hundreds, each leaving its malloc arena behind.
    builder.max_blocking_threads(32);
    builder
        .enable_all()
        .build()
        .map_err(|e| eprintln!("harvestd: cannot start the runtime: {e}"))
        .ok()
}

/// Text on a TTY, JSON lines otherwise, unless the config says which.
pub fn init_logging(format: Option<LogFormat>) {
    crate::logging::init(format);
}

/// `validate --json`: `{"files": [...]}`.
#[derive(serde::Serialize)]
struct Validated {
    files: Vec<ValidatedFile>,
}

#[derive(serde::Serialize)]
struct ValidatedFile {
    file: String,
    valid: bool,
    problems: Vec<ValidatedProblem>,
    #[serde(skip_serializing_if = "Option::is_none")]
    inputs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    chunks: Option<u64>,
    /// Firecrawl jobs only ([`crate::spec::JobSpec::credits_estimate`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    credits_estimate: Option<u64>,
}

#[derive(serde::Serialize)]
struct ValidatedProblem {
    /// The job file, or its inputs file when the problem is there.
    file: String,
    line: Option<usize>,
    field: Option<String>,
    message: String,
}

fn validate(files: &[PathBuf], json: bool) -> u8 {
    let mut invalid = 0;
    let mut report = Validated { files: Vec::new() };
    for file in files {
        let mut entry = ValidatedFile {
            file: file.display().to_string(),
            valid: true,
            problems: Vec::new(),
            inputs: None,
            chunks: None,
            credits_estimate: None,
        };
        match crate::spec::load(file) {
            Ok((spec, inputs)) => {
                let chunks = inputs.div_ceil(u64::from(spec.chunk_size));
                let credits = spec.credits_estimate(inputs);
                if !json {
                    let cost = credits
                        .map(|c| format!(", about {c} Firecrawl credit(s)"))
                        .unwrap_or_default();
                    println!(
                        "{}: ok ({} {}, {inputs} inputs in {chunks} chunk(s){cost})",
                        file.display(),
                        spec.provider,
                        spec.key
                    );
                }
                (entry.inputs, entry.chunks) = (Some(inputs), Some(chunks));
                entry.credits_estimate = credits;
            }
            Err(problems) => {
                invalid += 1;
                entry.valid = false;
                for p in problems {
                    if !json {
                        eprintln!("{p}");
                    }
                    entry.problems.push(ValidatedProblem {
                        file: p.file,
                        line: p.line,
                        field: p.field,
                        message: p.message,
                    });
                }
            }
        }
        report.files.push(entry);
    }
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("harvestd: {e}");
                return exit::FAILURE;
            }
        }
    }
    if invalid == 0 {
        exit::OK
    } else {
        exit::INVALID
    }
}

async fn serve_emulator(listen: SocketAddr, scenario: Scenario) -> u8 {
    let emulator = match Emulator::start(listen, scenario).await {
        Ok(e) => e,
        Err(e) => {
            eprintln!("harvestd: emulator: cannot listen on {listen}: {e}");
            return exit::FAILURE;
        }
    };
    // The address goes to stdout so scripts (and tests) can read it.
    println!("{}", emulator.url());
    let Ok(mut signals) = crate::signals::listen() else {
        return exit::FAILURE;
    };
    while let Some(signal) = signals.recv().await {
        if signal == crate::signals::Signal::Shutdown {
            break;
        }
    }
    emulator.stop().await;
    exit::OK
}

/// Where the running daemon's admin API is, and its token.
struct Admin {
    base: String,
    token: Option<String>,
    client: reqwest::Client,
}

/// Finds the daemon through `<state_dir>/admin.addr` (or the emulator
/// state under it) and runs `call`.
fn admin_call<F, Fut>(config: Option<PathBuf>, call: F) -> u8
where
    F: FnOnce(Admin) -> Fut,
    Fut: std::future::Future<Output = u8>,
{
    let config = match Config::load(config.as_deref(), &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("harvestd: configuration: {e}");
            return exit::CONFIG;
        }
    };
    let dirs = [config.state_dir.clone(), config.state_dir.join("emulator")];
    let found = dirs.iter().find_map(|d| {
        let addr = std::fs::read_to_string(d.join("admin.addr")).ok()?;
        let token = std::fs::read_to_string(d.join("admin.token"))
            .ok()
            .map(|t| t.trim().to_string());
        Some((addr.trim().to_string(), token))
    });
    let Some((addr, token)) = found else {
        eprintln!(
            "harvestd: no running daemon found ({} has no admin.addr; is admin_listen off?)",
            config.state_dir.display()
        );
        return exit::UNREACHABLE;
    };
    let Some(rt) = runtime(Some(1)) else {
        return exit::FAILURE;
    };
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .unwrap_or_default();
    rt.block_on(call(Admin {
        base: format!("http://{addr}"),
        token,
        client,
    }))
}

/// A GET of the admin API: its status and body text.
async fn get_text(admin: &Admin, path: &str) -> Result<(u16, String), u8> {
    let response = admin
        .client
        .get(format!("{}{path}", admin.base))
        .send()
        .await
        .map_err(|e| {
            eprintln!("harvestd: daemon not reachable at {}: {e}", admin.base);
            exit::UNREACHABLE
        })?;
    let status = response.status().as_u16();
    Ok((status, response.text().await.unwrap_or_default()))
}

async fn status(admin: &Admin, job: Option<&str>, json: bool) -> u8 {
    let path = job.map_or("/v1/jobs".to_string(), |j| format!("/v1/jobs/{j}"));
    let (code, text) = match get_text(admin, &path).await {
        Ok(r) => r,
        Err(exit) => return exit,
    };
    if code != 200 {
        let reply: Reply = serde_json::from_str(&text).unwrap_or_default();
        let why = reply
            .error
            .unwrap_or_else(|| format!("the daemon answered {code}"));
        eprintln!("harvestd: {why}");
        return exit::FAILURE;
    }
    if json {
        // The daemon's answer as it is, fields this build does not know
        // included.
        let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return exit::OK;
    }
    let list = match job {
        Some(_) => serde_json::from_str::<JobView>(&text).map(|j| JobList {
            jobs: vec![j],
            ..JobList::default()
        }),
        None => serde_json::from_str::<JobList>(&text),
    };
    let list = match list {
        Ok(list) => list,
        Err(e) => {
            eprintln!("harvestd: the daemon's answer to {path} does not read: {e}");
            return exit::FAILURE;
        }
    };
    print!("{}", status_table(&list.jobs));
    for p in &list.providers {
        if let Some(reason) = &p.blocked {
            println!("provider {} BLOCKED: {reason}", p.provider);
        }
        if let Some(pause) = &p.paused {
            println!(
                "provider {} PAUSED ({}s left): {}",
                p.provider, pause.seconds_left, pause.reason
            );
        }
    }
    if let Some(u) = &list.undelivered {
        println!(
            "notifications UNDELIVERED: {} since {}, retried for 24 h; last: {} to {}: {}",
            u.count, u.oldest_at, u.event, u.target, u.last_error
        );
    }
    exit::OK
}

/// The `status` table: one line per job.
pub fn status_table(jobs: &[JobView]) -> String {
    let mut rows = vec![[
        "JOB".to_string(),
        "PROVIDER".into(),
        "STATE".into(),
        "CHUNKS".into(),
        "ROWS".into(),
        "CREDITS".into(),
        "NEXT RUN".into(),
        "LAST ERROR".into(),
    ]];
    for j in jobs {
        let run = j.latest_run.as_ref();
        let mut error: String = j
            .problems
            .first()
            .or(run.and_then(|r| r.last_error.as_ref()))
            .map_or("", |e| e.as_str())
            .chars()
            .take(60)
            .collect();
        // An upload that fails outranks a chunk's message: the run is
        // finished, and its files are not where readers look.
        if let Some(e) = run
            .and_then(|r| r.upload.as_ref())
            .and_then(|u| u.error.as_ref())
        {
            error = format!("UPLOAD FAILING: {e}").chars().take(80).collect();
        }
        // A dataset near deletion outranks any other message.
        if let Some(expiry) = run.and_then(|r| r.expiry.as_ref()) {
            if matches!(expiry.level.as_str(), "warning" | "error" | "expired") {
                error = format!(
                    "{} EXPIRES {} (in {}) {error}",
                    expiry.level.to_uppercase(),
                    expiry.expires_at,
                    crate::clock::left_text(expiry.seconds_left.saturating_mul(1000)),
                );
            }
        }
        rows.push([
            j.job.clone(),
            j.provider.clone().unwrap_or_else(|| "-".into()),
            match run.and_then(|r| r.upload.as_ref()) {
                // The run's own state, and that its files are on their way.
                Some(u) if u.error.is_some() => format!("{} (upload failing)", j.state),
                Some(_) => format!("{} (uploading)", j.state),
                None => j.state.clone(),
            },
            run.map_or("-".into(), |r| {
                let done = r.chunks.get("downloaded").copied().unwrap_or(0);
                format!("{done}/{}", r.chunks_total)
            }),
            run.map_or("-".into(), |r| r.rows.to_string()),
            run.and_then(|r| r.credits_used)
                .map_or("-".into(), |c| c.to_string()),
            j.next_due.clone().unwrap_or_else(|| "-".into()),
            error,
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `rerun`, `retry` or `cancel --json`: the daemon's answer, with what
/// was asked.
#[derive(serde::Serialize)]
struct ActionAnswer<'a> {
    job: &'a str,
    action: &'a str,
    ok: bool,
    /// The run started or retried, or the runs cancelled.
    result: Option<String>,
    error: Option<String>,
}

/// `rerun`, `retry` or `cancel` through the admin API, with its token.
async fn action(admin: &Admin, job: &str, action: &str, run: Option<&str>, json: bool) -> u8 {
    let mut request = admin
        .client
        .post(format!("{}/v1/jobs/{job}/{action}", admin.base));
    if let Some(run) = run {
        request = request.query(&[("run", run)]);
    }
    if let Some(token) = &admin.token {
        request = request.bearer_auth(token);
    }
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("harvestd: daemon not reachable at {}: {e}", admin.base);
            return exit::UNREACHABLE;
        }
    };
    let code = response.status().as_u16();
    let reply: Reply =
        serde_json::from_str(&response.text().await.unwrap_or_default()).unwrap_or_default();
    if json {
        let answer = ActionAnswer {
            job,
            action,
            ok: code == 200,
            result: reply.result,
            error: match code {
                200 => None,
                _ => Some(
                    reply
                        .error
                        .unwrap_or_else(|| format!("the daemon answered {code}")),
                ),
            },
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&answer).unwrap_or_default()
        );
        return if answer.ok { exit::OK } else { exit::FAILURE };
    }
    if code == 200 {
        let verb = match action {
            "rerun" => "started run",
            "retry" => "retrying run",
            _ => "cancelling run(s)",
        };
        println!("{job}: {verb} {}", reply.result.as_deref().unwrap_or("?"));
        exit::OK
    } else {
        eprintln!(
            "harvestd: {action} {job}: {}",
            reply.error.as_deref().unwrap_or("failed")
        );
        exit::FAILURE
    }
}
