//! `luksify bench device DEV`: how long encrypting this device in place would take, found
//! without writing a byte to it.
//!
//! A read-only probe (the device is opened `O_RDONLY | O_DIRECT`) measures sequential
//! throughput with large reads and random 4 KiB read IOPS, each for a few seconds; the
//! cipher (and, for the checksum mode, SHA-256) is timed in-process. The projection is the
//! same I/O model as `scripts/bench`: every mode reads the device once and writes it once,
//! plus its own extra writes (journal: a second copy of every chunk; checksum: 32 bytes per
//! 4 KiB sector), and the walker overlaps I/O with encryption, so the time is the larger of
//! the I/O time and the CPU time. Write speed cannot be measured without writing: it is
//! assumed equal to the read speed unless `--write-mbps` says otherwise.

use anyhow::{bail, Context};
use luksify_cipher::SectorCipher;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// Arguments of `luksify bench device`.
#[derive(clap::Args, Debug)]
pub struct DeviceArgs {
    /// Block device (or image file) to probe; it is opened read-only and never written
    pub device: PathBuf,
    /// One JSON object instead of a table
    #[arg(long)]
    pub json: bool,
    /// Seconds spent on each probe (sequential, random), after a short warm-up
    #[arg(long, default_value_t = 3.0, value_parser = parse_seconds)]
    pub seconds: f64,
    /// Write speed in MB/s (10^6 bytes) to use in the projection instead of assuming it equals the read speed
    #[arg(long)]
    pub write_mbps: Option<f64>,
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.1..=60.0).contains(&v) {
        Ok(v)
    } else {
        Err("must be between 0.1 and 60".into())
    }
}

/// Size of each sequential read: large enough that per-request cost and IOPS caps do not
/// hide the bandwidth, as the walker's chunks are.
const SEQ_BLOCK: usize = 4 << 20;
/// Size of each random read (one filesystem block, the unit IOPS limits are quoted in).
const RAND_BLOCK: usize = 4096;
/// Random reads kept in flight, so that a device whose IOPS cap needs queue depth reaches it.
const RAND_QUEUE_DEPTH: usize = 8;
/// Discarded at the start of each probe: throttles and caches often grant an initial burst.
const WARMUP: Duration = Duration::from_millis(300);
/// Buffers and offsets for O_DIRECT: a multiple of every logical block size Linux uses.
const ALIGN: usize = 4096;
/// The shift `--reduce-device-size` reserves in datashift mode (the default, 32 MiB).
const DATASHIFT_BYTES: u64 = 32 << 20;
/// LUKS2 header written before the data pass (default metadata plus keyslots area).
const HEADER_BYTES: u64 = 16 << 20;
/// Checksum mode stores one SHA-256 per 4 KiB sector.
const CHECKSUM_PER_SECTOR: f64 = 32.0 / 4096.0;

/// What the probe measured.
#[derive(Debug, serde::Serialize)]
struct Probe {
    device: String,
    device_bytes: u64,
    /// False when the kernel refused O_DIRECT (e.g. a file on tmpfs): figures may come from RAM.
    direct_io: bool,
    seq_read_bps: f64,
    seq_block_bytes: usize,
    random_read_iops: f64,
    random_block_bytes: usize,
    random_queue_depth: usize,
    write_bps: f64,
    write_assumed_equal_to_read: bool,
    cipher: &'static str,
    cipher_bps: f64,
    sha256_bps: f64,
    threads: usize,
    projections: Vec<Projection>,
}

/// Projected cost of encrypting the whole device in one resilience mode.
#[derive(Debug, serde::Serialize)]
struct Projection {
    mode: &'static str,
    read_bytes: u64,
    write_bytes: u64,
    /// Reads and writes one after the other, as a disk with one budget for both allows.
    io_seconds: f64,
    /// Reads and writes fully overlapped: only a device that budgets them separately
    /// (e.g. a cgroup-throttled loop device) allows this; never used for `seconds`.
    io_seconds_separate_budgets: f64,
    cpu_seconds: f64,
    seconds: f64,
    bound_by: &'static str,
}

pub fn run(args: &DeviceArgs) -> anyhow::Result<ExitCode> {
    let dev = &args.device;
    let (file, direct_io) = open_read_only(dev)?;
    let size = device_size(&file, dev)?;
    if size < (ALIGN as u64) * 2 {
        bail!(
            "{}: only {size} bytes; nothing to benchmark (need at least 8 KiB)",
            dev.display()
        );
    }
    if !direct_io && !args.json {
        eprintln!(
            "luksify: {}: the kernel refused O_DIRECT here (tmpfs?); reads may be served from RAM and overstate the device",
            dev.display()
        );
    }
    let probe_time = Duration::from_secs_f64(args.seconds);
    let seq = probe_sequential(&file, size, probe_time, dev)?;
    let iops = probe_random(&file, size, probe_time, dev)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cipher_bps = cipher_speed(threads)?;
    let sha_bps = sha256_speed(threads);
    let (write_bps, assumed) = match args.write_mbps {
        Some(m) if m > 0.0 => (m * 1e6, false),
        Some(m) => bail!("--write-mbps {m}: must be a positive number of MB/s"),
        None => (seq, true),
    };
    let projections = project(size, seq, write_bps, cipher_bps, sha_bps);
    let probe = Probe {
        device: dev.display().to_string(),
        device_bytes: size,
        direct_io,
        seq_read_bps: seq,
        seq_block_bytes: SEQ_BLOCK,
        random_read_iops: iops,
        random_block_bytes: RAND_BLOCK,
        random_queue_depth: RAND_QUEUE_DEPTH,
        write_bps,
        write_assumed_equal_to_read: assumed,
        cipher: "aes-xts-plain64 (512-bit key, 4096-byte sectors)",
        cipher_bps,
        sha256_bps: sha_bps,
        threads,
        projections,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&probe)?);
    } else {
        print_table(&probe);
    }
    Ok(ExitCode::SUCCESS)
}

/// Opens read-only with O_DIRECT, falling back to buffered reads where O_DIRECT is refused.
fn open_read_only(dev: &Path) -> anyhow::Result<(File, bool)> {
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev);
    match direct {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let f = File::open(dev).with_context(|| {
                format!("cannot open {} read-only; check the path and permissions", dev.display())
            })?;
            Ok((f, false))
        }
        Err(e) => Err(e).with_context(|| {
            format!(
                "cannot open {} read-only; check the path and that you may read it (root for block devices)",
                dev.display()
            )
        }),
    }
}

fn device_size(file: &File, dev: &Path) -> anyhow::Result<u64> {
    let meta = file
        .metadata()
        .with_context(|| format!("cannot stat {}", dev.display()))?;
    if meta.file_type().is_block_device() {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a live u64.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| {
                format!("cannot read the size of block device {}", dev.display())
            });
        }
        Ok(size)
    } else if meta.is_file() {
        Ok(meta.len())
    } else {
        bail!(
            "{} is neither a block device nor a regular file; pass a disk such as /dev/sdb",
            dev.display()
        )
    }
}

/// `_IOR(0x12, 114, size_t)`: the block device's size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// A heap buffer aligned for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, ALIGN).expect("valid layout");
        // SAFETY: the layout has a non-zero size (callers pass block sizes >= 4096).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, layout }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live, initialised (zeroed) allocation of layout.size() bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated by alloc_zeroed with this very layout and is freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// Sequential read throughput in bytes per second, from offset 0 onwards (wrapping at the end).
fn probe_sequential(file: &File, size: u64, time: Duration, dev: &Path) -> anyhow::Result<f64> {
    let block = SEQ_BLOCK.min((size as usize / ALIGN) * ALIGN);
    let mut buf = AlignedBuf::new(block);
    let last_start = size - block as u64;
    let mut off = 0u64;
    let start = Instant::now();
    let mut timed: Option<(Instant, u64)> = None;
    loop {
        let now = Instant::now();
        match timed {
            None if now - start >= WARMUP => timed = Some((now, 0)),
            Some((t0, bytes)) if now - t0 >= time => {
                return Ok(bytes as f64 / (now - t0).as_secs_f64());
            }
            _ => {}
        }
        let n = file
            .read_at(buf.as_mut_slice(), off)
            .with_context(|| format!("cannot read {} at offset {off}", dev.display()))?;
        if let Some((_, bytes)) = timed.as_mut() {
            *bytes += n as u64;
        }
        off += block as u64;
        if off > last_start {
            off = 0;
        }
    }
}

/// Random aligned 4 KiB reads per second, with a few reads in flight.
fn probe_random(file: &File, size: u64, time: Duration, dev: &Path) -> anyhow::Result<f64> {
    let blocks = size / RAND_BLOCK as u64;
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("cannot read random bytes: {e}"))?;
    let seed = u64::from_le_bytes(seed) | 1;
    let start = Instant::now();
    let results: Vec<anyhow::Result<(u64, f64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..RAND_QUEUE_DEPTH as u64)
            .map(|t| {
                s.spawn(move || -> anyhow::Result<(u64, f64)> {
                    let mut buf = AlignedBuf::new(RAND_BLOCK);
                    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(t) | 1;
                    let mut count = 0u64;
                    let mut t0 = None;
                    loop {
                        let now = Instant::now();
                        match t0 {
                            None if now - start >= WARMUP => t0 = Some(now),
                            Some(t) if now - t >= time => {
                                return Ok((count, (now - t).as_secs_f64()));
                            }
                            _ => {}
                        }
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let off = (x % blocks) * RAND_BLOCK as u64;
                        file.read_at(buf.as_mut_slice(), off).with_context(|| {
                            format!("cannot read {} at offset {off}", dev.display())
                        })?;
                        if t0.is_some() {
                            count += 1;
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("probe thread panicked"))
            .collect()
    });
    let mut total = 0.0;
    for r in results {
        let (count, secs) = r?;
        total += count as f64 / secs;
    }
    Ok(total)
}

/// AES-XTS bytes per second over all CPUs, as the walker encrypts (4 KiB sectors, rayon).
fn cipher_speed(threads: usize) -> anyhow::Result<f64> {
    let mut key = Zeroizing::new([0u8; 64]);
    getrandom::fill(&mut key[..])
        .map_err(|e| anyhow::anyhow!("cannot read random bytes for the benchmark key: {e}"))?;
    let cipher = SectorCipher::new("aes-xts-plain64", &key[..], 4096)?;
    let mut buf = vec![0x5au8; 8 << 20];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("cannot start the cipher benchmark threads")?;
    pool.install(|| cipher.encrypt(&mut buf, 0))?;
    let start = Instant::now();
    let mut bytes = 0u64;
    let mut iv = 0u64;
    while start.elapsed() < Duration::from_millis(400) {
        pool.install(|| cipher.encrypt(&mut buf, iv))?;
        bytes += buf.len() as u64;
        iv += (buf.len() / 512) as u64;
    }
    Ok(bytes as f64 / start.elapsed().as_secs_f64())
}

/// SHA-256 bytes per second over all CPUs, in 4 KiB sectors (checksum mode hashes each one).
fn sha256_speed(threads: usize) -> f64 {
    let buf = vec![0xa5u8; 4 << 20];
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed() < Duration::from_millis(200) {
        for sector in buf.chunks(4096) {
            std::hint::black_box(Sha256::digest(sector));
        }
        bytes += buf.len() as u64;
    }
    // Hashing parallelises across sectors as the cipher does.
    bytes as f64 / start.elapsed().as_secs_f64() * threads as f64
}

/// The I/O and CPU model per mode; see the module comment.
fn project(
    size: u64,
    read_bps: f64,
    write_bps: f64,
    cipher_bps: f64,
    sha_bps: f64,
) -> Vec<Projection> {
    let checksums = (size as f64 * CHECKSUM_PER_SECTOR) as u64;
    let modes: [(&'static str, u64, u64, bool); 4] = [
        // datashift encrypts all but the reserved tail, moving data by the shift as it goes.
        (
            "datashift",
            size - DATASHIFT_BYTES.min(size),
            size - DATASHIFT_BYTES.min(size) + HEADER_BYTES,
            false,
        ),
        ("checksum", size, size + checksums + HEADER_BYTES, true),
        ("journal", size, 2 * size + HEADER_BYTES, false),
        ("none", size, size + HEADER_BYTES, false),
    ];
    modes
        .iter()
        .map(|&(mode, read, write, hashes)| {
            let io = read as f64 / read_bps + write as f64 / write_bps;
            let mut cpu = read as f64 / cipher_bps;
            if hashes {
                cpu += read as f64 / sha_bps;
            }
            Projection {
                mode,
                read_bytes: read,
                write_bytes: write,
                io_seconds: io,
                io_seconds_separate_budgets: (read as f64 / read_bps).max(write as f64 / write_bps),
                cpu_seconds: cpu,
                seconds: io.max(cpu),
                bound_by: if io >= cpu { "I/O" } else { "CPU" },
            }
        })
        .collect()
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.2} {}", UNITS[u])
}

fn human_secs(s: f64) -> String {
    if s < 90.0 {
        format!("{s:.1} s")
    } else if s < 5400.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{:.2} h", s / 3600.0)
    }
}

fn print_table(p: &Probe) {
    let mb = |v: f64| format!("{:.1} MB/s", v / 1e6);
    println!(
        "{}: {} ({} bytes), read-only probe{}",
        p.device,
        human_bytes(p.device_bytes),
        p.device_bytes,
        if p.direct_io {
            ", O_DIRECT"
        } else {
            ", buffered (O_DIRECT refused)"
        }
    );
    println!(
        "  sequential read ({} MiB blocks): {}",
        p.seq_block_bytes >> 20,
        mb(p.seq_read_bps)
    );
    println!(
        "  random read ({} KiB, {} in flight):  {:.0} IOPS",
        p.random_block_bytes >> 10,
        p.random_queue_depth,
        p.random_read_iops
    );
    if p.write_assumed_equal_to_read {
        println!(
            "  write: assumed {} (equal to read; nothing is written; set --write-mbps to change)",
            mb(p.write_bps)
        );
    } else {
        println!("  write: {} (from --write-mbps)", mb(p.write_bps));
    }
    println!(
        "  {} on {} threads: {}; SHA-256: {}",
        p.cipher,
        p.threads,
        mb(p.cipher_bps),
        mb(p.sha256_bps)
    );
    println!("Projected in-place encryption of the whole device (1 MB = 10^6 bytes):");
    println!(
        "  {:<10} {:>12} {:>12} {:>10} {:>10} {:>10}  bound by",
        "mode", "read", "written", "I/O", "CPU", "projected"
    );
    for r in &p.projections {
        println!(
            "  {:<10} {:>12} {:>12} {:>10} {:>10} {:>10}  {}",
            r.mode,
            human_bytes(r.read_bytes),
            human_bytes(r.write_bytes),
            human_secs(r.io_seconds),
            human_secs(r.cpu_seconds),
            human_secs(r.seconds),
            r.bound_by
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projection_counts_each_modes_extra_writes() {
        let size = 10u64 << 30;
        let p = project(size, 100e6, 50e6, 1e12, 1e12);
        let get = |m: &str| p.iter().find(|x| x.mode == m).unwrap();
        assert_eq!(get("none").read_bytes, size);
        assert_eq!(get("none").write_bytes, size + HEADER_BYTES);
        assert_eq!(get("journal").write_bytes, 2 * size + HEADER_BYTES);
        assert!(get("checksum").write_bytes > get("none").write_bytes);
        assert_eq!(get("datashift").read_bytes, size - DATASHIFT_BYTES);
        // I/O-bound at these speeds: read at 100 MB/s plus write at 50 MB/s.
        let none = get("none");
        let expect = size as f64 / 100e6 + (size + HEADER_BYTES) as f64 / 50e6;
        assert!((none.seconds - expect).abs() < 1e-6);
        assert_eq!(none.bound_by, "I/O");
    }

    #[test]
    fn projection_is_cpu_bound_when_the_cipher_is_slower_than_the_disk() {
        let p = project(1 << 30, 10e9, 10e9, 100e6, 1e12);
        assert!(p.iter().all(|x| x.bound_by == "CPU"));
        assert!((p[3].seconds - (1u64 << 30) as f64 / 100e6).abs() < 1e-6);
    }
}
