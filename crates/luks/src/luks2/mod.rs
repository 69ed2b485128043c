//! LUKS2: binary headers, JSON metadata, validation, keyslots and volume-key operations.
//!
//! Typical use:
//! ```no_run
//! # use luksify_luks::{io::MemDisk, luks2::Luks2Header};
//! # let disk = MemDisk::new(0);
//! let (hdr, _report) = Luks2Header::read(&disk)?;
//! let (vk, slot) = hdr.unlock(&disk, b"passphrase", None)?;
//! let seg = hdr.data_segment()?;
//! let cipher = seg.cipher(&vk)?; // luksify_cipher::SectorCipher
//! # Ok::<(), luksify_luks::Error>(())
//! ```

pub mod binary;
pub mod disk;
pub mod json;
pub mod keyslot;
pub mod validate;

pub use disk::{CopyState, Luks2Header, ReadReport};

use crate::digest;
use crate::error::{Error, Result};
use crate::hash::Hash;
use crate::io::Disk;
use crate::kdf::{self, KdfRequest};
use crate::secret::VolumeKey;
use json::{
    Config, CryptSegment, Digest, Keyslot, Metadata, Pbkdf2Digest, Priority, Segment, SegmentSize,
};
use luksify_cipher::SectorCipher;
use std::collections::BTreeMap;

/// Default metadata size of one copy (16 KiB).
pub const DEFAULT_METADATA_SIZE: u64 = 0x4000;
/// Default data offset: 16 MiB (metadata copies + keyslots area).
pub const DEFAULT_DATA_OFFSET: u64 = 16 * 1024 * 1024;
/// Default alignment of a data offset that follows the header (cryptsetup's
/// `DEFAULT_DISK_ALIGNMENT`): 1 MiB.
pub const DEFAULT_ALIGNMENT: u64 = 1 << 20;
/// Below this keyslots area size cryptsetup warns that few keyslots fit
/// (`LUKS2_HDR_OFFSET_MAX` minus two 16 KiB metadata copies).
pub const SMALL_KEYSLOTS_SIZE: u64 = 4 * 1024 * 1024 - 2 * DEFAULT_METADATA_SIZE;

/// Parameters of the encrypted data segment, enough to build a [`SectorCipher`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataSegment {
    /// Segment id in the JSON.
    pub id: u32,
    /// First data byte on the data device.
    pub offset: u64,
    /// Length, or `Dynamic` (to the end of the device).
    pub size: SegmentSize,
    /// dm-crypt cipher spec, e.g. `aes-xts-plain64`.
    pub cipher: String,
    /// Encryption sector size in bytes.
    pub sector_size: u32,
    /// Added to the IV of each sector (512-byte units).
    pub iv_tweak: u64,
    /// Volume key size in bytes (from the digest's keyslots), if known.
    pub key_size: Option<u32>,
    /// The segment's `integrity` object (dm-integrity under dm-crypt), as JSON text.
    pub integrity: Option<String>,
}

impl DataSegment {
    /// A sector cipher for this segment keyed with `vk`.
    /// A segment with `integrity` is refused: its data sits in a dm-integrity layout
    /// (superblock, journal, tags) and its key holds the integrity key too, so AES-XTS
    /// over its bytes would read garbage (and a decryption would write it).
    pub fn cipher(&self, vk: &VolumeKey) -> Result<SectorCipher> {
        if let Some(i) = &self.integrity {
            return Err(Error::Unsupported(format!(
                "the data segment is authenticated (integrity {i}): luksify handles dm-crypt without dm-integrity only; use cryptsetup for this volume"
            )));
        }
        Ok(SectorCipher::new(
            &self.cipher,
            vk.as_bytes(),
            self.sector_size as usize,
        )?)
    }
    /// Length in bytes on a data device of `device_size` bytes.
    pub fn len_on(&self, device_size: u64) -> u64 {
        match self.size {
            SegmentSize::Bytes(n) => n,
            SegmentSize::Dynamic => device_size.saturating_sub(self.offset),
        }
    }
}

/// Options of [`Luks2Header::format`] (cryptsetup `luksFormat --type luks2`).
#[derive(Clone, Debug)]
pub struct FormatOptions {
    pub cipher: String,
    /// Volume key size in bytes (64 = AES-256-XTS).
    pub key_size: usize,
    pub sector_size: u32,
    /// Hash for the AF splitter and the volume-key digest.
    pub hash: Hash,
    pub kdf: KdfRequest,
    pub label: String,
    pub subsystem: String,
    /// UUID text; random when `None`.
    pub uuid: Option<String>,
    pub metadata_size: u64,
    /// Keyslots area size; default `data_offset - 2*metadata_size`, or 16 MiB
    /// minus the metadata for a detached header.
    pub keyslots_size: Option<u64>,
    /// Data offset on the data device; `None` = 16 MiB, or 0 for a detached header.
    pub data_offset: Option<u64>,
    /// The header lives in its own file; the data device starts at `data_offset` (default 0).
    pub detached: bool,
    /// Without `data_offset` and with the header in front, the data starts at both
    /// metadata copies plus the keyslots area rounded up to `alignment`, plus
    /// `alignment_offset` (cryptsetup: `--align-payload`, else the device's I/O
    /// topology, else 1 MiB; see [`topology_alignment`]).
    pub alignment: u64,
    pub alignment_offset: u64,
    /// Size of a header device that cannot grow (a detached header on a block device):
    /// the default keyslots area shrinks to fit it, as cryptsetup's does.
    pub header_device_size: Option<u64>,
    /// Use this volume key instead of a random one.
    pub volume_key: Option<VolumeKey>,
    /// Fixed data segment size instead of `dynamic`.
    pub segment_size: Option<u64>,
    /// The first keyslot's number (`luksFormat --key-slot N`); 0 by default.
    pub key_slot: Option<u32>,
}

impl FormatOptions {
    /// The keyslots area size, as cryptsetup's `LUKS2_generate_hdr` sizes it (detached
    /// headers too): as given but at most what an explicit data offset leaves after both
    /// metadata copies; else all of that room (at most 128 MiB, a multiple of 4096); else
    /// 16 MiB minus the metadata, or what a smaller header block device holds.
    pub fn keyslots_size_or_default(&self) -> Result<u64> {
        let meta_end = 2 * self.metadata_size;
        // Without one, the data offset follows the header (or is 0 when detached).
        let data_offset = self.data_offset.unwrap_or(0);
        if data_offset != 0 && data_offset < meta_end {
            return Err(Error::InvalidArgument(format!(
                "data offset {data_offset} is smaller than the two {}-byte metadata copies",
                self.metadata_size
            )));
        }
        let room = data_offset.saturating_sub(meta_end) / 4096 * 4096;
        Ok(match self.keyslots_size {
            // Decreased to what the data offset leaves, as cryptsetup does (it warns).
            Some(k) if data_offset != 0 => k.min(room),
            Some(k) => k,
            None if data_offset == 0 => {
                let k = DEFAULT_DATA_OFFSET - meta_end;
                match self.header_device_size {
                    Some(n) if n < DEFAULT_DATA_OFFSET && n >= meta_end => {
                        (n - meta_end) / 4096 * 4096
                    }
                    _ => k,
                }
            }
            None => room.min(validate::MAX_KEYSLOTS_SIZE),
        })
    }

    /// Where the data starts: `data_offset`; else 0 for a detached header; else after
    /// both metadata copies and the keyslots area, rounded up to `alignment`, plus
    /// `alignment_offset` (16 MiB at the defaults).
    pub fn data_offset_or_default(&self) -> Result<u64> {
        Ok(match self.data_offset {
            Some(o) => o,
            None if self.detached => 0,
            None => {
                let end = 2 * self.metadata_size + self.keyslots_size_or_default()?;
                end.next_multiple_of(self.alignment.max(512)) + self.alignment_offset
            }
        })
    }

    /// Bytes of the header (both metadata copies and the keyslots area).
    pub fn header_size(&self) -> Result<u64> {
        Ok(2 * self.metadata_size + self.keyslots_size_or_default()?)
    }
}

/// The keyslots area cryptsetup gives a header when an encryption whose data starts at
/// `data_offset` finishes (`LUKS2_set_keyslots_size`): all the room between both metadata
/// copies and the data, at most 128 MiB, a multiple of 4096. None without a data offset.
pub fn keyslots_size_for_offset(metadata_size: u64, data_offset: u64) -> Option<u64> {
    let room = data_offset.checked_sub(2 * metadata_size)?;
    (data_offset != 0).then(|| room.min(validate::MAX_KEYSLOTS_SIZE) / 4096 * 4096)
}

/// The cipher and key size a new keyslot's area is encrypted with, as cryptsetup's
/// `crypt_keyslot_get_encryption(CRYPT_ANY_SLOT)`: the data segment's cipher with the
/// volume key's size, whatever key the keyslot stores (an unbound 128-bit key is not an
/// AES-XTS key: `change-key` of one failed with "AES-XTS key must be 32 or 64 bytes";
/// a trial); with no keyslot bound to the segment yet (a format, an encryption's
/// first keyslot), the size of the key in hand (`key_len`), as cryptsetup falls back to
/// its volume key's.
fn new_area_encryption(data: &DataSegment, key_len: usize) -> (String, u32) {
    (data.cipher.clone(), data.key_size.unwrap_or(key_len as u32))
}

/// The encryption sector size `cryptsetup luksFormat` picks when none is given
/// (`device_optimal_encryption_sector_size`): the data device's logical block size,
/// or its physical one when that is larger, at most 4096 and a multiple of it; 4096
/// for a logical size of 4096 or more (512 if that is not a multiple of 4096). An
/// image file counts as `logical` = its filesystem's block size (at most a page),
/// `physical` = 4096, so files get 4096.
///
/// cryptsetup then goes back to 512 when the data offset or the data area's size is
/// not a multiple of the choice: that is [`auto_sector_size`].
pub fn optimal_sector_size(logical: u64, physical: u64) -> u32 {
    const MAX: u64 = 4096;
    if logical == 0 {
        return 512;
    }
    if logical >= MAX {
        return if logical.is_multiple_of(MAX) {
            4096
        } else {
            512
        };
    }
    let s = if logical >= physical
        || physical <= 512
        || physical > MAX
        || !physical.is_multiple_of(logical)
    {
        logical
    } else {
        physical
    };
    // Only powers of two from 512 up are sector sizes.
    if s >= 512 && s.is_power_of_two() {
        s as u32
    } else {
        512
    }
}

/// [`optimal_sector_size`], back to 512 where it does not divide the data offset or
/// the data area (`device_size - data_offset`), as `cryptsetup luksFormat` does. (2.6.1
/// compares an explicit `--offset` in 512-byte sectors against the size in bytes, so
/// it also goes back for `--offset 2048`; later releases compare bytes, as here.)
pub fn auto_sector_size(logical: u64, physical: u64, data_offset: u64, device_size: u64) -> u32 {
    let s = optimal_sector_size(logical, physical);
    let fits = |n: u64| n.is_multiple_of(u64::from(s));
    if fits(data_offset) && fits(device_size.saturating_sub(data_offset)) {
        s
    } else {
        512
    }
}

/// The alignment of a data offset that follows the header, from a block device's
/// I/O topology as cryptsetup's `device_topology_alignment` takes it: the minimum I/O
/// size, or the optimal one when it is a multiple of that and of 4096 (a "bogus"
/// optimal size is ignored); the default when that divides it; and the alignment
/// offset (negative: unknown, 0). Returns `(alignment, alignment_offset)` in bytes.
pub fn topology_alignment(min_io: u64, opt_io: u64, align_off: i64, default: u64) -> (u64, u64) {
    let mut a = min_io;
    if a < opt_io && opt_io.is_multiple_of(a.max(1)) && opt_io.is_multiple_of(4096) {
        a = opt_io;
    }
    let alignment = if a != 0 && !default.is_multiple_of(a) {
        a
    } else {
        default
    };
    (alignment, u64::try_from(align_off).unwrap_or(0))
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            cipher: "aes-xts-plain64".into(),
            key_size: 64,
            sector_size: 512,
            hash: Hash::Sha256,
            kdf: KdfRequest::default(),
            label: String::new(),
            subsystem: String::new(),
            uuid: None,
            metadata_size: DEFAULT_METADATA_SIZE,
            keyslots_size: None,
            data_offset: None,
            detached: false,
            alignment: DEFAULT_ALIGNMENT,
            alignment_offset: 0,
            header_device_size: None,
            volume_key: None,
            segment_size: None,
            key_slot: None,
        }
    }
}

impl Luks2Header {
    /// Creates a new LUKS2 header on `meta` (the device itself, or a detached
    /// header file): zeroes the metadata and keyslots area, stores the volume
    /// key in keyslot 0 under `passphrase`, writes both copies. Returns the
    /// header and the volume key. Data is not touched.
    pub fn format<D: Disk + ?Sized>(
        meta: &D,
        passphrase: &[u8],
        opts: &FormatOptions,
    ) -> Result<(Luks2Header, VolumeKey)> {
        if !binary::is_valid_metadata_size(opts.metadata_size) {
            return Err(Error::InvalidArgument(format!(
                "metadata size {} is not a LUKS2 size (16 KiB .. 4 MiB, power of two)",
                opts.metadata_size
            )));
        }
        if opts.key_size != 32 && opts.key_size != 64 {
            return Err(Error::InvalidArgument(format!(
                "key size {} bits: use 256 or 512",
                opts.key_size * 8
            )));
        }
        SectorCipher::parse_spec(&opts.cipher)?;
        luksify_cipher::SectorSize::new(opts.sector_size as usize)?;
        opts.kdf.validate()?;
        let data_offset = opts.data_offset_or_default()?;
        let meta_end = 2 * opts.metadata_size;
        let keyslots_size = opts.keyslots_size_or_default()?;
        if !data_offset.is_multiple_of(u64::from(opts.sector_size)) {
            return Err(Error::InvalidArgument(format!(
                "data offset {data_offset} is not aligned to the {}-byte sector size",
                opts.sector_size
            )));
        }
        let vk = match &opts.volume_key {
            Some(k) => {
                if k.len() != opts.key_size {
                    return Err(Error::InvalidArgument(format!(
                        "volume key is {} bytes, key size is {} bytes",
                        k.len(),
                        opts.key_size
                    )));
                }
                k.clone()
            }
            None => VolumeKey::random(opts.key_size)?,
        };
        // Refuses equal XTS halves and bad specs before anything is written.
        SectorCipher::new(&opts.cipher, vk.as_bytes(), opts.sector_size as usize)?;

        let digest_iterations = if opts.kdf.force_iterations.is_some() {
            kdf::PBKDF2_MIN_ITERATIONS
        } else {
            kdf::pbkdf2_iterations_for(opts.hash, kdf::DIGEST_ITER_TIME_MS, opts.hash.digest_len())
        };
        let digest_salt = crate::random::bytes(32)?;
        let digest_len = opts.hash.digest_len();
        let digest = digest::pbkdf2_compute(
            opts.hash,
            digest_iterations,
            &digest_salt,
            vk.as_bytes(),
            digest_len,
        );
        let mut segments = BTreeMap::new();
        segments.insert(
            0,
            Segment::Crypt(CryptSegment {
                offset: data_offset,
                size: match opts.segment_size {
                    Some(n) => SegmentSize::Bytes(n),
                    None => SegmentSize::Dynamic,
                },
                iv_tweak: 0,
                encryption: opts.cipher.clone(),
                sector_size: opts.sector_size,
                integrity: None,
                flags: None,
                extra: Default::default(),
            }),
        );
        let mut digests = BTreeMap::new();
        digests.insert(
            0,
            Digest::Pbkdf2(Pbkdf2Digest {
                keyslots: vec![],
                segments: vec![0],
                hash: opts.hash.name().into(),
                iterations: digest_iterations,
                salt: digest_salt,
                digest,
                extra: Default::default(),
            }),
        );
        let metadata = Metadata {
            keyslots: BTreeMap::new(),
            tokens: BTreeMap::new(),
            segments,
            digests,
            config: Config {
                json_size: opts.metadata_size - binary::BINARY_HEADER_SIZE as u64,
                keyslots_size,
                flags: None,
                requirements: None,
                extra: Default::default(),
            },
            extra: Default::default(),
        };
        let uuid = match &opts.uuid {
            Some(u) => crate::canonical_uuid(u)?,
            None => crate::new_uuid(),
        };
        let mut salts = [[0u8; 64]; 2];
        crate::random::fill(&mut salts[0])?;
        crate::random::fill(&mut salts[1])?;
        let mut hdr = Luks2Header {
            hdr_size: opts.metadata_size,
            seqid: 0,
            // cryptsetup cuts both to the field's 47 bytes, silently.
            label: binary::FieldText::cut(&opts.label),
            subsystem: binary::FieldText::cut(&opts.subsystem),
            uuid,
            checksum_alg: "sha256".into(),
            salt_primary: salts[0],
            salt_secondary: salts[1],
            metadata,
        };
        // Check everything (label length, layout) before the first write.
        hdr.binary_check()?;
        let kdf = opts.kdf.resolve(opts.key_size)?;
        // Wipe the old metadata and keyslots area so no stale header or key survives.
        let wipe_end = meta_end + keyslots_size;
        let zero = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < wipe_end {
            let n = (wipe_end - off).min(zero.len() as u64) as usize;
            meta.write_at(off, &zero[..n])
                .map_err(|e| Error::io("wiping the LUKS2 metadata area", e))?;
            off += n as u64;
        }
        hdr.add_keyslot_with_kdf(
            meta,
            &vk,
            passphrase,
            kdf,
            opts.hash,
            Some(opts.key_slot.unwrap_or(0)),
            None,
        )?;
        Ok((hdr, vk))
    }

    fn binary_check(&self) -> Result<()> {
        let json = self.json_area()?;
        self.encode_copy(binary::Copy::Primary, &json).map(|_| ())
    }

    /// How many segments are live (not a reencryption backup): one for a volume at
    /// rest, more in the middle of a reencryption.
    pub fn live_segment_count(&self) -> usize {
        self.metadata
            .segments
            .values()
            .filter(|s| !s.is_backup())
            .count()
    }

    /// The data segment to map: the first non-backup `crypt` segment.
    pub fn data_segment(&self) -> Result<DataSegment> {
        let (id, c) = self
            .metadata
            .segments
            .iter()
            .find_map(|(id, s)| match s {
                Segment::Crypt(c) if !s.is_backup() => Some((*id, c)),
                _ => None,
            })
            .ok_or_else(|| Error::Unsupported("no crypt data segment".into()))?;
        let key_size = self.digest_for_segment(id).and_then(|d| {
            d.keyslots()
                .into_iter()
                .find_map(|k| match self.metadata.keyslots.get(&k) {
                    Some(Keyslot::Luks2(ks)) => Some(ks.key_size),
                    _ => None,
                })
        });
        Ok(DataSegment {
            id,
            offset: c.offset,
            size: c.size,
            cipher: c.encryption.clone(),
            sector_size: c.sector_size,
            iv_tweak: c.iv_tweak,
            key_size,
            integrity: c.integrity.as_ref().map(|v| v.to_string()),
        })
    }

    /// The digest covering segment `seg`.
    pub fn digest_for_segment(&self, seg: u32) -> Option<&Digest> {
        self.metadata
            .digests
            .values()
            .find(|d| d.segments().contains(&seg))
    }

    /// Id of the digest a keyslot is assigned to.
    pub fn digest_id_for_keyslot(&self, slot: u32) -> Option<u32> {
        self.metadata
            .digests
            .iter()
            .find(|(_, d)| d.keyslots().contains(&slot))
            .map(|(id, _)| *id)
    }

    /// Does `vk` match digest `digest_id`?
    pub fn verify_key_digest(&self, digest_id: u32, vk: &[u8]) -> Result<bool> {
        match self.metadata.digests.get(&digest_id) {
            Some(Digest::Pbkdf2(d)) => {
                digest::pbkdf2_matches(&d.hash, d.iterations, &d.salt, &d.digest, vk)
            }
            Some(Digest::Unknown(_)) => Err(Error::Unsupported(format!(
                "digest {digest_id} has an unknown type"
            ))),
            None => Err(Error::corrupt(format!("digest {digest_id} does not exist"))),
        }
    }

    /// Ids of the digest(s) `vk` matches (the data segment's normally).
    pub fn digests_matching(&self, vk: &[u8]) -> Result<Vec<u32>> {
        let mut out = vec![];
        for id in self.metadata.digests.keys() {
            if let Ok(true) = self.verify_key_digest(*id, vk) {
                out.push(*id);
            }
        }
        Ok(out)
    }

    /// Unlocks keyslot `slot` with `passphrase` and checks the key against the
    /// keyslot's digest.
    pub fn unlock_keyslot<D: Disk + ?Sized>(
        &self,
        disk: &D,
        slot: u32,
        passphrase: &[u8],
    ) -> Result<VolumeKey> {
        let ks = match self.metadata.keyslots.get(&slot) {
            Some(Keyslot::Luks2(k)) => k,
            Some(Keyslot::Unusable { reason, .. }) => {
                return Err(Error::Unsupported(format!(
                    "keyslot {slot} is damaged ({reason}); use another passphrase, or remove it with cryptsetup luksKillSlot"
                )))
            }
            Some(_) => {
                return Err(Error::Unsupported(format!(
                    "keyslot {slot} is not a passphrase keyslot"
                )))
            }
            None => return Err(Error::KeyslotNotFound(slot)),
        };
        let digest_id = self.digest_id_for_keyslot(slot).ok_or_else(|| {
            Error::Unsupported(format!(
                "keyslot {slot} is unbound (not assigned to the volume key digest), so it cannot unlock the volume"
            ))
        })?;
        let candidate = VolumeKey::new(keyslot::open(disk, ks, passphrase)?);
        if self.verify_key_digest(digest_id, candidate.as_bytes())? {
            Ok(candidate)
        } else {
            Err(Error::WrongPassphrase)
        }
    }

    /// Unlocks the volume: tries `slot` only, or else every passphrase keyslot
    /// whose digest covers a data segment, preferred (priority 2) first and
    /// skipping priority 0. Returns the volume key and the keyslot that opened.
    pub fn unlock<D: Disk + ?Sized>(
        &self,
        disk: &D,
        passphrase: &[u8],
        slot: Option<u32>,
    ) -> Result<(VolumeKey, u32)> {
        self.check_requirements_for_unlock()?;
        self.unlock_key_only(disk, passphrase, slot)
    }

    /// [`Luks2Header::unlock`] without the requirements check: the key only, as
    /// cryptsetup's `open --test-passphrase` and `luksDump --dump-volume-key` give it for
    /// a volume with a requirement they do not know (only activating it is refused).
    pub fn unlock_key_only<D: Disk + ?Sized>(
        &self,
        disk: &D,
        passphrase: &[u8],
        slot: Option<u32>,
    ) -> Result<(VolumeKey, u32)> {
        // Mid key change (a cryptsetup `reencrypt` to a new volume key), the volume's
        // key is the new one, as cryptsetup takes it: a keyslot of the old key only is
        // deleted when the run ends, and `test-passphrase` said it opened the volume.
        let final_digest = self.key_change_final_digest();
        let usable =
            |id: u32| final_digest.is_none_or(|d| self.digest_id_for_keyslot(id) == Some(d));
        if let Some(s) = slot {
            if !usable(s) {
                return Err(Error::KeyslotNotFound(s));
            }
            return self.unlock_keyslot(disk, s, passphrase).map(|k| (k, s));
        }
        // Keyslots bound to a digest that covers some segment: the data segment
        // normally, the backup segments while a reencryption is in progress.
        let mut order: Vec<(Priority, u32)> = self
            .metadata
            .keyslots
            .iter()
            .filter_map(|(id, k)| match k {
                Keyslot::Luks2(ks) => {
                    let p = ks.priority.unwrap_or(Priority::Normal);
                    (p != Priority::Ignore).then_some((p, *id))
                }
                _ => None,
            })
            .filter(|(_, id)| self.keyslot_covers_a_segment(*id) && usable(*id))
            .collect();
        order.sort_by_key(|(p, id)| (std::cmp::Reverse(*p), *id));
        let damaged = self
            .metadata
            .keyslots
            .values()
            .any(|k| matches!(k, Keyslot::Unusable { .. }));
        if order.is_empty() && !damaged {
            // No passphrase is tried at all (every keyslot unbound or set to be
            // ignored): not a wrong passphrase, as cryptsetup tells the two apart.
            return Err(Error::NoUsableKeyslot);
        }
        let mut last_err = Error::WrongPassphrase;
        for (_, id) in order {
            match self.unlock_keyslot(disk, id, passphrase) {
                Ok(k) => return Ok((k, id)),
                Err(Error::WrongPassphrase) => {}
                // A damaged or unsupported keyslot must not hide a good one.
                Err(Error::Unsupported(m)) => {
                    last_err = Error::Unsupported(format!(
                        "no keyslot luksify can read accepts this passphrase, and keyslot {id} could not be tried: {m}"
                    ))
                }
                Err(e) => last_err = e,
            }
        }
        Err(self.untried_or(last_err))
    }

    /// The passphrase keyslots that are damaged (never tried), with why.
    pub fn damaged_keyslots(&self) -> impl Iterator<Item = (u32, &str)> {
        self.metadata.keyslots.iter().filter_map(|(id, k)| match k {
            Keyslot::Unusable { reason, .. } => Some((*id, reason.as_str())),
            _ => None,
        })
    }

    /// `e`, or [`Error::DamagedKeyslots`] naming the damaged keyslots when `e` says no
    /// keyslot took the passphrase and some could not be tried (they may hold it).
    pub fn untried_or(&self, e: Error) -> Error {
        let damaged: Vec<String> = self
            .damaged_keyslots()
            .map(|(id, reason)| format!("keyslot {id} is damaged ({reason}) and was not tried"))
            .collect();
        match e {
            Error::WrongPassphrase if !damaged.is_empty() => {
                Error::DamagedKeyslots(damaged.join("; "))
            }
            e => e,
        }
    }

    /// The digest of the new volume key while a key change is in progress (a reencrypt
    /// keyslot of mode `reencrypt`): the one covering the `backup-final` segment.
    fn key_change_final_digest(&self) -> Option<u32> {
        use json::{Keyslot as K, ReencryptMode};
        let changing = self
            .metadata
            .keyslots
            .values()
            .any(|k| matches!(k, K::Reencrypt(r) if r.mode == ReencryptMode::Reencrypt));
        if !changing {
            return None;
        }
        let (final_id, _) = self
            .metadata
            .segments
            .iter()
            .find(|(_, s)| s.has_flag("backup-final"))?;
        self.metadata
            .digests
            .iter()
            .find(|(_, d)| d.segments().contains(final_id))
            .map(|(id, _)| *id)
    }

    /// Whether keyslot `id` is a passphrase keyslot bound to no segment (`cryptsetup
    /// luksAddKey --unbound`): it opens to a key that is not the volume's.
    pub fn is_unbound(&self, id: u32) -> bool {
        matches!(self.metadata.keyslots.get(&id), Some(Keyslot::Luks2(_)))
            && !self.keyslot_covers_a_segment(id)
    }

    /// Whether keyslot `id` is bound to a digest that covers some segment: the data
    /// segment normally, the backup segments while a reencryption is in progress.
    fn keyslot_covers_a_segment(&self, id: u32) -> bool {
        self.digest_id_for_keyslot(id)
            .and_then(|d| self.metadata.digests.get(&d))
            .is_some_and(|d| !d.segments().is_empty())
    }

    /// Unknown mandatory requirements make the volume unusable for us, as for cryptsetup.
    fn check_requirements_for_unlock(&self) -> Result<()> {
        let unknown: Vec<String> = self
            .metadata
            .config
            .mandatory_requirements()
            .into_iter()
            .filter(|r| !r.starts_with("online-reencrypt"))
            .collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(Error::UnmetRequirement(unknown.join(", ")))
        }
    }

    /// Lowest free keyslot id.
    pub fn free_keyslot_id(&self) -> Option<u32> {
        (0..validate::MAX_KEYSLOTS).find(|i| !self.metadata.keyslots.contains_key(i))
    }

    /// First-fit free area of `size` bytes in the keyslots area, skipping `exclude`.
    pub fn free_area(&self, size: u64, exclude: Option<(u64, u64)>) -> Option<u64> {
        let start = 2 * self.hdr_size;
        let end = start + self.metadata.config.keyslots_size;
        let mut used: Vec<(u64, u64)> = self
            .metadata
            .keyslots
            .values()
            .filter_map(Keyslot::area_range)
            .map(|(o, s)| (o, o + s))
            .chain(exclude.map(|(o, s)| (o, o + s)))
            .collect();
        used.sort();
        let mut cand = start;
        for (o, e) in used {
            if cand + size <= o {
                break;
            }
            cand = cand.max(e.div_ceil(4096) * 4096);
        }
        (cand + size <= end).then_some(cand)
    }

    /// Adds a passphrase keyslot for `vk` (which must match a digest), running
    /// the KDF calibration in `req`. Writes the area, then the header.
    pub fn add_keyslot<D: Disk + ?Sized>(
        &mut self,
        disk: &D,
        vk: &VolumeKey,
        passphrase: &[u8],
        req: &KdfRequest,
        slot: Option<u32>,
        priority: Option<Priority>,
    ) -> Result<u32> {
        req.validate()?;
        self.refuse_in_reencryption()?;
        self.check_new_slot(slot)?;
        let kdf = req.resolve(vk.len())?;
        self.add_keyslot_with_kdf(disk, vk, passphrase, kdf, req.hash, slot, priority)
    }

    /// Keyslot changes wait for a reencryption to end, as cryptsetup's do: its passphrase
    /// keyslots must keep opening both volume keys (a keyslot changed for one digest left
    /// a run that no passphrase resumed).
    fn refuse_in_reencryption(&self) -> Result<()> {
        let marked = self.metadata.keyslots.values().any(|k| match k {
            Keyslot::Reencrypt(_) => true,
            // A reencrypt keyslot this version does not parse still marks a run. A
            // keyslot of a type of its own (a later format) does not: it is kept
            // and its area avoided, as cryptsetup does (it read as a reencryption).
            Keyslot::Unknown(m) => m.get("type").and_then(|t| t.as_str()) == Some("reencrypt"),
            Keyslot::Luks2(_) | Keyslot::Unusable { .. } => false,
        }) || self
            .metadata
            .config
            .mandatory_requirements()
            .iter()
            .any(|m| m.starts_with("online-reencrypt"));
        if marked {
            return Err(Error::InReencryption);
        }
        Ok(())
    }

    fn check_new_slot(&self, slot: Option<u32>) -> Result<u32> {
        match slot {
            Some(s) if s >= validate::MAX_KEYSLOTS => Err(Error::InvalidArgument(format!(
                "keyslot {s} out of range: use 0 to {}",
                validate::MAX_KEYSLOTS - 1
            ))),
            Some(s) if self.metadata.keyslots.contains_key(&s) => Err(Error::InvalidArgument(
                format!("keyslot {s} is already in use"),
            )),
            Some(s) => Ok(s),
            None => self
                .free_keyslot_id()
                .ok_or_else(|| Error::NoFreeKeyslot("all 32 keyslots are in use".into())),
        }
    }

    /// Adds a keyslot with already-resolved KDF parameters. Its anti-forensic split
    /// uses `af_hash`: the `--hash` asked for (sha256 by default), as cryptsetup's
    /// luksAddKey and luksChangeKey do, not the volume's digest hash.
    #[allow(clippy::too_many_arguments)]
    pub fn add_keyslot_with_kdf<D: Disk + ?Sized>(
        &mut self,
        disk: &D,
        vk: &VolumeKey,
        passphrase: &[u8],
        kdf: json::Kdf,
        af_hash: Hash,
        slot: Option<u32>,
        priority: Option<Priority>,
    ) -> Result<u32> {
        let id = self.check_new_slot(slot)?;
        let digest_id = *self
            .digests_matching(vk.as_bytes())?
            .first()
            .ok_or_else(|| Error::InvalidArgument("volume key does not match any digest".into()))?;
        let data = self.data_segment()?;
        let size = keyslot::area_size(vk.len(), crate::af::DEFAULT_STRIPES);
        let area = self.free_area(size, None).ok_or_else(|| {
            Error::NoFreeKeyslot(format!(
                "no free {size}-byte area left in the {}-byte keyslots area",
                self.metadata.config.keyslots_size
            ))
        })?;
        let (encryption, area_key_size) = new_area_encryption(&data, vk.len());
        let params = keyslot::NewKeyslot {
            encryption,
            area_key_size,
            af_hash,
            kdf,
            priority,
        };
        let (bytes, ks) = keyslot::seal(area, vk.as_bytes(), passphrase, &params)?;
        // The area and header only once the header on disk is still the one read.
        let _lock = self.lock_unchanged(disk)?;
        let before = self.metadata.clone();
        self.metadata.keyslots.insert(id, Keyslot::Luks2(ks));
        if let Some(Digest::Pbkdf2(d)) = self.metadata.digests.get_mut(&digest_id) {
            // Appended, as cryptsetup assigns a keyslot to its digest (a trial's add-key
            // to a volume whose key is in slot 7 wrote ["0","7"] where cryptsetup
            // writes ["7","0"]).
            if !d.keyslots.contains(&id) {
                d.keyslots.push(id);
            }
        }
        // What the header write checks, before the area is written: a header it refuses
        // gets nothing (a trial's add-key wrote the new area, then failed the check).
        let r = self
            .json_area()
            .and_then(|_| keyslot::write_area(disk, area, &bytes))
            .and_then(|()| self.write_locked(disk));
        if let Err(e) = r {
            self.metadata = before;
            return Err(e);
        }
        Ok(id)
    }

    /// Removes keyslot `slot`: drops it from the metadata (and from digests
    /// and tokens), writes the header, then zeroes its area.
    pub fn remove_keyslot<D: Disk + ?Sized>(&mut self, disk: &D, slot: u32) -> Result<()> {
        let ks = self
            .metadata
            .keyslots
            .get(&slot)
            .ok_or(Error::KeyslotNotFound(slot))?;
        if !matches!(ks, Keyslot::Luks2(_)) {
            return Err(Error::Unsupported(format!(
                "keyslot {slot} is not a passphrase keyslot; refusing to remove it"
            )));
        }
        self.refuse_in_reencryption()?;
        let area = ks.area_range();
        let _lock = self.lock_unchanged(disk)?;
        let mut m = self.metadata.clone();
        m.keyslots.remove(&slot);
        for d in m.digests.values_mut() {
            if let Digest::Pbkdf2(p) = d {
                p.keyslots.retain(|k| *k != slot);
            }
        }
        for t in m.tokens.values_mut() {
            t.keyslots.retain(|k| *k != slot);
        }
        let before = std::mem::replace(&mut self.metadata, m);
        if let Err(e) = self.write_locked(disk) {
            self.metadata = before;
            return Err(e);
        }
        if let Some((off, size)) = area {
            let zero = vec![0u8; size as usize];
            disk.write_at(off, &zero)
                .map_err(|e| Error::io("wiping the removed keyslot's area", e))?;
            disk.flush()
                .map_err(|e| Error::io("flushing the wiped keyslot area", e))?;
        }
        Ok(())
    }

    /// Replaces the passphrase of keyslot `slot` (which `old` must open): the
    /// key is stored under `new` in a fresh area, the keyslot id stays, and the
    /// old area is zeroed after the header points at the new one. With no free area
    /// left, the key is stored over the old area itself, as `cryptsetup luksChangeKey`
    /// does then (a crash between that write and the header's leaves the slot opened
    /// by neither passphrase; other keyslots are untouched).
    pub fn change_keyslot<D: Disk + ?Sized>(
        &mut self,
        disk: &D,
        slot: u32,
        old: &[u8],
        new: &[u8],
        req: &KdfRequest,
    ) -> Result<()> {
        self.refuse_in_reencryption()?;
        let vk = self.unlock_keyslot(disk, slot, old)?;
        let old_area = match self.metadata.keyslots.get(&slot) {
            Some(Keyslot::Luks2(k)) => (k.area.offset, k.area.size),
            _ => return Err(Error::KeyslotNotFound(slot)),
        };
        // The new keyslot has the default priority, as luksChangeKey's: a "prefer" or
        // "ignore" set on the old one (`cryptsetup config --priority`) is not carried.
        let priority = None;
        let kdf = req.resolve(vk.len())?;
        let size = keyslot::area_size(vk.len(), crate::af::DEFAULT_STRIPES);
        let area = match self.free_area(size, None) {
            Some(a) => a,
            None if old_area.1 >= size => old_area.0,
            None => {
                return Err(Error::NoFreeKeyslot(
                    "no free keyslot area to write the new key into".into(),
                ))
            }
        };
        let in_place = area == old_area.0;
        let data = self.data_segment()?;
        // The hash asked for, as luksChangeKey (not the old keyslot's).
        let af_hash = req.hash;
        let (encryption, area_key_size) = new_area_encryption(&data, vk.len());
        let params = keyslot::NewKeyslot {
            encryption,
            area_key_size,
            af_hash,
            kdf,
            priority,
        };
        let (bytes, ks) = keyslot::seal(area, vk.as_bytes(), new, &params)?;
        let _lock = self.lock_unchanged(disk)?;
        keyslot::write_area(disk, area, &bytes)?;
        let before = self.metadata.clone();
        self.metadata.keyslots.insert(slot, Keyslot::Luks2(ks));
        if let Err(e) = self.write_locked(disk) {
            self.metadata = before;
            return Err(e);
        }
        if in_place {
            return Ok(());
        }
        let zero = vec![0u8; old_area.1 as usize];
        disk.write_at(old_area.0, &zero)
            .map_err(|e| Error::io("wiping the old keyslot area", e))?;
        disk.flush()
            .map_err(|e| Error::io("flushing the wiped keyslot area", e))
    }

    /// Sets a keyslot's priority and writes the header.
    pub fn set_priority<D: Disk + ?Sized>(
        &mut self,
        disk: &D,
        slot: u32,
        priority: Priority,
    ) -> Result<()> {
        let _lock = self.lock_unchanged(disk)?;
        match self.metadata.keyslots.get_mut(&slot) {
            Some(Keyslot::Luks2(k)) => k.priority = Some(priority),
            _ => return Err(Error::KeyslotNotFound(slot)),
        }
        self.write_locked(disk)
    }

    /// Ids of passphrase keyslots.
    pub fn keyslot_ids(&self) -> Vec<u32> {
        self.metadata
            .keyslots
            .iter()
            .filter(|(_, k)| matches!(k, Keyslot::Luks2(_)))
            .map(|(id, _)| *id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cryptsetup's `device_topology_alignment` on the cases its comments name.
    #[test]
    fn topology_alignment_follows_cryptsetup() {
        let d = DEFAULT_ALIGNMENT;
        // Loop devices and most disks: 512 or 4096 minimum, no optimal size.
        assert_eq!(topology_alignment(512, 0, 0, d), (d, 0));
        assert_eq!(topology_alignment(4096, 0, 0, d), (d, 0));
        // A RAID stripe of 3 x 64 KiB: 192 KiB does not divide 1 MiB, so it is used.
        assert_eq!(topology_alignment(65536, 196_608, 0, d), (196_608, 0));
        // An optimal size that divides 1 MiB keeps the default.
        assert_eq!(topology_alignment(4096, 262_144, 0, d), (d, 0));
        // A larger power of two replaces it (1 MiB is not a multiple of 4 MiB).
        assert_eq!(topology_alignment(4096, 4 << 20, 0, d), (4 << 20, 0));
        // Bogus optimal sizes (not a multiple of the minimum, or not of 4 KiB) are ignored.
        assert_eq!(topology_alignment(4096, 6144, 0, d), (d, 0));
        assert_eq!(topology_alignment(512, 33_280, 0, d), (d, 0));
        // The alignment offset is kept; an unknown one (-1) counts as 0.
        assert_eq!(topology_alignment(512, 0, 3584, d), (d, 3584));
        assert_eq!(topology_alignment(512, 0, -1, d), (d, 0));
    }

    /// cryptsetup's `device_optimal_encryption_sector_size`, then its reverts to 512.
    #[test]
    fn sector_size_is_chosen_as_cryptsetup_luksformat() {
        // Image files: filesystem block (4096, or 1024 on a small ext4) and 4096.
        assert_eq!(optimal_sector_size(4096, 4096), 4096);
        assert_eq!(optimal_sector_size(1024, 4096), 4096);
        // Disks and loop devices: 512/512 stays 512, 512e (4096 physical) and 4Kn
        // give 4096, a physical size above 4096 or not a multiple is ignored.
        assert_eq!(optimal_sector_size(512, 512), 512);
        assert_eq!(optimal_sector_size(512, 4096), 4096);
        assert_eq!(optimal_sector_size(4096, 4096), 4096);
        assert_eq!(optimal_sector_size(512, 8192), 512);
        assert_eq!(optimal_sector_size(512, 2048), 2048);
        assert_eq!(optimal_sector_size(8192, 8192), 4096);
        assert_eq!(optimal_sector_size(0, 0), 512);
        // Back to 512 where 4096 does not divide the offset or the data area.
        let m = 1u64 << 20;
        assert_eq!(auto_sector_size(512, 4096, 16 * m, 64 * m), 4096);
        assert_eq!(auto_sector_size(512, 4096, 16 * m + 512, 64 * m), 512);
        assert_eq!(auto_sector_size(512, 4096, 16 * m, 64 * m + 512), 512);
        assert_eq!(auto_sector_size(512, 4096, 0, 64 * m), 4096);
        assert_eq!(auto_sector_size(512, 512, 16 * m, 64 * m), 512);
    }

    /// The data offset follows the header rounded up to the alignment, and a header
    /// block device smaller than 16 MiB shrinks the default keyslots area to fit.
    #[test]
    fn data_offset_and_keyslots_follow_alignment_and_header_device() {
        let o = FormatOptions::default();
        assert_eq!(o.data_offset_or_default().unwrap(), DEFAULT_DATA_OFFSET);
        let o = FormatOptions {
            keyslots_size: Some(1 << 20),
            ..FormatOptions::default()
        };
        assert_eq!(o.data_offset_or_default().unwrap(), 2 << 20);
        let o = FormatOptions {
            keyslots_size: Some(1 << 20),
            alignment: 4096,
            ..FormatOptions::default()
        };
        assert_eq!(o.data_offset_or_default().unwrap(), (1 << 20) + 32768);
        let o = FormatOptions {
            alignment: 196_608,
            alignment_offset: 3584,
            ..FormatOptions::default()
        };
        // 16 MiB rounded up to 192 KiB, plus the offset.
        assert_eq!(o.data_offset_or_default().unwrap(), 16_908_288 + 3584);
        let o = FormatOptions {
            detached: true,
            header_device_size: Some(4 << 20),
            ..FormatOptions::default()
        };
        assert_eq!(o.keyslots_size_or_default().unwrap(), (4 << 20) - 32768);
        assert_eq!(o.data_offset_or_default().unwrap(), 0);
        // A big enough header device, or an explicit size, is left alone.
        let o = FormatOptions {
            detached: true,
            header_device_size: Some(64 << 20),
            ..FormatOptions::default()
        };
        assert_eq!(
            o.keyslots_size_or_default().unwrap(),
            DEFAULT_DATA_OFFSET - 32768
        );
        let o = FormatOptions {
            detached: true,
            header_device_size: Some(4 << 20),
            keyslots_size: Some(8 << 20),
            ..FormatOptions::default()
        };
        assert_eq!(o.keyslots_size_or_default().unwrap(), 8 << 20);
    }
}
