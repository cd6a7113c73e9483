//! What the store keeps in files beside sled: each chunk's inputs, each
//! run's copy for `--recover`, and `dedup_key` history.
//!
//! Chunk inputs live in `<state_dir>/inputs/<job>/<run_id>/chunk-NNNNNN.ndjson`,
//! each fsynced when written and the directory fsynced by
//! [`Store::seal_inputs`] before the run leaves `planning`. They are kept out
//! of sled because sled holds written values in memory (about 55 KB per
//! 44 KB chunk measured), which made memory grow with the number of inputs.
//! Beside them, `run.json` is a copy of the run's record as planned and as
//! set in progress: what `--recover` rebuilds a run from when sled lost it.
//!
//! `dedup_key` history lives in `<state_dir>/dedup/<job>/<run_id>.keys`: the
//! sorted 16-byte key hashes of each complete run, read as a stream.

use std::fs;
use std::io::Write;
use std::path::PathBuf;

use super::{guard, io_error, ChunkRecord, Store, StoreError};

impl Store {
    pub(super) fn run_inputs_dir(&self, job: &str, run_id: &str) -> PathBuf {
        self.inputs_dir.join(job).join(run_id)
    }

    pub(super) fn inputs_path(&self, job: &str, run_id: &str, index: u32) -> PathBuf {
        self.run_inputs_dir(job, run_id)
            .join(format!("chunk-{index:06}.ndjson"))
    }

    /// Stores a planned chunk: its inputs file (fsynced) first, then its
    /// record. The run must be sealed with [`seal_inputs`](Self::seal_inputs).
    pub fn put_planned_chunk(
        &self,
        job: &str,
        run_id: &str,
        chunk: &ChunkRecord,
        inputs_ndjson: &[u8],
    ) -> Result<(), StoreError> {
        let dir = self.run_inputs_dir(job, run_id);
        self.place.make_dir(&dir)?;
        let path = self.inputs_path(job, run_id, chunk.index);
        let tmp = path.with_extension("ndjson.tmp");
        let mut file = fs::File::create(&tmp).map_err(io_error(&tmp))?;
        crate::failpoint::io_error("plan-write").map_err(io_error(&tmp))?;
        file.write_all(inputs_ndjson).map_err(io_error(&tmp))?;
        file.sync_all().map_err(io_error(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_error(&path))?;
        self.put_chunk(job, run_id, chunk)
    }

    /// Makes every inputs file of a run durable (their directory entries).
    pub fn seal_inputs(&self, job: &str, run_id: &str) -> Result<(), StoreError> {
        let run_dir = self.run_inputs_dir(job, run_id);
        for dir in [
            run_dir.as_path(),
            run_dir.parent().unwrap_or(&run_dir),
            &self.inputs_dir,
        ] {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_error(dir))?;
        }
        Ok(())
    }

    pub fn chunk_inputs(
        &self,
        job: &str,
        run_id: &str,
        index: u32,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.inputs_path(job, run_id, index);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(&path)(e)),
        }
    }

    /// Marks which of `hashes` (sorted) earlier complete runs of `job` had,
    /// leaving out `run_id`'s own keys (a run finished again after a crash
    /// must see the same history). Memory: the run's hashes, not history's.
    pub fn dedup_seen(
        &self,
        job: &str,
        run_id: &str,
        hashes: &[u128],
    ) -> Result<Vec<bool>, StoreError> {
        let mut seen = vec![false; hashes.len()];
        let dir = self.dedup_dir.join(job);
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(seen);
        };
        for entry in entries {
            let path = entry.map_err(io_error(&dir))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("keys")
                || path.file_stem().and_then(|s| s.to_str()) == Some(run_id)
            {
                continue;
            }
            let mut reader =
                std::io::BufReader::new(fs::File::open(&path).map_err(io_error(&path))?);
            let mut buf = [0u8; 16];
            let mut i = 0;
            // Both sides sorted: one merge pass.
            while i < hashes.len() {
                match std::io::Read::read_exact(&mut reader, &mut buf) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(io_error(&path)(e)),
                }
                let h = u128::from_be_bytes(buf);
                while i < hashes.len() && hashes[i] < h {
                    i += 1;
                }
                if i < hashes.len() && hashes[i] == h {
                    seen[i] = true;
                }
            }
        }
        Ok(seen)
    }

    /// Remembers a complete run's key hashes (sorted), durably.
    pub fn dedup_record(&self, job: &str, run_id: &str, hashes: &[u128]) -> Result<(), StoreError> {
        let dir = self.dedup_dir.join(job);
        self.place.make_dir(&dir)?;
        let path = dir.join(format!("{run_id}.keys"));
        let bytes: Vec<u8> = hashes.iter().flat_map(|h| h.to_be_bytes()).collect();
        guard::write_durable(&path, &bytes)
    }
}
