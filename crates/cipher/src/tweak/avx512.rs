//! AVX-512 tweak passes: four 128-bit tweaks per ZMM register, two registers in flight,
//! each stepped by α⁸ so that the dependent chain is one step per eight blocks.
//!
//! Only called through [`super::TweakBackend::Avx512`], which exists only after run-time
//! detection of AVX-512F and AVX-512BW.

use super::{mul_alpha, portable_xor, portable_xor_fresh};
use aes::Block;
use core::arch::x86_64::*;

/// Multiplies each 128-bit lane by α⁸: shift left by 8 across the lane's two 64-bit
/// halves, and fold the 8 bits shifted out of the top back in times 0x87.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn mul_alpha8(t: __m512i) -> __m512i {
    let carry = _mm512_srli_epi64::<56>(t);
    let shifted = _mm512_slli_epi64::<8>(t);
    // Low half's top byte moves into the high half of the same lane.
    let into_high = _mm512_bslli_epi128::<8>(carry);
    // High half's top byte is x^128 and above: reduce it into the low half.
    let top = _mm512_bsrli_epi128::<8>(carry);
    let reduced = _mm512_ternarylogic_epi64::<0x96>(
        top,
        _mm512_slli_epi64::<1>(top),
        _mm512_ternarylogic_epi64::<0x96>(
            _mm512_slli_epi64::<2>(top),
            _mm512_slli_epi64::<7>(top),
            into_high,
        ),
    );
    _mm512_xor_si512(shifted, reduced)
}

/// Four 128-bit values into one register (lane i = `t[i]`); also used by the fused kernel.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn lanes(t: [u128; 4]) -> __m512i {
    // Little-endian: lane i holds t[i] with its low 64 bits first.
    let q = |v: u128, hi: bool| (if hi { v >> 64 } else { v } as u64) as i64;
    _mm512_set_epi64(
        q(t[3], true),
        q(t[3], false),
        q(t[2], true),
        q(t[2], false),
        q(t[1], true),
        q(t[1], false),
        q(t[0], true),
        q(t[0], false),
    )
}

#[inline]
#[target_feature(enable = "avx512f")]
fn lane0(t: __m512i) -> u128 {
    let lo = _mm_cvtsi128_si64(_mm512_castsi512_si128(t)) as u64;
    let hi = _mm_extract_epi64::<1>(_mm512_castsi512_si128(t)) as u64;
    (u128::from(hi) << 64) | u128::from(lo)
}

/// See [`super::TweakBackend::xor_fresh`]; `data` and `tweaks` have equal lengths.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) fn xor_fresh(data: &mut [Block], t0: u128, tweaks: &mut [Block]) {
    debug_assert_eq!(data.len(), tweaks.len());
    let mut first = [t0; 8];
    for i in 1..8 {
        first[i] = mul_alpha(first[i - 1]);
    }
    let mut tw_a = lanes([first[0], first[1], first[2], first[3]]);
    let mut tw_b = lanes([first[4], first[5], first[6], first[7]]);
    let groups = data.len() / 8;
    let d = data.as_mut_ptr().cast::<__m512i>();
    let t = tweaks.as_mut_ptr().cast::<__m512i>();
    for g in 0..groups {
        // SAFETY: group g covers blocks 8g..8g+8 < len of both slices (equal lengths), i.e.
        // two 64-byte registers at register index 2g and 2g+1; unaligned loads/stores.
        unsafe {
            let d0 = _mm512_loadu_si512(d.add(2 * g));
            let d1 = _mm512_loadu_si512(d.add(2 * g + 1));
            _mm512_storeu_si512(t.add(2 * g), tw_a);
            _mm512_storeu_si512(t.add(2 * g + 1), tw_b);
            _mm512_storeu_si512(d.add(2 * g), _mm512_xor_si512(d0, tw_a));
            _mm512_storeu_si512(d.add(2 * g + 1), _mm512_xor_si512(d1, tw_b));
        }
        tw_a = mul_alpha8(tw_a);
        tw_b = mul_alpha8(tw_b);
    }
    let done = groups * 8;
    if done < data.len() {
        portable_xor_fresh(&mut data[done..], lane0(tw_a), &mut tweaks[done..]);
    }
}

/// See [`super::TweakBackend::xor_again`]; `data` and `tweaks` have equal lengths.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) fn xor(data: &mut [Block], tweaks: &[Block]) {
    debug_assert_eq!(data.len(), tweaks.len());
    let groups = data.len() / 8;
    let d = data.as_mut_ptr().cast::<__m512i>();
    let t = tweaks.as_ptr().cast::<__m512i>();
    for g in 0..groups {
        // SAFETY: as in `xor_fresh`: registers 2g and 2g+1 lie inside both slices.
        unsafe {
            let d0 = _mm512_loadu_si512(d.add(2 * g));
            let d1 = _mm512_loadu_si512(d.add(2 * g + 1));
            let t0 = _mm512_loadu_si512(t.add(2 * g));
            let t1 = _mm512_loadu_si512(t.add(2 * g + 1));
            _mm512_storeu_si512(d.add(2 * g), _mm512_xor_si512(d0, t0));
            _mm512_storeu_si512(d.add(2 * g + 1), _mm512_xor_si512(d1, t1));
        }
    }
    let done = groups * 8;
    portable_xor(&mut data[done..], &tweaks[done..]);
}
