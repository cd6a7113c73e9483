//! [`AtomicFile`]: how every file is written, and how big ones stay out of
//! the page cache.
//!
//! Bytes are gathered in [`BLOCK`]-sized buffers. A file that reaches a
//! whole block hands its blocks to a writer thread of its own, which hashes
//! them and writes them while the caller goes on making rows, and switches
//! the file to `O_DIRECT` where the filesystem takes it (ext4, XFS, Btrfs;
//! not tmpfs): blocks then go from the buffer to the disk with no copy into
//! the page cache, the costliest part of writing a big file (~0.5 s of CPU
//! per GB buffered on the benchmark VM, ~0.06 s direct). The tail, under a
//! block, is written at commit without `O_DIRECT`, which wants aligned
//! lengths. Small files never leave the caller's thread or the page cache's
//! usual path. Where `O_DIRECT` is refused, writes are ordinary, with
//! [`DropBehind`].
//!
//! Durability is the same either way: [`AtomicFile::commit`] `fsync`s the
//! file (data and metadata), renames it and `fsync`s the directory.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc;

use sha2::{Digest, Sha256};

use super::{sync_dir, TEMP_COUNTER, TEMP_MARK};

/// Bytes an [`AtomicFile`] gathers before writing them.
const BLOCK: usize = 1 << 20;

/// What `O_DIRECT` needs aligned: buffer address, file offset and length
/// (4 KiB covers 512-byte and 4K-sector disks).
const DIRECT_ALIGN: usize = 4096;

/// A file being written; it appears under its name only on [`commit`](Self::commit).
pub struct AtomicFile {
    tmp: PathBuf,
    dest: PathBuf,
    /// The block being filled.
    buf: AlignedBuf,
    out: Output,
    committed: bool,
    /// A part page (true) or a final file: fail points, and no checksum
    /// (only final files have theirs in the manifest).
    part: bool,
}

/// Where whole blocks go.
enum Output {
    /// Written in the caller's thread: a file under a block so far.
    Here(Blocks),
    /// A writer thread's: it returns the emptied buffers in `spare`, and
    /// the [`Blocks`] (or the first error) when `blocks` closes.
    Thread {
        blocks: mpsc::SyncSender<AlignedBuf>,
        spare: mpsc::Receiver<AlignedBuf>,
        writer: std::thread::JoinHandle<io::Result<Blocks>>,
    },
    /// Between the two, or after an error.
    Gone,
}

/// What was written: size and sha256 (hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub bytes: u64,
    pub sha256: String,
}

impl AtomicFile {
    pub fn create(dest: &Path) -> io::Result<AtomicFile> {
        let dir = dest.parent().unwrap_or(Path::new("."));
        let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("file");
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}{TEMP_MARK}{}-{n}", std::process::id()));
        let file = File::create(&tmp)?;
        Ok(AtomicFile {
            tmp,
            dest: dest.to_path_buf(),
            buf: AlignedBuf::new(),
            out: Output::Here(Blocks {
                file,
                hasher: Some(Sha256::new()),
                bytes: 0,
                direct: Direct::Untried,
                behind: DropBehind::default(),
            }),
            committed: false,
            part: false,
        })
    }

    /// A part page: the same file, with the part fail points and no checksum.
    pub fn create_part(dest: &Path) -> io::Result<AtomicFile> {
        let mut f = AtomicFile::create(dest)?;
        f.part = true;
        if let Output::Here(blocks) = &mut f.out {
            blocks.hasher = None;
        }
        Ok(f)
    }

    /// Ordinary writes only, as where `O_DIRECT` is refused.
    #[cfg(test)]
    fn without_direct(mut self) -> AtomicFile {
        if let Output::Here(blocks) = &mut self.out {
            blocks.direct = Direct::Off;
        }
        self
    }

    fn crash_point(&self, stage: &str) {
        if self.part {
            crate::failpoint::crash(stage);
        }
    }

    /// Hands the full buffer on, to the writer thread (started with the
    /// file's first block), and takes an empty one.
    fn block_full(&mut self) -> io::Result<()> {
        if let Output::Here(_) = self.out {
            if let Output::Here(blocks) = std::mem::replace(&mut self.out, Output::Gone) {
                self.out = blocks.into_thread();
            }
        }
        match &mut self.out {
            // No thread could be started: this one writes.
            Output::Here(blocks) => {
                blocks.write(self.buf.data(), false)?;
                self.buf.clear();
                Ok(())
            }
            Output::Thread { blocks, spare, .. } => {
                let full = std::mem::replace(&mut self.buf, AlignedBuf::new_empty());
                if blocks.send(full).is_err() {
                    // The writer stopped at an error: that error is the answer.
                    return Err(self
                        .finish_writer()
                        .err()
                        .unwrap_or_else(|| io::Error::other("the file's writer thread stopped")));
                }
                // At most three buffers live: this one, one queued, one
                // being written.
                self.buf = spare.try_recv().unwrap_or_else(|_| AlignedBuf::new());
                Ok(())
            }
            Output::Gone => Err(io::Error::other("the file's writer thread stopped")),
        }
    }

    /// Waits for the writer thread to write what it was given; returns
    /// the [`Blocks`] it wrote them with.
    fn finish_writer(&mut self) -> io::Result<Blocks> {
        match std::mem::replace(&mut self.out, Output::Gone) {
            Output::Here(blocks) => Ok(blocks),
            Output::Thread { blocks, writer, .. } => {
                drop(blocks);
                writer
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("the file's writer thread panicked")))
            }
            Output::Gone => Err(io::Error::other("the file's writer thread stopped")),
        }
    }

    /// Makes the file durable under its name.
    pub fn commit(mut self) -> io::Result<Written> {
        let mut blocks = self.finish_writer()?;
        blocks.write(self.buf.data(), true)?;
        self.crash_point("part-written");
        blocks.file.sync_all()?;
        self.crash_point("part-synced");
        fs::rename(&self.tmp, &self.dest)?;
        self.committed = true;
        self.crash_point("part-renamed");
        sync_dir(self.dest.parent().unwrap_or(Path::new(".")))?;
        Ok(Written {
            bytes: blocks.bytes,
            sha256: blocks
                .hasher
                .map(|h| hex::encode(h.finalize()))
                .unwrap_or_default(),
        })
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.part {
            crate::failpoint::io_error("output-write")?;
        }
        let mut rest = buf;
        while !rest.is_empty() {
            let n = self.buf.room().min(rest.len());
            self.buf.push(&rest[..n]);
            rest = &rest[n..];
            if self.buf.room() == 0 {
                self.block_full()?;
            }
        }
        Ok(buf.len())
    }

    /// Nothing: bytes reach the file in whole blocks and at
    /// [`commit`](AtomicFile::commit), and nobody reads a file before.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.committed {
            // The writer is done with the file before it goes.
            let _ = self.finish_writer();
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Writes blocks to the file: hashes them, tries `O_DIRECT` from the first
/// whole block on, and counts.
struct Blocks {
    file: File,
    /// `None` for part pages.
    hasher: Option<Sha256>,
    /// Bytes written to the file so far.
    bytes: u64,
    direct: Direct,
    behind: DropBehind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direct {
    /// Not tried yet: the file has not reached a whole block.
    Untried,
    On,
    /// The filesystem refused it, or the tail is being written.
    Off,
}

impl Blocks {
    /// A writer thread that takes blocks until the sender closes; or, when
    /// no thread can be started, these blocks back to be written here.
    fn into_thread(self) -> Output {
        let (blocks_tx, blocks_rx) = mpsc::sync_channel::<AlignedBuf>(1);
        let (spare_tx, spare_rx) = mpsc::channel();
        // The Blocks go to the thread once it runs, not with the closure:
        // a failed spawn would drop the closure, and the file with it.
        let (give, take) = mpsc::sync_channel(1);
        let started = std::thread::Builder::new()
            .name("harvestd-write".into())
            .spawn(move || {
                let Ok(mut blocks): Result<Blocks, _> = take.recv() else {
                    return Err(io::Error::other("no file to write"));
                };
                for mut buf in blocks_rx {
                    blocks.write(buf.data(), false)?;
                    buf.clear();
                    // The filler may be gone (an error of its own): then
                    // the buffer simply goes.
                    let _ = spare_tx.send(buf);
                }
                Ok(blocks)
            });
        let Ok(writer) = started else {
            return Output::Here(self);
        };
        match give.send(self) {
            Ok(()) => Output::Thread {
                blocks: blocks_tx,
                spare: spare_rx,
                writer,
            },
            // The thread ended before taking them: they come back.
            Err(mpsc::SendError(blocks)) => Output::Here(blocks),
        }
    }

    /// Hashes and writes `data`: a whole block, or (`last`) the tail.
    fn write(&mut self, data: &[u8], last: bool) -> io::Result<()> {
        if let Some(h) = self.hasher.as_mut() {
            h.update(data);
        }
        if !last && self.direct == Direct::Untried {
            self.direct = if set_direct(&self.file, true) {
                Direct::On
            } else {
                Direct::Off
            };
        }
        let mut rest = data;
        if last && self.direct == Direct::On {
            let whole = rest.len() / DIRECT_ALIGN * DIRECT_ALIGN;
            self.write_all(&rest[..whole])?;
            rest = &rest[whole..];
            if !rest.is_empty() {
                set_direct(&self.file, false);
                self.direct = Direct::Off;
            }
        }
        self.write_all(rest)?;
        self.bytes += data.len() as u64;
        if self.direct != Direct::On && self.behind.due(self.bytes) {
            self.behind.advance(&self.file, self.bytes);
        }
        Ok(())
    }

    /// Writes all of `data` at the file's offset. A direct write the
    /// kernel refuses after all (`EINVAL`: a filesystem that took the flag
    /// but not the I/O, or a short write that left the rest unaligned)
    /// turns `O_DIRECT` off and goes on with ordinary writes.
    fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            match (&self.file).write(data) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if self.direct == Direct::On && e.kind() == io::ErrorKind::InvalidInput => {
                    set_direct(&self.file, false);
                    self.direct = Direct::Off;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Turns `O_DIRECT` on or off; whether the filesystem took it.
#[cfg(target_os = "linux")]
fn set_direct(file: &File, on: bool) -> bool {
    use rustix::fs::OFlags;
    let Ok(flags) = rustix::fs::fcntl_getfl(file) else {
        return false;
    };
    let flags = if on {
        flags | OFlags::DIRECT
    } else {
        flags - OFlags::DIRECT
    };
    rustix::fs::fcntl_setfl(file, flags).is_ok()
}

#[cfg(not(target_os = "linux"))]
fn set_direct(_file: &File, _on: bool) -> bool {
    false
}

/// A [`BLOCK`]-sized buffer whose bytes start at a [`DIRECT_ALIGN`]-aligned
/// address. It never grows past its capacity, so the address stays put.
struct AlignedBuf {
    vec: Vec<u8>,
    /// Where the aligned bytes start in `vec`.
    start: usize,
}

impl AlignedBuf {
    fn new() -> AlignedBuf {
        // Uninitialised capacity costs nothing until written: a small
        // file's buffer touches only the pages it uses.
        let mut vec: Vec<u8> = Vec::with_capacity(BLOCK + DIRECT_ALIGN);
        let start = vec.as_ptr().align_offset(DIRECT_ALIGN);
        vec.resize(start, 0);
        AlignedBuf { vec, start }
    }

    /// A placeholder with no room, replaced before use.
    fn new_empty() -> AlignedBuf {
        AlignedBuf {
            vec: Vec::new(),
            start: 0,
        }
    }

    fn data(&self) -> &[u8] {
        &self.vec[self.start..]
    }

    fn room(&self) -> usize {
        (self.vec.capacity() - self.start).min(BLOCK) - (self.vec.len() - self.start)
    }

    /// Appends at most [`room`](Self::room) bytes.
    fn push(&mut self, bytes: &[u8]) {
        debug_assert!(bytes.len() <= self.room());
        self.vec.extend_from_slice(bytes);
    }

    fn clear(&mut self) {
        self.vec.truncate(self.start);
    }
}

/// How far a file gets, written or read, between two calls of
/// [`DropBehind::advance`].
const DROP_BEHIND_WINDOW: u64 = 4 << 20;

/// Keeps a big file from filling the page cache while it streams through
/// the cache: part files as they are read back, and files written where
/// `O_DIRECT` is refused.
///
/// Every [`DROP_BEHIND_WINDOW`] bytes, `posix_fadvise(DONTNEED)` over the
/// last few windows: for a window just written the kernel starts writing it
/// out (without waiting), and older windows, clean by then, are dropped;
/// pages a write-out still held are dropped by a later call. The same few
/// megabytes of pages are reused, which on the benchmark VM costs a third
/// of the CPU of growing the cache by gigabytes, and other services' files
/// stay cached.
///
/// It is advice: errors are ignored, and durability is still the `fsync`
/// of [`AtomicFile::commit`]. (Not `sync_file_range` with `WAIT_AFTER`: it
/// would consume a write error that the later `fsync` then no longer
/// reports.)
#[derive(Default)]
pub(crate) struct DropBehind {
    /// Bytes of the file covered by the last advice.
    advised: u64,
}

impl DropBehind {
    /// Whether the file, `at` bytes in, is a window past the last advice.
    pub(crate) fn due(&self, at: u64) -> bool {
        at - self.advised >= DROP_BEHIND_WINDOW
    }

    /// The first `at` bytes of `file` are written (or were read): drops
    /// them from the page cache, but for the last window or two.
    pub(crate) fn advance(&mut self, file: &File, at: u64) {
        let from = self.advised.saturating_sub(3 * DROP_BEHIND_WINDOW);
        drop_cached(file, from, at - from);
        self.advised = at;
    }
}

#[cfg(target_os = "linux")]
fn drop_cached(file: &File, offset: u64, len: u64) {
    if let Some(len) = std::num::NonZeroU64::new(len) {
        // Advice: a filesystem that does not take it loses nothing.
        let _ = rustix::fs::fadvise(file, offset, Some(len), rustix::fs::Advice::DontNeed);
    }
}

#[cfg(not(target_os = "linux"))]
fn drop_cached(_file: &File, _offset: u64, _len: u64) {}

/// Bytes an unprivileged writer can still use on the filesystem holding
/// `path` (or, for a path not made yet, its nearest existing parent).
#[cfg(target_os = "linux")]
pub fn free_space(path: &Path) -> io::Result<u64> {
    let mut at = path;
    while !at.exists() {
        match at.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => at = parent,
            _ => {
                at = Path::new(".");
                break;
            }
        }
    }
    let stat = rustix::fs::statvfs(at).map_err(io::Error::from)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Elsewhere the check is left to the write that fails.
#[cfg(not(target_os = "linux"))]
pub fn free_space(_path: &Path) -> io::Result<u64> {
    Ok(u64::MAX)
}

/// Whether a write failed for want of space (ENOSPC, EDQUOT).
pub fn is_out_of_space(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `len` bytes in pieces of `piece` (the last one shorter).
    fn write_file(
        dir: &Path,
        name: &str,
        len: usize,
        piece: usize,
        direct: bool,
    ) -> (Vec<u8>, Written) {
        let want: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let mut f = AtomicFile::create(&dir.join(name)).unwrap();
        if !direct {
            f = f.without_direct();
        }
        for chunk in want.chunks(piece.max(1)) {
            f.write_all(chunk).unwrap();
        }
        (want, f.commit().unwrap())
    }

    #[test]
    fn every_size_around_the_blocks_is_written_whole_and_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let sizes = [
            0,
            1,
            DIRECT_ALIGN - 1,
            DIRECT_ALIGN,
            DIRECT_ALIGN + 1,
            BLOCK - 1,
            BLOCK,
            BLOCK + 1,
            BLOCK + DIRECT_ALIGN,
            3 * BLOCK + 4097,
        ];
        for (i, len) in sizes.into_iter().enumerate() {
            // Small pieces, and one write larger than a block; with
            // O_DIRECT where the filesystem takes it, and without.
            for (piece, direct) in [(1000, true), (5 * BLOCK, true), (1000, false)] {
                let name = format!("f{i}-{piece}-{direct}");
                let (want, written) = write_file(dir.path(), &name, len, piece, direct);
                let got = fs::read(dir.path().join(&name)).unwrap();
                assert!(got == want, "{len} bytes in pieces of {piece}, {direct}");
                assert_eq!(written.bytes, len as u64);
                assert_eq!(written.sha256, hex::encode(Sha256::digest(&want)));
            }
        }
    }

    #[test]
    fn a_big_file_abandoned_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = AtomicFile::create(&dir.path().join("big")).unwrap();
        f.write_all(&vec![b'x'; 2 * BLOCK + 10]).unwrap();
        drop(f);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_part_has_no_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = AtomicFile::create_part(&dir.path().join("part")).unwrap();
        f.write_all(&vec![b'x'; BLOCK + 10]).unwrap();
        let written = f.commit().unwrap();
        assert_eq!(
            (written.bytes, written.sha256.as_str()),
            ((BLOCK + 10) as u64, "")
        );
    }
}
