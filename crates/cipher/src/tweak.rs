//! XTS tweak sequences and the two "XOR the tweak in" passes around the block cipher.
//!
//! Within one data unit (sector) block `i` is whitened with `T0 · αⁱ` in GF(2¹²⁸), where
//! `T0` is the encrypted IV. Computing `T·α` one block after another is a serial chain of
//! dependent shifts, slow next to a pipelined AES, so both backends here step several
//! independent chains at once by `α⁴` instead of `α`:
//! - [`TweakBackend::Portable`]: four scalar `u128` chains (any CPU);
//! - [`TweakBackend::Avx512`]: four tweaks per 512-bit register (x86-64 with AVX-512F/BW),
//!   chosen at run time; CPU-specific code lives only in [`avx512`].

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;

use aes::Block;

/// Which implementation of the tweak passes this CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TweakBackend {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl TweakBackend {
    /// Picks the fastest backend the running CPU supports.
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
            {
                return TweakBackend::Avx512;
            }
        }
        TweakBackend::Portable
    }

    /// Writes `t0·αⁱ` into `tweaks[i]` and XORs it into `data[i]` for every block.
    pub(crate) fn xor_fresh(self, data: &mut [Block], t0: u128, tweaks: &mut [Block]) {
        assert_eq!(data.len(), tweaks.len(), "one tweak per data block");
        match self {
            TweakBackend::Portable => portable_xor_fresh(data, t0, tweaks),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Avx512` is only constructed by `detect` after checking that the CPU
            // has AVX-512F and AVX-512BW, the features these functions are compiled for.
            TweakBackend::Avx512 => unsafe { avx512::xor_fresh(data, t0, tweaks) },
        }
    }

    /// XORs `tweaks[i]` into `data[i]` for every block (the pass after the block cipher).
    pub(crate) fn xor_again(self, data: &mut [Block], tweaks: &[Block]) {
        assert_eq!(data.len(), tweaks.len(), "one tweak per data block");
        match self {
            TweakBackend::Portable => portable_xor(data, tweaks),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `xor_fresh`: the CPU was checked for AVX-512F/BW.
            TweakBackend::Avx512 => unsafe { avx512::xor(data, tweaks) },
        }
    }
}

/// `t · α` in GF(2¹²⁸) with IEEE 1619's little-endian bit order.
#[inline(always)]
pub(crate) fn mul_alpha(t: u128) -> u128 {
    (t << 1) ^ (0x87 * (t >> 127))
}

/// `t · α⁴`: shift by four and fold the four bits that fell off back in with
/// x¹²⁸ = x⁷ + x² + x + 1 (0x87), as a carry-less product of those bits and 0x87.
#[inline(always)]
pub(crate) fn mul_alpha4(t: u128) -> u128 {
    let c = (t >> 124) as u64;
    (t << 4) ^ u128::from(c ^ (c << 1) ^ (c << 2) ^ (c << 7))
}

#[inline(always)]
fn load(block: &Block) -> u128 {
    u128::from_le_bytes((*block).into())
}

#[inline(always)]
fn store(block: &mut Block, v: u128) {
    *block = Block::from(v.to_le_bytes());
}

fn portable_xor_fresh(data: &mut [Block], t0: u128, tweaks: &mut [Block]) {
    let t1 = mul_alpha(t0);
    let t2 = mul_alpha(t1);
    let mut chains = [t0, t1, t2, mul_alpha(t2)];
    for (d4, t4) in data.chunks_mut(4).zip(tweaks.chunks_mut(4)) {
        for ((d, t), c) in d4.iter_mut().zip(t4.iter_mut()).zip(&chains) {
            store(t, *c);
            store(d, load(d) ^ c);
        }
        for c in &mut chains {
            *c = mul_alpha4(*c);
        }
    }
}

fn portable_xor(data: &mut [Block], tweaks: &[Block]) {
    for (d, t) in data.iter_mut().zip(tweaks) {
        store(d, load(d) ^ load(t));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serial_tweaks(t0: u128, n: usize) -> Vec<u128> {
        let mut t = t0;
        (0..n)
            .map(|_| {
                let cur = t;
                t = mul_alpha(t);
                cur
            })
            .collect()
    }

    fn check(backend: TweakBackend, t0: u128, n: usize) {
        let mut data: Vec<Block> = (0..n)
            .map(|i| Block::from(((i as u128) * 0x0123_4567_89ab_cdef).to_le_bytes()))
            .collect();
        let orig = data.clone();
        let mut tweaks = vec![Block::default(); n];
        backend.xor_fresh(&mut data, t0, &mut tweaks);
        let want = serial_tweaks(t0, n);
        for i in 0..n {
            assert_eq!(load(&tweaks[i]), want[i], "tweak {i} of {n} ({backend:?})");
            assert_eq!(
                load(&data[i]),
                load(&orig[i]) ^ want[i],
                "block {i} ({backend:?})"
            );
        }
        backend.xor_again(&mut data, &tweaks);
        assert_eq!(data, orig, "second XOR restores the data ({backend:?})");
    }

    #[test]
    fn alpha4_is_four_alphas() {
        for t in [
            1u128,
            u128::MAX,
            0xf000_0000_0000_0000_0000_0000_0000_0001,
            1 << 127,
        ] {
            assert_eq!(mul_alpha4(t), mul_alpha(mul_alpha(mul_alpha(mul_alpha(t)))));
        }
    }

    #[test]
    fn every_backend_matches_the_serial_definition() {
        let seeds = [1u128, u128::MAX, 0x8765_4321_0fed_cba9_1122_3344_5566_7788];
        for backend in [TweakBackend::Portable, TweakBackend::detect()] {
            for &t0 in &seeds {
                for n in [1, 2, 3, 4, 5, 7, 8, 31, 32, 33, 64, 256] {
                    check(backend, t0, n);
                }
            }
        }
    }
}
