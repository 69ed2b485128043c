//! One face for LUKS1 and LUKS2 volumes, for callers that do not care which
//! (the CLI's key management and dump, the orchestrator's unlock).

use crate::error::{Error, Result};
use crate::io::Disk;
use crate::kdf::KdfRequest;
use crate::luks1::Luks1Header;
use crate::luks2::{DataSegment, Luks2Header, ReadReport};
use crate::secret::VolumeKey;
use crate::Version;

/// A LUKS header of either version.
#[derive(Clone, Debug, PartialEq)]
pub enum Volume {
    Luks1(Luks1Header),
    Luks2(Luks2Header),
}

impl Volume {
    /// Probes and reads the header on `disk` (no repair, no write).
    pub fn read<D: Disk + ?Sized>(disk: &D) -> Result<(Volume, Option<ReadReport>)> {
        match crate::probe(disk)? {
            Some(Version::Luks1) => Ok((Volume::Luks1(Luks1Header::read(disk)?), None)),
            Some(Version::Luks2) => {
                let (h, r) = Luks2Header::read(disk)?;
                Ok((Volume::Luks2(h), Some(r)))
            }
            None => Err(Error::NotLuks),
        }
    }

    /// Like [`Volume::read`], repairing a damaged LUKS2 copy (for commands that write anyway).
    pub fn read_and_repair<D: Disk + ?Sized>(disk: &D) -> Result<Volume> {
        match crate::probe(disk)? {
            Some(Version::Luks1) => Ok(Volume::Luks1(Luks1Header::read(disk)?)),
            Some(Version::Luks2) => Ok(Volume::Luks2(Luks2Header::read_and_repair(disk)?.0)),
            None => Err(Error::NotLuks),
        }
    }

    pub fn version(&self) -> Version {
        match self {
            Volume::Luks1(_) => Version::Luks1,
            Volume::Luks2(_) => Version::Luks2,
        }
    }

    /// Unlocks with a passphrase: `(volume key, keyslot)`.
    pub fn unlock<D: Disk + ?Sized>(
        &self,
        disk: &D,
        passphrase: &[u8],
        slot: Option<u32>,
    ) -> Result<(VolumeKey, u32)> {
        match self {
            Volume::Luks1(h) => h.unlock(disk, passphrase, slot),
            Volume::Luks2(h) => h.unlock(disk, passphrase, slot),
        }
    }

    /// [`Volume::unlock`] without LUKS2's requirements check (the key only: see
    /// [`crate::luks2::Luks2Header::unlock_key_only`]).
    pub fn unlock_key_only<D: Disk + ?Sized>(
        &self,
        disk: &D,
        passphrase: &[u8],
        slot: Option<u32>,
    ) -> Result<(VolumeKey, u32)> {
        match self {
            Volume::Luks1(h) => h.unlock(disk, passphrase, slot),
            Volume::Luks2(h) => h.unlock_key_only(disk, passphrase, slot),
        }
    }

    /// Parameters of the data area.
    pub fn data_segment(&self) -> Result<DataSegment> {
        match self {
            Volume::Luks1(h) => Ok(DataSegment {
                id: 0,
                offset: h.payload_offset_bytes(),
                size: crate::luks2::json::SegmentSize::Dynamic,
                cipher: h.cipher_spec(),
                sector_size: 512,
                iv_tweak: 0,
                key_size: Some(h.key_bytes),
                integrity: None,
            }),
            Volume::Luks2(h) => h.data_segment(),
        }
    }

    /// Ids of keyslots holding a passphrase.
    pub fn keyslot_ids(&self) -> Vec<u32> {
        match self {
            Volume::Luks1(h) => h.keyslot_ids(),
            Volume::Luks2(h) => h.keyslot_ids(),
        }
    }

    /// Adds a keyslot for `vk` under `passphrase`.
    pub fn add_keyslot<D: Disk + ?Sized>(
        &mut self,
        disk: &D,
        vk: &VolumeKey,
        passphrase: &[u8],
        req: &KdfRequest,
        slot: Option<u32>,
    ) -> Result<u32> {
        match self {
            Volume::Luks1(h) => h.add_keyslot(disk, vk, passphrase, req, slot),
            Volume::Luks2(h) => h.add_keyslot(disk, vk, passphrase, req, slot, None),
        }
    }

    /// Removes keyslot `slot`.
    pub fn remove_keyslot<D: Disk + ?Sized>(&mut self, disk: &D, slot: u32) -> Result<()> {
        match self {
            Volume::Luks1(h) => h.remove_keyslot(disk, slot),
            Volume::Luks2(h) => h.remove_keyslot(disk, slot),
        }
    }

    /// Changes the passphrase of `slot`; returns the keyslot now holding the key.
    pub fn change_keyslot<D: Disk + ?Sized>(
        &mut self,
        disk: &D,
        slot: u32,
        old: &[u8],
        new: &[u8],
        req: &KdfRequest,
    ) -> Result<u32> {
        match self {
            Volume::Luks1(h) => h.change_keyslot(disk, slot, old, new, req),
            Volume::Luks2(h) => h.change_keyslot(disk, slot, old, new, req).map(|()| slot),
        }
    }

    /// Volume UUID.
    pub fn uuid(&self) -> &str {
        match self {
            Volume::Luks1(h) => &h.uuid,
            Volume::Luks2(h) => &h.uuid,
        }
    }
}
