//! Choice between the fused one-pass XTS kernels (x86-64 only): `vaes512` where the CPU
//! has VAES + AVX-512, else `vaes256` where it has VAES + AVX2, else `aesni128` where it
//! has AES-NI, else none (and `xts.rs` runs the portable `encrypt_blocks` path).
//!
//! Each kernel module keeps only its SIMD code behind [`Kernel`]; the key schedules, the
//! argument checks and the rounds/direction choice live here once, in [`Fused`].

use crate::aesni_keys::{RoundKeys, XtsSchedules};
use crate::{aesni128, vaes256, vaes512};
use aes::Block;

/// One fused kernel's entry points.
pub(crate) trait Kernel {
    /// The name `SectorCipher::data_path` reports.
    const NAME: &'static str;

    /// True when the running CPU has every feature the kernel is compiled for.
    fn available() -> bool;

    /// AES-ECB encryption of `blocks` in place (IVs to tweaks).
    ///
    /// # Safety
    /// [`Kernel::available`] returned true on this CPU.
    unsafe fn ecb_encrypt(keys: &RoundKeys, blocks: &mut [Block]);

    /// XTS over whole sectors of `sector_blocks` blocks (a multiple of 32), sector `i`
    /// from tweak `first[i]`, with `NR` rounds, encrypting when `ENC` (then `keys` is the
    /// encryption schedule, else the decryption one).
    ///
    /// # Safety
    /// [`Kernel::available`] returned true on this CPU, and
    /// `data.len() == sector_blocks * first.len()`.
    unsafe fn xts<const NR: usize, const ENC: bool>(
        keys: &RoundKeys,
        data: &mut [Block],
        sector_blocks: usize,
        first: &[Block],
    );
}

/// Declares `Kernel`, the calling module's [`Kernel`] named `$name`, over the module's
/// own `available`, `ecb_encrypt` and `xts` (the `#[target_feature]` functions).
macro_rules! kernel_entry_points {
    ($name:literal) => {
        /// This module's entry points for `fused.rs`.
        pub(crate) struct Kernel;

        impl crate::fused::Kernel for Kernel {
            const NAME: &'static str = $name;

            fn available() -> bool {
                available()
            }

            unsafe fn ecb_encrypt(keys: &RoundKeys, blocks: &mut [Block]) {
                // SAFETY: the caller checked `available()`, the features of `ecb_encrypt`.
                unsafe { ecb_encrypt(keys, blocks) }
            }

            unsafe fn xts<const NR: usize, const ENC: bool>(
                keys: &RoundKeys,
                data: &mut [Block],
                sector_blocks: usize,
                first: &[Block],
            ) {
                // SAFETY: the caller checked `available()`, the features of `xts`.
                unsafe { xts::<NR, ENC>(keys, data, sector_blocks, first) }
            }
        }
    };
}
pub(crate) use kernel_entry_points;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Vaes512,
    Vaes256,
    Aesni128,
}

/// A fused kernel keyed for one XTS volume key. It only exists once its kernel's
/// `available()` returned true, which is what makes the calls below sound.
pub(crate) struct Fused {
    keys: XtsSchedules,
    kind: Kind,
}

impl Fused {
    /// The fastest fused kernel this CPU runs, or `None`.
    pub(crate) fn detect(
        data_key: &[u8],
        tweak_key: &[u8],
        essiv_key: Option<&[u8]>,
    ) -> Option<Self> {
        Self::keyed::<vaes512::Kernel>(Kind::Vaes512, data_key, tweak_key, essiv_key)
            .or_else(|| Self::vaes256(data_key, tweak_key, essiv_key))
            .or_else(|| Self::aesni128(data_key, tweak_key, essiv_key))
    }

    /// The VAES + AVX2 kernel even where AVX-512 is present (tests compare both), or `None`.
    pub(crate) fn vaes256(
        data_key: &[u8],
        tweak_key: &[u8],
        essiv_key: Option<&[u8]>,
    ) -> Option<Self> {
        Self::keyed::<vaes256::Kernel>(Kind::Vaes256, data_key, tweak_key, essiv_key)
    }

    /// The AES-NI (XMM) kernel even where VAES is present (tests compare all), or `None`.
    pub(crate) fn aesni128(
        data_key: &[u8],
        tweak_key: &[u8],
        essiv_key: Option<&[u8]>,
    ) -> Option<Self> {
        Self::keyed::<aesni128::Kernel>(Kind::Aesni128, data_key, tweak_key, essiv_key)
    }

    /// Expands the XTS halves (and the ESSIV key, if any) for kernel `K`, or `None` when
    /// the CPU lacks its features.
    fn keyed<K: Kernel>(
        kind: Kind,
        data_key: &[u8],
        tweak_key: &[u8],
        essiv_key: Option<&[u8]>,
    ) -> Option<Self> {
        if !K::available() {
            return None;
        }
        // SAFETY: every kernel's `available()` includes AES-NI (and SSE2 is part of
        // x86-64), which `XtsSchedules::new` is compiled for.
        let keys = unsafe { XtsSchedules::new(data_key, tweak_key, essiv_key) };
        Some(Fused { keys, kind })
    }

    pub(crate) fn name(&self) -> &'static str {
        match self.kind {
            Kind::Vaes512 => vaes512::Kernel::NAME,
            Kind::Vaes256 => vaes256::Kernel::NAME,
            Kind::Aesni128 => aesni128::Kernel::NAME,
        }
    }

    /// Encrypts IV blocks in place to first tweaks (ESSIV first when keyed).
    pub(crate) fn first_tweaks(&self, ivs: &mut [Block]) {
        match self.kind {
            Kind::Vaes512 => self.first_tweaks_on::<vaes512::Kernel>(ivs),
            Kind::Vaes256 => self.first_tweaks_on::<vaes256::Kernel>(ivs),
            Kind::Aesni128 => self.first_tweaks_on::<aesni128::Kernel>(ivs),
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
        assert!(
            sector_blocks.is_multiple_of(32),
            "sectors are multiples of 512 bytes"
        );
        assert_eq!(
            data.len(),
            sector_blocks * first.len(),
            "one first tweak per sector"
        );
        match self.kind {
            Kind::Vaes512 => self.crypt_on::<vaes512::Kernel>(data, sector_blocks, first, encrypt),
            Kind::Vaes256 => self.crypt_on::<vaes256::Kernel>(data, sector_blocks, first, encrypt),
            Kind::Aesni128 => {
                self.crypt_on::<aesni128::Kernel>(data, sector_blocks, first, encrypt)
            }
        }
    }

    fn first_tweaks_on<K: Kernel>(&self, ivs: &mut [Block]) {
        // SAFETY: `self.kind` names `K`, whose `available()` returned true in `keyed`.
        unsafe {
            if let Some(essiv) = &self.keys.essiv_enc {
                K::ecb_encrypt(essiv, ivs);
            }
            K::ecb_encrypt(&self.keys.tweak_enc, ivs);
        }
    }

    fn crypt_on<K: Kernel>(
        &self,
        data: &mut [Block],
        sector_blocks: usize,
        first: &[Block],
        encrypt: bool,
    ) {
        let keys = &self.keys;
        // SAFETY: as in `first_tweaks_on`; `crypt_sectors` checked the lengths.
        unsafe {
            match (encrypt, keys.data_enc.rounds) {
                (true, 10) => K::xts::<10, true>(&keys.data_enc, data, sector_blocks, first),
                (true, _) => K::xts::<14, true>(&keys.data_enc, data, sector_blocks, first),
                (false, 10) => K::xts::<10, false>(&keys.data_dec, data, sector_blocks, first),
                (false, _) => K::xts::<14, false>(&keys.data_dec, data, sector_blocks, first),
            }
        }
    }
}
