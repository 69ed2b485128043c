//! Orchestration for data volumes: preflight checks, holders, unmount, map,
//! remount and the status file. Knows nothing of AES.

/// `eprintln!` that ignores a failed write: a reader that went away (an agent that closed
/// its pipe, `| head`, a terminal hung up) must not stop a run half way. The std macro
/// panics on a write error: a trial's `luksify enable ... 2>&1 | head -2` stopped the
/// walk at 50% with exit 101.
macro_rules! errln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

pub mod check;
pub mod dm;
pub mod enable;
pub mod error;
pub mod holders;
pub mod lock;
pub mod map;
pub mod mountinfo;
pub mod probe;
pub mod status;
pub mod tabs;
pub mod userspace;

/// Process exit codes of the `luksify` binary (documented in docs/orchestrator.md and `--help`).
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Failure; the message says what, why and how to fix.
    pub const FAILED: u8 = 1;
    /// Bad command line: 1, as cryptsetup's "wrong parameters", so that 2 means a wrong
    /// passphrase only (a script that asks again on 2 looped on a mistyped option; a
    /// trial).
    pub const USAGE: u8 = 1;
    /// No keyslot accepts the passphrase: 2 from every command, as cryptsetup's `open`,
    /// `reencrypt` and the key commands exit.
    pub const WRONG_PASSPHRASE: u8 = 2;
    /// Preflight found blockers; nothing was written.
    pub const BLOCKED: u8 = 3;
    /// Another luksify holds the global lock.
    pub const BUSY: u8 = 4;
    /// Work was interrupted (signal); the header records where: `luksify resume` finishes it.
    pub const INTERRUPTED: u8 = 5;
    /// The requested mechanism does not exist on this machine (e.g. no device-mapper).
    pub const UNSUPPORTED: u8 = 6;
}

/// A command for a tool whose output luksify reads (`resize2fs -P`, `blkid`, `mount`,
/// `losetup`), run in the C locale: a translated message (e2fsprogs-l10n's German
/// "Geschätzte minimale Größe") was read as a refusal and stopped `enable` (a trial).
pub(crate) fn tool(program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
    let mut cmd = std::process::Command::new(program);
    cmd.env("LC_ALL", "C");
    cmd
}
