//! `manifest.json`: what happened to a run (`docs/outputs.md`).

use serde::{Deserialize, Serialize};

use super::outputs::OutputFile;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub job: String,
    pub run_id: String,
    pub provider: String,
    pub spec_sha256: String,
    pub started_at: String,
    pub finished_at: String,
    /// complete | partial | failed | cancelled
    pub state: String,
    pub inputs: u64,
    pub rows: u64,
    /// The provider's error rows in `errors.ndjson`.
    pub error_rows: u64,
    /// Rows the daemon could not read, kept in `errors.ndjson` as
    /// `malformed_row` records (`docs/outputs.md`).
    pub malformed_rows: u64,
    /// The credits the provider reported for the run's collections (the
    /// sum over its chunks); `null` where it reports none (Bright Data).
    pub credits_used: Option<u64>,
    pub chunks: Vec<ManifestChunk>,
    pub outputs: Vec<OutputFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestChunk {
    pub index: u32,
    pub inputs: u64,
    pub remote_id: Option<String>,
    pub state: String,
    pub rows: u64,
    pub triggered_at: Option<String>,
    pub ready_at: Option<String>,
    pub downloaded_at: Option<String>,
    pub expires_at: Option<String>,
    /// The credits the provider reported for this chunk's collection.
    pub credits_used: Option<u64>,
    pub error: Option<String>,
}
