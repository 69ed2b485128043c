//! Fuzzes the LUKS1 header parser and validation. Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use luksify_luks::io::MemDisk;
use luksify_luks::luks1::Luks1Header;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Luks1Header::parse(data) {
        // Whatever we accept re-encodes to an identical header.
        let enc = h.encode().expect("accepted header must encode");
        let again = Luks1Header::parse(&enc).expect("re-encoded header must parse");
        assert_eq!(again, h);
    }
    let disk = MemDisk::from_vec(data.to_vec());
    let _ = Luks1Header::read(&disk);
});
