#!/usr/bin/env python3
"""Storage-profile benchmark: in-place encryption under emulated cloud disks.

Runs `dd` (the physical limit of an in-place pass), `cryptsetup reencrypt --encrypt`
and `luksify encrypt` in each resilience mode on a fresh copy of one ext4 image, on a
loop device whose I/O is throttled with cgroup blkio (v1) or io.max (v2), and writes
every measurement to a JSON file that report.py turns into docs/BENCHMARKS.md and a plot.

How the throttle is applied (measured on this machine, see docs/BENCHMARKS.md):
the loop device is attached with --direct-io=on and the limits are set on the *backing
disk* (the block device holding the image file), in a cgroup that each measured command
joins before exec. The loop worker charges its O_DIRECT I/O on the backing file to the
cgroup of the bio that caused it, so direct, buffered-read and fsync'd buffered-write
I/O are all throttled, and the IOPS limit sees merged requests (as a real disk does),
not the 4 KiB page bios that a limit on the loop device itself would count.

Only the Python standard library is used.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, asdict, field
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
MB = 1_000_000  # throttle rates are SI megabytes per second, as cloud providers quote them

# A benchmark passphrase, not a secret: it protects throwaway images only.
PASSPHRASE = b"luksify-bench-passphrase"
PBKDF_ARGS = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
SHIFT = 32 * MiB  # --reduce-device-size for datashift; the ext4 image leaves it unused
MODES = ["datashift", "checksum", "journal", "none"]


@dataclass
class Profile:
    key: str
    label: str
    backing: str  # "disk" (image on the root filesystem's block device) or "tmpfs"
    mbps: int | None  # read and write limit each, MB/s; None = unthrottled
    iops: int | None

    @property
    def throttled(self) -> bool:
        return self.mbps is not None


PROFILES = [
    Profile("hdd", "Standard HDD (60 MB/s, 500 IOPS)", "disk", 60, 500),
    Profile("ssd", "Standard SSD (120 MB/s, 2000 IOPS)", "disk", 120, 2000),
    Profile("premium", "Premium SSD (200 MB/s, 5000 IOPS)", "disk", 200, 5000),
    Profile("disk", "Unthrottled local disk", "disk", None, None),
    Profile("tmpfs", "Unthrottled tmpfs (/dev/shm)", "tmpfs", None, None),
]


def log(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


def sh(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, text=True, capture_output=True, **kw)


# ---------------------------------------------------------------------------------------
# cgroups


class Cgroup:
    """A throwaway cgroup with per-device read/write bps and IOPS limits.

    v2 (`io.max`, `io.stat`) where the unified hierarchy offers the io controller, else
    v1 (`blkio.throttle.*`). Counters are read back from the same cgroup so that each run
    can prove its I/O really went through the throttle.
    """

    def __init__(self, name: str):
        self.version, root = self.detect()
        if self.version == 0:
            raise RuntimeError(root)
        self.path = Path(root) / name
        if self.version == 2:
            ctl = Path(root) / "cgroup.subtree_control"
            if "io" not in ctl.read_text().split():
                ctl.write_text("+io")
        self.path.mkdir(exist_ok=True)
        self.rules: set[str] = set()

    @staticmethod
    def detect() -> tuple[int, str]:
        """Returns (2, root) for cgroup v2 with io, (1, root) for v1 blkio, else (0, why)."""
        v2_root = None
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if parts[2] == "cgroup2":
                    v2_root = parts[1]
        if v2_root and "io" in Path(v2_root, "cgroup.controllers").read_text().split():
            return 2, v2_root
        v1 = Path("/sys/fs/cgroup/blkio")
        if (v1 / "blkio.throttle.read_bps_device").exists():
            return 1, str(v1)
        return 0, "neither cgroup v2 io.max nor cgroup v1 blkio throttling is available"

    @property
    def procs(self) -> str:
        return str(self.path / "cgroup.procs")

    def limit(self, dev: str, bps: int, iops: int) -> None:
        self.rules.add(dev)
        if self.version == 2:
            (self.path / "io.max").write_text(f"{dev} rbps={bps} wbps={bps} riops={iops} wiops={iops}")
        else:
            for f, v in (("read_bps", bps), ("write_bps", bps), ("read_iops", iops), ("write_iops", iops)):
                (self.path / f"blkio.throttle.{f}_device").write_text(f"{dev} {v}")

    def unlimit(self, dev: str) -> None:
        if self.version == 2:
            (self.path / "io.max").write_text(f"{dev} rbps=max wbps=max riops=max wiops=max")
        else:
            for f in ("read_bps", "write_bps", "read_iops", "write_iops"):
                (self.path / f"blkio.throttle.{f}_device").write_text(f"{dev} 0")
        self.rules.discard(dev)

    def counters(self, dev: str) -> dict[str, int]:
        """Bytes and I/O counts this cgroup issued to `dev`."""
        out = {"rbytes": 0, "wbytes": 0, "rios": 0, "wios": 0}
        if self.version == 2:
            for line in (self.path / "io.stat").read_text().splitlines():
                parts = line.split()
                if parts and parts[0] == dev:
                    for kv in parts[1:]:
                        k, _, v = kv.partition("=")
                        if k in out:
                            out[k] = int(v)
            return out
        for fname, (rk, wk) in (("io_service_bytes", ("rbytes", "wbytes")), ("io_serviced", ("rios", "wios"))):
            for line in (self.path / f"blkio.throttle.{fname}").read_text().splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[0] == dev:
                    if parts[1] == "Read":
                        out[rk] = int(parts[2])
                    elif parts[1] == "Write":
                        out[wk] = int(parts[2])
        return out

    def remove(self) -> None:
        for dev in list(self.rules):
            try:
                self.unlimit(dev)
            except OSError:
                pass
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def whole_disk_of(path: Path) -> tuple[str | None, str]:
    """MAJ:MIN of the whole block device holding `path` (limits are per whole disk)."""
    st = os.stat(path)
    majmin = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    sysdir = Path("/sys/dev/block") / majmin
    if not sysdir.exists():
        return None, f"{path} is not on a block device (st_dev {majmin}); throttled profiles need one"
    real = sysdir.resolve()
    if (real / "partition").exists():
        real = real.parent
    dev = (real / "dev").read_text().strip()
    return dev, real.name


# ---------------------------------------------------------------------------------------
# images and loop devices


def make_base_image(path: Path, size: int, fill: float) -> None:
    """An ext4 filesystem (size - SHIFT, so datashift has its free tail) full of random files."""
    if path.exists() and path.stat().st_size == size and Path(str(path) + ".ok").exists():
        return
    log(f"making base image {path} ({size // MiB} MiB, ext4, {int(fill * 100)}% random files)")
    with tempfile.TemporaryDirectory(prefix="luksify-bench-data.", dir="/dev/shm") as d:
        left = int((size - SHIFT) * fill)
        i = 0
        while left > 0:
            n = min(8 * MiB, left)
            sub = Path(d) / f"dir{i // 16}"
            sub.mkdir(exist_ok=True)
            (sub / f"file{i}.bin").write_bytes(os.urandom(n))
            left -= n
            i += 1
        path.unlink(missing_ok=True)
        with open(path, "wb") as f:
            f.truncate(size)
        sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "benchdata", "-d", d, str(path), str((size - SHIFT) // 4096))
    Path(str(path) + ".ok").write_text("ok\n")


def fresh_copy(base: Path, dst: Path) -> None:
    """Fully allocated copy, flushed and dropped from the page cache, so the measured run
    neither pays for the copy's writeback nor reads it from RAM."""
    dst.unlink(missing_ok=True)
    with open(base, "rb") as src, open(dst, "wb") as out:
        while True:
            buf = src.read(16 * MiB)
            if not buf:
                break
            out.write(buf)
        out.flush()
        os.fsync(out.fileno())
        os.posix_fadvise(out.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(src.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


class Loop:
    def __init__(self, image: Path):
        self.dev = sh("losetup", "-f", "--show", "--direct-io=on", str(image)).stdout.strip()
        self.name = os.path.basename(self.dev)

    def stat(self) -> dict[str, int]:
        f = Path(f"/sys/block/{self.name}/stat").read_text().split()
        return {"rios": int(f[0]), "rbytes": int(f[2]) * 512, "wios": int(f[4]), "wbytes": int(f[6]) * 512}

    def detach(self) -> None:
        for _ in range(20):
            if sh("losetup", "-d", self.dev, check=False).returncode == 0:
                return
            time.sleep(0.2)


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


# ---------------------------------------------------------------------------------------
# measured runs


@dataclass
class Run:
    profile: str
    tool: str  # dd, cryptsetup, luksify
    mode: str  # inplace (dd), datashift, checksum, journal, none
    size: int
    ok: bool = False
    error: str = ""
    wall_s: float = 0.0
    rss_kib: int = 0
    dev_io: dict = field(default_factory=dict)  # loop device counters (device I/O only)
    cg_io: dict = field(default_factory=dict)  # backing-disk counters charged to the cgroup
    sector_size: int = 0
    note: str = ""


def run_measured(cmd: list[str], cg: Cgroup | None, timeout: float, logf: Path) -> tuple[int, float, int, str]:
    """Runs `cmd` inside the cgroup under /usr/bin/time; returns (rc, wall, peak RSS KiB, stderr tail)."""
    tf = logf.with_suffix(".time")
    if cg is not None:
        # The shell moves itself into the cgroup, then becomes the command (same pid).
        inner = ["sh", "-c", 'echo $$ > "$1"; shift; exec "$@"', "sh", cg.procs, *cmd]
    else:
        inner = cmd
    full = ["/usr/bin/time", "-f", "%M", "-o", str(tf), *inner]
    with open(logf, "w") as lf:
        t0 = time.monotonic()
        p = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = -9
        except BaseException:
            # Ctrl-C: the command runs in its own session and would not see it; stop it first.
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            raise
        wall = time.monotonic() - t0
    rss = 0
    try:
        for line in tf.read_text().splitlines():
            if line.strip().isdigit():
                rss = int(line.strip())
    except OSError:
        pass
    tail = ""
    lines = [l for l in logf.read_text(errors="replace").splitlines() if l.strip() and not l.startswith("Command exited")]
    if lines:
        tail = lines[-1][:300]
    if rc == -9:
        tail = f"killed after {timeout:.0f} s timeout; {tail}"
    return rc, wall, rss, tail


def luks_check(dev: str, header: Path | None, keyfile: Path) -> tuple[bool, int, str]:
    """Is the result a complete LUKS2 volume that opens with the passphrase? Returns (ok, sector size, why)."""
    hdr = ["--header", str(header)] if header else []
    d = sh("cryptsetup", "luksDump", *hdr, dev, check=False)
    if d.returncode != 0:
        return False, 0, "cryptsetup luksDump failed: " + d.stderr.strip()[:200]
    sector = 0
    for line in d.stdout.splitlines():
        line = line.strip()
        if line.startswith("sector:"):
            sector = int(line.split()[1])
    if "online-reencrypt" in d.stdout:
        return False, sector, "reencryption still marked in progress (online-reencrypt requirement)"
    t = sh("cryptsetup", "open", "--test-passphrase", *hdr, "--key-file", str(keyfile), dev, check=False)
    if t.returncode != 0:
        return False, sector, "passphrase does not open the result: " + t.stderr.strip()[:200]
    return True, sector, ""


def verify_plaintext(dev: str, header: Path | None, keyfile: Path, base: Path, workdir: Path, datashift: bool) -> str:
    """Decrypts sampled 1 MiB ranges of the result with its volume key (Python `cryptography`,
    an implementation independent of both tools) and compares them with the original image.
    Returns "" when every sample matches, else what differs."""
    try:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    except ImportError:
        return "python3 cryptography missing: content not verified"
    hdr = ["--header", str(header)] if header else []
    vk = workdir / "volume.key"
    try:
        d = sh("cryptsetup", "luksDump", "-q", "--dump-volume-key", "--volume-key-file", str(vk), "--key-file", str(keyfile), *hdr, dev, check=False)
        if d.returncode != 0:
            return "cannot dump the volume key: " + d.stderr.strip()[:200]
        key = vk.read_bytes()
        dump = sh("cryptsetup", "luksDump", *hdr, dev).stdout
    finally:
        vk.unlink(missing_ok=True)
    offset = sector = None
    for line in dump.split("Data segments:")[1].splitlines():
        line = line.strip()
        if line.startswith("offset:") and offset is None:
            offset = int(line.split()[1])
        if line.startswith("sector:") and sector is None:
            sector = int(line.split()[1])
    if offset is None or sector is None:
        return "cannot read the data segment from luksDump"
    # Plaintext byte p sits at offset + p (datashift moved everything by the header size).
    plain_len = base.stat().st_size - SHIFT
    samples = [0, MiB, plain_len // 2, plain_len - MiB]
    if datashift:
        samples += [offset - MiB, offset]  # the first 16 MiB travelled to the end and back
    with open(base, "rb") as b, open(dev, "rb") as c:
        for p in sorted(set(x for x in samples if 0 <= x <= plain_len - MiB)):
            b.seek(p)
            want = b.read(MiB)
            c.seek(offset + p)
            enc = c.read(MiB)
            got = bytearray()
            for i in range(0, MiB, sector):
                iv = ((p + i) // 512).to_bytes(16, "little")
                dec = Cipher(algorithms.AES(key), modes.XTS(iv)).decryptor()
                got += dec.update(enc[i : i + sector]) + dec.finalize()
            if bytes(got) != want:
                return f"decrypted plaintext differs from the original at {p // MiB} MiB"
    return ""


class Bench:
    def __init__(self, args):
        self.args = args
        self.size = args.size_mib * MiB
        self.disk_dir = Path(args.workdir)
        self.disk_dir.mkdir(parents=True, exist_ok=True)
        self.shm_dir = Path(tempfile.mkdtemp(prefix="luksify-bench.", dir="/dev/shm"))
        self.keyfile = self.disk_dir / "passphrase"
        self.keyfile.write_bytes(PASSPHRASE)
        self.logdir = Path(args.out).parent / "logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.luksify = args.luksify or None
        self.luksify_help = ""
        if self.luksify:
            self.luksify_help = sh(self.luksify, "encrypt", "--help", check=False).stdout
        self.cg: Cgroup | None = None
        self.cg_error = ""
        try:
            self.cg = Cgroup(f"luksify-bench-{os.getpid()}")
        except (RuntimeError, OSError) as e:
            self.cg_error = str(e)
        self.disk_dev, self.disk_name = whole_disk_of(self.disk_dir)
        self.runs: list[Run] = []
        self.calib: dict[str, dict] = {}
        self.device_probe: dict[str, dict] = {}
        self.skipped: list[str] = []

    def cleanup(self) -> None:
        if self.cg:
            self.cg.remove()
        shutil.rmtree(self.shm_dir, ignore_errors=True)

    # -- commands per tool and mode ---------------------------------------------------------

    def cryptsetup_cmd(self, mode: str, dev: str, header: Path) -> list[str]:
        base = ["cryptsetup", "reencrypt", "--encrypt", "--type", "luks2", "-q", *PBKDF_ARGS, "--key-file", str(self.keyfile)]
        if mode == "datashift":
            return [*base, "--reduce-device-size", "32M", dev]
        return [*base, "--header", str(header), "--resilience", mode, dev]

    def luksify_cmd(self, mode: str, dev: str, header: Path) -> list[str]:
        cmd = [self.luksify, "encrypt", dev, "--key-file", str(self.keyfile)]
        # Same KDF cost as cryptsetup where luksify offers the knob, so the KDF does not dominate.
        if "--pbkdf-force-iterations" in self.luksify_help:
            cmd += ["--pbkdf-force-iterations", "1000"]
            if "--pbkdf " in self.luksify_help or "--pbkdf <" in self.luksify_help:
                cmd += ["--pbkdf", "pbkdf2"]
        for flag in ("--batch", "--yes"):
            if flag in self.luksify_help:
                cmd.append(flag)
                break
        if mode == "datashift":
            return [*cmd, "--reduce-device-size", "32M"]
        return [*cmd, "--header", str(header), "--resilience", mode]

    # -- one measured run ------------------------------------------------------------------

    def one(self, prof: Profile, tool: str, mode: str, base: Path, workdir: Path, dd_block_mib: int = 16) -> Run:
        """One measured run on a fresh copy. For dd, `mode` names the variant and `dd_block_mib`
        its transfer size (variants other than 16 MiB copy 256 MiB only: they characterise the throttle)."""
        r = Run(prof.key, tool, mode, self.size)
        img = workdir / "run.img"
        header = workdir / "run.hdr"
        header.unlink(missing_ok=True)
        fresh_copy(base, img)
        loop = Loop(img)
        try:
            if prof.throttled and self.cg:
                self.cg.limit(self.disk_dev, prof.mbps * MB, prof.iops)
            if tool == "dd":
                cmd = ["dd", f"if={loop.dev}", f"of={loop.dev}", f"bs={dd_block_mib}M", "iflag=direct", "oflag=direct", "conv=notrunc", "status=none"]
                if dd_block_mib != 16:
                    r.size = min(self.size, 256 * MiB)
                    cmd.append(f"count={r.size // (dd_block_mib * MiB)}")
            elif tool == "cryptsetup":
                cmd = self.cryptsetup_cmd(mode, loop.dev, header)
            else:
                cmd = self.luksify_cmd(mode, loop.dev, header)
            # Generous timeout: 6x the time the nominal throttle needs for 3 passes, plus a minute.
            rate = (prof.mbps or 2000) * MB
            timeout = 60 + 6 * 3 * self.size / rate
            dev0 = loop.stat()
            cg0 = self.cg.counters(self.disk_dev) if (self.cg and self.disk_dev and prof.backing == "disk") else None
            logf = self.logdir / f"{prof.key}-{tool}-{mode}.log"
            rc, r.wall_s, r.rss_kib, tail = run_measured(cmd, self.cg, timeout, logf)
            r.dev_io = delta(loop.stat(), dev0)
            if cg0 is not None:
                r.cg_io = delta(self.cg.counters(self.disk_dev), cg0)
            if rc != 0:
                r.error = f"exit {rc}: {tail}"
            elif tool == "dd":
                r.ok = True
            else:
                hdr = None if mode == "datashift" else header
                r.ok, r.sector_size, r.error = luks_check(loop.dev, hdr, self.keyfile)
                if r.ok:
                    r.error = verify_plaintext(loop.dev, hdr, self.keyfile, base, workdir, mode == "datashift")
                    r.ok = r.error == ""
        finally:
            if prof.throttled and self.cg:
                self.cg.unlimit(self.disk_dev)
            loop.detach()
            img.unlink(missing_ok=True)
            header.unlink(missing_ok=True)
        status = "ok" if r.ok else f"FAILED ({r.error})"
        log(f"  {prof.key:8} {tool:10} {mode:9} {r.wall_s:7.2f} s  rss {r.rss_kib // 1024:5} MiB  {status}")
        return r

    def calibrate(self, prof: Profile, base: Path, workdir: Path) -> dict:
        """Sustained read and write rate of the emulated device with 16 MiB O_DIRECT transfers:
        the rates the I/O lower bound divides by."""
        img = workdir / "run.img"
        fresh_copy(base, img)
        loop = Loop(img)
        res = {"nominal_bps": prof.mbps * MB if prof.mbps else None, "iops": prof.iops}
        try:
            if prof.throttled and self.cg:
                self.cg.limit(self.disk_dev, prof.mbps * MB, prof.iops)
            nbytes = self.size if not prof.throttled else min(self.size, int(2.5 * prof.mbps * MB) // (16 * MiB) * 16 * MiB)
            count = max(1, nbytes // (16 * MiB))
            for direction, cmd in (
                ("read", ["dd", f"if={loop.dev}", "of=/dev/null", "bs=16M", f"count={count}", "iflag=direct", "status=none"]),
                ("write", ["dd", "if=/dev/zero", f"of={loop.dev}", "bs=16M", f"count={count}", "oflag=direct", "status=none"]),
            ):
                logf = self.logdir / f"{prof.key}-calibrate-{direction}.log"
                rc, wall, _, tail = run_measured(cmd, self.cg, 120, logf)
                if rc != 0:
                    raise RuntimeError(f"calibration {direction} failed: {tail}")
                res[f"{direction}_bps"] = count * 16 * MiB / wall
        finally:
            if prof.throttled and self.cg:
                self.cg.unlimit(self.disk_dev)
            loop.detach()
            img.unlink(missing_ok=True)
        log(f"  {prof.key:8} calibrated: read {res['read_bps'] / MB:.1f} MB/s, write {res['write_bps'] / MB:.1f} MB/s")
        return res

    def probe_device(self, prof: Profile, base: Path, workdir: Path) -> dict:
        """`luksify bench device` inside the same throttle: its projection is compared with the runs."""
        img = workdir / "run.img"
        fresh_copy(base, img)
        loop = Loop(img)
        try:
            if prof.throttled and self.cg:
                self.cg.limit(self.disk_dev, prof.mbps * MB, prof.iops)
            logf = self.logdir / f"{prof.key}-bench-device.log"
            rc, wall, _, tail = run_measured([self.luksify, "bench", "device", loop.dev, "--json"], self.cg, 120, logf)
            if rc != 0:
                return {"error": tail}
            text = logf.read_text()
            start = text.find("{")
            return json.loads(text[start:]) if start >= 0 else {"error": "no JSON in output"}
        except (json.JSONDecodeError, OSError) as e:
            return {"error": str(e)}
        finally:
            if prof.throttled and self.cg:
                self.cg.unlimit(self.disk_dev)
            loop.detach()
            img.unlink(missing_ok=True)

    # -- the whole plan -------------------------------------------------------------------

    def main(self) -> None:
        profiles = [p for p in PROFILES if p.key in self.args.profiles]
        modes = [m for m in MODES if m in self.args.modes]
        base_disk = self.disk_dir / f"base-{self.size // MiB}M.img"
        make_base_image(base_disk, self.size, 0.6)
        base_shm = None
        tools = ["cryptsetup"] + (["luksify"] if self.luksify else [])
        if not self.luksify:
            self.skipped.append(f"luksify rows: {self.args.luksify_missing}")
        for prof in profiles:
            if prof.throttled and (self.cg is None or self.disk_dev is None):
                self.skipped.append(f"{prof.label}: {self.cg_error or self.disk_name}")
                log(f"SKIPPING {prof.label}: {self.cg_error or self.disk_name}")
                continue
            log(f"profile {prof.label}")
            if prof.backing == "tmpfs":
                if base_shm is None:
                    base_shm = self.shm_dir / "base.img"
                    shutil.copyfile(base_disk, base_shm)
                base, workdir = base_shm, self.shm_dir
            else:
                base, workdir = base_disk, self.disk_dir
            self.calib[prof.key] = self.calibrate(prof, base, workdir)
            if self.luksify and "device" in sh(self.luksify, "bench", "--help", check=False).stdout:
                self.device_probe[prof.key] = self.probe_device(prof, base, workdir)
            self.runs.append(self.one(prof, "dd", "inplace", base, workdir))
            if self.args.dd_variants and prof.throttled and not any(r.mode.startswith("inplace-") for r in self.runs):
                # How the throttle treats a strictly serial copy as its transfer size changes.
                for mib in (1, 64):
                    self.runs.append(self.one(prof, "dd", f"inplace-{mib}M", base, workdir, dd_block_mib=mib))
            for mode in modes:
                for tool in tools:
                    self.runs.append(self.one(prof, tool, mode, base, workdir))
            self.save()

    def save(self) -> None:
        uname = os.uname()
        doc = {
            "generated_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "quick": self.args.quick,
            "image_bytes": self.size,
            "shift_bytes": SHIFT,
            "host": {
                "kernel": uname.release,
                "cpus": os.cpu_count(),
                "cryptsetup": sh("cryptsetup", "--version", check=False).stdout.strip(),
                "luksify": sh(self.luksify, "--version", check=False).stdout.strip() if self.luksify else None,
                "disk": self.disk_name,
                "disk_dev": self.disk_dev,
            },
            "cgroup": {"version": self.cg.version if self.cg else 0, "error": self.cg_error},
            "profiles": [asdict(p) for p in PROFILES if p.key in self.args.profiles],
            "modes": [m for m in MODES if m in self.args.modes],
            "calibration": self.calib,
            "device_probe": self.device_probe,
            "skipped": self.skipped,
            "runs": [asdict(r) for r in self.runs],
        }
        tmp = Path(self.args.out + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(self.args.out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size-mib", type=int, required=True)
    ap.add_argument("--profiles", type=lambda s: s.split(","), required=True)
    ap.add_argument("--modes", type=lambda s: s.split(","), required=True)
    ap.add_argument("--workdir", required=True, help="scratch directory on the disk to emulate")
    ap.add_argument("--out", required=True, help="results JSON")
    ap.add_argument("--luksify", default="", help="luksify binary with `encrypt`; empty = luksify rows missing")
    ap.add_argument("--dd-variants", action="store_true", help="also time dd in place with 1 MiB and 64 MiB transfers")
    ap.add_argument("--luksify-missing", default="luksify encrypt is not built yet")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("error: the benchmark needs root (loop devices, cgroups); run it as root", file=sys.stderr)
        return 1
    b = Bench(args)
    try:
        b.main()
    finally:
        b.save()
        b.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
