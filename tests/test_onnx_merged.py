"""OnnxCausalLM on a *merged* optimum decoder (tests/fixtures/models/gpt2-merged-tiny).

``decoder_model_merged.onnx`` is one graph with a boolean ``use_cache_branch`` input (shape (1,)): False
runs the no-cache branch (first call, empty past), True the cached one. The fixture is the same GPT-2 as
gpt2-tiny (same config, seed and weights) in that layout. CPU only, a few seconds.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import onnx_helpers
import pytest
import tiltsmc
from onnx_helpers import assert_state_follows
from tiltsmc.models import OnnxCausalLM, OnnxRewardModel, Particles

pytest.importorskip("onnxruntime")
pytest.importorskip("tokenizers")

FIXTURES = Path(__file__).parent / "fixtures" / "models"
MERGED = FIXTURES / "gpt2-merged-tiny"
GPT2 = FIXTURES / "gpt2-tiny"
PRM = FIXTURES / "prm-tiny"
VOCAB = 64
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16  # tests/fixtures/models/README.md
PAST = [f"past_key_values.{i}.{kind}" for i in range(LAYERS) for kind in ("key", "value")]
PRESENT = [f"present.{i}.{kind}" for i in range(LAYERS) for kind in ("key", "value")]

# Ragged prompts, text and token ids mixed (left padding in one batch).
RAGGED = ["hello world", [5, 6, 7], "a", "the cat sat."]


def cache_shape(particles: Any) -> tuple[int, ...]:
    """Shape of layer 0's key cache, ``(B, N, heads, seq, head_dim)``, on the host or the GPU."""
    particles.flush()  # the session run the policy deferred
    if "lm.cache" in particles.state:  # DeviceKVCache: (B, N, tensors, heads, seq, head_dim)
        batch, count, _, heads, length, head_dim = particles.state["lm.cache"].shape
        return (batch, count, heads, length, head_dim)
    return tuple(particles.state["lm.cache.0.key"].shape)


@pytest.fixture(scope="module")
def policy() -> OnnxCausalLM:
    return OnnxCausalLM(MERGED, max_new_tokens=6)


def assert_cache_matches_recompute(policy: OnnxCausalLM, particles: Particles) -> int:
    """Every unfinished particle's next-token logits equal a full recompute on the no-cache branch
    (``use_cache_branch = [False]``, empty past) to 1e-4."""
    assert policy.has_cache_branch and policy.has_position_ids
    return onnx_helpers.assert_cache_matches_recompute(policy, particles, KV_HEADS, HEAD_DIM)


def test_merged_file_is_loaded_with_its_cache_branch(policy: OnnxCausalLM) -> None:
    assert policy.model_file.name == "decoder_model_merged.onnx"
    assert policy.has_cache_branch is True
    assert policy.has_position_ids is True
    assert (policy.num_layers, policy.kv_heads, policy.head_dim, policy.vocab_size) == (
        LAYERS,
        KV_HEADS,
        HEAD_DIM,
        VOCAB,
    )
    inputs = {node.name: node for node in policy.session.get_inputs()}
    assert set(inputs) == {"input_ids", "attention_mask", "position_ids", "use_cache_branch", *PAST}
    assert inputs["use_cache_branch"].type == "tensor(bool)"
    assert inputs["use_cache_branch"].shape == [1]
    assert [node.name for node in policy.session.get_outputs()] == ["logits", *PRESENT]


def test_cached_decode_matches_full_recompute(policy: OnnxCausalLM) -> None:
    rng = np.random.default_rng(5)
    particles = policy.start(RAGGED, 4)
    assert not particles.errors
    assert particles.prompt_tokens is not None
    assert [len(p) for p in particles.prompt_tokens] == [11, 3, 1, 12]
    assert cache_shape(particles) == (len(RAGGED), 4, KV_HEADS, 12, HEAD_DIM)
    assert assert_cache_matches_recompute(policy, particles) == len(RAGGED) * 4
    checked = 0
    for _ in range(4):
        log_p = policy.propose(particles, rng)
        assert np.all(np.isfinite(log_p))
        checked += assert_cache_matches_recompute(policy, particles)
    assert checked > 30  # most particles still run after four steps (of at most six)
    assert cache_shape(particles)[3] == 12 + 4
    # The cache follows resampling (unsorted, repeated ancestors), then one more cached step.
    ancestors = rng.integers(0, 4, size=particles.lengths.shape).astype(np.int64)
    before = copy.deepcopy(particles)
    particles.reorder(ancestors)
    assert_state_follows(before, particles, ancestors)
    policy.propose(particles, rng)
    assert assert_cache_matches_recompute(policy, particles) > 0


class RecordingSession:
    """Wraps an InferenceSession and records, per call, the fed branch flag and past length."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.calls: list[tuple[bool, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)

    def run(self, output_names: Any, feeds: dict[str, np.ndarray]) -> Any:
        flag = feeds["use_cache_branch"]
        assert flag.dtype == np.bool_ and flag.shape == (1,)
        self.calls.append((bool(flag[0]), int(feeds["past_key_values.0.key"].shape[2])))
        return self.session.run(output_names, feeds)

    def io_binding(self) -> Any:  # the policy's path with the KV cache on the GPU
        return RecordingBinding(self.session.io_binding())

    def run_with_iobinding(self, binding: Any, *args: Any) -> Any:
        assert binding.flag is not None and binding.past is not None
        self.calls.append((binding.flag, binding.past))
        return self.session.run_with_iobinding(binding.binding, *args)


class RecordingBinding:
    """Wraps an IOBinding and keeps the bound branch flag and layer 0's past length."""

    def __init__(self, binding: Any) -> None:
        self.binding = binding
        self.flag: Any = None
        self.past: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.binding, name)

    def bind_cpu_input(self, name: str, array: np.ndarray) -> None:
        if name == "use_cache_branch":
            assert array.dtype == np.bool_ and array.shape == (1,)
            self.flag = bool(array[0])
        if name == "past_key_values.0.key":
            self.past = int(array.shape[2])
        self.binding.bind_cpu_input(name, array)

    def bind_input(self, name: str, *args: Any) -> None:  # device, id, element type, shape, pointer
        if name == "past_key_values.0.key":
            self.past = int(args[3][2])
        self.binding.bind_input(name, *args)


def test_branch_flag_false_on_the_prompt_true_with_a_cache() -> None:
    """Both branches give the same logits on an empty past, so check the fed flag itself."""
    policy = OnnxCausalLM(MERGED, max_new_tokens=6)
    recorder = RecordingSession(policy.session)
    policy.session = recorder
    particles = policy.start(["ab", "hello"], 2)
    rng = np.random.default_rng(3)
    for _ in range(3):
        policy.propose(particles, rng)
    assert recorder.calls[0] == (False, 0)
    assert len(recorder.calls) > 1
    assert all(flag and past > 0 for flag, past in recorder.calls[1:]), recorder.calls


def test_same_draws_and_logits_as_the_unmerged_export(policy: OnnxCausalLM) -> None:
    """gpt2-tiny is the same model exported as one with-past graph: same seed, same trajectories."""
    plain = OnnxCausalLM(GPT2, max_new_tokens=6)
    assert plain.has_cache_branch is False
    merged_particles = policy.start(RAGGED, 3)
    plain_particles = plain.start(RAGGED, 3)
    merged_rng, plain_rng = np.random.default_rng(9), np.random.default_rng(9)
    for _ in range(6):
        merged_particles.flush()  # the session runs the policies deferred
        plain_particles.flush()
        np.testing.assert_allclose(
            merged_particles.state["lm.logits"], plain_particles.state["lm.logits"], atol=1e-5, rtol=0
        )
        np.testing.assert_allclose(
            policy.propose(merged_particles, merged_rng), plain.propose(plain_particles, plain_rng), atol=1e-6
        )
        np.testing.assert_array_equal(merged_particles.tokens, plain_particles.tokens)
    assert merged_particles.finished.all()


def test_smc_runs_on_the_merged_decoder(policy: OnnxCausalLM) -> None:
    prompts = ["ab", "hello"]
    res = tiltsmc.smc(policy, OnnxRewardModel(PRM, kind="logit"), prompts=prompts, num_particles=8, rng=0)
    assert not res.errors
    assert np.asarray(res.log_z).shape == (len(prompts),)
    assert np.all(np.isfinite(res.log_z))
    assert len(res.samples) == len(prompts)
    assert res.texts is not None and len(res.texts) == len(prompts)
    for per_prompt, texts in zip(res.samples, res.texts):
        assert len(per_prompt) == len(texts) > 0
        for sequence, text in zip(per_prompt, texts):
            assert isinstance(text, str) and text == policy.decode(sequence)
            assert 1 <= len(sequence) <= 6
