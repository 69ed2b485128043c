//! In-place encryption walker: turns a plaintext device into a LUKS2 volume chunk
//! by chunk, journaled in LUKS2's own reencryption metadata (the same metadata
//! `cryptsetup reencrypt` writes), so an interrupted run is self-describing and
//! can be finished by luksify or by `cryptsetup reencrypt --resume-only`, and a
//! run cryptsetup started can be finished by luksify. Knows nothing of mounts.
//!
//! Layouts: a detached header (forward, resilience checksum / journal / none) or
//! the header in front with a data shift (`--reduce-device-size`: the first
//! shift bytes are moved to the end, then the walk goes backward).

pub mod device;
pub mod engine;
pub mod fsprobe;
mod identity;
pub mod lock;
pub mod overlap;
pub mod powercut;
mod sha256x16;
pub mod space;
mod stage;
pub mod view;

use engine::{Journal, Sums, Walk, CHECKSUM_BLOCK};
pub use engine::{Outcome, Tuning};
use luksify_cipher::SectorCipher;
pub use luksify_luks::hash::Hash;
use luksify_luks::io::Disk;
use luksify_luks::luks2::json::{
    Keyslot, ReencryptArea, ReencryptDirection, ReencryptMode, SegmentSize,
};
use luksify_luks::luks2::{self, FormatOptions, Luks2Header};
use luksify_luks::reencrypt::{self, EncryptLayout, Progress, ReencryptState, Shift};
use luksify_luks::VolumeKey;
use sha2::Digest as _;
use std::sync::atomic::AtomicBool;

/// Set to true (e.g. from a SIGINT handler) to stop at the next safe point.
pub type Cancel = AtomicBool;
/// Progress callback.
pub type ProgressFn<'a> = dyn Fn(ProgressInfo) + Sync + 'a;

/// Progress of a run, reported once per hotzone handed out for writing, and at the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgressInfo {
    /// Bytes transformed and handed to the device for writing so far, including earlier
    /// runs of the same walk: not yet durable. What a crash keeps is the header's last
    /// commit, at most one hotzone behind (16 MiB by default, [`Tuning::hotzone`]; with
    /// resilience `none` one commit covers up to 1 GiB); `resume` continues from there.
    pub done: u64,
    /// Bytes the whole walk covers: the data area (the device less the data offset or
    /// the reduction), so `done == total` at the end.
    pub total: u64,
    /// Throughput of this run so far (bytes of this run / seconds of this run).
    pub bytes_per_sec: u64,
}

/// How a hotzone is protected against a crash (the reencrypt keyslot's area type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resilience {
    /// Checksums of the hotzone's old sectors (detached header default).
    Checksum,
    /// A full copy of the hotzone in the keyslot area.
    Journal,
    /// No protection: an interrupted run resumes only after a clean stop.
    None,
    /// The old data stays where it was; the new data is written `shift` bytes away.
    Datashift,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Luks(#[from] luksify_luks::Error),
    #[error("cipher: {0}")]
    Cipher(luksify_cipher::CipherError),
    #[error("the run was cut with resilience `none`, which keeps no copy: data bytes {start}..{} may be part rewritten, and which part cannot be told; the bytes before are done, the bytes after untouched. Keep the header file (it holds the key of the bytes already done); restore that range from a backup taken before the run, then resume with --restored {start}..{}, which walks it again from the restored bytes (nothing more was written)", start + len, start + len)]
    Unrecoverable { start: u64, len: u64 },
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// A check failed before anything was written.
    #[error("{0}")]
    Refused(String),
    /// Another process (a luksify run or mapping, cryptsetup, qemu) holds the volume;
    /// nothing was written.
    #[error("{0}")]
    Busy(String),
    /// No keyslot of the header opens with the passphrase; nothing was written.
    #[error("no keyslot accepts this passphrase: check --key-file (nothing was written)")]
    WrongPassphrase,
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// An I/O error of a read or write of `len` bytes at byte `off` of the device, named
    /// there (a bad sector's message said only "read data: Input/output error"; `dmesg`
    /// names the sector, this names the bytes).
    pub(crate) fn io_at(what: &str, off: u64, len: usize, source: std::io::Error) -> Error {
        // A read past the end: the device is shorter than the run (said only "failed to
        // fill whole buffer" when a trial shrank an image mid-run).
        let short = match source.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                " (the device ends before that: was it shrunk, or is it another device?)"
            }
            _ => "",
        };
        Error::io(
            format!("{what} at device bytes {off}..{}{short}", off + len as u64),
            source,
        )
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Where the LUKS2 header goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// In its own file; the data stays where it is (forward walk).
    Detached { resilience: Resilience },
    /// In front of the data: the last `reduce` bytes of the device must be unused;
    /// the data moves by `reduce / 2` (backward walk, datashift resilience).
    Shift { reduce: u64 },
}

impl Placement {
    /// A shift with a data offset (`--offset` with `--reduce-device-size`), as
    /// cryptsetup takes it: the offset may be at most half the reduction, and the
    /// reduction becomes twice the offset (the data starts at the offset and moves by
    /// it). Offset 0 or none: the data starts at half the reduction.
    pub fn with_offset(self, data_offset: Option<u64>) -> Result<Placement> {
        match (self, data_offset) {
            (Placement::Shift { reduce }, Some(off)) if off != 0 => {
                if off > reduce / 2 {
                    return Err(Error::Refused(format!(
                        "--offset {} sectors is more than half of --reduce-device-size ({} sectors): use --offset {} or less, or a larger --reduce-device-size (nothing was written)",
                        off / 512,
                        reduce / 512,
                        reduce / 1024
                    )));
                }
                Ok(Placement::Shift { reduce: 2 * off })
            }
            (p, _) => Ok(p),
        }
    }
}

/// Everything `encrypt` needs besides the devices.
#[derive(Debug)]
pub struct EncryptOptions {
    pub placement: Placement,
    /// Format parameters (cipher, key size, sector size, kdf, label, volume key).
    pub format: FormatOptions,
    /// Checksum resilience's hash (cryptsetup's `--resilience-hash`, sha256 by default).
    pub checksum_hash: Hash,
    pub tuning: Tuning,
}

/// The notice of a `resume` that found a decryption already finished (by cryptsetup,
/// or cut after its last header write): it walked nothing, so the caller says this
/// in place of "decryption finished" (both lines read as a walk done now; a trial).
pub const ALREADY_DECRYPTED: &str = "the decryption had already finished (the data is plaintext); only the header's keyslots area still held bytes, now zeroed; the header file is no longer needed";

/// Hooks a caller can pass to any run.
#[derive(Default)]
pub struct Control<'a> {
    /// Called on the walk's coordinating thread after each hotzone is handed out, and
    /// once at the end. A panic in it stops the walk at the next safe point, as a
    /// cancellation does (the header left resumable), and then carries on unwinding.
    pub progress: Option<&'a ProgressFn<'a>>,
    /// Checked before the first write ([`Outcome::NotStarted`]: nothing written) and
    /// between hotzones ([`Outcome::Interrupted`]: stopped at a safe point).
    pub cancel: Option<&'a Cancel>,
    /// Called once by a new encryption when every check has passed, right before its
    /// first write: where a caller prints warnings, so a refusal stays one line.
    pub before_write: Option<&'a dyn Fn()>,
    /// Where cryptsetup's reencryption locks live ([`lock::CRYPTSETUP_LOCK_DIR`] for
    /// real devices): a run takes the volume's lock there before its first write, so
    /// it never walks beside `cryptsetup reencrypt` or another run on the same
    /// volume. `None` (the default) takes none: for volumes only this process can
    /// see, such as the power-cut tests' memory disks.
    pub lock_dir: Option<&'a std::path::Path>,
    /// `resume` of a resilience-`none` run cut mid-window ([`Error::Unrecoverable`]):
    /// the caller says that data bytes `(start, len)`, exactly the range the error
    /// named, hold their bytes from before the run again (restored from a backup), so
    /// the range is walked again from them. Anything else there would be turned into
    /// garbage: only the user can say this.
    pub restored: Option<(u64, u64)>,
    /// Called with a warning for the user that does not stop the run: one copy of the
    /// header read damaged (the run's commits rewrite both), as `dump` says it. A
    /// caller that keeps refusals to one line says it once the run has gone on.
    pub notice: Option<&'a dyn Fn(&str)>,
}

impl Control<'_> {
    /// No hooks, and the volume's lock taken where cryptsetup takes it
    /// ([`lock::CRYPTSETUP_LOCK_DIR`]): what any run on a real device wants. Callers
    /// add their hooks with `..Control::system()`.
    pub fn system() -> Self {
        Control {
            lock_dir: Some(std::path::Path::new(lock::CRYPTSETUP_LOCK_DIR)),
            ..Control::default()
        }
    }
}

/// `again`, the header read once more under the volume's lock, if it is still the
/// volume `first` was read from.
fn same_volume(first: &Luks2Header, again: Luks2Header) -> Result<Luks2Header> {
    if again.uuid != first.uuid {
        return Err(Error::Refused(format!(
            "the header changed while it was read (UUID {} became {}): another program is writing it; run again when it is done (nothing was written)",
            first.uuid, again.uuid
        )));
    }
    Ok(again)
}

/// Whether the caller asked the run to stop ([`Control::cancel`]).
fn cancelled(ctl: &Control<'_>) -> bool {
    ctl.cancel
        .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
}

/// Takes the volume's reencryption lock if `ctl` asks for one (see [`Control::lock_dir`]).
fn lock_volume(ctl: &Control<'_>, uuid: &str) -> Result<Option<lock::ReencryptLock>> {
    match ctl.lock_dir {
        Some(dir) => lock::ReencryptLock::acquire(dir, uuid),
        None => Ok(None),
    }
}

impl std::fmt::Debug for Control<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").finish_non_exhaustive()
    }
}

/// The header and the reencryption state, committed through both header copies.
struct HeaderJournal<'a, H: Disk + ?Sized> {
    disk: &'a H,
    hdr: Luks2Header,
    st: ReencryptState,
    /// Journal and checksum modes: the two halves of the free keyslot room (see
    /// [`area_halves`]).
    halves: Option<[(u64, u64); 2]>,
    /// Where the next hotzone's journal goes, if not the committed area.
    next_area: Option<ReencryptArea>,
    /// To re-bind the reencrypt digest when the area moves.
    vk: &'a [u8],
    /// The digests of the areas this run has named, reused when it names one again.
    digests: reencrypt::DigestCache,
    /// The last commit's secondary copy is written but not yet flushed.
    secondary_unflushed: bool,
    /// The header is on the data device (header in front): a data flush covers it.
    on_data: bool,
}

impl<H: Disk + ?Sized> HeaderJournal<'_, H> {
    /// The area that `area_write`/`area_read` address now.
    fn live_area(&self) -> &ReencryptArea {
        self.next_area.as_ref().unwrap_or(&self.st.area)
    }

    /// Makes the last commit's secondary copy durable, if nothing has since.
    fn flush_secondary(&mut self) -> Result<()> {
        if self.secondary_unflushed {
            self.disk
                .flush()
                .map_err(|e| Error::io("flush header", e))?;
            self.secondary_unflushed = false;
        }
        Ok(())
    }
}

/// The free room of the keyslots area, after every passphrase keyslot: where the
/// resilience area goes. `(offset, size)` in bytes from the header start.
/// Token type marking a finished encryption whose resilience-area wipe is not done.
pub const WIPE_PENDING_TOKEN: &str = "luksify-wipe-pending";

/// Adds (`on`) or drops the [`WIPE_PENDING_TOKEN`] of a finished header.
fn set_wipe_pending(hdr: &mut Luks2Header, on: bool) {
    let tokens = &mut hdr.metadata.tokens;
    tokens.retain(|_, t| t.kind != WIPE_PENDING_TOKEN);
    if on {
        let id = (0..).find(|i| !tokens.contains_key(i)).unwrap_or(0);
        tokens.insert(
            id,
            luksify_luks::luks2::json::Token {
                kind: WIPE_PENDING_TOKEN.into(),
                keyslots: Vec::new(),
                extra: Default::default(),
            },
        );
    }
}

fn wipe_pending(hdr: &Luks2Header) -> bool {
    hdr.metadata
        .tokens
        .values()
        .any(|t| t.kind == WIPE_PENDING_TOKEN)
}

/// The stretches of the keyslots area no keyslot's area covers (a reencrypt keyslot's
/// aside: it is the run's own), in order, on 4096-byte bounds.
fn keyslot_gaps(hdr: &Luks2Header) -> Vec<(u64, u64)> {
    let mut used: Vec<(u64, u64)> = hdr
        .metadata
        .keyslots
        .values()
        .filter(|k| !matches!(k, Keyslot::Reencrypt(_)))
        .filter_map(Keyslot::area_range)
        .collect();
    used.sort_unstable();
    let mut gaps = Vec::new();
    let mut at = 2 * hdr.hdr_size;
    for (o, len) in used.into_iter().chain([(hdr.areas_end(), 0)]) {
        let (start, end) = (at.next_multiple_of(4096), o / 4096 * 4096);
        if end > start {
            gaps.push((start, end - start));
        }
        at = at.max(o + len);
    }
    gaps
}

/// The largest free stretch of the keyslots area (the first of equals), where a run
/// that keeps its data in place puts its journal or checksums, as cryptsetup's
/// `LUKS2_find_area_max_gap`. Not only the room after the last keyslot: a LUKS1 header
/// converted by cryptsetup with keyslot 7 in use has none there, and its decryption was
/// refused for "no free room" (a trial).
fn free_keyslot_room(hdr: &Luks2Header) -> (u64, u64) {
    keyslot_gaps(hdr).into_iter().fold(
        (hdr.areas_end(), 0),
        |best, g| if g.1 > best.1 { g } else { best },
    )
}

/// The first free stretch of at least `len` bytes (a datashift run's 4096-byte area),
/// as cryptsetup's `LUKS2_find_area_gap`.
fn first_keyslot_gap(hdr: &Luks2Header, len: u64) -> Option<u64> {
    keyslot_gaps(hdr)
        .into_iter()
        .find(|g| g.1 >= len)
        .map(|g| g.0)
}

/// Journal and checksum modes alternate between two halves of the free room, so hotzone
/// k's journal (or checksums) is written and flushed while hotzone k-1, whose area the
/// header still names, is being written and flushed: one commit then names the other
/// half. None when a half would hold less than [`min_half`]: the run then uses one area
/// and waits, as cryptsetup does. cryptsetup reads the area from the keyslot JSON, so it
/// recovers and resumes either half.
fn area_halves(hdr: &Luks2Header, res: Resilience, sums: Sums) -> Option<[(u64, u64); 2]> {
    let (off, size) = free_keyslot_room(hdr);
    let half = size / 2 / CHECKSUM_BLOCK as u64 * CHECKSUM_BLOCK as u64;
    (half >= min_half(res, sums)?).then_some([(off, half), (off + half, half)])
}

/// Smallest half worth double-buffering: one default chunk of journal, the
/// checksums of a default hotzone. None: the mode has no area to double-buffer.
fn min_half(res: Resilience, sums: Sums) -> Option<u64> {
    match res {
        Resilience::Journal => Some(4 << 20),
        Resilience::Checksum => Some(sums.area_for(Tuning::default().hotzone)),
        Resilience::None | Resilience::Datashift => None,
    }
}

/// The reencryption area of a new run that keeps the data in place, in the free keyslot
/// room `(offset, size)`: the first half when the mode double-buffers, checksums as
/// `sums` says. None for datashift (the data moves).
fn detached_area(
    hdr: &Luks2Header,
    res: Resilience,
    sums: Sums,
    offset: u64,
    size: u64,
) -> Option<ReencryptArea> {
    let (offset, size) = area_halves(hdr, res, sums).map_or((offset, size), |h| h[0]);
    Some(match res {
        Resilience::Checksum => ReencryptArea::Checksum {
            offset,
            size,
            hash: sums.hash.name().into(),
            sector_size: sums.block as u32,
        },
        Resilience::Journal => ReencryptArea::Journal { offset, size },
        Resilience::None => ReencryptArea::None { offset, size },
        Resilience::Datashift => return None,
    })
}

/// The checksums of a run luksify starts: `hash` over the unit a power cut may tear a
/// data write at, or the encryption sector if larger (cryptsetup's choice: 512 bytes on
/// most block devices, 4096 on files).
///
/// A data area that is not whole blocks of that size (a partition of an odd number of
/// 512-byte sectors) gets 512-byte checksums, so that every byte of its last hotzone
/// is covered: cryptsetup's recovery checks only the whole blocks of a hotzone.
fn new_sums(data_write_unit: u64, sector_size: u32, hash: Hash, data_len: u64) -> Sums {
    let block = data_write_unit
        .max(u64::from(sector_size))
        .clamp(512, CHECKSUM_BLOCK as u64);
    Sums {
        hash,
        block: if data_len.is_multiple_of(block) {
            block
        } else {
            512
        } as usize,
    }
}

/// A detached header file that was deleted (unlinked) while the run had it open: its
/// path, from `/proc/self/fd`. The run would go on and finish into a file no one can
/// reach, the volume's only key with it (a trial: "encryption finished", exit 0).
fn unlinked_header_path<H: Disk + ?Sized>(disk: &H) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let fd = disk.raw_fd()?;
    let link = std::path::PathBuf::from(format!("/proc/self/fd/{fd}"));
    let md = std::fs::metadata(&link).ok()?;
    if !md.is_file() || md.nlink() > 0 {
        return None;
    }
    let target = std::fs::read_link(&link).ok()?;
    let t = target.to_string_lossy();
    Some(std::path::PathBuf::from(
        t.strip_suffix(" (deleted)").unwrap_or(&t),
    ))
}

/// Writes the open (deleted) header file's bytes back at `path` (or beside it, when
/// another file took the name), durably; returns where.
fn restore_unlinked_header<H: Disk + ?Sized>(
    disk: &H,
    path: &std::path::Path,
) -> Result<std::path::PathBuf> {
    use std::io::Write as _;
    let beside = std::path::PathBuf::from(format!("{}.luksify-recovered", path.display()));
    let (at, mut f) = [path.to_path_buf(), beside]
        .into_iter()
        .find_map(|p| {
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&p)
                .ok()
                .map(|f| (p, f))
        })
        .ok_or_else(|| {
            Error::Refused(format!(
                "{}, the run's header, was deleted while the run went on, and no copy could be written back there",
                path.display()
            ))
        })?;
    let size = disk
        .size()
        .map_err(|e| Error::io("size of the header", e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let n = (buf.len() as u64).min(size - off) as usize;
        disk.read_at(off, &mut buf[..n])
            .map_err(|e| Error::io("read the deleted header", e))?;
        f.write_all(&buf[..n])
            .map_err(|e| Error::io("write the header back", e))?;
        off += n as u64;
    }
    f.sync_all()
        .map_err(|e| Error::io("flush the header written back", e))?;
    if let Some(dir) = at.parent().and_then(|d| std::fs::File::open(d).ok()) {
        let _ = dir.sync_all();
    }
    Ok(at)
}

impl<H: Disk + ?Sized> Journal for HeaderJournal<'_, H> {
    fn commit(&mut self, p: Progress) -> Result<()> {
        // Before this commit writes anything: the file still holds the last commit,
        // whose hotzone's data is durable, and this one's data is not written yet.
        if !self.on_data {
            if let Some(path) = unlinked_header_path(self.disk) {
                self.flush_secondary()?;
                let at = restore_unlinked_header(self.disk, &path)?;
                return Err(Error::Refused(format!(
                    "{}, the run's header, was deleted while the run went on (it holds the volume's key): luksify stopped and wrote it back to {}, as the run's last commit left it; continue with `luksify resume` of the same device with --header {} (nothing is lost)",
                    path.display(),
                    at.display(),
                    at.display()
                )));
            }
        }
        if let Some(a) = self.next_area.take() {
            reencrypt::set_area_cached(
                &mut self.hdr.metadata,
                &mut self.st,
                a,
                self.vk,
                &mut self.digests,
            )?;
        }
        reencrypt::set_progress(&mut self.hdr.metadata, &self.st, p)?;
        self.flush_secondary()?;
        // Primary written and flushed, secondary only written: one flush fewer per
        // hotzone. The next header write waits for a flush (see `Journal::commit`).
        self.hdr.write_secondary_unflushed(self.disk)?;
        self.secondary_unflushed = true;
        self.st.progress = p;
        Ok(())
    }
    fn data_durable(&mut self) {
        if self.on_data {
            self.secondary_unflushed = false;
        }
    }
    fn finish(&mut self) -> Result<()> {
        self.flush_secondary()?;
        // The run is over: nothing left to resume, so no device to recognise.
        self.hdr
            .metadata
            .tokens
            .retain(|_, t| t.kind != identity::TOKEN_TYPE && t.kind != identity::SIZE_TOKEN_TYPE);
        if self.st.mode == ReencryptMode::Decrypt {
            // As cryptsetup leaves it: a header with one linear segment and no
            // keyslots, and the keyslot areas (split volume key) zeroed. The final
            // header is committed *before* the wipe: a power cut in between leaves a
            // finished, keyless header (the wipe is only hygiene), whereas the reverse
            // order would leave a header still "in progress" whose keyslots no
            // longer unlock, and so a run that cannot be resumed.
            // A decryption's header is always detached, never on the data.
            reencrypt::finish_decrypt(&mut self.hdr.metadata, &self.st);
            self.hdr.write(self.disk)?;
            zero_keyslot_area(self.disk, &self.hdr)?;
        } else {
            // As cryptsetup's final header: the keyslots area takes all the room up to
            // the data (a smaller --luks2-keyslots-size grows), on a header device that
            // holds it. The room gets random bytes first: with the header in front it
            // still holds the device's original plaintext there.
            let md = self.hdr.hdr_size;
            let old = self.hdr.metadata.config.keyslots_size;
            if let Some(new) = luks2::keyslots_size_for_offset(md, self.st.layout.data_offset) {
                let fits =
                    self.disk.can_grow() || self.disk.size().is_ok_and(|n| n >= 2 * md + new);
                if new > old && fits {
                    engine::wipe_random(self.disk, 2 * md + old, new - old, "the keyslots area")?;
                    self.hdr.metadata.config.keyslots_size = new;
                }
            }
            reencrypt::finish_encrypt(&mut self.hdr.metadata, &self.st);
            // The resilience areas held the last hotzones' old bytes (a journal's are
            // plaintext) or checksums of them: random bytes over all the room no
            // keyslot uses, as cryptsetup leaves it. Only once the final header is
            // durable (until then a crash may need them), and under a marker token in
            // that header, dropped after the wipe: a wipe cut short (a crash, a write
            // error) leaves a finished header that says so, and `resume` redoes it
            // (a trial found 15 MiB of plaintext left behind a failed wipe, with
            // nothing able to finish it).
            let (off, len) = free_keyslot_room(&self.hdr);
            if len > 0 {
                set_wipe_pending(&mut self.hdr, true);
                self.hdr.write(self.disk)?;
                engine::wipe_random(self.disk, off, len, "the resilience area")?;
                set_wipe_pending(&mut self.hdr, false);
            }
            self.hdr.write(self.disk)?;
        }
        Ok(())
    }
    fn area_write(&mut self, off: u64, data: &[u8]) -> Result<()> {
        self.disk
            .write_at(self.live_area().offset() + off, data)
            .map_err(|e| Error::io("write resilience area", e))
    }
    fn area_read(&mut self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.disk
            .read_at(self.live_area().offset() + off, buf)
            .map_err(|e| Error::io("read resilience area", e))
    }
    fn area_flush(&mut self) -> Result<()> {
        self.disk
            .flush()
            .map_err(|e| Error::io("flush header", e))?;
        self.secondary_unflushed = false;
        Ok(())
    }
    fn use_spare_area(&mut self) -> Option<u64> {
        let [h0, h1] = self.halves?;
        let cur = (self.st.area.offset(), self.st.area.size());
        // The committed header names `cur`: the other half is free. If it names
        // something else (a run cryptsetup started), only a clean state frees it.
        let spare = if cur == h0 {
            h1
        } else if cur == h1 || self.st.progress.hot_len == 0 {
            h0
        } else {
            return None;
        };
        let (offset, size) = spare;
        self.next_area = Some(match &self.st.area {
            ReencryptArea::Journal { .. } => ReencryptArea::Journal { offset, size },
            ReencryptArea::Checksum {
                hash, sector_size, ..
            } => ReencryptArea::Checksum {
                offset,
                size,
                hash: hash.clone(),
                sector_size: *sector_size,
            },
            _ => return None,
        });
        Some(offset)
    }
}

fn resilience_of(a: &ReencryptArea) -> Result<Resilience> {
    Ok(match a {
        ReencryptArea::None { .. } => Resilience::None,
        ReencryptArea::Checksum {
            hash, sector_size, ..
        } => {
            sums_of("checksum", hash, *sector_size)?;
            Resilience::Checksum
        }
        ReencryptArea::Journal { .. } => Resilience::Journal,
        // cryptsetup's decryption with a moved head: the tail moves down (datashift),
        // the head is protected as `head_resilience` says.
        ReencryptArea::Datashift { .. } | ReencryptArea::DatashiftJournal { .. } => {
            Resilience::Datashift
        }
        ReencryptArea::DatashiftChecksum { .. } => {
            head_resilience(a)?;
            Resilience::Datashift
        }
    })
}

/// A checksum area's hash and block, if luksify can walk it: any hash
/// [`luksify_luks::hash::Hash`] knows (all of cryptsetup's OpenSSL backend) over 512 to
/// 4096-byte blocks (a power of two); anything else is cryptsetup's to finish.
fn sums_of(kind: &str, hash: &str, sector_size: u32) -> Result<Sums> {
    let block = sector_size as usize;
    match luksify_luks::hash::Hash::parse(hash) {
        Ok(h) if block.is_power_of_two() && (512..=CHECKSUM_BLOCK).contains(&block) => {
            Ok(Sums { hash: h, block })
        }
        _ => Err(Error::Refused(format!(
            "{kind} resilience with {hash} over {sector_size}-byte blocks is not supported ({} over 512 to 4096 bytes are); finish it with `cryptsetup reencrypt --resume-only`",
            luksify_luks::hash::Hash::names()
        ))),
    }
}

/// The checksum spec of a run's area ([`Sums::SHA256_4K`] for areas without checksums).
fn area_sums(a: &ReencryptArea) -> Result<Sums> {
    match a {
        ReencryptArea::Checksum {
            hash, sector_size, ..
        } => sums_of("checksum", hash, *sector_size),
        ReencryptArea::DatashiftChecksum {
            hash, sector_size, ..
        } => sums_of("datashift-checksum", hash, *sector_size),
        _ => Ok(Sums::SHA256_4K),
    }
}

/// How the moved head of a head-last decryption (`EncryptLayout::head_last`) is
/// protected while it is decrypted in place: the area's checksums or journal.
fn head_resilience(a: &ReencryptArea) -> Result<Resilience> {
    match a {
        ReencryptArea::DatashiftChecksum {
            hash, sector_size, ..
        } => {
            sums_of("datashift-checksum", hash, *sector_size)?;
            Ok(Resilience::Checksum)
        }
        ReencryptArea::DatashiftJournal { .. } => Ok(Resilience::Journal),
        other => Err(Error::Refused(format!(
            "a moved first segment with resilience {other:?} cannot be decrypted in place; finish it with `cryptsetup reencrypt --resume-only`"
        ))),
    }
}

/// Request size: `chunk`, but small enough that a hotzone is at least
/// [`MIN_CHUNKS_PER_ZONE`] requests (a power of two, at least 64 KiB).
///
/// Why: the workers overlap reading hotzone k+1 with writing hotzone k, and at
/// each commit whichever worker finishes first waits for the last chunk of the
/// zone. A journal hotzone is bounded by half the keyslots room (7.8 MiB in a
/// default 16 MiB area), only two 4 MiB chunks, so a worker sat idle about half
/// of every zone: 1 MiB requests made journal mode 10-15 % faster on tmpfs
/// (2 GiB: 1.16-1.19 s -> 1.00-1.05 s), while the 16 MiB hotzones of the other
/// modes keep their 4 MiB requests (1 MiB measured slightly slower there).
fn chunk_for(chunk: usize, hotzone: u64) -> usize {
    let quarter = (hotzone / MIN_CHUNKS_PER_ZONE) as usize;
    let floor_pow2 = if quarter == 0 {
        0
    } else {
        1usize << quarter.ilog2()
    };
    chunk.min(floor_pow2.max(64 << 10))
}

/// See [`chunk_for`].
const MIN_CHUNKS_PER_ZONE: u64 = 4;

/// Largest hotzone the area and memory allow.
fn hotzone_for(
    res: Resilience,
    area: &ReencryptArea,
    layout: &EncryptLayout,
    t: Tuning,
    sums: Sums,
) -> u64 {
    let align = |n: u64| n / CHECKSUM_BLOCK as u64 * CHECKSUM_BLOCK as u64;
    match res {
        Resilience::Checksum => align(t.hotzone.min(sums.covered(area.size()))),
        Resilience::Journal => align(t.hotzone.min(area.size())),
        Resilience::None => align(t.hotzone),
        // Encrypt: one hotzone per shift: cryptsetup's recovery reads the whole
        // moved segment as the hotzone at offset 0. Data are streamed, so this
        // costs no memory. Decrypt: the data moves down by the shift; a hotzone
        // no larger than the shift never overwrites its own (or a later) source,
        // so recovery can always re-read it.
        Resilience::Datashift => match (layout.shift, area) {
            // Head-last decryption: each tail hotzone moves down by the shift, so one
            // no larger than it never overwrites its own source.
            (Some(_), ReencryptArea::DatashiftChecksum { shift_size, .. })
            | (Some(_), ReencryptArea::DatashiftJournal { shift_size, .. }) => {
                align(t.hotzone.min(*shift_size))
            }
            (Some(s), _) => s.size,
            (None, ReencryptArea::Datashift { shift_size, .. }) => {
                align(t.hotzone.min(*shift_size))
            }
            _ => 0,
        },
    }
}

fn is_luks<D: Disk + ?Sized>(d: &D) -> Result<bool> {
    Ok(luksify_luks::probe(d)?.is_some())
}

/// True when `d`'s header is a data-shift encryption that has not committed any
/// hotzone yet (nothing walked; only the start's own writes happened).
fn ours_before_first_commit<D: Disk + ?Sized>(d: &D) -> Result<bool> {
    let Ok((hdr, _)) = Luks2Header::read(d) else {
        return Ok(false);
    };
    Ok(matches!(
        reencrypt::state(&hdr.metadata),
        Ok(Some(st)) if st.mode == ReencryptMode::Encrypt
            && st.layout.shift.is_some()
            && st.progress.hot_len == 0
            && Some(st.progress.hot_start) == st.layout.data_size
    ))
}

/// True when `d` looks like LUKS2 (a magic is there) but neither header copy is
/// valid: what a crash while the first header was being written leaves behind.
fn luks2_without_valid_copy<D: Disk + ?Sized>(d: &D) -> Result<bool> {
    if luksify_luks::probe(d)? != Some(luksify_luks::Version::Luks2) {
        return Ok(false);
    }
    Ok(matches!(
        Luks2Header::read(d),
        Err(luksify_luks::Error::NoValidHeader { .. } | luksify_luks::Error::NotLuks)
    ))
}

/// What a new header file (detached encryption, or a decryption moving the header
/// out) holds in its primary area until its first header is complete: this magic,
/// then zeros. The secondary copy goes down first, so while the primary area still
/// holds this, no copy was ever complete and the data was not touched.
pub const NEW_STORE_MAGIC: &[u8; 16] = b"LUKSIFY-NEWHDR-1";

/// The blank header areas of a new header file (`len` bytes: both copies).
fn new_store_areas(len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    b[..NEW_STORE_MAGIC.len()].copy_from_slice(NEW_STORE_MAGIC);
    b
}

/// Writes [`NEW_STORE_MAGIC`]'s page to a new header store and makes it durable before
/// anything else goes there: a cut in the writes that follow then leaves a store that
/// says it is ours ([`is_cut_new_header`]), whichever of them landed, and the same
/// command runs again over it rather than taking it for someone's data.
fn mark_new_store<H: Disk + ?Sized>(m: &H) -> Result<()> {
    m.write_at(0, &new_store_areas(4096))
        .map_err(|e| Error::io("write header file", e))?;
    m.flush().map_err(|e| Error::io("flush header", e))
}

/// True when `d` is a header file whose first header write was cut: the primary
/// area still holds [`NEW_STORE_MAGIC`] and zeros, and no header copy is valid (or
/// the file is all zeros: reserved, nothing written). Such a file holds nothing
/// and may be reused by the same command run again.
pub fn is_cut_new_header<D: Disk + ?Sized>(d: &D) -> Result<bool> {
    let mut b = [0u8; 4096];
    let size = d
        .size()
        .map_err(|e| Error::io("size of the header file", e))?;
    // A file shorter than the marker block: that block's write torn by a power cut
    // (whole sectors of it landed, 3584 bytes in a power-cut test). What landed is
    // sectors of the marker block, or of the zeros it carries.
    let have = size.min(b.len() as u64) as usize;
    match d.read_at(0, &mut b[..have]) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(Error::io("read the header file", e)),
    }
    if have < b.len() {
        let rest_zero = |from: usize| b[from.min(have)..have].iter().all(|&x| x == 0);
        return Ok(rest_zero(0)
            || (have >= NEW_STORE_MAGIC.len()
                && &b[..NEW_STORE_MAGIC.len()] == NEW_STORE_MAGIC
                && rest_zero(NEW_STORE_MAGIC.len())));
    }
    let marked = &b[..NEW_STORE_MAGIC.len()] == NEW_STORE_MAGIC
        && b[NEW_STORE_MAGIC.len()..].iter().all(|&x| x == 0);
    if marked {
        return Ok(!is_luks(d)? || luks2_without_valid_copy(d)?);
    }
    // Reserved (the CLI allocates the file first) but not one byte written yet.
    all_zero(d, 64 << 20)
}

/// Refuses a detached header store that reaches the data's own bytes (the same file,
/// a link to it, a loop device over it): the header would overwrite the data's first
/// mebibytes.
fn refuse_header_on_data<D: Disk + ?Sized, H: Disk + ?Sized>(data: &D, meta: &H) -> Result<()> {
    if lock::same_store(data, meta) {
        return Err(Error::Refused(
            "the header store is the data itself (the same file, a link to it, or a loop device over it): the header would overwrite the data; put the header on other storage (nothing was written)".into(),
        ));
    }
    Ok(())
}

/// Refuses a header store (not a LUKS header) that holds someone's data, which the
/// header would overwrite: a file with anything but zeros in its first 64 MiB (a new,
/// empty or reserved file passes, as does ours cut during its first header write), or a
/// block device holding a filesystem or swap area.
fn refuse_foreign_header_store<H: Disk + ?Sized>(m: &H) -> Result<()> {
    let size = m
        .size()
        .map_err(|e| Error::io("size of the header store", e))?;
    if size == 0 {
        return Ok(());
    }
    if m.can_grow() {
        if is_cut_new_header(m)? || zero_up_to_from(m, 0, 64 << 20)? {
            return Ok(());
        }
        return Err(Error::Refused(format!(
            "the header file already holds {size} bytes of other data (no LUKS header), which the header would overwrite: name a new or empty file (nothing was written)"
        )));
    }
    if let Some(fs) = fsprobe::probe(m).map_err(|e| Error::io("read the header device", e))? {
        return Err(Error::Refused(format!(
            "the header device holds {}, which the header would overwrite: wipe it first (wipefs -a) or choose another device (nothing was written)",
            fs.kind.noun()
        )));
    }
    Ok(())
}

/// True when `len` bytes of `d` from `start` are all zeros (or past its end).
fn zero_up_to_from<D: Disk + ?Sized>(d: &D, start: u64, len: u64) -> Result<bool> {
    let size = d
        .size()
        .map_err(|e| Error::io("size of the header file", e))?;
    let len = len.min(size.saturating_sub(start));
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < len {
        let n = (buf.len() as u64).min(len - off) as usize;
        d.read_at(start + off, &mut buf[..n])
            .map_err(|e| Error::io("read the header file", e))?;
        if buf[..n].iter().any(|&x| x != 0) {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}

/// True when `d` is at most `max` bytes and holds only zeros.
fn all_zero<D: Disk + ?Sized>(d: &D, max: u64) -> Result<bool> {
    let size = d
        .size()
        .map_err(|e| Error::io("size of the header file", e))?;
    if size == 0 || size > max {
        return Ok(false);
    }
    zero_up_to_from(d, 0, size)
}

/// A `--reduce-device-size` start cut while its first header was being written leaves
/// the device's head overwritten and its first part only in the moved copy, which only
/// the same command knows to put back. Any other layout (a detached header, another
/// reduction) would encrypt over it and lose that part: refused, nothing written. The
/// head alone cannot tell: the secondary header copy lands first, past the primary, so
/// the filesystem's superblock may still be there over overwritten group descriptors.
/// The marker is looked for by [`start_marker_anywhere`]: where a filesystem still reads
/// at the head, only past its end, where the marker sits (a filesystem filling the device
/// costs no read); else at every whole MiB from the end (a scan of 1024 positions of a
/// 2 GiB image took 0.06-0.12 s of cold reads on this disk). One written when the device
/// had another size refuses every command, the same one included.
fn refuse_other_layout_over_a_cut_shift_start<D: Disk + ?Sized>(
    data: &D,
    dev_size: u64,
    placement: Placement,
    detached: bool,
) -> Result<()> {
    let shift = match cut_start_on(data)?.1 {
        Some(m) if m.dev_size != dev_size => return Err(m.refusal(dev_size)),
        Some(m) => m.shift,
        None => return Ok(()),
    };
    if matches!(placement, Placement::Shift { reduce } if !detached && reduce == 2 * shift) {
        return Ok(());
    }
    Err(Error::Refused(format!(
        "an interrupted `luksify encrypt --reduce-device-size {}M` start is on this device: its first {} MiB are only in the copy moved to its end and its head may already be overwritten; run that same command (--reduce-device-size {}M, no --header) again to continue it (nothing was written)",
        (2 * shift) >> 20,
        shift >> 20,
        (2 * shift) >> 20
    )))
}

/// Whether the device starts with a LUKS2 header of volume `uuid` whose magic was
/// zeroed, and where its second copy is: what `cryptsetup reencrypt --decrypt --header
/// NEW` of a volume with its header in front leaves when cut as it sets up (it copied
/// the header to NEW and wiped the magic, before any data moved).
fn wiped_own_header_at_start<D: Disk + ?Sized>(data: &D, uuid: &str) -> Option<u64> {
    let mut b = [0u8; 512];
    data.read_at(0, &mut b).ok()?;
    let hdr_size = u64::from_be_bytes(b[8..16].try_into().ok()?);
    let id = b[168..208].split(|&c| c == 0).next()?;
    (b[..6] == [0; 6] && b[6..8] == [0, 2] && !uuid.is_empty() && id == uuid.as_bytes())
        .then_some(hdr_size)
}

/// The refusal for [`wiped_own_header_at_start`]: through the new header alone the
/// plaintext would stay at the data offset, where nothing finds the filesystem (a
/// trial's `luksify decrypt` did just that); with the magic back the device is the
/// volume as it was, which `luksify decrypt --header NEW` moves back to offset 0.
fn wiped_header_refusal(off: u64, second: u64) -> Error {
    Error::Refused(format!(
        "the device starts with this volume's own header, its magic wiped: a `cryptsetup reencrypt --decrypt --header FILE` of a volume with its header in front was cut as it set up, before any data moved. Decrypting through --header alone would leave the plaintext at byte {off}, where nothing finds the filesystem. Put the magic back (`printf 'LUKS\\272\\276' | dd of=DEV conv=notrunc status=none; printf 'SKUL\\272\\276' | dd of=DEV bs=1 seek={second} conv=notrunc status=none`), then run `luksify decrypt DEV --header NEWFILE`, which moves the data back to offset 0 (nothing was written)"
    ))
}

/// A resilience `none` encryption whose header records no progress at all: cryptsetup
/// writes nothing to the header while its `none` run walks (a run SIGKILLed after
/// rewriting 480 MB of 512 still reads as not begun), so starting it over would
/// encrypt the part already encrypted a second time and call it done (found by a
/// trial; cryptsetup's own `--resume-only` does just that). luksify's own `none` runs
/// (`ours`: the header carries the identity token luksify writes before its walk) name
/// their window hot before they write, so a cut one is refused by `recover`, and one
/// stopped cleanly, even at 0, wrote nothing past its progress (its probes check that).
/// For a run cryptsetup started only one that never wrote could be started again, and
/// that cannot be told from the header: the way out is a new run.
fn refuse_none_run_without_progress(
    st: &ReencryptState,
    detached: bool,
    ours: bool,
    dev_size: u64,
    restored: Option<(u64, u64)>,
) -> Result<()> {
    let none = matches!(
        st.area,
        luksify_luks::luks2::json::ReencryptArea::None { .. }
    );
    // Nothing done: forward, nothing before the start; backward (cryptsetup decrypts
    // a detached header's volume from the end), nothing after the end.
    let p = st.progress;
    let nothing = p.hot_len == 0
        && match st.direction {
            ReencryptDirection::Forward => p.hot_start == 0,
            ReencryptDirection::Backward => p.hot_start == u64::MAX || p.hot_start >= dev_size,
        };
    if ours || !(none && nothing) {
        return Ok(());
    }
    // The same for a decryption (a trial's killed `cryptsetup reencrypt --decrypt
    // --resilience none` was decrypted again from the start: the part done turned to
    // garbage, and `resume` said "decryption finished").
    // The user's word that every data byte is as before the run (none written, or all
    // restored from a backup) lets it walk from the start, as for a cut `none` range.
    let len = dev_size.saturating_sub(st.layout.old_offset);
    if st.mode == ReencryptMode::Decrypt && restored != Some((0, len)) {
        return Err(Error::Refused(format!(
            "this decryption uses resilience `none`, whose header records no progress until the run stops cleanly: if it was killed or lost power after it began (as a killed `cryptsetup reencrypt --decrypt --resilience none` leaves it), part of the device is already plaintext and decrypting it all again would turn that part into garbage (cryptsetup's `--resume-only` does just that). If no run ever wrote to the device (only `cryptsetup reencrypt --decrypt --init-only`), or you restored all of it from a backup taken before the run, resume with --restored 0..{len}, which walks it all from the start; otherwise keep the header file and restore the device from a backup first (nothing was written)"
        )));
    }
    if st.mode != ReencryptMode::Encrypt {
        return Ok(());
    }
    Err(Error::Refused(format!(
        "this encryption uses resilience `none`, whose header records no progress until the run stops cleanly: if it was killed or lost power after it began (as a `cryptsetup reencrypt --resilience none` run leaves it), part of the device is already encrypted and starting over would encrypt that part twice. If no run ever wrote to the device (only `cryptsetup reencrypt --init-only`), {}run `luksify encrypt` again; otherwise restore the device from a backup first (nothing was written)",
        if detached { "remove the header file and " } else { "" }
    )))
}

/// Refuses a whole disk that holds a partition table (an MBR with partition entries,
/// or a GPT): encrypting it in place would turn the table and every partition's start
/// into ciphertext, as cryptsetup warns ("already contains a 'dos' partition
/// signature") and stops. Called when no filesystem was recognised at its start (a FAT
/// or NTFS boot sector also ends in 55 AA, and starts with a jump).
fn refuse_partition_table<D: Disk + ?Sized>(data: &D) -> Result<()> {
    let mut b = vec![0u8; 8192];
    if data.size().unwrap_or(0) < b.len() as u64 {
        return Ok(());
    }
    data.read_at(0, &mut b)
        .map_err(|e| Error::io("read partition table", e))?;
    let gpt = &b[512..520] == b"EFI PART" || &b[4096..4104] == b"EFI PART";
    let mbr = b[510] == 0x55
        && b[511] == 0xAA
        && !matches!(b[0], 0xEB | 0xE9)
        && (0..4).any(|i| b[446 + 16 * i + 4] != 0);
    if gpt || mbr {
        return Err(Error::Refused(format!(
            "the device holds a {} partition table: encrypting the whole disk in place would turn the table and the start of every partition into ciphertext; encrypt one partition instead (e.g. /dev/sdX1, or `losetup -P` for an image's partitions) (nothing was written)",
            if gpt { "GPT" } else { "DOS (MBR)" }
        )));
    }
    Ok(())
}

/// A data area of `len` bytes that does not end on a whole `sector` cannot be
/// encrypted in sectors of that size (cryptsetup refuses such an explicit
/// `--sector-size` the same way, and picks 512 on its own).
fn refuse_partial_sector(len: u64, sector: u64) -> Result<()> {
    if len.is_multiple_of(sector) {
        return Ok(());
    }
    let fits = (9..=12)
        .rev()
        .map(|b| 1u64 << b)
        .find(|s| len.is_multiple_of(*s))
        .unwrap_or(512);
    Err(Error::Refused(format!(
        "the data area ({len} bytes) is not a whole number of {sector}-byte sectors: use --sector-size {fits} (nothing was written)"
    )))
}

/// Encrypts `data` in place. `meta` is the detached header store (`None` for
/// [`Placement::Shift`], where the header lives on `data`). Every check runs
/// before the first write; on refusal nothing has been written.
pub fn encrypt<D: Disk + Sync + ?Sized, H: Disk + Sync + ?Sized, P: AsRef<[u8]>>(
    data: &D,
    meta: Option<&H>,
    passphrase: P,
    opts: &EncryptOptions,
    ctl: &Control<'_>,
) -> Result<Outcome> {
    let dev_size = data
        .size()
        .map_err(|e| Error::io("size of the device", e))?;
    opts.tuning.check()?;
    if dev_size == 0 {
        return Err(Error::Refused(
            "the device is empty (0 bytes): nothing to encrypt; wrong device or image file? (nothing was written)".into(),
        ));
    }
    if !dev_size.is_multiple_of(512) {
        return Err(Error::Refused(format!(
            "the device's size, {dev_size} bytes, is not a whole number of 512-byte sectors: a block device always is; give an image file a size that is (e.g. `truncate -s {}`) (nothing was written)",
            dev_size.div_ceil(512) * 512
        )));
    }
    if let Some(m) = meta {
        refuse_header_on_data(data, m)?;
        lock::claim_header(m)?;
    }
    let placement = opts.placement.with_offset(opts.format.data_offset)?;
    refuse_other_layout_over_a_cut_shift_start(data, dev_size, placement, meta.is_some())?;
    let init_marker = match placement {
        Placement::Shift { reduce } if meta.is_none() => read_init_marker(data, dev_size, reduce)?,
        _ => false,
    };
    // A start cut while its first header was being written leaves the start marker and
    // a LUKS magic with no valid copy, or only the secondary copy valid (written and
    // flushed before the primary, whose area still holds the old first bytes, so
    // cryptsetup's isLuks says "not LUKS"): that run is continued, not refused.
    let cut_start =
        init_marker && (luks2_without_valid_copy(data)? || ours_before_first_commit(data)?);
    if is_luks(data)? && !cut_start {
        if luksify_luks::probe(data)? == Some(luksify_luks::Version::Luks1) {
            return Err(Error::Refused(
                "the device already holds a LUKS1 header: it is encrypted already (nothing was written)".into(),
            ));
        }
        // Both copies damaged: not a run `resume` can continue (a trial followed that
        // advice into resume's refusal).
        if let Err(e) = luksify_luks::luks2::Luks2Header::read(data) {
            return Err(Error::Refused(format!(
                "the device starts with a LUKS2 header that cannot be read ({e}): it is encrypted, or was; luksify writes nothing over it: restore the header from a backup (`cryptsetup luksHeaderRestore`), or, if the data on it is not wanted, wipe it first (`wipefs -a`) (nothing was written)"
            )));
        }
        return Err(Error::Refused(
            "the device already holds a LUKS header: it is encrypted already, or holds an interrupted run that `luksify resume` continues (nothing was written)".into(),
        ));
    }
    let sector = opts.format.sector_size as u64;
    // The filesystem on the device, read once for the checks below. After an
    // interrupted start the head may be half overwritten: it was checked then.
    let fs = if init_marker {
        None
    } else {
        fsprobe::probe(data).map_err(|e| Error::io("read superblock", e))?
    };
    // A filesystem whose blocks are smaller than the encryption sector could not be
    // used through the encrypted device (cryptsetup refuses it the same way).
    if let Some(fs) = fs.filter(|f| f.block_size != 0 && f.block_size < sector) {
        return Err(Error::Refused(format!(
            "--sector-size {sector} is larger than the {}-byte {} of {} on the device, which could then not be used; use --sector-size {} or less (nothing was written)",
            fs.block_size,
            // xfs's smallest I/O is its sector, not its block (trial N2).
            if fs.kind == fsprobe::FsKind::Xfs { "sectors" } else { "blocks" },
            fs.kind.noun(),
            fs.block_size
        )));
    }
    if fs.is_none() && !init_marker {
        refuse_partition_table(data)?;
    }
    let mut fmt = opts.format.clone();
    let (layout_of, res) = match (placement, meta) {
        (Placement::Detached { resilience }, Some(m)) => {
            if resilience == Resilience::Datashift {
                return Err(Error::Refused(
                    "datashift needs --reduce-device-size, not a detached header".into(),
                ));
            }
            if m.size().unwrap_or(0) > 0 && is_luks(m)? {
                // Ours, cut during its first header write: nothing was written to
                // the data, so start over.
                if !is_cut_new_header(m)? {
                    return Err(Error::Refused(
                        "the header file already holds a LUKS header: name a new file, or continue its interrupted run with `luksify resume` (nothing was written)"
                            .into(),
                    ));
                }
            } else {
                refuse_foreign_header_store(m)?;
            }
            fmt.detached = true;
            // `--offset`: the data starts there; the bytes before it stay as they are.
            let off = fmt.data_offset.unwrap_or(0);
            if !off.is_multiple_of(sector) || off + sector > dev_size {
                return Err(Error::Refused(format!(
                    "data offset {off} must be a multiple of the {sector}-byte sector and leave data on the {dev_size}-byte device"
                )));
            }
            refuse_partial_sector(dev_size - off, sector)?;
            fmt.data_offset = Some(off);
            (None, resilience)
        }
        (Placement::Shift { reduce }, None) => {
            let shift = reduce / 2;
            if reduce == 0 || reduce % (2 * CHECKSUM_BLOCK as u64) != 0 || shift % sector != 0 {
                return Err(Error::Refused(format!(
                    "--reduce-device-size {reduce} must be a non-zero multiple of 8 KiB (the header gets half of it); use 32M, cryptsetup's default (nothing was written)"
                )));
            }
            if dev_size < reduce + sector {
                return Err(Error::Refused(format!(
                    "device of {dev_size} bytes is too small for a {shift}-byte header plus a {shift}-byte shift and data; use a larger device, or put the header in a file with --header FILE (nothing was written)"
                )));
            }
            let data_size = dev_size - reduce;
            refuse_partial_sector(data_size, sector)?;
            // The header (both metadata copies and the smallest keyslots area) must fit
            // in front; a larger keyslots area asked for is decreased to what is left, as
            // cryptsetup does.
            let need = 2 * fmt.metadata_size + min_keyslots_size(fmt.key_size);
            if need > shift {
                return Err(Error::Refused(format!(
                    "the LUKS2 header needs {need} bytes (2 x {} metadata + keyslot 0 + reencryption area) but the data would start at {shift} (half of the reduction {reduce}): use --reduce-device-size {}M or a smaller --luks2-metadata-size",
                    fmt.metadata_size,
                    // The least whole MiB (it said 2M where 1M holds the header; a trial).
                    (2 * need).div_ceil(1 << 20)
                )));
            }
            if let Some(fs) = fs {
                if fs.size > data_size {
                    let fix = match fs.kind {
                        fsprobe::FsKind::Ext => format!(
                            "shrink the filesystem to at most {data_size} bytes first (e.g. resize2fs DEV {}K; resize2fs also shortens an image file, so then `truncate -s {dev_size} FILE` to give it back its size)",
                            data_size / 1024
                        ),
                        fsprobe::FsKind::Xfs => "xfs cannot shrink: keep the header in a file instead (--header FILE, no --reduce-device-size)".to_string(),
                        fsprobe::FsKind::Btrfs => format!(
                            "shrink it by at least {} MiB first while it is mounted (btrfs filesystem resize -{}M MOUNTPOINT; btrfs shrinks only online), or keep the header in a file (--header FILE, no --reduce-device-size)",
                            (fs.size - data_size).div_ceil(1 << 20),
                            (fs.size - data_size).div_ceil(1 << 20)
                        ),
                        fsprobe::FsKind::Swap => format!(
                            "a swap area keeps nothing across a reboot: swapoff it and make it again leaving the end free (mkswap DEV {}), or keep the header in a file (--header FILE, no --reduce-device-size)",
                            data_size / 1024
                        ),
                    };
                    return Err(Error::Refused(format!(
                        "{} spans {} bytes but only {data_size} may stay in use: the last {reduce} bytes must be free; {fix} (nothing was written)",
                        fs.kind.noun(), fs.size
                    )));
                }
            }
            fmt.detached = false;
            fmt.data_offset = Some(shift);
            let layout = EncryptLayout {
                mode: ReencryptMode::Encrypt,
                data_offset: shift,
                old_offset: 0,
                data_size: Some(data_size),
                encryption: fmt.cipher.clone(),
                sector_size: fmt.sector_size,
                shift: Some(Shift {
                    size: shift,
                    moved_offset: dev_size - shift,
                }),
            };
            (Some(layout), Resilience::Datashift)
        }
        (Placement::Detached { .. }, None) => {
            return Err(Error::Refused(
                "a detached header needs a header store (`meta`, --header FILE) (nothing was written)".into(),
            ))
        }
        (Placement::Shift { .. }, Some(_)) => {
            return Err(Error::Refused(
                "a data shift puts the header in front of the data: pass no header store (`meta`), or use a detached placement (nothing was written)".into(),
            ))
        }
    };

    // Build the header in memory first: nothing on disk says "LUKS" until the
    // complete reencryption state is there.
    let meta_len = fmt.header_size()?;
    // The keyslots area holds keyslot 0 and the reencryption area (at least a block).
    {
        let ks = fmt.keyslots_size_or_default()?;
        let need = min_keyslots_size(fmt.key_size);
        if ks < need {
            // With --offset the area is what the offset leaves after the metadata: a
            // larger --luks2-keyslots-size is cut back to it (a trial followed the old
            // advice, "--luks2-keyslots-size", and got the same refusal).
            // Unless the offset leaves room enough and --luks2-keyslots-size asked for
            // less (with a data shift, "use a larger --offset" changed nothing; a trial).
            let room = fmt
                .data_offset
                .map(|o| o.saturating_sub(2 * fmt.metadata_size));
            let fix = match fmt.data_offset.filter(|&o| o != 0) {
                Some(_) if !(fmt.keyslots_size.is_some() && room.is_some_and(|r| r >= need)) => {
                    format!(
                        "use a larger --offset (at least {} sectors)",
                        (2 * fmt.metadata_size + need).div_ceil(512)
                    )
                }
                _ => format!("use --luks2-keyslots-size {need} or more"),
            };
            return Err(Error::Refused(format!(
                "a {ks}-byte keyslots area cannot hold keyslot 0 and the reencryption area ({need} bytes with a {}-bit key): {fix} (nothing was written)",
                fmt.key_size * 8
            )));
        }
    }
    let stage = stage::SparseStage::new(meta_len);
    // Into memory only: a key derivation that cannot run here is refused with nothing
    // written (enable then puts the volume back instead of leaving it half prepared).
    let (mut hdr, vk) =
        Luks2Header::format(&stage, passphrase.as_ref(), &fmt).map_err(|e| match e {
            luksify_luks::Error::KdfTooCostly(m) => Error::Refused(format!(
                "key derivation: {m}; use --pbkdf-memory with less, or --pbkdf pbkdf2 (nothing was written)"
            )),
            e => e.into(),
        })?;
    // Not needed again: an owned passphrase (a `Zeroizing` buffer) is wiped now, not
    // after the walk, which can take hours (a trial found it in memory mid-walk).
    drop(passphrase);
    let key_digest = hdr
        .digest_id_for_keyslot(0)
        .ok_or(Error::Internal("formatted header has no keyslot digest"))?;
    let (ks_end, room) = free_keyslot_room(&hdr);
    let (layout, direction, area) = match layout_of {
        Some(l) => {
            let area = ReencryptArea::Datashift {
                offset: first_keyslot_gap(&hdr, 4096).unwrap_or(ks_end),
                size: 4096,
                shift_size: l.shift.map_or(0, |s| s.size),
            };
            (l, ReencryptDirection::Backward, area)
        }
        None => {
            let off = fmt.data_offset.unwrap_or(0);
            let sums = new_sums(
                data.write_unit(),
                fmt.sector_size,
                opts.checksum_hash,
                dev_size - off,
            );
            let area = detached_area(&hdr, res, sums, ks_end, room)
                .ok_or(Error::Internal("datashift with a detached header"))?;
            let l = EncryptLayout {
                mode: ReencryptMode::Encrypt,
                data_offset: off,
                old_offset: off,
                data_size: None,
                encryption: fmt.cipher.clone(),
                sector_size: fmt.sector_size,
                shift: None,
            };
            (l, ReencryptDirection::Forward, area)
        }
    };
    let st = reencrypt::init_encrypt(
        &mut hdr.metadata,
        key_digest,
        vk.as_bytes(),
        layout,
        direction,
        area,
    )?;

    let _lock = lock_volume(ctl, &hdr.uuid)?;
    // The last point nothing is written at (the key derivation above takes seconds).
    if cancelled(ctl) {
        return Ok(Outcome::NotStarted);
    }
    if let Some(f) = ctl.before_write {
        f();
    }
    // First writes. Data shift: copy the first `shift` bytes to the end, durable
    // before the header overwrites them.
    let areas = 2 * hdr.hdr_size;
    let store = match meta {
        Some(m) => {
            // A detached header is a fresh file: no data has been touched yet. Both
            // header areas go down blank (marked new) with the keyslots, then the
            // header secondary first (below): a cut anywhere before the primary is
            // complete leaves either a valid secondary or the marked primary.
            stage
                .write_at(0, &new_store_areas(areas as usize))
                .map_err(|e| Error::io("stage header", e))?;
            mark_new_store(m)?;
            copy_stage(&stage, 0, m)?;
            m.flush().map_err(|e| Error::io("flush header", e))?;
            HeaderStore {
                disk: &DynDisk(m),
                on_data: false,
            }
        }
        None => {
            let s = st
                .layout
                .shift
                .ok_or(Error::Internal("shift layout without shift"))?;
            if !init_marker {
                unmark_head(data, dev_size, s)?;
                move_first_segment(data, s)?;
            }
            write_start_markers(data, dev_size, s)?;
            copy_stage(&stage, areas, data)?;
            data.flush().map_err(|e| Error::io("flush keyslots", e))?;
            HeaderStore {
                disk: &DynDisk(data),
                on_data: true,
            }
        }
    };
    hdr.write_secondary_first(store.disk)?;
    // The staged keyslot area is not needed for the walk (its pages are wiped).
    drop(stage);
    run_from(data, store, hdr, st, vk, opts.tuning, ctl)
}

/// The smallest keyslots area a run can use: keyslot 0 (a `key_size`-byte key) and a
/// one-block reencryption area.
pub fn min_keyslots_size(key_size: usize) -> u64 {
    luksify_luks::luks2::keyslot::area_size(key_size, luksify_luks::af::DEFAULT_STRIPES)
        + CHECKSUM_BLOCK as u64
}

/// Object-safe view of any Disk so both header placements share one code path.
struct DynDisk<'a, T: Disk + Sync + ?Sized>(&'a T);
impl<T: Disk + Sync + ?Sized> Disk for DynDisk<'_, T> {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_at(off, buf)
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> std::io::Result<()> {
        self.0.write_at(off, buf)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }
    fn size(&self) -> std::io::Result<u64> {
        self.0.size()
    }
    fn write_unit(&self) -> u64 {
        self.0.write_unit()
    }
    fn can_grow(&self) -> bool {
        self.0.can_grow()
    }
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        self.0.raw_fd()
    }
    fn lock_metadata(
        &self,
        exclusive: bool,
    ) -> std::io::Result<Option<luksify_luks::io::MetadataLock>> {
        self.0.lock_metadata(exclusive)
    }
}

/// Writes the staged header area from `from` to its end onto `d` at the same
/// offsets, 1 MiB per request from one aligned buffer (O_DIRECT-ready).
fn copy_stage<D: Disk + ?Sized>(stage: &stage::SparseStage, from: u64, d: &D) -> Result<()> {
    let end = stage.size().map_err(|e| Error::io("stage size", e))?;
    let mut buf = device::AlignedBuf::new(1 << 20);
    let mut off = from;
    while off < end {
        let n = (buf.len() as u64).min(end - off) as usize;
        stage
            .read_at(off, &mut buf[..n])
            .map_err(|e| Error::io("read staged header", e))?;
        d.write_at(off, &buf[..n])
            .map_err(|e| Error::io("write header", e))?;
        off += n as u64;
    }
    Ok(())
}

const INIT_MAGIC: &[u8; 16] = b"LUKSIFY-SHIFT-V1";
/// The end marker once the start may write over the head (the keyslot area next): from
/// then the moved copy counts whatever the head shows, repaired by hand or not.
const OVERWRITE_MAGIC: &[u8; 16] = b"LUKSIFY-SHIFT-OW";

/// Marker block `m` with `magic` (and its own hash over the first 64 bytes again).
fn with_magic(m: &[u8], magic: &[u8; 16]) -> device::AlignedBuf {
    let mut b = device::AlignedBuf::new(4096);
    b[..96].copy_from_slice(&m[..96]);
    b[..16].copy_from_slice(magic);
    let sum = sha2::Sha256::digest(&b[..64]);
    b[64..96].copy_from_slice(&sum);
    b
}

/// Where the start marker goes: the first unused block below the moved copy,
/// which nothing writes until the header (and so the journal) is valid.
fn marker_offset(dev_size: u64, shift: u64) -> u64 {
    dev_size - 2 * shift
}

/// The start marker's block: the device's size, the shift, a hash of the moved copy,
/// and a hash of those.
fn init_marker_block<D: Disk + ?Sized>(
    data: &D,
    dev_size: u64,
    s: Shift,
) -> Result<device::AlignedBuf> {
    let mut m = device::AlignedBuf::new(4096);
    m[..16].copy_from_slice(INIT_MAGIC);
    m[16..24].copy_from_slice(&dev_size.to_le_bytes());
    m[24..32].copy_from_slice(&s.size.to_le_bytes());
    let h = hash_range(data, s.moved_offset, s.size)?;
    m[32..64].copy_from_slice(&h);
    let self_sum = sha2::Sha256::digest(&m[..64]);
    m[64..96].copy_from_slice(&self_sum);
    Ok(m)
}

/// Records, durably, that the first segment was moved before the keyslot area goes over
/// the device's first bytes (their copy at the end is what counts from then on), with a
/// hash of the moved copy: a run cut before its header lands then resumes from the copy
/// instead of re-copying a damaged head. The marker block goes below the moved copy,
/// then at byte 0, then below the copy again, each flushed:
/// - below the moved copy first, before any byte of the head changes: a write to the
///   head cut by a power loss may land in part, and the marker must already be there.
///   It also outlives the primary header's write over byte 0.
/// - at byte 0 it hides the filesystem until the primary header replaces it. The old
///   one showed, its superblock intact over blocks already overwritten, for `mount` or
///   `fsck` to take (trial C2). An `encrypt` over a device grown since finds the marker
///   by this copy wherever the size puts the other.
/// - below the moved copy again, as [`OVERWRITE_MAGIC`]: from here the keyslot area
///   goes over the head, and a head repaired by hand since (`e2fsck -y`, `xfs_repair`
///   over the keyslot bytes) is not the data; the copy is (trial V10: taken for the data,
///   the repaired head was moved over the intact copy and every file was lost).
///
/// A cut before the last leaves the filesystem as it was but for the marker at byte 0
/// (which may not have landed whole), and its user may change it (trials R3, V9 mounted
/// it): [`read_init_marker`] then takes the head, not the older copy.
/// A rerun writes all three again (the same bytes: its moved copy was checked against
/// them).
fn write_start_markers<D: Disk + ?Sized>(data: &D, dev_size: u64, s: Shift) -> Result<()> {
    let m = init_marker_block(data, dev_size, s)?;
    let end = marker_offset(dev_size, s.size);
    let over = with_magic(&m, OVERWRITE_MAGIC);
    for (at, b) in [(end, &m), (0, &m), (end, &over)] {
        data.write_at(at, b)
            .map_err(|e| Error::io_at("write start marker", at, b.len(), e))?;
        data.flush()
            .map_err(|e| Error::io("flush start marker", e))?;
    }
    Ok(())
}

/// A start marker found on the device, maybe written when it had another size.
struct FoundStart {
    /// The device's size then.
    dev_size: u64,
    shift: u64,
}

impl FoundStart {
    fn refusal(&self, now: u64) -> Error {
        Error::Refused(format!(
            "an interrupted `luksify encrypt --reduce-device-size {}M` start is on this device, which was {} bytes then and is {now} now: its first {} MiB are only in the copy moved to byte {}; give the device back its size of {} bytes (an image file: `truncate -s {} FILE`) and run that same command again (nothing was written)",
            (2 * self.shift) >> 20,
            self.dev_size,
            self.shift >> 20,
            self.dev_size - self.shift,
            self.dev_size,
            self.dev_size
        ))
    }
}

/// An interrupted `encrypt --reduce-device-size` start on `data` (cut while it wrote its
/// first header: the head overwritten, its first part only in the copy moved to the
/// end): the reduction that run used and the device's size then. The filesystem at the
/// head may still read as intact (its superblock lands last): a preflight must not call
/// such a device fine.
pub fn interrupted_shift_start<D: Disk + ?Sized>(data: &D) -> Result<Option<(u64, u64)>> {
    Ok(cut_start_on(data)?.1.map(|m| (2 * m.shift, m.dev_size)))
}

/// The device's size and the start marker found on it ([`start_marker_anywhere`], from
/// the end of the filesystem at its head, if any).
fn cut_start_on<D: Disk + ?Sized>(data: &D) -> Result<(u64, Option<FoundStart>)> {
    let dev_size = data
        .size()
        .map_err(|e| Error::io("size of the device", e))?;
    if dev_size >= 4096 {
        if let Some((rec_dev, shift)) = marker_fields(data, 0)? {
            return Ok((
                dev_size,
                Some(FoundStart {
                    dev_size: rec_dev,
                    shift,
                }),
            ));
        }
    }
    let fs_end = fsprobe::probe(data)
        .map_err(|e| Error::io("read superblock", e))?
        .map_or(0, |f| f.size);
    Ok((dev_size, start_marker_anywhere(data, dev_size, fs_end)?))
}

/// The start marker block at `pos`, if one valid in itself is there.
fn marker_block<D: Disk + ?Sized>(data: &D, pos: u64) -> Result<Option<device::AlignedBuf>> {
    let mut m = device::AlignedBuf::new(4096);
    data.read_at(pos, &mut m)
        .map_err(|e| Error::io_at("read start marker", pos, m.len(), e))?;
    let valid = (&m[..16] == INIT_MAGIC || &m[..16] == OVERWRITE_MAGIC)
        && sha2::Sha256::digest(&m[..64])[..] == m[64..96];
    Ok(valid.then_some(m))
}

/// A start marker block (valid in itself) at `pos`: (recorded size, shift).
fn marker_fields<D: Disk + ?Sized>(data: &D, pos: u64) -> Result<Option<(u64, u64)>> {
    let Some(m) = marker_block(data, pos)? else {
        return Ok(None);
    };
    let le = |r: std::ops::Range<usize>| u64::from_le_bytes(m[r].try_into().expect("8 bytes"));
    let (rec_dev, shift) = (le(16..24), le(24..32));
    Ok((shift > 0 && rec_dev > 2 * shift).then_some((rec_dev, shift)))
}

/// A start marker (valid in itself) at `pos`, whatever device size it records, as long
/// as it sits where that size puts it: (recorded size, shift).
fn marker_at<D: Disk + ?Sized>(data: &D, pos: u64) -> Result<Option<(u64, u64)>> {
    Ok(marker_fields(data, pos)?
        .filter(|&(rec_dev, shift)| rec_dev.checked_sub(2 * shift) == Some(pos)))
}

/// A `--reduce-device-size` start cut during its first header write, found without
/// knowing its reduction or the device's size then: on a device that has grown since
/// (a cloud disk or an LV extended before the rerun) its marker is no longer where the
/// current size puts it, and a fresh `encrypt` overwrote the moved first part. Looked
/// for at the filesystem's end (the marker sits where the filesystem was shrunk to) and
/// at every whole MiB from the end down to it.
fn start_marker_anywhere<D: Disk + ?Sized>(
    data: &D,
    dev_size: u64,
    fs_end: u64,
) -> Result<Option<FoundStart>> {
    let at_fs_end =
        (fs_end > 0 && fs_end.is_multiple_of(4096) && fs_end + 8192 <= dev_size).then_some(fs_end);
    let from_end = (1..=2048u64)
        .map(|mib| mib << 20)
        .take_while(|back| *back + 8192 <= dev_size && dev_size - back >= fs_end)
        .map(|back| dev_size - back);
    for pos in at_fs_end.into_iter().chain(from_end) {
        if let Some((rec_dev, shift)) = marker_at(data, pos)? {
            return Ok(Some(FoundStart {
                dev_size: rec_dev,
                shift,
            }));
        }
    }
    Ok(None)
}

/// Whether a start of this reduction on a device of this size moved its first segment
/// and its copy at the end is what counts: the moved copy still has the hash that a start
/// marker ([`write_start_markers`]) recording this size and shift holds, and
/// - the one at the end says the head may be overwritten ([`OVERWRITE_MAGIC`]), or
/// - that marker is whole at byte 0 (written once the one at the end was durable), or
/// - the one at the end is, and the head has begun to be a LUKS header (its write over
///   byte 0 was cut), or still equals the moved copy, but for a cut write of the marker
///   at byte 0. A head that differs otherwise was changed after the cut, through the
///   filesystem it still showed (trial R3): it is the data, and a rerun moves it again.
fn read_init_marker<D: Disk + ?Sized>(data: &D, dev_size: u64, reduce: u64) -> Result<bool> {
    let shift = reduce / 2;
    // No start ever used a shift that is not whole 4 KiB blocks (the size check below
    // refuses it); nor can a marker be read at an unaligned offset.
    if shift == 0 || !shift.is_multiple_of(CHECKSUM_BLOCK as u64) || dev_size < 2 * shift + 4096 {
        return Ok(false);
    }
    let ours = |at| -> Result<Option<device::AlignedBuf>> {
        Ok(marker_block(data, at)?
            .filter(|m| m[16..24] == dev_size.to_le_bytes() && m[24..32] == shift.to_le_bytes()))
    };
    let (at_start, at_end) = (ours(0)?, ours(marker_offset(dev_size, shift))?);
    let Some(m) = at_start.as_ref().or(at_end.as_ref()) else {
        return Ok(false);
    };
    if hash_range(data, dev_size - shift, shift)?[..] != m[32..64] {
        return Ok(false);
    }
    if at_end.as_ref().is_some_and(|b| b[..16] == *OVERWRITE_MAGIC) {
        return Ok(true);
    }
    // The marker at byte 0 counts whole only (its bytes after the first 96 are zeros): a
    // power cut may land its first sector alone, the superblock at 1 KiB still there for
    // a mount (trial V9 mounted and changed it, and the rerun rolled that back); so may
    // `e2fsck` bring the superblock back from a backup over it.
    if at_start
        .as_ref()
        .is_some_and(|b| b[96..].iter().all(|&x| x == 0))
    {
        return Ok(true);
    }
    let mut head = device::AlignedBuf::new(4096);
    data.read_at(0, &mut head)
        .map_err(|e| Error::io_at("read first block", 0, head.len(), e))?;
    if head[..6] == *b"LUKS\xba\xbe" {
        return Ok(true);
    }
    // The head as it was before the marker's write at byte 0 (each 512-byte sector of it
    // that holds the marker's bytes lands whole or not at all) must hash as the copy.
    unmark_head_block(data, dev_size, shift, m, &mut head)?;
    Ok(hash_after(&head, data, 4096, shift - 4096)?[..] == m[32..64])
}

/// `head` (the device's first 4 KiB) with every 512-byte sector that holds what the start
/// marker `m` put there given back the moved copy's bytes: the head before the marker.
fn unmark_head_block<D: Disk + ?Sized>(
    data: &D,
    dev_size: u64,
    shift: u64,
    m: &[u8],
    head: &mut [u8],
) -> Result<()> {
    let mut moved = device::AlignedBuf::new(4096);
    data.read_at(dev_size - shift, &mut moved)
        .map_err(|e| Error::io_at("read moved segment", dev_size - shift, 4096, e))?;
    // The block as the start wrote it: its 96 bytes (with the first marker's magic),
    // then zeros (a block read back from byte 0 may be torn: the marker's first sector
    // over the filesystem's own).
    let mut written = [0u8; 4096];
    written[..96].copy_from_slice(&with_magic(m, INIT_MAGIC)[..96]);
    for ((h, c), w) in head
        .chunks_mut(512)
        .zip(moved.chunks(512))
        .zip(written.chunks(512))
    {
        if h == w {
            h.copy_from_slice(c);
        }
    }
    Ok(())
}

/// Before a start moves the first segment again over a cut one's (whose head counts:
/// [`read_init_marker`] said no): the sectors of the first block that still hold that
/// start's marker get their bytes back from its moved copy, when that copy is intact,
/// so the marker is not moved into the data as if it were the filesystem's.
fn unmark_head<D: Disk + ?Sized>(data: &D, dev_size: u64, s: Shift) -> Result<()> {
    let Some(m) = [0, marker_offset(dev_size, s.size)]
        .into_iter()
        .map(|at| marker_block(data, at))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .find(|m| m[16..24] == dev_size.to_le_bytes() && m[24..32] == s.size.to_le_bytes())
    else {
        return Ok(());
    };
    if hash_range(data, s.moved_offset, s.size)?[..] != m[32..64] {
        return Ok(());
    }
    let mut head = device::AlignedBuf::new(4096);
    data.read_at(0, &mut head)
        .map_err(|e| Error::io_at("read first block", 0, head.len(), e))?;
    let before = head.to_vec();
    unmark_head_block(data, dev_size, s.size, &m, &mut head)?;
    if head[..] != before[..] {
        data.write_at(0, &head)
            .map_err(|e| Error::io_at("write first block", 0, head.len(), e))?;
    }
    Ok(())
}

fn hash_range<D: Disk + ?Sized>(data: &D, off: u64, len: u64) -> Result<[u8; 32]> {
    hash_after(&[], data, off, len)
}

/// The SHA-256 of `first` followed by `len` bytes of `data` at `off`.
fn hash_after<D: Disk + ?Sized>(first: &[u8], data: &D, off: u64, len: u64) -> Result<[u8; 32]> {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(first);
    let mut buf = device::AlignedBuf::new(1 << 20);
    let mut done = 0;
    while done < len {
        let n = (buf.len() as u64).min(len - done) as usize;
        data.read_at(off + done, &mut buf[..n])
            .map_err(|e| Error::io_at("read moved segment", off + done, n, e))?;
        h.update(&buf[..n]);
        done += n as u64;
    }
    Ok(h.finalize().into())
}

/// Copies logical `[0, shift)` to the moved segment and flushes.
fn move_first_segment<D: Disk + ?Sized>(data: &D, s: Shift) -> Result<()> {
    let mut buf = device::AlignedBuf::new(1 << 20);
    let mut off = 0u64;
    while off < s.size {
        let n = (buf.len() as u64).min(s.size - off) as usize;
        data.read_at(off, &mut buf[..n])
            .map_err(|e| Error::io_at("read first segment", off, n, e))?;
        data.write_at(s.moved_offset + off, &buf[..n])
            .map_err(|e| Error::io_at("write moved segment", s.moved_offset + off, n, e))?;
        off += n as u64;
    }
    data.flush()
        .map_err(|e| Error::io("flush moved segment", e))
}

/// Where the header lives for a run: its device, and whether that is the data
/// device itself (header in front), so a data flush also makes header writes durable.
/// JSON room a run keeps free after adding its identity token (the hotzone's extra
/// segments and a longer reencrypt keyslot take about 1 KiB, the edges the commits add
/// to the token about 1 KiB).
const IDENTITY_SPARE_JSON: usize = 3072;

struct HeaderStore<'a> {
    disk: &'a (dyn Disk + Sync),
    on_data: bool,
}

fn run_from<D: Disk + Sync + ?Sized>(
    data: &D,
    store: HeaderStore<'_>,
    hdr: Luks2Header,
    st: ReencryptState,
    vk: VolumeKey,
    tuning: Tuning,
    ctl: &Control<'_>,
) -> Result<Outcome> {
    let HeaderStore {
        disk: meta,
        on_data,
    } = store;
    let res = resilience_of(&st.area)?;
    let cipher = SectorCipher::new(
        &st.layout.encryption,
        vk.as_bytes(),
        st.layout.sector_size as usize,
    )
    .map_err(Error::Cipher)?;
    let sums = area_sums(&st.area)?;
    let halves = area_halves(&hdr, res, sums);
    let mut t = tuning;
    t.hotzone = hotzone_for(res, &st.area, &st.layout, tuning, sums);
    if let Some([(offset, size), _]) = halves {
        // Every hotzone's journal (or checksums) must fit the half it is written to.
        let half = ReencryptArea::None { offset, size };
        t.hotzone = t
            .hotzone
            .min(hotzone_for(res, &half, &st.layout, tuning, sums));
    }
    if t.hotzone == 0 {
        return Err(Error::Refused(
            "resilience area too small for one hotzone".into(),
        ));
    }
    t.chunk = chunk_for(t.chunk, t.hotzone);
    let layout = st.layout.clone();
    let direction = st.direction;
    let mut p = st.progress;
    let mut j = HeaderJournal {
        disk: meta,
        hdr,
        st,
        halves,
        next_area: None,
        vk: vk.as_bytes(),
        digests: Default::default(),
        secondary_unflushed: false,
        on_data,
    };
    let head = match layout.head_last() {
        Some(m) if direction == ReencryptDirection::Forward => {
            Some((m, head_resilience(&j.st.area)?))
        }
        _ => None,
    };
    let w = Walk {
        data,
        meta,
        layout: &layout,
        direction,
        resilience: res,
        head,
        sums,
        cipher: &cipher,
        tuning: t,
        progress: ctl.progress,
        cancel: ctl.cancel,
        restored: ctl.restored,
    };
    // Every commit from here on knows where the data ends (see ReencryptState).
    let end = engine::data_end(&w)?;
    j.st.data_end = Some(end);
    // The device must be the one the run started on (detached headers, see identity):
    // checked before anything is read for the walk or written.
    let tag_key = identity::TagKey::of(|b: &mut [u8], l: u64| w.transform_serial(b, l))?;
    let has_token = match identity::find(j.hdr.metadata.tokens.values(), &j.st) {
        Some(t) => {
            identity::check(data, &j.st, p, t, &tag_key)?;
            true
        }
        None => false,
    };
    identity::check_size(j.hdr.metadata.tokens.values(), &j.st, end)?;
    if p.hot_len > 0 {
        p = w.recover(&mut j, p)?;
    }
    let has_size_token = j
        .hdr
        .metadata
        .tokens
        .values()
        .any(|t| t.kind == identity::SIZE_TOKEN_TYPE);
    if !has_token && !has_size_token {
        if let Some(t) = identity::size_token(&j.st, end) {
            let tokens = &mut j.hdr.metadata.tokens;
            let id = (0..).find(|i| !tokens.contains_key(i)).unwrap_or(0);
            tokens.insert(id, t);
        }
    }
    if !has_token {
        // A run without one (new, or started by cryptsetup) records what to check at
        // this clean point; the next commit writes it.
        let transform = |b: &mut [u8], l: u64| w.transform_serial(b, l);
        let inverse = |b: &mut [u8], l: u64| w.untransform_serial(b, l);
        if let Some(t) = identity::token_at(data, &j.st, p, transform, inverse, end, &tag_key)? {
            let tokens = &mut j.hdr.metadata.tokens;
            tokens.retain(|_, t| t.kind != identity::TOKEN_TYPE);
            let id = (0..).find(|i| !tokens.contains_key(i)).unwrap_or(0);
            tokens.insert(id, t);
            // A small JSON area (a header made elsewhere) keeps its room for the
            // run's segments: without the token, the size check still applies.
            let room = j.hdr.hdr_size as usize - luksify_luks::luks2::binary::BINARY_HEADER_SIZE;
            let used = serde_json::to_vec(&j.hdr.metadata).map_or(usize::MAX, |v| v.len());
            if used.saturating_add(IDENTITY_SPARE_JSON) > room {
                j.hdr.metadata.tokens.remove(&id);
            }
        }
    }
    // Each commit records the hotzone's edges in the token (see identity::edges_at).
    let has_token = identity::find(j.hdr.metadata.tokens.values(), &j.st).is_some();
    let transform = |b: &mut [u8], l: u64| w.transform_serial(b, l);
    let inverse = |b: &mut [u8], l: u64| w.untransform_serial(b, l);
    let edges = |st: &ReencryptState, p: Progress| {
        identity::edges_at(data, st, p, end, &transform, &inverse, &tag_key)
    };
    match has_token {
        true => w.run(
            &mut EdgeJournal {
                inner: &mut j,
                edges: &edges,
            },
            p,
        ),
        false => w.run(&mut j, p),
    }
}

/// A run's journal that also records, at each commit, the edges of the hotzone in its
/// identity token (see identity::edges_at), read from the data before the header moves.
struct EdgeJournal<'x, 'a, H: Disk + ?Sized> {
    inner: &'x mut HeaderJournal<'a, H>,
    edges: &'x dyn Fn(&ReencryptState, Progress) -> Result<Vec<serde_json::Value>>,
}

impl<H: Disk + ?Sized> Journal for EdgeJournal<'_, '_, H> {
    fn commit(&mut self, p: Progress) -> Result<()> {
        let e = (self.edges)(&self.inner.st, p)?;
        identity::set_edges(
            self.inner.hdr.metadata.tokens.values_mut(),
            &self.inner.st,
            e,
        );
        self.inner.commit(p)
    }
    fn data_durable(&mut self) {
        self.inner.data_durable()
    }
    fn finish(&mut self) -> Result<()> {
        self.inner.finish()
    }
    fn area_write(&mut self, off: u64, data: &[u8]) -> Result<()> {
        self.inner.area_write(off, data)
    }
    fn area_read(&mut self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.area_read(off, buf)
    }
    fn area_flush(&mut self) -> Result<()> {
        self.inner.area_flush()
    }
    fn use_spare_area(&mut self) -> Option<u64> {
        self.inner.use_spare_area()
    }
}

/// Everything `decrypt` needs besides the devices.
#[derive(Clone, Copy, Debug)]
pub struct DecryptOptions {
    /// Hotzone protection when the header is detached and the data stays in
    /// place (checksum, journal or none). With the header in front the data
    /// moves back over it and the shift itself protects it: `Datashift` (or
    /// `Checksum`, the default the CLI passes); `Journal` and `None` are refused
    /// there, before anything is read or written.
    pub resilience: Resilience,
    /// Checksum resilience's hash (cryptsetup's `--resilience-hash`, sha256 by default).
    pub checksum_hash: Hash,
    pub tuning: Tuning,
    /// The keyslot the passphrase must open (cryptsetup's `--key-slot`), tried even at
    /// priority `ignore`; None: every keyslot, by priority.
    pub key_slot: Option<u32>,
}

/// Decrypts a LUKS2 volume in place back to plaintext.
///
/// - Header detached (`header` holds it, `data` holds no LUKS header): the data
///   stays where it is; forward walk with `opts.resilience`.
/// - Header in front of the data (`data` holds it): the plaintext moves back to
///   offset 0 over the header, so the header first moves to `header`, a new file
///   (as `cryptsetup reencrypt --decrypt --header FILE` requires); forward walk,
///   hotzones no larger than the data offset, so a hotzone's source is never
///   overwritten before it is done (resilience `datashift`).
///
/// Either way the journal is the header file's reencryption metadata (mode
/// `decrypt`), and an interrupted run continues with [`resume`]. At the end the
/// header is left as cryptsetup leaves it: one linear segment, no keyslots.
/// Every check runs before the first write.
pub fn decrypt<D: Disk + Sync + ?Sized, H: Disk + Sync + ?Sized, P: AsRef<[u8]>>(
    data: &D,
    header: Option<&H>,
    passphrase: P,
    opts: &DecryptOptions,
    ctl: &Control<'_>,
) -> Result<Outcome> {
    opts.tuning.check()?;
    let dev_size = data
        .size()
        .map_err(|e| Error::io("size of the device", e))?;
    if let Some(h) = header {
        refuse_header_on_data(data, h)?;
        lock::claim_header(h)?;
    }
    let header_is_luks = match header {
        Some(h) => h.size().unwrap_or(0) > 0 && is_luks(h)?,
        None => false,
    };
    let version = luksify_luks::probe(data)?;
    let in_front = version.is_some();
    if version == Some(luksify_luks::Version::Luks1) {
        return Err(Error::Refused(
            "the device holds a LUKS1 volume: luksify decrypts LUKS2 only; `cryptsetup convert --type luks2 DEV` turns it into LUKS2 in place first (or `cryptsetup reencrypt --decrypt`, which needs device-mapper, decrypts LUKS1) (nothing was written)".into(),
        ));
    }
    if in_front
        && !matches!(
            opts.resilience,
            Resilience::Datashift | Resilience::Checksum
        )
    {
        return Err(Error::Refused(
            "with the header in front the data moves back and the shift protects it: --resilience applies to detached headers only (nothing was written)".into(),
        ));
    }
    let (hdisk, mut hdr, moves): (&(dyn Disk + Sync), Luks2Header, bool) = match (in_front, header) {
        (true, None) => {
            return Err(Error::Refused(
                "the LUKS header is in front of the data, which moves back over it: pass --header FILE, a new file the header moves to for the run (as `cryptsetup reencrypt --decrypt --header`) (nothing was written)".into(),
            ))
        }
        (true, Some(h)) => {
            // A decryption cut during its first header write touched nothing: the
            // file is reused.
            if header_is_luks && !is_cut_new_header(h)? {
                return Err(Error::Refused(
                    "the header file already holds a LUKS header: if it is from an interrupted decryption run `luksify resume DEV --header FILE`, else name a new file".into(),
                ));
            }
            if !header_is_luks {
                refuse_foreign_header_store(h)?;
            }
            (&DynDisk(h) as &(dyn Disk + Sync), Luks2Header::read(data)?.0, true)
        }
        (false, Some(h)) if header_is_luks => {
            (&DynDisk(h) as &(dyn Disk + Sync), Luks2Header::read(h)?.0, false)
        }
        (false, _) => {
            return Err(Error::Refused(
                "no LUKS header on the device or in --header FILE: nothing to decrypt".into(),
            ))
        }
    };
    // cryptsetup's lock on the volume, then the header read again under it: another
    // process may have changed it in between (cryptsetup rereads it the same way).
    let _lock = lock_volume(ctl, &hdr.uuid)?;
    if _lock.is_some() {
        let again = if moves {
            Luks2Header::read(data)?.0
        } else {
            Luks2Header::read(hdisk)?.0
        };
        hdr = same_volume(&hdr, again)?;
    }
    if let Some(st) = reencrypt::state(&hdr.metadata)? {
        let run = match st.mode {
            luksify_luks::luks2::json::ReencryptMode::Encrypt => "an encryption",
            luksify_luks::luks2::json::ReencryptMode::Decrypt => "a decryption",
            luksify_luks::luks2::json::ReencryptMode::Reencrypt => "a reencryption",
        };
        if matches!(
            st.area,
            luksify_luks::luks2::json::ReencryptArea::None { .. }
        ) {
            // resume refuses a `none` run cut mid-way; sending the user there loops.
            return Err(Error::Refused(format!(
                "{run} run with resilience `none` is in progress on this volume: `luksify resume` finishes it if it was stopped cleanly (Ctrl-C), and names the byte range to restore from a backup if it was killed (nothing was written)"
            )));
        }
        return Err(Error::Refused(format!(
            "{run} run is in progress on this volume: finish it with `luksify resume` first (nothing was written)"
        )));
    }
    if hdr.data_segment().is_err() && all_linear(&hdr) {
        return Err(Error::Refused(
            "the header shows the decryption already finished: the data is plaintext, nothing to decrypt (the header file is no longer needed)".into(),
        ));
    }
    let seg = hdr.data_segment()?;
    let live = hdr.live_segment_count();
    if live != 1 || seg.size != SegmentSize::Dynamic || seg.iv_tweak != 0 {
        return Err(Error::Refused(
            "the volume's layout is not one crypt segment to the end of the device with iv_tweak 0; luksify decrypts only that layout".into(),
        ));
    }
    let off = seg.offset;
    if !moves && off > 0 {
        if let Some(second) = wiped_own_header_at_start(data, &hdr.uuid) {
            return Err(wiped_header_refusal(off, second));
        }
    }
    if moves && (off == 0 || off % CHECKSUM_BLOCK as u64 != 0) {
        return Err(Error::Refused(format!(
            "the header is in front but the data offset is {off}: cannot move the data back"
        )));
    }
    if dev_size <= off {
        return Err(Error::Refused(format!(
            "device of {dev_size} bytes ends before the data offset {off}: wrong device, or a truncated image? (nothing was written)"
        )));
    }
    if !(dev_size - off).is_multiple_of(u64::from(seg.sector_size)) {
        return Err(Error::Refused(format!(
            "the data area ({} bytes from offset {off} to the device's end) is not a whole number of the volume's {}-byte sectors: wrong device, or one that changed size? (nothing was written)",
            dev_size - off,
            seg.sector_size
        )));
    }
    // Until the walk starts the keyslot areas are read where they are now.
    let unlocked = match header {
        Some(h) if !moves => hdr.unlock(h, passphrase.as_ref(), opts.key_slot),
        _ => hdr.unlock(data, passphrase.as_ref(), opts.key_slot),
    };
    // Wiped now if owned, not after the walk (see `encrypt`).
    drop(passphrase);
    let (vk, slot) = unlocked.map_err(|e| match e {
        luksify_luks::Error::WrongPassphrase => Error::WrongPassphrase,
        // A keyslot in a cipher luksify cannot run (cryptsetup gives the keyslots the
        // data's cipher): nothing was written yet, as for the data's cipher below.
        e @ (luksify_luks::Error::Cipher(_) | luksify_luks::Error::Unsupported(_)) => {
            Error::Refused(format!(
                "{e}; `cryptsetup reencrypt --decrypt` decrypts it (nothing was written)"
            ))
        }
        e => e.into(),
    })?;
    let key_digest = hdr
        .digest_id_for_keyslot(slot)
        .ok_or(Error::Internal("unlocked keyslot has no digest"))?;
    // The walk's cipher from this key, before the first write: a cipher or key luksify
    // cannot walk (AES-CBC, serpent, an integrity segment's longer key) was refused
    // only after the header had been marked for decryption, which then nothing but
    // cryptsetup could finish.
    if let Err(e) = seg.cipher(&vk) {
        return Err(Error::Refused(format!(
            "{e}; `cryptsetup reencrypt --decrypt` decrypts it (nothing was written)"
        )));
    }
    let (ks_end, room) = free_keyslot_room(&hdr);
    let area = if moves {
        ReencryptArea::Datashift {
            offset: first_keyslot_gap(&hdr, 4096).unwrap_or(ks_end),
            size: 4096,
            shift_size: off,
        }
    } else {
        let sums = new_sums(
            data.write_unit(),
            seg.sector_size,
            opts.checksum_hash,
            dev_size - off,
        );
        detached_area(&hdr, opts.resilience, sums, ks_end, room).ok_or_else(|| {
            Error::Refused(
                "a detached header's data stays in place: use resilience checksum, journal or none"
                    .into(),
            )
        })?
    };
    let fits = keyslot_gaps(&hdr)
        .iter()
        .any(|&(o, len)| area.offset() >= o && area.offset() + area.size() <= o + len);
    if !fits || area.size() < 4096 {
        return Err(Error::Refused(
            "no free room in the keyslots area for the reencryption journal".into(),
        ));
    }
    let layout = EncryptLayout {
        mode: ReencryptMode::Decrypt,
        data_offset: if moves { 0 } else { off },
        old_offset: off,
        data_size: None,
        encryption: seg.cipher.clone(),
        sector_size: seg.sector_size,
        shift: None,
    };
    let st = reencrypt::init(
        &mut hdr.metadata,
        key_digest,
        vk.as_bytes(),
        layout,
        ReencryptDirection::Forward,
        area,
    )?;
    // The last point nothing is written at (the unlock above takes seconds).
    if cancelled(ctl) {
        return Ok(Outcome::NotStarted);
    }
    if moves {
        // Blank header areas and the keyslot areas first, then the header copies,
        // secondary first: the file holds no valid header until it holds the whole
        // new state, and a cut before that leaves its primary blank. The device is
        // untouched until the walk, so a crash here leaves the volume as it was.
        let mut buf = device::AlignedBuf::new(1 << 20);
        let (start, end) = (2 * hdr.hdr_size, hdr.areas_end());
        // A full filesystem under the header file is the user's to fix, not an I/O fault.
        let full = |e: std::io::Error, what: &'static str| {
            if e.raw_os_error() == Some(libc::ENOSPC) {
                Error::Refused(format!(
                    "no space left for the header file ({end} bytes): free space on its filesystem or name a file on another one (nothing was written to the device)"
                ))
            } else {
                Error::io(what, e)
            }
        };
        mark_new_store(hdisk).map_err(|e| match e {
            Error::Io { source, .. } => full(source, "write header file"),
            e => e,
        })?;
        for (i, c) in new_store_areas(start as usize).chunks(1 << 20).enumerate() {
            hdisk
                .write_at((i as u64) << 20, c)
                .map_err(|e| full(e, "write header file"))?;
        }
        let mut o = start;
        while o < end {
            let n = (buf.len() as u64).min(end - o) as usize;
            data.read_at(o, &mut buf[..n])
                .map_err(|e| Error::io("read keyslot area", e))?;
            hdisk
                .write_at(o, &buf[..n])
                .map_err(|e| full(e, "write header file"))?;
            o += n as u64;
        }
        hdisk.flush().map_err(|e| full(e, "flush header file"))?;
        hdr.write_secondary_first(hdisk)?;
    } else {
        hdr.write(hdisk)?;
    }
    run_from(
        data,
        HeaderStore {
            disk: hdisk,
            on_data: false,
        },
        hdr,
        st,
        vk,
        opts.tuning,
        ctl,
    )
}

/// Whether every segment of the header is linear (plaintext): a finished decryption's.
fn all_linear(hdr: &Luks2Header) -> bool {
    !hdr.metadata.segments.is_empty()
        && hdr
            .metadata
            .segments
            .values()
            .all(|s| matches!(s, luksify_luks::luks2::json::Segment::Linear(_)))
}

/// Whether a decryption has moved every byte: its only live segment is the plaintext's,
/// linear from the new data offset to the device's end.
fn only_plaintext_live(hdr: &Luks2Header, st: &ReencryptState) -> bool {
    let mut live = hdr.metadata.segments.values().filter(|s| !s.is_backup());
    matches!(
        (live.next(), live.next()),
        (Some(luksify_luks::luks2::json::Segment::Linear(l)), None)
            if l.offset == st.layout.data_offset && l.size == SegmentSize::Dynamic
    )
}

/// A decryption whose data is all plaintext, stopped before its final header (cryptsetup
/// 2.6.1 killed while it retires the keyslots: it removes them before the final header,
/// so no passphrase opens the header any more, and neither tool's resume could unlock it).
/// The final header needs no key: written as a finished run writes it, then the keyslot
/// area zeroed. The data device is not touched.
fn finish_walked_decryption(
    hdisk: &(dyn Disk + Sync),
    mut hdr: Luks2Header,
    st: &ReencryptState,
    (total, ctl): (u64, &Control<'_>),
) -> Result<Outcome> {
    reencrypt::finish_decrypt(&mut hdr.metadata, st);
    hdr.write(hdisk)?;
    zero_keyslot_area(hdisk, &hdr)?;
    if let Some(f) = ctl.progress {
        f(ProgressInfo {
            done: total,
            total,
            bytes_per_sec: 0,
        });
    }
    Ok(Outcome::Finished)
}

/// Zeroes the keyslot area of a finished decryption's header (the split volume key of
/// every old keyslot), as cryptsetup leaves it, and flushes.
fn zero_keyslot_area(disk: &(impl Disk + ?Sized), hdr: &Luks2Header) -> Result<()> {
    let start = 2 * hdr.hdr_size;
    let zeros = vec![0u8; 1 << 20];
    let mut off = 0u64;
    let len = hdr.metadata.config.keyslots_size;
    while off < len {
        let n = (zeros.len() as u64).min(len - off) as usize;
        disk.write_at(start + off, &zeros[..n])
            .map_err(|e| Error::io("wipe keyslot area", e))?;
        off += n as u64;
    }
    disk.flush().map_err(|e| Error::io("flush header", e))
}

/// The error `resume` gives when the header store holds no valid LUKS2 header:
/// precise when the store shows a start cut during its first header write (then
/// nothing is lost and the same `encrypt` command continues or starts over).
fn no_header_to_resume(
    data: &(impl Disk + ?Sized),
    detached: bool,
    hdisk: &(dyn Disk + Sync),
    e: luksify_luks::Error,
) -> Result<Error> {
    // An encryption's header file holding nothing, over a device that shows no
    // filesystem at its start: `encrypt` refuses to take it as its own (it cannot tell
    // a cut first write from a file emptied since), so the advice is what it takes.
    let encrypted_part = |holds: &str| -> Result<Option<Error>> {
        if is_luks(data)?
            || fsprobe::probe(data)
                .map_err(|e| Error::io("read superblock", e))?
                .is_some()
        {
            return Ok(None);
        }
        // (A header block device is not removed: `encrypt` takes a blank one as new.)
        let (store, again) = if hdisk.can_grow() {
            (
                "header file",
                "remove the header file and run the same `luksify encrypt` command again",
            )
        } else {
            (
                "header device",
                "run the same `luksify encrypt` command again",
            )
        };
        Ok(Some(Error::Refused(format!(
            "the {store} {holds}, and the device shows no filesystem at its start (nothing was written now): luksify cannot tell an encryption stopped while writing its first header (then no data was written: {again}) from a {store} emptied or zeroed after the run began (then it was the only key to what is done: restore it from a copy; encrypting again would encrypt the part already encrypted a second time)"
        ))))
    };
    if detached && hdisk.size().is_ok_and(|n| n < 4096) {
        if let Some(e) = encrypted_part("is empty (or too short for a LUKS header)")? {
            return Ok(e);
        }
        // The device still holds its LUKS header when the run was a decryption that
        // was to move it out; a plaintext device means an encryption.
        let verb = if is_luks(data)? { "decrypt" } else { "encrypt" };
        return Ok(Error::Refused(format!(
            "the header file is empty (or too short for a LUKS header), so it holds no run to resume: if a `luksify {verb}` was stopped before it wrote anything, run that same command again (it starts over); else pass the header file the run was started with (nothing was written)"
        )));
    }
    if detached && is_cut_new_header(hdisk)? {
        // The device still holds its LUKS header when the cut run was a decryption
        // moving it out; a plaintext device means an encryption.
        let verb = if is_luks(data)? { "decrypt" } else { "encrypt" };
        // Zeros (or our start marker) are what a run cut before its first header
        // leaves, and also what a header file emptied since would show: "run it again"
        // said alone led a trial to encrypt the encrypted part a second time (V6).
        // Over a device that shows no filesystem, "run the same command again" led a
        // trial straight into `encrypt`'s refusal (C2).
        if let Some(e) = encrypted_part("holds no complete header")? {
            return Ok(e);
        }
        return Ok(Error::Refused(format!(
            "the header file holds no complete header (nothing was written now): if the {verb}ion was stopped while writing its first header, no data was written: run the same `luksify {verb}` command again, which starts it over; but if this file was emptied or zeroed after the run began, it was the only key to what is done: restore it from a copy instead (`blkid` of the device still showing its filesystem at the start says the run had not begun)"
        )));
    }
    if !detached {
        let (dev_size, found) = cut_start_on(data)?;
        match found {
            Some(m) if m.dev_size != dev_size => return Ok(m.refusal(dev_size)),
            Some(m) => {
                let how = if read_init_marker(data, dev_size, 2 * m.shift)? {
                    "while writing its first header (the moved start of the device is intact)"
                } else {
                    "before it wrote over the start of the device (no data was overwritten)"
                };
                return Ok(Error::Refused(format!(
                    "the encryption was stopped {how}: run the same `luksify encrypt --reduce-device-size {}M` command again to continue",
                    (2 * m.shift) >> 20
                )));
            }
            _ => {}
        }
        if matches!(e, luksify_luks::Error::NotLuks) {
            return Ok(Error::Refused(
                "no LUKS header on the device: if the run keeps its header in a file, pass it with --header FILE; else there is no run to resume here".into(),
            ));
        }
    }
    Ok(e.into())
}

/// Continues an interrupted encryption or decryption (ours or cryptsetup's). `meta` is the
/// detached header, or `None` when the header is on `data`.
pub fn resume<D: Disk + Sync + ?Sized, H: Disk + Sync + ?Sized, P: AsRef<[u8]>>(
    data: &D,
    meta: Option<&H>,
    passphrase: P,
    tuning: Tuning,
    ctl: &Control<'_>,
) -> Result<Outcome> {
    tuning.check()?;
    if let Some(m) = meta {
        refuse_header_on_data(data, m)?;
        lock::claim_header(m)?;
    }
    let store = match meta {
        Some(m) => HeaderStore {
            disk: &DynDisk(m),
            on_data: false,
        },
        None => HeaderStore {
            disk: &DynDisk(data),
            on_data: true,
        },
    };
    let hdisk = store.disk;
    let (hdr, report) = match Luks2Header::read(hdisk) {
        Ok(h) => h,
        Err(e @ (luksify_luks::Error::NoValidHeader { .. } | luksify_luks::Error::NotLuks)) => {
            return Err(no_header_to_resume(data, meta.is_some(), hdisk, e)?)
        }
        Err(e) => return Err(e.into()),
    };
    // As in `decrypt`: the volume's lock, then the header as it is under the lock.
    let _lock = lock_volume(ctl, &hdr.uuid)?;
    let (hdr, report) = match _lock {
        Some(_) => {
            let (again, report) = Luks2Header::read(hdisk)?;
            (same_volume(&hdr, again)?, report)
        }
        None => (hdr, report),
    };
    // A damaged copy was used silently (trial C2); the first commit rewrites both.
    if let (Some(say), Some(why)) = (ctl.notice, report.damage()) {
        say(&format!(
            "LUKS2 header: {why}; the run's commits rewrote both copies"
        ));
    }
    let state = reencrypt::state(&hdr.metadata)?;
    // `--header` naming a copy of the header the device carries in front of its data
    // (a `luksHeaderBackup` taken mid-run): the run would go on in the copy, leave the
    // device's own header behind, and the next resume from it would walk the moved
    // data again (a trial lost 200 MB so). An encryption with a detached header never
    // has this volume's header on its device; a decryption in front moves the header
    // to the file and walks from it, the device's copy not yet overwritten.
    if meta.is_some()
        && state
            .as_ref()
            .is_some_and(|st| st.mode == luksify_luks::luks2::json::ReencryptMode::Encrypt)
    {
        if let Ok((own, _)) = Luks2Header::read(data) {
            if own.uuid == hdr.uuid {
                return Err(Error::Refused(format!(
                    "the device carries this volume's own header (UUID {}) in front of its data: the --header file is a copy of it (a header backup?), and the run must go on in the device's header; resume without --header (nothing was written)",
                    hdr.uuid
                )));
            }
        }
    }
    // A decryption stopped right after its final header, before its keyslot wipe: the
    // wipe needs no key and nothing refers to that area any more. That wipe finishes
    // the run (it was "nothing to resume", exit 1, after writing it; a trial).
    if state.is_none()
        && meta.is_some()
        && all_linear(&hdr)
        && hdr.metadata.keyslots.is_empty()
        && !zero_up_to_from(hdisk, 2 * hdr.hdr_size, hdr.metadata.config.keyslots_size)?
    {
        zero_keyslot_area(hdisk, &hdr)?;
        // Said, so that "decryption finished" is not read as a walk done now (a
        // decryption cryptsetup finished leaves its keyslots area unwiped; a trial).
        if let Some(n) = ctl.notice {
            n(ALREADY_DECRYPTED);
        }
        return Ok(Outcome::Finished);
    }
    // An encryption that finished but whose resilience-area wipe (the last hotzones'
    // old bytes) was cut short: the wipe needs no key; it finishes the run.
    if state.is_none() && wipe_pending(&hdr) {
        let mut hdr = hdr.clone();
        let (off, len) = free_keyslot_room(&hdr);
        engine::wipe_random(hdisk, off, len, "the resilience area")?;
        set_wipe_pending(&mut hdr, false);
        hdr.write(hdisk)?;
        // A finished resume reports the end, as every other one does.
        let seg = hdr.data_segment()?;
        let total = match seg.size {
            SegmentSize::Bytes(n) => n,
            SegmentSize::Dynamic => data
                .size()
                .map_err(|e| Error::io("size of the device", e))?
                .saturating_sub(seg.offset),
        };
        if let Some(f) = ctl.progress {
            f(ProgressInfo {
                done: total,
                total,
                bytes_per_sec: 0,
            });
        }
        return Ok(Outcome::Finished);
    }
    if state.is_none() {
        if let Some(second) = hdr
            .data_segment()
            .ok()
            .filter(|s| s.offset > 0 && meta.is_some())
            .and_then(|_| wiped_own_header_at_start(data, &hdr.uuid))
        {
            return Err(wiped_header_refusal(hdr.data_segment()?.offset, second));
        }
    }
    let st = state.ok_or_else(|| {
        // (The orchestrator takes "shows no encryption in progress" as a finished walk.)
        Error::Refused(if hdr.data_segment().is_ok() && hdr.metadata.keyslots.is_empty() {
            // Not a finished run: no passphrase opens it (it was taken for one when a
            // fast machine cut cryptsetup here).
            "the header has a data segment but no keyslot, and no run in progress: `cryptsetup reencrypt --encrypt` cut while it built its header leaves this, before it writes any data; check that the device still holds its plaintext, then remove the header file and encrypt again (nothing was written)".into()
        } else if hdr.data_segment().is_ok() {
            "the header shows no encryption in progress and no decryption: the encryption already finished (or never began: `cryptsetup reencrypt --encrypt` cut while it set up its header, before any data, leaves a header like this; a filesystem `blkid` still finds on the device says so), nothing to resume (a `luksify decrypt` stopped before its first write left it so: run it again)".into()
        } else if all_linear(&hdr) {
            "the header shows no encryption in progress and no decryption: the decryption already finished (the data is plaintext; the header file is no longer needed), nothing to resume".into()
        } else {
            "the header shows no encryption in progress and no decryption (already finished?)"
                .into()
        })
    })?;
    if st.mode == ReencryptMode::Decrypt && meta.is_none() {
        return Err(Error::Refused(
            "a decryption keeps its journal in a detached header: pass --header FILE".into(),
        ));
    }
    if st.mode == ReencryptMode::Decrypt && only_plaintext_live(&hdr, &st) {
        // The data area the walk covered, for the one progress report.
        let l = &st.layout;
        let total = data
            .size()
            .map_err(|e| Error::io("size of the device", e))?
            .saturating_sub(l.data_offset.max(l.old_offset));
        return finish_walked_decryption(hdisk, hdr, &st, (total, ctl));
    }
    // Unlock with any passphrase keyslot whose key matches the new segment's digest.
    let mut vk = None;
    let mut last = None;
    for (id, k) in &hdr.metadata.keyslots {
        if !matches!(k, Keyslot::Luks2(_)) {
            continue;
        }
        match hdr.unlock_keyslot(hdisk, *id, passphrase.as_ref()) {
            Ok(key) if hdr.verify_key_digest(st.key_digest, key.as_bytes())? => {
                vk = Some(key);
                break;
            }
            Ok(_) => {}
            Err(e) => last = Some(e),
        }
    }
    // Wiped now if owned, not after the walk (see `encrypt`).
    drop(passphrase);
    let vk = match (vk, last) {
        (Some(k), _) => k,
        (None, Some(luksify_luks::Error::WrongPassphrase) | None) => {
            return Err(match hdr.untried_or(luksify_luks::Error::WrongPassphrase) {
                luksify_luks::Error::WrongPassphrase => Error::WrongPassphrase,
                e => e.into(),
            });
        }
        (None, Some(e)) => return Err(e.into()),
    };
    reencrypt::verify_reencrypt_digest(&hdr.metadata, st.keyslot, vk.as_bytes())?;
    let ours = identity::find(hdr.metadata.tokens.values(), &st).is_some();
    // The device must still be the one this run started on.
    let dev_size = data
        .size()
        .map_err(|e| Error::io("size of the device", e))?;
    refuse_none_run_without_progress(&st, meta.is_some(), ours, dev_size, ctl.restored)?;
    let reached = st.progress.hot_start.saturating_add(st.progress.hot_len);
    match st.layout.shift {
        // An encryption's data shift put the moved segment at the device's very end.
        Some(s) if st.layout.head_last().is_none() => {
            let was = s.moved_offset + s.size;
            if dev_size != was {
                // cryptsetup grows an image file that is not whole 4096-byte blocks to
                // whole ones as it walks it.
                let grown = dev_size > was
                    && dev_size - was < CHECKSUM_BLOCK as u64
                    && dev_size.is_multiple_of(CHECKSUM_BLOCK as u64);
                let why = if grown {
                    format!(
                        "cryptsetup grows an image file that is not whole 4096-byte blocks: if this run was cryptsetup's, `truncate -s {was} FILE` gives it back the size the run started on, then resume again"
                    )
                } else {
                    "wrong device or it was resized".to_string()
                };
                return Err(Error::Refused(format!(
                    "device is {dev_size} bytes but the interrupted run was on a {was}-byte device: {why} (nothing was written)"
                )));
            }
        }
        // u64::MAX: forward, every segment is already new up to a "dynamic" end (a run
        // killed after its last hotzone, before the final header); backward (cryptsetup's
        // in-place decryption), nothing done yet. Either way nothing to compare.
        _ if st.progress.hot_start == u64::MAX => {}
        // Else the bytes the run has reached (read at the old offset) must be there.
        _ => {
            let phys = st.layout.old_offset.saturating_add(reached);
            if dev_size < phys {
                return Err(Error::Refused(format!(
                    "device is {dev_size} bytes, but the interrupted run has reached byte {phys}: wrong device, or it was shrunk (nothing was written)"
                )));
            }
        }
    }
    run_from(data, store, hdr, st, vk, tuning, ctl)
}

#[cfg(test)]
mod tests {
    use super::{chunk_for, new_sums, Hash};

    /// The checksum block is the device's write unit (or the sector), unless the data
    /// area does not end on a whole one: then 512, which every such area is made of.
    #[test]
    fn checksum_blocks_cover_a_data_area_of_partial_blocks() {
        let mib = 1u64 << 20;
        let block = |unit, sector, len| new_sums(unit, sector, Hash::Sha256, len).block;
        assert_eq!(block(4096, 512, 64 * mib), 4096);
        assert_eq!(block(512, 512, 64 * mib), 512);
        assert_eq!(block(512, 4096, 64 * mib), 4096);
        assert_eq!(block(4096, 512, 64 * mib + 512), 512);
        assert_eq!(block(4096, 512, 64 * mib + 3584), 512);
        assert_eq!(block(512, 512, 64 * mib + 512), 512);
    }

    #[test]
    fn chunks_are_a_quarter_hotzone_at_most_as_a_power_of_two() {
        const M: usize = 1 << 20;
        // The other modes' 16 MiB hotzones keep the default 4 MiB requests.
        assert_eq!(chunk_for(4 * M, 16 << 20), 4 * M);
        // A default journal half (16 MiB keyslots area minus one keyslot, halved).
        assert_eq!(chunk_for(4 * M, (16 << 20) / 2 - (160 << 10)), M);
        assert_eq!(chunk_for(M, 512 << 10), 128 << 10);
        // Never below 64 KiB, never above what was asked.
        assert_eq!(chunk_for(4 * M, 100 << 10), 64 << 10);
        assert_eq!(chunk_for(64 << 10, 256 << 10), 64 << 10);
        assert_eq!(chunk_for(32 << 10, 16 << 20), 32 << 10);
    }
}
