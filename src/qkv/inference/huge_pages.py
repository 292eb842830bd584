"""A program's weights in one block of memory on the system's huge pages (2 MB), where it has them.

A decoding step reads every weight once: the small benchmark model's one-row step 19 MB, nearly
5,000 pages of 4 KB, more than the processor's translation cache holds, so each page costs a walk of
the page tables, and after another program ran (CTranslate2 taking its turn in the benchmark, any
other work on a server) those walks go to memory too. On 2 MB pages the same weights are ten. Linux
gives them to memory marked for them (`madvise`) when transparent huge pages are "madvise" or
"always"; PyTorch's allocator does not mark its blocks unless `THP_MEM_ALLOC_ENABLE` is set before
the process starts, so qkv lays each program's constants out in a block of its own
(`qkv.inference.aoti.aligned_runner`). Taking turns with CTranslate2, one sentence greedy, small
model, Intel Xeon (AMX): 0.96-1.02x its speed on huge pages against 0.82-0.90x without
(benchmarks/README.md, session 46). Elsewhere (no such pages, another system) the block is plain
memory, each constant still on a cache line of its own.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
from pathlib import Path

import torch
from torch import Tensor

HUGE_PAGE = 2 << 20  # bytes
CACHE_LINE = 64  # bytes: where each constant starts in the block
SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@functools.cache
def available() -> bool:
    """Whether memory marked for huge pages may get them here: Linux's `madvise` knows them, and
    transparent huge pages are not switched off ("never"). Read once a process."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in SETTING.read_text()
    except OSError:  # no such setting to read: marking the memory does no harm
        return True


def block(nbytes: int) -> Tensor:
    """`nbytes` bytes (uint8, rounded up to whole huge pages) starting on a huge page, marked for
    huge pages: memory of its own (`mmap`), freed when the last tensor made from it goes."""
    size = max(1, -(-nbytes // HUGE_PAGE)) * HUGE_PAGE
    # One huge page more than asked: the block starts at the first boundary inside. Pages never
    # touched (the slack) take no memory.
    memory = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if available():
        # A kernel built without them says so: small pages then, as PyTorch's memory
        with contextlib.suppress(OSError):
            memory.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(memory, dtype=torch.uint8)  # keeps `memory` alive
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start : start + size]


def copies_in_one_block(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copies of `tensors`, the contiguous ones side by side in one `block` (each on a cache line
    of its own), any other (a strided view, oneDNN's packed layout) a copy of its own."""
    line = CACHE_LINE
    sizes = {
        name: -(-t.numel() * t.element_size() // line) * line
        for name, t in tensors.items()
        if t.layout == torch.strided and t.is_contiguous()
    }
    memory = block(sum(sizes.values())) if sizes else None
    copies, offset = {}, 0
    with torch.inference_mode(False), torch.no_grad():  # read by programs in and out of the mode
        for name, t in tensors.items():
            if name not in sizes:
                copies[name] = t.clone()
                continue
            nbytes = t.numel() * t.element_size()
            copy = memory[offset : offset + nbytes].view(t.dtype).view(t.shape)
            copies[name] = copy.copy_(t)
            offset += sizes[name]
    return copies
