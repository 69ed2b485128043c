#!/usr/bin/env python3
"""Supervises one qemu run for scripts/vm: streams the guest's serial console to stdout,
enforces the timeout, optionally kills qemu abruptly (a simulated power cut), and turns the
guest's "LUKSIFY-VM-EXIT=<n>" line into this process's exit status.

Exit status: the scenario's own status; 124 on timeout; 125 when the guest died without
reporting one (kernel panic, init failure); 137 when qemu was killed on request before
the scenario finished.
"""
import argparse
import os
import re
import selectors
import signal
import subprocess
import sys
import time

START = b"LUKSIFY-VM-SCENARIO-START"
EXIT = re.compile(rb"LUKSIFY-VM-EXIT=(\d+)")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--timeout", type=float, required=True)
    ap.add_argument("--kill-after", type=float)
    ap.add_argument("--kill-when")
    ap.add_argument("qemu", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.qemu[1:] if a.qemu and a.qemu[0] == "--" else a.qemu

    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    kill_pattern = re.compile(a.kill_when.encode()) if a.kill_when else None
    kill_at = None          # monotonic deadline for the requested power cut
    exit_code = None
    buf = b""
    out = sys.stdout.buffer
    sel = selectors.DefaultSelector()
    fd = proc.stdout.fileno()
    sel.register(fd, selectors.EVENT_READ)

    def arm(reason: str) -> None:
        nonlocal kill_at
        if a.kill_after is not None and kill_at is None:
            kill_at = time.monotonic() + a.kill_after
            out.write(f"[vm] power cut armed: {a.kill_after:.2f} s after {reason}\n".encode())
            out.flush()

    while True:
        now = time.monotonic()
        deadlines = [t0 + a.timeout]
        if kill_at is not None:
            deadlines.append(kill_at)
        wait = max(0.0, min(deadlines) - now)
        events = sel.select(timeout=min(wait, 0.5))
        if events:
            chunk = os.read(fd, 65536)
            if chunk == b"":
                break  # qemu closed its console: it has exited
            out.write(chunk.replace(b"\r\n", b"\n"))
            out.flush()
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if kill_pattern is None and START in line:
                    arm("scenario start")
                if kill_pattern is not None and kill_pattern.search(line):
                    arm(f"the line matching {a.kill_when!r}")
                m = EXIT.search(line)
                if m:
                    exit_code = int(m.group(1))
        now = time.monotonic()
        if kill_at is not None and now >= kill_at and exit_code is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            out.write(f"\n[vm] qemu killed (power cut) {now - t0:.2f} s after start\n".encode())
            out.flush()
            return 137
        if now >= t0 + a.timeout:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            out.write(f"\n[vm] timeout: guest still running after {a.timeout:.0f} s; qemu killed\n".encode())
            out.flush()
            return 124
    rc = proc.wait()
    el = time.monotonic() - t0
    if exit_code is None:
        out.write(f"\n[vm] guest stopped without reporting an exit status (qemu exit {rc}) after {el:.1f} s\n".encode())
        out.flush()
        return 125
    out.write(f"[vm] scenario exit status {exit_code}, {el:.1f} s\n".encode())
    out.flush()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
