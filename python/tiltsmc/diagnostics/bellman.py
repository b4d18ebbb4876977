r"""Estimating the Bellman error of an approximate reward model ``Vh`` from rollouts of ``p``.

For prefixes ``s_{1:t-1}`` visited by rollouts of the base policy, the local ratio

    rho_t(s_{1:t-1}) = E_{s_t ~ p}[Vh_t(s_{1:t})] / Vh_{t-1}(s_{1:t-1})

is computed exactly from a twist head (``sum_v p(v|.) Vh_t(., v)``, when the policy is a token policy
whose step is one token, its ``token_level`` not False, as the samplers' optimal proposal needs, and the
reward model has ``next_log_values``) or estimated from ``M`` sampled continuations. The Bellman error
``eps_t`` is the supremum over prefixes of ``max(rho, 1/rho) - 1``
(``docs/theory/tilted-target.md``); here the supremum runs over the visited prefixes, so it converges
to the exact value from below as prefixes cover the reachable ones, while noise in sampled ratios pushes it
up. Also reported: the gauge-minimised ``eps``, per prompt (each prompt's particles are weighted among
themselves, so rescaling one prompt's level ``t`` by a constant changes no sampler's output; it shifts every
``log rho_t`` of that prompt alike, and the best constant leaves half its range: with ``hi_b`` and ``lo_b``
the largest and smallest ``log rho_t`` over prompt ``b``'s prefixes, ``log(1 + gauge_eps_t)`` is the
largest over prompts of ``(hi_b - lo_b) / 2``, reached by the shift ``-(hi_b + lo_b) / 2``), the paper's
ratio bound ``L`` (``1/L <= G_t <= L``) of the observed potentials ``G_t = Vh_t / Vh_{t-1}``, in the model's
gauge and in the one that minimises ``eps``, and the typical error ``average_per_step`` (per prompt the
``Vh_{t-1}``-weighted mean of ``|rho_t - 1|``, then the mean over the prompts).

Confidence intervals (sampled continuations; the exact method's are points, less rounding). A prefix's ``M``
continuations have values ``v_j`` with sample mean ``mh`` and sample sd ``s`` (``ddof=1``), so
``(mh - E v) / (s / sqrt(M))`` is Student's ``t`` with ``M - 1`` degrees of freedom for normal ``v``; the
delta method carries this to ``log rho_hat = log mh - log Vh_{t-1}``, whose standard deviation is
``s / (sqrt(M) mh)``, and

    |log rho| in [max(|log rho_hat| - q s / (sqrt(M) mh) - ROUNDING, 0), |log rho_hat| + q s / (sqrt(M) mh)],

with ``q`` the upper ``(1 - confidence) / (2n)`` quantile of ``t`` with ``M - 1`` degrees of freedom
(two-sided, Bonferroni over the ``n`` scored prefixes of every step, of every prompt) and ``ROUNDING =
1e-9`` (``tiltsmc.diagnostics.online.ROUNDING``): ``|log rho_hat|`` is a difference of log-values, and
values that are equal mathematically (``V*``'s, whose ``eps`` is 0) differ in their last bits, which must
not read as an error. The exact method's interval is so ``[max(|log rho| - ROUNDING, 0), |log rho|]``.
The supremum over a step's *visited* prefixes then lies in ``[max of lower ends, max of upper ends]``
whenever every prefix's interval holds: ``eps_low`` and ``eps_high`` bracket the supremum over the
prefixes the rollouts visited, not the ``eps`` over every reachable prefix, which can lie above both (with
the exact method, a point below the true ``eps`` where the worst prefix was missed). The relative sd
``s / mh`` of a prefix is floored at its prompt's pooled one at that step (root mean square of ``s / mh``
over that prompt's scored prefixes; it has more degrees of freedom, so ``M - 1`` stays conservative), so a
prefix whose few continuations happened to agree gets no zero-width interval. It is per prompt, as
everything else here: pooled over the batch, a prompt's intervals depended on which other prompts were in
it (a prompt whose continuations all agreed borrowed another's spread and read as a narrow interval); only
the Bonferroni count ``n`` is shared. It is relative, as ``log rho`` is free of scale: a floor of the sds
themselves, in the values' units, gave a prefix whose values are ``k`` times smaller than the others' a
margin ``k`` times too wide (an infinite upper end for ``k = 10^6``). A relative sd below ``ROUNDING`` is
rounding, read as 0. Three cases have no finite standard error, and their interval for ``|log rho|`` is
``[0, inf]``, the only one valid without a bound on ``Vh``:

* ``M = 1``: one value per prefix says nothing of its spread (the sample sd is undefined; ``t`` with 0
  degrees of freedom), so the intervals are ``[0, inf]``, ``eps_low = 0`` and ``eps_high = inf``; the
  point estimate stands.
* a step with no spread to read in a prompt: the continuations of each of the prompt's scored prefixes
  agree (to within rounding: a relative sd below ``ROUNDING``), so its pooled relative sd is 0. Sampled
  continuations cannot tell a step whose values the prefix fixes (a forced token, a reward already decided)
  from draws that happened to agree, with any spread they missed, so every prefix of that prompt at the
  step gets ``[0, inf]``, as with ``M = 1``: ``per_step_low = 0`` and ``per_step_high = inf`` there (the
  point estimate stands). A width of 0 there read as exact, and with few prefixes such steps are common:
  on the tasks measured below, with 1 prefix and ``M = 2``, it made ``eps_low`` exceed the exact ``eps``
  in 84 of 200 runs. Rounding read as spread made the rule miss where values are equal mathematically: on
  ``MarkovDFATask.random(3, 3, 5, zero_reward_fraction=0)`` tasks with ``V*`` as the twist (``eps = 0``;
  200 tasks, 200 prefixes, ``M = 32``) ``eps_low`` was above 0 in 18 runs, 7 of them from rounding alone
  (a ``|log rho|`` of ``4e-16`` with intervals ``1e-16`` wide); with ``ROUNDING``, in 11. The exact
  method reads such steps.
* every sampled continuation of a prefix has value 0 (``mh = 0``): the point estimate is ``rho = 0``
  (``eps_t = inf``), but continuations of positive value may exist that the ``M`` draws missed, with any
  mean, so the prefix's interval is ``[0, inf]``: it raises the step's upper end to ``inf`` and leaves its
  lower end to the other prefixes. With the exact method a zero mean is exact and ``eps_t = inf`` at both
  ends (the *true* continuations all have value 0).

The values are not normal (a 0/1 verifier's are Bernoulli), so this is still an approximation: for the
mean of a non-negative variable of unknown law no finite-sample interval with an upper end exists
(Bahadur and Savage, 1956). Measured on ``MarkovDFATask.random(3, 3, 4)`` tasks (``twist(0.3)``, half of
them with zero rewards; 200 tasks, 200 prefixes, ``confidence=0.95``), ``eps_low`` exceeded the exact
``eps`` in 0, 0, 3, 2 and 0 of 200 runs for ``M = 2, 3, 8, 32, 64`` (within the 5% stated); a normal
quantile in place of ``t`` (no correction for estimating the sd) gave 53, 44, 17 and 6 of 200 for
``M = 2, 3, 8, 32``. The price is width at small ``M``: ``eps_low`` was above 0 in 0, 1, 100, 188 and 197
of the 200 runs. With few prefixes (1 and 4, ``M = 2`` and ``3``) it exceeded ``eps`` in 0, 2, 1 and 0 of
200 runs.

Everything is computed in the log domain: the mean of the values of ``M`` continuations is a log-mean-exp,
``log (1/M) sum_j exp(log Vh_t^(j))``, and their standard deviation is taken relative to the largest of
them, so values far below the smallest double (a product of step scores over hundreds of steps) give
finite, exact answers. The reward model's log-values are checked as the samplers check them
(``check_log_values``): NaN or ``+inf`` is refused (ValueError naming the prompt and step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Literal, Optional

import numpy as np
import numpy.typing as npt

from .._numeric import logsumexp
from .._rng import RNGLike, as_generator
from ..models._config import real_number
from ..models.particles import Particles
from ..models.protocols import Policy, RewardModel, is_token_policy, is_twist_model
from ..samplers._engine import (
    check_count,
    check_log_values,
    check_models,
    check_rows,
    check_started,
    checked_log_probs,
    model_output,
    prompts_list,
)
from ..samplers.result import plain, prompt_error

__all__ = ["BellmanEstimate", "bellman_error"]

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class BellmanEstimate:
    """Estimated Bellman error: ``eps`` (sup over steps) with its interval, and per-step profiles.

    ``log_per_step[t-1]`` is the largest ``|log rho_t|`` over visited prefixes, ``per_step = exp(.) - 1``;
    ``per_step_low`` / ``per_step_high`` bound it (simultaneous intervals for the supremum over the *visited*
    prefixes, not over every reachable one; for the exact method ``per_step_high = per_step`` and
    ``per_step_low`` is ``ROUNDING = 1e-9`` below it in log, 0 at least, so that rounding reads as no
    error); ``gauge_per_step[t-1]`` is
    ``exp(max_b (hi_b - lo_b) / 2) - 1``, with ``hi_b`` and ``lo_b`` the largest and smallest ``log rho_t``
    over prompt ``b``'s visited prefixes: the gauge rescales each prompt's levels on their own.

    ``ratio_bound`` is the paper's ``L`` (Assumption 3.1, ``1/L <= G_t <= L`` on reachable paths) over the
    potentials ``G_t = Vh_t / Vh_{t-1}`` observed from visited prefixes of positive value (every next token
    of positive probability with the exact method, the sampled continuations and the rollout's own step
    otherwise): ``inf`` as soon as one of them is 0 (a 0/1 verifier). ``positive_ratio_bound`` is the
    largest ``max(G, 1/G)`` over the positive ones only (finite; not the paper's ``L``), and
    ``gauge_ratio_bound`` is ``L`` in the gauge of ``gauge_eps`` (each ``log G_t`` shifted by
    ``-(hi_b + lo_b) / 2`` of its own prompt's ``log rho_t``), so that ``(gauge_ratio_bound, gauge_eps)``
    belong to one rescaled model, as a bound such as Theorem 5.1's needs. ``ratio_bound`` and
    ``positive_ratio_bound`` are maxima over potentials of reachable paths (sampled ones included: no noise
    there), so they never exceed the exact values and grow towards them as the prefixes and continuations
    cover the reachable ones. ``gauge_ratio_bound`` has no such order: its shifts are fitted to the visited
    prefixes' ``log rho_t`` (noisy ones with sampled continuations), the exact value's to every reachable
    prefix's, so a visited potential moved by them can lie further from 1 than every reachable one in the
    exact gauge. It can exceed the exact value as well as fall short of it (the exact method on
    ``MarkovDFATask.random(3, 3, 5)`` tasks with ``twist(0.3)`` and 1 - 32 prefixes: above it in 13 of 180
    runs, e.g. 21.4 against 18.1), and equals it once the visited prefixes cover the reachable ones (exact
    method).

    ``average_per_step[t-1]`` is the typical rather than the worst error: per prompt, the mean of
    ``|rho_t - 1|`` over its visited prefixes weighted by ``Vh_{t-1}``, i.e. under the twisted path law
    ``p Vh_{t-1}`` that its guided particles follow, which equals
    ``E_p|E_p[Vh_t | .] - Vh_{t-1}| / E_p[Vh_{t-1}]``; then the mean over the prompts with a visited prefix
    at that step, each alike (the weights are normalised within a prompt: a prompt whose ``Vh`` is scaled
    by a constant, which changes no sampler's output, neither dominates nor vanishes). It stays finite
    where the supremum does not (a prefix with ``Vh_{t-1} > 0`` whose continuations all have value ``0``
    gives ``eps_t = inf``: a learned model that never says exactly 0 meets an exact 0/1 verifier).
    Sampled continuations bias it upward by about their relative standard error.

    ``errors[b]`` says why the policy could not start prompt ``b``, or go on with it during the rollouts
    (as ``SamplerResult.errors``): such a prompt is not in the estimate from then on (the prefixes it
    visited before are), which covers the other prompts only.
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
    errors: dict[int, str] = field(default_factory=dict)

    @property
    def average_eps(self) -> float:
        """The largest per-step ``average_per_step`` (0 with no steps)."""
        return float(self.average_per_step.max()) if self.average_per_step.size else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types only, strict JSON (``json.dumps(..., allow_nan=False)`` works) as
        [`SamplerResult.to_dict`][tiltsmc.samplers.result.SamplerResult.to_dict] writes it: arrays as lists,
        and a number that is not finite as None (``null``), which in every field of an estimate stands for
        ``+inf`` (no field is ``-inf`` or NaN: an error, a bound or an interval end that is infinite, e.g.
        ``eps`` where a prefix of positive value has continuations of value 0). ``errors`` (prompt index as
        a string: reason) is there only when a prompt failed, as in ``SamplerResult.to_dict``."""
        record: dict[str, Any] = {
            "eps": plain(self.eps),
            "eps_interval": plain([self.eps_low, self.eps_high]),
            "per_step": plain(self.per_step),
            "per_step_low": plain(self.per_step_low),
            "per_step_high": plain(self.per_step_high),
            "log_per_step": plain(self.log_per_step),
            "gauge_eps": plain(self.gauge_eps),
            "gauge_per_step": plain(self.gauge_per_step),
            "ratio_bound": plain(self.ratio_bound),
            "positive_ratio_bound": plain(self.positive_ratio_bound),
            "gauge_ratio_bound": plain(self.gauge_ratio_bound),
            "method": self.method,
            "num_prefixes": self.num_prefixes,
            "samples_per_prefix": self.samples_per_prefix,
            "average_eps": plain(self.average_eps),
            "average_per_step": plain(self.average_per_step),
        }
        if self.errors:
            record["errors"] = {str(b): message for b, message in self.errors.items()}
        return record


def check_confidence(confidence: Any) -> float:
    """``confidence`` as a float level in ``(0, 1)`` whose normal quantiles are finite: a number (TypeError
    otherwise, not a string or a bool), ``0 < confidence < 1`` and ``1 - confidence < 1`` in floating point
    (ValueError otherwise: below about ``5.6e-17`` the error probability ``1 - confidence`` rounds to 1 and
    a one-sided quantile at it is ``-inf``). Every level accepted here gives finite quantiles through
    ``upper_normal_quantile``: its error probability
    is at least ``2^-53``, far above the smallest positive double however many intervals share it."""
    level = real_number(confidence, "confidence")  # "0.5" is refused, not read as 0.5
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence: expected a level in (0, 1), got {confidence!r}")
    if 1.0 - level == 1.0:
        raise ValueError(
            f"confidence: expected a level in (0, 1), got {confidence!r}, too close to 0 (1 - confidence "
            "rounds to 1, so the bounds' normal quantile would be infinite)"
        )
    return level


def upper_normal_quantile(tail: float) -> float:
    """``z`` with ``P(Z > z) = tail`` for a standard normal ``Z`` (``0 < tail < 1``), computed from the tail
    itself (``-Phi^-1(tail)``), so that a tail far below the spacing of doubles near 1 (a level such as
    ``1 - 1e-16`` Bonferroni-split over many intervals) stays exact instead of ``Phi^-1(1 - tail)``
    rounding to ``Phi^-1(1)``."""
    return -NormalDist().inv_cdf(tail)


def upper_t_quantile(tail: float, df: int) -> float:
    """``t`` with ``P(T > t) = tail`` for Student's ``T`` with ``df`` degrees of freedom: ``inf`` for
    ``tail <= 0`` or ``df = 0`` (no sample sd: no finite quantile), ``-t`` of ``1 - tail`` above 1/2. From
    ``P(T > t) = I_x(df/2, 1/2) / 2`` with ``x = df / (df + t^2)`` (``I``: the regularised incomplete beta
    function, by its continued fraction, in logs), solved for ``log x`` by bisection, so tails far below
    ``1e-16`` stay exact; ``inf`` where ``t`` is beyond the largest double."""
    if tail > 0.5:
        return -upper_t_quantile(1.0 - tail, df)
    if df == 0 or tail <= 0.0:
        return math.inf
    if tail == 0.5:
        return 0.0
    a, b, log_tail = 0.5 * df, 0.5, math.log(tail)
    low, high = -2000.0, 0.0  # log x: I_x(a, b) / 2 is below any tail at the one end, 1/2 at the other
    for _ in range(80):  # 2000 / 2^80: exact to rounding
        middle = 0.5 * (low + high)
        if _log_half_beta_cdf(middle, a, b) < log_tail:
            low = middle
        else:
            high = middle
    log_x = 0.5 * (low + high)
    log_t = 0.5 * (math.log(df) + math.log(-math.expm1(log_x)) - log_x)
    return math.inf if log_t > 709.0 else math.exp(log_t)


def _log_half_beta_cdf(log_x: float, a: float, b: float) -> float:
    """``log(I_x(a, b) / 2)`` for ``x = exp(log_x)`` in ``(0, 1)``: the continued fraction of Numerical
    Recipes (6.4) on whichever of ``x`` and ``1 - x`` it converges fast for."""
    x = math.exp(log_x)
    if x >= 1.0:
        return math.log(0.5)
    log_front = a * log_x + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    if x < (a + 1.0) / (a + b + 2.0):
        return log_front + math.log(_beta_fraction(a, b, x) / a) + math.log(0.5)
    complement = math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b  # I_{1-x}(b, a)
    return math.log(max(1.0 - complement, 0.0) * 0.5) if complement < 1.0 else -math.inf


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of ``I_x(a, b)`` (modified Lentz), for ``x < (a + 1) / (a + b + 2)``."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    value = d
    for m in range(1, 1000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            value *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return value


def _checked_log_values(values: Any, name: str, shape: tuple[int, ...], step: int) -> FloatArray:
    """The reward model's log-values as float64, of the expected ``shape`` and checked as the samplers check
    them (``check_log_values``: NaN or ``+inf`` refused, with the same message), the message completed with
    the first prompt and the step (``t`` for ``log Vh_t``, 0 for the prompt's own value) where one is. An
    array that is not of real numbers (strings, which ``float`` would parse, complex numbers, bools,
    objects) is refused (ValueError) rather than converted."""
    array = model_output(values, f"reward: {name}")
    if array.shape != shape:
        raise ValueError(f"reward: {name} returned shape {array.shape}, expected {shape}")
    try:
        return check_log_values(array, name)
    except ValueError as error:
        prompt = int(np.argwhere(~(array < np.inf))[0][0])  # the first NaN or +inf
        raise ValueError(f"{error}, first at prompt {prompt}, step {step}") from None


def _fail_new_prompts(
    particles: Particles, errors: dict[int, str], source: Optional[Particles] = None
) -> npt.NDArray[np.bool_]:
    """Prompts the policy failed during the rollouts (``errors`` of ``particles``, or of ``source``, its
    continuations, that ``errors`` does not hold yet): added to ``errors`` (as ``prompt b: reason``, as the
    samplers report them) and to ``particles.errors``, their particles finished (never scored again).
    Returns the ``(B,)`` mask of those prompts."""
    found = particles.errors if source is None else source.errors
    failed = np.zeros(particles.num_prompts, dtype=bool)
    for b, message in sorted(found.items()):
        if int(b) not in errors:
            errors[int(b)] = prompt_error(int(b), str(message))
            particles.errors.setdefault(b, message)
            particles.finished[b] = True
            failed[b] = True
    return failed


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
    ``samples_per_prefix`` continuations of each prefix; ``"auto"`` takes the exact one where available: a
    token policy whose step is one token (its ``token_level`` not False, as the samplers' optimal proposal
    reads it) and a reward model with a twist head. For a policy whose step is several tokens the sum over
    one next token is not the step the rollouts take: ``"exact"`` is refused (ValueError naming ``method``)
    and ``"auto"`` samples. ``confidence`` is the joint level of the intervals, which bracket the supremum
    over the *visited* prefixes (Bonferroni over every scored prefix of every step and prompt, the spread
    read per prompt, each lower end ``ROUNDING`` lower; see the module docstring: with
    ``samples_per_prefix=1`` they are ``[0, inf]``). Prefixes of value zero are skipped. As in
    [`smc`][tiltsmc.smc], rollouts still unfinished after ``max_steps`` steps raise RuntimeError.

    Checked before any rollout: ``policy`` and ``reward`` implement the protocols (TypeError), the counts
    are ints >= 1, ``confidence`` a number (TypeError) in (0, 1) with ``1 - confidence`` not rounding to 1
    (``tiltsmc.diagnostics.bellman.check_confidence``) and ``method`` one of the three
    (ValueError). During the rollouts, the reward model's log-values (``initial_log_value``, ``log_value``,
    ``next_log_values``) are checked as the samplers check them: NaN or ``+inf`` raises ValueError naming
    the first prompt and the step where it came. A prompt the policy could not start (``particles.errors``,
    e.g. too long for its context) is left out of the estimate and reported in its ``errors``, as a
    sampler's result reports it; if no prompt could start there is nothing to estimate, and ValueError
    (naming ``prompts``) says why. A prompt the policy fails during the rollouts (its ``propose`` or
    ``next_log_probs`` sets ``particles.errors``, or ``next_log_probs`` gives an unfinished particle a row
    of NaN, ``+inf`` or only ``-inf``, as the samplers read it) is reported so too and left out from that
    step on (its earlier prefixes stay in); if every prompt fails, the later steps were never observed, and
    ValueError (naming ``prompts``) says so. The policy's ``next_log_probs`` must have the shape
    ``(B, N, vocab_size)`` (ValueError naming ``policy``).
    """
    from .online import ROUNDING  # here: online imports this module

    check_models(policy, reward)
    num_prefixes = check_count(num_prefixes, "num_prefixes")
    level = check_confidence(confidence)
    samples_per_prefix = check_count(samples_per_prefix, "samples_per_prefix")
    max_steps = check_count(max_steps, "max_steps")
    if not isinstance(method, str):  # an array's `in` would ask for its truth value
        raise TypeError(f"method: expected 'auto', 'exact' or 'sampled', got {method!r}")
    if method not in ("auto", "exact", "sampled"):
        raise ValueError(f"method: expected 'auto', 'exact' or 'sampled', got {method!r}")
    # The twist head sums over one next token, so a step must be one token, as for the samplers' optimal
    # proposal (`Models.supports_optimal_proposal`): a policy whose step is several tokens (token_level
    # False) would append several while the sum covers one.
    has_twist_head = is_token_policy(policy) and is_twist_model(reward)
    token_level = bool(getattr(policy, "token_level", True))
    exact_available = has_twist_head and token_level
    if method == "exact" and not has_twist_head:
        raise ValueError("method: 'exact' needs a token policy and a reward model with a twist head")
    if method == "exact" and not exact_available:
        raise ValueError(
            "method: 'exact' sums the twist head over one next token, but a step of this policy is several "
            "tokens (its token_level is False), so the sum would not be over the steps the rollouts take; "
            "use method='sampled' (or 'auto', which falls back to it)"
        )
    exact = method == "exact" or (method == "auto" and exact_available)
    prompts = prompts_list(prompts)
    check_rows("num_prefixes", num_prefixes, prompts, f"{num_prefixes} prefixes")
    if not exact:  # every prefix's continuations at once: np.repeat crashed the interpreter on 4 x 2**62
        check_rows(
            "samples_per_prefix",
            num_prefixes * samples_per_prefix,
            prompts,
            f"{num_prefixes} prefixes x {samples_per_prefix} continuations",
        )
    generator = as_generator(rng)
    particles = policy.start(prompts, num_prefixes)
    check_started(particles, 1 if prompts is None else len(prompts), num_prefixes)
    batch = particles.num_prompts
    errors = {int(b): prompt_error(int(b), str(message)) for b, message in sorted(particles.errors.items())}
    if errors and len(errors) == batch:
        raise ValueError(
            f"prompts: the policy could not start any of the {batch} prompt(s), so there is nothing to "
            f"estimate; {next(iter(errors.values()))}"
        )
    log_v0 = _checked_log_values(reward.initial_log_value(particles), "initial_log_value", (batch,), 0)
    log_v_prev = np.repeat(log_v0[:, None], num_prefixes, 1)
    # Per step: |log rho| and the relative standard error (sd of log rho_hat) of each scored prefix; inf
    # where none is known (one continuation, sampled continuations all of value 0, or a step where every
    # continuation of each of the prompt's prefixes agreed, to within rounding): interval [0, inf].
    steps: list[tuple[FloatArray, FloatArray]] = []
    # Per step and prompt (B,): the gauge's half-range of log rho_t and its shift of log rho_t (and of log
    # G_t), -(hi_b + lo_b) / 2 (see _gauge); the largest and smallest positive log G_t observed (-inf / inf:
    # none)
    gauge: list[FloatArray] = []
    shift: list[FloatArray] = []
    g_high: list[FloatArray] = []
    g_low: list[FloatArray] = []
    average: list[float] = []  # per prompt the Vh_{t-1}-weighted mean of |rho_t - 1|, then over prompts
    zero_potential = False
    for step in range(1, max_steps + 1):
        if particles.finished.all():
            break
        scored = ~particles.finished & (log_v_prev > -np.inf)
        if exact:
            assert is_token_policy(policy) and is_twist_model(reward)
            log_p = checked_log_probs(
                model_output(policy.next_log_probs(particles), "policy: next_log_probs"), particles, policy
            )
            _fail_new_prompts(particles, errors)
            scored &= ~particles.finished  # a prompt failed here: left out from this step on
            prev_safe = np.where(scored, log_v_prev, 0.0)  # never -inf - -inf
            next_log_v = _checked_log_values(
                reward.next_log_values(particles), "next_log_values", log_p.shape, step
            )
            log_mean = logsumexp(log_p + next_log_v)
            relative_error = np.zeros_like(log_mean)  # a zero mean is exact: rho = 0, eps_t = inf
            # every next token of positive probability: its potential
            with np.errstate(over="ignore"):  # beyond the doubles: an infinite potential or 0, as it is
                observed_g = next_log_v - prev_safe[..., None]
            observed = scored[..., None] & (log_p > -np.inf)
        else:
            repeats = np.repeat(np.arange(num_prefixes), samples_per_prefix)
            continuations = particles.take(np.broadcast_to(repeats, (batch, repeats.size)).copy())
            policy.propose(continuations, generator)
            # a prompt failed in its continuations: they did not take their step (rho would read 1)
            scored &= ~_fail_new_prompts(particles, errors, continuations)[:, None]
            prev_safe = np.where(scored, log_v_prev, 0.0)  # never -inf - -inf
            log_values = _checked_log_values(
                reward.log_value(continuations), "log_value", (batch, repeats.size), step
            ).reshape(batch, num_prefixes, samples_per_prefix)
            log_mean, log_sd = _log_mean_and_sd(log_values)
            # Delta method: sd(log mean) ~ sd / (sqrt(M) mean). Unknown (inf) with one continuation per
            # prefix (no sample sd) or a sampled mean of 0 (the draws may have missed continuations of any
            # value). A prefix whose few continuations happened to agree gets no zero-width interval: its
            # relative sd is floored at its prompt's pooled one at this step (root mean square, in logs).
            known = (log_mean > -np.inf) & (samples_per_prefix > 1)
            log_relative_sd = np.where(known, log_sd - np.where(known, log_mean, 0.0), np.inf)
            # A relative spread below ROUNDING is rounding, not spread: continuations of mathematically
            # equal value (V*'s, say) differ in their last bits.
            log_relative_sd = np.where(known & (log_relative_sd < np.log(ROUNDING)), -np.inf, log_relative_sd)
            # Pooled per prompt, over that prompt's scored prefixes (each prompt is read on its own, as
            # everywhere else here): -inf where it has none, or none with any spread.
            pooled = known & scored
            count = np.maximum(np.count_nonzero(pooled, axis=1), 1)  # none: the sum is 0 (-inf) anyway
            log_sum_square = logsumexp(np.where(pooled, 2.0 * log_relative_sd, -np.inf), axis=1)
            log_pooled = 0.5 * (log_sum_square - np.log(count))[:, None]  # (B, 1)
            # A pooled sd of 0 (every continuation of every prefix of the prompt agreed) has no spread to
            # read: sampled draws cannot tell a step the policy forces from draws that happened to agree,
            # so no standard error is known for that prompt there, as with M = 1.
            known &= log_pooled > -np.inf
            relative_error = np.full_like(log_mean, np.inf)
            with np.errstate(over="ignore"):  # beyond the doubles: infinite, as they are
                relative_error[known] = np.exp(
                    np.maximum(log_relative_sd, log_pooled)[known] - 0.5 * np.log(samples_per_prefix)
                )
                observed_g = log_values - prev_safe[..., None]
            observed = np.broadcast_to(scored[..., None], observed_g.shape)
        with np.errstate(over="ignore"):  # |log rho| beyond the doubles is infinite (eps_t = inf), as it is
            log_rho = np.where(scored, log_mean - prev_safe, np.nan)
        average.append(_average_deviation(log_rho, log_v_prev, scored))
        steps.append((np.abs(log_rho[scored]), relative_error[scored]))
        half_range, moved = _gauge(log_rho, scored)
        gauge.append(half_range)
        shift.append(moved)
        live = ~particles.finished
        policy.propose(particles, generator)
        live &= ~_fail_new_prompts(particles, errors)[:, None]  # a failed prompt's particles took no step
        log_v = _checked_log_values(reward.log_value(particles), "log_value", live.shape, step)
        # the rollout's own step is one more observed transition of each scored prefix
        with np.errstate(over="ignore"):
            own_g = log_v - prev_safe
        seen = np.concatenate([observed.reshape(batch, -1), (live & scored).reshape(batch, -1)], axis=1)
        seen_g = np.concatenate([observed_g.reshape(batch, -1), own_g.reshape(batch, -1)], axis=1)
        zero_potential |= bool(np.any(seen & (seen_g == -np.inf)))
        positive = seen & (seen_g > -np.inf)
        g_high.append(np.max(np.where(positive, seen_g, -np.inf), axis=1))
        g_low.append(np.min(np.where(positive, seen_g, np.inf), axis=1))
        log_v_prev = np.where(live, log_v, log_v_prev)
    if not particles.finished.all():  # as smc: a truncated rollout would read as a shorter horizon
        raise RuntimeError(f"max_steps: trajectories still unfinished after {max_steps} steps")
    if len(errors) == batch:  # likewise: the steps after the last failure were never observed
        raise ValueError(
            f"prompts: the policy failed every one of the {batch} prompt(s) during the rollouts, so the "
            f"later steps were never observed; {next(iter(errors.values()))}"
        )
    # Simultaneous intervals: Bonferroni over every scored prefix of every step, two-sided.
    # Student's t with M - 1 degrees of freedom (the sd is estimated from M values); exact: no error.
    scored_total = max(sum(len(magnitude) for magnitude, _ in steps), 1)
    tail = (1.0 - level) / (2.0 * scored_total)
    z = upper_normal_quantile(tail) if exact else upper_t_quantile(tail, samples_per_prefix - 1)
    bounds = []  # (sup, lower end, upper end) of |log rho| per step
    for magnitude, relative in steps:
        if magnitude.size == 0:
            bounds.append((0.0, 0.0, 0.0))
            continue
        half_width = z * relative  # z > 0: inf stays inf, 0 stays 0
        unknown = np.isinf(half_width)  # interval [0, inf], whatever the point estimate (inf included)
        with np.errstate(invalid="ignore"):  # inf - inf where unknown, replaced
            # less ROUNDING: a |log rho| that rounding alone gives (V*'s, exactly 0) is no evidence
            lower = np.where(unknown, 0.0, np.maximum(magnitude - half_width - ROUNDING, 0.0))
        upper = magnitude + half_width
        bounds.append((float(magnitude.max()), float(lower.max()), float(upper.max())))
    log_sup, log_low, log_high = (
        (np.array(column, dtype=float) for column in zip(*bounds))
        if bounds
        else (np.zeros(0), np.zeros(0), np.zeros(0))
    )
    log_per_step = np.array(log_sup)
    with np.errstate(over="ignore"):  # a huge error, interval end or bound is +inf, as it should be
        per_step = np.expm1(log_per_step)
        per_step_low, per_step_high = np.expm1(np.array(log_low)), np.expm1(np.array(log_high))
        # the gauge is chosen per prompt: the step's error is its worst prompt's
        gauge_per_step = np.expm1(np.array([float(half_range.max()) for half_range in gauge]))
        # (T, B): -inf / inf where a prompt observed no positive potential, which the maxima pass over
        high, low, moved = np.array(g_high), np.array(g_low), np.array(shift)
        log_positive = float(np.max(np.maximum(high, -low), initial=0.0))
        log_gauge = float(np.max(np.maximum(high + moved, -(low + moved)), initial=0.0))
        positive_ratio_bound, gauge_ratio_bound = float(np.exp(log_positive)), float(np.exp(log_gauge))
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
        ratio_bound=np.inf if zero_potential else positive_ratio_bound,
        method="exact" if exact else "sampled",
        num_prefixes=num_prefixes,
        samples_per_prefix=0 if exact else samples_per_prefix,
        average_per_step=np.array(average, dtype=float),
        positive_ratio_bound=positive_ratio_bound,
        gauge_ratio_bound=np.inf if zero_potential else gauge_ratio_bound,
        errors=dict(sorted(errors.items())),
    )


def _log_mean_and_sd(log_values: FloatArray) -> tuple[FloatArray, FloatArray]:
    """``log mean_j v_j`` and ``log sd_j v_j`` (``ddof=1``; ``-inf`` for one sample, whose sd the caller
    reads as unknown) along the last axis of ``log v``, without leaving the log domain: both are taken on
    ``v_j / max_j v_j``, then shifted back, so values like ``exp(-1000)`` are exact. An all-zero row gives
    ``-inf`` for both."""
    count = log_values.shape[-1]
    top = np.max(log_values, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    scaled = np.exp(log_values - top)
    mean = scaled.mean(axis=-1)
    spread = scaled.std(axis=-1, ddof=1) if count > 1 else np.zeros_like(mean)
    with np.errstate(divide="ignore"):
        return np.log(mean) + top[..., 0], np.log(spread) + top[..., 0]


def _average_deviation(log_rho: FloatArray, log_v_prev: FloatArray, scored: npt.NDArray[np.bool_]) -> float:
    """``average_per_step`` at one step: per prompt ``b`` the mean of ``|rho_t - 1|`` over its scored
    prefixes ``i`` weighted by ``Vh_{t-1}``,

        A_b = sum_i Vh_{t-1}(i) |rho_t(i) - 1| / sum_i Vh_{t-1}(i),

    its weights self-normalised within the prompt (taken as ``exp(log Vh_{t-1} - max_b log Vh_{t-1})``), as
    the twisted prefix law ``p Vh_{t-1}`` is one per prompt; then the plain mean of ``A_b`` over the prompts
    with a scored prefix (0 with none). Rescaling one prompt's ``Vh`` by a constant, which changes no
    ``rho`` and no sampler's output, leaves it as it is. ``|rho - 1|`` is ``|expm1(log rho)|``; a weight
    that underflows to 0 contributes 0, even against ``rho = inf``."""
    has: npt.NDArray[np.bool_] = np.any(scored, axis=1)
    if not has.any():
        return 0.0
    top = np.max(np.where(scored, log_v_prev, -np.inf), axis=1, keepdims=True)  # finite where `has`
    weights = np.where(scored, np.exp(log_v_prev - np.where(has[:, None], top, 0.0)), 0.0)
    present = weights > 0.0
    with np.errstate(over="ignore"):  # rho = inf: an infinite deviation, as it is
        deviation = np.abs(np.expm1(np.where(present, log_rho, 0.0)))
    per_prompt = (
        np.sum(np.where(present, weights * deviation, 0.0), axis=1)[has] / np.sum(weights, axis=1)[has]
    )
    return float(per_prompt.mean())


def _gauge(log_rho: FloatArray, scored: npt.NDArray[np.bool_]) -> tuple[FloatArray, FloatArray]:
    """Per prompt ``b``, the best constant shift of its ``log rho_t`` (rescaling its level ``t`` alone, which
    changes no sampler's output: each prompt's particles are weighted among themselves) and what it leaves:
    the half-range ``(hi_b - lo_b) / 2`` of ``log rho_t`` over ``b``'s scored prefixes (largest ``hi_b``,
    smallest ``lo_b``) and the shift ``-(hi_b + lo_b) / 2``, both ``(B,)``. A prompt with no scored prefix
    has 0 and 0; one with an infinite ``log rho`` (``rho = 0``, a mean of 0, or ``|log rho|`` beyond the
    doubles) has ``inf`` and shift 0: the gauge cannot be read from infinities (``inf - inf``)."""
    finite = np.all(~scored | np.isfinite(log_rho), axis=1)
    has = scored.any(axis=1) & finite
    top = np.max(np.where(scored, log_rho, -np.inf), axis=1)
    bottom = np.min(np.where(scored, log_rho, np.inf), axis=1)
    half_range = np.where(has, 0.5 * (np.where(has, top, 0.0) - np.where(has, bottom, 0.0)), 0.0)
    shift = np.where(has, -0.5 * (np.where(has, top, 0.0) + np.where(has, bottom, 0.0)), 0.0)
    return np.where(finite, half_range, np.inf), shift
