//! The data device: O_DIRECT where the kernel allows it (block devices, most
//! files on real filesystems, tmpfs on kernels that accept it there), buffered
//! otherwise (older kernels' tmpfs refuses O_DIRECT), with
//! 4 KiB-aligned buffers so both paths take the same requests.

use luksify_luks::io::Disk;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Alignment of every data buffer and request: satisfies O_DIRECT on 512- and 4096-byte devices.
pub const IO_ALIGN: usize = 4096;

/// A buffer aligned to [`IO_ALIGN`], zeroed on allocation and on drop (it holds
/// plaintext).
///
/// Buffers of [`MAP_MIN`] or more are anonymous mappings with `MADV_HUGEPAGE`: the
/// kernel zeroes their pages on first touch, in whichever worker first reads into
/// them, one fault per 2 MiB where transparent huge pages are on. (An aligned
/// `alloc_zeroed` is `posix_memalign` plus a memset that faults in every 4 KiB page
/// on the thread that allocates, before any I/O starts: 5-9 % of a 2 GiB tmpfs run's
/// perf samples on the Zen 3 VM.) Smaller buffers come from the heap.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

/// Size from which [`AlignedBuf`] maps its memory instead of using the heap.
pub const MAP_MIN: usize = 1 << 20;

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out &[u8], like a Vec<u8>.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        assert!(
            len > 0 && len.is_multiple_of(IO_ALIGN),
            "aligned buffer of {len} bytes"
        );
        if len >= MAP_MIN {
            // SAFETY: a fresh private anonymous mapping; no address hint, no fd.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                // Advice only: without huge pages the mapping works the same.
                // SAFETY: p..p+len is the mapping just made.
                unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) };
                // mmap returns page-aligned memory, and IO_ALIGN is one page.
                let ptr = std::ptr::NonNull::new(p.cast::<u8>()).expect("mmap gave null");
                return AlignedBuf { ptr, len };
            }
            let layout = Layout::from_size_align(len, IO_ALIGN).expect("layout");
            std::alloc::handle_alloc_error(layout);
        }
        let layout = Layout::from_size_align(len, IO_ALIGN).expect("layout");
        // SAFETY: layout has non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes for the lifetime of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}
impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes and uniquely borrowed through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}
impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // Plaintext is wiped before the pages go back to the kernel, which would
        // zero them only when it hands them out again.
        zeroize::Zeroize::zeroize(&mut **self);
        if self.len >= MAP_MIN {
            // SAFETY: mapped in new() with this length; nothing borrows it now.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
            return;
        }
        let layout = Layout::from_size_align(self.len, IO_ALIGN).expect("layout");
        // SAFETY: allocated in new() with this very layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) };
    }
}
impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

pub use luksify_luks::io::flock;

/// An open data device or image file.
#[derive(Debug)]
pub struct DataDevice {
    pub path: PathBuf,
    file: File,
    direct: bool,
    size: u64,
    is_block: bool,
    /// Logical sector size (block devices), else 4096: see `Disk::write_unit`.
    write_unit: u64,
    /// With O_DIRECT on a device whose size is not whole 4096-byte blocks (a partition
    /// of an odd number of 512-byte sectors, an image file of such a size): the same
    /// device opened through the page cache, for the bytes past the last whole block
    /// which O_DIRECT's 4096-byte requests cannot reach. Its writes
    /// are made durable by `flush` on `file` (the same inode: the same page cache).
    tail: Option<File>,
    /// Held for as long as the device is open: see [`crate::lock`].
    _lock: crate::lock::DataLock,
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IO(0x12, 104)`: the logical sector size, an int.
const BLKSSZGET: libc::c_ulong = 0x1268;
/// `_IO(0x12, 94)`: whether the block device is read-only, an int.
const BLKROGET: libc::c_ulong = 0x125e;

/// A block-device ioctl that writes one `T` (an integer: `u64` for BLKGETSIZE64,
/// `c_int` for BLKSSZGET).
fn block_ioctl<T: Default + Copy>(file: &File, req: libc::c_ulong) -> io::Result<T> {
    let mut v = T::default();
    // SAFETY: the caller pairs `req` with the integer type it writes, and `v` is a
    // valid, writable `T` for the call.
    let r = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(file),
            req as _,
            &mut v as *mut T,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// Whether block device `file` is read-only (`BLKROGET`): opening it for writing
/// succeeds, every write then fails with EPERM.
pub fn block_device_read_only(file: &File) -> io::Result<bool> {
    Ok(block_ioctl::<libc::c_int>(file, BLKROGET)? != 0)
}

/// A block device's size in bytes (`BLKGETSIZE64`).
pub fn block_device_size(file: &File) -> io::Result<u64> {
    block_ioctl(file, BLKGETSIZE64)
}

/// A block device's logical and physical sector sizes (`BLKSSZGET`, `BLKPBSZGET`).
pub fn block_sector_sizes(file: &File) -> io::Result<(u64, u64)> {
    let logical: libc::c_int = block_ioctl(file, BLKSSZGET)?;
    let physical: libc::c_uint = block_ioctl(file, 0x127b)?;
    Ok((u64::try_from(logical).unwrap_or(0), u64::from(physical)))
}

/// A block device's I/O topology: minimum and optimal I/O sizes and alignment offset
/// (`BLKIOMIN`, `BLKIOOPT`, `BLKALIGNOFF`; -1: unknown). Fails where the device has
/// none; an optimal size the kernel does not give is the minimum one.
pub fn block_io_topology(file: &File) -> io::Result<(u64, u64, i64)> {
    let min: libc::c_uint = block_ioctl(file, 0x1278)?;
    let opt: libc::c_uint = block_ioctl(file, 0x1279).unwrap_or(min);
    let off: libc::c_int = block_ioctl(file, 0x127a).unwrap_or(0);
    Ok((u64::from(min), u64::from(opt), i64::from(off)))
}

impl DataDevice {
    /// Opens read-write, exclusively for block devices (O_EXCL: fails if mounted
    /// or held), with O_DIRECT unless `buffered` or the kernel refuses it.
    ///
    /// Also locks the bytes it reaches for as long as the `DataDevice` lives (an image
    /// file, or a loop device's backing file: [`crate::lock::DataLock`]), so a second
    /// run on the same bytes through any path (which O_EXCL does not cover) fails
    /// here, before reading or writing anything, instead of walking beside the first;
    /// and refuses an image file a loop device over which is in use. The kernel drops
    /// the lock when the holder dies, so a crash leaves none behind.
    pub fn open(path: &Path, buffered: bool) -> io::Result<DataDevice> {
        let meta = std::fs::metadata(path)?;
        let is_block = meta.file_type().is_block_device();
        let mut flags = 0;
        if is_block {
            flags |= libc::O_EXCL;
        }
        let open = |extra: i32| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(flags | extra)
                .open(path)
        };
        let (file, direct) = if buffered {
            (open(0).map_err(open_error)?, false)
        } else {
            match open(libc::O_DIRECT) {
                Ok(f) => (f, true),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    (open(0).map_err(open_error)?, false)
                }
                Err(e) => return Err(open_error(e)),
            }
        };
        if is_block && block_device_read_only(&file)? {
            // Opening a read-only block device for writing succeeds; every write fails.
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "is a read-only block device (a loop device attached with `losetup -r`, or set with `blockdev --setro`): make it writable (`blockdev --setrw`, or attach the loop device again without -r) and run again (nothing was written)",
            ));
        }
        // A sparse file under it (itself, or a loop device's) whose holes need more
        // room than its filesystem has: refused before anything is written (see
        // `space`: a loop device can lose part of a write to a full filesystem).
        if let Some(short) = crate::space::short_of_room(&file) {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                short.to_string(),
            ));
        }
        let (size, write_unit, lock) = if is_block {
            // The size and the logical sector size (the unit a power cut may tear at).
            let sz: u64 = block_ioctl(&file, BLKGETSIZE64)?;
            let ss: libc::c_int = block_ioctl(&file, BLKSSZGET)?;
            let unit = u64::try_from(ss).unwrap_or(512).max(512);
            if !sz.is_multiple_of(unit) {
                // A loop device with `--sector-size 4096` over a file that is not whole
                // 4096-byte blocks: the kernel counts the partial last sector, and every
                // read or write of it fails.
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "is {sz} bytes, not a whole number of its {unit}-byte logical sectors: its partial last sector can be neither read nor written (a loop device attached with --sector-size {unit} over a file that is not whole {unit}-byte blocks); attach it with 512-byte sectors, or give the file a size that is (nothing was written)"
                    ),
                ));
            }
            let lock = crate::lock::DataLock::claim(&file, sz)?;
            (sz, u64::try_from(ss).unwrap_or(512).max(512), lock)
        } else {
            let lock = crate::lock::DataLock::claim(&file, meta.len())?;
            (meta.len(), 4096, lock)
        };
        let tail = (direct && !size.is_multiple_of(IO_ALIGN as u64))
            .then(|| {
                // Through /proc/self/fd: the very inode opened above, without O_EXCL
                // (which a second open of a claimed block device would fail).
                let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(format!("/proc/self/fd/{fd}"))
            })
            .transpose()
            .map_err(open_error)?;
        Ok(DataDevice {
            path: path.to_path_buf(),
            file,
            direct,
            size,
            is_block,
            write_unit,
            tail,
            _lock: lock,
        })
    }

    /// A request of `len` bytes at `off` that reaches past the last whole 4096-byte
    /// block, where only [`DataDevice::tail`] can go: how many of its bytes come
    /// before that point, and the tail's descriptor. None: it stays below.
    fn tail_split(&self, off: u64, len: usize) -> Option<(usize, &File)> {
        let t = self.tail.as_ref()?;
        let cut = self.size / IO_ALIGN as u64 * IO_ALIGN as u64;
        (off + len as u64 > cut).then(|| (cut.saturating_sub(off).min(len as u64) as usize, t))
    }
    pub fn is_block_device(&self) -> bool {
        self.is_block
    }
}

impl Disk for DataDevice {
    fn direct(&self) -> bool {
        self.direct
    }
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(std::os::fd::AsRawFd::as_raw_fd(&self.file))
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        if let Some((at, t)) = self.tail_split(off, buf.len()) {
            let (head, rest) = buf.split_at_mut(at);
            self.read_direct(off, head)?;
            return t.read_exact_at(rest, off + at as u64);
        }
        self.read_direct(off, buf)
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        if let Some((at, t)) = self.tail_split(off, buf.len()) {
            let (head, rest) = buf.split_at(at);
            self.write_direct(off, head)?;
            return t.write_all_at(rest, off + at as u64);
        }
        self.write_direct(off, buf)
    }
    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.size)
    }
    fn write_unit(&self) -> u64 {
        self.write_unit
    }
    /// An image file: a `flock` on it, as cryptsetup takes. A block device:
    /// cryptsetup's lock file for it, `/run/cryptsetup/L_<major>:<minor>`.
    fn lock_metadata(&self, exclusive: bool) -> io::Result<Option<luksify_luks::io::MetadataLock>> {
        let rdev = self
            .is_block
            .then(|| {
                self.file
                    .metadata()
                    .map(|m| std::os::unix::fs::MetadataExt::rdev(&m))
            })
            .transpose()?;
        crate::lock::metadata_lock_for(&self.file, rdev, exclusive)
    }
}

impl DataDevice {
    /// A read below the last whole 4096-byte block (or anywhere without O_DIRECT).
    fn read_direct(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if self.direct && !aligned(off, buf.as_ptr(), buf.len()) {
            // Small unaligned metadata reads: bounce through an aligned buffer.
            let (b, a) = self.aligned_around(off, buf.len())?;
            let s = (off - a) as usize;
            buf.copy_from_slice(&b[s..s + buf.len()]);
            return Ok(());
        }
        self.file.read_exact_at(buf, off)
    }
    /// A write below the last whole 4096-byte block (or anywhere without O_DIRECT).
    fn write_direct(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if self.direct && !aligned(off, buf.as_ptr(), buf.len()) {
            let (mut b, a) = self.aligned_around(off, buf.len())?;
            let s = (off - a) as usize;
            b[s..s + buf.len()].copy_from_slice(buf);
            return self.file.write_all_at(&b, a);
        }
        self.file.write_all_at(buf, off)
    }
    /// The whole 4096-byte blocks around `len` bytes at `off`, read with O_DIRECT,
    /// and where they start.
    fn aligned_around(&self, off: u64, len: usize) -> io::Result<(AlignedBuf, u64)> {
        let a = off / IO_ALIGN as u64 * IO_ALIGN as u64;
        let end = (off + len as u64).div_ceil(IO_ALIGN as u64) * IO_ALIGN as u64;
        let mut b = AlignedBuf::new((end - a) as usize);
        self.file.read_exact_at(&mut b, a)?;
        Ok((b, a))
    }
}

/// Reserves the first `size` bytes of `f` (`posix_fallocate`), so that a header file
/// on a filesystem without room fails here, before anything else is written.
pub fn reserve(f: &File, size: u64) -> io::Result<()> {
    let want = libc::off_t::try_from(size)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "size beyond off_t"))?;
    // SAFETY: posix_fallocate on a valid open descriptor; no memory is passed.
    let r = unsafe { libc::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(f), 0, want) };
    match r {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Why the data could not be opened read-write, in words, where the cause is known
/// (other errors pass through, for the caller to give context).
fn open_error(e: io::Error) -> io::Error {
    let msg = match e.raw_os_error() {
        Some(libc::EROFS) => {
            "is on a read-only filesystem or device: remount it read-write and run again (nothing was written)"
        }
        Some(libc::EACCES) | Some(libc::EPERM) => {
            "cannot be opened for writing: run as root, and check its mode and attributes (`lsattr`: the immutable `i` attribute forbids writes; `chattr -i` lifts it) (nothing was written)"
        }
        Some(libc::EBUSY) => {
            "is in use (mounted, mapped, or opened exclusively by another program, e.g. another luksify run): unmount or close it and run again (nothing was written)"
        }
        _ => return e,
    };
    io::Error::new(e.kind(), msg)
}

fn aligned(off: u64, ptr: *const u8, len: usize) -> bool {
    off.is_multiple_of(IO_ALIGN as u64)
        && (ptr as usize).is_multiple_of(IO_ALIGN)
        && len.is_multiple_of(IO_ALIGN)
}

/// The size of `d` now: through its descriptor when it has one (a [`DataDevice`] keeps
/// the size it was opened with), else as `d` tells it.
pub(crate) fn live_size<D: Disk + ?Sized>(d: &D) -> io::Result<u64> {
    use std::os::fd::FromRawFd;
    match d.raw_fd() {
        Some(fd) => {
            // SAFETY: `fd` is `d`'s open descriptor for the whole call; ManuallyDrop
            // keeps this borrowed `File` from closing it.
            let f = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
            Disk::size(&*f)
        }
        None => d.size(),
    }
}
