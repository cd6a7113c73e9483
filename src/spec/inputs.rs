//! Input files, read as a stream of rows with their line numbers: memory
//! holds one row at a time, whatever the file's size.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde_json::{Map, Value};

use super::{InputsFile, ProviderKind};
use crate::jsonstream::ArraySplitter;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    /// Header row names the fields; every value is a string.
    Csv,
    /// One JSON object per line (`.ndjson`, `.jsonl`).
    Ndjson,
    /// One JSON array of objects.
    Json,
    /// One URL per line, becoming `{"url": …}`.
    Txt,
}

impl InputFormat {
    pub fn from_path(path: &Path) -> Option<InputFormat> {
        match path.extension()?.to_str()? {
            "csv" => Some(InputFormat::Csv),
            "ndjson" | "jsonl" => Some(InputFormat::Ndjson),
            "json" => Some(InputFormat::Json),
            "txt" => Some(InputFormat::Txt),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read inputs file: {0}")]
    Open(String),
    #[error("{message}")]
    At { line: usize, message: String },
    /// The callback asked to stop.
    #[error("stopped")]
    Stopped,
}

impl ReadError {
    pub fn line(&self) -> Option<usize> {
        match self {
            ReadError::At { line, .. } => Some(*line),
            _ => None,
        }
    }
}

fn at(line: usize, message: impl Into<String>) -> ReadError {
    ReadError::At {
        line,
        message: message.into(),
    }
}

/// The longest line (`.txt`, `.ndjson`) or record (`.csv` row, `.json`
/// element) an inputs file may have. Reading holds at most about this much
/// of a file at once, whatever its size, so a file without newlines cannot
/// take the daemon's memory.
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;

fn too_long(line: usize, what: &str) -> ReadError {
    at(
        line,
        format!("{what} is longer than 1 MiB (the limit for one input); is this the right file?"),
    )
}

/// Passes every byte read through `on_bytes` (the content hash is taken in
/// the same pass that plans, so what is planned is what was hashed) and
/// counts them.
struct Tee<R, F> {
    inner: R,
    on_bytes: F,
    read: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R: Read, F: FnMut(&[u8])> Read for Tee<R, F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.on_bytes)(&buf[..n]);
        self.read.set(self.read.get() + n as u64);
        Ok(n)
    }
}

/// Calls `row` with each input and its line; returns the number of rows.
/// Every byte of the file passes through `on_bytes` as it is read.
/// `row` returning `Err(())` stops the reading with [`ReadError::Stopped`].
pub fn for_each(
    file: &InputsFile,
    on_bytes: impl FnMut(&[u8]),
    mut row: impl FnMut(usize, &Map<String, Value>) -> Result<(), ()>,
) -> Result<u64, ReadError> {
    let shown = file.path().display().to_string();
    let format = InputFormat::from_path(&file.name)
        .ok_or_else(|| ReadError::Open(format!("{shown}: unknown inputs file type")))?;
    let opened = file.open().map_err(|e| ReadError::Open(e.to_string()))?;
    let read = std::rc::Rc::new(std::cell::Cell::new(0u64));
    let tee = Tee {
        inner: opened,
        on_bytes,
        read: read.clone(),
    };
    let mut count = 0u64;
    let mut emit = |line: usize, map: &Map<String, Value>| {
        count += 1;
        row(line, map).map_err(|()| ReadError::Stopped)
    };
    match format {
        InputFormat::Csv => read_csv(tee, &read, &mut emit)?,
        InputFormat::Ndjson => read_lines(
            BufReader::with_capacity(256 * 1024, tee),
            &mut emit,
            |line, text| match super::document::parse_json(text) {
                Ok(Value::Object(map)) => Ok(Some(map)),
                Ok(other) => Err(at(
                    line,
                    format!("expected a JSON object, found {}", super::type_name(&other)),
                )),
                Err(e) => Err(at(line, format!("invalid JSON: {e}"))),
            },
        )?,
        InputFormat::Txt => read_lines(
            BufReader::with_capacity(256 * 1024, tee),
            &mut emit,
            |_, text| {
                if text.starts_with('#') {
                    return Ok(None);
                }
                let mut map = Map::new();
                map.insert("url".into(), Value::String(text.to_string()));
                Ok(Some(map))
            },
        )?,
        InputFormat::Json => read_json_array(BufReader::with_capacity(256 * 1024, tee), &mut emit)?,
    }
    Ok(count)
}

type Emit<'a> = dyn FnMut(usize, &Map<String, Value>) -> Result<(), ReadError> + 'a;

/// Calls `each(line_number, bytes)` for every line, newline included. A
/// line longer than [`MAX_RECORD_BYTES`] is an error, found before more of
/// it than that is held.
fn for_each_line(
    mut reader: impl BufRead,
    mut each: impl FnMut(usize, &[u8]) -> Result<(), ReadError>,
) -> Result<usize, ReadError> {
    let mut buf = Vec::new();
    let mut line = 0usize;
    loop {
        buf.clear();
        let complete = loop {
            let available = reader
                .fill_buf()
                .map_err(|e| at(line + 1, format!("read error: {e}")))?;
            if available.is_empty() {
                break false;
            }
            let (take, done) = match memchr::memchr(b'\n', available) {
                Some(i) => (i + 1, true),
                None => (available.len(), false),
            };
            if buf.len() + take > MAX_RECORD_BYTES + 1 {
                return Err(too_long(line + 1, "the line"));
            }
            buf.extend_from_slice(&available[..take]);
            reader.consume(take);
            if done {
                break true;
            }
        };
        if buf.is_empty() && !complete {
            return Ok(line);
        }
        line += 1;
        each(line, &buf)?;
    }
}

fn read_lines(
    reader: impl BufRead,
    emit: &mut Emit<'_>,
    parse: impl Fn(usize, &str) -> Result<Option<Map<String, Value>>, ReadError>,
) -> Result<(), ReadError> {
    for_each_line(reader, |line, buf| {
        let bytes = if line == 1 {
            buf.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(buf)
        } else {
            buf
        };
        let text = std::str::from_utf8(bytes).map_err(|_| at(line, "is not valid UTF-8"))?;
        let text = text.trim();
        if text.is_empty() {
            return Ok(());
        }
        match parse(line, text)? {
            Some(map) => emit(line, &map),
            None => Ok(()),
        }
    })
    .map(|_| ())
}

/// The error a capped CSV reader raises; found again in [`csv_error`].
#[derive(Debug)]
struct RecordTooLong;

impl std::fmt::Display for RecordTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("record longer than 1 MiB")
    }
}

impl std::error::Error for RecordTooLong {}

/// Fails the read once more than [`MAX_RECORD_BYTES`] (and the CSV
/// reader's small buffer) have been read since the last record ended: a
/// quoted field that never closes cannot grow the record without bound.
struct CappedSinceRecord<R> {
    inner: R,
    read: std::rc::Rc<std::cell::Cell<u64>>,
    record_end: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R: Read> Read for CappedSinceRecord<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let since = self.read.get().saturating_sub(self.record_end.get());
        if since > (MAX_RECORD_BYTES + 64 * 1024) as u64 {
            return Err(std::io::Error::other(RecordTooLong));
        }
        self.inner.read(buf)
    }
}

fn read_csv(
    reader: impl Read,
    read: &std::rc::Rc<std::cell::Cell<u64>>,
    emit: &mut Emit<'_>,
) -> Result<(), ReadError> {
    let record_end = std::rc::Rc::new(std::cell::Cell::new(0u64));
    let capped = CappedSinceRecord {
        inner: reader,
        read: read.clone(),
        record_end: record_end.clone(),
    };
    let mut csv = csv::ReaderBuilder::new()
        .flexible(false)
        .from_reader(capped);
    let headers = csv
        .headers()
        .map_err(|e| csv_error(&e, 1))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect::<Vec<_>>();
    if headers.iter().all(String::is_empty) {
        return Err(at(
            1,
            "the header row is empty: it must name the input fields",
        ));
    }
    if let Some(i) = headers.iter().position(String::is_empty) {
        return Err(at(
            1,
            format!("column {} has no name in the header row", i + 1),
        ));
    }
    let mut record = csv::StringRecord::new();
    let mut last_line = 1usize;
    loop {
        record_end.set(csv.position().byte());
        match csv.read_record(&mut record) {
            Ok(false) => return Ok(()),
            Ok(true) => {
                let line = record.position().map_or(0, |p| p.line() as usize);
                last_line = line;
                if record.as_slice().len() > MAX_RECORD_BYTES {
                    return Err(too_long(line, "the row"));
                }
                let map: Map<String, Value> = headers
                    .iter()
                    .zip(record.iter())
                    .map(|(h, v)| (h.clone(), Value::String(v.to_string())))
                    .collect();
                emit(line, &map)?;
            }
            Err(e) => return Err(csv_error(&e, last_line + 1)),
        }
    }
}

fn csv_error(e: &csv::Error, fallback_line: usize) -> ReadError {
    let line = e.position().map_or(fallback_line, |p| p.line() as usize);
    let message = match e.kind() {
        csv::ErrorKind::Io(io)
            if io
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<RecordTooLong>().is_some()) =>
        {
            return too_long(line, "the row");
        }
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!("row has {len} fields; the header has {expected_len}"),
        csv::ErrorKind::Utf8 { .. } => "is not valid UTF-8".into(),
        _ => format!("invalid CSV: {e}"),
    };
    at(line, message)
}

fn read_json_array(mut reader: impl BufRead, emit: &mut Emit<'_>) -> Result<(), ReadError> {
    // Fed in the reader's blocks, cut at newlines only to count lines: a
    // minified array on one line is fine, one element over the cap is not.
    let mut splitter = ArraySplitter::new();
    let mut line = 1usize;
    loop {
        let block = reader
            .fill_buf()
            .map_err(|e| at(line, format!("read error: {e}")))?;
        if block.is_empty() {
            break;
        }
        let n = block.len();
        for segment in block.split_inclusive(|&b| b == b'\n') {
            splitter
                .feed(segment, |element| {
                    if element.len() > MAX_RECORD_BYTES {
                        return Err(too_long(line, "the element"));
                    }
                    let parsed = std::str::from_utf8(element)
                        .map_err(|e| e.to_string())
                        .and_then(|text| {
                            super::document::parse_json(text).map_err(|e| e.to_string())
                        });
                    match parsed {
                        Ok(Value::Object(map)) => emit(line, &map),
                        Ok(other) => Err(at(
                            line,
                            format!("expected a JSON object, found {}", super::type_name(&other)),
                        )),
                        Err(e) => Err(at(line, format!("invalid JSON: {e}"))),
                    }
                })
                .map_err(|e| match e {
                    Ok(err) => err,
                    Err(split) => at(line, split.to_string()),
                })?;
            if splitter.pending_len() > MAX_RECORD_BYTES {
                return Err(too_long(line, "the element"));
            }
            if segment.ends_with(b"\n") {
                line += 1;
            }
        }
        reader.consume(n);
    }
    splitter.finish().map_err(|e| at(line, e.to_string()))
}

/// Finds inputs given twice. An identical input is an identical collection
/// paid for twice, so it is a problem, not a quirk. Rows are remembered by
/// a 128-bit hash of their JSON (16 bytes and a line each), so a million
/// inputs cost tens of megabytes, never the rows themselves.
#[derive(Default)]
pub struct Duplicates {
    seen: std::collections::HashMap<u128, usize>,
}

impl Duplicates {
    /// The line (or element) of an earlier identical input, if any.
    pub fn earlier(&mut self, line: usize, row: &Map<String, Value>) -> Option<usize> {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(serde_json::to_vec(row).unwrap_or_default());
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest[..16]);
        match self.seen.entry(u128::from_le_bytes(key)) {
            std::collections::hash_map::Entry::Occupied(e) => Some(*e.get()),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(line);
                None
            }
        }
    }
}

/// The problem text for a repeated input.
pub fn duplicate_message(earlier: usize) -> String {
    format!(
        "the same input as line {earlier}: it would be collected and paid for twice; remove one"
    )
}

/// The longest URL an input may have (RFC 9110 asks servers for 8,000).
pub const MAX_URL_BYTES: usize = 8192;

/// Checks one input row for the provider.
pub fn check_row(row: &Map<String, Value>, provider: Option<ProviderKind>) -> Result<(), String> {
    if row.is_empty() {
        return Err("an input must have at least one field".into());
    }
    match row.get("url") {
        Some(Value::String(url)) => {
            if url.len() > MAX_URL_BYTES {
                return Err(format!(
                    "field 'url': is {} bytes long; URLs over {MAX_URL_BYTES} bytes are refused by servers and providers",
                    url.len()
                ));
            }
            let ok = (url.starts_with("http://") || url.starts_with("https://"))
                && url.len() > "https://".len()
                && !url.chars().any(char::is_whitespace);
            if !ok {
                return Err(format!(
                    "field 'url': '{}' is not an http(s) URL",
                    truncate(url)
                ));
            }
        }
        Some(other) => {
            return Err(format!(
                "field 'url': must be a string, found {}",
                super::type_name(other)
            ))
        }
        None if provider == Some(ProviderKind::Firecrawl) => {
            return Err("field 'url': is required for firecrawl inputs".into())
        }
        None => {}
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    if s.chars().count() > 80 {
        format!("{}…", s.chars().take(80).collect::<String>())
    } else {
        s.to_string()
    }
}
