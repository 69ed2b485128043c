# Opens LUKS2 volumes through kernel dm-crypt both ways: `luksify open` (dm ioctls) and
# `cryptsetup open --disable-keyring` (so that its table shows the key in hex too), each
# time mounting read-only and verifying every file, then compares the two dm tables.
# DISKS=vda,vdb...: each holds a LUKS2 volume with ext4 and /.manifest; key: /root/key.
# Prints per disk TABLE-LUKSIFY= and TABLE-CRYPTSETUP= (key field replaced by <key>),
# KEY-LUKSIFY=hex|keyring (luksify may pass the key as a kernel keyring reference), and
# KEYS-EQUAL=yes|no|n/a (hex keys are compared here and never printed).
set -eu
. /usr/lib/luksify-vm/lib.sh

no_key() { awk '{ $5 = "<key>"; print }'; }

for d in $(echo "$DISKS" | tr , ' '); do
  dev=/dev/$d
  step "$dev: luksify open"
  luksify open "$dev" lx --key-file /root/key
  [ -b /dev/mapper/lx ] || { echo "luksify open made no /dev/mapper/lx"; exit 1; }
  mount -o ro /dev/mapper/lx /mnt
  verify_tree /mnt
  umount /mnt
  t_ours=$(dmsetup table --showkeys lx)
  luksify close lx
  if dmsetup info lx >/dev/null 2>&1; then echo "luksify close left the mapping"; exit 1; fi

  step "$dev: cryptsetup open"
  cryptsetup open --disable-keyring --key-file /root/key "$dev" cs
  mount -o ro /dev/mapper/cs /mnt
  verify_tree /mnt
  umount /mnt
  t_ref=$(dmsetup table --showkeys cs)
  cryptsetup close cs

  echo "TABLE-LUKSIFY=$(echo "$t_ours" | no_key)"
  echo "TABLE-CRYPTSETUP=$(echo "$t_ref" | no_key)"
  case "$(echo "$t_ours" | awk '{print $5}')" in
    :*) echo "KEY-LUKSIFY=keyring"; echo "KEYS-EQUAL=n/a" ;;
    *)
      echo "KEY-LUKSIFY=hex"
      k_ours=$(echo "$t_ours" | awk '{print $5}' | sha256sum)
      k_ref=$(echo "$t_ref" | awk '{print $5}' | sha256sum)
      if [ "$k_ours" = "$k_ref" ]; then echo "KEYS-EQUAL=yes"; else echo "KEYS-EQUAL=no"; fi ;;
  esac
done
