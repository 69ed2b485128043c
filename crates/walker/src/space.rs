//! Room for a run's writes on a sparse file: an image file, or the file under a loop
//! device (through a chain of loop devices).
//!
//! Every byte a run writes into a hole of such a file needs a new block of the
//! filesystem holding it (ciphertext of zeros is not zeros). When that filesystem is
//! full, a write to an image file fails and the run stops resumably; but a loop
//! device's write that the full filesystem takes only part of is completed as a
//! success by the kernel (its short-write case). A trial's walks over a sparse image on
//! a small tmpfs lost the tail of a chunk that way, the header recorded it as done, and
//! `resume` then said "Encrypted" over 23 garbage blocks. So a run is refused before it
//! writes when the holes in the bytes it reaches need more than that filesystem has
//! free ([`short_of_room`]).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;

/// A sparse file whose holes need more room than its filesystem has free.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShortOfRoom {
    /// The file (the image, or the loop device's backing file).
    pub file: PathBuf,
    /// Whether it is reached through a loop device.
    pub through_loop: bool,
    /// Bytes without a block yet (holes, or past its end) in the range the device reaches.
    pub holes: u64,
    /// Bytes its filesystem has free.
    pub free: u64,
    /// The file's length (for `fallocate -l`).
    pub len: u64,
}

impl ShortOfRoom {
    /// Bytes of room to make before the run fits.
    pub fn missing(&self) -> u64 {
        needed(self.holes).saturating_sub(self.free)
    }
}

impl std::fmt::Display for ShortOfRoom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b.div_ceil(1 << 20);
        write!(
            f,
            "{} MiB of {}{} are holes (a sparse file) that this run writes, and its filesystem has {} MiB free: {}; make {} MiB more room there, and `fallocate -l {} {}` then reserves it without changing the data (nothing was written)",
            mib(self.holes),
            self.file.display(),
            if self.through_loop {
                ", the file under this loop device,"
            } else {
                ""
            },
            mib(self.free),
            if self.through_loop {
                "a loop device's write that finds it full can lose part of its data without an error"
            } else {
                "the run would stop part way with the disk full"
            },
            mib(self.missing()),
            self.len,
            self.file.display()
        )
    }
}

/// Room the holes need: themselves and a margin for the filesystem's own metadata
/// (extent trees, block maps) as they fill.
fn needed(holes: u64) -> u64 {
    holes + holes / 128
}

/// The sparse file `dev` reaches (itself when it is a file, or the file at the bottom
/// of its loop devices) when the holes in the bytes it reaches need more room than the
/// file's filesystem has free. `None` when there is room, or nothing can be known (not
/// a file or loop device, an unbound loop device, a backing file not at its path).
pub fn short_of_room(dev: &File) -> Option<ShortOfRoom> {
    let m = dev.metadata().ok()?;
    if m.file_type().is_file() {
        return check(dev, 0, m.len(), false, None);
    }
    if !m.file_type().is_block_device() {
        return None;
    }
    let size = crate::device::block_device_size(dev).ok()?;
    through_loops(dev, 0, size, 0)
}

fn through_loops(dev: &File, start: u64, size: u64, depth: u32) -> Option<ShortOfRoom> {
    let lo = crate::lock::loop_status(dev).filter(|_| depth < 8)?;
    let rdev = dev.metadata().ok()?.rdev();
    let backing = crate::lock::loop_backing_path(libc::major(rdev), libc::minor(rdev))?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&backing)
        .ok()?;
    let m = f.metadata().ok()?;
    if m.ino() != lo.inode {
        return None;
    }
    if m.file_type().is_block_device() {
        return through_loops(&f, lo.offset + start, size, depth + 1);
    }
    if !m.file_type().is_file() {
        return None;
    }
    check(&f, lo.offset + start, size, true, Some(backing))
}

fn check(
    f: &File,
    start: u64,
    len: u64,
    through_loop: bool,
    path: Option<PathBuf>,
) -> Option<ShortOfRoom> {
    let holes = holes_in(f, start, start.checked_add(len)?).ok()?;
    if holes == 0 {
        return None;
    }
    // SAFETY: an all-zero `statvfs` is valid; fstatvfs fills it from a valid descriptor.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatvfs writes into `st`, which outlives the call.
    if unsafe { libc::fstatvfs(f.as_raw_fd(), &mut st) } != 0 {
        return None;
    }
    // The blocks free to root: the loop device writes with the kernel's rights.
    let free = (st.f_bfree as u64).saturating_mul(st.f_frsize as u64);
    if needed(holes) <= free {
        return None;
    }
    let file = match path {
        Some(p) => p,
        None => std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())).ok()?,
    };
    Some(ShortOfRoom {
        file,
        through_loop,
        holes,
        free,
        len: f.metadata().ok()?.len(),
    })
}

/// Bytes of `[start, end)` of `f` that have no block yet: holes, and what lies past its
/// end. From the blocks the file holds (`st_blocks`, which counts blocks `fallocate`
/// reserved; SEEK_HOLE calls those holes until written, on ext4 and tmpfs alike), so a
/// hole is assumed to lie in the range when the file has one anywhere.
pub fn holes_in(f: &File, start: u64, end: u64) -> io::Result<u64> {
    let m = f.metadata()?;
    let len = m.len();
    let unallocated = len.saturating_sub(m.blocks().saturating_mul(512));
    let inside = end.min(len).saturating_sub(start);
    let past_end = end.saturating_sub(len.max(start));
    Ok(unallocated.min(inside) + past_end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// Holes are counted in the range asked, past the end included.
    #[test]
    fn holes_are_counted_in_the_range_and_past_the_end() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&vec![1u8; 1 << 20], 2 << 20).unwrap();
        f.sync_all().unwrap();
        assert_eq!(holes_in(&f, 0, 8 << 20).unwrap(), 7 << 20);
        // A range smaller than the file's holes: all of it may be holes.
        assert_eq!(holes_in(&f, 1 << 20, 4 << 20).unwrap(), 3 << 20);
        // Past the end: to be written, so counted.
        assert_eq!(
            holes_in(&f, 7 << 20, 10 << 20).unwrap(),
            (1 << 20) + (2 << 20)
        );
        assert_eq!(holes_in(&f, 9 << 20, 10 << 20).unwrap(), 1 << 20);
        // Blocks reserved by fallocate are no holes (SEEK_HOLE would call them so).
        // SAFETY: fallocate on a valid descriptor, mode 0 (allocate, keep the data).
        let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 8 << 20) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        assert_eq!(holes_in(&f, 0, 8 << 20).unwrap(), 0);
        // Plenty of room on the tests' filesystem for 7 MiB: nothing to say.
        assert_eq!(short_of_room(&f), None);
    }
}
