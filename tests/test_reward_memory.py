"""The reward model's session calls stay within their memory budget and score exactly as one call does.

A call re-encodes whole prefixes, so ONNX Runtime's attention holds ``rows x heads x L x L`` tensors:
``OnnxRewardModel`` splits a batch into calls of at most ``max_rows_tokens2`` rows x L^2 (issue #22: the
demo's 256-prefix calls alone took 2 GB).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tiltsmc.models import OnnxCausalLM, OnnxRewardModel

FIXTURES = Path(__file__).parent / "fixtures" / "models"


def _calls(model: OnnxRewardModel) -> list[tuple[int, int]]:
    """Record the ``input_ids`` shape of every session call the model makes from now on."""
    shapes: list[tuple[int, int]] = []
    run = model.session.run

    def recorded(outputs: Any, feeds: dict[str, np.ndarray], *args: Any, **kwargs: Any) -> Any:
        shapes.append(tuple(feeds["input_ids"].shape))  # type: ignore[arg-type]
        return run(outputs, feeds, *args, **kwargs)

    model.session.run = recorded
    return shapes


@pytest.mark.parametrize("budget", [1, 3000, 20_000])
def test_chunked_calls_score_as_one_call_within_the_budget(budget: int) -> None:
    policy = OnnxCausalLM(FIXTURES / "llama-tiny", max_new_tokens=12)
    whole = OnnxRewardModel(FIXTURES / "prm-tiny", kind="logit")
    chunked = OnnxRewardModel(FIXTURES / "prm-tiny", kind="logit")
    whole.max_rows_tokens2 = 10**9
    chunked.max_rows_tokens2 = budget
    rng = np.random.default_rng(0)
    particles = policy.start(["2+2=", "hello there", "x"], 8)  # ragged prompts: 24 rows
    for _ in range(5):
        policy.propose(particles, rng)
    whole_calls, chunked_calls = _calls(whole), _calls(chunked)
    expected = whole.log_value(particles)
    got = chunked.log_value(particles)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert len(whole_calls) == 1
    rows = sum(r for r, _ in chunked_calls)
    assert rows == 24
    longest = max(length for _, length in whole_calls)
    per_call = max(budget // longest**2, 1)
    assert len(chunked_calls) == -(-24 // per_call)  # ceil: as few calls as the budget allows
    assert all(r == 1 or r * longest**2 <= budget for r, _ in chunked_calls)
    if budget >= 24 * longest**2:
        assert len(chunked_calls) == 1
