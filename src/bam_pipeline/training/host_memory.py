"""Host memory: let a training process keep the memory it frees (glibc), so tensors reuse pages.

glibc serves allocations above a threshold (at most 32 MB) with fresh ``mmap`` pages and hands
freed memory at the top of the heap back to the kernel. A training step allocates and frees the
same large tensors (activations, logits, gradients) every step, so on the CPU every step
page-faults them in again. ``keep_freed_memory`` turns both off (``M_MMAP_MAX = 0``,
``M_TRIM_THRESHOLD`` = max), so memory freed by one step serves the next, at the cost of a resident
size that no longer shrinks (docs/measurements.md has the numbers). Training stages on the CPU
apply it (``train.keep_host_memory``) for the rest of their process, forked DataLoader workers
included; GPU runs and other C libraries (macOS, musl) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve every block from the heap and never trim it; False where the
    C library is not glibc (nothing changed)."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
