"""Keep freed memory in the process, so that big per-step tensors reuse warm pages.

A fusion module's local training allocates and frees tensors of tens to hundreds of MB at
every step (gathered features [rows, d_m], activations [rows, d_f]). glibc serves blocks over
32 MB with fresh mmap's and unmaps them on free, so every step pays the kernel for zeroed
pages again (tests/test_memory.py counts those faults; a one-off profile of a FedRAP + FedMR
round on MovieLens-100K-MM found a quarter of its CPU time in the kernel). Turning mmap off
for malloc and not trimming the heap makes freed blocks reusable. Linux with glibc only;
elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Make this process's malloc keep freed memory (once per process). True when applied."""
    global _applied
    if _applied is None:
        _applied = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):  # not glibc (musl has no mallopt)
                return False
            _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    return _applied
