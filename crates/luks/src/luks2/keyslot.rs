//! `luks2` keyslots: derive the area key, decrypt the area, AF-merge; and the reverse.

use super::json::{AntiForensic, Kdf, Luks2Keyslot, Priority, RawArea};
use crate::af;
use crate::error::{Error, Result};
use crate::hash::Hash;
use crate::io::Disk;
use crate::kdf;
use zeroize::Zeroizing;

/// Keyslot area size for a key of `key_len` bytes with `stripes` stripes:
/// the AF material rounded up to 4096 bytes (cryptsetup's layout).
pub fn area_size(key_len: usize, stripes: u32) -> u64 {
    (af::split_len(key_len, stripes) as u64).div_ceil(4096) * 4096
}

/// Material length rounded up to whole 512-byte area sectors.
fn material_len(key_len: usize, stripes: u32) -> usize {
    af::split_len(key_len, stripes).div_ceil(512) * 512
}

/// Recovers the candidate volume key stored in keyslot `ks` (not yet checked
/// against a digest). `disk` holds the metadata (device or detached header).
pub fn open<D: Disk + ?Sized>(
    disk: &D,
    ks: &Luks2Keyslot,
    passphrase: &[u8],
) -> Result<Zeroizing<Vec<u8>>> {
    let af_hash = Hash::parse(&ks.af.hash)?;
    kdf::check_runnable(&ks.kdf)?;
    let key_len = ks.key_size as usize;
    // Always 4000 stripes, whatever the JSON says, as cryptsetup (LUKS_STRIPES) splits
    // and merges LUKS2 keys: a keyslot whose "stripes" read 1 was "no key available"
    // here and unlocked by cryptsetup (a trial).
    let stripes = af::DEFAULT_STRIPES;
    let len = material_len(key_len, stripes);
    if len as u64 > ks.area.size {
        return Err(Error::corrupt(
            "keyslot area too small for its key material",
        ));
    }
    // Check the area cipher before spending time on the KDF.
    crate::luks1::check_material_spec(&ks.area.encryption)?;
    let mut material = Zeroizing::new(vec![0u8; len]);
    disk.read_at(ks.area.offset, &mut material).map_err(|e| {
        Error::io(
            format!("reading keyslot area at offset {}", ks.area.offset),
            e,
        )
    })?;
    let area_key = kdf::derive(&ks.kdf, passphrase, ks.area.key_size as usize)?;
    crate::luks1::crypt_material(&ks.area.encryption, &area_key, &mut material, false)?;
    af::merge(&material, key_len, stripes, af_hash)
}

/// Parameters of a new `luks2` keyslot.
#[derive(Clone, Debug)]
pub struct NewKeyslot {
    /// Area cipher spec (cryptsetup uses the data segment's, default `aes-xts-plain64`).
    pub encryption: String,
    /// Area key size in bytes.
    pub area_key_size: u32,
    /// AF hash.
    pub af_hash: Hash,
    pub kdf: Kdf,
    pub priority: Option<Priority>,
}

/// Writes and flushes a sealed keyslot area (from [`seal`]) at `area_offset`.
pub fn write_area<D: Disk + ?Sized>(disk: &D, area_offset: u64, area: &[u8]) -> Result<()> {
    disk.write_at(area_offset, area)
        .map_err(|e| Error::io(format!("writing keyslot area at offset {area_offset}"), e))?;
    disk.flush()
        .map_err(|e| Error::io("flushing keyslot area", e))
}

/// The keyslot area's bytes (the volume key split, encrypted under the key `passphrase`
/// derives; the slow part) and its JSON keyslot for an area at `area_offset`, written
/// nowhere yet.
pub fn seal(
    area_offset: u64,
    volume_key: &[u8],
    passphrase: &[u8],
    p: &NewKeyslot,
) -> Result<(Zeroizing<Vec<u8>>, Luks2Keyslot)> {
    let stripes = af::DEFAULT_STRIPES;
    let size = area_size(volume_key.len(), stripes);
    let split = af::split(volume_key, stripes, p.af_hash)?;
    let mut material = Zeroizing::new(vec![0u8; material_len(volume_key.len(), stripes)]);
    material[..split.len()].copy_from_slice(&split);
    let area_key = kdf::derive(&p.kdf, passphrase, p.area_key_size as usize)?;
    crate::luks1::crypt_material(&p.encryption, &area_key, &mut material, true)?;
    // Zero the rest of the area so no stale material of an old keyslot remains.
    let mut area = Zeroizing::new(vec![0u8; size as usize]);
    area[..material.len()].copy_from_slice(&material);
    let ks = Luks2Keyslot {
        key_size: volume_key.len() as u32,
        af: AntiForensic {
            kind: "luks1".into(),
            stripes,
            hash: p.af_hash.name().into(),
            extra: Default::default(),
        },
        area: RawArea {
            kind: "raw".into(),
            offset: area_offset,
            size,
            encryption: p.encryption.clone(),
            key_size: p.area_key_size,
            extra: Default::default(),
        },
        kdf: p.kdf.clone(),
        priority: p.priority,
        extra: Default::default(),
    };
    Ok((area, ks))
}
