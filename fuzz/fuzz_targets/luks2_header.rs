//! Fuzzes the LUKS2 reader: binary header, checksum, JSON parsing and
//! validation, secondary search, through an in-memory disk. The checksum is
//! recomputed over the mutated input first, so mutations reach the JSON parser
//! instead of dying at the checksum. Must never panic, and reading never writes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use luksify_luks::io::{Disk, MemDisk};
use luksify_luks::luks2::binary::{checksum, BINARY_HEADER_SIZE, METADATA_SIZES};
use luksify_luks::luks2::Luks2Header;

fuzz_target!(|data: &[u8]| {
    let mut bytes = data.to_vec();
    // Fix up the checksum of a primary copy whose hdr_size is plausible.
    if bytes.len() >= BINARY_HEADER_SIZE {
        let hdr_size = u64::from_be_bytes(bytes[8..16].try_into().unwrap());
        if METADATA_SIZES.contains(&hdr_size) && bytes.len() as u64 >= hdr_size {
            let bin: [u8; BINARY_HEADER_SIZE] = bytes[..BINARY_HEADER_SIZE].try_into().unwrap();
            let csum = checksum(&bin, &bytes[BINARY_HEADER_SIZE..hdr_size as usize]);
            bytes[448..512].copy_from_slice(&csum);
        }
    }
    let disk = MemDisk::from_vec(bytes);
    if let Ok((hdr, _)) = Luks2Header::read(&disk) {
        // A header we accept must serialise and pass our own validation again.
        let _ = hdr
            .json_area()
            .expect("accepted metadata must re-serialise");
        let _ = hdr.data_segment();
    }
    let _ = luksify_luks::volume::Volume::read(&disk);
    assert_eq!(disk.write_count(), 0);
    let _ = disk.size();
});
