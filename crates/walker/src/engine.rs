//! The data path: device -> walker (hotzone, chunk) -> cipher -> device, with the
//! journal beside it.
//!
//! Three stages overlap: reader threads (one per CPU) fill chunk buffers from a
//! fixed pool (so memory is bounded whatever the device size) and checksum them
//! in checksum mode (16-lane AVX-512 SHA-256 where the CPU has it), the
//! coordinator puts chunks back in order, protects and commits each hotzone and
//! encrypts its chunks, and a writer thread writes chunks and flushes once per
//! hotzone. The ordering rules that make
//! a crash at any instant recoverable are in docs/journal.md; in short: a
//! hotzone's data is written only after the header says it is hot (and, for
//! checksum/journal, after its protection is durable), and the header moves past
//! a hotzone only after the hotzone's data is durable.

use crate::device::AlignedBuf;
use crate::sha256x16::{hash_4k_blocks, hash_4k_blocks_to_slice};
use crate::{Cancel, Error, ProgressFn, ProgressInfo, Resilience, Result};
use luksify_cipher::SectorCipher;
use luksify_luks::io::Disk;
use luksify_luks::luks2::json::{ReencryptDirection, ReencryptMode};
use luksify_luks::reencrypt::{EncryptLayout, Progress};
use rayon::prelude::*;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::Instant;

/// What the engine needs from the header: commits of progress and the
/// resilience area inside the keyslot area.
pub trait Journal {
    /// Makes `p` the durable state (both header copies, flushed).
    fn commit(&mut self, p: Progress) -> Result<()>;
    /// Writes the final header (no reencryption state left).
    fn finish(&mut self) -> Result<()>;
    /// Writes resilience data (checksums or journal copy) at `off` within the area, unflushed.
    fn area_write(&mut self, off: u64, data: &[u8]) -> Result<()>;
    /// Reads resilience data at `off` within the area.
    fn area_read(&mut self, off: u64, buf: &mut [u8]) -> Result<()>;
    /// Flushes the header device.
    fn area_flush(&mut self) -> Result<()>;
    /// Journal mode: points `area_write` at an area the committed header does not name
    /// (the other half), to be named by the next commit, and returns its byte offset on
    /// the header device ([`Walk::meta`]). None when there is none: then the only area
    /// is the committed one.
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
    /// Reader threads: each reads whole chunks (and checksums them in checksum mode), so
    /// the reads, the copies the kernel makes for them and the hashing use every CPU.
    pub readers: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        // 4 MiB requests, 16 MiB hotzones: 7 buffers in flight = 28 MiB.
        Tuning {
            chunk: 4 << 20,
            hotzone: 16 << 20,
            readers: std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
        }
    }
}

/// Checksum granularity in bytes (the area's `sector_size`).
pub const CHECKSUM_BLOCK: usize = 4096;
/// Hash length (sha256).
pub const CHECKSUM_LEN: usize = 32;

pub(crate) struct Walk<'a, D: Disk + Sync + ?Sized> {
    pub data: &'a D,
    /// The header device: with a double-buffered journal the readers write each
    /// chunk's old bytes straight into the spare half there.
    pub meta: &'a (dyn Disk + Sync),
    pub layout: &'a EncryptLayout,
    pub direction: ReencryptDirection,
    pub resilience: Resilience,
    pub cipher: &'a SectorCipher,
    pub tuning: Tuning,
    pub progress: Option<&'a ProgressFn<'a>>,
    pub cancel: Option<&'a Cancel>,
}

/// One buffer's worth of a hotzone.
struct Chunk {
    /// Position in the run's read order (readers finish out of order).
    seq: usize,
    hz: usize,
    /// Logical offset of the chunk.
    logical: u64,
    len: usize,
    buf: AlignedBuf,
    /// Checksums of the chunk's old blocks (checksum mode only).
    sums: Vec<u8>,
}

/// Logical end of the data for this run.
fn data_end<D: Disk + Sync + ?Sized>(w: &Walk<'_, D>) -> Result<u64> {
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
            let mut b = p.hot_start;
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

fn hash_blocks(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    hash_blocks_into(data, &mut out);
    out
}

/// Appends the checksums of `data`'s blocks to `out` (both cores).
fn hash_blocks_into(data: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + data.len() / CHECKSUM_BLOCK * CHECKSUM_LEN, 0);
    // 64 blocks (256 KiB) per task: rayon's splitting costs nothing next to the hashing.
    out[start..]
        .par_chunks_mut(64 * CHECKSUM_LEN)
        .zip(data.par_chunks(64 * CHECKSUM_BLOCK))
        .for_each(|(o, b)| hash_4k_blocks_to_slice(b, o));
}

/// Appends the checksums of `data`'s blocks to `out`, on the calling thread.
fn hash_blocks_serial_into(data: &[u8], out: &mut Vec<u8>) {
    hash_4k_blocks(data, out);
}

impl<D: Disk + Sync + ?Sized> Walk<'_, D> {
    fn iv(&self, logical: u64) -> u64 {
        logical / 512
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
    fn transform_serial(&self, buf: &mut [u8], logical: u64) -> Result<()> {
        match self.layout.mode {
            ReencryptMode::Decrypt => self.cipher.decrypt_serial(buf, self.iv(logical)),
            _ => self.cipher.encrypt_serial(buf, self.iv(logical)),
        }
        .map_err(Error::Cipher)
    }

    /// Finishes a hotzone left `in-reencryption` by a crash, then commits it as done.
    pub fn recover(&self, j: &mut dyn Journal, p: Progress) -> Result<Progress> {
        let (start, len) = (p.hot_start, p.hot_len);
        let dst = self.layout.new_physical(start);
        let mut buf = AlignedBuf::new(self.tuning.chunk.max(CHECKSUM_BLOCK));
        let mut done = 0u64;
        match self.resilience {
            Resilience::Checksum => {
                let mut sums = vec![0u8; (len as usize / CHECKSUM_BLOCK) * CHECKSUM_LEN];
                j.area_read(0, &mut sums)?;
                while done < len {
                    let n = (buf.len() as u64).min(len - done) as usize;
                    let b = &mut buf[..n];
                    self.data
                        .read_at(dst + done, b)
                        .map_err(|e| Error::io("read hotzone", e))?;
                    let cur = hash_blocks(b);
                    let first = (done as usize) / CHECKSUM_BLOCK;
                    for (i, blk) in b.chunks_mut(CHECKSUM_BLOCK).enumerate() {
                        let k = first + i;
                        // A block still holding its old bytes matches the stored
                        // checksum: transform it. Anything else was already written.
                        if cur[i * CHECKSUM_LEN..(i + 1) * CHECKSUM_LEN]
                            == sums[k * CHECKSUM_LEN..(k + 1) * CHECKSUM_LEN]
                        {
                            let l = start + done + (i * CHECKSUM_BLOCK) as u64;
                            self.transform_serial(blk, l)?;
                            self.data
                                .write_at(self.layout.new_physical(l), blk)
                                .map_err(|e| Error::io("write hotzone", e))?;
                        }
                    }
                    done += n as u64;
                }
            }
            Resilience::Journal | Resilience::Datashift => {
                while done < len {
                    let n = (buf.len() as u64).min(len - done) as usize;
                    let b = &mut buf[..n];
                    if self.resilience == Resilience::Journal {
                        j.area_read(done, b)?;
                    } else {
                        self.data
                            .read_at(self.layout.old_physical(start + done), b)
                            .map_err(|e| Error::io("read moved data", e))?;
                    }
                    self.transform(b, start + done)?;
                    self.data
                        .write_at(dst + done, b)
                        .map_err(|e| Error::io("write hotzone", e))?;
                    done += n as u64;
                }
            }
            Resilience::None => return Err(Error::Unrecoverable),
        }
        self.data.flush().map_err(|e| Error::io("flush data", e))?;
        let next = match self.direction {
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
        let mut done_bytes = match self.direction {
            ReencryptDirection::Forward => p.hot_start.min(end),
            ReencryptDirection::Backward => end - p.hot_start,
        };
        let chunk = self.tuning.chunk;
        let per_zone = (self.tuning.hotzone as usize).div_ceil(chunk);
        let started = Instant::now();
        let start_done = done_bytes;
        let gather = matches!(self.resilience, Resilience::Checksum | Resilience::Journal);
        // One hotzone gathered (checksum/journal) plus a few chunks of read-ahead:
        // 7 x 4 MiB at the defaults, whatever the device size. (A second hotzone's
        // worth, so reading zone k+1 overlaps writing zone k, measured no faster on
        // the 2-core machine, before and after the readers went parallel, and cost
        // 5-9 MiB more RSS.)
        let pool_n = per_zone + SPARE_BUFFERS;

        let (free_tx, free_rx) = sync_channel::<AlignedBuf>(pool_n);
        for _ in 0..pool_n {
            free_tx.send(AlignedBuf::new(chunk)).expect("pool");
        }
        let (read_tx, read_rx) = sync_channel::<Result<Chunk>>(pool_n);
        let (write_tx, write_rx) = sync_channel::<WriteMsg>(pool_n);
        let (ack_tx, ack_rx) = sync_channel::<Result<usize>>(zones.len() + 1);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let checksum = self.resilience == Resilience::Checksum;
        // Double-buffered journal: hotzone 0's journal goes to the half the header does
        // not name; each commit opens the next hotzone's half (see `JournalGate`).
        let first_half = match self.resilience {
            Resilience::Journal => j.use_spare_area(),
            _ => None,
        };
        let gate = JournalGate::new(first_half.map(|base| (0, base)));
        let journal_by_readers = first_half.is_some();
        // Readers transform what they read, spreading the crypto over every CPU, except
        // with a single journal area, where the coordinator writes the old bytes to the
        // journal first.
        let early_transform = self.resilience != Resilience::Journal || journal_by_readers;
        let source = std::sync::Mutex::new(ReadSource {
            free: free_rx,
            next: ChunkCursor::default(),
        });

        let result = std::thread::scope(|s| -> Result<Outcome> {
            for _ in 0..self.tuning.readers.max(1) {
                let tx = read_tx.clone();
                let (zones_r, stop_r, source_r, gate_r) = (&zones, &stop, &source, &gate);
                s.spawn(move || {
                    let what = ReadWork {
                        checksum,
                        journal: journal_by_readers.then_some(gate_r),
                        transform: early_transform,
                    };
                    reader(self, zones_r, chunk, what, source_r, tx, stop_r)
                });
            }
            drop(read_tx);
            let free_back = free_tx.clone();
            s.spawn(move || writer(self, write_rx, ack_tx, free_back));
            // Own every channel end here so that any return drops them and both
            // threads wind down before the scope joins them.
            let (write_tx, ack_rx, _free_tx) = (write_tx, ack_rx, free_tx);
            // Readers waiting for a journal half wake and stop on any return.
            let _close_gate = CloseOnDrop(&gate);
            // Readers finish out of order: chunks wait here until their turn.
            let mut in_order = Reorder {
                rx: read_rx,
                early: std::collections::BTreeMap::new(),
                next: 0,
            };

            let mut pending_ack: Option<usize> = None;
            let mut last_clean = p;
            let mut since_commit = 0u64;
            let wait_ack = |pending: &mut Option<usize>| -> Result<()> {
                if let Some(k) = pending.take() {
                    let got = ack_rx
                        .recv()
                        .map_err(|_| Error::Internal("writer ended"))??;
                    debug_assert_eq!(got, k);
                }
                Ok(())
            };
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
            for (k, &(a, n)) in zones.iter().enumerate() {
                if self.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                    stop.store(true, Ordering::Relaxed);
                    wait_ack(&mut pending_ack)?;
                    // Everything handed to the writer must be durable before the
                    // header says so.
                    write_tx
                        .send(WriteMsg::Flush(k))
                        .map_err(|_| Error::Internal("writer ended"))?;
                    pending_ack = Some(k);
                    wait_ack(&mut pending_ack)?;
                    j.commit(last_clean)?;
                    return Ok(Outcome::Interrupted(last_clean));
                }
                let nchunks = (n as usize).div_ceil(chunk);
                let mut chunks: Vec<Chunk> = Vec::with_capacity(if gather { nchunks } else { 0 });
                let mut sums: Vec<u8> = Vec::with_capacity(if checksum {
                    n as usize / CHECKSUM_BLOCK * CHECKSUM_LEN
                } else {
                    0
                });
                // Chunks already transformed by the readers (every mode but journal),
                // taken before the previous hotzone is acknowledged so that reading
                // and crypto overlap the writer's last writes and flush. Journal mode
                // keeps the old bytes until they are in the journal, and transforms
                // them here after the commit.
                let mut ready: Vec<Chunk> = Vec::new();
                if gather {
                    for _ in 0..nchunks {
                        let mut c = in_order.next()?;
                        debug_assert_eq!(c.hz, k);
                        // The readers hashed each chunk as they read it, while the
                        // writer still writes the previous hotzone.
                        if checksum {
                            sums.append(&mut c.sums);
                        }
                        if early_transform {
                            ready.push(c);
                        } else {
                            chunks.push(c);
                        }
                    }
                } else if pending_ack.is_some() {
                    // At most the spare buffers: the rest may still sit in the writer.
                    for _ in 0..nchunks.min(SPARE_BUFFERS) {
                        ready.push(in_order.next()?);
                    }
                }
                // Double-buffered journal: the readers wrote hotzone k's old bytes to
                // the half the header does not name while k-1 was still being written
                // and flushed; make them durable before a header names that half.
                if journal_by_readers {
                    j.area_flush()?;
                }
                wait_ack(&mut pending_ack)?;
                // The previous hotzone is durable: the header may move past it.
                match self.resilience {
                    Resilience::Checksum => {
                        j.area_write(0, &sums)?;
                        j.area_flush()?;
                        j.commit(Progress {
                            hot_start: a,
                            hot_len: n,
                        })?;
                    }
                    Resilience::Journal if journal_by_readers => {
                        // One commit names the new half, retires k-1 and makes k hot.
                        j.commit(Progress {
                            hot_start: a,
                            hot_len: n,
                        })?;
                        // k-1's half is free now: hotzone k+1's journal may go there.
                        if k + 1 < zones.len() {
                            let base = j
                                .use_spare_area()
                                .ok_or(Error::Internal("journal half vanished"))?;
                            gate.open(k + 1, base);
                        }
                    }
                    Resilience::Journal => {
                        // The journal area is about to be overwritten: first make sure
                        // no header still points at its old contents.
                        if k > 0 {
                            j.commit(last_clean)?;
                        }
                        for c in &chunks {
                            j.area_write(c.logical - a, &c.buf[..c.len])?;
                        }
                        j.area_flush()?;
                        j.commit(Progress {
                            hot_start: a,
                            hot_len: n,
                        })?;
                    }
                    Resilience::Datashift => j.commit(Progress {
                        hot_start: a,
                        hot_len: n,
                    })?,
                    Resilience::None => {
                        // No protection: commit a clean state now and then so an
                        // interrupted run resumes near where it stopped.
                        if since_commit >= NONE_COMMIT_EVERY {
                            j.commit(last_clean)?;
                            since_commit = 0;
                        }
                    }
                }
                let flush_here = self.resilience != Resilience::None
                    || k + 1 == zones.len()
                    || since_commit + n >= NONE_COMMIT_EVERY;
                let send = |c: Chunk| -> Result<()> {
                    let last = flush_here && c.logical + c.len as u64 == a + n;
                    write_tx
                        .send(WriteMsg::Chunk { chunk: c, last })
                        .map_err(|_| Error::Internal("writer ended"))
                };
                // Journal mode transforms on this thread (a parallel split would leave
                // pool threads spinning for CPU time the readers and the writer need);
                // the readers did it in every other mode.
                let transformed = |mut c: Chunk| -> Result<Chunk> {
                    if !early_transform {
                        self.transform_serial(&mut c.buf[..c.len], c.logical)?;
                    }
                    Ok(c)
                };
                let sent = ready.len() + chunks.len();
                for c in ready {
                    send(c)?;
                }
                for c in chunks {
                    send(transformed(c)?)?;
                }
                for _ in sent..nchunks {
                    send(transformed(in_order.next()?)?)?;
                }
                if flush_here {
                    pending_ack = Some(k);
                }
                // Progress is reported for bytes handed to the writer.
                last_clean = after(a, n);
                since_commit += n;
                done_bytes += n;
                if let Some(f) = self.progress {
                    let secs = started.elapsed().as_secs_f64().max(1e-6);
                    f(ProgressInfo {
                        done: done_bytes,
                        total,
                        bytes_per_sec: ((done_bytes - start_done) as f64 / secs) as u64,
                    });
                }
            }
            wait_ack(&mut pending_ack)?;
            drop(write_tx);
            j.finish()?;
            Ok(Outcome::Finished)
        });
        stop.store(true, Ordering::Relaxed);
        result
    }
}

/// Chunk buffers beyond one hotzone's worth: read-ahead, and the chunks transformed
/// before the previous hotzone is acknowledged.
const SPARE_BUFFERS: usize = 3;

/// Clean-state commit interval for resilience `none`.
const NONE_COMMIT_EVERY: u64 = 1 << 30;

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    /// Stopped at a safe point on request; the header holds this clean progress.
    Interrupted(Progress),
}

enum WriteMsg {
    /// A chunk to write; `last` = flush and acknowledge its hotzone afterwards.
    Chunk { chunk: Chunk, last: bool },
    /// Flush what was written and acknowledge hotzone `usize`.
    Flush(usize),
}

/// Where the readers are in the run: hotzone index and offset within it.
#[derive(Default)]
struct ChunkCursor {
    seq: usize,
    zone: usize,
    off: u64,
}

/// What the readers share: free buffers and the next chunk to read, taken together so
/// that chunks are claimed in order.
struct ReadSource {
    free: Receiver<AlignedBuf>,
    next: ChunkCursor,
}

/// Hands the coordinator chunks in read order whatever order the readers finish in.
struct Reorder {
    rx: Receiver<Result<Chunk>>,
    early: std::collections::BTreeMap<usize, Chunk>,
    next: usize,
}

impl Reorder {
    fn next(&mut self) -> Result<Chunk> {
        loop {
            if let Some(c) = self.early.remove(&self.next) {
                self.next += 1;
                return Ok(c);
            }
            // A reader's error ends the run at once: what was written so far is
            // covered by the header, as after a crash.
            let c = self
                .rx
                .recv()
                .map_err(|_| Error::Internal("reader ended"))??;
            self.early.insert(c.seq, c);
        }
    }
}

/// Which hotzone's journal half the readers may write, and where it is: hotzone k+1's
/// half is the one hotzone k-1 used, free once the header names hotzone k (the commit
/// of k opens k+1). One hotzone at a time: every chunk of k is journaled before k is
/// committed.
struct JournalGate {
    /// (hotzone, byte offset of its half on the header device); `closed` = stop.
    state: std::sync::Mutex<(Option<(usize, u64)>, bool)>,
    cv: std::sync::Condvar,
}

impl JournalGate {
    fn new(first: Option<(usize, u64)>) -> Self {
        JournalGate {
            state: std::sync::Mutex::new((first, false)),
            cv: std::sync::Condvar::new(),
        }
    }

    fn open(&self, zone: usize, base: u64) {
        if let Ok(mut st) = self.state.lock() {
            st.0 = Some((zone, base));
        }
        self.cv.notify_all();
    }

    fn close(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.1 = true;
        }
        self.cv.notify_all();
    }

    /// Waits until hotzone `zone`'s half is open and returns its offset; None once
    /// the run is stopping.
    fn wait(&self, zone: usize) -> Option<u64> {
        let mut st = self.state.lock().ok()?;
        loop {
            match *st {
                (_, true) => return None,
                (Some((z, base)), _) if z == zone => return Some(base),
                _ => st = self.cv.wait(st).ok()?,
            }
        }
    }
}

struct CloseOnDrop<'a>(&'a JournalGate);
impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// What a reader does to each chunk after reading it.
#[derive(Clone, Copy)]
struct ReadWork<'g> {
    /// Checksum the old blocks (checksum mode).
    checksum: bool,
    /// Double-buffered journal: write the old bytes to the hotzone's half.
    journal: Option<&'g JournalGate>,
    /// Turn the old bytes into new ones.
    transform: bool,
}

fn reader<D: Disk + Sync + ?Sized>(
    w: &Walk<'_, D>,
    zones: &[(u64, u64)],
    chunk: usize,
    what: ReadWork<'_>,
    source: &std::sync::Mutex<ReadSource>,
    out: SyncSender<Result<Chunk>>,
    stop: &std::sync::atomic::AtomicBool,
) {
    loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        // Claim a buffer and the next chunk under one lock (a poisoned lock means
        // another reader panicked: stop).
        let Ok(mut src) = source.lock() else { return };
        let Some(&(a, n)) = zones.get(src.next.zone) else {
            return;
        };
        let Ok(mut buf) = src.free.recv() else { return };
        let cur = &mut src.next;
        let (seq, hz, logical, in_zone) = (cur.seq, cur.zone, a + cur.off, cur.off);
        let len = (chunk as u64).min(n - cur.off) as usize;
        cur.seq += 1;
        cur.off += len as u64;
        if cur.off == n {
            cur.zone += 1;
            cur.off = 0;
        }
        drop(src);
        let r = w
            .data
            .read_at(w.layout.old_physical(logical), &mut buf[..len])
            .map_err(|e| Error::io("read data", e))
            .and_then(|_| {
                let mut sums = Vec::new();
                if what.checksum {
                    hash_blocks_serial_into(&buf[..len], &mut sums);
                }
                if let Some(gate) = what.journal {
                    let Some(base) = gate.wait(hz) else {
                        return Err(Error::Internal("run stopped"));
                    };
                    w.meta
                        .write_at(base + in_zone, &buf[..len])
                        .map_err(|e| Error::io("write resilience area", e))?;
                }
                if what.transform {
                    w.transform_serial(&mut buf[..len], logical)?;
                }
                Ok(Chunk {
                    seq,
                    hz,
                    logical,
                    len,
                    buf,
                    sums,
                })
            });
        let failed = r.is_err();
        if out.send(r).is_err() || failed {
            return;
        }
    }
}

fn writer<D: Disk + Sync + ?Sized>(
    w: &Walk<'_, D>,
    rx: Receiver<WriteMsg>,
    ack: SyncSender<Result<usize>>,
    free: SyncSender<AlignedBuf>,
) {
    for m in rx {
        let (c, last) = match m {
            WriteMsg::Chunk { chunk, last } => (chunk, last),
            WriteMsg::Flush(k) => {
                let r = w
                    .data
                    .flush()
                    .map_err(|e| Error::io("flush data", e))
                    .map(|_| k);
                let failed = r.is_err();
                let _ = ack.send(r);
                if failed {
                    return;
                }
                continue;
            }
        };
        let r = w
            .data
            .write_at(w.layout.new_physical(c.logical), &c.buf[..c.len])
            .map_err(|e| Error::io("write data", e));
        let hz = c.hz;
        let _ = free.try_send(c.buf);
        if let Err(e) = r {
            let _ = ack.send(Err(e));
            return;
        }
        if last {
            let r = w
                .data
                .flush()
                .map_err(|e| Error::io("flush data", e))
                .map(|_| hz);
            let failed = r.is_err();
            let _ = ack.send(r);
            if failed {
                return;
            }
        }
    }
}
