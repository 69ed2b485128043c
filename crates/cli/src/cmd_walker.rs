//! `luksify encrypt`, `luksify decrypt` and `luksify resume`: in-place
//! encryption and decryption under the LUKS2 reencryption journal (crates/walker).

use crate::cmd_luks::NewHeaderArgs;
use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use luksify_walker::device::DataDevice;
use luksify_walker::{
    Control, DecryptOptions, EncryptOptions, Outcome, Placement, ProgressInfo, Resilience, Tuning,
};
use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Subcommand, Debug)]
pub enum WalkCmd {
    /// Encrypt a device in place to LUKS2 (crash-safe, resumable; cryptsetup-compatible journal)
    #[command(after_help = crate::cmd_orch::EXIT_CODES)]
    Encrypt(Box<EncryptArgs>),
    /// Decrypt a LUKS2 volume in place back to plaintext (crash-safe, resumable)
    #[command(after_help = crate::cmd_orch::EXIT_CODES)]
    Decrypt(DecryptArgs),
    /// Continue interrupted work. With DEVICE: continue that device's encryption or
    /// decryption (luksify's, or `cryptsetup reencrypt`'s). Without DEVICE: finish every
    /// interrupted data-volume run in the state directory's status file (with
    /// --key-file, also those found in the headers of the block devices here that this
    /// key opens; others are left alone), then map, remount and record it (what
    /// luksify-resume.service runs at boot).
    #[command(after_help = crate::cmd_orch::EXIT_CODES)]
    Resume(ResumeArgs),
}

#[derive(Args, Debug)]
pub struct DecryptArgs {
    /// Block device or image file holding the LUKS2 volume
    device: PathBuf,
    /// Passphrase file (whole file, as cryptsetup --key-file)
    #[arg(long, short = 'd')]
    key_file: PathBuf,
    #[command(flatten)]
    part: crate::keyfile::KeyFilePart,
    /// Detached header of the volume; or, when the header is in front of the
    /// data, a NEW file the header moves to while the data moves back to offset 0
    #[arg(long)]
    header: Option<PathBuf>,
    /// Hotzone protection when the header is detached (data stays in place)
    #[arg(long, value_enum)]
    resilience: Option<ResilienceArg>,
    /// Hash of checksum resilience: any `--hash` of `format` (sha256, sha512, sha3-256,
    /// blake2b-512, whirlpool, ...)
    #[arg(long, default_value = "sha256")]
    resilience_hash: String,
    /// Only try this keyslot (also one at priority `ignore`), as `cryptsetup reencrypt
    /// --key-slot`
    #[arg(long, short = 'S')]
    key_slot: Option<u32>,
    #[command(flatten)]
    tuning: TuningArgs,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum ResilienceArg {
    Checksum,
    Journal,
    None,
}

#[derive(Args, Debug)]
pub struct TuningArgs {
    /// Bytes per read/write request (MiB)
    #[arg(long, default_value_t = 4, hide = true)]
    chunk_mib: usize,
    /// Largest hotzone between two header commits (KiB)
    #[arg(long, default_value_t = 16384, hide = true)]
    hotzone_kib: u64,
    /// Use the page cache instead of O_DIRECT
    #[arg(long)]
    buffered: bool,
    /// Worker threads (0: one per CPU, at most 4)
    #[arg(long, default_value_t = 0, hide = true)]
    workers: usize,
    /// Largest hotzone between two header commits, as cryptsetup's (e.g. 16M; at least 4K)
    #[arg(long, value_parser = parse_hotzone_size, value_name = "SIZE")]
    hotzone_size: Option<u64>,
    /// A progress line every SECS seconds on standard output, terminal or not (as
    /// cryptsetup's); without it, a line redrawn on a terminal only
    #[arg(long, value_name = "SECS")]
    progress_frequency: Option<u32>,
    /// Progress as one JSON object per line on standard output, with cryptsetup's fields
    /// (device, device_bytes, device_size, speed in bytes/s, eta_ms, time_ms; strings)
    #[arg(long)]
    progress_json: bool,
}

#[derive(Args, Debug)]
pub struct EncryptArgs {
    /// Block device or image file holding the plaintext
    device: PathBuf,
    /// Passphrase file (whole file, as cryptsetup --key-file)
    #[arg(long, short = 'd')]
    key_file: PathBuf,
    #[command(flatten)]
    part: crate::keyfile::KeyFilePart,
    /// Put the LUKS2 header in this (new) file; the data stays in place
    #[arg(long, conflicts_with = "reduce_device_size")]
    header: Option<PathBuf>,
    /// Header in front: the last SIZE bytes must be unused (e.g. 32M)
    #[arg(long, value_parser = parse_size)]
    reduce_device_size: Option<u64>,
    /// Hotzone protection with a detached header (default checksum); with
    /// --reduce-device-size the data shift itself protects the hotzone
    #[arg(long, value_enum, conflicts_with = "reduce_device_size")]
    resilience: Option<ResilienceArg>,
    /// Hash of checksum resilience: any `--hash` of `format` (sha256, sha512, sha3-256,
    /// blake2b-512, whirlpool, ...)
    #[arg(long, default_value = "sha256")]
    resilience_hash: String,
    /// Data offset in 512-byte sectors. Detached header: the data from there on is
    /// encrypted, the bytes before it stay as they are. With --reduce-device-size: at
    /// most half of it, and the reduction becomes twice the offset (as cryptsetup)
    #[arg(long, value_name = "SECTORS")]
    offset: Option<u64>,
    /// Cipher, key size, sector size, KDF, hash, label, UUID, header sizes: as `format`
    #[command(flatten)]
    new: NewHeaderArgs,
    #[command(flatten)]
    tuning: TuningArgs,
}

impl EncryptArgs {
    #[cfg(test)]
    pub fn hash(&self) -> &str {
        self.new.hash()
    }
}

#[derive(Args, Debug)]
pub struct ResumeArgs {
    /// Device of the interrupted run; omit to resume every data volume (see above)
    device: Option<PathBuf>,
    /// Passphrase file (whole file, as cryptsetup --key-file); without DEVICE, default:
    /// the one recorded for each volume
    #[arg(long, short = 'd')]
    key_file: Option<PathBuf>,
    /// (With DEVICE)
    #[command(flatten)]
    part: crate::keyfile::KeyFilePart,
    /// Detached header file of the interrupted run
    #[arg(long, requires = "device")]
    header: Option<PathBuf>,
    /// Without DEVICE: map through the userspace path (FUSE + loop) even if dm-crypt exists
    #[arg(long, conflicts_with = "device")]
    userspace: bool,
    /// Without DEVICE: wait for another luksify run instead of failing at once
    #[arg(long, conflicts_with = "device")]
    wait: bool,
    /// Without DEVICE: where the status file lives (default $LUKSIFY_STATE_DIR or /var/lib/luksify)
    #[arg(long, conflicts_with = "device")]
    state_dir: Option<PathBuf>,
    /// A resilience-none run cut mid-range: you restored data bytes START..END (the
    /// range resume named) from a backup taken before the run; they are walked again
    #[arg(long, requires = "device", value_name = "START..END", value_parser = parse_range)]
    restored: Option<(u64, u64)>,
    #[command(flatten)]
    tuning: TuningArgs,
}

/// `START..END` in bytes, as resume names a range: `(start, length)`.
fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("'{s}': give the range as START..END, in bytes"))?;
    let (a, b): (u64, u64) = (
        a.trim()
            .parse()
            .map_err(|_| format!("'{a}' is not a byte offset"))?,
        b.trim()
            .parse()
            .map_err(|_| format!("'{b}' is not a byte offset"))?,
    );
    if b <= a {
        return Err(format!("'{s}': END must be past START"));
    }
    Ok((a, b - a))
}

/// A size as cryptsetup reads one (`tools_string_to_size`): a number of bytes, or with
/// a unit K, M, G, T (1024-based; 1000-based with a `B` after it, `KiB` also 1024) or
/// S (512-byte sectors). A bare `B` suffix means bytes.
/// `--hotzone-size`: a size, whole 4096-byte blocks (cryptsetup refuses 0, `1k` and
/// 5000 too: "must be multiple of calculated zone alignment"; luksify took them).
fn parse_hotzone_size(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if n == 0 || !n.is_multiple_of(4096) {
        return Err(format!(
            "'{s}': the hotzone is whole 4096-byte blocks, at least one (e.g. 4K, 16M)"
        ));
    }
    Ok(n)
}

pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size"))?;
    let bad = || format!("'{s}': unknown unit (use K, M, G, T or S, optionally with B or iB)");
    let (letter, tail) = match unit.chars().next() {
        None => return Ok(n),
        Some(c) => (c.to_ascii_lowercase(), &unit[1..]),
    };
    if letter == 'b' && tail.is_empty() {
        return Ok(n);
    }
    let base: u64 = match tail {
        "" | "iB" => 1024,
        "B" => 1000,
        _ => return Err(bad()),
    };
    let m = match letter {
        's' => 512,
        'k' => base,
        'm' => base.pow(2),
        'g' => base.pow(3),
        't' => base.pow(4),
        _ => return Err(bad()),
    };
    n.checked_mul(m)
        .ok_or_else(|| format!("'{s}' is too large"))
}

fn resilience_hash(dev: &Path, name: &str) -> anyhow::Result<luksify_walker::Hash> {
    luksify_walker::Hash::parse(name)
        .map_err(|e| anyhow::anyhow!("{}: --resilience-hash: {e}", dev.display()))
}

fn tuning(t: &TuningArgs) -> Tuning {
    Tuning {
        chunk: (t.chunk_mib.max(1)) << 20,
        hotzone: t
            .hotzone_size
            .map_or(t.hotzone_kib << 10, |b| b)
            .max(4 << 10),
        workers: match t.workers {
            0 => Tuning::default().workers,
            n => n,
        },
    }
}

/// SIGINT/SIGTERM/SIGHUP set the flag; the walker stops at its next safe point. SIGHUP
/// too: a dropped ssh session killed the run outright, which for resilience `none`
/// leaves its hotzone to restore from a backup; now it stops as Ctrl-C does, resumable
/// (what it prints then goes nowhere, and is not an error).
fn install_cancel() -> anyhow::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(sig, Arc::clone(&flag))
            .context("cannot install signal handler")?;
    }
    Ok(flag)
}

/// How a run shows its progress: cryptsetup's lines and JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProgressStyle {
    /// A line redrawn with `\r` on a terminal (standard error), nothing otherwise.
    Bar,
    /// A line every so often on standard output (`--progress-frequency`).
    Lines,
    /// A JSON object per line on standard output (`--progress-json`).
    Json,
}

/// cryptsetup's time format: `02m05s`, `26h12m44s` past 90 minutes, `3 days` past 36 hours.
fn human_time(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    if s < 90 * 60 {
        format!("{:02}m{:02}s", s / 60, s % 60)
    } else if s < 36 * 3600 {
        format!("{:02}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{:02} days", s / 86400)
    }
}

/// Bytes in cryptsetup's whole units: MiB below 4 GiB, then GiB, TiB.
fn human_bytes(b: u64) -> String {
    if b < 1 << 32 {
        format!("{:4} MiB", b >> 20)
    } else if b < 1 << 42 {
        format!("{:4} GiB", b >> 30)
    } else {
        format!("{:4} TiB", b >> 40)
    }
}

/// A rate in cryptsetup's units.
fn human_speed(bps: f64) -> String {
    let (v, u) = if bps > (1u64 << 30) as f64 {
        (bps / (1u64 << 30) as f64, "GiB")
    } else if bps > (1u64 << 20) as f64 {
        (bps / (1u64 << 20) as f64, "MiB")
    } else if bps > 1024.0 {
        (bps / 1024.0, "KiB")
    } else {
        (bps, "B")
    };
    format!("speed {v:5.1} {u}/s")
}

/// One progress report as `style` shows it, `secs` into the run, at `bps` (this run's
/// bytes over its time): "Progress: 12.5%, ETA 00m10s, 128 MiB written, speed 50.0
/// MiB/s", "Finished, time ..." at the end, or the JSON object.
fn progress_text(
    style: ProgressStyle,
    dev: &Path,
    p: &ProgressInfo,
    secs: f64,
    bps: f64,
) -> String {
    let left = p.total.saturating_sub(p.done);
    let eta = if bps > 0.0 { left as f64 / bps } else { 0.0 };
    let done = p.done >= p.total;
    match style {
        ProgressStyle::Json => serde_json::json!({
            "device": dev.display().to_string(),
            "device_bytes": p.done.to_string(),
            "device_size": p.total.to_string(),
            "speed": (bps as u64).to_string(),
            "eta_ms": (if done { 0 } else { (eta * 1000.0) as u64 }).to_string(),
            "time_ms": ((secs * 1000.0) as u64).to_string(),
        })
        .to_string(),
        _ if done => format!(
            "Finished, time {}, {} written, {}",
            human_time(secs),
            human_bytes(p.done),
            human_speed(bps)
        ),
        _ => format!(
            "Progress: {:5.1}%, ETA {}, {} written, {}",
            if p.total > 0 {
                p.done as f64 * 100.0 / p.total as f64
            } else {
                100.0
            },
            human_time(eta),
            human_bytes(p.done),
            human_speed(bps)
        ),
    }
}

/// The walker's progress callback for `dev`, shown as the options say. The rate is this
/// run's bytes over its time since the first report (the first figure had been one
/// chunk's instant rate, 316 MiB/s, then 21; a trial); a line is shown at most every
/// `--progress-frequency` seconds (half a second on a terminal, as cryptsetup), and the
/// last one when the walk is done.
fn progress_printer(dev: &Path, t: &TuningArgs) -> impl Fn(ProgressInfo) + Sync {
    let style = if t.progress_json {
        ProgressStyle::Json
    } else if t.progress_frequency.is_some() {
        ProgressStyle::Lines
    } else {
        ProgressStyle::Bar
    };
    let tty = std::io::stderr().is_terminal();
    let every = Duration::from_millis(t.progress_frequency.map_or(500, |s| u64::from(s) * 1000));
    let dev = dev.to_path_buf();
    // (start, bytes done at the start, last shown)
    let state = std::sync::Mutex::new(None::<(Instant, u64, Instant)>);
    move |p: ProgressInfo| {
        if style == ProgressStyle::Bar && !tty {
            return;
        }
        let now = Instant::now();
        let mut g = state.lock().unwrap_or_else(|e| e.into_inner());
        let Some((start, base, last)) = g.as_mut() else {
            *g = Some((now, p.done, now));
            return;
        };
        let done = p.done >= p.total;
        if !done && now.duration_since(*last) < every {
            return;
        }
        *last = now;
        let secs = now.duration_since(*start).as_secs_f64();
        if secs <= 0.0 {
            return;
        }
        let bps = p.done.saturating_sub(*base) as f64 / secs;
        let text = progress_text(style, &dev, &p, secs, bps);
        match style {
            ProgressStyle::Bar => {
                // Cleared and redrawn (vt100 erase line), as cryptsetup's.
                err!("\x1b[2K\r{text}");
                crate::BAR_OPEN.store(true, std::sync::atomic::Ordering::SeqCst);
                if done {
                    crate::end_bar();
                }
            }
            _ => outln!("{text}"),
        }
    }
}

fn report(dev: &Path, o: Outcome, what: &str, resume_hint: String) -> ExitCode {
    crate::end_bar();
    match o {
        Outcome::Finished => {
            errln!("luksify: {}: {what} finished", dev.display());
            ExitCode::SUCCESS
        }
        Outcome::Interrupted(_) => {
            errln!(
                "luksify: {}: stopped at a safe point; continue with: {resume_hint}",
                dev.display()
            );
            // Same code as the orchestrator's "interrupted" (see EXIT_CODES).
            ExitCode::from(5)
        }
        Outcome::NotStarted => {
            errln!(
                "luksify: {}: stopped on request before the {what} wrote anything: the device is as it was and there is nothing to resume; run the same command again to start",
                dev.display()
            );
            ExitCode::from(5)
        }
    }
}

impl WalkCmd {
    /// Whether the command maps volumes (`resume` with no device finishes `enable`s),
    /// starting a mapping daemon with threads of its own.
    pub fn maps(&self) -> bool {
        matches!(self, WalkCmd::Resume(a) if a.device.is_none())
    }
}

pub fn run(cmd: WalkCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        WalkCmd::Encrypt(a) => encrypt(*a),
        WalkCmd::Decrypt(a) => decrypt(a),
        WalkCmd::Resume(a) => resume(a),
    }
}

fn decrypt(a: DecryptArgs) -> anyhow::Result<ExitCode> {
    let dev = &device_named(&a.device)?;
    let pass = crate::keyfile::read_key_file(&a.key_file, a.part)?;
    let data = open_data(dev, a.tuning.buffered)?;
    let opts = DecryptOptions {
        resilience: match a.resilience {
            None | Some(ResilienceArg::Checksum) => Resilience::Checksum,
            Some(ResilienceArg::Journal) => Resilience::Journal,
            Some(ResilienceArg::None) => Resilience::None,
        },
        checksum_hash: resilience_hash(dev, &a.resilience_hash)?,
        tuning: tuning(&a.tuning),
        key_slot: a.key_slot,
    };
    let cancel = install_cancel()?;
    let pp = progress_printer(dev, &a.tuning);
    let ctl = Control {
        progress: Some(&pp),
        cancel: Some(&cancel),
        ..Control::system()
    };
    // The header in front: the plaintext moves back to byte 0 and the header out.
    let in_front = is_luks_file(dev);
    // Header detached, and the file named is not there: say that, not "nothing to
    // decrypt" (which reads as "this device is plaintext").
    if let Some(h) = a.header.as_deref().filter(|h| !in_front && !h.exists()) {
        bail!(
            "{}: holds no LUKS header, and --header {} does not exist: name the volume's detached header file (nothing was written)",
            dev.display(),
            h.display()
        );
    }
    let outcome = match &a.header {
        Some(h) => {
            if luksify_walker::lock::same_storage(dev, h) {
                bail!(
                    "{}: --header {} is the data itself (the same file, a link to it, or a loop device over it); name a header file on other storage (nothing was written)",
                    dev.display(),
                    h.display()
                );
            }
            // The file may be new (header moving out of the device) or the
            // volume's detached header: open without truncating either way.
            refuse_odd_header_path(dev, h)?;
            let existed = std::fs::symlink_metadata(h).is_ok();
            // An existing file that is neither a LUKS header (the volume's detached one,
            // or one an interrupted decryption moved there) nor a cut first write of
            // ours is someone's data: the header moving out would overwrite it.
            if existed && !is_block_device(h) && !is_luks_file(h) && is_luks_file(dev) {
                let f = std::fs::File::open(h).with_context(|| {
                    format!("{}: cannot open header file {}", dev.display(), h.display())
                })?;
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                if len > 0
                    && !luksify_walker::is_cut_new_header(&f)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", dev.display()))?
                {
                    bail!(
                        "{}: --header {} already exists and holds other data (no LUKS header): the header moving out of the device would overwrite it; name a file that does not exist yet (nothing was written)",
                        dev.display(),
                        h.display()
                    );
                }
            }
            if is_block_device(h) {
                // A block device the header would move to must not hold anything else.
                refuse_used_header_device(dev, h, &open_header_device(dev, h)?, true)?;
            }
            let hf = header_for_writing(dev, h, &new_or_existing(), "open")?;
            let hf = header_disk(dev, h, hf)?;
            let r = luksify_walker::decrypt(&data, Some(&hf), pass, &opts, &ctl);
            let nothing = r.is_err() || matches!(r, Ok(Outcome::NotStarted));
            if !existed && nothing && !is_luks_file(h) {
                let _ = std::fs::remove_file(h);
            }
            r
        }
        None => luksify_walker::decrypt::<_, std::fs::File, _>(&data, None, pass, &opts, &ctl),
    };
    let hint = resume_hint(dev, &a.key_file, a.part, a.header.as_deref());
    let outcome = outcome.map_err(|e| walk_error(dev, a.header.as_deref(), e, &hint))?;
    let finished = matches!(outcome, Outcome::Finished);
    let code = report(dev, outcome, "decryption", hint);
    if let Some(h) = a.header.as_deref().filter(|_| finished && in_front) {
        errln!(
            "luksify: {}: the plaintext now starts at byte 0 (it moved back over the header); the header is in {}, no longer needed",
            dev.display(),
            h.display()
        );
    }
    // A detached header with a data offset decrypts in place there: say so, rather
    // than leave a filesystem at byte N to be found missing at byte 0.
    if let Some(off) = a
        .header
        .as_deref()
        .filter(|_| finished && !is_luks_file(dev))
        .and_then(detached_data_offset)
        .filter(|off| *off > 0)
    {
        errln!(
            "luksify: {}: the plaintext starts at byte {off}, the header's data offset; the {off} bytes before it were left as they were",
            dev.display()
        );
    }
    Ok(code)
}

/// The data offset a (finished, all linear) detached header gives its data.
fn detached_data_offset(h: &Path) -> Option<u64> {
    let f = std::fs::File::open(h).ok()?;
    let (hdr, _) = luksify_luks::luks2::Luks2Header::read(&f).ok()?;
    hdr.metadata
        .segments
        .values()
        .filter(|s| !s.is_backup())
        .filter_map(|s| match s {
            luksify_luks::luks2::json::Segment::Linear(l) => Some(l.offset),
            luksify_luks::luks2::json::Segment::Crypt(c) => Some(c.offset),
            _ => None,
        })
        .min()
}

fn encrypt(a: EncryptArgs) -> anyhow::Result<ExitCode> {
    let dev = &device_named(&a.device)?;
    crate::cmd_luks::check_offset_sectors(a.offset)?;
    if let Some(h) = a
        .header
        .as_deref()
        .filter(|h| luksify_walker::lock::same_storage(dev, h))
    {
        bail!(
            "{}: --header {} is the data itself (the same file, a link to it, or a loop device over it): the header would overwrite the data; give a header file on other storage, or use --reduce-device-size to put the header in front (nothing was written)",
            dev.display(),
            h.display()
        );
    }
    let pass = crate::keyfile::read_new_key_file(&a.key_file, a.part)?;
    let mut format = a
        .new
        .luks2()
        .map_err(|e| anyhow::anyhow!("{}: {e:#}", dev.display()))?;
    if let Some(h) = a.header.as_deref().filter(|h| is_block_device(h)) {
        // A header block device smaller than 16 MiB gets a keyslots area that fits it,
        // as cryptsetup sizes it.
        format.header_device_size =
            Some(header_device_bytes(dev, h, &open_header_device(dev, h)?)?);
    }
    if let Some(sectors) = a.offset {
        format.data_offset = Some(sectors.checked_mul(512).ok_or_else(|| {
            anyhow::anyhow!("{}: --offset {sectors} is too large", dev.display())
        })?);
    }
    let placement = match (&a.header, a.reduce_device_size) {
        (Some(_), None) => Placement::Detached {
            resilience: match a.resilience {
                None | Some(ResilienceArg::Checksum) => Resilience::Checksum,
                Some(ResilienceArg::Journal) => Resilience::Journal,
                Some(ResilienceArg::None) => Resilience::None,
            },
        },
        (None, Some(r)) => Placement::Shift { reduce: r },
        _ => {
            return Err(crate::Usage(format!(
                "{}: say where the header goes: --header FILE (detached) or --reduce-device-size SIZE (in front, last SIZE bytes unused)",
                dev.display()
            ))
            .into())
        }
    };
    // Where the data will start, for cryptsetup's warning on a decreased keyslots area.
    let (starts, adjusted) = match (placement, placement.with_offset(format.data_offset)) {
        (Placement::Shift { reduce: asked }, Ok(Placement::Shift { reduce })) => {
            (Some(reduce / 2), (reduce != asked).then_some(reduce))
        }
        _ => (format.data_offset, None),
    };
    let sized = luksify_luks::luks2::FormatOptions {
        data_offset: starts,
        detached: a.header.is_some(),
        metadata_size: format.metadata_size,
        keyslots_size: format.keyslots_size,
        header_device_size: format.header_device_size,
        ..Default::default()
    };
    let min_keyslots = luksify_walker::min_keyslots_size(format.key_size);
    // Said once every check has passed (a refusal stays one line), before the first write.
    let notices = || {
        if let Some(reduce) = adjusted {
            errln!(
                "luksify: {}: adjusting --reduce-device-size to {reduce} bytes, twice --offset {} (as cryptsetup): only the last {reduce} bytes need be unused",
                dev.display(),
                reduce / 1024
            );
        }
        crate::cmd_luks::warn_keyslots_size(&sized, min_keyslots);
    };
    let opts = EncryptOptions {
        placement,
        format,
        checksum_hash: resilience_hash(dev, &a.resilience_hash)?,
        tuning: tuning(&a.tuning),
    };
    let data = open_data(dev, a.tuning.buffered)?;
    let cancel = install_cancel()?;
    let pp = progress_printer(dev, &a.tuning);
    let ctl = Control {
        progress: Some(&pp),
        cancel: Some(&cancel),
        before_write: Some(&notices),
        ..Control::system()
    };
    let outcome = match &a.header {
        Some(h) => {
            let size = opts
                .format
                .header_size()
                .map_err(|e| anyhow::anyhow!("{}: {e}", dev.display()))?;
            // Only a file this run creates is ever removed again.
            let created = std::fs::symlink_metadata(h).is_err();
            let starts = opts.format.data_offset.unwrap_or(0);
            let hf = header_disk(dev, h, open_new_header(h, dev, size, created, starts)?)?;
            let r = luksify_walker::encrypt(&data, Some(&hf), pass, &opts, &ctl);
            // A failure before the header was complete wrote nothing to the data (the
            // header goes first): do not leave a file that blocks the next attempt. (A
            // header block device stays: removing it would delete its /dev node.)
            let nothing = r.is_err() || matches!(r, Ok(Outcome::NotStarted));
            if created && nothing && !is_block_device(h) && !is_luks_file(h) {
                let _ = std::fs::remove_file(h);
            }
            r
        }
        None => luksify_walker::encrypt::<_, std::fs::File, _>(&data, None, pass, &opts, &ctl),
    };
    let hint = resume_hint(dev, &a.key_file, a.part, a.header.as_deref());
    let outcome = outcome.map_err(|e| walk_error(dev, a.header.as_deref(), e, &hint))?;
    Ok(report(dev, outcome, "encryption", hint))
}

/// Opens the data device; a lock or a busy loop device explains itself.
/// The device a walker command names: `UUID=`, `LABEL=` (and the other tags crypttab and
/// fstab take) resolved as `open` and `enable` resolve them; a directory refused with
/// the device to give instead. Trial N2 got "cannot open: No such file or directory"
/// and "Is a directory" (a mount point) with no word of what the command wants.
fn device_named(dev: &Path) -> anyhow::Result<PathBuf> {
    if let Some(d) =
        luksify_orchestrator::check::device_of_tag(dev).map_err(|e| anyhow::anyhow!(e))?
    {
        return Ok(d);
    }
    if dev.is_dir() {
        bail!(
            "{} is a directory: give the device or image file itself (a mount point's device: `findmnt -no SOURCE {}`, unmounted first) (nothing was written)",
            dev.display(),
            dev.display()
        );
    }
    Ok(dev.to_path_buf())
}

fn open_data(dev: &Path, buffered: bool) -> anyhow::Result<DataDevice> {
    // The walker's own refusals carry a message; bare system errors get a hint.
    // The io::Error stays in the chain: its kind (WouldBlock: another process holds the
    // volume) decides the exit code.
    DataDevice::open(dev, buffered).map_err(|e| match e.get_ref() {
        Some(_) => anyhow::Error::new(e).context(dev.display().to_string()),
        None => anyhow::Error::new(e).context(format!("{}: cannot open", dev.display())),
    })
}

/// Refuses a header block device `h` that holds a known signature (a filesystem, and a
/// LUKS header unless `luks_ok`): the header would destroy it.
fn refuse_used_header_device(
    dev: &Path,
    h: &Path,
    f: &std::fs::File,
    luks_ok: bool,
) -> anyhow::Result<()> {
    match crate::cmd_luks::find_signature(f) {
        // A LUKS header there may be the only key to a run already under way on `dev`:
        // "wipe it first" led a trial to wipe it and encrypt the walked part again.
        Some(sig) if !luks_ok && sig.starts_with("LUKS") => {
            bail!("{}", existing_header_file(dev, h).replace("header file", "header device"))
        }
        Some(sig) if !(luks_ok && sig.starts_with("LUKS")) => bail!(
            "{}: header device {} holds a {sig} signature; the header would destroy it: wipe it first (wipefs -a) or choose another device",
            dev.display(),
            h.display()
        ),
        _ => Ok(()),
    }
}

/// Opens header block device `h` read-only, to look at it before anything is written.
fn open_header_device(dev: &Path, h: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::File::open(h).with_context(|| {
        format!(
            "{}: cannot open header device {}",
            dev.display(),
            h.display()
        )
    })
}

/// Opens header `h` (a file or a block device) for writing with `o`, or says why it
/// cannot be written and what to do, nothing written: an immutable file ("Operation not
/// permitted", a trial), a read-only filesystem, a read-only block device (whose open
/// for writing succeeds and whose every write fails).
fn header_for_writing(
    dev: &Path,
    h: &Path,
    o: &OpenOptions,
    verb: &str,
) -> anyhow::Result<std::fs::File> {
    let (d, hd) = (dev.display(), h.display());
    let f = o.open(h).map_err(|e| {
        let why = match e.raw_os_error() {
            Some(libc::EPERM | libc::EACCES) if immutable(h) => format!(
                ": it is immutable or append-only (`lsattr {hd}`): `chattr -i -a {hd}`, then run again (nothing was written)"
            ),
            Some(libc::EROFS) => ": it is on a read-only filesystem: mount that read-write, or name a header elsewhere (nothing was written)".to_string(),
            _ => String::new(),
        };
        anyhow::anyhow!("{d}: cannot {verb} header file {hd}: {e}{why}")
    })?;
    if is_block_device(h) {
        refuse_unwritable_header_device(dev, h, &f)?;
    }
    Ok(f)
}

/// Refuses header block device `h` (open as `f`) where its writes would fail or be lost:
/// read-only, or a loop device over a sparse file without room for it (as the data).
fn refuse_unwritable_header_device(dev: &Path, h: &Path, f: &std::fs::File) -> anyhow::Result<()> {
    let (d, hd) = (dev.display(), h.display());
    if luksify_walker::device::block_device_read_only(f).unwrap_or(false) {
        bail!(
            "{d}: header device {hd} is a read-only block device (a loop device attached with `losetup -r`, or set with `blockdev --setro`): make it writable (`blockdev --setrw {hd}`), then run again (nothing was written)"
        );
    }
    if let Some(short) = luksify_walker::space::short_of_room(f) {
        bail!("{d}: header device {hd}: {short}");
    }
    Ok(())
}

/// A header file opened read-write, created (0600) where it does not exist yet, never
/// truncated.
fn new_or_existing() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600);
    o
}

/// Whether file `p` carries the immutable or append-only attribute (`chattr +i`/`+a`),
/// under which even root's open for writing fails with EPERM.
fn immutable(p: &Path) -> bool {
    const FS_IOC_GETFLAGS: libc::c_ulong = 0x8008_6601;
    const FS_IMMUTABLE_FL: libc::c_long = 0x10;
    const FS_APPEND_FL: libc::c_long = 0x20;
    let Ok(f) = std::fs::File::open(p) else {
        return false;
    };
    let mut flags: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one `long` into `flags`, which outlives the call;
    // a file without attributes fails the ioctl without writing.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            FS_IOC_GETFLAGS as _,
            &mut flags as *mut libc::c_long,
        )
    };
    rc == 0 && flags & (FS_IMMUTABLE_FL | FS_APPEND_FL) != 0
}

/// The detached header `h`, open as `f`, as the walker takes it: with cryptsetup's
/// metadata lock around each header read and write, for a block device too.
fn header_disk(
    dev: &Path,
    h: &Path,
    f: std::fs::File,
) -> anyhow::Result<luksify_walker::lock::HeaderDisk> {
    luksify_walker::lock::HeaderDisk::new(f)
        .with_context(|| format!("{}: cannot inspect header {}", dev.display(), h.display()))
}

/// The size in bytes of header block device `h`, open as `f`.
fn header_device_bytes(dev: &Path, h: &Path, f: &std::fs::File) -> anyhow::Result<u64> {
    luksify_luks::io::Disk::size(f)
        .with_context(|| format!("{}: cannot read the size of {}", dev.display(), h.display()))
}

fn is_block_device(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
}

/// A walker error as one line. An I/O error (a full disk, a bad sector) that stopped a
/// run its header now records (`header`, else the device) also says how to go on.
fn walk_error(
    dev: &Path,
    header: Option<&Path>,
    e: luksify_walker::Error,
    hint: &str,
) -> anyhow::Error {
    if let luksify_walker::Error::Busy(m) = e {
        // Kept as the walker's Busy in the chain: exit 4 (a decrypt refused for a
        // header another run holds exited 1).
        let m = naming_header(&m, header);
        return anyhow::Error::new(luksify_walker::Error::Busy(m))
            .context(dev.display().to_string());
    }
    if let luksify_walker::Error::WrongPassphrase = e {
        // Kept in the chain: exit 2, as cryptsetup's (it exited 1).
        return anyhow::Error::new(e).context(dev.display().to_string());
    }
    let io = io_source(&e).map(|s| s.raw_os_error());
    let recorded = io.is_some() && is_luks_file(header.unwrap_or(dev));
    // An I/O error of the header's own storage: said of it, not of the data device (a
    // trial was sent to ddrescue the healthy data disk when its header device failed).
    let on_header = header.filter(|_| io.is_some() && header_op(&e));
    if let Some(h) = on_header.filter(|_| !recorded) {
        return anyhow::anyhow!(
            "{}: header {}: {}{}; the header's storage failed there (a bad sector, a failing disk, a loop device over a full filesystem: `dmesg` names it), before the run began: nothing on {} was written; fix it or name a header elsewhere, then run again",
            dev.display(),
            h.display(),
            naming_header(&e.to_string(), header),
            read_only_now(h),
            dev.display()
        );
    }
    if recorded {
        anyhow::anyhow!("{}: {}", dev.display(), walk_error_text(header, e, hint))
    } else if io == Some(Some(libc::EIO)) && header.is_some_and(unreadable) {
        // The header's own device failed: whether the run began cannot be told now (a
        // trial: "before the run began ... run again" over a header whose run had
        // encrypted 48 MiB; a wipe and a new run would have lost them).
        let resume = match (hint, header) {
            ("", Some(h)) => format!(
                "luksify resume {} --key-file F --header {}",
                dev.display(),
                h.display()
            ),
            _ => hint.to_string(),
        };
        anyhow::anyhow!(
            "{}: {}; the header's device failed there (`dmesg` names it) and cannot be read back, so whether the run began cannot be told: do not wipe or reuse it; once it reads again, `{resume}` continues a run it records (or says there is none)",
            dev.display(),
            naming_header(&e.to_string(), header)
        )
    } else if io == Some(Some(libc::EIO)) {
        // Before the run's header existed: a sector the device cannot read or write (a
        // trial's bad sector said only "read start marker: Input/output error").
        anyhow::anyhow!(
            "{}: {}; the device failed there (a bad sector or a failing disk: `dmesg` names it), before the run began: copy its data off (e.g. ddrescue) or repair it, then run again",
            dev.display(),
            naming_header(&e.to_string(), header)
        )
    } else {
        // A refused option (a cipher, an offset) before any LUKS header exists: the
        // header goes first, so nothing was written, which refusals say.
        let said = naming_header(&e.to_string(), header);
        // The resume it names is of this device and header ("finish it with `luksify
        // resume` first" left out --header; a trial).
        // Not --header when the run's header is the device's own (decrypt's --header
        // names the new file it would move the header to; "`luksify resume DEV --header
        // NEW`" then failed, "cannot open header file"; a trial).
        let said = match header.filter(|h| is_luks_file(h) || !is_luks_file(dev)) {
            None if header.is_some() => said.replace(
                "`luksify resume`",
                &format!("`luksify resume {} --key-file F`", dev.display()),
            ),
            Some(h) => said.replace(
                "`luksify resume`",
                &format!(
                    "`luksify resume {} --key-file F --header {}`",
                    dev.display(),
                    h.display()
                ),
            ),
            None => said,
        };
        let untouched = io.is_none()
            && !said.contains("nothing was written")
            && !is_luks_file(header.unwrap_or(dev));
        anyhow::anyhow!(
            "{}: {said}{}",
            dev.display(),
            if untouched {
                " (nothing was written)"
            } else {
                ""
            }
        )
    }
}

/// " (H is a read-only block device now: ...)" when header `h` is one.
fn read_only_now(h: &Path) -> String {
    let ro = is_block_device(h)
        && std::fs::File::open(h)
            .ok()
            .and_then(|f| luksify_walker::device::block_device_read_only(&f).ok())
            .unwrap_or(false);
    if ro {
        format!(
            " ({} is a read-only block device now: `blockdev --setrw {}`)",
            h.display(),
            h.display()
        )
    } else {
        String::new()
    }
}

/// Whether walker error `e` is of an operation on the header's storage (with a detached
/// header, every header read, write and flush; the data's are named otherwise).
fn header_op(e: &luksify_walker::Error) -> bool {
    match e {
        // The resilience area (checksums, journal) and the keyslots live in the
        // header's storage too; "read keyslot area" is the data's (a header in front
        // copied out), and left out. (A header device made read-only mid-run failed
        // first on "write resilience area" in CI, said of the data device.)
        luksify_walker::Error::Io { what, .. } => {
            what.contains("header")
                || what.contains("resilience area")
                || what == "flush keyslots"
                || what == "wipe keyslot area"
        }
        luksify_walker::Error::Luks(luksify_luks::Error::Io { .. }) => true,
        _ => false,
    }
}

/// The I/O error under a walker error: the data's, or the header's (a header write
/// that failed is as much the run's I/O error as a data write).
fn io_source(e: &luksify_walker::Error) -> Option<&std::io::Error> {
    match e {
        luksify_walker::Error::Io { source, .. } => Some(source),
        luksify_walker::Error::Luks(luksify_luks::Error::Io { source, .. }) => Some(source),
        _ => None,
    }
}

/// An I/O error that stopped a run its header records (in `header`, else on the data),
/// with how to go on: resume, or for a resilience-`none` run with bytes named hot, which
/// no resume finishes, what resume will name.
fn walk_error_text(header: Option<&Path>, e: luksify_walker::Error, hint: &str) -> String {
    // The header's own storage failed: said of it (with a detached header).
    if let Some(h) = header.filter(|_| header_op(&e)) {
        let ro = read_only_now(h);
        return format!(
            "header {}: {}{ro}",
            h.display(),
            walk_error_text(None, e, hint)
        );
    }
    if header.is_some_and(none_window) {
        format!(
            "{e}; the run is recorded in its header, but with resilience `none` the bytes it was writing may be part rewritten: once that is fixed, `{hint}` names them, to restore from a backup (a run with --resilience checksum or journal continues from such an error)"
        )
    } else {
        format!("{e}; the run is still recorded in its header: once that is fixed, continue with: {hint}")
    }
}

/// The walker does not know paths: `said` with the header file it speaks of named.
fn naming_header(said: &str, header: Option<&Path>) -> String {
    match header {
        Some(h) => said.replacen(
            "the header file",
            &format!("the header file {}", h.display()),
            1,
        ),
        None => said.to_string(),
    }
}

/// Whether the header in `p` records a resilience-`none` run with bytes named hot (which
/// no resume can finish).
fn none_window(p: &Path) -> bool {
    use luksify_luks::luks2::json::ReencryptArea;
    std::fs::File::open(p)
        .ok()
        .and_then(|f| luksify_luks::luks2::Luks2Header::read(&f).ok())
        .and_then(|(h, _)| luksify_luks::reencrypt::state(&h.metadata).ok().flatten())
        .is_some_and(|st| matches!(st.area, ReencryptArea::None { .. }) && st.progress.hot_len > 0)
}

/// Whether `p` exists but its first 4 KiB cannot be read for an I/O error (its device
/// failing); a header file not made yet is not that.
fn unreadable(p: &Path) -> bool {
    use std::os::unix::fs::FileExt as _;
    let mut b = [0u8; 4096];
    std::fs::File::open(p)
        .and_then(|f| f.read_exact_at(&mut b, 0))
        .is_err_and(|e| e.raw_os_error() == Some(libc::EIO))
}

fn is_luks_file(p: &Path) -> bool {
    std::fs::File::open(p)
        .ok()
        .and_then(|f| luksify_luks::probe(&f).ok().flatten())
        .is_some()
}

/// Creates the detached header file with its full size (`size` bytes) reserved up
/// front, so a full filesystem is reported before the device is touched.
///
/// A block device as the header is opened exclusively (O_EXCL: not mounted or held),
/// must carry no known signature (a LUKS header, a filesystem) and hold `size` bytes; it
/// is never created, reserved or removed.
fn open_new_header(
    h: &Path,
    dev: &Path,
    size: u64,
    created: bool,
    data_offset: u64,
) -> anyhow::Result<std::fs::File> {
    refuse_odd_header_path(dev, h)?;
    if is_block_device(h) {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_EXCL)
            .open(h)
            .with_context(|| {
                format!(
                    "{}: cannot open header device {} exclusively (is it mounted or in use?)",
                    dev.display(),
                    h.display()
                )
            })?;
        refuse_used_header_device(dev, h, &f, false)?;
        refuse_unwritable_header_device(dev, h, &f)?;
        let have = header_device_bytes(dev, h, &f)?;
        if have < size {
            bail!(
                "{}: header device {} holds {have} bytes, the header needs {size}: use a larger device or a smaller --luks2-keyslots-size",
                dev.display(),
                h.display()
            );
        }
        return Ok(f);
    }
    if std::fs::metadata(h).is_ok_and(|m| m.is_file() && m.len() > 0) {
        // Another run's header before anything else is said of what it holds (a run
        // still deriving its key has written nothing yet, which reads as a cut start).
        if let Ok(f) = OpenOptions::new().read(true).write(true).open(h) {
            claim_header_file(dev, h, &f)?;
        }
    }
    if let Ok(m) = std::fs::metadata(h) {
        if m.is_dir() {
            bail!(
                "{}: --header {} is a directory; name a new file in it for the header (e.g. {})",
                dev.display(),
                h.display(),
                h.join("luks-header").display()
            );
        }
        // A header file whose first header write was cut is ours and holds
        // nothing yet: the same command run again reuses it.
        let cut = || {
            std::fs::File::open(h)
                .ok()
                .and_then(|f| luksify_walker::is_cut_new_header(&f).ok())
                .unwrap_or(false)
        };
        if m.len() > 0 && !cut() {
            bail!("{}", existing_header_file(dev, h));
        }
        // Zeros (or our start marker) are also what a header file emptied after its run
        // began shows: taken as ours over data that no longer shows a filesystem, the
        // run encrypted the encrypted part a second time (trial V6). Over a device that
        // still starts with its filesystem nothing was walked: the file is reused. With
        // --offset the data, and so the filesystem, starts there (a walked device
        // still showed the untouched one at byte 0).
        let shows_a_filesystem = || {
            std::fs::File::open(dev)
                .ok()
                .and_then(|f| {
                    luksify_walker::fsprobe::probe_at(&f, data_offset)
                        .ok()
                        .flatten()
                })
                .is_some()
        };
        // An empty file too: one truncated after its run began (`: > FILE`) was taken
        // for a new one, and the walked part encrypted a second time (trial V7).
        if !shows_a_filesystem() {
            bail!(
                "{}: header file {} exists and holds no header, and the device shows no filesystem where its data starts: luksify cannot tell an `encrypt` stopped before its first header write (then nothing was written: remove the file and run the command again) from a run whose header file was emptied since (then restore it from a copy: encrypting again would encrypt the part already encrypted a second time); nothing was written",
                dev.display(),
                h.display()
            );
        }
    }
    let f = header_for_writing(dev, h, &new_or_existing(), "create")?;
    // Held from the first instant (the walker takes it again on this same open file),
    // so a second run naming the same new file is refused instead of sharing it.
    claim_header_file(dev, h, &f)?;
    if let Err(e) = luksify_walker::device::reserve(&f, size) {
        drop(f);
        if created {
            let _ = std::fs::remove_file(h);
        }
        let fix = if e.raw_os_error() == Some(libc::EFBIG) {
            "a file-size limit is in force: run it without one, `ulimit -f unlimited`"
        } else {
            "free space where the header goes"
        };
        bail!(
            "{}: cannot reserve {size} bytes for header file {}: {e} ({fix}; the device was not touched)",
            dev.display(), h.display()
        );
    }
    Ok(f)
}

/// The walker's claim on header file `h` (open as `f`), or exit 4 naming it: another
/// run or a `format` holds it.
fn claim_header_file(dev: &Path, h: &Path, f: &std::fs::File) -> anyhow::Result<()> {
    luksify_walker::lock::claim_header(f).map_err(|e| walk_error(dev, Some(h), e, ""))
}

/// Why `encrypt --header H` refuses an existing, non-empty `h`, by what it holds: an
/// interrupted run (resume it), a finished volume's header (not this run's), or other data.
fn existing_header_file(dev: &Path, h: &Path) -> String {
    let (d, hd) = (dev.display(), h.display());
    let hdr = std::fs::File::open(h)
        .ok()
        .and_then(|f| luksify_luks::luks2::Luks2Header::read(&f).ok())
        .map(|(hdr, _)| hdr);
    match hdr {
        Some(hdr) if luksify_luks::reencrypt::state(&hdr.metadata).ok().flatten().is_some() => format!(
            "{d}: header file {hd} already exists and holds an interrupted {}; to continue it use `luksify resume {d} --key-file F --header {hd}`, else name a file that does not exist yet (nothing was written)",
            run_kind(h)
        ),
        Some(hdr) => format!(
            "{d}: header file {hd} already exists and holds the header of a finished LUKS2 volume (UUID {}); if {d} is that volume it is encrypted already (`luksify open {d} NAME --key-file F --header {hd}`), else name a file that does not exist yet (nothing was written)",
            hdr.uuid
        ),
        None if is_luks_file(h) => format!(
            "{d}: header file {hd} already exists and holds a LUKS header; name a file that does not exist yet (nothing was written)"
        ),
        None => format!(
            "{d}: header file {hd} already exists and holds other data (no LUKS header); name a file that does not exist yet (nothing was written)"
        ),
    }
}

/// Refuses a `--header` path that names something no header can live in: a character
/// device (`/dev/null`), a FIFO (opening it would block), a socket, a directory.
fn refuse_odd_header_path(dev: &Path, h: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(m) = std::fs::metadata(h) else {
        return Ok(());
    };
    let t = m.file_type();
    let what = if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_dir() {
        bail!(
            "{}: --header {} is a directory; name a new file in it for the header (e.g. {}) (nothing was written)",
            dev.display(),
            h.display(),
            h.join("luks-header").display()
        )
    } else {
        return Ok(());
    };
    bail!(
        "{}: --header {} is {what}: name a regular file or a block device for the header (nothing was written)",
        dev.display(),
        h.display()
    )
}

fn resume_hint(
    dev: &Path,
    key: &Path,
    part: crate::keyfile::KeyFilePart,
    header: Option<&Path>,
) -> String {
    let mut s = format!(
        "luksify resume {} --key-file {}{}",
        dev.display(),
        key.display(),
        part.args()
    );
    if let Some(h) = header {
        s.push_str(&format!(" --header {}", h.display()));
    }
    s
}

fn resume(a: ResumeArgs) -> anyhow::Result<ExitCode> {
    let Some(dev) = &a.device.as_deref().map(device_named).transpose()? else {
        // The volumes' recorded key files are read whole, as crypttab names them.
        if a.part.is_set() {
            bail!("--keyfile-offset and --keyfile-size go with a DEVICE: `luksify resume` of the recorded volumes reads each recorded key file whole");
        }
        return crate::cmd_orch::resume_all(a.key_file, a.userspace, a.wait, a.state_dir);
    };
    let Some(key_file) = &a.key_file else {
        bail!(
            "{}: resuming a device needs --key-file F (the passphrase file)",
            dev.display()
        );
    };
    let pass = crate::keyfile::read_key_file(key_file, a.part)?;
    if let Some(h) = &a.header {
        refuse_odd_header_path(dev, h)?;
    }
    let data = open_data(dev, a.tuning.buffered)?;
    let cancel = install_cancel()?;
    let pp = progress_printer(dev, &a.tuning);
    let ctl = Control {
        progress: Some(&pp),
        cancel: Some(&cancel),
        restored: a.restored,
        ..Control::system()
    };
    // Said once the run has gone on (a refusal stays one line).
    let noted = std::sync::Mutex::new(None::<String>);
    let notice = |m: &str| {
        *noted.lock().unwrap_or_else(|e| e.into_inner()) = Some(m.to_string());
    };
    let ctl = Control {
        notice: Some(&notice),
        ..ctl
    };
    let t = tuning(&a.tuning);
    let hint = resume_hint(dev, key_file, a.part, a.header.as_deref());
    let outcome = match &a.header {
        Some(h) => {
            let hf = header_for_writing(dev, h, OpenOptions::new().read(true).write(true), "open")?;
            let hf = header_disk(dev, h, hf)?;
            // A header file without a readable header (empty, foreign, broken; the walker
            // has already told a first header write that was cut from those) is the
            // file's fault, not the device's: say so.
            luksify_walker::resume(&data, Some(&hf), pass, t, &ctl).map_err(|e| match e {
                luksify_walker::Error::Luks(
                    l @ (luksify_luks::Error::NotLuks
                    | luksify_luks::Error::NoValidHeader { .. }
                    | luksify_luks::Error::Corrupt(_)),
                ) => anyhow::anyhow!(
                    "header file {}: {l}; pass the header file this run was started with (nothing was written)",
                    h.display()
                ),
                luksify_walker::Error::Refused(m) => {
                    anyhow::anyhow!("{}", naming_header(&m, Some(h)))
                }
                e if io_source(&e).is_some() && is_luks_file(h) => {
                    anyhow::anyhow!("{}", walk_error_text(Some(h), e, &hint))
                }
                e => anyhow::Error::from(e),
            })
        }
        None => luksify_walker::resume::<_, std::fs::File, _>(&data, None, pass, t, &ctl)
            .map_err(|e| match e {
                e if io_source(&e).is_some() && is_luks_file(dev) => {
                    anyhow::anyhow!("{}", walk_error_text(None, e, &hint))
                }
                e => anyhow::Error::from(e),
            }),
    }
    // As context, so that the walker's error stays in the chain (a Busy one is exit 4).
    .with_context(|| dev.display().to_string())?;
    let notice = noted.lock().unwrap_or_else(|e| e.into_inner()).take();
    // Said in place of "decryption finished": nothing was walked now.
    let already = notice.as_deref() == Some(luksify_walker::ALREADY_DECRYPTED);
    if let Some(m) = notice {
        crate::end_bar();
        let warning = if already { "" } else { "warning: " };
        errln!("luksify: {}: {warning}{m}", dev.display());
    }
    // Read once the run is over (reading before would wait on another run's header lock,
    // where the walker refuses at once): what its header says it did.
    let what = run_kind(a.header.as_deref().unwrap_or(dev));
    let finished = matches!(outcome, Outcome::Finished);
    let code = if already && finished {
        ExitCode::SUCCESS
    } else {
        report(dev, outcome, what, hint)
    };
    if finished {
        orchestrated_rest(dev, a.state_dir.as_deref());
    }
    Ok(code)
}

/// After `resume DEV` finished a walk that an interrupted `enable` or `disable` of the
/// state directory began: what is left of that run (map, mount, tables) and which
/// command does it. `resume DEV` said only "encryption finished", and the volume stayed
/// unmapped with fstab naming it (trial U).
fn orchestrated_rest(dev: &Path, state_dir: Option<&Path>) {
    use luksify_orchestrator::status::{self, VolumeState};
    let dir = status::state_dir(state_dir);
    let Ok(st) = status::load(&dir) else {
        return;
    };
    let canon = std::fs::canonicalize(dev).unwrap_or_else(|_| dev.to_path_buf());
    let Some(v) = st
        .volumes
        .iter()
        .find(|v| std::fs::canonicalize(&v.device).unwrap_or_else(|_| v.device.clone()) == canon)
    else {
        return;
    };
    let what = match v.state {
        VolumeState::EncryptionInProgress => "an `enable`: map, mount",
        VolumeState::DecryptionInProgress => "a `disable`: remount",
        _ => return,
    };
    errln!(
        "{}",
        status::in_state_dir(
            &format!(
                "luksify: {} belongs to {what}, fstab and crypttab are still to do: `luksify resume` does them",
                dev.display()
            ),
            &dir
        )
    );
}

/// What the run recorded in header `h` does or did: "encryption" or "decryption" (the
/// run in progress, else a crypt segment or only linear ones), "run" if it cannot say.
fn run_kind(h: &Path) -> &'static str {
    use luksify_luks::luks2::json::{ReencryptMode, Segment};
    let Some(hdr) = std::fs::File::open(h)
        .ok()
        .and_then(|f| luksify_luks::luks2::Luks2Header::read(&f).ok())
        .map(|(hdr, _)| hdr)
    else {
        return "run";
    };
    match luksify_luks::reencrypt::state(&hdr.metadata).ok().flatten() {
        Some(st) if st.mode == ReencryptMode::Decrypt => "decryption",
        Some(_) => "encryption",
        None if hdr.data_segment().is_ok() => "encryption",
        None if hdr
            .metadata
            .segments
            .values()
            .all(|s| matches!(s, Segment::Linear(_))) =>
        {
            "decryption"
        }
        None => "run",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cryptsetup's units and formats, the rate and ETA from this run's bytes and time.
    #[test]
    fn progress_lines_are_cryptsetups() {
        assert!(parse_hotzone_size("0").is_err());
        assert!(parse_hotzone_size("1k").is_err());
        assert!(parse_hotzone_size("5000").is_err());
        assert_eq!(parse_hotzone_size("16M"), Ok(16 << 20));
        assert_eq!(parse_hotzone_size("4096"), Ok(4096));
        assert_eq!(human_time(125.9), "02m05s");
        assert_eq!(human_time(2.0 * 3600.0 + 61.0), "02h01m01s");
        assert_eq!(human_time(40.0 * 86400.0), "40 days");
        assert_eq!(human_bytes(3 << 20), "   3 MiB");
        assert_eq!(human_bytes(5 << 30), "   5 GiB");
        assert_eq!(human_speed(512.0), "speed 512.0 B/s");
        assert_eq!(human_speed(50.0 * 1048576.0), "speed  50.0 MiB/s");
        let dev = Path::new("/dev/loop9");
        let p = ProgressInfo {
            done: 256 << 20,
            total: 1 << 30,
            bytes_per_sec: 0,
        };
        let bps = (128u64 << 20) as f64 / 2.0;
        assert_eq!(
            progress_text(ProgressStyle::Lines, dev, &p, 2.0, bps),
            "Progress:  25.0%, ETA 00m12s,  256 MiB written, speed  64.0 MiB/s"
        );
        let j: serde_json::Value =
            serde_json::from_str(&progress_text(ProgressStyle::Json, dev, &p, 2.0, bps)).unwrap();
        assert_eq!(j["eta_ms"], "12000");
        assert_eq!(j["speed"], (64u64 << 20).to_string());
        assert_eq!(j["time_ms"], "2000");
        let end = ProgressInfo { done: 1 << 30, ..p };
        assert_eq!(
            progress_text(ProgressStyle::Bar, dev, &end, 65.0, bps),
            "Finished, time 01m05s, 1024 MiB written, speed  64.0 MiB/s"
        );
    }
}
