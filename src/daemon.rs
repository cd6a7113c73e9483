//! The supervisor: owns the event loop. It takes the state directory's
//! lock, resumes every unfinished run from the store, scans the jobs
//! directory, spawns and tracks one task per run, and drains them on
//! shutdown within `shutdown_grace` (`docs/operations.md`, `docs/durability.md`).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::accounts::{Accounts, Common, Tokens};
use crate::clock::timestamp;
use crate::config::{Config, ConfigError, Env};
use crate::emulator::{Emulator, Scenario};
use crate::intake::Settled;
use crate::limits::KeyedLimits;
use crate::run::{self, RunOutcome, WorkerError};
use crate::schedule::{jitter_offset, next_due, on_due, Due, Recurrence};
use crate::signals::Signal;
use crate::store::{RunRecord, RunState, ScheduleRecord, Store, StoreError};
use crate::watcher::Watcher;

#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Run the jobs present at start once, wait for them, exit.
    pub once: bool,
    /// Serve the built-in emulator in-process and point providers at it.
    pub emulator: bool,
    /// Start from what is left of a damaged or stale store (`docs/durability.md`).
    pub recover: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("another harvestd is using the state directory {0} (its lock is held)")]
    Locked(PathBuf),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// An I/O error with what was being done (a path, a listener), the
    /// cause kept as its source.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Work handed to a thread of the blocking pool did not come back.
    #[error("a background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("admin_listen '{0}' is not an address")]
    AdminListen(String),
}

/// Wraps an I/O error with what was being done.
fn io_error(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> DaemonError {
    let what = what.to_string();
    move |source| DaemonError::Io { what, source }
}

impl DaemonError {
    /// The exit codes of `docs/cli.md`.
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::Locked(_) => crate::exit::LOCKED,
            DaemonError::Config(_) => crate::exit::CONFIG,
            _ => crate::exit::FAILURE,
        }
    }
}

/// What a daemon run did, for `--once`'s exit code and its last words.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub complete: usize,
    /// Finished partial, failed or cancelled.
    pub incomplete: usize,
    /// Waiting on a blocked provider, with the reason.
    pub parked: Vec<String>,
    /// Stopped by shutdown before finishing.
    pub stopped: usize,
    pub invalid_jobs: usize,
}

impl Summary {
    /// `--once`: 0 when every run completed, 1 when any did not, 65 when
    /// every run completed but a job file was invalid.
    pub fn exit_code(&self) -> u8 {
        if self.incomplete > 0 || !self.parked.is_empty() || self.stopped > 0 {
            crate::exit::FAILURE
        } else if self.invalid_jobs > 0 {
            crate::exit::INVALID
        } else {
            crate::exit::OK
        }
    }
}

/// Holds the state directory for this process; released on exit, also on
/// `kill -9`, because the kernel drops the file lock with the process.
pub fn lock_state_dir(dir: &Path) -> Result<File, DaemonError> {
    std::fs::create_dir_all(dir).map_err(io_error(dir.display()))?;
    let path = dir.join("harvestd.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_error(path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(DaemonError::Locked(dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => Err(io_error(path.display())(e)),
    }
}

type RunResult = (String, String, Result<RunOutcome, WorkerError>);

struct Supervisor {
    config: Config,
    store: Store,
    accounts: Arc<Accounts>,
    keys: Arc<KeyedLimits>,
    runs: JoinSet<RunResult>,
    /// Runs being driven, with their stop tokens.
    active: HashMap<(String, String), CancellationToken>,
    /// Runs stopped for a cancel: cancelled when their task returns.
    cancelling: HashSet<(String, String)>,
    summary: Summary,
    stop: CancellationToken,
    once: bool,
    /// Live bars (`run --once` on a terminal).
    bars: Option<crate::progress::Bars>,
    /// Which jobs are settling, being read, or dealt with.
    watch: crate::intake::Watch,
    /// Jobs being read and planned, one blocking task each.
    intake: JoinSet<(crate::intake::Sighting, Result<Settled, StoreError>)>,
    /// Job files whose current content is invalid.
    invalid: HashSet<String>,
    /// Files in the jobs directory whose names cannot be jobs' (not UTF-8).
    bad_names: HashSet<String>,
}

impl Supervisor {
    /// Resumes unfinished runs before anything new: they continue without
    /// a new trigger. A run caught mid-planning is discarded and planned
    /// again. Returns how many runs resumed.
    async fn resume(&mut self) -> Result<usize, DaemonError> {
        let mut resumed = 0;
        for run in self.store.runs()? {
            match run.state {
                RunState::Planning => {
                    info!(job = %run.job, run = %run.run_id, "discarding a run caught mid-planning; it is planned again");
                    self.store.delete_run(&run.job, &run.run_id)?;
                }
                RunState::InProgress => {
                    resumed += 1;
                    self.spawn(run);
                }
                // Finished, its files not yet all in the object store.
                _ if run.upload.is_some() => {
                    resumed += 1;
                    self.spawn(run);
                }
                _ => {}
            }
        }
        self.store.flush().await?;
        Ok(resumed)
    }

    /// Stops: with `--once` first gives notifications `shutdown_grace` to
    /// go out; then cancels every run and waits up to `shutdown_grace` for
    /// calls in flight to finish and be recorded.
    async fn drain(&mut self, notify: &crate::notify::Notifier) {
        if self.once {
            let waiting = notify.drain(self.config.shutdown_grace).await;
            if waiting > 0 {
                warn!(
                    waiting,
                    "notifications not yet delivered; the next start sends them"
                );
            }
        }
        crate::systemd::stopping();
        self.stop.cancel();
        let grace = self.config.shutdown_grace;
        let drained = tokio::time::timeout(grace, async {
            while let Some(joined) = self.runs.join_next().await {
                match joined {
                    Ok(result) => {
                        if let Err(e) = self.record(result) {
                            error!(error = %e, "while draining");
                        }
                    }
                    Err(e) => error!(error = %e, "run task panicked"),
                }
            }
        })
        .await;
        if drained.is_err() {
            warn!(
                ?grace,
                "shutdown grace passed with work still running; the store has every step"
            );
            self.summary.stopped += self.runs.len();
        }
    }

    fn spawn(&mut self, run: RunRecord) {
        let id = (run.job.clone(), run.run_id.clone());
        if self.active.contains_key(&id) {
            return;
        }
        let stop = self.stop.child_token();
        self.active.insert(id.clone(), stop.clone());
        let now = crate::clock::now_ms();
        let ago = self
            .store
            .last_trigger(&run.spec.key)
            .ok()
            .flatten()
            .map(|t| crate::clock::between(t, now));
        let key = self.keys.key(&run.spec.key, ago);
        if let Ok(samples) = self.store.build_times(&run.spec.key) {
            key.learn_builds(&samples);
        }
        let ctx = self.accounts.for_spec(&run.spec).clone();
        self.runs.spawn(async move {
            let result = run::drive_run(ctx, key, run, stop).await;
            (id.0, id.1, result)
        });
    }

    fn record(&mut self, (job, run_id, result): RunResult) -> Result<(), DaemonError> {
        let id = (job.clone(), run_id.clone());
        self.active.remove(&id);
        // Content that arrived while this run was in progress starts now.
        if !self.stop.is_cancelled() {
            self.start_settled();
        }
        // A state directory removed under the run shows first as missing
        // inputs or a failed write: name the cause.
        let outcome = result.map_err(|e| match self.store.check_place() {
            Err(moved) => DaemonError::Store(moved),
            Ok(()) => DaemonError::Worker(e),
        })?;
        if self.cancelling.remove(&id) && !self.stop.is_cancelled() {
            // Stopped for a cancel: now cancel it (drive_run sees the flag).
            if let Some(run) = self.store.run(&job, &run_id)? {
                self.spawn(run);
                return Ok(());
            }
        }
        if let (Some(bars), RunOutcome::Finished(state)) = (self.bars.as_mut(), &outcome) {
            if let Ok(Some(run)) = self.store.run(&job, &run_id) {
                bars.finish(&self.store, &run, state.as_str());
            }
        }
        match outcome {
            RunOutcome::Finished(RunState::Complete) => self.summary.complete += 1,
            RunOutcome::Finished(state) => {
                warn!(job = %job, run = %run_id, state = state.as_str(), "run did not complete");
                self.summary.incomplete += 1;
            }
            RunOutcome::UploadFailing(why) => {
                error!(job = %job, run = %run_id, reason = %why,
                    "run finished, its upload failing; the files stay in staging and the next start uploads them");
                self.summary
                    .parked
                    .push(format!("{job}/{run_id}: upload {why}"));
            }
            RunOutcome::Parked(why) => {
                error!(job = %job, run = %run_id, reason = %why, "run waits on a blocked provider");
                self.summary.parked.push(format!("{job}/{run_id}: {why}"));
            }
            RunOutcome::Stopped => self.summary.stopped += 1,
        }
        Ok(())
    }

    /// Looks at the jobs directory (cheap: job files read, inputs files
    /// only stat'ed), then hands every job that has settled to a task of
    /// its own.
    async fn scan(&mut self) -> Result<(), DaemonError> {
        let dir = self.config.jobs_dir.clone();
        let look = tokio::task::spawn_blocking(move || crate::intake::look(&dir))
            .await
            .map_err(DaemonError::from)?;
        let mut bad_names = HashSet::new();
        for (shown, problem) in look.bad_names {
            bad_names.insert(shown.clone());
            if !self.bad_names.contains(&shown) {
                error!(job = %shown, problem = %problem, "not a job file name; rename the file");
                let mut record = crate::store::JobRecord::new(
                    shown,
                    String::new(),
                    vec![problem],
                    crate::clock::now_ms(),
                );
                record.stamp = None;
                self.store.put_job(&record)?;
            }
        }
        if look.listed {
            self.bad_names = bad_names;
        }
        self.summary.invalid_jobs = self.invalid.len() + self.bad_names.len();
        let scheduled: Vec<_> = look
            .jobs
            .iter()
            .filter_map(|s| s.schedule.clone().map(|(r, j)| (s.name.clone(), r, j)))
            .collect();
        self.watch
            .observe(look.jobs, look.listed, tokio::time::Instant::now());
        self.start_settled();
        if !self.once {
            self.sync_schedules(scheduled, look.listed).await?;
        }
        Ok(())
    }

    /// Starts reading every job that has settled and has no run in progress.
    fn start_settled(&mut self) {
        let active = &self.active;
        let ready =
            self.watch
                .take_ready(tokio::time::Instant::now(), crate::clock::now_ms(), |job| {
                    active.keys().any(|(j, _)| j == job)
                });
        for sighting in ready {
            let store = self.store.clone();
            self.intake.spawn_blocking(move || {
                let settled = crate::intake::settle(&store, &sighting, crate::clock::now_ms());
                (sighting, settled)
            });
        }
    }

    /// A job has been read: start its run, or note why not. Says whether a
    /// run started.
    async fn settled(
        &mut self,
        (sighting, settled): (crate::intake::Sighting, Result<Settled, StoreError>),
    ) -> Result<bool, DaemonError> {
        let mut started = false;
        let now = tokio::time::Instant::now();
        let name = sighting.name.clone();
        // Counted by file: `a.toml` and `a.json` are two problems.
        let file = sighting.path.display().to_string();
        match settled {
            Ok(Settled::Planned(run)) => {
                self.watch.finished(&sighting, None, now);
                self.invalid.remove(&file);
                self.spawn(*run);
                started = true;
            }
            Ok(Settled::Known) => {
                self.watch.finished(&sighting, None, now);
                self.invalid.remove(&file);
            }
            Ok(Settled::Invalid(_)) => {
                self.watch.finished(&sighting, None, now);
                self.invalid.insert(file);
            }
            Ok(Settled::Changed) => {
                // Look again at once for the new stamp; it then settles anew.
                self.watch.finished(&sighting, Some(Duration::ZERO), now);
                self.scan().await?;
            }
            Err(e) if self.once => return Err(e.into()),
            Err(e) => {
                error!(job = %name, error = %e, "cannot plan the job; trying again in 30 s");
                self.watch
                    .finished(&sighting, Some(Duration::from_secs(30)), now);
            }
        }
        self.summary.invalid_jobs = self.invalid.len() + self.bad_names.len();
        Ok(started)
    }

    /// Stored schedules follow the job files: new or edited ones take effect
    /// at once, those of deleted files (or removed `every`/`cron`) stop.
    async fn sync_schedules(
        &mut self,
        present: Vec<(String, Recurrence, Duration)>,
        listed: bool,
    ) -> Result<(), DaemonError> {
        let now = crate::clock::now_ms();
        let existing: HashMap<String, ScheduleRecord> = self
            .store
            .schedules()?
            .into_iter()
            .map(|r| (r.job.clone(), r))
            .collect();
        let mut keep = HashSet::new();
        for (job, recurrence, jitter) in present {
            keep.insert(job.clone());
            let offset = jitter_offset(&job, jitter);
            let unchanged = existing.get(&job).is_some_and(|r| {
                r.recurrence == recurrence && r.jitter_ms == offset.as_millis() as u64
            });
            if !unchanged {
                let next = next_due(&recurrence, now, now, offset);
                info!(job = %job, schedule = %recurrence, next_due = %timestamp(next), "schedule set");
                self.store.put_schedule(&ScheduleRecord::new(
                    job,
                    recurrence,
                    offset.as_millis() as u64,
                    next,
                ))?;
            }
        }
        if listed {
            for job in existing.keys().filter(|j| !keep.contains(*j)) {
                info!(job = %job, "schedule stopped: job file deleted or schedule removed (runs in progress finish)");
                self.store.delete_schedule(job)?;
            }
        }
        self.store.flush().await?;
        Ok(())
    }

    async fn command(&mut self, command: crate::admin::Command) -> Result<(), DaemonError> {
        match command {
            crate::admin::Command::Rerun { job, reply } => {
                // Runs of one job never overlap, whoever starts them.
                if self.active.keys().any(|(j, _)| *j == job) {
                    let _ = reply.send(Err(format!("a run of '{job}' is still in progress")));
                    return Ok(());
                }
                let (dir, store, name) = (
                    self.config.jobs_dir.clone(),
                    self.store.clone(),
                    job.clone(),
                );
                let planned = tokio::task::spawn_blocking(move || {
                    crate::intake::plan_due(&dir, &store, &name, crate::clock::now_ms())
                })
                .await
                .map_err(DaemonError::from)??;
                match planned {
                    Some(run) => {
                        info!(job = %job, run = %run.run_id, "rerun requested");
                        let _ = reply.send(Ok(run.run_id.clone()));
                        self.spawn(run);
                    }
                    None => {
                        let _ = reply.send(Err(format!("no valid job file for '{job}'")));
                    }
                }
            }
            crate::admin::Command::Retry { job, run, reply } => {
                let _ = reply.send(self.retry(&job, run.as_deref()).await);
            }
            crate::admin::Command::Cancel { job, reply } => {
                let _ = reply.send(self.cancel(&job).await);
            }
        }
        Ok(())
    }

    /// Re-plans the failed and expired chunks of the job's latest (or the
    /// named) run and drives it again.
    async fn retry(&mut self, job: &str, run_id: Option<&str>) -> Result<String, String> {
        let runs = self.store.runs_of(job).map_err(|e| e.to_string())?;
        let run = match run_id {
            Some(id) => runs.into_iter().find(|r| r.run_id == id),
            None => runs
                .into_iter()
                .max_by(|a, b| crate::plan::run_id_order(&a.run_id, &b.run_id)),
        };
        let Some(mut run) = run else {
            return Err(format!("no such run of '{job}'"));
        };
        if !run.state.is_terminal()
            || self
                .active
                .contains_key(&(run.job.clone(), run.run_id.clone()))
        {
            return Err(format!(
                "run {} of '{job}' is still in progress",
                run.run_id
            ));
        }
        let count = run::retry_run(&self.store, &mut run)
            .await
            .map_err(|e| e.to_string())?;
        if count == 0 {
            return Err(format!(
                "run {} of '{job}' has no failed or expired chunk",
                run.run_id
            ));
        }
        info!(job = %job, run = %run.run_id, chunks = count, "retry requested");
        let id = run.run_id.clone();
        self.spawn(run);
        Ok(format!("{id}: {count} chunk(s)"))
    }

    /// Cancels every unfinished run of the job.
    async fn cancel(&mut self, job: &str) -> Result<String, String> {
        let runs = self.store.runs_of(job).map_err(|e| e.to_string())?;
        let mut cancelled = Vec::new();
        for mut run in runs.into_iter().filter(|r| !r.state.is_terminal()) {
            // Durable first: a crash from here on resumes as a cancel.
            run.cancel_requested = true;
            self.store.put_run(&run).map_err(|e| e.to_string())?;
            self.store.flush().await.map_err(|e| e.to_string())?;
            let id = (run.job.clone(), run.run_id.clone());
            match self.active.get(&id) {
                Some(token) => {
                    token.cancel();
                    self.cancelling.insert(id);
                }
                None => self.spawn(run.clone()),
            }
            info!(job = %job, run = %run.run_id, "cancel requested");
            cancelled.push(run.run_id);
        }
        if cancelled.is_empty() {
            Err(format!("'{job}' has no run in progress"))
        } else {
            Ok(cancelled.join(", "))
        }
    }

    /// Applies a reloaded configuration: limits and tokens now; directories
    /// and the admin address need a restart (said in the log).
    fn apply_config(
        &mut self,
        mut new: Config,
        env: &dyn Env,
        emulator: bool,
    ) -> Result<(), DaemonError> {
        // Tokens first: a token file that cannot be used (unreadable, or
        // readable by others) fails the reload before anything changes.
        // The emulator's demo tokens never change.
        let tokens = match emulator {
            true => None,
            false => Some(Tokens::find(&new, env)?),
        };
        let old = &self.config;
        if new.jobs_dir != old.jobs_dir
            || new.state_dir != old.state_dir
            || new.output_dir != old.output_dir
            || new.storage != old.storage
            || new.admin_listen != old.admin_listen
        {
            warn!("SIGHUP: directories and admin_listen change only with a restart; keeping the current ones");
        }
        if new.limits.requests_per_second != old.limits.requests_per_second {
            warn!("SIGHUP: requests_per_second changes only with a restart");
        }
        if new.limits.snapshot_batch_size != old.limits.snapshot_batch_size {
            warn!("SIGHUP: snapshot_batch_size changes only with a restart");
        }
        self.keys.reconfigure(new.limits.clone());
        self.accounts.reconfigure(&new.limits, tokens);
        let old = &self.config;
        new.jobs_dir = old.jobs_dir.clone();
        new.state_dir = old.state_dir.clone();
        new.output_dir = old.output_dir.clone();
        new.storage = old.storage.clone();
        new.admin_listen = old.admin_listen.clone();
        new.providers.brightdata.base_url = old.providers.brightdata.base_url.clone();
        new.providers.firecrawl.base_url = old.providers.firecrawl.base_url.clone();
        self.watch.set_settle(new.intake_settle);
        self.config = new;
        Ok(())
    }

    /// Redraws the bars, or logs one `progress` line per run in progress.
    fn report_progress(&mut self) {
        let runs: Vec<RunRecord> = self
            .active
            .keys()
            .filter_map(|(job, run)| self.store.run(job, run).ok().flatten())
            .collect();
        match self.bars.as_mut() {
            Some(bars) => bars.update(&self.store, &runs),
            None => {
                for run in &runs {
                    let c = crate::progress::counts(&self.store, run);
                    info!(
                        job = %run.job,
                        run = %run.run_id,
                        chunks_saved = c.saved,
                        chunks_total = c.total,
                        triggered = c.triggered,
                        ready = c.ready,
                        failed = c.failed,
                        rows = c.rows,
                        "progress"
                    );
                }
            }
        }
    }

    /// One line for systemd's STATUS= and the logs.
    fn status_line(&self) -> String {
        let in_flight: u32 = self.keys.in_flight().iter().map(|(_, n)| n).sum();
        let mut line = format!(
            "{} run(s) in progress, {in_flight} collection(s) in flight, {} complete, {} incomplete",
            self.active.len(),
            self.summary.complete,
            self.summary.incomplete
        );
        for account in self.accounts.each() {
            if let Some(block) = account.gate.blocked() {
                line.push_str(&format!("; {} blocked: {}", account.name, block.reason));
            }
        }
        line
    }

    /// The earliest stored due time, if any.
    fn next_wake(&self) -> Option<i64> {
        if self.once {
            return None;
        }
        self.store
            .schedules()
            .ok()?
            .iter()
            .map(|r| r.next_due)
            .filter(|d| *d < i64::MAX)
            .min()
    }

    /// Starts (or skips) every job whose due time has passed.
    async fn fire_due(&mut self) -> Result<(), DaemonError> {
        let now = crate::clock::now_ms();
        for mut record in self.store.schedules()? {
            let in_progress = self.active.keys().any(|(job, _)| *job == record.job);
            let jitter = Duration::from_millis(record.jitter_ms);
            match on_due(
                &record.recurrence,
                record.next_due,
                now,
                in_progress,
                jitter,
            ) {
                Due::Wait => {}
                Due::Skip { next } => {
                    info!(job = %record.job, next_due = %timestamp(next), "due time skipped: the previous run is still in progress");
                    record.next_due = next;
                    self.store.put_schedule(&record)?;
                    self.store.flush().await?;
                }
                Due::Start { next } => {
                    // The new due time becomes durable with the planned run
                    // (plan_due flushes both), so a crash between them can
                    // neither repeat nor skip the run.
                    record.next_due = next;
                    self.store.put_schedule(&record)?;
                    let (dir, store, job) = (
                        self.config.jobs_dir.clone(),
                        self.store.clone(),
                        record.job.clone(),
                    );
                    let planned = tokio::task::spawn_blocking(move || {
                        crate::intake::plan_due(&dir, &store, &job, now)
                    })
                    .await
                    .map_err(DaemonError::from)??;
                    self.store.flush().await?;
                    if let Some(run) = planned {
                        self.spawn(run);
                    }
                }
            }
        }
        Ok(())
    }
}

/// How often the running daemon checks that its state directory is still
/// the one it locked (`docs/durability.md`: stop within 10 s).
const PLACE_CHECK: Duration = Duration::from_secs(2);

/// `run --recover`: opens the store whatever its state and rebuilds what
/// it can; every chunk not proven unpaid is left in doubt, for the workers
/// to settle at the provider before any trigger.
fn open_recovering(
    state_dir: &Path,
    output_dir: &Path,
    uploads: bool,
) -> Result<Store, DaemonError> {
    let (store, found) = Store::open_for_recovery(state_dir, crate::clock::now_ms())?;
    let finished = |run: &RunRecord| -> Option<RunState> {
        let manifest = run::run_dir(output_dir, run).join("manifest.json");
        let bytes = std::fs::read(manifest).ok()?;
        let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        serde_json::from_value(value.get("state")?.clone()).ok()
    };
    let recovered = store.recover(found, &finished, uploads)?;
    warn!(
        moved_aside = ?recovered.moved_aside,
        corrupt_records = recovered.corrupt_records,
        runs_rebuilt = recovered.runs_rebuilt,
        chunks_in_doubt = recovered.chunks_in_doubt,
        not_recovered = recovered.lost.len(),
        "recover: started from what is left of the store; chunks in doubt are settled at the provider before any trigger"
    );
    Ok(store)
}

/// Reads the configuration again (SIGHUP).
pub type Reload = Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// Runs the daemon until shutdown (or, with `once`, until the runs end).
/// What the event loop listens to besides the supervisor's own work.
struct Inputs<'a> {
    signals: &'a mut tokio::sync::mpsc::UnboundedReceiver<Signal>,
    commands: &'a mut tokio::sync::mpsc::Receiver<crate::admin::Command>,
    reload: &'a Reload,
    env: &'a dyn Env,
    emulator: bool,
    admin: Option<&'a Arc<crate::admin::AdminState>>,
    state_dir: &'a Path,
}

impl Supervisor {
    /// The daemon's event loop, until a shutdown signal (or, with `--once`,
    /// until every run and job read has ended): signals, job changes, due
    /// schedules, settled jobs, admin commands, finished runs, and the
    /// periodic checks (state directory, watchdog, status, progress).
    async fn event_loop(&mut self, inputs: Inputs<'_>) -> Result<(), DaemonError> {
        // The state directory is looked at every 2 s (and before every flush,
        // so before every trigger): removed or replaced, the daemon stops.
        let mut place_tick = tokio::time::interval(PLACE_CHECK);
        let mut watchdog = crate::systemd::watchdog_interval().map(tokio::time::interval);
        let mut status_tick = tokio::time::interval(Duration::from_secs(10));
        // Bars move smoothly; progress lines come every 10 s with --once, every
        // 30 s for the daemon.
        let mut progress_tick = tokio::time::interval(match (&self.bars, self.once) {
            (Some(_), _) => Duration::from_millis(250),
            (None, true) => Duration::from_secs(10),
            (None, false) => Duration::from_secs(30),
        });
        progress_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        self.scan().await?;
        let mut watcher =
            (!self.once).then(|| Watcher::new(&self.config.jobs_dir, self.config.rescan_interval));
        loop {
            if self.once
                && self.runs.is_empty()
                && self.intake.is_empty()
                && !self.watch.has_waiting()
            {
                break;
            }
            let settle_due = self
                .watch
                .next_due(tokio::time::Instant::now(), crate::clock::now_ms());
            tokio::select! {
                signal = inputs.signals.recv() => match signal {
                    Some(Signal::Shutdown) | None => {
                        info!("shutdown requested: finishing calls in flight");
                        break;
                    }
                    Some(Signal::Reload) => {
                        // A configuration or token file that fails keeps the
                        // one in force; the daemon never stops for a reload.
                        crate::systemd::reloading();
                        match (inputs.reload)().map_err(DaemonError::from).and_then(|new| self.apply_config(new, inputs.env, inputs.emulator)) {
                            Err(e) => {
                                error!(error = %e, "SIGHUP: configuration not reloaded; the one in force stays");
                                crate::systemd::reloaded(&format!("reload refused: {e}"));
                            }
                            Ok(()) => {
                                info!("SIGHUP: configuration reloaded");
                                crate::systemd::reloaded("configuration reloaded");
                            }
                        }
                        if let Some(state) = inputs.admin {
                            match crate::admin::admin_token(inputs.state_dir) {
                                Ok(t) => *state.token.write().unwrap_or_else(|e| e.into_inner()) = t,
                                Err(e) => error!(error = %e, "SIGHUP: cannot read the admin token; the old one stays"),
                            }
                        }
                        for account in self.accounts.each() {
                            account.unblock();
                        }
                        self.scan().await?;
                    }
                },
                _ = async { match watcher.as_mut() { Some(w) => w.changed().await, None => std::future::pending().await } } => {
                    self.scan().await?;
                }
                _ = crate::clock::sleep_until(self.next_wake()) => {
                    self.fire_due().await?;
                }
                // A job has been quiet for intake_settle: look once more, then read it.
                _ = async { match settle_due { Some(at) => tokio::time::sleep_until(at).await, None => std::future::pending().await } } => {
                    self.scan().await?;
                }
                Some(joined) = self.intake.join_next() => match joined {
                    Ok(settled) => {
                        if self.settled(settled).await? {
                            // A new run shows its progress from its start.
                            progress_tick.reset_immediately();
                        }
                    }
                    Err(e) => error!(error = %e, "job intake task panicked"),
                },
                Some(command) = inputs.commands.recv() => self.command(command).await?,
                // The watchdog is fed from the event loop itself: a stuck loop
                // stops feeding it and systemd restarts the daemon.
                _ = async { match watchdog.as_mut() { Some(w) => { w.tick().await; } None => std::future::pending().await } } => {
                    crate::systemd::watchdog();
                }
                _ = status_tick.tick() => crate::systemd::status(&self.status_line()),
                _ = place_tick.tick() => self.store.check_place()?,
                _ = progress_tick.tick() => self.report_progress(),
                Some(joined) = self.runs.join_next() => match joined {
                    Ok(result) => self.record(result)?,
                    Err(e) => error!(error = %e, "run task panicked"),
                },
            }
        }
        Ok(())
    }
}

/// Starts the built-in emulator and points both providers at it.
async fn start_emulator(config: &mut Config) -> Result<Emulator, DaemonError> {
    let emu = Emulator::start(([127, 0, 0, 1], 0).into(), Scenario::default())
        .await
        .map_err(io_error("cannot start the emulator"))?;
    info!(url = %emu.url(), "built-in emulator serving");
    config.providers.brightdata.base_url = Some(emu.url());
    config.providers.firecrawl.base_url = Some(emu.url());
    Ok(emu)
}

/// Opens the state store, or recovers it. Opening may wait for sled's own
/// lock (`Store::open`), and recovery reads every inputs directory: both on
/// the blocking pool.
async fn open_store(
    state_dir: &Path,
    output_dir: &Path,
    recover: bool,
    uploads: bool,
) -> Result<Store, DaemonError> {
    let (state_dir, output_dir) = (state_dir.to_path_buf(), output_dir.to_path_buf());
    tokio::task::spawn_blocking(move || {
        if recover {
            open_recovering(&state_dir, &output_dir, uploads)
        } else {
            Store::open(&state_dir).map_err(DaemonError::from)
        }
    })
    .await?
}

/// The admin API and the handle of its server task; none with
/// `admin_listen = "off"`.
async fn start_admin(
    sup: &Supervisor,
    state_dir: &Path,
    env: &dyn Env,
    fd_limit: Option<u64>,
    commands_tx: tokio::sync::mpsc::Sender<crate::admin::Command>,
) -> Result<Option<(Arc<crate::admin::AdminState>, tokio::task::JoinHandle<()>)>, DaemonError> {
    if sup.config.admin_listen == "off" {
        return Ok(None);
    }
    let stop = &sup.stop;
    let listen: std::net::SocketAddr = sup
        .config
        .admin_listen
        .parse()
        .map_err(|_| DaemonError::AdminListen(sup.config.admin_listen.clone()))?;
    let token = crate::admin::admin_token(state_dir).map_err(io_error("admin token"))?;
    let keys = sup.keys.clone();
    // Attached before resume writes anything, so it misses no write.
    let view = crate::admin::View::attach(&sup.store)?;
    let state = Arc::new(crate::admin::AdminState {
        store: sup.store.clone(),
        view,
        answers: Default::default(),
        accounts: sup.accounts.clone(),
        ready: std::sync::atomic::AtomicBool::new(false),
        token: std::sync::RwLock::new(token),
        commands: commands_tx,
        in_flight: Box::new(move || keys.in_flight()),
    });
    let mut limits = crate::admin::ServerLimits::for_fd_limit(fd_limit);
    // Undocumented, for tests: a shorter header timeout and another cap.
    if let Some(ms) = env
        .var("HARVESTD_ADMIN_HEADER_TIMEOUT_MS")
        .and_then(|v| v.parse().ok())
    {
        limits.header_timeout = Duration::from_millis(ms);
    }
    if let Some(n) = env
        .var("HARVESTD_ADMIN_MAX_CONNECTIONS")
        .and_then(|v| v.parse().ok())
    {
        limits.max_connections = n;
    }
    let task = crate::admin::serve(
        listen,
        state_dir.to_path_buf(),
        state.clone(),
        limits,
        stop.clone(),
    )
    .await
    .map_err(io_error(format_args!("admin API on {listen}")))?;
    Ok(Some((state, task)))
}

pub async fn run(
    mut config: Config,
    options: RunOptions,
    env: &dyn Env,
    mut signals: tokio::sync::mpsc::UnboundedReceiver<Signal>,
    reload: Reload,
) -> Result<Summary, DaemonError> {
    // Emulator state never mixes with real provider state.
    let state_dir = if options.emulator {
        config.state_dir.join("emulator")
    } else {
        config.state_dir.clone()
    };
    let _lock = lock_state_dir(&state_dir)?;
    // Every descriptor the system allows: the admin API's cap is set well
    // under it, so local clients cannot starve the jobs scan or sled.
    let fd_limit = crate::admin::raise_fd_limit();
    let emulator = match options.emulator {
        true => Some(start_emulator(&mut config).await?),
        false => None,
    };
    let tokens = match emulator {
        Some(_) => Tokens::emulator(),
        None => Tokens::find(&config, env)?,
    };
    let bucket = crate::bucket::Target::from_config(&config, env)
        .map_err(|e| DaemonError::Config(ConfigError::Invalid(e)))?
        .map(Arc::new);
    let output_dir = config.local_output_dir();
    std::fs::create_dir_all(&output_dir).map_err(io_error(output_dir.display()))?;
    let store = open_store(&state_dir, &output_dir, options.recover, bucket.is_some()).await?;
    let stop = CancellationToken::new();
    let notify = crate::notify::Notifier::new(&config.notify, store.clone())?;

    let accounts = Accounts::build(
        Common {
            config: &config,
            store: &store,
            stop: &stop,
            park_on_block: options.once,
            notify: &notify,
            bucket,
        },
        tokens,
    );
    // Notifications go out on tasks of their own: a dead or slow receiver
    // never holds up the event loop or a run.
    let mut background = JoinSet::new();
    background.spawn(notify.clone().run(stop.clone()));
    for account in accounts.each() {
        let blocks = account.gate.watch_blocked();
        background.spawn(
            notify
                .clone()
                .watch_blocks(account.name, blocks, stop.clone()),
        );
    }
    let settle = config.intake_settle;
    let mut sup = Supervisor {
        keys: Arc::new(KeyedLimits::new(config.limits.clone())),
        config,
        store,
        accounts: Arc::new(accounts),
        runs: JoinSet::new(),
        active: HashMap::new(),
        cancelling: HashSet::new(),
        summary: Summary::default(),
        stop: stop.clone(),
        once: options.once,
        bars: (options.once && std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .then(crate::progress::Bars::new),
        watch: crate::intake::Watch::new(settle),
        intake: JoinSet::new(),
        invalid: HashSet::new(),
        bad_names: HashSet::new(),
    };

    let (commands_tx, mut commands) = tokio::sync::mpsc::channel(16);
    let admin = start_admin(&sup, &state_dir, env, fd_limit, commands_tx).await?;

    let resumed = sup.resume().await?;
    if let Some((state, _)) = &admin {
        state
            .ready
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    crate::systemd::ready(&format!("resumed {resumed} run(s)"));
    info!(resumed, "state loaded; ready");
    sup.event_loop(Inputs {
        signals: &mut signals,
        commands: &mut commands,
        reload: &reload,
        env,
        emulator: emulator.is_some(),
        admin: admin.as_ref().map(|(state, _)| state),
        state_dir: &state_dir,
    })
    .await?;

    sup.drain(&notify).await;
    // What is undelivered stays in the outbox for the next start.
    background.abort_all();
    while let Some(ended) = background.join_next().await {
        if let Err(e) = ended {
            if e.is_panic() {
                error!(error = %e, "notification task panicked");
            }
        }
    }
    // The generation file then covers everything: any later loss shows.
    sup.store.checkpoint().await?;
    drop(sup.bars.take());
    if let Some((_, task)) = admin {
        let _ = task.await;
        let _ = std::fs::remove_file(state_dir.join("admin.addr"));
    }
    if let Some(emu) = emulator {
        emu.stop().await;
    }
    Ok(sup.summary)
}
