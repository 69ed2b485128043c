//! LUKS2 interoperability with the real cryptsetup binary, both ways, at the
//! library level: headers cryptsetup writes unlock with our code to the same
//! volume key, and headers we write pass `luksDump`, `open --test-passphrase`
//! and `luksDump --dump-volume-key` with the key we chose.
//! Cheap KDF parameters keep the matrix fast.

use luksify_luks::kdf::{KdfKind, KdfRequest};
use luksify_luks::luks2::{FormatOptions, Luks2Header};
use luksify_luks::VolumeKey;
use luksify_tests::{require_tool, run, run_ok, sparse_file};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Command;

const IMG_SIZE: u64 = 20 << 20;

#[derive(Clone, Copy, Debug)]
struct Case {
    argon: bool,
    sector: u32,
    key_bits: u32,
    detached: bool,
}

fn matrix() -> Vec<Case> {
    let mut v = vec![];
    for argon in [false, true] {
        for sector in [512, 4096] {
            for key_bits in [256, 512] {
                for detached in [false, true] {
                    v.push(Case {
                        argon,
                        sector,
                        key_bits,
                        detached,
                    });
                }
            }
        }
    }
    v
}

struct Vol {
    _dir: tempfile::TempDir,
    data: PathBuf,
    header: Option<PathBuf>,
    key: PathBuf,
}

impl Vol {
    fn new(detached: bool, pass: &[u8]) -> Vol {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data.img");
        sparse_file(&data, IMG_SIZE);
        let header = detached.then(|| {
            let h = dir.path().join("hdr.img");
            sparse_file(&h, 16 << 20);
            h
        });
        let key = dir.path().join("key");
        std::fs::write(&key, pass).unwrap();
        Vol {
            _dir: dir,
            data,
            header,
            key,
        }
    }
    fn meta(&self) -> &Path {
        self.header.as_deref().unwrap_or(&self.data)
    }
    fn cs(&self, args: &[&str]) -> Command {
        let mut c = Command::new("cryptsetup");
        c.args(args).arg("--key-file").arg(&self.key);
        if let Some(h) = &self.header {
            c.arg("--header").arg(h);
        }
        c.arg(&self.data);
        c
    }
    /// `cryptsetup luksFormat --type luks2` of the data with the cheap KDF and `extra`.
    fn cryptsetup_format(&self, extra: &[&str]) {
        run_ok(
            Command::new("cryptsetup")
                .args(["luksFormat", "-q", "--type", "luks2"])
                .args(extra)
                .args(kdf_args(false))
                .arg("--key-file")
                .arg(&self.key)
                .arg(&self.data),
        );
    }
    /// The volume key as cryptsetup reports it.
    fn cryptsetup_volume_key(&self) -> Vec<u8> {
        let out = self.key.with_extension("vk");
        // cryptsetup refuses to overwrite an existing volume key file.
        let _ = std::fs::remove_file(&out);
        let mut c = Command::new("cryptsetup");
        c.args(["luksDump", "-q", "--dump-volume-key", "--volume-key-file"])
            .arg(&out)
            .arg("--key-file")
            .arg(&self.key);
        if let Some(h) = &self.header {
            c.arg("--header").arg(h);
        }
        run_ok(c.arg(&self.data));
        std::fs::read(&out).unwrap()
    }
}

fn kdf_args(argon: bool) -> Vec<&'static str> {
    if argon {
        vec![
            "--pbkdf",
            "argon2id",
            "--pbkdf-force-iterations",
            "4",
            "--pbkdf-memory",
            "32",
        ]
    } else {
        vec!["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
    }
}

fn our_kdf(argon: bool) -> KdfRequest {
    if argon {
        KdfRequest {
            kind: KdfKind::Argon2id,
            ..KdfRequest::fast_argon2id()
        }
    } else {
        KdfRequest::fast_pbkdf2()
    }
}

fn open_file(p: &Path) -> std::fs::File {
    OpenOptions::new().read(true).write(true).open(p).unwrap()
}

#[test]
fn luks2_cryptsetup_to_ours_matrix() {
    require_tool("cryptsetup");
    for case in matrix() {
        let vol = Vol::new(case.detached, b"correct horse");
        let sector = case.sector.to_string();
        let bits = case.key_bits.to_string();
        let mut args = vec![
            "luksFormat",
            "-q",
            "--type",
            "luks2",
            "--sector-size",
            &sector,
            "--key-size",
            &bits,
            "--label",
            "cs-made",
        ];
        args.extend(kdf_args(case.argon));
        run_ok(&mut vol.cs(&args));
        let f = open_file(vol.meta());
        let before = std::fs::read(vol.meta()).unwrap();
        let (hdr, report) = Luks2Header::read(&f).unwrap_or_else(|e| panic!("{case:?}: {e}"));
        assert!(!report.needs_repair, "{case:?}: {report:?}");
        assert_eq!(hdr.label, "cs-made");
        let (vk, slot) = hdr
            .unlock(&f, b"correct horse", None)
            .unwrap_or_else(|e| panic!("{case:?}: {e}"));
        assert_eq!(slot, 0);
        assert_eq!(vk.as_bytes(), &vol.cryptsetup_volume_key()[..], "{case:?}");
        assert_eq!(vk.len() * 8, case.key_bits as usize);
        let seg = hdr.data_segment().unwrap();
        assert_eq!(seg.sector_size, case.sector, "{case:?}");
        assert_eq!(
            seg.offset,
            if case.detached { 0 } else { 16 << 20 },
            "{case:?}"
        );
        assert!(hdr.unlock(&f, b"wrong", None).is_err());
        assert_eq!(
            std::fs::read(vol.meta()).unwrap(),
            before,
            "reading must not write"
        );
    }
}

#[test]
fn luks2_ours_to_cryptsetup_matrix() {
    require_tool("cryptsetup");
    for case in matrix() {
        let vol = Vol::new(case.detached, b"battery staple");
        let mut key = vec![0u8; case.key_bits as usize / 8];
        getrandom::fill(&mut key).unwrap();
        let opts = FormatOptions {
            kdf: our_kdf(case.argon),
            key_size: key.len(),
            sector_size: case.sector,
            label: "ours".into(),
            detached: case.detached,
            volume_key: Some(VolumeKey::from_slice(&key)),
            ..FormatOptions::default()
        };
        let f = open_file(vol.meta());
        Luks2Header::format(&f, b"battery staple", &opts)
            .unwrap_or_else(|e| panic!("{case:?}: {e}"));
        drop(f);
        let dump = run_ok(&mut vol.cs(&["luksDump"]));
        let dump = String::from_utf8_lossy(&dump.stdout);
        assert!(
            dump.contains("Label:          \tours") || dump.contains("ours"),
            "{dump}"
        );
        assert!(
            dump.contains(&format!("sector: {} [bytes]", case.sector)),
            "{case:?}\n{dump}"
        );
        run_ok(&mut vol.cs(&["open", "--test-passphrase"]));
        assert_eq!(vol.cryptsetup_volume_key(), key, "{case:?}");
        // A wrong passphrase fails in cryptsetup too.
        std::fs::write(&vol.key, b"nope").unwrap();
        assert!(!run(&mut vol.cs(&["open", "--test-passphrase"]))
            .status
            .success());
    }
}

#[test]
fn luks2_several_keyslots_both_ways() {
    require_tool("cryptsetup");
    let vol = Vol::new(false, b"pass0");
    let mut args = vec!["luksFormat", "-q", "--type", "luks2"];
    args.extend(kdf_args(false));
    run_ok(&mut vol.cs(&args));
    let dir = vol.key.parent().unwrap().to_path_buf();
    for i in 1..=3 {
        let nk = dir.join(format!("k{i}"));
        std::fs::write(&nk, format!("pass{i}")).unwrap();
        let mut c = vol.cs(&[
            "luksAddKey",
            "-q",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
        ]);
        c.arg(&nk);
        run_ok(&mut c);
    }
    let f = open_file(&vol.data);
    let (mut hdr, _) = Luks2Header::read(&f).unwrap();
    let expect = vol.cryptsetup_volume_key();
    for i in 0..=3u32 {
        let (vk, slot) = hdr.unlock(&f, format!("pass{i}").as_bytes(), None).unwrap();
        assert_eq!((vk.as_bytes(), slot), (&expect[..], i));
    }
    // Ours adds slot 4 and removes 1; cryptsetup sees exactly that.
    let (vk, _) = hdr.unlock(&f, b"pass0", None).unwrap();
    hdr.add_keyslot(&f, &vk, b"pass4", &KdfRequest::fast_pbkdf2(), None, None)
        .unwrap();
    hdr.remove_keyslot(&f, 1).unwrap();
    hdr.change_keyslot(&f, 2, b"pass2", b"pass2-new", &KdfRequest::fast_argon2id())
        .unwrap();
    drop(f);
    for (pass, slot, ok) in [
        ("pass4", "4", true),
        ("pass1", "1", false),
        ("pass2", "2", false),
        ("pass2-new", "2", true),
        ("pass3", "3", true),
    ] {
        std::fs::write(&vol.key, pass).unwrap();
        let out = run(&mut vol.cs(&["open", "--test-passphrase", "--key-slot", slot]));
        assert_eq!(
            out.status.success(),
            ok,
            "{pass} in slot {slot}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::write(&vol.key, "pass4").unwrap();
    assert_eq!(vol.cryptsetup_volume_key(), expect);
}

#[test]
fn luks2_token_and_flags_survive_our_rewrite() {
    require_tool("cryptsetup");
    let vol = Vol::new(false, b"tok");
    let mut args = vec![
        "luksFormat",
        "-q",
        "--type",
        "luks2",
        "--label",
        "withtoken",
    ];
    args.extend(kdf_args(false));
    run_ok(&mut vol.cs(&args));
    let tok = vol.key.with_extension("json");
    std::fs::write(
        &tok,
        r#"{"type":"luksify-test","keyslots":["0"],"blob":"c29tZXRoaW5n","nested":{"n":[1,2,3]},"num":[1e3,1E-7,1.0000000000000001,12345678901234567.5,-0.0,18446744073709551615]}"#,
    )
    .unwrap();
    run_ok(
        Command::new("cryptsetup")
            .args(["token", "import", "--json-file"])
            .arg(&tok)
            .arg(&vol.data),
    );
    run_ok(
        Command::new("cryptsetup")
            .args(["config"])
            .arg(&vol.data)
            .arg("--priority")
            .arg("prefer")
            .arg("--key-slot")
            .arg("0"),
    );
    let f = open_file(&vol.data);
    let (mut hdr, _) = Luks2Header::read(&f).unwrap();
    let tokens_before = hdr.metadata.tokens.clone();
    let flags_before = hdr.metadata.config.flags.clone();
    match hdr.metadata.keyslots.get(&0) {
        Some(luksify_luks::luks2::json::Keyslot::Luks2(k)) => {
            assert_eq!(
                k.priority,
                Some(luksify_luks::luks2::json::Priority::Prefer)
            )
        }
        other => panic!("keyslot 0: {other:?}"),
    }
    assert_eq!(tokens_before.len(), 1);
    let export = || {
        let out = run_ok(
            Command::new("cryptsetup")
                .args(["token", "export", "--token-id", "0"])
                .arg(&vol.data),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text_before = export();
    let (vk, _) = hdr.unlock(&f, b"tok", None).unwrap();
    hdr.add_keyslot(&f, &vk, b"second", &KdfRequest::fast_pbkdf2(), None, None)
        .unwrap();
    drop(f);
    let out = run_ok(
        Command::new("cryptsetup")
            .args(["token", "export", "--token-id", "0"])
            .arg(&vol.data),
    );
    let exported: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(exported["type"], "luksify-test");
    assert_eq!(exported["nested"]["n"][2], 3);
    assert_eq!(exported["blob"], "c29tZXRoaW5n");
    // Numbers keep their value at every digit, as cryptsetup keeps them (a trial's
    // 1.0000000000000001 came back 1.0, 12345678901234567.5 as 1.2345678901234568e+16,
    // 1e3 as 1000.0); an exponent may be respelled (1e3 as 1e+3, 1E-7 as 1e-7).
    let spelled = |t: &str| t.replace('E', "e").replace("e+", "e");
    assert_eq!(spelled(&export()), spelled(&text_before));
    let (hdr2, _) = Luks2Header::read(&open_file(&vol.data)).unwrap();
    assert_eq!(hdr2.metadata.tokens, tokens_before);
    assert_eq!(hdr2.metadata.config.flags, flags_before);
    assert_eq!(hdr2.label, "withtoken");
    std::fs::write(&vol.key, "second").unwrap();
    run_ok(&mut vol.cs(&["open", "--test-passphrase"]));
}

#[test]
fn luks2_every_metadata_size_from_cryptsetup() {
    require_tool("cryptsetup");
    for size in [
        "16k", "32k", "64k", "128k", "256k", "512k", "1m", "2m", "4m",
    ] {
        let vol = Vol::new(false, b"m");
        let mut args = vec![
            "luksFormat",
            "-q",
            "--type",
            "luks2",
            "--luks2-metadata-size",
            size,
            "--luks2-keyslots-size",
            "1m",
            "--offset",
            "32768",
        ];
        args.extend(kdf_args(false));
        run_ok(&mut vol.cs(&args));
        let f = open_file(&vol.data);
        let (mut hdr, report) = Luks2Header::read(&f).unwrap_or_else(|e| panic!("{size}: {e}"));
        assert!(!report.needs_repair);
        let (vk, _) = hdr.unlock(&f, b"m", None).unwrap();
        assert_eq!(vk.as_bytes(), &vol.cryptsetup_volume_key()[..]);
        // Damage the primary: we still read it (from the secondary) and repair it.
        use luksify_luks::io::Disk;
        f.write_at(200, b"\x01").unwrap();
        let (_, report) = Luks2Header::read_and_repair(&f).unwrap();
        assert!(report.needs_repair, "{size}");
        hdr.label = format!("size-{size}").into();
        hdr.write(&f).unwrap();
        drop(f);
        let dump = run_ok(&mut vol.cs(&["luksDump"]));
        assert!(String::from_utf8_lossy(&dump.stdout).contains(&format!("size-{size}")));
        run_ok(&mut vol.cs(&["open", "--test-passphrase"]));
    }
}

#[test]
fn luks2_cryptsetup_reencrypt_metadata_survives_our_rewrite() {
    require_tool("cryptsetup");
    for detached in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        sparse_file(&img, 64 << 20);
        let key = dir.path().join("key");
        std::fs::write(&key, "reenc").unwrap();
        let hdr_path = dir.path().join("hdr");
        let mut c = Command::new("cryptsetup");
        c.args([
            "reencrypt",
            "-q",
            "--encrypt",
            "--init-only",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
        ])
        .arg(&key);
        if detached {
            c.arg("--header").arg(&hdr_path);
        } else {
            c.args(["--reduce-device-size", "32M"]);
        }
        run_ok(c.arg(&img));
        let meta = if detached { &hdr_path } else { &img };
        let f = open_file(meta);
        let (mut hdr, report) = Luks2Header::read(&f).unwrap();
        assert!(!report.needs_repair);
        use luksify_luks::luks2::json::{Keyslot, FLAG_BACKUP_FINAL, FLAG_BACKUP_PREVIOUS};
        assert!(hdr
            .metadata
            .keyslots
            .values()
            .any(|k| matches!(k, Keyslot::Reencrypt(_))));
        assert!(hdr
            .metadata
            .segments
            .values()
            .any(|s| s.has_flag(FLAG_BACKUP_FINAL)));
        assert!(hdr
            .metadata
            .segments
            .values()
            .any(|s| s.has_flag(FLAG_BACKUP_PREVIOUS)));
        assert_eq!(
            hdr.metadata.config.mandatory_requirements(),
            vec!["online-reencrypt-v2".to_string()]
        );
        let (vk, slot) = hdr.unlock(&f, b"reenc", None).unwrap();
        assert_eq!(slot, 0);
        // Rewrite through our model: cryptsetup must still trust the reencryption
        // metadata (its digest covers the JSON we re-serialise) and finish the job.
        let before = hdr.metadata.clone();
        hdr.label = "rewritten".into();
        hdr.write(&f).unwrap();
        drop(f);
        assert_eq!(
            Luks2Header::read(&open_file(meta)).unwrap().0.metadata,
            before
        );
        let mut c = Command::new("cryptsetup");
        c.args([
            "reencrypt",
            "-q",
            "--resume-only",
            "--force-offline-reencrypt",
            "--key-file",
        ])
        .arg(&key);
        if detached {
            c.arg("--header").arg(&hdr_path);
        }
        run_ok(c.arg(&img));
        let f = open_file(meta);
        let (hdr, _) = Luks2Header::read(&f).unwrap();
        assert_eq!(hdr.label, "rewritten");
        assert!(hdr.metadata.config.mandatory_requirements().is_empty());
        let (vk2, _) = hdr.unlock(&f, b"reenc", None).unwrap();
        assert_eq!(vk2, vk);
    }
}

/// A keyslot change writes back only the header it read: when another command (here
/// the real cryptsetup, adding a key in the window our key derivation takes) wrote the
/// header meanwhile, add, change, remove and priority changes fail with "changed on
/// disk", write nothing, and every passphrase cryptsetup added still opens. luksify used
/// to write its stale header back (and the new keyslot's area over the one cryptsetup
/// had just taken): cryptsetup's key was gone, both tools having said "Key slot 1
/// created" (found by a trial).
#[test]
fn luks2_keyslot_changes_refuse_a_header_changed_since_it_was_read() {
    require_tool("cryptsetup");
    use luksify_luks::luks2::json::Priority;
    use luksify_luks::Error;
    let vol = Vol::new(false, b"first");
    vol.cryptsetup_format(&[]);
    let other = vol.key.with_extension("other");
    let mut n = 0;
    type Op = fn(&mut Luks2Header, &std::fs::File) -> luksify_luks::Result<()>;
    let ops: [(&str, Op); 4] = [
        ("add", |h, f| {
            let (vk, _) = h.unlock(f, b"first", None)?;
            h.add_keyslot(f, &vk, b"ours", &our_kdf(false), None, None)
                .map(|_| ())
        }),
        ("change", |h, f| {
            h.change_keyslot(f, 0, b"first", b"ours", &our_kdf(false))
        }),
        ("remove", |h, f| h.remove_keyslot(f, 0)),
        ("priority", |h, f| h.set_priority(f, 0, Priority::Prefer)),
    ];
    for (what, op) in ops {
        let f = open_file(&vol.data);
        let (mut hdr, _) = Luks2Header::read(&f).unwrap();
        // Another command adds a key after we read the header.
        n += 1;
        let pass = format!("cryptsetup's {n}");
        std::fs::write(&other, &pass).unwrap();
        run_ok(
            Command::new("cryptsetup")
                .arg("luksAddKey")
                .args(kdf_args(false))
                .arg("--key-file")
                .arg(&vol.key)
                .arg(&vol.data)
                .arg(&other),
        );
        let before = std::fs::read(&vol.data).unwrap();
        let e = op(&mut hdr, &f).expect_err(what);
        assert!(matches!(e, Error::Changed(_)), "{what}: {e}");
        assert!(
            e.to_string().contains("run the command again"),
            "{what}: {e}"
        );
        assert!(
            std::fs::read(&vol.data).unwrap() == before,
            "{what}: wrote something"
        );
        assert!(
            luksify_tests::cryptsetup_opens(&vol.data, &other),
            "{what}: key lost"
        );
        assert!(
            luksify_tests::cryptsetup_opens(&vol.data, &vol.key),
            "{what}"
        );
        // Read again, the same change goes through.
        let (mut hdr, _) = Luks2Header::read(&f).unwrap();
        if what != "remove" {
            op(&mut hdr, &f).unwrap_or_else(|e| panic!("{what} on a fresh read: {e}"));
        }
        assert!(
            luksify_tests::cryptsetup_opens(&vol.data, &other),
            "{what}: key lost"
        );
        if what == "change" {
            // Keep "first" opening slot 0 for the ops that follow.
            let (mut hdr, _) = Luks2Header::read(&f).unwrap();
            hdr.change_keyslot(&f, 0, b"ours", b"first", &our_kdf(false))
                .unwrap();
        }
    }
}

/// Keyslot changes wait for a reencryption to end, as cryptsetup's do. luksify's
/// `change-key` on a volume `cryptsetup reencrypt --init-only` had marked re-keyed only
/// the old volume key's slot: no passphrase then opened both keys and cryptsetup could
/// neither open nor resume it (found by a trial). add-key said "no free keyslot".
#[test]
fn luks2_keyslot_changes_are_refused_during_a_reencryption() {
    require_tool("cryptsetup");
    let vol = Vol::new(false, b"first");
    vol.cryptsetup_format(&[]);
    run_ok(
        Command::new("cryptsetup")
            .args(["reencrypt", "--init-only", "-q"])
            .args(kdf_args(false))
            .arg("--key-file")
            .arg(&vol.key)
            .args(["-S", "0"])
            .arg(&vol.data),
    );
    let new = vol.key.with_extension("new");
    std::fs::write(&new, "second").unwrap();
    let before = std::fs::read(&vol.data).unwrap();
    for verb in ["add-key", "change-key"] {
        let out = run(&mut luksify_tests::luksify_new_key(
            verb, &vol.data, &vol.key, &new,
        ));
        luksify_tests::assert_refused_in_one_line(&out, "marked for LUKS2 reencryption", verb);
    }
    let out = run(Command::new(luksify_tests::luksify_bin())
        .args(["remove-key", "-q"])
        .arg(&vol.data)
        .arg("--key-file")
        .arg(&vol.key));
    luksify_tests::assert_refused_in_one_line(&out, "marked for LUKS2 reencryption", "remove-key");
    assert!(std::fs::read(&vol.data).unwrap() == before, "written");
    assert!(luksify_tests::cryptsetup_opens(&vol.data, &vol.key));
}

/// A LUKS2 volume cryptsetup made with `aes-cbc-essiv:sha256` (its keyslot areas use the
/// segment's cipher) takes test-passphrase, add-key and change-key, and cryptsetup opens
/// every passphrase after: luksify refused its keyslots ("unsupported cipher
/// specification") while the same cipher on LUKS1 worked (found by a trial).
#[test]
fn luks2_cbc_essiv_volumes_take_the_keyslot_commands() {
    require_tool("cryptsetup");
    let vol = Vol::new(false, b"cbc first");
    vol.cryptsetup_format(&["--cipher", "aes-cbc-essiv:sha256", "--key-size", "256"]);
    let (k2, k3) = (vol.key.with_extension("2"), vol.key.with_extension("3"));
    std::fs::write(&k2, "cbc second").unwrap();
    std::fs::write(&k3, "cbc third").unwrap();
    let fast = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];
    run_ok(
        Command::new(luksify_tests::luksify_bin())
            .arg("test-passphrase")
            .arg(&vol.data)
            .arg("--key-file")
            .arg(&vol.key),
    );
    run_ok(luksify_tests::luksify_new_key("add-key", &vol.data, &vol.key, &k2).args(fast));
    run_ok(luksify_tests::luksify_new_key("change-key", &vol.data, &k2, &k3).args(fast));
    for (k, opens) in [(&vol.key, true), (&k2, false), (&k3, true)] {
        assert_eq!(
            luksify_tests::cryptsetup_opens(&vol.data, k),
            opens,
            "{}",
            k.display()
        );
    }
    assert!(luks_dump_of(&vol.data).contains("aes-cbc-essiv:sha256"));
}

fn luks_dump_of(p: &Path) -> String {
    String::from_utf8_lossy(&run_ok(Command::new("cryptsetup").arg("luksDump").arg(p)).stdout)
        .into_owned()
}
