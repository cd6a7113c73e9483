//! `harvestd run --recover`: start again from what is left of a damaged or
//! stale store, treating every chunk that cannot be proven unpaid as in
//! doubt (`triggering`), so the worker settles it at the provider before
//! any trigger.
//!
//! What is left is sled's records that still decode, and beside sled each
//! run's inputs directory: its chunk input files and `run.json`, a copy of
//! the run's record (job spec, content hash, start time) written when the
//! run was planned and when it went in progress. From these:
//!
//! - a record that does not decode is removed (its key is logged);
//! - a run whose record is gone is rebuilt from `run.json`: finished (its
//!   state from the manifest in the output directory, when there is one) or
//!   in progress; a run whose `run.json` still says `planning` had sent
//!   nothing and is left to be discarded and planned again;
//! - every chunk of an unfinished run whose record is gone, or is
//!   `planned` (a stale store may have lost its trigger), becomes
//!   `triggering`, with the run's start as the intent time; chunks that
//!   have a remote id or are finished keep their record;
//! - the content each run was planned for is marked seen again, so the
//!   same job file does not plan (and pay for) the same inputs again.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{error, info, warn};

use super::guard::{self, FileGeneration};
use super::{
    damaged, decode, encode, is_lock_error, ChunkRecord, JobRecord, RunRecord, RunState,
    ScheduleRecord, Store, StoreError, OPEN, RUN_COPY,
};
use crate::chunk::{ChunkState, UnixMs};

/// What `--recover` did, for its log line and the tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Where sled's files were moved when sled could not open them.
    pub moved_aside: Option<PathBuf>,
    /// Records that did not decode and were removed.
    pub corrupt_records: usize,
    /// Runs whose record was rebuilt from `run.json`.
    pub runs_rebuilt: usize,
    /// Chunks made `triggering`, to be settled at the provider.
    pub chunks_in_doubt: usize,
    /// What could not be recovered, one sentence each.
    pub lost: Vec<String>,
}

impl Store {
    /// Opens the store whatever its state: when sled cannot open its files
    /// they are moved into `state_dir/damaged-<timestamp>/` and a fresh
    /// store is made. The generation check is skipped (a stale store is
    /// what is being recovered). Call [`Store::recover`] next.
    pub fn open_for_recovery(dir: &Path, now: UnixMs) -> Result<(Store, Recovered), StoreError> {
        let mut recovered = Recovered::default();
        let file = match guard::read_generation(dir) {
            Ok(FileGeneration::Value(f)) => f,
            Ok(FileGeneration::Missing) => 0,
            Err(e) => {
                warn!(error = %e, "recover: the generation file is unreadable; it is written again");
                0
            }
        };
        let mut store = match Store::open_parts(dir) {
            Ok(store) => store,
            Err(StoreError::Sled(e)) if is_lock_error(&e) => return Err(StoreError::Sled(e)),
            Err(e) => {
                let e = damaged(dir, e);
                let aside = dir.join(format!("damaged-{}", crate::plan::run_id(now, |_| false)));
                error!(error = %e, moved_to = %aside.display(),
                    "recover: sled cannot open the store; its files are moved aside and a new store is made from the inputs kept beside it");
                fs::create_dir_all(&aside).map_err(super::io_error(&aside))?;
                for name in ["db", guard::GENERATION_FILE] {
                    let from = dir.join(name);
                    if from.exists() {
                        fs::rename(&from, aside.join(name)).map_err(super::io_error(&from))?;
                    }
                }
                recovered.moved_aside = Some(aside);
                Store::open_parts(dir)?
            }
        };
        // A generation sled holds that does not decode counts as none.
        // Counting goes on past both, sled first, then the file.
        let stored = store.stored_generation().ok().flatten().unwrap_or(0);
        let next = stored.max(file).saturating_add(1);
        store
            .meta
            .insert(super::GENERATION_KEY, &next.to_be_bytes())?;
        store.db.flush()?;
        guard::write_generation(dir, next)?;
        store.generation = Arc::new(guard::Generation::new(dir, next, next));
        Ok((store, recovered))
    }

    /// Rebuilds what it can (see the module docs) and flushes it.
    /// `finished`: a run's final state as its output directory records it
    /// (the manifest), if it finished. `uploads`: output goes to an object
    /// store, so a run found finished that way still has its upload to do
    /// (sending it again is harmless; forgetting it is not).
    pub fn recover(
        &self,
        mut recovered: Recovered,
        finished: &dyn Fn(&RunRecord) -> Option<RunState>,
        uploads: bool,
    ) -> Result<Recovered, StoreError> {
        recovered.corrupt_records += self.drop_corrupt()?;
        // The open index can only be trusted once its records decode.
        self.meta.remove(super::OPEN_INDEX_MARK)?;
        self.index_open_chunks()?;
        for (job, run_id) in self.run_dirs()? {
            self.recover_run(&job, &run_id, finished, uploads, &mut recovered)?;
        }
        // Runs whose inputs are gone cannot be resumed, but their content
        // still ran: it stays seen.
        for run in self.runs()? {
            if run.state != RunState::Planning {
                self.mark_seen(&run.job, &run.spec_sha256, &run.run_id)?;
            }
        }
        self.flush_blocking()?;
        Ok(recovered)
    }

    /// Removes every record that does not decode; returns how many.
    fn drop_corrupt(&self) -> Result<usize, StoreError> {
        let mut bad = Vec::new();
        for (tree, name) in [
            (&self.runs, "runs"),
            (&self.chunks, "chunks"),
            (&self.jobs, "jobs"),
            (&self.schedules, "schedules"),
        ] {
            for kv in tree.iter() {
                let (k, v) = kv?;
                let ok = match name {
                    "runs" => decode::<RunRecord>(&k, &v).is_ok(),
                    "chunks" if k.first() == Some(&OPEN) => true,
                    "chunks" => decode::<ChunkRecord>(&k, &v).is_ok(),
                    "jobs" => decode::<JobRecord>(&k, &v).is_ok(),
                    _ => decode::<ScheduleRecord>(&k, &v).is_ok(),
                };
                if !ok {
                    error!(tree = name, key = %String::from_utf8_lossy(&k).replace('\0', "/"),
                        "recover: a record that does not decode is removed");
                    bad.push((tree.clone(), k));
                }
            }
        }
        for (tree, key) in &bad {
            tree.remove(key)?;
        }
        Ok(bad.len())
    }

    /// Every `inputs/<job>/<run_id>` directory.
    fn run_dirs(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut out = Vec::new();
        let Ok(jobs) = fs::read_dir(&self.inputs_dir) else {
            return Ok(out);
        };
        for job in jobs.flatten() {
            let Ok(runs) = fs::read_dir(job.path()) else {
                continue;
            };
            let Some(job_name) = job.file_name().to_str().map(str::to_string) else {
                continue;
            };
            for run in runs.flatten() {
                if let Some(run_id) = run.file_name().to_str() {
                    if run.path().is_dir() {
                        out.push((job_name.clone(), run_id.to_string()));
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn recover_run(
        &self,
        job: &str,
        run_id: &str,
        finished: &dyn Fn(&RunRecord) -> Option<RunState>,
        uploads: bool,
        recovered: &mut Recovered,
    ) -> Result<(), StoreError> {
        let dir = self.run_inputs_dir(job, run_id);
        let copy: Option<RunRecord> = fs::read(dir.join(RUN_COPY))
            .ok()
            .and_then(|b| decode(dir.join(RUN_COPY).to_string_lossy().as_bytes(), &b).ok());
        let stored = self.run(job, run_id)?;
        let mut run = match (stored, copy) {
            (Some(run), _) if run.state.is_terminal() => return Ok(()),
            // Planning had finished (the copy says so) though sled lost it.
            (Some(run), Some(copy))
                if run.state == RunState::Planning && copy.state == RunState::InProgress =>
            {
                copy
            }
            (Some(run), _) => run,
            (None, Some(copy)) => {
                recovered.runs_rebuilt += 1;
                copy
            }
            (None, None) => {
                let lost = format!(
                    "{job}/{run_id}: its record is gone and no {RUN_COPY} was kept (a run planned by an older harvestd); its inputs stay in {}",
                    dir.display()
                );
                error!("recover: {lost}");
                recovered.lost.push(lost);
                return Ok(());
            }
        };
        if run.state.is_terminal() {
            // The copy kept the run's end (and any upload still to do).
            self.put_run(&run)?;
            return Ok(());
        }
        if run.state == RunState::Planning {
            // Nothing is triggered before a run is in progress: it is
            // discarded and planned again, as after any crash.
            self.put_run(&run)?;
            return Ok(());
        }
        if let Some(state) = finished(&run) {
            if state.is_terminal() {
                info!(
                    job,
                    run = run_id,
                    state = state.as_str(),
                    "recover: the run had finished (its manifest says so)"
                );
                run.state = state;
                if uploads {
                    run.upload = Some(crate::store::RunUpload::default());
                }
                self.put_run(&run)?;
                return Ok(());
            }
        }
        let (mut chunks, mut inputs) = (0u32, 0u64);
        let mut files: Vec<(u32, PathBuf)> = fs::read_dir(&dir)
            .map_err(super::io_error(&dir))?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name();
                let index = name
                    .to_str()?
                    .strip_prefix("chunk-")?
                    .strip_suffix(".ndjson")?
                    .parse()
                    .ok()?;
                Some((index, e.path()))
            })
            .collect();
        files.sort();
        for (index, path) in files {
            let count = fs::read(&path)
                .map_err(super::io_error(&path))?
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .count() as u64;
            chunks = chunks.max(index.saturating_add(1));
            inputs += count;
            let rec = match self.chunk(job, run_id, index)? {
                Some(rec) if !matches!(rec.state, ChunkState::Planned) => continue,
                Some(rec) => rec,
                None => {
                    ChunkRecord::planned(index, count, crate::plan::chunk_name(job, run_id, index))
                }
            };
            let mut rec = rec;
            rec.state = ChunkState::Triggering {
                intent_at: run.started_at,
            };
            // The trigger this chunk most likely had was its first (the
            // Firecrawl v1 idempotency key counts attempts).
            rec.triggers = rec.triggers.max(1);
            rec.last_error = Some(
                "recovered from a damaged or stale store: whether it was triggered is not known"
                    .into(),
            );
            rec.in_doubt += 1;
            // Written as `put_chunk` would, without marking the store dirty
            // once per chunk: recovery ends with one flush that counts.
            self.chunks
                .insert(super::chunk_key(job, run_id, index), encode(&rec))?;
            self.chunks
                .insert(super::open_key(job, run_id, index), &[])?;
            recovered.chunks_in_doubt += 1;
        }
        // A copy made at planning has no counts yet; the files have them.
        run.chunks = run.chunks.max(chunks);
        if run.inputs == 0 {
            run.inputs = inputs;
        }
        run.state = RunState::InProgress;
        self.put_run(&run)?;
        self.mark_seen(job, &run.spec_sha256, run_id)?;
        Ok(())
    }
}
