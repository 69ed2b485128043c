# Power cut during `luksify enable`, then the next boot's `luksify resume` (what
# luksify-resume.service runs). /dev/vda: ext4 with the host's tree and /.manifest, filling
# the disk; /dev/vdb: ext4 "system disk" bind-mounted over /etc and /var/lib/luksify so
# that fstab, crypttab and luksify's status file survive reboots (and cuts) as on a real
# root disk. Passphrase file: /root/key.
#
# PHASE=enable: put /dev/vda in fstab at /mnt/data, mount, verify, print ENCRYPT-START,
#   `luksify enable`, print ENCRYPT-DONE and ENCRYPT-SECONDS= (the host may cut in between).
# PHASE=resume: `luksify resume`, then report STATE= from what is on /dev/vda:
#   plain (the cut came before anything was written: enable again) or luks; require
#   /mnt/data mounted from a dm-crypt mapping, a finished LUKS2 header, every file verified.
set -eu
. /usr/lib/luksify-vm/lib.sh

mkdir -p /persist /mnt/data /var/lib/luksify
mount /dev/vdb /persist
if [ ! -d /persist/etc ]; then
  mkdir -p /persist/etc /persist/state
  cp -a /etc/. /persist/etc/
  sync
fi
mount --bind /persist/etc /etc
mount --bind /persist/state /var/lib/luksify

enable() {
  luksify enable --volume-type data --volume /mnt/data --key-file /root/key \
    --pbkdf pbkdf2 --pbkdf-force-iterations 1000
}

uptime_cs() { cut -d' ' -f1 /proc/uptime | tr -d .; }

case "$PHASE" in
  enable)
    grep -q ' /mnt/data ' /etc/fstab || echo "/dev/vda /mnt/data ext4 defaults 0 2" >>/etc/fstab
    sync
    mount /mnt/data
    verify_tree /mnt/data
    t0=$(uptime_cs)
    echo "ENCRYPT-START /dev/vda"
    enable
    t1=$(uptime_cs)
    echo "ENCRYPT-DONE /dev/vda"
    printf "ENCRYPT-SECONDS=%d.%02d\n" $(( (t1 - t0) / 100 )) $(( (t1 - t0) % 100 ))
    ;;
  resume)
    step "luksify resume"
    luksify resume
    if cryptsetup isLuks /dev/vda; then
      echo "STATE=luks"
    else
      step "the cut came before the header was written; enabling again"
      echo "STATE=plain"
      mount /mnt/data
      enable
    fi
    src=$(findmnt -n -o SOURCE /mnt/data || true)
    echo "MOUNTED-FROM=$src"
    case "$src" in /dev/mapper/*) ;; *) echo "/mnt/data is not mounted from a dm-crypt mapping"; exit 1 ;; esac
    if cryptsetup luksDump /dev/vda | grep -q 'online-reencrypt'; then
      echo "/dev/vda: still marked as in reencryption"
      exit 1
    fi
    verify_tree /mnt/data
    luksify status
    umount /mnt/data
    ;;
  *) echo "unknown PHASE $PHASE"; exit 2 ;;
esac
umount /var/lib/luksify /etc
umount /persist
