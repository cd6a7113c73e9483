//! Job directory intake: which files are jobs, whether their content is new,
//! and planning a run for new valid content (SPEC §4, §5.1). Blocking IO; the
//! daemon runs it on the blocking pool.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tracing::{error, info};

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

/// Job files directly in `dir`, sorted by name.
pub fn job_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(is_candidate))
        .map(|e| e.path())
        .collect();
    files.sort();
    Ok(files)
}

/// sha256 of the job file, then of its inputs file if it names a readable one.
pub fn content_hash(job_bytes: &[u8], spec: Option<&JobSpec>) -> String {
    let mut h = Sha256::new();
    h.update(Sha256::digest(job_bytes));
    if let Some(InputSource::File(inputs)) = spec.map(|s| &s.inputs) {
        let mut inner = Sha256::new();
        // Only a regular file is read: opening a FIFO would block the scan
        // (and with it the daemon) until something writes to it.
        let regular = fs::metadata(inputs).is_ok_and(|m| m.is_file());
        if let Some(mut f) = regular.then(|| fs::File::open(inputs).ok()).flatten() {
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n) = f.read(&mut buf) {
                if n == 0 {
                    break;
                }
                inner.update(&buf[..n]);
            }
        }
        h.update(inner.finalize());
    }
    hex::encode(h.finalize())
}

/// What a scan found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Runs planned for new content, ready to drive.
    pub new_runs: Vec<RunRecord>,
    /// Jobs whose current content is invalid, with their problems.
    pub invalid: Vec<(String, Vec<String>)>,
    /// Valid jobs present with a schedule: (job, recurrence, jitter).
    pub scheduled: Vec<(String, Schedule, std::time::Duration)>,
    /// Whether the directory could be listed (so absent jobs are really gone).
    pub listed: bool,
}

/// Looks at every job file once; plans runs for content not seen before.
pub fn scan(dir: &Path, store: &Store, now: UnixMs) -> Result<Scan, StoreError> {
    let mut out = Scan::default();
    let files = match job_files(dir) {
        Ok(f) => f,
        Err(e) => {
            error!(dir = %dir.display(), error = %e, "cannot read the jobs directory");
            return Ok(out);
        }
    };
    out.listed = true;
    for path in files {
        let Some(name) = path
            .file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        let bytes = spec::document::read_job_file(&path);
        let parsed = bytes.as_ref().ok().map(|b| spec::parse(&path, b));
        let spec_ok = parsed.as_ref().and_then(|p| p.as_ref().ok());
        let hash = match &bytes {
            Ok(b) => content_hash(b, spec_ok),
            Err(message) => hex::encode(Sha256::digest(message.as_bytes())),
        };
        let previous = store.job(&name)?;
        let scheduled =
            spec_ok.and_then(|s| s.schedule.clone().map(|r| (name.clone(), r, s.jitter)));
        if let Some(prev) = &previous {
            if prev.content_sha256 == hash {
                if prev.problems.is_empty() {
                    out.scheduled.extend(scheduled);
                } else {
                    out.invalid.push((name, prev.problems.clone()));
                }
                continue;
            }
        }
        let mut record = JobRecord::new(name.clone(), hash.clone(), Vec::new(), now);
        record.last_run = previous.and_then(|p| p.last_run);
        if let Some(run_id) = store.seen(&name, &hash)? {
            // The same content again (restart, re-drop, touch): nothing starts.
            info!(job = %name, run = %run_id, "job content already ran; nothing to do");
            store.put_job(&record)?;
            out.scheduled.extend(scheduled);
            continue;
        }
        let loaded = match bytes {
            Err(message) => Err(vec![format!("{}: {message}", path.display())]),
            Ok(_) => spec::load(&path).map_err(|ps| ps.iter().map(ToString::to_string).collect()),
        };
        match loaded {
            Err(problems) => {
                for p in &problems {
                    error!(job = %name, problem = %p, "invalid job file; fix it and the job is looked at again");
                }
                record.problems = problems.clone();
                store.put_job(&record)?;
                out.invalid.push((name, problems));
            }
            Ok((spec, count)) => match plan(store, &spec, &hash, now) {
                Ok(run) => {
                    out.scheduled.extend(scheduled);
                    info!(job = %name, run = %run.run_id, inputs = count, chunks = run.chunks, "run planned");
                    record.last_run = Some(run.run_id.clone());
                    store.put_job(&record)?;
                    out.new_runs.push(run);
                }
                Err(PlanError::Store(e)) => return Err(e),
                Err(PlanError::Inputs(message)) => {
                    // The inputs changed under us between check and plan.
                    error!(job = %name, problem = %message, "cannot plan the job");
                    record.problems = vec![message.clone()];
                    store.put_job(&record)?;
                    out.invalid.push((name, vec![message]));
                }
            },
        }
    }
    store.flush_blocking()?;
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
    let loaded = spec::load(&path);
    let (spec, _) = match loaded {
        Ok(l) => l,
        Err(problems) => {
            for p in &problems {
                error!(job, problem = %p, "scheduled run not started: the job file is invalid");
            }
            return Ok(None);
        }
    };
    let bytes = spec::document::read_job_file(&path).unwrap_or_default();
    let hash = content_hash(&bytes, Some(&spec));
    match plan(store, &spec, &hash, now) {
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
}

/// Stores a new run: `planning`, its chunks with their inputs, then
/// `in_progress` together with the content marked seen. A crash before the
/// end leaves a `planning` run, which is discarded and planned again.
pub fn plan(
    store: &Store,
    spec: &JobSpec,
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
    };
    store.put_run(&run)?;
    let mut chunker = Chunker::new(spec.chunk_size);
    let mut index = 0u32;
    let mut total = 0u64;
    let mut store_error = None;
    let mut put = |packed: Packed, index: &mut u32| {
        let rec = ChunkRecord::planned(
            *index,
            packed.count,
            chunk_name(&spec.name, &run.run_id, *index),
        );
        if let Err(e) = store.put_planned_chunk(&spec.name, &run.run_id, &rec, &packed.ndjson) {
            store_error.get_or_insert(e);
        }
        total += packed.count;
        *index += 1;
    };
    match &spec.inputs {
        InputSource::Inline(rows) => {
            for row in rows {
                if let Some(p) = chunker.push(row) {
                    put(p, &mut index);
                }
            }
        }
        InputSource::File(file) => {
            spec::inputs::for_each(file, |_, row| {
                if let Some(p) = chunker.push(row) {
                    put(p, &mut index);
                }
                Ok(())
            })
            .map_err(|e| PlanError::Inputs(format!("{}: {e}", file.display())))?;
        }
    }
    if let Some(p) = chunker.finish() {
        put(p, &mut index);
    }
    if let Some(e) = store_error {
        return Err(e.into());
    }
    if total == 0 {
        store.delete_run(&spec.name, &run.run_id)?;
        return Err(PlanError::Inputs("no inputs".into()));
    }
    store.seal_inputs(&spec.name, &run.run_id)?;
    run.inputs = total;
    run.chunks = index;
    run.state = RunState::InProgress;
    store.put_run(&run)?;
    store.mark_seen(&spec.name, content_sha256, &run.run_id)?;
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

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
