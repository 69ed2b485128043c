//! Fused AES-XTS on plain AES-NI (128-bit XMM registers, one block each), for x86-64 CPUs
//! without VAES: one pass per 128 bytes (eight registers) doing load, tweak XOR, all AES
//! rounds, tweak XOR, store, with the tweaks generated in registers.
//!
//! Why not the portable path there: it reads and writes every block three times (tweak
//! pass, `encrypt_blocks`, tweak pass), which costs about half the speed of OpenSSL's own
//! fused AES-NI XTS. Eight independent blocks cover `aesenc`'s latency (about 4 cycles)
//! on CPUs that issue one or two per cycle.
//!
//! Same structure as `vaes256` and `vaes512` (preferred where present) and the same key
//! schedules (`aesni_keys`). Only used after run-time detection ([`available`]); checked
//! against the portable path byte for byte in `xts.rs`'s unit tests.

use crate::aesni_keys::{load, RoundKeys};
use crate::tweak::mul_alpha;
use aes::Block;
use core::arch::x86_64::*;
use zeroize::Zeroize;

/// True when the running CPU has everything this module is compiled for.
pub(crate) fn available() -> bool {
    std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
}

/// Registers (= blocks) in flight per pass; a 512-byte sector is four passes.
const REGS: usize = 8;

/// The round keys in registers (well, in a stack array the loop reads from).
#[inline]
#[target_feature(enable = "sse2")]
fn loaded(keys: &RoundKeys) -> [__m128i; 15] {
    let mut out = [_mm_setzero_si128(); 15];
    for (o, k) in out.iter_mut().zip(&keys.rk) {
        *o = load(k);
    }
    out
}

crate::fused::kernel_entry_points!("aesni128");

#[inline]
#[target_feature(enable = "sse2")]
fn block(v: u128) -> __m128i {
    _mm_set_epi64x((v >> 64) as u64 as i64, v as u64 as i64)
}

/// Multiplies by α⁸ in GF(2¹²⁸), the step from one pass to the next: a one-byte shift of
/// the whole block, and the byte shifted out carry-less multiplied by 0x87 (x¹²⁸ = x⁷ +
/// x² + x + 1; `poly` holds 0x87 in its low half) back into the bottom.
#[inline]
#[target_feature(enable = "sse2,pclmulqdq")]
fn mul_alpha8(t: __m128i, poly: __m128i) -> __m128i {
    let top = _mm_srli_si128::<15>(t);
    let folded = _mm_clmulepi64_si128::<0x00>(top, poly);
    _mm_xor_si128(_mm_slli_si128::<1>(t), folded)
}

/// AES rounds on one block (`ENC`: cipher, else equivalent inverse).
#[inline]
#[target_feature(enable = "aes")]
fn round<const ENC: bool>(x: __m128i, k: __m128i) -> __m128i {
    if ENC {
        _mm_aesenc_si128(x, k)
    } else {
        _mm_aesdec_si128(x, k)
    }
}

#[inline]
#[target_feature(enable = "aes")]
fn last_round<const ENC: bool>(x: __m128i, k: __m128i) -> __m128i {
    if ENC {
        _mm_aesenclast_si128(x, k)
    } else {
        _mm_aesdeclast_si128(x, k)
    }
}

/// The fused XTS loop; see [`crate::fused::Kernel::xts`].
#[target_feature(enable = "sse2,aes,pclmulqdq")]
fn xts<const NR: usize, const ENC: bool>(
    keys: &RoundKeys,
    data: &mut [Block],
    sector_blocks: usize,
    first: &[Block],
) {
    let mut k = loaded(keys);
    let poly = _mm_set_epi64x(0, 0x87);
    let mut tw = [_mm_setzero_si128(); REGS];
    let mut next = [_mm_setzero_si128(); REGS];
    if let Some(t0) = first.first() {
        tw = sector_tweaks(t0);
    }
    for (i, sector) in data.chunks_exact_mut(sector_blocks).enumerate() {
        let passes = sector.len() / REGS;
        for (n, pass) in sector.chunks_exact_mut(REGS).enumerate() {
            // The next pass's tweaks are α^8 further on; the next sector's first tweaks
            // are computed two passes ahead of its start so that their latency hides
            // behind those rounds (as in `vaes256`).
            let more = n + 1 < passes;
            if n + 2 == passes {
                if let Some(t0) = first.get(i + 1) {
                    next = sector_tweaks(t0);
                }
            }
            let p = pass.as_mut_ptr().cast::<__m128i>();
            let mut x = [_mm_setzero_si128(); REGS];
            for j in 0..REGS {
                // SAFETY: a pass is 8 blocks of 16 bytes; j < 8.
                let d = unsafe { _mm_loadu_si128(p.add(j)) };
                x[j] = _mm_xor_si128(_mm_xor_si128(d, tw[j]), k[0]);
            }
            for rk in &k[1..NR] {
                for xj in &mut x {
                    *xj = round::<ENC>(*xj, *rk);
                }
            }
            for j in 0..REGS {
                // The last round ends with a key XOR, so the tweak XOR folds into its key.
                let y = last_round::<ENC>(x[j], _mm_xor_si128(k[NR], tw[j]));
                // SAFETY: as for the load above.
                unsafe { _mm_storeu_si128(p.add(j), y) };
                if more {
                    tw[j] = mul_alpha8(tw[j], poly);
                }
            }
        }
        tw = next;
    }
    wipe(&mut k);
    wipe(&mut tw);
    wipe(&mut next);
}

/// A sector's first-pass tweaks from its first tweak `t0` (block j's in register j),
/// on the (otherwise idle) scalar units.
#[inline]
#[target_feature(enable = "sse2")]
fn sector_tweaks(t0: &Block) -> [__m128i; REGS] {
    let mut t = u128::from_le_bytes((*t0).into());
    let mut tw = [_mm_setzero_si128(); REGS];
    for tj in &mut tw {
        *tj = block(t);
        t = mul_alpha(t);
    }
    t.zeroize();
    tw
}

/// Overwrites key-derived registers a kernel kept on its stack (round keys, tweaks; the
/// schedules in [`RoundKeys`] wipe themselves on drop).
#[inline]
fn wipe<const N: usize>(v: &mut [__m128i; N]) {
    // SAFETY: `__m128i` is plain bits: every pattern, including all zeros, is valid.
    unsafe { zeroize::zeroize_flat_type(v) };
}

/// AES-ECB encryption of `blocks` in place (IVs to tweaks), eight blocks per pass so
/// that up to 64 IVs do not wait on one block's round latency.
#[target_feature(enable = "sse2,aes")]
fn ecb_encrypt(keys: &RoundKeys, blocks: &mut [Block]) {
    let mut k = loaded(keys);
    let nr = keys.rounds;
    let mut x = [_mm_setzero_si128(); REGS];
    for chunk in blocks.chunks_mut(REGS) {
        let n = chunk.len();
        let p = chunk.as_mut_ptr().cast::<__m128i>();
        for (j, xj) in x[..n].iter_mut().enumerate() {
            // SAFETY: `chunk` holds `n` blocks of 16 bytes; j < n; unaligned load.
            *xj = _mm_xor_si128(unsafe { _mm_loadu_si128(p.add(j)) }, k[0]);
        }
        for rk in &k[1..nr] {
            for xj in &mut x[..n] {
                *xj = _mm_aesenc_si128(*xj, *rk);
            }
        }
        for (j, xj) in x[..n].iter().enumerate() {
            // SAFETY: as for the load.
            unsafe { _mm_storeu_si128(p.add(j), _mm_aesenclast_si128(*xj, k[nr])) };
        }
    }
    wipe(&mut x);
    wipe(&mut k);
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::{BlockCipherEncrypt, KeyInit};

    #[test]
    #[ignore = "needs AES-NI and PCLMULQDQ; scripts/test runs it where the CPU has them"]
    fn cpu_aesni_ecb_and_tweak_step_match_the_definitions() {
        assert!(available(), "needs AES-NI and PCLMULQDQ: this CPU lacks it");
        for len in [16usize, 32] {
            let key: Vec<u8> = (0..len as u8)
                .map(|i| i.wrapping_mul(73).wrapping_add(5))
                .collect();
            // SAFETY: `available()` checked AES-NI.
            let rk = unsafe { RoundKeys::expand(&key) };
            for n in [0usize, 1, 7, 8, 9, 17, 64] {
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
        for t in [1u128, u128::MAX, 1 << 127, 0xff << 120 | 0x1234] {
            let mut want = t;
            for _ in 0..8 {
                want = mul_alpha(want);
            }
            let mut got = [0u8; 16];
            // SAFETY: `available()` checked PCLMULQDQ; `got` is 16 writable bytes.
            unsafe {
                let v = mul_alpha8(block(t), _mm_set_epi64x(0, 0x87));
                _mm_storeu_si128(got.as_mut_ptr().cast(), v);
            }
            assert_eq!(u128::from_le_bytes(got), want, "α^8 of {t:x}");
        }
    }
}
