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

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional

import numpy as np

from .. import core
from .._rng import RNGLike, as_generator
from ..models._config import as_float, flag
from ..models.protocols import Policy, RewardModel
from ._engine import Models, check_count, check_rows, limited, prompts_list
from .lane import run_alone
from .result import Compute, SamplerResult
from .runs import ExactSPRun, PoolRun, Run, SMCRun

__all__ = ["smc", "sp_gsmc"]

PROPOSALS = ("naive", "optimal")
# the command line's and the server's spelling of pool_size=None, SP-gSMC's exact form (--pool-size exact)
EXACT_FORM = "exact"
# what the optimal proposal q ∝ p Vh_t (SMC's proposal="optimal", SP-gSMC's exact form) needs of the models
OPTIMAL_FORM_NEEDS = (
    "a token-level policy (next_log_probs, append) and a reward model with a twist head (next_log_values)"
)


def optimal_form_option(options: Mapping[str, Any]) -> Optional[str]:
    """Which of a sampler's ``options`` (its function's keyword arguments) asks for the optimal proposal
    ``q ∝ p Vh_t``, which needs ``OPTIMAL_FORM_NEEDS``: ``"proposal"`` for ``proposal="optimal"`` (SMC),
    ``"pool_size"`` for ``pool_size=None`` (exact SP-gSMC, and MH's SP-gSMC proposals, with one particle);
    None where neither does. The command line and the server check it against their models
    (``Models.supports_optimal_proposal``) before anything runs, naming their own option."""
    if options.get("proposal") == "optimal":
        return "proposal"
    if "pool_size" in options and options["pool_size"] is None and options.get("num_particles", 1) == 1:
        return "pool_size"
    return None


def _check_common(resample: str, ess_threshold: float, proposal: str, models: Models) -> None:
    if not isinstance(resample, str) or resample not in core.SCHEMES:
        raise ValueError(f"resample: expected one of {', '.join(core.SCHEMES)}, got {resample!r}")
    if not isinstance(proposal, str) or proposal not in PROPOSALS:
        raise ValueError(f"proposal: expected 'naive' or 'optimal', got {proposal!r}")
    real = (int, float, np.integer, np.floating)  # not complex: its imaginary part would be dropped
    if isinstance(ess_threshold, (bool, np.bool_)) or not isinstance(ess_threshold, real):
        raise TypeError(f"ess_threshold: expected a fraction in [0, 1], got {ess_threshold!r}")
    threshold = as_float(ess_threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"ess_threshold: expected a fraction in [0, 1], got {ess_threshold!r}")
    if proposal == "optimal" and not models.supports_optimal_proposal():
        raise ValueError(f"proposal: 'optimal' needs {OPTIMAL_FORM_NEEDS}")


def _check_exact_form(models: Models) -> None:
    """``pool_size=None`` (the exact form of SP-gSMC: each token drawn from the optimal proposal
    ``q ∝ p Vh_t``) needs a token-level policy and a twist head."""
    if not models.supports_optimal_proposal():
        raise ValueError(
            "pool_size: None (the exact form: each token drawn from the optimal proposal q ∝ p Vh_t) needs "
            f"{OPTIMAL_FORM_NEEDS}; give a pool size instead"
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
    max_new_tokens: Optional[int] = None,
    final_resample: Optional[int] = None,
) -> SamplerResult:
    """SMC targeting ``pi ∝ p r`` with the ratio potentials ``G_t = Vh_t / Vh_{t-1}``.

    Resamples a prompt's particles when their ``ESS < ess_threshold * num_particles`` (``1.0``: every
    step), never after the last step. ``max_new_tokens`` ends every trajectory at that many tokens (None:
    at the policy's own limit). ``proposal="optimal"`` draws each token from ``q ∝ p Vh_t`` (needs a
    token policy and a twist head); with the exact twist every final weight is equal and ``log_z`` is exact.

    ``final_resample=M`` returns ``M`` particles per prompt drawn by weight at the end (with ``resample``'s
    scheme), each of weight ``1/M``, instead of the ``N`` weighted ones. ``final_resample=1`` with
    ``resample="multinomial"`` and ``ess_threshold=1.0`` is the algorithm of the paper's Theorem 5.1: one
    output particle, within TV ``L^6 T (1+eps)^(6(T-1)) / (2N)`` of ``pi``.

    The result's ``log_z_increments`` (``log sum_i W_{t-1,i} G_{t,i}``, with ``log_z_increment_se``) read the
    reward model's Bellman error along the way: see
    [`tiltsmc.diagnostics.online_bellman`][tiltsmc.diagnostics.online_bellman].
    """
    models = Models(policy, reward, Compute())
    run = smc_run(
        models, prompts, num_particles, resample, ess_threshold, proposal, rng,
        record_ancestry=record_ancestry, max_steps=max_steps, max_new_tokens=max_new_tokens,
        final_resample=final_resample,
    )  # fmt: skip
    result: SamplerResult = run_alone(models, run)
    return result


def smc_run(
    models: Models,
    prompts: Optional[Sequence[Any]],
    num_particles: int,
    resample: str,
    ess_threshold: float,
    proposal: str,
    rng: RNGLike,
    *,
    record_ancestry: bool,
    max_steps: int,
    max_new_tokens: Optional[int] = None,
    final_resample: Optional[int] = None,
) -> SMCRun:
    """The run of [`smc`][tiltsmc.samplers.sequential.smc] with these arguments, checked (the serving engine
    builds its runs here)."""
    num_particles = check_count(num_particles, "num_particles")
    if final_resample is not None:
        final_resample = check_count(final_resample, "final_resample")
    _check_common(resample, ess_threshold, proposal, models)
    listed = prompts_list(prompts)
    check_rows("num_particles", num_particles, listed, f"{num_particles} particles")
    if final_resample is not None:
        check_rows("final_resample", final_resample, listed, f"{final_resample} samples")
    run = SMCRun(
        listed,
        num_particles,
        resample,
        float(ess_threshold),
        proposal,
        as_generator(rng),
        check_count(max_steps, "max_steps"),
        flag(record_ancestry, "record_ancestry"),
        final_resample,
    )
    return limited(run, max_new_tokens, models)


def sp_gsmc(
    policy: Policy,
    reward: RewardModel,
    prompts: Optional[Sequence[Any]] = None,
    pool_size: Optional[int] = 16,
    rng: RNGLike = None,
    *,
    max_steps: int = 1_000_000,
    max_new_tokens: Optional[int] = None,
) -> SamplerResult:
    """Single-particle guided SMC: one trajectory per prompt.

    ``pool_size=K``: at each step draw ``K`` candidates ``s_t ~ p``, keep one with probability ``∝ G_t``
    and multiply ``Zh`` by ``mean_k G_t^(k)`` (unbiased for ``Z``; biased as a sampler, corrected by
    [`mh`][tiltsmc.mh]). ``pool_size=None``: the exact form, each token drawn from ``p Vh_t / sum_s p Vh_t``
    (needs a twist head); its law at step ``t`` is within TV ``2 t eps`` of ``pi_t ∝ p Vh_t``.
    """
    models = Models(policy, reward, Compute())
    result: SamplerResult = run_alone(
        models,
        sp_gsmc_run(models, prompts, pool_size, rng, max_steps=max_steps, max_new_tokens=max_new_tokens),
    )
    return result


def sp_gsmc_run(
    models: Models,
    prompts: Optional[Sequence[Any]],
    pool_size: Optional[int],
    rng: RNGLike,
    *,
    max_steps: int,
    max_new_tokens: Optional[int] = None,
) -> Run:
    """The run of [`sp_gsmc`][tiltsmc.samplers.sequential.sp_gsmc] with these arguments, checked."""
    max_steps = check_count(max_steps, "max_steps")
    if pool_size is None:
        _check_exact_form(models)
    else:
        pool_size = check_count(pool_size, "pool_size")
    listed = prompts_list(prompts)
    if pool_size is not None:
        check_rows("pool_size", pool_size, listed, f"{pool_size} candidates")
    generator = as_generator(rng)
    run: Run
    if pool_size is None:
        run = ExactSPRun(listed, generator, max_steps)
    else:
        run = PoolRun(listed, pool_size, generator, max_steps)
    return limited(run, max_new_tokens, models)
