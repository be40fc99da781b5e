"""Keep freed CPU memory in the process while training: `keep_freed_memory`.

A training step frees its activations and allocates the same sizes again in the next step.
With glibc's defaults, a freed block above the mmap threshold (128 KiB at first, raised
dynamically up to 32 MiB) goes back to the kernel, and so does free space at the top of the
heap above the trim threshold; the next step's allocation then faults every page back in,
and the kernel zeroes each one. At the main job's shape that was 900-1,300 page faults per
micro-batch on one thread and 1,900-4,700 per update with two micro-batches on two threads
(each thread has its own arena); without them the main job's updates took 0.86x the wall
time (benchmarks/NOTES.md).
Raising both thresholds keeps the freed blocks for reuse, as torch's caching allocator does
on a GPU: the peak memory is unchanged, but the process does not give memory back to the
system after its peak until the run ends (then it does, `keep_freed_memory`'s exit).

Only glibc has these settings (`mallopt`); elsewhere this does nothing.
"""
from __future__ import annotations

import ctypes
import logging
import platform
from collections.abc import Iterator
from contextlib import contextmanager

import torch

logger = logging.getLogger(__name__)

# mallopt's parameter numbers, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEPT_BYTES = 1 << 30
"""Both thresholds while kept: blocks below 1 GiB come from the heap and up to 1 GiB of free heap stays."""
DEFAULT_BYTES = 128 * 1024
"""glibc's starting value of both, set again on exit (its dynamic raising stays off once set)."""


def _set_thresholds(libc: ctypes.CDLL, nbytes: int) -> bool:
    mmap_set = bool(libc.mallopt(M_MMAP_THRESHOLD, nbytes))  # each on its own: one refused leaves the other
    trim_set = bool(libc.mallopt(M_TRIM_THRESHOLD, nbytes))
    return mmap_set and trim_set


@contextmanager
def keep_freed_memory(device: torch.device) -> Iterator[bool]:
    """While open, on a CPU under glibc: freed blocks stay in the process (see the module
    docstring). On exit the thresholds go back to glibc's starting values and the free memory
    is given back (`malloc_trim`). Yields whether glibc took both thresholds (False on
    another device, off glibc, or where glibc refused 1 GiB)."""
    if device.type != "cpu" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        yield False
        return
    libc = ctypes.CDLL(None)
    kept = _set_thresholds(libc, KEPT_BYTES)
    if not kept:
        logger.info("glibc refused mallopt's %d-byte thresholds; freed memory goes back to the system as usual",
                    KEPT_BYTES)
    try:
        yield kept
    finally:
        _set_thresholds(libc, DEFAULT_BYTES)
        libc.malloc_trim(0)
