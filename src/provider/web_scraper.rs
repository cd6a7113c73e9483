//! Bright Data Web Scraper API (`/datasets/v3/…`), from
//! `providers/brightdata.md` §3: trigger, progress for status, snapshot
//! download (whole, or in parts above a size), the snapshot listing plus
//! each snapshot's inputs to settle lost answers, cancel.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use reqwest::Method;
use serde_json::{json, Map, Value};

use super::http::{error_chain, one_line, read_small, Http, STATUS_MAX};
use super::{
    accepted, answer_id, array_body, check_remote_id, id_segment, input_lines, parse_time,
    query_params, BoolStyle, CallError, Cursor, DatasetBudget, DownloadOutcome, Found, PollOutcome,
    Provider, RowSink, TriggerCall, Triggered, DAY_MS,
};
use crate::chunk::UnixMs;
use crate::spec::ProviderKind;

/// *Download Snapshot* says 16 days, *Scraper API limits* 30: plan for 16.
const RETENTION: Duration = Duration::from_secs(16 * 24 * 3600);

/// The snapshot listing pages at most 5000 (§3.8).
const LIST_PAGE: usize = 5000;
/// A listing deeper than this is not searched further for one chunk.
const LIST_MAX_PAGES: usize = 4;
/// The provider's clock and ours may differ: snapshots created this long
/// before the intent are still candidates.
const CLOCK_SLACK_MS: i64 = 5 * 60 * 1000;

pub struct WebScraper {
    http: Http,
    /// Records per part when a snapshot is downloaded in parts (≥ 1000).
    batch_size: u64,
}

impl WebScraper {
    pub fn new(http: Http, batch_size: u64) -> Self {
        WebScraper {
            http,
            batch_size: batch_size.max(1000),
        }
    }

    /// The start of a download: whole, or in parts when the snapshot holds
    /// more than one part's worth of records.
    fn start(&self, records: Option<u64>) -> Option<Cursor> {
        match records {
            Some(n) if n > self.batch_size => Some(json!({"batch_size": self.batch_size})),
            _ => None,
        }
    }

    /// The number of parts at `batch_size`; `None` while the snapshot is not
    /// ready to say.
    async fn parts(&self, remote_id: &str, batch_size: u64) -> Result<Option<u64>, CallError> {
        let query = [
            ("format", "ndjson".to_string()),
            ("batch_size", batch_size.to_string()),
        ];
        let (status, text) = self
            .http
            .get_text(
                "v3_parts",
                &format!("/datasets/v3/snapshot/{}/parts", id_segment(remote_id)?),
                &query,
                64 * 1024,
            )
            .await?;
        match status {
            200..=299 => serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("parts").and_then(Value::as_u64))
                .map(Some)
                .ok_or_else(|| CallError::Protocol(format!("parts answer: {}", one_line(&text)))),
            400 if text.to_ascii_lowercase().contains("not ready") => Ok(None),
            _ => Err(CallError::Rejected {
                status,
                message: one_line(&text),
            }),
        }
    }

    /// Whether this snapshot's inputs are exactly the chunk's.
    async fn same_inputs(&self, remote_id: &str, chunk: &[u8]) -> Result<bool, CallError> {
        let (status, text) = self
            .http
            .get_text(
                "v3_input",
                &format!("/datasets/v3/snapshot/{}/input", id_segment(remote_id)?),
                &[],
                64 * 1024 * 1024,
            )
            .await?;
        if !(200..300).contains(&status) {
            // No inputs to compare (400 "Snapshot input does not exist"):
            // it cannot be shown to be this chunk's.
            return Ok(false);
        }
        let Some(theirs) = csv_rows(&text) else {
            return Ok(false);
        };
        let mut ours: Vec<BTreeMap<String, String>> = input_lines(chunk)
            .filter_map(|l| serde_json::from_slice::<Map<String, Value>>(l).ok())
            .map(|row| {
                row.into_iter()
                    .map(|(k, v)| (k, cell_text(&v)))
                    .filter(|(_, v)| !v.is_empty())
                    .collect()
            })
            .collect();
        ours.sort();
        Ok(ours == theirs)
    }
}

/// A CSV text's rows as maps, sorted, empty cells left out; `None` if it is
/// not CSV.
fn csv_rows(text: &str) -> Option<Vec<BTreeMap<String, String>>> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(text.as_bytes());
    let header = reader.headers().ok()?.clone();
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.ok()?;
        rows.push(
            header
                .iter()
                .zip(record.iter())
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
    }
    rows.sort();
    Some(rows)
}

/// An input value as a CSV cell holds it.
fn cell_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[async_trait]
impl Provider for WebScraper {
    fn kind(&self) -> ProviderKind {
        ProviderKind::WebScraper
    }

    fn retention(&self) -> Duration {
        RETENTION
    }

    async fn trigger(&self, call: &TriggerCall<'_>) -> Result<Triggered, CallError> {
        let mut query = vec![("dataset_id", call.key.to_string())];
        // Error rows are wanted (they become errors.ndjson) unless the job says otherwise.
        if !call.params.contains_key("include_errors") {
            query.push(("include_errors", "true".to_string()));
        }
        query.extend(query_params(call.params, BoolStyle::Word));
        let (status, text) = self
            .http
            .call(
                "v3_trigger",
                Method::POST,
                "/datasets/v3/trigger",
                &query,
                Some(("application/json", array_body(call.inputs_ndjson))),
            )
            .await?;
        accepted(status, || one_line(&text))?;
        answer_id(&text, "snapshot_id").map(Triggered::new)
    }

    /// The API keeps no tag per trigger: a snapshot created since the intent
    /// whose inputs are exactly the chunk's is taken to be its collection.
    async fn find(&self, call: &TriggerCall<'_>, since: UnixMs) -> Result<Found, CallError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
        for page in 0..LIST_MAX_PAGES {
            let query = [
                ("dataset_id", call.key.to_string()),
                ("from_date", crate::clock::utc_date(since - DAY_MS)),
                ("to_date", crate::clock::utc_date(now + DAY_MS)),
                ("skip", (page * LIST_PAGE).to_string()),
                ("limit", LIST_PAGE.to_string()),
            ];
            let (status, text) = self
                .http
                .get_text(
                    "v3_snapshots",
                    "/datasets/v3/snapshots",
                    &query,
                    64 * 1024 * 1024,
                )
                .await?;
            accepted(status, || one_line(&text))?;
            let listing: Value = serde_json::from_str(&text)
                .map_err(|e| CallError::Protocol(format!("snapshot listing: {e}")))?;
            let items = match &listing {
                Value::Array(a) => a.as_slice(),
                Value::Object(o) => o
                    .get("data")
                    .and_then(Value::as_array)
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
                _ => &[],
            };
            let mut candidates: Vec<(UnixMs, &str)> = items
                .iter()
                .filter_map(|s| {
                    // An id that cannot be used safely is nobody's to
                    // claim: the listing holds every trigger, not only ours.
                    let id = s
                        .get("id")
                        .and_then(Value::as_str)
                        .filter(|id| check_remote_id(id).is_ok())?;
                    let created = s
                        .get("created")
                        .and_then(Value::as_str)
                        .and_then(parse_time);
                    // Without a creation time it may be anyone's: compare it too.
                    let created = created.unwrap_or(since);
                    (created >= since - CLOCK_SLACK_MS).then_some((created, id))
                })
                .collect();
            // The earliest after the intent is the likeliest.
            candidates.sort();
            for (_, id) in candidates {
                if self.same_inputs(id, call.inputs_ndjson).await? {
                    return Ok(Found::Existing(Triggered::new(id.to_string())));
                }
            }
            if items.len() < LIST_PAGE {
                return Ok(Found::Absent);
            }
        }
        Err(CallError::Protocol(format!(
            "snapshot listing longer than {} entries; cannot tell whether chunk '{}' was created",
            LIST_PAGE * LIST_MAX_PAGES,
            call.name
        )))
    }

    async fn poll(&self, _key: &str, remote_id: &str) -> Result<PollOutcome, CallError> {
        let (status, text) = self
            .http
            .get_text(
                "v3_progress",
                &format!("/datasets/v3/progress/{}", id_segment(remote_id)?),
                &[],
                STATUS_MAX,
            )
            .await?;
        if status == 404 {
            // Normal for the first seconds after the trigger (§3.3).
            return Ok(PollOutcome::NotFound(one_line(&text)));
        }
        accepted(status, || one_line(&text))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| CallError::Protocol(format!("progress: {e}: {}", one_line(&text))))?;
        let state = value
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_ascii_lowercase();
        Ok(match state.as_str() {
            "ready" => PollOutcome::Ready {
                expires_at: None,
                start: self.start(value.get("records").and_then(Value::as_u64)),
                credits_used: None,
            },
            "failed" => PollOutcome::Failed(
                value
                    .get("error_message")
                    .or_else(|| value.get("error"))
                    .and_then(Value::as_str)
                    .map_or_else(|| "snapshot failed".to_string(), str::to_string),
            ),
            "canceled" | "cancelled" => PollOutcome::Cancelled,
            // starting, running, collecting, digesting, and words not seen before.
            _ => PollOutcome::Building,
        })
    }

    async fn download(
        &self,
        _key: &str,
        remote_id: &str,
        cursor: Option<&Cursor>,
        sink: &mut dyn RowSink,
    ) -> Result<DownloadOutcome, CallError> {
        let mut query = vec![("format", "ndjson".to_string())];
        // In parts: batch_size, and part from 1; the count is asked once and
        // kept in the cursor, as every part must use the same batch_size.
        let mut parts_state = None;
        if let Some(cursor) = cursor {
            let batch_size = cursor
                .get("batch_size")
                .and_then(Value::as_u64)
                .ok_or_else(|| CallError::Protocol(format!("bad download cursor {cursor}")))?;
            let part = cursor.get("part").and_then(Value::as_u64).unwrap_or(1);
            let parts = match cursor.get("parts").and_then(Value::as_u64) {
                Some(n) => n,
                None => match self.parts(remote_id, batch_size).await? {
                    Some(n) => n,
                    None => return Ok(DownloadOutcome::NotReady),
                },
            };
            if parts == 0 {
                return Ok(DownloadOutcome::Saved { next: None });
            }
            query.push(("batch_size", batch_size.to_string()));
            query.push(("part", part.to_string()));
            parts_state = Some((batch_size, part, parts));
        }
        let response = self
            .http
            .send(
                "v3_snapshot",
                Method::GET,
                &format!("/datasets/v3/snapshot/{}", id_segment(remote_id)?),
                &query,
                None,
            )
            .await?;
        let status = response.status().as_u16();
        match status {
            200 => {}
            // Not built yet, or "ready" on /progress but still building here.
            202 | 409 => return Ok(DownloadOutcome::NotReady),
            400 | 404 => {
                let text = one_line(&read_small(response).await?);
                let lower = text.to_ascii_lowercase();
                return Ok(if lower.contains("empty") {
                    // A finished snapshot with no records (§3.4).
                    DownloadOutcome::Saved { next: None }
                } else if lower.contains("expired") {
                    DownloadOutcome::Expired(text)
                } else if status == 404 {
                    DownloadOutcome::NotFound(text)
                } else if parts_state.is_none()
                    && (lower.contains("batch_size") || lower.contains("too big"))
                {
                    // Over the whole-download cap: go in parts.
                    DownloadOutcome::Redirect(json!({"batch_size": self.batch_size}))
                } else {
                    return Err(CallError::Protocol(format!(
                        "snapshot answered 400: {text}"
                    )));
                });
            }
            _ => {
                let text = read_small(response).await?;
                return Err(CallError::Protocol(format!(
                    "snapshot answered {status}: {}",
                    one_line(&text)
                )));
            }
        }
        let limits = self.http.gate.config();
        let lines = Lines {
            max_row: usize::try_from(limits.max_row_bytes).unwrap_or(usize::MAX),
            ..Lines::default()
        };
        stream_ndjson(
            response,
            self.http.timeout,
            DatasetBudget::new(limits.max_dataset_bytes),
            lines,
            sink,
        )
        .await?;
        Ok(DownloadOutcome::Saved {
            next: match parts_state {
                Some((batch_size, part, parts)) if part < parts => {
                    Some(json!({"batch_size": batch_size, "part": part + 1, "parts": parts}))
                }
                _ => None,
            },
        })
    }

    async fn cancel(&self, _key: &str, remote_id: &str) -> Result<(), CallError> {
        let (status, text) = self
            .http
            .call(
                "v3_cancel",
                Method::POST,
                &format!("/datasets/v3/snapshot/{}/cancel", id_segment(remote_id)?),
                &[],
                None,
            )
            .await?;
        accepted(status, || one_line(&text))
    }

    fn http(&self) -> &Http {
        &self.http
    }
}

/// Streams an NDJSON body into `sink`, one line per row. A body that is
/// HTML, cut or stalled is transient; the caller's part file is thrown away.
/// A body over `budget` fails the chunk; a line over `lines.max_row` is kept
/// only up to it.
async fn stream_ndjson(
    response: reqwest::Response,
    timeout: Duration,
    mut budget: DatasetBudget,
    mut lines: Lines,
    sink: &mut dyn RowSink,
) -> Result<(), CallError> {
    let mut stream = response.bytes_stream();
    let mut first = true;
    loop {
        let piece = match tokio::time::timeout(timeout, stream.next()).await {
            Err(_) => {
                return Err(CallError::Transient {
                    detail: "snapshot download stalled".into(),
                    sent: true,
                })
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(CallError::Transient {
                    detail: format!("snapshot download cut: {}", error_chain(&e)),
                    sent: true,
                })
            }
            Ok(Some(Ok(piece))) => piece,
        };
        budget.take(piece.len())?;
        if first {
            if piece.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'<') {
                return Err(CallError::Transient {
                    detail: "snapshot answered with an HTML page".into(),
                    sent: true,
                });
            }
            first = piece.iter().all(u8::is_ascii_whitespace);
        }
        lines.feed(&piece, sink)?;
    }
    lines.emit(sink)
}

/// Splits NDJSON arriving in pieces into lines, each kept up to `max_row`
/// bytes, with the offset where it starts.
#[derive(Default)]
struct Lines {
    max_row: usize,
    line: Vec<u8>,
    /// The current line's full length, kept or not.
    len: u64,
    /// Where the current line starts in the body.
    start: u64,
}

impl Lines {
    fn feed(&mut self, piece: &[u8], sink: &mut dyn RowSink) -> Result<(), CallError> {
        let mut rest = piece;
        while let Some(at) = memchr::memchr(b'\n', rest) {
            self.keep(&rest[..at]);
            self.emit(sink)?;
            // The newline itself.
            self.start = self.start.saturating_add(1);
            rest = &rest[at + 1..];
        }
        self.keep(rest);
        Ok(())
    }

    fn keep(&mut self, bytes: &[u8]) {
        self.len = self.len.saturating_add(bytes.len() as u64);
        let room = self.max_row.saturating_sub(self.line.len());
        self.line.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// Hands the current line to the sink and starts the next.
    fn emit(&mut self, sink: &mut dyn RowSink) -> Result<(), CallError> {
        let cut = self.len > self.line.len() as u64;
        let lead = self.line.len() - self.line.trim_ascii_start().len();
        let trimmed = self.line.trim_ascii();
        let at = self.start.saturating_add(lead as u64);
        let result = if cut {
            sink.oversize_row(self.line.trim_ascii_start(), self.len - lead as u64, at)
        } else if trimmed.is_empty() {
            Ok(())
        } else {
            sink.row_at(trimmed, at)
        };
        result.map_err(|e| {
            if e.kind() == std::io::ErrorKind::InvalidData {
                CallError::Protocol(format!("snapshot row: {e}"))
            } else {
                CallError::Sink(e)
            }
        })?;
        self.start = self.start.saturating_add(self.len);
        self.line.clear();
        self.len = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects what a sink is given.
    #[derive(Default)]
    struct Seen(Vec<(String, Option<u64>, u64)>);

    impl RowSink for Seen {
        fn row(&mut self, raw: &[u8]) -> std::io::Result<()> {
            self.row_at(raw, u64::MAX)
        }
        fn row_at(&mut self, raw: &[u8], at: u64) -> std::io::Result<()> {
            self.0
                .push((String::from_utf8_lossy(raw).into_owned(), None, at));
            Ok(())
        }
        fn oversize_row(&mut self, head: &[u8], len: u64, at: u64) -> std::io::Result<()> {
            self.0
                .push((String::from_utf8_lossy(head).into_owned(), Some(len), at));
            Ok(())
        }
    }

    /// Lines come with their offsets whatever the pieces, and a line over
    /// the cap comes cut with its full length.
    #[test]
    fn ndjson_lines_have_offsets_and_long_ones_are_cut() {
        let body = format!(
            "{{\"a\":1}}\n\n  {{\"b\":\"{}\"}}\n{{\"c\":3}}",
            "x".repeat(50)
        );
        for piece in [1, 4, 1000] {
            let mut lines = Lines {
                max_row: 16,
                ..Lines::default()
            };
            let mut seen = Seen::default();
            for p in body.as_bytes().chunks(piece) {
                lines.feed(p, &mut seen).unwrap();
            }
            lines.emit(&mut seen).unwrap();
            let b_at = body.find("{\"b").unwrap() as u64;
            assert_eq!(
                seen.0,
                vec![
                    ("{\"a\":1}".to_string(), None, 0),
                    ("{\"b\":\"xxxxxxxx".to_string(), Some(58), b_at),
                    (
                        "{\"c\":3}".to_string(),
                        None,
                        body.rfind('{').unwrap() as u64
                    ),
                ],
                "piece {piece}"
            );
        }
    }

    #[test]
    fn csv_inputs_compare_with_ndjson_inputs() {
        let theirs = csv_rows("url,page\nhttps://b,\nhttps://a,2\n").unwrap();
        let mut ours: Vec<BTreeMap<String, String>> = [
            json!({"url": "https://a", "page": 2}),
            json!({"url": "https://b"}),
        ]
        .iter()
        .map(|v| {
            v.as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), cell_text(v)))
                .collect()
        })
        .collect();
        ours.sort();
        assert_eq!(theirs, ours);
    }
}
