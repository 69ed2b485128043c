//! Positional I/O: the only way this crate touches storage.
//!
//! [`Disk`] is implemented for [`std::fs::File`] (regular files and block
//! devices alike) and for [`MemDisk`], a growable in-memory buffer for tests
//! and fuzzing. The format code never seeks, never assumes a file position,
//! and never learns whether it talks to a device or an image file.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// A byte-addressed store with positional reads and writes.
///
/// Reads past the end fail with [`io::ErrorKind::UnexpectedEof`]; a short read
/// is never returned silently.
pub trait Disk {
    /// Fills `buf` from byte offset `off`, or fails.
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `buf` at byte offset `off`, or fails.
    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync for files and devices).
    fn flush(&self) -> io::Result<()>;
    /// Current size in bytes. For block devices this is the device size, not
    /// the inode's (zero) length.
    fn size(&self) -> io::Result<u64>;
    /// The unit a power cut may tear a write at: a block device's logical sector
    /// size, 4096 for files and memory (what cryptsetup assumes for each).
    fn write_unit(&self) -> u64 {
        4096
    }
    /// Whether reads bypass the page cache (O_DIRECT), so that a read waits on the
    /// device rather than being a copy the CPU makes.
    fn direct(&self) -> bool {
        false
    }
    /// Whether a write past the end grows the store (a regular file, memory) rather
    /// than fails (a block device).
    fn can_grow(&self) -> bool {
        false
    }
    /// Takes cryptsetup's metadata lock on this store, shared to read a header and
    /// exclusive to write one, for as long as the guard lives, so that neither tool
    /// reads a header the other is halfway through writing (cryptsetup also rewrites
    /// a stale copy when it reads one). `None`: the store has no such lock (memory).
    fn lock_metadata(&self, exclusive: bool) -> io::Result<Option<MetadataLock>> {
        let _ = exclusive;
        Ok(None)
    }
    /// The open file or block device behind the store, if there is one (not memory):
    /// to tell whether two stores reach the same bytes.
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

/// A held metadata lock (see [`Disk::lock_metadata`]): a `flock` on `file`, dropped
/// with the guard.
#[derive(Debug)]
pub struct MetadataLock {
    file: File,
    /// A lock file to remove on release, as cryptsetup does (its `/run/cryptsetup/L_*`
    /// files): only while still holding it exclusively, and only if the path still
    /// names the locked file.
    unlink: Option<PathBuf>,
}

impl MetadataLock {
    /// Locks `file` (`flock`, waiting as cryptsetup waits), shared or exclusive.
    pub fn acquire(file: File, exclusive: bool, unlink: Option<PathBuf>) -> io::Result<Self> {
        flock(
            &file,
            if exclusive {
                libc::LOCK_EX
            } else {
                libc::LOCK_SH
            },
        )?;
        Ok(MetadataLock { file, unlink })
    }
    /// The locked file (to check that a lock file's path still names it).
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// `flock(2)` retried when a signal interrupts it.
pub fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: flock on a valid, owned descriptor; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Whether `path` still names `file` (a lock file's releasing holder may have unlinked
/// it, and another process created a new one there).
pub fn names_file(path: &std::path::Path, file: &File) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

impl Drop for MetadataLock {
    fn drop(&mut self) {
        if let Some(p) = &self.unlink {
            if flock(&self.file, libc::LOCK_EX | libc::LOCK_NB).is_ok() && names_file(p, &self.file)
            {
                let _ = std::fs::remove_file(p);
            }
        }
        // `file` may be a duplicate of a descriptor that stays open (an image file):
        // closing it would not drop the lock.
        let _ = flock(&self.file, libc::LOCK_UN);
    }
}

impl Disk for File {
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.as_raw_fd())
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, off)
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        FileExt::write_all_at(self, buf, off)
    }
    fn flush(&self) -> io::Result<()> {
        self.sync_data()
    }
    fn size(&self) -> io::Result<u64> {
        // metadata().len() is 0 for block devices; seeking to the end asks the
        // block layer (same answer as BLKGETSIZE64) and also works for files.
        // `&File` implements Seek, so no &mut is needed; the position is
        // irrelevant to us because all I/O is positional.
        use std::io::{Seek, SeekFrom};
        let mut f: &File = self;
        f.seek(SeekFrom::End(0))
    }
    fn can_grow(&self) -> bool {
        self.metadata().is_ok_and(|m| m.is_file())
    }
    /// A regular file is its own lock, as cryptsetup takes it (`flock` on the image or
    /// header file). Block devices have none here: cryptsetup's lock for them is a file
    /// under /run/cryptsetup, which the walker's disks take (its data device and its
    /// `HeaderDisk`).
    fn lock_metadata(&self, exclusive: bool) -> io::Result<Option<MetadataLock>> {
        if !self.metadata()?.is_file() {
            return Ok(None);
        }
        MetadataLock::acquire(self.try_clone()?, exclusive, None).map(Some)
    }
}

impl<D: Disk + ?Sized> Disk for &D {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(off, buf)
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        (**self).write_at(off, buf)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
    fn write_unit(&self) -> u64 {
        (**self).write_unit()
    }
    fn can_grow(&self) -> bool {
        (**self).can_grow()
    }
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        (**self).raw_fd()
    }
    fn lock_metadata(&self, exclusive: bool) -> io::Result<Option<MetadataLock>> {
        (**self).lock_metadata(exclusive)
    }
}

/// An in-memory disk backed by a `Vec<u8>`, shared between clones.
///
/// Writes past the end grow it (like a sparse file); reads past the end fail.
/// `flush` counts calls so tests can check that writers sync.
#[derive(Clone, Default)]
pub struct MemDisk {
    inner: Arc<Mutex<MemInner>>,
}

#[derive(Default)]
struct MemInner {
    bytes: Vec<u8>,
    flushes: u64,
    writes: u64,
}

impl std::fmt::Debug for MemDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.lock();
        f.debug_struct("MemDisk")
            .field("len", &g.bytes.len())
            .field("writes", &g.writes)
            .field("flushes", &g.flushes)
            .finish()
    }
}

impl MemDisk {
    /// A zero-filled disk of `len` bytes.
    pub fn new(len: usize) -> MemDisk {
        MemDisk::from_vec(vec![0; len])
    }
    /// A disk holding exactly `bytes`.
    pub fn from_vec(bytes: Vec<u8>) -> MemDisk {
        MemDisk {
            inner: Arc::new(Mutex::new(MemInner {
                bytes,
                ..MemInner::default()
            })),
        }
    }
    /// A copy of the current contents.
    pub fn to_vec(&self) -> Vec<u8> {
        self.lock().bytes.clone()
    }
    /// Number of `write_at` calls so far (tests use it to prove "no write").
    pub fn write_count(&self) -> u64 {
        self.lock().writes
    }
    /// Number of `flush` calls so far.
    pub fn flush_count(&self) -> u64 {
        self.lock().flushes
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        // A panic while holding the lock leaves plain bytes behind; keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Disk for MemDisk {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let g = self.lock();
        let start = usize::try_from(off).map_err(|_| eof())?;
        let end = start.checked_add(buf.len()).ok_or_else(eof)?;
        let src = g.bytes.get(start..end).ok_or_else(eof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        let mut g = self.lock();
        let start = usize::try_from(off).map_err(|_| eof())?;
        let end = start.checked_add(buf.len()).ok_or_else(eof)?;
        if g.bytes.len() < end {
            g.bytes.resize(end, 0);
        }
        g.bytes[start..end].copy_from_slice(buf);
        g.writes += 1;
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.lock().flushes += 1;
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.lock().bytes.len() as u64)
    }
    fn can_grow(&self) -> bool {
        true
    }
}

fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "read past the end of the disk",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memdisk_grows_on_write_and_refuses_reads_past_end() {
        let d = MemDisk::new(10);
        d.write_at(8, &[1, 2, 3, 4]).unwrap();
        assert_eq!(d.size().unwrap(), 12);
        let mut b = [0u8; 4];
        d.read_at(8, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert_eq!(
            d.read_at(10, &mut b).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert_eq!(d.write_count(), 1);
    }

    #[test]
    fn file_size_comes_from_seek_end() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(123_456).unwrap();
        assert_eq!(Disk::size(&f).unwrap(), 123_456);
        Disk::write_at(&f, 200_000, b"x").unwrap();
        assert_eq!(Disk::size(&f).unwrap(), 200_001);
    }
}
