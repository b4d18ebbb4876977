"""``OnnxCausalLM(check_batching=True)``: a graph whose rows depend on their padding or on the other rows of
their batch is refused at load; ``OnnxRewardModel`` re-encodes such a graph rather than keep its KV cache.

The samplers batch prompts of different lengths by padding them and feed a row that is not extended at a
call padding; the law a particle is drawn from is the policy's only if neither changes its logits.
``gqa-tiny`` (``scripts/make_gqa_fixture.py``) has attention that reads each row's length from its mask, as
onnxruntime-genai's builder exports it: refused left-padded, run right-padded. ``int8-tiny``
(``scripts/make_int8_fixture.py``, dynamic int8 quantisation) is refused on both sides.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiltsmc
from tiltsmc.models import OnnxCausalLM, OnnxRewardModel
from tiltsmc.models.onnx_lm import BATCHING_TOLERANCE
from tiltsmc.tasks.arithmetic import MODELS_DIR

FIXTURES = Path(__file__).parent / "fixtures" / "models"
GQA = FIXTURES / "gqa-tiny"
INT8 = FIXTURES / "int8-tiny"


@pytest.mark.parametrize(
    ("path", "options"),
    [
        (FIXTURES / "gpt2-tiny", {}),
        (FIXTURES / "llama-tiny", {}),
        (FIXTURES / "gpt2-merged-tiny", {}),
        (FIXTURES / "gpt2-value-tiny", {"value_output": "value"}),
        (FIXTURES / "gpt2-twist-tiny", {"value_output": "twist"}),
        (MODELS_DIR / "joint", {"value_output": "value"}),
    ],
    ids=["gpt2", "llama", "merged", "value-head", "twist-head", "demo-joint"],
)
def test_optimum_layouts_give_a_row_the_same_logits_in_a_batch(path: Path, options: dict[str, Any]) -> None:
    """The exports the library is built for load, and a row's logits move by float rounding at most."""
    policy = OnnxCausalLM(path, max_new_tokens=4, **options)
    difference, scale = policy.batching_difference()
    assert scale > 1.0  # logits far from zero: the comparison has something to compare
    assert difference <= 1e-5 * scale


def test_attention_that_reads_lengths_from_the_mask_runs_right_padded() -> None:
    """By default the padding side is found at load: left for the optimum exports, right for the
    GroupQueryAttention graph, whose rows then move by float rounding only; asked to pad it on the left,
    the policy refuses it, naming the operator."""
    assert OnnxCausalLM(FIXTURES / "llama-tiny", max_new_tokens=4).padding_side == "left"
    policy = OnnxCausalLM(GQA, max_new_tokens=4)
    assert policy.padding_side == "right"
    difference, scale = policy.batching_difference()
    assert scale > 1.0 and difference <= 1e-5 * scale
    with pytest.raises(ValueError, match="GroupQueryAttention") as refused:
        OnnxCausalLM(GQA, max_new_tokens=4, padding_side="left")
    message = str(refused.value)
    assert "model.onnx" in message and "left-padded by up to" in message and "right-padded by" not in message
    assert "check_batching=False" in message and "padding_side=None" in message
    with pytest.raises(ValueError, match="right-padded by up to"):
        OnnxCausalLM(FIXTURES / "llama-tiny", max_new_tokens=4, padding_side="right")


def test_rows_that_depend_on_their_batch_either_side_are_refused() -> None:
    with pytest.raises(ValueError, match="DynamicQuantizeLinear") as refused:
        OnnxCausalLM(INT8, max_new_tokens=4)
    message = str(refused.value)
    assert "left-padded by up to" in message and "right-padded by up to" in message
    assert "check_batching=False" in message and "optimum" in message and "padding_side=None" not in message
    assert OnnxCausalLM(INT8, max_new_tokens=4, check_batching=False).padding_side == "left"


@pytest.mark.parametrize("value", ["both", "Left", 1])
def test_padding_side_is_left_right_or_none(value: Any) -> None:
    with pytest.raises(ValueError, match="padding_side: expected 'left', 'right' or None"):
        OnnxCausalLM(FIXTURES / "gpt2-tiny", max_new_tokens=4, padding_side=value)


def test_without_the_check_the_side_follows_the_operator() -> None:
    assert OnnxCausalLM(GQA, max_new_tokens=4, check_batching=False).padding_side == "right"
    assert OnnxCausalLM(FIXTURES / "gpt2-tiny", max_new_tokens=4, check_batching=False).padding_side == "left"
    forced = OnnxCausalLM(GQA, max_new_tokens=4, check_batching=False, padding_side="left")
    assert forced.padding_side == "left"


def test_the_message_names_the_operators_it_finds(tmp_path: Path) -> None:
    """A refused graph's message names the batch-dependent operators its file holds (read only then),
    else the usual causes."""
    from tiltsmc.models.onnx_lm import BATCH_DEPENDENT_OPERATORS, _operators_named

    assert _operators_named(GQA / "model.onnx", BATCH_DEPENDENT_OPERATORS) == [
        BATCH_DEPENDENT_OPERATORS["GroupQueryAttention"]
    ]
    assert _operators_named(FIXTURES / "gpt2-tiny" / "model.onnx", BATCH_DEPENDENT_OPERATORS) == []
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert _operators_named(tmp_path / "empty.onnx", BATCH_DEPENDENT_OPERATORS) == []
    assert _operators_named(tmp_path / "absent.onnx", BATCH_DEPENDENT_OPERATORS) == []


def test_what_the_check_guards_against() -> None:
    """Loaded left-padded anyway, the fixture gives a prompt other next-token logits beside a longer prompt
    than alone; right-padded, or an optimum export left-padded, the same. The check's difference is of that
    order, far over its tolerance."""
    gqa = OnnxCausalLM(GQA, max_new_tokens=4, check_batching=False, padding_side="left")
    gqa_right = OnnxCausalLM(GQA, max_new_tokens=4)
    gpt2 = OnnxCausalLM(FIXTURES / "gpt2-tiny", max_new_tokens=4)
    for policy, moved in ((gqa, True), (gqa_right, False), (gpt2, False)):
        together = policy.start(["ab", "abcd"], 2).state["lm.logits"][0, 0]
        alone = policy.start(["ab"], 2).state["lm.logits"][0, 0]
        assert (np.abs(together - alone).max() > 0.1) == moved
    difference, scale = gqa.batching_difference()
    assert difference > 50 * BATCHING_TOLERANCE * max(1.0, scale)  # 0.9 of the largest logit


def test_a_masked_step_is_what_the_check_reads_too() -> None:
    """Rows of one prompt (no padding), one of them fed padding for a step and then a token, against the
    same tokens alone: the fixture left-padded moves the row; right-padded, or an optimum export, not."""
    cases = ((GQA, "left", True), (GQA, "right", False), (FIXTURES / "gpt2-tiny", "left", False))
    for path, side, moved in cases:
        policy = OnnxCausalLM(path, max_new_tokens=4, check_batching=False, padding_side=side)
        particles = policy.start(["ab"], 2)
        policy.append(particles, np.array([[13, 17]]))
        particles.finished[0, 0] = True  # row 0 is not extended at the next call: fed masked padding
        policy.append(particles, np.array([[0, 19]]))
        particles.finished[0, 0] = False
        policy.append(particles, np.array([[19, 19]]))
        particles.flush()
        alone = policy.start(["ab"], 1)
        for token in (13, 19):
            policy.append(alone, np.array([[token]]))
        alone.flush()
        row, reference = particles.state["lm.logits"][0, 0], alone.state["lm.logits"][0, 0]
        assert (np.abs(row - reference).max() > 0.1) == moved


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_check_batching_is_a_bool(value: Any) -> None:
    with pytest.raises(TypeError, match="check_batching: expected True or False"):
        OnnxCausalLM(FIXTURES / "gpt2-tiny", max_new_tokens=4, check_batching=value)


def test_cli_refuses_the_graph_unless_told(tmp_path: Path, capfd: Any) -> None:
    from tiltsmc.cli import main

    base = ["run", "--policy", str(INT8), "--reward", str(FIXTURES / "prm-tiny"), "--reward-kind", "logit"]
    base += ["--max-new-tokens", "3", "--prompt", "ab", "--seed", "1", "--particles", "2"]
    assert main(base) == 2
    assert "DynamicQuantizeLinear" in capfd.readouterr().err
    assert main([*base, "--check-batching", "off", "--json", str(tmp_path / "out.jsonl")]) == 0
    capfd.readouterr()
    gqa = [*base[:2], str(GQA), *base[3:]]
    assert main([*gqa, "--padding-side", "left"]) == 2
    assert "GroupQueryAttention" in capfd.readouterr().err
    assert main([*gqa, "--json", str(tmp_path / "gqa.jsonl")]) == 0
    capfd.readouterr()
    assert main(["serve", "--demo", "--check-batching", "off", "--port", "0"]) == 2  # refused before serving
    assert "--check-batching: not an option of the bundled --demo models" in capfd.readouterr().err


# -- the reward model's KV cache: tried against re-encoding at load ----------------------------------------


@pytest.mark.parametrize(
    ("path", "options"),
    [(FIXTURES / "gpt2-value-tiny", {"output": "value"}), (FIXTURES / "llama-tiny", {"label": 3})],
    ids=["value-head", "causal-lm-label"],
)
def test_a_reward_cache_that_gives_re_encodings_values_is_kept(path: Path, options: dict[str, Any]) -> None:
    reward = OnnxRewardModel(path, **options)
    assert reward.kv_cached
    difference, scale = reward.cache_difference()
    assert scale > 0.5 and difference <= 1e-5 * max(1.0, scale)


def test_a_reward_graph_that_reads_lengths_from_the_mask_is_re_encoded(caplog: Any) -> None:
    """Its cached scores differ from re-encoding's, so it re-encodes (with a warning), and right-padded
    re-encoding gives each prefix of a ragged batch its value alone; ``kv_cache=True`` is refused."""
    with caplog.at_level(logging.WARNING, logger="tiltsmc.models.onnx_reward"):
        reward = OnnxRewardModel(GQA, output="logits", label=3)
    assert not reward.kv_cached
    assert "re-encoding every prefix instead" in caplog.text and "GroupQueryAttention" in caplog.text
    prefixes = [np.array([3, 5, 13]), np.array([11, 18, 25, 32, 17, 19]), np.array([7])]
    together = reward._score(prefixes)
    alone = np.array([reward._score([prefix])[0] for prefix in prefixes])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    policy = OnnxCausalLM(FIXTURES / "gpt2-tiny", max_new_tokens=3)
    result = tiltsmc.smc(policy, reward, prompts=["ab", "abcdef"], num_particles=3, rng=0)
    assert np.isfinite(result.log_z).all()
    with pytest.raises(ValueError, match=r"kv_cache: model\.onnx's scores with its KV cache .* differ"):
        OnnxRewardModel(GQA, output="logits", label=3, kv_cache=True)
    with pytest.raises(ValueError, match="cache_difference: this reward model re-encodes"):
        reward.cache_difference()
