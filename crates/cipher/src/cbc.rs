//! AES-CBC over 512-byte sectors with dm-crypt's `plain`, `plain64` and `essiv:sha256`
//! IVs: the cipher of LUKS1 volumes made by cryptsetup 1.x (`aes-cbc-essiv:sha256`, its
//! default then). luksify uses it for their keyslot material, so that such volumes take
//! `test-passphrase`, `add-key`, `change-key` and `--dump-volume-key`; the data path is
//! AES-XTS only ([`crate::SectorCipher`]).
//!
//! Per sector: IV = le32(sector) (`plain`), le64(sector) (`plain64`), or
//! AES-256(key = sha256(volume key)) of le64(sector) (`essiv:sha256`), zero-padded to 16
//! bytes, as the kernel's dm-crypt computes them; then plain CBC over the sector.

use crate::CipherError;
use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use aes::{Aes128, Aes192, Aes256, Block};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

const SECTOR: usize = 512;

enum Key {
    A128(Aes128),
    A192(Aes192),
    A256(Aes256),
}

impl Key {
    fn new(k: &[u8]) -> Result<Key, CipherError> {
        let bad = |_| CipherError::BadKeyLength(k.len());
        Ok(match k.len() {
            16 => Key::A128(Aes128::new_from_slice(k).map_err(bad)?),
            24 => Key::A192(Aes192::new_from_slice(k).map_err(bad)?),
            32 => Key::A256(Aes256::new_from_slice(k).map_err(bad)?),
            n => return Err(CipherError::BadKeyLength(n)),
        })
    }
    fn encrypt(&self, b: &mut Block) {
        match self {
            Key::A128(c) => c.encrypt_block(b),
            Key::A192(c) => c.encrypt_block(b),
            Key::A256(c) => c.encrypt_block(b),
        }
    }
    fn decrypt(&self, b: &mut Block) {
        match self {
            Key::A128(c) => c.decrypt_block(b),
            Key::A192(c) => c.decrypt_block(b),
            Key::A256(c) => c.decrypt_block(b),
        }
    }
}

enum Iv {
    Plain,
    Plain64,
    Essiv(Box<Aes256>),
}

/// AES-CBC keyed for 512-byte sectors (see the module notes). Holds only key schedules,
/// wiped on drop by `aes`'s `zeroize` feature.
pub struct CbcSectors {
    key: Key,
    iv: Iv,
}

impl std::fmt::Debug for CbcSectors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CbcSectors").finish_non_exhaustive()
    }
}

impl CbcSectors {
    /// Whether `spec` is one this type handles (`aes-cbc-plain`, `aes-cbc-plain64`,
    /// `aes-cbc-essiv:sha256`).
    pub fn handles(spec: &str) -> bool {
        matches!(
            spec.strip_prefix("aes-cbc-"),
            Some("plain" | "plain64" | "essiv:sha256")
        )
    }

    /// Keys it from a spec and the whole key (16, 24 or 32 bytes).
    pub fn new(spec: &str, key: &[u8]) -> Result<CbcSectors, CipherError> {
        let iv = match spec.strip_prefix("aes-cbc-") {
            Some("plain") => Iv::Plain,
            Some("plain64") => Iv::Plain64,
            Some("essiv:sha256") => {
                let salt = Zeroizing::new(<[u8; 32]>::from(Sha256::digest(key)));
                Iv::Essiv(Box::new(
                    Aes256::new_from_slice(&salt[..])
                        .map_err(|_| CipherError::BadKeyLength(salt.len()))?,
                ))
            }
            _ => return Err(CipherError::UnsupportedSpec(spec.to_string())),
        };
        Ok(CbcSectors {
            key: Key::new(key)?,
            iv,
        })
    }

    fn iv(&self, sector: u64) -> Block {
        let mut b = Block::default();
        match &self.iv {
            Iv::Plain => b[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            Iv::Plain64 => b[..8].copy_from_slice(&sector.to_le_bytes()),
            Iv::Essiv(c) => {
                b[..8].copy_from_slice(&sector.to_le_bytes());
                c.encrypt_block(&mut b);
            }
        }
        b
    }

    fn sectors(buf: &mut [u8]) -> Result<std::slice::ChunksExactMut<'_, u8>, CipherError> {
        if !buf.len().is_multiple_of(SECTOR) {
            return Err(CipherError::MisalignedOffset {
                offset: buf.len() as u64,
                sector_size: SECTOR,
            });
        }
        Ok(buf.chunks_exact_mut(SECTOR))
    }

    /// Encrypts whole 512-byte sectors in place; the first is sector `first`.
    pub fn encrypt(&self, buf: &mut [u8], first: u64) -> Result<(), CipherError> {
        for (i, sector) in Self::sectors(buf)?.enumerate() {
            let mut prev = self.iv(first + i as u64);
            let (blocks, _) = Block::slice_as_chunks_mut(sector);
            for b in blocks {
                for (x, p) in b.iter_mut().zip(prev.iter()) {
                    *x ^= p;
                }
                self.key.encrypt(b);
                prev = *b;
            }
        }
        Ok(())
    }

    /// Decrypts whole 512-byte sectors in place; the first is sector `first`.
    pub fn decrypt(&self, buf: &mut [u8], first: u64) -> Result<(), CipherError> {
        for (i, sector) in Self::sectors(buf)?.enumerate() {
            let mut prev = self.iv(first + i as u64);
            let (blocks, _) = Block::slice_as_chunks_mut(sector);
            for b in blocks {
                let c = *b;
                self.key.decrypt(b);
                for (x, p) in b.iter_mut().zip(prev.iter()) {
                    *x ^= p;
                }
                prev = c;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NIST SP 800-38A F.2.5 (CBC-AES256.Encrypt), first two blocks. Its IV (00..0f) is
    /// not one a sector number gives, so the chain is run on the key type directly; the
    /// sector IVs are checked against cryptsetup by tests/tests/luks_v1_interop.rs.
    #[test]
    fn cbc_chain_matches_sp800_38a() {
        let key = hex::decode("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
            .unwrap();
        let iv = hex::decode("000102030405060708090a0b0c0d0e0f").unwrap();
        let pt = hex::decode("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51")
            .unwrap();
        let want = hex::decode("f58c4c04d6e5f1ba779eabfb5f7bfbd69cfc4e967edb808d679f777bc6702c7d")
            .unwrap();
        let k = Key::new(&key).unwrap();
        let mut prev = Block::try_from(&iv[..]).unwrap();
        let mut out = Vec::new();
        for chunk in pt.chunks(16) {
            let mut b = Block::try_from(chunk).unwrap();
            for (x, p) in b.iter_mut().zip(prev.iter()) {
                *x ^= p;
            }
            k.encrypt(&mut b);
            out.extend_from_slice(&b);
            prev = b;
        }
        assert_eq!(out, want);
    }

    #[test]
    fn sectors_round_trip_and_ivs_differ_per_sector() {
        for spec in ["aes-cbc-plain", "aes-cbc-plain64", "aes-cbc-essiv:sha256"] {
            for len in [16usize, 24, 32] {
                let key: Vec<u8> = (0..len as u8).map(|i| i * 7 + 1).collect();
                let c = CbcSectors::new(spec, &key).unwrap();
                let orig = vec![0x5au8; 4 * SECTOR];
                let mut buf = orig.clone();
                c.encrypt(&mut buf, 9).unwrap();
                // Equal plaintext sectors encrypt differently (per-sector IVs).
                assert_ne!(buf[..SECTOR], buf[SECTOR..2 * SECTOR], "{spec}");
                c.decrypt(&mut buf, 9).unwrap();
                assert_eq!(buf, orig, "{spec} {len}");
            }
        }
        assert!(CbcSectors::new("aes-cbc-benbi", &[0u8; 32]).is_err());
        assert!(CbcSectors::new("aes-cbc-plain", &[0u8; 20]).is_err());
    }
}
