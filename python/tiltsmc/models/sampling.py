"""Drawing from categorical laws given in the log domain (shared by policies and samplers)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["sample_categorical"]


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
