"""The core's thread pool under stress: more threads than cores, so that workers are preempted between one
call and the next, and calls that alternate between part counts, from one Python thread and from several.

A worker read a call's generation, part count and function as three separate loads, which could belong to
two calls: a worker left out of one call (its index past the call's part count) and preempted there could
run a part of the next call twice, letting that call return before another part was written (or call the
function of a call already over). Every output is checked against NumPy: a part run twice, late or never
shows up as a wrong or unwritten row. The race is narrow: these tests guard the fix, they do not find the
old race on every run (the C++ unit test ``test_pool_runs_each_part_once`` checks the same thing at the
pool itself).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
from tiltsmc import _core

THREADS = 8  # workers: more than the cores of a small machine, so they are preempted
ITEM_BYTES = 1 << 17  # a 2-row call is already work enough to be split (kParallelThreshold)
PARTICLES = 4
ROW_COUNTS = (2, 8, 3, 6, 5, 12)  # parts = min(THREADS, rows): each call's differs from the last's


def _cases(seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """``(x, ancestors, expected, out)`` for each row count: ``x`` bytes, ``expected`` gathered by NumPy."""
    rng = np.random.default_rng(seed)
    cases = []
    for rows in ROW_COUNTS:
        x = rng.integers(0, 256, size=(rows, PARTICLES, ITEM_BYTES), dtype=np.uint8)
        ancestors = rng.integers(0, PARTICLES, size=(rows, PARTICLES), dtype=np.int64)
        expected = np.take_along_axis(x, ancestors[:, :, None], axis=1)
        cases.append((x, ancestors, expected, np.empty_like(expected)))
    return cases


def _hammer(seed: int, seconds: float) -> tuple[int, list[str]]:
    """Gathers of every case in turn for ``seconds``: the number of calls and a line for each wrong output."""
    cases = _cases(seed)
    calls, wrong = 0, []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        x, ancestors, expected, out = cases[calls % len(cases)]
        out.fill(0)
        _core.gather(x, ancestors, out, x.shape[0], PARTICLES, ITEM_BYTES)
        if not np.array_equal(out, expected):
            rows = [r for r in range(x.shape[0]) if not np.array_equal(out[r], expected[r])]
            wrong.append(f"call {calls} ({x.shape[0]} rows): rows {rows} wrong or unwritten")
        calls += 1
    return calls, wrong


def test_pool_calls_of_alternating_part_counts_from_one_thread(
    restore_num_threads: Callable[[int], None],
) -> None:
    restore_num_threads(THREADS)
    calls, wrong = _hammer(0, 1.5)
    assert not wrong, wrong[:5]
    assert calls > len(ROW_COUNTS)


def test_pool_calls_of_alternating_part_counts_from_several_threads(
    restore_num_threads: Callable[[int], None],
) -> None:
    """Three Python threads at once (the large calls release the GIL): one holds the pool, the others run
    their calls on their own thread; every output is still exact."""
    restore_num_threads(THREADS)
    results: list[tuple[int, list[str]]] = []
    errors: list[BaseException] = []

    def hammer(seed: int) -> None:
        try:
            results.append(_hammer(seed, 1.5))
        except BaseException as error:  # reported by the test, not lost in the thread
            errors.append(error)

    threads = [threading.Thread(target=hammer, args=(seed,)) for seed in (1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(results) == 3
    for calls, wrong in results:
        assert not wrong, wrong[:5]
        assert calls > len(ROW_COUNTS)
