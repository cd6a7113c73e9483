//! Part files: the raw rows of one chunk, one compact JSON value per line,
//! written as they stream in and made durable before the chunk is marked
//! downloaded (SPEC §11).

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::columns::Columns;
use super::{AtomicFile, Written};
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

/// Receives one chunk's rows; counts data and error rows as they pass and
/// collects the data rows' CSV columns (one walk of each row decides both,
/// and checks that it is JSON).
pub struct PartWriter {
    file: AtomicFile,
    pub rows: u64,
    pub error_rows: u64,
    pub columns: Columns,
}

impl PartWriter {
    /// A writer for page `page` of chunk `index`.
    pub fn create(run_dir: &Path, index: u32, page: u32) -> io::Result<PartWriter> {
        super::create_dir_durable(&parts_dir(run_dir))?;
        Ok(PartWriter {
            file: AtomicFile::create_part(&page_path(run_dir, index, page))?,
            rows: 0,
            error_rows: 0,
            columns: Columns::default(),
        })
    }

    /// Makes the part durable under its final name.
    pub fn commit(self) -> io::Result<Written> {
        self.file.commit()
    }
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
