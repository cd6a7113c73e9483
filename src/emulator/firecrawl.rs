//! Firecrawl batch scrape (`/v1` and `/v2/batch/scrape…`) as firecrawl.md
//! §1 and §2 describe it: strict submission with the URL quirks, credits
//! (402), v1 idempotency keys (409), documents in completion order, failed
//! URLs only in `/errors`, pages capped by count and bytes with `next`
//! present while running, status lag, expiry, cancel.
//!
//! Not emulated: webhooks, `appendToId`, per-team concurrency and the
//! S1 self-host pagination bug.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use rand::seq::SliceRandom;
use serde_json::{json, Value};

use super::scenario::FirecrawlScenario;
use super::{json as json_reply, query, LedgerEntry, Reply, State};

/// The key the emulator counts Firecrawl collections under: the account.
pub const ACCOUNT: &str = "firecrawl";

/// Body keys the batch endpoint knows; others are a 400 (strict schema).
const KNOWN_KEYS: &[&str] = &[
    "urls",
    "ignoreInvalidURLs",
    "formats",
    "webhook",
    "maxConcurrency",
    "appendToId",
    "zeroDataRetention",
    "timeout",
    "waitFor",
    "onlyMainContent",
    "includeTags",
    "excludeTags",
    "headers",
    "mobile",
    "actions",
    "location",
    "blockAds",
    "removeBase64Images",
    "storeInCache",
    "skipTlsVerification",
    "proxy",
    "maxAge",
    "parsePDF",
    "parsers",
    "origin",
    "jsonOptions",
    "extract",
];

/// Scrape options only v2's schema has. firecrawl-py 4.x sends `fastMode`
/// (with the other scrape options) whenever any is given, so refusing it
/// refuses the official client.
const V2_ONLY_KEYS: &[&str] = &[
    "fastMode",
    "useMock",
    "minAge",
    "lockdown",
    "onlyCleanContent",
    "integration",
    // In upstream's v2 `baseScrapeOptions`; firecrawl-py 4.55.0 sends each
    // when asked for (tests/sdk).
    "threatProtection",
    "auditMetadata",
    "redactPII",
    "profile",
];

enum Outcome {
    /// A document; `status_code` is the page's HTTP status.
    Document { status_code: u16 },
    /// A failed URL: only in `/errors`, never in `data`.
    Failed,
}

struct UrlJob {
    url: String,
    index: usize,
    done_ms: i64,
    outcome: Outcome,
}

/// A batch scrape job.
pub(crate) struct Batch {
    id: String,
    created_ms: i64,
    cancelled_ms: Option<i64>,
    /// In completion order.
    urls: Vec<UrlJob>,
    served: Arc<AtomicBool>,
    scenario: FirecrawlScenario,
    /// Credits billed per saved page: 1, or 5 with a JSON (extraction)
    /// format, as self-hosted Firecrawl counts `creditsUsed`.
    page_cost: usize,
}

impl Batch {
    /// When the job as a whole is reported done (after the status lag).
    fn completed_ms(&self) -> i64 {
        let last = self.urls.last().map_or(self.created_ms, |u| u.done_ms);
        last + self.scenario.status_lag.as_millis() as i64
    }

    fn status(&self, now: i64) -> &'static str {
        if self.cancelled_ms.is_some() {
            "cancelled"
        } else if now >= self.completed_ms() {
            "completed"
        } else {
            "scraping"
        }
    }

    fn expired(&self, now: i64) -> bool {
        let end = self.cancelled_ms.unwrap_or_else(|| self.completed_ms());
        self.status(now) != "scraping" && now > end + self.scenario.retention.as_millis() as i64
    }

    /// Whether this URL has finished by `now` (a cancel stops the rest).
    fn finished(&self, u: &UrlJob, now: i64) -> bool {
        let until = self.cancelled_ms.map_or(now, |c| c.min(now));
        u.done_ms <= until
    }

    fn documents(&self, now: i64) -> impl Iterator<Item = &UrlJob> {
        self.urls
            .iter()
            .filter(move |u| self.finished(u, now) && matches!(u.outcome, Outcome::Document { .. }))
    }

    /// URLs not failed (so far): failures leave `total` (§1.3).
    fn total(&self, now: i64) -> usize {
        self.urls
            .iter()
            .filter(|u| {
                let failed = matches!(u.outcome, Outcome::Failed) && self.finished(u, now);
                let cut = self.cancelled_ms.is_some() && !self.finished(u, now);
                !failed && !cut
            })
            .count()
    }

    fn document(&self, u: &UrlJob) -> Value {
        let status_code = match u.outcome {
            Outcome::Document { status_code } => status_code,
            Outcome::Failed => 0,
        };
        let mut doc = json!({
            "markdown": format!("# Page {}\n\nEmulated content of {}.", u.index, u.url),
            "metadata": {
                "title": format!("Page {}", u.index),
                "sourceURL": u.url,
                "url": u.url,
                "statusCode": status_code,
                "scrapeId": format!("{}-{:06}", self.id, u.index),
                "creditsUsed": 1,
            },
        });
        let so_far = doc.to_string().len();
        if self.scenario.doc_bytes > so_far + 2 {
            let pad = "z".repeat(self.scenario.doc_bytes - so_far - 2);
            if let Some(Value::String(md)) = doc.get_mut("markdown") {
                md.push_str(&pad);
            }
        }
        doc
    }
}

pub(crate) fn endpoint_of(method: &Method, path: &str) -> Option<&'static str> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (&Method::POST, ["v1" | "v2", "batch", "scrape"]) => Some("fc_batch"),
        (&Method::GET, ["v1" | "v2", "batch", "scrape", _]) => Some("fc_status"),
        (&Method::GET, ["v1" | "v2", "batch", "scrape", _, "errors"]) => Some("fc_errors"),
        (&Method::DELETE, ["v1" | "v2", "batch", "scrape", _]) => Some("fc_cancel"),
        _ => None,
    }
}

fn version_of(req: &Request<Incoming>) -> u8 {
    if req.uri().path().starts_with("/v1/") {
        1
    } else {
        2
    }
}

/// The request's `Host`, which the answer's `url` and `next` links name.
fn host_of(req: &Request<Incoming>) -> String {
    req.headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost")
        .to_string()
}

fn fail(status: StatusCode, error: &str) -> Reply {
    json_reply(status, &json!({"success": false, "error": error}))
}

/// Firecrawl's three 401 bodies (§1.2).
pub(crate) fn check_auth(state: &State, req: &Request<Incoming>) -> Option<Reply> {
    let Some(header) = req.headers().get(http::header::AUTHORIZATION) else {
        return Some(fail(StatusCode::UNAUTHORIZED, "Unauthorized"));
    };
    let header = header.to_str().unwrap_or_default().trim();
    let token = header.strip_prefix("Bearer").unwrap_or_default().trim();
    if token.is_empty() {
        return Some(fail(
            StatusCode::UNAUTHORIZED,
            "Unauthorized: Token missing",
        ));
    }
    if !state.scenario.tokens.iter().any(|t| t == token) {
        return Some(fail(
            StatusCode::UNAUTHORIZED,
            "Unauthorized: Invalid token",
        ));
    }
    None
}

/// The 429 body: the wait only in the message (§0.7).
pub(crate) fn rate_limit_body(secs: u64) -> String {
    json!({
        "success": false,
        "error": format!("Rate limit exceeded. Consumed (req/min): 101, Remaining (req/min): 0. Upgrade your plan at https://firecrawl.dev/pricing for increased rate limits or please retry after {secs}s, resets at Mon Nov 23 2026 10:00:00 GMT+0000 (Coordinated Universal Time)"),
    })
    .to_string()
}

pub(crate) async fn handle(state: &Arc<State>, req: Request<Incoming>, endpoint: &str) -> Reply {
    match endpoint {
        "fc_batch" => submit(state, req).await,
        "fc_status" => status(state, &req),
        "fc_errors" => errors(state, &req),
        "fc_cancel" => cancel(state, &req),
        _ => fail(StatusCode::NOT_FOUND, "Not found"),
    }
}

/// The URL after Firecrawl's normalisation, or why it is invalid (§1.2).
fn check_url(raw: &str) -> Result<String, &'static str> {
    let url = if raw.contains("://") {
        raw.to_string()
    } else {
        format!("http://{raw}")
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err("Invalid URL");
    };
    if !matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https") {
        return Err("Invalid URL");
    }
    // A dot, at least two alphanumerics, an optional port, then `/ ? #` or
    // the end: so `http://127.0.0.1:8080/` fails and `…/page.html` passes.
    let bytes = rest.as_bytes();
    let tld_ok = (0..bytes.len()).any(|dot| {
        if bytes[dot] != b'.' {
            return false;
        }
        let mut i = dot + 1;
        while i < bytes.len() && bytes[i].is_ascii_alphanumeric() {
            i += 1;
        }
        if i - dot - 1 < 2 {
            return false;
        }
        if i < bytes.len() && bytes[i] == b':' {
            let start = i + 1;
            i = start;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            if i == start {
                return false;
            }
        }
        i == bytes.len() || matches!(bytes[i], b'/' | b'?' | b'#')
    });
    if !tld_ok {
        return Err("URL must have a valid top-level domain or be a valid path");
    }
    Ok(url)
}

fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

async fn submit(state: &Arc<State>, req: Request<Incoming>) -> Reply {
    let version = version_of(&req);
    let host = host_of(&req);
    let idempotency = req
        .headers()
        .get("x-idempotency-key")
        .and_then(|h| h.to_str().ok())
        .map(str::to_string);
    let body = match Limited::new(req.into_body(), 10 * 1024 * 1024)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        // Over the body-parser limit: not special-cased upstream (§1.2).
        Err(_) => {
            return json_reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({"success": false, "code": "UNKNOWN_ERROR", "error": "An unexpected error occurred. Please contact help@firecrawl.com for help. Your exception ID is 00000000-0000-4000-8000-000000000000"}),
            )
        }
    };
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(&body) else {
        return json_reply(
            StatusCode::BAD_REQUEST,
            &json!({"success": false, "code": "BAD_REQUEST_INVALID_JSON", "error": "Bad request, malformed JSON"}),
        );
    };
    let urls: Vec<&str> = body
        .get("urls")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    // Credits come before validation (§1.1 middleware order).
    {
        let credits = state.credits.lock().unwrap_or_else(|e| e.into_inner());
        if credits.is_some_and(|c| c < urls.len() as u64) {
            return fail(StatusCode::PAYMENT_REQUIRED, "Insufficient credits to perform this request. For more credits, you can upgrade your plan at https://firecrawl.dev/pricing or try changing the request limit to a lower value.");
        }
    }
    let bad_request = |details: Value, error: &str| {
        json_reply(
            StatusCode::BAD_REQUEST,
            &json!({"success": false, "code": "BAD_REQUEST", "error": error, "details": details}),
        )
    };
    // v1 only: the idempotency middleware records the key before the
    // controller validates the body, so a key is spent by any request that
    // gets this far, even one then refused with 400 (§1.1 middleware order).
    if version == 1 {
        if let Some(key) = &idempotency {
            let mut seen = state.idempotency.lock().unwrap_or_else(|e| e.into_inner());
            if !is_uuid(key) || !seen.insert(key.clone()) {
                return fail(StatusCode::CONFLICT, "Idempotency key already used");
            }
        }
    }
    let known = |k: &str| KNOWN_KEYS.contains(&k) || (version == 2 && V2_ONLY_KEYS.contains(&k));
    let unknown: Vec<&String> = body.keys().filter(|k| !known(k)).collect();
    if !unknown.is_empty() {
        return bad_request(
            json!([{"code": "unrecognized_keys", "keys": unknown, "path": [], "message": "Unrecognized key in body -- please review the API documentation for request body changes"}]),
            "Bad Request",
        );
    }
    let all_strings = body
        .get("urls")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().all(Value::is_string));
    if !all_strings || (version == 2 && urls.is_empty()) {
        return bad_request(
            json!([{"code": "invalid_type", "path": ["urls"], "message": "urls must be a non-empty array of strings"}]),
            "Bad Request",
        );
    }
    // Lenient only when the value sent is literally true (§0.6).
    let lenient = body.get("ignoreInvalidURLs") == Some(&Value::Bool(true));
    let mut accepted = Vec::new();
    let mut invalid = Vec::new();
    for (i, raw) in urls.iter().enumerate() {
        match check_url(raw) {
            Ok(url) => accepted.push(url),
            Err(message) if !lenient => {
                return bad_request(
                    json!([{"code": "custom", "path": ["urls", i], "message": message}]),
                    message,
                )
            }
            Err(_) => invalid.push(raw.to_string()),
        }
    }
    if accepted.is_empty() && !urls.is_empty() {
        return fail(StatusCode::BAD_REQUEST, "No valid URLs provided");
    }
    {
        let mut credits = state.credits.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = credits.as_mut() {
            *c = c.saturating_sub(accepted.len() as u64);
        }
    }
    let now = state.now_ms();
    let id = uuid(state);
    let scenario = state.scenario.firecrawl.clone();
    let n = accepted.len();
    // Completion order unrelated to the input order (§0.4).
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut *state.rng.lock().unwrap_or_else(|e| e.into_inner()));
    let build = scenario.build_time.as_millis() as i64;
    let mut jobs: Vec<UrlJob> = accepted
        .into_iter()
        .enumerate()
        .map(|(index, url)| {
            let position = order[index] as i64 + 1;
            let every = |k: u32| k > 0 && (index as u64 + 1).is_multiple_of(u64::from(k));
            UrlJob {
                url,
                index,
                done_ms: now + build * position / n.max(1) as i64,
                outcome: if every(scenario.fail_every) {
                    Outcome::Failed
                } else if every(scenario.http_error_every) {
                    Outcome::Document { status_code: 404 }
                } else {
                    Outcome::Document { status_code: 200 }
                },
            }
        })
        .collect();
    jobs.sort_by_key(|u| (u.done_ms, u.index));
    let mut params: std::collections::BTreeMap<String, String> = body
        .iter()
        .filter(|(k, _)| *k != "urls")
        .map(|(k, v)| (k.clone(), v.to_string()))
        .collect();
    params.insert("version".into(), format!("v{version}"));
    let extraction = |f: &Value| match f {
        Value::String(s) => s == "json" || s == "extract",
        Value::Object(o) => o.get("type").and_then(Value::as_str) == Some("json"),
        _ => false,
    };
    let page_cost = match body.get("formats").and_then(Value::as_array) {
        Some(formats) if formats.iter().any(extraction) => 5,
        _ => 1,
    };
    state.in_flight(ACCOUNT, 1);
    state.bill(LedgerEntry {
        provider: "firecrawl".into(),
        remote_id: id.clone(),
        key: ACCOUNT.into(),
        inputs: n as u64,
        name: idempotency.filter(|_| version == 1),
        time: now,
        params,
    });
    state
        .batches
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            id.clone(),
            Batch {
                id: id.clone(),
                created_ms: now,
                cancelled_ms: None,
                urls: jobs,
                served: Arc::new(AtomicBool::new(false)),
                scenario,
                page_cost,
            },
        );
    let mut answer = json!({
        "success": true,
        "id": id,
        "url": format!("http://{host}/v{version}/batch/scrape/{id}"),
    });
    if version == 2 || lenient {
        answer["invalidURLs"] = json!(invalid);
    }
    json_reply(StatusCode::OK, &answer)
}

fn uuid(state: &State) -> String {
    let tail = state.random_id("");
    let hex: String = tail
        .bytes()
        .chain(state.random_id("").bytes())
        .map(|b| format!("{:x}", b % 16))
        .take(32)
        .collect();
    format!(
        "{}-{}-4{}-a{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

/// Runs `body` on the job, or answers the 404 that stands for it
/// (unknown, expired).
fn with_batch(
    state: &State,
    req: &Request<Incoming>,
    body: impl FnOnce(&Batch, i64) -> Value,
) -> Reply {
    let now = state.now_ms();
    let batches = state.batches.lock().unwrap_or_else(|e| e.into_inner());
    let Some(batch) = batches.get(&super::path_segment(req, 3)) else {
        return fail(StatusCode::NOT_FOUND, "Job not found");
    };
    if batch.expired(now) {
        return fail(StatusCode::NOT_FOUND, "Job expired");
    }
    json_reply(StatusCode::OK, &body(batch, now))
}

/// Stands for the malformed document in a page's JSON until its bytes,
/// which no JSON value can hold, are put in its place.
const MALFORMED_MARK: &str = "\u{1}emulator-malformed-document\u{1}";

/// The page `body` with the malformed document's bytes in place of its
/// mark, if the page holds it.
fn with_malformed(batch: &Batch, body: &Value) -> Reply {
    let text = body.to_string();
    let mark = Value::String(MALFORMED_MARK.into()).to_string();
    let (Some(kind), Some(at)) = (batch.scenario.malformed_document, text.find(&mark)) else {
        return json_reply(StatusCode::OK, body);
    };
    let url = batch
        .urls
        .iter()
        .find(|u| u.index == batch.scenario.malformed_at)
        .map_or_else(
            || "null".to_string(),
            |u| Value::String(u.url.clone()).to_string(),
        );
    let mut out = text.as_bytes()[..at].to_vec();
    out.extend_from_slice(&super::malformed_row(kind, &url, 2 * 1024 * 1024));
    out.extend_from_slice(&text.as_bytes()[at + mark.len()..]);
    super::full(StatusCode::OK, "application/json", out)
}

fn status(state: &Arc<State>, req: &Request<Incoming>) -> Reply {
    let q = query(req);
    let skip: usize = q.get("skip").and_then(|v| v.parse().ok()).unwrap_or(0);
    let limit: Option<usize> = q.get("limit").and_then(|v| v.parse().ok());
    let host = host_of(req);
    let version = version_of(req);
    let mut malformed = None;
    let reply = with_batch(state, req, |batch, now| {
        let sc = &batch.scenario;
        if sc.kickoff_failure {
            if !batch.served.swap(true, Ordering::Relaxed) {
                state.in_flight(ACCOUNT, -1);
            }
            return json!({
                "success": false, "status": "failed", "error": "Failed to start the batch: queue full",
                "completed": 0, "total": 0, "creditsUsed": 0, "data": [],
            });
        }
        let cap = limit.unwrap_or(sc.page_docs).max(1);
        let completed = batch.documents(now).count();
        // Self-hosted S1 forgets finished jobs: `completed` keeps them.
        let kept = |u: &&UrlJob| {
            sc.docs_vanish_after.is_none_or(|d| {
                now <= u
                    .done_ms
                    .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            })
        };
        let docs: Vec<&UrlJob> = batch.documents(now).filter(kept).collect();
        let mut data = Vec::new();
        let mut bytes = 0usize;
        for u in docs.iter().skip(skip).take(cap) {
            let doc = match batch.scenario.malformed_document {
                Some(_) if u.index == batch.scenario.malformed_at => json!(MALFORMED_MARK),
                _ => batch.document(u),
            };
            let len = doc.to_string().len();
            // The document that crosses the cap waits for the next page,
            // unless it would be the page's only one.
            if bytes + len > batch.scenario.page_bytes && !data.is_empty() {
                break;
            }
            bytes += len;
            data.push(doc);
        }
        let returned = data.len();
        let total = batch.total(now);
        let status = batch.status(now);
        // "now + 24 h" on every read, milliseconds zeroed (§1.3).
        let expires = super::iso((now / 1000 + 24 * 3600) * 1000);
        let expires = match sc.expires_at_seconds {
            true => expires,
            false => expires.replacen('Z', ".000Z", 1),
        };
        let credits = match sc.credits_unknown {
            true => json!(-1),
            false => json!(completed * batch.page_cost),
        };
        let mut body = json!({
            "success": true,
            "status": status,
            "completed": completed,
            "total": total,
            "creditsUsed": credits,
            "expiresAt": expires,
            "data": data,
        });
        if let (Some(warning), false) = (&sc.warning, status == "scraping") {
            body["warning"] = json!(warning);
        }
        // Present while more may come, even on an empty page at the same
        // skip while running (§1.3). Vanished documents are not among
        // those to come.
        let vanished = completed - docs.len();
        if total.saturating_sub(vanished) > skip + returned {
            let base = sc
                .next_base
                .clone()
                .unwrap_or_else(|| format!("http://{host}"));
            let mut next = format!(
                "{base}/v{version}/batch/scrape/{}?skip={}",
                batch.id,
                skip + returned
            );
            if let Some(l) = limit {
                next.push_str(&format!("&limit={l}"));
            }
            body["next"] = json!(next);
        } else if status != "scraping" && !batch.served.swap(true, Ordering::Relaxed) {
            state.in_flight(ACCOUNT, -1);
        }
        if batch.scenario.malformed_document.is_some() {
            malformed = Some(with_malformed(batch, &body));
        }
        body
    });
    malformed.unwrap_or(reply)
}

fn errors(state: &State, req: &Request<Incoming>) -> Reply {
    with_batch(state, req, |batch, now| {
        let errors: Vec<Value> = batch
            .urls
            .iter()
            .filter_map(|u| {
                let cancelled = batch.cancelled_ms.is_some() && !batch.finished(u, now);
                let failed = matches!(u.outcome, Outcome::Failed) && batch.finished(u, now);
                let (code, error) = if failed {
                    ("SCRAPE_TIMEOUT", "Scrape timed out".to_string())
                } else if cancelled {
                    (
                        "UNKNOWN_ERROR",
                        "Parent batch scrape was cancelled".to_string(),
                    )
                } else {
                    return None;
                };
                Some(json!({
                    "id": format!("{}-{:06}", batch.id, u.index),
                    "timestamp": super::iso(u.done_ms),
                    "url": u.url,
                    "code": code,
                    "error": error,
                }))
            })
            .collect();
        json!({"errors": errors, "robotsBlocked": []})
    })
}

fn cancel(state: &State, req: &Request<Incoming>) -> Reply {
    let now = state.now_ms();
    let mut batches = state.batches.lock().unwrap_or_else(|e| e.into_inner());
    let Some(batch) = batches.get_mut(&super::path_segment(req, 3)) else {
        return json_reply(StatusCode::NOT_FOUND, &json!({"error": "Job not found"}));
    };
    if batch.status(now) != "scraping" {
        return json_reply(
            StatusCode::CONFLICT,
            &json!({"error": "Crawl is already completed"}),
        );
    }
    batch.cancelled_ms = Some(now);
    json_reply(StatusCode::OK, &json!({"status": "cancelled"}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_rules_follow_upstream_quirks() {
        assert_eq!(check_url("example.com").unwrap(), "http://example.com");
        assert!(check_url("https://example.com/a?b=1").is_ok());
        assert!(check_url("http://127.0.0.1:8080/").is_err());
        assert!(check_url("http://127.0.0.1:8080/page.html").is_ok());
        assert!(check_url("http://localhost:3000/x").is_err());
        assert!(check_url("ftp://example.com/").is_err());
        assert!(check_url("https://shop.example.co.uk:8443/p").is_ok());
        assert!(is_uuid("123e4567-e89b-42d3-a456-426614174000"));
        assert!(!is_uuid("not-a-uuid"));
    }
}
