//! LUKS header commands, named and flagged like cryptsetup's: `format`, `dump`,
//! `test-passphrase`, `add-key`, `remove-key`, `change-key`.

use crate::keyfile::{read_key_file, read_new_key_file};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use luksify_luks::hash::Hash;
use luksify_luks::io::Disk;
use luksify_luks::kdf::{KdfKind, KdfRequest};
use luksify_luks::luks2::json::{Digest, Kdf, Keyslot, ReencryptArea, Segment, SegmentSize};
use luksify_luks::luks2::{self, Luks2Header};
use luksify_luks::volume::Volume;
use luksify_luks::{luks1, Error as LuksError, VolumeKey};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// cryptsetup's exit code for "no key available with this passphrase".
pub(crate) const EXIT_WRONG_PASSPHRASE: u8 = luksify_orchestrator::exit::WRONG_PASSPHRASE;

/// A header command's wrong passphrase: exits [`EXIT_WRONG_PASSPHRASE`] as
/// cryptsetup's luksAddKey, luksChangeKey, luksRemoveKey and luksDump do (they exited 1).
#[derive(Debug)]
pub(crate) struct WrongPassphrase(String);

impl std::fmt::Display for WrongPassphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WrongPassphrase {}

#[derive(Subcommand, Debug)]
pub enum LuksCmd {
    /// Create a LUKS2 (or LUKS1) header, like `cryptsetup luksFormat`
    #[command(visible_alias = "luksFormat", after_help = crate::cmd_orch::EXIT_CODES)]
    Format(Box<FormatArgs>),
    /// Print the header, like `cryptsetup luksDump`
    #[command(visible_alias = "luksDump", after_help = crate::cmd_orch::EXIT_CODES)]
    Dump(DumpArgs),
    /// Check a passphrase without opening the volume (exit 0 if it unlocks)
    #[command(after_help = crate::cmd_orch::EXIT_CODES)]
    TestPassphrase(TestArgs),
    /// Add a passphrase keyslot, like `cryptsetup luksAddKey`
    #[command(visible_alias = "luksAddKey", after_help = crate::cmd_orch::EXIT_CODES)]
    AddKey(AddKeyArgs),
    /// Remove the keyslot a passphrase opens, like `cryptsetup luksRemoveKey`
    #[command(visible_alias = "luksRemoveKey", after_help = crate::cmd_orch::EXIT_CODES)]
    RemoveKey(RemoveKeyArgs),
    /// Change a passphrase, like `cryptsetup luksChangeKey`
    #[command(visible_alias = "luksChangeKey", after_help = crate::cmd_orch::EXIT_CODES)]
    ChangeKey(ChangeKeyArgs),
    /// Exit 0 if the device (or --header) holds a valid LUKS header, else 1, like
    /// `cryptsetup isLuks`
    #[command(visible_alias = "isLuks", after_help = crate::cmd_orch::EXIT_CODES)]
    IsLuks(IsLuksArgs),
    /// Print the volume's UUID, like `cryptsetup luksUUID`
    #[command(visible_alias = "luksUUID", after_help = crate::cmd_orch::EXIT_CODES)]
    Uuid(UuidArgs),
}

#[derive(Args, Debug)]
pub struct IsLuksArgs {
    #[command(flatten)]
    vol: HeaderedDevice,
    /// Only this version: luks1 or luks2 (as cryptsetup's --type)
    #[arg(long = "type", value_name = "TYPE")]
    luks_type: Option<String>,
    /// Say why it is not (cryptsetup prints it with -v)
    #[arg(long, short = 'v')]
    verbose: bool,
}

#[derive(Args, Debug)]
pub struct UuidArgs {
    #[command(flatten)]
    vol: HeaderedDevice,
}

/// KDF options shared by commands that create keyslots.
#[derive(Args, Debug, Clone)]
pub struct KdfArgs {
    /// pbkdf2, argon2i or argon2id (default argon2id for LUKS2, pbkdf2 for LUKS1)
    #[arg(long)]
    pbkdf: Option<String>,
    /// Fixed iterations (pbkdf2) or time cost (argon2); skips the benchmark
    #[arg(long, value_name = "N")]
    pbkdf_force_iterations: Option<u32>,
    /// Argon2 memory in KiB (default 1 GiB, at most half of RAM)
    #[arg(long, value_name = "KIB")]
    pbkdf_memory: Option<u32>,
    /// Argon2 threads (1..4)
    #[arg(long, value_name = "N")]
    pbkdf_parallel: Option<u32>,
    /// Unlock time target in milliseconds (not with --pbkdf-force-iterations, as cryptsetup)
    #[arg(long, short = 'i', value_name = "MS", default_value_t = luksify_luks::kdf::DEFAULT_ITER_TIME_MS, conflicts_with = "pbkdf_force_iterations")]
    iter_time: u32,
    /// PBKDF2 hash (and, when formatting, the AF and digest hash)
    #[arg(long, short = 'h', default_value = "sha256")]
    hash: String,
}

impl NewHeaderArgs {
    /// The `--hash` given (for the command line's own tests).
    #[cfg(test)]
    pub fn hash(&self) -> &str {
        &self.kdf.hash
    }
}

impl FormatArgs {
    #[cfg(test)]
    pub fn hash(&self) -> &str {
        self.new.hash()
    }
}

impl KdfArgs {
    fn request(&self, luks1: bool) -> Result<KdfRequest> {
        // As cryptsetup: names in any case, and 0 for a cost is "the default".
        let kind = match &self.pbkdf {
            Some(p) => KdfKind::parse(&p.to_ascii_lowercase())?,
            None if luks1 => KdfKind::Pbkdf2,
            None => KdfKind::Argon2id,
        };
        if luks1 && kind != KdfKind::Pbkdf2 {
            bail!("LUKS1 keyslots only support --pbkdf pbkdf2");
        }
        let req = KdfRequest {
            kind,
            hash: Hash::parse(&self.hash)?,
            iter_time_ms: match self.iter_time {
                0 => luksify_luks::kdf::DEFAULT_ITER_TIME_MS,
                t => t,
            },
            force_iterations: self.pbkdf_force_iterations,
            memory_kib: self.pbkdf_memory.filter(|&m| m != 0),
            cpus: self.pbkdf_parallel,
        };
        req.validate()?;
        Ok(req)
    }
}

/// The options of a new header, shared by `format` and `encrypt` (cryptsetup's names).
#[derive(Args, Debug)]
pub struct NewHeaderArgs {
    /// Cipher spec
    #[arg(long, short = 'c', default_value = "aes-xts-plain64")]
    cipher: String,
    /// Volume key size in bits (256 or 512)
    #[arg(long, short = 's', default_value_t = 512)]
    key_size: u32,
    /// Encryption sector size (LUKS2 only): 512, 1024, 2048 or 4096. Default as
    /// cryptsetup: `format` takes the data device's (4096 for image files and for disks
    /// with 4096-byte logical or physical sectors, else 512), `encrypt` 512
    #[arg(long)]
    pub sector_size: Option<u32>,
    #[command(flatten)]
    kdf: KdfArgs,
    /// LUKS2 label
    #[arg(long)]
    label: Option<String>,
    /// LUKS2 subsystem
    #[arg(long)]
    subsystem: Option<String>,
    /// UUID to use instead of a random one
    #[arg(long)]
    uuid: Option<String>,
    /// Use the raw volume key from this file instead of a random one
    #[arg(long)]
    volume_key_file: Option<PathBuf>,
    /// LUKS2 metadata size (16k .. 4M, a power of two; units as cryptsetup: 64k, 1M)
    #[arg(long, value_name = "BYTES", value_parser = crate::cmd_walker::parse_size)]
    luks2_metadata_size: Option<u64>,
    /// LUKS2 keyslots area size (a multiple of 4096 up to 128M; units as cryptsetup)
    #[arg(long, value_name = "BYTES", value_parser = crate::cmd_walker::parse_size)]
    luks2_keyslots_size: Option<u64>,
}

impl NewHeaderArgs {
    /// The volume key from --volume-key-file, checked against --key-size.
    /// `--key-size 0` as cryptsetup reads it: its base default, 256 bits (given
    /// explicitly, it is not doubled for XTS as the unset default's 512 is).
    fn key_bits(&self) -> u32 {
        match self.key_size {
            0 => 256,
            k => k,
        }
    }

    fn volume_key(&self) -> Result<Option<VolumeKey>> {
        if self.key_bits() != 256 && self.key_bits() != 512 {
            bail!("--key-size {}: use 256 or 512", self.key_size);
        }
        let Some(p) = &self.volume_key_file else {
            return Ok(None);
        };
        let k = read_key_file(p, Default::default())?;
        if k.len() * 8 != self.key_bits() as usize {
            bail!(
                "{}: volume key file holds {} bits, --key-size is {}",
                p.display(),
                k.len() * 8,
                self.key_bits()
            );
        }
        Ok(Some(VolumeKey::new(k)))
    }

    /// LUKS2 format options, every option checked; where the data starts
    /// (`data_offset`, `detached`) is the caller's.
    pub fn luks2(&self) -> Result<luks2::FormatOptions> {
        self.with_kdf(self.kdf.request(false)?)
    }

    fn with_kdf(&self, kdf: KdfRequest) -> Result<luks2::FormatOptions> {
        // A sector size no tool supports is said so first (3000 was "not a whole number
        // of 3000-byte sectors", or a --reduce-device-size complaint; a trial).
        if let Some(s) = self
            .sector_size
            .filter(|s| ![512, 1024, 2048, 4096].contains(s))
        {
            bail!("--sector-size {s}: use 512, 1024, 2048 or 4096 (nothing was written)");
        }
        // 0 is "the default", as cryptsetup reads these sizes.
        let keyslots_size = self.luks2_keyslots_size.filter(|&k| k != 0);
        if let Some(k) = keyslots_size {
            let max = luks2::validate::MAX_KEYSLOTS_SIZE;
            if k % 4096 != 0 || k > max {
                bail!("--luks2-keyslots-size {k}: use a multiple of 4096 up to {max} (128 MiB)");
            }
        }
        Ok(luks2::FormatOptions {
            cipher: self.cipher.clone(),
            key_size: self.key_bits() as usize / 8,
            sector_size: self.sector_size.unwrap_or(512),
            hash: Hash::parse(&self.kdf.hash)?,
            kdf,
            label: self.label.clone().unwrap_or_default(),
            subsystem: self.subsystem.clone().unwrap_or_default(),
            uuid: self.uuid.clone(),
            metadata_size: self
                .luks2_metadata_size
                .filter(|&m| m != 0)
                .unwrap_or(luks2::DEFAULT_METADATA_SIZE),
            keyslots_size,
            data_offset: None,
            detached: false,
            volume_key: self.volume_key()?,
            segment_size: None,
            ..Default::default()
        })
    }
}

/// cryptsetup's warnings about the keyslots area a header gets, in its order: a small
/// area (room for few keyslots), then an explicit `--luks2-keyslots-size` the data offset
/// decreased (the header is written with the smaller area). None for an area under
/// `needed` bytes: the command refuses that in one line of its own.
pub fn warn_keyslots_size(opts: &luks2::FormatOptions, needed: u64) {
    let Ok(got) = opts.keyslots_size_or_default() else {
        return;
    };
    if got < needed {
        return;
    }
    if got < luks2::SMALL_KEYSLOTS_SIZE {
        eprintln!(
            "WARNING: keyslots area ({got} bytes) is very small, available LUKS2 keyslot count is very limited."
        );
    }
    if opts.keyslots_size.is_some_and(|asked| asked != got) {
        eprintln!("WARNING: LUKS2 keyslots area size changed to {got} bytes.");
    }
}

#[derive(Args, Debug)]
pub struct FormatArgs {
    /// Device or image file to format
    device: PathBuf,
    /// File whose whole contents are the passphrase (`-` = stdin)
    #[arg(long, short = 'd')]
    key_file: PathBuf,
    #[command(flatten)]
    part: crate::keyfile::KeyFilePart,
    /// luks2 or luks1
    #[arg(long = "type", default_value = "luks2")]
    luks_type: String,
    #[command(flatten)]
    new: NewHeaderArgs,
    /// Detached header file (created if missing); the device is not written
    #[arg(long)]
    header: Option<PathBuf>,
    /// Data offset in 512-byte sectors
    #[arg(long, value_name = "SECTORS")]
    offset: Option<u64>,
    /// Align the data to this many 512-byte sectors (default: the device's I/O topology,
    /// else 1 MiB); with --header, the data offset itself
    #[arg(long, value_name = "SECTORS", conflicts_with = "offset")]
    align_payload: Option<u32>,
    /// Do not ask: overwrite an existing LUKS header or filesystem signature
    #[arg(long, short = 'q')]
    batch_mode: bool,
    /// The keyslot the passphrase goes to (LUKS2: 0-31; LUKS1: 0), as `luksFormat --key-slot`
    #[arg(long, short = 'S')]
    key_slot: Option<u32>,
}

/// The device a header-reading command names, and where its header lives.
#[derive(Args, Debug)]
pub struct HeaderedDevice {
    /// LUKS device or image file (with --header: the data device)
    device: PathBuf,
    /// Detached LUKS2 header file: the header lives there, not on the device
    #[arg(long)]
    header: Option<PathBuf>,
}

impl HeaderedDevice {
    /// Where the header lives: the detached header file, or the device.
    fn meta(&self) -> &Path {
        self.header.as_deref().unwrap_or(&self.device)
    }
}

#[derive(Args, Debug)]
pub struct DumpArgs {
    #[command(flatten)]
    vol: HeaderedDevice,
    /// Print the LUKS2 JSON metadata (LUKS1: the header as JSON)
    #[arg(long, conflicts_with = "dump_volume_key")]
    json: bool,
    /// Unlock and write the raw volume key to --volume-key-file (never printed)
    #[arg(long, requires_all = ["key_file", "volume_key_file"])]
    dump_volume_key: bool,
    /// Passphrase file that unlocks the volume (whole file, as cryptsetup --key-file)
    #[arg(long, short = 'd')]
    key_file: Option<PathBuf>,
    #[command(flatten)]
    part: crate::keyfile::KeyFilePart,
    /// Where --dump-volume-key writes the key (must not exist)
    #[arg(long)]
    volume_key_file: Option<PathBuf>,
    /// With --dump-volume-key: only try this keyslot
    #[arg(long, short = 'S')]
    key_slot: Option<u32>,
}

#[derive(Args, Debug)]
pub struct TestArgs {
    #[command(flatten)]
    vol: HeaderedDevice,
    /// Passphrase file to check (whole file, as cryptsetup --key-file)
    #[arg(long, short = 'd')]
    key_file: PathBuf,
    #[command(flatten)]
    part: crate::keyfile::KeyFilePart,
    /// Only try this keyslot
    #[arg(long, short = 'S')]
    key_slot: Option<u32>,
}

#[derive(Args, Debug)]
pub struct AddKeyArgs {
    #[command(flatten)]
    vol: HeaderedDevice,
    /// An existing passphrase
    #[arg(long, short = 'd')]
    key_file: PathBuf,
    /// The passphrase to add
    #[arg(long)]
    new_key_file: PathBuf,
    #[command(flatten)]
    part: crate::keyfile::KeyFilePart,
    #[command(flatten)]
    new_part: crate::keyfile::NewKeyFilePart,
    /// Keyslot for the new passphrase (default: first free)
    #[arg(long, short = 'S')]
    key_slot: Option<u32>,
    #[command(flatten)]
    kdf: KdfArgs,
}

#[derive(Args, Debug)]
pub struct RemoveKeyArgs {
    #[command(flatten)]
    vol: HeaderedDevice,
    /// The passphrase whose keyslot is removed
    #[arg(long, short = 'd')]
    key_file: PathBuf,
    #[command(flatten)]
    part: crate::keyfile::KeyFilePart,
    /// Allow removing the last keyslot (the volume becomes unusable)
    #[arg(long, short = 'q')]
    batch_mode: bool,
}

#[derive(Args, Debug)]
pub struct ChangeKeyArgs {
    #[command(flatten)]
    vol: HeaderedDevice,
    /// The current passphrase
    #[arg(long, short = 'd')]
    key_file: PathBuf,
    /// The passphrase that replaces it (the output names the keyslot it lands in)
    #[arg(long)]
    new_key_file: PathBuf,
    #[command(flatten)]
    part: crate::keyfile::KeyFilePart,
    #[command(flatten)]
    new_part: crate::keyfile::NewKeyFilePart,
    /// Only try this keyslot
    #[arg(long, short = 'S')]
    key_slot: Option<u32>,
    #[command(flatten)]
    kdf: KdfArgs,
}

pub fn run(cmd: LuksCmd) -> Result<ExitCode> {
    match cmd {
        LuksCmd::Format(a) => format(*a),
        LuksCmd::Dump(a) => dump(a),
        LuksCmd::TestPassphrase(a) => test_passphrase(a),
        LuksCmd::AddKey(a) => add_key(a),
        LuksCmd::RemoveKey(a) => remove_key(a),
        LuksCmd::ChangeKey(a) => change_key(a),
        LuksCmd::IsLuks(a) => is_luks(a),
        LuksCmd::Uuid(a) => uuid(a),
    }
}

/// `isLuks`: a valid header (of the version asked) or exit 1; quiet unless -v, as
/// cryptsetup's.
fn is_luks(a: IsLuksArgs) -> Result<ExitCode> {
    let path = a.vol.meta();
    let want = match a
        .luks_type
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None => None,
        Some("luks1") => Some(1),
        Some("luks2") => Some(2),
        Some("luks") => None,
        Some(t) => return Err(crate::Usage(format!("--type {t}: give luks1 or luks2")).into()),
    };
    // A device that cannot be opened is an error, said (cryptsetup exits 4, luksify's
    // "busy"); one that opens and holds no valid header is the quiet answer 1.
    let f = open_ro(path)?;
    let why = match Volume::read(&f).map(|(v, _)| v) {
        Ok(v) => {
            let version = match v {
                Volume::Luks1(_) => 1,
                Volume::Luks2(_) => 2,
            };
            match want {
                Some(w) if w != version => Some(format!(
                    "{} is a LUKS{version} device, not LUKS{w}",
                    path.display()
                )),
                _ => None,
            }
        }
        Err(e) => Some(format!("{}: not a valid LUKS device ({e})", path.display())),
    };
    match why {
        None => Ok(ExitCode::SUCCESS),
        Some(w) => {
            if a.verbose {
                errln!("luksify: {w}");
            }
            Ok(ExitCode::from(1))
        }
    }
}

/// `luksUUID`: the UUID on standard output.
fn uuid(a: UuidArgs) -> Result<ExitCode> {
    let path = a.vol.meta();
    let f = open_ro(path)?;
    let vol = read_volume(path, &f)?;
    outln!("{}", vol.uuid());
    Ok(ExitCode::SUCCESS)
}

/// Opens `path` for writing a header: a read-only block device (which opens for
/// writing, then fails every write) is refused here, before anything is written.
fn open_header_rw(path: &Path) -> Result<File> {
    let f = open_rw(path)?;
    let is_block = f.metadata().is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_block_device()
    });
    if is_block && luksify_walker::device::block_device_read_only(&f).unwrap_or(false) {
        bail!(
            "{}: is a read-only block device (a loop device attached with `losetup -r`, or set with `blockdev --setro`): make it writable (`blockdev --setrw`, or attach the loop device again without -r) and run again (nothing was written)",
            path.display()
        );
    }
    Ok(f)
}

/// Held while `format` writes: the exclusive open of a block device and the luksify
/// data lock, so nothing mounts, maps or walks the device meanwhile.
struct NotInUse {
    _excl: Option<File>,
    _lock: luksify_walker::lock::DataLock,
}

/// Refuses a device or image that is in use, as `cryptsetup luksFormat` refuses one
/// it cannot open exclusively: a mounted filesystem, a mapping (luksify's userspace
/// daemon included), a luksify run, or a loop device over the image that is in use.
/// Formatting under any of them destroys what they hold (a trial found `format`
/// writing a new header over a mounted ext4 and over a volume luksify was serving).
fn refuse_in_use(path: &Path, f: &File) -> Result<NotInUse> {
    use std::io::{Error as IoError, ErrorKind};
    let busy = |e: IoError| {
        anyhow::Error::new(IoError::new(ErrorKind::ResourceBusy, e.to_string()))
            .context(path.display().to_string())
    };
    if is_block(f) {
        let excl = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
            .open(path);
        let excl = match excl {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(busy(IoError::new(
                    ErrorKind::ResourceBusy,
                    "is in use (mounted, mapped, a luksify mapping or run, or held open exclusively): formatting would destroy what it holds; unmount or close it first (nothing was written)",
                )))
            }
            r => r.with_context(|| format!("{}: cannot open exclusively", path.display()))?,
        };
        let lock = luksify_walker::lock::DataLock::claim(f, block_size(f)?).map_err(busy)?;
        Ok(NotInUse {
            _excl: Some(excl),
            _lock: lock,
        })
    } else {
        // (An image file's size does not matter to its lock.)
        let lock = luksify_walker::lock::DataLock::claim(f, 0).map_err(busy)?;
        Ok(NotInUse {
            _excl: None,
            _lock: lock,
        })
    }
}

/// `f` as a disk whose header writes take cryptsetup's metadata lock exclusively: a
/// block device's lock file under /run/cryptsetup as well as an image file's `flock`.
/// On a bare `File` a block device had none, so a key command wrote while
/// `cryptsetup luksDump` (or another tool's write) held that lock. The luks crate takes
/// it once per read or write, and `lock_unchanged` checks the sequence id under it.
fn locked_disk(path: &Path, f: &File) -> Result<luksify_walker::lock::HeaderDisk> {
    f.try_clone()
        .and_then(luksify_walker::lock::HeaderDisk::new)
        .with_context(|| {
            format!(
                "{}: cannot open it for cryptsetup's metadata lock",
                path.display()
            )
        })
}

fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| {
            format!(
                "{}: cannot open for writing (check the path and that you are root)",
                path.display()
            )
        })
}

fn open_ro(path: &Path) -> Result<File> {
    File::open(path).with_context(|| {
        format!(
            "{}: cannot open (check the path and permissions)",
            path.display()
        )
    })
}

/// The header file the state directory's status file records for `device` (a detached
/// header, or the one a decryption moved off it), if it is there.
fn recorded_header(device: &Path) -> Option<PathBuf> {
    use luksify_orchestrator::status;
    let s = status::load(&status::state_dir(None)).ok()?;
    let canon = std::fs::canonicalize(device).ok()?;
    s.volumes
        .iter()
        .find(|v| std::fs::canonicalize(&v.device).is_ok_and(|d| d == canon))
        .and_then(|v| v.header.clone())
        .filter(|h| h.is_file())
}

/// Turns a library error into a one-line message carrying the path and a fix.
fn luks_err(path: &Path, e: LuksError) -> anyhow::Error {
    // A device whose header luksify keeps in a file (detached, or moved off it by a
    // decryption under way): that file is named. "Not a LUKS device" alone was all a
    // user got mid-disable (a trial).
    let recorded = matches!(e, LuksError::NotLuks)
        .then(|| recorded_header(path))
        .flatten()
        .map(|h| {
            format!(
                "; its LUKS header is in {} (as luksify's status records it): pass --header {}",
                h.display(),
                h.display()
            )
        });
    let hint = match &e {
        LuksError::NotLuks if recorded.is_some() => recorded.as_deref().unwrap_or_default(),
        LuksError::NotLuks => "; is this the right device (or does it need --header)?",
        LuksError::WrongPassphrase => {
            "; check --key-file (its whole contents, newlines included, are the passphrase)"
        }
        LuksError::NoValidHeader { .. } | LuksError::Corrupt(_) => {
            "; restore a header backup (cryptsetup luksHeaderRestore)"
        }
        // A new keyslot's cost is what the user asked for; a header's is not (its
        // messages say what to do then): "lower --pbkdf-memory" went to
        // test-passphrase, which takes no such option.
        LuksError::KdfTooCostly(m) if !m.starts_with("a keyslot's") && !m.contains("free memory") => {
            "; a new keyslot can cost less (--pbkdf-memory, or --pbkdf pbkdf2); an existing one opens on a machine with more memory, or use another keyslot's passphrase"
        }
        _ => "",
    };
    let said = format!("{}: {e}{hint}", path.display());
    match e {
        LuksError::WrongPassphrase => anyhow::Error::new(WrongPassphrase(said)),
        // Another command wrote the header meanwhile: busy (exit 4), run again (trial B:
        // it was 1, where a lock held by the other exits 4).
        LuksError::Changed(_) => {
            anyhow::Error::new(std::io::Error::new(std::io::ErrorKind::ResourceBusy, said))
        }
        _ => anyhow!(said),
    }
}

fn read_volume(path: &Path, file: &File) -> Result<Volume> {
    // cryptsetup's metadata lock, shared, as cryptsetup reads: the walker's header disk
    // takes a block device's (a file under /run/cryptsetup) as well as a file's. Without
    // it a read between a writer's two copies saw them differ (trial U: a luksify run
    // stopped mid-commit, where cryptsetup's luksDump waited).
    let _lock = file
        .try_clone()
        .and_then(luksify_walker::lock::HeaderDisk::new)
        .and_then(|d| luksify_luks::io::Disk::lock_metadata(&d, false))
        .with_context(|| format!("{}: cannot take cryptsetup's metadata lock", path.display()))?;
    let (v, report) = Volume::read(file).map_err(|e| luks_err(path, e))?;
    // cryptsetup repairs a damaged copy as it reads; luksify reads only, so it says
    // so (a trial's corrupted primary was used silently: the header had one good copy
    // left and nobody was told).
    if let Some(why) = report.and_then(|r| r.damage()) {
        errln!(
            "luksify: {}: warning: LUKS2 header: {why}. `cryptsetup repair`, or a luksify key command that changes the header, rewrites both copies",
            path.display()
        );
    }
    Ok(v)
}

/// Known signatures at fixed offsets: (what, offset, magic).
const SIGNATURES: &[(&str, u64, &[u8])] = &[
    ("LUKS", 0, b"LUKS\xba\xbe"),
    ("LUKS2 secondary header", 16384, b"SKUL\xba\xbe"),
    ("ext2/3/4", 1080, &[0x53, 0xef]),
    ("xfs", 0, b"XFSB"),
    ("btrfs", 65600, b"_BHRfS_M"),
    ("swap", 4086, b"SWAPSPACE2"),
    ("swap", 4086, b"SWAP-SPACE"),
    ("LVM2 physical volume", 536, b"LVM2 001"),
    ("GPT partition table", 512, b"EFI PART"),
    ("vfat", 82, b"FAT32   "),
    ("vfat", 54, b"FAT16   "),
    ("vfat", 54, b"FAT12   "),
    ("iso9660", 32769, b"CD001"),
];

/// The first known signature on `disk`, if any.
pub(crate) fn find_signature(disk: &File) -> Option<&'static str> {
    for (what, off, magic) in SIGNATURES {
        let mut b = vec![0u8; magic.len()];
        if disk.read_at(*off, &mut b).is_ok() && b == *magic {
            return Some(what);
        }
    }
    // An MBR boot signature on its own is common on partitioned disks.
    let mut mbr = [0u8; 2];
    if disk.read_at(510, &mut mbr).is_ok() && mbr == [0x55, 0xaa] {
        return Some("MBR partition table or boot sector");
    }
    None
}

/// cryptsetup's rule for `--offset` (`crypt_set_data_offset`): whole 4096-byte units.
pub fn check_offset_sectors(offset: Option<u64>) -> Result<()> {
    match offset {
        Some(s) if s % 8 != 0 => bail!(
            "--offset {s}: the data offset must be a multiple of 4096 bytes (8 sectors), as cryptsetup requires; use {} or {} (nothing was written)",
            s / 8 * 8,
            s.div_ceil(8) * 8
        ),
        _ => Ok(()),
    }
}

fn format(mut a: FormatArgs) -> Result<ExitCode> {
    // As cryptsetup: 0 is "not set" (the default), for --offset (with the header in
    // front it put the data over the header: the first write to the volume destroyed
    // both header copies; a trial) and --align-payload.
    if a.header.is_none() {
        a.offset = a.offset.filter(|&o| o != 0);
    }
    a.align_payload = a.align_payload.filter(|&s| s != 0);
    check_offset_sectors(a.offset)?;
    // As cryptsetup: any case, and `luks` is the default type, LUKS2 (it was LUKS1).
    let luks1 = match a.luks_type.to_ascii_lowercase().as_str() {
        "luks2" | "luks" => false,
        "luks1" => true,
        other => bail!("--type {other}: use luks2 or luks1"),
    };
    if let Some(h) = a
        .header
        .as_deref()
        .filter(|h| luksify_walker::lock::same_storage(&a.device, h))
    {
        bail!(
            "{}: --header {} is the device itself (the same file, a link to it, or a loop device over it): its data would start at offset 0, over the header; leave out --header to put the header in front",
            a.device.display(),
            h.display()
        );
    }
    let n = &a.new;
    // Before any file is opened or created (a refused LUKS1 --header left an empty file).
    if luks1 && a.header.is_some() {
        bail!("--header with --type luks1 is not supported by luksify: a detached header needs LUKS2 (the default) (nothing was written)");
    }
    if luks1 && (n.label.is_some() || n.subsystem.is_some()) {
        bail!("--label and --subsystem are LUKS2 fields: drop them for --type luks1 (nothing was written)");
    }
    let pass = read_new_key_file(&a.key_file, a.part)?;
    // Every option checked before the device is opened.
    let opts = n.with_kdf(n.kdf.request(luks1)?)?;
    let device = if a.header.is_some() {
        open_rw(&a.device)?
    } else {
        open_header_rw(&a.device)?
    };
    // Only what is written must be free: with --header the device is not touched
    // (cryptsetup formats a detached header for a mounted device too).
    let _device_free = match a.header {
        None => Some(refuse_in_use(&a.device, &device)?),
        Some(_) => None,
    };
    let dev_size = device
        .size()
        .with_context(|| format!("{}: cannot read its size", a.device.display()))?;
    let header_file = match &a.header {
        Some(h) => Some(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(h)
                .with_context(|| {
                    format!("{}: cannot open or create the header file", h.display())
                })?,
        ),
        None => None,
    };
    let _header_free = match (&a.header, &header_file) {
        (Some(h), Some(f)) => Some(refuse_in_use(h, f)?),
        _ => None,
    };
    // Refuse to destroy something recognisable unless told to.
    if !a.batch_mode {
        for (path, f) in [
            (Some(&a.device), Some(&device)),
            (a.header.as_ref(), header_file.as_ref()),
        ] {
            if let (Some(p), Some(f)) = (path, f) {
                if let Some(sig) = find_signature(f) {
                    bail!(
                        "{}: contains {} {sig} signature; formatting destroys it. Re-run with --batch-mode to overwrite",
                        p.display(),
                        // "a ext2/3/4" (trial N2).
                        if sig.starts_with(['a', 'e', 'i', 'o', 'u', 'x']) {
                            "an"
                        } else {
                            "a"
                        }
                    );
                }
            }
        }
    }
    let meta: &File = header_file.as_ref().unwrap_or(&device);
    let meta_name = a.header.as_deref().unwrap_or(&a.device);
    // cryptsetup's metadata lock on a block device, exclusive for the whole format (its
    // header area is wiped first): a `cryptsetup luksDump` meanwhile waits rather than
    // reading a header half made. Held here, around the bare `File` the luks crate
    // writes through (which takes only an image file's own `flock`), so it is never
    // asked for twice: a second open of the lock file would wait on this one.
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let _meta_lock = match meta.metadata() {
        Ok(m) if m.file_type().is_block_device() => {
            luksify_walker::lock::block_metadata_lock(m.rdev(), true).with_context(|| {
                format!(
                    "{}: cannot take cryptsetup's metadata lock",
                    meta_name.display()
                )
            })?
        }
        _ => None,
    };
    // A loop device over a sparse file without room for the header's blocks: its
    // writes can fail, or lose part of their data without an error (a trial's format
    // said only "flushing keyslot area: Input/output error"). Checked before any write.
    if meta
        .metadata()
        .is_ok_and(|m| m.file_type().is_block_device())
    {
        if let Some(short) = opts
            .header_size()
            .ok()
            .and_then(|n| luksify_walker::space::short_of_room_in(meta, 0, n))
        {
            bail!("{}: {short}", meta_name.display());
        }
    }
    // Where the data may start: --align-payload, else the data device's I/O topology
    // (block devices), else 1 MiB, as cryptsetup's luksFormat.
    let (alignment, alignment_offset) = match a.align_payload {
        Some(s) => (u64::from(s) * 512, 0),
        None => device_alignment(&device),
    };
    let data_offset = match (a.offset, a.align_payload, &a.header) {
        (Some(s), _, _) => Some(s * 512),
        // With a detached header the alignment is the data offset itself (cryptsetup).
        (None, Some(s), Some(_)) => Some(u64::from(s) * 512),
        _ => None,
    };
    // Checked before anything is written (the format wipes the header area first).
    match (a.key_slot, luks1) {
        (Some(k), false) if k >= 32 => bail!("--key-slot {k}: LUKS2 keyslots are 0-31"),
        (Some(k), true) if k >= 8 => bail!("--key-slot {k}: LUKS1 keyslots are 0-7"),
        _ => {}
    }
    if luks1 {
        if n.luks2_metadata_size.is_some() || n.luks2_keyslots_size.is_some() {
            bail!("--luks2-metadata-size and --luks2-keyslots-size are LUKS2 options: drop them for --type luks1");
        }
        if let Some(s) = n.sector_size.filter(|s| *s != 512) {
            bail!("--sector-size {s}: LUKS1 only supports 512");
        }
        let (name, mode) = n.cipher.split_once('-').ok_or_else(|| {
            anyhow!(
                "--cipher {}: expected NAME-MODE such as aes-xts-plain64",
                n.cipher
            )
        })?;
        let opts = luks1::FormatOptions {
            cipher_name: name.into(),
            cipher_mode: mode.into(),
            hash: opts.hash,
            key_size: opts.key_size,
            kdf: opts.kdf,
            payload_offset: Some(match a.offset {
                Some(s) => {
                    u32::try_from(s).map_err(|_| anyhow!("--offset {s} too large for LUKS1"))?
                }
                None => {
                    let end = luks1::areas_end_sectors(opts.key_size as u32);
                    let s = end.next_multiple_of(alignment / 512) + alignment_offset / 512;
                    u32::try_from(s).map_err(|_| anyhow!("--align-payload: offset too large"))?
                }
            }),
            uuid: opts.uuid,
            volume_key: opts.volume_key,
            key_slot: a.key_slot,
        };
        let payload = u64::from(
            opts.payload_offset
                .unwrap_or(luks1::DEFAULT_PAYLOAD_SECTORS),
        ) * 512;
        if dev_size <= payload {
            bail!("{}: device of {dev_size} bytes is too small for a LUKS1 payload at {payload} bytes", a.device.display());
        }
        let (hdr, _vk) =
            luks1::Luks1Header::format(meta, &pass, &opts).map_err(|e| luks_err(meta_name, e))?;
        println!(
            "{}: formatted as LUKS1, UUID {}, key slot {}",
            a.device.display(),
            hdr.uuid,
            a.key_slot.unwrap_or(0)
        );
        return Ok(ExitCode::SUCCESS);
    }
    let header_device_size = match (&a.header, &header_file) {
        (Some(_), Some(f)) if is_block(f) => Some(block_size(f)?),
        _ => None,
    };
    let mut opts = luks2::FormatOptions {
        data_offset,
        detached: a.header.is_some(),
        alignment,
        alignment_offset,
        header_device_size,
        key_slot: a.key_slot,
        ..opts
    };
    let offset = opts
        .data_offset_or_default()
        .map_err(|e| luks_err(meta_name, e))?;
    if dev_size <= offset {
        bail!(
            "{}: device of {dev_size} bytes is too small for LUKS2 data at offset {offset}; use a bigger device or --header",
            a.device.display()
        );
    }
    if n.sector_size.is_none() {
        let (logical, physical) = sector_sizes(&device);
        opts.sector_size = luks2::auto_sector_size(logical, physical, offset, dev_size);
    }
    // With 512-byte sectors a partial last sector is just not used (the kernel sizes
    // the mapping in whole sectors), as cryptsetup formats such an image.
    if opts.sector_size > 512 && !(dev_size - offset).is_multiple_of(u64::from(opts.sector_size)) {
        bail!(
            "{}: data area of {} bytes is not a whole number of {}-byte sectors; use --sector-size 512 (nothing was written)",
            a.device.display(),
            dev_size - offset,
            opts.sector_size
        );
    }
    let (hdr, _vk) = Luks2Header::format(meta, &pass, &opts).map_err(|e| luks_err(meta_name, e))?;
    // cryptsetup's warnings, once formatted: a refusal above stays one line.
    warn_keyslots_size(
        &opts,
        luks2::keyslot::area_size(opts.key_size, luksify_luks::af::DEFAULT_STRIPES),
    );
    println!(
        "{}: formatted as LUKS2, UUID {}, key slot {}",
        a.device.display(),
        hdr.uuid,
        a.key_slot.unwrap_or(0)
    );
    Ok(ExitCode::SUCCESS)
}

fn is_block(f: &File) -> bool {
    use std::os::unix::fs::FileTypeExt;
    f.metadata().is_ok_and(|m| m.file_type().is_block_device())
}

/// `BLKGETSIZE64`: a block device's size in bytes.
fn block_size(f: &File) -> Result<u64> {
    luksify_walker::device::block_device_size(f).context("cannot read the header device's size")
}

/// The logical and physical sector sizes `cryptsetup luksFormat` goes by: a block
/// device's own, or for an image file its filesystem's block size (at most a page,
/// as cryptsetup's `device_fs_block_size_fd`) and 4096.
fn sector_sizes(f: &File) -> (u64, u64) {
    if is_block(f) {
        return luksify_walker::device::block_sector_sizes(f).unwrap_or((512, 512));
    }
    // SAFETY: sysconf has no memory effects.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: fstatvfs fills the statvfs it is given, and `f` is an open descriptor.
    let r = unsafe { libc::fstatvfs(std::os::fd::AsRawFd::as_raw_fd(f), st.as_mut_ptr()) };
    let bsize = if r == 0 {
        // SAFETY: fstatvfs succeeded, so it initialised `st`.
        unsafe { st.assume_init() }.f_bsize
    } else {
        0
    };
    let logical = if bsize != 0 && bsize <= page {
        bsize
    } else {
        page
    };
    (logical, 4096)
}

/// The data alignment cryptsetup derives from a block device's I/O topology
/// (`BLKIOMIN`, `BLKIOOPT`, `BLKALIGNOFF`); 1 MiB for files or without topology.
fn device_alignment(f: &File) -> (u64, u64) {
    let default = luks2::DEFAULT_ALIGNMENT;
    if !is_block(f) {
        return (default, 0);
    }
    match luksify_walker::device::block_io_topology(f) {
        Ok((min_io, opt_io, off)) => luks2::topology_alignment(min_io, opt_io, off, default),
        Err(_) => (default, 0),
    }
}

fn test_passphrase(a: TestArgs) -> Result<ExitCode> {
    let pass = read_key_file(&a.key_file, a.part)?;
    let path = a.vol.meta();
    let f = open_ro(path)?;
    let vol = read_volume(path, &f)?;
    match vol.unlock_key_only(&f, &pass, a.key_slot) {
        Ok((_vk, slot)) => {
            println!("Key slot {slot} unlocked.");
            Ok(ExitCode::SUCCESS)
        }
        Err(LuksError::KeyslotNotFound(n)) => {
            // As cryptsetup: the slot asked for holds no passphrase keyslot (exit 1,
            // not the wrong passphrase's 2).
            eprintln!(
                "luksify: {}: no usable keyslot is available: keyslot {n} is not in use (`luksify dump` lists the keyslots)",
                path.display()
            );
            Ok(ExitCode::from(1))
        }
        Err(e @ LuksError::NoUsableKeyslot) => {
            // As cryptsetup: exit 1, not the wrong passphrase's 2.
            eprintln!("luksify: {}: {e}", path.display());
            Ok(ExitCode::from(1))
        }
        Err(LuksError::WrongPassphrase) if a.key_slot.is_none() => {
            if let Some((_, slot)) = unbound_slot_opened_by(&vol, &f, &pass) {
                eprintln!(
                    "luksify: {:#}",
                    only_unbound(
                        path,
                        slot,
                        &format!("`luksify test-passphrase --key-slot {slot}` checks it alone")
                    )
                );
                return Ok(ExitCode::from(1));
            }
            wrong_passphrase(path)
        }
        Err(LuksError::WrongPassphrase) => wrong_passphrase(path),
        Err(e) => Err(luks_err(path, e)),
    }
}

/// test-passphrase's wrong passphrase (exit 2). Keyslots it could not try are not
/// here: the luks crate says so with `DamagedKeyslots` (exit 1) instead.
fn wrong_passphrase(path: &Path) -> Result<ExitCode> {
    eprintln!(
        "luksify: {}: no key available with this passphrase",
        path.display()
    );
    Ok(ExitCode::from(EXIT_WRONG_PASSPHRASE))
}

/// The unbound LUKS2 keyslot `pass` opens, tried only once the volume's own keyslots
/// refused it (an unbound slot holds a key that is not the volume key).
fn unbound_slot_opened_by(vol: &Volume, f: &File, pass: &[u8]) -> Option<(VolumeKey, u32)> {
    let Volume::Luks2(h) = vol else { return None };
    h.keyslot_ids()
        .into_iter()
        .filter(|s| h.is_unbound(*s))
        .find_map(|s| vol.unlock_key_only(f, pass, Some(s)).ok())
}

/// A passphrase that opens only an unbound keyslot: "no usable keyslot" (exit 1), as
/// cryptsetup says it, not a wrong passphrase; `then` says what to do with that slot.
fn only_unbound(path: &Path, slot: u32, then: &str) -> anyhow::Error {
    anyhow!(
        "{}: no usable keyslot is available: this passphrase opens only keyslot {slot}, which is unbound (it holds a key that is not the volume key); {then}",
        path.display()
    )
}

fn add_key(a: AddKeyArgs) -> Result<ExitCode> {
    // Both typed on a terminal are two prompts, as cryptsetup's; from a pipe the two
    // would share one stream.
    if a.key_file == Path::new("-")
        && a.new_key_file == Path::new("-")
        && !crate::keyfile::stdin_is_terminal()
    {
        bail!("--key-file and --new-key-file cannot both be standard input (-): put one passphrase in a file");
    }
    let pass = read_key_file(&a.key_file, a.part)?;
    // A new passphrase from a file is read first (a bad file fails before the KDF); one
    // typed is asked once the old one opened, as cryptsetup asks (a wrong old one was
    // told only after the new one was typed twice; a trial).
    let typed = a.new_key_file == Path::new("-") && crate::keyfile::stdin_is_terminal();
    let mut new = None;
    if !typed {
        new = Some(read_new_key_file(&a.new_key_file, a.new_part.into())?);
    }
    let path = a.vol.meta();
    let f = open_header_rw(path)?;
    let vol = read_volume(path, &f)?;
    let req = a
        .kdf
        .request(vol.version() == luksify_luks::Version::Luks1)?;
    let (vk, _) = vol.unlock(&f, &pass, None).map_err(|e| luks_err(path, e))?;
    let new = match new {
        Some(n) => n,
        None => read_new_key_file(&a.new_key_file, a.new_part.into())?,
    };
    // No repair of a damaged copy before the change: its own write rewrites both
    // copies, and a change refused (slot in use, area full) writes nothing at all.
    let mut vol = vol;
    let slot = vol
        .add_keyslot(&locked_disk(path, &f)?, &vk, &new, &req, a.key_slot)
        .map_err(|e| luks_err(path, e))?;
    println!("Key slot {slot} created.");
    Ok(ExitCode::SUCCESS)
}

fn remove_key(a: RemoveKeyArgs) -> Result<ExitCode> {
    let pass = read_key_file(&a.key_file, a.part)?;
    let path = a.vol.meta();
    let f = open_header_rw(path)?;
    let vol = read_volume(path, &f)?;
    let (_vk, slot) = match vol.unlock(&f, &pass, None) {
        Err(LuksError::WrongPassphrase) => match unbound_slot_opened_by(&vol, &f, &pass) {
            Some((_, slot)) => {
                return Err(only_unbound(
                    path,
                    slot,
                    &format!(
                        "`cryptsetup luksKillSlot {} {slot}` removes it (nothing was written)",
                        path.display()
                    ),
                ))
            }
            None => Err(LuksError::WrongPassphrase),
        },
        r => r,
    }
    .map_err(|e| luks_err(path, e))?;
    if vol.keyslot_ids().len() == 1 && !a.batch_mode {
        // Damaged keyslots may be there too, but open nothing (trial V3: "the last
        // keyslot" where luksDump lists two).
        let damaged: Vec<String> = match &vol {
            Volume::Luks2(h) => h.damaged_keyslots().map(|(id, _)| id.to_string()).collect(),
            Volume::Luks1(_) => Vec::new(),
        };
        let usable = if damaged.is_empty() {
            String::new()
        } else {
            format!(
                " that can open the volume (keyslot {} is damaged)",
                damaged.join(", ")
            )
        };
        bail!(
            "{}: key slot {slot} is the last keyslot{usable}; removing it makes the data unrecoverable. Re-run with --batch-mode to do it anyway",
            path.display()
        );
    }
    // No repair of a damaged copy before the change: its own write rewrites both
    // copies, and a change refused (slot in use, area full) writes nothing at all.
    let mut vol = vol;
    vol.remove_keyslot(&locked_disk(path, &f)?, slot)
        .map_err(|e| luks_err(path, e))?;
    println!("Key slot {slot} removed.");
    Ok(ExitCode::SUCCESS)
}

fn change_key(a: ChangeKeyArgs) -> Result<ExitCode> {
    // Both typed on a terminal are two prompts, as cryptsetup's; from a pipe the two
    // would share one stream.
    if a.key_file == Path::new("-")
        && a.new_key_file == Path::new("-")
        && !crate::keyfile::stdin_is_terminal()
    {
        bail!("--key-file and --new-key-file cannot both be standard input (-): put one passphrase in a file");
    }
    let pass = read_key_file(&a.key_file, a.part)?;
    // As in `add_key`: a typed new passphrase is asked once the old one opened.
    let typed = a.new_key_file == Path::new("-") && crate::keyfile::stdin_is_terminal();
    let mut new = None;
    if !typed {
        new = Some(read_new_key_file(&a.new_key_file, a.new_part.into())?);
    }
    let path = a.vol.meta();
    let f = open_header_rw(path)?;
    let vol = read_volume(path, &f)?;
    let req = a
        .kdf
        .request(vol.version() == luksify_luks::Version::Luks1)?;
    // Without --key-slot, an unbound keyslot's passphrase changes too, as
    // `cryptsetup luksChangeKey` changes it (it was "wrong passphrase"; a trial): its own
    // key is sealed again under the new one, and it stays unbound.
    let (_vk, slot) = match vol.unlock(&f, &pass, a.key_slot) {
        Err(e @ (LuksError::WrongPassphrase | LuksError::NoUsableKeyslot))
            if a.key_slot.is_none() =>
        {
            unbound_slot_opened_by(&vol, &f, &pass).ok_or(e)
        }
        r => r,
    }
    .map_err(|e| luks_err(path, e))?;
    let new = match new {
        Some(n) => n,
        None => read_new_key_file(&a.new_key_file, a.new_part.into())?,
    };
    // No repair of a damaged copy before the change: its own write rewrites both
    // copies, and a change refused (slot in use, area full) writes nothing at all.
    let mut vol = vol;
    let now = vol
        .change_keyslot(&locked_disk(path, &f)?, slot, &pass, &new, &req)
        .map_err(|e| luks_err(path, e))?;
    println!("Key slot {slot} changed (now key slot {now}).");
    Ok(ExitCode::SUCCESS)
}

fn dump(a: DumpArgs) -> Result<ExitCode> {
    let path = a.vol.meta();
    let f = open_ro(path)?;
    let vol = read_volume(path, &f)?;
    if a.dump_volume_key {
        let (Some(kf), Some(out)) = (&a.key_file, &a.volume_key_file) else {
            bail!("--dump-volume-key needs --key-file and --volume-key-file");
        };
        let pass = read_key_file(kf, a.part)?;
        // An unbound keyslot opens to a key that is not the volume's: dumping it wrote
        // that key as the volume key, a false backup ("No usable keyslot is available",
        // says cryptsetup). test-passphrase -S still checks an unbound passphrase.
        if let (Volume::Luks2(h), Some(s)) = (&vol, a.key_slot) {
            if h.is_unbound(s) {
                bail!(
                    "{}: keyslot {s} is unbound: the key it holds is not the volume key (no usable keyslot; nothing was written)",
                    path.display()
                );
            }
        }
        // Mid key change the volume has two keys, and which one is "the" key depends
        // on when it is asked: cryptsetup gives the new one, which the part not yet
        // walked does not use, and luksify gave the old one, which is no backup once
        // the run finishes. Either way the file would not open the whole volume.
        if let Volume::Luks2(h) = &vol {
            use luksify_luks::luks2::json::{Keyslot, ReencryptMode};
            if h.metadata
                .keyslots
                .values()
                .any(|k| matches!(k, Keyslot::Reencrypt(r) if r.mode == ReencryptMode::Reencrypt))
            {
                bail!(
                    "{}: a re-encryption with a new volume key is in progress: no one key opens the whole volume until it ends; finish it with `cryptsetup reencrypt --resume-only` and dump the key then (nothing was written)",
                    path.display()
                );
            }
        }
        let (vk, slot) = vol
            .unlock_key_only(&f, &pass, a.key_slot)
            .map_err(|e| luks_err(path, e))?;
        write_secret_file(out, vk.as_bytes())?;
        println!(
            "Volume key ({} bits) from key slot {slot} written to {}.",
            vk.len() * 8,
            out.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    match &vol {
        Volume::Luks2(h) if a.json => {
            println!("{}", serde_json::to_string_pretty(&h.metadata)?);
        }
        Volume::Luks1(h) if a.json => {
            let ks: Vec<_> = h
                .keyslots
                .iter()
                .enumerate()
                .map(|(i, k)| serde_json::json!({"id": i, "active": k.active, "iterations": k.iterations, "key_material_offset": k.key_material_offset, "stripes": k.stripes}))
                .collect();
            let v = serde_json::json!({"version": 1, "cipher_name": h.cipher_name, "cipher_mode": h.cipher_mode, "hash_spec": h.hash_spec, "payload_offset": h.payload_offset, "key_bytes": h.key_bytes, "mk_digest_iterations": h.mk_digest_iterations, "uuid": h.uuid, "keyslots": ks});
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Volume::Luks2(h) => print!("{}", luks2_text(h)),
        Volume::Luks1(h) => print!(
            "{}",
            luks1_text(h, a.vol.header.as_deref().unwrap_or(&a.vol.device))
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes a secret to a new file, mode 0600, refusing to overwrite (as cryptsetup does).
fn write_secret_file(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "{}: cannot create the volume key file (it must not exist yet)",
                path.display()
            )
        })?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("{}: cannot write the volume key", path.display()))
}

fn luks2_text(h: &Luks2Header) -> String {
    use std::fmt::Write;
    let m = &h.metadata;
    let mut s = String::new();
    let none = |v: &str, d: &str| {
        if v.is_empty() {
            d.to_string()
        } else {
            v.to_string()
        }
    };
    let _ = writeln!(s, "LUKS header information");
    let _ = writeln!(s, "Version:       \t2");
    let _ = writeln!(s, "Epoch:         \t{}", h.seqid);
    let _ = writeln!(s, "Metadata area: \t{} [bytes]", h.hdr_size);
    let _ = writeln!(s, "Keyslots area: \t{} [bytes]", m.config.keyslots_size);
    let _ = writeln!(s, "UUID:          \t{}", h.uuid);
    let _ = writeln!(
        s,
        "Label:         \t{}",
        none(&h.label.to_string(), "(no label)")
    );
    let _ = writeln!(
        s,
        "Subsystem:     \t{}",
        none(&h.subsystem.to_string(), "(no subsystem)")
    );
    // luksDump ends each flag and each requirement with a blank, the last one too.
    let flags: String = m
        .config
        .flags
        .iter()
        .flatten()
        .map(|f| format!("{f} "))
        .collect();
    let _ = writeln!(s, "Flags:       \t{}", none(&flags, "(no flags)"));
    let req: String = m
        .config
        .mandatory_requirements()
        .iter()
        .map(|r| format!("{r} "))
        .collect();
    if !req.is_empty() {
        let _ = writeln!(s, "Requirements:\t{req}");
    }
    let _ = writeln!(s, "\nData segments:");
    for (n, (id, seg)) in m.segments.iter().enumerate() {
        if n > 0 {
            s.push('\n');
        }
        match seg {
            Segment::Crypt(c) => {
                let _ = writeln!(s, "  {id}: crypt");
                let _ = writeln!(s, "\toffset: {} [bytes]", c.offset);
                let _ = writeln!(s, "\tlength: {}", size_text(c.size));
                let _ = writeln!(s, "\tcipher: {}", c.encryption);
                // (luksDump 2.6.1 does not show iv_tweak; `--json` does.)
                let _ = writeln!(s, "\tsector: {} [bytes]", c.sector_size);
                if let Some(t) = c
                    .integrity
                    .as_ref()
                    .and_then(|i| i.get("type"))
                    .and_then(|t| t.as_str())
                {
                    let _ = writeln!(s, "\tintegrity: {t}");
                }
            }
            Segment::Linear(l) => {
                let _ = writeln!(s, "  {id}: linear");
                let _ = writeln!(s, "\toffset: {} [bytes]", l.offset);
                let _ = writeln!(s, "\tlength: {}", size_text(l.size));
            }
            Segment::Unknown(u) => {
                let _ = writeln!(
                    s,
                    "  {id}: {}",
                    u.get("type").and_then(|t| t.as_str()).unwrap_or("?")
                );
            }
        }
        let f = seg.flags();
        if !f.is_empty() {
            let _ = writeln!(s, "\tflags : {}", f.join(" "));
        }
    }
    let _ = writeln!(s, "\nKeyslots:");
    // luksDump calls a keyslot bound when its digest is assigned to a live (not backup)
    // segment: the new key's keyslot of an encryption not started yet is unbound.
    let bound = |slot: u32| {
        m.digests.values().any(|d| {
            d.keyslots().contains(&slot)
                && d.segments()
                    .iter()
                    .any(|sid| m.segments.get(sid).is_some_and(|seg| !seg.is_backup()))
        })
    };
    let unbound = |slot: u32| if bound(slot) { "" } else { " (unbound)" };
    for (id, ks) in &m.keyslots {
        match ks {
            Keyslot::Luks2(k) => {
                let _ = writeln!(s, "  {id}: luks2{}", unbound(*id));
                let _ = writeln!(s, "\tKey:        {} bits", k.key_size * 8);
                let prio = match k.priority {
                    Some(luks2::json::Priority::Ignore) => "ignored",
                    Some(luks2::json::Priority::Prefer) => "preferred",
                    _ => "normal",
                };
                let _ = writeln!(s, "\tPriority:   {prio}");
                let _ = writeln!(s, "\tCipher:     {}", k.area.encryption);
                let _ = writeln!(s, "\tCipher key: {} bits", k.area.key_size * 8);
                match &k.kdf {
                    Kdf::Pbkdf2 {
                        hash,
                        iterations,
                        salt,
                    } => {
                        let _ = writeln!(s, "\tPBKDF:      pbkdf2");
                        let _ = writeln!(s, "\tHash:       {hash}");
                        let _ = writeln!(s, "\tIterations: {iterations}");
                        let _ = write!(s, "\tSalt:       {}", hex_lines(salt));
                    }
                    Kdf::Argon2i {
                        time,
                        memory,
                        cpus,
                        salt,
                    }
                    | Kdf::Argon2id {
                        time,
                        memory,
                        cpus,
                        salt,
                    } => {
                        let name = if matches!(k.kdf, Kdf::Argon2i { .. }) {
                            "argon2i"
                        } else {
                            "argon2id"
                        };
                        let _ = writeln!(s, "\tPBKDF:      {name}");
                        let _ = writeln!(s, "\tTime cost:  {time}");
                        let _ = writeln!(s, "\tMemory:     {memory}");
                        let _ = writeln!(s, "\tThreads:    {cpus}");
                        let _ = write!(s, "\tSalt:       {}", hex_lines(salt));
                    }
                }
                let _ = writeln!(s, "\tAF stripes: {}", k.af.stripes);
                let _ = writeln!(s, "\tAF hash:    {}", k.af.hash);
                let _ = writeln!(s, "\tArea offset:{} [bytes]", k.area.offset);
                let _ = writeln!(s, "\tArea length:{} [bytes]", k.area.size);
                if let Some(d) = h.digest_id_for_keyslot(*id) {
                    let _ = writeln!(s, "\tDigest ID:  {d}");
                }
            }
            Keyslot::Reencrypt(r) => {
                let _ = writeln!(s, "  {id}: reencrypt{}", unbound(*id));
                let _ = writeln!(s, "\tKey:        {} bits", r.key_size * 8);
                let prio = match r.priority {
                    Some(luks2::json::Priority::Normal) | None => "normal",
                    Some(luks2::json::Priority::Prefer) => "preferred",
                    Some(luks2::json::Priority::Ignore) => "ignored",
                };
                let _ = writeln!(s, "\tPriority:   {prio}");
                let json = serde_json::to_value(r).unwrap_or_default();
                let text = |v: &serde_json::Value| v.as_str().unwrap_or("?").to_string();
                let _ = writeln!(s, "\tMode:       {}", text(&json["mode"]));
                let _ = writeln!(s, "\tDirection:  {}", text(&json["direction"]));
                let _ = writeln!(s, "\tResilience: {}", text(&json["area"]["type"]));
                match &r.area {
                    ReencryptArea::Checksum {
                        hash, sector_size, ..
                    } => {
                        let _ = writeln!(s, "\tHash:       {hash}");
                        let _ = writeln!(s, "\tHash data:  {sector_size} [bytes]");
                    }
                    ReencryptArea::Datashift { shift_size, .. } => {
                        let _ = writeln!(s, "\tShift size: {shift_size}[bytes]");
                    }
                    _ => {}
                }
                let _ = writeln!(s, "\tArea offset:{} [bytes]", r.area.offset());
                let _ = writeln!(s, "\tArea length:{} [bytes]", r.area.size());
                if let Some(d) = h.digest_id_for_keyslot(*id) {
                    let _ = writeln!(s, "\tDigest ID:  {d}");
                }
            }
            Keyslot::Unknown(u) => {
                let _ = writeln!(
                    s,
                    "  {id}: {}",
                    u.get("type").and_then(|t| t.as_str()).unwrap_or("?")
                );
            }
            Keyslot::Unusable { reason, .. } => {
                let _ = writeln!(s, "  {id}: luks2{}", unbound(*id));
                let _ = writeln!(s, "\tUnusable:   {reason}");
            }
        }
    }
    let _ = writeln!(s, "Tokens:");
    for (id, t) in &m.tokens {
        let _ = writeln!(s, "  {id}: {}", t.kind);
        // cryptsetup's built-in keyring token prints its key description first.
        if t.kind == "luks2-keyring" {
            if let Some(d) = t.extra.get("key_description").and_then(|d| d.as_str()) {
                let _ = writeln!(s, "\tKey description: {d}");
            }
        }
        for k in &t.keyslots {
            let _ = writeln!(s, "\tKeyslot:    {k}");
        }
    }
    let _ = writeln!(s, "Digests:");
    for (id, d) in &m.digests {
        match d {
            Digest::Pbkdf2(p) => {
                let _ = writeln!(s, "  {id}: pbkdf2");
                let _ = writeln!(s, "\tHash:       {}", p.hash);
                let _ = writeln!(s, "\tIterations: {}", p.iterations);
                let _ = write!(s, "\tSalt:       {}", hex_lines(&p.salt));
                let _ = write!(s, "\tDigest:     {}", hex_lines(&p.digest));
            }
            Digest::Unknown(u) => {
                let _ = writeln!(
                    s,
                    "  {id}: {}",
                    u.get("type").and_then(|t| t.as_str()).unwrap_or("?")
                );
            }
        }
    }
    s
}

fn size_text(s: SegmentSize) -> String {
    match s {
        SegmentSize::Dynamic => "(whole device)".into(),
        SegmentSize::Bytes(n) => format!("{n} [bytes]"),
    }
}

/// What `cryptsetup luksDump` prints for a LUKS1 header read from `path` (named as
/// given, as cryptsetup names it).
fn luks1_text(h: &luks1::Luks1Header, path: &Path) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "LUKS header information for {}\n", path.display());
    let _ = writeln!(s, "Version:       \t1");
    let _ = writeln!(s, "Cipher name:   \t{}", h.cipher_name);
    let _ = writeln!(s, "Cipher mode:   \t{}", h.cipher_mode);
    let _ = writeln!(s, "Hash spec:     \t{}", h.hash_spec);
    let _ = writeln!(s, "Payload offset:\t{}", h.payload_offset);
    let _ = writeln!(s, "MK bits:       \t{}", h.key_bytes * 8);
    // The 20-byte digest on one line; the salt 16 bytes a line.
    let _ = writeln!(s, "MK digest:     \t{}", hex_run(&h.mk_digest));
    s.push_str(&luks1_salt(
        "MK salt:       ",
        "               ",
        &h.mk_digest_salt,
    ));
    let _ = writeln!(s, "MK iterations: \t{}", h.mk_digest_iterations);
    let _ = writeln!(s, "UUID:          \t{}\n", h.uuid);
    for (i, k) in h.keyslots.iter().enumerate() {
        if k.active {
            let _ = writeln!(s, "Key Slot {i}: ENABLED");
            let _ = writeln!(s, "\tIterations:         \t{}", k.iterations);
            s.push_str(&luks1_salt(
                "\tSalt:               ",
                "\t                      ",
                &k.salt,
            ));
            let _ = writeln!(s, "\tKey material offset:\t{}", k.key_material_offset);
            let _ = writeln!(s, "\tAF stripes:            \t{}", k.stripes);
        } else {
            let _ = writeln!(s, "Key Slot {i}: DISABLED");
        }
    }
    s
}

/// A LUKS1 salt as luksDump prints it: 16 bytes a line, the first after `label`, the
/// rest after `cont`, each then a tab.
fn luks1_salt(label: &str, cont: &str, salt: &[u8]) -> String {
    salt.chunks(16)
        .enumerate()
        .map(|(i, half)| format!("{}\t{}\n", if i == 0 { label } else { cont }, hex_run(half)))
        .collect()
}

/// Two hex digits and a blank per byte, on one line.
fn hex_run(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x} ")).collect()
}

/// Bytes as luksDump prints a salt or digest: two hex digits and a blank per byte, 16
/// bytes a line, continuation lines indented to the value column, each line ended.
fn hex_lines(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (i, line) in bytes.chunks(16).enumerate() {
        if i > 0 {
            out.push_str("\t            ");
        }
        for b in line {
            out.push_str(&format!("{b:02x} "));
        }
        out.push('\n');
    }
    if bytes.is_empty() {
        out.push('\n');
    }
    out
}
