//! The admin API's answers as types: the daemon serializes them, and the
//! command line (`harvestd status`, `rerun`, `retry`, `cancel`) reads them
//! back with the same types, so a field renamed on one side cannot be
//! missed by the other. `docs/admin-api.md` describes each field.

use serde::{Deserialize, Serialize};

pub use crate::notify::Undelivered;

/// `GET /v1/jobs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JobList {
    pub jobs: Vec<JobView>,
    pub providers: Vec<ProviderView>,
    /// Notifications tried and not delivered yet; absent when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undelivered: Option<Undelivered>,
}

/// One job: `GET /v1/jobs/{job}`, and each entry of [`JobList::jobs`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JobView {
    pub job: String,
    /// The provider of its latest run; none before its first run.
    pub provider: Option<String>,
    /// `invalid` while the job file has problems, `idle` before its first
    /// run, otherwise its latest run's state.
    pub state: String,
    #[serde(default)]
    pub problems: Vec<String>,
    pub latest_run: Option<RunView>,
    /// Every run, oldest first: only in the answer for one job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs: Option<Vec<RunRef>>,
    pub schedule: Option<String>,
    pub next_due: Option<String>,
}

/// A run named with its state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunRef {
    pub run_id: String,
    pub state: String,
}

/// A job's latest run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunView {
    pub run_id: String,
    pub state: String,
    pub chunks_total: u32,
    /// Chunks by state name.
    #[serde(default)]
    pub chunks: std::collections::BTreeMap<String, u32>,
    pub inputs: u64,
    pub rows: u64,
    pub started_at: String,
    pub finished_at: Option<String>,
    /// Why a chunk is held up, while one is.
    pub last_error: Option<String>,
    /// Credits the provider reported for the run's collections so far
    /// (Firecrawl); `null` where it reports none.
    #[serde(default)]
    pub credits_used: Option<u64>,
    /// The first unsaved ready dataset to expire, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry: Option<ExpiryView>,
    /// The run is finished and its files are being uploaded to the object
    /// store; absent once they are (and for a local `output_dir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<UploadView>,
}

/// A finished run's upload to the object store, while it is not done.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UploadView {
    /// `uploading`, or `failing` while attempts fail (they go on).
    pub state: String,
    /// Where to: `s3://bucket/prefix`.
    pub to: String,
    /// Objects uploaded so far.
    pub objects_done: u32,
    /// Why the last attempt failed, while attempts fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Since when attempts fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<String>,
}

/// How near an unsaved ready dataset is to deletion at the provider.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExpiryView {
    /// On the provider's clock.
    pub expires_at: String,
    pub seconds_left: i64,
    /// `fine`, `warning` (3 days left; Firecrawl 6 h), `error` (1 day; 1 h)
    /// or `expired`.
    pub level: String,
    pub chunk: u32,
}

/// A provider and what holds its calls back.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProviderView {
    pub provider: String,
    /// Why every call is stopped (a refused token, no credits), until it lifts.
    pub blocked: Option<String>,
    /// A pause the provider asked for (429, `Retry-After`).
    pub paused: Option<PauseView>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PauseView {
    pub reason: String,
    pub seconds_left: u64,
}

/// The answer to `POST /v1/jobs/{job}/{action}` and any refusal: `result`
/// when it was done, `error` otherwise.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    pub fn done(result: impl Into<String>) -> Reply {
        Reply {
            result: Some(result.into()),
            error: None,
        }
    }

    pub fn error(error: impl Into<String>) -> Reply {
        Reply {
            result: None,
            error: Some(error.into()),
        }
    }
}
