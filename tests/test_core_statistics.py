"""Statistical tests of the random kernels in ``tiltsmc.core``: unbiasedness, variances, frequencies.

Each test puts ``R`` identical rows into one call (row ``b`` draws from the Philox stream ``(key, b)``, so
the rows are independent replicates) and compares empirical means with their expectations.

Tolerances. A sample mean of ``R`` iid replicates with variance at most ``v`` has standard error at most
``se = sqrt(v / R)``; we require ``|mean - expected| < 5 se``. For a Gaussian sample mean (``R >= 20000``
and mean counts of at least a few hundred per check, so the normal approximation is good) a 5-sigma
deviation has probability 5.7e-7. The file makes about 400 such checks (88 of them count variances, each
~1.1e-6: see ``variance_band``), so the family-wise false-alarm probability is about 3e-4, and every seed
is fixed, so the outcome is deterministic anyway. For scale: at
M = N the dominant particle (w = 0.31, M w = 3.7) has se = 0.011, so a bias of 2% of M w_i is caught there.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from tiltsmc import core

SCHEMES = ("multinomial", "stratified", "systematic", "residual")
Z_BOUND = 5.0  # see the module docstring: two-sided 5-sigma, false alarm 5.7e-7 per check

# Fixed weights: N = 12 particles with one weight-zero (-inf) particle, one tiny weight (1.25e-3 of the
# total, so ~300 children expected over R rows at M = N) and a dominant one.
_RAW_WEIGHTS = np.array([0.3, 1.2, 0.0, 0.05, 2.5, 0.7, 0.01, 1.0, 0.45, 0.9, 0.2, 0.6])
with np.errstate(divide="ignore"):
    LOGW = np.log(_RAW_WEIGHTS)
N = LOGW.size
W = _RAW_WEIGHTS / _RAW_WEIGHTS.sum()  # float64 normalised weights
R = 20_000


def counts_per_row(ancestors: np.ndarray, n: int) -> np.ndarray:
    """counts[b, i] = number of j with ancestors[b, j] == i."""
    rows = ancestors.shape[0]
    flat = (ancestors + n * np.arange(rows, dtype=np.int64)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n)


def bounds(expected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """floor and ceil of the expected count, widened by one where it is within 1e-9 of an integer."""
    return np.floor(expected - 1e-9), np.ceil(expected + 1e-9)


@pytest.fixture(
    scope="module",
    params=[(scheme, m) for scheme in SCHEMES for m in (N, 2 * N + 1)],
    ids=lambda p: f"{p[0]}-M{p[1]}",
)
def children(request: pytest.FixtureRequest) -> tuple[str, int, np.ndarray]:
    scheme, m = request.param
    seed = 1000 + 10 * SCHEMES.index(scheme) + m
    ancestors = core.resample(np.tile(LOGW, (R, 1)), scheme, num=m, rng=seed)
    assert ancestors.shape == (R, m)
    return scheme, m, counts_per_row(ancestors, N)


def test_every_scheme_is_unbiased(children: tuple[str, int, np.ndarray]) -> None:
    """E[#children of i] = M w_i, with the multinomial variance M w_i (1 - w_i) as an upper bound.

    The multinomial variance bounds the count variance of all four schemes (systematic and stratified
    give floor/ceil-type counts, residual draws only the fractional parts multinomially), so the bound
    is conservative for all but multinomial.
    """
    scheme, m, counts = children
    expected = m * W
    mean = counts.mean(axis=0)
    se = np.sqrt(m * W * (1 - W) / R)
    deviation = np.abs(mean - expected)
    assert np.all(deviation < Z_BOUND * se + 1e-12), (
        f"{scheme}, M={m}: z-scores {np.round((mean - expected) / np.maximum(se, 1e-300), 2)}"
    )
    assert np.all(counts[:, 2] == 0), "the weight-zero particle was chosen"
    assert np.all(counts.sum(axis=1) == m)


def test_every_scheme_is_unbiased_with_its_own_variance(children: tuple[str, int, np.ndarray]) -> None:
    """The same check with the per-index sample variance (tighter for the low-variance schemes).

    Indices whose sample variance is 0 must match M w_i exactly; that happens only where w_i = 0 or where
    a floor/ceil scheme has M w_i an integer, and neither holds except for the weight-zero particle.
    """
    scheme, m, counts = children
    expected = m * W
    mean = counts.mean(axis=0)
    se = np.sqrt(counts.var(axis=0, ddof=1) / R)
    assert np.all(np.abs(mean - expected) < Z_BOUND * se + 1e-12), scheme


def test_children_bounds_hold_in_every_row(children: tuple[str, int, np.ndarray]) -> None:
    scheme, m, counts = children
    lo, hi = bounds(m * W)
    if scheme == "systematic":
        assert np.all((counts >= lo) & (counts <= hi))
    elif scheme == "stratified":
        assert np.all((counts >= lo - 1) & (counts <= hi + 1))
    elif scheme == "residual":
        assert np.all(counts >= lo)
    else:
        assert counts.max() > hi.max()  # multinomial is not bounded this way: it does exceed ceil


def test_multinomial_count_law() -> None:
    """Counts of a multinomial scheme row follow Multinomial(M, w): variances and Pearson's statistic.

    For each index, the sample variance s^2 of R iid counts has standard error sqrt((m4 - s^4) / R)
    (m4 the sample fourth central moment); we require |s^2 - M w (1 - w)| < 5 of those. Pearson's
    X^2 = sum_i (c_i - M w_i)^2 / (M w_i) over positive weights has exact mean K - 1 (K positive
    categories) under the multinomial law, for any M; its sample mean is checked the same way.
    """
    for m, seed in ((N, 11), (2 * N + 1, 12), (3, 13)):
        counts = counts_per_row(core.resample(np.tile(LOGW, (R, 1)), "multinomial", num=m, rng=seed), N)
        positive = W > 0
        centred = counts - counts.mean(axis=0)
        s2 = (centred**2).sum(axis=0) / (R - 1)
        m4 = (centred**4).mean(axis=0)
        se_var = np.sqrt(np.maximum(m4 - s2**2, 0.0) / R)
        target = m * W * (1 - W)
        assert np.all(np.abs(s2 - target)[positive] < Z_BOUND * se_var[positive]), f"M={m}"
        # Covariances: Cov(c_i, c_j) = -M w_i w_j; check the pair of the two largest weights.
        i, j = np.argsort(W)[-2:]
        products = centred[:, i] * centred[:, j]
        cov = products.sum() / (R - 1)
        assert abs(cov + m * W[i] * W[j]) < Z_BOUND * products.std() / math.sqrt(R)
        pearson = (((counts - m * W) ** 2)[:, positive] / (m * W[positive])).sum(axis=1)
        k = int(positive.sum())
        assert abs(pearson.mean() - (k - 1)) < Z_BOUND * pearson.std(ddof=1) / math.sqrt(R), f"M={m}"


def count_laws(scheme: str, m: int) -> np.ndarray:
    """``laws[i, c] = P(particle i has c children)`` for ``m`` draws from ``W`` with ``scheme``, exactly, as
    ``core.resample`` draws them (docstring of ``core.resample``; ``cpp/src/resample.cpp``):

    * multinomial: ``Binomial(m, w_i)``;
    * systematic: one ``u`` for the points ``(j + u) / m``: ``floor(m w_i)`` plus ``Bernoulli(frac(m w_i))``;
    * stratified: point ``j`` is ``(j + u_j) / m`` with independent ``u_j``; with ``x = m C_{i-1}``,
      ``y = m C_i`` (``C`` the cumulative weights, ``y = m`` from the last positive particle on), the count is
      ``1{x - k <= u_k < y - k}`` when both lie in stratum ``k = floor(x) = floor(y)``, else
      ``floor(y) - floor(x) + Bernoulli(frac(y)) - Bernoulli(frac(x))``, the two independent;
    * residual: ``floor(m w_i)`` plus ``Binomial(r, f_i / sum_j f_j)``, ``f = frac(m W)``,
      ``r = m - sum_j floor(m w_j)``.
    """
    n = W.size
    laws = np.zeros((n, m + 1))
    base = np.floor(m * W).astype(np.int64)
    frac = m * W - base

    def binomial(k: int, p: float) -> np.ndarray:
        return np.array([math.comb(k, c) * p**c * (1 - p) ** (k - c) for c in range(k + 1)])

    if scheme == "multinomial":
        for i in range(n):
            laws[i] = binomial(m, W[i])
    elif scheme == "systematic":
        laws[np.arange(n), base] = 1 - frac
        laws[np.arange(n), np.minimum(base + 1, m)] += frac
    elif scheme == "residual":
        r = int(m - base.sum())
        for i in range(n):
            laws[i, base[i] : base[i] + r + 1] = binomial(r, frac[i] / frac.sum())
    else:
        cumulative = m * np.cumsum(W)
        last = int(np.flatnonzero(W > 0)[-1])
        cumulative[last:] = m
        for i in range(n):
            x, y = (cumulative[i - 1] if i else 0.0), cumulative[i]
            kx, ky = math.floor(x), math.floor(y)
            if W[i] == 0:
                laws[i, 0] = 1.0
            elif kx == ky:
                laws[i, 0], laws[i, 1] = 1 - (y - x), y - x
            else:
                fx, fy = x - kx, (y - ky if ky < m else 0.0)
                for bx, px in ((0, 1 - fx), (1, fx)):
                    for by, py in ((0, 1 - fy), (1, fy)):
                        laws[i, ky - kx + by - bx] += px * py
    np.testing.assert_allclose(laws.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(laws @ np.arange(m + 1), m * W, rtol=0, atol=1e-9)  # unbiased, every scheme
    return laws


def variance_band(laws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact variance of each index's count, and the tolerance for the sample variance ``s^2`` of ``R`` iid
    counts (false alarm ~1.1e-6 per index).

    ``s^2 - var = R / (R - 1) D + var / (R - 1) - R / (R - 1) (X̄ - mu)^2`` with ``D`` the mean of the
    ``R`` iid ``(X - mu)^2 - var``, whose sd is ``sqrt((m4 - var^2) / R)`` (``m4`` the exact fourth central
    moment: the "se from the fourth moment"). ``|D| < 5 sd`` and ``(X̄ - mu)^2 < 25 var / R`` each fail with
    probability 5.7e-7 (normal means of R = 20000 bounded draws), so the tolerance is
    ``R / (R - 1) (5 sd_D + 25 var / R) + var / (R - 1)``. The second-order terms matter only near a
    Bernoulli(1/2) count, whose ``D`` vanishes (``(X - mu)^2 = 1/4`` always)."""
    support = np.arange(laws.shape[1])
    mu = laws @ support
    centred = support[None, :] - mu[:, None]
    var = (laws * centred**2).sum(axis=1)
    m4 = (laws * centred**4).sum(axis=1)
    sd_d = np.sqrt(np.maximum(m4 - var**2, 0.0) / R)
    tolerance = R / (R - 1) * (Z_BOUND * sd_d + Z_BOUND**2 * var / R) + var / (R - 1)
    return var, tolerance


def test_every_scheme_has_its_exact_count_variance(children: tuple[str, int, np.ndarray]) -> None:
    """Each index's sample count variance against its exact value for the scheme (``count_laws``), within
    ``variance_band``'s tolerance (the 11 positive indices of the 8 cases: ~1e-4 in all).

    Power, checked on the exact values: every other scheme's variance differs from this one's by more than
    the sum of both tolerances at some index, so a scheme that drew like another would fail; and the three
    low-variance schemes' total variance is below multinomial's (at M = N: systematic 0.17, stratified 0.30,
    residual 0.44 of it)."""
    scheme, m, counts = children
    var, tolerance = variance_band(count_laws(scheme, m))
    s2 = counts.var(axis=0, ddof=1)
    bad = np.abs(s2 - var) > tolerance
    assert not bad.any(), (
        f"{scheme}, M={m}: indices {np.flatnonzero(bad)}: {s2[bad]} vs {var[bad]} +- {tolerance[bad]}"
    )
    for other in SCHEMES:
        if other != scheme:
            other_var, other_tolerance = variance_band(count_laws(other, m))
            assert np.max(np.abs(other_var - var) - tolerance - other_tolerance) > 0, (scheme, other)
    if scheme != "multinomial":
        assert var.sum() < 0.5 * variance_band(count_laws("multinomial", m))[0].sum()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pool_select_frequencies(dtype: type) -> None:
    rows = 200_000
    logw = np.tile(LOGW.astype(dtype), (rows, 1))
    index, log_mean_w = core.pool_select(logw, rng=31)
    freq = np.bincount(index, minlength=N) / rows
    w = np.exp(LOGW.astype(dtype).astype(np.float64))
    w /= w.sum()
    se = np.sqrt(w * (1 - w) / rows)  # binomial standard error of a frequency
    assert np.all(np.abs(freq - w) < Z_BOUND * se + 1e-12), np.round((freq - w) / np.maximum(se, 1e-300), 2)
    assert freq[2] == 0.0
    rtol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(log_mean_w, math.log(_RAW_WEIGHTS.sum() / N), rtol=rtol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sample_logits_frequencies_and_log_probs(dtype: type) -> None:
    """Token frequencies within Z_BOUND binomial standard errors of softmax(logits / T), and each
    returned log p equal to log softmax at the drawn token (to float64 rounding)."""
    rows, temperature = 200_000, 0.8
    logits = np.tile(LOGW.astype(dtype), (rows, 1))
    index, log_prob = core.sample_logits(logits, temperature, rng=37)
    scores = LOGW.astype(dtype).astype(np.float64) / temperature
    log_softmax = np.where(np.isfinite(scores), scores - np.logaddexp.reduce(scores), -np.inf)
    p = np.exp(log_softmax)
    freq = np.bincount(index, minlength=N) / rows
    se = np.sqrt(p * (1 - p) / rows)
    assert np.all(np.abs(freq - p) < Z_BOUND * se + 1e-12), np.round((freq - p) / np.maximum(se, 1e-300), 2)
    assert freq[2] == 0.0  # a -inf logit is never drawn
    np.testing.assert_allclose(log_prob, log_softmax[index], rtol=0, atol=1e-13)


def test_pool_select_uses_all_rows_independently() -> None:
    """Different rows with different weights: row b picks index i with probability w_bi."""
    rng = np.random.default_rng(32)
    base = rng.normal(size=(4, 6))
    reps = 40_000
    logw = np.repeat(base, reps, axis=0)  # rows 0..reps-1 are base[0], and so on
    index, _ = core.pool_select(logw, rng=33)
    w = np.exp(base - base.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    for b in range(4):
        freq = np.bincount(index[b * reps : (b + 1) * reps], minlength=6) / reps
        se = np.sqrt(w[b] * (1 - w[b]) / reps)
        assert np.all(np.abs(freq - w[b]) < Z_BOUND * se), b


@pytest.mark.parametrize(
    ("current", "proposed"),
    [
        (0.0, -5.0),
        (0.0, -2.0),
        (1.0, 0.5),
        (-3.0, -3.001),
        (1e4, 1e4 - 0.7),
        (-1e4, -1e4 - 1.3),
        (0.0, 0.0),
        (0.0, 0.3),
        (0.0, -np.inf),
        (-np.inf, -np.inf),
        (-np.inf, -50.0),
    ],
)
def test_mh_accept_frequency(current: float, proposed: float) -> None:
    rows = 100_000
    accept = core.mh_accept(np.full(rows, current), np.full(rows, proposed), rng=41)
    if current == -np.inf:
        p = 1.0
    elif proposed == -np.inf:
        p = 0.0
    else:
        p = min(1.0, math.exp(proposed - current))
    se = math.sqrt(p * (1 - p) / rows)
    assert abs(accept.mean() - p) < Z_BOUND * se + 1e-12, (accept.mean(), p)


def test_mh_accept_mixed_rows() -> None:
    """Rows with different ratios in one call, interleaved, each at its own rate."""
    diffs = np.array([-0.1, -1.0, -3.0, -0.5])
    reps = 50_000
    proposed = np.tile(diffs, reps)  # row r has diff diffs[r % 4]
    accept = core.mh_accept(np.zeros(proposed.size), proposed, rng=42).reshape(reps, 4)
    p = np.exp(diffs)
    se = np.sqrt(p * (1 - p) / reps)
    assert np.all(np.abs(accept.mean(axis=0) - p) < Z_BOUND * se)


def test_resample_uniform_weights_systematic_is_identity() -> None:
    """Equal weights and M = N: each particle has exactly M w_i = 1 expected child; systematic gives 1."""
    x = np.zeros((1000, 37))
    a = core.resample(x, "systematic", rng=51)
    np.testing.assert_array_equal(a, np.tile(np.arange(37), (1000, 1)))
