//! LUKS2 and LUKS1 on-disk formats and keyslots, interoperable with cryptsetup.
//!
//! What it is: header parsing and writing (both LUKS2 copies, checksums,
//! validation, repair), the metadata model (keyslots, segments, digests,
//! tokens, config, reencryption keyslots), keyslot cryptography (AF splitter,
//! PBKDF2/Argon2 with calibration, area encryption) and volume-key operations.
//!
//! What it is not: it knows nothing of block devices, mounts or processes; all
//! I/O goes through the [`io::Disk`] trait, implemented for files (and so
//! block devices) and for the in-memory [`io::MemDisk`].
//!
//! Entry points: [`luks2::Luks2Header`] (`read`, `unlock`, `data_segment`,
//! `format`, keyslot management), [`luks1::Luks1Header`], and [`probe`].

pub mod af;
pub mod digest;
mod error;
pub mod hash;
pub mod io;
pub mod kdf;
pub mod luks1;
pub mod luks2;
pub mod random;
pub mod reencrypt;
pub mod secret;
pub mod volume;

pub use error::{Error, Result};
pub use secret::{Passphrase, VolumeKey};

/// LUKS version found at the start of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Luks1,
    Luks2,
}

/// A `--uuid` as cryptsetup takes it: 8-4-4-4-12 hex digits only (not braced, not
/// without dashes, which cryptsetup refuses: "Wrong LUKS UUID format provided"), stored
/// in lower case as cryptsetup stores it (an upper-case one was written as given, so
/// `/dev/disk/by-uuid` and crypttab's `UUID=` did not match).
/// A fresh random LUKS UUID in cryptsetup's form (what `format` gives a volume when
/// none is asked for).
pub fn new_uuid() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string()
}

pub fn canonical_uuid(u: &str) -> Result<String> {
    let dashes = [8, 13, 18, 23];
    let form = u.len() == 36
        && u.char_indices().all(|(i, c)| match dashes.contains(&i) {
            true => c == '-',
            false => c.is_ascii_hexdigit(),
        });
    match form.then(|| uuid::Uuid::parse_str(u).ok()).flatten() {
        Some(v) => Ok(v.hyphenated().to_string()),
        None => Err(Error::InvalidArgument(format!(
            "'{u}' is not a UUID (expected 8-4-4-4-12 hex digits, as cryptsetup)"
        ))),
    }
}

/// Looks at the primary magic and version (and, for LUKS2, the secondary
/// header locations): `Ok(None)` when nothing LUKS-like is there.
pub fn probe<D: io::Disk + ?Sized>(disk: &D) -> Result<Option<Version>> {
    let mut b = [0u8; 8];
    match disk.read_at(0, &mut b) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => {
            return Err(Error::Io {
                what: "reading the LUKS magic".into(),
                source: e,
            })
        }
    }
    if b[..6] == luks2::binary::MAGIC_PRIMARY {
        return match u16::from_be_bytes([b[6], b[7]]) {
            1 => Ok(Some(Version::Luks1)),
            2 => Ok(Some(Version::Luks2)),
            v => Err(Error::UnsupportedVersion(v)),
        };
    }
    // A LUKS2 volume whose primary header was damaged still has a secondary.
    for off in luks2::binary::METADATA_SIZES {
        if disk.read_at(off, &mut b).is_ok()
            && b[..6] == luks2::binary::MAGIC_SECONDARY
            && b[6..8] == [0, 2]
        {
            return Ok(Some(Version::Luks2));
        }
    }
    Ok(None)
}
