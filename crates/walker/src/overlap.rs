//! Which other block devices reach the same bytes as a device: its whole disk, its
//! partitions, and loop devices over the same file or over it (and their partitions).
//!
//! `O_EXCL` is per block device, and the kernel's claims tie a partition to its disk
//! only: a second loop device over the image behind `/dev/loop0`, or a loop device over
//! `/dev/loop0` itself, mounted, passed every check, and a run on `/dev/loop0`
//! encrypted the bytes under that live filesystem (a trial). Each device is placed on
//! what lies at the bottom of its stack, a whole disk or a regular file, as a byte
//! range ([`Extent`]); two devices overlap when their ranges on the same bottom meet.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What lies at the bottom of a device's stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bottom {
    /// A whole disk that is not a loop device (`rdev`).
    Disk(u64),
    /// A regular file behind loop devices (its `st_dev`, `st_ino`).
    File { dev: u64, ino: u64 },
}

/// Bytes `[start, end)` of `bottom`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub bottom: Bottom,
    pub start: u64,
    pub end: u64,
}

impl Extent {
    fn meets(&self, other: &Extent) -> bool {
        self.bottom == other.bottom && self.start < other.end && other.start < self.end
    }
}

/// How another device reaches a device's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    /// The whole disk the device is a partition of.
    WholeDisk,
    /// A partition of the device.
    Partition,
    /// Any other path to the bytes: a loop device over the same file, or over the
    /// device, its disk or a partition (or a partition of such a loop device).
    OtherPath,
}

impl Relation {
    pub fn describe(self) -> &'static str {
        match self {
            Relation::WholeDisk => "the whole disk it is a partition of",
            Relation::Partition => "a partition of it",
            Relation::OtherPath => "another device over the same bytes",
        }
    }
}

/// A block device that reaches some of the same bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlap {
    /// Its kernel name (`loop3`, `sdb1`).
    pub name: String,
    pub rdev: u64,
    pub relation: Relation,
    /// It is a disk with partitions: an `O_EXCL` open of it fails while any of them is
    /// claimed, one that does not meet these bytes included, so its own exclusive use
    /// says nothing (its partitions that meet them are listed themselves).
    pub has_partitions: bool,
}

impl Overlap {
    /// Whether an `O_EXCL` probe of it tells whether it is in use: another path than
    /// the device's own disk and partitions (which the kernel's claims already tie to
    /// it), and no disk whose partitions' claims would answer for it (trial V5: a
    /// partition mounted elsewhere on a second loop device's disk blocked this one).
    pub fn probe_exclusive(&self) -> bool {
        self.relation == Relation::OtherPath && !self.has_partitions
    }

    /// `/dev/NAME`.
    pub fn node(&self) -> PathBuf {
        PathBuf::from("/dev").join(&self.name)
    }
}

/// One block device as sysfs shows it.
#[derive(Debug, Clone)]
struct SysDev {
    name: String,
    rdev: u64,
    bytes: u64,
    /// For a partition: its disk's kernel name and its first byte there.
    partition_of: Option<(String, u64)>,
    /// Whether it is a bound loop device.
    is_loop: bool,
}

fn read_trim(p: &Path) -> Option<String> {
    Some(std::fs::read_to_string(p).ok()?.trim_end().to_string())
}

fn parse_devnum(s: &str) -> Option<u64> {
    let (maj, min) = s.split_once(':')?;
    Some(libc::makedev(maj.parse().ok()?, min.parse().ok()?))
}

fn sys_dev(name: &str) -> Option<SysDev> {
    let base = Path::new("/sys/class/block").join(name);
    let rdev = parse_devnum(&read_trim(&base.join("dev"))?)?;
    let bytes = read_trim(&base.join("size"))?.parse::<u64>().ok()? * 512;
    let partition_of = if base.join("partition").exists() {
        let real = std::fs::canonicalize(&base).ok()?;
        let disk = real.parent()?.file_name()?.to_string_lossy().into_owned();
        let start = read_trim(&base.join("start"))?.parse::<u64>().ok()? * 512;
        Some((disk, start))
    } else {
        None
    };
    let is_loop = partition_of.is_none() && base.join("loop/backing_file").exists();
    Some(SysDev {
        name: name.to_string(),
        rdev,
        bytes,
        partition_of,
        is_loop,
    })
}

/// Every block device sysfs lists.
fn all_devices() -> Vec<SysDev> {
    let Ok(dir) = std::fs::read_dir("/sys/class/block") else {
        return Vec::new();
    };
    let mut v: Vec<SysDev> = dir
        .flatten()
        .filter_map(|e| sys_dev(&e.file_name().to_string_lossy()))
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// `LOOP_GET_STATUS64` of loop device `name`, given at most two seconds: the kernel
/// stats the backing file, which on a FUSE filesystem whose daemon is stopped waits
/// for it (a thread left waiting there ends with the process).
fn loop_status_of(name: &str) -> Option<crate::lock::LoopStatus> {
    let node = PathBuf::from("/dev").join(name);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("loop-status".into())
        .spawn(move || {
            let status = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
                .open(&node)
                .ok()
                .and_then(|f: File| crate::lock::loop_status(&f));
            let _ = tx.send(status);
        })
        .ok()?;
    rx.recv_timeout(Duration::from_secs(2)).ok().flatten()
}

/// The `(st_dev, st_ino)` of the regular file loop device `name` reads, from the
/// kernel (whichever mount namespace attached it); `None` for another device.
pub fn loop_backing_file(name: &str) -> Option<(u64, u64)> {
    let lo = loop_status_of(name)?;
    (lo.rdevice == 0).then_some((lo.device, lo.inode))
}

/// Places devices on their bottoms, remembering each answer (a disk's partitions and
/// the loop devices over it ask for it again).
struct Placer<'a> {
    devices: &'a [SysDev],
    skip_loop: &'a dyn Fn(&str) -> bool,
    known: HashMap<String, Option<Extent>>,
}

impl Placer<'_> {
    fn by_rdev(&self, rdev: u64) -> Option<&SysDev> {
        self.devices.iter().find(|d| d.rdev == rdev)
    }

    fn extent(&mut self, name: &str, depth: u32) -> Option<Extent> {
        if let Some(e) = self.known.get(name) {
            return *e;
        }
        let e = self.place(name, depth);
        self.known.insert(name.to_string(), e);
        e
    }

    fn place(&mut self, name: &str, depth: u32) -> Option<Extent> {
        if depth > 8 {
            return None;
        }
        let d = self.devices.iter().find(|d| d.name == name)?.clone();
        if let Some((disk, start)) = &d.partition_of {
            let under = self.extent(disk, depth + 1)?;
            return Some(Extent {
                bottom: under.bottom,
                start: under.start + start,
                end: under.start + start + d.bytes,
            });
        }
        if !d.is_loop {
            return Some(Extent {
                bottom: Bottom::Disk(d.rdev),
                start: 0,
                end: d.bytes,
            });
        }
        if (self.skip_loop)(&d.name) {
            return None;
        }
        let lo = loop_status_of(&d.name)?;
        if lo.rdevice != 0 {
            // Over a block device: that device's place, from the loop's offset.
            let below = self.by_rdev(lo.rdevice)?.name.clone();
            let under = self.extent(&below, depth + 1)?;
            return Some(Extent {
                bottom: under.bottom,
                start: under.start + lo.offset,
                end: under.start + lo.offset + d.bytes,
            });
        }
        Some(Extent {
            bottom: Bottom::File {
                dev: lo.device,
                ino: lo.inode,
            },
            start: lo.offset,
            end: lo.offset + d.bytes,
        })
    }
}

/// The other block devices whose bytes meet those of block device `rdev`, with how
/// each reaches them. Loop devices `skip_loop` names are not asked about (a caller
/// that knows their backing file sits on a FUSE mount, whose stat could wait).
/// Devices that cannot be placed are left out.
pub fn overlapping(rdev: u64, skip_loop: &dyn Fn(&str) -> bool) -> Vec<Overlap> {
    let devices = all_devices();
    let Some(me) = devices.iter().find(|d| d.rdev == rdev).cloned() else {
        return Vec::new();
    };
    let mut placer = Placer {
        devices: &devices,
        skip_loop,
        known: HashMap::new(),
    };
    let Some(mine) = placer.extent(&me.name, 0) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for d in &devices {
        if d.rdev == rdev || d.bytes == 0 {
            continue;
        }
        let Some(theirs) = placer.extent(&d.name, 0) else {
            continue;
        };
        if !mine.meets(&theirs) {
            continue;
        }
        let relation = if me
            .partition_of
            .as_ref()
            .is_some_and(|(disk, _)| *disk == d.name)
        {
            Relation::WholeDisk
        } else if d
            .partition_of
            .as_ref()
            .is_some_and(|(disk, _)| *disk == me.name)
        {
            Relation::Partition
        } else {
            Relation::OtherPath
        };
        out.push(Overlap {
            name: d.name.clone(),
            rdev: d.rdev,
            relation,
            has_partitions: has_partitions(&devices, &d.name),
        });
    }
    out
}

fn has_partitions(devices: &[SysDev], name: &str) -> bool {
    devices.iter().any(|p| {
        p.partition_of
            .as_ref()
            .is_some_and(|(disk, _)| disk == name)
    })
}

/// The block devices over the regular file `(dev, ino)` (loop devices, their
/// partitions, and loop devices over those).
pub fn devices_over_file(dev: u64, ino: u64) -> Vec<Overlap> {
    let devices = all_devices();
    let mut placer = Placer {
        devices: &devices,
        skip_loop: &|_| false,
        known: HashMap::new(),
    };
    let mut out = Vec::new();
    for d in &devices {
        if placer
            .extent(&d.name, 0)
            .is_some_and(|e| e.bottom == Bottom::File { dev, ino })
        {
            out.push(Overlap {
                name: d.name.clone(),
                rdev: d.rdev,
                relation: Relation::OtherPath,
                has_partitions: has_partitions(&devices, &d.name),
            });
        }
    }
    out
}

/// Whether another opener holds block device `node` exclusively (a mount, a mapping,
/// a walk): an `O_EXCL` open of it fails with EBUSY.
pub fn held_exclusively(node: &Path) -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(node)
        .is_err_and(|e| e.raw_os_error() == Some(libc::EBUSY))
}

/// Refuses a run on block device `rdev` while another path to its bytes is in use: a
/// loop device over the same file, or over it, mounted, mapped or opened exclusively
/// (its disk and partitions are the kernel's: a claim on one excludes `O_EXCL` on the
/// other).
pub fn refuse_used_other_paths(rdev: u64) -> std::io::Result<()> {
    for o in overlapping(rdev, &|_| false) {
        if o.probe_exclusive() && held_exclusively(&o.node()) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ResourceBusy,
                format!(
                    "{} reaches the same bytes and is in use (mounted, mapped, or opened by another program): writing under it would corrupt it; unmount or close it, and detach its loop device (`losetup -d`), first (nothing was written)",
                    o.node().display()
                ),
            ));
        }
    }
    Ok(())
}
