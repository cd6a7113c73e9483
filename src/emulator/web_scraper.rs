//! Web Scraper API (`/datasets/v3/…`) as brightdata.md §3 and §5 (items
//! 19–23, 27) describe it: trigger, progress, snapshot download whole or in
//! parts, parts count, inputs, cancel, listing, log.
//!
//! Not emulated (the daemon does not use them): multipart CSV triggers,
//! `compress=true`, the synchronous `/scrape`, `/deliver` and push delivery.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Frame, Incoming};
use serde_json::{json, Map, Value};

use super::scenario::CollectorScenario;
use super::{full, json as json_reply, query, text, LedgerEntry, Reply, State};

/// A snapshot (`sd_…`).
pub(crate) struct Snapshot {
    id: String,
    dataset: String,
    inputs: Arc<Vec<Map<String, Value>>>,
    created_ms: i64,
    cancelled_ms: Option<i64>,
    include_errors: bool,
    /// Downloads answered 202 since ready (build lag).
    lag_served: u32,
    /// The `batch_size` of the last `/parts` call: parts must match it.
    parts_batch: Option<u64>,
    served: Arc<AtomicBool>,
    scenario: CollectorScenario,
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Phase {
    Starting,
    Running,
    Ready,
    Failed,
    Cancelled,
    Expired,
}

impl Snapshot {
    fn ready_ms(&self) -> i64 {
        self.created_ms + self.scenario.build_time.as_millis() as i64
    }

    fn phase(&self, now: i64) -> Phase {
        let retention = self.scenario.retention.as_millis() as i64;
        if let Some(at) = self.cancelled_ms {
            return if now > at + retention {
                Phase::Expired
            } else {
                Phase::Cancelled
            };
        }
        let ready = self.ready_ms();
        if now >= ready + retention {
            Phase::Expired
        } else if now >= ready {
            if self.scenario.fail {
                Phase::Failed
            } else {
                Phase::Ready
            }
        } else if now < self.created_ms + (ready - self.created_ms) / 4 {
            Phase::Starting
        } else {
            Phase::Running
        }
    }

    fn status_word(&self, now: i64) -> &str {
        match self.phase(now) {
            Phase::Starting => "starting",
            Phase::Running => &self.scenario.progress_word,
            Phase::Ready => "ready",
            Phase::Failed => "failed",
            Phase::Cancelled | Phase::Expired => "canceled",
        }
    }

    /// Records input `i` yields: an error record, or `rows_per_input` rows.
    fn records_of(&self, i: usize) -> u64 {
        let s = &self.scenario;
        if s.zero_rows {
            0
        } else if is_error_input(s, i) {
            u64::from(self.include_errors)
        } else {
            u64::from(s.rows_per_input)
        }
    }

    /// (records, error records).
    fn counts(&self) -> (u64, u64) {
        let mut records = 0;
        let mut errors = 0;
        for i in 0..self.inputs.len() {
            let n = self.records_of(i);
            records += n;
            if is_error_input(&self.scenario, i) {
                errors += n;
            }
        }
        (records, errors)
    }
}

fn is_error_input(s: &CollectorScenario, i: usize) -> bool {
    s.error_every > 0 && (i as u64 + 1).is_multiple_of(u64::from(s.error_every))
}

pub(crate) fn endpoint_of(method: &Method, path: &str) -> Option<&'static str> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (&Method::POST, ["datasets", "v3", "trigger"]) => Some("v3_trigger"),
        (&Method::GET, ["datasets", "v3", "progress", _]) => Some("v3_progress"),
        (&Method::GET, ["datasets", "v3", "snapshot", _]) => Some("v3_snapshot"),
        (&Method::GET, ["datasets", "v3", "snapshot", _, "parts"]) => Some("v3_parts"),
        (&Method::GET, ["datasets", "v3", "snapshot", _, "input"]) => Some("v3_input"),
        (&Method::POST, ["datasets", "v3", "snapshot", _, "cancel"]) => Some("v3_cancel"),
        (&Method::GET, ["datasets", "v3", "snapshots"]) => Some("v3_snapshots"),
        (&Method::GET, ["datasets", "v3", "log", _]) => Some("v3_log"),
        _ => None,
    }
}

/// The dataset a request concerns, for per-dataset faults.
pub(crate) fn key_of(state: &State, req: &Request<Incoming>, endpoint: &str) -> Option<String> {
    match endpoint {
        "v3_trigger" | "v3_snapshots" => query(req).get("dataset_id").cloned(),
        _ => state
            .snapshots
            .lock()
            .ok()?
            .get(&super::path_segment(req, 3))
            .map(|s| s.dataset.clone()),
    }
}

pub(crate) async fn handle(state: &Arc<State>, req: Request<Incoming>, endpoint: &str) -> Reply {
    match endpoint {
        "v3_trigger" => trigger(state, req).await,
        "v3_progress" => progress(state, &req),
        "v3_snapshot" => snapshot(state, &req),
        "v3_parts" => parts(state, &req),
        "v3_input" => input(state, &req),
        "v3_cancel" => cancel(state, &req),
        "v3_snapshots" => listing(state, &req),
        "v3_log" => log(state, &req),
        _ => text(StatusCode::NOT_FOUND, "Not found"),
    }
}

const MAX_BODY: usize = 256 * 1024 * 1024;

fn not_exist() -> Reply {
    text(StatusCode::NOT_FOUND, "Snapshot does not exist")
}

async fn trigger(state: &State, req: Request<Incoming>) -> Reply {
    let q = query(&req);
    let Some(dataset) = q.get("dataset_id").cloned() else {
        return text(StatusCode::BAD_REQUEST, "dataset missing");
    };
    let Some(scenario) = state.scenario.collector(&dataset).cloned() else {
        return text(StatusCode::NOT_FOUND, "dataset does not exist");
    };
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return text(StatusCode::BAD_REQUEST, "Invalid attachments"),
    };
    let inputs = match super::brightdata_inputs(&body) {
        Ok(items) => items,
        Err(e) => return e.reply("No data to trigger"),
    };
    if inputs.is_empty() {
        return text(StatusCode::BAD_REQUEST, "No data to trigger");
    }
    if inputs.len() < scenario.min_inputs {
        return text(
            StatusCode::BAD_REQUEST,
            &format!("Should be at least {} inputs", scenario.min_inputs),
        );
    }
    let mut rows = Vec::with_capacity(inputs.len());
    let mut errors = Vec::new();
    for input in inputs {
        match input {
            Value::Object(map) => {
                for field in &scenario.input_fields {
                    if !map.contains_key(field) {
                        errors.push(json!([field, "This field is required"]));
                    }
                }
                rows.push(map);
            }
            _ => errors.push(json!(["input", "Input must be an object"])),
        }
    }
    if !errors.is_empty() {
        return json_reply(
            StatusCode::BAD_REQUEST,
            &json!({"error": "Invalid input provided", "code": "validation_error", "errors": errors}),
        );
    }
    let now = state.now_ms();
    let mut snapshots = state.snapshots.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(limit) = scenario.max_running {
        let running = snapshots
            .values()
            .filter(|s| s.dataset == dataset)
            .filter(|s| matches!(s.phase(now), Phase::Starting | Phase::Running))
            .count();
        if running >= limit {
            return text(
                StatusCode::TOO_MANY_REQUESTS,
                &format!("You have too many running jobs for this dataset. Please wait until some of them finish or consider combining multiple inputs into a single request. Running jobs: {running}>={limit}"),
            );
        }
    }
    let id = scenario
        .remote_id
        .clone()
        .unwrap_or_else(|| state.random_id("sd_"));
    let include_errors = q
        .get("include_errors")
        .is_some_and(|v| v == "true" || v == "1");
    state.in_flight(&dataset, 1);
    state.bill(LedgerEntry {
        provider: "web_scraper".into(),
        remote_id: id.clone(),
        key: dataset.clone(),
        inputs: rows.len() as u64,
        name: None,
        time: now,
        params: q.into_iter().collect(),
    });
    snapshots.insert(
        id.clone(),
        Snapshot {
            id: id.clone(),
            dataset,
            inputs: Arc::new(rows),
            created_ms: now,
            cancelled_ms: None,
            include_errors,
            lag_served: 0,
            parts_batch: None,
            served: Arc::new(AtomicBool::new(false)),
            scenario,
        },
    );
    json_reply(StatusCode::OK, &json!({"snapshot_id": id}))
}

fn progress(state: &State, req: &Request<Incoming>) -> Reply {
    let now = state.now_ms();
    let snapshots = state.snapshots.lock().unwrap_or_else(|e| e.into_inner());
    let Some(s) = snapshots.get(&super::path_segment(req, 3)) else {
        return json_reply(
            StatusCode::NOT_FOUND,
            &json!({"error": "Snapshot not found"}),
        );
    };
    // A brand-new id 404s for a moment (§3.3).
    if now < s.created_ms + s.scenario.early_404.as_millis() as i64 {
        return not_exist();
    }
    let mut body =
        json!({"snapshot_id": s.id, "dataset_id": s.dataset, "status": s.status_word(now)});
    match s.phase(now) {
        Phase::Ready => {
            let (records, errors) = s.counts();
            body["records"] = json!(records);
            body["errors"] = json!(errors);
            body["collection_duration"] = json!(s.ready_ms() - s.created_ms);
        }
        Phase::Failed => body["error_message"] = json!(s.scenario.fail_message),
        Phase::Expired => return not_exist(),
        _ => {}
    }
    json_reply(StatusCode::OK, &body)
}

/// `batch_size` and `part` from a download or parts query, checked; the
/// error is the validation message.
fn batching(q: &std::collections::HashMap<String, String>) -> Result<Option<(u64, u64)>, String> {
    let batch = match q.get("batch_size").map(|b| b.parse::<u64>()) {
        None => None,
        Some(Ok(b)) if b >= 1000 => Some(b),
        Some(_) => return Err("batch_size must be a number of at least 1000".into()),
    };
    let part = match q.get("part").map(|p| p.parse::<u64>()) {
        None => 1,
        Some(Ok(p)) if p >= 1 => p,
        Some(_) => return Err("part must be a number of at least 1".into()),
    };
    match batch {
        None if q.contains_key("part") => Err("part needs batch_size".into()),
        None => Ok(None),
        Some(b) => Ok(Some((b, part))),
    }
}

fn invalid(message: &str) -> Reply {
    json_reply(
        StatusCode::BAD_REQUEST,
        &json!({"validation_errors": [message]}),
    )
}

fn not_ready(status: &str, message: &str) -> Reply {
    json_reply(
        StatusCode::ACCEPTED,
        &json!({"status": status, "message": message}),
    )
}

fn snapshot(state: &Arc<State>, req: &Request<Incoming>) -> Reply {
    let q = query(req);
    let format = q.get("format").cloned().unwrap_or_else(|| "json".into());
    if !["json", "ndjson", "jsonl", "csv"].contains(&format.as_str()) {
        return json_reply(
            StatusCode::BAD_REQUEST,
            &json!({"validation_errors": ["format must be one of json, ndjson, jsonl, csv"]}),
        );
    }
    let batching = match batching(&q) {
        Ok(b) => b,
        Err(message) => return invalid(&message),
    };
    let now = state.now_ms();
    let mut snapshots = state.snapshots.lock().unwrap_or_else(|e| e.into_inner());
    let Some(s) = snapshots.get_mut(&super::path_segment(req, 3)) else {
        return not_exist();
    };
    match s.phase(now) {
        Phase::Expired => return text(StatusCode::BAD_REQUEST, "Snapshot is expired"),
        Phase::Starting | Phase::Running if s.scenario.not_ready_409 => {
            return json_reply(
                StatusCode::CONFLICT,
                &json!({"error": "Snapshot is not ready for download"}),
            )
        }
        Phase::Starting | Phase::Running => {
            return not_ready(
                s.status_word(now),
                "Snapshot is not ready yet, try again in 10s",
            )
        }
        Phase::Failed => {
            return text(
                StatusCode::BAD_REQUEST,
                &format!("Snapshot failed: {}", s.scenario.fail_message),
            )
        }
        Phase::Cancelled => return text(StatusCode::BAD_REQUEST, "Snapshot was canceled"),
        Phase::Ready => {}
    }
    // Ready on /progress, still building here (build lag).
    if s.lag_served < s.scenario.dataset_lag_polls {
        s.lag_served += 1;
        return not_ready("building", "Snapshot is building, try again in 10s");
    }
    let (records, _) = s.counts();
    if records == 0 {
        if !s.served.swap(true, Ordering::Relaxed) {
            state.in_flight(&s.dataset, -1);
        }
        return text(StatusCode::BAD_REQUEST, "Snapshot is empty");
    }
    let (start, end, last) = match batching {
        None => {
            if s.scenario
                .whole_download_max_records
                .is_some_and(|max| records > max)
            {
                return text(
                    StatusCode::BAD_REQUEST,
                    "Snapshot is too big to download at once (over the 5 GB limit); use batch_size and part",
                );
            }
            (0, records, true)
        }
        Some((batch, part)) => {
            if s.parts_batch.is_some_and(|b| b != batch) {
                return json_reply(
                    StatusCode::BAD_REQUEST,
                    &json!({"validation_errors": ["batch_size must be the one given to /parts"]}),
                );
            }
            let count = records.div_ceil(batch);
            if part > count {
                return json_reply(
                    StatusCode::BAD_REQUEST,
                    &json!({"validation_errors": [format!("part {part} is past the last part ({count})")]}),
                );
            }
            let start = (part - 1) * batch;
            (start, (start + batch).min(records), part == count)
        }
    };
    let served = last.then(|| (state.clone(), s.dataset.clone(), s.served.clone()));
    records_body(s, start, end, &format, served)
}

/// Streams records `start..end` in `format`, built as they are sent.
fn records_body(
    s: &Snapshot,
    start: u64,
    end: u64,
    format: &str,
    served: Option<(Arc<State>, String, Arc<AtomicBool>)>,
) -> Reply {
    // The records of the range, input by input, without a list of them all.
    let mut plan = Vec::new();
    let mut at = 0u64;
    for i in 0..s.inputs.len() {
        let n = s.records_of(i);
        for r in 0..n {
            if at >= start && at < end {
                plan.push((i, r));
            }
            at += 1;
        }
        if at >= end {
            break;
        }
    }
    let (inputs, scenario, id) = (s.inputs.clone(), s.scenario.clone(), s.id.clone());
    // A hostile provider's unreadable row, in NDJSON downloads.
    let malformed = scenario
        .malformed_row
        .map(|kind| (kind, scenario.malformed_at, scenario.huge_row_bytes));
    let record = move |(i, r): (usize, u64)| record(&inputs[i], i, r, &scenario, &id);
    let format = format.to_string();
    let header: Option<Vec<String>> = (format == "csv")
        .then(|| plan.first().map(|p| csv_header(&record(*p))))
        .flatten();
    let content_type = if format == "csv" {
        "text/csv"
    } else {
        "application/json"
    };
    const BATCH: usize = 64;
    let batches: Vec<Vec<(usize, u64)>> = plan.chunks(BATCH).map(<[_]>::to_vec).collect();
    let n = batches.len();
    let mut first = true;
    let stream = futures::stream::iter(0..n + 2).map(move |frame| {
        let mut out = Vec::new();
        if frame == 0 {
            match format.as_str() {
                "json" => out.push(b'['),
                "csv" => {
                    if let Some(h) = &header {
                        out.extend_from_slice(csv_line(h.iter().cloned()).as_bytes());
                    }
                }
                _ => {}
            }
        } else if frame == n + 1 {
            if format == "json" {
                out.push(b']');
            }
            if let Some((state, key, flag)) = &served {
                if !flag.swap(true, Ordering::Relaxed) {
                    state.in_flight(key, -1);
                }
            }
        } else {
            for p in &batches[frame - 1] {
                let value = record(*p);
                match format.as_str() {
                    "json" => {
                        if !std::mem::take(&mut first) {
                            out.push(b',');
                        }
                        out.extend_from_slice(value.to_string().as_bytes());
                    }
                    "csv" => {
                        let cells = header.iter().flatten().map(|k| match value.get(k) {
                            None | Some(Value::Null) => String::new(),
                            Some(Value::String(s)) => s.clone(),
                            Some(other) => other.to_string(),
                        });
                        out.extend_from_slice(csv_line(cells).as_bytes());
                    }
                    _ => {
                        match malformed {
                            Some((kind, at, huge)) if p.0 == at && p.1 == 0 => {
                                let url = value.get("url").cloned().unwrap_or_default();
                                out.extend_from_slice(&super::malformed_row(
                                    kind,
                                    &url.to_string(),
                                    huge,
                                ));
                            }
                            _ => out.extend_from_slice(value.to_string().as_bytes()),
                        }
                        out.push(b'\n');
                    }
                }
            }
        }
        Ok::<_, std::io::Error>(Frame::data(Bytes::from(out)))
    });
    let mut response = http::Response::new(http_body_util::combinators::BoxBody::new(
        http_body_util::StreamBody::new(stream),
    ));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    Reply::Response(response)
}

fn csv_header(first: &Value) -> Vec<String> {
    first
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

/// One RFC 4180 line.
fn csv_line(cells: impl Iterator<Item = String>) -> String {
    let mut line = cells
        .map(|c| {
            if c.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", c.replace('"', "\"\""))
            } else {
                c
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    line.push('\n');
    line
}

/// Record `r` of input `i`: an error record for every `error_every`-th
/// input (§5 item 27), else a data record.
fn record(input: &Map<String, Value>, i: usize, r: u64, s: &CollectorScenario, id: &str) -> Value {
    let url = input.get("url").cloned().unwrap_or(Value::Null);
    if is_error_input(s, i) {
        return json!({
            "input": input,
            "url": url,
            "error": "Crawler error: Unexpected Status 404 (dead_page)",
            "error_code": "dead_page",
        });
    }
    let mut row = json!({
        "input": input,
        "url": url,
        "name": format!("Record {i}.{r}"),
        "position": r + 1,
        "about": {"updated_on": "2026-11-01", "snapshot": id},
        "tags": ["emulated", "web_scraper"],
        "timestamp": "2026-11-01T00:00:00.000Z",
    });
    let so_far = row.to_string().len();
    if s.row_bytes > so_far + 15 {
        row["description"] = json!("y".repeat(s.row_bytes - so_far - 15));
    }
    row
}

fn parts(state: &State, req: &Request<Incoming>) -> Reply {
    let q = query(req);
    let batch = match batching(&q) {
        Ok(Some((b, _))) => b,
        Ok(None) => return invalid("batch_size is required"),
        Err(message) => return invalid(&message),
    };
    let now = state.now_ms();
    let mut snapshots = state.snapshots.lock().unwrap_or_else(|e| e.into_inner());
    let Some(s) = snapshots.get_mut(&super::path_segment(req, 3)) else {
        return not_exist();
    };
    match s.phase(now) {
        Phase::Ready if s.lag_served >= s.scenario.dataset_lag_polls => {}
        Phase::Expired => return text(StatusCode::BAD_REQUEST, "Snapshot is expired"),
        _ => return text(StatusCode::BAD_REQUEST, "Snapshot is not ready"),
    }
    s.parts_batch = Some(batch);
    json_reply(
        StatusCode::OK,
        &json!({"parts": s.counts().0.div_ceil(batch)}),
    )
}

/// The trigger's inputs as CSV: a header of every key in first-seen order,
/// nested values as JSON text.
fn input(state: &State, req: &Request<Incoming>) -> Reply {
    let snapshots = state.snapshots.lock().unwrap_or_else(|e| e.into_inner());
    let Some(s) = snapshots.get(&super::path_segment(req, 3)) else {
        return not_exist();
    };
    let mut header: Vec<String> = Vec::new();
    for row in s.inputs.iter() {
        for k in row.keys() {
            if !header.contains(k) {
                header.push(k.clone());
            }
        }
    }
    let mut out = csv_line(header.iter().cloned());
    for row in s.inputs.iter() {
        out.push_str(&csv_line(header.iter().map(|k| match row.get(k) {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(v)) => v.clone(),
            Some(other) => other.to_string(),
        })));
    }
    full(StatusCode::OK, "text/csv", out)
}

fn cancel(state: &State, req: &Request<Incoming>) -> Reply {
    let now = state.now_ms();
    let mut snapshots = state.snapshots.lock().unwrap_or_else(|e| e.into_inner());
    let Some(s) = snapshots.get_mut(&super::path_segment(req, 3)) else {
        return not_exist();
    };
    match s.phase(now) {
        Phase::Starting | Phase::Running => {
            s.cancelled_ms = Some(now);
            if !s.served.swap(true, Ordering::Relaxed) {
                state.in_flight(&s.dataset, -1);
            }
            text(StatusCode::OK, "OK")
        }
        _ => text(StatusCode::BAD_REQUEST, "Snapshot is not running"),
    }
}

fn listing(state: &State, req: &Request<Incoming>) -> Reply {
    let q = query(req);
    let Some(dataset) = q.get("dataset_id") else {
        return json_reply(
            StatusCode::BAD_REQUEST,
            &json!({"validation_errors": ["dataset_id is required"]}),
        );
    };
    let skip: usize = q.get("skip").and_then(|v| v.parse().ok()).unwrap_or(0);
    let limit: usize = q.get("limit").and_then(|v| v.parse().ok()).unwrap_or(1000);
    if limit > 5000 {
        return json_reply(
            StatusCode::BAD_REQUEST,
            &json!({"validation_errors": ["limit must be at most 5000"]}),
        );
    }
    let now = state.now_ms();
    let snapshots = state.snapshots.lock().unwrap_or_else(|e| e.into_inner());
    let mut matching: Vec<&Snapshot> = snapshots
        .values()
        .filter(|s| s.dataset == *dataset)
        .filter(|s| q.get("status").is_none_or(|w| s.status_word(now) == w))
        .filter(|s| {
            let day = &super::iso(s.created_ms)[..10];
            q.get("from_date").is_none_or(|f| day >= f.as_str())
                && q.get("to_date").is_none_or(|t| day <= t.as_str())
        })
        .collect();
    matching.sort_by_key(|s| (std::cmp::Reverse(s.created_ms), s.id.clone()));
    let items: Vec<Value> = matching
        .into_iter()
        .skip(skip)
        .take(limit)
        .map(|s| {
            json!({
                "id": s.id,
                "created": super::iso(s.created_ms),
                "status": s.status_word(now),
                "dataset_id": s.dataset,
                "dataset_size": if s.phase(now) == Phase::Ready { s.counts().0 } else { 0 },
                "trigger": {"type": "API"},
            })
        })
        .collect();
    json_reply(StatusCode::OK, &Value::Array(items))
}

/// Snapshot metadata with the documented mixed-case keys (§3.9).
fn log(state: &State, req: &Request<Incoming>) -> Reply {
    let now = state.now_ms();
    let snapshots = state.snapshots.lock().unwrap_or_else(|e| e.into_inner());
    let Some(s) = snapshots.get(&super::path_segment(req, 3)) else {
        return json_reply(
            StatusCode::NOT_FOUND,
            &json!({"error": "Snapshot not found"}),
        );
    };
    let ready = s.phase(now) == Phase::Ready;
    let records = if ready { s.counts().0 } else { 0 };
    let mut body = BTreeMap::new();
    body.insert("id", json!(s.id));
    body.insert("created", json!(super::iso(s.created_ms)));
    body.insert("Status", json!(s.status_word(now)));
    body.insert("Dataset_size", json!(records));
    body.insert("Inputs_count", json!(s.inputs.len()));
    body.insert("Dataset_id", json!(s.dataset));
    body.insert("trigger", json!({"type": "API"}));
    json_reply(StatusCode::OK, &json!(body))
}
