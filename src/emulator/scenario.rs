//! The emulator's scenario file (TOML): per-collector behaviour and faults,
//! with a seed so every run of a test sees the same answers.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    /// Seeds every random choice (fault probabilities, ids).
    pub seed: u64,
    /// Bearer tokens the emulator accepts.
    pub tokens: Vec<String>,
    /// `accept`: any `c_…` collector exists, with `defaults`; `reject`: only
    /// those under `collectors`.
    pub unknown_collectors: Unknown,
    /// The job listing's shape: a bare `array` or an `object` with `data`
    /// (the real shape is undocumented).
    pub listing_shape: ListingShape,
    /// A request arriving this soon after a 429 may have been sent before
    /// the client read it; later ones before the `Retry-After` ends count
    /// as early. Tests that serialise their calls set it near zero.
    #[serde(with = "humantime_serde")]
    pub retry_after_slack: Duration,
    /// For Scraper Studio collectors (`c_…`) and Web Scraper API datasets
    /// (`gd_…`) not listed under `collectors`.
    pub defaults: CollectorScenario,
    pub collectors: BTreeMap<String, CollectorScenario>,
    /// The Firecrawl account.
    pub firecrawl: FirecrawlScenario,
    /// Bright Data's 401s as JSON (`{"error": "User authentication is
    /// required"}`, as `/progress` documents them) instead of plain text.
    pub auth_error_json: bool,
    pub faults: Vec<Fault>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FirecrawlScenario {
    /// Time from submission until the last URL is done; URLs finish spread
    /// over it, in a seeded order unrelated to the input order.
    #[serde(with = "humantime_serde")]
    pub build_time: Duration,
    /// Approximate size of each document.
    pub doc_bytes: usize,
    /// Every k-th URL fails (listed only in `/errors`; 0: never).
    pub fail_every: u32,
    /// Every k-th URL is a document with `metadata.statusCode` 404 (0: never).
    pub http_error_every: u32,
    /// Documents per page (100 upstream).
    pub page_docs: usize,
    /// Summed JSON length per page (10 MiB upstream).
    pub page_bytes: usize,
    /// `status` stays `scraping` this long after every URL is done (#2280).
    #[serde(with = "humantime_serde")]
    pub status_lag: Duration,
    /// Results are kept this long after completion.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Credits left; `None`: unlimited. A batch needs one per URL (402).
    pub credits: Option<u64>,
    /// One document no JSON reader takes (hostile provider), as for
    /// collectors' `malformed_row`: it makes its whole page (and a status
    /// answer carrying it) invalid JSON.
    pub malformed_document: Option<MalformedRow>,
    /// The URL (from 0, in input order) whose document is the malformed one.
    pub malformed_at: usize,
    /// `scheme://host` of `next` links (a self-hosted server behind a
    /// proxy names another than the request's); unset: `http://<Host>`.
    pub next_base: Option<String>,
    /// `creditsUsed` is `-1`, as a server that cannot read its billing
    /// data answers.
    pub credits_unknown: bool,
    /// A `warning` (v2, robots.txt notes) once the batch is not scraping.
    pub warning: Option<String>,
    /// `expiresAt` in whole seconds (`…:00Z`), where upstream writes
    /// milliseconds (`…:00.000Z`).
    pub expires_at_seconds: bool,
    /// The batch failed at kickoff: every status read is 200 with
    /// `success: false`, `status: "failed"` and an `error` (S2 v1).
    pub kickoff_failure: bool,
    /// Documents finished longer ago than this are left out of `data`
    /// while `completed` still counts them (self-hosted S1 drops finished
    /// jobs after an hour).
    #[serde(with = "humantime_serde::option")]
    pub docs_vanish_after: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unknown {
    Accept,
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListingShape {
    Array,
    Object,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CollectorScenario {
    /// Time from trigger to `done`, on the emulator's clock.
    #[serde(with = "humantime_serde")]
    pub build_time: Duration,
    /// Data rows per successful input.
    pub rows_per_input: u32,
    /// Approximate size of each data row.
    pub row_bytes: usize,
    /// Every k-th input yields an error row instead of data (0: never).
    pub error_every: u32,
    /// The collection finishes with `[]`.
    pub zero_rows: bool,
    /// `/dca/log` answers 404 for this long after the trigger.
    #[serde(with = "humantime_serde")]
    pub early_404: Duration,
    /// `/dca/dataset` still answers "building" this many times after `done`.
    pub dataset_lag_polls: u32,
    /// Scraper Studio: the lag's answers are this status (400 or 404, as
    /// seen live while the job's state catches up) instead of "building".
    pub dataset_lag_status: Option<u16>,
    /// How "building" looks on `/dca/dataset`.
    pub building_reply: BuildingReply,
    /// `title` (documented example) or `lower` (seen live) keys on `/dca/log`.
    pub log_keys: LogKeys,
    /// A status word the client has never seen, used while running.
    pub unknown_status_word: Option<String>,
    /// How long a finished dataset is kept.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// A real-time collector refuses batch triggers.
    pub realtime: bool,
    /// The collection fails instead of finishing.
    pub fail: bool,
    /// Fields every input must have (422 otherwise).
    pub input_fields: Vec<String>,
    /// Web Scraper API: fewer inputs are refused (`Should be at least N inputs`).
    pub min_inputs: usize,
    /// Web Scraper API: the `/progress` word while running (`running`,
    /// `collecting`, `digesting`).
    pub progress_word: String,
    /// Web Scraper API: the `error_message` of a failed snapshot.
    pub fail_message: String,
    /// Web Scraper API: snapshots with more records are refused whole (the
    /// 5 GB cap, scaled down), so clients must use parts.
    pub whole_download_max_records: Option<u64>,
    /// Web Scraper API: running snapshots per dataset before 429.
    pub max_running: Option<usize>,
    /// Web Scraper API: a snapshot not ready for download answers 409
    /// `{"error": "Snapshot is not ready for download"}` (the OpenAPI's
    /// form) instead of 202.
    pub not_ready_409: bool,
    /// One row of the dataset the client cannot read (hostile provider):
    /// `invalid_utf8`, `control_char`, `deep_nesting` or `huge`. None by
    /// default: the documented APIs send JSON.
    pub malformed_row: Option<MalformedRow>,
    /// The input whose first row is the malformed one (from 0).
    pub malformed_at: usize,
    /// For `malformed_row = "huge"`: the row's size in bytes, streamed
    /// without being held whole.
    pub huge_row_bytes: usize,
    /// The id the trigger answers with (and every later answer uses)
    /// instead of a fresh random one: a hostile provider's id, such as
    /// `../../../admin/x`, one over 256 bytes or one with control
    /// characters.
    pub remote_id: Option<String>,
}

/// A row no JSON reader accepts, or one too big to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MalformedRow {
    /// Bytes that are not UTF-8 inside a string.
    InvalidUtf8,
    /// A raw control character (U+0001) inside a string.
    ControlChar,
    /// Arrays nested 200 deep.
    DeepNesting,
    /// A row of `huge_row_bytes` bytes.
    Huge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildingReply {
    /// 202 `{"status":"building",…}` (documented).
    #[serde(rename = "202")]
    Accepted,
    /// 202 `{"status":"collecting"}` (seen live).
    #[serde(rename = "202_collecting")]
    AcceptedCollecting,
    /// 200 with the status object.
    #[serde(rename = "200_object")]
    OkObject,
    /// 200 with an empty body.
    #[serde(rename = "200_empty")]
    OkEmpty,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogKeys {
    Title,
    Lower,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Fault {
    /// `any`, or an endpoint: Scraper Studio `trigger`, `log`, `dataset`,
    /// `jobs`, `cancel`; Web Scraper API `v3_trigger`, `v3_progress`,
    /// `v3_snapshot`, `v3_parts`, `v3_input`, `v3_snapshots`, `v3_cancel`,
    /// `v3_log`; Firecrawl `fc_batch`, `fc_status`, `fc_errors`, `fc_cancel`.
    pub endpoint: String,
    /// Only for this collector, if set.
    pub key: Option<String>,
    pub kind: FaultKind,
    /// For `status`: the HTTP status.
    pub status: u16,
    /// For `status`: `html`, `empty` or `text`.
    pub body: String,
    /// For `rate_limit`: `seconds`, `date` or `none`.
    pub retry_after: String,
    pub retry_after_secs: u64,
    /// Skip this many matching requests, then fault the next `first`.
    pub skip: u64,
    pub first: u64,
    /// Or fault each matching request with this probability (seeded).
    pub probability: f64,
    /// For `slow` and `stall`; for `endless`, the pause between pieces of
    /// the body.
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
    /// For `rate_limit`: this exact `Retry-After` header value instead
    /// (e.g. `18446744073709551615` or `99999999999`).
    pub retry_after_header: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// An error status with an HTML, empty or text body.
    Status,
    /// 429, with or without `Retry-After`.
    RateLimit,
    /// The connection is dropped before any answer.
    Reset,
    /// The request is carried out, then the connection is dropped.
    LostAck,
    /// The answer's headers come after `delay`.
    Slow,
    /// The body stops halfway for `delay`.
    Stall,
    /// The body is cut halfway and the connection dropped.
    Truncate,
    /// 200 with an HTML error page.
    Html,
    /// An answer with an `x-brd-error` header (the proxy layers' error
    /// signal) and the fault's `status`, which may be 200: the call was
    /// not carried out.
    BrdError,
    /// 200 with a body that never ends: rows for a dataset endpoint
    /// (`dataset`, `v3_snapshot`), a JSON object that never closes for any
    /// other (a status answer), in 64 KiB pieces `delay` apart.
    Endless,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            seed: 1,
            tokens: vec![
                super::DEMO_BRIGHTDATA_TOKEN.into(),
                super::DEMO_FIRECRAWL_TOKEN.into(),
            ],
            unknown_collectors: Unknown::Accept,
            listing_shape: ListingShape::Array,
            retry_after_slack: Duration::from_millis(250),
            defaults: CollectorScenario::default(),
            collectors: BTreeMap::new(),
            firecrawl: FirecrawlScenario::default(),
            auth_error_json: false,
            faults: Vec::new(),
        }
    }
}

impl Default for CollectorScenario {
    fn default() -> Self {
        CollectorScenario {
            build_time: Duration::from_secs(2),
            rows_per_input: 1,
            row_bytes: 300,
            error_every: 0,
            zero_rows: false,
            early_404: Duration::ZERO,
            dataset_lag_polls: 0,
            dataset_lag_status: None,
            building_reply: BuildingReply::Accepted,
            log_keys: LogKeys::Title,
            unknown_status_word: None,
            retention: Duration::from_secs(16 * 24 * 3600),
            realtime: false,
            fail: false,
            input_fields: vec!["url".into()],
            min_inputs: 0,
            progress_word: "running".into(),
            fail_message: "Something went wrong. Our team is looking into it.".into(),
            whole_download_max_records: None,
            max_running: None,
            not_ready_409: false,
            malformed_row: None,
            malformed_at: 0,
            huge_row_bytes: 100 * 1024 * 1024,
            remote_id: None,
        }
    }
}

impl Default for FirecrawlScenario {
    fn default() -> Self {
        FirecrawlScenario {
            build_time: Duration::from_secs(2),
            doc_bytes: 600,
            fail_every: 0,
            http_error_every: 0,
            page_docs: 100,
            page_bytes: 10 * 1024 * 1024,
            status_lag: Duration::ZERO,
            retention: Duration::from_secs(24 * 3600),
            credits: None,
            malformed_document: None,
            malformed_at: 0,
            next_base: None,
            credits_unknown: false,
            warning: None,
            expires_at_seconds: false,
            kickoff_failure: false,
            docs_vanish_after: None,
        }
    }
}

impl Default for Fault {
    fn default() -> Self {
        Fault {
            endpoint: "any".into(),
            key: None,
            kind: FaultKind::Status,
            status: 503,
            body: "html".into(),
            retry_after: "seconds".into(),
            retry_after_secs: 1,
            skip: 0,
            first: 0,
            probability: 0.0,
            delay: Duration::from_secs(1),
            retry_after_header: None,
        }
    }
}

impl Scenario {
    pub fn from_file(path: &Path) -> Result<Scenario, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// A Scraper Studio collector (`c_…`) or a Web Scraper API dataset (`gd_…`).
    pub fn collector(&self, id: &str) -> Option<&CollectorScenario> {
        match self.collectors.get(id) {
            Some(c) => Some(c),
            None if self.unknown_collectors == Unknown::Accept
                && (id.starts_with("c_") || id.starts_with("gd_")) =>
            {
                Some(&self.defaults)
            }
            None => None,
        }
    }
}
