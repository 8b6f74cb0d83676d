"""Give freed heap memory back to the OS after each batch.

Images of many sizes make glibc's allocator keep freed blocks of every size in its arenas, so a
long-lived worker's resident memory creeps up with the number of images it has seen (measured:
the inference actor went from 0.6 to 1.2 GB over 2,000 COCO-sized images). `malloc_trim` returns
the free pages; it is a no-op where the C library has no such call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache


@lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    library = ctypes.CDLL(name) if name else None
    return library if library is not None and hasattr(library, "malloc_trim") else None


def release_free_memory() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
