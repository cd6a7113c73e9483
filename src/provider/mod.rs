//! One trait for every remote API. A provider builds requests and decodes
//! answers; the shared [`http::Http`] driver owns the rate, pauses, blocks and
//! timeouts; the worker owns retries and persistence. Expected outcomes (still
//! building, not found yet, zero rows) are values, not errors. Providers never
//! touch the store.

pub mod http;
pub mod scraper_studio;

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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollOutcome {
    Building,
    Ready,
    Failed(String),
    Cancelled,
    /// The provider does not know the id (too early, or expired).
    NotFound(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownloadOutcome {
    /// Every row went to the sink.
    Saved,
    /// Ready by status but the data is not served yet (build lag).
    NotReady,
    /// The data endpoint does not know the id (lag, or expired).
    NotFound(String),
}

/// Where downloaded rows go, one compact JSON value at a time.
pub trait RowSink: Send {
    fn row(&mut self, raw: &[u8]) -> std::io::Result<()>;
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

    /// Starts a collection for one chunk and returns its remote id.
    async fn trigger(&self, call: &TriggerCall<'_>) -> Result<String, CallError>;

    /// Looks for a collection this chunk's trigger may have created since
    /// `since` (an in-doubt chunk). `Ok(None)` means the provider shows none.
    async fn find(
        &self,
        call: &TriggerCall<'_>,
        since: UnixMs,
    ) -> Result<Option<String>, CallError>;

    async fn poll(&self, key: &str, remote_id: &str) -> Result<PollOutcome, CallError>;

    /// Streams the dataset's rows into `sink`.
    async fn download(
        &self,
        key: &str,
        remote_id: &str,
        sink: &mut dyn RowSink,
    ) -> Result<DownloadOutcome, CallError>;

    async fn cancel(&self, key: &str, remote_id: &str) -> Result<(), CallError>;

    /// A new token (SIGHUP); `None` leaves the provider without one.
    fn set_token(&self, token: Option<crate::config::Token>) {
        let _ = token;
    }

    /// Calls made so far by (endpoint, status class), for metrics.
    fn call_stats(&self) -> Vec<(&'static str, String, u64)> {
        Vec::new()
    }
}
