//! Which processes hold a filesystem or a block device: the real cause behind
//! "umount: target is busy".
//!
//! Each process's open files (`/proc/PID/fd/*`), working directory, root and
//! executable are stat'ed through their /proc links, so that deleted files and
//! paths with odd characters still match by device number; memory mappings
//! (`/proc/PID/maps`) carry the device number in their own column.

use crate::mountinfo::DevNum;
use serde::Serialize;
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// How a process holds the filesystem or device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum HoldKind {
    /// An open file descriptor on a file of the filesystem.
    OpenFile,
    /// The device node itself is open (e.g. a tool reading /dev/sdc).
    OpenDevice,
    Cwd,
    Root,
    Exe,
    /// A mapped file (a library or mmap'ed data).
    Mmap,
}

impl HoldKind {
    pub fn describe(self) -> &'static str {
        match self {
            HoldKind::OpenFile => "has open",
            HoldKind::OpenDevice => "has open the device node",
            HoldKind::Cwd => "has its working directory in",
            HoldKind::Root => "has its root in",
            HoldKind::Exe => "runs the executable",
            HoldKind::Mmap => "maps",
        }
    }
}

/// One process holding the target, with the first path found for each kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Holder {
    pub pid: u32,
    /// Short command name (`/proc/PID/comm`).
    pub command: String,
    /// Full command line, NUL separators replaced by spaces; may be empty for kernel threads.
    pub cmdline: String,
    pub kind: HoldKind,
    pub path: PathBuf,
}

impl Holder {
    /// `pid 1234 (python3) has open /mnt/data/x.db`
    pub fn one_line(&self) -> String {
        format!(
            "pid {} ({}) {} {}",
            self.pid,
            self.command,
            self.kind.describe(),
            self.path.display()
        )
    }
}

/// What to look for: filesystems (by st_dev) and raw block devices (by st_rdev).
#[derive(Debug, Clone, Default)]
pub struct Targets {
    pub filesystems: BTreeSet<DevNum>,
    pub block_devices: BTreeSet<DevNum>,
}

/// Whether a command line (NULs as spaces) is luksify's userspace mapping daemon; if so
/// its mapping name and `--state-dir` (a value runs to the next flag).
pub fn mapping_daemon(cmdline: &str) -> Option<(String, Option<String>)> {
    let flag = |f: &str| {
        let rest = cmdline.split_once(&format!(" {f} "))?.1;
        Some(rest.split(" --").next().unwrap_or(rest).to_string())
    };
    (cmdline.split(' ').nth(1) == Some(crate::map::SERVE_SUBCOMMAND))
        .then(|| (flag("--name").unwrap_or_default(), flag("--state-dir")))
}

/// The command line of `pid`, NULs as spaces (empty when it cannot be read).
pub fn cmdline_of(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .trim_end_matches('\0')
                .replace('\0', " ")
        })
        .unwrap_or_default()
}

/// Scans every process except the caller (the caller's own handles are not in the way
/// unless `include_self`). At most one entry per (pid, kind) to keep reports short.
pub fn scan(targets: &Targets, include_self: bool) -> Vec<Holder> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    let mut pids: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        if pid == me && !include_self {
            continue;
        }
        scan_pid(pid, targets, &mut out);
    }
    out
}

/// [`scan`], and if anything holds the targets, once more 200 ms later: only what holds
/// them both times is reported. Something may hold a device for an instant (udev's
/// blkid after a change event, a `losetup` listing loop devices), which neither blocks
/// an unmount for long nor should be named, let alone signalled by `--kill-holders`.
pub fn scan_settled(targets: &Targets, include_self: bool) -> Vec<Holder> {
    let first = scan(targets, include_self);
    if first.is_empty() {
        return first;
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut again = scan(targets, include_self);
    again.retain(|h| first.iter().any(|f| f.pid == h.pid));
    again
}

/// Scans one process; processes that exit meanwhile are skipped silently.
pub fn scan_pid(pid: u32, targets: &Targets, out: &mut Vec<Holder>) {
    let base = PathBuf::from(format!("/proc/{pid}"));
    if is_kernel_thread(&base) {
        // Kernel threads show / as cwd and root but never keep a data filesystem busy.
        return;
    }
    let mut found: Vec<(HoldKind, PathBuf)> = Vec::new();
    let add = |kind: HoldKind, path: PathBuf, found: &mut Vec<(HoldKind, PathBuf)>| {
        if !found.iter().any(|(k, _)| *k == kind) {
            found.push((kind, path));
        }
    };
    for (name, kind) in [
        ("cwd", HoldKind::Cwd),
        ("root", HoldKind::Root),
        ("exe", HoldKind::Exe),
    ] {
        let link = base.join(name);
        if let Some(k) = classify(&link, targets) {
            let kind = if k == HoldKind::OpenDevice {
                HoldKind::OpenDevice
            } else {
                kind
            };
            add(kind, readlink(&link), &mut found);
        }
    }
    if let Ok(fds) = std::fs::read_dir(base.join("fd")) {
        for fd in fds.flatten() {
            let link = fd.path();
            if let Some(kind) = classify(&link, targets) {
                add(kind, readlink(&link), &mut found);
            }
        }
    }
    if let Ok(maps) = std::fs::read_to_string(base.join("maps")) {
        for (dev, path) in parse_maps(&maps) {
            if targets.filesystems.contains(&dev) {
                add(HoldKind::Mmap, path, &mut found);
                break;
            }
        }
    }
    if found.is_empty() {
        return;
    }
    let command = std::fs::read_to_string(base.join("comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_default();
    let cmdline = cmdline_of(pid);
    found.sort();
    for (kind, path) in found {
        out.push(Holder {
            pid,
            command: command.clone(),
            cmdline: cmdline.clone(),
            kind,
            path,
        });
    }
}

/// The fields of `PROC_DIR/stat` after the command name, which may hold spaces and ')'
/// (fields resume after the last ')'): `[0]` state, `[1]` ppid, ..., `[6]` flags.
fn stat_fields(proc_dir: &Path) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(proc_dir.join("stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

fn proc_dir(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}"))
}

/// PF_KTHREAD (0x00200000) in the flags field (9th) of /proc/PID/stat.
fn is_kernel_thread(base: &Path) -> bool {
    stat_fields(base)
        .and_then(|f| f.get(6)?.parse::<u64>().ok())
        .is_some_and(|flags| flags & 0x0020_0000 != 0)
}

/// Whether `pid` exists (`kill(pid, 0)`; a zombie exists).
pub fn pid_exists(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the pid exists; no memory is involved.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    // EPERM: it exists, and belongs to another user (root's mapping daemon, seen by a
    // user's `luksify status`, read as "lost its daemon (killed?)"; a trial).
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// luksify's caller: its ancestors (the shell or agent that runs it, and theirs), and
/// the processes reading its output through a pipe (a pipeline's `| tee LOG`: a trial's
/// log on the volume made `tee` a holder, and `--kill-holders` stopped it, so the run's
/// output went nowhere and the pipeline failed).
pub fn own_lineage() -> Vec<u32> {
    let mut out = Vec::new();
    let me = std::process::id();
    let mut pid = me;
    while pid > 1 && out.len() < 64 {
        let Some(ppid) = parent_pid(pid) else {
            break;
        };
        out.push(ppid);
        pid = ppid;
    }
    let pipe_of = |pid: u32, fd: u32| {
        std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
            .ok()
            .filter(|l| l.to_string_lossy().starts_with("pipe:"))
    };
    // Downstream of luksify's output: the reader of its stdout/stderr pipe, the reader
    // of that one's (`| grep ... | tee LOG`), and so on.
    let all: Vec<u32> = std::fs::read_dir("/proc")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .collect()
        })
        .unwrap_or_default();
    let mut writers = vec![me];
    let mut i = 0;
    while i < writers.len() && writers.len() < 64 {
        let w = writers[i];
        i += 1;
        let outs: Vec<PathBuf> = [1, 2].iter().filter_map(|&fd| pipe_of(w, fd)).collect();
        if outs.is_empty() {
            continue;
        }
        for &p in &all {
            if p != me && !writers.contains(&p) && pipe_of(p, 0).is_some_and(|l| outs.contains(&l))
            {
                writers.push(p);
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        }
    }
    out
}

/// luksify's own standard streams that are files on one of `filesystems` (`> LOG` with
/// the log on the volume): the volume cannot be unmounted under them, and no process
/// but luksify itself holds it ("target is busy (no process found)").
pub fn own_stdio_on(filesystems: &[DevNum]) -> Vec<&'static str> {
    use std::os::unix::fs::MetadataExt;
    [(0, "input"), (1, "output"), (2, "error output")]
        .into_iter()
        .filter(|(fd, _)| {
            std::fs::metadata(format!("/proc/self/fd/{fd}")).is_ok_and(|m| {
                m.file_type().is_file() && filesystems.contains(&DevNum::from_raw(m.dev()))
            })
        })
        .map(|(_, what)| what)
        .collect()
}

/// Whether `pid` is stopped (SIGSTOP, SIGTSTP, or a tracer's stop): it holds what it
/// holds and moves no further until continued.
pub fn is_stopped(pid: u32) -> bool {
    stat_fields(&proc_dir(pid)).is_some_and(|f| f.first().is_some_and(|s| s == "T" || s == "t"))
}

/// Whether `pid` is a zombie (exited, not yet reaped).
pub fn is_zombie(pid: u32) -> bool {
    stat_fields(&proc_dir(pid)).is_some_and(|f| f.first().is_some_and(|s| s == "Z"))
}

/// Whether `pid` exists and has not exited.
pub fn pid_running(pid: u32) -> bool {
    pid_exists(pid) && !is_zombie(pid)
}

/// What tells process `pid` from a later one given the same pid: this boot's id and the
/// process's start time (clock ticks since boot, /proc/PID/stat's 22nd field), as
/// `BOOT_ID:TICKS`. None when the process is gone.
pub fn process_identity(pid: u32) -> Option<String> {
    let boot = boot_id()?;
    // The fields after the command start at the 3rd (state): the 22nd is index 19.
    let ticks = stat_fields(&proc_dir(pid))?.get(19)?.clone();
    Some(format!("{boot}:{ticks}"))
}

/// This boot's id (a new random UUID at every boot).
pub fn boot_id() -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(boot.trim().to_string())
}

/// Whether the process recorded as `pid` (with `identity`, from [`process_identity`],
/// when it was recorded) still runs: not a zombie, and not a later process that was given
/// the same pid (after a reboot, or once pids wrapped around).
pub fn recorded_process_running(pid: u32, identity: Option<&str>) -> bool {
    pid_running(pid) && identity.is_none_or(|id| process_identity(pid).as_deref() == Some(id))
}

/// The parent of `pid`.
pub fn parent_pid(pid: u32) -> Option<u32> {
    stat_fields(&proc_dir(pid))?.get(1)?.parse().ok()
}

fn classify(link: &Path, targets: &Targets) -> Option<HoldKind> {
    // metadata() follows the /proc magic link to the very inode the process holds.
    let md = std::fs::metadata(link).ok()?;
    use std::os::unix::fs::FileTypeExt;
    if md.file_type().is_block_device()
        && targets.block_devices.contains(&DevNum::from_raw(md.rdev()))
    {
        return Some(HoldKind::OpenDevice);
    }
    if targets.filesystems.contains(&DevNum::from_raw(md.dev())) {
        return Some(HoldKind::OpenFile);
    }
    None
}

fn readlink(link: &Path) -> PathBuf {
    std::fs::read_link(link).unwrap_or_else(|_| link.to_path_buf())
}

/// `(device, path)` of every file-backed mapping. The device column is hex `maj:min`.
pub fn parse_maps(text: &str) -> Vec<(DevNum, PathBuf)> {
    let mut v = Vec::new();
    for line in text.lines() {
        // addr perms offset dev inode path
        let mut it = line.splitn(6, ' ');
        let (_, _, _, Some(dev), Some(inode)) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            continue;
        };
        if inode == "0" {
            continue;
        }
        let Some((a, b)) = dev.split_once(':') else {
            continue;
        };
        let (Ok(major), Ok(minor)) = (u32::from_str_radix(a, 16), u32::from_str_radix(b, 16))
        else {
            continue;
        };
        let path = it.next().unwrap_or("").trim_start();
        v.push((DevNum { major, minor }, PathBuf::from(path)));
    }
    v
}

/// Distinct pids in a holder list, in order.
/// Whether this process's own working directory is on one of `filesystems` (then no
/// unmount can succeed, and no holder scan names it: the scan leaves itself out).
pub fn own_cwd_on(filesystems: &[DevNum]) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/cwd")
        .is_ok_and(|m| filesystems.contains(&DevNum::from_raw(m.dev())))
}

pub fn pids(holders: &[Holder]) -> Vec<u32> {
    let mut v: Vec<u32> = holders.iter().map(|h| h.pid).collect();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_own_open_file_cwd_and_excludes_self_by_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("held.bin");
        std::fs::write(&path, b"x").unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let dev = DevNum::from_raw(f.metadata().unwrap().dev());
        let mut t = Targets::default();
        t.filesystems.insert(dev);
        let mut mine = Vec::new();
        scan_pid(std::process::id(), &t, &mut mine);
        let open = mine
            .iter()
            .find(|h| h.kind == HoldKind::OpenFile)
            .expect("own open file found");
        assert_eq!(open.pid, std::process::id());
        assert!(!open.command.is_empty());
        // The first open file on that filesystem is reported; ours is among them
        // unless the test runner holds another one on the same filesystem.
        assert!(open
            .one_line()
            .starts_with(&format!("pid {} (", std::process::id())));
        let all = scan(&t, false);
        assert!(all.iter().all(|h| h.pid != std::process::id()));
        let with_self = scan(&t, true);
        assert!(with_self.iter().any(|h| h.pid == std::process::id()));
        drop(f);
    }

    #[test]
    fn unrelated_device_matches_nothing_in_own_process() {
        let mut t = Targets::default();
        t.filesystems.insert(DevNum {
            major: 4095,
            minor: 12345,
        });
        t.block_devices.insert(DevNum {
            major: 4095,
            minor: 12345,
        });
        let mut mine = Vec::new();
        scan_pid(std::process::id(), &t, &mut mine);
        assert!(mine.is_empty(), "{mine:?}");
    }

    #[test]
    fn maps_device_column_is_hex() {
        let text = "7f00-7f10 r-xp 00000000 fe:01 1234 /usr/lib/libc.so.6\n\
                    7f10-7f20 rw-p 00000000 00:00 0 \n\
                    7f20-7f30 r--p 00000000 07:0a 99 /mnt/data/file with space\n";
        let v = parse_maps(text);
        assert_eq!(v.len(), 2);
        assert_eq!(
            v[0].0,
            DevNum {
                major: 254,
                minor: 1
            }
        );
        assert_eq!(
            v[1].0,
            DevNum {
                major: 7,
                minor: 10
            }
        );
        assert_eq!(v[1].1, PathBuf::from("/mnt/data/file with space"));
    }
}
