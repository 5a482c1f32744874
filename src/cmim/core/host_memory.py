"""How the host allocator treats freed memory.

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and hands it back to
the kernel on free, so a large tensor that a training step allocates and frees every step (a cast copy of a
4096x4096 projector weight, its gradient, BatchNorm activations of all tokens) is page-faulted in anew each time.
:func:`keep_freed_memory` makes glibc serve large blocks from its heap and keep what is freed, so the next step
reuses warm pages. The price is that the process's resident memory stays at its peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


@functools.cache
def keep_freed_memory() -> bool:
    """Keep freed host memory in the process for reuse; True when applied (Linux with glibc), else a no-op.
    Process-wide and for the rest of its life; data-loader workers forked afterwards inherit it."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # no mmap for large blocks (they come from the heap) and no trimming of the heap's free top
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
