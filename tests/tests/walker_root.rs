//! The walker on real loop devices (the O_DIRECT path): an ext4 filesystem with
//! files is encrypted in place in each mode, killed with SIGKILL at a few
//! journal commits, resumed, then decrypted in place by luksify; the filesystem
//! bytes must come back exactly and fsck clean. Needs root (loop devices).

use luksify_tests::{
    assert_refused_in_one_line, cryptsetup_detached, fill_pattern, kill_after_commits,
    kill_at_fdatasync, luks_dump, luksify_bin, no_header_write_lock, require_root, require_tool,
    run, run_ok, signal_after_commits, sparse_file, wait_within, Cgroup, Frozen, LoopDev,
};
use std::path::Path;
use std::process::{Command, Stdio};

const MIB: u64 = 1 << 20;
const FAST: [&str; 4] = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];
const SMALL: [&str; 4] = ["--chunk-mib", "1", "--hotzone-kib", "1024"];

/// A 96 MiB image holding a 64 MiB ext4 filesystem with files (the last 32 MiB
/// free for the data-shift layout).
fn ext4_image(dir: &Path, seed: u64) -> Vec<u8> {
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    for i in 0..12u64 {
        let mut v = vec![0u8; (i as usize + 1) * 300 * 1024];
        fill_pattern(&mut v, seed + i);
        std::fs::write(tree.join(format!("sub/f{i}.bin")), &v).unwrap();
    }
    std::fs::write(
        tree.join("sub/deeper/notes.txt"),
        b"in-place encryption test\n",
    )
    .unwrap();
    let img = dir.join("img");
    let mut bg = vec![0u8; (96 * MIB) as usize];
    fill_pattern(&mut bg, seed ^ 0xabcdef);
    std::fs::write(&img, &bg).unwrap();
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&tree)
            .arg(&img)
            .arg("64M"),
    );
    std::fs::read(&img).unwrap()
}

/// A scratch directory holding `key` (the test passphrase) and `img` (`mib` MiB of the
/// pattern from `seed`), and the image's bytes.
fn scratch(mib: u64, seed: u64) -> (tempfile::TempDir, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key"), b"root test passphrase").unwrap();
    let mut orig = vec![0u8; (mib * MIB) as usize];
    fill_pattern(&mut orig, seed);
    std::fs::write(dir.path().join("img"), &orig).unwrap();
    (dir, orig)
}

/// `luksify decrypt IMG` with detached header `hdr`; `img` must then hold `orig`.
fn decrypt_detached_and_check(img: &Path, key: &str, hdr: &str, orig: &[u8], what: &str) {
    run_ok(
        luksify_detached("decrypt", &img.display().to_string(), key, hdr)
            .args(SMALL)
            .stdout(Stdio::null()),
    );
    assert!(
        std::fs::read(img).unwrap() == orig,
        "{what}: plaintext differs"
    );
}

/// A tmpfs of `size` mounted at DIR/small, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        let mnt = dir.join("small");
        std::fs::create_dir(&mnt).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "luksify-test"])
                .arg(&mnt),
        );
        Tmpfs(mnt)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

/// `luksify ACTION DEV --key-file KEY --header HDR`.
fn luksify_detached(action: &str, dev: &str, key: &str, hdr: &str) -> Command {
    let mut c = Command::new(luksify_bin());
    c.args([action, dev, "--key-file", key, "--header", hdr]);
    c
}

fn one_mode(mode: &str, kill_at: &[u64]) {
    require_root();
    require_tool("mkfs.ext4");
    require_tool("e2fsck");
    let mut mid_run = 0;
    for (k, &at) in kill_at.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let orig = ext4_image(dir.path(), 7 + k as u64);
        std::fs::write(dir.path().join("key"), b"root test passphrase").unwrap();
        let key = dir.path().join("key").display().to_string();
        let hdr = dir.path().join("hdr");
        let hdr_s = hdr.display().to_string();
        let lo = LoopDev::attach(&dir.path().join("img"));
        let dev = lo.path.display().to_string();
        let encrypt = || {
            let mut c = Command::new(luksify_bin());
            c.args(["encrypt", &dev, "--key-file", &key]);
            if mode == "datashift" {
                c.args(["--reduce-device-size", "32M"]);
            } else {
                c.args(["--header", &hdr_s, "--resilience", mode]);
            }
            c.args(FAST).args(SMALL);
            c
        };
        let watch = if mode == "datashift" {
            lo.path.clone()
        } else {
            hdr.clone()
        };
        kill_after_commits(&mut encrypt(), &watch, 0, at, 0);
        let dump = run(Command::new(luksify_bin()).arg("dump").arg(&watch));
        if String::from_utf8_lossy(&dump.stdout).contains("online-reencrypt") {
            mid_run += 1;
        }
        let hdr_args: Vec<&str> = if mode == "datashift" {
            vec![]
        } else {
            vec!["--header", &hdr_s]
        };
        let st = run(Command::new(luksify_bin())
            .args(["resume", &dev, "--key-file", &key])
            .args(&hdr_args));
        let err = String::from_utf8_lossy(&st.stderr).to_string();
        if !st.status.success() && err.contains("run the same `luksify encrypt") {
            // Killed while the very first header was being written (the watcher saw its
            // seqid before the rest landed). With a detached header nothing may have
            // been written to the data; either way the same command finishes the job.
            if mode != "datashift" {
                let now = std::fs::read(dir.path().join("img")).unwrap();
                assert!(
                    now == orig,
                    "{mode} kill at commit {at}: data written before the first header was complete"
                );
            }
            run_ok(&mut encrypt());
        } else {
            assert!(
                st.status.success() || err.contains("no encryption in progress"),
                "{mode} kill at commit {at}: resume: {err}"
            );
        }
        // Encrypted for real: the first file's bytes are nowhere in the clear.
        let enc_img = std::fs::read(dir.path().join("img")).unwrap();
        assert!(
            enc_img[..MIB as usize] != orig[..MIB as usize],
            "{mode}: not encrypted"
        );
        // Decrypt in place on the same loop device; the header moves out for datashift.
        let dhdr = if mode == "datashift" {
            dir.path().join("moved-hdr")
        } else {
            hdr.clone()
        };
        let mut dec = Command::new(luksify_bin());
        dec.args(["decrypt", &dev, "--key-file", &key, "--header"])
            .arg(&dhdr);
        if mode != "datashift" {
            dec.args(["--resilience", mode]);
        }
        run_ok(dec.args(SMALL));
        drop(lo);
        let now = std::fs::read(dir.path().join("img")).unwrap();
        let fs = (64 * MIB) as usize;
        assert!(
            now[..fs] == orig[..fs],
            "{mode} kill at commit {at}: filesystem bytes differ"
        );
        run_ok(
            Command::new("e2fsck")
                .args(["-f", "-n"])
                .arg(dir.path().join("img")),
        );
    }
    assert!(mid_run >= 1, "{mode}: no kill landed mid-run");
}

#[test]
#[ignore = "needs root and loop devices"]
fn root_walker_loop_ext4_datashift_kill_resume_decrypt() {
    one_mode("datashift", &[1, 3, 6]);
}

#[test]
#[ignore = "needs root and loop devices"]
fn root_walker_loop_ext4_checksum_kill_resume_decrypt() {
    one_mode("checksum", &[1, 20, 60]);
}

#[test]
#[ignore = "needs root and loop devices"]
fn root_walker_loop_ext4_journal_kill_resume_decrypt() {
    one_mode("journal", &[1, 30, 90]);
}

/// `none` keeps no copy: a killed run is not resumable (by design, as
/// cryptsetup), so this one checks a cancel (SIGINT: exit code 5 at a safe point)
/// + resume, then decryption back to the original filesystem bytes.
#[test]
#[ignore = "needs root and loop devices"]
fn root_walker_loop_ext4_none_interrupt_resume_decrypt() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let orig = ext4_image(dir.path(), 99);
    std::fs::write(dir.path().join("key"), b"root test passphrase").unwrap();
    let key = dir.path().join("key").display().to_string();
    let hdr = dir.path().join("hdr").display().to_string();
    let lo = LoopDev::attach(&dir.path().join("img"));
    let dev = lo.path.display().to_string();
    // Ask for a clean stop once the header exists. A 96 MiB run in 1 MiB hotzones
    // may still finish first on a starved machine: up to 3 tries, each from the start.
    let decrypt_none =
        || run_ok(luksify_detached("decrypt", &dev, &key, &hdr).args(["--resilience", "none"]));
    let mut stopped = false;
    for _ in 0..3 {
        let mut enc = luksify_detached("encrypt", &dev, &key, &hdr);
        enc.args(["--resilience", "none"])
            .args(FAST)
            .args(SMALL)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let (st, _) = signal_after_commits(&mut enc, Path::new(&hdr), 0, 1, 0, libc::SIGINT);
        if st.code() == Some(5) {
            stopped = true;
            break;
        }
        assert!(st.success(), "none: encrypt ended with {st} after SIGINT");
        // Finished before the signal: back to plaintext and try again.
        decrypt_none();
        std::fs::remove_file(&hdr).unwrap();
    }
    assert!(
        stopped,
        "none: the run finished before SIGINT in each of 3 tries"
    );
    run_ok(&mut luksify_detached("resume", &dev, &key, &hdr));
    decrypt_none();
    drop(lo);
    let now = std::fs::read(dir.path().join("img")).unwrap();
    let fs = (64 * MIB) as usize;
    assert!(now[..fs] == orig[..fs], "none: filesystem bytes differ");
}

/// The checksum block is the data device's write unit, as cryptsetup chooses it: on a
/// loop device with 512-byte sectors, luksify's checksum run writes `Hash data: 512`,
/// the value cryptsetup's own run on the same kind of device has (a power cut may tear
/// a write at 512 bytes there, and a block's digest must tell old bytes from new). With
/// `losetup --sector-size 4096` both use 4096. Runs of either tool killed mid-walk on
/// such a device are finished by the other, and decrypt to the original bytes. (Before,
/// luksify wrote 4096-byte blocks everywhere and refused cryptsetup's 512-byte ones.)
#[test]
#[ignore = "needs root and loop devices"]
fn root_walker_checksum_blocks_follow_the_devices_sector_size_as_cryptsetups() {
    require_root();
    require_tool("cryptsetup");
    require_tool("strace");
    for sector in ["512", "4096"] {
        let hash_data = format!("Hash data:  {sector} [bytes]");
        for luksify_first in [true, false] {
            let what = format!(
                "sector {sector}, started by {}",
                if luksify_first {
                    "luksify"
                } else {
                    "cryptsetup"
                }
            );
            let dir = tempfile::tempdir().unwrap();
            let mut orig = vec![0u8; (24 * MIB) as usize];
            fill_pattern(&mut orig, 5 + luksify_first as u64);
            let img = dir.path().join("img");
            std::fs::write(&img, &orig).unwrap();
            std::fs::write(dir.path().join("key"), b"root test passphrase").unwrap();
            let key = dir.path().join("key").display().to_string();
            let hdr = dir.path().join("hdr").display().to_string();
            let lo = LoopDev::attach_with(&img, &["--sector-size", sector]);
            let dev = lo.path.display().to_string();
            let cs_resume = || {
                run_ok(&mut cryptsetup_detached(&["repair"], &hdr, &key, &dev));
                run_ok(&mut cryptsetup_detached(
                    &["reencrypt", "--resume-only"],
                    &hdr,
                    &key,
                    &dev,
                ));
            };
            let lk_resume = || run_ok(&mut luksify_detached("resume", &dev, &key, &hdr));
            if luksify_first {
                let mut c = luksify_detached("encrypt", &dev, &key, &hdr);
                c.args(["--resilience", "checksum"]).args(FAST).args(SMALL);
                kill_at_fdatasync(&c, 12);
            } else {
                let mut c = Command::new("cryptsetup");
                c.args([
                    "reencrypt",
                    "--encrypt",
                    "-q",
                    "--force-offline-reencrypt",
                    "--header",
                    &hdr,
                    "--key-file",
                    &key,
                    "--resilience",
                    "checksum",
                    "--hotzone-size",
                    "1M",
                ])
                .args(FAST)
                .arg(&dev);
                kill_at_fdatasync(&c, 12);
            }
            let dump = luks_dump(Path::new(&hdr));
            assert!(
                dump.contains("online-reencrypt"),
                "{what}: not killed mid-walk:\n{dump}"
            );
            assert!(
                dump.contains(&hash_data),
                "{what}: want '{hash_data}':\n{dump}"
            );
            if luksify_first {
                cs_resume();
            } else {
                lk_resume();
            }
            run_ok(&mut cryptsetup_detached(
                &["reencrypt", "--decrypt"],
                &hdr,
                &key,
                &dev,
            ));
            drop(lo);
            assert!(
                std::fs::read(&img).unwrap() == orig,
                "{what}: plaintext differs"
            );
        }
    }
}

/// Out of space for a detached header: the header file is reserved at its full size
/// before anything is written, so a header directory on a full filesystem (an 8 MiB
/// tmpfs here) is refused in one line, with the image untouched and no header file left.
/// The reservation is the header's real size: with `--luks2-keyslots-size 1048576`
/// (a 1 MiB + 32 KiB header) the same place has room, and the run finishes.
#[test]
#[ignore = "needs root (mounts a tmpfs)"]
fn root_walker_refuses_a_header_place_without_room_before_writing() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let small = Tmpfs::mount(dir.path(), "8M");
    let mnt = small.0.clone();
    let mut orig = vec![0u8; (16 * MIB) as usize];
    fill_pattern(&mut orig, 3);
    let img = dir.path().join("img");
    std::fs::write(&img, &orig).unwrap();
    std::fs::write(dir.path().join("key"), b"root test passphrase").unwrap();
    let hdr = mnt.join("hdr");
    let encrypt = |extra: &[&str]| {
        let mut c = Command::new(luksify_bin());
        c.arg("encrypt")
            .arg(&img)
            .arg("--key-file")
            .arg(dir.path().join("key"))
            .arg("--header")
            .arg(&hdr)
            .args(extra)
            .args(FAST);
        c
    };
    let out = run(&mut encrypt(&[]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.lines().count() == 1
            && err.contains("cannot reserve 16777216 bytes for header file")
            && err.contains("No space left on device"),
        "{}: {err}",
        out.status
    );
    assert!(std::fs::read(&img).unwrap() == orig, "image changed");
    assert!(!hdr.exists(), "header file left behind");
    run_ok(&mut encrypt(&["--luks2-keyslots-size", "1048576"]));
    assert_eq!(std::fs::metadata(&hdr).unwrap().len(), MIB + 32 * 1024);
    assert!(std::fs::read(&img).unwrap() != orig, "not encrypted");
    run_ok(
        Command::new(luksify_bin())
            .arg("decrypt")
            .arg(&img)
            .arg("--key-file")
            .arg(dir.path().join("key"))
            .arg("--header")
            .arg(&hdr),
    );
    assert!(std::fs::read(&img).unwrap() == orig, "plaintext differs");
    // The same for the file `decrypt` moves a header in front to: a full filesystem is
    // refused in one line, with nothing written and no file left; with room it runs.
    let img2 = dir.path().join("img2");
    std::fs::write(&img2, &orig).unwrap();
    run_ok(
        Command::new(luksify_bin())
            .arg("encrypt")
            .arg(&img2)
            .arg("--key-file")
            .arg(dir.path().join("key"))
            .args(["--reduce-device-size", "4M"])
            .args(FAST),
    );
    let encrypted = std::fs::read(&img2).unwrap();
    let filler = mnt.join("filler");
    let _ = std::fs::write(&filler, vec![1u8; (8 * MIB) as usize]);
    let hdr2 = mnt.join("hdr2");
    let decrypt = || {
        run(Command::new(luksify_bin())
            .arg("decrypt")
            .arg(&img2)
            .arg("--key-file")
            .arg(dir.path().join("key"))
            .arg("--header")
            .arg(&hdr2))
    };
    let out = decrypt();
    luksify_tests::assert_refused_in_one_line(
        &out,
        "no space left for the header file",
        "decrypt's header onto a full filesystem",
    );
    assert!(std::fs::read(&img2).unwrap() == encrypted, "image changed");
    assert!(!hdr2.exists(), "header file left behind");
    std::fs::remove_file(&filler).unwrap();
    let out = decrypt();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The last 4 MiB were given up for the header's room.
    let plain = std::fs::read(&img2).unwrap();
    assert!(
        plain[..(12 * MIB) as usize] == orig[..(12 * MIB) as usize],
        "plaintext differs"
    );
}

/// `encrypt --header /dev/loopN`: a header block device is used in place, never created,
/// reserved or removed. Until 2026-12-02 luksify tried to `posix_fallocate` it, failed,
/// and then removed the path it was given: the loop device's /dev node was gone.
/// - A 4 MiB device gets a keyslots area that fits it (4 MiB less both metadata copies),
///   as `cryptsetup reencrypt --encrypt --header` gives its own; the run finishes and
///   cryptsetup decrypts the data back to the original.
/// - A device too small for the header asked for, and one holding an ext4 filesystem,
///   are refused in one line; the node stays and neither device is written.
/// - `decrypt --header /dev/loopN` of a volume with its header in front refuses a device
///   holding a filesystem the same way.
#[test]
#[ignore = "needs root and loop devices"]
fn root_walker_encrypt_uses_a_header_block_device_in_place() {
    require_root();
    require_tool("cryptsetup");
    require_tool("mkfs.ext4");
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, b"header device\n").unwrap();
    let k = key.display().to_string();
    let mut areas = vec![];
    let mut orig = vec![0u8; (24 * MIB) as usize];
    fill_pattern(&mut orig, 77);
    for tool in ["luksify", "cryptsetup"] {
        let img = dir.path().join(format!("data-{tool}"));
        std::fs::write(&img, &orig).unwrap();
        let hdr_img = dir.path().join(format!("hdr-{tool}"));
        std::fs::write(&hdr_img, vec![0u8; (4 * MIB) as usize]).unwrap();
        let hdr = LoopDev::attach(&hdr_img);
        let h = hdr.path.display().to_string();
        let i = img.display().to_string();
        if tool == "luksify" {
            let out = run(Command::new(luksify_bin())
                .args(["encrypt", &i, "--key-file", &k, "--header", &h])
                .args(FAST));
            assert!(
                hdr.path.exists(),
                "luksify removed the header device node {h}"
            );
            assert!(
                out.status.success(),
                "encrypt with a 4 MiB header device: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            run_ok(
                Command::new("cryptsetup")
                    .args([
                        "reencrypt",
                        "--encrypt",
                        "-q",
                        "--key-file",
                        &k,
                        "--header",
                        &h,
                    ])
                    .args(FAST)
                    .arg(&i),
            );
        }
        let dump = luks_dump(&hdr.path);
        areas.push(
            dump.lines()
                .find(|l| l.starts_with("Keyslots area:"))
                .unwrap_or_else(|| panic!("{tool}: no keyslots area in\n{dump}"))
                .to_string(),
        );
        run_ok(&mut cryptsetup_detached(
            &["reencrypt", "--decrypt"],
            &h,
            &k,
            &i,
        ));
        assert!(
            std::fs::read(&img).unwrap() == orig,
            "{tool}: data not back after cryptsetup's decryption"
        );
    }
    assert_eq!(
        areas[0], areas[1],
        "keyslots area: luksify (left), cryptsetup (right)"
    );
    assert_eq!(areas[0], "Keyslots area: \t4161536 [bytes]");

    // Refusals: a 1 MiB device for a header of 1 MiB + 32 KiB, and an ext4 device.
    let img = dir.path().join("data-refused");
    std::fs::write(&img, &orig).unwrap();
    let i = img.display().to_string();
    let small = dir.path().join("hdr-small");
    std::fs::write(&small, vec![0u8; MIB as usize]).unwrap();
    let fs = dir.path().join("hdr-ext4");
    std::fs::write(&fs, vec![0u8; (8 * MIB) as usize]).unwrap();
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&fs));
    for (hdr_img, extra, needle) in [
        (
            &small,
            &["--luks2-keyslots-size", "1M"][..],
            "holds 1048576 bytes, the header needs 1081344",
        ),
        (&fs, &[][..], "holds a ext2/3/4 signature"),
    ] {
        let before = std::fs::read(hdr_img).unwrap();
        let hdr = LoopDev::attach(hdr_img);
        let h = hdr.path.display().to_string();
        let out = run(Command::new(luksify_bin())
            .args(["encrypt", &i, "--key-file", &k, "--header", &h])
            .args(FAST)
            .args(extra));
        assert!(
            hdr.path.exists(),
            "luksify removed the header device node {h}"
        );
        luksify_tests::assert_refused_in_one_line(&out, needle, &format!("header device {h}"));
        drop(hdr);
        assert!(
            std::fs::read(hdr_img).unwrap() == before,
            "{h}: header device written"
        );
        assert!(std::fs::read(&img).unwrap() == orig, "{h}: data written");
    }

    // `decrypt` moving a header in front out to a block device: refused while that
    // device holds a filesystem, before anything is written.
    let front = dir.path().join("data-front");
    std::fs::write(&front, &orig).unwrap();
    let f = front.display().to_string();
    run_ok(
        Command::new(luksify_bin())
            .args([
                "encrypt",
                &f,
                "--key-file",
                &k,
                "--reduce-device-size",
                "8M",
            ])
            .args(FAST),
    );
    let encrypted = std::fs::read(&front).unwrap();
    let before = std::fs::read(&fs).unwrap();
    let hdr = LoopDev::attach(&fs);
    let h = hdr.path.display().to_string();
    let out =
        run(Command::new(luksify_bin()).args(["decrypt", &f, "--key-file", &k, "--header", &h]));
    assert!(
        hdr.path.exists(),
        "luksify removed the header device node {h}"
    );
    luksify_tests::assert_refused_in_one_line(&out, "holds a ext2/3/4 signature", "decrypt");
    drop(hdr);
    assert!(
        std::fs::read(&fs).unwrap() == before,
        "decrypt wrote to {h}"
    );
    assert!(
        std::fs::read(&front).unwrap() == encrypted,
        "refused decrypt wrote to the data"
    );
}

/// One run per volume, whichever path reaches its bytes and whichever tool runs it.
/// Until 2026-12-02 a luksify run on an image file and `luksify resume /dev/loopN` of a
/// loop device over the same file walked side by side (the file's flock and the loop
/// device's O_EXCL are different objects): the plaintext came back corrupted. And an
/// image file whose loop device was mounted was encrypted under the mounted filesystem.
/// Each refusal below is one line, with the image and header unchanged:
/// - a file run (frozen mid-run): `luksify resume` through a loop device over the file;
///   `cryptsetup repair` and `cryptsetup reencrypt --resume-only` through it (luksify
///   holds cryptsetup's reencryption lock on the volume);
/// - a loop-device run: `luksify resume` of the file, and through a second loop device;
/// - a cryptsetup run through one loop device: `luksify resume` through another, and of
///   the file (both meet cryptsetup's reencryption lock);
/// - `luksify encrypt` of an image file whose loop device is mounted; once unmounted
///   (the loop device still attached) it runs.
///
/// Every frozen run then finishes and the plaintext comes back exactly.
#[test]
#[ignore = "needs root (loop devices)"]
fn root_walker_one_run_per_volume_through_files_loop_devices_and_cryptsetup() {
    require_root();
    require_tool("cryptsetup");
    require_tool("mkfs.ext4");
    let (dir, orig) = scratch(64, 41);
    let p = |n: &str| dir.path().join(n);
    let s = |n: &str| p(n).display().to_string();
    let key = s("key");
    let (img, hdr) = (s("img"), s("hdr"));
    let refused = |args: &[&str], needle: &str, what: &str| {
        let (i0, h0) = (
            std::fs::read(p("img")).unwrap(),
            std::fs::read(p("hdr")).ok(),
        );
        let out = run(Command::new(luksify_bin()).args(args));
        assert_refused_in_one_line(&out, needle, what);
        assert!(
            std::fs::read(p("img")).unwrap() == i0,
            "{what}: image changed"
        );
        assert!(std::fs::read(p("hdr")).ok() == h0, "{what}: header changed");
    };
    let quiet = |c: &mut Command| {
        c.stdout(Stdio::null()).stderr(Stdio::null());
    };
    let decrypt_and_check = |what: &str| {
        decrypt_detached_and_check(&p("img"), &key, &hdr, &orig, what);
        std::fs::remove_file(p("hdr")).unwrap();
    };

    // 1. A run on the file.
    std::fs::write(p("img"), &orig).unwrap();
    let mut enc = luksify_detached("encrypt", &img, &key, &hdr);
    enc.args(FAST).args(SMALL);
    quiet(&mut enc);
    let first = Frozen::after_seqid(&mut enc, &p("hdr"), 3);
    // Between two commits: one holds the header file's flock, which readers wait for.
    first.step_until(|| no_header_write_lock(&p("hdr")));
    let lo = LoopDev::attach(&p("img"));
    let dev = lo.path.display().to_string();
    refused(
        &["resume", &dev, "--key-file", &key, "--header", &hdr],
        "a loop device over",
        "resume through a loop device during a file run",
    );
    for args in [&["repair"][..], &["reencrypt", "--resume-only"][..]] {
        let (i0, h0) = (
            std::fs::read(p("img")).unwrap(),
            std::fs::read(p("hdr")).unwrap(),
        );
        let out = run(&mut cryptsetup_detached(args, &hdr, &key, &dev));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && (err.contains("Reencryption in-progress")
                    || err.contains("already running")
                    // `--resume-only` reads a hotzone in progress as a crash before it
                    // looks at the lock; `repair` (above) is what meets the lock.
                    || (args[0] == "reencrypt" && err.contains("Run repair first"))),
            "cryptsetup {args:?} during a luksify run: {}: {err}",
            out.status
        );
        assert!(
            std::fs::read(p("img")).unwrap() == i0,
            "cryptsetup {args:?}: image changed"
        );
        assert!(
            std::fs::read(p("hdr")).unwrap() == h0,
            "cryptsetup {args:?}: header changed"
        );
    }
    // A copy of the image and its header (the same volume UUID) waits for the run too,
    // and is told that a copy counts.
    std::fs::copy(p("img"), p("img2")).unwrap();
    std::fs::copy(p("hdr"), p("hdr2")).unwrap();
    let h2 = std::fs::read(p("hdr2")).unwrap();
    let out = run(&mut luksify_detached(
        "resume",
        &s("img2"),
        &key,
        &s("hdr2"),
    ));
    assert_refused_in_one_line(
        &out,
        "another process is walking this volume, or a copy of it (same UUID",
        "resume of a copy",
    );
    assert!(
        std::fs::read(p("hdr2")).unwrap() == h2,
        "the copy's header changed"
    );
    assert!(first.thaw().success(), "the file run, continued");
    drop(lo);
    run_ok(&mut luksify_detached(
        "resume",
        &s("img2"),
        &key,
        &s("hdr2"),
    ));
    decrypt_detached_and_check(&p("img2"), &key, &s("hdr2"), &orig, "the copy");
    decrypt_and_check("file run");

    // 2. A run on a loop device.
    let (lo, lo2) = (LoopDev::attach(&p("img")), LoopDev::attach(&p("img")));
    let (dev, dev2) = (
        lo.path.display().to_string(),
        lo2.path.display().to_string(),
    );
    let mut enc = luksify_detached("encrypt", &dev, &key, &hdr);
    enc.args(FAST).args(SMALL);
    quiet(&mut enc);
    let first = Frozen::after_seqid(&mut enc, &p("hdr"), 3);
    // Between two commits: one holds the header file's flock, which readers wait for.
    first.step_until(|| no_header_write_lock(&p("hdr")));
    refused(
        &["resume", &img, "--key-file", &key, "--header", &hdr],
        "locked by another luksify run on the same bytes",
        "resume of the file during a loop-device run",
    );
    refused(
        &["resume", &dev2, "--key-file", &key, "--header", &hdr],
        "a loop device over",
        "resume through a second loop device",
    );
    assert!(first.thaw().success(), "the loop-device run, continued");
    drop((lo, lo2));
    decrypt_and_check("loop-device run");

    // 3. A cryptsetup run through a loop device.
    let (lo, lo2) = (LoopDev::attach(&p("img")), LoopDev::attach(&p("img")));
    let (dev, dev2) = (
        lo.path.display().to_string(),
        lo2.path.display().to_string(),
    );
    let mut cs = cryptsetup_detached(&["reencrypt", "--encrypt"], &hdr, &key, &dev);
    cs.args(FAST).args(["--hotzone-size", "1M"]);
    quiet(&mut cs);
    let first = Frozen::after_seqid(&mut cs, &p("hdr"), 4);
    // Past cryptsetup's set-up (several header writes, no lock yet), into its walk: it
    // holds its reencryption lock, and no header write is under way.
    first.step_until(|| {
        let h = std::fs::read(p("hdr")).unwrap();
        let uuid = String::from_utf8_lossy(&h[168..208])
            .trim_end_matches('\0')
            .to_string();
        let lock = format!("/run/cryptsetup/LN_LUKS2-reencryption-{uuid}");
        let held = std::fs::File::open(&lock).is_ok_and(|f| {
            // SAFETY: flock on a descriptor we own; a lock we get goes when `f` closes
            // (the child is stopped meanwhile, so it cannot be refused it).
            unsafe {
                libc::flock(
                    std::os::fd::AsRawFd::as_raw_fd(&f),
                    libc::LOCK_EX | libc::LOCK_NB,
                ) != 0
            }
        });
        held && no_header_write_lock(&p("hdr"))
    });
    refused(
        &["resume", &dev2, "--key-file", &key, "--header", &hdr],
        "another process is walking this volume",
        "resume through a second loop device during a cryptsetup run",
    );
    refused(
        &["resume", &img, "--key-file", &key, "--header", &hdr],
        "another process is walking this volume",
        "resume of the file during a cryptsetup run",
    );
    assert!(first.thaw().success(), "the cryptsetup run, continued");
    drop((lo, lo2));
    decrypt_and_check("cryptsetup run");

    // 4. A mounted loop device over the file.
    let tree = p("tree");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(tree.join("f"), &orig[..(3 * MIB) as usize]).unwrap();
    std::fs::write(p("img"), vec![0u8; (64 * MIB) as usize]).unwrap();
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&tree)
            .arg(p("img"))
            .arg("32M"),
    );
    let lo = LoopDev::attach(&p("img"));
    let dev = lo.path.display().to_string();
    let mnt = p("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run_ok(Command::new("mount").arg(&lo.path).arg(&mnt));
    let shift = [
        "encrypt",
        &img,
        "--key-file",
        &key,
        "--reduce-device-size",
        "32M",
    ];
    refused(
        &shift,
        &format!("attached to {dev}, which is in use"),
        "encrypt of a file mounted through a loop device",
    );
    run_ok(Command::new("umount").arg(&mnt));
    let plain = std::fs::read(p("img")).unwrap();
    run_ok(
        Command::new(luksify_bin())
            .args(shift)
            .args(FAST)
            .stdout(Stdio::null()),
    );
    drop(lo);
    run_ok(
        Command::new(luksify_bin())
            .args(["decrypt", &img, "--key-file", &key, "--header", &hdr])
            .stdout(Stdio::null()),
    );
    let back = std::fs::read(p("img")).unwrap();
    let kept = (32 * MIB) as usize;
    assert!(back[..kept] == plain[..kept], "filesystem bytes differ");
}

/// A detached header on a block device carries cryptsetup's metadata lock for that
/// device, `/run/cryptsetup/L_<major>:<minor>`, while luksify writes a header there:
/// cryptsetup takes it to read the header (and to rewrite a stale copy), so it waits
/// instead of reading a pair halfway through a commit. The run is frozen while it holds
/// the lock: `cryptsetup luksDump` of the header device waits (killed by `timeout`);
/// once the run finishes, it answers, and the volume decrypts to the original.
#[test]
#[ignore = "needs root (loop devices)"]
fn root_walker_header_device_carries_cryptsetups_metadata_lock() {
    use std::os::unix::fs::MetadataExt;
    require_root();
    require_tool("cryptsetup");
    require_tool("timeout");
    let (dir, orig) = scratch(64, 43);
    let p = |n: &str| dir.path().join(n);
    std::fs::File::create(p("hdrdev"))
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    let hlo = LoopDev::attach(&p("hdrdev"));
    let (img, key, hdev) = (
        p("img").display().to_string(),
        p("key").display().to_string(),
        hlo.path.display().to_string(),
    );
    let rdev = std::fs::metadata(&hlo.path).unwrap().rdev();
    let lock = format!(
        "/run/cryptsetup/L_{}:{}",
        libc::major(rdev),
        libc::minor(rdev)
    );
    let held_exclusively = || {
        std::fs::File::open(&lock).is_ok_and(|f| {
            // SAFETY: flock on a descriptor we own; a lock we get goes when `f` closes
            // (the child is stopped meanwhile, so it cannot be refused it).
            unsafe {
                libc::flock(
                    std::os::fd::AsRawFd::as_raw_fd(&f),
                    libc::LOCK_SH | libc::LOCK_NB,
                ) != 0
            }
        })
    };
    let mut enc = luksify_detached("encrypt", &img, &key, &hdev);
    enc.args(FAST)
        .args(SMALL)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let first = Frozen::after_seqid(&mut enc, &hlo.path, 3);
    first.step_until(held_exclusively);
    let out = run(Command::new("timeout").args(["3", "cryptsetup", "luksDump", &hdev]));
    assert_eq!(
        out.status.code(),
        Some(124),
        "cryptsetup luksDump did not wait for the header write: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(first.thaw().success(), "the run, continued");
    assert!(luks_dump(&hlo.path).contains("LUKS header information"));
    decrypt_detached_and_check(&p("img"), &key, &hdev, &orig, "header device");
}

/// Data that cannot be written is refused in one line that names the cause, before
/// anything is written and without leaving a header file behind, in both layouts: a
/// loop device attached read-only (`losetup -r`: opening it for writing succeeds, every
/// write fails, so it used to fail mid-run after writing the detached header), an image
/// file with the immutable attribute, and an image on a read-only mount. A decrypt of a
/// volume on a read-only loop device is refused the same way.
#[test]
#[ignore = "needs root (loop devices, chattr, mount)"]
fn root_walker_refuses_read_only_data_before_writing() {
    require_root();
    require_tool("chattr");
    let (dir, orig) = scratch(48, 47);
    let p = |n: &str| dir.path().join(n);
    let s = |n: &str| p(n).display().to_string();
    let key = s("key");
    let refused = |dev: &str, img: &Path, needle: &str, what: &str| {
        for place in [
            &["--header", &s("hdr")][..],
            &["--reduce-device-size", "8M"][..],
        ] {
            let out = run(Command::new(luksify_bin())
                .args(["encrypt", dev, "--key-file", &key])
                .args(place)
                .args(FAST));
            let what = format!("{what} {place:?}");
            assert_refused_in_one_line(&out, needle, &what);
            assert!(std::fs::read(img).unwrap() == orig, "{what}: data changed");
            assert!(!p("hdr").exists(), "{what}: a header file was left");
        }
    };

    let lo = LoopDev::attach_with(&p("img"), &["-r"]);
    let dev = lo.path.display().to_string();
    refused(&dev, &p("img"), "is a read-only block device", "losetup -r");
    drop(lo);

    run_ok(Command::new("chattr").arg("+i").arg(p("img")));
    let img = s("img");
    refused(&img, &p("img"), "cannot be opened for writing", "chattr +i");
    run_ok(Command::new("chattr").arg("-i").arg(p("img")));

    std::fs::create_dir(p("ro")).unwrap();
    run_ok(
        Command::new("mount")
            .args(["--bind", "-o", "ro"])
            .arg(dir.path())
            .arg(p("ro")),
    );
    let ro_img = p("ro").join("img");
    let r = std::panic::catch_unwind(|| {
        refused(
            &ro_img.display().to_string(),
            &ro_img,
            "is on a read-only filesystem",
            "read-only mount",
        )
    });
    let _ = Command::new("umount").arg(p("ro")).status();
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }

    // A volume on a read-only loop device: its decryption is refused too.
    run_ok(
        luksify_detached("encrypt", &img, &key, &s("hdr"))
            .args(FAST)
            .stdout(Stdio::null()),
    );
    let (enc, hdr0) = (
        std::fs::read(p("img")).unwrap(),
        std::fs::read(p("hdr")).unwrap(),
    );
    let lo = LoopDev::attach_with(&p("img"), &["-r"]);
    let dev = lo.path.display().to_string();
    let out = run(&mut luksify_detached("decrypt", &dev, &key, &s("hdr")));
    assert_refused_in_one_line(&out, "is a read-only block device", "decrypt on losetup -r");
    drop(lo);
    assert!(
        std::fs::read(p("img")).unwrap() == enc,
        "decrypt: data changed"
    );
    assert!(
        std::fs::read(p("hdr")).unwrap() == hdr0,
        "decrypt: header changed"
    );
    decrypt_detached_and_check(&p("img"), &key, &s("hdr"), &orig, "read-only data");

    // The header commands on a LUKS volume on a read-only loop device are refused the
    // same way, before writing (they used to fail on the write: "Operation not
    // permitted").
    sparse_file(&p("fmt"), 32 << 20);
    run_ok(
        Command::new(luksify_bin())
            .args(["format", &s("fmt"), "--key-file", &key])
            .args(FAST),
    );
    std::fs::write(p("key2"), b"second passphrase").unwrap();
    let fmt0 = std::fs::read(p("fmt")).unwrap();
    let lo = LoopDev::attach_with(&p("fmt"), &["-r"]);
    let dev = lo.path.display().to_string();
    let key2 = s("key2");
    for args in [
        vec!["add-key", &dev, "--key-file", &key, "--new-key-file", &key2],
        vec![
            "change-key",
            &dev,
            "--key-file",
            &key,
            "--new-key-file",
            &key2,
        ],
        vec!["remove-key", &dev, "--key-file", &key, "--batch-mode"],
        vec!["format", &dev, "--key-file", &key, "--batch-mode"],
    ] {
        let mut cmd = Command::new(luksify_bin());
        cmd.args(&args);
        if args[0] != "remove-key" {
            cmd.args(FAST);
        }
        let out = run(&mut cmd);
        assert_refused_in_one_line(&out, "is a read-only block device", args[0]);
    }
    drop(lo);
    assert!(
        std::fs::read(p("fmt")).unwrap() == fmt0,
        "header commands wrote"
    );
}

/// `encrypt --header` naming a loop device over the image being encrypted, or the image
/// behind the loop device being encrypted, is refused in one line before anything is
/// written. It used to advise wiping the "header device" (`wipefs -a`): the data.
#[test]
#[ignore = "needs root (loop devices)"]
fn root_walker_header_on_a_loop_device_over_the_data_is_refused() {
    require_root();
    let (dir, orig) = scratch(16, 53);
    let p = |n: &str| dir.path().join(n);
    let lo = LoopDev::attach(&p("img"));
    let (img, dev, key) = (
        p("img").display().to_string(),
        lo.path.display().to_string(),
        p("key").display().to_string(),
    );
    for (data, hdr) in [(&img, &dev), (&dev, &img)] {
        let out = run(luksify_detached("encrypt", data, &key, hdr).args(FAST));
        assert_refused_in_one_line(&out, "is the data itself", &format!("{data} {hdr}"));
        assert!(
            std::fs::read(p("img")).unwrap() == orig,
            "{data} {hdr}: data changed"
        );
    }
}

/// How many `call`s (`fdatasync`: luksify's flushes; `fsync`: cryptsetup's) a whole run
/// of `cmd` makes.
fn syncs_of_a_whole_run(cmd: &Command, call: &str, log: &Path) -> u64 {
    let mut c = Command::new("strace");
    c.args(["-f", "-qq", "-e", &format!("trace={call}"), "-o"])
        .arg(log)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    run_ok(&mut c);
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter(|l| l.contains(&format!("{call}(")))
        .count() as u64
}

/// A device that is not whole 4096-byte blocks: a partition of an odd number of 512-byte
/// sectors (fdisk's last partition, which ends at the disk's last usable sector, often
/// is one), here a loop device of 24 MiB + 1.5 KiB. cryptsetup encrypts such devices in
/// 512-byte sectors; luksify refused them ("not a non-zero multiple of 4096 bytes").
/// Now, against cryptsetup on the same kind of device:
/// - luksify's checksum run there keeps 512-byte checksums (`Hash data: 512`, so
///   cryptsetup's recovery, which checks only whole checksum blocks, covers every byte);
///   killed mid-walk and at each of its last syncs (the partial block in flight), it is
///   finished by cryptsetup (`repair`, `reencrypt --resume-only`) or by luksify, and
///   cryptsetup decrypts it to the original bytes;
/// - cryptsetup's checksum and journal runs killed mid-walk and in their last hotzone
///   are finished by luksify, and `luksify decrypt` gives back the original bytes;
/// - luksify's journal, none and datashift runs decrypt to the original, and the
///   ciphertext of each layout equals cryptsetup's given the same volume key.
#[test]
#[ignore = "needs root and loop devices"]
fn root_walker_device_of_partial_4096_byte_blocks_works_both_ways_with_cryptsetup() {
    require_root();
    require_tool("cryptsetup");
    require_tool("strace");
    const SIZE: usize = (24 << 20) + 1536;
    /// A loop device over a fresh image of `SIZE` bytes of a pattern, and a key file.
    struct Odd {
        dir: tempfile::TempDir,
        orig: Vec<u8>,
        lo: Option<LoopDev>,
        dev: String,
        key: String,
        hdr: String,
    }
    impl Odd {
        fn new(seed: u64) -> Odd {
            let dir = tempfile::tempdir().unwrap();
            let mut orig = vec![0u8; SIZE];
            fill_pattern(&mut orig, seed);
            std::fs::write(dir.path().join("img"), &orig).unwrap();
            std::fs::write(dir.path().join("key"), b"root test passphrase").unwrap();
            std::fs::write(dir.path().join("vk"), VK).unwrap();
            let lo = LoopDev::attach(&dir.path().join("img"));
            let s = |n: &str| dir.path().join(n).display().to_string();
            Odd {
                dev: lo.path.display().to_string(),
                key: s("key"),
                hdr: s("hdr"),
                lo: Some(lo),
                orig,
                dir,
            }
        }
        /// `cryptsetup reencrypt --encrypt` into the detached header, 1 MiB hotzones.
        fn cs_encrypt(&self, res: &str) -> Command {
            let mut c = Command::new("cryptsetup");
            c.args(["reencrypt", "--encrypt", "-q", "--force-offline-reencrypt"])
                .args(["--header", &self.hdr, "--key-file", &self.key])
                .args(["--resilience", res, "--hotzone-size", "1M"])
                .args(["--sector-size", "512"])
                .args(FAST)
                .arg(&self.dev);
            c
        }
        /// `luksify encrypt` into the detached header, 1 MiB hotzones.
        fn lk_encrypt(&self, res: &str) -> Command {
            let mut c = luksify_detached("encrypt", &self.dev, &self.key, &self.hdr);
            c.args(["--resilience", res]).args(FAST).args(SMALL);
            c
        }
        fn mid_run(&self) -> bool {
            luks_dump(Path::new(&self.hdr)).contains("online-reencrypt")
        }
        /// The image's bytes, once its loop device is detached.
        fn detach_and_read(&mut self) -> Vec<u8> {
            self.lo.take();
            std::fs::read(self.dir.path().join("img")).unwrap()
        }
    }
    const VK: [u8; 64] = {
        let mut v = [0u8; 64];
        let mut i = 0;
        while i < 64 {
            v[i] = (i as u8).wrapping_mul(29) ^ 0x3c;
            i += 1;
        }
        v
    };

    // luksify's checksum run, killed and finished by either tool.
    let total = {
        let o = Odd::new(1);
        let n = syncs_of_a_whole_run(
            &o.lk_encrypt("checksum"),
            "fdatasync",
            &o.dir.path().join("log"),
        );
        assert!(n > 12, "only {n} syncs in a whole run");
        n
    };
    let mut mid_run = 0;
    // (The last three syncs come after the walk: the finished header marked "wipe
    // pending", the wipe of the resilience areas, and the final header.)
    for (k, at) in [8, total - 6, total - 5, total - 4].into_iter().enumerate() {
        let mut o = Odd::new(10 + k as u64);
        let (dev, key, hdr) = (o.dev.clone(), o.key.clone(), o.hdr.clone());
        let what = format!("luksify checksum run killed at sync {at} of {total}");
        kill_at_fdatasync(&o.lk_encrypt("checksum"), at);
        if o.mid_run() {
            mid_run += 1;
            let dump = luks_dump(Path::new(&hdr));
            assert!(
                dump.contains("Hash data:  512 [bytes]"),
                "{what}: want 512-byte checksums:\n{dump}"
            );
            if k % 2 == 0 {
                run_ok(&mut cryptsetup_detached(&["repair"], &hdr, &key, &dev));
                // Recovering a last hotzone may leave nothing to resume.
                if o.mid_run() {
                    run_ok(&mut cryptsetup_detached(
                        &["reencrypt", "--resume-only"],
                        &hdr,
                        &key,
                        &dev,
                    ));
                }
            } else {
                run_ok(&mut luksify_detached("resume", &dev, &key, &hdr));
            }
        }
        run_ok(&mut cryptsetup_detached(
            &["reencrypt", "--decrypt"],
            &hdr,
            &key,
            &dev,
        ));
        assert!(o.detach_and_read() == o.orig, "{what}: plaintext differs");
    }
    assert!(
        mid_run >= 3,
        "only {mid_run} of luksify's kills landed mid-walk"
    );

    // cryptsetup's runs, killed and finished by luksify.
    for res in ["checksum", "journal"] {
        let total = {
            let o = Odd::new(2);
            syncs_of_a_whole_run(&o.cs_encrypt(res), "fsync", &o.dir.path().join("log"))
        };
        let mut resumed = 0;
        for (k, at) in [8, total - 3, total - 2].into_iter().enumerate() {
            let mut o = Odd::new(20 + k as u64);
            let what = format!("cryptsetup {res} run killed at sync {at} of {total}");
            run(&mut luksify_tests::strace_inject(
                &format!("inject=fsync:signal=SIGKILL:when={at}"),
                &o.cs_encrypt(res),
            ));
            if o.mid_run() {
                resumed += 1;
                run_ok(&mut luksify_detached("resume", &o.dev, &o.key, &o.hdr));
            }
            let mut dec = luksify_detached("decrypt", &o.dev, &o.key, &o.hdr);
            run_ok(dec.args(SMALL).stdout(Stdio::null()));
            assert!(o.detach_and_read() == o.orig, "{what}: plaintext differs");
        }
        assert!(
            resumed >= 2,
            "{res}: only {resumed} of cryptsetup's kills landed mid-walk"
        );
    }

    // luksify's other layouts, and ciphertext equal to cryptsetup's.
    for res in ["checksum", "journal", "none", "datashift"] {
        let mut ours = Odd::new(30);
        let mut theirs = Odd::new(30);
        for (o, by_luksify) in [(&ours, true), (&theirs, false)] {
            let mut c = if by_luksify {
                let mut c = Command::new(luksify_bin());
                c.args(["encrypt", &o.dev, "--key-file", &o.key])
                    .args(FAST)
                    .args(SMALL);
                c
            } else {
                let mut c = Command::new("cryptsetup");
                c.args(["reencrypt", "--encrypt", "-q", "--force-offline-reencrypt"])
                    .args(["--key-file", &o.key, "--key-size", "512"])
                    .args(["--sector-size", "512"])
                    .args(FAST)
                    .arg(&o.dev);
                c
            };
            c.arg("--volume-key-file").arg(o.dir.path().join("vk"));
            if res == "datashift" {
                c.args(["--reduce-device-size", "4M"]);
            } else {
                c.args(["--header", &o.hdr, "--resilience", res]);
            }
            run_ok(&mut c);
        }
        let (data_at, data_len) = if res == "datashift" {
            (2 << 20, SIZE - (4 << 20))
        } else {
            (0, SIZE)
        };
        let theirs_now = theirs.detach_and_read();
        let ours_now = ours.detach_and_read();
        assert!(
            ours_now.len() == SIZE && theirs_now.len() == SIZE,
            "{res}: the device changed size"
        );
        let data = data_at..data_at + data_len;
        assert!(
            ours_now[data.clone()] == theirs_now[data],
            "{res}: ciphertext differs from cryptsetup's"
        );
        // And luksify decrypts its own volume back.
        let lo = LoopDev::attach(&ours.dir.path().join("img"));
        let dhdr = if res == "datashift" {
            ours.dir.path().join("moved-hdr").display().to_string()
        } else {
            ours.hdr.clone()
        };
        let mut dec = luksify_detached("decrypt", &lo.path.display().to_string(), &ours.key, &dhdr);
        if res != "datashift" {
            dec.args(["--resilience", res]);
        }
        run_ok(dec.args(SMALL).stdout(Stdio::null()));
        drop(lo);
        let now = std::fs::read(ours.dir.path().join("img")).unwrap();
        assert!(
            now[..data_len] == ours.orig[..data_len],
            "{res}: luksify decrypt did not give back the original"
        );
    }

    // The same file under 4096-byte logical sectors: the kernel counts a partial last
    // sector no read or write can reach. Refused before anything is written (the walk
    // used to fail half way with "read data: Input/output error").
    let mut o = Odd::new(40);
    o.lo.take();
    let img = o.dir.path().join("img");
    let lo = LoopDev::attach_with(&img, &["--sector-size", "4096"]);
    let dev = lo.path.display().to_string();
    let out = run(luksify_detached("encrypt", &dev, &o.key, &o.hdr).args(FAST));
    assert_refused_in_one_line(
        &out,
        "not a whole number of its 4096-byte logical sectors",
        "4096-byte sectors",
    );
    drop(lo);
    assert!(
        std::fs::read(&img).unwrap() == o.orig,
        "4096-byte sectors: data touched"
    );
    assert!(
        !Path::new(&o.hdr).exists(),
        "4096-byte sectors: header file left"
    );
}

/// A `none` encryption of a sparse image on a filesystem that fills up mid-run (another
/// file takes the room after the run began): the write that meets the full disk is cut
/// short (the first part of its chunk written, the rest not) and fails. The chunk is read
/// back as that clean prefix, so the header names nothing as "may be part rewritten" and,
/// once there is room, `resume` finishes (a trial found such a run unrecoverable by
/// either tool, its failed 4 MiB half done). While the disk is still full, `resume` is
/// refused before it writes: the image's holes need more room than there is.
/// A 64 MiB tmpfs holds the 48 MiB image's 24 MiB of data; the rest is a hole.
#[test]
#[ignore = "needs root (mounts a tmpfs)"]
fn root_walker_a_none_run_on_a_full_filesystem_resumes_once_there_is_room() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let small = Tmpfs::mount(dir.path(), "64M");
    let mnt = small.0.clone();
    let img = mnt.join("img");
    let mut orig = vec![0u8; (48 * MIB) as usize];
    fill_pattern(&mut orig[..(24 * MIB) as usize], 81);
    std::fs::write(&img, &orig[..(24 * MIB) as usize]).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(48 * MIB)
        .unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, b"full disk").unwrap();
    let (k, h, i) = (
        key.display().to_string(),
        dir.path().join("hdr").display().to_string(),
        img.display().to_string(),
    );
    let err = dir.path().join("err");
    let mut enc = luksify_detached("encrypt", &i, &k, &h);
    enc.args(FAST)
        .args(["--resilience", "none", "--chunk-mib", "4"])
        .stderr(std::fs::File::create(&err).unwrap());
    // Frozen once its journal is live, the room is taken (all but 8 MiB), then it runs on.
    let frozen = Frozen::after_seqid(&mut enc, Path::new(&h), 3);
    let free = {
        let out = run_ok(Command::new("df").args(["-B1", "--output=avail"]).arg(&mnt));
        let out = String::from_utf8(out.stdout).unwrap();
        out.lines().nth(1).unwrap().trim().parse::<u64>().unwrap()
    };
    run_ok(
        Command::new("fallocate")
            .args(["-l", &(free - 8 * MIB).to_string()])
            .arg(mnt.join("filler")),
    );
    let st = frozen.thaw();
    let said = std::fs::read_to_string(&err).unwrap();
    assert!(!st.success(), "finished on a full disk: {said}");
    assert!(
        said.lines().count() == 1
            && said.contains("No space left on device")
            && said.contains("the run is still recorded in its header"),
        "{said}"
    );
    let still_full = run(&mut luksify_detached("resume", &i, &k, &h));
    assert_refused_in_one_line(
        &still_full,
        "are holes (a sparse file)",
        "resume while full",
    );
    assert!(
        !String::from_utf8_lossy(&still_full.stderr).contains("part rewritten"),
        "{still_full:?}"
    );
    run_ok(
        Command::new("mount")
            .args(["-o", "remount,size=128M"])
            .arg(&mnt),
    );
    run_ok(&mut luksify_detached("resume", &i, &k, &h));
    decrypt_detached_and_check(&img, &k, &h, &orig, "none on a full disk");
}

/// A sparse image whose filesystem has less room than its holes, directly or under a
/// loop device, is refused before anything is written, in both layouts, naming the file,
/// the room to make and the `fallocate` that reserves it (nothing written, no header
/// file). A loop device's write that finds its filesystem full can lose part of its data
/// without an error (the kernel completes a short write as done): a trial's walk over
/// such a loop device recorded a chunk as done whose tail never landed, and `resume` then
/// called the volume encrypted over garbage. `check` lists it as a blocker. Followed
/// literally (room made, `fallocate -l`), the advice lets the run through, and it
/// decrypts to the original.
#[test]
#[ignore = "needs root (mounts a tmpfs, loop devices)"]
fn root_walker_refuses_a_sparse_file_its_filesystem_cannot_fill() {
    require_root();
    require_tool("fallocate");
    let dir = tempfile::tempdir().unwrap();
    let small = Tmpfs::mount(dir.path(), "40M");
    let mnt = small.0.clone();
    let img = mnt.join("img");
    // 96 MiB, 16 of them data at the start (the rest a hole): 80 MiB of holes, and the
    // tmpfs has 24 MiB free.
    let mut orig = vec![0u8; (96 * MIB) as usize];
    fill_pattern(&mut orig[..(16 * MIB) as usize], 93);
    std::fs::write(&img, &orig[..(16 * MIB) as usize]).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(96 * MIB)
        .unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, b"sparse file").unwrap();
    let hdr = dir.path().join("hdr");
    let (k, h, i) = (
        key.display().to_string(),
        hdr.display().to_string(),
        img.display().to_string(),
    );
    let lo = LoopDev::attach(&img);
    let l = lo.path.display().to_string();
    let mut fix = None;
    for (dev, what) in [(&l, "loop device"), (&i, "image file")] {
        for place in [&["--header", &h][..], &["--reduce-device-size", "8M"][..]] {
            let what = format!("{what} {place:?}");
            let out = run(Command::new(luksify_bin())
                .args(["encrypt", dev, "--key-file", &k])
                .args(place)
                .args(FAST));
            assert_refused_in_one_line(&out, "are holes (a sparse file)", &what);
            let err = String::from_utf8_lossy(&out.stderr).to_string();
            assert!(err.contains(&format!("80 MiB of {i}")), "{what}: {err}");
            assert!(err.contains("has 24 MiB free"), "{what}: {err}");
            assert_eq!(
                err.contains("the file under this loop device"),
                dev == &l,
                "{what}: {err}"
            );
            assert!(std::fs::read(&img).unwrap() == orig, "{what}: data changed");
            assert!(!hdr.exists(), "{what}: a header file was left");
            let make = err
                .split("make ")
                .nth(1)
                .and_then(|r| r.split(" MiB more room").next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{what}: no room to make in {err}"));
            let alloc = err
                .split("`fallocate ")
                .nth(1)
                .and_then(|r| r.split('`').next())
                .unwrap_or_else(|| panic!("{what}: no fallocate in {err}"))
                .to_string();
            fix = Some((make, alloc));
        }
    }
    // `check` says it too, as a blocker, before anything goes offline.
    let state = dir.path().join("state");
    let out = run(Command::new(luksify_bin())
        .args(["check", &l, "--json"])
        .env("LUKSIFY_STATE_DIR", &state));
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(said.contains("no_room_for_holes"), "{said}");
    // Followed literally: that much more room, then the fallocate.
    let (make, alloc) = fix.unwrap();
    assert_eq!(make, 81 - 24, "80 MiB of holes and a margin for metadata");
    run_ok(
        Command::new("mount")
            .args(["-o", &format!("remount,size={}M", 40 + make)])
            .arg(&mnt),
    );
    run_ok(
        Command::new("sh")
            .arg("-c")
            .arg(format!("fallocate {alloc}")),
    );
    assert!(
        std::fs::read(&img).unwrap() == orig,
        "fallocate changed the data"
    );
    run_ok(luksify_detached("encrypt", &l, &k, &h).args(FAST));
    run_ok(&mut luksify_detached("decrypt", &l, &k, &h));
    drop(lo);
    assert!(
        std::fs::read(&img).unwrap() == orig,
        "not the original after decrypt"
    );
}

/// The room check counts what the loop device reaches, not the whole file: a loop device
/// over the written first part of a larger sparse file (`--sizelimit`) was refused, with
/// a `fallocate` of the whole file that could never fit (a trial). One reaching into the
/// holes (`--offset`) is refused with the `fallocate -o -l` of its range, which followed
/// literally lets the run through. A loop device whose file was deleted cannot show its
/// allocation: refused when its filesystem could not take it whole. `format` of such a
/// device checks the header's range before it writes (it said "Input/output error").
#[test]
#[ignore = "needs root (mounts a tmpfs, loop devices)"]
fn root_walker_the_room_check_counts_what_the_loop_device_reaches() {
    require_root();
    require_tool("fallocate");
    let dir = tempfile::tempdir().unwrap();
    let small = Tmpfs::mount(dir.path(), "64M");
    let mnt = small.0.clone();
    let img = mnt.join("img");
    // 32 MiB written, then 224 MiB of holes: 256 MiB on a 64 MiB tmpfs.
    let mut head = vec![0u8; (32 * MIB) as usize];
    fill_pattern(&mut head, 95);
    std::fs::write(&img, &head).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(256 * MIB)
        .unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, b"loop range").unwrap();
    let k = key.display().to_string();
    let h = |n: &str| dir.path().join(n).display().to_string();
    // The written part only: no holes there, the run goes through and back.
    let lo = LoopDev::attach_with(&img, &["--sizelimit", &(32 * MIB).to_string()]);
    let l = lo.path.display().to_string();
    run_ok(luksify_detached("encrypt", &l, &k, &h("hdr1")).args(FAST));
    run_ok(&mut luksify_detached("decrypt", &l, &k, &h("hdr1")));
    drop(lo);
    assert!(
        std::fs::read(&img).unwrap()[..head.len()] == head[..],
        "not the original"
    );
    // 48 MiB from 32 MiB on: holes the tmpfs cannot take (32 MiB free). The room it
    // says to make lets it through (no `fallocate` of a part of a file: blocks it
    // reserves there show nowhere a next run could count them).
    let lo = LoopDev::attach_with(
        &img,
        &[
            "--offset",
            &(32 * MIB).to_string(),
            "--sizelimit",
            &(48 * MIB).to_string(),
        ],
    );
    let l = lo.path.display().to_string();
    let out = run(luksify_detached("encrypt", &l, &k, &h("hdr2")).args(FAST));
    assert_refused_in_one_line(&out, "48 MiB of", "a range of holes");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("fallocate"), "{err}");
    let make: u64 = err
        .split("make ")
        .nth(1)
        .and_then(|r| r.split(" MiB more room").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no room to make in {err}"));
    // `format` of it (header in front) checks the header's 16 MiB first: with 8 MiB
    // left, refused, nothing written.
    let filler = mnt.join("filler");
    run_ok(
        Command::new("fallocate")
            .args(["-l", &(24 * MIB).to_string()])
            .arg(&filler),
    );
    let out = run(Command::new(luksify_bin())
        .args(["format", &l, "--key-file", &k, "-q"])
        .args(FAST));
    assert_refused_in_one_line(&out, "16 MiB of", "format of a sparse loop device");
    std::fs::remove_file(&filler).unwrap();
    assert!(
        !luksify_tests::has_luks_header(Path::new(&l)),
        "format wrote a header"
    );
    run_ok(
        Command::new("mount")
            .args(["-o", &format!("remount,size={}M", 64 + make)])
            .arg(&mnt),
    );
    run_ok(luksify_detached("encrypt", &l, &k, &h("hdr2")).args(FAST));
    run_ok(&mut luksify_detached("decrypt", &l, &k, &h("hdr2")));
    drop(lo);
    // The backing file deleted under a loop device: refused when its filesystem could
    // not take the whole range (here 224 MiB against what the tmpfs has left).
    let gone = mnt.join("gone");
    sparse_file(&gone, 224 * MIB);
    let lo = LoopDev::attach(&gone);
    std::fs::remove_file(&gone).unwrap();
    let l = lo.path.display().to_string();
    let out = run(luksify_detached("encrypt", &l, &k, &h("hdr3")).args(FAST));
    assert_refused_in_one_line(&out, "was deleted", "deleted backing file");
    assert!(!Path::new(&h("hdr3")).exists(), "a header file was left");
    drop(lo);
    // Its directory removed with it (`rm -r`): the filesystem is the nearest directory's
    // still there (the check was skipped, and the run met the full disk; trial V12).
    let sub = mnt.join("sub");
    std::fs::create_dir(&sub).unwrap();
    let gone = sub.join("gone");
    sparse_file(&gone, 224 * MIB);
    let lo = LoopDev::attach(&gone);
    std::fs::remove_dir_all(&sub).unwrap();
    let l = lo.path.display().to_string();
    let out = run(luksify_detached("encrypt", &l, &k, &h("hdr4")).args(FAST));
    assert_refused_in_one_line(&out, "was deleted", "deleted backing file and directory");
    assert!(!Path::new(&h("hdr4")).exists(), "a header file was left");
}

/// What stands in the way of a detached header's storage is said of the header, with its
/// fix, and nothing is written (trial E2: each was said of the healthy data device, with
/// no cause):
/// - an immutable header file ("Operation not permitted"): `chattr -i`;
/// - a header device made read-only between runs: refused up front, `blockdev --setrw`;
/// - one made read-only mid-run: the failed header write names the header and the fix;
/// - a header loop device over a sparse file without room for it: refused up front (its
///   failing writes sent the user to ddrescue the data device).
///
/// Each fixed as said, `resume` finishes, and the volume decrypts to the original.
#[test]
#[ignore = "needs root (loop devices, chattr, a tmpfs)"]
fn root_walker_header_storage_problems_are_named_on_the_header() {
    require_root();
    require_tool("chattr");
    require_tool("blockdev");
    let (dir, orig) = scratch(48, 61);
    let p = |n: &str| dir.path().join(n);
    let s = |n: &str| p(n).display().to_string();
    let (key, img) = (s("key"), s("img"));
    let resume = |hdr: &str| run(&mut luksify_detached("resume", &img, &key, hdr));
    let started = |hdr: &str| {
        let mut enc = luksify_detached("encrypt", &img, &key, hdr);
        enc.args(FAST)
            .args(SMALL)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        drop(Frozen::after_seqid(&mut enc, Path::new(hdr), 3));
    };
    let unchanged = |what: &str, before: &[u8]| {
        assert!(
            std::fs::read(p("img")).unwrap() == before,
            "{what}: data changed"
        );
    };

    // An immutable header file.
    let hdr = s("hdr");
    started(&hdr);
    let mid = std::fs::read(p("img")).unwrap();
    run_ok(Command::new("chattr").arg("+i").arg(&hdr));
    let out = resume(&hdr);
    let _ = Command::new("chattr").arg("-i").arg(&hdr).status();
    assert_refused_in_one_line(&out, &format!("`chattr -i -a {hdr}`"), "immutable header");
    unchanged("immutable header", &mid);
    run_ok(&mut luksify_detached("resume", &img, &key, &hdr));
    decrypt_detached_and_check(&p("img"), &key, &hdr, &orig, "immutable header");

    // A header device made read-only between runs, then mid-run.
    std::fs::write(p("hdev"), vec![0u8; (17 * MIB) as usize]).unwrap();
    let lh = LoopDev::attach(&p("hdev"));
    let h = lh.path.display().to_string();
    // The read-only flag outlives the loop device's detach (the next one attached at
    // that number is read-only too): always cleared.
    struct SetRw(String);
    impl Drop for SetRw {
        fn drop(&mut self) {
            let _ = Command::new("blockdev").args(["--setrw", &self.0]).status();
        }
    }
    let _rw = SetRw(h.clone());
    started(&h);
    let mid = std::fs::read(p("img")).unwrap();
    run_ok(Command::new("blockdev").args(["--setro", &h]));
    let out = resume(&h);
    assert_refused_in_one_line(
        &out,
        &format!("header device {h} is a read-only block device"),
        "read-only header device",
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("`blockdev --setrw {h}`")),
        "{out:?}"
    );
    unchanged("read-only header device", &mid);
    run_ok(Command::new("blockdev").args(["--setrw", &h]));
    let mut res = luksify_detached("resume", &img, &key, &h);
    res.stderr(std::fs::File::create(p("err")).unwrap());
    let frozen = Frozen::after_seqid(
        &mut res,
        Path::new(&h),
        luksify_tests::header_seqid(Path::new(&h)) + 2,
    );
    run_ok(Command::new("blockdev").args(["--setro", &h]));
    let st = frozen.thaw();
    let said = std::fs::read_to_string(p("err")).unwrap();
    assert!(
        !st.success(),
        "finished on a read-only header device: {said}"
    );
    assert!(
        said.lines().count() == 1
            && said.contains(&format!("header {h}: "))
            && said.contains(&format!("`blockdev --setrw {h}`"))
            && said.contains("the run is still recorded in its header"),
        "{said}"
    );
    run_ok(Command::new("blockdev").args(["--setrw", &h]));
    run_ok(&mut luksify_detached("resume", &img, &key, &h));
    decrypt_detached_and_check(
        &p("img"),
        &key,
        &h,
        &orig,
        "header device read-only mid-run",
    );
    drop(lh);

    // A header loop device over a sparse file on a filesystem without room for it.
    let small = Tmpfs::mount(dir.path(), "4M");
    let sparse = small.0.join("hdev");
    sparse_file(&sparse, 32 * MIB);
    let lh = LoopDev::attach(&sparse);
    let h = lh.path.display().to_string();
    let out = run(luksify_detached("encrypt", &img, &key, &h).args(FAST));
    assert_refused_in_one_line(
        &out,
        &format!("header device {h}: 32 MiB of"),
        "sparse header device",
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("are holes (a sparse file)"),
        "{out:?}"
    );
    unchanged("sparse header device", &orig);
}

/// A loop device over a loop device over an image: a run through the top one locked only
/// the middle one's device node, so runs on the image and on the middle loop device
/// went on beside it and all finished, the data encrypted twice (a trial). The lock now
/// follows the chain down to the file: each is refused (exit 4, nothing written), and
/// the first run finishes to the original plaintext.
#[test]
#[ignore = "needs root (loop devices)"]
fn root_walker_a_run_through_stacked_loop_devices_holds_the_file_below() {
    require_root();
    let (dir, orig) = scratch(32, 43);
    let p = |n: &str| dir.path().join(n);
    let s = |n: &str| p(n).display().to_string();
    std::fs::write(p("img"), &orig).unwrap();
    let la = LoopDev::attach(&p("img"));
    let lc = LoopDev::attach(&la.path);
    let (top, middle) = (lc.path.display().to_string(), la.path.display().to_string());
    let key = s("key");
    let mut enc = luksify_detached("encrypt", &top, &key, &s("hdr"));
    enc.args(FAST)
        .args(SMALL)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let first = Frozen::after_seqid(&mut enc, &p("hdr"), 3);
    first.step_until(|| no_header_write_lock(&p("hdr")));
    for (dev, hdr, what) in [
        (s("img"), s("h2"), "the image"),
        (middle, s("h3"), "the middle loop device"),
    ] {
        let i0 = std::fs::read(p("img")).unwrap();
        let mut again = luksify_detached("encrypt", &dev, &key, &hdr);
        let out = run(again.args(FAST));
        assert_eq!(out.status.code(), Some(4), "a run on {what}: {out:?}");
        assert!(
            std::fs::read(p("img")).unwrap() == i0,
            "{what}: image changed"
        );
    }
    assert!(
        first.thaw().success(),
        "the run through the top loop device, continued"
    );
    drop(lc);
    drop(la);
    decrypt_detached_and_check(&p("img"), &key, &s("hdr"), &orig, "stacked");
}

/// A limit on threads (a cgroup's pids.max) is one line that says so, never a panic or
/// a hang: a trial's `encrypt` under pids.max 1-3 panicked (the walk's workers, rayon's
/// pool in the final wipe), and under 2 hung for good, deaf to SIGTERM (an `enable`'s
/// volume stayed unmounted meanwhile). Too few to start: refused, nothing written. Used
/// up once the run has begun (other processes joined the cgroup during the key
/// derivation): stopped with the same word, resumable, and resumed the data is intact.
#[test]
#[ignore = "needs root and loop devices"]
fn root_walker_a_limit_on_threads_is_one_line_never_a_panic_or_a_hang() {
    require_root();
    let (dir, orig) = scratch(32, 41);
    let img = dir.path().join("img");
    let (key, hdr) = (
        dir.path().join("key").display().to_string(),
        dir.path().join("hdr").display().to_string(),
    );
    let encrypt = |iterations: &str| {
        let mut c = luksify_detached("encrypt", &img.display().to_string(), &key, &hdr);
        c.args(["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", iterations])
            .args(SMALL);
        c
    };
    let patience = std::time::Duration::from_secs(120);
    let finishes = |c: &mut Command| {
        let child = c
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_within(child, patience, "the run")
    };
    let low = Cgroup::new("pids", &[("pids.max", "pids.max", "2".into())]);
    let out = finishes(&mut low.command(&encrypt("1000")));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.lines().count() == 1 && err.contains("pids.max") && err.contains("nothing was written"),
        "{err}"
    );
    assert!(
        std::fs::read(&img).unwrap() == orig,
        "the image was written"
    );
    assert!(!Path::new(&hdr).exists(), "a header file was left");
    drop(low);

    // Enough to start (main, rayon's pool, the headroom); then used up by others.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let limit = 1 + cores + (cores.min(4) + 2);
    let cg = Cgroup::new("pids", &[("pids.max", "pids.max", limit.to_string())]);
    let mut run = cg.command(&encrypt("5000000"));
    let child = run
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut others: Vec<std::process::Child> = (0..limit)
        .map(|_| Command::new("sleep").arg("120").spawn().unwrap())
        .collect();
    for o in &others {
        cg.join(o.id());
    }
    let out = wait_within(child, patience, "the run");
    for o in &mut others {
        let _ = o.kill();
        let _ = o.wait();
    }
    drop(cg);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "the run was not stopped: {err}");
    assert!(
        !err.contains("panicked")
            && err.lines().count() == 1
            && err.contains("pids.max")
            && err.contains("luksify resume"),
        "{err}"
    );
    run_ok(
        luksify_detached("resume", &img.display().to_string(), &key, &hdr)
            .args(SMALL)
            .stdout(Stdio::null()),
    );
    decrypt_detached_and_check(&img, &key, &hdr, &orig, "after the limit");
}

/// A run whose header is on a block device, killed mid-walk: the same `encrypt` again
/// said "holds a LUKS signature ... wipe it first (wipefs -a)", and a trial that did
/// lost the only key to the walked part, then encrypted it a second time. It now names
/// the interrupted run and `luksify resume`, writes nothing, and `resume` finishes it.
#[test]
#[ignore = "needs root and loop devices"]
fn root_walker_an_interrupted_run_on_a_header_device_is_sent_to_resume_not_wipefs() {
    require_root();
    let (dir, orig) = scratch(32, 43);
    let img = dir.path().join("img");
    let key = dir.path().join("key").display().to_string();
    let hdr_img = dir.path().join("hdr-dev");
    std::fs::write(&hdr_img, vec![0u8; (16 * MIB) as usize]).unwrap();
    let hdr = LoopDev::attach(&hdr_img);
    let h = hdr.path.display().to_string();
    let i = img.display().to_string();
    let encrypt = || {
        let mut c = luksify_detached("encrypt", &i, &key, &h);
        c.args(FAST).args(SMALL);
        c
    };
    kill_after_commits(&mut encrypt(), &hdr.path, 0, 8, 0);
    let (walked, header) = (
        std::fs::read(&img).unwrap(),
        std::fs::read(&hdr.path).unwrap(),
    );
    assert!(walked != orig, "nothing was walked");
    let out = run(encrypt().stdout(Stdio::null()));
    assert_refused_in_one_line(&out, "holds an interrupted", "encrypt again");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("luksify resume {i} --key-file F --header {h}"))
            && !err.contains("wipefs"),
        "{err}"
    );
    assert!(
        std::fs::read(&img).unwrap() == walked,
        "the data was written"
    );
    assert!(
        std::fs::read(&hdr.path).unwrap() == header,
        "the header was written"
    );
    run_ok(
        luksify_detached("resume", &i, &key, &h)
            .args(SMALL)
            .stdout(Stdio::null()),
    );
    decrypt_detached_and_check(&img, &key, &h, &orig, "resumed on a header device");
}
