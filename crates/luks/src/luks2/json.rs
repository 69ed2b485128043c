//! Typed model of the LUKS2 JSON metadata area.
//!
//! Every object keeps the fields it does not know in an `extra` map (serde
//! flatten), and unknown keyslot, segment, digest and token types are kept as
//! raw JSON, so a read-modify-write never drops what another tool wrote.
//! 64-bit quantities are JSON strings on disk (`"16777216"`); binary values are
//! base64.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Fields of an object this model does not name, kept verbatim.
pub type Extra = Map<String, Value>;

/// The whole JSON metadata object.
#[derive(Clone, Debug, PartialEq)]
pub struct Metadata {
    pub keyslots: BTreeMap<u32, Keyslot>,
    pub tokens: BTreeMap<u32, Token>,
    pub segments: BTreeMap<u32, Segment>,
    pub digests: BTreeMap<u32, Digest>,
    pub config: Config,
    /// Top-level members other than the five above, kept verbatim.
    pub extra: Extra,
}

// Written by hand: serde's `flatten` buffers keys as strings and then cannot
// turn "0" into the u32 keys of the maps above.
impl Serialize for Metadata {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(5 + self.extra.len()))?;
        m.serialize_entry("keyslots", &self.keyslots)?;
        m.serialize_entry("tokens", &self.tokens)?;
        m.serialize_entry("segments", &self.segments)?;
        m.serialize_entry("digests", &self.digests)?;
        m.serialize_entry("config", &self.config)?;
        for (k, v) in &self.extra {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{DeserializeOwned, Error};
        fn take<T: DeserializeOwned, E: Error>(m: &mut Extra, key: &str) -> Result<T, E> {
            let v = m
                .remove(key)
                .ok_or_else(|| E::custom(format!("missing '{key}' object")))?;
            if !v.is_object() {
                return Err(E::custom(format!("'{key}' is not an object")));
            }
            serde_json::from_value(v).map_err(|e| E::custom(format!("{key}: {e}")))
        }
        let mut m = Extra::deserialize(d)?;
        Ok(Metadata {
            keyslots: take(&mut m, "keyslots")?,
            tokens: take(&mut m, "tokens")?,
            segments: take(&mut m, "segments")?,
            digests: take(&mut m, "digests")?,
            config: take(&mut m, "config")?,
            extra: m,
        })
    }
}

/// Serde helpers for 64-bit numbers stored as decimal strings.
pub mod u64_str {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).ok_or_else(|| D::Error::custom(format!("'{s}' is not a decimal u64 string")))
    }
    /// Strict: only ASCII digits, no sign, no whitespace, no overflow.
    pub fn parse(s: &str) -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    }
}

/// Serde helper for base64 byte strings.
pub mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map_err(|e| D::Error::custom(format!("bad base64: {e}")))
    }
}

/// Lists of object ids are arrays of decimal strings (`["0", "1"]`).
mod id_list {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u32], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|i| i.to_string()))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        v.iter()
            .map(|s| {
                super::u64_str::parse(s)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| D::Error::custom(format!("'{s}' is not an object id")))
            })
            .collect()
    }
}

/// Generates Serialize/Deserialize for an enum whose variants are chosen by the
/// JSON `type` field, with an `Unknown` variant that keeps the raw object.
macro_rules! typed_object {
    ($name:ident { $($tag:literal => $variant:ident($inner:ty)),+ $(,)? }
     $(unusable $utag:literal => $uvar:ident)?) => {
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::Error;
                let (tag, body) = match self {
                    $($name::$variant(v) => ($tag, serde_json::to_value(v).map_err(S::Error::custom)?),)+
                    $name::Unknown(m) => return m.serialize(s),
                    $($name::$uvar { raw, .. } => return raw.serialize(s),)?
                };
                let mut out = Map::new();
                out.insert("type".into(), Value::String(tag.into()));
                if let Value::Object(m) = body {
                    out.extend(m);
                }
                out.serialize(s)
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                use serde::de::Error;
                let mut m = Map::deserialize(d)?;
                // The type whose objects that fail to parse are kept as unusable, if any.
                let lenient: Option<&str> = None $(.or(Some($utag)))?;
                let unusable = |raw: Map<String, Value>, reason: String| -> Option<$name> {
                    let _ = (&raw, &reason);
                    None $(.or(Some($name::$uvar { raw, reason })))?
                };
                let tag = match m.get("type") {
                    Some(Value::String(t)) => t.clone(),
                    _ => return Err(D::Error::custom(concat!(stringify!($name), " has no string 'type'"))),
                };
                match tag.as_str() {
                    $($tag => {
                        let raw = m.clone();
                        m.remove("type");
                        match serde_json::from_value(Value::Object(m)) {
                            Ok(v) => Ok($name::$variant(v)),
                            Err(e) => {
                                if lenient == Some($tag) {
                                    if let Some(k) = unusable(raw, e.to_string()) {
                                        return Ok(k);
                                    }
                                }
                                Err(D::Error::custom(format!("{} of type {}: {e}", stringify!($name), $tag)))
                            }
                        }
                    })+
                    _ => Ok($name::Unknown(m)),
                }
            }
        }
    };
}

// ---------------------------------------------------------------- keyslots

/// A keyslot object.
// Keyslots are few and short-lived; boxing the big variant would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Keyslot {
    /// `type: luks2`: a passphrase-protected copy of the volume key.
    Luks2(Luks2Keyslot),
    /// `type: reencrypt`: the reencryption state keyslot (no key material).
    Reencrypt(ReencryptKeyslot),
    /// Any other type, kept verbatim (including its `type`).
    Unknown(Extra),
    /// A `luks2` keyslot that does not parse or is out of range (priority 7, a salt
    /// that is not base64, 0 stripes, ...): kept verbatim and never tried, so that one
    /// damaged keyslot does not lock out the others, as in cryptsetup, which opens
    /// the volume with any other keyslot.
    Unusable { raw: Extra, reason: String },
}
typed_object!(Keyslot { "luks2" => Luks2(Luks2Keyslot), "reencrypt" => Reencrypt(ReencryptKeyslot) }
    unusable "luks2" => Unusable);

impl Keyslot {
    /// The keyslot area `(offset, size)` in bytes from the device start, if the type has one.
    pub fn area_range(&self) -> Option<(u64, u64)> {
        match self {
            Keyslot::Luks2(k) => Some((k.area.offset, k.area.size)),
            Keyslot::Reencrypt(k) => Some((k.area.offset(), k.area.size())),
            Keyslot::Unknown(m) | Keyslot::Unusable { raw: m, .. } => {
                let a = m.get("area")?.as_object()?;
                Some((
                    u64_str::parse(a.get("offset")?.as_str()?)?,
                    u64_str::parse(a.get("size")?.as_str()?)?,
                ))
            }
        }
    }
}

impl Keyslot {
    /// Turns a parsed `luks2` keyslot whose fields are out of range into
    /// [`Keyslot::Unusable`] (done on read; a keyslot luksify writes must be right).
    pub fn demote_if_unusable(&mut self) {
        if let Keyslot::Luks2(k) = self {
            if let Some(reason) = k.problem() {
                if let Ok(Value::Object(mut raw)) = serde_json::to_value(&*k) {
                    raw.insert("type".into(), Value::String("luks2".into()));
                    *self = Keyslot::Unusable { raw, reason };
                }
            }
        }
    }
}

/// Keyslot priority: 0 ignore (only tried when named), 1 normal, 2 preferred.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub enum Priority {
    Ignore,
    Normal,
    Prefer,
}

impl TryFrom<i64> for Priority {
    type Error = String;
    fn try_from(v: i64) -> Result<Self, String> {
        match v {
            0 => Ok(Priority::Ignore),
            1 => Ok(Priority::Normal),
            2 => Ok(Priority::Prefer),
            _ => Err(format!("keyslot priority {v} is not 0, 1 or 2")),
        }
    }
}
impl From<Priority> for i64 {
    fn from(p: Priority) -> i64 {
        match p {
            Priority::Ignore => 0,
            Priority::Normal => 1,
            Priority::Prefer => 2,
        }
    }
}

/// A `luks2` keyslot: AF-split volume key, encrypted in `area`, keyed by `kdf`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Luks2Keyslot {
    /// Volume key size in bytes.
    pub key_size: u32,
    pub af: AntiForensic,
    pub area: RawArea,
    pub kdf: Kdf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// The anti-forensic splitter (`type: luks1` is the only one defined).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AntiForensic {
    #[serde(rename = "type")]
    pub kind: String,
    pub stripes: u32,
    pub hash: String,
    #[serde(flatten)]
    pub extra: Extra,
}

/// A `raw` keyslot area: where the encrypted split key lives and how it is encrypted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RawArea {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(with = "u64_str")]
    pub offset: u64,
    #[serde(with = "u64_str")]
    pub size: u64,
    /// Cipher spec of the area, e.g. `aes-xts-plain64`.
    pub encryption: String,
    /// Area key size in bytes.
    pub key_size: u32,
    #[serde(flatten)]
    pub extra: Extra,
}

/// Key derivation function of a keyslot.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Kdf {
    Pbkdf2 {
        hash: String,
        iterations: u32,
        #[serde(with = "b64")]
        salt: Vec<u8>,
    },
    Argon2i {
        time: u32,
        /// KiB.
        memory: u32,
        cpus: u32,
        #[serde(with = "b64")]
        salt: Vec<u8>,
    },
    Argon2id {
        time: u32,
        /// KiB.
        memory: u32,
        cpus: u32,
        #[serde(with = "b64")]
        salt: Vec<u8>,
    },
}

impl std::fmt::Debug for Kdf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Salts are not secret, but keep Debug output short and uniform.
        match self {
            Kdf::Pbkdf2 {
                hash, iterations, ..
            } => write!(f, "pbkdf2({hash}, {iterations} iterations)"),
            Kdf::Argon2i {
                time, memory, cpus, ..
            } => write!(f, "argon2i(time {time}, {memory} KiB, {cpus} cpus)"),
            Kdf::Argon2id {
                time, memory, cpus, ..
            } => write!(f, "argon2id(time {time}, {memory} KiB, {cpus} cpus)"),
        }
    }
}

/// The `reencrypt` keyslot: reencryption mode, direction and resilience area.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReencryptKeyslot {
    /// Always 1 (the keyslot holds no key).
    pub key_size: u32,
    pub mode: ReencryptMode,
    pub direction: ReencryptDirection,
    pub area: ReencryptArea,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReencryptMode {
    Reencrypt,
    Encrypt,
    Decrypt,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReencryptDirection {
    Forward,
    Backward,
}

/// Resilience area of a reencrypt keyslot (`area.type`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ReencryptArea {
    /// No protection of the hotzone.
    None {
        #[serde(with = "u64_str")]
        offset: u64,
        #[serde(with = "u64_str")]
        size: u64,
    },
    /// Per-sector checksums of the hotzone's old contents.
    Checksum {
        #[serde(with = "u64_str")]
        offset: u64,
        #[serde(with = "u64_str")]
        size: u64,
        hash: String,
        sector_size: u32,
    },
    /// A full copy of the hotzone.
    Journal {
        #[serde(with = "u64_str")]
        offset: u64,
        #[serde(with = "u64_str")]
        size: u64,
    },
    /// Data shifted by `shift_size` bytes.
    Datashift {
        #[serde(with = "u64_str")]
        offset: u64,
        #[serde(with = "u64_str")]
        size: u64,
        #[serde(with = "u64_str")]
        shift_size: u64,
    },
    /// Datashift whose moved segment is protected by checksums.
    DatashiftChecksum {
        #[serde(with = "u64_str")]
        offset: u64,
        #[serde(with = "u64_str")]
        size: u64,
        hash: String,
        sector_size: u32,
        #[serde(with = "u64_str")]
        shift_size: u64,
    },
    /// Datashift whose moved segment is protected by a journal copy.
    DatashiftJournal {
        #[serde(with = "u64_str")]
        offset: u64,
        #[serde(with = "u64_str")]
        size: u64,
        #[serde(with = "u64_str")]
        shift_size: u64,
    },
}

impl ReencryptArea {
    pub fn offset(&self) -> u64 {
        match self {
            ReencryptArea::None { offset, .. }
            | ReencryptArea::Checksum { offset, .. }
            | ReencryptArea::Journal { offset, .. }
            | ReencryptArea::Datashift { offset, .. }
            | ReencryptArea::DatashiftChecksum { offset, .. }
            | ReencryptArea::DatashiftJournal { offset, .. } => *offset,
        }
    }
    pub fn size(&self) -> u64 {
        match self {
            ReencryptArea::None { size, .. }
            | ReencryptArea::Checksum { size, .. }
            | ReencryptArea::Journal { size, .. }
            | ReencryptArea::Datashift { size, .. }
            | ReencryptArea::DatashiftChecksum { size, .. }
            | ReencryptArea::DatashiftJournal { size, .. } => *size,
        }
    }
}

// ---------------------------------------------------------------- segments

/// Segment flag: the segment currently being reencrypted.
pub const FLAG_IN_REENCRYPTION: &str = "in-reencryption";
/// Segment flag: the old (pre-reencryption) layout.
pub const FLAG_BACKUP_PREVIOUS: &str = "backup-previous";
/// Segment flag: the final (post-reencryption) layout.
pub const FLAG_BACKUP_FINAL: &str = "backup-final";
/// Segment flag: the data moved by a datashift.
pub const FLAG_BACKUP_MOVED_SEGMENT: &str = "backup-moved-segment";

/// A segment object.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Segment {
    Crypt(CryptSegment),
    Linear(LinearSegment),
    Unknown(Extra),
}
typed_object!(Segment { "crypt" => Crypt(CryptSegment), "linear" => Linear(LinearSegment) });

/// Segment length: a byte count or `"dynamic"` (to the end of the device).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentSize {
    Dynamic,
    Bytes(u64),
}

impl Serialize for SegmentSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            SegmentSize::Dynamic => s.serialize_str("dynamic"),
            SegmentSize::Bytes(n) => s.serialize_str(&n.to_string()),
        }
    }
}
impl<'de> Deserialize<'de> for SegmentSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let s = String::deserialize(d)?;
        if s == "dynamic" {
            return Ok(SegmentSize::Dynamic);
        }
        u64_str::parse(&s).map(SegmentSize::Bytes).ok_or_else(|| {
            D::Error::custom(format!(
                "segment size '{s}' is neither 'dynamic' nor a decimal string"
            ))
        })
    }
}

/// A `crypt` segment: dm-crypt mapping of `[offset, offset+size)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CryptSegment {
    /// Bytes from the device start.
    #[serde(with = "u64_str")]
    pub offset: u64,
    pub size: SegmentSize,
    /// Added to the IV (in 512-byte units).
    #[serde(with = "u64_str")]
    pub iv_tweak: u64,
    /// Cipher spec, e.g. `aes-xts-plain64`.
    pub encryption: String,
    pub sector_size: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integrity: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<Vec<String>>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// A `linear` segment: plaintext mapping (used during encryption/decryption).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinearSegment {
    #[serde(with = "u64_str")]
    pub offset: u64,
    pub size: SegmentSize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<Vec<String>>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl Segment {
    /// Byte offset from the device start, if the type has one.
    pub fn offset(&self) -> Option<u64> {
        match self {
            Segment::Crypt(c) => Some(c.offset),
            Segment::Linear(l) => Some(l.offset),
            Segment::Unknown(m) => m.get("offset")?.as_str().and_then(u64_str::parse),
        }
    }
    /// Segment size, if the type has one.
    pub fn size(&self) -> Option<SegmentSize> {
        match self {
            Segment::Crypt(c) => Some(c.size),
            Segment::Linear(l) => Some(l.size),
            Segment::Unknown(m) => serde_json::from_value(m.get("size")?.clone()).ok(),
        }
    }
    /// Segment flags (empty when absent).
    pub fn flags(&self) -> Vec<String> {
        match self {
            Segment::Crypt(c) => c.flags.clone().unwrap_or_default(),
            Segment::Linear(l) => l.flags.clone().unwrap_or_default(),
            Segment::Unknown(m) => m
                .get("flags")
                .and_then(|f| serde_json::from_value(f.clone()).ok())
                .unwrap_or_default(),
        }
    }
    /// Does this segment carry `flag`?
    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags().iter().any(|f| f == flag)
    }
    /// A backup segment (`backup-*` flag) describes reencryption state, not live data.
    pub fn is_backup(&self) -> bool {
        self.flags().iter().any(|f| f.starts_with("backup-"))
    }
}

// ---------------------------------------------------------------- digests

/// A digest object: verifies volume keys for the listed keyslots and segments.
#[derive(Clone, Debug, PartialEq)]
pub enum Digest {
    Pbkdf2(Pbkdf2Digest),
    Unknown(Extra),
}
typed_object!(Digest { "pbkdf2" => Pbkdf2(Pbkdf2Digest) });

/// `type: pbkdf2` digest: PBKDF2(volume key, salt, iterations) == digest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pbkdf2Digest {
    #[serde(with = "id_list")]
    pub keyslots: Vec<u32>,
    #[serde(with = "id_list")]
    pub segments: Vec<u32>,
    pub hash: String,
    pub iterations: u32,
    #[serde(with = "b64")]
    pub salt: Vec<u8>,
    #[serde(with = "b64")]
    pub digest: Vec<u8>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl Digest {
    /// Keyslots this digest covers.
    pub fn keyslots(&self) -> Vec<u32> {
        match self {
            Digest::Pbkdf2(d) => d.keyslots.clone(),
            Digest::Unknown(m) => ids_of(m, "keyslots"),
        }
    }
    /// Segments this digest covers.
    pub fn segments(&self) -> Vec<u32> {
        match self {
            Digest::Pbkdf2(d) => d.segments.clone(),
            Digest::Unknown(m) => ids_of(m, "segments"),
        }
    }
}

fn ids_of(m: &Extra, key: &str) -> Vec<u32> {
    m.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().and_then(u64_str::parse))
                .filter_map(|n| u32::try_from(n).ok())
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------- tokens

/// A token: any type, kept verbatim apart from `type` and `keyslots`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Token {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(with = "id_list")]
    pub keyslots: Vec<u32>,
    #[serde(flatten)]
    pub extra: Extra,
}

// ---------------------------------------------------------------- config

/// The `config` object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// JSON area size (metadata size minus the 4 KiB binary header).
    #[serde(with = "u64_str")]
    pub json_size: u64,
    /// Size of the keyslots area that follows both metadata copies.
    #[serde(with = "u64_str")]
    pub keyslots_size: u64,
    /// Persistent activation flags (e.g. `allow-discards`), kept verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requirements: Option<Requirements>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// Requirement name set while an online reencryption (v2) is in progress.
pub const REQUIREMENT_ONLINE_REENCRYPT_V2: &str = "online-reencrypt-v2";

/// `config.requirements`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Requirements {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mandatory: Option<Vec<String>>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl Config {
    /// Mandatory requirements (empty when absent).
    pub fn mandatory_requirements(&self) -> Vec<String> {
        self.requirements
            .as_ref()
            .and_then(|r| r.mandatory.clone())
            .unwrap_or_default()
    }
}
