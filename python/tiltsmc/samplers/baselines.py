"""Rejection sampling (exact, with a known bound on r) and best-of-N (a baseline, not a sampler of pi)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from .._rng import RNGLike, as_generator
from ..models._config import as_float
from ..models.protocols import Policy, RewardModel
from ._engine import Models, check_count, check_rows, limited, prompts_list
from .lane import run_alone
from .result import Compute, SamplerResult
from .runs import BestOfNRun, RejectionRun

__all__ = ["best_of_n", "rejection"]


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
    max_new_tokens: Optional[int] = None,
) -> SamplerResult:
    """Exact samples of ``pi``: draw ``x ~ p``, accept with probability ``r(x) / bound``.

    ``bound`` must satisfy ``bound >= sup r``: an observed ``r > bound`` raises (the sampler would be
    wrong). Draws go in batches of ``batch_size`` per prompt until ``num_samples`` are accepted or
    ``max_tries`` draws are spent; ``tries[b]`` counts the draws, ``samples[b]`` holds at most
    ``num_samples`` (fewer when tries ran out), and ``log_z[b]`` is ``log`` of the mean ``r`` over the draws
    of every batch but the last (of the one batch where there was one), unbiased for ``Z`` before the log:
    the last batch's acceptances decide the stop, and the mean over every draw is biased up. With a 0/1
    reward (a verifier), ``bound = 1`` and ``num_samples = 1``, the first draw of reward 1 is accepted and
    ends the run, so every draw before the last batch had reward 0 and a run that needed several batches
    reads ``log_z = -inf`` (the estimate 0) although it found its sample (``collapsed`` False): unbiased
    across runs (average ``exp(log_z)``), not a reading of one run; larger batches make it rarer.
    """
    models = Models(policy, reward, Compute())
    run = rejection_run(
        models,
        prompts,
        bound,
        num_samples,
        max_tries,
        rng,
        batch_size=batch_size,
        max_steps=max_steps,
        max_new_tokens=max_new_tokens,
    )
    result: SamplerResult = run_alone(models, run)
    return result


def rejection_run(
    models: Models,
    prompts: Optional[Sequence[Any]],
    bound: float,
    num_samples: int,
    max_tries: int,
    rng: RNGLike,
    *,
    batch_size: int,
    max_steps: int,
    max_new_tokens: Optional[int] = None,
) -> RejectionRun:
    """The run of [`rejection`][tiltsmc.samplers.baselines.rejection] with these arguments, checked."""
    if isinstance(bound, (bool, np.bool_)) or not isinstance(bound, (int, float, np.integer, np.floating)):
        raise TypeError(f"bound: expected a finite bound C > 0 on the reward, got {bound!r}")
    given, bound = bound, as_float(bound)
    if not (math.isfinite(bound) and bound > 0.0):
        raise ValueError(f"bound: expected a finite bound C > 0 on the reward, got {given!r}")
    num_samples = check_count(num_samples, "num_samples")
    max_tries = check_count(max_tries, "max_tries", maximum=np.iinfo(np.int64).max)  # counted in int64
    batch_size = check_count(batch_size, "batch_size")
    listed = prompts_list(prompts)
    # a round draws batch_size per waiting prompt, max_tries at most
    draws, name = (batch_size, "batch_size") if batch_size <= max_tries else (max_tries, "max_tries")
    check_rows(name, draws, listed, f"{draws} draws a round")
    run = RejectionRun(
        listed,
        bound,
        num_samples,
        max_tries,
        batch_size,
        as_generator(rng),
        check_count(max_steps, "max_steps"),
    )
    return limited(run, max_new_tokens, models)


def best_of_n(
    policy: Policy,
    reward: RewardModel,
    prompts: Optional[Sequence[Any]] = None,
    n: int = 16,
    rng: RNGLike = None,
    *,
    max_steps: int = 1_000_000,
    max_new_tokens: Optional[int] = None,
) -> SamplerResult:
    """Draw ``n`` trajectories from ``p`` per prompt and return the highest-reward one (first on ties).

    A baseline, not a sampler of ``pi``. ``log_z[b]`` is ``log`` of the mean reward of the ``n`` draws.
    """
    models = Models(policy, reward, Compute())
    result: SamplerResult = run_alone(
        models, best_of_n_run(models, prompts, n, rng, max_steps=max_steps, max_new_tokens=max_new_tokens)
    )
    return result


def best_of_n_run(
    models: Models,
    prompts: Optional[Sequence[Any]],
    n: int,
    rng: RNGLike,
    *,
    max_steps: int,
    max_new_tokens: Optional[int] = None,
) -> BestOfNRun:
    """The run of [`best_of_n`][tiltsmc.samplers.baselines.best_of_n] with these arguments, checked."""
    listed, n = prompts_list(prompts), check_count(n, "n")
    generator, max_steps = as_generator(rng), check_count(max_steps, "max_steps")
    check_rows("n", n, listed, f"{n} draws")
    run = BestOfNRun(listed, n, generator, max_steps)
    return limited(run, max_new_tokens, models)
