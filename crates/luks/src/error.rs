//! One error type for the whole crate. Messages are one line saying what and
//! why; callers (the CLI) prefix the device path and, where useful, the fix.

use luksify_cipher::CipherError;
use std::io;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong reading, checking, unlocking or writing a LUKS header.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The underlying store failed; `what` names the operation.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// No LUKS magic at the expected place.
    #[error("not a LUKS device: no LUKS header magic found")]
    NotLuks,
    /// A LUKS header with a version this code does not handle.
    #[error("{}", unsupported_version(*.0))]
    UnsupportedVersion(u16),
    /// The header is structurally invalid; the message says which rule was broken.
    #[error("invalid LUKS header: {0}")]
    Corrupt(String),
    /// Neither header copy is usable.
    #[error("no valid LUKS2 header copy: primary: {primary}; secondary: {secondary}")]
    NoValidHeader { primary: String, secondary: String },
    /// The header uses a feature this code does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// No keyslot accepted the passphrase.
    #[error("no keyslot matches this passphrase (wrong passphrase or key file)")]
    WrongPassphrase,
    /// No keyslot that could be read accepts the passphrase, and some could not be
    /// read (damaged): the passphrase may be theirs, so it is not called wrong (it was
    /// exit 2 and "check --key-file" for a key file that was right; a trial). The
    /// message lists them.
    #[error("no keyslot that can be read accepts this passphrase, and {0}: the passphrase may be that keyslot's; unlock with another keyslot's passphrase, or restore a header backup (cryptsetup luksHeaderRestore)")]
    DamagedKeyslots(String),
    /// A keyslot number that is not in use (or out of range).
    #[error("keyslot {0} is not in use")]
    KeyslotNotFound(u32),
    /// No keyslot can give the volume's key at all: each passphrase keyslot is unbound
    /// (holds a key of its own, `cryptsetup luksAddKey --unbound`), so no passphrase
    /// is even tried (cryptsetup: "No usable keyslot is available", exit 1).
    #[error("no usable keyslot is available: no keyslot in use may give the volume's key (none is in use, or each is unbound or its priority is ignore: `luksify dump` lists them; `--key-slot N` tries one)")]
    NoUsableKeyslot,
    /// Adding a key where every keyslot (or the keyslot area) is taken.
    #[error("no free keyslot: {0}")]
    NoFreeKeyslot(String),
    /// KDF parameters beyond what this machine (or sanity) allows.
    #[error("key derivation cost too high: {0}")]
    KdfTooCostly(String),
    /// A caller-supplied parameter is unusable.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The header requires a feature that must be handled before using the volume.
    #[error("volume has unmet mandatory requirement(s): {0}")]
    UnmetRequirement(String),
    /// The header on disk changed since it was read (another command wrote it).
    #[error("the header changed on disk while this command ran ({0}): another cryptsetup or luksify command wrote it meanwhile; nothing was written: run the command again")]
    Changed(String),
    /// A keyslot change on a volume marked for reencryption.
    #[error("the volume is marked for LUKS2 reencryption (a run in progress or interrupted): finish it first (`luksify resume`, or `cryptsetup reencrypt --resume-only`), then change its keyslots; nothing was written")]
    InReencryption,
    /// The sector cipher refused the key or parameters.
    #[error("cipher: {0}")]
    Cipher(#[from] CipherError),
}

fn unsupported_version(v: u16) -> String {
    match v {
        1 => "LUKS version 1 header where this command needs LUKS2 (a LUKS1 volume converts with `cryptsetup convert --type luks2`; nothing was written)".into(),
        v => format!("LUKS magic with version {v}, which no LUKS has: a damaged or foreign header (nothing was written)"),
    }
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }
    pub(crate) fn corrupt(msg: impl Into<String>) -> Error {
        Error::Corrupt(msg.into())
    }
}
