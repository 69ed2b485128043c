//! In-memory LUKS2 round trips: format, read back, unlock, keyslot management,
//! repair from the secondary copy, and rejection of damaged headers without writes.

use luksify_luks::io::{Disk, MemDisk};
use luksify_luks::kdf::KdfRequest;
use luksify_luks::luks2::json::{Keyslot, Priority};
use luksify_luks::luks2::{CopyState, FormatOptions, Luks2Header};
use luksify_luks::Error;

fn fast_opts() -> FormatOptions {
    FormatOptions {
        kdf: KdfRequest::fast_pbkdf2(),
        label: "roundtrip".into(),
        ..FormatOptions::default()
    }
}

fn formatted() -> (MemDisk, Luks2Header, luksify_luks::VolumeKey) {
    let disk = MemDisk::new(20 << 20);
    let (hdr, vk) = Luks2Header::format(&disk, b"pass0", &fast_opts()).unwrap();
    (disk, hdr, vk)
}

#[test]
fn format_then_read_and_unlock() {
    let (disk, hdr, vk) = formatted();
    let (read, report) = Luks2Header::read(&disk).unwrap();
    assert!(!report.needs_repair, "{report:?}");
    assert_eq!(read, hdr);
    assert_eq!(read.seqid, 1);
    assert_eq!(read.label, "roundtrip");
    let (got, slot) = read.unlock(&disk, b"pass0", None).unwrap();
    assert_eq!(slot, 0);
    assert_eq!(got, vk);
    assert!(matches!(
        read.unlock(&disk, b"wrong", None),
        Err(Error::WrongPassphrase)
    ));
    let seg = read.data_segment().unwrap();
    assert_eq!(
        (seg.offset, seg.sector_size, seg.iv_tweak),
        (16 << 20, 512, 0)
    );
    assert_eq!(seg.key_size, Some(64));
    seg.cipher(&got).unwrap();
}

#[test]
fn argon2id_keyslot_unlocks() {
    let disk = MemDisk::new(17 << 20);
    let opts = FormatOptions {
        kdf: KdfRequest::fast_argon2id(),
        key_size: 32,
        sector_size: 4096,
        ..FormatOptions::default()
    };
    let (hdr, vk) = Luks2Header::format(&disk, b"argon", &opts).unwrap();
    assert_eq!(hdr.unlock(&disk, b"argon", None).unwrap().0, vk);
}

#[test]
fn add_change_remove_keys_and_priorities() {
    let (disk, mut hdr, vk) = formatted();
    let req = KdfRequest::fast_pbkdf2();
    let s1 = hdr
        .add_keyslot(&disk, &vk, b"pass1", &req, None, None)
        .unwrap();
    let s5 = hdr
        .add_keyslot(&disk, &vk, b"pass5", &req, Some(5), None)
        .unwrap();
    assert_eq!((s1, s5), (1, 5));
    let (hdr2, _) = Luks2Header::read(&disk).unwrap();
    assert_eq!(hdr2.keyslot_ids(), vec![0, 1, 5]);
    assert_eq!(hdr2.unlock(&disk, b"pass5", None).unwrap().1, 5);

    hdr.change_keyslot(&disk, 1, b"pass1", b"pass1b", &req)
        .unwrap();
    assert!(matches!(
        hdr.unlock(&disk, b"pass1", None),
        Err(Error::WrongPassphrase)
    ));
    assert_eq!(hdr.unlock(&disk, b"pass1b", None).unwrap(), (vk.clone(), 1));

    // Priority 0: skipped unless the slot is named.
    hdr.set_priority(&disk, 5, Priority::Ignore).unwrap();
    assert!(matches!(
        hdr.unlock(&disk, b"pass5", None),
        Err(Error::WrongPassphrase)
    ));
    assert_eq!(hdr.unlock(&disk, b"pass5", Some(5)).unwrap().1, 5);

    hdr.remove_keyslot(&disk, 0).unwrap();
    let (hdr3, _) = Luks2Header::read(&disk).unwrap();
    assert!(!hdr3.metadata.keyslots.contains_key(&0));
    assert!(matches!(
        hdr3.unlock(&disk, b"pass0", None),
        Err(Error::WrongPassphrase)
    ));
    assert_eq!(hdr3.unlock(&disk, b"pass1b", None).unwrap().0, vk);
}

#[test]
fn damaged_primary_recovered_from_secondary_and_repaired() {
    let (disk, hdr, _vk) = formatted();
    // Corrupt one byte of the primary JSON area.
    disk.write_at(4096 + 10, b"#").unwrap();
    let (read, report) = Luks2Header::read(&disk).unwrap();
    assert!(matches!(report.primary, CopyState::Invalid(_)));
    assert!(report.secondary.is_valid());
    assert_eq!(read.metadata, hdr.metadata);
    let (_, report2) = Luks2Header::read_and_repair(&disk).unwrap();
    assert!(report2.needs_repair);
    let (_, report3) = Luks2Header::read(&disk).unwrap();
    assert!(!report3.needs_repair, "{report3:?}");
    assert_eq!(report3.primary, CopyState::Valid { seqid: hdr.seqid });
}

#[test]
fn higher_seqid_wins() {
    let (disk, mut hdr, _vk) = formatted();
    let before = disk.to_vec();
    hdr.label = "newer".into();
    hdr.write(&disk).unwrap();
    // Put the old primary back: the secondary now has the higher seqid.
    disk.write_at(0, &before[..16384]).unwrap();
    let (read, report) = Luks2Header::read(&disk).unwrap();
    assert_eq!(read.label, "newer");
    assert!(report.needs_repair);
}

#[test]
fn garbage_is_refused_without_writes() {
    for bytes in [
        vec![0u8; 1 << 20],
        b"LUKS\xba\xbe\x00\x07"
            .iter()
            .copied()
            .chain(std::iter::repeat_n(0, 40000))
            .collect(),
    ] {
        let disk = MemDisk::from_vec(bytes);
        assert!(Luks2Header::read(&disk).is_err());
        assert!(Luks2Header::read_and_repair(&disk).is_err());
        assert_eq!(disk.write_count(), 0);
    }
    let (disk, _, _) = formatted();
    disk.write_at(100, b"x").unwrap();
    disk.write_at(16384 + 100, b"x").unwrap();
    let n = disk.write_count();
    assert!(matches!(
        Luks2Header::read_and_repair(&disk),
        Err(Error::NoValidHeader { .. })
    ));
    assert_eq!(disk.write_count(), n);
}

#[test]
fn unknown_fields_and_tokens_survive_rewrite() {
    let (disk, mut hdr, _) = formatted();
    let tok: luksify_luks::luks2::json::Token = serde_json::from_str(
        r#"{"type":"systemd-tpm2","keyslots":["0"],"tpm2-pcrs":[7],"x":{"y":1}}"#,
    )
    .unwrap();
    hdr.metadata.tokens.insert(3, tok.clone());
    hdr.metadata.config.flags = Some(vec!["allow-discards".into(), "future-flag".into()]);
    if let Some(Keyslot::Luks2(k)) = hdr.metadata.keyslots.get_mut(&0) {
        k.extra.insert("vendor".into(), serde_json::json!("kept"));
    }
    hdr.metadata
        .extra
        .insert("future".into(), serde_json::json!({"a": [1, 2]}));
    hdr.write(&disk).unwrap();
    let (read, _) = Luks2Header::read(&disk).unwrap();
    assert_eq!(read.metadata, hdr.metadata);
    assert_eq!(read.metadata.tokens[&3], tok);
}

#[test]
fn metadata_too_big_for_the_json_area_is_refused_before_any_write() {
    let (disk, mut hdr, _) = formatted();
    let before = disk.to_vec();
    let writes = disk.write_count();
    let seqid = hdr.seqid;
    let tok: luksify_luks::luks2::json::Token = serde_json::from_value(serde_json::json!({
        "type": "huge",
        "keyslots": [],
        "blob": "x".repeat(20_000),
    }))
    .unwrap();
    hdr.metadata.tokens.insert(0, tok);
    let err = hdr.write(&disk).unwrap_err();
    assert!(err.to_string().contains("does not fit"), "{err}");
    assert_eq!(hdr.seqid, seqid);
    assert_eq!(disk.write_count(), writes);
    assert!(disk.to_vec() == before);
}

#[test]
fn every_metadata_size_formats_reads_and_finds_the_secondary() {
    for size in luksify_luks::luks2::binary::METADATA_SIZES {
        let disk = MemDisk::new(0);
        let opts = FormatOptions {
            metadata_size: size,
            ..fast_opts()
        };
        let (hdr, vk) = Luks2Header::format(&disk, b"p", &opts).unwrap();
        assert_eq!(hdr.metadata.config.json_size, size - 4096);
        // Wipe the primary completely: the secondary is found by scanning.
        disk.write_at(0, &vec![0u8; 4096]).unwrap();
        let (read, report) = Luks2Header::read(&disk).unwrap();
        assert_eq!(report.secondary_offset, Some(size));
        assert_eq!(read.unlock(&disk, b"p", None).unwrap().0, vk);
    }
}

/// Detached-header, in-place layout of a dynamic-size device, aes-xts-plain64.
fn in_place_layout(
    mode: luksify_luks::luks2::json::ReencryptMode,
) -> luksify_luks::reencrypt::EncryptLayout {
    luksify_luks::reencrypt::EncryptLayout {
        mode,
        data_offset: 0,
        old_offset: 0,
        data_size: None,
        encryption: "aes-xts-plain64".into(),
        sector_size: 512,
        shift: None,
    }
}

/// A double-buffered journal moves the reencrypt keyslot between two areas at every
/// commit; the digest cache must give, for each area, a digest that verifies, reuse
/// the one first computed for that area (no second PBKDF2), and never hand one area's
/// digest to another area or to another volume key.
#[test]
fn reencrypt_digest_cache_alternates_two_areas_and_stays_exact() {
    use luksify_luks::luks2::json::{Digest, ReencryptArea, ReencryptDirection, ReencryptMode};
    use luksify_luks::reencrypt::{self, DigestCache};
    let (_disk, mut hdr, vk) = formatted();
    let key_digest = hdr.digest_id_for_keyslot(0).unwrap();
    let layout = in_place_layout(ReencryptMode::Encrypt);
    let (a, b) = (
        ReencryptArea::Journal {
            offset: 32768,
            size: 4 << 20,
        },
        ReencryptArea::Journal {
            offset: 32768 + (4 << 20),
            size: 4 << 20,
        },
    );
    let mut st = reencrypt::init_encrypt(
        &mut hdr.metadata,
        key_digest,
        vk.as_bytes(),
        layout,
        ReencryptDirection::Forward,
        a.clone(),
    )
    .unwrap();
    let ks = st.keyslot;
    type SaltDigest = (Vec<u8>, Vec<u8>);
    let digest_of = |md: &luksify_luks::luks2::json::Metadata| -> SaltDigest {
        let found: Vec<_> = md
            .digests
            .values()
            .filter_map(|d| match d {
                Digest::Pbkdf2(d) if d.keyslots.contains(&ks) => {
                    Some((d.salt.clone(), d.digest.clone()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            found.len(),
            1,
            "exactly one digest bound to the reencrypt keyslot"
        );
        found[0].clone()
    };
    let mut cache = DigestCache::default();
    // (area, (salt, digest)) first seen for each area.
    let mut seen: Vec<(ReencryptArea, SaltDigest)> = Vec::new();
    for (i, area) in [b.clone(), a.clone(), b.clone(), a.clone(), b.clone()]
        .into_iter()
        .enumerate()
    {
        reencrypt::set_area_cached(
            &mut hdr.metadata,
            &mut st,
            area.clone(),
            vk.as_bytes(),
            &mut cache,
        )
        .unwrap();
        reencrypt::verify_reencrypt_digest(&hdr.metadata, ks, vk.as_bytes())
            .unwrap_or_else(|e| panic!("step {i}: digest for {area:?} does not verify: {e}"));
        let d = digest_of(&hdr.metadata);
        match seen.iter().find(|(x, _)| *x == area) {
            Some((_, first)) => assert_eq!(&d, first, "step {i}: {area:?} not reused"),
            None => {
                assert!(
                    seen.iter().all(|(_, other)| other.1 != d.1),
                    "step {i}: {area:?} got another area's digest"
                );
                seen.push((area, d));
            }
        }
    }
    assert_eq!(seen.len(), 2);
    // Another volume key with the same cache: nothing may be reused, and the digest
    // must still verify only against the key it was made for.
    let other_vk = vec![0x5au8; vk.as_bytes().len()];
    reencrypt::set_area_cached(&mut hdr.metadata, &mut st, a.clone(), &other_vk, &mut cache)
        .unwrap();
    reencrypt::verify_reencrypt_digest(&hdr.metadata, ks, &other_vk).unwrap();
    assert!(reencrypt::verify_reencrypt_digest(&hdr.metadata, ks, vk.as_bytes()).is_err());
    // Without a cache every move draws a fresh salt.
    reencrypt::set_area(&mut hdr.metadata, &mut st, b.clone(), vk.as_bytes()).unwrap();
    let b_first = &seen.iter().find(|(x, _)| *x == b).unwrap().1;
    assert_ne!(
        &digest_of(&hdr.metadata),
        b_first,
        "uncached set_area reused a salt"
    );
    reencrypt::verify_reencrypt_digest(&hdr.metadata, ks, vk.as_bytes()).unwrap();
}

/// A forward hotzone that reaches the end of a dynamic-size device leaves no
/// trailing segment (cryptsetup writes none; an empty dynamic one at the device's
/// end made cryptsetup 2.6.1's resume of a repaired data-moving decryption fail).
/// Without a known end the trailing segment stays dynamic, as before.
#[test]
fn last_forward_hotzone_has_no_trailing_segment() {
    use luksify_luks::luks2::json::{ReencryptDirection, ReencryptMode};
    use luksify_luks::reencrypt::{encrypt_segments, Progress};
    const MIB: u64 = 1 << 20;
    for mode in [ReencryptMode::Encrypt, ReencryptMode::Decrypt] {
        let l = in_place_layout(mode);
        let end = 28 * MIB;
        let live = |p: Progress, data_end: Option<u64>| -> Vec<(u64, bool)> {
            encrypt_segments(&l, ReencryptDirection::Forward, p, data_end)
                .unwrap()
                .into_iter()
                .filter(|s| !s.is_backup())
                .map(|s| (s.offset().unwrap(), s.has_flag("in-reencryption")))
                .collect()
        };
        let last = Progress {
            hot_start: end - MIB / 2,
            hot_len: MIB / 2,
        };
        let mid = Progress {
            hot_start: 4 * MIB,
            hot_len: MIB / 2,
        };
        assert_eq!(
            live(last, Some(end)),
            vec![(0, false), (end - MIB / 2, true)],
            "{mode:?}: last hotzone with the end known"
        );
        assert_eq!(
            live(last, None),
            vec![(0, false), (end - MIB / 2, true), (end, false)],
            "{mode:?}: last hotzone, end unknown (dynamic trailing segment)"
        );
        assert_eq!(
            live(mid, Some(end)),
            vec![(0, false), (4 * MIB, true), (4 * MIB + MIB / 2, false)],
            "{mode:?}: a middle hotzone keeps its trailing segment"
        );
    }
}
