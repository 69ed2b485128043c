# Shared helpers for luksify's scripts. Source it; do not run it.
# Everything a fresh Debian machine lacks is installed here, idempotently.

LUKSIFY_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# Downloads (Debian packages for the guest, pip wheels) are cached here and reused by every run,
# outside the checkout so that a fresh clone (CI) reuses them too. Non-root users get a per-user folder.
if [ -z "${LUKSIFY_CACHE:-}" ]; then
  if [ "$(id -u)" -eq 0 ]; then LUKSIFY_CACHE=/var/cache/luksify; else LUKSIFY_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/luksify"; fi
fi
export LUKSIFY_ROOT LUKSIFY_CACHE

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else die "need root for: $*"; fi
}

APT_UPDATED=0
apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  if [ "$APT_UPDATED" -eq 0 ]; then as_root apt-get update -qq; APT_UPDATED=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Python modules used as independent references in tests (AES-XTS cross-checks).
pip_install() {
  local mod="$1" pkg="$2"
  python3 -c "import $mod" 2>/dev/null && return 0
  log "installing Python package: $pkg"
  python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
  mkdir -p "$LUKSIFY_CACHE/pip"
  python3 -m pip install -q --find-links "$LUKSIFY_CACHE/pip" "$pkg" 2>/dev/null \
    || { python3 -m pip download -q -d "$LUKSIFY_CACHE/pip" "$pkg" && python3 -m pip install -q --find-links "$LUKSIFY_CACHE/pip" "$pkg"; }
}

cargo_tool() {
  local bin="$1" crate="$2"
  command -v "$bin" >/dev/null 2>&1 && return 0
  log "installing cargo tool: $crate"
  cargo install --locked -q "$crate"
}

ensure_build_deps() {
  command -v cargo >/dev/null || die "cargo not found: install Rust (rustup) first"
  apt_install ca-certificates pkg-config
}

ensure_test_deps() {
  ensure_build_deps
  # cryptsetup is the compatibility oracle; mkfs.* make real filesystems; openssl is a speed anchor.
  apt_install cryptsetup-bin e2fsprogs xfsprogs util-linux openssl qemu-utils python3 \
    busybox-static psmisc lsof
  apt_install strace   # kills cryptsetup at an exact fsync (walker_cli)
  apt_install e2fsprogs-l10n locales  # tools read in any locale: resize2fs in German (orch_cli)
  apt_install btrfs-progs  # a btrfs that reaches into --reduce-device-size is refused (walker_cli)
  apt_install systemd  # systemd-analyze verify checks dist/luksify-resume.service; nothing is started
  pip_install cryptography cryptography
  cargo_tool cargo-nextest cargo-nextest
}

build_release() {
  log "building luksify (release)"
  (cd "$LUKSIFY_ROOT" && cargo build --release --locked -q -p luksify)
  export LUKSIFY_BIN="$LUKSIFY_ROOT/target/release/luksify"
}

# True where loop devices can be attached (root, /dev/loop-control, a working losetup).
have_loop() {
  [ "$(id -u)" -eq 0 ] || return 1
  local img
  img=$(mktemp /tmp/luksify-probe.XXXXXX) || return 1
  truncate -s 1M "$img"
  local dev
  dev=$(losetup -f --show "$img" 2>/dev/null) || { rm -f "$img"; return 1; }
  losetup -d "$dev"; rm -f "$img"
  return 0
}
