//! The loopback admin API (`docs/admin-api.md`): health, readiness, jobs, metrics, and
//! mutating calls guarded by the admin token. Reads come from the [`View`]
//! the daemon keeps, never from a walk of the store; actions go to the
//! supervisor as [`Command`]s, which stays the one owner of run state.
//!
//! Every local user can reach it, so it limits what a client can hold: a
//! header timeout, a cap on open connections (the oldest idle one makes way
//! for a new one), and a pause after a failed accept instead of a spin.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::clock::timestamp;
use crate::run::Context;
use crate::store::Store;

pub mod api;
mod metrics;
mod view;

use api::{ExpiryView, JobView, PauseView, ProviderView, Reply, RunRef, RunView, UploadView};
pub use view::View;
use view::{ChunkDigest, RunFigures};

/// What the admin API asks the supervisor to do.
#[derive(Debug)]
pub enum Command {
    /// Start a new run of the job's current file; answers the run id.
    Rerun {
        job: String,
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// Re-submit the failed chunks of the latest (or named) run.
    Retry {
        job: String,
        run: Option<String>,
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// Cancel the job's runs in progress.
    Cancel {
        job: String,
        reply: oneshot::Sender<Result<String, String>>,
    },
}

/// What the admin API reads besides the store.
pub struct AdminState {
    pub store: Store,
    /// The figures `/v1/jobs` and `/metrics` answer from.
    pub view: Arc<View>,
    pub answers: Answers,
    /// The provider accounts: their gates, clocks and call counts.
    pub accounts: Arc<crate::accounts::Accounts>,
    pub ready: AtomicBool,
    /// Re-read from `admin.token` on SIGHUP.
    pub token: std::sync::RwLock<String>,
    pub commands: mpsc::Sender<Command>,
    pub in_flight: Box<dyn Fn() -> Vec<(String, u32)> + Send + Sync>,
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

fn json_reply(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    reply(
        status,
        "application/json",
        serde_json::to_string(value).unwrap_or_default(),
    )
}

/// Creates the admin token file (mode 0600) if missing and returns the
/// token. A token file that group or others may read (someone changed its
/// mode) is set back to 0600, with a warning: anyone who read it could
/// cancel runs.
pub fn admin_token(state_dir: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let path = state_dir.join("admin.token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        if !t.trim().is_empty() {
            let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                tracing::warn!(file = %path.display(), mode = %format!("{mode:04o}"),
                    "the admin token was readable by group or others; its mode is 0600 again (consider deleting it for a new token)");
            }
            return Ok(t.trim().to_string());
        }
    }
    let token: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    crate::durable::write(&path, token.as_bytes(), 0o600)?;
    Ok(token)
}

/// How much the admin server lets local clients take (`docs/admin-api.md`).
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// A connection that has not sent a request's headers in this time is
    /// closed.
    pub header_timeout: Duration,
    /// Open connections at most.
    pub max_connections: usize,
}

impl ServerLimits {
    /// 10 s for headers; at most 256 connections, and never more than a
    /// quarter of the file descriptors the process may open, so the jobs
    /// scan, sled and downloads always have theirs.
    pub fn for_fd_limit(fd_limit: Option<u64>) -> ServerLimits {
        let quarter = fd_limit.map_or(256, |n| (n / 4).max(4));
        ServerLimits {
            header_timeout: Duration::from_secs(10),
            max_connections: quarter.min(256) as usize,
        }
    }
}

/// The open connections. When all places are taken, a new connection
/// closes the oldest one that is not answering a request (a client that
/// sent nothing or half a request, or an idle keep-alive), so a flood of
/// idle connections cannot lock `/healthz` out; only when every place is
/// answering a request does the server stop accepting until one finishes.
#[derive(Default)]
struct Connections {
    open: std::sync::Mutex<BTreeMap<u64, Conn>>,
    next: AtomicU64,
    closed: tokio::sync::Notify,
}

struct Conn {
    close: CancellationToken,
    /// Requests being answered on it.
    busy: Arc<AtomicUsize>,
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Conn>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until a new connection can have a place: one is free, or an
    /// idle one can be closed for it. A connection that finishes a request
    /// and stays open becomes idle without a word, so the check is also
    /// repeated every 100 ms.
    async fn room(&self, max: usize) {
        loop {
            let closed = self.closed.notified();
            {
                let open = self.lock();
                if open.len() < max || open.values().any(|c| c.busy.load(Ordering::Acquire) == 0) {
                    return;
                }
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), closed).await;
        }
    }

    /// Registers a new connection, closing the oldest idle one if all
    /// places are taken.
    fn add(&self, max: usize) -> (u64, CancellationToken, Arc<AtomicUsize>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let close = CancellationToken::new();
        let busy = Arc::new(AtomicUsize::new(0));
        let mut open = self.lock();
        while open.len() >= max {
            let idle = open
                .iter()
                .find(|(_, c)| c.busy.load(Ordering::Acquire) == 0)
                .map(|(id, _)| *id);
            match idle.and_then(|id| open.remove(&id)) {
                Some(evicted) => evicted.close.cancel(),
                None => break,
            }
        }
        open.insert(
            id,
            Conn {
                close: close.clone(),
                busy: busy.clone(),
            },
        );
        (id, close, busy)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
        self.closed.notify_waiters();
    }
}

/// Binds `listen`, writes `<state_dir>/admin.addr`, and serves until `stop`.
pub async fn serve(
    listen: SocketAddr,
    state_dir: PathBuf,
    state: Arc<AdminState>,
    limits: ServerLimits,
    stop: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    crate::sink::write_file(
        &state_dir.join("admin.addr"),
        format!("{addr}\n").as_bytes(),
    )?;
    tracing::info!(%addr, max_connections = limits.max_connections,
        header_timeout = ?limits.header_timeout, "admin API listening");
    let connections = Arc::new(Connections::default());
    // The caller keeps the handle and awaits it at shutdown.
    #[allow(clippy::disallowed_methods)]
    let server = tokio::spawn(async move {
        let mut pause = ACCEPT_PAUSE_MIN;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = connections.room(limits.max_connections) => {}
            }
            let stream = tokio::select! {
                _ = stop.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((s, _)) => {
                        pause = ACCEPT_PAUSE_MIN;
                        s
                    }
                    Err(e) => {
                        // Out of file descriptors (EMFILE, ENFILE) or
                        // memory: accepting again at once fails the same
                        // way and spins a core. Wait, longer each time.
                        tracing::warn!(error = %e, ?pause, "admin API cannot accept a connection; waiting");
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(pause) => {}
                        }
                        pause = (pause * 2).min(ACCEPT_PAUSE_MAX);
                        continue;
                    }
                },
            };
            let (id, close, busy) = connections.add(limits.max_connections);
            let (state, stop, connections) = (state.clone(), stop.clone(), connections.clone());
            // Counted by `connections`, which caps them; each ends with
            // its connection, its header timeout or the stop token.
            #[allow(clippy::disallowed_methods)]
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    let busy = Busy::new(busy.clone());
                    async move {
                        let answer = route(&state, req).await;
                        drop(busy);
                        Ok::<_, Infallible>(answer)
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(limits.header_timeout)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    _ = conn => {}
                    _ = close.cancelled() => {}
                    _ = stop.cancelled() => {}
                }
                connections.remove(id);
            });
        }
    });
    Ok(server)
}

const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(100);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// Marks a connection busy while a request on it is answered.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(count: Arc<AtomicUsize>) -> Busy {
        count.fetch_add(1, Ordering::AcqRel);
        Busy(count)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Raises this process's soft limit on open files to its hard limit and
/// returns the limit in force (`None` where it cannot be read).
pub fn raise_fd_limit() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{getrlimit, setrlimit, Resource};
        let limit = getrlimit(Resource::Nofile);
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if limit.current != limit.maximum && setrlimit(Resource::Nofile, raised).is_ok() {
            return limit.maximum;
        }
        limit.current
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

async fn route(state: &AdminState, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["healthz"]) => reply(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, ["readyz"]) => {
            if state.ready.load(Ordering::Relaxed) {
                reply(StatusCode::OK, "text/plain", "ready\n")
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "resuming\n")
            }
        }
        (&Method::GET, ["metrics"]) => match metrics::metrics(state).await {
            Ok(text) => reply(StatusCode::OK, metrics::CONTENT_TYPE, text),
            Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e),
        },
        (&Method::GET, ["v1", "jobs"]) => match all_jobs(state).await {
            Ok(body) => reply(StatusCode::OK, "application/json", body),
            Err(e) => json_reply(StatusCode::INTERNAL_SERVER_ERROR, &Reply::error(e)),
        },
        (&Method::GET, ["v1", "jobs", job]) => match one_job(state, job).await {
            Ok(Some(j)) => json_reply(StatusCode::OK, &j),
            Ok(None) => json_reply(
                StatusCode::NOT_FOUND,
                &Reply::error(format!("no job '{job}'")),
            ),
            Err(e) => json_reply(StatusCode::INTERNAL_SERVER_ERROR, &Reply::error(e)),
        },
        (&Method::POST, ["v1", "jobs", job, action]) => {
            let authorised = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(bearer_token)
                .is_some_and(|t| {
                    let token = state.token.read().unwrap_or_else(|e| e.into_inner());
                    constant_time_eq(t.as_bytes(), token.as_bytes())
                });
            if !authorised {
                return json_reply(
                    StatusCode::UNAUTHORIZED,
                    &Reply::error("needs Authorization: Bearer <the token in admin.token>"),
                );
            }
            let run = req
                .uri()
                .query()
                .and_then(|q| form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "run"))
                .map(|(_, v)| v.into_owned());
            let (tx, rx) = oneshot::channel();
            let job = job.to_string();
            let command = match *action {
                "rerun" => Command::Rerun { job, reply: tx },
                "retry" => Command::Retry {
                    job,
                    run,
                    reply: tx,
                },
                "cancel" => Command::Cancel { job, reply: tx },
                other => {
                    return json_reply(
                        StatusCode::NOT_FOUND,
                        &Reply::error(format!("no action '{other}'")),
                    );
                }
            };
            let sent = state.commands.send(command).await;
            match (sent, rx.await) {
                (Ok(()), Ok(Ok(done))) => json_reply(StatusCode::OK, &Reply::done(done)),
                (Ok(()), Ok(Err(e))) => json_reply(StatusCode::CONFLICT, &Reply::error(e)),
                _ => json_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &Reply::error("the daemon is stopping"),
                ),
            }
        }
        _ => json_reply(StatusCode::NOT_FOUND, &Reply::error("not found")),
    }
}

/// The token of an `Authorization: Bearer <token>` header; the scheme's
/// case does not matter (RFC 7235).
fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The context that drives runs of `kind`.
fn context_of(contexts: &[Arc<Context>], kind: crate::spec::ProviderKind) -> Option<&Arc<Context>> {
    contexts.iter().find(|c| c.provider.kind() == kind)
}

fn run_view(contexts: &[Arc<Context>], run: &RunFigures, chunks: &ChunkDigest) -> RunView {
    let ctx = context_of(contexts, run.provider);
    let mut view = RunView {
        run_id: run.run_id.clone(),
        state: run.state.as_str().to_string(),
        chunks_total: run.chunks_total,
        chunks: chunks
            .counts
            .iter()
            .map(|(s, n)| (s.to_string(), *n))
            .collect(),
        inputs: run.inputs,
        rows: chunks.rows,
        started_at: timestamp(run.started_at),
        finished_at: run.finished_at.map(timestamp),
        last_error: chunks.last_error.clone(),
        credits_used: chunks.credits_used,
        expiry: None,
        upload: run.upload.as_ref().map(|u| UploadView {
            state: if u.error.is_some() {
                "failing"
            } else {
                "uploading"
            }
            .into(),
            to: ctx
                .and_then(|c| c.bucket.as_ref())
                .map_or_else(String::new, |b| b.url.to_string()),
            objects_done: u.done.len() as u32,
            error: u.error.clone(),
            failing_since: u.failing_since.map(timestamp),
        }),
    };
    if let Some(ctx) = ctx {
        let mut earliest = None;
        for (&chunk, &expires_at) in &chunks.ready {
            let (left, level) = ctx.expiry(expires_at);
            if earliest.is_none_or(|e| left < e) {
                earliest = Some(left);
                view.expiry = Some(ExpiryView {
                    expires_at: timestamp(expires_at),
                    seconds_left: left / 1000,
                    level: level.as_str().to_string(),
                    chunk,
                });
            }
        }
    }
    view
}

/// Every job (or one): state, latest run, schedule, problems. Built from
/// the view's figures as they are now; takes time in proportion to the
/// jobs, so it runs on the blocking pool.
fn job_views(view: &View, contexts: &[Arc<Context>], only: Option<&str>) -> Vec<JobView> {
    let figures = view.jobs_now(only);
    let mut jobs = Vec::with_capacity(figures.len());
    for job in figures {
        let latest = job
            .runs
            .iter()
            .max_by(|a, b| crate::plan::run_id_order(&a.run_id, &b.run_id));
        let latest_view = latest.map(|r| {
            run_view(
                contexts,
                r,
                job.latest_chunks
                    .as_ref()
                    .unwrap_or(&ChunkDigest::default()),
            )
        });
        let state_word = if !job.problems.is_empty() {
            "invalid".to_string()
        } else {
            latest_view
                .as_ref()
                .map_or("idle".to_string(), |r| r.state.clone())
        };
        // The list leaves each job's runs out; one job's answer has them.
        let runs = only.is_some().then(|| {
            job.runs
                .iter()
                .map(|r| RunRef {
                    run_id: r.run_id.clone(),
                    state: r.state.as_str().to_string(),
                })
                .collect()
        });
        jobs.push(JobView {
            job: job.name.clone(),
            provider: latest.map(|r| r.provider.as_str().to_string()),
            state: state_word,
            problems: job.problems.clone(),
            latest_run: latest_view,
            runs,
            schedule: job.schedule.as_ref().map(|s| s.0.clone()),
            next_due: job.schedule.as_ref().map(|s| timestamp(s.1)),
        });
    }
    jobs
}

/// The providers and what holds their calls back.
fn provider_views(contexts: &[Arc<Context>]) -> Vec<ProviderView> {
    contexts
        .iter()
        .map(|c| ProviderView {
            provider: c.provider.kind().as_str().to_string(),
            blocked: c.gate.blocked().map(|b| b.reason),
            paused: c.gate.paused().map(|p| PauseView {
                reason: p.reason,
                seconds_left: p.left.as_secs(),
            }),
        })
        .collect()
}

/// How answers built from the view are shared: one is built at a time,
/// and the full job list is reused while the figures have not changed.
#[derive(Default)]
pub struct Answers {
    /// One answer is built at a time, so a flood of requests takes one
    /// blocking thread, never every core from the daemon's work.
    building: tokio::sync::Mutex<()>,
    /// The last `/v1/jobs` job list and what it was built from.
    jobs: std::sync::Mutex<Option<JobsAnswer>>,
}

#[derive(Clone)]
struct JobsAnswer {
    /// The view's generation it was built at.
    generation: u64,
    at: std::time::Instant,
    /// Each provider's clock then: expiry is judged on it, and it can jump
    /// (it follows the provider's `Date` header).
    clocks: Vec<i64>,
    json: Arc<String>,
}

/// A reused job list is at most this old, on our clock and on every
/// provider's, so the time-derived fields (an expiry's level and seconds
/// left) stay current.
const JOBS_ANSWER_REUSE: Duration = Duration::from_secs(1);

/// `GET /v1/jobs`: every job, and provider blocks.
async fn all_jobs(state: &AdminState) -> Result<String, String> {
    let _building = state.answers.building.lock().await;
    let generation = state.view.generation();
    let clocks: Vec<i64> = state
        .accounts
        .per_kind()
        .iter()
        .map(|c| c.provider.now_ms())
        .collect();
    let cached = state
        .answers
        .jobs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let reuse = cached.filter(|c| {
        let limit = crate::clock::millis(JOBS_ANSWER_REUSE);
        c.generation == generation
            && c.at.elapsed() < JOBS_ANSWER_REUSE
            && c.clocks.len() == clocks.len()
            && c.clocks
                .iter()
                .zip(&clocks)
                .all(|(a, b)| (b - a).abs() < limit)
    });
    let jobs = match reuse {
        Some(c) => c.json,
        None => {
            state.view.load_latest(&state.store, None).await?;
            let (view, contexts) = (state.view.clone(), state.accounts.per_kind());
            let json = tokio::task::spawn_blocking(move || {
                serde_json::to_string(&job_views(&view, &contexts, None)).unwrap_or_default()
            })
            .await
            .map_err(|e| e.to_string())?;
            let json = Arc::new(json);
            *state.answers.jobs.lock().unwrap_or_else(|e| e.into_inner()) = Some(JobsAnswer {
                generation,
                at: std::time::Instant::now(),
                clocks,
                json: json.clone(),
            });
            json
        }
    };
    // The job list is kept as text to be reused; the providers are
    // current at every answer.
    let providers =
        serde_json::to_string(&provider_views(&state.accounts.per_kind())).unwrap_or_default();
    let undelivered = match state.accounts.notify.undelivered() {
        Some(u) => format!(
            ",\"undelivered\":{}",
            serde_json::to_string(&u).unwrap_or_default()
        ),
        None => String::new(),
    };
    Ok(format!(
        "{{\"jobs\":{jobs},\"providers\":{providers}{undelivered}}}"
    ))
}

/// `GET /v1/jobs/{job}`: one job with its runs, if the daemon knows it.
async fn one_job(state: &AdminState, job: &str) -> Result<Option<JobView>, String> {
    let _building = state.answers.building.lock().await;
    state.view.load_latest(&state.store, Some(job)).await?;
    Ok(
        job_views(&state.view, &state.accounts.per_kind(), Some(job))
            .into_iter()
            .next(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for header in ["Bearer t0k", "bearer t0k", "BEARER  t0k ", "bEaReR t0k"] {
            assert_eq!(bearer_token(header), Some("t0k"), "{header}");
        }
        for header in ["Basic t0k", "Bearert0k", "t0k", "Bearer"] {
            assert_eq!(bearer_token(header), None, "{header}");
        }
    }

    #[test]
    fn the_connection_cap_stays_well_under_the_descriptor_limit() {
        assert_eq!(ServerLimits::for_fd_limit(Some(1024)).max_connections, 256);
        assert_eq!(
            ServerLimits::for_fd_limit(Some(524_288)).max_connections,
            256
        );
        assert_eq!(ServerLimits::for_fd_limit(Some(128)).max_connections, 32);
        assert_eq!(
            ServerLimits::for_fd_limit(None).header_timeout,
            Duration::from_secs(10)
        );
    }
}
