"""The core's token-sequence kernels against numpy references, with random shapes and contents, and
their refusals of bad input (the argument named, nothing written).

Also the options of the step kernels that the samplers and models use on every step: ``sample_logits``'s
``where``, ``smc_step``'s ``survivors_stay`` and ``reorder_in_place`` given one array twice.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiltsmc import core
from tiltsmc._rng import RowStreams
from tiltsmc.samplers.runs import increment_standard_error

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# -- append_tokens ----------------------------------------------------------------------------------------


def _append_reference(
    tokens: np.ndarray,
    lengths: np.ndarray,
    finished: np.ndarray,
    new: np.ndarray,
    active: np.ndarray,
    stop_ids: np.ndarray,
    max_length: int,
) -> np.ndarray:
    """The spec in numpy, in place; returns ``still``."""
    b_index, i_index = np.nonzero(active)
    tokens[b_index, i_index, lengths[b_index, i_index]] = new[b_index, i_index]
    lengths[b_index, i_index] += 1
    finished |= active & ((lengths >= max_length) | np.isin(new, stop_ids))
    return active & ~finished


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    batch=st.integers(1, 3),
    count=st.integers(1, 6),
    capacity=st.integers(1, 6),
    max_length=st.integers(1, 8),
    num_stop=st.integers(0, 3),
)
def test_append_tokens_matches_reference(
    seed: int, batch: int, count: int, capacity: int, max_length: int, num_stop: int
) -> None:
    rng = np.random.default_rng(seed)
    limit = min(capacity, max_length)
    lengths = rng.integers(0, capacity + 1, size=(batch, count))
    finished = rng.random((batch, count)) < 0.3
    active = ~finished & (rng.random((batch, count)) < 0.8)
    tokens = rng.integers(0, 9, size=(batch, count, capacity))
    new = rng.integers(0, 9, size=(batch, count))
    stop_ids = rng.choice(9, size=num_stop, replace=False).astype(np.int64)
    arrays = (tokens.copy(), lengths.copy(), finished.copy())
    if np.any(active & (lengths >= limit)):  # an active trajectory with no room: refused, nothing written
        with pytest.raises(ValueError, match=r"lengths: trajectory \d+ is already \d+ tokens long"):
            core.append_tokens(*arrays, new, active, stop_ids, max_length)
        for before, after in zip((tokens, lengths, finished), arrays):
            np.testing.assert_array_equal(before, after)
        return
    still, going = core.append_tokens(*arrays, new, active, stop_ids, max_length)
    expected = _append_reference(tokens, lengths, finished, new, active, stop_ids, max_length)
    for want, got in zip((tokens, lengths, finished), arrays):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(still, expected)
    assert still.shape == (batch, count) and still.dtype == bool and going == int(expected.sum())


def test_append_tokens_refuses_bad_arrays() -> None:
    tokens, lengths = np.zeros((2, 3, 4), dtype=np.int64), np.zeros((2, 3), dtype=np.int64)
    finished, active, new = np.zeros((2, 3), bool), np.ones((2, 3), bool), np.ones((2, 3), np.int64)
    stop = np.zeros(0, dtype=np.int64)
    with pytest.raises(TypeError, match="tokens: expected dtype int64"):
        core.append_tokens(tokens.astype(np.int32), lengths, finished, new, active, stop, 4)
    with pytest.raises(ValueError, match="tokens: expected lengths' shape"):
        core.append_tokens(tokens[:1], lengths, finished, new, active, stop, 4)
    with pytest.raises(ValueError, match="finished: must be writeable"):
        readonly = finished.copy()
        readonly.flags.writeable = False
        core.append_tokens(tokens, lengths, readonly, new, active, stop, 4)
    with pytest.raises(ValueError, match="new_tokens: expected as many entries"):
        core.append_tokens(tokens, lengths, finished, new[:1], active, stop, 4)
    with pytest.raises(ValueError, match="active: must be C-contiguous"):
        core.append_tokens(tokens, lengths, finished, new, np.ones((3, 2), bool).T, stop, 4)
    with pytest.raises(ValueError, match="max_length"):
        core.append_tokens(tokens, lengths, finished, new, active, stop, 0)
    with pytest.raises(ValueError, match=r"lengths: trajectory 0 is already -1 tokens long"):
        core.append_tokens(tokens, np.full((2, 3), -1, dtype=np.int64), finished, new, active, stop, 4)
    assert not tokens.any() and not finished.any()


# -- decode_inputs ----------------------------------------------------------------------------------------


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(0, 7), width=st.integers(0, 6))
def test_decode_inputs_matches_reference(seed: int, rows: int, width: int) -> None:
    rng = np.random.default_rng(seed)
    mask = (rng.random((rows, width)) < 0.7).astype(np.int64)
    still = rng.random(rows) < 0.6
    new = rng.integers(1, 50, size=rows)
    input_ids, attention_mask, position_ids = core.decode_inputs(mask, still, new, pad=0)
    np.testing.assert_array_equal(input_ids, np.where(still, new, 0)[:, None])
    np.testing.assert_array_equal(attention_mask, np.concatenate([mask, still[:, None]], axis=1))
    np.testing.assert_array_equal(position_ids, mask.sum(axis=1, keepdims=True))
    assert input_ids.dtype == attention_mask.dtype == position_ids.dtype == np.int64


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(0, 7), width=st.integers(0, 6))
def test_decode_inputs_right_padded_matches_reference(seed: int, rows: int, width: int) -> None:
    """Each row's length is its mask's nonzero count (zeros anywhere in it, other nonzero values too):
    the session's mask covers length + 1 columns, the mask kept length + still, the position is the
    length."""
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, 3, size=(rows, width)) * (rng.random((rows, width)) < 0.7)
    still = rng.random(rows) < 0.6
    new = rng.integers(1, 50, size=rows)
    ids, feed_mask, positions, next_mask = core.decode_inputs_right_padded(mask, still, new, pad=7)
    lengths = np.count_nonzero(mask, axis=1)
    columns = np.arange(width + 1)
    np.testing.assert_array_equal(ids, np.where(still, new, 7)[:, None])
    np.testing.assert_array_equal(feed_mask, columns < (lengths + 1)[:, None])
    np.testing.assert_array_equal(next_mask, columns < (lengths + still)[:, None])
    np.testing.assert_array_equal(positions, lengths[:, None])
    assert ids.dtype == feed_mask.dtype == positions.dtype == next_mask.dtype == np.int64
    assert feed_mask.shape == next_mask.shape == (rows, width + 1)


def test_decode_inputs_refuses_bad_arrays() -> None:
    mask, still, new = np.ones((3, 2), np.int64), np.ones(3, bool), np.ones(3, np.int64)
    with pytest.raises(ValueError, match=r"mask: expected shape \(rows, width\)"):
        core.decode_inputs(mask[0], still, new, 0)
    with pytest.raises(ValueError, match="still: expected one entry per row"):
        core.decode_inputs(mask, still[:2], new, 0)
    with pytest.raises(TypeError, match="new_tokens: expected dtype int64"):
        core.decode_inputs(mask, still, new.astype(float), 0)
    for decode in (core.decode_inputs, core.decode_inputs_right_padded):
        with pytest.raises(ValueError, match=r"mask: expected shape \(rows, width\)"):
            decode(mask[0], still, new, 0)
        with pytest.raises(ValueError, match="new_tokens: expected one entry per row"):
            decode(mask, still, new[:1], 0)
        with pytest.raises(TypeError, match="still: expected dtype bool"):
            decode(mask, still.astype(np.int64), new, 0)


# -- right_padded_prefixes --------------------------------------------------------------------------------


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    batch=st.integers(1, 4),
    count=st.integers(1, 4),
    capacity=st.integers(0, 5),
    select=st.booleans(),
    with_positions=st.booleans(),
)
def test_right_padded_prefixes_match_reference(
    seed: int, batch: int, count: int, capacity: int, select: bool, with_positions: bool
) -> None:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, 30, size=int(rng.integers(0, 5))) for _ in range(batch)]
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in prompts])]).astype(np.int64)
    flat = np.concatenate(prompts).astype(np.int64)
    tokens = rng.integers(30, 60, size=(batch, count, capacity))
    lengths = rng.integers(0, capacity + 1, size=(batch, count))
    selected = rng.integers(0, batch * count, size=int(rng.integers(1, 7))) if select else None
    ids, mask, last, positions = core.right_padded_prefixes(
        flat, offsets, tokens, lengths, selected, pad=-1, with_positions=with_positions
    )
    particles = range(batch * count) if selected is None else selected
    rows = [
        np.concatenate([prompts[p // count], tokens[p // count, p % count, : lengths[p // count, p % count]]])
        for p in particles
    ]
    width = max(len(r) for r in rows)
    assert ids.shape == mask.shape == (len(rows), width) and ids.flags.c_contiguous
    for k, row in enumerate(rows):
        np.testing.assert_array_equal(ids[k], np.concatenate([row, np.full(width - len(row), -1)]))
        np.testing.assert_array_equal(mask[k], np.arange(width) < len(row))
        assert last[k] == len(row) - 1
        if with_positions:
            assert positions is not None
            np.testing.assert_array_equal(positions[k], np.minimum(np.arange(width), max(len(row) - 1, 0)))
    assert positions is None or with_positions


def test_right_padded_prefixes_refuse_bad_input() -> None:
    flat, offsets = np.arange(1, 4, dtype=np.int64), np.array([0, 1, 3], dtype=np.int64)
    tokens, lengths = np.zeros((2, 2, 3), np.int64), np.ones((2, 2), np.int64)
    call = core.right_padded_prefixes
    with pytest.raises(ValueError, match="prompt_offsets: expected B"):
        call(flat, offsets[:2], tokens, lengths)
    with pytest.raises(ValueError, match="prompt_offsets: the last offset"):
        call(flat, np.array([0, 1, 2], np.int64), tokens, lengths)
    with pytest.raises(ValueError, match="prompt_offsets: expected offsets ascending"):
        call(flat, np.array([0, 4, 3], np.int64), tokens, lengths)
    with pytest.raises(ValueError, match=r"selected: particle 4 at row 1 is outside \[0, B \* N\)"):
        call(flat, offsets, tokens, lengths, np.array([0, 4], np.int64))
    with pytest.raises(ValueError, match=r"lengths: 4 tokens at row 3 is outside \[0, 3\]"):
        call(flat, offsets, tokens, np.array([[1, 1], [1, 4]], np.int64))
    with pytest.raises(ValueError, match="tokens: expected shape"):
        call(flat, offsets, tokens[:1], lengths)


# -- read_log_values --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_read_log_values_match_numpy(dtype: type) -> None:
    rng = np.random.default_rng(3)
    scores = (rng.standard_normal((50, 7)) * 30).astype(dtype)
    scores[0, 6], scores[1, 6], scores[2, 6], scores[3, 6] = 0.0, -np.inf, np.inf, 800.0
    columns = rng.integers(0, 7, size=50)
    read = scores[np.arange(50), columns].astype(np.float64)
    # logit: bit for bit -logaddexp(0, -s), the samplers' old numpy path
    np.testing.assert_array_equal(
        core.read_log_values(scores, 50, columns, "logit"), -np.logaddexp(0.0, -read)
    )
    last = scores[:, -1].astype(np.float64)
    np.testing.assert_array_equal(core.read_log_values(scores, 50, None, "logit"), -np.logaddexp(0.0, -last))
    finite = np.where(np.isinf(read), 0.0, read)
    np.testing.assert_array_equal(
        core.read_log_values(np.where(np.isinf(scores), 0, scores).astype(dtype), 50, columns, "log_value"),
        finite,
    )
    probabilities = rng.random((50, 1)).astype(dtype)
    probabilities[0] = 0.0
    got = core.read_log_values(probabilities, 50, None, "prob")
    with np.errstate(divide="ignore"):
        want = np.log(probabilities[:, 0].astype(np.float64))
    assert got[0] == -np.inf
    np.testing.assert_array_max_ulp(got[1:], want[1:], maxulp=1)  # the C library's log or numpy's


def test_read_log_values_refuse_bad_scores() -> None:
    scores = np.zeros((4, 3))
    with pytest.raises(ValueError, match="scores: NaN at row 2, column 1"):
        core.read_log_values(
            np.where(np.arange(12).reshape(4, 3) == 7, np.nan, scores), 4, np.ones(4, np.int64)
        )
    with pytest.raises(ValueError, match=r"scores: a log-value of \+inf at row 0"):
        core.read_log_values(np.full((4, 1), np.inf), 4, None, "log_value")
    with pytest.raises(ValueError, match=r"scores: a probability outside \[0, 1\] at row 3"):
        core.read_log_values(np.array([0.1, 0.2, 0.3, 1.5]), 4, None, "prob")
    with pytest.raises(ValueError, match="columns: out of range at row 0, column 3"):
        core.read_log_values(scores, 4, np.full(4, 3, np.int64))
    with pytest.raises(ValueError, match="columns: expected one column per row"):
        core.read_log_values(scores, 4, np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="scores: expected rows x width"):
        core.read_log_values(scores, 5)
    with pytest.raises(TypeError, match="scores: expected float32 or float64"):
        core.read_log_values(scores.astype(np.float16), 4)
    with pytest.raises(ValueError, match="kind: expected one of"):
        core.read_log_values(scores, 4, None, "odds")  # type: ignore[arg-type]


# -- options of the step kernels --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sample_logits_where_draws_only_marked_rows(dtype: type) -> None:
    logits = np.random.default_rng(4).standard_normal((40, 11)).astype(dtype)
    where = np.random.default_rng(5).random(40) < 0.5
    all_index, all_log_p = core.sample_logits(logits, 0.9, rng=6)
    index, log_p = core.sample_logits(np.where(where[:, None], logits, np.nan), 0.9, rng=6, where=where)
    np.testing.assert_array_equal(index[where], all_index[where])  # the same streams: the same draws
    np.testing.assert_array_equal(log_p[where], all_log_p[where])
    assert not index[~where].any() and not log_p[~where].any()  # skipped rows (NaN never read)
    with pytest.raises(ValueError, match="where: expected one entry per row"):
        core.sample_logits(logits, 1.0, rng=0, where=where[:3])


@pytest.mark.parametrize("scheme", ["multinomial", "stratified", "systematic", "residual"])
def test_smc_step_survivors_stay_is_keep_survivors(scheme: str) -> None:
    log_w = np.random.default_rng(7).standard_normal((30, 9)) * 2
    log_w[3] = -np.inf  # a collapsed row: reported, never resampled
    plain = core.smc_step(log_w.copy(), 0.7, scheme, rng=8)  # type: ignore[arg-type]
    staying = core.smc_step(log_w.copy(), 0.7, scheme, rng=8, survivors_stay=True)  # type: ignore[arg-type]
    np.testing.assert_array_equal(staying[0], core.keep_survivors(plain[0]))
    for a, b in zip(plain[1:], staying[1:]):
        np.testing.assert_array_equal(a, b)


def test_reorder_in_place_takes_an_array_given_twice_once() -> None:
    x = np.arange(24, dtype=np.float64).reshape(2, 4, 3)
    ancestors = np.array([[1, 1, 2, 3], [0, 0, 0, 3]])
    expected = core.gather(x, ancestors)
    core.reorder_in_place([x, x.view(np.int64), x], ancestors)
    np.testing.assert_array_equal(x, expected)
    overlapping = np.arange(48, dtype=np.float64)
    with pytest.raises(ValueError, match=r"arrays\[1\]: overlaps arrays\[0\] without being the same memory"):
        core.reorder_in_place(
            [overlapping[:24].reshape(2, 4, 3), overlapping[12:36].reshape(2, 4, 3)], ancestors
        )
    np.testing.assert_array_equal(overlapping, np.arange(48))


# -- smc_reweight -----------------------------------------------------------------------------------------


def _safe_difference(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.where(old == -np.inf, -np.inf, new - old)


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    batch=st.integers(1, 4),
    count=st.integers(1, 9),
    threshold=st.floats(0, 1),
)
def test_smc_reweight_is_the_numpy_step(seed: int, batch: int, count: int, threshold: float) -> None:
    """The fused step equals the sampler's former numpy code around smc_step, bit for bit."""
    rng = np.random.default_rng(seed)

    def draw(shape: tuple[int, ...], zero: float) -> np.ndarray:
        values = rng.standard_normal(shape) * 3
        values[rng.random(shape) < zero] = -np.inf
        return values

    log_w, log_v, log_v_prev = draw((batch, count), 0.1), draw((batch, count), 0.1), draw((batch, count), 0.1)
    live = rng.random((batch, count)) < 0.8
    log_total = np.where(rng.random(batch) < 0.2, -np.inf, rng.standard_normal(batch))
    log_z, collapsed = rng.standard_normal(batch), rng.random(batch) < 0.2
    # the reference
    w, prev, z, total, gone = (
        log_w.copy(),
        log_v_prev.copy(),
        log_z.copy(),
        log_total.copy(),
        collapsed.copy(),
    )
    w += np.where(live, _safe_difference(log_v, prev), 0.0)
    prev = np.where(live, log_v, prev)
    ancestors, resampled, log_mean_w, ess, unique = core.smc_step(w, threshold, rng=seed, survivors_stay=True)
    new_total = log_mean_w + np.log(count)
    increment = _safe_difference(new_total, total)
    total = np.where(resampled, np.log(count), new_total)
    z = z + increment
    gone |= ess == 0.0
    # the increment's standard error as the sampler computed it in numpy
    log_g = np.where(live, _safe_difference(log_v, log_v_prev), 0.0)
    want_se = increment_standard_error(log_w, log_total, log_g, increment)
    want_se[~live.any(axis=1) & (increment > -np.inf)] = 0.0  # no potential applied: exactly 0
    # the fused call, on copies updated in place
    se = np.full(batch, np.nan)
    got = core.smc_reweight(
        log_w, log_v, log_v_prev, live, log_total, log_z, collapsed, threshold, "systematic", rng=seed,
        increment_se=se,
    )  # fmt: skip
    for want, have in zip((ancestors, resampled, ess, unique, increment), got):
        np.testing.assert_array_equal(have, want)
    np.testing.assert_allclose(se, want_se, rtol=1e-12, atol=1e-12)
    assert np.array_equal(np.isinf(se), increment == -np.inf)
    for want, have in zip((w, prev, z, total, gone), (log_w, log_v_prev, log_z, log_total, collapsed)):
        np.testing.assert_array_equal(have, want)


SCHEME_NAMES = ("multinomial", "stratified", "systematic", "residual")


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    sizes=st.lists(st.integers(0, 3), min_size=1, max_size=4),
    count=st.integers(1, 9),
    data=st.data(),
)
def test_smc_reweight_of_several_runs_is_each_runs_own_call(
    seed: int, sizes: list[int], count: int, data: st.DataObject
) -> None:
    """Rows of independent runs in one call (a RowStreams, per-row schemes and thresholds) step exactly as
    each run's own call steps its rows: every output, every array written in place, and each generator left
    where its own call leaves it (one key drawn)."""
    rng = np.random.default_rng(seed)
    rows = sum(sizes)
    schemes = [data.draw(st.sampled_from(SCHEME_NAMES), label="scheme") for _ in sizes]
    thresholds = [data.draw(st.floats(0, 1.5), label="threshold") for _ in sizes]

    def draw(shape: tuple[int, ...], zero: float) -> np.ndarray:
        values = rng.standard_normal(shape) * 3
        values[rng.random(shape) < zero] = -np.inf
        return values

    arrays = [
        draw((rows, count), 0.1),
        draw((rows, count), 0.1),
        draw((rows, count), 0.1),
        rng.random((rows, count)) < 0.8,
        np.where(rng.random(rows) < 0.2, -np.inf, rng.standard_normal(rows)),
        rng.standard_normal(rows),
        rng.random(rows) < 0.2,
    ]
    bounds = np.cumsum([0, *sizes]).tolist()
    apart = [a.copy() for a in arrays]
    generators = [np.random.default_rng(1000 + k) for k in range(len(sizes))]
    want = []
    for k, (scheme, threshold) in enumerate(zip(schemes, thresholds)):
        part = [a[bounds[k] : bounds[k + 1]] for a in apart]  # views: updated in place
        se = np.empty(sizes[k])
        want.append((*core.smc_reweight(*part, threshold, scheme, generators[k], increment_se=se), se))
    together = [np.random.default_rng(1000 + k) for k in range(len(sizes))]
    se = np.empty(rows)
    got = core.smc_reweight(
        *arrays,
        np.repeat(thresholds, sizes),
        [scheme for scheme, size in zip(schemes, sizes) for _ in range(size)],
        RowStreams(together, bounds),
        increment_se=se,
    )
    for index, have in enumerate((*got, se)):
        expected = np.concatenate([outputs[index] for outputs in want])
        np.testing.assert_array_equal(have, expected.reshape(have.shape))
    for have, expected in zip(arrays, apart):
        np.testing.assert_array_equal(have, expected)
    for alone, batched in zip(generators, together):
        assert alone.bit_generator.state == batched.bit_generator.state


def test_smc_reweight_per_row_arguments_are_checked() -> None:
    log_w, log_v, log_v_prev = np.zeros((3, 2)), np.zeros((3, 2)), np.zeros((3, 2))
    live, log_total = np.ones((3, 2), bool), np.full(3, np.log(2))
    log_z, collapsed = np.zeros(3), np.zeros(3, bool)
    args = (log_w, log_v, log_v_prev, live, log_total, log_z, collapsed)
    with pytest.raises(ValueError, match=r"scheme: expected a name, or one per row of log_w \(3\), got 2"):
        core.smc_reweight(*args, 0.5, ["systematic", "residual"])
    with pytest.raises(ValueError, match="scheme: expected one of"):
        core.smc_reweight(*args, 0.5, ["systematic", "residual", "nope"])
    with pytest.raises(ValueError, match=r"ess_threshold: expected a fraction or one per row of log_w \(3\)"):
        core.smc_reweight(*args, np.array([0.5, 0.5]))
    for bad in ([0.5, -0.1, 0.5], [0.5, np.nan, 0.5]):
        with pytest.raises(ValueError, match="ess_threshold: expected fractions >= 0"):
            core.smc_reweight(*args, np.array(bad))
    with pytest.raises(TypeError, match="ess_threshold: expected a fraction >= 0 or one per row"):
        core.smc_reweight(*args, [object(), 1, 2])
    with pytest.raises(ValueError, match="rng: RowStreams for 2 rows, given 3"):
        core.smc_reweight(*args, 0.5, rng=RowStreams([np.random.default_rng(0)], [0, 2]))
    with pytest.raises(ValueError, match="keys: expected one per generator"):
        RowStreams([np.random.default_rng(0)], [0, 3], keys=[1, 2])
    assert not log_w.any() and not log_z.any()
    thresholds = np.full(3, 0.5)  # the caller's array is read, never kept or written
    core.smc_reweight(*args, thresholds, rng=RowStreams([np.random.default_rng(0)], [0, 3], keys=[7]))
    np.testing.assert_array_equal(thresholds, 0.5)


def test_smc_reweight_refuses_bad_input_before_writing() -> None:
    log_w, log_v, log_v_prev = np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3))
    live = np.ones((2, 3), bool)
    log_total, log_z, collapsed = np.full(2, np.log(3)), np.zeros(2), np.zeros(2, bool)
    log_v[1, 2] = np.nan
    with pytest.raises(ValueError, match="log_v: NaN at row 1, index 2"):
        core.smc_reweight(log_w, log_v, log_v_prev, live, log_total, log_z, collapsed, 1.0)
    live[1, 2] = False  # a particle that is not extended: its log_v is never read
    log_v_prev[0, 1] = np.inf
    with pytest.raises(ValueError, match=r"log_v_prev: \+inf at row 0, index 1"):
        core.smc_reweight(log_w, log_v, log_v_prev, live, log_total, log_z, collapsed, 1.0)
    assert not log_w.any() and not log_z.any() and not collapsed.any()
    with pytest.raises(TypeError, match="live: expected dtype bool"):
        core.smc_reweight(log_w, log_v, log_v_prev, live.astype(np.int8), log_total, log_z, collapsed, 1.0)
    with pytest.raises(ValueError, match=r"log_z: expected \(B,\)"):
        core.smc_reweight(log_w, log_v, log_v_prev, live, log_total, np.zeros(3), collapsed, 1.0)
    with pytest.raises(ValueError, match="log_v_prev: must be writeable"):
        log_v_prev.flags.writeable = False
        core.smc_reweight(log_w, log_v, log_v_prev, live, log_total, log_z, collapsed, 1.0)


def test_reorder_in_place_skips_what_it_cannot_write() -> None:
    class Shaped:  # stands in for a device array: only its shape is read
        def __init__(self, shape: tuple[int, ...]) -> None:
            self.shape = shape

    x = np.arange(8.0).reshape(2, 4)
    strided = np.zeros((2, 4, 2))[..., 0]
    readonly = np.zeros((2, 4))
    readonly.flags.writeable = False
    ancestors = np.array([[1, 1, 2, 3], [0, 0, 2, 3]])
    skipped = core.reorder_in_place(
        [x, strided, Shaped((2, 4, 7)), readonly], ancestors, skip_unwritable=True
    )
    assert skipped == [1, 2, 3]
    np.testing.assert_array_equal(x, [[1, 1, 2, 3], [4, 4, 6, 7]])
    with pytest.raises(ValueError, match=r"arrays\[1\]: leading axes"):
        core.reorder_in_place([x, Shaped((3, 4))], ancestors, skip_unwritable=True)
    np.testing.assert_array_equal(x, [[1, 1, 2, 3], [4, 4, 6, 7]])  # refused before anything was written
    with pytest.raises(ValueError, match="must be C-contiguous and writeable"):
        core.reorder_in_place([x, strided], ancestors)


def test_particles_reorder_names_a_bad_state_entry_and_writes_nothing() -> None:
    from tiltsmc.models import Particles

    particles = Particles.empty(["a", "b"], 3, 2)
    particles.lengths[:] = [[1, 2, 3], [4, 5, 6]]
    particles.state["good"] = np.arange(6.0).reshape(2, 3)
    particles.state["bad"] = np.zeros((3, 2))
    with pytest.raises(ValueError, match=r"Particles.state\['bad'\]: leading axes \(3, 2\) are not"):
        particles.reorder(np.array([[0, 0, 0], [1, 1, 1]]))
    np.testing.assert_array_equal(particles.lengths, [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(particles.state["good"], np.arange(6.0).reshape(2, 3))
