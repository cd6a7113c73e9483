//! The records the store keeps, and how they are written: versioned JSON,
//! one record per sled key. A record whose version this harvestd does not
//! know, or that does not decode, is a damaged store, never a default.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::StoreError;
use crate::chunk::{ChunkState, Progress, UnixMs};
use crate::schedule::Recurrence;
use crate::spec::JobSpec;

/// The version written in every record; older versions are migrated on read.
pub(super) const VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Chunks are being written; a run found like this after a crash is
    /// discarded and planned again (its content was not marked seen).
    Planning,
    InProgress,
    Complete,
    Partial,
    Failed,
    Cancelled,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Planning => "planning",
            RunState::InProgress => "in_progress",
            RunState::Complete => "complete",
            RunState::Partial => "partial",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, RunState::Planning | RunState::InProgress)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub v: u32,
    pub job: String,
    pub run_id: String,
    pub spec: JobSpec,
    pub spec_sha256: String,
    pub started_at: UnixMs,
    pub finished_at: Option<UnixMs>,
    pub state: RunState,
    pub inputs: u64,
    pub chunks: u32,
    /// `cancel` was asked: the run's collections are being cancelled. Kept
    /// so a cancel interrupted by a crash goes on as a cancel.
    #[serde(default)]
    pub cancel_requested: bool,
    /// The run is finished and its files wait in the staging directory to
    /// be uploaded to the object store (`docs/object-storage.md`); `None`
    /// once they are, and always for a local `output_dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<RunUpload>,
}

/// How far a run's upload has come, kept so that a restart goes on from
/// there and aborts what a crash left half done.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunUpload {
    /// Where the files in `done` went (`s3://bucket/prefix`): a restart
    /// with another `output_dir` sends the whole run there.
    #[serde(default)]
    pub to: String,
    /// Files uploaded, in order; a restart sends the rest.
    #[serde(default)]
    pub done: Vec<String>,
    /// A multipart upload begun and not completed (file, upload id): the
    /// next attempt aborts it before it sends the file again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multipart: Option<(String, String)>,
    /// Why the last attempt failed, while attempts fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When attempts began to fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<UnixMs>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "StoredChunk")]
pub struct ChunkRecord {
    pub v: u32,
    pub index: u32,
    pub inputs: u64,
    /// The tag sent with the trigger (Scraper Studio `name`), used to find
    /// the collection when the trigger's answer was lost.
    pub name: String,
    pub state: ChunkState,
    /// Trigger calls sent for this chunk (more than 1 only after a settled doubt).
    pub triggers: u32,
    /// Times this chunk was found in doubt.
    pub in_doubt: u32,
    pub last_error: Option<String>,
    /// Error rows from the trigger's answer (inputs the provider refused),
    /// written with the chunk's rows.
    #[serde(default)]
    pub rejected: Vec<String>,
    /// What the collection cost, as the provider reported it when it was
    /// ready (Firecrawl's `creditsUsed`); `None` where it reports nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credits_used: Option<u64>,
}

/// A chunk record as stored, in every form a harvestd has written. Before
/// the download's progress moved into [`ChunkState::Ready`] (and its
/// columns into `Downloaded`), it sat beside the state as `download`; such
/// a record is read into today's form, so an upgrade in the middle of a
/// paged download resumes at its next page.
#[derive(Deserialize)]
struct StoredChunk {
    v: u32,
    index: u32,
    inputs: u64,
    name: String,
    state: ChunkState,
    triggers: u32,
    in_doubt: u32,
    last_error: Option<String>,
    #[serde(default)]
    rejected: Vec<String>,
    #[serde(default)]
    download: Option<Progress>,
    #[serde(default)]
    credits_used: Option<u64>,
}

impl From<StoredChunk> for ChunkRecord {
    fn from(c: StoredChunk) -> ChunkRecord {
        let mut state = c.state;
        if let Some(old) = c.download {
            match &mut state {
                ChunkState::Ready { progress, .. } if *progress == Progress::default() => {
                    *progress = old;
                }
                ChunkState::Downloaded { columns, .. } if columns.is_none() => {
                    *columns = old.columns;
                }
                _ => {}
            }
        }
        ChunkRecord {
            v: c.v,
            index: c.index,
            inputs: c.inputs,
            name: c.name,
            state,
            triggers: c.triggers,
            in_doubt: c.in_doubt,
            last_error: c.last_error,
            rejected: c.rejected,
            credits_used: c.credits_used,
        }
    }
}

impl ChunkRecord {
    pub fn planned(index: u32, inputs: u64, name: String) -> ChunkRecord {
        ChunkRecord {
            v: VERSION,
            index,
            inputs,
            name,
            state: ChunkState::Planned,
            triggers: 0,
            in_doubt: 0,
            last_error: None,
            rejected: Vec::new(),
            credits_used: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub v: u32,
    pub name: String,
    /// sha256 of the job file and its inputs file, as last seen.
    pub content_sha256: String,
    /// Problems of the content last seen; empty when it was valid.
    pub problems: Vec<String>,
    pub last_run: Option<String>,
    pub seen_at: UnixMs,
    /// The files' identity (inode, size, change times) when this content
    /// was dealt with: while it stays the same, nothing is read again.
    /// Absent in records from before it was kept.
    #[serde(default)]
    pub stamp: Option<String>,
}

impl JobRecord {
    pub fn new(
        name: String,
        content_sha256: String,
        problems: Vec<String>,
        seen_at: UnixMs,
    ) -> Self {
        JobRecord {
            v: VERSION,
            name,
            content_sha256,
            problems,
            last_run: None,
            seen_at,
            stamp: None,
        }
    }
}

/// A recurring job's next due time, so restarts neither repeat nor skip runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleRecord {
    pub v: u32,
    pub job: String,
    pub recurrence: Recurrence,
    /// This job's fixed jitter offset (from its `jitter` and name).
    pub jitter_ms: u64,
    pub next_due: UnixMs,
}

impl ScheduleRecord {
    pub fn new(job: String, recurrence: Recurrence, jitter_ms: u64, next_due: UnixMs) -> Self {
        ScheduleRecord {
            v: VERSION,
            job,
            recurrence,
            jitter_ms,
            next_due,
        }
    }
}

pub(super) fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    // Records are plain data; serialising them cannot fail.
    serde_json::to_vec(record).unwrap_or_default()
}

pub(super) fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    #[derive(Deserialize)]
    struct Version {
        v: u32,
    }
    let corrupt = |message: String| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).replace('\0', "/"),
        message,
    };
    let version: Version = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    if version.v != VERSION {
        return Err(corrupt(format!(
            "record version {} is newer than this harvestd ({VERSION})",
            version.v
        )));
    }
    serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))
}
