"""The ONNX policy with its KV cache kept on the GPU (ONNX Runtime IO binding + the CUDA gather).

Tests marked ``gpu`` need ONNX Runtime's CUDA provider, a usable device and tiltsmc's CUDA kernels; elsewhere
they are skipped with the reason. The device cache must change nothing but where the cache lives: the same
seed gives the same particles as the host cache on the same provider, cached decoding still equals a full
recompute after resampling, and no step sends the cache through the host.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiltsmc
from onnx_helpers import assert_cache_matches_recompute, assert_state_follows, on_host
from tiltsmc import _device, core
from tiltsmc.models import OnnxCausalLM, OnnxRewardModel
from tiltsmc.models._ort import cuda_device_usable
from tiltsmc.models.device_cache import DeviceKVCache

ort = pytest.importorskip("onnxruntime")

FIXTURES = Path(__file__).parent / "fixtures" / "models"
DECODERS = [
    pytest.param(FIXTURES / name, id=name) for name in ("gpt2-tiny", "llama-tiny", "gpt2-merged-tiny")
]
CUDA = ["CUDAExecutionProvider"]
RAGGED = ["hello world", [5, 6, 7], "a", list(range(2, 30)), "the cat sat."]


def _why_not() -> str:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this ONNX Runtime has no CUDA provider (onnxruntime-gpu is not installed)"
    usable, reason = cuda_device_usable()
    if not usable:
        return f"no usable CUDA device: {reason}"
    availability = core.cuda_available()
    return "" if availability else f"tiltsmc's CUDA kernels are not usable: {availability.reason}"


WHY_NOT = _why_not()
gpu = pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT or "runs on a GPU")


def assert_matches_recompute(policy: OnnxCausalLM, particles: Any) -> int:
    return assert_cache_matches_recompute(policy, particles, policy.kv_heads, policy.head_dim)


def cache_keys(particles: Any) -> list[str]:
    return [name for name in particles.state if name == "lm.cache" or name.startswith("lm.cache.")]


# -- everywhere --------------------------------------------------------------------------------------------


def test_device_cache_refused_without_cuda_session() -> None:
    with pytest.raises(ValueError, match="device_cache"):
        OnnxCausalLM(FIXTURES / "llama-tiny", providers=["CPUExecutionProvider"], device_cache=True)
    with pytest.raises(TypeError, match="device_cache"):
        OnnxCausalLM(FIXTURES / "llama-tiny", providers=["CPUExecutionProvider"], device_cache="yes")  # type: ignore[arg-type]
    policy = OnnxCausalLM(FIXTURES / "llama-tiny", providers=["CPUExecutionProvider"])
    assert policy.device_cache is False
    particles = policy.start(["ab"], 3)
    assert all(isinstance(particles.state[key], np.ndarray) for key in cache_keys(particles))


# -- on a GPU ----------------------------------------------------------------------------------------------


@gpu
@pytest.mark.gpu
def test_cache_lives_on_the_device_by_default() -> None:
    policy = OnnxCausalLM(FIXTURES / "llama-tiny", max_new_tokens=4, providers=CUDA)
    assert policy.device_cache is True
    particles = policy.start(RAGGED, 3)
    assert cache_keys(particles) == ["lm.cache"]
    cache = particles.state["lm.cache"]
    assert isinstance(cache, DeviceKVCache)
    width = max(len(policy.encode_prompt(p)) for p in RAGGED)
    assert cache.shape == (len(RAGGED), 3, 2 * policy.num_layers, policy.kv_heads, width, policy.head_dim)
    # Every particle of a prompt starts from the prompt's cache; the tensors equal a host-cache run's.
    first = on_host(cache)
    np.testing.assert_array_equal(first, np.repeat(first[:, :1], 3, axis=1))
    host_policy = OnnxCausalLM(FIXTURES / "llama-tiny", max_new_tokens=4, providers=CUDA, device_cache=False)
    host_particles = host_policy.start(RAGGED, 3)
    for k, (_, _, key) in enumerate(host_policy._cache_names):
        np.testing.assert_allclose(first[:, :, k], host_particles.state[key], atol=1e-6, rtol=0, err_msg=key)
    # No step feeds the cache through session.run (host arrays); all go through the IO binding.
    host_runs: list[int] = []
    run = policy.session.run

    def spy(*args: Any, **kwargs: Any) -> Any:
        host_runs.append(1)
        return run(*args, **kwargs)

    policy.session.run = spy
    policy.propose(particles, np.random.default_rng(0))
    particles.flush()  # the session run the policy deferred
    assert not host_runs
    assert isinstance(particles.state["lm.cache"], DeviceKVCache)
    assert particles.state["lm.cache"].length == width + 1


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("path", DECODERS)
def test_device_cache_decode_matches_recompute_after_reorder_and_take(path: Path) -> None:
    policy = OnnxCausalLM(path, max_new_tokens=10, providers=CUDA)
    assert policy.device_cache
    rng = np.random.default_rng(11)
    particles = policy.start(RAGGED, 4)
    assert assert_matches_recompute(policy, particles) == len(RAGGED) * 4
    for _ in range(4):
        policy.propose(particles, rng)
        assert assert_matches_recompute(policy, particles) > 0
    ancestors = rng.integers(0, 4, size=particles.lengths.shape).astype(np.int64)
    before = copy.deepcopy(particles)  # the device cache copies itself on the device
    particles.reorder(ancestors)
    assert_state_follows(before, particles, ancestors)
    policy.propose(particles, rng)
    assert assert_matches_recompute(policy, particles) > 0
    taken = particles.take(np.array([[3, 3, 0, 1, 2, 2]] * len(RAGGED)))
    assert taken.lengths.shape == (len(RAGGED), 6)
    policy.propose(taken, rng)
    assert assert_matches_recompute(policy, taken) > 0


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("path", DECODERS)
@pytest.mark.parametrize("sampler", ["smc", "sp_gsmc"])
def test_device_cache_gives_the_host_cache_results(path: Path, sampler: str) -> None:
    """Same provider, same seed: the device cache and the host cache give the same particles."""
    reward = OnnxRewardModel(FIXTURES / "prm-tiny", kind="logit", providers=CUDA)
    results = []
    for device_cache in (True, False):
        policy = OnnxCausalLM(
            path, max_new_tokens=8, eos_token_id=[], providers=CUDA, device_cache=device_cache
        )
        assert policy.device_cache is device_cache
        if sampler == "smc":
            result = tiltsmc.smc(
                policy, reward, ["ab", [5, 6, 7]], num_particles=16, ess_threshold=1.0, rng=4
            )
        else:
            result = tiltsmc.sp_gsmc(policy, reward, ["ab", [5, 6, 7]], pool_size=16, rng=4)
        results.append(result)
    on_device, on_host_ = results
    for b in range(2):
        for got, expected in zip(on_device.samples[b], on_host_.samples[b]):
            np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(on_device.log_weights, on_host_.log_weights, atol=1e-5, rtol=0)
    np.testing.assert_allclose(on_device.log_z, on_host_.log_z, atol=1e-5, rtol=0)


@gpu
@pytest.mark.gpu
def test_device_array_copy_and_ort_values() -> None:
    host = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    array = _device.to_device(host, 0)
    duplicate = copy.deepcopy(array)
    assert duplicate.ptr != array.ptr
    np.testing.assert_array_equal(duplicate.get(), host)
    value = ort.OrtValue.ortvalue_from_numpy(host.reshape(6, 4), "cuda", 0)
    ancestors = _device.to_device(np.array([5, 0, 0, 2, 1, 3], dtype=np.int64), 0)
    core.gather(value, ancestors, out=value)  # in place, in ORT's memory
    np.testing.assert_array_equal(value.numpy(), host.reshape(6, 4)[[5, 0, 0, 2, 1, 3]])
