"""Large buffers go back to the operating system when freed (the daemon's process only).

glibc serves an allocation above its mmap threshold (128 KiB) from a private mapping, unmapped
on free; but the first such free raises the threshold to that size, after which blocks of up to
32 MiB come from heaps that rarely shrink. A daemon reading 1 MB jobs kept every megabyte it had
ever used for a job body, a listing page or a row: 200 reads of 1 MB jobs and a listing of them
left its RSS 75 MB above the start with the status cache off, 38 MB of it from one listing,
against 34 MB with the threshold fixed (tests/test_bounds.py). Fixing the threshold turns the
adjustment off; allocations this large are rare on the per-job path (rows, batches and result
chunks stay below it), so throughput does not change.
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter numbers, from glibc's malloc.h
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, now kept


def return_large_buffers() -> bool:
    """Fix glibc's mmap threshold; False where there is no glibc ``mallopt`` to ask."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
