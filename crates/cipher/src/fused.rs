//! Choice between the fused one-pass XTS kernels (x86-64 only): `vaes512` where the CPU
//! has VAES + AVX-512, else `vaes256` where it has VAES + AVX2, else `aesni128` where it
//! has AES-NI, else none (and `xts.rs` runs the portable `encrypt_blocks` path). All
//! kernels take the same calls.

use crate::{aesni128, vaes256, vaes512};
use aes::Block;

/// A fused kernel keyed for one XTS volume key.
pub(crate) enum Fused {
    Vaes512(vaes512::FusedXts),
    Vaes256(vaes256::FusedXts),
    Aesni128(aesni128::FusedXts),
}

impl Fused {
    /// The fastest fused kernel this CPU runs, or `None`.
    pub(crate) fn detect(
        data_key: &[u8],
        tweak_key: &[u8],
        essiv_key: Option<&[u8]>,
    ) -> Option<Self> {
        vaes512::FusedXts::new(data_key, tweak_key, essiv_key)
            .map(Fused::Vaes512)
            .or_else(|| Self::vaes256(data_key, tweak_key, essiv_key))
            .or_else(|| Self::aesni128(data_key, tweak_key, essiv_key))
    }

    /// The VAES + AVX2 kernel even where AVX-512 is present (tests compare both), or `None`.
    pub(crate) fn vaes256(
        data_key: &[u8],
        tweak_key: &[u8],
        essiv_key: Option<&[u8]>,
    ) -> Option<Self> {
        vaes256::FusedXts::new(data_key, tweak_key, essiv_key).map(Fused::Vaes256)
    }

    /// The AES-NI (XMM) kernel even where VAES is present (tests compare all), or `None`.
    pub(crate) fn aesni128(
        data_key: &[u8],
        tweak_key: &[u8],
        essiv_key: Option<&[u8]>,
    ) -> Option<Self> {
        aesni128::FusedXts::new(data_key, tweak_key, essiv_key).map(Fused::Aesni128)
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Fused::Vaes512(_) => "vaes512",
            Fused::Vaes256(_) => "vaes256",
            Fused::Aesni128(_) => "aesni128",
        }
    }

    /// Encrypts IV blocks in place to first tweaks (ESSIV first when keyed).
    pub(crate) fn first_tweaks(&self, ivs: &mut [Block]) {
        match self {
            Fused::Vaes512(f) => f.first_tweaks(ivs),
            Fused::Vaes256(f) => f.first_tweaks(ivs),
            Fused::Aesni128(f) => f.first_tweaks(ivs),
        }
    }

    /// XTS over whole sectors of `sector_blocks` blocks, sector `i` from tweak `first[i]`.
    pub(crate) fn crypt_sectors(
        &self,
        data: &mut [Block],
        sector_blocks: usize,
        first: &[Block],
        encrypt: bool,
    ) {
        match self {
            Fused::Vaes512(f) => f.crypt_sectors(data, sector_blocks, first, encrypt),
            Fused::Vaes256(f) => f.crypt_sectors(data, sector_blocks, first, encrypt),
            Fused::Aesni128(f) => f.crypt_sectors(data, sector_blocks, first, encrypt),
        }
    }
}
