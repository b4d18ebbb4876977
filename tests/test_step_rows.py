"""A step of several tokens decoded on the rows still writing it (``OnnxCausalLM(step_rows_below=...)``,
``tiltsmc.models._fed_rows``): the same draws, logits, values and caches as every row every call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiltsmc
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx_helpers import assert_float32_close
from tiltsmc.models import OnnxCausalLM, OnnxRewardModel
from tiltsmc.models._fed_rows import FedRows

pytest.importorskip("onnxruntime")

FIXTURES = Path(__file__).parent / "fixtures" / "models"
LLAMA = FIXTURES / "llama-tiny"
GPT2 = FIXTURES / "gpt2-tiny"
GPT2_VALUE = FIXTURES / "gpt2-value-tiny"
PRM = FIXTURES / "prm-tiny"
SPACE = 39
PROMPTS = ["hi there", [7, 8], "x", "the cat sat."]


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 7),
    width=st.integers(0, 3),
    below=st.sampled_from([0.25, 0.5, 0.75, 1.0]),
    calls=st.lists(st.lists(st.booleans(), min_size=7, max_size=7), min_size=1, max_size=6),
)
def test_merge_lays_back_every_row_as_if_fed_padding(
    rows: int, width: int, below: float, calls: list[list[bool]]
) -> None:
    """Session calls simulated on ``(rows, heads, width, dim)`` caches, each appending a column whose
    values name its row and call. The rows fed a real token only shrink (``still``, each call's a subset
    of the last's); every row is fed in the reference. Merged, each row holds the reference's columns
    wherever it was fed a real token (and its first ``width``), and elsewhere the reference's or zeros;
    the session ran on exactly the rows it was given."""
    heads, dim = 2, 3
    start = np.arange(rows * heads * width * dim, dtype=np.float32).reshape(rows, heads, width, dim) + 1
    reference = start.copy()
    fed = FedRows(rows, below)
    caches = [start.copy(), -start.copy()]  # two tensors: a key and a value
    still = np.ones(rows, dtype=bool)
    real = np.zeros((rows, width + len(calls)), dtype=bool)
    real[:, :width] = True
    for call, flags in enumerate(calls):
        still &= np.array(flags[:rows])
        if not still.any():
            break
        index, past = fed.session_rows(caches, still)
        ran = np.arange(rows) if index is None else index
        assert set(np.flatnonzero(still)) <= set(ran.tolist())
        assert all(p.shape[0] == len(ran) for p in past)
        column = (1000 * (call + 1) + ran).astype(np.float32)[:, None, None, None] * np.ones(
            (1, heads, 1, dim)
        )
        present = [
            np.concatenate([p, sign * column.astype(np.float32)], axis=2) for p, sign in zip(past, (1, -1))
        ]
        if index is None:
            caches = present
        else:
            fed.keep(present)
        every = (1000 * (call + 1) + np.arange(rows)).astype(np.float32)[:, None, None, None]
        reference = np.concatenate([reference, every * np.ones((1, heads, 1, dim), np.float32)], axis=2)
        real[still, width + call] = True
    merged = fed.merge()
    if merged is None:  # no row set aside: the policy's own arrays were kept up to date
        np.testing.assert_array_equal(caches[0], reference)
        np.testing.assert_array_equal(caches[1], -reference)
        return
    length = reference.shape[2]
    real = real[:, :length]
    for got, sign in zip(merged, (1, -1)):
        assert got.shape == reference.shape and got.dtype == np.float32
        expected = sign * reference
        where = np.broadcast_to(real[:, None, :, None], got.shape)
        np.testing.assert_array_equal(got[where], expected[where])
        other = got[~where]
        assert np.all((other == expected[~where]) | (other == 0))


def _steps(path: Path, step: Any, below: float, options: dict[str, Any]) -> tuple[list[Any], list[int]]:
    """Every ``propose`` of a batch until it has finished, with the state after each, and the rows of each
    decoding session call."""
    policy = OnnxCausalLM(path, max_new_tokens=10, step=step, step_rows_below=below, **options)
    rows: list[int] = []
    run = policy.session.run

    def counting(names: Any, feeds: dict[str, Any], *args: Any) -> Any:
        if feeds["input_ids"].shape[1] == 1:  # a decoding call (prompts are wider)
            rows.append(int(feeds["input_ids"].shape[0]))
        return run(names, feeds, *args)

    policy.session.run = counting  # type: ignore[method-assign]
    particles = policy.start(PROMPTS, 6)
    rng = np.random.default_rng(5)
    states = []
    while not particles.finished.all():
        log_p = policy.propose(particles, rng)
        particles.flush()
        states.append((log_p, particles.tokens.copy(), particles.lengths.copy(), dict(particles.state)))
    return states, rows


@pytest.mark.parametrize(
    ("path", "step", "options"),
    [
        pytest.param(LLAMA, "\n", {}, id="llama-newline"),
        pytest.param(GPT2, {SPACE}, {}, id="gpt2-space-id"),
        pytest.param(GPT2_VALUE, {SPACE}, {"value_output": "value"}, id="value-head"),
    ],
)
def test_a_step_on_the_rows_still_writing_it_draws_the_same(
    path: Path, step: Any, options: dict[str, Any]
) -> None:
    """With ``step_rows_below`` 0 every decoding call runs every row; with 0.75 or 1 the calls run on fewer
    rows once rows have written their step or finished (the test fails if none does). Each step then draws
    the same tokens with the same log-probabilities, and leaves the same logits, value scores and masks, and
    the same caches wherever the mask lets a column through (the others are masked padding: zeros where a
    row was set aside)."""
    reference, every_row = _steps(path, step, 0.0, options)
    batch_rows = len(PROMPTS) * 6
    assert every_row and set(every_row) == {batch_rows}
    for below in (0.75, 1.0):
        states, rows = _steps(path, step, below, options)
        assert min(rows) < batch_rows, f"below={below}: no call ran on fewer rows"
        assert len(states) == len(reference)
        for (log_p, tokens, lengths, state), (log_p0, tokens0, lengths0, state0) in zip(states, reference):
            np.testing.assert_array_equal(tokens, tokens0)
            np.testing.assert_array_equal(lengths, lengths0)
            assert_float32_close(log_p, log_p0, "log_p")
            assert set(state) == set(state0)
            mask = state0["lm.mask"]
            np.testing.assert_array_equal(state["lm.mask"], mask)
            for key, value in state0.items():
                if key.startswith("lm.cache."):
                    through = np.broadcast_to(mask[:, :, None, :, None] == 1, value.shape)
                    assert state[key].shape == value.shape
                    assert_float32_close(state[key][through], value[through], key)
                elif isinstance(value, np.ndarray) and value.dtype.kind == "f":
                    assert_float32_close(state[key], value, key)


def test_samplers_give_the_same_results_on_fewer_rows() -> None:
    """``tiltsmc.smc`` with the policy's steps run on the rows still writing them, or on every row: the same
    samples and weights (to float32 rounding), through the reward model's calls and resampling."""
    results = []
    for below in (0.0, 0.75):
        policy = OnnxCausalLM(LLAMA, max_new_tokens=10, step="\n", step_rows_below=below)
        reward = OnnxRewardModel(PRM, kind="logit")
        results.append(tiltsmc.smc(policy, reward, PROMPTS, num_particles=8, rng=3))
    fewer, every = results[1], results[0]
    for got, expected in zip(fewer.samples, every.samples):
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)
    for got, expected in zip(fewer.log_weights, every.log_weights):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(fewer.log_z, every.log_z, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    ("below", "error", "match"),
    [
        (-0.1, ValueError, r"step_rows_below: expected a fraction in \[0, 1\], got -0.1"),
        (1.5, ValueError, r"step_rows_below: expected a fraction in \[0, 1\], got 1.5"),
        (float("nan"), ValueError, "step_rows_below: expected a fraction"),
        ("0.5", TypeError, "step_rows_below: expected a number"),
        (True, TypeError, "step_rows_below: expected a number"),
    ],
)
def test_step_rows_below_is_checked(below: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        OnnxCausalLM(LLAMA, step="\n", step_rows_below=below)
