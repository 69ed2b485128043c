//! Key derivation (PBKDF2, Argon2i, Argon2id): running a keyslot's KDF, the
//! limits cryptsetup enforces, and cryptsetup-like calibration to a time target.

use crate::error::{Error, Result};
use crate::hash::Hash;
use crate::luks2::json::Kdf;
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// cryptsetup's minimum PBKDF2 iteration count.
pub const PBKDF2_MIN_ITERATIONS: u32 = 1000;
/// cryptsetup's minimum Argon2 time cost when creating keyslots.
pub const ARGON2_MIN_TIME: u32 = 4;
/// cryptsetup's minimum Argon2 memory (KiB).
pub const ARGON2_MIN_MEMORY_KIB: u32 = 32;
/// cryptsetup's absolute maximum Argon2 memory (KiB): 4 GiB.
pub const ARGON2_MAX_MEMORY_KIB: u32 = 4 * 1024 * 1024;
/// Default Argon2 memory when creating keyslots (KiB): 1 GiB, capped by half of RAM.
pub const ARGON2_DEFAULT_MEMORY_KIB: u32 = 1024 * 1024;
/// cryptsetup's maximum Argon2 parallelism when creating keyslots.
pub const ARGON2_MAX_CPUS: u32 = 4;
/// Default unlock time target (`--iter-time`), milliseconds.
pub const DEFAULT_ITER_TIME_MS: u32 = 2000;
/// Time target for the volume-key digest iterations, milliseconds.
pub const DIGEST_ITER_TIME_MS: u32 = 125;
/// Largest Argon2 lane count accepted when reading a keyslot.
const ARGON2_MAX_LANES_READ: u32 = 1 << 24;

/// KDF family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KdfKind {
    Pbkdf2,
    Argon2i,
    Argon2id,
}

impl KdfKind {
    /// Parses `pbkdf2`, `argon2i`, `argon2id`.
    pub fn parse(s: &str) -> Result<KdfKind> {
        match s {
            "pbkdf2" => Ok(KdfKind::Pbkdf2),
            "argon2i" => Ok(KdfKind::Argon2i),
            "argon2id" => Ok(KdfKind::Argon2id),
            _ => Err(Error::InvalidArgument(format!(
                "unknown PBKDF '{s}': use pbkdf2, argon2i or argon2id"
            ))),
        }
    }
}

/// Physical RAM in KiB (from /proc/meminfo), if known.
pub fn total_ram_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Default Argon2 memory: 1 GiB or half of RAM, whichever is smaller.
pub fn default_argon2_memory_kib() -> u32 {
    let half = total_ram_kib().map(|r| r / 2).unwrap_or(u64::MAX);
    u64::from(ARGON2_DEFAULT_MEMORY_KIB)
        .min(half)
        .max(u64::from(ARGON2_MIN_MEMORY_KIB)) as u32
}

/// Refuses KDF parameters no keyslot can have: an unknown hash, pbkdf2 with 0
/// iterations, Argon2 time, lanes or memory out of cryptsetup's range. Reads nothing
/// of this machine (a keyslot's shape, checked as its header is read: such a keyslot
/// is damaged, see `Luks2Keyslot::problem`).
pub fn check_shape(kdf: &Kdf) -> Result<()> {
    match kdf {
        Kdf::Pbkdf2 {
            hash, iterations, ..
        } => {
            Hash::parse(hash)?;
            if *iterations == 0 {
                return Err(Error::corrupt("pbkdf2 with 0 iterations"));
            }
        }
        Kdf::Argon2i {
            time, memory, cpus, ..
        }
        | Kdf::Argon2id {
            time, memory, cpus, ..
        } => {
            if *time == 0 || *cpus == 0 || *cpus > ARGON2_MAX_LANES_READ {
                return Err(Error::corrupt(format!(
                    "argon2 time {time} / cpus {cpus} out of range"
                )));
            }
            // Costs a keyslot carries (a new keyslot's are resolved within the limits):
            // one below cryptsetup's minimum is no keyslot cryptsetup writes (it said
            // "cost too high: lower --pbkdf-memory" of 1 KiB, to test-passphrase too).
            if *memory < ARGON2_MIN_MEMORY_KIB {
                return Err(Error::corrupt(format!(
                    "a keyslot's argon2 memory is {memory} KiB, below cryptsetup's minimum of {ARGON2_MIN_MEMORY_KIB} KiB"
                )));
            }
        }
    }
    Ok(())
}

/// Refuses KDF parameters we will not run: [`check_shape`], then Argon2 memory beyond
/// cryptsetup's 4 GiB maximum or beyond this machine's RAM. Runs before any derivation
/// so hostile headers cost nothing.
pub fn check_runnable(kdf: &Kdf) -> Result<()> {
    check_shape(kdf)?;
    if let Kdf::Argon2i { memory, .. } | Kdf::Argon2id { memory, .. } = kdf {
        if *memory > ARGON2_MAX_MEMORY_KIB {
            return Err(Error::KdfTooCostly(format!(
                "a keyslot's argon2 memory is {memory} KiB, above cryptsetup's maximum of {ARGON2_MAX_MEMORY_KIB} KiB (a damaged header, or one not made by cryptsetup); open it with another keyslot's passphrase"
            )));
        }
        if let Some(ram) = total_ram_kib() {
            if u64::from(*memory) > ram {
                return Err(Error::KdfTooCostly(format!(
                    "argon2 memory {memory} KiB exceeds this machine's {ram} KiB of RAM"
                )));
            }
        }
    }
    Ok(())
}

/// Runs the KDF, producing `out_len` bytes.
pub fn derive(kdf: &Kdf, passphrase: &[u8], out_len: usize) -> Result<Zeroizing<Vec<u8>>> {
    check_runnable(kdf)?;
    let mut out = Zeroizing::new(vec![0u8; out_len]);
    match kdf {
        Kdf::Pbkdf2 {
            hash,
            iterations,
            salt,
        } => Hash::parse(hash)?.pbkdf2(passphrase, salt, *iterations, &mut out),
        Kdf::Argon2i {
            time,
            memory,
            cpus,
            salt,
        } => argon2(
            argon2::Algorithm::Argon2i,
            *time,
            *memory,
            *cpus,
            passphrase,
            salt,
            &mut out,
        )?,
        Kdf::Argon2id {
            time,
            memory,
            cpus,
            salt,
        } => argon2(
            argon2::Algorithm::Argon2id,
            *time,
            *memory,
            *cpus,
            passphrase,
            salt,
            &mut out,
        )?,
    }
    Ok(out)
}

fn argon2(
    alg: argon2::Algorithm,
    time: u32,
    memory_kib: u32,
    cpus: u32,
    pass: &[u8],
    salt: &[u8],
    out: &mut [u8],
) -> Result<()> {
    let params = argon2::Params::new(memory_kib, time, cpus, Some(out.len()))
        .map_err(|e| Error::corrupt(format!("argon2 parameters rejected: {e}")))?;
    argon2::Argon2::new(alg, argon2::Version::V0x13, params)
        .hash_password_into(pass, salt, out)
        .map_err(|e| match e {
            // Not the header's fault: a memory limit (a cgroup, `ulimit -v`) or a busy
            // machine. It read "invalid LUKS header: argon2 failed: out of memory".
            argon2::Error::OutOfMemory => Error::KdfTooCostly(format!(
                "argon2 could not get its {memory_kib} KiB of memory (a cgroup or `ulimit -v` limit, or too little free): free memory or lift the limit"
            )),
            e => Error::corrupt(format!("argon2 failed: {e}")),
        })
}

/// What the user asked for when creating a keyslot (cryptsetup's `--pbkdf*` and
/// `--iter-time` options). [`KdfRequest::resolve`] turns it into concrete parameters.
/// Serializable (no secret in it), so that a caller can record what was asked.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KdfRequest {
    pub kind: KdfKind,
    /// PBKDF2 hash (ignored by Argon2).
    pub hash: Hash,
    /// Unlock time target in milliseconds (`--iter-time`).
    pub iter_time_ms: u32,
    /// Fixed iterations / Argon2 time cost: no benchmark (`--pbkdf-force-iterations`).
    pub force_iterations: Option<u32>,
    /// Argon2 memory in KiB (`--pbkdf-memory`); default [`default_argon2_memory_kib`].
    pub memory_kib: Option<u32>,
    /// Argon2 lanes (`--pbkdf-parallel`); default min(4, online CPUs).
    pub cpus: Option<u32>,
}

impl Default for KdfRequest {
    /// cryptsetup's LUKS2 default: argon2id, 2 s.
    fn default() -> Self {
        KdfRequest {
            kind: KdfKind::Argon2id,
            hash: Hash::Sha256,
            iter_time_ms: DEFAULT_ITER_TIME_MS,
            force_iterations: None,
            memory_kib: None,
            cpus: None,
        }
    }
}

impl KdfRequest {
    /// Cheap parameters for tests (PBKDF2, 1000 iterations).
    pub fn fast_pbkdf2() -> KdfRequest {
        KdfRequest {
            kind: KdfKind::Pbkdf2,
            force_iterations: Some(PBKDF2_MIN_ITERATIONS),
            ..KdfRequest::default()
        }
    }
    /// Cheap Argon2id parameters for tests (time 4, 32 MiB... here 32 KiB..).
    pub fn fast_argon2id() -> KdfRequest {
        KdfRequest {
            kind: KdfKind::Argon2id,
            force_iterations: Some(ARGON2_MIN_TIME),
            memory_kib: Some(ARGON2_MIN_MEMORY_KIB),
            cpus: Some(1),
            ..KdfRequest::default()
        }
    }

    /// Checks the request against cryptsetup's creation limits, before anything is
    /// benchmarked or written. Lanes and memory beyond this machine are not refused:
    /// [`KdfRequest::adjusted_for`] decreases them as cryptsetup does.
    pub fn validate(&self) -> Result<()> {
        match self.kind {
            KdfKind::Pbkdf2 => {
                if let Some(it) = self.force_iterations {
                    if it < PBKDF2_MIN_ITERATIONS {
                        return Err(Error::InvalidArgument(format!(
                            "pbkdf2 needs at least {PBKDF2_MIN_ITERATIONS} iterations, got {it}"
                        )));
                    }
                }
            }
            KdfKind::Argon2i | KdfKind::Argon2id => {
                if let Some(t) = self.force_iterations {
                    if t < ARGON2_MIN_TIME {
                        return Err(Error::InvalidArgument(format!(
                            "argon2 needs a time cost of at least {ARGON2_MIN_TIME}, got {t}"
                        )));
                    }
                }
                if let Some(m) = self.memory_kib {
                    if !(ARGON2_MIN_MEMORY_KIB..=ARGON2_MAX_MEMORY_KIB).contains(&m) {
                        return Err(Error::InvalidArgument(format!(
                            "--pbkdf-memory {m} KiB is outside {ARGON2_MIN_MEMORY_KIB}..={ARGON2_MAX_MEMORY_KIB} KiB"
                        )));
                    }
                }
            }
        }
        if self.iter_time_ms == 0 {
            return Err(Error::InvalidArgument(
                "--iter-time must be at least 1 ms".into(),
            ));
        }
        Ok(())
    }

    /// The request as cryptsetup's `crypt_set_pbkdf_type` adjusts it for a machine with
    /// `ram_kib` of RAM and `online_cpus` CPUs: lanes at most 4 and at most the CPUs
    /// (0 means the default, min(4, CPUs)); memory at most half the RAM (RAM under
    /// 128 MiB or unknown reads as bogus: then at most the 1 GiB default). cryptsetup
    /// says so only in its debug log; a keyslot made with more lanes or memory than
    /// the machine has would unlock slowly or not at all on it.
    pub fn adjusted_for(&self, ram_kib: Option<u64>, online_cpus: u32) -> KdfRequest {
        let mut r = self.clone();
        let online = online_cpus.max(1);
        r.cpus = self
            .cpus
            .filter(|&c| c != 0)
            .map(|c| c.min(ARGON2_MAX_CPUS).min(online));
        let cap = match ram_kib {
            Some(ram) if (128 * 1024..=u64::from(u32::MAX)).contains(&ram) => ram / 2,
            _ => u64::from(ARGON2_DEFAULT_MEMORY_KIB),
        };
        r.memory_kib = self.memory_kib.map(|m| u64::from(m).min(cap) as u32);
        r
    }

    /// Concrete KDF parameters with a fresh 32-byte salt: forced values as
    /// given, otherwise benchmarked so that one derivation takes about
    /// `iter_time_ms` on this machine (cryptsetup's approach).
    pub fn resolve(&self, out_len: usize) -> Result<Kdf> {
        self.validate()?;
        let online = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let req = self.adjusted_for(total_ram_kib(), online);
        let salt = crate::random::bytes(32)?;
        match req.kind {
            KdfKind::Pbkdf2 => {
                let iterations = match req.force_iterations {
                    Some(it) => it,
                    None => pbkdf2_iterations_for(req.hash, req.iter_time_ms, out_len),
                };
                Ok(Kdf::Pbkdf2 {
                    hash: req.hash.name().into(),
                    iterations,
                    salt,
                })
            }
            KdfKind::Argon2i | KdfKind::Argon2id => {
                let cpus = req.cpus.unwrap_or(online.clamp(1, ARGON2_MAX_CPUS));
                let max_mem = req.memory_kib.unwrap_or_else(default_argon2_memory_kib);
                let (time, memory) = match req.force_iterations {
                    Some(t) => (t, max_mem),
                    None => argon2_calibrate(req.kind, req.iter_time_ms, max_mem, cpus, out_len)?,
                };
                let memory = memory.max(ARGON2_MIN_MEMORY_KIB).max(8 * cpus);
                Ok(if req.kind == KdfKind::Argon2i {
                    Kdf::Argon2i {
                        time,
                        memory,
                        cpus,
                        salt,
                    }
                } else {
                    Kdf::Argon2id {
                        time,
                        memory,
                        cpus,
                        salt,
                    }
                })
            }
        }
    }
}

/// PBKDF2 iterations that take about `target_ms` (at least 1000) in whichever is slower
/// here: this build's PBKDF2 or the libcrypto (OpenSSL) that libcryptsetup unlocks with,
/// and so cryptsetup and systemd-cryptsetup at boot. OpenSSL 3's PBKDF2 ran 2.4x slower
/// than ours on the machine it was measured on: calibrated on ours alone, a volume took
/// 2.4x `--iter-time` to open in cryptsetup. Time growing runs until one lasts >= 1/8
/// of the target (at most 250 ms), then scale.
pub fn pbkdf2_iterations_for(hash: Hash, target_ms: u32, out_len: usize) -> u32 {
    let target = Duration::from_millis(u64::from(target_ms));
    let budget = (target / 8).min(Duration::from_millis(250));
    let mut out = Zeroizing::new(vec![0u8; out_len.max(1)]);
    let mut iterations: u32 = 1000;
    let mut per_sec = loop {
        let t0 = Instant::now();
        hash.pbkdf2(b"luksify-benchmark", &[0u8; 32], iterations, &mut out);
        let el = t0.elapsed();
        if el >= budget || iterations >= u32::MAX / 2 {
            break f64::from(iterations) / el.as_secs_f64().max(1e-6);
        }
        iterations = iterations.saturating_mul(2);
    };
    if let Some(lib) = libcrypto::Libcrypto::get() {
        if let Some(r) = lib.pbkdf2_rate(hash, out_len, budget) {
            per_sec = per_sec.min(r);
        }
    }
    let it = per_sec * f64::from(target_ms) / 1000.0;
    (it.min(f64::from(u32::MAX)) as u32).max(PBKDF2_MIN_ITERATIONS)
}

/// The system's libcrypto, loaded at run time (no build-time dependency, nothing when it
/// is absent), only to measure how fast the unlocking side computes PBKDF2.
mod libcrypto {
    use crate::hash::Hash;
    use std::ffi::{c_char, c_int, c_uchar, c_void, CString};
    use std::time::{Duration, Instant};

    type GetDigest = unsafe extern "C" fn(*const c_char) -> *const c_void;
    type Pbkdf2 = unsafe extern "C" fn(
        *const c_char,
        c_int,
        *const c_uchar,
        c_int,
        c_int,
        *const c_void,
        c_int,
        *mut c_uchar,
    ) -> c_int;

    /// Loaded once and never unloaded: OpenSSL registers exit handlers, and unloading
    /// it under them is asking for trouble.
    pub struct Libcrypto {
        get_digest: GetDigest,
        pbkdf2: Pbkdf2,
    }

    impl Libcrypto {
        pub fn get() -> Option<&'static Libcrypto> {
            static LIB: std::sync::OnceLock<Option<Libcrypto>> = std::sync::OnceLock::new();
            LIB.get_or_init(Libcrypto::load).as_ref()
        }

        fn load() -> Option<Libcrypto> {
            for name in [c"libcrypto.so.3", c"libcrypto.so.1.1"] {
                // SAFETY: dlopen of a NUL-terminated name; the handle is kept for good.
                let handle =
                    unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
                if handle.is_null() {
                    continue;
                }
                // SAFETY: dlsym on a live handle with NUL-terminated names.
                let (g, p) = unsafe {
                    (
                        libc::dlsym(handle, c"EVP_get_digestbyname".as_ptr()),
                        libc::dlsym(handle, c"PKCS5_PBKDF2_HMAC".as_ptr()),
                    )
                };
                if g.is_null() || p.is_null() {
                    // SAFETY: the handle came from dlopen above and is not used again.
                    unsafe { libc::dlclose(handle) };
                    continue;
                }
                // SAFETY: both symbols have these C signatures in OpenSSL 1.1 and 3
                // (`const EVP_MD *EVP_get_digestbyname(const char *)`, `int
                // PKCS5_PBKDF2_HMAC(const char *, int, const unsigned char *, int, int,
                // const EVP_MD *, int, unsigned char *)`).
                let (get_digest, pbkdf2) = unsafe {
                    (
                        std::mem::transmute::<*mut c_void, GetDigest>(g),
                        std::mem::transmute::<*mut c_void, Pbkdf2>(p),
                    )
                };
                return Some(Libcrypto { get_digest, pbkdf2 });
            }
            None
        }

        /// PBKDF2-HMAC-`hash` of libcrypto into `out`; None if it refuses.
        pub fn pbkdf2(
            &self,
            hash: Hash,
            password: &[u8],
            salt: &[u8],
            iterations: u32,
            out: &mut [u8],
        ) -> Option<()> {
            let name = CString::new(hash.name()).ok()?;
            // SAFETY: a NUL-terminated digest name; the result is checked for NULL.
            let md = unsafe { (self.get_digest)(name.as_ptr()) };
            if md.is_null() {
                return None;
            }
            // SAFETY: every pointer is valid for the length passed with it.
            let ok = unsafe {
                (self.pbkdf2)(
                    password.as_ptr().cast(),
                    c_int::try_from(password.len()).ok()?,
                    salt.as_ptr(),
                    c_int::try_from(salt.len()).ok()?,
                    c_int::try_from(iterations).ok()?,
                    md,
                    c_int::try_from(out.len()).ok()?,
                    out.as_mut_ptr(),
                )
            };
            (ok == 1).then_some(())
        }

        /// Iterations per second for `out_len` bytes, timed as our own calibration is.
        pub fn pbkdf2_rate(&self, hash: Hash, out_len: usize, budget: Duration) -> Option<f64> {
            let mut out = zeroize::Zeroizing::new(vec![0u8; out_len.max(1)]);
            let mut iterations: u32 = 1000;
            loop {
                let t0 = Instant::now();
                self.pbkdf2(hash, b"luksify-benchmark", &[0u8; 32], iterations, &mut out)?;
                let el = t0.elapsed();
                if el >= budget || iterations >= (c_int::MAX / 2) as u32 {
                    return Some(f64::from(iterations) / el.as_secs_f64().max(1e-6));
                }
                iterations = iterations.saturating_mul(2);
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// The calibration times libcrypto's PBKDF2 only if it is called right: its
        /// output must equal ours. scripts/test installs cryptsetup, which needs libcrypto.
        #[test]
        fn libcrypto_pbkdf2_equals_ours() {
            let lib = Libcrypto::get().expect("libcrypto.so.3 (installed with cryptsetup)");
            for (hash, len) in [(Hash::Sha256, 64), (Hash::Sha1, 20), (Hash::Sha512, 32)] {
                let mut a = vec![0u8; len];
                let mut b = vec![0u8; len];
                lib.pbkdf2(hash, b"pass", b"salt-salt", 1234, &mut a)
                    .unwrap();
                hash.pbkdf2(b"pass", b"salt-salt", 1234, &mut b);
                assert_eq!(a, b, "{hash:?}");
            }
            assert!(lib
                .pbkdf2_rate(Hash::Sha256, 32, Duration::from_millis(5))
                .is_some_and(|r| r > 0.0));
        }
    }
}

/// Argon2 (time, memory) that take about `target_ms` with at most `max_mem_kib`.
/// Cost grows linearly in time x memory, so one probe at a small memory gives
/// the rate; full memory is used when it fits the target with the minimum time
/// cost (then the time cost grows), otherwise memory shrinks (cryptsetup's order).
fn argon2_calibrate(
    kind: KdfKind,
    target_ms: u32,
    max_mem_kib: u32,
    cpus: u32,
    out_len: usize,
) -> Result<(u32, u32)> {
    let alg = if kind == KdfKind::Argon2i {
        argon2::Algorithm::Argon2i
    } else {
        argon2::Algorithm::Argon2id
    };
    let mut out = Zeroizing::new(vec![0u8; out_len.max(4)]);
    let max_mem = max_mem_kib.max(8 * cpus);
    let mut probe_mem = max_mem.min(64 * 1024);
    let per_ms = loop {
        let t0 = Instant::now();
        argon2(
            alg,
            ARGON2_MIN_TIME,
            probe_mem,
            cpus,
            b"luksify-benchmark",
            &[0u8; 32],
            &mut out,
        )?;
        let el_ms = t0.elapsed().as_secs_f64() * 1000.0;
        // Too quick to measure: probe with more memory, if allowed.
        if el_ms >= 20.0 || probe_mem >= max_mem {
            break f64::from(probe_mem) * f64::from(ARGON2_MIN_TIME) / el_ms.max(0.001);
        }
        probe_mem = probe_mem.saturating_mul(4).min(max_mem);
    };
    // KiB x passes affordable within the target.
    let budget = per_ms * f64::from(target_ms);
    let full = f64::from(max_mem) * f64::from(ARGON2_MIN_TIME);
    if budget >= full {
        let t = (budget / f64::from(max_mem)).min(f64::from(u32::MAX)) as u32;
        Ok((t.max(ARGON2_MIN_TIME), max_mem))
    } else {
        let m = (budget / f64::from(ARGON2_MIN_TIME)) as u32;
        Ok((ARGON2_MIN_TIME, m.max(ARGON2_MIN_MEMORY_KIB)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pbkdf2_sha256_matches_rfc_vector() {
        // RFC 7914 section 11 PBKDF2-HMAC-SHA256 vector (P="passwd", S="salt", c=1).
        let kdf = Kdf::Pbkdf2 {
            hash: "sha256".into(),
            iterations: 1,
            salt: b"salt".to_vec(),
        };
        let out = derive(&kdf, b"passwd", 64).unwrap();
        assert_eq!(hex::encode(&out[..16]), "55ac046e56e3089fec1691c22544b605");
    }

    #[test]
    fn argon2_memory_beyond_limits_is_refused_before_running() {
        let kdf = Kdf::Argon2id {
            time: 4,
            memory: u32::MAX,
            cpus: 1,
            salt: vec![0; 32],
        };
        assert!(matches!(
            derive(&kdf, b"x", 32),
            Err(Error::KdfTooCostly(_))
        ));
    }

    #[test]
    fn lanes_and_memory_beyond_the_machine_are_decreased_as_cryptsetup() {
        let req = |kib, cpus| KdfRequest {
            memory_kib: Some(kib),
            cpus: Some(cpus),
            ..KdfRequest::default()
        };
        // A 1 GiB, 2-CPU machine: 512 MiB and 2 lanes are the most a keyslot gets.
        let ram = Some(1024 * 1024);
        let a = |kib, cpus| {
            let r = req(kib, cpus).adjusted_for(ram, 2);
            (r.memory_kib.unwrap(), r.cpus)
        };
        assert_eq!(a(512 * 1024, 1), (512 * 1024, Some(1)));
        assert_eq!(a(512 * 1024 + 1, 2), (512 * 1024, Some(2)));
        assert_eq!(a(32, 4), (32, Some(2)));
        assert_eq!(a(32, 9), (32, Some(2)));
        assert_eq!(a(32, 0), (32, None), "0 lanes is the default");
        assert_eq!(req(32, 9).adjusted_for(ram, 16).cpus, Some(4));
        // RAM unknown or under 128 MiB: cryptsetup's 1 GiB default is the cap.
        assert_eq!(
            req(ARGON2_MAX_MEMORY_KIB, 1)
                .adjusted_for(Some(1000), 2)
                .memory_kib,
            Some(ARGON2_DEFAULT_MEMORY_KIB)
        );
        assert_eq!(
            req(ARGON2_MAX_MEMORY_KIB, 1)
                .adjusted_for(None, 2)
                .memory_kib,
            Some(ARGON2_DEFAULT_MEMORY_KIB)
        );
        // cryptsetup's absolute limits are refused whatever the machine.
        assert!(req(ARGON2_MAX_MEMORY_KIB + 1, 1).validate().is_err());
        assert!(req(ARGON2_MIN_MEMORY_KIB - 1, 1).validate().is_err());
        assert!(req(ARGON2_MAX_MEMORY_KIB, 100).validate().is_ok());
    }

    #[test]
    fn forced_parameters_are_used_verbatim() {
        let k = KdfRequest::fast_argon2id().resolve(64).unwrap();
        match k {
            Kdf::Argon2id {
                time,
                memory,
                cpus,
                salt,
            } => {
                assert_eq!((time, memory, cpus, salt.len()), (4, 32, 1, 32));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
