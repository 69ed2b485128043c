//! SHA-256 of many 4096- or 512-byte blocks at once, for checksum resilience.
//!
//! Checksum mode stores plain SHA-256 of every block of the old data (what
//! cryptsetup stores: 4096-byte blocks on image files and 4K-sector devices,
//! 512-byte ones on 512-byte-sector devices), so hashing runs over many
//! independent, equally long messages. SHA-NI hashes one message at a time; with AVX-512 the same FIPS
//! 180-4 compression runs on 16 messages at once, one per 32-bit lane of a
//! 512-bit register, which is faster than SHA-NI on the CPUs that have both.
//!
//! Groups of 16 blocks go through the vector path when the CPU has AVX-512F and
//! AVX-512BW (checked at run time); pairs of the blocks left go through an
//! interleaved SHA-NI path where the CPU has SHA-NI (`shani`); the rest, and every
//! block on other CPUs, go through `sha2` (which itself uses SHA-NI where available).

use sha2::{Digest as _, Sha256};

/// Length of each hashed message.
const BLOCK: usize = 4096;
/// SHA-256 digest length.
const DIGEST: usize = 32;
/// Messages hashed together by the vector path (32-bit lanes in 512 bits).
const LANES: usize = 16;

/// Appends the SHA-256 digest of each 4096-byte block of `data` to `out`.
///
/// `data.len()` should be a multiple of 4096; a shorter tail, if any, is hashed
/// as one last message of its own length (as `data.chunks(4096)` would).
#[cfg(test)]
pub(crate) fn hash_4k_blocks(data: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + data.len().div_ceil(BLOCK) * DIGEST, 0);
    hash_4k_blocks_to_slice(data, &mut out[start..]);
}

/// Writes the SHA-256 digest of each 4096-byte block of `data` into `out`
/// (32 bytes per block, `out.len()` = blocks * 32; a shorter tail counts as a block).
pub(crate) fn hash_4k_blocks_to_slice(data: &[u8], out: &mut [u8]) {
    hash_blocks_to_slice::<BLOCK>(data, out);
}

/// [`hash_4k_blocks_to_slice`] for 512-byte blocks (checksums on devices with 512-byte
/// sectors, as cryptsetup makes them there): the same two SHA-NI streams.
pub(crate) fn hash_512_blocks_to_slice(data: &[u8], out: &mut [u8]) {
    hash_blocks_to_slice::<512>(data, out);
}

fn hash_blocks_to_slice<const LEN: usize>(data: &[u8], out: &mut [u8]) {
    assert_eq!(
        out.len(),
        data.len().div_ceil(LEN) * DIGEST,
        "digest buffer does not match the number of blocks"
    );
    let mut data = data;
    let mut out = out;
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        let groups = data.len() / (LEN * LANES);
        let (vec_data, rest_data) = data.split_at(groups * LEN * LANES);
        let (vec_out, rest_out) = out.split_at_mut(groups * DIGEST * LANES);
        for (g, (d, o)) in vec_data
            .chunks_exact(LEN * LANES)
            .zip(vec_out.chunks_exact_mut(DIGEST * LANES))
            .enumerate()
        {
            if LEN < BLOCK {
                // Sixteen 4096-byte messages are sixteen sequential streams, which
                // the hardware prefetcher follows; sixteen 512-byte ones are one
                // 8 KiB run read at a 512-byte stride, which it did not: hashing them
                // from memory ran at 2.0 GB/s against 3.1 in cache. The next group is
                // asked for (into L2) while this one is hashed.
                if let Some(next) = vec_data.get((g + 1) * LEN * LANES..(g + 2) * LEN * LANES) {
                    avx512::prefetch(next);
                }
            }
            let o: &mut [u8; DIGEST * LANES] = o.try_into().expect("chunks_exact length");
            // SAFETY: `available()` just confirmed the CPU supports avx512f and
            // avx512bw; `d` is exactly LANES messages of LEN bytes.
            unsafe { avx512::hash_16::<LEN>(d, o) };
        }
        data = rest_data;
        out = rest_out;
    }
    #[cfg(target_arch = "x86_64")]
    if shani::available() {
        let groups = data.len() / (LEN * shani::WAYS);
        let (ni_data, rest_data) = data.split_at(groups * LEN * shani::WAYS);
        let (ni_out, rest_out) = out.split_at_mut(groups * DIGEST * shani::WAYS);
        for (d, o) in ni_data
            .chunks_exact(LEN * shani::WAYS)
            .zip(ni_out.chunks_exact_mut(DIGEST * shani::WAYS))
        {
            // SAFETY: `available()` just confirmed SHA, SSSE3 and SSE4.1; the
            // slices are exactly WAYS messages and WAYS digests long.
            unsafe { shani::hash_ways::<LEN>(d, o) };
        }
        data = rest_data;
        out = rest_out;
    }
    hash_serial::<LEN>(data, out);
}

/// The portable path: one message at a time through `sha2`.
fn hash_serial<const LEN: usize>(data: &[u8], out: &mut [u8]) {
    for (b, o) in data.chunks(LEN).zip(out.chunks_exact_mut(DIGEST)) {
        o.copy_from_slice(&Sha256::digest(b));
    }
}

/// The constants of FIPS 180-4 §4.2.2 and §5.3.3, derived from their
/// definitions rather than typed in: K are the first 32 bits of the fractional
/// parts of the cube roots of the first 64 primes, H(0) of the square roots of
/// the first 8 primes.
mod consts {
    const fn first_primes<const N: usize>() -> [u32; N] {
        let mut primes = [0u32; N];
        let mut found = 0;
        let mut candidate = 2u32;
        while found < N {
            let mut d = 2u32;
            let mut prime = true;
            while d * d <= candidate {
                if candidate.is_multiple_of(d) {
                    prime = false;
                    break;
                }
                d += 1;
            }
            if prime {
                primes[found] = candidate;
                found += 1;
            }
            candidate += 1;
        }
        primes
    }

    /// Largest x with x^root <= n (root is 2 or 3), by bisection.
    const fn int_root(n: u128, root: u32) -> u128 {
        let (mut lo, mut hi) = (0u128, 1u128 << 43);
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if mid.pow(root) <= n {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }

    /// First 32 bits of the fractional part of p^(1/root): floor(p^(1/root) * 2^32)
    /// = floor((p * 2^(32*root))^(1/root)), then drop the integer part.
    const fn fraction_bits(p: u32, root: u32) -> u32 {
        // Truncation keeps the low 32 bits, i.e. drops the integer part.
        int_root((p as u128) << (32 * root), root) as u32
    }

    pub(super) const K: [u32; 64] = {
        let primes = first_primes::<64>();
        let mut k = [0u32; 64];
        let mut i = 0;
        while i < 64 {
            k[i] = fraction_bits(primes[i], 3);
            i += 1;
        }
        k
    };

    pub(super) const H0: [u32; 8] = {
        let primes = first_primes::<8>();
        let mut h = [0u32; 8];
        let mut i = 0;
        while i < 8 {
            h[i] = fraction_bits(primes[i], 2);
            i += 1;
        }
        h
    };

    /// W[t] + K[t] for the last compression of every message of `len` bytes (a
    /// multiple of 64): its block is only padding (FIPS 180-4 §5.1.1: a 1 bit,
    /// zeros, then the message length in bits as a 64-bit big-endian number), the
    /// same for every message of that length, so its schedule (§6.2.2 step 1) is
    /// computed once, at compile time.
    pub(super) const fn pad_kw(len: usize) -> [u32; 64] {
        let mut w = [0u32; 64];
        w[0] = 0x8000_0000;
        let bits = (len as u64) * 8;
        w[14] = (bits >> 32) as u32;
        w[15] = bits as u32;
        let mut t = 16;
        while t < 64 {
            let s0 = w[t - 15].rotate_right(7) ^ w[t - 15].rotate_right(18) ^ (w[t - 15] >> 3);
            let s1 = w[t - 2].rotate_right(17) ^ w[t - 2].rotate_right(19) ^ (w[t - 2] >> 10);
            w[t] = s1
                .wrapping_add(w[t - 7])
                .wrapping_add(s0)
                .wrapping_add(w[t - 16]);
            t += 1;
        }
        let mut t = 0;
        while t < 64 {
            w[t] = w[t].wrapping_add(K[t]);
            t += 1;
        }
        w
    }
}

/// SHA-NI over several 4096-byte messages at once, their rounds interleaved.
///
/// Why: one SHA-NI stream is bound by the latency of `sha256rnds2` (each pair of
/// rounds needs the previous state), which left `sha2` at 1.45-1.55 GB/s per core on
/// Zen 3 and made checksum mode the slowest (its hash cost 1.5 s of CPU per 2 GiB).
/// The messages are independent, so [`WAYS`] of them run side by side and fill the
/// SHA unit's pipeline: 2 ways hash at 1.98-2.00 GB/s (1.28-1.31x `sha2`, best of 10
/// over 64 MiB, `throughput` below); 3 and 4 ways measured 1.18x and 1.21x (the SHA
/// unit is then saturated: 56 of its instructions per block, rounds plus schedule).
/// The last block of every message is the same padding block, whose schedule is
/// precomputed (`pad_kw`).
#[cfg(target_arch = "x86_64")]
mod shani {
    use super::consts::{pad_kw, H0, K};
    use super::DIGEST;
    use std::arch::x86_64::*;

    /// Messages hashed side by side.
    pub(super) const WAYS: usize = 2;

    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("sha")
            && std::arch::is_x86_feature_detected!("ssse3")
            && std::arch::is_x86_feature_detected!("sse4.1")
    }

    /// Four 32-bit words (lane 0 first) into a register.
    #[inline]
    #[target_feature(enable = "sse2")]
    fn words(w: &[u32]) -> __m128i {
        _mm_set_epi32(w[3] as i32, w[2] as i32, w[1] as i32, w[0] as i32)
    }

    /// Rounds 4g..4g+3 on each stream, from W[t] + K[t] in `kw[n]`: `sha256rnds2`
    /// does two rounds from the low two words, then two from the high two.
    #[inline]
    #[target_feature(enable = "sha,sse2")]
    fn four_rounds(abef: &mut [__m128i; WAYS], cdgh: &mut [__m128i; WAYS], kw: [__m128i; WAYS]) {
        for n in 0..WAYS {
            cdgh[n] = _mm_sha256rnds2_epu32(cdgh[n], abef[n], kw[n]);
        }
        for n in 0..WAYS {
            abef[n] = _mm_sha256rnds2_epu32(abef[n], cdgh[n], _mm_shuffle_epi32(kw[n], 0x0e));
        }
    }

    /// One 64-byte block of each stream: `blk[n]` holds stream n's block.
    // `n` indexes one stream across several arrays; iterators would hide that.
    #[allow(clippy::needless_range_loop)]
    #[inline]
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    fn compress(abef: &mut [__m128i; WAYS], cdgh: &mut [__m128i; WAYS], blk: [&[u8]; WAYS]) {
        // Message words are big-endian: byte-swap each 32-bit word.
        let bswap = _mm_set_epi64x(0x0c0d_0e0f_0809_0a0b, 0x0405_0607_0001_0203);
        let (save_abef, save_cdgh) = (*abef, *cdgh);
        let mut w = [[_mm_setzero_si128(); WAYS]; 4];
        for (i, wi) in w.iter_mut().enumerate() {
            for n in 0..WAYS {
                // SAFETY: each block is 64 bytes; i < 4 loads 16 bytes at 16*i.
                let m = unsafe { _mm_loadu_si128(blk[n].as_ptr().add(16 * i).cast()) };
                wi[n] = _mm_shuffle_epi8(m, bswap);
            }
        }
        for g in 0..16 {
            if g >= 4 {
                // W[4g..4g+4] from the four groups before (FIPS 180-4 §6.2.2 step 1):
                // msg1 adds σ0, the alignr picks W[t-7], msg2 adds σ1.
                for n in 0..WAYS {
                    let t = _mm_sha256msg1_epu32(w[g % 4][n], w[(g - 3) % 4][n]);
                    let t =
                        _mm_add_epi32(t, _mm_alignr_epi8(w[(g - 1) % 4][n], w[(g - 2) % 4][n], 4));
                    w[g % 4][n] = _mm_sha256msg2_epu32(t, w[(g - 1) % 4][n]);
                }
            }
            let k = words(&K[4 * g..4 * g + 4]);
            let mut kw = [_mm_setzero_si128(); WAYS];
            for n in 0..WAYS {
                kw[n] = _mm_add_epi32(w[g % 4][n], k);
            }
            four_rounds(abef, cdgh, kw);
        }
        for n in 0..WAYS {
            abef[n] = _mm_add_epi32(abef[n], save_abef[n]);
            cdgh[n] = _mm_add_epi32(cdgh[n], save_cdgh[n]);
        }
    }

    /// The SHA-256 digests of `WAYS` messages of `LEN` bytes (a multiple of 64;
    /// `data`, one after the other) into `out` (32 bytes each).
    ///
    /// # Safety
    /// The CPU has SHA, SSSE3 and SSE4.1 ([`available`]).
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    pub(super) unsafe fn hash_ways<const LEN: usize>(data: &[u8], out: &mut [u8]) {
        const { assert!(LEN > 0 && LEN.is_multiple_of(64)) };
        let pad: [u32; 64] = const { pad_kw(LEN) };
        assert_eq!(data.len(), LEN * WAYS, "WAYS messages");
        assert_eq!(out.len(), DIGEST * WAYS, "WAYS digests");
        // State in the order sha256rnds2 wants: (a, b, e, f) and (c, d, g, h), each
        // register's highest lane first.
        let h = |i: usize| H0[i] as i32;
        let mut abef = [_mm_set_epi32(h(0), h(1), h(4), h(5)); WAYS];
        let mut cdgh = [_mm_set_epi32(h(2), h(3), h(6), h(7)); WAYS];
        for b in 0..LEN / 64 {
            let blk: [&[u8]; WAYS] =
                std::array::from_fn(|n| &data[n * LEN + 64 * b..n * LEN + 64 * b + 64]);
            compress(&mut abef, &mut cdgh, blk);
        }
        // The padding block: W + K precomputed, no schedule.
        let (save_abef, save_cdgh) = (abef, cdgh);
        for g in 0..16 {
            let kw = words(&pad[4 * g..4 * g + 4]);
            four_rounds(&mut abef, &mut cdgh, [kw; WAYS]);
        }
        for n in 0..WAYS {
            let a = _mm_add_epi32(abef[n], save_abef[n]);
            let c = _mm_add_epi32(cdgh[n], save_cdgh[n]);
            // Lanes (high to low): a b e f and c d g h.
            let mut x = [0u32; 4];
            let mut y = [0u32; 4];
            // SAFETY: 16-byte stores into 16-byte arrays.
            unsafe {
                _mm_storeu_si128(x.as_mut_ptr().cast(), a);
                _mm_storeu_si128(y.as_mut_ptr().cast(), c);
            }
            let hv = [x[3], x[2], y[3], y[2], x[1], x[0], y[1], y[0]];
            for (i, v) in hv.iter().enumerate() {
                out[n * DIGEST + 4 * i..n * DIGEST + 4 * i + 4].copy_from_slice(&v.to_be_bytes());
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::consts::{pad_kw, H0, K};
    use super::{DIGEST, LANES};
    use std::arch::x86_64::*;

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
    }

    /// Asks for every cache line of `data` to be brought into L2.
    pub(super) fn prefetch(data: &[u8]) {
        for line in data.chunks(64) {
            // SAFETY: a prefetch is a hint: it reads nothing into the program and
            // cannot fault; the address is inside `data` anyway. SSE is part of
            // x86-64's baseline.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(line.as_ptr().cast()) };
        }
    }

    // `_mm512_ternarylogic_epi32` immediates: the truth table of the boolean
    // function, i.e. the function applied to the canonical operand patterns.
    const A: u8 = 0xf0;
    const B: u8 = 0xcc;
    const C: u8 = 0xaa;
    const XOR3: i32 = (A ^ B ^ C) as i32;
    /// Ch(x, y, z) = (x AND y) XOR (NOT x AND z).
    const CH: i32 = ((A & B) ^ (!A & C)) as i32;
    /// Maj(x, y, z) = (x AND y) XOR (x AND z) XOR (y AND z).
    const MAJ: i32 = ((A & B) ^ (A & C) ^ (B & C)) as i32;

    // The helpers below are safe `#[target_feature]` functions: the compiler lets
    // only code compiled with the same features (here `hash_16`) call them without
    // `unsafe`, and inlines them there.

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn xor3(a: __m512i, b: __m512i, c: __m512i) -> __m512i {
        _mm512_ternarylogic_epi32::<XOR3>(a, b, c)
    }

    /// Σ0, Σ1, σ0, σ1 of FIPS 180-4 §4.1.2, lane-wise.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn big_sigma0(x: __m512i) -> __m512i {
        xor3(
            _mm512_ror_epi32::<2>(x),
            _mm512_ror_epi32::<13>(x),
            _mm512_ror_epi32::<22>(x),
        )
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn big_sigma1(x: __m512i) -> __m512i {
        xor3(
            _mm512_ror_epi32::<6>(x),
            _mm512_ror_epi32::<11>(x),
            _mm512_ror_epi32::<25>(x),
        )
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn small_sigma0(x: __m512i) -> __m512i {
        xor3(
            _mm512_ror_epi32::<7>(x),
            _mm512_ror_epi32::<18>(x),
            _mm512_srli_epi32::<3>(x),
        )
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn small_sigma1(x: __m512i) -> __m512i {
        xor3(
            _mm512_ror_epi32::<17>(x),
            _mm512_ror_epi32::<19>(x),
            _mm512_srli_epi32::<10>(x),
        )
    }

    /// The working variables a..h, one message per lane.
    type State = [__m512i; 8];

    /// One round of §6.2.2 step 3, in place: instead of shifting all eight
    /// working variables, the caller renames them (the new `a` is left in `h`,
    /// the new `e` in `d`), so a run of eight rounds returns to the first naming.
    #[allow(clippy::too_many_arguments)] // the eight working variables plus W[t] + K[t]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn round(
        a: __m512i,
        b: __m512i,
        c: __m512i,
        d: &mut __m512i,
        e: __m512i,
        f: __m512i,
        g: __m512i,
        h: &mut __m512i,
        kw: __m512i,
    ) {
        let t1 = _mm512_add_epi32(
            _mm512_add_epi32(*h, big_sigma1(e)),
            _mm512_add_epi32(_mm512_ternarylogic_epi32::<CH>(e, f, g), kw),
        );
        let t2 = _mm512_add_epi32(big_sigma0(a), _mm512_ternarylogic_epi32::<MAJ>(a, b, c));
        *d = _mm512_add_epi32(*d, t1);
        *h = _mm512_add_epi32(t1, t2);
    }

    /// Eight rounds, given W[t] + K[t] for each of them.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn eight_rounds(v: &mut State, kw: &[__m512i; 8]) {
        let [a, b, c, d, e, f, g, h] = v;
        round(*a, *b, *c, d, *e, *f, *g, h, kw[0]);
        round(*h, *a, *b, c, *d, *e, *f, g, kw[1]);
        round(*g, *h, *a, b, *c, *d, *e, f, kw[2]);
        round(*f, *g, *h, a, *b, *c, *d, e, kw[3]);
        round(*e, *f, *g, h, *a, *b, *c, d, kw[4]);
        round(*d, *e, *f, g, *h, *a, *b, c, kw[5]);
        round(*c, *d, *e, f, *g, *h, *a, b, kw[6]);
        round(*b, *c, *d, e, *f, *g, *h, a, kw[7]);
    }

    /// §6.2.2 step 4: H(i) = H(i-1) + the working variables.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn add_state(hv: &mut State, v: &State) {
        for (x, y) in hv.iter_mut().zip(v) {
            *x = _mm512_add_epi32(*x, *y);
        }
    }

    /// Rounds T0..T0 + 8 of a data block. The message schedule (§6.2.2 step 1)
    /// is computed as the rounds need it, in a ring of 16 words where W[t]
    /// replaces W[t - 16]; T0 is a constant so that every ring index is one and
    /// the ring can stay in registers.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn schedule_and_rounds<const T0: usize>(v: &mut State, w: &mut [__m512i; 16]) {
        let mut kw = [_mm512_setzero_si512(); 8];
        for (i, kw_t) in kw.iter_mut().enumerate() {
            let t = T0 + i;
            if t >= 16 {
                w[t % 16] = _mm512_add_epi32(
                    _mm512_add_epi32(small_sigma1(w[(t - 2) % 16]), w[(t - 7) % 16]),
                    _mm512_add_epi32(small_sigma0(w[(t - 15) % 16]), w[t % 16]),
                );
            }
            *kw_t = _mm512_add_epi32(w[t % 16], _mm512_set1_epi32(K[t] as i32));
        }
        eight_rounds(v, &kw);
    }

    /// Compresses one block given its 16 message words (one message per lane).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn compress_block(hv: &mut State, mut w: [__m512i; 16]) {
        let mut v = *hv;
        schedule_and_rounds::<0>(&mut v, &mut w);
        schedule_and_rounds::<8>(&mut v, &mut w);
        schedule_and_rounds::<16>(&mut v, &mut w);
        schedule_and_rounds::<24>(&mut v, &mut w);
        schedule_and_rounds::<32>(&mut v, &mut w);
        schedule_and_rounds::<40>(&mut v, &mut w);
        schedule_and_rounds::<48>(&mut v, &mut w);
        schedule_and_rounds::<56>(&mut v, &mut w);
        add_state(hv, &v);
    }

    /// Compresses the padding block of a message whose padding block's
    /// W[t] + K[t] is `pad` (the same in every lane).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn compress_padding(hv: &mut State, pad: &[u32; 64]) {
        let mut v = *hv;
        for kw in pad.chunks_exact(8) {
            let kw: [__m512i; 8] = std::array::from_fn(|i| _mm512_set1_epi32(kw[i] as i32));
            eight_rounds(&mut v, &kw);
        }
        add_state(hv, &v);
    }

    /// Loads 64-byte block `blk` of each of the 16 messages (message i at
    /// `data[i * len..]`) and returns the 16 message words W[0..16], word j of
    /// lane i being big-endian word j of message i.
    ///
    /// Loads one row per message, byte-swaps each 32-bit word, then transposes
    /// the 16x16 word matrix: 32-bit then 64-bit interleaves transpose each 4x4
    /// tile inside the 128-bit lanes, two 128-bit shuffles transpose the tiles.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn load_words(data: &[u8], len: usize, blk: usize) -> [__m512i; 16] {
        // Reverses the bytes of each 32-bit word (indices within each 128-bit lane).
        let bswap = _mm512_broadcast_i32x4(_mm_set_epi8(
            12, 13, 14, 15, 8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3,
        ));
        let mut r = [_mm512_setzero_si512(); 16];
        for (i, row) in r.iter_mut().enumerate() {
            let bytes: &[u8; 64] = data[i * len + blk * 64..][..64]
                .try_into()
                .expect("64-byte slice");
            // SAFETY: `bytes` is 64 readable bytes, exactly what the load
            // reads; loadu has no alignment requirement.
            let raw = unsafe { _mm512_loadu_si512(bytes.as_ptr().cast()) };
            *row = _mm512_shuffle_epi8(raw, bswap);
        }
        // a[2k]: words (4c, 4c+1) of rows 2k, 2k+1 interleaved in each 128-bit
        // lane c; a[2k+1]: words (4c+2, 4c+3).
        let mut a = [_mm512_setzero_si512(); 16];
        for k in 0..8 {
            a[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
            a[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
        }
        // b[4m + q], 128-bit lane c: word 4c + q of rows 4m..4m+3.
        let mut b = [_mm512_setzero_si512(); 16];
        for m in 0..4 {
            b[4 * m] = _mm512_unpacklo_epi64(a[4 * m], a[4 * m + 2]);
            b[4 * m + 1] = _mm512_unpackhi_epi64(a[4 * m], a[4 * m + 2]);
            b[4 * m + 2] = _mm512_unpacklo_epi64(a[4 * m + 1], a[4 * m + 3]);
            b[4 * m + 3] = _mm512_unpackhi_epi64(a[4 * m + 1], a[4 * m + 3]);
        }
        // For each q, x[m] = b[4m + q] is a 4x4 matrix of 128-bit lanes
        // (x[m] lane c = word 4c + q of rows 4m..4m+3); W[4c + q] needs lane m
        // = x[m] lane c, i.e. the transpose of that matrix.
        let mut w = [_mm512_setzero_si512(); 16];
        for q in 0..4 {
            let x = [b[q], b[4 + q], b[8 + q], b[12 + q]];
            // y0 = x0.l0 x0.l1 x1.l0 x1.l1, y1 = x0.l2 x0.l3 x1.l2 x1.l3, same for x2/x3.
            let y0 = _mm512_shuffle_i32x4::<0x44>(x[0], x[1]);
            let y1 = _mm512_shuffle_i32x4::<0xee>(x[0], x[1]);
            let y2 = _mm512_shuffle_i32x4::<0x44>(x[2], x[3]);
            let y3 = _mm512_shuffle_i32x4::<0xee>(x[2], x[3]);
            // Even lanes of the first pair, then of the second: lane c of x0..x3.
            w[q] = _mm512_shuffle_i32x4::<0x88>(y0, y2);
            w[4 + q] = _mm512_shuffle_i32x4::<0xdd>(y0, y2);
            w[8 + q] = _mm512_shuffle_i32x4::<0x88>(y1, y3);
            w[12 + q] = _mm512_shuffle_i32x4::<0xdd>(y1, y3);
        }
        w
    }

    /// Hashes 16 messages of `LEN` bytes each (a multiple of 64; message i =
    /// `data[i * LEN..][..LEN]`) and writes digest i to `out[i * 32..][..32]`.
    ///
    /// # Safety
    /// The CPU must support avx512f and avx512bw.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn hash_16<const LEN: usize>(data: &[u8], out: &mut [u8; DIGEST * LANES]) {
        const { assert!(LEN > 0 && LEN.is_multiple_of(64)) };
        let pad: [u32; 64] = const { pad_kw(LEN) };
        assert_eq!(data.len(), LEN * LANES, "LANES messages");
        let mut hv: State = H0.map(|x| _mm512_set1_epi32(x as i32));
        for blk in 0..LEN / 64 {
            // The next block of each message is asked for while this one is
            // compressed. Sixteen messages of 4096 bytes are sixteen sequential
            // streams that the hardware prefetcher follows; sixteen of 512 bytes are
            // one 8 KiB run read at a 512-byte stride, which it does not, and their
            // loads then waited on memory (the 512-byte path hashed at 2.0 GB/s from
            // memory against 3.1 in cache).

            compress_block(&mut hv, load_words(data, LEN, blk));
        }
        compress_padding(&mut hv, &pad);

        // hv[j] lane i = word j of digest i; written big-endian (§6.2.2 final hash).
        let mut words = [[0u32; LANES]; 8];
        for (dst, src) in words.iter_mut().zip(&hv) {
            // SAFETY: `dst` is 16 u32 = 64 writable bytes; storeu has no
            // alignment requirement.
            unsafe { _mm512_storeu_si512(dst.as_mut_ptr().cast(), *src) };
        }
        for (lane, digest) in out.chunks_exact_mut(DIGEST).enumerate() {
            for (j, word) in digest.chunks_exact_mut(4).enumerate() {
                word.copy_from_slice(&words[j][lane].to_be_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes (xorshift64*), different per seed.
    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                s ^= s >> 12;
                s ^= s << 25;
                s ^= s >> 27;
                (s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
            })
            .collect()
    }

    fn reference(data: &[u8]) -> Vec<u8> {
        reference_of::<BLOCK>(data)
    }

    /// `sha2`'s digest of each `LEN`-byte block of `data`, one after the other.
    fn reference_of<const LEN: usize>(data: &[u8]) -> Vec<u8> {
        data.chunks(LEN)
            .flat_map(|b| Sha256::digest(b).to_vec())
            .collect()
    }

    #[test]
    fn derived_constants_match_fips_180_4() {
        // Spot checks against the printed tables of FIPS 180-4 §4.2.2 and §5.3.3;
        // the full tables are exercised by every digest comparison below.
        assert_eq!(consts::K[0], 0x428a_2f98);
        assert_eq!(consts::K[63], 0xc671_78f2);
        assert_eq!(consts::H0[0], 0x6a09_e667);
        assert_eq!(consts::H0[7], 0x5be0_cd19);
    }

    #[test]
    fn matches_sha2_on_random_data() {
        for (seed, blocks) in [1usize, 15, 16, 17, 33, 64].into_iter().enumerate() {
            let data = pseudo_random(blocks * BLOCK, seed as u64 + 1);
            let mut out = Vec::new();
            hash_4k_blocks(&data, &mut out);
            assert_eq!(out, reference(&data), "{blocks} blocks");
        }
    }

    #[test]
    fn matches_sha2_on_constant_patterns() {
        for byte in [0x00u8, 0xff, 0x80, 0x01] {
            let data = vec![byte; 33 * BLOCK];
            let mut out = Vec::new();
            hash_4k_blocks(&data, &mut out);
            assert_eq!(out, reference(&data), "all bytes {byte:#04x}");
        }
    }

    #[test]
    fn appends_after_existing_output_and_handles_empty_and_tail() {
        let data = pseudo_random(16 * BLOCK + 100, 7);
        let mut out = vec![0xaa; 5];
        hash_4k_blocks(&data, &mut out);
        assert_eq!(out[..5], [0xaa; 5]);
        assert_eq!(out[5..], reference(&data)[..]);
        let mut empty = Vec::new();
        hash_4k_blocks(&[], &mut empty);
        assert!(empty.is_empty());
    }

    #[test]
    fn each_lane_hashes_its_own_block() {
        // Blocks differing in one byte at a lane-specific place: a transpose or
        // lane mix-up would give some block another block's digest.
        let mut data = vec![0u8; 16 * BLOCK];
        for lane in 0..16 {
            data[lane * BLOCK + lane * 257] = lane as u8 + 1;
        }
        let mut out = Vec::new();
        hash_4k_blocks(&data, &mut out);
        assert_eq!(out, reference(&data));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    #[ignore = "needs AVX-512F/BW; scripts/test runs it where the CPU has them"]
    fn cpu_avx512_path_matches_sha2() {
        assert!(avx512::available(), "needs AVX-512F/BW: this CPU lacks it");
        for seed in 0..4u64 {
            let data = pseudo_random(16 * BLOCK, 100 + seed);
            let mut out = [0u8; DIGEST * LANES];
            // SAFETY: available() confirmed avx512f and avx512bw.
            unsafe { avx512::hash_16::<BLOCK>(&data, &mut out) };
            assert_eq!(out[..], reference(&data)[..], "seed {seed}");
        }
        // 512-byte messages (checksums on 512-byte-sector devices): the kernel
        // directly, lanes differing in one byte each, and through the dispatcher
        // with counts that leave SHA-NI pairs and a sha2 tail after the groups of 16.
        let mut one_byte = vec![0u8; 16 * 512];
        for lane in 0..16 {
            one_byte[lane * 512 + lane * 31 + 1] = lane as u8 + 1;
        }
        for (i, data) in [pseudo_random(16 * 512, 500), one_byte, vec![0xff; 16 * 512]]
            .iter()
            .enumerate()
        {
            let want = reference_of::<512>(data);
            let mut out = [0u8; DIGEST * LANES];
            // SAFETY: available() confirmed avx512f and avx512bw.
            unsafe { avx512::hash_16::<512>(data, &mut out) };
            assert_eq!(out[..], want[..], "512-byte case {i}");
        }
        for blocks in [16usize, 17, 19, 32, 35, 64] {
            let data = pseudo_random(blocks * 512, 600 + blocks as u64);
            let want = reference_of::<512>(&data);
            let mut out = vec![0u8; blocks * DIGEST];
            hash_512_blocks_to_slice(&data, &mut out);
            assert_eq!(out, want, "512-byte blocks x {blocks}");
        }
        eprintln!("avx512 16-lane path ran and matched sha2 (4096- and 512-byte messages)");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    #[ignore = "needs SHA-NI, SSSE3 and SSE4.1; scripts/test runs it where the CPU has them"]
    fn cpu_shani_path_matches_sha2() {
        assert!(
            shani::available(),
            "needs SHA-NI, SSSE3 and SSE4.1: this CPU lacks it"
        );
        // Random and patterned messages, and ways differing in one byte each (a
        // stream mix-up would give one message another's digest).
        let mut cases: Vec<Vec<u8>> = (0..4u64)
            .map(|seed| pseudo_random(shani::WAYS * BLOCK, 200 + seed))
            .collect();
        cases.push(vec![0u8; shani::WAYS * BLOCK]);
        cases.push(vec![0xffu8; shani::WAYS * BLOCK]);
        let mut one_byte = vec![0u8; shani::WAYS * BLOCK];
        for n in 0..shani::WAYS {
            one_byte[n * BLOCK + n * 511 + 3] = n as u8 + 1;
        }
        cases.push(one_byte);
        for (i, data) in cases.iter().enumerate() {
            let mut out = vec![0u8; DIGEST * shani::WAYS];
            // SAFETY: available() confirmed SHA, SSSE3 and SSE4.1.
            unsafe { shani::hash_ways::<BLOCK>(data, &mut out) };
            assert_eq!(out, reference(data), "case {i}");
        }
        // 512-byte messages (checksums on 512-byte-sector devices), directly and
        // through their dispatcher with a tail.
        for (i, blocks) in [2usize, 7, 64].into_iter().enumerate() {
            let data = pseudo_random(blocks * 512, 400 + i as u64);
            let want = reference_of::<512>(&data);
            let mut out = vec![0u8; blocks * DIGEST];
            hash_512_blocks_to_slice(&data, &mut out);
            assert_eq!(out, want, "512-byte blocks x {blocks}");
            let mut two = vec![0u8; DIGEST * shani::WAYS];
            // SAFETY: available() confirmed SHA, SSSE3 and SSE4.1.
            unsafe { shani::hash_ways::<512>(&data[..512 * shani::WAYS], &mut two) };
            assert_eq!(two, want[..DIGEST * shani::WAYS], "hash_ways::<512>");
        }
        // And through the dispatcher, where odd counts leave a tail for sha2.
        for blocks in [1usize, 2, 3, 5, 31] {
            let data = pseudo_random(blocks * BLOCK, 300 + blocks as u64);
            let mut out = Vec::new();
            hash_4k_blocks(&data, &mut out);
            assert_eq!(out, reference(&data), "{blocks} blocks");
        }
    }

    /// Single-thread throughput, vector path (when available) vs sha2:
    /// `cargo test -p luksify-walker --release sha256x16::tests::throughput -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark; run by hand with --release"]
    fn throughput() {
        use std::time::Instant;
        // Page-aligned, as the walker's I/O buffers are.
        let backing = pseudo_random((64 << 20) + 4096, 9);
        let skip = backing.as_ptr().align_offset(4096);
        let data = &backing[skip..][..64 << 20];
        let mut out = Vec::with_capacity(data.len() / BLOCK * DIGEST);
        let mut time = |f: &dyn Fn(&mut Vec<u8>)| {
            out.clear();
            let t = Instant::now();
            f(&mut out);
            let secs = t.elapsed().as_secs_f64();
            std::hint::black_box(&out);
            data.len() as f64 / secs / 1e6
        };
        let new = |o: &mut Vec<u8>| hash_4k_blocks(data, o);
        let old = |o: &mut Vec<u8>| {
            for b in data.chunks(BLOCK) {
                o.extend_from_slice(&Sha256::digest(b));
            }
        };
        // Alternated and best-of, so that other load on the machine hurts both alike.
        let (mut best_new, mut best_old) = (0f64, 0f64);
        for _ in 0..10 {
            best_new = best_new.max(time(&new));
            best_old = best_old.max(time(&old));
        }
        #[cfg(target_arch = "x86_64")]
        eprintln!("avx512 available: {}", avx512::available());
        eprintln!(
            "64 MiB, best of 10: hash_4k_blocks {best_new:.0} MB/s, sha2 {best_old:.0} MB/s, ratio {:.2}",
            best_new / best_old
        );
        // 512-byte blocks (devices with 512-byte sectors).
        let new512 = |o: &mut Vec<u8>| {
            o.resize(data.len() / 512 * DIGEST, 0);
            hash_512_blocks_to_slice(data, o);
        };
        let old512 = |o: &mut Vec<u8>| {
            for b in data.chunks(512) {
                o.extend_from_slice(&Sha256::digest(b));
            }
        };
        let (mut best_new, mut best_old) = (0f64, 0f64);
        for _ in 0..10 {
            best_new = best_new.max(time(&new512));
            best_old = best_old.max(time(&old512));
        }
        eprintln!(
            "64 MiB, best of 10: hash_512_blocks {best_new:.0} MB/s, sha2 {best_old:.0} MB/s, ratio {:.2}",
            best_new / best_old
        );
    }
}
