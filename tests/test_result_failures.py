"""A failed or collapsed prompt reads the same whichever sampler ran it: no sample of positive weight.

``weights``, ``posterior``, ``best``, ``weight_histogram``, ``to_dict`` and the ``tiltsmc run`` lines of a
prompt the policy could not start (too long for the context) or whose every weight became zero (a task with
``Z = 0``) say so for ``smc``, ``sp_gsmc``, ``mh``, ``best_of_n`` and ``rejection`` alike, as ``best`` did
already (single-trajectory samplers used to give such a prompt the log-weight 0: a posterior of
probability 1 on an empty text). And ``weight_histogram`` checks its arguments."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import tiltsmc
from tiltsmc.cli import main
from tiltsmc.models import OnnxCausalLM, OnnxRewardModel
from tiltsmc.samplers.result import SamplerResult
from tiltsmc.tasks import MarkovDFATask

FIXTURES = Path(__file__).parent / "fixtures" / "models"
POLICY, REWARD = str(FIXTURES / "llama-tiny"), str(FIXTURES / "prm-tiny")

SAMPLERS: dict[str, Callable[..., SamplerResult]] = {
    "smc": lambda p, r, prompts: tiltsmc.smc(p, r, prompts, num_particles=3, rng=0),
    "sp_gsmc": lambda p, r, prompts: tiltsmc.sp_gsmc(p, r, prompts, pool_size=3, rng=0),
    "mh": lambda p, r, prompts: tiltsmc.mh(p, r, prompts, pool_size=2, steps=2, rng=0),
    "best_of_n": lambda p, r, prompts: tiltsmc.best_of_n(p, r, prompts, n=3, rng=0),
    "rejection": lambda p, r, prompts: tiltsmc.rejection(p, r, prompts, bound=1.0, max_tries=8, rng=0),
}


def _assert_no_weight(result: SamplerResult, b: int) -> None:
    """Prompt ``b`` of ``result`` reads as a prompt with no sample of positive weight, everywhere."""
    label = f"{result.sampler}, prompt {b}"
    count = len(result.samples[b])
    assert result.collapsed[b], label
    assert result.best(b) is None and result.best_texts()[b] is None, label
    assert result.posterior(b) == {}, label
    weights = result.weights(b)
    assert weights.shape == (count,) and not np.any(weights), label
    assert np.all(np.asarray(result.log_weights[b]) == -np.inf), label
    counts, _ = result.weight_histogram(b, bins=4)
    assert counts.tolist() == [count, 0, 0, 0], label  # every weight is 0: the first bin
    record = result.to_dict()
    assert all(w is None for w in record["log_weights"][b]), label  # null: -inf, a weight of zero
    assert record["log_z"][b] is None, label
    assert f"[{b}] no sample" in repr(result), label


@pytest.fixture(scope="module")
def onnx_models() -> tuple[Any, Any]:
    return OnnxCausalLM(POLICY, max_new_tokens=4), OnnxRewardModel(REWARD, kind="logit")


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_a_failed_prompt_has_no_weight_whichever_the_sampler(sampler: str, onnx_models) -> None:
    policy, reward = onnx_models
    result = SAMPLERS[sampler](policy, reward, ["ab", "x" * 5000])  # prompt 1 does not fit the context
    assert list(result.errors) == [1]
    _assert_no_weight(result, 1)
    if sampler != "rejection":  # the good prompt keeps its sample (rejection may accept none in 8 draws)
        assert result.best(0) is not None and sum(result.posterior(0).values()) == pytest.approx(1.0)
        assert result.weights(0).sum() == pytest.approx(1.0)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_a_collapsed_prompt_has_no_weight_whichever_the_sampler(sampler: str) -> None:
    zero = MarkovDFATask.random(3, 3, 4, zero_reward_fraction=1.0, ensure_positive=False, rng=0)  # Z = 0
    result = SAMPLERS[sampler](zero.policy(), zero.twist(), [(), ()])
    assert not result.errors and result.collapsed.all()
    for b in range(2):
        _assert_no_weight(result, b)


@pytest.mark.parametrize("sampler", ["smc", "sp-gsmc", "mh", "best-of-n", "rejection"])
def test_a_failed_prompts_line_has_no_weight(tmp_path: Path, sampler: str) -> None:
    out = tmp_path / "out.jsonl"
    extra = ["--bound", "1.0", "--max-tries", "8"] if sampler == "rejection" else []
    size = ["--pool-size" if sampler == "sp-gsmc" else "--particles", "2"]
    argv = ["run", "--policy", POLICY, "--reward", REWARD, "--max-new-tokens", "4", "--sampler", sampler]
    prompts = ["--prompt", "ab", "--prompt", "x" * 200]  # prompt 1 does not fit the context
    assert main([*argv, *size, *extra, *prompts, "--json", str(out), "-q"]) == 0
    failed = [json.loads(line) for line in out.read_text().splitlines()][1]
    assert "error" in failed and failed["collapsed"] is True and failed["best"] is None
    assert all(w is None for w in failed["log_weights"])  # was [0.0]: weight 1 on no sample


def _hand_made(log_weights: list[float], collapsed: bool, errors: dict[int, str]) -> SamplerResult:
    """A result built by hand whose log-weights disagree with ``collapsed`` / ``errors``."""
    return SamplerResult(
        sampler="sp_gsmc",
        samples=[np.zeros((len(log_weights), 2), dtype=np.int64)],
        log_weights=[np.array(log_weights)],
        log_z=np.array([-math.inf]),
        ess=np.ones((1, 0)),
        resampled=np.zeros((1, 0), dtype=bool),
        unique_ancestors=np.ones((1, 0), dtype=np.int64),
        log_z_increments=np.zeros((1, 0)),
        collapsed=np.array([collapsed]),
        texts=[[""] * len(log_weights)],
        errors=errors,
    )


@pytest.mark.parametrize(("collapsed", "errors"), [(True, {}), (False, {0: "prompt: too long"})])
def test_readers_check_collapsed_and_errors_whatever_the_log_weights(collapsed: bool, errors: Any) -> None:
    result = _hand_made([0.0], collapsed, errors)
    assert result.best(0) is None and result.posterior(0) == {}
    assert result.weights(0).tolist() == [0.0]
    assert result.weight_histogram(0, bins=2)[0].tolist() == [1, 0]
    # reading leaves the field as it was, and to_dict (and so the server's detail) writes it as it is
    assert result.log_weights[0].tolist() == [0.0] and result.to_dict()["log_weights"] == [[0.0]]


@pytest.mark.parametrize(("collapsed", "errors"), [(True, {}), (False, {0: "prompt: too long"})])
def test_readers_read_a_negative_prompt_index_as_its_prompt(collapsed: bool, errors: Any) -> None:
    """``-1`` is the last prompt for every reader, ``errors`` (keyed 0 .. B - 1) included: a failed prompt
    read from the end had its log-weight 0 read as a weight of 1."""
    result = _hand_made([0.0], collapsed, errors)
    assert result.best(-1) is None and result.posterior(-1) == {}
    assert result.weights(-1).tolist() == [0.0]
    assert result.weight_histogram(-1, bins=2)[0].tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"^prompt: must be >= -1, got -2"):
        result.best(-2)


@pytest.mark.parametrize(
    ("bins", "error", "match"),
    [
        (True, TypeError, "^bins: expected an int, got True"),
        (np.True_, TypeError, "^bins: expected an int, got "),
        (2.0, TypeError, "^bins: expected an int, got 2.0"),
        ("auto", TypeError, "^bins: expected an int, got 'auto'"),
        ([0.0, 0.5, 1.0], TypeError, r"^bins: expected an int, got \[0.0, 0.5, 1.0\]"),
        (None, TypeError, "^bins: expected an int, got None"),
        (0, ValueError, "^bins: must be >= 1, got 0"),
        (-3, ValueError, "^bins: must be >= 1, got -3"),
    ],
)
def test_weight_histogram_refuses_bad_bins(bins: Any, error: type, match: str) -> None:
    result = _hand_made([math.log(0.25), math.log(0.75)], False, {})
    with pytest.raises(error, match=match):
        result.weight_histogram(0, bins=bins)
    counts, edges = result.weight_histogram(0, bins=np.int64(2))
    assert counts.tolist() == [1, 1] and edges.tolist() == [0.0, 0.5, 1.0]
    assert result.weight_histogram(-1)[0].sum() == 2  # the default, 20 bins
    with pytest.raises(TypeError, match=r"^prompt: expected an int, got True"):
        result.weight_histogram(True)


def test_prompt_error_parts_reads_the_one_prefix() -> None:
    """The prefix the CLI renumbers and the server names a field from: ``prompt k: ...`` and the prompts
    argument's ``prompt: ...`` / ``prompts: ...``; nothing else."""
    from tiltsmc.samplers.result import prompt_error_parts

    assert prompt_error_parts("prompt 12: logits: NaN") == (12, "logits: NaN")
    assert prompt_error_parts("prompts: expected a list") == (None, "expected a list")
    assert prompt_error_parts("prompt: empty") == (None, "empty")
    for other in ("num_particles: must be >= 1", "prompt_tokens: 3", "prompt 1 failed", "a prompt 1: x"):
        assert prompt_error_parts(other) is None
