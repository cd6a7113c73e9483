//! Small files made durable in one step: written to a temporary file
//! beside the target, fsynced, renamed over it, and the directory fsynced,
//! so that after a crash the target holds either its old or its new
//! content, never a torn one, and the new name survives a power loss.
//!
//! Large files (final outputs, parts) have their own writer,
//! `sink::AtomicFile`, which streams in blocks; this is for records of a
//! few bytes to a few megabytes written whole: the generation counter, a
//! run's copy, the admin token, a run's dedup keys.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Replaces `path` with `bytes` durably; a new file gets `mode`.
pub fn write(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::File::open(dir).and_then(|d| d.sync_all())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_whole_with_the_mode_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        super::write(&path, b"one", 0o600).unwrap();
        super::write(&path, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "only the file itself remains");
    }

    #[test]
    fn a_failed_write_leaves_the_old_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        super::write(&path, b"old", 0o644).unwrap();
        // A directory where the temporary file would go: the write fails
        // before the rename.
        std::fs::create_dir(dir.path().join(".file.tmp")).unwrap();
        assert!(super::write(&path, b"new", 0o644).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
    }
}
