//! `open`/`close`: make the decrypted view of a LUKS2 volume available as a block
//! device, through kernel dm-crypt where device-mapper exists, else through the
//! userspace path (FUSE file + loop device, served by a daemon forked from `open`).
//! Each open mapping is recorded in `STATE_DIR/maps/NAME.json` (no secrets).

use crate::error::{run_tool, Failure, Result};
use crate::exit;
use crate::mountinfo::{self, DevNum};
use crate::probe;
use crate::status::write_atomic;
use crate::userspace::{self, VolumeFs, VOLUME_FILE};
use luksify_luks::luks2::{DataSegment, Luks2Header};
use luksify_luks::VolumeKey;
use luksify_walker::view::DecryptedView;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufRead, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// Kernel dm-crypt, /dev/mapper/NAME.
    Kernel,
    /// FUSE + loop device served by a luksify daemon.
    Userspace,
}

/// What `open` created, saved so that `close` (another process) can undo it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapRecord {
    pub name: String,
    pub device: PathBuf,
    pub header: Option<PathBuf>,
    pub backend: Backend,
    /// The block device to mount (/dev/mapper/NAME, a symlink to the loop device
    /// on the userspace path).
    pub mapped: PathBuf,
    pub loop_dev: Option<PathBuf>,
    pub fuse_dir: Option<PathBuf>,
    pub daemon_pid: Option<u32>,
}

/// How to open.
#[derive(Debug, Clone)]
pub struct OpenRequest<'a> {
    pub device: &'a Path,
    pub name: &'a str,
    /// Detached header file; None = header on the device.
    pub header: Option<&'a Path>,
    pub force_userspace: bool,
    pub state_dir: &'a Path,
    /// The keyslot the passphrase must open (cryptsetup's `--key-slot`), tried even at
    /// priority `ignore`; None: every keyslot, by priority.
    pub key_slot: Option<u32>,
}

fn maps_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("maps")
}

fn record_path(state_dir: &Path, name: &str) -> PathBuf {
    maps_dir(state_dir).join(format!("{name}.json"))
}

pub fn load_record(state_dir: &Path, name: &str) -> Option<MapRecord> {
    let b = std::fs::read(record_path(state_dir, name)).ok()?;
    serde_json::from_slice(&b).ok()
}

fn save_record(state_dir: &Path, r: &MapRecord) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(r).map_err(std::io::Error::other)?;
    write_atomic(&record_path(state_dir, &r.name), &bytes)
}

/// Every recorded mapping.
pub fn list_records(state_dir: &Path) -> Vec<MapRecord> {
    let mut v: Vec<MapRecord> = std::fs::read_dir(maps_dir(state_dir))
        .map(|d| {
            d.flatten()
                .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// Mapping names become file and device names: keep them tame.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name != "control"
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Failure::new(
            exit::USAGE,
            format!("mapping name {name:?} is not usable: use letters, digits and - _ . + (at most 100, not `control`)"),
        ))
    }
}

/// Whether the kernel has device-mapper: Ok, or why not (one line).
pub fn dm_available() -> std::result::Result<(), String> {
    crate::dm::available()
}

/// What the status file in `state_dir` says of an unfinished run on `device` whose
/// header is in a file there (a `disable` of a volume with its header in front moves it
/// out first): `open` said "cannot read a LUKS2 header ... not a LUKS device" of such a
/// device, not the `resume` that finishes it (trial N2).
fn run_on(state_dir: &Path, device: &Path) -> Option<(u8, String)> {
    use crate::status::VolumeState;
    let dev = probe::block_dev_num(device)?;
    let status = crate::status::load(state_dir).ok()?;
    let v = status.volumes.iter().find(|v| {
        probe::block_dev_num(&v.device) == Some(dev)
            && matches!(
                v.state,
                VolumeState::EncryptionInProgress | VolumeState::DecryptionInProgress
            )
    })?;
    let h = v.header.as_deref()?;
    let what = if v.state == VolumeState::DecryptionInProgress {
        "decryption (a `luksify disable`)"
    } else {
        "encryption (a `luksify enable`)"
    };
    if status.run_process_running() {
        return Some((
            exit::BUSY,
            format!(
                "{}: its {what} is running now; open it once that has finished (`luksify status` shows its progress; nothing was mapped)",
                device.display()
            ),
        ));
    }
    Some((
        exit::INTERRUPTED,
        format!(
            "{}: its {what} stopped at {}% and has not finished; its header is in {}; `luksify resume` finishes it (nothing was mapped)",
            device.display(),
            v.percent.floor() as u64,
            h.display()
        ),
    ))
}

/// Reads the header and unlocks the volume key with `passphrase`.
pub fn unlock(
    device: &Path,
    header: Option<&Path>,
    passphrase: &[u8],
    key_slot: Option<u32>,
) -> Result<(Luks2Header, DataSegment, VolumeKey)> {
    let hpath = header.unwrap_or(device);
    let hfile = File::open(hpath).map_err(|e| {
        Failure::failed(format!(
            "cannot open {} to read the LUKS header ({e}); run as root and check the path",
            hpath.display()
        ))
    })?;
    let (hdr, report) = Luks2Header::read(&hfile).map_err(|e| match e {
        // Said plainly, not nested in the generic question below (a trial).
        luksify_luks::Error::UnsupportedVersion(1) => Failure::failed(format!(
            "{} holds a LUKS1 header: luksify maps LUKS2 volumes only; convert it first (`cryptsetup convert --type luks2 {}`, after a header backup) or open it with cryptsetup; nothing was mapped",
            hpath.display(),
            hpath.display()
        )),
        e => Failure::failed(format!(
            "{}: cannot read a LUKS2 header ({e}); is this a luksify/cryptsetup LUKS2 volume (give --header FILE for a detached header)?",
            hpath.display()
        ))
    })?;
    // As the header commands say it (open used the good copy silently; a trial).
    if let Some(why) = report.damage() {
        errln!(
            "luksify: {}: warning: LUKS2 header: {why}. `cryptsetup repair` rewrites both copies",
            hpath.display()
        );
    }
    if hdr
        .metadata
        .config
        .mandatory_requirements()
        .iter()
        .any(|r| r.starts_with("online-reencrypt"))
    {
        // Running now (its walker holds cryptsetup's reencryption lock), or interrupted.
        let running = matches!(
            luksify_walker::lock::ReencryptLock::acquire(
                Path::new(luksify_walker::lock::CRYPTSETUP_LOCK_DIR),
                &hdr.uuid
            ),
            Err(luksify_walker::Error::Busy(_))
        );
        if running {
            return Err(Failure::new(
                exit::BUSY,
                format!(
                    "{}: its encryption or decryption is running now (a luksify run or `cryptsetup reencrypt`); open it once that has finished",
                    device.display()
                ),
            ));
        }
        // The device form of resume: the status-file form ("`luksify resume`") said
        // "Nothing to resume." of a run started by `luksify encrypt` (a trial).
        let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        return Err(Failure::new(
            exit::INTERRUPTED,
            format!(
                "{}: its encryption or decryption was interrupted and has not finished; finish it first with `luksify resume {} --key-file F{}` (or `cryptsetup reencrypt --resume-only`)",
                device.display(),
                abs(device).display(),
                header
                    .map(|h| format!(" --header {}", abs(h).display()))
                    .unwrap_or_default()
            ),
        ));
    }
    mappable(device, header.is_some(), &hdr)?;
    // "check --key-file" only where the passphrase is what failed (a trial's unknown
    // requirement was blamed on the key file).
    let (vk, _slot) = hdr
        .unlock(&hfile, passphrase, key_slot)
        .map_err(|e| match e {
            luksify_luks::Error::WrongPassphrase => Failure::new(
                crate::exit::WRONG_PASSPHRASE,
                format!(
                "{}: cannot unlock ({e}); check --key-file (its whole content is the passphrase)",
                device.display()
            ),
            ),
            e => Failure::failed(format!("{}: cannot unlock: {e}", device.display())),
        })?;
    let seg = hdr.data_segment().map_err(|e| {
        Failure::failed(format!(
            "{}: no usable data segment ({e})",
            device.display()
        ))
    })?;
    Ok((hdr, seg, vk))
}

/// Refuses a header whose data segment a mapping must not expose: one that lies over
/// the header on the device or runs past the device's end (writes through the mapping
/// destroyed the header, or grew the image file), or a header describing a run in
/// progress without the requirement that marks one (an edited or damaged header,
/// which cryptsetup refuses; `open` mapped half-encrypted data). Found by a trial's
/// hostile headers; `decrypt` refused the same ones.
fn mappable(device: &Path, detached: bool, hdr: &Luks2Header) -> Result<()> {
    use luksify_luks::luks2::json::{Keyslot, SegmentSize};
    let refuse = |why: String| {
        Err(Failure::failed(format!(
            "{}: {why}; nothing was mapped: check that this is the right device and header (`luksify dump`), or restore the header from a backup (`cryptsetup luksHeaderRestore`)",
            device.display()
        )))
    };
    let live = hdr.live_segment_count();
    let reencrypt = hdr
        .metadata
        .keyslots
        .values()
        .any(|k| matches!(k, Keyslot::Reencrypt(_)));
    // (No data segment at all is said by the caller: "no usable data segment".)
    if live > 1 || reencrypt {
        return refuse(format!(
            "its header describes an encryption or decryption in progress ({live} data segment{}{}) but lacks the online-reencrypt requirement that marks one, so it was edited or damaged (cryptsetup refuses it)",
            if live == 1 { "" } else { "s" },
            if reencrypt { ", a reencryption keyslot" } else { "" }
        ));
    }
    let Ok(seg) = hdr.data_segment() else {
        return Ok(()); // said by the caller, after the unlock
    };
    // A detached header's data starting where the device carries a LUKS header of its
    // own: another LUKS volume (ciphertext is no valid LUKS header). After the loop
    // devices were renumbered, crypttab's line for a detached header mapped a trial's
    // other volume with this one's key (cryptsetup maps it blindly too).
    // Data at an offset is refused as long as it starts inside that other header's
    // area (a trial's crypttab line with an offset mapped over another volume's
    // keyslots): its data offset, else a LUKS1's or unreadable one's 16 MiB at most.
    if detached {
        let own = File::open(device)
            .ok()
            .and_then(|f| luksify_luks::probe(&f).ok().flatten().map(|v| (f, v)));
        let theirs = own.map(|(f, v)| {
            let other = Luks2Header::read(&f).ok().map(|(h, _)| h);
            let end = other
                .as_ref()
                .map(|h| {
                    h.data_segment()
                        .map_or(2 * h.hdr_size + h.metadata.config.keyslots_size, |d| {
                            d.offset
                        })
                })
                .unwrap_or(16 << 20);
            (v, other.map(|h| h.uuid), end)
        });
        if let Some((version, uuid, _)) = theirs.filter(|&(_, _, end)| seg.offset < end) {
            let uuid = uuid.map(|u| format!(" (UUID {u})")).unwrap_or_default();
            let version = match version {
                luksify_luks::Version::Luks1 => "LUKS1",
                luksify_luks::Version::Luks2 => "LUKS2",
            };
            return refuse(format!(
                "it starts with a {version} header of its own{uuid}, over which the data of the detached header (UUID {}) would lie: it is another LUKS volume (a device renamed since? `blkid` names each one's UUID)",
                hdr.uuid
            ));
        }
    }
    let size = probe::device_size(device).map_err(|e| {
        Failure::failed(format!("{}: cannot read its size ({e})", device.display()))
    })?;
    let header_end = hdr.areas_end();
    if !detached && seg.offset < header_end {
        return refuse(format!(
            "its data segment starts at byte {}, inside the LUKS header that ends at byte {header_end} on the device: a mapping would expose the header to writes",
            seg.offset
        ));
    }
    let end = match seg.size {
        SegmentSize::Bytes(n) => seg.offset.checked_add(n),
        SegmentSize::Dynamic => Some(seg.offset.max(size)),
    };
    if end.is_none_or(|e| e > size) || seg.offset >= size {
        return refuse(format!(
            "its data segment (from byte {}, {}) runs past the end of the device ({size} bytes): writes through a mapping would land outside it",
            seg.offset,
            match seg.size {
                SegmentSize::Bytes(n) => format!("{n} bytes"),
                SegmentSize::Dynamic => "to the end".into(),
            }
        ));
    }
    Ok(())
}

/// Whether the mapping a record describes still exists (its daemon, if any, runs and
/// its device node is there; on the userspace path, its loop device is still the one
/// over its FUSE view).
pub fn is_live(r: &MapRecord) -> bool {
    r.daemon_pid.is_none_or(|pid| is_daemon_of(pid, &r.name))
        && r.mapped.exists()
        && (r.backend == Backend::Kernel || own_loop(r).is_some())
}

/// Whether `pid` is a running mapping daemon serving `name` (a pid, too, is reused).
fn is_daemon_of(pid: u32, name: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    crate::holders::pid_running(pid)
        && args.contains(&SERVE_SUBCOMMAND.as_bytes())
        && args
            .windows(2)
            .any(|w| w[0] == b"--name" && w[1] == name.as_bytes())
}

/// The loop device of a userspace mapping while it is still the one the record made:
/// attached to the record's FUSE view. A loop device number is handed out again as
/// soon as it is freed (after a reboot, a detach by hand), and what is attached to it
/// then belongs to someone else: never detach it, unmount it or stop its users.
pub fn own_loop(r: &MapRecord) -> Option<&Path> {
    let loop_dev = r.loop_dev.as_deref()?;
    let view = std::path::absolute(r.fuse_dir.as_deref()?.join(VOLUME_FILE)).ok()?;
    (probe::block_dev_num(loop_dev).is_some() && loop_backing(loop_dev)? == view)
        .then_some(loop_dev)
}

/// Opens a mapping. Returns the record of what was created.
pub fn open(req: &OpenRequest, passphrase: &[u8]) -> Result<MapRecord> {
    validate_name(req.name)?;
    if let Some(r) = load_record(req.state_dir, req.name) {
        if is_live(&r) {
            // Busy (exit 4), as the name held by anything else below.
            return Err(Failure::new(
                exit::BUSY,
                format!(
                    "mapping {} is already open ({} on {}); close it first with `luksify close {}`",
                    req.name,
                    r.mapped.display(),
                    r.device.display(),
                    req.name
                ),
            ));
        }
        // Its loop device gone but its daemon still serving the view, holding the
        // device open (a `disable` killed while it closed the mapping): that close is
        // finished first. Forgetting the record left the daemon holding the device, and
        // every later open (and `resume`) failed "in use" (a trial).
        if r.backend == Backend::Userspace && r.daemon_pid.is_some_and(|p| is_daemon_of(p, &r.name))
        {
            close_userspace(&r)?;
        }
        // A stale record (its daemon is gone, after a crash or a reboot): forget it, and
        // its /dev/mapper link if that still names the record's old loop device.
        if r.loop_dev.is_some() && std::fs::read_link(&r.mapped).ok() == r.loop_dev {
            let _ = std::fs::remove_file(&r.mapped);
        }
        let _ = std::fs::remove_file(record_path(req.state_dir, req.name));
    }
    let mapped = PathBuf::from("/dev/mapper").join(req.name);
    // A link left by a userspace mapping that is gone (its daemon killed, a reboot with a
    // persistent /dev/mapper): it names a loop device with nothing attached. Nothing can
    // be using it; anything else there is refused below.
    if let Ok(target) = std::fs::read_link(&mapped) {
        if target.to_string_lossy().starts_with("/dev/loop") && loop_backing(&target).is_none() {
            let _ = std::fs::remove_file(&mapped);
        }
    }
    if std::fs::symlink_metadata(&mapped).is_ok() {
        // A userspace view names its state directory (its loop device's backing file is
        // STATE/mnt/NAME/volume): the close that works is that directory's (the hint
        // named this one's, which answered "no mapping named ..."; a trial).
        let owner = std::fs::read_link(&mapped)
            .ok()
            .and_then(|t| loop_backing(&t))
            .and_then(|b| {
                let dir = b.parent()?;
                let mnt = dir.parent()?;
                (dir.file_name()? == req.name && mnt.file_name()? == "mnt")
                    .then(|| mnt.parent().map(Path::to_path_buf))
                    .flatten()
            });
        let close = match owner {
            Some(o) if std::path::absolute(req.state_dir).ok().as_deref() != Some(&o) => {
                format!("`luksify close --state-dir {} {}`", o.display(), req.name)
            }
            Some(_) => format!("`luksify close {}`", req.name),
            None => format!(
                "it is no luksify mapping of this state directory: close it with what made it (`cryptsetup close {}`, or `luksify close --state-dir DIR {}` from the state directory that opened it)",
                req.name, req.name
            ),
        };
        return Err(Failure::new(
            exit::BUSY,
            format!(
                "{} already exists; pick another name or close it ({close})",
                mapped.display(),
            ),
        ));
    }
    ensure_device_free(req)?;
    let (hdr, seg, vk) = unlock(req.device, req.header, passphrase, req.key_slot).map_err(|e| {
        match req
            .header
            .is_none()
            .then(|| run_on(req.state_dir, req.device))
            .flatten()
        {
            Some((code, said)) => Failure::new(code, said),
            None => e,
        }
    })?;
    let use_userspace = req.force_userspace || dm_available().is_err();
    if !use_userspace {
        crate::dm::create_crypt(req.name, req.device, &hdr.uuid, &seg, &vk)?;
        let rec = MapRecord {
            name: req.name.to_string(),
            device: req.device.to_path_buf(),
            header: req.header.map(Path::to_path_buf),
            backend: Backend::Kernel,
            mapped,
            loop_dev: None,
            fuse_dir: None,
            daemon_pid: None,
        };
        save_record(req.state_dir, &rec)
            .map_err(|e| {
                Failure::failed(format!(
                    "cannot save the mapping record in {} ({e}); fix: free space there or make it writable, then run again",
                    maps_dir(req.state_dir).display()
                ))
            })?;
        return Ok(rec);
    }
    open_userspace(req, &seg, vk, mapped)
}

/// A block device that something else has open exclusively (a mapping of it, a walk,
/// a mount) cannot be mapped: busy (exit 4), naming who has it, before the passphrase
/// is even tried.
fn ensure_device_free(req: &OpenRequest) -> Result<()> {
    let Some(num) =
        probe::block_dev_num(req.device).filter(|_| probe::held_exclusively(req.device))
    else {
        return Ok(());
    };
    let ours = list_records(req.state_dir)
        .into_iter()
        .find(|r| is_live(r) && probe::block_dev_num(&r.device) == Some(num));
    let who = match ours {
        Some(r) => format!(
            "it is already mapped as {} (`luksify close {}` first)",
            r.mapped.display(),
            r.name
        ),
        None => {
            let mut t = crate::holders::Targets::default();
            t.block_devices.insert(num);
            let held: Vec<String> = crate::holders::scan(&t, false)
                .iter()
                .map(|h| h.one_line())
                .collect();
            if held.is_empty() {
                "it is mounted, or held by the kernel (a dm-crypt or LVM mapping)".to_string()
            } else {
                held.join("; ")
            }
        }
    };
    Err(Failure::new(
        exit::BUSY,
        format!(
            "{} is in use: {who}; close or unmount what has it, or wait for that run to end",
            req.device.display()
        ),
    ))
}

/// Opens the data device for the mapping daemon, with the lock a walker run takes on
/// the same bytes (the image file's, or a loop device's backing file's, as qemu takes
/// it): while the mapping lives, `luksify encrypt`/`decrypt`/`resume` and a second
/// mapping of the same bytes are refused instead of writing beside it. The lock lives
/// as long as the returned pair.
fn open_data_device(device: &Path) -> Result<(File, luksify_walker::lock::DataLock)> {
    let is_blk = probe::block_dev_num(device).is_some();
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(true);
    // O_EXCL on a block device fails while it is mounted or mapped elsewhere.
    o.custom_flags(libc::O_CLOEXEC | if is_blk { libc::O_EXCL } else { 0 });
    // Held by another process (in use, locked by a run or a mapping): busy, exit 4, as
    // `format` says of the same lock (`open` said 1; a trial).
    let cannot = |why: String, e: &std::io::Error| {
        let busy = e.raw_os_error() == Some(libc::EBUSY)
            || matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::ResourceBusy
            );
        Failure::new(
            if busy { exit::BUSY } else { exit::FAILED },
            format!(
                "cannot open {} for the mapping: {why}; unmount or close what uses it",
                device.display()
            ),
        )
    };
    let f = o.open(device).map_err(|e| {
        let why = if e.raw_os_error() == Some(libc::EBUSY) {
            "it is in use (mounted, mapped or opened exclusively)".to_string()
        } else {
            e.to_string()
        };
        cannot(why, &e)
    })?;
    let lock = if is_blk {
        let size = luksify_luks::io::Disk::size(&f).map_err(|e| cannot(e.to_string(), &e))?;
        luksify_walker::lock::DataLock::block_device(&f, size)
    } else {
        luksify_walker::lock::DataLock::image_file(&f)
    }
    .map_err(|e| cannot(e.to_string(), &e))?;
    Ok((f, lock))
}

fn open_userspace(
    req: &OpenRequest,
    _seg: &DataSegment,
    vk: VolumeKey,
    mapped: PathBuf,
) -> Result<MapRecord> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    // A fresh process, not a fork: luksify may already run threads (the walker, rayon),
    // and a forked child would inherit their locks held forever.
    // This very binary, through `/proc/self/exe`: luksify upgraded (or its file removed)
    // while a run walked left its path naming another binary or none, and the daemon
    // failed to start after the walk ("No such file or directory"), the volume left
    // unmapped. (Found when a rebuild replaced the binary under a running test.) Its
    // name in `ps` stays the binary's.
    let name = std::env::current_exe().map_or_else(
        |_| "luksify".to_string(),
        |p| {
            let p = p.display().to_string();
            p.strip_suffix(" (deleted)").unwrap_or(&p).to_string()
        },
    );
    let device = std::fs::canonicalize(req.device).unwrap_or(req.device.to_path_buf());
    let state_dir = std::fs::canonicalize(req.state_dir).unwrap_or(req.state_dir.to_path_buf());
    clear_dead_view(&state_dir.join("mnt").join(req.name))?;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0(name)
        .arg(SERVE_SUBCOMMAND)
        .arg("--device")
        .arg(&device)
        .arg("--name")
        .arg(req.name)
        .arg("--state-dir")
        .arg(&state_dir);
    if let Some(h) = req.header {
        cmd.arg("--header")
            .arg(std::fs::canonicalize(h).unwrap_or(h.to_path_buf()));
    }
    // In `/`: the caller's working directory may be on another volume, which the daemon
    // would then hold for as long as the mapping lasts (every path above is absolute).
    cmd.current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe; it detaches the daemon from the caller's
    // terminal and process group so that Ctrl-C there does not stop the mapping.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        })
    };
    let mut child = cmd
        .spawn()
        .map_err(|e| Failure::failed(format!("cannot start the mapping daemon ({e})")))?;
    {
        // The volume key goes through a pipe, never argv or the environment.
        let mut stdin = child.stdin.take().expect("piped stdin");
        let _ = stdin.write_all(vk.as_bytes());
    }
    drop(vk);
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = std::io::BufReader::new(out).read_line(&mut line);
    }
    if let Some(rest) = line.strip_prefix("OK ") {
        let rec = load_record(req.state_dir, req.name).unwrap_or(MapRecord {
            name: req.name.to_string(),
            device,
            header: req.header.map(Path::to_path_buf),
            backend: Backend::Userspace,
            mapped,
            loop_dev: Some(PathBuf::from(rest.trim())),
            fuse_dir: None,
            daemon_pid: Some(child.id()),
        });
        // The daemon outlives us; its exit status is collected by init.
        std::mem::forget(child);
        Ok(rec)
    } else {
        let _ = child.wait();
        if let Some(msg) = line.strip_prefix("BUSY ") {
            return Err(Failure::new(exit::BUSY, msg.trim()));
        }
        let msg = line
            .strip_prefix("ERR ")
            .unwrap_or("the mapping daemon exited before it was ready")
            .trim();
        Err(Failure::failed(msg.to_string()))
    }
}

/// Hidden CLI subcommand that runs [`serve`].
pub const SERVE_SUBCOMMAND: &str = "__serve-mapping";

/// The daemon (`luksify __serve-mapping`): reads the volume key from stdin, mounts
/// FUSE, attaches the loop device, prints `OK <loop>` (or `ERR <why>`, `BUSY <why>`) on stdout,
/// then serves until `close` unmounts the FUSE filesystem. Returns the exit code.
pub fn serve(device: &Path, name: &str, header: Option<&Path>, state_dir: &Path) -> i32 {
    // Started through /proc/self/exe, its command name would be "exe" in every holder
    // list (`pid 123 (exe) has the device open`; trial N2): it is luksify's.
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"luksify".as_ptr()) };
    let mut stdout = std::io::stdout();
    let fail = |out: &mut std::io::Stdout, msg: String| {
        let _ = writeln!(out, "ERR {}", msg.replace('\n', " "));
        let _ = out.flush();
        1
    };
    // Read into a buffer sized once (a growing Vec would leave unwiped copies of the
    // key's first bytes in freed memory); volume keys are at most 64 bytes.
    let mut key = zeroize::Zeroizing::new(vec![0u8; 129]);
    let mut len = 0;
    let mut stdin = std::io::stdin();
    loop {
        match std::io::Read::read(&mut stdin, &mut key[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return fail(
                    &mut stdout,
                    format!("cannot read the volume key from the parent ({e})"),
                )
            }
        }
        if len == key.len() {
            return fail(
                &mut stdout,
                "the volume key from the parent is too long".into(),
            );
        }
    }
    let vk = VolumeKey::from_slice(&key[..len]);
    drop(key);
    let hpath = header.unwrap_or(device);
    let seg = match File::open(hpath)
        .map_err(|e| e.to_string())
        .and_then(|f| Luks2Header::read(&f).map_err(|e| e.to_string()))
        .and_then(|(h, _)| h.data_segment().map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            return fail(
                &mut stdout,
                format!("{}: cannot read the LUKS2 header ({e})", hpath.display()),
            )
        }
    };
    let (dev, _data_lock) = match open_data_device(device) {
        Ok(d) => d,
        // Held by another process: said as busy (`BUSY <why>`), exit 4 in the starter.
        Err(e) if e.code == exit::BUSY => {
            let _ = writeln!(stdout, "BUSY {}", e.message.replace('\n', " "));
            let _ = stdout.flush();
            return 1;
        }
        Err(e) => return fail(&mut stdout, e.message),
    };
    let dev_size = match luksify_luks::io::Disk::size(&dev) {
        Ok(s) => s,
        Err(e) => {
            return fail(
                &mut stdout,
                format!("cannot size {} ({e})", device.display()),
            )
        }
    };
    let cipher = match seg.cipher(&vk) {
        Ok(c) => c,
        Err(e) => {
            return fail(
                &mut stdout,
                format!("{}: unsupported cipher ({e})", device.display()),
            )
        }
    };
    drop(vk);
    let view = match DecryptedView::new(
        dev,
        seg.offset,
        Some(seg.len_on(dev_size)),
        seg.iv_tweak,
        cipher,
    ) {
        Ok(v) => v,
        Err(e) => {
            return fail(
                &mut stdout,
                format!("{}: bad data segment ({e})", device.display()),
            )
        }
    };
    // Absolute, as the kernel names a loop device's backing file: `close` compares them.
    let fuse_dir = std::path::absolute(state_dir.join("mnt").join(name))
        .unwrap_or_else(|_| state_dir.join("mnt").join(name));
    if let Err(e) = crate::status::create_dirs(&fuse_dir, 0o755) {
        return fail(
            &mut stdout,
            format!("cannot create {} ({e})", fuse_dir.display()),
        );
    }
    // SAFETY: ignoring terminal signals is always allowed.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let sector = view.sector_size();
    let session = match fuser::Session::new(
        VolumeFs::new(view),
        &fuse_dir,
        &userspace::fuse_config(name),
    ) {
        Ok(s) => s,
        Err(e) => {
            return fail(
                &mut stdout,
                format!(
                    "cannot mount FUSE at {} ({e}); is /dev/fuse present (modprobe fuse)?",
                    fuse_dir.display()
                ),
            )
        }
    };
    let bg = match session.spawn() {
        Ok(b) => b,
        Err(e) => return fail(&mut stdout, format!("cannot start the FUSE session ({e})")),
    };
    let file = fuse_dir.join(VOLUME_FILE);
    let mut cmd = crate::tool("losetup");
    cmd.args(["-f", "--show"]);
    // dm-crypt's mapping has the larger of the segment's sector and the device's own
    // logical block size (it stacks the device's limits): a filesystem made on the view
    // must mount through dm-crypt too (the view was 512 over a 4096-byte device).
    let lbs = sector.max(crate::probe::logical_block_size(device).into());
    if lbs > 512 {
        cmd.args(["--sector-size", &lbs.to_string()]);
    }
    cmd.arg(&file);
    let loop_dev = match run_tool(&mut cmd, "attach a loop device to the decrypted view") {
        Ok(out) => PathBuf::from(out.trim()),
        Err(e) => {
            let _ = unmount_fuse(&fuse_dir);
            let _ = bg.join();
            return fail(&mut stdout, e.message);
        }
    };
    let mut rec = MapRecord {
        name: name.to_string(),
        device: device.to_path_buf(),
        header: header.map(Path::to_path_buf),
        backend: Backend::Userspace,
        mapped: PathBuf::from("/dev/mapper").join(name),
        loop_dev: Some(loop_dev.clone()),
        fuse_dir: Some(fuse_dir.clone()),
        daemon_pid: Some(std::process::id()),
    };
    let _ = std::fs::create_dir_all("/dev/mapper");
    let linked = std::os::unix::fs::symlink(&loop_dev, &rec.mapped).is_ok();
    if !linked {
        rec.mapped = loop_dev.clone();
    }
    if let Err(e) = save_record(state_dir, &rec) {
        let _ = run_tool(crate::tool("losetup").arg("-d").arg(&loop_dev), "detach");
        let _ = unmount_fuse(&fuse_dir);
        let _ = bg.join();
        return fail(
            &mut stdout,
            format!(
                "cannot save the mapping record in {} ({e}); fix: free space there or make it writable, then run again",
                maps_dir(state_dir).display()
            ),
        );
    }
    let _ = writeln!(stdout, "OK {}", loop_dev.display());
    let _ = stdout.flush();
    redirect_stdio_to_null();
    // Serve until `close` unmounts the FUSE filesystem.
    let _ = bg.join();
    if linked && std::fs::read_link(&rec.mapped).ok().as_deref() == Some(loop_dev.as_path()) {
        let _ = std::fs::remove_file(&rec.mapped);
    }
    if load_record(state_dir, name).is_some_and(|r| r.daemon_pid == rec.daemon_pid) {
        let _ = std::fs::remove_file(record_path(state_dir, name));
    }
    0
}

fn redirect_stdio_to_null() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors; `null` stays valid for the call.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

fn unmount_fuse(dir: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Closes a mapping: refuses while it is mounted or held, then detaches the loop
/// device, unmounts FUSE and waits for the daemon to exit (or removes the dm device).
pub fn close(state_dir: &Path, name: &str) -> Result<()> {
    validate_name(name)?;
    let rec = load_record(state_dir, name).ok_or_else(|| {
        Failure::failed(format!(
            "no mapping named {name} was opened by luksify (no {}); see `luksify status --json`",
            record_path(state_dir, name).display()
        ))
    })?;
    let blk = match rec.backend {
        Backend::Userspace => own_loop(&rec).map(Path::to_path_buf).unwrap_or_default(),
        Backend::Kernel => rec.mapped.clone(),
    };
    if let Some(dev) = probe::block_dev_num(&blk) {
        ensure_unused(name, &blk, dev)?;
    }
    if rec.backend == Backend::Userspace {
        ensure_view_unused(name, &rec)?;
    }
    match rec.backend {
        Backend::Kernel => crate::dm::remove(name)?,
        Backend::Userspace => close_userspace(&rec)?,
    }
    let _ = std::fs::remove_file(record_path(state_dir, name));
    Ok(())
}

/// How long `close` keeps looking before it calls a device in use.
const HOLDER_GRACE: Duration = Duration::from_secs(2);

fn ensure_unused(name: &str, blk: &Path, dev: DevNum) -> Result<()> {
    let mounts = mountinfo::read().unwrap_or_default();
    let on = mountinfo::mounts_of(&mounts, dev);
    if !on.is_empty() {
        // Every mount of it (bind mounts too), last mounted first.
        let points: Vec<String> = on
            .iter()
            .rev()
            .map(|m| m.mount_point.display().to_string())
            .collect();
        // Exit 4, as every refusal because another holds the volume (it was 1).
        return Err(Failure::new(
            exit::BUSY,
            format!(
                "mapping {name} ({}) is mounted at {}; unmount it first (umount {}) (nothing was closed)",
                blk.display(),
                points.join(" and "),
                points.join(" ")
            ),
        ));
    }
    // Mounted in another mount namespace (a container, an `unshare -m` shell): `close`
    // lazily detached the view under that live mount and then called the daemon that
    // kept serving it dead (a trial).
    if let Some(f) = probe::foreign_namespace_mounts(&[dev], &[]).first() {
        return Err(mounted_elsewhere(
            &format!("mapping {name} ({}) is mounted", blk.display()),
            f,
        ));
    }
    // A loop device over the mapping's own (no process holds it): `close` failed half
    // way, the view's unmount busy (trial V10).
    if let Some(l) = loops_over(blk, None).first() {
        return Err(Failure::new(
            exit::BUSY,
            format!(
                "mapping {name} ({}) is attached to loop device {}; losetup -d {} first (nothing was closed)",
                blk.display(),
                l.display(),
                l.display()
            ),
        ));
    }
    let mut t = crate::holders::Targets::default();
    t.block_devices.insert(dev);
    let holders = lasting_holders(&t, None);
    if !holders.is_empty() {
        return Err(Failure::new(
            exit::BUSY,
            format!(
                "mapping {name} ({}) is in use: {}; stop those processes first (nothing was closed)",
                blk.display(),
                holders.join("; ")
            ),
        ));
    }
    Ok(())
}

/// The loop devices attached to `file` (a view, a device), but `except`, sorted.
fn loops_over(file: &Path, except: Option<&Path>) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(|n| Path::new("/dev").join(n)))
        .filter(|d| {
            d.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("loop"))
                && Some(d.as_path()) != except
                && loop_backing(d).as_deref() == Some(file)
        })
        .collect();
    v.sort();
    v
}

/// `close`'s refusal of `what` ("mapping NAME (DEV) is mounted") because of mount `f` in
/// another mount namespace, with the command that unmounts it there.
fn mounted_elsewhere(what: &str, f: &probe::ForeignMount) -> Failure {
    let at = f.mount_point.display();
    Failure::new(
        exit::BUSY,
        format!(
            "{what} at {at} in another mount namespace ({}, pid {} {}); unmount it there first (nsenter -t {} -m umount {at}) (nothing was closed)",
            f.namespace, f.pid, f.command, f.pid
        ),
    )
}

/// What holds `t` (but `except`, a pid), one line each. Something may hold a device for
/// an instant (udev's blkid after a change event, another tool listing loop devices):
/// like `dmsetup remove --retry`, look again for up to HOLDER_GRACE before calling it
/// in use.
fn lasting_holders(t: &crate::holders::Targets, except: Option<u32>) -> Vec<String> {
    let scan = || {
        let mut h = crate::holders::scan(t, false);
        h.retain(|h| Some(h.pid) != except);
        h
    };
    let deadline = Instant::now() + HOLDER_GRACE;
    let mut holders = scan();
    while !holders.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        holders = scan();
    }
    holders.iter().map(|h| h.one_line()).collect()
}

/// Refuses `close` of a userspace mapping whose view (the FUSE `volume` file its loop
/// device is attached to) is also attached to another loop device, or open in a
/// process: `close` detached its own loop device, then could not unmount the view and
/// left /dev/mapper/NAME dangling, exit 1 (trial R3 mounted a second loop device of it).
fn ensure_view_unused(name: &str, rec: &MapRecord) -> Result<()> {
    let Some(dir) = rec.fuse_dir.as_deref() else {
        return Ok(());
    };
    let Ok(view) = std::path::absolute(dir.join(VOLUME_FILE)) else {
        return Ok(());
    };
    let mounts = mountinfo::read().unwrap_or_default();
    if let Some(l) = loops_over(&view, own_loop(rec)).first() {
        let points: Vec<String> = probe::block_dev_num(l)
            .map(|d| mountinfo::mounts_of(&mounts, d))
            .unwrap_or_default()
            .iter()
            .rev()
            .map(|m| m.mount_point.display().to_string())
            .collect();
        let (at, undo) = if points.is_empty() {
            (String::new(), String::new())
        } else {
            (
                format!(", mounted at {}", points.join(" and ")),
                format!("umount {}; ", points.join(" ")),
            )
        };
        return Err(Failure::new(
            exit::BUSY,
            format!(
                "mapping {name}'s view {} is also attached to {}{at}; {undo}losetup -d {} first (nothing was closed)",
                view.display(),
                l.display(),
                l.display()
            ),
        ));
    }
    let dir = std::path::absolute(dir).unwrap_or_default();
    let Some(fuse) = mountinfo::mount_at(&mounts, &dir) else {
        return Ok(());
    };
    // A bind mount of the view (the file, or the FUSE directory elsewhere), here or in
    // another mount namespace: the unmount of the view left the daemon serving it, "did
    // not exit", and /dev/mapper/NAME dangling (trials R4, V9). A namespace's copy of the
    // FUSE mount itself (the directory, at its own path) goes with ours.
    let bound = |m: &mountinfo::Mount| m.dev == fuse.dev && (m.root != "/" || m.mount_point != dir);
    if let Some(b) = mounts.iter().rev().find(|m| bound(m)) {
        return Err(Failure::new(
            exit::BUSY,
            format!(
                "mapping {name}'s view {} is bind-mounted at {}; umount {} first (nothing was closed)",
                view.display(),
                b.mount_point.display(),
                b.mount_point.display()
            ),
        ));
    }
    if let Some(f) = probe::foreign_namespace_mounts_where(bound, &[]).first() {
        return Err(mounted_elsewhere(
            &format!("mapping {name}'s view {} is bind-mounted", view.display()),
            f,
        ));
    }
    let mut t = crate::holders::Targets::default();
    t.filesystems.insert(fuse.dev);
    let holders = lasting_holders(&t, rec.daemon_pid);
    if !holders.is_empty() {
        return Err(Failure::new(
            exit::BUSY,
            format!(
                "mapping {name}'s view {} is in use: {}; stop those processes first (nothing was closed)",
                view.display(),
                holders.join("; ")
            ),
        ));
    }
    Ok(())
}

fn close_userspace(rec: &MapRecord) -> Result<()> {
    if let Some(loop_dev) = own_loop(rec) {
        run_tool(
            crate::tool("losetup").arg("-d").arg(loop_dev),
            "detach the loop device",
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while own_loop(rec).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if let Some(dir) = &rec.fuse_dir {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match unmount_fuse(dir) {
                Ok(()) => break,
                // Not mounted any more, or not even there.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => {
                    return Err(Failure::failed(format!(
                        "cannot unmount the userspace view {} ({e}); something still holds it (`luksify check {}`)",
                        dir.display(),
                        dir.display()
                    )))
                }
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    if let Some(pid) = rec.daemon_pid {
        let deadline = Instant::now() + Duration::from_secs(10);
        while is_daemon_of(pid, &rec.name) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if is_daemon_of(pid, &rec.name) {
            return Err(Failure::failed(format!(
                "the mapping daemon (pid {pid}) of {} did not exit after its view was unmounted",
                rec.name
            )));
        }
    }
    if std::fs::read_link(&rec.mapped).ok() == rec.loop_dev {
        let _ = std::fs::remove_file(&rec.mapped);
    }
    Ok(())
}

/// Clears what a mapping daemon killed before its record was written leaves at its
/// FUSE directory `fuse_dir`: a dead FUSE mount ("Transport endpoint is not connected")
/// and a loop device over its `volume` file, served by nothing. They stood in the way of
/// every later open of that name ("cannot create ...: File exists"), and `close` knew of
/// no such mapping (a trial's soak: `resume` failed until both were cleared by hand). A
/// loop device of it that is mounted is left alone and named.
fn clear_dead_view(fuse_dir: &Path) -> Result<()> {
    let fuse_dir = std::path::absolute(fuse_dir).unwrap_or_else(|_| fuse_dir.to_path_buf());
    let dead =
        std::fs::metadata(&fuse_dir).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN));
    if !dead {
        return Ok(());
    }
    let mounts = crate::mountinfo::read().unwrap_or_default();
    let loops: Vec<PathBuf> = std::fs::read_dir("/sys/block")
        .map(|d| {
            d.flatten()
                .map(|e| PathBuf::from("/dev").join(e.file_name()))
                .filter(|l| loop_backing(l).is_some_and(|b| b.starts_with(&fuse_dir)))
                .collect()
        })
        .unwrap_or_default();
    for l in &loops {
        if let Some(m) =
            crate::probe::block_dev_num(l).and_then(|n| mounts.iter().find(|m| m.dev == n))
        {
            return Err(Failure::failed(format!(
                "{} is the loop device of a userspace view whose daemon is gone, and it is mounted at {}: `umount {}`, then run the command again",
                l.display(),
                m.mount_point.display(),
                m.mount_point.display()
            )));
        }
        let _ = crate::tool("losetup").arg("-d").arg(l).output();
    }
    let unmounted = crate::tool("umount").arg(&fuse_dir).output();
    if !unmounted.is_ok_and(|o| o.status.success()) {
        let _ = crate::tool("umount").arg("-l").arg(&fuse_dir).output();
    }
    Ok(())
}

/// Backing file of a loop device, from sysfs; None when detached.
pub fn loop_backing(loop_dev: &Path) -> Option<PathBuf> {
    let name = loop_dev.file_name()?.to_str()?;
    let s = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(s.trim()))
}
