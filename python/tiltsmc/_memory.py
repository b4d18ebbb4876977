"""Giving memory back to the operating system once a burst of requests is over; how much there is."""

from __future__ import annotations

import ctypes
import functools
import math
import os
import sys
from typing import Any, Optional

__all__ = ["available_memory", "check_fits", "release_free_memory", "reuse_freed_memory"]


@functools.lru_cache(maxsize=1)
def _glibc() -> Optional[Any]:
    """The C library where it is glibc (opened by name: no program is run), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):  # musl and other C libraries have neither
        return None
    return libc


def _malloc_trim() -> Optional[Any]:
    """glibc's ``malloc_trim``, where the C library is glibc."""
    libc = _glibc()
    return None if libc is None else libc.malloc_trim


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_REUSE_UP_TO = 1 << 30  # bytes: blocks up to this size come from the heap, and this much freed memory stays


@functools.lru_cache(maxsize=1)
def reuse_freed_memory() -> bool:
    """Keep freed memory in the C heap for the next allocations (glibc: ``mallopt`` raises
    ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to 1 GiB and sets ``M_ARENA_MAX`` to 1, for the whole
    process); whether it could.

    By default glibc maps each large block (a batch's KV cache, its logits) afresh and unmaps it when
    freed, so every new array pays a page fault per 4 KiB on first touch: about ten times the copy that
    fills it (2.2 ms against 0.2 ms for 10 MB). A serving engine allocates such arrays at every step,
    join and leave; from the heap, freed blocks are reused. What stays is given back by
    ``release_free_memory`` (``malloc_trim`` returns free pages whatever the thresholds), which the engine
    calls once idle: threads started afterwards (the engine's worker) allocate from the main arena, whose
    free top ``malloc_trim`` also returns (a thread arena's top it leaves, and the high trim threshold
    would keep it).
    """
    libc = _glibc()
    if libc is None:
        return False
    # One arena for the threads started from now on (the engine's worker among them): malloc_trim gives back
    # the free top of the main arena, but not of a thread's own arena, which a high trim threshold keeps.
    return (
        bool(libc.mallopt(_M_ARENA_MAX, 1))
        and bool(libc.mallopt(_M_MMAP_THRESHOLD, _REUSE_UP_TO))
        and bool(libc.mallopt(_M_TRIM_THRESHOLD, _REUSE_UP_TO))
    )


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


def available_memory() -> Optional[int]:
    """Bytes of memory this process could still take, or None where that cannot be read: the system's
    available memory (Linux: ``MemAvailable`` in ``/proc/meminfo``, which counts the page cache that can be
    dropped; elsewhere the physical memory), and no more than what its memory cgroups leave it where one
    sets a limit (a container's: ``_cgroup_room``)."""
    available = _meminfo_available()
    if available is None:
        try:
            available = int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):
            return None
    room = _cgroup_room()
    return available if room is None else min(available, room)


def _meminfo_available(path: str = "/proc/meminfo") -> Optional[int]:
    try:
        with open(path, encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


# Each cgroup layout: where its memory controller is mounted (under the cgroup root), and the files of a
# cgroup's limit, usage and statistics, with the statistic of the page cache it would drop first (counted
# over its descendants too, as its usage is).
_CGROUP_LAYOUTS = (
    ("v2", "", "memory.max", "memory.current", "inactive_file"),
    ("v1", "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
)


def _cgroup_room(root: str = "/sys/fs/cgroup", membership: str = "/proc/self/cgroup") -> Optional[int]:
    """Bytes the memory cgroups of this process leave it, None where none sets a limit: the least, over
    its own cgroup and that cgroup's ancestors up to the mount's top, of a limit less that cgroup's working
    set (its usage less its inactive page cache, which the kernel reclaims before it runs out: usage
    counts the page cache, ``inactive_file`` the part of it not recently used, as kubelet reads them).
    v2 (``root``), then v1 (``root/memory``). The process's own cgroup is the one ``membership`` names
    (v2: its ``0::/path`` line; v1: the line of the ``memory`` controller), where its folder is there;
    else the mount's top is read as its own (a container's cgroup mounted at ``root``; a cgroup
    namespace, whose membership says ``/``)."""
    paths = _cgroup_paths(membership)
    for layout, mount, limit_file, usage_file, inactive_key in _CGROUP_LAYOUTS:
        top = os.path.join(root, mount) if mount else root
        found, least = False, None
        for folder in _cgroup_folders(top, paths.get(layout, "/")):
            limit = _read_int(os.path.join(folder, limit_file))
            if limit is None:  # no such file (v2's root cgroup has none): no limit here
                continue
            found = True
            usage = _read_int(os.path.join(folder, usage_file))
            if limit < 0 or limit >= 1 << 60 or usage is None:  # "max" (v2), v1's page-rounded 2**63 - 1
                continue
            inactive = _memory_stat(os.path.join(folder, "memory.stat"), inactive_key)
            room = max(0, limit - max(0, usage - inactive))
            least = room if least is None else min(least, room)
        if found:
            return least
    return None


def _cgroup_paths(membership: str) -> dict[str, str]:
    """The process's cgroup paths in ``membership`` (``/proc/self/cgroup``): ``"v2"``'s (its ``0::path``
    line) and ``"v1"``'s memory controller's (its ``id:...,memory,...:path`` line), where there."""
    paths: dict[str, str] = {}
    try:
        with open(membership, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                fields = line.rstrip("\n").split(":", 2)
                if len(fields) != 3:
                    continue
                if fields[0] == "0" and not fields[1]:
                    paths["v2"] = fields[2]
                elif "memory" in fields[1].split(","):
                    paths["v1"] = fields[2]
    except OSError:
        pass
    return paths


def _cgroup_folders(top: str, path: str) -> list[str]:
    """The folders of the cgroup at ``path`` under the mount ``top`` and of its ancestors, up to ``top``;
    ``[top]`` where that cgroup's folder is not there (another mount, a path outside a namespace: ``/..``)."""
    parts = [part for part in path.split("/") if part]
    if ".." in parts or not os.path.isdir(os.path.join(top, *parts)):
        parts = []
    return [os.path.join(top, *parts[:depth]) for depth in range(len(parts), -1, -1)]


def _read_int(path: str) -> Optional[int]:
    """The integer a cgroup file holds, -1 for ``max``; None where it cannot be read as one."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
        return -1 if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def _memory_stat(path: str, key: str) -> int:
    """The value of ``key`` in a cgroup's ``memory.stat`` (lines ``key value``); 0 where it is not there."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def check_fits(name: str, needed: int, what: str) -> None:
    """Refuse (ValueError naming the argument ``name``) a size whose memory cannot possibly be allocated:
    ``needed``, a lower bound of the bytes the call would take (a Python int, computed from the sizes
    without overflow), more than the memory available (``available_memory``) or than numpy's largest array
    (``sys.maxsize`` bytes, checked also where the memory available cannot be read). ``what`` says what
    needs them, as the subject of the message: ``"{name}: {what} need at least N bytes of memory, more than
    the M available"`` (``what``: ``"1 prompt(s) x 1099511627776 particles (16 bytes each)"``)."""
    available = available_memory()
    limit = sys.maxsize if available is None else min(available, sys.maxsize)
    if needed <= limit:
        return
    room = (
        f"more than the {available:.2g} available"
        if available is not None and available <= sys.maxsize
        else f"more than any array can hold ({sys.maxsize:.2g})"
    )
    raise ValueError(f"{name}: {what} need at least {_approximate(needed)} bytes of memory, {room}")


def _approximate(count: int) -> str:
    """``count`` in two significant digits (``1.2e+15``), or its power of ten beyond the doubles."""
    return f"{count:.2g}" if count < 10**300 else f"1e+{int(count.bit_length() * math.log10(2))}"
