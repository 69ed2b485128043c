//! Minimal superblock readers (ext2/3/4, xfs, btrfs, swap): how many bytes of the
//! device a filesystem or swap area claims, and the smallest I/O it issues. Used to
//! refuse a data shift that would cut into it, and an encryption sector larger than
//! its blocks.

use luksify_luks::io::Disk;
use std::io;

/// A filesystem found at the start of a device and the bytes it spans.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsExtent {
    pub kind: FsKind,
    /// Bytes from the device start that the filesystem may use.
    pub size: u64,
    /// The smallest I/O it issues, blkid's `BLOCK_SIZE`: the block size (ext), the
    /// sector size (xfs). An encryption sector larger than this breaks it.
    pub block_size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsKind {
    Ext,
    Xfs,
    Btrfs,
    /// A Linux swap area (mkswap, version 1).
    Swap,
}

impl FsKind {
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Ext => "ext2/3/4",
            FsKind::Xfs => "xfs",
            FsKind::Btrfs => "btrfs",
            FsKind::Swap => "swap",
        }
    }

    /// "the ext2/3/4 filesystem", "the swap area".
    pub fn noun(self) -> String {
        match self {
            FsKind::Swap => "the swap area".into(),
            k => format!("the {} filesystem", k.name()),
        }
    }
}

/// btrfs's primary superblock, and where in it the magic, the sector size and this
/// device's `dev_item.total_bytes` (the bytes of the device it may use) are.
const BTRFS_SB_OFFSET: u64 = 64 << 10;
const BTRFS_MAGIC: &[u8; 8] = b"_BHRfS_M";
const BTRFS_MAGIC_AT: usize = 0x40;
const BTRFS_SECTORSIZE_AT: usize = 0x90;
const BTRFS_DEV_TOTAL_BYTES_AT: usize = 0xc9 + 8;

/// A version-1 swap header ends its first page with this; the page size is the
/// kernel's that ran mkswap (4 KiB on x86, up to 64 KiB elsewhere).
const SWAP_MAGIC: &[u8; 10] = b"SWAPSPACE2";
const SWAP_LAST_PAGE_AT: usize = 1028;

const EXT_SB_OFFSET: u64 = 1024;
const EXT_MAGIC: u16 = 0xEF53;
const EXT_INCOMPAT_64BIT: u32 = 0x80;

/// The UUID of the ext2/3/4 or xfs filesystem whose first 4 KiB are `head`, as blkid
/// spells it (lower-case, hyphenated); `None` for anything else.
pub fn uuid_in(head: &[u8]) -> Option<String> {
    let raw: &[u8] = if head.get(0..4) == Some(b"XFSB") {
        head.get(32..48)?
    } else if head.get(1024 + 0x38..1024 + 0x3a) == Some(&EXT_MAGIC.to_le_bytes()[..]) {
        head.get(1024 + 0x68..1024 + 0x78)?
    } else {
        return None;
    };
    let h: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    Some(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// What [`probe`] finds on `disk` from byte `offset` on: a run's data segment that
/// starts there (`--offset`) held the filesystem there, not at byte 0.
pub fn probe_at<D: Disk + ?Sized>(disk: &D, offset: u64) -> io::Result<Option<FsExtent>> {
    struct At<'a, D: ?Sized>(&'a D, u64);
    impl<D: Disk + ?Sized> Disk for At<'_, D> {
        fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
            self.0.read_at(off + self.1, buf)
        }
        fn write_at(&self, _: u64, _: &[u8]) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::PermissionDenied))
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        fn size(&self) -> io::Result<u64> {
            Ok(self.0.size()?.saturating_sub(self.1))
        }
    }
    probe(&At(disk, offset))
}

/// Reads the ext2/3/4 or xfs superblock at the start of `disk`, if there is one.
pub fn probe<D: Disk + ?Sized>(disk: &D) -> io::Result<Option<FsExtent>> {
    let mut sb = vec![0u8; 4096];
    if disk.size()? < 4096 {
        return Ok(None);
    }
    disk.read_at(0, &mut sb)?;
    if &sb[0..4] == b"XFSB" {
        let block = u32::from_be_bytes(sb[4..8].try_into().expect("4 bytes")) as u64;
        let dblocks = u64::from_be_bytes(sb[8..16].try_into().expect("8 bytes"));
        let sectsize = u16::from_be_bytes([sb[102], sb[103]]) as u64;
        return Ok(Some(FsExtent {
            kind: FsKind::Xfs,
            size: dblocks.saturating_mul(block),
            block_size: sectsize,
        }));
    }
    let e = &sb[EXT_SB_OFFSET as usize..EXT_SB_OFFSET as usize + 1024];
    let le32 = |o: usize| u32::from_le_bytes(e[o..o + 4].try_into().expect("4 bytes"));
    if u16::from_le_bytes([e[0x38], e[0x39]]) == EXT_MAGIC {
        let log = le32(0x18);
        if log > 6 {
            return Ok(None);
        }
        let block = 1024u64 << log;
        let mut blocks = le32(0x04) as u64;
        if le32(0x60) & EXT_INCOMPAT_64BIT != 0 {
            blocks |= (le32(0x150) as u64) << 32;
        }
        return Ok(Some(FsExtent {
            kind: FsKind::Ext,
            size: blocks.saturating_mul(block),
            block_size: block,
        }));
    }
    if let Some(f) = swap(disk, &sb)? {
        return Ok(Some(f));
    }
    btrfs(disk)
}

/// A version-1 swap area: `last_page + 1` pages (little-endian, as x86 writes it). The
/// largest page size's first page is read once (the first 4 KiB are already in).
fn swap<D: Disk + ?Sized>(disk: &D, first: &[u8]) -> io::Result<Option<FsExtent>> {
    let big = (disk.size()?.min(64 << 10) as usize).max(first.len());
    let mut buf = Vec::new();
    let head: &[u8] = if big > first.len() {
        buf.resize(big, 0);
        disk.read_at(0, &mut buf)?;
        &buf
    } else {
        first
    };
    for page in [4096usize, 8192, 16384, 65536] {
        if page > head.len() {
            break;
        }
        if &head[page - SWAP_MAGIC.len()..page] == SWAP_MAGIC {
            let last = u32::from_le_bytes(
                head[SWAP_LAST_PAGE_AT..SWAP_LAST_PAGE_AT + 4]
                    .try_into()
                    .expect("4 bytes"),
            ) as u64;
            return Ok(Some(FsExtent {
                kind: FsKind::Swap,
                size: (last + 1).saturating_mul(page as u64),
                block_size: page as u64,
            }));
        }
    }
    Ok(None)
}

/// btrfs: this device's `dev_item.total_bytes` in the primary superblock.
fn btrfs<D: Disk + ?Sized>(disk: &D) -> io::Result<Option<FsExtent>> {
    if disk.size()? < BTRFS_SB_OFFSET + 4096 {
        return Ok(None);
    }
    let mut sb = vec![0u8; 4096];
    disk.read_at(BTRFS_SB_OFFSET, &mut sb)?;
    if &sb[BTRFS_MAGIC_AT..BTRFS_MAGIC_AT + 8] != BTRFS_MAGIC {
        return Ok(None);
    }
    let le = |o: usize, n: usize| {
        sb[o..o + n]
            .iter()
            .rev()
            .fold(0u64, |a, b| (a << 8) | *b as u64)
    };
    Ok(Some(FsExtent {
        kind: FsKind::Btrfs,
        size: le(BTRFS_DEV_TOTAL_BYTES_AT, 8),
        block_size: le(BTRFS_SECTORSIZE_AT, 4),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use luksify_luks::io::MemDisk;

    #[test]
    fn ext4_blocks_count_with_64bit_high_word() {
        let mut v = vec![0u8; 8192];
        let sb = &mut v[1024..2048];
        sb[0x38..0x3a].copy_from_slice(&EXT_MAGIC.to_le_bytes());
        sb[0x18..0x1c].copy_from_slice(&2u32.to_le_bytes()); // 4 KiB blocks
        sb[0x04..0x08].copy_from_slice(&1000u32.to_le_bytes());
        sb[0x60..0x64].copy_from_slice(&EXT_INCOMPAT_64BIT.to_le_bytes());
        sb[0x150..0x154].copy_from_slice(&1u32.to_le_bytes());
        let got = probe(&MemDisk::from_vec(v)).unwrap().unwrap();
        assert_eq!(got.kind, FsKind::Ext);
        assert_eq!(got.size, ((1u64 << 32) + 1000) * 4096);
        assert_eq!(got.block_size, 4096);
    }

    #[test]
    fn xfs_dblocks_times_blocksize() {
        let mut v = vec![0u8; 8192];
        v[0..4].copy_from_slice(b"XFSB");
        v[4..8].copy_from_slice(&4096u32.to_be_bytes());
        v[8..16].copy_from_slice(&12345u64.to_be_bytes());
        v[102..104].copy_from_slice(&512u16.to_be_bytes());
        let got = probe(&MemDisk::from_vec(v)).unwrap().unwrap();
        assert_eq!(
            got,
            FsExtent {
                kind: FsKind::Xfs,
                size: 12345 * 4096,
                block_size: 512,
            }
        );
    }

    #[test]
    fn swap_spans_last_page_plus_one_pages() {
        let mut v = vec![0u8; 8192];
        v[4096 - 10..4096].copy_from_slice(SWAP_MAGIC);
        v[1024..1028].copy_from_slice(&1u32.to_le_bytes());
        v[1028..1032].copy_from_slice(&99u32.to_le_bytes());
        let got = probe(&MemDisk::from_vec(v)).unwrap().unwrap();
        assert_eq!(
            got,
            FsExtent {
                kind: FsKind::Swap,
                size: 100 * 4096,
                block_size: 4096,
            }
        );
        // Made with 64 KiB pages (an arm64 or ppc64 kernel's mkswap).
        let mut v = vec![0u8; 128 << 10];
        v[(64 << 10) - 10..64 << 10].copy_from_slice(SWAP_MAGIC);
        v[1028..1032].copy_from_slice(&9u32.to_le_bytes());
        let got = probe(&MemDisk::from_vec(v)).unwrap().unwrap();
        assert_eq!((got.kind, got.size), (FsKind::Swap, 10 * (64 << 10)));
    }

    #[test]
    fn btrfs_dev_item_total_bytes() {
        let mut v = vec![0u8; 128 << 10];
        let sb = &mut v[64 << 10..(64 << 10) + 4096];
        sb[BTRFS_MAGIC_AT..BTRFS_MAGIC_AT + 8].copy_from_slice(BTRFS_MAGIC);
        sb[BTRFS_SECTORSIZE_AT..BTRFS_SECTORSIZE_AT + 4].copy_from_slice(&4096u32.to_le_bytes());
        sb[BTRFS_DEV_TOTAL_BYTES_AT..BTRFS_DEV_TOTAL_BYTES_AT + 8]
            .copy_from_slice(&(300u64 << 20).to_le_bytes());
        let got = probe(&MemDisk::from_vec(v)).unwrap().unwrap();
        assert_eq!(
            got,
            FsExtent {
                kind: FsKind::Btrfs,
                size: 300 << 20,
                block_size: 4096,
            }
        );
    }

    #[test]
    fn random_bytes_are_no_filesystem() {
        assert_eq!(probe(&MemDisk::new(8192)).unwrap(), None);
    }
}
