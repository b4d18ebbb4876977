r"""Estimating the Bellman error of an approximate reward model ``Vh`` from rollouts of ``p``.

For prefixes ``s_{1:t-1}`` visited by rollouts of the base policy, the local ratio

    rho_t(s_{1:t-1}) = E_{s_t ~ p}[Vh_t(s_{1:t})] / Vh_{t-1}(s_{1:t-1})

is computed exactly from a twist head (``sum_v p(v|.) Vh_t(., v)``, when the policy is token-level and the
reward model has ``next_log_values``) or estimated from ``M`` sampled continuations. The Bellman error
``eps_t`` is the supremum over prefixes of ``max(rho, 1/rho) - 1``
(``docs/theory/tilted-target.md``); here the supremum runs over the visited prefixes, so it converges
to the exact value from below as prefixes cover the reachable ones, while noise in sampled ratios pushes it
up. Confidence intervals: for sampled continuations each ratio gets a normal interval on its mean (delta
method on the log; the sd of a prefix is floored at the step's pooled within-prefix sd, so agreeing
continuations give no zero-width interval), at a level corrected for the number of intervals (Bonferroni), and
the per-step supremum's interval is ``[max of lower ends, max of upper ends]`` of ``|log rho|``. Also
reported: the gauge-minimised ``eps`` (rescaling level ``t`` by a constant shifts every ``log rho_t`` alike,
so the best constant leaves ``(max - min) / 2``) and the paper's ratio bound ``L`` (``1/L <= G_t <= L``) of
the observed potentials ``G_t = Vh_t / Vh_{t-1}``, in the model's gauge and in the one that minimises ``eps``.

Everything is computed in the log domain: the mean of the values of ``M`` continuations is a log-mean-exp,
``log (1/M) sum_j exp(log Vh_t^(j))``, and their standard deviation is taken relative to the largest of
them, so values far below the smallest double (a product of step scores over hundreds of steps) give
finite, exact answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Literal, Optional

import numpy as np
import numpy.typing as npt

from .._numeric import logsumexp
from .._rng import RNGLike, as_generator
from ..models._config import real_number
from ..models.protocols import Policy, RewardModel, TokenPolicy, TwistModel
from ..samplers._engine import check_count, check_models

__all__ = ["BellmanEstimate", "bellman_error"]

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class BellmanEstimate:
    """Estimated Bellman error: ``eps`` (sup over steps) with its interval, and per-step profiles.

    ``log_per_step[t-1]`` is the largest ``|log rho_t|`` over visited prefixes, ``per_step = exp(.) - 1``;
    ``per_step_low`` / ``per_step_high`` bound it (equal for the exact method); ``gauge_per_step`` is
    ``exp((max - min) / 2) - 1`` of ``log rho_t``.

    ``ratio_bound`` is the paper's ``L`` (Assumption 3.1, ``1/L <= G_t <= L`` on reachable paths) over the
    potentials ``G_t = Vh_t / Vh_{t-1}`` observed from visited prefixes of positive value (every next token
    of positive probability with the exact method, the sampled continuations and the rollout's own step
    otherwise): ``inf`` as soon as one of them is 0 (a 0/1 verifier). ``positive_ratio_bound`` is the
    largest ``max(G, 1/G)`` over the positive ones only (finite; not the paper's ``L``), and
    ``gauge_ratio_bound`` is ``L`` in the gauge of ``gauge_eps`` (each ``log G_t`` shifted by
    ``-(max + min) / 2`` of ``log rho_t``), so that ``(gauge_ratio_bound, gauge_eps)`` belong to one
    rescaled model, as a bound such as Theorem 5.1's needs. All three grow towards the exact values from
    below as the prefixes and continuations cover the reachable ones.

    ``average_per_step[t-1]`` is the typical rather than the worst error: the mean of ``|rho_t - 1|`` over
    the visited prefixes weighted by ``Vh_{t-1}``, i.e. under the twisted path law ``p Vh_{t-1}`` that
    guided particles follow, which equals ``E_p|E_p[Vh_t | .] - Vh_{t-1}| / E_p[Vh_{t-1}]``. It stays finite
    where the supremum does not (a prefix with ``Vh_{t-1} > 0`` whose continuations all have value ``0``
    gives ``eps_t = inf``: a learned model that never says exactly 0 meets an exact 0/1 verifier).
    Sampled continuations bias it upward by about their relative standard error.
    """

    eps: float
    eps_low: float
    eps_high: float
    per_step: FloatArray
    per_step_low: FloatArray
    per_step_high: FloatArray
    log_per_step: FloatArray
    gauge_eps: float
    gauge_per_step: FloatArray
    ratio_bound: float
    method: str
    num_prefixes: int
    samples_per_prefix: int
    average_per_step: FloatArray = field(default_factory=lambda: np.zeros(0))
    positive_ratio_bound: float = 1.0
    gauge_ratio_bound: float = 1.0

    @property
    def average_eps(self) -> float:
        """The largest per-step ``average_per_step`` (0 with no steps)."""
        return float(self.average_per_step.max()) if self.average_per_step.size else 0.0

    def to_dict(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            values = np.asarray(value, dtype=float).tolist()
            return values

        return {
            "eps": self.eps,
            "eps_interval": [self.eps_low, self.eps_high],
            "per_step": plain(self.per_step),
            "per_step_low": plain(self.per_step_low),
            "per_step_high": plain(self.per_step_high),
            "log_per_step": plain(self.log_per_step),
            "gauge_eps": self.gauge_eps,
            "gauge_per_step": plain(self.gauge_per_step),
            "ratio_bound": self.ratio_bound,
            "positive_ratio_bound": self.positive_ratio_bound,
            "gauge_ratio_bound": self.gauge_ratio_bound,
            "method": self.method,
            "num_prefixes": self.num_prefixes,
            "samples_per_prefix": self.samples_per_prefix,
            "average_eps": self.average_eps,
            "average_per_step": plain(self.average_per_step),
        }


def bellman_error(
    policy: Policy,
    reward: RewardModel,
    prompts: Optional[Sequence[Any]] = None,
    num_prefixes: int = 256,
    samples_per_prefix: int = 64,
    rng: RNGLike = None,
    *,
    method: Literal["auto", "exact", "sampled"] = "auto",
    confidence: float = 0.95,
    max_steps: int = 1_000_000,
) -> BellmanEstimate:
    """Estimate the Bellman error of ``reward`` under ``policy`` from ``num_prefixes`` rollouts per prompt.

    ``method="exact"`` sums over the vocabulary with the twist head; ``"sampled"`` averages ``Vh_t`` over
    ``samples_per_prefix`` continuations of each prefix; ``"auto"`` takes the exact one where available.
    ``confidence`` is the joint level of the intervals (Bonferroni over every scored prefix of every step).
    Prefixes of value zero are skipped. As in [`smc`][tiltsmc.smc], rollouts still unfinished after
    ``max_steps`` steps raise RuntimeError.

    Checked before any rollout: ``policy`` and ``reward`` implement the protocols (TypeError), the counts
    are ints >= 1, ``confidence`` a number (TypeError) in (0, 1) and ``method`` one of the three
    (ValueError).
    """
    check_models(policy, reward)
    num_prefixes = check_count(num_prefixes, "num_prefixes")
    level = real_number(confidence, "confidence")  # "0.5" is refused, not read as 0.5
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence: expected a level in (0, 1), got {confidence!r}")
    samples_per_prefix = check_count(samples_per_prefix, "samples_per_prefix")
    max_steps = check_count(max_steps, "max_steps")
    if method not in ("auto", "exact", "sampled"):
        raise ValueError(f"method: expected 'auto', 'exact' or 'sampled', got {method!r}")
    exact_available = isinstance(policy, TokenPolicy) and isinstance(reward, TwistModel)
    if method == "exact" and not exact_available:
        raise ValueError("method: 'exact' needs a token policy and a reward model with a twist head")
    exact = method == "exact" or (method == "auto" and exact_available)
    generator = as_generator(rng)
    particles = policy.start(prompts, num_prefixes)
    batch = particles.num_prompts
    log_v_prev = np.repeat(
        np.asarray(reward.initial_log_value(particles), dtype=float)[:, None], num_prefixes, 1
    )
    # Per step: |log rho| and the relative standard error of each scored prefix (None: an infinite step).
    steps: list[Optional[tuple[FloatArray, FloatArray]]] = []
    gauge: list[float] = []
    shift: list[float] = []  # the gauge's shift of log rho_t (and of log G_t): -(max + min) / 2
    average: list[float] = []  # Vh_{t-1}-weighted mean of |rho_t - 1|
    g_high: list[float] = []  # largest and smallest positive log G_t observed at each step
    g_low: list[float] = []
    zero_potential = False
    for _ in range(max_steps):
        if particles.finished.all():
            break
        scored = ~particles.finished & (log_v_prev > -np.inf)
        prev_safe = np.where(scored, log_v_prev, 0.0)  # never -inf - -inf
        if exact:
            assert isinstance(policy, TokenPolicy) and isinstance(reward, TwistModel)
            log_p = np.asarray(policy.next_log_probs(particles), float)
            next_log_v = np.asarray(reward.next_log_values(particles), float)
            log_mean = logsumexp(log_p + next_log_v)
            relative_error = np.zeros_like(log_mean)
            # every next token of positive probability: its potential
            observed_g = next_log_v - prev_safe[..., None]
            observed = scored[..., None] & (log_p > -np.inf)
        else:
            repeats = np.repeat(np.arange(num_prefixes), samples_per_prefix)
            continuations = particles.take(np.broadcast_to(repeats, (batch, repeats.size)).copy())
            policy.propose(continuations, generator)
            log_values = np.asarray(reward.log_value(continuations), float).reshape(
                batch, num_prefixes, samples_per_prefix
            )
            log_mean, log_sd = _log_mean_and_sd(log_values)
            # A prefix whose few continuations happened to agree gets no zero-width interval: its sd is
            # floored at the pooled within-prefix sd of the step (root mean square of the sds, in logs).
            log_pooled = (
                0.5 * float(logsumexp(2.0 * log_sd[scored]) - np.log(np.count_nonzero(scored)))
                if scored.any()
                else -np.inf
            )
            log_standard_error = np.maximum(log_sd, log_pooled) - 0.5 * np.log(samples_per_prefix)
            # Delta method: sd(log mean) ~ se / mean.
            finite_mean = log_mean > -np.inf
            relative_error = np.full_like(log_mean, np.inf)
            relative_error[finite_mean] = np.exp(log_standard_error[finite_mean] - log_mean[finite_mean])
            observed_g = log_values - prev_safe[..., None]
            observed = np.broadcast_to(scored[..., None], observed_g.shape)
        log_rho = np.where(scored, log_mean - prev_safe, np.nan)
        if scored.any():
            weights = np.exp(log_v_prev[scored] - log_v_prev[scored].max())
            with np.errstate(over="ignore"):
                deviation = np.abs(np.exp(log_rho[scored]) - 1.0)
            present = weights > 0  # a weight that underflowed contributes 0, even against rho = inf
            average.append(float(np.sum(weights[present] * deviation[present]) / np.sum(weights)))
        else:
            average.append(0.0)
        if np.any(scored & (log_mean == -np.inf)):
            steps.append(None)
            gauge.append(np.inf)
            shift.append(0.0)
        else:
            values_here = log_rho[scored]
            steps.append((np.abs(values_here), relative_error[scored]))
            if values_here.size:
                gauge.append(float((values_here.max() - values_here.min()) / 2))
                shift.append(-float((values_here.max() + values_here.min()) / 2))
            else:
                gauge.append(0.0)
                shift.append(0.0)
        live = ~particles.finished
        policy.propose(particles, generator)
        log_v = np.asarray(reward.log_value(particles), float)
        # the rollout's own step is one more observed transition of each scored prefix
        seen = np.concatenate([observed_g[observed], (log_v - prev_safe)[live & scored]])
        zero_potential |= bool(np.any(seen == -np.inf))
        positive = seen[seen > -np.inf]
        g_high.append(float(positive.max()) if positive.size else 0.0)
        g_low.append(float(positive.min()) if positive.size else 0.0)
        log_v_prev = np.where(live, log_v, log_v_prev)
    if not particles.finished.all():  # as smc: a truncated rollout would read as a shorter horizon
        raise RuntimeError(f"max_steps: trajectories still unfinished after {max_steps} steps")
    # Simultaneous intervals: Bonferroni over every scored prefix of every step.
    scored_total = sum(len(step[0]) for step in steps if step is not None)
    z = NormalDist().inv_cdf(1.0 - (1.0 - level) / (2.0 * max(scored_total, 1)))
    bounds = []  # (sup, lower end, upper end) of |log rho| per step
    for step in steps:
        if step is None:
            bounds.append((np.inf, np.inf, np.inf))
        elif step[0].size == 0:
            bounds.append((0.0, 0.0, 0.0))
        else:
            magnitude, half_width = step[0], z * step[1]
            lower = np.maximum(magnitude - half_width, 0.0)
            bounds.append((float(magnitude.max()), float(lower.max()), float(np.max(magnitude + half_width))))
    log_sup, log_low, log_high = (
        (np.array(column, dtype=float) for column in zip(*bounds))
        if bounds
        else (np.zeros(0), np.zeros(0), np.zeros(0))
    )
    log_per_step = np.array(log_sup)
    per_step = np.expm1(log_per_step)
    with np.errstate(over="ignore"):  # a huge interval end is +inf, as it should be
        per_step_low, per_step_high = np.expm1(np.array(log_low)), np.expm1(np.array(log_high))
    gauge_per_step = np.expm1(np.array(gauge))
    high, low, moved = np.array(g_high), np.array(g_low), np.array(shift)
    log_positive = float(np.max(np.maximum(high, -low), initial=0.0))
    log_gauge = float(np.max(np.maximum(high + moved, -(low + moved)), initial=0.0))
    return BellmanEstimate(
        eps=float(per_step.max()) if per_step.size else 0.0,
        eps_low=float(per_step_low.max()) if per_step.size else 0.0,
        eps_high=float(per_step_high.max()) if per_step.size else 0.0,
        per_step=per_step,
        per_step_low=per_step_low,
        per_step_high=per_step_high,
        log_per_step=log_per_step,
        gauge_eps=float(gauge_per_step.max()) if per_step.size else 0.0,
        gauge_per_step=gauge_per_step,
        ratio_bound=np.inf if zero_potential else float(np.exp(log_positive)),
        method="exact" if exact else "sampled",
        num_prefixes=num_prefixes,
        samples_per_prefix=0 if exact else samples_per_prefix,
        average_per_step=np.array(average, dtype=float),
        positive_ratio_bound=float(np.exp(log_positive)),
        gauge_ratio_bound=np.inf if zero_potential else float(np.exp(log_gauge)),
    )


def _log_mean_and_sd(log_values: FloatArray) -> tuple[FloatArray, FloatArray]:
    """``log mean_j v_j`` and ``log sd_j v_j`` (``ddof=1``; ``-inf`` for one sample) along the last axis of
    ``log v``, without leaving the log domain: both are taken on ``v_j / max_j v_j``, then shifted back, so
    values like ``exp(-1000)`` are exact. An all-zero row gives ``-inf`` for both."""
    count = log_values.shape[-1]
    top = np.max(log_values, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    scaled = np.exp(log_values - top)
    mean = scaled.mean(axis=-1)
    spread = scaled.std(axis=-1, ddof=1) if count > 1 else np.zeros_like(mean)
    with np.errstate(divide="ignore"):
        return np.log(mean) + top[..., 0], np.log(spread) + top[..., 0]
