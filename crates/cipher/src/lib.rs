//! AES-XTS over disk sectors, as Linux dm-crypt applies it to LUKS volumes.
//!
//! What it is: a sector cipher. A buffer holding whole sectors is encrypted or
//! decrypted in place; each sector is one XTS data unit whose tweak comes from an
//! IV generator (`plain64`, `plain64be`, `plain`, `essiv:sha256`) fed with the
//! sector's position counted in **512-byte units**, as LUKS2 and dm-crypt do even
//! for 4096-byte sectors (they never set `iv_large_sectors`).
//!
//! What it is not: a general XTS library (no ciphertext stealing, no partial
//! sectors), and it knows nothing of devices, headers or keyslots.
//!
//! Data paths, picked at run time per [`SectorCipher`] and byte-for-byte identical:
//! `vaes512` (fused one-pass XTS on VAES + AVX-512, x86-64 only), else `vaes256` (the
//! same on VAES + AVX2), else `aesni128` (the same on plain AES-NI), else the portable
//! one (`xts` over the `aes` crate's pipelined `encrypt_blocks`, with `tweak`'s AVX-512
//! or scalar tweak passes). Buffers of 256 KiB or more are split across the rayon pool.

#[cfg(target_arch = "x86_64")]
mod aesni128;
#[cfg(target_arch = "x86_64")]
mod aesni_keys;
pub mod cbc;
#[cfg(target_arch = "x86_64")]
mod fused;
mod tweak;
#[cfg(target_arch = "x86_64")]
mod vaes256;
#[cfg(target_arch = "x86_64")]
mod vaes512;
mod xts;

pub use xts::{CipherError, IvGen, KeyBytes, SectorCipher, SectorSize};
