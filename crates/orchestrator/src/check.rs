//! Preflight: everything that stands between a data volume and in-place encryption,
//! found without writing anything. Each problem is one line: what, why, how to fix.

use crate::holders::{self, Holder, Targets};
use crate::mountinfo::{self, DevNum, Mount};
use crate::probe::{self, FsInfo, SwapArea};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Space the encrypted layout takes from the end of an ext filesystem when the
/// header lives on the device: resize2fs shrinks the filesystem by this much.
pub const HEADER_RESERVE_BYTES: u64 = 32 << 20;
/// Below this much available memory the walker and page cache compete badly.
pub const MIN_MEM_AVAILABLE: u64 = 256 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Stops `enable` until fixed.
    Blocker,
    /// Worth knowing; `enable` proceeds.
    Warning,
}

/// One problem: what, why, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Stable identifier for scripts (`holders`, `swap`, `xfs_needs_detached_header`, ...).
    pub code: &'static str,
    pub severity: Severity,
    pub what: String,
    pub why: String,
    pub fix: String,
}

impl Problem {
    pub fn one_line(&self) -> String {
        let tag = match self.severity {
            Severity::Blocker => "BLOCKER",
            Severity::Warning => "warning",
        };
        format!("{tag}: {}: {}; fix: {}", self.what, self.why, self.fix)
    }
}

/// How the caller intends to proceed; changes which findings are blockers.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckOptions {
    /// A detached header (`--header-dir`): no shrink, no space needed on the device.
    pub detached_header: bool,
    /// `--kill-holders`: holders will be stopped, so they only warn.
    pub kill_holders: bool,
    /// Checking every device (the candidate listing): no `O_EXCL` open of a device, by
    /// luksify or by a tool it runs (`resize2fs -P`), to see whether something holds
    /// it. For that instant the probe holds it itself, and a `resize2fs`, `mkfs` or
    /// `mount` of another run that opens it then fails with EBUSY (a concurrent
    /// listing failed a test's resize2fs so).
    pub listing: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct MountView {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub options: String,
    /// Path inside the filesystem that is mounted (`/`, or the directory of a bind mount).
    pub root: String,
    /// The block device node behind the mount when it is a whole filesystem of a block
    /// device (not a bind of a subdirectory, not tmpfs/proc): such a mount can be
    /// unmounted and mounted again with `mount -t FS -o OPTIONS SOURCE MOUNT_POINT`.
    pub source: Option<PathBuf>,
}

impl From<&Mount> for MountView {
    fn from(m: &Mount) -> Self {
        MountView {
            mount_point: m.mount_point.clone(),
            fs_type: m.fs_type.clone(),
            options: m.remount_options(),
            root: m.root.clone(),
            source: (m.dev.major != 0 && m.root == "/")
                .then(|| probe::dev_node(m.dev))
                .flatten(),
        }
    }
}

/// Everything `luksify check` learned about one target.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub target: PathBuf,
    pub device: PathBuf,
    pub dev: String,
    pub size_bytes: u64,
    pub mounts: Vec<MountView>,
    pub nested_mounts: Vec<MountView>,
    pub holders: Vec<Holder>,
    pub swaps: Vec<SwapArea>,
    /// `pv` (LVM physical volume), `lv` (logical volume) or absent.
    pub lvm: Option<String>,
    pub dm_uuid: Option<String>,
    pub selinux: String,
    pub mem_available_bytes: Option<u64>,
    pub filesystem: FsInfo,
    pub can_shrink: bool,
    /// Bytes the header needs on the device (0 with a detached header).
    pub header_space_needed: u64,
    /// Whether the filesystem leaves that much room (after a shrink when possible).
    pub header_space_ok: bool,
    /// `luks2`, `luks2-reencrypt-in-progress`, `luks1` or absent.
    pub luks: Option<String>,
    pub is_os_volume: bool,
    pub problems: Vec<Problem>,
}

impl Report {
    pub fn blockers(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Blocker)
    }
    pub fn ok(&self) -> bool {
        self.blockers().next().is_none()
    }
    /// Mount that `enable` unmounts and later remounts (the first of the whole
    /// filesystem; the others come back as binds of it).
    pub fn primary_mount(&self) -> Option<&MountView> {
        self.mounts
            .iter()
            .find(|m| m.root == "/")
            .or(self.mounts.first())
    }
}

/// A target resolved to its block device and mounts.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub device: PathBuf,
    pub dev: DevNum,
    pub mounts: Vec<Mount>,
}

/// Resolves a device path or a mount point.
/// `target` as fstab's `UUID=`, `LABEL=`, `PARTUUID=` or `PARTLABEL=` tag, unless a
/// path of that name exists.
pub(crate) fn fstab_tag(target: &Path) -> Option<&str> {
    let t = target.to_str()?;
    let (key, value) = t.split_once('=')?;
    (["UUID", "LABEL", "PARTUUID", "PARTLABEL"].contains(&key)
        && !value.is_empty()
        && !target.exists())
    .then_some(t)
}

/// The one block device an fstab/crypttab tag (`UUID=`, `LABEL=`, ...) names, or why
/// not (none, or several: never a guess); `Ok(None)` when `target` is no tag.
pub fn device_of_tag(target: &Path) -> Result<Option<PathBuf>, String> {
    let Some(tag) = fstab_tag(target) else {
        return Ok(None);
    };
    let wanted = crate::tabs::unescape_field(tag);
    match probe::devices_with_tag(&wanted).as_slice() {
        [d] => Ok(Some(d.clone())),
        [] => Err(format!(
            "{tag}: no block device carries it (blkid); check the name with `blkid`, or give the device"
        )),
        many => Err(format!(
            "{tag}: {} devices carry it ({}); give the device itself (a copy of a disk carries its UUIDs)",
            many.len(),
            many.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

pub fn resolve(target: &Path, all: &[Mount]) -> Result<Resolved, Problem> {
    let bad = |what: String, why: String, fix: &str| Problem {
        code: "target",
        severity: Severity::Blocker,
        what,
        why,
        fix: fix.to_string(),
    };
    // fstab's way of naming a device (`LABEL=data`, `UUID=...`): the device blkid finds.
    if let Some(tag) = fstab_tag(target) {
        // fstab's own spelling of a blank (`LABEL=my\040data`) is the label's blank.
        let wanted = crate::tabs::unescape_field(tag);
        let devs: Vec<String> = probe::devices_with_tag(&wanted)
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        return match devs.as_slice() {
            [d] => resolve(Path::new(d), all),
            [] => Err(bad(
                tag.to_string(),
                "no block device carries it (blkid)".into(),
                "check the name with `blkid`, or give the device (/dev/sdc) or its mount point",
            )),
            // Which one blkid prefers can change between two commands (a check, then
            // the enable): never guess which disk to encrypt.
            many => Err(bad(
                tag.to_string(),
                format!("{} devices carry it ({})", many.len(), many.join(", ")),
                "give the device itself (/dev/sdc) or its mount point; a copy of a disk carries its labels and UUIDs, so also make sure which one is in use",
            )),
        };
    }
    if let Some(dev) = probe::block_dev_num(target) {
        // A btrfs's mounts show an anonymous device number: found by their source.
        let canon = std::fs::canonicalize(target).unwrap_or_else(|_| target.to_path_buf());
        let mounts = mountinfo::mounts_of(all, dev)
            .into_iter()
            .chain(all.iter().filter(|m| {
                m.fs_type == "btrfs"
                    && m.dev != dev
                    && std::fs::canonicalize(&m.source).is_ok_and(|s| s == canon)
            }))
            .cloned()
            .collect();
        return Ok(Resolved {
            device: target.to_path_buf(),
            dev,
            mounts,
        });
    }
    let md = std::fs::metadata(target).map_err(|e| {
        bad(
            format!("{}", target.display()),
            format!("cannot stat it ({e})"),
            "give an existing block device (/dev/sdc) or the mount point of one",
        )
    })?;
    if !md.is_dir() {
        return Err(bad(
            format!("{}", target.display()),
            "it is neither a block device nor a directory".into(),
            "give a block device (/dev/sdc) or the mount point of one",
        ));
    }
    let canon = std::fs::canonicalize(target).unwrap_or_else(|_| target.to_path_buf());
    let m = mountinfo::mount_at(all, &canon).ok_or_else(|| {
        bad(
            format!("{}", target.display()),
            "it is a directory but not a mount point".into(),
            "give the mount point itself or the device (see `findmnt`)",
        )
    })?;
    // Mounted on top of another mount at the same point: which one is meant is not
    // for luksify to guess (a trial's bind of the root disk over a volume made disable
    // set about unmounting /). An automounter's autofs below is not a filesystem.
    if let Some(under) = all
        .iter()
        .find(|p| p.id == m.parent_id && p.id != m.id && p.mount_point == m.mount_point)
        .filter(|p| p.fs_type != "autofs")
    {
        return Err(bad(
            format!("{}", target.display()),
            format!(
                "{} is mounted on top of {} there",
                m.describe(),
                under.describe()
            ),
            &format!(
                "take the top mount off first (umount the directory once), then give the directory or the device itself ({})",
                // The disks of the two mounts, the lower first (the top one hides it);
                // a placeholder only where neither is a block device (a trial copied
                // "/dev/sdc" from beside its own loop device's name).
                [under, m]
                    .iter()
                    .map(|x| Path::new(&x.source))
                    .find(|p| probe::block_dev_num(p).is_some())
                    .map_or("/dev/sdc".into(), |p| p.display().to_string())
            ),
        ));
    }
    // A btrfs mount shows an anonymous device number, not its disk's: the disk is its
    // source (a trial's btrfs mount read "not on a block device").
    let btrfs_disk = (m.fs_type == "btrfs")
        .then(|| PathBuf::from(&m.source))
        .filter(|p| probe::block_dev_num(p).is_some());
    if let Some(d) = btrfs_disk {
        return resolve(&d, all);
    }
    let device = probe::dev_node(m.dev)
        .or_else(|| {
            let p = PathBuf::from(&m.source);
            (probe::block_dev_num(&p) == Some(m.dev)).then_some(p)
        })
        .ok_or_else(|| {
            bad(
                format!("{}", target.display()),
                format!(
                    "it is a {} mount of {}, not on a block device",
                    m.fs_type, m.source
                ),
                "only filesystems on block devices can be encrypted in place",
            )
        })?;
    let dev = m.dev;
    let mounts = mountinfo::mounts_of(all, dev)
        .into_iter()
        .cloned()
        .collect();
    Ok(Resolved {
        device,
        dev,
        mounts,
    })
}

/// What to do instead of encrypting whole disk `dev`: its partitions, with where each is
/// mounted (a trial's GPT disk said "no filesystem recognised ... make a filesystem",
/// five of its partitions mounted).
fn partition_fix(dev: &Path, all: &[Mount]) -> String {
    let parts: Vec<String> = probe::partitions(dev)
        .iter()
        .map(|p| {
            let num = probe::block_dev_num(p);
            let at: Vec<String> = all
                .iter()
                .filter(|m| Some(m.dev) == num)
                .map(|m| m.mount_point.display().to_string())
                .collect();
            match at.is_empty() {
                true => p.display().to_string(),
                false => format!("{} (mounted at {})", p.display(), at.join(", ")),
            }
        })
        .collect();
    match parts.first() {
        Some(_) => format!(
            "encrypt its partitions one by one instead (`luksify check PARTITION`): {}",
            parts.join(", ")
        ),
        None => {
            "encrypt one partition instead (an image's partitions appear with `losetup -P`)".into()
        }
    }
}

/// Devices holding /, /boot or /boot/efi, and the disks that contain them.
pub fn os_devices(all: &[Mount]) -> Vec<DevNum> {
    let mut v = Vec::new();
    for p in ["/", "/boot", "/boot/efi"] {
        if let Some(m) = mountinfo::mount_at(all, Path::new(p)) {
            v.push(m.dev);
            // A partition's parent disk is the sysfs directory above it.
            let sys = PathBuf::from(format!("/sys/dev/block/{}", m.dev));
            if let Some(disk) = probe::whole_disk_dir(&sys) {
                if let Ok(s) = std::fs::read_to_string(disk.join("dev")) {
                    if let Some((a, b)) = s.trim().split_once(':') {
                        if let (Ok(major), Ok(minor)) = (a.parse(), b.parse()) {
                            let d = DevNum { major, minor };
                            if d != m.dev {
                                v.push(d);
                            }
                        }
                    }
                }
            }
        }
    }
    v
}

/// Reencryption state of a LUKS2 header at the start of `path` (a device or a header
/// file): `Some(decrypt?)` when it carries the `online-reencrypt` requirement.
pub fn reencrypt_mode(path: &Path) -> Option<bool> {
    use std::os::unix::fs::FileExt;
    if luks_state(path).as_deref() != Some("luks2-reencrypt-in-progress") {
        return None;
    }
    let f = std::fs::File::open(path).ok()?;
    let mut json = vec![0u8; 64 << 10];
    let n = f.read_at(&mut json, 4096).ok()?;
    let text = String::from_utf8_lossy(&json[..n]);
    Some(text.contains("\"mode\":\"decrypt\""))
}

/// Why `holders` stand in the way: files, directories and maps on the filesystem keep it
/// from being unmounted; the device node open (no obstacle to an unmount) lets a process
/// read ciphertext or write under the walk (a trial read "target is busy" for a reader
/// of /dev/loopN, which does not stop an unmount).
fn holders_why(holders: &[Holder]) -> String {
    let (device, files): (Vec<&Holder>, Vec<&Holder>) = holders
        .iter()
        .partition(|h| h.kind == holders::HoldKind::OpenDevice);
    let busy = "a filesystem cannot be unmounted while processes use it (\"target is busy\")";
    let raw = "a process with the device node open would read ciphertext, or write under the walk and be overwritten";
    match (files.is_empty(), device.is_empty()) {
        (false, false) => format!("{busy}, and {raw}"),
        (true, false) => raw.to_string(),
        _ => busy.to_string(),
    }
}

/// Adds [`interrupted_run`] to a report. Such a device may still start with the
/// volume's old LUKS header (a decryption moves its data over it last): that is not
/// "already encrypted".
pub fn add_interrupted_run(r: &mut Report, state_dir: &Path) {
    // A run at work on it (`busy_run`) is live, not interrupted.
    let busy = r.problems.iter().any(|p| p.code == "busy_run");
    if let Some(p) = interrupted_run(&r.device, state_dir).filter(|_| !busy) {
        // It names the run's state directory, so it stands for the device header's too;
        // and a part-ciphertext device is not "no filesystem" to make one on (a trial
        // saw that hint beside the interrupted run's).
        r.problems.retain(|q| {
            !matches!(
                q.code,
                "already_luks"
                    | "luks_in_progress"
                    | "no_filesystem"
                    | "no_header_space"
                    | "ext_errors"
                    | "luksify_crypttab_line"
            )
        });
        r.problems.push(p);
    } else if let Some(h) = detached_header_of(&r.device, state_dir) {
        // Encrypted with its header elsewhere: its start is ciphertext, not "no
        // filesystem" to make one on.
        r.problems.retain(|q| {
            !matches!(
                q.code,
                "no_filesystem" | "no_header_space" | "ext_errors" | "luksify_crypttab_line"
            )
        });
        let dev_s = r.device.display().to_string();
        r.problems.push(Problem {
            code: "already_luks",
            severity: Severity::Blocker,
            what: format!("{dev_s} is already encrypted by luksify"),
            why: format!("its LUKS2 header is in {}", h.display()),
            fix: format!(
                "nothing to do; open it with `luksify open {dev_s} NAME --key-file F --header {}`",
                h.display()
            ),
        });
        if r.luks.is_none() {
            r.luks = Some("luks2 (detached header)".into());
        }
    }
}

/// The detached header of a volume luksify encrypted on `device`, as the status file of
/// `state_dir` or of the default state directory records it (finished runs), or
/// crypttab's `header=` names it; only if that file holds a LUKS header.
fn detached_header_of(device: &Path, state_dir: &Path) -> Option<PathBuf> {
    use crate::status::VolumeState;
    let dev = probe::block_dev_num(device)?;
    let same = |p: &Path| probe::block_dev_num(p) == Some(dev);
    let is_luks = |h: &Path| luks_state(h).is_some();
    for dir in run_dirs(state_dir) {
        let Ok(status) = crate::status::load(&dir) else {
            continue;
        };
        for v in &status.volumes {
            if matches!(v.state, VolumeState::Encrypted | VolumeState::NotMounted)
                && same(&v.device)
            {
                if let Some(h) = v.header.as_ref().filter(|h| is_luks(h)) {
                    return Some(h.clone());
                }
            }
        }
    }
    crate::tabs::crypttab_headers()
        .into_iter()
        .find_map(|(d, h)| (same(&d) && is_luks(&h)).then_some(h))
}

/// The state directories whose status files record runs a device may be part of:
/// `state_dir`, and the default one if that is another.
fn run_dirs(state_dir: &Path) -> Vec<PathBuf> {
    let default = crate::status::state_dir(None);
    let mut dirs = vec![state_dir.to_path_buf()];
    if default != state_dir {
        dirs.push(default);
    }
    dirs
}

/// `target`, a directory that is not a mount point (the refusal `check` gives it), as
/// the recorded mount point of a volume a luksify run has taken offline: a run under
/// way (its pid alive), or one that was interrupted. Found in the status files of
/// `state_dir` and the default state directory; None when no run records it.
pub fn offline_volume_at(target: &Path, state_dir: &Path) -> Option<Problem> {
    use crate::status::VolumeState;
    let canon = std::fs::canonicalize(target).ok()?;
    run_dirs(state_dir).into_iter().find_map(|dir| {
        let mut status = crate::status::load(&dir).ok()?;
        if !status.run_process_running() {
            status.catch_up_with_headers(Some(&dir));
        }
        let v = status.volumes.iter().find(|v| {
            v.mount_point.as_deref() == Some(canon.as_path())
                && matches!(
                    v.state,
                    VolumeState::EncryptionInProgress | VolumeState::DecryptionInProgress
                )
        })?;
        let what = if v.state == VolumeState::EncryptionInProgress {
            "encryption"
        } else {
            "decryption"
        };
        let live = status
            .pid
            .filter(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        // The state directory the run lives in, named whenever it is not the one this
        // command was given (which the CLI adds itself): "`luksify status --state-dir
        // MINE`" named a directory with no status file of that run (trial A2).
        let in_dir = |cmd: &str| {
            if dir == state_dir {
                format!("luksify {cmd}")
            } else {
                format!("luksify {cmd} --state-dir {}", dir.display())
            }
        };
        let resume = in_dir("resume");
        Some(Problem {
            code: if live.is_some() {
                "busy_run"
            } else {
                "luks_in_progress"
            },
            severity: Severity::Blocker,
            what: format!(
                "{} is where {} is mounted, which a luksify {what} has taken offline",
                target.display(),
                v.device.display()
            ),
            why: match live {
                Some(pid) => format!(
                    "the run is under way (pid {pid}), at {}%",
                    v.percent.floor() as u64
                ),
                None => format!("the run was interrupted at {}%", v.percent.floor() as u64),
            },
            fix: match live {
                Some(_) => format!(
                    "wait for it to finish (`{}` shows its progress); do not kill it",
                    in_dir("status")
                ),
                None => {
                    format!("run `{resume}` to finish it; the volume is mounted here again then")
                }
            },
        })
    })
}

/// A luksify run on `device` that the device's own first bytes cannot show: a
/// decryption (its header moved to a file; the device part plaintext, part ciphertext,
/// its start often a readable filesystem again) or an encryption with a detached
/// header. Found in the status file of `state_dir` and of the default state directory,
/// in the `luksify-*.luks2` header files of the directories those record, and in
/// crypttab's `header=` options. Writing to such a device (`enable` again) would
/// encrypt ciphertext a second time.
pub fn interrupted_run(device: &Path, state_dir: &Path) -> Option<Problem> {
    use crate::status::VolumeState;
    let dev = probe::block_dev_num(device)?;
    let same = |p: &Path| probe::block_dev_num(p) == Some(dev);
    let dev_s = device.display().to_string();
    let default = crate::status::state_dir(None);
    let dirs = run_dirs(state_dir);
    let found = |decrypt: bool,
                 recorded: String,
                 header: Option<&Path>,
                 dir: Option<&Path>,
                 stage: crate::status::RunStage| {
        use crate::status::RunStage;
        let what = if decrypt { "decryption" } else { "encryption" };
        // The run's own state directory by name, unless a plain `luksify resume` (from
        // the default one, as this command also runs) finds it.
        let resume = match dir {
            Some(d) if d != default || d != state_dir => {
                format!("luksify resume --state-dir {}", d.display())
            }
            Some(_) => "luksify resume".to_string(),
            None => format!(
                "luksify resume {dev_s} --key-file F{}",
                header
                    .map(|h| format!(" --header {}", h.display()))
                    .unwrap_or_default()
            ),
        };
        Problem {
            code: "luks_in_progress",
            severity: Severity::Blocker,
            what: format!("{dev_s} has an interrupted luksify {what}"),
            why: format!(
                "{recorded}{}; {}",
                header
                    .map(|h| format!(", its LUKS2 header is in {}", h.display()))
                    .unwrap_or_default(),
                match stage {
                    RunStage::NotStarted if decrypt => {
                        "it had not started: the device is still encrypted"
                    }
                    RunStage::NotStarted => {
                        "it stopped before writing anything: the device is still plaintext"
                    }
                    RunStage::Walked if decrypt => {
                        "its walk is done: the device is all plaintext, its last steps (remount, fstab, crypttab) are left"
                    }
                    RunStage::Walked => {
                        "its walk is done: the device is all ciphertext, not yet mapped and mounted"
                    }
                    _ => "the device is part plaintext, part ciphertext",
                }
            ),
            fix: match stage {
                RunStage::NotStarted if decrypt => {
                    format!("run `{resume}` to map and mount it again")
                }
                RunStage::NotStarted => format!(
                    "run `{resume}` to start it again, or `luksify disable{} --volume {dev_s}` to put it back as it was",
                    match dir {
                        Some(d) if d != default || d != state_dir =>
                            format!(" --state-dir {}", d.display()),
                        _ => String::new(),
                    }
                ),
                RunStage::Walked => format!("run `{resume}` to finish its last steps"),
                _ => format!("run `{resume}` to finish it"),
            },
        }
    };
    let walking = crate::status::RunStage::Walking(None);
    let mut header_dirs = Vec::new();
    for dir in &dirs {
        let Ok(status) = crate::status::load(dir) else {
            continue;
        };
        for v in &status.volumes {
            let decrypt = match v.state {
                VolumeState::EncryptionInProgress => false,
                VolumeState::DecryptionInProgress => true,
                _ => continue,
            };
            if same(&v.device) {
                return Some(found(
                    decrypt,
                    format!(
                        "{} records it",
                        dir.join(crate::status::STATUS_FILE).display()
                    ),
                    v.header.as_deref(),
                    Some(dir),
                    crate::status::run_stage(v, Some(dir)),
                ));
            }
        }
        header_dirs.extend(
            status
                .volumes
                .iter()
                .filter_map(|v| v.header.as_ref()?.parent().map(Path::to_path_buf)),
        );
    }
    // Header files of runs the status file no longer names: `luksify-<dev>.luks2`
    // (an enable with --header-dir) and `luksify-<dev>.decrypt.luks2` (a disable).
    let name = device.file_name()?.to_string_lossy().into_owned();
    header_dirs.dedup();
    for d in header_dirs {
        for f in [
            format!("luksify-{name}.luks2"),
            format!("luksify-{name}.decrypt.luks2"),
        ] {
            let h = d.join(f);
            if let Some(decrypt) = reencrypt_mode(&h) {
                return Some(found(
                    decrypt,
                    "its header file says so".into(),
                    Some(&h),
                    None,
                    walking,
                ));
            }
        }
    }
    crate::tabs::crypttab_headers()
        .into_iter()
        .filter(|(d, _)| same(d))
        .find_map(|(_, h)| {
            let decrypt = reencrypt_mode(&h)?;
            Some(found(
                decrypt,
                "crypttab's header= file says so".into(),
                Some(&h),
                None,
                walking,
            ))
        })
        .or_else(|| cut_shift_start(device))
}

/// A `luksify encrypt --reduce-device-size` start cut while it wrote its first header
/// (no status file names it: a run by hand): the filesystem may still read as intact
/// (check said "No problems found" and blkid "ext4"), but its head is overwritten and
/// its first part only in the copy at the device's end (found by a trial).
fn cut_shift_start(device: &Path) -> Option<Problem> {
    // luksify's own view is never read (a stopped daemon would hang the read).
    if let Some(num) = probe::block_dev_num(device) {
        if luksify_view_of(num, &mountinfo::read().unwrap_or_default()).is_some() {
            return None;
        }
    }
    let f = std::fs::File::open(device).ok()?;
    let (reduce, was) = luksify_walker::interrupted_shift_start(&f).ok()??;
    let dev_s = device.display();
    let r = format!("{}M", reduce >> 20);
    Some(Problem {
        code: "luks_in_progress",
        severity: Severity::Blocker,
        what: format!(
            "{dev_s} holds an interrupted `luksify encrypt --reduce-device-size {r}` start"
        ),
        why: format!(
            "its first {} MiB are only in the copy moved to its end and its head may be overwritten: whatever filesystem it seems to hold must not be mounted or written",
            reduce >> 21
        ),
        fix: format!(
            "run `luksify encrypt {dev_s} --key-file F --reduce-device-size {r}` again to continue it{}",
            if luksify_luks::io::Disk::size(&f).is_ok_and(|n| n != was) {
                format!(", after giving the device back its size then ({was} bytes)")
            } else {
                String::new()
            }
        ),
    })
}

/// Reads the LUKS magic and, for LUKS2, whether an online reencryption is in progress.
pub fn luks_state(device: &Path) -> Option<String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(device).ok()?;
    let mut hdr = [0u8; 4096];
    f.read_exact_at(&mut hdr, 0).ok()?;
    if &hdr[..6] != b"LUKS\xba\xbe" {
        return None;
    }
    let version = u16::from_be_bytes([hdr[6], hdr[7]]);
    if version == 1 {
        return Some("luks1".into());
    }
    let hdr_size = u64::from_be_bytes(hdr[8..16].try_into().ok()?);
    let json_len = hdr_size.saturating_sub(4096).min(4 << 20) as usize;
    let mut json = vec![0u8; json_len];
    f.read_exact_at(&mut json, 4096).ok()?;
    let text = String::from_utf8_lossy(&json);
    if text.contains("online-reencrypt") {
        Some("luks2-reencrypt-in-progress".into())
    } else {
        Some("luks2".into())
    }
}

/// The mapping name when `dev` is the loop device of a luksify userspace mapping: its
/// backing file lies on the FUSE filesystem the mapping daemon mounts (source
/// `luksify:NAME`).
///
/// Decided from the paths alone (the mount that holds the backing file, by the longest
/// mount point that is a prefix of it): a `stat` of the file, like any read of the view,
/// waits for the daemon, which may be stopped.
pub fn luksify_view_of(dev: DevNum, all: &[Mount]) -> Option<String> {
    // A partition of a view is the view's too (partitions a loop device kept from an
    // earlier use, or a partition table on the volume): its reads wait on the same
    // daemon. Its own directory has no `loop/`; its disk's, one up, has (a full test
    // run hung in `blkid` on `loop5p1` of a stopped daemon's view).
    let sys = std::fs::canonicalize(format!("/sys/dev/block/{dev}")).ok()?;
    let backing = std::fs::read_to_string(sys.join("loop/backing_file"))
        .ok()
        .or_else(|| std::fs::read_to_string(sys.parent()?.join("loop/backing_file")).ok())?;
    view_name_of_backing(Path::new(backing.trim_end()), all)
}

/// The name of luksify's userspace mapping whose FUSE mount holds `backing`, if any.
fn view_name_of_backing(backing: &Path, all: &[Mount]) -> Option<String> {
    all.iter()
        .filter(|m| backing.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
        .filter(|m| m.fs_type.starts_with("fuse"))
        .and_then(|m| m.source.strip_prefix("luksify:"))
        .map(str::to_string)
}

/// Runs every check on `target`. Writes nothing.
pub fn check(target: &Path, opts: CheckOptions) -> Result<Report, Problem> {
    let all = mountinfo::read().map_err(|e| Problem {
        code: "mountinfo",
        severity: Severity::Blocker,
        what: "/proc/self/mountinfo".into(),
        why: format!("cannot read it ({e})"),
        fix: "run on Linux with /proc mounted".into(),
    })?;
    let r = resolve(target, &all)?;
    check_resolved(target, &r, &all, opts)
}

pub fn check_resolved(
    target: &Path,
    r: &Resolved,
    all: &[Mount],
    opts: CheckOptions,
) -> Result<Report, Problem> {
    let dev_s = r.device.display().to_string();
    let mut problems = Vec::new();
    let mut push = |code, severity, what: String, why: String, fix: String| {
        problems.push(Problem {
            code,
            severity,
            what,
            why,
            fix,
        })
    };

    let size_bytes = probe::device_size(&r.device).unwrap_or(0);
    let mut nested: Vec<Mount> = Vec::new();
    for m in &r.mounts {
        for n in mountinfo::nested_below(all, &m.mount_point) {
            if n.dev != r.dev && !nested.iter().any(|x| x.id == n.id) {
                nested.push(n.clone());
            }
        }
    }
    // Processes are matched to a nested mount by its device only where that device is
    // mounted nowhere but inside the volume: a bind of a root-disk directory nested in
    // it made every process on the root disk a "holder" of the volume, for
    // --kill-holders to stop (a trial).
    let roots: Vec<&Path> = r.mounts.iter().map(|m| m.mount_point.as_path()).collect();
    let mut own_devs = vec![r.dev];
    for n in &nested {
        if !own_devs.contains(&n.dev) && mountinfo::only_below(all, n.dev, &roots) {
            own_devs.push(n.dev);
        }
    }
    let mut targets = Targets::default();
    targets.filesystems.extend(own_devs.iter().copied());
    targets.block_devices.insert(r.dev);
    let holders = holders::scan_settled(&targets, false);

    let is_os_volume = os_devices(all).contains(&r.dev);
    if is_os_volume {
        push(
            "os_volume",
            Severity::Blocker,
            format!("{dev_s} holds the operating system (/, /boot or /boot/efi)"),
            "data-volume encryption cannot unmount the running system".into(),
            "pick a data volume; `luksify enable --volume-type data` without --volume lists them"
                .into(),
        );
    }
    // Nested whole-filesystem mounts of block devices are unmounted (deepest first) and
    // mounted again with their options by `enable`; anything else (tmpfs would lose its
    // content, a bind of a subdirectory cannot be rebuilt from mountinfo) blocks.
    let restorable = |n: &Mount| MountView::from(n).source.is_some();
    let (movable, fixed): (Vec<&Mount>, Vec<&Mount>) = nested.iter().partition(|n| restorable(n));
    if !movable.is_empty() {
        let list: Vec<String> = movable
            .iter()
            .map(|n| n.mount_point.display().to_string())
            .collect();
        push(
            "nested_mounts",
            Severity::Warning,
            format!(
                "{} mounted below {}",
                abbreviate(&list, 5),
                r.mounts[0].mount_point.display()
            ),
            "they must come off before the volume can be unmounted".into(),
            "none needed: enable unmounts them deepest first and mounts them again with the same options after the volume is back".into(),
        );
    }
    if !fixed.is_empty() {
        let list: Vec<String> = fixed
            .iter()
            .map(|n| n.mount_point.display().to_string())
            .collect();
        push(
            "nested_mounts",
            Severity::Blocker,
            format!(
                "{} mounted below {}",
                abbreviate(&list, 5),
                r.mounts[0].mount_point.display()
            ),
            "the volume cannot be unmounted while other filesystems are mounted inside it".into(),
            format!("unmount them first (umount {})", list.join(" ")),
        );
    }
    // A mount stacked on the volume's own mount point: `umount` there takes it off
    // instead of the volume, and nothing would put it back (a trial's overlay and bind
    // were silently gone after enable).
    let stacked = mountinfo::stacked_on(all, r.dev);
    if !stacked.is_empty() {
        let list: Vec<String> = stacked
            .iter()
            .map(|m| format!("{} ({})", m.mount_point.display(), m.describe()))
            .collect();
        push(
            "stacked_mounts",
            Severity::Blocker,
            format!("{} mounted on top of {dev_s}", abbreviate(&list, 5)),
            "it hides the volume's files, and unmounting the volume would take it off instead; luksify cannot put it back".into(),
            format!(
                "unmount it first (umount {}, once per mount on top), run again, then mount it again",
                stacked[0].mount_point.display()
            ),
        );
    }
    if holders::own_cwd_on(&own_devs) {
        push(
            "own_cwd",
            Severity::Blocker,
            format!("luksify's own working directory is on {dev_s}"),
            "the volume cannot be unmounted while luksify itself runs from it".into(),
            "run luksify from a directory outside the volume (cd /)".into(),
        );
    }
    let own_stdio = holders::own_stdio_on(&own_devs);
    if !own_stdio.is_empty() {
        push(
            "own_output",
            Severity::Blocker,
            format!("luksify's own {} is a file on {dev_s}", own_stdio.join(" and ")),
            "the volume cannot be unmounted while luksify itself writes to it (no other process holds it, so --kill-holders cannot help)".into(),
            "redirect luksify's output to a file outside the volume".into(),
        );
    }
    if r.mounts.len() > 1 {
        let list: Vec<String> = r
            .mounts
            .iter()
            .map(|m| match m.root.as_str() {
                "/" => m.mount_point.display().to_string(),
                sub => format!("{} (bind of {sub})", m.mount_point.display()),
            })
            .collect();
        push(
            "several_mounts",
            Severity::Warning,
            format!("{dev_s} is mounted {} times: {}", list.len(), abbreviate(&list, 5)),
            "every mount must come off before the volume can be encrypted".into(),
            "none needed: enable unmounts them all and mounts the others again as binds of the first, with their options".into(),
        );
    }
    // A luksify run or mapping (or cryptsetup) with the device node open is working on
    // it: that is a wait, not a process to stop, and not an interrupted run to resume.
    let (tools, holders): (Vec<Holder>, Vec<Holder>) = holders.into_iter().partition(|h| {
        h.kind == holders::HoldKind::OpenDevice
            && ["luksify", "cryptsetup"].contains(&h.command.as_str())
    });
    // luksify's userspace mapping daemon: the volume is encrypted and open already,
    // which no waiting changes (it said "wait for that run to finish").
    // (Its command line, read by the holder scan, has NULs as spaces; a value runs to the
    // next flag.)
    let daemon_of = |h: &Holder| holders::mapping_daemon(&h.cmdline);
    if let Some((t, (name, dir))) = tools.iter().find_map(|t| daemon_of(t).map(|n| (t, n))) {
        // The mapping's own state directory: the one this check runs with may be another.
        let fix = format!("nothing to do; it is open (`luksify close {name}` removes the mapping)");
        push(
            "already_mapped",
            Severity::Blocker,
            format!(
                "{dev_s} is open as luksify's userspace mapping {name} (daemon pid {})",
                t.pid
            ),
            "it is already encrypted and mapped".into(),
            match dir {
                Some(d) => crate::status::in_state_dir(&fix, Path::new(&d)),
                None => fix,
            },
        );
    } else if let Some(t) = tools.first() {
        push(
            "busy_run",
            Severity::Blocker,
            format!("{dev_s} is in use by pid {} ({})", t.pid, t.command),
            "a luksify run or mapping, or cryptsetup, has the device open (from another state directory if `luksify status` does not show it)".into(),
            "wait for that run to finish, or close that mapping; do not kill it".into(),
        );
    }
    // luksify's userspace mapping of another volume with a file on this one (its image,
    // header or state directory): stopping it would pull that volume out from under its
    // mounted filesystem, so it is never stopped, not even by --kill-holders.
    let (daemons, holders): (Vec<Holder>, Vec<Holder>) =
        holders.into_iter().partition(|h| daemon_of(h).is_some());
    if let Some(h) = daemons.first() {
        let (name, dir) = daemon_of(h).unwrap_or_default();
        let fix = format!(
            "unmount that volume and `luksify close {name}`, or keep its image, header and state directory off {dev_s}"
        );
        push(
            "mapping_holds",
            Severity::Blocker,
            format!("{}: luksify's userspace mapping {name} of another volume", h.one_line()),
            "stopping it would take that volume away from under its mounted filesystem, so not even --kill-holders stops it".into(),
            match dir {
                Some(d) => crate::status::in_state_dir(&fix, Path::new(&d)),
                None => fix,
            },
        );
    }
    // luksify's own caller (the shell or agent running it) holding the volume cannot be
    // stopped for it (not even by --kill-holders): it has to let go itself.
    let lineage = holders::own_lineage();
    let (callers, holders): (Vec<Holder>, Vec<Holder>) =
        holders.into_iter().partition(|h| lineage.contains(&h.pid));
    if let Some(h) = callers.first() {
        push(
            "caller_holds",
            Severity::Blocker,
            format!(
                "{}, which runs this luksify (or reads its output)",
                h.one_line()
            ),
            "luksify will not stop its own caller, not even with --kill-holders".into(),
            "in that shell, close the file or leave the volume (cd /), and keep the command's output (| tee LOG) off the volume, then run again".into(),
        );
    }
    if !holders.is_empty() {
        let mut seen = Vec::new();
        let mut lines = Vec::new();
        for h in &holders {
            if !seen.contains(&h.pid) {
                seen.push(h.pid);
                lines.push(h.one_line());
            }
        }
        let pids: Vec<String> = seen.iter().map(|p| p.to_string()).collect();
        push(
            "holders",
            if opts.kill_holders {
                Severity::Warning
            } else {
                Severity::Blocker
            },
            format!(
                "{} process(es) hold {dev_s}{}: {}",
                seen.len(),
                // A holder may be on a filesystem mounted below it (its path says which).
                if nested.is_empty() {
                    ""
                } else {
                    " or a filesystem mounted below it"
                },
                abbreviate(&lines, 8)
            ),
            holders_why(&holders),
            if opts.kill_holders {
                "they will be stopped (SIGTERM, then SIGKILL) because --kill-holders was given"
                    .into()
            } else {
                format!("stop them (kill {}) or pass --kill-holders", pids.join(" "))
            },
        );
    }
    let fs_devs: &[DevNum] = &own_devs;
    let swaps = probe::swaps_on(r.dev, fs_devs);
    if !swaps.is_empty() {
        let list: Vec<String> = swaps.iter().map(|s| s.path.display().to_string()).collect();
        push(
            "swap",
            Severity::Blocker,
            format!("swap is active on {dev_s}: {}", list.join(", ")),
            "swap in use cannot be unmounted or rewritten".into(),
            format!(
                "swapoff {} (and its line in {}, if it has one)",
                list.join(" "),
                crate::tabs::etc_dir().join("fstab").display()
            ),
        );
    }
    // What holds the volume with no process of ours to name: each used to pass check
    // ("No problems found") and then fail enable with "target is busy (no process
    // found)" or "held exclusively ... wait for it to end", which never ends.
    let shared: Vec<String> = r
        .mounts
        .iter()
        .chain(&nested)
        .filter_map(|m| all.iter().find(|p| p.id == m.parent_id))
        .flat_map(|p| p.propagation.iter())
        .filter_map(|t| t.strip_prefix("shared:").map(str::to_string))
        .collect();
    for f in probe::foreign_namespace_mounts(fs_devs, &shared) {
        push(
            "other_namespace",
            Severity::Blocker,
            format!(
                "{dev_s} is mounted at {} in another mount namespace ({}, pid {} {})",
                f.mount_point.display(),
                f.namespace,
                f.pid,
                f.command
            ),
            "its filesystem stays alive there after it is unmounted here, so the device cannot be taken offline to be encrypted or decrypted in place".into(),
            format!(
                "unmount it in that namespace (nsenter -t {} -m umount {}), or stop the processes that share it (a container, an `unshare -m` shell)",
                f.pid,
                f.mount_point.display()
            ),
        );
    }
    for (lo, file) in probe::loops_backed_on(all, fs_devs) {
        push(
            "loop_backed",
            Severity::Blocker,
            format!(
                "loop device {} is backed by {} on {dev_s}",
                lo.display(),
                file.display()
            ),
            "it keeps the filesystem busy (no process holds it, so --kill-holders cannot help)"
                .into(),
            format!(
                "unmount what uses {0}, then detach it (losetup -d {0})",
                lo.display()
            ),
        );
    }
    // Other devices over the same bytes: the disk a partition is on, its partitions,
    // a loop device over the same image or over this device. A mount or an open of
    // one of them passed every check, and the run wrote under it (a trial).
    for o in probe::other_paths_in_use(r.dev, all, !opts.listing) {
        push(
            "other_path_in_use",
            Severity::Blocker,
            format!("{} ({}) {}", o.node.display(), o.relation, o.how),
            format!("it reaches the bytes of {dev_s}: encrypting them in place would rewrite what it uses"),
            o.fix,
        );
    }
    for (mp, layer) in probe::overlays_on(all, fs_devs) {
        push(
            "overlay",
            Severity::Blocker,
            format!(
                "the overlay mounted at {} has its layer {} on {dev_s}",
                mp.display(),
                layer.display()
            ),
            "it keeps the filesystem alive after the volume's own mount comes off".into(),
            format!("unmount the overlay first (umount {})", mp.display()),
        );
    }
    // Every write to a read-only block device fails (after the unmount, e2fsck would
    // call its errors the filesystem's).
    if std::fs::read_to_string(format!("/sys/dev/block/{}/ro", r.dev))
        .is_ok_and(|s| s.trim() == "1")
    {
        push(
            "read_only",
            Severity::Blocker,
            format!("{dev_s} is a read-only block device"),
            "it cannot be encrypted in place (a loop device attached with `losetup -r`, or `blockdev --setro`)".into(),
            "make it writable (`blockdev --setrw`, or attach the loop device again without -r)".into(),
        );
    }
    // A sparse file under it (a loop device's backing file) with more holes than its
    // filesystem has room for: a loop device can lose part of a write to a full
    // filesystem without an error (a trial's volume was called Encrypted over garbage).
    if let Some(short) = std::fs::File::open(&r.device)
        .ok()
        .and_then(|f| luksify_walker::space::short_of_room(&f))
    {
        let (what, fix) = if short.deleted {
            (
                format!(
                    "{}, the file under {dev_s}, was deleted: how much of its {} MiB is allocated cannot be read, and its filesystem has {} MiB free",
                    short.file.display(),
                    short.holes.div_ceil(1 << 20),
                    short.free.div_ceil(1 << 20)
                ),
                format!(
                    "make {} MiB more room on the filesystem that held {}, or copy the volume to a file or disk that has it",
                    short.missing().div_ceil(1 << 20),
                    short.file.display()
                ),
            )
        } else {
            (
                format!(
                    "{} MiB of {}, the file under {dev_s}, are holes (a sparse file), and its filesystem has {} MiB free",
                    short.holes.div_ceil(1 << 20),
                    short.file.display(),
                    short.free.div_ceil(1 << 20)
                ),
                format!(
                    "make {} MiB more room on the filesystem holding {}{}",
                    short.missing().div_ceil(1 << 20),
                    short.file.display(),
                    short
                        .fallocate()
                        .map(|f| format!("; `{f}` then reserves it without changing the data"))
                        .unwrap_or_default()
                ),
            )
        };
        push(
            "no_room_for_holes",
            Severity::Blocker,
            what,
            "encryption writes every block: a loop device's write that finds its filesystem full can lose part of its data without an error".into(),
            fix,
        );
    }
    let dm_uuid = probe::dm_uuid(r.dev);
    // luksify's own view is never read: each read waits on its daemon, and a stopped
    // daemon would hang the check (and the candidate listing of `enable`) for good.
    let view = luksify_view_of(r.dev, all);
    let filesystem = match view.as_ref() {
        Some(_) => Err(None),
        None => probe::detect_fs(&r.device).map_err(Some),
    };
    let filesystem = match filesystem {
        // A mounted filesystem's superblock free count is stale: the kernel's is reported.
        Ok(mut f) => {
            if let Some(free) = r
                .mounts
                .first()
                .and_then(|m| probe::statvfs_free(&m.mount_point))
            {
                f.free_bytes = Some(free);
            }
            f
        }
        Err(None) => FsInfo {
            fs_type: "unread".into(),
            fs_bytes: None,
            free_bytes: None,
            block_size: None,
            min_io: None,
            source: "not read: luksify's own open mapping".into(),
            external_log: false,
            needs_recovery: false,
            errors: false,
        },
        Err(Some(e)) => {
            push(
                "read_device",
                Severity::Blocker,
                dev_s.clone(),
                format!("cannot read its first blocks ({e})"),
                // SAFETY: geteuid has no preconditions and cannot fail.
                if unsafe { libc::geteuid() } == 0 {
                    "root was refused: check the device node's permissions and whether a container or security policy denies raw access to it".into()
                } else {
                    "run as root".into()
                },
            );
            FsInfo {
                fs_type: "unreadable".into(),
                fs_bytes: None,
                free_bytes: None,
                block_size: None,
                min_io: None,
                source: "none".into(),
                external_log: false,
                needs_recovery: false,
                errors: false,
            }
        }
    };
    let mut lvm = None;
    if filesystem.fs_type == "LVM2_member" {
        lvm = Some("pv".to_string());
        push(
            "lvm_pv",
            Severity::Blocker,
            format!("{dev_s} is an LVM physical volume (LVM2 label at sector 1)"),
            "encrypting a PV under a running volume group would pull the disks from under its logical volumes".into(),
            "encrypt each logical volume instead (luksify check /dev/VG/LV), which is supported".into(),
        );
    } else if dm_uuid.as_deref().is_some_and(|u| u.starts_with("LVM-")) {
        lvm = Some("lv".to_string());
    }
    // An md RAID member: encrypting it in place turns its superblock (or, at the end,
    // the room the array keeps it in) and its share of the array into ciphertext. A
    // trial's RAID1 leg (ext4 at the start, 1.0 metadata at the end) read as plain
    // ext4, "No problems found", and was encrypted.
    // (Never on luksify's own view: see `view`.)
    let md = view
        .is_none()
        .then(|| probe::md_superblock(&r.device, size_bytes))
        .flatten()
        .or_else(|| (filesystem.fs_type == "linux_raid_member").then_some(("?", 0)));
    if let Some((version, at)) = md {
        push(
            "md_member",
            Severity::Blocker,
            if version == "?" {
                format!("{dev_s} is an md RAID member (blkid: linux_raid_member)")
            } else {
                format!("{dev_s} is an md RAID member (metadata {version} superblock at byte {at})")
            },
            "encrypting one member in place would break the array: its superblock and its share of the array's data would turn into ciphertext".into(),
            "encrypt the assembled array (luksify check /dev/mdN) instead; if the device no longer belongs to an array, remove the stale superblock first (mdadm --zero-superblock)".into(),
        );
    }
    if dm_uuid.as_deref().is_some_and(|u| u.starts_with("CRYPT-")) {
        push(
            "already_mapped",
            Severity::Blocker,
            format!("{dev_s} is itself a dm-crypt mapping"),
            "it is already the decrypted view of an encrypted device".into(),
            "encrypt the underlying device only if it is not already LUKS".into(),
        );
    }
    if let Some(name) = &view {
        push(
            "already_mapped",
            Severity::Blocker,
            format!("{dev_s} is luksify's decrypted view {name} (userspace mapping)"),
            "it is already the open mapping of an encrypted device".into(),
            format!("nothing to do; it is open (`luksify close {name}` removes the mapping)"),
        );
    }
    let luks = if view.is_some() {
        None
    } else {
        luks_state(&r.device)
    };
    match luks.as_deref() {
        // Live, not interrupted: `busy_run` says so.
        Some("luks2-reencrypt-in-progress") if !tools.is_empty() => {}
        Some("luks2-reencrypt-in-progress") => push(
            "luks_in_progress",
            Severity::Blocker,
            format!("{dev_s} has an interrupted LUKS2 encryption"),
            "its header records an online reencryption that has not finished".into(),
            "run `luksify resume` to finish it (with --key-file F if `luksify status` does not list it)".into(),
        ),
        // Open already (the blocker above says as what): not "open it" beside it (a
        // trial read the two as contradicting each other).
        Some(v) if tools.iter().any(|t| holders::mapping_daemon(&t.cmdline).is_some()) => push(
            "already_luks",
            Severity::Blocker,
            format!("{dev_s} is already encrypted ({v})"),
            "a LUKS header is at its start".into(),
            "nothing to do; it is open already (a luksify mapping daemon holds it: `luksify status` names the mapping)".into(),
        ),
        Some(v) => push(
            "already_luks",
            Severity::Blocker,
            format!("{dev_s} is already encrypted ({v})"),
            "a LUKS header is at its start".into(),
            format!("nothing to do; open it with `luksify open {dev_s} NAME --key-file F`"),
        ),
        None => {}
    }
    let fs = filesystem.fs_type.as_str();
    // Its journal or log on another disk stays plaintext: with `data=journal` file
    // contents pass through it, and names and attributes always do (a trial found a
    // file's contents written after `enable` in clear on the journal device).
    if filesystem.external_log && view.is_none() {
        push(
            "external_log",
            Severity::Blocker,
            format!("{fs} on {dev_s} keeps its journal on another device"),
            if fs == "xfs" {
                "that device would stay plaintext, and the metadata the filesystem logs later (file names, attributes, sizes) would land there in clear".into()
            } else {
                "that device would stay plaintext, and what the filesystem journals later (file names, attributes; with data=journal, file contents) would land there in clear".into()
            },
            if fs == "xfs" {
                "xfs cannot take its log back inside: copy the data to an xfs made without `-l logdev=`, and encrypt that".into()
            } else {
                format!("move the journal inside the filesystem first: unmount it, `tune2fs -O ^has_journal {dev_s}` (add -f if the journal device is gone), `tune2fs -j {dev_s}`, and mount it without `journal_dev=`/`journal_path=`")
            },
        );
    }
    // An ext3/4 whose journal was not replayed (a crash, a `noload` mount): e2fsck -n
    // skips the replay and finds it clean, resize2fs -f then shrank the stale image, and
    // the replay after the walk put back the old superblock and blocks: files lost
    // (a trial). Refused; the kernel's next mount, or e2fsck, replays it.
    let noload = r.mounts.iter().find(|m| {
        m.super_options
            .split(',')
            .any(|o| o == "norecovery" || o == "noload")
    });
    if crate::enable::is_ext(fs) && view.is_none() && luks.is_none() {
        if let Some(m) = noload {
            push(
                "ext_journal_not_replayed",
                Severity::Blocker,
                format!(
                    "{fs} on {dev_s} is mounted at {} with norecovery (noload)",
                    m.mount_point.display()
                ),
                "its journal was not replayed, so what is on the device is not the filesystem it shows; shrinking and encrypting that loses what the journal holds".into(),
                format!(
                    "unmount it and mount it once without noload/norecovery (the kernel replays the journal): `umount {0}; mount {dev_s} {0}`, then run again",
                    m.mount_point.display()
                ),
            );
        } else if let Some((m, sb)) = r.mounts.iter().find_map(|m| {
            m.super_options
                .split(',')
                .find_map(|o| o.strip_prefix("sb="))
                .map(|sb| (m, sb))
        }) {
            // Mounted from a backup superblock: the primary one, which e2fsck and
            // resize2fs read, is not what the kernel shows (its counts are stale), so
            // `enable` unmounted the volume, found "errors" and mounted it back (trial V2).
            push(
                "ext_backup_superblock",
                Severity::Blocker,
                format!(
                    "{fs} on {dev_s} is mounted at {} from a backup superblock (sb={sb})",
                    m.mount_point.display()
                ),
                "its primary superblock, which the shrink and the header's checks read, is not the one in use (the mount updates only the backup); luksify does not repair a filesystem before encrypting it".into(),
                {
                    // mount's sb= counts 1 KiB units, e2fsck's -b filesystem blocks
                    // (trial V3: `-b 131072` of a 4 KiB-block ext4 failed to open).
                    let bs = u64::from(filesystem.block_size.unwrap_or(1024)).max(1024);
                    let blk = sb.parse::<u64>().map_or(sb.to_string(), |n| (n * 1024 / bs).to_string());
                    format!(
                        "unmount it, let e2fsck rewrite the primary from that backup (`e2fsck -f -y -b {blk} -B {bs} {dev_s}`), mount it without sb=, then run again"
                    )
                },
            );
        } else if filesystem.needs_recovery
            && r.mounts.is_empty()
            // Mounted elsewhere (another mount namespace): the flag is set while it is
            // mounted, and the "held" blocker below says what holds it.
            && !probe::in_use_per_sysfs(&r.device)
        {
            push(
                "ext_journal_not_replayed",
                Severity::Blocker,
                format!("{fs} on {dev_s} has a journal that was not replayed (needs_recovery: it was not unmounted cleanly)"),
                "what is on the device is not the filesystem yet; shrinking and encrypting it loses what the journal holds".into(),
                format!("mount it once and unmount it (the kernel replays the journal), or run `e2fsck {dev_s}` (it replays it), then run again"),
            );
        }
    }
    // Errors on record, or (unmounted, where e2fsck may read it) found by a read-only
    // e2fsck: `enable` refused them only after it had unmounted the volume, with exit 1,
    // where `check` had said "No problems found" (a trial).
    if filesystem.can_shrink() {
        let found = if filesystem.errors {
            Some(format!(
                "{} on {dev_s} has errors on record (its superblock's state)",
                filesystem.fs_type
            ))
        } else if r.mounts.is_empty()
            && !opts.listing
            // A journal not replayed is its own blocker, whose fix (one mount) also
            // clears what e2fsck -n sees in it (orphans it has not processed; trial V6).
            && !filesystem.needs_recovery
            && !probe::in_use_per_sysfs(&r.device)
        {
            crate::enable::ext_read_only_complaint(&r.device)
                .ok()
                .flatten()
                .map(|c| format!("{} on {dev_s} has errors: {c}", filesystem.fs_type))
        } else {
            None
        };
        if let Some(what) = found {
            push(
                "ext_errors",
                Severity::Blocker,
                what,
                "luksify does not repair a filesystem before encrypting it, and resize2fs refuses one with errors".into(),
                format!(
                    "make sure this is the plain volume you mean (not one a luksify `disable` left part decrypted: `luksify status` of each state directory), back it up, {}run `e2fsck -f {dev_s}` (it repairs), then run again",
                    if r.mounts.is_empty() { "" } else { "unmount it, " }
                ),
            );
        }
    }
    // A mounted btrfs: its mount shows an anonymous device number, so nothing above
    // sees it mounted (a trial's `check` said "Mounted: no", the listing "not mounted").
    // luksify does not unmount and remount it: it says so, and how.
    let canon = std::fs::canonicalize(&r.device).unwrap_or_else(|_| r.device.clone());
    if let Some(m) = all.iter().find(|m| {
        m.fs_type == "btrfs" && std::fs::canonicalize(&m.source).is_ok_and(|s| s == canon)
    }) {
        push(
            "btrfs_mounted",
            Severity::Blocker,
            format!("{dev_s} is mounted at {} (btrfs)", m.mount_point.display()),
            "luksify takes a btrfs only unmounted: its mounts show no device number luksify can follow to unmount and mount it again".into(),
            format!(
                "unmount it (`umount {}`), then `luksify enable --volume {dev_s} --key-file F --header-dir DIR`, and mount its mapping again",
                m.mount_point.display()
            ),
        );
    }
    // A partial last logical sector (a loop device with --sector-size 4096 over a file
    // that is not whole 4 KiB blocks): the walker refuses to open it, and `enable` found
    // that only once it had unmounted and shrunk the volume (a trial).
    let lbs = u64::from(probe::logical_block_size(&r.device));
    if view.is_none() && luks.is_none() && !size_bytes.is_multiple_of(lbs) {
        push(
            "partial_last_sector",
            Severity::Blocker,
            format!("{dev_s} is {size_bytes} bytes, not a whole number of its {lbs}-byte logical sectors"),
            "its partial last sector can be neither read nor written, so it cannot be encrypted in place".into(),
            format!("attach the loop device again with 512-byte sectors (`losetup --sector-size 512`), or give its file a size that is whole {lbs}-byte blocks"),
        );
    }
    // A filesystem that claims more than its device holds (a partition table damaged
    // or edited under it): what lies past the end is not on the device, and `enable`
    // went on (trial P3: it shrank such an ext4 to fit and encrypted it).
    if let Some(fs_bytes) = filesystem
        .fs_bytes
        .filter(|&n| view.is_none() && luks.is_none() && size_bytes > 0 && n > size_bytes)
    {
        push(
            "filesystem_larger_than_device",
            Severity::Blocker,
            format!(
                "{} on {dev_s} claims {fs_bytes} bytes, but {dev_s} has {size_bytes}",
                filesystem.fs_type
            ),
            "the filesystem's end lies past the device's (a partition table damaged or edited under it, or a device shrunk): what is there is not on the device, and shrinking or encrypting it would lose it".into(),
            "give the device its size back (restore the partition table, or grow the device) so that it holds the whole filesystem, check it (`e2fsck -f -n`, `xfs_repair -n`), then run again".into(),
        );
    }
    // Mounted only as binds of a subdirectory: mounted again, the mapping would show
    // the filesystem's root there (a trial's `subonly` bind came back as the root).
    if !r.mounts.is_empty() && r.mounts.iter().all(|m| m.root != "/") {
        let m = &r.mounts[0];
        push(
            "subdirectory_mount_only",
            Severity::Blocker,
            format!(
                "{dev_s} is mounted only as a bind of its directory {} (at {})",
                m.root,
                m.mount_point.display()
            ),
            "luksify mounts a volume again from its filesystem's root, and binds the other mounts from it; with no mount of the root, it would put the whole filesystem where the subdirectory was".into(),
            format!(
                "mount the filesystem's root somewhere too (`mkdir /mnt/root-of-it; mount {dev_s} /mnt/root-of-it`), then run again"
            ),
        );
    }
    let can_shrink = filesystem.can_shrink();
    let header_space_needed = if opts.detached_header || view.is_some() {
        0
    } else {
        HEADER_RESERVE_BYTES
    };
    let mut header_space_ok = true;
    if luks.is_none() && lvm.is_none() && md.is_none() && view.is_none() {
        match fs {
            "ext2" | "ext3" | "ext4" if !opts.detached_header => {
                let fs_bytes = filesystem.fs_bytes.unwrap_or(size_bytes);
                let free = filesystem.free_bytes.unwrap_or(0);
                let slack = size_bytes.saturating_sub(fs_bytes);
                let target = size_bytes.saturating_sub(HEADER_RESERVE_BYTES);
                // resize2fs's own estimate of how small it can go decides, and the free
                // space must hold what comes off the end plus room for resize2fs's
                // metadata moves. Both: on a mounted filesystem resize2fs -P reads the
                // on-disk bitmaps, which lag the kernel's count (statvfs, above) until
                // writeback, so right after large writes it alone passed a filesystem
                // that resize2fs then refused to shrink.
                let short = free < HEADER_RESERVE_BYTES.saturating_sub(slack) + fs_bytes / 50;
                // Not in the listing: resize2fs opens the device O_EXCL to see whether
                // it is mounted (e2fsprogs' ismounted probe), which fails another
                // run's resize2fs of it for that instant. `enable` asks it anyway.
                let min = filesystem
                    .block_size
                    .filter(|_| !opts.listing)
                    .and_then(|b| probe::ext_min_bytes(&r.device, b));
                let too_full = match min {
                    Some(min) => min > target || short,
                    None => short,
                };
                let why = if size_bytes <= HEADER_RESERVE_BYTES {
                    format!(
                        "the LUKS2 header in front needs {} MiB, more than the whole {} MiB device",
                        HEADER_RESERVE_BYTES >> 20,
                        size_bytes >> 20
                    )
                } else {
                    let estimate = match min {
                        Some(m) if m > target => format!(
                            "its own estimate of the smallest size is {} MiB",
                            m.div_ceil(1 << 20)
                        ),
                        // resize2fs -P reads the on-disk bitmaps, which lag the
                        // kernel's count after large writes.
                        _ => format!(
                            "it needs {} MiB free for that and for its own moves",
                            (HEADER_RESERVE_BYTES.saturating_sub(slack) + fs_bytes / 50)
                                .div_ceil(1 << 20)
                        ),
                    };
                    format!(
                        "the LUKS2 header needs {} MiB taken from the end by shrinking the filesystem to {} MiB, and resize2fs cannot shrink it that far ({estimate})",
                        HEADER_RESERVE_BYTES >> 20,
                        target >> 20,
                    )
                };
                if slack < HEADER_RESERVE_BYTES && too_full {
                    header_space_ok = false;
                    push(
                        "no_header_space",
                        Severity::Blocker,
                        // Its use beside its free space: "51 MiB free" beside "needs
                        // 32 MiB" read as a contradiction (a trial).
                        format!(
                            "{fs} on {dev_s} cannot give up {} MiB at its end ({} MiB used, {} MiB free)",
                            HEADER_RESERVE_BYTES >> 20,
                            fs_bytes.saturating_sub(free) >> 20,
                            free >> 20
                        ),
                        why,
                        if size_bytes < 2 * HEADER_RESERVE_BYTES {
                            // No freeing makes a device this small give up 32 MiB.
                            format!(
                                "keep the header in a file with --header-dir DIR: a {} MiB device is too small to give up {} MiB to it",
                                size_bytes >> 20,
                                HEADER_RESERVE_BYTES >> 20
                            )
                        } else if min.is_some_and(|m| m > target)
                            && fs_bytes.saturating_sub(free) < target / 2
                        {
                            // Less than half full, and still resize2fs will not go that
                            // small (bigalloc clusters, say): freeing more does not help
                            // (a trial was told to free 30 MiB of a 200 MiB bigalloc ext4
                            // holding 15 MiB).
                            "resize2fs will not shrink this filesystem that far however much is freed (bigalloc, or a layout it cannot move): keep the header in a file with --header-dir DIR".to_string()
                        } else {
                            let more = match min {
                                Some(m) if m > target => m - target,
                                _ => (HEADER_RESERVE_BYTES.saturating_sub(slack) + fs_bytes / 50)
                                    .saturating_sub(free),
                            };
                            format!(
                                "free at least {} MiB more, or keep the header in a file with --header-dir DIR",
                                more.div_ceil(1 << 20).max(1)
                            )
                        },
                    );
                }
            }
            "ext2" | "ext3" | "ext4" => {}
            "xfs" | "btrfs" if !opts.detached_header => {
                header_space_ok = false;
                push(
                    "needs_detached_header",
                    Severity::Blocker,
                    format!("{fs} on {dev_s} cannot shrink"),
                    format!("{fs} has no offline shrink, so there is no room for a header on the device"),
                    format!("keep the header in a file on another volume: `luksify enable --volume {dev_s} --key-file F --header-dir /root/luks-headers` (`luksify check --detached-header {dev_s}` checks that way)"),
                );
            }
            "xfs" | "btrfs" => {}
            "swap" if !opts.detached_header
                && filesystem.fs_bytes.unwrap_or(size_bytes)
                    > size_bytes.saturating_sub(HEADER_RESERVE_BYTES) =>
            {
                header_space_ok = false;
                push(
                    "no_header_space",
                    Severity::Blocker,
                    format!(
                        "the swap area on {dev_s} spans {} MiB of its {} MiB",
                        filesystem.fs_bytes.unwrap_or(size_bytes).div_ceil(1 << 20),
                        size_bytes >> 20
                    ),
                    format!(
                        "the LUKS2 header needs the last {} MiB free, and a swap area cannot shrink",
                        HEADER_RESERVE_BYTES >> 20
                    ),
                    format!(
                        "keep the header in a file with --header-dir DIR, or remake the swap area {} MiB smaller (mkswap {dev_s} SIZE_KIB); swap is usually better encrypted afresh at each boot (crypttab's `swap` option)",
                        HEADER_RESERVE_BYTES >> 20
                    ),
                );
            }
            "swap" => {}
            "unreadable" => {}
            "jbd" | "xfs_external_log" => push(
                "external_log_device",
                Severity::Blocker,
                format!("{dev_s} is the external {} of a filesystem on another device", if fs == "jbd" { "journal (jbd)" } else { "xfs log" }),
                "it belongs to that filesystem, which mounts it: it is not a volume of its own to encrypt".into(),
                if fs == "jbd" {
                    "encrypt the filesystem's own device instead, after moving its journal inside it (`luksify check` of that device says how)".into()
                } else {
                    "an xfs log cannot move inside its filesystem: copy the data to an xfs made without `-l logdev=` and encrypt that (`luksify check` of the filesystem's device says so)".into()
                },
            ),
            table if table.ends_with(probe::PARTITION_TABLE) => push(
                "partition_table",
                Severity::Blocker,
                format!("{dev_s} is a whole disk holding a {table}"),
                "encrypting a whole disk in place would turn the table and the start of every partition into ciphertext".into(),
                partition_fix(&r.device, all),
            ),
            "unknown" => push(
                "no_filesystem",
                Severity::Blocker,
                format!("no filesystem recognised on {dev_s}"),
                "luksify encrypts data volumes that carry a filesystem, to verify and remount it"
                    .into(),
                format!("check that this is the right device: it may hold data luksify cannot read, or be part ciphertext from a run interrupted in another state directory (`luksify check --state-dir OTHER_STATE_DIR {dev_s}` names it); make a filesystem only on a device known to be empty"),
            ),
            other => push(
                "unsupported_fs",
                if opts.detached_header {
                    Severity::Warning
                } else {
                    Severity::Blocker
                },
                format!("{other} on {dev_s} is not a tested filesystem"),
                "luksify only knows how to shrink ext2/3/4".into(),
                format!("keep the header in a file: `luksify enable --volume {dev_s} --key-file F --header-dir DIR` (detached header, no shrink; `luksify check --detached-header {dev_s}` checks that way)"),
            ),
        }
    }
    let selinux = probe::selinux_mode();
    if selinux == "enforcing" {
        push(
            "selinux",
            Severity::Warning,
            "SELinux is enforcing".into(),
            "the remounted filesystem keeps its labels, but a new device node may need a policy"
                .into(),
            "if the remount is denied, check `ausearch -m avc` and relabel with restorecon".into(),
        );
    }
    // What `enable` will need, found before anything goes offline: a missing `mount`,
    // no /dev/fuse or too few file descriptors were met only after the whole volume
    // was encrypted, the volume left unmounted (a trial).
    for p in missing_tools(fs, opts.detached_header)
        .into_iter()
        .chain(too_few_open_files())
    {
        push(p.code, p.severity, p.what, p.why, p.fix);
    }
    if crate::map::dm_available().is_err() {
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
        {
            push(
                "no_fuse",
                Severity::Blocker,
                format!("cannot open /dev/fuse ({e})"),
                "without device-mapper here, the encrypted volume is mapped through a FUSE view".into(),
                "load the module (`modprobe fuse`), or allow the device to this container or cgroup".into(),
            );
        }
    }
    let mem_available_bytes = probe::mem_available();
    if mem_available_bytes.is_some_and(|m| m < MIN_MEM_AVAILABLE) {
        push(
            "memory",
            Severity::Warning,
            format!(
                "only {} MiB of memory available",
                mem_available_bytes.unwrap_or(0) >> 20
            ),
            "the walker needs buffers and the kernel needs page cache to flush".into(),
            "stop memory-hungry services before encrypting".into(),
        );
    }
    // Unmounted here, yet opened exclusively by someone (the mounted filesystem it is
    // the external log of, a RAID or device-mapper member, a mount in another namespace,
    // another run): enable found it only after it had begun, exit 4, and check named
    // nothing (a trial). Last, so that a more precise blocker above explains it.
    if r.mounts.is_empty()
        && view.is_none()
        && !problems.iter().any(|p| p.severity == Severity::Blocker)
        && (probe::in_use_per_sysfs(&r.device)
            || (!opts.listing && probe::held_exclusively(&r.device)))
    {
        let name = r
            .device
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        problems.push(Problem {
            code: "held_exclusively",
            severity: Severity::Blocker,
            what: format!("{dev_s} is not mounted here, but something holds it exclusively"),
            why: "an exclusive holder (a mounted filesystem's external journal or log, a RAID or device-mapper member, a mount in another mount namespace, another luksify or cryptsetup run) would see its device rewritten under it".into(),
            fix: format!("find and stop the holder (`ls /sys/class/block/{name}/holders`, `grep -e {dev_s} -e {} /proc/*/mountinfo`; a mount namespace no process is in is kept by a bind of its nsfs file: `findmnt -t nsfs`, then umount it), then check again", r.dev),
        });
    }
    // crypttab names luksify's mapping of this device by a LUKS UUID no device carries
    // now: a volume luksify encrypted whose header went elsewhere, a `disable` from
    // another state directory stopped mid-walk (part plaintext, its header in that
    // directory) most likely. Its plaintext head reads as a filesystem with errors,
    // and e2fsck's repair over it would wreck it (a trial was told to run it).
    if !filesystem.fs_type.starts_with("crypto_LUKS") {
        let kname = r
            .device
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for (name, dev) in crate::tabs::crypttab_luksify_lines(&kname) {
            let Some(uuid) = dev.strip_prefix("UUID=") else {
                continue;
            };
            if probe::devices_with_uuid(uuid).is_empty() {
                problems.push(Problem {
                    code: "luksify_crypttab_line",
                    severity: Severity::Blocker,
                    what: format!(
                        "crypttab names luksify's mapping {name} of {dev_s} by LUKS UUID {uuid}, which no device carries now"
                    ),
                    why: format!(
                        "{dev_s} may be a volume luksify encrypted, or a `disable` run from another state directory left part decrypted (its header in that directory's headers/): encrypting or repairing it would destroy it"
                    ),
                    fix: format!(
                        "find the state directory whose `luksify status --state-dir DIR` names {dev_s} and run `luksify resume --state-dir DIR`; if the line is stale (the volume was decrypted by hand), remove it from crypttab"
                    ),
                });
            }
        }
    }
    // What another device's user does to these bytes is not this filesystem's state:
    // an ext journal another path's mount is writing, no filesystem where a partition
    // is mounted. Their fixes (e2fsck, mkfs) would wreck what that user has mounted.
    if problems
        .iter()
        .any(|p| matches!(p.code, "other_path_in_use" | "luksify_crypttab_line"))
    {
        problems.retain(|p| {
            !matches!(
                p.code,
                "ext_journal_not_replayed" | "no_filesystem" | "ext_errors"
            )
        });
    }
    Ok(Report {
        target: target.to_path_buf(),
        device: r.device.clone(),
        dev: r.dev.to_string(),
        size_bytes,
        mounts: r.mounts.iter().map(MountView::from).collect(),
        nested_mounts: nested.iter().map(MountView::from).collect(),
        holders,
        swaps,
        lvm,
        dm_uuid,
        selinux,
        mem_available_bytes,
        filesystem,
        can_shrink,
        header_space_needed,
        header_space_ok,
        luks,
        is_os_volume,
        problems,
    })
}

/// A blocker for each tool [`needed_tools`] names that is not on PATH.
pub fn missing_tools(fs: &str, detached: bool) -> Vec<Problem> {
    needed_tools(fs, detached)
        .into_iter()
        .filter(|(tool, _, _)| !probe::on_path(tool))
        .map(|(tool, package, why)| Problem {
            code: "missing_tool",
            severity: Severity::Blocker,
            what: format!("`{tool}` is not on PATH"),
            why: format!("luksify runs it {why}"),
            fix: format!(
                "install {package} (`apt-get install {package}`) or run with a PATH that has it"
            ),
        })
        .collect()
}

/// A blocker when the open-file limit is below what luksify and its daemon need.
pub fn too_few_open_files() -> Option<Problem> {
    let limit = probe::open_files_limit().filter(|l| *l < probe::MIN_OPEN_FILES)?;
    Some(Problem {
        code: "open_files",
        severity: Severity::Blocker,
        what: format!("the open-file limit is {limit}"),
        why: format!(
            "luksify and its mapping daemon need at least {}",
            probe::MIN_OPEN_FILES
        ),
        fix: "raise it (`ulimit -n 1024`) and run again".into(),
    })
}

/// The tools `enable` and `disable` run for a volume holding `fs`: (tool, Debian
/// package, what for).
fn needed_tools(fs: &str, detached: bool) -> Vec<(&'static str, &'static str, &'static str)> {
    let mut t = vec![
        ("mount", "mount", "to mount the volume again"),
        ("umount", "mount", "to take the volume offline"),
        ("blkid", "util-linux", "to find the volume's filesystem"),
    ];
    if crate::map::dm_available().is_err() {
        t.push((
            "losetup",
            "mount",
            "to map the volume (a FUSE view on a loop device)",
        ));
    }
    if fs.starts_with("ext") {
        t.push((
            "e2fsck",
            "e2fsprogs",
            "to check the filesystem before it is encrypted or grown back",
        ));
        if !detached {
            t.push((
                "resize2fs",
                "e2fsprogs",
                "to shrink the filesystem for the header (enable) and grow it back (disable)",
            ));
        }
    }
    t
}

/// `a, b, c and 7 more` (the JSON report lists them all).
fn abbreviate(items: &[String], max: usize) -> String {
    if items.len() <= max {
        return items.join(", ");
    }
    format!(
        "{} and {} more (--json lists all)",
        items[..max].join(", "),
        items.len() - max
    )
}

/// Human-readable report: facts, then one line per problem.
pub fn render_text(r: &Report) -> String {
    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("{k:<14}: {v}\n"));
    line("Target", r.target.display().to_string());
    line(
        "Device",
        format!(
            "{} ({}), {} MiB",
            r.device.display(),
            r.dev,
            r.size_bytes >> 20
        ),
    );
    line(
        "Filesystem",
        format!(
            "{} ({}){}",
            r.filesystem.fs_type,
            r.filesystem.source,
            if r.can_shrink {
                ", can shrink"
            } else {
                ", cannot shrink"
            }
        ),
    );
    line(
        "Mounted",
        if r.mounts.is_empty() {
            "no".into()
        } else {
            r.mounts
                .iter()
                .map(|m| format!("{} ({})", m.mount_point.display(), m.options))
                .collect::<Vec<_>>()
                .join(", ")
        },
    );
    if !r.nested_mounts.is_empty() {
        line(
            "Nested mounts",
            r.nested_mounts
                .iter()
                .map(|m| m.mount_point.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    let mut shown = Vec::new();
    for h in &r.holders {
        if !shown.contains(&h.pid) {
            shown.push(h.pid);
            line("Holder", h.one_line());
        }
    }
    line(
        "Swap",
        if r.swaps.is_empty() {
            "none".into()
        } else {
            r.swaps
                .iter()
                .map(|s| format!("{} ({})", s.path.display(), s.kind))
                .collect::<Vec<_>>()
                .join(", ")
        },
    );
    line("LVM", r.lvm.clone().unwrap_or_else(|| "no".into()));
    line("LUKS", r.luks.clone().unwrap_or_else(|| "no".into()));
    line("SELinux", r.selinux.clone());
    line(
        "MemAvailable",
        r.mem_available_bytes
            .map(|m| format!("{} MiB", m >> 20))
            .unwrap_or_else(|| "unknown".into()),
    );
    line(
        "Header space",
        if r.luks.is_some() {
            "none needed (already LUKS)".to_string()
        } else if r.problems.iter().any(|p| p.code == "already_mapped") {
            "none needed (already an open mapping)".to_string()
        } else if r.problems.iter().any(|p| {
            p.severity == Severity::Blocker
                && [
                    "no_filesystem",
                    "unsupported_fs",
                    "partition_table",
                    "lvm_pv",
                    "md_member",
                    "external_log_device",
                ]
                .contains(&p.code)
        }) {
            // Not "ok" beside a blocker that says the device cannot be used as it is.
            format!(
                "{} MiB needed, not determined (see the blocker below)",
                r.header_space_needed >> 20
            )
        } else {
            format!(
                "{} MiB needed, {}",
                r.header_space_needed >> 20,
                if r.header_space_ok {
                    "ok"
                } else {
                    "not available"
                }
            )
        },
    );
    if r.problems.is_empty() {
        s.push_str("No problems found.\n");
    }
    for p in &r.problems {
        s.push_str(&p.one_line());
        s.push('\n');
    }
    s
}
