#!/usr/bin/env python3
"""In-place copy of FILE onto itself, made durable every ZONE bytes.

    zone-copy.py FILE [REQUEST_BYTES] [ZONE_BYTES]

Reads and writes REQUEST_BYTES at a time (default 4 MiB, luksify's request size)
with O_DIRECT, one request after the other, and calls fdatasync after every
ZONE_BYTES (default 16 MiB, the default hotzone of checksum and datashift modes)
and at the end. That is what any hotzone protocol must do before its next commit,
without any hashing or encryption, nothing overlapped: scripts/bench-walker's
reference for what the flushes of those modes cost a plain copy.
Prints the seconds from opening FILE to the last fdatasync (Python's own start,
slow right after the page cache is dropped, is not counted). Exits 2 (and copies
nothing) where the filesystem refuses O_DIRECT.
"""
import mmap
import os
import sys
import time


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    path = sys.argv[1]
    req = int(sys.argv[2]) if len(sys.argv) > 2 else 4 << 20
    zone = int(sys.argv[3]) if len(sys.argv) > 3 else 16 << 20
    if req <= 0 or req % 4096 or zone % req:
        sys.exit("REQUEST_BYTES must be a positive multiple of 4096 and divide ZONE_BYTES")
    start = time.monotonic()
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError as e:
        print(f"{path}: no O_DIRECT here ({e.strerror})", file=sys.stderr)
        sys.exit(2)
    size = os.fstat(fd).st_size
    if size % 4096:
        sys.exit(f"{path}: size {size} is not a multiple of 4096")
    buf = memoryview(mmap.mmap(-1, req))  # page-aligned, as O_DIRECT needs
    off = 0
    while off < size:
        n = min(req, size - off)
        got = os.preadv(fd, [buf[:n]], off)
        if got != n:
            sys.exit(f"{path}: short read at {off}")
        if os.pwritev(fd, [buf[:n]], off) != n:
            sys.exit(f"{path}: short write at {off}")
        off += n
        if off % zone == 0 or off == size:
            os.fdatasync(fd)
    os.close(fd)
    print(f"{time.monotonic() - start:.2f}")


if __name__ == "__main__":
    main()
