//! LUKS1 interoperability: cryptsetup `--type luks1` and `qemu-img -f luks`
//! headers unlock with our code to the same key, and payload data we encrypt
//! decrypts identically through qemu-img (and the reverse).

use luksify_luks::io::Disk;
use luksify_luks::kdf::KdfRequest;
use luksify_luks::luks1::{FormatOptions, Luks1Header};
use luksify_tests::{fill_pattern, require_tool, run, run_ok, sparse_file};
use std::fs::OpenOptions;
use std::path::Path;
use std::process::Command;

const PASS: &str = "qemu-pass";

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn open_rw(path: &Path) -> std::fs::File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}

fn qemu_image_opts(img: &Path) -> String {
    format!("driver=luks,file.filename={},key-secret=s", p(img))
}

#[test]
fn luks1_ours_encrypts_qemu_img_decrypts() {
    require_tool("qemu-img");
    require_tool("cryptsetup");
    let d = tempfile::tempdir().unwrap();
    for key_size in [32usize, 64] {
        let img = d.path().join(format!("ours{key_size}.luks"));
        sparse_file(&img, 8 << 20);
        let f = open_rw(&img);
        let opts = FormatOptions {
            kdf: KdfRequest::fast_pbkdf2(),
            key_size,
            ..FormatOptions::default()
        };
        let (hdr, vk) = Luks1Header::format(&f, PASS.as_bytes(), &opts).unwrap();
        assert_eq!(
            hdr.payload_offset, 4096,
            "2 MiB payload alignment like cryptsetup"
        );
        let payload_len = (8 << 20) - hdr.payload_offset_bytes() as usize;
        let mut plain = vec![0u8; payload_len];
        fill_pattern(&mut plain, 0x1234 + key_size as u64);
        let mut ct = plain.clone();
        hdr.sector_cipher(&vk).unwrap().encrypt(&mut ct, 0).unwrap();
        f.write_at(hdr.payload_offset_bytes(), &ct).unwrap();
        f.flush().unwrap();
        drop(f);
        let out = d.path().join("out.raw");
        run_ok(Command::new("qemu-img").args([
            "convert",
            "--object",
            &format!("secret,id=s,data={PASS}"),
            "--image-opts",
            &qemu_image_opts(&img),
            "-O",
            "raw",
            p(&out),
        ]));
        assert!(
            std::fs::read(&out).unwrap() == plain,
            "qemu-img decrypted different bytes (key {key_size})"
        );
        // cryptsetup agrees on the key.
        let kf = d.path().join("key");
        std::fs::write(&kf, PASS).unwrap();
        run_ok(Command::new("cryptsetup").args([
            "open",
            "--test-passphrase",
            "--key-file",
            p(&kf),
            p(&img),
        ]));
        let vkf = d.path().join(format!("vk{key_size}"));
        run_ok(Command::new("cryptsetup").args([
            "luksDump",
            "-q",
            "--dump-volume-key",
            "--volume-key-file",
            p(&vkf),
            "--key-file",
            p(&kf),
            p(&img),
        ]));
        assert_eq!(std::fs::read(&vkf).unwrap(), vk.as_bytes());
    }
}

#[test]
fn luks1_qemu_img_encrypts_ours_decrypts() {
    require_tool("qemu-img");
    let d = tempfile::tempdir().unwrap();
    let plain_path = d.path().join("plain.raw");
    let mut plain = vec![0u8; 3 << 20];
    fill_pattern(&mut plain, 99);
    std::fs::write(&plain_path, &plain).unwrap();
    let img = d.path().join("q.luks");
    run_ok(Command::new("qemu-img").args([
        "convert",
        "--object",
        &format!("secret,id=s,data={PASS}"),
        "-f",
        "raw",
        "-O",
        "luks",
        "-o",
        "key-secret=s,iter-time=10",
        p(&plain_path),
        p(&img),
    ]));
    let f = open_rw(&img);
    let before = std::fs::read(&img).unwrap();
    let hdr = Luks1Header::read(&f).unwrap();
    assert_eq!(hdr.cipher_spec(), "aes-xts-plain64");
    let (vk, slot) = hdr.unlock(&f, PASS.as_bytes(), None).unwrap();
    assert_eq!(slot, 0);
    assert!(hdr.unlock(&f, b"wrong", None).is_err());
    let mut ct = vec![0u8; plain.len()];
    f.read_at(hdr.payload_offset_bytes(), &mut ct).unwrap();
    hdr.sector_cipher(&vk).unwrap().decrypt(&mut ct, 0).unwrap();
    assert!(
        ct == plain,
        "our decryption differs from what qemu-img encrypted"
    );
    assert_eq!(
        std::fs::read(&img).unwrap(),
        before,
        "reading must not write"
    );
}

#[test]
fn luks1_cryptsetup_to_ours_and_key_management_back() {
    require_tool("cryptsetup");
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("c.luks");
    sparse_file(&img, 8 << 20);
    let kf = d.path().join("key");
    std::fs::write(&kf, "cs-luks1").unwrap();
    for bits in ["256", "512"] {
        run_ok(Command::new("cryptsetup").args([
            "luksFormat",
            "-q",
            "--type",
            "luks1",
            "--key-size",
            bits,
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            p(&kf),
            p(&img),
        ]));
        let vkf = d.path().join(format!("vk{bits}"));
        run_ok(Command::new("cryptsetup").args([
            "luksDump",
            "-q",
            "--dump-volume-key",
            "--volume-key-file",
            p(&vkf),
            "--key-file",
            p(&kf),
            p(&img),
        ]));
        let f = open_rw(&img);
        let mut hdr = Luks1Header::read(&f).unwrap();
        let (vk, _) = hdr.unlock(&f, b"cs-luks1", None).unwrap();
        assert_eq!(vk.as_bytes(), &std::fs::read(&vkf).unwrap()[..]);
        let s = hdr
            .add_keyslot(&f, &vk, b"ours", &KdfRequest::fast_pbkdf2(), Some(3))
            .unwrap();
        assert_eq!(s, 3);
        drop(f);
        let k2 = d.path().join("k2");
        std::fs::write(&k2, "ours").unwrap();
        run_ok(Command::new("cryptsetup").args([
            "open",
            "--test-passphrase",
            "--key-slot",
            "3",
            "--key-file",
            p(&k2),
            p(&img),
        ]));
        let f = open_rw(&img);
        hdr.remove_keyslot(&f, 0).unwrap();
        drop(f);
        assert!(!run(Command::new("cryptsetup").args([
            "open",
            "--test-passphrase",
            "--key-file",
            p(&kf),
            p(&img)
        ]))
        .status
        .success());
    }
}

#[test]
fn luks1_qemu_img_create_variants_unlock() {
    require_tool("qemu-img");
    let d = tempfile::tempdir().unwrap();
    for (opts, key_len, hash) in [
        ("key-secret=s,iter-time=10", 64usize, "sha256"),
        ("key-secret=s,iter-time=10,cipher-alg=aes-128", 32, "sha256"),
        ("key-secret=s,iter-time=10,hash-alg=sha512", 64, "sha512"),
        ("key-secret=s,iter-time=10,hash-alg=sha1", 64, "sha1"),
    ] {
        let img = d.path().join("c.luks");
        let _ = std::fs::remove_file(&img);
        run_ok(Command::new("qemu-img").args([
            "create",
            "-q",
            "--object",
            &format!("secret,id=s,data={PASS}"),
            "-f",
            "luks",
            "-o",
            opts,
            p(&img),
            "4M",
        ]));
        let f = open_rw(&img);
        let hdr = Luks1Header::read(&f).unwrap_or_else(|e| panic!("{opts}: {e}"));
        assert_eq!(hdr.hash_spec, hash, "{opts}");
        let (vk, _) = hdr
            .unlock(&f, PASS.as_bytes(), None)
            .unwrap_or_else(|e| panic!("{opts}: {e}"));
        assert_eq!(vk.len(), key_len, "{opts}");
        // qemu-img creates zeroed payloads: our decryption must read zeros back.
        let mut first = vec![0u8; 4096];
        f.read_at(hdr.payload_offset_bytes(), &mut first).unwrap();
        hdr.sector_cipher(&vk)
            .unwrap()
            .decrypt(&mut first, 0)
            .unwrap();
        let zero = first.iter().all(|&b| b == 0);
        // qemu-img leaves the payload sparse (zero ciphertext) unless preallocated,
        // so check the reverse instead when it did not write encrypted zeros.
        if !zero {
            let mut raw = vec![0u8; 4096];
            f.read_at(hdr.payload_offset_bytes(), &mut raw).unwrap();
            assert!(
                raw.iter().all(|&b| b == 0),
                "{opts}: payload neither encrypted zeros nor sparse"
            );
        }
    }
}

/// LUKS1 volumes in AES-CBC, as cryptsetup 1.x made them (`aes-cbc-essiv:sha256`, its
/// default, and the plain/plain64 IVs, 128- and 256-bit keys): luksify's keyslot
/// commands work on them (they used to refuse: "unsupported cipher specification") and
/// cryptsetup reads what they wrote. `--dump-volume-key` gives cryptsetup's key.
#[test]
fn luks1_cbc_volumes_take_the_keyslot_commands() {
    require_tool("cryptsetup");
    let d = tempfile::tempdir().unwrap();
    let file = |n: &str, b: &[u8]| {
        let f = d.path().join(n);
        std::fs::write(&f, b).unwrap();
        f
    };
    let (k1, k2, k3) = (
        file("k1", b"first"),
        file("k2", b"second"),
        file("k3", b"third"),
    );
    let lx = |args: &[&str]| {
        let mut c = Command::new(luksify_tests::luksify_bin());
        c.args(args);
        c
    };
    for (cipher, bits) in [
        ("aes-cbc-essiv:sha256", "256"),
        ("aes-cbc-plain64", "256"),
        ("aes-cbc-plain", "128"),
    ] {
        let img = d
            .path()
            .join(format!("{}-{bits}", cipher.replace(':', "_")));
        sparse_file(&img, 8 << 20);
        run_ok(Command::new("cryptsetup").args([
            "luksFormat",
            "-q",
            "--type",
            "luks1",
            "--cipher",
            cipher,
            "--key-size",
            bits,
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            p(&k1),
            p(&img),
        ]));
        let what = format!("{cipher} {bits}");
        run_ok(&mut lx(&["test-passphrase", p(&img), "--key-file", p(&k1)]));
        let fast = ["--pbkdf-force-iterations", "1000"];
        run_ok(luksify_tests::luksify_new_key("add-key", &img, &k1, &k2).args(fast));
        run_ok(luksify_tests::luksify_new_key("change-key", &img, &k2, &k3).args(fast));
        run_ok(&mut lx(&["remove-key", p(&img), "--key-file", p(&k1)]));
        let opens = |k: &Path| luksify_tests::cryptsetup_opens(&img, k);
        assert!(
            opens(&k3),
            "{what}: cryptsetup does not open the changed keyslot"
        );
        assert!(
            !opens(&k1) && !opens(&k2),
            "{what}: a removed passphrase still opens"
        );
        let (ours, theirs) = (d.path().join("vk-ours"), d.path().join("vk-theirs"));
        let _ = std::fs::remove_file(&ours);
        let _ = std::fs::remove_file(&theirs);
        run_ok(&mut lx(&[
            "dump",
            p(&img),
            "--dump-volume-key",
            "--key-file",
            p(&k3),
            "--volume-key-file",
            p(&ours),
        ]));
        run_ok(Command::new("cryptsetup").args([
            "luksDump",
            "-q",
            "--dump-volume-key",
            "--volume-key-file",
            p(&theirs),
            "--key-file",
            p(&k3),
            p(&img),
        ]));
        assert_eq!(
            std::fs::read(&ours).unwrap(),
            std::fs::read(&theirs).unwrap(),
            "{what}"
        );
    }
}

/// As for LUKS2: a LUKS1 keyslot change whose header another command changed after it
/// was read (cryptsetup adds a key, taking the same first free slot) fails with
/// "changed on disk" and writes nothing; cryptsetup's key still opens.
#[test]
fn luks1_keyslot_changes_refuse_a_header_changed_since_it_was_read() {
    require_tool("cryptsetup");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    sparse_file(&img, 8 << 20);
    let (key, other) = (dir.path().join("key"), dir.path().join("other"));
    std::fs::write(&key, "first").unwrap();
    std::fs::write(&other, "cryptsetup's").unwrap();
    cs_luks1_format(&img, &key);
    let f = open_rw(&img);
    let mut hdr = Luks1Header::read(&f).unwrap();
    let vk = hdr.unlock(&f, b"first", None).unwrap().0;
    cs_luks1_add_key(&img, &key, &other);
    let before = std::fs::read(&img).unwrap();
    let e = hdr
        .add_keyslot(&f, &vk, b"ours", &KdfRequest::fast_pbkdf2(), None)
        .expect_err("add on a stale header");
    assert!(matches!(e, luksify_luks::Error::Changed(_)), "{e}");
    let e = hdr
        .remove_keyslot(&f, 0)
        .expect_err("remove on a stale header");
    assert!(matches!(e, luksify_luks::Error::Changed(_)), "{e}");
    assert!(std::fs::read(&img).unwrap() == before, "wrote something");
    assert!(
        luksify_tests::cryptsetup_opens(&img, &other),
        "cryptsetup's key lost"
    );
    assert!(luksify_tests::cryptsetup_opens(&img, &key));
    let mut hdr = Luks1Header::read(&f).unwrap();
    hdr.add_keyslot(&f, &vk, b"ours", &KdfRequest::fast_pbkdf2(), None)
        .unwrap();
    assert!(
        luksify_tests::cryptsetup_opens(&img, &other),
        "cryptsetup's key lost"
    );
}

/// LUKS1 with all 8 keyslots in use: change-key replaces the key in the slot itself,
/// as cryptsetup's luksChangeKey does (luksify said "no free keyslot"); the other seven
/// passphrases still open with cryptsetup, the old one no longer.
#[test]
fn luks1_change_key_with_every_slot_full_changes_it_in_place() {
    require_tool("cryptsetup");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    sparse_file(&img, 8 << 20);
    let key = |i: usize| {
        let k = dir.path().join(format!("k{i}"));
        std::fs::write(&k, format!("pass {i}")).unwrap();
        k
    };
    cs_luks1_format(&img, &key(0));
    for i in 1..8 {
        cs_luks1_add_key(&img, &key(0), &key(i));
    }
    let new = dir.path().join("new");
    std::fs::write(&new, "the new one").unwrap();
    run_ok(
        luksify_tests::luksify_new_key("change-key", &img, &key(3), &new)
            .args(["--pbkdf-force-iterations", "1000"]),
    );
    assert!(
        luksify_tests::cryptsetup_opens(&img, &new),
        "the new passphrase"
    );
    assert!(
        !luksify_tests::cryptsetup_opens(&img, &key(3)),
        "the old passphrase"
    );
    for i in [0, 1, 2, 4, 5, 6, 7] {
        assert!(
            luksify_tests::cryptsetup_opens(&img, &key(i)),
            "passphrase {i}"
        );
    }
}

/// `cryptsetup luksFormat --type luks1` of `img` (1000 iterations) with the passphrase in `key`.
fn cs_luks1_format(img: &Path, key: &Path) {
    run_ok(&mut luksify_tests::cryptsetup_format_fast(
        "luks1", img, key,
    ));
}

/// `cryptsetup luksAddKey` of the passphrase in `new` to `img`, opened with `key`.
fn cs_luks1_add_key(img: &Path, key: &Path, new: &Path) {
    run_ok(
        Command::new("cryptsetup")
            .args(["luksAddKey", "--pbkdf-force-iterations", "1000"])
            .arg("--key-file")
            .arg(key)
            .arg(img)
            .arg(new),
    );
}
