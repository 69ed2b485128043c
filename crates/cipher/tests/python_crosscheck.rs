//! Cross-checks against an independent implementation: Python `cryptography` (OpenSSL's
//! AES-XTS, one call per sector with `modes.XTS(iv)`), with the IVs (including ESSIV:
//! AES-256-ECB keyed with sha256 of the whole key, over le64(sector)) computed in Python
//! from the sector numbers, never by luksify.
//!
//! python3 with `cryptography` is a test dependency (scripts/test installs it); if it is
//! missing these tests fail, they never pass silently. Each test starts python3 once with
//! a whole batch of cases.

use luksify_cipher::{IvGen, SectorCipher, SectorSize};
use std::io::Write;
use std::process::{Command, Stdio};

const PY: &str = r#"
import sys, hashlib
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
M64 = (1 << 64) - 1
def iv_bytes(gen, key, n):
    if gen == "plain":
        return (n & 0xffffffff).to_bytes(4, "little") + bytes(12)
    if gen == "plain64":
        return (n & M64).to_bytes(8, "little") + bytes(8)
    if gen == "plain64be":
        return bytes(8) + (n & M64).to_bytes(8, "big")
    if gen == "essiv:sha256":
        e = Cipher(algorithms.AES(hashlib.sha256(key).digest()), modes.ECB()).encryptor()
        return e.update((n & M64).to_bytes(8, "little") + bytes(8)) + e.finalize()
    raise SystemExit("unknown iv generator " + gen)
for line in sys.stdin:
    op, gen, ss, iv0, key, data = line.split()
    ss, iv0, key, data = int(ss), int(iv0), bytes.fromhex(key), bytes.fromhex(data)
    out = bytearray()
    for i in range(len(data) // ss):
        c = Cipher(algorithms.AES(key), modes.XTS(iv_bytes(gen, key, iv0 + i * (ss // 512))))
        x = c.encryptor() if op == "enc" else c.decryptor()
        out += x.update(data[i * ss:(i + 1) * ss]) + x.finalize()
    print(out.hex())
"#;

#[derive(Debug, Clone)]
struct Case {
    encrypt: bool,
    iv: IvGen,
    key: Vec<u8>,
    sector: usize,
    iv_sector: u64,
    data: Vec<u8>,
}

/// Runs every case through Python in one process; returns its outputs in order.
fn python(cases: &[Case]) -> Vec<Vec<u8>> {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(PY)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start python3: install python3 and `pip install cryptography` (scripts/test does)");
    let mut input = String::new();
    for c in cases {
        input += &format!(
            "{} {} {} {} {} {}\n",
            if c.encrypt { "enc" } else { "dec" },
            c.iv.name(),
            c.sector,
            c.iv_sector,
            hex::encode(&c.key),
            hex::encode(&c.data)
        );
    }
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "python3 cross-check failed (is `cryptography` installed? scripts/test installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<Vec<u8>> = text.lines().map(|l| hex::decode(l).unwrap()).collect();
    assert_eq!(lines.len(), cases.len(), "one output line per case");
    lines
}

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    getrandom::fill(&mut v).unwrap();
    v
}

fn random_u64() -> u64 {
    u64::from_le_bytes(random(8).try_into().unwrap())
}

/// A random XTS key with distinct halves (equal halves are refused by both sides).
fn random_key(len: usize) -> Vec<u8> {
    loop {
        let k = random(len);
        if k[..len / 2] != k[len / 2..] {
            return k;
        }
    }
}

const IV_GENS: [IvGen; 4] = [
    IvGen::Plain,
    IvGen::Plain64,
    IvGen::Plain64Be,
    IvGen::EssivSha256,
];
const SECTORS: [usize; 4] = [512, 1024, 2048, 4096];

fn ours(c: &Case, serial: bool) -> Vec<u8> {
    let cipher = SectorCipher::with_iv(c.iv, &c.key, SectorSize::new(c.sector).unwrap()).unwrap();
    let mut buf = c.data.clone();
    match (c.encrypt, serial) {
        (true, true) => cipher.encrypt_serial(&mut buf, c.iv_sector),
        (true, false) => cipher.encrypt(&mut buf, c.iv_sector),
        (false, true) => cipher.decrypt_serial(&mut buf, c.iv_sector),
        (false, false) => cipher.decrypt(&mut buf, c.iv_sector),
    }
    .unwrap();
    buf
}

fn compare(cases: &[Case]) {
    let want = python(cases);
    for (c, want) in cases.iter().zip(want) {
        let what = format!(
            "{} aes-xts-{} key {} bytes, sector {}, iv_sector {:#x}, {} bytes",
            if c.encrypt { "encrypt" } else { "decrypt" },
            c.iv.name(),
            c.key.len(),
            c.sector,
            c.iv_sector,
            c.data.len()
        );
        assert_eq!(
            hex::encode(ours(c, true)),
            hex::encode(&want),
            "serial {what}"
        );
        assert_eq!(
            hex::encode(ours(c, false)),
            hex::encode(&want),
            "default {what}"
        );
    }
}

#[test]
fn python_agrees_for_every_iv_generator_key_size_and_sector_size() {
    let mut cases = Vec::new();
    for iv in IV_GENS {
        for key_len in [32, 64] {
            for sector in SECTORS {
                // More than one IV group (64 sectors) for small sectors, an uneven batch for all.
                let sectors = (36 * 1024 / sector).max(3) + 1;
                // Nonzero offsets: a multiple of the sector's IV units plus an iv_tweak.
                let iv_sector = (random_u64() >> 24) / 8 * 8 + u64::from(random(1)[0]);
                for encrypt in [true, false] {
                    cases.push(Case {
                        encrypt,
                        iv,
                        key: random_key(key_len),
                        sector,
                        iv_sector,
                        data: random(sectors * sector),
                    });
                }
            }
        }
    }
    assert_eq!(cases.len(), 4 * 2 * 4 * 2);
    compare(&cases);
}

#[test]
fn python_agrees_on_4096_byte_sectors_at_nonzero_offsets() {
    // LUKS2 with 4 KiB sectors: IV = byte offset / 512 + iv_tweak, so consecutive sectors'
    // IVs step by 8. Offsets include a large one and odd iv_tweaks.
    let mut cases = Vec::new();
    for iv in IV_GENS {
        for (offset, iv_tweak) in [
            (4096u64, 0u64),
            (1 << 40, 0),
            (65536, 7),
            (123 * 4096, 1 << 33),
        ] {
            let key = random_key(64);
            let cipher = SectorCipher::with_iv(iv, &key, SectorSize::S4096).unwrap();
            let iv_sector = cipher.iv_sector_at(offset, iv_tweak).unwrap();
            assert_eq!(iv_sector, offset / 512 + iv_tweak);
            cases.push(Case {
                encrypt: true,
                iv,
                key,
                sector: 4096,
                iv_sector,
                data: random(5 * 4096),
            });
        }
    }
    compare(&cases);
}

#[test]
fn python_agrees_where_sector_numbers_wrap() {
    // `plain` is 32 bits: it wraps at 2^32 (as dm-crypt's does); the 64-bit ones wrap at 2^64.
    let mut cases = Vec::new();
    for (iv, start) in [
        (IvGen::Plain, (1u64 << 32) - 3),
        (IvGen::Plain64, u64::MAX - 2),
        (IvGen::Plain64Be, u64::MAX - 2),
        (IvGen::EssivSha256, u64::MAX - 2),
    ] {
        cases.push(Case {
            encrypt: true,
            iv,
            key: random_key(64),
            sector: 512,
            iv_sector: start,
            data: random(8 * 512),
        });
    }
    compare(&cases);
}

#[test]
fn python_agrees_on_a_buffer_large_enough_to_run_in_parallel() {
    let mut cases = Vec::new();
    for (iv, sector) in [(IvGen::Plain64, 4096), (IvGen::EssivSha256, 512)] {
        cases.push(Case {
            encrypt: true,
            iv,
            key: random_key(64),
            sector,
            iv_sector: 2048 + 3,
            data: random(768 * 1024),
        });
    }
    compare(&cases);
}
