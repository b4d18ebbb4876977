"""One bad prompt fails alone, also mid-run and in a call of several prompts.

The fixtures' graphs are edited (with ``onnx``) to return NaN for rows of at least ``BAD_LENGTH`` real
tokens (prompt and generated): the longest prompt's particles reach it after a few steps, the others
never do. A prompt whose policy logits (naive, optimal proposal) or reward values become NaN so, or
whose ``log Vh_0`` is NaN, is reported as a prompt the policy could not start is (``errors``:
``prompt k: reason``, collapsed, every weight zero, ``log Z = -inf``), and every other prompt gets exactly
the result of the same call on the healthy models, bit for bit.

That is exact where the call takes as many steps either way and the failed prompt is the last: a
run's keys are drawn once a step (the run's length sets the draws after it, and whether the last step
resamples), and the kernels that draw for live prompts only (the pools, the MH and ``final_resample``
picks) number them in order, so a prompt after the failed one would draw another stream. The policies
here have no EOS (``eos_token_id=[]``): every trajectory runs ``MAX_NEW`` tokens. An engine's request
batched with a failing one is compared with the same request alone instead: the same draws, its
``log Z`` up to the rounding of a batch of another size (a relative 1e-6).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import tiltsmc
from onnx_helpers import policy_with_logits_added_after
from poisoned_policy import RefusesText
from tiltsmc.cli import main, output_schema
from tiltsmc.models import OnnxCausalLM, OnnxRewardModel, PolicyTwist
from tiltsmc.samplers.result import SamplerResult
from tiltsmc.tasks import MarkovDFATask
from tiltsmc.tasks.models import MarkovPolicy

FIXTURES = Path(__file__).parent / "fixtures" / "models"
MAX_NEW = 4
BAD_LENGTH = 7
PROMPTS = [[3, 5], [4, 6], [3, 5, 6, 4, 2]]  # prompt 2 reaches BAD_LENGTH tokens after 2 new ones
LOGITS = "prompt 2: logits: model.onnx returned NaN for this prompt's particles (no token can be drawn"
REWARD = "prompt 2: reward: model.onnx returned NaN for "

Sampler = Callable[[Any, Any, list[Any]], SamplerResult]

SAMPLERS: dict[str, Sampler] = {
    "smc": lambda p, r, prompts: tiltsmc.smc(p, r, prompts, num_particles=4, rng=3),
    "smc-every-step": lambda p, r, prompts: tiltsmc.smc(
        p, r, prompts, num_particles=4, ess_threshold=1.0, resample="multinomial", rng=5
    ),
    "smc-final-resample": lambda p, r, prompts: tiltsmc.smc(
        p, r, prompts, num_particles=4, final_resample=2, rng=7
    ),
    "sp_gsmc": lambda p, r, prompts: tiltsmc.sp_gsmc(p, r, prompts, pool_size=3, rng=3),
    "mh": lambda p, r, prompts: tiltsmc.mh(p, r, prompts, pool_size=2, steps=2, rng=3),
    "mh-smc": lambda p, r, prompts: tiltsmc.mh(p, r, prompts, num_particles=3, steps=2, rng=4),
    "best_of_n": lambda p, r, prompts: tiltsmc.best_of_n(p, r, prompts, n=3, rng=3),
    "rejection": lambda p, r, prompts: tiltsmc.rejection(
        p, r, prompts, bound=1.0, num_samples=2, max_tries=4, batch_size=4, rng=3
    ),
}

TWIST_SAMPLERS: dict[str, Callable[[Any, list[Any]], SamplerResult]] = {
    "smc-optimal": lambda p, prompts: tiltsmc.smc(
        p, PolicyTwist(p), prompts, num_particles=4, proposal="optimal", ess_threshold=1.0, rng=3
    ),
    "sp_gsmc-exact": lambda p, prompts: tiltsmc.sp_gsmc(p, PolicyTwist(p), prompts, pool_size=None, rng=3),
    "mh-exact": lambda p, prompts: tiltsmc.mh(p, PolicyTwist(p), prompts, pool_size=None, steps=2, rng=3),
}


def _bad_from_length(name: str, folder: Path, output: str, value: float = math.nan) -> Path:
    """A copy of fixture ``name`` whose ``output`` (``(batch, seq, ...)``) has ``value`` added at every
    position of the rows whose attention mask counts at least ``BAD_LENGTH`` tokens: the prefixes (a
    decoder's step sees its whole cache in the mask) of ``BAD_LENGTH`` tokens and more, the fixture's own
    outputs for the others."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    shutil.copytree(FIXTURES / name, folder)
    model = onnx.load(folder / "model.onnx")
    graph = model.graph
    raw = f"{output}_before_edit"
    for node in graph.node:
        node.output[:] = [raw if each == output else each for each in node.output]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([1], dtype=np.int64), "edit_axes"),
            numpy_helper.from_array(np.array(BAD_LENGTH, dtype=np.int64), "edit_length"),
            numpy_helper.from_array(np.array(value, dtype=np.float32), "edit_value"),
            numpy_helper.from_array(np.array(0, dtype=np.float32), "edit_none"),
            numpy_helper.from_array(np.array([-1, 1, 1], dtype=np.int64), "edit_shape"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("ReduceSum", ["attention_mask", "edit_axes"], ["edit_tokens"], keepdims=0),
            helper.make_node("GreaterOrEqual", ["edit_tokens", "edit_length"], ["edit_rows"]),
            helper.make_node("Where", ["edit_rows", "edit_value", "edit_none"], ["edit_change"]),
            helper.make_node("Reshape", ["edit_change", "edit_shape"], ["edit_added"]),
            helper.make_node("Add", [raw, "edit_added"], [output]),
        ]
    )
    onnx.save(model, folder / "model.onnx")
    return folder


def _bad_after_token(token: int, folder: Path) -> Path:
    """llama-tiny with NaN logits at the positions whose input token is ``token`` (as
    tests/test_engine.py makes them): a particle that draws it fails its prompt at its next draw."""
    return policy_with_logits_added_after(FIXTURES / "llama-tiny", token, math.nan, folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("edited")
    return {
        "policy": OnnxCausalLM(FIXTURES / "llama-tiny", max_new_tokens=MAX_NEW, eos_token_id=[]),
        "bad policy": OnnxCausalLM(
            _bad_from_length("llama-tiny", folder / "llama", "logits"),
            max_new_tokens=MAX_NEW,
            eos_token_id=[],
        ),
        "reward": OnnxRewardModel(FIXTURES / "prm-tiny", kind="logit"),
        "bad reward": OnnxRewardModel(_bad_from_length("prm-tiny", folder / "prm", "logits"), kind="logit"),
        "twist folder": _bad_from_length("gpt2-twist-tiny", folder / "twist", "logits"),
        "twist values folder": _bad_from_length("gpt2-twist-tiny", folder / "twist-values", "twist"),
    }


def _assert_no_weight(result: SamplerResult, b: int) -> None:
    """Prompt ``b`` reads as a prompt with no sample of positive weight (as tests/test_result_failures.py
    checks a prompt the policy could not start)."""
    count = len(result.samples[b])
    assert result.collapsed[b] and result.log_z[b] == -np.inf
    assert result.best(b) is None and result.posterior(b) == {}
    assert result.weights(b).shape == (count,) and not np.any(result.weights(b))
    assert np.all(np.asarray(result.log_weights[b]) == -np.inf)
    record = result.to_dict()
    assert all(w is None for w in record["log_weights"][b]) and record["log_z"][b] is None
    assert f"[{b}] no sample" in repr(result)


_PER_PROMPT = (
    "ess",
    "resampled",
    "unique_ancestors",
    "log_z_increments",
    "log_z_increment_se",
    "acceptance_rate",
    "tries",
    "mh_accepted",
    "proposal_log_z",
    "log_rewards",
)


def _assert_same_prompt(result: SamplerResult, reference: SamplerResult, b: int, texts: bool = True) -> None:
    """Prompt ``b`` of ``result`` is prompt ``b`` of ``reference``, bit for bit (``texts``: both have texts,
    as a policy with a tokenizer gives them)."""
    samples, expected = result.samples[b], reference.samples[b]
    assert len(samples) == len(expected)
    for got, want in zip(samples, expected):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(result.log_weights[b], reference.log_weights[b])
    assert result.log_z[b] == reference.log_z[b] and result.collapsed[b] == reference.collapsed[b]
    if texts:
        assert result.texts is not None and reference.texts is not None
        assert result.texts[b] == reference.texts[b]
    for name in _PER_PROMPT:
        got_field, want_field = getattr(result, name), getattr(reference, name)
        assert (got_field is None) == (want_field is None), name
        if got_field is not None:
            np.testing.assert_array_equal(got_field[b], want_field[b], err_msg=name)


def _assert_full_length(result: SamplerResult, prompts: range) -> None:
    """Every sample of these prompts has ``MAX_NEW`` tokens (the call took as many steps either way)."""
    for b in prompts:
        assert all(len(sample) == MAX_NEW for sample in result.samples[b]), b


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("broken", ["policy", "reward"])
def test_a_prompt_that_goes_bad_mid_run_fails_alone(
    models: dict[str, Any], sampler: str, broken: str
) -> None:
    """The long prompt's logits (its third draw) or reward values (its second step) become NaN: it fails
    alone, and the other prompts get what the healthy models give them (before: the whole call raised)."""
    run = SAMPLERS[sampler]
    reference = run(models["policy"], models["reward"], PROMPTS)
    assert not reference.errors
    _assert_full_length(reference, range(2))
    policy, reward = models["policy"], models["reward"]
    if broken == "policy":
        policy = models["bad policy"]
    else:
        reward = models["bad reward"]
    result = run(policy, reward, PROMPTS)
    assert list(result.errors) == [2]
    assert result.errors[2].startswith(LOGITS if broken == "policy" else REWARD), result.errors[2]
    _assert_no_weight(result, 2)
    for b in (0, 1):
        _assert_same_prompt(result, reference, b)


def test_the_failed_prompts_rows_are_not_scored_again(models: dict[str, Any]) -> None:
    """After the reward model failed on the long prompt's rows (step 2: the batch's call, then one call for
    each of the two other prompts), each step scores the other rows in one call: one call more than the
    healthy run's one a step, not a batch call that fails again and a call per prompt at every step."""
    reference = tiltsmc.smc(models["policy"], models["reward"], PROMPTS, num_particles=4, rng=3)
    result = tiltsmc.smc(models["policy"], models["bad reward"], PROMPTS, num_particles=4, rng=3)
    assert reference.compute.reward_calls == MAX_NEW
    assert result.compute.reward_calls == MAX_NEW + 1
    assert result.compute.reward_evaluations == 12 + 3 * 8  # step 1 every row, then prompts 0 and 1's
    assert result.compute.policy_steps == 12 + 12 + 8 + 8  # prompt 2's particles finished at step 2


def test_a_prompt_that_fails_in_a_later_mh_proposal_only_reads_as_failed(
    models: dict[str, Any], tmp_path: Path
) -> None:
    """A prompt whose particles draw token 10 (its logits then NaN) in the second or third MH proposal
    only (with this seed; in the first it did not: ``steps=0`` runs that one alone): it fails for good,
    the state its first proposal gave it dropped (every proposal's ``Zh`` of it reads 0), and the other
    prompts get what the healthy policy gives them."""
    policy = OnnxCausalLM(_bad_after_token(10, tmp_path / "policy"), max_new_tokens=MAX_NEW, eos_token_id=[])
    prompts = [[3, 5], [4, 6], [8, 9]]
    first = tiltsmc.mh(policy, models["reward"], prompts, pool_size=2, steps=0, rng=13)
    assert not first.errors and np.isfinite(first.proposal_log_z[2, 0])
    result = tiltsmc.mh(policy, models["reward"], prompts, pool_size=2, steps=2, rng=13)
    reference = tiltsmc.mh(models["policy"], models["reward"], prompts, pool_size=2, steps=2, rng=13)
    assert list(result.errors) == [2] and result.errors[2].startswith(LOGITS)
    _assert_no_weight(result, 2)
    assert np.all(result.proposal_log_z[2] == -np.inf)
    for b in (0, 1):
        _assert_same_prompt(result, reference, b)


@pytest.mark.parametrize("sampler", sorted(TWIST_SAMPLERS))
@pytest.mark.parametrize(
    ("folder", "error"),
    [
        ("twist folder", LOGITS),
        ("twist values folder", "prompt 2: reward: model.onnx's twist head: scores: NaN"),
    ],
    ids=["logits", "twist values"],
)
def test_a_bad_prompt_in_the_optimal_proposal_fails_alone(
    models: dict[str, Any], sampler: str, folder: str, error: str
) -> None:
    """The optimal proposal and exact SP-gSMC read the policy's ``next_log_probs`` and the reward model's
    ``next_log_values`` (here the policy's twist head): a prompt whose logits, or values, become NaN fails
    alone there too, and the others get what the healthy model gives them (before: the call raised for the
    whole batch); a call whose every prompt goes bad at once raises."""
    run = TWIST_SAMPLERS[sampler]
    healthy = OnnxCausalLM(
        FIXTURES / "gpt2-twist-tiny", max_new_tokens=MAX_NEW, eos_token_id=[], value_output="twist"
    )
    broken = OnnxCausalLM(models[folder], max_new_tokens=MAX_NEW, eos_token_id=[], value_output="twist")
    reference = run(healthy, PROMPTS)
    assert not reference.errors
    result = run(broken, PROMPTS)
    assert list(result.errors) == [2] and result.errors[2].startswith(error), result.errors
    _assert_no_weight(result, 2)
    for b in (0, 1):
        _assert_same_prompt(result, reference, b)
    with pytest.raises(ValueError, match=re.escape(error.replace("prompt 2: ", ""))):
        run(broken, PROMPTS[2:])  # the policy's reason names the prompt (0), the reward model's error not


class _PolicyGoingBadForOnePrompt(MarkovPolicy):
    """A user's token policy, in Python (no ``log_probs_checked``): the test-bed task's law, but NaN (or
    ``value``) for every token once prompt ``bad``'s particles hold ``after`` tokens (which prompt a row is
    rides in ``particles.state``, following resampling)."""

    log_probs_checked = False

    def __init__(self, task: MarkovDFATask, bad: int, after: int, value: float = math.nan) -> None:
        super().__init__(task)
        self.bad, self.after, self.value = bad, after, value

    def start(self, prompts: Any, num_particles: int) -> Any:
        particles = super().start(prompts, num_particles)
        poisoned = np.zeros(particles.lengths.shape, dtype=bool)
        poisoned[self.bad] = True
        particles.state["test.poisoned"] = poisoned
        return particles

    def next_log_probs(self, particles: Any) -> Any:
        log_p = np.array(super().next_log_probs(particles))
        log_p[particles.state["test.poisoned"] & (particles.lengths >= self.after)] = self.value
        return log_p


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_python_token_policys_bad_law_fails_its_prompt_alone(value: float) -> None:
    """The optimal proposal with a Python token policy: where its ``next_log_probs`` gives one prompt's
    particles NaN, ``+inf`` or only ``-inf``, the samplers fail that prompt alone (``Models`` reads the law
    of a policy that does not promise ``log_probs_checked``), and the others get what the healthy policy
    gives them (before: the draw raised for the whole call)."""
    task = MarkovDFATask.random(4, 3, 5, rng=1)
    twist = task.twist(noise=0.3, rng=2)
    prompts: list[Any] = [()] * 4
    what = {"nan": "NaN", "inf": "+inf", "-inf": "only -inf"}[str(value)]
    for run in (
        lambda policy: tiltsmc.smc(policy, twist, prompts, num_particles=6, proposal="optimal", rng=4),
        lambda policy: tiltsmc.sp_gsmc(policy, twist, prompts, pool_size=None, rng=4),
    ):
        reference = run(task.policy())
        assert not reference.errors
        result = run(_PolicyGoingBadForOnePrompt(task, 2, 2, value))
        assert result.errors == {
            2: f"prompt 2: policy: next_log_probs returned {what} for this prompt's particles (no token can "
            "be drawn from them)"
        }
        _assert_no_weight(result, 2)
        for b in (0, 1, 3):  # the prompt after it too: the draws are numbered by row, failed or not
            _assert_same_prompt(result, reference, b, texts=False)


def test_bad_logits_in_the_engines_optimal_proposal_fail_that_request_alone(models: dict[str, Any]) -> None:
    """In the engine's lane of optimal-proposal requests, the request whose logits become NaN fails with
    its reason and the request batched with it gets what it gets alone (before: every request of the
    batch failed, the policy's next_log_probs raising for all of them)."""
    policy = OnnxCausalLM(
        models["twist folder"], max_new_tokens=MAX_NEW, eos_token_id=[], value_output="twist"
    )
    options: dict[str, Any] = {"num_particles": 3, "proposal": "optimal", "rng": 5}
    with tiltsmc.Engine(policy, PolicyTwist(policy)) as engine:
        alone = engine.submit(PROMPTS[0], "smc", **options).result(timeout=60)
        good = engine.submit(PROMPTS[0], "smc", **options)
        bad = engine.submit(PROMPTS[2], "smc", **options)
        with pytest.raises(ValueError, match="^" + re.escape(LOGITS.replace("prompt 2", "prompt 0"))):
            bad.result(timeout=60)
        result = good.result(timeout=60)
    assert [s.tolist() for s in result.samples[0]] == [s.tolist() for s in alone.samples[0]]
    assert result.log_z[0] == pytest.approx(alone.log_z[0], rel=1e-6)


@pytest.mark.parametrize("kind", ["smc", "sp_gsmc"])
@pytest.mark.parametrize("broken", ["policy", "reward"])
def test_runs_of_several_prompts_batched_in_one_lane_each_as_alone(
    models: dict[str, Any], kind: str, broken: str
) -> None:
    """Runs of two prompts each, one with a prompt that goes bad, stepped together (one SMC step, or one
    pool draw, for both: their arrays shared) give each what it gives alone; a run whose only prompt goes
    bad fails with its reason, returned in its place (``return_errors``) or raised (``RunFailed``)."""
    from tiltsmc.samplers._engine import Models
    from tiltsmc.samplers.lane import RunFailed, run_alone, run_together
    from tiltsmc.samplers.result import Compute
    from tiltsmc.samplers.sequential import smc_run, sp_gsmc_run

    policy = models["bad policy"] if broken == "policy" else models["policy"]
    reward = models["bad reward"] if broken == "reward" else models["reward"]
    shared = Models(policy, reward, Compute())

    def make(prompts: list[Any], seed: int) -> Any:
        if kind == "smc":
            return smc_run(
                shared, prompts, 4, "systematic", 0.5, "naive", seed, record_ancestry=False, max_steps=99
            )
        return sp_gsmc_run(shared, prompts, 3, seed, max_steps=99)

    batches = [[PROMPTS[0], PROMPTS[2]], [PROMPTS[1], [7, 8]], [PROMPTS[2]]]
    together = run_together(shared, [make(p, k) for k, p in enumerate(batches)], return_errors=True)
    for k in (0, 1):
        alone = run_alone(shared, make(batches[k], k))
        assert together[k].errors == alone.errors and list(alone.errors) == ([1] if k == 0 else [])
        for b in (0, 1):
            _assert_same_prompt(together[k], alone, b)
    assert isinstance(together[2], ValueError) and str(together[2]).startswith(
        "prompt 0: logits" if broken == "policy" else "reward: model.onnx returned NaN"
    )
    with pytest.raises(RunFailed) as failed:
        run_together(shared, [make(p, k) for k, p in enumerate(batches)])
    assert failed.value.index == 2


@pytest.mark.parametrize("sampler", ["smc", "sp_gsmc", "best_of_n"])
def test_a_prompt_whose_initial_value_fails_fails_alone(
    models: dict[str, Any], sampler: str, tmp_path: Path
) -> None:
    """``log Vh_0`` of a prompt of ``BAD_LENGTH`` tokens is NaN: that prompt fails as one the policy could
    not start (its particles finished at once, no sample), the others run as with the healthy reward."""
    prompts = [[3, 5], [4, 6], [3, 5, 6, 4, 2, 7, 8]]
    run = SAMPLERS[sampler]
    reference = run(models["policy"], models["reward"], prompts)
    result = run(models["policy"], models["bad reward"], prompts)
    assert list(result.errors) == [2] and result.errors[2].startswith(REWARD + "1 prefix(es)")
    _assert_no_weight(result, 2)
    assert all(len(sample) == 0 for sample in result.samples[2])
    for b in (0, 1):
        _assert_same_prompt(result, reference, b)


def test_a_call_whose_every_prompt_fails_at_once_raises(models: dict[str, Any]) -> None:
    """Where a model fails for every prompt of a call in one go, it is the model at fault: the call raises
    (the reward model's own error; the policy's names the first prompt), as a request of one prompt in the
    serving engine fails with it."""
    long = [[3, 5, 6, 4, 2], [4, 6, 3, 5, 2]]
    with pytest.raises(ValueError, match=re.escape("prompt 0: logits: model.onnx returned NaN for this")):
        tiltsmc.smc(models["bad policy"], models["reward"], long, num_particles=2, rng=0)
    with pytest.raises(ValueError, match=r"^reward: model\.onnx returned NaN for 4 prefix\(es\)"):
        tiltsmc.smc(models["policy"], models["bad reward"], long, num_particles=2, rng=0)
    with tiltsmc.Engine(models["bad policy"], models["reward"]) as engine:
        bad = engine.submit(PROMPTS[2], "smc", num_particles=2, rng=0)
        good = engine.submit(PROMPTS[0], "smc", num_particles=2, rng=0)
        with pytest.raises(ValueError, match=re.escape("prompt 0: logits: model.onnx returned NaN for this")):
            bad.result(timeout=60)
        assert not good.result(timeout=60).errors


def test_a_prompt_that_goes_bad_in_the_cli_fails_alone(
    models: dict[str, Any], tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tiltsmc run``: the prompt whose logits become NaN mid-run gets its line with the error (and a line
    on standard error), the others' lines are what the healthy policy gives them, and the run succeeds
    (before: "run failed on prompt 1", status 1, nothing written)."""
    jsonschema = pytest.importorskip("jsonschema")
    policy = models["bad policy"].model_file.parent
    argv = [
        "run",
        "--reward",
        str(FIXTURES / "prm-tiny"),
        "--max-new-tokens",
        str(MAX_NEW),
        "--particles",
        "3",
    ]
    argv += ["--prompt", "ab", "--prompt", "abcde", "--prompt", "cd", "-q"]  # "abcde": 5 tokens
    out, healthy = tmp_path / "out.jsonl", tmp_path / "healthy.jsonl"
    assert main([*argv, "--policy", str(FIXTURES / "llama-tiny"), "--json", str(healthy)]) == 0
    capfd.readouterr()
    assert main([*argv, "--policy", str(policy), "--json", str(out)]) == 0
    assert capfd.readouterr().err.splitlines() == [
        "tiltsmc: error: prompt 1: logits: model.onnx returned NaN for this prompt's particles (no token can "
        "be drawn from them)"
    ]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    expected = [json.loads(line) for line in healthy.read_text().splitlines()]
    validator = jsonschema.Draft202012Validator(output_schema())
    for record in records:
        validator.validate(record)
    assert [r["prompt_index"] for r in records] == [0, 1, 2]
    failed = records[1]
    assert failed["error"].startswith("prompt 0: logits: model.onnx returned NaN for this prompt's")
    assert failed["collapsed"] is True and failed["log_z"] is None and failed["best"] is None
    for b in (0, 2):
        assert "error" not in records[b]
        for key in ("samples", "texts", "log_weights", "log_z", "ess", "best"):
            assert records[b][key] == expected[b][key], (b, key)
    monkeypatch.setenv("TILTSMC_TRACEBACK", "1")  # the error was made, not raised: no traceback to show
    assert main([*argv, "--policy", str(policy), "--json", str(out)]) == 0
    assert len(capfd.readouterr().err.splitlines()) == 1


@pytest.mark.parametrize("sampler", ["smc", "sp-gsmc"])
def test_a_prompt_the_policy_raises_for_in_the_cli_fails_alone(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, sampler: str
) -> None:
    """``tiltsmc run``: a policy call that raises for the batch holding one prompt runs the batch's prompts
    again in halves (a warning each time, naming the error) until that prompt is alone; its line has the
    policy's error and the compute of its last run (its first run's, restarted, was left at 0 s); the
    others' lines are what they are one prompt a batch."""
    import tiltsmc.cli as cli

    load = cli._load_models
    monkeypatch.setattr(
        cli, "_load_models", lambda args: (RefusesText(load(args)[0], "abcde"), load(args)[1])
    )
    argv = ["run", "--policy", str(FIXTURES / "llama-tiny"), "--reward", str(FIXTURES / "prm-tiny")]
    argv += ["--max-new-tokens", "4", "--seed", "11", "--sampler", sampler, "-q"]
    for prompt in ("ab", "cd", "abcde", "ef", "gh"):
        argv += ["--prompt", prompt]
    together, alone = tmp_path / "together.jsonl", tmp_path / "alone.jsonl"
    capfd.readouterr()
    assert main([*argv, "--json", str(together)]) == 0
    *warnings, error = capfd.readouterr().err.splitlines()
    assert error == "tiltsmc: error: prompt 2: cannot take abcde"
    assert warnings and all(
        re.fullmatch(
            r"tiltsmc: warning: a model call failed for a batch of \d runs \(RuntimeError: cannot take "
            r"abcde\): they run again from their start, in halves of \d and \d",
            line,
        )
        for line in warnings
    ), warnings
    assert main([*argv, "--batch-size", "1", "--json", str(alone)]) == 0
    records = [json.loads(line) for line in together.read_text().splitlines()]
    expected = [json.loads(line) for line in alone.read_text().splitlines()]
    assert records[2]["error"] == expected[2]["error"] == "prompt 0: cannot take abcde"
    assert records[2]["compute"]["total_seconds"] > 0
    for record, one in zip(records, expected):
        for key in set(record) | set(one):
            if key not in ("compute", "run"):
                assert record[key] == one[key], (record["prompt_index"], key)


def test_the_progress_bar_counts_the_steps_of_prompts_that_run_again_as_work_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``tiltsmc run``'s step bar where a batch's call fails and its prompts run again from their start:
    the steps they had taken stay counted and the total grows by as much, so the count never passes the
    total and ends equal to it (the total stayed that of one run per prompt: the bar showed more steps
    done than there were to do)."""
    import tiltsmc.cli as cli

    shown: list[tuple[int, int]] = []

    class Recorded(cli.StepProgress):
        def __init__(self, prompts: int, budget: Any, label: str, enabled: bool) -> None:
            super().__init__(prompts, budget, label, True)

        def advance(self, steps: int) -> None:
            super().advance(steps)
            shown.append((self.bar.n, self.bar.total))

        def close(self) -> None:
            shown.append((self.bar.n, self.bar.total))
            super().close()

    load = cli._load_models
    monkeypatch.setattr(cli, "StepProgress", Recorded)
    monkeypatch.setattr(
        cli, "_load_models", lambda args: (RefusesText(load(args)[0], "abcde"), load(args)[1])
    )
    argv = ["run", "--policy", str(FIXTURES / "llama-tiny"), "--reward", str(FIXTURES / "prm-tiny")]
    argv += ["--max-new-tokens", "4", "--seed", "11", "-q", "--json", os.devnull]
    for prompt in ("ab", "cd", "abcde", "ef", "gh"):
        argv += ["--prompt", prompt]
    assert main(argv) == 0
    assert len(shown) > 5 and all(n <= total for n, total in shown), shown
    assert shown[-1][0] == shown[-1][1] > 5 * 4  # more steps than one run per prompt: some ran again


def test_a_run_started_with_others_names_its_own_prompt(models: dict[str, Any]) -> None:
    """Runs started together in one policy call (the engine's requests joining at one step): a prompt the
    policy cannot start is named by its run's own index, as the run alone names it (it was named by its
    place in the joint start: ``prompt 3`` for a request of one prompt)."""
    from tiltsmc.samplers._engine import Models
    from tiltsmc.samplers.lane import run_alone, run_together
    from tiltsmc.samplers.result import Compute
    from tiltsmc.samplers.sequential import smc_run

    shared = Models(models["policy"], models["reward"], Compute())

    def made(prompts: list[Any]) -> Any:
        return smc_run(
            shared, prompts, 2, "systematic", 0.5, "naive", 0, record_ancestry=False, max_steps=100
        )

    batches = [[[1, 2]], [[3]], [[5], [1000]], [[1000]]]
    together = run_together(shared, [made(p) for p in batches])
    alone = [run_alone(shared, made(p)) for p in batches]
    message = "token ids must lie in [0, 64), got 1000"
    assert [r.errors for r in together] == [{}, {}, {1: f"prompt 1: {message}"}, {0: f"prompt 0: {message}"}]
    assert [r.errors for r in alone] == [r.errors for r in together]


def test_a_rejection_prompt_the_policy_cannot_start_drew_nothing(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Rejection sampling: a prompt the policy could not start (too long for its context) draws nothing,
    so its ``tries`` is 0 and its ``acceptance_rate`` NaN (``null`` in ``tiltsmc run``'s line, as the
    schema says where there was no draw); it read ``tries = batch_size`` and rate 0. The other prompts'
    counts are as before."""
    jsonschema = pytest.importorskip("jsonschema")
    policy = OnnxCausalLM(FIXTURES / "llama-tiny", max_new_tokens=3)
    reward = OnnxRewardModel(FIXTURES / "prm-tiny", kind="logit")
    long = "x" * 300  # 300 tokens: past the fixture's context of 128
    result = tiltsmc.rejection(policy, reward, [long, "ab"], bound=1.0, max_tries=8, batch_size=4, rng=0)
    assert list(result.errors) == [0]
    assert result.tries is not None and result.acceptance_rate is not None
    assert result.tries.tolist() == [0, 4]
    assert math.isnan(result.acceptance_rate[0]) and not math.isnan(result.acceptance_rate[1])
    out = tmp_path / "out.jsonl"
    argv = ["run", "--policy", str(FIXTURES / "llama-tiny"), "--reward", str(FIXTURES / "prm-tiny")]
    argv += ["--sampler", "rejection", "--particles", "4", "--max-tries", "8", "--max-new-tokens", "3"]
    assert main([*argv, "--prompt", "ab", "--prompt", long, "-q", "--json", str(out)]) == 0
    capfd.readouterr()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    validator = jsonschema.Draft202012Validator(output_schema())
    for record in records:
        validator.validate(record)
    assert [(r["tries"], r["acceptance_rate"] is None) for r in records] == [(4, False), (0, True)]
