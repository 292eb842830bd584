"""glibc's allocator for training on the CPU: large blocks from the heap, and freed memory kept.

A training step allocates and frees a few (tokens, vocabulary) tensors at every step: the logits and
their gradient, ~130 MB each for 4,000 tokens and 8,000 words. glibc maps every block over 32 MB afresh
(its largest mmap threshold) and unmaps it when it is freed, so each step faults in hundreds of MB of
new pages, which the kernel zeroes one by one. Served from the heap, and kept there once freed, the
same memory is reused at every step instead: a training step of the small model, as `qkv train` runs
it, gave 8-10% more target tokens/s on an AVX2 CPU and 15-17% on AVX-512, for 2-5% more peak memory
(benchmarks/README.md, "The allocator").

Only glibc is changed (Linux); elsewhere nothing is. ``QKV_DEFAULT_MALLOC=1`` leaves it as it starts.
"""

from __future__ import annotations

import ctypes
import functools
import os

DEFAULT_MALLOC_ENV = "QKV_DEFAULT_MALLOC"

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
# Free memory at the top of the heap goes back to the system beyond this (mallopt takes an int): 2 GB
_KEEP_BYTES = 2**31 - 1


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    # musl and others have no gnu_get_libc_version; mallopt's numbers are glibc's.
    return libc if hasattr(libc, "gnu_get_libc_version") else None


@functools.cache
def keep_large_blocks_on_the_heap() -> bool:
    """Have glibc serve every block from its heap (no mmap) and keep what is freed there, for the
    rest of this process (it cannot be undone); True if it now does."""
    if os.environ.get(DEFAULT_MALLOC_ENV, "") not in ("", "0"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    # Both: with mmap refused alone, a freed block at the heap's top would still go back to the system.
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES)) and bool(libc.mallopt(_M_MMAP_MAX, 0))
