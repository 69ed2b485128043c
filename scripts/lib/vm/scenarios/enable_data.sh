# `luksify enable` on a mounted data volume, then a reboot that opens it the way the
# machine's boot would: from the crypttab and fstab entries enable wrote.
# /dev/vda: ext4 with the host's tree and /.manifest (filling the disk; enable must make room
# for the header); /dev/vdb: an empty ext4 "system disk" that keeps /etc across boots (the
# guest's own /etc is a fresh tmpfs each boot). Passphrase file: /root/key.
#
# PHASE=enable: mount /dev/vda on /mnt/data through an fstab entry, verify the files,
#   `luksify enable --volume-type data --volume /mnt/data --key-file /root/key`, check that
#   /mnt/data is now mounted from a /dev/mapper device and every file verifies, save
#   /etc/crypttab and /etc/fstab to the system disk.
# PHASE=reboot: restore /etc from the system disk, open each crypttab entry with cryptsetup
#   (what systemd-cryptsetup does at boot), mount /mnt/data through fstab, verify; then
#   close and reopen with `luksify open`, verify again.
set -eu
. /usr/lib/luksify-vm/lib.sh
mkdir -p /persist /mnt/data
mount /dev/vdb /persist

case "$PHASE" in
  enable)
    echo "/dev/vda /mnt/data ext4 defaults 0 2" >>/etc/fstab
    mount /mnt/data
    verify_tree /mnt/data
    step "luksify enable"
    luksify enable --volume-type data --volume /mnt/data --key-file /root/key \
      --pbkdf pbkdf2 --pbkdf-force-iterations 1000
    src=$(findmnt -n -o SOURCE /mnt/data || true)
    echo "MOUNTED-FROM=$src"
    case "$src" in /dev/mapper/* | /dev/dm-*) ;; *) echo "/mnt/data is not on a dm-crypt mapping"; exit 1 ;; esac
    dmsetup table "${src#/dev/mapper/}" | awk '{print "TARGET=" $3 " " $4}'
    verify_tree /mnt/data
    # enable shrinks the filesystem to make room for the header, then grows it back.
    blocks=$(dumpe2fs -h "$src" 2>/dev/null | awk -F: '/^Block count/ {print $2+0}')
    bsize=$(dumpe2fs -h "$src" 2>/dev/null | awk -F: '/^Block size/ {print $2+0}')
    echo "FS-BYTES=$((blocks * bsize))"
    echo "MAPPING-BYTES=$(blockdev --getsize64 "$src")"
    step "crypttab and fstab as enable wrote them"
    cat /etc/crypttab /etc/fstab
    luksify status || true
    cp /etc/crypttab /etc/fstab /persist/
    umount /mnt/data
    ;;
  reboot)
    cp /persist/crypttab /persist/fstab /etc/
    grep -v '^[[:space:]]*#' /etc/crypttab | while read -r name dev keyfile _opts; do
      [ -n "$name" ] || continue
      case "$dev" in UUID=* | LABEL=* | PARTUUID=*) dev=$(blkid -t "$dev" -o device | head -n 1) ;; esac
      step "crypttab: cryptsetup open $dev $name"
      cryptsetup open --key-file "$keyfile" "$dev" "$name"
      echo "OPENED=$name"
    done
    mount /mnt/data
    echo "MOUNTED-FROM=$(findmnt -n -o SOURCE /mnt/data)"
    verify_tree /mnt/data
    umount /mnt/data
    name=$(grep -v '^[[:space:]]*#' /etc/crypttab | awk 'NF { print $1; exit }')
    cryptsetup close "$name"
    step "luksify open"
    luksify open /dev/vda "$name" --key-file /root/key
    mount /mnt/data
    verify_tree /mnt/data
    umount /mnt/data
    luksify close "$name"
    ;;
  *) echo "unknown PHASE $PHASE"; exit 2 ;;
esac
umount /persist
