# Power-cut scenario: in-place encryption (header in front, the last 32 MiB of the disk
# unused) of ext4 disks the host made with a /.manifest, and recovery after a cut.
# Passphrase file: /root/key.
#
# ENCRYPTOR=luksify     `luksify encrypt --reduce-device-size 32M` / `luksify resume`
# ENCRYPTOR=cryptsetup  `cryptsetup reencrypt --encrypt --reduce-device-size 32M` /
#                       `cryptsetup repair` + `reencrypt --resume-only` (the reference)
# STEPS=step:disk,...   run in order, e.g. "resume:vdb,encrypt:vdc":
#   encrypt:DISK  prints "ENCRYPT-START /dev/DISK", encrypts, prints "ENCRYPT-DONE /dev/DISK"
#                 and ENCRYPT-SECONDS=; the host may cut power in between
#   resume:DISK   looks at what a cut left with cryptsetup (the independent peer) and prints
#                 STATE=plain|in-progress|done, finishes the encryption with ENCRYPTOR, then
#                 opens the volume with cryptsetup (kernel dm-crypt), runs e2fsck -fn,
#                 mounts it read-only and verifies every file against /.manifest
set -eu
. /usr/lib/luksify-vm/lib.sh

encrypt() {
  case "$ENCRYPTOR" in
    luksify)
      luksify encrypt "$1" --key-file /root/key --reduce-device-size 32M \
        --pbkdf pbkdf2 --pbkdf-force-iterations 1000 ;;
    cryptsetup)
      cryptsetup reencrypt -q --encrypt --type luks2 --reduce-device-size 32M \
        --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file /root/key "$1" ;;
    *) echo "unknown ENCRYPTOR $ENCRYPTOR"; exit 2 ;;
  esac
}

resume() {
  case "$ENCRYPTOR" in
    luksify) luksify resume "$1" --key-file /root/key ;;
    cryptsetup)
      # A cut (not a clean interruption) leaves the hotzone to be recovered first.
      # Recovering the last hotzone may finish the whole run.
      cryptsetup repair -q --key-file /root/key "$1"
      if in_reencryption "$1"; then
        cryptsetup reencrypt -q --resume-only --key-file /root/key "$1"
      fi ;;
  esac
}

in_reencryption() { cryptsetup luksDump "$1" | grep -q 'online-reencrypt'; }

uptime_cs() { cut -d' ' -f1 /proc/uptime | tr -d .; }

do_encrypt() {
  t0=$(uptime_cs)
  echo "ENCRYPT-START $1"
  encrypt "$1"
  t1=$(uptime_cs)
  echo "ENCRYPT-DONE $1"
  printf "ENCRYPT-SECONDS=%d.%02d\n" $(( (t1 - t0) / 100 )) $(( (t1 - t0) % 100 ))
}

do_resume() {
  if ! cryptsetup isLuks "$1"; then
    step "$1: cut before the LUKS2 header was written; still plain, encrypting again"
    echo "STATE=plain"
    encrypt "$1"
  elif in_reencryption "$1"; then
    step "$1: cut during encryption; resuming with $ENCRYPTOR"
    echo "STATE=in-progress"
    resume "$1"
  else
    echo "STATE=done"
  fi
  if in_reencryption "$1"; then
    echo "$1: still marked as in reencryption after $ENCRYPTOR finished"
    exit 1
  fi
  cryptsetup open --key-file /root/key "$1" data
  e2fsck -fn /dev/mapper/data >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; echo "e2fsck found errors"; exit 1; }
  mount -o ro /dev/mapper/data /mnt
  verify_tree /mnt
  umount /mnt
  cryptsetup close data
}

for s in $(echo "$STEPS" | tr , ' '); do
  case "${s%%:*}" in
    encrypt) do_encrypt "/dev/${s#*:}" ;;
    resume) do_resume "/dev/${s#*:}" ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
