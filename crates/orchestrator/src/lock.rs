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
    #[error("the state directory {path} {why}: another user could rewrite luksify's records and the headers it keeps there; fix: `chown root {path} && chmod go-w {path}`, or pass --state-dir with a directory only root can write")]
    OpenToOthers { path: PathBuf, why: String },
    #[error("cannot take the lock {path}: {source}; the state directory must be a directory root can write (--state-dir)")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How `dir` is open to other users, if it is: owned by another user, or writable by a
/// group or by others (a trial's `umask 000` state directory let a user plant links and
/// rewrite mapping records that root then followed).
pub fn open_to_others(dir: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(dir).ok()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if md.uid() != euid {
        Some(format!("belongs to uid {}, not to uid {euid}", md.uid()))
    } else if md.mode() & 0o022 != 0 {
        Some(format!(
            "is writable by other users (mode {:o})",
            md.mode() & 0o7777
        ))
    } else {
        None
    }
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
        if let Some(why) = open_to_others(state_dir) {
            return Err(LockError::OpenToOthers {
                path: state_dir.to_path_buf(),
                why,
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
