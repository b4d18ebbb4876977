"""Small numpy helpers shared by the samplers, the models and the tasks."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


def logsumexp(a: FloatArray, axis: int = -1) -> FloatArray:
    """Stable ``log(sum(exp(a), axis))``; an all ``-inf`` slice gives ``-inf`` (no NaN, no warning)."""
    shift = np.max(a, axis=axis, keepdims=True)
    shift = np.where(np.isfinite(shift), shift, 0.0)
    with np.errstate(divide="ignore"):
        total = np.log(np.sum(np.exp(a - shift), axis=axis)) + np.squeeze(shift, axis=axis)
    return np.asarray(total, dtype=np.float64)
