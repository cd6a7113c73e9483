//! A job file as written: top-level fields with the line each starts on,
//! whether the file is TOML or JSON. Values become `serde_json::Value` so one
//! checker serves both formats.

use std::io::Read;
use std::path::Path;

use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocumentKind {
    Toml,
    Json,
}

/// Job files hold definitions and small inline input lists (about 10,000
/// inputs fit); anything larger belongs in an inputs file.
pub const MAX_JOB_FILE_BYTES: u64 = 1024 * 1024;

pub struct Document {
    kind: DocumentKind,
    text: String,
    fields: Map<String, Value>,
}

/// Reads a job file, refusing what is not a regular file, is too large, or
/// is a link leading out of its directory (a link in the jobs directory to
/// a secret must not have the secret quoted back in a parse error). Returns
/// the bytes and the metadata of the file read.
pub fn read_job_file(path: &Path) -> Result<(Vec<u8>, std::fs::Metadata), String> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or("is not a file name")?;
    let file = super::confine::open_beneath(dir, Path::new(name)).map_err(|e| match e {
        super::confine::ConfineError::Outside(_) => {
            "is a link leading outside the jobs directory; job files must be inside it".to_string()
        }
        super::confine::ConfineError::NotRegular(_) => "not a regular file".to_string(),
        super::confine::ConfineError::Io { error, .. } => format!("cannot read: {error}"),
        other => other.to_string(),
    })?;
    let meta = file.metadata().map_err(|e| format!("cannot read: {e}"))?;
    if meta.len() > MAX_JOB_FILE_BYTES {
        return Err(format!(
            "is {} bytes; job files are limited to {MAX_JOB_FILE_BYTES} (put inputs in an inputs_file)",
            meta.len()
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_JOB_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    Ok((bytes, meta))
}

impl Document {
    /// Parses the text; on failure returns the line (if known) and a message.
    pub fn parse(kind: DocumentKind, bytes: &[u8]) -> Result<Document, (Option<usize>, String)> {
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        let text = std::str::from_utf8(bytes).map_err(|e| {
            let line = bytes[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1;
            (Some(line), "is not valid UTF-8".to_string())
        })?;
        if text.trim().is_empty() {
            return Err((None, "is empty".into()));
        }
        let value = match kind {
            DocumentKind::Toml => {
                let table: toml::Table = toml::from_str(text).map_err(|e: toml::de::Error| {
                    let line = e.span().map(|s| line_of(text, s.start));
                    (line, format!("invalid TOML: {}", e.message().trim()))
                })?;
                toml_to_json(toml::Value::Table(table)).map_err(|m| (None, m))?
            }
            DocumentKind::Json => {
                parse_json(text).map_err(|e| (Some(e.line()), format!("invalid JSON: {e}")))?
            }
        };
        let Value::Object(fields) = value else {
            return Err((Some(1), "must be a JSON object of fields".into()));
        };
        Ok(Document {
            kind,
            text: text.to_string(),
            fields,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.fields.get(key)
    }

    /// Top-level keys with their lines, in file order.
    pub fn keys(&self) -> Vec<(String, usize)> {
        self.fields
            .keys()
            .map(|k| (k.clone(), self.line(k).unwrap_or(1)))
            .collect()
    }

    /// The line a top-level field is written on: found by looking for the
    /// key where a key can stand, which the parsers do not report.
    pub fn line(&self, key: &str) -> Option<usize> {
        let key = key.split('.').next().unwrap_or(key);
        for (i, line) in self.text.lines().enumerate() {
            let t = line.trim_start();
            let found = match self.kind {
                DocumentKind::Toml => {
                    let rest = t
                        .strip_prefix(key)
                        .or_else(|| t.strip_prefix(&format!("\"{key}\"")));
                    let is_table = t.starts_with('[')
                        && t.trim_start_matches('[').trim_start().starts_with(key)
                        && t.trim_start_matches('[').trim_start()[key.len()..]
                            .trim_start()
                            .starts_with([']', '.']);
                    is_table || rest.is_some_and(|r| r.trim_start().starts_with(['=', '.']))
                }
                DocumentKind::Json => {
                    let quoted = format!("\"{key}\"");
                    line.match_indices(&quoted)
                        .any(|(at, _)| line[at + quoted.len()..].trim_start().starts_with(':'))
                }
            };
            if found {
                return Some(i + 1);
            }
        }
        None
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn toml_to_json(v: toml::Value) -> Result<Value, String> {
    Ok(match v {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => serde_json::Number::from_f64(f)
            .map(Value::Number)
            .ok_or_else(|| format!("{f} is not a finite number"))?,
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => {
            Value::Array(a.into_iter().map(toml_to_json).collect::<Result<_, _>>()?)
        }
        toml::Value::Table(t) => Value::Object(
            t.into_iter()
                .map(|(k, v)| Ok((k, toml_to_json(v)?)))
                .collect::<Result<_, String>>()?,
        ),
    })
}

/// The known name closest to `unknown`, if it is a likely typo.
pub fn suggest<'a>(unknown: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(unknown, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Parses JSON refusing an object that repeats a key: serde_json would keep
/// the last one silently and run a job (or collect an input) other than
/// the one written.
pub fn parse_json(text: &str) -> Result<Value, serde_json::Error> {
    serde_json::from_str::<Unique>(text).map(|u| u.0)
}

struct Unique(Value);

impl<'de> serde::Deserialize<'de> for Unique {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueVisitor).map(Unique)
    }
}

struct UniqueVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Unique(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut fields = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if fields.contains_key(&key) {
                return Err(serde::de::Error::custom(format_args!(
                    "the key '{key}' is given twice"
                )));
            }
            let Unique(v) = map.next_value()?;
            fields.insert(key, v);
        }
        Ok(Value::Object(fields))
    }
}
