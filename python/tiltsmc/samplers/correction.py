r"""Resampling-pool Metropolis-Hastings (particle-independent MH) correction.

Each proposal is an independent run — SP-gSMC with a pool of ``K`` (``num_particles = 1``) or full
``N``-particle SMC (PIMH) — giving a trajectory ``x'`` and its ``Zh'``; the chain moves to it with
probability ``min(1, Zh' / Zh)``. On the space augmented by every draw of a run, this is independent MH
whose stationary law on ``x`` is exactly ``pi``; its total-variation error contracts geometrically in the
number of steps ``H``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Optional

from .._rng import RNGLike, as_generator
from ..models.protocols import Policy, RewardModel
from ._engine import Models, check_count, check_rows, limited, prompts_list
from .lane import run_alone
from .result import Compute, SamplerResult
from .runs import MHRun
from .sequential import _check_common, _check_exact_form

__all__ = ["mh", "options_not_read"]

# The options that the proposals of each form read, besides num_particles and steps: SP-gSMC runs (one
# particle) their pool, SMC runs (several) their resampling.
POOL_OPTIONS = ("pool_size",)
SMC_OPTIONS = ("resample", "ess_threshold")


def options_not_read(given: Iterable[str], num_particles: int) -> list[str]:
    """Which of the options ``given`` (``mh``'s names) the proposals of ``num_particles`` particles do not
    read: ``pool_size`` with more than one particle (SMC runs), ``resample`` and ``ess_threshold`` with
    one (SP-gSMC runs). The front ends refuse such an option given explicitly, as it would change
    nothing."""
    unread = SMC_OPTIONS if num_particles == 1 else POOL_OPTIONS
    return [name for name in given if name in unread]


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
    max_new_tokens: Optional[int] = None,
) -> SamplerResult:
    """SP-gSMC (``num_particles=1``; ``pool_size=None`` for the exact form) or SMC (PIMH) corrected by
    ``steps`` independent Metropolis-Hastings proposals accepted with ``min(1, Zh'/Zh)``.

    ``samples[b]`` is the chain's final state (one trajectory); ``log_z[b]`` is the log of the mean of the
    ``steps + 1`` independent estimates ``Zh`` (each unbiased for ``Z``); ``acceptance_rate[b]`` the
    fraction of accepted proposals (NaN when ``steps = 0``). For PIMH a run's trajectory is drawn from
    its weighted particles by weight. ``steps=0`` returns the uncorrected draw.

    Every option is checked whichever form the proposals take: ``pool_size`` (an int >= 1, or None) with
    ``num_particles > 1`` too, ``resample`` and ``ess_threshold`` with ``num_particles=1`` too.
    """
    models = Models(policy, reward, Compute())
    run = mh_run(
        models, prompts, pool_size, steps, num_particles, rng,
        resample=resample, ess_threshold=ess_threshold, max_steps=max_steps, max_new_tokens=max_new_tokens,
    )  # fmt: skip
    result: SamplerResult = run_alone(models, run)
    return result


def mh_run(
    models: Models,
    prompts: Optional[Sequence[Any]],
    pool_size: Optional[int],
    steps: int,
    num_particles: int,
    rng: RNGLike,
    *,
    resample: str,
    ess_threshold: float,
    max_steps: int,
    max_new_tokens: Optional[int] = None,
) -> MHRun:
    """The run of [`mh`][tiltsmc.samplers.correction.mh] with these arguments, checked."""
    steps = check_count(steps, "steps", minimum=0)
    num_particles = check_count(num_particles, "num_particles")
    # Every option is checked, whichever form the proposals take (the pool with one particle, SMC's
    # resampling options with more).
    if pool_size is not None:
        pool_size = check_count(pool_size, "pool_size")
    _check_common(resample, ess_threshold, "naive", models)
    if num_particles == 1 and pool_size is None:
        _check_exact_form(models)
    max_steps = check_count(max_steps, "max_steps")
    listed = prompts_list(prompts)
    check_rows("num_particles", num_particles, listed, f"{num_particles} particles")
    if num_particles == 1 and pool_size is not None:  # the pool's candidates (SMC proposals have none)
        check_rows("pool_size", pool_size, listed, f"{pool_size} candidates")
    run = MHRun(
        listed,
        pool_size,
        steps,
        num_particles,
        resample,
        float(ess_threshold),
        as_generator(rng),
        max_steps,
    )
    return limited(run, max_new_tokens, models)
