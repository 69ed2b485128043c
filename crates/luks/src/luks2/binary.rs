//! The 4096-byte binary LUKS2 header (big-endian), one per metadata copy.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};

/// Size of the binary header that precedes each JSON area.
pub const BINARY_HEADER_SIZE: usize = 4096;
/// Magic of the primary copy.
pub const MAGIC_PRIMARY: [u8; 6] = *b"LUKS\xba\xbe";
/// Magic of the secondary copy.
pub const MAGIC_SECONDARY: [u8; 6] = *b"SKUL\xba\xbe";
/// Every metadata size (binary header + JSON area) LUKS2 allows; the secondary
/// copy starts at this offset, so it is also every place the secondary may be.
pub const METADATA_SIZES: [u64; 9] = [
    0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x10_0000, 0x20_0000, 0x40_0000,
];

const LABEL_LEN: usize = 48;
const CSUM_ALG_LEN: usize = 32;
const SALT_LEN: usize = 64;
const UUID_LEN: usize = 40;
const SUBSYSTEM_LEN: usize = 48;
const CSUM_LEN: usize = 64;
const OFF_CSUM: usize = 448;

/// Which of the two metadata copies a binary header belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copy {
    Primary,
    Secondary,
}

impl Copy {
    pub fn magic(self) -> [u8; 6] {
        match self {
            Copy::Primary => MAGIC_PRIMARY,
            Copy::Secondary => MAGIC_SECONDARY,
        }
    }
}

/// A NUL-terminated text field of the binary header (label, subsystem), kept as its
/// bytes: cryptsetup stores what it is given cut to 47 bytes, which need not be UTF-8
/// (a multi-byte character cut in two, a Latin-1 label), and opens such a volume; a
/// rewrite of the header keeps the bytes as they were.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct FieldText(Vec<u8>);

impl FieldText {
    /// `s` as cryptsetup stores it in a 48-byte field: its first 47 bytes.
    pub fn cut(s: &str) -> FieldText {
        let b = s.as_bytes();
        FieldText(b[..b.len().min(LABEL_LEN - 1)].to_vec())
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<&str> for FieldText {
    fn from(s: &str) -> FieldText {
        FieldText(s.as_bytes().to_vec())
    }
}

impl From<String> for FieldText {
    fn from(s: String) -> FieldText {
        FieldText(s.into_bytes())
    }
}

impl PartialEq<&str> for FieldText {
    fn eq(&self, other: &&str) -> bool {
        self.0 == other.as_bytes()
    }
}

/// The text, with bytes that are not UTF-8 shown as U+FFFD.
impl std::fmt::Display for FieldText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

impl std::fmt::Debug for FieldText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

/// Decoded binary header. Strings are the NUL-terminated text of their field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BinaryHeader {
    pub copy: Copy,
    /// Metadata size of one copy: binary header plus JSON area.
    pub hdr_size: u64,
    pub seqid: u64,
    pub label: FieldText,
    pub checksum_alg: String,
    pub salt: [u8; SALT_LEN],
    pub uuid: String,
    pub subsystem: FieldText,
    /// Offset of this copy from the start of the device (0 or hdr_size).
    pub hdr_offset: u64,
    pub csum: [u8; CSUM_LEN],
}

fn be_u64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Text of a NUL-terminated fixed field: up to its first NUL within all but its last
/// byte, which is ignored, as cryptsetup copies `len - 1` bytes (a label filling all
/// 48 bytes was refused, "not NUL-terminated", where cryptsetup opens the volume).
fn cbytes(b: &[u8]) -> &[u8] {
    let b = &b[..b.len() - 1];
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}

fn cstr(b: &[u8], field: &str) -> Result<String> {
    String::from_utf8(cbytes(b).to_vec())
        .map_err(|_| Error::corrupt(format!("binary header field {field} is not UTF-8")))
}

fn put_cstr(dst: &mut [u8], s: impl AsRef<[u8]>, field: &str) -> Result<()> {
    let s = s.as_ref();
    if s.len() >= dst.len() || s.contains(&0) {
        return Err(Error::InvalidArgument(format!(
            "{field} must be shorter than {} bytes and contain no NUL",
            dst.len()
        )));
    }
    dst[..s.len()].copy_from_slice(s);
    Ok(())
}

/// Is `size` one of the allowed LUKS2 metadata sizes?
pub fn is_valid_metadata_size(size: u64) -> bool {
    METADATA_SIZES.contains(&size)
}

impl BinaryHeader {
    /// Decodes a binary header and checks what can be checked without the JSON
    /// area: magic, version, metadata size, offset, and field termination.
    pub fn parse(b: &[u8; BINARY_HEADER_SIZE]) -> Result<BinaryHeader> {
        let copy = match b[..6].try_into().expect("6 bytes") {
            MAGIC_PRIMARY => Copy::Primary,
            MAGIC_SECONDARY => Copy::Secondary,
            _ => return Err(Error::NotLuks),
        };
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 2 {
            return Err(Error::UnsupportedVersion(version));
        }
        let hdr_size = be_u64(b, 8);
        if !is_valid_metadata_size(hdr_size) {
            return Err(Error::corrupt(format!(
                "metadata size {hdr_size} is not one of the LUKS2 sizes (16 KiB .. 4 MiB, powers of two)"
            )));
        }
        let hdr_offset = be_u64(b, 256);
        let expected_offset = match copy {
            Copy::Primary => 0,
            Copy::Secondary => hdr_size,
        };
        if hdr_offset != expected_offset {
            return Err(Error::corrupt(format!(
                "{copy:?} header claims offset {hdr_offset}, expected {expected_offset}"
            )));
        }
        let checksum_alg = cstr(&b[72..72 + CSUM_ALG_LEN], "checksum_alg")?;
        Ok(BinaryHeader {
            copy,
            hdr_size,
            seqid: be_u64(b, 16),
            label: FieldText(cbytes(&b[24..24 + LABEL_LEN]).to_vec()),
            checksum_alg,
            salt: b[104..104 + SALT_LEN].try_into().expect("64 bytes"),
            uuid: cstr(&b[168..168 + UUID_LEN], "uuid")?,
            subsystem: FieldText(cbytes(&b[208..208 + SUBSYSTEM_LEN]).to_vec()),
            hdr_offset,
            csum: b[OFF_CSUM..OFF_CSUM + CSUM_LEN]
                .try_into()
                .expect("64 bytes"),
        })
    }

    /// Encodes the header with the checksum field as stored in `self.csum`.
    pub fn encode(&self) -> Result<Box<[u8; BINARY_HEADER_SIZE]>> {
        let mut b = Box::new([0u8; BINARY_HEADER_SIZE]);
        b[..6].copy_from_slice(&self.copy.magic());
        b[6..8].copy_from_slice(&2u16.to_be_bytes());
        b[8..16].copy_from_slice(&self.hdr_size.to_be_bytes());
        b[16..24].copy_from_slice(&self.seqid.to_be_bytes());
        put_cstr(&mut b[24..24 + LABEL_LEN], self.label.as_bytes(), "label")?;
        put_cstr(
            &mut b[72..72 + CSUM_ALG_LEN],
            &self.checksum_alg,
            "checksum algorithm",
        )?;
        b[104..104 + SALT_LEN].copy_from_slice(&self.salt);
        put_cstr(&mut b[168..168 + UUID_LEN], &self.uuid, "uuid")?;
        put_cstr(
            &mut b[208..208 + SUBSYSTEM_LEN],
            self.subsystem.as_bytes(),
            "subsystem",
        )?;
        b[256..264].copy_from_slice(&self.hdr_offset.to_be_bytes());
        b[OFF_CSUM..OFF_CSUM + CSUM_LEN].copy_from_slice(&self.csum);
        Ok(b)
    }
}

/// The LUKS2 header checksum: sha256 over the binary header with its checksum
/// field zeroed, followed by the whole JSON area (including zero padding).
/// Returned zero-padded to the 64-byte field.
pub fn checksum(binary: &[u8; BINARY_HEADER_SIZE], json_area: &[u8]) -> [u8; CSUM_LEN] {
    let mut zeroed = *binary;
    zeroed[OFF_CSUM..OFF_CSUM + CSUM_LEN].fill(0);
    let mut h = Sha256::new();
    h.update(zeroed);
    h.update(json_area);
    let mut out = [0u8; CSUM_LEN];
    out[..32].copy_from_slice(&h.finalize());
    out
}
