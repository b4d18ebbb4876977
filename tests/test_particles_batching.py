"""Joining and leaving batches of particles: what the serving engine does between steps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiltsmc import core
from tiltsmc._rng import RowStreams
from tiltsmc.models import OnnxCausalLM, Particles
from tiltsmc.models.particles import _write_padded

FIXTURES = Path(__file__).parent / "fixtures" / "models"


@pytest.fixture(scope="module")
def policy() -> OnnxCausalLM:
    return OnnxCausalLM(FIXTURES / "llama-tiny", max_new_tokens=5)


def test_join_left_pads_and_leaving_trims(policy: OnnxCausalLM) -> None:
    short = policy.start(["a"], 3).one_per_prompt()
    long = policy.start(["the quick brown fox"], 2).one_per_prompt()
    joined = Particles.concatenate([short, long])
    mask = joined.state["lm.mask"]
    short_len, long_len = short.state["lm.mask"].shape[-1], long.state["lm.mask"].shape[-1]
    assert short_len < long_len and mask.shape == (5, 1, long_len)
    np.testing.assert_array_equal(mask[:3, :, : long_len - short_len], 0)  # padding on the left
    np.testing.assert_array_equal(mask[:3, :, long_len - short_len :], short.state["lm.mask"])
    key = next(k for k in joined.aligned if k != "lm.mask")
    np.testing.assert_array_equal(joined.state[key][:3, :, :, long_len - short_len :], short.state[key])
    assert joined.prompts == ["a"] * 3 + ["the quick brown fox"] * 2
    assert joined.prompt_tokens is not None and joined.prompt_tokens[0] is short.prompt_tokens[0]  # type: ignore[index]
    alone = joined.select(np.arange(3))  # the long prompt leaves: its padding columns go
    assert alone.state["lm.mask"].shape[-1] == short_len
    for name, array in short.state.items():
        np.testing.assert_array_equal(alone.state[name], array, err_msg=name)


def test_leaving_keeps_views_and_the_next_join_trims(policy: OnnxCausalLM) -> None:
    """A range of prompts leaves without a copy (views; padding under half the width stays), and the next
    join drops the columns that are padding in all of a part's rows within the copy it makes."""
    long = policy.start(["the quick brown fox"], 2).one_per_prompt()  # 19 prompt tokens
    mid = policy.start(["the quick brown"], 3).one_per_prompt()  # 15
    short = policy.start(["a"], 1).one_per_prompt()  # 1
    joined = Particles.concatenate([long, mid])
    kept = joined.view_rows(2, 5)  # the long prompt leaves
    for name, array in kept.state.items():
        assert np.shares_memory(array, joined.state[name]), name
    assert np.shares_memory(kept.tokens, joined.tokens) and kept.prompts == ["the quick brown"] * 3
    mask = kept.state["lm.mask"]
    assert mask.shape[-1] == 19 and not mask[..., :4].any() and mask[..., 4].all()
    rejoined = Particles.concatenate([kept, short])
    expected = Particles.concatenate([mid, short])
    assert rejoined.state["lm.mask"].shape[-1] == 15
    for name, array in expected.state.items():
        np.testing.assert_array_equal(rejoined.state[name], array, err_msg=name)
    np.testing.assert_array_equal(rejoined.tokens, expected.tokens)
    assert rejoined.prompts == expected.prompts
    # padding of at least half the width is trimmed at once (a copy)
    alone = Particles.concatenate([long, short]).view_rows(2, 3)
    for name, array in short.state.items():
        np.testing.assert_array_equal(alone.state[name], array, err_msg=name)
    with pytest.raises(IndexError, match="start, stop"):
        joined.view_rows(3, 6)


def test_joined_batch_decodes_as_each_alone(policy: OnnxCausalLM) -> None:
    """A step of the joined batch gives each particle the logits it gets alone (up to float32 rounding
    of the padded attention)."""
    parts = [policy.start([p], 2) for p in ("a", "the quick brown fox")]
    alone = []
    for part in parts:
        policy.append(part, np.full((1, 2), 7, dtype=np.int64))
        part.flush()
        alone.append(part.state["lm.logits"].reshape(2, -1))
    fresh = [policy.start([p], 2).one_per_prompt() for p in ("a", "the quick brown fox")]
    joined = Particles.concatenate(fresh)
    policy.append(joined, np.full((4, 1), 7, dtype=np.int64))
    joined.flush()
    np.testing.assert_allclose(joined.state["lm.logits"].reshape(4, -1), np.concatenate(alone), atol=2e-5)


def test_concatenate_refuses_what_cannot_join(policy: OnnxCausalLM) -> None:
    a, b = policy.start(["a"], 2), policy.start(["b"], 3)
    with pytest.raises(ValueError, match="particles a prompt cannot be joined"):
        Particles.concatenate([a, b])
    c = Particles.empty([()], 2, 4)
    c.state["x"] = np.zeros((1, 2, 3))
    d = Particles.empty([()], 2, 4)
    d.state["x"] = np.zeros((1, 2, 5))
    with pytest.raises(ValueError, match=r"state\['x'\]: shapes"):
        Particles.concatenate([c, d])
    with pytest.raises(ValueError, match="at least one"):
        Particles.concatenate([])


def test_one_per_prompt_gives_each_particle_its_prompts_entries() -> None:
    """Particle ``i`` of prompt ``b`` becomes entry ``b * N + i``, with prompt ``b``'s prompt, prompt tokens
    and error, its arrays views of the same memory."""
    particles = Particles.empty(["a", "b", "c"], 3, 4)
    particles.prompt_tokens = [np.array([1]), np.array([2, 2]), np.array([3])]
    particles.errors = {2: "too long", 0: "refused"}
    particles.state["v"] = np.arange(9.0).reshape(3, 3)
    flat = particles.one_per_prompt()
    assert flat.prompts == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    assert (
        flat.prompt_tokens is not None
        and [t.tolist() for t in flat.prompt_tokens] == [[1]] * 3 + [[2, 2]] * 3 + [[3]] * 3
    )
    refused, too_long = [(k, "refused") for k in range(3)], [(k, "too long") for k in range(6, 9)]
    assert list(flat.errors.items()) == [*refused, *too_long]
    assert flat.state["v"].shape == (9, 1) and np.shares_memory(flat.state["v"], particles.state["v"])
    np.testing.assert_array_equal(flat.state["v"][:, 0], np.arange(9.0))


def test_reorder_across_prompts_moves_particles_between_entries() -> None:
    particles = Particles.empty([()], 6, 3).one_per_prompt()
    particles.tokens[:, 0, 0] = np.arange(6)
    particles.state["v"] = np.arange(6.0).reshape(6, 1)
    particles.reorder(np.array([[0, 0, 2, 5, 5, 5]]), across_prompts=True)
    np.testing.assert_array_equal(particles.tokens[:, 0, 0], [0, 0, 2, 5, 5, 5])
    np.testing.assert_array_equal(particles.state["v"][:, 0], [0, 0, 2, 5, 5, 5])


def test_row_streams_draw_each_run_as_alone() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 30)).astype(np.float32)
    streams = RowStreams([np.random.default_rng(1), np.random.default_rng(2)], [0, 3, 7])
    index, log_p = core.sample_logits(logits, 1.0, streams)
    first = core.sample_logits(logits[:3], 1.0, np.random.default_rng(1))
    second = core.sample_logits(logits[3:], 1.0, np.random.default_rng(2))
    np.testing.assert_array_equal(index, np.concatenate([first[0], second[0]]))
    np.testing.assert_array_equal(log_p, np.concatenate([first[1], second[1]]))
    where = np.array([True, True, True, False, False, False, False])
    generators = [np.random.default_rng(1), np.random.default_rng(2)]
    index, _ = core.sample_logits(logits, 1.0, RowStreams(generators, [0, 3, 7]), where=where)
    assert np.all(index[3:] == 0)
    untouched = np.random.default_rng(2)
    assert generators[1].random() == untouched.random()  # a run with nothing to draw draws no key
    weights = logits.astype(np.float64)
    pooled = core.pool_select(
        weights, RowStreams([np.random.default_rng(3), np.random.default_rng(4)], [0, 2, 7])
    )
    apart = [
        core.pool_select(weights[:2], np.random.default_rng(3)),
        core.pool_select(weights[2:], np.random.default_rng(4)),
    ]
    for got, want in zip(pooled, zip(*apart)):  # one core call, each run's rows as its own call draws them
        np.testing.assert_array_equal(got, np.concatenate(want))
    np.testing.assert_array_equal(
        RowStreams([np.random.default_rng(4), np.random.default_rng(5)], [0, 1, 3]).random((3, 2)),
        np.concatenate([np.random.default_rng(4).random((1, 2)), np.random.default_rng(5).random((2, 2))]),
    )
    with pytest.raises(ValueError, match="RowStreams for 7 rows, given 5"):
        core.sample_logits(logits[:5], 1.0, streams)


@pytest.mark.parametrize("sizes", [[1, 1, 1, 1], [0, 1, 1, 2], [2, 0, 2], [1, 0, 1], [3], [1]])
def test_row_streams_give_each_row_its_runs_key_and_index(sizes: list[int]) -> None:
    """``row_streams``: row ``r`` of run ``g`` gets run ``g``'s key and counter ``r`` (runs of one row each
    take a shorter path; runs of no rows, whose count equals the rows', must not)."""
    bounds = np.cumsum([0, *sizes]).tolist()
    keys = [11 * (g + 1) for g in range(len(sizes))]
    streams = RowStreams([np.random.default_rng(g) for g in range(len(sizes))], bounds, keys=keys)
    got_keys, got_counters = streams.row_streams(sum(sizes))
    np.testing.assert_array_equal(got_keys, [key for key, size in zip(keys, sizes) for _ in range(size)])
    np.testing.assert_array_equal(got_counters, [r for size in sizes for r in range(size)])
    assert got_keys.dtype == got_counters.dtype == np.uint64
    starts, counts, _ = streams.row_counters(sum(sizes))
    np.testing.assert_array_equal(starts, bounds[:-1])
    np.testing.assert_array_equal(counts, sizes)


# Run in a fresh interpreter: forked from the test process, a child inherits the locks that earlier tests'
# threads (servers, engines, Ray, ONNX Runtime pools) happened to hold at the fork, and Python's own
# machinery in the child (multiprocessing's bootstrap, its exit) could wait on them forever. What is tested
# is tiltsmc's part: fresh entropy for rng=None, and the core's thread pool (started in the parent by a
# resampling large enough to use it) started afresh in each child.
_FORK_SCRIPT = """
import multiprocessing, os, sys, warnings
import numpy as np
from tiltsmc import core

def child(connection):
    connection.send(core.resample(np.zeros((4, 1 << 16)), "multinomial", rng=None)[:, :8].tolist())
    connection.close()
    os._exit(0)

core.set_num_threads(2)
core.resample(np.zeros((4, 1 << 16)), "multinomial", rng=None)  # the parent has drawn (and used its pool)
context = multiprocessing.get_context("fork")
for _ in range(3):
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=child, args=(sender,))
    with warnings.catch_warnings():  # Python 3.12+ warns that forking a threaded process may deadlock
        warnings.simplefilter("ignore", DeprecationWarning)
        process.start()
    if not receiver.poll(60):
        process.kill()
        sys.exit("a child sent nothing within 60 s")
    print(receiver.recv())
    process.join(30)
    if process.exitcode != 0:
        sys.exit(f"a child exited with {process.exitcode}")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_rng_none_differs_in_forked_children() -> None:
    """rng=None means fresh entropy in every process, forked ones included (issue #16, item 11)."""
    done = subprocess.run(
        [sys.executable, "-c", _FORK_SCRIPT], capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, done.stderr
    draws = done.stdout.split("\n")[:3]
    assert len(draws) == 3 and len(set(draws)) == 3, done.stdout


def in_place_batch(rows: int, width: int, fill: float, capacity: int) -> Particles:
    """A one-particle-a-prompt batch with a right-padded mask of ``width`` ones and an ``in_place`` entry
    ``capacity`` columns wide, ``fill`` in its first ``width`` columns."""
    batch = Particles.empty([None] * rows, 1, 4)
    batch.state["mask"] = np.ones((rows, 1, width), dtype=np.int64)
    cache = np.zeros((rows, 1, 2, capacity, 3), dtype=np.float32)
    cache[:, :, :, :width] = fill
    batch.state["cache"] = cache
    batch.aligned.update(mask=(2, "mask"), cache=(3, "mask"))
    batch.right_padded.add("mask")
    batch.in_place.add("cache")
    return batch


def test_in_place_entries_join_into_spare_rows_without_copying_the_batch() -> None:
    """A batch joined with ``in_place`` entries gets spare rows; the next join writes the newcomers' own
    columns there and returns a view of the same memory, the batch's rows not copied; a second join from
    the same batch cannot take the rows the first took: it copies."""
    lane = Particles.concatenate([in_place_batch(3, 5, 1.0, 8), in_place_batch(2, 2, 2.0, 2)])
    cache = lane.state["cache"]
    assert cache.shape == (5, 1, 2, 8, 3)
    assert cache.base is not None and cache.base.shape[0] > 5  # room behind the batch's rows
    # each particle's columns that its mask counts (those after are never read: not copied)
    np.testing.assert_array_equal(cache[:3, :, :, :5], 1.0)
    np.testing.assert_array_equal(cache[3:, :, :, :2], 2.0)
    cache[:, :, :, 6] = 7.0  # a column past the mask: the model's (never trimmed, kept by the join)

    joined = Particles.concatenate([lane, in_place_batch(1, 4, 3.0, 4)])
    grown = joined.state["cache"]
    assert grown.shape == (6, 1, 2, 8, 3)
    assert grown.base is cache.base and grown.ctypes.data == cache.ctypes.data  # the batch's rows in place
    np.testing.assert_array_equal(grown[:5], cache)
    np.testing.assert_array_equal(grown[5, :, :, :4], 3.0)  # past its columns: never read, left as found
    assert joined.state["mask"].shape == (6, 1, 5)  # the mask is copied and padded as before

    again = Particles.concatenate([lane, in_place_batch(1, 4, 4.0, 4)])  # the rows behind are taken
    assert not np.shares_memory(again.state["cache"], cache)
    np.testing.assert_array_equal(grown[5, :, :, :4], 3.0)  # the first join's rows left as they were
    np.testing.assert_array_equal(again.state["cache"][5, :, :, :4], 4.0)


def test_in_place_entries_are_not_trimmed_and_a_batch_cut_at_its_end_copies() -> None:
    """Leaving keeps an ``in_place`` entry's width (its columns past every row's length are the model's
    to write); a batch whose last rows left cannot write over them (an older batch may still show them):
    its next join copies."""
    lane = Particles.concatenate([in_place_batch(2, 6, 1.0, 6), in_place_batch(2, 2, 2.0, 2)])
    shorter = lane.select([2, 3])  # only the short rows: their mask loses four columns, the cache none
    assert shorter.state["mask"].shape == (2, 1, 2)
    assert shorter.state["cache"].shape == (2, 1, 2, 6, 3)
    front = lane.view_rows(0, 2)  # rows 2 and 3 still shown by `lane`
    joined = Particles.concatenate([front, in_place_batch(1, 3, 5.0, 3)])
    assert not np.shares_memory(joined.state["cache"], lane.state["cache"])
    np.testing.assert_array_equal(lane.state["cache"][2:, :, :, :2], 2.0)
    back = lane.view_rows(2, 4)  # the front left: the rows behind are still free
    joined = Particles.concatenate([back, in_place_batch(1, 3, 5.0, 3)])
    assert np.shares_memory(joined.state["cache"], lane.state["cache"])
    np.testing.assert_array_equal(joined.state["cache"][:2], lane.state["cache"][2:])
    np.testing.assert_array_equal(joined.state["cache"][2, :, :, :3], 5.0)


def test_an_in_place_join_of_another_shape_is_refused_by_name() -> None:
    """A newcomer whose ``in_place`` entry differs beyond its rows and width (other heads) is refused,
    naming the entry; the batch is left as it was and keeps its spare rows for the next join."""
    lane = Particles.concatenate([in_place_batch(2, 3, 1.0, 4), in_place_batch(1, 3, 2.0, 3)])
    before = lane.state["cache"].copy()
    other = in_place_batch(1, 2, 3.0, 2)
    other.state["cache"] = np.zeros((1, 1, 3, 2, 3), dtype=np.float32)  # three heads, not two
    with pytest.raises(ValueError, match=r"Particles.state\['cache'\]: shapes .* differ beyond"):
        Particles.concatenate([lane, other])
    np.testing.assert_array_equal(lane.state["cache"], before)
    joined = Particles.concatenate([lane, in_place_batch(1, 2, 4.0, 2)])
    assert np.shares_memory(joined.state["cache"], lane.state["cache"])


def test_fill_rows_writes_a_newcomer_over_rows_in_place(policy: OnnxCausalLM) -> None:
    """``fill_rows`` writes a part over a batch's rows where they lie: tokens, state (a narrower padded
    entry padded with zeros on its side), prompts, prompt tokens and errors; the other rows and the
    arrays themselves stay. A part that does not fit (wider padded state, another particle count) is
    refused with False and nothing written; bad rows raise naming ``rows``."""
    lane = Particles.concatenate(
        [policy.start(["the quick brown"], 2).one_per_prompt(), policy.start(["hello"], 2).one_per_prompt()]
    )
    arrays = {name: array for name, array in lane.state.items()}
    before = {name: array.copy() for name, array in lane.state.items()}
    newcomer = policy.start(["ab"], 2).one_per_prompt()
    newcomer.errors = {1: "refused"}
    assert lane.fill_rows(0, newcomer)
    expected = Particles.concatenate([newcomer, lane.view_rows(2, 4)])  # as narrow as it can be
    for name, array in lane.state.items():
        assert array is arrays[name], name  # written where it lies
        np.testing.assert_array_equal(array[2:], before[name][2:], err_msg=name)
        if name in lane.aligned:  # left-padded: the newcomer's columns last, zeros before
            axis = lane.aligned[name][0]
            pad = array.shape[axis] - expected.state[name].shape[axis]
            assert pad > 0, name
            kept = (slice(0, 2), *(slice(None),) * (axis - 1), slice(pad, None))
            np.testing.assert_array_equal(array[kept], expected.state[name][:2], err_msg=name)
            padding = (slice(0, 2), *(slice(None),) * (axis - 1), slice(0, pad))
            np.testing.assert_array_equal(array[padding], 0, err_msg=name)
        else:
            np.testing.assert_array_equal(array[:2], expected.state[name][:2], err_msg=name)
    assert lane.prompts == ["ab", "ab", "hello", "hello"] and lane.errors == {1: "refused"}
    assert lane.prompt_tokens is not None and newcomer.prompt_tokens is not None
    np.testing.assert_array_equal(lane.prompt_tokens[0], newcomer.prompt_tokens[0])
    np.testing.assert_array_equal(lane.tokens[:2], newcomer.tokens)

    wider = policy.start(["the quick brown fox jumps"], 1).one_per_prompt()
    snapshot = {name: array.copy() for name, array in lane.state.items()}
    assert not lane.fill_rows(3, wider)  # its prompt is wider than the batch's columns
    assert not lane.fill_rows(0, policy.start(["ab"], 2))  # two particles a prompt, not one
    for name, array in lane.state.items():
        np.testing.assert_array_equal(array, snapshot[name], err_msg=name)
    with pytest.raises(IndexError, match="rows: rows 3:5"):
        lane.fill_rows(3, newcomer)


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, 3),
    length=st.integers(0, 6),
    extra=st.integers(0, 3),
    skip_fraction=st.floats(0, 1),
    axis=st.sampled_from([1, 2]),
    on_right=st.booleans(),
)
def test_fill_rows_padded_write_is_concatenate_padded_of_one_part(
    rows: int, length: int, extra: int, skip_fraction: float, axis: int, on_right: bool
) -> None:
    """``fill_rows``' write of a padded entry (``_write_padded``: its columns that are padding in every row
    left out, against the far side, zeros elsewhere) gives what ``core.concatenate_padded`` of that one
    part into the same rows gives, over what the rows held before."""
    shape = [rows, 2, 3]
    shape[axis] = length
    source = np.arange(1, np.prod(shape) + 1, dtype=np.int64).reshape(shape)
    skip = int(skip_fraction * length)
    out_shape = list(shape)
    out_shape[axis] = length - skip + extra
    side = "right" if on_right else "left"
    want = core.concatenate_padded([source], axis, [skip], side, out=np.full(out_shape, -1, dtype=np.int64))
    got = np.full(out_shape, -1, dtype=np.int64)
    _write_padded(got, source, axis, skip, on_right)
    np.testing.assert_array_equal(got, want)


def test_fill_rows_at_scattered_rows_writes_what_filling_each_run_where_it_goes_writes(
    policy: OnnxCausalLM,
) -> None:
    """``fill_rows`` at one row index per prompt of the part (rows here and there: newcomers started
    together, each over rows a run left) writes what filling each newcomer's rows from its first row
    writes, every array and the prompts and errors alike; indices of the wrong count, repeated or out
    of the batch raise naming ``rows`` and write nothing."""

    def held() -> Particles:
        return Particles.concatenate(
            [policy.start([text], 2).one_per_prompt() for text in ("the quick brown", "hello", "xy")]
        )

    newcomers = policy.start(["ab", "abcd"], 2).one_per_prompt()
    newcomers.errors = {2: "refused"}
    scattered, one_by_one = held(), held()
    assert scattered.fill_rows([4, 5, 0, 1], newcomers)
    assert one_by_one.fill_rows(4, newcomers.view_rows(0, 2))
    assert one_by_one.fill_rows(0, newcomers.view_rows(2, 4))
    for name, array in scattered.state.items():
        np.testing.assert_array_equal(array, one_by_one.state[name], err_msg=name)
    np.testing.assert_array_equal(scattered.tokens, one_by_one.tokens)
    np.testing.assert_array_equal(scattered.lengths, one_by_one.lengths)
    assert scattered.prompts == one_by_one.prompts == ["abcd", "abcd", "hello", "hello", "ab", "ab"]
    assert scattered.errors == one_by_one.errors == {0: "refused"}
    snapshot = {name: array.copy() for name, array in scattered.state.items()}
    for rows, error in (([4, 5, 0], ValueError), ([4, 4, 0, 1], ValueError), ([4, 5, 0, 6], IndexError)):
        with pytest.raises(error, match="rows: "):
            scattered.fill_rows(rows, newcomers)
    for name, array in scattered.state.items():
        np.testing.assert_array_equal(array, snapshot[name], err_msg=name)


def test_fill_rows_drops_state_the_newcomer_lacks() -> None:
    """A state entry the part lacks (a model's lazily made state) is dropped from the batch, as a join
    drops it; one only the part has is not added."""
    lane = Particles.empty([None] * 3, 1, 4)
    lane.state.update(kept=np.zeros((3, 1)), lazy=np.zeros((3, 1)))
    part = Particles.empty(["new"], 1, 2)
    part.state.update(kept=np.ones((1, 1)), own=np.ones((1, 1)))
    assert lane.fill_rows(1, part)
    assert sorted(lane.state) == ["kept"] and lane.state["kept"].ravel().tolist() == [0.0, 1.0, 0.0]
    assert lane.prompts == [None, "new", None]


def test_packed_moves_rows_to_the_front_and_frees_the_rest_for_joins() -> None:
    """``packed`` is ``select`` made in the batch's own memory: the rows asked for, in order, moved to
    the front (prompts and errors with them) and the batch cut there; an ``in_place`` entry's rows after
    the cut are free again, so the next join writes its newcomers there instead of copying."""
    lane = Particles.concatenate([in_place_batch(2, 3, 1.0, 6), in_place_batch(3, 2, 2.0, 6)])
    lane.prompts = ["a", "b", "c", "d", "e"]
    lane.errors = {3: "bad"}
    lane.tokens[:, 0, 0] = np.arange(5)
    lane.state["cache"][:, 0, 0, 0, 0] = np.arange(5)
    expected = lane.select([4, 1, 3])
    memory = lane.state["cache"].ctypes.data
    packed = lane.packed([4, 1, 3])
    assert packed.prompts == ["e", "b", "d"] and packed.errors == {2: "bad"}
    assert packed.tokens[:, 0, 0].tolist() == [4, 1, 3]
    assert packed.state["cache"].ctypes.data == memory  # the same memory, cut
    np.testing.assert_array_equal(packed.state["cache"][:, :, :, :2], expected.state["cache"][:, :, :, :2])
    np.testing.assert_array_equal(packed.state["mask"], expected.state["mask"])
    joined = Particles.concatenate([packed, in_place_batch(2, 2, 3.0, 6)])
    assert joined.state["cache"].ctypes.data == memory  # the newcomers went into the rows freed
    np.testing.assert_array_equal(joined.state["cache"][3:, :, :, :2], 3.0)
    with pytest.raises(ValueError, match="each prompt at most once"):
        joined.packed([0, 0])
    with pytest.raises(IndexError, match=r"prompts: indices must lie in \[0, 5\)"):
        joined.packed([5])


def test_a_join_given_the_first_part_moves_its_rows_to_the_front() -> None:
    """``concatenate(..., reuse_first=True)``: where no spare rows are left behind the first part's but
    the rows before them are free (its front rows left), they move to the front of their memory, in
    blocks that never overlap their source, and the newcomers are written after them; without it, the
    join copies into new memory and the first part is left as it was."""
    lane = Particles.concatenate([in_place_batch(4, 2, 1.0, 4), in_place_batch(4, 2, 2.0, 4)])
    owner = lane.state["cache"].base
    assert owner is not None and owner.shape[0] == 13  # 8 rows and 5 spare
    lane.state["cache"][:, 0, 0, 0, 0] = np.arange(8)
    lane = Particles.concatenate([lane, in_place_batch(5, 2, 3.0, 4)])  # the spare rows taken
    back = lane.view_rows(3, 13)  # the first three rows left
    rows = back.state["cache"][:, 0, 0, 0, 0].copy()
    copied = Particles.concatenate([back, in_place_batch(2, 2, 4.0, 4)])
    assert not np.shares_memory(copied.state["cache"], owner)
    np.testing.assert_array_equal(back.state["cache"][:, 0, 0, 0, 0], rows)  # left as it was
    moved = Particles.concatenate([back, in_place_batch(2, 2, 4.0, 4)], reuse_first=True)
    cache = moved.state["cache"]
    assert cache.ctypes.data == owner.ctypes.data and cache.shape[0] == 12
    np.testing.assert_array_equal(cache[:10, 0, 0, 0, 0], rows)
    np.testing.assert_array_equal(cache[10:, :, :, :2], 4.0)


def test_trim_padding_drops_unused_columns_by_cost() -> None:
    """``trim_padding``: a mask whose other entries are in place loses every column no row uses (only
    the mask is copied); copied entries only where those columns are at least the share asked."""
    lane = Particles.concatenate([in_place_batch(2, 5, 1.0, 8), in_place_batch(2, 2, 2.0, 8)])
    short = lane.view_rows(2, 4)
    assert not short.trims_by_copying()
    short.trim_padding(0.9)
    assert short.state["mask"].shape[-1] == 2 and short.state["cache"].shape[3] == 8
    copied = Particles.empty([None] * 2, 1, 4)
    copied.state.update(mask=np.zeros((2, 1, 8), np.int64), cache=np.zeros((2, 1, 8, 3)))
    copied.state["mask"][:, :, 6:] = 1  # left-padded: 6 columns no row uses
    copied.aligned.update(mask=(2, "mask"), cache=(2, "mask"))
    assert copied.trims_by_copying()
    copied.trim_padding(0.8)
    assert copied.state["cache"].shape[2] == 8
    copied.trim_padding(0.75)
    assert copied.state["cache"].shape[2] == 2 and copied.state["mask"].shape[2] == 2


def test_select_keeps_each_prompts_error_at_every_position(policy: OnnxCausalLM) -> None:
    """A failed prompt's error follows it to every position ``select`` puts it at: by a negative index
    (counted from the end) and each time it is selected (it was lost, or kept at the last copy only)."""
    particles = policy.start(["a", [999], "bc"], 2)  # prompt 1: an id outside the vocabulary
    message = particles.errors[1]
    assert list(particles.errors) == [1] and particles.finished[1].all()
    cases = [
        ([1], {0: message}),
        ([-2], {0: message}),
        ([1, 1], {0: message, 1: message}),
        ([-2, 0, 1], {0: message, 2: message}),
        ([2, -1, 0], {}),
    ]
    for index, errors in cases:
        chosen = particles.select(index)
        assert chosen.errors == errors, index
        assert chosen.prompts == [particles.prompts[b] for b in index]
        np.testing.assert_array_equal(chosen.finished, particles.finished[index])
    with pytest.raises(IndexError, match=r"^prompts: indices must lie in \[-3, 3\), got \[3\]"):
        particles.select([3])
    with pytest.raises(IndexError, match=r"^prompts: indices must lie in \[-3, 3\), got \[-4\]"):
        particles.select([-4])
