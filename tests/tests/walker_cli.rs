//! `luksify encrypt` / `resume` against cryptsetup 2.6 as the oracle: our runs
//! decrypt with cryptsetup, runs killed at random points resume (by us and by
//! `cryptsetup reencrypt --resume-only`), and cryptsetup's killed runs resume with us.

use luksify_tests::{
    assert_refused_in_one_line, fill_pattern, fill_volume, has_luks_header, header_seqid,
    kill_after_commits, kill_at_fdatasync, luks_dump, luksify_bin, no_header_write_lock,
    require_tool, run, run_ok, run_peak_rss_kib, sparse_file, Frozen,
};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new(mib: usize, seed: u64) -> (Case, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let mut v = vec![0u8; mib << 20];
        fill_volume(&mut v, seed);
        std::fs::write(dir.path().join("img"), &v).unwrap();
        std::fs::write(dir.path().join("key"), b"walker test passphrase").unwrap();
        (Case { dir }, v)
    }
    /// A case whose image is `bytes` long (not whole MiB).
    fn sized(bytes: usize, seed: u64) -> (Case, Vec<u8>) {
        let (c, _) = Case::new(0, seed);
        let mut v = vec![0u8; bytes];
        fill_volume(&mut v, seed);
        std::fs::write(c.p("img"), &v).unwrap();
        (c, v)
    }
    fn p(&self, n: &str) -> PathBuf {
        self.dir.path().join(n)
    }
    /// The image is `orig` still and no header file was left: a refusal wrote nothing.
    fn assert_untouched(&self, orig: &[u8], what: &str) {
        assert!(
            std::fs::read(self.p("img")).unwrap() == orig,
            "{what}: the image was written"
        );
        assert!(!self.p("hdr").exists(), "{what}: a header file was left");
    }
    fn img(&self) -> String {
        self.p("img").display().to_string()
    }
    fn key(&self) -> String {
        self.p("key").display().to_string()
    }
    fn hdr(&self) -> String {
        self.p("hdr").display().to_string()
    }
    /// The image's and the header file's bytes now.
    fn files(&self) -> (Vec<u8>, Vec<u8>) {
        (
            std::fs::read(self.p("img")).unwrap(),
            std::fs::read(self.p("hdr")).unwrap(),
        )
    }
}

fn luksify(args: &[&str]) -> Command {
    let mut c = Command::new(luksify_bin());
    c.args(args);
    c
}

const FAST: [&str; 4] = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];
const SMALL: [&str; 4] = ["--chunk-mib", "1", "--hotzone-kib", "1024"];

/// `encrypt` of a case's image with the header in front, reducing by `size`.
fn shifted(k: &Case, size: &str) -> std::process::Output {
    run(luksify(&[
        "encrypt",
        &k.img(),
        "--key-file",
        &k.key(),
        "--reduce-device-size",
        size,
    ])
    .args(FAST))
}

/// Decrypts `c`'s detached-header volume with cryptsetup and checks it gives `orig`.
fn assert_decrypts_to(c: &Case, orig: &[u8], what: &str) {
    assert!(
        same(&cryptsetup_decrypt_detached(c), orig),
        "{what}: plaintext differs"
    );
}

/// Decrypts a detached-header volume with cryptsetup and returns the plaintext.
fn cryptsetup_decrypt_detached(c: &Case) -> Vec<u8> {
    run_ok(Command::new("cryptsetup").args([
        "reencrypt",
        "--decrypt",
        "--force-offline-reencrypt",
        "-q",
        "--header",
        &c.hdr(),
        "--key-file",
        &c.key(),
        &c.img(),
    ]));
    std::fs::read(c.p("img")).unwrap()
}

/// `cryptsetup reencrypt --encrypt` of `c`'s image into a detached header, 1 MiB
/// hotzones, cheap pbkdf2 (argv, starting with the program).
fn cryptsetup_encrypt_args(c: &Case, res: &str) -> Vec<String> {
    [
        "cryptsetup",
        "reencrypt",
        "--encrypt",
        "-q",
        "--force-offline-reencrypt",
        "--header",
        &c.hdr(),
        "--key-file",
        &c.key(),
        "--resilience",
        res,
        "--hotzone-size",
        "1M",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        &c.img(),
    ]
    .map(String::from)
    .to_vec()
}

fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a == b
}

#[test]
fn walker_detached_each_resilience_decrypts_with_cryptsetup() {
    require_tool("cryptsetup");
    for res in ["checksum", "journal", "none"] {
        let (c, orig) = Case::new(24, 7);
        let (img, key, hdr) = (c.img(), c.key(), c.hdr());
        let args = [
            "encrypt",
            img.as_str(),
            "--key-file",
            key.as_str(),
            "--header",
            hdr.as_str(),
            "--resilience",
            res,
        ];
        run_ok(luksify(&args).args(FAST).args(SMALL));
        assert!(
            !same(&std::fs::read(c.p("img")).unwrap(), &orig),
            "{res}: data not encrypted"
        );
        run_ok(Command::new("cryptsetup").args([
            "open",
            "--test-passphrase",
            "--header",
            &hdr,
            "--key-file",
            &key,
            &img,
        ]));
        assert!(
            same(&cryptsetup_decrypt_detached(&c), &orig),
            "{res}: cryptsetup decrypt differs"
        );
    }
}

/// cryptsetup unlocks `c`'s image (header in front) with its key.
fn cryptsetup_unlocks(c: &Case) {
    run_ok(Command::new("cryptsetup").args([
        "open",
        "--test-passphrase",
        "--key-file",
        &c.key(),
        &c.img(),
    ]));
}

/// Panics with `what` unless the file at `p` holds exactly `want`.
fn assert_file_is(p: &std::path::Path, want: &[u8], what: &str) {
    let now = std::fs::read(p).unwrap();
    let first = now.iter().zip(want).position(|(a, b)| a != b);
    assert!(
        now.len() == want.len() && first.is_none(),
        "{what} (now {} bytes, was {}; first difference at {first:?})",
        now.len(),
        want.len()
    );
}

/// `luksify encrypt` of `c`'s image into its detached header, 1 MiB chunks, with
/// `hotzone_kib`-KiB hotzones; default resilience unless the caller adds one.
fn detached_encrypt_hz(c: &Case, hotzone_kib: &str) -> Command {
    let mut cmd = detached_encrypt_kdf(c, &FAST);
    cmd.args(["--chunk-mib", "1", "--hotzone-kib", hotzone_kib]);
    cmd
}

/// `luksify encrypt` of `c`'s image into its detached header with key derivation
/// options `kdf`, the default request and hotzone sizes.
fn detached_encrypt_kdf(c: &Case, kdf: &[&str]) -> Command {
    let mut cmd = encrypt_into(c, &c.hdr());
    cmd.args(kdf);
    cmd
}

/// `luksify encrypt` of `c`'s image with `--header header`, nothing else.
fn encrypt_into(c: &Case, header: &str) -> Command {
    luksify(&[
        "encrypt",
        &c.img(),
        "--key-file",
        &c.key(),
        "--header",
        header,
    ])
}

/// `luksify resume` of `c`'s image with its detached header.
fn detached_resume(c: &Case) -> Command {
    luksify(&[
        "resume",
        &c.img(),
        "--key-file",
        &c.key(),
        "--header",
        &c.hdr(),
    ])
}

/// `luksify decrypt` of `c`'s image with its detached header (or, header in front, the
/// new file it moves to).
fn detached_decrypt(c: &Case) -> Command {
    luksify(&[
        "decrypt",
        &c.img(),
        "--key-file",
        &c.key(),
        "--header",
        &c.hdr(),
    ])
}

/// [`detached_encrypt_hz`] with [`SMALL`]'s hotzones.
fn detached_encrypt(c: &Case) -> Command {
    detached_encrypt_hz(c, SMALL[3])
}

/// `luksify encrypt` of `c`'s image with the header in front (an 8 MiB shift), at
/// the fast test settings.
fn shift_encrypt(c: &Case) -> Command {
    let mut cmd = luksify(&[
        "encrypt",
        &c.img(),
        "--key-file",
        &c.key(),
        "--reduce-device-size",
        "8M",
    ]);
    cmd.args(FAST).args(SMALL);
    cmd
}

/// `luksify resume IMG` with `c`'s header and key, where IMG is `c`'s file `name`:
/// must be refused as the wrong device, with nothing written to it or the header.
fn assert_resume_refused_on(c: &Case, name: &str, what: &str) {
    let (before, hdr0) = (
        std::fs::read(c.p(name)).unwrap(),
        std::fs::read(c.p("hdr")).unwrap(),
    );
    let dev = c.p(name).display().to_string();
    let out = run(&mut luksify(&[
        "resume",
        &dev,
        "--key-file",
        &c.key(),
        "--header",
        &c.hdr(),
    ]));
    assert_refused_in_one_line(&out, "wrong device", &format!("{what}: resume on {name}"));
    assert_file_is(&c.p(name), &before, &format!("{what}: {name} was written"));
    assert_file_is(
        &c.p("hdr"),
        &hdr0,
        &format!("{what}: the header was written"),
    );
}

/// `cmd` (a luksify run) SIGKILLed at its `flush`-th fdatasync, mid-run with the
/// identity token in the header; then `resume` on `c`'s files "other" and "clone" is
/// refused as the wrong device, with nothing written.
fn killed_with_token_then_refused(c: &Case, cmd: &Command, flush: u64, what: &str) {
    kill_at_fdatasync(cmd, flush);
    let d = luks_dump(&c.p("hdr"));
    assert!(
        d.contains("online-reencrypt") && d.contains("luksify-identity"),
        "{what}: no run in progress with the token at flush {flush}: {d}"
    );
    assert_token_keyed(c, what);
    assert_resume_refused_on(c, "other", what);
    assert_resume_refused_on(c, "clone", what);
}

/// The identity token's tags are keyed: none is a plain SHA-256 prefix of any 512-byte
/// sector of the plaintext or the ciphertext at its probes (they were: a header kept
/// apart, or left with the token by a run cryptsetup finished, let anyone confirm a
/// guess of a sector's plaintext).
fn assert_token_keyed(c: &Case, what: &str) {
    let out = run_ok(
        Command::new("cryptsetup")
            .args(["luksDump", "--dump-json-metadata"])
            .arg(c.p("hdr")),
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = json["tokens"]
        .as_object()
        .and_then(|t| t.values().find(|t| t["type"] == "luksify-identity"))
        .unwrap_or_else(|| panic!("{what}: no identity token: {json}"));
    assert_eq!(token["tags"], "keyed-v1", "{what}: {token}");
    // Each probe holds the plaintext or the ciphertext now (old or new content).
    let img = std::fs::read(c.p("img")).unwrap();
    let mut known = std::collections::HashSet::new();
    for probe in token["probes"].as_array().unwrap() {
        let at: usize = probe["offset"].as_str().unwrap().parse().unwrap();
        for sector in img[at..at + 4096].chunks(512) {
            let d = <sha2::Sha256 as sha2::Digest>::digest(sector);
            known.insert(
                d[..8]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>(),
            );
        }
        for tag in ["old", "new"]
            .iter()
            .flat_map(|k| probe[*k].as_array().unwrap())
        {
            assert!(
                !known.contains(tag.as_str().unwrap()),
                "{what}: a tag is the plain SHA-256 of a sector at {at}"
            );
        }
    }
}

/// A detached header's run resumed on a device it did not start on is refused before
/// anything is written: another image of the same size, and a copy of the right one
/// taken before the run (still old where the header says the run has written, once
/// the run is past the first 4 KiB). The
/// same for a decryption. The right device then resumes; the header carries the
/// identity token while the run is in progress (cryptsetup reads it), none after.
#[test]
fn walker_resume_refuses_a_device_the_run_did_not_start_on() {
    require_tool("cryptsetup");
    let (c, orig) = Case::new(48, 91);
    let mut other = orig.clone();
    fill_pattern(&mut other, 92);
    std::fs::write(c.p("other"), &other).unwrap();
    std::fs::write(c.p("clone"), &orig).unwrap();
    // Killed past the first probe (the first 4 KiB), so a copy taken before the run
    // differs from what the header says is there (1 MiB hotzones, 48 of them); then
    // resume is refused on the other image and on the copy.
    let killed_then_refused = |cmd: &Command, what: &str| {
        killed_with_token_then_refused(&c, cmd, 20, what);
    };
    killed_then_refused(&detached_encrypt(&c), "encrypt");
    // (resume says which run it finished: it said "run finished".)
    let said = |out: std::process::Output| String::from_utf8_lossy(&out.stderr).to_string();
    let err = said(run_ok(&mut detached_resume(&c)));
    assert!(err.contains("encryption finished"), "{err}");
    assert!(
        !luks_dump(&c.p("hdr")).contains("luksify-identity"),
        "token left after the run"
    );

    // Decryption: the copy is of the ciphertext, taken before the decryption.
    std::fs::copy(c.p("img"), c.p("clone")).unwrap();
    let mut dec = detached_decrypt(&c);
    dec.args(SMALL);
    killed_then_refused(&dec, "decrypt");
    let err = said(run_ok(&mut detached_resume(&c)));
    assert!(err.contains("decryption finished"), "{err}");
    assert_file_is(&c.p("img"), &orig, "decrypted image");
}

/// A run cryptsetup started carries no identity token; the first time luksify walks
/// it, it records one at its clean point (a probe already walked: new content, its old
/// one through the inverse cipher). Then another image, and a copy of this one taken
/// when cryptsetup was cut (old where luksify has written since), are refused, and the
/// right image finishes. For cryptsetup's encryption (forward) and its detached
/// decryption (backward, in place), each cut mid-walk by SIGKILL at an exact fdatasync.
#[test]
fn walker_resume_records_the_identity_of_a_run_cryptsetup_started() {
    require_tool("cryptsetup");
    require_tool("strace");
    for decrypt in [false, true] {
        let what = if decrypt {
            "cryptsetup's decryption"
        } else {
            "cryptsetup's encryption"
        };
        let (c, orig) = Case::new(48, 93);
        // The same argv decrypts (cryptsetup ignores the pbkdf options then).
        let mut cs: Vec<String> = cryptsetup_encrypt_args(&c, "checksum");
        if decrypt {
            run_ok(&mut detached_encrypt(&c));
            cs[2] = "--decrypt".into();
        }
        // Cut by SIGKILL at its 12th fdatasync (11 hotzones in), then copied.
        let mut cs_cmd = Command::new(&cs[0]);
        cs_cmd.args(&cs[1..]);
        let cut = kill_at_fdatasync(&cs_cmd, 12);
        assert!(!cut.status.success(), "{what}: not cut");
        let d = luks_dump(&c.p("hdr"));
        assert!(
            d.contains("in-reencryption") && !d.contains("luksify-identity"),
            "{what}: not cut mid-walk, or a token already: {d}"
        );
        std::fs::copy(c.p("img"), c.p("clone")).unwrap();
        let mut other = orig.clone();
        fill_pattern(&mut other, 94);
        std::fs::write(c.p("other"), &other).unwrap();
        // luksify recovers the hotzone, records the token, walks on past the next probe
        // (12 MiB apart) and is killed.
        let mut resume = detached_resume(&c);
        resume.args(SMALL);
        killed_with_token_then_refused(&c, &resume, 50, what);
        run_ok(&mut detached_resume(&c));
        if decrypt {
            assert_file_is(&c.p("img"), &orig, "decrypted image");
        } else {
            assert!(
                same(&cryptsetup_decrypt_detached(&c), &orig),
                "{what}: plaintext differs"
            );
        }
    }
}

/// Resilience `none` keeps no copy, so a run cut mid-walk cannot be finished. The
/// header names hot the bytes that may be part rewritten (as cryptsetup's does), and
/// `resume` refuses with that range instead of starting over on data it already
/// rewrote; cryptsetup's recovery refuses too. Neither writes anything.
#[test]
fn walker_none_killed_mid_run_is_refused_not_redone() {
    require_tool("cryptsetup");
    let none = |c: &Case| {
        let mut cmd = detached_encrypt(c);
        cmd.args(["--resilience", "none"]);
        cmd
    };
    // Commits of an uncut run: the header's creation, one naming the data hot, the
    // finished header marked "wipe pending", the end.
    let span = {
        let (c, _) = Case::new(96, 54);
        run_ok(&mut none(&c));
        header_seqid(&c.p("hdr"))
    };
    for jitter in [3000, 1000, 0] {
        let (c, orig) = Case::new(96, 55);
        kill_after_commits(&mut none(&c), &c.p("hdr"), 0, span - 2, jitter);
        if !has_luks_header(&c.p("hdr")) || !luks_dump(&c.p("hdr")).contains("in-reencryption") {
            continue;
        }
        let (img0, hdr0) = c.files();
        let out = run(&mut detached_resume(&c));
        assert_refused_in_one_line(&out, "resilience `none`", "resume");
        // The way out, not a loop back to resume; and not "remove the header file and
        // encrypt again", which a trial followed and lost the part already encrypted
        // (its key was in that header).
        let range = format!("0..{}", 96 << 20);
        assert!(
            String::from_utf8_lossy(&out.stderr)
                .contains(&format!("Keep the header file (it holds the key of the bytes already done); restore that range from a backup taken before the run, then resume with --restored {range}")),
            "{out:?}"
        );
        let rep = run(Command::new("cryptsetup").args([
            "repair",
            "-q",
            "--header",
            &c.hdr(),
            "--key-file",
            &c.key(),
            &c.img(),
        ]));
        assert!(!rep.status.success(), "cryptsetup recovered a none hotzone");
        // decrypt does not send the user back to resume for a killed `none` run.
        let out = run(&mut detached_decrypt(&c));
        assert_refused_in_one_line(&out, "names the byte range to restore", "decrypt");
        assert_file_is(&c.p("img"), &img0, "the image was written");
        assert_file_is(&c.p("hdr"), &hdr0, "the header was written");
        // Another range than the one named is refused, writing nothing.
        let mut wrong = detached_resume(&c);
        wrong.args(["--restored", "0..4096"]);
        assert_refused_in_one_line(
            &run(&mut wrong),
            "is not the range the header names",
            "wrong range",
        );
        assert!(c.files() == (img0, hdr0), "a wrong --restored wrote");
        // Doing what it says: the range restored from the original, resume finishes and
        // the volume decrypts to the original.
        std::fs::write(c.p("img"), &orig).unwrap();
        let mut restored = detached_resume(&c);
        restored.args(["--restored", &range]);
        run_ok(&mut restored);
        assert_decrypts_to(&c, &orig, "restored and resumed");
        return;
    }
    panic!("each none run finished before the kill");
}

/// The same for a decryption: a killed `cryptsetup reencrypt --decrypt --resilience
/// none` records no progress either, and `resume` decrypted it again from the start,
/// turning the part already plaintext into garbage while it said "decryption finished"
/// (a trial: the last 40-200 MiB of 512 differed). Here the `--init-only` state:
/// refused, nothing written; `--restored 0..LEN`, the way out the message names for a
/// run that never wrote, decrypts it.
#[test]
fn walker_a_none_decryption_with_no_recorded_progress_is_not_started_over() {
    require_tool("cryptsetup");
    let (c, orig) = Case::new(16, 56);
    run_ok(&mut detached_encrypt(&c));
    run_ok(
        Command::new("cryptsetup")
            .args([
                "reencrypt",
                "--decrypt",
                "--init-only",
                "-q",
                "--force-offline-reencrypt",
            ])
            .args([
                "--resilience",
                "none",
                "--header",
                &c.hdr(),
                "--key-file",
                &c.key(),
            ])
            .arg(c.img()),
    );
    let (img0, hdr0) = (
        std::fs::read(c.p("img")).unwrap(),
        std::fs::read(c.p("hdr")).unwrap(),
    );
    let out = run(&mut detached_resume(&c));
    assert_refused_in_one_line(&out, "records no progress", "resume");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("this decryption"),
        "{out:?}"
    );
    assert_file_is(&c.p("img"), &img0, "data touched");
    assert_file_is(&c.p("hdr"), &hdr0, "header touched");
    // The way out the message names for a run that never wrote: --restored 0..LEN.
    let len = orig.len();
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(said.contains(&format!("--restored 0..{len}")), "{said}");
    let mut restored = detached_resume(&c);
    restored.args(["--restored", &format!("0..{len}")]);
    run_ok(&mut restored);
    assert_file_is(&c.p("img"), &orig, "not the original after --restored");
}

/// A `none` encryption whose header records no progress is not started over: cryptsetup
/// writes nothing to the header while its `none` run walks, so a run killed after it
/// rewrote most of the device reads the same as one never begun, and starting over
/// encrypted the encrypted part twice and said "encryption finished" (found by a
/// trial). Here the state `cryptsetup reencrypt --init-only --resilience none` leaves:
/// refused, nothing written, and the way out (a new run) works.
#[test]
fn walker_a_none_run_with_no_recorded_progress_is_not_started_over() {
    require_tool("cryptsetup");
    let (c, orig) = Case::new(16, 56);
    run_ok(
        Command::new("cryptsetup")
            .args(["reencrypt", "--encrypt", "--init-only", "-q"])
            .args([
                "--resilience",
                "none",
                "--header",
                &c.hdr(),
                "--key-file",
                &c.key(),
            ])
            .args(FAST)
            .arg(c.img()),
    );
    let hdr0 = std::fs::read(c.p("hdr")).unwrap();
    let out = run(&mut detached_resume(&c));
    assert_refused_in_one_line(&out, "records no progress", "resume");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("remove the header file") && err.contains("run `luksify encrypt` again"),
        "{err}"
    );
    assert_file_is(&c.p("img"), &orig, "data touched");
    assert_file_is(&c.p("hdr"), &hdr0, "header touched");
    std::fs::remove_file(c.p("hdr")).unwrap();
    run_ok(&mut detached_encrypt(&c));
    assert!(
        same(&cryptsetup_decrypt_detached(&c), &orig),
        "the new run differs"
    );
}

/// A 48 MiB image holding a 40 MiB ext4, and its `encrypt --reduce-device-size 8M`
/// SIGKILLed by strace at its `flush`-th fdatasync (the start's moved copy, marker and
/// first header are made durable one by one): the case, the image before, the arguments.
fn shift_start_cut(seed: u64, flush: u64) -> (Case, Vec<u8>, Vec<String>) {
    require_tool("strace");
    require_tool("mkfs.ext4");
    let (c, _) = Case::new(48, seed);
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", &c.img(), "40M"]));
    let orig = std::fs::read(c.p("img")).unwrap();
    let (img, key) = (c.img(), c.key());
    let args: Vec<String> = [
        "encrypt",
        &img,
        "--key-file",
        &key,
        "--reduce-device-size",
        "8M",
    ]
    .into_iter()
    .chain(FAST)
    .chain(SMALL)
    .map(str::to_string)
    .collect();
    let cut = run(Command::new("strace")
        .args(["-f", "-o", "/dev/null"])
        .args([
            "-e",
            &format!("inject=fdatasync:signal=SIGKILL:when={flush}"),
        ])
        .arg(luksify_bin())
        .args(&args));
    assert!(!cut.status.success(), "the run was not cut");
    (c, orig, args)
}

/// [`shift_encrypt`] run again over `c`'s cut start, then decrypted: the image's bytes.
fn rerun_shift_and_decrypt(c: &Case) -> Vec<u8> {
    run_ok(&mut shift_encrypt(c));
    run_ok(&mut detached_decrypt(c));
    std::fs::read(c.p("img")).unwrap()
}

/// The same command finishes a [`shift_start_cut`]; decrypted, the filesystem's 40 MiB
/// are the original's.
fn finish_cut_start(c: &Case, args: &[&str], orig: &[u8]) {
    run_ok(&mut luksify(args));
    run_ok(&mut detached_decrypt(c));
    let back = std::fs::read(c.p("img")).unwrap();
    let fs = 40 << 20;
    assert!(same(&back[..fs], &orig[..fs]), "filesystem bytes differ");
}

/// A data-shift start cut right after the header's secondary copy was made durable and
/// before the primary was written: the primary area holds the start marker's copy, so
/// cryptsetup does not call the device LUKS, and the VM power-cut scenario runs the
/// same `encrypt` again (where this was found). That command must continue the run,
/// and the result decrypts to the filesystem's bytes. strace kills luksify at its 6th
/// fdatasync: after the moved copy, the start marker, its copy at byte 0, the start
/// marker saying the head may be overwritten and the keyslots, at the secondary's.
/// Before that, `encrypt` with another layout is refused, nothing written.
#[test]
fn walker_shift_start_cut_with_only_the_secondary_header_is_continued_by_encrypt() {
    require_tool("cryptsetup");
    let (c, orig, args) = shift_start_cut(3, 6);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (img, key) = (c.img(), c.key());
    let now = std::fs::read(c.p("img")).unwrap();
    assert!(
        &now[16384..16390] == b"SKUL\xba\xbe" && &now[..6] != b"LUKS\xba\xbe",
        "not the secondary-only state"
    );
    // The primary area holds the start marker's copy, not ext4's first bytes (which
    // made the device "ambiguous" to cryptsetup): cryptsetup takes the secondary copy,
    // and its repair and `--resume-only` finish the run too (on a copy of the image).
    let copy = c.p("copy").display().to_string();
    std::fs::copy(c.p("img"), &copy).unwrap();
    run_ok(Command::new("cryptsetup").args(["repair", "-q", &copy, "--key-file", &key]));
    run_ok(Command::new("cryptsetup").args([
        "reencrypt",
        "--resume-only",
        "--force-offline-reencrypt",
        "-q",
        &copy,
        "--key-file",
        &key,
    ]));
    let moved = c.p("copy.hdr").display().to_string();
    run_ok(Command::new("cryptsetup").args([
        "reencrypt",
        "--decrypt",
        "--force-offline-reencrypt",
        "-q",
        "--header",
        &moved,
        &copy,
        "--key-file",
        &key,
    ]));
    let back = std::fs::read(&copy).unwrap();
    assert!(
        back[..40 << 20] == orig[..40 << 20],
        "finished by cryptsetup, the filesystem differs"
    );
    // Another layout would encrypt over the moved copy, the only one of the first
    // 4 MiB (the marker's copy at byte 0 names the run): refused, with the
    // command that continues, nothing written (no header file either).
    let other_hdr = c.p("other.hdr").display().to_string();
    let mut detached = vec!["encrypt", &img, "--key-file", &key, "--header", &other_hdr];
    detached.extend(FAST);
    let mut wider = args.clone();
    wider[5] = "16M";
    for (other, what) in [
        (detached, "a detached header"),
        (wider, "another reduction"),
    ] {
        let out = run(&mut luksify(&other));
        assert_refused_in_one_line(&out, "--reduce-device-size 8M", what);
        assert!(
            std::fs::read(c.p("img")).unwrap() == now,
            "{what}: the image changed"
        );
        assert!(!c.p("other.hdr").exists(), "{what}: a header file was left");
    }
    // A power loss in the primary's write may land its first sector alone: the LUKS
    // magic at byte 0 over the marker's copy there, which is lost. The end marker and
    // that magic still say the head is the run's: the same command continues it.
    let mut torn = now.clone();
    torn.copy_within(16384..16384 + 512, 0);
    torn[..6].copy_from_slice(b"LUKS\xba\xbe");
    torn[256..264].fill(0);
    std::fs::write(c.p("img"), &torn).unwrap();
    finish_cut_start(&c, &args, &orig);
}

/// A second run on an image that a luksify run is walking is refused before it reads
/// or writes anything, with one line that says why and what to do, whichever command
/// it is (resume, decrypt, encrypt into another header, encrypt with the header in
/// front); the first run then finishes and the volume decrypts to the original. The
/// first run is frozen (SIGSTOP) after its second commit, so it holds the image while
/// the others try, whatever the machine's speed.
#[test]
fn walker_second_run_on_a_busy_image_is_refused_and_the_first_finishes() {
    require_tool("cryptsetup");
    let (c, orig) = Case::new(64, 77);
    let first = Frozen::after_seqid(
        detached_encrypt(&c)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        &c.p("hdr"),
        2,
    );
    let (img0, hdr0) = (
        std::fs::read(c.p("img")).unwrap(),
        std::fs::read(c.p("hdr")).unwrap(),
    );
    let (img, key, hdr) = (c.img(), c.key(), c.hdr());
    let hdr2 = c.p("hdr2").display().to_string();
    let seconds: [&[&str]; 4] = [
        &["resume", &img, "--key-file", &key, "--header", &hdr],
        &["decrypt", &img, "--key-file", &key, "--header", &hdr],
        &["encrypt", &img, "--key-file", &key, "--header", &hdr2],
        &[
            "encrypt",
            &img,
            "--key-file",
            &key,
            "--reduce-device-size",
            "8M",
        ],
    ];
    for args in seconds {
        let out = run(&mut luksify(args));
        assert_refused_in_one_line(
            &out,
            "locked by another luksify run on the same bytes",
            &format!("{args:?}"),
        );
        assert_eq!(out.status.code(), Some(4), "{args:?}: busy is exit 4");
        assert_file_is(&c.p("img"), &img0, &format!("{args:?} wrote to the image"));
        assert_file_is(&c.p("hdr"), &hdr0, &format!("{args:?} wrote to the header"));
        assert!(!c.p("hdr2").exists(), "{args:?} created a header file");
    }
    let st = first.thaw();
    assert!(st.success(), "the first run, continued: {st}");
    assert!(
        same(&cryptsetup_decrypt_detached(&c), &orig),
        "plaintext differs after the first run finished"
    );
}

/// While luksify walks an image file, `cryptsetup luksDump` of it answers, and qemu
/// cannot open it for writing; an image qemu has open is refused by luksify in one line.
/// Until 2026-12-02 a run held a `flock` on the image file for its whole length: that is
/// the read lock cryptsetup takes on an image file, so `cryptsetup luksDump IMG` hung
/// until the run ended. A run now holds a record lock on every byte (the lock qemu takes
/// on the images it uses), which `flock` does not see, and takes the `flock` only while
/// it writes the header, as cryptsetup does.
#[test]
fn walker_busy_image_answers_cryptsetup_and_is_closed_to_qemu() {
    require_tool("cryptsetup");
    require_tool("qemu-io");
    require_tool("timeout");
    let (c, orig) = Case::new(64, 91);
    let (img, key) = (c.img(), c.key());
    let mut enc = shift_encrypt(&c);
    enc.stdout(Stdio::null()).stderr(Stdio::null());
    let first = Frozen::after_seqid(&mut enc, &c.p("img"), 3);
    // Between two commits: a commit holds cryptsetup's metadata lock (a flock on the
    // image), which cryptsetup waits for, as it waits for its own.
    first.step_until(|| no_header_write_lock(&c.p("img")));
    let img0 = std::fs::read(c.p("img")).unwrap();
    let dump = run(Command::new("timeout").args(["20", "cryptsetup", "luksDump", &img]));
    let out = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.status.success() && out.contains("reencrypt"),
        "cryptsetup luksDump during a run: {}: {out}{}",
        dump.status,
        String::from_utf8_lossy(&dump.stderr)
    );
    let q = run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x55 0 4k", &img]));
    let qerr = String::from_utf8_lossy(&q.stderr);
    assert!(
        !q.status.success() && qerr.contains("lock"),
        "qemu-io wrote to an image luksify is walking: {}: {qerr}",
        q.status
    );
    assert_file_is(
        &c.p("img"),
        &img0,
        "qemu-io or cryptsetup changed the image",
    );
    let st = first.thaw();
    assert!(st.success(), "the run, continued: {st}");
    // qemu holds the image open (qemu-io waits on its stdin): luksify keeps out.
    let mut qemu = Command::new("qemu-io")
        .args(["-f", "raw", &img])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let holds = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .any(|e| std::fs::read_link(e.path()).ok() == Some(c.p("img")))
            })
            .unwrap_or(false)
    };
    let t0 = std::time::Instant::now();
    while !holds(qemu.id()) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "qemu-io never opened the image"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Its lock is taken right after the open: give it that moment.
    std::thread::sleep(Duration::from_millis(200));
    let enc_img = std::fs::read(c.p("img")).unwrap();
    let moved = c.p("moved").display().to_string();
    let dec = [
        "decrypt",
        img.as_str(),
        "--key-file",
        &key,
        "--header",
        &moved,
    ];
    let out = run(&mut luksify(&dec));
    assert_refused_in_one_line(
        &out,
        "locked by another luksify run on the same bytes",
        "decrypt beside qemu",
    );
    assert_file_is(
        &c.p("img"),
        &enc_img,
        "the refused decrypt wrote to the image",
    );
    assert!(
        !c.p("moved").exists(),
        "the refused decrypt created its header file"
    );
    drop(qemu.stdin.take());
    qemu.wait().unwrap();
    run_ok(&mut luksify(&dec));
    let back = std::fs::read(c.p("img")).unwrap();
    let kept = (64 - 8) << 20;
    assert!(same(&back[..kept], &orig[..kept]), "plaintext differs");
}

/// What a kill during the first header write leaves in a new header file, made by
/// hand (a kill can hit these windows only by chance): the file only reserved (all
/// zeros), and the file marked new with a torn secondary copy. `resume` must say
/// to run the same `encrypt` again (or restore a header emptied since), the data must
/// be untouched, and that command must then reuse the file and finish over a device
/// that still shows its filesystem, and refuse over one that shows none. Any other
/// non-empty file is refused as before.
#[test]
fn walker_cut_first_header_write_is_continued_by_the_same_encrypt() {
    require_tool("cryptsetup");
    // A real header's secondary copy, cut after its first 512 bytes (magic and
    // binary header present, JSON area and checksum not matching).
    let torn_secondary = {
        let (c, _) = Case::new(8, 1);
        run_ok(&mut detached_encrypt(&c));
        let h = std::fs::read(c.p("hdr")).unwrap();
        h[16384..16384 + 512].to_vec()
    };
    let mut marked = vec![0u8; 16 << 20];
    marked[..16].copy_from_slice(luksify_walker::NEW_STORE_MAGIC);
    marked[16384..16384 + 512].copy_from_slice(&torn_secondary);
    for (what, file, ext4) in [
        ("reserved only", vec![0u8; 16 << 20], true),
        ("torn secondary", marked.clone(), true),
        ("reserved only, no filesystem", vec![0u8; 16 << 20], false),
        ("torn secondary, no filesystem", marked, false),
    ] {
        let (c, orig) = Case::new(16, 3);
        // Over a device that still starts with its filesystem the file is reused; over
        // one that shows none, luksify cannot tell such a file from one emptied after
        // its run began, and reusing it encrypted twice (trial V6): refused, nothing
        // written, and the file removed by hand, the run starts anew.
        let orig = if ext4 {
            require_tool("mkfs.ext4");
            run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(c.p("img")));
            std::fs::read(c.p("img")).unwrap()
        } else {
            orig
        };
        std::fs::write(c.p("hdr"), &file).unwrap();
        let st = run(&mut detached_resume(&c));
        let err = String::from_utf8_lossy(&st.stderr);
        // It cannot tell such a file from one emptied since (trial V6); over a device
        // that shows no filesystem its advice is what `encrypt` then takes (trial C2:
        // "run the same command again" led into encrypt's refusal below).
        let again = if ext4 {
            "run the same `luksify encrypt` command again, which starts it over"
        } else {
            "remove the header file and run the same `luksify encrypt` command again"
        };
        assert!(
            !st.status.success() && err.contains(again) && err.contains("restore it from a copy"),
            "{what}: resume said: {err}"
        );
        assert_file_is(&c.p("img"), &orig, &format!("{what}: data touched"));
        if !ext4 {
            let st = run(&mut detached_encrypt(&c));
            let err = String::from_utf8_lossy(&st.stderr);
            assert!(
                st.status.code() == Some(1)
                    && err.contains("shows no filesystem where its data starts")
                    && err.contains("remove the file and run the command again"),
                "{what}: encrypt said: {err}"
            );
            assert_file_is(&c.p("img"), &orig, &format!("{what}: data touched"));
            assert_file_is(&c.p("hdr"), &file, &format!("{what}: header file changed"));
            std::fs::remove_file(c.p("hdr")).unwrap();
        }
        run_ok(&mut detached_encrypt(&c));
        assert!(
            same(&cryptsetup_decrypt_detached(&c), &orig),
            "{what}: cryptsetup decrypt differs"
        );
    }
    // Anything else already in the file is not ours to overwrite.
    let (c, orig) = Case::new(8, 4);
    let mut other = vec![0u8; 1 << 20];
    fill_pattern(&mut other, 9);
    std::fs::write(c.p("hdr"), &other).unwrap();
    let st = run(&mut detached_encrypt(&c));
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(
        !st.status.success() && err.contains("already exists and holds other data"),
        "a foreign header file: {err}"
    );
    assert_file_is(&c.p("hdr"), &other, "foreign file changed");
    assert_file_is(&c.p("img"), &orig, "data touched");
    assert!(
        !err.contains("remove it"),
        "advice to delete a file that is not ours: {err}"
    );
    // A directory as the header: named as one, with a file name to use instead.
    std::fs::create_dir(c.p("hdir")).unwrap();
    let hdir = c.p("hdir").display().to_string();
    let out = run(encrypt_into(&c, &hdir).args(FAST));
    assert_refused_in_one_line(
        &out,
        "is a directory; name a new file in it",
        "--header DIR",
    );
    assert_file_is(&c.p("img"), &orig, "--header DIR: data touched");
    assert!(
        std::fs::read_dir(c.p("hdir")).unwrap().next().is_none(),
        "--header DIR: wrote in it"
    );
}

#[test]
fn walker_an_emptied_header_of_a_run_with_an_offset_is_not_taken_for_a_new_one() {
    require_tool("mkfs.ext4");
    // The data starts 1 MiB in (`--offset 2048`); the MiB before it keeps its ext4
    // superblock whatever the walk did after it. Whether a header file holding nothing
    // is a cut first write of this run is asked where the data starts: at byte 0 a
    // walked device still showed its filesystem, and the run encrypted twice.
    let (c, _) = Case::new(16, 5);
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(c.p("img")));
    let fs = c.p("fs");
    std::fs::write(&fs, vec![0u8; 15 << 20]).unwrap();
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&fs));
    let mut orig = std::fs::read(c.p("img")).unwrap();
    orig[1 << 20..].copy_from_slice(&std::fs::read(&fs).unwrap());
    std::fs::write(c.p("img"), &orig).unwrap();
    let with_offset = || {
        let mut cmd = detached_encrypt(&c);
        cmd.args(["--offset", "2048"]);
        cmd
    };
    run_ok(&mut with_offset());
    let walked = std::fs::read(c.p("img")).unwrap();
    assert!(walked[..1 << 20] == orig[..1 << 20] && walked[1 << 20..] != orig[1 << 20..]);
    let header = std::fs::read(c.p("hdr")).unwrap();
    // The header file emptied after the run (zeros, its length kept).
    std::fs::write(c.p("hdr"), vec![0u8; header.len()]).unwrap();
    let out = run(&mut with_offset());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1)
            && err.contains("shows no filesystem where its data starts")
            && err.contains("restore it from a copy"),
        "encrypt over the emptied header said: {err}"
    );
    assert_file_is(&c.p("img"), &walked, "the walked data was written again");
    // The header put back, the data decrypts to the plaintext (cryptsetup decrypts a
    // detached header's data only at offset 0).
    std::fs::write(c.p("hdr"), &header).unwrap();
    run_ok(&mut detached_decrypt(&c));
    assert_file_is(&c.p("img"), &orig, "decrypted data differs");
    // Over data that still shows its filesystem where it starts, the file is reused.
    std::fs::write(c.p("hdr"), vec![0u8; header.len()]).unwrap();
    run_ok(&mut with_offset());
    run_ok(&mut detached_decrypt(&c));
    assert_file_is(&c.p("img"), &orig, "second run differs");
}

/// Starts `cmd`, kills it with SIGKILL after `ms`, returns whether it had already exited.
fn kill_after(cmd: &mut Command, ms: u64) -> bool {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(ms));
    let done = child.try_wait().unwrap().is_some();
    let _ = child.kill();
    let _ = child.wait();
    done
}

/// Kills our detached-header run at pseudo-random instants; resumes with `resumer`.
fn crash_matrix(res: &str, points: u64, resume_with_cryptsetup: bool) {
    require_tool("cryptsetup");
    let mut x = 0x9e37_79b9u64 ^ res.len() as u64;
    let mut resumed = 0;
    let enc = |c: &Case| {
        let mut cmd = detached_encrypt_hz(c, "512");
        cmd.args(["--resilience", res, "--buffered"]);
        cmd
    };
    // Kill points are drawn over the header commits of an uncut run (progress,
    // not wall time: robust on a loaded machine), plus a few microseconds.
    let span = {
        let (c, _) = Case::new(32, 999);
        run_ok(&mut enc(&c));
        header_seqid(&c.p("hdr")).max(2)
    };
    for i in 0..points {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let (c, orig) = Case::new(32, i + 1);
        let (img, key, hdr) = (c.img(), c.key(), c.hdr());
        let at = x % span;
        let jitter = (x >> 20) % 3000;
        let ms = format!("commit {at} + {jitter} us");
        kill_after_commits(&mut enc(&c), &c.p("hdr"), 0, at, jitter);
        if !has_luks_header(&c.p("hdr")) {
            // Killed before the header existed: nothing may have been written, and
            // the same command run again (same header file) does the whole job.
            assert!(
                same(&std::fs::read(c.p("img")).unwrap(), &orig),
                "{res} point {i}: data written before the header"
            );
            if c.p("hdr").exists() {
                run_ok(&mut enc(&c));
                assert!(
                    same(&cryptsetup_decrypt_detached(&c), &orig),
                    "{res} point {i}: plaintext differs after encrypting again"
                );
            }
            continue;
        }
        let st = if resume_with_cryptsetup {
            // cryptsetup's procedure after a crash: recovery (`repair`) then resume.
            let rep = run(Command::new("cryptsetup").args([
                "repair",
                "-q",
                "--header",
                &hdr,
                "--key-file",
                &key,
                &img,
            ]));
            assert!(
                rep.status.success(),
                "{res} point {i}: cryptsetup repair: {}",
                String::from_utf8_lossy(&rep.stderr)
            );
            run(Command::new("cryptsetup").args([
                "reencrypt",
                "--resume-only",
                "--force-offline-reencrypt",
                "-q",
                "--header",
                &hdr,
                "--key-file",
                &key,
                &img,
            ]))
        } else {
            run(&mut luksify(&[
                "resume",
                &img,
                "--key-file",
                &key,
                "--header",
                &hdr,
            ]))
        };
        let err = String::from_utf8_lossy(&st.stderr).to_string();
        // A run killed after it finished leaves nothing to resume.
        assert!(
            st.status.success()
                || err.contains("no encryption in progress")
                || err.contains("not in reencryption")
                || err.contains("reencryption not in progress"),
            "{res} point {i} ({ms}): resume failed: {err}"
        );
        assert!(
            same(&cryptsetup_decrypt_detached(&c), &orig),
            "{res} point {i} ({ms}): plaintext differs"
        );
        resumed += 1;
    }
    // Guard against a vacuous pass (e.g. every run dying before its header).
    assert!(
        resumed * 2 >= points,
        "{res}: only {resumed} of {points} kill points got past header creation"
    );
}

#[test]
fn walker_sigkill_matrix_checksum_resumed_by_luksify() {
    crash_matrix("checksum", 20, false);
}

#[test]
fn walker_sigkill_matrix_journal_resumed_by_luksify() {
    crash_matrix("journal", 20, false);
}

#[test]
fn walker_sigkill_checksum_resumed_by_cryptsetup() {
    crash_matrix("checksum", 6, true);
}

#[test]
fn walker_sigkill_journal_resumed_by_cryptsetup() {
    crash_matrix("journal", 6, true);
}

/// cryptsetup killed at each of its last fsyncs (strace injects SIGKILL at the n-th
/// fsync, so the points are exact, not timed): among them the state where every data
/// segment is already new ("crypt, whole device") but the reencrypt keyslot is still
/// there. luksify once refused that state ("device smaller than u64::MAX bytes already
/// encrypted"); now it finishes the header and the data decrypts to the original.
#[test]
fn walker_resumes_cryptsetup_runs_killed_after_their_last_hotzone() {
    require_tool("cryptsetup");
    require_tool("strace");
    for res in ["checksum", "journal"] {
        let cs_args = |c: &Case| cryptsetup_encrypt_args(c, res);
        // How many fsyncs a whole run makes.
        let (c, _) = Case::new(16, 7);
        let log = c.p("strace.log").display().to_string();
        run_ok(
            Command::new("strace")
                .args(["-f", "-qq", "-e", "trace=fsync", "-o", &log])
                .args(cs_args(&c)),
        );
        let total = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .filter(|l| l.contains("fsync("))
            .count();
        assert!(
            total > 10,
            "{res}: only {total} fsyncs in a whole cryptsetup run"
        );
        let mut after_last_hotzone = 0;
        for n in total.saturating_sub(8)..=total {
            let (c, orig) = Case::new(16, 7);
            let inject = format!("inject=fsync:signal=SIGKILL:when={n}");
            let _ = Command::new("strace")
                .args([
                    "-f",
                    "-qq",
                    "-o",
                    "/dev/null",
                    "-e",
                    "trace=fsync",
                    "-e",
                    &inject,
                ])
                .args(cs_args(&c))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap();
            let mut dump = run(Command::new("cryptsetup").args(["luksDump", &c.hdr()]));
            if !dump.status.success() {
                // Killed inside its own header write, cryptsetup reads its header only
                // after its own recovery ("Device contains ambiguous signatures ...
                // run cryptsetup repair", seen once in CI): its procedure comes first,
                // before luksify is involved at all.
                let repaired = run(&mut luksify_tests::cryptsetup_detached(
                    &["repair"],
                    &c.hdr(),
                    &c.key(),
                    &c.img(),
                ));
                if !repaired.status.success() {
                    eprintln!(
                        "{res}, killed at fsync {n} of {total}: cryptsetup cannot read or repair its own header; not a state for luksify"
                    );
                    continue;
                }
                dump = run(Command::new("cryptsetup").args(["luksDump", &c.hdr()]));
            }
            let dump = String::from_utf8_lossy(&dump.stdout).to_string();
            let in_progress = dump.contains("online-reencrypt");
            if in_progress
                && !dump.contains("in-reencryption")
                && !dump.contains(": linear\n\toffset: 0 [bytes]\n\tlength: (whole device)\n\n")
                && dump.contains("  0: crypt\n\toffset: 0 [bytes]\n\tlength: (whole device)")
            {
                after_last_hotzone += 1;
            }
            if in_progress {
                let st = run(&mut detached_resume(&c));
                assert!(
                    st.status.success(),
                    "{res}, killed at fsync {n} of {total}: {}",
                    String::from_utf8_lossy(&st.stderr)
                );
            }
            assert!(
                same(&cryptsetup_decrypt_detached(&c), &orig),
                "{res}, killed at fsync {n} of {total}: plaintext differs"
            );
        }
        assert!(
            after_last_hotzone > 0,
            "{res}: no kill point landed between the last hotzone and the final header"
        );
    }
}

#[test]
fn walker_resumes_killed_cryptsetup_runs() {
    require_tool("cryptsetup");
    for (i, res) in ["checksum", "journal"].iter().enumerate() {
        let mut resumed = 0;
        for k in 0..4u64 {
            let (c, orig) = Case::new(64, 100 + k);
            let (img, key, hdr) = (c.img(), c.key(), c.hdr());
            kill_after(
                Command::new("cryptsetup").args(&cryptsetup_encrypt_args(&c, res)[1..]),
                60 + 90 * k + 30 * i as u64,
            );
            if !has_luks_header(&c.p("hdr")) {
                continue;
            }
            let st = run(&mut luksify(&[
                "resume",
                &img,
                "--key-file",
                &key,
                "--header",
                &hdr,
            ]));
            let err = String::from_utf8_lossy(&st.stderr).to_string();
            if !st.status.success() && err.contains("the encryption already finished") {
                // cryptsetup finished before the kill (a fast machine does 64 MiB in
                // a few hundred ms), and the volume decrypts; or it was cut after its
                // keyslot and before its reencryption metadata, which reads the same,
                // and the data is untouched (the message says both).
                assert!(
                    same(&std::fs::read(c.p("img")).unwrap(), &orig)
                        || same(&cryptsetup_decrypt_detached(&c), &orig),
                    "{res}/{k}: neither untouched nor decrypting to the original"
                );
                continue;
            }
            if !st.status.success()
                && (err.contains("no keyslot, and no run in progress")
                    || err.contains("no valid LUKS2 header copy"))
            {
                // cryptsetup died while still building its header (a plain LUKS2 header,
                // no reencrypt keyslot yet, or its first header write torn, which a
                // loaded machine's timing can hit): it has not touched the data, so the
                // device must still hold the original plaintext.
                assert!(
                    same(&std::fs::read(c.p("img")).unwrap(), &orig),
                    "{res}/{k}: data changed before cryptsetup's metadata existed"
                );
                continue;
            }
            assert!(st.status.success(), "{res}/{k}: {err}");
            assert!(
                same(&cryptsetup_decrypt_detached(&c), &orig),
                "{res}/{k}: plaintext differs"
            );
            resumed += 1;
        }
        // Kill times are wall-clock: some must land mid-walk, or nothing was tested.
        assert!(
            resumed > 0,
            "{res}: no kill landed inside cryptsetup's walk"
        );
    }
}

#[test]
fn walker_ciphertext_equals_cryptsetup_with_same_volume_key() {
    require_tool("cryptsetup");
    let (a, _) = Case::new(16, 42);
    let (b, _) = Case::new(16, 42);
    std::fs::write(a.p("vk"), (0..64u8).map(|i| i ^ 0x5a).collect::<Vec<u8>>()).unwrap();
    let vk = a.p("vk").display().to_string();
    run_ok(
        luksify(&[
            "encrypt",
            &a.img(),
            "--key-file",
            &a.key(),
            "--header",
            &a.hdr(),
            "--volume-key-file",
            &vk,
        ])
        .args(FAST),
    );
    run_ok(Command::new("cryptsetup").args([
        "reencrypt",
        "--encrypt",
        "-q",
        "--header",
        &b.hdr(),
        "--key-file",
        &b.key(),
        "--volume-key-file",
        &vk,
        "--key-size",
        "512",
        "--sector-size",
        "512",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        &b.img(),
    ]));
    assert!(
        same(
            &std::fs::read(a.p("img")).unwrap(),
            &std::fs::read(b.p("img")).unwrap()
        ),
        "ciphertext differs from cryptsetup's"
    );
}

/// `cryptsetup luksDump` of a header without what differs between two formats of the
/// same options: the epoch (commit count), salts and digest values (random).
fn dump_without_random(hdr: &std::path::Path) -> String {
    luks_dump(hdr)
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            !(l.starts_with("Epoch:")
                || t.starts_with("Salt:")
                || t.starts_with("Digest:")
                // continuation lines of the hex dumps above
                || l.starts_with("\t            "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `luksify encrypt` takes `luksify format`'s header options, with cryptsetup's names:
/// cipher, key size, sector size, hash, KDF (pbkdf2 and argon2id with its memory and
/// threads), label, subsystem, UUID, metadata and keyslots sizes, data offset (and
/// cryptsetup's `--resilience-hash`). Four runs cover them all: a detached journal
/// whose keyslots area leaves room for one 128 KiB journal (hotzones of 128 KiB, single
/// area), a detached checksum run, a header in front with its own sizes, and a detached
/// journal with `--offset` (the first 2 MiB stay plaintext; the keyslots area is what
/// the offset leaves, as cryptsetup sizes it), and a header in front with `--offset`
/// (half the reduction asked for: the reduction becomes twice the offset, and a keyslots
/// area larger than the offset leaves is decreased). For each:
/// - `cryptsetup reencrypt --encrypt` with the same options and volume key writes the
///   same ciphertext, and cryptsetup's luksDump of both headers is the same but for salts,
///   digests and the epoch (the final keyslots area fills the room up to the data, as
///   cryptsetup leaves it, whatever --luks2-keyslots-size asked for);
/// - with a header in front, no 512-byte sector of the device's original first 4 MiB
///   is left in plaintext anywhere on it;
/// - runs killed at an fdatasync mid-walk are finished by cryptsetup (`repair`,
///   `--resume-only`) and by `luksify resume`, each giving cryptsetup's ciphertext.
#[test]
fn walker_encrypt_takes_format_options_as_cryptsetup_does() {
    require_tool("cryptsetup");
    require_tool("strace");
    let vk = |c: &Case, bits: usize| {
        let v: Vec<u8> = (0..bits / 8)
            .map(|i| (i as u8).wrapping_mul(7) ^ 0x3c)
            .collect();
        std::fs::write(c.p("vk"), v).unwrap();
        c.p("vk").display().to_string()
    };
    struct Variant {
        name: &'static str,
        place: &'static [&'static str],
        opts: &'static [&'static str],
        bits: usize,
        kill_at: u64,
    }
    let variants = [
        Variant {
            name: "journal",
            place: &["--resilience", "journal"],
            opts: &[
                "-c",
                "aes-xts-plain",
                "-s",
                "256",
                "--sector-size",
                "4096",
                "--hash",
                "sha512",
                "--luks2-metadata-size",
                "65536",
                "--luks2-keyslots-size",
                "262144",
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                "--label",
                "lbl-j",
                "--subsystem",
                "sub-j",
                "--uuid",
                "7f1c2d3e-4b5a-4f6e-8d7c-9a0b1c2d3e4f",
            ],
            bits: 256,
            kill_at: 40,
        },
        Variant {
            name: "checksum",
            place: &["--resilience", "checksum", "--hotzone-kib", "1024"],
            opts: &[
                "-c",
                "aes-xts-plain64be",
                "--key-size",
                "512",
                "--sector-size",
                "1024",
                "--hash",
                "sha1",
                "--luks2-keyslots-size",
                "1048576",
                "--pbkdf",
                "argon2id",
                "--pbkdf-force-iterations",
                "4",
                "--pbkdf-memory",
                "32768",
                "--pbkdf-parallel",
                "1",
                "--resilience-hash",
                "sha512",
                "--label",
                "lbl-c",
                "--uuid",
                "2b0c3f0e-5d2a-4c4e-9a53-0c8f1d1e7a11",
            ],
            bits: 512,
            kill_at: 12,
        },
        Variant {
            name: "in front",
            place: &["--reduce-device-size", "8M"],
            opts: &[
                "-c",
                "aes-xts-plain64",
                "--sector-size",
                "4096",
                "--hash",
                "sha256",
                "--luks2-metadata-size",
                "32768",
                "--luks2-keyslots-size",
                "1048576",
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                "--label",
                "lbl-d",
                "--uuid",
                "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
            ],
            bits: 512,
            kill_at: 6,
        },
        Variant {
            name: "offset in front",
            place: &["--reduce-device-size", "16M"],
            opts: &[
                "--offset",
                "8192",
                "--luks2-keyslots-size",
                "8388608",
                "--uuid",
                "6a7b8c9d-0e1f-4a2b-8c3d-4e5f6a7b8c9d",
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
            ],
            bits: 512,
            kill_at: 6,
        },
        Variant {
            name: "offset",
            place: &["--resilience", "journal"],
            opts: &[
                "--offset",
                "4096",
                "--uuid",
                "5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b",
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
            ],
            bits: 512,
            kill_at: 12,
        },
    ];
    for v in &variants {
        let front = v.place[0] == "--reduce-device-size";
        // luksify's options: cryptsetup's, less the walker's own hotzone tuning.
        let cs_place: Vec<&str> = v.place.iter().copied().take(2).collect();
        let ours = |c: &Case| {
            let mut cmd = luksify(&["encrypt", &c.img(), "--key-file", &c.key()]);
            if !front {
                cmd.args(["--header", &c.hdr()]);
            }
            cmd.args(v.place)
                .args(v.opts)
                .args(["--volume-key-file", &vk(c, v.bits)]);
            cmd
        };
        // Where the header is, and the ciphertext's bytes (in front: the data segment,
        // [shift, shift + data size), shift = 4 MiB of the 16 MiB image).
        let hdr = |c: &Case| if front { c.p("img") } else { c.p("hdr") };
        let data = |c: &Case| {
            let d = std::fs::read(c.p("img")).unwrap();
            if front {
                d[4 << 20..12 << 20].to_vec()
            } else {
                d
            }
        };
        let (a, orig) = Case::new(16, 31);
        let out = run_ok(&mut ours(&a));
        // The offset halves the reduction to 8 MiB (said), and the keyslots area asked
        // for is decreased to what the 4 MiB offset leaves, with cryptsetup's warning.
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            v.name != "offset in front"
                || (said.contains("WARNING: LUKS2 keyslots area size changed to 4161536 bytes.")
                    && said.contains("adjusting --reduce-device-size to 8388608 bytes")),
            "{}: no warning of the decreased keyslots area: {}",
            v.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let (b, _) = Case::new(16, 31);
        let mut cs = Command::new("cryptsetup");
        cs.args(["reencrypt", "--encrypt", "-q", "--force-offline-reencrypt"])
            .args(["--key-file", &b.key()]);
        if !front {
            cs.args(["--header", &b.hdr()]);
        }
        cs.args(&cs_place)
            .args(v.opts)
            .args(["--volume-key-file", &vk(&b, v.bits), &b.img()]);
        run_ok(&mut cs);
        let want = data(&b);
        assert!(
            want != orig[..want.len()] && same(&data(&a), &want),
            "{}: ciphertext differs from cryptsetup's",
            v.name
        );
        let (da, db) = (dump_without_random(&hdr(&a)), dump_without_random(&hdr(&b)));
        assert_eq!(da, db, "{}: luksDump differs from cryptsetup's", v.name);
        if front {
            // No sector of the device's first 4 MiB (the shift) is left in plaintext:
            // neither the copy moved to the end nor what lay between the keyslots area
            // asked for and the data offset (cryptsetup 2.6.1 leaves the latter).
            let head: std::collections::HashSet<&[u8]> = orig[..4 << 20]
                .chunks(512)
                .filter(|s| s.iter().any(|b| *b != 0))
                .collect();
            let img = std::fs::read(a.p("img")).unwrap();
            let left = img.chunks(512).position(|s| head.contains(s));
            assert!(
                left.is_none(),
                "{}: plaintext of the original head left at byte {:?}",
                v.name,
                left.map(|i| i * 512)
            );
        }
        // Killed mid-walk, finished by cryptsetup and by luksify. Four consecutive fdatasyncs: every step of a hotzone's cycle (protection
        // durable, previous data durable, commit, data), so some cut leaves a hotzone
        // named hot with its data unwritten, which only its checksums or journal
        // recover.
        for (at, by_cryptsetup) in (v.kill_at..v.kill_at + 4).flat_map(|n| [(n, true), (n, false)])
        {
            let (c, _) = Case::new(16, 31);
            let cut = kill_at_fdatasync(&ours(&c), at);
            assert!(
                !cut.status.success(),
                "{}: not killed at fdatasync {}",
                v.name,
                at
            );
            let dump = luks_dump(&hdr(&c));
            assert!(
                dump.contains("online-reencrypt"),
                "{}: killed at fdatasync {} outside the walk",
                v.name,
                at
            );
            // The checksum area's hash is --resilience-hash's (the keyslot's is sha1).
            assert!(
                v.name != "checksum" || dump.contains("Hash:       sha512"),
                "checksum: area hash is not sha512:\n{dump}"
            );
            let mut h = vec![];
            if !front {
                h = vec!["--header".to_string(), c.hdr()];
            }
            if by_cryptsetup {
                // Recovering a cut last hotzone finishes the run: nothing to resume.
                if cryptsetup_finishes(&c, &h, &hdr(&c)) {
                    assert!(
                        same(&data(&c), &want),
                        "{}: repair finished it wrong",
                        v.name
                    );
                    continue;
                }
            } else {
                run_ok(luksify(&["resume", &c.img(), "--key-file", &c.key()]).args(&h));
            }
            assert!(
                same(&data(&c), &want),
                "{} killed at fdatasync {}, finished by {}: ciphertext differs from cryptsetup's",
                v.name,
                at,
                if by_cryptsetup {
                    "cryptsetup"
                } else {
                    "luksify"
                }
            );
        }
    }
}

/// cryptsetup's checksum runs with another `--resilience-hash` killed mid-walk are
/// finished by `luksify resume` (recovery compares each block with the area's digests
/// of that hash) and decrypt to the original: every hash cryptsetup's OpenSSL backend
/// takes there. Before, luksify refused every checksum area but sha256 over
/// 4096-byte blocks, and later every hash but SHA-1 and SHA-2 (whirlpool, sha3-256,
/// blake2b-512, ... runs were cryptsetup's alone to finish). The reverse is
/// `walker_cryptsetup_finishes_our_checksum_runs_with_other_hashes`.
#[test]
fn walker_resumes_cryptsetup_checksum_runs_with_other_hashes() {
    require_tool("cryptsetup");
    require_tool("strace");
    for (i, hash) in other_hashes().enumerate() {
        let (c, orig) = Case::new(16, 60 + i as u64);
        let mut cs = Command::new("cryptsetup");
        let args = cryptsetup_encrypt_args(&c, "checksum");
        cs.args(&args[1..args.len() - 1])
            .args(["--resilience-hash", hash])
            .arg(c.img());
        kill_at_fdatasync(&cs, 12);
        let dump = luks_dump(&c.p("hdr"));
        assert!(
            dump.contains("online-reencrypt") && dump.contains(&format!("Hash:       {hash}")),
            "{hash}: not killed mid-walk with a {hash} area:\n{dump}"
        );
        run_ok(&mut detached_resume(&c));
        assert!(
            same(&cryptsetup_decrypt_detached(&c), &orig),
            "{hash}: plaintext differs"
        );
    }
}

/// cryptsetup finishes an interrupted run of `c` (`h`: its `--header` arguments, if
/// any; `meta`: where its header is): `repair`, then `reencrypt --resume-only` unless
/// the repair's recovery of a cut last hotzone finished it. Whether repair finished it.
fn cryptsetup_finishes(c: &Case, h: &[String], meta: &std::path::Path) -> bool {
    run_ok(
        Command::new("cryptsetup")
            .args(["repair", "-q", "--key-file", &c.key()])
            .args(h)
            .arg(c.img()),
    );
    if !luks_dump(meta).contains("online-reencrypt") {
        return true;
    }
    run_ok(
        Command::new("cryptsetup")
            .args([
                "reencrypt",
                "--resume-only",
                "--force-offline-reencrypt",
                "-q",
            ])
            .args(["--key-file", &c.key()])
            .args(h)
            .arg(c.img()),
    );
    false
}

/// Checksum-area hashes other than sha256 (the default), as cryptsetup 2.6.1 names them.
fn other_hashes() -> impl Iterator<Item = &'static str> {
    luksify_tests::CRYPTSETUP_HASHES
        .into_iter()
        .filter(|h| *h != "sha256")
}

/// The reverse of `walker_resumes_cryptsetup_checksum_runs_with_other_hashes`: a
/// `luksify encrypt --resilience-hash H` killed mid-walk has an area of H digests that
/// cryptsetup's `repair` and `reencrypt --resume-only` finish, and the volume decrypts
/// to the original.
#[test]
fn walker_cryptsetup_finishes_our_checksum_runs_with_other_hashes() {
    require_tool("cryptsetup");
    require_tool("strace");
    for (i, hash) in other_hashes().enumerate() {
        let (c, orig) = Case::new(16, 80 + i as u64);
        let mut ours = luksify(&["encrypt", &c.img(), "--key-file", &c.key()]);
        ours.args(["--header", &c.hdr(), "--resilience", "checksum"])
            .args(["--hotzone-kib", "1024", "--resilience-hash", hash])
            .args(FAST);
        let cut = kill_at_fdatasync(&ours, 12);
        assert!(!cut.status.success(), "{hash}: not killed");
        let dump = luks_dump(&c.p("hdr"));
        assert!(
            dump.contains("online-reencrypt") && dump.contains(&format!("Hash:       {hash}")),
            "{hash}: not killed mid-walk with a {hash} area:\n{dump}"
        );
        cryptsetup_finishes(&c, &["--header".to_string(), c.hdr()], &c.p("hdr"));
        assert!(
            same(&cryptsetup_decrypt_detached(&c), &orig),
            "{hash}: plaintext differs after cryptsetup finished our run"
        );
    }
}

/// Header options that cannot work are refused in one line before anything is written,
/// and leave no header file behind (it would block the next attempt).
#[test]
fn walker_refuses_header_options_that_do_not_fit_without_writing() {
    let cases: [(&[&str], &str); 8] = [
        (
            &["--header", "H", "--luks2-keyslots-size", "258048"],
            "use --luks2-keyslots-size 262144 or more",
        ),
        (
            &[
                "--header",
                "H",
                "-s",
                "256",
                "--luks2-keyslots-size",
                "131072",
            ],
            "use --luks2-keyslots-size 135168 or more",
        ),
        (
            &["--header", "H", "--luks2-keyslots-size", "1000"],
            "use a multiple of 4096",
        ),
        (
            &[
                "--reduce-device-size",
                "2M",
                "--luks2-metadata-size",
                "1048576",
            ],
            "use --reduce-device-size 5M",
        ),
        (
            &["--reduce-device-size", "2M", "--offset", "4096"],
            "use --offset 2048 or less",
        ),
        (&["--header", "H", "--uuid", "nope"], "is not a UUID"),
        (
            &["--header", "H", "--offset", "8"],
            "smaller than the two 16384-byte metadata copies",
        ),
        (
            &["--header", "H", "--luks2-metadata-size", "20000"],
            "is not a LUKS2 size",
        ),
    ];
    for (args, needle) in cases {
        let (c, orig) = Case::new(16, 77);
        let hdr = c.hdr();
        let args: Vec<&str> = args
            .iter()
            .map(|a| if *a == "H" { hdr.as_str() } else { a })
            .collect();
        let out = run(luksify(&["encrypt", &c.img(), "--key-file", &c.key()])
            .args(&args)
            .args(FAST));
        assert_refused_in_one_line(&out, needle, &args.join(" "));
        assert!(
            same(&std::fs::read(c.p("img")).unwrap(), &orig),
            "{args:?}: image changed"
        );
        assert!(!c.p("hdr").exists(), "{args:?}: header file left behind");
    }
}

#[test]
fn walker_datashift_ext4_opens_with_cryptsetup_and_decrypts() {
    require_tool("cryptsetup");
    require_tool("mkfs.ext4");
    let (c, _) = Case::new(96, 5);
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", &c.img(), "64M"]));
    let orig = std::fs::read(c.p("img")).unwrap();
    run_ok(
        luksify(&[
            "encrypt",
            &c.img(),
            "--key-file",
            &c.key(),
            "--reduce-device-size",
            "32M",
        ])
        .args(FAST),
    );
    cryptsetup_unlocks(&c);
    // cryptsetup 2.6 decrypts an attached-header volume in place (datashift decryption).
    let vkf = c.p("vk").display().to_string();
    run_ok(Command::new("cryptsetup").args([
        "luksDump",
        "-q",
        "--dump-volume-key",
        "--volume-key-file",
        &vkf,
        "--key-file",
        &c.key(),
        &c.img(),
    ]));
    let vk = std::fs::read(c.p("vk")).unwrap();
    let enc = std::fs::read(c.p("img")).unwrap();
    let cipher = luksify_cipher::SectorCipher::new("aes-xts-plain64", &vk, 512).unwrap();
    let data_size = (96 << 20) - (32 << 20);
    let mut plain = enc[16 << 20..(16 << 20) + data_size].to_vec();
    cipher.decrypt(&mut plain, 0).unwrap();
    assert!(
        same(&plain, &orig[..data_size]),
        "datashift plaintext differs"
    );
}

/// The issue's memory bound: peak RSS <= 64 MiB at the default settings whatever the
/// device size. Each mode encrypts a 96 MiB and a 640 MiB image (6.7x the size, and
/// both past one hotzone plus the buffer pool); both peaks must be under the bound,
/// and the big one may not exceed the small one by more than a few MiB (memory that
/// grows with the device would show here long before it reached 64 MiB on a test
/// image). Default tuning: no --chunk-mib/--hotzone-kib.
#[test]
fn walker_peak_memory_is_bounded_whatever_the_device_size() {
    const BOUND_KIB: u64 = 64 << 10;
    const GROWTH_KIB: u64 = 4 << 10;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, b"walker test passphrase").unwrap();
    let key = key.display().to_string();
    for mode in ["checksum", "journal", "none", "datashift"] {
        let mut peaks = Vec::new();
        for mib in [96u64, 640] {
            let img = dir.path().join(format!("{mode}-{mib}.img"));
            let hdr = dir.path().join(format!("{mode}-{mib}.hdr"));
            sparse_file(&img, mib << 20);
            let (img_s, hdr_s) = (img.display().to_string(), hdr.display().to_string());
            let mut cmd = luksify(&["encrypt", &img_s, "--key-file", &key]);
            if mode == "datashift" {
                cmd.args(["--reduce-device-size", "32M"]);
            } else {
                cmd.args(["--header", &hdr_s, "--resilience", mode]);
            }
            let (ok, kib) = run_peak_rss_kib(cmd.args(FAST));
            assert!(ok, "{mode} encryption of {mib} MiB failed: {cmd:?}");
            assert!(
                has_luks_header(if mode == "datashift" { &img } else { &hdr }),
                "{mode}: no LUKS header after encrypting {mib} MiB"
            );
            assert!(
                kib <= BOUND_KIB,
                "{mode}, {mib} MiB device: peak RSS {kib} KiB > {BOUND_KIB} KiB"
            );
            peaks.push(kib);
            std::fs::remove_file(&img).unwrap();
            let _ = std::fs::remove_file(&hdr);
        }
        assert!(
            peaks[1] <= peaks[0] + GROWTH_KIB,
            "{mode}: peak RSS grew with the device: {} KiB at 96 MiB, {} KiB at 640 MiB",
            peaks[0],
            peaks[1]
        );
        eprintln!(
            "{mode}: peak RSS {} KiB (96 MiB), {} KiB (640 MiB)",
            peaks[0], peaks[1]
        );
    }
}

#[test]
fn walker_refuses_bad_input_without_writing() {
    require_tool("mkfs.ext4");
    // A filesystem reaching into the shift area.
    let (c, _) = Case::new(64, 9);
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", &c.img()]));
    let before = std::fs::read(c.p("img")).unwrap();
    let out = shifted(&c, "32M");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("shrink the filesystem"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        same(&std::fs::read(c.p("img")).unwrap(), &before),
        "bytes changed after refusal"
    );
    // Device smaller than header plus shift.
    let (s, orig) = Case::new(2, 9);
    let out = shifted(&s, "32M");
    assert_refused_in_one_line(&out, "too small", "device smaller than header plus shift");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--header FILE (nothing was written)"));
    assert!(same(&std::fs::read(s.p("img")).unwrap(), &orig));
    // A shift below one 8 KiB unit (it read a marker at an unaligned offset and failed
    // with "failed to fill whole buffer").
    for tiny in ["512", "2K", "6K"] {
        let out = shifted(&c, tiny);
        assert_refused_in_one_line(&out, "must be a non-zero multiple of 8 KiB", tiny);
        assert!(
            same(&std::fs::read(c.p("img")).unwrap(), &before),
            "bytes changed after refusal"
        );
    }
    // Neither --header nor --reduce-device-size: a usage error (exit 1, as cryptsetup's
    // "wrong parameters"; 2 is a wrong passphrase only).
    {
        let out = run(luksify(&["encrypt", &c.img(), "--key-file", &c.key()]).args(FAST));
        assert_refused_in_one_line(&out, "say where the header goes", "no placement");
        assert_eq!(out.status.code(), Some(1));
        assert!(
            same(&std::fs::read(c.p("img")).unwrap(), &before),
            "bytes changed after refusal"
        );
    }
    // resume with an empty --header file: the file is named as the broken part, on one
    // line, and nothing is written.
    std::fs::write(s.p("empty.hdr"), b"").unwrap();
    let out = run(&mut luksify(&[
        "resume",
        &s.img(),
        "--key-file",
        &s.key(),
        "--header",
        s.p("empty.hdr").to_str().unwrap(),
    ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("header file")
            && err.contains("empty.hdr")
            && err.trim_end().lines().count() == 1,
        "{err}"
    );
    assert!(same(&std::fs::read(s.p("img")).unwrap(), &orig));
    // Already LUKS.
    let (l, _) = Case::new(24, 3);
    run_ok(
        luksify(&[
            "encrypt",
            &l.img(),
            "--key-file",
            &l.key(),
            "--reduce-device-size",
            "4M",
        ])
        .args(FAST),
    );
    let before = std::fs::read(l.p("img")).unwrap();
    let out = run(luksify(&[
        "encrypt",
        &l.img(),
        "--key-file",
        &l.key(),
        "--reduce-device-size",
        "4M",
    ])
    .args(FAST));
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("already holds a LUKS header")
    );
    assert!(same(&std::fs::read(l.p("img")).unwrap(), &before));
    // Wrong passphrase on resume of an interrupted (initialised) run.
    let (w, _) = Case::new(24, 4);
    run_ok(Command::new("cryptsetup").args([
        "reencrypt",
        "--encrypt",
        "--init-only",
        "-q",
        "--header",
        &w.hdr(),
        "--key-file",
        &w.key(),
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        &w.img(),
    ]));
    std::fs::write(w.p("bad"), b"not the passphrase").unwrap();
    let (img_b, hdr_b) = (
        std::fs::read(w.p("img")).unwrap(),
        std::fs::read(w.p("hdr")).unwrap(),
    );
    let bad = w.p("bad").display().to_string();
    let out = run(&mut luksify(&[
        "resume",
        &w.img(),
        "--key-file",
        &bad,
        "--header",
        &w.hdr(),
    ]));
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("passphrase"));
    assert!(
        same(&std::fs::read(w.p("img")).unwrap(), &img_b)
            && same(&std::fs::read(w.p("hdr")).unwrap(), &hdr_b)
    );
    // Device size changed between runs (datashift): interrupted init, then grown.
    let (g, _) = Case::new(48, 6);
    run_ok(Command::new("cryptsetup").args([
        "reencrypt",
        "--encrypt",
        "--init-only",
        "-q",
        "--reduce-device-size",
        "8M",
        "--key-file",
        &g.key(),
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        &g.img(),
    ]));
    std::fs::OpenOptions::new()
        .write(true)
        .open(g.p("img"))
        .unwrap()
        .set_len(52 << 20)
        .unwrap();
    let before = std::fs::read(g.p("img")).unwrap();
    let out = run(&mut luksify(&["resume", &g.img(), "--key-file", &g.key()]));
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("resized"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(same(&std::fs::read(g.p("img")).unwrap(), &before));
    // Shrunk below what a detached run has reached: forward (luksify's encryption)
    // and backward (cryptsetup's in-place decryption, walked and cut by luksify).
    for decrypt in [false, true] {
        let (d, _) = Case::new(32, 7);
        if decrypt {
            run_ok(&mut detached_encrypt(&d));
            run_ok(Command::new("cryptsetup").args([
                "reencrypt",
                "--decrypt",
                "--init-only",
                "-q",
                "--force-offline-reencrypt",
                "--header",
                &d.hdr(),
                "--key-file",
                &d.key(),
                &d.img(),
            ]));
            let mut resume = detached_resume(&d);
            resume.args(SMALL);
            kill_at_fdatasync(&resume, 12);
        } else {
            kill_at_fdatasync(&detached_encrypt(&d), 12);
        }
        let dump = luks_dump(&d.p("hdr"));
        assert!(dump.contains("online-reencrypt"), "not cut mid-run: {dump}");
        // Forward: keep less than what is done; backward: cut into what is done.
        let keep = if decrypt { 28 << 20 } else { 1 << 20 };
        std::fs::OpenOptions::new()
            .write(true)
            .open(d.p("img"))
            .unwrap()
            .set_len(keep)
            .unwrap();
        let (img0, hdr0) = (
            std::fs::read(d.p("img")).unwrap(),
            std::fs::read(d.p("hdr")).unwrap(),
        );
        let out = run(&mut detached_resume(&d));
        assert_refused_in_one_line(&out, "or it was shrunk", "resume of a shrunk image");
        assert_file_is(&d.p("img"), &img0, "the shrunk image was written");
        assert_file_is(&d.p("hdr"), &hdr0, "the header was written");
    }
}

/// An encryption sector larger than the filesystem's blocks is refused before anything is
/// written, as cryptsetup refuses it ("Requested --sector-size 4096 is incompatible with
/// ext4 superblock (block size: 1024 bytes)"): ext4 with 1 KiB blocks and xfs with
/// 512-byte sectors, detached header and data shift. Where the blocks are as large as
/// the sector it encrypts, and cryptsetup opens the result.
#[test]
fn walker_refuses_a_sector_size_larger_than_the_filesystem_blocks() {
    require_tool("cryptsetup");
    require_tool("mkfs.ext4");
    require_tool("mkfs.xfs");
    // Image size in MiB, mkfs, and its arguments after the image (xfs needs 300 MiB).
    let mkfs: [(usize, &str, &[&str], &[&str]); 2] = [
        (64, "mkfs.ext4", &["-q", "-F", "-b", "1024"], &["32M"]),
        (
            340,
            "mkfs.xfs",
            &["-q", "-f", "-s", "size=512", "-d", "size=300m"],
            &[],
        ),
    ];
    for (mib, tool, args, tail) in mkfs {
        for detached in [false, true] {
            let what = format!("{tool} {args:?}, detached {detached}");
            let (c, _) = Case::new(mib, 12);
            run_ok(Command::new(tool).args(args).arg(c.img()).args(tail));
            let before = std::fs::read(c.p("img")).unwrap();
            let place: Vec<String> = if detached {
                vec!["--header".into(), c.hdr()]
            } else {
                vec!["--reduce-device-size".into(), "32M".into()]
            };
            let place: Vec<&str> = place.iter().map(String::as_str).collect();
            let out = run(luksify(&["encrypt", &c.img(), "--key-file", &c.key()])
                .args(&place)
                .args(["--sector-size", "4096"])
                .args(FAST));
            // xfs's 512 is its sector size, not its block size (trial N2).
            let unit = if tool == "mkfs.xfs" {
                "512-byte sectors of"
            } else {
                "1024-byte blocks of"
            };
            assert_refused_in_one_line(
                &out,
                &format!("--sector-size 4096 is larger than the {unit}"),
                &what,
            );
            assert!(
                same(&std::fs::read(c.p("img")).unwrap(), &before) && !c.p("hdr").exists(),
                "{what}: written after the refusal"
            );
            // The oracle refuses the same input.
            let cs = run(Command::new("cryptsetup")
                .args(["reencrypt", "--encrypt", "-q", "--key-file", &c.key()])
                .args(&place)
                .args(["--sector-size", "4096"])
                .args(["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"])
                .arg(c.img()));
            assert!(
                !cs.status.success()
                    && String::from_utf8_lossy(&cs.stderr).contains("is incompatible with"),
                "{what}: cryptsetup: {}",
                String::from_utf8_lossy(&cs.stderr)
            );
        }
    }
    // 4 KiB ext4 blocks take 4 KiB sectors.
    let (c, _) = Case::new(64, 13);
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", "-b", "4096", &c.img(), "32M"]));
    run_ok(
        luksify(&["encrypt", &c.img(), "--key-file", &c.key()])
            .args(["--reduce-device-size", "32M", "--sector-size", "4096"])
            .args(FAST),
    );
    cryptsetup_unlocks(&c);
}

/// `--key-file` of `encrypt`, `resume` and `decrypt` is read as cryptsetup reads it (and
/// as `luksify format` reads it): an empty file is refused by encrypt in one line before
/// anything is written, not set as an empty passphrase, and tried as the empty
/// passphrase by decrypt (which then fails as a wrong one); /dev/null, which gives
/// nothing, is refused (cryptsetup: "Nothing to read on input"); a missing one is named;
/// `-` is standard input, whole, newlines included, and cryptsetup unlocks the volume
/// with the same bytes from a file.
#[test]
fn walker_key_file_is_read_as_cryptsetup_reads_it() {
    require_tool("cryptsetup");
    let (c, orig) = Case::new(16, 95);
    let (img, hdr) = (c.img(), c.hdr());
    let empty = c.p("empty-key");
    std::fs::write(&empty, b"").unwrap();
    let empty = empty.to_str().unwrap().to_string();
    for (key, needle) in [
        (empty.as_str(), "is empty"),
        // A device that gives nothing is refused as cryptsetup refuses it.
        ("/dev/null", "nothing to read from key file /dev/null"),
        ("/nonexistent/key", "cannot open key file /nonexistent/key"),
    ] {
        for args in [
            &["encrypt", &img, "--key-file", key, "--header", &hdr][..],
            &[
                "encrypt",
                &img,
                "--key-file",
                key,
                "--reduce-device-size",
                "4M",
            ][..],
        ] {
            let out = run(luksify(args).args(FAST));
            assert_refused_in_one_line(&out, needle, &format!("{args:?}"));
            assert_file_is(&c.p("img"), &orig, &format!("{args:?}: image changed"));
            assert!(!c.p("hdr").exists(), "{args:?}: a header file was left");
        }
    }
    let pass = b"two\nlines of passphrase\n";
    std::fs::write(c.p("key"), pass).unwrap();
    let mut enc = luksify(&["encrypt", &img, "--key-file", "-", "--header", &hdr]);
    enc.args(FAST).args(SMALL).stdin(Stdio::piped());
    let mut child = enc.stdout(Stdio::null()).spawn().unwrap();
    {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(pass).unwrap();
    }
    assert!(
        child.wait().unwrap().success(),
        "encrypt with the key on stdin"
    );
    run_ok(Command::new("cryptsetup").args([
        "open",
        "--test-passphrase",
        "--key-file",
        &c.key(),
        "--header",
        &hdr,
        &img,
    ]));
    // An empty key file on decrypt is the empty passphrase, which opens nothing here:
    // refused before the header is touched.
    let hdr0 = std::fs::read(c.p("hdr")).unwrap();
    let out = run(&mut luksify(&[
        "decrypt",
        &img,
        "--key-file",
        &empty,
        "--header",
        &hdr,
    ]));
    assert_refused_in_one_line(&out, "no keyslot accepts", "decrypt with an empty key file");
    assert_file_is(
        &c.p("hdr"),
        &hdr0,
        "decrypt with an empty key file: header changed",
    );
    run_ok(&mut detached_decrypt(&c));
    assert_file_is(&c.p("img"), &orig, "plaintext differs");
}

/// A wrong passphrase exits 2 from `resume` and `decrypt`, as from cryptsetup's
/// `reencrypt` and `open` (they exited 1, which the README gives to every other
/// failure), and writes nothing.
#[test]
fn walker_a_wrong_passphrase_exits_2_as_cryptsetup() {
    require_tool("cryptsetup");
    let (c, orig) = Case::new(16, 96);
    let (img, hdr) = (c.img(), c.hdr());
    let bad = c.p("bad-key");
    std::fs::write(&bad, b"not the passphrase").unwrap();
    let bad = bad.to_str().unwrap().to_string();
    // An interrupted run: cryptsetup's, set up and not begun.
    run_ok(
        Command::new("cryptsetup")
            .args(["reencrypt", "--encrypt", "--init-only", "-q", "--key-file"])
            .args([&c.key(), "--header", &hdr, &img])
            .args(["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]),
    );
    let hdr0 = std::fs::read(&hdr).unwrap();
    let out = run(&mut luksify(&[
        "resume",
        &img,
        "--key-file",
        &bad,
        "--header",
        &hdr,
    ]));
    assert_eq!(out.status.code(), Some(2), "resume: {out:?}");
    assert_refused_in_one_line(&out, "no keyslot accepts", "resume");
    assert_file_is(c.p("hdr").as_path(), &hdr0, "resume: header changed");
    assert_file_is(c.p("img").as_path(), &orig, "resume: image changed");
    run_ok(&mut detached_resume(&c));
    let ciphertext = std::fs::read(&img).unwrap();
    let out = run(&mut luksify(&[
        "decrypt",
        &img,
        "--key-file",
        &bad,
        "--header",
        &hdr,
    ]));
    assert_eq!(out.status.code(), Some(2), "decrypt: {out:?}");
    assert_file_is(c.p("img").as_path(), &ciphertext, "decrypt wrote");
    run_ok(&mut detached_decrypt(&c));
    assert_file_is(c.p("img").as_path(), &orig, "plaintext differs");
}

/// `encrypt --header H` where H already holds something says what it holds, and only an
/// interrupted run gets the advice to resume: a finished volume's header (this image's
/// or another's) is named with its UUID, and for this image "encrypted already"; other
/// bytes are "other data". Nothing is written either way. Every case used to say "to
/// continue an interrupted run use `luksify resume`", which on a finished header of
/// another image said "encryption finished" about the wrong volume.
#[test]
fn walker_an_existing_header_file_is_named_by_what_it_holds() {
    let (done, _) = Case::new(8, 31);
    run_ok(&mut detached_encrypt(&done));
    let uuid = {
        let d = luks_dump(&done.p("hdr"));
        d.lines()
            .find_map(|l| l.strip_prefix("UUID:"))
            .unwrap()
            .trim()
            .to_string()
    };
    // Another image, a finished volume's header.
    let (c, orig) = Case::new(8, 32);
    let hdr0 = std::fs::read(done.p("hdr")).unwrap();
    let out = run(encrypt_into(&c, &done.hdr()).args(FAST));
    assert_refused_in_one_line(
        &out,
        "holds the header of a finished LUKS2 volume",
        "another's header",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&uuid) && !err.contains("resume"), "{err}");
    assert_file_is(&c.p("img"), &orig, "another's header: data touched");
    assert_file_is(&done.p("hdr"), &hdr0, "another's header: header changed");
    // The same image again: encrypted already, and how to open it.
    let enc = std::fs::read(done.p("img")).unwrap();
    let out = run(&mut detached_encrypt(&done));
    assert_refused_in_one_line(&out, "is encrypted already (`luksify open", "encrypt twice");
    assert_file_is(&done.p("img"), &enc, "encrypt twice: data touched");
    // An interrupted run: resume it.
    let (c, orig) = Case::new(16, 33);
    kill_after_commits(&mut detached_encrypt(&c), &c.p("hdr"), 0, 2, 0);
    assert!(
        luks_dump(&c.p("hdr")).contains("online-reencrypt"),
        "the run was not cut mid-way"
    );
    let (img1, hdr1) = (
        std::fs::read(c.p("img")).unwrap(),
        std::fs::read(c.p("hdr")).unwrap(),
    );
    let out = run(&mut detached_encrypt(&c));
    assert_refused_in_one_line(
        &out,
        "holds an interrupted encryption; to continue it use `luksify resume",
        "an interrupted header",
    );
    assert_file_is(&c.p("img"), &img1, "interrupted: data touched");
    assert_file_is(&c.p("hdr"), &hdr1, "interrupted: header changed");
    run_ok(&mut detached_resume(&c));
    assert!(
        same(&cryptsetup_decrypt_detached(&c), &orig),
        "resumed run decrypts to other bytes"
    );
}

/// `encrypt --header H` where H is the data itself (the same path, or a symlink or hard
/// link to it) is refused in one line that says so, before anything is written. It used
/// to say "header file already exists ... else remove it": advice to delete the data.
#[test]
fn walker_header_that_is_the_data_itself_is_refused() {
    let (c, orig) = Case::new(16, 96);
    std::os::unix::fs::symlink(c.p("img"), c.p("link")).unwrap();
    std::fs::hard_link(c.p("img"), c.p("hard")).unwrap();
    let img = c.img();
    for h in ["img", "link", "hard"] {
        let hp = c.p(h).display().to_string();
        let out =
            run(luksify(&["encrypt", &img, "--key-file", &c.key(), "--header", &hp]).args(FAST));
        assert_refused_in_one_line(&out, "is the data itself", h);
        assert_file_is(&c.p("img"), &orig, &format!("--header {h}: image changed"));
    }
}

/// An image file that is not whole 4096-byte blocks (16 MiB + 1.5 KiB, as an image of a
/// partition of an odd number of sectors is): luksify walks it to its last byte and
/// leaves its size alone (cryptsetup's own run on such a file grows it to whole 4096-byte
/// blocks). Its checksum run keeps 512-byte checksums there (4096 on other image files),
/// so that cryptsetup's recovery, which checks whole checksum blocks only, covers the
/// last partial block too. Killed at commits over the whole run (O_DIRECT, the last
/// bytes through the page cache) and resumed, it decrypts to the original bytes, with
/// luksify and with cryptsetup. luksify refused such a file before ("not a non-zero
/// multiple of 4096 bytes").
#[test]
fn walker_image_file_of_partial_4096_byte_blocks_is_walked_to_its_last_byte() {
    require_tool("cryptsetup");
    const SIZE: usize = (16 << 20) + 1536;
    let span = {
        let (c, _) = Case::sized(SIZE, 1);
        run_ok(&mut detached_encrypt(&c));
        assert_eq!(std::fs::metadata(c.p("img")).unwrap().len(), SIZE as u64);
        header_seqid(&c.p("hdr"))
    };
    let mut mid_run = 0;
    for k in 0..8u64 {
        let (c, orig) = Case::sized(SIZE, 10 + k);
        let at = 2 + k * span.saturating_sub(3) / 7;
        kill_after_commits(&mut detached_encrypt(&c), &c.p("hdr"), 0, at, k * 300);
        let what = format!("killed after commit {at} of {span}");
        if !has_luks_header(&c.p("hdr")) {
            continue;
        }
        let dump = luks_dump(&c.p("hdr"));
        if dump.contains("online-reencrypt") {
            mid_run += 1;
            assert!(
                dump.contains("Hash data:  512 [bytes]"),
                "{what}: want 512-byte checksums:\n{dump}"
            );
            run_ok(&mut detached_resume(&c));
        }
        assert_eq!(
            std::fs::metadata(c.p("img")).unwrap().len(),
            SIZE as u64,
            "{what}: the image changed size"
        );
        if k % 2 == 0 {
            run_ok(&mut detached_decrypt(&c));
            assert_file_is(&c.p("img"), &orig, &what);
        } else {
            // cryptsetup's decryption grows the file to whole 4096-byte blocks (zeros).
            let now = cryptsetup_decrypt_detached(&c);
            assert!(
                now[..SIZE] == orig[..],
                "{what}: cryptsetup decrypts another plaintext"
            );
        }
    }
    assert!(mid_run >= 4, "only {mid_run} of 8 kills landed mid-walk");
}

/// A `--reduce-device-size` run cryptsetup started on an image file that is not whole
/// 4096-byte blocks, killed mid-walk: cryptsetup has grown the file to whole blocks, so
/// luksify's check that the device is the one the run started on refuses it. The
/// refusal now says why and gives the `truncate` to run (it said "wrong device or it
/// was resized"); after it, luksify finishes the run and decrypts the original bytes.
#[test]
fn walker_resume_of_a_cryptsetup_shift_run_on_a_grown_image_says_how_to_go_on() {
    require_tool("cryptsetup");
    require_tool("strace");
    const SIZE: usize = (24 << 20) + 1536;
    let (c, orig) = Case::sized(SIZE, 61);
    let mut cs = Command::new("cryptsetup");
    cs.args(["reencrypt", "--encrypt", "-q", "--force-offline-reencrypt"])
        .args(["--key-file", &c.key(), "--reduce-device-size", "8M"])
        .args(["--hotzone-size", "1M"])
        .args(FAST)
        .arg(c.img())
        // Killed early, cryptsetup leaves its temporary header (LUKS2-temp-*.new) in
        // its working directory: the case's, not the source tree.
        .current_dir(c.p("img").parent().unwrap());
    run(&mut luksify_tests::strace_inject(
        "inject=fsync:signal=SIGKILL:when=10",
        &cs,
    ));
    let grown = std::fs::metadata(c.p("img")).unwrap().len();
    assert!(
        grown > SIZE as u64 && luks_dump(&c.p("img")).contains("online-reencrypt"),
        "cryptsetup's run was not cut mid-walk on a grown file ({grown} bytes)"
    );
    let was = SIZE;
    let out = run(&mut luksify(&["resume", &c.img(), "--key-file", &c.key()]));
    assert_refused_in_one_line(&out, &format!("`truncate -s {was} FILE`"), "grown image");
    run_ok(Command::new("truncate").args(["-s", &was.to_string(), &c.img()]));
    run_ok(&mut luksify(&["resume", &c.img(), "--key-file", &c.key()]));
    // Header in front: --header names the new file it moves to.
    run_ok(&mut detached_decrypt(&c));
    let data = SIZE - (8 << 20);
    let now = std::fs::read(c.p("img")).unwrap();
    assert!(now[..data] == orig[..data], "plaintext differs");
}

/// On a terminal the progress bar is redrawn with `\r` and no newline. An error in
/// mid-walk (here an injected EIO) was printed on the bar's line, after its figures;
/// it now starts a line of its own, as the "finished" and "stopped" lines did.
#[test]
fn walker_an_error_on_a_terminal_starts_its_own_line_after_the_progress_bar() {
    require_tool("script");
    require_tool("strace");
    let (c, _) = Case::new(16, 67);
    // The bar is drawn every half second (as cryptsetup's): each commit's flush slowed
    // by 0.6 s (1 MiB hotzones), so that it shows before the EIO, a few chunks in.
    let mut st = luksify_tests::strace_with(
        &[
            "-e".as_ref(),
            "inject=fdatasync:delay_enter=600000".as_ref(),
            "-e".as_ref(),
            "inject=pwrite64:error=EIO:when=40".as_ref(),
        ],
        &detached_encrypt_hz(&c, "1024"),
    );
    st.stdout(std::process::Stdio::null());
    let quote = |s: &std::ffi::OsStr| format!("'{}'", s.to_string_lossy().replace('\'', r"'\''"));
    let line: Vec<String> = std::iter::once(st.get_program())
        .chain(st.get_args())
        .map(quote)
        .collect();
    // `script` gives the command a pseudo-terminal and copies what it printed.
    let out = run(Command::new("script")
        .args(["-qefc", &line.join(" "), "/dev/null"])
        .stdin(std::process::Stdio::null()));
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        !out.status.success(),
        "the injected EIO did not fail the run: {said:?}"
    );
    assert!(
        said.contains("Progress: ") && said.contains("\r") && said.contains("luksify: "),
        "no progress bar, or no error, on the terminal: {said:?}"
    );
    for (at, _) in said.match_indices("luksify: ") {
        assert!(
            at == 0 || said[..at].ends_with('\n'),
            "an error line starts on the progress bar's line: {said:?}"
        );
    }
}

/// `--reduce-device-size` takes the device's last bytes: a swap area or a btrfs that
/// reaches into them would be cut. Both were encrypted regardless (only ext2/3/4 and
/// xfs superblocks were read); each is now refused before any write, with what to do.
/// A swap area made to leave the end free is encrypted, and decrypts to the original.
#[test]
fn walker_refuses_a_swap_area_or_btrfs_reaching_into_the_shift_area() {
    require_tool("mkswap");
    require_tool("mkfs.btrfs");
    let shifted = |k: &Case| shifted(k, "8M");
    // Refused in one line that says `says` and `fix`, the image unchanged.
    let refused = |k: &Case, says: &str, fix: &str| {
        let before = std::fs::read(k.p("img")).unwrap();
        let out = shifted(k);
        assert_refused_in_one_line(&out, says, fix);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(fix),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(same(&std::fs::read(k.p("img")).unwrap(), &before));
    };
    // mkswap over the whole image, then one that leaves the last 8 MiB (24 MiB in KiB).
    let (c, _) = Case::new(32, 71);
    run_ok(Command::new("mkswap").args(["-q", &c.img()]));
    refused(&c, "the swap area spans 33554432 bytes", "mkswap DEV 24576");
    run_ok(Command::new("mkswap").args(["-q", &c.img(), "24576"]));
    let before = std::fs::read(c.p("img")).unwrap();
    let out = shifted(&c);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Header in front: --header names the new file it moves to.
    run_ok(&mut detached_decrypt(&c));
    let now = std::fs::read(c.p("img")).unwrap();
    let kept = 24 << 20;
    assert!(same(&now[..kept], &before[..kept]), "the swap area changed");
    // btrfs over the whole image (its smallest default size is about 114 MiB).
    let (b, _) = Case::new(160, 72);
    run_ok(Command::new("mkfs.btrfs").args(["-q", "-f", &b.img()]));
    refused(
        &b,
        "the btrfs filesystem spans 167772160 bytes",
        "btrfs filesystem resize -8M",
    );
}

/// A data-shift start cut during its first header write, then the device grows (a
/// cloud disk or an LV extended) before the rerun: the start marker no longer sat where
/// the new size puts it, so `resume` said there was no run and the same `encrypt` began
/// afresh over the head, losing ~1 MiB of the filesystem (reported exit 0 throughout).
/// Now every command is refused, nothing written, naming the size to give back; once
/// given back, the same command finishes and the filesystem's bytes decrypt intact.
#[test]
fn walker_shift_start_cut_then_device_grown_is_refused_until_its_size_is_back() {
    // The 5th fdatasync: the moved copy and the markers are durable, the keyslots area
    // (random bytes over the head from 32 KiB) is being made so.
    let (c, orig, args) = shift_start_cut(5, 5);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (img, key) = (c.img(), c.key());
    let was = orig.len() as u64;
    let other_hdr = c.p("other.hdr").display().to_string();
    let mut detached = vec!["encrypt", &img, "--key-file", &key, "--header", &other_hdr];
    detached.extend(FAST);
    let resume = vec!["resume", &img, "--key-file", &key];
    // Grown by whole MiB, and by a part of one (the marker found by its copy at byte 0).
    for grow in [4u64 << 20, 1536 << 10] {
        run_ok(Command::new("truncate").args(["-s", &(was + grow).to_string(), &img]));
        let now = std::fs::read(c.p("img")).unwrap();
        for (cmd, what) in [
            (&args, "the same encrypt"),
            (&detached, "a detached encrypt"),
            (&resume, "resume"),
        ] {
            let out = run(&mut luksify(cmd));
            assert_refused_in_one_line(&out, &format!("`truncate -s {was} FILE`"), what);
            assert!(
                std::fs::read(c.p("img")).unwrap() == now,
                "{what} after growing by {grow}: the image changed"
            );
        }
    }
    run_ok(Command::new("truncate").args(["-s", &was.to_string(), &img]));
    finish_cut_start(&c, &args, &orig);
}

/// After a run finished (or was killed after its final header write), `resume` and a
/// second `decrypt` say the run is over and what the data is; they said "(already
/// finished?)" and "unsupported: no crypt data segment". Nothing is written.
#[test]
fn walker_resume_and_decrypt_after_the_run_finished_say_so() {
    let (c, orig) = Case::new(8, 81);
    run_ok(&mut detached_encrypt(&c));
    let said = |cmd: &mut Command, says: &str, what: &str| {
        let (img, hdr) = (
            std::fs::read(c.p("img")).unwrap(),
            std::fs::read(c.p("hdr")).unwrap(),
        );
        let out = run(cmd);
        assert_refused_in_one_line(&out, says, what);
        assert_file_is(&c.p("img"), &img, what);
        assert_file_is(&c.p("hdr"), &hdr, what);
    };
    said(
        &mut detached_resume(&c),
        "the encryption already finished (or never began",
        "resume after the encryption",
    );
    run_ok(&mut detached_decrypt(&c));
    assert_file_is(&c.p("img"), &orig, "decrypted");
    said(
        &mut detached_resume(&c),
        "the decryption already finished (the data is plaintext",
        "resume after the decryption",
    );
    said(
        &mut detached_decrypt(&c),
        "the decryption already finished: the data is plaintext, nothing to decrypt",
        "decrypt after the decryption",
    );
}

/// `decrypt` with a detached header whose data starts at an offset decrypts in place
/// there, and now says so (the state a `cryptsetup reencrypt --decrypt --header` of a
/// header-in-front volume leaves when stopped at once looks the same: its data then
/// ends up at that offset, which was reported only as "decryption finished").
#[test]
fn walker_decrypt_at_a_data_offset_says_where_the_plaintext_starts() {
    let (c, orig) = Case::new(8, 83);
    let mut enc = detached_encrypt(&c);
    enc.args(["--offset", "2048"]);
    run_ok(&mut enc);
    let out = run_ok(&mut detached_decrypt(&c));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("decryption finished")
            && err.contains("the plaintext starts at byte 1048576, the header's data offset"),
        "{err}"
    );
    assert_file_is(&c.p("img"), &orig, "decrypted");
    // No offset, no such line.
    let (d, _) = Case::new(8, 84);
    run_ok(&mut detached_encrypt(&d));
    let out = run_ok(&mut detached_decrypt(&d));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("plaintext starts at"),
        "{out:?}"
    );
}

/// SIGTERM while the key is derived, before the first write: exit 5, "stopped on request
/// before the ... wrote anything", the image (and a volume's header) as they were, no
/// new header file left behind. It wrote a header and left a run at 0% to resume.
#[test]
fn walker_sigterm_before_the_first_write_leaves_nothing_to_resume() {
    let (c, orig) = Case::new(16, 61);
    // About 3 s of PBKDF2 here: the stop lands inside it.
    let slow = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "15000000"];
    let stopped = |mut cmd: Command| -> std::process::Output {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(800));
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        child.wait_with_output().unwrap()
    };
    let out = stopped(detached_encrypt_kdf(&c, &slow));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains("stopped on request before the encryption wrote anything")
            && err.contains("nothing to resume"),
        "{err}"
    );
    assert_file_is(&c.p("img"), &orig, "the image");
    assert!(!c.p("hdr").exists(), "the new header file was left behind");

    // A volume: its decryption stopped while the passphrase is checked.
    let out = run(&mut detached_encrypt_kdf(&c, &slow));
    assert!(out.status.success(), "{out:?}");
    let (img, hdr) = (
        std::fs::read(c.p("img")).unwrap(),
        std::fs::read(c.p("hdr")).unwrap(),
    );
    let out = stopped(detached_decrypt(&c));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains("stopped on request before the decryption wrote anything"),
        "{err}"
    );
    assert_file_is(&c.p("img"), &img, "the volume");
    assert_file_is(&c.p("hdr"), &hdr, "the header");
    let out = run(&mut detached_decrypt(&c));
    assert!(out.status.success(), "{out:?}");
    assert_file_is(&c.p("img"), &orig, "the decrypted image");
}

/// `--header` naming something that is not a header file: a FIFO (opening it blocked
/// for ever), a symlink to a character device (`/dev/null`: its node was deleted), a
/// directory, and an existing empty file when the run then fails (it was deleted).
/// Each is refused or left as it was; only a file the run created is ever removed.
#[test]
fn walker_header_paths_it_did_not_create_are_never_removed() {
    let (c, orig) = Case::new(8, 71);
    let fifo = c.p("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    std::os::unix::fs::symlink("/dev/null", c.p("null-link")).unwrap();
    std::fs::create_dir(c.p("dir")).unwrap();
    let cases = [
        ("fifo", "is a FIFO"),
        ("null-link", "is a character device"),
        ("dir", "is a directory"),
    ];
    for (name, says) in cases {
        let h = c.p(name).display().to_string();
        for verb in ["encrypt", "decrypt", "resume"] {
            let mut cmd = luksify(&[verb, &c.img(), "--key-file", &c.key(), "--header", &h]);
            if verb == "encrypt" {
                cmd.args(FAST);
            }
            // A blocked open would hang: the test gives up after 20 s.
            let child = cmd
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let out = luksify_tests::wait_within(
                child,
                Duration::from_secs(20),
                &format!("{verb} --header {name}"),
            );
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{verb} {name}: {err}");
            assert!(
                err.contains(says) && err.contains("nothing was written"),
                "{verb} {name}: {err}"
            );
            assert!(
                std::fs::symlink_metadata(c.p(name)).is_ok(),
                "{verb} removed {name}"
            );
        }
    }
    use std::os::unix::fs::FileTypeExt;
    let null = std::fs::metadata("/dev/null").unwrap();
    assert!(
        null.file_type().is_char_device(),
        "/dev/null is no longer a device"
    );
    assert_file_is(&c.p("img"), &orig, "the image");

    // An empty file of the user's, and a run the walker refuses after it is opened
    // (an image that is not whole 4096-byte sectors). The image holds a filesystem:
    // over one that shows none an existing empty header file is refused before that
    // (it may be a header emptied after its run began).
    let (c, _) = Case::sized((8 << 20) + 512, 72);
    require_tool("mkfs.ext4");
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", "-b", "4096", &c.img()]));
    let orig = std::fs::read(c.p("img")).unwrap();
    std::fs::write(c.p("mine"), b"").unwrap();
    let out = run(encrypt_into(&c, c.p("mine").to_str().unwrap())
        .args(["--sector-size", "4096"])
        .args(FAST));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a whole number of 4096-byte sectors"),
        "{err}"
    );
    assert!(
        c.p("mine").exists(),
        "the user's empty file was removed: {err}"
    );
    assert_file_is(&c.p("img"), &orig, "the image");
}

/// A finished journal-mode encryption leaves no plaintext in its detached header: the
/// journal halves held the last hotzones' old bytes (about 16 MiB of the image's text
/// was found there); cryptsetup wipes that room, and so does luksify now.
#[test]
fn walker_finished_journal_header_holds_no_plaintext() {
    let (c, _) = Case::new(64, 0);
    let mut text = Vec::with_capacity(64 << 20);
    let mut i = 0u64;
    while text.len() < 64 << 20 {
        text.extend_from_slice(format!("PLAINMARK{i:022}\n").as_bytes());
        i += 1;
    }
    text.truncate(64 << 20);
    std::fs::write(c.p("img"), &text).unwrap();
    let count = |b: &[u8]| b.windows(9).filter(|w| *w == b"PLAINMARK").count();
    for res in ["journal", "checksum"] {
        std::fs::write(c.p("img"), &text).unwrap();
        let _ = std::fs::remove_file(c.p("hdr"));
        let out = run(detached_encrypt_kdf(&c, &FAST).args(["--resilience", res]));
        assert!(out.status.success(), "{out:?}");
        let hdr = std::fs::read(c.p("hdr")).unwrap();
        assert_eq!(count(&hdr), 0, "{res}: plaintext left in the header");
        assert_eq!(count(&std::fs::read(c.p("img")).unwrap()), 0, "{res}");
        run_ok(Command::new("cryptsetup").args([
            "open",
            "--test-passphrase",
            "--key-file",
            &c.key(),
            "--header",
            &c.hdr(),
            &c.img(),
        ]));
    }
}

/// A LUKS1 volume is named as such by `encrypt` (it sent the user to `resume`, which then
/// refused LUKS1) and by `decrypt` without `--header` (it asked for one first).
#[test]
fn walker_a_luks1_volume_is_named_as_such() {
    require_tool("cryptsetup");
    let (c, _) = Case::new(40, 81);
    run_ok(Command::new("cryptsetup").args([
        "luksFormat",
        "--batch-mode",
        "--type",
        "luks1",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
        &c.key(),
        &c.img(),
    ]));
    let before = std::fs::read(c.p("img")).unwrap();
    let out = run(luksify(&[
        "encrypt",
        &c.img(),
        "--key-file",
        &c.key(),
        "--reduce-device-size",
        "32M",
    ])
    .args(FAST));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("already holds a LUKS1 header: it is encrypted already")
            && !err.contains("resume"),
        "{err}"
    );
    let out = run(&mut luksify(&["decrypt", &c.img(), "--key-file", &c.key()]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("holds a LUKS1 volume: luksify decrypts LUKS2 only")
            && err.contains("`cryptsetup convert --type luks2 DEV`"),
        "{err}"
    );
    assert_file_is(&c.p("img"), &before, "the LUKS1 volume");
}

/// A whole disk with a partition table (DOS or GPT; no filesystem at its start) is
/// refused before anything is written, in both layouts: encrypting it in place turned
/// the table and every partition's start into ciphertext with exit 0 (found by a
/// trial; cryptsetup stops with "already contains a 'dos' partition signature").
#[test]
fn walker_a_partitioned_whole_disk_is_refused() {
    for (kind, gpt) in [("DOS (MBR)", false), ("GPT", true)] {
        let (c, mut orig) = Case::new(64, 41);
        orig[0] = 0xfa;
        orig[446..510].fill(0);
        orig[446 + 4] = if gpt { 0xee } else { 0x83 };
        orig[510..512].copy_from_slice(&[0x55, 0xaa]);
        if gpt {
            orig[512..520].copy_from_slice(b"EFI PART");
        }
        std::fs::write(c.p("img"), &orig).unwrap();
        for place in [
            &["--reduce-device-size", "32M"][..],
            &["--header", &c.hdr()][..],
        ] {
            let out = run(luksify(&["encrypt", &c.img(), "--key-file", &c.key()])
                .args(place)
                .args(FAST));
            assert_refused_in_one_line(
                &out,
                &format!("holds a {kind} partition table"),
                &format!("{kind} {place:?}"),
            );
            assert_file_is(&c.p("img"), &orig, &format!("{kind}: data touched"));
            assert!(!c.p("hdr").exists(), "{kind}: header file left behind");
        }
    }
}

/// `--reduce-device-size 1M` (a 512 KiB header in front) is taken as cryptsetup takes
/// it: the same header fields and the same ciphertext for the same volume key (luksify
/// refused anything below 2M).
#[test]
fn walker_a_1m_reduction_is_taken_as_cryptsetup_takes_it() {
    require_tool("cryptsetup");
    let args = [
        "--reduce-device-size",
        "1M",
        "--uuid",
        "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
    ];
    let vk = |c: &Case| {
        let v: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(13) ^ 0xa5).collect();
        std::fs::write(c.p("vk"), v).unwrap();
        c.p("vk").display().to_string()
    };
    let (a, orig) = Case::new(16, 42);
    run_ok(
        luksify(&["encrypt", &a.img(), "--key-file", &a.key()])
            .args(args)
            .args(["--volume-key-file", &vk(&a)]),
    );
    let (b, _) = Case::new(16, 42);
    run_ok(
        Command::new("cryptsetup")
            .args(["reencrypt", "--encrypt", "-q", "--force-offline-reencrypt"])
            .args(["--key-file", &b.key()])
            .args(args)
            .args(["--volume-key-file", &vk(&b), &b.img()]),
    );
    assert_eq!(
        dump_without_random(&a.p("img")),
        dump_without_random(&b.p("img")),
        "luksDump differs from cryptsetup's"
    );
    // The data segment: from the 512 KiB offset, the device less the 1 MiB reduction.
    let seg =
        |c: &Case| std::fs::read(c.p("img")).unwrap()[512 << 10..(15 << 20) + (512 << 10)].to_vec();
    let (sa, sb) = (seg(&a), seg(&b));
    assert!(
        sa != orig[..sa.len()] && same(&sa, &sb),
        "ciphertext differs from cryptsetup's"
    );
}

/// `decrypt --header FILE` of a detached volume where FILE does not exist says so (it
/// said "no LUKS header on the device or in --header FILE: nothing to decrypt", which
/// reads as "this device is plaintext"; found by a trial); nothing is written.
#[test]
fn walker_decrypt_names_a_missing_header_file() {
    let (c, _) = Case::new(8, 61);
    run_ok(&mut detached_encrypt(&c));
    let enc = std::fs::read(c.p("img")).unwrap();
    let missing = c.p("brandnew.hdr").display().to_string();
    let out = run(&mut luksify(&[
        "decrypt",
        &c.img(),
        "--key-file",
        &c.key(),
        "--header",
        &missing,
    ]));
    assert_refused_in_one_line(
        &out,
        "does not exist: name the volume's detached header file",
        "missing header",
    );
    assert!(
        !c.p("brandnew.hdr").exists(),
        "created the missing header file"
    );
    assert_file_is(&c.p("img"), &enc, "data touched");
}

/// Whether the 4096-byte blocks of `orig` (skipping all-zero ones) appear in `hay`.
fn holds_blocks_of(hay: &[u8], orig: &[u8]) -> usize {
    let set: std::collections::HashSet<&[u8]> = orig
        .chunks(4096)
        .filter(|b| b.iter().any(|&x| x != 0))
        .collect();
    hay.chunks(4096).filter(|b| set.contains(b)).count()
}

/// The end of a journal run wipes the resilience area, which holds the last
/// hotzones' plaintext. A run cut inside that wipe used to leave a finished header
/// with the plaintext beside it and nothing that would wipe it (`resume`: "already
/// finished"; a trial found 15 MiB of plaintext so). The final header now carries a
/// `luksify-wipe-pending` token until the wipe is durable, and `resume` redoes the wipe,
/// exit 0, without a passphrase check. Cut at each of the run's last fdatasyncs.
#[test]
fn walker_a_wipe_cut_short_is_finished_by_resume() {
    require_tool("strace");
    require_tool("cryptsetup");
    let (c, orig) = Case::new(16, 77);
    let enc = || {
        let mut e = detached_encrypt(&c);
        e.args(["--resilience", "journal"]);
        e
    };
    // How many fdatasyncs a whole run makes (the same every time for this case).
    let trace = c.p("trace");
    let mut whole = Command::new("strace");
    whole
        .args(["-f", "-qq", "-e", "trace=fdatasync", "-o"])
        .arg(&trace);
    whole.arg(luksify_bin()).args(enc().get_args());
    run_ok(&mut whole);
    // strace counts `when=` per thread: the thread that commits makes the most.
    let mut per_thread = std::collections::HashMap::<String, u64>::new();
    for l in std::fs::read_to_string(&trace).unwrap().lines() {
        if l.contains("fdatasync(") {
            *per_thread
                .entry(l.split_whitespace().next().unwrap().to_string())
                .or_default() += 1;
        }
    }
    let total = per_thread.into_values().max().unwrap_or(0);
    assert!(total > 6, "only {total} fdatasyncs");
    let clean = std::fs::read(c.p("hdr")).unwrap();
    assert_eq!(
        holds_blocks_of(&clean, &orig),
        0,
        "a whole run left plaintext"
    );
    let mut pending_with_plaintext = 0;
    for at in total.saturating_sub(5)..=total {
        std::fs::write(c.p("img"), &orig).unwrap();
        let _ = std::fs::remove_file(c.p("hdr"));
        let cut = kill_at_fdatasync(&enc(), at);
        assert!(!cut.status.success(), "not killed at fdatasync {at}");
        let dump = luks_dump(&c.p("hdr"));
        if !dump.contains("luksify-wipe-pending") {
            continue;
        }
        assert!(
            !dump.contains("online-reencrypt"),
            "{at}: not finished:\n{dump}"
        );
        let left = holds_blocks_of(&std::fs::read(c.p("hdr")).unwrap(), &orig);
        if left > 0 {
            pending_with_plaintext += 1;
        }
        std::fs::write(c.p("key"), b"not the passphrase").unwrap();
        let out = run(&mut detached_resume(&c));
        std::fs::write(c.p("key"), b"walker test passphrase").unwrap();
        assert!(out.status.success(), "{at}: resume: {out:?}");
        let after = std::fs::read(c.p("hdr")).unwrap();
        assert_eq!(
            holds_blocks_of(&after, &orig),
            0,
            "{at}: plaintext left after resume"
        );
        assert!(
            !luks_dump(&c.p("hdr")).contains("luksify-wipe-pending"),
            "{at}: token kept"
        );
        assert_decrypts_to(&c, &orig, &format!("cut at {at}"));
    }
    assert!(
        pending_with_plaintext > 0,
        "no cut left the pending wipe with plaintext in the header"
    );
}

/// The passphrase leaves memory once the header is made (encrypt) or unlocked
/// (resume), before the walk, which can take hours: a trial found it on the heap
/// mid-walk. The process is frozen mid-walk and its memory searched; as a check that
/// the search finds what is there, the volume key (given with --volume-key-file) is.
#[test]
fn walker_forgets_the_passphrase_before_the_walk() {
    let (c, _) = Case::new(64, 91);
    let pass = b"CANARY-passphrase-5e1f0c";
    std::fs::write(c.p("key"), pass).unwrap();
    let vk: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    std::fs::write(c.p("vk"), &vk).unwrap();
    let vkf = c.p("vk").display().to_string();
    for step in ["encrypt", "resume"] {
        let mut cmd = if step == "encrypt" {
            let mut e = detached_encrypt_hz(&c, "256");
            e.args(["--volume-key-file", &vkf]);
            e
        } else {
            let mut r = detached_resume(&c);
            r.args(["--hotzone-kib", "256"]);
            r
        };
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let base = if step == "encrypt" {
            0
        } else {
            header_seqid(&c.p("hdr"))
        };
        let frozen = Frozen::after_seqid(&mut cmd, &c.p("hdr"), base + 6);
        let pid = frozen.pid();
        let passes = luksify_tests::occurrences_in_memory(pid, pass);
        let keys = luksify_tests::occurrences_in_memory(pid, &vk[..32]);
        if step == "encrypt" {
            // Killed, so that resume has a walk of its own to be searched in.
            drop(frozen);
        } else {
            assert!(frozen.thaw().success(), "resume");
        }
        assert!(keys > 0, "{step}: the search did not find the volume key");
        assert_eq!(passes, 0, "{step}: the passphrase is in memory mid-walk");
    }
    run_ok(&mut detached_decrypt(&c));
}

/// `cmd` with the first read of `c`'s image failing with EIO (a bad sector).
fn eio_on_read(c: &Case, cmd: &Command) -> std::process::Output {
    let img = c.p("img");
    run(&mut luksify_tests::strace_with(
        &[
            "-P".as_ref(),
            img.as_os_str(),
            "-e".as_ref(),
            "inject=pread64:error=EIO:when=1".as_ref(),
        ],
        cmd,
    ))
}

/// An I/O error's message names the bytes that failed, `what at device bytes A..B` (it
/// said only "write data: Input/output error"; `dmesg` names sectors, the user needs the
/// place): a non-empty range inside the device's `size` bytes.
fn assert_names_failed_bytes(out: &std::process::Output, what: &str, size: u64) {
    let err = String::from_utf8_lossy(&out.stderr);
    let tag = format!("{what} at device bytes ");
    let at = err
        .find(&tag)
        .unwrap_or_else(|| panic!("no `{tag}` in: {err}"))
        + tag.len();
    let range: String = err[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let (a, b) = range.split_once("..").expect("a range A..B");
    let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
    assert!(
        a < b && b <= size,
        "{range} is not a range of the device: {err}"
    );
}

/// An I/O error in the walk (an injected EIO) says in one line that the run is recorded
/// and the command that continues it, from `encrypt` and now from `resume` too (which
/// said only "write hotzone: Input/output error"); once the fault is gone, that command
/// finishes. With resilience `none`, which keeps no copy, the failed chunk is read back:
/// found as it was (an injected EIO writes nothing), it is not named as "may be part
/// rewritten", so that run too is resumed and decrypts to the original (a trial's full
/// disk left a none run that neither tool could finish, its failed chunk untouched).
#[test]
fn walker_io_errors_say_how_to_go_on() {
    require_tool("strace");
    require_tool("taskset");
    let (c, orig) = Case::new(16, 68);
    // The n-th data write fails (writes to the image only: -P), on one CPU so that one
    // worker writes, in order (strace counts per thread).
    let eio = |cmd: &Command, n: u32| {
        let img = c.p("img");
        let traced = luksify_tests::strace_with(
            &[
                "-P".as_ref(),
                img.as_os_str(),
                "-e".as_ref(),
                format!("inject=pwrite64:error=EIO:when={n}").as_ref(),
            ],
            cmd,
        );
        let mut one_cpu = Command::new("taskset");
        one_cpu
            .args(["-c", "0"])
            .arg(traced.get_program())
            .args(traced.get_args());
        run(&mut one_cpu)
    };
    let out = eio(&detached_encrypt(&c), 3);
    assert_refused_in_one_line(&out, "the run is still recorded in its header", "encrypt");
    assert_names_failed_bytes(&out, "write data", 16 << 20);
    let resume = || detached_resume(&c);
    let out = eio(&resume(), 2);
    assert_refused_in_one_line(&out, "the run is still recorded in its header", "resume");
    // (resume's second write is its recovery of the hotzone the first run left)
    assert_names_failed_bytes(&out, "write hotzone", 16 << 20);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("continue with: luksify resume"),
        "{out:?}"
    );
    run_ok(&mut resume());
    assert_decrypts_to(&c, &orig, "resumed");

    std::fs::write(c.p("img"), &orig).unwrap();
    std::fs::remove_file(c.p("hdr")).unwrap();
    let mut none = detached_encrypt(&c);
    none.args(["--resilience", "none"]);
    let out = eio(&none, 3);
    assert_refused_in_one_line(&out, "the run is still recorded in its header", "none");
    let dump = luks_dump(&c.p("hdr"));
    assert!(
        dump.contains("online-reencrypt"),
        "the none run is not recorded:\n{dump}"
    );
    run_ok(&mut resume());
    assert_decrypts_to(&c, &orig, "none");

    // A header write that fails mid-run (here the 20th write to the header file): the
    // run is recorded all the same, and the message says so (it gave only "writing the
    // Secondary LUKS2 header at offset 16384: Input/output error").
    std::fs::write(c.p("img"), &orig).unwrap();
    std::fs::remove_file(c.p("hdr")).unwrap();
    let hdr = c.p("hdr");
    let out = run(&mut luksify_tests::strace_with(
        &[
            "-P".as_ref(),
            hdr.as_os_str(),
            "-e".as_ref(),
            "inject=pwrite64:error=EIO:when=20".as_ref(),
        ],
        &detached_encrypt(&c),
    ));
    assert_refused_in_one_line(
        &out,
        "the run is still recorded in its header",
        "header write",
    );
    run_ok(&mut resume());
    assert_decrypts_to(&c, &orig, "after a failed header write");

    // A sector that cannot be read before the run (the image's first read fails): the
    // message says the device failed there and the run had not begun; nothing written.
    std::fs::remove_file(c.p("hdr")).unwrap();
    let out = eio_on_read(&c, &detached_encrypt(&c));
    assert_refused_in_one_line(&out, "the device failed there", "bad sector");
    assert_file_is(&c.p("img"), &orig, "bad sector: the image was written");
    assert!(!c.p("hdr").exists(), "bad sector: a header file was left");
}

/// A device grown while a detached-header run was stopped: its header's segment runs to
/// the device's end, so resume walked the new end as data (none of the identity probes
/// lies there). The token now records the data's length: resume refuses a grown device,
/// writing nothing, says the size to give it back, and finishes once it has it.
#[test]
fn walker_resume_refuses_a_device_grown_since_the_run_started() {
    let (c, orig) = Case::new(16, 73);
    kill_after_commits(&mut detached_encrypt(&c), &c.p("hdr"), 0, 4, 0);
    assert!(
        luks_dump(&c.p("hdr")).contains("in-reencryption"),
        "the run was not cut mid-walk"
    );
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(c.p("img"))
        .unwrap();
    f.set_len(17 << 20).unwrap();
    let before = c.files();
    let out = run(&mut detached_resume(&c));
    assert_refused_in_one_line(&out, "it was grown since", "grown");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("{} bytes in all", 16 << 20)),
        "{out:?}"
    );
    assert!(c.files() == before, "the image or the header was written");
    f.set_len(16 << 20).unwrap();
    run_ok(&mut detached_resume(&c));
    assert_decrypts_to(&c, &orig, "resumed");
}

/// A run whose output nobody reads (its pipes' read ends closed at once) still exits 0
/// once it is done: its last line panicked in `eprintln!` (exit 101) after the walk.
#[test]
fn walker_a_run_nobody_listens_to_ends_cleanly() {
    let (c, orig) = Case::new(8, 74);
    let mut child = detached_encrypt(&c)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    drop(child.stderr.take());
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(0), "encrypt with nobody reading: {st}");
    assert_decrypts_to(&c, &orig, "encrypted with nobody reading");
}

/// cryptsetup's checksum run on an image that is not whole 4096-byte blocks, killed
/// mid-walk: its hotzone (one, the whole device) ends in a partial block, whose digest
/// cryptsetup takes over the block padded with zeros. `resume` panicked there ("range
/// end index 1048608 out of range", a trial, both directions; cryptsetup itself refuses
/// the device); it finishes the run now, and the data decrypts to the original. One
/// kill lands where cryptsetup has grown the file to whole blocks (its last block
/// written whole, its final header not yet): the original, then zeros.
#[test]
fn walker_resumes_a_cryptsetup_checksum_run_on_an_image_of_partial_blocks() {
    require_tool("cryptsetup");
    require_tool("strace");
    let mut resumed = 0;
    // k = 0: the grown state; then a kill at each of cryptsetup's fsyncs (16 here), the
    // ones inside its walk resumed: exact points, whatever the machine's load (kills
    // timed in milliseconds all missed the walk under a loaded full run).
    for k in 0..17u64 {
        let (c, mut orig) = Case::new(64, 400 + k);
        let mut tail = vec![0u8; 1536];
        luksify_tests::fill_pattern(&mut tail, 400 + k);
        orig.extend_from_slice(&tail);
        std::fs::write(c.p("img"), &orig).unwrap();
        let mut args = cryptsetup_encrypt_args(&c, "checksum");
        // Without --hotzone-size the hotzone is the whole device: any kill in the walk
        // leaves it with the partial block at its end.
        let at = args.iter().position(|a| a == "--hotzone-size").unwrap();
        args.drain(at..at + 2);
        if k == 0 {
            // Killed the instant cryptsetup grows the file (its whole last block written,
            // its final header not yet): the grown state, every time.
            let mut child = Command::new("cryptsetup")
                .args(&args[1..])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            while child.try_wait().unwrap().is_none()
                && std::fs::metadata(c.p("img")).unwrap().len() == orig.len() as u64
            {}
            let _ = child.kill();
            let _ = child.wait();
        } else {
            let mut cs = Command::new("cryptsetup");
            cs.args(&args[1..]).stderr(Stdio::null());
            let _ = run(&mut luksify_tests::strace_inject(
                &format!("inject=fsync:signal=SIGKILL:when={k}"),
                &cs,
            ));
        }
        if !has_luks_header(&c.p("hdr")) || !luks_dump(&c.p("hdr")).contains("in-reencryption") {
            continue; // finished, or not yet walking: not this test's case
        }
        let st = run(&mut detached_resume(&c));
        assert!(st.status.success(), "{k}: {st:?}");
        run_ok(&mut luksify(&[
            "decrypt",
            &c.img(),
            "--key-file",
            &c.key(),
            "--header",
            &c.hdr(),
        ]));
        // cryptsetup writes the partial last block as a whole 4096-byte one, growing the
        // file before its final header: a kill after that leaves the image grown (the
        // documented difference), the original then followed by zeros.
        let got = std::fs::read(c.p("img")).unwrap();
        let grown = orig.len().next_multiple_of(4096);
        assert!(
            (got.len() == orig.len() || got.len() == grown)
                && got[..orig.len()] == orig[..]
                && got[orig.len()..].iter().all(|&b| b == 0),
            "{k}: plaintext differs ({} bytes, {} before)",
            got.len(),
            orig.len()
        );
        resumed += 1;
    }
    assert!(resumed > 0, "no kill landed inside cryptsetup's walk");
}

/// Two runs never share a detached header, and `format` never writes over one a run
/// holds. A second `encrypt --header H` of another device, started while the first
/// derives its key (H created and reserved, nothing in it yet), took H over: both
/// finished and one volume was left encrypted under a key nobody had. A `format --header
/// H` (or of H itself) mid-walk replaced the run's keyslot, and the walk reported
/// success. Each is now refused with exit 4, writing nothing, and the first run's
/// volume decrypts to its original.
#[test]
fn walker_a_header_file_belongs_to_one_run() {
    let (a, orig) = Case::new(16, 75);
    let (b, b_orig) = Case::new(16, 76);
    let hdr = a.hdr();
    // ~2 s of key derivation, the window the second run landed in.
    let slow = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "10000000"];
    let mut first = luksify(&[
        "encrypt",
        &a.img(),
        "--key-file",
        &a.key(),
        "--header",
        &hdr,
    ]);
    let first = first
        .args(slow)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !a.p("hdr").exists() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    let out = run(luksify(&[
        "encrypt",
        &b.img(),
        "--key-file",
        &b.key(),
        "--header",
        &hdr,
    ])
    .args(FAST));
    let second_done = std::fs::read(b.p("img")).unwrap() == b_orig;
    // Mid-walk of the first run, or still deriving: either way a format must not write.
    let fmt = run(luksify(&[
        "format",
        &b.img(),
        "--header",
        &hdr,
        "--key-file",
        &b.key(),
        "--batch-mode",
    ])
    .args(FAST));
    let fmt_self = run(luksify(&[
        "format",
        &hdr,
        "--offset",
        "0",
        "--key-file",
        &b.key(),
        "--batch-mode",
    ])
    .args(FAST));
    // A decrypt naming the held header: exit 4 too (it exited 1).
    let dec = run(&mut luksify(&[
        "decrypt",
        &b.img(),
        "--key-file",
        &b.key(),
        "--header",
        &hdr,
    ]));
    let first = first.wait_with_output().unwrap();
    assert!(first.status.success(), "first run: {first:?}");
    assert_eq!(
        dec.status.code(),
        Some(4),
        "decrypt with the held header: {dec:?}"
    );
    assert_eq!(
        out.status.code(),
        Some(4),
        "second run on the same header: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is in use by another luksify run"),
        "{out:?}"
    );
    assert!(second_done, "the second run wrote its device");
    assert_eq!(
        fmt.status.code(),
        Some(4),
        "format --header mid-run: {fmt:?}"
    );
    assert_eq!(
        fmt_self.status.code(),
        Some(4),
        "format of the header mid-run: {fmt_self:?}"
    );
    run_ok(&mut luksify(&[
        "decrypt",
        &a.img(),
        "--key-file",
        &a.key(),
        "--header",
        &hdr,
    ]));
    assert!(
        same(&std::fs::read(a.p("img")).unwrap(), &orig),
        "plaintext differs"
    );
}

/// A header and data from different moments of one run: a header restored from a copy
/// taken earlier in the run, or the device restored from an earlier snapshot. With no
/// fixed identity probe between the two moments, resume went ahead ("encryption
/// finished") and 16 MiB came out encrypted twice, or left plain (a trial). Each
/// commit now records the hotzone's edges in the identity token: resume refuses both
/// mixes, writing nothing, and the matching pair still finishes.
#[test]
fn walker_resume_refuses_a_header_and_data_from_different_moments() {
    let (c, orig) = Case::new(64, 77);
    let hdr = c.p("hdr");
    let seq = |p: &std::path::Path| luksify_tests::header_seqid(p);
    kill_after_commits(&mut detached_encrypt_hz(&c, "1024"), &hdr, 0, 6, 0);
    std::fs::copy(c.p("img"), c.p("d1")).unwrap();
    std::fs::copy(&hdr, c.p("h1")).unwrap();
    let base = seq(&hdr);
    let mut resume = detached_resume(&c);
    resume.args(["--chunk-mib", "1", "--hotzone-kib", "1024"]);
    kill_after_commits(&mut resume, &hdr, base, 8, 0);
    std::fs::copy(c.p("img"), c.p("d2")).unwrap();
    std::fs::copy(&hdr, c.p("h2")).unwrap();
    for (d, h, what) in [("d2", "h1", "an older header"), ("d1", "h2", "older data")] {
        std::fs::copy(c.p(d), c.p("img")).unwrap();
        std::fs::copy(c.p(h), &hdr).unwrap();
        let before = c.files();
        let out = run(&mut detached_resume(&c));
        assert_refused_in_one_line(&out, "the header and the data disagree", what);
        assert!(
            c.files() == before,
            "{what}: the image or the header was written"
        );
    }
    std::fs::copy(c.p("d2"), c.p("img")).unwrap();
    std::fs::copy(c.p("h2"), &hdr).unwrap();
    run_ok(&mut detached_resume(&c));
    assert_decrypts_to(&c, &orig, "the matching pair");
}

/// A device grown while a run walks it: the finished header's segment runs to the
/// device's end, so the grown end, never walked, would read as ciphertext (a trial
/// grew a loop device mid-run; "encryption finished", and its new 32 MiB decrypted to
/// garbage). The run stops before its final header, recorded, says so, and once the
/// device has its size back resume finishes it to the original plaintext.
#[test]
fn walker_a_device_grown_during_the_run_is_not_finished_over() {
    let (c, orig) = Case::new(16, 78);
    let mut enc = detached_encrypt_hz(&c, "1024");
    enc.stdout(Stdio::null()).stderr(Stdio::null());
    let run_ = Frozen::after_seqid(&mut enc, &c.p("hdr"), 3);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(c.p("img"))
        .unwrap();
    f.set_len(24 << 20).unwrap();
    let st = run_.thaw();
    assert_eq!(st.code(), Some(1), "finished over a grown device: {st}");
    let out = run(&mut detached_resume(&c));
    assert_refused_in_one_line(&out, "it was grown since", "resume while grown");
    f.set_len(16 << 20).unwrap();
    run_ok(&mut detached_resume(&c));
    assert_decrypts_to(&c, &orig, "resumed at its size");
}

/// Option refusals say what to change and that nothing was written: an `--offset` that
/// leaves too small a keyslots area names a larger offset (it named
/// `--luks2-keyslots-size`, which the offset caps: a trial followed that into the same
/// refusal); an unsupported cipher said nothing of what was written. Nothing is.
#[test]
fn walker_option_refusals_say_what_to_change() {
    let (c, orig) = Case::new(16, 79);
    for (extra, needle) in [
        (
            &["--offset", "64"][..],
            "use a larger --offset (at least 576 sectors)",
        ),
        (
            &["--cipher", "serpent-xts-plain64"][..],
            "unsupported cipher",
        ),
    ] {
        let mut cmd = detached_encrypt(&c);
        let out = run(cmd.args(extra));
        assert_refused_in_one_line(&out, needle, needle);
        assert_refused_in_one_line(&out, "(nothing was written)", needle);
        c.assert_untouched(&orig, needle);
    }
}

/// A key derivation that cannot get its memory (here `ulimit -v`) is refused before
/// anything is written, naming the fix. It read "invalid LUKS header: argon2 failed:
/// out of memory", and under `enable` the volume stayed unmounted and shrunk.
#[test]
fn walker_a_key_derivation_without_its_memory_is_refused_before_writing() {
    require_tool("prlimit");
    let (c, orig) = Case::new(16, 71);
    let out = run(Command::new("prlimit")
        .arg(format!("--as={}", 700u64 << 20))
        .arg(luksify_bin())
        .args([
            "encrypt",
            &c.img(),
            "--header",
            &c.hdr(),
            "--key-file",
            &c.key(),
        ])
        .args([
            "--pbkdf",
            "argon2id",
            "--pbkdf-memory",
            "1048576",
            "--pbkdf-force-iterations",
            "4",
        ]));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_refused_in_one_line(&out, "argon2 could not get its 1048576 KiB", "argon2 OOM");
    assert_refused_in_one_line(&out, "--pbkdf pbkdf2 (nothing was written)", "argon2 OOM");
    c.assert_untouched(&orig, "argon2 OOM");
}

/// `resume --header BACKUP` of a run whose header is in front of the data (a
/// `luksHeaderBackup` taken mid-run) is refused: the run would go on in the copy and
/// leave the device's own header behind, and the next resume from that walked the
/// moved data again (a trial lost 200 MB so). Without `--header` it finishes.
#[test]
fn walker_resume_refuses_a_copy_of_the_header_in_front() {
    require_tool("cryptsetup");
    let (c, orig) = Case::new(32, 83);
    let mut enc = shift_encrypt(&c);
    kill_after_commits(&mut enc, &c.p("img"), 0, 6, 0);
    assert!(
        luks_dump(&c.p("img")).contains("online-reencrypt"),
        "the premise: killed mid-run"
    );
    run_ok(
        Command::new("cryptsetup")
            .args(["luksHeaderBackup", &c.img(), "--header-backup-file"])
            .arg(c.p("bak")),
    );
    let before = (
        std::fs::read(c.p("img")).unwrap(),
        std::fs::read(c.p("bak")).unwrap(),
    );
    let bak = c.p("bak").display().to_string();
    let out = run(&mut luksify(&[
        "resume",
        &c.img(),
        "--header",
        &bak,
        "--key-file",
        &c.key(),
    ]));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_refused_in_one_line(
        &out,
        "resume without --header (nothing was written)",
        "backup",
    );
    assert!(
        (
            std::fs::read(c.p("img")).unwrap(),
            std::fs::read(c.p("bak")).unwrap()
        ) == before,
        "something was written"
    );
    run_ok(luksify(&["resume", &c.img(), "--key-file", &c.key()]).args(SMALL));
    let plain = c.p("plain.hdr").display().to_string();
    run_ok(
        luksify(&[
            "decrypt",
            &c.img(),
            "--key-file",
            &c.key(),
            "--header",
            &plain,
        ])
        .args(SMALL),
    );
    let back = std::fs::read(c.p("img")).unwrap();
    let kept = orig.len() - (8 << 20);
    assert!(back[..kept] == orig[..kept], "the plaintext differs");
}

/// The detached header file deleted while the run goes on (a cleanup script, a wrong
/// `rm`): the run went on into the unlinked file and reported "encryption finished",
/// exit 0, the only copy of the key gone with it (a trial, every resilience mode;
/// cryptsetup at least failed its next metadata update). luksify now stops at its next
/// commit and writes the header back where it was (mode 0600), exit 1 saying so; the
/// run resumes from it and the data decrypts back byte for byte.
#[test]
fn walker_a_header_file_deleted_mid_run_is_written_back_and_the_run_stops() {
    use std::os::unix::fs::PermissionsExt as _;
    // (`none` commits too seldom for a deletion to land between two commits here.)
    for (i, res) in ["checksum", "journal"].into_iter().enumerate() {
        let (c, orig) = Case::new(48, 90 + i as u64);
        let mut cmd = detached_encrypt(&c);
        cmd.args(["--resilience", res])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        // Once it has committed past its first hotzones, the file goes.
        let t = std::time::Instant::now();
        while luksify_tests::header_seqid(&c.p("hdr")) < 8 {
            assert!(
                child.try_wait().unwrap().is_none(),
                "{res}: ended before its third commit"
            );
            assert!(t.elapsed().as_secs() < 60, "{res}: no commits");
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        std::fs::remove_file(c.p("hdr")).unwrap();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // (Deleted at its 8th commit of about 50: the run is far from its end.)
        assert_eq!(out.status.code(), Some(1), "{res}: {err}");
        assert!(
            err.contains("was deleted while the run went on")
                && err.contains(&format!("wrote it back to {}", c.hdr())),
            "{res}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{res}: {err}");
        let mode = std::fs::metadata(c.p("hdr")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{res}");
        let out = run(&mut detached_resume(&c));
        assert!(out.status.success(), "{res}: {out:?}");
        run_ok(&mut detached_decrypt(&c));
        assert!(
            std::fs::read(c.p("img")).unwrap() == orig,
            "{res}: data differs"
        );
    }
}

/// A refusal's fix, followed as written, works: with a data shift, a keyslots area too
/// small is fixed by --luks2-keyslots-size, not by "a larger --offset" (which changed
/// nothing); and `decrypt --header NEW` of a header-in-front run still in progress
/// names `resume` without --header (the run's header is the device's own, and "resume
/// --header NEW" failed: "cannot open header file"). Both trial G's.
#[test]
fn walker_a_refusals_fix_followed_as_written_works() {
    require_tool("cryptsetup");
    let (c, orig) = Case::new(64, 98);
    let (img, key) = (c.img(), c.key());
    let out = run(luksify(&["encrypt", &img, "--key-file", &key])
        .args(["--reduce-device-size", "32M", "--luks2-keyslots-size", "4k"])
        .args(FAST));
    assert_refused_in_one_line(&out, "use --luks2-keyslots-size 262144 or more", "keyslots");
    assert_file_is(c.p("img").as_path(), &orig, "keyslots: image changed");
    run_ok(
        luksify(&["encrypt", &img, "--key-file", &key])
            .args([
                "--reduce-device-size",
                "32M",
                "--luks2-keyslots-size",
                "262144",
            ])
            .args(FAST),
    );
    cryptsetup_unlocks(&c);
    // A reduction too small for the header names the least that holds it.
    let (c, orig) = Case::new(64, 102);
    let out = shifted(&c, "64k");
    assert_refused_in_one_line(&out, "use --reduce-device-size 1M", "64k");
    c.assert_untouched(&orig, "64k");
    let out = shifted(&c, "1M");
    assert!(out.status.success(), "{out:?}");
    cryptsetup_unlocks(&c);
    // A header-in-front encryption set up by cryptsetup and not begun.
    let (c, _) = Case::new(64, 99);
    let (img, key) = (c.img(), c.key());
    run_ok(&mut luksify_tests::cryptsetup_init_shift(
        &c.p("img"),
        &c.p("key"),
    ));
    let before = std::fs::read(&img).unwrap();
    let new = c.p("new.hdr");
    let out = run(&mut luksify(&[
        "decrypt",
        &img,
        "--key-file",
        &key,
        "--header",
        new.to_str().unwrap(),
    ]));
    let want = format!("finish it with `luksify resume {img} --key-file F` first");
    assert_refused_in_one_line(&out, &want, "decrypt of a run in progress");
    assert_file_is(c.p("img").as_path(), &before, "decrypt: image changed");
    assert!(!new.exists(), "decrypt made its header file");
    run_ok(&mut luksify(&["resume", &img, "--key-file", &key]));
    cryptsetup_unlocks(&c);
}

/// The smallest device a data shift takes is cryptsetup's: the reduction plus one
/// sector of data (luksify wanted two sectors; a trial). Encrypted, cryptsetup unlocks
/// it, and decrypted the sector is back; the reduction alone is refused.
#[test]
fn walker_the_smallest_shifted_device_is_cryptsetups() {
    require_tool("cryptsetup");
    let (c, orig) = Case::sized((32 << 20) + 512, 100);
    let out = shifted(&c, "32M");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cryptsetup_unlocks(&c);
    let new = c.p("moved.hdr");
    run_ok(&mut luksify(&[
        "decrypt",
        &c.img(),
        "--key-file",
        &c.key(),
        "--header",
        new.to_str().unwrap(),
    ]));
    assert!(
        std::fs::read(c.p("img")).unwrap()[..512] == orig[..512],
        "the sector is not back"
    );
    let (s, orig) = Case::sized(32 << 20, 101);
    let out = shifted(&s, "32M");
    assert_refused_in_one_line(&out, "too small", "a device of the reduction alone");
    s.assert_untouched(&orig, "a device of the reduction alone");
}

/// A file-size limit (`ulimit -f`): SIGXFSZ ended a trial's run without a word, its
/// volume left unmounted. A write past a hard limit fails with EFBIG and is said with
/// the limit to look at (the header file that cannot be reserved: nothing written, the
/// file not left); a soft one is raised to the hard.
#[test]
fn walker_a_file_size_limit_is_said_never_a_silent_death() {
    let (c, orig) = Case::new(24, 12);
    let under = |limit: &str, cmd: &Command| {
        let mut sh = Command::new("bash");
        sh.arg("-c")
            .arg(format!("ulimit {limit} 1000 && exec \"$@\""))
            .arg("bash")
            .arg(cmd.get_program())
            .args(cmd.get_args());
        run(&mut sh)
    };
    let out = under("-f", &detached_encrypt(&c));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.lines().count() == 1
            && err.contains("File too large")
            && err.contains(
                "a file-size limit is in force: run it without one, `ulimit -f unlimited`"
            )
            && err.contains("the device was not touched"),
        "{err}"
    );
    c.assert_untouched(&orig, "a hard file-size limit");
    // `format` writes its header file whole: EFBIG, and where to look.
    let fmt = luksify(&[
        "format",
        "-q",
        &c.img(),
        "--header",
        &c.p("other").display().to_string(),
        "--key-file",
        &c.key(),
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
    ]);
    let out = under("-f", &fmt);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && err.contains("File too large") && err.contains("ulimit -f"),
        "{err}"
    );
    // A soft limit alone is raised: the run goes through.
    let out = under("-S -f", &detached_encrypt(&c));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        same(&cryptsetup_decrypt_detached(&c), &orig),
        "cryptsetup decrypt differs"
    );
}

/// A `--reduce-device-size` start killed at each of its first flushes: while its first
/// header is not written, the device must not show the filesystem it held once the
/// keyslot area has gone over its first blocks (an intact superblock over overwritten
/// group descriptors, for `mount` or `fsck` to take; trial C2), and the same `encrypt`
/// run again continues it to the original plaintext. A filesystem it does show is the
/// user's to change before that rerun (trial R3 mounted it), and the rerun must keep
/// the change: it rolled back a change made after the marker saying "moved" was written
/// (the rerun put back the first part moved before it).
#[test]
fn walker_a_cut_shift_start_never_shows_the_filesystem_it_overwrote() {
    require_tool("strace");
    require_tool("mkfs.ext4");
    require_tool("blkid");
    require_tool("debugfs");
    for at in 1..=6u64 {
        let (c, _) = Case::new(32, 21 + at);
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F", &c.img(), "24M"]));
        let orig = std::fs::read(c.p("img")).unwrap();
        let img = std::fs::canonicalize(c.p("img")).unwrap();
        luksify_tests::kill_at_fdatasync_of(&shift_encrypt(&c), &img, at);
        let now = std::fs::read(c.p("img")).unwrap();
        let header = now[..6] == *b"LUKS\xba\xbe";
        // Past the superblock's 4 KiB: what the keyslot area or the header went over.
        let overwritten = now[4096..8 << 20] != orig[4096..8 << 20];
        let shown = run(Command::new("blkid")
            .args(["-p", "-o", "value", "-s", "TYPE"])
            .arg(&img));
        let shown = String::from_utf8_lossy(&shown.stdout).trim().to_string();
        assert!(
            !(overwritten && !header && shown.starts_with("ext")),
            "kill at flush {at}: {shown} shown over overwritten blocks, no LUKS header"
        );
        let mut want = orig.clone();
        if shown.starts_with("ext") {
            std::fs::write(
                c.p("note"),
                format!("written after the cut at flush {at}\n"),
            )
            .unwrap();
            let put = format!("write {} after-cut", c.p("note").display());
            run_ok(Command::new("debugfs").args(["-w", "-R", &put]).arg(&img));
            want = std::fs::read(c.p("img")).unwrap();
            // The new inode and directory entry are in the first 4 MiB, the part moved.
            assert!(
                want[..4 << 20] != now[..4 << 20],
                "kill at flush {at}: the change did not reach the first part"
            );
            // `resume` has no header to go on from: refused, nothing written, and past
            // the first marker it names the command that goes on.
            let out = run(&mut luksify(&["resume", &c.img(), "--key-file", &c.key()]));
            assert!(!out.status.success(), "kill at flush {at}: resume went on");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                at == 1 || err.contains("before it wrote over the start of the device"),
                "kill at flush {at}: {err}"
            );
            assert!(std::fs::read(c.p("img")).unwrap() == want, "resume wrote");
        }
        // (The last 8 MiB, given up for the shift, are not kept.)
        let back = rerun_shift_and_decrypt(&c);
        assert!(
            back[..24 << 20] == want[..24 << 20],
            "kill at flush {at}: the filesystem differs from what it was before the rerun"
        );
    }
}

/// A `--reduce-device-size` start cut just as its marker went over byte 0 shows its
/// filesystem again when that marker did not land whole, or when `e2fsck -y` took the
/// superblock back from a backup over it: the filesystem is then the user's to change,
/// and the rerun must keep the change. Trial V9 did both (the first sector of the marker
/// alone landed, as a power cut may leave it; a repair by hand), mounted, changed files,
/// and the rerun put back the first part moved before: the change was rolled back.
#[test]
fn walker_a_cut_shift_start_keeps_a_filesystem_shown_again_and_changed() {
    require_tool("strace");
    require_tool("mkfs.ext4");
    require_tool("debugfs");
    require_tool("e2fsck");
    for (case, seed) in [("torn marker", 41u64), ("e2fsck -y", 42)] {
        let (c, _) = Case::new(32, seed);
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F", "-b", "1024", &c.img(), "24M"]));
        let orig = std::fs::read(c.p("img")).unwrap();
        let img = std::fs::canonicalize(c.p("img")).unwrap();
        // Killed as it flushes the marker at byte 0 (the moved copy and the end marker
        // are durable).
        luksify_tests::kill_at_fdatasync_of(&shift_encrypt(&c), &img, 3);
        let mut now = std::fs::read(c.p("img")).unwrap();
        assert!(
            now[..16] == *b"LUKSIFY-SHIFT-V1" && now[4096..8 << 20] == orig[4096..8 << 20],
            "{case}: not cut just after the marker at byte 0"
        );
        let marker = now[..4096].to_vec();
        if case == "torn marker" {
            // Its first sector alone landed.
            now[512..4096].copy_from_slice(&orig[512..4096]);
            std::fs::write(c.p("img"), &now).unwrap();
        } else {
            let out = run(Command::new("e2fsck").args(["-f", "-y"]).arg(&img));
            assert_eq!(out.status.code(), Some(1), "{case}: {out:?}");
        }
        std::fs::write(c.p("note"), format!("written after the cut ({case})\n")).unwrap();
        let put = format!("write {} after-cut", c.p("note").display());
        run_ok(Command::new("debugfs").args(["-w", "-R", &put]).arg(&img));
        // What the filesystem is now, but for the sectors still holding the marker's
        // bytes, which are the filesystem's as they were.
        let mut want = std::fs::read(c.p("img")).unwrap();
        for i in (0..4096).step_by(512) {
            if want[i..i + 512] == marker[i..i + 512] {
                want[i..i + 512].copy_from_slice(&orig[i..i + 512]);
            }
        }
        let back = rerun_shift_and_decrypt(&c);
        assert!(
            back[..24 << 20] == want[..24 << 20],
            "{case}: the filesystem differs from what it was before the rerun"
        );
        // The marker was not moved into the data as the filesystem's first bytes.
        assert!(
            back[..16] != *b"LUKSIFY-SHIFT-V1",
            "{case}: the marker is in the data"
        );
    }
}

/// A `--reduce-device-size` start cut once its keyslot area had gone over the head, whose
/// head was then "repaired" by hand (`e2fsck -f -y` finds a superblock backup and rewrites
/// the first block): the moved copy is the data, and the same `encrypt` run again puts it
/// back. Trial V10: the repaired head was taken for the data and moved over the intact
/// copy, and every file was lost.
#[test]
fn walker_a_cut_shift_start_repaired_by_hand_over_its_keyslots_keeps_the_moved_copy() {
    require_tool("strace");
    require_tool("mkfs.ext4");
    require_tool("e2fsck");
    let (c, _) = Case::new(32, 43);
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", "-b", "1024", &c.img(), "24M"]));
    let orig = std::fs::read(c.p("img")).unwrap();
    let img = std::fs::canonicalize(c.p("img")).unwrap();
    // Killed as it flushes the keyslot area (the markers are durable).
    luksify_tests::kill_at_fdatasync_of(&shift_encrypt(&c), &img, 5);
    let now = std::fs::read(c.p("img")).unwrap();
    assert!(
        now[..16] == *b"LUKSIFY-SHIFT-V1" && now[64 << 10..128 << 10] != orig[64 << 10..128 << 10],
        "not cut with the keyslot area over the head"
    );
    let out = run(Command::new("e2fsck").args(["-f", "-y"]).arg(&img));
    let repaired = std::fs::read(c.p("img")).unwrap();
    assert!(
        repaired[..4096] != now[..4096],
        "e2fsck did not write the first block: {out:?}"
    );
    let back = rerun_shift_and_decrypt(&c);
    // The first 4 MiB (the part moved) as the run began; past them, what e2fsck left
    // (it also rewrote a backup superblock there, which no one can take back).
    assert!(
        back[..4 << 20] == orig[..4 << 20],
        "the moved part is not the one the run began with"
    );
    assert!(
        back[4 << 20..24 << 20] == repaired[4 << 20..24 << 20],
        "the rest of the filesystem changed"
    );
}

/// `encrypt` over a LUKS2 header whose two copies are both damaged: refused, nothing
/// written, and not sent to `resume` (which cannot read it either: a trial followed
/// "holds an interrupted run that `luksify resume` continues" into its refusal).
#[test]
fn walker_encrypt_over_a_header_damaged_in_both_copies_says_what_it_is() {
    let (c, _) = Case::new(24, 6);
    run_ok(luksify(&["format", "-q", &c.img(), "--key-file", &c.key()]).args(FAST));
    let mut img = std::fs::read(c.p("img")).unwrap();
    // A byte of each copy's JSON area: both checksums fail.
    for at in [4096 + 64, 16384 + 4096 + 64] {
        img[at] ^= 0x5a;
    }
    std::fs::write(c.p("img"), &img).unwrap();
    for place in [vec!["--header", "hdr"], vec!["--reduce-device-size", "4M"]] {
        let hdr = c.hdr();
        let place: Vec<&str> = place
            .iter()
            .map(|a| if *a == "hdr" { hdr.as_str() } else { a })
            .collect();
        let (img_path, key) = (c.img(), c.key());
        let mut args = vec!["encrypt", &img_path, "--key-file", &key];
        args.extend(place.iter().copied());
        let out = run(luksify(&args).args(FAST));
        assert_refused_in_one_line(&out, "a LUKS2 header that cannot be read", "encrypt");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("luksify resume"), "{err}");
        c.assert_untouched(&img, "damaged header");
    }
}

/// `resume` from a header one copy of which is damaged goes on from the other, as
/// cryptsetup does, and says so (trial C2: it went on silently, where `dump` warns);
/// the result decrypts with cryptsetup to the original.
#[test]
fn walker_resume_from_a_damaged_header_copy_says_so() {
    require_tool("cryptsetup");
    let (c, orig) = Case::new(24, 14);
    kill_after_commits(&mut detached_encrypt(&c), &c.p("hdr"), 0, 2, 0);
    let mut hdr = std::fs::read(c.p("hdr")).unwrap();
    assert!(hdr[..6] == *b"LUKS\xba\xbe", "no header written");
    // A byte of the primary's JSON area.
    hdr[4096 + 64] ^= 0x5a;
    std::fs::write(c.p("hdr"), &hdr).unwrap();
    let out = run(&mut detached_resume(&c));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning: LUKS2 header: the primary copy is damaged")
            && err.contains("the secondary was used"),
        "{err}"
    );
    assert!(
        same(&cryptsetup_decrypt_detached(&c), &orig),
        "cryptsetup decrypt differs"
    );
}

/// A header file emptied to 0 bytes (`: > FILE`) after its run began, the device half
/// encrypted: `encrypt` took the empty file for a new one and encrypted the walked part
/// a second time (trial V7: data lost), with and without `--offset`. Refused now,
/// nothing written, and `resume` gives the advice `encrypt` follows; the header put
/// back, the run finishes and decrypts to the original.
#[test]
fn walker_a_header_file_emptied_mid_run_is_never_taken_for_a_new_one() {
    require_tool("mkfs.ext4");
    for offset in [None, Some("2048")] {
        let (c, _) = Case::new(32, 17);
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(c.p("img")));
        let orig = std::fs::read(c.p("img")).unwrap();
        let encrypt = || {
            let mut cmd = detached_encrypt(&c);
            if let Some(o) = offset {
                cmd.args(["--offset", o]);
            }
            cmd
        };
        kill_after_commits(&mut encrypt(), &c.p("hdr"), 0, 4, 0);
        let header = std::fs::read(c.p("hdr")).unwrap();
        let walked = std::fs::read(c.p("img")).unwrap();
        assert!(walked != orig, "{offset:?}: nothing was walked");
        std::fs::write(c.p("hdr"), b"").unwrap();
        let out = run(&mut encrypt());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(1)
                && err.contains("shows no filesystem where its data starts")
                && err.contains("restore it from a copy"),
            "{offset:?}: encrypt over the emptied header said: {err}"
        );
        assert_file_is(
            &c.p("img"),
            &walked,
            &format!("{offset:?}: the walked data was written again"),
        );
        assert_file_is(
            &c.p("hdr"),
            b"",
            &format!("{offset:?}: the header file was written"),
        );
        // (With --offset the device still shows its filesystem at byte 0, and `resume`,
        // with no header to say where the data starts, cannot know better: its advice
        // leads to `encrypt`, whose refusal above says the rest.)
        let out = run(&mut detached_resume(&c));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && if offset.is_none() {
                    err.contains(
                        "remove the header file and run the same `luksify encrypt` command again",
                    ) && err.contains("restore it from a copy")
                } else {
                    err.contains("pass the header file the run was started with")
                },
            "{offset:?}: resume said: {err}"
        );
        std::fs::write(c.p("hdr"), &header).unwrap();
        run_ok(&mut detached_resume(&c));
        run_ok(&mut detached_decrypt(&c));
        assert_file_is(
            &c.p("img"),
            &orig,
            &format!("{offset:?}: decrypted data differs"),
        );
    }
}

/// `encrypt`, `resume` and `decrypt` take `--keyfile-offset`/`--keyfile-size` as
/// cryptsetup does: the run's keyslot opens with that part of the file, in cryptsetup
/// too, and not with the whole file (a run killed mid-walk resumes with the part only).
#[test]
fn walker_keyfile_offset_and_size_are_cryptsetups() {
    require_tool("cryptsetup");
    require_tool("strace");
    let (c, orig) = Case::new(16, 91);
    std::fs::write(c.p("key"), b"headerXYZsecret-partTAIL").unwrap();
    let part = ["--keyfile-offset", "9", "--keyfile-size", "11"];
    let mut enc = detached_encrypt(&c);
    enc.args(part);
    let cut = luksify_tests::kill_at_fdatasync(&enc, 8);
    assert!(!cut.status.success(), "the run was not cut");
    let resume = || detached_resume(&c);
    assert_eq!(
        run(&mut resume()).status.code(),
        Some(2),
        "the whole file resumed it"
    );
    run_ok(resume().args(part));
    let opens = |part: &[&str]| {
        run(Command::new("cryptsetup")
            .args(["open", "--test-passphrase", "-q", "--header", &c.hdr()])
            .args(["--key-file", &c.key()])
            .args(part)
            .arg(c.img()))
        .status
        .success()
    };
    assert!(opens(&part), "cryptsetup does not open it with the part");
    assert!(!opens(&[]), "the whole file opens it");
    let out = run(&mut detached_decrypt(&c));
    assert_eq!(
        out.status.code(),
        Some(2),
        "the whole file decrypted it: {out:?}"
    );
    run_ok(detached_decrypt(&c).args(part));
    assert!(
        std::fs::read(c.p("img")).unwrap() == orig,
        "decrypted, the image differs"
    );
}

/// A walker command given a directory (a mount point) or a `LABEL=`/`UUID=` tag says
/// what it wants in one line, nothing written: trial N2 got "cannot open: Is a
/// directory (os error 21)" and "LABEL=...: cannot open: No such file or directory".
/// (A tag that a device carries is resolved as `open` resolves it.)
#[test]
fn walker_commands_name_what_they_want_for_a_directory_or_a_tag() {
    let (c, _) = Case::new(1, 3);
    let dir = c.p("mnt");
    std::fs::create_dir(&dir).unwrap();
    let (key, hdr) = (c.key(), c.hdr());
    let dir_s = dir.display().to_string();
    for (target, said) in [
        (
            dir_s.as_str(),
            "is a directory: give the device or image file itself",
        ),
        (
            "LABEL=luksify-no-such-label-anywhere",
            "no block device carries it",
        ),
    ] {
        for cmd in [
            vec!["encrypt", target, "--key-file", &key, "--header", &hdr],
            vec!["decrypt", target, "--key-file", &key, "--header", &hdr],
            vec!["resume", target, "--key-file", &key],
        ] {
            let out = run(&mut luksify(&cmd));
            assert_refused_in_one_line(&out, said, cmd[0]);
            assert!(!c.p("hdr").exists(), "{cmd:?}: a header file was made");
        }
    }
}

/// Progress as cryptsetup shows it, for scripts that read it: `--progress-json` prints one
/// JSON object per line on standard output with the keys of cryptsetup's own
/// `--progress-json` (checked against cryptsetup's output for the same kind of run), all
/// strings, the last one the whole device at ETA 0; `--progress-frequency` prints
/// "Progress: ..." lines and a last "Finished, time ..., N MiB written, speed ..." as
/// cryptsetup's; without either, a pipe gets none. `--hotzone-size` is taken with
/// cryptsetup's units. (A trial's script found none of the options, and no progress
/// outside a terminal.)
#[test]
fn walker_progress_is_shown_as_cryptsetup_shows_it() {
    require_tool("cryptsetup");
    let (c, orig) = Case::new(24, 7710);
    let json_lines = |out: &std::process::Output| -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect()
    };
    let keys = |v: &serde_json::Value| -> Vec<String> {
        let o = v.as_object().unwrap();
        assert!(o.values().all(|x| x.is_string()), "not all strings: {v}");
        let mut k: Vec<String> = o.keys().cloned().collect();
        k.sort();
        k
    };
    // cryptsetup's, on a copy.
    let (theirs, _) = Case::new(24, 7711);
    let mut cs = cryptsetup_encrypt_args(&theirs, "checksum");
    cs.push("--progress-json".into());
    let out = run_ok(Command::new(&cs[0]).args(&cs[1..]));
    let want = json_lines(&out);
    assert!(!want.is_empty(), "cryptsetup printed no progress: {out:?}");
    // Ours.
    let out = run_ok(encrypt_into(&c, &c.hdr()).args(FAST).args([
        "--progress-json",
        "--hotzone-size",
        "1M",
        "--chunk-mib",
        "1",
    ]));
    let got = json_lines(&out);
    let last = got.last().unwrap_or_else(|| panic!("no progress: {out:?}"));
    assert_eq!(keys(last), keys(&want[0]), "{last} vs {}", want[0]);
    for v in &got {
        assert_eq!(keys(v), keys(last), "{v}");
    }
    assert_eq!(last["device_bytes"], last["device_size"], "{last}");
    assert_eq!(last["device_size"], (24u64 << 20).to_string(), "{last}");
    assert_eq!(last["eta_ms"], "0", "{last}");
    assert_eq!(last["device"], c.img(), "{last}");
    // Lines, then the last one.
    let out = run_ok(detached_decrypt(&c).args(["--progress-frequency", "1"]));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let last = text
        .lines()
        .last()
        .unwrap_or_else(|| panic!("no progress: {out:?}"));
    assert!(
        last.starts_with("Finished, time 00m")
            && last.contains("  24 MiB written, speed ")
            && last.ends_with("/s"),
        "{text}"
    );
    assert!(
        text.lines()
            .all(|l| l.starts_with("Progress: ") || l.starts_with("Finished, time ")),
        "{text}"
    );
    assert_eq!(std::fs::read(c.p("img")).unwrap(), orig);
    // Neither option, not a terminal: nothing on standard output.
    std::fs::remove_file(c.p("hdr")).unwrap();
    let out = run_ok(encrypt_into(&c, &c.hdr()).args(FAST));
    assert!(out.stdout.is_empty(), "{out:?}");
}

/// `resume` of a decryption cryptsetup finished (its header left with a linear segment,
/// no keyslot, and its keyslots area not wiped) zeroes that area and says the decryption
/// had already finished, exit 0, the plaintext untouched; asked again, it says there is
/// nothing to resume (exit 1). (It said "decryption finished" as if it had walked it,
/// where the same command after its own decryption said "nothing to resume", and then
/// printed that notice as a warning before "decryption finished"; two trials.)
#[test]
fn walker_resume_of_a_decryption_cryptsetup_finished_says_so() {
    require_tool("cryptsetup");
    let (c, orig) = Case::new(16, 7720);
    let cs = cryptsetup_encrypt_args(&c, "checksum");
    run_ok(Command::new(&cs[0]).args(&cs[1..]));
    assert_eq!(
        cryptsetup_decrypt_detached(&c),
        orig,
        "cryptsetup's decryption"
    );
    let resume = || run(&mut detached_resume(&c));
    let out = resume();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success()
            && err.contains("the decryption had already finished")
            && err.contains("now zeroed")
            && !err.contains("warning")
            && !err.contains("decryption finished"),
        "{err}"
    );
    let hdr = std::fs::read(c.p("hdr")).unwrap();
    assert!(
        hdr[32768..].iter().all(|&b| b == 0),
        "keyslots area not zeroed"
    );
    assert_eq!(
        std::fs::read(c.p("img")).unwrap(),
        orig,
        "the plaintext changed"
    );
    let out = resume();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing to resume"),
        "{out:?}"
    );
}

/// A LUKS1 header cryptsetup converted to LUKS2 with keyslot 7 in use has no free room
/// after its last keyslot area, only gaps between the slots: the decryption's area goes
/// in the largest gap, as cryptsetup's does (it was refused for "no free room in the
/// keyslots area"; a trial). Its plaintext equals cryptsetup's decryption of a copy.
#[test]
fn walker_decrypts_a_converted_luks1_volume_whose_last_keyslot_is_in_use() {
    require_tool("cryptsetup");
    let (c, _) = Case::new(0, 7730);
    sparse_file(&c.p("img"), 40 << 20);
    std::fs::write(c.p("key7"), b"slot seven").unwrap();
    run_ok(&mut luksify_tests::cryptsetup_format_fast(
        "luks1",
        &c.p("img"),
        &c.p("key"),
    ));
    run_ok(
        Command::new("cryptsetup")
            .args(["luksAddKey", "-q", "--pbkdf-force-iterations", "1000"])
            .args(["--key-slot", "7", "--key-file", &c.key(), &c.img()])
            .arg(c.p("key7")),
    );
    run_ok(Command::new("cryptsetup").args(["convert", "-q", "--type", "luks2", &c.img()]));
    cryptsetup_decrypts_a_copy(&c, &[]);
    let out = run(decrypt_moving_the_header(&c).arg(c.hdr()));
    assert!(out.status.success(), "{out:?}");
    // The device less the data offset (2 MiB) the header took.
    assert_plaintext_as_cryptsetups(&c, (40 << 20) - (2 << 20));
}

/// `cryptsetup reencrypt --decrypt` (with `extra` options) of a copy of `c`'s image,
/// `cs.img`, its header moved to `cs.hdr`: the plaintext to compare ours with.
fn cryptsetup_decrypts_a_copy(c: &Case, extra: &[&str]) {
    std::fs::copy(c.p("img"), c.p("cs.img")).unwrap();
    run_ok(
        Command::new("cryptsetup")
            .args(["reencrypt", "--decrypt", "--force-offline-reencrypt", "-q"])
            .args(extra)
            .args([
                "--header",
                &c.p("cs.hdr").display().to_string(),
                "--key-file",
                &c.key(),
                &c.p("cs.img").display().to_string(),
            ]),
    );
}

/// `luksify decrypt` of `c`'s image with its key, the header moving to the file given
/// next (`--header` comes last: the caller adds the file).
fn decrypt_moving_the_header(c: &Case) -> Command {
    let mut cmd = Command::new(luksify_bin());
    cmd.args(["decrypt", &c.img(), "--key-file", &c.key(), "--header"]);
    cmd
}

/// Our plaintext (the image) is cryptsetup's (`cs.img`) over its first `plain` bytes:
/// the device less the data offset the header took (the bytes past it are neither
/// tool's data).
fn assert_plaintext_as_cryptsetups(c: &Case, plain: usize) {
    assert!(
        std::fs::read(c.p("img")).unwrap()[..plain]
            == std::fs::read(c.p("cs.img")).unwrap()[..plain],
        "luksify's plaintext differs from cryptsetup's"
    );
}

/// `decrypt --key-slot N` (`-S N`) tries that keyslot, even at priority `ignore`, as
/// `cryptsetup reencrypt --decrypt --key-slot` does: without it such a volume could not
/// be decrypted until its priority was changed back (a trial). The plaintext equals
/// cryptsetup's decryption of a copy.
#[test]
fn walker_decrypt_takes_a_key_slot_as_cryptsetup() {
    require_tool("cryptsetup");
    let (c, _) = Case::new(0, 7740);
    sparse_file(&c.p("img"), 40 << 20);
    run_ok(&mut luksify_tests::cryptsetup_format_fast(
        "luks2",
        &c.p("img"),
        &c.p("key"),
    ));
    run_ok(Command::new("cryptsetup").args([
        "config",
        "--priority",
        "ignore",
        "--key-slot",
        "0",
        &c.img(),
    ]));
    cryptsetup_decrypts_a_copy(&c, &["--key-slot", "0"]);
    let before = std::fs::read(c.p("img")).unwrap();
    let decrypt = |extra: &[&str]| run(decrypt_moving_the_header(&c).arg(c.hdr()).args(extra));
    let out = decrypt(&[]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        std::fs::read(c.p("img")).unwrap() == before && !c.p("hdr").exists(),
        "a refused decrypt wrote"
    );
    let out = decrypt(&["-S", "0"]);
    assert!(out.status.success(), "{out:?}");
    // The device less cryptsetup's default 16 MiB data offset.
    assert_plaintext_as_cryptsetups(&c, (40 << 20) - (16 << 20));
}
