//! The status file: one JSON document, replaced atomically (temp file, fsync, rename,
//! fsync of the directory) on every change and every few seconds during work.
//! Values and messages follow the cloud disk-encryption agent's vocabulary so that
//! existing tooling can read them. It also remembers the volumes luksify manages,
//! which is how `resume` finds interrupted work after a reboot. Never holds a secret.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const STATUS_FILE: &str = "status.json";
/// How often progress is written while a volume is being walked.
pub const PERIODIC_WRITE: Duration = Duration::from_secs(1);

/// Per-volume and aggregate state, spelled as the agent spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum VolumeState {
    #[default]
    NotEncrypted,
    NotMounted,
    EncryptionInProgress,
    DecryptionInProgress,
    VMRestartPending,
    Encrypted,
}

impl std::fmt::Display for VolumeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            VolumeState::NotEncrypted => "NotEncrypted",
            VolumeState::NotMounted => "NotMounted",
            VolumeState::EncryptionInProgress => "EncryptionInProgress",
            VolumeState::DecryptionInProgress => "DecryptionInProgress",
            VolumeState::VMRestartPending => "VMRestartPending",
            VolumeState::Encrypted => "Encrypted",
        };
        f.write_str(s)
    }
}

/// One data volume luksify manages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct VolumeStatus {
    /// The underlying block device (`/dev/sdc`).
    pub device: PathBuf,
    /// Mapping name (`/dev/mapper/NAME` or the userspace path's loop device).
    pub mapper: String,
    /// Path that the decrypted view is available at once open.
    #[serde(default)]
    pub mapped_device: Option<PathBuf>,
    pub mount_point: Option<PathBuf>,
    #[serde(default)]
    pub mount_options: Option<String>,
    #[serde(default)]
    pub fs_type: Option<String>,
    /// The filesystem's size in bytes when `enable` found it: what it is grown back to
    /// after a shrink for the header, and never beyond (a filesystem smaller than its
    /// device stays that size; the bytes after it are not made free space). `None` in a
    /// status file from before it was recorded: grown over the whole device then.
    #[serde(default)]
    pub fs_bytes: Option<u64>,
    /// The filesystem's UUID when `enable` found it, and the LUKS UUID its run gives
    /// the volume: what `resume` knows the volume by when the kernel's name for it has
    /// moved (a reboot that attaches disks in another order, a loop device's number
    /// reused). `None` in a status file from before they were recorded.
    #[serde(default)]
    pub fs_uuid: Option<String>,
    #[serde(default)]
    pub luks_uuid: Option<String>,
    /// The shrink of its filesystem for the header in front has begun and not been seen
    /// through: a power cut inside resize2fs leaves the filesystem half resized, and
    /// `resume` then repairs it with e2fsck (it refuses to repair any other).
    #[serde(default)]
    pub shrinking: bool,
    /// The filesystem's label when `enable` found one: `disable --volume LABEL=...`
    /// names the volume by it (the label is out of blkid's sight once encrypted).
    #[serde(default)]
    pub fs_label: Option<String>,
    /// Detached header file, when the header is not on the device.
    #[serde(default)]
    pub header: Option<PathBuf>,
    /// Key file path (the path only, never its content), needed by `resume` at boot.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    pub state: VolumeState,
    pub percent: f64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Bytes per second over the current run.
    pub rate_bytes_per_s: Option<f64>,
    pub eta_seconds: Option<u64>,
    /// True when the current run continues one interrupted by a crash or reboot.
    #[serde(default)]
    pub resumed: bool,
    /// The current run began in another boot than the run before it: a resumed walk
    /// was stopped by a reboot (or a crash that took one), and its messages say "after
    /// reboot" only then.
    #[serde(default)]
    pub after_reboot: bool,
    /// Last error, one line.
    #[serde(default)]
    pub error: Option<String>,
    /// Filesystems mounted below `mount_point` that `enable` took off to unmount the
    /// volume and mounts again (outermost first) once the volume is back.
    #[serde(default)]
    pub nested_mounts: Vec<NestedMount>,
    /// Other mounts of the volume (a second mount, a bind of a subdirectory), mounted
    /// again as binds of `mount_point` once it is back.
    #[serde(default)]
    pub extra_mounts: Vec<ExtraMount>,
    /// fstab entries that name the device (path, UUID=, LABEL=...), mounted or not: each
    /// is pointed at the mapping, and back on `disable`.
    #[serde(default)]
    pub fstab_mount_points: Vec<PathBuf>,
    /// Part of the latest run (`enable`, `resume` or `disable`): the progress message
    /// counts and reports these only.
    #[serde(default)]
    pub in_run: bool,
    /// What the run does with the volume outside its walk ("checking and shrinking the
    /// filesystem", "deriving the key", "mapping and mounting"), said by the message in
    /// place of a percentage that does not move meanwhile ("Encrypting data volume 1/1:
    /// 0%" stood through e2fsck, resize2fs and the key derivation; trial A2). Only while
    /// the volume is in progress.
    /// (Always written, `null` when none: the keys of every write are the same, which a
    /// strict validator of an agent's needs.)
    #[serde(default)]
    pub phase: Option<String>,
    /// A decryption's walk is over (the device is all plaintext): what is left is the
    /// remount, the tables and removing its header file. Recorded before that file
    /// goes, so that a run killed after it (K3: the header gone, the status not yet
    /// written) is not taken for one stopped mid-walk that needs it.
    #[serde(default)]
    pub walk_done: bool,
    /// The detached header file of an encryption was created and reserved before its
    /// walk began: missing later, it is on a filesystem not mounted or was removed, and
    /// is never taken for a run that had not started.
    #[serde(default)]
    pub header_reserved: bool,
    /// The key derivation `enable` was asked for, so that a `resume` that starts the
    /// volume's walk (again, or for the first time) uses it too. No secret: kind and costs.
    #[serde(default)]
    pub kdf: Option<luksify_luks::kdf::KdfRequest>,
}

/// A mount nested below a volume's mount point, as needed to mount it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NestedMount {
    pub source: PathBuf,
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub options: String,
}

/// Another mount of a volume: `root` (inside the filesystem) bound at `mount_point`
/// with the per-mount `options`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ExtraMount {
    pub mount_point: PathBuf,
    pub root: String,
    pub options: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Operation {
    #[default]
    None,
    EnableEncryption,
    DisableEncryption,
    Resume,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Status {
    pub version: u32,
    pub updated_unix: u64,
    pub operation: Operation,
    /// Pid of the luksify process doing the work, when one is.
    pub pid: Option<u32>,
    /// That process's identity (boot id and start time, `holders::process_identity`):
    /// a pid reused after a reboot or a wrap-around is not taken for the run. Always in
    /// the JSON (null when no process works), so its keys stay the same.
    #[serde(default)]
    pub pid_start: Option<String>,
    /// The boot id of the latest run, kept once it ended: a run begun in another boot
    /// follows a reboot (`VolumeStatus::after_reboot`).
    #[serde(default)]
    pub run_boot: Option<String>,
    pub os_volume_encrypted: VolumeState,
    pub data_volumes_encrypted: VolumeState,
    pub progress_message: String,
    pub volumes: Vec<VolumeStatus>,
    /// The last `enable` or `disable` its preflight refused (exit 3, nothing changed),
    /// until the next run begins: an agent that polls `status` learns why (the message
    /// said nothing). Kept in [`REFUSED_FILE`] beside the status file, which stays as it
    /// was; null in the status file, and in `status --json` once a run began.
    #[serde(default)]
    pub refused: Option<Refusal>,
    /// Whether `luksify resume` has work here: no run's process is at work, and a volume
    /// is mid-walk or a stopped run had not reached it. Written as the file's writer
    /// sees it, and set again by `status` from the live state (an agent had to infer it
    /// from `pid` null beside an `*InProgress` state, or parse the message; a trial).
    #[serde(default)]
    pub resumable: bool,
}

/// A refused `enable` or `disable` (see [`Status::refused`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refusal {
    pub operation: Operation,
    pub unix: u64,
    /// Its one-line message: the blockers, each with its fix, `; `-separated.
    pub message: String,
    /// The blockers' codes, as `check --json` names them (`holders`, `other_namespace`,
    /// `no_header_space`, ...), each once: what an agent decides on without parsing the
    /// message (it was free text only; a trial).
    #[serde(default)]
    pub codes: Vec<String>,
}

impl Refusal {
    /// What `status` adds to the message after `msg` (the volumes' own, maybe empty).
    pub fn describe(&self, msg: &str) -> String {
        let what = match self.operation {
            Operation::DisableEncryption => "disable",
            _ => "enable",
        };
        let secs = self.unix % 86_400;
        let when = format!(
            "{:02}:{:02}:{:02} UTC",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        );
        let refused = format!(
            "the {what} at {when} was refused, nothing was changed: {}",
            self.message
        );
        if msg.is_empty() {
            let mut c = refused.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect())
                .unwrap_or_default()
        } else {
            format!("{}; {refused}", msg.trim_end_matches('.'))
        }
    }
}

/// Where a refusal is kept (see [`Status::refused`]): a file of its own, so that a refused
/// command leaves the status file itself as it was ("nothing was changed").
pub const REFUSED_FILE: &str = "refused.json";

/// Records in the state directory `dir` that `op` was refused by its preflight with
/// `message` (its lines joined). The caller holds the global lock; the status file is
/// not touched.
pub fn record_refusal(
    dir: &Path,
    op: Operation,
    message: &str,
    codes: &[String],
) -> std::io::Result<()> {
    let r = Refusal {
        codes: codes.to_vec(),
        operation: op,
        unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        message: in_state_dir(
            message
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; ")
                // `describe` says it once.
                .trim_end_matches("; nothing was changed"),
            dir,
        ),
    };
    let mut bytes = serde_json::to_vec_pretty(&r).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    write_atomic(&dir.join(REFUSED_FILE), &bytes)
}

impl Status {
    pub fn volume_mut(&mut self, device: &Path) -> Option<&mut VolumeStatus> {
        self.volumes.iter_mut().find(|v| v.device == device)
    }

    /// Inserts or replaces the entry for `v.device`.
    pub fn upsert(&mut self, v: VolumeStatus) {
        match self.volume_mut(&v.device.clone()) {
            Some(slot) => *slot = v,
            None => self.volumes.push(v),
        }
    }

    /// Starts a run of `op` by pid `pid`: volumes an earlier run left plain are no
    /// longer luksify's and leave the list; `in_run` marks those `pick` selects.
    pub fn begin_run(&mut self, op: Operation, pid: u32, pick: impl Fn(&VolumeStatus) -> bool) {
        self.volumes
            .retain(|v| v.state != VolumeState::NotEncrypted || pick(v));
        for v in &mut self.volumes {
            v.in_run = pick(v);
            // An earlier run's failure is not this run's: it would stand in its messages.
            if v.in_run {
                v.error = None;
            }
        }
        self.operation = op;
        self.pid = Some(pid);
        self.pid_start = crate::holders::process_identity(pid);
        self.note_boot(crate::holders::boot_id());
    }

    /// Records `boot` as the run's boot, and on the run's volumes whether it differs
    /// from the previous run's (unknown for a status file from before boots were
    /// recorded: not said to follow a reboot then).
    fn note_boot(&mut self, boot: Option<String>) {
        let rebooted = self.run_boot.is_some() && boot.is_some() && self.run_boot != boot;
        for v in self.volumes.iter_mut().filter(|v| v.in_run) {
            v.after_reboot = rebooted;
        }
        if boot.is_some() {
            self.run_boot = boot;
        }
    }

    /// The run's process is done with the file (finished, failed or gone): nothing moves
    /// now, so no volume has a rate or a time left (a stopped 1 TiB run kept saying
    /// 16 MB/s and 18 hours to go).
    pub fn end_run(&mut self) {
        self.pid = None;
        self.pid_start = None;
        for v in &mut self.volumes {
            v.rate_bytes_per_s = None;
            v.eta_seconds = None;
        }
    }

    /// Sets each interrupted volume's percent to its header's where that is further:
    /// the status file is written every second, the header at every hotzone, so after a
    /// kill the file lags. Only while no run's process works on them.
    pub fn catch_up_with_headers(&mut self, state_dir: Option<&Path>) {
        for v in &mut self.volumes {
            if !matches!(
                v.state,
                VolumeState::EncryptionInProgress | VolumeState::DecryptionInProgress
            ) {
                continue;
            }
            let h = match run_stage(v, state_dir) {
                RunStage::Walking(Some(h)) => h,
                // The walk is over, the steps after it are left: all of it is done (a
                // killed disable said "finished its walk" beside "percent": 5.63).
                RunStage::Walked => 100.0,
                _ => continue,
            };
            if h > v.percent {
                v.percent = h;
                v.bytes_done = (h / 100.0 * v.bytes_total as f64) as u64;
            }
        }
    }

    /// Whether the process recorded as doing the run still runs.
    pub fn run_process_running(&self) -> bool {
        self.pid
            .is_some_and(|p| crate::holders::recorded_process_running(p, self.pid_start.as_deref()))
    }

    /// Puts the run's volumes last, in `order` (the order the run works them): the
    /// message's "volume i/n" counts them in list order, as the terminal counts them in
    /// run order.
    pub fn order_run(&mut self, order: &[PathBuf]) {
        let (mut run, rest): (Vec<_>, Vec<_>) = self.volumes.drain(..).partition(|v| v.in_run);
        run.sort_by_key(|v| order.iter().position(|d| *d == v.device));
        self.volumes = rest;
        self.volumes.extend(run);
    }

    /// Whether `luksify resume` has work ([`Status::resumable`]), unless a run's process
    /// is at work (`running`).
    fn resumable_unless(&self, running: bool) -> bool {
        !running
            && (self.volumes.iter().any(|v| {
                matches!(
                    v.state,
                    VolumeState::EncryptionInProgress | VolumeState::DecryptionInProgress
                )
            }) || !crate::enable::pending_of_stopped_run(self).1.is_empty())
    }

    /// Recomputes the aggregate data state and the message from the volumes.
    /// `active` is the index (0-based) of the volume being worked on, if any.
    pub fn refresh(&mut self, active: Option<usize>) {
        for v in &mut self.volumes {
            if !matches!(
                v.state,
                VolumeState::EncryptionInProgress | VolumeState::DecryptionInProgress
            ) {
                v.phase = None;
            }
        }
        self.data_volumes_encrypted = aggregate(self);
        self.progress_message = message(self.operation, &self.volumes, active);
        // As the file's writer sees it: `status` sets it again from the live state (a
        // run killed outright leaves its pid in the file).
        self.resumable = self.resumable_unless(self.pid.is_some());
        // An enable that ended with every volume of its run still plain and no error:
        // stopped before its walks and put back (a signal, or `disable` backing it out).
        // Not "Encrypting 1 data volume" with nothing running (a trial).
        let run: Vec<&VolumeStatus> = self.volumes.iter().filter(|v| v.in_run).collect();
        if self.pid.is_none()
            && self.operation == Operation::EnableEncryption
            && !run.is_empty()
            && run
                .iter()
                .all(|v| v.state == VolumeState::NotEncrypted && v.error.is_none())
        {
            self.progress_message = format!(
                "Encryption cancelled before it started: nothing was encrypted{}",
                others_note(self.operation, &self.volumes)
            );
        }
        if self.os_volume_encrypted == VolumeState::VMRestartPending {
            self.progress_message = "OS disk successfully encrypted, please reboot the VM".into();
        }
    }

    /// The three lines `luksify status` prints.
    pub fn render_text(&self) -> String {
        format!(
            "OsVolumeEncrypted : {}\nDataVolumesEncrypted : {}\nProgressMessage : {}\n",
            self.os_volume_encrypted, self.data_volumes_encrypted, self.progress_message
        )
    }
}

/// What is true now rather than what luksify last did: an `Encrypted` volume whose
/// mapping `/dev/mapper/NAME` is gone (after `luksify close`, or at boot before crypttab
/// mapped it) or is not mounted at its recorded mount point reads `NotMounted`, and one
/// that is mapped and mounted again reads `Encrypted`, as the cloud agent reports them.
/// A run whose process is gone (killed, power cut) is reported as interrupted, with
/// what finishes it. A userspace mapping (its record in `state_dir`) whose daemon is
/// gone still looks mounted, but every uncached read fails: `NotMounted`, and the
/// message says how to map it again. The aggregate follows.
pub fn apply_live_state(
    s: &mut Status,
    mounts: &[crate::mountinfo::Mount],
    state_dir: Option<&Path>,
) {
    let mut orphaned = None;
    let mut closed = None;
    let mut daemon_stopped = None;
    // A volume mid-decryption is closed for its walk: its mapping is named only while
    // it is there (a status file an older luksify wrote kept the name; a trial).
    for v in &mut s.volumes {
        if v.state == VolumeState::DecryptionInProgress
            && v.mapped_device.as_ref().is_some_and(|d| !d.exists())
        {
            v.mapped_device = None;
        }
    }
    for v in &mut s.volumes {
        if !matches!(v.state, VolumeState::Encrypted | VolumeState::NotMounted) {
            continue;
        }
        let mapper = Path::new("/dev/mapper").join(&v.mapper);
        let mapped = crate::probe::block_dev_num(&mapper);
        // Closed (`luksify close`, or not mapped since boot): no mapped device to name
        // (it kept naming the link that was gone; a trial).
        if mapped.is_none() {
            v.mapped_device = None;
        }
        // Mounted here, or in another mount namespace: an agent whose service has
        // private mounts, asked about a volume mounted in the host's, was told it was
        // not mounted, and to mount it (a trial).
        let mut live = mapped.is_some_and(|d| match &v.mount_point {
            Some(mp) => {
                mounts.iter().any(|m| m.dev == d && m.mount_point == *mp)
                    || !crate::probe::foreign_namespace_mounts(&[d], &[]).is_empty()
            }
            None => true,
        });
        if !live {
            closed.get_or_insert((v.clone(), mapped.is_some()));
        }
        if let Some(rec) = state_dir.and_then(|d| crate::map::load_record(d, &v.mapper)) {
            if live && rec.backend == crate::map::Backend::Userspace && !crate::map::is_live(&rec) {
                live = false;
                orphaned.get_or_insert(v.clone());
            } else if let Some(pid) = rec
                .daemon_pid
                .filter(|p| live && crate::holders::is_stopped(*p))
            {
                // Mapped and mounted, but every uncached read waits on a daemon that
                // got SIGSTOP: it read as Encrypted and fine (a trial).
                daemon_stopped.get_or_insert((v.clone(), pid));
            }
        }
        v.state = if live {
            VolumeState::Encrypted
        } else {
            VolumeState::NotMounted
        };
    }
    let gone = s.pid.is_some() && !s.run_process_running();
    // A run killed between two volumes has none in progress, only volumes it had not
    // reached: the aggregate and the message say what resume does with them (a trial
    // read NotEncrypted and "Decrypting 2 data volumes" from a dead disable).
    let mut stopped_between = None;
    let stopped = gone.then(|| crate::enable::pending_of_stopped_run(s));
    if gone {
        s.end_run();
    }
    // With no run's process at work, an interrupted run's percent is its header's when
    // that is further: the file's lags up to a second (a trial read "interrupted at 29%"
    // beside "percent": 21.65), and `luksify resume DEV` may have taken the walk on.
    let before: Vec<f64> = s.volumes.iter().map(|v| v.percent).collect();
    if s.pid.is_none() {
        s.catch_up_with_headers(state_dir);
    }
    if let Some((op, pending)) = stopped {
        let in_progress = |v: &&VolumeStatus| {
            matches!(
                v.state,
                VolumeState::EncryptionInProgress | VolumeState::DecryptionInProgress
            )
        };
        // The latest run's volume first: an older run's may be in progress too.
        if let Some(v) = s
            .volumes
            .iter()
            .filter(in_progress)
            .find(|v| v.in_run)
            .or_else(|| s.volumes.iter().find(in_progress))
        {
            s.progress_message = interrupted_message(v, state_dir);
            // The run's volumes it had not reached, as a stopped run's message names
            // them (a trial's killed three-volume run named the first only).
            let left = not_started_yet(
                pending
                    .iter()
                    .filter(|d| **d != v.device)
                    .map(PathBuf::as_path),
            );
            if !left.is_empty() {
                s.progress_message = s.progress_message.replacen(
                    "; `luksify resume` finishes it",
                    &format!("{left}; `luksify resume` finishes the run"),
                    1,
                );
            }
        } else if !pending.is_empty()
            // One that says why it was not done (a resume refused it) keeps its message.
            && !s
                .volumes
                .iter()
                .any(|v| pending.contains(&v.device) && v.error.is_some())
        {
            let devs = pending
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            let went = "its luksify process went away";
            let (state, msg) = if op == Operation::DisableEncryption {
                (
                    VolumeState::DecryptionInProgress,
                    format!("Decryption of {devs} had not started when {went}; still encrypted: `luksify resume` decrypts it, finishing the run"),
                )
            } else {
                (
                    VolumeState::EncryptionInProgress,
                    format!("Encryption of {devs} had not started when {went} (nothing was encrypted there); `luksify resume` encrypts it, finishing the run"),
                )
            };
            s.progress_message = msg;
            stopped_between = Some(state);
        } else if pending.is_empty() && !s.volumes.iter().any(|v| v.in_run && v.error.is_some()) {
            // Nothing in progress, nothing left: killed after its last step but before
            // it wrote its final message. "Encrypting data volume 1/1: 100%" stayed for
            // good beside an Encrypted volume, `resume` having nothing to do (a trial).
            s.progress_message = message(s.operation, &s.volumes, None);
        }
    }
    // A run that stopped itself (a signal, exit 5) and whose walk `luksify resume DEV`
    // then took further or finished: the header says where it stands (a trial's status
    // kept "Encryption stopped at 35%" for a walk that was done).
    if !gone && s.pid.is_none() {
        let moved = s
            .volumes
            .iter()
            .zip(&before)
            .filter(|(v, p)| {
                matches!(
                    v.state,
                    VolumeState::EncryptionInProgress | VolumeState::DecryptionInProgress
                ) && v.percent > **p
            })
            .map(|(v, _)| v)
            .max_by_key(|v| v.in_run);
        if let Some(v) = moved {
            s.progress_message = interrupted_message(v, state_dir);
        }
    }
    // Encrypted, but closed or not mounted, and nothing else to say: how to bring it
    // back (the message was the last run's, "Decryption succeeded; 1 other data volume
    // stays encrypted", and resume answers "Nothing to resume"; a trial).
    // (A failure of the latest run keeps its message: it says what to do first.)
    let quiet = !gone
        && s.pid.is_none()
        && !s.volumes.iter().any(|v| {
            matches!(
                v.state,
                VolumeState::EncryptionInProgress | VolumeState::DecryptionInProgress
            ) || (v.in_run && v.error.is_some())
        });
    if let (Some((v, mapped)), None, true) = (&closed, &orphaned, quiet) {
        let name = &v.mapper;
        s.progress_message = if !*mapped && crate::enable::decrypted_outside(v) {
            // Not "encrypted and not open", with an `open` that fails: no header (a
            // trial decrypted one by hand).
            format!(
                "{} was decrypted outside luksify (its filesystem is back on it in plaintext); fstab and crypttab still name its mapping: `luksify disable --volume {}` restores them and mounts it",
                v.device.display(),
                v.device.display()
            )
        } else if *mapped {
            format!(
                "{} is encrypted and mapped as /dev/mapper/{name} but not mounted: {}",
                v.device.display(),
                mount_command(v)
            )
        } else {
            // Its name may have moved (detached and attached again, a reboot): the
            // `open` it named was of the old name, which may be another disk now (a
            // trial).
            match crate::enable::locate(v, "resume") {
                Ok(Some(dev)) => {
                    let mut w = v.clone();
                    w.device = dev.clone();
                    format!(
                        "{} (recorded as {}, the name moved) is encrypted and not open: {} and {}",
                        dev.display(),
                        v.device.display(),
                        open_command(&w, crate::map::dm_available().is_err()),
                        mount_command(v)
                    )
                }
                Err(f) => format!(
                    "{} is encrypted and not open, and not where it was: {}",
                    v.device.display(),
                    f.message.replace("nothing was written: ", "").replace(
                        "run `luksify resume` again",
                        "open it (`luksify open DEV NAME --key-file F`)"
                    )
                ),
                Ok(None) => format!(
                    "{} is encrypted and not open (closed, or not mapped since boot): {} and {}",
                    v.device.display(),
                    open_command(v, crate::map::dm_available().is_err()),
                    mount_command(v)
                ),
            }
        };
    }
    if let (Some(v), None) = (orphaned, s.pid) {
        s.progress_message = format!(
            "The userspace mapping {name} of {} lost its daemon (killed?) and reads fail: {}`luksify close {name}`, then {} and {}",
            v.device.display(),
            v.mount_point
                .as_ref()
                .map(|m| format!("umount {}, ", m.display()))
                .unwrap_or_default(),
            open_command(&v, true),
            mount_command(&v),
            name = v.mapper,
        );
    }
    if let Some((v, pid)) = daemon_stopped {
        let said = if s.progress_message.is_empty() {
            String::new()
        } else {
            format!("{}; ", s.progress_message)
        };
        s.progress_message = format!(
            "{said}the userspace mapping {} of {} is served by a stopped daemon (pid {pid}): reads and writes{} wait until `kill -CONT {pid}`",
            v.mapper,
            v.device.display(),
            v.mount_point
                .as_ref()
                .map(|m| format!(" under {}", m.display()))
                .unwrap_or_default(),
        );
    }
    // A run whose process is stopped (kill -STOP, Ctrl-Z) reads as going on, at a
    // percent that no longer moves (a trial's agent could not tell): say so.
    if let Some(pid) = s
        .pid
        .filter(|p| s.run_process_running() && crate::holders::is_stopped(*p))
    {
        s.progress_message = format!(
            "{}; its luksify process (pid {pid}) is stopped: `kill -CONT {pid}` lets it go on",
            s.progress_message
        );
    }
    s.data_volumes_encrypted = stopped_between.unwrap_or_else(|| aggregate(s));
    s.resumable = s.resumable_unless(s.run_process_running());
    if let Some(r) = &s.refused {
        // Kept only until the next run begins, a refusal is newer than the last run: that
        // run's failure is not what stands now, and its fix may no longer apply (a trial
        // read "ulimit -f unlimited" beside a later refusal for a full disk). The volumes
        // say where they stand, then the refusal.
        if !s.run_process_running() && s.volumes.iter().any(|v| v.error.is_some()) {
            let mut vols = s.volumes.clone();
            for v in &mut vols {
                v.error = None;
            }
            s.progress_message = message(Operation::None, &vols, None);
        }
        s.progress_message = r.describe(&s.progress_message);
    }
}

/// The mount of volume `v` as it was (its options too: a bare mount loses noatime,
/// nodev...), on its mapping.
fn mount_command(v: &VolumeStatus) -> String {
    match &v.mount_point {
        Some(m) => format!(
            "`mount {}/dev/mapper/{} {}`",
            v.mount_options
                .as_ref()
                .map(|o| format!("-o {o} "))
                .unwrap_or_default(),
            v.mapper,
            m.display()
        ),
        None => format!("mount /dev/mapper/{} again", v.mapper),
    }
}

/// The `luksify open` that maps volume `v` again under its name (a detached header is
/// not on the device: open needs it named).
fn open_command(v: &VolumeStatus, userspace: bool) -> String {
    // The key file enable recorded, so that the command runs as said (`F` failed as a
    // file name for an agent that followed it; a trial's soak).
    let key = v
        .key_file
        .as_ref()
        .map_or_else(|| "F".to_string(), |k| k.display().to_string());
    format!(
        "`luksify open {} {} --key-file {key}{}{}`",
        v.device.display(),
        v.mapper,
        v.header
            .as_ref()
            .map(|h| format!(" --header {}", h.display()))
            .unwrap_or_default(),
        if userspace { " --userspace" } else { "" }
    )
}

/// Where an interrupted run on a volume stands, as its header tells (the percent in the
/// status file is written every second and lags).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RunStage {
    /// Nothing written yet: an encryption's device is still plain, a decryption's still
    /// encrypted.
    NotStarted,
    /// Part plaintext, part ciphertext; for an encryption whose header reads, the percent
    /// it records as done (see [`run_stage`]).
    Walking(Option<f64>),
    /// The walk is done; the steps after it (map or remount, fstab, crypttab) are left.
    Walked,
}

/// [`RunStage`] of volume `v` (in progress in the status file of `state_dir`). A header
/// that cannot be opened (not root, say) is not "no header": `Walking` then.
///
/// An encryption's header also gives how far it got, in percent of the bytes the walk
/// reported as its total: the status file's percent is written every second, the header at
/// every hotzone, so after a kill the header is usually ahead. Not for decryptions (a
/// moved head shifts their offsets).
pub fn run_stage(v: &VolumeStatus, state_dir: Option<&Path>) -> RunStage {
    use crate::enable::{
        decryption_not_started, decryption_walked, header_progress, HeaderProgress,
    };
    if v.state == VolumeState::DecryptionInProgress {
        return match (&v.header, state_dir) {
            _ if v.walk_done => RunStage::Walked,
            (Some(h), _) if decryption_walked(h) => RunStage::Walked,
            (Some(h), Some(d))
                if decryption_not_started(&v.device, h, h.starts_with(d.join("headers"))) =>
            {
                RunStage::NotStarted
            }
            // Walking: how far, from its header as for an encryption (the status
            // file's percent lags by up to a second; a trial saw 6% for 27% done).
            (Some(h), _) => match header_progress(h) {
                HeaderProgress::InProgress(st) => RunStage::Walking(clean_percent(v, st)),
                _ => RunStage::Walking(None),
            },
            _ => RunStage::Walking(None),
        };
    }
    let moved = moved_to(v);
    let header = v
        .header
        .as_deref()
        .or(moved.as_deref())
        .unwrap_or(&v.device);
    if let Err(e) = std::fs::File::open(header) {
        // A detached header never created (the run stopped between its record and the
        // header file): nothing was written while the device holds the filesystem the
        // run recorded (a trial's backed-out enable read "interrupted at 0%").
        if v.header.is_some()
            && e.kind() == std::io::ErrorKind::NotFound
            && !v.header_reserved
            && crate::enable::plain_as_recorded(v)
        {
            return RunStage::NotStarted;
        }
        return RunStage::Walking(None);
    }
    match header_progress(header) {
        // An emptied or zeroed header file of a run that had begun (progress on record,
        // or the device no longer starting with its filesystem) is no run not started:
        // `check` said "still plaintext" of a volume 7 MiB into its walk (trial V6).
        HeaderProgress::Absent if v.header.is_some() && !crate::enable::never_walked(v) => {
            RunStage::Walking(None)
        }
        HeaderProgress::Absent => RunStage::NotStarted,
        HeaderProgress::Missing | HeaderProgress::Unreadable(_) => RunStage::Walking(None),
        HeaderProgress::Finished => RunStage::Walked,
        HeaderProgress::InProgress(st) => RunStage::Walking(clean_percent(v, st)),
    }
}

/// The percent of `v` a run's header records as done: only what is clean (the hotzone
/// in progress does not count).
fn clean_percent(
    v: &VolumeStatus,
    st: Option<luksify_luks::reencrypt::ReencryptState>,
) -> Option<f64> {
    use luksify_luks::luks2::json::ReencryptDirection;
    st.filter(|_| v.bytes_total > 0).map(|st| {
        let p = st.progress;
        let done = match st.direction {
            ReencryptDirection::Forward => p.hot_start,
            ReencryptDirection::Backward => v
                .bytes_total
                .saturating_sub(p.hot_start.saturating_add(p.hot_len)),
        };
        (done as f64 * 100.0 / v.bytes_total as f64).clamp(0.0, 100.0)
    })
}

/// The device an encryption with its header in front is on now when its recorded name
/// shows no header and another device carries the volume's LUKS UUID (a reboot moved
/// the names): its header says where the run stands, not the recorded name's (a
/// trial's status said "had not started (nothing was encrypted)" of a run 30% done).
fn moved_to(v: &VolumeStatus) -> Option<PathBuf> {
    use crate::enable::{header_progress, HeaderProgress};
    let uuid = v.luks_uuid.as_deref().filter(|_| v.header.is_none())?;
    if matches!(
        header_progress(&v.device),
        HeaderProgress::InProgress(_) | HeaderProgress::Finished
    ) {
        return None;
    }
    match crate::probe::devices_with_uuid(uuid).as_slice() {
        [d] if d != &v.device => Some(d.clone()),
        _ => None,
    }
}

/// What an interrupted run's volume needs, from [`run_stage`].
fn interrupted_message(v: &VolumeStatus, state_dir: Option<&Path>) -> String {
    let dev = match moved_to(v) {
        Some(d) => format!("{} (now {})", v.device.display(), d.display()),
        None => v.device.display().to_string(),
    };
    let went = "its luksify process went away";
    let decrypt = v.state == VolumeState::DecryptionInProgress;
    let what = if decrypt { "Decryption" } else { "Encryption" };
    // Where `resume` would look for the volume, and what it would refuse: a device that
    // now holds another filesystem (reused, or another disk under the name) was said to
    // be finished, or started again, by a `resume` that refuses it.
    if let Err(f) = crate::enable::locate(v, "resume") {
        return format!(
            "{what} of {} was interrupted (its luksify process is gone), and the volume is not where it was: {}",
            v.device.display(),
            f.message.replace("nothing was written: ", "")
        );
    }
    match run_stage(v, state_dir) {
        RunStage::NotStarted if decrypt => format!(
            "Decryption of {dev} had not started when {went}; it is still encrypted: `luksify resume` maps and mounts it again, then `luksify disable --volume {dev}` decrypts it"
        ),
        RunStage::NotStarted => format!(
            "Encryption of {dev} had not started when {went} (nothing was encrypted); `luksify resume` starts it again, `luksify disable --volume {dev}` puts it back as it was"
        ),
        RunStage::Walked => format!(
            "{what} of {dev} finished its walk, but {went} before it recorded the steps after it ({}, fstab, crypttab) as done; `luksify resume` does what is left of them",
            if decrypt { "remount" } else { "map, mount" }
        ),
        // Every byte walked, the final header not written: "interrupted at 100%" read as
        // a contradiction (a trial's enable killed as its walk ended).
        RunStage::Walking(header) => match header.map_or(v.percent, |h| h.max(v.percent)) {
            p if p >= 100.0 => format!(
                "{what} of {dev} was interrupted as its walk ended (100%, its final header not yet written; its luksify process is gone); `luksify resume` finishes it"
            ),
            p => format!(
                "{what} of {dev} interrupted at {}% (its luksify process is gone); `luksify resume` finishes it",
                p.floor() as u64
            ),
        },
    }
}

/// While a run's process works, its direction; otherwise in progress (an interrupted
/// run) wins, then encrypted-but-unmounted; Encrypted when every volume luksify manages
/// is encrypted.
pub fn aggregate(s: &Status) -> VolumeState {
    use VolumeState::*;
    let vols = &s.volumes;
    if s.pid.is_some() {
        match s.operation {
            Operation::EnableEncryption | Operation::Resume => return EncryptionInProgress,
            Operation::DisableEncryption => return DecryptionInProgress,
            Operation::None => {}
        }
    }
    if vols.iter().any(|v| v.state == EncryptionInProgress) {
        return EncryptionInProgress;
    }
    if vols.iter().any(|v| v.state == DecryptionInProgress) {
        return DecryptionInProgress;
    }
    // After a disable, the volumes it left plain were meant to be: they say nothing of
    // the ones still encrypted (a trial's status read NotEncrypted with one of two
    // volumes still encrypted). After an enable, one left plain is one not done.
    let counted: Vec<_> = vols
        .iter()
        .filter(|v| !(s.operation == Operation::DisableEncryption && v.state == NotEncrypted))
        .collect();
    let enc: Vec<_> = counted
        .iter()
        .filter(|v| matches!(v.state, Encrypted | NotMounted))
        .collect();
    if enc.is_empty() {
        return NotEncrypted;
    }
    if enc.iter().any(|v| v.state == NotMounted) {
        return NotMounted;
    }
    if enc.len() == counted.len() {
        Encrypted
    } else {
        NotEncrypted
    }
}

/// The agent's progress messages, about the volumes of the latest run; a run that
/// ended says what the volumes outside it still need.
pub fn message(op: Operation, vols: &[VolumeStatus], active: Option<usize>) -> String {
    let m = run_message(op, vols, active);
    if active.is_some() || m.is_empty() {
        return m;
    }
    m + &others_note(op, vols)
}

/// "; 2 other data volumes are interrupted (/dev/sdc, /dev/sdd): `luksify resume`
/// finishes them", and after a decryption "; 3 other data volumes stay encrypted":
/// what the aggregate state alone does not say about volumes outside the latest run.
fn others_note(op: Operation, vols: &[VolumeStatus]) -> String {
    let list = |v: &[&VolumeStatus]| {
        let mut names: Vec<String> = v
            .iter()
            .take(3)
            .map(|v| v.device.display().to_string())
            .collect();
        if v.len() > 3 {
            names.push(format!("and {} more", v.len() - 3));
        }
        names.join(", ")
    };
    let others: Vec<&VolumeStatus> = vols.iter().filter(|v| !v.in_run).collect();
    let stopped: Vec<&VolumeStatus> = others
        .iter()
        .copied()
        .filter(|v| {
            matches!(
                v.state,
                VolumeState::EncryptionInProgress | VolumeState::DecryptionInProgress
            )
        })
        .collect();
    let mut note = String::new();
    if !stopped.is_empty() {
        note += &format!(
            "; {} other data volume{} interrupted ({}): `luksify resume` finishes {}",
            stopped.len(),
            if stopped.len() == 1 { " is" } else { "s are" },
            list(&stopped),
            if stopped.len() == 1 { "it" } else { "them" }
        );
    }
    let encrypted: Vec<&VolumeStatus> = others
        .iter()
        .copied()
        .filter(|v| matches!(v.state, VolumeState::Encrypted | VolumeState::NotMounted))
        .collect();
    if op == Operation::DisableEncryption && !encrypted.is_empty() {
        note += &format!(
            "; {} other data volume{} encrypted ({})",
            encrypted.len(),
            if encrypted.len() == 1 {
                " stays"
            } else {
                "s stay"
            },
            list(&encrypted)
        );
    }
    note
}

fn run_message(op: Operation, vols: &[VolumeStatus], active: Option<usize>) -> String {
    let run: Vec<(usize, &VolumeStatus)> =
        vols.iter().enumerate().filter(|(_, v)| v.in_run).collect();
    let n = run.len();
    let pct = |v: &VolumeStatus| v.percent.floor() as u64;
    if let Some(a) = active {
        let after = |v: &VolumeStatus| if v.after_reboot { " after reboot" } else { "" };
        if let Some(v) = vols.get(a) {
            let i = run.iter().position(|(j, _)| *j == a).unwrap_or(0) + 1;
            let n = n.max(i);
            let doing = if v.state == VolumeState::DecryptionInProgress {
                "Decrypting"
            } else {
                "Encrypting"
            };
            if let Some(p) = v.phase.as_deref() {
                return if v.resumed {
                    let what = doing.strip_suffix("ing").unwrap_or(doing).to_lowercase();
                    format!("Resuming {what}ion{}: {p}", after(v))
                } else {
                    format!("{doing} data volume {i}/{n}: {p}")
                };
            }
            return match v.state {
                VolumeState::DecryptionInProgress if v.resumed => {
                    format!("Resuming decryption{}: {}%", after(v), pct(v))
                }
                VolumeState::DecryptionInProgress => {
                    format!("Decrypting data volume {i}/{n}: {}%", pct(v))
                }
                _ if v.resumed => format!("Resuming encryption{}: {}%", after(v), pct(v)),
                _ => format!("Encrypting data volume {i}/{n}: {}%", pct(v)),
            };
        }
    }
    let failed = run.iter().find_map(|(_, v)| v.error.clone());
    let stopped = run.iter().find(|(_, v)| {
        matches!(
            v.state,
            VolumeState::EncryptionInProgress | VolumeState::DecryptionInProgress
        )
    });
    // A resume that took up nothing (every run it found was busy, say) says what the
    // volumes say, not "Encrypting 0 data volumes".
    let op = if op == Operation::Resume && run.is_empty() {
        Operation::None
    } else if op == Operation::Resume
        && run
            .iter()
            .any(|(_, v)| v.state == VolumeState::DecryptionInProgress)
    {
        // A resume finishing a disable: its failures and progress are a decryption's
        // ("Encryption failed" was said of a decryption that could not go on).
        Operation::DisableEncryption
    } else {
        op
    };
    // No volume walked right now: the run's start, or the steps between two volumes,
    // where "Decrypting 3 data volumes" read as the run begun again (a trial).
    let between = |doing: &str, done_state: VolumeState| {
        let done = run
            .iter()
            .filter(|(_, v)| {
                v.state == done_state
                    || (done_state == VolumeState::Encrypted && v.state == VolumeState::NotMounted)
            })
            .count();
        if done > 0 && done < n {
            format!("{doing} data volume {}/{n}: preparing", done + 1)
        } else {
            format!("{doing} {n} data volume{}", if n == 1 { "" } else { "s" })
        }
    };
    match op {
        Operation::DisableEncryption => {
            if let Some(e) = failed {
                format!("Decryption failed: {e}")
            } else if let Some((_, v)) = stopped {
                format!(
                    "Decryption of {} stopped at {}%{}; `luksify resume` finishes it",
                    v.device.display(),
                    pct(v),
                    not_reached(&run, VolumeState::Encrypted)
                )
            } else if n > 0
                && run
                    .iter()
                    .all(|(_, v)| v.state == VolumeState::NotEncrypted)
            {
                "Decryption succeeded".into()
            } else {
                between("Decrypting", VolumeState::NotEncrypted)
            }
        }
        Operation::Resume
            if !run.is_empty()
                && run
                    .iter()
                    .all(|(_, v)| v.state == VolumeState::NotEncrypted && v.error.is_none()) =>
        {
            "Decryption succeeded".into()
        }
        Operation::EnableEncryption | Operation::Resume => {
            if let Some(e) = failed {
                format!("Encryption failed: {e}")
            } else if n > 0
                && run.iter().all(|(_, v)| {
                    matches!(v.state, VolumeState::Encrypted | VolumeState::NotMounted)
                })
            {
                "Encryption succeeded for data volumes".into()
            } else if let Some((_, v)) = stopped.filter(|_| active.is_none() && n > 0) {
                format!(
                    "Encryption of {} stopped at {}%{}; `luksify resume` finishes it",
                    v.device.display(),
                    pct(v),
                    not_reached(&run, VolumeState::NotEncrypted)
                )
            } else {
                between("Encrypting", VolumeState::Encrypted)
            }
        }
        Operation::None => {
            if !vols.is_empty() && vols.iter().all(|v| v.state == VolumeState::Encrypted) {
                "Encryption succeeded for data volumes".into()
            } else {
                String::new()
            }
        }
    }
}

/// The run's volumes still `before` (not reached by the walk that stopped), said after
/// the stopped one: the message named no device, and not that volume 2/2 had not
/// started (a trial).
fn not_reached(run: &[(usize, &VolumeStatus)], before: VolumeState) -> String {
    not_started_yet(
        run.iter()
            .filter(|(_, v)| v.state == before && v.error.is_none())
            .map(|(_, v)| v.device.as_path()),
    )
}

/// ", and DEV, DEV2 not started yet" of a stopped run's volumes not reached (`devs`),
/// or nothing: said after the device it stopped on, by the status messages and the
/// run's own line alike.
pub(crate) fn not_started_yet<'a>(devs: impl IntoIterator<Item = &'a Path>) -> String {
    let left: Vec<String> = devs.into_iter().map(|d| d.display().to_string()).collect();
    if left.is_empty() {
        String::new()
    } else {
        format!(", and {} not started yet", left.join(", "))
    }
}

/// Where the status file and the lock live: `--state-dir`, else $LUKSIFY_STATE_DIR,
/// else /var/lib/luksify.
pub fn state_dir(explicit: Option<&Path>) -> PathBuf {
    let dir = match (explicit, std::env::var_os("LUKSIFY_STATE_DIR")) {
        (Some(p), _) => p.to_path_buf(),
        (None, Some(p)) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_STATE_DIR),
    };
    // Absolute: the status file records paths under it (moved headers), which a later
    // command (the boot-time `resume`) reads from another working directory.
    std::path::absolute(&dir).unwrap_or(dir)
}

/// Reads the status file; a missing file is the empty status.
pub fn load(dir: &Path) -> std::io::Result<Status> {
    let mut s = load_status_file(dir)?;
    s.refused = std::fs::read(dir.join(REFUSED_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<Refusal>(&b).ok());
    // The latest news is the refusal when it is newer than the status file (or there is
    // none): `updated_unix` read 0 beside a refusal's time (a trial).
    if let Some(r) = &s.refused {
        s.updated_unix = s.updated_unix.max(r.unix);
    }
    Ok(s)
}

/// The status file alone (see [`load`]).
fn load_status_file(dir: &Path) -> std::io::Result<Status> {
    match std::fs::read(dir.join(STATUS_FILE)) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                in_state_dir(
                    &format!(
                        "{f} is not a luksify status file ({e}); if a crash or a hand edit broke it, move it aside (mv {f} {f}.bad): luksify starts a new one, and `luksify resume --key-file F` finds interrupted runs from the devices",
                        f = dir.join(STATUS_FILE).display()
                    ),
                    dir,
                ),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Status {
            version: 1,
            ..Status::default()
        }),
        Err(e) => Err(std::io::Error::new(
            e.kind(),
            format!(
                "cannot read {} ({e}); the state directory {} must be a directory root can read (--state-dir)",
                dir.join(STATUS_FILE).display(),
                dir.display()
            ),
        )),
    }
}

/// Creates `dir` and the parents it lacks with `mode` exactly, whatever the umask:
/// under `umask 000` the state directory, its `maps` and a new `--header-dir` were made
/// world-writable, and another user could move headers and rewrite mapping records
/// (a trial).
pub fn create_dirs(dir: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let missing: Vec<PathBuf> = dir
        .ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
        .map(Path::to_path_buf)
        .collect();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)?;
    for m in missing {
        std::fs::set_permissions(&m, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Replaces `path` with `bytes` atomically: a reader sees the old or the new file, never
/// a mix. The file gets mode 0644 (see [`write_atomic_mode`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_mode(path, bytes, 0o644)
}

/// [`write_atomic`] with the new file's `mode`, whatever the umask. The temporary file
/// is made new, never through a link: one planted at its name in a directory others
/// could write made root overwrite the file it led to (a trial).
pub fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = path.parent().unwrap_or(Path::new("."));
    create_dirs(dir, 0o755)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    // One left by a run of the same pid that died here.
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        // Not left behind (a full disk left empty ones; a trial).
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    remove_dead_temporaries(dir, &name);
    std::fs::File::open(dir)?.sync_all()
}

/// Removes the `.{name}.tmp.PID` files in `dir` whose process is gone: a run killed
/// between creating its temporary and renaming it left one for good, in the state
/// directory or beside /etc/fstab (a trial). A live pid's may be another run's write
/// in flight and is left.
fn remove_dead_temporaries(dir: &Path, name: &str) {
    let prefix = format!(".{name}.tmp.");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
        if !alive && e.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// `msg` with every `luksify CMD` it suggests given `--state-dir DIR`: followed
/// literally, the command must act on the same state directory.
pub fn with_state_dir(msg: &str, dir: &Path) -> String {
    let flag = format!(" --state-dir {}", dir.display());
    let mut out = msg.to_string();
    for sub in [
        "resume", "disable", "enable", "open", "close", "status", "check",
    ] {
        let pat = format!("`luksify {sub}");
        let mut from = 0;
        while let Some(i) = out[from..].find(&pat).map(|i| i + from) {
            let end = i + pat.len();
            let rest = &out[end..];
            // A whole word, and not already given a state directory; not `resume DEV`
            // either, which works on the device alone (clap refuses --state-dir there).
            if rest.starts_with(['`', ' '])
                && !rest.starts_with(" --state-dir")
                && !(sub == "resume" && rest.starts_with(" /"))
            {
                out.insert_str(end, &flag);
            }
            from = end;
        }
    }
    out
}

/// Where the state lives unless `--state-dir` or `LUKSIFY_STATE_DIR` says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/luksify";

/// [`with_state_dir`] unless `dir` is the default one (`$LUKSIFY_STATE_DIR`, else
/// /var/lib/luksify), which needs no flag.
pub fn in_state_dir(msg: &str, dir: &Path) -> String {
    in_state_dir_beside(msg, dir, &state_dir(None))
}

/// [`in_state_dir`] with `default` the directory commands reach with no flag. The status
/// file of a run under `$LUKSIFY_STATE_DIR` named it after a SIGTERM, while `status`
/// said the bare command after a SIGKILL (a trial): both now say it as the default.
fn in_state_dir_beside(msg: &str, dir: &Path, default: &Path) -> String {
    if dir == Path::new(DEFAULT_STATE_DIR) || dir == default {
        msg.to_string()
    } else {
        with_state_dir(msg, dir)
    }
}

pub fn save(dir: &Path, s: &Status) -> std::io::Result<()> {
    let mut s = s.clone();
    // An agent reading the file, or a user told by it, runs the command as written.
    s.progress_message = in_state_dir(&s.progress_message, dir);
    for v in &mut s.volumes {
        v.error = v.error.as_deref().map(|e| in_state_dir(e, dir));
    }
    // Kept in its own file (`record_refusal`), never here.
    s.refused = None;
    s.version = 1;
    s.updated_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut bytes = serde_json::to_vec_pretty(&s).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    write_atomic(&dir.join(STATUS_FILE), &bytes)
}

/// Holds the status in memory and writes it on every state change and at most
/// every [`PERIODIC_WRITE`] for progress-only changes.
#[derive(Debug)]
pub struct StatusWriter {
    dir: PathBuf,
    pub status: Status,
    last_write: Option<Instant>,
    /// Whether the last write had a measured rate: the first one is written at once.
    wrote_rate: bool,
    pub active: Option<usize>,
}

impl StatusWriter {
    pub fn open(dir: &Path) -> std::io::Result<StatusWriter> {
        let mut status = load(dir)?;
        // A run that goes on from an interrupted one starts from where its header
        // says, not from the file's stale figure: "interrupted at 34%" went to 4.5%
        // as `resume` began (a trial), and `disable` said "interrupted at 4%".
        if !status.run_process_running() {
            status.catch_up_with_headers(Some(dir));
        }
        Ok(StatusWriter {
            dir: dir.to_path_buf(),
            status,
            last_write: None,
            wrote_rate: false,
            active: None,
        })
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// Writes now (a state change).
    pub fn commit(&mut self) -> std::io::Result<()> {
        self.status.refresh(self.active);
        save(&self.dir, &self.status)?;
        // A run of this process has begun (`begin_run`): an earlier refusal is no
        // longer the latest word.
        if self.status.refused.is_some() && self.status.pid == Some(std::process::id()) {
            match std::fs::remove_file(self.dir.join(REFUSED_FILE)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => self.status.refused = None,
            }
        }
        self.last_write = Some(Instant::now());
        self.wrote_rate = self.has_rate();
        Ok(())
    }
    fn has_rate(&self) -> bool {
        self.status
            .volumes
            .iter()
            .any(|v| v.rate_bytes_per_s.is_some())
    }
    /// Writes if the last write is older than [`PERIODIC_WRITE`] (a progress tick), or
    /// if a rate was measured since (an agent saw none for two seconds while the
    /// terminal showed one; a trial).
    pub fn tick(&mut self) -> std::io::Result<()> {
        if self
            .last_write
            .is_none_or(|t| t.elapsed() >= PERIODIC_WRITE)
            || (self.has_rate() && !self.wrote_rate)
        {
            self.commit()
        } else {
            self.status.refresh(self.active);
            Ok(())
        }
    }
}

/// Progress arithmetic for one run: percent, rate and ETA. The rate counts from the
/// run's first report (a resumed walk starts where its header says, which the status
/// file, written every few seconds, may not have caught up with).
#[derive(Debug, Default)]
pub struct Rate {
    first: std::sync::OnceLock<(Instant, u64)>,
}

impl Rate {
    pub fn new() -> Rate {
        Rate::default()
    }
    /// Fills percent, rate and ETA of `v` from `done` of `total` bytes; until this run
    /// has measured a rate, none is shown (not the one of a run before it).
    pub fn apply(&self, v: &mut VolumeStatus, done: u64, total: u64) {
        let &(started, start_bytes) = self.first.get_or_init(|| (Instant::now(), done));
        v.bytes_done = done;
        v.bytes_total = total;
        v.percent = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        let secs = started.elapsed().as_secs_f64();
        let moved = done.saturating_sub(start_bytes);
        if secs > 0.5 && moved > 0 {
            let rate = moved as f64 / secs;
            v.rate_bytes_per_s = Some(rate);
            v.eta_seconds = Some((total.saturating_sub(done) as f64 / rate).ceil() as u64);
        } else {
            v.rate_bytes_per_s = None;
            v.eta_seconds = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first measured rate reaches the file with the tick that has it, not a
    /// periodic write later (an agent saw none for two seconds while the terminal showed
    /// one; a trial); once written, a tick within the period writes nothing new.
    #[test]
    fn the_first_measured_rate_is_written_at_once() {
        let d = tempfile::tempdir().unwrap();
        let mut sw = StatusWriter::open(d.path()).unwrap();
        sw.status
            .upsert(vol(VolumeState::EncryptionInProgress, 0.0));
        sw.commit().unwrap();
        sw.status.volumes[0].rate_bytes_per_s = Some(1000.0);
        sw.tick().unwrap();
        let back = load(d.path()).unwrap();
        assert_eq!(back.volumes[0].rate_bytes_per_s, Some(1000.0));
    }

    fn vol(state: VolumeState, pct: f64) -> VolumeStatus {
        VolumeStatus {
            device: PathBuf::from("/dev/x"),
            state,
            percent: pct,
            in_run: true,
            ..Default::default()
        }
    }

    fn agg(vols: &[VolumeStatus]) -> VolumeState {
        aggregate(&Status {
            volumes: vols.to_vec(),
            ..Default::default()
        })
    }

    #[test]
    fn messages_follow_the_agent() {
        let v = vec![
            vol(VolumeState::EncryptionInProgress, 37.6),
            vol(VolumeState::NotEncrypted, 0.0),
        ];
        assert_eq!(
            message(Operation::EnableEncryption, &v, Some(0)),
            "Encrypting data volume 1/2: 37%"
        );
        let mut r = v.clone();
        r[0].resumed = true;
        assert_eq!(
            message(Operation::Resume, &r, Some(0)),
            "Resuming encryption: 37%"
        );
        r[0].after_reboot = true;
        assert_eq!(
            message(Operation::Resume, &r, Some(0)),
            "Resuming encryption after reboot: 37%"
        );
        // Outside the walk, what the run does instead of a percentage that does not move
        // (trial A2; a resume said "Resuming decryption: 100%" while it grew and mounted
        // the filesystem, trial V10). Refreshed, a volume not in progress has no phase.
        let mut p = v.clone();
        p[0].phase = Some("deriving the key".into());
        assert_eq!(
            message(Operation::EnableEncryption, &p, Some(0)),
            "Encrypting data volume 1/2: deriving the key"
        );
        let mut d = vec![vol(VolumeState::DecryptionInProgress, 100.0)];
        d[0].resumed = true;
        d[0].phase = Some("growing and mounting the filesystem".into());
        assert_eq!(
            message(Operation::Resume, &d, Some(0)),
            "Resuming decryption: growing and mounting the filesystem"
        );
        let mut s = Status {
            volumes: vec![vol(VolumeState::Encrypted, 100.0)],
            ..Default::default()
        };
        s.volumes[0].phase = Some("mapping and mounting".into());
        s.refresh(None);
        assert_eq!(s.volumes[0].phase, None);
        let done = vec![
            vol(VolumeState::Encrypted, 100.0),
            vol(VolumeState::Encrypted, 100.0),
        ];
        assert_eq!(
            message(Operation::EnableEncryption, &done, None),
            "Encryption succeeded for data volumes"
        );
        let d = vec![vol(VolumeState::DecryptionInProgress, 50.0)];
        assert_eq!(
            message(Operation::DisableEncryption, &d, Some(0)),
            "Decrypting data volume 1/1: 50%"
        );
        let dd = vec![vol(VolumeState::NotEncrypted, 0.0)];
        assert_eq!(
            message(Operation::DisableEncryption, &dd, None),
            "Decryption succeeded"
        );
        // Between volumes, no volume active: one is one volume (a trial read "Decrypting
        // 1 data volumes"), two are volumes.
        let one = vec![vol(VolumeState::Encrypted, 0.0)];
        assert_eq!(
            message(Operation::DisableEncryption, &one, None),
            "Decrypting 1 data volume"
        );
        let two = vec![
            vol(VolumeState::NotEncrypted, 0.0),
            vol(VolumeState::NotEncrypted, 0.0),
        ];
        assert_eq!(
            message(Operation::EnableEncryption, &two, None),
            "Encrypting 2 data volumes"
        );
        assert_eq!(
            message(Operation::EnableEncryption, &two[..1], None),
            "Encrypting 1 data volume"
        );
        // One of three done, the next not begun: which one is next, not the run's start.
        let mut three = vec![vol(VolumeState::NotEncrypted, 0.0); 3];
        three[0].state = VolumeState::NotMounted;
        assert_eq!(
            message(Operation::EnableEncryption, &three, None),
            "Encrypting data volume 2/3: preparing"
        );
        let mut three = vec![vol(VolumeState::Encrypted, 0.0); 3];
        three[0].state = VolumeState::NotEncrypted;
        three[1].state = VolumeState::NotEncrypted;
        assert_eq!(
            message(Operation::DisableEncryption, &three, None),
            "Decrypting data volume 3/3: preparing"
        );
    }

    #[test]
    fn aggregate_prefers_in_progress_then_not_mounted() {
        use VolumeState::*;
        assert_eq!(agg(&[]), NotEncrypted);
        assert_eq!(
            agg(&[vol(Encrypted, 100.0), vol(EncryptionInProgress, 3.0)]),
            EncryptionInProgress
        );
        assert_eq!(
            agg(&[vol(Encrypted, 100.0), vol(NotMounted, 100.0)]),
            NotMounted
        );
        assert_eq!(agg(&[vol(Encrypted, 100.0)]), Encrypted);
        assert_eq!(
            agg(&[vol(Encrypted, 100.0), vol(NotEncrypted, 0.0)]),
            NotEncrypted
        );
        assert_eq!(agg(&[vol(DecryptionInProgress, 1.0)]), DecryptionInProgress);
    }

    /// A run that ended names what is left outside it: volumes another run left
    /// interrupted (a trial's `enable` of one volume said "Encryption succeeded" with two
    /// others killed mid-walk and unmounted), and after a decryption the volumes that
    /// stay encrypted.
    #[test]
    fn a_finished_run_names_interrupted_and_still_encrypted_volumes_outside_it() {
        let mut s = Status::default();
        let mut dev = |name: &str, st: VolumeState| {
            let mut v = vol(st, 50.0);
            v.device = PathBuf::from(name);
            s.upsert(v);
        };
        dev("/dev/f", VolumeState::EncryptionInProgress);
        dev("/dev/g", VolumeState::EncryptionInProgress);
        dev("/dev/e", VolumeState::Encrypted);
        dev("/dev/h", VolumeState::NotEncrypted);
        s.begin_run(Operation::EnableEncryption, 7, |v| {
            v.device == Path::new("/dev/h")
        });
        s.volume_mut(Path::new("/dev/h")).unwrap().state = VolumeState::Encrypted;
        s.pid = None;
        s.refresh(None);
        assert_eq!(
            s.progress_message,
            "Encryption succeeded for data volumes; 2 other data volumes are interrupted (/dev/f, /dev/g): `luksify resume` finishes them"
        );
        assert_eq!(s.data_volumes_encrypted, VolumeState::EncryptionInProgress);
        // While a volume is walked the message is about it alone.
        let mut live = s.clone();
        live.pid = Some(8);
        live.volume_mut(Path::new("/dev/h")).unwrap().state = VolumeState::EncryptionInProgress;
        let h = live
            .volumes
            .iter()
            .position(|v| v.device == Path::new("/dev/h"));
        live.refresh(h);
        assert_eq!(live.progress_message, "Encrypting data volume 1/1: 50%");
        // A disable of one volume: the others stay encrypted, one is interrupted.
        s.volume_mut(Path::new("/dev/g")).unwrap().state = VolumeState::Encrypted;
        s.begin_run(Operation::DisableEncryption, 9, |v| {
            v.device == Path::new("/dev/e")
        });
        s.volume_mut(Path::new("/dev/e")).unwrap().state = VolumeState::NotEncrypted;
        s.pid = None;
        s.refresh(None);
        assert_eq!(
            s.progress_message,
            "Decryption succeeded; 1 other data volume is interrupted (/dev/f): `luksify resume` finishes it; 2 other data volumes stay encrypted (/dev/g, /dev/h)"
        );
    }

    /// The aggregate after a disable of some volumes is that of the others: Encrypted
    /// while they all are (it read NotEncrypted, one of two volumes still encrypted; a
    /// trial), NotEncrypted once none is. A volume an enable left plain still counts
    /// against it: that encryption is not done.
    #[test]
    fn volumes_a_disable_left_plain_do_not_count_against_the_others() {
        let mut s = Status::default();
        for d in ["/dev/a", "/dev/b"] {
            let mut v = vol(VolumeState::Encrypted, 100.0);
            v.device = PathBuf::from(d);
            s.upsert(v);
        }
        s.begin_run(Operation::DisableEncryption, 9, |v| {
            v.device == Path::new("/dev/b")
        });
        s.volume_mut(Path::new("/dev/b")).unwrap().state = VolumeState::NotEncrypted;
        s.end_run();
        s.refresh(None);
        assert_eq!(s.data_volumes_encrypted, VolumeState::Encrypted);
        assert!(
            s.progress_message
                .contains("1 other data volume stays encrypted"),
            "{}",
            s.progress_message
        );
        s.begin_run(Operation::DisableEncryption, 10, |v| {
            v.device == Path::new("/dev/a")
        });
        s.volume_mut(Path::new("/dev/a")).unwrap().state = VolumeState::NotEncrypted;
        s.end_run();
        s.refresh(None);
        assert_eq!(s.data_volumes_encrypted, VolumeState::NotEncrypted);
        // An enable that encrypted /dev/a and left /dev/b plain (stopped, say).
        for d in ["/dev/a", "/dev/b"] {
            let mut v = vol(VolumeState::NotEncrypted, 0.0);
            v.device = PathBuf::from(d);
            s.upsert(v);
        }
        s.begin_run(Operation::EnableEncryption, 11, |_| true);
        s.volume_mut(Path::new("/dev/a")).unwrap().state = VolumeState::Encrypted;
        s.end_run();
        s.refresh(None);
        assert_eq!(s.data_volumes_encrypted, VolumeState::NotEncrypted);
    }

    #[test]
    fn a_run_counts_and_reports_only_its_own_volumes() {
        let mut s = Status::default();
        let mut old = vol(VolumeState::Encrypted, 100.0);
        old.device = PathBuf::from("/dev/old");
        let mut gone = vol(VolumeState::NotEncrypted, 100.0);
        gone.device = PathBuf::from("/dev/gone");
        gone.error = Some("an old failure".into());
        s.volumes = vec![old, gone];
        let mut a = vol(VolumeState::NotEncrypted, 0.0);
        a.device = PathBuf::from("/dev/a");
        let mut b = a.clone();
        b.device = PathBuf::from("/dev/b");
        s.upsert(a);
        s.upsert(b);
        s.begin_run(Operation::EnableEncryption, 42, |v| {
            v.device == Path::new("/dev/a") || v.device == Path::new("/dev/b")
        });
        // The volume an earlier run left plain is no longer luksify's.
        assert_eq!(s.volumes.len(), 3);
        assert!(s.volume_mut(Path::new("/dev/gone")).is_none());
        s.volumes[2].state = VolumeState::EncryptionInProgress;
        s.volumes[2].percent = 50.0;
        s.refresh(Some(2));
        assert_eq!(s.progress_message, "Encrypting data volume 2/2: 50%");
        // Between two volumes of a live run the aggregate stays in progress.
        s.volumes[1].state = VolumeState::Encrypted;
        s.volumes[2].state = VolumeState::NotEncrypted;
        s.refresh(None);
        assert_eq!(s.data_volumes_encrypted, VolumeState::EncryptionInProgress);
        s.volumes[2].state = VolumeState::Encrypted;
        s.pid = None;
        s.refresh(None);
        assert_eq!(s.data_volumes_encrypted, VolumeState::Encrypted);
        assert_eq!(s.progress_message, "Encryption succeeded for data volumes");
        // An earlier run's error does not outlive the next run that takes the volume.
        {
            let mut s = s.clone();
            let a = Path::new("/dev/a");
            s.volume_mut(a).unwrap().error = Some("no keyslot accepts this passphrase".into());
            s.begin_run(Operation::DisableEncryption, 45, |v| v.device == a);
            assert_eq!(s.volume_mut(a).unwrap().error, None);
        }
        // The run's volumes are counted in the order the run works them.
        {
            let mut s = s.clone();
            let (a, b) = (PathBuf::from("/dev/a"), PathBuf::from("/dev/b"));
            s.begin_run(Operation::EnableEncryption, 47, |v| {
                v.device == a || v.device == b
            });
            s.order_run(&[b.clone(), a.clone()]);
            let i = s.volumes.iter().position(|v| v.device == b).unwrap();
            s.volumes[i].state = VolumeState::EncryptionInProgress;
            s.refresh(Some(i));
            assert!(
                s.progress_message.starts_with("Encrypting data volume 1/2"),
                "{}",
                s.progress_message
            );
        }
        // A resume that took up nothing says what the volumes say, not "Encrypting 0".
        let before = s.clone();
        s.begin_run(Operation::Resume, 44, |_| false);
        s.pid = None;
        s.refresh(None);
        assert_eq!(s.progress_message, "Encryption succeeded for data volumes");
        let mut s = before;
        // A failed disable says so instead of "Decryption started".
        s.begin_run(Operation::DisableEncryption, 43, |v| {
            v.device == Path::new("/dev/a")
        });
        s.volumes[1].error = Some("failed to unmount /x".into());
        s.pid = None;
        s.refresh(None);
        assert_eq!(
            s.progress_message,
            "Decryption failed: failed to unmount /x; 2 other data volumes stay encrypted (/dev/old, /dev/b)"
        );
        assert_eq!(s.data_volumes_encrypted, VolumeState::Encrypted);
        // A resumed decryption says so while it runs and when it is done; "after
        // reboot" only when the run before it was in another boot.
        let same_boot = s.clone();
        s.run_boot = Some("an earlier boot".into());
        s.begin_run(Operation::Resume, 44, |v| v.device == Path::new("/dev/a"));
        s.volumes[1].error = None;
        s.volumes[1].state = VolumeState::DecryptionInProgress;
        s.volumes[1].resumed = true;
        s.volumes[1].percent = 60.0;
        s.refresh(Some(1));
        assert_eq!(s.progress_message, "Resuming decryption after reboot: 60%");
        assert_ne!(s.run_boot.as_deref(), Some("an earlier boot"));
        let mut t = same_boot;
        t.begin_run(Operation::Resume, 44, |v| v.device == Path::new("/dev/a"));
        t.volumes[1].state = VolumeState::DecryptionInProgress;
        t.volumes[1].resumed = true;
        t.volumes[1].percent = 60.0;
        t.refresh(Some(1));
        assert_eq!(t.progress_message, "Resuming decryption: 60%");
        // A status file from before boots were recorded: not said to follow a reboot.
        let mut u = t.clone();
        u.run_boot = None;
        u.begin_run(Operation::Resume, 45, |v| v.device == Path::new("/dev/a"));
        assert!(!u.volumes[1].after_reboot);
        assert!(u.run_boot.is_some());
        // One that cannot go on fails as a decryption (it said "Encryption failed").
        s.volumes[1].error = Some("cannot open /dev/a to resume".into());
        s.refresh(None);
        assert_eq!(
            s.progress_message,
            "Decryption failed: cannot open /dev/a to resume"
        );
        s.volumes[1].error = None;
        s.volumes[1].state = VolumeState::NotEncrypted;
        s.pid = None;
        s.refresh(None);
        assert_eq!(s.progress_message, "Decryption succeeded");
    }

    #[test]
    fn a_process_given_the_runs_pid_later_is_not_the_run() {
        let me = std::process::id();
        let run = |pid_start: Option<String>| {
            let mut s = Status {
                operation: Operation::EnableEncryption,
                pid: Some(me),
                pid_start,
                volumes: vec![vol(VolumeState::EncryptionInProgress, 37.2)],
                ..Default::default()
            };
            apply_live_state(&mut s, &[], None);
            s
        };
        // Recorded by this process: it runs.
        let s = run(crate::holders::process_identity(me));
        assert_eq!(s.pid, Some(me));
        assert!(s.run_process_running());
        // Recorded by another that had this pid (another boot, another start time).
        for other in ["00000000-0000-0000-0000-000000000000:1".to_string(), {
            let mine = crate::holders::process_identity(me).unwrap();
            let (boot, ticks) = mine.rsplit_once(':').unwrap();
            format!("{boot}:{}", ticks.parse::<u64>().unwrap() + 1)
        }] {
            let s = run(Some(other));
            assert_eq!(s.pid, None);
            assert_eq!(s.pid_start, None);
            assert!(
                s.progress_message.contains("its luksify process is gone"),
                "{}",
                s.progress_message
            );
        }
        // A file written before identities were recorded: the pid alone, as before.
        assert_eq!(run(None).pid, Some(me));
    }

    #[test]
    fn a_run_whose_process_is_gone_says_how_to_finish_it() {
        let mut v = vol(VolumeState::EncryptionInProgress, 37.2);
        v.device = PathBuf::from("/dev/a");
        v.rate_bytes_per_s = Some(16e6);
        v.eta_seconds = Some(65898);
        let mut s = Status {
            operation: Operation::EnableEncryption,
            // Beyond pid_max: no such process.
            pid: Some(u32::MAX / 2),
            volumes: vec![v],
            ..Default::default()
        };
        apply_live_state(&mut s, &[], None);
        assert_eq!(s.pid, None);
        // Nothing moves: no rate, no time left.
        assert_eq!(s.volumes[0].rate_bytes_per_s, None);
        assert_eq!(s.volumes[0].eta_seconds, None);
        assert_eq!(s.data_volumes_encrypted, VolumeState::EncryptionInProgress);
        assert_eq!(
            s.progress_message,
            "Encryption of /dev/a interrupted at 37% (its luksify process is gone); `luksify resume` finishes it"
        );
        // Killed as its walk ended: not "interrupted at 100%".
        let mut end = vol(VolumeState::DecryptionInProgress, 100.0);
        end.device = PathBuf::from("/dev/a");
        let mut s = Status {
            operation: Operation::DisableEncryption,
            pid: Some(u32::MAX / 2),
            volumes: vec![end],
            ..Default::default()
        };
        apply_live_state(&mut s, &[], None);
        assert_eq!(
            s.progress_message,
            "Decryption of /dev/a was interrupted as its walk ended (100%, its final header not yet written; its luksify process is gone); `luksify resume` finishes it"
        );
        // An older run's volume in progress too: the message names the latest run's.
        let mut old = vol(VolumeState::EncryptionInProgress, 12.0);
        old.device = PathBuf::from("/dev/old");
        old.in_run = false;
        let mut cur = vol(VolumeState::EncryptionInProgress, 55.0);
        cur.device = PathBuf::from("/dev/cur");
        cur.in_run = true;
        let mut s = Status {
            operation: Operation::EnableEncryption,
            pid: Some(u32::MAX / 2),
            volumes: vec![old, cur],
            ..Default::default()
        };
        apply_live_state(&mut s, &[], None);
        assert!(
            s.progress_message
                .starts_with("Encryption of /dev/cur interrupted at 55%"),
            "{}",
            s.progress_message
        );
    }

    #[test]
    fn suggested_commands_carry_the_state_dir_given() {
        let d = Path::new("/s");
        assert_eq!(
            with_state_dir(
                "stopped at 40% on request; run `luksify resume` to finish it, or `luksify close luksify-loop0`",
                d
            ),
            "stopped at 40% on request; run `luksify resume --state-dir /s` to finish it, or `luksify close --state-dir /s luksify-loop0`"
        );
        // Already given one (the run's own), another word, or no command: unchanged.
        for same in [
            "run `luksify resume --state-dir /t` to finish it",
            "`luksify resumed` is not a command",
            "luksify resume, unquoted",
            // The device form takes no state directory.
            "finish it first with `luksify resume /dev/loop3 --key-file F --header /h`",
        ] {
            assert_eq!(with_state_dir(same, d), same);
        }
    }

    #[test]
    fn restart_pending_forces_the_message() {
        let mut s = Status {
            os_volume_encrypted: VolumeState::VMRestartPending,
            ..Default::default()
        };
        s.refresh(None);
        assert_eq!(
            s.progress_message,
            "OS disk successfully encrypted, please reboot the VM"
        );
    }

    /// A temporary a killed writer left is removed by the next write of that file; a
    /// live process's, and another file's, are left.
    #[test]
    fn an_atomic_write_removes_temporaries_dead_writers_left() {
        let dir = tempfile::tempdir().unwrap();
        let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // No process can have a pid above pid_max; pid 1 always runs.
        let dead = dir.path().join(format!(".status.json.tmp.{}", pid_max + 1));
        let live = dir.path().join(".status.json.tmp.1");
        let other = dir.path().join(format!(".fstab.tmp.{}", pid_max + 1));
        let odd = dir.path().join(".status.json.tmp.x");
        for f in [&dead, &live, &other, &odd] {
            std::fs::write(f, b"{").unwrap();
        }
        write_atomic(&dir.path().join("status.json"), b"{}").unwrap();
        assert!(!dead.exists(), "a dead writer's temporary was kept");
        assert!(live.exists() && other.exists() && odd.exists());
        assert_eq!(
            std::fs::read(dir.path().join("status.json")).unwrap(),
            b"{}"
        );
    }

    /// The default directory (`$LUKSIFY_STATE_DIR` here) gets no flag, as `status`
    /// says its commands; another one does.
    #[test]
    fn commands_name_the_state_dir_unless_it_is_the_default() {
        let msg = "`luksify resume` finishes it";
        let env = Path::new("/var/tmp/agent");
        assert_eq!(in_state_dir_beside(msg, env, env), msg);
        assert_eq!(
            in_state_dir_beside(msg, Path::new(DEFAULT_STATE_DIR), env),
            msg
        );
        assert_eq!(
            in_state_dir_beside(msg, Path::new("/srv/other"), env),
            "`luksify resume --state-dir /srv/other` finishes it"
        );
    }

    #[test]
    fn save_load_roundtrip_is_atomic_and_renders_three_lines() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap().volumes.len(), 0);
        let mut w = StatusWriter::open(dir.path()).unwrap();
        w.status.operation = Operation::EnableEncryption;
        w.status
            .upsert(vol(VolumeState::EncryptionInProgress, 12.0));
        w.active = Some(0);
        w.commit().unwrap();
        let back = load(dir.path()).unwrap();
        assert_eq!(
            back.data_volumes_encrypted,
            VolumeState::EncryptionInProgress
        );
        assert_eq!(
            back.render_text(),
            "OsVolumeEncrypted : NotEncrypted\nDataVolumesEncrypted : EncryptionInProgress\n\
             ProgressMessage : Encrypting data volume 1/1: 12%\n"
        );
        // No temp file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from(STATUS_FILE)]);
        std::fs::write(dir.path().join(STATUS_FILE), b"{garbage").unwrap();
        assert!(load(dir.path())
            .unwrap_err()
            .to_string()
            .contains("not a luksify status file"));
    }

    #[test]
    fn rate_fills_percent_and_counts_from_the_first_report() {
        let r = Rate::new();
        // A resumed run: the status still has the killed run's rate.
        let mut v = VolumeStatus {
            rate_bytes_per_s: Some(20e6),
            eta_seconds: Some(9),
            ..Default::default()
        };
        r.apply(&mut v, 25, 100);
        assert_eq!((v.percent, v.bytes_done, v.bytes_total), (25.0, 25, 100));
        assert_eq!((v.rate_bytes_per_s, v.eta_seconds), (None, None));
        std::thread::sleep(std::time::Duration::from_millis(600));
        r.apply(&mut v, 75, 100);
        let rate = v.rate_bytes_per_s.unwrap();
        // 50 bytes since the first report, in 0.6 s or more.
        assert!(rate > 0.0 && rate <= 50.0 / 0.6, "{rate}");
        assert!(v.eta_seconds.unwrap() >= 1, "{v:?}");
    }
}
