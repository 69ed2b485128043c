//! The data path: device -> walker (hotzone, chunk) -> cipher -> device, with the
//! journal beside it.
//!
//! Worker threads (one per CPU) share one queue of work: each writes chunks the header
//! already allows to be written (and flushes a hotzone once its last chunk is written),
//! else reads the next chunk into a buffer from a fixed pool (so memory is bounded
//! whatever the device size) and prepares it: checksums (checksum mode), copies the
//! old bytes to the journal half (double-buffered journal), encrypts. The coordinator
//! takes each hotzone once all of it is prepared, protects and commits it, and hands
//! its chunks out for writing. The ordering rules that make a crash at any instant
//! recoverable are in docs/journal.md; in short: a hotzone's data is written only
//! after the header says it is hot (and, for checksum/journal, after its protection is
//! durable), and the header moves past a hotzone only after the hotzone's data is
//! durable.

use crate::device::{AlignedBuf, MAP_MIN};
use crate::sha256x16::{hash_4k_blocks_to_slice, hash_512_blocks_to_slice};
use crate::{Cancel, Error, ProgressFn, ProgressInfo, Resilience, Result};
use luksify_cipher::SectorCipher;
use luksify_luks::hash::Hash;
use luksify_luks::io::Disk;
use luksify_luks::luks2::json::{ReencryptDirection, ReencryptMode};
use luksify_luks::reencrypt::{EncryptLayout, Progress};
use rayon::prelude::*;
use std::cell::Cell;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// What the engine needs from the header: commits of progress and the
/// resilience area inside the keyslot area.
pub trait Journal {
    /// Makes `p` the durable state: the primary header copy is written and flushed
    /// before this returns. The secondary copy may be left written but unflushed; it
    /// is made durable before the next header write (by the next `area_flush`, a
    /// [`Journal::data_durable`] when the header lives on the data device, or a flush
    /// of its own), so a cut can never tear both copies at once.
    fn commit(&mut self, p: Progress) -> Result<()>;
    /// A data flush started after the last commit returned has completed. With the
    /// header on the data device that flush also made the secondary copy durable.
    fn data_durable(&mut self) {}
    /// Writes the final header (no reencryption state left).
    fn finish(&mut self) -> Result<()>;
    /// Writes resilience data (checksums or journal copy) at `off` within the area, unflushed.
    fn area_write(&mut self, off: u64, data: &[u8]) -> Result<()>;
    /// Reads resilience data at `off` within the area.
    fn area_read(&mut self, off: u64, buf: &mut [u8]) -> Result<()>;
    /// Flushes the header device.
    fn area_flush(&mut self) -> Result<()>;
    /// Journal and checksum modes: points `area_write` at an area the committed header
    /// does not name (the other half), to be named by the next commit, and returns its
    /// byte offset on the header device ([`Walk::meta`]). None when there is none: then
    /// the only area is the committed one.
    fn use_spare_area(&mut self) -> Option<u64> {
        None
    }
}

/// Sizes that bound memory and set the commit rate.
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// Bytes per read/write request.
    pub chunk: usize,
    /// Largest hotzone (bytes between two header commits).
    pub hotzone: u64,
    /// Worker threads: each reads whole chunks, checksums, journals and encrypts them,
    /// and writes chunks the header allows to be written, so the reads and writes, the
    /// copies the kernel makes for them, the hashing and the AES use every CPU.
    pub workers: usize,
}

impl Tuning {
    /// Refuses sizes a run cannot use, before anything is read or written: requests of
    /// whole 4096-byte units (O_DIRECT alignment, the largest checksum block), hotzones
    /// of at least one. `workers` 0 means one.
    pub fn check(&self) -> crate::Result<()> {
        if self.chunk == 0 || !self.chunk.is_multiple_of(CHECKSUM_BLOCK) {
            return Err(crate::Error::Refused(format!(
                "request size (Tuning::chunk) {} bytes: use a non-zero multiple of {CHECKSUM_BLOCK} (default {}) (nothing was written)",
                self.chunk,
                Tuning::default().chunk
            )));
        }
        if self.hotzone < CHECKSUM_BLOCK as u64 {
            return Err(crate::Error::Refused(format!(
                "hotzone size (Tuning::hotzone) {} bytes: use at least {CHECKSUM_BLOCK} (default {}) (nothing was written)",
                self.hotzone,
                Tuning::default().hotzone
            )));
        }
        Ok(())
    }
}

impl Default for Tuning {
    fn default() -> Self {
        // 4 MiB requests, 16 MiB hotzones: 7 buffers in flight = 28 MiB.
        Tuning {
            chunk: 4 << 20,
            hotzone: 16 << 20,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
        }
    }
}

/// The checksum granularity of the runs luksify starts on files, and the alignment of
/// every hotzone (a multiple of any checksum block: 512 to 4096 bytes).
pub const CHECKSUM_BLOCK: usize = 4096;

/// Compared against to find all-zero checksum blocks (a `memcmp`, at most 4096 bytes).
static ZERO_BLOCK: [u8; CHECKSUM_BLOCK] = [0; CHECKSUM_BLOCK];

/// How checksum resilience covers a hotzone: one `hash` digest per `block` bytes (the
/// area's `hash` and `sector_size`). cryptsetup takes the block from the data device:
/// its logical sector size (512 on most disks and loop devices), 4096 for files, or the
/// encryption sector size if larger; a power cut may tear a write at that unit, and a
/// block's digest must tell old from new.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sums {
    pub hash: Hash,
    pub block: usize,
}

impl Sums {
    /// SHA-256 over 4096-byte blocks (files). SHA-256 over 4096 or 512 bytes takes the
    /// fast path (two messages at a time on SHA-NI); other specs hash one block at a time.
    pub const SHA256_4K: Sums = Sums {
        hash: Hash::Sha256,
        block: CHECKSUM_BLOCK,
    };

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        self.hash.digest_len()
    }

    /// Bytes of data whose digests fit in `area` bytes.
    pub fn covered(self, area: u64) -> u64 {
        area / self.digest_len() as u64 * self.block as u64
    }

    /// Bytes of digests for `data` bytes (a last partial block has one too).
    pub fn area_for(self, data: u64) -> u64 {
        data.div_ceil(self.block as u64) * self.digest_len() as u64
    }

    /// Writes the digest of each block of `data` into `out` (`len()` bytes each).
    ///
    /// All-zero blocks (the unused space of most volumes) all have one digest: it is
    /// hashed once per call and copied, so an empty volume costs a scan instead of the
    /// hashing, the largest CPU cost of checksum mode. The digests are the same.
    ///
    /// A last partial block (the end of a device that is not whole blocks) is hashed
    /// padded with zeros to a whole block, as cryptsetup hashes it.
    fn hash_to_slice(self, data: &[u8], out: &mut [u8]) {
        let (b, d) = (self.block, self.digest_len());
        let whole = data.len() / b * b;
        if whole < data.len() {
            let mut last = vec![0u8; b];
            last[..data.len() - whole].copy_from_slice(&data[whole..]);
            let k = whole / b;
            self.hash_to_slice(&data[..whole], &mut out[..k * d]);
            self.hash_run(&last, &mut out[k * d..(k + 1) * d]);
            return;
        }
        let zero = |i: usize| {
            data.get(i * b..(i + 1) * b)
                .is_some_and(|x| x == &ZERO_BLOCK[..b])
        };
        let blocks = data.len().div_ceil(b);
        let mut zero_digest: Option<[u8; 64]> = None;
        // Runs of blocks of one kind, each block compared once: [i, j) is zero or not.
        let (mut i, mut is_zero) = (0, blocks > 0 && zero(0));
        while i < blocks {
            let mut j = i + 1;
            let mut next = is_zero;
            while j < blocks {
                next = zero(j);
                if next != is_zero {
                    break;
                }
                j += 1;
            }
            if is_zero {
                let z = zero_digest.get_or_insert_with(|| {
                    let mut z = [0u8; 64];
                    self.hash_run(&ZERO_BLOCK[..b], &mut z[..d]);
                    z
                });
                for o in out[i * d..j * d].chunks_mut(d) {
                    o.copy_from_slice(&z[..d]);
                }
            } else {
                let end = (j * b).min(data.len());
                self.hash_run(&data[i * b..end], &mut out[i * d..j * d]);
            }
            (i, is_zero) = (j, next);
        }
    }

    /// [`Sums::hash_to_slice`] without the zero-block shortcut.
    fn hash_run(self, data: &[u8], out: &mut [u8]) {
        if self == Sums::SHA256_4K {
            hash_4k_blocks_to_slice(data, out);
        } else if self.hash == Hash::Sha256 && self.block == 512 {
            hash_512_blocks_to_slice(data, out);
        } else {
            for (b, o) in data
                .chunks(self.block)
                .zip(out.chunks_mut(self.digest_len()))
            {
                self.hash.digest_into(&[b], o);
            }
        }
    }

    /// Appends the digests of `data`'s blocks to `out`, on the calling thread.
    fn hash_serial_into(self, data: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(
            start + data.len().div_ceil(self.block) * self.digest_len(),
            0,
        );
        self.hash_to_slice(data, &mut out[start..]);
    }

    /// Appends the digests of `data`'s blocks to `out` (both cores).
    fn hash_into(self, data: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(
            start + data.len().div_ceil(self.block) * self.digest_len(),
            0,
        );
        // 256 KiB per task: rayon's splitting costs nothing next to the hashing.
        let per = (256 << 10) / self.block;
        out[start..]
            .par_chunks_mut(per * self.digest_len())
            .zip(data.par_chunks(per * self.block))
            .for_each(|(o, b)| self.hash_to_slice(b, o));
    }

    fn hash(self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        self.hash_into(data, &mut out);
        out
    }
}

pub(crate) struct Walk<'a, D: Disk + Sync + ?Sized> {
    pub data: &'a D,
    /// The header device: with a double-buffered journal the workers write each
    /// chunk's old bytes straight into the spare half there.
    pub meta: &'a (dyn Disk + Sync),
    pub layout: &'a EncryptLayout,
    pub direction: ReencryptDirection,
    pub resilience: Resilience,
    /// Head-last decryption (`EncryptLayout::head_last`): the moved head's length and
    /// its protection. `resilience` (datashift) covers the tail.
    pub head: Option<(u64, Resilience)>,
    /// The checksum area's hash and block (checksum resilience, or the head's).
    pub sums: Sums,
    pub cipher: &'a SectorCipher,
    pub tuning: Tuning,
    pub progress: Option<&'a ProgressFn<'a>>,
    pub cancel: Option<&'a Cancel>,
    /// See `Control::restored`.
    pub restored: Option<(u64, u64)>,
}

/// One buffer's worth of a hotzone.
struct Chunk {
    hz: usize,
    /// Logical offset of the chunk.
    logical: u64,
    len: usize,
    buf: AlignedBuf,
    /// Checksums of the chunk's old blocks (checksum mode only).
    sums: Vec<u8>,
}

/// Logical end of the data for this run.
pub(crate) fn data_end<D: Disk + Sync + ?Sized>(w: &Walk<'_, D>) -> Result<u64> {
    match w.layout.data_size {
        Some(n) => Ok(n),
        None => {
            let sz = w
                .data
                .size()
                .map_err(|e| Error::io("size of the data device", e))?;
            // Decryption moves data down (old offset > new): the old one bounds it.
            Ok(sz.saturating_sub(w.layout.data_offset.max(w.layout.old_offset)))
        }
    }
}

/// The hotzones still to do after clean progress `p`, in processing order.
fn plan<D: Disk + Sync + ?Sized>(w: &Walk<'_, D>, p: Progress, end: u64) -> Vec<(u64, u64)> {
    let h = w.tuning.hotzone;
    let mut v = Vec::new();
    match w.direction {
        // Head-last: the tail [m, end) here; the head is `Walk::run_head`'s.
        ReencryptDirection::Forward if w.head.is_some() => {
            let m = w.head.map_or(0, |(m, _)| m);
            let mut a = if p.hot_start == 0 {
                end
            } else {
                p.hot_start.max(m)
            };
            while a < end {
                let n = h.min(end - a);
                v.push((a, n));
                a += n;
            }
        }
        ReencryptDirection::Forward => {
            let mut a = p.hot_start;
            while a < end {
                let n = h.min(end - a);
                v.push((a, n));
                a += n;
            }
        }
        ReencryptDirection::Backward => {
            // Boundaries are multiples of the hotzone size from logical 0, so the
            // moved part [0, shift) is a single hotzone (what cryptsetup's
            // recovery assumes) when hotzone == shift.
            // A dynamic layout's start is "the end" (u64::MAX): walk from the data's end.
            let mut b = p.hot_start.min(end);
            while b > 0 {
                let a = if b.is_multiple_of(h) {
                    b - h
                } else {
                    b - b % h
                };
                v.push((a, b - a));
                b = a;
            }
        }
    }
    v
}

impl<D: Disk + Sync + ?Sized> Walk<'_, D> {
    fn iv(&self, logical: u64) -> u64 {
        logical / 512
    }

    /// What a decryption that moves the data down (old offset S above the new one)
    /// leaves behind once every byte is moved: `(offset, len)` of the old bytes past
    /// the new end, `[new + end, old + end)`. With a dynamic size that is the device's
    /// last S bytes, the range cryptsetup wipes after a forward data shift; with a
    /// fixed size, only the bytes the volume held (nothing beyond it is touched).
    fn stale_after_move(&self, end: u64) -> Option<(u64, u64)> {
        let l = &self.layout;
        (l.mode == ReencryptMode::Decrypt && l.old_offset > l.data_offset).then(|| {
            let from = l.new_physical(end);
            (from, l.old_offset + end - from)
        })
    }

    /// Turns old bytes into new ones: encrypts, or decrypts when decrypting.
    fn transform(&self, buf: &mut [u8], logical: u64) -> Result<()> {
        match self.layout.mode {
            ReencryptMode::Decrypt => self.cipher.decrypt(buf, self.iv(logical)),
            _ => self.cipher.encrypt(buf, self.iv(logical)),
        }
        .map_err(Error::Cipher)
    }

    /// [`Self::transform`] on the calling thread (small recovery pieces).
    pub(crate) fn transform_serial(&self, buf: &mut [u8], logical: u64) -> Result<()> {
        match self.layout.mode {
            ReencryptMode::Decrypt => self.cipher.decrypt_serial(buf, self.iv(logical)),
            _ => self.cipher.encrypt_serial(buf, self.iv(logical)),
        }
        .map_err(Error::Cipher)
    }

    /// After a failed write of `new` at `logical`: how many of its first bytes hold
    /// `new` while all the rest still hold the old bytes (`new` turned back), read back
    /// sector by sector; 0 when none was written. A short write (a full filesystem
    /// took the first 2 MiB of a 4 MiB chunk) leaves such a prefix. `None` when it
    /// is not that (a sector that is neither, or old before new, or a prefix that does
    /// not end on a 4096-byte block), when unsure, or where a chunk is not written
    /// over itself (a data shift).
    fn written_prefix(&self, logical: u64, new: &[u8]) -> Option<usize> {
        let at = self.layout.new_physical(logical);
        if self.layout.old_physical(logical) != at {
            return None;
        }
        let n = new.len();
        let len = n.next_multiple_of(4096);
        let (mut old, mut now) = (AlignedBuf::new(len), AlignedBuf::new(len));
        old[..n].copy_from_slice(new);
        self.untransform_serial(&mut old[..n], logical).ok()?;
        self.data.read_at(at, &mut now[..n]).ok()?;
        const S: usize = 512;
        let k = (0..n / S)
            .take_while(|&i| now[i * S..(i + 1) * S] == new[i * S..(i + 1) * S])
            .count()
            * S;
        // Progress stands on whole 4096-byte blocks (every encryption sector size
        // divides them): a prefix ending inside one cannot be recorded.
        (k.is_multiple_of(4096) && now[k..n] == old[k..n]).then_some(k)
    }

    /// The inverse of [`Self::transform_serial`]: new bytes back to old ones.
    pub(crate) fn untransform_serial(&self, buf: &mut [u8], logical: u64) -> Result<()> {
        match self.layout.mode {
            ReencryptMode::Decrypt => self.cipher.encrypt_serial(buf, self.iv(logical)),
            _ => self.cipher.decrypt_serial(buf, self.iv(logical)),
        }
        .map_err(Error::Cipher)
    }

    /// Finishes a hotzone left `in-reencryption` by a crash, then commits it as done.
    pub fn recover(&self, j: &mut dyn Journal, p: Progress) -> Result<Progress> {
        let (start, len) = (p.hot_start, p.hot_len);
        let dst = self.layout.new_physical(start);
        let mut buf = AlignedBuf::new(self.tuning.chunk.max(CHECKSUM_BLOCK));
        let mut done = 0u64;
        // A head-last decryption's head is decrypted in place under its own protection.
        let head = self.head.filter(|_| start == 0);
        let resilience = head.map_or(self.resilience, |(_, r)| r);
        match resilience {
            Resilience::Checksum => {
                let spec = self.sums;
                let (block, dl) = (spec.block, spec.digest_len());
                let mut sums = vec![0u8; spec.area_for(len) as usize];
                j.area_read(0, &mut sums)?;
                while done < len {
                    let n = (buf.len() as u64).min(len - done) as usize;
                    let b = &mut buf[..n];
                    self.data
                        .read_at(dst + done, b)
                        .map_err(|e| Error::io_at("read hotzone", dst + done, n, e))?;
                    let cur = spec.hash(b);
                    let first = (done as usize) / block;
                    for (i, blk) in b.chunks_mut(block).enumerate() {
                        let k = first + i;
                        // A block still holding its old bytes matches the stored
                        // checksum: transform it. Anything else was already written.
                        if cur[i * dl..(i + 1) * dl] == sums[k * dl..(k + 1) * dl] {
                            let l = start + done + (i * block) as u64;
                            self.transform_serial(blk, l)?;
                            let at = self.layout.new_physical(l);
                            self.data
                                .write_at(at, blk)
                                .map_err(|e| Error::io_at("write hotzone", at, blk.len(), e))?;
                        }
                    }
                    done += n as u64;
                }
            }
            // A `none` range the user restored to its bytes from before the run is old
            // data again, walked as a data shift's moved copy is.
            Resilience::Journal | Resilience::Datashift | Resilience::None
                if resilience != Resilience::None
                    || (self.restored == Some((start, len))
                        && self.layout.old_physical(start) == dst) =>
            {
                while done < len {
                    let n = (buf.len() as u64).min(len - done) as usize;
                    let b = &mut buf[..n];
                    if resilience == Resilience::Journal {
                        j.area_read(done, b)?;
                    } else {
                        let at = self.layout.old_physical(start + done);
                        self.data
                            .read_at(at, b)
                            .map_err(|e| Error::io_at("read the old data", at, n, e))?;
                    }
                    self.transform(b, start + done)?;
                    self.data
                        .write_at(dst + done, b)
                        .map_err(|e| Error::io_at("write hotzone", dst + done, n, e))?;
                    done += n as u64;
                }
            }
            // `none` (the arm above takes the others).
            _ => {
                if let Some((a, n)) = self.restored {
                    return Err(Error::Refused(format!(
                        "--restored {a}..{} is not the range the header names as part rewritten, {start}..{}: restore exactly that range and give it (nothing was written)",
                        a + n,
                        start + len
                    )));
                }
                return Err(Error::Unrecoverable { start, len });
            }
        }
        self.data.flush().map_err(|e| Error::io("flush data", e))?;
        let next = match self.direction {
            _ if head.is_some() => Progress {
                hot_start: 0,
                hot_len: 0,
            },
            ReencryptDirection::Forward => Progress {
                hot_start: start + len,
                hot_len: 0,
            },
            ReencryptDirection::Backward => Progress {
                hot_start: start,
                hot_len: 0,
            },
        };
        j.commit(next)?;
        Ok(next)
    }

    /// Runs from clean progress `p` to the end (or to a cancellation point).
    /// Returns the progress reached; `finish` has been called if it is the end.
    pub fn run(&self, j: &mut dyn Journal, p: Progress) -> Result<Outcome> {
        let end = data_end(self)?;
        let total = end;
        let zones = plan(self, p, end);
        let head_m = self.head.map_or(0, |(m, _)| m);
        let done_bytes = match self.direction {
            _ if self.head.is_some() && p.hot_start == 0 => end,
            ReencryptDirection::Forward => p.hot_start.min(end).saturating_sub(head_m),
            ReencryptDirection::Backward => end - p.hot_start.min(end),
        };
        let started = Instant::now();
        let start_done = done_bytes;
        // A panic in the caller's callback stops the walk at the next safe point, as a
        // cancellation does, and carries on unwinding once the header is resumable.
        let panicked: Mutex<Option<Box<dyn std::any::Any + Send>>> = Mutex::new(None);
        let report = |done: u64| {
            if let Some(f) = self.progress {
                let secs = started.elapsed().as_secs_f64().max(1e-6);
                let info = ProgressInfo {
                    done,
                    total,
                    bytes_per_sec: ((done - start_done) as f64 / secs) as u64,
                };
                if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(info))) {
                    let mut g = panicked.lock().unwrap_or_else(|e| e.into_inner());
                    g.get_or_insert(p);
                }
            }
        };
        let stop_asked = || {
            self.cancel.is_some_and(|c| c.load(Ordering::Relaxed))
                || panicked.lock().map_or(true, |g| g.is_some())
        };
        let outcome = self.run_zones(j, p, &zones, (end, done_bytes), &report, &stop_asked);
        if let Some(payload) = panicked.into_inner().unwrap_or_else(|e| e.into_inner()) {
            std::panic::resume_unwind(payload);
        }
        outcome
    }

    /// [`Walk::run`]'s hotzones from clean progress `p`, `done_bytes` of `end` done:
    /// `report` after each is handed out, a stop when `stop_asked`.
    fn run_zones(
        &self,
        j: &mut dyn Journal,
        p: Progress,
        zones: &[(u64, u64)],
        (end, mut done_bytes): (u64, u64),
        report: &dyn Fn(u64),
        stop_asked: &dyn Fn() -> bool,
    ) -> Result<Outcome> {
        let chunk = self.tuning.chunk;
        let per_zone = (self.tuning.hotzone as usize).div_ceil(chunk);

        let checksum = self.resilience == Resilience::Checksum;
        // Double-buffered journal: hotzone 0's journal goes to the half the header does
        // not name; each commit opens the next hotzone's half to the workers.
        let first_half = match self.resilience {
            Resilience::Journal => j.use_spare_area(),
            _ => None,
        };
        // One journal area: the coordinator copies the old bytes to it and only then
        // transforms them.
        let single_journal = self.resilience == Resilience::Journal && first_half.is_none();
        let work = Work {
            checksum,
            journal: first_half.is_some(),
            transform: !single_journal,
            // Hashing a chunk takes twice as long as reading it from a disk: a worker
            // that hashed each chunk as it read it left the disk idle meanwhile, and
            // the reads of hotzone k then trailed into k-1's flush, which stalls them
            // (see docs/journal.md). Reads come first wherever the data is read with
            // O_DIRECT. That includes tmpfs on kernels that accept the flag there
            // (6.18 here), where a read is a copy and the order measured the same;
            // buffered reads keep the old order, hashing a chunk while it is cached.
            read_ahead: checksum && self.data.direct(),
        };
        // Checksum mode on a disk: the coordinator flushes each hotzone as soon as it
        // is written (below), so that neither worker sits in the flush while there is
        // hashing to do. (With buffered reads the workers flush, as in other modes.)
        let coordinator_flushes = work.read_ahead;
        // One hotzone being written plus a few chunks of read-ahead: 7 x 4 MiB at the
        // defaults, whatever the device size. (A second hotzone's worth, so reading
        // zone k+1 overlaps writing zone k, measured no faster on the 2-core machine
        // and cost 5-9 MiB more RSS.)
        let pool_n = per_zone + SPARE_BUFFERS;
        let shared = Shared {
            st: Mutex::new(State {
                free: (0..pool_n).map(|_| AlignedBuf::new(chunk)).collect(),
                next: ChunkCursor::default(),
                journal_half: first_half.map(|base| (0, base)),
                prepared: BTreeMap::new(),
                writable: VecDeque::new(),
                in_write: 0,
                writing: 0,
                max_writing: (self.tuning.workers.max(1) - 1).max(1),
                handed: 0,
                durable: 0,
                flushing: false,
                eager_flush: self.resilience != Resilience::None && !coordinator_flushes,
                read: VecDeque::new(),
                reads_done: false,
                stop: false,
                failed: None,
                record_writes: self.resilience == Resilience::None,
                written: Vec::new(),
                failed_writes: Vec::new(),
                write_failed: false,
            }),
            cv: Condvar::new(),
        };

        std::thread::scope(|s| -> Result<Outcome> {
            // Whatever way this returns, the workers stop and the scope can join them:
            // set before the first is started, so that one started before another
            // failed to start is stopped too (a trial's run under a cgroup's pids.max
            // hung there for good, deaf to SIGTERM, its volume unmounted).
            let _stop = StopOnDrop(&shared);
            for _ in 0..self.tuning.workers.max(1) {
                let (zones_w, shared_w) = (&zones, &shared);
                std::thread::Builder::new()
                    .spawn_scoped(s, move || worker(self, zones_w, chunk, work, shared_w))
                    .map_err(|e| {
                        Error::io(
                            "start the walk's worker threads (is a limit on threads too low? the cgroup's pids.max, `ulimit -u`: raise it)",
                            e,
                        )
                    })?;
            }
            let mut last_clean = p;
            // Resilience none: hotzones left in the window the header names hot.
            let mut none_window_left = 0usize;
            let mut first_seq = 0usize;
            let after = |a: u64, n: u64| match self.direction {
                ReencryptDirection::Forward => Progress {
                    hot_start: a + n,
                    hot_len: 0,
                },
                ReencryptDirection::Backward => Progress {
                    hot_start: a,
                    hot_len: 0,
                },
            };
            // Everything handed to the workers for writing is written and durable: the
            // worker that wrote a hotzone's last chunk usually flushed it already.
            // How many hotzones had been handed out for writing at the last commit: a
            // data flush that makes a later one durable started after that commit's
            // writes (see Journal::data_durable).
            let handed_at_commit = Cell::new(0usize);
            let settle = |j: &mut dyn Journal| -> Result<()> {
                let todo = shared.wait_for(|st| {
                    if st.in_write > 0 || st.flushing {
                        None
                    } else if st.durable == st.handed {
                        Some(None)
                    } else {
                        st.flushing = true;
                        Some(Some(st.handed))
                    }
                })?;
                if let Some(upto) = todo {
                    let r = self.data.flush();
                    let mut st = shared.lock();
                    st.flushing = false;
                    if r.is_ok() {
                        st.durable = upto;
                    }
                    shared.cv.notify_all();
                    r.map_err(|e| Error::io("flush data", e))?;
                }
                if shared.lock().durable > handed_at_commit.get() {
                    j.data_durable();
                }
                Ok(())
            };
            let commit = |j: &mut dyn Journal, p: Progress| -> Result<()> {
                j.commit(p)?;
                handed_at_commit.set(shared.lock().handed);
                Ok(())
            };
            let hot = |a: u64, n: u64| Progress {
                hot_start: a,
                hot_len: n,
            };
            // Resilience none: the window the header names hot, once it does.
            let mut none_window = None;
            let walked = (|| -> Result<Option<Outcome>> {
                for (k, &(a, n)) in zones.iter().enumerate() {
                    if stop_asked() {
                        shared.lock().reads_done = true;
                        shared.cv.notify_all();
                        // Everything handed out must be durable before the header says so.
                        settle(j)?;
                        commit(j, last_clean)?;
                        // Leave both header copies durable.
                        j.area_flush()?;
                        return Ok(Some(Outcome::Interrupted(last_clean)));
                    }
                    if coordinator_flushes {
                        // k-1 durable as soon as it is written, while the workers still
                        // read and hash k: the commit of k needs both.
                        shared.wait_for(|st| (st.in_write == 0).then_some(()))?;
                        settle(j)?;
                    }
                    let nchunks = (n as usize).div_ceil(chunk);
                    // Hotzone k once the workers have read (and hashed, journaled,
                    // transformed) all of it, in order, while k-1 was still being written.
                    let seqs = first_seq..first_seq + nchunks;
                    let mut chunks: Vec<Chunk> = shared.wait_for(|st| {
                        (st.prepared.range(seqs.clone()).count() == nchunks).then(|| {
                            seqs.clone()
                                .filter_map(|q| st.prepared.remove(&q))
                                .collect()
                        })
                    })?;
                    first_seq += nchunks;
                    debug_assert!(chunks.iter().all(|c| c.hz == k));
                    match self.resilience {
                        Resilience::Checksum => {
                            let mut sums =
                                Vec::with_capacity(chunks.iter().map(|c| c.sums.len()).sum());
                            for c in &chunks {
                                sums.extend_from_slice(&c.sums);
                            }
                            if j.use_spare_area().is_some() {
                                // Two halves: k's sums go to the one the header does not
                                // name (k-2's, retired by k-1's commit) and are made durable
                                // while k-1 is still being written; one commit then names
                                // that half, retires k-1 and makes k hot.
                                j.area_write(0, &sums)?;
                                j.area_flush()?;
                                settle(j)?;
                            } else {
                                // One area: k's sums replace k-1's only once k-1 is durable
                                // (then every block of k-1 is new, whatever the area says).
                                settle(j)?;
                                j.area_write(0, &sums)?;
                                j.area_flush()?;
                            }
                            commit(j, hot(a, n))?;
                        }
                        Resilience::Journal if !single_journal => {
                            // The workers wrote k's old bytes to the half the header does
                            // not name: durable first, then one commit names that half,
                            // retires k-1 and makes k hot.
                            j.area_flush()?;
                            settle(j)?;
                            commit(j, hot(a, n))?;
                            // k-1's half is free now: hotzone k+1's journal may go there.
                            if k + 1 < zones.len() {
                                let base = j
                                    .use_spare_area()
                                    .ok_or(Error::Internal("journal half vanished"))?;
                                shared.lock().journal_half = Some((k + 1, base));
                                shared.cv.notify_all();
                            }
                        }
                        Resilience::Journal => {
                            settle(j)?;
                            // The journal area is about to be overwritten: first make sure
                            // no header still points at its old contents.
                            if k > 0 {
                                commit(j, last_clean)?;
                            }
                            for c in &chunks {
                                j.area_write(c.logical - a, &c.buf[..c.len])?;
                            }
                            j.area_flush()?;
                            commit(j, hot(a, n))?;
                            for c in &mut chunks {
                                self.transform_serial(&mut c.buf[..c.len], c.logical)?;
                            }
                        }
                        Resilience::Datashift => {
                            settle(j)?;
                            commit(j, hot(a, n))?;
                        }
                        Resilience::None => {
                            // No protection, so no commit per hotzone: one commit names the
                            // next NONE_COMMIT_EVERY bytes hot, once what was handed out
                            // before is durable. A crash then leaves the header saying which
                            // bytes may be part done (resume refuses them, as cryptsetup
                            // does), never a clean state behind data already rewritten.
                            if none_window_left == 0 {
                                settle(j)?;
                                let (mut lo, mut hi, mut len) = (a, a + n, 0u64);
                                for &(za, zn) in &zones[k..] {
                                    if len >= NONE_COMMIT_EVERY {
                                        break;
                                    }
                                    lo = lo.min(za);
                                    hi = hi.max(za + zn);
                                    len += zn;
                                    none_window_left += 1;
                                }
                                commit(j, hot(lo, hi - lo))?;
                                // Only once the header names the new window: what the
                                // old one wrote still counts if that commit fails.
                                shared.lock().written.clear();
                                none_window = Some(hot(lo, hi - lo));
                            }
                            none_window_left -= 1;
                        }
                    }
                    {
                        let mut st = shared.lock();
                        st.in_write += chunks.len();
                        st.handed += 1;
                        st.writable.extend(chunks);
                    }
                    shared.cv.notify_all();
                    // Progress is reported for bytes handed out for writing.
                    last_clean = after(a, n);
                    done_bytes += n;
                    report(done_bytes);
                }
                Ok(None)
            })();
            // The last hotzones' writes may fail after everything was handed out, in this
            // settle: a `none` run salvages those too (it named the whole window, so a
            // write error in the last ~24 MiB made resume refuse the whole device).
            let walked = walked.and_then(|o| match o {
                Some(o) => Ok(Some(o)),
                None => settle(j).map(|()| None),
            });
            match walked {
                Ok(Some(o)) => return Ok(o),
                Ok(None) => {}
                Err(e) => {
                    return Err(match none_window {
                        Some(w) => self.salvage_none(j, &shared, w, e),
                        None => e,
                    })
                }
            }
            if let (ReencryptMode::Encrypt, Some(s)) = (self.layout.mode, self.layout.shift) {
                // The moved copy of the device's first bytes is plaintext, and no
                // longer needed once the header names nothing hot: that first, then
                // random bytes over it, as cryptsetup does before its final commit. A
                // crash in between resumes to here and wipes again.
                commit(j, last_clean)?;
                wipe_random(self.data, s.moved_offset, s.size, "the moved first segment")?;
            }
            if let Some((m, res)) = self.head.filter(|_| p.hot_start != 0) {
                if stop_asked() {
                    commit(j, last_clean)?;
                    j.area_flush()?;
                    return Ok(Outcome::Interrupted(last_clean));
                }
                self.run_head(j, m, res)?;
                report(end);
            } else if zones.is_empty() {
                // Nothing left to hand out (a resume that only recovered the last
                // hotzone): the caller still hears that the walk is done.
                report(end);
            }
            if self.layout.mode == ReencryptMode::Encrypt && self.layout.data_size.is_none() {
                // The finished header's segment runs to the device's end: grown during
                // the run, that end holds bytes never walked, which the header would
                // call ciphertext (a trial's `truncate` + `losetup -c` mid-run finished,
                // and the new 32 MiB decrypted to garbage). Left recorded instead.
                // The size now, not the one the device was opened with.
                let now = crate::device::live_size(self.data)
                    .map_err(|e| Error::io("size of the data device", e))?
                    .saturating_sub(self.layout.data_offset.max(self.layout.old_offset));
                if now > end {
                    commit(j, last_clean)?;
                    j.area_flush()?;
                    return Err(Error::Refused(format!(
                        "the device grew during the run, from {end} to {now} bytes of data: its new end was never encrypted, and the finished header would call it ciphertext. The run is recorded, all but that end done: give the device back its size (e.g. `truncate -s` for an image, then `losetup -c` for its loop device) and resume; grow it after the run"
                    )));
                }
            }
            j.finish()?;
            if let Some((off, len)) = self.stale_after_move(end) {
                // A decryption that moved the data down leaves its old last bytes
                // behind the new end: ciphertext no segment names any more, and whose
                // keys `finish` has just wiped. Random bytes over it, as cryptsetup
                // does after a forward data shift. Hygiene only, so after the final
                // header: a commit of "all moved, not finished" would have one live
                // segment, which cryptsetup 2.6.1 reads as a forward run not yet
                // started, and its resume would decrypt the plaintext again (measured).
                wipe_random(self.data, off, len, "the data's old end")?;
            }
            Ok(Outcome::Finished)
        })
    }

    /// A `none` run stopped by an error (a write refused for want of space, a read
    /// that failed) after its header named `window` hot: the whole window would be
    /// called "may be part rewritten", though the workers write in order and know what
    /// they wrote. Once the write under way has ended and the data is flushed, the
    /// header names only what may really be part rewritten: from the end of the chunks
    /// written without a gap to the end of the furthest one written or failed (the
    /// failed one, or nothing: then a clean state `resume` continues from). Returns the
    /// error that stopped the run; if the flush or the commit fails too, the header
    /// keeps the window.
    fn salvage_none(&self, j: &mut dyn Journal, sh: &Shared, window: Progress, e: Error) -> Error {
        let mut st = sh.lock();
        st.stop = true;
        sh.cv.notify_all();
        while st.writing > 0 {
            st = sh.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let mut written = std::mem::take(&mut st.written);
        let failed = std::mem::take(&mut st.failed_writes);
        drop(st);
        if self.data.flush().is_err() {
            return e;
        }
        written.sort_unstable();
        let (lo, hi) = (window.hot_start, window.hot_start + window.hot_len);
        let p = match self.direction {
            ReencryptDirection::Forward => {
                let mut done = lo;
                for &(a, n) in &written {
                    if a == done {
                        done += n;
                    }
                }
                let reach = written
                    .iter()
                    .chain(failed.iter())
                    .map(|&(a, n)| a + n)
                    .fold(done, u64::max);
                Progress {
                    hot_start: done,
                    hot_len: reach - done,
                }
            }
            ReencryptDirection::Backward => {
                let mut done = hi;
                for &(a, n) in written.iter().rev() {
                    if a + n == done {
                        done = a;
                    }
                }
                let reach = written
                    .iter()
                    .chain(failed.iter())
                    .map(|&(a, _)| a)
                    .fold(done, u64::min);
                Progress {
                    hot_start: reach,
                    hot_len: done - reach,
                }
            }
        };
        // With nothing hot, `hot_start` is where the walk goes on from, as in `after`.
        let _ = j.commit(p).and_then(|()| j.area_flush());
        e
    }

    /// The moved head of a head-last decryption, once the tail is done: `m` bytes at
    /// offset 0 decrypted in place. Its protection goes to the area first (`Checksum`:
    /// the old blocks' sums; `Journal`: the old bytes), made durable before the header
    /// names the head hot; then the head is rewritten and flushed. One hotzone of at
    /// most the shift and 20 MiB (16 MiB behind a default LUKS2 header), read twice,
    /// one chunk at a time.
    fn run_head(&self, j: &mut dyn Journal, m: u64, res: Resilience) -> Result<()> {
        let step = self.tuning.chunk.max(CHECKSUM_BLOCK) as u64;
        let mut buf = AlignedBuf::new(step as usize);
        // One pass over the head's old bytes, a chunk at a time.
        let mut pass = |f: &mut dyn FnMut(&mut [u8], u64) -> Result<()>| -> Result<()> {
            let mut off = 0u64;
            while off < m {
                let n = step.min(m - off) as usize;
                let b = &mut buf[..n];
                let at = self.layout.old_physical(off);
                self.data
                    .read_at(at, b)
                    .map_err(|e| Error::io_at("read the moved head", at, n, e))?;
                f(b, off)?;
                off += n as u64;
            }
            Ok(())
        };
        let mut sums = Vec::new();
        pass(&mut |b, off| match res {
            Resilience::Checksum => {
                self.sums.hash_into(b, &mut sums);
                Ok(())
            }
            Resilience::Journal => j.area_write(off, b),
            _ => Err(Error::Internal("the moved head needs checksum or journal")),
        })?;
        if res == Resilience::Checksum {
            j.area_write(0, &sums)?;
        }
        j.area_flush()?;
        j.commit(Progress {
            hot_start: 0,
            hot_len: m,
        })?;
        pass(&mut |b, off| {
            self.transform(b, off)?;
            let at = self.layout.new_physical(off);
            self.data
                .write_at(at, b)
                .map_err(|e| Error::io_at("write the head", at, b.len(), e))
        })?;
        self.data.flush().map_err(|e| Error::io("flush data", e))
    }
}

/// Writes random bytes over `[off, off + len)` of `data` and flushes; `what` names the
/// range in an error. The bytes are zeros encrypted with AES-XTS under a one-off random
/// key (each 512-byte sector its own tweak), which no one can tell from random and
/// costs what the cipher costs: `getrandom` made 16 MiB in 117 ms here, 13 % of a
/// 2 GiB datashift run on tmpfs.
pub(crate) fn wipe_random<D: Disk + ?Sized>(
    data: &D,
    off: u64,
    len: u64,
    what: &str,
) -> Result<()> {
    let key = luksify_luks::random::secret(64)?;
    let cipher = SectorCipher::new("aes-xts-plain64", &key, 512).map_err(Error::Cipher)?;
    let mut buf = AlignedBuf::new(MAP_MIN.min(len.next_multiple_of(4096) as usize).max(4096));
    let mut done = 0u64;
    while done < len {
        let n = (buf.len() as u64).min(len - done) as usize;
        let b = &mut buf[..n.next_multiple_of(512)];
        b.fill(0);
        cipher.encrypt(b, done / 512).map_err(Error::Cipher)?;
        data.write_at(off + done, &b[..n])
            .map_err(|e| Error::io_at(&format!("wipe {what}"), off + done, n, e))?;
        done += n as u64;
    }
    data.flush().map_err(|e| Error::io("flush data", e))
}

/// Chunk buffers beyond one hotzone's worth: read-ahead of the next hotzone while
/// this one is written.
const SPARE_BUFFERS: usize = 3;

/// Bytes one resilience-`none` commit names hot (one header commit per this many bytes).
const NONE_COMMIT_EVERY: u64 = 1 << 30;

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    /// Stopped at a safe point on request; the header holds this clean progress.
    Interrupted(Progress),
    /// A new `encrypt` or `decrypt` asked to stop (the cancel flag set) before its
    /// first write: nothing was written, the device and header store are as they were
    /// and there is nothing to resume.
    NotStarted,
}

/// Where the workers are in the run: hotzone index and offset within it.
#[derive(Default)]
struct ChunkCursor {
    seq: usize,
    zone: usize,
    off: u64,
}

/// What the workers and the coordinator share, under one lock.
struct State {
    free: Vec<AlignedBuf>,
    /// The next chunk to read: claimed in order.
    next: ChunkCursor,
    /// Double-buffered journal: (hotzone, byte offset of its half on the header
    /// device). Hotzone k+1's half is the one k-1 used, free once the header names k:
    /// the commit of k opens it. One hotzone at a time: every chunk of k is journaled
    /// before k is committed, and no chunk of k+1 is read before its half is open.
    journal_half: Option<(usize, u64)>,
    /// Chunks read and not yet prepared (`Work::read_ahead`), in claim order.
    read: VecDeque<Read>,
    /// Chunks read and prepared, by claim order, waiting for the coordinator.
    prepared: BTreeMap<usize, Chunk>,
    /// Chunks whose hotzone the header allows to be written.
    writable: VecDeque<Chunk>,
    /// Chunks handed out for writing and not yet written.
    in_write: usize,
    /// Writes in progress, and the most allowed at once: one worker fewer than there
    /// are, so a read always overlaps the writes (a throttled disk limits reads and
    /// writes separately: with every worker writing, the read side idled; Standard HDD
    /// profile, none mode: 23.9 s against an 18.5 s floor).
    writing: usize,
    max_writing: usize,
    /// Hotzones handed out for writing, and how many of them are flushed.
    handed: usize,
    durable: usize,
    /// Someone is flushing the data device.
    flushing: bool,
    /// Flush as soon as a handed-out hotzone is written (every mode that commits
    /// each hotzone, so the flush overlaps the coordinator's wait for the next one).
    eager_flush: bool,
    /// No more reads (cancelled): the workers only write what is handed out.
    reads_done: bool,
    /// The run is over: workers return.
    stop: bool,
    /// A worker's error, for the coordinator.
    failed: Option<Error>,
    /// Resilience `none`: the chunks written since the header named the current
    /// window hot `(logical, len)`, and those whose write failed and may have left
    /// part rewritten (every one: two writes in flight may both fail): what a run
    /// stopped by an error has rewritten (see `Walk::salvage_none`). A failed write
    /// read back as untouched is not among them.
    record_writes: bool,
    written: Vec<(u64, u64)>,
    failed_writes: Vec<(u64, u64)>,
    /// A write failed: nothing more is written.
    write_failed: bool,
}

struct Shared {
    st: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a worker panicked; the scope re-raises that panic.
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `f` yields a value, or a worker fails.
    fn wait_for<T>(&self, mut f: impl FnMut(&mut State) -> Option<T>) -> Result<T> {
        let mut st = self.lock();
        loop {
            if let Some(e) = st.failed.take() {
                st.stop = true;
                self.cv.notify_all();
                return Err(e);
            }
            if let Some(v) = f(&mut st) {
                return Ok(v);
            }
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl State {
    /// Files chunk `seq` as prepared, or its error for the coordinator.
    fn prepared_or_failed(&mut self, seq: usize, r: Result<Chunk>) {
        match r {
            Ok(c) => {
                self.prepared.insert(seq, c);
            }
            Err(e) => {
                self.failed.get_or_insert(e);
            }
        }
    }

    /// The next chunk's read, if one may start now: its hotzone `(zone, start, len)`,
    /// where its old bytes go in the journal half (0 without a journal), and a pool
    /// buffer. No chunk of a journal hotzone is read before its half is open, and the
    /// buffer is taken only once the read is sure (one taken for nothing would be lost
    /// to the pool).
    fn take_read(
        &mut self,
        work: Work,
        zones: &[(u64, u64)],
    ) -> Option<(usize, u64, u64, u64, AlignedBuf)> {
        let zone = self.next.zone;
        let &(a, n) = zones.get(zone)?;
        let base = match (work.journal, self.journal_half) {
            (false, _) => 0,
            (true, Some((z, base))) if z == zone => base,
            (true, _) => return None,
        };
        if self.reads_done {
            return None;
        }
        let buf = self.free.pop()?;
        Some((zone, a, n, base, buf))
    }
}

struct StopOnDrop<'a>(&'a Shared);
impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.lock().stop = true;
        self.0.cv.notify_all();
    }
}

/// What a worker does to each chunk between reading and handing it over.
#[derive(Clone, Copy)]
struct Work {
    /// Checksum the old blocks (checksum mode).
    checksum: bool,
    /// Double-buffered journal: write the old bytes to the hotzone's half.
    journal: bool,
    /// Turn the old bytes into new ones.
    transform: bool,
    /// Read whatever may be read before preparing what has been read (reads wait on
    /// the device; preparing is CPU work that can run while a flush stalls them).
    read_ahead: bool,
}

/// A chunk read and not yet prepared, and where its old bytes go in a journal half.
struct Read {
    seq: usize,
    hz: usize,
    logical: u64,
    len: usize,
    buf: AlignedBuf,
    journal_at: u64,
}

/// A worker: writes chunks the header allows to be written, else reads, hashes,
/// journals and transforms the next chunk, else waits. Every CPU does every kind of
/// work, so none idles while another has a queue.
fn worker<D: Disk + Sync + ?Sized>(
    w: &Walk<'_, D>,
    zones: &[(u64, u64)],
    chunk: usize,
    work: Work,
    sh: &Shared,
) {
    let mut st = sh.lock();
    loop {
        if st.stop {
            return;
        }
        // After a failed write nothing more is written (see `Walk::salvage_none`).
        if let Some(c) = (st.writing < st.max_writing && !st.write_failed)
            .then(|| st.writable.pop_front())
            .flatten()
        {
            st.writing += 1;
            let record = st.record_writes;
            drop(st);
            let at = w.layout.new_physical(c.logical);
            let r = w.data.write_at(at, &c.buf[..c.len]);
            // Resilience `none`: a failed write read back as a clean prefix of new bytes
            // (none at all, or what a short write took) and old bytes after it names
            // nothing hot beyond that prefix, so the run stays resumable (trials' full
            // disks left none runs that nothing could finish, the failed 4 MiB
            // untouched or half written). Backward runs need the chunk whole or
            // untouched: a prefix is not where their walk stands.
            let prefix = (record && r.is_err())
                .then(|| w.written_prefix(c.logical, &c.buf[..c.len]))
                .flatten()
                .filter(|&k| k == 0 || w.direction == ReencryptDirection::Forward);
            st = sh.lock();
            st.writing -= 1;
            if record {
                let range = (c.logical, c.len as u64);
                match r {
                    Ok(()) => st.written.push(range),
                    // Read back as a clean prefix: that much is written, the rest not.
                    Err(_) if prefix.is_some() => {
                        st.write_failed = true;
                        if let Some(k) = prefix.filter(|&k| k > 0) {
                            st.written.push((c.logical, k as u64));
                        }
                    }
                    Err(_) => {
                        st.write_failed = true;
                        st.failed_writes.push(range);
                    }
                }
            }
            st.free.push(c.buf);
            st.in_write -= 1;
            if let Err(e) = r {
                st.failed
                    .get_or_insert(Error::io_at("write data", at, c.len, e));
            } else if st.eager_flush && st.in_write == 0 && !st.flushing && st.durable < st.handed {
                // The last chunk handed out is written: make it durable now.
                let upto = st.handed;
                st.flushing = true;
                drop(st);
                let r = w.data.flush();
                st = sh.lock();
                st.flushing = false;
                match r {
                    Ok(()) => st.durable = upto,
                    Err(e) => {
                        st.failed.get_or_insert(Error::io("flush data", e));
                    }
                }
            }
            sh.cv.notify_all();
            continue;
        }
        if let Some((zone, a, n, base, buf)) = st.take_read(work, zones) {
            let cur = &mut st.next;
            let (seq, in_zone) = (cur.seq, cur.off);
            let len = (chunk as u64).min(n - in_zone) as usize;
            cur.seq += 1;
            cur.off += len as u64;
            if cur.off == n {
                cur.zone += 1;
                cur.off = 0;
            }
            drop(st);
            let (logical, mut buf) = (a + in_zone, buf);
            let at = w.layout.old_physical(logical);
            let r = w
                .data
                .read_at(at, &mut buf[..len])
                .map_err(|e| Error::io_at("read data", at, len, e));
            let read = Read {
                seq,
                hz: zone,
                logical,
                len,
                buf,
                journal_at: base + in_zone,
            };
            match r {
                Err(e) => {
                    st = sh.lock();
                    st.failed.get_or_insert(e);
                }
                Ok(()) if work.read_ahead => {
                    st = sh.lock();
                    st.read.push_back(read);
                }
                Ok(()) => {
                    let res = process(w, work, read);
                    st = sh.lock();
                    st.prepared_or_failed(seq, res);
                }
            }
            sh.cv.notify_all();
            continue;
        }
        if let Some(r) = st.read.pop_front() {
            drop(st);
            let seq = r.seq;
            let res = process(w, work, r);
            st = sh.lock();
            st.prepared_or_failed(seq, res);
            sh.cv.notify_all();
            continue;
        }
        st = sh.cv.wait(st).unwrap_or_else(|e| e.into_inner());
    }
}

/// Hashes, journals and transforms a chunk that has been read, as `work` says.
fn process<D: Disk + Sync + ?Sized>(w: &Walk<'_, D>, work: Work, r: Read) -> Result<Chunk> {
    let Read {
        hz,
        logical,
        len,
        mut buf,
        journal_at,
        ..
    } = r;
    let mut sums = Vec::new();
    if work.checksum {
        w.sums.hash_serial_into(&buf[..len], &mut sums);
    }
    if work.journal {
        w.meta
            .write_at(journal_at, &buf[..len])
            .map_err(|e| Error::io("write resilience area", e))?;
    }
    if work.transform {
        w.transform_serial(&mut buf[..len], logical)?;
    }
    Ok(Chunk {
        hz,
        logical,
        len,
        buf,
        sums,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Digests with the zero-block shortcut equal plain per-block hashing, for every
    /// hash and block size, whatever mix of zero, nearly-zero and random blocks (and a
    /// short tail) the data holds.
    #[test]
    fn sums_of_zero_blocks_equal_plain_hashing() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for hash in [Hash::Sha1, Hash::Sha256, Hash::Sha512] {
            for block in [512usize, 4096] {
                let sums = Sums { hash, block };
                let blocks = 37;
                let mut data = vec![0u8; blocks * block];
                for (i, c) in data.chunks_mut(block).enumerate() {
                    match rnd() % 5 {
                        0 | 1 => {}
                        2 => c[0] = 1,
                        3 => c[block - 1] = 0x80,
                        _ => c.iter_mut().for_each(|v| *v = rnd() as u8),
                    }
                    if i == 36 {
                        c.fill(0);
                    }
                }
                for len in [data.len(), data.len() - block / 2, 3 * block] {
                    let d = &data[..len];
                    let mut want = Vec::new();
                    for c in d.chunks(block) {
                        // A partial last block is hashed padded with zeros (cryptsetup).
                        let mut padded = c.to_vec();
                        padded.resize(block, 0);
                        let mut o = vec![0u8; sums.digest_len()];
                        hash.digest_into(&[&padded], &mut o);
                        want.extend_from_slice(&o);
                    }
                    assert!(
                        sums.hash(d) == want,
                        "{hash:?}/{block}, {len} bytes: digests differ"
                    );
                    let mut serial = Vec::new();
                    sums.hash_serial_into(d, &mut serial);
                    assert!(serial == want, "{hash:?}/{block}: serial digests differ");
                }
            }
        }
    }
}
