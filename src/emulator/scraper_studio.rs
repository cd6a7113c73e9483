//! Scraper Studio batch API (`/dca/…`) as brightdata.md §2 and §5 describe
//! it: trigger, job log, dataset, job listing, cancel.

use std::io::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Frame, Incoming};
use serde_json::{json, Map, Value};

use super::scenario::{BuildingReply, CollectorScenario, ListingShape, LogKeys};
use super::{full, iso, json as json_reply, query, text, LedgerEntry, Reply, State};

/// A batch job (`j_…`).
pub(crate) struct Job {
    id: String,
    collector: String,
    name: Option<String>,
    inputs: Arc<Vec<Map<String, Value>>>,
    created_ms: i64,
    cancelled_ms: Option<i64>,
    /// `/dca/dataset` calls answered since the job was done.
    dataset_polls_done: u32,
    /// The dataset has been sent whole once (it left the "in flight" count).
    served: Arc<std::sync::atomic::AtomicBool>,
    scenario: CollectorScenario,
    /// Status questions asked (`/dca/log`, and `/dca/dataset` while not ready).
    status_polls: u32,
    /// When the dataset was first sent with its rows.
    fetched_ms: Option<i64>,
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Phase {
    Building,
    Running,
    Done,
    Failed,
    Cancelled,
    Expired,
}

impl Job {
    fn done_ms(&self) -> i64 {
        self.created_ms + self.scenario.build_time.as_millis() as i64
    }

    fn phase(&self, now: i64) -> Phase {
        if let Some(at) = self.cancelled_ms {
            return if now > at + self.scenario.retention.as_millis() as i64 {
                Phase::Expired
            } else {
                Phase::Cancelled
            };
        }
        let done = self.done_ms();
        if now >= done + self.scenario.retention.as_millis() as i64 {
            Phase::Expired
        } else if now >= done {
            if self.scenario.fail {
                Phase::Failed
            } else {
                Phase::Done
            }
        } else if now < self.created_ms + (done - self.created_ms) / 4 {
            Phase::Building
        } else {
            Phase::Running
        }
    }

    /// (data rows, error rows) the finished job holds.
    fn counts(&self) -> (u64, u64) {
        let s = &self.scenario;
        if s.zero_rows {
            return (0, 0);
        }
        let n = self.inputs.len() as u64;
        let errors = if s.error_every > 0 {
            n / u64::from(s.error_every)
        } else {
            0
        };
        ((n - errors) * u64::from(s.rows_per_input), errors)
    }
}

pub(crate) fn endpoint_of(method: &Method, path: &str) -> Option<&'static str> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (&Method::POST, ["dca", "trigger"]) => Some("trigger"),
        (&Method::GET, ["dca", "log", _]) => Some("log"),
        (&Method::GET, ["dca", "dataset"]) => Some("dataset"),
        (&Method::GET, ["dca", "collector", "jobs"]) => Some("jobs"),
        (&Method::POST, ["dca", "jobs", _, "cancel"]) => Some("cancel"),
        _ => None,
    }
}

/// The collector a request concerns, for per-collector faults.
pub(crate) fn key_of(state: &State, req: &Request<Incoming>, endpoint: &str) -> Option<String> {
    let q = query(req);
    match endpoint {
        "trigger" | "jobs" => q.get("collector").cloned(),
        "dataset" => q.get("id").and_then(|id| collector_of(state, id)),
        _ => req
            .uri()
            .path()
            .split('/')
            .find(|s| s.starts_with("j_"))
            .and_then(|id| collector_of(state, id)),
    }
}

fn collector_of(state: &State, id: &str) -> Option<String> {
    state.jobs.lock().ok()?.get(id).map(|j| j.collector.clone())
}

pub(crate) async fn handle(state: &Arc<State>, req: Request<Incoming>, endpoint: &str) -> Reply {
    match endpoint {
        "trigger" => trigger(state, req).await,
        "log" => log(state, &req),
        "dataset" => dataset(state, &req),
        "jobs" => listing(state, &req),
        "cancel" => cancel(state, &req),
        _ => text(StatusCode::NOT_FOUND, "Not found"),
    }
}

const MAX_BODY: usize = 256 * 1024 * 1024;

async fn trigger(state: &State, req: Request<Incoming>) -> Reply {
    let q = query(&req);
    let Some(collector) = q.get("collector").cloned() else {
        return text(StatusCode::BAD_REQUEST, "collector is required");
    };
    let Some(scenario) = state.scenario.collector(&collector).cloned() else {
        return text(StatusCode::NOT_FOUND, "Collector not found");
    };
    if scenario.realtime {
        return text(
            StatusCode::BAD_REQUEST,
            "Cannot trigger a batch job with a real-time scraper. Use /trigger_immediate endpoint instead",
        );
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return text(
                StatusCode::BAD_REQUEST,
                "Request body too large or unreadable",
            )
        }
    };
    let inputs = match super::brightdata_inputs(&body) {
        Ok(items) => items,
        Err(e) => return e.reply("Body must be an array of inputs"),
    };
    if inputs.is_empty() {
        return text(StatusCode::BAD_REQUEST, "No data to trigger");
    }
    let mut rows = Vec::with_capacity(inputs.len());
    let mut errors = Vec::new();
    for (i, input) in inputs.into_iter().enumerate() {
        match input {
            Value::Object(map) => {
                for field in &scenario.input_fields {
                    if !map.contains_key(field) {
                        errors.push(json!([format!("{i}.{field}"), "This field is required"]));
                    }
                }
                rows.push(map);
            }
            _ => errors.push(json!([i.to_string(), "Input must be an object"])),
        }
    }
    if !errors.is_empty() {
        return json_reply(
            StatusCode::UNPROCESSABLE_ENTITY,
            &json!({"error": "Invalid input provided", "code": "validation_error", "errors": errors}),
        );
    }
    let now = state.now_ms();
    let id = scenario
        .remote_id
        .clone()
        .unwrap_or_else(|| state.random_id("j_"));
    let job = Job {
        id: id.clone(),
        collector: collector.clone(),
        name: q.get("name").cloned(),
        inputs: Arc::new(rows),
        created_ms: now,
        cancelled_ms: None,
        dataset_polls_done: 0,
        served: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        scenario,
        status_polls: 0,
        fetched_ms: None,
    };
    state.in_flight(&collector, 1);
    state.bill(LedgerEntry {
        provider: "scraper_studio".into(),
        remote_id: id.clone(),
        key: collector,
        inputs: job.inputs.len() as u64,
        name: job.name.clone(),
        time: now,
        params: q.into_iter().collect(),
    });
    state
        .jobs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id.clone(), job);
    json_reply(
        StatusCode::OK,
        &json!({"collection_id": id, "start_eta": iso(now + 1000)}),
    )
}

fn log(state: &State, req: &Request<Incoming>) -> Reply {
    let id = super::path_segment(req, 2);
    let now = state.now_ms();
    let mut jobs = state.jobs.lock().unwrap_or_else(|e| e.into_inner());
    let Some(job) = jobs.get_mut(&id) else {
        return text(StatusCode::NOT_FOUND, "Job not found");
    };
    job.status_polls += 1;
    if now < job.created_ms + job.scenario.early_404.as_millis() as i64 {
        return text(StatusCode::NOT_FOUND, "Job not found");
    }
    let phase = job.phase(now);
    let status = match phase {
        Phase::Expired => return text(StatusCode::NOT_FOUND, "Job not found"),
        Phase::Building => "building".to_string(),
        Phase::Running => job
            .scenario
            .unknown_status_word
            .clone()
            .unwrap_or_else(|| "running".into()),
        Phase::Done => "done".into(),
        Phase::Failed => "failed".into(),
        Phase::Cancelled => "canceled".into(),
    };
    let finished = matches!(phase, Phase::Done | Phase::Failed);
    let (lines, fails) = if finished { job.counts() } else { (0, 0) };
    let inputs = job.inputs.len() as u64;
    let mut body = Map::new();
    let mut put = |title: &str, v: Value| {
        let key = match job.scenario.log_keys {
            LogKeys::Title => title.to_string(),
            LogKeys::Lower => title.to_ascii_lowercase(),
        };
        body.insert(key, v);
    };
    put("Id", json!(job.id));
    put("Status", json!(status));
    put("Collector", json!(job.collector));
    put("Template", json!(format!("t_{}.1", &job.collector[2..])));
    put("Inputs", json!(inputs));
    put("dup_inputs", json!(0));
    put("Lines", json!(lines));
    put("Fails", json!(fails));
    put("Pages", json!(if finished { inputs } else { 0 }));
    put("Pages_left", json!(if finished { 0 } else { inputs }));
    put("Success", json!(if finished { inputs - fails } else { 0 }));
    put("Navigations", json!(if finished { inputs } else { 0 }));
    put("created", json!(iso(job.created_ms)));
    put("started", json!(iso(job.created_ms + 500)));
    put(
        "finished",
        if finished {
            json!(iso(job.done_ms()))
        } else {
            Value::Null
        },
    );
    put(
        "Success_rate",
        json!(if finished && inputs > 0 {
            (inputs - fails) as f64 / inputs as f64
        } else {
            0.0
        }),
    );
    put("Job_time", json!(job.done_ms() - job.created_ms));
    put("Queue_time", json!(500));
    json_reply(StatusCode::OK, &Value::Object(body))
}

fn building(reply: BuildingReply) -> Reply {
    let object = |status: &str| {
        json!({"status": status, "message": "Dataset is not ready yet, try again in 10s"})
            .to_string()
    };
    match reply {
        BuildingReply::Accepted => {
            full(StatusCode::ACCEPTED, "application/json", object("building"))
        }
        BuildingReply::AcceptedCollecting => full(
            StatusCode::ACCEPTED,
            "application/json",
            object("collecting"),
        ),
        BuildingReply::OkObject => full(StatusCode::OK, "application/json", object("building")),
        BuildingReply::OkEmpty => full(StatusCode::OK, "application/json", ""),
    }
}

fn dataset(state: &Arc<State>, req: &Request<Incoming>) -> Reply {
    let q = query(req);
    let Some(id) = q.get("id") else {
        return text(StatusCode::BAD_REQUEST, "id is required");
    };
    let now = state.now_ms();
    let mut jobs = state.jobs.lock().unwrap_or_else(|e| e.into_inner());
    let Some(job) = jobs.get_mut(id) else {
        return text(StatusCode::NOT_FOUND, "Job not found");
    };
    match job.phase(now) {
        Phase::Expired => return text(StatusCode::NOT_FOUND, "Job not found or expired"),
        Phase::Building | Phase::Running => {
            job.status_polls += 1;
            return building(job.scenario.building_reply);
        }
        Phase::Failed => {
            if !job.served.swap(true, std::sync::atomic::Ordering::Relaxed) {
                state.in_flight(&job.collector, -1);
            }
            return json_reply(StatusCode::OK, &json!([]));
        }
        Phase::Done | Phase::Cancelled => {}
    }
    if job.cancelled_ms.is_none() && job.dataset_polls_done < job.scenario.dataset_lag_polls {
        job.dataset_polls_done += 1;
        job.status_polls += 1;
        if let Some(status) = job
            .scenario
            .dataset_lag_status
            .and_then(|s| StatusCode::from_u16(s).ok())
        {
            return text(status, "Dataset not found");
        }
        return building(job.scenario.building_reply);
    }
    job.fetched_ms.get_or_insert(now);
    let rows = if job.cancelled_ms.is_some() {
        Arc::new(Vec::new())
    } else {
        job.inputs.clone()
    };
    let served = Served {
        state: state.clone(),
        key: job.collector.clone(),
        flag: job.served.clone(),
    };
    rows_body(rows, job.scenario.clone(), job.id.clone(), served)
}

/// What happened to each collection, for benchmarks (see [`super::Collection`]).
pub(crate) fn report(state: &State) -> Vec<super::Collection> {
    let jobs = state.jobs.lock().unwrap_or_else(|e| e.into_inner());
    jobs.values()
        .map(|j| super::Collection {
            id: j.id.clone(),
            key: j.collector.clone(),
            triggered_ms: j.created_ms,
            ready_ms: j.done_ms(),
            status_polls: j.status_polls,
            fetched_ms: j.fetched_ms,
        })
        .collect()
}

/// Takes a collection out of the emulator's in-flight count once its
/// dataset has been streamed to the end (a cut body does not count).
struct Served {
    state: Arc<State>,
    key: String,
    flag: Arc<std::sync::atomic::AtomicBool>,
}

impl Served {
    fn done(&self) {
        if !self.flag.swap(true, std::sync::atomic::Ordering::Relaxed) {
            self.state.in_flight(&self.key, -1);
        }
    }
}

/// Streams the dataset as a JSON array, rows made from the inputs as the
/// body is sent, in frames of about 256 KB, so hundreds of megabytes never
/// sit in memory (even when one input has a million rows).
fn rows_body(
    inputs: Arc<Vec<Map<String, Value>>>,
    scenario: CollectorScenario,
    job_id: String,
    served: Served,
) -> Reply {
    const FRAME: usize = 256 * 1024;
    let total = if scenario.zero_rows { 0 } else { inputs.len() };
    let mut rows = RowMaker {
        inputs,
        scenario,
        job_id: Value::String(job_id).to_string(),
        next: (0, 0),
        current: None,
        pending_pad: 0,
    };
    // Frame 0 is "[", then frames of rows, the last "]": a cut or a stall
    // always falls inside the array.
    let mut frame = 0usize;
    let mut first = true;
    let mut ended = false;
    let stream = futures::stream::poll_fn(move |_| {
        if ended {
            return std::task::Poll::Ready(None);
        }
        let mut out = Vec::with_capacity(FRAME + 4096);
        if frame == 0 {
            out.push(b'[');
        } else if rows.pending_pad > 0 || rows.more(total) {
            while out.len() < FRAME {
                // A huge row goes out a frame at a time.
                if rows.pending_pad > 0 {
                    rows.pad(&mut out, FRAME);
                    continue;
                }
                if !rows.more(total) {
                    break;
                }
                if !std::mem::take(&mut first) {
                    out.push(b',');
                }
                rows.write_next(&mut out);
            }
        } else {
            out.push(b']');
            served.done();
            ended = true;
        }
        frame += 1;
        std::task::Poll::Ready(Some(Ok::<_, std::io::Error>(Frame::data(Bytes::from(out)))))
    });
    let mut response = http::Response::new(http_body_util::combinators::BoxBody::new(
        http_body_util::StreamBody::new(stream),
    ));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Reply::Response(response)
}

/// Makes a dataset's rows one at a time: `rows_per_input` rows per input
/// (or one error row, every `error_every`th input), each padded to
/// `row_bytes`.
struct RowMaker {
    inputs: Arc<Vec<Map<String, Value>>>,
    scenario: CollectorScenario,
    /// The collection id as JSON text.
    job_id: String,
    /// (input, row of that input) to make next.
    next: (usize, u32),
    /// The JSON text of the current input and of its `url`.
    current: Option<(usize, String, String)>,
    /// Bytes of a huge row's body still to send.
    pending_pad: usize,
}

impl RowMaker {
    fn is_error(&self, i: usize) -> bool {
        let every = self.scenario.error_every;
        every > 0 && (i as u64 + 1).is_multiple_of(u64::from(every))
    }

    /// Whether a row is left among the first `total` inputs.
    fn more(&mut self, total: usize) -> bool {
        while self.next.0 < total
            && self.scenario.rows_per_input == 0
            && !self.is_error(self.next.0)
        {
            self.next = (self.next.0 + 1, 0);
        }
        self.next.0 < total
    }

    /// Appends up to `frame` bytes of a huge row's body, and its end.
    fn pad(&mut self, out: &mut Vec<u8>, frame: usize) {
        let n = self.pending_pad.min(frame.saturating_sub(out.len()).max(1));
        out.resize(out.len() + n, b'x');
        self.pending_pad -= n;
        if self.pending_pad == 0 {
            out.extend_from_slice(b"\"}");
        }
    }

    /// Appends the next row's JSON text to `out` and moves on.
    fn write_next(&mut self, out: &mut Vec<u8>) {
        let (i, r) = self.next;
        let s = &self.scenario;
        let input = &self.inputs[i];
        if let (Some(kind), true) = (s.malformed_row, i == s.malformed_at && r == 0) {
            let url = input.get("url").cloned().unwrap_or(Value::Null).to_string();
            if kind == super::scenario::MalformedRow::Huge {
                let _ = write!(out, "{{\"url\":{url},\"title\":\"huge\",\"body\":\"");
                self.pending_pad = s.huge_row_bytes.max(1);
            } else {
                out.extend_from_slice(&super::malformed_row(kind, &url, 0));
            }
            self.next = if r + 1 < s.rows_per_input {
                (i, r + 1)
            } else {
                (i + 1, 0)
            };
            return;
        }
        if self.is_error(i) {
            let row = json!({
                "input": input,
                "error": "Page returned 404 (dead page)",
                "error_code": "dead_page",
                "status_code": 404,
            });
            out.extend_from_slice(row.to_string().as_bytes());
            self.next = (i + 1, 0);
            return;
        }
        if self.current.as_ref().map(|c| c.0) != Some(i) {
            let input_json = Value::Object(input.clone()).to_string();
            let url_json = input.get("url").cloned().unwrap_or(Value::Null).to_string();
            self.current = Some((i, input_json, url_json));
        }
        let Some((_, input_json, url_json)) = &self.current else {
            return;
        };
        // The row is written as text around the parts that vary, so a
        // benchmark's gigabyte streams at the network's pace, not the
        // emulator's.
        let start = out.len();
        let _ = write!(
            out,
            "{{\"input\":{input_json},\"url\":{url_json},\"title\":\"Result {i}.{r}\",\"rank\":{},\
             \"about\":{{\"updated_on\":\"2026-11-01\",\"collection\":{}}},\
             \"tags\":[\"emulated\",\"scraper_studio\"]}}",
            r + 1,
            self.job_id,
        );
        let len = out.len() - start;
        if s.row_bytes > len + 12 {
            let pad = s.row_bytes - len - 12;
            out.pop();
            out.extend_from_slice(b",\"body\":\"");
            out.resize(out.len() + pad, b'x');
            out.extend_from_slice(b"\"}");
        }
        self.next = if r + 1 < s.rows_per_input {
            (i, r + 1)
        } else {
            (i + 1, 0)
        };
    }
}

fn listing(state: &State, req: &Request<Incoming>) -> Reply {
    let q = query(req);
    let (Some(from), Some(to)) = (q.get("from_date"), q.get("to_date")) else {
        return text(
            StatusCode::BAD_REQUEST,
            "from_date and to_date are required (YYYY-MM-DD)",
        );
    };
    let valid_date = |d: &str| d.len() == 10 && d.as_bytes()[4] == b'-' && d.as_bytes()[7] == b'-';
    if !valid_date(from) || !valid_date(to) {
        return text(
            StatusCode::BAD_REQUEST,
            "from_date and to_date must be YYYY-MM-DD",
        );
    }
    let offset: usize = q.get("offset").and_then(|v| v.parse().ok()).unwrap_or(0);
    let limit: usize = q.get("limit").and_then(|v| v.parse().ok()).unwrap_or(100);
    if limit > 500 {
        return text(StatusCode::BAD_REQUEST, "limit must be at most 500");
    }
    let ascending = q.get("sort_asc").map(String::as_str) == Some("1");
    let now = state.now_ms();
    let jobs = state.jobs.lock().unwrap_or_else(|e| e.into_inner());
    let mut matching: Vec<&Job> = jobs
        .values()
        .filter(|j| q.get("collector").is_none_or(|c| *c == j.collector))
        .filter(|j| {
            let day = &iso(j.created_ms)[..10];
            day >= from.as_str() && day <= to.as_str()
        })
        .collect();
    matching.sort_by_key(|j| (j.created_ms, j.id.clone()));
    if !ascending {
        matching.reverse();
    }
    let items: Vec<Value> = matching
        .into_iter()
        .skip(offset)
        .take(limit)
        .map(|j| {
            let (lines, fails) = if j.phase(now) == Phase::Done {
                j.counts()
            } else {
                (0, 0)
            };
            json!({
                "id": j.id,
                "name": j.name,
                "collector": j.collector,
                "inputs": j.inputs.len(),
                "data_lines": lines,
                "failed_pages": fails,
                "created": iso(j.created_ms),
                "expired": iso(j.done_ms() + j.scenario.retention.as_millis() as i64),
            })
        })
        .collect();
    match state.scenario.listing_shape {
        ListingShape::Array => json_reply(StatusCode::OK, &Value::Array(items)),
        ListingShape::Object => json_reply(
            StatusCode::OK,
            &json!({"total": items.len(), "data": items}),
        ),
    }
}

fn cancel(state: &State, req: &Request<Incoming>) -> Reply {
    let id = super::path_segment(req, 2);
    let now = state.now_ms();
    let mut jobs = state.jobs.lock().unwrap_or_else(|e| e.into_inner());
    let Some(job) = jobs.get_mut(&id) else {
        return text(StatusCode::NOT_FOUND, "Job not found");
    };
    match job.phase(now) {
        Phase::Building | Phase::Running => {
            job.cancelled_ms = Some(now);
            text(StatusCode::OK, "OK")
        }
        _ => text(StatusCode::BAD_REQUEST, "Job is already finished"),
    }
}
