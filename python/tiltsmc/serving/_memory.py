"""Giving memory back to the operating system once a burst of requests is over."""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Any, Optional

__all__ = ["release_free_memory"]


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Any]:
    """glibc's ``malloc_trim``, where the C library is glibc (opened by name: no program is run)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and other C libraries have none
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the C heap's free pages to the operating system (``malloc_trim(0)``); whether it could.

    Freed memory stays in the process's heap otherwise: after a burst of large batches a service would
    keep its peak size for good. The engine calls it after shrinking the models' own pools (ONNX
    Runtime's arena: ``tiltsmc.models._ort.shrink_memory_arena``).
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
