//! One luksify at a time: an exclusive flock on `STATE_DIR/luksify.lock`, with the
//! holder's pid written inside so that a refused second invocation can name it.
//! The kernel drops a flock when its holder dies, so a crash never leaves a stale lock.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = "luksify.lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another luksify (pid {pid}) is working on disks (lock {path}); wait for it to finish, or pass --wait to queue behind it"
    )]
    Busy { pid: String, path: PathBuf },
    #[error("the state directory {path} {why}: another user could rewrite luksify's records and the headers it keeps there; fix: {fix}, or pass --state-dir with a directory only root can write")]
    OpenToOthers {
        path: PathBuf,
        why: String,
        fix: String,
    },
    #[error("cannot take the lock {path}: {source}; {}", io_fix(source))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What to do about the lock's I/O error: the advice was "the state directory must be a
/// directory root can write" whatever happened, a full disk included (a trial).
fn io_fix(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => "run as root",
        Some(libc::ENOSPC | libc::EDQUOT) => "free space on the state directory's filesystem",
        Some(libc::EROFS) => {
            "the state directory is on a read-only filesystem: pass --state-dir on a writable one"
        }
        Some(libc::ENOTDIR | libc::EEXIST) => {
            "--state-dir must name a directory (or a path that does not exist yet)"
        }
        _ => "the state directory must be a directory root can write (--state-dir)",
    }
}

/// How `dir` is open to other users, if it is: owned by another user, or writable by a
/// group or by others (a trial's `umask 000` state directory let a user plant links and
/// rewrite mapping records that root then followed).
///
/// Its directories luksify keeps records in (`maps`, `headers`, `mnt`) likewise, and
/// each directory above it must not let another user rename it away: owned by root or
/// this user, and writable by others only with the sticky bit (as /tmp). A `maps` left
/// 0777 let a user forge a record that `close` then acted on (a trial).
/// Returns (how, the fix).
pub fn open_to_others(dir: &Path) -> Option<(String, String)> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let own = |p: &Path, what: &str| -> Option<(String, String)> {
        let md = std::fs::metadata(p).ok()?;
        let fix = format!("`chown root {} && chmod go-w {}`", p.display(), p.display());
        if md.uid() != euid {
            Some((
                format!("{what}belongs to uid {}, not to uid {euid}", md.uid()),
                fix,
            ))
        } else if md.mode() & 0o022 != 0 {
            Some((
                format!(
                    "{what}is writable by other users (mode {:o})",
                    md.mode() & 0o7777
                ),
                fix,
            ))
        } else {
            None
        }
    };
    if let Some(why) = own(dir, "") {
        return Some(why);
    }
    for sub in ["maps", "headers", "mnt"] {
        let p = dir.join(sub);
        if let Some(why) = own(&p, &format!("has {}, which ", p.display())) {
            return Some(why);
        }
    }
    let canon = std::fs::canonicalize(dir).ok()?;
    for a in canon.ancestors().skip(1) {
        let md = std::fs::metadata(a).ok()?;
        let sticky = md.mode() & 0o1000 != 0;
        let fix =
            "move it below directories only root can write (such as /var/lib/luksify)".to_string();
        if md.uid() != 0 && md.uid() != euid {
            return Some((
                format!(
                    "lies in {}, which belongs to uid {} (who could move it away)",
                    a.display(),
                    md.uid()
                ),
                fix,
            ));
        }
        if md.mode() & 0o022 != 0 && !sticky {
            return Some((
                format!(
                    "lies in {}, which other users can write without the sticky bit (mode {:o}: they could move it away)",
                    a.display(),
                    md.mode() & 0o7777
                ),
                fix,
            ));
        }
    }
    None
}

/// Held for as long as it lives.
#[derive(Debug)]
pub struct GlobalLock {
    file: File,
    path: PathBuf,
}

impl GlobalLock {
    /// Takes the lock; with `wait` blocks until the holder releases it, else fails at once.
    pub fn acquire(state_dir: &Path, wait: bool) -> Result<GlobalLock, LockError> {
        let path = state_dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        crate::status::create_dirs(state_dir, 0o755).map_err(io)?;
        if let Some((why, fix)) = open_to_others(state_dir) {
            return Err(LockError::OpenToOthers {
                path: state_dir.to_path_buf(),
                why,
                fix,
            });
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            // Close-on-exec so that tools we run (mount, e2fsck) do not inherit it.
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(io)?;
        if let Err(e) = luksify_walker::device::flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io(e));
            }
            let mut s = String::new();
            let _ = file.read_to_string(&mut s);
            let pid = s.trim().to_string();
            if wait {
                // Say why nothing happens yet, then queue.
                errln!(
                    "luksify: waiting for pid {} to release {} (--wait)",
                    if pid.is_empty() { "unknown" } else { &pid },
                    path.display()
                );
                luksify_walker::device::flock(&file, libc::LOCK_EX).map_err(io)?;
            } else {
                return Err(LockError::Busy {
                    pid: if pid.is_empty() {
                        "unknown".into()
                    } else {
                        pid
                    },
                    path,
                });
            }
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(GlobalLock { file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for GlobalLock {
    fn drop(&mut self) {
        // Leave the file (removing it would race with a waiter); just empty it.
        let _ = self.file.set_len(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The advice follows the error: a state directory path through a file is not "a
    /// directory root can write", and a full disk is not either (a trial's ENOSPC was
    /// told so).
    #[test]
    fn a_lock_error_says_what_to_do_about_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let err = GlobalLock::acquire(&file.join("state"), false).unwrap_err();
        assert!(
            err.to_string()
                .contains("--state-dir must name a directory"),
            "{err}"
        );
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(
            io_fix(&full),
            "free space on the state directory's filesystem"
        );
        let denied = std::io::Error::from_raw_os_error(libc::EACCES);
        assert_eq!(io_fix(&denied), "run as root");
    }

    #[test]
    fn second_holder_is_refused_with_the_first_pid_then_succeeds_after_release() {
        let dir = tempfile::tempdir().unwrap();
        let a = GlobalLock::acquire(dir.path(), false).unwrap();
        // A second open file description conflicts even within one process.
        let err = GlobalLock::acquire(dir.path(), false).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains("--wait"), "{msg}");
        drop(a);
        let b = GlobalLock::acquire(dir.path(), false).unwrap();
        drop(b);
    }

    #[test]
    fn waiter_gets_the_lock_when_the_holder_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let a = GlobalLock::acquire(dir.path(), false).unwrap();
        let p = dir.path().to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let l = GlobalLock::acquire(&p, true).unwrap();
            tx.send(()).unwrap();
            drop(l);
        });
        // The waiter cannot have it while `a` lives.
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(300))
            .is_err());
        drop(a);
        rx.recv().unwrap();
        t.join().unwrap();
    }
}
