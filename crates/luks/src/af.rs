//! The LUKS anti-forensic information splitter (AF, "luks1" type).
//!
//! A key is stored as `stripes` blocks of the key's size so that destroying any
//! single block destroys the key. Stripes 1..n-1 are random; a running buffer
//! is XORed with each stripe and diffused through the hash; the last stripe is
//! `key XOR buffer`.

use crate::error::{Error, Result};
use crate::hash::Hash;
use zeroize::Zeroizing;

/// cryptsetup's stripe count for every keyslot it creates.
pub const DEFAULT_STRIPES: u32 = 4000;
/// Largest stripe count accepted when reading (cryptsetup never exceeds 4000;
/// a bigger value would only make us allocate and hash for nothing).
pub const MAX_STRIPES: u32 = 4000;

/// Bytes an AF-split key of `key_len` bytes occupies.
pub fn split_len(key_len: usize, stripes: u32) -> usize {
    key_len * stripes as usize
}

/// Diffuses `buf` in place: each hash-sized block i becomes H(be32(i) || block),
/// the trailing partial block truncated from its hash.
fn diffuse(hash: Hash, buf: &mut [u8]) {
    let mut out = Zeroizing::new([0u8; 64]);
    for (i, block) in buf.chunks_mut(hash.digest_len()).enumerate() {
        hash.digest_into(&[&(i as u32).to_be_bytes(), block], &mut out[..]);
        let n = block.len();
        block.copy_from_slice(&out[..n]);
    }
}

fn check(key_len: usize, stripes: u32, material_len: usize) -> Result<()> {
    if stripes == 0 || stripes > MAX_STRIPES {
        return Err(Error::corrupt(format!(
            "AF stripes {stripes} outside 1..={MAX_STRIPES}"
        )));
    }
    if key_len == 0 || material_len < split_len(key_len, stripes) {
        return Err(Error::corrupt(format!(
            "AF material of {material_len} bytes cannot hold {stripes} stripes of a {key_len}-byte key"
        )));
    }
    Ok(())
}

/// Splits `key` into `stripes` stripes (`key.len() * stripes` bytes).
pub fn split(key: &[u8], stripes: u32, hash: Hash) -> Result<Zeroizing<Vec<u8>>> {
    let n = key.len();
    check(n, stripes, split_len(n, stripes))?;
    let mut material = Zeroizing::new(vec![0u8; split_len(n, stripes)]);
    let last = (stripes as usize - 1) * n;
    crate::random::fill(&mut material[..last])?;
    let mut buf = Zeroizing::new(vec![0u8; n]);
    for stripe in material[..last].chunks(n) {
        xor_into(&mut buf, stripe);
        diffuse(hash, &mut buf);
    }
    for (o, (k, b)) in material[last..].iter_mut().zip(key.iter().zip(buf.iter())) {
        *o = k ^ b;
    }
    Ok(material)
}

/// Recovers a `key_len`-byte key from the first `key_len * stripes` bytes of `material`.
pub fn merge(
    material: &[u8],
    key_len: usize,
    stripes: u32,
    hash: Hash,
) -> Result<Zeroizing<Vec<u8>>> {
    check(key_len, stripes, material.len())?;
    let last = (stripes as usize - 1) * key_len;
    let mut buf = Zeroizing::new(vec![0u8; key_len]);
    for stripe in material[..last].chunks(key_len) {
        xor_into(&mut buf, stripe);
        diffuse(hash, &mut buf);
    }
    xor_into(&mut buf, &material[last..last + key_len]);
    Ok(buf)
}

fn xor_into(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_then_merge_recovers_key_for_each_hash() {
        for hash in [Hash::Sha1, Hash::Sha256, Hash::Sha512] {
            let key: Vec<u8> = (0..64u8).collect();
            let m = split(&key, DEFAULT_STRIPES, hash).unwrap();
            assert_eq!(m.len(), 64 * 4000);
            assert_eq!(&merge(&m, 64, DEFAULT_STRIPES, hash).unwrap()[..], &key[..]);
            // Flipping one bit of any stripe destroys the key.
            let mut bad = m.clone();
            bad[100] ^= 1;
            assert_ne!(
                &merge(&bad, 64, DEFAULT_STRIPES, hash).unwrap()[..],
                &key[..]
            );
        }
    }

    #[test]
    fn absurd_stripes_are_refused() {
        assert!(merge(&[0u8; 64], 32, 0, Hash::Sha256).is_err());
        assert!(merge(&[0u8; 64], 32, 1 << 30, Hash::Sha256).is_err());
        assert!(merge(&[0u8; 64], 32, 3, Hash::Sha256).is_err());
    }
}
