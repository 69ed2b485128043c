# Header placement on a disk with a real I/O topology (qemu virtio-blk properties the
# host sets: 512-byte logical and 4096-byte physical sectors, 64 KiB minimum and 192 KiB
# optimal I/O, a RAID-like stripe). /dev/vda is formatted in turn by `luksify format`
# and `cryptsetup luksFormat` with each option set in CASES (name:options, options
# comma-separated, cases joined by +), and every result is printed as
#   FORMAT-<case>-<tool>=<data offset>/<sector size>/<keyslots area>
# from cryptsetup's luksDump (LUKS1: payload offset/-/-). The luksify-formatted LUKS2
# volume of the first case is then opened through kernel dm-crypt (cryptsetup open),
# and its table printed as TABLE=. Key: /root/key.
set -eu
. /usr/lib/luksify-vm/lib.sh

q=/sys/block/vda/queue
echo "TOPOLOGY=$(cat $q/logical_block_size)/$(cat $q/physical_block_size)/$(cat $q/minimum_io_size)/$(cat $q/optimal_io_size)"
kdf="--pbkdf pbkdf2 --pbkdf-force-iterations 1000"

field() { # field NAME: the first "NAME value" line of luksDump's output on stdin
  awk -v n="$1" '$1 == n { print $2; exit }'
}

for c in $(echo "$CASES" | tr + ' '); do
  name=${c%%:*}
  opts=$(echo "${c#*:}" | tr , ' ')
  for tool in luksify cryptsetup; do
    wipefs -aq /dev/vda
    dd if=/dev/zero of=/dev/vda bs=1M count=20 status=none
    step "$name: $tool $opts"
    if [ "$tool" = luksify ]; then
      luksify format /dev/vda --key-file /root/key $kdf $opts >/dev/null
    else
      cryptsetup luksFormat -q /dev/vda --key-file /root/key $kdf $opts
    fi
    dump=$(cryptsetup luksDump /dev/vda)
    if echo "$dump" | grep -q '^Version:[[:space:]]*1'; then
      r="$(echo "$dump" | awk '/^Payload offset:/ { print $3 }')/-/-"
    else
      r="$(echo "$dump" | field offset:)/$(echo "$dump" | field sector:)/$(echo "$dump" | awk '/^Keyslots area:/ { print $3 }')"
    fi
    echo "FORMAT-$name-$tool=$r"
  done
done

first=${CASES%%+*}
opts=$(echo "${first#*:}" | tr , ' ')
wipefs -aq /dev/vda
luksify format /dev/vda --key-file /root/key $kdf $opts >/dev/null
step "cryptsetup open of luksify's volume"
cryptsetup open --key-file /root/key /dev/vda data
echo "TABLE=$(dmsetup table data | awk '{ $5 = "<key>"; print }')"
dd if=/dev/urandom of=/dev/mapper/data bs=1M count=4 conv=fsync status=none
cryptsetup close data
step "done"
