//! Files on disk (`docs/outputs.md`). Every file is written under a temporary name in
//! its directory, fsynced, renamed, and the directory fsynced: a reader never
//! sees half a file, and a crash leaves either the old file or the new one.
//! All of this is blocking IO; async callers use `spawn_blocking`.
//!
//! Big files stay out of the page cache. An [`AtomicFile`] writes in 1 MiB
//! blocks, and from its first whole block on with `O_DIRECT` where the
//! filesystem takes it (else with [`DropBehind`]); part files are read
//! back with drop-behind. A 1 GB dataset thus goes through a few megabytes
//! of cache instead of filling it with 3 GB that the final `fsync`s would
//! write out in one go.

pub mod columns;
pub mod dedup;
mod file;
pub mod flatten;
pub mod manifest;
pub mod outputs;
pub mod parquet;
pub mod part;

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::AtomicU64;

pub(crate) use file::DropBehind;
pub use file::{free_space, is_out_of_space, AtomicFile, Written};

pub(crate) static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Marks temporary files so a restart can sweep what a crash left.
pub(crate) const TEMP_MARK: &str = ".tmp-";

/// Writes a whole small file atomically.
pub fn write_file(dest: &Path, contents: &[u8]) -> io::Result<Written> {
    let mut f = AtomicFile::create(dest)?;
    f.write_all(contents)?;
    f.commit()
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates a directory and its parents, making each new entry durable.
pub fn create_dir_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    sync_dir(
        dir.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    )
}

/// Removes temporary files a crash left in `dir`.
pub fn sweep_temp(dir: &Path) -> io::Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().contains(TEMP_MARK) {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Points `link` at `target` atomically (a new link renamed over the old).
pub fn replace_symlink(target: &Path, link: &Path) -> io::Result<()> {
    let dir = link.parent().unwrap_or(Path::new("."));
    let name = link.file_name().and_then(|n| n.to_str()).unwrap_or("link");
    let tmp = dir.join(format!(".{name}{TEMP_MARK}{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    fs::rename(&tmp, link)?;
    sync_dir(dir)
}

/// Whether a downloaded row is a provider error row (`error`/`error_code`),
/// which goes to `errors.ndjson`, never to `data.*`.
pub fn is_error_row(raw: &[u8]) -> io::Result<bool> {
    #[derive(serde::Deserialize)]
    struct Probe {
        error: Option<serde::de::IgnoredAny>,
        error_code: Option<serde::de::IgnoredAny>,
    }
    if raw.first() != Some(&b'{') {
        // Scalars and arrays are rows too, odd as they are.
        serde_json::from_slice::<serde::de::IgnoredAny>(raw).map_err(invalid)?;
        return Ok(false);
    }
    let probe: Probe = serde_json::from_slice(raw).map_err(invalid)?;
    Ok(probe.error.is_some() || probe.error_code.is_some())
}

pub(crate) fn invalid(e: serde_json::Error) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("row is not valid JSON: {e}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn atomic_file_appears_only_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("data.csv");
        let mut f = AtomicFile::create(&dest).unwrap();
        f.write_all(b"a,b\n").unwrap();
        assert!(!dest.exists());
        let w = f.commit().unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"a,b\n");
        assert_eq!(w.bytes, 4);
        assert_eq!(w.sha256, hex::encode(Sha256::digest(b"a,b\n")));
        // An abandoned file leaves nothing behind.
        let mut g = AtomicFile::create(&dir.path().join("other")).unwrap();
        g.write_all(b"x").unwrap();
        drop(g);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("data.csv")]);
    }

    #[test]
    fn error_rows_are_recognised() {
        assert!(
            is_error_row(br#"{"input":{"url":"x"},"error":"dead","error_code":"dead_page"}"#)
                .unwrap()
        );
        assert!(is_error_row(br#"{"error_code":"blocked"}"#).unwrap());
        assert!(!is_error_row(br#"{"url":"x","errors_seen":0,"nested":{"error":"x"}}"#).unwrap());
        assert!(!is_error_row(br#"{"error":null,"url":"x"}"#).unwrap());
        assert!(is_error_row(b"{\"a\":").is_err());
    }
}
