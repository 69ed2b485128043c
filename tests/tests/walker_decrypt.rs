//! `luksify decrypt` and the data-shift crash matrix, with cryptsetup 2.6 as the
//! oracle: encrypt-then-decrypt gives back the original bytes in every mode,
//! cryptsetup's ciphertext decrypts with luksify, and runs killed with SIGKILL
//! at pseudo-random instants resume (by luksify, and by
//! `cryptsetup repair` + `reencrypt --resume-only` where cryptsetup reads the layout).
//! SIGINT/SIGTERM/SIGHUP stop encryption and decryption at a clean, resumable point.

use luksify_tests::{
    assert_refused_in_one_line, cryptsetup_detached, fill_pattern, has_luks_header, header_seqid,
    kill_after_commits, kill_at_fdatasync, kill_at_fdatasync_of, luks_dump, luksify_bin,
    require_tool, run, run_ok, signal_after_commits, strace_inject,
};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const MIB: usize = 1 << 20;
const FAST: [&str; 4] = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];
/// Small requests and hotzones so a kill lands mid-walk, page cache so tmpfs works.
const SMALL: [&str; 5] = ["--chunk-mib", "1", "--hotzone-kib", "512", "--buffered"];
/// The data-shift layouts use --reduce-device-size 8M: header 4 MiB, last 8 MiB free.
const REDUCE: usize = 8 * MIB;

struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new(mib: usize, seed: u64) -> (Case, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let mut v = vec![0u8; mib * MIB];
        fill_pattern(&mut v, seed);
        std::fs::write(dir.path().join("img"), &v).unwrap();
        std::fs::write(dir.path().join("key"), b"decrypt test passphrase").unwrap();
        (Case { dir }, v)
    }
    fn p(&self, n: &str) -> PathBuf {
        self.dir.path().join(n)
    }
    fn s(&self, n: &str) -> String {
        self.p(n).display().to_string()
    }
    fn img(&self) -> Vec<u8> {
        std::fs::read(self.p("img")).unwrap()
    }
}

fn luksify(args: &[&str]) -> Command {
    let mut c = Command::new(luksify_bin());
    c.args(args);
    c
}

/// How the volume was encrypted.
#[derive(Clone, Copy, Debug)]
enum Layout {
    /// Detached header with this resilience.
    Detached(&'static str),
    /// Header in front, `--reduce-device-size 8M`.
    Shift,
}

impl Layout {
    fn all() -> [Layout; 4] {
        [
            Layout::Detached("checksum"),
            Layout::Detached("journal"),
            Layout::Detached("none"),
            Layout::Shift,
        ]
    }
    /// Bytes of the original that must come back (the shift layout gives up its last `REDUCE`).
    fn kept(self, len: usize) -> usize {
        match self {
            Layout::Detached(_) => len,
            Layout::Shift => len - REDUCE,
        }
    }
}

/// `luksify encrypt` of `c`'s image in layout `l`, small hotzones.
fn encrypt_cmd(c: &Case, l: Layout) -> Command {
    let (img, key, hdr) = (c.s("img"), c.s("key"), c.s("hdr"));
    let mut cmd = match l {
        Layout::Detached(res) => luksify(&[
            "encrypt",
            &img,
            "--key-file",
            &key,
            "--header",
            &hdr,
            "--resilience",
            res,
        ]),
        Layout::Shift => luksify(&[
            "encrypt",
            &img,
            "--key-file",
            &key,
            "--reduce-device-size",
            "8M",
        ]),
    };
    cmd.args(FAST).args(SMALL);
    cmd
}

fn encrypt_with_luksify(c: &Case, l: Layout) {
    run_ok(&mut encrypt_cmd(c, l));
}

fn encrypt_with_cryptsetup(c: &Case, l: Layout) {
    let (img, key, hdr) = (c.s("img"), c.s("key"), c.s("hdr"));
    let mut cmd = Command::new("cryptsetup");
    cmd.args(["reencrypt", "--encrypt", "-q", "--key-file", &key]);
    cmd.args(["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]);
    match l {
        Layout::Detached(res) => cmd.args(["--header", &hdr, "--resilience", res]),
        Layout::Shift => cmd.args(["--reduce-device-size", "8M"]),
    };
    run_ok(cmd.arg(&img));
}

/// `luksify decrypt` for layout `l`: the header file is the detached header, or
/// the new file the header moves to.
fn decrypt_cmd(c: &Case, l: Layout) -> Command {
    let (img, key, hdr) = (c.s("img"), c.s("key"), c.s("hdr"));
    let mut cmd = luksify(&["decrypt", &img, "--key-file", &key, "--header", &hdr]);
    if let Layout::Detached(res) = l {
        cmd.args(["--resilience", res]);
    }
    cmd.args(SMALL);
    cmd
}

/// `luksify resume` of `c`'s image with its header file.
fn resume_cmd(c: &Case) -> Command {
    luksify(&[
        "resume",
        &c.s("img"),
        "--key-file",
        &c.s("key"),
        "--header",
        &c.s("hdr"),
    ])
}

fn assert_plaintext_back(c: &Case, l: Layout, orig: &[u8], what: &str) {
    let now = c.img();
    let n = l.kept(orig.len());
    assert_eq!(now.len(), orig.len(), "{what}: image size changed");
    assert!(
        now[..n] == orig[..n],
        "{what}: {l:?}: plaintext differs after decrypt"
    );
}

/// After a data-shift encryption finished: no 512-byte sector of the device's original
/// first `REDUCE / 2` bytes (the part moved to the end while the header took its place)
/// is left in plaintext anywhere on the device. All-zero sectors are left out: zeros
/// are everywhere and tell nothing.
fn assert_no_plaintext_head(c: &Case, orig: &[u8], what: &str) {
    let head: std::collections::HashSet<&[u8]> = orig[..REDUCE / 2]
        .chunks(512)
        .filter(|s| s.iter().any(|b| *b != 0))
        .collect();
    assert!(
        head.len() > 1000,
        "{what}: the test image's head is mostly zeros"
    );
    let now = c.img();
    if let Some(at) = now.chunks(512).position(|s| head.contains(s)) {
        panic!(
            "{what}: a sector of the original head is still plaintext at byte {}",
            at * 512
        );
    }
}

/// The device's last `REDUCE / 2` bytes (the data offset of the shift layout): where
/// a decryption that moves the data down leaves the old end of the ciphertext.
fn old_end(img: &[u8]) -> Vec<u8> {
    img[img.len() - REDUCE / 2..].to_vec()
}

/// After a finished data-moving decryption: the device's old end (see [`old_end`];
/// `before` is that range of the encrypted image) holds none of its old 512-byte
/// sectors and no zero sector, but random bytes, as cryptsetup leaves it.
fn assert_old_end_wiped(c: &Case, before: &[u8], what: &str) {
    let now = old_end(&c.img());
    for (i, (a, b)) in now.chunks(512).zip(before.chunks(512)).enumerate() {
        assert!(
            a != b && a.iter().any(|x| *x != 0),
            "{what}: the old end is not wiped: sector {i} of its {} is {}",
            before.len() / 512,
            if a == b {
                "the old ciphertext"
            } else {
                "zeros"
            }
        );
    }
}

/// The header file after a finished decryption: valid LUKS2, no keyslot, one
/// linear segment (what cryptsetup leaves), and no key material left in it.
fn assert_header_retired(c: &Case) {
    let dump = luks_dump(&c.p("hdr"));
    assert!(dump.contains("0: linear"), "final header: {dump}");
    assert!(
        !dump.contains("luks2\n") && !dump.contains("reencrypt"),
        "keyslots left: {dump}"
    );
    let bytes = std::fs::read(c.p("hdr")).unwrap();
    // Everything past the two metadata copies (the keyslot areas) is zero.
    let left = bytes[2 * 16384..].iter().filter(|b| **b != 0).count();
    let first = bytes[2 * 16384..].iter().position(|b| *b != 0);
    assert!(
        left == 0,
        "keyslot area not wiped: {left} bytes left, the first at {:?} past the metadata",
        first
    );
}

#[test]
fn walker_decrypt_round_trip_every_mode() {
    require_tool("cryptsetup");
    for (i, l) in Layout::all().into_iter().enumerate() {
        let (c, orig) = Case::new(24, 11 + i as u64);
        encrypt_with_luksify(&c, l);
        assert!(c.img()[..MIB] != orig[..MIB], "{l:?}: not encrypted");
        let before = old_end(&c.img());
        run_ok(&mut decrypt_cmd(&c, l));
        assert_plaintext_back(&c, l, &orig, "round trip");
        assert_header_retired(&c);
        match l {
            Layout::Shift => assert_old_end_wiped(&c, &before, "round trip"),
            // In place: the device's end is data, now plaintext.
            Layout::Detached(_) => assert!(
                old_end(&c.img()) == old_end(&orig),
                "{l:?}: the end changed"
            ),
        }
        // Nothing left to resume.
        let out = run(&mut resume_cmd(&c));
        assert!(
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("no encryption in progress"),
            "{l:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn walker_decrypts_cryptsetup_ciphertext() {
    require_tool("cryptsetup");
    for (i, l) in [Layout::Detached("checksum"), Layout::Shift]
        .into_iter()
        .enumerate()
    {
        let (c, orig) = Case::new(24, 21 + i as u64);
        encrypt_with_cryptsetup(&c, l);
        let before = old_end(&c.img());
        run_ok(&mut decrypt_cmd(&c, l));
        assert_plaintext_back(&c, l, &orig, "cryptsetup ciphertext");
        if let Layout::Shift = l {
            assert_old_end_wiped(&c, &before, "cryptsetup ciphertext");
        }
    }
}

#[test]
fn walker_decrypt_refuses_without_writing() {
    require_tool("cryptsetup");
    require_tool("strace");
    let (c, _) = Case::new(24, 31);
    encrypt_with_luksify(&c, Layout::Shift);
    let before = c.img();
    // Header in front and no --header: the data would overwrite it.
    let out = run(&mut luksify(&[
        "decrypt",
        &c.s("img"),
        "--key-file",
        &c.s("key"),
    ]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--header FILE"));
    // `decrypt` of c's image with key file `key` and header file `hdr` (names in c).
    let decrypt = |key: &str, hdr: &str| {
        run(&mut luksify(&[
            "decrypt",
            &c.s("img"),
            "--key-file",
            &c.s(key),
            "--header",
            &c.s(hdr),
        ]))
    };
    // Wrong passphrase.
    std::fs::write(c.p("bad"), b"wrong").unwrap();
    let out = decrypt("bad", "hdr");
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("passphrase"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(c.img() == before, "device changed after a refusal");
    assert!(
        !c.p("hdr").exists(),
        "header file left behind after a refusal"
    );
    // --header naming a file that holds something else: the header moving out would
    // overwrite it (cryptsetup refuses it too).
    let precious = b"someone's notes, not a header\n".repeat(1000);
    std::fs::write(c.p("notes"), &precious).unwrap();
    let out = decrypt("key", "notes");
    assert_refused_in_one_line(
        &out,
        "already exists and holds other data (no LUKS header)",
        "decrypt over another file",
    );
    assert!(
        std::fs::read(c.p("notes")).unwrap() == precious,
        "the file was written"
    );
    // --header a link to the data itself.
    std::os::unix::fs::symlink(c.p("img"), c.p("img-link")).unwrap();
    let out = decrypt("key", "img-link");
    assert_refused_in_one_line(&out, "is the data itself", "decrypt --header the data");
    assert!(c.img() == before, "device changed after a refusal");
    // Plaintext device, no header anywhere.
    let (p, orig) = Case::new(8, 32);
    let out = run(&mut luksify(&[
        "decrypt",
        &p.s("img"),
        "--key-file",
        &p.s("key"),
    ]));
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("nothing to decrypt")
    );
    assert!(p.img() == orig);
    // An encryption cut mid-run: decrypt says to finish it first, and writes nothing;
    // the resume then finishes it and the decrypt returns the original.
    let (e, orig) = Case::new(24, 33);
    let cut = kill_at_fdatasync(&encrypt_cmd(&e, Layout::Detached("checksum")), 6);
    assert!(!cut.status.success(), "the encryption was not cut");
    let (img0, hdr0) = (e.img(), std::fs::read(e.p("hdr")).unwrap());
    let out = run(&mut decrypt_cmd(&e, Layout::Detached("checksum")));
    // The resume it names is of this device and header (it left out --header; a trial).
    assert_refused_in_one_line(
        &out,
        &format!(
            "an encryption run is in progress on this volume: finish it with `luksify resume {} --key-file F --header {}` first",
            e.s("img"),
            e.s("hdr")
        ),
        "decrypt of a cut encryption",
    );
    assert!(
        e.img() == img0,
        "decrypt of a cut encryption changed the data"
    );
    assert!(
        std::fs::read(e.p("hdr")).unwrap() == hdr0,
        "decrypt of a cut encryption changed the header"
    );
    run_ok(resume_cmd(&e).stdout(Stdio::null()));
    run_ok(decrypt_cmd(&e, Layout::Detached("checksum")).stdout(Stdio::null()));
    assert!(e.img() == orig, "plaintext differs");
}

/// `luksify dump` prints what `cryptsetup luksDump` prints in the middle of runs too:
/// encryptions of every layout and decryptions, each cut at its 1st, 3rd and 6th
/// fdatasync of the header (the first header alone, then hotzones under way), where segments carry
/// backup and in-reencryption flags, keyslots may be unbound and the reencrypt keyslot
/// shows its resilience.
#[test]
fn walker_dump_equals_luksdump_mid_run() {
    require_tool("cryptsetup");
    require_tool("strace");
    let mut compared = 0;
    for l in Layout::all() {
        for decrypt in [false, true] {
            for at in [1, 3, 6] {
                let (c, _) = Case::new(24, 40 + at);
                let cmd = if decrypt {
                    encrypt_with_luksify(&c, l);
                    decrypt_cmd(&c, l)
                } else {
                    encrypt_cmd(&c, l)
                };
                // The header in front is the device itself, until a decryption moved it.
                let hdr = match (l, decrypt) {
                    (Layout::Shift, false) => c.p("img"),
                    _ => c.p("hdr"),
                };
                // Counting the header's own flushes: the data thread's land among them
                // as the scheduler has it.
                let _ = kill_at_fdatasync_of(&cmd, &hdr, at);
                let mut ours = luksify(&["dump", &c.s("img")]);
                if hdr != c.p("img") {
                    ours.arg("--header").arg(&hdr);
                }
                let (Some(theirs), true) = (
                    Some(run(Command::new("cryptsetup").arg("luksDump").arg(&hdr)))
                        .filter(|o| o.status.success()),
                    hdr.exists(),
                ) else {
                    eprintln!("not compared: {l:?} decrypt={decrypt} cut at {at}");
                    continue; // cut before any header existed
                };
                let ours = run_ok(&mut ours);
                assert_eq!(
                    String::from_utf8_lossy(&ours.stdout),
                    String::from_utf8_lossy(&theirs.stdout),
                    "{l:?} decrypt={decrypt} cut at fdatasync {at}"
                );
                compared += 1;
            }
        }
    }
    assert!(compared >= 18, "only {compared} states compared");
}

/// Runs `cmd` uncut and returns how many header commits past `base` it made to `hdr`.
fn commits_of(cmd: &mut Command, hdr: &Path, base: u64) -> u64 {
    run_ok(cmd);
    header_seqid(hdr).saturating_sub(base).max(2)
}

/// What the header says: reencryption in progress (the metadata requirement is set).
fn in_progress(hdr: &Path) -> bool {
    let out = run(Command::new("cryptsetup").args(["luksDump", &hdr.display().to_string()]));
    String::from_utf8_lossy(&out.stdout).contains("online-reencrypt")
}

/// cryptsetup's procedure after a crash: recovery (`repair`), then resume.
fn cryptsetup_resume(img: &str, key: &str, hdr: Option<&str>) -> std::process::Output {
    let h: Vec<&str> = hdr.map(|h| vec!["--header", h]).unwrap_or_default();
    let rep = run(Command::new("cryptsetup")
        .args(["repair", "-q", "--key-file", key])
        .args(&h)
        .arg(img));
    assert!(
        rep.status.success(),
        "cryptsetup repair: {}",
        String::from_utf8_lossy(&rep.stderr)
    );
    // Killed with its last hotzone hot, a run is finished by `repair` itself: its
    // recovery redoes that hotzone and, nothing being left, finalizes the header
    // (measured with cryptsetup 2.6.1: in progress before repair, not after, and
    // `--resume-only` then says "Device reencryption not in progress."). The
    // caller's decryption and byte comparison still check the result.
    if !in_progress(Path::new(hdr.unwrap_or(img))) {
        return rep;
    }
    run(Command::new("cryptsetup")
        .args([
            "reencrypt",
            "--resume-only",
            "--force-offline-reencrypt",
            "-q",
            "--key-file",
            key,
        ])
        .args(&h)
        .arg(img))
}

/// Whether `img`'s header is past the last hotzone of a data-shift encryption but not
/// yet final: a reencrypt keyslot, nothing `in-reencryption`, and one live segment (the
/// final crypt one, sized by luksify, `dynamic` by cryptsetup; the rest are backups).
/// Both tools commit this state before they wipe the moved plaintext copy and write the
/// final header.
fn after_last_hotzone(img: &Path) -> bool {
    let out = run(Command::new("cryptsetup")
        .arg("luksDump")
        .arg("--dump-json-metadata")
        .arg(img));
    let Ok(j) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return false;
    };
    let reencrypting = j["keyslots"]
        .as_object()
        .is_some_and(|k| k.values().any(|k| k["type"] == "reencrypt"));
    let live: Vec<&serde_json::Value> = j["segments"]
        .as_object()
        .map(|s| s.values().collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|s| {
            !s["flags"].as_array().is_some_and(|f| {
                f.iter()
                    .any(|f| f.as_str().is_some_and(|f| f.starts_with("backup-")))
            })
        })
        .collect();
    reencrypting && live.len() == 1 && live[0]["type"] == "crypt" && live[0]["flags"].is_null()
}

/// What cryptsetup 2.6.1 says when asked to resume the state of [`after_last_hotzone`],
/// its own runs' included (see
/// `walker_finishes_cryptsetup_datashift_runs_killed_in_their_final_wipe`).
const CRYPTSETUP_POST_LAST_HOTZONE: &str =
    "Failed to set device segments for next reencryption hotzone";

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Kills decryptions at pseudo-random instants, resumes, checks the plaintext.
/// Sequence id the header file's commits count from: the detached header's own,
/// or (header moving out of the device) the device header's, which the file's
/// first copy continues.
fn base_of(c: &Case, l: Layout) -> u64 {
    match l {
        Layout::Detached(_) => header_seqid(&c.p("hdr")),
        Layout::Shift => header_seqid(&c.p("img")),
    }
}

/// Commits an uncut decryption of a fresh 32 MiB volume (pattern `seed`) makes,
/// after checking it gives the plaintext back: the range kill points are drawn from.
fn uncut_span(l: Layout, seed: u64) -> u64 {
    let (c, orig) = Case::new(32, seed);
    encrypt_with_luksify(&c, l);
    let n = commits_of(&mut decrypt_cmd(&c, l), &c.p("hdr"), base_of(&c, l));
    assert_plaintext_back(&c, l, &orig, "uncut run");
    n
}

/// A fresh `l` volume encrypted by luksify (case `seed`), then a `luksify decrypt`
/// of it killed `jitter` us after its `at`-th header commit. Returns the case, the
/// original bytes and the encrypted image's [`old_end`].
fn encrypted_then_decrypt_killed(
    l: Layout,
    seed: u64,
    at: u64,
    jitter: u64,
) -> (Case, Vec<u8>, Vec<u8>) {
    let (c, orig) = Case::new(32, seed);
    encrypt_with_luksify(&c, l);
    let end = old_end(&c.img());
    kill_after_commits(
        &mut decrypt_cmd(&c, l),
        &c.p("hdr"),
        base_of(&c, l),
        at,
        jitter,
    );
    (c, orig, end)
}

fn decrypt_crash_matrix(l: Layout, points: u64, by_cryptsetup: bool) {
    require_tool("cryptsetup");
    let mut x = 0x2545_f491u64 ^ (points << 8) ^ by_cryptsetup as u64;
    let span = uncut_span(l, 39);
    let mut mid_run = 0;
    for i in 0..points {
        let at = 1 + xorshift(&mut x) % span;
        let jitter = xorshift(&mut x) % 3000;
        let ms = format!("commit {at} + {jitter} us");
        let (c, orig, end) = encrypted_then_decrypt_killed(l, 40 + i, at, jitter);
        let (img, key, hdr) = (c.s("img"), c.s("key"), c.s("hdr"));
        if !has_luks_header(&c.p("hdr")) {
            // Killed before the header file was valid: the volume must be untouched,
            // and decrypt simply starts again.
            assert!(
                matches!(l, Layout::Shift),
                "{l:?} point {i}: detached header lost"
            );
            run_ok(&mut decrypt_cmd(&c, l));
            assert_plaintext_back(&c, l, &orig, &format!("point {i} ({ms}), restarted"));
            continue;
        }
        if in_progress(&c.p("hdr")) {
            mid_run += 1;
            let head = String::from_utf8_lossy(
                &run(Command::new("cryptsetup").args(["luksDump", &hdr])).stdout,
            )
            .contains("luksify-decrypt-head");
            let out = if by_cryptsetup && head {
                // The one state cryptsetup would misread (first hotzone of a
                // data-moving decryption): it must refuse it, luksify resumes it.
                let before = c.img();
                let rep = run(Command::new("cryptsetup").args([
                    "repair",
                    "-q",
                    "--key-file",
                    &key,
                    "--header",
                    &hdr,
                    &img,
                ]));
                assert!(
                    !rep.status.success(),
                    "cryptsetup accepted the luksify-decrypt-head state"
                );
                assert!(c.img() == before, "cryptsetup wrote to a state it refused");
                run(&mut resume_cmd(&c))
            } else if by_cryptsetup {
                cryptsetup_resume(&img, &key, Some(&hdr))
            } else {
                run(&mut resume_cmd(&c))
            };
            assert!(
                out.status.success(),
                "{l:?} point {i} ({ms}): resume failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            // Either tool's finish wipes the old end. (A run killed after its final
            // header may have left part of it: that wipe is hygiene, not resumed.)
            if let Layout::Shift = l {
                assert_old_end_wiped(&c, &end, &format!("point {i} ({ms})"));
            }
        }
        // Not in progress with a valid header file: the run had finished.
        assert_plaintext_back(&c, l, &orig, &format!("point {i} ({ms})"));
    }
    assert!(
        mid_run * 3 >= points,
        "{l:?}: only {mid_run} of {points} kills landed mid-run"
    );
}

#[test]
fn walker_sigkill_decrypt_detached_checksum_resumed_by_luksify() {
    decrypt_crash_matrix(Layout::Detached("checksum"), 8, false);
}

#[test]
fn walker_sigkill_decrypt_detached_journal_resumed_by_luksify() {
    decrypt_crash_matrix(Layout::Detached("journal"), 8, false);
}

#[test]
fn walker_sigkill_decrypt_shift_resumed_by_luksify() {
    decrypt_crash_matrix(Layout::Shift, 10, false);
}

#[test]
fn walker_sigkill_decrypt_resumed_by_cryptsetup() {
    decrypt_crash_matrix(Layout::Detached("checksum"), 4, true);
    decrypt_crash_matrix(Layout::Shift, 4, true);
}

/// Kills data-shift encryptions (header in front) at pseudo-random instants and
/// resumes them; the volume must then decrypt to the original filesystem area.
fn shift_encrypt_crash_matrix(points: u64, by_cryptsetup: bool) {
    require_tool("cryptsetup");
    let mut x = 0x9e37_79b9u64 ^ (points << 4) ^ by_cryptsetup as u64;
    let enc = |c: &Case| {
        let mut cmd = luksify(&[
            "encrypt",
            &c.s("img"),
            "--key-file",
            &c.s("key"),
            "--reduce-device-size",
            "8M",
        ]);
        cmd.args(FAST).args(SMALL);
        cmd
    };
    let span = {
        let (c, _) = Case::new(32, 59);
        commits_of(&mut enc(&c), &c.p("img"), 0)
    };
    let mut mid_run = 0;
    for i in 0..points {
        // Commit 0 = before the header exists: the kill lands in the data move.
        let at = xorshift(&mut x) % span;
        let jitter = xorshift(&mut x) % 3000;
        let ms = format!("commit {at} + {jitter} us");
        let (c, orig) = Case::new(32, 60 + i);
        let (img, key) = (c.s("img"), c.s("key"));
        kill_after_commits(&mut enc(&c), &c.p("img"), 0, at, jitter);
        let valid = has_luks_header(&c.p("img"));
        if valid && in_progress(&c.p("img")) {
            mid_run += 1;
            let out = if by_cryptsetup && after_last_hotzone(&c.p("img")) {
                // Killed while wiping the moved copy: cryptsetup cannot resume this
                // state, its own included; luksify finishes it.
                let cs = cryptsetup_resume(&img, &key, None);
                assert!(
                    !cs.status.success()
                        && String::from_utf8_lossy(&cs.stderr)
                            .contains(CRYPTSETUP_POST_LAST_HOTZONE),
                    "shift point {i} ({ms}): cryptsetup now resumes a run past its last hotzone \
                     (drop this exception): {}",
                    String::from_utf8_lossy(&cs.stderr)
                );
                run(&mut luksify(&["resume", &img, "--key-file", &key]))
            } else if by_cryptsetup {
                cryptsetup_resume(&img, &key, None)
            } else {
                run(&mut luksify(&["resume", &img, "--key-file", &key]))
            };
            assert!(
                out.status.success(),
                "shift point {i} ({ms}): resume failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        } else if !valid {
            // Killed before the header: encrypt again (the start marker lets it
            // reuse the moved copy when the head was already overwritten).
            run_ok(
                luksify(&[
                    "encrypt",
                    &img,
                    "--key-file",
                    &key,
                    "--reduce-device-size",
                    "8M",
                ])
                .args(FAST)
                .args(SMALL),
            );
        }
        assert_no_plaintext_head(&c, &orig, &format!("shift point {i} ({ms})"));
        // Finished: check with an independent decryption (cryptsetup's).
        run_ok(&mut cryptsetup_detached(
            &["reencrypt", "--decrypt"],
            &c.s("hdr"),
            &key,
            &img,
        ));
        assert_plaintext_back(&c, Layout::Shift, &orig, &format!("shift point {i} ({ms})"));
    }
    assert!(
        mid_run * 2 >= points,
        "only {mid_run} of {points} kills landed mid-run"
    );
}

/// cryptsetup's own data-shift encryption killed at each of its last 5 fsyncs (strace,
/// exact points), among them the state after its last hotzone where it wipes the
/// moved plaintext copy before its final header. cryptsetup 2.6.1 cannot resume that
/// state ("Failed to set device segments for next reencryption hotzone"); luksify
/// finishes it, wipes the copy, and the data decrypts to the original.
#[test]
fn walker_finishes_cryptsetup_datashift_runs_killed_in_their_final_wipe() {
    require_tool("cryptsetup");
    require_tool("strace");
    let cs = |c: &Case| {
        let mut cmd = Command::new("cryptsetup");
        cmd.args(["reencrypt", "--encrypt", "-q", "--key-file", &c.s("key")])
            .args(FAST)
            .args(["--reduce-device-size", "8M", &c.s("img")]);
        cmd
    };
    let (c, _) = Case::new(20, 91);
    let log = c.s("strace.log");
    run_ok(
        Command::new("strace")
            .args(["-f", "-qq", "-e", "trace=fsync", "-o", &log])
            .arg(cs(&c).get_program())
            .args(cs(&c).get_args()),
    );
    let total = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| l.contains("fsync("))
        .count() as u64;
    assert!(total > 10, "only {total} fsyncs in a whole cryptsetup run");
    let mut in_wipe = 0;
    for n in total.saturating_sub(4)..=total {
        let (c, orig) = Case::new(20, 91);
        let _ = run(&mut strace_inject(
            &format!("inject=fsync:signal=SIGKILL:when={n}"),
            &cs(&c),
        ));
        let (img, key) = (c.s("img"), c.s("key"));
        let what = format!("cryptsetup killed at fsync {n} of {total}");
        if in_progress(&c.p("img")) {
            if after_last_hotzone(&c.p("img")) {
                in_wipe += 1;
                let own = cryptsetup_resume(&img, &key, None);
                assert!(
                    !own.status.success()
                        && String::from_utf8_lossy(&own.stderr)
                            .contains(CRYPTSETUP_POST_LAST_HOTZONE),
                    "{what}: cryptsetup now resumes its own run past its last hotzone (drop \
                     the exception in shift_encrypt_crash_matrix): {}",
                    String::from_utf8_lossy(&own.stderr)
                );
            }
            run_ok(&mut luksify(&["resume", &img, "--key-file", &key]));
        }
        assert!(!in_progress(&c.p("img")), "{what}: still in progress");
        assert_no_plaintext_head(&c, &orig, &what);
        run_ok(&mut cryptsetup_detached(
            &["reencrypt", "--decrypt"],
            &c.s("hdr"),
            &key,
            &img,
        ));
        assert_plaintext_back(&c, Layout::Shift, &orig, &what);
    }
    assert!(
        in_wipe > 0,
        "no kill landed after cryptsetup's last hotzone"
    );
}

#[test]
fn walker_sigkill_matrix_datashift_resumed_by_luksify() {
    shift_encrypt_crash_matrix(20, false);
}

#[test]
fn walker_sigkill_datashift_resumed_by_cryptsetup() {
    shift_encrypt_crash_matrix(6, true);
}

/// A data-moving decryption killed in its last hotzone, then finished by cryptsetup
/// (`repair`, then `reencrypt --resume-only`). The random matrices above reach that
/// window rarely; this aims at it: kills after each of the last commits, with several
/// delays. Until eeb1a2b the last hotzone's header ended with an empty dynamic segment
/// at the device's end, which cryptsetup 2.6.1's repair kept and its resume then
/// refused ("Failed to load LUKS2 reencryption context") in about 2 of 15 such kills.
#[test]
fn walker_decrypt_killed_in_its_last_hotzone_is_finished_by_cryptsetup() {
    require_tool("cryptsetup");
    let l = Layout::Shift;
    let span = uncut_span(l, 77);
    let mut mid_run = 0;
    let mut tries = 0;
    for at in span.saturating_sub(3).max(1)..=span {
        for jitter in [0u64, 150, 400, 800, 1500] {
            tries += 1;
            let (c, orig, end) = encrypted_then_decrypt_killed(l, 80 + tries, at, jitter);
            let what = format!("commit {at} of {span} + {jitter} us");
            if !has_luks_header(&c.p("hdr")) || !in_progress(&c.p("hdr")) {
                // Not cut inside the run (finished, or before the header file
                // existed): only the plaintext is checked.
                if has_luks_header(&c.p("hdr")) {
                    assert_plaintext_back(&c, l, &orig, &what);
                }
                continue;
            }
            mid_run += 1;
            let out = cryptsetup_resume(&c.s("img"), &c.s("key"), Some(&c.s("hdr")));
            assert!(
                out.status.success(),
                "{what}: cryptsetup could not finish the run: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(!in_progress(&c.p("hdr")), "{what}: still in progress");
            assert_plaintext_back(&c, l, &orig, &what);
            assert_old_end_wiped(&c, &end, &what);
        }
    }
    eprintln!("{mid_run} of {tries} kills landed inside the run");
    assert!(
        mid_run >= 4,
        "only {mid_run} of {tries} kills landed inside the run: the window was missed"
    );
}

/// Who finishes a run that a signal stopped.
#[derive(Clone, Copy, Debug)]
enum Finisher {
    /// The command of luksify's own "continue with:" line, run as printed.
    Hint,
    /// `cryptsetup reencrypt --resume-only`, with no `repair` before it.
    Cryptsetup,
}

/// Starts `cmd` and sends `sig` after its second header commit to `hdr` (past `base`).
/// Returns the stopped run's stderr, or `None` when the run finished first.
fn stop_with(
    c: &Case,
    mut cmd: Command,
    hdr: &Path,
    base: u64,
    sig: libc::c_int,
) -> Option<String> {
    let err = std::fs::File::create(c.p("stderr")).unwrap();
    cmd.stdout(Stdio::null()).stderr(err);
    let (st, _) = signal_after_commits(&mut cmd, hdr, base, 2, 0, sig);
    let msg = std::fs::read_to_string(c.p("stderr")).unwrap();
    if st.success() {
        return None;
    }
    assert_eq!(
        st.code(),
        Some(5),
        "exit status {st} after signal {sig}: {msg}"
    );
    Some(msg)
}

/// SIGINT, SIGTERM and SIGHUP (a dropped ssh session; it used to kill the run outright,
/// which a `none` run does not survive) stop encryption and decryption at a safe point: exit code 5,
/// one line that says so and gives the command that continues, and a header that
/// cryptsetup calls clean (reencryption in progress, no hotzone flagged
/// `in-reencryption`, so no recovery is needed). That printed command, or
/// cryptsetup's `--resume-only` without `repair`, then finishes the run, and the
/// original bytes come back.
#[test]
fn walker_sigint_sigterm_and_sighup_stop_at_a_safe_point_that_resumes_cleanly() {
    require_tool("cryptsetup");
    use Finisher::{Cryptsetup, Hint};
    let (int, term, hup) = (libc::SIGINT, libc::SIGTERM, libc::SIGHUP);
    let cases = [
        (true, Layout::Detached("checksum"), term, Cryptsetup),
        (true, Layout::Detached("journal"), int, Hint),
        (true, Layout::Detached("none"), term, Hint),
        (true, Layout::Detached("none"), hup, Hint),
        (false, Layout::Shift, hup, Cryptsetup),
        (true, Layout::Shift, int, Cryptsetup),
        (true, Layout::Shift, term, Hint),
        (false, Layout::Detached("checksum"), int, Hint),
        (false, Layout::Detached("journal"), term, Cryptsetup),
        (false, Layout::Shift, term, Hint),
    ];
    for (i, (encrypt, l, sig, fin)) in cases.into_iter().enumerate() {
        let dir = if encrypt { "encrypt" } else { "decrypt" };
        let what = format!("{dir} {l:?}, signal {sig}, finished by {fin:?}");
        // 96 MiB in 512 KiB hotzones, so the signal lands mid-walk. On a starved
        // machine the run may still finish before the signal: up to 3 tries.
        let mut stopped = None;
        for attempt in 0..3u64 {
            let (c, orig) = Case::new(96, 200 + 10 * i as u64 + attempt);
            let (cmd, hdr, base) = if encrypt {
                let h = match l {
                    Layout::Detached(_) => c.p("hdr"),
                    Layout::Shift => c.p("img"),
                };
                (encrypt_cmd(&c, l), h, 0)
            } else {
                encrypt_with_luksify(&c, l);
                (decrypt_cmd(&c, l), c.p("hdr"), base_of(&c, l))
            };
            if let Some(msg) = stop_with(&c, cmd, &hdr, base, sig) {
                stopped = Some((c, orig, hdr, msg));
                break;
            }
        }
        let Some((c, orig, hdr, msg)) = stopped else {
            panic!("{what}: the run finished before the signal in each of 3 tries")
        };
        let lines: Vec<&str> = msg
            .lines()
            .filter(|s| s.contains("stopped at a safe point"))
            .collect();
        assert_eq!(lines.len(), 1, "{what}: stderr: {msg}");
        let hint = lines[0]
            .split_once("; continue with: ")
            .unwrap_or_else(|| panic!("{what}: no command to continue with: {msg}"))
            .1;
        let dump = luks_dump(&hdr);
        assert!(
            dump.contains("online-reencrypt") && !dump.contains("in-reencryption"),
            "{what}: the header is not a clean interrupted run: {dump}"
        );
        match fin {
            Hint => {
                let words: Vec<&str> = hint.split(' ').collect();
                assert_eq!(words[..2], ["luksify", "resume"], "{what}: {hint}");
                run_ok(Command::new(luksify_bin()).args(&words[1..]));
            }
            Cryptsetup => {
                let mut cs = Command::new("cryptsetup");
                cs.args([
                    "reencrypt",
                    "--resume-only",
                    "--force-offline-reencrypt",
                    "-q",
                ])
                .args(["--key-file", &c.s("key")]);
                if !(encrypt && matches!(l, Layout::Shift)) {
                    cs.args(["--header", &c.s("hdr")]);
                }
                run_ok(cs.arg(c.s("img")));
            }
        }
        assert!(!in_progress(&hdr), "{what}: still in progress after resume");
        if encrypt {
            run_ok(&mut decrypt_cmd(&c, l));
        }
        // A decryption cryptsetup finished keeps its keyslot area (cryptsetup 2.6
        // does not wipe it); one luksify finished has it wiped.
        if encrypt || matches!(fin, Hint) {
            assert_header_retired(&c);
        }
        assert_plaintext_back(&c, l, &orig, &what);
    }
}

/// `cryptsetup reencrypt` of `c`'s detached-header image with `extra` options. Not
/// `-q`: quiet, cryptsetup ignores SIGINT (its progress callback is what stops it).
fn cs_decrypt(c: &Case, extra: &[&str]) -> Command {
    let mut cmd = Command::new("cryptsetup");
    cmd.args(["reencrypt", "--force-offline-reencrypt", "--batch-mode"])
        .args(extra)
        .args([
            "--header",
            &c.s("hdr"),
            "--key-file",
            &c.s("key"),
            &c.s("img"),
        ]);
    cmd
}

/// A run cut mid-walk, finished by cryptsetup: `repair` (recovery), then
/// `reencrypt --resume-only`.
fn finish_with_cryptsetup(c: &Case) {
    run_ok(Command::new("cryptsetup").args([
        "repair",
        "-q",
        "--header",
        &c.s("hdr"),
        "--key-file",
        &c.s("key"),
        &c.s("img"),
    ]));
    run_ok(&mut cs_decrypt(c, &["--resume-only"]));
}

/// cryptsetup 2.6 decrypts a detached-header volume walking backward with the data in
/// place (segments: old crypt `[0, a)`, the hotzone, new linear to a dynamic end).
/// luksify finishes such a run wherever cryptsetup left it, in each resilience:
/// - stopped cleanly mid-walk (SIGINT after a few of its 1 MiB hotzones);
/// - killed mid-walk (strace injects SIGKILL at its n-th fdatasync; checksum and
///   journal, which can recover a hotzone);
/// - before its first hotzone (`--init-only`: one old segment to the device's end);
///   this luksify run is then itself killed mid-walk, and cryptsetup (`repair`,
///   `--resume-only`) or luksify finishes it: what luksify writes in that layout is
///   cryptsetup's own.
///
/// Every finish gives the original bytes back. (Before, luksify refused this layout;
/// earlier still, it planned hotzones down from u64::MAX and ran out of memory.)
#[test]
fn walker_finishes_backward_decryptions_cryptsetup_started() {
    require_tool("cryptsetup");
    require_tool("strace");
    let l = Layout::Detached("checksum");
    let hz = ["--hotzone-size", "1M"];
    for (i, res) in ["checksum", "journal", "none"].into_iter().enumerate() {
        let resil = ["--resilience", res];
        // 1. cryptsetup stopped cleanly mid-walk: strace sends SIGINT as it enters its
        //    n-th write(2) (data, header and progress writes alike).
        let (c, orig) = Case::new(24, 80 + i as u64);
        encrypt_with_luksify(&c, l);
        run_ok(cs_decrypt(&c, &["--decrypt", "--init-only"]).args(resil));
        let when = if res == "none" { 15 } else { 60 };
        let stop = run(&mut strace_inject(
            &format!("inject=write:signal=SIGINT:when={when}"),
            cs_decrypt(&c, &["--resume-only"]).args(hz),
        ));
        assert!(!stop.status.success(), "{res}: cryptsetup was not stopped");
        let dump = luks_dump(&c.p("hdr"));
        assert!(
            dump.contains("Direction:  backward") && !dump.contains("in-reencryption"),
            "{res}: not a clean stop mid-walk: {dump}"
        );
        run_ok(&mut resume_cmd(&c));
        assert_header_retired(&c);
        assert_plaintext_back(
            &c,
            l,
            &orig,
            &format!("{res}: cryptsetup stopped by SIGINT"),
        );

        // 2. cryptsetup killed mid-walk at an exact flush.
        if res != "none" {
            for n in [3, 9] {
                let (c, orig) = Case::new(24, 90 + n + i as u64);
                encrypt_with_luksify(&c, l);
                run_ok(cs_decrypt(&c, &["--decrypt", "--init-only"]).args(resil));
                let cut = run(&mut strace_inject(
                    &format!("inject=fdatasync:signal=SIGKILL:when={n}"),
                    cs_decrypt(&c, &["--resume-only"]).args(hz),
                ));
                assert!(!cut.status.success(), "{res}/{n}: cryptsetup was not cut");
                let dump = luks_dump(&c.p("hdr"));
                assert!(
                    dump.contains("in-reencryption") && dump.contains("Direction:  backward"),
                    "{res}/{n}: not cut mid-walk: {dump}"
                );
                run_ok(&mut resume_cmd(&c));
                assert_header_retired(&c);
                assert_plaintext_back(&c, l, &orig, &format!("{res}: cryptsetup cut at {n}"));
            }
        }

        // 3. Started by cryptsetup (`--init-only`), walked by luksify. Checksum and
        //    journal: luksify is killed mid-walk, then cryptsetup (checksum) or luksify
        //    (journal) finishes. `none` records no progress: luksify refuses it until
        //    told (`--restored`) that no byte was written, then finishes.
        let (c, orig) = Case::new(24, 95 + i as u64);
        encrypt_with_luksify(&c, l);
        run_ok(cs_decrypt(&c, &["--decrypt", "--init-only"]).args(resil));
        let mut cmd = resume_cmd(&c);
        cmd.args(SMALL);
        if res == "none" {
            // Its header records no progress: refused (a killed run reads the same),
            // then walked on the user's word that no byte was written.
            let out = run(&mut cmd);
            luksify_tests::assert_refused_in_one_line(&out, "records no progress", "none");
            cmd.args(["--restored", &format!("0..{}", orig.len())]);
            run_ok(&mut cmd);
        } else {
            kill_at_fdatasync(&cmd, 10);
            let dump = luks_dump(&c.p("hdr"));
            assert!(
                dump.contains("Direction:  backward"),
                "{res}: luksify was not killed mid-walk: {dump}"
            );
            if res == "checksum" {
                finish_with_cryptsetup(&c);
            } else {
                run_ok(&mut resume_cmd(&c));
                assert_header_retired(&c);
            }
        }
        assert_plaintext_back(&c, l, &orig, &format!("{res}: walked by luksify"));
    }
}

/// cryptsetup 2.6's `reencrypt --decrypt --header NEW` of a volume with its header in
/// front (metadata v3): it copies the first `m` bytes of ciphertext over the old header
/// (`m` = the data offset, or `--hotzone-size`), moves the rest down hotzone by hotzone
/// (datashift), and decrypts that moved head in place last, protected by checksums
/// (`datashift-checksum`) or a journal (`datashift-journal`). luksify finishes such a run
/// from the points cryptsetup was cut at (strace injects SIGKILL at its n-th fdatasync:
/// its first few, a spread of the middle, and its last few, which are the head's), and
/// cryptsetup (`repair`, `--resume-only`) finishes what luksify left when killed in
/// that layout. Every finish gives the original bytes back.
#[test]
fn walker_finishes_cryptsetups_decryption_of_a_header_in_front() {
    require_tool("cryptsetup");
    require_tool("strace");
    let variants: [(&str, &[&str]); 3] = [
        ("checksum", &[]),
        ("checksum", &["--hotzone-size", "1M"]),
        // The journal must hold the whole head: 2 MiB of the 3.9 MiB area here.
        ("journal", &["--hotzone-size", "2M"]),
    ];
    for (v, (res, extra)) in variants.into_iter().enumerate() {
        let start = |c: &Case| {
            let mut cmd = cs_decrypt(c, &["--decrypt", "--resilience", res]);
            cmd.args(extra);
            cmd
        };
        // How many fdatasyncs a whole run makes.
        let (c, orig) = Case::new(32, 120 + v as u64);
        encrypt_with_luksify(&c, Layout::Shift);
        let end = old_end(&c.img());
        let log = c.s("strace.log");
        run_ok(
            Command::new("strace")
                .args(["-f", "-qq", "-e", "trace=fdatasync", "-o", &log])
                .arg("cryptsetup")
                .args(start(&c).get_args())
                .stdout(Stdio::null()),
        );
        assert_plaintext_back(&c, Layout::Shift, &orig, "uncut");
        // What luksify's own finish does too (the oracle for that wipe).
        assert_old_end_wiped(&c, &end, &format!("{res} {extra:?}: cryptsetup uncut"));
        let total = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .filter(|l| l.contains("fdatasync("))
            .count();
        assert!(
            total >= 6,
            "{res} {extra:?}: only {total} fdatasyncs in a run"
        );
        let step = (total / 4).max(1);
        let (mut mid, mut head_hot) = (0, 0);
        for n in (1..=total).filter(|n| *n <= 2 || n + 4 > total || n % step == 0) {
            let what = format!("{res} {extra:?} cut at fdatasync {n} of {total}");
            let (c, orig) = Case::new(32, 120 + v as u64);
            encrypt_with_luksify(&c, Layout::Shift);
            let end = old_end(&c.img());
            let cut = run(&mut strace_inject(
                &format!("inject=fdatasync:signal=SIGKILL:when={n}"),
                &start(&c),
            ));
            assert!(!cut.status.success(), "{what}: not cut");
            let dump = has_luks_header(&c.p("hdr")).then(|| luks_dump(&c.p("hdr")));
            if let Some(d) = dump.as_ref().filter(|d| d.contains("online-reencrypt-v3")) {
                mid += 1;
                // The moved head itself in progress: the first segment is the hotzone.
                if d.contains("  0: linear\n\toffset: 0 [bytes]\n\tlength: ")
                    && d.split("  1: ")
                        .next()
                        .is_some_and(|s0| s0.contains("in-reencryption"))
                {
                    head_hot += 1;
                }
            }
            let out = run(&mut resume_cmd(&c));
            let err = String::from_utf8_lossy(&out.stderr);
            if out.status.success() {
                assert_header_retired(&c);
            } else if !err.contains("already finished") {
                // Cut before cryptsetup's new header held a run: the volume must be
                // untouched, still LUKS with its header in front.
                assert!(
                    dump.is_none_or(|d| !d.contains("reencrypt")),
                    "{what}: luksify refused a run in progress: {err}"
                );
                run_ok(Command::new("cryptsetup").args(["isLuks", &c.s("img")]));
                continue;
            }
            assert_plaintext_back(&c, Layout::Shift, &orig, &what);
            // Finished by luksify, or by cryptsetup before its final header.
            assert_old_end_wiped(&c, &end, &what);
        }
        assert!(mid >= 5, "{res} {extra:?}: only {mid} cuts landed mid-run");
        assert!(
            head_hot >= 1,
            "{res} {extra:?}: no cut landed in the moved head"
        );

        // luksify walks cryptsetup's start and is killed mid-tail; cryptsetup finishes.
        let (c, orig) = Case::new(32, 130 + v as u64);
        encrypt_with_luksify(&c, Layout::Shift);
        let end = old_end(&c.img());
        run_ok(start(&c).arg("--init-only"));
        let mut cmd = resume_cmd(&c);
        cmd.args(["--chunk-mib", "1", "--hotzone-kib", "1024", "--buffered"]);
        kill_at_fdatasync(&cmd, 6);
        let dump = luks_dump(&c.p("hdr"));
        assert!(
            dump.contains("in-reencryption") && dump.contains("backup-moved-segment"),
            "{res} {extra:?}: luksify not killed mid-tail: {dump}"
        );
        finish_with_cryptsetup(&c);
        assert_plaintext_back(
            &c,
            Layout::Shift,
            &orig,
            &format!("{res} {extra:?}: luksify killed"),
        );
        assert_old_end_wiped(&c, &end, &format!("{res} {extra:?}: luksify killed"));
    }
}

/// cryptsetup's decryption of a header in front, cut at each of its last header flushes
/// (fsync): killed after it dropped the passphrase keyslots but before its final header,
/// no passphrase opens the header any more, and neither tool went on: luksify said "no
/// keyslot accepts this passphrase", cryptsetup failed without a word. The data is all
/// plaintext by then: luksify writes the final header without the key and wipes the
/// keyslot area, and the plaintext is whole at byte 0.
#[test]
fn walker_finishes_a_cryptsetup_decryption_cut_while_it_retires_the_keyslots() {
    require_tool("cryptsetup");
    require_tool("strace");
    let start = |c: &Case| cs_decrypt(c, &["--decrypt", "--resilience", "checksum"]);
    let (c, _) = Case::new(32, 140);
    encrypt_with_luksify(&c, Layout::Shift);
    let log = c.s("strace.log");
    run_ok(
        Command::new("strace")
            .args(["-f", "-qq", "-e", "trace=fsync", "-o", &log])
            .arg("cryptsetup")
            .args(start(&c).get_args())
            .stdout(Stdio::null()),
    );
    let total = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| l.contains("fsync("))
        .count();
    assert!(total >= 8, "only {total} fsyncs in a run");
    let mut keyless = 0;
    for n in total - 7..=total {
        let what = format!("cut at fsync {n} of {total}");
        let (c, orig) = Case::new(32, 140);
        encrypt_with_luksify(&c, Layout::Shift);
        let cut = run(&mut strace_inject(
            &format!("inject=fsync:signal=SIGKILL:when={n}"),
            &start(&c),
        ));
        assert!(!cut.status.success(), "{what}: not cut");
        let dump = luks_dump(&c.p("hdr"));
        if dump.contains("reencrypt") && !dump.contains("luks2\n") {
            keyless += 1;
        }
        let out = run(&mut resume_cmd(&c));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() || err.contains("the decryption already finished"),
            "{what}: {err}\n{dump}"
        );
        if out.status.success() {
            assert_header_retired(&c);
        }
        assert_plaintext_back(&c, Layout::Shift, &orig, &what);
    }
    assert!(
        keyless >= 1,
        "no cut landed after the keyslots were dropped"
    );
}

/// A decryption of a header in front killed after its final header, in the wipe of the
/// keyslot area that follows: `resume` said "already finished" and left the old keyslot
/// material (the split volume key) in the header file. It wipes it now, and says so.
#[test]
fn walker_a_decryption_killed_in_its_keyslot_wipe_is_wiped_by_resume() {
    require_tool("strace");
    let (c, orig) = Case::new(32, 150);
    encrypt_with_luksify(&c, Layout::Shift);
    let enc = c.img();
    let hdr = c.s("hdr");
    let log = c.s("strace.log");
    run_ok(&mut luksify_tests::strace_with(
        &[
            "-P".as_ref(),
            hdr.as_ref(),
            "-e".as_ref(),
            "trace=pwrite64".as_ref(),
            "-o".as_ref(),
            log.as_ref(),
        ],
        &decrypt_cmd(&c, Layout::Shift),
    ));
    let writes = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| l.contains("pwrite64("))
        .count();
    assert!(writes > 8, "only {writes} header writes");
    // The wipe is the last writes (1 MiB each): cut three before the end.
    std::fs::write(c.p("img"), &enc).unwrap();
    std::fs::remove_file(&hdr).unwrap();
    let cut = run(&mut luksify_tests::strace_with(
        &[
            "-P".as_ref(),
            hdr.as_ref(),
            "-e".as_ref(),
            format!("inject=pwrite64:signal=SIGKILL:when={}", writes - 3).as_ref(),
        ],
        &decrypt_cmd(&c, Layout::Shift),
    ));
    assert!(!cut.status.success(), "not cut");
    // The wipe is what was left of the run: resume does it and succeeds (it wrote it,
    // then exited 1 with "nothing to resume"; a trial), saying the decryption had
    // finished already, not "decryption finished" as if it walked it now.
    let out = run(&mut resume_cmd(&c));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success()
            && err.contains("the decryption had already finished")
            && !err.contains("decryption finished"),
        "{err}"
    );
    assert_header_retired(&c);
    assert_plaintext_back(&c, Layout::Shift, &orig, "killed in the keyslot wipe");
}

/// A header with little JSON room left (here filled by a token cryptsetup imported)
/// gets no identity token, so the run's own segments still fit: the decryption is
/// killed mid-run without one, resumes (with the size check only) and gives the
/// original back.
#[test]
fn walker_leaves_out_the_identity_token_where_the_json_area_is_nearly_full() {
    require_tool("cryptsetup");
    let l = Layout::Detached("checksum");
    let (c, orig) = Case::new(24, 72);
    encrypt_with_luksify(&c, l);
    let (img, hdr) = (c.s("img"), c.s("hdr"));
    // 8.5 KB of padding: of the 12 KiB JSON area, less than the token plus the 2 KiB
    // a run keeps free is left once the decryption's metadata is in.
    let filler = format!(
        "{{\"type\":\"filler\",\"keyslots\":[],\"pad\":\"{}\"}}",
        "x".repeat(8500)
    );
    std::fs::write(c.p("filler.json"), filler).unwrap();
    run_ok(Command::new("cryptsetup").args([
        "token",
        "import",
        "--header",
        &hdr,
        "--json-file",
        &c.s("filler.json"),
        &img,
    ]));
    kill_at_fdatasync(&decrypt_cmd(&c, l), 8);
    let dump = luks_dump(&c.p("hdr"));
    assert!(
        dump.contains("online-reencrypt") && dump.contains("filler"),
        "not in progress at the 8th flush: {dump}"
    );
    assert!(!dump.contains("luksify-identity"), "token added: {dump}");
    run_ok(&mut resume_cmd(&c));
    assert_plaintext_back(&c, l, &orig, "decrypted with a full JSON area");
}

/// A cryptsetup volume whose cipher or segment luksify cannot walk (AES-CBC, or a
/// data segment with `integrity`) is refused by `decrypt` before anything is written.
/// The header used to be marked for decryption first, so only cryptsetup could go on;
/// an `integrity` segment of a 64-byte key was walked as plain AES-XTS.
#[test]
fn walker_decrypt_refuses_what_it_cannot_walk_before_writing() {
    use luksify_luks::luks2::json::Segment;
    use luksify_luks::luks2::Luks2Header;
    require_tool("cryptsetup");
    let rw = |p: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .unwrap()
    };
    for case in ["cbc", "benbi", "integrity"] {
        let (c, _) = Case::new(8, 41);
        let (img, key, hdr) = (c.s("img"), c.s("key"), c.s("hdr"));
        let mut cmd = Command::new("cryptsetup");
        cmd.args([
            "reencrypt",
            "--encrypt",
            "-q",
            "--key-file",
            &key,
            "--header",
            &hdr,
        ]);
        cmd.args(FAST);
        match case {
            "cbc" => cmd.args(["--cipher", "aes-cbc-essiv:sha256", "--key-size", "256"]),
            // Its keyslot too is in aes-xts-benbi: refused while unlocking.
            "benbi" => cmd.args(["--cipher", "aes-xts-benbi"]),
            _ => &mut cmd,
        };
        run_ok(cmd.arg(&img));
        if case == "integrity" {
            let f = rw(&c.p("hdr"));
            let (mut h, _) = Luks2Header::read(&f).unwrap();
            for s in h.metadata.segments.values_mut() {
                if let Segment::Crypt(s) = s {
                    s.integrity = Some(serde_json::json!({
                        "type": "hmac(sha256)",
                        "journal_encryption": "none",
                        "journal_integrity": "none"
                    }));
                }
            }
            h.write(&f).unwrap();
        }
        if case == "integrity" {
            let dump = run_ok(&mut luksify(&["dump", &img, "--header", &hdr]));
            let text = String::from_utf8_lossy(&dump.stdout);
            assert!(text.contains("\tintegrity: hmac(sha256)\n"), "{text}");
        }
        let (before_img, before_hdr) = (c.img(), std::fs::read(c.p("hdr")).unwrap());
        let out = run(&mut luksify(&[
            "decrypt",
            &img,
            "--key-file",
            &key,
            "--header",
            &hdr,
        ]));
        assert_eq!(out.status.code(), Some(1), "{case}: {out:?}");
        assert_refused_in_one_line(&out, "nothing was written", case);
        let err = String::from_utf8_lossy(&out.stderr);
        let why = match case {
            "cbc" => "aes-cbc",
            "benbi" => "aes-xts-benbi",
            _ => "integrity",
        };
        assert!(err.contains(why), "{case}: {err}");
        assert!(c.img() == before_img, "{case}: the image was written");
        assert!(
            std::fs::read(c.p("hdr")).unwrap() == before_hdr,
            "{case}: the header was written"
        );
    }
}

/// A cryptsetup key change (`reencrypt` to a new volume key) killed mid-run lists its
/// hotzone segment under both keys' digests. luksify called that header corrupt and
/// advised a header restore (which would lose the part under the new key); it now reads
/// it, and every command that would walk it or back up "the" key refuses, naming
/// cryptsetup's resume, with nothing written.
#[test]
fn walker_a_cryptsetup_key_change_mid_run_is_read_and_refused_without_writing() {
    require_tool("cryptsetup");
    let (c, _) = Case::new(32, 51);
    encrypt_with_cryptsetup(&c, Layout::Detached("checksum"));
    let (img, key, hdr) = (c.s("img"), c.s("key"), c.s("hdr"));
    // Killed between two hotzones the header has no hotzone segment: go on with
    // cryptsetup's resume and kill again until one lands inside a hotzone.
    let hotzone = || {
        let json =
            run_ok(Command::new("cryptsetup").args(["luksDump", "--dump-json-metadata", &hdr]));
        let md: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
        let hot = md["segments"]
            .as_object()
            .unwrap()
            .iter()
            .find(|(_, s)| s["flags"].to_string().contains("in-reencryption"))
            .map(|(id, _)| id.clone());
        hot.map(|h| (h, md))
    };
    let mut found = None;
    for attempt in 0..40u64 {
        let base = header_seqid(&c.p("hdr"));
        let mut cs = Command::new("cryptsetup");
        cs.args([
            "reencrypt",
            "-q",
            "--force-offline-reencrypt",
            "--key-file",
            &key,
        ]);
        // A run that ended before its kill (a loaded machine) is started anew: the
        // same passphrase opens the new key.
        if in_progress(&c.p("hdr")) {
            cs.arg("--resume-only");
        } else {
            cs.args(FAST);
            cs.args(["--resilience", "journal", "--hotzone-size", "64k"]);
        }
        cs.args(["--header", &hdr, &img]);
        kill_after_commits(
            &mut cs,
            &c.p("hdr"),
            base,
            2 + attempt % 4,
            attempt * 37 % 300,
        );
        found = hotzone();
        if found.is_some() {
            break;
        }
    }
    let (hot, md) = found.expect("the premise: a kill inside a hotzone");
    let under = md["digests"]
        .as_object()
        .unwrap()
        .values()
        .filter(|d| d["segments"].to_string().contains(&format!("\"{hot}\"")))
        .count();
    assert_eq!(under, 2, "the premise: the hotzone under both digests");
    let before = (c.img(), std::fs::read(c.p("hdr")).unwrap());
    run_ok(&mut luksify(&["dump", &img, "--header", &hdr]));
    run_ok(&mut luksify(&[
        "test-passphrase",
        &img,
        "--header",
        &hdr,
        "--key-file",
        &key,
    ]));
    let vk = c.s("vk");
    for (what, args) in [
        (
            "dump-volume-key",
            vec![
                "dump",
                &img,
                "--header",
                &hdr,
                "--dump-volume-key",
                "--key-file",
                &key,
                "--volume-key-file",
                &vk,
            ],
        ),
        (
            "decrypt",
            vec!["decrypt", &img, "--header", &hdr, "--key-file", &key],
        ),
        (
            "resume",
            vec!["resume", &img, "--header", &hdr, "--key-file", &key],
        ),
    ] {
        let out = run(&mut luksify(&args));
        assert_eq!(out.status.code(), Some(1), "{what}: {out:?}");
        assert_refused_in_one_line(&out, "cryptsetup reencrypt --resume-only", what);
        assert_refused_in_one_line(&out, "nothing was written", what);
        assert!(!c.p("vk").exists(), "{what}: a key file was written");
        assert!(
            (c.img(), std::fs::read(c.p("hdr")).unwrap()) == before,
            "{what}: something was written"
        );
    }
}

/// Mid key change, a passphrase whose keyslot holds only the old key (cryptsetup
/// deletes that keyslot when the run ends) does not open the volume, as cryptsetup
/// says; `test-passphrase` said "Key slot 1 unlocked".
#[test]
fn walker_mid_key_change_only_the_new_keys_passphrases_open() {
    require_tool("cryptsetup");
    let (c, _) = Case::new(32, 61);
    let (img, key, hdr) = (c.s("img"), c.s("key"), c.s("hdr"));
    std::fs::write(c.p("key2"), b"second passphrase").unwrap();
    let key2 = c.s("key2");
    run_ok(
        Command::new("cryptsetup")
            .args(["luksFormat", "-q", "--header", &hdr, "--key-file", &key])
            .args(FAST)
            .arg(&img),
    );
    run_ok(
        Command::new("cryptsetup")
            .args(["luksAddKey", "-q", "--header", &hdr, "--key-file", &key])
            .args(FAST)
            .args([&img, &key2]),
    );
    let base = header_seqid(&c.p("hdr"));
    let mut cs = Command::new("cryptsetup");
    cs.args([
        "reencrypt",
        "-q",
        "--force-offline-reencrypt",
        "-S",
        "0",
        "--key-file",
        &key,
    ])
    .args(FAST)
    .args(["--hotzone-size", "64k", "--header", &hdr, &img]);
    kill_after_commits(&mut cs, &c.p("hdr"), base, 5, 0);
    assert!(
        luks_dump(&c.p("hdr")).contains("reencrypt"),
        "the premise: mid-run"
    );
    for (k, opens) in [(&key, true), (&key2, false)] {
        let ours = run(&mut luksify(&[
            "test-passphrase",
            &img,
            "--header",
            &hdr,
            "--key-file",
            k,
        ]));
        let theirs = run(Command::new("cryptsetup").args([
            "open",
            "--test-passphrase",
            "--header",
            &hdr,
            "--key-file",
            k,
            &img,
        ]));
        assert_eq!(theirs.status.success(), opens, "the premise: {theirs:?}");
        assert_eq!(ours.status.success(), opens, "{k}: {ours:?}");
        assert_eq!(
            ours.status.code(),
            theirs.status.code(),
            "{k}: {ours:?} {theirs:?}"
        );
    }
}

/// A decryption stopped mid-run, then its device shrunk (or grown) before `resume`:
/// with the header in front (the data moving back over it) the shrunk run "finished",
/// exit 0, the data past the new end lost and the old end's wipe written over
/// plaintext (a trial lost 40 MB; cryptsetup's `--resume-only` does the same). Every
/// layout now refuses both, nothing written, and finishes intact once the size is back.
#[test]
fn walker_decrypt_resumed_on_a_resized_device_is_refused() {
    // (`none` is left out: a killed `none` run is refused by resume whatever the size.)
    let layouts = [
        Layout::Detached("checksum"),
        Layout::Detached("journal"),
        Layout::Shift,
    ];
    for (i, l) in layouts.into_iter().enumerate() {
        let (c, orig, _) = encrypted_then_decrypt_killed(l, 70 + i as u64, 3, 0);
        assert!(in_progress(&c.p("hdr")), "{l:?}: the run was not cut");
        let img = c.img();
        let hdr = std::fs::read(c.p("hdr")).unwrap();
        for (len, what) in [(img.len() - MIB, "shrunk"), (img.len() + MIB, "grown")] {
            let mut resized = img.clone();
            resized.resize(len, 0);
            std::fs::write(c.p("img"), &resized).unwrap();
            let out = run(&mut resume_cmd(&c));
            assert_eq!(out.status.code(), Some(1), "{l:?} {what}: {out:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains(&format!("it was {what} since")) || err.contains("reaches byte"),
                "{l:?} {what}: {err}"
            );
            assert!(c.img() == resized, "{l:?} {what}: the device was written");
            assert!(
                std::fs::read(c.p("hdr")).unwrap() == hdr,
                "{l:?} {what}: the header was written"
            );
        }
        std::fs::write(c.p("img"), &img).unwrap();
        run_ok(&mut resume_cmd(&c));
        assert_plaintext_back(&c, l, &orig, "resumed at its size");
    }
}

/// What `cryptsetup reencrypt --decrypt --header NEW` of a volume with its header in
/// front leaves when cut as it sets up (a trial's kills at 0.5-1.6 s of a 3 s run): the
/// header copied to NEW with no run in it, and the device's two header magics zeroed,
/// nothing else changed (made here with `luksHeaderBackup` and the two magics wiped).
/// `luksify decrypt --header NEW` decrypted that in place and left the plaintext at the
/// data offset, where nothing finds the filesystem; `resume` said "the encryption
/// already finished". Both refuse now, nothing written, and the commands the message
/// names (the magic put back, then a decryption into a new header file) give the
/// original back at offset 0.
#[test]
fn walker_a_header_in_front_whose_magic_cryptsetup_wiped_is_not_decrypted_in_place() {
    use std::os::unix::fs::FileExt;
    require_tool("cryptsetup");
    let (c, orig) = Case::new(24, 171);
    encrypt_with_luksify(&c, Layout::Shift);
    let copy = c.s("copy");
    run_ok(Command::new("cryptsetup").args([
        "luksHeaderBackup",
        &c.s("img"),
        "--header-backup-file",
        &copy,
    ]));
    let second = u64::from_be_bytes(c.img()[8..16].try_into().unwrap());
    let img = std::fs::OpenOptions::new()
        .write(true)
        .open(c.p("img"))
        .unwrap();
    img.write_all_at(&[0; 6], 0).unwrap();
    img.write_all_at(&[0; 6], second).unwrap();
    drop(img);
    let before = c.img();
    let key = c.s("key");
    let mut said = String::new();
    for cmd in ["decrypt", "resume"] {
        let out = run(&mut luksify(&[
            cmd,
            &c.s("img"),
            "--key-file",
            &key,
            "--header",
            &copy,
        ]));
        assert_refused_in_one_line(&out, "its magic wiped", cmd);
        assert!(c.img() == before, "{cmd} wrote");
        said = String::from_utf8_lossy(&out.stderr).to_string();
    }
    // The fix as the message spells it, DEV being the image.
    let fix = said
        .split("Put the magic back (`")
        .nth(1)
        .and_then(|r| r.split("`)").next())
        .expect("the message names the commands")
        .replace("DEV", &c.s("img"));
    run_ok(Command::new("sh").args(["-c", &fix]));
    run_ok(&mut decrypt_cmd(&c, Layout::Shift));
    assert_plaintext_back(
        &c,
        Layout::Shift,
        &orig,
        "decrypted after the magic was put back",
    );
}

/// A run's live segments must lie where its layout puts them: a header edited with its
/// checksums redone (a segment's size cut, leaving a gap before the next; a crypt
/// segment given another IV tweak) was resumed to the end with wrong bytes and
/// "decryption finished" (a trial). `resume` refuses it and writes nothing; the header
/// as cryptsetup left it is finished, every byte back.
#[test]
fn walker_a_run_whose_segments_were_edited_is_refused() {
    require_tool("cryptsetup");
    require_tool("strace");
    let l = Layout::Detached("checksum");
    let (c, orig) = Case::new(24, 97);
    encrypt_with_luksify(&c, l);
    run_ok(cs_decrypt(&c, &["--decrypt", "--init-only"]).args(["--resilience", "checksum"]));
    let stop = run(&mut strace_inject(
        "inject=write:signal=SIGINT:when=60",
        &cs_decrypt(&c, &["--resume-only", "--hotzone-size", "1M"]),
    ));
    assert!(!stop.status.success(), "cryptsetup was not stopped");
    let hdr0 = std::fs::read(c.p("hdr")).unwrap();
    let img0 = std::fs::read(c.p("img")).unwrap();
    // The live crypt segment (the part still ciphertext, from logical 0).
    let live_crypt = |v: &serde_json::Value| -> String {
        v["segments"]
            .as_object()
            .unwrap()
            .iter()
            .find(|(_, s)| {
                s["type"] == "crypt" && s["flags"].as_array().is_none_or(|f| f.is_empty())
            })
            .map(|(k, _)| k.clone())
            .expect("a live crypt segment")
    };
    for what in ["a gap", "another IV tweak"] {
        let edit = |v: &mut serde_json::Value| {
            let k = live_crypt(v);
            if what == "a gap" {
                let n: u64 = v["segments"][&k]["size"].as_str().unwrap().parse().unwrap();
                v["segments"][&k]["size"] = (n - (1 << 20)).to_string().into();
            } else {
                v["segments"][&k]["iv_tweak"] = "8".into();
            }
        };
        let bad = luksify_tests::luks2_with_json(&hdr0, edit);
        std::fs::write(c.p("hdr"), &bad).unwrap();
        let out = run(&mut resume_cmd(&c));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(err.contains("header edited or damaged"), "{what}: {err}");
        assert!(
            std::fs::read(c.p("hdr")).unwrap() == bad,
            "{what}: header written"
        );
        assert!(
            std::fs::read(c.p("img")).unwrap() == img0,
            "{what}: image written"
        );
    }
    std::fs::write(c.p("hdr"), &hdr0).unwrap();
    run_ok(&mut resume_cmd(&c));
    assert_plaintext_back(&c, l, &orig, "the header as cryptsetup left it");
}
