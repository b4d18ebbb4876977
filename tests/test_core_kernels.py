"""Exact, deterministic tests of the kernels in ``tiltsmc.core``.

References are plain float64 NumPy (max-shifted logsumexp, fancy indexing), written from the spec and not
from the C++ code. Statistical properties of the random kernels live in ``test_core_statistics.py``;
randomised input sweeps in ``test_core_properties.py``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import numpy as np
import pytest
from tiltsmc import _core, core

SCHEMES = ("multinomial", "stratified", "systematic", "residual")
FLOATS = (np.float32, np.float64)
NINF = -np.inf


# --------------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------------


def reference_normalize(logw: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float64 max-shifted logsumexp of each row of a 2-D array without zero rows."""
    x = np.atleast_2d(np.asarray(logw, dtype=np.float64))
    top = x.max(axis=1)
    assert np.all(np.isfinite(top)), "reference needs a positive weight in every row"
    shifted = np.exp(x - top[:, None])  # x - top is exact near the top: the accurate route to w and ess
    total = shifted.sum(axis=1)
    lse = top + np.log(total)
    ess = total**2 / (shifted * shifted).sum(axis=1)
    return x - lse[:, None], lse - math.log(x.shape[1]), ess


def reference_weights(logw: Any) -> np.ndarray:
    x = np.atleast_2d(np.asarray(logw, dtype=np.float64))
    shifted = np.exp(x - x.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def counts_per_row(ancestors: np.ndarray, n: int) -> np.ndarray:
    """counts[b, i] = number of j with ancestors[b, j] == i."""
    a = np.atleast_2d(ancestors)
    rows = a.shape[0]
    flat = (a + n * np.arange(rows, dtype=np.int64)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n)


def assert_valid_ancestors(ancestors: np.ndarray, logw: np.ndarray, num: int) -> None:
    lw = np.atleast_2d(logw)
    a = np.atleast_2d(ancestors)
    assert ancestors.dtype == np.int64
    assert a.shape == (lw.shape[0], num)
    assert np.all(a >= 0) and np.all(a < lw.shape[1])
    assert np.all(np.diff(a, axis=1) >= 0), "ancestors must be ascending within a row"
    chosen = np.take_along_axis(lw, a, axis=1)
    assert np.all(chosen > NINF), "a weight-zero (-inf) particle was chosen"


def random_logw(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any = np.float64) -> np.ndarray:
    return (rng.normal(size=shape) * 2.0).astype(dtype)


# --------------------------------------------------------------------------------------------------------
# log_normalize
# --------------------------------------------------------------------------------------------------------

ROWS_FOR_NORMALIZE = [
    [0.0],
    [5.0, NINF],
    [NINF, NINF, 3.0, NINF],
    [1e4, 1e4 - 1, NINF],
    [-1e4, -1e4 + 2],
    [1e4, -1e4, 0.0],
    [0.0, 0.0, 0.0, 0.0],
    [-745.0, 0.0, -30.0, -800.0],
    list(np.random.default_rng(1).normal(size=37) * 10),
    list(np.random.default_rng(2).uniform(-50, 50, size=300)),
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("row", ROWS_FOR_NORMALIZE, ids=lambda r: f"n{len(r)}")
def test_log_normalize_matches_reference(row: list[float], dtype: Any) -> None:
    x = np.array(row, dtype=dtype)
    normalised, log_mean_w, ess = core.log_normalize(x)
    ref_norm, ref_lmw, ref_ess = reference_normalize(x)  # from the dtype-rounded inputs
    finite = x[np.isfinite(x)]
    scale = max(1.0, float(np.max(np.abs(finite))))
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    assert normalised.dtype == dtype and normalised.shape == x.shape
    assert log_mean_w.dtype == np.float64 and log_mean_w.shape == ()
    assert ess.dtype == np.float64 and ess.shape == ()
    np.testing.assert_array_equal(np.isneginf(normalised), np.isneginf(x))
    np.testing.assert_allclose(normalised, ref_norm[0], rtol=rtol, atol=rtol * scale)
    # log_mean_w and ess are float64 computed from the (rounded) inputs: double precision either way.
    np.testing.assert_allclose(log_mean_w, ref_lmw[0], rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(ess, ref_ess[0], rtol=1e-12)
    # The normalised row sums to one.
    assert abs(np.logaddexp.reduce(normalised.astype(np.float64))) < 10 * rtol * scale


def test_log_normalize_extreme_magnitudes_exact() -> None:
    """Rows near +-1e4: no overflow/underflow; values from closed forms."""
    for dtype in FLOATS:
        x = np.array([[1e4, 1e4 - 1, NINF], [-1e4, -1e4 + 2, NINF]], dtype=dtype)
        normalised, log_mean_w, ess = core.log_normalize(x)
        c1 = math.log1p(math.exp(-1.0))  # logsumexp(0, -1)
        c2 = math.log1p(math.exp(-2.0))  # logsumexp(0, -2)
        rtol = 1e-12 if dtype == np.float64 else 1e-6
        np.testing.assert_allclose(normalised[0, :2], [-c1, -1.0 - c1], rtol=rtol, atol=rtol)
        np.testing.assert_allclose(normalised[1, :2], [-2.0 - c2, -c2], rtol=rtol, atol=rtol)
        assert np.all(np.isneginf(normalised[:, 2]))
        np.testing.assert_allclose(
            log_mean_w, [1e4 + c1 - math.log(3), -1e4 + 2 + c2 - math.log(3)], rtol=1e-14
        )
        e1, e2 = math.exp(-1.0), math.exp(-2.0)
        np.testing.assert_allclose(
            ess, [(1 + e1) ** 2 / (1 + e1 * e1), (1 + e2) ** 2 / (1 + e2 * e2)], rtol=1e-12
        )


@pytest.mark.parametrize("dtype", FLOATS)
def test_log_normalize_batch_and_ess_bounds(dtype: Any) -> None:
    rng = np.random.default_rng(3)
    x = random_logw(rng, (50, 17), dtype) * 5
    x[rng.random(x.shape) < 0.3] = NINF
    x[:, 4] = 0.0  # no zero rows
    x[7] = NINF
    x[7, 9] = 1.5  # one-hot: ess = 1
    x[8] = 2.5  # uniform: ess = N
    normalised, log_mean_w, ess = core.log_normalize(x)
    assert normalised.shape == x.shape and normalised.dtype == dtype
    assert log_mean_w.shape == (50,) and ess.shape == (50,)
    ref_norm, ref_lmw, ref_ess = reference_normalize(x)
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(normalised, ref_norm, rtol=rtol, atol=rtol * 50)
    np.testing.assert_allclose(log_mean_w, ref_lmw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ess, ref_ess, rtol=1e-12)
    assert np.all(ess >= 1 - 1e-12) and np.all(ess <= 17 * (1 + 1e-12))
    assert ess[7] == pytest.approx(1.0, rel=1e-15)
    assert ess[8] == pytest.approx(17.0, rel=1e-13)
    assert log_mean_w[8] == pytest.approx(2.5, rel=1e-13)
    # Rows normalise independently: a row computed alone matches the same row in the batch.
    for b in (0, 7, 49):
        alone = core.log_normalize(x[b])
        np.testing.assert_array_equal(alone[0], normalised[b])
        assert alone[1] == log_mean_w[b] and alone[2] == ess[b]


def test_log_normalize_zero_rows() -> None:
    x = np.array([[0.0, 1.0], [NINF, NINF], [2.0, NINF]])
    with pytest.raises(ValueError, match=r"logw.*row 1"):
        core.log_normalize(x)
    with pytest.raises(ValueError, match=r"logw.*row 1"):
        core.log_normalize(x, zero_rows="raise")
    normalised, log_mean_w, ess = core.log_normalize(x, zero_rows="report")
    assert np.all(np.isneginf(normalised[1]))
    assert np.isneginf(log_mean_w[1]) and ess[1] == 0.0
    ref_norm, ref_lmw, ref_ess = reference_normalize(x[[0, 2]])
    np.testing.assert_allclose(normalised[[0, 2]], ref_norm, rtol=1e-12)
    np.testing.assert_allclose(log_mean_w[[0, 2]], ref_lmw, rtol=1e-12)
    np.testing.assert_allclose(ess[[0, 2]], ref_ess, rtol=1e-12)
    # 1-D zero row.
    n1, l1, e1 = core.log_normalize(np.full(3, NINF, dtype=np.float32), zero_rows="report")
    assert n1.dtype == np.float32 and np.all(np.isneginf(n1)) and np.isneginf(l1) and e1 == 0.0
    with pytest.raises(ValueError, match="zero_rows"):
        core.log_normalize(x, zero_rows="ignore")  # type: ignore[arg-type]


def test_log_normalize_non_contiguous_input() -> None:
    rng = np.random.default_rng(4)
    base = random_logw(rng, (6, 20))
    for view in (base[:, ::2], base[::2], base.T.copy().T, np.asfortranarray(base)):
        got = core.log_normalize(view)
        want = core.log_normalize(np.ascontiguousarray(view))
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


# --------------------------------------------------------------------------------------------------------
# resample
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_resample_one_hot(scheme: str, dtype: Any) -> None:
    n = 9
    for hot in (0, 4, n - 1):
        x = np.full((3, n), NINF, dtype=dtype)
        x[:, hot] = [0.0, -1e4, 1e4]
        for num in (1, 4, n, 3 * n):
            a = core.resample(x, scheme, num=num, rng=5)
            assert a.shape == (3, num) and a.dtype == np.int64
            assert np.all(a == hot)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_resample_single_particle(scheme: str) -> None:
    for num in (None, 1, 7):
        a = core.resample(np.array([-3.0]), scheme, num=num, rng=0)
        assert a.shape == (num or 1,) and a.dtype == np.int64 and np.all(a == 0)
        a2 = core.resample(np.zeros((4, 1), dtype=np.float32), scheme, num=num, rng=0)
        assert a2.shape == (4, num or 1) and np.all(a2 == 0)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_resample_shapes_order_and_support(scheme: str, dtype: Any) -> None:
    rng = np.random.default_rng(6)
    n = 23
    x = random_logw(rng, (40, n), dtype) * 3
    x[rng.random(x.shape) < 0.4] = NINF
    x[:, 0] = NINF  # the first and last particles of every row have weight zero
    x[:, -1] = NINF
    x[np.arange(40), rng.integers(1, n - 1, size=40)] = 0.0
    for num in (None, 1, 5, n, 3 * n, 3 * n + 1):
        a = core.resample(x, scheme, num=num, rng=7)
        m = n if num is None else num
        assert_valid_ancestors(a, x, m)
        one = core.resample(x[3], scheme, num=num, rng=7)
        assert one.shape == (m,) and one.dtype == np.int64
        assert_valid_ancestors(one, x[3], m)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_resample_empty_batch(scheme: str) -> None:
    a = core.resample(np.zeros((0, 5)), scheme, num=3, rng=0)
    assert a.shape == (0, 3) and a.dtype == np.int64


@pytest.mark.parametrize("scheme", SCHEMES)
def test_resample_same_seed_same_result(scheme: str) -> None:
    rng = np.random.default_rng(8)
    x = random_logw(rng, (30, 50))
    a1 = core.resample(x, scheme, rng=123)
    a2 = core.resample(x, scheme, rng=123)
    np.testing.assert_array_equal(a1, a2)
    a3 = core.resample(x, scheme, rng=124)
    assert not np.array_equal(a1, a3)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_resample_identical_rows_use_distinct_streams(scheme: str) -> None:
    """Row b uses the stream (key, b): identical rows of one call are resampled independently."""
    rng = np.random.default_rng(9)
    row = random_logw(rng, (40,))
    x = np.tile(row, (16, 1))
    a = core.resample(x, scheme, rng=10)
    assert len({tuple(r) for r in a}) > 1


@pytest.mark.parametrize("scheme", SCHEMES)
def test_resample_rows_do_not_depend_on_other_rows(scheme: str) -> None:
    rng = np.random.default_rng(11)
    x = random_logw(rng, (12, 30))
    a = core.resample(x, scheme, num=17, rng=12)
    y = x.copy()
    y[0] = random_logw(rng, (30,))
    y[5, :10] = NINF
    b = core.resample(y, scheme, num=17, rng=12)
    keep = [r for r in range(12) if r not in (0, 5)]
    np.testing.assert_array_equal(a[keep], b[keep])
    # A prefix of the rows gets the same draws as in the full call (row b always uses stream (key, b)).
    np.testing.assert_array_equal(core.resample(x[:4], scheme, num=17, rng=12), a[:4])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_resample_non_contiguous_input(scheme: str) -> None:
    rng = np.random.default_rng(13)
    base = random_logw(rng, (10, 60))
    for view in (base[:, ::3], base[::2], np.asfortranarray(base)):
        np.testing.assert_array_equal(
            core.resample(view, scheme, rng=14), core.resample(np.ascontiguousarray(view), scheme, rng=14)
        )


def _big_structured_row(n: int) -> np.ndarray:
    """A long row with weight-zero blocks on and across the core's 8192-element chunk boundaries."""
    rng = np.random.default_rng(15)
    x = rng.normal(size=n) * 1.5
    x[3 * 8192 : 5 * 8192] = NINF  # whole chunks
    x[7 * 8192 - 5 : 7 * 8192 + 5] = NINF  # straddling a boundary
    x[:3] = NINF  # leading zeros
    x[n - 10_000 :] = NINF  # trailing zeros: the last positive weight is inside a chunk
    x[n // 2] = 6.0  # one particle with many children
    return x


@pytest.mark.parametrize("scheme", SCHEMES)
def test_resample_long_row_children_bounds(scheme: str, restore_num_threads: Callable[[int], None]) -> None:
    """One long row (the chunk-split path) keeps the per-scheme bounds on the number of children."""
    restore_num_threads(2)
    n = 2**18 + 123
    x = _big_structured_row(n)
    w = reference_weights(x)[0]
    for num in (n, n // 3, 2 * n + 1):
        a = core.resample(x, scheme, num=num, rng=16)
        assert_valid_ancestors(a, x, num)
        counts = np.bincount(a, minlength=n)
        expected = num * w
        lo = np.floor(expected - 1e-9)
        hi = np.ceil(expected + 1e-9)
        if scheme == "systematic":
            assert np.all(counts >= lo) and np.all(counts <= hi)
        elif scheme == "stratified":
            assert np.all(counts >= lo - 1) and np.all(counts <= hi + 1)
        elif scheme == "residual":
            assert np.all(counts >= lo)
        assert np.all(counts[np.isneginf(x)] == 0)


# --------------------------------------------------------------------------------------------------------
# pool_select
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
def test_pool_select_shapes_and_support(dtype: Any) -> None:
    rng = np.random.default_rng(17)
    x = random_logw(rng, (200, 11), dtype) * 3
    x[rng.random(x.shape) < 0.5] = NINF
    x[np.arange(200), rng.integers(0, 11, size=200)] = 1.0
    index, log_mean_w = core.pool_select(x, rng=18)
    assert index.shape == (200,) and index.dtype == np.int64
    assert log_mean_w.shape == (200,) and log_mean_w.dtype == np.float64
    assert np.all((index >= 0) & (index < 11))
    assert np.all(x[np.arange(200), index] > NINF)
    np.testing.assert_allclose(log_mean_w, reference_normalize(x)[1], rtol=1e-12, atol=1e-12)
    i1, l1 = core.pool_select(x[0], rng=18)  # a 1-D input is row 0: the stream (key, 0)
    assert i1.shape == () and i1.dtype == np.int64 and l1.shape == () and l1.dtype == np.float64
    assert i1 == index[0] and l1 == log_mean_w[0]


def test_pool_select_one_hot_and_single() -> None:
    x = np.full((4, 6), NINF)
    x[np.arange(4), [0, 2, 5, 3]] = [0.0, 1e4, -1e4, 7.0]
    index, log_mean_w = core.pool_select(x, rng=1)
    np.testing.assert_array_equal(index, [0, 2, 5, 3])
    np.testing.assert_allclose(log_mean_w, np.array([0.0, 1e4, -1e4, 7.0]) - math.log(6), rtol=1e-14)
    i, lm = core.pool_select(np.array([2.0]), rng=2)
    assert i == 0 and lm == pytest.approx(2.0, rel=1e-15)


def test_sample_logits_arguments() -> None:
    logits = np.array([[0.0, 1.0, -np.inf], [2.0, 2.0, 2.0]], dtype=np.float32)
    index, log_prob = core.sample_logits(logits, rng=3)
    assert index.shape == log_prob.shape == (2,) and index[0] != 2
    one, _ = core.sample_logits(logits[1], 2.0, rng=3)
    assert one.shape == ()
    for temperature in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            core.sample_logits(logits, temperature)
    for temperature in (True, "1", None):
        with pytest.raises(TypeError, match="temperature"):
            core.sample_logits(logits, temperature)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="logits"):
        core.sample_logits(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="logits"):
        core.sample_logits(np.full((2, 3), -np.inf))
    with pytest.raises(TypeError, match="logits"):
        core.sample_logits(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="logits"):
        core.sample_logits(np.zeros((2, 3, 4)))


def test_pool_select_rows_and_streams() -> None:
    rng = np.random.default_rng(19)
    row = random_logw(rng, (30,))
    index, _ = core.pool_select(np.tile(row, (64, 1)), rng=20)
    assert len(set(index.tolist())) > 1  # identical rows, distinct streams
    x = random_logw(rng, (10, 30))
    y = x.copy()
    y[2] = random_logw(rng, (30,))
    a, _ = core.pool_select(x, rng=21)
    b, _ = core.pool_select(y, rng=21)
    keep = [r for r in range(10) if r != 2]
    np.testing.assert_array_equal(a[keep], b[keep])
    np.testing.assert_array_equal(core.pool_select(x[:3], rng=21)[0], a[:3])
    np.testing.assert_array_equal(core.pool_select(x, rng=21)[0], a)


# --------------------------------------------------------------------------------------------------------
# mh_accept
# --------------------------------------------------------------------------------------------------------


def test_mh_accept_deterministic_cases() -> None:
    current = np.array([NINF, NINF, NINF, 0.0, 5.0, 1e4, 0.0, -3.0, 1e4, -1e4])
    proposed = np.array([NINF, 0.0, -1e4, NINF, NINF, 1e4, 1e-12, -3.0, -1e4, 1e4])
    expected = np.array([True, True, True, False, False, True, True, True, False, True])
    for seed in range(20):
        accept = core.mh_accept(current, proposed, rng=seed)
        assert accept.dtype == np.bool_ and accept.shape == (10,)
        np.testing.assert_array_equal(accept, expected)


def test_mh_accept_shapes_and_inputs() -> None:
    a = core.mh_accept(0.0, -1.0, rng=0)
    assert a.shape == () and a.dtype == np.bool_
    b = core.mh_accept(np.zeros(5, dtype=np.float32), np.full(5, -0.5, dtype=np.float32), rng=0)
    assert b.shape == (5,) and b.dtype == np.bool_
    np.testing.assert_array_equal(b, core.mh_accept(np.zeros(5), np.full(5, -0.5), rng=0))
    np.testing.assert_array_equal(core.mh_accept([0, 0], [1, 2], rng=0), [True, True])


def test_mh_accept_rows_and_streams() -> None:
    current = np.zeros(200)
    proposed = np.full(200, math.log(0.5))
    accept = core.mh_accept(current, proposed, rng=3)
    assert 0 < accept.sum() < 200  # identical rows, distinct streams
    np.testing.assert_array_equal(core.mh_accept(current, proposed, rng=3), accept)
    p2 = proposed.copy()
    p2[0] = 0.0
    np.testing.assert_array_equal(core.mh_accept(current, p2, rng=3)[1:], accept[1:])
    np.testing.assert_array_equal(core.mh_accept(current[:7], proposed[:7], rng=3), accept[:7])


# --------------------------------------------------------------------------------------------------------
# gather
# --------------------------------------------------------------------------------------------------------

STRUCTURED = np.dtype([("a", "<i4"), ("b", "<f8", (2,)), ("c", "S3")])
GATHER_DTYPES = [np.bool_, np.int8, np.float32, np.complex128, np.float16, np.uint64, STRUCTURED]
TRAILING = [(), (3,), (2, 5)]


def make_state(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    dtype = np.dtype(dtype)
    raw = rng.integers(0, 256, size=int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, dtype=np.uint8)
    if dtype == np.bool_:
        raw = raw % 2
    if dtype.kind in "fc":  # avoid NaN payloads so comparisons are exact
        return (rng.normal(size=shape) * 100).astype(dtype) + (1j if dtype.kind == "c" else 0)
    return raw.view(dtype).reshape(shape).copy()


def reference_gather(x: np.ndarray, ancestors: np.ndarray) -> np.ndarray:
    if ancestors.ndim == 1:
        return x[ancestors]
    index = ancestors.reshape(ancestors.shape + (1,) * (x.ndim - 2))
    return np.take_along_axis(x, index, axis=1)


def assert_same_bytes(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


@pytest.mark.parametrize("trailing", TRAILING, ids=str)
@pytest.mark.parametrize("dtype", GATHER_DTYPES, ids=lambda d: np.dtype(d).str)
def test_gather_matches_take_along_axis(dtype: Any, trailing: tuple[int, ...]) -> None:
    rng = np.random.default_rng(22)
    b, n = 4, 7
    x = make_state(rng, (b, n, *trailing), dtype)
    for m in (1, 5, n, 3 * n):
        anc = rng.integers(0, n, size=(b, m))
        out = core.gather(x, anc)
        assert_same_bytes(out, reference_gather(x, anc))
        # 1-D form.
        out1 = core.gather(x[2], anc[2])
        assert_same_bytes(out1, x[2][anc[2]])
        # Into a preallocated out.
        buffer = np.empty((b, m, *trailing), dtype=x.dtype)
        result = core.gather(x, anc, out=buffer)
        assert result is buffer
        assert_same_bytes(buffer, reference_gather(x, anc))


@pytest.mark.parametrize("trailing", TRAILING, ids=str)
@pytest.mark.parametrize("dtype", GATHER_DTYPES, ids=lambda d: np.dtype(d).str)
def test_gather_in_place_equals_out_of_place(dtype: Any, trailing: tuple[int, ...]) -> None:
    rng = np.random.default_rng(23)
    b, n = 5, 12
    x = make_state(rng, (b, n, *trailing), dtype)
    identity = np.tile(np.arange(n), (b, 1))
    random = rng.integers(0, n, size=(b, n))
    ancestries = {
        "identity": identity,
        "random": random,
        "sorted": np.sort(random, axis=1),
        "permutation": np.argsort(rng.random((b, n)), axis=1),
        "cycle": np.roll(identity, 1, axis=1),
        "swap-and-copy": np.tile([1, 0, 0, 3, 3, 3, 6, 8, 7, 9, 11, 11], (b, 1)),
        "constant": np.full((b, n), n - 1),
        "mixed rows": np.stack([identity[0], random[1], np.sort(random[2]), identity[3][::-1], random[4]]),
    }
    for name, anc in ancestries.items():
        expected = reference_gather(x, anc)
        work = x.copy()
        result = core.gather(work, anc, out=work)
        assert result is work, name
        assert_same_bytes(work, expected)
        # 1-D in place.
        work1 = x[1].copy()
        core.gather(work1, anc[1], out=work1)
        assert_same_bytes(work1, x[1][anc[1]])


def test_gather_accepts_other_index_dtypes_and_lists() -> None:
    x = np.arange(24.0).reshape(2, 4, 3)
    anc = np.array([[3, 0, 0, 1], [2, 2, 2, 2]])
    expected = reference_gather(x, anc)
    for dtype in (np.int8, np.uint8, np.int32, np.uint32, np.uint64, np.int64):
        np.testing.assert_array_equal(core.gather(x, anc.astype(dtype)), expected)
    np.testing.assert_array_equal(core.gather(x.tolist(), anc.tolist()), expected)
    # Non-contiguous x and ancestors.
    xs = np.arange(48.0).reshape(2, 8, 3)[:, ::2]
    ancs = np.array([[3, 9, 0, 9, 0, 9, 1, 9], [2, 9, 2, 9, 2, 9, 2, 9]])[:, ::2]
    np.testing.assert_array_equal(core.gather(xs, ancs), reference_gather(xs, ancs))


def test_gather_empty_cases() -> None:
    x = np.arange(6.0).reshape(2, 3)
    out = core.gather(x, np.zeros((2, 0), dtype=np.int64))
    assert out.shape == (2, 0) and out.dtype == x.dtype
    out = core.gather(np.zeros((0, 3, 2)), np.zeros((0, 4), dtype=np.int64))
    assert out.shape == (0, 4, 2)


def test_gather_large_threaded(restore_num_threads: Callable[[int], None]) -> None:
    rng = np.random.default_rng(24)
    x = rng.normal(size=(4096, 64, 3))
    anc = np.sort(rng.integers(0, 64, size=(4096, 64)), axis=1)
    expected = reference_gather(x, anc)
    for threads in (1, 2, 3):
        restore_num_threads(threads)
        np.testing.assert_array_equal(core.gather(x, anc), expected)
        work = x.copy()
        core.gather(work, anc, out=work)
        np.testing.assert_array_equal(work, expected)


def test_reorder_in_place_equals_gathers(restore_num_threads: Callable[[int], None]) -> None:
    """Several arrays (small items, large items, a bool) in one call equal separate gathers, on one thread
    and split over the pool (the large case copies ~60 MiB, above the 32 MiB threading threshold)."""
    rng = np.random.default_rng(25)
    for shape_tail, rows, n in [((), 3, 7), ((2, 5), 3, 7), ((65536,), 2, 64)]:
        arrays = [
            rng.normal(size=(rows, n, *shape_tail)).astype(np.float32),
            rng.integers(0, 9, size=(rows, n, 3)),
            rng.random((rows, n)) < 0.5,
        ]
        anc = rng.integers(0, n, size=(rows, n))
        expected = [reference_gather(a, anc) for a in arrays]
        for threads in (1, 2):
            restore_num_threads(threads)
            work = [a.copy() for a in arrays]
            core.reorder_in_place(work, anc)
            for got, want in zip(work, expected):
                np.testing.assert_array_equal(got, want)
    with pytest.raises(TypeError, match=r"arrays\[1\]"):
        core.reorder_in_place([np.zeros((1, 2)), [[0, 1]]], np.zeros((1, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"arrays\[0\]"):
        core.reorder_in_place([np.zeros((2, 2))], np.zeros((1, 2), dtype=np.int64))
    with pytest.raises(TypeError, match="arrays"):
        core.reorder_in_place(np.zeros((1, 2)), np.zeros((1, 2), dtype=np.int64))  # type: ignore[arg-type]


def test_reorder_in_place_copies_only_the_columns_an_ancestor_uses(
    restore_num_threads: Callable[[int], None],
) -> None:
    """With ``axes`` and ``used``: an item of an array with an axis takes the first ``used[a_j]`` columns
    (clamped to the axis' width) of its ancestor along that axis, in every block before it, and keeps its
    own columns after; arrays without an axis are reordered whole in the same call. Refusals name the
    argument and write nothing."""
    rng = np.random.default_rng(31)
    rows, n, heads, width, dim = 3, 6, 2, 9, 4
    for threads in (1, 2):
        restore_num_threads(threads)
        cache = rng.normal(size=(rows, n, heads, width, dim)).astype(np.float32)
        tokens = rng.integers(0, 50, size=(rows, n, 5))
        anc = rng.integers(0, n, size=(rows, n))
        anc[0] = [1, 0, 3, 2, 5, 4]  # cycles: items both read and overwritten
        used = rng.integers(-2, width + 3, size=(rows, n))  # clamped to [0, width]
        work_cache, work_tokens = cache.copy(), tokens.copy()
        core.reorder_in_place([work_tokens, work_cache], anc, used=used, axes=[None, 3])
        np.testing.assert_array_equal(work_tokens, reference_gather(tokens, anc))
        for r in range(rows):
            for j in range(n):
                i = anc[r, j]
                copied = width if i == j else int(np.clip(used[r, i], 0, width))
                np.testing.assert_array_equal(work_cache[r, j, :, :copied], cache[r, i, :, :copied])
                np.testing.assert_array_equal(work_cache[r, j, :, copied:], cache[r, j, :, copied:])
    cache, anc, used = np.zeros((1, 2, 3, 4)), np.array([[1, 0]]), np.array([[2, 2]])
    refusals: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"used": used}, ValueError, "used, axes"),
        ({"axes": [2]}, ValueError, "used, axes"),
        ({"used": used, "axes": [2, 3]}, ValueError, r"axes: expected one per array"),
        ({"used": used, "axes": [1]}, ValueError, r"axes\[0\]"),
        ({"used": used, "axes": [4]}, ValueError, r"axes\[0\]"),
        ({"used": used, "axes": [True]}, TypeError, r"axes\[0\]"),
        ({"used": np.array([[2, 2, 2]]), "axes": [2]}, ValueError, "used"),
        ({"used": used.astype(float), "axes": [2]}, TypeError, "used"),
    ]
    for options, error, message in refusals:
        with pytest.raises(error, match=message):
            core.reorder_in_place([cache], anc, **options)
    shared = np.zeros((1, 2, 3, 2), dtype=np.int64)
    with pytest.raises(ValueError, match="used: shares memory"):  # only the compiled entry point sees it
        _core.reorder_in_place([shared], anc, False, shared.reshape(-1)[:2].reshape(1, 2), [2])


# --------------------------------------------------------------------------------------------------------
# Threads and seeding
# --------------------------------------------------------------------------------------------------------


def _all_kernel_results(x: np.ndarray) -> list[np.ndarray]:
    results: list[np.ndarray] = list(core.log_normalize(x))
    for scheme in SCHEMES:
        for num in (None, x.shape[1] // 3 + 1):
            results.append(core.resample(x, scheme, num=num, rng=99))
    results.extend(core.pool_select(x, rng=99))
    return results


@pytest.mark.parametrize("shape", [(1, 2**20), (4096, 64)], ids=str)
def test_results_do_not_depend_on_thread_count(
    shape: tuple[int, int], restore_num_threads: Callable[[int], None]
) -> None:
    rng = np.random.default_rng(25)
    x = rng.normal(size=shape) * 3
    x[rng.random(shape) < 0.1] = NINF
    x[:, 0] = 0.0
    outcomes = []
    for threads in (1, 2, 4):
        restore_num_threads(threads)
        assert core.get_num_threads() == threads
        outcomes.append(_all_kernel_results(x) + _all_kernel_results(x.astype(np.float32)))
    for other in outcomes[1:]:
        assert len(other) == len(outcomes[0])
        for a, b in zip(outcomes[0], other):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


def test_mh_accept_does_not_depend_on_thread_count(restore_num_threads: Callable[[int], None]) -> None:
    rng = np.random.default_rng(26)
    current = rng.normal(size=2**18)
    proposed = rng.normal(size=2**18)
    restore_num_threads(1)
    one = core.mh_accept(current, proposed, rng=5)
    restore_num_threads(2)
    np.testing.assert_array_equal(core.mh_accept(current, proposed, rng=5), one)


def test_set_num_threads_validation(restore_num_threads: Callable[[int], None]) -> None:
    restore_num_threads(3)
    assert core.get_num_threads() == 3
    core.set_num_threads(np.int64(1))
    assert core.get_num_threads() == 1
    with pytest.raises(ValueError, match="num_threads"):
        core.set_num_threads(0)
    with pytest.raises(TypeError, match="num_threads"):
        core.set_num_threads(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="num_threads"):
        core.set_num_threads(True)
    with pytest.raises(ValueError, match=r"num_threads: must be < 2\*\*31, got 1099511627776"):
        core.set_num_threads(2**40)  # the core's count is an int (pybind11's own TypeError named no argument)
    assert core.get_num_threads() == 1


_SEED_LOGW = np.random.default_rng(27).normal(size=(64, 40)) * 2
RANDOM_KERNELS: dict[str, Callable[[Any], np.ndarray]] = {
    **{scheme: (lambda rng, scheme=scheme: core.resample(_SEED_LOGW, scheme, rng=rng)) for scheme in SCHEMES},
    "pool_select": lambda rng: core.pool_select(_SEED_LOGW, rng=rng)[0],
    "mh_accept": lambda rng: core.mh_accept(_SEED_LOGW[:, 0], _SEED_LOGW[:, 1], rng=rng),
}


@pytest.mark.parametrize("kernel", RANDOM_KERNELS.values(), ids=RANDOM_KERNELS.keys())
def test_spec7_rng_forms(kernel: Callable[[Any], np.ndarray]) -> None:
    by_int = kernel(7)
    np.testing.assert_array_equal(kernel(7), by_int)
    np.testing.assert_array_equal(kernel(np.int64(7)), by_int)
    np.testing.assert_array_equal(kernel(np.uint32(7)), by_int)
    # An int seed means default_rng(seed): the same as a fresh Generator, SeedSequence or BitGenerator.
    np.testing.assert_array_equal(kernel(np.random.default_rng(7)), by_int)
    np.testing.assert_array_equal(kernel(np.random.SeedSequence(7)), by_int)
    np.testing.assert_array_equal(kernel(np.random.PCG64(7)), by_int)
    seq = np.random.SeedSequence(8)
    np.testing.assert_array_equal(kernel(seq), kernel(seq))  # a SeedSequence does not advance
    np.testing.assert_array_equal(kernel(np.random.MT19937(9)), kernel(np.random.MT19937(9)))
    np.testing.assert_array_equal(kernel(np.random.Philox(9)), kernel(np.random.Philox(9)))
    np.testing.assert_array_equal(
        kernel(np.random.Generator(np.random.SFC64(9))), kernel(np.random.Generator(np.random.SFC64(9)))
    )
    assert not np.array_equal(kernel(8), by_int)
    # Generators and bit generators advance: successive calls draw fresh keys.
    for source in (np.random.default_rng(7), np.random.PCG64(7), np.random.MT19937(7)):
        first = kernel(source)
        second = kernel(source)
        assert not np.array_equal(first, second)
    generator = np.random.default_rng(10)
    state = generator.bit_generator.state
    kernel(generator)
    assert generator.bit_generator.state != state
    # None: fresh entropy, so two calls differ (64 rows: a collision is practically impossible).
    assert not np.array_equal(kernel(None), kernel(None))


@pytest.mark.parametrize("kernel", RANDOM_KERNELS.values(), ids=RANDOM_KERNELS.keys())
def test_spec7_rng_invalid(kernel: Callable[[Any], np.ndarray]) -> None:
    with pytest.raises(ValueError, match="rng"):
        kernel(-1)
    for bad in ("seed", 1.5, True, np.bool_(False), object()):
        with pytest.raises(TypeError, match="rng"):
            kernel(bad)


# --------------------------------------------------------------------------------------------------------
# Errors: log-weights
# --------------------------------------------------------------------------------------------------------

LOGW_KERNELS: dict[str, Callable[[Any], Any]] = {
    "log_normalize": lambda logw: core.log_normalize(logw),
    **{scheme: (lambda logw, scheme=scheme: core.resample(logw, scheme, rng=0)) for scheme in SCHEMES},
    "pool_select": lambda logw: core.pool_select(logw, rng=0),
}


@pytest.mark.parametrize("kernel", LOGW_KERNELS.values(), ids=LOGW_KERNELS.keys())
def test_logw_errors(kernel: Callable[[Any], Any]) -> None:
    good = np.zeros((3, 4))
    kernel(good)
    for bad_shape in (np.float64(0.0), np.zeros((2, 3, 4)), np.zeros((3, 0)), np.zeros(0)):
        with pytest.raises(ValueError, match="logw"):
            kernel(bad_shape)
    for dtype in (np.int64, np.int8, np.uint16, np.bool_, np.complex128, np.complex64, object):
        with pytest.raises(TypeError, match="logw"):
            kernel(good.astype(dtype))
    with pytest.raises(TypeError, match="logw"):
        kernel([["a", "b"]])
    for value, what in ((np.nan, "NaN"), (np.inf, r"\+inf")):
        for dtype in FLOATS:
            bad = good.astype(dtype)
            bad[2, 1] = value
            with pytest.raises(ValueError, match=rf"logw: {what}.*row 2"):
                kernel(bad)
            with pytest.raises(ValueError, match=rf"logw: {what}"):
                kernel(bad[2])
    bad = good.copy()
    bad[1] = NINF
    with pytest.raises(ValueError, match=r"logw.*row 1"):
        kernel(bad)
    with pytest.raises(ValueError, match="logw"):
        kernel(bad[1])


def test_resample_argument_errors() -> None:
    x = np.zeros((2, 5))
    for scheme in ("Systematic", "bootstrap", "", 2, None):
        with pytest.raises(ValueError, match="scheme"):
            core.resample(x, scheme, rng=0)  # type: ignore[arg-type]
    for num in (0, -1, np.int64(0)):
        with pytest.raises(ValueError, match="num"):
            core.resample(x, num=num, rng=0)
    for num in (2.0, 2.5, "3", True, np.float64(3.0), np.bool_(True)):
        with pytest.raises(TypeError, match="num"):
            core.resample(x, num=num, rng=0)  # type: ignore[arg-type]
    assert core.resample(x, num=np.int32(3), rng=0).shape == (2, 3)


# --------------------------------------------------------------------------------------------------------
# Errors: mh_accept
# --------------------------------------------------------------------------------------------------------


def test_mh_accept_errors() -> None:
    with pytest.raises(ValueError, match="log_z_proposed"):
        core.mh_accept(np.zeros(3), np.zeros(4), rng=0)
    with pytest.raises(ValueError, match="log_z_proposed"):
        core.mh_accept(np.zeros(3), 0.0, rng=0)
    with pytest.raises(ValueError, match="log_z_current"):
        core.mh_accept(np.zeros((2, 2)), np.zeros((2, 2)), rng=0)
    with pytest.raises(ValueError, match="log_z_proposed"):
        core.mh_accept(np.zeros(4), np.zeros((2, 2)), rng=0)
    for name, which in (("log_z_current", 0), ("log_z_proposed", 1)):
        for value, what in ((np.nan, "NaN"), (np.inf, r"\+inf")):
            args = [np.zeros(5), np.zeros(5)]
            args[which][3] = value
            with pytest.raises(ValueError, match=rf"{name}: {what} at row 3"):
                core.mh_accept(*args, rng=0)
        # NaN is an error even where the other side would decide the outcome.
        args = [np.full(2, NINF), np.full(2, NINF)]
        args[which][1] = np.nan
        with pytest.raises(ValueError, match=rf"{name}: NaN at row 1"):
            core.mh_accept(*args, rng=0)
        for dtype in (np.complex128, np.bool_, object):
            args = [np.zeros(2), np.zeros(2)]
            args[which] = args[which].astype(dtype)
            with pytest.raises(TypeError, match=name):
                core.mh_accept(*args, rng=0)


def test_mh_accept_scalar_versus_length_one_is_a_shape_mismatch() -> None:
    """Regression: shapes were compared after flattening, so () against (1,) was accepted."""
    with pytest.raises(ValueError, match="log_z_proposed"):
        core.mh_accept(0.0, np.zeros(1), rng=0)


# --------------------------------------------------------------------------------------------------------
# Errors: gather
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_place", [False, True], ids=["out-of-place", "in-place"])
@pytest.mark.parametrize("bad_index", [-1, 6, 2**40, np.iinfo(np.int64).min])
def test_gather_out_of_range_writes_nothing(in_place: bool, bad_index: int) -> None:
    x = np.arange(3 * 6 * 2, dtype=np.float64).reshape(3, 6, 2)
    anc = np.tile(np.arange(6)[::-1], (3, 1))
    anc[2, 4] = bad_index  # in the last row: earlier rows must not have been written either
    original = x.copy()
    if in_place:
        with pytest.raises(ValueError, match=r"ancestors.*row 2"):
            core.gather(x, anc, out=x)
        np.testing.assert_array_equal(x, original)
        x1 = original[0].copy()
        with pytest.raises(ValueError, match="ancestors"):
            core.gather(x1, anc[2], out=x1)
        np.testing.assert_array_equal(x1, original[0])
    else:
        out = np.full_like(x, -7.0)
        with pytest.raises(ValueError, match=r"ancestors.*row 2"):
            core.gather(x, anc, out=out)
        assert np.all(out == -7.0)
        with pytest.raises(ValueError, match="ancestors"):
            core.gather(x, anc)
        np.testing.assert_array_equal(x, original)


def test_gather_uint64_index_beyond_int64() -> None:
    x = np.zeros((4, 2))
    with pytest.raises(ValueError, match="ancestors"):
        core.gather(x, np.array([0, 2**63 + 5, 1], dtype=np.uint64))


def test_gather_argument_errors() -> None:
    x = np.zeros((2, 4, 3))
    anc = np.zeros((2, 4), dtype=np.int64)
    with pytest.raises(TypeError, match="ancestors"):
        core.gather(x, anc.astype(np.float64))
    with pytest.raises(TypeError, match="ancestors"):
        core.gather(x, anc.astype(np.bool_))
    with pytest.raises(ValueError, match="ancestors"):
        core.gather(x, np.zeros((2, 4, 1), dtype=np.int64))
    with pytest.raises(ValueError, match="ancestors"):
        core.gather(x, np.zeros((3, 4), dtype=np.int64))  # 3 rows against x's 2
    with pytest.raises(ValueError, match=r"^x: "):
        core.gather(np.zeros(4), anc)  # 1-D x with 2-D ancestors
    with pytest.raises(ValueError, match=r"^x: "):
        core.gather(np.zeros((2, 0, 3)), np.zeros((2, 0), dtype=np.int64))
    with pytest.raises(TypeError, match=r"^x: "):
        core.gather(np.empty((2, 4), dtype=object), anc)
    with pytest.raises(TypeError, match=r"^x: "):
        core.gather(np.empty((2, 4), dtype=[("a", "f8"), ("b", "O")]), anc)
    # out: wrong shape, dtype, layout, kind, writeability; overlap with x.
    for bad_out in (
        np.zeros((2, 5, 3)),
        np.zeros((2, 4)),
        np.zeros((2, 4, 3), dtype=np.float32),
        np.zeros((2, 4, 3), dtype=np.int64),
    ):
        with pytest.raises(ValueError, match=r"^out: "):
            core.gather(x, anc, out=bad_out)
    with pytest.raises(ValueError, match=r"^out: "):
        core.gather(x, anc, out=np.zeros((2, 4, 6))[:, :, ::2])
    readonly = np.zeros((2, 4, 3))
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match=r"^out: "):
        core.gather(x, anc, out=readonly)
    with pytest.raises(TypeError, match=r"^out: "):
        core.gather(x, anc, out=x.tolist())  # type: ignore[arg-type]
    for overlapping in (x[...], x.view(), x[:, :, :]):
        with pytest.raises(ValueError, match=r"^out: "):
            core.gather(x, anc, out=overlapping)  # a view of x, not x itself
    with pytest.raises(ValueError, match=r"^out: "):
        core.gather(x, np.zeros((2, 3), dtype=np.int64), out=x)  # in place needs M == N
    # In place needs a C-contiguous, writeable x.
    fortran = np.asfortranarray(np.zeros((2, 4, 3)))
    with pytest.raises(ValueError, match=r"^out: "):
        core.gather(fortran, anc, out=fortran)
    readonly_x = np.zeros((2, 4, 3))
    readonly_x.flags.writeable = False
    with pytest.raises(ValueError, match=r"^out: "):
        core.gather(readonly_x, anc, out=readonly_x)


def test_gather_partial_overlap_and_disjoint_views() -> None:
    """x and out as views of one buffer: refused when they overlap, fine when they are disjoint."""
    flat = np.zeros(2 * 4 * 3 * 2)
    src = flat[:24].reshape(2, 4, 3)
    src[...] = np.arange(24.0).reshape(2, 4, 3)
    anc = np.array([[3, 2, 1, 0], [0, 0, 0, 0]])
    expected = reference_gather(src, anc)
    with pytest.raises(ValueError, match=r"^out: "):
        core.gather(src, anc, out=flat[12:36].reshape(2, 4, 3))
    assert np.all(flat[24:] == 0.0)
    dst = flat[24:].reshape(2, 4, 3)
    assert core.gather(src, anc, out=dst) is dst
    np.testing.assert_array_equal(dst, expected)


@pytest.mark.parametrize(
    "x", [np.zeros((2, 3, 0)), np.zeros((2, 3), dtype=np.dtype([]))], ids=["trailing-0", "itemsize-0"]
)
def test_gather_zero_byte_items_still_check_ancestors(x: np.ndarray) -> None:
    """Regression: with nothing to copy, gather returned before checking the ancestors."""
    with pytest.raises(ValueError, match="ancestors"):
        core.gather(x, np.array([[0, 5, 1], [0, 0, -1]]))


def test_gather_scalar_ancestors_are_refused() -> None:
    """Regression: np.ascontiguousarray made 0-d ancestors 1-D before the ndim check."""
    with pytest.raises(ValueError, match="ancestors"):
        core.gather(np.zeros((2, 4, 3)), np.int64(0))


def test_gather_in_place_on_a_list_raises_type_error() -> None:
    """Regression: out=x with a list x hit an assert (AssertionError, or AttributeError under -O)."""
    values = [1.0, 2.0, 3.0]
    with pytest.raises(TypeError, match=r"^out: "):
        core.gather(values, [0, 1, 2], out=values)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_statistics_match_log_normalize(dtype: type) -> None:
    rng = np.random.default_rng(8)
    logw = rng.normal(scale=3.0, size=(7, 33)).astype(dtype)
    logw[2] = -np.inf  # a zero row is reported, as with zero_rows="report"
    logw[4, ::2] = -np.inf
    _, log_mean_w, ess = core.log_normalize(logw, zero_rows="report")
    got_mean, got_ess = core.row_statistics(logw)
    np.testing.assert_array_equal(got_mean, log_mean_w)
    np.testing.assert_array_equal(got_ess, ess)
    one_mean, one_ess = core.row_statistics(logw[0])
    assert one_mean.shape == () and one_mean == log_mean_w[0] and one_ess == ess[0]


@pytest.mark.parametrize("scheme", core.SCHEMES)
def test_smc_step_is_row_statistics_plus_resample(scheme: str) -> None:
    rng = np.random.default_rng(9)
    logw = rng.normal(scale=2.0, size=(6, 40))
    logw[1] = -np.inf  # collapsed: reported, never resampled
    logw[3] = 0.0  # equal weights: ESS = N, resampled only at threshold 1
    log_mean_w, ess = core.row_statistics(logw)
    every = logw.copy()
    ancestors, resampled, got_mean, got_ess, unique = core.smc_step(every, 1.0, scheme, rng=42)
    np.testing.assert_array_equal(got_mean, log_mean_w)
    np.testing.assert_array_equal(got_ess, ess)
    assert resampled.tolist() == [True, False, True, True, True, True]
    live = [0, 2, 3, 4, 5]
    for row in live:  # row r uses the stream (key, r), as core.resample does for the whole batch
        single = logw.copy()
        single[1] = 0.0  # core.resample refuses zero rows; the other rows' draws do not depend on it
        np.testing.assert_array_equal(ancestors[row], core.resample(single, scheme, rng=42)[row])
        assert unique[row] == len(np.unique(ancestors[row]))
    np.testing.assert_array_equal(ancestors[1], np.arange(40))
    assert np.all(every[live] == 0.0) and np.all(every[1] == -np.inf)
    half = logw.copy()
    _, resampled_half, *_ = core.smc_step(half, 0.5, scheme, rng=42)
    np.testing.assert_array_equal(resampled_half, (ess < 0.5 * 40) & (ess > 0))
    np.testing.assert_array_equal(half[~resampled_half], logw[~resampled_half])
    with pytest.raises(ValueError, match="log_w"):
        core.smc_step(np.asfortranarray(np.zeros((3, 4))), 0.5)
    with pytest.raises(TypeError, match="log_w"):
        core.smc_step(np.zeros(4), 0.5)
    with pytest.raises(ValueError, match="NaN"):
        core.smc_step(np.array([[0.0, np.nan]]), 0.5)


def test_concurrent_calls_from_python_threads_match_serial_results() -> None:
    """Calls from several threads, large enough that the GIL is released (the first three; the others hold
    it), share the core's thread pool (or run inline while it is busy) and must give exactly the results
    of the same calls made one after another."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(12)
    inputs = [rng.normal(size=(1, 1 << 21)) for _ in range(3)] + [
        rng.normal(size=(512, 64)) for _ in range(3)
    ]
    expected = [core.resample(logw, "systematic", rng=k) for k, logw in enumerate(inputs)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            got = list(
                pool.map(lambda pair: core.resample(pair[1], "systematic", rng=pair[0]), enumerate(inputs))
            )
            for a, b in zip(got, expected):
                np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------------------------
# concatenate_padded: joining batches whose sequences differ in length
# --------------------------------------------------------------------------------------------------------


def reference_concatenate_padded(
    parts: list[np.ndarray], axis: int, skips: list[int], right: bool = False
) -> np.ndarray:
    """Each part's kept columns along ``axis`` (``skip:``, or right-padded ``:length - skip``) moved to the
    end (the start) of a zero array, then stacked."""
    kept = [
        np.take(p, np.arange(0, p.shape[axis] - s) if right else np.arange(s, p.shape[axis]), axis=axis)
        for p, s in zip(parts, skips)
    ]
    width = max(k.shape[axis] for k in kept)
    padded = []
    for k in kept:
        shape = list(k.shape)
        shape[axis] = width
        z = np.zeros(shape, dtype=np.result_type(*parts))
        index = [slice(None)] * k.ndim
        index[axis] = slice(0, k.shape[axis]) if right else slice(width - k.shape[axis], width)
        z[tuple(index)] = k
        padded.append(z)
    return np.concatenate(padded)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.bool_, np.float16])
@pytest.mark.parametrize("axis", [1, 2, 3, -2])
def test_concatenate_padded_matches_reference(
    dtype: Any, axis: int, side: Any, restore_num_threads: Callable[[int], None]
) -> None:
    rng = np.random.default_rng(26)
    base = (3, 2, 4, 5)
    absolute = axis % 4
    parts, skips = [], []
    for rows, length in [(2, 6), (0, 3), (3, 1), (1, 6)]:
        shape = list(base)
        shape[0], shape[absolute] = rows, length
        parts.append((rng.normal(size=shape) * 5).astype(dtype))
        skips.append(int(rng.integers(0, length + 1)))
    expected = reference_concatenate_padded(parts, absolute, skips, side == "right")
    for threads in (1, 2):
        restore_num_threads(threads)
        got = core.concatenate_padded(parts, axis, skips, side)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(core.concatenate_padded(parts[:1] * 2), np.concatenate(parts[:1] * 2))


def test_concatenate_padded_large_threaded_and_views(restore_num_threads: Callable[[int], None]) -> None:
    """A KV cache's join (about 8 MB, over the threading threshold) split over threads equals one thread and
    the reference; views (a row range, a transposed array) and mixed dtypes are copied as np.concatenate
    would take them."""
    rng = np.random.default_rng(27)
    old = rng.normal(size=(90, 1, 2, 115, 16)).astype(np.float32)
    new = rng.normal(size=(8, 1, 2, 35, 16)).astype(np.float32)
    expected = reference_concatenate_padded([old[10:], new], 3, [10, 0])
    right = reference_concatenate_padded([old[10:], new], 3, [10, 0], right=True)
    for threads in (1, 2):
        restore_num_threads(threads)
        np.testing.assert_array_equal(core.concatenate_padded([old[10:], new], 3, [10, 0]), expected)
        np.testing.assert_array_equal(core.concatenate_padded([old[10:], new], 3, [10, 0], "right"), right)
    ragged = rng.normal(size=(3, 4)).T  # (4, 3), not C-contiguous
    mixed = core.concatenate_padded([ragged, np.arange(6, dtype=np.int32).reshape(2, 3)])
    np.testing.assert_array_equal(mixed, np.concatenate([ragged, np.arange(6).reshape(2, 3)]))
    assert mixed.dtype == np.float64


@pytest.mark.parametrize("axis", [1, 2, 3])
def test_concatenate_padded_with_used_copies_each_rows_own_columns(
    axis: int, restore_num_threads: Callable[[int], None]
) -> None:
    """With ``used`` (right padding), row ``i`` of the result takes the first ``min(used[i], kept)`` of
    its part's kept columns, as the reference has them, and its other columns are left as they were in
    ``out`` (a sentinel here): counts of 0, within and past the kept width, parts with skips; one thread
    or two (a join of over a megabyte)."""
    rng = np.random.default_rng(28)
    cases = [((3, 2, 4, 5), [(2, 6), (0, 3), (3, 1), (1, 6)]), ((5, 3, 40, 70), [(40, 60), (9, 25)])]
    for base, sizes in cases:
        parts, skips = [], []
        for rows, length in sizes:
            shape = list(base)
            shape[0], shape[axis] = rows, length
            parts.append(rng.normal(size=shape).astype(np.float32))
            skips.append(int(rng.integers(0, length // 2 + 1)))
        expected = reference_concatenate_padded(parts, axis, skips, right=True)
        rows = expected.shape[0]
        kept = np.concatenate([np.full(p.shape[0], p.shape[axis] - k) for p, k in zip(parts, skips)])
        used = rng.integers(0, expected.shape[axis] + 3, size=rows)
        used[:1] = 0
        for threads in (1, 2):
            restore_num_threads(threads)
            out = np.full(expected.shape, -7.0, dtype=np.float32)
            before = used.copy()
            got = core.concatenate_padded(parts, axis, skips, "right", out=out, used=used)
            assert got is out
            np.testing.assert_array_equal(used, before)  # read, never written
            for row in range(rows):
                own = min(int(used[row]), int(kept[row]))
                index = (row, *(slice(None),) * (axis - 1))
                np.testing.assert_array_equal(
                    out[(*index, slice(0, own))], expected[(*index, slice(0, own))], err_msg=f"row {row}"
                )
                np.testing.assert_array_equal(out[(*index, slice(own, None))], -7.0, err_msg=f"row {row}")


def test_concatenate_padded_refuses_bad_used_leaving_out_as_it_was() -> None:
    a = np.ones((2, 3, 4))
    out = np.full((4, 3, 4), 5.0)
    cases: list[tuple[Any, str, Any]] = [
        ([1, 2, 3, 4], "used: only with an axis and padding_side='right'", {"padding_side": "left"}),
        ([1, 2, 3, 4], "used: only with an axis", {"axis": None}),
        ([1, 2, 3], r"used: expected shape \(4,\) \(a count per row\), got \(3,\)", {}),
        ([[1, 2, 3, 4]], r"used: expected shape \(4,\)", {}),
        ([1, -1, 3, 4], "used: expected counts >= 0, got -1", {}),
    ]
    for used, message, options in cases:
        arguments = {"axis": 2, "padding_side": "right", **options}
        with pytest.raises(ValueError, match=message):
            core.concatenate_padded([a, a], out=out, used=used, **arguments)
    with pytest.raises(TypeError, match="used: expected integers, got float64"):
        core.concatenate_padded([a, a], 2, padding_side="right", out=out, used=[1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(out, 5.0)
    with pytest.raises(ValueError, match="used: only with right padding"):  # the binding checks it too
        _core.concatenate_padded([a, a], [4, 4], [0, 0], out, 3, 8, False, np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="used: expected counts >= 0, got -2 at row 1"):
        _core.concatenate_padded([a, a], [4, 4], [0, 0], out, 3, 8, True, np.array([0, -2, 0, 0]))
    np.testing.assert_array_equal(out, 5.0)


def test_concatenate_padded_refuses_bad_arguments_naming_them() -> None:
    a = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="parts: expected at least one"):
        core.concatenate_padded([])
    with pytest.raises(ValueError, match=r"parts\[1\]: shape \(2, 4, 4\) differs"):
        core.concatenate_padded([a, np.zeros((2, 4, 4))], axis=2)
    with pytest.raises(ValueError, match=r"parts\[1\]: 2 axes"):
        core.concatenate_padded([a, np.zeros((2, 3))])
    with pytest.raises(ValueError, match="axis: expected an axis of the 3 other than the first"):
        core.concatenate_padded([a], axis=0)
    with pytest.raises(ValueError, match="axis: expected"):
        core.concatenate_padded([a], axis=3)
    with pytest.raises(ValueError, match=r"skips\[0\]: expected 0 <= skip <= 4, got 5"):
        core.concatenate_padded([a], axis=2, skips=[5])
    with pytest.raises(ValueError, match="skips: expected one per part"):
        core.concatenate_padded([a, a], axis=2, skips=[0])
    with pytest.raises(ValueError, match="skips: need an axis"):
        core.concatenate_padded([a], skips=[1])
    with pytest.raises(ValueError, match="padding_side: expected 'left' or 'right', got 'top'"):
        core.concatenate_padded([a], axis=2, padding_side="top")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"parts\[0\]: dtype object"):
        core.concatenate_padded([np.array([[None]], dtype=object)])
    with pytest.raises(ValueError, match=r"parts\[0\]: expected at least one axis"):
        core.concatenate_padded([np.float64(1.0)])


@pytest.mark.parametrize("side", ["left", "right"])
def test_concatenate_padded_writes_into_out(side: Literal["left", "right"]) -> None:
    """``out`` wider than the longest part: the parts padded to its width on their side, written there and
    returned; the rows of a larger array's view (a batch's spare rows) written, the others left."""
    rng = np.random.default_rng(3)
    parts = [rng.normal(size=(2, 3, 4, 2)), rng.normal(size=(1, 3, 2, 2))]
    whole = np.full((5, 3, 6, 2), 7.0)
    out = whole[1:4]
    got = core.concatenate_padded(parts, 2, padding_side=side, out=out)
    assert got is out
    expected = reference_concatenate_padded(parts, 2, [0, 0], side == "right")
    columns = slice(0, 4) if side == "right" else slice(2, 6)
    np.testing.assert_array_equal(out[:, :, columns], expected)
    np.testing.assert_array_equal(out[:, :, 4:] if side == "right" else out[:, :, :2], 0.0)
    np.testing.assert_array_equal(whole[[0, 4]], 7.0)


def test_concatenate_padded_refuses_an_out_it_cannot_write() -> None:
    a = np.zeros((2, 3, 4))
    with pytest.raises(TypeError, match="out: expected a numpy array of dtype float64"):
        core.concatenate_padded([a], axis=2, out=np.zeros((2, 3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 3, 4\) \(at least 4 wide on axis 2\)"):
        core.concatenate_padded([a], axis=2, out=np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match=r"out: expected shape \(3, 3, 5\)"):
        core.concatenate_padded([a, a[:1]], axis=2, out=np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="out: must be C-contiguous and writeable"):
        core.concatenate_padded([a], axis=2, out=np.zeros((2, 3, 8))[:, :, ::2])
    locked = np.zeros((2, 3, 4))
    locked.flags.writeable = False
    with pytest.raises(ValueError, match="out: must be C-contiguous and writeable"):
        core.concatenate_padded([a], axis=2, out=locked)
    shared = np.zeros((4, 3, 4))
    with pytest.raises(ValueError, match=r"out: overlaps parts\[0\]"):
        core.concatenate_padded([shared[:2]], axis=2, out=shared[1:3])
    np.testing.assert_array_equal(shared, 0.0)  # a refused call writes nothing
