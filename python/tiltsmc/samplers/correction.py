r"""Resampling-pool Metropolis-Hastings (particle-independent MH) correction.

Each proposal is an independent run — SP-gSMC with a pool of ``K`` (``num_particles = 1``) or full
``N``-particle SMC (PIMH) — giving a trajectory ``x'`` and its ``Zh'``; the chain moves to it with
probability ``min(1, Zh' / Zh)``. On the space augmented by every draw of a run, this is independent MH
whose stationary law on ``x`` is exactly ``pi``; its total-variation error contracts geometrically in the
number of steps ``H``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from .. import core
from .._rng import RNGLike, as_generator
from ..models.protocols import Policy, RewardModel
from ._engine import Models, check_count, decode_texts, logsumexp
from .result import Compute, SamplerResult
from .sequential import _check_common, _run_pool, _run_smc

__all__ = ["mh"]


def mh(
    policy: Policy,
    reward: RewardModel,
    prompts: Optional[Sequence[Any]] = None,
    pool_size: Optional[int] = 16,
    steps: int = 8,
    num_particles: int = 1,
    rng: RNGLike = None,
    *,
    resample: str = "systematic",
    ess_threshold: float = 0.5,
    max_steps: int = 1_000_000,
) -> SamplerResult:
    """SP-gSMC (``num_particles=1``; ``pool_size=None`` for the exact form) or SMC (PIMH) corrected by
    ``steps`` independent Metropolis-Hastings proposals accepted with ``min(1, Zh'/Zh)``.

    ``samples[b]`` is the chain's final state (one trajectory); ``log_z[b]`` is the log of the mean of the
    ``steps + 1`` independent estimates ``Zh`` (each unbiased for ``Z``); ``acceptance_rate[b]`` the
    fraction of accepted proposals (NaN when ``steps = 0``). For PIMH a run's trajectory is drawn from
    its weighted particles by weight. ``steps=0`` returns the uncorrected draw.
    """
    compute = Compute()
    began = time.perf_counter()
    models = Models(policy, reward, compute)
    steps = check_count(steps, "steps", minimum=0)
    num_particles = check_count(num_particles, "num_particles")
    generator = as_generator(rng)
    if num_particles > 1:
        _check_common(resample, ess_threshold, "naive", models)
    elif pool_size is None:
        _check_common("systematic", 0.0, "optimal", models)
    else:
        pool_size = check_count(pool_size, "pool_size")

    errors: dict[int, str] = {}

    def draw() -> tuple[list[Any], np.ndarray]:
        if num_particles > 1:
            particles, log_w, log_z, collapsed, _ = _run_smc(
                models,
                prompts,
                num_particles,
                resample,
                float(ess_threshold),
                "naive",
                generator,
                False,
                max_steps,
            )
            pick = np.zeros(particles.num_prompts, dtype=np.int64)
            if (~collapsed).any():
                pick[~collapsed], _ = core.pool_select(log_w[~collapsed], rng=generator)
        elif pool_size is None:
            particles, _, log_z, collapsed, _ = _run_smc(
                models, prompts, 1, "systematic", 0.0, "optimal", generator, False, max_steps
            )
            pick = np.zeros(particles.num_prompts, dtype=np.int64)
        else:
            particles, log_z, collapsed, _ = _run_pool(models, prompts, pool_size, generator, max_steps)
            pick = np.zeros(particles.num_prompts, dtype=np.int64)
        trajectories = [
            particles.tokens[b, pick[b], : particles.lengths[b, pick[b]]].copy()
            for b in range(particles.num_prompts)
        ]
        errors.update(particles.errors)
        return trajectories, log_z

    state, log_z_state = draw()
    estimates = [log_z_state]
    accepted = np.zeros(len(state))
    for _ in range(steps):
        proposal, log_z_proposal = draw()
        estimates.append(log_z_proposal)
        both_zero = (log_z_state == -np.inf) & (log_z_proposal == -np.inf)
        accept = core.mh_accept(log_z_state, log_z_proposal, rng=generator) & ~both_zero
        for b in np.flatnonzero(accept):
            state[b] = proposal[b]
        log_z_state = np.where(accept, log_z_proposal, log_z_state)
        accepted += accept
    all_estimates = np.stack(estimates, axis=1)
    log_z = logsumexp(all_estimates) - np.log(all_estimates.shape[1])
    batch = len(state)
    compute.total_seconds = time.perf_counter() - began
    samples = [trajectory[None, :] for trajectory in state]
    return SamplerResult(
        sampler="mh",
        samples=samples,
        texts=decode_texts(policy, samples),
        errors=errors,
        log_weights=[np.zeros(1) for _ in range(batch)],
        log_z=log_z,
        ess=np.ones((batch, 0)),
        resampled=np.zeros((batch, 0), dtype=bool),
        unique_ancestors=np.zeros((batch, 0), dtype=np.int64),
        log_z_increments=np.zeros((batch, 0)),
        collapsed=log_z_state == -np.inf,
        compute=compute,
        acceptance_rate=accepted / steps if steps else np.full(batch, np.nan),
    )
