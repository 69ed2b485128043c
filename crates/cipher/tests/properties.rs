//! Properties of the sector cipher (proptest) and the inputs it must refuse.

use luksify_cipher::{CipherError, IvGen, SectorCipher, SectorSize};
use proptest::prelude::*;

const IV_GENS: [IvGen; 4] = [
    IvGen::Plain,
    IvGen::Plain64,
    IvGen::Plain64Be,
    IvGen::EssivSha256,
];

fn cipher(iv: IvGen, key: &[u8], sector: usize) -> SectorCipher {
    SectorCipher::with_iv(iv, key, SectorSize::new(sector).unwrap()).unwrap()
}

/// Strategy: (iv generator, key with distinct halves, sector size, sector count, iv_sector).
fn setup() -> impl Strategy<Value = (IvGen, Vec<u8>, usize, usize, u64)> {
    (
        prop::sample::select(IV_GENS.to_vec()),
        prop::sample::select(vec![32usize, 64])
            .prop_flat_map(|n| prop::collection::vec(any::<u8>(), n)),
        prop::sample::select(vec![512usize, 1024, 2048, 4096]),
        1usize..80,
        any::<u64>(),
    )
        .prop_filter("XTS key halves must differ", |(_, k, _, _, _)| {
            k[..k.len() / 2] != k[k.len() / 2..]
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn decrypt_undoes_encrypt((iv, key, sector, n, iv_sector) in setup(), seed in any::<u8>()) {
        let c = cipher(iv, &key, sector);
        let plain: Vec<u8> = (0..n * sector).map(|i| (i as u8).wrapping_mul(seed | 1)).collect();
        let mut buf = plain.clone();
        c.encrypt(&mut buf, iv_sector).unwrap();
        prop_assert_ne!(&buf, &plain);
        c.decrypt(&mut buf, iv_sector).unwrap();
        prop_assert_eq!(&buf, &plain);
    }

    /// Encrypting a buffer in one call equals encrypting it in two calls that start at the
    /// right IV: the IV advances by sector_size / 512 per sector, across batches and groups.
    #[test]
    fn splitting_a_buffer_changes_nothing((iv, key, sector, n, iv_sector) in setup(), cut in 0usize..80) {
        let c = cipher(iv, &key, sector);
        let cut = cut % (n + 1);
        let plain: Vec<u8> = (0..n * sector).map(|i| (i % 251) as u8).collect();
        let mut whole = plain.clone();
        c.encrypt_serial(&mut whole, iv_sector).unwrap();
        let mut parts = plain.clone();
        let (a, b) = parts.split_at_mut(cut * sector);
        c.encrypt_serial(a, iv_sector).unwrap();
        let units = (sector / 512) as u64;
        c.encrypt_serial(b, iv_sector.wrapping_add(cut as u64 * units)).unwrap();
        prop_assert_eq!(whole, parts);
    }

    /// Sectors are independent data units: each one's ciphertext depends only on itself and
    /// its IV, so a sector encrypted alone matches the same sector inside a larger buffer.
    #[test]
    fn each_sector_is_its_own_data_unit((iv, key, sector, n, iv_sector) in setup(), pick in 0usize..80) {
        let c = cipher(iv, &key, sector);
        let pick = pick % n;
        let plain: Vec<u8> = (0..n * sector).map(|i| (i * 7 % 256) as u8).collect();
        let mut whole = plain.clone();
        c.encrypt(&mut whole, iv_sector).unwrap();
        let mut one = plain[pick * sector..(pick + 1) * sector].to_vec();
        c.encrypt(&mut one, iv_sector.wrapping_add(pick as u64 * (sector / 512) as u64)).unwrap();
        prop_assert_eq!(&whole[pick * sector..(pick + 1) * sector], &one[..]);
    }
}

#[test]
fn parallel_output_equals_serial_output() {
    let key: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(29).wrapping_add(1))
        .collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .unwrap();
    for iv in IV_GENS {
        for sector in [512, 1024, 2048, 4096] {
            let c = cipher(iv, &key, sector);
            // 1 MiB + 3 sectors: several parallel pieces and a short last one.
            let plain: Vec<u8> = (0..(1 << 20) + 3 * sector)
                .map(|i| (i % 253) as u8)
                .collect();
            let mut serial = plain.clone();
            c.encrypt_serial(&mut serial, 77).unwrap();
            let mut parallel = plain.clone();
            pool.install(|| c.encrypt(&mut parallel, 77)).unwrap();
            assert_eq!(
                serial,
                parallel,
                "encrypt aes-xts-{} sector {sector}",
                iv.name()
            );
            pool.install(|| c.decrypt(&mut parallel, 77)).unwrap();
            c.decrypt_serial(&mut serial, 77).unwrap();
            assert_eq!(serial, plain, "serial decrypt aes-xts-{}", iv.name());
            assert_eq!(parallel, plain, "parallel decrypt aes-xts-{}", iv.name());
        }
    }
}

#[test]
fn equal_key_halves_are_refused_with_a_clear_error() {
    for len in [32, 64] {
        let mut key = vec![0u8; len];
        for (i, b) in key[..len / 2].iter_mut().enumerate() {
            *b = i as u8 + 1;
        }
        key.copy_within(..len / 2, len / 2);
        let err = SectorCipher::new("aes-xts-plain64", &key, 512).unwrap_err();
        assert_eq!(err, CipherError::EqualKeyHalves);
        let msg = err.to_string();
        assert!(
            msg.contains("halves are equal") && msg.contains("fresh random key"),
            "{msg}"
        );
        // One differing byte is enough to be accepted.
        key[len - 1] ^= 1;
        SectorCipher::new("aes-xts-plain64", &key, 512).unwrap();
    }
}

#[test]
fn wrong_key_lengths_are_refused() {
    for len in [0usize, 1, 16, 24, 31, 33, 48, 63, 65, 96, 128] {
        let key: Vec<u8> = (0..len).map(|i| i as u8).collect();
        assert_eq!(
            SectorCipher::new("aes-xts-plain64", &key, 512).unwrap_err(),
            CipherError::BadKeyLength(len),
            "{len}-byte key"
        );
    }
}

#[test]
fn wrong_sector_sizes_and_partial_sectors_are_refused() {
    let key: Vec<u8> = (0..64u8).collect();
    for bad in [0usize, 16, 256, 513, 768, 8192, 65536] {
        assert_eq!(
            SectorCipher::new("aes-xts-plain64", &key, bad).unwrap_err(),
            CipherError::BadSectorSize(bad)
        );
    }
    for sector in [512usize, 1024, 2048, 4096] {
        let c = SectorCipher::new("aes-xts-plain64", &key, sector).unwrap();
        for len in [1usize, 16, sector - 16, sector + 512, 3 * sector + 1] {
            if len % sector == 0 {
                continue;
            }
            let mut buf = vec![7u8; len];
            let want = CipherError::PartialSector {
                len,
                sector_size: sector,
            };
            assert_eq!(c.encrypt(&mut buf, 0).unwrap_err(), want);
            assert_eq!(c.decrypt(&mut buf, 0).unwrap_err(), want);
            assert_eq!(c.encrypt_serial(&mut buf, 0).unwrap_err(), want);
            assert_eq!(c.decrypt_serial(&mut buf, 0).unwrap_err(), want);
            assert_eq!(buf, vec![7u8; len], "a refused buffer is left untouched");
        }
        // An empty buffer is zero whole sectors.
        c.encrypt(&mut [], 0).unwrap();
    }
}

#[test]
fn unsupported_specs_are_refused() {
    let key: Vec<u8> = (0..64u8).collect();
    for spec in [
        "aes-cbc-essiv:sha256",
        "aes-xts-benbi",
        "aes-xts-essiv:sha1",
        "serpent-xts-plain64",
        "aes-xts-plain64:sha256",
        "AES-XTS-PLAIN64",
        "",
    ] {
        assert_eq!(
            SectorCipher::new(spec, &key, 512).unwrap_err(),
            CipherError::UnsupportedSpec(spec.to_string())
        );
    }
    for (spec, iv) in [
        ("aes-xts-plain", IvGen::Plain),
        ("aes-xts-plain64", IvGen::Plain64),
        ("aes-xts-plain64be", IvGen::Plain64Be),
        ("aes-xts-essiv:sha256", IvGen::EssivSha256),
    ] {
        let c = SectorCipher::new(spec, &key, 4096).unwrap();
        assert_eq!(
            (c.spec(), c.iv_gen(), c.key_bits()),
            (spec.to_string(), iv, 512)
        );
    }
}

#[test]
fn iv_sector_at_counts_512_byte_units_plus_iv_tweak() {
    let key: Vec<u8> = (0..32u8).collect();
    let c = SectorCipher::new("aes-xts-plain64", &key, 4096).unwrap();
    assert_eq!(c.iv_sector_at(0, 0).unwrap(), 0);
    assert_eq!(c.iv_sector_at(4096, 0).unwrap(), 8);
    assert_eq!(c.iv_sector_at(16 << 20, 32768).unwrap(), 32768 + 32768);
    assert_eq!(
        c.iv_sector_at(512, 0).unwrap_err(),
        CipherError::MisalignedOffset {
            offset: 512,
            sector_size: 4096
        }
    );
}

#[test]
fn debug_output_never_shows_key_material() {
    let key = [0xabu8; 32]
        .iter()
        .chain([0xcdu8; 32].iter())
        .copied()
        .collect::<Vec<u8>>();
    let c = SectorCipher::new("aes-xts-essiv:sha256", &key, 512).unwrap();
    let dbg = format!("{c:?}");
    assert!(
        dbg.contains("aes-xts-essiv:sha256") && dbg.contains("512"),
        "{dbg}"
    );
    for needle in ["abab", "cdcd", "171, 171", "205, 205"] {
        assert!(
            !dbg.to_lowercase().contains(needle),
            "Debug leaks key bytes: {dbg}"
        );
    }
}
