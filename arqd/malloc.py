"""Large buffers go back to the operating system when freed (the daemon's process only).

glibc serves an allocation above its mmap threshold (128 KiB) from a private mapping, unmapped
on free; but the first such free raises the threshold to that size, after which blocks of up to
32 MiB come from heaps that rarely shrink. A daemon reading 1 MB jobs kept every megabyte it had
ever used for a job body, a listing page or a row: 200 reads of 1 MB jobs and a listing of them
left its RSS 75 MB above the start with the status cache off, 38 MB of it from one listing,
against 34 MB with the threshold fixed (tests/test_bounds.py). Fixing the threshold turns the
adjustment off, so the threshold is set above the largest buffer a busy daemon allocates and
frees all the time: asyncio reads each socket into a fresh 256 KiB buffer, which at glibc's
128 KiB start meant an mmap and a munmap per read (status polls fell from ~4,500/s to
~3,300/s, `benchmarks.http_api`). At 512 KiB those stay in the heap and 1 MB bodies, pages and
rows still go back; the trim threshold follows as glibc's own rule would set it (twice the
mmap threshold), so the heap's top is not given back and taken again on every burst.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers, from glibc's malloc.h
MMAP_THRESHOLD = 512 * 1024  # above asyncio's 256 KiB read buffer, below a 1 MB body
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD


def return_large_buffers() -> bool:
    """Fix glibc's mmap threshold; False where there is no glibc ``mallopt`` to ask."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
