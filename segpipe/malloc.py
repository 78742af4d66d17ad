"""Keep freed memory for reuse: glibc malloc tuned for loops that allocate the same large tensors
over and over (a model's activations per tile batch or training step).

glibc hands large blocks back to the kernel when they are freed (munmap, or trimming the heap's
top), so the next batch faults every page in again and the kernel zeroes it. In tiled inference on
a 2048^2 image that was ~85,000 page faults per image and 15-25% of the model's own time; with the
thresholds below, ~100. Peak RSS is unchanged (the same blocks are reused); a long-lived worker
keeps its high-water mark instead of shrinking between batches. Elsewhere than glibc (macOS,
musl) this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MMAP_THRESHOLD = 32 * 2**20  # the most glibc accepts; larger blocks are still mapped on their own
TRIM_THRESHOLD = 2**30  # free memory at the heap's top kept, not returned, up to this much


@lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Apply the thresholds once per process; True where glibc took them."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
