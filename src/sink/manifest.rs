//! `manifest.json`: what happened to a run (`docs/outputs.md`).

use serde::Serialize;

use super::outputs::OutputFile;

#[derive(Debug, Clone, Serialize)]
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
    pub chunks: Vec<ManifestChunk>,
    pub outputs: Vec<OutputFile>,
}

#[derive(Debug, Clone, Serialize)]
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
    pub error: Option<String>,
}

/// RFC 3339 UTC with milliseconds.
pub fn timestamp(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(super::timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            super::timestamp(1_700_000_000_123),
            "2023-11-14T22:13:20.123Z"
        );
    }
}
