use crate::tweak::TweakBackend;
use aes::cipher::consts::U16;
use aes::cipher::typenum::Unsigned;
use aes::cipher::{
    BlockCipherDecBackend, BlockCipherDecClosure, BlockCipherDecrypt, BlockCipherEncBackend,
    BlockCipherEncClosure, BlockCipherEncrypt, BlockSizeUser, KeyInit,
};
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
/// Bytes whitened, enciphered and whitened again per round. The aes crate pipelines only
/// whole groups of its backend's width (64 blocks = 1 KiB with VAES-512) and does any
/// remainder one block at a time, so several small sectors go through one call; 8 KiB
/// (data plus its tweaks) stays well inside L1.
const BATCH_BYTES: usize = 8192;
/// Sectors whose IVs are encrypted (to first tweaks) by one call on the tweak key.
const IV_GROUP: usize = 64;
/// Widest pipeline any aes backend uses (VAES-512); wider ones simply skip padding.
const MAX_PAR_BLOCKS: usize = 64;
/// A remainder shorter than this goes block by block rather than padded to a full pipeline.
const PAD_MIN_BLOCKS: usize = 4;

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
    #[error("segment offset {offset} is not a multiple of the {sector_size}-byte sector size")]
    MisalignedOffset { offset: u64, sector_size: usize },
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

enum AesKind {
    K128(Box<Aes128>),
    K256(Box<Aes256>),
}

/// One AES key schedule plus the pipeline widths its run-time backend uses.
struct AesKey {
    kind: AesKind,
    enc_par: usize,
    dec_par: usize,
}

/// Reads the pipeline width (`ParBlocksSize`) of the backend aes picked at run time.
struct ParBlocksProbe<'a>(&'a mut usize);

impl BlockSizeUser for ParBlocksProbe<'_> {
    type BlockSize = U16;
}

impl BlockCipherEncClosure for ParBlocksProbe<'_> {
    fn call<B: BlockCipherEncBackend<BlockSize = U16>>(self, _backend: &B) {
        *self.0 = B::ParBlocksSize::USIZE;
    }
}

impl BlockCipherDecClosure for ParBlocksProbe<'_> {
    fn call<B: BlockCipherDecBackend<BlockSize = U16>>(self, _backend: &B) {
        *self.0 = B::ParBlocksSize::USIZE;
    }
}

impl AesKey {
    fn new(key: &[u8]) -> Self {
        let kind = match key.len() {
            16 => AesKind::K128(Box::new(Aes128::new_from_slice(key).expect("16-byte key"))),
            32 => AesKind::K256(Box::new(Aes256::new_from_slice(key).expect("32-byte key"))),
            n => unreachable!("AES key length {n} checked by caller"),
        };
        let (mut enc_par, mut dec_par) = (1, 1);
        match &kind {
            AesKind::K128(c) => {
                c.encrypt_with_backend(ParBlocksProbe(&mut enc_par));
                c.decrypt_with_backend(ParBlocksProbe(&mut dec_par));
            }
            AesKind::K256(c) => {
                c.encrypt_with_backend(ParBlocksProbe(&mut enc_par));
                c.decrypt_with_backend(ParBlocksProbe(&mut dec_par));
            }
        }
        AesKey {
            kind,
            enc_par,
            dec_par,
        }
    }

    #[inline]
    fn encrypt_blocks(&self, blocks: &mut [Block]) {
        match &self.kind {
            AesKind::K128(c) => c.encrypt_blocks(blocks),
            AesKind::K256(c) => c.encrypt_blocks(blocks),
        }
    }

    #[inline]
    fn decrypt_blocks(&self, blocks: &mut [Block]) {
        match &self.kind {
            AesKind::K128(c) => c.decrypt_blocks(blocks),
            AesKind::K256(c) => c.decrypt_blocks(blocks),
        }
    }

    /// Encrypts (`enc`) or decrypts `blocks` so that every block is pipelined: a
    /// remainder shorter than the backend's width is padded to a full pipeline in a
    /// scratch buffer instead of going one latency-bound block at a time.
    fn crypt_pipelined(&self, blocks: &mut [Block], enc: bool) {
        let par = if enc { self.enc_par } else { self.dec_par };
        let tail = blocks.len() % par;
        let full = blocks.len() - tail;
        let run = |b: &mut [Block]| {
            if enc {
                self.encrypt_blocks(b)
            } else {
                self.decrypt_blocks(b)
            }
        };
        if full > 0 {
            run(&mut blocks[..full]);
        }
        if tail == 0 {
            return;
        }
        if tail < PAD_MIN_BLOCKS || par > MAX_PAR_BLOCKS {
            run(&mut blocks[full..]);
            return;
        }
        let mut scratch = [Block::default(); MAX_PAR_BLOCKS];
        scratch[..tail].copy_from_slice(&blocks[full..]);
        run(&mut scratch[..par]);
        blocks[full..].copy_from_slice(&scratch[..tail]);
        Block::slice_as_flattened_mut(&mut scratch[..par]).zeroize();
    }
}

/// AES-XTS keyed for one volume segment: encrypts and decrypts whole sectors in place.
///
/// Holds only expanded key schedules (wiped on drop by `aes`'s `zeroize` feature); the
/// caller's key bytes are not kept.
pub struct SectorCipher {
    data: AesKey,
    tweak: AesKey,
    /// ESSIV only: AES-256 keyed with sha256(whole XTS key), encrypting le64(sector).
    essiv: Option<AesKey>,
    iv: IvGen,
    sector: SectorSize,
    key_bits: usize,
    tweaks: TweakBackend,
    /// A fused kernel (VAES + AVX-512, else VAES + AVX2, else AES-NI), when this CPU has
    /// one (else the `encrypt_blocks` path).
    #[cfg(target_arch = "x86_64")]
    fused: Option<crate::fused::Fused>,
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

    /// Keys a cipher from an IV generator, the full XTS key (data half first, then tweak
    /// half: 32 bytes for AES-128-XTS, 64 for AES-256-XTS) and the sector size.
    pub fn with_iv(iv: IvGen, key: &[u8], sector: SectorSize) -> Result<Self, CipherError> {
        if key.len() != 32 && key.len() != 64 {
            return Err(CipherError::BadKeyLength(key.len()));
        }
        let (k1, k2) = key.split_at(key.len() / 2);
        // Equal halves make the tweak key equal the data key, which IEEE 1619-2007 §5.1
        // forbids (and Python cryptography and the kernel's xts_verify_key refuse).
        if k1 == k2 {
            return Err(CipherError::EqualKeyHalves);
        }
        Ok(Self::build(iv, key, sector))
    }

    /// Keys a cipher from a key of checked length, without the equal-halves check.
    fn build(iv: IvGen, key: &[u8], sector: SectorSize) -> Self {
        let (k1, k2) = key.split_at(key.len() / 2);
        // As the kernel's essiv template (crypto/essiv.c) keyed by dm-crypt: the salt is the
        // digest of the whole XTS key, and the ESSIV cipher is the inner cipher (AES) keyed
        // with the salt, so AES-256 since sha256 gives 32 bytes.
        let salt = (iv == IvGen::EssivSha256)
            .then(|| Zeroizing::new(<[u8; 32]>::from(Sha256::digest(key))));
        let essiv_key = salt.as_deref().map(|s| &s[..]);
        let essiv = essiv_key.map(AesKey::new);
        SectorCipher {
            #[cfg(target_arch = "x86_64")]
            fused: crate::fused::Fused::detect(k1, k2, essiv_key),
            data: AesKey::new(k1),
            tweak: AesKey::new(k2),
            essiv,
            iv,
            sector,
            key_bits: key.len() * 8,
            tweaks: TweakBackend::detect(),
        }
    }

    pub fn sector_size(&self) -> usize {
        self.sector.bytes()
    }
    pub fn key_bits(&self) -> usize {
        self.key_bits
    }
    pub fn iv_gen(&self) -> IvGen {
        self.iv
    }
    pub fn spec(&self) -> String {
        format!("aes-xts-{}", self.iv.name())
    }

    /// Which data path this cipher runs, chosen from the CPU when it was keyed:
    /// `"vaes512"`, `"vaes256"`, `"aesni128"` (fused kernels) or `"portable"`
    /// (`encrypt_blocks`).
    pub fn data_path(&self) -> &'static str {
        #[cfg(target_arch = "x86_64")]
        if let Some(fused) = &self.fused {
            return fused.name();
        }
        "portable"
    }

    /// The `iv_sector` to pass to [`SectorCipher::encrypt`] for data that starts
    /// `offset_in_segment` bytes into its LUKS2 segment: `offset / 512 + iv_tweak`.
    ///
    /// LUKS2 counts the IV in 512-byte units whatever the sector size, starting at the
    /// segment's `iv_tweak` (0 for a plain volume; reencryption's moved segments start
    /// further on). The offset must be a whole number of sectors.
    pub fn iv_sector_at(&self, offset_in_segment: u64, iv_tweak: u64) -> Result<u64, CipherError> {
        let ss = self.sector.bytes() as u64;
        if !offset_in_segment.is_multiple_of(ss) {
            return Err(CipherError::MisalignedOffset {
                offset: offset_in_segment,
                sector_size: self.sector.bytes(),
            });
        }
        Ok((offset_in_segment / 512).wrapping_add(iv_tweak))
    }

    /// Encrypts `buf` (whole sectors) in place. `iv_sector` is the IV of the first
    /// sector in 512-byte units (byte offset in the segment / 512 + the segment's
    /// `iv_tweak`; see [`SectorCipher::iv_sector_at`]); each following sector advances it
    /// by sector_size / 512. Buffers of 256 KiB or more run on the current rayon pool.
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
        if !buf.len().is_multiple_of(ss) {
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
                    self.sectors(
                        chunk,
                        iv_sector.wrapping_add((i as u64).wrapping_mul(per_piece_iv)),
                        enc,
                    )
                });
        } else {
            self.sectors(buf, iv_sector, enc);
        }
        Ok(())
    }

    /// The pipelined XTS core over whole sectors, on the calling thread:
    /// 1. the IVs of up to [`IV_GROUP`] sectors are encrypted to first tweaks in one call;
    /// 2. per batch of [`BATCH_BYTES`]: whiten each sector with its tweak sequence (kept),
    ///    encipher the whole batch in one pipelined call, whiten again.
    fn sectors(&self, buf: &mut [u8], iv_sector: u64, enc: bool) {
        let (blocks, rest) = Block::slice_as_chunks_mut(buf);
        debug_assert!(rest.is_empty(), "caller checked whole sectors");
        #[cfg(target_arch = "x86_64")]
        if let Some(fused) = &self.fused {
            return self.sectors_fused(fused, blocks, iv_sector, enc);
        }
        self.sectors_portable(blocks, iv_sector, enc);
    }

    /// The fused path: first tweaks for up to [`IV_GROUP`] sectors in one call, then one
    /// pass over their data.
    #[cfg(target_arch = "x86_64")]
    fn sectors_fused(
        &self,
        fused: &crate::fused::Fused,
        blocks: &mut [Block],
        iv_sector: u64,
        enc: bool,
    ) {
        let sector_blocks = self.sector.bytes() / 16;
        let mut first = [Block::default(); IV_GROUP];
        let mut first_used = 0;
        let mut iv = iv_sector;
        for group in blocks.chunks_mut(IV_GROUP * sector_blocks) {
            let n = group.len() / sector_blocks;
            self.iv_inputs(iv, &mut first[..n]);
            fused.first_tweaks(&mut first[..n]);
            first_used = first_used.max(n);
            fused.crypt_sectors(group, sector_blocks, &first[..n], enc);
            iv = iv.wrapping_add(n as u64 * self.sector.iv_units());
        }
        // Tweaks are key-derived; do not leave them on the stack.
        Block::slice_as_flattened_mut(&mut first[..first_used]).zeroize();
    }

    /// The portable path over `encrypt_blocks`.
    fn sectors_portable(&self, blocks: &mut [Block], iv_sector: u64, enc: bool) {
        let sector_blocks = self.sector.bytes() / 16;
        let batch_sectors = (BATCH_BYTES / self.sector.bytes()).max(1);
        let mut first = [Block::default(); IV_GROUP];
        let mut tweaks = [Block::default(); BATCH_BYTES / 16];
        let mut first_used = 0;
        let mut tweaks_used = 0;
        let mut iv = iv_sector;
        for group in blocks.chunks_mut(IV_GROUP * sector_blocks) {
            let n = group.len() / sector_blocks;
            self.first_tweaks(iv, &mut first[..n]);
            first_used = first_used.max(n);
            for (b, batch) in group.chunks_mut(batch_sectors * sector_blocks).enumerate() {
                let tw = &mut tweaks[..batch.len()];
                tweaks_used = tweaks_used.max(batch.len());
                let t0s = &first[b * batch_sectors..];
                for ((sector, st), t0) in batch
                    .chunks_mut(sector_blocks)
                    .zip(tw.chunks_mut(sector_blocks))
                    .zip(t0s)
                {
                    self.tweaks
                        .xor_fresh(sector, u128::from_le_bytes((*t0).into()), st);
                }
                self.data.crypt_pipelined(batch, enc);
                self.tweaks.xor_again(batch, tw);
            }
            iv = iv.wrapping_add(n as u64 * self.sector.iv_units());
        }
        // Tweaks are key-derived; do not leave them on the stack.
        Block::slice_as_flattened_mut(&mut first[..first_used]).zeroize();
        Block::slice_as_flattened_mut(&mut tweaks[..tweaks_used]).zeroize();
    }

    /// Fills `out[j]` with the first tweak of sector `iv0 + j·units`: the IV encrypted
    /// under the tweak key (after ESSIV's own encryption for `essiv:sha256`).
    fn first_tweaks(&self, iv0: u64, out: &mut [Block]) {
        self.iv_inputs(iv0, out);
        if let Some(essiv) = &self.essiv {
            essiv.crypt_pipelined(out, true);
        }
        self.tweak.crypt_pipelined(out, true);
    }

    /// Fills `out[j]` with the IV generator's input block for sector `iv0 + j·units`.
    fn iv_inputs(&self, iv0: u64, out: &mut [Block]) {
        let units = self.sector.iv_units();
        for (j, slot) in out.iter_mut().enumerate() {
            *slot = Block::from(self.iv_input(iv0.wrapping_add(j as u64 * units)));
        }
    }

    /// The IV generator's output before any encryption (ESSIV's input is le64(sector)).
    fn iv_input(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match self.iv {
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 | IvGen::EssivSha256 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Plain64Be => iv[8..].copy_from_slice(&sector.to_be_bytes()),
        }
        iv
    }

    /// The 16-byte IV the generator produces for `sector` (in 512-byte units): the XTS
    /// tweak input, i.e. what Python `cryptography`'s `modes.XTS(tweak)` takes.
    pub fn iv_bytes(&self, sector: u64) -> [u8; 16] {
        let mut b = [Block::from(self.iv_input(sector))];
        if let Some(essiv) = &self.essiv {
            essiv.crypt_pipelined(&mut b, true);
        }
        b[0].into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// IEEE 1619 vector 1 has an all-zero key (equal halves, refused by the public
    /// constructors), so it runs here on the unchecked internal constructor, first 32
    /// bytes of a 512-byte data unit at sequence number 0.
    #[test]
    fn ieee1619_vector1_on_the_unchecked_constructor() {
        let c = SectorCipher::build(IvGen::Plain64, &[0u8; 32], SectorSize::S512);
        let mut buf = vec![0u8; 512];
        c.encrypt_serial(&mut buf, 0).unwrap();
        assert_eq!(
            hex(&buf[..32]),
            "917cf69ebd68b2ec9b9fe9a3eadda692cd43d2f59598ed858c02c2652fbf922e"
        );
        c.decrypt_serial(&mut buf, 0).unwrap();
        assert_eq!(buf, vec![0u8; 512]);
    }

    /// Padding the remainder to the backend's pipeline width must not change results,
    /// whatever that width is (AES-NI 8, VAES-256 30, VAES-512 64, or none).
    #[test]
    fn padded_pipelining_matches_plain_encrypt_blocks_for_any_width() {
        let key = pattern(32, 9);
        for par in [1usize, 8, 30, 64] {
            let mut k = AesKey::new(&key);
            k.enc_par = par;
            k.dec_par = par;
            for n in [0usize, 1, 3, 4, 5, 29, 31, 32, 63, 65, 130] {
                let plain: Vec<Block> = pattern(n * 16, n as u64 + 3)
                    .chunks(16)
                    .map(|c| Block::try_from(c).unwrap())
                    .collect();
                let mut want = plain.clone();
                k.encrypt_blocks(&mut want);
                let mut got = plain.clone();
                k.crypt_pipelined(&mut got, true);
                assert_eq!(got, want, "encrypt {n} blocks, width {par}");
                k.crypt_pipelined(&mut got, false);
                assert_eq!(got, plain, "decrypt {n} blocks, width {par}");
            }
        }
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// Every data path this CPU runs (the default pick; portable `encrypt_blocks` with the
    /// detected tweak backend; each fused kernel the CPU has, `vaes256` forced even where
    /// `vaes512` would be picked) gives the same bytes as the portable path with scalar
    /// tweaks, for every IV generator, key size and sector size, over sector counts that
    /// are odd, below, at and above one IV group, from unaligned buffer addresses.
    #[test]
    fn every_data_path_agrees() {
        compare_every_data_path();
    }

    /// The AVX-512 kernel is compared above only where the CPU has it: this test makes
    /// that visible (skipped, not passed, elsewhere).
    #[cfg(target_arch = "x86_64")]
    #[test]
    #[ignore = "needs VAES and AVX-512F/BW; scripts/test runs it where the CPU has them"]
    fn cpu_vaes512_path_agrees_with_portable() {
        assert!(
            crate::vaes512::available(),
            "needs VAES and AVX-512F/BW: this CPU lacks it"
        );
        assert!(compare_every_data_path()["vaes512"] > 0);
    }

    /// The comparison behind both tests above; returns how many buffers each data path
    /// encrypted and decrypted.
    fn compare_every_data_path() -> std::collections::HashMap<&'static str, usize> {
        #[cfg(target_arch = "x86_64")]
        let (has_vaes512, has_vaes256, has_aesni128) = {
            use std::arch::is_x86_feature_detected as has;
            let aesni = has!("aes") && has!("pclmulqdq");
            (
                crate::vaes512::available(),
                aesni && has!("avx2") && has!("vaes") && has!("vpclmulqdq"),
                aesni,
            )
        };
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(crate::vaes256::available(), has_vaes256);
            assert_eq!(crate::aesni128::available(), has_aesni128);
        }
        let mut runs: std::collections::HashMap<&'static str, usize> = Default::default();
        let mut seed = 1u64;
        for iv in [
            IvGen::Plain,
            IvGen::Plain64,
            IvGen::Plain64Be,
            IvGen::EssivSha256,
        ] {
            for key_len in [32usize, 64] {
                for sector in [512usize, 1024, 2048, 4096] {
                    seed += 1;
                    let key = pattern(key_len, seed);
                    let sector = SectorSize::new(sector).unwrap();
                    let keyed = || SectorCipher::with_iv(iv, &key, sector).unwrap();
                    let reference = {
                        let mut c = keyed();
                        #[cfg(target_arch = "x86_64")]
                        {
                            c.fused = None;
                        }
                        c.tweaks = TweakBackend::Portable;
                        c
                    };
                    assert_eq!(reference.data_path(), "portable");

                    let default = keyed();
                    #[cfg(target_arch = "x86_64")]
                    assert_eq!(
                        default.data_path(),
                        if has_vaes512 {
                            "vaes512"
                        } else if has_vaes256 {
                            "vaes256"
                        } else if has_aesni128 {
                            "aesni128"
                        } else {
                            "portable"
                        },
                        "default path pick"
                    );
                    let mut variants = vec![default];
                    let mut portable = keyed();
                    #[cfg(target_arch = "x86_64")]
                    {
                        portable.fused = None;
                    }
                    portable.tweaks = TweakBackend::detect();
                    variants.push(portable);
                    // Each narrower kernel forced, even where a wider one would be picked.
                    #[cfg(target_arch = "x86_64")]
                    {
                        use crate::fused::Fused;
                        let (k1, k2) = key.split_at(key_len / 2);
                        let salt = (iv == IvGen::EssivSha256)
                            .then(|| <[u8; 32]>::from(Sha256::digest(&key)));
                        let salt = salt.as_ref().map(|s| &s[..]);
                        for (has, name, make) in [
                            (has_vaes256, "vaes256", Fused::vaes256 as fn(_, _, _) -> _),
                            (has_aesni128, "aesni128", Fused::aesni128),
                        ] {
                            if has {
                                let mut c = keyed();
                                c.fused = make(k1, k2, salt);
                                assert_eq!(c.data_path(), name);
                                variants.push(c);
                            }
                        }
                    }

                    let ss = sector.bytes();
                    let iv0 = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                    for (i, sectors) in [1usize, 2, 3, 5, 63, 64, 65, 131, 97 * 1024 / ss + 1]
                        .into_iter()
                        .enumerate()
                    {
                        // Start 0..=3 bytes into the allocation: kernels must not rely on
                        // the buffer's alignment.
                        let skew = i % 4;
                        let mut plain = pattern(sectors * ss + skew, seed + i as u64);
                        let plain = &mut plain[skew..];
                        let mut want = plain.to_vec();
                        reference.encrypt_serial(&mut want, iv0).unwrap();
                        let mut got = plain.to_vec();
                        for c in &variants {
                            got.copy_from_slice(plain);
                            let buf = &mut got[..];
                            c.encrypt_serial(buf, iv0).unwrap();
                            assert!(
                                buf == want,
                                "encrypt of {sectors} sectors differs: {c:?} on {}",
                                c.data_path()
                            );
                            c.decrypt_serial(buf, iv0).unwrap();
                            assert!(
                                buf == plain,
                                "decrypt of {sectors} sectors differs: {c:?} on {}",
                                c.data_path()
                            );
                            *runs.entry(c.data_path()).or_default() += 1;
                        }
                    }
                }
            }
        }
        // The kernels this CPU has really ran (not silently the portable path).
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(runs.contains_key("vaes256"), has_vaes256, "{runs:?}");
            assert_eq!(runs.contains_key("aesni128"), has_aesni128, "{runs:?}");
            assert_eq!(runs.contains_key("vaes512"), has_vaes512, "{runs:?}");
        }
        assert!(runs["portable"] > 0);
        eprintln!("data paths compared (buffers each): {runs:?}");
        runs
    }
}
