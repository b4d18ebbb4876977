"""What memory given back costs when it is taken again (issue #15: the engine's idle release).

After a burst the serving engine gives its freed heap back to the system (``malloc_trim``, in
``tiltsmc._memory``); the next burst then faults every page in again. This benchmark times that
first touch, in the engine's own heap mode (``reuse_freed_memory``: large arrays from the C heap), for
memory kept in the heap (the reference) against memory given back, each after the same idle time:

* **kept**: ``--megabytes`` of numpy arrays allocated, written one byte per page, freed; after the idle
  time the same amount is allocated and written again (the heap's own pages, reused);
* **given back**: the same, with ``release_free_memory()`` after the free, as the engine does once idle.

The two alternate, ``--repeats`` times per idle time; medians per 100 MB and their ratio, in one run. On
a virtual machine whose host reclaims the pages its guest frees (a balloon with free page reporting)
the ratio grows with the idle time: the host has taken the pages back, and faults them in again. Writes
``bench/results/refault_<host>.json``. Not a test.

    python bench/bench_refault.py            # about 90 s
    python bench/bench_refault.py --quick
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import Any

import numpy as np
from _plot import RESULTS, header, write_json
from tiltsmc._memory import release_free_memory, reuse_freed_memory

PAGE = 4096


def touch(megabytes: int) -> list[np.ndarray]:
    """Allocate ``megabytes`` as 8 MB arrays (a step's KV caches, logits), one byte written per page."""
    arrays = [np.empty(8 << 20, dtype=np.uint8) for _ in range(max(megabytes // 8, 1))]
    for array in arrays:
        array[::PAGE] = 1
    return arrays


def first_touch_seconds(megabytes: int, idle: float, give_back: bool) -> float:
    arrays = touch(megabytes)
    del arrays
    gc.collect()
    if give_back:
        release_free_memory()
    time.sleep(idle)
    began = time.perf_counter()
    arrays = touch(megabytes)
    seconds = time.perf_counter() - began
    del arrays
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--idle", default="0,1,3,10", help="comma-separated idle seconds before the touch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="unused: no randomness (kept for the header)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 MB, idle 0 and 1 s, 1 repeat")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.megabytes, args.idle, args.repeats = 64, "0,1", 1
    if not reuse_freed_memory():
        raise SystemExit("needs glibc (mallopt, malloc_trim): the engine's release is a no-op elsewhere")
    release_free_memory()
    first_touch_seconds(args.megabytes, 0.0, give_back=False)  # the heap grown once, untimed
    rows: list[dict[str, Any]] = []
    per_100 = 100.0 / args.megabytes
    for idle in (float(x) for x in args.idle.split(",")):
        kept, given_back = [], []
        for _ in range(args.repeats):
            kept.append(first_touch_seconds(args.megabytes, idle, give_back=False))
            given_back.append(first_touch_seconds(args.megabytes, idle, give_back=True))
        kept_ms = 1e3 * per_100 * float(np.median(kept))
        back_ms = 1e3 * per_100 * float(np.median(given_back))
        rows.append(
            {
                "idle_seconds": idle,
                "kept_ms_per_100mb": kept_ms,
                "given_back_ms_per_100mb": back_ms,
                "ratio": back_ms / kept_ms if kept_ms > 0 else None,
                "kept_seconds": kept,
                "given_back_seconds": given_back,
            }
        )
        print(
            f"idle {idle:5.1f} s: kept {kept_ms:8.2f} ms / 100 MB, given back {back_ms:8.2f} ms / 100 MB "
            f"({back_ms / kept_ms:6.1f}x)",
            flush=True,
        )
    record = {**header("refault", args), "megabytes": args.megabytes, "rows": rows}
    write_json(args.out or RESULTS / "refault_vm.json", record)


if __name__ == "__main__":
    main()
