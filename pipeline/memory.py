"""Heap settings for long-lived workers that allocate and free large buffers per batch.

Images of many sizes make glibc's allocator keep freed blocks of every size in its arenas, so a
long-lived worker's resident memory creeps up with the number of images it has seen (measured:
the inference actor went from 0.6 to 1.2 GB over 2,000 COCO-sized images). `release_free_memory`
(`malloc_trim`) returns the free pages after each batch.

Within a batch the opposite matters: post-processing allocates and frees tensors of several MB per
image, and glibc's defaults (large blocks in fresh mmap pages, the heap trimmed as soon as its top
is free) make each of them page-fault in anew. `reuse_freed_memory` keeps freed blocks in the heap
until the next `release_free_memory`. Both are no-ops where the C library lacks the calls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_LARGEST_HEAP_BLOCK = 32 << 20  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit


@lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    library = ctypes.CDLL(name) if name else None
    return library if library is not None and hasattr(library, "malloc_trim") else None


def release_free_memory() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def reuse_freed_memory() -> None:
    """Serve blocks up to 32 MiB from the heap and never trim it on free (for this process)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, _LARGEST_HEAP_BLOCK)
        libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1))
