//! AES key schedules expanded with AES-NI, shared by the fused kernels (`vaes512`,
//! `vaes256`): each kernel only broadcasts these 16-byte round keys to its register width.
//!
//! Only called after run-time detection of AES-NI (each kernel's `available()`).

use core::arch::x86_64::*;
use zeroize::Zeroize;

/// An expanded AES key schedule (10 or 14 rounds), wiped on drop.
pub(crate) struct RoundKeys {
    pub(crate) rk: [[u8; 16]; 15],
    pub(crate) rounds: usize,
}

impl Drop for RoundKeys {
    fn drop(&mut self) {
        self.rk.zeroize();
    }
}

/// `a ^ a<<32 ^ a<<64 ^ a<<96` (bytes shifted within the 128-bit word): the running XOR
/// of the previous round key's words that AES key expansion needs.
#[inline]
#[target_feature(enable = "sse2")]
fn prefix_xor(a: __m128i) -> __m128i {
    let s1 = _mm_slli_si128::<4>(a);
    let s2 = _mm_slli_si128::<4>(s1);
    let s3 = _mm_slli_si128::<4>(s2);
    _mm_xor_si128(_mm_xor_si128(a, s1), _mm_xor_si128(s2, s3))
}

#[inline]
#[target_feature(enable = "sse2")]
fn store(k: __m128i) -> [u8; 16] {
    let mut out = [0u8; 16];
    // SAFETY: `out` is 16 writable bytes; the store is unaligned.
    unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), k) };
    out
}

/// One round key into an XMM register (the kernels broadcast it from there).
#[inline]
#[target_feature(enable = "sse2")]
pub(crate) fn load(k: &[u8; 16]) -> __m128i {
    // SAFETY: `k` is 16 readable bytes; the load is unaligned.
    unsafe { _mm_loadu_si128(k.as_ptr().cast()) }
}

impl RoundKeys {
    /// FIPS-197 key expansion for a 16- or 32-byte key, with AES-NI's key-generation assist.
    #[target_feature(enable = "aes,sse2")]
    pub(crate) fn expand(key: &[u8]) -> Self {
        let mut rk = [[0u8; 16]; 15];
        let lo: &[u8; 16] = key[..16].try_into().expect("16-byte first half");
        let mut a = load(lo);
        rk[0] = store(a);
        let rounds = match key.len() {
            16 => {
                macro_rules! step {
                    ($i:expr, $rcon:expr) => {
                        let t = _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(a));
                        a = _mm_xor_si128(prefix_xor(a), t);
                        rk[$i] = store(a);
                    };
                }
                step!(1, 0x01);
                step!(2, 0x02);
                step!(3, 0x04);
                step!(4, 0x08);
                step!(5, 0x10);
                step!(6, 0x20);
                step!(7, 0x40);
                step!(8, 0x80);
                step!(9, 0x1b);
                step!(10, 0x36);
                10
            }
            32 => {
                let hi: &[u8; 16] = key[16..].try_into().expect("16-byte second half");
                let mut b = load(hi);
                rk[1] = store(b);
                macro_rules! even {
                    ($i:expr, $rcon:expr) => {
                        // RotWord+SubWord of b's last word, with the round constant.
                        let t = _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(b));
                        a = _mm_xor_si128(prefix_xor(a), t);
                        rk[$i] = store(a);
                    };
                }
                macro_rules! odd {
                    ($i:expr) => {
                        // SubWord of a's last word only (no rotation, no constant).
                        let t = _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(a));
                        b = _mm_xor_si128(prefix_xor(b), t);
                        rk[$i] = store(b);
                    };
                }
                even!(2, 0x01);
                odd!(3);
                even!(4, 0x02);
                odd!(5);
                even!(6, 0x04);
                odd!(7);
                even!(8, 0x08);
                odd!(9);
                even!(10, 0x10);
                odd!(11);
                even!(12, 0x20);
                odd!(13);
                even!(14, 0x40);
                14
            }
            n => unreachable!("AES key length {n} checked by caller"),
        };
        RoundKeys { rk, rounds }
    }

    /// The equivalent inverse cipher's schedule: reversed, InvMixColumns on inner keys.
    #[target_feature(enable = "aes,sse2")]
    pub(crate) fn inverse(&self) -> Self {
        let nr = self.rounds;
        let mut rk = [[0u8; 16]; 15];
        rk[0] = self.rk[nr];
        for (inv, fwd) in rk[1..nr].iter_mut().zip(self.rk[1..nr].iter().rev()) {
            *inv = store(_mm_aesimc_si128(load(fwd)));
        }
        rk[nr] = self.rk[0];
        RoundKeys { rk, rounds: nr }
    }
}

/// All key schedules one XTS volume key needs on a fused path.
pub(crate) struct XtsSchedules {
    pub(crate) data_enc: RoundKeys,
    pub(crate) data_dec: RoundKeys,
    pub(crate) tweak_enc: RoundKeys,
    pub(crate) essiv_enc: Option<RoundKeys>,
}

impl XtsSchedules {
    /// Expands the XTS halves (and the ESSIV key, if any).
    #[target_feature(enable = "aes,sse2")]
    pub(crate) fn new(data_key: &[u8], tweak_key: &[u8], essiv_key: Option<&[u8]>) -> Self {
        let data_enc = RoundKeys::expand(data_key);
        let data_dec = data_enc.inverse();
        XtsSchedules {
            data_dec,
            data_enc,
            tweak_enc: RoundKeys::expand(tweak_key),
            essiv_enc: essiv_key.map(|k| RoundKeys::expand(k)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::{BlockCipherEncrypt, KeyInit};
    use aes::Block;

    /// One block through a schedule with plain AES-NI (cipher or equivalent inverse).
    #[target_feature(enable = "aes,sse2")]
    fn crypt_block(keys: &RoundKeys, block: &Block, enc: bool) -> Block {
        let b: &[u8; 16] = block.as_ref();
        let nr = keys.rounds;
        let mut x = _mm_xor_si128(load(b), load(&keys.rk[0]));
        for k in &keys.rk[1..nr] {
            x = if enc {
                _mm_aesenc_si128(x, load(k))
            } else {
                _mm_aesdec_si128(x, load(k))
            };
        }
        let k = load(&keys.rk[nr]);
        x = if enc {
            _mm_aesenclast_si128(x, k)
        } else {
            _mm_aesdeclast_si128(x, k)
        };
        Block::from(store(x))
    }

    #[test]
    fn expansion_and_inverse_match_the_aes_crate() {
        if !std::arch::is_x86_feature_detected!("aes") {
            eprintln!("skipping: this CPU has no AES-NI, no fused path is ever used here");
            return;
        }
        for len in [16usize, 32] {
            let key: Vec<u8> = (0..len as u8)
                .map(|i| i.wrapping_mul(73).wrapping_add(5))
                .collect();
            // SAFETY: AES-NI checked above (SSE2 is part of x86-64).
            let (fwd, inv) = unsafe {
                let fwd = RoundKeys::expand(&key);
                let inv = fwd.inverse();
                (fwd, inv)
            };
            for i in 0..7u8 {
                let plain = Block::from([i.wrapping_mul(31); 16]);
                let mut want = plain;
                match len {
                    16 => aes::Aes128::new_from_slice(&key)
                        .unwrap()
                        .encrypt_block(&mut want),
                    _ => aes::Aes256::new_from_slice(&key)
                        .unwrap()
                        .encrypt_block(&mut want),
                }
                // SAFETY: as above.
                let (ours, back) = unsafe {
                    let ours = crypt_block(&fwd, &plain, true);
                    (ours, crypt_block(&inv, &ours, false))
                };
                assert_eq!(ours, want, "AES-{} encrypt", len * 8);
                assert_eq!(back, plain, "AES-{} decrypt", len * 8);
            }
        }
    }
}
