//! The userspace mapping, for machines without device-mapper: a FUSE filesystem
//! with one file, `volume`, whose bytes are the decrypted view of the LUKS2 data
//! segment, and a loop device attached to that file. The loop device then behaves
//! like /dev/mapper/NAME: filesystems mount on it and every block goes through
//! [`luksify_walker::view::DecryptedView`].
//!
//! The file is opened with FOPEN_DIRECT_IO so the kernel keeps no second page cache
//! of it under the loop device's own cache; every read and write reaches the daemon.

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request,
    WriteFlags,
};
use luksify_luks::io::Disk;
use luksify_walker::view::DecryptedView;
use std::ffi::OsStr;
use std::time::{Duration, SystemTime};

/// Name of the one file the FUSE filesystem exposes.
pub const VOLUME_FILE: &str = "volume";
const ROOT: INodeNo = INodeNo::ROOT;
const VOLUME: INodeNo = INodeNo(2);
const TTL: Duration = Duration::from_secs(3600);

/// The FUSE filesystem serving one decrypted view.
pub struct VolumeFs<D: Disk + Send + Sync + 'static> {
    view: DecryptedView<D>,
    uid: u32,
    gid: u32,
    started: SystemTime,
}

impl<D: Disk + Send + Sync + 'static> std::fmt::Debug for VolumeFs<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeFs")
            .field("view", &self.view)
            .finish()
    }
}

impl<D: Disk + Send + Sync + 'static> VolumeFs<D> {
    pub fn new(view: DecryptedView<D>) -> Self {
        // SAFETY: getuid/getgid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        VolumeFs {
            view,
            uid,
            gid,
            started: SystemTime::now(),
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            ROOT => (FileType::Directory, 0o700, 0, 2),
            VOLUME => (FileType::RegularFile, 0o600, self.view.len(), 1),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: self.view.sector_size() as u32,
            flags: 0,
        })
    }
}

fn errno_of(e: &std::io::Error) -> Errno {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => Errno::EINVAL,
        _ => e.raw_os_error().map(Errno::from_i32).unwrap_or(Errno::EIO),
    }
}

impl<D: Disk + Send + Sync + 'static> Filesystem for VolumeFs<D> {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (parent, name.to_str()) {
            (ROOT, Some(VOLUME_FILE)) => {
                let a = self.attr(VOLUME).expect("volume attr");
                reply.entry(&TTL, &a, fuser::Generation(0));
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino == VOLUME {
            reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
        } else {
            reply.error(Errno::EISDIR);
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != VOLUME {
            return reply.error(Errno::EISDIR);
        }
        let len = self.view.len();
        if offset >= len {
            return reply.data(&[]);
        }
        let n = (size as u64).min(len - offset) as usize;
        let mut buf = zeroize::Zeroizing::new(vec![0u8; n]);
        match self.view.read_at(offset, &mut buf) {
            Ok(()) => reply.data(&buf),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != VOLUME {
            return reply.error(Errno::EISDIR);
        }
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > self.view.len())
        {
            // The volume cannot grow, like a block device.
            return reply.error(Errno::ENOSPC);
        }
        match self.view.write_at(offset, data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.view.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (VOLUME, FileType::RegularFile, VOLUME_FILE),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn destroy(&mut self) {
        let _ = self.view.flush();
    }
}

/// fuser session configuration for a volume mount: root-only, nodev, nosuid.
pub fn fuse_config(name: &str) -> fuser::Config {
    let mut c = fuser::Config::default();
    c.mount_options = vec![
        fuser::MountOption::FSName(format!("luksify:{name}")),
        fuser::MountOption::Subtype("luksify".into()),
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoExec,
    ];
    c.n_threads = Some(2);
    c
}
