//! One trait for every remote API. A provider builds requests and decodes
//! answers; the shared [`http::Http`] driver owns the rate, pauses, blocks and
//! timeouts; the worker owns retries and persistence. Expected outcomes (still
//! building, not found yet, zero rows) are values, not errors. Providers never
//! touch the store.

pub mod firecrawl;
pub mod http;
pub mod scraper_studio;
pub mod web_scraper;

use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Map, Value};

use crate::chunk::UnixMs;
use crate::spec::ProviderKind;

/// One chunk's trigger.
pub struct TriggerCall<'a> {
    /// Collector, dataset id or account.
    pub key: &'a str,
    /// A tag unique to this chunk, sent where the API keeps one, so a lost
    /// answer can be found again.
    pub name: &'a str,
    /// The chunk's inputs, one JSON object per line.
    pub inputs_ndjson: &'a [u8],
    pub count: u64,
    pub params: &'a Map<String, Value>,
    /// Trigger calls made for this chunk before this one: with the name, it
    /// makes an idempotency key that a re-sent request repeats.
    pub attempt: u32,
}

/// An accepted trigger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Triggered {
    pub remote_id: String,
    /// Inputs the provider refused while accepting the rest (Firecrawl's
    /// `invalidURLs`), as error rows for `errors.ndjson`.
    pub rejected: Vec<String>,
}

impl Triggered {
    pub fn new(remote_id: String) -> Triggered {
        Triggered {
            remote_id,
            rejected: Vec::new(),
        }
    }
}

/// What the provider shows for an in-doubt chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// The collection exists (or was created now, idempotently).
    Existing(Triggered),
    /// The provider shows none: triggering again pays once.
    Absent,
    /// It exists but the provider offers no way to reach it: the chunk
    /// fails with this message instead of paying twice.
    Unreachable(String),
}

/// Where a dataset's download goes on: provider-defined, stored with the
/// chunk after every saved page so a restart resumes there.
pub type Cursor = Value;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollOutcome {
    Building,
    Ready {
        /// When the provider says it deletes the data, if it says.
        expires_at: Option<UnixMs>,
        /// Where the download starts (`None`: the whole dataset at once).
        start: Option<Cursor>,
        /// What the collection cost, as the provider reports it (Firecrawl's
        /// `creditsUsed`; `None` where it reports nothing, or `-1`).
        credits_used: Option<u64>,
    },
    Failed(String),
    Cancelled,
    /// The provider does not know the id (too early, or lost).
    NotFound(String),
    /// The provider says the data is gone for good.
    Expired(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownloadOutcome {
    /// This page's rows went to the sink; the rest starts at `next`
    /// (`None`: the dataset is complete).
    Saved { next: Option<Cursor> },
    /// Nothing was written: fetch from this cursor instead (a snapshot too
    /// big to download whole).
    Redirect(Cursor),
    /// Ready by status but the data is not served yet (build lag).
    NotReady,
    /// The data endpoint does not know the id (lag, or expired).
    NotFound(String),
    /// The provider says the data is gone for good.
    Expired(String),
}

/// Where downloaded rows go, one compact JSON value at a time.
pub trait RowSink: Send {
    /// A row that must be JSON (an error if it is not).
    fn row(&mut self, raw: &[u8]) -> std::io::Result<()>;

    /// A row of a dataset body, starting at `byte_offset` in it. A row the
    /// daemon cannot read is kept as a malformed row by a sink that can
    /// (`docs/outputs.md`); by default it is an error, as with [`row`](Self::row).
    fn row_at(&mut self, raw: &[u8], _byte_offset: u64) -> std::io::Result<()> {
        self.row(raw)
    }

    /// A row longer than `limits.max_row_bytes`: only its first `head`
    /// bytes were kept; `len` is its full length.
    fn oversize_row(&mut self, head: &[u8], len: u64, byte_offset: u64) -> std::io::Result<()> {
        let _ = (head, byte_offset);
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a row of {len} bytes is larger than limits.max_row_bytes"),
        ))
    }
}

/// Why a call did not give an answer. Each variant says what retrying does.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// 429: nothing was done; the provider is paused by the gate already.
    #[error("rate limited (429)")]
    RateLimited { wait: Option<Duration> },
    /// 5xx, timeout, reset, cut body: retry with backoff. `sent` says whether
    /// the request may have reached the provider.
    #[error("{detail}")]
    Transient { detail: String, sent: bool },
    /// 401/402/403 or no token: the provider is blocked until fixed.
    #[error("provider refuses the credentials ({status}): {message}")]
    Blocked { status: u16, message: String },
    /// 400/404/422: the request is wrong for good.
    #[error("provider rejected the request ({status}): {message}")]
    Rejected { status: u16, message: String },
    /// A 2xx whose body cannot be read as the API says.
    #[error("unreadable answer: {0}")]
    Protocol(String),
    /// Writing downloaded rows failed (full disk, I/O error).
    #[error("writing the part file: {0}")]
    Sink(#[source] std::io::Error),
    /// The dataset is larger than `limits.max_dataset_bytes`: its chunk
    /// fails for good with this reason.
    #[error("{0}")]
    TooLarge(String),
}

/// Counts a download's bytes against `limits.max_dataset_bytes`.
pub struct DatasetBudget {
    received: u64,
    max: u64,
}

impl DatasetBudget {
    pub fn new(max: u64) -> DatasetBudget {
        DatasetBudget { received: 0, max }
    }

    /// Adds `n` bytes; `Err` once the total is over the limit.
    pub fn take(&mut self, n: usize) -> Result<(), CallError> {
        self.received = self.received.saturating_add(n as u64);
        if self.received > self.max {
            return Err(CallError::TooLarge(format!(
                "the dataset is larger than limits.max_dataset_bytes ({} bytes); download stopped",
                self.max
            )));
        }
        Ok(())
    }
}

impl CallError {
    /// For a trigger: whether the provider may have created a collection.
    pub fn may_have_created(&self) -> bool {
        match self {
            CallError::Transient { sent, .. } => *sent,
            CallError::Protocol(_) => true,
            _ => false,
        }
    }
}

#[async_trait]
pub trait Provider: Send + Sync {
    fn kind(&self) -> ProviderKind;

    /// How long the provider keeps a finished dataset.
    fn retention(&self) -> Duration;

    /// Starts a collection for one chunk.
    async fn trigger(&self, call: &TriggerCall<'_>) -> Result<Triggered, CallError>;

    /// Looks for a collection this chunk's trigger may have created since
    /// `since` (an in-doubt chunk).
    async fn find(&self, call: &TriggerCall<'_>, since: UnixMs) -> Result<Found, CallError>;

    async fn poll(&self, key: &str, remote_id: &str) -> Result<PollOutcome, CallError>;

    /// Streams one page of the dataset's rows, from `cursor` (`None`: the
    /// start), into `sink`.
    async fn download(
        &self,
        key: &str,
        remote_id: &str,
        cursor: Option<&Cursor>,
        sink: &mut dyn RowSink,
    ) -> Result<DownloadOutcome, CallError>;

    async fn cancel(&self, key: &str, remote_id: &str) -> Result<(), CallError>;

    /// The driver every call goes through.
    fn http(&self) -> &http::Http;

    /// Now on the provider's clock (its latest `Date` header): datasets are
    /// deleted on that clock, so their expiry is judged on it.
    fn now_ms(&self) -> UnixMs {
        self.http().provider_now()
    }

    /// A new token (SIGHUP); `None` leaves the provider without one.
    fn set_token(&self, token: Option<crate::config::Token>) {
        self.http().set_token(token);
    }

    /// Calls made so far by (endpoint, status class), for metrics.
    fn call_stats(&self) -> Vec<(&'static str, String, u64)> {
        self.http().stats.snapshot()
    }

    /// Seconds per call by endpoint (`harvestd_request_duration_seconds`).
    fn latency(&self) -> prometheus::HistogramVec {
        self.http().stats.latency.clone()
    }
}

/// `Ok` for a 2xx; otherwise the request was refused with `message`.
pub fn accepted(status: u16, message: impl FnOnce() -> String) -> Result<(), CallError> {
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(CallError::Rejected {
            status,
            message: message(),
        })
    }
}

/// The longest remote id taken from a provider (`docs/limits.md`).
pub const MAX_ID_BYTES: usize = 256;

/// Whether `id` may be used as a remote id: 1 to 256 bytes, no control
/// characters, and not `.` or `..` (which a URL resolves as a step up, so
/// that no encoding keeps them one path segment). `Err` says why not.
pub fn check_remote_id(id: &str) -> Result<(), String> {
    let shown = || http::one_line(&id.escape_default().to_string());
    if id.is_empty() {
        Err("the provider gave an empty id".into())
    } else if id.len() > MAX_ID_BYTES {
        Err(format!(
            "the provider gave an id of {} bytes (at most {MAX_ID_BYTES} are taken): {}",
            id.len(),
            shown()
        ))
    } else if id.chars().any(char::is_control) {
        Err(format!(
            "the provider gave an id with control characters: {}",
            shown()
        ))
    } else if id == "." || id == ".." {
        Err(format!("the provider gave the id '{id}'"))
    } else {
        Ok(())
    }
}

/// A remote id as one percent-encoded path segment: every byte but
/// letters, digits and `-_.~` is encoded, so `../admin` or `a/b?c` stays
/// inside its segment and the token never goes to another path.
pub fn id_segment(id: &str) -> Result<String, CallError> {
    check_remote_id(id).map_err(CallError::Protocol)?;
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Ok(out)
}

/// The non-empty string `field` of a trigger's JSON answer, checked with
/// [`check_remote_id`] (an id that fails is an unreadable answer).
pub fn answer_id(text: &str, field: &str) -> Result<String, CallError> {
    let answer: Value = serde_json::from_str(text).map_err(|e| {
        CallError::Protocol(format!("trigger answer: {e}: {}", http::one_line(text)))
    })?;
    answer
        .get(field)
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty())
        .map(str::to_string)
        .ok_or_else(|| {
            CallError::Protocol(format!(
                "trigger answer has no {field}: {}",
                http::one_line(text)
            ))
        })
        .and_then(|id| {
            check_remote_id(&id)
                .map_err(|why| CallError::Protocol(format!("trigger answer: {why}")))?;
            Ok(id)
        })
}

pub const DAY_MS: i64 = 24 * 3600 * 1000;

/// An RFC 3339 time as ms since the epoch.
pub fn parse_time(text: &str) -> Option<UnixMs> {
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    Some((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// How a boolean parameter is written in a query string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoolStyle {
    /// `1`/`0` (Scraper Studio's documented examples).
    Digit,
    /// `true`/`false` (the Web Scraper API's OpenAPI).
    Word,
}

/// Query parameters from the job's `params`: scalars as text; arrays and
/// objects have no query form and are left out (validation warns).
pub fn query_params(params: &Map<String, Value>, bools: BoolStyle) -> Vec<(&str, String)> {
    params
        .iter()
        .filter_map(|(k, v)| {
            let text = match (v, bools) {
                (Value::String(s), _) => s.clone(),
                (Value::Number(n), _) => n.to_string(),
                (Value::Bool(b), BoolStyle::Digit) => u8::from(*b).to_string(),
                (Value::Bool(b), BoolStyle::Word) => b.to_string(),
                _ => return None,
            };
            Some((k.as_str(), text))
        })
        .collect()
}

/// The chunk's inputs, one JSON object per line.
pub fn input_lines(ndjson: &[u8]) -> impl Iterator<Item = &[u8]> {
    ndjson.split(|&b| b == b'\n').filter(|l| !l.is_empty())
}

/// The chunk's NDJSON inputs as one JSON array, for a trigger body.
pub fn array_body(ndjson: &[u8]) -> bytes::Bytes {
    let mut body = Vec::with_capacity(ndjson.len() + 2);
    body.push(b'[');
    for (i, line) in input_lines(ndjson).enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(line);
    }
    body.push(b']');
    bytes::Bytes::from(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_rfc3339() {
        assert_eq!(parse_time("1970-01-01T00:00:01.500Z"), Some(1500));
        assert_eq!(parse_time("yesterday"), None);
    }

    /// A hostile id never leaves its path segment, and ids that no
    /// encoding can keep in one segment are refused.
    #[test]
    fn remote_ids_are_one_path_segment_or_refused() {
        assert_eq!(id_segment("j_abc-1.2~x").unwrap(), "j_abc-1.2~x");
        assert_eq!(
            id_segment("../../../admin/x").unwrap(),
            "..%2F..%2F..%2Fadmin%2Fx"
        );
        assert_eq!(id_segment("a b?c#d%").unwrap(), "a%20b%3Fc%23d%25");
        for bad in ["", ".", "..", "j_\n1", "j\u{7f}", &"x".repeat(257)] {
            assert!(id_segment(bad).is_err(), "{bad:?}");
        }
        assert!(id_segment(&"x".repeat(256)).is_ok());
        assert!(answer_id(r#"{"collection_id":"../../admin/x"}"#, "collection_id").is_ok());
        assert!(answer_id(
            &format!(r#"{{"collection_id":"{}"}}"#, "y".repeat(300)),
            "collection_id"
        )
        .is_err());
        assert!(answer_id(r#"{"collection_id":"j_1\u0007"}"#, "collection_id").is_err());
    }

    #[test]
    fn body_and_params() {
        assert_eq!(
            &array_body(b"{\"url\":\"a\"}\n{\"url\":\"b\"}\n")[..],
            b"[{\"url\":\"a\"},{\"url\":\"b\"}]"
        );
        let params =
            serde_json::json!({"queue_next": 1, "deadline": "2h", "dev": true, "list": [1]});
        let params = params.as_object().unwrap();
        assert_eq!(
            query_params(params, BoolStyle::Digit),
            vec![
                ("queue_next", "1".to_string()),
                ("deadline", "2h".to_string()),
                ("dev", "1".to_string())
            ]
        );
        assert_eq!(
            query_params(params, BoolStyle::Word)[2],
            ("dev", "true".to_string())
        );
    }
}
