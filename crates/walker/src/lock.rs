//! One run per volume, whichever path reaches its bytes, and whichever tool runs it.
//!
//! Three locks, none of which a crash leaves behind (the kernel drops each with its
//! holder's open file description):
//!
//! - **The data's bytes** ([`DataLock`]): an open-file-description record lock
//!   (`F_OFD_SETLK`, write) on the image file's bytes the run walks. A run on an image
//!   file locks the whole file; a run on a loop device locks its backing file's range
//!   (`lo_offset`, the device's size). So `luksify encrypt img` and `luksify resume
//!   /dev/loop0` (a loop device over `img`) exclude each other, as two loop devices
//!   over the same file do, which `O_EXCL` (per block device) never did. Record locks
//!   are independent of `flock`, which cryptsetup takes on an image file to read its
//!   header: `cryptsetup luksDump img` answers during a run. They are what qemu takes
//!   on the images it uses, so a run refuses an image a VM has open, and the reverse.
//! - **Loop devices over an image file** ([`refuse_used_loop_devices`]): a run on a
//!   file refuses while a loop device over it is in use (mounted, mapped, opened
//!   exclusively): writing under a mounted filesystem would corrupt it.
//! - **The volume** ([`ReencryptLock`]): cryptsetup's own reencryption lock,
//!   `/run/cryptsetup/LN_LUKS2-reencryption-<UUID>`, taken as cryptsetup 2.x takes it
//!   (create, `flock(LOCK_EX | LOCK_NB)`, check the path still names the locked file;
//!   on release unlink it while still holding it). `cryptsetup reencrypt` and
//!   `cryptsetup repair` then say "Reencryption process is already running" during a
//!   luksify run, and luksify refuses to walk a volume cryptsetup is walking.

use crate::{Error, Result};
use luksify_luks::io::{names_file, Disk};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Where cryptsetup keeps its lock files (its `DEFAULT_LUKS2_LOCK_PATH`).
pub const CRYPTSETUP_LOCK_DIR: &str = "/run/cryptsetup";

/// `F_OFD_SETLK` write lock on `[start, start + len)` of `file` (`len` 0: to the end,
/// however far the file grows). Fails with `WouldBlock` when another open file
/// description (another process, or another open in this one) holds a lock there.
pub fn lock_range(file: &File, start: u64, len: u64) -> io::Result<()> {
    lock_fd_range(file.as_raw_fd(), start, len)
}

/// [`lock_range`] on a raw descriptor.
fn lock_fd_range(fd: std::os::fd::RawFd, start: u64, len: u64) -> io::Result<()> {
    // SAFETY: an all-zero `struct flock` is a valid value; the fields are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = i64::try_from(start).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    fl.l_len = i64::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    loop {
        // SAFETY: fcntl on a valid descriptor with a valid, initialised `struct flock`
        // that outlives the call (F_OFD_SETLK does not block).
        let rc = unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) | Some(libc::EACCES) => {
                return Err(io::Error::new(io::ErrorKind::WouldBlock, e))
            }
            _ => return Err(e),
        }
    }
}

/// The lock a run holds on the bytes it walks, for as long as it lives.
#[derive(Debug)]
pub struct DataLock {
    /// The open file description the record lock belongs to (the data file itself
    /// for image files, the backing file for loop devices).
    _file: Option<File>,
}

const LOCKED_HINT: &str = "another luksify run on the same bytes (through this path, the image file, or a loop device over it), an open luksify mapping of them (`luksify close` it), or a program using the image (e.g. qemu); wait for it to end, or stop a luksify run (SIGINT) and continue it with `luksify resume` (nothing was written)";

impl DataLock {
    /// The claim a writer of `file` takes on its bytes, whatever it is: for a block
    /// device of `size` bytes [`DataLock::block_device`] (callers open it `O_EXCL`
    /// too); for an image file [`DataLock::image_file`], and no loop device over it in
    /// use ([`refuse_used_loop_devices`]). What [`crate::device::DataDevice::open`]
    /// takes, and `luksify format` before it writes a header in front.
    pub fn claim(file: &File, size: u64) -> io::Result<DataLock> {
        use std::os::unix::fs::FileTypeExt;
        let m = file.metadata()?;
        if m.file_type().is_block_device() {
            let lock = DataLock::block_device(file, size)?;
            crate::overlap::refuse_used_other_paths(m.rdev())?;
            Ok(lock)
        } else {
            let lock = DataLock::image_file(file)?;
            refuse_used_loop_devices(file)?;
            Ok(lock)
        }
    }

    /// Locks the whole of image file `file` (opened read-write).
    pub fn image_file(file: &File) -> io::Result<DataLock> {
        lock_range(file, 0, 0)
            .map_err(|e| locked_error(e, || format!("locked by {LOCKED_HINT}")))?;
        Ok(DataLock { _file: None })
    }

    /// For a block device: when it is a loop device over a file, locks the file's
    /// range behind it (`size` bytes from the loop's offset). Other block devices
    /// (disks, partitions) need none: `O_EXCL` covers them. A backing file that
    /// cannot be opened read-write cannot be written through the loop device either.
    pub fn block_device(dev: &File, size: u64) -> io::Result<DataLock> {
        Self::through_loops(dev, 0, size, 0)
    }

    /// [`DataLock::block_device`] for `size` bytes from byte `start` of `dev`: a loop
    /// device over another loop device is followed down to the file at the bottom (a
    /// run through `/dev/loopC` over `/dev/loopA` over `img` locked only loopA's device
    /// node, and a run on `img` or loopA went on beside it: both finished, the data
    /// encrypted twice).
    fn through_loops(dev: &File, start: u64, size: u64, depth: u32) -> io::Result<DataLock> {
        use std::os::unix::fs::FileTypeExt;
        let Some(lo) = loop_status(dev).filter(|_| depth < 8) else {
            return Ok(DataLock { _file: None });
        };
        let rdev = dev.metadata()?.rdev();
        let Some(backing) = loop_backing_path(libc::major(rdev), libc::minor(rdev)) else {
            return Ok(DataLock { _file: None });
        };
        let f = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&backing)
        {
            Ok(f) => f,
            Err(_) => return Ok(DataLock { _file: None }),
        };
        // The path must still name the file the loop device reads.
        let m = f.metadata()?;
        if m.ino() != lo.inode {
            return Ok(DataLock { _file: None });
        }
        if m.file_type().is_block_device() {
            return Self::through_loops(&f, lo.offset + start, size, depth + 1);
        }
        lock_range(&f, lo.offset + start, size).map_err(|e| {
            locked_error(e, || {
                format!(
                    "a loop device over {}, which is locked by {LOCKED_HINT}",
                    backing.display()
                )
            })
        })?;
        Ok(DataLock { _file: Some(f) })
    }
}

/// The claim a run (and `luksify format`) takes on a detached header file for as long
/// as it holds the file open: a record lock on the whole file, as [`DataLock`] takes on
/// an image. Two `encrypt --header H` runs on two devices both finished, the second
/// taking over the header file the first had just created (its key derivation still
/// running), and one volume was left encrypted under a key nobody had; a `format
/// --header H` in the middle of a walk replaced the run's keyslot. A header on a block
/// device is the caller's `O_EXCL`; headers in memory take none.
pub fn claim_header<H: Disk + ?Sized>(h: &H) -> Result<()> {
    let Some(fd) = h.raw_fd() else {
        return Ok(());
    };
    // SAFETY: an all-zero `struct stat` is valid; fstat fills it from a valid descriptor.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into `st`, which outlives the call.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Ok(());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Ok(());
    }
    match lock_fd_range(fd, 0, 0) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(Error::Busy(
            "the header file is in use by another luksify run, or a `luksify format` writing it: wait for that to end; two runs never share a header (nothing was written)".into(),
        )),
        Err(e) => Err(Error::io("lock the header file", e)),
    }
}

fn locked_error(e: io::Error, msg: impl FnOnce() -> String) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(io::ErrorKind::WouldBlock, msg())
    } else {
        e
    }
}

/// What `LOOP_GET_STATUS64` says of a loop device: the backing file's device and inode
/// (`rdevice`: the device number it is a node of, 0 for a regular file) and the offset
/// into it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoopStatus {
    pub(crate) device: u64,
    pub(crate) inode: u64,
    pub(crate) rdevice: u64,
    pub(crate) offset: u64,
}

/// `struct loop_info64` (linux/loop.h).
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `LOOP_GET_STATUS64`: `None` when `dev` is not a bound loop device.
pub(crate) fn loop_status(dev: &File) -> Option<LoopStatus> {
    const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
    // SAFETY: all-zero is a valid `LoopInfo64` (integers and byte arrays).
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: LOOP_GET_STATUS64 writes one `struct loop_info64`, which `info` is,
    // laid out as the kernel's; other devices fail the ioctl without writing.
    let rc = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            LOOP_GET_STATUS64 as _,
            &mut info as *mut LoopInfo64,
        )
    };
    (rc == 0).then_some(LoopStatus {
        device: info.lo_device,
        inode: info.lo_inode,
        rdevice: info.lo_rdevice,
        offset: info.lo_offset,
    })
}

/// The backing file of loop device `major:minor`, from sysfs (the path as the kernel
/// sees it now; `None` if unbound, or the file was deleted).
pub(crate) fn loop_backing_path(major: u32, minor: u32) -> Option<PathBuf> {
    let s = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/loop/backing_file"))
        .ok()?;
    let s = s.trim_end_matches('\n');
    (!s.is_empty() && !s.ends_with(" (deleted)")).then(|| PathBuf::from(s))
}

/// Refuses when a loop device over image file `file` is in use (mounted, mapped by
/// device-mapper, a partition of it mounted, or opened exclusively): a run on the
/// file would write under it. Loop devices merely attached are left alone; a luksify
/// run through one is excluded by [`DataLock`].
pub fn refuse_used_loop_devices(file: &File) -> io::Result<()> {
    let meta = file.metadata()?;
    // By the file's identity, not a path: a loop device attached from another mount
    // namespace shows a backing path that names nothing here (a trial).
    for o in crate::overlap::devices_over_file(meta.dev(), meta.ino()) {
        let node = o.node();
        if !o.has_partitions && crate::overlap::held_exclusively(&node) {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "attached to {}, which is in use (mounted, mapped, or opened by another program): writing under it would corrupt it; unmount or close it and detach its loop device (`losetup -d`) first (nothing was written)",
                    node.display()
                ),
            ));
        }
    }
    Ok(())
}

/// cryptsetup's reencryption lock on one volume, held until dropped.
#[derive(Debug)]
pub struct ReencryptLock {
    file: File,
    path: PathBuf,
}

impl ReencryptLock {
    /// Takes `DIR/LN_LUKS2-reencryption-<uuid>` as cryptsetup does. `Ok(None)` when
    /// this user cannot create lock files there (not root): whoever cannot, cannot
    /// run cryptsetup's reencryption either. Refuses, in one line, while another
    /// process (luksify or cryptsetup) holds it.
    pub fn acquire(dir: &Path, uuid: &str) -> Result<Option<ReencryptLock>> {
        let io_err = |e| Error::io(format!("reencryption lock in {}", dir.display()), e);
        match make_lock_dir(dir) {
            Err(e) if unprivileged(&e) => return Ok(None),
            r => r.map_err(io_err)?,
        }
        let path = dir.join(format!("LN_LUKS2-reencryption-{uuid}"));
        loop {
            let file = match open_lock_file(&path) {
                Err(e) if unprivileged(&e) => return Ok(None),
                r => r.map_err(io_err)?,
            };
            match crate::device::flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                    return Err(Error::Busy(format!(
                        "another process is walking this volume, or a copy of it (same UUID {uuid}): a luksify run, or `cryptsetup reencrypt` (it holds {}); wait for it to end: one volume UUID is walked by one run at a time, as in cryptsetup (nothing was written)",
                        path.display()
                    )))
                }
                Err(e) => return Err(io_err(e)),
            }
            // A releasing holder unlinks the file while it still holds the lock: if
            // the path no longer names what was locked, lock the new file instead.
            if names_file(&path, &file) {
                return Ok(Some(ReencryptLock { file, path }));
            }
        }
    }
}

fn unprivileged(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS)
    )
}

impl Drop for ReencryptLock {
    fn drop(&mut self) {
        // As cryptsetup releases it: still holding the lock, unlink the file if the
        // path names it, then close (which drops the lock).
        if names_file(&self.path, &self.file) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// cryptsetup's metadata lock for block device `rdev`: `flock` on
/// `/run/cryptsetup/L_<major>:<minor>`, created if missing, re-opened if a releasing
/// holder unlinked it meanwhile, and removed on release while still held exclusively
/// (cryptsetup's `acquire_and_verify` and `release_lock_handle`). `None` when this user
/// cannot create it (see [`ReencryptLock::acquire`]).
pub fn block_metadata_lock(
    rdev: u64,
    exclusive: bool,
) -> io::Result<Option<luksify_luks::io::MetadataLock>> {
    let dir = Path::new(CRYPTSETUP_LOCK_DIR);
    match make_lock_dir(dir) {
        Err(e) if unprivileged(&e) => return Ok(None),
        r => r?,
    }
    let path = dir.join(format!("L_{}:{}", libc::major(rdev), libc::minor(rdev)));
    loop {
        let file = match open_lock_file(&path) {
            Err(e) if unprivileged(&e) => return Ok(None),
            r => r?,
        };
        // Dropped unheld if the path names another file by now: its release then
        // leaves that file alone.
        let lock = luksify_luks::io::MetadataLock::acquire(file, exclusive, Some(path.clone()))?;
        if names_file(&path, lock.file()) {
            return Ok(Some(lock));
        }
    }
}

/// Creates cryptsetup's lock directory (mode 0700, its DEFAULT_LUKS2_LOCK_DIR_PERMS)
/// if it is missing.
fn make_lock_dir(dir: &Path) -> io::Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Opens (creating) a lock file as cryptsetup does: no symlinks followed.
fn open_lock_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// cryptsetup's metadata lock for `file`: its lock file under /run/cryptsetup when
/// `file` is block device `rdev`, else a `flock` on a regular file itself (as `File`
/// takes it). The one rule for both the data device and a detached header.
pub fn metadata_lock_for(
    file: &File,
    rdev: Option<u64>,
    exclusive: bool,
) -> io::Result<Option<luksify_luks::io::MetadataLock>> {
    match rdev {
        Some(rdev) => block_metadata_lock(rdev, exclusive),
        None => Disk::lock_metadata(file, exclusive),
    }
}

/// A detached header's file or block device, with cryptsetup's metadata lock on
/// either: a `flock` on a header file (as `File` takes it), and for a block device
/// its lock file `/run/cryptsetup/L_<major>:<minor>`, which cryptsetup takes to read
/// the header there (shared) and to write or repair it (exclusive).
#[derive(Debug)]
pub struct HeaderDisk {
    file: File,
    /// The device number when `file` is a block device.
    rdev: Option<u64>,
}

impl HeaderDisk {
    /// Wraps the opened header `file`.
    pub fn new(file: File) -> io::Result<HeaderDisk> {
        use std::os::unix::fs::FileTypeExt;
        let m = file.metadata()?;
        let rdev = m.file_type().is_block_device().then(|| m.rdev());
        Ok(HeaderDisk { file, rdev })
    }
}

impl Disk for HeaderDisk {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        Disk::read_at(&self.file, off, buf)
    }
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(std::os::fd::AsRawFd::as_raw_fd(&self.file))
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        Disk::write_at(&self.file, off, buf)
    }
    fn flush(&self) -> io::Result<()> {
        Disk::flush(&self.file)
    }
    fn size(&self) -> io::Result<u64> {
        Disk::size(&self.file)
    }
    fn write_unit(&self) -> u64 {
        Disk::write_unit(&self.file)
    }
    fn can_grow(&self) -> bool {
        Disk::can_grow(&self.file)
    }
    fn lock_metadata(&self, exclusive: bool) -> io::Result<Option<luksify_luks::io::MetadataLock>> {
        metadata_lock_for(&self.file, self.rdev, exclusive)
    }
}

/// What a path's bytes are: an inode of a regular file, a block device, or both (a
/// loop device and the file behind it).
fn storage_of(p: &Path) -> Vec<(bool, u64, u64)> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(m) = std::fs::metadata(p) else {
        return Vec::new();
    };
    if m.file_type().is_block_device() {
        let rdev = m.rdev();
        let mut v = vec![(true, rdev, 0)];
        if let Some(b) = loop_backing_path(libc::major(rdev), libc::minor(rdev)) {
            if let Ok(bm) = std::fs::metadata(b) {
                v.push((false, bm.dev(), bm.ino()));
            }
        }
        v
    } else {
        vec![(false, m.dev(), m.ino())]
    }
}

/// Whether paths `a` and `b` reach the same bytes: the same file (through any name or
/// link), the same block device, or a loop device and the file behind it (or two loop
/// devices over one file). Paths that cannot be inspected are not the same.
pub fn same_storage(a: &Path, b: &Path) -> bool {
    let sa = storage_of(a);
    storage_of(b).iter().any(|x| sa.contains(x))
}

/// [`same_storage`] of two open stores (through `/proc/self/fd`, which names the open
/// file even once unlinked). Stores with no descriptor (memory) are not the same.
pub fn same_store<A: Disk + ?Sized, B: Disk + ?Sized>(a: &A, b: &B) -> bool {
    match (a.raw_fd(), b.raw_fd()) {
        (Some(x), Some(y)) => same_storage(
            Path::new(&format!("/proc/self/fd/{x}")),
            Path::new(&format!("/proc/self/fd/{y}")),
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_storage_sees_through_names_and_links() {
        let d = std::env::temp_dir().join(format!("luksify-same-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("a"), b"x").unwrap();
        std::fs::write(d.join("b"), b"x").unwrap();
        std::os::unix::fs::symlink(d.join("a"), d.join("l")).unwrap();
        std::fs::hard_link(d.join("a"), d.join("h")).unwrap();
        assert!(same_storage(&d.join("a"), &d.join("a")));
        assert!(same_storage(&d.join("a"), &d.join("l")));
        assert!(same_storage(&d.join("h"), &d.join("l")));
        assert!(same_storage(&d.join("a"), &d.join(".").join("a")));
        assert!(!same_storage(&d.join("a"), &d.join("b")));
        assert!(!same_storage(&d.join("a"), &d.join("missing")));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
