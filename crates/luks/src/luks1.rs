//! LUKS1: the 592-byte big-endian header, its 8 keyslots and PBKDF2 master-key digest.
//!
//! Reads volumes made by `cryptsetup --type luks1` and `qemu-img create -f luks`
//! and writes ones both accept. Layout when formatting follows cryptsetup:
//! keyslot areas from 4 KiB, each rounded to 4 KiB, payload at 4096 sectors (2 MiB).

use crate::af;
use crate::error::{Error, Result};
use crate::hash::Hash;
use crate::io::Disk;
use crate::kdf;
use crate::secret::VolumeKey;
use luksify_cipher::SectorCipher;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Bytes of the LUKS1 header proper.
pub const HEADER_SIZE: usize = 592;
/// Number of keyslots.
pub const KEYSLOTS: usize = 8;
/// `active` value of a keyslot in use.
pub const KEY_ENABLED: u32 = 0x00AC_71F3;
/// `active` value of an empty keyslot.
pub const KEY_DISABLED: u32 = 0x0000_DEAD;
/// Length of the master-key digest.
pub const DIGEST_SIZE: usize = 20;
/// Length of salts.
pub const SALT_SIZE: usize = 32;
/// Stripes of every LUKS1 keyslot.
pub const STRIPES: u32 = 4000;
/// cryptsetup's default payload offset in 512-byte sectors (2 MiB).
pub const DEFAULT_PAYLOAD_SECTORS: u32 = 4096;

/// Sectors of one keyslot's key material area (4 KiB-aligned) for `key_bytes`.
fn area_sectors(key_bytes: u32) -> u64 {
    (material_sectors(key_bytes, STRIPES) * SECTOR).div_ceil(AREA_ALIGN) * AREA_ALIGN / SECTOR
}

/// Where the eight key material areas end, in sectors: the payload cannot start before.
/// cryptsetup puts the payload there rounded up to the alignment (1 MiB by default:
/// [`DEFAULT_PAYLOAD_SECTORS`] for 256- and 512-bit keys alike).
pub fn areas_end_sectors(key_bytes: u32) -> u64 {
    AREA_ALIGN / SECTOR + KEYSLOTS as u64 * area_sectors(key_bytes)
}
const SECTOR: u64 = 512;
/// Keyslot areas start here and are aligned to it (bytes).
const AREA_ALIGN: u64 = 4096;

/// One LUKS1 keyslot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Luks1Keyslot {
    pub active: bool,
    /// A state word that is neither enabled nor disabled (one damaged byte): the slot is
    /// never tried nor reused, and written back as it was, as cryptsetup treats it (it
    /// opens the volume with the other slots; luksify refused the whole header).
    pub damaged: Option<u32>,
    pub iterations: u32,
    pub salt: [u8; SALT_SIZE],
    /// Key material offset in 512-byte sectors.
    pub key_material_offset: u32,
    pub stripes: u32,
}

/// A decoded LUKS1 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Luks1Header {
    pub cipher_name: String,
    pub cipher_mode: String,
    pub hash_spec: String,
    /// Payload (data) offset in 512-byte sectors.
    pub payload_offset: u32,
    /// Volume key size in bytes.
    pub key_bytes: u32,
    pub mk_digest: [u8; DIGEST_SIZE],
    pub mk_digest_salt: [u8; SALT_SIZE],
    pub mk_digest_iterations: u32,
    pub uuid: String,
    pub keyslots: [Luks1Keyslot; KEYSLOTS],
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn cstr(b: &[u8], field: &str) -> Result<String> {
    let end = b
        .iter()
        .position(|&c| c == 0)
        .ok_or_else(|| Error::corrupt(format!("LUKS1 {field} is not NUL-terminated")))?;
    String::from_utf8(b[..end].to_vec())
        .map_err(|_| Error::corrupt(format!("LUKS1 {field} is not UTF-8")))
}

fn put(dst: &mut [u8], s: &str, field: &str) -> Result<()> {
    if s.len() >= dst.len() || s.as_bytes().contains(&0) {
        return Err(Error::InvalidArgument(format!(
            "LUKS1 {field} '{s}' too long"
        )));
    }
    dst[..s.len()].copy_from_slice(s.as_bytes());
    Ok(())
}

/// Bytes of AF material for `key_bytes`, in whole sectors.
fn material_sectors(key_bytes: u32, stripes: u32) -> u64 {
    (u64::from(key_bytes) * u64::from(stripes)).div_ceil(SECTOR)
}

/// Parameters of [`Luks1Header::format`].
#[derive(Clone, Debug)]
pub struct FormatOptions {
    /// `aes`
    pub cipher_name: String,
    /// `xts-plain64`
    pub cipher_mode: String,
    pub hash: Hash,
    /// Volume key size in bytes (64 = AES-256-XTS).
    pub key_size: usize,
    /// Keyslot iteration time target / forced iterations.
    pub kdf: kdf::KdfRequest,
    /// Payload offset in sectors; default 4096 (2 MiB).
    pub payload_offset: Option<u32>,
    pub uuid: Option<String>,
    pub volume_key: Option<VolumeKey>,
    /// The keyslot the passphrase goes into (0-7), as `luksFormat --key-slot`; 0 when
    /// `None`.
    pub key_slot: Option<u32>,
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            cipher_name: "aes".into(),
            cipher_mode: "xts-plain64".into(),
            hash: Hash::Sha256,
            key_size: 64,
            kdf: kdf::KdfRequest {
                kind: kdf::KdfKind::Pbkdf2,
                ..kdf::KdfRequest::default()
            },
            payload_offset: None,
            uuid: None,
            volume_key: None,
            key_slot: None,
        }
    }
}

impl Luks1Header {
    /// Decodes and validates a header from the first 592 bytes.
    pub fn parse(b: &[u8]) -> Result<Luks1Header> {
        if b.len() < HEADER_SIZE {
            return Err(Error::corrupt("LUKS1 header truncated"));
        }
        if b[..6] != crate::luks2::binary::MAGIC_PRIMARY {
            return Err(Error::NotLuks);
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(Error::UnsupportedVersion(version));
        }
        let mut keyslots: [Luks1Keyslot; KEYSLOTS] = std::array::from_fn(|_| Luks1Keyslot {
            active: false,
            damaged: None,
            iterations: 0,
            salt: [0; SALT_SIZE],
            key_material_offset: 0,
            stripes: 0,
        });
        for (i, ks) in keyslots.iter_mut().enumerate() {
            let o = 208 + i * 48;
            let (active, damaged) = match be32(b, o) {
                KEY_ENABLED => (true, None),
                KEY_DISABLED => (false, None),
                other => (false, Some(other)),
            };
            *ks = Luks1Keyslot {
                active,
                damaged,
                iterations: be32(b, o + 4),
                salt: b[o + 8..o + 40].try_into().expect("32 bytes"),
                key_material_offset: be32(b, o + 40),
                stripes: be32(b, o + 44),
            };
        }
        let h = Luks1Header {
            cipher_name: cstr(&b[8..40], "cipher name")?,
            cipher_mode: cstr(&b[40..72], "cipher mode")?,
            hash_spec: cstr(&b[72..104], "hash spec")?,
            payload_offset: be32(b, 104),
            key_bytes: be32(b, 108),
            mk_digest: b[112..132].try_into().expect("20 bytes"),
            mk_digest_salt: b[132..164].try_into().expect("32 bytes"),
            mk_digest_iterations: be32(b, 164),
            uuid: cstr(&b[168..208], "uuid")?,
            keyslots,
        };
        h.validate()?;
        Ok(h)
    }

    /// cryptsetup's LUKS1 checks: key size, digest iterations, keyslot areas
    /// (stripes 4000, after the header, before the payload, not overlapping).
    pub fn validate(&self) -> Result<()> {
        if self.key_bytes == 0 || self.key_bytes > 512 {
            return Err(Error::corrupt(format!(
                "LUKS1 key size {} bytes",
                self.key_bytes
            )));
        }
        if self.mk_digest_iterations == 0 {
            return Err(Error::corrupt("LUKS1 master-key digest with 0 iterations"));
        }
        let mut areas: Vec<(u64, u64, usize)> = Vec::new();
        for (i, ks) in self.keyslots.iter().enumerate() {
            if ks.stripes != STRIPES {
                return Err(Error::corrupt(format!(
                    "LUKS1 keyslot {i} has {} stripes (must be {STRIPES})",
                    ks.stripes
                )));
            }
            let start = u64::from(ks.key_material_offset) * SECTOR;
            let end = start + material_sectors(self.key_bytes, ks.stripes) * SECTOR;
            if start < HEADER_SIZE as u64 {
                return Err(Error::corrupt(format!(
                    "LUKS1 keyslot {i} overlaps the header"
                )));
            }
            if self.payload_offset != 0 && end > u64::from(self.payload_offset) * SECTOR {
                return Err(Error::corrupt(format!(
                    "LUKS1 keyslot {i} overlaps the payload"
                )));
            }
            if ks.active && ks.iterations == 0 {
                return Err(Error::corrupt(format!(
                    "LUKS1 keyslot {i} has 0 iterations"
                )));
            }
            areas.push((start, end, i));
        }
        areas.sort();
        for w in areas.windows(2) {
            if w[0].1 > w[1].0 {
                return Err(Error::corrupt(format!(
                    "LUKS1 keyslots {} and {} overlap",
                    w[0].2, w[1].2
                )));
            }
        }
        Ok(())
    }

    /// Reads and validates the header of `disk`. Writes nothing.
    pub fn read<D: Disk + ?Sized>(disk: &D) -> Result<Luks1Header> {
        let mut b = [0u8; HEADER_SIZE];
        // cryptsetup's metadata lock, shared (see `Disk::lock_metadata`).
        let _lock = disk
            .lock_metadata(false)
            .map_err(|e| Error::io("taking the header's metadata lock", e))?;
        disk.read_at(0, &mut b).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::corrupt("device too small for a LUKS1 header")
            } else {
                Error::io("reading the LUKS1 header", e)
            }
        })?;
        let h = Luks1Header::parse(&b)?;
        // As cryptsetup's "device too small": the keyslot areas must all be there (a
        // truncated image was accepted, and `add-key` grew it back with zeros).
        let need = h
            .keyslots
            .iter()
            .map(|k| {
                (u64::from(k.key_material_offset) + material_sectors(h.key_bytes, k.stripes))
                    .saturating_mul(SECTOR)
            })
            .max()
            .unwrap_or(0);
        let size = disk
            .size()
            .map_err(|e| Error::io("reading the device size", e))?;
        if size < need {
            return Err(Error::corrupt(format!(
                "the device holds {size} bytes, but its LUKS1 keyslot areas reach byte {need}: it was truncated (cryptsetup says: device too small)"
            )));
        }
        Ok(h)
    }

    /// Encodes the 592-byte header.
    pub fn encode(&self) -> Result<[u8; HEADER_SIZE]> {
        let mut b = [0u8; HEADER_SIZE];
        b[..6].copy_from_slice(&crate::luks2::binary::MAGIC_PRIMARY);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        put(&mut b[8..40], &self.cipher_name, "cipher name")?;
        put(&mut b[40..72], &self.cipher_mode, "cipher mode")?;
        put(&mut b[72..104], &self.hash_spec, "hash spec")?;
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_digest_salt);
        b[164..168].copy_from_slice(&self.mk_digest_iterations.to_be_bytes());
        put(&mut b[168..208], &self.uuid, "uuid")?;
        for (i, ks) in self.keyslots.iter().enumerate() {
            let o = 208 + i * 48;
            let state = match (ks.damaged, ks.active) {
                (Some(raw), _) => raw,
                (None, true) => KEY_ENABLED,
                (None, false) => KEY_DISABLED,
            };
            b[o..o + 4].copy_from_slice(&state.to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&ks.iterations.to_be_bytes());
            b[o + 8..o + 40].copy_from_slice(&ks.salt);
            b[o + 40..o + 44].copy_from_slice(&ks.key_material_offset.to_be_bytes());
            b[o + 44..o + 48].copy_from_slice(&ks.stripes.to_be_bytes());
        }
        Ok(b)
    }

    /// Validates, writes and flushes the header.
    pub fn write<D: Disk + ?Sized>(&self, disk: &D) -> Result<()> {
        let _lock = disk
            .lock_metadata(true)
            .map_err(|e| Error::io("taking the header's metadata lock", e))?;
        self.write_locked(disk)
    }

    /// Takes the metadata lock exclusively and checks that the header on `disk` is still
    /// this one: a keyslot change must not write back a header another command changed
    /// since it was read (cryptsetup, adding a key meanwhile, takes the same first free
    /// slot). Hold the guard until the last write; nothing is written when this fails.
    fn lock_unchanged<D: Disk + ?Sized>(
        &self,
        disk: &D,
    ) -> Result<Option<crate::io::MetadataLock>> {
        let lock = disk
            .lock_metadata(true)
            .map_err(|e| Error::io("taking the header's metadata lock", e))?;
        let mut b = [0u8; HEADER_SIZE];
        disk.read_at(0, &mut b)
            .map_err(|e| Error::io("reading the LUKS1 header", e))?;
        if Luks1Header::parse(&b).ok().as_ref() != Some(self) {
            return Err(Error::Changed(
                "its keyslots differ from when it was read".into(),
            ));
        }
        Ok(lock)
    }

    fn write_locked<D: Disk + ?Sized>(&self, disk: &D) -> Result<()> {
        self.validate()?;
        let b = self.encode()?;
        disk.write_at(0, &b)
            .map_err(|e| Error::io("writing the LUKS1 header", e))?;
        disk.flush()
            .map_err(|e| Error::io("flushing the LUKS1 header", e))
    }

    /// dm-crypt cipher spec, e.g. `aes-xts-plain64`.
    pub fn cipher_spec(&self) -> String {
        format!("{}-{}", self.cipher_name, self.cipher_mode)
    }

    /// Payload offset in bytes.
    pub fn payload_offset_bytes(&self) -> u64 {
        u64::from(self.payload_offset) * SECTOR
    }

    /// A 512-byte-sector cipher for the payload, keyed with `vk`.
    pub fn sector_cipher(&self, vk: &VolumeKey) -> Result<SectorCipher> {
        Ok(SectorCipher::new(&self.cipher_spec(), vk.as_bytes(), 512)?)
    }

    /// Does `vk` match the master-key digest (constant-time compare)?
    pub fn verify_volume_key(&self, vk: &[u8]) -> Result<bool> {
        if vk.len() != self.key_bytes as usize {
            return Ok(false);
        }
        let hash = Hash::parse(&self.hash_spec)?;
        let mut d = [0u8; DIGEST_SIZE];
        hash.pbkdf2(vk, &self.mk_digest_salt, self.mk_digest_iterations, &mut d);
        Ok(bool::from(d.ct_eq(&self.mk_digest)))
    }

    /// Ids of active keyslots.
    pub fn keyslot_ids(&self) -> Vec<u32> {
        (0..KEYSLOTS as u32)
            .filter(|&i| self.keyslots[i as usize].active)
            .collect()
    }

    /// Opens keyslot `slot` with `passphrase`.
    pub fn unlock_keyslot<D: Disk + ?Sized>(
        &self,
        disk: &D,
        slot: u32,
        passphrase: &[u8],
    ) -> Result<VolumeKey> {
        let ks = self
            .keyslots
            .get(slot as usize)
            .filter(|k| k.active)
            .ok_or(Error::KeyslotNotFound(slot))?;
        let hash = Hash::parse(&self.hash_spec)?;
        check_material_spec(&self.cipher_spec())?;
        let key_len = self.key_bytes as usize;
        let mut material = Zeroizing::new(vec![
            0u8;
            (material_sectors(self.key_bytes, ks.stripes) * SECTOR)
                as usize
        ]);
        let off = u64::from(ks.key_material_offset) * SECTOR;
        disk.read_at(off, &mut material)
            .map_err(|e| Error::io(format!("reading LUKS1 keyslot {slot} material"), e))?;
        let mut area_key = Zeroizing::new(vec![0u8; key_len]);
        hash.pbkdf2(passphrase, &ks.salt, ks.iterations, &mut area_key);
        crypt_material(&self.cipher_spec(), &area_key, &mut material, false)?;
        let candidate = af::merge(&material, key_len, ks.stripes, hash)?;
        if self.verify_volume_key(&candidate)? {
            Ok(VolumeKey::new(candidate))
        } else {
            Err(Error::WrongPassphrase)
        }
    }

    /// Tries `slot`, or every active keyslot in order.
    pub fn unlock<D: Disk + ?Sized>(
        &self,
        disk: &D,
        passphrase: &[u8],
        slot: Option<u32>,
    ) -> Result<(VolumeKey, u32)> {
        if let Some(s) = slot {
            return self.unlock_keyslot(disk, s, passphrase).map(|k| (k, s));
        }
        let damaged: Vec<String> = self
            .keyslots
            .iter()
            .enumerate()
            .filter_map(|(i, k)| {
                k.damaged.map(|w| {
                    format!("keyslot {i} is damaged (its state word {w:#010x} is neither enabled nor disabled) and was not tried")
                })
            })
            .collect();
        // No active keyslot: no passphrase can open it, so it is not a wrong one
        // (cryptsetup: "No usable keyslot is available", exit 1), as for LUKS2.
        if self.keyslot_ids().is_empty() && damaged.is_empty() {
            return Err(Error::NoUsableKeyslot);
        }
        let mut last = Error::WrongPassphrase;
        for s in self.keyslot_ids() {
            match self.unlock_keyslot(disk, s, passphrase) {
                Ok(k) => return Ok((k, s)),
                Err(Error::WrongPassphrase) => {}
                Err(e) => last = e,
            }
        }
        match last {
            // Keyslots that were not tried may hold this passphrase.
            Error::WrongPassphrase if !damaged.is_empty() => {
                Err(Error::DamagedKeyslots(damaged.join("; ")))
            }
            e => Err(e),
        }
    }

    /// Stores `vk` in keyslot `slot` (or the first free one) under `passphrase`
    /// with PBKDF2 parameters from `req`; writes material then header.
    pub fn add_keyslot<D: Disk + ?Sized>(
        &mut self,
        disk: &D,
        vk: &VolumeKey,
        passphrase: &[u8],
        req: &kdf::KdfRequest,
        slot: Option<u32>,
    ) -> Result<u32> {
        if req.kind != kdf::KdfKind::Pbkdf2 {
            return Err(Error::InvalidArgument(
                "LUKS1 keyslots only support pbkdf2".into(),
            ));
        }
        req.validate()?;
        if !self.verify_volume_key(vk.as_bytes())? {
            return Err(Error::InvalidArgument(
                "volume key does not match this LUKS1 header".into(),
            ));
        }
        let id = match slot {
            Some(s) if s as usize >= KEYSLOTS => {
                return Err(Error::InvalidArgument(format!(
                    "LUKS1 keyslot {s} out of range: use 0 to 7"
                )))
            }
            Some(s) if self.keyslots[s as usize].damaged.is_some() => {
                return Err(Error::InvalidArgument(format!(
                    "keyslot {s} is damaged (its state word is neither enabled nor disabled): choose another slot"
                )))
            }
            Some(s) if self.keyslots[s as usize].active => {
                return Err(Error::InvalidArgument(format!(
                    "keyslot {s} is already in use"
                )))
            }
            Some(s) => s,
            None => (0..KEYSLOTS as u32)
                .find(|&i| {
                    let k = &self.keyslots[i as usize];
                    !k.active && k.damaged.is_none()
                })
                .ok_or_else(|| Error::NoFreeKeyslot("all 8 LUKS1 keyslots are in use".into()))?,
        };
        self.store_slot(disk, vk, passphrase, req, id)?;
        Ok(id)
    }

    /// Seals `vk` under `passphrase` into keyslot `id`'s own area and enables the slot
    /// (material first, then the header), once the header on disk is still this one.
    fn store_slot<D: Disk + ?Sized>(
        &mut self,
        disk: &D,
        vk: &VolumeKey,
        passphrase: &[u8],
        req: &kdf::KdfRequest,
        id: u32,
    ) -> Result<()> {
        let hash = Hash::parse(&self.hash_spec)?;
        let iterations = match req.force_iterations {
            Some(i) => i,
            None => kdf::pbkdf2_iterations_for(hash, req.iter_time_ms, vk.len()),
        };
        let mut salt = [0u8; SALT_SIZE];
        crate::random::fill(&mut salt)?;
        let ks = &self.keyslots[id as usize];
        let split = af::split(vk.as_bytes(), ks.stripes, hash)?;
        let mut material = Zeroizing::new(vec![
            0u8;
            (material_sectors(self.key_bytes, ks.stripes) * SECTOR)
                as usize
        ]);
        material[..split.len()].copy_from_slice(&split);
        let mut area_key = Zeroizing::new(vec![0u8; vk.len()]);
        hash.pbkdf2(passphrase, &salt, iterations, &mut area_key);
        crypt_material(&self.cipher_spec(), &area_key, &mut material, true)?;
        let off = u64::from(ks.key_material_offset) * SECTOR;
        let _lock = self.lock_unchanged(disk)?;
        disk.write_at(off, &material)
            .map_err(|e| Error::io(format!("writing LUKS1 keyslot {id} material"), e))?;
        disk.flush()
            .map_err(|e| Error::io("flushing LUKS1 keyslot material", e))?;
        let mut next = self.clone();
        next.keyslots[id as usize].active = true;
        next.keyslots[id as usize].iterations = iterations;
        next.keyslots[id as usize].salt = salt;
        next.write_locked(disk)?;
        *self = next;
        Ok(())
    }

    /// Disables keyslot `slot` (header first) and zeroes its key material.
    pub fn remove_keyslot<D: Disk + ?Sized>(&mut self, disk: &D, slot: u32) -> Result<()> {
        let ks = self
            .keyslots
            .get(slot as usize)
            .filter(|k| k.active)
            .ok_or(Error::KeyslotNotFound(slot))?
            .clone();
        let _lock = self.lock_unchanged(disk)?;
        let mut next = self.clone();
        next.keyslots[slot as usize].active = false;
        next.keyslots[slot as usize].iterations = 0;
        next.keyslots[slot as usize].salt = [0; SALT_SIZE];
        next.write_locked(disk)?;
        *self = next;
        let len = material_sectors(self.key_bytes, ks.stripes) * SECTOR;
        disk.write_at(
            u64::from(ks.key_material_offset) * SECTOR,
            &vec![0u8; len as usize],
        )
        .map_err(|e| Error::io(format!("wiping LUKS1 keyslot {slot} material"), e))?;
        disk.flush()
            .map_err(|e| Error::io("flushing wiped keyslot", e))
    }

    /// Replaces the passphrase of `slot`. LUKS1 areas are fixed per slot, so the
    /// key first goes to a free slot, then the old slot is removed and the new
    /// key moved back into it — never a moment without a working keyslot.
    pub fn change_keyslot<D: Disk + ?Sized>(
        &mut self,
        disk: &D,
        slot: u32,
        old: &[u8],
        new: &[u8],
        req: &kdf::KdfRequest,
    ) -> Result<u32> {
        let vk = self.unlock_keyslot(disk, slot, old)?;
        if self
            .keyslots
            .iter()
            .all(|k| k.active || k.damaged.is_some())
        {
            // No free slot: the new key over the old one's own area, as cryptsetup's
            // luksChangeKey does then (a crash between the material and the header
            // leaves that slot opened by neither passphrase; the others are untouched).
            if req.kind != kdf::KdfKind::Pbkdf2 {
                return Err(Error::InvalidArgument(
                    "LUKS1 keyslots only support pbkdf2".into(),
                ));
            }
            req.validate()?;
            self.store_slot(disk, &vk, new, req, slot)?;
            return Ok(slot);
        }
        // cryptsetup does the same: new key in a free slot, old slot killed.
        let new_slot = self.add_keyslot(disk, &vk, new, req, None)?;
        self.remove_keyslot(disk, slot)?;
        Ok(new_slot)
    }

    /// Formats `disk` as LUKS1 (header + keyslot 0); the payload is untouched.
    pub fn format<D: Disk + ?Sized>(
        disk: &D,
        passphrase: &[u8],
        opts: &FormatOptions,
    ) -> Result<(Luks1Header, VolumeKey)> {
        if opts.key_size != 32 && opts.key_size != 64 {
            return Err(Error::InvalidArgument(format!(
                "key size {} bits: use 256 or 512",
                opts.key_size * 8
            )));
        }
        // LUKS1's master-key digest is 20 bytes of HMAC: cryptsetup refuses a hash whose
        // output is shorter ("Requested LUKS hash md5 is not supported").
        if opts.hash.digest_len() < DIGEST_SIZE {
            return Err(Error::InvalidArgument(format!(
                "hash {} is shorter than LUKS1's {DIGEST_SIZE}-byte key digest (cryptsetup refuses it too): use --hash sha256, or LUKS2",
                opts.hash.name()
            )));
        }
        let spec = format!("{}-{}", opts.cipher_name, opts.cipher_mode);
        SectorCipher::parse_spec(&spec)?;
        opts.kdf.validate()?;
        let vk = match &opts.volume_key {
            Some(k) if k.len() == opts.key_size => k.clone(),
            Some(k) => {
                return Err(Error::InvalidArgument(format!(
                    "volume key is {} bytes, key size is {}",
                    k.len(),
                    opts.key_size
                )))
            }
            None => VolumeKey::random(opts.key_size)?,
        };
        SectorCipher::new(&spec, vk.as_bytes(), 512)?;
        let uuid = opts
            .uuid
            .as_deref()
            .map(crate::canonical_uuid)
            .transpose()?;
        let key_bytes = opts.key_size as u32;
        let area_sectors = area_sectors(key_bytes);
        let first = AREA_ALIGN / SECTOR;
        let keyslots: [Luks1Keyslot; KEYSLOTS] = std::array::from_fn(|i| Luks1Keyslot {
            active: false,
            damaged: None,
            iterations: 0,
            salt: [0; SALT_SIZE],
            key_material_offset: (first + i as u64 * area_sectors) as u32,
            stripes: STRIPES,
        });
        let areas_end = areas_end_sectors(key_bytes);
        let payload = opts.payload_offset.unwrap_or(DEFAULT_PAYLOAD_SECTORS);
        if u64::from(payload) < areas_end {
            return Err(Error::InvalidArgument(format!(
                "payload offset {payload} sectors is inside the keyslot areas (which end at {areas_end})"
            )));
        }
        let digest_iterations = if opts.kdf.force_iterations.is_some() {
            kdf::PBKDF2_MIN_ITERATIONS
        } else {
            kdf::pbkdf2_iterations_for(opts.hash, kdf::DIGEST_ITER_TIME_MS, DIGEST_SIZE)
        };
        let mut mk_digest_salt = [0u8; SALT_SIZE];
        crate::random::fill(&mut mk_digest_salt)?;
        let mut mk_digest = [0u8; DIGEST_SIZE];
        opts.hash.pbkdf2(
            vk.as_bytes(),
            &mk_digest_salt,
            digest_iterations,
            &mut mk_digest,
        );
        let mut hdr = Luks1Header {
            cipher_name: opts.cipher_name.clone(),
            cipher_mode: opts.cipher_mode.clone(),
            hash_spec: opts.hash.name().into(),
            payload_offset: payload,
            key_bytes,
            mk_digest,
            mk_digest_salt,
            mk_digest_iterations: digest_iterations,
            uuid: uuid.unwrap_or_else(|| uuid::Uuid::new_v4().hyphenated().to_string()),
            keyslots,
        };
        hdr.validate()?;
        hdr.encode()?;
        // Wipe the header and keyslot areas (not the payload).
        let wipe = vec![0u8; (areas_end * SECTOR) as usize];
        disk.write_at(0, &wipe)
            .map_err(|e| Error::io("wiping the LUKS1 header area", e))?;
        // And the secondary copy of an old LUKS2 header beyond it (metadata of 4 MiB
        // puts it at 4 MiB, inside the payload), as cryptsetup's format wipes the
        // signatures it finds: left there, it was read as this volume's, and `open`
        // mapped the old volume over the new one's data (a trial).
        for off in crate::luks2::binary::METADATA_SIZES {
            let mut magic = [0u8; 6];
            if off >= areas_end * SECTOR
                && disk.read_at(off, &mut magic).is_ok()
                && magic == crate::luks2::binary::MAGIC_SECONDARY
            {
                disk.write_at(off, &[0u8; 6])
                    .map_err(|e| Error::io("wiping an old LUKS2 secondary header", e))?;
            }
        }
        hdr.write(disk)?;
        hdr.add_keyslot(
            disk,
            &vk,
            passphrase,
            &opts.kdf,
            Some(opts.key_slot.unwrap_or(0)),
        )?;
        Ok((hdr, vk))
    }
}

/// Keyslot material (512-byte sectors from 0) through the volume's cipher: AES-XTS, or
/// AES-CBC as LUKS1 volumes made by cryptsetup 1.x (`aes-cbc-essiv:sha256`) use.
pub(crate) fn crypt_material(spec: &str, key: &[u8], buf: &mut [u8], encrypt: bool) -> Result<()> {
    use luksify_cipher::cbc::CbcSectors;
    if CbcSectors::handles(spec) {
        let c = CbcSectors::new(spec, key)?;
        if encrypt {
            c.encrypt(buf, 0)?
        } else {
            c.decrypt(buf, 0)?
        }
    } else {
        let c = SectorCipher::new(spec, key, 512)?;
        if encrypt {
            c.encrypt(buf, 0)?
        } else {
            c.decrypt(buf, 0)?
        }
    }
    Ok(())
}

/// Whether keyslot material in `spec` can be read with a key of `key_len` bytes (see
/// [`crypt_material`]): the cipher is built with a counting pattern, no secret (XTS
/// refuses a key whose halves are equal).
pub(crate) fn material_cipher_usable(spec: &str, key_len: usize) -> Result<()> {
    let key: Vec<u8> = (0..key_len).map(|i| i as u8).collect();
    if luksify_cipher::cbc::CbcSectors::handles(spec) {
        luksify_cipher::cbc::CbcSectors::new(spec, &key)?;
    } else {
        SectorCipher::new(spec, &key, 512)?;
    }
    Ok(())
}

/// Whether keyslot material in `spec` can be read and written (see [`crypt_material`]).
/// Also LUKS2 keyslot areas: cryptsetup encrypts them with the data segment's cipher,
/// `aes-cbc-essiv:sha256` included.
pub(crate) fn check_material_spec(spec: &str) -> Result<()> {
    if !luksify_cipher::cbc::CbcSectors::handles(spec) && SectorCipher::parse_spec(spec).is_err() {
        // Said of the keyslot, with the keyslot ciphers luksify reads (the data
        // cipher's list, XTS only, was given; a trial).
        return Err(Error::Unsupported(format!(
            "its cipher {spec} is not one luksify reads keyslots in (aes-xts-plain64, aes-xts-plain64be, aes-xts-plain, aes-xts-essiv:sha256, aes-cbc-plain, aes-cbc-plain64, aes-cbc-essiv:sha256): use another keyslot's passphrase, or cryptsetup"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemDisk;

    fn fast() -> FormatOptions {
        FormatOptions {
            kdf: kdf::KdfRequest::fast_pbkdf2(),
            ..FormatOptions::default()
        }
    }

    #[test]
    fn format_unlock_add_change_remove() {
        let d = MemDisk::new(3 << 20);
        let (mut h, vk) = Luks1Header::format(&d, b"one", &fast()).unwrap();
        assert_eq!(h.keyslots[0].key_material_offset, 8);
        assert_eq!(h.keyslots[1].key_material_offset, 8 + 504);
        let r = Luks1Header::read(&d).unwrap();
        assert_eq!(r, h);
        assert_eq!(r.unlock(&d, b"one", None).unwrap(), (vk.clone(), 0));
        assert!(matches!(
            r.unlock(&d, b"two", None),
            Err(Error::WrongPassphrase)
        ));
        let s = h
            .add_keyslot(&d, &vk, b"two", &kdf::KdfRequest::fast_pbkdf2(), None)
            .unwrap();
        assert_eq!(s, 1);
        let s2 = h
            .change_keyslot(&d, 0, b"one", b"uno", &kdf::KdfRequest::fast_pbkdf2())
            .unwrap();
        let r = Luks1Header::read(&d).unwrap();
        assert_eq!(r.keyslot_ids(), vec![1, s2]);
        assert_eq!(r.unlock(&d, b"uno", None).unwrap().0, vk);
        h.remove_keyslot(&d, 1).unwrap();
        assert!(Luks1Header::read(&d)
            .unwrap()
            .unlock(&d, b"two", None)
            .is_err());
    }
}
