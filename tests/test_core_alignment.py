"""The core kernels on arrays whose data are not aligned to their item size, on empty arrays and zero-byte
items, and on bool arguments holding bytes other than 0 and 1.

numpy allows views whose data start at any byte (``np.zeros(8 * n + 1, np.uint8)[1:].view(np.float64)``);
the core reads and writes its typed arrays through typed pointers, which must be aligned. The rule checked:
an unaligned array a kernel only reads gives exactly (bit for bit, same seed) what an aligned copy of it
gives; one a kernel writes (in place, or an output given by the caller) is refused with a ``ValueError``
naming it, every argument left as it was; the particle data that gather, reorder_in_place and
concatenate_padded copy as bytes are taken as they are, aligned or not. The undefined behaviour itself
(misaligned loads, memcpy from a null pointer) shows only under UndefinedBehaviorSanitizer: these tests
check the results.

Bool arguments are read as numpy reads them (any nonzero byte is True): a mask whose bytes are 2 or 255
gives the results of the 0/1 mask.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
from tiltsmc import _core, core


def unaligned(a: Any) -> np.ndarray:
    """A C-contiguous copy of ``a`` (same dtype, shape and values) whose data start one byte past an aligned
    address: not aligned to its item size (where that is more than one byte)."""
    a = np.asarray(a)
    raw = np.zeros(a.nbytes + 1, np.uint8)
    view = raw[1:].view(a.dtype).reshape(a.shape)
    view[...] = a
    assert view.flags.c_contiguous
    assert a.itemsize == 1 or a.size == 0 or not view.flags.aligned
    return view


def aligned(a: Any) -> np.ndarray:
    """An aligned C-contiguous copy of ``a``."""
    copy = np.array(a, copy=True, order="C")
    assert copy.flags.aligned
    return copy


def flat(result: Any) -> list[Any]:
    if isinstance(result, (tuple, list)):
        return [item for part in result for item in flat(part)]
    return [result]


def assert_same(got: Any, expected: Any) -> None:
    """The same results: arrays of the same dtype, shape and bytes (bools compared as numpy reads them),
    other values equal."""
    got_items, expected_items = flat(got), flat(expected)
    assert len(got_items) == len(expected_items)
    for g, e in zip(got_items, expected_items):
        if isinstance(e, np.ndarray):
            assert isinstance(g, np.ndarray) and g.dtype == e.dtype and g.shape == e.shape
            if e.dtype == np.bool_:
                assert np.array_equal(g, e)
            else:
                assert np.ascontiguousarray(g).tobytes() == np.ascontiguousarray(e).tobytes()
        else:
            assert g == e


RNG = np.random.default_rng(2024)
SIZES = (37, 4099)  # a short row, and one of several SIMD blocks and a tail


def weights(rows: int, n: int, dtype: Any = np.float64) -> np.ndarray:
    x = RNG.normal(size=(rows, n)) * 3.0
    x[:, ::7] = -np.inf
    return x.astype(dtype)


# --------------------------------------------------------------------------------------------------------
# Inputs the kernels only read: an unaligned one gives what an aligned copy gives
# --------------------------------------------------------------------------------------------------------

Make = Callable[[Any], np.ndarray]


def _smc_reweight_reads(make: Make, n: int) -> Any:
    rows = 3
    log_w = weights(rows, n)
    log_v, live = RNG.normal(size=(rows, n)), RNG.random((rows, n)) < 0.8
    log_v_prev = np.zeros((rows, n))
    log_total = np.log(np.exp(log_w).sum(axis=1))
    log_z, collapsed, se = np.zeros(rows), np.zeros(rows, bool), np.zeros(rows)
    thresholds = np.array([0.2, 1.5, 0.9])
    result = core.smc_reweight(
        log_w, make(log_v), log_v_prev, make(live), log_total, log_z, collapsed, make(thresholds),
        ["systematic", "residual", "multinomial"], rng=11, increment_se=se,
    )  # fmt: skip
    return result, log_w, log_v_prev, log_total, log_z, collapsed, se


def _append_tokens_reads(make: Make, n: int) -> Any:
    tokens = np.zeros((n, 6), np.int64)
    lengths = np.arange(n, dtype=np.int64) % 5
    finished = np.zeros(n, bool)
    new_tokens = np.arange(n, dtype=np.int64) % 9
    active = np.arange(n) % 3 != 0
    still = core.append_tokens(
        tokens, lengths, finished, make(new_tokens), make(active), make(np.array([4, 8])), 6
    )
    return still, tokens, lengths, finished


def _mask(n: int, width: int = 5) -> np.ndarray:
    return (RNG.random((n, width)) < 0.7).astype(np.int64)


def _prefixes(make: Make, n: int) -> Any:
    batch, particles, capacity = 2, max(n // 2, 1), 4
    prompt_ids = np.arange(7, dtype=np.int64)
    offsets = np.array([0, 3, 7], np.int64)
    tokens = RNG.integers(0, 50, size=(batch, particles, capacity))
    lengths = RNG.integers(0, capacity + 1, size=(batch, particles))
    selected = RNG.integers(0, batch * particles, size=n)
    return core.right_padded_prefixes(
        make(prompt_ids), make(offsets), make(tokens), make(lengths), make(selected), 0, True
    )


def _gather_out(make: Make, n: int) -> Any:
    x, ancestors = RNG.normal(size=(2, n, 3)), RNG.integers(0, n, size=(2, n))
    out = make(np.zeros((2, n, 3)))
    returned = core.gather(make(x), make(ancestors), out=out)
    return returned, out


def _gather_in_place(make: Make, n: int) -> Any:
    x = make(RNG.normal(size=(2, n, 3)))
    core.gather(x, make(RNG.integers(0, n, size=(2, n))), out=x)
    return x


def _reorder(make: Make, n: int) -> Any:
    small, large = make(RNG.normal(size=(2, n, 3))), make(RNG.normal(size=(2, n, 4, 5)))
    ancestors = RNG.integers(0, n, size=(2, n))
    used = RNG.integers(0, 6, size=(2, n))
    skipped = core.reorder_in_place([small, large], make(ancestors), used=make(used), axes=[None, 3])
    return skipped, small, large


def _concatenate(make: Make, n: int) -> Any:
    parts = [RNG.normal(size=(2, 3, n)), RNG.normal(size=(1, 3, 5))]
    out = make(np.full((3, 3, n), 7.0))
    returned = core.concatenate_padded(
        [make(p) for p in parts], axis=2, padding_side="right", used=make(np.array([1, n, 3])), out=out
    )
    return returned, out


READS: dict[str, Callable[[Make, int], Any]] = {
    "log_normalize": lambda make, n: core.log_normalize(make(weights(3, n))),
    "log_normalize float32": lambda make, n: core.log_normalize(make(weights(3, n, np.float32))),
    "log_normalize one long row": lambda make, n: core.log_normalize(make(weights(1, 20 * n)[0])),
    "row_statistics": lambda make, n: core.row_statistics(make(weights(3, n))),
    "resample systematic": lambda make, n: core.resample(make(weights(2, n)), "systematic", rng=5),
    "resample multinomial": lambda make, n: core.resample(make(weights(2, n)), "multinomial", rng=5),
    "resample residual float32": lambda make, n: core.resample(
        make(weights(2, n, np.float32)), "residual", rng=5
    ),
    "pool_select": lambda make, n: core.pool_select(make(weights(4, n)), rng=6),
    "sample_logits": lambda make, n: core.sample_logits(make(weights(3, n, np.float32)), 0.7, rng=7),
    "sample_logits float64 where": lambda make, n: core.sample_logits(
        make(weights(3, n)), 1.3, rng=7, where=make(np.array([True, False, True]))
    ),
    "smc_reweight log_v, live, ess_threshold": _smc_reweight_reads,
    "mh_accept": lambda make, n: core.mh_accept(make(RNG.normal(size=n)), make(RNG.normal(size=n)), rng=9),
    "gather": lambda make, n: core.gather(
        make(RNG.normal(size=(2, n, 3))), make(RNG.integers(0, n, size=(2, n)))
    ),
    "gather out": _gather_out,
    "gather in place": _gather_in_place,
    "reorder_in_place": _reorder,
    "keep_survivors": lambda make, n: core.keep_survivors(
        make(np.sort(RNG.integers(0, n, size=(3, n)), axis=1))
    ),
    "concatenate_padded": _concatenate,
    "append_tokens new_tokens, active, stop_ids": _append_tokens_reads,
    "decode_inputs": lambda make, n: core.decode_inputs(
        make(_mask(n)), make(np.arange(n) % 2 == 0), make(np.arange(n, dtype=np.int64)), -1
    ),
    "decode_inputs_right_padded": lambda make, n: core.decode_inputs_right_padded(
        make(np.sort(_mask(n), axis=1)[:, ::-1]),
        make(np.arange(n) % 2 == 0),
        make(np.arange(n, dtype=np.int64)),
        -1,
    ),
    "right_padded_prefixes": _prefixes,
    "read_log_values": lambda make, n: core.read_log_values(
        make(RNG.random((n, 3))), n, make(RNG.integers(0, 3, size=n)), "prob"
    ),
    "read_log_values float32 logit": lambda make, n: core.read_log_values(
        make(RNG.normal(size=(n, 2)).astype(np.float32)), n, None, "logit"
    ),
}


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", sorted(READS))
def test_unaligned_inputs_give_the_aligned_results(name: str, n: int) -> None:
    state = RNG.bit_generator.state
    expected = READS[name](aligned, n)
    RNG.bit_generator.state = state  # the same values, made unaligned
    got = READS[name](unaligned, n)
    assert_same(got, expected)


def test_an_unaligned_input_is_left_as_it_was() -> None:
    log_w = unaligned(weights(2, 50))
    before = log_w.copy()
    core.resample(log_w, "residual", rng=1)
    core.log_normalize(log_w)
    assert log_w.tobytes() == before.tobytes()


# --------------------------------------------------------------------------------------------------------
# Arrays the kernels write: an unaligned one is refused, naming it, and nothing is written
# --------------------------------------------------------------------------------------------------------


def _reweight_arguments() -> dict[str, np.ndarray]:
    rows, n = 3, 8
    log_w = weights(rows, n)
    return {
        "log_w": log_w,
        "log_v": RNG.normal(size=(rows, n)),
        "log_v_prev": np.zeros((rows, n)),
        "live": np.ones((rows, n), bool),
        "log_total": np.log(np.exp(log_w).sum(axis=1)),
        "log_z": np.zeros(rows),
        "collapsed": np.zeros(rows, bool),
        "increment_se": np.zeros(rows),
    }


def _reweight(arguments: dict[str, np.ndarray], rng: np.random.Generator) -> Any:
    a = dict(arguments)
    se = a.pop("increment_se")
    return core.smc_reweight(**a, ess_threshold=1.0, rng=rng, increment_se=se)


def _append_arguments() -> dict[str, np.ndarray]:
    return {
        "tokens": np.zeros((4, 5), np.int64),
        "lengths": np.array([0, 1, 2, 3], np.int64),
        "finished": np.zeros(4, bool),
        "new_tokens": np.array([5, 6, 7, 8], np.int64),
        "active": np.ones(4, bool),
        "stop_ids": np.array([7], np.int64),
    }


WRITTEN: dict[
    str,
    tuple[
        Callable[[], dict[str, np.ndarray]],
        Callable[[dict[str, np.ndarray], np.random.Generator], Any],
        str,
    ],
] = {
    "smc_step log_w": (
        lambda: {"log_w": weights(3, 9)},
        lambda a, rng: core.smc_step(a["log_w"], 1.0, rng=rng),
        "log_w",
    ),
    "smc_step float32 log_w": (
        lambda: {"log_w": weights(3, 9, np.float32)},
        lambda a, rng: core.smc_step(a["log_w"], 1.0, "multinomial", rng=rng, survivors_stay=True),
        "log_w",
    ),
    **{
        f"smc_reweight {name}": (_reweight_arguments, _reweight, name)
        for name in ("log_w", "log_v_prev", "log_total", "log_z", "increment_se")
    },
    **{
        f"append_tokens {name}": (
            _append_arguments,
            lambda a, rng: core.append_tokens(**a, max_length=5),
            name,
        )
        for name in ("tokens", "lengths")
    },
    "keep_survivors (the binding)": (
        lambda: {"ancestors": np.array([[0, 0, 2, 2], [1, 1, 1, 3]], np.int64)},
        lambda a, rng: _core.keep_survivors(a["ancestors"]),
        "ancestors",
    ),
}


@pytest.mark.parametrize("name", sorted(WRITTEN))
def test_unaligned_written_arrays_are_refused_and_left_as_they_were(name: str) -> None:
    make_arguments, call, which = WRITTEN[name]
    arguments = make_arguments()
    arguments[which] = unaligned(arguments[which])
    before = {key: value.copy() for key, value in arguments.items()}
    rng = np.random.default_rng(1)
    state = rng.bit_generator.state
    with pytest.raises(ValueError, match=rf"^{which}: must be aligned to its item size"):
        call(arguments, rng)
    for key, value in arguments.items():
        assert value.tobytes() == before[key].tobytes(), f"{key} written by a refused call"
    assert rng.bit_generator.state == state, "the generator moved on a refused call"
    # aligned, the same call goes through
    call(make_arguments(), rng)


def test_empty_unaligned_written_arrays_are_accepted() -> None:
    """No item of an empty array is read or written: its alignment does not matter."""
    empty = {
        "tokens": unaligned(np.zeros((0, 4), np.int64)),
        "lengths": unaligned(np.zeros(0, np.int64)),
        "finished": np.zeros(0, bool),
        "new_tokens": np.zeros(0, np.int64),
        "active": np.zeros(0, bool),
        "stop_ids": np.zeros(0, np.int64),
    }
    still, count = core.append_tokens(**empty, max_length=4)
    assert still.shape == (0,) and count == 0


# --------------------------------------------------------------------------------------------------------
# Empty arrays and items of no bytes (memcpy from a null pointer under the sanitizers, before the fix)
# --------------------------------------------------------------------------------------------------------

ANCESTORS = np.array([[1, 1, 0], [2, 0, 1]], np.int64)


@pytest.mark.parametrize(
    "shape, dtype", [((2, 3, 0), np.float64), ((2, 3, 2, 0), np.int32), ((2, 3), np.dtype("V0"))]
)
def test_zero_byte_items_reorder_as_nothing(shape: tuple[int, ...], dtype: Any) -> None:
    x, y = np.zeros(shape, dtype), RNG.normal(size=(2, 3, 2))
    expected = np.take_along_axis(y, ANCESTORS[:, :, None], axis=1)
    assert core.reorder_in_place([x, y], ANCESTORS) == []
    assert np.array_equal(y, expected) and x.shape == shape
    if len(shape) == 4:
        core.reorder_in_place([x], ANCESTORS, used=np.ones((2, 3), np.int64), axes=[2])
    # the ancestors are still checked
    with pytest.raises(ValueError, match="ancestors"):
        core.reorder_in_place([x], np.array([[0, 3, 0], [0, 0, 0]]))


def test_zero_byte_items_gather_as_nothing() -> None:
    x, out = np.zeros((2, 3, 0)), np.zeros((2, 3, 0))
    assert core.gather(x, ANCESTORS, out=x) is x
    _core.gather(x, ANCESTORS, x, 2, 3, 0)  # the core itself: in place, items of no bytes
    _core.gather(x, ANCESTORS, out, 2, 3, 0)
    with pytest.raises(ValueError, match="ancestors"):
        _core.gather(x, np.array([[0, 3, 0], [0, 0, 0]]), x, 2, 3, 0)


def test_empty_parts_concatenate() -> None:
    joined = core.concatenate_padded([np.zeros((2, 3, 0)), np.zeros((1, 3, 0))], axis=2, padding_side="right")
    assert joined.shape == (3, 3, 0)
    joined = core.concatenate_padded([np.zeros((2, 3, 4, 0)), np.zeros((1, 3, 2, 0))], axis=2)
    assert joined.shape == (3, 3, 4, 0)
    joined = core.concatenate_padded(
        [np.ones((2, 0, 4)), np.ones((1, 0, 2))], axis=2, padding_side="right", used=[0, 1, 2]
    )
    assert joined.shape == (3, 0, 4)


# --------------------------------------------------------------------------------------------------------
# Bool arguments holding bytes other than 0 and 1
# --------------------------------------------------------------------------------------------------------


def as_bytes(values: Any) -> np.ndarray:
    """A bool array holding the given bytes (a uint8 array viewed as bool)."""
    return np.array(values, np.uint8).view(bool)


def _reweight_with(live: np.ndarray, collapsed: np.ndarray) -> Any:
    rng = np.random.default_rng(0)
    rows, n = live.shape
    log_w, log_v, log_v_prev = rng.normal(size=(rows, n)), rng.normal(size=(rows, n)), np.zeros((rows, n))
    log_total, log_z, se = np.log(np.exp(log_w).sum(axis=1)), np.zeros(rows), np.zeros(rows)
    result = core.smc_reweight(
        log_w, log_v, log_v_prev, live, log_total, log_z, collapsed, 0.9, rng=5, increment_se=se
    )
    return result, log_w, log_v_prev, log_total, log_z, se, collapsed


def _append_with(active: np.ndarray, finished: np.ndarray) -> Any:
    tokens, lengths = np.zeros((4, 5), np.int64), np.array([0, 1, 2, 4], np.int64)
    still = core.append_tokens(tokens, lengths, finished, np.array([7, 3, 4, 5]), active, np.array([7]), 5)
    return still, tokens, lengths, finished


LIVE_BYTES = [[2, 0, 255, 1, 7, 0], [0, 0, 0, 0, 0, 0], [128, 1, 1, 64, 0, 3]]
MASKED: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {
    "sample_logits where": (
        lambda w: core.sample_logits(np.linspace(-1, 1, 40).reshape(4, 10), 0.7, rng=3, where=w),
        ([2, 0, 255, 1],),
    ),
    "sample_logits where, RowStreams": (
        lambda w: core.sample_logits(
            np.linspace(-1, 1, 40).reshape(4, 10),
            rng=core.RowStreams([np.random.default_rng(1), np.random.default_rng(2)], [0, 2, 4]),
            where=w,
        ),
        ([0, 0, 255, 2],),
    ),
    "smc_reweight live, collapsed": (_reweight_with, (LIVE_BYTES, [0, 9, 0])),
    "smc_reweight live, increment_se of a row": (_reweight_with, ([[0, 0, 0, 0, 0, 200]] * 3, [255, 0, 2])),
    "append_tokens active, finished": (_append_with, ([2, 255, 0, 0], [0, 3, 0, 200])),
    "decode_inputs still": (
        lambda s: core.decode_inputs(np.array([[0, 1, 1], [1, 1, 1], [0, 0, 1]]), s, np.array([5, 6, 7]), 0),
        ([2, 0, 255],),
    ),
    "decode_inputs_right_padded still": (
        lambda s: core.decode_inputs_right_padded(
            np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0]]), s, np.array([5, 6, 7]), 0
        ),
        ([2, 0, 255],),
    ),
}


@pytest.mark.parametrize("name", sorted(MASKED))
def test_bool_bytes_other_than_0_and_1_read_as_true(name: str) -> None:
    call, masks = MASKED[name]
    got = call(*(as_bytes(m) for m in masks))
    expected = call(*(np.array(m, np.uint8) != 0 for m in masks))
    assert_same(got, expected)


def test_a_decoding_position_counts_the_masks_nonzero_entries() -> None:
    """An int64 attention mask of other values than 0 / 1: the position is the count of nonzero entries, as
    the right-padded form counts them (it was their sum: 2**62 twice overflowed int64)."""
    mask = np.array([[0, 2, 1], [2**62, 2**62, 1], [0, 0, -1]])
    still, tokens = np.ones(3, bool), np.array([5, 6, 7])
    _, _, positions = core.decode_inputs(mask, still, tokens, 0)
    _, _, padded_positions, _ = core.decode_inputs_right_padded(mask, still, tokens, 0)
    assert positions.ravel().tolist() == padded_positions.ravel().tolist() == [2, 3, 1]
