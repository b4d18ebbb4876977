"""Drawing from categorical laws given in the log domain (shared by policies and samplers)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .particles import Particles

__all__ = ["fail_prompts_without_a_law", "sample_categorical"]


def sample_categorical(log_probs: npt.ArrayLike, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """One draw per row of the last axis from ``softmax(log_probs)`` by inversion of the CDF, an int64
    array of the leading axes' shape. A row no token can be drawn from (holding NaN or ``+inf``, or only
    ``-inf``), or a last axis of no entries, is refused (ValueError naming ``log_probs`` and the first such
    row) before ``rng`` is drawn from."""
    logits = np.asarray(log_probs, dtype=np.float64)
    if logits.ndim == 0:
        raise ValueError("log_probs: expected rows along a last axis, got a scalar")
    if logits.shape[-1] == 0:
        if 0 in logits.shape[:-1]:  # no rows: nothing to draw
            return np.zeros(logits.shape[:-1], dtype=np.int64)
        raise ValueError(f"log_probs: expected at least one entry per row, got shape {logits.shape}")
    shift = np.max(logits, axis=-1, keepdims=True)
    unusable = ~np.isfinite(shift[..., 0])  # NaN propagates through max
    if unusable.any():
        row = tuple(int(k) for k in np.argwhere(unusable)[0])
        largest = shift[row][0]
        what = "NaN" if np.isnan(largest) else "+inf" if largest > 0 else "only -inf"
        where = "log_probs" if not row else f"log_probs[{', '.join(map(str, row))}]"
        raise ValueError(f"{where}: the row holds {what} (no token can be drawn from it)")
    weights = np.exp(logits - shift)
    cumulative = np.cumsum(weights, axis=-1)
    u = rng.random((*logits.shape[:-1], 1)) * cumulative[..., -1:]
    index = np.sum(cumulative <= u, axis=-1)
    # Rounding can put u at the total; the last token of positive weight takes it.
    last_positive = logits.shape[-1] - 1 - np.argmax((weights > 0)[..., ::-1], axis=-1)
    chosen: npt.NDArray[np.int64] = np.minimum(index, last_positive).astype(np.int64)
    return chosen


def fail_prompts_without_a_law(
    particles: Particles, row_max: npt.NDArray[np.floating[Any]], active: npt.NDArray[np.bool_], returned: str
) -> list[int]:
    """The prompts of ``particles`` with an ``active`` particle whose law no token can be drawn from: its
    row's largest logit or log-probability (``row_max``, ``(B, N)``; NaN propagates through max) NaN,
    ``+inf``, or ``-inf`` (every token ``-inf``). Each fails alone: ``particles.errors[b]`` says
    ``"{returned} NaN for this prompt's particles (...)"`` (or ``+inf``, ``only -inf``, by its rows at
    fault) and its particles finish. Returns those prompts, so that the caller draws the others as it would
    have without them (a serving batch's other requests go on)."""
    bad = ~np.isfinite(row_max) & active
    failed: list[int] = np.flatnonzero(bad.any(axis=1)).tolist()
    for b in failed:
        at_fault = row_max[b][bad[b]]
        what = "NaN" if np.isnan(at_fault).any() else "+inf" if (at_fault > 0).any() else "only -inf"
        particles.errors[b] = (
            f"{returned} {what} for this prompt's particles (no token can be drawn from them)"
        )
        particles.finished[b] = True
    return failed
