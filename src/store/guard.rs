//! Guards around the store: a generation counter kept both inside sled and
//! in a small file beside it, so that a store older than the state the
//! daemon last flushed (a truncated or restored data file) is refused; and
//! the identity of the state directory and its lock file, so that a
//! directory removed or replaced under a running daemon stops it.
//!
//! ## The generation counter
//!
//! sled keeps `meta/generation`; `<state_dir>/generation` holds a number
//! that is never greater than the generation sled has made durable:
//! the file is written (temp, fsync, rename, directory fsync) only after a
//! sled flush that contained that generation has returned. At open, sled's
//! generation below the file's means sled lost flushed state.
//!
//! Writing the file costs three fsyncs (about ten times a sled flush
//! measured here), so not every flush writes it. A write that a payment
//! depends on marks the store *dirty*: a chunk record entering
//! `triggering`, the intent, flushed before the trigger is sent. The next
//! flush bumps the generation and writes the file, so no trigger is sent
//! before the file covers its intent. The remote id that follows is not
//! marked: the next trigger's intent covers it, and the clean shutdown
//! writes the file once more. So after `SIGTERM` any loss at all is
//! detected, and after a crash any loss up to the last intent; an
//! undetected loss of a later remote id leaves its chunk `triggering`, in
//! doubt and settled at the provider, exactly as a crash between the
//! trigger and its answer does. Status polls that change nothing write
//! nothing; polls and downloads that do flush only sled (their loss costs
//! a poll or a download again, never a payment).
//!
//! Concurrent flushes share file writes: whoever writes the file writes
//! the highest generation already flushed in sled, and a flush that then
//! finds the file at or past the generation it needs writes nothing.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::StoreError;

/// The generation file's name in the state directory.
pub const GENERATION_FILE: &str = "generation";
/// The lock file the daemon holds (see `daemon::lock_state_dir`).
pub const LOCK_FILE: &str = "harvestd.lock";

/// What the generation file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileGeneration {
    /// No file: a first start, or a store made before the counter existed.
    Missing,
    Value(u64),
}

/// Reads the generation file; a file that does not hold one number is
/// damage, not absence.
pub fn read_generation(dir: &Path) -> Result<FileGeneration, StoreError> {
    let path = dir.join(GENERATION_FILE);
    match fs::read(&path) {
        Ok(bytes) => std::str::from_utf8(&bytes)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(FileGeneration::Value)
            .ok_or_else(|| StoreError::Damaged {
                path: path.display().to_string(),
                detail: format!(
                    "the generation file does not hold a number ({} bytes)",
                    bytes.len()
                ),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileGeneration::Missing),
        Err(e) => Err(StoreError::Io {
            path: path.display().to_string(),
            source: e,
        }),
    }
}

/// Writes the generation file atomically and durably.
pub fn write_generation(dir: &Path, generation: u64) -> Result<(), StoreError> {
    write_durable(
        &dir.join(GENERATION_FILE),
        format!("{generation}\n").as_bytes(),
    )
}

/// Writes a small file atomically and durably ([`crate::durable::write`]).
pub fn write_durable(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    crate::durable::write(path, bytes, 0o644).map_err(|source| StoreError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// The generation counter's live state, shared by every clone of a store.
pub struct Generation {
    dir: PathBuf,
    /// The latest generation inserted into sled (durable once a flush that
    /// started after the insert returns). The mutex orders the inserts.
    inserted: Mutex<u64>,
    /// The highest generation a returned sled flush contained.
    flushed: std::sync::atomic::AtomicU64,
    /// What the file holds; the mutex also lets one writer at a time in.
    file: Mutex<u64>,
    /// A write that a paid call depends on is not yet covered by the file.
    dirty: AtomicBool,
}

impl Generation {
    pub fn new(dir: &Path, inserted: u64, file: u64) -> Generation {
        Generation {
            dir: dir.to_path_buf(),
            inserted: Mutex::new(inserted),
            flushed: std::sync::atomic::AtomicU64::new(inserted),
            file: Mutex::new(file),
            dirty: AtomicBool::new(false),
        }
    }

    pub fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::SeqCst);
    }

    /// Before a sled flush: when dirty, inserts the next generation into
    /// sled (with `insert`). Returns the generation this flush must leave
    /// in the file once sled's flush has returned.
    pub fn before_flush(
        &self,
        insert: impl FnOnce(u64) -> Result<(), StoreError>,
    ) -> Result<u64, StoreError> {
        let mut inserted = self.inserted.lock().unwrap_or_else(|e| e.into_inner());
        if self.dirty.swap(false, Ordering::SeqCst) {
            let next = inserted.saturating_add(1);
            if let Err(e) = insert(next) {
                self.dirty.store(true, Ordering::SeqCst);
                return Err(e);
            }
            *inserted = next;
        }
        Ok(*inserted)
    }

    /// After a sled flush that contained `target`: makes the file hold at
    /// least `target` (the highest generation flushed so far, so that the
    /// flushes waiting behind this write find nothing left to do).
    pub fn after_flush(&self, target: u64) -> Result<(), StoreError> {
        self.flushed.fetch_max(target, Ordering::SeqCst);
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if *file >= target {
            return Ok(());
        }
        let flushed = self.flushed.load(Ordering::SeqCst).max(target);
        write_generation(&self.dir, flushed)?;
        *file = flushed;
        Ok(())
    }
}

/// A file's identity: device and inode.
type Identity = (u64, u64);

fn identity(path: &Path) -> std::io::Result<Identity> {
    let m = fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// The state directory and its lock file as they were when the store was
/// opened: removed, moved or replaced, they no longer match.
///
/// Both are held open: a file system reuses a freed inode number (ext4 and
/// tmpfs do, at once), so a directory removed and made again could get
/// the old number back; an open file's inode is not freed, so the new one
/// always differs.
pub struct Place {
    dir: PathBuf,
    dir_id: Identity,
    /// The lock file's identity, when the store was opened under a lock.
    lock: Option<Identity>,
    _pinned: Vec<fs::File>,
}

impl Place {
    pub fn of(dir: &Path) -> Result<Place, StoreError> {
        let dir_id = identity(dir).map_err(|source| StoreError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let mut pinned: Vec<fs::File> = fs::File::open(dir).into_iter().collect();
        let lock_path = dir.join(LOCK_FILE);
        let lock = match fs::File::open(&lock_path) {
            Ok(file) => {
                let id = identity(&lock_path).ok();
                pinned.push(file);
                id
            }
            Err(_) => None,
        };
        Ok(Place {
            dir: dir.to_path_buf(),
            dir_id,
            lock,
            _pinned: pinned,
        })
    }

    /// Two `stat` calls: cheap enough before every flush.
    pub fn check(&self) -> Result<(), StoreError> {
        let replaced = |detail: String| StoreError::Replaced {
            path: self.dir.display().to_string(),
            detail,
        };
        match identity(&self.dir) {
            Ok(id) if id == self.dir_id => {}
            Ok(_) => return Err(replaced("it is another directory now".into())),
            Err(e) => return Err(replaced(format!("it is gone ({e})"))),
        }
        if let Some(lock) = self.lock {
            match identity(&self.dir.join(LOCK_FILE)) {
                Ok(id) if id == lock => {}
                Ok(_) => return Err(replaced(format!("its {LOCK_FILE} was replaced"))),
                Err(e) => return Err(replaced(format!("its {LOCK_FILE} is gone ({e})"))),
            }
        }
        Ok(())
    }

    /// Makes `dir` and the directories above it up to the state
    /// directory, never the state directory itself: `create_dir_all`
    /// would make a removed state directory again, and a daemon writing
    /// into a new, unlocked directory is the second daemon that triggers
    /// again. Fails as [`check`](Self::check) does when the directory is no
    /// longer the one this store opened.
    pub fn make_dir(&self, dir: &Path) -> Result<(), StoreError> {
        self.check()?;
        let Ok(below) = dir.strip_prefix(&self.dir) else {
            return Err(StoreError::Io {
                path: dir.display().to_string(),
                source: std::io::Error::other("not inside the state directory"),
            });
        };
        let mut at = self.dir.clone();
        for part in below.components() {
            at.push(part);
            match fs::create_dir(&at) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    // A parent vanished between the check and here.
                    self.check()?;
                    return Err(StoreError::Io {
                        path: at.display().to_string(),
                        source: e,
                    });
                }
                Err(source) => {
                    return Err(StoreError::Io {
                        path: at.display().to_string(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_follows_only_generations_made_durable_and_never_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let g = Generation::new(dir.path(), 0, 0);
        // Nothing dirty: no insert, no file.
        let target = g.before_flush(|_| panic!("no insert")).unwrap();
        assert_eq!(target, 0);
        g.after_flush(target).unwrap();
        assert_eq!(
            read_generation(dir.path()).unwrap(),
            FileGeneration::Missing
        );
        g.mark_dirty();
        let mut seen = None;
        let target = g
            .before_flush(|n| {
                seen = Some(n);
                Ok(())
            })
            .unwrap();
        assert_eq!((seen, target), (Some(1), 1));
        g.after_flush(target).unwrap();
        assert_eq!(
            read_generation(dir.path()).unwrap(),
            FileGeneration::Value(1)
        );
        // A slower flush that needed an older generation leaves the file.
        g.after_flush(0).unwrap();
        assert_eq!(
            read_generation(dir.path()).unwrap(),
            FileGeneration::Value(1)
        );
        // A failed insert keeps the store dirty for the next flush.
        g.mark_dirty();
        assert!(g
            .before_flush(|_| Err(StoreError::Damaged {
                path: "x".into(),
                detail: "y".into()
            }))
            .is_err());
        assert_eq!(g.before_flush(|_| Ok(())).unwrap(), 2);
    }

    #[test]
    fn a_generation_file_holding_garbage_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(GENERATION_FILE), b"\x00\xffgarbage").unwrap();
        let err = read_generation(dir.path()).unwrap_err();
        assert!(err.to_string().contains("--recover"), "{err}");
    }

    #[test]
    fn a_removed_or_replaced_state_dir_is_noticed() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("state");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join(LOCK_FILE), b"").unwrap();
        let place = Place::of(&dir).unwrap();
        place.check().unwrap();
        // The lock file replaced (a second daemon would create a new one).
        fs::remove_file(dir.join(LOCK_FILE)).unwrap();
        assert!(place.check().is_err());
        fs::write(dir.join(LOCK_FILE), b"").unwrap();
        let err = place.check().unwrap_err();
        assert!(err.to_string().contains("replaced"), "{err}");
        // The directory itself removed, then made again at the same path.
        let place = Place::of(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert!(place.check().is_err());
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join(LOCK_FILE), b"").unwrap();
        assert!(place.check().is_err());
    }
}
