//! The shared HTTP driver: every call to a provider goes through
//! [`Http::send`], which waits at the [`ProviderGate`], adds the token, and
//! turns status codes that mean the same for every API (429, 401/402/403, 5xx,
//! network faults) into [`CallError`]s. Everything else goes back to the
//! provider to decode.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use reqwest::header::HeaderValue;
use reqwest::{Method, Response};

use super::CallError;
use crate::config::Token;
use crate::limits::ProviderGate;

/// Calls by (endpoint, status class), for metrics.
pub struct CallStats {
    counts: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Seconds from sending a call to its answer's headers, by endpoint;
    /// the `api` label tells the clients apart.
    pub latency: prometheus::HistogramVec,
}

/// Buckets of `harvestd_request_duration_seconds`: a poll answers in tens
/// of milliseconds, a big download's headers may take a minute.
const LATENCY_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The status classes counted, by the status code's first digit (1 to 5;
/// anything else is "other").
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl CallStats {
    fn new(api: &'static str) -> CallStats {
        let opts = prometheus::HistogramOpts::new(
            "harvestd_request_duration_seconds",
            "Provider calls: seconds from sending to the answer's headers, by API and endpoint.",
        )
        .const_label("api", api)
        .buckets(LATENCY_BUCKETS.to_vec());
        CallStats {
            counts: Mutex::default(),
            // The name, labels and buckets are constants: this cannot fail.
            latency: prometheus::HistogramVec::new(opts, &["endpoint"])
                .unwrap_or_else(|e| unreachable!("{e}")),
        }
    }

    fn count(&self, endpoint: &'static str, class: &'static str) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        *c.entry((endpoint, class)).or_default() += 1;
    }

    pub fn snapshot(&self) -> Vec<(&'static str, String, u64)> {
        let c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.iter()
            .map(|((e, s), n)| (*e, s.to_string(), *n))
            .collect()
    }
}

pub struct Http {
    /// The provider's name, for messages.
    name: &'static str,
    client: reqwest::Client,
    /// The provider's base URL, parsed once: parsing the whole URL (host
    /// name rules included) for every call was 4 % of the daemon's CPU
    /// polling 10,000 collections. Each call only sets the path. `Err`
    /// (why not) only for a URL that `Config::validate` has not seen.
    base: Result<reqwest::Url, String>,
    /// The token's generation, bumped at every change (an auth refusal of
    /// an older token says nothing about the current one), and its
    /// `Authorization` header, made once (`Err`: why the token cannot be
    /// sent).
    token: RwLock<(u64, Option<Result<HeaderValue, String>>)>,
    pub gate: Arc<ProviderGate>,
    pub timeout: Duration,
    pub stats: CallStats,
}

/// The endpoints that create a collection (for the `after-send` fail point).
const TRIGGERS: &[&str] = &["dca_trigger", "v3_trigger", "v1_batch", "v2_batch"];

/// Reads at most this much of an error body or a trigger answer.
const SMALL_BODY: usize = 64 * 1024;

/// A status answer larger than this is a transient error (`docs/limits.md`).
pub const STATUS_MAX: usize = 1024 * 1024;

impl Http {
    /// Names this client's calls `api` in `/metrics`, where two clients
    /// share a provider's name (Firecrawl v1 and v2).
    pub fn labelled(mut self, api: &'static str) -> Http {
        self.stats = CallStats::new(api);
        self
    }

    pub fn new(
        name: &'static str,
        base: &str,
        token: Option<Token>,
        gate: Arc<ProviderGate>,
        timeout: Duration,
    ) -> Http {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // An idle body (a stalled download) is a fault, not a slow file.
            .read_timeout(timeout)
            .user_agent(concat!("harvestd/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Http {
            name,
            client,
            base: reqwest::Url::parse(base)
                .map_err(|e| format!("the base URL '{base}' does not parse: {e}")),
            token: RwLock::new((0, token.as_ref().map(authorization))),
            gate,
            timeout,
            stats: CallStats::new(name),
        }
    }

    /// Counts a call's time in `harvestd_request_duration_seconds`, timeouts
    /// and failed connections included: the slowest calls are the point.
    fn observe(&self, endpoint: &'static str, sent_at: std::time::Instant) {
        if let Ok(h) = self.stats.latency.get_metric_with_label_values(&[endpoint]) {
            h.observe(sent_at.elapsed().as_secs_f64());
        }
    }

    /// Now on the provider's clock, as its latest answer to any API of
    /// the account told it.
    pub fn provider_now(&self) -> crate::chunk::UnixMs {
        self.gate.provider_now()
    }

    /// Notes the provider's clock from an answer's `Date` header.
    fn note_clock(&self, response: &Response) {
        let date = response
            .headers()
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok())
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok());
        if let Some(date) = date {
            // The header has whole seconds: on average half a second behind.
            self.gate
                .note_provider_clock(crate::clock::millis(date).saturating_add(500));
        }
    }

    pub fn set_token(&self, token: Option<Token>) {
        let mut t = self.token.write().unwrap_or_else(|e| e.into_inner());
        *t = (t.0 + 1, token.as_ref().map(authorization));
    }

    /// The base URL with `path` after its own path.
    fn url(&self, path: &str) -> Result<reqwest::Url, String> {
        let mut url = self.base.clone()?;
        let joined = format!("{}{path}", url.path().trim_end_matches('/'));
        url.set_path(&joined);
        Ok(url)
    }

    /// Blocks the provider, saying so once.
    fn block(&self, reason: String) {
        if self.gate.blocked().is_none() {
            tracing::error!(reason = %reason, "provider blocked: fix the token or account, then send SIGHUP");
        }
        self.gate.block(reason);
    }

    /// Sends one request. `Ok` for 2xx and for 4xx other than 401/402/403/429,
    /// which the provider decodes. Headers must arrive within the timeout; the
    /// body is read by the caller.
    pub async fn send(
        &self,
        endpoint: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<(&'static str, Bytes)>,
    ) -> Result<Response, CallError> {
        self.send_with(endpoint, method, path, query, body, &[])
            .await
    }

    /// [`Http::send`] with extra request headers.
    pub async fn send_with(
        &self,
        endpoint: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<(&'static str, Bytes)>,
        headers: &[(&'static str, String)],
    ) -> Result<Response, CallError> {
        let (generation, token) = self
            .token
            .read()
            .map(|t| (t.0, t.1.clone()))
            .unwrap_or((0, None));
        let ready = match token {
            None => Err("no API token configured".to_string()),
            Some(authorization) => authorization.and_then(|a| Ok((a, self.url(path)?))),
        };
        let (authorization, url) = match ready {
            Ok(ready) => ready,
            Err(message) => {
                self.block(format!("{}: {message}", self.name));
                return Err(CallError::Blocked { status: 0, message });
            }
        };
        self.gate.admit().await;
        let mut request = self
            .client
            .request(method, url)
            .header(reqwest::header::AUTHORIZATION, authorization)
            .query(query);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        if let Some((content_type, body)) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(body);
        }
        let sent_at = std::time::Instant::now();
        let response = match tokio::time::timeout(self.timeout, request.send()).await {
            Err(_) => {
                self.observe(endpoint, sent_at);
                self.stats.count(endpoint, "timeout");
                return Err(CallError::Transient {
                    detail: format!("{endpoint}: no answer within {:?}", self.timeout),
                    sent: true,
                });
            }
            Ok(Err(e)) => {
                self.observe(endpoint, sent_at);
                self.stats.count(endpoint, "network");
                return Err(CallError::Transient {
                    // Only a failed connect proves the request never left.
                    sent: !e.is_connect(),
                    detail: format!("{endpoint}: {}", error_chain(&e)),
                });
            }
            Ok(Ok(r)) => r,
        };
        self.observe(endpoint, sent_at);
        if TRIGGERS.contains(&endpoint) {
            crate::failpoint::crash("after-send");
        }
        self.note_clock(&response);
        // Bright Data's proxy layers say an error in a header, whatever the
        // status (a 200 among them), and the call was not carried out as
        // asked: retried like any transient fault; a trigger is in doubt.
        // Only where the status says success: a 401, 429 or 4xx keeps its
        // own meaning (a block, a pause, a refusal), header or not.
        let bright_data = self.name != "firecrawl";
        let brd_error = ["x-brd-error", "x-luminati-error", "x-brd-err-msg"]
            .iter()
            .filter(|_| bright_data && response.status().as_u16() < 400)
            .find_map(|h| response.headers().get(*h))
            .map(|v| {
                String::from_utf8_lossy(v.as_bytes())
                    .chars()
                    .take(200)
                    .collect::<String>()
            });
        if let Some(message) = brd_error {
            self.stats.count(endpoint, "brd_error");
            return Err(CallError::Transient {
                detail: format!("{endpoint}: x-brd-error: {message}"),
                sent: true,
            });
        }
        let status = response.status();
        let class = CLASSES.get(usize::from(status.as_u16() / 100).wrapping_sub(1));
        self.stats
            .count(endpoint, class.copied().unwrap_or("other"));
        match status.as_u16() {
            429 => {
                let header_wait = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after);
                let text = read_small(response).await.unwrap_or_default();
                let wait = header_wait.or_else(|| retry_after_in_text(&text));
                let pause = self.gate.rate_limited(wait);
                tracing::warn!(endpoint, ?pause, "429 from provider; pausing its calls");
                Err(CallError::RateLimited { wait })
            }
            401..=403 => {
                let message = one_line(&read_small(response).await.unwrap_or_default());
                // Blocked under the token lock: a token set meanwhile either
                // came first (then this refusal was for the old one and
                // blocks nothing) or comes after (and its unblock wins).
                let current = self.token.read().unwrap_or_else(|e| e.into_inner());
                if current.0 != generation {
                    return Err(CallError::Transient {
                        detail: format!("{endpoint}: {status} for the previous token; retrying with the new one"),
                        sent: false,
                    });
                }
                self.block(format!(
                    "{} answered {}: {message}",
                    self.name,
                    status.as_u16()
                ));
                drop(current);
                Err(CallError::Blocked {
                    status: status.as_u16(),
                    message,
                })
            }
            500..=599 => {
                let text = read_small(response).await.unwrap_or_default();
                Err(CallError::Transient {
                    detail: format!("{endpoint}: {status}: {}", one_line(&text)),
                    sent: true,
                })
            }
            _ => {
                self.gate.succeeded();
                Ok(response)
            }
        }
    }
}

impl Http {
    /// A GET whose answer may be large (a listing, a result page), read
    /// whole up to `max` bytes: a bigger one is a transient error (a status
    /// answer over 1 MiB, an endless body), because a cut answer proves
    /// nothing. The whole call, body included, is bounded by the timeout.
    pub async fn get_text(
        &self,
        endpoint: &'static str,
        path: &str,
        query: &[(&str, String)],
        max: usize,
    ) -> Result<(u16, String), CallError> {
        let (status, bytes) = self.get_bytes(endpoint, path, query, max).await?;
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// [`Http::get_text`] as the bytes that came, for answers whose rows
    /// must be checked as they are rather than with bad bytes replaced.
    pub async fn get_bytes(
        &self,
        endpoint: &'static str,
        path: &str,
        query: &[(&str, String)],
        max: usize,
    ) -> Result<(u16, Vec<u8>), CallError> {
        self.whole(endpoint, async {
            let response = self.send(endpoint, Method::GET, path, query, None).await?;
            let status = response.status().as_u16();
            let (bytes, dropped) = read_bytes(response, max).await?;
            if dropped {
                return Err(CallError::Transient {
                    detail: format!("{endpoint}: answer larger than {max} bytes"),
                    sent: true,
                });
            }
            Ok((status, bytes))
        })
        .await
    }

    /// [`Http::send`], then the answer's status and small body, all within
    /// the timeout.
    pub async fn call(
        &self,
        endpoint: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<(&'static str, Bytes)>,
    ) -> Result<(u16, String), CallError> {
        self.whole(endpoint, async {
            let response = self.send(endpoint, method, path, query, body).await?;
            let status = response.status().as_u16();
            Ok((status, read_small(response).await?))
        })
        .await
    }

    /// Runs a whole call (headers and body) within `request_timeout`: a
    /// body that trickles or never ends is a transient error, not a hang.
    pub async fn whole<T>(
        &self,
        endpoint: &'static str,
        call: impl std::future::Future<Output = Result<T, CallError>>,
    ) -> Result<T, CallError> {
        let limit = self.gate.config().request_timeout;
        match tokio::time::timeout(limit, call).await {
            Ok(result) => result,
            Err(_) => {
                self.stats.count(endpoint, "timeout");
                Err(CallError::Transient {
                    detail: format!(
                        "{endpoint}: the answer took longer than limits.request_timeout ({})",
                        humantime::format_duration(limit)
                    ),
                    sent: true,
                })
            }
        }
    }
}

/// The `Authorization` header for a token, marked sensitive so that it is
/// never logged; `Err` says why a token cannot be sent (never the token).
fn authorization(token: &Token) -> Result<HeaderValue, String> {
    let mut value = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
        .map_err(|_| "the API token has characters an HTTP header cannot carry".to_string())?;
    value.set_sensitive(true);
    Ok(value)
}

/// Reads a small body as text, keeping at most 64 KiB (error bodies and
/// status answers); a cut or stalled body is transient.
pub async fn read_small(response: Response) -> Result<String, CallError> {
    read_text(response, SMALL_BODY).await.map(|(text, _)| text)
}

/// Reads a body as text, keeping at most `max` bytes; also says whether
/// anything was dropped (see [`read_bytes`]).
pub async fn read_text(response: Response, max: usize) -> Result<(String, bool), CallError> {
    let (bytes, dropped) = read_bytes(response, max).await?;
    Ok((String::from_utf8_lossy(&bytes).into_owned(), dropped))
}

/// Reads a body, keeping at most `max` bytes; also says whether anything
/// was dropped. Reading stops at `max`: the rest of a larger (or endless)
/// body is never read, and the connection is dropped with it. A cut or
/// stalled body is transient.
pub async fn read_bytes(response: Response, max: usize) -> Result<(Vec<u8>, bool), CallError> {
    let mut stream = response.bytes_stream();
    let mut buf = Vec::new();
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| CallError::Transient {
            detail: format!("reading the answer: {}", error_chain(&e)),
            sent: true,
        })?;
        let room = max.saturating_sub(buf.len());
        buf.extend_from_slice(&piece[..piece.len().min(room)]);
        if piece.len() > room {
            return Ok((buf, true));
        }
    }
    Ok((buf, false))
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    // A date in the past still means "not before then": no wait beyond now,
    // but at least a second, as the date only has second resolution.
    Some(
        when.duration_since(SystemTime::now())
            .map(|d| d.saturating_add(Duration::from_secs(1)))
            .unwrap_or(Duration::from_secs(1)),
    )
}

/// Firecrawl puts the wait in the message: "… retry after 54s …".
pub fn retry_after_in_text(text: &str) -> Option<Duration> {
    let lower = text.to_ascii_lowercase();
    let at = lower.find("retry after ")? + "retry after ".len();
    let digits: String = lower[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok().map(Duration::from_secs)
}

pub fn one_line(text: &str) -> String {
    let t = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if t.len() > 300 {
        let mut end = 300;
        while !t.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &t[..end])
    } else {
        t
    }
}

pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `Http` for `base` with `token` and a gate of its own.
    fn http(base: &str, token: Option<&str>) -> Http {
        let gate = ProviderGate::new(&crate::config::LimitsConfig::default());
        Http::new(
            "test",
            base,
            token.map(Token::new),
            gate,
            Duration::from_secs(1),
        )
    }

    /// A base URL with a path of its own (a proxy's prefix) keeps it, and
    /// the token goes in a header marked sensitive.
    #[test]
    fn calls_go_under_the_base_url_with_the_token() {
        for base in ["http://127.0.0.1:9/api", "http://127.0.0.1:9/api/"] {
            let http = http(base, Some("t0k"));
            assert_eq!(
                http.url("/dca/log/j_1").unwrap().as_str(),
                "http://127.0.0.1:9/api/dca/log/j_1"
            );
            let token = http.token.read().unwrap();
            let header = token.1.as_ref().unwrap().as_ref().unwrap();
            assert_eq!(header.to_str().unwrap(), "Bearer t0k");
            assert!(header.is_sensitive());
        }
        // An id's segment stays one segment: no step up to another path.
        let hostile = crate::provider::id_segment("../../../admin/x").unwrap();
        assert_eq!(
            http("http://127.0.0.1:9/api", None)
                .url(&format!("/dca/log/{hostile}"))
                .unwrap()
                .as_str(),
            "http://127.0.0.1:9/api/dca/log/..%2F..%2F..%2Fadmin%2Fx"
        );
        assert_eq!(
            http("https://api.example.com", None)
                .url("/datasets/v3/progress/s_1")
                .unwrap()
                .as_str(),
            "https://api.example.com/datasets/v3/progress/s_1"
        );
    }

    /// A token no header can carry, or a base URL that does not parse,
    /// blocks the provider with the reason (and without the token).
    #[tokio::test]
    async fn an_unsendable_token_or_base_url_blocks_with_the_reason() {
        let bad_token = http("http://127.0.0.1:9", Some("t0k\nx"));
        let bad_base = http("127.0.0.1:9", Some("t0k"));
        for (http, why) in [(bad_token, "HTTP header"), (bad_base, "base URL")] {
            let err = http
                .send("dca_log", Method::GET, "/dca/log/j_1", &[], None)
                .await;
            let Err(CallError::Blocked { status: 0, message }) = err else {
                panic!("not blocked: {err:?}");
            };
            assert!(
                message.contains(why) && !message.contains("t0k"),
                "{message}"
            );
            assert!(http.gate.blocked().is_some_and(|b| b.reason.contains(why)));
        }
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        let in_10s = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(10));
        let d = parse_retry_after(&in_10s).unwrap();
        assert!(
            d >= Duration::from_secs(9) && d <= Duration::from_secs(11),
            "{d:?}"
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::from_secs(1))
        );
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(
            retry_after_in_text(
                "Rate limit exceeded. Consumed 10, please retry after 54s, resets at …"
            ),
            Some(Duration::from_secs(54))
        );
    }
}
