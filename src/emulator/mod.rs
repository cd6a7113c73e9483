//! The built-in fake of the provider APIs (`docs/emulator.md`), written from
//! `providers/*.md` and sharing no request or response code with the
//! clients, so a client bug cannot hide behind the same bug here.
//!
//! It speaks HTTP/1.1 through hyper directly: faults such as a dropped
//! connection, a lost acknowledgement or a cut body must reach the client as
//! they would from the real network. Time is the emulator's own clock, which
//! tests advance instead of waiting. `GET /_emulator/ledger` lists every
//! accepted (billed) trigger.

mod firecrawl;
pub mod scenario;
mod scraper_studio;
mod web_scraper;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use scenario::Scenario;
use scenario::{Fault, FaultKind};

pub const DEMO_BRIGHTDATA_TOKEN: &str = "demo-brightdata-token";
pub const DEMO_FIRECRAWL_TOKEN: &str = "fc-demo-firecrawl-token";

type Body = BoxBody<Bytes, std::io::Error>;

/// What a handler answers: a response, or a dropped connection.
pub(crate) enum Reply {
    Response(Response<Body>),
    /// Close the connection without answering (after the work was done, for
    /// a lost acknowledgement).
    Drop,
}

/// Returned to hyper to make it close the connection without a response.
#[derive(Debug)]
struct Dropped;
impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by the emulator")
    }
}
impl std::error::Error for Dropped {}

/// One accepted trigger: something the customer pays for.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct LedgerEntry {
    pub provider: String,
    pub remote_id: String,
    pub key: String,
    pub inputs: u64,
    pub name: Option<String>,
    /// Emulator clock, ms since the epoch.
    pub time: i64,
    /// The trigger's query parameters (Firecrawl: its body fields).
    #[serde(default)]
    pub params: BTreeMap<String, String>,
}

/// Counters a test can assert on.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Stats {
    /// Requests by endpoint.
    pub requests: BTreeMap<String, u64>,
    /// 429 answers sent.
    pub rate_limited: u64,
    /// Requests that arrived while a `Retry-After` the client had already
    /// received was still running.
    pub early_requests: u64,
    /// The most 429 answers in any 5-minute window.
    pub max_429_in_5min: u64,
    /// Whether the client got itself banned (25 × 429 in 5 minutes).
    pub banned: bool,
    /// Per key: collections triggered and not yet served whole, now.
    pub in_flight: BTreeMap<String, u64>,
    /// Per key: the most collections ever in flight at once.
    pub max_in_flight: BTreeMap<String, u64>,
    /// The most requests that arrived within any one second.
    pub max_requests_per_second: u64,
}

/// One Scraper Studio collection's life, on the emulator's clock (ms).
#[derive(Debug, Clone)]
pub struct Collection {
    pub id: String,
    pub key: String,
    pub triggered_ms: i64,
    /// When it was (or will be) done.
    pub ready_ms: i64,
    /// Status questions asked about it, ready or not.
    pub status_polls: u32,
    /// When its dataset was first sent with its rows.
    pub fetched_ms: Option<i64>,
}

struct RateState {
    /// Requests before this instant (and after `grace_from`) are too early.
    not_before: Option<(Instant, Instant)>,
    recent: VecDeque<Instant>,
}

pub(crate) struct State {
    pub(crate) scenario: Scenario,
    offset_ms: AtomicI64,
    pub(crate) jobs: Mutex<HashMap<String, scraper_studio::Job>>,
    pub(crate) snapshots: Mutex<HashMap<String, web_scraper::Snapshot>>,
    pub(crate) batches: Mutex<HashMap<String, firecrawl::Batch>>,
    /// Firecrawl v1 idempotency keys seen.
    pub(crate) idempotency: Mutex<std::collections::HashSet<String>>,
    /// Firecrawl credits left (`None`: unlimited).
    pub(crate) credits: Mutex<Option<u64>>,
    ledger: Mutex<Vec<LedgerEntry>>,
    ledger_len: watch::Sender<usize>,
    /// Bumped at every request's arrival, for tests that wait on stats.
    arrivals: watch::Sender<u64>,
    pub(crate) rng: Mutex<StdRng>,
    fault_counts: Mutex<Vec<u64>>,
    stats: Mutex<Stats>,
    rate: Mutex<RateState>,
    /// Arrivals within the last second, for `max_requests_per_second`.
    last_second: Mutex<VecDeque<Instant>>,
}

const BAN_AFTER: usize = 25;
const BAN_WINDOW: Duration = Duration::from_secs(300);

impl State {
    /// The emulator's clock: real time plus whatever tests advanced it by.
    pub(crate) fn now_ms(&self) -> i64 {
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as i64;
        real + self.offset_ms.load(Ordering::Relaxed)
    }

    pub(crate) fn random_id(&self, prefix: &str) -> String {
        const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        let tail: String = (0..17)
            .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
            .collect();
        format!("{prefix}{tail}")
    }

    /// A collection for `key` starts (+1) or has been served whole (-1).
    pub(crate) fn in_flight(&self, key: &str, delta: i64) {
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let now = s.in_flight.entry(key.to_string()).or_default();
        *now = now.saturating_add_signed(delta);
        let now = *now;
        let max = s.max_in_flight.entry(key.to_string()).or_default();
        *max = (*max).max(now);
    }

    pub(crate) fn bill(&self, entry: LedgerEntry) {
        let mut ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        ledger.push(entry);
        self.ledger_len.send_replace(ledger.len());
    }

    fn count(&self, endpoint: &str) {
        let now = Instant::now();
        let in_last_second = {
            let mut recent = self.last_second.lock().unwrap_or_else(|e| e.into_inner());
            while recent
                .front()
                .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
            {
                recent.pop_front();
            }
            recent.push_back(now);
            recent.len() as u64
        };
        {
            let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
            *s.requests.entry(endpoint.to_string()).or_default() += 1;
            s.max_requests_per_second = s.max_requests_per_second.max(in_last_second);
        }
        self.arrivals.send_modify(|n| *n += 1);
    }

    /// The first fault that applies to this request, if any.
    fn fault_for(&self, endpoint: &str, key: Option<&str>) -> Option<Fault> {
        let faults = &self.scenario.faults;
        let mut counts = self.fault_counts.lock().unwrap_or_else(|e| e.into_inner());
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        for (i, fault) in faults.iter().enumerate() {
            if fault.endpoint != "any" && fault.endpoint != endpoint {
                continue;
            }
            if fault.key.is_some() && fault.key.as_deref() != key {
                continue;
            }
            let n = counts[i];
            counts[i] += 1;
            let by_count = n >= fault.skip && n < fault.skip + fault.first;
            let by_chance = fault.probability > 0.0 && rng.random::<f64>() < fault.probability;
            if by_count || by_chance {
                return Some(fault.clone());
            }
        }
        None
    }
}

/// A running emulator.
pub struct Emulator {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Emulator {
    /// Serves on `listen` (port 0 picks a free port) until dropped or stopped.
    pub async fn start(listen: SocketAddr, scenario: Scenario) -> std::io::Result<Emulator> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let credits = scenario.firecrawl.credits;
        let state = Arc::new(State {
            rng: Mutex::new(StdRng::seed_from_u64(scenario.seed)),
            fault_counts: Mutex::new(vec![0; scenario.faults.len()]),
            scenario,
            offset_ms: AtomicI64::new(0),
            jobs: Mutex::new(HashMap::new()),
            snapshots: Mutex::new(HashMap::new()),
            batches: Mutex::new(HashMap::new()),
            idempotency: Mutex::new(std::collections::HashSet::new()),
            credits: Mutex::new(credits),
            ledger: Mutex::new(Vec::new()),
            ledger_len: watch::channel(0).0,
            arrivals: watch::channel(0).0,
            stats: Mutex::new(Stats::default()),
            rate: Mutex::new(RateState {
                not_before: None,
                recent: VecDeque::new(),
            }),
            last_second: Mutex::new(VecDeque::new()),
        });
        let stop = CancellationToken::new();
        // Kept in `Emulator` and awaited by `stop`.
        #[allow(clippy::disallowed_methods)]
        let task = tokio::spawn(serve(listener, state.clone(), stop.clone()));
        Ok(Emulator {
            addr,
            state,
            stop,
            task: Some(task),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ledger(&self) -> Vec<LedgerEntry> {
        self.state
            .ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until the ledger holds at least `n` entries.
    pub async fn wait_for_ledger(&self, n: usize, timeout: Duration) -> Result<(), String> {
        let mut rx = self.state.ledger_len.subscribe();
        let reached = tokio::time::timeout(timeout, async {
            rx.wait_for(|len| *len >= n).await.is_ok()
        })
        .await;
        match reached {
            Ok(true) => Ok(()),
            _ => Err(format!(
                "ledger has {} entries, wanted {n}",
                *self.state.ledger_len.borrow()
            )),
        }
    }

    /// Waits until `done(stats)` holds, checking at every request's arrival.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        done: impl Fn(&Stats) -> bool,
    ) -> Result<(), String> {
        let mut rx = self.state.arrivals.subscribe();
        let reached = tokio::time::timeout(timeout, async {
            loop {
                if done(&self.stats()) {
                    return true;
                }
                if rx.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await;
        match reached {
            Ok(true) => Ok(()),
            _ => Err(format!("condition not reached; stats: {:?}", self.stats())),
        }
    }

    pub fn stats(&self) -> Stats {
        self.state
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every Scraper Studio collection so far: when it was triggered and
    /// ready, how often its status was asked, when it was fetched.
    pub fn collections(&self) -> Vec<Collection> {
        scraper_studio::report(&self.state)
    }

    /// Sets the Firecrawl credit balance (`None`: unlimited), as a top-up would.
    pub fn set_firecrawl_credits(&self, credits: Option<u64>) {
        *self.state.credits.lock().unwrap_or_else(|e| e.into_inner()) = credits;
    }

    /// Moves the emulator's clock forward.
    pub fn advance(&self, by: Duration) {
        self.state
            .offset_ms
            .fetch_add(by.as_millis() as i64, Ordering::Relaxed);
    }

    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve(listener: TcpListener, state: Arc<State>, stop: CancellationToken) {
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "emulator: accept failed");
                    continue;
                }
            },
        };
        let state = state.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move {
                    match handle(&state, req).await {
                        Reply::Response(mut r) => {
                            // Every answer dates itself on the emulator's
                            // clock, as a real server does on its own.
                            let now =
                                UNIX_EPOCH + Duration::from_millis(state.now_ms().max(0) as u64);
                            if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(now)) {
                                r.headers_mut().insert(http::header::DATE, v);
                            }
                            Ok(r)
                        }
                        Reply::Drop => Err(Dropped),
                    }
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
    connections.close();
}

pub(crate) fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    Reply::Response(r)
}

pub(crate) fn text(status: StatusCode, body: &str) -> Reply {
    full(status, "text/plain; charset=utf-8", body.to_string())
}

pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> Reply {
    full(status, "application/json", value.to_string())
}

pub(crate) fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

/// Bright Data's three 401 texts (brightdata.md §1).
fn check_auth(state: &State, req: &Request<Incoming>) -> Option<Reply> {
    let Some(header) = req.headers().get(http::header::AUTHORIZATION) else {
        return Some(text(StatusCode::UNAUTHORIZED, "Credentials are missing"));
    };
    let header = header.to_str().unwrap_or_default();
    let Some(token) = header.strip_prefix("Bearer ") else {
        return Some(text(
            StatusCode::UNAUTHORIZED,
            "Auth method is not supported",
        ));
    };
    if !state.scenario.tokens.iter().any(|t| t == token.trim()) {
        if state.scenario.auth_error_json {
            return Some(json(
                StatusCode::UNAUTHORIZED,
                &serde_json::json!({"error": "User authentication is required"}),
            ));
        }
        return Some(text(StatusCode::UNAUTHORIZED, "Invalid credentials"));
    }
    None
}

/// The three APIs the emulator serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    ScraperStudio,
    WebScraper,
    Firecrawl,
}

fn route(method: &Method, path: &str) -> Option<(Api, &'static str)> {
    scraper_studio::endpoint_of(method, path)
        .map(|e| (Api::ScraperStudio, e))
        .or_else(|| web_scraper::endpoint_of(method, path).map(|e| (Api::WebScraper, e)))
        .or_else(|| firecrawl::endpoint_of(method, path).map(|e| (Api::Firecrawl, e)))
}

async fn handle(state: &Arc<State>, req: Request<Incoming>) -> Reply {
    let path = req.uri().path().to_string();
    if let Some(reply) = control(state, &req, &path) {
        return reply;
    }
    let routed = route(req.method(), &path);
    let endpoint = routed.map(|(_, e)| e);
    state.count(endpoint.unwrap_or("unknown"));
    note_arrival(state);
    if state.stats.lock().map(|s| s.banned).unwrap_or(false) {
        return text(
            StatusCode::FORBIDDEN,
            "Your IP is blocked after too many rate-limited requests",
        );
    }
    let Some((api, endpoint)) = routed else {
        return text(StatusCode::NOT_FOUND, "Not found");
    };
    let refused = match api {
        Api::Firecrawl => firecrawl::check_auth(state, &req),
        _ => check_auth(state, &req),
    };
    if let Some(reply) = refused {
        return reply;
    }
    let key = match api {
        Api::ScraperStudio => scraper_studio::key_of(state, &req, endpoint),
        Api::WebScraper => web_scraper::key_of(state, &req, endpoint),
        Api::Firecrawl => Some(firecrawl::ACCOUNT.to_string()),
    };
    let fault = state.fault_for(endpoint, key.as_deref());
    match fault.as_ref().map(|f| f.kind) {
        Some(FaultKind::Status) => return fault_status(fault.as_ref()),
        Some(FaultKind::RateLimit) => {
            return rate_limit(state, fault.as_ref(), api == Api::Firecrawl)
        }
        Some(FaultKind::Reset) => return Reply::Drop,
        Some(FaultKind::Endless) => {
            let delay = fault.as_ref().map_or(Duration::ZERO, |f| f.delay);
            return endless(endpoint, delay);
        }
        Some(FaultKind::BrdError) => {
            let status = fault
                .as_ref()
                .and_then(|f| StatusCode::from_u16(f.status).ok())
                .unwrap_or(StatusCode::BAD_GATEWAY);
            let mut reply = full(status, "text/plain", "");
            if let Reply::Response(r) = &mut reply {
                r.headers_mut().insert(
                    "x-brd-error",
                    http::HeaderValue::from_static("Proxy Error: upstream connection refused"),
                );
            }
            return reply;
        }
        Some(FaultKind::Html) => {
            return full(
                StatusCode::OK,
                "text/html",
                "<html><head><title>Error</title></head><body>Service temporarily unavailable</body></html>",
            )
        }
        Some(FaultKind::Slow) => {
            if let Some(f) = &fault {
                tokio::time::sleep(f.delay).await;
            }
        }
        _ => {}
    }
    let reply = match api {
        Api::ScraperStudio => scraper_studio::handle(state, req, endpoint).await,
        Api::WebScraper => web_scraper::handle(state, req, endpoint).await,
        Api::Firecrawl => firecrawl::handle(state, req, endpoint).await,
    };
    match (fault.map(|f| (f.kind, f.delay)), reply) {
        (Some((FaultKind::LostAck, _)), _) => Reply::Drop,
        (Some((FaultKind::Truncate, _)), Reply::Response(r)) => Reply::Response(cut(r, None)),
        (Some((FaultKind::Stall, delay)), Reply::Response(r)) => {
            Reply::Response(cut(r, Some(delay)))
        }
        (_, reply) => reply,
    }
}

/// `/_emulator/…`: the test and demo controls. No auth: loopback only.
fn control(state: &State, req: &Request<Incoming>, path: &str) -> Option<Reply> {
    let rest = path.strip_prefix("/_emulator/")?;
    Some(match (req.method(), rest) {
        (&Method::GET, "ledger") => {
            let ledger = state
                .ledger
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            json(
                StatusCode::OK,
                &serde_json::to_value(ledger).unwrap_or_default(),
            )
        }
        (&Method::GET, "stats") => {
            let stats = state
                .stats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            json(
                StatusCode::OK,
                &serde_json::to_value(stats).unwrap_or_default(),
            )
        }
        (&Method::POST, "clock") => match query(req)
            .get("advance")
            .map(|a| humantime::parse_duration(a))
        {
            Some(Ok(d)) => {
                state
                    .offset_ms
                    .fetch_add(d.as_millis() as i64, Ordering::Relaxed);
                json(
                    StatusCode::OK,
                    &serde_json::json!({ "now": state.now_ms() }),
                )
            }
            _ => text(StatusCode::BAD_REQUEST, "advance=<duration> is required"),
        },
        _ => text(StatusCode::NOT_FOUND, "Not found"),
    })
}

fn note_arrival(state: &State) {
    let now = Instant::now();
    let rate = state.rate.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((grace_from, not_before)) = rate.not_before {
        if now > grace_from && now < not_before {
            state
                .stats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .early_requests += 1;
        }
    }
}

fn fault_status(fault: Option<&Fault>) -> Reply {
    let Some(f) = fault else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error");
    };
    let status = StatusCode::from_u16(f.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    match f.body.as_str() {
        "empty" => full(status, "text/plain", ""),
        "text" => text(status, "Internal server error"),
        _ => full(
            status,
            "text/html",
            format!(
                "<html><head><title>{status}</title></head><body><h1>{status}</h1></body></html>"
            ),
        ),
    }
}

/// A 429. Bright Data: `Retry-After` in seconds, as a date, or none.
/// Firecrawl: the wait only in the message (`seconds`, its real form), the
/// message plus a header (`header`), or neither (`none`).
fn rate_limit(state: &State, fault: Option<&Fault>, firecrawl: bool) -> Reply {
    let secs = fault.map_or(1, |f| f.retry_after_secs);
    let form = fault.map_or("seconds", |f| f.retry_after.as_str());
    let now = Instant::now();
    // A hostile provider's header, sent as it is; the emulator counts no
    // request as early against it.
    if let Some(raw) = fault.and_then(|f| f.retry_after_header.clone()) {
        let Reply::Response(mut r) = text(StatusCode::TOO_MANY_REQUESTS, "Too many requests")
        else {
            return Reply::Drop;
        };
        if let Ok(h) = HeaderValue::from_str(&raw) {
            r.headers_mut().insert(http::header::RETRY_AFTER, h);
        }
        state
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .rate_limited += 1;
        return Reply::Response(r);
    }
    let mut header = None;
    let mut until = None;
    let mut body = "Too many requests".to_string();
    match form {
        "none" if firecrawl => {
            body = json!({"success": false, "error": "Rate limit exceeded."}).to_string()
        }
        "none" => {}
        _ if firecrawl => {
            body = firecrawl::rate_limit_body(secs);
            until = now.checked_add(Duration::from_secs(secs));
            if form == "header" {
                header = Some(secs.to_string());
            }
        }
        "date" => {
            // An HTTP date has whole seconds: the wait ends at the advertised
            // second, which is what a careful client can know.
            let at = SystemTime::now() + Duration::from_secs(secs);
            let whole = UNIX_EPOCH
                + Duration::from_secs(at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs());
            let remaining = whole.duration_since(SystemTime::now()).unwrap_or_default();
            header = Some(httpdate::fmt_http_date(whole));
            until = Some(now + remaining);
        }
        _ => {
            header = Some(secs.to_string());
            until = now.checked_add(Duration::from_secs(secs));
        }
    }
    {
        let mut rate = state.rate.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(until) = until {
            rate.not_before = Some((now + state.scenario.retry_after_slack, until));
        }
        rate.recent.push_back(now);
        while rate
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > BAN_WINDOW)
        {
            rate.recent.pop_front();
        }
        let mut stats = state.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats.rate_limited += 1;
        stats.max_429_in_5min = stats.max_429_in_5min.max(rate.recent.len() as u64);
        if rate.recent.len() >= BAN_AFTER {
            stats.banned = true;
        }
    }
    let content_type = if firecrawl {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    let Reply::Response(mut r) = full(StatusCode::TOO_MANY_REQUESTS, content_type, body) else {
        return Reply::Drop;
    };
    if let Some(h) = header.and_then(|h| HeaderValue::from_str(&h).ok()) {
        r.headers_mut().insert(http::header::RETRY_AFTER, h);
    }
    Reply::Response(r)
}

/// Cuts the body inside its first frame of two bytes or more: sends the
/// first half, then either stalls for `stall` and sends the rest, or (no
/// stall) drops the connection — a body cut short.
fn cut(response: Response<Body>, stall: Option<Duration>) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    parts.headers.remove(http::header::CONTENT_LENGTH);
    // Frames still to send after the cut, ahead of the rest of the body.
    let state = (
        body,
        VecDeque::<Result<Bytes, std::io::Error>>::new(),
        false,
    );
    let stream =
        futures::stream::unfold(state, move |(mut body, mut queued, mut done)| async move {
            if let Some(item) = queued.pop_front() {
                // Pending for a moment makes hyper flush what it has, so the
                // client holds the headers and half a body when the cut comes.
                tokio::time::sleep(stall.unwrap_or(Duration::from_millis(50))).await;
                return Some((item.map(Frame::data), (body, queued, done)));
            }
            let frame = match body.frame().await? {
                Ok(f) => f,
                Err(e) => return Some((Err(e), (body, queued, done))),
            };
            let data = match frame.into_data() {
                Ok(d) => d,
                Err(frame) => return Some((Ok(frame), (body, queued, done))),
            };
            if done || data.len() < 2 {
                return Some((Ok(Frame::data(data)), (body, queued, done)));
            }
            done = true;
            let half = data.len() / 2;
            match stall {
                Some(_) => queued.push_back(Ok(data.slice(half..))),
                None => queued.push_back(Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "cut",
                ))),
            }
            Some((Ok(Frame::data(data.slice(..half))), (body, queued, done)))
        });
    Response::from_parts(parts, BoxBody::new(http_body_util::StreamBody::new(stream)))
}

/// A 200 whose body never ends: for a dataset endpoint, rows (a JSON
/// array for Scraper Studio, NDJSON for the Web Scraper API); for any other
/// endpoint, a status object that never closes. Pieces of 64 KiB, `delay`
/// apart.
fn endless(endpoint: &str, delay: Duration) -> Reply {
    const PIECE: usize = 64 * 1024;
    let (head, unit): (&[u8], &[u8]) = match endpoint {
        "dataset" => (
            b"[",
            br#"{"url":"https://endless.example/","title":"again"},"#,
        ),
        "v3_snapshot" => (
            b"",
            b"{\"url\":\"https://endless.example/\",\"title\":\"again\"}\n",
        ),
        _ => (br#"{"status":"running","padding":""#, b"x"),
    };
    let mut piece = Vec::with_capacity(PIECE + unit.len());
    while piece.len() < PIECE {
        piece.extend_from_slice(unit);
    }
    let piece = Bytes::from(piece);
    let first = Bytes::from_static(head);
    let stream = futures::stream::unfold(0u64, move |n| {
        let (first, piece) = (first.clone(), piece.clone());
        async move {
            if n > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let data = if n == 0 { first } else { piece };
            Some((Ok::<_, std::io::Error>(Frame::data(data)), n + 1))
        }
    });
    let mut r = Response::new(BoxBody::new(http_body_util::StreamBody::new(stream)));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Reply::Response(r)
}

/// A path segment with its `%XX` escapes decoded (ids arrive encoded).
pub(crate) fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The bytes of a malformed row; a `huge` one of `huge_bytes` is built whole
/// here (Scraper Studio streams its own instead).
pub(crate) fn malformed_row(
    kind: scenario::MalformedRow,
    url_json: &str,
    huge_bytes: usize,
) -> Vec<u8> {
    use scenario::MalformedRow as M;
    let mut row = format!("{{\"url\":{url_json},\"title\":\"").into_bytes();
    match kind {
        M::InvalidUtf8 => row.extend_from_slice(b"caf\xe9 \xff\xfe\"}"),
        M::ControlChar => row.extend_from_slice(b"tab\x01here\"}"),
        M::DeepNesting => {
            row.extend_from_slice(b"deep\",\"nest\":");
            row.extend_from_slice(&[b'['; 200]);
            row.extend_from_slice(&[b']'; 200]);
            row.push(b'}');
        }
        M::Huge => {
            row.extend_from_slice(b"huge\",\"body\":\"");
            row.resize(row.len() + huge_bytes, b'x');
            row.extend_from_slice(b"\"}");
        }
    }
    row
}

/// An RFC 3339 time of the emulator's clock, with milliseconds.
pub(crate) fn iso(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Why a Bright Data trigger body holds no list of inputs.
pub(crate) enum BodyError {
    NotAList,
    Parse(String),
}

impl BodyError {
    /// The answer: `not_a_list` as text, or the documented `parse_error`.
    pub(crate) fn reply(self, not_a_list: &str) -> Reply {
        match self {
            BodyError::NotAList => text(StatusCode::BAD_REQUEST, not_a_list),
            BodyError::Parse(e) => json(
                StatusCode::BAD_REQUEST,
                &json!({"error": format!("Parser cannot parse input: {e}"), "code": "parse_error"}),
            ),
        }
    }
}

/// Both Bright Data APIs take a JSON array of inputs, or the same wrapped
/// as `{"input": [...], "deliver": {...}}` (request-level delivery).
pub(crate) fn brightdata_inputs(body: &[u8]) -> Result<Vec<serde_json::Value>, BodyError> {
    use serde_json::Value;
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(items)) => Ok(items),
        Ok(Value::Object(mut o)) => match o.remove("input") {
            Some(Value::Array(items)) => Ok(items),
            _ => Err(BodyError::NotAList),
        },
        Ok(_) => Err(BodyError::NotAList),
        Err(e) => Err(BodyError::Parse(e.to_string())),
    }
}

/// The `n`-th segment of the request's path (from 0), e.g. the id in
/// `/datasets/v3/progress/{id}` (3); empty if there is none.
pub(crate) fn path_segment(req: &Request<Incoming>, n: usize) -> String {
    percent_decode(
        req.uri()
            .path()
            .trim_start_matches('/')
            .split('/')
            .nth(n)
            .unwrap_or_default(),
    )
}
