//! Hash algorithms LUKS names in headers, and PBKDF2 over them.

use crate::error::{Error, Result};
use sha2::Digest as _;

/// A hash named by a LUKS header (`"sha256"`, ...; serialized under that name): the
/// ones cryptsetup's default (OpenSSL) backend offers for PBKDF2, anti-forensic
/// splitting, digests and checksum resilience, each checked against cryptsetup 2.6.1
/// (`luksFormat --hash`, `reencrypt --resilience-hash`). `stribog` needs its gcrypt
/// backend and is not here; `md5` cryptsetup refuses for LUKS1 but takes for LUKS2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Hash {
    #[serde(rename = "sha1")]
    Sha1,
    #[serde(rename = "sha224")]
    Sha224,
    #[serde(rename = "sha256")]
    Sha256,
    #[serde(rename = "sha384")]
    Sha384,
    #[serde(rename = "sha512")]
    Sha512,
    #[serde(rename = "sha3-224")]
    Sha3_224,
    #[serde(rename = "sha3-256")]
    Sha3_256,
    #[serde(rename = "sha3-384")]
    Sha3_384,
    #[serde(rename = "sha3-512")]
    Sha3_512,
    #[serde(rename = "blake2b-512")]
    Blake2b512,
    #[serde(rename = "blake2s-256")]
    Blake2s256,
    #[serde(rename = "ripemd160")]
    Ripemd160,
    #[serde(rename = "whirlpool")]
    Whirlpool,
    #[serde(rename = "sm3")]
    Sm3,
    #[serde(rename = "md5")]
    Md5,
}

impl Hash {
    /// Every hash, in the order error messages list them.
    pub const ALL: [Hash; 15] = [
        Hash::Sha1,
        Hash::Sha224,
        Hash::Sha256,
        Hash::Sha384,
        Hash::Sha512,
        Hash::Sha3_224,
        Hash::Sha3_256,
        Hash::Sha3_384,
        Hash::Sha3_512,
        Hash::Blake2b512,
        Hash::Blake2s256,
        Hash::Ripemd160,
        Hash::Whirlpool,
        Hash::Sm3,
        Hash::Md5,
    ];

    /// The names [`Hash::parse`] takes, comma-separated.
    pub fn names() -> String {
        Hash::ALL.map(Hash::name).join(", ")
    }

    /// Parses the header spelling (case-insensitive, as cryptsetup accepts it).
    pub fn parse(name: &str) -> Result<Hash> {
        let lower = name.to_ascii_lowercase();
        Hash::ALL
            .into_iter()
            .find(|h| h.name() == lower)
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "hash '{name}' (luksify supports {})",
                    Hash::names()
                ))
            })
    }
    /// The header spelling.
    pub fn name(self) -> &'static str {
        match self {
            Hash::Sha1 => "sha1",
            Hash::Sha224 => "sha224",
            Hash::Sha256 => "sha256",
            Hash::Sha384 => "sha384",
            Hash::Sha512 => "sha512",
            Hash::Sha3_224 => "sha3-224",
            Hash::Sha3_256 => "sha3-256",
            Hash::Sha3_384 => "sha3-384",
            Hash::Sha3_512 => "sha3-512",
            Hash::Blake2b512 => "blake2b-512",
            Hash::Blake2s256 => "blake2s-256",
            Hash::Ripemd160 => "ripemd160",
            Hash::Whirlpool => "whirlpool",
            Hash::Sm3 => "sm3",
            Hash::Md5 => "md5",
        }
    }
    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            Hash::Md5 => 16,
            Hash::Sha1 | Hash::Ripemd160 => 20,
            Hash::Sha224 | Hash::Sha3_224 => 28,
            Hash::Sha256 | Hash::Sha3_256 | Hash::Blake2s256 | Hash::Sm3 => 32,
            Hash::Sha384 | Hash::Sha3_384 => 48,
            Hash::Sha512 | Hash::Sha3_512 | Hash::Blake2b512 | Hash::Whirlpool => 64,
        }
    }
    /// Hash of the concatenation of `parts`, written to the start of `out`
    /// (which must hold at least [`Hash::digest_len`] bytes).
    pub fn digest_into(self, parts: &[&[u8]], out: &mut [u8]) {
        fn run<D: sha2::Digest>(parts: &[&[u8]], out: &mut [u8]) {
            let mut h = D::new();
            for p in parts {
                h.update(p);
            }
            let r = h.finalize();
            out[..r.len()].copy_from_slice(&r);
        }
        match self {
            Hash::Sha1 => run::<sha1::Sha1>(parts, out),
            Hash::Sha224 => run::<sha2::Sha224>(parts, out),
            Hash::Sha256 => run::<sha2::Sha256>(parts, out),
            Hash::Sha384 => run::<sha2::Sha384>(parts, out),
            Hash::Sha512 => run::<sha2::Sha512>(parts, out),
            Hash::Sha3_224 => run::<sha3::Sha3_224>(parts, out),
            Hash::Sha3_256 => run::<sha3::Sha3_256>(parts, out),
            Hash::Sha3_384 => run::<sha3::Sha3_384>(parts, out),
            Hash::Sha3_512 => run::<sha3::Sha3_512>(parts, out),
            Hash::Blake2b512 => run::<blake2::Blake2b512>(parts, out),
            Hash::Blake2s256 => run::<blake2::Blake2s256>(parts, out),
            Hash::Ripemd160 => run::<ripemd::Ripemd160>(parts, out),
            Hash::Whirlpool => run::<whirlpool::Whirlpool>(parts, out),
            Hash::Sm3 => run::<sm3::Sm3>(parts, out),
            Hash::Md5 => run::<md5::Md5>(parts, out),
        }
    }
    /// PBKDF2-HMAC with this hash, filling `out`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        use pbkdf2::pbkdf2_hmac;
        // SHA-3 and BLAKE2 through the plain HMAC construction (their block size: the
        // SHA-3 rate, BLAKE2's 128 or 64 bytes, as OpenSSL's HMAC takes them).
        fn simple<D: sha2::Digest + hmac::digest::block_api::BlockSizeUser + Clone + Sync>(
            p: &[u8],
            s: &[u8],
            i: u32,
            out: &mut [u8],
        ) {
            pbkdf2::pbkdf2::<hmac::SimpleHmac<D>>(p, s, i, out)
                .expect("HMAC takes keys of any length");
        }
        let (p, s, i) = (password, salt, iterations);
        match self {
            Hash::Sha1 => pbkdf2_hmac::<sha1::Sha1>(p, s, i, out),
            Hash::Sha224 => pbkdf2_hmac::<sha2::Sha224>(p, s, i, out),
            Hash::Sha256 => pbkdf2_hmac::<sha2::Sha256>(p, s, i, out),
            Hash::Sha384 => pbkdf2_hmac::<sha2::Sha384>(p, s, i, out),
            Hash::Sha512 => pbkdf2_hmac::<sha2::Sha512>(p, s, i, out),
            Hash::Sha3_224 => simple::<sha3::Sha3_224>(p, s, i, out),
            Hash::Sha3_256 => simple::<sha3::Sha3_256>(p, s, i, out),
            Hash::Sha3_384 => simple::<sha3::Sha3_384>(p, s, i, out),
            Hash::Sha3_512 => simple::<sha3::Sha3_512>(p, s, i, out),
            Hash::Blake2b512 => simple::<blake2::Blake2b512>(p, s, i, out),
            Hash::Blake2s256 => simple::<blake2::Blake2s256>(p, s, i, out),
            Hash::Ripemd160 => pbkdf2_hmac::<ripemd::Ripemd160>(p, s, i, out),
            Hash::Whirlpool => pbkdf2_hmac::<whirlpool::Whirlpool>(p, s, i, out),
            Hash::Sm3 => pbkdf2_hmac::<sm3::Sm3>(p, s, i, out),
            Hash::Md5 => pbkdf2_hmac::<md5::Md5>(p, s, i, out),
        }
    }
}

/// sha256 of `data` (used for header checksums and tests).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(data).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each hash parses from its name (in any case), serializes under it, and writes
    /// exactly `digest_len` bytes; known answers for "abc" pin the less common ones.
    #[test]
    fn every_hash_round_trips_its_name_and_length() {
        for h in Hash::ALL {
            assert_eq!(Hash::parse(h.name()).unwrap(), h);
            assert_eq!(Hash::parse(&h.name().to_ascii_uppercase()).unwrap(), h);
            assert_eq!(
                serde_json::to_string(&h).unwrap(),
                format!("\"{}\"", h.name())
            );
            let mut out = [0xa5u8; 80];
            h.digest_into(&[b"a", b"bc"], &mut out);
            assert!(out[h.digest_len()..].iter().all(|&b| b == 0xa5), "{h:?}");
            let mut whole = [0xa5u8; 80];
            h.digest_into(&[b"abc"], &mut whole);
            assert_eq!(out, whole, "{h:?}: parts are not concatenated");
        }
        assert!(Hash::parse("stribog512").is_err());
        let hex = |h: Hash| {
            let mut out = [0u8; 64];
            h.digest_into(&[b"abc"], &mut out);
            out[..h.digest_len()]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        // RFC 1321, ISO/IEC 10118-3 test vectors, FIPS 202, RFC 7693, GB/T 32905.
        for (h, want) in [
            (Hash::Md5, "900150983cd24fb0d6963f7d28e17f72"),
            (Hash::Ripemd160, "8eb208f7e05d987a9b044a8e98c6b087f15a0bfc"),
            (
                Hash::Sha3_256,
                "3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532",
            ),
            (
                Hash::Blake2s256,
                "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982",
            ),
            (
                Hash::Sm3,
                "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0",
            ),
        ] {
            assert_eq!(hex(h), want, "{h:?}");
        }
    }
}
