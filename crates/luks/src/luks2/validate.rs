//! Structural validation of LUKS2 metadata, at least as strict as
//! cryptsetup's `lib/luks2/luks2_json_metadata.c`: sizes, counts, alignment,
//! references between objects, and keyslot areas inside the keyslots area
//! without overlaps. Runs on every read and before every write.

use super::binary::BINARY_HEADER_SIZE;
use super::json::{Digest, Keyslot, Metadata, Segment, SegmentSize};
use crate::error::{Error, Result};
use std::collections::BTreeSet;

/// Most keyslots a LUKS2 header may hold (ids 0..31).
pub const MAX_KEYSLOTS: u32 = 32;
/// Most tokens (ids 0..31).
pub const MAX_TOKENS: u32 = 32;
/// Most segments.
pub const MAX_SEGMENTS: u32 = 32;
/// Most digests.
pub const MAX_DIGESTS: u32 = 8;
/// Largest keyslots area cryptsetup accepts (128 MiB).
pub const MAX_KEYSLOTS_SIZE: u64 = 128 * 1024 * 1024;
/// The keyslots area size is a multiple of this (cryptsetup allocates areas on it too).
pub const AREA_ALIGN: u64 = 4096;

fn bad(msg: impl Into<String>) -> Error {
    Error::corrupt(msg)
}

/// Checks `m` against the rules for a metadata copy of `hdr_size` bytes.
pub fn validate(m: &Metadata, hdr_size: u64) -> Result<()> {
    validate_config(m, hdr_size)?;
    validate_ids(m)?;
    validate_segments(m)?;
    validate_keyslots(m, hdr_size)?;
    validate_digests(m)?;
    validate_tokens(m)?;
    Ok(())
}

fn validate_config(m: &Metadata, hdr_size: u64) -> Result<()> {
    let json_size = hdr_size - BINARY_HEADER_SIZE as u64;
    if m.config.json_size != json_size {
        return Err(bad(format!(
            "config.json_size {} does not match the {json_size}-byte JSON area of a {hdr_size}-byte header",
            m.config.json_size
        )));
    }
    let ks = m.config.keyslots_size;
    if !ks.is_multiple_of(AREA_ALIGN) {
        return Err(bad(format!(
            "config.keyslots_size {ks} is not a multiple of 4096"
        )));
    }
    if ks > MAX_KEYSLOTS_SIZE {
        return Err(bad(format!(
            "config.keyslots_size {ks} exceeds the 128 MiB maximum"
        )));
    }
    Ok(())
}

fn validate_ids(m: &Metadata) -> Result<()> {
    let check = |what: &str, ids: Vec<u32>, max: u32| -> Result<()> {
        if let Some(id) = ids.iter().find(|&&id| id >= max) {
            return Err(bad(format!(
                "{what} id {id} is out of range 0 to {}",
                max - 1
            )));
        }
        Ok(())
    };
    check(
        "keyslot",
        m.keyslots.keys().copied().collect(),
        MAX_KEYSLOTS,
    )?;
    check("token", m.tokens.keys().copied().collect(), MAX_TOKENS)?;
    check(
        "segment",
        m.segments.keys().copied().collect(),
        MAX_SEGMENTS,
    )?;
    if m.digests.len() > MAX_DIGESTS as usize {
        return Err(bad(format!(
            "{} digests, at most {MAX_DIGESTS} allowed",
            m.digests.len()
        )));
    }
    Ok(())
}

fn validate_segments(m: &Metadata) -> Result<()> {
    if m.segments.is_empty() {
        return Err(bad("no segments"));
    }
    // Keys must be 0..n-1 without gaps.
    for (expect, id) in m.segments.keys().enumerate() {
        if *id as usize != expect {
            return Err(bad(format!("gap in segment keys before {id}")));
        }
    }
    let mut seen_backup = false;
    let mut dynamic_seen = false;
    let mut live: Vec<(u64, Option<u64>)> = Vec::new();
    for (id, seg) in &m.segments {
        let offset = seg
            .offset()
            .ok_or_else(|| bad(format!("segment {id} has no valid offset")))?;
        let size = seg
            .size()
            .ok_or_else(|| bad(format!("segment {id} has no valid size")))?;
        if offset % 512 != 0 {
            return Err(bad(format!(
                "segment {id} offset {offset} is not 512-byte aligned"
            )));
        }
        if let SegmentSize::Bytes(n) = size {
            if n == 0 || n % 512 != 0 {
                return Err(bad(format!(
                    "segment {id} size {n} is zero or not 512-byte aligned"
                )));
            }
            if offset.checked_add(n).is_none() {
                return Err(bad(format!("segment {id} ends beyond 2^64")));
            }
        }
        if let Segment::Crypt(c) = seg {
            let ss = c.sector_size;
            if !(512..=4096).contains(&ss) || !ss.is_power_of_two() {
                return Err(bad(format!(
                    "segment {id} sector_size {ss} is not 512..4096, power of two"
                )));
            }
            if !m.digests.values().any(|d| d.segments().contains(id)) {
                return Err(bad(format!(
                    "crypt segment {id} is not assigned to any digest"
                )));
            }
            if let SegmentSize::Bytes(n) = size {
                if n % u64::from(ss) != 0 {
                    return Err(bad(format!(
                        "segment {id} size {n} is not a multiple of its {ss}-byte sectors"
                    )));
                }
            }
            if c.encryption.is_empty() {
                return Err(bad(format!("segment {id} has an empty encryption")));
            }
        }
        if seg.is_backup() {
            seen_backup = true;
            continue;
        }
        if seen_backup {
            return Err(bad(format!("segment {id} follows a backup segment")));
        }
        if dynamic_seen {
            return Err(bad(format!(
                "segment {id} follows a 'dynamic' sized segment"
            )));
        }
        if size == SegmentSize::Dynamic {
            dynamic_seen = true;
        }
        live.push((
            offset,
            match size {
                SegmentSize::Bytes(n) => Some(n),
                SegmentSize::Dynamic => None,
            },
        ));
    }
    if live.is_empty() {
        return Err(bad("no data segment (only backup segments)"));
    }
    let in_reencryption = m
        .config
        .mandatory_requirements()
        .iter()
        .any(|r| r.starts_with("online-reencrypt"));
    if in_reencryption {
        for flag in [
            super::json::FLAG_BACKUP_PREVIOUS,
            super::json::FLAG_BACKUP_FINAL,
        ] {
            if !m.segments.values().any(|s| s.has_flag(flag)) {
                return Err(bad(format!(
                    "reencryption in progress but no '{flag}' segment"
                )));
            }
        }
    }
    // Live segments map consecutive parts of the device in order; they must not overlap.
    let mut sorted = live.clone();
    sorted.sort();
    for w in sorted.windows(2) {
        let (a_off, a_size) = w[0];
        let (b_off, _) = w[1];
        match a_size {
            Some(n) if a_off + n <= b_off => {}
            _ => return Err(bad("data segments overlap")),
        }
    }
    Ok(())
}

fn validate_keyslots(m: &Metadata, hdr_size: u64) -> Result<()> {
    let area_start = 2 * hdr_size;
    let area_end = area_start + m.config.keyslots_size;
    let mut areas: Vec<(u64, u64, u32)> = Vec::new();
    let mut reencrypt_slots = 0;
    for (id, ks) in &m.keyslots {
        match ks {
            Keyslot::Luks2(k) => {
                if let Some(p) = k.problem() {
                    return Err(bad(format!("keyslot {id}: {p}")));
                }
            }
            Keyslot::Reencrypt(_) => reencrypt_slots += 1,
            Keyslot::Unknown(_) | Keyslot::Unusable { .. } => {}
        }
        let (off, size) = ks
            .area_range()
            .ok_or_else(|| bad(format!("keyslot {id} has no valid area")))?;
        if size == 0 {
            return Err(bad(format!("keyslot {id} has an empty area")));
        }
        let end = off
            .checked_add(size)
            .ok_or_else(|| bad(format!("keyslot {id} area overflows")))?;
        if off < area_start || end > area_end {
            return Err(bad(format!(
                "keyslot {id} area [{off}, {end}) is outside the keyslots area [{area_start}, {area_end})"
            )));
        }
        areas.push((off, end, *id));
    }
    if reencrypt_slots > 1 {
        return Err(bad("more than one reencrypt keyslot"));
    }
    areas.sort();
    for w in areas.windows(2) {
        if w[0].1 > w[1].0 {
            return Err(bad(format!(
                "keyslot {} and keyslot {} areas overlap",
                w[0].2, w[1].2
            )));
        }
    }
    // The keyslots area must end before the first data byte (unless the header is detached).
    // cryptsetup looks at every crypt segment (backups too); offset 0 = detached header.
    let crypt_offsets: Vec<u64> = m
        .segments
        .values()
        .filter(|s| matches!(s, Segment::Crypt(_)))
        .filter_map(Segment::offset)
        .collect();
    let first_data = if crypt_offsets.contains(&0) {
        0
    } else {
        crypt_offsets.into_iter().min().unwrap_or(0)
    };
    if first_data != 0 && first_data < area_end {
        return Err(bad(format!(
            "metadata and keyslots area (up to {area_end}) overlap the data at offset {first_data}"
        )));
    }
    Ok(())
}

fn validate_digests(m: &Metadata) -> Result<()> {
    let mut ks_used = BTreeSet::new();
    for (id, d) in &m.digests {
        for k in d.keyslots() {
            if !m.keyslots.contains_key(&k) {
                return Err(bad(format!("digest {id} names missing keyslot {k}")));
            }
            if !ks_used.insert(k) {
                return Err(bad(format!(
                    "keyslot {k} is assigned to more than one digest"
                )));
            }
        }
        for s in d.segments() {
            // One segment may be under two digests: cryptsetup's key change lists
            // its hotzone segment under the old key's digest and the new one's.
            if !m.segments.contains_key(&s) {
                return Err(bad(format!("digest {id} names missing segment {s}")));
            }
        }
        if let Digest::Pbkdf2(p) = d {
            if p.iterations == 0 || p.digest.is_empty() || p.digest.len() > 64 || p.salt.is_empty()
            {
                return Err(bad(format!("digest {id} has invalid parameters")));
            }
        }
    }
    // cryptsetup refuses such a header ("not a valid LUKS device"): a passphrase
    // keyslot whose key no digest checks.
    for (id, k) in &m.keyslots {
        if matches!(k, Keyslot::Luks2(_) | Keyslot::Unusable { .. }) && !ks_used.contains(id) {
            return Err(bad(format!("keyslot {id} is not assigned to any digest")));
        }
    }
    Ok(())
}

fn validate_tokens(m: &Metadata) -> Result<()> {
    for (id, t) in &m.tokens {
        for k in &t.keyslots {
            if !m.keyslots.contains_key(k) {
                return Err(bad(format!("token {id} names missing keyslot {k}")));
            }
        }
    }
    Ok(())
}

impl crate::luks2::json::Luks2Keyslot {
    /// What makes this keyslot unusable, if anything (the ranges cryptsetup checks
    /// before it tries a keyslot).
    pub fn problem(&self) -> Option<String> {
        let k = self;
        if k.key_size == 0 || k.key_size > 512 {
            return Some(format!("key_size {} out of range", k.key_size));
        }
        if k.af.kind != "luks1" {
            return Some(format!("unknown AF type '{}'", k.af.kind));
        }
        // A KDF or AF hash that cannot run is this keyslot's damage, not the header's:
        // "invalid LUKS header, restore a backup" went to a volume another keyslot opens
        // (trial V3). Costs beyond this machine stay a cost error.
        if crate::hash::Hash::parse(&k.af.hash).is_err() {
            return Some(format!("unknown AF hash '{}'", k.af.hash));
        }
        // (Its shape only: costs are checked when it runs, not at every header read.)
        if let Err(crate::Error::Corrupt(m) | crate::Error::Unsupported(m)) =
            crate::kdf::check_shape(&k.kdf)
        {
            return Some(m);
        }
        // The stripes field is not read: LUKS2 keys always take 4000 (see keyslot::open).
        if k.area.kind != "raw" {
            return Some(format!("unknown area type '{}'", k.area.kind));
        }
        if k.area.key_size == 0 || k.area.key_size > 512 {
            return Some(format!("area key_size {} out of range", k.area.key_size));
        }
        // A key size the area's cipher cannot take (trial V4: a 16-byte AES-XTS key went
        // on to "wrong passphrase" in disable). Built as keyslot material is read, AES-XTS
        // or AES-CBC. A cipher luksify does not implement is no damage (cryptsetup's
        // `benbi` keyslots, say): unlocking says so, and that cryptsetup reads it.
        if crate::luks1::check_material_spec(&k.area.encryption).is_ok() {
            if let Err(e) =
                crate::luks1::material_cipher_usable(&k.area.encryption, k.area.key_size as usize)
            {
                return Some(format!(
                    "its area cipher {} cannot take a {}-byte key ({e})",
                    k.area.encryption, k.area.key_size
                ));
            }
        }
        // cryptsetup reads the area in whole 512-byte sectors: an offset between two
        // was read from the sector before by cryptsetup and from the byte itself by
        // luksify, and the two disagreed on which passphrase opens it (a trial).
        if !k.area.offset.is_multiple_of(512) {
            return Some(format!(
                "area offset {} is not a multiple of 512 bytes",
                k.area.offset
            ));
        }
        let need = u64::from(k.key_size) * u64::from(crate::af::DEFAULT_STRIPES);
        if k.area.size < need {
            return Some(format!(
                "area of {} bytes cannot hold {need} bytes of key material",
                k.area.size
            ));
        }
        None
    }
}
