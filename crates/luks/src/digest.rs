//! Volume-key digests: how a candidate key from a keyslot is recognised.

use crate::error::{Error, Result};
use crate::hash::Hash;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// PBKDF2(key, salt, iterations) compared in constant time with `expected`.
pub fn pbkdf2_matches(
    hash: &str,
    iterations: u32,
    salt: &[u8],
    expected: &[u8],
    key: &[u8],
) -> Result<bool> {
    let hash = Hash::parse(hash)?;
    if iterations == 0 || expected.is_empty() || expected.len() > 64 {
        return Err(Error::corrupt(format!(
            "digest with {iterations} iterations and {} bytes",
            expected.len()
        )));
    }
    let mut got = Zeroizing::new(vec![0u8; expected.len()]);
    hash.pbkdf2(key, salt, iterations, &mut got);
    Ok(bool::from(got.ct_eq(expected)))
}

/// PBKDF2 digest of `key`: `len` bytes.
pub fn pbkdf2_compute(hash: Hash, iterations: u32, salt: &[u8], key: &[u8], len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    hash.pbkdf2(key, salt, iterations, &mut out);
    out
}
