//! `luksify bench ...`: throughput measured against the reference tools, in the same run.

use anyhow::Context;
use clap::Subcommand;
use luksify_cipher::SectorCipher;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// AES-XTS throughput against `openssl speed -evp aes-256-xts`
    ///
    /// Encrypts a buffer that fits in cache with aes-xts-plain64 and a random 512-bit key, at
    /// 512- and 4096-byte sectors, on 1 thread and on all CPUs, and runs `openssl speed` with
    /// the same sizes (`-multi N` for all CPUs) right after each measurement.
    Cipher {
        /// One JSON object per row instead of a table
        #[arg(long)]
        json: bool,
        /// Seconds spent on each figure, ours and openssl's alike
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=60))]
        seconds: u32,
        /// Buffer encrypted over and over, in MiB (small enough to stay in cache)
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
        buffer_mib: u32,
        /// Do not run `openssl speed` (ratios are then left out)
        #[arg(long)]
        no_openssl: bool,
        /// Divide 1-thread figures by wall-clock time (and pass `-elapsed` to openssl) instead
        /// of CPU time. CPU time is openssl speed's default and is steadier on a busy machine;
        /// all-thread rows are always wall-clock, as `openssl speed -multi` measures them.
        #[arg(long)]
        elapsed: bool,
    },
    /// Read-only probe of a disk's throughput and IOPS, and its projected encryption time per mode
    ///
    /// Opens DEVICE read-only with O_DIRECT (nothing is written), measures sequential and
    /// random reads for a few seconds and the cipher in-process, then projects how long
    /// `luksify encrypt` would take on the whole device in each resilience mode.
    Device(crate::bench_device::DeviceArgs),
}

pub fn run(cmd: BenchCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCmd::Cipher {
            json,
            seconds,
            buffer_mib,
            no_openssl,
            elapsed,
        } => bench_cipher(
            json,
            seconds,
            buffer_mib as usize * 1024 * 1024,
            no_openssl,
            timing(elapsed),
        ),
        BenchCmd::Device(args) => crate::bench_device::run(&args),
    }
}

const SPEC: &str = "aes-xts-plain64";

/// How the threads of a row share the work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Layout {
    /// One thread, the serial API.
    Serial,
    /// Each thread encrypts its own buffer, as `openssl speed -multi` runs one process per
    /// CPU: the cipher's throughput per core, added up.
    Independent,
    /// One buffer split across the pool on every call (the parallel API the walker uses):
    /// adds a fork and a join per buffer.
    Split,
}

/// What a figure is divided by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Timing {
    /// CPU time of the working thread (openssl speed's default divisor for one process).
    Cpu,
    /// Wall-clock time.
    Elapsed,
}

fn timing(elapsed: bool) -> Timing {
    if elapsed {
        Timing::Elapsed
    } else {
        Timing::Cpu
    }
}
const SECTOR_SIZES: [usize; 2] = [512, 4096];

/// One row of the cipher benchmark.
#[derive(Debug, serde::Serialize)]
struct CipherRow {
    cipher: &'static str,
    /// The kernel this CPU runs: `vaes512`, `vaes256`, `aesni128` or `portable`.
    data_path: &'static str,
    key_bits: usize,
    sector_size: usize,
    threads: usize,
    /// How the threads share the work (see [`Layout`]).
    layout: Layout,
    buffer_bytes: usize,
    seconds: u32,
    timing: Timing,
    bytes_per_sec: f64,
    /// Wall-clock throughput of this row over one thread's rate per CPU second (which,
    /// unlike its wall-clock rate, other load on the machine does not depress: so a
    /// busy machine cannot show more scaling than it has CPUs).
    scaling: f64,
    openssl_bytes_per_sec: Option<f64>,
    ratio: Option<f64>,
    /// 1-minute load average when the row finished: other work skews wall-clock rows.
    load1: Option<f64>,
}

/// The 1-minute load average (None where /proc/loadavg is unreadable).
fn load1() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn bench_cipher(
    json: bool,
    seconds: u32,
    buffer_bytes: usize,
    no_openssl: bool,
    timing: Timing,
) -> anyhow::Result<ExitCode> {
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut key = Zeroizing::new([0u8; 64]);
    getrandom::fill(&mut key[..])
        .map_err(|e| anyhow::anyhow!("cannot read random bytes for the benchmark key: {e}"))?;
    let duration = Duration::from_secs(u64::from(seconds));
    let openssl_ok = !no_openssl && openssl_available();
    if !no_openssl && !openssl_ok {
        eprintln!("luksify: `openssl` not found on PATH: showing luksify's figures without ratios; install openssl (apt-get install openssl) to compare");
    }

    if let Some(load) = load1().filter(|&l| l > 0.5 * nproc as f64) {
        eprintln!(
            "luksify: the machine is busy (load average {load:.1} on {nproc} CPUs): wall-clock rows (all threads) are skewed; rerun when idle"
        );
    }
    let data_path = SectorCipher::new(SPEC, &key[..], 4096)?.data_path();
    if !json {
        println!(
            "AES-256-XTS ({SPEC}, 512-bit key, {data_path} kernel), {} MiB buffer, {seconds} s per figure, 1 MB = 10^6 bytes",
            buffer_bytes / (1024 * 1024),
        );
        println!(
            "1-thread rows: per {} second; all-thread rows: per wall-clock second (as openssl speed -multi)",
            match timing {
                Timing::Cpu => "CPU",
                Timing::Elapsed => "wall-clock",
            }
        );
        println!(
            "independent: one buffer per thread (as openssl speed -multi); split: one buffer \
             split across the threads per call; scaling: wall-clock vs 1 thread per CPU second"
        );
        println!(
            "{:>7} {:>8} {:>12} {:>14} {:>8} {:>14} {:>7}",
            "sector", "threads", "layout", "luksify MB/s", "scaling", "openssl MB/s", "ratio"
        );
    }
    for &sector_size in &SECTOR_SIZES {
        let cipher = SectorCipher::new(SPEC, &key[..], sector_size)?;
        let mut buf = vec![0u8; buffer_bytes / sector_size * sector_size];
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31);
        }
        let mut runs = vec![(1, Layout::Serial)];
        if nproc > 1 {
            runs.push((nproc, Layout::Independent));
            runs.push((nproc, Layout::Split));
        }
        let mut single_rate = None;
        let mut multi_openssl = None;
        for (threads, layout) in runs {
            // openssl speed -multi divides each child's count by wall-clock time whatever
            // -elapsed says (its children report the full -seconds even on a busy machine),
            // so all-thread rows use wall-clock time on both sides.
            let timing = if threads == 1 {
                timing
            } else {
                Timing::Elapsed
            };
            let ours = measure_ours(&cipher, &mut buf, threads, layout, duration)?;
            let bytes_per_sec = match timing {
                Timing::Cpu => ours.per_cpu_second,
                Timing::Elapsed => ours.per_wall_second,
            };
            let single = *single_rate.get_or_insert(ours.per_cpu_second);
            // Both all-thread layouts compare with the same `openssl speed -multi` figure.
            let openssl = match (openssl_ok, layout, multi_openssl) {
                (false, _, _) => None,
                (true, Layout::Split, Some(o)) => Some(o),
                (true, _, _) => Some(measure_openssl(sector_size, threads, seconds, timing)?),
            };
            if threads > 1 {
                multi_openssl = openssl;
            }
            let row = CipherRow {
                cipher: SPEC,
                data_path: cipher.data_path(),
                key_bits: cipher.key_bits(),
                sector_size,
                threads,
                layout,
                buffer_bytes: buf.len(),
                seconds,
                timing,
                bytes_per_sec,
                scaling: ours.per_wall_second / single,
                openssl_bytes_per_sec: openssl,
                ratio: openssl.map(|o| bytes_per_sec / o),
                load1: load1(),
            };
            if json {
                println!("{}", serde_json::to_string(&row)?);
            } else {
                let mb = |v: f64| format!("{:.1}", v / 1e6);
                println!(
                    "{:>7} {:>8} {:>12} {:>14} {:>8} {:>14} {:>7}",
                    row.sector_size,
                    row.threads,
                    format!("{:?}", row.layout).to_lowercase(),
                    mb(row.bytes_per_sec),
                    format!("{:.2}x", row.scaling),
                    row.openssl_bytes_per_sec.map_or("-".into(), mb),
                    row.ratio.map_or("-".into(), |r| format!("{r:.2}x")),
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// CPU time consumed so far by the calling thread (`thread`) or the whole process.
fn cpu_time(thread: bool) -> Duration {
    let clock = if thread {
        libc::CLOCK_THREAD_CPUTIME_ID
    } else {
        libc::CLOCK_PROCESS_CPUTIME_ID
    };
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; these clocks exist on every Linux.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(
        rc, 0,
        "clock_gettime on a CPU-time clock cannot fail on Linux"
    );
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Throughput of one measurement, divided by wall-clock time and by CPU time per thread.
struct Measured {
    per_wall_second: f64,
    per_cpu_second: f64,
}

/// Bytes per second encrypting in place again and again for `duration` (wall), on a rayon
/// pool of exactly `threads` threads whose own threads drive the loop (no third thread
/// sleeps and wakes around each pass). [`Layout::Serial`] and [`Layout::Split`] encrypt
/// `buf` (serial API, parallel API); [`Layout::Independent`] gives every thread its own copy
/// of `buf` and the serial API.
fn measure_ours(
    cipher: &SectorCipher,
    buf: &mut [u8],
    threads: usize,
    layout: Layout,
    duration: Duration,
) -> anyhow::Result<Measured> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("luksify-bench-{i}"))
        .build()
        .context("cannot start the benchmark thread pool")?;
    let serial = layout != Layout::Split;
    // One timed loop: returns (bytes, wall seconds, CPU seconds of this thread).
    let timed = |buf: &mut [u8], barrier: Option<&std::sync::Barrier>| {
        let pass = |buf: &mut [u8], iv: u64| {
            if serial {
                cipher.encrypt_serial(buf, iv)
            } else {
                cipher.encrypt(buf, iv)
            }
        };
        // Warm up caches, the pool and the CPU's vector units before timing.
        pass(buf, 0)?;
        if let Some(b) = barrier {
            b.wait();
        }
        let start = Instant::now();
        let cpu_start = cpu_time(serial);
        let mut bytes = 0u64;
        let mut iv = 0u64;
        while start.elapsed() < duration {
            pass(buf, iv)?;
            bytes += buf.len() as u64;
            iv = iv.wrapping_add((buf.len() / 512) as u64);
        }
        let wall = start.elapsed().as_secs_f64();
        let cpu = (cpu_time(serial) - cpu_start).as_secs_f64();
        Ok::<_, luksify_cipher::CipherError>((bytes, wall, cpu))
    };
    let (bytes, wall, cpu) = match layout {
        Layout::Serial | Layout::Split => pool.install(|| timed(buf, None))?,
        Layout::Independent => {
            let barrier = std::sync::Barrier::new(threads);
            let template: &[u8] = buf;
            let per_thread = pool.broadcast(|_| {
                let mut own = template.to_vec();
                timed(&mut own, Some(&barrier))
            });
            let mut total = (0u64, 0f64, 0f64);
            for r in per_thread {
                let (b, w, c) = r?;
                total = (total.0 + b, total.1.max(w), total.2 + c);
            }
            total
        }
    };
    // Split measures the whole process's CPU time; the others add up their threads'.
    let cpu_per_thread = cpu / threads as f64;
    Ok(Measured {
        per_wall_second: bytes as f64 / wall,
        per_cpu_second: bytes as f64 / cpu_per_thread,
    })
}

fn openssl_available() -> bool {
    Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `openssl speed -seconds S -bytes N [-multi T] -evp aes-256-xts` and returns its
/// figure in bytes per second (openssl prints thousands of bytes per second).
fn measure_openssl(
    bytes: usize,
    threads: usize,
    seconds: u32,
    timing: Timing,
) -> anyhow::Result<f64> {
    let mut cmd = Command::new("openssl");
    cmd.arg("speed");
    if timing == Timing::Elapsed {
        cmd.arg("-elapsed");
    }
    cmd.args(["-seconds", &seconds.to_string()])
        .args(["-bytes", &bytes.to_string()]);
    if threads > 1 {
        cmd.args(["-multi", &threads.to_string()]);
    }
    cmd.args(["-evp", "aes-256-xts"]);
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}; check that this openssl supports aes-256-xts, or pass --no-openssl",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    parse_openssl_speed(&stdout).with_context(|| {
        format!("cannot find the aes-256-xts figure in the output of {cmd:?}; pass --no-openssl to skip it")
    })
}

/// Finds the last `AES-256-XTS … 1234.56k` line (`evp … 1234.56k` in older versions).
fn parse_openssl_speed(stdout: &str) -> Option<f64> {
    stdout
        .lines()
        .rev()
        .find(|l| {
            let l = l.trim_start().to_ascii_lowercase();
            l.starts_with("aes-256-xts") || l.starts_with("evp ")
        })
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.strip_suffix('k'))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|k| k * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::{parse_openssl_speed, CipherRow, Timing};

    #[test]
    fn json_rows_carry_the_documented_fields() {
        let row = CipherRow {
            cipher: "aes-xts-plain64",
            data_path: "vaes256",
            key_bits: 512,
            sector_size: 4096,
            threads: 2,
            layout: super::Layout::Independent,
            buffer_bytes: 4 << 20,
            seconds: 2,
            timing: Timing::Elapsed,
            bytes_per_sec: 2e9,
            scaling: 1.9,
            openssl_bytes_per_sec: Some(1e9),
            ratio: Some(2.0),
            load1: Some(0.5),
        };
        let v: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&row).unwrap()).unwrap();
        for field in [
            "sector_size",
            "threads",
            "bytes_per_sec",
            "openssl_bytes_per_sec",
            "ratio",
            "scaling",
        ] {
            assert!(
                v.get(field).is_some_and(|f| f.is_number()),
                "{field} missing in {v}"
            );
        }
        assert_eq!(v["timing"], "elapsed");
        assert_eq!(v["layout"], "independent");
        assert_eq!(v["data_path"], "vaes256");
    }

    #[test]
    fn parses_openssl_speed_single_and_multi_output() {
        let single = "type           4096 bytes\nAES-256-XTS    5670643.71k\n";
        assert_eq!(parse_openssl_speed(single), Some(5_670_643_710.0));
        let multi = "Got: +F:22:AES-256-XTS:1:2 from 0\ntype 512 bytes\nevp  4626739.20k\n";
        assert_eq!(parse_openssl_speed(multi), Some(4_626_739_200.0));
        assert_eq!(parse_openssl_speed("Doing nothing\n"), None);
    }
}
