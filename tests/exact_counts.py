"""Exact checks of histograms for the statistical tests: each cell's count against its exact binomial band.

A histogram of ``n`` independent draws of a law ``P`` over ``K`` cells (of ``0 < P < 1``) is checked cell by
cell: each count must lie in the band outside which a ``Binomial(n, P)`` count falls with probability at most
``ALPHA_HISTOGRAM / K``, computed from the pmf (a normal approximation, ``5 sd + 1``, is poor where ``n P``
is of order 1 or less: it failed about 1e-3 of runs of a pool's 224-cell joint law), so by the union bound
the whole histogram fails by chance with probability at most ``ALPHA_HISTOGRAM``. Cells with ``P = 0``
must be empty.
"""

from __future__ import annotations

import math

import numpy as np

ALPHA_HISTOGRAM = 1e-6  # the chance that a right histogram fails assert_counts_match


def binomial_band(n: int, probs: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Per cell, the narrowest band ``[lo, hi]`` with ``P(X < lo) <= alpha / 2`` and ``P(X > hi) <=
    alpha / 2`` for ``X ~ Binomial(n, P)``: exact tails, summed from the pmf (``log C(n, k)`` from
    cumulative sums of ``log k``, then ``exp``; the left sums are accurate in the left tail and the right
    sums in the right one), so a count falls outside with probability at most ``alpha``. ``[0, 0]`` where
    ``P = 0`` and ``[n, n]`` where ``P = 1``."""
    k = np.arange(n + 1)
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])
    log_choose = log_factorial[n] - log_factorial - log_factorial[::-1]
    lo = np.zeros(len(probs), dtype=np.int64)
    hi = np.zeros(len(probs), dtype=np.int64)
    for cell, p in enumerate(np.asarray(probs, dtype=np.float64)):
        if p <= 0.0 or p >= 1.0:
            lo[cell] = hi[cell] = 0 if p <= 0.0 else n
            continue
        pmf = np.exp(log_choose + k * math.log(p) + (n - k) * math.log1p(-p))
        at_most = np.cumsum(pmf)  # P(X <= k)
        at_least = np.cumsum(pmf[::-1])[::-1]  # P(X >= k)
        lo[cell] = np.searchsorted(at_most, alpha / 2, side="right")  # P(X <= lo - 1) <= alpha / 2
        hi[cell] = np.count_nonzero(at_least > alpha / 2) - 1  # P(X >= hi + 1) <= alpha / 2
    return lo, hi


def assert_counts_match(counts: np.ndarray, probs: np.ndarray, label: str) -> None:
    """Per-cell binomial check of a histogram of ``n = counts.sum()`` independent draws of ``probs``: every
    count within its exact binomial band at level ``ALPHA_HISTOGRAM / K`` (``K`` cells of ``0 < P < 1``), so
    the whole check fails by chance with probability at most ``ALPHA_HISTOGRAM``; cells of ``P = 0`` empty."""
    n = int(counts.sum())
    assert np.isclose(probs.sum(), 1.0)
    cells = max(int(np.count_nonzero((probs > 0) & (probs < 1))), 1)
    lo, hi = binomial_band(n, probs, ALPHA_HISTOGRAM / cells)
    bad = (counts < lo) | (counts > hi)
    assert not bad.any(), (
        f"{label}: cells {np.flatnonzero(bad).tolist()} have counts {counts[bad].tolist()}, "
        f"expected {(n * probs[bad]).round(1).tolist()} in {list(zip(lo[bad].tolist(), hi[bad].tolist()))}"
    )
