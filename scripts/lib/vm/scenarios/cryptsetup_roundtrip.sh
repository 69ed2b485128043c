# Kernel dm-crypt through cryptsetup, on a LUKS2 volume the host formatted (/dev/vda).
# PHASE=write: open, mkfs.ext4 on the mapping, write a tree of files, close.
# PHASE=verify: open again (a fresh boot), mount, verify every file, close.
# Key file: /root/key.
set -eu
. /usr/lib/luksify-vm/lib.sh

step "cryptsetup open /dev/vda"
cryptsetup open --key-file /root/key /dev/vda data
dmsetup table data | awk '{print "table:", $1, $2, $3, $4}'
case "$PHASE" in
  write)
    step "mkfs.ext4 on /dev/mapper/data"
    mkfs.ext4 -q /dev/mapper/data
    mount /dev/mapper/data /mnt
    make_tree /mnt/tree 24
    ;;
  verify)
    mount -o ro /dev/mapper/data /mnt
    verify_tree /mnt/tree
    ;;
  *) echo "unknown PHASE $PHASE"; exit 2 ;;
esac
umount /mnt
cryptsetup close data
step "closed"
