"""Property tests: random shapes, dtypes and values thrown at every kernel of ``tiltsmc.core``.

Each example predicts from the spec whether the call must succeed or must raise; a call that must
succeed is checked for a valid result (shapes, dtypes, indices in range and ascending, weight-zero
particles never chosen, rows normalised), a call that must fail must raise ``ValueError``/``TypeError``
(and leave ``out``/``x`` untouched for ``gather``). Any other exception, or a crash, fails the test.

Runs are deterministic (``derandomize=True``, no example database).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tiltsmc import core

SCHEMES = ("multinomial", "stratified", "systematic", "residual")
NINF = -np.inf

PROPERTY_SETTINGS = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

ERRORS = (ValueError, TypeError)
ARGUMENT_NAME = re.compile(
    r"(logw|logits|temperature|scheme|num|rng|zero_rows|log_z_current|log_z_proposed|x|ancestors|out"
    r"|arrays(\[\d+\])?): "
)
# What a call must do: succeed (None), raise one of the given types, or either ("either": not specified).
Expectation = Any


def call(fn: Callable[[], Any]) -> tuple[Any, Optional[BaseException]]:
    """Run fn; return (result, None) or (None, the ValueError/TypeError it raised). Other errors propagate."""
    try:
        return fn(), None
    except ERRORS as error:
        return None, error


def check_outcome(error: Optional[BaseException], expected: Expectation) -> bool:
    """Assert the outcome matches the expectation; return True when a result must be validated."""
    event("succeeded" if error is None else f"raised {type(error).__name__}")
    if error is not None:
        assert ARGUMENT_NAME.match(str(error)), (
            f"the message does not start with the argument's name: {error}"
        )
    if expected == "either":
        return error is None
    if expected is None:
        assert error is None, f"unexpected {type(error).__name__}: {error}"
        return True
    assert error is not None, f"expected {expected} but the call succeeded"
    assert isinstance(error, expected), f"expected {expected}, got {type(error).__name__}: {error}"
    return False


def coin(draw: st.DrawFn, probability: float) -> bool:
    """A biased coin from a drawn seed (Hypothesis' own small integers favour 0, so ``integers(0, 9) == 0``
    would come up far more often than one time in ten)."""
    return bool(np.random.default_rng(draw(st.integers(0, 2**32 - 1))).random() < probability)


# --------------------------------------------------------------------------------------------------------
# Log-weight inputs
# --------------------------------------------------------------------------------------------------------

FLOAT_DTYPES = (np.float32, np.float64)
INVALID_DTYPES = (np.int32, np.int64, np.uint8, np.bool_, np.complex128, np.complex64, object)
FINITE = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False)
LOG_VALUE = st.one_of(FINITE, FINITE, FINITE, FINITE, st.just(NINF))


@st.composite
def logw_arrays(draw: st.DrawFn) -> np.ndarray:
    """Mostly valid float32/float64 (B, N) or (N,) arrays; sometimes NaN/+inf, bad dtypes or bad ndim."""
    b = draw(st.integers(0, 5))
    n = draw(st.integers(1, 40))
    layout = (
        draw(st.sampled_from(["2d", "1d"]))
        if coin(draw, 0.9)
        else draw(st.sampled_from(["0d", "3d", "empty-row"]))
    )
    shape = {"2d": (b, n), "1d": (n,), "0d": (), "3d": (2, b, n), "empty-row": (b, 0)}[layout]
    values = draw(hnp.arrays(np.float64, shape, elements=LOG_VALUE if coin(draw, 0.7) else FINITE))
    if values.ndim and values.size and coin(draw, 0.1):  # a whole row of zero weights
        values.reshape(-1, shape[-1])[draw(st.integers(0, values.size // shape[-1] - 1))] = NINF
    if values.size and coin(draw, 0.1):  # occasionally NaN or +inf somewhere
        values.reshape(-1)[draw(st.integers(0, values.size - 1))] = draw(st.sampled_from([np.nan, np.inf]))
    dtype = draw(st.sampled_from(FLOAT_DTYPES)) if coin(draw, 0.8) else draw(st.sampled_from(INVALID_DTYPES))
    if dtype in FLOAT_DTYPES:
        x = values.astype(dtype)
    elif dtype is object:
        x = values.astype(object)
    else:
        x = np.zeros(shape, dtype=dtype)
    if x.ndim == 2 and draw(st.booleans()):  # non-contiguous layouts are accepted (copied)
        x = np.asfortranarray(x) if draw(st.booleans()) else x[:, ::-1]
    return x


def logw_problem(x: np.ndarray, zero_rows_raise: bool = True) -> Expectation:
    """What the spec says a log-weight kernel must do with x."""
    bad_dtype = x.dtype not in (np.float32, np.float64)
    bad_shape = x.ndim not in (1, 2) or x.shape[-1] == 0
    if bad_dtype and bad_shape:
        return ERRORS
    if bad_dtype:
        return TypeError
    if bad_shape:
        return ValueError
    rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
    if np.isnan(rows).any() or np.isposinf(rows).any():
        return ValueError
    if zero_rows_raise and np.isneginf(rows).all(axis=1).any():
        return ValueError
    return None


def reference(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Float64 normalised log-weights, log mean weight, ess and weights of rows with a positive weight."""
    top = rows.max(axis=1, keepdims=True)
    shifted = np.exp(rows - top)
    total = shifted.sum(axis=1)
    lse = top[:, 0] + np.log(total)
    ess = total**2 / (shifted**2).sum(axis=1)
    return rows - lse[:, None], lse - math.log(rows.shape[1]), ess, shifted / total[:, None]


def scale_of(rows: np.ndarray) -> float:
    finite = rows[np.isfinite(rows)]
    return max(1.0, float(np.abs(finite).max())) if finite.size else 1.0


@PROPERTY_SETTINGS
@given(x=logw_arrays(), report=st.booleans())
def test_log_normalize_property(x: np.ndarray, report: bool) -> None:
    zero_rows = "report" if report else "raise"
    result, error = call(lambda: core.log_normalize(x, zero_rows=zero_rows))
    if not check_outcome(error, logw_problem(x, zero_rows_raise=not report)):
        return
    normalised, log_mean_w, ess = result
    assert normalised.dtype == x.dtype and normalised.shape == x.shape
    assert log_mean_w.dtype == np.float64 and ess.dtype == np.float64
    assert log_mean_w.shape == ess.shape == x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
    out_rows = normalised.reshape(rows.shape).astype(np.float64)
    lmw, es = log_mean_w.reshape(-1), ess.reshape(-1)
    zero = np.isneginf(rows).all(axis=1)
    assert np.all(np.isneginf(out_rows[zero])) and np.all(np.isneginf(lmw[zero])) and np.all(es[zero] == 0)
    live = ~zero
    if not live.any():
        return
    rows, out_rows, lmw, es = rows[live], out_rows[live], lmw[live], es[live]
    ref_norm, ref_lmw, ref_ess, _ = reference(rows)
    scale = scale_of(rows)
    eps = 1e-6 if x.dtype == np.float32 else 1e-12
    np.testing.assert_array_equal(np.isneginf(out_rows), np.isneginf(rows))
    np.testing.assert_allclose(out_rows, ref_norm, rtol=eps, atol=eps * scale)
    np.testing.assert_allclose(lmw, ref_lmw, rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(es, ref_ess, rtol=1e-10)
    assert np.all(es >= 1 - 1e-12) and np.all(es <= rows.shape[1] * (1 + 1e-12))
    np.testing.assert_allclose(np.logaddexp.reduce(out_rows, axis=1), 0.0, atol=10 * eps * scale)


NUMS = st.one_of(st.none(), st.integers(1, 80), st.integers(1, 80), st.sampled_from([0, -1, 2.0, True, "4"]))
SCHEME_ARG = st.sampled_from([*SCHEMES, *SCHEMES, "bogus"])


@PROPERTY_SETTINGS
@given(x=logw_arrays(), scheme=SCHEME_ARG, num=NUMS, seed=st.integers(0, 2**32))
def test_resample_property(x: np.ndarray, scheme: str, num: Any, seed: int) -> None:
    result, error = call(lambda: core.resample(x, scheme, num=num, rng=seed))
    expected = logw_problem(x)
    num_bad = isinstance(num, (bool, str, float)) or (isinstance(num, int) and num < 1)
    if scheme not in SCHEMES or num_bad:
        expected = ERRORS  # which argument is reported first is not specified
    if not check_outcome(error, expected):
        return
    m = x.shape[-1] if num is None else num
    rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
    assert result.dtype == np.int64
    assert result.shape == (*x.shape[:-1], m)
    ancestors = result.reshape(-1, m)
    assert np.all(ancestors >= 0) and np.all(ancestors < x.shape[-1])
    assert np.all(np.diff(ancestors, axis=1) >= 0)
    assert np.all(np.take_along_axis(rows, ancestors, axis=1) > NINF)
    if rows.shape[0] == 0:
        return
    w = reference(rows)[3]
    expected_counts = m * w
    lo, hi = np.floor(expected_counts - 1e-9), np.ceil(expected_counts + 1e-9)
    counts = np.stack([np.bincount(a, minlength=x.shape[-1]) for a in ancestors])
    if scheme == "systematic":
        assert np.all((counts >= lo) & (counts <= hi))
    elif scheme == "stratified":
        assert np.all((counts >= lo - 1) & (counts <= hi + 1))
    elif scheme == "residual":
        assert np.all(counts >= lo)
    # Same seed, same result.
    np.testing.assert_array_equal(core.resample(x, scheme, num=num, rng=seed), result)


@PROPERTY_SETTINGS
@given(x=logw_arrays(), seed=st.integers(0, 2**32))
def test_pool_select_property(x: np.ndarray, seed: int) -> None:
    result, error = call(lambda: core.pool_select(x, rng=seed))
    if not check_outcome(error, logw_problem(x)):
        return
    index, log_mean_w = result
    assert index.dtype == np.int64 and log_mean_w.dtype == np.float64
    assert index.shape == log_mean_w.shape == x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
    flat = index.reshape(-1)
    assert np.all((flat >= 0) & (flat < x.shape[-1]))
    assert np.all(rows[np.arange(rows.shape[0]), flat] > NINF)
    if rows.shape[0]:
        scale = scale_of(rows)
        np.testing.assert_allclose(log_mean_w.reshape(-1), reference(rows)[1], rtol=1e-12, atol=1e-12 * scale)


@PROPERTY_SETTINGS
@given(x=logw_arrays(), seed=st.integers(0, 2**32), temperature=st.sampled_from([1.0, 0.5, 2.0, 1e-3]))
def test_sample_logits_property(x: np.ndarray, seed: int, temperature: float) -> None:
    result, error = call(lambda: core.sample_logits(x, temperature, rng=seed))
    if not check_outcome(error, logw_problem(x)):
        return
    index, log_prob = result
    assert index.dtype == np.int64 and log_prob.dtype == np.float64
    assert index.shape == log_prob.shape == x.shape[:-1]
    scores = x.reshape(-1, x.shape[-1]).astype(np.float64)
    if temperature != 1.0:
        scores = scores / temperature
    # The same draw as pool_select on the float64 scores, and log p(v) to within rounding of the exact value.
    same_index, _ = core.pool_select(scores, rng=seed)
    np.testing.assert_array_equal(index.reshape(-1), same_index)
    assert_exact_log_probs(scores, same_index, log_prob.reshape(-1))


def assert_exact_log_probs(scores: np.ndarray, index: np.ndarray, log_prob: np.ndarray) -> None:
    """log_prob[r] is log softmax(scores[r])[index[r]], never positive, within a few ulps of its terms (a
    long-double reference: (s_v - max s) - log sum exp(s - max s), with log1p where the sum is near 1)."""
    assert np.all(log_prob <= 0.0), log_prob[log_prob > 0.0]
    if not scores.size:
        return
    s = scores.astype(np.longdouble)
    shift = s.max(axis=1, keepdims=True)
    terms = np.exp(s - shift)
    rows = np.arange(s.shape[0])
    d = s[rows, index] - shift[:, 0]
    log_sum = np.log(terms.sum(axis=1))
    others = terms.copy()
    others[rows, index] = 0
    rest = others.sum(axis=1)  # where v is a maximum: the other terms (its own is exp(0) = 1)
    expected = np.where(d == 0, -np.log1p(rest), d - log_sum)
    eps = np.finfo(np.float64).eps
    # s_j - max s rounds to within eps/2 of |s_j - max s|, which exp turns into a relative error of that
    # size in term j: log sum exp carries the terms' weighted mean of it (the case [5.2e-09, 18.0] in
    # float32: log p = -log1p(exp(-18)) off by 8 ulps, all from rounding 5.2e-09 - 18).
    # (a maximum's term is exp(0) = 1 exactly; a term of weight zero adds nothing)
    with np.errstate(invalid="ignore"):
        term_errors = np.where((terms > 0) & (s != shift), terms * (np.abs(s - shift) + 1), 0)
    shifted_rounding = term_errors.sum(axis=1) / terms.sum(axis=1)
    tolerance = (
        4 * eps * (np.abs(d) + shifted_rounding + scores.shape[1] * np.maximum(log_sum, np.abs(expected)))
        + 1e-300
    )
    error = np.abs(log_prob.astype(np.longdouble) - expected)
    assert np.all(error <= tolerance), (log_prob, expected.astype(np.float64), tolerance)


# --------------------------------------------------------------------------------------------------------
# mh_accept
# --------------------------------------------------------------------------------------------------------

MH_VALUE = st.one_of(FINITE, FINITE, FINITE, st.just(NINF))
MH_DTYPES = (np.float64, np.float32, np.int64, np.complex128, np.bool_, object)


@st.composite
def mh_pair(draw: st.DrawFn) -> tuple[Any, Any]:
    shape = draw(st.sampled_from([(), (1,), (2,), (5,), (0,), (2, 2)]))
    other = shape if coin(draw, 0.8) else draw(st.sampled_from([(), (1,), (3,), (2, 2)]))
    pair = []
    for s in (shape, other):
        values = draw(hnp.arrays(np.float64, s, elements=MH_VALUE))
        if values.size and coin(draw, 0.05):
            values.reshape(-1)[draw(st.integers(0, values.size - 1))] = draw(
                st.sampled_from([np.nan, np.inf])
            )
        dtype = np.float64 if coin(draw, 0.6) else draw(st.sampled_from(MH_DTYPES))
        if dtype is np.bool_:
            pair.append(values > 0)
        elif dtype is np.int64:
            pair.append(np.where(np.isfinite(values), values, 0.0).astype(np.int64))
        else:
            pair.append(values.astype(dtype))
    return pair[0], pair[1]


def mh_problem(current: np.ndarray, proposed: np.ndarray) -> Expectation:
    if any(a.dtype.kind not in "fiu" for a in (current, proposed)):
        return ERRORS
    if current.ndim > 1 or proposed.ndim > 1:
        return ValueError
    if current.shape != proposed.shape:
        return ValueError
    values = np.concatenate([current.reshape(-1), proposed.reshape(-1)]).astype(np.float64)
    if np.isnan(values).any() or np.isposinf(values).any():
        return ValueError
    if current.size == 0:
        return "either"  # zero rows: not specified
    return None


@PROPERTY_SETTINGS
@given(pair=mh_pair(), seed=st.integers(0, 2**32))
def test_mh_accept_property(pair: tuple[np.ndarray, np.ndarray], seed: int) -> None:
    current, proposed = pair
    result, error = call(lambda: core.mh_accept(current, proposed, rng=seed))
    if not check_outcome(error, mh_problem(current, proposed)):
        return
    assert result.dtype == np.bool_ and result.shape == current.shape
    c = current.astype(np.float64).reshape(-1)
    p = proposed.astype(np.float64).reshape(-1)
    accept = result.reshape(-1)
    with np.errstate(invalid="ignore"):
        diff = p - c
    assert np.all(accept[np.isneginf(c)])
    assert not np.any(accept[~np.isneginf(c) & np.isneginf(p)])
    finite = np.isfinite(c) & np.isfinite(p)
    assert np.all(accept[finite & (diff >= 0)])
    assert not np.any(accept[finite & (diff < -800)])


# --------------------------------------------------------------------------------------------------------
# gather
# --------------------------------------------------------------------------------------------------------

TRAILING = [(), (), (2,), (1, 3), (3, 1, 2), (0,), (2, 0)]  # with zero-byte items
GATHER_DTYPES = [
    np.dtype(np.bool_),
    np.dtype(np.int8),
    np.dtype(np.uint16),
    np.dtype(np.float32),
    np.dtype(np.float64),
    np.dtype(np.complex64),
    np.dtype("S5"),
    np.dtype("datetime64[s]"),
    np.dtype([("a", "<i2"), ("b", "<f4", (3,))]),
    np.dtype(">i4"),
    np.dtype([]),  # itemsize 0
]
INDEX_DTYPES = [np.int64, np.int64, np.int32, np.int8, np.uint64, np.uint32]


@st.composite
def gather_case(draw: st.DrawFn) -> dict[str, Any]:
    one_d = draw(st.booleans())
    b = 1 if one_d else draw(st.integers(0, 5))
    n = draw(st.integers(0, 40)) if coin(draw, 0.05) else draw(st.integers(1, 40))
    mode = draw(st.sampled_from(["new", "new", "out", "in-place"]))
    m = n if mode == "in-place" and coin(draw, 0.85) else draw(st.integers(0, 80))
    trailing = draw(st.sampled_from(TRAILING))
    dtype = draw(st.sampled_from(GATHER_DTYPES))
    seed = draw(st.integers(0, 2**32))
    rng = np.random.default_rng(seed)
    x_shape = (n, *trailing) if one_d else (b, n, *trailing)
    count = int(np.prod(x_shape, dtype=np.int64))
    raw = rng.integers(0, 256, size=count * dtype.itemsize, dtype=np.uint8)
    if dtype == np.bool_:
        raw %= 2
    x = raw.view(dtype).reshape(x_shape) if dtype.itemsize else np.zeros(x_shape, dtype=dtype)
    index_dtype = draw(st.sampled_from(INDEX_DTYPES))
    unsigned = np.dtype(index_dtype).kind == "u"
    anc_rows = b if coin(draw, 0.9) else draw(st.integers(0, 6))
    a_shape = (m,) if one_d else (anc_rows, m)
    ancestors = rng.integers(0, max(n, 1), size=a_shape)
    if ancestors.size and coin(draw, 0.25):  # one out-of-range index
        bad = draw(st.sampled_from([n, n + 3] if unsigned else [-1, -3, n, n + 3]))
        ancestors.reshape(-1)[draw(st.integers(0, ancestors.size - 1))] = bad
    return {"x": x, "ancestors": ancestors.astype(index_dtype), "mode": mode, "one_d": one_d}


def gather_problem(x: np.ndarray, ancestors: np.ndarray, mode: str, one_d: bool) -> Expectation:
    n = x.shape[0] if one_d else x.shape[1]
    rows = 1 if one_d else x.shape[0]
    if not one_d and ancestors.shape[0] != rows:
        return ValueError
    if n == 0:
        return ValueError if ancestors.size else "either"  # no particle to copy / nothing to check
    if mode == "in-place" and ancestors.shape[-1] != n:
        return ValueError
    a = ancestors.astype(np.int64)
    if np.any((a < 0) | (a >= n)):
        return ValueError
    return None


@PROPERTY_SETTINGS
@given(case=gather_case())
def test_gather_property(case: dict[str, Any]) -> None:
    x, ancestors, mode, one_d = case["x"], case["ancestors"], case["mode"], case["one_d"]
    original = x.copy()
    target: Optional[np.ndarray] = None
    if mode == "in-place":
        target = x
    elif mode == "out":
        out_shape = (ancestors.shape[-1], *x.shape[1:]) if one_d else (*ancestors.shape, *x.shape[2:])
        target = np.zeros(out_shape, dtype=x.dtype)
        target.reshape(-1).view(np.uint8)[:] = 0xA5  # a sentinel pattern
    sentinel = None if target is None else target.copy()
    result, error = call(lambda: core.gather(x, ancestors, out=target))
    expected = gather_problem(x, ancestors, mode, one_d)
    if not check_outcome(error, expected):
        if error is not None:
            assert original.tobytes() == x.tobytes(), "x changed by a failed gather"
            if sentinel is not None and mode == "out":
                assert sentinel.tobytes() == target.tobytes(), "out written by a failed gather"
        return
    a = ancestors.astype(np.int64)
    if one_d:
        want = original[a]
    else:
        want = original[np.arange(original.shape[0])[:, None], a]
    assert result.dtype == x.dtype and result.shape == want.shape
    assert result.tobytes() == want.tobytes()
    if target is not None:
        assert result is target
    if mode != "in-place":
        assert original.tobytes() == x.tobytes(), "x changed by an out-of-place gather"


# --------------------------------------------------------------------------------------------------------
# Thread count never changes a result (small and medium random shapes)
# --------------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(
    b=st.integers(1, 64),
    n=st.integers(1, 3000),
    scheme=st.sampled_from(SCHEMES),
    seed=st.integers(0, 2**32),
)
def test_thread_count_property(b: int, n: int, scheme: str, seed: int) -> None:
    x = np.random.default_rng(seed).normal(size=(b, n)) * 4
    x[:, n // 2] = 0.0
    saved = core.get_num_threads()
    try:
        outcomes = []
        for threads in (1, 3):
            core.set_num_threads(threads)
            outcomes.append(
                (
                    core.resample(x, scheme, num=n + 1, rng=seed),
                    *core.log_normalize(x),
                    *core.pool_select(x, rng=seed),
                )
            )
    finally:
        core.set_num_threads(saved)
    for first, second in zip(*outcomes):
        np.testing.assert_array_equal(first, second)


# --------------------------------------------------------------------------------------------------------
# reorder_in_place and keep_survivors
# --------------------------------------------------------------------------------------------------------


@st.composite
def reorder_case(draw: st.DrawFn) -> dict[str, Any]:
    b, n = draw(st.integers(0, 4)), draw(st.integers(1, 30))
    seed = draw(st.integers(0, 2**32))
    rng = np.random.default_rng(seed)
    arrays = []
    for _ in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(GATHER_DTYPES))
        trailing = draw(st.sampled_from(TRAILING))
        lead = (b, n) if coin(draw, 0.9) else draw(st.sampled_from([(b, n + 1), (b + 1, n), (n,)]))
        shape = (*lead, *trailing)
        count = int(np.prod(shape, dtype=np.int64))
        raw = rng.integers(0, 256, size=count * dtype.itemsize, dtype=np.uint8)
        if dtype == np.bool_:
            raw %= 2
        x = raw.view(dtype).reshape(shape) if dtype.itemsize else np.zeros(shape, dtype=dtype)
        flaw = draw(st.sampled_from(["none"] * 8 + ["read-only", "strided", "list"]))
        if flaw == "read-only":
            x.flags.writeable = False
        elif flaw == "strided" and x.ndim >= 2 and x.shape[1] > 1:
            x = np.repeat(x, 2, axis=1)[:, ::2]
        arrays.append(x.tolist() if flaw == "list" else x)
    ancestors = rng.integers(0, n, size=(b, n))
    if ancestors.size and coin(draw, 0.2):
        bad = draw(st.sampled_from([-1, n, n + 5]))
        ancestors.reshape(-1)[draw(st.integers(0, ancestors.size - 1))] = bad
    return {"arrays": arrays, "ancestors": ancestors}


def reorder_problem(arrays: list[Any], ancestors: np.ndarray) -> Expectation:
    b, n = ancestors.shape
    for x in arrays:
        if not isinstance(x, np.ndarray):
            return TypeError
        if x.ndim < 2 or x.shape[:2] != (b, n) or not x.flags.c_contiguous or not x.flags.writeable:
            return ValueError
    if np.any((ancestors < 0) | (ancestors >= n)):
        return ValueError
    return None


@PROPERTY_SETTINGS
@given(case=reorder_case())
def test_reorder_in_place_property(case: dict[str, Any]) -> None:
    arrays, ancestors = case["arrays"], case["ancestors"]
    originals = [x.copy() if isinstance(x, np.ndarray) else None for x in arrays]
    _, error = call(lambda: core.reorder_in_place(arrays, ancestors))
    expected = reorder_problem(arrays, ancestors)
    if not check_outcome(error, expected):
        for x, original in zip(arrays, originals):
            if original is not None:
                assert original.tobytes() == x.tobytes(), "an array changed by a failed reorder_in_place"
        return
    rows = np.arange(ancestors.shape[0])[:, None]
    for x, original in zip(arrays, originals):
        assert original is not None
        assert x.tobytes() == original[rows, ancestors].tobytes()


@PROPERTY_SETTINGS
@given(
    ancestors=hnp.arrays(
        np.int64,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=12),
        elements=st.integers(-2, 13),
    )
)
def test_keep_survivors_property(ancestors: np.ndarray) -> None:
    original = ancestors.copy()
    arranged, error = call(lambda: core.keep_survivors(ancestors))
    n = ancestors.shape[1]
    bad = n == 0 or bool(np.any((ancestors < 0) | (ancestors >= n)))
    assert np.array_equal(ancestors, original), "keep_survivors changed its input"
    if not check_outcome(error, ValueError if bad else None):
        return
    assert arranged.shape == ancestors.shape and arranged.dtype == np.int64
    for before, after in zip(ancestors, arranged):
        np.testing.assert_array_equal(np.bincount(after, minlength=n), np.bincount(before, minlength=n))
        survivors = np.unique(before)
        np.testing.assert_array_equal(after[survivors], survivors)
