//! Drives runs and their chunks: trigger → poll → download, persisting each
//! step before acting on it (`docs/outputs.md`, `docs/durability.md`), within
//! its limits. When every chunk of a run is terminal, writes the final files
//! and the manifest.
//!
//! Shutdown is an argument: every wait selects on the stop token, but a
//! trigger call already sent is let finish so the shutdown itself leaves no
//! chunk in doubt.
//!
//! - [`drive_run`] (here) schedules one run's chunks: which get a task, when.
//! - `queue`: what a run keeps of chunks without a task (waiting polls, the
//!   chunk waiting for its trigger slot).
//! - `driver`: one chunk's task, a loop over its persisted state; its steps
//!   are in `trigger` (trigger, in-doubt settling), `poll` (acting on a
//!   status answer) and `download` (pages, the part file, disk space, expiry).
//! - `finish`: the final files, the manifest, `latest`; retry and cancel.
//! - `upload`: a finished run's files to the object store, in order,
//!   resumed after a restart.
//! - [`context`]: what all runs of one provider key share.

mod context;
mod download;
mod driver;
mod finish;
mod poll;
mod queue;
mod trigger;
mod upload;

use std::collections::{BinaryHeap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::chunk::{ChunkState, TransitionError};
use crate::limits::KeyLimits;
use crate::store::{RunRecord, RunState, StoreError};

pub use context::{Context, Counters, CurrentLimits, ExpiryLevel};
pub use finish::{cancel_run, retry_run};

use driver::{ChunkEnd, Shared};
use queue::{Polled, Start, Starting, Waiting};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid chunk transition: {0}")]
    Transition(#[from] TransitionError),
    #[error("chunk inputs missing from the store for {0}")]
    MissingInputs(String),
    #[error("chunk record missing from the store: {0}")]
    MissingChunk(String),
}

/// How a run's work ended for now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// Every chunk is terminal and the outputs are written.
    Finished(RunState),
    /// Waiting on a blocked provider (only with `park_on_block`).
    Parked(String),
    /// Finished, its upload failing (only with `park_on_block`, that is
    /// `run --once`): the next start goes on uploading.
    UploadFailing(String),
    /// Stopped by shutdown; the store says where to resume.
    Stopped,
}

/// Where a run's final files go.
pub fn run_dir(output_dir: &Path, run: &RunRecord) -> PathBuf {
    output_dir.join(&run.job).join(&run.run_id)
}

/// Drives one run until it is finished, parked or stopped (`stop`: this
/// run's token, a child of the daemon's). A run whose cancel was asked is
/// cancelled instead.
///
/// Chunks already in flight start at once, whatever the cap. A planned one
/// gets a task only once it holds a place under the cap and its trigger
/// slot has come (`starting`: one chunk at a time waits for its slot), so a
/// run of a million inputs, or of 10,000 places at 30 triggers a minute,
/// keeps a few tasks alive, not one per chunk. Building collections wait in
/// `waiting` and get a task only for each poll. A trigger or a poll starts
/// only while one of `calls`' few slots is free: a backlog behind the
/// request rate stays in the queues, instead of thousands of tasks queued
/// for the rate (whose memory the allocator then keeps: 10,000 triggers at
/// 200 requests a second left 5.5 KB per collection).
pub async fn drive_run(
    ctx: Arc<Context>,
    key: Arc<KeyLimits>,
    run: RunRecord,
    stop: CancellationToken,
) -> Result<RunOutcome, WorkerError> {
    let dir = run_dir(&ctx.output_dir, &run);
    if run.upload.is_some() && run.state.is_terminal() {
        // Finished before a restart, its files still to upload.
        let Some(target) = ctx.bucket.clone() else {
            error!(job = %run.job, run = %run.run_id, staged = %dir.display(),
                "the run waits to be uploaded, but output_dir no longer names an object store; its files stay in staging");
            return Ok(RunOutcome::Finished(run.state));
        };
        return upload::upload_run(&ctx, &target, run, &dir, &stop).await;
    }
    if run.cancel_requested {
        return cancel_run(&ctx, &run, &stop).await;
    }
    sweep_leftovers(&dir).await;
    let shared = Shared {
        ctx: ctx.clone(),
        stop: stop.clone(),
        key: key.clone(),
        run: Arc::new(run),
        dir: dir.clone(),
    };
    let mut tasks = JoinSet::new();
    let mut planned = VecDeque::new();
    let mut starting: Option<Starting> = None;
    let mut waiting = BinaryHeap::new();
    // A quarter second of requests, enough to keep the rate busy.
    let calls = Arc::new(tokio::sync::Semaphore::new(
        (ctx.limits().requests_per_second as usize / 4).clamp(4, 256),
    ));
    // A poll may be up to `BURST_WINDOW` (50 ms) late, or 1 % of
    // `poll_min_interval` if less, so that polls coming due close together
    // start in one wake-up and go out in one burst of the request rate:
    // 10,000 collections are then ~20 wake-ups a second, not ~170.
    let coalesce = (ctx.limits().poll_min_interval / 100).min(crate::limits::BURST_WINDOW);
    for rec in ctx
        .store
        .unfinished_chunks(&shared.run.job, &shared.run.run_id)
    {
        let rec = rec?;
        match rec.state {
            ChunkState::Planned => planned.push_back(rec.index),
            ChunkState::Triggered {
                triggered_at,
                remote_id,
            } => waiting.push(Waiting::next_poll(
                &ctx,
                &key,
                rec.index,
                Some(key.in_flight.enter()),
                0,
                Polled {
                    remote_id: remote_id.into(),
                    triggered_at,
                },
            )),
            _ => {
                let start = Start::resumed(rec.index, key.in_flight.enter());
                tasks.spawn(driver::task(shared.clone(), start));
            }
        }
    }
    let mut parked = None;
    let mut stopped = false;
    let mut failure = None;
    loop {
        let going = parked.is_none() && failure.is_none() && !stop.is_cancelled();
        if !going {
            // Stopping: the chunk waiting for its trigger slot stays planned
            // (it is, in the store) and gives its place back.
            if let Some(s) = starting.take() {
                planned.push_front(s.index);
            }
        }
        let free_call = calls.available_permits() > 0;
        let may_start = going && !planned.is_empty() && starting.is_none() && free_call;
        let may_poll = going && !waiting.is_empty() && free_call;
        let next_due = waiting
            .peek()
            .map_or_else(tokio::time::Instant::now, |w: &Waiting| w.due);
        let slot_at = starting.as_ref().map(|s| s.at);
        tokio::select! {
            permit = key.in_flight.acquire(), if may_start => {
                if let (Ok(call), Some(index)) = (calls.clone().try_acquire_owned(), planned.pop_front()) {
                    let at = key.reserve_trigger_slot();
                    starting = Some(Starting { index, permit, at, call });
                }
            }
            _ = tokio::time::sleep_until(slot_at.unwrap_or_else(tokio::time::Instant::now)), if going && slot_at.is_some() => {
                if let Some(s) = starting.take() {
                    tasks.spawn(driver::task(shared.clone(), Start::trigger(s)));
                }
            }
            _ = tokio::time::sleep_until(next_due + coalesce), if may_poll => {
                let now = tokio::time::Instant::now();
                while waiting.peek().is_some_and(|w| w.due <= now) {
                    let Ok(call) = calls.clone().try_acquire_owned() else {
                        break;
                    };
                    if let Some(w) = waiting.pop() {
                        tasks.spawn(driver::task(shared.clone(), Start::poll(w, call)));
                    }
                }
            }
            Some(joined) = tasks.join_next() => match joined {
                Ok(Ok(ChunkEnd::Terminal)) => {}
                Ok(Ok(ChunkEnd::Waiting(w))) => waiting.push(w),
                Ok(Ok(ChunkEnd::Parked(why))) => parked = Some(why),
                Ok(Ok(ChunkEnd::Stopped)) => stopped = true,
                Ok(Err(e)) => {
                    // The store failed: stop this run's other chunks too.
                    stop.cancel();
                    failure.get_or_insert(e);
                }
                Err(join) => {
                    error!(job = %shared.run.job, run = %shared.run.run_id, error = %join, "chunk task panicked");
                    stopped = true;
                }
            },
            _ = stop.cancelled(), if may_start || may_poll || (going && starting.is_some()) => {}
            else => break,
        }
    }
    let unstarted = !planned.is_empty() || !waiting.is_empty();
    if unstarted && parked.is_none() && failure.is_none() {
        stopped = true;
    }
    if let Some(e) = failure {
        return Err(e);
    }
    if stopped {
        return Ok(RunOutcome::Stopped);
    }
    if let Some(why) = parked {
        return Ok(RunOutcome::Parked(why));
    }
    finish::finalize(&ctx, &shared.run, &dir, &stop).await
}

/// Leftovers of a crash mid-write are swept before anything new is written.
async fn sweep_leftovers(dir: &Path) {
    let dir = dir.to_path_buf();
    let _ = tokio::task::spawn_blocking(move || {
        let _ = crate::sink::create_dir_durable(&dir);
        let _ = crate::sink::sweep_temp(&dir);
        let _ = crate::sink::sweep_temp(&crate::sink::part::parts_dir(&dir));
    })
    .await;
}
