//! A finished run's files, from the staging directory to the object store
//! `output_dir` names (`docs/object-storage.md`).
//!
//! The objects go in the order readers depend on: the data files, then
//! `errors.ndjson`, `manifest.json`, `_SUCCESS` (a complete run only), and
//! last `<job>/latest`, so whoever sees `_SUCCESS` or `latest` finds
//! everything before it. Each object is recorded in the run's record once
//! sent, and a multipart upload's id before its first part, so a restart
//! (clean or `kill -9`) sends only what is left and aborts what a crash left
//! half sent. Nothing is triggered again: the run's data is safe in staging
//! once its parts are, whatever the provider's retention.
//!
//! A failing attempt (store down, credentials refused, throttling past the
//! client's own retries) is recorded on the run, so `status` shows it, and
//! told once as `upload.failing`; then it is tried again with backoff until
//! it succeeds or the daemon stops. Staging is removed once `latest` is
//! written; a run that did not complete keeps its parts there, because a
//! `retry` rebuilds its files from them.

use std::path::Path;
use std::sync::atomic::Ordering;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{Context, RunOutcome, WorkerError};
use crate::bucket::{self, BucketError, Target, PART_SIZE};
use crate::clock;
use crate::limits::{backoff, jitter};
use crate::sink::manifest::Manifest;
use crate::store::{RunRecord, RunState};

/// Failed attempts after which `run --once` gives up for now (each has had
/// the client's own retries, up to 30 s).
const ONCE_ATTEMPTS: u32 = 3;

/// One object of a run, in upload order.
struct Object {
    /// The file in the run's staging directory.
    file: &'static str,
    /// Its key under `<prefix>/<job>/`: `<run_id>/<file>`, or `latest`.
    key: Vec<String>,
    /// The manifest's sha256 of the file, when it lists it.
    sha256: Option<String>,
}

/// Uploads `run` (finished, with its upload to do) until it is done, then
/// records it as finished without an upload and raises its run-end event.
/// Returns `Stopped` when the daemon stops first: the record says where to
/// go on.
pub(super) async fn upload_run(
    ctx: &Context,
    target: &Target,
    mut run: RunRecord,
    dir: &Path,
    stop: &CancellationToken,
) -> Result<RunOutcome, WorkerError> {
    info!(job = %run.job, run = %run.run_id, to = %target.url, "uploading the run");
    let to = target.url.to_string();
    let upload = run.upload.get_or_insert_default();
    if upload.to != to {
        if !upload.to.is_empty() {
            // `output_dir` changed since part of the run was sent: the new
            // place gets all of it. An upload left open at the old place is
            // for that store's lifecycle rule.
            warn!(job = %run.job, run = %run.run_id, from = %upload.to, to = %to,
                "output_dir changed during the run's upload; sending the whole run to the new one");
        }
        *upload = crate::store::RunUpload {
            to,
            ..Default::default()
        };
        ctx.store.put_run(&run)?;
        ctx.store.flush().await?;
    }
    let mut attempt: u32 = 0;
    let manifest = loop {
        let e = match attempt_upload(ctx, target, &mut run, dir, stop).await {
            Ok(manifest) => break manifest,
            Err(Failure::Store(e)) => return Err(e),
            Err(Failure::Upload(BucketError::Stopped)) => return Ok(RunOutcome::Stopped),
            Err(Failure::Upload(e)) => e,
        };
        ctx.counters.upload_failures.fetch_add(1, Ordering::Relaxed);
        let reason = target.redact(&e.to_string());
        let now = clock::now_ms();
        let upload = run.upload.get_or_insert_default();
        let first = upload.failing_since.is_none();
        let since = *upload.failing_since.get_or_insert(now);
        if first || upload.error.as_deref() != Some(reason.as_str()) {
            upload.error = Some(reason.clone());
            if first {
                // Stored with the failure, by the same flush: told once per
                // failing spell, however many attempts it takes.
                ctx.notify.raise(&crate::notify::Event {
                    event: "upload.failing",
                    job: Some(run.job.clone()),
                    run_id: Some(run.run_id.clone()),
                    state: Some(run.state.as_str().to_string()),
                    summary: format!(
                        "uploading run {} of '{}' to {} fails: {reason}",
                        run.run_id, run.job, target.url
                    ),
                    counts: None,
                    occurrence: since.to_string(),
                });
            }
            ctx.store.put_run(&run)?;
            ctx.store.flush().await?;
        }
        error!(job = %run.job, run = %run.run_id, to = %target.url, error = %reason,
            "upload failing; the run's files are kept in staging and the upload is tried again");
        attempt = attempt.saturating_add(1);
        if ctx.park_on_block && attempt >= ONCE_ATTEMPTS {
            // `run --once` ends rather than wait for the store without
            // bound; the run stays recorded with its upload to do.
            return Ok(RunOutcome::UploadFailing(format!(
                "to {}: {reason}",
                target.url
            )));
        }
        let limits = ctx.limits();
        let wait = backoff(
            attempt - 1,
            limits.backoff_base,
            limits.backoff_cap,
            jitter(),
        );
        tokio::select! {
            _ = stop.cancelled() => return Ok(RunOutcome::Stopped),
            _ = tokio::time::sleep(wait) => {}
        }
    };
    if let Some(since) = run.upload.as_ref().and_then(|u| u.failing_since) {
        info!(job = %run.job, run = %run.run_id, failed_for = ?clock::since(since),
            "upload recovered");
    }
    run.upload = None;
    let counts = counts(&manifest);
    super::finish::announce(ctx, &run, counts).await?;
    if run.state == RunState::Complete {
        // Nothing in staging is needed any more: the objects are the run.
        let dir = dir.to_path_buf();
        let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir)).await;
        if let Ok(Err(e)) = removed {
            warn!(job = %run.job, run = %run.run_id, error = %e, "cannot remove the run's staging directory");
        }
    }
    Ok(RunOutcome::Finished(run.state))
}

enum Failure {
    /// The state store failed: the run stops, as it would on any step.
    Store(WorkerError),
    /// The upload failed: it is tried again.
    Upload(BucketError),
}

impl<E: Into<WorkerError>> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure::Store(e.into())
    }
}

/// One attempt: every object not yet sent, in order. Returns the run's
/// manifest, read from staging. Stops between objects (and between the
/// parts of one), never inside a request, once `stop` is cancelled.
async fn attempt_upload(
    ctx: &Context,
    target: &Target,
    run: &mut RunRecord,
    dir: &Path,
    stop: &CancellationToken,
) -> Result<Manifest, Failure> {
    let manifest = read_manifest(dir).await.map_err(Failure::Upload)?;
    if run.upload.as_ref().is_none_or(|u| u.done.is_empty()) {
        // A run sent before (a partial run, now retried) is overwritten
        // object by object: its old manifest and `_SUCCESS` go first, so
        // no reader takes the new data for what the old manifest says.
        for file in ["manifest.json", "_SUCCESS"] {
            let key = target.key(&[run.job.as_str(), run.run_id.as_str(), file]);
            match object_store::ObjectStoreExt::delete(target.client.as_ref(), &key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(Failure::Upload(e.into())),
            }
        }
    }
    for object in objects(&manifest, &run.run_id) {
        if stop.is_cancelled() {
            return Err(Failure::Upload(BucketError::Stopped));
        }
        let upload = run.upload.get_or_insert_default();
        if upload.done.iter().any(|d| d == object.file) {
            continue;
        }
        let key = target.key(
            &std::iter::once(run.job.as_str())
                .chain(object.key.iter().map(String::as_str))
                .collect::<Vec<_>>(),
        );
        let file = dir.join(object.file);
        if let Some((open_file, id)) = upload.multipart.clone() {
            // Left by an attempt that failed or a crash: its parts are
            // stored, and billed, until it is aborted. Gone already
            // (completed or aborted) is as good as aborted.
            let open_key = target.key(&[run.job.as_str(), run.run_id.as_str(), open_file.as_str()]);
            match target.client.abort_multipart(&open_key, &id).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(Failure::Upload(e.into())),
            }
            upload.multipart = None;
            ctx.store.put_run(run)?;
        }
        let sent = if object.file == "latest" {
            point_latest(target, &key, &run.run_id).await
        } else {
            put(ctx, target, run, &key, &file, &object, stop).await?
        }
        .map_err(Failure::Upload)?;
        ctx.counters.upload_bytes.fetch_add(sent, Ordering::Relaxed);
        ctx.counters.upload_objects.fetch_add(1, Ordering::Relaxed);
        let upload = run.upload.get_or_insert_default();
        upload.done.push(object.file.to_string());
        ctx.store.put_run(run)?;
        ctx.store.flush().await?;
        crate::failpoint::crash("after-upload-object");
    }
    Ok(manifest)
}

/// Sends one staged file: whole when small, as a multipart upload whose id
/// is stored and flushed before its first part otherwise.
async fn put(
    ctx: &Context,
    target: &Target,
    run: &mut RunRecord,
    key: &object_store::path::Path,
    file: &Path,
    object: &Object,
    stop: &CancellationToken,
) -> Result<Result<u64, BucketError>, Failure> {
    let size = match tokio::fs::metadata(file).await {
        Ok(m) => m.len(),
        Err(source) => {
            return Ok(Err(BucketError::Read {
                file: file.display().to_string(),
                source,
            }))
        }
    };
    let sha = object.sha256.as_deref();
    if size <= PART_SIZE as u64 {
        return Ok(bucket::put_whole(target.client.as_ref(), key, file, sha).await);
    }
    let id = match target.client.create_multipart(key).await {
        Ok(id) => id,
        Err(e) => return Ok(Err(e.into())),
    };
    run.upload.get_or_insert_default().multipart = Some((object.file.to_string(), id.clone()));
    ctx.store.put_run(run)?;
    ctx.store.flush().await?;
    crate::failpoint::crash("after-multipart-begun");
    let sent = bucket::put_parts(target.client.as_ref(), key, &id, file, sha, stop).await;
    if sent.is_ok() {
        // Completed: nothing is left to abort. After a failure the id is
        // kept, and the next attempt makes sure the upload is aborted.
        if let Some(upload) = run.upload.as_mut() {
            upload.multipart = None;
        }
    }
    Ok(sent)
}

/// Writes `<job>/latest` unless it already names a newer run: runs of one
/// job are uploaded one at a time, but a run retried later is older than
/// the one `latest` names.
async fn point_latest(
    target: &Target,
    key: &object_store::path::Path,
    run_id: &str,
) -> Result<u64, BucketError> {
    let _one_at_a_time = target.latest.lock().await;
    let current = bucket::get_small(target.client.as_ref(), key).await?;
    let current = current
        .as_deref()
        .and_then(|b| std::str::from_utf8(b).ok())
        .map(str::trim);
    if current.is_some_and(|cur| crate::plan::run_id_order(run_id, cur).is_le()) {
        return Ok(0);
    }
    let body = format!("{run_id}\n").into_bytes();
    let sent = body.len() as u64;
    object_store::ObjectStoreExt::put(target.client.as_ref(), key, body.into()).await?;
    Ok(sent)
}

/// The run's objects in upload order: data files, errors, manifest, and
/// for a complete run `_SUCCESS` and `latest`.
fn objects(manifest: &Manifest, run_id: &str) -> Vec<Object> {
    let at = |file: &'static str| vec![run_id.to_string(), file.to_string()];
    let listed = |file: &'static str| {
        manifest
            .outputs
            .iter()
            .find(|o| o.file == file)
            .map(|o| Object {
                file,
                key: at(file),
                sha256: Some(o.sha256.clone()),
            })
    };
    let mut objects: Vec<Object> = ["data.csv", "data.json", "data.ndjson", "data.parquet"]
        .into_iter()
        .filter_map(listed)
        .collect();
    objects.extend(listed("errors.ndjson"));
    objects.push(Object {
        file: "manifest.json",
        key: at("manifest.json"),
        sha256: None,
    });
    if manifest.state == RunState::Complete.as_str() {
        objects.push(Object {
            file: "_SUCCESS",
            key: at("_SUCCESS"),
            sha256: None,
        });
        objects.push(Object {
            file: "latest",
            key: vec!["latest".to_string()],
            sha256: None,
        });
    }
    objects
}

async fn read_manifest(dir: &Path) -> Result<Manifest, BucketError> {
    let path = dir.join("manifest.json");
    let read_error = |source| BucketError::Read {
        file: path.display().to_string(),
        source,
    };
    let bytes = tokio::fs::read(&path).await.map_err(read_error)?;
    serde_json::from_slice(&bytes).map_err(|e| read_error(std::io::Error::other(e)))
}

/// The run-end event's figures, from the manifest the run's files carry.
fn counts(manifest: &Manifest) -> crate::notify::Counts {
    crate::notify::Counts {
        inputs: manifest.inputs,
        rows: manifest.rows,
        error_rows: manifest.error_rows,
        malformed_rows: manifest.malformed_rows,
        chunks_failed: manifest
            .chunks
            .iter()
            .filter(|c| c.state != "downloaded")
            .count() as u64,
        credits_used: manifest.credits_used,
    }
}
