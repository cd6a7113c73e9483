//! Saving a ready collection: page by page into temporary files, each
//! committed and recorded before the next, then joined into the chunk's part
//! file. A download waits for disk space rather than fail, and warns as the
//! provider's deletion comes near.

use std::time::Duration;

use tracing::{error, info, warn};

use super::driver::{ChunkDriver, ChunkEnd, Next};
use super::{ExpiryLevel, WorkerError};
use crate::chunk::{ChunkEvent, ChunkState, Progress, UnixMs};
use crate::clock;
use crate::limits::{jitter, poll_interval};
use crate::provider::{CallError, Cursor, DownloadOutcome};
use crate::sink::part::PartWriter;

impl ChunkDriver {
    /// Every page is saved: joins them into the part file, then marks the
    /// chunk downloaded.
    async fn join(&mut self, remote_id: &str) -> Result<Next, WorkerError> {
        let progress = self.progress();
        let (dir, index, pages) = (self.dir.clone(), self.rec.index, progress.pages);
        let joined =
            tokio::task::spawn_blocking(move || crate::sink::part::join_pages(&dir, index, pages))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        if let Err(e) = joined {
            return Ok(self
                .back_off("saving the part file", &CallError::Sink(e))
                .await);
        }
        let (rows, error_rows) = (progress.rows, progress.error_rows);
        info!(remote_id, rows, error_rows, pages, "dataset saved");
        self.attempt = 0;
        self.rec.last_error = None;
        self.apply(ChunkEvent::Saved {
            at: clock::now_ms(),
        })
        .await?;
        crate::failpoint::crash("after-downloaded");
        Ok(Next::Continue)
    }

    pub(super) async fn download(
        &mut self,
        remote_id: &str,
        ready_at: UnixMs,
        expires_at: UnixMs,
    ) -> Result<Next, WorkerError> {
        let now = clock::now_ms();
        if self.expired(remote_id, expires_at).await? {
            return Ok(Next::Continue);
        }
        let progress = self.progress();
        if progress.fetched {
            return self.join(remote_id).await;
        }
        if let Some(why) = self.space_check().await {
            return Ok(self.wait_for_space(why).await);
        }
        if self.short_of_space.take().is_some() {
            info!(remote_id, "disk space is back; downloading");
        }
        let dir = self.dir.clone();
        let (index, page) = (self.rec.index, progress.pages);
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
        let cursor = progress.cursor;
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
                return self.page_saved(remote_id, part, next).await;
            }
            Ok(DownloadOutcome::Redirect(cursor)) => {
                drop(part);
                info!(remote_id, cursor = %cursor, "downloading in parts");
                self.apply(ChunkEvent::Redirected { cursor }).await?;
            }
            Ok(DownloadOutcome::NotReady) => {
                // Build lag: ready by status, not served yet.
                drop(part);
                let l = &self.ctx.limits();
                let waited = clock::between(ready_at, now);
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
                let since_ready = clock::between(ready_at, now);
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

    /// A page is in its temporary file: commits it and records the
    /// download's progress; joins the part file after the last page.
    async fn page_saved(
        &mut self,
        remote_id: &str,
        mut part: PartWriter,
        next: Option<Cursor>,
    ) -> Result<Next, WorkerError> {
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
        let last = next.is_none();
        self.apply(ChunkEvent::PageSaved {
            next,
            rows,
            error_rows,
            columns,
        })
        .await?;
        if !last {
            info!(remote_id, page = self.progress().pages, rows, "page saved");
        }
        crate::failpoint::crash("after-page");
        if last {
            return self.join(remote_id).await;
        }
        Ok(Next::Continue)
    }

    /// How far the download has come (nothing, out of `ready`).
    fn progress(&self) -> Progress {
        match &self.rec.state {
            ChunkState::Ready { progress, .. } => progress.clone(),
            _ => Progress::default(),
        }
    }

    /// Warns (log and notification) while a ready dataset is still unsaved
    /// near its deletion; true, with the chunk expired, once it is past.
    async fn expired(&mut self, remote_id: &str, expires_at: UnixMs) -> Result<bool, WorkerError> {
        let (left, level) = self.ctx.expiry(expires_at);
        let expires = clock::timestamp(expires_at);
        let unsaved = || {
            format!(
                "chunk {} of run {}: a ready dataset is still unsaved and expires at {expires} ({} left)",
                self.rec.index,
                self.run.run_id,
                clock::left_text(left)
            )
        };
        match level {
            ExpiryLevel::Expired => {
                let error = format!("the dataset expired at {expires} before it could be saved");
                error!(remote_id, "{error}");
                self.apply(ChunkEvent::Expired { error }).await?;
                return Ok(true);
            }
            ExpiryLevel::Error => {
                error!(
                    remote_id,
                    expires_at = %expires,
                    left = %clock::left_text(left),
                    "ready dataset still unsaved and about to expire"
                );
                self.tell("expiry.error", unsaved());
            }
            ExpiryLevel::Warning => {
                warn!(
                    remote_id,
                    expires_at = %expires,
                    left = %clock::left_text(left),
                    "ready dataset still unsaved; it expires soon"
                );
                self.tell("expiry.warning", unsaved());
            }
            ExpiryLevel::Fine => {}
        }
        Ok(false)
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
