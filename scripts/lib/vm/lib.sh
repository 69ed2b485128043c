# Helpers for guest scenarios: `. /usr/lib/luksify-vm/lib.sh` at the top of a scenario.
# Everything runs under busybox sh inside the guest.

# make_tree DIR COUNT: COUNT files of assorted sizes (0 B to ~1.5 MiB, some not a multiple
# of 512) with random content in nested directories, then DIR/.manifest (sha256 of each file).
make_tree() {
  dir=$1 count=$2 i=0
  mkdir -p "$dir"
  while [ "$i" -lt "$count" ]; do
    sub="$dir/d$((i % 4))/e$((i % 3))"
    mkdir -p "$sub"
    # sizes cycle through 0, odd byte counts, whole sectors and multi-MiB-ish files
    case $((i % 5)) in
      0) size=0 ;;
      1) size=$((i * 97 + 13)) ;;
      2) size=$((4096 * (i + 1))) ;;
      3) size=$((65536 * (i % 7 + 1) + 511)) ;;
      4) size=$((1048576 + i * 4099)) ;;
    esac
    head -c "$size" /dev/urandom >"$sub/f$i"
    i=$((i + 1))
  done
  (cd "$dir" && find . -type f ! -name .manifest | sort | xargs sha256sum >.manifest)
  sync
  echo "MANIFEST-SHA256=$(sha256sum <"$dir/.manifest" | cut -d' ' -f1)"
}

# verify_tree DIR: every file listed in DIR/.manifest has its recorded checksum,
# and no file is missing or extra. Prints the manifest hash so the host can compare boots.
verify_tree() {
  dir=$1
  [ -f "$dir/.manifest" ] || { echo "verify_tree: $dir/.manifest missing"; return 1; }
  (cd "$dir" && sha256sum -c -s .manifest) || { echo "verify_tree: checksum mismatch under $dir"; return 1; }
  listed=$(wc -l <"$dir/.manifest")
  present=$(cd "$dir" && find . -type f ! -name .manifest | wc -l)
  [ "$listed" -eq "$present" ] || { echo "verify_tree: $present files present, $listed listed"; return 1; }
  echo "MANIFEST-SHA256=$(sha256sum <"$dir/.manifest" | cut -d' ' -f1)"
  echo "verified $listed files under $dir"
}

# step MESSAGE: a progress line on the console (the host log shows where a run stopped).
step() { echo "--- $*"; }
