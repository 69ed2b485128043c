//! Reading `--key-file F` exactly as cryptsetup does: the whole file (newlines
//! included) is the passphrase; `-` means standard input. The bytes go straight
//! into a zeroizing buffer sized up front, so no reallocation leaves copies behind.

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::Path;
use zeroize::Zeroizing;

/// cryptsetup's default key file size limit (8 MiB).
pub const MAX_KEY_FILE_BYTES: usize = 8 * 1024 * 1024;

/// Reads a key file that unlocks an existing keyslot: the whole file (or stdin for
/// `-`) into a zeroizing buffer. An empty file is the empty passphrase, which
/// cryptsetup accepts and some images carry; files over 8 MiB are refused, as
/// cryptsetup refuses them.
pub fn read_key_file(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    read_any(path)
}

/// Reads a key file whose passphrase a new keyslot will take (format, encrypt,
/// add-key's and change-key's new key, enable). An empty file is refused here:
/// cryptsetup would set an empty passphrase, which anyone can type, and a file
/// left empty by a failed `echo` or a wrong redirection is the likelier cause.
pub fn read_new_key_file(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    let key = read_any(path)?;
    if key.is_empty() {
        bail!(
            "key file {} is empty: luksify will not set an empty passphrase; put the passphrase in the file (nothing was written)",
            path.display()
        );
    }
    Ok(key)
}

fn read_any(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    let what = path.display();
    let mut regular = false;
    let mut reader: Box<dyn Read> = if path == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        let f = std::fs::File::open(path).with_context(|| {
            format!("cannot open key file {what}: check the path and permissions")
        })?;
        regular = f.metadata().is_ok_and(|m| m.is_file());
        Box::new(f)
    };
    // One allocation of the maximum size (+1 to detect oversize); never grown.
    let mut buf = Zeroizing::new(vec![0u8; MAX_KEY_FILE_BYTES + 1]);
    let mut len = 0;
    loop {
        let n = match reader.read(&mut buf[len..]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot read key file {what}")),
        };
        if n == 0 {
            break;
        }
        len += n;
        if len > MAX_KEY_FILE_BYTES {
            bail!("key file {what} is larger than {MAX_KEY_FILE_BYTES} bytes (cryptsetup's limit); use a smaller key file");
        }
    }
    // An empty regular file is the empty passphrase; a pipe or device that gave no
    // bytes (stdin closed, /dev/null) is a mistake, and cryptsetup fails on it
    // ("Nothing to read on input.") rather than try the empty passphrase.
    if len == 0 && !regular {
        bail!(
            "nothing to read from {}: it gave no bytes (cryptsetup refuses it too); pass the passphrase through it, or use an empty regular file for the empty passphrase",
            if path == Path::new("-") {
                "standard input (--key-file -)".to_string()
            } else {
                format!("key file {what}")
            }
        );
    }
    let mut out = Zeroizing::new(vec![0u8; len]);
    out.copy_from_slice(&buf[..len]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_file_including_newlines_is_the_passphrase() {
        let dir = tempfile_dir();
        let p = dir.join("k");
        std::fs::write(&p, b"pass\nword\n").unwrap();
        assert_eq!(&read_key_file(&p).unwrap()[..], b"pass\nword\n");
        std::fs::write(&p, b"").unwrap();
        assert!(read_key_file(&p).unwrap().is_empty());
        // Not a regular file, and nothing in it: refused, as cryptsetup refuses it.
        let e = read_key_file(Path::new("/dev/null"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nothing to read from key file /dev/null"), "{e}");
        let e = read_new_key_file(&p).unwrap_err().to_string();
        assert!(e.contains("is empty"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("luksify-keyfile-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
