//! `/proc/self/mountinfo`: where a device is mounted and what is mounted below it.
//!
//! mountinfo (not /proc/mounts) is used because it carries the device number of
//! each mount, which identifies a filesystem even when the source is shown under
//! another name (`/dev/root`, a symlink, a loop device's backing file).

use serde::Serialize;
use std::path::{Path, PathBuf};

/// A device number split as the kernel prints it (`major:minor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
pub struct DevNum {
    pub major: u32,
    pub minor: u32,
}

impl DevNum {
    /// From a `dev_t` as returned by stat (st_dev / st_rdev).
    pub fn from_raw(raw: u64) -> DevNum {
        DevNum {
            major: libc::major(raw as libc::dev_t),
            minor: libc::minor(raw as libc::dev_t),
        }
    }
    /// As a `dev_t`.
    pub fn raw(self) -> u64 {
        libc::makedev(self.major, self.minor)
    }
    fn parse(s: &str) -> Option<DevNum> {
        let (a, b) = s.split_once(':')?;
        Some(DevNum {
            major: a.parse().ok()?,
            minor: b.parse().ok()?,
        })
    }
}

impl std::fmt::Display for DevNum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mount {
    pub id: u32,
    pub parent_id: u32,
    pub dev: DevNum,
    /// Path inside the filesystem that is mounted (`/` unless a bind mount).
    pub root: String,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw,noatime`).
    pub mount_options: String,
    pub fs_type: String,
    pub source: String,
    /// Per-superblock options (`rw,errors=remount-ro`).
    pub super_options: String,
    /// Propagation tags (`shared:N`, `master:N`): a mount of peer group N in another
    /// mount namespace with `master:N` or `shared:N` goes away with ours.
    #[serde(skip)]
    pub propagation: Vec<String>,
}

impl Mount {
    /// Options to pass to mount(8) to mount it again the same way: the per-mount
    /// flags plus the filesystem's own options, without those the kernel only reports.
    pub fn remount_options(&self) -> String {
        let mut opts: Vec<&str> = self.mount_options.split(',').collect();
        for o in self.super_options.split(',') {
            // rw/ro is already in the per-mount list; seclabel is reported, not accepted.
            if o == "rw" || o == "ro" || o == "seclabel" || opts.contains(&o) {
                continue;
            }
            opts.push(o);
        }
        mountable_options(&self.fs_type, &opts.join(","))
    }

    /// "ext4 of /dev/vda", or "ext4 of /dev/vda, bind of /srv" for a bind.
    pub fn describe(&self) -> String {
        match self.root.as_str() {
            "/" => format!("{} of {}", self.fs_type, self.source),
            root => format!("{} of {}, bind of {root}", self.fs_type, self.source),
        }
    }
}

/// ext4's options that the ext4 driver shows for an ext3 or ext2 mount (it serves
/// those types) but refuses as input for them: `data=journal` shows
/// `nodioread_nolock`, and mounting again with it failed ("Mount option(s)
/// incompatible with ext3"; a trial's volume stayed unmounted and `resume` kept
/// failing). Each was tried on ext3 here; none can have been asked for there.
const EXT4_ONLY: [&str; 7] = [
    "dioread_nolock",
    "nodioread_nolock",
    "delalloc",
    "nodelalloc",
    "journal_checksum",
    "nojournal_checksum",
    "journal_async_commit",
];

/// `opts` (comma-separated, as recorded) less what a mount of `fs_type` refuses though
/// the kernel shows it.
pub fn mountable_options(fs_type: &str, opts: &str) -> String {
    if !matches!(fs_type, "ext2" | "ext3") {
        return opts.to_string();
    }
    opts.split(',')
        .filter(|o| !EXT4_ONLY.contains(o))
        .collect::<Vec<_>>()
        .join(",")
}

/// Reads and parses the calling process's mount table.
pub fn read() -> std::io::Result<Vec<Mount>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// Parses mountinfo text; lines that do not parse are skipped (the format only grows).
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Mount> {
    // 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    let (left, right) = line.split_once(" - ")?;
    let mut l = left.split(' ');
    let id = l.next()?.parse().ok()?;
    let parent_id = l.next()?.parse().ok()?;
    let dev = DevNum::parse(l.next()?)?;
    let root = unescape(l.next()?);
    let mount_point = PathBuf::from(unescape(l.next()?));
    let mount_options = l.next()?.to_string();
    let propagation = l.filter(|t| !t.is_empty()).map(str::to_string).collect();
    let mut r = right.split(' ');
    let fs_type = r.next()?.to_string();
    let source = unescape(r.next()?);
    let super_options = r.next().unwrap_or("").to_string();
    Some(Mount {
        id,
        parent_id,
        dev,
        root,
        mount_point,
        mount_options,
        fs_type,
        source,
        super_options,
        propagation,
    })
}

/// The kernel escapes space, tab, newline and backslash as `\ooo` octal.
pub use luksify_walker::space::unescape_octal as unescape;

/// The mounts of the filesystem on device `dev` (bind mounts included).
pub fn mounts_of(mounts: &[Mount], dev: DevNum) -> Vec<&Mount> {
    mounts.iter().filter(|m| m.dev == dev).collect()
}

/// The mount whose mount point is exactly `path` (the last one wins: it is on top).
pub fn mount_at<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a Mount> {
    mounts.iter().rev().find(|m| m.mount_point == path)
}

/// Mounts strictly below `path` (e.g. /mnt/data1 below /mnt), deepest first, which
/// is the order to unmount them in.
pub fn nested_below<'a>(mounts: &'a [Mount], path: &Path) -> Vec<&'a Mount> {
    let mut v: Vec<&Mount> = mounts
        .iter()
        .filter(|m| m.mount_point != path && m.mount_point.starts_with(path))
        .collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.mount_point.components().count()));
    v
}

/// Whether every mount of `dev` is at or below one of `roots`: its open files then
/// belong to what is mounted there. A device also mounted elsewhere (a bind of a
/// directory of the root disk nested in a volume) is held by every process using it
/// there, which has nothing to do with the volume.
pub fn only_below(mounts: &[Mount], dev: DevNum, roots: &[&Path]) -> bool {
    mounts
        .iter()
        .filter(|m| m.dev == dev)
        .all(|m| roots.iter().any(|r| m.mount_point.starts_with(r)))
}

/// Mounts stacked on top of one of `dev`'s mounts, at its very mount point (`mount
/// --bind X /mnt/data` or an overlay over a mounted volume), and any stacked on those:
/// `umount /mnt/data` takes the top one off, not the volume, and it hides the volume's
/// files where they were.
pub fn stacked_on(mounts: &[Mount], dev: DevNum) -> Vec<&Mount> {
    let mut below: Vec<&Mount> = mounts_of(mounts, dev);
    let mut out: Vec<&Mount> = Vec::new();
    while let Some(b) = below.pop() {
        for m in mounts {
            // A bind of one of the volume's own directories counts too (`mount --bind
            // /mnt/data/sub /mnt/data`): nothing would put it back (trial V2).
            if m.parent_id == b.id
                && m.id != b.id
                && m.mount_point == b.mount_point
                && !out.iter().any(|o| o.id == m.id)
            {
                out.push(m);
                below.push(m);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,errors=remount-ro
40 27 7:0 / /mnt rw,noatime shared:5 - ext4 /dev/loop0 rw,stripe=4
41 40 7:1 / /mnt/data1 rw,relatime - xfs /dev/loop1 rw,attr2,inode64
42 41 0:50 / /mnt/data1/with\\040space rw - tmpfs tmpfs rw
43 27 7:0 /sub /srv/bind rw,noatime - ext4 /dev/loop0 rw,stripe=4
";

    /// A bind stacked on a volume's mount point is found (and one stacked on that), a
    /// mount nested below it is not; a device mounted only below the volume is confined
    /// there, the root disk (mounted at /) is not.
    #[test]
    fn stacked_mounts_and_devices_confined_below() {
        let all = parse(
            "\
27 1 254:0 / / rw - ext4 /dev/vda rw
40 27 7:0 / /mnt rw - ext4 /dev/loop0 rw
41 40 7:1 / /mnt/in rw - xfs /dev/loop1 rw
44 40 254:0 /srv /mnt/srv rw - ext4 /dev/vda rw
50 40 254:0 /other /mnt rw - ext4 /dev/vda rw
51 50 0:60 / /mnt rw - overlay ov rw
",
        );
        let stacked: Vec<u32> = stacked_on(&all, DevNum { major: 7, minor: 0 })
            .iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(stacked, vec![50, 51]);
        // A bind of the volume's own subdirectory over its root.
        let own = parse(
            "27 1 254:0 / / rw - ext4 /dev/vda rw\n\
             40 27 7:0 / /mnt rw - ext4 /dev/loop0 rw\n\
             41 40 7:0 /sub /mnt rw - ext4 /dev/loop0 rw\n",
        );
        let ids: Vec<u32> = stacked_on(&own, DevNum { major: 7, minor: 0 })
            .iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(ids, vec![41]);
        assert!(stacked_on(&all, DevNum { major: 7, minor: 1 }).is_empty());
        let roots = [Path::new("/mnt")];
        assert!(only_below(&all, DevNum { major: 7, minor: 1 }, &roots));
        assert!(!only_below(
            &all,
            DevNum {
                major: 254,
                minor: 0
            },
            &roots
        ));
    }

    #[test]
    fn parses_fields_optional_tags_and_escapes() {
        let m = parse(SAMPLE);
        assert_eq!(m.len(), 6);
        assert_eq!(m[2].dev, DevNum { major: 7, minor: 0 });
        assert_eq!(m[2].mount_point, PathBuf::from("/mnt"));
        assert_eq!(m[2].fs_type, "ext4");
        assert_eq!(m[2].source, "/dev/loop0");
        assert_eq!(m[2].mount_options, "rw,noatime");
        assert_eq!(m[4].mount_point, PathBuf::from("/mnt/data1/with space"));
        assert_eq!(m[5].root, "/sub");
    }

    #[test]
    fn finds_all_mounts_of_a_device_and_nested_mounts_deepest_first() {
        let m = parse(SAMPLE);
        let of = mounts_of(&m, DevNum { major: 7, minor: 0 });
        let points: Vec<_> = of.iter().map(|m| m.mount_point.clone()).collect();
        assert_eq!(points, [PathBuf::from("/mnt"), PathBuf::from("/srv/bind")]);
        let nested = nested_below(&m, Path::new("/mnt"));
        let points: Vec<_> = nested.iter().map(|m| m.mount_point.clone()).collect();
        assert_eq!(
            points,
            [
                PathBuf::from("/mnt/data1/with space"),
                PathBuf::from("/mnt/data1")
            ]
        );
        // /mntx is not below /mnt.
        assert!(nested_below(
            &parse("1 1 7:3 / /mntx rw - ext4 /dev/loop3 rw\n"),
            Path::new("/mnt")
        )
        .is_empty());
    }

    #[test]
    fn remount_options_merge_superblock_options_without_duplicates() {
        let m = parse(SAMPLE);
        assert_eq!(m[3].remount_options(), "rw,relatime,attr2,inode64");
        assert_eq!(m[1].remount_options(), "rw,relatime,errors=remount-ro");
    }

    /// An ext3 in data=journal mode shows `nodioread_nolock`, which mounting it as ext3
    /// refuses: left out for ext3 and ext2, kept for ext4.
    #[test]
    fn remount_options_leave_out_what_ext3_shows_but_refuses() {
        let m = parse(
            "46 27 7:4 / /m rw,relatime - ext3 /dev/loop4 rw,nodioread_nolock,commit=9,data=journal\n\
             47 27 7:5 / /n rw,relatime - ext4 /dev/loop5 rw,nodioread_nolock,data=journal\n",
        );
        assert_eq!(m[0].remount_options(), "rw,relatime,commit=9,data=journal");
        assert_eq!(
            m[1].remount_options(),
            "rw,relatime,nodioread_nolock,data=journal"
        );
        assert_eq!(
            mountable_options("ext3", "rw,journal_async_commit,noatime"),
            "rw,noatime"
        );
    }

    #[test]
    fn reads_own_mountinfo() {
        let m = read().unwrap();
        assert!(m.iter().any(|m| m.mount_point == Path::new("/")));
    }
}
