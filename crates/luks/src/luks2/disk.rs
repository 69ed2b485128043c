//! Reading and writing both LUKS2 metadata copies through a [`Disk`].

use super::binary::{self, BinaryHeader, Copy, FieldText, BINARY_HEADER_SIZE, METADATA_SIZES};
use super::json::Metadata;
use super::validate;
use crate::error::{Error, Result};
use crate::hash::Hash;
use crate::io::Disk;
use subtle::ConstantTimeEq;

/// A decoded, checked LUKS2 header: binary fields shared by both copies plus the JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct Luks2Header {
    /// Size of one metadata copy (binary header + JSON area).
    pub hdr_size: u64,
    /// Sequence id; every write increments it.
    pub seqid: u64,
    pub label: FieldText,
    pub subsystem: FieldText,
    /// Volume UUID (text form).
    pub uuid: String,
    /// Header checksum algorithm (cryptsetup writes `sha256`).
    pub checksum_alg: String,
    /// Salt of the primary copy's binary header.
    pub salt_primary: [u8; 64],
    /// Salt of the secondary copy's binary header.
    pub salt_secondary: [u8; 64],
    pub metadata: Metadata,
}

/// State of one metadata copy as found on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyState {
    /// Checksum and JSON valid; its sequence id.
    Valid { seqid: u64 },
    /// Unusable; why.
    Invalid(String),
}

impl CopyState {
    pub fn is_valid(&self) -> bool {
        matches!(self, CopyState::Valid { .. })
    }
}

/// What [`Luks2Header::read`] found, so the caller can decide to repair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadReport {
    pub primary: CopyState,
    pub secondary: CopyState,
    /// Offset where the valid secondary was found, if any.
    pub secondary_offset: Option<u64>,
    /// The two copies disagree (one invalid, different seqid, or different JSON).
    pub needs_repair: bool,
}

impl ReadReport {
    /// What is wrong with the header's copies and which one was used, for a warning;
    /// None when both are valid and the same.
    pub fn damage(&self) -> Option<String> {
        if !self.needs_repair {
            return None;
        }
        Some(match (&self.primary, &self.secondary) {
            (CopyState::Invalid(w), _) => {
                format!("the primary copy is damaged ({w}); the secondary was used")
            }
            (_, CopyState::Invalid(w)) => {
                format!("the secondary copy is damaged ({w}); the primary was used")
            }
            _ => "its two copies differ; the one with the higher sequence id (the primary on a tie) was used".to_string(),
        })
    }
}

struct ReadCopy {
    bin: BinaryHeader,
    json: Vec<u8>,
    metadata: Metadata,
}

fn read_copy<D: Disk + ?Sized>(disk: &D, offset: u64, want: Copy) -> Result<ReadCopy> {
    let mut raw = Box::new([0u8; BINARY_HEADER_SIZE]);
    disk.read_at(offset, &mut raw[..]).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            // A header cut short, or no header at all (a device smaller than one).
            let mut magic = [0u8; 6];
            let ours = match want {
                Copy::Primary => binary::MAGIC_PRIMARY,
                Copy::Secondary => binary::MAGIC_SECONDARY,
            };
            if disk.read_at(offset, &mut magic).is_ok() && magic == ours {
                return Error::corrupt(format!(
                    "the device ends inside the {want:?} header at offset {offset}: it was truncated, or this is not the whole device"
                ));
            }
            return Error::NotLuks;
        }
        Error::io(format!("reading LUKS2 header at offset {offset}"), e)
    })?;
    let bin = BinaryHeader::parse(&raw)?;
    if bin.copy != want {
        return Err(Error::corrupt(format!(
            "expected the {want:?} header magic at offset {offset}"
        )));
    }
    if bin.hdr_offset != offset {
        return Err(Error::corrupt(format!(
            "header at offset {offset} says it lives at {}",
            bin.hdr_offset
        )));
    }
    let csum_hash = Hash::parse(&bin.checksum_alg).map_err(|_| {
        Error::Unsupported(format!("header checksum algorithm '{}'", bin.checksum_alg))
    })?;
    let json_len = (bin.hdr_size - BINARY_HEADER_SIZE as u64) as usize;
    let mut json = vec![0u8; json_len];
    disk.read_at(offset + BINARY_HEADER_SIZE as u64, &mut json)
        .map_err(|e| {
            // A device that ends inside the copy: say so (it read "failed to fill
            // whole buffer").
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                return Error::corrupt(format!(
                    "the {want:?} header at offset {offset} is {} bytes long, and the device ends inside it: it was truncated, or this is not the whole device",
                    bin.hdr_size
                ));
            }
            Error::io(
                format!("reading LUKS2 JSON area at offset {}", offset + 4096),
                e,
            )
        })?;
    let expect = copy_checksum(csum_hash, &raw, &json);
    // The digest's own length only, as cryptsetup compares it: bytes after it in the
    // 64-byte field are not the checksum's (non-zero ones there were a "mismatch").
    let n = csum_hash.digest_len().min(expect.len());
    if !bool::from(expect[..n].ct_eq(&bin.csum[..n])) {
        return Err(Error::corrupt(format!(
            "checksum mismatch in the {want:?} header at offset {offset}"
        )));
    }
    let mut metadata = parse_json_area(&json)?;
    for k in metadata.keyslots.values_mut() {
        k.demote_if_unusable();
    }
    validate::validate(&metadata, bin.hdr_size)?;
    Ok(ReadCopy {
        bin,
        json,
        metadata,
    })
}

fn copy_checksum(hash: Hash, raw: &[u8; BINARY_HEADER_SIZE], json: &[u8]) -> [u8; 64] {
    if hash == Hash::Sha256 {
        return binary::checksum(raw, json);
    }
    let mut zeroed = *raw;
    zeroed[448..512].fill(0);
    let mut out = [0u8; 64];
    hash.digest_into(&[&zeroed, json], &mut out);
    out
}

/// Parses the JSON text of a JSON area: the bytes before the first NUL, which
/// must come before the end of the area (cryptsetup's rule).
pub fn parse_json_area(area: &[u8]) -> Result<Metadata> {
    let end = area
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| Error::corrupt("JSON area is not NUL-terminated"))?;
    let text = &area[..end];
    // Object nesting in valid LUKS2 metadata is shallow; serde_json's own
    // recursion limit (128) keeps hostile input from exhausting the stack.
    serde_json::from_slice::<Metadata>(text)
        .map_err(|e| Error::corrupt(format!("JSON metadata: {e}")))
}

impl Luks2Header {
    /// Where the header's areas end: both metadata copies, then the keyslots area.
    pub fn areas_end(&self) -> u64 {
        2 * self.hdr_size + self.metadata.config.keyslots_size
    }

    /// Reads both copies, picks the valid one with the higher seqid, and
    /// reports whether the other needs repair. Writes nothing.
    ///
    /// The secondary copy is looked for at the primary's `hdr_size`; when the
    /// primary is unusable, at every allowed metadata size.
    pub fn read<D: Disk + ?Sized>(disk: &D) -> Result<(Luks2Header, ReadReport)> {
        let _lock = metadata_lock(disk, false)?;
        let primary = read_copy(disk, 0, Copy::Primary);
        // A LUKS1 header in front is a LUKS1 volume, as cryptsetup reads the version
        // there first: a LUKS2 secondary copy left behind further on (a LUKS1 format
        // over an old LUKS2 volume) was taken for this volume's, and `open` mapped the
        // old volume over the new one's data (a trial).
        if let Err(Error::UnsupportedVersion(1)) = primary {
            return Err(Error::UnsupportedVersion(1));
        }
        let mut secondary_offset = None;
        let secondary = match &primary {
            Ok(p) => read_copy(disk, p.bin.hdr_size, Copy::Secondary).inspect(|_| {
                secondary_offset = Some(p.bin.hdr_size);
            }),
            Err(_) => {
                // The reason worth telling is the first copy found with a magic that
                // failed (checksum, JSON), not "no magic" at the last size tried.
                let mut found = Err(Error::NotLuks);
                for off in METADATA_SIZES {
                    let r = read_copy(disk, off, Copy::Secondary);
                    if r.is_ok() {
                        secondary_offset = Some(off);
                        found = r;
                        break;
                    }
                    if matches!(found, Err(Error::NotLuks)) && !matches!(r, Err(Error::NotLuks)) {
                        found = r;
                    }
                }
                found
            }
        };
        let state = |r: &Result<ReadCopy>| match r {
            Ok(c) => CopyState::Valid { seqid: c.bin.seqid },
            Err(e) => CopyState::Invalid(e.to_string()),
        };
        let (ps, ss) = (state(&primary), state(&secondary));
        let (winner, other) = match (primary, secondary) {
            (Err(pe), Err(se)) => {
                if matches!(pe, Error::NotLuks) && matches!(se, Error::NotLuks) {
                    return Err(Error::NotLuks);
                }
                if let Error::UnsupportedVersion(v) = pe {
                    return Err(Error::UnsupportedVersion(v));
                }
                return Err(Error::NoValidHeader {
                    primary: pe.to_string(),
                    secondary: se.to_string(),
                });
            }
            (Ok(p), Err(_)) => (p, None),
            (Err(_), Ok(s)) => (s, None),
            (Ok(p), Ok(s)) => {
                if s.bin.seqid > p.bin.seqid {
                    (s, Some(p))
                } else {
                    (p, Some(s))
                }
            }
        };
        let needs_repair = match &other {
            None => true,
            Some(o) => {
                o.bin.seqid != winner.bin.seqid
                    || o.json != winner.json
                    || o.bin.hdr_size != winner.bin.hdr_size
                    || o.bin.label != winner.bin.label
                    || o.bin.uuid != winner.bin.uuid
                    || o.bin.subsystem != winner.bin.subsystem
            }
        };
        let (salt_primary, salt_secondary) = {
            let mine = winner.bin.salt;
            let theirs = other.as_ref().map(|o| o.bin.salt);
            match winner.bin.copy {
                Copy::Primary => (mine, theirs.unwrap_or(fresh_salt()?)),
                Copy::Secondary => (theirs.unwrap_or(fresh_salt()?), mine),
            }
        };
        // Both copies and the keyslots area must fit the device, as cryptsetup requires
        // on load: a truncated image would otherwise be unlocked, and grown by a write.
        let need = winner
            .bin
            .hdr_size
            .saturating_mul(2)
            .saturating_add(winner.metadata.config.keyslots_size);
        if let Ok(size) = disk.size() {
            if size < need {
                return Err(Error::corrupt(format!(
                    "the device holds {size} bytes, but its LUKS2 header and keyslots area take {need}: it was truncated, or this is not the whole device; bring it back to its full size"
                )));
            }
        }
        let hdr = Luks2Header {
            hdr_size: winner.bin.hdr_size,
            seqid: winner.bin.seqid,
            label: winner.bin.label,
            subsystem: winner.bin.subsystem,
            uuid: winner.bin.uuid,
            checksum_alg: winner.bin.checksum_alg,
            salt_primary,
            salt_secondary,
            metadata: winner.metadata,
        };
        Ok((
            hdr,
            ReadReport {
                primary: ps,
                secondary: ss,
                secondary_offset,
                needs_repair,
            },
        ))
    }

    /// [`Luks2Header::read`], then rewrites the damaged or stale copy from the
    /// winner (same seqid, fresh salt for the repaired copy), as cryptsetup does on load.
    pub fn read_and_repair<D: Disk + ?Sized>(disk: &D) -> Result<(Luks2Header, ReadReport)> {
        let (mut hdr, report) = Luks2Header::read(disk)?;
        if report.needs_repair {
            hdr.repair(disk, &report)?;
        }
        Ok((hdr, report))
    }

    /// Rewrites whichever copy `report` says is damaged or stale, keeping the seqid.
    pub fn repair<D: Disk + ?Sized>(&mut self, disk: &D, report: &ReadReport) -> Result<()> {
        let _lock = metadata_lock(disk, true)?;
        let json = self.json_area()?;
        let primary_current =
            matches!(report.primary, CopyState::Valid { seqid } if seqid == self.seqid);
        let secondary_current = matches!(report.secondary, CopyState::Valid { seqid } if seqid == self.seqid)
            && report.secondary_offset == Some(self.hdr_size);
        if !primary_current {
            self.salt_primary = fresh_salt()?;
            self.write_copy(disk, Copy::Primary, &json)?;
        }
        if !secondary_current || (primary_current && report.needs_repair) {
            self.salt_secondary = fresh_salt()?;
            self.write_copy(disk, Copy::Secondary, &json)?;
        }
        Ok(())
    }

    /// Validates the metadata, increments seqid and writes the primary copy
    /// then the secondary, flushing after each.
    pub fn write<D: Disk + ?Sized>(&mut self, disk: &D) -> Result<()> {
        self.write_in_order(disk, [Copy::Primary, Copy::Secondary])
    }

    /// As [`Luks2Header::write`], but the secondary copy is written and not flushed.
    ///
    /// When this returns the primary copy holds the new seqid durably, so a power cut
    /// that tears or drops the secondary leaves the new state readable (a torn copy
    /// fails its checksum, a dropped one has the lower seqid). The caller must flush
    /// `disk` before it writes any header copy again: otherwise a cut could tear the
    /// next primary while this secondary is still volatile, and leave no valid copy.
    /// Used by the walker, whose next flush of the device comes anyway (the next
    /// hotzone's journal or checksums, or its data on the same device), to save one
    /// flush per commit.
    pub fn write_secondary_unflushed<D: Disk + ?Sized>(&mut self, disk: &D) -> Result<()> {
        let _lock = metadata_lock(disk, true)?;
        let json = self.next_seqid()?;
        self.write_copy(disk, Copy::Primary, &json)?;
        self.put_copy(disk, Copy::Secondary, &json)
    }

    /// As [`Luks2Header::write`], secondary copy first: for the very first header
    /// on a store whose primary area is still blank (or holds something else). A
    /// crash while writing the primary then leaves a complete secondary to resume
    /// from, and a crash while writing the secondary leaves the primary area as it
    /// was, so the store is recognisably "never had a complete header".
    pub fn write_secondary_first<D: Disk + ?Sized>(&mut self, disk: &D) -> Result<()> {
        self.write_in_order(disk, [Copy::Secondary, Copy::Primary])
    }

    fn write_in_order<D: Disk + ?Sized>(&mut self, disk: &D, order: [Copy; 2]) -> Result<()> {
        let _lock = metadata_lock(disk, true)?;
        self.write_in_order_locked(disk, order)
    }

    /// [`Luks2Header::write`] under a metadata lock the caller holds (from
    /// [`Luks2Header::lock_unchanged`]).
    pub(crate) fn write_locked<D: Disk + ?Sized>(&mut self, disk: &D) -> Result<()> {
        self.write_in_order_locked(disk, [Copy::Primary, Copy::Secondary])
    }

    /// Takes the metadata lock exclusively and checks that no header on `disk` is newer
    /// than this one: a read-modify-write (a keyslot added, changed or removed) must not
    /// write back a header another command changed since it was read, which would drop
    /// that command's keyslot (and may already have overwritten its area). As
    /// cryptsetup's "Detected attempt for concurrent LUKS2 metadata update". Hold the
    /// guard until the last write; nothing is written when this fails.
    pub(crate) fn lock_unchanged<D: Disk + ?Sized>(
        &self,
        disk: &D,
    ) -> Result<Option<crate::io::MetadataLock>> {
        let lock = metadata_lock(disk, true)?;
        // Only a valid copy counts: a damaged one's sequence id is garbage (a flipped
        // bit there read as a write of another command), and the write this guards
        // rewrites it.
        let newest = [(0, Copy::Primary), (self.hdr_size, Copy::Secondary)]
            .into_iter()
            .filter_map(|(off, copy)| read_copy(disk, off, copy).ok())
            .map(|c| c.bin.seqid)
            .max();
        match newest {
            Some(on_disk) if on_disk > self.seqid => Err(Error::Changed(format!(
                "sequence id {on_disk} on disk, {} when it was read",
                self.seqid
            ))),
            _ => Ok(lock),
        }
    }

    fn write_in_order_locked<D: Disk + ?Sized>(
        &mut self,
        disk: &D,
        order: [Copy; 2],
    ) -> Result<()> {
        let json = self.next_seqid()?;
        for copy in order {
            self.write_copy(disk, copy, &json)?;
        }
        Ok(())
    }

    /// The JSON area bytes (JSON text, zero-padded) after validating the metadata.
    pub fn json_area(&self) -> Result<Vec<u8>> {
        validate::validate(&self.metadata, self.hdr_size)?;
        let text = serde_json::to_vec(&self.metadata)
            .map_err(|e| Error::corrupt(format!("cannot serialise metadata: {e}")))?;
        let area_len = (self.hdr_size - BINARY_HEADER_SIZE as u64) as usize;
        if text.len() >= area_len {
            return Err(Error::InvalidArgument(format!(
                "JSON metadata of {} bytes does not fit the {area_len}-byte JSON area",
                text.len()
            )));
        }
        let mut area = vec![0u8; area_len];
        area[..text.len()].copy_from_slice(&text);
        Ok(area)
    }

    fn binary(&self, copy: Copy) -> BinaryHeader {
        BinaryHeader {
            copy,
            hdr_size: self.hdr_size,
            seqid: self.seqid,
            label: self.label.clone(),
            checksum_alg: self.checksum_alg.clone(),
            salt: match copy {
                Copy::Primary => self.salt_primary,
                Copy::Secondary => self.salt_secondary,
            },
            uuid: self.uuid.clone(),
            subsystem: self.subsystem.clone(),
            hdr_offset: match copy {
                Copy::Primary => 0,
                Copy::Secondary => self.hdr_size,
            },
            csum: [0; 64],
        }
    }

    /// Encoded binary header + JSON area for one copy, checksum filled in.
    pub fn encode_copy(&self, copy: Copy, json_area: &[u8]) -> Result<Vec<u8>> {
        let bin = self.binary(copy);
        let mut raw = bin.encode()?;
        let hash = Hash::parse(&self.checksum_alg)?;
        let csum = copy_checksum(hash, &raw, json_area);
        raw[448..512].copy_from_slice(&csum);
        let mut out = Vec::with_capacity(self.hdr_size as usize);
        out.extend_from_slice(&raw[..]);
        out.extend_from_slice(json_area);
        Ok(out)
    }

    /// Validates the metadata and increments seqid: the JSON area for the next write.
    fn next_seqid(&mut self) -> Result<Vec<u8>> {
        let json = self.json_area()?;
        // Wrapping, as cryptsetup's `seqid++` (a header at 2^64-1 was refused, after
        // add-key had written its keyslot's area).
        self.seqid = self.seqid.wrapping_add(1);
        Ok(json)
    }

    /// Writes one copy and flushes it.
    fn write_copy<D: Disk + ?Sized>(&self, disk: &D, copy: Copy, json: &[u8]) -> Result<()> {
        self.put_copy(disk, copy, json)?;
        disk.flush()
            .map_err(|e| Error::io(format!("flushing the {copy:?} LUKS2 header"), e))
    }

    /// Writes one copy, unflushed.
    fn put_copy<D: Disk + ?Sized>(&self, disk: &D, copy: Copy, json: &[u8]) -> Result<()> {
        let bytes = self.encode_copy(copy, json)?;
        let off = match copy {
            Copy::Primary => 0,
            Copy::Secondary => self.hdr_size,
        };
        disk.write_at(off, &bytes).map_err(|e| {
            Error::io(
                format!("writing the {copy:?} LUKS2 header at offset {off}"),
                e,
            )
        })
    }
}

fn fresh_salt() -> Result<[u8; 64]> {
    let mut s = [0u8; 64];
    crate::random::fill(&mut s)?;
    Ok(s)
}

/// cryptsetup's metadata lock on `disk` (see [`Disk::lock_metadata`]), for one read or
/// one write of both copies.
fn metadata_lock<D: Disk + ?Sized>(
    disk: &D,
    exclusive: bool,
) -> Result<Option<crate::io::MetadataLock>> {
    disk.lock_metadata(exclusive)
        .map_err(|e| Error::io("taking the header's metadata lock", e))
}
