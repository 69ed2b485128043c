//! `luksify bench device`: a read-only probe that must never write to the device it measures,
//! and must report figures a user can act on.

use luksify_tests::{fill_pattern, luksify_bin, require_root, run, run_ok, LoopDev};
use std::path::Path;
use std::process::Command;

const IMAGE: u64 = 96 << 20;

fn probe_json(dev: &Path) -> serde_json::Value {
    let out = run_ok(
        Command::new(luksify_bin())
            .args(["bench", "device", "--json", "--seconds", "0.5"])
            .arg(dev),
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bench device --json printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// An image file full of a known pattern (not sparse, so reads touch real blocks).
fn patterned_image(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let path = dir.join("disk.img");
    let mut data = vec![0u8; IMAGE as usize];
    fill_pattern(&mut data, 0x5eed);
    std::fs::write(&path, &data).expect("write image");
    (path, data)
}

/// The fields a user reads, with values that make physical sense for `size` bytes.
fn assert_sane(v: &serde_json::Value, size: u64) {
    let num = |k: &str| {
        v[k].as_f64()
            .unwrap_or_else(|| panic!("field {k} missing or not a number in {v}"))
    };
    assert_eq!(v["device_bytes"].as_u64(), Some(size), "{v}");
    for k in [
        "seq_read_bps",
        "random_read_iops",
        "write_bps",
        "cipher_bps",
        "sha256_bps",
    ] {
        let x = num(k);
        assert!(x.is_finite() && x > 0.0, "{k} = {x} in {v}");
    }
    let projections = v["projections"].as_array().expect("projections array");
    let modes: Vec<&str> = projections
        .iter()
        .map(|p| p["mode"].as_str().expect("mode"))
        .collect();
    assert_eq!(modes, ["datashift", "checksum", "journal", "none"]);
    let by_mode = |m: &str| &projections[modes.iter().position(|x| *x == m).unwrap()];
    for p in projections {
        let secs = p["seconds"].as_f64().unwrap();
        let io = p["io_seconds"].as_f64().unwrap();
        let cpu = p["cpu_seconds"].as_f64().unwrap();
        assert!(secs > 0.0 && secs.is_finite(), "{p}");
        assert_eq!(
            secs,
            io.max(cpu),
            "projection is the slower of I/O and CPU: {p}"
        );
        assert!(p["read_bytes"].as_u64().unwrap() <= size, "{p}");
    }
    // Journal writes every chunk twice; none writes it once.
    let none_w = by_mode("none")["write_bytes"].as_u64().unwrap();
    let journal_w = by_mode("journal")["write_bytes"].as_u64().unwrap();
    assert_eq!(
        journal_w - none_w,
        size,
        "journal writes one extra copy: {v}"
    );
}

#[test]
fn bench_device_on_image_file_reads_only_and_reports_sane_fields() {
    let dir =
        tempfile::tempdir_in(luksify_tests::workspace_root().join("target")).expect("tempdir");
    let (path, data) = patterned_image(dir.path());
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();

    let v = probe_json(&path);
    assert_sane(&v, IMAGE);

    assert!(
        std::fs::read(&path).unwrap() == data,
        "bench device changed the image"
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().modified().unwrap(),
        mtime,
        "image mtime changed"
    );
}

#[test]
fn bench_device_table_names_the_device_and_every_mode() {
    let dir =
        tempfile::tempdir_in(luksify_tests::workspace_root().join("target")).expect("tempdir");
    let (path, _) = patterned_image(dir.path());
    let out = run_ok(
        Command::new(luksify_bin())
            .args(["bench", "device", "--seconds", "0.3"])
            .arg(&path),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&path.display().to_string()), "{text}");
    for m in ["datashift", "checksum", "journal", "none", "IOPS", "MB/s"] {
        assert!(text.contains(m), "missing {m} in:\n{text}");
    }
}

#[test]
fn bench_device_on_missing_device_fails_with_one_line_naming_it() {
    let out = run(Command::new(luksify_bin()).args(["bench", "device", "/nonexistent/disk-xyz"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/disk-xyz"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
#[ignore = "needs root and loop devices"]
fn root_bench_device_on_loop_device_issues_no_writes() {
    require_root();
    let dir =
        tempfile::tempdir_in(luksify_tests::workspace_root().join("target")).expect("tempdir");
    let (path, data) = patterned_image(dir.path());
    let lo = LoopDev::attach(&path);
    let name = lo.path.file_name().unwrap().to_str().unwrap().to_string();
    // Field 5 of /sys/block/<dev>/stat counts completed write requests.
    let writes = || -> u64 {
        let stat = std::fs::read_to_string(format!("/sys/block/{name}/stat")).expect("block stat");
        stat.split_whitespace().nth(4).unwrap().parse().unwrap()
    };
    let before = writes();

    let v = probe_json(&lo.path);
    assert_sane(&v, IMAGE);
    assert_eq!(
        v["direct_io"].as_bool(),
        Some(true),
        "O_DIRECT works on loop devices: {v}"
    );

    assert_eq!(
        writes(),
        before,
        "bench device issued writes to {}",
        lo.path.display()
    );
    drop(lo);
    assert!(
        std::fs::read(&path).unwrap() == data,
        "bench device changed the device"
    );
}
