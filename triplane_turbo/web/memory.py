"""Handing the memory a generation freed back to the system.

A generation allocates and frees a few hundred MB of large arrays (grids, meshes, textures, exports)
on whichever of Gradio's worker threads runs it. glibc's malloc keeps what is freed in its heaps for
reuse, and the fragments left between longer-lived allocations make a long-running server's RSS
climb. Measured with ``bench/soak.py`` on the tiny model (BENCHMARKS.md, "Long runs"): between
requests 50 and 200 the memory in use stayed at 220-240 MB while the free memory malloc kept grew
from 290 to 620 MB, and RSS from 930 to 1,250 MB, not levelling off. ``malloc_trim(0)`` after each
generation gives the free pages of every heap back: RSS then stays at 720-765 MB from request 50 on.
"""

from __future__ import annotations

import ctypes
import sys
from functools import cache


@cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc; musl and others have no such call
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Returns the heap's free pages to the system (glibc's ``malloc_trim(0)``); False where the C
    library has no such call (then it does nothing)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


__all__ = ["release_free_memory"]
