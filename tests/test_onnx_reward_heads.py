"""Reward models with a class axis (``label=`` / ``classes=``), and decoders exported with a KV cache used as
reward models (fed an empty cache): the reading checked against the sessions' own outputs."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiltsmc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx_helpers import full_sequence, session_logits, with_initializer_set
from tiltsmc.models import OnnxCausalLM, OnnxRewardModel

MODELS = Path(__file__).resolve().parent / "fixtures" / "models"
GPT2, LLAMA, MERGED, PRM = (
    MODELS / name for name in ("gpt2-tiny", "llama-tiny", "gpt2-merged-tiny", "prm-tiny")
)
CACHE_SHAPES = {"gpt2-tiny": (2, 16), "gpt2-merged-tiny": (2, 16), "llama-tiny": (2, 8)}
SPACE, PLUS, MINUS = 39, 47, 46  # the character tokenizer's " ", "+" and "-"


def reference_log_values(
    policy: OnnxCausalLM, particles: Any, read_at: Any, label: int, classes: Any, kind: str
) -> np.ndarray:
    """``log Vh`` of every particle's prefix from the unpadded logits of that prefix alone, read at
    ``read_at(prompt, generated)``, in plain numpy (float64)."""
    values = np.empty(particles.lengths.shape)
    shape = CACHE_SHAPES[policy.model_file.parent.name]
    for b, i in np.ndindex(*values.shape):
        assert particles.prompt_tokens is not None
        prompt = particles.prompt_tokens[b]
        sequence = full_sequence(particles, b, i)
        scores = session_logits(policy, sequence[None], *shape)[0, read_at(prompt, sequence[len(prompt) :])]
        if kind == "log_value" and classes is None:
            values[b, i] = scores[label]
            continue
        chosen = scores if classes is None else scores[classes]
        values[b, i] = scores[label] - np.log(np.sum(np.exp(chosen - chosen.max()))) - chosen.max()
    return values


@pytest.mark.parametrize("path", [GPT2, LLAMA, MERGED])
@pytest.mark.parametrize(
    ("kind", "label", "classes"),
    [("logit", PLUS, None), ("logit", PLUS, [PLUS, MINUS]), ("log_value", MINUS, [PLUS, MINUS, SPACE]),
     ("log_value", SPACE, None)],
)  # fmt: skip
def test_class_head_of_a_decoder_read_as_the_session_gives_it(
    path: Path, kind: str, label: int, classes: Any
) -> None:
    """A decoder export (past inputs fed empty) as a step-scoring PRM: ``log Vh`` is the (restricted)
    log-softmax of its logits at the last token, and at the last step delimiter, for ragged prefixes."""
    policy = OnnxCausalLM(path, max_new_tokens=6, eos_token_id=[])
    particles = policy.start(["ab", "hello there", [5]], 4)
    rng = np.random.default_rng(5)
    for _ in range(4):
        policy.propose(particles, rng)
    last = OnnxRewardModel(path, kind=kind, label=label, classes=classes)  # type: ignore[arg-type]
    expected = reference_log_values(policy, particles, lambda p, g: len(p) + len(g) - 1, label, classes, kind)
    np.testing.assert_allclose(last.log_value(particles), expected, rtol=0, atol=2e-5)
    assert np.all(expected <= 0) or classes is None  # a probability's log, where it is one

    def at_delimiter(prompt: np.ndarray, generated: np.ndarray) -> int:
        where = np.flatnonzero(generated == SPACE)
        return len(prompt) + int(where[-1]) if where.size else len(prompt) - 1

    delimited = OnnxRewardModel(
        path, kind=kind, label=label, classes=classes, position="delimiter", delimiter_ids=[SPACE]
    )  # type: ignore[arg-type]
    expected = reference_log_values(policy, particles, at_delimiter, label, classes, kind)
    np.testing.assert_allclose(delimited.log_value(particles), expected, rtol=0, atol=2e-5)


def test_a_decoder_as_reward_model_in_smc() -> None:
    """The same GPT-2 as a plain and as a merged decoder (``use_cache_branch`` fed False) guides SMC to the
    same particles and log Z."""
    policy = OnnxCausalLM(LLAMA, max_new_tokens=5)
    plain = OnnxRewardModel(GPT2, kind="logit", label=PLUS, classes=[PLUS, MINUS])
    merged = OnnxRewardModel(MERGED, kind="logit", label=PLUS, classes=[PLUS, MINUS])
    assert merged.has_cache_branch and not plain.has_cache_branch
    runs = [tiltsmc.smc(policy, reward, ["ab", "xyz"], num_particles=16, rng=3) for reward in (plain, merged)]
    np.testing.assert_allclose(runs[0].log_z, runs[1].log_z, rtol=0, atol=1e-9)
    assert np.all(np.isfinite(runs[0].log_z)) and runs[0].texts == runs[1].texts


def test_two_reward_models_score_the_same_particles_apart() -> None:
    """Each model keeps its own scores in the particles' state: the second is not handed the first's."""
    policy = OnnxCausalLM(LLAMA, max_new_tokens=4, eos_token_id=[])
    particles = policy.start(["ab", "hello"], 3)
    policy.propose(particles, np.random.default_rng(1))
    first = OnnxRewardModel(PRM, kind="logit")
    second = OnnxRewardModel(GPT2, kind="logit", label=PLUS)
    values = [model.log_value(particles) for model in (first, second, first, second)]
    alone = [OnnxRewardModel(path, kind="logit", **options).log_value(particles)
             for path, options in ((PRM, {}), (GPT2, {"label": PLUS}))]  # fmt: skip
    np.testing.assert_array_equal(values[0], alone[0])
    np.testing.assert_array_equal(values[1], alone[1])
    assert not np.allclose(values[0], values[1])
    np.testing.assert_array_equal(values[2], values[0])
    np.testing.assert_array_equal(values[3], values[1])


def test_class_probabilities_and_bad_scores() -> None:
    """kind='prob' reads class ``k``'s probability (renormalised over ``classes=``); NaN, +inf logits,
    probabilities outside [0, 1] or adding up to 0 are refused naming how many prefixes."""
    reward = OnnxRewardModel(GPT2, kind="prob", label=2)
    probs = np.array([[0.1, 0.2, 0.7], [0.0, 1.0, 0.0]])
    with np.errstate(divide="ignore"):
        np.testing.assert_array_equal(reward._class_log_values(probs), np.log([0.7, 0.0]))
    restricted = OnnxRewardModel(GPT2, kind="prob", label=2, classes=[0, 2])
    # 0.1 + 0.7 is 0.8 to an ulp, and log's relative error is the argument's over |log| (0.13) plus its own
    # rounding, which numpy's builds differ in: a few 1e-15
    np.testing.assert_allclose(restricted._class_log_values(probs[:1]), np.log([0.7 / 0.8]), rtol=1e-14)
    with pytest.raises(ValueError, match=r"probability 0 for every class in classes= for 1 prefix\(es\)"):
        restricted._class_log_values(probs)
    with pytest.raises(ValueError, match=r"outside \[0, 1\] \(kind='prob'\) for 1 prefix\(es\)"):
        reward._class_log_values(np.array([[0.1, 0.2, 0.7], [0.1, 0.2, 1.5]]))
    logits = OnnxRewardModel(GPT2, kind="logit", label=1)
    np.testing.assert_allclose(
        logits._class_log_values(np.array([[0.0, 0.0], [-np.inf, 3.0], [2.0, -np.inf]])),
        [np.log(0.5), 0.0, -np.inf],
        rtol=1e-15,
    )
    with pytest.raises(ValueError, match=r"returned \+inf as a class logit for 1 prefix\(es\)"):
        logits._class_log_values(np.array([[0.0, 1.0], [np.inf, 1.0]]))
    with pytest.raises(ValueError, match=r"returned -inf for every class for 2 prefix\(es\)"):
        logits._class_log_values(np.full((2, 3), -np.inf))
    with pytest.raises(ValueError, match=r"returned NaN for 1 prefix\(es\)"):
        logits._class_log_values(np.array([[0.0, np.nan], [0.0, 1.0]]))
    as_log = OnnxRewardModel(GPT2, kind="log_value", label=0)
    with pytest.raises(ValueError, match=r"\+inf as a log-value for 1 prefix\(es\)"):
        as_log._class_log_values(np.array([[np.inf, 0.0], [0.0, np.inf]]))
    with pytest.raises(ValueError, match=r"label: 4 is not a class of 'logits' \(3 classes\)"):
        OnnxRewardModel(GPT2, kind="logit", label=4)._class_log_values(probs)


@pytest.fixture(scope="module")
def logit_readers() -> dict[Any, OnnxRewardModel]:
    """GPT-2's logits read as class logits: label 0 alone over all classes, and over classes 0..k."""
    readers: dict[Any, OnnxRewardModel] = {None: OnnxRewardModel(GPT2, kind="logit", label=0)}
    for k in range(2, 6):
        readers[k] = OnnxRewardModel(GPT2, kind="logit", label=0, classes=list(range(k)))
    return readers


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    scores=st.lists(
        st.lists(st.floats(-1e4, 1e4, allow_nan=False) | st.just(-np.inf), min_size=6, max_size=6),
        min_size=1,
        max_size=5,
    ),
    restrict=st.sampled_from([None, 2, 3, 5]),
)
def test_class_logits_are_a_log_softmax(
    logit_readers: dict[Any, OnnxRewardModel], scores: list[list[float]], restrict: Any
) -> None:
    """Against a long-double reference: log Vh = s_0 - log sum exp over the classes, where one class is
    finite; and the values of every label of the classes add up to probability 1."""
    vectors = np.array(scores)
    chosen = vectors if restrict is None else vectors[:, :restrict]
    if not np.all(np.isfinite(chosen).any(axis=1)):
        with pytest.raises(ValueError, match="-inf for every class"):
            logit_readers[restrict]._class_log_values(vectors)
        return
    got = logit_readers[restrict]._class_log_values(vectors)
    wide = chosen.astype(np.longdouble)
    top = wide.max(axis=1, keepdims=True)
    expected = wide[:, 0] - (top[:, 0] + np.log(np.exp(wide - top).sum(axis=1)))
    np.testing.assert_allclose(got, expected.astype(np.float64), rtol=1e-12, atol=1e-9)
    total = np.zeros(len(vectors))
    for label in range(chosen.shape[1]):
        reordered = chosen.copy()
        reordered[:, [0, label]] = reordered[:, [label, 0]]  # label moved to class 0
        total += np.exp(logit_readers[None]._class_log_values(reordered))
    np.testing.assert_allclose(total, 1.0, rtol=1e-12)


def test_nan_logits_of_a_decoder_reward(tmp_path: Path) -> None:
    """A real session whose embeddings are NaN: every class logit is NaN, and the run says so."""
    shutil.copytree(GPT2, tmp_path / "gpt2-nan")
    model = tmp_path / "gpt2-nan" / "model.onnx"
    model.write_bytes(with_initializer_set(model.read_bytes(), "transformer.wte.weight", float("nan")))
    reward = OnnxRewardModel(tmp_path / "gpt2-nan", kind="logit", label=PLUS, classes=[PLUS, MINUS])
    policy = OnnxCausalLM(LLAMA, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"reward: model\.onnx returned NaN for 2 prefix\(es\)"):
        tiltsmc.smc(policy, reward, prompts=["ab", "cd"], num_particles=1, rng=0)


@pytest.mark.parametrize(
    ("path", "options", "message"),
    [
        (GPT2, {}, r"output: 'logits' has 64 classes per position .*pass label="),
        (GPT2, {"label": 64}, r"label: 64 is not a class of 'logits' \(64 classes\)"),
        (GPT2, {"label": -1}, r"label: expected a class index >= 0, got -1"),
        (GPT2, {"label": True}, r"label: expected a class index >= 0, got True"),
        (GPT2, {"classes": [1, 2]}, r"classes: needs label="),
        (GPT2, {"label": 1, "classes": [2, 3]}, r"classes: \[2, 3\] must include label 1"),
        (GPT2, {"label": 1, "classes": [1, 1]}, r"classes: expected two or more distinct class indices"),
        (GPT2, {"label": 1, "classes": [1]}, r"classes: expected two or more distinct class indices"),
        (GPT2, {"label": 1, "classes": [1, 99]}, r"classes: 99 is not a class of 'logits' \(64 classes\)"),
        (GPT2, {"label": 1, "classes": "12"}, r"classes: expected a sequence of class indices"),
        (
            GPT2,
            {"label": 1, "output": "present.0.key"},
            r"output: 'present.0.key' has shape \[.*\]; with label=",
        ),
    ],
)
def test_bad_class_options_are_refused(path: Path, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OnnxRewardModel(path, kind="logit", **options)


def test_per_position_scores_without_class_axis_still_read() -> None:
    """prm-tiny's (batch, seq, 1) needs no label; with label=0 it is a one-class softmax: Vh = 1."""
    policy = OnnxCausalLM(LLAMA, max_new_tokens=3, eos_token_id=[])
    particles = policy.start(["ab"], 3)
    policy.propose(particles, np.random.default_rng(0))
    assert OnnxRewardModel(PRM, kind="logit").label is None
    np.testing.assert_array_equal(OnnxRewardModel(PRM, kind="logit", label=0).log_value(particles), 0.0)


def test_prefixes_of_very_different_lengths_are_scored_in_buckets() -> None:
    """Rows sorted by length and scored in buckets (each bucket padded to its own longest) give the values
    of one call padded to the longest of all."""
    policy = OnnxCausalLM(MODELS / "gpt2-tiny", max_new_tokens=24)
    reward = OnnxRewardModel(MODELS / "prm-tiny", kind="logit")
    particles = policy.start(["a", "the quick brown fox jumps over"], 48)
    rng = np.random.default_rng(0)
    particles.tokens[:] = rng.integers(0, 64, particles.tokens.shape)
    particles.lengths[:] = rng.integers(0, 25, particles.lengths.shape)
    buckets = reward._length_buckets(particles, None)
    assert buckets is not None and len(buckets) > 1
    assert sorted(np.concatenate(buckets).tolist()) == list(range(96))
    bucketed = reward.log_value(particles)
    one_call = OnnxRewardModel(MODELS / "prm-tiny", kind="logit")
    one_call.bucket_rows = 10**9
    np.testing.assert_allclose(bucketed, one_call.log_value(particles), rtol=0, atol=2e-5)
