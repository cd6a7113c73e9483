//! The run's final files from its part files: `data.csv|json|ndjson` and
//! `errors.ndjson`, streamed row by row in chunk order, in one pass that
//! parses each row once, flattening it as it goes ([`flatten_raw`]). The
//! CSV header, the union of all keys in first-seen order, comes first: from
//! the columns each part's download recorded ([`Columns`]), or, for a part
//! saved without them, a first walk over that part. `data.parquet`
//! needs its schema before its first row: a walk over all parts learns it
//! first ([`super::parquet`]).

use std::io::{self, Write};
use std::path::Path;

use indexmap::IndexSet;
use serde::Serialize;
use serde_json::Value;

use super::columns::{ColumnCache, Columns};
use super::dedup::NewRows;
use super::flatten::flatten_raw;
use super::parquet::{ParquetOut, Schema};
use super::part::for_each_row;
use super::{is_error_row, AtomicFile};
use crate::spec::OutputFormat;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct OutputFile {
    pub file: String,
    pub rows: u64,
    pub bytes: u64,
    pub sha256: String,
}

fn parse(raw: &[u8]) -> io::Result<Value> {
    serde_json::from_slice(raw).map_err(invalid)
}

/// The row parsed, unless it is an error row (which never goes into
/// `data.*`).
fn data_row(raw: &[u8]) -> io::Result<Option<Value>> {
    let row = parse(raw)?;
    let is_error = row.as_object().is_some_and(|o| {
        ["error", "error_code"]
            .iter()
            .any(|k| o.get(*k).is_some_and(|v| !v.is_null()))
    });
    Ok((!is_error).then_some(row))
}

fn invalid(e: serde_json::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// One chunk's part file, and the columns its download recorded (`None`
/// for a part saved before they were).
#[derive(Debug, Clone, Copy)]
pub struct Part<'a> {
    pub index: u32,
    pub columns: Option<&'a [String]>,
}

/// The final files, and how many of `errors.ndjson`'s rows are
/// malformed-row records (`docs/outputs.md`) rather than the provider's error rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outputs {
    pub files: Vec<OutputFile>,
    pub malformed_rows: u64,
}

/// Writes the final files into `run_dir`; returns them for the manifest.
/// With `new_rows`, also `new.ndjson` (and `new.csv` when CSV is wanted):
/// the data rows whose key earlier complete runs did not have.
pub fn write(
    run_dir: &Path,
    formats: &[OutputFormat],
    escape_formulas: bool,
    parts: &[Part<'_>],
    new_rows: Option<&NewRows<'_>>,
) -> io::Result<Outputs> {
    let want = |f| formats.contains(&f);
    let header = match want(OutputFormat::Csv) {
        true => csv_header(run_dir, parts)?,
        false => IndexSet::new(),
    };
    let parts: Vec<u32> = parts.iter().map(|p| p.index).collect();
    let parquet = match want(OutputFormat::Parquet) {
        true => Some(parquet_schema(run_dir, &parts)?),
        false => None,
    };
    let mut writers = Writers::create(
        run_dir,
        formats,
        parquet,
        &header,
        escape_formulas,
        new_rows,
    )?;
    let mut cells = Cells {
        record: vec![String::new(); header.len()],
        cache: ColumnCache::default(),
        header: &header,
        escape_formulas,
    };
    for_each_row(run_dir, &parts, |raw| writers.row(raw, &mut cells))?;
    writers.commit()
}

/// The CSV header: the union of every part's columns in first-seen order,
/// from the columns recorded at download or, for a part saved without
/// them, a walk over it.
fn csv_header(run_dir: &Path, parts: &[Part<'_>]) -> io::Result<IndexSet<String>> {
    let mut columns = Columns::default();
    for part in parts {
        match part.columns {
            Some(known) => columns.extend(known),
            None => for_each_row(run_dir, &[part.index], |raw| columns.add_row(raw).map(drop))?,
        }
    }
    Ok(columns.into_names())
}

/// `data.parquet`'s schema, learned from every data row before the first
/// is written.
fn parquet_schema(run_dir: &Path, parts: &[u32]) -> io::Result<Schema> {
    let mut schema = Schema::default();
    for_each_row(run_dir, parts, |raw| {
        if let Some(row) = data_row(raw)? {
            schema.learn(&row);
        }
        Ok(())
    })?;
    Ok(schema)
}

/// One row's CSV cells, made in the pass that also tells an error row.
struct Cells<'a> {
    record: Vec<String>,
    cache: ColumnCache,
    header: &'a IndexSet<String>,
    escape_formulas: bool,
}

/// Every final file being written, and the counts the manifest needs.
struct Writers<'a> {
    csv: Option<csv::Writer<AtomicFile>>,
    json: Option<AtomicFile>,
    ndjson: Option<AtomicFile>,
    parquet: Option<ParquetOut<AtomicFile>>,
    errors: AtomicFile,
    new_rows: Option<&'a NewRows<'a>>,
    new_csv: Option<csv::Writer<AtomicFile>>,
    new_ndjson: Option<AtomicFile>,
    rows: u64,
    error_rows: u64,
    malformed_rows: u64,
    new_count: u64,
}

impl<'a> Writers<'a> {
    fn create(
        run_dir: &Path,
        formats: &[OutputFormat],
        parquet: Option<Schema>,
        header: &IndexSet<String>,
        escape_formulas: bool,
        new_rows: Option<&'a NewRows<'a>>,
    ) -> io::Result<Writers<'a>> {
        let want = |f| formats.contains(&f);
        let create = |name: &str| AtomicFile::create(&run_dir.join(name));
        let header_row: Vec<_> = header
            .iter()
            .map(|name| super::flatten::header_cell(name, escape_formulas))
            .collect();
        let csv_file = |name: &str| -> io::Result<csv::Writer<AtomicFile>> {
            let mut w = csv::WriterBuilder::new().from_writer(create(name)?);
            if !header_row.is_empty() {
                w.write_record(header_row.iter().map(|c| c.as_bytes()))
                    .map_err(io::Error::other)?;
            }
            Ok(w)
        };
        let parquet = parquet
            .map(|schema| ParquetOut::create(create(OutputFormat::Parquet.file_name())?, schema))
            .transpose()?;
        let mut json = want(OutputFormat::Json)
            .then(|| create(OutputFormat::Json.file_name()))
            .transpose()?;
        if let Some(j) = json.as_mut() {
            j.write_all(b"[")?;
        }
        let ndjson = want(OutputFormat::Ndjson)
            .then(|| create(OutputFormat::Ndjson.file_name()))
            .transpose()?;
        let csv = want(OutputFormat::Csv)
            .then(|| csv_file(OutputFormat::Csv.file_name()))
            .transpose()?;
        let errors = create("errors.ndjson")?;
        let new_ndjson = new_rows.map(|_| create("new.ndjson")).transpose()?;
        let new_csv = (new_rows.is_some() && want(OutputFormat::Csv))
            .then(|| csv_file("new.csv"))
            .transpose()?;
        Ok(Writers {
            csv,
            json,
            ndjson,
            parquet,
            errors,
            new_rows,
            new_csv,
            new_ndjson,
            rows: 0,
            error_rows: 0,
            malformed_rows: 0,
            new_count: 0,
        })
    }

    /// One row of a part file, to every file it belongs in.
    fn row(&mut self, raw: &[u8], cells: &mut Cells<'_>) -> io::Result<()> {
        // With CSV, one parse gives the cells and says whether it is an
        // error row; without, a light probe says it.
        let is_error = if self.csv.is_some() {
            let Cells {
                record,
                cache,
                header,
                escape_formulas,
            } = cells;
            record.iter_mut().for_each(String::clear);
            cache.start_row();
            flatten_raw(raw, *escape_formulas, &mut |column, text| {
                if let Some(i) = cache.index(header, column) {
                    record[i].clear();
                    record[i].push_str(text);
                }
            })
            .map_err(invalid)?
        } else {
            is_error_row(raw)?
        };
        if is_error {
            self.error_rows += 1;
            // The daemon writes its records with this beginning; a
            // provider row that copies it counts as one (documented).
            if raw.starts_with(super::part::MALFORMED_PREFIX) {
                self.malformed_rows += 1;
            }
            self.errors.write_all(raw)?;
            return self.errors.write_all(b"\n");
        }
        if let Some(j) = self.json.as_mut() {
            j.write_all(if self.rows == 0 { b"\n" } else { b",\n" })?;
            j.write_all(raw)?;
        }
        if let Some(n) = self.ndjson.as_mut() {
            n.write_all(raw)?;
            n.write_all(b"\n")?;
        }
        let parsed = (self.new_rows.is_some() || self.parquet.is_some())
            .then(|| parse(raw))
            .transpose()?;
        if let Some(w) = self.csv.as_mut() {
            w.write_record(&cells.record).map_err(io::Error::other)?;
        }
        if let (Some(dedup), Some(row)) = (self.new_rows, parsed.as_ref()) {
            if dedup.is_new(row) {
                self.new_count += 1;
                if let Some(n) = self.new_ndjson.as_mut() {
                    n.write_all(raw)?;
                    n.write_all(b"\n")?;
                }
                if let Some(w) = self.new_csv.as_mut() {
                    // `cells` holds this row's cells from the CSV pass above.
                    w.write_record(&cells.record).map_err(io::Error::other)?;
                }
            }
        }
        if let (Some(p), Some(row)) = (self.parquet.as_mut(), parsed) {
            p.row(row, raw.len())?;
        }
        self.rows += 1;
        Ok(())
    }

    /// Makes every file durable, in the manifest's order.
    fn commit(self) -> io::Result<Outputs> {
        let mut out = Vec::new();
        let mut done = |name: &str, rows: u64, file: AtomicFile| -> io::Result<()> {
            let written = file.commit()?;
            out.push(OutputFile {
                file: name.to_string(),
                rows,
                bytes: written.bytes,
                sha256: written.sha256,
            });
            Ok(())
        };
        let into_file = |w: csv::Writer<AtomicFile>| {
            w.into_inner().map_err(|e| io::Error::other(e.to_string()))
        };
        let rows = self.rows;
        if let Some(w) = self.csv {
            done(OutputFormat::Csv.file_name(), rows, into_file(w)?)?;
        }
        if let Some(mut j) = self.json {
            j.write_all(if rows == 0 { b"]\n" } else { b"\n]\n" })?;
            done(OutputFormat::Json.file_name(), rows, j)?;
        }
        if let Some(n) = self.ndjson {
            done(OutputFormat::Ndjson.file_name(), rows, n)?;
        }
        if let Some(p) = self.parquet {
            let written = p.rows;
            done(OutputFormat::Parquet.file_name(), written, p.finish()?)?;
        }
        done("errors.ndjson", self.error_rows, self.errors)?;
        if let Some(w) = self.new_csv {
            done("new.csv", self.new_count, into_file(w)?)?;
        }
        if let Some(n) = self.new_ndjson {
            done("new.ndjson", self.new_count, n)?;
        }
        Ok(Outputs {
            files: out,
            malformed_rows: self.malformed_rows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::RowSink;
    use crate::sink::part::PartWriter;

    #[test]
    fn parts_become_final_files() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        // Chunk 0 came in two pages, chunk 1 in one; each download records
        // its pages' columns as the worker does.
        let mut recorded = [
            crate::chunk::Progress::default(),
            crate::chunk::Progress::default(),
        ];
        let mut save = |mut page: PartWriter, chunk: usize| {
            let d = &mut recorded[chunk];
            let more = Some(serde_json::Value::Null);
            d.add_page(more, 0, 0, std::mem::take(&mut page.columns).into_names());
            page.commit().unwrap();
        };
        let mut p0 = PartWriter::create(run, 0, 0).unwrap();
        p0.row(br#"{"url":"a","about":{"n":1}}"#).unwrap();
        assert_eq!((p0.rows, p0.error_rows), (1, 0));
        save(p0, 0);
        let mut p0 = PartWriter::create(run, 0, 1).unwrap();
        p0.row(br#"{"input":{"url":"b"},"error":"dead","error_code":"dead_page"}"#)
            .unwrap();
        p0.row(br#"{"url":"a2","extra":true}"#).unwrap();
        p0.row_at(b"{\"url\":\"\xff\"}", 9).unwrap();
        assert_eq!((p0.rows, p0.error_rows, p0.malformed_rows), (1, 1, 1));
        save(p0, 0);
        let mut p1 = PartWriter::create(run, 1, 0).unwrap();
        p1.row(br#"{"url":"c","title":"=1+1","about":{"n":2}}"#)
            .unwrap();
        save(p1, 1);
        for (chunk, pages) in [(0, 2), (1, 1)] {
            crate::sink::part::join_pages(run, chunk, pages).unwrap();
            // Joining again after a crash finds the work done.
            crate::sink::part::join_pages(run, chunk, pages).unwrap();
            assert!(!crate::sink::part::page_path(run, chunk, 0).exists());
        }

        let all = [
            OutputFormat::Csv,
            OutputFormat::Json,
            OutputFormat::Ndjson,
            OutputFormat::Parquet,
        ];
        let parts = |known: bool| -> Vec<Part<'_>> {
            (0..2)
                .map(|i| Part {
                    index: i,
                    columns: recorded[i as usize].columns.as_deref().filter(|_| known),
                })
                .collect()
        };
        // Parts saved before columns were recorded are walked for them:
        // the same files either way.
        let walked = write(run, &all, true, &parts(false), None).unwrap();
        let walked_csv = std::fs::read_to_string(run.join("data.csv")).unwrap();
        let written = write(run, &all, true, &parts(true), None).unwrap();
        assert_eq!(written, walked);
        assert_eq!(written.malformed_rows, 1);
        let files = written.files;
        let names: Vec<_> = files.iter().map(|f| (f.file.as_str(), f.rows)).collect();
        assert_eq!(
            names,
            [
                ("data.csv", 3),
                ("data.json", 3),
                ("data.ndjson", 3),
                ("data.parquet", 3),
                ("errors.ndjson", 2)
            ]
        );
        // Parquet holds the data rows in order, never error or malformed
        // rows; the integer column `about.n` stays a struct's integer.
        let parquet = std::fs::read(run.join("data.parquet")).unwrap();
        let back = crate::sink::parquet::read_rows(parquet.into()).unwrap();
        let urls: Vec<&str> = back.iter().map(|r| r["url"].as_str().unwrap()).collect();
        assert_eq!(urls, ["a", "a2", "c"]);
        assert_eq!(back[2]["about"]["n"], 2);
        assert_eq!(
            back[2]["title"], "=1+1",
            "Parquet, like JSON, is never altered"
        );
        let csv = std::fs::read_to_string(run.join("data.csv")).unwrap();
        assert_eq!(csv, walked_csv);
        assert_eq!(
            csv,
            "url,about.n,extra,title\na,1,,\na2,,true,\nc,2,,'=1+1\n"
        );
        let json: Vec<Value> =
            serde_json::from_slice(&std::fs::read(run.join("data.json")).unwrap()).unwrap();
        assert_eq!(json[2]["title"], "=1+1", "JSON is never altered");
        let errors = std::fs::read_to_string(run.join("errors.ndjson")).unwrap();
        assert!(errors.contains("dead_page") && errors.lines().count() == 2);
        assert!(errors.contains("\"raw_base64\""), "{errors}");

        // Column names are scraped text too: header cells that a
        // spreadsheet would run are escaped like values; JSON keeps them.
        let keys = tempfile::tempdir().unwrap();
        let mut p = PartWriter::create(keys.path(), 0, 0).unwrap();
        p.row(br#"{"=HYPERLINK(\"http://evil.example\",\"click\")":1,"@SUM(A1)":2,"nested":{"=cmd|' /C calc'!A0":3},"-x":"-y"}"#)
            .unwrap();
        p.commit().unwrap();
        crate::sink::part::join_pages(keys.path(), 0, 1).unwrap();
        let one = [Part {
            index: 0,
            columns: None,
        }];
        write(keys.path(), &all, true, &one, None).unwrap();
        let csv = std::fs::read_to_string(keys.path().join("data.csv")).unwrap();
        assert_eq!(
            csv.lines().next().unwrap(),
            r#""'=HYPERLINK(""http://evil.example"",""click"")",'@SUM(A1),nested.=cmd|' /C calc'!A0,'-x"#
        );
        assert_eq!(csv.lines().nth(1).unwrap(), "1,2,3,'-y");
        let json = std::fs::read_to_string(keys.path().join("data.json")).unwrap();
        assert!(json.contains(r#""=HYPERLINK("#) && json.contains(r#""@SUM(A1)""#));
        write(keys.path(), &all, false, &one, None).unwrap();
        let raw = std::fs::read_to_string(keys.path().join("data.csv")).unwrap();
        assert!(
            raw.starts_with(r#""=HYPERLINK("#),
            "escape_formulas = false: {raw}"
        );

        // A number out of range inside an array passes a skimming parser
        // but not a full one: it is a malformed row from the start, so
        // every final file can be written (and the chunk never wedges).
        let odd = tempfile::tempdir().unwrap();
        let mut p = PartWriter::create(odd.path(), 0, 0).unwrap();
        p.row_at(br#"{"a":[1e400],"b":{"c":[{"d":-1e999}]}}"#, 0)
            .unwrap();
        p.row_at(br#"{"a":[1.5]}"#, 40).unwrap();
        assert_eq!((p.rows, p.malformed_rows), (1, 1));
        p.commit().unwrap();
        crate::sink::part::join_pages(odd.path(), 0, 1).unwrap();
        let one = [Part {
            index: 0,
            columns: None,
        }];
        let written = write(odd.path(), &all, true, &one, None).unwrap();
        assert_eq!(written.malformed_rows, 1);
        assert!(written.files.iter().all(|f| f.rows == 1), "{written:?}");

        // Zero rows: valid empty files.
        let empty = tempfile::tempdir().unwrap();
        write(empty.path(), &all, true, &[], None).unwrap();
        assert_eq!(
            std::fs::read_to_string(empty.path().join("data.json")).unwrap(),
            "[]\n"
        );
        assert_eq!(
            std::fs::read_to_string(empty.path().join("data.csv")).unwrap(),
            ""
        );
    }
}
