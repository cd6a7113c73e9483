//! The end of a run: its final files, the manifest, `_SUCCESS` and
//! `latest`, written in that order, and the run recorded as finished with
//! its notification. Also the two operations that reopen or end a run from
//! outside: retry and cancel.

use std::path::Path;
use std::sync::atomic::Ordering;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{Context, RunOutcome, WorkerError};
use crate::chunk::{self, ChunkEvent, ChunkState, UnixMs};
use crate::clock;
use crate::limits::{backoff, jitter};
use crate::provider::{CallError, Found, TriggerCall};
use crate::sink::manifest::{Manifest, ManifestChunk};
use crate::sink::outputs::Part;
use crate::store::{ChunkRecord, RunRecord, RunState, Store};

/// Writes the final files, the manifest, `_SUCCESS` and `latest`, then
/// records the run as finished. Repeats after I/O errors until it succeeds
/// or the daemon stops: the part files are safe meanwhile.
pub(super) async fn finalize(
    ctx: &Context,
    run: &RunRecord,
    dir: &Path,
    stop: &CancellationToken,
) -> Result<RunOutcome, WorkerError> {
    let chunks = ctx.store.chunks(&run.job, &run.run_id)?;
    let state = run_state(&chunks);
    let finished_at = clock::now_ms();
    let mut attempt = 0;
    let counts = loop {
        let (run_c, dir_c, chunks_c) = (run.clone(), dir.to_path_buf(), chunks.clone());
        let store = ctx.store.clone();
        let written = tokio::task::spawn_blocking(move || {
            write_outputs(&store, &run_c, &dir_c, &chunks_c, state, finished_at)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        match written {
            Ok((bytes, counts)) => {
                ctx.counters
                    .rows_written
                    .fetch_add(counts.rows, Ordering::Relaxed);
                ctx.counters
                    .bytes_written
                    .fetch_add(bytes, Ordering::Relaxed);
                break counts;
            }
            Err(e) => {
                error!(job = %run.job, run = %run.run_id, error = %e, "cannot write the run's final files; will retry");
                let wait = backoff(
                    attempt,
                    ctx.limits().backoff_base,
                    ctx.limits().backoff_cap,
                    jitter(),
                );
                attempt += 1;
                tokio::select! {
                    _ = stop.cancelled() => return Ok(RunOutcome::Stopped),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    };
    let mut done = run.clone();
    done.state = state;
    done.finished_at = Some(finished_at);
    if let Some(target) = &ctx.bucket {
        // The run is told finished once its files are in the object store;
        // until then it is recorded with its upload to do, by the same
        // flush, so a crash goes on uploading and never writes them again.
        // A multipart upload left open by an earlier upload of this run (a
        // retry) stays recorded, so that it is aborted.
        done.upload = Some(crate::store::RunUpload {
            multipart: run.upload.as_ref().and_then(|u| u.multipart.clone()),
            to: run
                .upload
                .as_ref()
                .map(|u| u.to.clone())
                .unwrap_or_default(),
            ..Default::default()
        });
        ctx.store.put_run(&done)?;
        ctx.store.flush().await?;
        return super::upload::upload_run(ctx, target, done, dir, stop).await;
    }
    announce(ctx, &done, counts).await?;
    Ok(RunOutcome::Finished(state))
}

/// Records a run as finished and raises its run-end event, stored with
/// the record by the same flush: a crash cannot keep the one without the
/// other.
pub(super) async fn announce(
    ctx: &Context,
    run: &RunRecord,
    counts: crate::notify::Counts,
) -> Result<(), WorkerError> {
    let state = run.state;
    ctx.notify.raise(&crate::notify::Event {
        event: match state {
            RunState::Complete => "run.complete",
            RunState::Partial => "run.partial",
            RunState::Cancelled => "run.cancelled",
            _ => "run.failed",
        },
        job: Some(run.job.clone()),
        run_id: Some(run.run_id.clone()),
        state: Some(state.as_str().to_string()),
        summary: format!(
            "run {} of '{}' {}: {} row(s) from {} input(s), {} chunk(s) failed",
            run.run_id,
            run.job,
            state.as_str(),
            counts.rows,
            counts.inputs,
            counts.chunks_failed
        ),
        occurrence: run.finished_at.unwrap_or_default().to_string(),
        counts: Some(counts),
    });
    ctx.store.put_run(run)?;
    ctx.store.flush().await?;
    if state != RunState::Complete {
        warn!(job = %run.job, run = %run.run_id, state = state.as_str(), "run finished incomplete");
    } else {
        info!(job = %run.job, run = %run.run_id, state = state.as_str(), "run complete");
    }
    Ok(())
}

/// Makes a finished run's failed and expired chunks planned again and the
/// run in progress; returns how many chunks will be retried.
pub async fn retry_run(store: &Store, run: &mut RunRecord) -> Result<u32, WorkerError> {
    let mut count = 0;
    for mut rec in store.chunks(&run.job, &run.run_id)? {
        if matches!(
            rec.state,
            ChunkState::Failed { .. } | ChunkState::Expired { .. }
        ) {
            rec.state = chunk::next(&rec.state, ChunkEvent::Retry)?;
            rec.last_error = None;
            rec.rejected.clear();
            store.put_chunk(&run.job, &run.run_id, &rec)?;
            count += 1;
        }
    }
    if count > 0 {
        run.state = RunState::InProgress;
        run.finished_at = None;
        // The files are written again when the retried chunks end, and
        // uploaded again, whole, then. A multipart upload still open stays
        // recorded, to be aborted.
        if let Some(upload) = &mut run.upload {
            upload.done.clear();
            upload.error = None;
            upload.failing_since = None;
        }
        store.put_run(run)?;
    }
    store.flush().await?;
    Ok(count)
}

/// Cancels every unfinished chunk of a run: collections at the provider are
/// cancelled (an in-doubt trigger is settled first), the chunks marked
/// cancelled; what was downloaded stays and the run is finished as
/// `cancelled`.
pub async fn cancel_run(
    ctx: &Context,
    run: &RunRecord,
    stop: &CancellationToken,
) -> Result<RunOutcome, WorkerError> {
    let store = &ctx.store;
    let key = &run.spec.key;
    for mut rec in store.chunks(&run.job, &run.run_id)? {
        if let ChunkState::Triggering { intent_at } = rec.state {
            let inputs = store
                .chunk_inputs(&run.job, &run.run_id, rec.index)?
                .unwrap_or_default();
            let call = TriggerCall {
                key,
                name: &rec.name,
                inputs_ndjson: &inputs,
                count: rec.inputs,
                params: &run.spec.params,
                attempt: rec.triggers,
            };
            let event = match ctx.provider.find(&call, intent_at).await {
                Ok(Found::Existing(t)) => ChunkEvent::Accepted {
                    remote_id: t.remote_id,
                    at: clock::now_ms(),
                },
                Ok(Found::Absent) => ChunkEvent::NotCreated,
                Ok(Found::Unreachable(error)) => ChunkEvent::Rejected { error },
                Err(e) => {
                    warn!(job = %run.job, run = %run.run_id, chunk = rec.index, error = %e,
                        "cancel: cannot settle an in-doubt trigger now; will try again");
                    return Ok(RunOutcome::Stopped);
                }
            };
            rec.state = chunk::next(&rec.state, event)?;
        }
        if let ChunkState::Triggered { remote_id, .. } | ChunkState::Ready { remote_id, .. } =
            &rec.state
        {
            match ctx.provider.cancel(key, remote_id).await {
                Ok(()) => {
                    info!(job = %run.job, run = %run.run_id, remote_id = %remote_id, "collection cancelled")
                }
                // Finished already, or gone: nothing runs there any more.
                Err(CallError::Rejected { .. }) => {}
                Err(e) => {
                    warn!(job = %run.job, run = %run.run_id, remote_id = %remote_id, error = %e,
                    "cancel: the provider did not confirm; the collection may still run")
                }
            }
        }
        if !rec.state.is_terminal() {
            rec.state = chunk::next(&rec.state, ChunkEvent::Cancelled)?;
            store.put_chunk(&run.job, &run.run_id, &rec)?;
        }
    }
    store.flush().await?;
    let dir = super::run_dir(&ctx.output_dir, run);
    finalize(ctx, run, &dir, stop).await
}

/// Writes the final files and the manifest, then (a complete run only)
/// records its dedup keys, `_SUCCESS` and `latest`. Returns the bytes
/// written and the counts the run-end notification carries.
fn write_outputs(
    store: &Store,
    run: &RunRecord,
    dir: &Path,
    chunks: &[ChunkRecord],
    state: RunState,
    finished_at: UnixMs,
) -> std::io::Result<(u64, crate::notify::Counts)> {
    crate::sink::create_dir_durable(dir)?;
    let parts: Vec<Part<'_>> = chunks
        .iter()
        .filter_map(|c| match &c.state {
            ChunkState::Downloaded { columns, .. } => Some(Part {
                index: c.index,
                columns: columns.as_deref(),
            }),
            _ => None,
        })
        .collect();
    // A previous attempt's _SUCCESS must not outlive a rewrite.
    let success = dir.join("_SUCCESS");
    // Incremental output: this run's keys against earlier complete runs'.
    let dedup = match &run.spec.dedup_key {
        Some(key) => Some(Dedup::new(store, run, dir, key, &parts)?),
        None => None,
    };
    let new_rows = dedup.as_ref().map(|d| crate::sink::dedup::NewRows {
        key: d.key,
        unseen: &d.unseen,
    });
    let written = crate::sink::outputs::write(
        dir,
        &run.spec.formats,
        run.spec.escape_formulas,
        &parts,
        new_rows.as_ref(),
    )?;
    let (outputs, malformed_rows) = (written.files, written.malformed_rows);
    let rows = outputs
        .first()
        .map_or(0, |o| if o.file == "errors.ndjson" { 0 } else { o.rows });
    // errors.ndjson holds both; the manifest counts them apart.
    let error_rows = outputs
        .iter()
        .find(|o| o.file == "errors.ndjson")
        .map_or(0, |o| o.rows)
        .saturating_sub(malformed_rows);
    let manifest = Manifest {
        job: run.job.clone(),
        run_id: run.run_id.clone(),
        provider: run.spec.provider.as_str().to_string(),
        spec_sha256: run.spec_sha256.clone(),
        started_at: clock::timestamp(run.started_at),
        finished_at: clock::timestamp(finished_at),
        state: state.as_str().to_string(),
        inputs: run.inputs,
        rows,
        error_rows,
        malformed_rows,
        credits_used: credits_used(chunks),
        chunks: chunks.iter().map(manifest_chunk).collect(),
        outputs,
    };
    let bytes = manifest.outputs.iter().map(|o| o.bytes).sum();
    let counts = crate::notify::Counts {
        inputs: run.inputs,
        rows,
        error_rows,
        malformed_rows,
        chunks_failed: (chunks.len() - parts.len()) as u64,
        credits_used: manifest.credits_used,
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(std::io::Error::other)?;
    crate::sink::write_file(&dir.join("manifest.json"), &json)?;
    crate::failpoint::crash("after-manifest");
    if state == RunState::Complete {
        if let Some(d) = &dedup {
            store
                .dedup_record(&run.job, &run.run_id, &d.hashes)
                .map_err(std::io::Error::other)?;
        }
        crate::sink::write_file(&success, b"")?;
        crate::failpoint::crash("after-success");
        point_latest(dir, &run.run_id)?;
    }
    Ok((bytes, counts))
}

/// The credits reported for a run's chunks, summed; `None` when no chunk
/// has any (a provider that reports none, or no collection got ready).
pub(crate) fn credits_used(chunks: &[ChunkRecord]) -> Option<u64> {
    chunks
        .iter()
        .filter_map(|c| c.credits_used)
        .reduce(u64::saturating_add)
}

fn manifest_chunk(c: &ChunkRecord) -> ManifestChunk {
    let ts = |ms: &UnixMs| Some(clock::timestamp(*ms));
    let mut m = ManifestChunk {
        index: c.index,
        inputs: c.inputs,
        remote_id: c.state.remote_id().map(str::to_string),
        state: c.state.name().to_string(),
        rows: 0,
        triggered_at: None,
        ready_at: None,
        downloaded_at: None,
        expires_at: None,
        credits_used: c.credits_used,
        error: None,
    };
    match &c.state {
        ChunkState::Downloaded {
            triggered_at,
            ready_at,
            expires_at,
            downloaded_at,
            rows,
            ..
        } => {
            m.rows = *rows;
            m.triggered_at = ts(triggered_at);
            m.ready_at = ts(ready_at);
            m.expires_at = ts(expires_at);
            m.downloaded_at = ts(downloaded_at);
        }
        ChunkState::Failed {
            triggered_at,
            error,
            ..
        } => {
            m.triggered_at = triggered_at.as_ref().and_then(ts);
            m.error = Some(error.clone());
        }
        ChunkState::Expired {
            triggered_at,
            expires_at,
            error,
            ..
        } => {
            m.triggered_at = ts(triggered_at);
            m.expires_at = expires_at.as_ref().and_then(ts);
            m.error = Some(error.clone());
        }
        _ => m.error = c.last_error.clone(),
    }
    m
}

/// A finished run's state, from its chunks'.
fn run_state(chunks: &[ChunkRecord]) -> RunState {
    let downloaded = chunks
        .iter()
        .filter(|c| matches!(c.state, ChunkState::Downloaded { .. }))
        .count();
    if downloaded == chunks.len() {
        RunState::Complete
    } else if chunks
        .iter()
        .any(|c| matches!(c.state, ChunkState::Cancelled { .. }))
    {
        RunState::Cancelled
    } else if downloaded == 0 {
        RunState::Failed
    } else {
        RunState::Partial
    }
}

/// A run's dedup keys (`dedup_key`): every row's, and those no earlier
/// complete run of the job has seen.
struct Dedup<'a> {
    key: &'a str,
    hashes: Vec<u128>,
    unseen: Vec<u128>,
}

impl<'a> Dedup<'a> {
    fn new(
        store: &Store,
        run: &RunRecord,
        dir: &Path,
        key: &'a str,
        parts: &[Part<'_>],
    ) -> std::io::Result<Dedup<'a>> {
        let indices: Vec<u32> = parts.iter().map(|p| p.index).collect();
        let hashes = crate::sink::dedup::run_hashes(dir, &indices, key)?;
        let seen = store
            .dedup_seen(&run.job, &run.run_id, &hashes)
            .map_err(std::io::Error::other)?;
        let unseen = hashes
            .iter()
            .zip(&seen)
            .filter(|(_, s)| !**s)
            .map(|(h, _)| *h)
            .collect();
        Ok(Dedup {
            key,
            hashes,
            unseen,
        })
    }
}

/// Points the job's `latest` at this run, the newest complete one: an
/// older run finishing after a newer one leaves it where it is.
fn point_latest(dir: &Path, run_id: &str) -> std::io::Result<()> {
    let Some(job_dir) = dir.parent() else {
        return Ok(());
    };
    let latest = job_dir.join("latest");
    let current = std::fs::read_link(&latest).ok();
    let newer = current
        .as_deref()
        .and_then(|p| p.to_str())
        .is_none_or(|cur| crate::plan::run_id_order(run_id, cur).is_gt());
    if newer {
        crate::sink::replace_symlink(Path::new(run_id), &latest)?;
    }
    Ok(())
}
