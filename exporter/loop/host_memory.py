"""Freed host memory given back to the operating system between stages of the layer loop.

glibc keeps freed blocks below its mmap threshold (dynamic, up to 32 MiB) in its heaps. A 7B layer's
per-batch activations are 4–16 MiB, so after a layer's forward passes hundreds of MiB sit free in the heap,
where the factorization's large matrices (mmapped, above the threshold) cannot reuse them: the process's
resident memory then counts them on top of the factorization's peak (a probe at one OPT-6.7B layer:
docs/scale.md). Elsewhere than glibc (macOS, musl) there is no malloc_trim and nothing is done: the
allocator keeps its own policy.
"""
from __future__ import annotations

import ctypes
import ctypes.util

_name = ctypes.util.find_library("c")
_malloc_trim = getattr(ctypes.CDLL(_name), "malloc_trim", None) if _name else None


def release_free_heap() -> None:
    """Return the heap's free pages to the OS (glibc malloc_trim(0)); a no-op where there is none."""
    if _malloc_trim is not None:
        _malloc_trim(0)
