//! Acting on a status poll's answer. The poll itself is made by the run's
//! queue or the chunk's task (`queue::status_poll`); the wait before it is
//! `queue::poll_wait`.

use tracing::{error, info, warn};

use super::driver::{ChunkDriver, Next};
use super::WorkerError;
use crate::chunk::{ChunkEvent, ChunkState, UnixMs};
use crate::clock;
use crate::provider::{CallError, PollOutcome};

impl ChunkDriver {
    /// Acts on a status poll's answer (the wait before the poll is
    /// [`poll_wait`], in the run's queue).
    pub(super) async fn on_answer(
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
            Ok(PollOutcome::Ready {
                expires_at,
                start,
                credits_used,
            }) => {
                let now = clock::now_ms();
                // Scraper Studio and the Web Scraper API name no deadline:
                // retention counts from now on the provider's clock.
                let expires_at = expires_at.unwrap_or(
                    self.ctx
                        .provider
                        .now_ms()
                        .saturating_add(clock::millis(self.ctx.provider.retention())),
                );
                info!(remote_id, "collection ready");
                self.attempt = 0;
                let built = clock::millis(clock::between(triggered_at, now)) as u64;
                let provider = self.ctx.provider.kind().as_str();
                if let Ok(h) = self
                    .ctx
                    .counters
                    .build_seconds
                    .0
                    .get_metric_with_label_values(&[provider])
                {
                    h.observe(built as f64 / 1000.0);
                }
                let samples = self
                    .ctx
                    .store
                    .record_build_time(&self.run.spec.key, built)?;
                self.key.learn_builds(&samples);
                self.rec.last_error = None;
                // Recorded with the ready state, by the same write.
                // Added up: a chunk retried or triggered again after a doubt
                // paid for each of its collections.
                if let Some(credits) = credits_used {
                    let before = self.rec.credits_used.unwrap_or(0);
                    self.rec.credits_used = Some(before.saturating_add(credits));
                    self.ctx
                        .counters
                        .credits_used
                        .fetch_add(credits, std::sync::atomic::Ordering::Relaxed);
                }
                self.apply(ChunkEvent::Ready {
                    at: now,
                    expires_at,
                    start,
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
                let age = clock::since(triggered_at);
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
}
