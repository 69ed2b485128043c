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
    /// Bytes without a block yet (holes, or past its end) in the range the device
    /// reaches; with `deleted`, the whole range (nothing can tell).
    pub holes: u64,
    /// Bytes its filesystem has free.
    pub free: u64,
    /// The range of the file the device reaches, and the file's length.
    pub offset: u64,
    pub len: u64,
    pub file_len: u64,
    /// The file under the loop device was deleted (it lives on while the loop device
    /// holds it): how much of it is allocated cannot be read.
    pub deleted: bool,
}

impl ShortOfRoom {
    /// Bytes of room to make before the run fits.
    pub fn missing(&self) -> u64 {
        needed(self.holes).saturating_sub(self.free)
    }

    /// The `fallocate` that reserves the whole file (and keeps the data), where the
    /// device reaches all of it: blocks it reserves show in the file's block count, and
    /// the next run sees them. Within a part of a file they would not (SEEK_HOLE calls
    /// them holes until written), so there the advice is the room alone.
    pub fn fallocate(&self) -> Option<String> {
        (self.offset == 0 && self.len >= self.file_len && !self.deleted)
            .then(|| format!("fallocate -l {} {}", self.len, self.file.display()))
    }
}

impl std::fmt::Display for ShortOfRoom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b.div_ceil(1 << 20);
        if self.deleted {
            return write!(
                f,
                "the file under this loop device ({}) was deleted, so how much of its {} MiB is allocated cannot be read, and its filesystem has {} MiB free: a loop device's write that finds it full can lose part of its data without an error; make {} MiB more room there, or copy the device to a file or disk that has it (nothing was written)",
                self.file.display(),
                mib(self.holes),
                mib(self.free),
                mib(self.missing())
            );
        }
        write!(
            f,
            "{} MiB of {}{} are holes (a sparse file) that this run writes, and its filesystem has {} MiB free: {}; make {} MiB more room there{} (nothing was written)",
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
            self.fallocate()
                .map(|f| format!(", and `{f}` then reserves it without changing the data"))
                .unwrap_or_default()
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
/// a file or loop device, an unbound loop device).
pub fn short_of_room(dev: &File) -> Option<ShortOfRoom> {
    short_of_room_in(dev, 0, u64::MAX)
}

/// [`short_of_room`] for the `len` bytes of `dev` from `start` (clipped to its size):
/// what a header write reaches, say.
pub fn short_of_room_in(dev: &File, start: u64, len: u64) -> Option<ShortOfRoom> {
    let m = dev.metadata().ok()?;
    if m.file_type().is_file() {
        let len = len.min(m.len().saturating_sub(start));
        return check(dev, start, len, false, None);
    }
    if !m.file_type().is_block_device() {
        return None;
    }
    let size = crate::device::block_device_size(dev).ok()?;
    let len = len.min(size.saturating_sub(start));
    through_loops(dev, start, len, 0)
}

fn through_loops(dev: &File, start: u64, size: u64, depth: u32) -> Option<ShortOfRoom> {
    let lo = crate::lock::loop_status(dev).filter(|_| depth < 8)?;
    let rdev = dev.metadata().ok()?.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let Some(backing) = crate::lock::loop_backing_path(major, minor) else {
        return deleted_backing(major, minor, size);
    };
    // A file on a FUSE filesystem (luksify's own decrypted view) is not opened: its
    // open waits on its daemon, and a stopped one hung `check` of the view for good.
    if on_fuse(&backing) {
        return None;
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&backing)
        .ok();
    // Not the file at that path (a path of another mount namespace, a container's):
    // nothing can be known of it here.
    let f = f.filter(|f| f.metadata().is_ok_and(|m| m.ino() == lo.inode))?;
    let m = f.metadata().ok()?;
    if m.file_type().is_block_device() {
        return through_loops(&f, lo.offset + start, size, depth + 1);
    }
    if !m.file_type().is_file() {
        return None;
    }
    check(&f, lo.offset + start, size, true, Some(backing))
}

/// Whether `p` lies on a FUSE filesystem, from this process's mount table (a `statfs`
/// of it would itself wait on the filesystem's daemon).
fn on_fuse(p: &std::path::Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    table
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let dash = f.iter().position(|x| *x == "-")?;
            let mp = unescape_octal(f.get(4)?);
            Some((mp, f.get(dash + 1)?.to_string()))
        })
        .filter(|(mp, _)| p.starts_with(mp))
        .max_by_key(|(mp, _)| mp.len())
        .is_some_and(|(_, fs)| fs == "fuse" || fs == "fuseblk" || fs.starts_with("fuse."))
}

/// Undoes the kernel's escaping of mountinfo fields: space, tab, newline and backslash
/// are written as `\ooo` octal (`\040`, `\011`, `\012`, `\134`).
pub fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) if b[i] == b'\\' => {
                let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                out.push(v as u8);
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A loop device whose backing file was deleted (sysfs says "(deleted)"): its
/// allocation cannot be read, so the whole range may be holes; the room is that of the
/// filesystem its path was on, where its directory still is.
fn deleted_backing(major: u32, minor: u32, size: u64) -> Option<ShortOfRoom> {
    let raw = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/loop/backing_file"))
        .ok()?;
    let path = PathBuf::from(raw.trim_end_matches('\n').strip_suffix(" (deleted)")?);
    if path.as_os_str().is_empty() {
        return None;
    }
    // Its directory may have gone with it (`rm -r`): the nearest one still there is
    // on the same filesystem, as a rule (a trial's check was skipped).
    let dir = path.parent()?.ancestors().find(|a| a.is_dir())?;
    if on_fuse(dir) {
        return None;
    }
    let free = free_bytes(&File::open(dir).ok()?)?;
    (needed(size) > free).then_some(ShortOfRoom {
        file: path,
        through_loop: true,
        holes: size,
        free,
        offset: 0,
        len: size,
        file_len: size,
        deleted: true,
    })
}

/// The bytes free to root on the filesystem holding `f`: the loop device writes with
/// the kernel's rights.
fn free_bytes(f: &File) -> Option<u64> {
    // SAFETY: an all-zero `statvfs` is valid; fstatvfs fills it from a valid descriptor.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatvfs writes into `st`, which outlives the call.
    if unsafe { libc::fstatvfs(f.as_raw_fd(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bfree as u64).saturating_mul(st.f_frsize as u64))
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
    let free = free_bytes(f)?;
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
        offset: start,
        len,
        file_len: f.metadata().ok()?.len(),
        deleted: false,
    })
}

/// Bytes of `[start, end)` of `f` that have no block yet: holes, and what lies past its
/// end. Two counts that can only over-count, the smaller taken: the file's unallocated
/// bytes anywhere (`st_size` less `st_blocks`, which counts what `fallocate` reserved),
/// and the holes SEEK_HOLE finds in the range (which calls reserved, unwritten blocks
/// holes too, on ext4 and tmpfs alike). A loop device over the written part of a
/// larger sparse file has none (it was refused; a trial).
pub fn holes_in(f: &File, start: u64, end: u64) -> io::Result<u64> {
    let m = f.metadata()?;
    let len = m.len();
    let unallocated = len.saturating_sub(m.blocks().saturating_mul(512));
    let inside = end.min(len).saturating_sub(start);
    let past_end = end.saturating_sub(len.max(start));
    let sought = sought_holes(f, start, end.min(len)).unwrap_or(inside);
    Ok(unallocated.min(inside).min(sought) + past_end)
}

/// Holes SEEK_DATA/SEEK_HOLE find in `[start, end)` (`end` at most the file's length).
fn sought_holes(f: &File, start: u64, end: u64) -> io::Result<u64> {
    let fd = f.as_raw_fd();
    let seek = |pos: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        let off = i64::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: lseek on a valid descriptor; a run reads and writes with pread and
        // pwrite, which the file offset does not affect.
        let r = unsafe { libc::lseek(fd, off, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        Err(e)
    };
    let mut holes = 0;
    let mut pos = start;
    while pos < end {
        let Some(data) = seek(pos, libc::SEEK_DATA)?.filter(|&d| d < end) else {
            holes += end - pos;
            break;
        };
        holes += data - pos;
        match seek(data, libc::SEEK_HOLE)? {
            Some(h) if h > data => pos = h,
            _ => break,
        }
    }
    Ok(holes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// Every character the kernel escapes in a mount point comes back (a FUSE mount at a
    /// path with a tab was taken for the filesystem under it, whose files may be opened).
    #[test]
    fn mount_points_are_unescaped_as_the_kernel_escapes_them() {
        assert_eq!(
            unescape_octal("/a\\040b\\011c\\012d\\134e"),
            "/a b\tc\nd\\e"
        );
        assert_eq!(unescape_octal("/plain"), "/plain");
        // Not three octal digits: left as written.
        assert_eq!(unescape_octal("/x\\08y\\04"), "/x\\08y\\04");
    }

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
        // A range reaching over the data: the holes beside it.
        assert_eq!(holes_in(&f, 1 << 20, 4 << 20).unwrap(), 2 << 20);
        // Past the end: to be written, so counted.
        assert_eq!(
            holes_in(&f, 7 << 20, 10 << 20).unwrap(),
            (1 << 20) + (2 << 20)
        );
        assert_eq!(holes_in(&f, 9 << 20, 10 << 20).unwrap(), 1 << 20);
        // Holes elsewhere in the file are not the range's.
        assert_eq!(holes_in(&f, 2 << 20, 3 << 20).unwrap(), 0);
        // Blocks reserved by fallocate are no holes (SEEK_HOLE would call them so).
        // SAFETY: fallocate on a valid descriptor, mode 0 (allocate, keep the data).
        let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 8 << 20) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        assert_eq!(holes_in(&f, 0, 8 << 20).unwrap(), 0);
        // Plenty of room on the tests' filesystem for 7 MiB: nothing to say.
        assert_eq!(short_of_room(&f), None);
    }
}
