//! Shared fixtures for luksify's integration tests.
//!
//! Naming convention (scripts/test selects on it):
//! - `root_*` tests need root and loop devices; they are `#[ignore]`d by default and
//!   scripts/test runs them only where `losetup` works, otherwise nextest counts them
//!   as skipped. Inside, [`require_root`] fails loudly rather than pass silently.
//! - `vm_*` tests need the TCG guest built by scripts/vm (same rule).
//! - everything else runs anywhere scripts/test has installed its dependencies
//!   (cryptsetup, python3 `cryptography`, qemu-img).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Path of the `luksify` binary under test: `$LUKSIFY_BIN`, else the newest of
/// target/release and target/debug.
pub fn luksify_bin() -> PathBuf {
    if let Ok(p) = std::env::var("LUKSIFY_BIN") {
        return PathBuf::from(p);
    }
    let root = workspace_root();
    let cands = [
        root.join("target/release/luksify"),
        root.join("target/debug/luksify"),
    ];
    cands
        .iter()
        .filter(|p| p.exists())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .cloned()
        .unwrap_or_else(|| panic!("luksify binary not built: run `cargo build --release -p luksify` or set LUKSIFY_BIN"))
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Runs a command, returning its output; panics with the full command line if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// Runs a command and panics with stdout/stderr unless it exits 0.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command to its end (stdout and stderr discarded) and returns whether it
/// exited 0 and its peak resident set size in KiB, from `wait4`'s rusage of that one
/// child (not the maximum over every child this process has waited for).
pub fn run_peak_rss_kib(cmd: &mut Command) -> (bool, u64) {
    use std::process::Stdio;
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for the child we spawned.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our own child, not yet reaped (std reaps only in wait()).
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(
        r,
        pid,
        "wait4 on {cmd:?}: {}",
        std::io::Error::last_os_error()
    );
    // The child is reaped: dropping the handle does not wait again.
    drop(child);
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    (ok, ru.ru_maxrss as u64)
}

/// Fails the test (never passes it) when not root: root tests are only selected
/// by scripts/test where root and loop devices are available.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "this test needs root and loop devices; scripts/test only selects it where they exist"
    );
}

/// Fails the test when a required external tool is missing (scripts/test installs them).
pub fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "required tool `{name}` is not on PATH; run scripts/test, which installs it"
    );
}

/// A loop device attached to an image file, detached on drop (even on panic).
#[derive(Debug)]
pub struct LoopDev {
    pub path: PathBuf,
    /// The image as the kernel names it, to tell our loop device from a reused number.
    backing: PathBuf,
}

impl LoopDev {
    pub fn attach(image: &Path) -> LoopDev {
        Self::attach_with(image, &[])
    }
    /// Attaches with extra `losetup` flags, e.g. `["--direct-io=on"]` or `["--sector-size", "4096"]`.
    pub fn attach_with(image: &Path, flags: &[&str]) -> LoopDev {
        require_root();
        let out = run_ok(
            Command::new("losetup")
                .args(["-f", "--show"])
                .args(flags)
                .arg(image),
        );
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
        let backing = std::fs::canonicalize(image).unwrap_or(image.to_path_buf());
        LoopDev { path, backing }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        // Only while it is still ours: once detached, its number may already be another
        // test's loop device, which must not be unmounted or detached from here.
        let name = self.path.file_name().unwrap_or_default().to_string_lossy();
        let backing = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
            .unwrap_or_default();
        let backing = backing.trim_end_matches('\n');
        if Path::new(backing.strip_suffix(" (deleted)").unwrap_or(backing)) != self.backing {
            return;
        }
        let _ = Command::new("umount").arg("-l").arg(&self.path).output();
        let _ = Command::new("losetup").arg("-d").arg(&self.path).output();
    }
}

/// Creates a sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) {
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(size).expect("size image");
}

/// Fills a buffer with random bytes.
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_random(&mut v);
    v
}

/// Fills with a fast deterministic pseudo-random stream (xorshift) from `seed`.
pub fn fill_pattern(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// [`fill_pattern`] with every third 24 KiB stretch zero, like the unused space of a
/// volume (checksum mode takes all-zero blocks' digest from one hash of a zero block),
/// and some of those stretches zero but for one byte at 4095.
pub fn fill_volume(buf: &mut [u8], seed: u64) {
    fill_pattern(buf, seed);
    for (i, stretch) in buf.chunks_mut(24 << 10).enumerate() {
        if i % 3 == 1 {
            stretch.fill(0);
            if i % 9 == 4 && stretch.len() > 4095 {
                stretch[4095] = 1;
            }
        }
    }
}

fn fill_random(buf: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .expect("read /dev/urandom");
}

/// Whether `p` starts with a LUKS header luksify can parse (either copy, LUKS1 or LUKS2).
/// Panics unless every private writable anonymous mapping of process `pid` (its heap,
/// stacks, and the anonymous memory that holds keys and data buffers) is locked in
/// memory (`lo` in /proc/PID/smaps' VmFlags), so none of it can be written to swap.
pub fn assert_memory_locked(pid: u32, what: &str) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_else(|e| panic!("{what} (pid {pid}) is gone: {e}"));
    let mut head = "";
    let mut anon = 0;
    for line in smaps.lines() {
        if line.starts_with(|c: char| c.is_ascii_hexdigit()) && line.contains('-') {
            head = line;
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            let f: Vec<&str> = head.split_whitespace().collect();
            // address perms offset dev inode [name]: private, writable, no file.
            let anonymous = f.len() >= 5 && f[1] == "rw-p" && f[4] == "0";
            if anonymous {
                anon += 1;
                assert!(
                    flags.split_whitespace().any(|x| x == "lo"),
                    "{what} (pid {pid}) has memory that can be swapped out: {head} ({flags})"
                );
            }
        }
    }
    assert!(anon > 0, "no anonymous memory found for {what}: {smaps}");
}

pub fn has_luks_header(p: &Path) -> bool {
    std::fs::File::open(p)
        .ok()
        .and_then(|f| luksify_luks::probe(&f).ok().flatten())
        .is_some()
}

/// Sequence id of the primary LUKS2 header in `p` (0 when there is none yet).
pub fn header_seqid(p: &Path) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 24];
    match std::fs::File::open(p).and_then(|f| f.read_exact_at(&mut b, 0)) {
        Ok(()) if &b[..6] == b"LUKS\xba\xbe" => u64::from_be_bytes(b[16..24].try_into().unwrap()),
        _ => 0,
    }
}

/// Starts `cmd` and SIGKILLs it once the header in `hdr` has seen `commits` commits past
/// sequence id `base`, `jitter_us` later (so the kill lands anywhere in the hotzone that
/// follows). Progress-based, not time-based: robust on a loaded machine. Returns early if
/// the command ends by itself.
pub fn kill_after_commits(cmd: &mut Command, hdr: &Path, base: u64, commits: u64, jitter_us: u64) {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    signal_after_commits(cmd, hdr, base, commits, jitter_us, libc::SIGKILL);
}

/// Starts `cmd` (its stdio as the caller set it up) and sends it `sig` once the header in
/// `hdr` has seen `commits` commits past sequence id `base`, `jitter_us` later. Returns
/// the exit status, and whether the signal was sent: `false` when the command ended by
/// itself first (when `true`, it may still have finished just before the signal came).
pub fn signal_after_commits(
    cmd: &mut Command,
    hdr: &Path,
    base: u64,
    commits: u64,
    jitter_us: u64,
    sig: libc::c_int,
) -> (std::process::ExitStatus, bool) {
    use std::time::Duration;
    let mut child = cmd.spawn().unwrap();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return (st, false);
        }
        if header_seqid(hdr).saturating_sub(base) >= commits {
            std::thread::sleep(Duration::from_micros(jitter_us));
            break;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    // SAFETY: kill(2) on our own child, which has not been reaped yet (try_wait saw
    // it running), so the pid cannot have been reused.
    unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    (child.wait().unwrap(), true)
}

/// Whether no process holds a `flock` on `path` that a shared lock would wait for:
/// cryptsetup's metadata lock on an image or header file (held by luksify and
/// cryptsetup only while they write a header).
pub fn no_header_write_lock(path: &Path) -> bool {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: flock on a descriptor we own; the lock goes when `f` closes.
    unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::LOCK_SH | libc::LOCK_NB,
        ) == 0
    }
}

/// A child frozen with SIGSTOP mid-run: it holds whatever it holds (locks, open
/// devices) while the test tries other commands, whatever the machine's speed.
/// [`Frozen::thaw`] continues it and waits for its end; dropping it unthawed kills it.
#[derive(Debug)]
pub struct Frozen {
    child: Option<std::process::Child>,
}

impl Frozen {
    /// Starts `cmd` and stops it once the header in `hdr` has a sequence id of at least
    /// `seqid` (so its journal is live). Fails the test if it ends before.
    pub fn after_seqid(cmd: &mut Command, hdr: &Path, seqid: u64) -> Frozen {
        use std::time::Duration;
        let mut child = cmd.spawn().unwrap();
        while header_seqid(hdr) < seqid {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("{cmd:?} ended ({st}) before header sequence id {seqid}");
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        // SAFETY: kill(2) on our own child, not reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGSTOP) };
        let f = Frozen { child: Some(child) };
        f.wait_stopped();
        f
    }
    /// Lets the child run on in short steps until `cond` holds while it is stopped
    /// (e.g. it holds no header lock: it is between two commits).
    pub fn step_until(&self, cond: impl Fn() -> bool) {
        let pid = self.child.as_ref().unwrap().id() as libc::pid_t;
        let t0 = std::time::Instant::now();
        while !cond() {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(60),
                "the condition never held while the child was stopped"
            );
            // SAFETY: kill(2) on our own child, not reaped yet.
            unsafe { libc::kill(pid, libc::SIGCONT) };
            std::thread::sleep(std::time::Duration::from_micros(300));
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
            self.wait_stopped();
        }
    }
    fn wait_stopped(&self) {
        use std::time::Duration;
        let child = self.child.as_ref().unwrap();
        // SIGSTOP is delivered asynchronously, and a thread inside a system call (a
        // write in flight) stops only when it returns: wait until every thread shows
        // state `T` in /proc (the state follows the command name, in parentheses). A
        // child that ended meanwhile (state `Z`, unreaped) fails the test.
        let states = |pid: u32| -> Vec<char> {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .filter_map(|e| e.ok())
                .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
                .filter_map(|s| s.rsplit_once(") ").and_then(|(_, r)| r.chars().next()))
                .collect()
        };
        loop {
            let st = states(child.id());
            assert!(
                !st.iter().any(|&c| c == 'Z' || c == 'X'),
                "the frozen child ended while it was let run"
            );
            if st.iter().all(|&c| c == 'T') {
                return;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    /// The frozen child's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }
    /// Continues the child and waits for its end.
    pub fn thaw(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on our own child, not reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGCONT) };
        child.wait().unwrap()
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `cmd` run under strace with one `-e inject=...` rule (stdout discarded): exact fault
/// points, whatever the machine's load.
pub fn strace_inject(rule: &str, cmd: &Command) -> Command {
    let mut st = strace_with(&["-e".as_ref(), rule.as_ref()], cmd);
    st.stdout(std::process::Stdio::null());
    st
}

/// `cmd` (its program, arguments, the environment it sets and its working directory) under `strace -f -qq -o
/// /dev/null ARGS...`: a fault injected at an exact point (`-e inject=...`, `-P PATH`).
pub fn strace_with(args: &[&std::ffi::OsStr], cmd: &Command) -> Command {
    let mut st = Command::new("strace");
    st.args(["-f", "-qq", "-o", "/dev/null"])
        .args(args)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => st.env(k, v),
            None => st.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        st.current_dir(d);
    }
    st
}

/// Whether `cryptsetup open --test-passphrase` opens `img` with the passphrase in `key`.
/// `cryptsetup luksFormat -q --type KIND` of `img` with the passphrase in `key`, at the
/// tests' cheap key derivation (PBKDF2, 1000 iterations).
pub fn cryptsetup_format_fast(kind: &str, img: &Path, key: &Path) -> Command {
    let mut c = Command::new("cryptsetup");
    c.args(["luksFormat", "-q", "--type", kind]);
    if kind != "luks1" {
        c.args(["--pbkdf", "pbkdf2"]);
    }
    c.args(["--pbkdf-force-iterations", "1000", "--key-file"])
        .arg(key)
        .arg(img);
    c
}

/// `cryptsetup reencrypt --encrypt --init-only --reduce-device-size 32M` of `img` with a
/// fast KDF: a header-in-front encryption set up and not begun.
pub fn cryptsetup_init_shift(img: &Path, key: &Path) -> Command {
    let mut c = Command::new("cryptsetup");
    c.args(["reencrypt", "--encrypt", "--init-only", "-q"])
        .args(["--reduce-device-size", "32M"])
        .args([
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
        ])
        .arg(key)
        .arg(img);
    c
}

pub fn cryptsetup_opens(img: &Path, key: &Path) -> bool {
    Command::new("cryptsetup")
        .args(["open", "--test-passphrase"])
        .arg(img)
        .arg("--key-file")
        .arg(key)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `cmd` until it enters its `n`-th fdatasync(2), where strace SIGKILLs it (or to its
/// end, if it makes fewer). Unlike a poll of the header, it cannot fall behind a short
/// run on a loaded machine.
pub fn kill_at_fdatasync(cmd: &Command, n: u64) -> Output {
    run(&mut strace_inject(
        &format!("inject=fdatasync:signal=SIGKILL:when={n}"),
        cmd,
    ))
}

/// Runs `cmd` under strace, SIGKILLed at its `n`th fdatasync of the file at the absolute
/// path `file` (which may not exist yet), stdout discarded. Counting one file's flushes
/// keeps the cut point exact where another thread flushes another file in between.
pub fn kill_at_fdatasync_of(cmd: &Command, file: &Path, n: u64) -> Output {
    assert!(
        file.is_absolute(),
        "strace -P matches {file:?} only as an absolute path"
    );
    let rule = format!("inject=fdatasync:signal=SIGKILL:when={n}");
    let mut st = strace_with(
        &[
            "-P".as_ref(),
            file.as_os_str(),
            "-e".as_ref(),
            rule.as_ref(),
        ],
        cmd,
    );
    st.stdout(std::process::Stdio::null());
    run(&mut st)
}

/// `cryptsetup ARGS... -q --header HDR --key-file KEY DEV`, with
/// `--force-offline-reencrypt` for `reencrypt` (no dm-crypt here): the detached-header
/// calls the tests share (`repair`, `reencrypt --resume-only`, `reencrypt --decrypt`).
pub fn cryptsetup_detached(args: &[&str], hdr: &str, key: &str, dev: &str) -> Command {
    let mut c = Command::new("cryptsetup");
    c.args(args);
    if args.first() == Some(&"reencrypt") {
        c.arg("--force-offline-reencrypt");
    }
    c.args(["-q", "--header", hdr, "--key-file", key, dev]);
    c
}

/// `cryptsetup luksDump HDR` (panics unless it succeeds): the header as cryptsetup reads it.
pub fn luks_dump(hdr: &Path) -> String {
    let out = run_ok(Command::new("cryptsetup").arg("luksDump").arg(hdr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `luksify VERB IMG --key-file KEY --new-key-file NEW` (`add-key`, `change-key`).
pub fn luksify_new_key(verb: &str, img: &Path, key: &Path, new: &Path) -> Command {
    let mut c = Command::new(luksify_bin());
    c.arg(verb)
        .arg(img)
        .arg("--key-file")
        .arg(key)
        .arg("--new-key-file")
        .arg(new);
    c
}

/// `out` failed with exactly one line of stderr that contains `needle`.
pub fn assert_refused_in_one_line(out: &Output, needle: &str, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.lines().count() == 1 && err.contains(needle),
        "{what}: {}: {err}",
        out.status
    );
}

/// How many times `needle` occurs in the readable memory of process `pid` (stopped,
/// so that it holds still); regions that cannot be read are skipped.
pub fn occurrences_in_memory(pid: u32, needle: &[u8]) -> usize {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut found = 0;
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (range, perms) = (f.next().unwrap(), f.next().unwrap());
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let mut buf = vec![0u8; (b - a) as usize];
        if mem.seek(SeekFrom::Start(a)).is_err() || mem.read_exact(&mut buf).is_err() {
            continue;
        }
        found += buf.windows(needle.len()).filter(|w| *w == needle).count();
    }
    found
}

/// Adds `name` to the mandatory requirements of the LUKS2 header at the start of `img`
/// (both copies rewritten, as cryptsetup would): a requirement no tool knows.
pub fn add_mandatory_requirement(img: &Path, name: &str) {
    use luksify_luks::luks2::json::Requirements;
    use luksify_luks::luks2::Luks2Header;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let (mut h, _) = Luks2Header::read(&f).unwrap();
    let mut mandatory = h.metadata.config.mandatory_requirements();
    mandatory.push(name.into());
    h.metadata.config.requirements = Some(Requirements {
        mandatory: Some(mandatory),
        extra: Default::default(),
    });
    h.write(&f).unwrap();
}

/// Rewrites the JSON of both copies (valid checksums), so the damage reaches
/// the JSON parser and validator instead of the checksum check.
pub fn luks2_with_json(bytes: &[u8], edit: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let hdr_size = u64::from_be_bytes(bytes[8..16].try_into().unwrap()) as usize;
    let end = bytes[4096..hdr_size].iter().position(|&b| b == 0).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&bytes[4096..4096 + end]).unwrap();
    edit(&mut v);
    let text = serde_json::to_vec(&v).unwrap();
    luks2_with_json_text(&mut out, hdr_size, &text);
    out
}

pub fn luks2_with_json_text(out: &mut [u8], hdr_size: usize, text: &[u8]) {
    for base in [0, hdr_size] {
        let area = &mut out[base + 4096..base + hdr_size];
        area.fill(0);
        let n = text.len().min(area.len());
        area[..n].copy_from_slice(&text[..n]);
        let bin: [u8; luksify_luks::luks2::binary::BINARY_HEADER_SIZE] =
            out[base..base + 4096].try_into().unwrap();
        let c = luksify_luks::luks2::binary::checksum(&bin, &out[base + 4096..base + hdr_size]);
        out[base + 448..base + 512].copy_from_slice(&c);
    }
}

/// Every hash cryptsetup 2.6.1's OpenSSL backend takes for `--hash` and
/// `--resilience-hash`, as it names them (md5 for LUKS2 only).
pub const CRYPTSETUP_HASHES: [&str; 15] = [
    "sha1",
    "sha224",
    "sha256",
    "sha384",
    "sha512",
    "sha3-224",
    "sha3-256",
    "sha3-384",
    "sha3-512",
    "blake2b-512",
    "blake2s-256",
    "ripemd160",
    "whirlpool",
    "sm3",
    "md5",
];

/// A cgroup of one controller (`pids`, `memory`): v1's hierarchy of that name, or v2
/// with the controller enabled; removed on drop once its processes are gone.
#[derive(Debug)]
pub struct Cgroup(PathBuf);

impl Cgroup {
    /// A new cgroup of `controller` with each `(v1 file, v2 file, value)` written.
    pub fn new(controller: &str, settings: &[(&str, &str, String)]) -> Cgroup {
        let name = format!(
            "luksify-test-{}-{}",
            std::process::id(),
            CGROUPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let v1 = Path::new("/sys/fs/cgroup").join(controller);
        let (dir, v2) = if v1.join("cgroup.procs").exists() {
            (v1.join(name), false)
        } else {
            let root = Path::new("/sys/fs/cgroup");
            let have = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            assert!(
                have.split_whitespace().any(|c| c == controller),
                "this test needs the cgroup {controller} controller (v1 /sys/fs/cgroup/{controller}, or v2 with it)"
            );
            let _ = std::fs::write(
                root.join("cgroup.subtree_control"),
                format!("+{controller}"),
            );
            (root.join(name), true)
        };
        std::fs::create_dir_all(&dir).unwrap();
        for (f1, f2, value) in settings {
            let f = if v2 { f2 } else { f1 };
            std::fs::write(dir.join(f), value).unwrap();
        }
        Cgroup(dir)
    }
    /// `cmd` started inside the cgroup (its own process joins before it execs).
    pub fn command(&self, cmd: &Command) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
            .arg(&self.0)
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c
    }
    /// Moves process `pid` into the cgroup (a limit on forks is not checked on a move).
    pub fn join(&self, pid: u32) {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

static CGROUPS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// Waits for `child` (its stderr piped) and returns its output, killing it and failing
/// the test when it runs past `limit`: `what` hangs.
pub fn wait_within(
    mut child: std::process::Child,
    limit: std::time::Duration,
    what: &str,
) -> Output {
    let t = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} hangs");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}
