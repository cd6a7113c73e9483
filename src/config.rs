//! Daemon configuration: an optional TOML file, then the environment, then
//! flags (`docs/configuration.md`). Every field has a named default; unknown keys are errors.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("environment variable {name}: {message}")]
    Env { name: &'static str, message: String },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where job files are dropped.
    pub jobs_dir: PathBuf,
    /// Where the sled store, the lock file and the admin files live.
    pub state_dir: PathBuf,
    /// Where `<job>/<run_id>/` output directories are written: a local
    /// directory, or an object-store URL (`s3://`, `gs://`, `az://`) whose
    /// runs are built in `storage.staging_dir` and then uploaded.
    pub output_dir: PathBuf,
    /// The object store behind an `output_dir` URL (`docs/object-storage.md`).
    pub storage: StorageConfig,
    /// Loopback address of the admin API, or `off`.
    pub admin_listen: String,
    /// `text` or `json`; unset means text on a TTY, JSON otherwise.
    pub log_format: Option<LogFormat>,
    /// How long a shutdown may take before the daemon exits anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How often the jobs directory is rescanned even without file events.
    #[serde(with = "humantime_serde")]
    pub rescan_interval: Duration,
    /// A job is planned only once its job file and inputs file have not
    /// changed for this long, so a file still being written in place never
    /// starts a run for a partial version.
    #[serde(with = "humantime_serde")]
    pub intake_settle: Duration,
    /// Threads running the daemon's async work (file writes and fsyncs run
    /// on tokio's blocking pool besides). 1 by default: the work is waiting
    /// on the network, and a second thread costs more in cross-thread
    /// wake-ups than it gives: 10,000 polled collections took 308 µs of CPU
    /// per poll with 2, 178 µs with 1, and a 100 MB download was as fast
    /// (`cargo bench --bench many_collections`, `--bench big_dataset`).
    pub worker_threads: u32,
    pub providers: Providers,
    pub limits: LimitsConfig,
    /// `[[notify]]` targets: webhooks and commands told of events
    /// (`docs/notifications.md`).
    pub notify: Vec<NotifyConfig>,
}

/// `[storage]`: how to reach the object store an `output_dir` URL names.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// An S3-compatible server's address (MinIO, R2, Ceph), a GCS or Azure
    /// emulator's; unset: the cloud's own.
    pub endpoint: Option<String>,
    /// The S3 region; unset: `AWS_REGION`, else `us-east-1`.
    pub region: Option<String>,
    /// Must be true for an `http://` endpoint: credentials and data would
    /// cross the network in clear.
    pub allow_http: bool,
    /// Where runs are built before they are uploaded; unset:
    /// `<state_dir>/staging`.
    pub staging_dir: Option<PathBuf>,
}

/// The object store kinds an `output_dir` URL may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    S3,
    Gcs,
    Azure,
}

/// An `output_dir` that names an object store: `s3://bucket/prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectUrl {
    pub kind: StoreKind,
    /// The bucket (Azure: the container).
    pub bucket: String,
    /// Path segments under the bucket, without slashes at either end;
    /// empty for the bucket's root.
    pub prefix: String,
}

impl fmt::Display for ObjectUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.kind {
            StoreKind::S3 => "s3",
            StoreKind::Gcs => "gs",
            StoreKind::Azure => "az",
        };
        write!(f, "{scheme}://{}", self.bucket)?;
        if !self.prefix.is_empty() {
            write!(f, "/{}", self.prefix)?;
        }
        Ok(())
    }
}

impl ObjectUrl {
    /// `Ok(None)` for a local path; an error for a URL harvestd cannot
    /// write to, naming what it takes instead.
    pub fn parse(output_dir: &Path) -> Result<Option<ObjectUrl>, String> {
        let Some(text) = output_dir.to_str() else {
            return Ok(None);
        };
        let Some((scheme, rest)) = text.split_once("://") else {
            return Ok(None);
        };
        let kind = match scheme {
            "s3" | "s3a" => StoreKind::S3,
            "gs" => StoreKind::Gcs,
            "az" | "azure" => StoreKind::Azure,
            _ => {
                return Err(format!(
                    "output_dir: '{scheme}://' is not a store harvestd writes to; \
                     use a local directory, s3://bucket/prefix, gs://bucket/prefix or az://container/prefix"
                ))
            }
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() || bucket.contains(['?', '#', '@', ':']) {
            return Err(format!(
                "output_dir: '{text}' names no bucket; write {scheme}://bucket/prefix"
            ));
        }
        let prefix = prefix.trim_matches('/');
        // Object keys are the prefix's segments joined by '/': an empty,
        // '.' or '..' segment would write somewhere other than it reads.
        if prefix
            .split('/')
            .any(|s| (s.is_empty() && !prefix.is_empty()) || s == "." || s == "..")
            || prefix.contains(['?', '#', '\\'])
        {
            return Err(format!(
                "output_dir: the prefix '{prefix}' of '{text}' has an empty, '.' or '..' part, or a '?', '#' or '\\'"
            ));
        }
        Ok(Some(ObjectUrl {
            kind,
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        }))
    }
}

/// Every event a notification target can be told of (its `events`
/// filter names them), in the order `docs/notifications.md` lists them.
pub const EVENTS: &[&str] = &[
    "run.complete",
    "run.partial",
    "run.failed",
    "run.cancelled",
    "expiry.warning",
    "expiry.error",
    "expiry.lost",
    "provider.blocked",
    "upload.failing",
];

/// One notification target: a URL to POST to, or a command to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    pub url: Option<String>,
    pub command: Option<Vec<String>>,
    /// The events this target wants; unset: every event but `run.complete`.
    pub events: Option<Vec<String>>,
    #[serde(default)]
    pub format: NotifyFormat,
    /// A file holding the HMAC-SHA256 key for `X-Harvestd-Signature`.
    pub secret_file: Option<PathBuf>,
    /// How long one attempt may take: the request, or the command before
    /// it is killed.
    #[serde(default = "default_notify_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_notify_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifyFormat {
    /// The event as JSON.
    #[default]
    Json,
    /// `{"text": "…"}`, what a Slack incoming webhook takes.
    Slack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Providers {
    pub brightdata: ProviderConfig,
    pub firecrawl: ProviderConfig,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderConfig {
    /// Overrides the provider's public API address (tests, proxies).
    pub base_url: Option<String>,
    /// A file holding the API token, used when no environment variable is set.
    pub token_file: Option<PathBuf>,
}

/// Every interval and threshold of provider etiquette (`docs/limits.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Collections triggered and not yet downloaded, per key.
    pub max_in_flight: u32,
    /// Trigger calls per minute, per key.
    pub triggers_per_minute: u32,
    /// All calls to one provider.
    pub requests_per_second: u32,
    /// The shortest wait between two status polls of one collection.
    #[serde(with = "humantime_serde")]
    pub poll_min_interval: Duration,
    /// The longest wait between two status polls of one collection.
    #[serde(with = "humantime_serde")]
    pub poll_max_interval: Duration,
    /// First retry delay after a 5xx, timeout or reset (full jitter).
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// The longest retry delay; the backoff doubles up to it.
    #[serde(with = "humantime_serde")]
    pub backoff_cap: Duration,
    /// Answers 429 within `brake_window` that pause the whole provider.
    pub brake_after_429: u32,
    /// The window in which `brake_after_429` answers 429 engage the brake.
    #[serde(with = "humantime_serde")]
    pub brake_window: Duration,
    /// First provider-wide pause; doubles up to `brake_pause_max`.
    #[serde(with = "humantime_serde")]
    pub brake_pause: Duration,
    /// The longest provider-wide pause of the brake.
    #[serde(with = "humantime_serde")]
    pub brake_pause_max: Duration,
    /// Pause after a 429 that names no wait.
    #[serde(with = "humantime_serde")]
    pub rate_limit_pause: Duration,
    /// How often a blocked provider (401/402/403, no token) is tried again.
    #[serde(with = "humantime_serde")]
    pub blocked_retry: Duration,
    /// 404s on a collection younger than this are build lag, not loss.
    #[serde(with = "humantime_serde")]
    pub not_found_grace: Duration,
    /// An in-doubt trigger not found at the provider is looked for once more
    /// after this long (listings can lag) before it is triggered again.
    #[serde(with = "humantime_serde")]
    pub in_doubt_recheck: Duration,
    /// The whole of a call other than a dataset download (headers and
    /// body: status, trigger, listing, cancel, error bodies). A dataset
    /// download is bounded by progress instead: it fails when no byte has
    /// come for this long, and by `max_dataset_bytes`, and it is given up
    /// at shutdown, so an endless body never holds SIGTERM.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// The longest pause a provider can impose with `Retry-After` (or
    /// Firecrawl's "retry after Ns"): a longer ask waits this long, and
    /// `status` shows the provider as paused with the reason.
    #[serde(with = "humantime_serde")]
    pub retry_after_cap: Duration,
    /// The most one dataset download request may send (a Scraper Studio
    /// dataset, a Web Scraper API snapshot or part; a Firecrawl page is
    /// read whole, up to 256 MiB); a larger one fails its chunk with that
    /// reason. Bytes, or a size such
    /// as `"100GiB"`.
    #[serde(deserialize_with = "byte_size")]
    pub max_dataset_bytes: u64,
    /// The largest row the daemon reads: a larger one is a malformed row,
    /// kept in `errors.ndjson` cut to this size, and never held whole in
    /// memory. Bytes, or a size such as `"64MiB"`.
    #[serde(deserialize_with = "byte_size")]
    pub max_row_bytes: u64,
    /// Free space the output and state filesystems must keep:
    /// below it, downloads wait (the chunk stays ready) and are tried again
    /// every few seconds. Bytes, or a size such as `"1GiB"`; 0 turns the
    /// check off.
    #[serde(deserialize_with = "byte_size")]
    pub min_free_space: u64,
    /// Warn when a ready dataset is unsaved with this little time left
    /// (Bright Data; Firecrawl uses `firecrawl_expiry_warn`).
    #[serde(with = "humantime_serde")]
    pub expiry_warn: Duration,
    /// Log an error (and show `error` in status) when a ready Bright Data
    /// dataset is unsaved with this little time left.
    #[serde(with = "humantime_serde")]
    pub expiry_error: Duration,
    /// `expiry_warn` for Firecrawl, whose results live 24 hours.
    #[serde(with = "humantime_serde")]
    pub firecrawl_expiry_warn: Duration,
    /// `expiry_error` for Firecrawl.
    #[serde(with = "humantime_serde")]
    pub firecrawl_expiry_error: Duration,
    /// Web Scraper API snapshots with more records than this are fetched
    /// in parts of this many (`batch_size`, at least 1000), each saved
    /// durably, so a crash or a cut resumes at the next part.
    pub snapshot_batch_size: u64,
    /// Per-key overrides, e.g. `[limits.keys."c_…"] max_in_flight = 4`.
    pub keys: BTreeMap<String, KeyLimits>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyLimits {
    pub max_in_flight: Option<u32>,
    pub triggers_per_minute: Option<u32>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            jobs_dir: "jobs".into(),
            state_dir: "state".into(),
            output_dir: "out".into(),
            storage: StorageConfig::default(),
            admin_listen: "127.0.0.1:9848".into(),
            log_format: None,
            shutdown_grace: Duration::from_secs(20),
            rescan_interval: Duration::from_secs(10),
            intake_settle: Duration::from_secs(2),
            worker_threads: 1,
            providers: Providers::default(),
            limits: LimitsConfig::default(),
            notify: Vec::new(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        const MIN: u64 = 60;
        const HOUR: u64 = 3600;
        const DAY: u64 = 24 * HOUR;
        const MIB: u64 = 1024 * 1024;
        const GIB: u64 = 1024 * MIB;
        LimitsConfig {
            max_in_flight: 10,
            triggers_per_minute: 30,
            requests_per_second: 5,
            poll_min_interval: Duration::from_secs(5),
            poll_max_interval: Duration::from_secs(60),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(60),
            brake_after_429: 3,
            brake_window: Duration::from_secs(5 * MIN),
            brake_pause: Duration::from_secs(MIN),
            brake_pause_max: Duration::from_secs(10 * MIN),
            rate_limit_pause: Duration::from_secs(2),
            blocked_retry: Duration::from_secs(5 * MIN),
            not_found_grace: Duration::from_secs(2 * MIN),
            in_doubt_recheck: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            retry_after_cap: Duration::from_secs(HOUR),
            max_dataset_bytes: 100 * GIB,
            max_row_bytes: 64 * MIB,
            min_free_space: GIB,
            expiry_warn: Duration::from_secs(3 * DAY),
            expiry_error: Duration::from_secs(DAY),
            firecrawl_expiry_warn: Duration::from_secs(6 * HOUR),
            firecrawl_expiry_error: Duration::from_secs(HOUR),
            snapshot_batch_size: 100_000,
            keys: BTreeMap::new(),
        }
    }
}

impl LimitsConfig {
    pub fn max_in_flight(&self, key: &str) -> u32 {
        self.keys
            .get(key)
            .and_then(|k| k.max_in_flight)
            .unwrap_or(self.max_in_flight)
    }

    pub fn triggers_per_minute(&self, key: &str) -> u32 {
        self.keys
            .get(key)
            .and_then(|k| k.triggers_per_minute)
            .unwrap_or(self.triggers_per_minute)
    }
}

/// A size in bytes: a whole number, or a string such as `"64MiB"`, `"1GiB"`,
/// `"500MB"` (binary `KiB`/`MiB`/`GiB`/`TiB`, decimal `KB`/`MB`/`GB`/`TB`,
/// `B`). A size over `u64::MAX` bytes is an error, not a wrap.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is not a size such as 64MiB"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1000u64.pow(2),
        "gb" => 1000u64.pow(3),
        "tb" => 1000u64.pow(4),
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "'{text}': unknown unit (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)"
            ))
        }
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("'{text}' is too large"))
}

fn byte_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Number(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Number(n) => Ok(n),
        Size::Text(t) => parse_byte_size(&t).map_err(serde::de::Error::custom),
    }
}

/// Where configuration values come from besides the file.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl Config {
    /// File (if any) → environment; flags are applied by the caller.
    pub fn load(file: Option<&Path>, env: &dyn Env) -> Result<Config, ConfigError> {
        let file = file
            .map(Path::to_path_buf)
            .or_else(|| env.var("HARVESTD_CONFIG").map(PathBuf::from));
        let mut config = match &file {
            Some(path) => Self::from_file(path)?,
            None => Config::default(),
        };
        config.apply_env(env)?;
        config.validate()?;
        check_tls()?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::File {
            path: path.display().to_string(),
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            match line {
                Some(line) => format!("line {line}: {}", e.message()),
                None => e.message().to_string(),
            }
        })
    }

    fn apply_env(&mut self, env: &dyn Env) -> Result<(), ConfigError> {
        if let Some(v) = env.var("HARVESTD_JOBS_DIR") {
            self.jobs_dir = v.into();
        }
        if let Some(v) = env.var("HARVESTD_STATE_DIR") {
            self.state_dir = v.into();
        }
        if let Some(v) = env.var("HARVESTD_OUTPUT_DIR") {
            self.output_dir = v.into();
        }
        if let Some(v) = env.var("HARVESTD_ADMIN_LISTEN") {
            self.admin_listen = v;
        }
        if let Some(v) = env.var("HARVESTD_LOG_FORMAT") {
            self.log_format = Some(match v.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => {
                    return Err(ConfigError::Env {
                        name: "HARVESTD_LOG_FORMAT",
                        message: format!("'{v}' is not 'text' or 'json'"),
                    })
                }
            });
        }
        if let Some(v) = env.var("HARVESTD_BRIGHTDATA_URL") {
            self.providers.brightdata.base_url = Some(v);
        }
        if let Some(v) = env.var("HARVESTD_FIRECRAWL_URL") {
            self.providers.firecrawl.base_url = Some(v);
        }
        // systemd's `StateDirectory=` (its first directory, an absolute
        // path): relative directories are taken from there, so a unit
        // needs no paths of its own. Other relative paths (token files,
        // notify commands) stay relative to the working directory, which
        // the unit sets to the same place.
        let base = env
            .var("STATE_DIRECTORY")
            .and_then(|v| v.split(':').next().map(PathBuf::from))
            .filter(|p| p.is_absolute());
        if let Some(base) = base {
            let rebase = |p: &mut PathBuf| {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            };
            rebase(&mut self.jobs_dir);
            rebase(&mut self.state_dir);
            if ObjectUrl::parse(&self.output_dir).is_ok_and(|u| u.is_none()) {
                rebase(&mut self.output_dir);
            }
            if let Some(staging) = self.storage.staging_dir.as_mut() {
                rebase(staging);
            }
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let positive = [
            ("limits.max_in_flight", l.max_in_flight),
            ("limits.triggers_per_minute", l.triggers_per_minute),
            ("limits.requests_per_second", l.requests_per_second),
            ("limits.brake_after_429", l.brake_after_429),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        if !(1..=256).contains(&self.worker_threads) {
            return Err(ConfigError::Invalid(
                "worker_threads must be between 1 and 256".into(),
            ));
        }
        for (key, k) in &l.keys {
            if k.max_in_flight == Some(0) || k.triggers_per_minute == Some(0) {
                return Err(ConfigError::Invalid(format!(
                    "limits.keys.\"{key}\": limits must be at least 1"
                )));
            }
        }
        if l.snapshot_batch_size < 1000 {
            // The API refuses a batch_size below 1000 (brightdata.md §3.4).
            return Err(ConfigError::Invalid(
                "limits.snapshot_batch_size must be at least 1000".into(),
            ));
        }
        if l.max_row_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "limits.max_row_bytes must be at least 1KiB".into(),
            ));
        }
        if l.request_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "limits.request_timeout must be longer than 0s".into(),
            ));
        }
        if l.poll_min_interval > l.poll_max_interval {
            return Err(ConfigError::Invalid(
                "limits.poll_min_interval is longer than limits.poll_max_interval".into(),
            ));
        }
        for (name, url) in [
            ("providers.brightdata.base_url", self.brightdata_url()),
            ("providers.firecrawl.base_url", self.firecrawl_url()),
        ] {
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => {
                    return Err(ConfigError::Invalid(format!(
                        "{name}: '{url}' is not an http(s) URL such as https://api.example.com"
                    )))
                }
            }
        }
        for (i, n) in self.notify.iter().enumerate() {
            let name = format!("notify[{i}]");
            match (&n.url, &n.command) {
                (Some(url), None) => match reqwest::Url::parse(url) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                    // The URL may hold a secret (a Slack webhook's path is
                    // one), so it is not quoted.
                    _ => {
                        return Err(ConfigError::Invalid(format!(
                            "{name}.url is not an http(s) URL"
                        )))
                    }
                },
                (None, Some(command)) if !command.is_empty() && !command[0].is_empty() => {}
                (None, Some(_)) => {
                    return Err(ConfigError::Invalid(format!(
                    "{name}.command must name a program: command = [\"/usr/local/bin/on-event\"]"
                )))
                }
                _ => {
                    return Err(ConfigError::Invalid(format!(
                        "{name} needs exactly one of url or command"
                    )))
                }
            }
            for event in n.events.iter().flatten() {
                if !EVENTS.contains(&event.as_str()) {
                    return Err(ConfigError::Invalid(format!(
                        "{name}.events: '{event}' is not one of {}",
                        EVENTS.join(", ")
                    )));
                }
            }
            if n.timeout.is_zero() {
                return Err(ConfigError::Invalid(format!(
                    "{name}.timeout must be longer than 0s"
                )));
            }
        }
        let remote = ObjectUrl::parse(&self.output_dir).map_err(ConfigError::Invalid)?;
        if let Some(endpoint) = &self.storage.endpoint {
            match reqwest::Url::parse(endpoint) {
                Ok(u) if u.scheme() == "https" && u.host().is_some() => {}
                Ok(u) if u.scheme() == "http" && u.host().is_some() => {
                    if !self.storage.allow_http {
                        return Err(ConfigError::Invalid(format!(
                            "storage.endpoint '{endpoint}' is http://: credentials and data would cross the network in clear; \
                             use https, or set storage.allow_http = true for a store on a network you trust"
                        )));
                    }
                }
                _ => {
                    return Err(ConfigError::Invalid(format!(
                        "storage.endpoint: '{endpoint}' is not an http(s) URL such as https://s3.example.com"
                    )))
                }
            }
            if remote.is_none() {
                return Err(ConfigError::Invalid(format!(
                    "storage.endpoint is set but output_dir '{}' is a local directory; \
                     set output_dir = \"s3://bucket/prefix\" to upload",
                    self.output_dir.display()
                )));
            }
        }
        if self.admin_listen != "off" {
            let addr: std::net::SocketAddr = self.admin_listen.parse().map_err(|_| {
                ConfigError::Invalid(format!(
                    "admin_listen: '{}' is not an address such as 127.0.0.1:9848 (or 'off')",
                    self.admin_listen
                ))
            })?;
            if !addr.ip().is_loopback() {
                return Err(ConfigError::Invalid(format!(
                    "admin_listen: {addr} is not a loopback address"
                )));
            }
        }
        Ok(())
    }

    /// The object store `output_dir` names, if it names one (checked by
    /// [`Config::validate`]).
    pub fn object_url(&self) -> Option<ObjectUrl> {
        ObjectUrl::parse(&self.output_dir).ok().flatten()
    }

    /// Where runs' files are written on this machine: `output_dir`, or
    /// the staging directory when `output_dir` is an object store.
    pub fn local_output_dir(&self) -> PathBuf {
        if self.object_url().is_none() {
            return self.output_dir.clone();
        }
        self.storage
            .staging_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("staging"))
    }

    pub fn brightdata_url(&self) -> &str {
        self.providers
            .brightdata
            .base_url
            .as_deref()
            .unwrap_or("https://api.brightdata.com")
    }

    pub fn firecrawl_url(&self) -> &str {
        self.providers
            .firecrawl
            .base_url
            .as_deref()
            .unwrap_or("https://api.firecrawl.dev")
    }
}

/// An API token. Never printed: `Debug` and `Display` show `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn new(value: impl Into<String>) -> Token {
        Token(value.into())
    }
    /// The secret itself, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Refuses to start when the host's trust store cannot be used (an
/// `SSL_CERT_FILE` or `SSL_CERT_DIR` with no certificate that parses):
/// every HTTPS client would fail to build, so it is a configuration
/// error, named, rather than a failure at the first call.
fn check_tls() -> Result<(), ConfigError> {
    reqwest::Client::builder()
        .build()
        .map(drop)
        .map_err(|e| {
            let mut cause = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                cause = format!("{cause}: {s}");
                source = s.source();
            }
            ConfigError::Invalid(format!(
                "TLS: the host's trust store cannot be used ({cause}); check SSL_CERT_FILE and SSL_CERT_DIR"
            ))
        })
}

/// Finds a provider's token: environment variables, then `token_file`, then
/// systemd's `$CREDENTIALS_DIRECTORY/<credential>` (`docs/configuration.md`).
pub fn find_token(
    env: &dyn Env,
    vars: &[&str],
    token_file: Option<&Path>,
    credential: &str,
) -> Result<Option<Token>, ConfigError> {
    for name in vars {
        if let Some(v) = env.var(name) {
            return Ok(Some(Token::new(v.trim())));
        }
    }
    // `group_may_read`: systemd's credentials (below) may be 0440.
    let read = |path: &Path, group_may_read: bool| -> Result<Option<Token>, ConfigError> {
        secret_file_mode(path, group_may_read)?;
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.display().to_string(),
            message: format!("cannot read token: {e}"),
        })?;
        let text = text.trim();
        Ok((!text.is_empty()).then(|| Token::new(text)))
    };
    if let Some(path) = token_file {
        return read(path, false);
    }
    if let Some(dir) = env.var("CREDENTIALS_DIRECTORY") {
        let path = Path::new(&dir).join(credential);
        if path.exists() {
            return read(&path, true);
        }
    }
    Ok(None)
}

/// Refuses a secret file that others may read, as ssh refuses a readable
/// key (`docs/configuration.md`): group or other permission bits on a `token_file` mean
/// someone else may have read the token. A file from systemd's
/// `$CREDENTIALS_DIRECTORY` may be group-readable (`group_may_read`):
/// systemd writes credentials 0400 or 0440 into a directory only the
/// service can enter, so its group bit does not open it to anyone else;
/// other bits are refused there too.
pub fn secret_file_mode(path: &Path, group_may_read: bool) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| ConfigError::File {
        path: path.display().to_string(),
        message: format!("cannot read token: {e}"),
    })?;
    let mode = meta.permissions().mode() & 0o777;
    let forbidden = if group_may_read { 0o007 } else { 0o077 };
    if mode & forbidden != 0 {
        return Err(ConfigError::File {
            path: path.display().to_string(),
            message: format!(
                "a secret file that group or others can read or write (mode {mode:04o}) is refused; run `chmod 600 {}`",
                path.display()
            ),
        });
    }
    Ok(())
}

pub const BRIGHTDATA_TOKEN_VARS: &[&str] = &[
    "BRIGHT_DATA_API_TOKEN",
    "BRIGHTDATA_API_TOKEN",
    "BRIGHTDATA_API_KEY",
];
pub const FIRECRAWL_TOKEN_VARS: &[&str] = &["FIRECRAWL_API_KEY"];

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct MapEnv(HashMap<&'static str, &'static str>);
    impl Env for MapEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| v.to_string())
        }
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = Config::from_toml("jobs_dir = \"j\"\nstate_dri = \"s\"\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("state_dri"), "{err}");
        let err = Config::from_toml("[limits]\nmax_in_flite = 3\n").unwrap_err();
        assert!(err.contains("max_in_flite"), "{err}");
    }

    #[test]
    fn file_then_env_precedence_and_key_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "output_dir = \"from-file\"\njobs_dir = \"jf\"\n[limits]\npoll_min_interval = \"50ms\"\n\
             [limits.keys.\"c_x\"]\nmax_in_flight = 2\n",
        )
        .unwrap();
        let env = MapEnv(HashMap::from([("HARVESTD_OUTPUT_DIR", "from-env")]));
        let c = Config::load(Some(&path), &env).unwrap();
        assert_eq!(c.output_dir, PathBuf::from("from-env"));
        assert_eq!(c.jobs_dir, PathBuf::from("jf"));
        assert_eq!(c.limits.poll_min_interval, Duration::from_millis(50));
        assert_eq!(c.limits.max_in_flight("c_x"), 2);
        assert_eq!(c.limits.max_in_flight("c_y"), 10);
    }

    /// The bounds on what a provider sends take sizes with units, default
    /// to the defaults in `docs/limits.md`, and refuse sizes that overflow.
    #[test]
    fn byte_sizes_and_bound_defaults() {
        let d = LimitsConfig::default();
        assert_eq!(d.retry_after_cap, Duration::from_secs(3600));
        assert_eq!(d.max_dataset_bytes, 100 << 30);
        assert_eq!(d.max_row_bytes, 64 << 20);
        assert_eq!(d.min_free_space, 1 << 30);
        let c = Config::from_toml(
            "[limits]\nmax_row_bytes = \"2KiB\"\nmax_dataset_bytes = 5000\nmin_free_space = \"3 GB\"\nretry_after_cap = \"2s\"\n",
        )
        .unwrap();
        assert_eq!(c.limits.max_row_bytes, 2048);
        assert_eq!(c.limits.max_dataset_bytes, 5000);
        assert_eq!(c.limits.min_free_space, 3_000_000_000);
        assert_eq!(c.limits.retry_after_cap, Duration::from_secs(2));
        assert_eq!(parse_byte_size("16TiB"), Ok(16 << 40));
        for bad in ["", "MiB", "12 parsecs", "-1", "99999999999TiB"] {
            assert!(parse_byte_size(bad).is_err(), "{bad}");
        }
        let err = Config::from_toml("[limits]\nmax_row_bytes = \"lots\"\n").unwrap_err();
        assert!(err.contains("lots"), "{err}");
        let small = Config::from_toml("[limits]\nmax_row_bytes = 10\n").unwrap();
        assert!(small.validate().is_err());
    }

    #[test]
    fn under_systemd_relative_directories_are_in_the_state_directory() {
        let env = MapEnv(HashMap::from([
            ("STATE_DIRECTORY", "/var/lib/harvestd:/var/lib/other"),
            ("HARVESTD_JOBS_DIR", "/srv/jobs"),
        ]));
        let c = Config::load(None, &env).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/harvestd/state"));
        assert_eq!(c.output_dir, PathBuf::from("/var/lib/harvestd/out"));
        assert_eq!(c.jobs_dir, PathBuf::from("/srv/jobs"), "absolute stays");
        assert_eq!(c.local_output_dir(), PathBuf::from("/var/lib/harvestd/out"));
        let env = MapEnv(HashMap::from([
            ("STATE_DIRECTORY", "/var/lib/harvestd"),
            ("HARVESTD_OUTPUT_DIR", "s3://lake/x"),
        ]));
        let c = Config::load(None, &env).unwrap();
        assert_eq!(c.output_dir, PathBuf::from("s3://lake/x"), "a URL stays");
        assert_eq!(
            c.local_output_dir(),
            PathBuf::from("/var/lib/harvestd/state/staging")
        );
        // Without systemd, relative is relative to the working directory.
        let c = Config::load(None, &MapEnv(HashMap::new())).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("state"));
    }

    #[test]
    fn an_object_store_output_dir_is_parsed_or_refused_by_name() {
        let url = |s: &str| ObjectUrl::parse(Path::new(s));
        assert_eq!(url("out").unwrap(), None);
        assert_eq!(url("/var/lib/harvestd/out").unwrap(), None);
        let s3 = url("s3://lake/harvest/team-a/").unwrap().unwrap();
        assert_eq!(
            (s3.kind, s3.bucket.as_str(), s3.prefix.as_str()),
            (StoreKind::S3, "lake", "harvest/team-a")
        );
        assert_eq!(s3.to_string(), "s3://lake/harvest/team-a");
        assert_eq!(url("gs://b").unwrap().unwrap().kind, StoreKind::Gcs);
        assert_eq!(url("az://c/p").unwrap().unwrap().kind, StoreKind::Azure);
        for bad in [
            "http://x/y",
            "s3://",
            "s3:///p",
            "s3://b/a/../c",
            "s3://b/a//c",
            "s3://b/p?x=1",
        ] {
            let e = url(bad).unwrap_err();
            assert!(e.starts_with("output_dir:"), "{bad}: {e}");
        }
        let mut c = Config {
            output_dir: "s3://lake/x".into(),
            ..Config::default()
        };
        assert_eq!(c.local_output_dir(), PathBuf::from("state/staging"));
        c.storage.endpoint = Some("http://127.0.0.1:9000".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("allow_http = true"), "{e}");
        c.storage.allow_http = true;
        c.validate().unwrap();
        c.output_dir = "out".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("local directory"), "{e}");
        assert_eq!(c.local_output_dir(), PathBuf::from("out"));
    }

    #[test]
    fn admin_listen_must_be_loopback() {
        let mut c = Config {
            admin_listen: "0.0.0.0:9848".into(),
            ..Config::default()
        };
        assert!(c.validate().is_err());
        c.admin_listen = "off".into();
        assert!(c.validate().is_ok());
    }

    #[test]
    fn a_provider_base_url_must_be_an_http_url() {
        assert!(Config::default().validate().is_ok(), "the real APIs' URLs");
        let env = MapEnv(HashMap::from([(
            "HARVESTD_FIRECRAWL_URL",
            "127.0.0.1:8991",
        )]));
        let err = Config::load(None, &env)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("providers.firecrawl.base_url") && err.contains("127.0.0.1:8991"),
            "{err}"
        );
        let mut c = Config::default();
        c.providers.brightdata.base_url = Some("http://127.0.0.1:8991/prefix".into());
        assert!(c.validate().is_ok());
    }

    #[test]
    fn worker_threads_default_to_one_and_zero_is_refused() {
        assert_eq!(Config::default().worker_threads, 1);
        let c = Config {
            worker_threads: 0,
            ..Config::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("worker_threads"), "{err}");
    }

    #[test]
    fn token_never_shows() {
        let t = Token::new("sekrit");
        assert_eq!(format!("{t:?} {t}"), "*** ***");
        let env = MapEnv(HashMap::from([("BRIGHTDATA_API_KEY", "k1")]));
        let found = find_token(&env, BRIGHTDATA_TOKEN_VARS, None, "brightdata-token").unwrap();
        assert_eq!(found.unwrap().expose(), "k1");
    }

    #[test]
    fn a_token_file_others_can_read_is_refused_naming_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bd-token");
        std::fs::write(&path, "sekrit\n").unwrap();
        let env = MapEnv(HashMap::new());
        for mode in [0o644, 0o640, 0o604, 0o660] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = find_token(&env, BRIGHTDATA_TOKEN_VARS, Some(&path), "brightdata-token")
                .unwrap_err()
                .to_string();
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(
                err.contains(&format!("chmod 600 {}", path.display())),
                "{err}"
            );
            assert!(!err.contains("sekrit"), "{err}");
        }
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let found = find_token(&env, BRIGHTDATA_TOKEN_VARS, Some(&path), "brightdata-token");
            assert_eq!(found.unwrap().unwrap().expose(), "sekrit");
        }
    }

    #[test]
    fn systemd_credentials_may_be_group_readable_not_world_readable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("brightdata-token");
        std::fs::write(&path, "cred\n").unwrap();
        let dir_name = dir.path().display().to_string();
        let env = MapEnv(HashMap::from([(
            "CREDENTIALS_DIRECTORY",
            &*Box::leak(dir_name.into_boxed_str()),
        )]));
        for mode in [0o400, 0o440] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let found = find_token(&env, BRIGHTDATA_TOKEN_VARS, None, "brightdata-token");
            assert_eq!(found.unwrap().unwrap().expose(), "cred");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
        let err = find_token(&env, BRIGHTDATA_TOKEN_VARS, None, "brightdata-token").unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }
}
