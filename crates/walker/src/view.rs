//! A decrypted view of one LUKS2 data segment, byte-addressed: what dm-crypt would
//! show as /dev/mapper/NAME, served from userspace (the FUSE mapping path).
//!
//! Requests at any offset and length are widened to whole encryption sectors; a
//! partial-sector write reads, decrypts, merges, re-encrypts and writes the sector
//! (read-modify-write) under a lock so that two writers to one sector cannot lose
//! each other's bytes. The IV of each sector is its byte offset in the segment / 512
//! plus `iv_tweak`, as dm-crypt computes it for LUKS2.

use luksify_cipher::SectorCipher;
use luksify_luks::io::Disk;
use std::io;
use std::sync::Mutex;
use zeroize::Zeroizing;

/// Largest piece handled at once, to bound memory for big requests.
const PIECE: u64 = 1 << 20;

/// Plaintext view of the encrypted segment starting at `data_offset` on `disk`.
pub struct DecryptedView<D: Disk> {
    disk: D,
    data_offset: u64,
    len: u64,
    iv_tweak: u64,
    cipher: SectorCipher,
    write_lock: Mutex<()>,
}

impl<D: Disk> std::fmt::Debug for DecryptedView<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecryptedView")
            .field("data_offset", &self.data_offset)
            .field("len", &self.len)
            .field("iv_tweak", &self.iv_tweak)
            .field("cipher", &self.cipher)
            .finish_non_exhaustive()
    }
}

impl<D: Disk> DecryptedView<D> {
    /// `len` is the segment size in bytes; `None` means "to the end of the disk"
    /// (LUKS2's `dynamic`), rounded down to whole sectors.
    pub fn new(
        disk: D,
        data_offset: u64,
        len: Option<u64>,
        iv_tweak: u64,
        cipher: SectorCipher,
    ) -> io::Result<Self> {
        let ss = cipher.sector_size() as u64;
        if !data_offset.is_multiple_of(512) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("data offset {data_offset} is not a multiple of 512"),
            ));
        }
        let len = match len {
            Some(l) => l,
            None => disk.size()?.checked_sub(data_offset).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("the disk is smaller than the data offset {data_offset}"),
                )
            })?,
        } / ss
            * ss;
        Ok(DecryptedView {
            disk,
            data_offset,
            len,
            iv_tweak,
            cipher,
            write_lock: Mutex::new(()),
        })
    }

    /// Size of the plaintext in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn sector_size(&self) -> u64 {
        self.cipher.sector_size() as u64
    }
    pub fn disk(&self) -> &D {
        &self.disk
    }

    fn check_range(&self, off: u64, n: usize) -> io::Result<()> {
        match off.checked_add(n as u64) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "range {off}+{n} is past the end of the {}-byte view",
                    self.len
                ),
            )),
        }
    }

    fn iv(&self, seg_off: u64) -> u64 {
        seg_off / 512 + self.iv_tweak
    }

    /// Reads and decrypts whole sectors `[start, start + buf.len())` of the segment.
    fn read_sectors(&self, start: u64, buf: &mut [u8]) -> io::Result<()> {
        self.disk.read_at(self.data_offset + start, buf)?;
        self.cipher
            .decrypt(buf, self.iv(start))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
    }

    /// Encrypts (in place, so `buf` is ciphertext afterwards) and writes whole sectors.
    fn write_sectors(&self, start: u64, buf: &mut [u8]) -> io::Result<()> {
        self.cipher
            .encrypt(buf, self.iv(start))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        self.disk.write_at(self.data_offset + start, buf)
    }

    /// Reads plaintext at any byte offset.
    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(off, buf.len())?;
        let ss = self.sector_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let start = pos / ss * ss;
            let want = (buf.len() - done) as u64;
            let end = ((pos + want).min(start + PIECE)).div_ceil(ss) * ss;
            let mut tmp = Zeroizing::new(vec![0u8; (end - start) as usize]);
            self.read_sectors(start, &mut tmp)?;
            let skip = (pos - start) as usize;
            let n = (tmp.len() - skip).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&tmp[skip..skip + n]);
            done += n;
        }
        Ok(())
    }

    /// Writes plaintext at any byte offset; partial sectors are read-modify-written.
    pub fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        self.check_range(off, buf.len())?;
        let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        let ss = self.sector_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let start = pos / ss * ss;
            let want = (buf.len() - done) as u64;
            let end = ((pos + want).min(start + PIECE)).div_ceil(ss) * ss;
            let mut tmp = Zeroizing::new(vec![0u8; (end - start) as usize]);
            let skip = (pos - start) as usize;
            let n = (tmp.len() - skip).min(buf.len() - done);
            let head_partial = skip != 0;
            let tail_partial = !((skip + n) as u64).is_multiple_of(ss);
            if head_partial {
                self.read_sectors(start, &mut tmp[..ss as usize])?;
            }
            if tail_partial {
                let last = tmp.len() - ss as usize;
                if !(head_partial && last == 0) {
                    self.read_sectors(start + last as u64, &mut tmp[last..])?;
                }
            }
            tmp[skip..skip + n].copy_from_slice(&buf[done..done + n]);
            self.write_sectors(start, &mut tmp)?;
            done += n;
        }
        Ok(())
    }

    /// Makes completed writes durable.
    pub fn flush(&self) -> io::Result<()> {
        self.disk.flush()
    }
}

impl<D: Disk> Disk for DecryptedView<D> {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        DecryptedView::read_at(self, off, buf)
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        DecryptedView::write_at(self, off, buf)
    }
    fn flush(&self) -> io::Result<()> {
        DecryptedView::flush(self)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.len)
    }
    fn write_unit(&self) -> u64 {
        self.disk.write_unit()
    }
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        self.disk.raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use luksify_luks::io::MemDisk;

    fn key() -> Vec<u8> {
        (0..64u8)
            .map(|i| i.wrapping_mul(7).wrapping_add(1))
            .collect()
    }

    fn view(ss: usize, offset: u64, tweak: u64) -> (MemDisk, DecryptedView<MemDisk>) {
        let disk = MemDisk::new(offset as usize + 64 * 1024);
        let c = SectorCipher::new("aes-xts-plain64", &key(), ss).unwrap();
        let v = DecryptedView::new(disk.clone(), offset, None, tweak, c).unwrap();
        (disk, v)
    }

    /// Reference: encrypt a whole plaintext image the way dm-crypt lays it out.
    fn encrypt_image(plain: &[u8], ss: usize, tweak: u64) -> Vec<u8> {
        let c = SectorCipher::new("aes-xts-plain64", &key(), ss).unwrap();
        let mut out = plain.to_vec();
        for (i, s) in out.chunks_mut(ss).enumerate() {
            c.encrypt(s, (i * ss / 512) as u64 + tweak).unwrap();
        }
        out
    }

    #[test]
    fn unaligned_writes_match_a_whole_image_encryption() {
        for ss in [512usize, 4096] {
            let (disk, v) = view(ss, 8192, 3);
            let mut plain = vec![0u8; v.len() as usize];
            // A zeroed disk decrypts to noise: write a known plaintext first.
            v.write_at(0, &plain).unwrap();
            let mut x = 0x1234_5678u32;
            for _ in 0..200 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let off = (x as u64) % v.len();
                let n = ((x >> 7) as usize % 9000).min((v.len() - off) as usize);
                let data: Vec<u8> = (0..n).map(|i| (i as u32 ^ x) as u8).collect();
                v.write_at(off, &data).unwrap();
                plain[off as usize..off as usize + n].copy_from_slice(&data);
            }
            let mut back = vec![0u8; plain.len()];
            v.read_at(0, &mut back).unwrap();
            assert_eq!(back, plain, "ss {ss}");
            let on_disk = disk.to_vec();
            assert_eq!(
                &on_disk[8192..],
                &encrypt_image(&plain, ss, 3)[..],
                "ss {ss}"
            );
            assert!(
                on_disk[..8192].iter().all(|&b| b == 0),
                "nothing written before the data offset"
            );
            // Unaligned read inside one sector and across several.
            let mut small = [0u8; 5];
            v.read_at(4093, &mut small).unwrap();
            assert_eq!(&small, &plain[4093..4098]);
        }
    }

    #[test]
    fn refuses_ranges_past_the_end() {
        let (_d, v) = view(4096, 4096, 0);
        let mut b = [0u8; 2];
        assert_eq!(
            v.read_at(v.len() - 1, &mut b).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert!(v.write_at(v.len(), &[1]).is_err());
    }
}
