//! Kernel dm-crypt through device-mapper ioctls on /dev/mapper/control
//! (struct dm_ioctl of linux/dm-ioctl.h, interface version 4), loading the same
//! table cryptsetup loads for a LUKS2 volume:
//! `0 <sectors> crypt aes-xts-plain64 :64:logon:cryptsetup:<uuid>-d0 <iv_tweak> <maj:min> <offset_sectors> [1 sector_size:4096]`.
//! The key goes through the kernel keyring (a `logon` key, unreadable from
//! userspace, revoked once the table is loaded); where the keyring is unavailable
//! the hex key travels in the ioctl buffer (never in argv), which is wiped after.

use crate::error::{Failure, Result};
use crate::exit;
use crate::probe;
use luksify_luks::luks2::DataSegment;
use luksify_luks::VolumeKey;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use zeroize::Zeroizing;

const CONTROL: &str = "/dev/mapper/control";
const DM_NAME_LEN: usize = 128;
const DM_UUID_LEN: usize = 129;
/// sizeof(struct dm_ioctl).
const DM_IOCTL_SIZE: usize = 312;
/// sizeof(struct dm_target_spec).
const DM_SPEC_SIZE: usize = 40;

const DM_VERSION_CMD: u32 = 0;
const DM_DEV_CREATE_CMD: u32 = 3;
const DM_DEV_REMOVE_CMD: u32 = 4;
const DM_DEV_SUSPEND_CMD: u32 = 6;
const DM_TABLE_LOAD_CMD: u32 = 9;

/// Tells the kernel to wipe its copies of the ioctl buffer (it carries a key).
const DM_SECURE_DATA_FLAG: u32 = 1 << 15;

/// `_IOWR(0xfd, nr, struct dm_ioctl)`.
fn ioctl_nr(cmd: u32) -> libc::c_ulong {
    ((3u32 << 30) | ((DM_IOCTL_SIZE as u32) << 16) | (0xfd << 8) | cmd) as libc::c_ulong
}

/// Whether device-mapper answers here; Err says why not.
pub fn available() -> std::result::Result<(), String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(CONTROL)
        .map_err(|e| format!("device-mapper is not available (opening {CONTROL}: {e})"))?;
    let mut buf = header(DM_IOCTL_SIZE, "", "", 0);
    dm_ioctl(&f, DM_VERSION_CMD, &mut buf)
        .map_err(|e| format!("device-mapper does not answer ({e})"))
}

fn control() -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(CONTROL)
        .map_err(|e| {
            Failure::new(
                exit::UNSUPPORTED,
                format!(
                    "kernel dm-crypt is not available here (opening {CONTROL}: {e}); use the userspace mapping (--userspace) or load dm-mod/dm-crypt"
                ),
            )
        })
}

/// A zeroed dm_ioctl buffer of `total` bytes with the header filled in.
fn header(total: usize, name: &str, uuid: &str, flags: u32) -> Zeroizing<Vec<u8>> {
    let mut b = Zeroizing::new(vec![0u8; total]);
    let put32 = |b: &mut [u8], o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_ne_bytes());
    put32(&mut b, 0, 4); // version 4.0.0
    put32(&mut b, 12, total as u32); // data_size
    put32(&mut b, 16, DM_IOCTL_SIZE as u32); // data_start
    put32(&mut b, 28, flags);
    let n = name.as_bytes();
    b[48..48 + n.len().min(DM_NAME_LEN - 1)].copy_from_slice(&n[..n.len().min(DM_NAME_LEN - 1)]);
    let u = uuid.as_bytes();
    let uo = 48 + DM_NAME_LEN;
    b[uo..uo + u.len().min(DM_UUID_LEN - 1)].copy_from_slice(&u[..u.len().min(DM_UUID_LEN - 1)]);
    b
}

fn dm_ioctl(ctl: &File, cmd: u32, buf: &mut [u8]) -> std::io::Result<()> {
    // SAFETY: buf is at least DM_IOCTL_SIZE bytes and its data_size field matches its
    // length, so the kernel reads and writes only inside it.
    let rc = unsafe { libc::ioctl(ctl.as_raw_fd(), ioctl_nr(cmd) as _, buf.as_mut_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Parameters of the `crypt` target as cryptsetup writes them (after `0 <sectors> crypt`).
pub fn crypt_params(
    cipher: &str,
    key: &str,
    iv_tweak: u64,
    dev: &str,
    offset_sectors: u64,
    sector_size: u32,
) -> String {
    use std::fmt::Write;
    // Sized up front so that the string holding the (possibly hex) key never grows:
    // a reallocation would leave an unzeroized copy of the key in the freed buffer.
    let mut t = String::with_capacity(cipher.len() + key.len() + dev.len() + 96);
    let _ = write!(t, "{cipher} {key} {iv_tweak} {dev} {offset_sectors}");
    if sector_size != 512 {
        let _ = write!(t, " 1 sector_size:{sector_size}");
    }
    t
}

/// Adds the volume key as a `logon` key to the thread keyring; returns its id.
fn add_logon_key(desc: &str, key: &[u8]) -> Option<i64> {
    let ty = CString::new("logon").ok()?;
    let d = CString::new(desc).ok()?;
    // SAFETY: add_key reads the two NUL-terminated strings and `key.len()` bytes of key.
    let id = unsafe {
        libc::syscall(
            libc::SYS_add_key,
            ty.as_ptr(),
            d.as_ptr(),
            key.as_ptr(),
            key.len(),
            -1i32, // KEY_SPEC_THREAD_KEYRING
        )
    };
    (id > 0).then_some(id)
}

fn revoke_key(id: i64) {
    // SAFETY: KEYCTL_REVOKE (3) takes a key serial and no pointers.
    unsafe { libc::syscall(libc::SYS_keyctl, 3, id) };
}

/// Creates /dev/mapper/NAME as dm-crypt over `device` for `seg`, keyed with `vk`.
pub fn create_crypt(
    name: &str,
    device: &Path,
    luks_uuid: &str,
    seg: &DataSegment,
    vk: &VolumeKey,
) -> Result<()> {
    let ctl = control()?;
    let dev = probe::block_dev_num(device).ok_or_else(|| {
        Failure::failed(format!(
            "{} is not a block device; dm-crypt needs one (attach a loop device: losetup -f --show {})",
            device.display(),
            device.display()
        ))
    })?;
    let dev_size = probe::device_size(device)
        .map_err(|e| Failure::failed(format!("cannot size {} ({e})", device.display())))?;
    let len = seg.len_on(dev_size);
    let sectors = len / 512;
    let dm_uuid = format!("CRYPT-LUKS2-{}-{name}", luks_uuid.replace('-', ""));
    let desc = format!("cryptsetup:{luks_uuid}-d{}", seg.id);
    let key_id = add_logon_key(&desc, vk.as_bytes());
    let key_str: Zeroizing<String> = Zeroizing::new(match key_id {
        Some(_) => format!(":{}:logon:{desc}", vk.len()),
        None => hex_key(vk.as_bytes()),
    });
    let params = Zeroizing::new(crypt_params(
        &seg.cipher,
        &key_str,
        seg.iv_tweak,
        &dev.to_string(),
        seg.offset / 512,
        seg.sector_size,
    ));

    let mut create = header(DM_IOCTL_SIZE, name, &dm_uuid, 0);
    dm_ioctl(&ctl, DM_DEV_CREATE_CMD, &mut create).map_err(|e| {
        if let Some(id) = key_id {
            revoke_key(id);
        }
        Failure::failed(format!(
            "device-mapper refused to create {name} ({e}); is the name taken (dmsetup ls)?"
        ))
    })?;

    // dm_ioctl, then one dm_target_spec and its NUL-terminated parameters, 8-aligned.
    let spec_len = (DM_SPEC_SIZE + params.len() + 1).div_ceil(8) * 8;
    let mut load = header(DM_IOCTL_SIZE + spec_len, name, "", DM_SECURE_DATA_FLAG);
    load[20..24].copy_from_slice(&1u32.to_ne_bytes()); // target_count
    let s = DM_IOCTL_SIZE;
    load[s..s + 8].copy_from_slice(&0u64.to_ne_bytes());
    load[s + 8..s + 16].copy_from_slice(&sectors.to_ne_bytes());
    load[s + 24..s + 24 + 5].copy_from_slice(b"crypt");
    load[s + DM_SPEC_SIZE..s + DM_SPEC_SIZE + params.len()].copy_from_slice(params.as_bytes());
    let loaded = dm_ioctl(&ctl, DM_TABLE_LOAD_CMD, &mut load);
    if let Some(id) = key_id {
        revoke_key(id);
    }
    if let Err(e) = loaded {
        let _ = remove_with(&ctl, name);
        return Err(Failure::failed(format!(
            "dm-crypt refused the table for {name} over {} ({e}); is dm-crypt loaded (modprobe dm-crypt) with xts and aes?",
            device.display()
        )));
    }
    let mut resume = header(DM_IOCTL_SIZE, name, "", 0);
    if let Err(e) = dm_ioctl(&ctl, DM_DEV_SUSPEND_CMD, &mut resume) {
        let _ = remove_with(&ctl, name);
        return Err(Failure::failed(format!("cannot activate {name} ({e})")));
    }
    ensure_node(name, &resume);
    Ok(())
}

/// Without udev (an initramfs, a container) nobody creates /dev/mapper/NAME: do it.
fn ensure_node(name: &str, reply: &[u8]) {
    let path = Path::new("/dev/mapper").join(name);
    for _ in 0..50 {
        if path.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let dev = u64::from_ne_bytes(reply[40..48].try_into().expect("8 bytes"));
    if let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) {
        // SAFETY: c is a valid path; mknod creates a block node for the dm device number.
        unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, dev as libc::dev_t) };
    }
}

fn hex_key(k: &[u8]) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

fn remove_with(ctl: &File, name: &str) -> std::io::Result<()> {
    let mut b = header(DM_IOCTL_SIZE, name, "", 0);
    dm_ioctl(ctl, DM_DEV_REMOVE_CMD, &mut b)
}

/// Removes /dev/mapper/NAME.
pub fn remove(name: &str) -> Result<()> {
    let ctl = control()?;
    remove_with(&ctl, name).map_err(|e| {
        let why = if e.raw_os_error() == Some(libc::EBUSY) {
            "it is still open or mounted".to_string()
        } else {
            e.to_string()
        };
        Failure::failed(format!(
            "cannot remove /dev/mapper/{name}: {why}; unmount it first"
        ))
    })?;
    let node = Path::new("/dev/mapper").join(name);
    if node.exists() {
        let _ = std::fs::remove_file(node);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        // From linux/dm-ioctl.h on x86_64: DM_VERSION = 0xc138fd00, DM_TABLE_LOAD = 0xc138fd09.
        assert_eq!(ioctl_nr(DM_VERSION_CMD), 0xc138_fd00);
        assert_eq!(ioctl_nr(DM_TABLE_LOAD_CMD), 0xc138_fd09);
        assert_eq!(ioctl_nr(DM_DEV_SUSPEND_CMD), 0xc138_fd06);
    }

    #[test]
    fn table_matches_cryptsetup_format() {
        let t = crypt_params(
            "aes-xts-plain64",
            ":64:logon:cryptsetup:u-d0",
            0,
            "7:3",
            32768,
            4096,
        );
        assert_eq!(
            t,
            "aes-xts-plain64 :64:logon:cryptsetup:u-d0 0 7:3 32768 1 sector_size:4096"
        );
        let t = crypt_params("aes-xts-plain64", "k", 5, "8:0", 4096, 512);
        assert_eq!(t, "aes-xts-plain64 k 5 8:0 4096");
    }

    #[test]
    fn header_layout() {
        let b = header(DM_IOCTL_SIZE, "data", "CRYPT-x", DM_SECURE_DATA_FLAG);
        assert_eq!(&b[0..4], &4u32.to_ne_bytes());
        // data_size @12, data_start @16, target_count @20, open_count @24, flags @28.
        assert_eq!(&b[16..20], &(DM_IOCTL_SIZE as u32).to_ne_bytes());
        assert_eq!(&b[28..32], &DM_SECURE_DATA_FLAG.to_ne_bytes());
        assert_eq!(&b[12..16], &(DM_IOCTL_SIZE as u32).to_ne_bytes());
        assert_eq!(&b[48..52], b"data");
        assert_eq!(&b[176..183], b"CRYPT-x");
    }

    #[test]
    fn host_without_dm_says_why() {
        // On hosts with device-mapper this is Ok; without it the message names the cause.
        if let Err(e) = available() {
            assert!(e.contains("/dev/mapper/control"), "{e}");
        }
    }
}
