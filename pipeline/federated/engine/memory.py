"""Keep freed memory in the process while a round trains, so that big per-step tensors reuse
warm pages; give it back when the round ends.

A fusion module's local training allocates and frees tensors of tens to hundreds of MB at
every step (gathered features [rows, d_m], activations [rows, d_f]). glibc serves blocks over
32 MB with fresh mmap's and unmaps them on free, so every step pays the kernel for zeroed
pages again (tests/unit/test_memory.py counts those faults; a one-off profile of a FedRAP + FedMR
round on MovieLens-100K-MM found a quarter of its CPU time in the kernel). Turning mmap off
for malloc and not trimming the heap makes freed blocks reusable.

That setting is for training only (Shard.train: `freed_memory_kept`). Left on for good, as it
once was in every pool holding a fusion module, blocks of other sizes (an evaluation's score
blocks, the next round's working sets) are carved from a heap that is not trimmed, small live
objects pin the holes between them, and a long-lived process's resident set climbs with every
larger block (a pool evaluating FedMR with rows per (user, item) pair swung between 1.5 and
3.5 GB over 8 evaluations of the same users; with this scoping it stayed at 1.2 GB). So at the
end of a round malloc's defaults are restored and the free heap handed back (malloc_trim):
between rounds, and during evaluation, a pool holds its live data only.
Linux with glibc only; elsewhere this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536  # glibc's defaults
_libc = None  # False: not glibc


def _glibc():
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                libc.mallopt, libc.malloc_trim  # noqa: B018 (musl has neither)
                _libc = libc
            except (OSError, AttributeError):
                pass
    return _libc


def keep_freed_memory() -> bool:
    """Make this process's malloc keep freed memory (until release_freed_memory). True when applied."""
    libc = _glibc()
    return bool(libc) and bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))


def release_freed_memory() -> bool:
    """Restore malloc's defaults (big blocks mmap'd, the heap trimmed) and return the free heap
    to the OS now. True when applied."""
    libc = _glibc()
    if not libc:
        return False
    restored = bool(libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)) and \
        bool(libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD))
    libc.malloc_trim(0)
    return restored


@contextlib.contextmanager
def freed_memory_kept(enabled: bool = True):
    """Keep freed memory inside the block (a training round), release it on the way out."""
    applied = enabled and keep_freed_memory()
    try:
        yield applied
    finally:
        if applied:
            release_freed_memory()
