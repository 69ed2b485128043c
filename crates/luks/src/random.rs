//! Cryptographic randomness (getrandom) for keys, salts and AF stripes.

use crate::error::{Error, Result};
use zeroize::Zeroizing;

/// Fills `buf` from the OS CSPRNG.
pub fn fill(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| {
        Error::io(
            "reading random bytes from the OS",
            std::io::Error::other(e.to_string()),
        )
    })
}

/// `n` random bytes in a zeroizing buffer.
pub fn secret(n: usize) -> Result<Zeroizing<Vec<u8>>> {
    let mut v = Zeroizing::new(vec![0u8; n]);
    fill(&mut v)?;
    Ok(v)
}

/// `n` random bytes (salts, not secret).
pub fn bytes(n: usize) -> Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    fill(&mut v)?;
    Ok(v)
}
