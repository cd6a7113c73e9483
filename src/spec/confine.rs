//! Opening job and inputs files without reading outside the jobs directory.
//!
//! A drop directory is often writable by people who must not read the
//! daemon's secrets, and whatever the daemon reads from an inputs file can
//! come back to them in a problem text (`line 1: field 'url': '69d0…' is not
//! an http(s) URL`). So a path a job file names is opened only if it
//! resolves, symlinks followed, to a regular file inside the directory the
//! job file is in. The check and the open are one step (`openat2` with
//! `RESOLVE_BENEATH`), so a link swapped in between cannot slip through;
//! where the kernel lacks `openat2` the file is opened first and the opened
//! file is then compared with the resolved path.
//!
//! Errors name the path as the job file wrote it, never anything read from
//! the target.

use std::fs::File;
use std::io;
use std::path::{Component, Path, PathBuf};

/// Why a path named by a job file is not opened.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("'{0}' is an absolute path; inputs files must be inside the jobs directory")]
    Absolute(String),
    #[error("'{0}' goes up with '..'; inputs files must be inside the jobs directory")]
    Parent(String),
    #[error("{0}: leads outside the jobs directory (through a symbolic link?); inputs files must be inside it")]
    Outside(String),
    #[error("{0}: not a regular file")]
    NotRegular(String),
    #[error("{name}: {error}")]
    Io { name: String, error: String },
}

/// Refuses a relative path that could only be meant to leave `dir`: an
/// absolute one or one with `..`. Cheap and without IO, so `validate` and
/// the parser report it with the field's line.
pub fn check_name(name: &str) -> Result<(), ConfineError> {
    let path = Path::new(name);
    if path.is_absolute() || path.has_root() {
        return Err(ConfineError::Absolute(name.to_string()));
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(ConfineError::Parent(name.to_string()));
    }
    Ok(())
}

/// Opens `name` (relative) under `dir` for reading, following symbolic
/// links only while they stay beneath `dir`, and only if it is a regular
/// file. A FIFO or device is refused without blocking on it.
pub fn open_beneath(dir: &Path, name: &Path) -> Result<File, ConfineError> {
    check_name(&name.display().to_string())?;
    // Messages name the file as the directory joined with the name, as
    // every other problem with a file does; never anything read from it.
    let shown = dir.join(name).display().to_string();
    let file = open_impl(dir, name, &shown)?;
    let meta = file.metadata().map_err(|e| io_error(&shown, e))?;
    if !meta.is_file() {
        return Err(ConfineError::NotRegular(shown));
    }
    Ok(file)
}

fn io_error(name: &str, e: io::Error) -> ConfineError {
    ConfineError::Io {
        name: name.to_string(),
        error: e.to_string(),
    }
}

#[cfg(target_os = "linux")]
fn open_impl(dir: &Path, name: &Path, shown: &str) -> Result<File, ConfineError> {
    use rustix::fs::{openat2, Mode, OFlags, ResolveFlags, CWD};
    let dir_fd = rustix::fs::openat(
        CWD,
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_error(shown, e.into()))?;
    // NONBLOCK: opening a FIFO for reading must not wait for a writer.
    let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY;
    match openat2(
        &dir_fd,
        name,
        flags,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    ) {
        Ok(fd) => Ok(File::from(fd)),
        // EXDEV: the path (through a link, or `..` inside a link) leaves dir.
        Err(rustix::io::Errno::XDEV) => Err(ConfineError::Outside(shown.to_string())),
        // ENOSYS: a kernel before 5.6; EPERM/EACCES from a seccomp filter
        // that does not know the call. Fall back to resolve-then-compare.
        Err(rustix::io::Errno::NOSYS | rustix::io::Errno::PERM) => open_checked(dir, name, shown),
        Err(e) => Err(io_error(shown, e.into())),
    }
}

#[cfg(not(target_os = "linux"))]
fn open_impl(dir: &Path, name: &Path, shown: &str) -> Result<File, ConfineError> {
    open_checked(dir, name, shown)
}

/// Resolves the path, checks it is beneath `dir`, opens it, and checks that
/// what was opened is what was resolved (a link swapped in between fails).
fn open_checked(dir: &Path, name: &Path, shown: &str) -> Result<File, ConfineError> {
    let root = dir.canonicalize().map_err(|e| io_error(shown, e))?;
    let resolved: PathBuf = dir
        .join(name)
        .canonicalize()
        .map_err(|e| io_error(shown, e))?;
    if !resolved.starts_with(&root) {
        return Err(ConfineError::Outside(shown.to_string()));
    }
    let expected = std::fs::metadata(&resolved).map_err(|e| io_error(shown, e))?;
    if !expected.is_file() {
        return Err(ConfineError::NotRegular(shown.to_string()));
    }
    let file = File::open(&resolved).map_err(|e| io_error(shown, e))?;
    let opened = file.metadata().map_err(|e| io_error(shown, e))?;
    if !same_file(&expected, &opened) {
        return Err(ConfineError::Outside(shown.to_string()));
    }
    Ok(file)
}

#[cfg(unix)]
fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(not(unix))]
fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    a.len() == b.len() && a.modified().ok() == b.modified().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Read;

    #[test]
    fn names_that_leave_the_directory_are_refused_without_io() {
        for bad in ["/etc/shadow", "../x.txt", "a/../../x.txt", "a/.."] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        for ok in ["x.txt", "inputs/x.txt", "./x.txt", "a..b.txt"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn links_are_followed_only_inside() {
        let root = tempfile::tempdir().unwrap();
        let jobs = root.path().join("jobs");
        std::fs::create_dir_all(jobs.join("inputs")).unwrap();
        std::fs::write(root.path().join("secret"), "s3cret").unwrap();
        std::fs::write(jobs.join("inputs/urls.txt"), "https://a\n").unwrap();
        std::os::unix::fs::symlink(root.path().join("secret"), jobs.join("out.txt")).unwrap();
        std::os::unix::fs::symlink("inputs/urls.txt", jobs.join("in.txt")).unwrap();
        std::os::unix::fs::symlink(root.path(), jobs.join("up")).unwrap();

        let mut text = String::new();
        open_beneath(&jobs, Path::new("in.txt"))
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "https://a\n");
        for bad in ["out.txt", "up/secret"] {
            let err = open_beneath(&jobs, Path::new(bad)).unwrap_err();
            assert!(matches!(err, ConfineError::Outside(_)), "{bad}: {err}");
            assert!(!err.to_string().contains("s3cret"));
        }
        // The fallback path (kernels without openat2) agrees.
        assert!(open_checked(&jobs, Path::new("in.txt"), "in.txt").is_ok());
        assert!(matches!(
            open_checked(&jobs, Path::new("up/secret"), "up/secret"),
            Err(ConfineError::Outside(_))
        ));
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe.txt");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if !made.is_ok_and(|s| s.success()) {
            // No mkfifo(1): a directory stands in for "not a regular file".
            std::fs::create_dir(&fifo).unwrap();
        }
        let err = open_beneath(dir.path(), Path::new("pipe.txt")).unwrap_err();
        assert!(matches!(err, ConfineError::NotRegular(_)), "{err}");
    }
}
