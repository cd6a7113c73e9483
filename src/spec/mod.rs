//! Job files (`docs/job-files.md`): the file as written ([`document`]) becomes a checked
//! [`JobSpec`], or a list of every [`Problem`] found, each with file, line and
//! field. No IO beyond reading the job file and its inputs file.

pub mod confine;
pub mod document;
pub mod inputs;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use document::{Document, DocumentKind};

/// Which remote API a job uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    ScraperStudio,
    WebScraper,
    Firecrawl,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::ScraperStudio => "scraper_studio",
            ProviderKind::WebScraper => "web_scraper",
            ProviderKind::Firecrawl => "firecrawl",
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    Csv,
    Json,
    Ndjson,
    Parquet,
}

impl OutputFormat {
    pub fn file_name(self) -> &'static str {
        match self {
            OutputFormat::Csv => "data.csv",
            OutputFormat::Json => "data.json",
            OutputFormat::Ndjson => "data.ndjson",
            OutputFormat::Parquet => "data.parquet",
        }
    }
}

pub use crate::schedule::Recurrence as Schedule;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiVersion {
    V1,
    V2,
}

/// Where a job's inputs are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputSource {
    /// `inputs = [...]` in the job file.
    Inline(Vec<Map<String, Value>>),
    /// `inputs_file`, inside the job file's directory.
    File(InputsFile),
}

/// An `inputs_file`: the name as the job file wrote it and the directory it
/// must stay inside (the job file's). Opened only through [`open`](Self::open),
/// which refuses anything that resolves outside that directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputsFile {
    pub dir: PathBuf,
    pub name: PathBuf,
}

impl InputsFile {
    pub fn new(dir: impl Into<PathBuf>, name: impl Into<PathBuf>) -> InputsFile {
        InputsFile {
            dir: dir.into(),
            name: name.into(),
        }
    }

    /// The path for messages: the directory joined with the name.
    pub fn path(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    /// Opens the file for reading if it is a regular file inside `dir`.
    pub fn open(&self) -> Result<std::fs::File, confine::ConfineError> {
        confine::open_beneath(&self.dir, &self.name)
    }
}

/// A checked job definition. Stored with each run, so a run can finish after
/// its job file is edited or deleted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub name: String,
    pub provider: ProviderKind,
    /// The limits key: collector, dataset id, or `account` for Firecrawl.
    pub key: String,
    #[serde(skip_serializing, default = "no_inputs")]
    pub inputs: InputSource,
    pub chunk_size: u32,
    pub formats: Vec<OutputFormat>,
    pub schedule: Option<Schedule>,
    /// Spreads scheduled starts by a fixed per-job offset below this.
    #[serde(with = "humantime_serde", default)]
    pub jitter: Duration,
    pub params: Map<String, Value>,
    pub api_version: ApiVersion,
    pub escape_formulas: bool,
    /// Dotted path of the key that makes a row "new" (`new.ndjson`, `new.csv`).
    #[serde(default)]
    pub dedup_key: Option<String>,
}

fn no_inputs() -> InputSource {
    InputSource::Inline(Vec::new())
}

/// One thing wrong with a job file or its inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub file: String,
    pub line: Option<usize>,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ": ")?;
        if let Some(field) = &self.field {
            if !self.message.starts_with("unknown field") {
                write!(f, "field '{field}': ")?;
            }
        }
        f.write_str(&self.message)
    }
}

const FIELDS: &[&str] = &[
    "provider",
    "collector",
    "dataset_id",
    "inputs",
    "inputs_file",
    "chunk_size",
    "formats",
    "every",
    "cron",
    "jitter",
    "params",
    "api_version",
    "csv",
    "dedup_key",
];

/// Query parameters harvestd sets itself on Scraper Studio triggers.
const RESERVED_STUDIO_PARAMS: &[&str] = &["collector", "name"];

pub const MAX_CHUNK_SIZE: u32 = 5000;

/// Renders a file name for people: UTF-8 as it is, other bytes as `\xNN`.
pub fn render_name(name: &std::ffi::OsStr) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let mut out = String::new();
        for chunk in name.as_bytes().utf8_chunks() {
            out.push_str(chunk.valid());
            for b in chunk.invalid() {
                out.push_str(&format!("\\x{b:02x}"));
            }
        }
        out
    }
    #[cfg(not(unix))]
    {
        name.to_string_lossy().into_owned()
    }
}

/// Whether `name` is a valid job name: `[a-z0-9][a-z0-9._-]{0,63}`.
pub fn is_valid_job_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(c))
}

/// Parses and checks a job file's text. `path` is used for messages and to
/// resolve `inputs_file`; the inputs file itself is checked by
/// [`check_inputs`].
pub fn parse(path: &Path, text: &[u8]) -> Result<JobSpec, Vec<Problem>> {
    let file = path.display().to_string();
    let problem = |line: Option<usize>, field: Option<&str>, message: String| Problem {
        file: file.clone(),
        line,
        field: field.map(str::to_string),
        message,
    };
    let kind = match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => DocumentKind::Toml,
        Some("json") => DocumentKind::Json,
        _ => {
            return Err(vec![problem(
                None,
                None,
                "a job file must end in .toml or .json".into(),
            )])
        }
    };
    let stem = path.file_stem().unwrap_or_default();
    let name = stem.to_str().map(str::to_string);
    let doc = Document::parse(kind, text)
        .map_err(|(line, message)| vec![problem(line, None, message)])?;
    let mut problems = Vec::new();
    let name = match name {
        Some(name) => {
            if !is_valid_job_name(&name) {
                problems.push(problem(
                    None,
                    None,
                    format!(
                        "job name '{name}' (the file name) must match [a-z0-9][a-z0-9._-]{{0,63}}"
                    ),
                ));
            }
            name
        }
        None => {
            let shown = render_name(stem);
            problems.push(problem(
                None,
                None,
                format!("job name '{shown}' (the file name) is not valid UTF-8; it must match [a-z0-9][a-z0-9._-]{{0,63}}"),
            ));
            shown
        }
    };
    for (key, line) in doc.keys() {
        if !FIELDS.contains(&key.as_str()) {
            let hint = document::suggest(&key, FIELDS)
                .map(|s| format!(" (did you mean '{s}'?)"))
                .unwrap_or_default();
            problems.push(problem(
                Some(line),
                Some(&key),
                format!("unknown field '{key}'{hint}"),
            ));
        }
    }
    let mut checker = Checker {
        doc: &doc,
        problems: &mut problems,
        file: &file,
    };

    let provider = match checker.string("provider", true) {
        Some(p) => match p.as_str() {
            "scraper_studio" => Some(ProviderKind::ScraperStudio),
            "web_scraper" => Some(ProviderKind::WebScraper),
            "firecrawl" => Some(ProviderKind::Firecrawl),
            other => {
                checker.report(
                    "provider",
                    format!("'{other}' is not one of scraper_studio, web_scraper, firecrawl"),
                );
                None
            }
        },
        None => None,
    };

    let collector = checker.string("collector", false);
    let dataset_id = checker.string("dataset_id", false);
    let mut key = String::new();
    match provider {
        Some(ProviderKind::ScraperStudio) => {
            key = checker.remote_id("collector", collector, "c_", "scraper_studio");
            checker.only_for("dataset_id", "web_scraper");
        }
        Some(ProviderKind::WebScraper) => {
            key = checker.remote_id("dataset_id", dataset_id, "gd_", "web_scraper");
            checker.only_for("collector", "scraper_studio");
        }
        Some(ProviderKind::Firecrawl) => {
            key = "account".into();
            checker.only_for("collector", "scraper_studio");
            checker.only_for("dataset_id", "web_scraper");
        }
        None => {}
    }

    let inputs = match (doc.get("inputs"), doc.get("inputs_file")) {
        (Some(_), Some(_)) => {
            checker.report(
                "inputs_file",
                "use either 'inputs' or 'inputs_file', not both".into(),
            );
            None
        }
        (None, None) => {
            checker.report_at(
                None,
                "inputs",
                "one of 'inputs' or 'inputs_file' is required".into(),
            );
            None
        }
        (Some(v), None) => match v {
            Value::Array(items) => {
                let mut rows = Vec::with_capacity(items.len());
                let mut duplicates = inputs::Duplicates::default();
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::Object(map) => {
                            if let Err(msg) = inputs::check_row(map, provider) {
                                checker.report("inputs", format!("element {}: {msg}", i + 1));
                            } else if let Some(first) = duplicates.earlier(i + 1, map) {
                                checker.report(
                                    "inputs",
                                    format!(
                                        "element {}: the same input as element {first}; it would be paid for twice",
                                        i + 1
                                    ),
                                );
                            }
                            rows.push(map.clone());
                        }
                        _ => checker
                            .report("inputs", format!("element {} is not a table/object", i + 1)),
                    }
                }
                if items.is_empty() {
                    checker.report("inputs", "is empty: a job needs at least one input".into());
                }
                Some(InputSource::Inline(rows))
            }
            _ => {
                checker.report("inputs", "must be an array of tables/objects".into());
                None
            }
        },
        (None, Some(_)) => checker.string("inputs_file", true).and_then(|f| {
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            if let Err(e) = confine::check_name(&f) {
                checker.report("inputs_file", e.to_string());
                return None;
            }
            match inputs::InputFormat::from_path(Path::new(&f)) {
                Some(_) => Some(InputSource::File(InputsFile::new(dir, f))),
                None => {
                    checker.report(
                        "inputs_file",
                        format!("'{f}' must end in .csv, .ndjson, .jsonl, .json or .txt"),
                    );
                    None
                }
            }
        }),
    };

    let default_chunk = if provider == Some(ProviderKind::Firecrawl) {
        100
    } else {
        1000
    };
    let chunk_size = match checker.integer("chunk_size") {
        Some(n) if (1..=i64::from(MAX_CHUNK_SIZE)).contains(&n) => n as u32,
        Some(n) => {
            checker.report("chunk_size", format!("{n} is outside 1..={MAX_CHUNK_SIZE}"));
            default_chunk
        }
        None => default_chunk,
    };

    let formats = checker.formats();
    let schedule = checker.schedule();
    let jitter = checker.jitter(schedule.is_some());
    let params = checker.params(provider);
    let api_version = match checker.string("api_version", false) {
        None => ApiVersion::V2,
        Some(v) => {
            if provider.is_some() && provider != Some(ProviderKind::Firecrawl) {
                checker.report("api_version", "is only for firecrawl jobs".into());
            }
            match v.as_str() {
                "v2" => ApiVersion::V2,
                "v1" => ApiVersion::V1,
                other => {
                    checker.report("api_version", format!("'{other}' is not v1 or v2"));
                    ApiVersion::V2
                }
            }
        }
    };
    let escape_formulas = checker.csv_options();
    let dedup_key = checker.string("dedup_key", false);
    if let Some(key) = &dedup_key {
        if key.is_empty() || key.split('.').any(str::is_empty) {
            checker.report(
                "dedup_key",
                format!("'{key}' is not a dotted path such as \"url\" or \"input.url\""),
            );
        }
    }

    match (problems.is_empty(), provider, inputs) {
        (true, Some(provider), Some(inputs)) => Ok(JobSpec {
            name,
            provider,
            key,
            inputs,
            chunk_size,
            formats,
            schedule,
            jitter,
            params,
            api_version,
            escape_formulas,
            dedup_key,
        }),
        _ => Err(problems),
    }
}

/// Reads the whole job: the job file and its inputs file, collecting every
/// problem. Returns the spec and the number of inputs.
pub fn load(path: &Path) -> Result<(JobSpec, u64), Vec<Problem>> {
    let (text, _) = document::read_job_file(path).map_err(|message| {
        vec![Problem {
            file: path.display().to_string(),
            line: None,
            field: None,
            message,
        }]
    })?;
    let spec = parse(path, &text)?;
    let count = check_inputs(&spec, path)?;
    Ok((spec, count))
}

/// Checks every input row; returns how many there are.
pub fn check_inputs(spec: &JobSpec, job_path: &Path) -> Result<u64, Vec<Problem>> {
    match &spec.inputs {
        InputSource::Inline(rows) => Ok(rows.len() as u64),
        InputSource::File(file) => {
            let mut problems = Vec::new();
            let mut duplicates = inputs::Duplicates::default();
            let shown = file.path().display().to_string();
            let count = inputs::for_each(
                file,
                |_| {},
                |line, row| {
                    let checked =
                        inputs::check_row(row, Some(spec.provider)).and_then(|()| match duplicates
                            .earlier(line, row)
                        {
                            Some(first) => Err(inputs::duplicate_message(first)),
                            None => Ok(()),
                        });
                    if let Err(message) = checked {
                        problems.push(Problem {
                            file: shown.clone(),
                            line: Some(line),
                            field: None,
                            message,
                        });
                        // Past 20 problems, the file is wrong in a general way.
                        if problems.len() >= 20 {
                            return Err(());
                        }
                    }
                    Ok(())
                },
            );
            match &count {
                Ok(0) => problems.push(Problem {
                    file: shown.clone(),
                    line: None,
                    field: None,
                    message: "the inputs file holds no inputs".into(),
                }),
                Ok(_) | Err(inputs::ReadError::Stopped) => {}
                Err(e) => problems.push(Problem {
                    file: if matches!(e, inputs::ReadError::Open(_)) {
                        job_path.display().to_string()
                    } else {
                        shown.clone()
                    },
                    line: e.line(),
                    field: matches!(e, inputs::ReadError::Open(_)).then(|| "inputs_file".into()),
                    message: e.to_string(),
                }),
            }
            if problems.is_empty() {
                count.map_err(|_| Vec::new())
            } else {
                Err(problems)
            }
        }
    }
}

/// Walks the document's fields, recording problems.
struct Checker<'a> {
    doc: &'a Document,
    problems: &'a mut Vec<Problem>,
    file: &'a str,
}

impl Checker<'_> {
    fn report(&mut self, field: &str, message: String) {
        let line = self.doc.line(field);
        self.report_at(line, field, message);
    }

    fn report_at(&mut self, line: Option<usize>, field: &str, message: String) {
        self.problems.push(Problem {
            file: self.file.to_string(),
            line,
            field: Some(field.to_string()),
            message,
        });
    }

    fn string(&mut self, field: &str, required: bool) -> Option<String> {
        match self.doc.get(field) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                self.report(
                    field,
                    format!("must be a string, found {}", type_name(other)),
                );
                None
            }
            None => {
                if required {
                    self.report_at(None, field, "is required".into());
                }
                None
            }
        }
    }

    fn integer(&mut self, field: &str) -> Option<i64> {
        match self.doc.get(field) {
            Some(Value::Number(n)) if n.is_i64() => n.as_i64(),
            Some(other) => {
                self.report(
                    field,
                    format!("must be an integer, found {}", type_name(other)),
                );
                None
            }
            None => None,
        }
    }

    fn remote_id(
        &mut self,
        field: &str,
        value: Option<String>,
        prefix: &str,
        provider: &str,
    ) -> String {
        match value {
            None if self.doc.get(field).is_none() => {
                self.report_at(None, field, format!("is required for {provider} jobs"));
                String::new()
            }
            None => String::new(),
            Some(id) => {
                let rest = id.strip_prefix(prefix);
                let ok = rest.is_some_and(|r| {
                    !r.is_empty()
                        && r.len() <= 64
                        && r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                });
                if !ok {
                    self.report(field, format!("'{id}' is not an id of the form {prefix}…"));
                }
                id
            }
        }
    }

    fn only_for(&mut self, field: &str, provider: &str) {
        if self.doc.get(field).is_some() {
            self.report(field, format!("is only for {provider} jobs"));
        }
    }

    fn formats(&mut self) -> Vec<OutputFormat> {
        let default = vec![OutputFormat::Csv, OutputFormat::Json];
        let Some(value) = self.doc.get("formats") else {
            return default;
        };
        let Value::Array(items) = value else {
            self.report(
                "formats",
                "must be an array such as [\"csv\", \"json\"]".into(),
            );
            return default;
        };
        let mut formats = Vec::new();
        for item in items {
            let f = match item.as_str() {
                Some("csv") => OutputFormat::Csv,
                Some("json") => OutputFormat::Json,
                Some("ndjson") => OutputFormat::Ndjson,
                Some("parquet") => OutputFormat::Parquet,
                _ => {
                    self.report(
                        "formats",
                        format!("{item} is not one of \"csv\", \"json\", \"ndjson\", \"parquet\""),
                    );
                    continue;
                }
            };
            if formats.contains(&f) {
                self.report("formats", format!("{item} is listed twice"));
            } else {
                formats.push(f);
            }
        }
        if items.is_empty() {
            self.report(
                "formats",
                "is empty: name at least one of csv, json, ndjson, parquet".into(),
            );
        }
        formats
    }

    fn schedule(&mut self) -> Option<Schedule> {
        let every = self.string("every", false);
        let cron = self.string("cron", false);
        match (every, cron) {
            (Some(_), Some(_)) => {
                self.report("cron", "'every' and 'cron' cannot both be set".into());
                None
            }
            (Some(e), None) => match humantime::parse_duration(&e) {
                Ok(d) if d >= Duration::from_secs(60) => Some(Schedule::Every(d)),
                Ok(_) => {
                    self.report("every", format!("'{e}' is too frequent: the minimum is 1m"));
                    None
                }
                Err(err) => {
                    self.report(
                        "every",
                        format!("'{e}' is not a duration such as \"6h\": {err}"),
                    );
                    None
                }
            },
            (None, Some(c)) => match c.parse::<crate::schedule::Cron>() {
                Ok(cron) if cron.ever_matches() => Some(Schedule::Cron(c)),
                Ok(_) => {
                    self.report("cron", format!("'{c}' never matches a real date"));
                    None
                }
                Err(e) => {
                    self.report("cron", format!("'{c}': {e}"));
                    None
                }
            },
            (None, None) => None,
        }
    }

    fn jitter(&mut self, scheduled: bool) -> Duration {
        let Some(text) = self.string("jitter", false) else {
            return Duration::ZERO;
        };
        if !scheduled && self.doc.get("every").is_none() && self.doc.get("cron").is_none() {
            self.report(
                "jitter",
                "only applies to a job with 'every' or 'cron'".into(),
            );
        }
        match humantime::parse_duration(&text) {
            Ok(d) if d <= Duration::from_secs(24 * 3600) => d,
            Ok(_) => {
                self.report("jitter", format!("'{text}' is longer than a day"));
                Duration::ZERO
            }
            Err(e) => {
                self.report(
                    "jitter",
                    format!("'{text}' is not a duration such as \"5m\": {e}"),
                );
                Duration::ZERO
            }
        }
    }

    fn params(&mut self, provider: Option<ProviderKind>) -> Map<String, Value> {
        let Some(value) = self.doc.get("params") else {
            return Map::new();
        };
        let Value::Object(map) = value else {
            self.report("params", "must be a table/object".into());
            return Map::new();
        };
        if provider == Some(ProviderKind::Firecrawl) {
            return map.clone();
        }
        // Bright Data params become query parameters: scalars only.
        for (k, v) in map {
            if matches!(v, Value::Object(_) | Value::Array(_) | Value::Null) {
                self.report(
                    "params",
                    format!("'{k}' must be a string, number or boolean (it is sent as a query parameter)"),
                );
            }
            if provider == Some(ProviderKind::ScraperStudio)
                && RESERVED_STUDIO_PARAMS.contains(&k.as_str())
            {
                self.report(
                    "params",
                    format!("'{k}' is set by harvestd and cannot be given"),
                );
            }
        }
        map.clone()
    }

    fn csv_options(&mut self) -> bool {
        let Some(value) = self.doc.get("csv") else {
            return true;
        };
        let Value::Object(map) = value else {
            self.report(
                "csv",
                "must be a table/object such as { escape_formulas = true }".into(),
            );
            return true;
        };
        let mut escape = true;
        for (k, v) in map {
            match (k.as_str(), v) {
                ("escape_formulas", Value::Bool(b)) => escape = *b,
                ("escape_formulas", other) => self.report(
                    "csv.escape_formulas",
                    format!("must be true or false, found {}", type_name(other)),
                ),
                (other, _) => self.report("csv", format!("unknown field 'csv.{other}'")),
            }
        }
        escape
    }
}

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "a table/object",
    }
}

#[cfg(test)]
mod tests;
