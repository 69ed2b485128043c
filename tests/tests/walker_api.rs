//! The walker as a library, as an embedding agent calls it on image files: every refusal
//! comes before the first write (the header store and the data are compared byte for
//! byte afterwards), a stop asked before the first write writes nothing, a panicking
//! progress callback leaves a resumable run, and a resume after a cut near the end still
//! reports the end. No root needed.

use luksify_luks::io::{Disk, MemDisk};
use luksify_luks::kdf::KdfRequest;
use luksify_luks::luks2::FormatOptions;
use luksify_walker::device::DataDevice;
use luksify_walker::lock::HeaderDisk;
use luksify_walker::powercut::PowerCutDisk;
use luksify_walker::{
    Control, DecryptOptions, EncryptOptions, Error, Hash, Outcome, Placement, ProgressInfo,
    Resilience, Tuning,
};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

const PASS: &[u8] = b"api test passphrase";
const SIZE: usize = 24 << 20;

struct Fx {
    _dir: tempfile::TempDir,
    img: PathBuf,
    hdr: PathBuf,
    orig: Vec<u8>,
}

impl Fx {
    fn new() -> Fx {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        let mut orig = vec![0u8; SIZE];
        luksify_tests::fill_volume(&mut orig, 7);
        std::fs::write(&img, &orig).unwrap();
        let hdr = dir.path().join("hdr");
        Fx {
            _dir: dir,
            img,
            hdr,
            orig,
        }
    }
    fn data(&self) -> DataDevice {
        DataDevice::open(&self.img, true).unwrap()
    }
    fn header_at(p: &Path) -> HeaderDisk {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(p)
            .unwrap();
        HeaderDisk::new(f).unwrap()
    }
    fn header(&self) -> HeaderDisk {
        Fx::header_at(&self.hdr)
    }
    fn assert_data_unchanged(&self) {
        assert!(
            std::fs::read(&self.img).unwrap() == self.orig,
            "the data image changed"
        );
    }
    fn encrypt(
        &self,
        res: Resilience,
        tuning: Tuning,
        ctl: &Control<'_>,
    ) -> Result<Outcome, Error> {
        self.encrypt_into(&self.header(), res, tuning, ctl)
    }
    /// encrypt / decrypt / resume of the image with header store `h`.
    fn encrypt_into(
        &self,
        h: &HeaderDisk,
        res: Resilience,
        tuning: Tuning,
        ctl: &Control<'_>,
    ) -> Result<Outcome, Error> {
        luksify_walker::encrypt(&self.data(), Some(h), PASS, &opts(res, tuning), ctl)
    }
    fn decrypt_from(
        &self,
        h: &HeaderDisk,
        pass: &[u8],
        t: Tuning,
        ctl: &Control<'_>,
    ) -> Result<Outcome, Error> {
        let o = dopts(Resilience::Checksum, t);
        luksify_walker::decrypt(&self.data(), Some(h), pass, &o, ctl)
    }
    fn resume_from(
        &self,
        h: &HeaderDisk,
        pass: &[u8],
        t: Tuning,
        ctl: &Control<'_>,
    ) -> Result<Outcome, Error> {
        luksify_walker::resume(&self.data(), Some(h), pass, t, ctl)
    }
    fn decrypt_back(&self) {
        let o = self.decrypt_from(&self.header(), PASS, small(), &Control::default());
        assert_eq!(o.unwrap(), Outcome::Finished);
        self.assert_data_unchanged();
    }
}

fn small() -> Tuning {
    Tuning {
        chunk: 1 << 20,
        hotzone: 4 << 20,
        ..Tuning::default()
    }
}

fn opts(res: Resilience, tuning: Tuning) -> EncryptOptions {
    EncryptOptions {
        placement: Placement::Detached { resilience: res },
        format: FormatOptions {
            kdf: KdfRequest::fast_pbkdf2(),
            ..FormatOptions::default()
        },
        checksum_hash: Hash::Sha256,
        tuning,
    }
}

fn dopts(res: Resilience, tuning: Tuning) -> DecryptOptions {
    DecryptOptions {
        resilience: res,
        checksum_hash: Hash::Sha256,
        tuning,
        key_slot: None,
    }
}

fn refused(r: Result<Outcome, Error>, has: &str) {
    match r {
        Err(Error::Refused(m)) => {
            assert!(m.contains(has), "{m}");
            assert!(m.contains("nothing was written"), "{m}");
        }
        other => panic!("expected a refusal saying {has:?}, got {other:?}"),
    }
}

/// A header store that is the data itself (the same file, a symlink, a hard link) is
/// refused by encrypt, decrypt and resume; the image is unchanged. The library wrote its
/// header over the data's first 16 MiB and returned Finished.
#[test]
fn a_header_store_on_the_data_itself_is_refused() {
    let fx = Fx::new();
    let dir = fx.img.parent().unwrap();
    std::os::unix::fs::symlink(&fx.img, dir.join("link")).unwrap();
    std::fs::hard_link(&fx.img, dir.join("hard")).unwrap();
    for p in [fx.img.clone(), dir.join("link"), dir.join("hard")] {
        let (h, ctl) = (Fx::header_at(&p), Control::default());
        let said = "the header store is the data itself";
        refused(
            fx.encrypt_into(&h, Resilience::Checksum, small(), &ctl),
            said,
        );
        refused(fx.decrypt_from(&h, PASS, small(), &ctl), said);
        refused(fx.resume_from(&h, PASS, small(), &ctl), said);
        fx.assert_data_unchanged();
    }
}

/// A header file that holds other data (random bytes, a filesystem image) is refused by
/// encrypt, and by a decryption moving its header out; an empty file and a zeroed
/// (reserved) one are taken.
#[test]
fn a_header_file_holding_other_data_is_refused() {
    let fx = Fx::new();
    let mut junk = vec![0u8; 1 << 20];
    luksify_tests::fill_volume(&mut junk, 99);
    std::fs::write(&fx.hdr, &junk).unwrap();
    let r = fx.encrypt(Resilience::Checksum, small(), &Control::default());
    refused(
        r,
        "the header file already holds 1048576 bytes of other data",
    );
    assert!(
        std::fs::read(&fx.hdr).unwrap() == junk,
        "the header file changed"
    );
    fx.assert_data_unchanged();

    // A decryption moving the header out of a volume (header in front) likewise.
    let shifted = fx.img.with_extension("shift");
    std::fs::write(&shifted, &fx.orig).unwrap();
    let enc = EncryptOptions {
        placement: Placement::Shift { reduce: 4 << 20 },
        ..opts(Resilience::Datashift, small())
    };
    let d = DataDevice::open(&shifted, true).unwrap();
    // (The last 4 MiB of the image must be unused: zero them.)
    d.write_at((SIZE - (4 << 20)) as u64, &vec![0u8; 4 << 20])
        .unwrap();
    let o = luksify_walker::encrypt::<_, HeaderDisk, _>(&d, None, PASS, &enc, &Control::default())
        .unwrap();
    assert_eq!(o, Outcome::Finished);
    let before = std::fs::read(&shifted).unwrap();
    let r = luksify_walker::decrypt(
        &d,
        Some(&fx.header()),
        PASS,
        &dopts(Resilience::Datashift, small()),
        &Control::default(),
    );
    refused(
        r,
        "the header file already holds 1048576 bytes of other data",
    );
    assert!(
        std::fs::read(&shifted).unwrap() == before,
        "the volume changed"
    );
    assert!(
        std::fs::read(&fx.hdr).unwrap() == junk,
        "the header file changed"
    );

    // Empty, then reserved (zeros): taken.
    for fill in [0usize, 16 << 20] {
        std::fs::write(&fx.hdr, vec![0u8; fill]).unwrap();
        let o = fx
            .encrypt(Resilience::Checksum, small(), &Control::default())
            .unwrap();
        assert_eq!(o, Outcome::Finished, "header file of {fill} zero bytes");
        fx.decrypt_back();
        std::fs::remove_file(&fx.hdr).unwrap();
    }
}

/// Sizes a run cannot use are refused before anything is written, by every entry point
/// (they panicked, or refused "resilience area too small" with the header written).
#[test]
fn bad_tuning_is_refused_before_the_first_write() {
    let fx = Fx::new();
    for (t, says) in [
        (
            Tuning {
                chunk: 0,
                ..small()
            },
            "request size (Tuning::chunk) 0 bytes",
        ),
        (
            Tuning {
                chunk: 1000,
                ..small()
            },
            "request size (Tuning::chunk) 1000 bytes",
        ),
        (
            Tuning {
                hotzone: 0,
                ..small()
            },
            "hotzone size (Tuning::hotzone) 0 bytes",
        ),
    ] {
        refused(
            fx.encrypt(Resilience::Checksum, t, &Control::default()),
            says,
        );
        assert_eq!(std::fs::metadata(&fx.hdr).unwrap().len(), 0, "{says}");
        refused(
            fx.resume_from(&fx.header(), PASS, t, &Control::default()),
            says,
        );
        refused(
            fx.decrypt_from(&fx.header(), PASS, t, &Control::default()),
            says,
        );
        fx.assert_data_unchanged();
        assert_eq!(std::fs::metadata(&fx.hdr).unwrap().len(), 0, "{says}");
    }
}

/// A stop asked before the first write (here: before the call) writes nothing, in
/// encrypt and decrypt, and says so: `Outcome::NotStarted` (it wrote a header and
/// returned Interrupted at 0, leaving a run to resume).
#[test]
fn a_stop_before_the_first_write_writes_nothing() {
    let fx = Fx::new();
    let stop = AtomicBool::new(true);
    let ctl = Control {
        cancel: Some(&stop),
        ..Control::default()
    };
    for res in [Resilience::Checksum, Resilience::Journal, Resilience::None] {
        assert_eq!(fx.encrypt(res, small(), &ctl).unwrap(), Outcome::NotStarted);
        assert_eq!(std::fs::metadata(&fx.hdr).unwrap().len(), 0, "{res:?}");
        fx.assert_data_unchanged();
    }
    // An encrypted volume: a decryption stopped before it starts leaves it as it was.
    assert_eq!(
        fx.encrypt(Resilience::Checksum, small(), &Control::default())
            .unwrap(),
        Outcome::Finished
    );
    let (img, hdr) = (
        std::fs::read(&fx.img).unwrap(),
        std::fs::read(&fx.hdr).unwrap(),
    );
    let r = fx.decrypt_from(&fx.header(), PASS, small(), &ctl);
    assert_eq!(r.unwrap(), Outcome::NotStarted);
    assert!(std::fs::read(&fx.img).unwrap() == img, "the volume changed");
    assert!(std::fs::read(&fx.hdr).unwrap() == hdr, "the header changed");
    fx.decrypt_back();
}

/// A progress callback that panics mid-run: the panic reaches the caller, and the run
/// it stopped is resumable, even with resilience `none` (which lost the whole 1 GiB
/// window: "data bytes 0..N may be part rewritten").
#[test]
fn a_panicking_progress_callback_leaves_a_resumable_run() {
    for res in [Resilience::None, Resilience::Checksum] {
        let fx = Fx::new();
        let calls = Mutex::new(0);
        let progress = |_: ProgressInfo| {
            let mut n = calls.lock().unwrap();
            *n += 1;
            if *n == 2 {
                panic!("agent callback failed");
            }
        };
        let ctl = Control {
            progress: Some(&progress),
            ..Control::default()
        };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            fx.encrypt(res, small(), &ctl)
        }));
        let payload = r.expect_err("the callback's panic reaches the caller");
        assert_eq!(
            payload.downcast_ref::<&str>(),
            Some(&"agent callback failed"),
            "{res:?}"
        );
        let o = fx
            .resume_from(&fx.header(), PASS, small(), &Control::default())
            .unwrap_or_else(|e| panic!("{res:?}: {e}"));
        assert_eq!(o, Outcome::Finished);
        fx.decrypt_back();
    }
}

/// Cut (power lost, pending writes gone) anywhere in the last stretch of a run, the
/// resume that finishes it reports progress, the last report `done == total`. A resume
/// left only the last hotzone's recovery reported nothing.
#[test]
fn a_resume_reports_the_end_whatever_is_left() {
    let size = 8 << 20;
    let o = opts(
        Resilience::Checksum,
        Tuning {
            chunk: 256 << 10,
            hotzone: 1 << 20,
            ..Tuning::default()
        },
    );
    let mut orig = vec![0u8; size];
    luksify_tests::fill_volume(&mut orig, 3);
    let full = PowerCutDisk::new(MemDisk::from_vec(orig.clone()), 4096);
    let fh = full.sibling(MemDisk::new(0));
    let r = luksify_walker::encrypt(&full, Some(&fh), PASS, &o, &Control::default());
    assert_eq!(r.unwrap(), Outcome::Finished);
    let n = full.ops();
    let mut resumed = 0;
    for cut in n.saturating_sub(24)..n {
        let (data, hdr) = (MemDisk::from_vec(orig.clone()), MemDisk::new(0));
        let pc = PowerCutDisk::new(data.clone(), 4096);
        let hpc = pc.sibling(hdr.clone());
        pc.cut_after_ops(cut);
        let r = luksify_walker::encrypt(&pc, Some(&hpc), PASS, &o, &Control::default());
        assert!(r.is_err(), "cut {cut}: {r:?}");
        pc.settle(|_, u| vec![false; u]).unwrap();
        hpc.settle(|_, u| vec![false; u]).unwrap();
        let seen = Mutex::new(Vec::new());
        let record = |p: ProgressInfo| seen.lock().unwrap().push((p.done, p.total));
        let ctl = Control {
            progress: Some(&record),
            ..Control::default()
        };
        match luksify_walker::resume(&data, Some(&hdr), PASS, o.tuning, &ctl) {
            Ok(Outcome::Finished) => {
                resumed += 1;
                let seen = seen.into_inner().unwrap();
                assert_eq!(
                    seen.last(),
                    Some(&(size as u64, size as u64)),
                    "cut {cut} of {n}: {seen:?}"
                );
            }
            // A cut after the final header: nothing to resume.
            Err(Error::Refused(m)) if m.contains("the encryption already finished") => {}
            other => panic!("cut {cut} of {n}: {other:?}"),
        }
    }
    assert!(resumed > 0, "no cut left a run to resume");
}

/// A wrong passphrase is its own error, for resume and decrypt (it was a `Refused`
/// string an agent had to match).
#[test]
fn a_wrong_passphrase_is_its_own_error() {
    let fx = Fx::new();
    let stop = AtomicBool::new(false);
    let progress = |_: ProgressInfo| stop.store(true, Ordering::Relaxed);
    let ctl = Control {
        progress: Some(&progress),
        cancel: Some(&stop),
        ..Control::default()
    };
    let o = fx.encrypt(Resilience::Journal, small(), &ctl).unwrap();
    assert!(matches!(o, Outcome::Interrupted(_)), "{o:?}");
    let r = fx.resume_from(&fx.header(), b"wrong", small(), &Control::default());
    assert!(matches!(r, Err(Error::WrongPassphrase)), "{r:?}");
    let o = fx
        .resume_from(&fx.header(), PASS, small(), &Control::default())
        .unwrap();
    assert_eq!(o, Outcome::Finished);
    let r = fx.decrypt_from(&fx.header(), b"wrong", small(), &Control::default());
    assert!(matches!(r, Err(Error::WrongPassphrase)), "{r:?}");
    fx.decrypt_back();
}

/// Resume from an empty header file says it is empty (it printed two "failed to fill
/// whole buffer" causes), and an empty image is "empty", not "give it a size of 0".
#[test]
fn empty_stores_are_named_as_such() {
    let fx = Fx::new();
    std::fs::write(&fx.hdr, b"").unwrap();
    let r = fx.resume_from(&fx.header(), PASS, small(), &Control::default());
    refused(r, "the header file is empty");
    let empty = fx.img.with_extension("empty");
    std::fs::write(&empty, b"").unwrap();
    let r = luksify_walker::encrypt(
        &DataDevice::open(&empty, true).unwrap(),
        Some(&fx.header()),
        PASS,
        &opts(Resilience::Checksum, small()),
        &Control::default(),
    );
    refused(r, "the device is empty (0 bytes)");
}
