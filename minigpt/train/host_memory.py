"""Keep freed CPU memory in the process during training: `keep_freed_memory`.

A training step frees its activations and allocates the same sizes again in the next step.
With glibc's defaults, a freed block above the mmap threshold (128 KiB at first, raised
dynamically up to 32 MiB) goes back to the kernel, and so does free space at the top of the
heap above the trim threshold; the next step's allocation then faults every page back in,
and the kernel zeroes each one. At the main job's shape that was 900-1,300 page faults per
micro-batch on one thread and 1,900-4,700 per update with two micro-batches on two threads
(each thread has its own arena), about a tenth of the step's time (benchmarks/NOTES.md).
Raising both thresholds keeps the freed blocks for reuse, as torch's caching allocator does
on a GPU: the peak memory is unchanged, but the process does not give memory back to the
system after its peak while it lives.

Only glibc has these settings (`mallopt`); elsewhere this does nothing.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import platform

logger = logging.getLogger(__name__)

# mallopt's parameter numbers, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEPT_BYTES = 1 << 30
"""Both thresholds: blocks below 1 GiB come from the heap and up to 1 GiB of free heap stays."""


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds to KEPT_BYTES for the rest of the process (once).
    Returns whether glibc took them (False off glibc)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    kept = bool(libc.mallopt(M_MMAP_THRESHOLD, KEPT_BYTES)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEPT_BYTES))
    if not kept:
        logger.info("glibc refused mallopt's thresholds; freed memory goes back to the system as usual")
    return kept
