//! Job directory intake: which files are jobs, when a job's content has
//! settled, whether it is new, and planning a run for it (`docs/job-files.md`, `docs/outputs.md`).
//!
//! Intake works in two steps so that no job waits for another:
//! - [`look`] is cheap and runs on every scan: it lists the directory, reads
//!   each (small) job file and only `stat`s its inputs file, giving each job
//!   a [`Sighting`] whose `stamp` changes whenever a byte of either file may
//!   have.
//! - [`Watch`] (in the daemon, in memory) holds a job back until its stamp
//!   has stayed the same for `intake_settle`, or the files' own change
//!   times are that old, and while a run of the job is in progress; then
//!   [`settle`] does the reading, on a blocking thread of its own per job:
//!   hash, validate, plan. What is planned is what was hashed: the planning
//!   pass hashes the bytes it reads and drops the plan if they differ.
//!
//! Blocking IO throughout; the daemon runs [`look`] and [`settle`] on the
//! blocking pool.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::chunk::UnixMs;
use crate::plan::{chunk_name, run_id, Chunker, Packed};
use crate::spec::{self, InputSource, JobSpec, Schedule};
use crate::store::{ChunkRecord, JobRecord, RunRecord, RunState, Store, StoreError};

/// Names that are never jobs: hidden files and files still being written.
pub fn is_candidate(name: &str) -> bool {
    const PARTIAL: &[&str] = &[".tmp", ".part", ".filepart", ".swp", "~"];
    !name.starts_with('.')
        && !PARTIAL.iter().any(|s| name.ends_with(s))
        && (name.ends_with(".toml") || name.ends_with(".json"))
}

/// A file in the jobs directory that is a job file by its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A job file; `name` is its stem.
    Job { name: String, path: PathBuf },
    /// A job file whose name cannot be a job's: shown with its bytes that
    /// are not UTF-8 escaped (`caf\xe9.toml`), and why.
    BadName { shown: String, problem: String },
}

/// Job files directly in `dir`, sorted by name; names that are not UTF-8
/// are reported, never skipped without a word.
pub fn list(dir: &Path) -> std::io::Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for e in fs::read_dir(dir)? {
        let Ok(e) = e else { continue };
        let file_name = e.file_name();
        let shown = spec::render_name(&file_name);
        if !is_candidate(&shown) {
            continue;
        }
        match file_name.to_str() {
            Some(_) => {
                let path = e.path();
                let name = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or_default()
                    .to_string();
                entries.push(Entry::Job { name, path });
            }
            None => entries.push(Entry::BadName {
                problem: format!(
                    "{}: the file name '{shown}' is not valid UTF-8; a job name must match [a-z0-9][a-z0-9._-]{{0,63}}: rename the file",
                    dir.join(&shown).display()
                ),
                shown,
            }),
        }
    }
    entries.sort_by(|a, b| key(a).cmp(key(b)));
    Ok(entries)
}

fn key(e: &Entry) -> &str {
    match e {
        Entry::Job { name, .. } => name,
        Entry::BadName { shown, .. } => shown,
    }
}

/// sha256 of the job file, then of its inputs file if it names a readable
/// one. The inputs file is read through [`InputsFile::open`], so nothing
/// outside the jobs directory is ever read.
///
/// [`InputsFile::open`]: crate::spec::InputsFile::open
pub fn content_hash(job_bytes: &[u8], spec: Option<&JobSpec>) -> String {
    let mut inner = Sha256::new();
    let inputs = match spec.map(|s| &s.inputs) {
        Some(InputSource::File(inputs)) => {
            if let Ok(mut f) = inputs.open() {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = f.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    inner.update(&buf[..n]);
                }
            }
            Some(inner.finalize().into())
        }
        _ => None,
    };
    combine(Sha256::digest(job_bytes).into(), inputs)
}

/// The content hash from its parts: the job file's digest, then the inputs
/// file's (kept as it was, so stores from before keep their identities).
fn combine(job: [u8; 32], inputs: Option<[u8; 32]>) -> String {
    let mut h = Sha256::new();
    h.update(job);
    if let Some(inputs) = inputs {
        h.update(inputs);
    }
    hex::encode(h.finalize())
}

/// What a cheap look at one job found.
#[derive(Debug, Clone, PartialEq)]
pub struct Sighting {
    pub name: String,
    pub path: PathBuf,
    /// Changes whenever a byte of the job file or its inputs file may have:
    /// the job file's digest and the inputs file's device, inode, size and
    /// change times (ctime cannot be set back by a user).
    pub stamp: String,
    /// When the newer of the two files last changed (wall clock).
    pub changed_at: UnixMs,
    /// The job's schedule, when its job file parses.
    pub schedule: Option<(Schedule, Duration)>,
}

/// What [`look`] found in the directory.
#[derive(Debug, Default)]
pub struct Look {
    pub jobs: Vec<Sighting>,
    /// Files whose names cannot be jobs, with the problem to show.
    pub bad_names: Vec<(String, String)>,
    /// Whether the directory could be listed (so absent jobs are really gone).
    pub listed: bool,
}

/// Lists the jobs directory and stamps each job without reading its inputs.
pub fn look(dir: &Path) -> Look {
    let mut out = Look::default();
    let entries = match list(dir) {
        Ok(e) => e,
        Err(e) => {
            error!(dir = %dir.display(), error = %e, "cannot read the jobs directory");
            return out;
        }
    };
    out.listed = true;
    for entry in entries {
        match entry {
            Entry::BadName { shown, problem } => out.bad_names.push((shown, problem)),
            Entry::Job { name, path } => out.jobs.push(sight(name, path)),
        }
    }
    out
}

/// Stamps one job file (see [`Sighting::stamp`]).
pub fn sight(name: String, path: PathBuf) -> Sighting {
    let mut stamp = Sha256::new();
    let mut changed_at = 0;
    let mut schedule = None;
    match spec::document::read_job_file(&path) {
        Err(message) => stamp.update(message.as_bytes()),
        Ok((bytes, meta)) => {
            changed_at = changed_ms(&meta);
            stamp.update(Sha256::digest(&bytes));
            if let Ok(spec) = spec::parse(&path, &bytes) {
                schedule = spec.schedule.clone().map(|r| (r, spec.jitter));
                if let InputSource::File(inputs) = &spec.inputs {
                    match inputs.open().and_then(|f| {
                        f.metadata().map_err(|e| spec::confine::ConfineError::Io {
                            name: inputs.name.display().to_string(),
                            error: e.to_string(),
                        })
                    }) {
                        Ok(meta) => {
                            changed_at = changed_at.max(changed_ms(&meta));
                            stamp.update(identity(&meta).as_bytes());
                        }
                        Err(e) => stamp.update(e.to_string().as_bytes()),
                    }
                }
            }
        }
    }
    Sighting {
        name,
        path,
        stamp: hex::encode(stamp.finalize()),
        changed_at,
        schedule,
    }
}

#[cfg(unix)]
fn identity(meta: &fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "{}:{}:{}:{}.{}:{}.{}",
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    )
}

#[cfg(not(unix))]
fn identity(meta: &fs::Metadata) -> String {
    format!("{}:{:?}", meta.len(), meta.modified().ok())
}

/// The later of the file's modification and status-change times, in ms.
fn changed_ms(meta: &fs::Metadata) -> UnixMs {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let ms = |s: i64, ns: i64| s.saturating_mul(1000).saturating_add(ns / 1_000_000);
        ms(meta.mtime(), meta.mtime_nsec()).max(ms(meta.ctime(), meta.ctime_nsec()))
    }
    #[cfg(not(unix))]
    {
        meta.modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as UnixMs)
    }
}

/// Where a watched job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Seen with this stamp since `since`; not yet looked at closely.
    Settling,
    /// A [`settle`] task has it.
    Working,
    /// This stamp is dealt with; nothing happens until it changes.
    Done,
}

#[derive(Debug)]
struct Watched {
    sighting: Sighting,
    since: Instant,
    phase: Phase,
}

/// The daemon's memory of the jobs directory between scans: which jobs are
/// still settling, which are being read, which are dealt with.
#[derive(Debug)]
pub struct Watch {
    settle: Duration,
    /// By job file: two files may claim one job name (`a.toml`, `a.json`),
    /// and each is reported on its own.
    jobs: HashMap<PathBuf, Watched>,
}

impl Watch {
    pub fn new(settle: Duration) -> Watch {
        Watch {
            settle,
            jobs: HashMap::new(),
        }
    }

    pub fn set_settle(&mut self, settle: Duration) {
        self.settle = settle;
    }

    /// Takes in a scan: a new or changed stamp starts settling again; jobs
    /// no longer in the directory are forgotten.
    pub fn observe(&mut self, sightings: Vec<Sighting>, listed: bool, now: Instant) {
        let mut present = std::collections::HashSet::new();
        for s in sightings {
            present.insert(s.path.clone());
            match self.jobs.get_mut(&s.path) {
                Some(w) if w.sighting.stamp == s.stamp => w.sighting = s,
                Some(w) if w.phase == Phase::Working => {
                    // The task in progress will find the change itself and
                    // report it; keep the newest stamp to compare with.
                    w.sighting = s;
                    w.since = now;
                }
                _ => {
                    self.jobs.insert(
                        s.path.clone(),
                        Watched {
                            sighting: s,
                            since: now,
                            phase: Phase::Settling,
                        },
                    );
                }
            }
        }
        if listed {
            self.jobs
                .retain(|path, w| present.contains(path) || w.phase == Phase::Working);
        }
    }

    fn settled(&self, w: &Watched, now: Instant, wall: UnixMs) -> bool {
        let quiet_ms = wall.saturating_sub(w.sighting.changed_at);
        now.saturating_duration_since(w.since) >= self.settle
            || (quiet_ms >= 0 && quiet_ms as u128 >= self.settle.as_millis())
    }

    /// The jobs whose content has settled and that have no run in progress
    /// (`busy`), now handed to [`settle`].
    pub fn take_ready(
        &mut self,
        now: Instant,
        wall: UnixMs,
        busy: impl Fn(&str) -> bool,
    ) -> Vec<Sighting> {
        let ready: Vec<PathBuf> = self
            .jobs
            .iter()
            .filter(|(_, w)| {
                w.phase == Phase::Settling && !busy(&w.sighting.name) && self.settled(w, now, wall)
            })
            .map(|(path, _)| path.clone())
            .collect();
        ready
            .into_iter()
            .filter_map(|path| {
                let w = self.jobs.get_mut(&path)?;
                w.phase = Phase::Working;
                Some(w.sighting.clone())
            })
            .collect()
    }

    /// A [`settle`] task ended. `retry_in`: look at the job again after this
    /// long (its content changed while it was read, or planning failed).
    pub fn finished(&mut self, sighting: &Sighting, retry_in: Option<Duration>, now: Instant) {
        let Some(w) = self.jobs.get_mut(&sighting.path) else {
            return;
        };
        w.phase = match retry_in {
            None if w.sighting.stamp == sighting.stamp => Phase::Done,
            None => Phase::Settling,
            Some(after) => {
                w.since = now + after;
                Phase::Settling
            }
        };
    }

    /// When the next settling job will have settled, if one is waiting.
    pub fn next_due(&self, now: Instant, wall: UnixMs) -> Option<Instant> {
        self.jobs
            .values()
            .filter(|w| w.phase == Phase::Settling)
            .map(|w| {
                let by_watch = w.since + self.settle;
                let quiet = crate::clock::between(w.sighting.changed_at, wall);
                let by_times = now + self.settle.saturating_sub(quiet);
                by_watch.min(by_times)
            })
            .min()
    }

    /// Whether a job is waiting to be looked at (a run of it ended: its
    /// newest content may start now).
    pub fn has_waiting(&self) -> bool {
        self.jobs.values().any(|w| w.phase == Phase::Settling)
    }
}

/// What [`settle`] did with a job.
#[derive(Debug)]
pub enum Settled {
    /// New content: a run is planned and stored.
    Planned(Box<RunRecord>),
    /// Content that ran (or was found invalid) before: nothing starts.
    Known,
    /// The job is invalid; every problem.
    Invalid(Vec<String>),
    /// The files changed while they were read: nothing was kept; look again.
    Changed,
}

/// Reads a settled job closely: is the content new, is it valid, then plans
/// it. Blocking; one job per call, so a big inputs file holds up no other.
pub fn settle(store: &Store, sighting: &Sighting, now: UnixMs) -> Result<Settled, StoreError> {
    let name = &sighting.name;
    let path = &sighting.path;
    let previous = store.job(name)?;
    if let Some(prev) = previous
        .as_ref()
        .filter(|p| p.stamp.as_deref() == Some(sighting.stamp.as_str()))
    {
        // The same files as when this content was last dealt with.
        return Ok(if prev.problems.is_empty() {
            Settled::Known
        } else {
            Settled::Invalid(prev.problems.clone())
        });
    }
    let bytes = spec::document::read_job_file(path).map(|(b, _)| b);
    let parsed = bytes.as_ref().ok().map(|b| spec::parse(path, b));
    let spec_ok = parsed.as_ref().and_then(|p| p.as_ref().ok());
    let hash = match &bytes {
        Ok(b) => content_hash(b, spec_ok),
        Err(message) => hex::encode(Sha256::digest(message.as_bytes())),
    };
    if sight(name.clone(), path.clone()).stamp != sighting.stamp {
        return Ok(Settled::Changed);
    }
    let mut record = JobRecord::new(name.clone(), hash.clone(), Vec::new(), now);
    record.stamp = Some(sighting.stamp.clone());
    record.last_run = previous.as_ref().and_then(|p| p.last_run.clone());
    if let Some(prev) = previous.as_ref().filter(|p| p.content_sha256 == hash) {
        // Touched or re-dropped, same bytes: remember the new stamp only.
        record.problems = prev.problems.clone();
        store.put_job(&record)?;
        store.flush_blocking()?;
        return Ok(if record.problems.is_empty() {
            Settled::Known
        } else {
            Settled::Invalid(record.problems)
        });
    }
    if let Some(run_id) = store.seen(name, &hash)? {
        info!(job = %name, run = %run_id, "job content already ran; nothing to do");
        store.put_job(&record)?;
        store.flush_blocking()?;
        return Ok(Settled::Known);
    }
    let checked = match (bytes, parsed) {
        (Err(message), _) => Err(vec![format!("{}: {message}", path.display())]),
        (Ok(_), Some(Err(problems))) => Err(problems.iter().map(ToString::to_string).collect()),
        (Ok(b), Some(Ok(spec))) => match spec::check_inputs(&spec, path) {
            Ok(count) => Ok((spec, b, count)),
            Err(problems) => Err(problems.iter().map(ToString::to_string).collect()),
        },
        (Ok(_), None) => Err(vec![format!("{}: cannot be parsed", path.display())]),
    };
    let (spec, job_bytes, count) = match checked {
        Ok(c) => c,
        Err(problems) => {
            if sight(name.clone(), path.clone()).stamp != sighting.stamp {
                return Ok(Settled::Changed);
            }
            for p in &problems {
                error!(job = %name, problem = %p, "invalid job file; fix it and the job is looked at again");
            }
            record.problems = problems.clone();
            store.put_job(&record)?;
            store.flush_blocking()?;
            return Ok(Settled::Invalid(problems));
        }
    };
    match plan(store, &spec, &job_bytes, &hash, now) {
        Ok(run) => {
            info!(job = %name, run = %run.run_id, inputs = count, chunks = run.chunks, "run planned");
            record.last_run = Some(run.run_id.clone());
            store.put_job(&record)?;
            store.flush_blocking()?;
            Ok(Settled::Planned(Box::new(run)))
        }
        Err(PlanError::Changed) => {
            info!(job = %name, "the job's files changed while they were read; planned nothing, looking again once they settle");
            Ok(Settled::Changed)
        }
        Err(PlanError::Store(e)) => Err(e),
        Err(PlanError::Inputs(message)) => {
            error!(job = %name, problem = %message, "cannot plan the job");
            record.problems = vec![message.clone()];
            store.put_job(&record)?;
            store.flush_blocking()?;
            Ok(Settled::Invalid(vec![message]))
        }
    }
}

/// What a whole scan found, every job settled at once (no waiting): for
/// tools and benchmarks that look at a directory once.
#[derive(Debug, Default)]
pub struct Scan {
    /// Runs planned for new content, ready to drive.
    pub new_runs: Vec<RunRecord>,
    /// Jobs whose current content is invalid, with their problems.
    pub invalid: Vec<(String, Vec<String>)>,
}

/// Looks at every job file once and settles each at once.
pub fn scan(dir: &Path, store: &Store, now: UnixMs) -> Result<Scan, StoreError> {
    let mut out = Scan::default();
    let look = look(dir);
    for (shown, problem) in look.bad_names {
        out.invalid.push((shown, vec![problem]));
    }
    for sighting in look.jobs {
        match settle(store, &sighting, now)? {
            Settled::Planned(run) => out.new_runs.push(*run),
            Settled::Invalid(problems) => out.invalid.push((sighting.name, problems)),
            Settled::Known | Settled::Changed => {}
        }
    }
    Ok(out)
}

/// Plans a scheduled run of `job` from its job file as it is now, whether or
/// not this content ran before. `None` when the file is gone or invalid
/// (logged).
pub fn plan_due(
    dir: &Path,
    store: &Store,
    job: &str,
    now: UnixMs,
) -> Result<Option<RunRecord>, StoreError> {
    let path = ["toml", "json"]
        .iter()
        .map(|ext| dir.join(format!("{job}.{ext}")))
        .find(|p| p.is_file());
    let Some(path) = path else {
        return Ok(None);
    };
    let loaded = spec::document::read_job_file(&path)
        .map_err(|message| vec![format!("{}: {message}", path.display())])
        .and_then(|(bytes, _)| {
            let spec = spec::parse(&path, &bytes)
                .map_err(|ps| ps.iter().map(ToString::to_string).collect::<Vec<_>>())?;
            spec::check_inputs(&spec, &path)
                .map_err(|ps| ps.iter().map(ToString::to_string).collect::<Vec<_>>())?;
            Ok((spec, bytes))
        });
    let (spec, bytes) = match loaded {
        Ok(l) => l,
        Err(problems) => {
            for p in &problems {
                error!(job, problem = %p, "scheduled run not started: the job file is invalid");
            }
            return Ok(None);
        }
    };
    let hash = content_hash(&bytes, Some(&spec));
    match plan(store, &spec, &bytes, &hash, now) {
        Ok(run) => {
            let mut record = store
                .job(job)?
                .unwrap_or_else(|| JobRecord::new(job.to_string(), hash.clone(), Vec::new(), now));
            record.last_run = Some(run.run_id.clone());
            record.content_sha256 = hash;
            store.put_job(&record)?;
            store.flush_blocking()?;
            info!(job, run = %run.run_id, chunks = run.chunks, "scheduled run planned");
            Ok(Some(run))
        }
        Err(PlanError::Store(e)) => Err(e),
        Err(PlanError::Changed) => {
            warn!(
                job,
                "scheduled run not started: the inputs changed while they were read"
            );
            Ok(None)
        }
        Err(PlanError::Inputs(message)) => {
            error!(job, problem = %message, "scheduled run not started");
            Ok(None)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Inputs(String),
    /// The bytes read while planning are not the ones hashed: the files
    /// changed in between. Nothing of the plan is kept.
    #[error("the job's files changed while they were read")]
    Changed,
}

/// Stores a new run: `planning`, its chunks with their inputs, then
/// `in_progress` together with the content marked seen. The inputs are
/// hashed as they are read; if they are not what `content_sha256` says, or
/// anything fails, the run and its files are removed at once (a full disk
/// is not kept full by an abandoned plan). A crash before the end leaves a
/// `planning` run, which is discarded at the next start.
pub fn plan(
    store: &Store,
    spec: &JobSpec,
    job_bytes: &[u8],
    content_sha256: &str,
    now: UnixMs,
) -> Result<RunRecord, PlanError> {
    let id = run_id(now, |id| store.run_exists(&spec.name, id).unwrap_or(true));
    let mut run = RunRecord {
        v: 1,
        job: spec.name.clone(),
        run_id: id,
        spec: spec.clone(),
        spec_sha256: content_sha256.to_string(),
        started_at: now,
        finished_at: None,
        state: RunState::Planning,
        inputs: 0,
        chunks: 0,
        cancel_requested: false,
        upload: None,
    };
    store.put_run(&run)?;
    match plan_chunks(store, spec, job_bytes, content_sha256, &run.run_id) {
        Ok((total, chunks)) => {
            run.inputs = total;
            run.chunks = chunks;
        }
        Err(e) => {
            if let Err(cleanup) = store.delete_run(&spec.name, &run.run_id) {
                error!(job = %spec.name, run = %run.run_id, error = %cleanup, "cannot remove a failed plan; it is removed at the next start");
            }
            return Err(e);
        }
    }
    run.state = RunState::InProgress;
    store.put_run(&run)?;
    store.mark_seen(&spec.name, content_sha256, &run.run_id)?;
    Ok(run)
}

/// Writes the chunks of a run being planned; returns inputs and chunks.
fn plan_chunks(
    store: &Store,
    spec: &JobSpec,
    job_bytes: &[u8],
    content_sha256: &str,
    run_id: &str,
) -> Result<(u64, u32), PlanError> {
    let mut chunker = Chunker::new(spec.chunk_size);
    let mut index = 0u32;
    let mut total = 0u64;
    let mut put = |packed: Packed, index: &mut u32| -> Result<(), StoreError> {
        let rec =
            ChunkRecord::planned(*index, packed.count, chunk_name(&spec.name, run_id, *index));
        store.put_planned_chunk(&spec.name, run_id, &rec, &packed.ndjson)?;
        total += packed.count;
        *index += 1;
        Ok(())
    };
    let mut store_error = None;
    let inputs_digest = match &spec.inputs {
        InputSource::Inline(rows) => {
            for row in rows {
                if let Some(p) = chunker.push(row) {
                    put(p, &mut index)?;
                }
            }
            None
        }
        InputSource::File(file) => {
            let mut hasher = Sha256::new();
            let read = spec::inputs::for_each(
                file,
                |bytes| hasher.update(bytes),
                |_, row| {
                    if let Some(p) = chunker.push(row) {
                        if let Err(e) = put(p, &mut index) {
                            // Stop at the first failure: a full disk fails
                            // every chunk after it too.
                            store_error = Some(e);
                            return Err(());
                        }
                    }
                    Ok(())
                },
            );
            if let Some(e) = store_error.take() {
                return Err(e.into());
            }
            read.map_err(|e| PlanError::Inputs(format!("{}: {e}", file.path().display())))?;
            Some(hasher.finalize().into())
        }
    };
    if combine(Sha256::digest(job_bytes).into(), inputs_digest) != content_sha256 {
        return Err(PlanError::Changed);
    }
    if let Some(p) = chunker.finish() {
        put(p, &mut index)?;
    }
    if total == 0 {
        return Err(PlanError::Inputs("no inputs".into()));
    }
    store.seal_inputs(&spec.name, run_id)?;
    Ok((total, index))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sighting(name: &str, stamp: &str, changed_at: UnixMs) -> Sighting {
        Sighting {
            name: name.into(),
            path: PathBuf::from(format!("jobs/{name}.toml")),
            stamp: stamp.into(),
            changed_at,
            schedule: None,
        }
    }

    #[test]
    fn a_job_is_read_only_once_its_files_have_been_quiet_for_the_settle_time() {
        let settle = Duration::from_secs(2);
        let mut watch = Watch::new(settle);
        let t0 = Instant::now();
        let wall = 1_000_000;
        let idle = |_: &str| false;
        // Changed just now: not before the settle time has passed.
        watch.observe(vec![sighting("a", "s1", wall)], true, t0);
        assert!(watch.take_ready(t0, wall, idle).is_empty());
        assert_eq!(watch.next_due(t0, wall), Some(t0 + settle));
        // Written to again a second later: the clock starts over.
        let t1 = t0 + Duration::from_secs(1);
        watch.observe(vec![sighting("a", "s2", wall + 1000)], true, t1);
        assert!(watch.take_ready(t0 + settle, wall + 2000, idle).is_empty());
        let ready = watch.take_ready(t1 + settle, wall + 3000, idle);
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].stamp, "s2");
        // Dealt with: nothing more until the stamp changes.
        watch.finished(&ready[0], None, t1 + settle);
        let later = t1 + settle * 10;
        watch.observe(vec![sighting("a", "s2", wall + 1000)], true, later);
        assert!(watch.take_ready(later, wall + 60_000, idle).is_empty());
        assert!(!watch.has_waiting());

        // Files unchanged for longer than the settle time (a restart, or
        // jobs dropped while the daemon was down) are read at once.
        let mut watch = Watch::new(settle);
        watch.observe(vec![sighting("b", "s1", wall - 5000)], true, t0);
        assert_eq!(watch.take_ready(t0, wall, idle).len(), 1);
    }

    #[test]
    fn new_content_waits_for_the_run_in_progress_and_only_the_newest_is_kept() {
        let settle = Duration::from_millis(100);
        let mut watch = Watch::new(settle);
        let t0 = Instant::now();
        let wall = 1_000_000;
        watch.observe(vec![sighting("a", "v2", wall)], true, t0);
        watch.observe(vec![sighting("a", "v3", wall + 10)], true, t0);
        let later = t0 + Duration::from_secs(5);
        assert!(watch.take_ready(later, wall + 5000, |_| true).is_empty());
        assert!(watch.has_waiting());
        let ready = watch.take_ready(later, wall + 5000, |_| false);
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].stamp, "v3");
    }

    #[test]
    fn content_that_changed_while_it_was_read_is_read_again_after_settling() {
        let settle = Duration::from_millis(100);
        let mut watch = Watch::new(settle);
        let t0 = Instant::now();
        let wall = 1_000_000;
        watch.observe(vec![sighting("a", "v1", wall - 5000)], true, t0);
        let taken = watch.take_ready(t0, wall, |_| false);
        assert_eq!(taken.len(), 1);
        // A scan during the read sees a new stamp; the read ends.
        watch.observe(vec![sighting("a", "v2", wall)], true, t0);
        watch.finished(&taken[0], None, t0);
        assert!(watch.take_ready(t0, wall, |_| false).is_empty());
        let ready = watch.take_ready(t0 + settle, wall + 100, |_| false);
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].stamp, "v2");
        // A job file removed is forgotten.
        watch.finished(&ready[0], None, t0 + settle);
        watch.observe(Vec::new(), true, t0 + settle);
        assert!(watch.jobs.is_empty());
    }

    #[test]
    fn partial_and_hidden_names_are_not_jobs() {
        for ok in ["a.toml", "b-1.json"] {
            assert!(is_candidate(ok), "{ok}");
        }
        for no in [
            ".a.toml",
            "a.toml.tmp",
            "a.toml.part",
            "a.toml.filepart",
            "a.toml.swp",
            "a.toml~",
            "a.csv",
            "a.txt",
        ] {
            assert!(!is_candidate(no), "{no}");
        }
    }
}
