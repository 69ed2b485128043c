//! /etc/fstab and /etc/crypttab editing. Each file is backed up once per run
//! (`FILE.luksify-bak`), then replaced atomically. The fstab line that luksify
//! replaces is kept as a comment after a marker so that `disable` restores it exactly.

use crate::status::write_atomic_mode;
use std::path::{Path, PathBuf};

const MARK: &str = "# luksify: was: ";
/// Marks an entry `enable` gave `nofail` for the time of its walk (the line as it was
/// follows the marker; the held line comes next).
const HOLD: &str = "# luksify: while encrypting, was: ";

/// Where the tables live: $LUKSIFY_ETC_DIR (tests) or /etc.
pub fn etc_dir() -> PathBuf {
    match std::env::var_os("LUKSIFY_ETC_DIR") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from("/etc"),
    }
}

/// The (device, detached header file) pairs crypttab's `header=` options name.
pub fn crypttab_headers() -> Vec<(PathBuf, PathBuf)> {
    let Ok(text) = std::fs::read_to_string(etc_dir().join("crypttab")) else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let h = f
                .get(3)?
                .split(',')
                .find_map(|o| o.strip_prefix("header="))?;
            Some((PathBuf::from(f.get(1)?), PathBuf::from(h)))
        })
        .collect()
}

/// `(mapping name, device field)` of each crypttab line whose mapping is luksify's name
/// for kernel device `kname` (`luksify-KNAME`, or `luksify-KNAME-N`).
pub fn crypttab_luksify_lines(kname: &str) -> Vec<(String, String)> {
    let Ok(text) = std::fs::read_to_string(etc_dir().join("crypttab")) else {
        return Vec::new();
    };
    let ours = format!("luksify-{kname}");
    text.lines()
        .filter_map(fields)
        .filter(|f| {
            f.first().is_some_and(|n| {
                *n == ours
                    || n.strip_prefix(&ours)
                        .and_then(|r| r.strip_prefix('-'))
                        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            })
        })
        .filter_map(|f| Some((f[0].to_string(), f.get(1)?.to_string())))
        .collect()
}

/// fstab escapes spaces in fields as \040, like mountinfo.
fn escape(s: &str) -> String {
    s.replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
}

/// Fields of a non-comment line.
fn fields(line: &str) -> Option<Vec<&str>> {
    let t = line.trim_start();
    if t.is_empty() || t.starts_with('#') {
        return None;
    }
    Some(t.split_whitespace().collect())
}

/// Points the fstab entry for `mount_point` at `mapped`, keeping the original as a marked
/// comment. The entry keeps its own type, options, dump and pass fields, plus `nofail` (a
/// volume whose key is missing must not stop the boot); with no entry, one is appended
/// from `fs_type` and the mount's `options`.
pub fn fstab_encrypt(
    text: &str,
    mount_point: &Path,
    mapped: &Path,
    fs_type: &str,
    options: &str,
    device: &Path,
) -> String {
    // The entry as it was before the walk held it (see fstab_hold).
    let released = fstab_release(text, Some(mount_point));
    let text = released.as_str();
    let mp = escape(&mount_point.to_string_lossy());
    let spec = escape(&mapped.to_string_lossy());
    let entry = |fs_type: &str, options: &str, tail: &str| {
        let mut opts: Vec<&str> = options.split(',').filter(|o| !o.is_empty()).collect();
        if !opts.contains(&"nofail") {
            opts.push("nofail");
        }
        format!("{spec} {mp} {fs_type} {} {tail}", opts.join(","))
    };
    // Already pointed at the mapping (a run killed after this step, then resumed).
    if text
        .lines()
        .filter_map(fields)
        .any(|f| f.len() >= 2 && same_mount_point(f[1], mount_point) && f[0] == spec)
    {
        return text.to_string();
    }
    // The entry to replace: the one at this mount point that names the device by its
    // path, else the first at it. Other entries at the same mount point stay as they
    // are (the second one was dropped without a word, and disable then restored the
    // first, which named another device: found by a trial).
    // (A mount point is the same written with a trailing slash, or through a link:
    // such an entry was left naming the raw device beside an added one, and systemd's
    // fstab generator failed on the duplicate at boot: found by a trial.)
    let at_mp =
        |l: &str| fields(l).is_some_and(|f| f.len() >= 2 && same_mount_point(f[1], mount_point));
    let names_device = |l: &str| {
        fields(l)
            .is_some_and(|f| std::fs::canonicalize(unescape_field(f[0])).is_ok_and(|p| p == device))
    };
    let first = text
        .lines()
        .position(|l| at_mp(l) && names_device(l))
        .or_else(|| text.lines().position(at_mp));
    // The same entry repeated (the same spec at the same mount point) is replaced each
    // time: a copy left naming the raw device would mount ciphertext.
    let first_spec = first
        .and_then(|i| text.lines().nth(i))
        .and_then(fields)
        .map(|f| f[0].to_string());
    let is_target = |i: usize, l: &str| {
        Some(i) == first
            || (at_mp(l)
                && (names_device(l)
                    || fields(l).is_some_and(|f| Some(f[0]) == first_spec.as_deref())))
    };
    let mut out = Vec::new();
    let mut replaced = false;
    for (i, line) in text.lines().enumerate() {
        if let Some(f) = fields(line) {
            if is_target(i, line) {
                out.push(format!("{MARK}{line}"));
                out.push(entry(
                    f.get(2).copied().unwrap_or(fs_type),
                    f.get(3).copied().unwrap_or("defaults"),
                    &format!(
                        "{} {}",
                        f.get(4).copied().unwrap_or("0"),
                        f.get(5).copied().unwrap_or("0")
                    ),
                ));
                replaced = true;
                continue;
            }
        }
        out.push(line.to_string());
    }
    if !replaced {
        // Before the first entry mounted below it: `mount -a` mounts in file order, and
        // an entry nested in this one listed first found no mount point (`findmnt
        // --verify`: "wrong order", a trial).
        let below = |l: &String| {
            fields(l).is_some_and(|f| {
                f.len() >= 2
                    && Path::new(&unescape_field(f[1])).starts_with(mount_point)
                    && !same_mount_point(f[1], mount_point)
            })
        };
        let at = out.iter().position(below).unwrap_or(out.len());
        out.insert(at, entry(fs_type, options, "0 2"));
        out.insert(at, format!("{MARK}(none) {mp}"));
    }
    join(out)
}

/// Gives the entries at `mount_points` that lack it `nofail` for the time of the walk,
/// keeping each line as it was behind a [`HOLD`] marker: a boot while the volume is
/// half ciphertext (a crash, a power cut, a reboot mid-walk) then skips its mount
/// instead of stopping in emergency mode on an fsck or mount of ciphertext, and
/// `luksify-resume.service` finishes the run (a trial: fsck exit 8, local-fs.target
/// failed). [`fstab_encrypt`] and [`fstab_release`] give the line back.
pub fn fstab_hold(text: &str, mount_points: &[&Path]) -> String {
    let mut out = Vec::new();
    let mut held = false;
    for line in text.lines() {
        if held {
            // The line after a marker is already held.
            held = false;
            out.push(line.to_string());
            continue;
        }
        if line.starts_with(HOLD) {
            held = true;
            out.push(line.to_string());
            continue;
        }
        match fields(line) {
            Some(f)
                if f.len() >= 2
                    && mount_points.iter().any(|mp| same_mount_point(f[1], mp))
                    && !f
                        .get(3)
                        .is_some_and(|o| o.split(',').any(|o| o == "nofail")) =>
            {
                let opts = match f.get(3) {
                    Some(o) => format!("{o},nofail"),
                    None => "defaults,nofail".to_string(),
                };
                let mut g: Vec<String> = f.iter().map(|x| x.to_string()).collect();
                if g.len() < 3 {
                    g.push("auto".into());
                }
                if g.len() < 4 {
                    g.push(opts);
                } else {
                    g[3] = opts;
                }
                out.push(format!("{HOLD}{line}"));
                out.push(g.join(" "));
            }
            _ => out.push(line.to_string()),
        }
    }
    join(out)
}

/// Undoes [`fstab_hold`] for the entries at `mount_point` (every one when `None`).
pub fn fstab_release(text: &str, mount_point: Option<&Path>) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if let Some(orig) = lines[i].strip_prefix(HOLD) {
            let ours = fields(orig).is_some_and(|f| {
                f.len() >= 2 && mount_point.is_none_or(|mp| same_mount_point(f[1], mp))
            });
            if ours {
                out.push(orig.to_string());
                i += 2;
                continue;
            }
        }
        out.push(lines[i].to_string());
        i += 1;
    }
    join(out)
}

/// Points every entry that still names `mapped` (no `# luksify: was:` line to restore:
/// removed by hand) at `plain` (`UUID=...` of the plain filesystem), the rest of the
/// line kept.
pub fn fstab_unmap(text: &str, mapped: &Path, plain: &str) -> String {
    let spec = escape(&mapped.to_string_lossy());
    let out = text
        .lines()
        .map(|l| match fields(l) {
            Some(f) if f.first() == Some(&spec.as_str()) => {
                let rest = l.trim_start()[spec.len()..].to_string();
                format!("{plain}{rest}")
            }
            _ => l.to_string(),
        })
        .collect();
    join(out)
}

/// An fstab entry's mount point, filesystem type and options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FstabEntry {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub options: String,
}

/// The fstab entries (not commented out) whose spec is `device`: its path, or a
/// `UUID=`/`LABEL=`/`PARTUUID=`/`PARTLABEL=` that `ids` (blkid's `KEY=value` lines for
/// the device) carries, or a /dev/disk link to it. A missing type reads `auto` and
/// missing options `defaults`, as mount(8) takes them.
pub fn fstab_entries_of(text: &str, device: &Path, ids: &[String]) -> Vec<FstabEntry> {
    text.lines()
        .filter_map(fields)
        .filter(|f| f.len() >= 2)
        .filter(|f| {
            let spec = f[0];
            ids.iter()
                .any(|id| id == spec || id.replace('"', "") == spec)
                || std::fs::canonicalize(unescape_field(spec)).is_ok_and(|p| p == device)
        })
        .map(|f| FstabEntry {
            mount_point: PathBuf::from(unescape_field(f[1])),
            fs_type: f.get(2).map_or("auto", |t| t).to_string(),
            options: f.get(3).map_or("defaults", |o| o).to_string(),
        })
        .collect()
}

/// Whether an fstab mount point field names `mount_point`: the same path once
/// unescaped (a trailing slash or a `.` component aside), or the same directory
/// reached through a link.
fn same_mount_point(field: &str, mount_point: &Path) -> bool {
    let f = PathBuf::from(unescape_field(field));
    f == mount_point
        || std::fs::canonicalize(&f)
            .ok()
            .is_some_and(|c| std::fs::canonicalize(mount_point).is_ok_and(|m| m == c))
}

/// Whether an fstab entry (in use, or kept by luksify as the one it replaced) at one of
/// `mount_points` carries `_netdev`: its device needs the network, so its crypttab
/// entry must wait for it too.
pub fn fstab_needs_network(text: &str, mount_points: &[&Path]) -> bool {
    text.lines()
        .filter_map(|l| fields(l.strip_prefix(MARK).unwrap_or(l)))
        .filter(|f| f.len() >= 4)
        .any(|f| {
            mount_points.iter().any(|mp| same_mount_point(f[1], mp))
                && f[3].split(',').any(|o| o == "_netdev")
        })
}

/// Undoes [`escape`].
pub(crate) fn unescape_field(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\134", "\\")
}

/// Undoes [`fstab_encrypt`] for `mount_point`: the marked original comes back;
/// with no original, the added entry is removed.
pub fn fstab_restore(text: &str, mount_point: &Path) -> String {
    let mp = escape(&mount_point.to_string_lossy());
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if let Some(orig) = line.strip_prefix(MARK) {
            let next_is_ours = lines
                .get(i + 1)
                .and_then(|l| fields(l))
                .is_some_and(|f| f.len() >= 2 && f[1] == mp);
            let orig_mp = match orig.strip_prefix("(none) ") {
                Some(p) => p.to_string(),
                None => fields(orig)
                    .and_then(|f| f.get(1).map(|s| s.to_string()))
                    .unwrap_or_default(),
            };
            if next_is_ours && (orig_mp == mp || same_mount_point(&orig_mp, mount_point)) {
                if !orig.starts_with("(none) ") {
                    out.push(restored_line(orig, lines[i + 1]));
                }
                i += 2;
                continue;
            }
        }
        out.push(line.to_string());
        i += 1;
    }
    join(out)
}

/// The original entry `orig` given back in place of `ours`, the mapping's entry
/// [`fstab_encrypt`] wrote from it: `orig` as it was, unless the mapping's entry was
/// changed since (an option the admin added while the volume was encrypted, a pass
/// number), in which case the original device takes the changed entry's type, options,
/// dump and pass, less the `nofail` luksify added if the original lacked it (a trial's
/// `disable` dropped an admin's `noatime`).
fn restored_line(orig: &str, ours: &str) -> String {
    let (Some(o), Some(m)) = (fields(orig), fields(ours)) else {
        return orig.to_string();
    };
    let field = |f: &[&str], i: usize, default: &'static str| -> String {
        f.get(i).copied().unwrap_or(default).to_string()
    };
    let orig_opts = field(&o, 3, "defaults");
    let had_nofail = orig_opts.split(',').any(|x| x == "nofail");
    let mut as_written: Vec<&str> = orig_opts.split(',').filter(|x| !x.is_empty()).collect();
    if !had_nofail {
        as_written.push("nofail");
    }
    let unchanged = field(&m, 2, "auto") == field(&o, 2, "auto")
        && field(&m, 3, "defaults") == as_written.join(",")
        && field(&m, 4, "0") == field(&o, 4, "0")
        && field(&m, 5, "0") == field(&o, 5, "0");
    if unchanged || o.len() < 2 {
        return orig.to_string();
    }
    let now = field(&m, 3, "defaults");
    let opts: Vec<&str> = now
        .split(',')
        .filter(|x| !x.is_empty() && (had_nofail || *x != "nofail"))
        .collect();
    format!(
        "{} {} {} {} {} {}",
        o[0],
        o[1],
        field(&m, 2, "auto"),
        if opts.is_empty() {
            "defaults".to_string()
        } else {
            opts.join(",")
        },
        field(&m, 4, "0"),
        field(&m, 5, "0")
    )
}

/// One crypttab entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrypttabEntry {
    pub name: String,
    /// `UUID=...` of the LUKS header, or the device path for a detached header.
    pub device: String,
    pub key_file: PathBuf,
    pub header: Option<PathBuf>,
    /// `_netdev`: the device needs the network (its fstab entry says so).
    pub netdev: bool,
}

impl CrypttabEntry {
    pub fn line(&self) -> String {
        let mut opts = vec!["luks".to_string(), "nofail".to_string()];
        if self.netdev {
            opts.push("_netdev".into());
        }
        if let Some(h) = &self.header {
            opts.push(format!("header={}", h.display()));
        }
        format!(
            "{} {} {} {}",
            self.name,
            self.device,
            escape(&self.key_file.to_string_lossy()),
            opts.join(",")
        )
    }
}

/// Adds (or replaces) the entry named `e.name`.
pub fn crypttab_add(text: &str, e: &CrypttabEntry) -> String {
    let mut out: Vec<String> = text
        .lines()
        .filter(|l| fields(l).is_none_or(|f| f.first() != Some(&e.name.as_str())))
        .map(str::to_string)
        .collect();
    out.push(e.line());
    join(out)
}

/// The names (first fields) of crypttab's entries.
pub fn crypttab_names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(fields)
        .filter_map(|f| f.first().map(|n| n.to_string()))
        .collect()
}

/// Removes the entry named `name`.
pub fn crypttab_remove(text: &str, name: &str) -> String {
    join(
        text.lines()
            .filter(|l| fields(l).is_none_or(|f| f.first() != Some(&name)))
            .map(str::to_string)
            .collect(),
    )
}

fn join(lines: Vec<String>) -> String {
    let mut s = lines.join("\n");
    if !s.is_empty() {
        s.push('\n');
    }
    s
}

/// Why fstab or crypttab in [`etc_dir`] could not be rewritten now (an immutable file,
/// a read-only /etc), if so: each is replaced through a new file in the same
/// directory. Checked before a run takes anything offline (a trial's immutable fstab
/// failed after the walk, "Encryption failed", the volume offline).
pub fn unwritable() -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let etc = etc_dir();
    let access = |p: &Path| -> std::io::Result<()> {
        let c = std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: `c` is a NUL-terminated path; access(2) only reads it.
        if unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let mut paths = vec![etc.clone()];
    for f in ["fstab", "crypttab"] {
        // A link's target is the file replaced, through a new file in its directory.
        let file = through_links(&etc.join(f));
        if let Some(dir) = file.parent().filter(|d| *d != etc) {
            // A dangling link into a directory that is not there: not made up (a trial
            // saw enable create it).
            if !dir.exists() {
                return Some(format!(
                    "{} is a link to {}, whose directory does not exist: enable and disable edit the file a link names; fix: point the link at an existing file, or remove it",
                    etc.join(f).display(),
                    file.display()
                ));
            }
            paths.push(dir.to_path_buf());
        }
        if file.exists() {
            paths.push(file);
        }
    }
    paths.into_iter().find_map(|p| {
        access(&p).err().map(|e| {
            format!(
                "{} cannot be written ({e}): enable and disable rewrite fstab and crypttab there; fix: make it writable (`lsattr`/`chattr -i`, or remount /etc read-write)",
                p.display()
            )
        })
    })
}

/// The file `path` names through symbolic links (up to 40, as the kernel follows them;
/// the last one's target may not exist yet). An fstab or crypttab that is a link (to a
/// configuration tool's copy, or a file on another filesystem) is edited where it lives,
/// and the link stays a link: it used to be replaced by a plain file.
pub fn through_links(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    for _ in 0..40 {
        let Ok(target) = std::fs::read_link(&p) else {
            break;
        };
        p = match p.parent() {
            Some(dir) if target.is_relative() => dir.join(target),
            _ => target,
        };
    }
    p
}

/// Where [`TabsLock`] lives: root's own directory under /run (a lock file in a
/// directory others can write could be held, or planted as a link, by them).
const TABS_LOCK_DIR: &str = "/run/luksify";

/// An exclusive `flock` on `/run/luksify/tabs.lock` while one fstab or crypttab edit
/// reads and replaces its file; released on drop. Best effort: where it cannot be
/// taken (no /run, not root) the edit goes on unlocked, as it always did.
struct TabsLock {
    _file: Option<std::fs::File>,
}

impl TabsLock {
    fn take() -> TabsLock {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = Path::new(TABS_LOCK_DIR);
        let file = crate::status::create_dirs(dir, 0o700)
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(dir.join("tabs.lock"))
            })
            .ok()
            .filter(|f| {
                use std::os::fd::AsRawFd;
                loop {
                    // SAFETY: flock on a descriptor this function owns.
                    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                        return true;
                    }
                    if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                        return false;
                    }
                }
            });
        TabsLock { _file: file }
    }
}

/// Applies `edit` to the file at `path` (missing = empty; a symbolic link: the file it
/// names), backing it up first to `FILE.luksify-bak` beside it (kept from the first
/// edit, so the pristine copy survives).
pub fn edit_file(path: &Path, edit: impl FnOnce(&str) -> String) -> std::io::Result<()> {
    // One edit at a time across every luksify process: runs of two state directories
    // (two agents) each read, edited and replaced fstab, and one lost the other's
    // change (a trial: a plain volume's fstab line left on its closed mapping).
    let _lock = TabsLock::take();
    let path = &through_links(path);
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let backup = PathBuf::from(format!("{}.luksify-bak", path.display()));
    let existed = path.exists();
    let mut new = edit(&text);
    // A file that ended without a newline still does (a trial's fstab gained one).
    if !text.is_empty() && !text.ends_with('\n') && new.ends_with('\n') {
        new.pop();
    }
    use std::os::unix::fs::PermissionsExt;
    // A new fstab is readable by all, as Debian makes it; a new crypttab (it names key
    // files) by root only. Under `umask 000` a new crypttab was made 0666 (a trial).
    let new_mode = if path.file_name().is_some_and(|n| n == "fstab") {
        0o644
    } else {
        0o600
    };
    let mode = std::fs::metadata(path).map_or(new_mode, |m| m.permissions().mode() & 0o7777);
    // The backup whole or not at all: a copy cut by a full disk stayed as the empty
    // "pristine" copy for good (a trial).
    if !backup.exists() && (existed || new != text) {
        write_atomic_mode(&backup, text.as_bytes(), if existed { mode } else { 0o600 })?;
    }
    if new != text {
        // Keep the permissions fstab/crypttab had (crypttab is often 0600).
        write_atomic_mode(path, new.as_bytes(), mode)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `fstab_encrypt` of `text` for the volume at `mp` mapped as `mapped`, on a device
    /// (`/dev/sdz9`) no entry names.
    fn encrypted(text: &str, mp: &str, mapped: &str, fs: &str, opts: &str) -> String {
        fstab_encrypt(
            text,
            Path::new(mp),
            Path::new(mapped),
            fs,
            opts,
            Path::new("/dev/sdz9"),
        )
    }

    const FSTAB: &str = "# /etc/fstab\nUUID=abc / ext4 errors=remount-ro 0 1\n/dev/sdc1 /data ext4 defaults,noatime 0 2\n";

    /// Edits from many writers at once each land: none reads the file, is overtaken by
    /// another's replacement, and writes back without that one's line (two agents' runs
    /// lost each other's fstab and crypttab changes; a trial).
    #[test]
    #[ignore = "needs root (the lock lives in /run/luksify)"]
    fn concurrent_edits_lose_nothing() {
        let d = tempfile::tempdir().unwrap();
        let tab = d.path().join("fstab");
        std::fs::write(&tab, "# fstab\n").unwrap();
        let writers: Vec<_> = (0..8)
            .map(|w| {
                let tab = tab.clone();
                std::thread::spawn(move || {
                    for i in 0..40 {
                        edit_file(&tab, |t| {
                            // Widen the window between the read and the write.
                            std::thread::sleep(std::time::Duration::from_micros(200));
                            format!("{t}/dev/w{w} /m{i} ext4 defaults 0 2\n")
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let text = std::fs::read_to_string(&tab).unwrap();
        assert_eq!(text.lines().count(), 1 + 8 * 40, "{text}");
    }

    /// A symlinked fstab is edited where it lives: the link stays, the backup sits
    /// beside the file it copies, and the file keeps its mode.
    #[test]
    fn a_linked_tab_is_edited_through_its_link() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("managed");
        std::fs::create_dir(&real).unwrap();
        std::fs::write(real.join("fstab"), FSTAB).unwrap();
        std::fs::set_permissions(real.join("fstab"), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        let etc = d.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        // Two hops, the first relative.
        std::os::unix::fs::symlink("fstab.link", etc.join("fstab")).unwrap();
        std::os::unix::fs::symlink(real.join("fstab"), etc.join("fstab.link")).unwrap();
        assert_eq!(through_links(&etc.join("fstab")), real.join("fstab"));
        edit_file(&etc.join("fstab"), |t| format!("{t}# added\n")).unwrap();
        assert!(std::fs::symlink_metadata(etc.join("fstab"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(
            std::fs::read_to_string(real.join("fstab")).unwrap(),
            format!("{FSTAB}# added\n")
        );
        assert_eq!(
            std::fs::read_to_string(real.join("fstab.luksify-bak")).unwrap(),
            FSTAB
        );
        assert!(!etc.join("fstab.luksify-bak").exists());
        let mode = std::fs::metadata(real.join("fstab"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
        // A link to a file not there yet: the file is made where the link points.
        std::os::unix::fs::symlink(real.join("crypttab"), etc.join("crypttab")).unwrap();
        edit_file(&etc.join("crypttab"), |t| format!("{t}x\n")).unwrap();
        assert_eq!(
            std::fs::read_to_string(real.join("crypttab")).unwrap(),
            "x\n"
        );
        assert!(std::fs::symlink_metadata(etc.join("crypttab"))
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn fstab_encrypt_then_restore_is_identity() {
        let enc = encrypted(FSTAB, "/data", "/dev/mapper/data", "ext4", "rw,noatime");
        assert!(enc.contains("# luksify: was: /dev/sdc1 /data ext4 defaults,noatime 0 2\n"));
        // The entry's own options and fields stay (not the mount's runtime ones).
        assert!(enc.contains("/dev/mapper/data /data ext4 defaults,noatime,nofail 0 2\n"));
        assert!(!enc.lines().any(|l| l.starts_with("/dev/sdc1")));
        assert!(enc.contains("UUID=abc / ext4"));
        assert_eq!(fstab_restore(&enc, Path::new("/data")), FSTAB);
        // Done twice (a resumed run), it is done once.
        let twice = encrypted(&enc, "/data", "/dev/mapper/data", "ext4", "rw,noatime");
        assert_eq!(twice, enc);
        // Restoring another mount point changes nothing.
        assert_eq!(fstab_restore(&enc, Path::new("/other")), enc);
    }

    /// An entry the admin changed while the volume was encrypted keeps the change when
    /// disable gives the original device back (a trial's `disable` dropped `,ro` and a
    /// pass number); the `nofail` luksify added goes, one the original had stays.
    #[test]
    fn fstab_restore_keeps_what_the_admin_changed_in_the_mapping_entry() {
        let enc = encrypted(FSTAB, "/data", "/dev/mapper/data", "ext4", "rw");
        let changed = enc.replace(
            "/dev/mapper/data /data ext4 defaults,noatime,nofail 0 2",
            "/dev/mapper/data /data ext4 defaults,noatime,nofail,ro 0 0",
        );
        assert_ne!(changed, enc);
        assert_eq!(
            fstab_restore(&changed, Path::new("/data")),
            FSTAB.replace(
                "/dev/sdc1 /data ext4 defaults,noatime 0 2",
                "/dev/sdc1 /data ext4 defaults,noatime,ro 0 0"
            )
        );
        let had = "/dev/sdc1\t/data  xfs nofail\n";
        let enc = encrypted(had, "/data", "/dev/mapper/data", "xfs", "rw");
        assert_eq!(fstab_restore(&enc, Path::new("/data")), had);
        let changed = enc.replace("nofail 0 0", "nofail,noatime 0 0");
        assert_ne!(changed, enc);
        assert_eq!(
            fstab_restore(&changed, Path::new("/data")),
            "/dev/sdc1 /data xfs nofail,noatime 0 0\n"
        );
    }

    /// Two entries at one mount point: the one naming the device is the one replaced
    /// (and restored); the other stays as it was. The second was dropped without a word
    /// and disable restored the first, which named another device (found by a trial).
    #[test]
    fn fstab_replaces_the_entry_naming_the_device_and_keeps_the_others() {
        let d = tempfile::tempdir().unwrap();
        let dev = d.path().join("loop5");
        std::fs::write(&dev, b"").unwrap();
        let t = format!(
            "LABEL=elsewhere /c ext4 defaults 0 2\n{} /c ext4 defaults 0 2\n",
            dev.display()
        );
        let enc = fstab_encrypt(
            &t,
            Path::new("/c"),
            Path::new("/dev/mapper/m"),
            "ext4",
            "rw",
            &dev,
        );
        assert!(
            enc.starts_with("LABEL=elsewhere /c ext4 defaults 0 2\n"),
            "{enc}"
        );
        assert!(
            enc.contains(&format!("# luksify: was: {} /c", dev.display()))
                && enc.contains("/dev/mapper/m /c ext4 defaults,nofail 0 2"),
            "{enc}"
        );
        assert_eq!(enc.lines().count(), 3, "{enc}");
        assert_eq!(fstab_restore(&enc, Path::new("/c")), t);
    }

    #[test]
    fn fstab_entry_keeps_its_type_options_and_pass() {
        let t = "/dev/vdb /srv auto defaults 0 0\n";
        let enc = encrypted(t, "/srv", "/dev/mapper/v", "xfs", "rw,relatime,inode64");
        assert!(
            enc.ends_with("/dev/mapper/v /srv auto defaults,nofail 0 0\n"),
            "{enc}"
        );
        assert_eq!(fstab_restore(&enc, Path::new("/srv")), t);
    }

    #[test]
    fn fstab_entries_of_match_path_uuid_and_label() {
        let d = tempfile::tempdir().unwrap();
        let dev = d.path().join("dev");
        std::fs::write(&dev, b"").unwrap();
        let t = format!(
            "# {p} /c ext4 defaults 0 0\n{p} /a ext4 defaults 0 0\nUUID=u1 /b xfs noatime 0 0\nLABEL=L /d ext4 ro 0 0\nUUID=u2 /e ext4 defaults 0 0\nLABEL=L /f\n",
            p = dev.display()
        );
        let ids = vec!["UUID=u1".to_string(), "LABEL=L".to_string()];
        let e = |mp: &str, t: &str, o: &str| FstabEntry {
            mount_point: PathBuf::from(mp),
            fs_type: t.into(),
            options: o.into(),
        };
        assert_eq!(
            fstab_entries_of(&t, &dev, &ids),
            [
                e("/a", "ext4", "defaults"),
                e("/b", "xfs", "noatime"),
                e("/d", "ext4", "ro"),
                e("/f", "auto", "defaults")
            ]
        );
    }

    #[test]
    fn fstab_appends_when_absent_and_escapes_spaces() {
        let enc = encrypted(FSTAB, "/my data", "/dev/mapper/d", "xfs", "rw,nofail");
        assert!(
            enc.ends_with("/dev/mapper/d /my\\040data xfs rw,nofail 0 2\n"),
            "{enc}"
        );
        assert_eq!(fstab_restore(&enc, Path::new("/my data")), FSTAB);
    }

    /// A mount point written with a trailing slash, and an entry repeated: each is
    /// replaced (a trial: the raw-device line stayed beside an added one, and systemd's
    /// fstab generator stopped on the duplicate at boot), and restored exactly.
    #[test]
    fn fstab_matches_a_trailing_slash_and_replaces_each_copy() {
        let t = "LABEL=d /srv/ ext4 noatime 0 2\n/dev/x /other ext4 defaults 0 2\nLABEL=d /srv/ ext4 noatime 0 2\n";
        let enc = encrypted(t, "/srv", "/dev/mapper/v", "ext4", "rw");
        assert_eq!(
            enc,
            "# luksify: was: LABEL=d /srv/ ext4 noatime 0 2\n/dev/mapper/v /srv ext4 noatime,nofail 0 2\n/dev/x /other ext4 defaults 0 2\n# luksify: was: LABEL=d /srv/ ext4 noatime 0 2\n/dev/mapper/v /srv ext4 noatime,nofail 0 2\n"
        );
        // Run again (a resumed run): unchanged.
        assert_eq!(encrypted(&enc, "/srv", "/dev/mapper/v", "ext4", "rw"), enc);
        assert_eq!(fstab_restore(&enc, Path::new("/srv")), t);
    }

    /// The walk's hold gives the volume's entries `nofail` (not one that has it, not
    /// another mount point's), and both ways back restore the line exactly.
    #[test]
    fn fstab_hold_adds_nofail_for_the_walk_and_gives_the_line_back() {
        let t = "# c\nLABEL=d /srv/ ext4 noatime 0 2\n/dev/x /other ext4 defaults 0 2\n/dev/y /srv/sub ext4 nofail 0 2\nUUID=u /srv\n";
        let mps = [Path::new("/srv"), Path::new("/srv/sub")];
        let held = fstab_hold(t, &mps);
        assert_eq!(
            held,
            "# c\n# luksify: while encrypting, was: LABEL=d /srv/ ext4 noatime 0 2\nLABEL=d /srv/ ext4 noatime,nofail 0 2\n/dev/x /other ext4 defaults 0 2\n/dev/y /srv/sub ext4 nofail 0 2\n# luksify: while encrypting, was: UUID=u /srv\nUUID=u /srv auto defaults,nofail\n"
        );
        // Held twice (a resumed run): unchanged.
        assert_eq!(fstab_hold(&held, &mps), held);
        assert_eq!(fstab_release(&held, None), t);
        assert_eq!(fstab_release(&held, Some(Path::new("/srv"))), t);
        // The walk done: the entry is pointed at the mapping and its original kept.
        let enc = encrypted(&held, "/srv", "/dev/mapper/v", "ext4", "rw");
        assert!(!enc.contains("while encrypting"), "{enc}");
        assert!(
            enc.contains("# luksify: was: LABEL=d /srv/ ext4 noatime 0 2\n/dev/mapper/v /srv ext4 noatime,nofail 0 2\n"),
            "{enc}"
        );
        assert_eq!(fstab_restore(&enc, Path::new("/srv")), t);
    }

    /// An entry added for a volume fstab did not name goes before the entries mounted
    /// below it, and comes out again exactly.
    #[test]
    fn fstab_adds_an_entry_before_those_nested_in_it() {
        let t = "/dev/a / ext4 defaults 0 1\n/dev/n /srv/nest ext4 defaults 0 2\n/dev/o /srv2 ext4 defaults 0 2\n";
        let enc = encrypted(t, "/srv", "/dev/mapper/v", "xfs", "rw");
        assert_eq!(
            enc,
            "/dev/a / ext4 defaults 0 1\n# luksify: was: (none) /srv\n/dev/mapper/v /srv xfs rw,nofail 0 2\n/dev/n /srv/nest ext4 defaults 0 2\n/dev/o /srv2 ext4 defaults 0 2\n"
        );
        assert_eq!(fstab_restore(&enc, Path::new("/srv")), t);
    }

    /// A mapping's entry whose marker line is gone is pointed at the plain filesystem.
    #[test]
    fn fstab_unmap_points_a_markerless_entry_at_the_plain_filesystem() {
        let t = "/dev/mapper/luksify-sdc /srv ext4 noatime,nofail 0 2\n/dev/mapper/other /x ext4 defaults 0 2\n";
        assert_eq!(
            fstab_unmap(t, Path::new("/dev/mapper/luksify-sdc"), "UUID=u1"),
            "UUID=u1 /srv ext4 noatime,nofail 0 2\n/dev/mapper/other /x ext4 defaults 0 2\n"
        );
        let restored = "LABEL=d /srv ext4 noatime 0 2\n";
        assert_eq!(
            fstab_unmap(restored, Path::new("/dev/mapper/luksify-sdc"), "UUID=u1"),
            restored
        );
    }

    #[test]
    fn netdev_in_fstab_goes_to_crypttab() {
        let t = "UUID=u /srv ext4 _netdev,noatime 0 2\n/dev/y /b ext4 defaults 0 2\n";
        assert!(fstab_needs_network(t, &[Path::new("/srv")]));
        assert!(!fstab_needs_network(t, &[Path::new("/b")]));
        // Still seen once luksify replaced the entry (a resumed run writes crypttab).
        let enc = encrypted(t, "/srv", "/dev/mapper/v", "ext4", "rw");
        assert!(fstab_needs_network(&enc, &[Path::new("/srv")]));
        let e = CrypttabEntry {
            name: "v".into(),
            device: "UUID=1".into(),
            key_file: "/k".into(),
            header: None,
            netdev: true,
        };
        assert_eq!(e.line(), "v UUID=1 /k luks,nofail,_netdev");
    }

    #[test]
    fn crypttab_add_replace_remove() {
        let e = CrypttabEntry {
            name: "data".into(),
            device: "UUID=1234".into(),
            key_file: "/root/k.bin".into(),
            header: None,
            netdev: false,
        };
        let t = crypttab_add("# c\n", &e);
        assert_eq!(t, "# c\ndata UUID=1234 /root/k.bin luks,nofail\n");
        let e2 = CrypttabEntry {
            header: Some("/hdr/data.luks".into()),
            device: "/dev/sdc".into(),
            ..e
        };
        let t2 = crypttab_add(&t, &e2);
        assert_eq!(
            t2,
            "# c\ndata /dev/sdc /root/k.bin luks,nofail,header=/hdr/data.luks\n"
        );
        assert_eq!(crypttab_remove(&t2, "data"), "# c\n");
        // A table that held only our entry is left empty, as it was.
        assert_eq!(crypttab_remove(&crypttab_add("", &e2), "data"), "");
    }

    #[test]
    fn edit_file_keeps_a_missing_final_newline_missing() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("fstab");
        std::fs::write(&f, "/dev/sdc1 /data ext4 defaults 0 2").unwrap();
        edit_file(&f, |t| {
            fstab_encrypt(
                t,
                Path::new("/data"),
                Path::new("/dev/mapper/d"),
                "ext4",
                "rw",
                Path::new("/dev/sdz9"),
            )
        })
        .unwrap();
        let enc = std::fs::read_to_string(&f).unwrap();
        assert!(enc.contains("/dev/mapper/d /data"), "{enc}");
        assert!(!enc.ends_with('\n'), "{enc:?}");
        edit_file(&f, |t| fstab_restore(t, Path::new("/data"))).unwrap();
        assert_eq!(
            std::fs::read_to_string(&f).unwrap(),
            "/dev/sdc1 /data ext4 defaults 0 2"
        );
        // One that had it keeps it.
        std::fs::write(&f, "a b\n").unwrap();
        edit_file(&f, |t| format!("{t}c d\n")).unwrap();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "a b\nc d\n");
    }

    #[test]
    fn edit_file_backs_up_once() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fstab");
        std::fs::write(&p, FSTAB).unwrap();
        edit_file(&p, |t| format!("{t}x\n")).unwrap();
        edit_file(&p, |t| format!("{t}y\n")).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.path().join("fstab.luksify-bak")).unwrap(),
            FSTAB
        );
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            format!("{FSTAB}x\ny\n")
        );
        // No file before the first edit: the backup is empty, not the first edit's
        // result that the second edit finds.
        let q = d.path().join("crypttab");
        edit_file(&q, |t| format!("{t}a\n")).unwrap();
        edit_file(&q, |t| format!("{t}b\n")).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.path().join("crypttab.luksify-bak")).unwrap(),
            ""
        );
        assert_eq!(std::fs::read_to_string(&q).unwrap(), "a\nb\n");
    }
}
