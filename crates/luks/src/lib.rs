//! LUKS2 and LUKS1 on-disk formats and keyslots. Knows nothing of devices,
//! mounts or processes: all I/O goes through the [`io::Disk`] trait.
