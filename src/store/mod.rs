//! Durable state: small typed records in sled, and each chunk's inputs in a
//! file beside it. The only module that imports sled: typed records, key
//! encoding, record versions. Nothing written is durable until
//! [`Store::flush`] returns; callers flush before acting on a new state.
//!
//! Trees and keys (`\0` separates parts; indexes are big-endian so keys sort
//! numerically):
//!
//! | tree     | key                     | value            |
//! |----------|-------------------------|------------------|
//! | `runs`   | job `\0` run_id         | [`RunRecord`]    |
//! | `chunks` | job `\0` run_id `\0` idx | [`ChunkRecord`]  |
//! | `chunks` | `\xff` job `\0` run_id `\0` idx | empty: the chunk is not finished (the open index) |
//! | `jobs`   | job                     | [`JobRecord`]    |
//! | `seen`   | job `\0` content sha256 | run_id that content started |
//! | `meta`   | `last_trigger/` key     | UnixMs of the last trigger intent |
//! | `meta`   | `build_times/` key      | the last [`BUILD_SAMPLES`] build times, ms, u64 big-endian each |
//! | `schedules` | job                  | [`ScheduleRecord`] |
//! | `outbox`, `notified` | event id `\0` target | see [`outbox`] |
//!
//! | `meta`   | `generation`            | u64 big-endian: see [`guard`] |
//!
//! `<state_dir>/generation` holds the generation last made durable (see
//! [`guard`]): a store whose own is lower is older than the state the
//! daemon flushed, and is refused; [`Store::open_for_recovery`] and
//! [`Store::recover`] start again from what is left (`run --recover`).
//!
//! Beside sled, in files: chunk inputs, run copies and `dedup_key`
//! history ([`files`]).

mod files;
mod guard;
mod outbox;
mod records;
mod recover;

pub use guard::GENERATION_FILE;
pub use outbox::OutboxRecord;
use records::{decode, encode, VERSION};
pub use records::{ChunkRecord, JobRecord, RunRecord, RunState, RunUpload, ScheduleRecord};
pub use recover::Recovered;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use guard::FileGeneration;

use crate::chunk::{ChunkState, UnixMs};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store: {0}")]
    Sled(#[from] sled::Error),
    #[error("state store: corrupt record {key}: {message}; the store is damaged: start with `harvestd run --recover` to continue from what is left")]
    Corrupt { key: String, message: String },
    #[error("state store {path} is damaged: {detail}; start with `harvestd run --recover` to continue from what is left (every chunk not proven unpaid is settled at the provider first)")]
    Damaged { path: String, detail: String },
    #[error("state store {path} is older than the state this daemon last flushed (its generation {store}, the generation file says {file}): sled lost flushed state (its data file truncated, overwritten in part, or restored from a copy); start with `harvestd run --recover` to continue from what is left (every chunk not proven unpaid is settled at the provider first)")]
    Stale { path: String, store: u64, file: u64 },
    #[error("the state directory {path} was removed or replaced under the running daemon ({detail}); stopping before any further trigger")]
    Replaced { path: String, detail: String },
    #[error("state store: {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The daemon's state. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    generation: Arc<guard::Generation>,
    place: Arc<guard::Place>,
    db: sled::Db,
    runs: sled::Tree,
    chunks: sled::Tree,
    inputs_dir: PathBuf,
    dedup_dir: PathBuf,
    jobs: sled::Tree,
    seen: sled::Tree,
    meta: sled::Tree,
    schedules: sled::Tree,
    /// Told of every run, chunk, job and schedule record written, so the
    /// admin API answers from figures kept in memory instead of walking
    /// the store per request (`docs/admin-api.md`). Set once, by the daemon.
    observer: Arc<OnceLock<Arc<dyn Observer>>>,
}

/// Hears of each record the store writes or removes, right after the write.
/// Called on the writer's thread: an observer only updates memory behind a
/// short lock and never blocks.
pub trait Observer: Send + Sync {
    fn run(&self, run: &RunRecord);
    fn run_deleted(&self, job: &str, run_id: &str);
    fn chunk(&self, job: &str, run_id: &str, chunk: &ChunkRecord);
    fn job(&self, job: &JobRecord);
    fn schedule(&self, record: &ScheduleRecord);
    fn schedule_deleted(&self, job: &str);
}

fn run_key(job: &str, run_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(job.len() + run_id.len() + 1);
    k.extend_from_slice(job.as_bytes());
    k.push(0);
    k.extend_from_slice(run_id.as_bytes());
    k
}

fn chunk_key(job: &str, run_id: &str, index: u32) -> Vec<u8> {
    let mut k = run_key(job, run_id);
    k.push(0);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// The open index's key for a chunk: its key behind a `0xff` byte, which
/// no job name (UTF-8) starts with, so no run's chunk scan ever meets it.
fn open_key(job: &str, run_id: &str, index: u32) -> Vec<u8> {
    let mut k = vec![OPEN];
    k.extend_from_slice(&chunk_key(job, run_id, index));
    k
}

const OPEN: u8 = 0xff;
/// `meta` key marking that the open index is complete (stores from before
/// it are indexed once, when first opened).
const OPEN_INDEX_MARK: &str = "open_index/1";
/// The copy of a run's record beside its inputs.
const RUN_COPY: &str = "run.json";
/// `meta` key of the generation counter (see [`guard`]).
const GENERATION_KEY: &str = "generation";

/// Opens sled's database under `dir`.
fn open_db(dir: &Path) -> Result<sled::Db, StoreError> {
    let config = sled::Config::new()
        .path(dir.join("db"))
        // Records are small and read mostly at start; a small cache keeps
        // memory flat (1M-input benchmark: 23 MB peak with 2 MiB, 26 MB
        // with 8 MiB, same speed).
        .cache_capacity(2 * 1024 * 1024);
    // sled 0.34 lets go of its file lock from a background thread some
    // time after the last handle is dropped (spacejam/sled#1234,
    // #1289), so opening a store just closed in the same process can
    // find the lock still held. The daemon holds the state directory's
    // own lock (`harvestd.lock`) before it opens the store, so there a
    // held sled lock is only ever that: it is tried again for up to 2 s.
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut pause = Duration::from_millis(5);
    loop {
        match config.open() {
            Err(e) if is_lock_error(&e) && Instant::now() < deadline => {
                // Never on the async thread: the daemon opens its store
                // on the blocking pool.
                #[allow(clippy::disallowed_methods)]
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            opened => return Ok(opened?),
        }
    }
}

/// sled words a held lock itself, as an `Other` I/O error.
fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(e) if e.to_string().starts_with("could not acquire lock"))
}

/// sled failing to open its files is damage, unless it is only its lock
/// (or another I/O error of the directory itself, such as permissions).
fn damaged(dir: &Path, e: StoreError) -> StoreError {
    match e {
        StoreError::Sled(ref s) if is_lock_error(s) => e,
        StoreError::Sled(sled::Error::Io(ref io))
            if io.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            e
        }
        StoreError::Sled(s) => StoreError::Damaged {
            path: dir.join("db").display().to_string(),
            detail: format!("sled cannot open it: {s}"),
        },
        other => other,
    }
}

impl Store {
    /// Opens the store. A damaged store (sled cannot open it, or a record
    /// read at start does not decode) or one older than the state last
    /// flushed (see [`guard`]) is refused with an error naming the way out,
    /// `harvestd run --recover`.
    ///
    /// A first start (no generation file, nothing counted in sled) writes
    /// the file with generation 0; so does the first start of a store made
    /// before the counter existed, which is accepted as it is and counted
    /// from then on. A store that has counted but whose file is missing is
    /// refused: the file is only ever replaced by a rename, so it was
    /// removed, or the directory copied without it, and nothing then tells
    /// whether the store is current.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let file = guard::read_generation(dir)?;
        let mut store = Store::open_parts(dir).map_err(|e| damaged(dir, e))?;
        let stored = store.stored_generation()?;
        let file = match (file, stored) {
            (FileGeneration::Value(f), s) if s.unwrap_or(0) < f => {
                return Err(StoreError::Stale {
                    path: dir.join("db").display().to_string(),
                    store: s.unwrap_or(0),
                    file: f,
                })
            }
            (FileGeneration::Value(f), _) => f,
            (FileGeneration::Missing, Some(g)) => {
                return Err(StoreError::Damaged {
                    path: dir.join(GENERATION_FILE).display().to_string(),
                    detail: format!(
                        "the generation file is missing although the store has counted to {g} \
                         (removed, or the state directory copied without it): whether the \
                         store is current cannot be checked"
                    ),
                })
            }
            (FileGeneration::Missing, None) => {
                guard::write_generation(dir, 0)?;
                0
            }
        };
        store.generation = Arc::new(guard::Generation::new(dir, stored.unwrap_or(0), file));
        store.index_open_chunks()?;
        store.verify()?;
        Ok(store)
    }

    /// sled's database and trees, with a generation counter at zero.
    fn open_parts(dir: &Path) -> Result<Store, StoreError> {
        let db = open_db(dir)?;
        Ok(Store {
            generation: Arc::new(guard::Generation::new(dir, 0, 0)),
            place: Arc::new(guard::Place::of(dir)?),
            runs: db.open_tree("runs")?,
            chunks: db.open_tree("chunks")?,
            inputs_dir: dir.join("inputs"),
            dedup_dir: dir.join("dedup"),
            jobs: db.open_tree("jobs")?,
            seen: db.open_tree("seen")?,
            meta: db.open_tree("meta")?,
            schedules: db.open_tree("schedules")?,
            db,
            observer: Arc::default(),
        })
    }

    /// The generation sled holds; `None` before the counter existed.
    fn stored_generation(&self) -> Result<Option<u64>, StoreError> {
        match self.meta.get(GENERATION_KEY)? {
            None => Ok(None),
            Some(v) => v
                .as_ref()
                .try_into()
                .map(|b| Some(u64::from_be_bytes(b)))
                .map_err(|_| StoreError::Corrupt {
                    key: format!("meta/{GENERATION_KEY}"),
                    message: format!("{} bytes where 8 were written", v.len()),
                }),
        }
    }

    /// Decodes what resume reads: every run, job and schedule, and the
    /// chunks in the open index. Finished chunks are not read (a store of
    /// many old runs would make every start slow); a damaged one is
    /// reported when it is read, with the same advice.
    fn verify(&self) -> Result<(), StoreError> {
        self.runs()?;
        self.jobs()?;
        self.schedules()?;
        for key in self.chunks.scan_prefix([OPEN]).keys() {
            let key = key?;
            let chunk_key = key.get(1..).unwrap_or_default();
            if let Some(v) = self.chunks.get(chunk_key)? {
                decode::<ChunkRecord>(chunk_key, &v)?;
            }
        }
        Ok(())
    }

    /// Fails when the state directory or its lock file was removed or
    /// replaced since the store was opened: the daemon checks it every few
    /// seconds, and every flush (so every trigger's intent) checks it too.
    pub fn check_place(&self) -> Result<(), StoreError> {
        self.place.check()
    }

    /// Builds the open index of a store written before it existed: one
    /// pass over every chunk, once.
    fn index_open_chunks(&self) -> Result<(), StoreError> {
        if self.meta.contains_key(OPEN_INDEX_MARK)? {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for kv in self.chunks.iter() {
            let (k, v) = kv?;
            if k.first() == Some(&OPEN) {
                continue;
            }
            let rec: ChunkRecord = decode(&k, &v)?;
            if !rec.state.is_terminal() {
                let mut open = vec![OPEN];
                open.extend_from_slice(&k);
                batch.insert(open, &[]);
            }
        }
        self.chunks.apply_batch(batch)?;
        self.meta.insert(OPEN_INDEX_MARK, &[])?;
        self.db.flush()?;
        Ok(())
    }

    /// Makes everything written so far durable, and the generation file
    /// cover it when a trigger's intent was among it (see [`guard`]). Fails, writing nothing, when the state directory was
    /// removed or replaced.
    ///
    /// sled 0.34's `flush_async` deadlocks under concurrent callers
    /// (spacejam/sled#1308, fixed only on its unreleased main branch; seen
    /// here as a 1M-input run stalling with every `sled-io` thread parked in
    /// `make_stable`), so the blocking `flush` runs on the blocking pool.
    pub async fn flush(&self) -> Result<(), StoreError> {
        crate::failpoint::io_error("store-flush").map_err(|source| StoreError::Io {
            path: "flush".into(),
            source,
        })?;
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.flush_blocking())
            .await
            .map_err(|e| StoreError::Io {
                path: "flush".into(),
                source: std::io::Error::other(e.to_string()),
            })?
    }

    /// [`flush`](Self::flush) for code already on the blocking pool.
    /// Sets the observer told of every later write; the first one stays.
    pub fn observe(&self, observer: Arc<dyn Observer>) {
        let _ = self.observer.set(observer);
    }

    fn observer(&self) -> Option<&Arc<dyn Observer>> {
        self.observer.get()
    }

    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.place.check()?;
        let target = self.generation.before_flush(|g| {
            self.meta.insert(GENERATION_KEY, &g.to_be_bytes())?;
            Ok(())
        })?;
        self.db.flush()?;
        self.generation.after_flush(target)
    }

    /// A flush that always brings the generation file up to date: at a
    /// clean shutdown, so that afterwards the loss of anything is noticed.
    pub async fn checkpoint(&self) -> Result<(), StoreError> {
        self.generation.mark_dirty();
        self.flush().await
    }

    /// Stores a run. It is also copied to `run.json` beside its inputs
    /// (durably, once per change of state, and when an upload to do is
    /// recorded or done): what `--recover` rebuilds it from if sled loses
    /// it, so a finished run is not taken for an unfinished one, nor an
    /// upload to do forgotten.
    pub fn put_run(&self, run: &RunRecord) -> Result<(), StoreError> {
        let key = run_key(&run.job, &run.run_id);
        let previous = self.runs.get(&key)?;
        let changed = previous
            .and_then(|v| decode::<RunRecord>(&key, &v).ok())
            .is_none_or(|p| p.state != run.state || p.upload.is_some() != run.upload.is_some());
        if changed {
            let dir = self.run_inputs_dir(&run.job, &run.run_id);
            self.place.make_dir(&dir)?;
            guard::write_durable(&dir.join(RUN_COPY), &encode(run))?;
        }
        self.runs.insert(key, encode(run))?;
        if let Some(o) = self.observer() {
            o.run(run);
        }
        Ok(())
    }

    pub fn run(&self, job: &str, run_id: &str) -> Result<Option<RunRecord>, StoreError> {
        let key = run_key(job, run_id);
        self.runs.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }

    /// Every run, in key order (job, then run id).
    pub fn runs(&self) -> Result<Vec<RunRecord>, StoreError> {
        self.runs
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    pub fn runs_of(&self, job: &str) -> Result<Vec<RunRecord>, StoreError> {
        let mut prefix = job.as_bytes().to_vec();
        prefix.push(0);
        self.runs
            .scan_prefix(prefix)
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    pub fn run_exists(&self, job: &str, run_id: &str) -> Result<bool, StoreError> {
        Ok(self.runs.contains_key(run_key(job, run_id))?)
    }

    /// Removes a run and its chunks (used for runs caught mid-planning).
    pub fn delete_run(&self, job: &str, run_id: &str) -> Result<(), StoreError> {
        let mut prefix = run_key(job, run_id);
        prefix.push(0);
        let mut batch = sled::Batch::default();
        for key in self.chunks.scan_prefix(&prefix).keys() {
            batch.remove(key?);
        }
        let mut open = vec![OPEN];
        open.extend_from_slice(&prefix);
        for key in self.chunks.scan_prefix(&open).keys() {
            batch.remove(key?);
        }
        self.chunks.apply_batch(batch)?;
        self.runs.remove(run_key(job, run_id))?;
        if let Some(o) = self.observer() {
            o.run_deleted(job, run_id);
        }
        let dir = self.run_inputs_dir(job, run_id);
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error(&dir)(e)),
            _ => Ok(()),
        }
    }

    /// Writes a chunk's record and its place in the open index, at once.
    pub fn put_chunk(
        &self,
        job: &str,
        run_id: &str,
        chunk: &ChunkRecord,
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(chunk_key(job, run_id, chunk.index), encode(chunk));
        let open = open_key(job, run_id, chunk.index);
        if chunk.state.is_terminal() {
            batch.remove(open);
        } else {
            batch.insert(open, &[]);
        }
        self.chunks.apply_batch(batch)?;
        if matches!(chunk.state, ChunkState::Triggering { .. }) {
            // A trigger's intent: the flush that makes it durable brings
            // the generation file up to date too (see [`guard`]).
            self.generation.mark_dirty();
        }
        if let Some(o) = self.observer() {
            o.chunk(job, run_id, chunk);
        }
        Ok(())
    }

    /// One chunk's record.
    pub fn chunk(
        &self,
        job: &str,
        run_id: &str,
        index: u32,
    ) -> Result<Option<ChunkRecord>, StoreError> {
        let key = chunk_key(job, run_id, index);
        self.chunks.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }

    pub fn chunks(&self, job: &str, run_id: &str) -> Result<Vec<ChunkRecord>, StoreError> {
        self.chunk_iter(job, run_id).collect()
    }

    /// The run's chunks in order, decoded one at a time: counting the
    /// chunks of a 100,000-chunk run never holds them all.
    pub fn chunk_iter(
        &self,
        job: &str,
        run_id: &str,
    ) -> impl Iterator<Item = Result<ChunkRecord, StoreError>> {
        let mut prefix = run_key(job, run_id);
        prefix.push(0);
        self.chunks.scan_prefix(prefix).map(|kv| {
            let (k, v) = kv?;
            decode(&k, &v)
        })
    }

    /// The run's chunks that are not finished, in order, found through the
    /// open index: a run of 100,000 chunks with 10,000 open resumes by
    /// reading those 10,000 records, never the finished ones, and one at a
    /// time (collecting them first left their memory to the allocator).
    pub fn unfinished_chunks(
        &self,
        job: &str,
        run_id: &str,
    ) -> impl Iterator<Item = Result<ChunkRecord, StoreError>> + '_ {
        let mut prefix = vec![OPEN];
        prefix.extend_from_slice(&run_key(job, run_id));
        prefix.push(0);
        let (job, run_id) = (job.to_string(), run_id.to_string());
        self.chunks
            .scan_prefix(&prefix)
            .keys()
            .filter_map(move |key| {
                let index = match key {
                    Ok(key) => key
                        .get(key.len().saturating_sub(4)..)
                        .and_then(|b| b.try_into().ok())
                        .map(u32::from_be_bytes)?,
                    Err(e) => return Some(Err(e.into())),
                };
                match self.chunk(&job, &run_id, index) {
                    Ok(Some(rec)) if !rec.state.is_terminal() => Some(Ok(rec)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                }
            })
    }

    pub fn job(&self, name: &str) -> Result<Option<JobRecord>, StoreError> {
        self.jobs
            .get(name)?
            .map(|v| decode(name.as_bytes(), &v))
            .transpose()
    }

    pub fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.jobs
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    pub fn put_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        self.jobs.insert(job.name.as_bytes(), encode(job))?;
        if let Some(o) = self.observer() {
            o.job(job);
        }
        Ok(())
    }

    /// The run that this exact content of the job started, if any.
    pub fn seen(&self, job: &str, content_sha256: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .seen
            .get(run_key(job, content_sha256))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    pub fn mark_seen(
        &self,
        job: &str,
        content_sha256: &str,
        run_id: &str,
    ) -> Result<(), StoreError> {
        self.seen
            .insert(run_key(job, content_sha256), run_id.as_bytes())?;
        Ok(())
    }

    pub fn schedules(&self) -> Result<Vec<ScheduleRecord>, StoreError> {
        self.schedules
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    pub fn put_schedule(&self, record: &ScheduleRecord) -> Result<(), StoreError> {
        self.schedules
            .insert(record.job.as_bytes(), encode(record))?;
        if let Some(o) = self.observer() {
            o.schedule(record);
        }
        Ok(())
    }

    pub fn delete_schedule(&self, job: &str) -> Result<(), StoreError> {
        self.schedules.remove(job.as_bytes())?;
        if let Some(o) = self.observer() {
            o.schedule_deleted(job);
        }
        Ok(())
    }

    pub fn last_trigger(&self, key: &str) -> Result<Option<UnixMs>, StoreError> {
        Ok(self
            .meta
            .get(format!("last_trigger/{key}"))?
            .and_then(|v| v.as_ref().try_into().ok().map(i64::from_be_bytes)))
    }

    pub fn set_last_trigger(&self, key: &str, at: UnixMs) -> Result<(), StoreError> {
        self.meta
            .insert(format!("last_trigger/{key}"), &at.to_be_bytes())?;
        Ok(())
    }

    /// The key's most recent build times (ms from trigger to seen ready),
    /// oldest first: what polling learns from, across restarts and runs.
    pub fn build_times(&self, key: &str) -> Result<Vec<u64>, StoreError> {
        Ok(self
            .meta
            .get(format!("build_times/{key}"))?
            .map(|v| decode_build_times(&v))
            .unwrap_or_default())
    }

    /// Adds one build time, keeping the last [`BUILD_SAMPLES`]; returns them.
    /// Durable with the next flush.
    pub fn record_build_time(&self, key: &str, ms: u64) -> Result<Vec<u64>, StoreError> {
        let kept = self
            .meta
            .update_and_fetch(format!("build_times/{key}"), |old| {
                let mut times = old.map(decode_build_times).unwrap_or_default();
                times.push(ms);
                let drop = times.len().saturating_sub(BUILD_SAMPLES);
                Some(
                    times[drop..]
                        .iter()
                        .flat_map(|t| t.to_be_bytes())
                        .collect::<Vec<u8>>(),
                )
            })?;
        Ok(kept.map(|v| decode_build_times(&v)).unwrap_or_default())
    }
}

/// Build times kept per key: enough that one odd build does not decide.
pub const BUILD_SAMPLES: usize = 8;

fn decode_build_times(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .filter_map(|b| b.try_into().ok().map(u64::from_be_bytes))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::Progress;
    use crate::spec::JobSpec;

    /// Records written before the download's progress moved into the
    /// state: an upgrade mid-download resumes at the next page, and a
    /// downloaded chunk keeps its columns.
    #[test]
    fn a_chunk_record_from_before_progress_moved_into_its_state_keeps_it() {
        let record = |state: &str| {
            format!(
                r#"{{"v":1,"index":3,"inputs":2,"name":"n","state":{state},"triggers":1,"in_doubt":0,"last_error":null,"rejected":[],"download":{{"cursor":"p3","pages":2,"rows":7,"error_rows":1,"fetched":false,"columns":["a"]}}}}"#
            )
        };
        let ready = record(
            r#"{"state":"ready","remote_id":"r","triggered_at":1,"ready_at":2,"expires_at":3}"#,
        );
        let rec: ChunkRecord = decode(b"k", ready.as_bytes()).unwrap();
        let ChunkState::Ready { progress, .. } = &rec.state else {
            panic!("{rec:?}")
        };
        assert_eq!(
            *progress,
            Progress {
                cursor: Some(serde_json::json!("p3")),
                pages: 2,
                rows: 7,
                error_rows: 1,
                fetched: false,
                columns: Some(vec!["a".into()]),
            }
        );
        let again = String::from_utf8(encode(&rec)).unwrap();
        assert!(!again.contains("\"download\""), "{again}");
        assert_eq!(decode::<ChunkRecord>(b"k", again.as_bytes()).unwrap(), rec);

        let downloaded = record(
            r#"{"state":"downloaded","remote_id":"r","triggered_at":1,"ready_at":2,"expires_at":3,"downloaded_at":4,"rows":7,"error_rows":1}"#,
        );
        let rec: ChunkRecord = decode(b"k", downloaded.as_bytes()).unwrap();
        let ChunkState::Downloaded { columns, .. } = &rec.state else {
            panic!("{rec:?}")
        };
        assert_eq!(*columns, Some(vec!["a".to_string()]));
    }
    use crate::spec::{ApiVersion, InputSource, OutputFormat, ProviderKind};

    fn spec() -> JobSpec {
        JobSpec {
            name: "j".into(),
            provider: ProviderKind::ScraperStudio,
            key: "c_x".into(),
            inputs: InputSource::Inline(vec![]),
            chunk_size: 2,
            formats: vec![OutputFormat::Csv],
            schedule: None,
            jitter: Default::default(),
            params: Default::default(),
            api_version: ApiVersion::V2,
            escape_formulas: true,
            dedup_key: None,
        }
    }

    #[tokio::test]
    async fn records_survive_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let run = RunRecord {
                v: VERSION,
                job: "j".into(),
                run_id: "20260101T000000Z".into(),
                spec: spec(),
                spec_sha256: "ab".into(),
                started_at: 1,
                finished_at: None,
                state: RunState::InProgress,
                inputs: 3,
                chunks: 300,
                cancel_requested: false,
                upload: None,
            };
            store.put_run(&run).unwrap();
            for i in (0..300).rev() {
                store
                    .put_planned_chunk(
                        "j",
                        &run.run_id,
                        &ChunkRecord::planned(i, 1, format!("n{i}")),
                        b"{}\n",
                    )
                    .unwrap();
            }
            store.seal_inputs("j", &run.run_id).unwrap();
            store.mark_seen("j", "ab", &run.run_id).unwrap();
            store.set_last_trigger("c_x", 42).unwrap();
            store.flush().await.unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let runs = store.runs().unwrap();
        assert_eq!(runs.len(), 1);
        let chunks = store.chunks("j", &runs[0].run_id).unwrap();
        let indexes: Vec<u32> = chunks.iter().map(|c| c.index).collect();
        assert_eq!(
            indexes,
            (0..300).collect::<Vec<_>>(),
            "chunks come back in index order"
        );
        assert_eq!(
            store.seen("j", "ab").unwrap().as_deref(),
            Some("20260101T000000Z")
        );
        assert_eq!(store.last_trigger("c_x").unwrap(), Some(42));
        store.delete_run("j", &runs[0].run_id).unwrap();
        assert!(store.chunks("j", &runs[0].run_id).unwrap().is_empty());
        assert!(store
            .chunk_inputs("j", &runs[0].run_id, 0)
            .unwrap()
            .is_none());
    }

    #[test]
    fn many_concurrent_flushes_all_finish() {
        // The pattern that deadlocked sled's flush_async: many tasks each
        // writing and flushing at once. A deadlock blocks the runtime's own
        // threads (its timers too), so the runtime runs on a thread of its
        // own and this thread does the waiting.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let count = rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let store = Store::open(dir.path()).unwrap();
                let mut tasks = tokio::task::JoinSet::new();
                for i in 0..200u32 {
                    let store = store.clone();
                    tasks.spawn(async move {
                        store
                            .put_chunk("j", "r", &ChunkRecord::planned(i, 1, format!("n{i}")))
                            .unwrap();
                        store.flush().await.unwrap();
                    });
                }
                while let Some(t) = tasks.join_next().await {
                    t.unwrap();
                }
                store.chunks("j", "r").unwrap().len()
            });
            let _ = done.send(count);
        });
        let count = finished
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("every flush finished within 60 s");
        assert_eq!(count, 200);
    }

    #[test]
    fn dedup_history_is_per_run_and_skips_the_run_itself() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.dedup_record("j", "r1", &[1, 5, 9]).unwrap();
        store.dedup_record("j", "r2", &[2, 9, 12]).unwrap();
        assert_eq!(
            store.dedup_seen("j", "r3", &[1, 2, 3, 9, 13]).unwrap(),
            [true, true, false, true, false]
        );
        // r2 finished again after a crash: its own keys do not count.
        assert_eq!(
            store.dedup_seen("j", "r2", &[2, 5, 12]).unwrap(),
            [false, true, false]
        );
        assert_eq!(store.dedup_seen("other", "r1", &[1]).unwrap(), [false]);
    }

    #[test]
    fn resume_reads_only_unfinished_chunks_even_in_a_store_from_before_the_index() {
        use crate::chunk::{next, ChunkEvent};
        let dir = tempfile::tempdir().unwrap();
        let finish = |rec: &mut ChunkRecord| {
            for event in [
                ChunkEvent::Intent { at: 1 },
                ChunkEvent::Accepted {
                    remote_id: "j_1".into(),
                    at: 1,
                },
                ChunkEvent::Ready {
                    at: 2,
                    expires_at: 3,
                    start: None,
                },
                ChunkEvent::PageSaved {
                    next: None,
                    rows: 1,
                    error_rows: 0,
                    columns: Default::default(),
                },
                ChunkEvent::Saved { at: 2 },
            ] {
                rec.state = next(&rec.state, event).unwrap();
            }
        };
        {
            let store = Store::open(dir.path()).unwrap();
            for i in 0..10 {
                let mut rec = ChunkRecord::planned(i, 1, format!("n{i}"));
                if i % 3 != 0 {
                    finish(&mut rec);
                }
                store.put_chunk("j", "r", &rec).unwrap();
            }
            store
                .put_chunk("j", "other", &ChunkRecord::planned(0, 1, "x".into()))
                .unwrap();
            let open: Vec<u32> = store
                .unfinished_chunks("j", "r")
                .map(|c| c.unwrap())
                .map(|c| c.index)
                .collect();
            assert_eq!(open, [0, 3, 6, 9]);
            // Chunk 3 finishes: it leaves the index with the same write.
            let mut rec = store.chunk("j", "r", 3).unwrap().unwrap();
            finish(&mut rec);
            store.put_chunk("j", "r", &rec).unwrap();
            assert_eq!(store.unfinished_chunks("j", "r").count(), 3);
            // A store from before the index: the index and its mark gone.
            let stale: Vec<_> = store
                .chunks
                .scan_prefix([OPEN])
                .keys()
                .map(|k| k.unwrap())
                .collect();
            for k in stale {
                store.chunks.remove(k).unwrap();
            }
            store.meta.remove(OPEN_INDEX_MARK).unwrap();
            store.flush_blocking().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let open: Vec<u32> = store
            .unfinished_chunks("j", "r")
            .map(|c| c.unwrap())
            .map(|c| c.index)
            .collect();
        assert_eq!(open, [0, 6, 9], "rebuilt when the old store was opened");
        assert_eq!(
            store.chunks("j", "r").unwrap().len(),
            10,
            "the index is not a chunk"
        );
        store.delete_run("j", "r").unwrap();
        assert_eq!(store.unfinished_chunks("j", "r").count(), 0);
        assert_eq!(store.unfinished_chunks("j", "other").count(), 1);
    }

    #[test]
    fn build_times_keep_the_last_few_per_key_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            assert!(store.build_times("c_a").unwrap().is_empty());
            for ms in 1..=10u64 {
                store.record_build_time("c_a", ms * 1000).unwrap();
            }
            store.record_build_time("c_b", 7).unwrap();
            store.flush_blocking().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let kept: Vec<u64> = (3..=10u64).map(|s| s * 1000).collect();
        assert_eq!(store.build_times("c_a").unwrap(), kept);
        assert_eq!(store.build_times("c_b").unwrap(), [7]);
    }

    fn in_progress_run(run_id: &str) -> RunRecord {
        RunRecord {
            v: VERSION,
            job: "j".into(),
            run_id: run_id.into(),
            spec: spec(),
            spec_sha256: "content".into(),
            started_at: 7,
            finished_at: None,
            state: RunState::Planning,
            inputs: 0,
            chunks: 0,
            cancel_requested: false,
            upload: None,
        }
    }

    /// Plans a run of `chunks` chunks as intake does.
    fn plan(store: &Store, run_id: &str, chunks: u32) -> RunRecord {
        let mut run = in_progress_run(run_id);
        store.put_run(&run).unwrap();
        for i in 0..chunks {
            let rec = ChunkRecord::planned(i, 2, crate::plan::chunk_name("j", run_id, i));
            store
                .put_planned_chunk("j", run_id, &rec, b"{\"url\":\"a\"}\n{\"url\":\"b\"}\n")
                .unwrap();
        }
        store.seal_inputs("j", run_id).unwrap();
        run.state = RunState::InProgress;
        run.chunks = chunks;
        run.inputs = 2 * u64::from(chunks);
        store.put_run(&run).unwrap();
        store.mark_seen("j", "content", run_id).unwrap();
        run
    }

    fn trigger(store: &Store, run_id: &str, index: u32) {
        let mut rec = store.chunk("j", run_id, index).unwrap().unwrap();
        rec.state = ChunkState::Triggering { intent_at: 8 };
        store.put_chunk("j", run_id, &rec).unwrap();
        store.flush_blocking().unwrap();
        rec.state = ChunkState::Triggered {
            remote_id: format!("j_{index}"),
            triggered_at: 9,
        };
        store.put_chunk("j", run_id, &rec).unwrap();
        store.flush_blocking().unwrap();
    }

    fn copy_db(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for entry in fs::read_dir(from).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
            }
        }
    }

    #[test]
    fn a_store_restored_from_an_older_copy_is_refused_and_recover_leaves_nothing_unsettled() {
        let dir = tempfile::tempdir().unwrap();
        let old = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            plan(&store, "r1", 3);
            trigger(&store, "r1", 0);
            store.flush_blocking().unwrap();
        }
        // A copy of sled's files taken now, with only chunk 0 triggered.
        copy_db(&dir.path().join("db"), old.path());
        {
            let store = Store::open(dir.path()).unwrap();
            trigger(&store, "r1", 1);
            trigger(&store, "r1", 2);
        }
        // Polls and downloads only flush sled: the file moved with triggers.
        fs::remove_dir_all(dir.path().join("db")).unwrap();
        copy_db(old.path(), &dir.path().join("db"));
        let err = Store::open(dir.path())
            .err()
            .expect("the older copy is refused");
        assert!(matches!(err, StoreError::Stale { .. }), "{err}");
        assert!(err.to_string().contains("harvestd run --recover"), "{err}");

        let (store, found) = Store::open_for_recovery(dir.path(), 0).unwrap();
        let recovered = store.recover(found, &|_| None, false).unwrap();
        assert_eq!(recovered.chunks_in_doubt, 2, "{recovered:?}");
        let states: Vec<ChunkState> = store
            .chunks("j", "r1")
            .unwrap()
            .into_iter()
            .map(|c| c.state)
            .collect();
        assert_eq!(
            states,
            [
                ChunkState::Triggered {
                    remote_id: "j_0".into(),
                    triggered_at: 9
                },
                ChunkState::Triggering { intent_at: 7 },
                ChunkState::Triggering { intent_at: 7 },
            ],
            "what the copy proves stays; the rest is in doubt"
        );
        drop(store);
        // Recovered, the store opens plainly again.
        Store::open(dir.path()).unwrap();
    }

    #[test]
    fn recover_rebuilds_a_lost_run_from_its_copy_and_keeps_its_content_seen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            plan(&store, "r1", 2);
            trigger(&store, "r1", 0);
            plan(&store, "done", 1);
            let mut done = store.run("j", "done").unwrap().unwrap();
            done.state = RunState::Complete;
            store.put_run(&done).unwrap();
            store.flush_blocking().unwrap();
        }
        // Everything in sled lost: truncated to nothing.
        let data = dir.path().join("db").join("db");
        fs::OpenOptions::new()
            .write(true)
            .open(&data)
            .unwrap()
            .set_len(0)
            .unwrap();
        assert!(Store::open(dir.path()).is_err());
        let (store, found) = Store::open_for_recovery(dir.path(), 0).unwrap();
        // "done" finished: its manifest says so.
        let finished = |run: &RunRecord| (run.run_id == "done").then_some(RunState::Complete);
        let recovered = store.recover(found, &finished, false).unwrap();
        assert_eq!(recovered.runs_rebuilt, 2, "{recovered:?}");
        assert_eq!(recovered.chunks_in_doubt, 2);
        let run = store.run("j", "r1").unwrap().unwrap();
        assert_eq!(
            (run.state, run.chunks, run.inputs),
            (RunState::InProgress, 2, 4)
        );
        assert_eq!(
            store.run("j", "done").unwrap().unwrap().state,
            RunState::Complete
        );
        assert_eq!(store.unfinished_chunks("j", "r1").count(), 2);
        let rec = store.chunk("j", "r1", 1).unwrap().unwrap();
        assert_eq!(rec.name, crate::plan::chunk_name("j", "r1", 1));
        assert_eq!(rec.triggers, 1);
        assert!(store.seen("j", "content").unwrap().is_some());
    }

    #[test]
    fn a_removed_state_directory_is_never_made_again() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("state");
        let store = Store::open(&dir).unwrap();
        plan(&store, "r1", 1);
        fs::remove_dir_all(&dir).unwrap();
        // Each write that makes a directory under the state directory:
        // a run's copy, a chunk's inputs, a run's dedup keys.
        let err = store.dedup_record("j", "r1", &[1]).unwrap_err();
        assert!(matches!(err, StoreError::Replaced { .. }), "{err}");
        assert!(matches!(
            store.put_run(&in_progress_run("r2")),
            Err(StoreError::Replaced { .. })
        ));
        assert!(
            !dir.exists(),
            "the daemon made its removed state directory again"
        );
    }

    #[test]
    fn a_store_sled_cannot_open_is_moved_aside_by_recover() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            plan(&store, "r1", 2);
            trigger(&store, "r1", 0);
        }
        // sled's configuration, which it reads first, overwritten.
        fs::write(dir.path().join("db").join("conf"), [0x5au8; 32]).unwrap();
        let err = Store::open(dir.path()).err().expect("refused");
        assert!(
            err.to_string().contains("damaged") && err.to_string().contains("--recover"),
            "{err}"
        );
        let (store, found) = Store::open_for_recovery(dir.path(), 0).unwrap();
        let aside = found.moved_aside.clone().expect("moved aside");
        assert!(aside.join("db").join("conf").exists());
        let recovered = store.recover(found, &|_| None, false).unwrap();
        assert_eq!(recovered.runs_rebuilt, 1);
        assert_eq!(
            recovered.chunks_in_doubt, 2,
            "a fresh store knows no remote id"
        );
        drop(store);
        Store::open(dir.path()).unwrap();
    }

    #[test]
    fn a_store_from_before_the_counter_is_accepted_but_a_missing_file_is_not() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            plan(&store, "r1", 1);
            store.flush_blocking().unwrap();
        }
        // As an older harvestd left it: no file, no counter in sled.
        fs::remove_file(dir.path().join(GENERATION_FILE)).unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.stored_generation().unwrap(), None);
            trigger(&store, "r1", 0);
        }
        assert!(Store::open(dir.path()).is_ok());
        // Counted since, the file removed: it cannot be checked.
        fs::remove_file(dir.path().join(GENERATION_FILE)).unwrap();
        let err = Store::open(dir.path()).err().expect("refused");
        assert!(
            err.to_string().contains("generation file is missing"),
            "{err}"
        );
    }

    #[test]
    fn a_record_from_a_newer_version_is_refused() {
        let err = decode::<JobRecord>(b"k", br#"{"v":99,"name":"x"}"#).unwrap_err();
        assert!(err.to_string().contains("newer"), "{err}");
    }
}
