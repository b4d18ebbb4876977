"""Drawing from categorical laws given in the log domain (shared by policies and samplers)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .particles import Particles

__all__ = ["fail_prompts_without_a_law", "sample_categorical"]


def sample_categorical(log_probs: npt.ArrayLike, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """One draw per row of the last axis from ``softmax(log_probs)`` by inversion of the CDF."""
    logits = np.asarray(log_probs, dtype=np.float64)
    shift = np.max(logits, axis=-1, keepdims=True)
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
