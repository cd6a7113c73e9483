//! Firecrawl batch scrape (`/v1` and `/v2/batch/scrape`), from
//! `providers/firecrawl.md` §0–1: submit, poll the first page only while
//! scraping, page through `next` once terminal, then `/errors`.
//!
//! A download cursor is `{"skip": n}` for a data page or `{"errors": true}`
//! for the failed URLs, so a failed page fetch resumes where the last saved
//! page ended and never fetches a saved page again.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use reqwest::Method;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::http::{one_line, read_small, Http};
use super::{
    accepted, check_remote_id, id_segment, input_lines, parse_time, CallError, Cursor,
    DownloadOutcome, Found, PollOutcome, Provider, RowSink, TriggerCall, Triggered,
};
use crate::chunk::UnixMs;
use crate::spec::{ApiVersion, ProviderKind};

/// Results are kept about 24 h after completion (§1.9).
const RETENTION: Duration = Duration::from_secs(24 * 3600);

/// A page holds at most ~10 MiB of documents, but a single oversize
/// document still comes alone: allow well beyond.
const MAX_PAGE: usize = 256 * 1024 * 1024;

/// A status answer carries one document (`limit=1`), which may be a large
/// page's HTML: more room than Bright Data's 1 MiB, still bounded.
const STATUS_MAX: usize = 16 * 1024 * 1024;

pub struct Firecrawl {
    http: Http,
    version: ApiVersion,
}

/// A status answer or result page (§1.3). Documents stay raw: they are
/// written as they came.
#[derive(Deserialize)]
struct Page<'a> {
    success: Option<bool>,
    status: Option<String>,
    completed: Option<u64>,
    #[serde(rename = "expiresAt")]
    expires_at: Option<String>,
    #[serde(rename = "completedAt")]
    completed_at: Option<String>,
    next: Option<String>,
    #[serde(borrow, default)]
    data: Vec<&'a RawValue>,
    error: Option<String>,
}

impl Firecrawl {
    pub fn new(http: Http, version: ApiVersion) -> Self {
        Firecrawl { http, version }
    }

    /// Endpoint names for metrics, per version so the two never mix.
    fn ep(&self, what: &str) -> &'static str {
        match (self.version, what) {
            (ApiVersion::V1, "batch") => "v1_batch",
            (ApiVersion::V1, "status") => "v1_status",
            (ApiVersion::V1, "errors") => "v1_errors",
            (ApiVersion::V1, _) => "v1_cancel",
            (ApiVersion::V2, "batch") => "v2_batch",
            (ApiVersion::V2, "status") => "v2_status",
            (ApiVersion::V2, "errors") => "v2_errors",
            (ApiVersion::V2, _) => "v2_cancel",
        }
    }

    fn base(&self) -> &'static str {
        match self.version {
            ApiVersion::V1 => "/v1/batch/scrape",
            ApiVersion::V2 => "/v2/batch/scrape",
        }
    }

    /// Submits the chunk. `Ok(Err(message))`: v1 says the idempotency key
    /// was used already, so the batch exists but its id is not given back.
    async fn submit(&self, call: &TriggerCall<'_>) -> Result<Result<Triggered, String>, CallError> {
        let mut urls = Vec::new();
        let mut inputs: Vec<Map<String, Value>> = Vec::new();
        for line in input_lines(call.inputs_ndjson) {
            let row: Map<String, Value> = serde_json::from_slice(line)
                .map_err(|e| CallError::Protocol(format!("stored input: {e}")))?;
            if let Some(url) = row.get("url").and_then(Value::as_str) {
                urls.push(url.to_string());
            }
            inputs.push(row);
        }
        let mut body = call.params.clone();
        body.insert("urls".into(), json!(urls));
        // Omitted, v2 parses strictly and one bad URL fails the whole chunk,
        // although the docs say the default is lenient (§0.6).
        body.insert("ignoreInvalidURLs".into(), json!(true));
        let mut headers = Vec::new();
        if self.version == ApiVersion::V1 {
            headers.push((
                "x-idempotency-key",
                idempotency_key(call.name, call.attempt),
            ));
        }
        let (status, text) = self
            .http
            .whole(self.ep("batch"), async {
                let response = self
                    .http
                    .send_with(
                        self.ep("batch"),
                        Method::POST,
                        self.base(),
                        &[],
                        Some((
                            "application/json",
                            Bytes::from(Value::Object(body).to_string()),
                        )),
                        &headers,
                    )
                    .await?;
                let status = response.status().as_u16();
                Ok((status, read_small(response).await?))
            })
            .await?;
        if status == 409 {
            return Ok(Err(format!(
                "Firecrawl says this chunk's batch exists (idempotency key already used: {}) but does not give its id back",
                one_line(&text)
            )));
        }
        accepted(status, || error_message(&text))?;
        let answer: Value = serde_json::from_str(&text)
            .map_err(|e| CallError::Protocol(format!("batch answer: {e}: {}", one_line(&text))))?;
        let id = answer
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .ok_or_else(|| {
                CallError::Protocol(format!("batch answer has no id: {}", one_line(&text)))
            })?;
        if let Err(why) = check_remote_id(id) {
            // The batch exists but its id cannot be used safely: unreadable
            // for a trigger (in doubt), unreachable when settling one.
            return Ok(Err(why));
        }
        let rejected = answer
            .get("invalidURLs")
            .and_then(Value::as_array)
            .map(|bad| {
                bad.iter()
                    .filter_map(Value::as_str)
                    .map(|url| {
                        let input = inputs
                            .iter()
                            .find(|i| i.get("url").and_then(Value::as_str) == Some(url))
                            .map_or_else(|| json!({"url": url}), |i| Value::Object(i.clone()));
                        json!({
                            "url": url,
                            "error": "Firecrawl refused the URL as invalid",
                            "error_code": "invalid_url",
                            "input": input,
                        })
                        .to_string()
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Ok(Triggered {
            remote_id: id.to_string(),
            rejected,
        }))
    }

    /// One page of results (or `/errors`): its text, or the outcome a 404
    /// stands for (expired, not found). Another status, or an HTML page, is
    /// a fault to retry.
    async fn fetch(
        &self,
        what: &str,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<Result<String, DownloadOutcome>, CallError> {
        let endpoint = self.ep(what);
        let (status, text) = self.http.get_text(endpoint, path, query, MAX_PAGE).await?;
        if let Some(outcome) = gone(status, &text) {
            return Ok(Err(outcome));
        }
        if !(200..300).contains(&status) {
            return Err(CallError::Protocol(format!(
                "{endpoint} answered {status}: {}",
                one_line(&text)
            )));
        }
        if text.trim_start().starts_with('<') {
            return Err(CallError::Transient {
                detail: format!("{endpoint} answered with an HTML page"),
                sent: true,
            });
        }
        Ok(Ok(text))
    }

    /// The failed URLs (`/errors`), as error rows; the last page.
    async fn errors(
        &self,
        remote_id: &str,
        sink: &mut dyn RowSink,
    ) -> Result<DownloadOutcome, CallError> {
        let text = match self
            .fetch(
                "errors",
                &format!("{}/{}/errors", self.base(), id_segment(remote_id)?),
                &[],
            )
            .await?
        {
            Ok(text) => text,
            Err(outcome) => return Ok(outcome),
        };
        #[derive(Deserialize)]
        struct Errors<'a> {
            #[serde(borrow, default)]
            errors: Vec<&'a RawValue>,
            #[serde(default, rename = "robotsBlocked")]
            robots_blocked: Vec<String>,
        }
        let page: Errors = serde_json::from_str(&text)
            .map_err(|e| CallError::Protocol(format!("errors answer: {e}: {}", one_line(&text))))?;
        for entry in page.errors {
            row(entry, sink)?;
        }
        for url in page.robots_blocked {
            let blocked =
                json!({"url": url, "error": "blocked by robots.txt", "code": "ROBOTS_BLOCKED"});
            sink.row(blocked.to_string().as_bytes())
                .map_err(CallError::Sink)?;
        }
        Ok(DownloadOutcome::Saved { next: None })
    }
}

/// A stable UUID per chunk and attempt, so a re-sent request carries the
/// same key (v1 answers 409 to a key it has seen).
fn idempotency_key(name: &str, attempt: u32) -> String {
    let digest = Sha256::digest(format!("{name}#{attempt}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x40; // version 4 layout
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Firecrawl's error bodies are `{success:false, error}`; say the error.
fn error_message(text: &str) -> String {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| one_line(text))
}

/// 404 "Job expired" / "Job not found" (§1.3).
fn gone(status: u16, text: &str) -> Option<DownloadOutcome> {
    if status != 404 {
        return None;
    }
    let message = error_message(text);
    Some(if message.to_ascii_lowercase().contains("expired") {
        DownloadOutcome::Expired(message)
    } else {
        DownloadOutcome::NotFound(message)
    })
}

/// Writes one document or error entry, compact on one line.
fn row(raw: &RawValue, sink: &mut dyn RowSink) -> Result<(), CallError> {
    let text = raw.get();
    let result = if text.contains('\n') {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| CallError::Protocol(format!("document: {e}")))?;
        sink.row(value.to_string().as_bytes())
    } else {
        sink.row(text.as_bytes())
    };
    result.map_err(CallError::Sink)
}

/// The `skip` a `next` link asks for, if it says.
fn next_skip(next: &str) -> Option<u64> {
    let query = next.split_once('?')?.1;
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "skip")
        .and_then(|(_, v)| v.parse().ok())
}

#[async_trait]
impl Provider for Firecrawl {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Firecrawl
    }

    fn retention(&self) -> Duration {
        RETENTION
    }

    async fn trigger(&self, call: &TriggerCall<'_>) -> Result<Triggered, CallError> {
        match self.submit(call).await? {
            Ok(triggered) => Ok(triggered),
            // Our key, seen before: a batch exists for this very attempt.
            Err(message) => Err(CallError::Protocol(message)),
        }
    }

    async fn find(&self, call: &TriggerCall<'_>, _since: UnixMs) -> Result<Found, CallError> {
        match self.version {
            // The same key again: 200 means the first never arrived and this
            // one is the batch; 409 means the first exists.
            ApiVersion::V1 => match self.submit(call).await {
                Ok(Ok(triggered)) => Ok(Found::Existing(triggered)),
                Ok(Err(message)) => Ok(Found::Unreachable(message)),
                // The same body refused now was refused then: nothing exists.
                Err(CallError::Rejected { .. }) => Ok(Found::Absent),
                Err(e) => Err(e),
            },
            // v2 has no idempotency and no batch listing: the provider
            // cannot tell (README, residual risks).
            ApiVersion::V2 => {
                tracing::warn!(
                    chunk = call.name,
                    "Firecrawl v2 offers no way to find a batch whose answer was lost; triggering again may pay twice (use api_version = \"v1\" to avoid this)"
                );
                Ok(Found::Absent)
            }
        }
    }

    async fn poll(&self, _key: &str, remote_id: &str) -> Result<PollOutcome, CallError> {
        // One document at most: the status is what is wanted, and pages are
        // fetched once, after the batch ends (§3.3).
        let (status, text) = self
            .http
            .get_text(
                self.ep("status"),
                &format!("{}/{}", self.base(), id_segment(remote_id)?),
                &[("limit", "1".to_string())],
                STATUS_MAX,
            )
            .await?;
        match gone(status, &text) {
            Some(DownloadOutcome::Expired(m)) => return Ok(PollOutcome::Expired(m)),
            Some(DownloadOutcome::NotFound(m)) => return Ok(PollOutcome::NotFound(m)),
            _ => {}
        }
        accepted(status, || error_message(&text))?;
        let page: Page = serde_json::from_str(&text)
            .map_err(|e| CallError::Protocol(format!("status: {e}: {}", one_line(&text))))?;
        let state = page.status.as_deref().unwrap_or("unknown");
        if page.success == Some(false) || state == "failed" {
            return Ok(PollOutcome::Failed(
                page.error
                    .unwrap_or_else(|| "the batch failed at Firecrawl".to_string()),
            ));
        }
        Ok(match state {
            "completed" => PollOutcome::Ready {
                // expiresAt is "now + 24 h" on every read (§0.3): completion
                // plus 24 h is the real deadline when it is given.
                expires_at: page
                    .completed_at
                    .as_deref()
                    .and_then(parse_time)
                    .map(|t| t + RETENTION.as_millis() as i64)
                    .or_else(|| page.expires_at.as_deref().and_then(parse_time)),
                start: None,
            },
            "cancelled" => PollOutcome::Cancelled,
            // scraping, and words not seen before.
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
        if cursor.and_then(|c| c.get("errors")).is_some() {
            return self.errors(remote_id, sink).await;
        }
        let skip = cursor
            .and_then(|c| c.get("skip"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let path = format!("{}/{}", self.base(), id_segment(remote_id)?);
        let text = match self
            .fetch("status", &path, &[("skip", skip.to_string())])
            .await?
        {
            Ok(text) => text,
            Err(outcome) => return Ok(outcome),
        };
        let page: Page = serde_json::from_str(&text)
            .map_err(|e| CallError::Protocol(format!("page: {e}: {}", one_line(&text))))?;
        if page.status.as_deref() == Some("scraping") {
            // More URLs were appended: not finished after all.
            return Ok(DownloadOutcome::NotReady);
        }
        let returned = page.data.len() as u64;
        for doc in page.data {
            row(doc, sink)?;
        }
        let end = skip.saturating_add(returned);
        let next = match page.next.as_deref() {
            // Followed by its skip, against our own base URL: `next` may
            // name another scheme or host (§1.3, issue #930).
            Some(next) => {
                let to = next_skip(next).unwrap_or(end);
                if to <= skip {
                    return Err(CallError::Protocol(format!(
                        "page at skip {skip} points back to skip {to}"
                    )));
                }
                json!({"skip": to})
            }
            None => {
                let completed = page.completed.unwrap_or(end);
                if end < completed {
                    // Said done but served fewer: never a silent gap.
                    let missing = json!({
                        "error": format!("Firecrawl reported {completed} completed documents but served {end}"),
                        "error_code": "missing_documents",
                    });
                    sink.row(missing.to_string().as_bytes())
                        .map_err(CallError::Sink)?;
                }
                json!({"errors": true})
            }
        };
        Ok(DownloadOutcome::Saved { next: Some(next) })
    }

    async fn cancel(&self, _key: &str, remote_id: &str) -> Result<(), CallError> {
        let (status, text) = self
            .http
            .call(
                self.ep("cancel"),
                Method::DELETE,
                &format!("{}/{}", self.base(), id_segment(remote_id)?),
                &[],
                None,
            )
            .await?;
        accepted(status, || error_message(&text))
    }

    fn http(&self) -> &Http {
        &self.http
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_stable_uuids() {
        let a = idempotency_key("harvestd:job:run:0", 1);
        assert_eq!(a, idempotency_key("harvestd:job:run:0", 1));
        assert_ne!(a, idempotency_key("harvestd:job:run:0", 2));
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert_eq!(
            next_skip("https://other.host/v2/batch/scrape/x?skip=100&limit=5"),
            Some(100)
        );
        assert_eq!(
            error_message(r#"{"success":false,"error":"Job expired"}"#),
            "Job expired"
        );
    }
}
