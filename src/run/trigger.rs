//! Triggering a chunk, and settling one in doubt: the intent is flushed
//! before the call, and a chunk whose trigger may have created a collection
//! is looked up at the provider before any new trigger.

use std::sync::atomic::Ordering;

use tracing::{error, info, warn};

use super::driver::{ChunkDriver, ChunkEnd, Next};
use super::queue::CallSlot;
use super::WorkerError;
use crate::chunk::{ChunkEvent, UnixMs};
use crate::clock;
use crate::provider::{CallError, Found, TriggerCall, Triggered};

impl ChunkDriver {
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
    pub(super) async fn trigger(&mut self, call: Option<CallSlot>) -> Result<Next, WorkerError> {
        let inputs = self.inputs()?;
        let at = clock::now_ms();
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
        self.apply(ChunkEvent::Accepted {
            remote_id: triggered.remote_id,
            at: clock::now_ms(),
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
    pub(super) async fn settle(&mut self, intent_at: UnixMs) -> Result<Next, WorkerError> {
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
}
