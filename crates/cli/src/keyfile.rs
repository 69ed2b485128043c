//! Reading `--key-file F` exactly as cryptsetup does: the whole file (newlines
//! included) is the passphrase, or `--keyfile-size` bytes of it from
//! `--keyfile-offset`; `-` means standard input. The bytes go straight into a
//! zeroizing buffer sized up front, so no reallocation leaves copies behind. `-` on a
//! terminal is a prompt, as cryptsetup's: echo off, the line without its newline.

use anyhow::{bail, Context, Result};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use zeroize::Zeroizing;

/// cryptsetup's default key file size limit (8 MiB).
pub const MAX_KEY_FILE_BYTES: usize = 8 * 1024 * 1024;

/// Which bytes of a key file are the passphrase, as cryptsetup's `--keyfile-offset` and
/// `--keyfile-size` (crypttab's `keyfile-offset=` and `keyfile-size=`) say.
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct KeyFilePart {
    /// Skip this many bytes of the key file first (as cryptsetup's)
    #[arg(long, value_name = "BYTES")]
    pub keyfile_offset: Option<u64>,
    /// The passphrase is this many bytes of the key file, which must hold them (as
    /// cryptsetup's; 0 or unset: the rest of the file)
    #[arg(long, value_name = "BYTES")]
    pub keyfile_size: Option<u64>,
    /// Of the new passphrase's file: its messages name `--new-keyfile-*`.
    #[arg(skip)]
    pub new: bool,
}

/// [`KeyFilePart`] of the new passphrase's file (`--new-key-file`), as cryptsetup's
/// `--new-keyfile-offset` and `--new-keyfile-size`.
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct NewKeyFilePart {
    /// Skip this many bytes of the new key file first (as cryptsetup's)
    #[arg(long, value_name = "BYTES")]
    pub new_keyfile_offset: Option<u64>,
    /// The new passphrase is this many bytes of the new key file (as cryptsetup's)
    #[arg(long, value_name = "BYTES")]
    pub new_keyfile_size: Option<u64>,
}

impl KeyFilePart {
    /// Whether either option was given.
    pub fn is_set(&self) -> bool {
        self.keyfile_offset.is_some() || self.keyfile_size.is_some()
    }
    /// The options as given, for a command line the user is told to run (` --keyfile-offset N`...).
    pub fn args(&self) -> String {
        let mut s = String::new();
        if let Some(o) = self.keyfile_offset {
            s.push_str(&format!(" --keyfile-offset {o}"));
        }
        if let Some(n) = self.keyfile_size {
            s.push_str(&format!(" --keyfile-size {n}"));
        }
        s
    }
}

impl From<NewKeyFilePart> for KeyFilePart {
    fn from(p: NewKeyFilePart) -> Self {
        KeyFilePart {
            keyfile_offset: p.new_keyfile_offset,
            keyfile_size: p.new_keyfile_size,
            new: true,
        }
    }
}

/// Reads a key file that unlocks an existing keyslot: the whole file (or stdin for
/// `-`), or the `part` of it, into a zeroizing buffer. An empty file is the empty
/// passphrase, which cryptsetup accepts and some images carry; files over 8 MiB are
/// refused, as cryptsetup refuses them.
pub fn read_key_file(path: &Path, part: KeyFilePart) -> Result<Zeroizing<Vec<u8>>> {
    if interactive(path, part) {
        return prompt(TTY, "Enter passphrase: ", false);
    }
    read_any(path, part)
}

/// Standard input as a terminal, when `--key-file -` is given whole (no offset or
/// size): the passphrase is typed, not read as bytes. It was read raw: echoed on the
/// screen (and into `script` logs) with no prompt, its newline kept as part of the
/// passphrase, so a volume formatted so did not open with cryptsetup's prompt (a trial).
fn interactive(path: &Path, part: KeyFilePart) -> bool {
    let whole = part.keyfile_offset.is_none() && part.keyfile_size.is_none();
    path == Path::new("-") && whole && stdin_is_terminal()
}

/// The terminal a typed passphrase is read from: standard input.
const TTY: libc::c_int = 0;

/// Whether standard input is a terminal (a passphrase given as `-` is then typed).
pub fn stdin_is_terminal() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(0) == 1 }
}

/// Set once a passphrase was typed at a prompt.
static TYPED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `said` with its advice about a key file's bytes turned into advice about a typed
/// passphrase, when one was typed: "check --key-file (its whole contents, newlines
/// included, ...)" sent a user who had typed it to a file there was none of (a trial).
pub fn as_typed(said: &str) -> String {
    if !TYPED.load(std::sync::atomic::Ordering::Relaxed) {
        return said.to_string();
    }
    [
        "check --key-file (its whole contents, newlines included, are the passphrase)",
        "check --key-file (its whole content is the passphrase)",
        "check --key-file (or the key file recorded at enable)",
        "check --key-file",
    ]
    .iter()
    .fold(said.to_string(), |s, p| {
        s.replace(p, "check the passphrase typed")
    })
}

/// cryptsetup's limit for a typed passphrase.
const MAX_TYPED_BYTES: usize = 512;

/// Echo off on terminal `fd` until dropped; a signal that ends the process meanwhile
/// (Ctrl-C, SIGTERM, SIGHUP, SIGQUIT) puts the terminal back first: it was left with
/// echo off, the user's next typing invisible (a trial).
struct EchoOff {
    fd: libc::c_int,
    saved: libc::termios,
    /// The signals' actions before, put back on drop.
    before: Vec<(libc::c_int, libc::sigaction)>,
}

/// The terminal settings a signal handler puts back (set before any handler runs).
static SAVED: std::sync::OnceLock<(libc::c_int, libc::termios)> = std::sync::OnceLock::new();

const ENDING_SIGNALS: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// Puts the terminal back, then lets the signal end the process as it would have.
extern "C" fn restore_then_die(sig: libc::c_int) {
    // SAFETY: tcsetattr, signal and raise are async-signal-safe; SAVED was set before
    // this handler was installed and is only read here.
    unsafe {
        if let Some((fd, t)) = SAVED.get() {
            libc::tcsetattr(*fd, libc::TCSANOW, t);
        }
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

impl EchoOff {
    fn new(fd: libc::c_int) -> Result<EchoOff> {
        // SAFETY: termios is plain data; tcgetattr fills it or fails.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a terminal (isatty), `saved` a valid termios to fill.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            bail!(
                "cannot read the terminal's settings ({}): pass the passphrase in a key file",
                std::io::Error::last_os_error()
            );
        }
        let _ = SAVED.set((fd, saved));
        let mut before = Vec::new();
        for sig in ENDING_SIGNALS {
            // SAFETY: sigaction with a zeroed mask and a handler of the right type; the
            // old action is kept to be put back.
            unsafe {
                let mut new: libc::sigaction = std::mem::zeroed();
                new.sa_sigaction = restore_then_die as extern "C" fn(libc::c_int) as usize;
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, &new, &mut old) == 0 {
                    before.push((sig, old));
                }
            }
        }
        // Dropped on any failure below: the signals' actions come back.
        let guard = EchoOff { fd, saved, before };
        let mut quiet = saved;
        quiet.c_lflag &= !libc::ECHO;
        quiet.c_lflag |= libc::ICANON;
        // SAFETY: as above; TCSAFLUSH drops input typed before the prompt.
        if unsafe { libc::tcsetattr(fd, libc::TCSAFLUSH, &quiet) } != 0 {
            bail!(
                "cannot turn the terminal's echo off ({}): pass the passphrase in a key file",
                std::io::Error::last_os_error()
            );
        }
        Ok(guard)
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `new` on the same terminal, then the
        // signals' own actions.
        unsafe {
            libc::tcsetattr(self.fd, libc::TCSAFLUSH, &self.saved);
            for (sig, old) in &self.before {
                libc::sigaction(*sig, old, std::ptr::null_mut());
            }
        }
    }
}

/// Asks for a passphrase on terminal `fd` (the prompt on stderr), echo off, and reads
/// one line without its newline; `verify`: asked twice, as cryptsetup asks for a new
/// one, and refused when the two differ.
fn prompt(fd: libc::c_int, text: &str, verify: bool) -> Result<Zeroizing<Vec<u8>>> {
    let first = read_line(fd, text)?;
    if verify {
        let again = read_line(fd, "Verify passphrase: ")?;
        if *again != *first {
            bail!("the passphrases typed do not match (nothing was written)");
        }
    }
    Ok(first)
}

fn read_line(fd: libc::c_int, text: &str) -> Result<Zeroizing<Vec<u8>>> {
    use std::io::Write;
    // Echo off before the prompt shows: what is typed after it is never echoed (and
    // not flushed away with what came before).
    let echo = EchoOff::new(fd)?;
    let mut err = std::io::stderr();
    let _ = err.write_all(text.as_bytes());
    let _ = err.flush();
    // One allocation, never grown; a byte more than the limit to tell an overlong line.
    let mut buf = Zeroizing::new(vec![0u8; MAX_TYPED_BYTES + 1]);
    let mut len = 0;
    let mut ended = false;
    while len < buf.len() {
        // SAFETY: reads into the unused tail of `buf`, within its length.
        let n = unsafe { libc::read(fd, buf[len..].as_mut_ptr().cast(), buf.len() - len) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("cannot read the passphrase from the terminal");
        }
        if n == 0 {
            break;
        }
        let got = &buf[len..len + n as usize];
        if let Some(i) = got.iter().position(|&b| b == b'\n') {
            len += i;
            ended = true;
            break;
        }
        len += n as usize;
    }
    drop(echo);
    let _ = err.write_all(b"\n");
    TYPED.store(true, std::sync::atomic::Ordering::Relaxed);
    if len > MAX_TYPED_BYTES || (!ended && len == buf.len()) {
        bail!("the passphrase typed is longer than {MAX_TYPED_BYTES} bytes (cryptsetup's limit for a typed one): use a key file");
    }
    let mut out = Zeroizing::new(vec![0u8; len]);
    out.copy_from_slice(&buf[..len]);
    Ok(out)
}

/// Reads a key file whose passphrase a new keyslot will take (format, encrypt,
/// add-key's and change-key's new key, enable). An empty file is refused here:
/// cryptsetup would set an empty passphrase, which anyone can type, and a file
/// left empty by a failed `echo` or a wrong redirection is the likelier cause.
pub fn read_new_key_file(path: &Path, part: KeyFilePart) -> Result<Zeroizing<Vec<u8>>> {
    let key = if interactive(path, part) {
        let key = prompt(TTY, "Enter new passphrase: ", true)?;
        if key.is_empty() {
            bail!("an empty passphrase was typed: luksify will not set one (nothing was written)");
        }
        key
    } else {
        read_any(path, part)?
    };
    if key.is_empty() {
        let what = if part.keyfile_offset.is_some() {
            "holds nothing past the offset given"
        } else {
            "is empty"
        };
        bail!(
            "key file {} {what}: luksify will not set an empty passphrase; put the passphrase in the file (nothing was written)",
            path.display()
        );
    }
    Ok(key)
}

fn read_any(path: &Path, part: KeyFilePart) -> Result<Zeroizing<Vec<u8>>> {
    let what = path.display();
    let (o_opt, s_opt) = if part.new {
        ("--new-keyfile-offset", "--new-keyfile-size")
    } else {
        ("--keyfile-offset", "--keyfile-size")
    };
    let offset = part.keyfile_offset.unwrap_or(0);
    // 0 is no limit, as in cryptsetup.
    let size = part.keyfile_size.filter(|&n| n > 0);
    if size.is_some_and(|n| n > MAX_KEY_FILE_BYTES as u64) {
        bail!("{s_opt} is over {MAX_KEY_FILE_BYTES} bytes (cryptsetup's limit): give the passphrase's size in bytes");
    }
    let mut regular = false;
    let mut reader: Box<dyn Read> = if path == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        let mut f = std::fs::File::open(path).with_context(|| {
            format!("cannot open key file {what}: check the path and permissions")
        })?;
        let md = f.metadata().ok();
        regular = md.as_ref().is_some_and(|m| m.is_file());
        if let Some(len) = md.filter(|m| m.is_file()).map(|m| m.len()) {
            if offset > len {
                bail!("key file {what} is {len} bytes, shorter than {o_opt} {offset}: check the offset (cryptsetup: \"Cannot seek to requested keyfile offset.\")");
            }
            f.seek(SeekFrom::Start(offset))
                .with_context(|| format!("cannot seek in key file {what}"))?;
        }
        Box::new(f)
    };
    if !regular && offset > 0 {
        // A pipe or a device: the offset's bytes are read and dropped.
        let mut skip = Zeroizing::new(vec![0u8; 4096]);
        let mut left = offset;
        while left > 0 {
            let n = (skip.len() as u64).min(left) as usize;
            let got = match reader.read(&mut skip[..n]) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).with_context(|| format!("cannot read key file {what}")),
            };
            if got == 0 {
                bail!("key file {what} ended before {o_opt} {offset}: check the offset (cryptsetup: \"Cannot seek to requested keyfile offset.\")");
            }
            left -= got as u64;
        }
    }
    // One allocation of the maximum size (+1 to detect oversize); never grown.
    let cap = size.map_or(MAX_KEY_FILE_BYTES + 1, |n| n as usize);
    let mut buf = Zeroizing::new(vec![0u8; cap]);
    let mut len = 0;
    while len < cap {
        let n = match reader.read(&mut buf[len..]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot read key file {what}")),
        };
        if n == 0 {
            break;
        }
        len += n;
        if size.is_none() && len > MAX_KEY_FILE_BYTES {
            bail!("key file {what} is larger than {MAX_KEY_FILE_BYTES} bytes (cryptsetup's limit); use a smaller key file, or --keyfile-size");
        }
    }
    if let Some(n) = size.filter(|&n| len as u64 != n) {
        bail!("key file {what} holds {len} bytes from offset {offset}, fewer than {s_opt} {n}: check the size and offset (cryptsetup: \"Cannot read requested amount of data.\")");
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
        assert_eq!(
            &read_key_file(&p, KeyFilePart::default()).unwrap()[..],
            b"pass\nword\n"
        );
        std::fs::write(&p, b"").unwrap();
        assert!(read_key_file(&p, KeyFilePart::default())
            .unwrap()
            .is_empty());
        // Not a regular file, and nothing in it: refused, as cryptsetup refuses it.
        let e = read_key_file(Path::new("/dev/null"), KeyFilePart::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("nothing to read from key file /dev/null"), "{e}");
        let e = read_new_key_file(&p, KeyFilePart::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("is empty"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// `--keyfile-offset` and `--keyfile-size` take the bytes cryptsetup takes, and what
    /// it refuses is refused.
    #[test]
    fn a_part_of_the_file_is_the_passphrase() {
        // Its own directory: the other test removes its own when done, and `cargo test`
        // runs both in one process.
        let dir = std::env::temp_dir().join(format!("luksify-keyfile-part-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("k");
        std::fs::write(&p, b"0123456789").unwrap();
        let part = |o: Option<u64>, n: Option<u64>| KeyFilePart {
            keyfile_offset: o,
            keyfile_size: n,
            new: false,
        };
        let read = |o, n| read_key_file(&p, part(o, n)).map(|k| k.to_vec());
        assert_eq!(read(Some(2), Some(3)).unwrap(), b"234");
        assert_eq!(read(Some(7), None).unwrap(), b"789");
        assert_eq!(read(None, Some(4)).unwrap(), b"0123");
        assert_eq!(read(Some(3), Some(0)).unwrap(), b"3456789");
        assert_eq!(read(Some(10), None).unwrap(), b"");
        let e = read(Some(11), None).unwrap_err().to_string();
        assert!(e.contains("shorter than --keyfile-offset 11"), "{e}");
        let e = read(Some(8), Some(3)).unwrap_err().to_string();
        assert!(
            e.contains("holds 2 bytes from offset 8, fewer than --keyfile-size 3"),
            "{e}"
        );
        let e = read(None, Some(MAX_KEY_FILE_BYTES as u64 + 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--keyfile-size is over"), "{e}");
        // Through a pipe (not seekable), as `--key-file -` reads standard input.
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        let w = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::write(fifo, b"abcdefgh"))
        };
        let k = read_key_file(&fifo, part(Some(5), Some(2))).unwrap();
        assert_eq!(&k[..], b"fg");
        w.join().unwrap().unwrap();
        let e = read_new_key_file(&p, part(Some(10), None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds nothing past the offset given"), "{e}");
        // The new passphrase's options are named as given.
        let new = KeyFilePart {
            new: true,
            ..part(Some(50), None)
        };
        let e = read_key_file(&p, new).unwrap_err().to_string();
        assert!(e.contains("shorter than --new-keyfile-offset 50"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("luksify-keyfile-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
