//! The checks of a job file's fields, each recording every problem it
//! finds with the field's line (`docs/job-files.md`).

use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value};

use super::document::{self, Document};
use super::{
    confine, inputs, type_name, ApiVersion, InputSource, InputsFile, OutputFormat, Problem,
    ProviderKind, Schedule, FIELDS, MAX_CHUNK_SIZE, RESERVED_STUDIO_PARAMS,
};

/// Walks the document's fields, recording problems.
pub(super) struct Checker<'a> {
    pub(super) doc: &'a Document,
    pub(super) problems: &'a mut Vec<Problem>,
    pub(super) file: &'a str,
}

impl Checker<'_> {
    /// Every field the job file has that a job file cannot have.
    pub(super) fn unknown_fields(&mut self) {
        for (key, line) in self.doc.keys() {
            if !FIELDS.contains(&key.as_str()) {
                let hint = document::suggest(&key, FIELDS)
                    .map(|s| format!(" (did you mean '{s}'?)"))
                    .unwrap_or_default();
                self.report_at(Some(line), &key, format!("unknown field '{key}'{hint}"));
            }
        }
    }

    pub(super) fn provider(&mut self) -> Option<ProviderKind> {
        let p = self.string("provider", true)?;
        match p.as_str() {
            "scraper_studio" => Some(ProviderKind::ScraperStudio),
            "web_scraper" => Some(ProviderKind::WebScraper),
            "firecrawl" => Some(ProviderKind::Firecrawl),
            other => {
                self.report(
                    "provider",
                    format!("'{other}' is not one of scraper_studio, web_scraper, firecrawl"),
                );
                None
            }
        }
    }

    /// The limits key: the collector, the dataset, or Firecrawl's account;
    /// the other provider's id field is refused.
    pub(super) fn key(&mut self, provider: Option<ProviderKind>) -> String {
        let collector = self.string("collector", false);
        let dataset_id = self.string("dataset_id", false);
        match provider {
            Some(ProviderKind::ScraperStudio) => {
                let key = self.remote_id("collector", collector, "c_", "scraper_studio");
                self.only_for("dataset_id", "web_scraper");
                key
            }
            Some(ProviderKind::WebScraper) => {
                let key = self.remote_id("dataset_id", dataset_id, "gd_", "web_scraper");
                self.only_for("collector", "scraper_studio");
                key
            }
            Some(ProviderKind::Firecrawl) => {
                self.only_for("collector", "scraper_studio");
                self.only_for("dataset_id", "web_scraper");
                "account".into()
            }
            None => String::new(),
        }
    }

    /// `inputs` or `inputs_file`, exactly one. An inputs file is only
    /// named here; [`load`](super::load) reads it.
    pub(super) fn inputs(
        &mut self,
        provider: Option<ProviderKind>,
        path: &Path,
    ) -> Option<InputSource> {
        match (self.doc.get("inputs"), self.doc.get("inputs_file")) {
            (Some(_), Some(_)) => {
                self.report(
                    "inputs_file",
                    "use either 'inputs' or 'inputs_file', not both".into(),
                );
                None
            }
            (None, None) => {
                self.report_at(
                    None,
                    "inputs",
                    "one of 'inputs' or 'inputs_file' is required".into(),
                );
                None
            }
            (Some(Value::Array(items)), None) => Some(self.inline_inputs(items, provider)),
            (Some(_), None) => {
                self.report("inputs", "must be an array of tables/objects".into());
                None
            }
            (None, Some(_)) => self.inputs_file(path),
        }
    }

    fn inline_inputs(&mut self, items: &[Value], provider: Option<ProviderKind>) -> InputSource {
        let mut rows = Vec::with_capacity(items.len());
        let mut duplicates = inputs::Duplicates::default();
        for (i, item) in items.iter().enumerate() {
            let n = i + 1;
            let Value::Object(map) = item else {
                self.report("inputs", format!("element {n} is not a table/object"));
                continue;
            };
            if let Err(msg) = inputs::check_row(map, provider) {
                self.report("inputs", format!("element {n}: {msg}"));
            } else if let Some(first) = duplicates.earlier(n, map) {
                self.report(
                    "inputs",
                    format!("element {n}: the same input as element {first}; it would be paid for twice"),
                );
            }
            rows.push(map.clone());
        }
        if items.is_empty() {
            self.report("inputs", "is empty: a job needs at least one input".into());
        }
        InputSource::Inline(rows)
    }

    fn inputs_file(&mut self, path: &Path) -> Option<InputSource> {
        let f = self.string("inputs_file", true)?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if let Err(e) = confine::check_name(&f) {
            self.report("inputs_file", e.to_string());
            return None;
        }
        if inputs::InputFormat::from_path(Path::new(&f)).is_none() {
            self.report(
                "inputs_file",
                format!("'{f}' must end in .csv, .ndjson, .jsonl, .json or .txt"),
            );
            return None;
        }
        Some(InputSource::File(InputsFile::new(dir, f)))
    }

    /// 1..=MAX_CHUNK_SIZE; by default 100 for Firecrawl, 1000 for Bright Data.
    pub(super) fn chunk_size(&mut self, provider: Option<ProviderKind>) -> u32 {
        let default = match provider {
            Some(ProviderKind::Firecrawl) => 100,
            _ => 1000,
        };
        match self.integer("chunk_size") {
            Some(n) if (1..=i64::from(MAX_CHUNK_SIZE)).contains(&n) => n as u32,
            Some(n) => {
                self.report("chunk_size", format!("{n} is outside 1..={MAX_CHUNK_SIZE}"));
                default
            }
            None => default,
        }
    }

    pub(super) fn api_version(&mut self, provider: Option<ProviderKind>) -> ApiVersion {
        let Some(v) = self.string("api_version", false) else {
            return ApiVersion::V2;
        };
        if provider.is_some() && provider != Some(ProviderKind::Firecrawl) {
            self.report("api_version", "is only for firecrawl jobs".into());
        }
        match v.as_str() {
            "v2" => ApiVersion::V2,
            "v1" => ApiVersion::V1,
            other => {
                self.report("api_version", format!("'{other}' is not v1 or v2"));
                ApiVersion::V2
            }
        }
    }

    pub(super) fn dedup_key(&mut self) -> Option<String> {
        let key = self.string("dedup_key", false)?;
        if key.is_empty() || key.split('.').any(str::is_empty) {
            self.report(
                "dedup_key",
                format!("'{key}' is not a dotted path such as \"url\" or \"input.url\""),
            );
        }
        Some(key)
    }

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

    pub(super) fn formats(&mut self) -> Vec<OutputFormat> {
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

    pub(super) fn schedule(&mut self) -> Option<Schedule> {
        let every = self.string("every", false);
        let cron = self.string("cron", false);
        let timezone = self.string("timezone", false);
        // The zone travels with the expression, as cronie's prefix, so a
        // stored schedule keeps its form.
        let cron = match (cron, timezone) {
            (Some(c), Some(tz)) => {
                if c.trim_start().starts_with("CRON_TZ=") {
                    self.report(
                        "timezone",
                        "the cron expression names its zone already (CRON_TZ=)".into(),
                    );
                    return None;
                }
                if let Err(e) = crate::schedule::zone(&tz) {
                    self.report("timezone", format!("'{tz}' {}", e.message));
                    return None;
                }
                Some(format!("CRON_TZ={tz} {c}"))
            }
            (None, Some(_)) => {
                self.report(
                    "timezone",
                    "only applies to a 'cron' schedule ('every' counts real time)".into(),
                );
                None
            }
            (c, None) => c,
        };
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

    pub(super) fn jitter(&mut self, scheduled: bool) -> Duration {
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

    pub(super) fn params(&mut self, provider: Option<ProviderKind>) -> Map<String, Value> {
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

    pub(super) fn csv_options(&mut self) -> bool {
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
