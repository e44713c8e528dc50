"""Host memory under glibc's malloc: large blocks given back to the OS when freed (`mellama-train export`).

glibc serves an allocation from its own mmap only above a threshold that adapts upwards (from 128 KiB to 32 MiB)
each time such a block is freed; below it, blocks come from the heap, and a freed block there stays resident
until a same-sized one reuses it. Fixing the threshold (M_MMAP_THRESHOLD, which also turns the adaptation off)
serves every block of 1 MiB or more with its own mmap. The export, which writes shard after shard of
differently sized tensors, sets it. Training does not: measured at the 25M benchmark shape on 2 CPU ranks it cut
a rank's peak RSS from ~1400 to ~970 MiB but cost 19% of the throughput (a fresh mmap and its page faults for
every activation); `MALLOC_MMAP_THRESHOLD_=1048576` in the environment makes that trade where memory is what
runs out (docs/PERFORMANCE.md). Not glibc (musl, macOS): no-op.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util

MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


def _libc() -> ctypes.CDLL | None:
    with contextlib.suppress(OSError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version"):
            return libc
    return None


def large_blocks_from_mmap(threshold: int = MMAP_THRESHOLD) -> int | None:
    """Serve every allocation of `threshold` bytes or more with its own mmap, process-wide, from now on; returns
    the threshold set (for the run record), or None where the C library is not glibc."""
    libc = _libc()
    if libc is None or libc.mallopt(_M_MMAP_THRESHOLD, threshold) != 1:
        return None
    return threshold


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
