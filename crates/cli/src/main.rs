//! The `luksify` command line. Each group of subcommands lives in its own module
//! (`cmd_*.rs`) and is flattened in here, so that each crate's owner extends only
//! its own file.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// `eprintln!`/`eprint!`/`println!`/`print!` that ignore a failed write: a reader that
/// went away (an agent that closed its pipe, `| head`, a terminal hung up) must not stop
/// a run half way. The std macros panic on a write error: a trial's `luksify enable ...
/// 2>&1 | head -2` stopped the walk at 50% with exit 101.
macro_rules! errln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}
macro_rules! err {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($t)*);
    }};
}
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($t)*);
    }};
}

mod bench_device;
mod cmd_bench;
mod cmd_luks;
mod cmd_orch;
mod cmd_walker;
mod keyfile;

#[derive(Parser, Debug)]
#[command(
    name = "luksify",
    version,
    about = "Encrypt Linux block devices in place to LUKS2"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Measure throughput (cipher, device) against reference tools
    #[command(subcommand)]
    Bench(cmd_bench::BenchCmd),
    #[command(flatten)]
    Luks(cmd_luks::LuksCmd),
    #[command(flatten)]
    Walk(cmd_walker::WalkCmd),
    #[command(flatten)]
    Orch(cmd_orch::OrchCmd),
}

/// A command line that cannot work (a required choice missing, say): exit 1, as clap's
/// own usage errors (see `parse_args`).
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// Whether a progress bar (redrawn with `\r`, no newline yet) holds the terminal's last
/// line: a message printed now would start on it, after the bar and the echoed `^C`.
pub static BAR_OPEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Ends an open progress bar's line, so the next message starts a line of its own.
pub fn end_bar() {
    if BAR_OPEN.swap(false, std::sync::atomic::Ordering::SeqCst) {
        errln!();
    }
}

/// Keeps passphrases and volume keys out of core dumps: no core file (RLIMIT_CORE 0,
/// inherited by the mapping daemon), and not dumpable (PR_SET_DUMPABLE 0, which also
/// keeps other users' ptrace and /proc/PID/mem readers out), as a trial found the
/// passphrase and the volume key in the core of a killed `resume`. Both only shrink
/// what the process allows; a failure leaves things as they were, so it is ignored.
fn no_core_dumps() {
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct it is given; prctl(PR_SET_DUMPABLE) takes
    // plain integers. Neither touches memory of ours beyond that.
    unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &none);
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
}

/// Threads a run needs beside its main thread and rayon's pool, all at once: the walk's
/// workers (one per core, up to 4, as `Tuning` starts them) and two helpers (a device
/// probe given a timeout, the mapping's). A command that maps a volume starts a mapping
/// daemon after its walk, beside its own idle threads: the daemon's main thread, pool
/// and headroom, and a tool it runs (`losetup`). Under a cgroup's pids.max that let a
/// trial's `enable` through this check, the daemon could not start after the walk.
fn thread_headroom(maps: bool) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let run = cores.min(4) + 2;
    if maps {
        run.max(1 + cores + run + 1)
    } else {
        run
    }
}

/// Starts the threads a run needs before it writes anything, so that a limit on them
/// (a cgroup's pids.max, `ulimit -u`) is one line and nothing done: a trial's run
/// under such a limit panicked part way (rayon's pool, the walk's workers), or hung
/// for good with its volume unmounted. rayon's global pool is built here, and the
/// headroom for the rest is tried and given back.
fn threads_available(maps: bool) -> Result<(), String> {
    let failed = |e: &dyn std::fmt::Display| {
        format!(
            "cannot start the threads a run needs ({e}): a limit on threads is too low (the cgroup's pids.max, or `ulimit -u`); raise it and run again (nothing was written)"
        )
    };
    rayon::ThreadPoolBuilder::new()
        .build_global()
        .map_err(|e| failed(&e))?;
    let gate = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let mut started = Vec::new();
    let mut err = None;
    for _ in 0..thread_headroom(maps) {
        let g = gate.clone();
        match std::thread::Builder::new().spawn(move || {
            let (open, cv) = &*g;
            let mut o = open.lock().unwrap_or_else(|e| e.into_inner());
            while !*o {
                o = cv.wait(o).unwrap_or_else(|e| e.into_inner());
            }
        }) {
            Ok(t) => started.push(t),
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    *gate.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
    gate.1.notify_all();
    for t in started {
        let _ = t.join();
    }
    err.map_or(Ok(()), |e| Err(failed(&e)))
}

/// A soft file-size limit (`ulimit -S -f`, RLIMIT_FSIZE) raised to the hard one, as for
/// open files. A hard limit stays: a write past it fails with EFBIG (SIGXFSZ is
/// ignored, see `main`), said with the limit to look at ([`one_line`]) and handled as
/// any write error (a header file that cannot be reserved puts the volume back;
/// mid-walk, the run stops resumably). Past the limit SIGXFSZ had killed a trial's
/// `enable` without a word, its volume unmounted; refusing every finite limit up front
/// refused commands that write no large file (a trial's `open`).
fn soft_file_size_limit_raised() {
    soft_limit_raised(libc::RLIMIT_FSIZE);
}

/// Raises the soft limit on `resource` to its hard limit (a failure leaves it as it was).
fn soft_limit_raised(resource: libc::__rlimit_resource_t) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct it is given; setrlimit reads it.
    unsafe {
        if libc::getrlimit(resource, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(resource, &r);
        }
    }
}

/// At most 4 malloc arenas (glibc's default is 8 per core), each reserving 64 MiB of
/// address space once a thread first allocates in it. The threads a run starts up front
/// (`threads_available`) each took an arena, and under `ulimit -v` (an address-space
/// limit) argon2 then could not get its memory, now and then (a CI run). The walk
/// allocates its buffers once; its threads share the arenas.
fn fewer_malloc_arenas() {
    // SAFETY: mallopt takes two integers and changes only the allocator's tuning; called
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

/// Raises the soft limit on open files to the hard one, as a process that may need
/// many does: a low soft limit (`ulimit -Sn 11`) stopped the mapping daemon after the
/// walk (a trial). A low hard limit stays, and `check` names it.
fn more_open_files() {
    soft_limit_raised(libc::RLIMIT_NOFILE);
}

/// Keeps passphrases, volume keys and the plaintext in flight out of swap, as
/// cryptsetup keeps its key buffers (`crypt_safe_alloc` mlocks them). Keys are copied
/// into many places on their way (key file buffer, argon2's memory, AES key schedules,
/// thread stacks), so every page is locked as it is first touched (mlockall with
/// MCL_FUTURE | MCL_ONFAULT; a kernel before 4.4 locks them at once instead). Only where
/// the lock cannot fail later: with CAP_IPC_LOCK (root) or no RLIMIT_MEMLOCK limit. Under
/// a limit, MCL_FUTURE would turn an allocation past it into a failure mid-run, so
/// nothing is locked there (as cryptsetup, which goes on unlocked when mlock fails).
/// Memory locks are not inherited by the tools luksify runs (fork, exec).
fn lock_memory() {
    if !may_lock_all_memory() {
        return;
    }
    // SAFETY: mlockall takes flags only.
    unsafe {
        if libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) != 0 {
            libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE);
        }
    }
}

/// linux/capability.h
const CAP_IPC_LOCK: u32 = 14;

/// Whether this process may lock any amount of memory: CAP_IPC_LOCK (bit 14) in its
/// effective capabilities, or an unlimited RLIMIT_MEMLOCK.
fn may_lock_all_memory() -> bool {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } == 0
        && lim.rlim_cur == libc::RLIM_INFINITY
    {
        return true;
    }
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// The command line as cryptsetup reads one: an option given twice takes its last value
/// (`--key-size 256 --key-size 512` is 512; it was "cannot be used multiple times", a
/// trial). Options that collect (`--volume A --volume B`) still collect.
fn parse_args() -> Cli {
    parse_from(std::env::args_os()).unwrap_or_else(|e| {
        if !e.use_stderr() {
            // --help, --version
            e.exit()
        }
        if let Some(hint) = cryptsetup_option_hint(&e) {
            errln!("luksify: {hint}");
            std::process::exit(luksify_orchestrator::exit::USAGE.into())
        }
        let _ = e.print();
        // Bad usage exits 1, as cryptsetup's "wrong parameters" (clap's own is 2, the
        // wrong passphrase's code).
        std::process::exit(luksify_orchestrator::exit::USAGE.into())
    })
}

fn parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::FromArgMatches;
    let matches = command().try_get_matches_from(args)?;
    Cli::from_arg_matches(&matches)
}

/// cryptsetup options luksify does not take, and what to do instead.
const CRYPTSETUP_OPTIONS: &[(&str, &str)] = &[
    ("--resume-only", "`luksify resume DEV --key-file F [--header H]` continues an interrupted run, as `cryptsetup reencrypt --resume-only`"),
    ("--init-only", "luksify has no separate init step: `encrypt` walks at once, and SIGINT stops it at a safe point for `luksify resume` to continue"),
    ("--force-offline-reencrypt", "luksify always re-encrypts offline (nothing may map or mount the device meanwhile): leave the option out"),
    ("--disable-locks", "luksify always takes cryptsetup's locks (they keep two runs off one volume): leave the option out"),
    ("--device-size", "luksify walks the whole device; to encrypt less, give it a partition or a loop device of that size (`losetup --sizelimit`)"),
    ("--integrity", "luksify writes no integrity (dm-integrity) volumes: use `cryptsetup luksFormat --integrity`"),
    ("--verbose", "luksify says what it does, and on failure why and how to fix it, without it: leave the option out"),
    ("-v", "luksify says what it does, and on failure why and how to fix it, without it: leave the option out"),
    ("--debug", "luksify has no debug output; its one-line errors say what failed and how to fix it: leave the option out"),
    ("--reduce-device-size", "only `encrypt` takes --reduce-device-size (the header goes in front)"),
    ("-q", "this command asks no question (only `format` and `remove-key` do): leave the option out"),
    ("--batch-mode", "this command asks no question (only `format` and `remove-key` do): leave the option out"),
    ("--encrypt", "`luksify encrypt DEV ...` is a command of its own (cryptsetup's `reencrypt --encrypt`)"),
    ("--decrypt", "`luksify decrypt DEV ...` is a command of its own (cryptsetup's `reencrypt --decrypt`)"),
    ("--key-slot", "`encrypt` puts the passphrase in keyslot 0 (`luksify add-key DEV -S N` adds one in slot N), and `resume` tries every keyslot; `open` and `decrypt` take --key-slot"),
    ("--type", "only `format` and `is-luks` take --type: `encrypt` writes LUKS2 (LUKS1 has no in-place re-encryption), and the other commands read the type from the header"),
];

/// For an unknown option that is cryptsetup's, what luksify does instead, in place of
/// clap's "a similar argument exists" tip, which pointed elsewhere (`--integrity` to
/// `--iter-time`, `--disable-locks` to `--label`; a trial).
fn cryptsetup_option_hint(e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    let name = arg.split('=').next().unwrap_or(arg);
    CRYPTSETUP_OPTIONS
        .iter()
        .find(|(o, _)| *o == name)
        .map(|(o, hint)| format!("unexpected argument '{o}' (cryptsetup's): {hint}"))
}

/// The command line definition as [`parse_from`] reads it: an option given twice takes
/// its last value, and in a subcommand `-h` is not `--help`. In cryptsetup `-h` is
/// `--hash`, and a script's `luksify format ... -h sha512` printed help and exited 0
/// without formatting anything (a trial): `-h` is `--hash` where there is one, and an
/// unknown option (exit 1) elsewhere. `luksify -h` alone still prints help.
fn command() -> clap::Command {
    use clap::CommandFactory;
    fn last_wins(c: clap::Command) -> clap::Command {
        c.args_override_self(true).mut_subcommands(last_wins)
    }
    fn no_short_help(c: clap::Command) -> clap::Command {
        c.disable_help_flag(true)
            .arg(
                clap::Arg::new("help")
                    .long("help")
                    .action(clap::ArgAction::Help)
                    .help("Print help"),
            )
            .mut_subcommands(no_short_help)
    }
    last_wins(Cli::command()).mut_subcommands(no_short_help)
}

fn main() -> ExitCode {
    no_core_dumps();
    more_open_files();
    fewer_malloc_arenas();
    // A write past a file-size limit fails with EFBIG, said as an error, instead of the
    // kernel's SIGXFSZ ending the process without a word (see
    // `soft_file_size_limit_raised`).
    // SAFETY: sets one signal's disposition before any thread starts.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let cli = parse_args();
    if !matches!(cli.cmd, Cmd::Bench(_)) {
        // Benchmarks hold random keys only, and their figures should not include locking.
        lock_memory();
    }
    if matches!(cli.cmd, Cmd::Luks(_) | Cmd::Bench(_)) {
        // Header and benchmark commands print their result last: a reader that closed
        // the pipe (`luksify dump --json img | head`) ends them quietly, as it ends
        // cryptsetup, instead of a "failed printing to stdout" panic. (Not the walker
        // and orchestrator runs: they finish their work whoever stopped listening.)
        // SAFETY: restores the default disposition of one signal before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let (works, maps, daemon) = match &cli.cmd {
        Cmd::Walk(c) => (true, c.maps(), false),
        Cmd::Orch(c) => (c.works(), c.maps(), c.is_daemon()),
        Cmd::Bench(_) | Cmd::Luks(_) => (false, false, false),
    };
    // Every command: `format` and the key commands write header files too.
    soft_file_size_limit_raised();
    if works {
        if let Err(e) = threads_available(maps) {
            if daemon {
                // Its starter reads the answer on stdout ("the mapping daemon exited
                // before it was ready" said nothing of the limit; a trial).
                out!("ERR {e}\n");
            } else {
                errln!("luksify: {e}");
            }
            return ExitCode::from(luksify_orchestrator::exit::FAILED);
        }
    }
    let res = match cli.cmd {
        Cmd::Bench(c) => cmd_bench::run(c),
        Cmd::Luks(c) => cmd_luks::run(c),
        Cmd::Walk(c) => cmd_walker::run(c),
        Cmd::Orch(c) => cmd_orch::run(c),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            end_bar();
            // One line: what went wrong and how to fix it (errors carry both).
            errln!("luksify: {}", keyfile::as_typed(&one_line(&e)));
            // Another process holds the volume (a run's lock, a mapping, qemu): 4, as
            // for the orchestrator's lock (see EXIT_CODES).
            let busy = e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<luksify_walker::Error>(),
                    Some(luksify_walker::Error::Busy(_))
                ) || c.downcast_ref::<std::io::Error>().is_some_and(|io| {
                    // A lock held (WouldBlock), or a device in use (EBUSY on the
                    // exclusive open: mounted, mapped, another run on it).
                    matches!(
                        io.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::ResourceBusy
                    )
                })
            });
            let usage = e.chain().any(|c| c.is::<Usage>());
            let wrong = e.chain().any(|c| {
                c.is::<cmd_luks::WrongPassphrase>()
                    || matches!(
                        c.downcast_ref::<luksify_walker::Error>(),
                        Some(luksify_walker::Error::WrongPassphrase)
                    )
            });
            ExitCode::from(if busy {
                luksify_orchestrator::exit::BUSY
            } else if usage {
                luksify_orchestrator::exit::USAGE
            } else if wrong {
                cmd_luks::EXIT_WRONG_PASSPHRASE
            } else {
                luksify_orchestrator::exit::FAILED
            })
        }
    }
}

/// The error and its causes on one line, as `{:#}` prints them, but without a cause
/// its parent's text already ends with (an I/O error wrapped as "write data: {source}"
/// printed as "write data: No space left on device: No space left on device").
fn one_line(e: &anyhow::Error) -> String {
    let mut s = String::new();
    for c in e.chain() {
        let t = c.to_string();
        if s.is_empty() {
            s = t;
        } else if !s.ends_with(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
    }
    if s.contains("(os error 27)") && !s.contains("ulimit -f") {
        s.push_str(" (is a file-size limit in force? `ulimit -f unlimited`)");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::Cli;

    /// Every command line clap accepts is well formed: no short or long option given
    /// twice in one command (`-d` for `--key-file`, as cryptsetup's, was added to the
    /// walker commands and `open`), no conflict naming an option that does not exist.
    #[test]
    fn the_command_line_definition_is_consistent() {
        super::command().debug_assert();
        let cli = super::parse_from(["luksify", "encrypt", "img", "-d", "k", "--header", "h"]);
        assert!(cli.is_ok(), "{cli:?}");
        let cli = super::parse_from(["luksify", "open", "img", "n", "-d", "k"]);
        assert!(cli.is_ok(), "{cli:?}");
    }

    /// `-h` is cryptsetup's `--hash` where a command has one, an unknown option (bad
    /// usage) in the others, never help: a script's `format ... -h sha512` printed help and
    /// exited 0 with nothing formatted. `--help` and a bare `luksify -h` still help.
    #[test]
    fn dash_h_is_the_hash_as_in_cryptsetup_never_help() {
        use clap::error::ErrorKind;
        let hash_of = |args: &[&str]| match super::parse_from(args.iter().copied()) {
            Ok(super::Cli {
                cmd: super::Cmd::Luks(crate::cmd_luks::LuksCmd::Format(a)),
            }) => a.hash().to_string(),
            Ok(super::Cli {
                cmd: super::Cmd::Walk(crate::cmd_walker::WalkCmd::Encrypt(a)),
            }) => a.hash().to_string(),
            other => panic!("{args:?}: {other:?}"),
        };
        assert_eq!(
            hash_of(&["luksify", "format", "i", "-d", "k", "-h", "sha512"]),
            "sha512"
        );
        assert_eq!(hash_of(&["luksify", "format", "i", "-d", "k"]), "sha256");
        assert_eq!(
            hash_of(&["luksify", "encrypt", "i", "-d", "k", "--header", "h", "-h", "sha1"]),
            "sha1"
        );
        for cmd in [
            &["luksify", "format", "i", "-h"][..],
            &["luksify", "dump", "i", "-h"],
            &["luksify", "decrypt", "i", "-d", "k", "-h", "sha512"],
            &["luksify", "status", "-h"],
            &["luksify", "bench", "cipher", "-h"],
        ] {
            let e = super::parse_from(cmd.iter().copied()).expect_err(&format!("{cmd:?}"));
            assert!(
                matches!(
                    e.kind(),
                    ErrorKind::UnknownArgument | ErrorKind::InvalidValue
                ),
                "{cmd:?}: {:?} {e}",
                e.kind()
            );
            assert!(e.use_stderr(), "{cmd:?}");
        }
        for cmd in [
            &["luksify", "-h"][..],
            &["luksify", "--help"],
            &["luksify", "format", "--help"],
            &["luksify", "bench", "cipher", "--help"],
        ] {
            let e = super::parse_from(cmd.iter().copied()).expect_err(&format!("{cmd:?}"));
            assert_eq!(e.kind(), ErrorKind::DisplayHelp, "{cmd:?}");
        }
    }

    /// cryptsetup's options luksify lacks get what to do instead, not clap's tip toward a
    /// similar name.
    #[test]
    fn cryptsetup_options_get_what_to_do_instead() {
        for (args, want) in [
            (
                &[
                    "luksify",
                    "encrypt",
                    "i",
                    "-d",
                    "k",
                    "--header",
                    "h",
                    "--integrity",
                    "hmac-sha256",
                ][..],
                "'--integrity' (cryptsetup's): luksify writes no integrity",
            ),
            (
                &["luksify", "encrypt", "i", "-d", "k", "--resume-only"],
                "`luksify resume DEV",
            ),
            (
                &["luksify", "dump", "i", "--debug"],
                "'--debug' (cryptsetup's)",
            ),
            (
                &["luksify", "decrypt", "i", "-d", "k", "--disable-locks"],
                "always takes cryptsetup's locks",
            ),
            (
                &["luksify", "encrypt", "i", "-d", "k", "--header", "h", "-q"],
                "asks no question",
            ),
            (
                &["luksify", "decrypt", "i", "-d", "k", "--decrypt"],
                "`luksify decrypt DEV ...`",
            ),
        ] {
            let e = super::parse_from(args.iter().copied()).expect_err(&format!("{args:?}"));
            let hint = super::cryptsetup_option_hint(&e).unwrap_or_else(|| panic!("{args:?}: {e}"));
            assert!(hint.contains(want), "{args:?}: {hint}");
        }
        let e = super::parse_from(["luksify", "dump", "i", "--no-such"]).unwrap_err();
        assert_eq!(super::cryptsetup_option_hint(&e), None);
    }

    /// Every command's `--help` ends with the exit codes (the header commands, `status`
    /// and `install-unit` had none; a trial), benchmarks aside (they change no disk).
    #[test]
    fn every_command_help_gives_the_exit_codes() {
        let mut cmd = super::command();
        for sub in cmd.get_subcommands_mut() {
            let name = sub.get_name().to_string();
            if sub.is_hide_set() || name == "bench" {
                continue;
            }
            let help = sub.render_long_help().to_string();
            assert!(help.contains("Exit codes: 0 "), "{name}: {help}");
        }
    }

    /// An option given twice takes its last value, as in cryptsetup; one that collects
    /// (`--volume`) keeps every value.
    #[test]
    fn a_repeated_option_takes_its_last_value_and_lists_still_collect() {
        let cli = super::parse_from([
            "luksify",
            "enable",
            "--volume",
            "/a",
            "--volume",
            "/b",
            "--key-file",
            "/k1",
            "--key-file",
            "/k2",
        ])
        .unwrap();
        let dbg = format!("{cli:?}");
        assert!(dbg.contains("\"/a\"") && dbg.contains("\"/b\""), "{dbg}");
        assert!(dbg.contains("\"/k2\"") && !dbg.contains("\"/k1\""), "{dbg}");
        let cli = super::parse_from([
            "luksify",
            "format",
            "img",
            "--key-file",
            "k",
            "--key-size",
            "256",
            "--key-size",
            "512",
        ])
        .unwrap();
        assert!(format!("{cli:?}").contains("key_size: 512"), "{cli:?}");
    }

    /// A cause the message already ends with is not printed twice.
    #[test]
    fn an_error_prints_each_cause_once() {
        let io = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let e = anyhow::Error::new(luksify_walker::Error::Io {
            what: "write data".into(),
            source: io,
        })
        .context("img");
        assert_eq!(
            super::one_line(&e),
            "img: write data: No space left on device (os error 28)"
        );
        let e = anyhow::anyhow!("cause").context("what went wrong");
        assert_eq!(super::one_line(&e), "what went wrong: cause");
    }
    use clap::CommandFactory;

    /// Every argument a user can see in `--help` says what it does: a blank line there
    /// leaves them guessing (`--wait` and `--state-dir` of several commands had none).
    #[test]
    fn every_visible_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let builtin = matches!(a.get_id().as_str(), "help" | "version");
                if !a.is_hide_set() && !builtin && a.get_help().is_none() {
                    missing.push(format!("{path} {}", a.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.is_hide_set() || sub.get_name() == "help" {
                    continue;
                }
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (about)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let cmd = Cli::command();
        let mut missing = Vec::new();
        walk(&cmd, "luksify", &mut missing);
        assert!(
            missing.is_empty(),
            "arguments without help text: {missing:?}"
        );
        // The walk reached the commands whose arguments lacked it.
        let names: Vec<_> = cmd.get_subcommands().map(|s| s.get_name()).collect();
        for want in ["enable", "disable", "open", "close", "encrypt", "status"] {
            assert!(names.contains(&want), "no `{want}` in {names:?}");
        }
    }
}
