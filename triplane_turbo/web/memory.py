"""Handing the memory a generation freed back to the system.

A generation allocates and frees a few hundred MB of large arrays (grids, meshes, textures, exports)
and leaves some of them in reference cycles (trimesh meshes). Measured with ``bench/soak.py`` on the
tiny model (BENCHMARKS.md, "Long runs"): between requests 50 and 200 the memory malloc had in use
stayed at 220-240 MB while the free memory it kept grew from 290 to 620 MB, and RSS from 930 to
1,250 MB, not levelling off: the heaps fragment. ``malloc_trim(0)`` after each generation returns
their free pages, but alone it only lowered the level (RSS still +577 MB per 1,000 requests): the
cycles reach the oldest generation of Python's collector, whose full collections are rare over the
~600,000 objects alive after start-up, and hold their arrays until then. So the app freezes those
objects once built (``freeze_startup_objects``), which makes a full collection cheap, and collects
fully before each trim: RSS then went from 633 MB at request 100 to 683 MB at request 1,000.
Large arrays still came from the heap (glibc's mmap threshold rises as they are freed) and RSS
scattered by up to 40 MB between samples; with a fixed threshold (``keep_large_arrays_out_of_the_heap``)
it moved by at most 12 MB and grew +18 MB per 1,000 requests.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
from functools import cache


#: Allocations of at least this many bytes get pages of their own (mmap), returned to the system the
#: moment they are freed. glibc starts at this value but raises it to the size of each such block
#: freed, up to 32 MB, so a generation's large arrays soon come from the heap and fragment it; a
#: fixed threshold (what MALLOC_MMAP_THRESHOLD_ sets) turns that adjustment off.
LARGE_ALLOCATION_BYTES = 128 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


@cache
def _glibc(name: str):
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)  # glibc; musl and others have no such calls
    except (OSError, AttributeError):
        return None


def keep_large_arrays_out_of_the_heap(threshold: int = LARGE_ALLOCATION_BYTES) -> bool:
    """Makes every later allocation of ``threshold`` bytes or more a mapping of its own, freed back to
    the system at once. Measured with ``bench/soak.py`` (BENCHMARKS.md, "Long runs"): RSS then moved
    by at most 12 MB from one sample to the next, instead of up to 40 MB while creeping up.
    Call at start-up; an operator's own MALLOC_MMAP_THRESHOLD_ is left as set. Returns False where
    the C library has no such setting (or the operator set it)."""
    mallopt = _glibc("mallopt")
    if mallopt is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_bytes() -> dict[str, int] | None:
    """glibc's view of its heaps now: bytes ``in_use``, ``free_kept`` (freed, not yet returned) and
    ``mapped`` (blocks with pages of their own); None without glibc 2.33's ``mallinfo2``."""
    mallinfo2 = _glibc("mallinfo2")
    if mallinfo2 is None:
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return {"in_use": info.uordblks, "free_kept": info.fordblks, "mapped": info.hblkhd}


def freeze_startup_objects() -> None:
    """Moves every object alive now (the modules, the page; about 600,000 in the app) out of the cyclic
    collector's reach, so that a full collection afterwards costs about 0.1 ms instead of 0.3-2.5 s
    (measured on this machine). Call once the app is built."""
    gc.collect()
    gc.freeze()


def release_free_memory() -> bool:
    """Frees the cyclic garbage a generation left (its trimesh meshes hold reference cycles: 140-180
    objects and tens of MB each time) and returns the heap's free pages to the system (glibc's
    ``malloc_trim(0)``). The collection is a full one once ``freeze_startup_objects`` ran (else only
    the young generations: a full one over the whole heap would take seconds). Returns False where
    the C library has no such call."""
    gc.collect(2 if gc.get_freeze_count() else 1)
    trim = _glibc("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


__all__ = ["LARGE_ALLOCATION_BYTES", "freeze_startup_objects", "heap_bytes", "keep_large_arrays_out_of_the_heap",
           "release_free_memory"]
