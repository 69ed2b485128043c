use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use aes::{Aes128, Aes256, Block};
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::fmt;
use zeroize::{Zeroize, Zeroizing};

/// A volume key (both XTS halves), wiped on drop.
pub type KeyBytes = Zeroizing<Vec<u8>>;

/// Buffers at least this large are split across the rayon pool.
const PARALLEL_THRESHOLD: usize = 256 * 1024;
/// Work unit handed to one rayon task (rounded to whole sectors).
const PARALLEL_PIECE: usize = 128 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CipherError {
    #[error("unsupported cipher specification '{0}': luksify supports aes-xts-plain64, aes-xts-plain64be, aes-xts-plain and aes-xts-essiv:sha256")]
    UnsupportedSpec(String),
    #[error("AES-XTS key must be 32 or 64 bytes (256 or 512 bits), got {0} bytes")]
    BadKeyLength(usize),
    #[error("AES-XTS key rejected: its two halves are equal, which breaks XTS security; generate a fresh random key")]
    EqualKeyHalves,
    #[error("unsupported sector size {0}: use 512, 1024, 2048 or 4096")]
    BadSectorSize(usize),
    #[error("buffer of {len} bytes is not a whole number of {sector_size}-byte sectors")]
    PartialSector { len: usize, sector_size: usize },
}

/// Encryption sector size in bytes (512, 1024, 2048 or 4096).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SectorSize(u32);

impl SectorSize {
    pub const S512: SectorSize = SectorSize(512);
    pub const S4096: SectorSize = SectorSize(4096);

    pub fn new(bytes: usize) -> Result<Self, CipherError> {
        match bytes {
            512 | 1024 | 2048 | 4096 => Ok(SectorSize(bytes as u32)),
            other => Err(CipherError::BadSectorSize(other)),
        }
    }
    pub fn bytes(self) -> usize {
        self.0 as usize
    }
    /// How many 512-byte IV units one sector spans.
    pub fn iv_units(self) -> u64 {
        u64::from(self.0 / 512)
    }
}

/// IV generator of the cipher specification (`aes-xts-<ivgen>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IvGen {
    /// 32-bit little-endian sector number (wraps at 2^32).
    Plain,
    /// 64-bit little-endian sector number.
    Plain64,
    /// 64-bit big-endian sector number in the last 8 bytes.
    Plain64Be,
    /// AES-ECB(sha256(key), le64(sector)).
    EssivSha256,
}

impl IvGen {
    pub fn name(self) -> &'static str {
        match self {
            IvGen::Plain => "plain",
            IvGen::Plain64 => "plain64",
            IvGen::Plain64Be => "plain64be",
            IvGen::EssivSha256 => "essiv:sha256",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "plain" => IvGen::Plain,
            "plain64" => IvGen::Plain64,
            "plain64be" => IvGen::Plain64Be,
            "essiv:sha256" => IvGen::EssivSha256,
            _ => return None,
        })
    }
}

enum AesKey {
    K128(Box<Aes128>),
    K256(Box<Aes256>),
}

impl AesKey {
    fn new(key: &[u8]) -> Self {
        match key.len() {
            16 => AesKey::K128(Box::new(Aes128::new_from_slice(key).expect("16-byte key"))),
            32 => AesKey::K256(Box::new(Aes256::new_from_slice(key).expect("32-byte key"))),
            n => unreachable!("AES key length {n} checked by caller"),
        }
    }
    #[inline]
    fn encrypt_blocks(&self, blocks: &mut [Block]) {
        match self {
            AesKey::K128(c) => c.encrypt_blocks(blocks),
            AesKey::K256(c) => c.encrypt_blocks(blocks),
        }
    }
    #[inline]
    fn decrypt_blocks(&self, blocks: &mut [Block]) {
        match self {
            AesKey::K128(c) => c.decrypt_blocks(blocks),
            AesKey::K256(c) => c.decrypt_blocks(blocks),
        }
    }
}

/// AES-XTS keyed for one volume segment: encrypts and decrypts whole sectors in place.
pub struct SectorCipher {
    data: AesKey,
    tweak: AesKey,
    essiv: Option<Box<Aes256>>,
    iv: IvGen,
    sector: SectorSize,
    key_bits: usize,
}

impl fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("SectorCipher")
            .field("spec", &self.spec())
            .field("key_bits", &self.key_bits)
            .field("sector_size", &self.sector.bytes())
            .finish_non_exhaustive()
    }
}

impl SectorCipher {
    /// Parses a dm-crypt cipher specification such as `aes-xts-plain64`.
    pub fn parse_spec(spec: &str) -> Result<IvGen, CipherError> {
        spec.strip_prefix("aes-xts-")
            .and_then(IvGen::parse)
            .ok_or_else(|| CipherError::UnsupportedSpec(spec.to_string()))
    }

    /// Keys a cipher from a spec (`aes-xts-plain64`), the full XTS key (32 or 64 bytes)
    /// and the sector size.
    pub fn new(spec: &str, key: &[u8], sector_size: usize) -> Result<Self, CipherError> {
        let iv = Self::parse_spec(spec)?;
        Self::with_iv(iv, key, SectorSize::new(sector_size)?)
    }

    pub fn with_iv(iv: IvGen, key: &[u8], sector: SectorSize) -> Result<Self, CipherError> {
        if key.len() != 32 && key.len() != 64 {
            return Err(CipherError::BadKeyLength(key.len()));
        }
        let half = key.len() / 2;
        let (k1, k2) = key.split_at(half);
        if k1 == k2 {
            return Err(CipherError::EqualKeyHalves);
        }
        let essiv = if iv == IvGen::EssivSha256 {
            // dm-crypt's ESSIV salts with a hash of the whole cipher key.
            let mut salt: [u8; 32] = Sha256::digest(key).into();
            let c = Aes256::new_from_slice(&salt).expect("32-byte key");
            salt.zeroize();
            Some(Box::new(c))
        } else {
            None
        };
        Ok(SectorCipher {
            data: AesKey::new(k1),
            tweak: AesKey::new(k2),
            essiv,
            iv,
            sector,
            key_bits: key.len() * 8,
        })
    }

    pub fn sector_size(&self) -> usize {
        self.sector.bytes()
    }
    pub fn key_bits(&self) -> usize {
        self.key_bits
    }
    pub fn spec(&self) -> String {
        format!("aes-xts-{}", self.iv.name())
    }

    /// Encrypts `buf` (whole sectors) in place. `iv_sector` is the IV of the first
    /// sector in 512-byte units (byte offset in the segment / 512 + iv_tweak); each
    /// following sector advances it by sector_size / 512. Large buffers run in parallel.
    pub fn encrypt(&self, buf: &mut [u8], iv_sector: u64) -> Result<(), CipherError> {
        self.run(buf, iv_sector, true, buf.len() >= PARALLEL_THRESHOLD)
    }

    /// Decrypts `buf` (whole sectors) in place; see [`SectorCipher::encrypt`].
    pub fn decrypt(&self, buf: &mut [u8], iv_sector: u64) -> Result<(), CipherError> {
        self.run(buf, iv_sector, false, buf.len() >= PARALLEL_THRESHOLD)
    }

    /// Like [`SectorCipher::encrypt`] but always on the calling thread.
    pub fn encrypt_serial(&self, buf: &mut [u8], iv_sector: u64) -> Result<(), CipherError> {
        self.run(buf, iv_sector, true, false)
    }

    /// Like [`SectorCipher::decrypt`] but always on the calling thread.
    pub fn decrypt_serial(&self, buf: &mut [u8], iv_sector: u64) -> Result<(), CipherError> {
        self.run(buf, iv_sector, false, false)
    }

    fn run(
        &self,
        buf: &mut [u8],
        iv_sector: u64,
        enc: bool,
        parallel: bool,
    ) -> Result<(), CipherError> {
        let ss = self.sector.bytes();
        if buf.len() % ss != 0 {
            return Err(CipherError::PartialSector {
                len: buf.len(),
                sector_size: ss,
            });
        }
        let units = self.sector.iv_units();
        if parallel {
            let piece = PARALLEL_PIECE.max(ss) / ss * ss;
            let per_piece_iv = (piece / ss) as u64 * units;
            buf.par_chunks_mut(piece)
                .enumerate()
                .for_each(|(i, chunk)| {
                    self.sectors(chunk, iv_sector.wrapping_add(i as u64 * per_piece_iv), enc)
                });
        } else {
            self.sectors(buf, iv_sector, enc);
        }
        Ok(())
    }

    fn sectors(&self, buf: &mut [u8], mut iv_sector: u64, enc: bool) {
        let units = self.sector.iv_units();
        let nblocks = self.sector.bytes() / 16;
        let mut tweaks = [0u128; 4096 / 16];
        let tweaks = &mut tweaks[..nblocks];
        for sector in buf.chunks_exact_mut(self.sector.bytes()) {
            let mut t = Block::from(self.iv_block(iv_sector));
            self.tweak.encrypt_blocks(std::slice::from_mut(&mut t));
            let mut t = u128::from_le_bytes(t.into());
            for slot in tweaks.iter_mut() {
                *slot = t;
                // Multiply by alpha in GF(2^128), little-endian convention of IEEE 1619.
                t = (t << 1) ^ (0x87 * (t >> 127));
            }
            xor_tweaks(sector, tweaks);
            let (blocks, rest) = Block::slice_as_chunks_mut(sector);
            debug_assert!(rest.is_empty());
            if enc {
                self.data.encrypt_blocks(blocks);
            } else {
                self.data.decrypt_blocks(blocks);
            }
            xor_tweaks(sector, tweaks);
            iv_sector = iv_sector.wrapping_add(units);
        }
        tweaks.zeroize();
    }

    fn iv_block(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match self.iv {
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Plain64Be => iv[8..].copy_from_slice(&sector.to_be_bytes()),
            IvGen::EssivSha256 => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                let mut b = Block::from(iv);
                self.essiv
                    .as_ref()
                    .expect("essiv cipher present for essiv IV")
                    .encrypt_blocks(std::slice::from_mut(&mut b));
                iv = b.into();
            }
        }
        iv
    }
}

#[inline]
fn xor_tweaks(sector: &mut [u8], tweaks: &[u128]) {
    for (block, t) in sector.chunks_exact_mut(16).zip(tweaks) {
        let v = u128::from_le_bytes(block.try_into().expect("16-byte block")) ^ t;
        block.copy_from_slice(&v.to_le_bytes());
    }
}
