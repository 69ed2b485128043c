//! Which device a run with a detached header is walking.
//!
//! A detached header says nothing about the device it belongs to, and LUKS2 has no
//! field for it: after a reboot that renamed the disks, `resume /dev/sdc --header H`
//! with H started on /dev/sdb (same size) would go on encrypting the wrong disk from
//! the middle, and a later decryption would turn its first part into garbage.
//!
//! So a run luksify starts records, in a token of its own type (which cryptsetup
//! keeps and ignores), a few 4 KiB probes spread over the data: for every 512-byte
//! sector of each probe, a tag of its content before the run and of its content
//! after it. Both are known at the start (the new content is the old one put
//! through this run's cipher). The header's progress says which one each sector
//! must hold: the new content before the hotzone, the old one after it, and either
//! inside it (a crash or power cut may leave it part done; writes land per
//! sector). A resume checks every probe sector before it reads or writes anything
//! else and refuses a device where one does not match: another disk, and also a
//! copy of this disk taken before the run, once the run has gone past the first
//! probe (its first hotzone).
//!
//! Only layouts where the data stays in place (detached header, no shift) get the
//! token: with the header in front, the header is on the device itself. A run
//! without the token (started by cryptsetup, or a token of another run mode left
//! behind by a run cryptsetup finished) gets one the first time luksify walks it, at
//! its clean point then: a probe already walked holds its new content, whose old
//! content is the cipher's inverse; a probe across that point is left out. Until
//! then it is checked by size only.
//!
//! The tags are keyed: SHA-256 over a key derived from the run's cipher (its transform of
//! a fixed block at a sector no device reaches) and the sector, so a header alone (kept
//! in a file, backed up, or left with the token by a run cryptsetup finished) holds no
//! fingerprint of the plaintext. Tokens from before (no `"tags": "keyed-v1"`) hold plain
//! SHA-256 prefixes and are checked as such.

use crate::{Error, Result};
use luksify_luks::io::Disk;
use luksify_luks::luks2::json::{ReencryptDirection, ReencryptMode, Token};
use luksify_luks::reencrypt::{Progress, ReencryptState};
use serde_json::Value;
use sha2::Digest as _;

/// The token type.
pub const TOKEN_TYPE: &str = "luksify-identity";
/// The type of the token a run whose data moves gets instead (a decryption of a header
/// in front, moving its data back over it): only the data's length when it began.
pub const SIZE_TOKEN_TYPE: &str = "luksify-data-size";
/// Bytes per probe (a multiple of every encryption sector size).
const PROBE: u64 = 4096;
/// Granularity of the tags: the smallest unit a device writes atomically.
const SECTOR: usize = 512;
/// Probes per run: the first and last 4 KiB of the data, and three between.
const PROBES: u64 = 5;
/// Bytes of SHA-256 kept per sector tag.
const TAG: usize = 8;

/// Whether runs in this state get (and are checked against) the token.
pub(crate) fn applies(st: &ReencryptState) -> bool {
    st.layout.shift.is_none()
        && st.layout.data_offset == st.layout.old_offset
        && mode_name(st.mode).is_some()
}

/// Whether logical bytes `[pos, pos + len)` are all walked (`Some(true)`: they hold
/// their new content), none of them is (`Some(false)`: their old content), or neither
/// (`None`: inside the hotzone, or across its edge) at progress `p`.
fn walked(dir: ReencryptDirection, p: Progress, pos: u64, len: u64) -> Option<bool> {
    let hot_end = p.hot_start.saturating_add(p.hot_len);
    let end = pos + len;
    let (done, todo) = match dir {
        ReencryptDirection::Forward => (end <= p.hot_start, pos >= hot_end),
        ReencryptDirection::Backward => (pos >= hot_end, end <= p.hot_start),
    };
    match (done, todo) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    }
}

fn mode_name(m: ReencryptMode) -> Option<&'static str> {
    match m {
        ReencryptMode::Encrypt => Some("encrypt"),
        ReencryptMode::Decrypt => Some("decrypt"),
        _ => None,
    }
}

/// Logical offsets of the probes over `end` bytes of data: 4 KiB-aligned, the first
/// at 0 and the last ending at or just below `end`.
fn probe_offsets(end: u64) -> Vec<u64> {
    if end < PROBE {
        return Vec::new();
    }
    let last = (end - PROBE) / PROBE;
    let mut v: Vec<u64> = (0..PROBES)
        .map(|i| last * i / (PROBES - 1) * PROBE)
        .collect();
    v.dedup();
    v
}

/// The `tags` value of keyed tokens.
const KEYED: &str = "keyed-v1";
/// Where the key's block is transformed: sector 2^53, past any device.
const KEY_BLOCK_AT: u64 = 1 << 62;

/// The key of a run's tags, from its own transform (so only the key holder has it).
pub(crate) struct TagKey(zeroize::Zeroizing<[u8; 32]>);

impl TagKey {
    pub(crate) fn of(transform: impl Fn(&mut [u8], u64) -> Result<()>) -> Result<TagKey> {
        let mut block = zeroize::Zeroizing::new(vec![0u8; PROBE as usize]);
        transform(&mut block, KEY_BLOCK_AT)?;
        let mut h = sha2::Sha256::new();
        h.update(b"luksify-identity tag key\0");
        h.update(&*block);
        Ok(TagKey(zeroize::Zeroizing::new(h.finalize().into())))
    }
}

/// One tag per 512-byte sector: keyed, or (tokens from before) a plain SHA-256 prefix.
fn tags(buf: &[u8], key: Option<&TagKey>) -> Vec<Value> {
    buf.chunks(SECTOR)
        .map(|s| {
            let mut h = sha2::Sha256::new();
            if let Some(k) = key {
                h.update(&k.0[..]);
            }
            h.update(s);
            Value::String(hex(&h.finalize()[..TAG]))
        })
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The token for a run at clean progress `p` (at the start, every probe still holds
/// its old content). `None` when the layout does not get one, or no probe is clear of
/// `p`'s edge. `transform` is the walk's own (old bytes to new, in place, at a logical
/// offset), `inverse` its inverse.
pub(crate) fn token_at<D: Disk + ?Sized>(
    data: &D,
    st: &ReencryptState,
    p: Progress,
    transform: impl Fn(&mut [u8], u64) -> Result<()>,
    inverse: impl Fn(&mut [u8], u64) -> Result<()>,
    end: u64,
    key: &TagKey,
) -> Result<Option<Token>> {
    let Some(mode) = mode_name(st.mode).filter(|_| applies(st)) else {
        return Ok(None);
    };
    let probes = probes_at(data, st, p, probe_offsets(end), &transform, &inverse, key)?;
    if probes.is_empty() {
        return Ok(None);
    }
    let mut extra = serde_json::Map::new();
    extra.insert("mode".into(), Value::String(mode.into()));
    extra.insert("tags".into(), Value::String(KEYED.into()));
    // The data's length: a detached header's segment runs to the device's end
    // (`dynamic`), so nothing else tells a device grown since.
    extra.insert("data_bytes".into(), Value::String(end.to_string()));
    extra.insert("probes".into(), Value::Array(probes));
    Ok(Some(Token {
        kind: TOKEN_TYPE.into(),
        keyslots: Vec::new(),
        extra,
    }))
}

/// The probes at logical offsets `at` (each clear of progress `p`'s hotzone; others are
/// left out): each sector's tags of its old and its new content, one of which it holds.
fn probes_at<D: Disk + ?Sized>(
    data: &D,
    st: &ReencryptState,
    p: Progress,
    at: impl IntoIterator<Item = u64>,
    transform: &dyn Fn(&mut [u8], u64) -> Result<()>,
    inverse: &dyn Fn(&mut [u8], u64) -> Result<()>,
    key: &TagKey,
) -> Result<Vec<Value>> {
    let mut probes = Vec::new();
    for l in at {
        let Some(done) = walked(st.direction, p, l, PROBE) else {
            continue;
        };
        let mut buf = vec![0u8; PROBE as usize];
        let at = st.layout.old_physical(l);
        data.read_at(at, &mut buf)
            .map_err(|e| Error::io_at("read identity probe", at, buf.len(), e))?;
        let now = tags(&buf, Some(key));
        let (old, new) = if done {
            inverse(&mut buf, l)?;
            (tags(&buf, Some(key)), now)
        } else {
            transform(&mut buf, l)?;
            (now, tags(&buf, Some(key)))
        };
        let mut p = serde_json::Map::new();
        p.insert("offset".into(), Value::String(l.to_string()));
        p.insert("old".into(), Value::Array(old));
        p.insert("new".into(), Value::Array(new));
        probes.push(Value::Object(p));
    }
    Ok(probes)
}

/// The probes on either side of progress `p`'s hotzone, for the token's `edges` at each
/// commit: the 4 KiB walked last before it and the 4 KiB after it, which hold new and
/// old content. The five fixed probes let a header older or newer than its data
/// through as long as none lies between the two (a trial restored a header one hotzone
/// older than its data, resume "finished", and 16 MiB were encrypted twice); the edges
/// are where the two disagree first.
pub(crate) fn edges_at<D: Disk + ?Sized>(
    data: &D,
    st: &ReencryptState,
    p: Progress,
    end: u64,
    transform: &dyn Fn(&mut [u8], u64) -> Result<()>,
    inverse: &dyn Fn(&mut [u8], u64) -> Result<()>,
    key: &TagKey,
) -> Result<Vec<Value>> {
    let hot_end = p.hot_start.saturating_add(p.hot_len);
    let at = [p.hot_start.checked_sub(PROBE), Some(hot_end)]
        .into_iter()
        .flatten()
        .filter(|l| l.is_multiple_of(512) && l + PROBE <= end);
    probes_at(data, st, p, at, transform, inverse, key)
}

/// Sets the `edges` of our token in `tokens` (if there is one for this run).
pub(crate) fn set_edges<'a>(
    tokens: impl IntoIterator<Item = &'a mut Token>,
    st: &ReencryptState,
    edges: Vec<Value>,
) {
    let Some(mode) = mode_name(st.mode) else {
        return;
    };
    if let Some(t) = tokens
        .into_iter()
        .find(|t| t.kind == TOKEN_TYPE && t.extra.get("mode").and_then(Value::as_str) == Some(mode))
    {
        t.extra.insert("edges".into(), Value::Array(edges));
    }
}

/// This run's token among `tokens`: ours, and recorded for this run's mode.
pub(crate) fn find<'a>(
    tokens: impl IntoIterator<Item = &'a Token>,
    st: &ReencryptState,
) -> Option<&'a Token> {
    let mode = mode_name(st.mode)?;
    tokens
        .into_iter()
        .find(|t| t.kind == TOKEN_TYPE && t.extra.get("mode").and_then(Value::as_str) == Some(mode))
}

/// Refuses a device whose probe sectors do not hold what the header's progress says
/// they hold: their new content before the hotzone (written and durable before the
/// header moved past it), their old content after it (never written yet), either one
/// inside it (a crash may have left it part done). Reads only.
pub(crate) fn check<D: Disk + ?Sized>(
    data: &D,
    st: &ReencryptState,
    p: Progress,
    token: &Token,
    key: &TagKey,
) -> Result<()> {
    let key = (token.extra.get("tags").and_then(Value::as_str) == Some(KEYED)).then_some(key);
    let bad = |why: &str| {
        Error::Refused(format!(
            "the header's identity token is damaged ({why}); nothing was written"
        ))
    };
    let probes = token
        .extra
        .get("probes")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no probes"))?;
    // The edges of the hotzone at the token's last commit: checked as the probes are.
    let edges = match token.extra.get("edges") {
        None => &[][..],
        Some(v) => v.as_array().ok_or_else(|| bad("edges"))?.as_slice(),
    };
    let size = data
        .size()
        .map_err(|e| Error::io("size of the device", e))?;
    // Grown since the run started (tokens from before session 24 lack the length): its
    // new end would be walked as data, and the probes, all inside the old length, do
    // not notice. A file cryptsetup grew to whole 4096-byte blocks as it walked passes.
    if let Some(was) = token
        .extra
        .get("data_bytes")
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<u64>().ok())
    {
        let now = size.saturating_sub(st.layout.old_physical(0));
        if now < was {
            // Shrunk (or another, smaller device): the data past the new end would be
            // lost, and a decryption that moves its data back would wipe its "old end"
            // over plaintext (a trial: "decryption finished", 40 MB lost).
            return Err(Error::Refused(format!(
                "the device holds {now} bytes of data, but the run started on {was}: it was shrunk since (or it is another device); give it back its size ({} bytes in all), then resume (nothing was written)",
                st.layout.old_physical(0) + was
            )));
        }
        if now > was.next_multiple_of(4096) {
            return Err(Error::Refused(format!(
                "the device holds {now} bytes of data, but the run started on {was}: it was grown since (or it is another device); give it back its size ({} bytes in all, e.g. `truncate -s` for an image file), resume, and grow it after the run (nothing was written)",
                st.layout.old_physical(0) + was
            )));
        }
    }
    for (n, probe) in probes.iter().chain(edges).enumerate() {
        let edge = n >= probes.len();
        let l: u64 = probe
            .get("offset")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("probe offset"))?;
        let old = probe
            .get("old")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("old tags"))?;
        let new = probe
            .get("new")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("new tags"))?;
        let sectors = (PROBE as usize) / SECTOR;
        if old.len() != sectors || new.len() != sectors {
            return Err(bad("tag count"));
        }
        let mut buf = vec![0u8; PROBE as usize];
        let at = st.layout.old_physical(l);
        if at + PROBE > size {
            // A backward run's walked part reaches the device's end, which a dynamic
            // size does not record: the probe there is what notices a shrink.
            return Err(Error::Refused(format!(
                "device is {size} bytes, but the run's data reaches byte {}: wrong device, or it was shrunk (nothing was written)",
                at + PROBE
            )));
        }
        data.read_at(at, &mut buf)
            .map_err(|e| Error::io_at("read identity probe", at, buf.len(), e))?;
        for (i, now) in tags(&buf, key).iter().enumerate() {
            let pos = l + (i * SECTOR) as u64;
            let state = walked(st.direction, p, pos, SECTOR as u64);
            let ok = match state {
                Some(true) => *now == new[i],
                Some(false) => *now == old[i],
                None => *now == old[i] || *now == new[i],
            };
            if !ok && edge {
                return Err(Error::Refused(format!(
                    "the header and the data disagree at the 512 bytes at offset {}, where the header's last commit found {}: one of them is from another moment (a header backup, or a snapshot or copy of the device); resuming would encrypt part of it twice or leave part unencrypted. Give the header and the device from the same moment (nothing was written)",
                    at + (i * SECTOR) as u64,
                    if state == Some(false) { "the bytes still to walk" } else { "the bytes it had walked" }
                )));
            }
            if !ok {
                let what = if state == Some(false) {
                    "what was there when the run started"
                } else {
                    "what the run wrote there"
                };
                return Err(Error::Refused(format!(
                    "this device does not hold the data the header's run is walking (the 512 bytes at offset {} are not {what}): wrong device, or a copy of it? Give the device the run started on (if it was written through a cryptsetup mapping since, finish with `cryptsetup reencrypt --resume-only`); nothing was written",
                    at + (i * SECTOR) as u64
                )));
            }
        }
    }
    Ok(())
}

/// The size token for a run that gets no identity token ([`applies`] is false): the
/// data's length `end` at its start. `None` for a mode no token covers.
pub(crate) fn size_token(st: &ReencryptState, end: u64) -> Option<Token> {
    let mode = mode_name(st.mode).filter(|_| !applies(st))?;
    let mut extra = serde_json::Map::new();
    extra.insert("mode".into(), Value::String(mode.into()));
    extra.insert("data_bytes".into(), Value::String(end.to_string()));
    Some(Token {
        kind: SIZE_TOKEN_TYPE.into(),
        keyslots: Vec::new(),
        extra,
    })
}

/// Refuses a run whose size token records another data length than `end`, the one the
/// device gives now: shrunk, a moving decryption finished "over" the lost part and then
/// wiped its old end over plaintext (a trial lost 40 MB, reported done, as cryptsetup's
/// `--resume-only` does); grown, the new tail would be walked as data. Reads nothing.
pub(crate) fn check_size<'a>(
    tokens: impl IntoIterator<Item = &'a Token>,
    st: &ReencryptState,
    end: u64,
) -> Result<()> {
    let Some(mode) = mode_name(st.mode) else {
        return Ok(());
    };
    let was = tokens
        .into_iter()
        .filter(|t| t.kind == SIZE_TOKEN_TYPE)
        .filter(|t| t.extra.get("mode").and_then(Value::as_str) == Some(mode))
        .find_map(|t| t.extra.get("data_bytes")?.as_str()?.parse::<u64>().ok());
    match was {
        Some(was) if was != end => {
            let how = if end < was { "shrunk" } else { "grown" };
            Err(Error::Refused(format!(
                "the device holds {end} bytes of data, but the run started on {was}: it was {how} since (or it is another device); give it back its size ({} bytes in all), then resume (nothing was written)",
                st.layout.old_physical(0) + was
            )))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::{probe_offsets, walked, Progress, ReencryptDirection};

    #[test]
    fn walked_follows_the_direction_and_leaves_the_hotzone_open() {
        use ReencryptDirection::{Backward, Forward};
        let p = |hot_start, hot_len| Progress { hot_start, hot_len };
        // Forward, [0, 8192) done, hot [8192, 12288).
        assert_eq!(walked(Forward, p(8192, 4096), 4096, 4096), Some(true));
        assert_eq!(walked(Forward, p(8192, 4096), 8192, 512), None);
        assert_eq!(walked(Forward, p(8192, 4096), 12288, 4096), Some(false));
        // A probe across a clean edge is neither.
        assert_eq!(walked(Forward, p(6144, 0), 4096, 4096), None);
        // Backward, hot [8192, 12288), [12288, end) done.
        assert_eq!(walked(Backward, p(8192, 4096), 12288, 4096), Some(true));
        assert_eq!(walked(Backward, p(8192, 4096), 4096, 4096), Some(false));
        assert_eq!(walked(Backward, p(8192, 4096), 8192, 4096), None);
        // cryptsetup's --init-only of a backward run: nothing done; forward at its
        // dynamic end: all done.
        assert_eq!(walked(Backward, p(u64::MAX, 0), 1 << 40, 4096), Some(false));
        assert_eq!(walked(Forward, p(u64::MAX, 0), 1 << 40, 4096), Some(true));
    }

    #[test]
    fn probes_are_aligned_spread_and_inside_the_data() {
        assert!(probe_offsets(4095).is_empty());
        assert_eq!(probe_offsets(4096), vec![0]);
        assert_eq!(probe_offsets(3 * 4096 + 100), vec![0, 4096, 2 * 4096]);
        let end = 1u64 << 30;
        let v = probe_offsets(end);
        assert_eq!(v.len(), 5);
        assert_eq!(v[0], 0);
        assert_eq!(*v.last().unwrap(), end - 4096);
        assert!(v.iter().all(|o| o % 4096 == 0 && o + 4096 <= end));
        assert!(v.windows(2).all(|w| w[0] < w[1]));
    }
}
