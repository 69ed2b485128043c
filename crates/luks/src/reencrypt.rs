//! LUKS2 reencryption metadata, the walker's journal, exactly as cryptsetup
//! (>= 2.4.3) writes and reads it.
//!
//! While a device is being encrypted in place its header carries:
//! - a keyslot of `type: reencrypt` (no key material, `key_size: 1`, priority 0)
//!   with `mode`, `direction` and a resilience `area` in the keyslot area;
//! - `online-reencrypt-v2` in `config.requirements.mandatory`, so tools that do
//!   not understand the state refuse to open the device;
//! - the live segments in *logical* order (each segment's logical start is the sum
//!   of the sizes before it, its `offset` is physical): the part already done
//!   (`crypt`), the hotzone (flagged `in-reencryption`) and the part not yet done
//!   (`linear`), followed by `backup-previous` (old layout), `backup-final` (new
//!   layout) and, for a data shift, `backup-moved-segment`;
//! - a `pbkdf2` digest bound only to the reencrypt keyslot, over a blob that
//!   serializes the version, the keys and the layout (CVE-2021-4122 fix): a header
//!   edited by someone without the volume key no longer verifies.
//!
//! This module only transforms [`Metadata`]; it never touches a device.

use crate::error::{Error, Result};
use crate::hash::Hash;
use crate::luks2::json::{
    CryptSegment, Digest, Keyslot, LinearSegment, Metadata, Pbkdf2Digest, Priority, ReencryptArea,
    ReencryptDirection, ReencryptKeyslot, ReencryptMode, Segment, SegmentSize, FLAG_BACKUP_FINAL,
    FLAG_BACKUP_MOVED_SEGMENT, FLAG_BACKUP_PREVIOUS, FLAG_IN_REENCRYPTION,
};
use zeroize::Zeroizing;

/// Requirement version written by cryptsetup for encrypt/reencrypt (`-v2`).
pub const REENCRYPT_REQ_VERSION: u8 = 2;
/// Iterations of the reencrypt digest's PBKDF2 (cryptsetup's minimum).
pub const REENCRYPT_DIGEST_ITERATIONS: u32 = 1000;

/// Where the volume lives before and after, and how its crypt side is
/// encrypted: everything the segments must describe. `mode` says which side is
/// the crypt one: the final layout when encrypting, the old one when decrypting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncryptLayout {
    /// `Encrypt` (old = plaintext, new = crypt) or `Decrypt` (old = crypt, new = plaintext).
    pub mode: ReencryptMode,
    /// Physical offset of logical byte 0 in the final layout.
    pub data_offset: u64,
    /// Physical offset of logical byte 0 in the old layout (outside the moved segment).
    pub old_offset: u64,
    /// Logical bytes to encrypt; `None` = to the end of the device (`dynamic`).
    pub data_size: Option<u64>,
    /// Cipher spec of the crypt side, e.g. `aes-xts-plain64`.
    pub encryption: String,
    pub sector_size: u32,
    /// Data shift: the first `shift` logical bytes were copied to `moved_offset`.
    pub shift: Option<Shift>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shift {
    pub size: u64,
    pub moved_offset: u64,
}

impl EncryptLayout {
    /// Physical offset where logical byte `l` lived before encryption.
    pub fn old_physical(&self, l: u64) -> u64 {
        match self.shift {
            Some(s) if l < s.size => s.moved_offset + l,
            _ => self.old_offset + l,
        }
    }
    /// Physical offset where logical byte `l` lives once encrypted.
    pub fn new_physical(&self, l: u64) -> u64 {
        self.data_offset + l
    }
    fn decrypting(&self) -> bool {
        self.mode == ReencryptMode::Decrypt
    }
    /// A decryption with a moved first segment: cryptsetup 2.6 copies the first `m`
    /// bytes of ciphertext over the header at offset 0, decrypts the rest forward
    /// (each hotzone moves down by the data offset), and decrypts that head in place
    /// last (see [`Progress`]).
    pub fn head_last(&self) -> Option<u64> {
        self.shift.filter(|_| self.decrypting()).map(|s| s.size)
    }
}

/// Progress in logical bytes. Forward: `[0, hot_start)` is done; backward:
/// `[hot_start + hot_len, end)` is done. `hot_len == 0` is a clean state. A forward run
/// whose segments are all new up to a dynamic end (killed after its last hotzone, before
/// the final header) reads back as `hot_start == u64::MAX`: done, only the header is left.
///
/// A decryption whose layout has a moved first segment of `m` bytes (cryptsetup 2.6's
/// `reencrypt --decrypt --header FILE` of a volume with its header in front, see
/// [`EncryptLayout::head_last`]) walks `[m, end)` forward and the moved head `[0, m)`,
/// in place, last: `[m, hot_start)` is done (`hot_start == u64::MAX`: all of it), the
/// head's hotzone is `(0, m)`, and `(0, 0)` means every byte is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub hot_start: u64,
    pub hot_len: u64,
}

/// The parsed reencryption state of a header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReencryptState {
    pub keyslot: u32,
    pub mode: ReencryptMode,
    pub direction: ReencryptDirection,
    pub area: ReencryptArea,
    pub layout: EncryptLayout,
    pub progress: Progress,
    /// The volume-key digest (the one bound to the crypt backup segment).
    pub key_digest: u32,
    /// Reencryption metadata version (`online-reencrypt-vN`), which the digest covers.
    pub version: u8,
    /// Where the data ends (logical bytes), when the layout's size is dynamic and the
    /// caller knows the device: a forward hotzone that reaches it gets no trailing
    /// segment (see [`encrypt_segments`]). Not stored in the header.
    pub data_end: Option<u64>,
}

fn crypt(
    offset: u64,
    size: SegmentSize,
    iv_tweak: u64,
    l: &EncryptLayout,
    flags: &[&str],
) -> Segment {
    Segment::Crypt(CryptSegment {
        offset,
        size,
        iv_tweak,
        encryption: l.encryption.clone(),
        sector_size: l.sector_size,
        integrity: None,
        flags: flags_of(flags),
        extra: Default::default(),
    })
}

fn linear(offset: u64, size: SegmentSize, flags: &[&str]) -> Segment {
    Segment::Linear(LinearSegment {
        offset,
        size,
        flags: flags_of(flags),
        extra: Default::default(),
    })
}

fn flags_of(f: &[&str]) -> Option<Vec<String>> {
    (!f.is_empty()).then(|| f.iter().map(|s| s.to_string()).collect())
}

/// Live segments (logical order) for an encryption at `p`, plus the backups.
/// Crypt segments use `iv_tweak` = logical offset / 512.
pub fn encrypt_segments(
    l: &EncryptLayout,
    dir: ReencryptDirection,
    p: Progress,
    data_end: Option<u64>,
) -> Result<Vec<Segment>> {
    let mut live: Vec<Segment> = Vec::new();
    let sized = |n: u64| SegmentSize::Bytes(n);
    // Old pieces of a logical range, split at the moved boundary (linear when
    // encrypting, crypt when decrypting).
    let old_piece = |start: u64, size: SegmentSize| {
        if l.decrypting() {
            crypt(l.old_physical(start), size, start / 512, l, &[])
        } else {
            linear(l.old_physical(start), size, &[])
        }
    };
    let old_range = |start: u64, end: Option<u64>, out: &mut Vec<Segment>| {
        let mut start = start;
        if let Some(s) = l.shift {
            if start < s.size {
                let e = end.map_or(s.size, |e| e.min(s.size));
                if e > start {
                    out.push(old_piece(start, sized(e - start)));
                }
            }
            start = start.max(s.size);
        }
        match end {
            Some(e) if e > start => out.push(old_piece(start, sized(e - start))),
            None => out.push(old_piece(start, SegmentSize::Dynamic)),
            _ => {}
        }
    };
    let new_range = |start: u64, end: Option<u64>, flags: &[&str], out: &mut Vec<Segment>| {
        let size = match end {
            Some(e) if e > start => sized(e - start),
            Some(_) => return,
            None => SegmentSize::Dynamic,
        };
        if l.decrypting() {
            out.push(linear(l.new_physical(start), size, flags));
        } else {
            out.push(crypt(l.new_physical(start), size, start / 512, l, flags));
        }
    };
    let hot_end = p.hot_start.saturating_add(p.hot_len);
    // The hotzone, when there is one.
    let hot = |out: &mut Vec<Segment>| {
        if p.hot_len > 0 {
            new_range(p.hot_start, Some(hot_end), &[FLAG_IN_REENCRYPTION], out);
        }
    };
    // Nothing left after the hotzone: no trailing segment, as cryptsetup writes it. (A
    // dynamic one starting at the device's end would be empty; cryptsetup 2.6.1's
    // `repair` of a data-moving decryption killed in its last hotzone kept such a
    // segment, and `reencrypt --resume-only` then failed with "Failed to load LUKS2
    // reencryption context".)
    let at_end = l.data_size.is_none() && data_end.is_some_and(|e| hot_end >= e);
    match dir {
        ReencryptDirection::Forward if l.head_last().is_some() => {
            // As cryptsetup writes each state (luksDump on this machine): the moved
            // head stays one old segment at offset 0 until the tail is done.
            let m = l.head_last().unwrap_or(0);
            let tail_done = p.hot_start == u64::MAX || data_end.is_some_and(|e| p.hot_start >= e);
            if p.hot_start == 0 {
                hot(&mut live);
                new_range(p.hot_len, None, &[], &mut live);
            } else {
                old_range(0, Some(m), &mut live);
                if tail_done {
                    new_range(m, None, &[], &mut live);
                } else {
                    new_range(m, Some(p.hot_start), &[], &mut live);
                    hot(&mut live);
                    if !at_end {
                        old_range(hot_end, None, &mut live);
                    }
                }
            }
        }
        ReencryptDirection::Forward => {
            new_range(0, Some(p.hot_start), &[], &mut live);
            hot(&mut live);
            if !at_end {
                old_range(hot_end, l.data_size, &mut live);
            }
        }
        ReencryptDirection::Backward => {
            // A dynamic size is cryptsetup 2.6's `reencrypt --decrypt --header` (data
            // in place): nothing done yet is one old segment to the device's end, as
            // its `--init-only` writes it; the first hotzone (the data's last bytes)
            // has no new segment after it; later ones are followed by a dynamic one.
            let end = l.data_size.or(data_end);
            let untouched = p.hot_len == 0
                && (p.hot_start == u64::MAX || end.is_some_and(|e| p.hot_start >= e));
            if untouched && l.data_size.is_none() {
                old_range(0, None, &mut live);
            } else {
                old_range(0, Some(p.hot_start), &mut live);
                hot(&mut live);
                if !at_end {
                    new_range(hot_end, l.data_size, &[], &mut live);
                }
            }
        }
    }
    if live.is_empty() {
        return Err(Error::InvalidArgument(
            "reencryption state with no data segment".into(),
        ));
    }
    // Backups: previous (old layout), final (new layout), moved segment.
    let prev_size = l.data_size.map_or(SegmentSize::Dynamic, sized);
    if l.decrypting() {
        live.push(crypt(
            l.old_offset,
            prev_size,
            0,
            l,
            &[FLAG_BACKUP_PREVIOUS],
        ));
        live.push(linear(
            l.data_offset,
            SegmentSize::Dynamic,
            &[FLAG_BACKUP_FINAL],
        ));
    } else {
        live.push(linear(l.old_offset, prev_size, &[FLAG_BACKUP_PREVIOUS]));
        live.push(crypt(
            l.data_offset,
            SegmentSize::Dynamic,
            0,
            l,
            &[FLAG_BACKUP_FINAL],
        ));
    }
    if let Some(s) = l.shift {
        // The moved segment holds old bytes: plaintext, or ciphertext when decrypting.
        live.push(if l.decrypting() {
            crypt(
                s.moved_offset,
                sized(s.size),
                0,
                l,
                &[FLAG_BACKUP_MOVED_SEGMENT],
            )
        } else {
            linear(s.moved_offset, sized(s.size), &[FLAG_BACKUP_MOVED_SEGMENT])
        });
    }
    Ok(live)
}

/// Mandatory requirement luksify sets while the first hotzone of a decryption
/// that moves the data back (hotzone at logical 0, no moved segment) is in
/// progress. cryptsetup 2.6 recovers a hotzone at 0 of such a run as if it had
/// moved the first segment as its own `--decrypt --header` does, which would
/// be wrong here; an unknown requirement makes it refuse instead. luksify
/// resumes that state itself; every later state is cryptsetup's v3 layout.
pub const REQUIREMENT_LUKSIFY_DECRYPT_HEAD: &str = "luksify-decrypt-head";

fn set_requirement(md: &mut Metadata, req: &str, on: bool) {
    let mut reqs = md.config.requirements.clone().unwrap_or_default();
    let mut mand = reqs.mandatory.unwrap_or_default();
    let has = mand.iter().any(|r| r == req);
    if on == has {
        return;
    }
    if on {
        mand.push(req.to_string());
    } else {
        mand.retain(|r| r != req);
    }
    reqs.mandatory = (!mand.is_empty()).then_some(mand);
    md.config.requirements = Some(reqs);
}

/// Installs the segments for progress `p`, binding every crypt segment to the
/// volume-key digest. (The reencrypt digest covers only the backup segments and
/// the keyslot, which progress does not change, so it stays valid.)
pub fn set_progress(md: &mut Metadata, st: &ReencryptState, p: Progress) -> Result<()> {
    let segs = encrypt_segments(&st.layout, st.direction, p, st.data_end)?;
    md.segments = segs
        .into_iter()
        .enumerate()
        .map(|(i, s)| (i as u32, s))
        .collect();
    let crypt_ids: Vec<u32> = md
        .segments
        .iter()
        .filter(|(_, s)| matches!(s, Segment::Crypt(_)))
        .map(|(i, _)| *i)
        .collect();
    for (id, d) in md.digests.iter_mut() {
        if let Digest::Pbkdf2(d) = d {
            d.segments = if *id == st.key_digest {
                crypt_ids.clone()
            } else {
                Vec::new()
            };
        }
    }
    let head_hot = st.layout.mode == ReencryptMode::Decrypt
        && matches!(st.area, ReencryptArea::Datashift { .. })
        && st.layout.shift.is_none()
        && p.hot_len > 0
        && p.hot_start == 0;
    set_requirement(md, REQUIREMENT_LUKSIFY_DECRYPT_HEAD, head_hot);
    Ok(())
}

/// Turns a freshly formatted header (one keyslot, one crypt segment bound to
/// `key_digest`) into the initial state of an encryption: adds the reencrypt
/// keyslot with `area`, the requirement, the segments and the reencrypt digest.
pub fn init_encrypt(
    md: &mut Metadata,
    key_digest: u32,
    vk: &[u8],
    layout: EncryptLayout,
    direction: ReencryptDirection,
    area: ReencryptArea,
) -> Result<ReencryptState> {
    init(md, key_digest, vk, layout, direction, area)
}

/// Metadata version cryptsetup writes for a reencryption: 3 for a decryption
/// that moves the data (cryptsetup 2.6's `--decrypt --header` of a volume with
/// its header in front), 2 otherwise.
fn version_for(mode: ReencryptMode, area: &ReencryptArea) -> u8 {
    let shifts = matches!(
        area,
        ReencryptArea::Datashift { .. }
            | ReencryptArea::DatashiftChecksum { .. }
            | ReencryptArea::DatashiftJournal { .. }
    );
    if mode == ReencryptMode::Decrypt && shifts {
        3
    } else {
        REENCRYPT_REQ_VERSION
    }
}

/// Adds the reencryption state for `layout.mode` (encrypt or decrypt) to a
/// header whose crypt segment is bound to `key_digest`.
pub fn init(
    md: &mut Metadata,
    key_digest: u32,
    vk: &[u8],
    layout: EncryptLayout,
    direction: ReencryptDirection,
    area: ReencryptArea,
) -> Result<ReencryptState> {
    if layout.mode == ReencryptMode::Reencrypt {
        return Err(Error::Unsupported(
            "re-encryption with a new key (luksify encrypts and decrypts only)".into(),
        ));
    }
    let keyslot = (0..32u32)
        .find(|i| !md.keyslots.contains_key(i))
        .ok_or_else(|| Error::NoFreeKeyslot("no keyslot left for the reencrypt state".into()))?;
    md.keyslots.insert(
        keyslot,
        Keyslot::Reencrypt(ReencryptKeyslot {
            key_size: 1,
            mode: layout.mode,
            direction,
            area: area.clone(),
            priority: Some(Priority::Ignore),
            extra: Default::default(),
        }),
    );
    let version = version_for(layout.mode, &area);
    let req = format!("online-reencrypt-v{version}");
    let mut reqs = md.config.requirements.clone().unwrap_or_default();
    let mut mand = reqs.mandatory.unwrap_or_default();
    mand.retain(|r| !r.starts_with("online-reencrypt"));
    mand.push(req);
    reqs.mandatory = Some(mand);
    md.config.requirements = Some(reqs);
    let start = match direction {
        ReencryptDirection::Forward => 0,
        ReencryptDirection::Backward => layout.data_size.unwrap_or(0),
    };
    let st = ReencryptState {
        keyslot,
        mode: layout.mode,
        direction,
        area,
        layout,
        progress: Progress {
            hot_start: start,
            hot_len: 0,
        },
        key_digest,
        version,
        data_end: None,
    };
    set_progress(md, &st, st.progress)?;
    refresh_reencrypt_digest(md, keyslot, vk)?;
    Ok(st)
}

fn drop_reencrypt_requirement(md: &mut Metadata) {
    if let Some(r) = md.config.requirements.as_mut() {
        if let Some(m) = r.mandatory.as_mut() {
            m.retain(|x| {
                !x.starts_with("online-reencrypt") && x != REQUIREMENT_LUKSIFY_DECRYPT_HEAD
            });
        }
        if r.mandatory.as_ref().is_some_and(|m| m.is_empty()) && r.extra.is_empty() {
            md.config.requirements = None;
        } else if r.mandatory.as_ref().is_some_and(|m| m.is_empty()) {
            r.mandatory = None;
        }
    }
}

/// The final header once every byte is plaintext, as cryptsetup leaves it:
/// one linear segment, no keyslots, digests or requirement. (The keyslot
/// areas must be wiped by the caller: they still hold the split key.)
pub fn finish_decrypt(md: &mut Metadata, st: &ReencryptState) {
    md.segments.clear();
    md.segments
        .insert(0, linear(st.layout.data_offset, SegmentSize::Dynamic, &[]));
    md.keyslots.clear();
    md.digests.clear();
    md.tokens.clear();
    drop_reencrypt_requirement(md);
}

/// The final header once every byte is encrypted: one crypt segment, no
/// reencrypt keyslot, digest or requirement.
pub fn finish_encrypt(md: &mut Metadata, st: &ReencryptState) {
    let l = &st.layout;
    md.segments.clear();
    md.segments
        .insert(0, crypt(l.data_offset, SegmentSize::Dynamic, 0, l, &[]));
    md.keyslots.remove(&st.keyslot);
    md.digests
        .retain(|_, d| !d.keyslots().contains(&st.keyslot) || d.keyslots().len() > 1);
    for (id, d) in md.digests.iter_mut() {
        if let Digest::Pbkdf2(d) = d {
            d.keyslots.retain(|k| *k != st.keyslot);
            d.segments = if *id == st.key_digest {
                vec![0]
            } else {
                Vec::new()
            };
        }
    }
    drop_reencrypt_requirement(md);
}

/// Reads the reencryption state of a header, or `None` if it is not in reencryption.
pub fn state(md: &Metadata) -> Result<Option<ReencryptState>> {
    let Some((&keyslot, ks)) = md.keyslots.iter().find_map(|(i, k)| match k {
        Keyslot::Reencrypt(r) => Some((i, r)),
        _ => None,
    }) else {
        return Ok(None);
    };
    let version = md
        .config
        .mandatory_requirements()
        .iter()
        .find_map(|r| r.strip_prefix("online-reencrypt-v").and_then(|v| v.parse::<u8>().ok()))
        .ok_or_else(|| {
            Error::Unsupported(
                "reencrypt keyslot without an online-reencrypt-v2/v3 requirement (older cryptsetup format)"
                    .into(),
            )
        })?;
    if !(2..=3).contains(&version) {
        return Err(Error::Unsupported(format!(
            "reencryption metadata version {version} (luksify knows versions 2 and 3)"
        )));
    }
    if ks.mode == ReencryptMode::Reencrypt {
        return Err(Error::Unsupported(
            "resuming a cryptsetup re-encryption with a new key (luksify resumes encryption and decryption only): finish it with `cryptsetup reencrypt --resume-only` (nothing was written)"
                .into(),
        ));
    }
    let decrypting = ks.mode == ReencryptMode::Decrypt;
    let by_flag = |f: &str| md.segments.iter().find(|(_, s)| s.has_flag(f));
    let (final_id, final_seg) = by_flag(FLAG_BACKUP_FINAL)
        .ok_or_else(|| Error::corrupt("reencryption without a backup-final segment"))?;
    let (prev_id, prev) = by_flag(FLAG_BACKUP_PREVIOUS)
        .ok_or_else(|| Error::corrupt("reencryption without a backup-previous segment"))?;
    // The crypt side: the final layout when encrypting, the old one when decrypting.
    let (crypt_id, crypt_seg) = if decrypting {
        (prev_id, prev)
    } else {
        (final_id, final_seg)
    };
    let Segment::Crypt(cs) = crypt_seg else {
        return Err(Error::corrupt(if decrypting {
            "decryption whose backup-previous segment is not of type crypt"
        } else {
            "encryption whose backup-final segment is not of type crypt"
        }));
    };
    if cs.iv_tweak != 0 {
        return Err(Error::Unsupported(format!(
            "crypt segment with iv_tweak {} (luksify handles 0)",
            cs.iv_tweak
        )));
    }
    let data_size = match prev.size() {
        Some(SegmentSize::Bytes(n)) => Some(n),
        _ => None,
    };
    let shift = match by_flag(FLAG_BACKUP_MOVED_SEGMENT) {
        Some(_) if decrypting && ks.direction != ReencryptDirection::Forward => {
            return Err(Error::Unsupported(
                "a backward decryption with a moved first segment (finish it with `cryptsetup reencrypt --resume-only`)"
                    .into(),
            ))
        }
        Some((_, m)) => match (m.offset(), m.size()) {
            (Some(o), Some(SegmentSize::Bytes(n))) => Some(Shift {
                size: n,
                moved_offset: o,
            }),
            _ => {
                return Err(Error::corrupt(
                    "backup-moved-segment without offset and size",
                ))
            }
        },
        None => None,
    };
    let key_digest = md
        .digests
        .iter()
        .find(|(_, d)| d.segments().contains(crypt_id))
        .map(|(i, _)| *i)
        .ok_or_else(|| Error::corrupt("no digest bound to the crypt backup segment"))?;
    let layout = EncryptLayout {
        mode: ks.mode,
        data_offset: final_seg.offset().unwrap_or(0),
        old_offset: prev.offset().unwrap_or(0),
        data_size,
        encryption: cs.encryption.clone(),
        sector_size: cs.sector_size,
        shift,
    };
    check_live_segments(md, &layout)?;
    // Walk live segments in logical order.
    let mut logical = 0u64;
    let mut hot: Option<(u64, u64)> = None;
    // "Old" pieces are linear when encrypting, crypt when decrypting.
    let mut linear_end: Option<u64> = None;
    let mut first_linear: Option<u64> = None;
    for s in md.segments.values().filter(|s| !s.is_backup()) {
        let size = match s.size() {
            Some(SegmentSize::Bytes(n)) => n,
            Some(SegmentSize::Dynamic) => u64::MAX - logical,
            None => return Err(Error::corrupt("segment without size")),
        };
        if s.has_flag(FLAG_IN_REENCRYPTION) {
            hot = Some((logical, size));
        } else if matches!(s, Segment::Linear(_)) != decrypting {
            first_linear.get_or_insert(logical);
            linear_end = Some(logical.saturating_add(size));
        }
        logical = logical.saturating_add(size);
    }
    let head_last = layout.head_last();
    let progress = match (hot, ks.direction) {
        (Some((a, n)), _) => Progress {
            hot_start: a,
            hot_len: n,
        },
        (None, _) if head_last.is_some() => {
            // Old pieces: the moved head at 0 (until the very end), then the tail's.
            let m = head_last.unwrap_or(0);
            let mut logical = 0u64;
            let (mut head_old, mut tail_old) = (false, None);
            for s in md.segments.values().filter(|s| !s.is_backup()) {
                if matches!(s, Segment::Crypt(_)) {
                    if logical < m {
                        head_old = true;
                    } else {
                        tail_old.get_or_insert(logical);
                    }
                }
                logical = match s.size() {
                    Some(SegmentSize::Bytes(n)) => logical.saturating_add(n),
                    _ => u64::MAX,
                };
            }
            match (head_old, tail_old) {
                (true, Some(a)) => Progress {
                    hot_start: a,
                    hot_len: 0,
                },
                (true, None) => Progress {
                    hot_start: u64::MAX,
                    hot_len: 0,
                },
                (false, _) => Progress {
                    hot_start: 0,
                    hot_len: 0,
                },
            }
        }
        (None, ReencryptDirection::Forward) => Progress {
            hot_start: first_linear.unwrap_or(logical),
            hot_len: 0,
        },
        (None, ReencryptDirection::Backward) => Progress {
            hot_start: linear_end.unwrap_or(0),
            hot_len: 0,
        },
    };
    Ok(Some(ReencryptState {
        keyslot,
        mode: ks.mode,
        direction: ks.direction,
        area: ks.area.clone(),
        layout,
        progress,
        key_digest,
        version,
        data_end: None,
    }))
}

/// Each live segment lies where the run's layout puts its logical position, and a crypt
/// one's IV tweak is that position in sectors: a header edited (checksums redone) to
/// leave a gap between segments, or a hotzone with another tweak, was resumed to the
/// end with the wrong bytes (a trial). Offsets are checked past a moved head only
/// (where the head lies depends on how far the move went).
fn check_live_segments(md: &Metadata, layout: &EncryptLayout) -> Result<()> {
    let decrypting = layout.decrypting();
    let moved = layout.shift.map_or(0, |s| s.size);
    let mut l = 0u64;
    for (id, s) in md.segments.iter().filter(|(_, s)| !s.is_backup()) {
        if let Segment::Crypt(c) = s {
            if c.iv_tweak != l / 512 || !l.is_multiple_of(512) {
                return Err(Error::corrupt(format!(
                    "reencryption segment {id} starts at logical byte {l} but has iv_tweak {} (header edited or damaged)",
                    c.iv_tweak
                )));
            }
        }
        let new_side = matches!(s, Segment::Crypt(_)) != decrypting;
        let want = if new_side {
            layout.new_physical(l)
        } else {
            layout.old_physical(l)
        };
        if l >= moved && s.offset() != Some(want) {
            return Err(Error::corrupt(format!(
                "reencryption segment {id} lies at byte {} where the run's layout puts logical byte {l} at {want}: the segments leave a gap or overlap (header edited or damaged)",
                s.offset().unwrap_or(0)
            )));
        }
        l = match s.size() {
            Some(SegmentSize::Bytes(n)) => l.saturating_add(n),
            _ => u64::MAX,
        };
    }
    Ok(())
}

/// The blob the reencrypt digest covers (see cryptsetup's reencrypt digest):
/// `'v'`, `'0' + version`, the volume key(s), then the reencrypt keyslot's
/// mode, direction and area fields, then the backup segments.
pub fn digest_blob(md: &Metadata, vk: &[u8], version: u8) -> Result<Zeroizing<Vec<u8>>> {
    let mut b = Zeroizing::new(vec![b'v', 0x30 + version]);
    b.extend_from_slice(vk);
    let ks = md
        .keyslots
        .values()
        .find_map(|k| match k {
            Keyslot::Reencrypt(r) => Some(r),
            _ => None,
        })
        .ok_or_else(|| Error::corrupt("no reencrypt keyslot"))?;
    let mode = match ks.mode {
        ReencryptMode::Reencrypt => "reencrypt",
        ReencryptMode::Encrypt => "encrypt",
        ReencryptMode::Decrypt => "decrypt",
    };
    let dir = match ks.direction {
        ReencryptDirection::Forward => "forward",
        ReencryptDirection::Backward => "backward",
    };
    b.extend_from_slice(mode.as_bytes());
    b.extend_from_slice(dir.as_bytes());
    let a = &ks.area;
    let area_type = match a {
        ReencryptArea::None { .. } => "none",
        ReencryptArea::Checksum { .. } => "checksum",
        ReencryptArea::Journal { .. } => "journal",
        ReencryptArea::Datashift { .. } => "datashift",
        ReencryptArea::DatashiftChecksum { .. } => "datashift-checksum",
        ReencryptArea::DatashiftJournal { .. } => "datashift-journal",
    };
    b.extend_from_slice(area_type.as_bytes());
    b.extend_from_slice(&a.offset().to_be_bytes());
    b.extend_from_slice(&a.size().to_be_bytes());
    match a {
        ReencryptArea::Checksum {
            hash, sector_size, ..
        } => {
            b.extend_from_slice(hash.as_bytes());
            b.extend_from_slice(&sector_size.to_be_bytes());
        }
        ReencryptArea::DatashiftChecksum {
            hash,
            sector_size,
            shift_size,
            ..
        } => {
            b.extend_from_slice(hash.as_bytes());
            b.extend_from_slice(&sector_size.to_be_bytes());
            b.extend_from_slice(&shift_size.to_be_bytes());
        }
        ReencryptArea::Datashift { shift_size, .. }
        | ReencryptArea::DatashiftJournal { shift_size, .. } => {
            b.extend_from_slice(&shift_size.to_be_bytes());
        }
        _ => {}
    }
    let seg = |flag: &str| md.segments.values().find(|s| s.has_flag(flag));
    let mut put_seg = |s: &Segment| {
        let size = |z: SegmentSize, b: &mut Zeroizing<Vec<u8>>| match z {
            SegmentSize::Dynamic => b.extend_from_slice(b"dynamic"),
            SegmentSize::Bytes(n) => b.extend_from_slice(&n.to_be_bytes()),
        };
        match s {
            Segment::Crypt(c) => {
                b.extend_from_slice(b"crypt");
                b.extend_from_slice(&c.offset.to_be_bytes());
                size(c.size, &mut b);
                b.extend_from_slice(&c.iv_tweak.to_be_bytes());
                b.extend_from_slice(c.encryption.as_bytes());
                b.extend_from_slice(&c.sector_size.to_be_bytes());
            }
            Segment::Linear(l) => {
                b.extend_from_slice(b"linear");
                b.extend_from_slice(&l.offset.to_be_bytes());
                size(l.size, &mut b);
            }
            Segment::Unknown(_) => {}
        }
    };
    for f in [FLAG_BACKUP_PREVIOUS, FLAG_BACKUP_FINAL] {
        put_seg(seg(f).ok_or_else(|| Error::corrupt(format!("no {f} segment")))?);
    }
    if let Some(m) = seg(FLAG_BACKUP_MOVED_SEGMENT) {
        put_seg(m);
    }
    Ok(b)
}

/// The `N` of the `online-reencrypt-vN` requirement (2 when absent).
fn metadata_version(md: &Metadata) -> u8 {
    md.config
        .mandatory_requirements()
        .iter()
        .find_map(|r| {
            r.strip_prefix("online-reencrypt-v")
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(REENCRYPT_REQ_VERSION)
}

/// Moves the reencrypt keyslot's resilience area to `area` (same type, e.g. the other
/// half of a double-buffered journal) and re-binds the reencrypt digest, which covers the
/// area's offset and size. Takes effect in `md` and `st`; the caller commits.
pub fn set_area(
    md: &mut Metadata,
    st: &mut ReencryptState,
    area: ReencryptArea,
    vk: &[u8],
) -> Result<()> {
    set_area_cached(md, st, area, vk, &mut DigestCache::default())
}

/// Reencrypt digests already computed in this run, by what they cover: a
/// double-buffered journal moves between the same two areas at every commit, and a
/// digest's PBKDF2 (1000 iterations) is otherwise most of a commit's CPU (0.15 of
/// 0.24 ms measured), on the path every worker waits on.
///
/// Reusing a digest (and its salt) for the very same covered data is what keeping
/// the metadata unchanged would do; the key is a SHA-256 of the covered bytes, which
/// include the volume key, so entries are exact.
#[derive(Default)]
pub struct DigestCache {
    entries: Vec<([u8; 32], Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for DigestCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DigestCache({} entries)", self.entries.len())
    }
}

/// [`set_area`] reusing digests from `cache` (and adding the ones it computes).
pub fn set_area_cached(
    md: &mut Metadata,
    st: &mut ReencryptState,
    area: ReencryptArea,
    vk: &[u8],
    cache: &mut DigestCache,
) -> Result<()> {
    if std::mem::discriminant(&area) != std::mem::discriminant(&st.area) {
        return Err(Error::InvalidArgument(
            "the resilience area can move but not change its type".into(),
        ));
    }
    match md.keyslots.get_mut(&st.keyslot) {
        Some(Keyslot::Reencrypt(k)) => k.area = area.clone(),
        _ => return Err(Error::corrupt("no reencrypt keyslot")),
    }
    st.area = area;
    refresh_digest(md, st.keyslot, vk, Some(cache))
}

/// (Re)creates the pbkdf2 digest bound to the reencrypt keyslot alone.
pub fn refresh_reencrypt_digest(md: &mut Metadata, keyslot: u32, vk: &[u8]) -> Result<()> {
    refresh_digest(md, keyslot, vk, None)
}

fn refresh_digest(
    md: &mut Metadata,
    keyslot: u32,
    vk: &[u8],
    cache: Option<&mut DigestCache>,
) -> Result<()> {
    let blob = digest_blob(md, vk, metadata_version(md))?;
    let fresh = || -> Result<(Vec<u8>, Vec<u8>)> {
        let salt = crate::random::bytes(32)?;
        let mut out = vec![0u8; 32];
        Hash::Sha256.pbkdf2(&blob, &salt, REENCRYPT_DIGEST_ITERATIONS, &mut out);
        Ok((salt, out))
    };
    let (salt, out) = match cache {
        None => fresh()?,
        Some(c) => {
            let key = crate::hash::sha256(&blob);
            match c.entries.iter().find(|e| e.0 == key) {
                Some((_, salt, out)) => (salt.clone(), out.clone()),
                None => {
                    let (salt, out) = fresh()?;
                    c.entries.push((key, salt.clone(), out.clone()));
                    (salt, out)
                }
            }
        }
    };
    // Unbind the keyslot from every digest, drop digests left with nothing.
    for d in md.digests.values_mut() {
        if let Digest::Pbkdf2(d) = d {
            d.keyslots.retain(|k| *k != keyslot);
        }
    }
    md.digests
        .retain(|_, d| !(d.keyslots().is_empty() && d.segments().is_empty()));
    let id = (0..8u32)
        .find(|i| !md.digests.contains_key(i))
        .ok_or_else(|| {
            Error::InvalidArgument("no free digest slot for the reencrypt digest".into())
        })?;
    md.digests.insert(
        id,
        Digest::Pbkdf2(Pbkdf2Digest {
            keyslots: vec![keyslot],
            segments: vec![],
            hash: "sha256".into(),
            iterations: REENCRYPT_DIGEST_ITERATIONS,
            salt,
            digest: out,
            extra: Default::default(),
        }),
    );
    Ok(())
}

/// Checks the reencrypt digest against `vk`: refuses metadata not written by
/// someone holding the volume key.
pub fn verify_reencrypt_digest(md: &Metadata, keyslot: u32, vk: &[u8]) -> Result<()> {
    let blob = digest_blob(md, vk, metadata_version(md))?;
    for d in md.digests.values() {
        if let Digest::Pbkdf2(d) = d {
            if d.keyslots.contains(&keyslot) {
                let h = Hash::parse(&d.hash)?;
                let mut out = vec![0u8; d.digest.len()];
                h.pbkdf2(&blob, &d.salt, d.iterations, &mut out);
                if subtle::ConstantTimeEq::ct_eq(&out[..], &d.digest[..]).into() {
                    return Ok(());
                }
            }
        }
    }
    Err(Error::corrupt(
        "reencryption metadata digest does not verify (header edited or damaged)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Live segments as (crypt?, offset, size or `None` for dynamic, in-reencryption?).
    fn live(segs: &[Segment]) -> Vec<(bool, u64, Option<u64>, bool)> {
        segs.iter()
            .filter(|s| !s.is_backup())
            .map(|s| {
                let size = match s.size() {
                    Some(SegmentSize::Bytes(n)) => Some(n),
                    _ => None,
                };
                let crypt = matches!(s, Segment::Crypt(_));
                (
                    crypt,
                    s.offset().unwrap(),
                    size,
                    s.has_flag(FLAG_IN_REENCRYPTION),
                )
            })
            .collect()
    }

    /// cryptsetup 2.6's `reencrypt --decrypt --header` (data in place, dynamic size,
    /// backward), as its luksDump shows each state on this machine.
    #[test]
    fn backward_in_place_decryption_segments_are_cryptsetups() {
        let l = EncryptLayout {
            mode: ReencryptMode::Decrypt,
            data_offset: 0,
            old_offset: 0,
            data_size: None,
            encryption: "aes-xts-plain64".into(),
            sector_size: 4096,
            shift: None,
        };
        let (end, h) = (24u64 << 20, 1u64 << 20);
        let at = |hot_start, hot_len| {
            let p = Progress { hot_start, hot_len };
            live(&encrypt_segments(&l, ReencryptDirection::Backward, p, Some(end)).unwrap())
        };
        // --init-only: one crypt segment over the whole device.
        assert_eq!(at(u64::MAX, 0), [(true, 0, None, false)]);
        assert_eq!(at(end, 0), [(true, 0, None, false)]);
        // The first hotzone is the data's last: nothing after it.
        assert_eq!(
            at(end - h, h),
            [
                (true, 0, Some(end - h), false),
                (false, end - h, Some(h), true)
            ]
        );
        // Later ones: new data to the device's end.
        let a = 7 * h;
        assert_eq!(
            at(a, h),
            [
                (true, 0, Some(a), false),
                (false, a, Some(h), true),
                (false, a + h, None, false)
            ]
        );
        // A clean stop (cryptsetup's SIGINT state) and the end.
        assert_eq!(
            at(a, 0),
            [(true, 0, Some(a), false), (false, a, None, false)]
        );
        assert_eq!(at(0, 0), [(false, 0, None, false)]);
    }
}
