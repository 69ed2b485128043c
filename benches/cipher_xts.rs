//! Criterion benchmarks of luksify's AES-XTS sector cipher.
//!
//! `cargo bench -p luksify-cipher --bench xts` (add `-- xts/serial` to filter). The raw
//! `aes` rows are the ceiling: what `encrypt_blocks` alone does over the same bytes,
//! without tweaks. `luksify bench cipher` compares against OpenSSL instead.

use aes::cipher::{BlockCipherEncrypt, KeyInit};
use aes::{Aes256, Block};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use luksify_cipher::SectorCipher;
use std::hint::black_box;

/// Fits in L2 so that the figures are the cipher's, not the memory system's.
const BUF: usize = 1024 * 1024;

fn key() -> [u8; 64] {
    let mut k = [0u8; 64];
    for (i, b) in k.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(167).wrapping_add(13);
    }
    k
}

fn raw_aes(c: &mut Criterion) {
    let mut g = c.benchmark_group("aes256_raw");
    g.throughput(Throughput::Bytes(BUF as u64));
    let aes = Aes256::new_from_slice(&key()[..32]).unwrap();
    let mut blocks = vec![Block::default(); BUF / 16];
    g.bench_function("encrypt_blocks_1MiB", |b| {
        b.iter(|| aes.encrypt_blocks(black_box(&mut blocks)))
    });
    g.finish();
}

fn xts(c: &mut Criterion) {
    let mut g = c.benchmark_group("xts");
    g.throughput(Throughput::Bytes(BUF as u64));
    let mut buf = vec![0x5au8; BUF];
    for spec in ["aes-xts-plain64", "aes-xts-essiv:sha256"] {
        for sector in [512usize, 4096] {
            let cipher = SectorCipher::new(spec, &key(), sector).unwrap();
            let id = format!("{spec}/{sector}");
            g.bench_with_input(BenchmarkId::new("serial_encrypt", &id), &(), |b, _| {
                b.iter(|| cipher.encrypt_serial(black_box(&mut buf), 8).unwrap())
            });
            g.bench_with_input(BenchmarkId::new("serial_decrypt", &id), &(), |b, _| {
                b.iter(|| cipher.decrypt_serial(black_box(&mut buf), 8).unwrap())
            });
            g.bench_with_input(BenchmarkId::new("parallel_encrypt", &id), &(), |b, _| {
                b.iter(|| cipher.encrypt(black_box(&mut buf), 8).unwrap())
            });
        }
    }
    // AES-128-XTS for completeness (32-byte key).
    let cipher = SectorCipher::new("aes-xts-plain64", &key()[..32], 4096).unwrap();
    g.bench_function("serial_encrypt/aes128-xts-plain64/4096", |b| {
        b.iter(|| cipher.encrypt_serial(black_box(&mut buf), 8).unwrap())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = raw_aes, xts
}
criterion_main!(benches);
