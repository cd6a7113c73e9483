//! Part files: the raw rows of one chunk, one compact JSON value per line,
//! written as they stream in and made durable before the chunk is marked
//! downloaded (`docs/durability.md`).

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use super::columns::Columns;
use super::{AtomicFile, DropBehind, Written};
use crate::provider::RowSink;

pub fn parts_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("parts")
}

pub fn part_path(run_dir: &Path, index: u32) -> PathBuf {
    parts_dir(run_dir).join(format!("chunk-{index:06}.ndjson"))
}

/// One saved page of a chunk's download, before the pages are joined.
pub fn page_path(run_dir: &Path, index: u32, page: u32) -> PathBuf {
    parts_dir(run_dir).join(format!("chunk-{index:06}.page-{page:05}.ndjson"))
}

/// Joins a chunk's saved pages into its part file, durably, and removes
/// the pages. A single page is renamed. Safe to repeat after a crash:
/// pages are removed only once the part is durable, so a missing page with
/// the part present means the join is done, and a crash among the removals
/// leaves pages that the next call removes.
pub fn join_pages(run_dir: &Path, index: u32, pages: u32) -> io::Result<()> {
    let part = part_path(run_dir, index);
    let paths: Vec<PathBuf> = (0..pages).map(|p| page_path(run_dir, index, p)).collect();
    if paths.iter().any(|p| !p.exists()) {
        if part.exists() {
            for path in &paths {
                let _ = std::fs::remove_file(path);
            }
            return Ok(());
        }
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("a saved page of chunk {index} is missing"),
        ));
    }
    if pages == 1 {
        std::fs::rename(&paths[0], &part)?;
        return super::sync_dir(&parts_dir(run_dir));
    }
    let mut out = AtomicFile::create_part(&part)?;
    for path in &paths {
        io::copy(&mut std::fs::File::open(path)?, &mut out)?;
    }
    out.commit()?;
    for path in &paths {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Calls `row(raw)` for every row of the given parts, in order.
pub(crate) fn for_each_row(
    run_dir: &Path,
    parts: &[u32],
    mut row: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let mut line = Vec::with_capacity(8192);
    for &index in parts {
        let path = part_path(run_dir, index);
        let mut reader = BufReader::with_capacity(
            256 * 1024,
            File::open(&path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?,
        );
        // Parts are read once per pass, front to back: what is read goes
        // from the page cache as it would when written.
        let mut behind = DropBehind::default();
        let mut at = 0u64;
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line)?;
            if n == 0 {
                break;
            }
            at += n as u64;
            if behind.due(at) {
                behind.advance(reader.get_ref(), at);
            }
            let raw = line.strip_suffix(b"\n").unwrap_or(&line);
            if raw.is_empty() {
                continue;
            }
            row(raw)?;
        }
    }
    Ok(())
}

/// Receives one chunk's rows; counts data and error rows as they pass and
/// collects the data rows' CSV columns (one walk of each row decides both,
/// and checks that it is JSON). A dataset row that is not JSON is kept as
/// a malformed-row record (`docs/outputs.md`), an error row like the provider's.
pub struct PartWriter {
    file: AtomicFile,
    /// The chunk, named in malformed-row records.
    index: u32,
    /// Rows longer than this come cut ([`RowSink::oversize_row`]).
    pub max_row_bytes: u64,
    pub rows: u64,
    pub error_rows: u64,
    /// Malformed rows kept as records (counted apart from `error_rows`).
    pub malformed_rows: u64,
    pub columns: Columns,
}

/// How every malformed-row record begins, so the final pass can count them.
pub const MALFORMED_PREFIX: &[u8] = br#"{"error_code":"malformed_row","#;

impl PartWriter {
    /// A writer for page `page` of chunk `index`.
    pub fn create(run_dir: &Path, index: u32, page: u32) -> io::Result<PartWriter> {
        super::create_dir_durable(&parts_dir(run_dir))?;
        Ok(PartWriter {
            file: AtomicFile::create_part(&page_path(run_dir, index, page))?,
            index,
            max_row_bytes: 64 * 1024 * 1024,
            rows: 0,
            error_rows: 0,
            malformed_rows: 0,
            columns: Columns::default(),
        })
    }

    /// Makes the part durable under its final name.
    pub fn commit(self) -> io::Result<Written> {
        self.file.commit()
    }

    /// Writes one malformed-row record: `{"error_code":"malformed_row",
    /// "error","chunk","byte_offset","raw"|"raw_base64"}` (and `length`
    /// for a row that was cut). The raw bytes go straight to the file,
    /// escaped or encoded as they are written.
    fn malformed(
        &mut self,
        raw: &[u8],
        error: &str,
        byte_offset: u64,
        cut_from: Option<u64>,
    ) -> io::Result<()> {
        self.malformed_rows += 1;
        tracing::warn!(
            chunk = self.index,
            byte_offset,
            error,
            "malformed row kept in errors.ndjson"
        );
        let f = &mut self.file;
        f.write_all(MALFORMED_PREFIX)?;
        f.write_all(b"\"error\":")?;
        serde_json::to_writer(&mut *f, error).map_err(io::Error::other)?;
        write!(f, ",\"chunk\":{},\"byte_offset\":{byte_offset}", self.index)?;
        if let Some(len) = cut_from {
            write!(f, ",\"length\":{len}")?;
        }
        // A cut row may end inside a character: what comes before it is
        // still text.
        let text = match std::str::from_utf8(raw) {
            Ok(text) => Some(text),
            Err(e) if cut_from.is_some() && e.error_len().is_none() => {
                std::str::from_utf8(&raw[..e.valid_up_to()]).ok()
            }
            Err(_) => None,
        };
        match text {
            Some(text) => {
                f.write_all(b",\"raw\":")?;
                serde_json::to_writer(&mut *f, text).map_err(io::Error::other)?;
            }
            None => {
                f.write_all(b",\"raw_base64\":\"")?;
                for piece in raw.chunks(48 * 1024) {
                    f.write_all(base64(piece).as_bytes())?;
                }
                f.write_all(b"\"")?;
            }
        }
        f.write_all(b"}\n")
    }
}

/// The deepest nesting of arrays and objects a row may have (`docs/outputs.md`).
pub const MAX_DEPTH: usize = 128;

/// Whether a row nests arrays and objects deeper than [`MAX_DEPTH`].
/// serde_json stops at 128 levels itself, but not where a value is
/// skipped over or kept raw (as CSV leaves are), so it is checked here
/// first; rows with fewer brackets than that are passed at SIMD speed.
fn too_deep(raw: &[u8]) -> bool {
    if memchr::memchr2_iter(b'[', b'{', raw)
        .nth(MAX_DEPTH)
        .is_none()
    {
        return false;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in raw {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Standard base64 with padding (RFC 4648 §4). Pieces of a multiple of 3
/// bytes encode to text that joins without padding in between.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= group.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl RowSink for PartWriter {
    fn row(&mut self, raw: &[u8]) -> io::Result<()> {
        crate::failpoint::io_error("part-write")?;
        if self.columns.add_row(raw)? {
            self.error_rows += 1;
        } else {
            self.rows += 1;
        }
        self.file.write_all(raw)?;
        self.file.write_all(b"\n")
    }

    /// A row that is not JSON (invalid UTF-8, a raw control character,
    /// nesting deeper than 128) becomes a malformed-row record instead of
    /// failing the download: the rest of the dataset is saved once.
    fn row_at(&mut self, raw: &[u8], byte_offset: u64) -> io::Result<()> {
        if raw.len() as u64 > self.max_row_bytes {
            let head = &raw[..usize::try_from(self.max_row_bytes).unwrap_or(usize::MAX)];
            return self.oversize_row(head, raw.len() as u64, byte_offset);
        }
        if too_deep(raw) {
            let error = format!("row is nested deeper than {MAX_DEPTH} levels");
            return self.malformed(raw, &error, byte_offset, None);
        }
        match self.row(raw) {
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let error = e.to_string();
                self.malformed(raw, &error, byte_offset, None)
            }
            other => other,
        }
    }

    fn oversize_row(&mut self, head: &[u8], len: u64, byte_offset: u64) -> io::Result<()> {
        crate::failpoint::io_error("part-write")?;
        let error = format!(
            "row of {len} bytes is larger than limits.max_row_bytes ({}); raw holds its first {} bytes",
            self.max_row_bytes,
            head.len()
        );
        self.malformed(head, &error, byte_offset, Some(len))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn page(run: &Path, index: u32, page: u32, row: &[u8]) {
        let mut w = PartWriter::create(run, index, page).unwrap();
        w.row(row).unwrap();
        w.commit().unwrap();
    }

    #[test]
    fn base64_matches_rfc_4648() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), coded);
        }
        assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
    }

    #[test]
    fn nesting_depth_is_counted_outside_strings() {
        let nest = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(!too_deep(nest(128).as_bytes()));
        assert!(too_deep(nest(129).as_bytes()));
        let quoted = format!("{{\"s\":\"{}\\\"\"}}", "[".repeat(300));
        assert!(!too_deep(quoted.as_bytes()), "{quoted}");
    }

    /// Rows that are not JSON become malformed-row records with their
    /// bytes (as text, or base64 when not UTF-8); rows over the cap are
    /// kept cut, with their length; the good rows around them are rows.
    #[test]
    fn unreadable_rows_become_malformed_row_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PartWriter::create(dir.path(), 3, 0).unwrap();
        w.max_row_bytes = 1024;
        let deep = format!("{{\"d\":{}{}}}", "[".repeat(200), "]".repeat(200));
        let huge = format!("{{\"body\":\"{}\"}}", "é".repeat(1000));
        w.row_at(br#"{"url":"a"}"#, 1).unwrap();
        w.row_at(b"{\"t\":\"\xff\xfe\"}", 20).unwrap();
        w.row_at(b"{\"t\":\"a\x01b\"}", 40).unwrap();
        w.row_at(deep.as_bytes(), 60).unwrap();
        w.row_at(huge.as_bytes(), 500).unwrap();
        w.oversize_row(b"{\"x\":\"", 9_000_000_000, 7000).unwrap();
        w.row_at(br#"{"url":"b"}"#, 9_000_007_000).unwrap();
        assert_eq!((w.rows, w.error_rows, w.malformed_rows), (2, 0, 5));
        w.commit().unwrap();
        let text = std::fs::read_to_string(page_path(dir.path(), 3, 0)).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 7);
        for l in &lines[1..6] {
            assert_eq!(l["error_code"], "malformed_row", "{l}");
            assert_eq!(l["chunk"], 3);
        }
        assert!(text
            .lines()
            .nth(1)
            .unwrap()
            .as_bytes()
            .starts_with(MALFORMED_PREFIX));
        assert_eq!(lines[1]["raw_base64"], base64(b"{\"t\":\"\xff\xfe\"}"));
        assert_eq!(lines[1]["byte_offset"], 20);
        assert_eq!(lines[2]["raw"], "{\"t\":\"a\u{1}b\"}");
        assert!(
            lines[3]["error"]
                .as_str()
                .unwrap()
                .contains("deeper than 128"),
            "{}",
            lines[3]
        );
        assert_eq!(lines[3]["raw"], deep);
        assert_eq!(lines[4]["length"], huge.len());
        // Cut at 1024 bytes, inside a two-byte character: still text.
        let head = lines[4]["raw"].as_str().unwrap();
        assert!(head.len() <= 1024 && head.len() >= 1023 && huge.starts_with(head));
        assert!(lines[4]["error"]
            .as_str()
            .unwrap()
            .contains("max_row_bytes"));
        assert_eq!(lines[5]["length"], 9_000_000_000u64);
        assert_eq!(lines[6]["url"], "b");
    }

    #[test]
    fn a_join_cut_short_among_the_removals_is_finished_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        for p in 0..3 {
            page(run, 7, p, format!("{{\"n\":{p}}}").as_bytes());
        }
        join_pages(run, 7, 3).unwrap();
        let joined = std::fs::read(part_path(run, 7)).unwrap();
        // A crash after the part was durable but among the removals:
        // page 0 is gone, pages 1 and 2 are back.
        for p in 1..3 {
            page(run, 7, p, b"{\"stale\":true}");
        }
        join_pages(run, 7, 3).unwrap();
        assert_eq!(std::fs::read(part_path(run, 7)).unwrap(), joined);
        let left: Vec<_> = std::fs::read_dir(parts_dir(run))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, ["chunk-000007.ndjson"]);
    }
}
