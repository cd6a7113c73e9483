//! The figures the admin API answers from (`docs/admin-api.md`): jobs, runs and
//! per-run chunk summaries kept in memory and updated by the store's
//! [`Observer`] hook as records are written, so `GET /v1/jobs` and
//! `GET /metrics` never walk the store per request.
//!
//! Job, run and schedule records are few and small: they are read once at
//! start and then followed write by write. A run's chunks can number
//! 100,000, and start-up must not read the finished ones (resume reads only
//! the open index), so a run that existed before this process started is
//! summarised from its chunk records the first time an answer needs it, on
//! the blocking pool, once; chunk writes that arrive while it loads are
//! queued and applied on top, so the summary is never older than the store.
//! A run created by this process starts with an empty summary and never
//! needs loading. The lock is a plain mutex, held only to copy or update
//! figures, never across an `.await`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::chunk::{ChunkState, UnixMs};
use crate::spec::ProviderKind;
use crate::store::{
    ChunkRecord, JobRecord, Observer, RunRecord, RunState, RunUpload, ScheduleRecord, Store,
};

/// One chunk, as far as the admin API cares.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Slot {
    /// The state's name; empty until the chunk's record is written.
    pub state: &'static str,
    /// Rows saved, for a downloaded chunk.
    pub rows: u64,
}

/// A run's chunks summarised: a slot per chunk (16 bytes each), and the
/// few chunks with an error or a ready dataset.
#[derive(Debug, Default, Clone)]
pub struct ChunkSummary {
    pub slots: Vec<Slot>,
    /// The error each chunk shows (failed or expired, else its last error).
    pub errors: BTreeMap<u32, String>,
    /// Ready, unsaved datasets: chunk index → expiry on the provider's clock.
    pub ready: BTreeMap<u32, UnixMs>,
    /// Credits reported per chunk (Firecrawl's only: empty for Bright Data,
    /// so it costs its runs nothing).
    pub credits: BTreeMap<u32, u64>,
}

impl ChunkSummary {
    fn apply(&mut self, chunk: &ChunkRecord) {
        let i = chunk.index as usize;
        if self.slots.len() <= i {
            self.slots.resize(i + 1, Slot::default());
        }
        let rows = match chunk.state {
            ChunkState::Downloaded { rows, .. } => rows,
            _ => 0,
        };
        self.slots[i] = Slot {
            state: chunk.state.name(),
            rows,
        };
        let error = match &chunk.state {
            ChunkState::Failed { error, .. } | ChunkState::Expired { error, .. } => {
                Some(error.clone())
            }
            _ => chunk.last_error.clone(),
        };
        match error {
            Some(e) => {
                self.errors.insert(chunk.index, e);
            }
            None => {
                self.errors.remove(&chunk.index);
            }
        }
        match chunk.state {
            ChunkState::Ready { expires_at, .. } => {
                self.ready.insert(chunk.index, expires_at);
            }
            _ => {
                self.ready.remove(&chunk.index);
            }
        }
        match chunk.credits_used {
            Some(credits) => self.credits.insert(chunk.index, credits),
            None => self.credits.remove(&chunk.index),
        };
    }

    /// Chunks by state name.
    pub fn counts(&self) -> BTreeMap<&'static str, u32> {
        let mut counts = BTreeMap::new();
        for s in self.slots.iter().filter(|s| !s.state.is_empty()) {
            *counts.entry(s.state).or_default() += 1;
        }
        counts
    }

    pub fn rows(&self) -> u64 {
        self.slots.iter().map(|s| s.rows).sum()
    }

    /// The error of the last chunk (by index) that has one.
    pub fn last_error(&self) -> Option<&String> {
        self.errors.last_key_value().map(|(_, e)| e)
    }
}

/// What an answer shows of a run's chunks, worked out under the lock so
/// an answer never copies a slot per chunk.
#[derive(Debug, Clone, Default)]
pub struct ChunkDigest {
    pub counts: BTreeMap<&'static str, u32>,
    pub rows: u64,
    pub last_error: Option<String>,
    pub ready: BTreeMap<u32, UnixMs>,
    pub credits_used: Option<u64>,
}

impl ChunkSummary {
    pub fn digest(&self) -> ChunkDigest {
        ChunkDigest {
            counts: self.counts(),
            rows: self.rows(),
            last_error: self.last_error().cloned(),
            ready: self.ready.clone(),
            credits_used: self.credits.values().copied().reduce(u64::saturating_add),
        }
    }
}

#[derive(Debug)]
enum Chunks {
    /// Written before this process started; not read yet.
    Unloaded,
    /// Being read from the store; writes meanwhile wait here.
    Loading(Vec<ChunkRecord>),
    Loaded(ChunkSummary),
}

/// A run's record, without its spec.
#[derive(Debug, Clone)]
pub struct RunFigures {
    pub run_id: String,
    pub provider: ProviderKind,
    pub state: RunState,
    pub chunks_total: u32,
    pub inputs: u64,
    pub started_at: UnixMs,
    pub finished_at: Option<UnixMs>,
    /// The upload still to do, for a run whose files go to an object store.
    pub upload: Option<RunUpload>,
}

#[derive(Debug)]
struct RunEntry {
    figures: RunFigures,
    chunks: Chunks,
}

#[derive(Default)]
struct Inner {
    /// Problems of each job's last seen content.
    jobs: BTreeMap<String, Vec<String>>,
    runs: BTreeMap<(String, String), RunEntry>,
    /// Job → (recurrence, next due).
    schedules: BTreeMap<String, (String, UnixMs)>,
    /// Set once the records present at start are read: runs written after
    /// that are new and start with an empty summary.
    started: bool,
}

/// One job as the view has it.
#[derive(Debug, Clone)]
pub struct JobFigures {
    pub name: String,
    pub problems: Vec<String>,
    /// Every run, in key order.
    pub runs: Vec<RunFigures>,
    /// The latest run's chunks (when it has a summary).
    pub latest_chunks: Option<ChunkDigest>,
    pub schedule: Option<(String, UnixMs)>,
}

/// Runs and chunks of unfinished runs, for `/metrics`.
#[derive(Debug, Default)]
pub struct MetricFigures {
    pub runs_by_state: BTreeMap<&'static str, u64>,
    pub chunks_by_state: BTreeMap<&'static str, u64>,
    /// Provider of each unfinished run with the expiry of its ready chunks.
    pub ready: Vec<(ProviderKind, Vec<UnixMs>)>,
    /// Finished runs whose files are not yet all in the object store, and
    /// those of them whose last attempt failed.
    pub uploads_pending: u64,
    pub uploads_failing: u64,
}

/// The admin API's figures. See the module documentation.
#[derive(Default)]
pub struct View {
    inner: Mutex<Inner>,
    loaded: tokio::sync::Notify,
    /// Runs whose chunks were read from the store: each at most once.
    chunk_reads: std::sync::atomic::AtomicU64,
    /// Bumped on every change, so an answer built from the figures can be
    /// reused while nothing changed.
    generation: std::sync::atomic::AtomicU64,
}

fn figures(run: &RunRecord) -> RunFigures {
    RunFigures {
        run_id: run.run_id.clone(),
        provider: run.spec.provider,
        state: run.state,
        chunks_total: run.chunks,
        inputs: run.inputs,
        started_at: run.started_at,
        finished_at: run.finished_at,
        upload: run.upload.clone(),
    }
}

impl View {
    /// A view of `store`: reads its job, run and schedule records (not its
    /// chunks) and follows every later write.
    pub fn attach(store: &Store) -> Result<Arc<View>, crate::store::StoreError> {
        let view = Arc::new(View::default());
        // Observe first, then read: a write in between is seen twice, and
        // applying a record twice gives the same figures.
        store.observe(view.clone());
        let (jobs, runs, schedules) = (store.jobs()?, store.runs()?, store.schedules()?);
        let mut inner = view.lock();
        for j in jobs {
            inner.jobs.insert(j.name, j.problems);
        }
        for r in runs {
            let key = (r.job.clone(), r.run_id.clone());
            let figures = figures(&r);
            inner
                .runs
                .entry(key)
                .and_modify(|e| e.figures = figures.clone())
                .or_insert(RunEntry {
                    figures,
                    chunks: Chunks::Unloaded,
                });
        }
        for s in schedules {
            inner
                .schedules
                .insert(s.job.clone(), (s.recurrence.to_string(), s.next_due));
        }
        inner.started = true;
        drop(inner);
        Ok(view)
    }

    /// Changes so far; equal numbers mean equal figures.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    fn changed(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The figures stay consistent whatever a panicking holder did: each
        // update is a single assignment.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes sure the chunks of the runs `want` picks are summarised,
    /// reading those not yet read from the store on the blocking pool.
    async fn load(
        self: &Arc<Self>,
        store: &Store,
        want: impl Fn(&(String, String), &RunFigures) -> bool,
    ) -> Result<(), String> {
        loop {
            let loaded = self.loaded.notified();
            let (mine, others_loading) = {
                let mut inner = self.lock();
                let mut mine = Vec::new();
                let mut others = false;
                for (key, entry) in inner.runs.iter_mut() {
                    if !want(key, &entry.figures) {
                        continue;
                    }
                    match entry.chunks {
                        Chunks::Unloaded => {
                            entry.chunks = Chunks::Loading(Vec::new());
                            mine.push(key.clone());
                        }
                        Chunks::Loading(_) => others = true,
                        Chunks::Loaded(_) => {}
                    }
                }
                (mine, others)
            };
            if mine.is_empty() && !others_loading {
                return Ok(());
            }
            if mine.is_empty() {
                loaded.await;
                continue;
            }
            // The blocking task finishes what it started even if this
            // request goes away, so no run stays `Loading`.
            let (view, store) = (self.clone(), store.clone());
            let result = tokio::task::spawn_blocking(move || view.read_chunks(&store, mine))
                .await
                .map_err(|e| e.to_string())?;
            result?;
        }
    }

    /// How many runs' chunks were read from the store so far (the tests'
    /// proof that answers do not walk the store).
    #[cfg(test)]
    pub fn chunk_reads(&self) -> u64 {
        self.chunk_reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn read_chunks(&self, store: &Store, keys: Vec<(String, String)>) -> Result<(), String> {
        let mut failed = None;
        for key in keys {
            self.chunk_reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut summary = ChunkSummary::default();
            let read = store
                .chunk_iter(&key.0, &key.1)
                .try_for_each(|c| c.map(|c| summary.apply(&c)));
            let mut inner = self.lock();
            if let Some(entry) = inner.runs.get_mut(&key) {
                entry.chunks = match (read, std::mem::replace(&mut entry.chunks, Chunks::Unloaded))
                {
                    (Ok(()), Chunks::Loading(pending)) => {
                        for c in &pending {
                            summary.apply(c);
                        }
                        Chunks::Loaded(summary)
                    }
                    (Ok(()), other) => other,
                    (Err(e), _) => {
                        failed = Some(e.to_string());
                        Chunks::Unloaded
                    }
                };
            }
        }
        self.changed();
        self.loaded.notify_waiters();
        failed.map_or(Ok(()), Err)
    }

    /// Every job (or one), with the latest run's chunks summarised (the
    /// admin API does the two steps apart, the second off the runtime).
    #[cfg(test)]
    pub async fn jobs(
        self: &Arc<Self>,
        store: &Store,
        only: Option<&str>,
    ) -> Result<Vec<JobFigures>, String> {
        self.load_latest(store, only).await?;
        Ok(self.jobs_now(only))
    }

    /// Makes sure the latest run of every job (or of one) is summarised.
    pub async fn load_latest(
        self: &Arc<Self>,
        store: &Store,
        only: Option<&str>,
    ) -> Result<(), String> {
        let wanted = {
            let inner = self.lock();
            if inner
                .runs
                .values()
                .all(|e| matches!(e.chunks, Chunks::Loaded(_)))
            {
                return Ok(());
            }
            let mut latest: BTreeMap<&str, &str> = BTreeMap::new();
            for (job, run) in inner.runs.keys() {
                if only.is_some_and(|o| o != job) {
                    continue;
                }
                let slot = latest.entry(job).or_insert(run);
                if crate::plan::run_id_order(run, slot).is_gt() {
                    *slot = run;
                }
            }
            latest
                .into_iter()
                .map(|(j, r)| (j.to_string(), r.to_string()))
                .collect::<std::collections::HashSet<_>>()
        };
        self.load(store, |key, _| wanted.contains(key)).await
    }

    /// Every job (or one) as the view has it now; the latest run's chunks
    /// are there if [`load_latest`](Self::load_latest) ran. Takes time in
    /// proportion to the jobs: call it off the runtime for many.
    pub fn jobs_now(&self, only: Option<&str>) -> Vec<JobFigures> {
        let inner = self.lock();
        let mut names: Vec<&String> = inner.jobs.keys().collect();
        for (job, _) in inner.runs.keys() {
            if names.last() != Some(&job) && !inner.jobs.contains_key(job) {
                names.push(job);
            }
        }
        names.sort();
        names.dedup();
        let mut out = Vec::new();
        for name in names.into_iter().filter(|n| only.is_none_or(|o| o == *n)) {
            let runs: Vec<(&(String, String), &RunEntry)> = inner
                .runs
                .range((name.clone(), String::new())..)
                .take_while(|((job, _), _)| job == name)
                .collect();
            let latest = runs
                .iter()
                .max_by(|a, b| crate::plan::run_id_order(&a.0 .1, &b.0 .1));
            out.push(JobFigures {
                name: name.clone(),
                problems: inner.jobs.get(name).cloned().unwrap_or_default(),
                runs: runs.iter().map(|(_, e)| e.figures.clone()).collect(),
                latest_chunks: latest.and_then(|(_, e)| match &e.chunks {
                    Chunks::Loaded(s) => Some(s.digest()),
                    _ => None,
                }),
                schedule: inner.schedules.get(name).cloned(),
            });
        }
        out
    }

    /// Runs by state, and the chunks of unfinished runs.
    pub async fn metrics(self: &Arc<Self>, store: &Store) -> Result<MetricFigures, String> {
        self.load(store, |_, f| !f.state.is_terminal()).await?;
        let inner = self.lock();
        let mut m = MetricFigures::default();
        for entry in inner.runs.values() {
            *m.runs_by_state
                .entry(entry.figures.state.as_str())
                .or_default() += 1;
            if let Some(upload) = &entry.figures.upload {
                m.uploads_pending += 1;
                m.uploads_failing += u64::from(upload.error.is_some());
            }
            if entry.figures.state.is_terminal() {
                continue;
            }
            if let Chunks::Loaded(s) = &entry.chunks {
                for (state, n) in s.counts() {
                    *m.chunks_by_state.entry(state).or_default() += u64::from(n);
                }
                if !s.ready.is_empty() {
                    m.ready
                        .push((entry.figures.provider, s.ready.values().copied().collect()));
                }
            }
        }
        Ok(m)
    }
}

impl Observer for View {
    // Each change is counted after it is made: an answer built meanwhile
    // is marked with the older count, so it is never reused for the newer
    // figures.
    fn run(&self, run: &RunRecord) {
        {
            let mut inner = self.lock();
            let started = inner.started;
            let figures = figures(run);
            inner
                .runs
                .entry((run.job.clone(), run.run_id.clone()))
                .and_modify(|e| e.figures = figures.clone())
                .or_insert(RunEntry {
                    figures,
                    // A run first written after start-up has no chunk yet.
                    chunks: if started {
                        Chunks::Loaded(ChunkSummary::default())
                    } else {
                        Chunks::Unloaded
                    },
                });
        }
        self.changed();
    }

    fn run_deleted(&self, job: &str, run_id: &str) {
        self.lock()
            .runs
            .remove(&(job.to_string(), run_id.to_string()));
        self.changed();
    }

    fn chunk(&self, job: &str, run_id: &str, chunk: &ChunkRecord) {
        {
            let mut inner = self.lock();
            if let Some(entry) = inner.runs.get_mut(&(job.to_string(), run_id.to_string())) {
                match &mut entry.chunks {
                    Chunks::Unloaded => {}
                    Chunks::Loading(pending) => pending.push(chunk.clone()),
                    Chunks::Loaded(summary) => summary.apply(chunk),
                }
            }
        }
        self.changed();
    }

    fn job(&self, job: &JobRecord) {
        self.lock()
            .jobs
            .insert(job.name.clone(), job.problems.clone());
        self.changed();
    }

    fn schedule(&self, record: &ScheduleRecord) {
        self.lock().schedules.insert(
            record.job.clone(),
            (record.recurrence.to_string(), record.next_due),
        );
        self.changed();
    }

    fn schedule_deleted(&self, job: &str) {
        self.lock().schedules.remove(job);
        self.changed();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::spec::{ApiVersion, InputSource, JobSpec, OutputFormat};

    fn run(job: &str, run_id: &str, chunks: u32) -> RunRecord {
        RunRecord {
            v: 1,
            job: job.into(),
            run_id: run_id.into(),
            spec: JobSpec {
                name: job.into(),
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
            },
            spec_sha256: "ab".into(),
            started_at: 1,
            finished_at: None,
            state: RunState::InProgress,
            inputs: u64::from(chunks) * 2,
            chunks,
            cancel_requested: false,
            upload: None,
        }
    }

    fn downloaded(index: u32, rows: u64) -> ChunkRecord {
        let mut c = ChunkRecord::planned(index, 2, format!("n{index}"));
        c.state = ChunkState::Downloaded {
            remote_id: "r".into(),
            triggered_at: 1,
            ready_at: 2,
            expires_at: 3,
            downloaded_at: 4,
            rows,
            error_rows: 0,
            columns: None,
        };
        c
    }

    fn failed(index: u32, error: &str) -> ChunkRecord {
        let mut c = ChunkRecord::planned(index, 2, format!("n{index}"));
        c.state = ChunkState::Failed {
            remote_id: None,
            triggered_at: None,
            error: error.into(),
        };
        c
    }

    /// A run from before start-up is read once, when first asked for; every
    /// later answer, and every run written afterwards, comes from memory,
    /// kept up to date write by write.
    #[tokio::test]
    async fn answers_come_from_memory_after_one_read_per_old_run() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.put_run(&run("old", "20260101T000000Z", 3)).unwrap();
        for i in 0..3 {
            store
                .put_chunk(
                    "old",
                    "20260101T000000Z",
                    &ChunkRecord::planned(i, 2, format!("n{i}")),
                )
                .unwrap();
        }
        store
            .put_chunk("old", "20260101T000000Z", &downloaded(0, 5))
            .unwrap();

        let view = View::attach(&store).unwrap();
        assert_eq!(view.chunk_reads(), 0, "start-up reads no chunk");
        let jobs = view.jobs(&store, None).await.unwrap();
        assert_eq!(view.chunk_reads(), 1);
        let old = jobs[0].latest_chunks.as_ref().unwrap();
        assert_eq!(old.counts.get("downloaded"), Some(&1));
        assert_eq!(old.counts.get("planned"), Some(&2));
        assert_eq!(old.rows, 5);

        // Later writes: an old run's chunk, and a new run with its chunks.
        store
            .put_chunk("old", "20260101T000000Z", &failed(2, "boom"))
            .unwrap();
        store.put_run(&run("new", "20260102T000000Z", 2)).unwrap();
        store
            .put_chunk("new", "20260102T000000Z", &downloaded(0, 7))
            .unwrap();
        store
            .put_chunk("new", "20260102T000000Z", &downloaded(1, 8))
            .unwrap();
        for _ in 0..50 {
            view.jobs(&store, None).await.unwrap();
            view.metrics(&store).await.unwrap();
        }
        let jobs = view.jobs(&store, None).await.unwrap();
        assert_eq!(view.chunk_reads(), 1, "no answer read the store again");
        let old = jobs.iter().find(|j| j.name == "old").unwrap();
        let chunks = old.latest_chunks.as_ref().unwrap();
        assert_eq!(chunks.counts.get("failed"), Some(&1));
        assert_eq!(chunks.last_error.as_deref(), Some("boom"));
        let new = jobs.iter().find(|j| j.name == "new").unwrap();
        assert_eq!(new.latest_chunks.as_ref().unwrap().rows, 15);
        let m = view.metrics(&store).await.unwrap();
        assert_eq!(m.runs_by_state.get("in_progress"), Some(&2));
        assert_eq!(m.chunks_by_state.get("downloaded"), Some(&3));

        // A run finishing and one deleted are followed too.
        let mut done = run("new", "20260102T000000Z", 2);
        done.state = RunState::Complete;
        store.put_run(&done).unwrap();
        store.delete_run("old", "20260101T000000Z").unwrap();
        let m = view.metrics(&store).await.unwrap();
        assert_eq!(m.runs_by_state.get("complete"), Some(&1));
        assert_eq!(m.runs_by_state.get("in_progress"), None);
        assert!(m.chunks_by_state.is_empty(), "{:?}", m.chunks_by_state);
    }

    /// Writes that land while a run's chunks are being read are applied on
    /// top of what was read, so the summary is never older than the store.
    #[test]
    fn writes_during_a_read_are_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.put_run(&run("j", "r1", 2)).unwrap();
        store
            .put_chunk("j", "r1", &ChunkRecord::planned(0, 2, "a".into()))
            .unwrap();
        store
            .put_chunk("j", "r1", &ChunkRecord::planned(1, 2, "b".into()))
            .unwrap();
        let view = View::attach(&store).unwrap();
        let key = ("j".to_string(), "r1".to_string());
        // As `load` does: mark the run as being read. A write then lands
        // after the read has passed its chunk: the observer hears of it, the
        // read does not see it (told to the observer only, as if the store
        // write came after the read's cursor).
        view.lock().runs.get_mut(&key).unwrap().chunks = Chunks::Loading(Vec::new());
        Observer::chunk(&*view, "j", "r1", &downloaded(1, 9));
        view.read_chunks(&store, vec![key.clone()]).unwrap();
        let inner = view.lock();
        let Chunks::Loaded(s) = &inner.runs[&key].chunks else {
            panic!("loaded")
        };
        assert_eq!(s.rows(), 9);
        assert_eq!(s.counts().get("planned"), Some(&1));
    }
}
