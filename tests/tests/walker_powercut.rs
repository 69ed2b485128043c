//! Power-cut simulation: encryption is interrupted after a random number of
//! device operations; every write since the last flush then vanishes, lands or
//! tears (at the device's atomic unit); resume must finish and the decrypted
//! volume must equal the original plaintext byte for byte.
//!
//! Resilience `none` is excluded on purpose: it keeps no copy of the hotzone
//! (same as cryptsetup), see docs/journal.md.

use luksify_cipher::SectorCipher;
use luksify_luks::io::{Disk, MemDisk};
use luksify_luks::kdf::KdfRequest;
use luksify_luks::luks2::FormatOptions;
use luksify_luks::VolumeKey;
use luksify_walker::powercut::PowerCutDisk;
use luksify_walker::Hash;
use luksify_walker::{
    Control, DecryptOptions, EncryptOptions, Outcome, Placement, Resilience, Tuning,
};
use proptest::prelude::*;

const PASS: &[u8] = b"correct horse";
const SIZE: usize = 6 << 20;
const REDUCE: u64 = 2 << 20;

fn vk() -> Vec<u8> {
    (0..64u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect()
}

fn opts(placement: Placement) -> EncryptOptions {
    opts_with(placement, None, Hash::Sha256)
}

/// `keyslots`: the LUKS2 keyslots area size (None: the default 16 MiB, room for two
/// journal halves); `hash`: checksum resilience's.
fn opts_with(placement: Placement, keyslots: Option<u64>, hash: Hash) -> EncryptOptions {
    EncryptOptions {
        placement,
        checksum_hash: hash,
        format: FormatOptions {
            kdf: KdfRequest::fast_pbkdf2(),
            volume_key: Some(VolumeKey::from_slice(&vk())),
            keyslots_size: keyslots,
            ..FormatOptions::default()
        },
        tuning: Tuning {
            chunk: 64 << 10,
            hotzone: 256 << 10,
            ..Tuning::default()
        },
    }
}

fn plaintext(seed: u64) -> Vec<u8> {
    plaintext_of(seed, SIZE)
}

fn plaintext_of(seed: u64, size: usize) -> Vec<u8> {
    let mut v = vec![0u8; size];
    luksify_tests::fill_volume(&mut v, seed);
    v
}

/// Decrypts the finished volume and compares it with the original.
fn check_decrypts_to(data: &MemDisk, placement: Placement, orig: &[u8]) {
    let size = data.size().unwrap();
    let (off, len) = match placement {
        Placement::Detached { .. } => (0u64, size),
        Placement::Shift { reduce } => (reduce / 2, size - reduce),
    };
    let c = SectorCipher::new("aes-xts-plain64", &vk(), 512).unwrap();
    let mut buf = vec![0u8; len as usize];
    data.read_at(off, &mut buf).unwrap();
    c.decrypt(&mut buf, 0).unwrap();
    assert!(
        buf == orig[..len as usize],
        "decrypted volume differs from the original plaintext"
    );
}

/// Checks how the cut run ended, then decides the fate of every unflushed write of the
/// data and header disks (dropped, landed, or torn unit by unit), driven by `fates`.
fn power_comes_back(
    pc: &PowerCutDisk<MemDisk>,
    hpc: &PowerCutDisk<MemDisk>,
    r: &luksify_walker::Result<Outcome>,
    fates: u64,
) {
    if !pc.was_cut() {
        assert!(
            matches!(r, Ok(Outcome::Finished)),
            "an uncut run must finish: {r:?}"
        );
    } else {
        assert!(r.is_err(), "a cut run must report an error");
    }
    let mut x = fates | 1;
    let mut coin = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % 3
    };
    let mut settle = |d: &PowerCutDisk<MemDisk>| {
        d.settle(|_, units| match coin() {
            0 => vec![false; units],
            1 => vec![true; units],
            _ => (0..units).map(|_| coin() != 0).collect(),
        })
        .unwrap()
    };
    settle(pc);
    settle(hpc);
}

/// `data` behind a power-cut layer tearing at `unit`, reported as read with O_DIRECT
/// when `direct` (the walker's other checksum schedule).
fn power_cut_disk(data: &MemDisk, unit: usize, direct: bool) -> PowerCutDisk<MemDisk> {
    let pc = PowerCutDisk::new(data.clone(), unit);
    if direct {
        pc.reading_directly()
    } else {
        pc
    }
}

fn crash_and_resume(place: (Placement, usize, bool), cut: u64, fates: u64, seed: u64) {
    crash_and_resume_with(place, None, Hash::Sha256, cut, fates, seed)
}

fn crash_and_resume_with(
    place: (Placement, usize, bool),
    keyslots: Option<u64>,
    hash: Hash,
    cut: u64,
    fates: u64,
    seed: u64,
) {
    crash_and_resume_sized(place, keyslots, hash, SIZE, cut, fates, seed)
}

/// [`crash_and_resume_with`] on a device of `size` bytes.
fn crash_and_resume_sized(
    (placement, unit, direct): (Placement, usize, bool),
    keyslots: Option<u64>,
    hash: Hash,
    size: usize,
    cut: u64,
    fates: u64,
    seed: u64,
) {
    let orig = plaintext_of(seed, size);
    let data = MemDisk::from_vec(orig.clone());
    let hdr = MemDisk::new(0);
    let pc = power_cut_disk(&data, unit, direct);
    let hpc = pc.sibling(hdr.clone());
    let o = opts_with(placement, keyslots, hash);
    pc.cut_after_ops(cut);
    let detached = matches!(placement, Placement::Detached { .. });
    let r = if detached {
        luksify_walker::encrypt(&pc, Some(&hpc), PASS, &o, &Control::default())
    } else {
        luksify_walker::encrypt::<_, MemDisk, _>(&pc, None, PASS, &o, &Control::default())
    };
    power_comes_back(&pc, &hpc, &r, fates);
    // Resume (or start again when no header ever became valid).
    let meta_is_luks = if detached {
        hdr.size().unwrap() > 0 && luksify_luks::probe(&hdr).unwrap().is_some()
    } else {
        luksify_luks::probe(&data).unwrap().is_some()
    };
    // A cut after the final commit leaves a finished volume: nothing to resume.
    let meta_disk: &MemDisk = if detached { &hdr } else { &data };
    let finished = meta_is_luks
        && luksify_luks::luks2::Luks2Header::read(meta_disk)
            .ok()
            .is_some_and(|(h, _)| {
                luksify_luks::reencrypt::state(&h.metadata)
                    .unwrap()
                    .is_none()
            });
    if finished {
        check_decrypts_to(&data, placement, &orig);
        return;
    }
    // What a user does: `resume` when the store looks like LUKS, and the same
    // `encrypt` command again (same header store) when there is no header or when
    // `resume` says the first header write was cut.
    let encrypt_again = || {
        if detached {
            assert!(
                data.to_vec() == orig,
                "data was written before the header was valid"
            );
            luksify_walker::encrypt(&data, Some(&hdr), PASS, &o, &Control::default())
        } else {
            luksify_walker::encrypt::<_, MemDisk, _>(&data, None, PASS, &o, &Control::default())
        }
    };
    let out = if meta_is_luks {
        let r = if detached {
            luksify_walker::resume(&data, Some(&hdr), PASS, o.tuning, &Control::default())
        } else {
            luksify_walker::resume::<_, MemDisk, _>(
                &data,
                None,
                PASS,
                o.tuning,
                &Control::default(),
            )
        };
        match r {
            Err(luksify_walker::Error::Refused(m))
                if m.contains("run the same `luksify encrypt") =>
            {
                encrypt_again()
            }
            r => r,
        }
    } else {
        encrypt_again()
    };
    assert_eq!(out.unwrap(), Outcome::Finished);
    check_decrypts_to(&data, placement, &orig);
}

/// Operations a full uninterrupted run issues (so cut points cover all of it).
fn total_ops(placement: Placement) -> u64 {
    total_ops_with(placement, None, Hash::Sha256)
}

fn total_ops_with(placement: Placement, keyslots: Option<u64>, hash: Hash) -> u64 {
    total_ops_sized(placement, keyslots, hash, SIZE, 512)
}

/// [`total_ops_with`] on a device of `size` bytes writing `unit`s atomically.
fn total_ops_sized(
    placement: Placement,
    keyslots: Option<u64>,
    hash: Hash,
    size: usize,
    unit: usize,
) -> u64 {
    let pc = PowerCutDisk::new(MemDisk::from_vec(plaintext_of(1, size)), unit);
    let h = pc.sibling(MemDisk::new(0));
    let o = opts_with(placement, keyslots, hash);
    let r = match placement {
        Placement::Detached { .. } => {
            luksify_walker::encrypt(&pc, Some(&h), PASS, &o, &Control::default())
        }
        _ => luksify_walker::encrypt::<_, MemDisk, _>(&pc, None, PASS, &o, &Control::default()),
    };
    assert_eq!(r.unwrap(), Outcome::Finished);
    pc.ops()
}

fn placements() -> Vec<(Placement, usize, bool)> {
    let checksum = Placement::Detached {
        resilience: Resilience::Checksum,
    };
    vec![
        // Tears at 512 bytes in every mode: the walker takes the checksum block from
        // the device's write unit (512 here, as on most disks), so every block is
        // old or new whole. (With 4096-byte blocks on this device, a torn block
        // matched neither sum and was taken as new: part old bytes, lost.)
        (checksum, 512, false),
        // Checksum mode on a device read with O_DIRECT: the workers read ahead of
        // hashing and the coordinator, not a worker, flushes each hotzone.
        (checksum, 512, true),
        (
            Placement::Detached {
                resilience: Resilience::Journal,
            },
            512,
            false,
        ),
        (Placement::Shift { reduce: REDUCE }, 512, false),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
    #[test]
    fn walker_power_cut_anywhere_then_resume_restores_plaintext(
        which in 0usize..4, frac in 0.0f64..1.02, fates in any::<u64>(), seed in 1u64..1000
    ) {
        let place = placements()[which];
        let n = total_ops(place.0);
        let cut = ((n as f64) * frac) as u64;
        crash_and_resume(place, cut, fates, seed);
    }
}

/// Journal mode with one area: a 2 MiB keyslots area leaves ~1.75 MiB of free room,
/// less than two 4 MiB halves, so the walker uses one journal area as cryptsetup does
/// (clean commit, copy, flush, commit hot) instead of the double-buffered halves.
#[test]
fn walker_power_cut_with_a_single_journal_area_then_resume_restores_plaintext() {
    let p = Placement::Detached {
        resilience: Resilience::Journal,
    };
    let keyslots = Some(2 << 20);
    let n = total_ops_with(p, keyslots, Hash::Sha256);
    for i in 0..24u64 {
        let cut = n * i / 23 + i % 3;
        crash_and_resume_with(
            (p, 512, false),
            keyslots,
            Hash::Sha256,
            cut,
            i * 0x9e37_79b9 + 5,
            i + 11,
        );
    }
}

/// A device that is not whole 4096-byte blocks (a partition of an odd number of
/// 512-byte sectors; here 6 MiB + 1.5 KiB) on a device that writes 4096 bytes
/// atomically, as image files do: every layout, encryption and decryption each cut at 16
/// points spread over the run (O_DIRECT and buffered checksum schedules alternating),
/// then resumed.
#[test]
fn walker_power_cut_on_a_device_of_partial_4096_byte_blocks_then_resume_restores_plaintext() {
    let size = SIZE + 1536;
    for (p, _, _) in placements().into_iter().skip(1) {
        let n = total_ops_sized(p, None, Hash::Sha256, size, 4096);
        for i in 0..16u64 {
            let cut = n * i / 15 + i % 3;
            let place = (p, 4096, i % 2 == 1);
            crash_and_resume_sized(
                place,
                None,
                Hash::Sha256,
                size,
                cut,
                i * 0x9e37_79b9 + 3,
                i + 70,
            );
        }
        let n = total_decrypt_ops_sized(p, size, 4096);
        for i in 0..16u64 {
            let cut = n * i / 15 + i % 3;
            let place = (p, 4096, i % 2 == 1);
            decrypt_cut_and_resume_sized(place, size, cut, i * 0x2545_f491 + 7, i + 90);
        }
    }
}

/// Checksum resilience with another hash (`--resilience-hash`): sha1 and sha512 digests
/// of 512-byte blocks, cut at 24 points spread over the run with 512-byte tears.
#[test]
fn walker_power_cut_with_other_checksum_hashes_then_resume_restores_plaintext() {
    let p = Placement::Detached {
        resilience: Resilience::Checksum,
    };
    for hash in [Hash::Sha1, Hash::Sha512] {
        let n = total_ops_with(p, None, hash);
        for i in 0..24u64 {
            let cut = n * i / 23 + i % 5;
            let direct = i % 2 == 1;
            let place = (p, 512, direct);
            crash_and_resume_with(place, None, hash, cut, i * 0x2545_f491 + 9, i + 40);
        }
    }
}

#[test]
fn walker_power_cut_at_every_early_operation() {
    // The start is the delicate part (moved segment, first header): cut at each
    // of the first operations of every layout.
    for place in placements() {
        for cut in 0..12 {
            crash_and_resume(place, cut, cut * 7919 + 1, 3);
        }
    }
}

#[test]
fn walker_power_cut_at_every_operation_of_a_stretch_mid_run() {
    // Every operation over several hotzones in the middle of a run, each layout:
    // the commits there leave the secondary header copy written but unflushed until
    // the next flush of its device, and checksum mode writes a hotzone's sums to the
    // half of the area the header does not name while the previous hotzone is still
    // being written. A cut at each of those instants (pending writes torn, lost or
    // landed at random) must leave a state that resumes to the plaintext.
    for place in placements() {
        let n = total_ops(place.0);
        let from = n / 2;
        for cut in from..from + 48 {
            crash_and_resume(
                place,
                cut,
                cut.wrapping_mul(0x2545_f491_4f6c_dd1d),
                cut % 7 + 2,
            );
        }
    }
}

/// The number of operations after which the first complete header is durable (all
/// earlier writes landing): the first header write is the operation(s) just before.
fn ops_to_first_header(placement: Placement, decrypting: bool) -> u64 {
    for cut in 0.. {
        let data = MemDisk::from_vec(plaintext(1));
        let hdr = MemDisk::new(0);
        let o = opts(placement);
        let detached = matches!(placement, Placement::Detached { .. });
        let store = if decrypting {
            if detached {
                luksify_walker::encrypt(&data, Some(&hdr), PASS, &o, &Control::default())
            } else {
                luksify_walker::encrypt::<_, MemDisk, _>(&data, None, PASS, &o, &Control::default())
            }
            .unwrap();
            let dhdr = if detached {
                hdr.clone()
            } else {
                MemDisk::new(0)
            };
            let pc = PowerCutDisk::new(data.clone(), 512);
            let hpc = pc.sibling(dhdr.clone());
            pc.cut_after_ops(cut);
            let d = DecryptOptions {
                checksum_hash: Hash::Sha256,
                resilience: Resilience::Checksum,
                tuning: o.tuning,
                key_slot: None,
            };
            let _ = luksify_walker::decrypt(&pc, Some(&hpc), PASS, &d, &Control::default());
            hpc.settle(|_, u| vec![true; u]).unwrap();
            pc.settle(|_, u| vec![true; u]).unwrap();
            // Detached decryption rewrites an existing header: its first new one is
            // the one whose state says "decrypt".
            match luksify_luks::luks2::Luks2Header::read(&dhdr) {
                Ok((h, _))
                    if !detached
                        || luksify_luks::reencrypt::state(&h.metadata)
                            .unwrap()
                            .is_some() =>
                {
                    return cut
                }
                _ => continue,
            }
        } else {
            let pc = PowerCutDisk::new(data.clone(), 512);
            let hpc = pc.sibling(hdr.clone());
            pc.cut_after_ops(cut);
            let _ = if detached {
                luksify_walker::encrypt(&pc, Some(&hpc), PASS, &o, &Control::default())
            } else {
                luksify_walker::encrypt::<_, MemDisk, _>(&pc, None, PASS, &o, &Control::default())
            };
            hpc.settle(|_, u| vec![true; u]).unwrap();
            pc.settle(|_, u| vec![true; u]).unwrap();
            if detached {
                hdr
            } else {
                data
            }
        };
        if luksify_luks::luks2::Luks2Header::read(&store).is_ok() {
            return cut;
        }
    }
    unreachable!()
}

/// A cut while the first header is being written (torn or partly lost copies, every
/// layout): the store shows either a header to resume from, or `resume` says the
/// start was cut and the same command run again finishes; the data stays intact.
#[test]
fn walker_power_cut_during_the_first_header_write_leaves_a_way_on() {
    for place in placements() {
        let p = place.0;
        let first = ops_to_first_header(p, false);
        assert!(first > 2, "{p:?}: first header after {first} ops?");
        for cut in first.saturating_sub(4)..=first + 1 {
            for f in 0..6u64 {
                crash_and_resume(place, cut, f * 0x2545_f491 + cut, 5 + f);
            }
        }
        let first = ops_to_first_header(p, true);
        for cut in first.saturating_sub(4)..=first + 1 {
            for f in 0..6u64 {
                decrypt_cut_and_resume(place, cut, f * 0x2545_f491 + cut, 6 + f);
            }
        }
    }
}

/// A data-shift start cut by a power loss at every one of its operations up to its first
/// durable header, each with 16 fates of the writes not yet flushed. Among them, the
/// start marker's write at byte 0 lands in part: its sector holding the marker lost, some
/// of the others (zeros) landed over the head. That head is still the run's, and the
/// moved copy is what counts: taken for a head changed since (trial R3's case, which the
/// end marker alone now gives back to the head), it was moved again with zeros in it.
#[test]
fn walker_power_cut_at_every_operation_of_a_shift_start_with_every_fate() {
    let place = (Placement::Shift { reduce: REDUCE }, 512, false);
    let first = ops_to_first_header(place.0, false);
    for cut in 0..=first + 1 {
        for f in 0..16u64 {
            crash_and_resume(
                place,
                cut,
                f.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ cut,
                7 + f,
            );
        }
    }
}

/// Decryption under the same power-cut model: the volume is encrypted (uncut),
/// then `decrypt` is cut after `cut` operations; what the header file says then
/// decides: in progress -> `resume` must finish it; no valid journal -> a fresh
/// `decrypt` starts over. The device must end up holding the original plaintext.
fn decrypt_cut_and_resume(place: (Placement, usize, bool), cut: u64, fates: u64, seed: u64) {
    decrypt_cut_and_resume_sized(place, SIZE, cut, fates, seed)
}

/// [`decrypt_cut_and_resume`] on a device of `size` bytes.
fn decrypt_cut_and_resume_sized(
    (placement, unit, direct): (Placement, usize, bool),
    size: usize,
    cut: u64,
    fates: u64,
    seed: u64,
) {
    let orig = plaintext_of(seed, size);
    let data = MemDisk::from_vec(orig.clone());
    let hdr = MemDisk::new(0);
    let o = opts(placement);
    let detached = matches!(placement, Placement::Detached { .. });
    let enc = if detached {
        luksify_walker::encrypt(&data, Some(&hdr), PASS, &o, &Control::default())
    } else {
        luksify_walker::encrypt::<_, MemDisk, _>(&data, None, PASS, &o, &Control::default())
    };
    assert_eq!(enc.unwrap(), Outcome::Finished);
    // Detached: decrypt with the volume's header; in front: the header moves to a new file.
    let dhdr = if detached {
        hdr.clone()
    } else {
        MemDisk::new(0)
    };
    let dopts = DecryptOptions {
        checksum_hash: Hash::Sha256,
        resilience: match placement {
            Placement::Detached { resilience } => resilience,
            Placement::Shift { .. } => Resilience::Checksum,
        },
        tuning: o.tuning,
        key_slot: None,
    };
    let pc = power_cut_disk(&data, unit, direct);
    let hpc = pc.sibling(dhdr.clone());
    pc.cut_after_ops(cut);
    let r = luksify_walker::decrypt(&pc, Some(&hpc), PASS, &dopts, &Control::default());
    power_comes_back(&pc, &hpc, &r, fates);
    let state = luksify_luks::luks2::Luks2Header::read(&dhdr)
        .ok()
        .and_then(|(h, _)| luksify_luks::reencrypt::state(&h.metadata).unwrap());
    // What a user does: `resume` when the header file looks like LUKS and holds a
    // run in progress or no valid copy (following its advice to run the same
    // `decrypt` again when the first header write was cut); else `decrypt` again
    // with the same header file.
    let decrypt_again =
        || luksify_walker::decrypt(&data, Some(&dhdr), PASS, &dopts, &Control::default());
    let looks_luks = dhdr.size().unwrap() > 0 && luksify_luks::probe(&dhdr).unwrap().is_some();
    match state {
        Some(_) => {
            let out =
                luksify_walker::resume(&data, Some(&dhdr), PASS, o.tuning, &Control::default());
            assert_eq!(out.unwrap(), Outcome::Finished);
        }
        None if looks_luks && luksify_luks::luks2::Luks2Header::read(&dhdr).is_err() => {
            let out =
                luksify_walker::resume(&data, Some(&dhdr), PASS, o.tuning, &Control::default());
            match out {
                Err(luksify_walker::Error::Refused(m))
                    if m.contains("run the same `luksify decrypt") =>
                {
                    assert_eq!(decrypt_again().unwrap(), Outcome::Finished);
                }
                other => panic!("resume after a cut first header write: {other:?}"),
            }
        }
        None => {
            // Either finished, or the journal never became valid: start over
            // (on a finished volume this refuses, which is fine; the bytes decide).
            let again = decrypt_again();
            if luksify_luks::probe(&data).unwrap().is_some() || again.is_ok() {
                assert_eq!(again.unwrap(), Outcome::Finished);
            }
        }
    }
    let kept = match placement {
        Placement::Detached { .. } => size,
        Placement::Shift { reduce } => size - reduce as usize,
    };
    assert!(
        data.to_vec()[..kept] == orig[..kept],
        "decrypted device differs from the original plaintext"
    );
}

fn total_decrypt_ops(placement: Placement) -> u64 {
    total_decrypt_ops_sized(placement, SIZE, 512)
}

/// [`total_decrypt_ops`] on a device of `size` bytes writing `unit`s atomically.
fn total_decrypt_ops_sized(placement: Placement, size: usize, unit: usize) -> u64 {
    let data = MemDisk::from_vec(plaintext_of(1, size));
    let hdr = MemDisk::new(0);
    let o = opts(placement);
    let detached = matches!(placement, Placement::Detached { .. });
    if detached {
        luksify_walker::encrypt(&data, Some(&hdr), PASS, &o, &Control::default()).unwrap();
    } else {
        luksify_walker::encrypt::<_, MemDisk, _>(&data, None, PASS, &o, &Control::default())
            .unwrap();
    }
    let dhdr = if detached { hdr } else { MemDisk::new(0) };
    let pc = PowerCutDisk::new(data, unit);
    let h = pc.sibling(dhdr);
    let dopts = DecryptOptions {
        checksum_hash: Hash::Sha256,
        resilience: match placement {
            Placement::Detached { resilience } => resilience,
            Placement::Shift { .. } => Resilience::Checksum,
        },
        tuning: o.tuning,
        key_slot: None,
    };
    let r = luksify_walker::decrypt(&pc, Some(&h), PASS, &dopts, &Control::default());
    assert_eq!(r.unwrap(), Outcome::Finished);
    pc.ops()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
    #[test]
    fn walker_power_cut_during_decrypt_then_resume_restores_plaintext(
        which in 0usize..4, frac in 0.0f64..1.02, fates in any::<u64>(), seed in 1u64..1000
    ) {
        let place = placements()[which];
        let n = total_decrypt_ops(place.0);
        let cut = ((n as f64) * frac) as u64;
        decrypt_cut_and_resume(place, cut, fates, seed);
    }
}

#[test]
fn walker_power_cut_at_every_early_decrypt_operation() {
    for place in placements() {
        for cut in 0..12 {
            decrypt_cut_and_resume(place, cut, cut * 104_729 + 5, 4);
        }
    }
}

/// A decryption cryptsetup 2.6 started (`reencrypt --decrypt --init-only`) on a volume
/// luksify encrypted from `orig`: (image bytes, header file bytes). `shift`: header in
/// front (`--reduce-device-size 2M`; cryptsetup then moves the head, resilience
/// `datashift-checksum` or `datashift-journal`), else detached (backward, in place).
fn cryptsetup_started_decryption(orig: &[u8], shift: bool, resilience: &str) -> (Vec<u8>, Vec<u8>) {
    use luksify_tests::{luksify_bin, run_ok};
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let (img, hdr, key) = (
        dir.path().join("img"),
        dir.path().join("hdr"),
        dir.path().join("key"),
    );
    std::fs::write(&img, orig).unwrap();
    std::fs::write(&key, PASS).unwrap();
    let mut enc = Command::new(luksify_bin());
    enc.arg("encrypt").arg(&img).arg("--key-file").arg(&key);
    enc.args(["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]);
    if shift {
        enc.args(["--reduce-device-size", "2M"]);
    } else {
        enc.arg("--header").arg(&hdr);
    }
    run_ok(&mut enc);
    run_ok(
        Command::new("cryptsetup")
            .args([
                "reencrypt",
                "--decrypt",
                "--init-only",
                "--force-offline-reencrypt",
            ])
            .args([
                "--batch-mode",
                "--resilience",
                resilience,
                "--hotzone-size",
                "512K",
            ])
            .arg("--header")
            .arg(&hdr)
            .arg("--key-file")
            .arg(&key)
            .arg(&img),
    );
    (std::fs::read(&img).unwrap(), std::fs::read(&hdr).unwrap())
}

/// luksify finishing a decryption cryptsetup started, under power cuts: its resume is
/// cut after each of many operations (pending writes torn, lost or landed), then resumed
/// again, and the device must hold the original plaintext. Covers the backward in-place
/// walk (detached header; checksum and journal) and the head-last layout of a header in
/// front (the tail moved down, then the moved head decrypted in place under checksums
/// or a journal). Needs cryptsetup to produce the starting states.
#[test]
fn walker_power_cut_while_finishing_cryptsetups_decryption_then_resume_restores_plaintext() {
    luksify_tests::require_tool("cryptsetup");
    let orig = plaintext(77);
    let tuning = opts(Placement::Shift { reduce: REDUCE }).tuning;
    for (shift, res, unit) in [
        (false, "checksum", 4096),
        (false, "journal", 512),
        (true, "checksum", 4096),
        (true, "journal", 512),
    ] {
        let (img0, hdr0) = cryptsetup_started_decryption(&orig, shift, res);
        let kept = if shift { SIZE - REDUCE as usize } else { SIZE };
        // Operations of an uncut resume.
        let total = {
            let pc = PowerCutDisk::new(MemDisk::from_vec(img0.clone()), unit);
            let h = pc.sibling(MemDisk::from_vec(hdr0.clone()));
            let r = luksify_walker::resume(&pc, Some(&h), PASS, tuning, &Control::default());
            assert_eq!(r.unwrap(), Outcome::Finished, "{res} shift={shift}");
            assert!(
                pc.durable().to_vec()[..kept] == orig[..kept],
                "{res} shift={shift} uncut"
            );
            pc.ops()
        };
        // Every operation of the last stretch (the head, for the shift layout) and a
        // spread over the rest.
        let cuts = (0..total).filter(|c| c % 7 == 0 || *c + 40 >= total);
        for cut in cuts {
            let what = format!("{res} shift={shift} cut {cut} of {total}");
            let data = MemDisk::from_vec(img0.clone());
            let hdr = MemDisk::from_vec(hdr0.clone());
            let pc = PowerCutDisk::new(data.clone(), unit);
            let hpc = pc.sibling(hdr.clone());
            pc.cut_after_ops(cut);
            let r = luksify_walker::resume(&pc, Some(&hpc), PASS, tuning, &Control::default());
            power_comes_back(&pc, &hpc, &r, cut.wrapping_mul(0x9e37_79b9_7f4a_7c15) + 3);
            let in_progress = luksify_luks::luks2::Luks2Header::read(&hdr)
                .ok()
                .and_then(|(h, _)| luksify_luks::reencrypt::state(&h.metadata).unwrap())
                .is_some();
            if in_progress {
                let again =
                    luksify_walker::resume(&data, Some(&hdr), PASS, tuning, &Control::default());
                assert_eq!(again.unwrap(), Outcome::Finished, "{what}");
            }
            assert!(
                data.to_vec()[..kept] == orig[..kept],
                "{what}: plaintext differs"
            );
        }
    }
}

/// A data-shift start cut while its first header was being written leaves the head of
/// the device overwritten and its first part only in the copy moved to the end. Another
/// layout over it (a detached header, another reduction) would encrypt over that copy
/// and lose the first part: it is refused with the command that continues the start,
/// nothing written, and that command (or `resume`) restores every byte.
#[test]
fn walker_cut_shift_start_refuses_another_layout_over_it() {
    let shift = Placement::Shift { reduce: REDUCE };
    let first = ops_to_first_header(shift, false);
    let others = [
        (
            Placement::Detached {
                resilience: Resilience::Checksum,
            },
            true,
        ),
        (Placement::Shift { reduce: 2 * REDUCE }, false),
    ];
    let mut refused = 0;
    for cut in first.saturating_sub(3)..=first + 1 {
        for f in 0..4u64 {
            let orig = plaintext(40 + f);
            let data = MemDisk::from_vec(orig.clone());
            let pc = power_cut_disk(&data, 512, false);
            let hpc = pc.sibling(MemDisk::new(0));
            pc.cut_after_ops(cut);
            let r = luksify_walker::encrypt::<_, MemDisk, _>(
                &pc,
                None,
                PASS,
                &opts(shift),
                &Control::default(),
            );
            power_comes_back(&pc, &hpc, &r, f * 0x2545_f491 + cut);
            let before = data.to_vec();
            if before[..(REDUCE / 2) as usize] != orig[..(REDUCE / 2) as usize] {
                for (other, detached) in others {
                    let hdr = MemDisk::new(0);
                    let o = opts(other);
                    let r = if detached {
                        luksify_walker::encrypt(&data, Some(&hdr), PASS, &o, &Control::default())
                    } else {
                        luksify_walker::encrypt::<_, MemDisk, _>(
                            &data,
                            None,
                            PASS,
                            &o,
                            &Control::default(),
                        )
                    };
                    match r {
                        Err(luksify_walker::Error::Refused(m))
                            if m.contains("--reduce-device-size 2M") =>
                        {
                            refused += 1
                        }
                        r => panic!("cut {cut}, {other:?} over a cut shift start: {r:?}"),
                    }
                    assert!(data.to_vec() == before, "a refused run wrote");
                    assert_eq!(hdr.size().unwrap(), 0, "a refused run wrote its header");
                }
            }
            let again = luksify_walker::encrypt::<_, MemDisk, _>(
                &data,
                None,
                PASS,
                &opts(shift),
                &Control::default(),
            );
            let out = match again {
                Err(luksify_walker::Error::Refused(m)) if m.contains("luksify resume") => {
                    luksify_walker::resume::<_, MemDisk, _>(
                        &data,
                        None,
                        PASS,
                        opts(shift).tuning,
                        &Control::default(),
                    )
                }
                r => r,
            };
            assert_eq!(out.unwrap(), Outcome::Finished, "cut {cut}");
            check_decrypts_to(&data, shift, &orig);
        }
    }
    assert!(refused > 0, "no cut left the head overwritten");
}

/// The data device with one fault: writes reaching past `write_limit` fail for want of
/// space (a sparse image on a filling filesystem; the bytes below the limit land), or a
/// read of the block at `bad_read` fails (a bad sector).
struct FaultyDisk {
    inner: MemDisk,
    write_limit: u64,
    bad_read: u64,
}

impl Disk for FaultyDisk {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if (off..off + buf.len() as u64).contains(&self.bad_read) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.read_at(off, buf)
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> std::io::Result<()> {
        let end = off + buf.len() as u64;
        if end > self.write_limit {
            let fits = self.write_limit.saturating_sub(off) as usize;
            self.inner.write_at(off, &buf[..fits.min(buf.len())])?;
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.inner.write_at(off, buf)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn size(&self) -> std::io::Result<u64> {
        self.inner.size()
    }
}

/// Resilience `none` stopped by an I/O error, not a crash: the header used to keep
/// naming its whole window (1 GiB, here the whole device) as "may be part rewritten",
/// so `resume` told the user to restore all of it from a backup. Now the walk stops
/// like a Ctrl-C: after a failed read nothing is lost and `resume` finishes; after a
/// write refused for want of space the failed chunk is read back, and a clean prefix
/// of whole 4096-byte blocks (what the disk took before it was full) counts as written,
/// so `resume` finishes too; a prefix ending inside a block cannot be recorded, and
/// only the chunk being written (64 KiB here) is named: everything before it decrypts
/// to the original and everything after is untouched.
#[test]
fn walker_none_stopped_by_an_io_error_loses_at_most_the_chunk_being_written() {
    let p = Placement::Detached {
        resilience: Resilience::None,
    };
    let o = opts(p);
    let block = (3 << 20) + (100 << 10);
    for (write_fails, fault) in [(true, block), (true, block + 512), (false, block)] {
        let orig = plaintext(31);
        let data = MemDisk::from_vec(orig.clone());
        let hdr = MemDisk::new(0);
        let faulty = FaultyDisk {
            inner: data.clone(),
            write_limit: if write_fails { fault } else { u64::MAX },
            bad_read: if write_fails { u64::MAX } else { fault },
        };
        let r = luksify_walker::encrypt(&faulty, Some(&hdr), PASS, &o, &Control::default());
        assert!(
            matches!(r, Err(luksify_walker::Error::Io { .. })),
            "write fails {write_fails}: {r:?}"
        );
        let out = luksify_walker::resume(&data, Some(&hdr), PASS, o.tuning, &Control::default());
        if !write_fails || fault.is_multiple_of(4096) {
            assert_eq!(out.unwrap(), Outcome::Finished, "fault at {fault}");
            check_decrypts_to(&data, p, &orig);
            continue;
        }
        let Err(luksify_walker::Error::Unrecoverable { start, len }) = out else {
            panic!("after a failed write: {out:?}");
        };
        assert!(
            start <= fault && fault < start + len && len <= o.tuning.chunk as u64,
            "named {start}+{len} for a write failing at {fault}"
        );
        let c = SectorCipher::new("aes-xts-plain64", &vk(), 512).unwrap();
        let now = data.to_vec();
        let mut done = now[..start as usize].to_vec();
        c.decrypt(&mut done, 0).unwrap();
        assert!(done == orig[..start as usize], "the part before differs");
        let after = (start + len) as usize;
        assert!(now[after..] == orig[after..], "the part after was touched");
    }
}
