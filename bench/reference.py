"""Plain numpy reference implementations of the ``tiltsmc.core`` kernels, for the benchmark.

They are vectorised over rows (no Python loop over the batch), as a numpy user would write them. The
gathers are the strongest plain numpy forms: fancy indexing or one flat ``np.take`` out of place, and in
place only the rows that move (``np.take_along_axis`` is kept as a secondary reference). Log-weights
``logw`` have shape ``(B, N)``; randomness comes from a :class:`numpy.random.Generator`. Rows are assumed
to hold at least one finite log-weight.
"""

from __future__ import annotations

import numpy as np

SCHEMES = ("multinomial", "stratified", "systematic", "residual")


def log_normalize(logw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(logw - logsumexp(logw), logsumexp(logw) - log N, 1 / sum(w**2))`` row by row."""
    top = np.max(logw, axis=1, keepdims=True)
    lse = top + np.log(np.sum(np.exp(logw - top), axis=1, keepdims=True))
    normalised = logw - lse
    ess = 1.0 / np.sum(np.exp(2.0 * normalised), axis=1)
    return normalised, lse[:, 0] - np.log(logw.shape[1]), ess


def _weights(logw: np.ndarray) -> np.ndarray:
    """Normalised weights in float64 (each row sums to one)."""
    w = np.exp(logw - np.max(logw, axis=1, keepdims=True), dtype=np.float64)
    return w / np.sum(w, axis=1, keepdims=True)


def _inverse_cdf(logw: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Ancestors ``a[b, m]`` with ``C[b, a-1] <= u[b, m] < C[b, a]``, C the row's cumulative weights.

    One ``np.searchsorted`` serves all rows: row ``b``'s CDF (in ``(0, 1]``) and points (in ``[0, 1)``)
    are shifted by ``b``, which keeps the concatenation sorted. Zero-weight particles are never hit.
    """
    batch, n = logw.shape
    cdf = np.cumsum(np.exp(logw - np.max(logw, axis=1, keepdims=True), dtype=np.float64), axis=1)
    cdf /= cdf[:, -1:]
    offset = np.arange(batch, dtype=np.float64)[:, None]
    flat = np.searchsorted((cdf + offset).ravel(), (u + offset).ravel(), side="right")
    ancestors = flat.reshape(u.shape) - n * np.arange(batch)[:, None]
    return np.minimum(ancestors, n - 1)  # guards u + b rounding up to b + 1


def resample(logw: np.ndarray, scheme: str, num: int, rng: np.random.Generator) -> np.ndarray:
    """``num`` ancestors per row, ascending, with ``E[#children of i] = num * w_i``."""
    batch = logw.shape[0]
    strata = np.arange(num) / num
    if scheme == "systematic":  # one uniform per row, shifted into each of the num strata
        return _inverse_cdf(logw, strata + rng.random((batch, 1)) / num)
    if scheme == "stratified":  # one uniform per stratum
        return _inverse_cdf(logw, strata + rng.random((batch, num)) / num)
    if scheme == "multinomial":  # sorted iid uniforms in O(num) from normalised exponential spacings
        spacings = np.cumsum(rng.standard_exponential((batch, num + 1)), axis=1)
        return _inverse_cdf(logw, spacings[:, :-1] / spacings[:, -1:])
    if scheme == "residual":  # floor(num * w_i) children each, the rest multinomial on the remainders
        expected = num * _weights(logw)
        counts = np.floor(expected).astype(np.int64)
        remainder = expected - counts
        left = num - counts.sum(axis=1)
        total = remainder.sum(axis=1, keepdims=True)
        probs = np.divide(remainder, total, out=np.zeros_like(remainder), where=total > 0)
        counts += rng.multinomial(left, probs)
        flat = np.repeat(np.arange(counts.size), counts.ravel())
        return flat.reshape(batch, num) - logw.shape[1] * np.arange(batch)[:, None]
    raise ValueError(f"unknown scheme {scheme!r}")


def pool_select(logw: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One index per row drawn with probability ``w_i``, and the row's ``log_mean_w``."""
    index = _inverse_cdf(logw, rng.random((logw.shape[0], 1)))[:, 0]
    top = np.max(logw, axis=1)
    log_mean_w = top + np.log(np.mean(np.exp(logw - top[:, None]), axis=1))
    return index, log_mean_w


def sample_logits(
    logits: np.ndarray, temperature: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One token per row from ``softmax(logits / temperature)``, with its log-probability
    ``s_v - logsumexp(s)`` (``s = logits / temperature``)."""
    scores = logits.astype(np.float64) / temperature
    index = _inverse_cdf(scores, rng.random((scores.shape[0], 1)))[:, 0]
    top = np.max(scores, axis=1)
    log_sum = top + np.log(np.sum(np.exp(scores - top[:, None]), axis=1))
    return index, scores[np.arange(len(index)), index] - log_sum


def mh_accept(log_z_current: np.ndarray, log_z_proposed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``u < exp(log_z_proposed - log_z_current)``; a current state of weight zero is always left."""
    u = rng.random(log_z_current.shape)
    with np.errstate(invalid="ignore"):  # -inf - -inf, handled by the where
        ratio = np.exp(np.minimum(log_z_proposed - log_z_current, 0.0))
    return np.where(np.isneginf(log_z_current), True, u < ratio)


def gather(x: np.ndarray, ancestors: np.ndarray) -> np.ndarray:
    """``out[b, m] = x[b, ancestors[b, m]]`` for ``x`` of shape ``(B, N, ...)``, by fancy indexing
    ``x[arange(B)[:, None], ancestors]``: the plain numpy way, and about as fast as numpy gets for blocks."""
    return x[np.arange(x.shape[0])[:, None], ancestors]


def gather_flat_take(x: np.ndarray, ancestors: np.ndarray) -> np.ndarray:
    """The same by one ``np.take`` along the first axis of the ``(B * N, ...)`` view, at flat indices
    ``ancestors[b, m] + N * b``: faster than fancy indexing on large ``(B, N)`` rows, slower on tiny ones."""
    batch, n = x.shape[:2]
    flat = (ancestors + n * np.arange(batch)[:, None]).ravel()
    out = np.take(x.reshape((batch * n, *x.shape[2:])), flat, axis=0)
    return out.reshape(ancestors.shape + x.shape[2:])


def gather_take_along_axis(x: np.ndarray, ancestors: np.ndarray) -> np.ndarray:
    """The same with ``np.take_along_axis`` (the secondary reference: much slower on ``(B, N, D)`` blocks)."""
    index = ancestors.reshape(ancestors.shape + (1,) * (x.ndim - 2))
    return np.take_along_axis(x, index, axis=1)


def _moved(ancestors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(b, m, ancestors[b, m])`` for the slots whose ancestor is not the slot itself."""
    batch_index, slot = np.nonzero(ancestors != np.arange(ancestors.shape[1]))
    return batch_index, slot, ancestors[batch_index, slot]


def gather_in_place(x: np.ndarray, ancestors: np.ndarray) -> np.ndarray:
    """``x[b, m] = x_old[b, ancestors[b, m]]`` in place (``ancestors`` of shape ``(B, N)``), moving only
    the rows whose ancestor is not themselves: ``x[b, dst] = x[b, src]`` reads every source (a copy of the
    moved rows) before it writes, so any ancestors are safe. Finding the moved rows is part of the call."""
    batch_index, slot, source = _moved(ancestors)
    x[batch_index, slot] = x[batch_index, source]
    return x


def reorder_in_place(arrays: list[np.ndarray], ancestors: np.ndarray) -> None:
    """:func:`gather_in_place` of every ``(B, N, ...)`` array with the same ancestors, the moved rows found
    once."""
    batch_index, slot, source = _moved(ancestors)
    for x in arrays:
        x[batch_index, slot] = x[batch_index, source]
