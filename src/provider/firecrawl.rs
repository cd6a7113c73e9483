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
use crate::jsonstream::{ArraySplitter, Element};
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
    /// Read leniently: `-1` (billing unreadable), a fraction or a string
    /// is "not reported", never a failed poll.
    #[serde(rename = "creditsUsed", default)]
    credits_used: Option<Value>,
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
    ) -> Result<Result<Vec<u8>, DownloadOutcome>, CallError> {
        let endpoint = self.ep(what);
        let (status, bytes) = self.http.get_bytes(endpoint, path, query, MAX_PAGE).await?;
        let text = || String::from_utf8_lossy(&bytes[..bytes.len().min(64 * 1024)]).into_owned();
        if let Some(outcome) = gone(status, &text()) {
            return Ok(Err(outcome));
        }
        if !(200..300).contains(&status) {
            return Err(CallError::Protocol(format!(
                "{endpoint} answered {status}: {}",
                one_line(&text())
            )));
        }
        if bytes.trim_ascii_start().starts_with(b"<") {
            return Err(CallError::Transient {
                detail: format!("{endpoint} answered with an HTML page"),
                sent: true,
            });
        }
        Ok(Ok(bytes))
    }

    /// The failed URLs (`/errors`), as error rows; the last page.
    async fn errors(
        &self,
        remote_id: &str,
        sink: &mut dyn RowSink,
    ) -> Result<DownloadOutcome, CallError> {
        let bytes = match self
            .fetch(
                "errors",
                &format!("{}/{}/errors", self.base(), id_segment(remote_id)?),
                &[],
            )
            .await?
        {
            Ok(bytes) => bytes,
            Err(outcome) => return Ok(outcome),
        };
        #[derive(Deserialize)]
        struct Errors<'a> {
            #[serde(borrow, default)]
            errors: Vec<&'a RawValue>,
            #[serde(default, rename = "robotsBlocked")]
            robots_blocked: Vec<String>,
        }
        let page: Errors = serde_json::from_slice(&bytes).map_err(|e| {
            CallError::Protocol(format!(
                "errors answer: {e}: {}",
                one_line(&String::from_utf8_lossy(&bytes[..bytes.len().min(300)]))
            ))
        })?;
        let max_row = self.http.gate.config().max_row_bytes;
        for entry in page.errors {
            row(entry, 0, max_row, sink)?;
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
fn row(raw: &RawValue, at: u64, max_row: u64, sink: &mut dyn RowSink) -> Result<(), CallError> {
    let text = raw.get();
    let result = if text.len() as u64 > max_row {
        let head = &text.as_bytes()[..usize::try_from(max_row).unwrap_or(usize::MAX)];
        sink.oversize_row(head, text.len() as u64, at)
    } else if text.contains('\n') {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| CallError::Protocol(format!("document: {e}")))?;
        sink.row_at(value.to_string().as_bytes(), at)
    } else {
        sink.row_at(text.as_bytes(), at)
    };
    result.map_err(CallError::Sink)
}

/// A status answer or result page. A page one of whose documents is not
/// JSON (not UTF-8, a raw control character, too deep) is read without its
/// `data` array, kept in `rest`; the array's place in `bytes` is returned
/// so that its documents can be split and checked one by one.
fn parse_page<'a>(
    bytes: &'a [u8],
    rest: &'a mut Vec<u8>,
) -> Result<(Page<'a>, Option<(usize, usize)>), CallError> {
    let first = match serde_json::from_slice::<Page>(bytes) {
        Ok(page) => return Ok((page, None)),
        Err(e) => e,
    };
    let unreadable = || {
        CallError::Protocol(format!(
            "page: {first}: {}",
            one_line(&String::from_utf8_lossy(&bytes[..bytes.len().min(300)]))
        ))
    };
    let (start, end) = data_array(bytes).ok_or_else(unreadable)?;
    rest.extend_from_slice(&bytes[..start]);
    rest.extend_from_slice(b"[]");
    rest.extend_from_slice(&bytes[end..]);
    let rest: &'a Vec<u8> = rest;
    let page = serde_json::from_slice::<Page>(rest).map_err(|_| unreadable())?;
    Ok((page, Some((start, end))))
}

/// Where the top-level `"data"` array of a page object is, `[` to just
/// after `]`, found from the structure alone (strings, brackets), so that
/// a document no JSON reader takes cannot hide the others.
fn data_array(page: &[u8]) -> Option<(usize, usize)> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let mut key_start = 0;
    let mut i = 0;
    while i < page.len() {
        let b = page[i];
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => {
                    in_string = false;
                    if depth == 1 && &page[key_start..i] == b"data" {
                        let mut j = i + 1;
                        let skip_ws = |j: &mut usize| {
                            while page.get(*j).is_some_and(u8::is_ascii_whitespace) {
                                *j += 1;
                            }
                        };
                        skip_ws(&mut j);
                        if page.get(j) == Some(&b':') {
                            j += 1;
                            skip_ws(&mut j);
                            if page.get(j) == Some(&b'[') {
                                return array_end(page, j).map(|end| (j, end));
                            }
                        }
                    }
                }
                _ => {}
            }
        } else {
            match b {
                b'"' => {
                    in_string = true;
                    key_start = i + 1;
                }
                b'{' | b'[' => depth += 1,
                b'}' | b']' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// Just after the `]` that closes the array opening at `start`.
fn array_end(page: &[u8], start: usize) -> Option<usize> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, &b) in page.iter().enumerate().skip(start) {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
    }
    None
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
        // The one document a status answer carries may be unreadable: the
        // status is read without it (the download reports it).
        let mut rest = Vec::new();
        let (page, _) = parse_page(text.as_bytes(), &mut rest)?;
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
                    .map(|t| t.saturating_add(crate::clock::millis(RETENTION)))
                    .or_else(|| page.expires_at.as_deref().and_then(parse_time)),
                start: None,
                credits_used: page.credits_used.as_ref().and_then(Value::as_u64),
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
        let bytes = match self
            .fetch("status", &path, &[("skip", skip.to_string())])
            .await?
        {
            Ok(bytes) => bytes,
            Err(outcome) => return Ok(outcome),
        };
        let mut rest = Vec::new();
        let (page, unreadable) = parse_page(&bytes, &mut rest)?;
        if page.status.as_deref() == Some("scraping") {
            // More URLs were appended: not finished after all.
            return Ok(DownloadOutcome::NotReady);
        }
        let max_row = self.http.gate.config().max_row_bytes;
        let returned = match unreadable {
            // Every document is JSON: each is written as it came.
            None => {
                let n = page.data.len() as u64;
                for doc in page.data {
                    let at = (doc.get().as_ptr() as usize).saturating_sub(bytes.as_ptr() as usize);
                    row(doc, at as u64, max_row, sink)?;
                }
                n
            }
            // Some document is not: the array is split by its structure,
            // and each document checked alone (the bad ones become
            // malformed rows).
            Some((start, end)) => {
                let mut splitter =
                    ArraySplitter::with_max_element(usize::try_from(max_row).unwrap_or(usize::MAX));
                let mut n = 0u64;
                splitter
                    .feed_elements(&bytes[start..end], |doc, at| {
                        n += 1;
                        let at = start as u64 + at;
                        match doc {
                            Element::Whole(raw) => sink.row_at(raw, at),
                            Element::Cut { head, len } => sink.oversize_row(head, len, at),
                        }
                    })
                    .map_err(|e| match e {
                        Ok(io) => CallError::Sink(io),
                        Err(split) => CallError::Protocol(format!("page: {split}")),
                    })?;
                n
            }
        };
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

    /// A page with an unreadable document is read without its documents,
    /// which are then split by structure alone; a readable page is read
    /// as it is.
    #[test]
    fn a_page_with_an_unreadable_document_is_read_around_it() {
        let page = b"{\"success\":true,\"note\":{\"data\":[9]},\"status\":\"completed\",\"data\" : [{\"a\":\"]\\\"\"},{\"b\":\"\xff\x01\"}],\"next\":null}";
        let mut rest = Vec::new();
        let (parsed, unreadable) = parse_page(page, &mut rest).unwrap();
        assert_eq!(parsed.status.as_deref(), Some("completed"));
        let (start, end) = unreadable.unwrap();
        assert_eq!(
            &page[start..end],
            b"[{\"a\":\"]\\\"\"},{\"b\":\"\xff\x01\"}]"
        );
        let good = br#"{"status":"completed","data":[{"a":1}]}"#;
        let mut unused = Vec::new();
        let (parsed, unreadable) = parse_page(good, &mut unused).unwrap();
        assert_eq!((parsed.data.len(), unreadable), (1, None));
        assert!(parse_page(b"{\"status\":\"\x01\",\"data\":[]}", &mut Vec::new()).is_err());
        assert!(parse_page(b"{\"data\":[{\"a\":1}", &mut Vec::new()).is_err());
    }

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
