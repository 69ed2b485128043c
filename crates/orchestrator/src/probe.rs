//! Read-only probes of the system and of a device's first bytes: filesystem type,
//! LVM labels, LUKS headers, swap, SELinux, memory. Nothing here writes.

use crate::mountinfo::DevNum;
use serde::Serialize;
use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// A filesystem or other content recognised by its magic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FsInfo {
    /// `ext4`, `xfs`, `btrfs`, `vfat`, `swap`, `crypto_LUKS`, `LVM2_member`, ... or `unknown`.
    pub fs_type: String,
    /// Size of the filesystem in bytes when the superblock tells it.
    pub fs_bytes: Option<u64>,
    /// Free bytes according to the superblock (ext only).
    pub free_bytes: Option<u64>,
    pub block_size: Option<u32>,
    /// Smallest I/O unit the filesystem writes (ext: its block size; xfs: its sector
    /// size). The encryption sector must not be larger, or the kernel refuses to mount.
    pub min_io: Option<u32>,
    /// How it was recognised: `superblock` or `blkid`.
    pub source: String,
    /// Its journal (ext3/4) or log (xfs) lives on another device, which encrypting this
    /// one leaves plaintext.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub external_log: bool,
    /// ext3/4 whose journal holds transactions not yet replayed (`needs_recovery`): set
    /// while it is mounted, and after a crash or a `noload` mount until the next mount or
    /// `e2fsck` replays them. Read while unmounted, the filesystem is not what it will be.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub needs_recovery: bool,
    /// ext2/3/4 whose superblock records errors (`s_state` has EXT2_ERROR_FS: the
    /// kernel or e2fsck found damage, and no e2fsck has repaired it since).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub errors: bool,
}

impl FsInfo {
    /// Whether resize2fs-style offline shrinking exists for it.
    pub fn can_shrink(&self) -> bool {
        matches!(self.fs_type.as_str(), "ext2" | "ext3" | "ext4")
    }
}

/// Reads enough of the start of `dev` to recognise it; `blkid` is the fallback.
/// The sysfs directory of the whole disk for block device directory `sys`
/// (`/sys/class/block/NAME` or `/sys/dev/block/MAJ:MIN`): a partition's is the
/// directory above it; a disk's, its own.
pub fn whole_disk_dir(sys: &Path) -> Option<PathBuf> {
    let real = std::fs::canonicalize(sys).ok()?;
    match real.join("partition").exists() {
        true => real.parent().map(Path::to_path_buf),
        false => Some(real),
    }
}

/// How [`detect_fs`] names a whole disk's partition table: `gpt partition table`.
pub const PARTITION_TABLE: &str = " partition table";

/// The partitions the kernel knows on whole disk `dev` (`/dev/loop0p1`, ...), sorted.
pub fn partitions(dev: &Path) -> Vec<PathBuf> {
    let Some(name) = dev.file_name() else {
        return Vec::new();
    };
    let sys = Path::new("/sys/class/block").join(name);
    let mut v: Vec<PathBuf> = std::fs::read_dir(sys)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().join("partition").exists())
                .map(|e| Path::new("/dev").join(e.file_name()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

pub fn detect_fs(dev: &Path) -> std::io::Result<FsInfo> {
    let f = File::open(dev)?;
    let mut head = vec![0u8; 70 * 1024];
    let n = read_upto(&f, 0, &mut head)?;
    head.truncate(n);
    if let Some(info) = detect_fs_bytes(&head) {
        return Ok(info);
    }
    let blkid = |tag: &str| match crate::tool("blkid")
        .args(["-p", "-o", "value", "-s", tag])
        .arg(dev)
        .output()
    {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => String::new(),
    };
    let mut fs_type = blkid("TYPE");
    if fs_type.is_empty() {
        // A whole disk's partition table (blkid's PTTYPE: gpt, dos): not "no filesystem".
        fs_type = match blkid("PTTYPE") {
            t if t.is_empty() => t,
            t => format!("{t}{PARTITION_TABLE}"),
        };
    }
    Ok(FsInfo {
        fs_type: if fs_type.is_empty() {
            "unknown".into()
        } else {
            fs_type
        },
        fs_bytes: None,
        free_bytes: None,
        block_size: None,
        min_io: None,
        source: "blkid".into(),
        external_log: false,
        needs_recovery: false,
        errors: false,
    })
}

fn read_upto(f: &File, off: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// Recognises content from its first bytes (at least 68 KiB for btrfs).
pub fn detect_fs_bytes(head: &[u8]) -> Option<FsInfo> {
    let info = |t: &str, fs_bytes, free_bytes, block_size: Option<u32>| FsInfo {
        fs_type: t.to_string(),
        fs_bytes,
        free_bytes,
        block_size,
        min_io: block_size,
        source: "superblock".into(),
        external_log: false,
        needs_recovery: false,
        errors: false,
    };
    if head.len() >= 6 && (&head[..6] == b"LUKS\xba\xbe") {
        return Some(info("crypto_LUKS", None, None, None));
    }
    if lvm_label(head) {
        return Some(info("LVM2_member", None, None, None));
    }
    // ext2/3/4: superblock at 1024, magic 0xEF53 at +56.
    if head.len() >= 2048 && le16(head, 1024 + 56) == 0xEF53 {
        let sb = &head[1024..2048];
        let log_bs = le32(sb, 24);
        if log_bs <= 6 {
            let bs = 1024u32 << log_bs;
            let compat = le32(sb, 0x5C);
            let incompat = le32(sb, 0x60);
            let ro_compat = le32(sb, 0x64);
            // An external journal device (mke2fs -O journal_dev): blkid's `jbd`.
            if incompat & 0x8 != 0 {
                return Some(info("jbd", None, None, Some(bs)));
            }
            let is64 = incompat & 0x80 != 0;
            let blocks = le32(sb, 4) as u64
                | if is64 {
                    (le32(sb, 0x150) as u64) << 32
                } else {
                    0
                };
            let free = le32(sb, 0x0C) as u64
                | if is64 {
                    (le32(sb, 0x158) as u64) << 32
                } else {
                    0
                };
            // ext4 when it uses any feature ext3 lacks (extents, 64bit, flex_bg, huge_file, ...).
            let ext4 = incompat & !(0x2 | 0x4 | 0x10) != 0 || ro_compat & !0x7 != 0;
            let t = if ext4 {
                "ext4"
            } else if compat & 0x4 != 0 {
                "ext3"
            } else {
                "ext2"
            };
            let mut i = info(
                t,
                Some(blocks * bs as u64),
                Some(free * bs as u64),
                Some(bs),
            );
            // has_journal with no journal inode: the journal is on the device its UUID
            // (s_journal_uuid) names.
            i.external_log = compat & 0x4 != 0 && le32(sb, 0xE0) == 0;
            i.needs_recovery = compat & 0x4 != 0 && incompat & 0x4 != 0;
            i.errors = le16(sb, 0x3A) & 0x2 != 0;
            return Some(i);
        }
    }
    if head.len() >= 16 && &head[..4] == b"XFSB" {
        let bs = be32(head, 4);
        let blocks = be64(head, 8);
        let mut i = info("xfs", Some(blocks * bs as u64), None, Some(bs));
        i.min_io = Some(u16::from_be_bytes([head[102], head[103]]) as u32);
        // sb_logstart 0: the log is on another device (mkfs.xfs -l logdev=).
        i.external_log = head.len() >= 56 && be64(head, 48) == 0;
        return Some(i);
    }
    if head.len() >= 0x10048 && &head[0x10040..0x10048] == b"_BHRfS_M" {
        return Some(info("btrfs", None, None, None));
    }
    for page in [4096usize, 8192, 16384, 65536] {
        if head.len() >= page && &head[page - 10..page] == b"SWAPSPACE2" {
            // Its last usable page (little-endian, as mkswap on x86 writes it) says how
            // far it reaches, as the walker reads it.
            let last = u32::from_le_bytes(head[1028..1032].try_into().expect("4 bytes")) as u64;
            let bytes = (last + 1).saturating_mul(page as u64);
            return Some(info("swap", Some(bytes), None, Some(page as u32)));
        }
    }
    if head.len() >= 512 && head[510] == 0x55 && head[511] == 0xAA {
        if &head[0x52..0x57] == b"FAT32" || &head[0x36..0x39] == b"FAT" {
            return Some(info("vfat", None, None, None));
        }
        if &head[3..11] == b"NTFS    " {
            return Some(info("ntfs", None, None, None));
        }
    }
    None
}

/// LVM2 physical volume label: "LABELONE" in one of the first four 512-byte
/// sectors (sector 1 by default) with type "LVM2 001" at +24.
pub fn lvm_label(head: &[u8]) -> bool {
    (0..4).any(|s| {
        let o = s * 512;
        head.len() >= o + 32
            && &head[o..o + 8] == b"LABELONE"
            && &head[o + 24..o + 32] == b"LVM2 001"
    })
}

/// The device-mapper UUID of a dm device (`LVM-...` for logical volumes, `CRYPT-...`
/// for dm-crypt), from sysfs.
pub fn dm_uuid(dev: DevNum) -> Option<String> {
    let p = format!("/sys/dev/block/{dev}/dm/uuid");
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

/// `/sys/dev/block/M:m/holders/*`: devices stacked on this one (dm, md).
pub fn sysfs_holders(dev: DevNum) -> Vec<String> {
    std::fs::read_dir(format!("/sys/dev/block/{dev}/holders"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Block device node for a device number (`/dev/NAME` from sysfs uevent).
pub fn dev_node(dev: DevNum) -> Option<PathBuf> {
    let uevent = std::fs::read_to_string(format!("/sys/dev/block/{dev}/uevent")).ok()?;
    let name = uevent.lines().find_map(|l| l.strip_prefix("DEVNAME="))?;
    let p = PathBuf::from("/dev").join(name);
    let md = std::fs::metadata(&p).ok()?;
    (md.file_type().is_block_device() && DevNum::from_raw(md.rdev()) == dev).then_some(p)
}

/// Whether the kernel shows block device `p` in use without opening it: a mounted ext4
/// or xfs registers under its kernel name in /sys/fs (in whatever mount namespace it is
/// mounted, one no process is in included), a btrfs lists it among its devices, and a
/// device-mapper, md or bcache device on it is a holder.
pub fn in_use_per_sysfs(p: &Path) -> bool {
    let Some(dev) = block_dev_num(p) else {
        return false;
    };
    if !sysfs_holders(dev).is_empty() {
        return true;
    }
    let Some(name) = std::fs::canonicalize(format!("/sys/dev/block/{dev}"))
        .ok()
        .and_then(|link| Some(link.file_name()?.to_string_lossy().into_owned()))
    else {
        return false;
    };
    let sys = Path::new("/sys");
    sys.join("fs/ext4").join(&name).exists()
        || sys.join("fs/xfs").join(&name).exists()
        || std::fs::read_dir(sys.join("fs/btrfs")).is_ok_and(|d| {
            d.flatten()
                .any(|fs| fs.path().join("devices").join(&name).exists())
        })
}

/// Whether another opener holds block device `p` exclusively (a mount, a mapping, a
/// walk): an `O_EXCL` open of it fails with EBUSY. False for anything else.
pub fn held_exclusively(p: &Path) -> bool {
    block_dev_num(p).is_some() && luksify_walker::overlap::held_exclusively(p)
}

/// Device number of a block device node, or None when `p` is not one.
pub fn block_dev_num(p: &Path) -> Option<DevNum> {
    let md = std::fs::metadata(p).ok()?;
    md.file_type()
        .is_block_device()
        .then(|| DevNum::from_raw(md.rdev()))
}

/// Size in bytes of a block device (or file). A block device's comes from sysfs, with
/// no open and no lseek: lseek locks the device's inode, and waited there for good behind
/// a reader stuck on a stopped userspace mapping's view (found in CI).
pub fn device_size(p: &Path) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    if let Some(num) = block_dev_num(p) {
        let sectors = std::fs::read_to_string(format!("/sys/dev/block/{num}/size"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        if let Some(n) = sectors {
            return Ok(n * 512);
        }
    }
    let mut f = File::open(p)?;
    f.seek(SeekFrom::End(0))
}

/// The logical block size of block device `p` (a partition's is its disk's); 512 for
/// a regular file or when sysfs does not tell.
pub fn logical_block_size(p: &Path) -> u32 {
    block_dev_num(p)
        .and_then(|num| whole_disk_dir(Path::new(&format!("/sys/dev/block/{num}"))))
        .and_then(|d| std::fs::read_to_string(d.join("queue/logical_block_size")).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(512)
}

/// Block devices whose contents may be read to look for a volume: whole disks,
/// partitions, and loop devices with a backing file (an unbound one holds nothing),
/// sorted. Left out: RAM disks, optical and floppy drives, and luksify's own userspace
/// views, whose every read waits on their daemon (a stopped one hangs the reader, and
/// the other processes that then touch the device, for good).
pub fn scannable_block_devices() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/sys/class/block") else {
        return out;
    };
    let all = crate::mountinfo::read().unwrap_or_default();
    for e in dir.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        // A loop device's partition (`losetup -P`) has its disk's backing file.
        let disk = whole_disk_dir(&e.path()).unwrap_or_else(|| e.path());
        if n.starts_with("loop") && !disk.join("loop/backing_file").exists() {
            continue;
        }
        if ["ram", "zram", "sr", "fd"].iter().any(|p| n.starts_with(p)) {
            continue;
        }
        let dev = PathBuf::from("/dev").join(&n);
        match block_dev_num(&dev) {
            Some(num) if crate::check::luksify_view_of(num, &all).is_none() => out.push(dev),
            _ => {}
        }
    }
    out.sort();
    out
}

/// `blkid -c /dev/null -o device -t TAG` over [`scannable_block_devices`] (blkid alone
/// reads every block device, luksify's views too): the devices that carry `tag`
/// (`UUID=...`, `LABEL=...`).
pub fn devices_with_tag(tag: &str) -> Vec<PathBuf> {
    let devs = scannable_block_devices();
    // With no device named, blkid would read them all.
    if devs.is_empty() {
        return Vec::new();
    }
    let Ok(out) = crate::tool("blkid")
        .args(["-c", "/dev/null", "-o", "device", "-t", tag])
        .args(&devs)
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// One active swap area from /proc/swaps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SwapArea {
    pub path: PathBuf,
    /// `partition` or `file`.
    pub kind: String,
}

pub fn parse_swaps(text: &str) -> Vec<SwapArea> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some(SwapArea {
                path: PathBuf::from(crate::mountinfo::unescape(it.next()?)),
                kind: it.next()?.to_string(),
            })
        })
        .collect()
}

/// Swap areas that live on `dev`: the partition itself, or swap files on its filesystem.
pub fn swaps_on(dev: DevNum, fs_devs: &[DevNum]) -> Vec<SwapArea> {
    let text = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    parse_swaps(&text)
        .into_iter()
        .filter(|s| match std::fs::metadata(&s.path) {
            Ok(md) if md.file_type().is_block_device() => DevNum::from_raw(md.rdev()) == dev,
            Ok(md) => fs_devs.contains(&DevNum::from_raw(md.dev())),
            Err(_) => false,
        })
        .collect()
}

/// SELinux mode: `enforcing`, `permissive` or `disabled`.
pub fn selinux_mode() -> String {
    match std::fs::read_to_string("/sys/fs/selinux/enforce") {
        Ok(s) if s.trim() == "1" => "enforcing".into(),
        Ok(_) => "permissive".into(),
        Err(_) => "disabled".into(),
    }
}

/// MemAvailable in bytes from /proc/meminfo.
pub fn mem_available() -> Option<u64> {
    parse_meminfo(
        &std::fs::read_to_string("/proc/meminfo").ok()?,
        "MemAvailable",
    )
}

pub fn parse_meminfo(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        let kib: u64 = rest.split_whitespace().next()?.parse().ok()?;
        Some(kib * 1024)
    })
}

/// `resize2fs -P`: the smallest size in bytes an ext2/3/4 filesystem can be shrunk to
/// (it reads the live allocation, so it is right for a mounted filesystem too, where
/// the superblock's free counts are stale). None when resize2fs is missing or says
/// nothing parseable.
pub fn ext_min_bytes(dev: &Path, block_size: u32) -> Option<u64> {
    ext_min_bytes_or_why(dev, block_size).ok()
}

/// [`ext_min_bytes`], or what resize2fs said instead (its first line), so that a
/// shrink is never forced past its refusal ("Please run 'e2fsck -f' first").
pub fn ext_min_bytes_or_why(dev: &Path, block_size: u32) -> Result<u64, String> {
    let out = crate::tool("resize2fs")
        .arg("-P")
        .arg(dev)
        .output()
        .map_err(|e| format!("cannot run resize2fs: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let blocks = text
        .lines()
        .find_map(|l| l.strip_prefix("Estimated minimum size of the filesystem:"))
        .and_then(|b| b.trim().parse::<u64>().ok());
    match blocks {
        Some(b) if out.status.success() => Ok(b * block_size as u64),
        _ => {
            let all = String::from_utf8_lossy(&out.stderr).to_string() + &text;
            Err(all
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with("resize2fs "))
                .unwrap_or("no estimate")
                .to_string())
        }
    }
}

/// Free bytes of the filesystem that holds `mount_point` (statvfs `f_bfree`, reserved
/// blocks included: resize2fs, and root's writes, can use them).
pub fn statvfs_free(mount_point: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(mount_point.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and statvfs fills the struct it is given.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    Some(st.f_bfree * st.f_frsize)
}

/// Whether `tool` is an executable file in a directory of PATH.
pub fn on_path(tool: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            std::fs::metadata(d.join(tool))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// The fewest open files luksify and its mapping daemon work with (a trial's `ulimit
/// -n 11` stopped the daemon after the walk; 16 worked).
pub const MIN_OPEN_FILES: u64 = 16;

/// The soft limit on open files (RLIMIT_NOFILE), if known.
pub fn open_files_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct it is given.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0).then_some(r.rlim_cur)
}

/// "tmpfs" or "ramfs" when the filesystem that holds `path` (or would, once it
/// exists: its nearest existing ancestor) lives in memory and is gone after a reboot.
pub fn volatile_fs(path: &Path) -> Option<&'static str> {
    use std::os::unix::ffi::OsStrExt;
    let existing = path.ancestors().find(|a| a.exists())?;
    let c = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and statfs fills the struct it is given.
    if unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statfs returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    match st.f_type as i64 {
        0x0102_1994 => Some("tmpfs"),
        0x8584_58f6 => Some("ramfs"),
        _ => None,
    }
}

/// The type and UUID blkid reads on `dev` (low-level probe, no cache): a filesystem's,
/// or a LUKS header's. `None` where it finds none (ciphertext, a blank or torn head).
pub fn type_and_uuid(dev: &Path) -> Option<(String, String)> {
    let out = crate::tool("blkid")
        .args(["-p", "-o", "export"])
        .arg(dev)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let tag = |t: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(t)?.strip_prefix('='))
            .map(str::to_string)
    };
    Some((tag("TYPE")?, tag("UUID")?))
}

/// The filesystem label blkid reads on `dev` (probed afresh), if any.
pub fn fs_label(dev: &Path) -> Option<String> {
    let out = crate::tool("blkid")
        .args(["-p", "-s", "LABEL", "-o", "value"])
        .arg(dev)
        .output()
        .ok()?;
    let label = String::from_utf8_lossy(&out.stdout)
        .trim_end_matches('\n')
        .to_string();
    (out.status.success() && !label.is_empty()).then_some(label)
}

/// Every block device blkid finds carrying `uuid` (probed afresh, not from its cache).
pub fn devices_with_uuid(uuid: &str) -> Vec<PathBuf> {
    devices_with_tag(&format!("UUID={uuid}"))
}

/// The md RAID superblock on a device of `size` bytes, if one is there: its metadata
/// version (`0.90`, `1.0`, `1.1`, `1.2`) and byte offset. Looked for at all four places
/// whatever else the device holds: a RAID1 leg with 0.90 or 1.0 metadata (at the end)
/// starts with the array's filesystem, which the superblock probes read first.
pub fn md_superblock(dev: &Path, size: u64) -> Option<(&'static str, u64)> {
    const MD_MAGIC: u32 = 0xa92b_4efc;
    let f = File::open(dev).ok()?;
    let at = |off: u64| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, off).ok()?;
        let magic = u32::from_le_bytes(b[..4].try_into().ok()?);
        let major = u32::from_le_bytes(b[4..].try_into().ok()?);
        (magic == MD_MAGIC).then_some(major)
    };
    let sectors = size / 512;
    let mut places = vec![("1.1", 0u64, 1u32), ("1.2", 4096, 1)];
    if sectors >= 16 {
        places.push(("1.0", ((sectors - 16) & !7) * 512, 1));
    }
    if sectors >= 256 {
        places.push(("0.90", ((sectors & !127) - 128) * 512, 0));
    }
    places
        .into_iter()
        .find(|&(_, off, major)| off + 8 <= size && at(off) == Some(major))
        .map(|(v, off, _)| (v, off))
}

/// A mount of the volume in another mount namespace (a container, `unshare -m`, a
/// systemd service with a private /tmp): one process of that namespace, and where the
/// volume is mounted there. Unmounting it here leaves its filesystem alive there, so it
/// cannot be opened exclusively and nothing may be written under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignMount {
    pub pid: u32,
    pub command: String,
    pub namespace: String,
    pub mount_point: PathBuf,
}

/// Mounts of any of `devs` in mount namespaces other than this process's own, but for
/// those that an unmount here takes away too. An unmount propagates through the parent
/// mount's peer group: a copy whose parent is a slave or peer (`master:G`, `shared:G`)
/// of a group in `ours` (the `shared:G` groups of the parents of this namespace's mounts
/// of the volume) goes with ours, as in systemd services' private namespaces under a
/// shared `/`.
pub fn foreign_namespace_mounts(devs: &[DevNum], ours: &[String]) -> Vec<ForeignMount> {
    foreign_namespace_mounts_where(|m| devs.contains(&m.dev), ours)
}

/// [`foreign_namespace_mounts`] of the mounts `pick` takes.
pub fn foreign_namespace_mounts_where(
    pick: impl Fn(&crate::mountinfo::Mount) -> bool,
    ours: &[String],
) -> Vec<ForeignMount> {
    let own = std::fs::read_link("/proc/self/ns/mnt").ok();
    let mut seen = Vec::new();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    let mut pids: Vec<u32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/mnt")) else {
            continue;
        };
        if Some(&ns) == own.as_ref() || seen.contains(&ns) {
            continue;
        }
        seen.push(ns.clone());
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")) else {
            continue;
        };
        let theirs = crate::mountinfo::parse(&text);
        for m in &theirs {
            let parent = theirs.iter().find(|p| p.id == m.parent_id);
            let follows = parent.into_iter().flat_map(|p| &p.propagation).any(|t| {
                let group = t
                    .strip_prefix("master:")
                    .or_else(|| t.strip_prefix("shared:"));
                group.is_some_and(|g| ours.iter().any(|o| o == g))
            });
            if pick(m) && !follows {
                out.push(ForeignMount {
                    pid,
                    command: std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .map(|c| c.trim_end().to_string())
                        .unwrap_or_default(),
                    namespace: ns.to_string_lossy().into_owned(),
                    mount_point: m.mount_point.clone(),
                });
            }
        }
    }
    out
}

/// Loop devices whose backing file lives on one of `fs_devs` (a filesystem of the
/// volume): `(loop device, backing file)`. Such a loop device keeps the filesystem busy
/// with no process to name ("target is busy").
pub fn loops_backed_on(
    all: &[crate::mountinfo::Mount],
    fs_devs: &[DevNum],
) -> Vec<(PathBuf, PathBuf)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        let backing = PathBuf::from(b.trim_end_matches('\n'));
        // By its path here, else by the file the kernel holds: a loop device attached
        // in another mount namespace shows a path that names nothing here, and passed
        // `check` (a trial).
        let on_volume = dev_of_path(all, &backing).is_some_and(|d| fs_devs.contains(&d))
            || (!fuse_backed_loop(&name, all)
                && luksify_walker::overlap::loop_backing_file(&name)
                    .is_some_and(|(dev, _)| fs_devs.contains(&DevNum::from_raw(dev))));
        if on_volume {
            out.push((PathBuf::from(format!("/dev/{name}")), backing));
        }
    }
    out.sort();
    out
}

/// Another block device over some of a volume's bytes, and how it is in use.
#[derive(Debug, Clone)]
pub struct OtherPathInUse {
    pub node: PathBuf,
    /// How it reaches the bytes ("the whole disk it is a partition of").
    pub relation: &'static str,
    /// How it is used ("is mounted at /mnt/x", "is open in pid 12 (qemu)").
    pub how: String,
    pub fix: String,
}

/// The other block devices over the bytes of `dev` ([`luksify_walker::overlap`]) that
/// something uses: mounted (here or in another mount namespace), open in a process,
/// held by a device-mapper or RAID device, or (another path than its disk or
/// partitions) held exclusively. The disk a partition is on and its other partitions'
/// bytes do not meet it; `O_EXCL` is not asked of its disk or partitions, which the
/// kernel ties to its own claims. Without `exclusive_probe` (the candidate listing) no
/// device is opened `O_EXCL`: for that instant the probe would hold it, and another
/// run's mount of it would fail.
pub fn other_paths_in_use(
    dev: DevNum,
    all: &[crate::mountinfo::Mount],
    exclusive_probe: bool,
) -> Vec<OtherPathInUse> {
    let overlaps = luksify_walker::overlap::overlapping(dev.raw(), &|n| fuse_backed_loop(n, all));
    let mut out = Vec::new();
    if overlaps.is_empty() {
        return out;
    }
    let mut targets = crate::holders::Targets::default();
    targets
        .block_devices
        .extend(overlaps.iter().map(|o| DevNum::from_raw(o.rdev)));
    let holders = crate::holders::scan_settled(&targets, false);
    for o in &overlaps {
        let node = o.node();
        let num = DevNum::from_raw(o.rdev);
        let shown = node.display().to_string();
        let relation = o.relation.describe();
        let mut add = |how: String, fix: String| {
            out.push(OtherPathInUse {
                node: node.clone(),
                relation,
                how,
                fix,
            })
        };
        if let Some(m) = all.iter().find(|m| m.dev == num) {
            add(
                format!("is mounted at {}", m.mount_point.display()),
                format!(
                    "unmount it (umount {}) and keep it unmounted while luksify runs",
                    m.mount_point.display()
                ),
            );
            continue;
        }
        if let Some(f) = foreign_namespace_mounts(&[num], &[]).first() {
            add(
                format!(
                    "is mounted at {} in another mount namespace ({}, pid {} {})",
                    f.mount_point.display(),
                    f.namespace,
                    f.pid,
                    f.command
                ),
                format!(
                    "unmount it there (nsenter -t {} -m umount {})",
                    f.pid,
                    f.mount_point.display()
                ),
            );
            continue;
        }
        let users: Vec<&crate::holders::Holder> = holders
            .iter()
            .filter(|h| {
                std::fs::metadata(&h.path).is_ok_and(|m| {
                    DevNum::from_raw(std::os::unix::fs::MetadataExt::rdev(&m)) == num
                }) || h.path == node
            })
            .collect();
        if let Some(h) = users.first() {
            add(
                format!("is open in pid {} ({})", h.pid, h.command),
                format!(
                    "stop pid {} or let it close {shown} (luksify stops no user of another device)",
                    h.pid
                ),
            );
            continue;
        }
        let sys_holders = sysfs_holders(num);
        if !sys_holders.is_empty() {
            add(
                format!("is held by {}", sys_holders.join(", ")),
                format!(
                    "stop what is built on it (ls /sys/class/block/{}/holders)",
                    o.name
                ),
            );
            continue;
        }
        if exclusive_probe && o.probe_exclusive() && held_exclusively(&node) {
            add(
                "is in use (held exclusively: a mount, a mapping, a run)".into(),
                format!("find what uses it (`grep {num} /proc/*/mountinfo`, `ls /sys/class/block/{}/holders`), stop it, and detach the loop device (losetup -d)", o.name),
            );
        }
    }
    out
}

/// Whether loop device `name`'s backing file sits on a FUSE mount here (a luksify
/// view among them): asking the kernel about it stats that file, which waits on the
/// daemon.
pub fn fuse_backed_loop(name: &str, all: &[crate::mountinfo::Mount]) -> bool {
    let Ok(b) = std::fs::read_to_string(format!("/sys/class/block/{name}/loop/backing_file"))
    else {
        return false;
    };
    let backing = Path::new(b.trim_end_matches('\n'));
    all.iter()
        .filter(|m| backing.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.components().count())
        .is_some_and(|m| m.fs_type.starts_with("fuse"))
}

/// The filesystem `path` is on, from the mount table alone (the deepest mount point
/// above it): never a stat, which would hang on a stopped FUSE daemon's file (a
/// luksify mapping's `volume` is one, and loop devices are backed by it).
fn dev_of_path(all: &[crate::mountinfo::Mount], path: &Path) -> Option<DevNum> {
    all.iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.components().count())
        .map(|m| m.dev)
}

/// Overlay mounts with a layer (lowerdir, upperdir, workdir) on one of `fs_devs`:
/// `(overlay mount point, layer directory)`. An overlay keeps the volume's filesystem
/// alive after the volume's own mount comes off.
pub fn overlays_on(all: &[crate::mountinfo::Mount], fs_devs: &[DevNum]) -> Vec<(PathBuf, PathBuf)> {
    let mut out = Vec::new();
    for m in all.iter().filter(|m| m.fs_type == "overlay") {
        for opt in m.super_options.split(',') {
            let Some((key, value)) = opt.split_once('=') else {
                continue;
            };
            if !["lowerdir", "upperdir", "workdir"].contains(&key) {
                continue;
            }
            for dir in value.split(':').filter(|d| !d.is_empty()) {
                let dir = PathBuf::from(crate::mountinfo::unescape(dir));
                if dev_of_path(all, &dir).is_some_and(|d| fs_devs.contains(&d)) {
                    out.push((m.mount_point.clone(), dir));
                    break;
                }
            }
        }
    }
    out.dedup_by(|a, b| a.0 == b.0);
    out
}

/// The limits on memory this process can take now: `(bytes, what sets it, what
/// luksify itself needs of it beside a key derivation)`. The address-space limit
/// (`ulimit -v`) counts every reservation (thread stacks, malloc arenas: a trial's
/// run with 256 MiB of argon2 failed at the mapping under 520 MiB and passed under 650),
/// so luksify's own share of it is 512 MiB; of its cgroup's limit less what the cgroup
/// uses, or of the machine's available memory, 64 MiB (a walk peaks under 40 MiB; 128
/// MiB refused every argon2 under a trial's 48 MiB cgroup, where a run with PBKDF2 went
/// through).
pub fn memory_limits() -> Vec<(u64, &'static str, u64)> {
    let mut out = Vec::new();
    let mut take = |bytes: u64, what: &'static str| {
        let own = if what.starts_with("the address-space") {
            512 << 20
        } else {
            64 << 20
        };
        out.push((bytes, what, own));
    };
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given; nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut rl) } == 0
        && rl.rlim_cur != libc::RLIM_INFINITY
    {
        take(rl.rlim_cur, "the address-space limit (ulimit -v)");
    }
    if let Some(path) = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        })
    {
        let dir = Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
        let read = |f: &str| -> Option<u64> {
            std::fs::read_to_string(dir.join(f))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        if let (Some(max), Some(cur)) = (read("memory.max"), read("memory.current")) {
            take(
                max.saturating_sub(cur),
                "its cgroup's memory limit (memory.max)",
            );
        }
    }
    // cgroup v1 (a memory controller of its own): the limit over its whole hierarchy,
    // less what the cgroup uses beyond page cache it can drop. Ignored, a trial's
    // `disable` under a 100 MiB limit was killed by the OOM killer in its argon2.
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    if let Some(path) = cgroup_v1_memory_path(&cgroups) {
        let dir = Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
        let stat = std::fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
        let stat_of = |key: &str| {
            stat.lines().find_map(|l| {
                l.strip_prefix(key)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        };
        let usage = std::fs::read_to_string(dir.join("memory.usage_in_bytes"))
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok());
        let total = parse_meminfo(
            &std::fs::read_to_string("/proc/meminfo").unwrap_or_default(),
            "MemTotal",
        );
        if let (Some(limit), Some(usage)) = (stat_of("hierarchical_memory_limit"), usage) {
            // "No limit" is a huge number; a limit above the machine's memory is none.
            if total.is_some_and(|t| limit < t) {
                let cache = stat_of("total_inactive_file").unwrap_or(0);
                take(
                    limit.saturating_sub(usage.saturating_sub(cache)),
                    "its cgroup's memory limit (memory.limit_in_bytes)",
                );
            }
        }
    }
    if let Some(avail) = mem_available() {
        take(avail, "the machine's available memory");
    }
    out
}

/// The path of this process's cgroup v1 memory controller (`4:memory:/PATH` in
/// /proc/self/cgroup), if it has one.
pub fn cgroup_v1_memory_path(proc_self_cgroup: &str) -> Option<String> {
    proc_self_cgroup.lines().find_map(|l| {
        let mut it = l.splitn(3, ':');
        let (_, ctrls, path) = (it.next()?, it.next()?, it.next()?);
        ctrls
            .split(',')
            .any(|c| c == "memory")
            .then(|| path.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_ext4_xfs_luks_lvm_swap_from_synthetic_heads() {
        let mut h = vec![0u8; 70 * 1024];
        h[1024 + 56..1024 + 58].copy_from_slice(&0xEF53u16.to_le_bytes());
        h[1024 + 24..1024 + 28].copy_from_slice(&2u32.to_le_bytes()); // 4096
        h[1024 + 4..1024 + 8].copy_from_slice(&1000u32.to_le_bytes());
        h[1024 + 12..1024 + 16].copy_from_slice(&600u32.to_le_bytes());
        h[1024 + 0x60..1024 + 0x64].copy_from_slice(&0x40u32.to_le_bytes()); // extents
        let i = detect_fs_bytes(&h).unwrap();
        assert_eq!(i.fs_type, "ext4");
        assert_eq!(i.fs_bytes, Some(4096 * 1000));
        assert_eq!(i.free_bytes, Some(4096 * 600));
        assert!(i.can_shrink());
        h[1024 + 0x60..1024 + 0x64].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(detect_fs_bytes(&h).unwrap().fs_type, "ext2");

        let mut x = vec![0u8; 70 * 1024];
        x[..4].copy_from_slice(b"XFSB");
        x[4..8].copy_from_slice(&4096u32.to_be_bytes());
        x[8..16].copy_from_slice(&10u64.to_be_bytes());
        let i = detect_fs_bytes(&x).unwrap();
        assert_eq!((i.fs_type.as_str(), i.fs_bytes), ("xfs", Some(40960)));
        assert_eq!(i.min_io, Some(0), "sectsize field read from offset 102");
        assert!(!i.can_shrink());

        let mut l = vec![0u8; 4096];
        l[..6].copy_from_slice(b"LUKS\xba\xbe");
        assert_eq!(detect_fs_bytes(&l).unwrap().fs_type, "crypto_LUKS");

        let mut p = vec![0u8; 4096];
        p[512..520].copy_from_slice(b"LABELONE");
        p[536..544].copy_from_slice(b"LVM2 001");
        assert_eq!(detect_fs_bytes(&p).unwrap().fs_type, "LVM2_member");

        let mut s = vec![0u8; 8192];
        s[4086..4096].copy_from_slice(b"SWAPSPACE2");
        assert_eq!(detect_fs_bytes(&s).unwrap().fs_type, "swap");
        assert!(detect_fs_bytes(&vec![0u8; 8192]).is_none());
    }

    #[test]
    fn swaps_and_meminfo_parse() {
        let s = "Filename\tType\tSize\tUsed\tPriority\n/dev/sdb2 partition 100 0 -2\n/swap\\040file file 10 0 -3\n";
        let v = parse_swaps(s);
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].path, PathBuf::from("/swap file"));
        assert_eq!(
            parse_meminfo("MemTotal: 10 kB\nMemAvailable:   2048 kB\n", "MemAvailable"),
            Some(2048 * 1024)
        );
        assert!(mem_available().is_some());
        assert!(["enforcing", "permissive", "disabled"].contains(&selinux_mode().as_str()));
    }
}
