//! Part files: the raw rows of one chunk, one compact JSON value per line,
//! written as they stream in and made durable before the chunk is marked
//! downloaded (SPEC §11).

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::{is_error_row, AtomicFile, Written};
use crate::provider::RowSink;

pub fn parts_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("parts")
}

pub fn part_path(run_dir: &Path, index: u32) -> PathBuf {
    parts_dir(run_dir).join(format!("chunk-{index:06}.ndjson"))
}

/// Receives one chunk's rows; counts data and error rows as they pass.
pub struct PartWriter {
    file: AtomicFile,
    pub rows: u64,
    pub error_rows: u64,
}

impl PartWriter {
    pub fn create(run_dir: &Path, index: u32) -> io::Result<PartWriter> {
        super::create_dir_durable(&parts_dir(run_dir))?;
        Ok(PartWriter {
            file: AtomicFile::create(&part_path(run_dir, index))?,
            rows: 0,
            error_rows: 0,
        })
    }

    /// Makes the part durable under its final name.
    pub fn commit(self) -> io::Result<Written> {
        self.file.commit()
    }
}

impl RowSink for PartWriter {
    fn row(&mut self, raw: &[u8]) -> io::Result<()> {
        if is_error_row(raw)? {
            self.error_rows += 1;
        } else {
            self.rows += 1;
        }
        self.file.write_all(raw)?;
        self.file.write_all(b"\n")
    }
}
