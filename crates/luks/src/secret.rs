//! Secret holders whose Debug output never shows the bytes.

use std::fmt;
use zeroize::Zeroizing;

/// A volume (master) key: wiped on drop, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct VolumeKey(Zeroizing<Vec<u8>>);

impl VolumeKey {
    /// Wraps key bytes (moved, not copied).
    pub fn new(bytes: Zeroizing<Vec<u8>>) -> VolumeKey {
        VolumeKey(bytes)
    }
    /// Copies `bytes` into a new key.
    pub fn from_slice(bytes: &[u8]) -> VolumeKey {
        VolumeKey(Zeroizing::new(bytes.to_vec()))
    }
    /// A fresh random key of `len` bytes.
    pub fn random(len: usize) -> crate::Result<VolumeKey> {
        Ok(VolumeKey(crate::random::secret(len)?))
    }
    /// The key bytes (e.g. for `luksify_cipher::SectorCipher::new`).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The zeroizing buffer itself.
    pub fn into_inner(self) -> Zeroizing<Vec<u8>> {
        self.0
    }
}

impl fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VolumeKey(<{} bytes redacted>)", self.0.len())
    }
}

/// A passphrase (or key file contents): wiped on drop, never printed.
#[derive(Clone)]
pub struct Passphrase(Zeroizing<Vec<u8>>);

impl Passphrase {
    pub fn new(bytes: Zeroizing<Vec<u8>>) -> Passphrase {
        Passphrase(bytes)
    }
    pub fn from_slice(bytes: &[u8]) -> Passphrase {
        Passphrase(Zeroizing::new(bytes.to_vec()))
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn debug_never_shows_bytes() {
        let k = VolumeKey::from_slice(&[0xAB; 32]);
        let p = Passphrase::from_slice(b"hunter2");
        let s = format!("{k:?} {p:?}");
        assert!(!s.contains("171") && !s.to_lowercase().contains("ab,") && !s.contains("hunter2"));
        assert!(s.contains("redacted"));
    }
}
