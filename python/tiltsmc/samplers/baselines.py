"""Rejection sampling (exact, with a known bound on r) and best-of-N (a baseline, not a sampler of pi)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from .._rng import RNGLike, as_generator
from ..models.particles import Particles
from ..models.protocols import Policy, RewardModel
from ._engine import FloatArray, Models, check_count, decode_texts, failed_prompts, logsumexp
from .result import Compute, SamplerResult

__all__ = ["best_of_n", "rejection"]


def _rollout(
    models: Models,
    prompts: Optional[Sequence[Any]],
    count: int,
    generator: np.random.Generator,
    max_steps: int,
) -> tuple[Particles, FloatArray]:
    """``count`` trajectories per prompt drawn from ``p`` to the end, and their ``log r``."""
    particles = models.start(prompts, count)
    for _ in range(max_steps):
        if particles.finished.all():
            break
        models.propose(particles, generator)
    else:
        if not particles.finished.all():
            raise RuntimeError(f"max_steps: trajectories still unfinished after {max_steps} steps")
    log_r = models.log_value(particles)
    log_r[failed_prompts(particles)] = -np.inf  # prompts the policy could not start draw nothing
    return particles, log_r


def _empty_trace(batch: int) -> dict[str, Any]:
    return {
        "ess": np.zeros((batch, 0)),
        "resampled": np.zeros((batch, 0), dtype=bool),
        "unique_ancestors": np.zeros((batch, 0), dtype=np.int64),
        "log_z_increments": np.zeros((batch, 0)),
    }


def _stack(trajectories: list[np.ndarray]) -> Any:
    if trajectories and all(len(t) == len(trajectories[0]) for t in trajectories):
        return np.stack(trajectories)
    return trajectories


def rejection(
    policy: Policy,
    reward: RewardModel,
    prompts: Optional[Sequence[Any]] = None,
    bound: float = 1.0,
    num_samples: int = 1,
    max_tries: int = 100_000,
    rng: RNGLike = None,
    *,
    batch_size: int = 256,
    max_steps: int = 1_000_000,
) -> SamplerResult:
    """Exact samples of ``pi``: draw ``x ~ p``, accept with probability ``r(x) / bound``.

    ``bound`` must satisfy ``bound >= sup r``: an observed ``r > bound`` raises (the sampler would be
    wrong). Draws go in batches of ``batch_size`` per prompt until ``num_samples`` are accepted or
    ``max_tries`` draws are spent; ``tries[b]`` counts the draws, ``samples[b]`` holds at most
    ``num_samples`` (fewer when tries ran out), and ``log_z[b]`` is ``log`` of the mean ``r`` over all draws.
    """
    compute = Compute()
    began = time.perf_counter()
    models = Models(policy, reward, compute)
    bound = float(bound)
    if not (math.isfinite(bound) and bound > 0.0):
        raise ValueError(f"bound: expected a finite bound C > 0 on the reward, got {bound!r}")
    num_samples = check_count(num_samples, "num_samples")
    max_tries = check_count(max_tries, "max_tries")
    batch_size = check_count(batch_size, "batch_size")
    generator = as_generator(rng)
    log_bound = math.log(bound)
    prompt_list = [()] if prompts is None else list(prompts)
    batch = len(prompt_list)
    accepted: list[list[np.ndarray]] = [[] for _ in range(batch)]
    tries = np.zeros(batch, dtype=np.int64)
    log_r_sums = np.full(batch, -np.inf)
    errors: dict[int, str] = {}
    while True:
        waiting = [
            b
            for b in range(batch)
            if len(accepted[b]) < num_samples and tries[b] < max_tries and b not in errors
        ]
        if not waiting:
            break
        count = int(min(batch_size, max_tries - tries[waiting].max()))
        particles, log_r = _rollout(models, [prompt_list[b] for b in waiting], count, generator, max_steps)
        errors.update({waiting[row]: message for row, message in particles.errors.items()})
        over = log_r > log_bound + 1e-12
        if over.any():
            worst = float(np.exp(log_r[over].max() - log_bound))
            raise ValueError(
                f"bound: observed a reward {worst:.6g} x the bound C = {bound:g}; rejection sampling needs "
                "C >= sup r"
            )
        keep = np.log1p(-generator.random(log_r.shape)) < log_r - log_bound
        for row, b in enumerate(waiting):
            tries[b] += count
            log_r_sums[b] = np.logaddexp(log_r_sums[b], logsumexp(log_r[row]))
            for i in np.flatnonzero(keep[row])[: num_samples - len(accepted[b])]:
                accepted[b].append(particles.tokens[row, i, : particles.lengths[row, i]].copy())
    compute.total_seconds = time.perf_counter() - began
    samples = [_stack(found) for found in accepted]
    return SamplerResult(
        sampler="rejection",
        samples=samples,
        texts=decode_texts(policy, samples),
        errors=errors,
        log_weights=[
            np.full(len(found), -np.log(len(found))) if found else np.zeros(0) for found in accepted
        ],
        log_z=log_r_sums - np.log(np.maximum(tries, 1)),
        collapsed=np.array([not found for found in accepted]),
        compute=compute,
        tries=tries,
        **_empty_trace(batch),
    )


def best_of_n(
    policy: Policy,
    reward: RewardModel,
    prompts: Optional[Sequence[Any]] = None,
    n: int = 16,
    rng: RNGLike = None,
    *,
    max_steps: int = 1_000_000,
) -> SamplerResult:
    """Draw ``n`` trajectories from ``p`` per prompt and return the highest-reward one (first on ties).

    A baseline, not a sampler of ``pi``. ``log_z[b]`` is ``log`` of the mean reward of the ``n`` draws.
    """
    compute = Compute()
    began = time.perf_counter()
    models = Models(policy, reward, compute)
    n = check_count(n, "n")
    particles, log_r = _rollout(models, prompts, n, as_generator(rng), max_steps)
    best = np.argmax(log_r, axis=1)
    batch = particles.num_prompts
    compute.total_seconds = time.perf_counter() - began
    samples = [
        particles.tokens[b, best[b], : particles.lengths[b, best[b]]][None, :].copy() for b in range(batch)
    ]
    return SamplerResult(
        sampler="best_of_n",
        samples=samples,
        texts=decode_texts(policy, samples),
        errors=particles.errors,
        log_weights=[np.zeros(1) for _ in range(batch)],
        log_z=logsumexp(log_r) - np.log(n),
        collapsed=np.all(log_r == -np.inf, axis=1),
        compute=compute,
        **_empty_trace(batch),
    )
