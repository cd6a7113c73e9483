//! One chunk's task: a loop over its persisted state, each step persisted
//! and flushed before it is acted on. The steps themselves are in
//! `trigger`, `poll` and `download`; what they share (persisting, backing
//! off, recording why the chunk is held up) is here.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{warn, Instrument};

use super::queue::{status_poll, CallSlot, Polled, Start, Waiting};
use super::{Context, WorkerError};
use crate::chunk::{self, ChunkEvent, ChunkState};
use crate::limits::{backoff, jitter, InFlightPermit, KeyLimits};
use crate::provider::{CallError, PollOutcome};
use crate::store::{ChunkRecord, RunRecord};

/// How a chunk's task ended.
pub(super) enum ChunkEnd {
    Terminal,
    Parked(String),
    Stopped,
    /// Building at the provider: the chunk waits for its next poll in the
    /// run's queue, as data rather than as a task.
    Waiting(Waiting),
}

/// What every chunk task of one run is given.
#[derive(Clone)]
pub(super) struct Shared {
    pub(super) ctx: Arc<Context>,
    /// The run's stop token.
    pub(super) stop: CancellationToken,
    pub(super) key: Arc<KeyLimits>,
    pub(super) run: Arc<RunRecord>,
    /// The run's output directory.
    pub(super) dir: PathBuf,
}

/// A chunk's task, started by the run.
///
/// It reads its chunk's record when it starts: chunks waiting for a place,
/// a trigger slot or a poll are kept as an index only (and a waiting one
/// with its remote id), so that thousands of them hold no records scattered
/// over the heap (which kept ~5 KB of pages resident per collection). A
/// due poll is made before the record is read, and one that finds the
/// collection still building reads nothing.
pub(super) async fn task(shared: Shared, start: Start) -> Result<ChunkEnd, WorkerError> {
    let Shared {
        ctx,
        stop,
        key,
        run,
        dir,
    } = shared;
    let index = start.index;
    let span = tracing::info_span!("chunk", job = %run.job, run = %run.run_id, chunk = index);
    async move {
        let Start {
            permit,
            attempt,
            mut call,
            trigger_slot_came,
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
            trigger_slot_came,
            answer,
            short_of_space: None,
        }
        .drive(permit)
        .await
    }
    .instrument(span)
    .await
}

/// One chunk's loop. Each iteration looks at the persisted state and does
/// the one thing that state calls for.
pub(super) struct ChunkDriver {
    pub(super) ctx: Arc<Context>,
    pub(super) stop: CancellationToken,
    pub(super) key: Arc<KeyLimits>,
    pub(super) run: Arc<RunRecord>,
    pub(super) dir: PathBuf,
    pub(super) rec: ChunkRecord,
    /// Consecutive failed attempts, for backoff.
    pub(super) attempt: u32,
    /// An in-doubt chunk not found at the provider is looked for twice.
    pub(super) rechecked: bool,
    /// One of the run's call slots, held for the first trigger or poll
    /// only. A chunk taken from the waiting queue holds one because its
    /// poll is due: it polls at once.
    pub(super) call_slot: Option<CallSlot>,
    /// Started by the run once its trigger slot came: trigger at once.
    pub(super) trigger_slot_came: bool,
    /// The answer to a status poll already made for this record (one that
    /// changes something: see [`Waiting::polled`]).
    pub(super) answer: Option<Result<PollOutcome, CallError>>,
    /// Why the download waits for disk space, while it does (logged once).
    pub(super) short_of_space: Option<String>,
}

/// What to do after a call failed.
pub(super) enum Next {
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
        if !std::mem::take(&mut self.trigger_slot_came) {
            tokio::select! {
                _ = self.stop.cancelled() => return Ok(Next::End(ChunkEnd::Stopped)),
                _ = self.key.trigger_slot() => {}
            }
        }
        self.trigger(call).await
    }

    /// Persists a transition and flushes it before anything else happens.
    pub(super) async fn apply(&mut self, event: ChunkEvent) -> Result<(), WorkerError> {
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
    pub(super) fn tell(&self, event: &'static str, summary: String) {
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
    pub(super) async fn wait(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    /// Records why the chunk is held up as its `last_error`, in the store,
    /// where `status` and `/v1/jobs` read it. Not flushed: it is a report,
    /// not a step, and the next flush carries it.
    pub(super) fn note_error(&mut self, error: String) {
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
    pub(super) fn clear_error(&mut self) {
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
    pub(super) async fn back_off(&mut self, what: &str, e: &CallError) -> Next {
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
    pub(super) async fn on_error(&mut self, what: &str, e: CallError) -> Next {
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
}
