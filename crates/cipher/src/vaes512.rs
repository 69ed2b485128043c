//! Fused AES-XTS on VAES + AVX-512: one pass per 512 bytes (eight 512-bit registers of
//! four blocks each) doing load, tweak XOR, all AES rounds, tweak XOR, store, with the
//! tweaks generated in registers.
//!
//! Why not `aes`'s own VAES-512 backend through `encrypt_blocks`: in aes 0.9.4 its loads
//! go through a non-inlined `Array::from_fn` closure plus a copy per 64 blocks (profiled:
//! ~25 % of cycles), which caps it at ~6.9 GB/s here, and XTS then adds two more passes.
//! This module is only used after run-time detection ([`available`]); elsewhere the
//! narrower fused kernels or the portable `encrypt_blocks` path in `xts.rs` run (see
//! `fused.rs`). All are checked against the same IEEE 1619 vectors and Python
//! cross-checks, and against each other in unit tests. Key schedules: `aesni_keys`.

use crate::aesni_keys::{load, RoundKeys};
use crate::tweak::avx512::lanes;
use crate::tweak::mul_alpha;
use aes::Block;
use core::arch::x86_64::*;
use zeroize::Zeroize;

/// True when the running CPU has everything this module is compiled for.
pub(crate) fn available() -> bool {
    std::arch::is_x86_feature_detected!("aes")
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("vaes")
}

/// Each round key repeated in all four 128-bit lanes.
#[inline]
#[target_feature(enable = "avx512f")]
fn broadcast(keys: &RoundKeys) -> [__m512i; 15] {
    let mut out = [_mm512_setzero_si512(); 15];
    for (o, k) in out.iter_mut().zip(&keys.rk) {
        *o = _mm512_broadcast_i32x4(load(k));
    }
    out
}

crate::fused::kernel_entry_points!("vaes512");

/// Multiplies each 128-bit lane by α^K in GF(2¹²⁸) (K < 57, `R` = 64 − K): shift left by
/// K across the lane's two halves and fold the bits shifted out of the top back in times
/// 0x87 (x¹²⁸ = x⁷ + x² + x + 1); the carry-less product of at most 56 bits by 0x87 fits
/// the low half, so four shifted XORs compute it.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn mul_alpha_pow<const K: u32, const R: u32>(t: __m512i) -> __m512i {
    const { assert!(K + R == 64 && K < 57) };
    let carry = _mm512_srli_epi64::<R>(t);
    let shifted = _mm512_slli_epi64::<K>(t);
    let into_high = _mm512_bslli_epi128::<8>(carry);
    let top = _mm512_bsrli_epi128::<8>(carry);
    let reduced = _mm512_ternarylogic_epi64::<0x96>(
        top,
        _mm512_slli_epi64::<1>(top),
        _mm512_xor_si512(_mm512_slli_epi64::<2>(top), _mm512_slli_epi64::<7>(top)),
    );
    _mm512_ternarylogic_epi64::<0x96>(shifted, into_high, reduced)
}

/// AES rounds on one register of four blocks (`ENC`: cipher, else equivalent inverse).
#[inline]
#[target_feature(enable = "avx512f,vaes")]
fn round<const ENC: bool>(x: __m512i, k: __m512i) -> __m512i {
    if ENC {
        _mm512_aesenc_epi128(x, k)
    } else {
        _mm512_aesdec_epi128(x, k)
    }
}

#[inline]
#[target_feature(enable = "avx512f,vaes")]
fn last_round<const ENC: bool>(x: __m512i, k: __m512i) -> __m512i {
    if ENC {
        _mm512_aesenclast_epi128(x, k)
    } else {
        _mm512_aesdeclast_epi128(x, k)
    }
}

/// The fused XTS loop; see [`crate::fused::Kernel::xts`].
#[target_feature(enable = "avx512f,avx512bw,vaes")]
fn xts<const NR: usize, const ENC: bool>(
    keys: &RoundKeys,
    data: &mut [Block],
    sector_blocks: usize,
    first: &[Block],
) {
    let mut k = broadcast(keys);
    for (sector, t0) in data.chunks_exact_mut(sector_blocks).zip(first) {
        let t0 = u128::from_le_bytes((*t0).into());
        let t1 = mul_alpha(t0);
        let t2 = mul_alpha(t1);
        let base = lanes([t0, t1, t2, mul_alpha(t2)]);
        // Register j holds the tweaks of blocks 4j..4j+4 of each 32-block stripe.
        let mut tw = [
            base,
            mul_alpha_pow::<4, 60>(base),
            mul_alpha_pow::<8, 56>(base),
            mul_alpha_pow::<12, 52>(base),
            mul_alpha_pow::<16, 48>(base),
            mul_alpha_pow::<20, 44>(base),
            mul_alpha_pow::<24, 40>(base),
            mul_alpha_pow::<28, 36>(base),
        ];
        let stripes = sector.len() / 32;
        for (n, stripe) in sector.chunks_exact_mut(32).enumerate() {
            // The next stripe's tweaks are α^32 further on; a sector's last stripe needs none.
            let more = n + 1 < stripes;
            let p = stripe.as_mut_ptr().cast::<__m512i>();
            let mut x = [_mm512_setzero_si512(); 8];
            for j in 0..8 {
                // SAFETY: a stripe is 32 blocks = 8 registers of 64 bytes; j < 8.
                let d = unsafe { _mm512_loadu_si512(p.add(j)) };
                x[j] = _mm512_ternarylogic_epi64::<0x96>(d, tw[j], k[0]);
            }
            for rk in &k[1..NR] {
                for xj in &mut x {
                    *xj = round::<ENC>(*xj, *rk);
                }
            }
            for j in 0..8 {
                // The last round ends with a key XOR, so the tweak XOR folds into its key.
                let y = last_round::<ENC>(x[j], _mm512_xor_si512(k[NR], tw[j]));
                // SAFETY: as for the load above.
                unsafe { _mm512_storeu_si512(p.add(j), y) };
                if more {
                    tw[j] = mul_alpha_pow::<32, 32>(tw[j]);
                }
            }
        }
    }
    wipe(&mut k);
}

/// Overwrites the broadcast round keys a kernel kept on its stack (the schedules in
/// [`RoundKeys`] wipe themselves on drop).
#[inline]
fn wipe(k: &mut [__m512i; 15]) {
    // SAFETY: `__m512i` is plain bits: every pattern, including all zeros, is valid.
    unsafe { zeroize::zeroize_flat_type(k) };
}

/// AES-ECB encryption of `blocks` in place (IVs to tweaks), four blocks per register.
#[target_feature(enable = "avx512f,avx512bw,vaes")]
fn ecb_encrypt(keys: &RoundKeys, blocks: &mut [Block]) {
    let mut k = broadcast(keys);
    let nr = keys.rounds;
    let mut quad = [Block::default(); 4];
    for chunk in blocks.chunks_mut(4) {
        quad[..chunk.len()].copy_from_slice(chunk);
        let p = quad.as_mut_ptr().cast::<__m512i>();
        // SAFETY: `quad` is four blocks, exactly one 64-byte register.
        let mut x = _mm512_xor_si512(unsafe { _mm512_loadu_si512(p) }, k[0]);
        for rk in &k[1..nr] {
            x = _mm512_aesenc_epi128(x, *rk);
        }
        x = _mm512_aesenclast_epi128(x, k[nr]);
        // SAFETY: as for the load.
        unsafe { _mm512_storeu_si512(p, x) };
        chunk.copy_from_slice(&quad[..chunk.len()]);
    }
    Block::slice_as_flattened_mut(&mut quad).zeroize();
    wipe(&mut k);
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::{BlockCipherEncrypt, KeyInit};

    #[test]
    #[ignore = "needs VAES and AVX-512F/BW; scripts/test runs it where the CPU has them"]
    fn cpu_vaes512_key_expansion_and_ecb_match_the_aes_crate() {
        assert!(available(), "needs VAES and AVX-512F/BW: this CPU lacks it");
        for len in [16usize, 32] {
            let key: Vec<u8> = (0..len as u8)
                .map(|i| i.wrapping_mul(73).wrapping_add(5))
                .collect();
            // SAFETY: `available()` checked AES-NI.
            let rk = unsafe { RoundKeys::expand(&key) };
            let mut ours: Vec<Block> = (0..7u8).map(|i| Block::from([i; 16])).collect();
            let mut want = ours.clone();
            // SAFETY: `available()` checked the features of `ecb_encrypt`.
            unsafe { ecb_encrypt(&rk, &mut ours) };
            match len {
                16 => aes::Aes128::new_from_slice(&key)
                    .unwrap()
                    .encrypt_blocks(&mut want),
                _ => aes::Aes256::new_from_slice(&key)
                    .unwrap()
                    .encrypt_blocks(&mut want),
            }
            assert_eq!(ours, want, "AES-{} ECB", len * 8);
        }
    }
}
