"""Keep freed memory for reuse instead of handing it back to the kernel (glibc only).

A node allocates model-sized buffers every round: the landing buffer of each received
model, the gradients, the activations, the mixing scratch. glibc serves blocks above its
mmap threshold (128 KiB, rising with use to at most 32 MiB) with fresh ``mmap`` pages and
unmaps them on free, so every round page-faults those bytes in again. On the reference
machine a 50 MB copy into fresh pages runs at 2.3 GB/s and into reused heap memory at
7–8 GB/s (``docs/performance.md``). Raising the mmap and trim thresholds makes freed blocks
stay in the heap, where the next round's buffers of the same size find them.

The cost is that memory freed after a transient peak is not returned to the system until
the process ends; a node's footprint is its peak either way, since the same buffers come
back every round. ``MALLOC_ARENA_MAX`` is capped as well, because each extra arena keeps
its own such reserve. Set ``RUMOR_MALLOC_TUNING=0`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

THRESHOLD_BYTES = 1 << 30
ARENA_MAX = 2

_applied = False


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for a node process; True if it was applied (once per process)."""
    global _applied
    if _applied:
        return True
    if os.environ.get("RUMOR_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_THRESHOLD, THRESHOLD_BYTES),
            (M_TRIM_THRESHOLD, THRESHOLD_BYTES),
            (M_ARENA_MAX, ARENA_MAX),
        )
    )
    if not ok:
        log.debug("mallopt refused part of the allocator tuning")
    _applied = ok
    return ok
