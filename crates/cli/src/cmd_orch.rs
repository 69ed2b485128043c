//! Data-volume commands: check, enable, disable, resume, open, close, status.

use clap::Subcommand;
use luksify_orchestrator::error::Failure;
use luksify_orchestrator::{check, exit, lock, map, status};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use zeroize::Zeroizing;

/// Exit codes, shown in `--help` of each command that changes disks.
pub const EXIT_CODES: &str =
    "Exit codes: 0 done; 1 failed or refused (the message says what, why and how to fix, \
and when nothing was written), or bad usage; 2 a wrong passphrase (no keyslot accepts it); 3 the data-volume preflight (check, enable, \
disable) found blockers, nothing written; 4 another process holds the lock or the volume \
(a luksify run or mapping, cryptsetup, qemu, a mount of the device), or changed the header \
while a key command derived its key, nothing written: run it again; \
5 interrupted, `luksify resume` finishes it; 6 not supported on this machine";

/// The global lock and state directory, shared by every command that changes volumes.
#[derive(clap::Args, Debug)]
pub struct RunLock {
    /// Wait for another luksify run to finish instead of failing at once (exit 4)
    #[arg(long)]
    wait: bool,
    /// Where status.json, mapping records and the lock live (default $LUKSIFY_STATE_DIR or /var/lib/luksify)
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum OrchCmd {
    /// Preflight a device or mount point: mounts, nested mounts, processes holding it,
    /// swap, LVM, SELinux, memory, filesystem and room for the header. Writes nothing.
    ///
    /// Exit codes: 0 no blockers, 3 blockers found (a target that is neither a block
    /// device nor a mount point is one).
    Check {
        /// Block device (/dev/sdc), mount point (/data), or fstab's name for it
        /// (LABEL=data, UUID=..., PARTUUID=..., PARTLABEL=...)
        target: PathBuf,
        /// The state directory whose runs count (an interrupted one on the device is a
        /// blocker); the default one always counts too
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Check for a detached header (--header-dir): no shrink, no room needed on the device
        #[arg(long)]
        detached_header: bool,
        /// Machine-readable report (holders with pids)
        #[arg(long)]
        json: bool,
    },
    /// Map a LUKS2 volume: /dev/mapper/NAME through kernel dm-crypt where device-mapper
    /// exists, else a userspace view (FUSE file + loop device) kept by a daemon.
    #[command(after_help = EXIT_CODES)]
    Open {
        /// The encrypted device
        device: PathBuf,
        /// Mapping name (/dev/mapper/NAME)
        name: String,
        /// File whose whole content is the passphrase
        #[arg(long, short = 'd')]
        key_file: PathBuf,
        #[command(flatten)]
        part: crate::keyfile::KeyFilePart,
        /// Detached LUKS2 header file
        #[arg(long)]
        header: Option<PathBuf>,
        /// Use the userspace path even where dm-crypt exists
        #[arg(long)]
        userspace: bool,
        /// Only try this keyslot (also one at priority `ignore`), as `cryptsetup open
        /// --key-slot`
        #[arg(long, short = 'S')]
        key_slot: Option<u32>,
        #[command(flatten)]
        run: RunLock,
    },
    /// Remove a mapping made by `open` (refuses while it is mounted or held).
    #[command(after_help = EXIT_CODES)]
    Close {
        /// Mapping name given to `open` (/dev/mapper/NAME)
        name: String,
        #[command(flatten)]
        run: RunLock,
    },
    /// Encrypt data volumes in place: preflight, stop holders (only with --kill-holders),
    /// unmount, fsck + shrink (ext) or detached header (--header-dir), encrypt, map,
    /// remount with the same options, grow back, write crypttab and fstab.
    /// Without --volume, lists the data volumes it could take (never the OS disk).
    #[command(after_help = EXIT_CODES)]
    Enable {
        /// Only `data` is supported
        #[arg(long, default_value = "data")]
        volume_type: String,
        /// Device or mount point; repeat for several volumes
        #[arg(long = "volume")]
        volumes: Vec<PathBuf>,
        /// File whose whole content is the passphrase (also written to crypttab)
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Keep LUKS2 headers in this directory (needed for xfs; no shrink)
        #[arg(long)]
        header_dir: Option<PathBuf>,
        /// Stop processes holding the volumes (SIGTERM, then SIGKILL)
        #[arg(long)]
        kill_holders: bool,
        /// Map through the userspace path even where dm-crypt exists
        #[arg(long)]
        userspace: bool,
        /// Key derivation: argon2id (default, as cryptsetup), argon2i or pbkdf2 (any case)
        #[arg(long, default_value = "argon2id")]
        pbkdf: String,
        /// Fixed KDF iterations / argon2 time cost instead of benchmarking
        #[arg(long)]
        pbkdf_force_iterations: Option<u32>,
        /// Argon2 memory in KiB (default 1 GiB or half the RAM, as cryptsetup)
        #[arg(long)]
        pbkdf_memory: Option<u32>,
        /// Argon2 threads (default and most: 4, and this machine's CPUs, as cryptsetup)
        #[arg(long)]
        pbkdf_parallel: Option<u32>,
        #[command(flatten)]
        run: RunLock,
        /// With no --volume: list candidates as JSON
        #[arg(long)]
        json: bool,
    },
    /// Same as `luksify resume` without a DEVICE (kept for scripts that name it).
    #[command(after_help = EXIT_CODES, name = "resume-all", hide = true)]
    ResumeAll {
        /// Passphrase file; default: the one recorded for each volume
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Map through the userspace path (FUSE + loop) even where dm-crypt exists
        #[arg(long)]
        userspace: bool,
        #[command(flatten)]
        run: RunLock,
    },
    /// Decrypt data volumes back in place (all that luksify encrypted, or those given):
    /// unmount, close, decrypt, grow the filesystem, remount the plain device, restore
    /// fstab and crypttab.
    #[command(after_help = EXIT_CODES)]
    Disable {
        /// Device or mount point; default: every encrypted data volume in the status file
        #[arg(long = "volume")]
        volumes: Vec<PathBuf>,
        /// Passphrase file; default: the one recorded for each volume
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Stop processes holding the volumes (SIGTERM, then SIGKILL)
        #[arg(long)]
        kill_holders: bool,
        #[command(flatten)]
        run: RunLock,
    },
    /// Internal: the userspace mapping daemon started by `open` (key on stdin).
    #[command(name = "__serve-mapping", hide = true)]
    ServeMapping {
        #[arg(long)]
        device: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        header: Option<PathBuf>,
        #[arg(long)]
        state_dir: PathBuf,
    },
    /// Install dist/luksify-resume.service (built into the binary) as
    /// PREFIX/etc/systemd/system/luksify-resume.service, with ExecStart pointing at this
    /// binary. It does not run systemctl: `systemctl enable luksify-resume.service` next.
    #[command(name = "install-unit", after_help = EXIT_CODES)]
    InstallUnit {
        /// Root to install under (default /)
        #[arg(long, default_value = "/")]
        prefix: PathBuf,
        /// luksify path for ExecStart (default: this binary)
        #[arg(long)]
        exec: Option<PathBuf>,
        /// The state directory the unit resumes (default $LUKSIFY_STATE_DIR or
        /// /var/lib/luksify): the one your runs use, or the unit never sees them
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Print the encryption status: OsVolumeEncrypted, DataVolumesEncrypted, ProgressMessage.
    #[command(after_help = EXIT_CODES)]
    Status {
        /// Per-volume device, mapper, state, percent, bytes, rate and ETA as JSON
        #[arg(long)]
        json: bool,
        /// Where status.json and the lock live (default $LUKSIFY_STATE_DIR or /var/lib/luksify)
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

impl OrchCmd {
    /// Whether the command maps volumes, starting a mapping daemon with threads of its
    /// own.
    pub fn maps(&self) -> bool {
        matches!(
            self,
            OrchCmd::Open { .. }
                | OrchCmd::Enable { .. }
                | OrchCmd::ResumeAll { .. }
                | OrchCmd::Disable { .. }
        )
    }
    /// Whether the command is the mapping daemon (which answers its starter on stdout).
    pub fn is_daemon(&self) -> bool {
        matches!(self, OrchCmd::ServeMapping { .. })
    }
    /// Whether the command changes volumes (and so needs the threads of a run): those
    /// that map, and the mapping daemon.
    pub fn works(&self) -> bool {
        self.maps() || self.is_daemon()
    }
}

pub fn run(cmd: OrchCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        OrchCmd::Check {
            target,
            state_dir,
            detached_header,
            json,
        } => cmd_check(target, state_dir, detached_header, json),
        OrchCmd::Status { json, state_dir } => cmd_status(json, state_dir),
        OrchCmd::InstallUnit {
            prefix,
            exec,
            state_dir,
        } => finish(cmd_install_unit(&prefix, exec, state_dir)),
        OrchCmd::Open {
            device,
            name,
            key_file,
            part,
            header,
            userspace,
            key_slot,
            run: RunLock { wait, state_dir },
        } => finish_in(
            state_dir.clone(),
            cmd_open(
                &device,
                &name,
                (&key_file, part),
                (header.as_deref(), key_slot),
                userspace,
                wait,
                state_dir,
            ),
        ),
        OrchCmd::Close {
            name,
            run: RunLock { wait, state_dir },
        } => finish_in(state_dir.clone(), cmd_close(&name, wait, state_dir)),
        OrchCmd::Disable {
            volumes,
            key_file,
            kill_holders,
            run: RunLock { wait, state_dir },
        } => finish_in(
            state_dir.clone(),
            cmd_disable(volumes, key_file, kill_holders, wait, state_dir),
        ),
        OrchCmd::ServeMapping {
            device,
            name,
            header,
            state_dir,
        } => Ok(ExitCode::from(
            map::serve(&device, &name, header.as_deref(), &state_dir) as u8,
        )),
        OrchCmd::Enable {
            volume_type,
            volumes,
            key_file,
            header_dir,
            kill_holders,
            userspace,
            pbkdf,
            pbkdf_force_iterations,
            pbkdf_memory,
            pbkdf_parallel,
            run: RunLock { wait, state_dir },
            json,
        } => {
            match volume_type.to_ascii_lowercase().as_str() {
                "data" => {}
                "os" | "all" => {
                    errln!("luksify: --volume-type {volume_type} is not supported: luksify encrypts data volumes only, on any machine (the OS disk needs a reboot path luksify does not have); use --volume-type data");
                    return Ok(ExitCode::from(exit::UNSUPPORTED));
                }
                _ => {
                    errln!("luksify: --volume-type {volume_type} is not a volume type; give data (os and all are not supported)");
                    return Ok(ExitCode::from(exit::USAGE));
                }
            }
            if volumes.is_empty() {
                return list_candidates(
                    json,
                    &status::state_dir(state_dir.as_deref()),
                    state_dir.as_deref(),
                );
            }
            let Some(key_file) = key_file else {
                errln!("luksify: --key-file is required to encrypt; give a file whose whole content is the passphrase");
                return Ok(ExitCode::from(exit::USAGE));
            };
            let kdf = match kdf_request(&pbkdf, pbkdf_force_iterations)
                .map(|k| luksify_luks::kdf::KdfRequest {
                    memory_kib: pbkdf_memory,
                    cpus: pbkdf_parallel,
                    ..k
                })
                .and_then(|k| {
                    k.validate()
                        .map(|()| k)
                        .map_err(|e| Failure::new(exit::USAGE, e.to_string()))
                }) {
                Ok(k) => k,
                Err(f) => return finish(Err(f)),
            };
            // Absolute: crypttab's header= option and the status file name the header
            // files, and both are read from another working directory (at boot).
            let header_dir = header_dir.map(|d| std::path::absolute(&d).unwrap_or(d));
            finish_in(
                state_dir.clone(),
                cmd_enable(
                    volumes,
                    key_file,
                    header_dir,
                    kill_holders,
                    userspace,
                    kdf,
                    wait,
                    state_dir,
                ),
            )
        }
        OrchCmd::ResumeAll {
            key_file,
            userspace,
            run: RunLock { wait, state_dir },
        } => resume_all(key_file, userspace, wait, state_dir),
    }
}

/// `luksify resume` without a device: finish every interrupted data-volume run.
pub fn resume_all(
    key_file: Option<PathBuf>,
    userspace: bool,
    wait: bool,
    state_dir: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    finish_in(
        state_dir.clone(),
        cmd_resume(key_file, userspace, wait, state_dir),
    )
}

/// `finish`, with every `luksify CMD` the message suggests given the `--state-dir` this
/// run was given: followed literally, it must act on the same state directory.
fn finish_in(state_dir: Option<PathBuf>, r: Result<ExitCode, Failure>) -> anyhow::Result<ExitCode> {
    finish(r.map_err(|mut f| {
        f.message = named_in(&f.message, state_dir.as_deref());
        f
    }))
}

/// `msg` with every `luksify CMD` it suggests given the `--state-dir` this command was
/// given: followed literally, it must act on the same state directory. Without one the
/// directory is the default (`$LUKSIFY_STATE_DIR`, else /var/lib/luksify), which the
/// commands reach with no flag, as the status file's messages say them.
fn named_in(msg: &str, state_dir: Option<&Path>) -> String {
    match state_dir {
        Some(d) => with_state_dir(msg, d),
        None => msg.to_string(),
    }
}

use luksify_orchestrator::status::with_state_dir;

/// Prints a failure as one line and turns it into its exit code.
fn finish(r: Result<ExitCode, Failure>) -> anyhow::Result<ExitCode> {
    match r {
        Ok(c) => Ok(c),
        Err(f) => {
            crate::end_bar();
            errln!("luksify: {}", crate::keyfile::as_typed(&f.message));
            Ok(ExitCode::from(f.code))
        }
    }
}

/// Reads a key file exactly as cryptsetup's --key-file: the whole content (or standard
/// input for `-`) is the passphrase. `new` is set where the passphrase goes into a new
/// keyslot (enable), which refuses an empty file; unlocking takes the empty passphrase.
pub fn read_key_file(path: &Path, new: bool) -> Result<Zeroizing<Vec<u8>>, Failure> {
    read_key_file_part(path, new, Default::default())
}

/// [`read_key_file`] of the `part` of the file that `--keyfile-offset` and
/// `--keyfile-size` name.
fn read_key_file_part(
    path: &Path,
    new: bool,
    part: crate::keyfile::KeyFilePart,
) -> Result<Zeroizing<Vec<u8>>, Failure> {
    let key = if new {
        crate::keyfile::read_new_key_file(path, part)
    } else {
        crate::keyfile::read_key_file(path, part)
    };
    key.map_err(|e| Failure::failed(format!("{e:#}")))
}

fn cmd_open(
    device: &Path,
    name: &str,
    (key_file, part): (&Path, crate::keyfile::KeyFilePart),
    (header, key_slot): (Option<&Path>, Option<u32>),
    userspace: bool,
    wait: bool,
    state_dir: Option<PathBuf>,
) -> Result<ExitCode, Failure> {
    let dir = status::state_dir(state_dir.as_deref());
    // crypttab's way of naming the device (`UUID=...`), as `check` and `enable` take
    // it (a trial followed a crypttab line by hand: "No such file or directory").
    let tagged = luksify_orchestrator::check::device_of_tag(device).map_err(Failure::failed)?;
    let device = tagged.as_deref().unwrap_or(device);
    let key = read_key_file_part(key_file, false, part)?;
    let _lk = lock::GlobalLock::acquire(&dir, wait)?;
    let req = map::OpenRequest {
        device,
        name,
        header,
        force_userspace: userspace,
        state_dir: &dir,
        key_slot,
    };
    let rec = map::open(&req, &key)?;
    drop(key);
    match rec.backend {
        map::Backend::Kernel => outln!("{}", rec.mapped.display()),
        map::Backend::Userspace => outln!(
            "{} -> {} (userspace view, daemon pid {})",
            rec.mapped.display(),
            rec.loop_dev.as_deref().unwrap_or(Path::new("?")).display(),
            rec.daemon_pid.unwrap_or(0)
        ),
    }
    Ok(ExitCode::from(exit::OK))
}

fn cmd_close(name: &str, wait: bool, state_dir: Option<PathBuf>) -> Result<ExitCode, Failure> {
    let dir = status::state_dir(state_dir.as_deref());
    let _lk = lock::GlobalLock::acquire(&dir, wait)?;
    map::close(&dir, name)?;
    Ok(ExitCode::from(exit::OK))
}

fn cmd_check(
    target: PathBuf,
    state_dir: Option<PathBuf>,
    detached_header: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let opts = check::CheckOptions {
        detached_header,
        kill_holders: false,
        listing: false,
    };
    let report = match check::check(&target, opts) {
        Ok(mut r) => {
            let dir = status::state_dir(state_dir.as_deref());
            check::add_interrupted_run(&mut r, &dir);
            // The commands a fix names act on the state directory given.
            for p in &mut r.problems {
                p.fix = named_in(&p.fix, state_dir.as_deref());
            }
            r
        }
        Err(p) => {
            let dir = status::state_dir(state_dir.as_deref());
            let mut p = check::offline_volume_at(&target, &dir).unwrap_or(p);
            p.fix = named_in(&p.fix, state_dir.as_deref());
            if json {
                outln!(
                    "{}",
                    serde_json::json!({ "target": target, "ok": false, "problems": [p] })
                );
            } else {
                errln!("luksify: {}", p.one_line());
            }
            return Ok(ExitCode::from(exit::BLOCKED));
        }
    };
    if json {
        let mut v = serde_json::to_value(&report)?;
        v["ok"] = serde_json::Value::Bool(report.ok());
        outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        out!("{}", check::render_text(&report));
    }
    Ok(ExitCode::from(if report.ok() {
        exit::OK
    } else {
        exit::BLOCKED
    }))
}

/// The unit shipped in dist/, with ExecStart's program path as written there.
pub const RESUME_UNIT: &str = include_str!("../../../dist/luksify-resume.service");
const UNIT_EXEC_PATH: &str = "/usr/local/sbin/luksify";

/// The unit text with ExecStart running `exec`.
pub fn resume_unit_for(exec: &Path, state_dir: Option<&Path>) -> String {
    let unit = RESUME_UNIT.replace(
        &format!("ExecStart={UNIT_EXEC_PATH} "),
        &format!("ExecStart={} ", systemd_word(&exec.display().to_string())),
    );
    match state_dir {
        None => unit,
        // The mount dependency, the condition and the command name the directory.
        Some(d) => unit
            .replace(
                "RequiresMountsFor=/var/lib/luksify\n",
                &format!(
                    "RequiresMountsFor={}\n",
                    d.display().to_string().replace('%', "%%")
                ),
            )
            .replace(
                "ConditionPathExists=/var/lib/luksify/status.json",
                &format!(
                    "ConditionPathExists={}",
                    d.join("status.json")
                        .display()
                        .to_string()
                        .replace('%', "%%")
                ),
            )
            .replace(
                " resume --wait\n",
                &format!(
                    " resume --wait --state-dir {}\n",
                    systemd_word(&d.display().to_string())
                ),
            ),
    }
}

/// One word of a systemd command line: `%` doubled (specifiers), and a word with blanks,
/// quotes or backslashes double-quoted with C escapes, so that systemd does not split it.
fn systemd_word(w: &str) -> String {
    let w = w.replace('%', "%%");
    if !w.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '\\') {
        return w;
    }
    let mut q = String::from("\"");
    for c in w.chars() {
        match c {
            '"' | '\\' => {
                q.push('\\');
                q.push(c);
            }
            _ => q.push(c),
        }
    }
    q.push('"');
    q
}

fn cmd_install_unit(
    prefix: &Path,
    exec: Option<PathBuf>,
    state_dir: Option<PathBuf>,
) -> Result<ExitCode, Failure> {
    // As every other command takes it: `$LUKSIFY_STATE_DIR` too (a unit installed under
    // it named /var/lib/luksify, and never resumed the runs kept there; a trial). A
    // relative `--state-dir` is refused below rather than made absolute here.
    let state_dir = match state_dir {
        Some(d) => Some(d),
        None => Some(status::state_dir(None)).filter(|d| d != Path::new(status::DEFAULT_STATE_DIR)),
    };
    if let Some(d) = state_dir.as_ref().filter(|d| {
        !d.is_absolute()
            || d.to_string_lossy()
                .contains(|c: char| c.is_control() || c.is_whitespace())
    }) {
        return Err(Failure::new(
            exit::USAGE,
            format!(
                "--state-dir {:?}: give an absolute path without blanks or control characters (it goes into ConditionPathExists)",
                d.display().to_string()
            ),
        ));
    }
    let exec = match exec {
        Some(e) if !e.is_absolute() || e.to_string_lossy().contains(char::is_control) => {
            return Err(Failure::new(
                exit::USAGE,
                format!(
                    "--exec {:?}: give an absolute path without control characters (systemd runs ExecStart from /)",
                    e.display().to_string()
                ),
            ))
        }
        Some(e) => e,
        None => std::env::current_exe()
            .and_then(std::fs::canonicalize)
            .map_err(|e| {
                Failure::failed(format!(
                    "cannot tell where this luksify binary is ({e}); pass --exec PATH"
                ))
            })?,
    };
    let dir = prefix.join("etc/systemd/system");
    let path = dir.join("luksify-resume.service");
    status::create_dirs(&dir, 0o755)
        .and_then(|_| {
            status::write_atomic(
                &path,
                resume_unit_for(&exec, state_dir.as_deref()).as_bytes(),
            )
        })
        .map_err(|e| {
            Failure::failed(format!(
                "cannot write {} ({e}); run as root or pass --prefix",
                path.display()
            ))
        })?;
    outln!("{}", path.display());
    outln!("Enable it with: systemctl daemon-reload && systemctl enable luksify-resume.service");
    Ok(ExitCode::from(exit::OK))
}

fn cmd_status(json: bool, state_dir: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let dir = status::state_dir(state_dir.as_deref());
    // The answer stays the agent's (nothing done there: NotEncrypted), but a mistyped
    // directory gets a word on stderr (a trial's typo read as a confident answer).
    if !dir.exists() && dir != Path::new(status::DEFAULT_STATE_DIR) {
        note_no_state_dir(&dir, "");
    } else if dir.exists()
        && !dir.join(status::STATUS_FILE).exists()
        && !dir.join(status::REFUSED_FILE).exists()
        && dir != Path::new(status::DEFAULT_STATE_DIR)
    {
        // An empty directory read as a confident NotEncrypted with no word (a trial).
        errln!(
            "luksify: note: the state directory {} holds no status file: no luksify run has recorded anything there (is it the one `enable` was given?)",
            dir.display()
        );
    }
    let mut s = status::load(&dir)?;
    let mounts = luksify_orchestrator::mountinfo::read().unwrap_or_default();
    status::apply_live_state(&mut s, &mounts, Some(&dir));
    // A command the message suggests must act on this state directory when run as said.
    s.progress_message = named_in(&s.progress_message, state_dir.as_deref());
    if json {
        outln!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        out!("{}", s.render_text());
    }
    Ok(ExitCode::from(exit::OK))
}

fn kdf_request(
    kind: &str,
    iterations: Option<u32>,
) -> Result<luksify_luks::kdf::KdfRequest, Failure> {
    use luksify_luks::kdf::{KdfKind, KdfRequest};
    // In any case, as `format` and `encrypt` take it (and cryptsetup).
    let kind = match kind.to_ascii_lowercase().as_str() {
        "pbkdf2" => KdfKind::Pbkdf2,
        "argon2id" => KdfKind::Argon2id,
        "argon2i" => KdfKind::Argon2i,
        other => {
            return Err(Failure::new(
                exit::USAGE,
                format!("--pbkdf {other} is unknown; use argon2id, argon2i or pbkdf2"),
            ))
        }
    };
    Ok(KdfRequest {
        kind,
        force_iterations: iterations,
        ..KdfRequest::default()
    })
}

fn list_candidates(json: bool, state_dir: &Path, given: Option<&Path>) -> anyhow::Result<ExitCode> {
    let c = luksify_orchestrator::enable::candidates(state_dir);
    if json {
        outln!("{}", serde_json::to_string_pretty(&c)?);
        return Ok(ExitCode::from(exit::OK));
    }
    if c.is_empty() {
        outln!(
            "No candidate data volumes (the OS disk, LUKS, swap and LVM PVs are never offered)."
        );
    }
    for r in &c {
        let mp = r
            .primary_mount()
            .map(|m| m.mount_point.display().to_string())
            .unwrap_or_else(|| "not mounted".into());
        let ready = if luksify_orchestrator::enable::is_ready(r) {
            "ready"
        } else if luksify_orchestrator::enable::needs_only_header_dir(r) {
            "no room for a header on it: ready with --header-dir DIR"
        } else {
            "has blockers (luksify check)"
        };
        outln!(
            "{}  {}  {} MiB  {}  {}",
            r.device.display(),
            r.filesystem.fs_type,
            r.size_bytes >> 20,
            mp,
            ready
        );
    }
    let hint =
        "Encrypt with: `luksify enable --volume-type data --volume DEV_OR_MOUNTPOINT --key-file F`";
    // Followed literally, it must act on the same state directory as this listing.
    outln!("{}", named_in(hint, given));
    Ok(ExitCode::from(exit::OK))
}

static CANCEL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    CANCEL.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// SIGINT, SIGTERM and SIGHUP (a dropped ssh session) stop a run at its next safe point.
fn install_cancel_handler() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// Progress: a redrawn bar on a terminal, plain lines (every whole percent) otherwise.
fn reporter() -> impl Fn(&status::VolumeStatus, usize, usize) + Sync {
    // SAFETY: isatty only inspects the descriptor.
    let tty = unsafe { libc::isatty(2) } == 1;
    let last = std::sync::Mutex::new(-1i64);
    move |v: &status::VolumeStatus, i: usize, n: usize| {
        let pct = v.percent.floor() as i64;
        let mut l = last.lock().unwrap_or_else(|e| e.into_inner());
        let rate = v
            .rate_bytes_per_s
            .map(|r| format!("{:.0} MiB/s", r / 1048576.0))
            .unwrap_or_default();
        let eta = v
            .eta_seconds
            .map(|s| format!("ETA {}m{:02}s", s / 60, s % 60))
            .unwrap_or_default();
        if tty {
            let width = 30usize;
            let filled = (v.percent / 100.0 * width as f64) as usize;
            err!(
                "\r{} {}/{} [{}{}] {:>3}% {} {}   ",
                v.device.display(),
                i + 1,
                n,
                "#".repeat(filled.min(width)),
                " ".repeat(width - filled.min(width)),
                pct,
                rate,
                eta
            );
            crate::BAR_OPEN.store(true, std::sync::atomic::Ordering::SeqCst);
            if pct >= 100 {
                crate::end_bar();
            }
        } else if pct != *l {
            // Rate and ETA once measured, without blanks standing in for them.
            let more: String = [rate, eta]
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| format!(" {s}"))
                .collect();
            if v.resumed {
                errln!(
                    "Resuming {}{}: {}% ({}{more})",
                    if v.state == status::VolumeState::DecryptionInProgress {
                        "decryption"
                    } else {
                        "encryption"
                    },
                    if v.after_reboot { " after reboot" } else { "" },
                    pct,
                    v.device.display(),
                );
            } else {
                errln!(
                    "{}: volume {}/{}: {}%{more}",
                    v.device.display(),
                    i + 1,
                    n,
                    pct,
                );
            }
        }
        *l = pct;
    }
}

#[allow(clippy::too_many_arguments)]
fn cmd_enable(
    volumes: Vec<PathBuf>,
    key_file: PathBuf,
    header_dir: Option<PathBuf>,
    kill_holders: bool,
    userspace: bool,
    kdf: luksify_luks::kdf::KdfRequest,
    wait: bool,
    state_dir: Option<PathBuf>,
) -> Result<ExitCode, Failure> {
    let dir = status::state_dir(state_dir.as_deref());
    if key_file == Path::new("-") {
        // The path is recorded (crypttab, boot-time resume, disable): stdin is no path.
        return Err(Failure::new(
            exit::USAGE,
            "--key-file - (standard input) cannot be recorded: enable writes the key file's path to crypttab and the status file, for the boot-time resume and disable; give the path of a key file (nothing was changed)",
        ));
    }
    let key = read_key_file(&key_file, true)?;
    let _lk = lock::GlobalLock::acquire(&dir, wait)?;
    install_cancel_handler();
    let rep = reporter();
    let req = luksify_orchestrator::enable::EnableRequest {
        volumes,
        key_file,
        header_dir,
        kill_holders,
        state_dir: dir.clone(),
        force_userspace: userspace,
        kdf,
        cancel: &CANCEL,
        report: &rep,
        continues: Vec::new(),
    };
    let before = status_file_bytes(&dir);
    luksify_orchestrator::enable::enable(&req, &key)
        .inspect_err(|f| record_refusal(&dir, status::Operation::EnableEncryption, f, &before))?;
    print_status(&dir);
    Ok(ExitCode::from(exit::OK))
}

/// The status file's bytes (`None`: there is none).
fn status_file_bytes(dir: &Path) -> Option<Vec<u8>> {
    std::fs::read(dir.join(status::STATUS_FILE)).ok()
}

/// Records a preflight refusal (exit 3) in the status file, for an agent that polls
/// `status` rather than reading the refused command's output, where the run never
/// began (the status file is as it was, `before`). Not when the blocker is the state
/// directory itself (on a volume being encrypted). Under the global lock.
fn record_refusal(dir: &Path, op: status::Operation, f: &Failure, before: &Option<Vec<u8>>) {
    if f.code != exit::BLOCKED
        || status_file_bytes(dir) != *before
        || f.message.contains("BLOCKER: --state-dir")
    {
        return;
    }
    if let Err(e) = status::record_refusal(dir, op, &f.message, &f.blockers) {
        errln!("luksify: warning: cannot record the refusal in the status file: {e}");
    }
}

/// Prints the status as `luksify status` gives it (nothing if there is none yet): the
/// file with the live state applied (a trial's enable printed Encrypted where `status`
/// straight after said NotMounted, another volume's mapping being gone).
fn print_status(dir: &Path) {
    let Ok(mut s) = status::load(dir) else {
        return;
    };
    let mounts = luksify_orchestrator::mountinfo::read().unwrap_or_default();
    status::apply_live_state(&mut s, &mounts, Some(dir));
    out!("{}", s.render_text());
}

/// What `resume` and `disable` share: the optional key is read, the global lock taken and
/// the cancel handler installed, in that order, before `body` runs on a request that acts
/// on the volumes the status file (or a scan) names.
/// How `resume` or `disable` runs.
struct RecordedRun {
    userspace: bool,
    kill_holders: bool,
    wait: bool,
}

fn with_recorded_volumes(
    key_file: Option<PathBuf>,
    RecordedRun {
        userspace,
        kill_holders,
        wait,
    }: RecordedRun,
    state_dir: Option<PathBuf>,
    body: impl FnOnce(
        &luksify_orchestrator::enable::EnableRequest<'_>,
        Option<&[u8]>,
    ) -> Result<ExitCode, Failure>,
) -> Result<ExitCode, Failure> {
    let dir = status::state_dir(state_dir.as_deref());
    let key = match &key_file {
        Some(k) => Some(read_key_file(k, false)?),
        None => None,
    };
    let _lk = lock::GlobalLock::acquire(&dir, wait)?;
    install_cancel_handler();
    let rep = reporter();
    let req = luksify_orchestrator::enable::EnableRequest {
        volumes: vec![],
        key_file: key_file.unwrap_or_default(),
        header_dir: None,
        kill_holders,
        state_dir: dir,
        force_userspace: userspace,
        kdf: Default::default(),
        cancel: &CANCEL,
        report: &rep,
        continues: Vec::new(),
    };
    body(&req, key.as_ref().map(|k| k.as_slice()))
}

fn cmd_resume(
    key_file: Option<PathBuf>,
    userspace: bool,
    wait: bool,
    state_dir: Option<PathBuf>,
) -> Result<ExitCode, Failure> {
    let run = RecordedRun {
        userspace,
        kill_holders: false,
        wait,
    };
    let dir = status::state_dir(state_dir.as_deref());
    if key_file.is_some() && !dir.exists() && dir != Path::new(status::DEFAULT_STATE_DIR) {
        // With a key it may take up runs it finds on devices, which it records there.
        note_no_state_dir(&dir, "; it is made for the runs this resume finds");
    }
    if key_file.is_none() && !dir.exists() {
        // Nothing recorded there, and nothing made there: a mistyped directory read as
        // a confident "Nothing to resume." and was created (a trial).
        let left = report_unrecorded_runs(&dir, false);
        if dir != Path::new(status::DEFAULT_STATE_DIR) {
            note_no_state_dir(&dir, "");
        }
        match left {
            0 => outln!("Nothing to resume."),
            n => outln!("Nothing in a status file to resume; {n} interrupted run(s) found on devices: see above."),
        }
        return Ok(ExitCode::from(exit::OK));
    }
    with_recorded_volumes(key_file, run, state_dir, |req, key| {
        let left = report_unrecorded_runs(&req.state_dir, key.is_some());
        let r = luksify_orchestrator::enable::resume(req, key)?;
        match (r.finished, left + r.skipped) {
            (0, 0) => outln!("Nothing to resume."),
            // Unfinished runs remain, each named above with the command that finishes it.
            // (Exit 0 all the same: they are not this state directory's runs, and the
            // boot unit must not fail over another tool's reencryption.)
            (0, left) => outln!("Nothing in the status file to resume; {left} interrupted run(s) found on devices: see above."),
            _ => print_status(&req.state_dir),
        }
        Ok(ExitCode::from(exit::OK))
    })
}

/// The note `status` and `resume` give for a state directory that does not exist (a
/// typo read as a confident answer), then `tail`.
fn note_no_state_dir(dir: &Path, tail: &str) {
    errln!(
        "luksify: note: the state directory {} does not exist: no luksify run has used it (is it the one `enable` was given?){tail}",
        dir.display()
    );
}

/// Names the interrupted runs on this machine's devices that the status file in
/// `state_dir` does not record, with the command that finishes each; how many this
/// resume leaves (all without a key; decryptions always).
fn report_unrecorded_runs(state_dir: &Path, key_given: bool) -> usize {
    let mut left = 0;
    for f in luksify_orchestrator::enable::scan_in_progress(state_dir) {
        let dev = f.device.display();
        if f.decrypt || !key_given {
            left += 1;
        }
        if f.decrypt {
            errln!("luksify: {dev} has an interrupted decryption that luksify did not record; finish it with `luksify resume {dev} --key-file F` (or `cryptsetup reencrypt --resume-only`)");
        } else if key_given {
            // `resume` says which of these it takes up (the key opens them) and
            // which it leaves (it said "finishing it", then "left alone").
        } else {
            // Perhaps another agent's, in a state directory of its own (a trial's soak
            // read it as its own to take over): said so, and how to take it up if not.
            errln!("luksify: {dev} has an interrupted encryption this state directory does not record (another state directory's run, or a status file lost); if it is yours, finish it with `luksify resume --key-file F`");
        }
    }
    left
}

fn cmd_disable(
    volumes: Vec<PathBuf>,
    key_file: Option<PathBuf>,
    kill_holders: bool,
    wait: bool,
    state_dir: Option<PathBuf>,
) -> Result<ExitCode, Failure> {
    let run = RecordedRun {
        userspace: false,
        kill_holders,
        wait,
    };
    with_recorded_volumes(key_file, run, state_dir, |req, key| {
        let before = status_file_bytes(&req.state_dir);
        let done = luksify_orchestrator::enable::disable(req, key, &volumes).inspect_err(|f| {
            record_refusal(
                &req.state_dir,
                status::Operation::DisableEncryption,
                f,
                &before,
            )
        })?;
        if done == 0 {
            outln!("No encrypted data volumes to decrypt.");
        } else {
            print_status(&req.state_dir);
        }
        Ok(ExitCode::from(exit::OK))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use luksify_luks::kdf::KdfKind;

    /// `enable --pbkdf` in any case, as `format`, `encrypt` and cryptsetup take it
    /// (`PBKDF2` was "unknown" to `enable` alone; a trial).
    #[test]
    fn enable_takes_pbkdf_in_any_case() {
        for (given, want) in [
            ("pbkdf2", KdfKind::Pbkdf2),
            ("PBKDF2", KdfKind::Pbkdf2),
            ("Argon2id", KdfKind::Argon2id),
            ("ARGON2I", KdfKind::Argon2i),
        ] {
            assert_eq!(kdf_request(given, None).unwrap().kind, want, "{given}");
        }
        let e = kdf_request("scrypt", None).unwrap_err();
        assert_eq!(e.code, exit::USAGE);
        assert!(
            e.message.contains("--pbkdf scrypt is unknown"),
            "{}",
            e.message
        );
    }
}
