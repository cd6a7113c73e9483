//! Bright Data Scraper Studio batch collections (`/dca/…`), from
//! `providers/brightdata.md` §2: trigger, job log for status, dataset for
//! rows, the job listing to settle lost answers, cancel.

use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use reqwest::Method;
use serde_json::Value;

use super::http::{error_chain, one_line, read_small, Http, STATUS_MAX};
use super::{
    accepted, answer_id, array_body, check_remote_id, id_segment, query_params, BoolStyle,
    CallError, Cursor, DatasetBudget, DownloadOutcome, Found, PollOutcome, Provider, RowSink,
    TriggerCall, Triggered, DAY_MS,
};
use crate::chunk::UnixMs;
use crate::jsonstream::{ArraySplitter, Element};
use crate::spec::ProviderKind;

/// Batch results are kept 16 days (*Receive Batch Data*).
const RETENTION: Duration = Duration::from_secs(16 * 24 * 3600);

/// The job listing pages at most 500 (*List Scraper Studio jobs*).
const LIST_PAGE: usize = 500;
/// A listing deeper than this is not searched further for one chunk.
const LIST_MAX_PAGES: usize = 20;

pub struct ScraperStudio {
    http: Http,
}

impl ScraperStudio {
    pub fn new(http: Http) -> Self {
        ScraperStudio { http }
    }
}

/// A value by key, whatever its case: the log answers with `Status` in the
/// documented example and `status` live (§2.3).
fn field<'a>(obj: &'a serde_json::Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

#[async_trait]
impl Provider for ScraperStudio {
    fn kind(&self) -> ProviderKind {
        ProviderKind::ScraperStudio
    }

    fn retention(&self) -> Duration {
        RETENTION
    }

    async fn trigger(&self, call: &TriggerCall<'_>) -> Result<Triggered, CallError> {
        let mut query = vec![
            ("collector", call.key.to_string()),
            ("name", call.name.to_string()),
        ];
        query.extend(query_params(call.params, BoolStyle::Digit));
        let (status, text) = self
            .http
            .call(
                "dca_trigger",
                Method::POST,
                "/dca/trigger",
                &query,
                Some(("application/json", array_body(call.inputs_ndjson))),
            )
            .await?;
        accepted(status, || one_line(&text))?;
        answer_id(&text, "collection_id").map(Triggered::new)
    }

    async fn find(&self, call: &TriggerCall<'_>, since: UnixMs) -> Result<Found, CallError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
        // Dates are whole days in an unknown time zone: widen by a day each side.
        let from = crate::clock::utc_date(since - DAY_MS);
        let to = crate::clock::utc_date(now + DAY_MS);
        for page in 0..LIST_MAX_PAGES {
            let query = [
                ("collector", call.key.to_string()),
                ("from_date", from.clone()),
                ("to_date", to.clone()),
                ("offset", (page * LIST_PAGE).to_string()),
                ("limit", LIST_PAGE.to_string()),
                ("sort_asc", "-1".to_string()),
            ];
            // Listings can exceed the small-body cap.
            let (status, text) = self
                .http
                .get_text(
                    "dca_collector_jobs",
                    "/dca/collector/jobs",
                    &query,
                    16 * 1024 * 1024,
                )
                .await?;
            accepted(status, || one_line(&text))?;
            let value: Value = serde_json::from_str(&text)
                .map_err(|e| CallError::Protocol(format!("job listing: {e}")))?;
            // The full shape is undocumented (§2.6): accept a bare array or
            // an object holding one.
            let jobs = match &value {
                Value::Array(a) => a.as_slice(),
                Value::Object(o) => ["data", "jobs", "items"]
                    .iter()
                    .find_map(|k| o.get(*k).and_then(Value::as_array))
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
                _ => &[],
            };
            for job in jobs.iter().filter_map(Value::as_object) {
                let name = ["name", "human_name"]
                    .iter()
                    .find_map(|k| field(job, k).and_then(Value::as_str));
                if name == Some(call.name) {
                    let id = ["id", "collection_id", "job_id"]
                        .iter()
                        .find_map(|k| field(job, k).and_then(Value::as_str));
                    if let Some(id) = id {
                        // The collection exists, but its id cannot be used
                        // safely: fail the chunk rather than pay twice.
                        if let Err(why) = check_remote_id(id) {
                            return Ok(Found::Unreachable(why));
                        }
                        return Ok(Found::Existing(Triggered::new(id.to_string())));
                    }
                }
            }
            if jobs.len() < LIST_PAGE {
                return Ok(Found::Absent);
            }
        }
        Err(CallError::Protocol(format!(
            "job listing longer than {} entries; cannot tell whether chunk '{}' was created",
            LIST_PAGE * LIST_MAX_PAGES,
            call.name
        )))
    }

    async fn poll(&self, _key: &str, remote_id: &str) -> Result<PollOutcome, CallError> {
        let (status, text) = self
            .http
            .get_text(
                "dca_log",
                &format!("/dca/log/{}", id_segment(remote_id)?),
                &[],
                STATUS_MAX,
            )
            .await?;
        if status == 404 {
            return Ok(PollOutcome::NotFound(one_line(&text)));
        }
        accepted(status, || one_line(&text))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| CallError::Protocol(format!("job log: {e}: {}", one_line(&text))))?;
        let state = value
            .as_object()
            .and_then(|o| field(o, "status"))
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_ascii_lowercase();
        Ok(match state.as_str() {
            "done" => PollOutcome::Ready {
                expires_at: None,
                start: None,
                credits_used: None,
            },
            "failed" => PollOutcome::Failed(
                value
                    .as_object()
                    .and_then(|o| field(o, "error"))
                    .and_then(Value::as_str)
                    .map_or_else(
                        || "collection failed at the provider".to_string(),
                        str::to_string,
                    ),
            ),
            "cancelled" | "canceled" => PollOutcome::Cancelled,
            // building, running, queued, paused, and words not seen before:
            // still going (the skills script does the same).
            _ => PollOutcome::Building,
        })
    }

    async fn download(
        &self,
        _key: &str,
        remote_id: &str,
        _cursor: Option<&Cursor>,
        sink: &mut dyn RowSink,
    ) -> Result<DownloadOutcome, CallError> {
        let query = [
            ("id", remote_id.to_string()),
            ("format", "json".to_string()),
        ];
        let response = self
            .http
            .send("dca_dataset", Method::GET, "/dca/dataset", &query, None)
            .await?;
        let status = response.status().as_u16();
        match status {
            202 => return Ok(DownloadOutcome::NotReady),
            400 | 404 => {
                let text = read_small(response).await?;
                return Ok(DownloadOutcome::NotFound(one_line(&text)));
            }
            200..=299 => {}
            _ => {
                let text = read_small(response).await?;
                return Err(CallError::Protocol(format!(
                    "dataset answered {status}: {}",
                    one_line(&text)
                )));
            }
        }
        let limits = self.http.gate.config();
        let mut budget = DatasetBudget::new(limits.max_dataset_bytes);
        let mut stream = response.bytes_stream();
        let mut splitter = ArraySplitter::with_max_element(
            usize::try_from(limits.max_row_bytes).unwrap_or(usize::MAX),
        );
        // The body is sniffed before it is trusted: a status object or an
        // empty body on 200 still means "building" (§2.2), HTML is a fault.
        let mut head: Vec<u8> = Vec::new();
        let mut is_array = false;
        loop {
            let piece = match tokio::time::timeout(self.http.timeout, stream.next()).await {
                Err(_) => {
                    return Err(CallError::Transient {
                        detail: "dataset download stalled".into(),
                        sent: true,
                    })
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    return Err(CallError::Transient {
                        detail: format!("dataset download cut: {}", error_chain(&e)),
                        sent: true,
                    })
                }
                Ok(Some(Ok(piece))) => piece,
            };
            budget.take(piece.len())?;
            if !is_array {
                head.extend_from_slice(&piece);
                match head.iter().copied().find(|b| !b.is_ascii_whitespace()) {
                    Some(b'[') => {
                        is_array = true;
                        let bytes = std::mem::take(&mut head);
                        feed(&mut splitter, &bytes, sink)?;
                    }
                    Some(b'{') | None if head.len() < 64 * 1024 => continue,
                    Some(b'<') => {
                        return Err(CallError::Transient {
                            detail: "dataset answered with an HTML page".into(),
                            sent: true,
                        })
                    }
                    _ => {
                        return Err(CallError::Protocol(format!(
                            "dataset answer is not a JSON array: {}",
                            one_line(&String::from_utf8_lossy(&head[..head.len().min(200)]))
                        )))
                    }
                }
                continue;
            }
            feed(&mut splitter, &piece, sink)?;
        }
        if !is_array {
            let text = String::from_utf8_lossy(&head);
            if text.trim().is_empty() {
                return Ok(DownloadOutcome::NotReady);
            }
            let value: Value = serde_json::from_str(&text).map_err(|e| {
                CallError::Protocol(format!("dataset answer: {e}: {}", one_line(&text)))
            })?;
            return match value.get("status").and_then(Value::as_str) {
                Some(_) => Ok(DownloadOutcome::NotReady),
                None => Err(CallError::Protocol(format!(
                    "dataset answer: {}",
                    one_line(&text)
                ))),
            };
        }
        splitter.finish().map_err(|e| CallError::Transient {
            detail: format!("dataset body cut short: {e}"),
            sent: true,
        })?;
        Ok(DownloadOutcome::Saved { next: None })
    }

    fn http(&self) -> &Http {
        &self.http
    }

    async fn cancel(&self, _key: &str, remote_id: &str) -> Result<(), CallError> {
        let (status, text) = self
            .http
            .call(
                "dca_cancel",
                Method::POST,
                &format!("/dca/jobs/{}/cancel", id_segment(remote_id)?),
                &[],
                None,
            )
            .await?;
        accepted(status, || one_line(&text))
    }
}

/// Splits `bytes` into rows for the sink: whole rows with their offsets,
/// rows over `max_row_bytes` cut.
fn feed(
    splitter: &mut ArraySplitter,
    bytes: &[u8],
    sink: &mut dyn RowSink,
) -> Result<(), CallError> {
    splitter
        .feed_elements(bytes, |row, at| match row {
            Element::Whole(raw) => sink.row_at(raw, at),
            Element::Cut { head, len } => sink.oversize_row(head, len, at),
        })
        .map_err(|e| match e {
            Ok(io) => CallError::Sink(io),
            Err(split) => CallError::Protocol(format!("dataset: {split}")),
        })
}
