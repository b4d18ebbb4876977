r"""Sequential Monte Carlo with ratio potentials, and single-particle guided SMC.

With ``Vh_0`` from the reward model (1 if it gives none) and ``Vh_T = r``, step ``t`` multiplies each
particle's weight by the potential ``G_t = Vh_t(s_{1:t}) / Vh_{t-1}(s_{1:t-1})`` (naive proposal
``s_t ~ p``), or by ``sum_s p(s|.) Vh_t(., s) / Vh_{t-1}`` after drawing ``s_t ~ q ∝ p Vh_t`` (optimal
proposal, token level). The product telescopes to ``r / Vh_0``, so the weighted particles target
``pi ∝ p r`` whatever the quality of ``Vh``, and

    log Zh = log Vh_0 + sum_t log sum_i W_{t-1,i} G_{t,i}        (W: normalised weights before step t)

estimates ``log Z = log E_p[r]`` (``Zh`` is unbiased for ``Z``). Finished particles are absorbing: at the
step they finish their potential is ``r / Vh_{t-1}``, afterwards 1.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import numpy as np
import numpy.typing as npt

from .. import core
from .._rng import RNGLike, as_generator
from ..models.particles import Particles
from ..models.protocols import Policy, RewardModel
from ..models.sampling import sample_categorical
from ._engine import (
    FloatArray,
    Models,
    all_finished,
    check_count,
    decode_texts,
    failed_prompts,
    logsumexp,
)
from .result import Compute, SamplerResult

__all__ = ["smc", "sp_gsmc"]

PROPOSALS = ("naive", "optimal")
_LOG_V_PREV = "smc.log_value"  # Particles.state key of each particle's log Vh_{t-1}


@dataclass
class _Trace:
    """Per-step diagnostics, each a list of ``(B,)`` arrays."""

    ess: list[FloatArray] = field(default_factory=list)
    resampled: list[npt.NDArray[np.bool_]] = field(default_factory=list)
    unique: list[npt.NDArray[np.int64]] = field(default_factory=list)
    increments: list[FloatArray] = field(default_factory=list)
    ancestry: list[npt.NDArray[np.int64]] = field(default_factory=list)

    def stacked(self, batch: int) -> dict[str, Any]:
        def stack(values: list[Any], dtype: Any) -> np.ndarray:
            return np.stack(values, axis=1) if values else np.zeros((batch, 0), dtype=dtype)

        return {
            "ess": stack(self.ess, np.float64),
            "resampled": stack(self.resampled, bool),
            "unique_ancestors": stack(self.unique, np.int64),
            "log_z_increments": stack(self.increments, np.float64),
        }


def _samples(particles: Particles, rows: Optional[npt.NDArray[np.int64]] = None) -> list[Any]:
    """Per prompt, an ``(N, T)`` int array when every trajectory has the same length, else a list."""
    if rows is None and particles.lengths.size and np.all(particles.lengths == particles.lengths.flat[0]):
        # Views, not copies: the run's particle buffers are not used after it returns.
        return list(particles.tokens[:, :, : particles.lengths.flat[0]])
    out: list[Any] = []
    for b in range(particles.num_prompts):
        lengths = particles.lengths[b] if rows is None else particles.lengths[b, rows[b]]
        tokens = particles.tokens[b] if rows is None else particles.tokens[b, rows[b]]
        if np.all(lengths == lengths[0]):
            out.append(tokens[:, : lengths[0]].copy())
        else:
            out.append([tokens[i, : lengths[i]].copy() for i in range(len(lengths))])
    return out


def _safe_increment(log_new: FloatArray, log_old: FloatArray) -> FloatArray:
    """``log_new - log_old`` with ``-inf - -inf`` (a particle already of weight zero) read as ``-inf``."""
    old_zero = log_old == -np.inf
    if not old_zero.any():
        return np.subtract(log_new, log_old)
    difference = np.subtract(log_new, np.where(old_zero, 0.0, log_old))
    difference[np.broadcast_to(old_zero, difference.shape)] = -np.inf
    return difference


def _run_smc(
    models: Models,
    prompts: Optional[Sequence[Any]],
    num_particles: int,
    scheme: str,
    ess_threshold: float,
    proposal: str,
    generator: np.random.Generator,
    record_ancestry: bool,
    max_steps: int,
) -> tuple[Particles, FloatArray, FloatArray, npt.NDArray[np.bool_], _Trace]:
    """The SMC loop. Returns particles, unnormalised log-weights, log Zh, collapsed flags and the trace."""
    particles = models.start(prompts, num_particles)
    batch = particles.num_prompts
    log_v0 = models.initial_log_value(particles)
    # log Vh_{t-1} of each particle, kept in the particles' state so that resampling reorders it with them
    particles.state[_LOG_V_PREV] = np.repeat(log_v0[:, None], num_particles, axis=1)
    log_z = log_v0.copy()
    collapsed = (log_v0 == -np.inf) | failed_prompts(particles)
    log_w = np.zeros((batch, num_particles))
    log_w[collapsed] = -np.inf  # weight zero: reported by the core, never resampled
    log_total = np.where(collapsed, -np.inf, float(np.log(num_particles)))  # logsumexp of each row of log_w
    trace = _Trace()
    for _ in range(max_steps):
        if all_finished(particles):
            break
        live = ~particles.finished
        log_v_prev = particles.state[_LOG_V_PREV]
        if proposal == "naive":
            models.propose(particles, generator)
            log_v = models.log_value(particles)
            reweighted = live  # the core multiplies these particles' weights by G = Vh_t / Vh_{t-1}
        else:
            next_log_values = models.next_log_values(particles)
            joint = models.next_log_probs(particles) + next_log_values
            log_sum = logsumexp(joint)
            dead = log_sum == -np.inf  # q is undefined; the particle's weight becomes zero anyway
            joint[dead] = 0.0
            tokens = sample_categorical(joint, generator)
            models.append(particles, tokens)
            log_v = np.take_along_axis(next_log_values, tokens[..., None], -1)[..., 0]
            # G = sum_s p(s|.) Vh_t(., s) / Vh_{t-1}, applied here; the core then only resamples
            log_w += np.where(live, _safe_increment(log_sum, log_v_prev), 0.0)
            log_v_prev[live] = log_v[live]
            reweighted = np.zeros_like(live)
        # One core call: the potentials, ESS, the adaptive decision, resampling (survivors stay in their
        # slots, so that the in-place reorder moves only the dead), the reset of resampled rows' weights
        # and log Zh += log sum_i W_{t-1,i} G_{t,i}; never resampling after the last step: the final sample
        # stays weighted.
        threshold = 0.0 if all_finished(particles) else ess_threshold
        ancestors, resample_rows, ess, unique, step_increment = core.smc_reweight(
            log_w,
            log_v,
            log_v_prev,
            reweighted,
            log_total,
            log_z,
            collapsed,
            threshold,
            scheme,  # type: ignore[arg-type]  # a scheme name, checked in _check_common
            generator,
        )
        if np.count_nonzero(resample_rows):
            models.reorder(particles, ancestors)
        trace.ess.append(ess)
        trace.resampled.append(resample_rows)
        trace.unique.append(unique)
        trace.increments.append(step_increment)
        if record_ancestry:
            trace.ancestry.append(np.array(ancestors))
    else:
        if not particles.finished.all():
            raise RuntimeError(f"max_steps: trajectories still unfinished after {max_steps} steps")
    log_z = np.where(collapsed, -np.inf, log_z)
    return particles, log_w, log_z, collapsed, trace


def _check_common(resample: str, ess_threshold: float, proposal: str, models: Models) -> None:
    if not isinstance(resample, str) or resample not in core.SCHEMES:
        raise ValueError(f"resample: expected one of {', '.join(core.SCHEMES)}, got {resample!r}")
    if not isinstance(proposal, str) or proposal not in PROPOSALS:
        raise ValueError(f"proposal: expected 'naive' or 'optimal', got {proposal!r}")
    if isinstance(ess_threshold, (bool, np.bool_)) or not isinstance(ess_threshold, (int, float, np.number)):
        raise TypeError(f"ess_threshold: expected a fraction in [0, 1], got {ess_threshold!r}")
    threshold = float(ess_threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"ess_threshold: expected a fraction in [0, 1], got {ess_threshold!r}")
    if proposal == "optimal" and not models.supports_optimal_proposal():
        raise ValueError(
            "proposal: 'optimal' needs a token-level policy (next_log_probs, append) and a reward model "
            "with a twist head (next_log_values)"
        )


def smc(
    policy: Policy,
    reward: RewardModel,
    prompts: Optional[Sequence[Any]] = None,
    num_particles: int = 64,
    resample: Literal["multinomial", "stratified", "systematic", "residual"] = "systematic",
    ess_threshold: float = 0.5,
    proposal: Literal["naive", "optimal"] = "naive",
    rng: RNGLike = None,
    *,
    record_ancestry: bool = False,
    max_steps: int = 1_000_000,
) -> SamplerResult:
    """SMC targeting ``pi ∝ p r`` with the ratio potentials ``G_t = Vh_t / Vh_{t-1}``.

    Resamples a prompt's particles when their ``ESS < ess_threshold * num_particles`` (``1.0``: every
    step), never after the last step. ``proposal="optimal"`` draws each token from ``q ∝ p Vh_t`` (needs a
    token policy and a twist head); with the exact twist every final weight is equal and ``log_z`` is exact.
    """
    compute = Compute()
    began = time.perf_counter()
    models = Models(policy, reward, compute)
    num_particles = check_count(num_particles, "num_particles")
    _check_common(resample, ess_threshold, proposal, models)
    generator = as_generator(rng)
    particles, log_w, log_z, collapsed, trace = _run_smc(
        models,
        prompts,
        num_particles,
        resample,
        float(ess_threshold),
        proposal,
        generator,
        record_ancestry,
        max_steps,
    )
    normalised, _, _ = core.log_normalize(log_w, zero_rows="report")
    compute.total_seconds = time.perf_counter() - began
    samples = _samples(particles)
    return SamplerResult(
        sampler="smc",
        samples=samples,
        texts=decode_texts(policy, samples),
        errors=particles.errors,
        log_weights=list(normalised),
        log_z=log_z,
        collapsed=collapsed,
        compute=compute,
        ancestry=np.stack(trace.ancestry, axis=1) if record_ancestry and trace.ancestry else None,
        **trace.stacked(particles.num_prompts),
    )


def _run_pool(
    models: Models,
    prompts: Optional[Sequence[Any]],
    pool_size: int,
    generator: np.random.Generator,
    max_steps: int,
) -> tuple[Particles, FloatArray, npt.NDArray[np.bool_], _Trace]:
    """SP-gSMC with a resampling pool: ``K`` candidates from ``p``, one kept with probability ``∝ G``."""
    particles = models.start(prompts, pool_size)
    batch = particles.num_prompts
    log_v_prev = models.initial_log_value(particles)
    log_z = log_v_prev.copy()
    collapsed = (log_v_prev == -np.inf) | failed_prompts(particles)
    trace = _Trace()
    rows = np.arange(batch)
    for _ in range(max_steps):
        if particles.finished.all():
            break
        live = ~particles.finished
        models.propose(particles, generator)
        log_v = models.log_value(particles)
        potentials = np.where(live, _safe_increment(log_v, log_v_prev[:, None]), 0.0)
        chosen = np.zeros(batch, dtype=np.int64)
        log_mean = np.full(batch, -np.inf)
        alive = ~collapsed & np.any(potentials > -np.inf, axis=1)
        if alive.any():
            chosen[alive], log_mean[alive] = core.pool_select(potentials[alive], rng=generator)
        collapsed |= ~alive
        log_z = log_z + log_mean
        _, ess = core.row_statistics(potentials)  # ESS of the pool (no normalised copy needed)
        ancestors = np.repeat(chosen[:, None], pool_size, axis=1)
        models.reorder(particles, ancestors)
        log_v_prev = log_v[rows, chosen]
        trace.ess.append(np.asarray(ess, dtype=np.float64))
        trace.resampled.append(np.ones(batch, dtype=bool))
        trace.unique.append(np.ones(batch, dtype=np.int64))
        trace.increments.append(log_mean)
    else:
        if not particles.finished.all():
            raise RuntimeError(f"max_steps: trajectories still unfinished after {max_steps} steps")
    log_z = np.where(collapsed, -np.inf, log_z)
    return particles, log_z, collapsed, trace


def sp_gsmc(
    policy: Policy,
    reward: RewardModel,
    prompts: Optional[Sequence[Any]] = None,
    pool_size: Optional[int] = 16,
    rng: RNGLike = None,
    *,
    max_steps: int = 1_000_000,
) -> SamplerResult:
    """Single-particle guided SMC: one trajectory per prompt.

    ``pool_size=K``: at each step draw ``K`` candidates ``s_t ~ p``, keep one with probability ``∝ G_t``
    and multiply ``Zh`` by ``mean_k G_t^(k)`` (unbiased for ``Z``; biased as a sampler, corrected by
    :func:`mh`). ``pool_size=None``: the exact form, each token drawn from ``p Vh_t / sum_s p Vh_t`` (needs
    a twist head); its law at step ``t`` is within TV ``2 t eps`` of ``pi_t ∝ p Vh_t``.
    """
    compute = Compute()
    began = time.perf_counter()
    models = Models(policy, reward, compute)
    generator = as_generator(rng)
    if pool_size is None:
        _check_common("systematic", 0.0, "optimal", models)
        particles, _, log_z, collapsed, trace = _run_smc(
            models, prompts, 1, "systematic", 0.0, "optimal", generator, False, max_steps
        )
    else:
        pool_size = check_count(pool_size, "pool_size")
        particles, log_z, collapsed, trace = _run_pool(models, prompts, pool_size, generator, max_steps)
    compute.total_seconds = time.perf_counter() - began
    first = np.zeros((particles.num_prompts, 1), dtype=np.int64)
    samples = _samples(particles, first)
    return SamplerResult(
        sampler="sp_gsmc",
        samples=samples,
        texts=decode_texts(policy, samples),
        errors=particles.errors,
        log_weights=[np.zeros(1) for _ in range(particles.num_prompts)],
        log_z=log_z,
        collapsed=collapsed,
        compute=compute,
        **trace.stacked(particles.num_prompts),
    )
