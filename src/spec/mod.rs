//! Job files (`docs/job-files.md`): the file as written ([`document`]) becomes a checked
//! [`JobSpec`], or a list of every [`Problem`] found, each with file, line and
//! field. No IO beyond reading the job file and its inputs file.

mod check;
pub mod confine;
pub mod document;
pub mod inputs;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use check::Checker;
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

impl JobSpec {
    /// What a Firecrawl run of `inputs` URLs should cost, before paying for
    /// it: a credit per page, five with a JSON (LLM extraction) format, as
    /// Firecrawl bills a batch scrape (`docs/job-files.md`). An estimate:
    /// options such as a stealth proxy or PDF parsing bill more, and
    /// failed pages bill nothing. `None` for Bright Data, which reports no
    /// credits.
    pub fn credits_estimate(&self, inputs: u64) -> Option<u64> {
        if self.provider != ProviderKind::Firecrawl {
            return None;
        }
        let json_format = |f: &Value| match f {
            Value::String(s) => s == "json" || s == "extract",
            Value::Object(o) => o.get("type").and_then(Value::as_str) == Some("json"),
            _ => false,
        };
        let extracts = self
            .params
            .get("formats")
            .and_then(Value::as_array)
            .is_some_and(|formats| formats.iter().any(json_format));
        Some(inputs.saturating_mul(if extracts { 5 } else { 1 }))
    }
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
    "timezone",
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
    let problem = |line: Option<usize>, message: String| Problem {
        file: file.clone(),
        line,
        field: None,
        message,
    };
    let kind = match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => DocumentKind::Toml,
        Some("json") => DocumentKind::Json,
        _ => {
            let message = "a job file must end in .toml or .json".into();
            return Err(vec![problem(None, message)]);
        }
    };
    let doc =
        Document::parse(kind, text).map_err(|(line, message)| vec![problem(line, message)])?;
    let mut problems = Vec::new();
    let name = job_name(path.file_stem().unwrap_or_default()).unwrap_or_else(|(shown, message)| {
        problems.push(problem(None, message));
        shown
    });
    let mut check = Checker {
        doc: &doc,
        problems: &mut problems,
        file: &file,
    };
    check.unknown_fields();
    let provider = check.provider();
    let key = check.key(provider);
    let inputs = check.inputs(provider, path);
    let chunk_size = check.chunk_size(provider);
    let formats = check.formats();
    let schedule = check.schedule();
    let jitter = check.jitter(schedule.is_some());
    let params = check.params(provider);
    let api_version = check.api_version(provider);
    let escape_formulas = check.csv_options();
    let dedup_key = check.dedup_key();

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

/// The job's name, from its file name: `Err` has the name as shown and
/// the problem with it.
fn job_name(stem: &std::ffi::OsStr) -> Result<String, (String, String)> {
    let Some(name) = stem.to_str() else {
        let shown = render_name(stem);
        let message = format!("job name '{shown}' (the file name) is not valid UTF-8; it must match [a-z0-9][a-z0-9._-]{{0,63}}");
        return Err((shown, message));
    };
    if !is_valid_job_name(name) {
        let message =
            format!("job name '{name}' (the file name) must match [a-z0-9][a-z0-9._-]{{0,63}}");
        return Err((name.to_string(), message));
    }
    Ok(name.to_string())
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
