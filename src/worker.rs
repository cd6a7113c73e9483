//! Drives runs and their chunks: trigger → poll → download, persisting each
//! step before acting on it (`docs/outputs.md`, `docs/durability.md`), within its limits. When
//! every chunk of a run is terminal, writes the final files and the manifest.
//!
//! Shutdown is an argument: every wait selects on the stop token, but a
//! trigger call already sent is let finish so the shutdown itself leaves no
//! chunk in doubt.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

use crate::chunk::{self, ChunkEvent, ChunkState, TransitionError, UnixMs};
use crate::config::LimitsConfig;
use crate::limits::{backoff, jitter, poll_interval, InFlightPermit, KeyLimits, ProviderGate};
use crate::provider::{
    CallError, DownloadOutcome, Found, PollOutcome, Provider, TriggerCall, Triggered,
};
use crate::sink::manifest::{timestamp, Manifest, ManifestChunk};
use crate::sink::outputs::Part;
use crate::sink::part::PartWriter;
use crate::store::{ChunkRecord, Download, RunRecord, RunState, Store, StoreError};

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
    /// Stopped by shutdown; the store says where to resume.
    Stopped,
}

enum ChunkEnd {
    Terminal,
    Parked(String),
    Stopped,
    /// Building at the provider: the chunk waits for its next poll in the
    /// run's queue, as data rather than as a task.
    Waiting(Waiting),
}

/// A collection between two status polls. Thousands of collections spend
/// nearly all their time here, so a waiting chunk is 56 bytes in a queue
/// and its remote id (its record stays in the store) instead of a task with
/// a timer (~1.5 KB, and a wake-up per chunk at shutdown): issue #7,
/// `cargo bench --bench many_collections`.
struct Waiting {
    due: tokio::time::Instant,
    index: u32,
    permit: Option<InFlightPermit>,
    /// Consecutive failed attempts, carried over for backoff.
    attempt: u32,
    /// What a status poll needs: the poll that finds the collection still
    /// building (nearly all of them) then reads and decodes nothing from
    /// the store, which was a tenth of the daemon's CPU per poll. ~40
    /// bytes more per collection.
    polled: Polled,
}

/// The collection a waiting chunk polls.
#[derive(Clone)]
struct Polled {
    remote_id: Box<str>,
    triggered_at: UnixMs,
}

/// What the run gives a chunk's task when it starts one.
struct Start {
    index: u32,
    /// Its place under `max_in_flight`, if it holds one.
    permit: Option<InFlightPermit>,
    attempt: u32,
    /// A call slot for its first trigger or poll.
    call: Option<CallSlot>,
    /// Its trigger slot has come: trigger at once.
    slot: bool,
    /// Taken from the waiting queue: its poll is due.
    polled: Option<Polled>,
}

/// One status poll, holding `call` while it is under way; notes a
/// successful one for `/healthz`.
async fn status_poll(
    ctx: &Context,
    key: &str,
    remote_id: &str,
    call: Option<CallSlot>,
) -> Result<PollOutcome, CallError> {
    // A poll is a read: at shutdown it is given up rather than waited for
    // (an endless answer would otherwise hold SIGTERM for the whole
    // request_timeout). The caller sees `stop` and ends the chunk.
    let outcome = tokio::select! {
        outcome = ctx.provider.poll(key, remote_id) => outcome,
        _ = ctx.stop.cancelled() => Err(CallError::Transient {
            detail: "shutting down".into(),
            sent: true,
        }),
    };
    drop(call);
    if outcome.is_ok() {
        ctx.counters.last_poll_ok.store(now_ms(), Ordering::Relaxed);
    }
    outcome
}

impl Waiting {
    /// Waits for the collection's next poll, due after [`poll_wait`].
    fn next_poll(
        ctx: &Context,
        key: &KeyLimits,
        index: u32,
        permit: Option<InFlightPermit>,
        attempt: u32,
        polled: Polled,
    ) -> Waiting {
        Waiting {
            due: tokio::time::Instant::now() + poll_wait(&ctx.limits(), key, polled.triggered_at),
            index,
            permit,
            attempt,
            polled,
        }
    }

    fn order(&self) -> (tokio::time::Instant, u32) {
        (self.due, self.index)
    }
}

impl PartialEq for Waiting {
    fn eq(&self, other: &Self) -> bool {
        self.order() == other.order()
    }
}

impl Eq for Waiting {}

impl PartialOrd for Waiting {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Waiting {
    /// Reversed, so that `BinaryHeap` (a max-heap) pops the earliest due.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.order().cmp(&self.order())
    }
}

/// A place among the calls (triggers and status polls) one run has under
/// way at once.
type CallSlot = tokio::sync::OwnedSemaphorePermit;

/// How long to wait before polling a collection triggered at `triggered_at`.
fn poll_wait(limits: &LimitsConfig, key: &KeyLimits, triggered_at: UnixMs) -> Duration {
    let waited = Duration::from_millis((now_ms() - triggered_at).max(0) as u64);
    poll_interval(
        waited,
        limits.poll_min_interval,
        limits.poll_max_interval,
        key.expected_build(),
        jitter(),
    )
}

/// Counters for metrics and the closing report.
#[derive(Default)]
pub struct Counters {
    pub triggers_sent: AtomicU64,
    pub in_doubt: AtomicU64,
    pub in_doubt_found: AtomicU64,
    pub in_doubt_not_created: AtomicU64,
    /// Found to exist, but the provider gives no way to reach it (Firecrawl
    /// v1's 409): the chunk failed instead of paying twice.
    pub in_doubt_unreachable: AtomicU64,
    pub rows_written: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Unix ms of the last successful status poll.
    pub last_poll_ok: std::sync::atomic::AtomicI64,
}

/// What every chunk of every run of one provider key shares.
pub struct Context {
    pub store: Store,
    pub provider: Arc<dyn Provider>,
    pub gate: Arc<ProviderGate>,
    /// Swapped whole on SIGHUP; readers take a snapshot.
    pub limits: std::sync::RwLock<Arc<LimitsConfig>>,
    pub output_dir: PathBuf,
    /// The state directory: its filesystem must keep `min_free_space` too.
    pub state_dir: PathBuf,
    pub stop: CancellationToken,
    /// With `run --once`, a blocked provider parks its runs instead of
    /// waiting for the block to lift.
    pub park_on_block: bool,
    pub counters: Arc<Counters>,
    pub notify: Arc<crate::notify::Notifier>,
}

impl Context {
    /// The limits in force now.
    pub fn limits(&self) -> Arc<LimitsConfig> {
        self.limits
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Time left (ms) before the provider deletes a dataset that expires at
    /// `expires_at` on its clock, and how alarming that is.
    pub fn expiry(&self, expires_at: UnixMs) -> (i64, ExpiryLevel) {
        let left = expires_at - self.provider.now_ms();
        let l = self.limits();
        let (warn_at, error_at) = match self.provider.kind() {
            crate::spec::ProviderKind::Firecrawl => {
                (l.firecrawl_expiry_warn, l.firecrawl_expiry_error)
            }
            _ => (l.expiry_warn, l.expiry_error),
        };
        let level = if left <= 0 {
            ExpiryLevel::Expired
        } else if left <= error_at.as_millis() as i64 {
            ExpiryLevel::Error
        } else if left <= warn_at.as_millis() as i64 {
            ExpiryLevel::Warning
        } else {
            ExpiryLevel::Fine
        };
        (left, level)
    }
}

/// How near an unsaved ready dataset is to deletion at the provider
/// (`docs/limits.md`: warn with 3 days left, error at 1 day; Firecrawl 6 h and 1 h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiryLevel {
    Fine,
    Warning,
    Error,
    Expired,
}

impl ExpiryLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            ExpiryLevel::Fine => "fine",
            ExpiryLevel::Warning => "warning",
            ExpiryLevel::Error => "error",
            ExpiryLevel::Expired => "expired",
        }
    }
}

/// `ms` as "2days 23h 59m", to the minute.
pub fn left_text(ms: i64) -> String {
    let minutes = (ms.max(0) as u64) / 60_000;
    if minutes == 0 {
        return "under a minute".into();
    }
    humantime::format_duration(Duration::from_secs(minutes * 60)).to_string()
}

pub fn now_ms() -> UnixMs {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

pub fn run_dir(output_dir: &Path, run: &RunRecord) -> PathBuf {
    output_dir.join(&run.job).join(&run.run_id)
}

/// Drives one run until it is finished, parked or stopped (`stop`: this
/// run's token, a child of the daemon's). A run whose cancel was asked is
/// cancelled instead.
pub async fn drive_run(
    ctx: Arc<Context>,
    key: Arc<KeyLimits>,
    run: RunRecord,
    stop: CancellationToken,
) -> Result<RunOutcome, WorkerError> {
    if run.cancel_requested {
        return cancel_run(&ctx, &run, &stop).await;
    }
    let dir = run_dir(&ctx.output_dir, &run);
    {
        let dir = dir.clone();
        // Leftovers of a crash mid-write are swept before anything new is written.
        let _ = tokio::task::spawn_blocking(move || {
            let _ = crate::sink::create_dir_durable(&dir);
            let _ = crate::sink::sweep_temp(&dir);
            let _ = crate::sink::sweep_temp(&crate::sink::part::parts_dir(&dir));
        })
        .await;
    }
    let run = Arc::new(run);
    let mut tasks = JoinSet::new();
    // A task reads its chunk's record when it starts: chunks waiting for a
    // place, a trigger slot or a poll are kept as an index only (and a
    // waiting one with its remote id), so that thousands of them hold no
    // records scattered over the heap (which kept ~5 KB of pages resident
    // per collection).
    let driver = |start: Start| {
        let index = start.index;
        let span = tracing::info_span!("chunk", job = %run.job, run = %run.run_id, chunk = index);
        let (ctx, stop, key, run, dir) = (
            ctx.clone(),
            stop.clone(),
            key.clone(),
            run.clone(),
            dir.clone(),
        );
        async move {
            let Start {
                permit,
                attempt,
                mut call,
                slot,
                polled,
                ..
            } = start;
            let mut answer = None;
            if let (Some(p), Some(_)) = (&polled, &call) {
                if !stop.is_cancelled() && ctx.gate.blocked().is_none() {
                    let outcome = status_poll(&ctx, &run.spec.key, &p.remote_id, call.take()).await;
                    if stop.is_cancelled() {
                        return Ok(ChunkEnd::Stopped);
                    }
                    if let Ok(PollOutcome::Building) = outcome {
                        let next = Waiting::next_poll(&ctx, &key, index, permit, 0, p.clone());
                        return Ok(ChunkEnd::Waiting(next));
                    }
                    answer = Some(outcome);
                }
            }
            let rec = ctx
                .store
                .chunk(&run.job, &run.run_id, index)?
                .ok_or_else(|| {
                    WorkerError::MissingChunk(format!("{}/{}/{index}", run.job, run.run_id))
                })?;
            // The answer is this record's only while it still waits for it.
            let answer = answer.filter(|_| {
                matches!((&rec.state, &polled), (ChunkState::Triggered { remote_id, .. }, Some(p))
                    if *remote_id == *p.remote_id)
            });
            ChunkDriver {
                ctx,
                stop,
                key,
                run,
                dir,
                rec,
                attempt,
                rechecked: false,
                call_slot: call,
                slot,
                answer,
                short_of_space: None,
            }
            .drive(permit)
            .await
        }
        .instrument(span)
    };
    // Chunks already in flight start at once, whatever the cap. A planned
    // one gets a task only once it holds a place under the cap and its
    // trigger slot has come (`starting`: one chunk at a time waits for its
    // slot), so a run of a million inputs, or of 10,000 places at 30
    // triggers a minute, keeps a few tasks alive, not one per chunk.
    // Building collections wait in `waiting` and get a task only for each
    // poll. A trigger or a poll starts only while one of `calls`' few slots
    // is free: a backlog behind the request rate stays in the queues,
    // instead of thousands of tasks queued for the rate (whose memory the
    // allocator then keeps: 10,000 triggers at 200 requests a second left
    // 5.5 KB per collection).
    let mut planned = std::collections::VecDeque::new();
    let mut starting: Option<(u32, InFlightPermit, tokio::time::Instant, CallSlot)> = None;
    let mut waiting = std::collections::BinaryHeap::new();
    // A quarter second of requests, enough to keep the rate busy.
    let calls = Arc::new(tokio::sync::Semaphore::new(
        (ctx.limits().requests_per_second as usize / 4).clamp(4, 256),
    ));
    // A poll may be up to `BURST_WINDOW` (50 ms) late, or 1 % of
    // `poll_min_interval` if less, so that polls coming due close together
    // start in one wake-up and go out in one burst of the request rate:
    // 10,000 collections are then ~20 wake-ups a second, not ~170.
    let coalesce = (ctx.limits().poll_min_interval / 100).min(crate::limits::BURST_WINDOW);
    for rec in ctx.store.unfinished_chunks(&run.job, &run.run_id) {
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
                tasks.spawn(driver(Start {
                    index: rec.index,
                    permit: Some(key.in_flight.enter()),
                    attempt: 0,
                    call: None,
                    slot: false,
                    polled: None,
                }));
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
            if let Some((index, ..)) = starting.take() {
                planned.push_front(index);
            }
        }
        let free_call = calls.available_permits() > 0;
        let may_start = going && !planned.is_empty() && starting.is_none() && free_call;
        let may_poll = going && !waiting.is_empty() && free_call;
        let next_due = waiting
            .peek()
            .map_or_else(tokio::time::Instant::now, |w: &Waiting| w.due);
        let slot = starting.as_ref().map(|s| s.2);
        tokio::select! {
            permit = key.in_flight.acquire(), if may_start => {
                if let (Ok(call), Some(index)) = (calls.clone().try_acquire_owned(), planned.pop_front()) {
                    starting = Some((index, permit, key.reserve_trigger_slot(), call));
                }
            }
            _ = tokio::time::sleep_until(slot.unwrap_or_else(tokio::time::Instant::now)), if going && slot.is_some() => {
                if let Some((index, permit, _, call)) = starting.take() {
                    tasks.spawn(driver(Start {
                        index,
                        permit: Some(permit),
                        attempt: 0,
                        call: Some(call),
                        slot: true,
                        polled: None,
                    }));
                }
            }
            _ = tokio::time::sleep_until(next_due + coalesce), if may_poll => {
                let now = tokio::time::Instant::now();
                while waiting.peek().is_some_and(|w| w.due <= now) {
                    let Ok(poll) = calls.clone().try_acquire_owned() else {
                        break;
                    };
                    if let Some(w) = waiting.pop() {
                        tasks.spawn(driver(Start {
                            index: w.index,
                            permit: w.permit,
                            attempt: w.attempt,
                            call: Some(poll),
                            slot: false,
                            polled: Some(w.polled),
                        }));
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
                    error!(job = %run.job, run = %run.run_id, error = %join, "chunk task panicked");
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
    finalize(&ctx, &run, &dir, &stop).await
}

/// Writes the final files, the manifest, `_SUCCESS` and `latest`, then
/// records the run as finished. Repeats after I/O errors until it succeeds
/// or the daemon stops: the part files are safe meanwhile.
async fn finalize(
    ctx: &Context,
    run: &RunRecord,
    dir: &Path,
    stop: &CancellationToken,
) -> Result<RunOutcome, WorkerError> {
    let chunks = ctx.store.chunks(&run.job, &run.run_id)?;
    let downloaded: Vec<u32> = chunks
        .iter()
        .filter(|c| matches!(c.state, ChunkState::Downloaded { .. }))
        .map(|c| c.index)
        .collect();
    let state = if downloaded.len() == chunks.len() {
        RunState::Complete
    } else if chunks
        .iter()
        .any(|c| matches!(c.state, ChunkState::Cancelled { .. }))
    {
        RunState::Cancelled
    } else if downloaded.is_empty() {
        RunState::Failed
    } else {
        RunState::Partial
    };
    let finished_at = now_ms();
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
    // Stored with the run's end, by the same flush: a crash cannot keep
    // the one without the other.
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
        counts: Some(counts),
        occurrence: finished_at.to_string(),
    });
    ctx.store.put_run(&done)?;
    ctx.store.flush().await?;
    let level_error = state != RunState::Complete;
    if level_error {
        warn!(job = %run.job, run = %run.run_id, state = state.as_str(), "run finished incomplete");
    } else {
        info!(job = %run.job, run = %run.run_id, state = state.as_str(), "run complete");
    }
    Ok(RunOutcome::Finished(state))
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
            rec.download = Download::default();
            store.put_chunk(&run.job, &run.run_id, &rec)?;
            count += 1;
        }
    }
    if count > 0 {
        run.state = RunState::InProgress;
        run.finished_at = None;
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
                    at: now_ms(),
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
    let dir = run_dir(&ctx.output_dir, run);
    finalize(ctx, run, &dir, stop).await
}

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
        .filter(|c| matches!(c.state, ChunkState::Downloaded { .. }))
        .map(|c| Part {
            index: c.index,
            columns: c.download.columns.as_deref(),
        })
        .collect();
    // A previous attempt's _SUCCESS must not outlive a rewrite.
    let success = dir.join("_SUCCESS");
    // Incremental output: this run's keys against earlier complete runs'.
    let dedup = match &run.spec.dedup_key {
        Some(key) => {
            let indices: Vec<u32> = parts.iter().map(|p| p.index).collect();
            let hashes = crate::sink::dedup::run_hashes(dir, &indices, key)?;
            let seen = store
                .dedup_seen(&run.job, &run.run_id, &hashes)
                .map_err(std::io::Error::other)?;
            let unseen: Vec<u128> = hashes
                .iter()
                .zip(&seen)
                .filter(|(_, s)| !**s)
                .map(|(h, _)| *h)
                .collect();
            Some((key.as_str(), hashes, unseen))
        }
        None => None,
    };
    let new_rows = dedup
        .as_ref()
        .map(|(key, _, unseen)| crate::sink::dedup::NewRows { key, unseen });
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
        started_at: timestamp(run.started_at),
        finished_at: timestamp(finished_at),
        state: state.as_str().to_string(),
        inputs: run.inputs,
        rows,
        error_rows,
        malformed_rows,
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
        credits_used: None,
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(std::io::Error::other)?;
    crate::sink::write_file(&dir.join("manifest.json"), &json)?;
    crate::failpoint::crash("after-manifest");
    if state == RunState::Complete {
        if let Some((_, hashes, _)) = &dedup {
            store
                .dedup_record(&run.job, &run.run_id, hashes)
                .map_err(std::io::Error::other)?;
        }
        crate::sink::write_file(&success, b"")?;
        crate::failpoint::crash("after-success");
        if let Some(job_dir) = dir.parent() {
            let latest = job_dir.join("latest");
            // `latest` is the newest complete run: an older run finishing
            // after a newer one leaves it where it is.
            let current = std::fs::read_link(&latest).ok();
            let newer = current
                .as_deref()
                .and_then(|p| p.to_str())
                .is_none_or(|cur| crate::plan::run_id_order(&run.run_id, cur).is_gt());
            if newer {
                crate::sink::replace_symlink(Path::new(&run.run_id), &latest)?;
            }
        }
    }
    Ok((bytes, counts))
}

fn manifest_chunk(c: &ChunkRecord) -> ManifestChunk {
    let ts = |ms: &UnixMs| Some(timestamp(*ms));
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

/// One chunk's loop. Each iteration looks at the persisted state and does
/// the one thing that state calls for.
struct ChunkDriver {
    ctx: Arc<Context>,
    stop: CancellationToken,
    key: Arc<KeyLimits>,
    run: Arc<RunRecord>,
    dir: PathBuf,
    rec: ChunkRecord,
    /// Consecutive failed attempts, for backoff.
    attempt: u32,
    /// An in-doubt chunk not found at the provider is looked for twice.
    rechecked: bool,
    /// One of the run's call slots, held for the first trigger or poll
    /// only. A chunk taken from the waiting queue holds one because its
    /// poll is due: it polls at once.
    call_slot: Option<CallSlot>,
    /// Started by the run once its trigger slot came: trigger at once.
    slot: bool,
    /// The answer to a status poll already made for this record (one that
    /// changes something: see [`Waiting::polled`]).
    answer: Option<Result<PollOutcome, CallError>>,
    /// Why the download waits for disk space, while it does (logged once).
    short_of_space: Option<String>,
}

/// What to do after a call failed.
enum Next {
    Continue,
    End(ChunkEnd),
}

impl ChunkDriver {
    /// `permit`: the chunk's place under `max_in_flight`, held until the
    /// collection is saved or the chunk ends (or goes back to planned).
    ///
    /// Returns [`ChunkEnd::Waiting`] when the collection is building and no
    /// poll is due. Each step's future is boxed while it runs, so the task
    /// itself stays small (~1 KB) whichever step it is in.
    async fn drive(mut self, mut permit: Option<InFlightPermit>) -> Result<ChunkEnd, WorkerError> {
        loop {
            if self.stop.is_cancelled() {
                return Ok(ChunkEnd::Stopped);
            }
            if self.ctx.gate.blocked().is_some() {
                if let Some(end) = Box::pin(self.check_block()).await {
                    return Ok(end);
                }
            }
            let step = match self.rec.state.clone() {
                ChunkState::Planned => Box::pin(self.start(&mut permit)).await?,
                ChunkState::Triggering { intent_at } => Box::pin(self.settle(intent_at)).await?,
                ChunkState::Triggered {
                    remote_id,
                    triggered_at,
                } => {
                    let answer = match (self.answer.take(), self.call_slot.take()) {
                        (Some(answer), _) => answer,
                        (None, Some(call)) => {
                            Box::pin(status_poll(
                                &self.ctx,
                                &self.run.spec.key,
                                &remote_id,
                                Some(call),
                            ))
                            .await
                        }
                        (None, None) => {
                            return Ok(ChunkEnd::Waiting(Waiting::next_poll(
                                &self.ctx,
                                &self.key,
                                self.rec.index,
                                permit,
                                self.attempt,
                                Polled {
                                    remote_id: remote_id.into(),
                                    triggered_at,
                                },
                            )));
                        }
                    };
                    if self.stop.is_cancelled() {
                        return Ok(ChunkEnd::Stopped);
                    }
                    Box::pin(self.on_answer(&remote_id, triggered_at, answer)).await?
                }
                ChunkState::Ready {
                    remote_id,
                    ready_at,
                    expires_at,
                    ..
                } => Box::pin(self.download(&remote_id, ready_at, expires_at)).await?,
                _ => return Ok(ChunkEnd::Terminal),
            };
            if let Next::End(end) = step {
                return Ok(end);
            }
            if self.rec.state.is_terminal() || matches!(self.rec.state, ChunkState::Planned) {
                // Terminal, or back to planned: the collection is no longer in flight.
                permit = None;
            }
        }
    }

    /// A planned chunk: takes a place under `max_in_flight` (unless it holds
    /// one) and a trigger slot, then triggers.
    async fn start(&mut self, permit: &mut Option<InFlightPermit>) -> Result<Next, WorkerError> {
        // The run's call slot, if given, is this trigger's, not a poll's.
        let call = self.call_slot.take();
        if permit.is_none() {
            tokio::select! {
                _ = self.stop.cancelled() => return Ok(Next::End(ChunkEnd::Stopped)),
                p = self.key.in_flight.acquire() => *permit = Some(p),
            }
        }
        if !std::mem::take(&mut self.slot) {
            tokio::select! {
                _ = self.stop.cancelled() => return Ok(Next::End(ChunkEnd::Stopped)),
                _ = self.key.trigger_slot() => {}
            }
        }
        self.trigger(call).await
    }

    /// Persists the record as it is and flushes it.
    async fn persist(&mut self) -> Result<(), WorkerError> {
        self.ctx
            .store
            .put_chunk(&self.run.job, &self.run.run_id, &self.rec)?;
        self.ctx.store.flush().await?;
        Ok(())
    }

    /// Every page is saved: joins them into the part file, then marks the
    /// chunk downloaded.
    async fn join(&mut self, remote_id: &str) -> Result<Next, WorkerError> {
        let (dir, index, pages) = (self.dir.clone(), self.rec.index, self.rec.download.pages);
        let joined =
            tokio::task::spawn_blocking(move || crate::sink::part::join_pages(&dir, index, pages))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        if let Err(e) = joined {
            return Ok(self
                .back_off("saving the part file", &CallError::Sink(e))
                .await);
        }
        let (rows, error_rows) = (self.rec.download.rows, self.rec.download.error_rows);
        info!(remote_id, rows, error_rows, pages, "dataset saved");
        self.attempt = 0;
        self.rec.last_error = None;
        self.apply(ChunkEvent::Saved {
            at: now_ms(),
            rows,
            error_rows,
        })
        .await?;
        crate::failpoint::crash("after-downloaded");
        Ok(Next::Continue)
    }

    /// Persists a transition and flushes it before anything else happens.
    async fn apply(&mut self, event: ChunkEvent) -> Result<(), WorkerError> {
        if let ChunkEvent::Expired { error } = &event {
            // Stored with the chunk's new state, by the same flush.
            self.tell(
                "expiry.lost",
                format!(
                    "chunk {} of run {}: {error}",
                    self.rec.index, self.run.run_id
                ),
            );
        }
        self.rec.state = chunk::next(&self.rec.state, event)?;
        self.ctx
            .store
            .put_chunk(&self.run.job, &self.run.run_id, &self.rec)?;
        self.ctx.store.flush().await?;
        Ok(())
    }

    /// Raises `event` for this chunk's run. Once per run and event: a run
    /// with many chunks near expiry is one warning, not one per chunk or
    /// per attempt.
    fn tell(&self, event: &'static str, summary: String) {
        self.ctx.notify.raise(&crate::notify::Event {
            event,
            job: Some(self.run.job.clone()),
            run_id: Some(self.run.run_id.clone()),
            state: Some(self.run.state.as_str().to_string()),
            summary,
            counts: None,
            occurrence: String::new(),
        });
    }

    async fn check_block(&self) -> Option<ChunkEnd> {
        let block = self.ctx.gate.blocked()?;
        if self.ctx.park_on_block {
            return Some(ChunkEnd::Parked(block.reason));
        }
        tokio::select! {
            _ = self.stop.cancelled() => Some(ChunkEnd::Stopped),
            _ = self.ctx.gate.wait_unblocked() => None,
        }
    }

    /// Waits `d`; false when stopped meanwhile.
    async fn wait(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    /// Records why the chunk is held up as its `last_error`, in the store,
    /// where `status` and `/v1/jobs` read it. Not flushed: it is a report,
    /// not a step, and the next flush carries it.
    fn note_error(&mut self, error: String) {
        if self.rec.last_error.as_deref() == Some(error.as_str()) {
            return;
        }
        self.rec.last_error = Some(error);
        if let Err(e) = self
            .ctx
            .store
            .put_chunk(&self.run.job, &self.run.run_id, &self.rec)
        {
            warn!(error = %e, "could not record the chunk's last error");
        }
    }

    /// Clears a recorded `last_error` once the chunk makes progress again.
    fn clear_error(&mut self) {
        if self.rec.last_error.take().is_some() {
            if let Err(e) = self
                .ctx
                .store
                .put_chunk(&self.run.job, &self.run.run_id, &self.rec)
            {
                warn!(error = %e, "could not clear the chunk's last error");
            }
        }
    }

    /// Backs off after a failure; `Next::End(Stopped)` if stopped meanwhile.
    async fn back_off(&mut self, what: &str, e: &CallError) -> Next {
        let l = &self.ctx.limits();
        let wait = backoff(self.attempt, l.backoff_base, l.backoff_cap, jitter());
        self.attempt = self.attempt.saturating_add(1);
        warn!(error = %e, attempt = self.attempt, ?wait, "{what} failed; retrying");
        self.note_error(format!("{what}: {e}"));
        if self.wait(wait).await {
            Next::Continue
        } else {
            Next::End(ChunkEnd::Stopped)
        }
    }

    /// A failed call's common cases: 429 (the gate already waits), a block.
    async fn on_error(&mut self, what: &str, e: CallError) -> Next {
        match &e {
            CallError::RateLimited { .. } => {
                let why = match self.ctx.gate.paused() {
                    Some(p) => format!(
                        "{what}: provider paused for {}s more: {}",
                        p.left.as_secs(),
                        p.reason
                    ),
                    None => format!("{what}: {e}"),
                };
                self.note_error(why);
                Next::Continue
            }
            // The driver has blocked the provider already; the loop waits.
            CallError::Blocked { .. } => {
                self.note_error(format!("{what}: {e}"));
                Next::Continue
            }
            _ => self.back_off(what, &e).await,
        }
    }

    fn call<'a>(&'a self, inputs: &'a [u8]) -> TriggerCall<'a> {
        TriggerCall {
            key: &self.run.spec.key,
            name: &self.rec.name,
            inputs_ndjson: inputs,
            count: self.rec.inputs,
            params: &self.run.spec.params,
            attempt: self.rec.triggers,
        }
    }

    fn inputs(&self) -> Result<Vec<u8>, WorkerError> {
        self.ctx
            .store
            .chunk_inputs(&self.run.job, &self.run.run_id, self.rec.index)?
            .ok_or_else(|| {
                WorkerError::MissingInputs(format!(
                    "{}/{}/{}",
                    self.run.job, self.run.run_id, self.rec.index
                ))
            })
    }

    /// `call`: the run's call slot, given back once the call has answered.
    async fn trigger(&mut self, call: Option<CallSlot>) -> Result<Next, WorkerError> {
        let inputs = self.inputs()?;
        let at = now_ms();
        self.ctx.store.set_last_trigger(&self.run.spec.key, at)?;
        self.rec.triggers += 1;
        self.apply(ChunkEvent::Intent { at }).await?;
        crate::failpoint::crash("after-intent");
        self.ctx
            .counters
            .triggers_sent
            .fetch_add(1, Ordering::Relaxed);
        // Not raced against shutdown: once sent, the answer is awaited so the
        // shutdown itself never leaves the chunk in doubt.
        let result = self.ctx.provider.trigger(&self.call(&inputs)).await;
        drop(call);
        if result.is_ok() {
            crate::failpoint::crash("after-answer");
        }
        match result {
            Ok(triggered) => {
                info!(remote_id = %triggered.remote_id, inputs = self.rec.inputs,
                    refused = triggered.rejected.len(), "triggered");
                self.accepted(triggered).await
            }
            Err(e) if e.may_have_created() => {
                self.note_in_doubt(&e);
                self.ctx
                    .store
                    .put_chunk(&self.run.job, &self.run.run_id, &self.rec)?;
                self.ctx.store.flush().await?;
                Ok(self.back_off("trigger", &e).await)
            }
            Err(CallError::Rejected { status, message }) => {
                error!(status, message = %message, "provider rejected the chunk; it failed for good");
                self.apply(ChunkEvent::Rejected {
                    error: format!("trigger rejected ({status}): {message}"),
                })
                .await?;
                Ok(Next::Continue)
            }
            Err(e) => {
                // Refused before anything was created: plan again.
                self.apply(ChunkEvent::NotCreated).await?;
                Ok(self.on_error("trigger", e).await)
            }
        }
    }

    /// The provider holds a collection for this chunk: record its id.
    async fn accepted(&mut self, triggered: Triggered) -> Result<Next, WorkerError> {
        self.attempt = 0;
        self.rec.last_error = None;
        self.rec.rejected = triggered.rejected;
        self.rec.download = Download::default();
        self.apply(ChunkEvent::Accepted {
            remote_id: triggered.remote_id,
            at: now_ms(),
        })
        .await?;
        crate::failpoint::crash("after-id");
        Ok(Next::Continue)
    }

    fn note_in_doubt(&mut self, e: &CallError) {
        self.rec.in_doubt += 1;
        self.rec.last_error = Some(e.to_string());
        self.ctx.counters.in_doubt.fetch_add(1, Ordering::Relaxed);
        warn!(error = %e, "trigger outcome unknown: chunk is in doubt; asking the provider before any new trigger");
    }

    /// An in-doubt chunk: find its collection, or prove there is none.
    async fn settle(&mut self, intent_at: UnixMs) -> Result<Next, WorkerError> {
        if self.rec.last_error.is_none() {
            // Found in doubt at start-up: a crash between intent and answer.
            self.note_in_doubt(&CallError::Protocol(
                "the daemon stopped before the trigger's answer was stored".into(),
            ));
        }
        let inputs = self.inputs()?;
        match self.ctx.provider.find(&self.call(&inputs), intent_at).await {
            Ok(Found::Existing(triggered)) => {
                info!(remote_id = %triggered.remote_id, "in-doubt chunk settled: the collection exists");
                self.ctx
                    .counters
                    .in_doubt_found
                    .fetch_add(1, Ordering::Relaxed);
                self.accepted(triggered).await
            }
            Ok(Found::Unreachable(error)) => {
                error!(error = %error, "in-doubt chunk settled: the collection exists but cannot be reached; the chunk fails rather than pay twice");
                self.ctx
                    .counters
                    .in_doubt_unreachable
                    .fetch_add(1, Ordering::Relaxed);
                self.apply(ChunkEvent::Rejected { error }).await?;
                Ok(Next::Continue)
            }
            Ok(Found::Absent) if !self.rechecked => {
                // Listings can lag a fresh trigger: look once more later.
                self.rechecked = true;
                Ok(if self.wait(self.ctx.limits().in_doubt_recheck).await {
                    Next::Continue
                } else {
                    Next::End(ChunkEnd::Stopped)
                })
            }
            Ok(Found::Absent) => {
                info!(
                    "in-doubt chunk settled: the provider has no such collection; triggering again"
                );
                self.ctx
                    .counters
                    .in_doubt_not_created
                    .fetch_add(1, Ordering::Relaxed);
                self.rechecked = false;
                self.rec.last_error = None;
                self.apply(ChunkEvent::NotCreated).await?;
                Ok(Next::Continue)
            }
            Err(e) => Ok(self.on_error("looking up an in-doubt trigger", e).await),
        }
    }

    /// Acts on a status poll's answer (the wait before the poll is
    /// [`poll_wait`], in the run's queue).
    async fn on_answer(
        &mut self,
        remote_id: &str,
        triggered_at: UnixMs,
        outcome: Result<PollOutcome, CallError>,
    ) -> Result<Next, WorkerError> {
        let l = &self.ctx.limits();
        match outcome {
            Ok(PollOutcome::Building) => {
                self.attempt = 0;
                self.clear_error();
            }
            Ok(PollOutcome::Ready { expires_at, start }) => {
                let now = now_ms();
                // Scraper Studio and the Web Scraper API name no deadline:
                // retention counts from now on the provider's clock.
                let expires_at = expires_at.unwrap_or(
                    self.ctx.provider.now_ms() + self.ctx.provider.retention().as_millis() as i64,
                );
                info!(remote_id, "collection ready");
                self.attempt = 0;
                let built = (now - triggered_at).max(0) as u64;
                let samples = self
                    .ctx
                    .store
                    .record_build_time(&self.run.spec.key, built)?;
                self.key.learn_builds(&samples);
                self.rec.download = Download {
                    cursor: start,
                    ..Download::default()
                };
                self.rec.last_error = None;
                self.apply(ChunkEvent::Ready {
                    at: now,
                    expires_at,
                })
                .await?;
            }
            Ok(PollOutcome::Failed(message)) => {
                error!(remote_id, message = %message, "collection failed at the provider");
                self.apply(ChunkEvent::Failed { error: message }).await?;
            }
            Ok(PollOutcome::Cancelled) => {
                warn!(remote_id, "collection was cancelled at the provider");
                self.apply(ChunkEvent::Cancelled).await?;
            }
            Ok(PollOutcome::Expired(message)) => {
                let error = format!(
                    "the provider deleted collection {remote_id} before it was saved: {message}"
                );
                error!(remote_id, "{error}");
                self.apply(ChunkEvent::Expired { error }).await?;
            }
            Ok(PollOutcome::NotFound(message)) => {
                let age = Duration::from_millis((now_ms() - triggered_at).max(0) as u64);
                if age >= l.not_found_grace {
                    // Not an early 404: the provider has lost or dropped it.
                    let error =
                        format!("the provider no longer knows collection {remote_id}: {message}");
                    error!(remote_id, "{error}");
                    let event = if age >= self.ctx.provider.retention() {
                        ChunkEvent::Expired { error }
                    } else {
                        ChunkEvent::Failed { error }
                    };
                    self.apply(event).await?;
                }
            }
            Err(e) => return Ok(self.on_error("status poll", e).await),
        }
        if !matches!(self.rec.state, ChunkState::Triggered { .. }) {
            crate::failpoint::crash("after-poll");
        }
        Ok(Next::Continue)
    }

    async fn download(
        &mut self,
        remote_id: &str,
        ready_at: UnixMs,
        expires_at: UnixMs,
    ) -> Result<Next, WorkerError> {
        let now = now_ms();
        let (left, level) = self.ctx.expiry(expires_at);
        let expires = timestamp(expires_at);
        let unsaved = format!(
            "chunk {} of run {}: a ready dataset is still unsaved and expires at {expires} ({} left)",
            self.rec.index,
            self.run.run_id,
            left_text(left)
        );
        match level {
            ExpiryLevel::Expired => {
                let error = format!("the dataset expired at {expires} before it could be saved");
                error!(remote_id, "{error}");
                self.apply(ChunkEvent::Expired { error }).await?;
                return Ok(Next::Continue);
            }
            ExpiryLevel::Error => {
                error!(
                    remote_id,
                    expires_at = %expires,
                    left = %left_text(left),
                    "ready dataset still unsaved and about to expire"
                );
                self.tell("expiry.error", unsaved);
            }
            ExpiryLevel::Warning => {
                warn!(
                    remote_id,
                    expires_at = %expires,
                    left = %left_text(left),
                    "ready dataset still unsaved; it expires soon"
                );
                self.tell("expiry.warning", unsaved);
            }
            ExpiryLevel::Fine => {}
        }
        if self.rec.download.fetched {
            return self.join(remote_id).await;
        }
        if let Some(why) = self.space_check().await {
            return Ok(self.wait_for_space(why).await);
        }
        if self.short_of_space.take().is_some() {
            info!(remote_id, "disk space is back; downloading");
        }
        let dir = self.dir.clone();
        let (index, page) = (self.rec.index, self.rec.download.pages);
        let max_row_bytes = self.ctx.limits().max_row_bytes;
        let mut part = match tokio::task::spawn_blocking(move || {
            PartWriter::create(&dir, index, page).map(|mut p| {
                p.max_row_bytes = max_row_bytes;
                p
            })
        })
        .await
        {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                return Ok(self
                    .back_off("creating the part file", &CallError::Sink(e))
                    .await)
            }
            Err(e) => {
                return Ok(self
                    .back_off(
                        "creating the part file",
                        &CallError::Sink(std::io::Error::other(e.to_string())),
                    )
                    .await)
            }
        };
        if page == 0 {
            // Inputs refused at the trigger go with the chunk's first page.
            for row in &self.rec.rejected {
                if let Err(e) = crate::provider::RowSink::row(&mut part, row.as_bytes()) {
                    return Ok(self
                        .back_off("writing the part file", &CallError::Sink(e))
                        .await);
                }
            }
        }
        let cursor = self.rec.download.cursor.clone();
        // Raced against shutdown: a download is bounded by progress, not
        // by time, and an endless body must not hold SIGTERM. The page
        // given up is thrown away with its temporary file.
        let outcome = tokio::select! {
            _ = self.stop.cancelled() => return Ok(Next::End(ChunkEnd::Stopped)),
            outcome = self
                .ctx
                .provider
                .download(&self.run.spec.key, remote_id, cursor.as_ref(), &mut part) => outcome,
        };
        match outcome {
            Ok(DownloadOutcome::Saved { next }) => {
                let (rows, error_rows) = (part.rows, part.error_rows);
                let malformed_rows = part.malformed_rows;
                let columns = std::mem::take(&mut part.columns).into_names();
                let committed = tokio::task::spawn_blocking(move || part.commit())
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
                if let Err(e) = committed {
                    if crate::sink::is_out_of_space(&e) {
                        return Ok(self
                            .wait_for_space(format!("saving the part file: {e}"))
                            .await);
                    }
                    // The chunk stays ready: it is never done without a durable part.
                    return Ok(self
                        .back_off("saving the part file", &CallError::Sink(e))
                        .await);
                }
                if malformed_rows > 0 {
                    warn!(
                        remote_id,
                        malformed_rows, "rows the daemon cannot read were kept in errors.ndjson"
                    );
                }
                self.attempt = 0;
                self.rec.last_error = None;
                let d = &mut self.rec.download;
                d.add_page_columns(columns);
                d.pages += 1;
                d.rows += rows;
                d.error_rows += error_rows;
                d.fetched = next.is_none();
                d.cursor = next;
                if !d.fetched {
                    info!(remote_id, page = d.pages, rows, "page saved");
                }
                self.persist().await?;
                crate::failpoint::crash("after-page");
                if self.rec.download.fetched {
                    return self.join(remote_id).await;
                }
            }
            Ok(DownloadOutcome::Redirect(cursor)) => {
                drop(part);
                info!(remote_id, cursor = %cursor, "downloading in parts");
                self.rec.download.cursor = Some(cursor);
                self.persist().await?;
            }
            Ok(DownloadOutcome::NotReady) => {
                // Build lag: ready by status, not served yet.
                drop(part);
                let l = &self.ctx.limits();
                let waited = Duration::from_millis((now - ready_at).max(0) as u64);
                if !self
                    .wait(poll_interval(
                        waited,
                        l.poll_min_interval,
                        l.poll_max_interval,
                        None,
                        jitter(),
                    ))
                    .await
                {
                    return Ok(Next::End(ChunkEnd::Stopped));
                }
            }
            Ok(DownloadOutcome::Expired(message)) => {
                drop(part);
                let error = format!(
                    "the provider deleted dataset {remote_id} before it was saved: {message}"
                );
                error!(remote_id, "{error}");
                self.apply(ChunkEvent::Expired { error }).await?;
            }
            Ok(DownloadOutcome::NotFound(message)) => {
                drop(part);
                let since_ready = Duration::from_millis((now - ready_at).max(0) as u64);
                if since_ready >= self.ctx.limits().not_found_grace {
                    let error =
                        format!("the provider no longer serves dataset {remote_id}: {message}");
                    error!(remote_id, "{error}");
                    self.apply(ChunkEvent::Expired { error }).await?;
                } else if !self.wait(self.ctx.limits().poll_min_interval).await {
                    return Ok(Next::End(ChunkEnd::Stopped));
                }
            }
            Err(CallError::TooLarge(error)) => {
                drop(part);
                error!(remote_id, "{error}");
                self.apply(ChunkEvent::Failed { error }).await?;
            }
            Err(CallError::Sink(e)) if crate::sink::is_out_of_space(&e) => {
                drop(part);
                return Ok(self
                    .wait_for_space(format!("writing the part file: {e}"))
                    .await);
            }
            Err(e) => {
                drop(part);
                return Ok(self.on_error("download", e).await);
            }
        }
        Ok(Next::Continue)
    }

    /// Why a download must wait for disk space now, if it must: the output
    /// or state filesystem has less than `min_free_space`.
    async fn space_check(&self) -> Option<String> {
        let min = self.ctx.limits().min_free_space;
        if min == 0 {
            return None;
        }
        let dirs = [
            ("output", self.ctx.output_dir.clone()),
            ("state", self.ctx.state_dir.clone()),
        ];
        tokio::task::spawn_blocking(move || {
            dirs.iter().find_map(|(what, dir)| {
                let free = crate::sink::free_space(dir).ok()?;
                (free < min).then(|| {
                    format!(
                        "waiting for disk space: the {what} filesystem ({}) has {free} bytes free, under limits.min_free_space ({min})",
                        dir.display()
                    )
                })
            })
        })
        .await
        .ok()
        .flatten()
    }

    /// The chunk stays ready and its download waits for disk space: says
    /// why (log once, `last_error` for `status`), then waits a few seconds
    /// before the next check. The backoff does not grow: nothing failed
    /// at the provider.
    async fn wait_for_space(&mut self, why: String) -> Next {
        if self.short_of_space.as_deref() != Some(why.as_str()) {
            warn!(reason = %why, "download waits for disk space");
        }
        self.short_of_space = Some(why.clone());
        self.note_error(why);
        let recheck = self.ctx.limits().poll_max_interval.min(SPACE_RECHECK);
        if self.wait(recheck).await {
            Next::Continue
        } else {
            Next::End(ChunkEnd::Stopped)
        }
    }
}

/// How often a download waiting for disk space checks again (at most).
const SPACE_RECHECK: Duration = Duration::from_secs(5);
