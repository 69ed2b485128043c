#!/usr/bin/env python3
"""In-place copy of FILE onto itself, made durable every ZONE bytes.

    zone-copy.py FILE [--request BYTES] [--zone BYTES] [--journal JFILE]

Reads and writes --request bytes at a time (default 4 MiB, luksify's request
size) with O_DIRECT, one request after the other, and calls fdatasync after every
--zone bytes (default 16 MiB, the default hotzone of checksum and datashift
modes) and at the end. That is what any hotzone protocol must do before its next
commit, without any hashing or encryption, nothing overlapped:
scripts/bench-walker's reference for what the flushes of those modes cost a plain
copy.

With --journal, every zone is first written to JFILE (created, two zones long,
the zones alternating between its halves as a double-buffered journal does) and
made durable there, then written in place and made durable: the same reference
for journal mode, which writes every byte twice.

Prints the seconds from opening FILE to the last fdatasync (Python's own start,
slow right after the page cache is dropped, is not counted). Exits 2 (and copies
nothing) where the filesystem refuses O_DIRECT.
"""
import argparse
import mmap
import os
import sys
import time


def open_direct(path, flags=0):
    try:
        return os.open(path, os.O_RDWR | os.O_DIRECT | flags, 0o600)
    except OSError as e:
        print(f"{path}: no O_DIRECT here ({e.strerror})", file=sys.stderr)
        sys.exit(2)


def main():
    ap = argparse.ArgumentParser(usage=__doc__.split("\n\n")[1].strip())
    ap.add_argument("file")
    ap.add_argument("--request", type=int, default=4 << 20)
    ap.add_argument("--zone", type=int, default=16 << 20)
    ap.add_argument("--journal")
    a = ap.parse_args()
    req, zone = a.request, a.zone
    if req <= 0 or req % 4096 or zone % req:
        sys.exit("--request must be a positive multiple of 4096 that divides --zone")
    start = time.monotonic()
    fd = open_direct(a.file)
    jfd = open_direct(a.journal, os.O_CREAT) if a.journal else None
    size = os.fstat(fd).st_size
    if size % 4096:
        sys.exit(f"{a.file}: size {size} is not a multiple of 4096")
    buf = memoryview(mmap.mmap(-1, zone))  # page-aligned, as O_DIRECT needs

    def requests(io, fd, name, at, n):
        """Moves buf[:n] to or from fd at `at` with io (preadv or pwritev), req at a time."""
        for off in range(0, n, req):
            m = min(req, n - off)
            if io(fd, [buf[off:off + m]], at + off) != m:
                sys.exit(f"{name}: short {io.__name__} at {at + off}")

    for base in range(0, size, zone):
        n = min(zone, size - base)
        requests(os.preadv, fd, a.file, base, n)
        if jfd is not None:
            requests(os.pwritev, jfd, a.journal, (base // zone % 2) * zone, n)
            os.fdatasync(jfd)
        requests(os.pwritev, fd, a.file, base, n)
        os.fdatasync(fd)
    os.close(fd)
    if jfd is not None:
        os.close(jfd)
    print(f"{time.monotonic() - start:.2f}")


if __name__ == "__main__":
    main()
