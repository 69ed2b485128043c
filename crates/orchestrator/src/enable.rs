//! The data-volume flow: preflight, stop holders (only when asked), unmount,
//! fsck and shrink (ext) or detached header, encrypt in place through the walker,
//! map, remount with the same options, grow the filesystem back, write crypttab
//! and fstab. `resume` finishes interrupted runs found in the status file.

use crate::check::{self, CheckOptions, Severity, HEADER_RESERVE_BYTES};
use crate::error::{run_tool, Failure, Result};
use crate::exit;
use crate::holders;
use crate::map::{self, OpenRequest};
use crate::mountinfo;
use crate::probe;
use crate::status::{Operation, Rate, StatusWriter, VolumeState, VolumeStatus};
use crate::tabs;
use luksify_luks::kdf::KdfRequest;
use luksify_luks::luks2::FormatOptions;
use luksify_walker::{
    device::DataDevice, Control, EncryptOptions, Outcome, Placement, ProgressInfo, Resilience,
};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Called on every progress tick with the volume, its index and the count.
pub type Reporter<'a> = dyn Fn(&VolumeStatus, usize, usize) + Sync + 'a;

/// Everything `enable` needs besides the passphrase.
#[derive(Clone)]
pub struct EnableRequest<'a> {
    pub volumes: Vec<PathBuf>,
    /// Path of the key file (recorded for crypttab and resume; its content is the passphrase).
    pub key_file: PathBuf,
    pub header_dir: Option<PathBuf>,
    pub kill_holders: bool,
    pub state_dir: PathBuf,
    pub force_userspace: bool,
    pub kdf: KdfRequest,
    /// Set from a signal handler: stop at the next safe point.
    pub cancel: &'a AtomicBool,
    pub report: &'a Reporter<'a>,
    /// Volumes this run already worked on before it got to `volumes`: a `resume` that
    /// finished the interrupted volume of a stopped run and goes on with the ones it
    /// had not reached. They stay in the run (its count, "volume 2/2", and the list:
    /// a volume the resume had just decrypted dropped out of `volumes[]`, and the
    /// next read "volume 1/1"; a trial). Empty for a run of its own.
    pub continues: Vec<PathBuf>,
}

impl std::fmt::Debug for EnableRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnableRequest")
            .field("volumes", &self.volumes)
            .finish_non_exhaustive()
    }
}

/// Mapping name for a device: `luksify-<kernel name>`.
pub fn mapping_name(device: &Path) -> String {
    let base = device
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("luksify-{base}")
}

/// Data volumes `enable` could take: block devices with a filesystem, never the OS
/// disk, its partitions, or devices that are already LUKS.
pub fn candidates(state_dir: &Path) -> Vec<check::Report> {
    let all = mountinfo::read().unwrap_or_default();
    let os = check::os_devices(&all);
    // A stopped run's volumes it had not reached are `resume`'s to take, not a new
    // run's (a trial's listing offered them as "ready", and that enable is refused).
    let pending = crate::status::load(state_dir)
        .ok()
        .filter(|s| !s.run_process_running())
        .map(|s| pending_of_stopped_run(&s).1)
        .unwrap_or_default();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/sys/class/block") else {
        return out;
    };
    let mut names: Vec<String> = dir
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for n in names {
        if ["ram", "zram", "sr", "fd", "nbd"]
            .iter()
            .any(|p| n.starts_with(p))
        {
            continue;
        }
        let sys = PathBuf::from("/sys/class/block").join(&n);
        // Whole disks with partitions: offer the partitions instead.
        if std::fs::read_dir(&sys)
            .map(|d| d.flatten().any(|e| e.path().join("partition").exists()))
            .unwrap_or(false)
        {
            continue;
        }
        // An unused loop device has no backing file; a loop device's partition
        // (`losetup -P`) has its disk's (they were all left out).
        let disk = probe::whole_disk_dir(&sys).unwrap_or_else(|| sys.clone());
        if n.starts_with("loop") && !disk.join("loop/backing_file").exists() {
            continue;
        }
        let dev = PathBuf::from("/dev").join(&n);
        let Some(num) = probe::block_dev_num(&dev) else {
            continue;
        };
        if os.contains(&num) {
            continue;
        }
        if pending.iter().any(|p| probe::block_dev_num(p) == Some(num)) {
            continue;
        }
        let listing = CheckOptions {
            listing: true,
            ..CheckOptions::default()
        };
        let Ok(r) = check::check(&dev, listing) else {
            continue;
        };
        // Cheap tests first: `interrupted_run` reads the device, which for luksify's
        // own view would wait on its daemon.
        if r.luks.is_some()
            || r.is_os_volume
            || r.problems
                .iter()
                .any(|p| matches!(p.code, "already_mapped" | "partition_table"))
            || matches!(
                r.filesystem.fs_type.as_str(),
                "unknown" | "unreadable" | "unread" | "swap" | "LVM2_member"
            )
            || check::interrupted_run(&dev, state_dir).is_some()
        {
            continue;
        }
        out.push(r);
    }
    out
}

/// The problem that says the volume of report `r` is encrypted already (a LUKS header
/// at its start or in its recorded detached header, or an open mapping given in its
/// place), unless a run on it is interrupted or at work, which is not "done".
fn already_encrypted(r: &check::Report) -> Option<&check::Problem> {
    if r.problems
        .iter()
        .any(|p| matches!(p.code, "luks_in_progress" | "busy_run"))
    {
        return None;
    }
    r.problems
        .iter()
        .find(|p| matches!(p.code, "already_mapped" | "already_luks"))
}

/// The blocker for a new run of `new_op` while a stopped run (no process at work on it)
/// has volumes it had not reached that the new run does not take (`taken`). A stopped
/// disable's are never an `enable`'s to take: that run is still to decrypt them. A
/// `disable` of every volume (`all`) leaves a stopped enable's plain, as meant.
fn stopped_run_left_out(
    state_dir: &Path,
    new_op: Operation,
    taken: &[&Path],
    all: bool,
) -> Option<String> {
    let st = crate::status::load(state_dir).ok()?;
    if st.run_process_running() {
        return None;
    }
    let (op, pending) = pending_of_stopped_run(&st);
    if all && new_op == Operation::DisableEncryption && op == Operation::EnableEncryption {
        return None;
    }
    let left: Vec<String> = pending
        .iter()
        .filter(|d| {
            !taken.contains(&d.as_path())
                || (op == Operation::DisableEncryption && new_op == Operation::EnableEncryption)
        })
        .map(|d| d.display().to_string())
        .collect();
    if left.is_empty() {
        return None;
    }
    let what = if op == Operation::DisableEncryption {
        "disable"
    } else {
        "enable"
    };
    let them = if left.len() == 1 { "it" } else { "them" };
    let resume = crate::status::in_state_dir("`luksify resume`", state_dir);
    let why = if op == Operation::DisableEncryption && new_op == Operation::EnableEncryption {
        format!("that run is still to decrypt {them}")
    } else {
        format!("a new run would drop {them} from that run")
    };
    Some(format!(
        "BLOCKER: a stopped {what} had not reached {} yet: {why}; fix: run {resume} first, which finishes that run",
        left.join(", ")
    ))
}

/// SIGTERM, then SIGKILL, to the processes that hold `device`, waiting up to 5 s each.
/// A holder that is luksify's own ancestor (the shell or agent that runs it, its working
/// directory on the volume) is not signalled: the run is refused instead.
fn stop_holders(device: &Path, pids: &[u32], cancel: &AtomicBool) -> Result<()> {
    let lineage = holders::own_lineage();
    if let Some(p) = pids.iter().find(|p| lineage.contains(p)) {
        return Err(Failure::new(
            exit::BLOCKED,
            format!(
                "pid {p}, which runs this luksify (or reads its output), holds {} (its working directory or an open file is on it): --kill-holders will not stop its own caller; run luksify from a directory outside the volume, with its output kept off the volume",
                device.display()
            ),
        ));
    }
    // A mapping daemon of another volume (check blocks it; it may have come since).
    if let Some((p, name)) = pids
        .iter()
        .find_map(|p| holders::mapping_daemon(&holders::cmdline_of(*p)).map(|d| (p, d.0)))
    {
        return Err(Failure::new(
            exit::BLOCKED,
            format!(
                "pid {p}, luksify's userspace mapping {name} of another volume, holds {}: stopping it would take that volume away from under its filesystem, so --kill-holders does not; unmount that volume and `luksify close {name}`, or keep its files off this one",
                device.display()
            ),
        ));
    }
    for (sig, wait) in [
        (libc::SIGTERM, Duration::from_secs(5)),
        (libc::SIGKILL, Duration::from_secs(5)),
    ] {
        let alive: Vec<u32> = pids
            .iter()
            .copied()
            .filter(|p| holders::pid_running(*p))
            .collect();
        if alive.is_empty() {
            return Ok(());
        }
        // Asked to stop while waiting: no SIGKILL after that.
        not_cancelled(cancel)?;
        for p in &alive {
            errln!(
                "luksify: stopping pid {p} with {} because it holds {}",
                if sig == libc::SIGTERM {
                    "SIGTERM"
                } else {
                    "SIGKILL"
                },
                device.display()
            );
            // SAFETY: kill sends a signal to a pid; no memory is involved.
            unsafe { libc::kill(*p as libc::pid_t, sig) };
        }
        let deadline = std::time::Instant::now() + wait;
        while std::time::Instant::now() < deadline && alive.iter().any(|p| holders::pid_running(*p))
        {
            not_cancelled(cancel)?;
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// Refuses to go on once SIGINT/SIGTERM/SIGHUP asked to stop. Only called before the walker
/// writes anything: its caller puts the volume back as it was, so nothing is left to
/// resume.
fn not_cancelled(cancel: &AtomicBool) -> Result<()> {
    if cancel.load(Ordering::Relaxed) {
        return Err(Failure::new(
            exit::INTERRUPTED,
            "stopped on request (SIGINT/SIGTERM/SIGHUP) before the walk began, so there is nothing to resume",
        ));
    }
    Ok(())
}

/// Unmounts the mounts nested below a volume, deepest first, retrying while busy and
/// naming the processes that hold the nested filesystem when it gives up.
fn unmount_nested(device: &Path, nested: &[crate::status::NestedMount], fix: &str) -> Result<()> {
    let mut order: Vec<_> = nested.iter().collect();
    order.sort_by_key(|n| std::cmp::Reverse(n.mount_point.components().count()));
    for n in order {
        let Some(ndev) = probe::block_dev_num(&n.source) else {
            continue;
        };
        for attempt in 0..5 {
            let all = mountinfo::read()
                .map_err(|e| Failure::failed(format!("cannot read mountinfo ({e})")))?;
            if !all
                .iter()
                .any(|m| m.mount_point == n.mount_point && m.dev == ndev)
            {
                break;
            }
            let ok = crate::tool("umount")
                .arg(&n.mount_point)
                .output()
                .map_err(cannot_run_umount)?
                .status
                .success();
            if ok {
                continue;
            }
            if attempt < 4 {
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            let mut t = holders::Targets::default();
            t.filesystems.insert(ndev);
            return Err(unmount_blocked(
                &format!(
                    "{} (nested below {})",
                    n.mount_point.display(),
                    device.display()
                ),
                &t,
                "target is busy (no process found)",
                fix,
            ));
        }
    }
    Ok(())
}

/// Mounts nested below `mp` now (other than `dev`'s own), each restorable; one that is
/// not (tmpfs, a bind of a subdirectory) stops the run before anything is touched.
fn current_nested(mp: &Path, dev: mountinfo::DevNum) -> Result<Vec<crate::status::NestedMount>> {
    let all =
        mountinfo::read().map_err(|e| Failure::failed(format!("cannot read mountinfo ({e})")))?;
    let mut out = Vec::new();
    for m in mountinfo::nested_below(&all, mp) {
        if m.dev == dev {
            continue;
        }
        let view = check::MountView::from(m);
        let Some(source) = view.source else {
            return Err(Failure::new(
                exit::BLOCKED,
                format!(
                    "{} ({}) is mounted below {} and could not be mounted again afterwards; unmount it first",
                    m.mount_point.display(),
                    m.fs_type,
                    mp.display()
                ),
            ));
        };
        out.push(crate::status::NestedMount {
            source,
            mount_point: view.mount_point,
            fs_type: view.fs_type,
            options: view.options,
        });
    }
    Ok(out)
}

/// The mounts of a volume besides `primary`, as binds to restore.
fn extra_mounts<'a>(
    mounts: impl Iterator<Item = &'a check::MountView>,
    primary: Option<&check::MountView>,
) -> Vec<crate::status::ExtraMount> {
    mounts
        .filter(|m| Some(m.mount_point.as_path()) != primary.map(|p| p.mount_point.as_path()))
        .map(|m| crate::status::ExtraMount {
            mount_point: m.mount_point.clone(),
            root: m.root.clone(),
            options: m.options.clone(),
        })
        .collect()
}

/// Mount points of the fstab entries that name `device` (path, UUID=, LABEL=, ...).
fn fstab_mount_points(device: &Path) -> Vec<PathBuf> {
    fstab_entries(device)
        .into_iter()
        .map(|e| e.mount_point)
        .collect()
}

/// The fstab entries that name `device` (path, UUID=, LABEL=, ...).
fn fstab_entries(device: &Path) -> Vec<tabs::FstabEntry> {
    let Ok(text) = std::fs::read_to_string(tabs::etc_dir().join("fstab")) else {
        return Vec::new();
    };
    let ids: Vec<String> = crate::tool("blkid")
        .args(["-o", "export"])
        .arg(device)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    // A tag another device carries too (two filesystems labelled alike) names this
    // one only where its entry's mount point is where this device is mounted now:
    // a trial's `LABEL=DUP` line of the other partition was pointed at this volume's
    // mapping, and the other partition lost its entry.
    // (A blkid scan of every device per tag: only for tags fstab spells.)
    let (clear, shared): (Vec<String>, Vec<String>) = ids.into_iter().partition(|id| {
        let tag = id.replace('"', "");
        !["UUID=", "LABEL=", "PARTUUID=", "PARTLABEL="]
            .iter()
            .any(|k| id.starts_with(k))
            // (Its value, however fstab quotes it.)
            || !tag.split_once('=').is_some_and(|(_, v)| text.contains(v))
            || probe::devices_with_tag(&tag).len() <= 1
    });
    let mut out = tabs::fstab_entries_of(&text, device, &clear);
    if !shared.is_empty() {
        let here = probe::block_dev_num(device);
        let mounts = crate::mountinfo::read().unwrap_or_default();
        for e in tabs::fstab_entries_of(&text, device, &shared) {
            let mounted_here = mounts
                .iter()
                .any(|m| Some(m.dev) == here && m.mount_point == e.mount_point);
            if mounted_here && !out.contains(&e) {
                out.push(e);
            }
        }
    }
    out
}

/// Mounts the other mounts of a volume again as binds of `primary` (a second mount of
/// the whole filesystem is the bind of its root), then gives each its per-mount flags.
fn remount_extras(primary: &Path, extras: &[crate::status::ExtraMount]) -> Result<()> {
    const VFS_FLAGS: &[&str] = &[
        "ro",
        "rw",
        "nosuid",
        "suid",
        "nodev",
        "dev",
        "noexec",
        "exec",
        "noatime",
        "atime",
        "relatime",
        "norelatime",
        "strictatime",
        "nodiratime",
        "diratime",
    ];
    let all = mountinfo::read().unwrap_or_default();
    for x in extras {
        if all.iter().any(|m| m.mount_point == x.mount_point) {
            continue;
        }
        let from = primary.join(x.root.trim_start_matches('/'));
        let what = format!(
            "bind {} again at {}",
            from.display(),
            x.mount_point.display()
        );
        run_tool(
            crate::tool("mount")
                .arg("--bind")
                .arg(&from)
                .arg(&x.mount_point),
            &what,
        )?;
        let mut flags: Vec<&str> = x
            .options
            .split(',')
            .filter(|o| VFS_FLAGS.contains(o))
            .collect();
        // The bind starts with the primary mount's flags, and `remount,bind` keeps what
        // it is not told (util-linux merges): a second mount without nodev came back
        // with the first's nodev (trial W). Each flag it lacks is cleared by name.
        for (set, clear) in [("nodev", "dev"), ("nosuid", "suid"), ("noexec", "exec")] {
            if !flags.contains(&set) {
                flags.push(clear);
            }
        }
        // `remount,bind,relatime` leaves a bind of a noatime mount noatime (util-linux
        // 2.38 here): the second mount came back with the first's noatime (a trial).
        // strictatime first clears the atime mode, then relatime sets it.
        if flags.contains(&"relatime") {
            run_tool(
                crate::tool("mount")
                    .arg("-o")
                    .arg("remount,bind,strictatime")
                    .arg(&x.mount_point),
                &what,
            )?;
        }
        run_tool(
            crate::tool("mount")
                .arg("-o")
                .arg(format!("remount,bind,{}", flags.join(",")))
                .arg(&x.mount_point),
            &what,
        )?;
    }
    Ok(())
}

/// Mounts the nested filesystems again, outermost first, with their recorded options.
fn remount_nested(nested: &[crate::status::NestedMount]) -> Result<()> {
    let mut order: Vec<_> = nested.iter().collect();
    order.sort_by_key(|n| n.mount_point.components().count());
    let all = mountinfo::read().unwrap_or_default();
    for n in order {
        let ndev = probe::block_dev_num(&n.source);
        if all
            .iter()
            .any(|m| m.mount_point == n.mount_point && Some(m.dev) == ndev)
        {
            continue;
        }
        run_tool(
            crate::tool("mount")
                .arg("-t")
                .arg(&n.fs_type)
                .arg("-o")
                .arg(&n.options)
                .arg(&n.source)
                .arg(&n.mount_point),
            &format!(
                "mount {} again at {}",
                n.source.display(),
                n.mount_point.display()
            ),
        )?;
    }
    Ok(())
}

/// Unmounts every mount of `dev` (deepest first), retrying while the kernel says busy,
/// and names the holders when it gives up.
pub fn unmount_all(device: &Path, dev: mountinfo::DevNum, fix: &str) -> Result<()> {
    for attempt in 0..5 {
        let all = mountinfo::read()
            .map_err(|e| Failure::failed(format!("cannot read mountinfo ({e})")))?;
        let mut mine: Vec<_> = mountinfo::mounts_of(&all, dev)
            .into_iter()
            .cloned()
            .collect();
        if mine.is_empty() {
            return Ok(());
        }
        // `umount DIR` takes the top mount there off: one stacked on the volume's would
        // go instead of it, for good (the preflights refuse this; here for a mount
        // stacked since).
        if let Some(top) = mountinfo::stacked_on(&all, dev).first() {
            return Err(Failure::new(
                exit::BLOCKED,
                format!(
                    "{} ({}) is mounted on top of {} there: unmount it first (umount {}) and run again, then mount it again",
                    top.mount_point.display(),
                    top.describe(),
                    device.display(),
                    top.mount_point.display()
                ),
            ));
        }
        mine.sort_by_key(|m| std::cmp::Reverse(m.mount_point.components().count()));
        let mut busy = None;
        for m in &mine {
            let out = crate::tool("umount")
                .arg(&m.mount_point)
                .output()
                .map_err(cannot_run_umount)?;
            if !out.status.success() {
                busy = Some(m.mount_point.clone());
            }
        }
        if busy.is_none() {
            continue;
        }
        if attempt < 4 {
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        let mut t = holders::Targets::default();
        t.filesystems.insert(dev);
        t.block_devices.insert(dev);
        return Err(unmount_blocked(
            &format!(
                "{} of {}",
                busy.unwrap_or_default().display(),
                device.display()
            ),
            &t,
            "target is busy (no process found: check nested mounts and swap)",
            fix,
        ));
    }
    Ok(())
}

/// How to get past a busy unmount, per command.
const FIX_ENABLE: &str = "stop them and run enable again, or pass --kill-holders";
const FIX_DISABLE: &str = "stop them and run disable again, or pass --kill-holders";
const FIX_RESUME: &str = "stop them and run `luksify resume` again";

/// `umount` could not be started at all (not on PATH, no file descriptors left): said
/// so, not read as "target is busy", which sent a trial to --kill-holders.
fn cannot_run_umount(e: std::io::Error) -> Failure {
    Failure::failed(format!(
        "cannot run umount ({e}): install util-linux's mount and put it on PATH (`luksify check` names every missing tool)"
    ))
}

/// The one-line refusal when an unmount stays busy: names every process holding one of
/// `targets` (pid, command, what it holds), or says `nobody` when none was found.
fn unmount_blocked(what: &str, targets: &holders::Targets, nobody: &str, fix: &str) -> Failure {
    let who: Vec<String> = holders::scan_settled(targets, false)
        .iter()
        .map(|h| h.one_line())
        .collect();
    Failure::new(
        exit::BLOCKED,
        format!(
            "failed to unmount {what}: {}; {fix}",
            if who.is_empty() {
                nobody.to_string()
            } else {
                who.join("; ")
            }
        ),
    )
}

pub(crate) fn is_ext(fs: &str) -> bool {
    matches!(fs, "ext2" | "ext3" | "ext4")
}

/// e2fsck -f -y: exit 0 clean, 1 fixed, others are failures. (-p would stop on
/// problems it cannot fix silently; -y answers yes so the shrink can proceed.)
/// The check before a volume is shrunk and encrypted: read-only (`e2fsck -f -n`). A
/// filesystem with errors is refused, not repaired: what `e2fsck -y` "repairs" on a
/// device that is not the plain filesystem it seems (one a `disable` left part
/// decrypted, one whose head an interrupted start overwrote: both found by a trial)
/// destroys it, and a volume being encrypted must be sound. (A volume luksify
/// unmounted is clean, its journal replayed (`needs_recovery` is refused), and
/// `resize2fs -P` must have given its estimate; the shrink then runs `resize2fs -f`,
/// since this check sets no check time.)
/// Runs `e2fsck FLAGS DEVICE`, its output kept.
fn e2fsck(flags: &[&str], device: &Path) -> Result<std::process::Output> {
    crate::tool("e2fsck")
        .args(flags)
        .arg(device)
        .output()
        .map_err(|e| Failure::failed(format!("cannot run e2fsck ({e}); install e2fsprogs")))
}

/// What `e2fsck -f -n` (which writes nothing) finds wrong with the ext filesystem on
/// `device`: `None` when it is clean, else how e2fsck ended and its first complaint.
pub(crate) fn ext_read_only_complaint(device: &Path) -> Result<Option<String>> {
    let out = e2fsck(&["-f", "-n"], device)?;
    let c = out.status.code();
    if c == Some(0) {
        return Ok(None);
    }
    let first = first_complaint(&out);
    Ok(Some(format!(
        "e2fsck -f -n {} {} ({first})",
        device.display(),
        match c {
            Some(c) => format!("exited with {c}"),
            None => "was killed".to_string(),
        },
    )))
}

/// e2fsck's first complaint in `out`, past its pass headers.
fn first_complaint(out: &std::process::Output) -> String {
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    text.lines()
        .map(str::trim)
        .find(|l| {
            !l.is_empty()
                && !l.starts_with("Pass ")
                && !l.starts_with("e2fsck ")
                && !l.contains("skipping journal recovery")
        })
        .unwrap_or("")
        .to_string()
}

fn fsck_ext_read_only(device: &Path) -> Result<()> {
    match ext_read_only_complaint(device)? {
        None => Ok(()),
        Some(complaint) => Err(Failure::failed(format!(
            "{complaint}: the filesystem has errors, and luksify does not repair a filesystem before encrypting it (a repair of a device that is not what it seems destroys it; nothing was encrypted); fix: make sure this is the plain volume you mean (not one a `luksify disable` left half decrypted), back it up, run `e2fsck -f {}` yourself, then run again",
            device.display()
        ))),
    }
}

fn fsck_ext(device: &Path) -> Result<()> {
    let out = e2fsck(&["-f", "-y"], device)?;
    match out.status.code() {
        Some(0) | Some(1) => Ok(()),
        // Exit 8 is e2fsck's operational error (the device busy, unreadable), not
        // damage: "has errors it could not fix" sent a trial to repair a sound
        // filesystem that an orphaned umount still held.
        Some(c) if c & 8 != 0 && c & 4 == 0 => Err(Failure::failed(format!(
            "e2fsck -f -y {} could not check it (exit {c}, an operational error: {}); nothing was repaired: if a program still has {} open (an e2fsck or mount left running), wait for it to end, then run again",
            device.display(),
            first_complaint(&out),
            device.display()
        ))),
        c => Err(Failure::failed(format!(
            "e2fsck -f -y {} {}: the filesystem has errors it could not fix; repair it by hand (e2fsck -f {}), then run again",
            device.display(),
            match c {
                Some(c) => format!("exited with {c}"),
                None => "was killed".to_string(),
            },
            device.display()
        ))),
    }
}

/// A refusal when `--header-dir` (`--key-file`) lies on one of the volumes about to be
/// encrypted, or on a filesystem nested below one: that filesystem is unmounted while
/// the run walks it. A header inside the data it describes could never be read to open
/// it; a key file there is unreadable while the volume is offline, so an interrupted
/// run could not be resumed at boot, and crypttab would name a key only the volume holds.
fn path_on_a_volume(flag: &str, path: &Path, plans: &[Plan]) -> Option<String> {
    let p = volume_holding(path, plans)?;
    let (why, example) = if flag == "--key-file" {
        (
            "it is unreadable while the volume is offline, so an interrupted run could not be resumed, and crypttab would name a key only the volume holds",
            "keep the key file on another filesystem (e.g. /root/luks-keys)",
        )
    } else if flag == "--state-dir" {
        (
            "the status file is written throughout the run, while the volume is unmounted",
            "pass --state-dir on another filesystem (the same one to every later luksify command)",
        )
    } else {
        (
            "it is unmounted before the header is written, and the header must stay readable to open the volume",
            "pick a directory on another filesystem (e.g. /root/luks-headers)",
        )
    };
    Some(format!(
        "BLOCKER: {flag} {} is on {}, a volume being encrypted: {why}; fix: {example}",
        path.display(),
        p.device.display()
    ))
}

/// The plan whose filesystem (or one nested below it) holds `path`, or would once it
/// exists: its nearest existing ancestor says where it will be.
fn volume_holding<'a>(path: &Path, plans: &'a [Plan]) -> Option<&'a Plan> {
    use std::os::unix::fs::MetadataExt;
    let existing = path.ancestors().find(|a| a.exists())?;
    let on = mountinfo::DevNum::from_raw(std::fs::metadata(existing).ok()?.dev());
    plans.iter().find(|p| {
        p.report.dev.parse_devnum() == on
            || p.report
                .nested_mounts
                .iter()
                .any(|n| n.source.as_deref().and_then(probe::block_dev_num) == Some(on))
    })
}

/// The volume's mapping name: `luksify-<kernel name>`, or, when another volume already
/// maps (or will map at boot) under that name, the first free `luksify-<name>-N`.
/// Kernel names move between boots: a disk that was `loop3` when it was encrypted
/// may be `loop4` now, still mapped as `luksify-loop3` by crypttab, while another
/// disk that took its name is being encrypted.
fn free_mapping_name(device: &Path, req: &EnableRequest, plans: &[Plan]) -> String {
    let crypttab = std::fs::read_to_string(tabs::etc_dir().join("crypttab")).unwrap_or_default();
    let status = crate::status::load(&req.state_dir).unwrap_or_default();
    let taken = |name: &str| {
        Path::new("/dev/mapper")
            .join(name)
            .symlink_metadata()
            .is_ok()
            || tabs::crypttab_names(&crypttab).iter().any(|n| n == name)
            || status
                .volumes
                .iter()
                .any(|v| v.mapper == name && v.device != device)
            || plans.iter().any(|p| p.name == name)
            || crate::map::load_record(&req.state_dir, name).is_some()
    };
    let base = mapping_name(device);
    if !taken(&base) {
        return base;
    }
    (2..)
        .map(|n| format!("{base}-{n}"))
        .find(|n| !taken(n))
        .expect("some suffix is free")
}

/// Per-volume plan made before anything is written.
struct Plan {
    device: PathBuf,
    report: check::Report,
    name: String,
    header: Option<PathBuf>,
}

/// Runs the flow over every volume, one after the other.
pub fn enable(req: &EnableRequest, passphrase: &[u8]) -> Result<()> {
    let detached = req.header_dir.is_some();
    // Preflight every volume first: nothing is written unless all pass.
    let mut plans = Vec::new();
    // Each with its code, as `check --json` names it: kept with a refusal for an agent.
    let mut blockers: Vec<(&str, String)> = Vec::new();
    // Another run or mapping has a device open: exit 4 (busy), as the lock would.
    let mut busy = false;
    for v in &req.volumes {
        let opts = CheckOptions {
            detached_header: detached,
            kill_holders: req.kill_holders,
            listing: false,
        };
        let mut report = check::check(v, opts).map_err(|p| {
            let p = check::offline_volume_at(v, &req.state_dir).unwrap_or(p);
            let code = if p.code == "busy_run" {
                exit::BUSY
            } else {
                exit::BLOCKED
            };
            Failure::new(code, p.one_line()).with_codes(&[p.code])
        })?;
        check::add_interrupted_run(&mut report, &req.state_dir);
        // Encrypted already (open or not, by luksify or another tool): the goal of
        // `enable` is met, so it is skipped, not refused. A refusal (exit 3) left an
        // agent that enables every volume it wants encrypted unable to tell "done" from
        // "blocked", and a run naming one such volume encrypted none of the others
        // (a trial).
        if let Some(p) = already_encrypted(&report) {
            // "Open it with ..." for a closed volume; not how to close an open one.
            let more = p
                .fix
                .strip_prefix("nothing to do")
                .filter(|m| !m.contains("luksify close"))
                .unwrap_or("");
            errln!(
                "luksify: {}: {} ({}); nothing to do{more}",
                v.display(),
                p.what,
                p.why
            );
            continue;
        }
        for p in report.blockers() {
            busy |= p.code == "busy_run";
            blockers.push((p.code, p.one_line()));
        }
        let device = std::fs::canonicalize(&report.device).unwrap_or(report.device.clone());
        if plans.iter().any(|p: &Plan| p.device == device) {
            // The same volume named twice (its device and its mount point): one run.
            continue;
        }
        let name = free_mapping_name(&device, req, &plans);
        let header = req
            .header_dir
            .as_ref()
            .map(|d| d.join(format!("{name}.luks2")));
        // Not beside an interrupted run on the volume: that file may be its only
        // header, and "move it away first" would lose the volume (a trial's soak).
        let interrupted = report
            .problems
            .iter()
            .any(|p| matches!(p.code, "luks_in_progress" | "busy_run"));
        if let Some(h) = header.as_ref().filter(|_| !interrupted) {
            if h.exists() {
                blockers.push((
                    "header_file_exists",
                    format!(
                        "BLOCKER: header file {} already exists: it may belong to another volume; move it away first",
                        h.display()
                    ),
                ));
            }
        }
        plans.push(Plan {
            device,
            report,
            name,
            header,
        });
    }
    // A stopped run's volumes it had not reached are that run's to finish (`resume`):
    // a new run took the run over, and they dropped out of it and of the status file,
    // plain and forgotten while status said "Encryption succeeded" (a trial). The
    // resume that finishes the run is at work itself, so it passes.
    let taken: Vec<&Path> = plans.iter().map(|p| p.device.as_path()).collect();
    if let Some(b) =
        stopped_run_left_out(&req.state_dir, Operation::EnableEncryption, &taken, false)
    {
        blockers.push(("stopped_run_pending", b));
    }
    // Every volume named is encrypted already: nothing to do, nothing written (the
    // status file too stays as it was).
    if plans.is_empty() && blockers.is_empty() {
        // Not a refusal: an earlier one is no longer the latest word on enable.
        if let Err(e) = std::fs::remove_file(req.state_dir.join(crate::status::REFUSED_FILE)) {
            if e.kind() != std::io::ErrorKind::NotFound {
                errln!("luksify: warning: cannot remove the earlier refusal's record ({e})");
            }
        }
        return Ok(());
    }
    // A volume mounted below another one's mount point goes after it: the outer one's
    // run unmounts and mounts again what is nested below it, and the inner one,
    // encrypted first, would then be mounted again from its raw (now encrypted) device.
    plans.sort_by_key(|p| {
        p.report
            .primary_mount()
            .map_or(0, |m| m.mount_point.components().count())
    });
    if let Some(d) = &req.header_dir {
        if let Some(b) = path_on_a_volume("--header-dir", d, &plans) {
            blockers.push(("header_dir_on_volume", b));
        } else if let Some(fs) = probe::volatile_fs(d) {
            // The headers hold the only copy of the volumes' keys: on a filesystem in
            // memory they are gone at the next boot, and the data with them.
            blockers.push((
                "header_dir_volatile",
                format!(
                    "BLOCKER: --header-dir {} is on {fs}, which a reboot empties: the detached headers hold the volumes' only keys, so the data would be lost with them; fix: pick a directory on a disk that is not being encrypted (e.g. /root/luks-headers)",
                    d.display()
                ),
            ));
        } else if let Some((why, fix)) = crate::lock::open_to_others(d) {
            blockers.push((
                "header_dir_open_to_others",
                format!(
                    "BLOCKER: --header-dir {} {why}: another user could move or replace the detached headers, the volumes' only keys; fix: {fix}, or pick a directory only root can write",
                    d.display()
                ),
            ));
        } else if let Some(b) = header_dir_without_room(d, plans.len()) {
            blockers.push(("header_dir_no_room", b));
        }
    }
    blockers.extend(
        path_on_a_volume("--key-file", &req.key_file, &plans).map(|b| ("key_file_on_volume", b)),
    );
    blockers.extend(
        path_on_a_volume("--state-dir", &req.state_dir, &plans).map(|b| ("state_dir_on_volume", b)),
    );
    if let Some(fs) = probe::volatile_fs(&req.state_dir) {
        errln!(
            "luksify: warning: the state directory {} is on {fs}: after a reboot `luksify status` and `luksify resume` will not find this run's records (resume still finds an interrupted walk from its header)",
            req.state_dir.display()
        );
    }
    if let Some(fs) = probe::volatile_fs(&req.key_file) {
        errln!(
            "luksify: warning: --key-file {} is on {fs}: crypttab names it, so after a reboot the volumes are not unlocked at boot until it is back (or the passphrase is typed)",
            req.key_file.display()
        );
    }
    // crypttab fields are split at blanks (systemd and Debian's cryptdisks alike), and a
    // header= option cannot carry one: such a path would break the boot-time mapping.
    let key_file = absolute_key_file(&req.key_file);
    for (what, p) in [
        ("--key-file", Some(key_file.as_path())),
        ("--header-dir", req.header_dir.as_deref()),
    ] {
        if let Some(p) = p.filter(|p| {
            p.to_string_lossy()
                .contains(|c: char| c.is_whitespace() || c == ',')
        }) {
            blockers.push((
                "path_unfit_for_crypttab",
                format!(
                    "BLOCKER: {what} {} has a blank or comma, which crypttab cannot hold (its fields split at blanks, its options at commas); fix: use a path without them",
                    p.display()
                ),
            ));
        }
    }
    blockers.extend(kdf_memory_blocker(&req.kdf).map(|b| ("kdf_memory", b)));
    blockers.extend(tabs::unwritable().map(|b| ("tables_unwritable", format!("BLOCKER: {b}"))));
    if !blockers.is_empty() {
        let code = if busy { exit::BUSY } else { exit::BLOCKED };
        let (codes, lines): (Vec<&str>, Vec<String>) = blockers.into_iter().unzip();
        return Err(Failure::new(code, lines.join("\n")).with_codes(&codes));
    }
    // Once the preflight passed (a refusal stays one line). It becomes the volumes'
    // boot-time key (crypttab names it): readable by others, it is anyone's key to them.
    // Warned, as systemd-cryptsetup warns (a trial's 0644 key file went into crypttab
    // without a word).
    {
        use std::os::unix::fs::PermissionsExt;
        if let Some(mode) = std::fs::metadata(&req.key_file)
            .ok()
            .map(|m| m.permissions().mode() & 0o777)
            .filter(|m| m & 0o077 != 0)
        {
            errln!(
                "luksify: warning: --key-file {} can be read by other users (mode {mode:04o}), and crypttab will name it as the volumes' key: `chmod 600 {}`",
                req.key_file.display(),
                req.key_file.display()
            );
        }
    }
    if let Some(d) = &req.header_dir {
        crate::status::create_dirs(d, 0o700).map_err(|e| {
            Failure::failed(format!("cannot create --header-dir {} ({e})", d.display()))
        })?;
    }
    let mut sw = StatusWriter::open(&req.state_dir)
        .map_err(|e| Failure::failed(format!("status file: {e}")))?;
    // A resume going on with a stopped run's volumes stays a resume.
    let op = if req.continues.is_empty() {
        Operation::EnableEncryption
    } else {
        Operation::Resume
    };
    // A stopped run's volumes that `resume` now begins (it marked them in its run) keep
    // the LUKS UUIDs that run recorded before anything was written: a new one was
    // drawn, and an agent that had kept it saw it change (a trial).
    let recorded_uuids: Vec<(PathBuf, String)> = sw
        .status
        .volumes
        .iter()
        .filter(|v| {
            sw.status.operation == Operation::Resume
                && v.in_run
                && v.state == VolumeState::NotEncrypted
        })
        .filter_map(|v| Some((v.device.clone(), v.luks_uuid.clone()?)))
        .collect();
    sw.status.begin_run(op, std::process::id(), |v| {
        plans.iter().any(|p| p.device == v.device) || req.continues.contains(&v.device)
    });
    for p in &plans {
        let m = p.report.primary_mount();
        let luks_uuid = recorded_uuids
            .iter()
            .find(|(d, _)| *d == p.device)
            .map(|(_, u)| u.clone())
            .unwrap_or_else(luksify_luks::new_uuid);
        sw.status.upsert(VolumeStatus {
            device: p.device.clone(),
            mapper: p.name.clone(),
            mount_point: m.map(|m| m.mount_point.clone()),
            mount_options: m.map(|m| m.options.clone()),
            fs_type: Some(p.report.filesystem.fs_type.clone()),
            fs_bytes: p.report.filesystem.fs_bytes,
            fs_uuid: probe::type_and_uuid(&p.device).map(|(_, u)| u),
            fs_label: probe::fs_label(&p.device),
            luks_uuid: Some(luks_uuid),
            header: p.header.clone(),
            key_file: Some(key_file.clone()),
            state: VolumeState::NotEncrypted,
            // What the walk will cover, known before it begins: an agent polling at 0%
            // divided by a total of 0 (a trial). A header in front leaves its reserve
            // at the end unwalked; the walker's first report gives the same figure.
            bytes_total: if p.header.is_some() {
                p.report.size_bytes
            } else {
                p.report.size_bytes.saturating_sub(HEADER_RESERVE_BYTES)
            },
            in_run: true,
            extra_mounts: extra_mounts(p.report.mounts.iter(), m),
            fstab_mount_points: fstab_mount_points(&p.device),
            kdf: Some(req.kdf.clone()),
            nested_mounts: p
                .report
                .nested_mounts
                .iter()
                .filter_map(|n| {
                    Some(crate::status::NestedMount {
                        source: n.source.clone()?,
                        mount_point: n.mount_point.clone(),
                        fs_type: n.fs_type.clone(),
                        options: n.options.clone(),
                    })
                })
                .collect(),
            ..Default::default()
        });
    }
    let order: Vec<PathBuf> = (req.continues.iter().cloned())
        .chain(plans.iter().map(|p| p.device.clone()))
        .collect();
    sw.status.order_run(&order);
    commit(&mut sw)?;
    let before = req.continues.len();
    let n = before + plans.len();
    for (i, p) in plans.iter().enumerate() {
        let idx = sw
            .status
            .volumes
            .iter()
            .position(|v| v.device == p.device)
            .expect("upserted");
        sw.active = Some(idx);
        let r = enable_one(req, passphrase, p, &mut sw, idx, before + i, n);
        if let Err(e) = r {
            // Say what this run did finish before it stopped, and what is left: the
            // same `enable` again is refused, its first volumes being encrypted now (a
            // trial's agent looped on it). Not "nothing written" either: a refusal of
            // this volume (exit 3 or 4) is a failure of the run (exit 1) then.
            let list = |ps: &[Plan]| {
                ps.iter()
                    .map(|p| p.device.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let e = match &plans[..i] {
                [] => e,
                done => Failure::new(
                    if matches!(e.code, exit::BLOCKED | exit::BUSY) {
                        exit::FAILED
                    } else {
                        e.code
                    },
                    format!(
                        "{}; already encrypted by this run: {}{}",
                        e.message,
                        list(done),
                        if e.code == exit::INTERRUPTED {
                            String::new()
                        } else {
                            format!(
                                " (run enable again for the rest only: {})",
                                plans[i..]
                                    .iter()
                                    .map(|p| format!("--volume {}", p.device.display()))
                                    .collect::<Vec<_>>()
                                    .join(" ")
                            )
                        }
                    ),
                ),
            };
            return Err(end_run_failed(&mut sw, idx, e));
        }
    }
    sw.active = None;
    sw.status.end_run();
    commit(&mut sw)
}

/// Ends a run that failed on volume `idx`: the error goes on the volume (an interrupted
/// walk keeps its state and says how it continues; one stopped before its walk was put
/// back and says so), the run's pid is cleared.
fn end_run_failed(sw: &mut StatusWriter, idx: usize, e: Failure) -> Failure {
    if let Some(v) = sw.status.volumes.get_mut(idx) {
        let walking = matches!(
            v.state,
            VolumeState::EncryptionInProgress | VolumeState::DecryptionInProgress
        );
        if e.code != exit::INTERRUPTED || !walking {
            v.error = Some(e.message.clone());
        }
    }
    sw.active = None;
    sw.status.end_run();
    let _ = sw.commit();
    e
}

fn commit(sw: &mut StatusWriter) -> Result<()> {
    sw.commit().map_err(|e| {
        // (A trial filled the state directory mid-run: the bare error left the volume
        // unmounted with no word of what to do.)
        Failure::failed(format!(
            "cannot write the status file in {} ({e}); fix: free space there or make it writable, then run `luksify resume`, which goes on from what the volumes' headers record (when it finds nothing to resume, nothing was written: run the same command again)",
            sw.dir().display()
        ))
    })
}

fn enable_one(
    req: &EnableRequest,
    passphrase: &[u8],
    p: &Plan,
    sw: &mut StatusWriter,
    idx: usize,
    i: usize,
    n: usize,
) -> Result<()> {
    let dev = p.report.dev.parse_devnum();
    // From here the volume may go offline: the status says the encryption is under way,
    // so that `resume` finds it whatever instant the run is killed at.
    sw.status.volumes[idx].state = VolumeState::EncryptionInProgress;
    sw.status.volumes[idx].phase = Some("unmounting".into());
    commit(sw)?;
    let held = hold_fstab(&sw.status.volumes[idx]);
    let fs = FsFacts {
        fs_type: p.report.filesystem.fs_type.clone(),
        dev_size: p.report.size_bytes,
        min_io: p.report.filesystem.min_io,
    };
    let nested = sw.status.volumes[idx].nested_mounts.clone();
    let unmounted = (|| {
        if req.kill_holders && !p.report.holders.is_empty() {
            stop_holders(&p.device, &holders::pids(&p.report.holders), req.cancel)?;
        }
        held?;
        not_cancelled(req.cancel)?;
        unmount_nested(&p.device, &nested, FIX_ENABLE)?;
        unmount_all(&p.device, dev, FIX_ENABLE)
    })();
    let header = p.header.as_deref();
    let run = (req, passphrase, sw, idx, (i, n));
    encrypt_unmounted(run, &p.device, header, &fs, unmounted)
}

/// The volume's mount points in fstab: the one it is mounted at and every other entry.
fn fstab_points(v: &VolumeStatus) -> Vec<&Path> {
    v.mount_point
        .iter()
        .chain(&v.fstab_mount_points)
        .map(PathBuf::as_path)
        .collect()
}

/// `nofail` on the volume's fstab entries while it is walked (see `tabs::fstab_hold`):
/// a boot in the middle skips the mount instead of failing on ciphertext.
fn hold_fstab(v: &VolumeStatus) -> Result<()> {
    let path = tabs::etc_dir().join("fstab");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let points = fstab_points(v);
    if tabs::fstab_hold(&text, &points) == text {
        return Ok(());
    }
    tabs::edit_file(&path, |t| tabs::fstab_hold(t, &points)).map_err(|e| {
        Failure::failed(format!(
            "cannot update fstab in {} ({e}); fix: free space there or make fstab writable, then run again",
            tabs::etc_dir().display()
        ))
    })
}

/// Gives the volume's fstab entries back as they were before [`hold_fstab`].
fn release_fstab(v: &VolumeStatus) {
    let path = tabs::etc_dir().join("fstab");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let mut new = text.clone();
    for mp in fstab_points(v) {
        new = tabs::fstab_release(&new, Some(mp));
    }
    if new != text {
        let _ = tabs::edit_file(&path, |_| new.clone());
    }
}

/// The run a volume's encryption belongs to: the request, the passphrase, the status
/// writer, the volume's index there, and its place in the run (i of n).
type RunOf<'a> = (
    &'a EnableRequest<'a>,
    &'a [u8],
    &'a mut StatusWriter,
    usize,
    (usize, usize),
);

/// Once the volume is `unmounted`: fsck and shrink it, create and reserve the detached
/// header, then walk. A failure before the walk (the unmount included), or a stop asked
/// for by SIGINT/SIGTERM/SIGHUP by then, mounts it again (grown back if this shrank it) and
/// leaves it NotEncrypted.
fn encrypt_unmounted(
    (req, passphrase, sw, idx, (i, n)): RunOf<'_>,
    device: &Path,
    header: Option<&Path>,
    fs: &FsFacts,
    unmounted: Result<()>,
) -> Result<()> {
    let mut shrunk = false;
    // A shrink of ours cut by a power cut (resize2fs is not crash-safe: a CI power cut
    // left "Resize inode not valid" and resume refused the volume for good): recorded
    // before it may begin, so that `resume` knows the damage is its own and repairs it.
    let cut_shrink = sw.status.volumes[idx].shrinking;
    let shrink_began = std::cell::Cell::new(false);
    let prepared = unmounted
        .and_then(|()| {
            let v = &mut sw.status.volumes[idx];
            if header.is_none() && is_ext(&fs.fs_type) {
                v.shrinking = true;
                v.phase = Some("checking and shrinking the filesystem".into());
            } else if is_ext(&fs.fs_type) {
                v.phase = Some("checking the filesystem".into());
            }
            commit(sw)?;
            prepare_fs(device, header, fs, req.cancel, (cut_shrink, &shrink_began))
        })
        .and_then(|s| {
            shrunk = s;
            sw.status.volumes[idx].shrinking = false;
            sw.status.volumes[idx].phase = Some("deriving the key".into());
            commit(sw)?;
            not_cancelled(req.cancel)
        })
        .and_then(|()| {
            header
                .map(|h| create_header(h, header_bytes(), "pick another --header-dir"))
                .transpose()
        });
    let header_file = match prepared {
        Ok(f) => f,
        // (No header file yet: creating it is the last step.) A resize2fs that failed
        // part way (no space or an I/O error under it) left the filesystem "clean with
        // errors", and it was mounted again read-write as it was, blocks in use marked
        // free (a trial): what it left is put right the way it says, `e2fsck -f -y`,
        // before it is grown back and mounted, and stays unmounted if that fails.
        Err(e) => {
            let shrunk = shrunk || shrink_began.get();
            return Err(back_out_encryption(sw, idx, e, device, None, (fs, shrunk)));
        }
    };
    encrypt_prepared(
        req,
        passphrase,
        device,
        header.zip(header_file),
        (fs, shrunk),
        sw,
        idx,
        i,
        n,
    )
}

/// A failure before the walker wrote anything: what came off (the volume, what was
/// nested below it, its other mounts) is mounted again from `from` (the plain device, or
/// the mapping a disable had not closed yet), and the volume's state goes back to `state`.
fn put_back(
    sw: &mut StatusWriter,
    idx: usize,
    e: Failure,
    from: &Path,
    state: VolumeState,
    verb: &str,
    grow: Option<&str>,
) -> Failure {
    let v = sw.status.volumes[idx].clone();
    let dev = v.device.display();
    // A failed unmount leaves the volume where it was: not "mounted again".
    let num = probe::block_dev_num(from);
    let stayed = v.mount_point.as_deref().is_some_and(|mp| {
        mountinfo::read()
            .unwrap_or_default()
            .iter()
            .any(|m| Some(m.dev) == num && m.mount_point == mp)
    });
    let tail = match (grow_and_remount(&v, grow, from), &v.mount_point) {
        (Ok(()), Some(mp)) => format!(
            "; nothing on {dev} was {verb} and {} is {}",
            mp.display(),
            if stayed {
                "still mounted"
            } else {
                "mounted again"
            }
        ),
        (Ok(()), None) => format!("; nothing on {dev} was {verb}"),
        (Err(m), _) => format!(
            "; nothing on {dev} was {verb}, but mounting it again failed: {}",
            m.message
        ),
    };
    if state == VolumeState::NotEncrypted {
        release_fstab(&v);
    }
    // Its progress as the state it is back in says (a disable backed out read
    // "Encrypted" at 0%; trial A2).
    let s = &mut sw.status.volumes[idx];
    s.state = state;
    (s.bytes_done, s.percent) = if state == VolumeState::Encrypted {
        (s.bytes_total, 100.0)
    } else {
        (0, 0.0)
    };
    Failure::new(e.code, format!("{}{tail}", e.message))
}

/// An encryption that wrote nothing: the detached header file it created (still no
/// header in it) goes, and the volume is put back plain ([`put_back`]), grown back if
/// `shrunk`.
fn back_out_encryption(
    sw: &mut StatusWriter,
    idx: usize,
    e: Failure,
    device: &Path,
    header: Option<&Path>,
    (fs, shrunk): (&FsFacts, bool),
) -> Failure {
    if let Some(h) = header.filter(|h| header_absent(h)) {
        sw.status.volumes[idx].header_reserved = false;
        let _ = std::fs::remove_file(h);
    }
    // Put back and told: no later run repairs it on its own.
    sw.status.volumes[idx].shrinking = false;
    put_back(
        sw,
        idx,
        e,
        device,
        VolumeState::NotEncrypted,
        "encrypted",
        shrunk.then_some(fs.fs_type.as_str()),
    )
}

/// The size of the detached header `enable` writes: both metadata copies and the
/// keyslots area at the default format (16 MiB).
fn header_bytes() -> u64 {
    FormatOptions::default().header_size().unwrap_or(16 << 20)
}

/// Creates the detached header file and reserves its whole size (`size` bytes) before
/// the walker writes anything, so that a header directory without room is found while
/// the volume is still plain (its caller mounts it again), not as "no space" half way
/// through the header's first write. `elsewhere`: the other place to put it, if any.
fn create_header(h: &Path, size: u64, elsewhere: &str) -> Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(h)
        .map_err(|e| {
            // Room for blocks but no inode left: "No space left on device" beside a `df`
            // that shows room (a trial).
            let why = if e.raw_os_error() == Some(libc::ENOSPC) {
                format!(
                    "; its filesystem has no free inode (`df -i {}`) or no room: free some there",
                    h.parent().unwrap_or(h).display()
                )
            } else {
                String::new()
            };
            Failure::failed(format!(
                "cannot create the header file {} ({e}){why}",
                h.display()
            ))
        })?;
    if let Err(e) = luksify_walker::device::reserve(&f, size) {
        drop(f);
        let _ = std::fs::remove_file(h);
        let fix = if e.raw_os_error() == Some(libc::EFBIG) {
            "a file-size limit is in force: run luksify without one, `ulimit -f unlimited` (LimitFSIZE=infinity in a unit)".to_string()
        } else if elsewhere.is_empty() {
            "free space there".to_string()
        } else {
            format!("free space there, or {elsewhere}")
        };
        return Err(Failure::failed(format!(
            "cannot reserve {} MiB for the header file {} ({e}); fix: {fix}",
            size.div_ceil(1 << 20),
            h.display()
        )));
    }
    Ok(f)
}

/// A refusal when the filesystem of `--header-dir` has no room for the `n` headers the
/// run will write there.
fn header_dir_without_room(dir: &Path, n: usize) -> Option<String> {
    let existing = dir.ancestors().find(|a| a.exists())?;
    let free = probe::statvfs_free(existing)?;
    let need = header_bytes() * n as u64;
    (free < need).then(|| {
        format!(
            "BLOCKER: --header-dir {} has {} MiB free, and the header{} of this run need{} {} MiB; fix: free space there, or pick a directory on another filesystem",
            dir.display(),
            free >> 20,
            if n == 1 { "" } else { "s" },
            if n == 1 { "s" } else { "" },
            need.div_ceil(1 << 20)
        )
    })
}

/// What the encryption step needs to know of the filesystem it is about to encrypt.
struct FsFacts {
    fs_type: String,
    dev_size: u64,
    min_io: Option<u32>,
}

/// fsck and shrink (ext, header in front) of the unmounted volume. Also the restart
/// point when power was cut before the walker's first header commit: every step here is
/// idempotent (a shrunk filesystem is not shrunk again). Says whether the filesystem is
/// shrunk for the header now (by this call or, ending exactly there, by an earlier run),
/// which a stop before the walk undoes. Asked to stop (SIGINT/SIGTERM/SIGHUP), it does not
/// start the next step, and its caller refuses to go on.
fn prepare_fs(
    device: &Path,
    header: Option<&Path>,
    fs: &FsFacts,
    cancel: &AtomicBool,
    (cut_shrink, shrink_began): (bool, &std::cell::Cell<bool>),
) -> Result<bool> {
    // Unmounted now, so an exclusive open fails only while another process holds the
    // device exclusively: a luksify run from another state directory walking it, a
    // mapping. e2fsck must not run under it.
    if probe::held_exclusively(device) {
        return Err(Failure::new(
            exit::BUSY,
            format!(
                "{} is held exclusively by another process (a luksify run from another state directory, a mapping, a mount in another namespace, an overlay, a loop device over a file on it); `luksify check {}` names what it can see; else look for it (`grep {} /proc/*/mountinfo`, `findmnt -t overlay`, `losetup -l`)",
                device.display(),
                device.display(),
                probe::block_dev_num(device).map(|d| d.to_string()).unwrap_or_default()
            ),
        ));
    }
    let dev_size = fs.dev_size;
    // A `--reduce-device-size` start of an earlier run cut while it wrote its first
    // header: the filesystem was checked and shrunk then; its head may be overwritten,
    // its first part only in the copy moved to the end, which the walker puts back.
    // e2fsck must not see (and "repair") it first: that lost files (a trial).
    if let Some((reduce, was)) = std::fs::File::open(device)
        .ok()
        .and_then(|f| luksify_walker::interrupted_shift_start(&f).ok().flatten())
    {
        if header.is_none() && reduce == HEADER_RESERVE_BYTES && was == dev_size {
            return Ok(true);
        }
        return Err(Failure::failed(format!(
            "{} holds an interrupted `luksify encrypt --reduce-device-size {}M` start of {} bytes: its first part is only in the copy moved to its end; run `luksify encrypt {} --key-file F --reduce-device-size {}M` to continue it (nothing was written)",
            device.display(),
            reduce >> 20,
            was,
            device.display(),
            reduce >> 20
        )));
    }
    let mut shrunk = false;
    if is_ext(&fs.fs_type) {
        not_cancelled(cancel)?;
        // Unmounted now: a journal not replayed shows here. e2fsck -n skips the replay
        // and passes it; the shrink and the walk would then take a stale image, and the
        // replay afterwards loses files (a trial). `check` refuses a crashed or `noload`
        // filesystem before `enable` begins; what reaches this is a run of ours cut by
        // a power cut while the volume was still mounted, which `resume` starts again on
        // the filesystem it recorded. Its journal is replayed as the kernel's next mount
        // would replay it, and nothing else is repaired.
        if probe::detect_fs(device).is_ok_and(|f| f.needs_recovery) {
            let out = e2fsck(&["-p", "-E", "journal_only"], device)?;
            if !matches!(out.status.code(), Some(0 | 1))
                || probe::detect_fs(device).is_ok_and(|f| f.needs_recovery)
            {
                return Err(Failure::failed(format!(
                    "{} holds an ext journal that was not replayed (needs_recovery), and `e2fsck -E journal_only` did not replay it; nothing was written: mount it once and unmount it (the kernel replays the journal), or run `e2fsck {}`, then run again",
                    device.display(),
                    device.display()
                )));
            }
        }
        if cut_shrink {
            // The one repair luksify makes: what its own cut resize2fs left half done,
            // on the filesystem its run recorded (e2fsck is resize2fs's recovery). Run
            // whatever `e2fsck -n` says: a resize2fs killed early leaves only the
            // superblock's state marked (errors, or not clean), which `e2fsck -n`
            // passes and `resize2fs` refuses (a trial's resume then gave up).
            errln!(
                "luksify: {}: the run's shrink for the header was cut (a kill or a power cut); e2fsck -f -y puts right what resize2fs left half done",
                device.display()
            );
            fsck_ext(device)?;
        }
        fsck_ext_read_only(device)?;
        if header.is_none() {
            // Read once, after the replay or repair above may have changed it.
            let now = probe::detect_fs(device).ok();
            let fs_bytes = now.as_ref().and_then(|f| f.fs_bytes).unwrap_or(dev_size);
            let target = dev_size - HEADER_RESERVE_BYTES;
            shrunk = fs_bytes == target;
            // resize2fs's own estimate first: a filesystem filled since the preflight (a
            // `resume` that starts a run again checks nothing else) made `resize2fs -f`
            // fail on ENOSPC part way, its superblock left "clean with errors" (a trial).
            if fs_bytes > target {
                let bs = now.as_ref().and_then(|f| f.block_size);
                // resize2fs refusing even the estimate (it wants `e2fsck -f` first) is
                // never forced past with -f below (a trial's journal-dirty ext4).
                let min = match bs.map(|b| probe::ext_min_bytes_or_why(device, b)) {
                    Some(Err(why)) => {
                        return Err(Failure::failed(format!(
                            "resize2fs -P {} refused ({why}); nothing was written: run `e2fsck -f {}` yourself, then run again",
                            device.display(),
                            device.display()
                        )))
                    }
                    Some(Ok(min)) => Some(min),
                    None => None,
                };
                if let Some(min) = min {
                    if min > target {
                        return Err(Failure::failed(format!(
                            "{} cannot shrink by the {} MiB the header needs: resize2fs estimates its smallest size at {} MiB, over the {} MiB left; nothing was written: free at least {} MiB on it, or keep the header in a file (`luksify enable --header-dir DIR`)",
                            device.display(),
                            HEADER_RESERVE_BYTES >> 20,
                            min.div_ceil(1 << 20),
                            target >> 20,
                            (min - target).div_ceil(1 << 20)
                        )));
                    }
                }
            }
            // Asked to stop during e2fsck: the caller refuses to go on.
            if fs_bytes > target && !cancel.load(Ordering::Relaxed) {
                shrink_began.set(true);
                run_tool(
                    crate::tool("resize2fs")
                        .arg("-f")
                        .arg(device)
                        .arg(format!("{}K", target / 1024)),
                    &format!(
                        "shrink the filesystem on {} by {} MiB for the header",
                        device.display(),
                        HEADER_RESERVE_BYTES >> 20
                    ),
                )?;
                shrunk = true;
            }
        }
    }
    Ok(shrunk)
}

/// The walk from the very start of a prepared volume (the walker recognises its own
/// start-up marker for a data shift, so a cut start continues), then map and remount.
#[allow(clippy::too_many_arguments)]
fn encrypt_prepared(
    req: &EnableRequest,
    passphrase: &[u8],
    device: &Path,
    header: Option<(&Path, std::fs::File)>,
    (fs, shrunk): (&FsFacts, bool),
    sw: &mut StatusWriter,
    idx: usize,
    i: usize,
    n: usize,
) -> Result<()> {
    sw.status.volumes[idx].state = VolumeState::EncryptionInProgress;
    // Its header file exists from now on: missing later, it was not "never created".
    sw.status.volumes[idx].header_reserved = header.is_some();
    commit(sw)?;
    let data = match DataDevice::open(device, false) {
        Ok(d) => d,
        Err(e) => {
            // Nothing written (its geometry, a read-only device): the volume goes back as
            // it was, not left unmounted and shrunk under "EncryptionInProgress" (a
            // trial's 4096-byte-sector loop device of a partial last sector). Held by
            // someone else (EBUSY): not ours to mount again.
            let busy = e.raw_os_error() == Some(libc::EBUSY);
            let f = open_data_failure(device, "for encryption", "something still holds it", e);
            if busy {
                return Err(f);
            }
            let (header, header_file) = header.unzip();
            drop(header_file);
            return Err(back_out_encryption(
                sw,
                idx,
                f,
                device,
                header,
                (fs, shrunk),
            ));
        }
    };
    // The run's own request: a `resume` that starts this walk again (or for the first
    // time, for a volume its run had not reached) has none of its own.
    let kdf = sw.status.volumes[idx]
        .kdf
        .clone()
        .unwrap_or_else(|| req.kdf.clone());
    let format = FormatOptions {
        kdf,
        sector_size: encryption_sector_size(fs.min_io, fs.dev_size),
        // Given before the walk, so that `resume` knows the volume by it.
        uuid: sw.status.volumes[idx].luks_uuid.clone(),
        ..Default::default()
    };
    let placement = match header {
        Some(_) => Placement::Detached {
            resilience: Resilience::Journal,
        },
        None => Placement::Shift {
            reduce: HEADER_RESERVE_BYTES,
        },
    };
    let opts = EncryptOptions {
        placement,
        format,
        checksum_hash: luksify_walker::Hash::Sha256,
        tuning: Default::default(),
    };
    let (header, header_file) = header.unzip();
    // Whether the walker refused before its first write (its own checks of the device,
    // e.g. a swap area reaching into the header's room).
    let refused = std::cell::Cell::new(false);
    let walked = walk(sw, idx, i, n, req, |ctl| {
        let r = match &header_file {
            Some(hf) => luksify_walker::encrypt(&data, Some(hf), passphrase, &opts, ctl),
            None => {
                luksify_walker::encrypt::<_, std::fs::File, _>(&data, None, passphrase, &opts, ctl)
            }
        };
        // (Not Busy: then another run owns the volume, and nothing may be put back.)
        refused.set(matches!(r, Err(luksify_walker::Error::Refused(_))));
        r
    });
    let outcome = match walked {
        Ok(o) => o,
        // Refused with nothing written: nothing is encrypted, so the volume goes back as
        // it was, and the failure says what to change, not "resume" (which would only
        // refuse again: a trial's inactive swap area stayed EncryptionInProgress).
        Err(e) if refused.get() => {
            drop(data);
            drop(header_file);
            let msg = e.message.replace(
                "; the header records progress, `luksify resume` continues it",
                "",
            );
            let f = Failure::new(e.code, msg);
            return Err(back_out_encryption(
                sw,
                idx,
                f,
                device,
                header,
                (fs, shrunk),
            ));
        }
        // No header was committed: nothing is encrypted, and resume starts over.
        Err(e) => {
            return Err(match header_progress(header.unwrap_or(device)) {
                // Read back and empty: not when it cannot be read (an I/O error said
                // "nothing is encrypted" of a run half done; a trial).
                HeaderProgress::Absent => Failure::new(
                    e.code,
                    e.message.replace(
                        "the header records progress, `luksify resume` continues it",
                        "no header was written yet, so nothing is encrypted; `luksify resume` starts it again",
                    ),
                ),
                _ => e,
            });
        }
    };
    drop(data);
    if outcome == Outcome::NotStarted {
        // Stopped during the key derivation: nothing written, put it back.
        drop(header_file);
        let stop = not_cancelled(req.cancel).expect_err("the walker saw the stop");
        return Err(back_out_encryption(
            sw,
            idx,
            stop,
            device,
            header,
            (fs, shrunk),
        ));
    }
    finish_volume(req, passphrase, sw, idx, outcome)
}

/// The largest encryption sector (<= 4096) the filesystem's own I/O unit allows: a
/// 1 KiB-block ext4 under 4 KiB sectors would no longer mount (cryptsetup makes the
/// same choice when it encrypts a device in place). On a device of `dev_size` bytes
/// that is not whole sectors of that size (a partition of an odd number of 512-byte
/// sectors) the last one could not be encrypted: 512 there, as cryptsetup reverts to.
/// (The header in front takes whole MiB, so the data area ends as the device does.)
pub fn encryption_sector_size(fs_min_io: Option<u32>, dev_size: u64) -> u32 {
    let s = match fs_min_io {
        Some(n) if n >= 4096 => 4096,
        Some(n) if n >= 512 && n.is_power_of_two() => n,
        _ => 512,
    };
    if dev_size.is_multiple_of(u64::from(s)) {
        s
    } else {
        512
    }
}

/// Runs a walker operation with progress going to the status file and the reporter.
fn walk(
    sw: &mut StatusWriter,
    idx: usize,
    i: usize,
    n: usize,
    req: &EnableRequest,
    f: impl FnOnce(&Control<'_>) -> luksify_walker::Result<Outcome>,
) -> Result<Outcome> {
    let device = sw.status.volumes[idx].device.clone();
    let what = if sw.status.volumes[idx].state == VolumeState::DecryptionInProgress {
        "decryption"
    } else {
        "encryption"
    };
    let rate = Rate::new();
    let shared = Mutex::new((sw, true));
    // TEST-ONLY hook (documented in docs/orchestrator.md): sleeps after each progress
    // report so that tests can kill a run while it is certainly mid-walk. It only
    // slows the walk, never changes what is written or where the journal stands, and is
    // capped at 1 s per step so a stray setting cannot stall a real run for long.
    let delay = std::env::var("LUKSIFY_TEST_PROGRESS_DELAY_MS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(|ms| Duration::from_millis(ms.min(1000)));
    let progress = |pi: ProgressInfo| {
        let mut g = shared.lock().unwrap_or_else(|e| e.into_inner());
        let (sw, first) = &mut *g;
        if let Some(v) = sw.status.volumes.get_mut(idx) {
            // Walking: the percentage says it from here.
            v.phase = None;
            rate.apply(v, pi.done, pi.total);
            (req.report)(v, i, n);
        }
        // The first progress is a change worth writing at once; later ones are throttled.
        let _ = if std::mem::take(first) {
            sw.commit()
        } else {
            sw.tick()
        };
        drop(g);
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
    };
    let ctl = Control {
        progress: Some(&progress),
        cancel: Some(req.cancel),
        ..Control::system()
    };
    let r = f(&ctl);
    match r {
        Ok(o) => Ok(o),
        // The key file given, or recorded at enable, does not open the header: `resume`
        // alone would read the same file again and fail the same way.
        Err(e @ luksify_walker::Error::WrongPassphrase) => Err(Failure::new(crate::exit::WRONG_PASSPHRASE, format!(
            "{what} of {} failed: {e}; the header records progress, `luksify resume --key-file F` continues it with the file F that holds the right passphrase",
            device.display()
        ))),
        Err(e) => Err(Failure::failed(format!(
            "{what} of {} failed: {e}; the header records progress, `luksify resume` continues it",
            device.display()
        ))),
    }
}

/// After the walk: map, remount, grow, write crypttab/fstab, mark Encrypted.
fn finish_volume(
    req: &EnableRequest,
    passphrase: &[u8],
    sw: &mut StatusWriter,
    idx: usize,
    outcome: Outcome,
) -> Result<()> {
    let v = sw.status.volumes[idx].clone();
    if outcome == Outcome::NotStarted {
        return Err(Failure::failed(
            "internal: an encryption not started is put back by its caller",
        ));
    }
    if let Outcome::Interrupted(_) = outcome {
        commit(sw)?;
        // The run's volumes not reached, as `status` names them (a trial's three-volume
        // run said only the first).
        let left = crate::status::not_started_yet(
            sw.status
                .volumes
                .iter()
                .filter(|o| o.in_run && o.state == VolumeState::NotEncrypted && o.error.is_none())
                .map(|o| o.device.as_path()),
        );
        return Err(Failure::new(
            exit::INTERRUPTED,
            format!(
                "encryption of {} stopped at {}% on request{left}; run `luksify resume` to finish the run",
                v.device.display(),
                // Floored, as the status message floors it (rounded, it said 18% there
                // beside 17% in `luksify status`).
                v.percent.floor() as u64
            ),
        ));
    }
    {
        let s = &mut sw.status.volumes[idx];
        if s.state == VolumeState::DecryptionInProgress {
            // A disable put back before its walk (still encrypted): nothing was
            // decrypted, and "100%" read as a finished decryption (a trial's agent).
            s.percent = 0.0;
            s.bytes_done = 0;
            s.eta_seconds = None;
            s.phase = Some(
                "stopped before its walk; mapping and mounting it again, still encrypted".into(),
            );
        } else {
            s.percent = 100.0;
            s.bytes_done = s.bytes_total;
            s.eta_seconds = Some(0);
            s.phase = Some("mapping and mounting".into());
        }
    }
    commit(sw)?;
    let oreq = OpenRequest {
        device: &v.device,
        name: &v.mapper,
        header: v.header.as_deref(),
        force_userspace: req.force_userspace,
        state_dir: &req.state_dir,
        key_slot: None,
    };
    // A run killed after it mapped the volume left the mapping open: take it over.
    let rec = match map::load_record(&req.state_dir, &v.mapper) {
        Some(r) if r.device == v.device && r.header == v.header && map::is_live(&r) => r,
        _ => map::open(&oreq, passphrase)?,
    };
    sw.status.volumes[idx].mapped_device = Some(rec.mapped.clone());
    // A volume found by scanning (status file lost) knows its mount point only when fstab
    // names the device by path. An entry by the filesystem's UUID= or LABEL= can be read
    // only now, off the open mapping: mount it there, as boot would have.
    let mut v = v;
    if v.mount_point.is_none() && v.fstab_mount_points.is_empty() {
        let entries = fstab_entries(&rec.mapped);
        if let Some(e) = entries.first() {
            let s = &mut sw.status.volumes[idx];
            s.mount_point = Some(e.mount_point.clone());
            s.fs_type = Some(e.fs_type.clone()).filter(|t| t != "auto");
            s.mount_options = Some(e.options.replace(",nofail", ""));
            s.fstab_mount_points = entries.iter().map(|e| e.mount_point.clone()).collect();
            v = s.clone();
            commit(sw)?;
        }
    }
    // A volume found by scanning (status file lost) has no recorded filesystem: read it.
    let fs_type = v.fs_type.clone().or_else(|| {
        probe::detect_fs(&rec.mapped)
            .ok()
            .map(|f| f.fs_type)
            .filter(|t| is_ext(t))
    });
    // Grow back over the room the shrink freed (a no-op with a detached header).
    grow_and_remount(&v, fs_type.as_deref(), &rec.mapped)?;
    write_tabs(&v, &rec.mapped)?;
    let s = &mut sw.status.volumes[idx];
    s.state = VolumeState::Encrypted;
    s.error = None;
    // Encrypted is 100% (a disable put back read 0% until then: not decrypted).
    s.percent = 100.0;
    s.bytes_done = s.bytes_total;
    s.phase = None;
    commit(sw)
}

/// Grows an ext filesystem on `dev` back to the size `enable` found it at, as far as
/// `dev` holds it (offline: online resizing needs CAP_SYS_RESOURCE, which containers
/// often drop), then mounts `dev` where the volume was mounted, with its original
/// options, and puts its nested mounts back. A filesystem at that size already (never
/// shrunk: a detached header, or one smaller than its device) is not resized: a trial's
/// 100 MiB ext4 on a 200 MiB device came back 168 MiB, its tail made free space, and a
/// bigalloc ext4, which resize2fs grows only with -f, failed after its walk.
fn grow_and_remount(v: &VolumeStatus, fs_type: Option<&str>, dev: &Path) -> Result<()> {
    // Already back (a run killed after this step): grown, mounted; only nested mounts may
    // be missing.
    let num = probe::block_dev_num(dev);
    let mounted = |mp: &Path| {
        mountinfo::read()
            .unwrap_or_default()
            .iter()
            .any(|m| Some(m.dev) == num && m.mount_point == mp)
    };
    if let Some(mp) = v.mount_point.as_deref().filter(|mp| mounted(mp)) {
        remount_nested(&v.nested_mounts)?;
        return remount_extras(mp, &v.extra_mounts);
    }
    if fs_type.is_some_and(is_ext) {
        fsck_ext(dev)?;
        if let Some(to) = grow_target(v, dev) {
            let mut resize = crate::tool("resize2fs");
            resize.arg(dev);
            let what = match to {
                Some(bytes) => {
                    resize.arg(format!("{}K", bytes / 1024));
                    format!(
                        "grow the filesystem on {} back to its {} MiB",
                        dev.display(),
                        bytes >> 20
                    )
                }
                None => format!("grow the filesystem over all of {}", dev.display()),
            };
            run_tool(&mut resize, &what)?;
        }
    }
    if let Some(mp) = &v.mount_point {
        let opts = recorded_mount_options(v);
        run_tool(
            crate::tool("mount").arg("-o").arg(&opts).arg(dev).arg(mp),
            &format!("remount {} at {}", dev.display(), mp.display()),
        )?;
        remount_nested(&v.nested_mounts)?;
        remount_extras(mp, &v.extra_mounts)?;
    }
    Ok(())
}

/// The options `v` was mounted with, as mount(8) takes them again ("defaults" if none
/// was recorded): less what the kernel shows but refuses as input, in records from
/// before that was left out too.
fn recorded_mount_options(v: &VolumeStatus) -> String {
    v.mount_options.as_deref().map_or_else(
        || "defaults".into(),
        |o| mountinfo::mountable_options(v.fs_type.as_deref().unwrap_or(""), o),
    )
}

/// How far to grow the filesystem on `dev`: to its size when `enable` found it (or as
/// much of that as `dev` holds), `None` when it is that size already; `Some(None)` (all
/// of `dev`) for a volume recorded before its size was. One grown since to fill its
/// mapping fills `dev` (the header's room in front, freed by `disable`).
fn grow_target(v: &VolumeStatus, dev: &Path) -> Option<Option<u64>> {
    let Some(was) = v.fs_bytes else {
        return Some(None);
    };
    let room = probe::device_size(dev).unwrap_or(was);
    let now = probe::detect_fs(dev).ok().and_then(|f| f.fs_bytes)?;
    // Grown since `enable` (the device grown, the filesystem grown through the mapping
    // to fill it): a decryption frees the header's room in front, which goes to it too.
    // `disable` kept it at its grown size, 16 MiB of the device unused (a trial).
    if now > was {
        return (now < room && room - now <= HEADER_RESERVE_BYTES / 2).then_some(Some(room));
    }
    let target = was.min(room);
    (now < target).then_some(Some(target))
}

/// A name for `device` that survives a reboot, for crypttab: a /dev/disk/by-id link
/// (`wwn-`, then others), else a by-path link, else `PARTUUID=` of a partition, else
/// the kernel name (`/dev/sdc` may be another disk after a reboot: said on stderr).
/// A detached header leaves nothing on the device itself to find it by.
fn stable_device_name(device: &Path) -> String {
    if let Some(link) = stable_link(Path::new("/dev/disk"), device) {
        return link.display().to_string();
    }
    let partuuid = crate::tool("blkid")
        .args(["-o", "value", "-s", "PARTUUID"])
        .arg(device)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty());
    if let Some(u) = partuuid {
        return format!("PARTUUID={u}");
    }
    errln!(
        "luksify: warning: crypttab names {} by its kernel name, which may change at reboot (no /dev/disk/by-id link or PARTUUID found); edit it if so",
        device.display()
    );
    device.display().to_string()
}

/// The first link under `DISK_DIR/by-id` (`wwn-` first) or `DISK_DIR/by-path` that
/// resolves to `device`.
fn stable_link(disk_dir: &Path, device: &Path) -> Option<PathBuf> {
    let target = std::fs::canonicalize(device).ok()?;
    for sub in ["by-id", "by-path"] {
        let mut links: Vec<PathBuf> = std::fs::read_dir(disk_dir.join(sub))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| std::fs::canonicalize(p).is_ok_and(|t| t == target))
            .collect();
        links.sort_by_key(|p| {
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (!n.starts_with("wwn-"), n)
        });
        if let Some(l) = links.into_iter().next() {
            return Some(l);
        }
    }
    None
}

fn write_tabs(v: &VolumeStatus, mapped: &Path) -> Result<()> {
    let etc = tabs::etc_dir();
    let device = match &v.header {
        Some(_) => stable_device_name(&v.device),
        None => luks_uuid(&v.device)
            .map(|u| format!("UUID={u}"))
            .unwrap_or_else(|| v.device.display().to_string()),
    };
    let fstab = std::fs::read_to_string(etc.join("fstab")).unwrap_or_default();
    let mount_points = fstab_points(v);
    let entry = tabs::CrypttabEntry {
        name: v.mapper.clone(),
        device,
        key_file: v.key_file.clone().unwrap_or_default(),
        header: v.header.clone(),
        netdev: tabs::fstab_needs_network(&fstab, &mount_points),
    };
    // After the walk, mapped and mounted: say so, and what finishes it (it said only
    // "cannot update crypttab ... (No space left on device)"; a trial).
    let io = |what: &str, e: std::io::Error| {
        Failure::failed(format!(
            "cannot update {what} in {} ({e}): {} is encrypted, mapped and mounted again; free space there or make {what} writable, then run `luksify resume` to finish (it writes the tables)",
            etc.display(),
            v.device.display()
        ))
    };
    tabs::edit_file(&etc.join("crypttab"), |t| tabs::crypttab_add(t, &entry))
        .map_err(|e| io("crypttab", e))?;
    if let Some(mp) = &v.mount_point {
        let fs = v.fs_type.clone().unwrap_or_else(|| "auto".into());
        let opts = recorded_mount_options(v);
        let mapper_path = PathBuf::from("/dev/mapper").join(&v.mapper);
        let _ = mapped;
        tabs::edit_file(&etc.join("fstab"), |t| {
            tabs::fstab_encrypt(t, mp, &mapper_path, &fs, &opts, &v.device)
        })
        .map_err(|e| io("fstab", e))?;
    }
    // Entries of the device at other mount points (a second mount, or none mounted now).
    let mapper_path = PathBuf::from("/dev/mapper").join(&v.mapper);
    let fs = v.fs_type.clone().unwrap_or_else(|| "auto".into());
    for mp in v
        .fstab_mount_points
        .iter()
        .filter(|mp| Some(mp.as_path()) != v.mount_point.as_deref())
    {
        tabs::edit_file(&etc.join("fstab"), |t| {
            tabs::fstab_encrypt(t, mp, &mapper_path, &fs, "defaults", &v.device)
        })
        .map_err(|e| io("fstab", e))?;
    }
    Ok(())
}

fn luks_uuid(device: &Path) -> Option<String> {
    let f = std::fs::File::open(device).ok()?;
    let (h, _) = luksify_luks::luks2::Luks2Header::read(&f).ok()?;
    Some(h.uuid)
}

/// What `resume` did: volumes it finished (or took up), and runs found by scanning
/// that it had to leave (busy, say), each named on stderr with the reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resumed {
    pub finished: usize,
    pub skipped: usize,
}

/// Finishes every volume the status file shows in progress (and opens, remounts and
/// records them as `enable` would have), then the volumes a stopped run had not reached.
pub fn resume(req: &EnableRequest, passphrase_override: Option<&[u8]>) -> Result<Resumed> {
    let mut sw = StatusWriter::open(&req.state_dir)
        .map_err(|e| Failure::failed(format!("status file: {e}")))?;
    let mut adopted = Vec::new();
    if let Some(pass) = passphrase_override {
        // Only runs this key opens: another volume's run is none of ours, and checking
        // reads the header without claiming the device.
        let (found, foreign): (Vec<_>, Vec<_>) = scan_in_progress(&req.state_dir)
            .into_iter()
            .partition(|f| passphrase_unlocks(f.header.as_deref().unwrap_or(&f.device), pass));
        for f in foreign {
            errln!(
                "luksify: {} has an interrupted reencryption that the given --key-file does not open; left alone",
                f.device.display()
            );
        }
        for f in found.iter().filter(|f| !f.decrypt) {
            errln!(
                "luksify: {} has an interrupted encryption missing from the status file; the given --key-file opens it: finishing it",
                f.device.display()
            );
        }
        adopt(&mut sw, &found, &req.key_file);
        adopted.extend(found.into_iter().filter(|f| !f.decrypt).map(|f| f.device));
    }
    relocate_all(&mut sw)?;
    let unfinished = |v: &VolumeStatus| {
        matches!(
            v.state,
            VolumeState::EncryptionInProgress | VolumeState::DecryptionInProgress
        )
    };
    let todo: Vec<PathBuf> = sw
        .status
        .volumes
        .iter()
        .filter(|v| unfinished(v))
        .map(|v| v.device.clone())
        .collect();
    let (pending_op, pending) = pending_of_stopped_run(&sw.status);
    if todo.is_empty() && pending.is_empty() {
        return Ok(Resumed::default());
    }
    let count = todo.len();
    let decrypting: Vec<PathBuf> = sw
        .status
        .volumes
        .iter()
        .filter(|v| v.state == VolumeState::DecryptionInProgress)
        .map(|v| v.device.clone())
        .collect();
    // Resuming a disable stays one: a resume killed in turn must leave the volumes the
    // disable had not reached recognisable as a disable's (Encrypted, in the run).
    let run_op = if pending_op == Operation::DisableEncryption {
        Operation::DisableEncryption
    } else {
        Operation::Resume
    };
    sw.status.begin_run(run_op, std::process::id(), |v| {
        unfinished(v) || pending.contains(&v.device)
    });
    let order: Vec<PathBuf> = todo.iter().chain(&pending).cloned().collect();
    sw.status.order_run(&order);
    let mut skipped = Vec::new();
    for (i, device) in todo.iter().cloned().enumerate() {
        let Some(idx) = sw.status.volumes.iter().position(|v| v.device == device) else {
            continue;
        };
        let r = resume_one(req, passphrase_override, &mut sw, idx, (i, count));
        match r {
            Err(e) if adopted.contains(&device) && e.code != exit::INTERRUPTED => {
                // Found by scanning, not ours for sure (another key, another tool's run
                // still going): forget it again and go on with the others.
                sw.status.volumes.retain(|v| v.device != device);
                sw.active = None;
                commit(&mut sw)?;
                skipped.push(format!("{} skipped: {}", device.display(), e.message));
            }
            Err(e) => return Err(end_run_failed(&mut sw, idx, e)),
            Ok(()) => {}
        }
    }
    if !skipped.is_empty() {
        errln!("luksify: {}", skipped.join("; "));
    }
    sw.active = None;
    // A decryption that had not started stays encrypted (resume_decrypt said so): the
    // disable is taken as not started, and the volumes it had not reached stay so too.
    let mut pending = pending;
    let not_started = |d: &PathBuf| {
        sw.status.volumes.iter().any(|v| {
            &v.device == d && matches!(v.state, VolumeState::Encrypted | VolumeState::NotMounted)
        })
    };
    if pending_op == Operation::DisableEncryption
        && !pending.is_empty()
        && decrypting.iter().any(not_started)
    {
        // (Each named: `disable` alone decrypts every volume in the status file.)
        let said = format!(
            "luksify: the disable had not reached {} either; they stay encrypted: run `luksify disable{}` again to decrypt them",
            pending
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            pending
                .iter()
                .map(|p| format!(" --volume {}", p.display()))
                .collect::<String>()
        );
        errln!("{}", crate::status::in_state_dir(&said, &req.state_dir));
        pending.clear();
    }
    let done = |n: usize| Resumed {
        finished: n - skipped.len(),
        skipped: skipped.len(),
    };
    if pending.is_empty() {
        sw.status.end_run();
        commit(&mut sw)?;
        return Ok(done(count));
    }
    // The run's pid stays until `enable`/`disable` takes the run over: if it cannot (a
    // pending volume is busy now), the status still says the run stopped, and the next
    // `resume` tries again.
    commit(&mut sw)?;
    if pending_op == Operation::DisableEncryption {
        // `disable` keeps its own status writer: this one must not write over it.
        drop(sw);
        let sub = EnableRequest {
            continues: todo.clone(),
            ..req.clone()
        };
        return Ok(done(count + disable(&sub, passphrase_override, &pending)?));
    }
    let first = sw
        .status
        .volumes
        .iter()
        .find(|v| v.device == pending[0])
        .cloned()
        .ok_or(Failure::failed(
            "pending volume vanished from the status file",
        ))?;
    let key = read_recorded_key(&first, passphrase_override)?;
    let sub = pending_request(req, &sw.status, &pending, &todo);
    remount_pending(&sw.status, &pending);
    // `enable` keeps its own status writer: this one must not write over it.
    drop(sw);
    if let Err(e) = enable(&sub, &key) {
        // Its preflight refused (a holder now, say): the volumes say why, and the run
        // stays stopped (its pid is kept), so the next `resume` tries them again.
        let why = e.message.lines().collect::<Vec<_>>().join("; ");
        if let Ok(mut sw) = StatusWriter::open(&req.state_dir) {
            for v in sw.status.volumes.iter_mut() {
                if pending.contains(&v.device) && v.state == VolumeState::NotEncrypted {
                    v.error = Some(format!(
                        "{} not encrypted yet: {why}; `luksify resume` goes on once that is fixed",
                        v.device.display()
                    ));
                }
            }
            let _ = sw.commit();
        }
        return Err(e);
    }
    Ok(done(count + pending.len()))
}

/// The volumes of an `enable` or `disable` that stopped (killed, power cut, signal) before
/// it reached them: recorded in its run, not started. `resume` encrypts (or
/// decrypts) them after the interrupted one, as the run would have. A run that failed (its
/// pid cleared, nothing left in progress) is not taken up again: the user decides, by
/// running the command again. A `resume` that was itself stopped goes on with them too:
/// an enable's are still `NotEncrypted`, a disable's still encrypted, and a resume of a
/// disable records its run as the disable's.
pub(crate) fn pending_of_stopped_run(status: &crate::status::Status) -> (Operation, Vec<PathBuf>) {
    let stopped = status.pid.is_some()
        || status.volumes.iter().any(|v| {
            v.in_run
                && matches!(
                    v.state,
                    VolumeState::EncryptionInProgress | VolumeState::DecryptionInProgress
                )
        });
    let op = match status.operation {
        Operation::EnableEncryption | Operation::Resume => Operation::EnableEncryption,
        Operation::DisableEncryption => Operation::DisableEncryption,
        Operation::None => return (Operation::None, Vec::new()),
    };
    // A run that ended by itself (done, failed, refused) leaves nothing to take up: its
    // operation is not the next run's (a resume after a refused disable was recorded as
    // a disable, and status said "Decrypting 1 data volume" for good; a trial).
    if !stopped {
        return (Operation::None, Vec::new());
    }
    let waiting = |v: &VolumeStatus| match op {
        Operation::DisableEncryption => {
            matches!(v.state, VolumeState::Encrypted | VolumeState::NotMounted)
        }
        _ => v.state == VolumeState::NotEncrypted,
    };
    let pending = status
        .volumes
        .iter()
        .filter(|v| v.in_run && waiting(v))
        .map(|v| v.device.clone())
        .collect();
    (op, pending)
}

/// Mounts each pending volume that is mounted nowhere now (a reboot, an unmount) at the
/// mount point the run recorded for it, with its options, so that its `enable` puts it
/// back there as the run would have (it was encrypted unmounted, its mount point
/// forgotten, and the status said Encrypted). One that does not mount is left as it is.
fn remount_pending(status: &crate::status::Status, pending: &[PathBuf]) {
    let mounts = mountinfo::read().unwrap_or_default();
    for v in status
        .volumes
        .iter()
        .filter(|v| pending.contains(&v.device))
    {
        let Some(mp) = &v.mount_point else { continue };
        let Some(dev) = probe::block_dev_num(&v.device) else {
            continue;
        };
        if !mountinfo::mounts_of(&mounts, dev).is_empty()
            || mountinfo::mount_at(&mounts, mp).is_some()
            || !mp.is_dir()
        {
            continue;
        }
        let opts = recorded_mount_options(v);
        if let Err(e) = run_tool(
            crate::tool("mount")
                .arg("-o")
                .arg(&opts)
                .arg(&v.device)
                .arg(mp),
            &format!("mount {} at {}", v.device.display(), mp.display()),
        ) {
            errln!(
                "luksify: {}; it is encrypted where it is, not mounted",
                e.message
            );
        }
    }
}

/// The `enable` of a stopped run's pending volumes, as the run was asked: its key file,
/// header directory and key derivation request as recorded.
fn pending_request<'a>(
    req: &EnableRequest<'a>,
    status: &crate::status::Status,
    pending: &[PathBuf],
    continues: &[PathBuf],
) -> EnableRequest<'a> {
    let recorded = status.volumes.iter().find(|v| v.device == pending[0]);
    EnableRequest {
        volumes: pending.to_vec(),
        key_file: recorded
            .and_then(|v| v.key_file.clone())
            .unwrap_or(req.key_file.clone()),
        header_dir: recorded
            .and_then(|v| v.header.as_deref())
            .and_then(Path::parent)
            .map(Path::to_path_buf),
        kill_holders: req.kill_holders,
        state_dir: req.state_dir.clone(),
        force_userspace: req.force_userspace,
        // The run's own request, recorded on its volumes.
        kdf: recorded
            .and_then(|v| v.kdf.clone())
            .unwrap_or_else(|| req.kdf.clone()),
        cancel: req.cancel,
        report: req.report,
        continues: continues.to_vec(),
    }
}

/// Finishes one in-progress volume of the status file.
fn resume_one(
    req: &EnableRequest,
    passphrase_override: Option<&[u8]>,
    sw: &mut StatusWriter,
    idx: usize,
    pos: (usize, usize),
) -> Result<()> {
    adopt_key_file(sw, idx, req, passphrase_override);
    let v = sw.status.volumes[idx].clone();
    wait_for_orphans(&v);
    if v.state == VolumeState::DecryptionInProgress {
        let key = read_recorded_key(&v, passphrase_override)?;
        resume_decrypt(req, &key, sw, idx, pos)?;
        return Ok(());
    }
    let key;
    let passphrase: &[u8] = match passphrase_override {
        Some(p) => p,
        None => {
            let kf = v.key_file.clone().ok_or_else(|| {
                Failure::failed(format!(
                    "no key file recorded for {}; pass --key-file",
                    v.device.display()
                ))
            })?;
            key = zeroize::Zeroizing::new(std::fs::read(&kf).map_err(|e| {
                Failure::failed(format!(
                    "cannot read the key file {} recorded for {} ({e}); pass --key-file",
                    kf.display(),
                    v.device.display()
                ))
            })?);
            &key
        }
    };
    sw.status.volumes[idx].resumed = true;
    sw.active = Some(idx);
    commit(sw)?;
    // The header (detached, or in front of the data) decides where the run stands.
    let header_path = v.header.clone().unwrap_or_else(|| v.device.clone());
    match header_progress(&header_path) {
        HeaderProgress::InProgress(_) => {}
        HeaderProgress::Finished => {
            // The walk finished but the steps after it did not run.
            finish_volume(req, passphrase, sw, idx, Outcome::Finished)?;
            return Ok(());
        }
        HeaderProgress::Unreadable(e) => {
            return Err(Failure::failed(format!(
                "cannot read the header {} of {} ({e}): it holds the key of what is encrypted already, so nothing was written; fix what stands in the way (the storage it is on, its permissions), then run `luksify resume` again",
                header_path.display(),
                v.device.display()
            )))
        }
        HeaderProgress::Missing if v.header.is_none() || v.header_reserved || v.bytes_done > 0 => {
            return Err(Failure::failed(match &v.header {
                Some(h) => format!(
                    "the header file {} of {} is missing: it holds the key of what is encrypted already, so nothing was written; mount the filesystem it is on (or put the file back from a copy), then run `luksify resume` again",
                    h.display(),
                    v.device.display()
                ),
                None => format!(
                    "{} is missing; attach it (or name where it is now), then run `luksify resume` again (nothing was written)",
                    v.device.display()
                ),
            }))
        }
        // A detached header file that holds nothing (emptied, zeroed) is no proof the run
        // had not begun: restarted, it encrypted the part already encrypted a second
        // time under a new key (trial V5). Only a device that still shows, at its start,
        // the very filesystem the run recorded, with no progress on record, starts anew.
        HeaderProgress::Absent | HeaderProgress::Missing
            if v.header.is_some() && !never_walked(&v) =>
        {
            return Err(Failure::failed(format!(
                "the header file {} of {} holds no LUKS header, yet {}: it is not the run's header, which holds the key of what is encrypted already, so nothing was written; put the run's header back (from a copy), then run `luksify resume` again",
                header_path.display(),
                v.device.display(),
                if v.bytes_done > 0 {
                    format!("the run had encrypted {} MiB", v.bytes_done >> 20)
                } else {
                    "the device no longer starts with the filesystem the run recorded".to_string()
                }
            )))
        }
        HeaderProgress::Absent | HeaderProgress::Missing => {
            if let Some(h) = &v.header {
                // No longer a reserved header: a stop after the removal must not be
                // taken for a header gone missing.
                sw.status.volumes[idx].header_reserved = false;
                commit(sw)?;
                // Cut before the walker's first commit to the detached header: neither
                // copy is valid, so the walker has not written to the device, and the
                // file (created by this run: preflight refuses an existing one) holds
                // nothing. The restart creates it again.
                match std::fs::remove_file(h) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(Failure::failed(format!(
                            "cannot remove the incomplete header {} ({e}); remove it and run `luksify resume` again",
                            h.display()
                        )))
                    }
                    _ => {}
                }
            }
            // Started again under the passphrase given now: its key file is the one.
            let mut v = v;
            if let Some(given) = given_key_file(req, passphrase_override) {
                v.key_file = Some(given);
                sw.status.volumes[idx].key_file = v.key_file.clone();
            }
            return restart_encryption(req, passphrase, &v, sw, idx, pos);
        }
    }
    // A crash may have left it mounted nowhere but held by nothing: open exclusively.
    let data = open_data(&v.device, "to resume", "is it mounted or mapped?")?;
    let header = v.header.clone();
    let outcome = walk(sw, idx, pos.0, pos.1, req, |ctl| match &header {
        Some(h) => {
            let hf = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(h)
                .map_err(|e| luksify_walker::Error::Io {
                    what: format!("open {}", h.display()),
                    source: e,
                })?;
            luksify_walker::resume(&data, Some(&hf), passphrase, Default::default(), ctl)
        }
        None => luksify_walker::resume::<_, std::fs::File, _>(
            &data,
            None,
            passphrase,
            Default::default(),
            ctl,
        ),
    });
    let outcome = match outcome {
        Err(e) if e.message.contains("shows no encryption in progress") => Outcome::Finished,
        o => o?,
    };
    drop(data);
    finish_volume(req, passphrase, sw, idx, outcome)
}

/// Every volume `resume` will work on, on the device it is on now, before anything
/// is written or the run begins (all at once: two volumes of one run may have swapped
/// names). A kernel name is not stable across a reboot (disks attached in another
/// order, a loop device's number reused), so a volume is known by what it holds: the
/// LUKS UUID its run gives it (on the device once the header is in front) or its
/// filesystem's UUID as `enable` found it. Trials' reboots gave a volume's old name to
/// another disk, a blank disk or a copy of the volume, and `resume` encrypted (or
/// decrypted) that one and reported success. A volume that is nowhere, or whose
/// filesystem UUID two devices carry (a copy attached beside it), is refused with
/// nothing written and the status file as it was.
fn relocate_all(sw: &mut StatusWriter) -> Result<()> {
    let (_, pending) = pending_of_stopped_run(&sw.status);
    let mut moves = Vec::new();
    for (idx, v) in sw.status.volumes.iter().enumerate() {
        let unfinished = matches!(
            v.state,
            VolumeState::EncryptionInProgress | VolumeState::DecryptionInProgress
        );
        if unfinished || pending.contains(&v.device) {
            if let Some(dev) = locate(v, "resume")? {
                moves.push((idx, dev));
            }
        }
    }
    if moves.is_empty() {
        return Ok(());
    }
    for (idx, dev) in moves {
        let v = &mut sw.status.volumes[idx];
        errln!(
            "luksify: the volume recorded as {} is {} now (its name moved since the run began); the run goes on there",
            v.device.display(),
            dev.display()
        );
        v.device = dev;
    }
    commit(sw)
}

/// Where volume `v` is now: `None` when on its recorded device (or when nothing tells:
/// the walker's own checks decide there), `Some(dev)` when it moved to `dev`. A refusal
/// says to run `luksify AGAIN` again once the volume is attached.
pub(crate) fn locate(v: &VolumeStatus, again: &str) -> Result<Option<PathBuf>> {
    let decrypting = v.state == VolumeState::DecryptionInProgress;
    // The volume's LUKS UUID: recorded, or (a record from before it was) the header
    // file's, which a decryption always has.
    let luks = v.luks_uuid.clone().or_else(|| {
        v.header.as_deref().and_then(|h| {
            let f = std::fs::File::open(h).ok()?;
            Some(luksify_luks::luks2::Luks2Header::read(&f).ok()?.0.uuid)
        })
    });
    let fs = v.fs_uuid.clone();
    if luks.is_none() && fs.is_none() {
        return Ok(None);
    }
    let attached = probe::device_size(&v.device).is_ok_and(|n| n > 0);
    let now = attached.then(|| probe::type_and_uuid(&v.device)).flatten();
    let carriers = |u: &str| {
        let mut d = probe::devices_with_uuid(u);
        d.retain(|d| !is_luksify_mapping(d));
        d
    };
    let here = |what: &str| format!("{} {what}", v.device.display());
    let ids = || {
        [
            luks.as_deref().map(|u| format!("LUKS UUID {u}")),
            fs.as_deref().map(|u| format!("filesystem UUID {u}")),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ")
    };
    let nowhere = |why: String| {
        Failure::failed(format!(
            "{why}, and no other device carries this volume ({}): its name moved (a reboot that attached disks in another order?) or it is detached; nothing was written: attach the volume and run `luksify {again}` again",
            ids()
        ))
    };
    let ambiguous = |uuid: &str, devs: &[PathBuf]| {
        Failure::failed(format!(
            "{} all carry UUID {uuid} of the volume recorded as {} (a copy of it attached?); nothing was written: detach the copies and run `luksify {again}` again",
            devs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "),
            v.device.display()
        ))
    };
    // 1. The LUKS header in front, wherever it is, decides.
    if let Some(u) = luks.as_deref() {
        match carriers(u).as_slice() {
            [] => {}
            [d] if d == &v.device => return Ok(None),
            [d] => return Ok(Some(d.clone())),
            many => return Err(ambiguous(u, many)),
        }
    }
    let what_is_here = || match &now {
        Some((kind, u)) => here(&format!("now holds {kind} UUID {u}")),
        None if attached => here("now holds nothing recognisable"),
        None => here("is not attached (missing or empty)"),
    };
    let is_ours = |u: &str| fs.as_deref() == Some(u) || luks.as_deref() == Some(u);
    let header_written = v.header.as_deref().is_some_and(|h| !header_absent(h));
    // 2. An encryption whose detached header is written: the device's head is
    // ciphertext, so a device showing the filesystem's UUID elsewhere is a copy, never
    // the volume; the walker's identity token decides on the recorded one.
    if header_written && !decrypting {
        return match &now {
            None if attached => Ok(None),
            Some((_, u)) if is_ours(u) => Ok(None),
            _ => Err(nowhere(what_is_here())),
        };
    }
    // 3. By the filesystem's UUID: a volume not started yet, or a decryption (its head
    // is plaintext again once the walk has passed it).
    if let Some(u) = fs.as_deref() {
        match carriers(u).as_slice() {
            [d] if d == &v.device => return Ok(None),
            [d] => return Ok(Some(d.clone())),
            [] => {}
            many => return Err(ambiguous(u, many)),
        }
    }
    match &now {
        // A head torn by a cut, ciphertext: the walker's checks decide.
        None if attached => Ok(None),
        Some((_, u)) if is_ours(u) => Ok(None),
        _ => Err(nowhere(what_is_here())),
    }
}

/// Tools a killed run left running on the volume: SIGKILL takes luksify, not its
/// children. A `mount`, `e2fsck` or `resize2fs` of the device or its mapping goes on
/// alone and holds the device exclusively (a `resume` started beside it failed: its own
/// e2fsck "exited with 8", its mount "already mounted"), so `resume` waits for them (at
/// most 10 minutes: a big e2fsck) before it touches the volume.
fn wait_for_orphans(v: &VolumeStatus) {
    const TOOLS: [&str; 8] = [
        "mount",
        "umount",
        "e2fsck",
        "fsck",
        "fsck.ext2",
        "fsck.ext3",
        "fsck.ext4",
        "resize2fs",
    ];
    // `umount` is given the mount point, not the device: a `disable` killed while its
    // umount ran left it to take the mount `resume` had just put back (a trial).
    let names: Vec<String> = [
        Some(v.device.clone()),
        Some(PathBuf::from("/dev/mapper").join(&v.mapper)),
        v.mapped_device.clone(),
        v.mount_point.clone(),
    ]
    .into_iter()
    .flatten()
    .chain(v.extra_mounts.iter().map(|m| m.mount_point.clone()))
    .chain(v.nested_mounts.iter().map(|n| n.mount_point.clone()))
    .map(|p| p.display().to_string())
    .collect();
    let own = std::process::id();
    let orphans = || -> Vec<(u32, String)> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid != own && !holders::is_zombie(pid))
            .filter_map(|pid| {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
                let comm = comm.trim_end();
                if !TOOLS.contains(&comm) {
                    return None;
                }
                // Argument by argument (a mount point may hold a space).
                let args = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                args.split(|&b| b == 0)
                    .any(|a| names.iter().any(|n| n.as_bytes() == a))
                    .then(|| (pid, comm.to_string()))
            })
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    let mut said = false;
    loop {
        let now = orphans();
        if now.is_empty() || std::time::Instant::now() > deadline {
            return;
        }
        if !said {
            // (Maybe not the run's: a user's own e2fsck of the device looks the same.)
            errln!(
                "luksify: waiting for {} working on {} (left running by the interrupted run?), at most 10 minutes",
                now.iter()
                    .map(|(pid, c)| format!("{c} (pid {pid})"))
                    .collect::<Vec<_>>()
                    .join(", "),
                v.device.display()
            );
            said = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What a run with PBKDF2 (no derivation memory) needs under a cgroup or available
/// memory: its walk's buffers, its mapping's daemon, the page cache a cgroup v1 counts.
const PBKDF2_RUN_FLOOR: u64 = 40 << 20;

/// The tightest memory limit a run with PBKDF2 would not fit under, if any: (what it
/// leaves, its name, what the run needs there). Under `ulimit -v` that is luksify's
/// whole address-space share (its threads' stacks and malloc arenas count, used or
/// not), elsewhere [`PBKDF2_RUN_FLOOR`].
fn limit_pbkdf2_exceeds() -> Option<(u64, &'static str, u64)> {
    probe::memory_limits()
        .into_iter()
        .map(|(limit, what, own)| {
            let floor = if what.starts_with("the address-space") {
                own
            } else {
                PBKDF2_RUN_FLOOR
            };
            (limit, what, floor)
        })
        .filter(|&(limit, _, floor)| limit < floor)
        .min_by_key(|&(limit, _, floor)| limit.saturating_sub(floor))
}

/// Whole MiB a memory limit that leaves `left` bytes must grow by to leave `need`.
fn raise_mib(left: u64, need: u64) -> u64 {
    need.saturating_sub(left).div_ceil(1 << 20).max(1)
}

/// The key derivation asked for (argon2's memory: `--pbkdf-memory`, else 1 GiB or half
/// the RAM) against what this process can get: the volume is unmounted and shrunk
/// before the header is made, so a derivation that cannot run left a trial's volume
/// offline and shrunk ("argon2 failed: out of memory" under `ulimit -v`), and resume
/// failed the same way.
fn kdf_memory_blocker(kdf: &luksify_luks::kdf::KdfRequest) -> Option<String> {
    use luksify_luks::kdf::KdfKind;
    if kdf.kind == KdfKind::Pbkdf2 {
        // No derivation memory, but the run's own: a trial's enable with PBKDF2, the fix
        // offered under a 32 MiB cgroup, was OOM-killed mid-walk (it peaks near 44 MiB
        // with the page cache a cgroup v1 counts, and went through under 48 MiB).
        let (limit, what, floor) = limit_pbkdf2_exceeds()?;
        return Some(format!(
            "BLOCKER: luksify needs about {} MiB of memory here (its walk, and its mapping's daemon), and {what} leaves this process {} MiB: it would be killed mid-run; fix: raise the limit by at least {} MiB",
            floor >> 20,
            limit >> 20,
            raise_mib(limit, floor + (8 << 20))
        ));
    }
    let online = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let kib = kdf
        .adjusted_for(luksify_luks::kdf::total_ram_kib(), online)
        .memory_kib
        .unwrap_or_else(luksify_luks::kdf::default_argon2_memory_kib);
    let argon = u64::from(kib) * 1024;
    let (limit, what, own) = limit_argon2_exceeds(argon)?;
    // The argon2 memory that fits (`--pbkdf-memory` counts KiB, as cryptsetup's), in
    // whole MiB; below 8 MiB none is offered: a trial followed "--pbkdf-memory 32 or
    // less" (KiB) into the same refusal, luksify's own share alone being over the limit.
    // Less a margin: what the limit leaves counts the cgroup's page cache, which the
    // refused run itself grew, and an offer with none was refused again (a trial).
    // (No margin under `ulimit -v`: it counts no page cache, and an offer of 48 MiB where
    // 64 went through disagreed with the "raise" that led there; trial R4.)
    let margin: u64 = if what.starts_with("the address-space") {
        0
    } else {
        16 << 20
    };
    let room_mib = limit.saturating_sub(own + margin) >> 20;
    // PBKDF2 only where it would go through: under `ulimit -v` it needs luksify's whole
    // address-space share, and a trial followed this offer into the PBKDF2 refusal.
    // Where it would not, the smaller raise it needs is said too (R4: 48 MiB with
    // PBKDF2 went through where argon2 was sent to 128).
    let pbkdf2 = match limit_pbkdf2_exceeds() {
        None => "--pbkdf pbkdf2, or ".to_string(),
        Some((l, _, floor)) => format!(
            "--pbkdf pbkdf2 with the limit raised by at least {} MiB, or ",
            raise_mib(l, floor + (8 << 20))
        ),
    };
    // A raise, not a limit to set: what a cgroup leaves this process is its limit less
    // what the rest of the group uses, and "to at least 128 MiB" was refused at 128 (R4).
    let fix = if room_mib >= 8 {
        format!(
            "--pbkdf-memory {} or less (KiB), or {pbkdf2}raise the limit by at least {} MiB",
            room_mib * 1024,
            raise_mib(limit, argon + own + margin)
        )
    } else {
        format!(
            "{pbkdf2}raise the limit by at least {} MiB for an argon2 of 64 MiB",
            raise_mib(limit, (64 << 20) + own + margin)
        )
    };
    let size = if kib >= 1024 {
        format!("{} MiB", kib / 1024)
    } else {
        format!("{kib} KiB")
    };
    Some(format!(
        "BLOCKER: the key derivation (argon2, {size}) needs about {} MiB with luksify's own {} MiB, and {what} leaves this process {} MiB; fix: {fix}",
        (argon + own) >> 20,
        own >> 20,
        limit >> 20,
    ))
}

/// Whether `dev` is the decrypted view of a luksify mapping (a device-mapper node, or the
/// userspace path's loop device over its FUSE `volume` file).
fn is_luksify_mapping(dev: &Path) -> bool {
    let name = dev
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.starts_with("dm-") || dev.starts_with("/dev/mapper") {
        return true;
    }
    std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
        .is_ok_and(|b| b.trim_end().ends_with("/volume"))
}

/// Power was cut after the status file said "in progress" but before the walker's first
/// header commit: the device still holds the plain filesystem (shrunk or not), or the
/// walker's start-up marker if the cut tore the first header write. Either way the
/// encryption starts again from the beginning, which is what the user asked for.
fn restart_encryption(
    req: &EnableRequest,
    passphrase: &[u8],
    v: &VolumeStatus,
    sw: &mut StatusWriter,
    idx: usize,
    pos: (usize, usize),
) -> Result<()> {
    let info = probe::detect_fs(&v.device).map_err(|e| {
        Failure::failed(format!(
            "cannot read {} to restart its encryption ({e})",
            v.device.display()
        ))
    })?;
    let dev_size = probe::device_size(&v.device)
        .map_err(|e| Failure::failed(format!("cannot size {} ({e})", v.device.display())))?;
    let fs = FsFacts {
        fs_type: info.fs_type.clone(),
        dev_size,
        min_io: info.min_io,
    };
    // At boot, fstab may have mounted the plain volume again: it comes off first.
    let dev = probe::block_dev_num(&v.device)
        .ok_or_else(|| Failure::failed(format!("{} is not a block device", v.device.display())))?;
    let unmounted = unmount_nested(&v.device, &v.nested_mounts, FIX_RESUME)
        .and_then(|()| unmount_all(&v.device, dev, FIX_RESUME));
    let run = (req, passphrase, sw, idx, pos);
    encrypt_unmounted(run, &v.device, v.header.as_deref(), &fs, unmounted)
}

pub(crate) enum HeaderProgress {
    /// Read, and no LUKS2 header in either copy: the walker never committed one.
    Absent,
    /// No such file: never created, or on a filesystem not mounted (yet), or removed.
    /// Says nothing of what the walker did.
    Missing,
    /// It cannot be opened or read (an I/O error, no permission): says nothing of what
    /// the walker did. A header file an I/O error hid was taken for "never written",
    /// and `resume` removed it and encrypted the half already encrypted again (a trial).
    Unreadable(String),
    /// Its reencryption state, when it parses.
    InProgress(Option<luksify_luks::reencrypt::ReencryptState>),
    Finished,
}

/// Reads the header through both copies (a torn primary is recovered from the secondary),
/// so that a damaged but recoverable header is never mistaken for an absent one.
pub(crate) fn header_progress(path: &Path) -> HeaderProgress {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return HeaderProgress::Missing,
        Err(e) => return HeaderProgress::Unreadable(e.to_string()),
    };
    use std::os::unix::fs::FileTypeExt;
    match f.metadata() {
        Ok(m) if m.is_file() || m.file_type().is_block_device() => {}
        Ok(_) => return HeaderProgress::Unreadable("not a file or a block device".into()),
        Err(e) => return HeaderProgress::Unreadable(e.to_string()),
    }
    match luksify_luks::luks2::Luks2Header::read(&f) {
        // A file cut short (its reservation failed) holds no header either.
        Err(luksify_luks::Error::Io { source, .. })
            if source.kind() != std::io::ErrorKind::UnexpectedEof =>
        {
            HeaderProgress::Unreadable(source.to_string())
        }
        Err(_) => HeaderProgress::Absent,
        Ok((h, _)) => match luksify_luks::reencrypt::state(&h.metadata) {
            Ok(Some(st)) => HeaderProgress::InProgress(Some(st)),
            // A reencrypt keyslot we cannot parse still means "in progress": let the
            // walker report precisely what is wrong.
            Err(_) => HeaderProgress::InProgress(None),
            Ok(None) => HeaderProgress::Finished,
        },
    }
}

/// Whether the header at `path` is known to hold no header: read, and none in it (not
/// when it is missing or cannot be read, which says nothing).
pub(crate) fn header_absent(path: &Path) -> bool {
    matches!(header_progress(path), HeaderProgress::Absent)
}

fn resume_decrypt(
    req: &EnableRequest,
    passphrase: &[u8],
    sw: &mut StatusWriter,
    idx: usize,
    pos: (usize, usize),
) -> Result<()> {
    let v = sw.status.volumes[idx].clone();
    // A header in front whose decryption had not started is put back on the device and
    // its record cleared (`map_again_encrypted`) before the volume is mapped and mounted
    // again: a failure there (an e2fsck, a mount) left no header on record, and every
    // later `resume` refused (a trial). The device's own header is then the one.
    let moved = req
        .state_dir
        .join("headers")
        .join(format!("{}.decrypt.luks2", v.mapper));
    let header = match v.header.clone() {
        Some(h) => h,
        None if check::luks_state(&v.device).as_deref() == Some("luks2") => moved,
        None => {
            return Err(Failure::failed(format!(
                "no header file recorded for the decryption of {}",
                v.device.display()
            )))
        }
    };
    let in_front = header.starts_with(req.state_dir.join("headers"));
    if v.walk_done {
        // Its header file may be gone already: only the last steps are left.
        sw.status.volumes[idx].resumed = true;
        sw.active = Some(idx);
        return finish_disable(sw, idx, Outcome::Finished);
    }
    if decryption_not_started(&v.device, &header, in_front) {
        // Stopped before the walker's first commit: the volume is encrypted as it was.
        errln!(
            "luksify: the decryption of {} had not started; it stays encrypted and is mapped and mounted again",
            v.device.display()
        );
        map_again_encrypted(req, passphrase, sw, idx, (&header, in_front))?;
        // What an agent polling the status must see: the disable did not happen (not
        // "Encryption succeeded"), and how to do it.
        sw.status.operation = Operation::DisableEncryption;
        sw.status.volumes[idx].error = Some(format!(
            "the decryption of {} had not started; it stays encrypted: run `luksify disable --volume {}` again",
            v.device.display(),
            v.device.display()
        ));
        return commit(sw);
    }
    sw.status.volumes[idx].resumed = true;
    sw.active = Some(idx);
    commit(sw)?;
    if decryption_walked(&header) {
        // Stopped after the walk, maybe with the plain filesystem already mounted again
        // (which the exclusive open below would refuse): only the steps after it remain.
        return finish_disable(sw, idx, Outcome::Finished);
    }
    let data = open_data(&v.device, "to resume", "is it mounted or mapped?")?;
    let hf = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&header)
        .map_err(|e| {
            Failure::failed(format!(
                "cannot open the header file {} for writing ({e}); nothing was written: make it writable (`lsattr`/`chattr -i` for an immutable file, a read-only mount), then run the command again (`luksify resume` for a run under way)",
                header.display()
            ))
        })?;
    let outcome = match walk(sw, idx, pos.0, pos.1, req, |ctl| {
        luksify_walker::resume(&data, Some(&hf), passphrase, Default::default(), ctl)
    }) {
        Err(e) if e.message.contains("shows no encryption in progress") => Outcome::Finished,
        o => o?,
    };
    drop(data);
    finish_disable(sw, idx, outcome)
}

/// Whether a decryption run stopped before the walker's first commit: its header (the
/// detached one, or the copy the in-front layout moves out) shows no run and still a
/// crypt segment, or (in front) never became valid, while the device still holds its
/// own LUKS header in front. The data has not been touched then.
pub(crate) fn decryption_not_started(device: &Path, header: &Path, in_front: bool) -> bool {
    let read = std::fs::File::open(header)
        .ok()
        .and_then(|f| luksify_luks::luks2::Luks2Header::read(&f).ok())
        .map(|(h, _)| h);
    let untouched = match read {
        Some(h) => {
            matches!(luksify_luks::reencrypt::state(&h.metadata), Ok(None))
                && h.data_segment().is_ok()
        }
        None => in_front,
    };
    untouched && (!in_front || check::luks_state(device).as_deref() == Some("luks2"))
}

/// Whether a decryption's walk is over: its header shows no run and no crypt segment
/// left (the data is all plaintext).
pub(crate) fn decryption_walked(header: &Path) -> bool {
    std::fs::File::open(header)
        .ok()
        .and_then(|f| luksify_luks::luks2::Luks2Header::read(&f).ok())
        .is_some_and(|(h, _)| {
            matches!(luksify_luks::reencrypt::state(&h.metadata), Ok(None))
                && h.data_segment().is_err()
        })
}

/// Whether an encrypted volume `v` was decrypted outside luksify (`luksify decrypt` or
/// `cryptsetup reencrypt --decrypt` by hand): not mapped, and its device holds again the
/// filesystem `enable` recorded, by type and UUID (ciphertext, or a LUKS header in
/// front, shows neither).
pub(crate) fn decrypted_outside(v: &VolumeStatus) -> bool {
    matches!(v.state, VolumeState::Encrypted | VolumeState::NotMounted)
        && v.fs_uuid.is_some()
        && probe::block_dev_num(&Path::new("/dev/mapper").join(&v.mapper)).is_none()
        // (The type is `plain_as_recorded`'s to compare; blkid gives the UUID.)
        && probe::type_and_uuid(&v.device).is_some_and(|(_, u)| Some(&u) == v.fs_uuid.as_ref())
        && plain_as_recorded(v)
}

/// Whether volume `v`'s device still holds the plain filesystem its run recorded, as
/// an enable stopped before its walk leaves it: that filesystem's superblock, no LUKS
/// header, no first header of a `--reduce-device-size` start (whose head may be
/// overwritten, its first part only in the copy at the end).
pub(crate) fn plain_as_recorded(v: &VolumeStatus) -> bool {
    let Ok(f) = std::fs::File::open(&v.device) else {
        return false;
    };
    probe::detect_fs(&v.device).is_ok_and(|fs| Some(&fs.fs_type) == v.fs_type.as_ref())
        && !matches!(
            luksify_walker::interrupted_shift_start(&f),
            Ok(Some(_)) | Err(_)
        )
}

/// Whether what is recorded of `v`'s encryption says its walk never began: no progress
/// on record, and the device still starts with the filesystem the run recorded.
pub(crate) fn never_walked(v: &VolumeStatus) -> bool {
    v.bytes_done == 0 && holds_recorded_filesystem(v)
}

/// Whether the device of `v` still starts with the filesystem its run recorded: the
/// same type, and the same UUID when one was recorded (a walk from the start turns the
/// head into ciphertext first).
fn holds_recorded_filesystem(v: &VolumeStatus) -> bool {
    if !plain_as_recorded(v) {
        return false;
    }
    let Some(uuid) = v.fs_uuid.as_deref() else {
        return true;
    };
    let mut head = vec![0u8; 4096];
    if std::fs::File::open(&v.device)
        .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0))
        .is_err()
    {
        return false;
    }
    // (A filesystem whose UUID the probe does not read, a swap area say: its type decided.)
    luksify_walker::fsprobe::uuid_in(&head).is_none_or(|u| u == uuid)
}

/// Whether the file at `p` exists and holds only zero bytes (a header file reserved and
/// never written).
fn only_zeros(p: &Path) -> bool {
    use std::io::Read;
    let Ok(mut f) = std::fs::File::open(p) else {
        return false;
    };
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) if buf[..n].iter().all(|b| *b == 0) => {}
            _ => return false,
        }
    }
}

/// `7:0` back into a device number.
trait ParseDevNum {
    fn parse_devnum(&self) -> mountinfo::DevNum;
}
impl ParseDevNum for String {
    fn parse_devnum(&self) -> mountinfo::DevNum {
        let (a, b) = self.split_once(':').unwrap_or(("0", "0"));
        mountinfo::DevNum {
            major: a.parse().unwrap_or(0),
            minor: b.parse().unwrap_or(0),
        }
    }
}

/// Whether any problem in `r` blocks (exported for the CLI's candidate listing).
pub fn is_ready(r: &check::Report) -> bool {
    r.problems.iter().all(|p| p.severity != Severity::Blocker)
}

/// Whether every blocker in `r` is the lack of room for a header on the device (an xfs
/// or btrfs, which cannot shrink; an ext4 too full to): `--header-dir` takes them all
/// away, so the listing says that rather than "has blockers" (every xfs read so).
pub fn needs_only_header_dir(r: &check::Report) -> bool {
    !is_ready(r)
        && r.problems
            .iter()
            .filter(|p| p.severity == Severity::Blocker)
            .all(|p| matches!(p.code, "needs_detached_header" | "no_header_space"))
}

/// Decrypts data volumes back in place: unmount, close the mapping, decrypt through
/// the walker, grow the filesystem to the whole device, remount the plain device,
/// restore fstab and drop the crypttab entry. `only` restricts it to some devices or
/// mount points (all encrypted volumes in the status file otherwise).
pub fn disable(
    req: &EnableRequest,
    passphrase_override: Option<&[u8]>,
    only: &[PathBuf],
) -> Result<usize> {
    let mut sw = StatusWriter::open(&req.state_dir)
        .map_err(|e| Failure::failed(format!("status file: {e}")))?;
    // A volume by its device, its mount point or its mapping (`/dev/mapper/NAME`, the
    // name fstab uses, or the device that link leads to), or by fstab's tags as `enable`
    // takes them: `UUID=` of its filesystem (recorded), `LABEL=` and others through the
    // device blkid finds with it (the mapping, while open). `disable --volume
    // LABEL=data` of an `enable --volume LABEL=data` said "none of LABEL=data is an
    // encrypted volume luksify manages" (a trial).
    let only: Vec<PathBuf> = only
        .iter()
        .map(|o| match crate::check::fstab_tag(o) {
            Some(tag) => {
                match probe::devices_with_tag(&crate::tabs::unescape_field(tag)).as_slice() {
                    [d] => d.clone(),
                    _ => o.clone(),
                }
            }
            None => o.clone(),
        })
        .collect();
    let tag = |key: &str| -> Vec<String> {
        only.iter()
            .filter_map(|o| {
                let t = crate::check::fstab_tag(o)?;
                Some(crate::tabs::unescape_field(t.strip_prefix(key)?))
            })
            .collect()
    };
    let (tag_uuids, tag_labels) = (tag("UUID="), tag("LABEL="));
    let only = only.as_slice();
    let wanted = |v: &VolumeStatus| {
        only.is_empty()
            || v.fs_uuid.as_ref().is_some_and(|u| tag_uuids.contains(u))
            || v.fs_label.as_ref().is_some_and(|l| tag_labels.contains(l))
            || only.iter().any(|o| {
                let c = std::fs::canonicalize(o).unwrap_or(o.clone());
                let mapper = Path::new("/dev/mapper").join(&v.mapper);
                c == v.device
                    || v.mount_point.as_deref() == Some(c.as_path())
                    || (!v.mapper.is_empty()
                        && (o == &mapper || std::fs::canonicalize(&mapper).ok() == Some(c)))
            })
    };
    // An enable stopped before its walk wrote anything (killed in e2fsck or resize2fs):
    // there is nothing to decrypt, and `resume` would encrypt the whole disk only for
    // this disable to decrypt it again (a trial's 2 TiB). It is put back as the enable's
    // own stop does: the filesystem grown back and mounted, fstab's line given back.
    let mut cancelled = 0;
    let mut dropped = Vec::new();
    for idx in 0..sw.status.volumes.len() {
        let v = sw.status.volumes[idx].clone();
        if v.state != VolumeState::EncryptionInProgress
            || !wanted(&v)
            || crate::status::run_stage(&v, Some(&req.state_dir))
                != crate::status::RunStage::NotStarted
            || !plain_as_recorded(&v)
        {
            continue;
        }
        let dev = v.device.display().to_string();
        let failed = |e: Failure| {
            Failure::new(
                e.code,
                format!("the encryption of {dev} had not started (nothing was encrypted), and putting it back failed: {}", e.message),
            )
        };
        // Mounted again by hand: the kernel has it (e2fsck -n of a mounted filesystem
        // reports what its journal has not written back yet).
        let num = probe::block_dev_num(&v.device);
        let mounted = mountinfo::read()
            .unwrap_or_default()
            .iter()
            .any(|m| Some(m.dev) == num);
        // Mounted again by hand, shrunk: ext4 refuses to grow it online here (EPERM
        // after the offline shrink), so it comes off first.
        if mounted && grow_target(&v, &v.device).is_some() {
            return Err(Failure::failed(format!(
                "the encryption of {dev} had not started (nothing was encrypted), but its filesystem, shrunk for the header, is mounted (by hand?); nothing was changed: unmount it and run `luksify disable --volume {dev}` again, which grows it back and mounts it as it was"
            )));
        }
        if v.fs_type.as_deref().is_some_and(is_ext) && !mounted {
            fsck_ext_read_only(&v.device).map_err(failed)?;
        }
        grow_and_remount(&v, v.fs_type.as_deref(), &v.device).map_err(failed)?;
        release_fstab(&v);
        // The detached header it had reserved, never written.
        if let Some(h) = v.header.as_deref().filter(|h| only_zeros(h)) {
            let _ = std::fs::remove_file(h);
        }
        let slot = &mut sw.status.volumes[idx];
        slot.state = VolumeState::NotEncrypted;
        slot.error = None;
        slot.percent = 0.0;
        slot.bytes_done = 0;
        sw.status.end_run();
        commit(&mut sw)?;
        errln!(
            "luksify: the encryption of {dev} had not started (nothing was encrypted): put back as it was{}",
            v.mount_point
                .as_ref()
                .map(|m| format!(", mounted at {}", m.display()))
                .unwrap_or_default()
        );
        cancelled += 1;
        dropped.push(v.device.clone());
    }
    // Put back, plain, it is no longer luksify's: where its run encrypted others, it
    // leaves the list (as the next run would drop it). Kept in it, status read
    // "Encrypting data volume 2/2: preparing" with nothing running, and NotEncrypted
    // beside the run's encrypted volume (a trial). Alone in its run it stays, and says
    // "Encryption cancelled before it started".
    let run_did_some =
        sw.status.volumes.iter().any(|v| {
            v.in_run && matches!(v.state, VolumeState::Encrypted | VolumeState::NotMounted)
        });
    if run_did_some && !dropped.is_empty() {
        sw.status.volumes.retain(|v| !dropped.contains(&v.device));
        commit(&mut sw)?;
    }
    // A walk that was interrupted is finished by `resume` (a disable run then), not
    // skipped as "nothing to decrypt".
    if let Some(v) = sw.status.volumes.iter().find(|v| {
        matches!(
            v.state,
            VolumeState::EncryptionInProgress | VolumeState::DecryptionInProgress
        ) && wanted(v)
    }) {
        // The disable asked for, again: every volume when none was named (it named this
        // one only, and following it left the others encrypted; a trial).
        let again = if only.is_empty() {
            "`luksify disable`".to_string()
        } else {
            format!(
                "`luksify disable{}`",
                only.iter()
                    .map(|o| format!(" --volume {}", o.display()))
                    .collect::<String>()
            )
        };
        let others = sw.status.volumes.iter().any(|o| {
            o.device != v.device
                && wanted(o)
                && matches!(o.state, VolumeState::Encrypted | VolumeState::NotMounted)
        });
        let (what, then) = if v.state == VolumeState::EncryptionInProgress {
            (
                "encryption",
                if only.is_empty() {
                    format!(", then {again} to decrypt it and the others")
                } else {
                    format!(", then {again} to decrypt it")
                },
            )
        } else if crate::status::run_stage(v, Some(&req.state_dir))
            == crate::status::RunStage::NotStarted
        {
            // Nothing was decrypted: resume maps and mounts it again, still encrypted (a
            // trial was told resume "finishes it" and found it encrypted after).
            (
                "decryption",
                format!(
                    ", which maps and mounts it again (nothing was decrypted), then {again} again"
                ),
            )
        } else if others {
            (
                "decryption",
                format!(", which finishes it, then {again} again for the others"),
            )
        } else {
            ("decryption", ", which finishes it".to_string())
        };
        // A blocker found before anything changes, as `check` and `enable` find it:
        // exit 3, as theirs (it was 1 here; trial U).
        return Err(Failure::new(
            exit::BLOCKED,
            format!(
                "the {what} of {} was interrupted at {}%: run `luksify resume` first{then}",
                v.device.display(),
                v.percent.floor() as u64
            ),
        )
        .with_codes(&["luks_in_progress"]));
    }
    let todo: Vec<usize> = sw
        .status
        .volumes
        .iter()
        .enumerate()
        .filter(|(_, v)| {
            matches!(v.state, VolumeState::Encrypted | VolumeState::NotMounted) && wanted(v)
        })
        .map(|(i, _)| i)
        .collect();
    if todo.is_empty() {
        if !only.is_empty() && cancelled == 0 {
            return Err(Failure::failed(format!(
                "none of {} is an encrypted volume luksify manages (see `luksify status --json`)",
                only.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        return Ok(cancelled);
    }
    // Processes holding a mounted volume, found before anything is touched (as
    // `enable`'s preflight does): the status file stays as it was, exit 3. Found only
    // when the unmount failed, they left "Decryption failed" behind.
    // Refused before anything changes (the status file included): holders unless
    // --kill-holders stops them, and luksify's own working directory on a volume,
    // which nothing but a `cd` fixes (it used to be found only once the run had begun).
    {
        let held: Vec<(&str, String)> = todo
            .iter()
            .filter_map(|i| {
                // By the mapped device where it is one: its mount point may have
                // another mount stacked on top, which the path would name instead.
                let v = &sw.status.volumes[*i];
                v.mapped_device
                    .clone()
                    .filter(|d| probe::block_dev_num(d).is_some())
                    .or_else(|| v.mount_point.clone())
            })
            .filter_map(|mp| check::check(&mp, CheckOptions::default()).ok())
            .flat_map(|r| r.problems)
            // What no process here holds (a trial's mount in another namespace left
            // the view unmounted, its close failing with EBUSY, the volume offline
            // and "Decryption 100%" that resume and disable sent to each other).
            .filter(|p| {
                [
                    "own_cwd",
                    "own_output",
                    "other_namespace",
                    "loop_backed",
                    "overlay",
                    "stacked_mounts",
                ]
                .contains(&p.code)
                    || (p.code == "holders" && !req.kill_holders)
            })
            .map(|p| (p.code, p.one_line()))
            .collect();
        // A volume whose header is in front moves it out into the state directory's
        // `headers` before its data moves back over it: room for each, checked before
        // anything goes offline (a trial's full state directory failed after the
        // unmount and close, the volume offline).
        let in_front = todo
            .iter()
            .filter(|i| sw.status.volumes[**i].header.is_none())
            .count();
        let mut held = held;
        // The tools the steps after the walk run (a trial's disable without resize2fs
        // or mount on PATH decrypted the whole volume, then left it offline); resize2fs
        // only where the header in front gave its room back.
        for i in &todo {
            let v = &sw.status.volumes[*i];
            let fs = v.fs_type.as_deref().unwrap_or("");
            for b in check::missing_tools(fs, v.header.is_some()) {
                let b = (b.code, b.one_line());
                if !held.contains(&b) {
                    held.push(b);
                }
            }
        }
        held.extend(check::too_few_open_files().map(|p| (p.code, p.one_line())));
        // A stopped run's volumes it had not reached dropped out of it and of the status
        // file when a `disable --volume` of others took the run over (a trial: two
        // volumes left plain while status said "Encryption succeeded").
        let taken: Vec<&Path> = todo
            .iter()
            .map(|i| sw.status.volumes[*i].device.as_path())
            .collect();
        held.extend(
            stopped_run_left_out(
                &req.state_dir,
                Operation::DisableEncryption,
                &taken,
                only.is_empty(),
            )
            .map(|b| ("stopped_run_pending", b)),
        );

        held.extend(tabs::unwritable().map(|b| ("tables_unwritable", format!("BLOCKER: {b}"))));
        if in_front > 0 {
            let headers = req.state_dir.join("headers");
            // That header is then the only copy of the key to the part still encrypted:
            // in memory, a reboot mid-run loses it, and the data with it (a trial's
            // state directory on tmpfs; `enable` refuses a --header-dir there).
            if let Some(fs) = probe::volatile_fs(&headers) {
                // Its records only: not mnt/, where a userspace mapping shows the
                // volume's plaintext (`cp -a` of the whole directory wrote a plaintext
                // copy of the volume to the disk; a trial).
                let d = req.state_dir.display();
                let maps = if req.state_dir.join("maps").exists() {
                    format!(" {d}/maps")
                } else {
                    String::new()
                };
                held.push((
                    "state_dir_volatile",
                    format!(
                        "BLOCKER: the state directory {d} is on {fs}, which a reboot empties: a decryption moves the volume's header (the only copy of its key) there before its data moves back over it, so a reboot mid-run would lose the part still encrypted; fix: copy its records to a disk that is not being decrypted (`mkdir -p -m 755 /var/lib/luksify && cp -a {d}/status.json{maps} /var/lib/luksify/`, not its mnt/, where the mapping shows the plaintext) and run disable with --state-dir there"
                    ),
                ));
            }
            held.extend(header_dir_without_room(&headers, in_front).map(|b| {
                (
                    "state_dir_no_room",
                    b.replacen("--header-dir", "the state directory's", 1).replacen(
                        ", or pick a directory on another filesystem",
                        " (a decryption moves the volume's header there before its data moves back over it)",
                        1,
                    ),
                )
            }));
        }
        if !held.is_empty() {
            let (codes, lines): (Vec<&str>, Vec<String>) = held.into_iter().unzip();
            return Err(Failure::new(
                exit::BLOCKED,
                format!("{}; nothing was changed", lines.join("; ")),
            )
            .with_codes(&codes));
        }
    }
    // A volume whose kernel name moved since it was encrypted (a reboot that attached
    // disks in another order): found by its LUKS UUID, as `resume` finds it (a trial's
    // disable unmounted and closed it, then failed on the disk now under its old name,
    // the volume left offline). Only a header in front carries one.
    // One that is nowhere is said so: disable went on to the recorded name and said "no
    // keyslot accepts this passphrase" of whatever was there (trial M).
    for i in &todo {
        let v = &sw.status.volumes[*i];
        if let (None, Some(uuid)) = (&v.header, &v.luks_uuid) {
            if let Some(dev) = locate(v, "disable")? {
                errln!(
                    "luksify: the volume recorded as {} is {} now (its name moved since it was encrypted)",
                    v.device.display(),
                    dev.display()
                );
                sw.status.volumes[*i].device = dev;
            } else if v.state != VolumeState::DecryptionInProgress && !decrypted_outside(v) {
                // An encrypted volume's header is on its device: a name that shows no
                // header of it (a blank disk attached at the old name) is not the volume,
                // whatever a cut run's torn head would be (trial V9: "not a LUKS device").
                let found = std::fs::File::open(&v.device)
                    .ok()
                    .and_then(|f| luksify_luks::luks2::Luks2Header::read(&f).ok())
                    .map(|(h, _)| h.uuid);
                if found.as_deref() != Some(uuid.as_str()) {
                    return Err(Failure::failed(format!(
                        "{} {}, and no other device carries this volume (LUKS UUID {uuid}): its name moved (a reboot that attached disks in another order?) or it is detached; nothing was changed: attach the volume and run `luksify disable` again",
                        v.device.display(),
                        match found {
                            Some(u) => format!("holds another LUKS volume (UUID {u})"),
                            None => "holds no LUKS header of it".into(),
                        }
                    )));
                }
            }
        }
    }
    let todo: Vec<PathBuf> = todo
        .into_iter()
        .map(|i| sw.status.volumes[i].device.clone())
        .collect();
    let count = todo.len();
    sw.status
        .begin_run(Operation::DisableEncryption, std::process::id(), |v| {
            todo.contains(&v.device) || req.continues.contains(&v.device)
        });
    let order: Vec<PathBuf> = req.continues.iter().chain(&todo).cloned().collect();
    sw.status.order_run(&order);
    // On disk at once, as enable does: through the key derivation (seconds) the file
    // said no run was working and kept the last run's message (a trial's agent read it).
    commit(&mut sw)?;
    for (i, device) in todo.iter().enumerate() {
        let Some(idx) = sw.status.volumes.iter().position(|v| &v.device == device) else {
            continue;
        };
        adopt_key_file(&mut sw, idx, req, passphrase_override);
        let before = req.continues.len();
        let r = read_recorded_key(&sw.status.volumes[idx], passphrase_override)
            .and_then(|key| disable_one(req, &key, &mut sw, idx, (before + i, before + count)));
        if let Err(e) = r {
            return Err(end_run_failed(&mut sw, idx, e));
        }
    }
    sw.active = None;
    sw.status.end_run();
    commit(&mut sw)?;
    Ok(count)
}

/// The `--key-file` given to `resume` or `disable`, once it opens the volume's header,
/// becomes the volume's recorded key file: crypttab and a later `resume` then use it
/// (the one recorded at enable may be gone, which is why it was given).
fn adopt_key_file(sw: &mut StatusWriter, idx: usize, req: &EnableRequest, over: Option<&[u8]>) {
    let v = &sw.status.volumes[idx];
    let (Some(p), Some(given)) = (over, given_key_file(req, over)) else {
        return;
    };
    if v.key_file.as_ref() != Some(&given)
        && passphrase_unlocks(v.header.as_deref().unwrap_or(&v.device), p)
    {
        sw.status.volumes[idx].key_file = Some(given);
    }
}

/// The `--key-file` this run was given (absolute), if it was given one.
fn given_key_file(req: &EnableRequest, over: Option<&[u8]>) -> Option<PathBuf> {
    // Standard input (`-`) is no path to record.
    (over.is_some() && !req.key_file.as_os_str().is_empty() && req.key_file != Path::new("-"))
        .then(|| absolute_key_file(&req.key_file))
}

/// A key file as crypttab and the status file record it: absolute, links resolved.
fn absolute_key_file(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or(p.to_path_buf())
}

fn read_recorded_key(v: &VolumeStatus, over: Option<&[u8]>) -> Result<zeroize::Zeroizing<Vec<u8>>> {
    if let Some(p) = over {
        return Ok(zeroize::Zeroizing::new(p.to_vec()));
    }
    let kf = v.key_file.clone().ok_or_else(|| {
        Failure::failed(format!(
            "no key file recorded for {}; pass --key-file",
            v.device.display()
        ))
    })?;
    std::fs::read(&kf)
        .map(zeroize::Zeroizing::new)
        .map_err(|e| {
            Failure::failed(format!(
                "cannot read the key file {} recorded for {} ({e}); pass --key-file",
                kf.display(),
                v.device.display()
            ))
        })
}

fn disable_one(
    req: &EnableRequest,
    passphrase: &[u8],
    sw: &mut StatusWriter,
    idx: usize,
    pos: (usize, usize),
) -> Result<()> {
    let v = sw.status.volumes[idx].clone();
    // Decrypted by hand already: no header to unlock (it said "no keyslot accepts this
    // passphrase", and fstab and crypttab kept naming the mapping; a trial). What is
    // left of disable is done: a stale mapping record forgotten, the filesystem grown
    // and mounted, the tables restored. A detached header still holding keys is kept.
    if decrypted_outside(&v) {
        if map::load_record(&req.state_dir, &v.mapper).is_some() {
            map::close(&req.state_dir, &v.mapper)?;
        }
        if v.header.as_deref().is_some_and(|h| !decryption_walked(h)) {
            sw.status.volumes[idx].header = None;
        }
        errln!(
            "luksify: {} was decrypted outside luksify (its filesystem is back on it in plaintext): restoring fstab and crypttab and mounting it",
            v.device.display()
        );
        return finish_disable(sw, idx, Outcome::Finished);
    }
    // The device gone (a loop device detached, a disk removed): it said "no keyslot
    // accepts this passphrase: check --key-file" (trial M). A detached header's volume
    // is looked for by its head below.
    if v.header.is_none() {
        let gone = match probe::device_size(&v.device) {
            Err(e) => Some(format!("cannot be read ({e})")),
            Ok(0) => Some("holds nothing (0 bytes: a loop device with nothing attached?)".into()),
            Ok(_) => None,
        };
        if let Some(gone) = gone {
            return Err(Failure::failed(format!(
                "{}, the device recorded at enable, {gone}: attach the volume again under that name, then run the same `luksify disable` again; nothing was changed",
                v.device.display()
            )));
        }
    }
    // Memory for the unlock first: an argon2 keyslot under a cgroup limit it does not
    // fit got the process killed by the OOM killer (a trial).
    if let Some(b) = unlock_memory_blocker(v.header.as_deref().unwrap_or(&v.device)) {
        return Err(Failure::new(
            exit::BLOCKED,
            format!("{b}; nothing was changed"),
        ));
    }
    // The passphrase first: a wrong one must leave the volume mapped and mounted. Not
    // "wrong" where keyslots could not be tried: damaged (trial V3), or in a cipher
    // luksify does not implement (V4).
    let (hdr, vk) = match unlock_header(v.header.as_deref().unwrap_or(&v.device), passphrase) {
        Ok(k) => k,
        Err(Some(e)) => {
            return Err(Failure::failed(format!(
                "{}: {e}; nothing was changed",
                v.device.display()
            )))
        }
        Err(None) => {
            return Err(Failure::new(crate::exit::WRONG_PASSPHRASE, format!(
                "{}: no keyslot accepts this passphrase: check --key-file (or the key file recorded at enable); nothing was changed",
                v.device.display()
            )))
        }
    };
    // A detached header says nothing on the device: whatever disk has the recorded
    // name now would be decrypted (trial P3: a disk attached at the old name after a
    // renumbering was decrypted to garbage, and the volume's header lost its keyslots).
    // The volume is found by its head instead, decrypted with its key.
    let v = match (&v.header, v.state) {
        (Some(h), VolumeState::Encrypted | VolumeState::NotMounted) => {
            follow_detached_volume(sw, idx, h, &hdr, &vk)?
        }
        _ => v,
    };
    drop(vk);
    // With the header in front, the plaintext moves back over it: the header moves
    // to a new file for the run (also the journal an interrupted run resumes from).
    let header = match &v.header {
        Some(h) => h.clone(),
        None => {
            let dir = req.state_dir.join("headers");
            crate::status::create_dirs(&dir, 0o700)
                .map_err(|e| Failure::failed(format!("cannot create {} ({e})", dir.display())))?;
            let h = dir.join(format!("{}.decrypt.luks2", v.mapper));
            // Reserved by a disable stopped before it went on (no run recorded: this
            // volume's status names no header): nothing in it, it goes.
            if h.exists() && only_zeros(&h) {
                let _ = std::fs::remove_file(&h);
            }
            if h.exists() {
                return Err(Failure::failed(format!(
                    "{} exists from an earlier run; if that run was interrupted, `luksify resume` finishes it",
                    h.display()
                )));
            }
            // Its whole size reserved now, while the volume is still mounted: a limit on
            // file sizes (`ulimit -f`) or a full state directory failed the header's
            // first write after the unmount, and the volume was left unmounted under
            // "DecryptionInProgress" with a message that progress was recorded (a
            // trial). The walker takes the reserved file as a new one.
            let size = hdr.areas_end();
            drop(create_header(&h, size, "").map_err(|e| {
                Failure::new(e.code, format!("{}; nothing was changed", e.message))
            })?);
            h
        }
    };
    // From here the volume may go offline: the status says the decryption is under way,
    // so that `resume` finds it whatever instant the run dies at (and, if the walker
    // never started, maps and mounts it again still encrypted).
    {
        let s = &mut sw.status.volumes[idx];
        s.state = VolumeState::DecryptionInProgress;
        s.header = Some(header.clone());
        s.bytes_done = 0;
        s.percent = 0.0;
        s.resumed = false;
        s.phase = Some("unmounting".into());
    }
    sw.active = Some(idx);
    commit(sw)?;
    // Unmount whatever is mounted from the mapping (after what is nested below it,
    // recorded now so that it is mounted again on the plain device), then close it.
    if let Some(rec) = map::load_record(&req.state_dir, &v.mapper) {
        // A stale userspace record's loop device may be someone else's now: leave it be.
        let blk = match rec.backend {
            map::Backend::Userspace => map::own_loop(&rec).map(Path::to_path_buf),
            map::Backend::Kernel => Some(rec.mapped.clone()),
        }
        .unwrap_or_default();
        if let Some(num) = probe::block_dev_num(&blk) {
            let offline = (|| {
                if holders::own_cwd_on(&[num]) {
                    return Err(Failure::new(
                        exit::BLOCKED,
                        format!(
                            "luksify's own working directory is on {}: it could not be unmounted; run luksify from a directory outside the volume (cd /)",
                            v.mount_point.as_deref().unwrap_or(&blk).display()
                        ),
                    ));
                }
                if req.kill_holders {
                    let mut t = holders::Targets::default();
                    t.filesystems.insert(num);
                    t.block_devices.insert(num);
                    stop_holders(
                        &blk,
                        &holders::pids(&holders::scan_settled(&t, false)),
                        req.cancel,
                    )?;
                }
                not_cancelled(req.cancel)?;
                if let Some(mp) = &v.mount_point {
                    let nested = current_nested(mp, num)?;
                    let all = mountinfo::read().unwrap_or_default();
                    let views: Vec<check::MountView> = mountinfo::mounts_of(&all, num)
                        .into_iter()
                        .map(check::MountView::from)
                        .collect();
                    let primary = views.iter().find(|m| &m.mount_point == mp);
                    sw.status.volumes[idx].extra_mounts = extra_mounts(views.iter(), primary);
                    sw.status.volumes[idx].nested_mounts = nested.clone();
                    commit(sw)?;
                    unmount_nested(&v.device, &nested, FIX_DISABLE)?;
                }
                unmount_all(&blk, num, FIX_DISABLE)
            })();
            // Still mapped: put back what came off, and the volume stays encrypted.
            // So too for a view that will not close (its filesystem alive elsewhere: a
            // namespace with no process in it, a lazily detached mount): it was left
            // unmounted at "DecryptionInProgress 100%", which resume and disable sent
            // to each other.
            let closed = offline.and_then(|()| {
                map::close(&req.state_dir, &v.mapper)
                    .map_err(|e| Failure::new(exit::BLOCKED, e.message))
            });
            if let Err(e) = closed {
                sw.status.volumes[idx].header = v.header.clone();
                // The file reserved for a header in front, never written: it goes.
                if v.header.is_none() && only_zeros(&header) {
                    let _ = std::fs::remove_file(&header);
                }
                return Err(put_back(
                    sw,
                    idx,
                    e,
                    &rec.mapped,
                    VolumeState::Encrypted,
                    "decrypted",
                    None,
                ));
            }
        } else {
            map::close(&req.state_dir, &v.mapper)?;
        }
    }
    // Closed: no mapping until it is mapped again (a decryption stopped before its
    // walk) or the plain device mounted. An agent read "mapped_device" as the data
    // reachable there while nothing was (a trial).
    sw.status.volumes[idx].mapped_device = None;
    let in_front = v.header.is_none();
    sw.status.volumes[idx].phase = Some("deriving the key".into());
    commit(sw)?;
    let data = open_data(&v.device, "to decrypt", "is it still mounted or mapped?")?;
    let hf = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(in_front)
        .truncate(false)
        .mode(0o600)
        .open(&header)
        .map_err(|e| {
            Failure::failed(format!(
                "cannot open the header file {} for writing ({e}); nothing was written: make it writable (`lsattr`/`chattr -i` for an immutable file, a read-only mount), then run the command again (`luksify resume` for a run under way)",
                header.display()
            ))
        })?;
    let dopts = luksify_walker::DecryptOptions {
        // In front: the data moves back over the header and the shift protects it.
        resilience: if in_front {
            Resilience::Datashift
        } else {
            Resilience::Journal
        },
        checksum_hash: luksify_walker::Hash::Sha256,
        tuning: Default::default(),
        key_slot: None,
    };
    let outcome = walk(sw, idx, pos.0, pos.1, req, |ctl| {
        luksify_walker::decrypt(&data, Some(&hf), passphrase, &dopts, ctl)
    })?;
    drop(data);
    if outcome == Outcome::NotStarted {
        // Stopped while the passphrase was checked: nothing written.
        drop(hf);
        let stop = not_cancelled(req.cancel).expect_err("the walker saw the stop");
        map_again_encrypted(req, passphrase, sw, idx, (&header, in_front))?;
        let v = sw.status.volumes[idx].device.display().to_string();
        return Err(Failure::new(
            stop.code,
            format!(
                "{}; nothing on {v} was decrypted and it is mapped and mounted again",
                stop.message
            ),
        ));
    }
    finish_disable(sw, idx, outcome)
}

/// A decryption that never began: the volume is encrypted as it was. It is mapped and
/// mounted again, as if `disable` had not run; the file an in-front header was to move
/// to (`header`) is an empty shell and goes.
fn map_again_encrypted(
    req: &EnableRequest,
    passphrase: &[u8],
    sw: &mut StatusWriter,
    idx: usize,
    (header, in_front): (&Path, bool),
) -> Result<()> {
    if in_front {
        let _ = std::fs::remove_file(header);
        sw.status.volumes[idx].header = None;
    }
    finish_volume(req, passphrase, sw, idx, Outcome::Finished)
}

fn finish_disable(sw: &mut StatusWriter, idx: usize, outcome: Outcome) -> Result<()> {
    let v = sw.status.volumes[idx].clone();
    if outcome == Outcome::NotStarted {
        return Err(Failure::failed(
            "internal: a decryption not started is put back by its caller",
        ));
    }
    if let Outcome::Interrupted(_) = outcome {
        commit(sw)?;
        return Err(Failure::new(
            exit::INTERRUPTED,
            format!(
                "decryption of {} stopped on request; run `luksify resume` to finish it",
                v.device.display()
            ),
        ));
    }
    // Recorded before the header file goes (last): after a kill from here on,
    // `resume` and `status` know the walk is over without it.
    sw.status.volumes[idx].walk_done = true;
    sw.status.volumes[idx].phase = Some("growing and mounting the filesystem".into());
    commit(sw)?;
    grow_and_remount(&v, v.fs_type.as_deref(), &v.device)?;
    let etc = tabs::etc_dir();
    let io = |what: &str, e: std::io::Error| {
        Failure::failed(format!(
            "cannot update {what} in {} ({e}): {} is decrypted and mounted again; make {what} writable and run `luksify resume` to finish",
            etc.display(),
            v.device.display()
        ))
    };
    tabs::edit_file(&etc.join("crypttab"), |t| {
        tabs::crypttab_remove(t, &v.mapper)
    })
    .map_err(|e| io("crypttab", e))?;
    for mp in v.mount_point.iter().chain(
        v.fstab_mount_points
            .iter()
            .filter(|mp| Some(mp.as_path()) != v.mount_point.as_deref()),
    ) {
        tabs::edit_file(&etc.join("fstab"), |t| tabs::fstab_restore(t, mp))
            .map_err(|e| io("fstab", e))?;
    }
    // Entries still naming the mapping (their `# luksify: was:` line removed by hand or
    // by a configuration tool): pointed at the plain filesystem, whose UUID is the one
    // recorded (a trial's fstab kept naming a mapping that no longer exists).
    let mapped = Path::new("/dev/mapper").join(&v.mapper);
    let plain = v
        .fs_uuid
        .as_ref()
        .map(|u| format!("UUID={u}"))
        .unwrap_or_else(|| v.device.display().to_string());
    let text = std::fs::read_to_string(etc.join("fstab")).unwrap_or_default();
    if tabs::fstab_unmap(&text, &mapped, &plain) != text {
        tabs::edit_file(&etc.join("fstab"), |t| {
            tabs::fstab_unmap(t, &mapped, &plain)
        })
        .map_err(|e| io("fstab", e))?;
    }
    // The header (moved out of the way, or the detached one luksify created in
    // --header-dir) held the keyslots; once decrypted it is an empty shell, and left
    // behind it would block a later `enable` of a device with the same name.
    if let Some(h) = &v.header {
        let _ = std::fs::remove_file(h);
    }
    let s = &mut sw.status.volumes[idx];
    s.state = VolumeState::NotEncrypted;
    s.walk_done = false;
    s.percent = 100.0;
    s.header = None;
    s.mapped_device = None;
    s.error = None;
    sw.active = None;
    commit(sw)
}

/// An interrupted LUKS2 reencryption found by scanning devices, not the status file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundInProgress {
    pub device: PathBuf,
    /// Detached header file holding the journal, when the header is not on the device.
    pub header: Option<PathBuf>,
    /// Whether the header's reencryption runs towards plaintext (`mode: decrypt`).
    pub decrypt: bool,
}

/// Interrupted reencryptions the status file does not know about (it was lost, or the
/// run was started by `cryptsetup reencrypt` / `luksify encrypt`): every candidate block
/// device whose first 4 KiB are a LUKS2 header with the `online-reencrypt` requirement,
/// plus detached headers named by crypttab `header=` options and the `luksify-<dev>.luks2`
/// files in the header directories the status file records.
pub fn scan_in_progress(state_dir: &Path) -> Vec<FoundInProgress> {
    let status = crate::status::load(state_dir).unwrap_or_default();
    let known: Vec<PathBuf> = status.volumes.iter().map(|v| v.device.clone()).collect();
    let mut out: Vec<FoundInProgress> = Vec::new();
    for dev in probe::scannable_block_devices() {
        if known.contains(&dev) {
            continue;
        }
        if let Some(decrypt) = check::reencrypt_mode(&dev) {
            out.push(FoundInProgress {
                device: dev,
                header: None,
                decrypt,
            });
        }
    }
    // Detached headers: (device, header file) pairs from crypttab and header dirs.
    let mut pairs = tabs::crypttab_headers();
    let dirs: Vec<PathBuf> = status
        .volumes
        .iter()
        .filter_map(|v| v.header.as_ref()?.parent().map(Path::to_path_buf))
        .collect();
    for d in dirs {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            // `<name>.decrypt.luks2` is a disable's moved header, in the status file.
            if let Some(base) = n
                .strip_prefix("luksify-")
                .and_then(|b| b.strip_suffix(".luks2"))
                .filter(|b| !b.contains('.'))
            {
                pairs.push((PathBuf::from("/dev").join(base), e.path()));
            }
        }
    }
    for (dev, header) in pairs {
        if known.contains(&dev) || out.iter().any(|f| f.device == dev) {
            continue;
        }
        if let Some(decrypt) = check::reencrypt_mode(&header) {
            out.push(FoundInProgress {
                device: dev,
                header: Some(header),
                decrypt,
            });
        }
    }
    out
}

/// The tightest memory limit (see [`probe::memory_limits`]) that an argon2 of `argon`
/// bytes, with luksify's own share of that limit, goes over, if any.
fn limit_argon2_exceeds(argon: u64) -> Option<(u64, &'static str, u64)> {
    probe::memory_limits()
        .into_iter()
        .filter(|&(limit, _, own)| argon + own > limit)
        .min_by_key(|&(limit, _, own)| limit.saturating_sub(own))
}

/// Why unlocking the header at `path` cannot get its memory here, if so: its costliest
/// argon2 keyslot (unlocking may try each) against the tightest memory limit, counting
/// luksify's own share.
fn unlock_memory_blocker(path: &Path) -> Option<String> {
    use luksify_luks::luks2::json::{Kdf, Keyslot};
    let f = std::fs::File::open(path).ok()?;
    let (h, _) = luksify_luks::luks2::Luks2Header::read(&f).ok()?;
    let (slot, kib) = h
        .metadata
        .keyslots
        .iter()
        .filter_map(|(id, k)| match k {
            Keyslot::Luks2(ks) => match ks.kdf {
                Kdf::Argon2i { memory, .. } | Kdf::Argon2id { memory, .. } => Some((*id, memory)),
                Kdf::Pbkdf2 { .. } => None,
            },
            _ => None,
        })
        .max_by_key(|&(_, m)| m)?;
    let argon = u64::from(kib) * 1024;
    let (limit, what, own) = limit_argon2_exceeds(argon)?;
    Some(format!(
        "BLOCKER: unlocking {} needs about {} MiB (keyslot {slot}'s argon2 takes {} MiB, luksify {} MiB), and {what} leaves this process {} MiB: it would be killed mid-unlock; fix: raise the limit, or run where it does not apply",
        path.display(),
        (argon + own) >> 20,
        kib / 1024,
        own >> 20,
        limit >> 20
    ))
}

/// The device holding the encrypted volume `idx` whose detached header is `header`: the
/// one whose data, decrypted with the volume key, starts with the filesystem `enable`
/// recorded (by UUID). Its recorded device first; else every block device here is
/// tried, and the one found is recorded (as `resume` follows a volume with its header
/// in front). Refused, nothing written, when none or more than one is, or when nothing
/// was recorded to compare (no filesystem UUID) and the recorded device shows another
/// filesystem.
fn follow_detached_volume(
    sw: &mut StatusWriter,
    idx: usize,
    header: &Path,
    hdr: &luksify_luks::luks2::Luks2Header,
    vk: &luksify_luks::VolumeKey,
) -> Result<VolumeStatus> {
    let v = sw.status.volumes[idx].clone();
    let refuse = |why: String| {
        Failure::failed(format!(
            "{why}; nothing was written: attach the volume (`luksify open DEV NAME --key-file F --header {}` maps only the right device) and run `luksify disable` again",
            header.display()
        ))
    };
    let Some(uuid) = v.fs_uuid.clone() else {
        return match probe::type_and_uuid(&v.device) {
            Some((kind, u)) if kind != "crypto_LUKS" => Err(refuse(format!(
                "{} holds {kind} UUID {u} in plaintext, not the ciphertext of the volume whose header is {}",
                v.device.display(),
                header.display()
            ))),
            _ => Ok(v),
        };
    };
    let (seg, cipher) = (|| {
        let seg = hdr.data_segment().ok()?;
        let cipher = seg.cipher(vk).ok()?;
        Some((seg, cipher))
    })()
    .ok_or_else(|| {
        Failure::failed(format!(
            "cannot build the data cipher of {} to check that {} is its volume; nothing was written",
            header.display(),
            v.device.display()
        ))
    })?;
    let holds_it = |dev: &Path| -> bool {
        let mut head = vec![0u8; 4096.max(cipher.sector_size())];
        let read = std::fs::File::open(dev)
            .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, seg.offset));
        read.is_ok()
            && cipher.decrypt(&mut head, seg.iv_tweak).is_ok()
            && luksify_walker::fsprobe::uuid_in(&head).as_deref() == Some(uuid.as_str())
    };
    // Every device that holds it, the recorded one included: a copy at the recorded
    // name beside the volume elsewhere (a snapshot attached first) was decrypted, and
    // the volume's only header removed with it (trial V4).
    let recorded = std::fs::canonicalize(&v.device).unwrap_or(v.device.clone());
    let mut found: Vec<PathBuf> = probe::scannable_block_devices()
        .into_iter()
        .filter(|d| !is_luksify_mapping(d))
        .filter(|d| std::fs::canonicalize(d).is_ok_and(|c| c != recorded))
        .filter(|d| holds_it(d))
        .collect();
    found.dedup();
    if holds_it(&v.device) {
        if found.is_empty() {
            return Ok(v);
        }
        found.insert(0, v.device.clone());
    }
    let here = || {
        match probe::type_and_uuid(&v.device) {
        Some((kind, u)) => format!("{} holds {kind} UUID {u} now", v.device.display()),
        None => format!(
            "{} does not hold it now (decrypted with its key, its head shows no filesystem UUID {uuid})",
            v.device.display()
        ),
    }
    };
    match found.as_slice() {
        [d] => {
            errln!(
                "luksify: the volume recorded as {} is {} now (found by its filesystem UUID {uuid} under its key; its name moved since enable)",
                v.device.display(),
                d.display()
            );
            sw.status.volumes[idx].device = d.clone();
            commit(sw)?;
            Ok(sw.status.volumes[idx].clone())
        }
        [] => Err(refuse(format!(
            "{}, and no other device here holds the volume whose header is {}",
            here(),
            header.display()
        ))),
        many => Err(Failure::failed(format!(
            "{} each hold the volume whose header is {} (copies of it?): decrypting one would leave the others, and the header is its only key; nothing was written: detach the copies and run `luksify disable` again",
            many.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            header.display()
        ))),
    }
}

/// The LUKS2 header at the start of `path` (a device or a detached header file), read
/// without claiming the device, and the volume key a keyslot of it gives `passphrase`.
/// `Err(None)`: a wrong passphrase (or no header); `Err(Some(e))`: keyslots that could not
/// be tried (damaged, or in a cipher luksify does not implement), which the passphrase
/// may be for.
fn unlock_header(
    path: &Path,
    passphrase: &[u8],
) -> std::result::Result<
    (luksify_luks::luks2::Luks2Header, luksify_luks::VolumeKey),
    Option<luksify_luks::Error>,
> {
    use luksify_luks::luks2::json::Keyslot;
    // Not "wrong" where there is no header to try: a device that went away said "no
    // keyslot accepts this passphrase: check --key-file" (trial M).
    let f = std::fs::File::open(path).map_err(|e| {
        Some(luksify_luks::Error::Io {
            what: "open".into(),
            source: e,
        })
    })?;
    let (h, _) = luksify_luks::luks2::Luks2Header::read(&f).map_err(Some)?;
    let mut last = luksify_luks::Error::WrongPassphrase;
    let ids: Vec<u32> = h
        .metadata
        .keyslots
        .iter()
        .filter(|(_, k)| matches!(k, Keyslot::Luks2(_)))
        .map(|(id, _)| *id)
        // An unbound keyslot holds another key: "not the volume's" is no reason here.
        .filter(|id| !h.is_unbound(*id))
        .collect();
    for id in ids {
        match h.unlock_keyslot(&f, id, passphrase) {
            Ok(vk) => return Ok((h, vk)),
            Err(luksify_luks::Error::WrongPassphrase) => {}
            Err(e) => last = e,
        }
    }
    match h.untried_or(last) {
        luksify_luks::Error::WrongPassphrase => Err(None),
        e => Err(Some(e)),
    }
}

/// Whether `passphrase` opens a keyslot of the LUKS2 header at the start of `path`.
fn passphrase_unlocks(path: &Path, passphrase: &[u8]) -> bool {
    unlock_header(path, passphrase).is_ok()
}

/// Mount point, filesystem type and options that fstab gives `device` or its mapping.
fn fstab_entry_for(device: &Path, mapper: &str) -> Option<(PathBuf, String, String)> {
    let text = std::fs::read_to_string(tabs::etc_dir().join("fstab")).ok()?;
    let mapped = format!("/dev/mapper/{mapper}");
    let dev = device.display().to_string();
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4 && (f[0] == mapped || f[0] == dev)).then(|| {
                (
                    PathBuf::from(f[1]),
                    f[2].to_string(),
                    f[3].replace(",nofail", ""),
                )
            })
        })
}

/// Records found encryptions in the status file so that `resume` finishes them like
/// its own: the key file given on the command line, the mount point from fstab when it
/// names the device (else the volume is mapped but not mounted).
fn adopt(sw: &mut StatusWriter, found: &[FoundInProgress], key_file: &Path) {
    let key_file = absolute_key_file(key_file);
    for f in found.iter().filter(|f| !f.decrypt) {
        let name = mapping_name(&f.device);
        let tab = fstab_entry_for(&f.device, &name);
        sw.status.upsert(VolumeStatus {
            device: f.device.clone(),
            mapper: name,
            mount_point: tab.as_ref().map(|t| t.0.clone()),
            fs_type: tab.as_ref().map(|t| t.1.clone()),
            mount_options: tab.as_ref().map(|t| t.2.clone()),
            header: f.header.clone(),
            key_file: Some(key_file.clone()),
            state: VolumeState::EncryptionInProgress,
            ..Default::default()
        });
    }
}

/// Opens the data device `dev` read-write for the walker. A refusal that says its cause
/// (read-only, busy, locked by another run) is reported as it is; other errors get
/// `hint`.
fn open_data(dev: &Path, what: &str, hint: &str) -> Result<DataDevice> {
    DataDevice::open(dev, false).map_err(|e| open_data_failure(dev, what, hint, e))
}

fn open_data_failure(dev: &Path, what: &str, hint: &str, e: std::io::Error) -> Failure {
    match e.get_ref() {
        Some(_) => Failure::failed(format!("cannot open {} {what}: {e}", dev.display())),
        None => Failure::failed(format!(
            "cannot open {} {what} ({e}); {hint}",
            dev.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The filesystem's I/O unit sets the sector, unless the device does not end on a
    /// whole one (fdisk's last partition often ends on an odd sector): then 512.
    #[test]
    fn encryption_sector_follows_the_filesystem_and_the_devices_end() {
        let gib = 1u64 << 30;
        assert_eq!(encryption_sector_size(Some(4096), gib), 4096);
        assert_eq!(encryption_sector_size(Some(1024), gib), 1024);
        assert_eq!(encryption_sector_size(None, gib), 512);
        assert_eq!(encryption_sector_size(Some(4096), gib - 2081 * 512), 512);
        assert_eq!(encryption_sector_size(Some(4096), gib + 2048), 512);
        assert_eq!(encryption_sector_size(Some(1024), gib + 2048), 1024);
    }

    #[test]
    fn stable_link_prefers_a_wwn_id_then_any_id_then_a_path() {
        let d = tempfile::tempdir().unwrap();
        let dev = d.path().join("sdc");
        let other = d.path().join("sdd");
        std::fs::write(&dev, b"").unwrap();
        std::fs::write(&other, b"").unwrap();
        let disk = d.path().join("disk");
        for sub in ["by-id", "by-path"] {
            std::fs::create_dir_all(disk.join(sub)).unwrap();
        }
        let link = |sub: &str, name: &str, to: &Path| {
            std::os::unix::fs::symlink(to, disk.join(sub).join(name)).unwrap();
            disk.join(sub).join(name)
        };
        assert_eq!(stable_link(&disk, &dev), None);
        let by_path = link("by-path", "pci-0000:00:05.0", &dev);
        assert_eq!(stable_link(&disk, &dev), Some(by_path));
        let ata = link("by-id", "ata-DISK_123", &dev);
        link("by-id", "ata-OTHER_9", &other);
        assert_eq!(stable_link(&disk, &dev), Some(ata));
        let wwn = link("by-id", "wwn-0x5000c500a1b2c3d4", &dev);
        assert_eq!(stable_link(&disk, &dev), Some(wwn));
    }
}
