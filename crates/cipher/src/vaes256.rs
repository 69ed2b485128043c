//! Fused AES-XTS on VAES + AVX2 (for CPUs with VAES but no AVX-512, such as AMD Zen 3):
//! one pass per 256 bytes (eight 256-bit registers of two blocks each) doing load, tweak
//! XOR, all AES rounds, tweak XOR, store, with the tweaks generated in registers.
//!
//! Why eight registers: on Zen 3 `vaesenc` has a latency of about 4 cycles and two
//! pipes issue one each per cycle, so eight independent registers (16 blocks) keep both
//! busy; AVX2 has sixteen YMM registers, which leaves room for a round key and temporaries
//! (the tweaks partly live on the stack, where loads are cheap).
//!
//! Same structure as `vaes512` (the AVX-512 kernel, preferred where present; `aesni128`
//! is the fallback below this one) and the same key schedules (`aesni_keys`). Only used
//! after run-time detection ([`available`]); checked against the portable path byte for
//! byte in `xts.rs`'s unit tests and against IEEE 1619 vectors and Python `cryptography`
//! in the integration tests (which run the path the CPU picks).

use crate::aesni_keys::{load, RoundKeys};
use crate::tweak::mul_alpha;
use aes::Block;
use core::arch::x86_64::*;
use zeroize::Zeroize;

/// True when the running CPU has everything this module is compiled for.
pub(crate) fn available() -> bool {
    std::arch::is_x86_feature_detected!("aes")
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("vaes")
        && std::arch::is_x86_feature_detected!("vpclmulqdq")
}

/// Registers in flight per pass, two blocks each.
const REGS: usize = 8;
/// Blocks per pass; a 512-byte sector is two passes.
const PASS_BLOCKS: usize = 2 * REGS;

/// Each round key repeated in both 128-bit lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn broadcast(keys: &RoundKeys) -> [__m256i; 15] {
    let mut out = [_mm256_setzero_si256(); 15];
    for (o, k) in out.iter_mut().zip(&keys.rk) {
        *o = _mm256_broadcastsi128_si256(load(k));
    }
    out
}

crate::fused::kernel_entry_points!("vaes256");

/// Two 128-bit values into one register (low lane `lo`, high lane `hi`).
#[inline]
#[target_feature(enable = "avx2")]
fn pair(lo: u128, hi: u128) -> __m256i {
    let q = |v: u128, upper: bool| (if upper { v >> 64 } else { v } as u64) as i64;
    _mm256_set_epi64x(q(hi, true), q(hi, false), q(lo, true), q(lo, false))
}

/// Multiplies each 128-bit lane by α^(8·B) in GF(2¹²⁸) (B = 1 or 2): a B-byte shift of
/// the whole lane, and the 8·B bits shifted out carry-less multiplied by 0x87 (x¹²⁸ =
/// x⁷ + x² + x + 1; `poly` holds 0x87 in each lane's low half) back into the bottom.
/// α¹⁶ steps from one pass to the next, α⁸ spreads a sector's first tweaks.
#[inline]
#[target_feature(enable = "avx2,vpclmulqdq")]
fn mul_alpha_bytes<const B: i32, const OUT: i32>(t: __m256i, poly: __m256i) -> __m256i {
    const { assert!(B + OUT == 16 && (B == 1 || B == 2)) };
    let top = _mm256_bsrli_epi128::<OUT>(t);
    let folded = _mm256_clmulepi64_epi128::<0x00>(top, poly);
    _mm256_xor_si256(_mm256_bslli_epi128::<B>(t), folded)
}

/// A sector's first-pass tweaks from its first tweak `t0`: register j holds those of
/// blocks 2j and 2j+1. Blocks 0..8 on the (otherwise idle) scalar units via `t`, 8..16
/// by α⁸.
#[inline]
#[target_feature(enable = "avx2,vpclmulqdq")]
fn sector_tweaks(t0: &Block, t: &mut [u128; 8], poly: __m256i) -> [__m256i; REGS] {
    t[0] = u128::from_le_bytes((*t0).into());
    for i in 1..8 {
        t[i] = mul_alpha(t[i - 1]);
    }
    let mut tw = [_mm256_setzero_si256(); REGS];
    for j in 0..4 {
        tw[j] = pair(t[2 * j], t[2 * j + 1]);
        tw[j + 4] = mul_alpha_bytes::<1, 15>(tw[j], poly);
    }
    tw
}

/// AES rounds on one register of two blocks (`ENC`: cipher, else equivalent inverse).
#[inline]
#[target_feature(enable = "avx2,vaes")]
fn round<const ENC: bool>(x: __m256i, k: __m256i) -> __m256i {
    if ENC {
        _mm256_aesenc_epi128(x, k)
    } else {
        _mm256_aesdec_epi128(x, k)
    }
}

#[inline]
#[target_feature(enable = "avx2,vaes")]
fn last_round<const ENC: bool>(x: __m256i, k: __m256i) -> __m256i {
    if ENC {
        _mm256_aesenclast_epi128(x, k)
    } else {
        _mm256_aesdeclast_epi128(x, k)
    }
}

/// The fused XTS loop; see [`crate::fused::Kernel::xts`].
#[target_feature(enable = "avx2,vaes,vpclmulqdq")]
fn xts<const NR: usize, const ENC: bool>(
    keys: &RoundKeys,
    data: &mut [Block],
    sector_blocks: usize,
    first: &[Block],
) {
    let mut k = broadcast(keys);
    let poly = _mm256_set_epi64x(0, 0x87, 0, 0x87);
    let mut t = [0u128; 8];
    let mut tw = [_mm256_setzero_si256(); REGS];
    let mut next = [_mm256_setzero_si256(); REGS];
    if let Some(t0) = first.first() {
        tw = sector_tweaks(t0, &mut t, poly);
    }
    for (i, sector) in data.chunks_exact_mut(sector_blocks).enumerate() {
        let passes = sector.len() / PASS_BLOCKS;
        for (n, pass) in sector.chunks_exact_mut(PASS_BLOCKS).enumerate() {
            // The next pass's tweaks are α^16 further on. The next sector's first tweaks
            // are computed two passes ahead of its start, so that their latency hides
            // behind those rounds (measured on Zen 3: computed after them, -25 % at
            // 512-byte sectors; one pass ahead, -7 %; a whole 4 KiB sector ahead, -6 %
            // there). Written as one loop on purpose: split into separate pass calls,
            // LLVM scheduled each register's rounds back to back (-20 %).
            let more = n + 1 < passes;
            if n + 2 == passes {
                if let Some(t0) = first.get(i + 1) {
                    next = sector_tweaks(t0, &mut t, poly);
                }
            }
            let p = pass.as_mut_ptr().cast::<__m256i>();
            let mut x = [_mm256_setzero_si256(); REGS];
            for j in 0..REGS {
                // SAFETY: a pass is 16 blocks = 8 registers of 32 bytes; j < 8.
                let d = unsafe { _mm256_loadu_si256(p.add(j)) };
                x[j] = _mm256_xor_si256(_mm256_xor_si256(d, tw[j]), k[0]);
            }
            for rk in &k[1..NR] {
                for xj in &mut x {
                    *xj = round::<ENC>(*xj, *rk);
                }
            }
            for j in 0..REGS {
                // The last round ends with a key XOR, so the tweak XOR folds into its key.
                let y = last_round::<ENC>(x[j], _mm256_xor_si256(k[NR], tw[j]));
                // SAFETY: as for the load above.
                unsafe { _mm256_storeu_si256(p.add(j), y) };
                if more {
                    tw[j] = mul_alpha_bytes::<2, 14>(tw[j], poly);
                }
            }
        }
        tw = next;
    }
    wipe(&mut k);
    wipe(&mut tw);
    wipe(&mut next);
    t.zeroize();
}

/// Overwrites key-derived registers a kernel kept on its stack (round keys, tweaks; the
/// schedules in [`RoundKeys`] wipe themselves on drop).
#[inline]
fn wipe<const N: usize>(v: &mut [__m256i; N]) {
    // SAFETY: `__m256i` is plain bits: every pattern, including all zeros, is valid.
    unsafe { zeroize::zeroize_flat_type(v) };
}

/// AES-ECB encryption of `blocks` in place (IVs to tweaks), eight registers (16 blocks)
/// per pass so that up to 64 IVs do not wait on one register's round latency.
#[target_feature(enable = "avx2,vaes")]
fn ecb_encrypt(keys: &RoundKeys, blocks: &mut [Block]) {
    let mut k = broadcast(keys);
    let nr = keys.rounds;
    let mut scratch = [Block::default(); PASS_BLOCKS];
    let mut x = [_mm256_setzero_si256(); REGS];
    for chunk in blocks.chunks_mut(PASS_BLOCKS) {
        // A short last chunk leaves stale blocks behind it in `scratch`; they are
        // enciphered too and never copied out.
        scratch[..chunk.len()].copy_from_slice(chunk);
        let p = scratch.as_mut_ptr().cast::<__m256i>();
        for (j, xj) in x.iter_mut().enumerate() {
            // SAFETY: `scratch` is 16 blocks, exactly eight 32-byte registers; j < 8.
            *xj = _mm256_xor_si256(unsafe { _mm256_loadu_si256(p.add(j)) }, k[0]);
        }
        for rk in &k[1..nr] {
            for xj in &mut x {
                *xj = _mm256_aesenc_epi128(*xj, *rk);
            }
        }
        for (j, xj) in x.iter().enumerate() {
            // SAFETY: as for the load.
            unsafe { _mm256_storeu_si256(p.add(j), _mm256_aesenclast_epi128(*xj, k[nr])) };
        }
        chunk.copy_from_slice(&scratch[..chunk.len()]);
    }
    Block::slice_as_flattened_mut(&mut scratch).zeroize();
    wipe(&mut x);
    wipe(&mut k);
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::{BlockCipherEncrypt, KeyInit};

    #[test]
    #[ignore = "needs VAES, VPCLMULQDQ and AVX2; scripts/test runs it where the CPU has them"]
    fn cpu_vaes256_ecb_matches_the_aes_crate() {
        assert!(
            available(),
            "needs VAES, VPCLMULQDQ and AVX2: this CPU lacks it"
        );
        for len in [16usize, 32] {
            let key: Vec<u8> = (0..len as u8)
                .map(|i| i.wrapping_mul(73).wrapping_add(5))
                .collect();
            // SAFETY: `available()` checked AES-NI.
            let rk = unsafe { RoundKeys::expand(&key) };
            for n in [0usize, 1, 2, 7, 15, 16, 17, 33, 64] {
                let mut ours: Vec<Block> = (0..n as u8).map(|i| Block::from([i; 16])).collect();
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
                assert_eq!(ours, want, "AES-{} ECB of {n} blocks", len * 8);
            }
        }
    }

    #[test]
    #[ignore = "needs VAES, VPCLMULQDQ and AVX2; scripts/test runs it where the CPU has them"]
    fn cpu_vaes256_tweak_steps_match_repeated_alpha() {
        assert!(
            available(),
            "needs VAES, VPCLMULQDQ and AVX2: this CPU lacks it"
        );
        let lane = |v: __m256i, hi: bool| -> u128 {
            let mut b = [0u8; 32];
            // SAFETY: `b` is 32 writable bytes; unaligned store.
            unsafe { _mm256_storeu_si256(b.as_mut_ptr().cast(), v) };
            let half: [u8; 16] = b[if hi { 16 } else { 0 }..][..16].try_into().unwrap();
            u128::from_le_bytes(half)
        };
        let alpha_n = |mut t: u128, n: u32| {
            for _ in 0..n {
                t = mul_alpha(t);
            }
            t
        };
        for t in [
            1u128,
            u128::MAX,
            1 << 127,
            0xffff << 112 | 0x1234,
            0x8765_4321 << 90,
        ] {
            let u = t.rotate_left(37);
            // SAFETY: `available()` checked AVX2 and VPCLMULQDQ.
            let (p8, p16) = unsafe {
                let v = pair(t, u);
                let poly = _mm256_set_epi64x(0, 0x87, 0, 0x87);
                (
                    mul_alpha_bytes::<1, 15>(v, poly),
                    mul_alpha_bytes::<2, 14>(v, poly),
                )
            };
            for (got, n) in [(p8, 8), (p16, 16)] {
                assert_eq!(lane(got, false), alpha_n(t, n), "α^{n} low lane of {t:x}");
                assert_eq!(lane(got, true), alpha_n(u, n), "α^{n} high lane of {u:x}");
            }
        }
    }
}
