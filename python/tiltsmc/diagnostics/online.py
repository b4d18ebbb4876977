r"""An online reading of the reward model's Bellman error from the log Z increments of any run.

At step ``t`` SMC multiplies its estimate of ``Z`` by ``sum_i W_{t-1,i} G_{t,i}`` (``W``: the normalised
weights before the step, ``G_t = Vh_t / Vh_{t-1}``). Given the particles before the step its expectation is

    m_t = sum_i W_{t-1,i} rho_t(prefix_i),     rho_t(s) = E_{s_t ~ p}[Vh_t(s, s_t)] / Vh_{t-1}(s),

a convex combination of the very ratios that the Bellman error bounds: if ``1/(1+eps) <= rho_t <= 1+eps`` on
every reachable prefix, then ``|log m_t| <= log(1+eps)``. The increment ``l_t = log sum_i W_{t-1,i} G_{t,i}``
estimates ``log m_t`` with standard error ``se_t`` (``tiltsmc.samplers.runs.increment_standard_error``;
0 where the increment is exact given the prefixes: the optimal proposal, exact SP-gSMC). So

    eps >= exp(|l_t| - z se_t - 10^-9) - 1

for every step, at a joint confidence ``confidence`` with ``z`` Bonferroni-corrected over the readings and
two-sided (a step's statement fails where ``l_t`` strays from ``log m_t`` by more than ``z se_t`` either way):
a *lower* bound on the reward model's ``eps`` (in its own gauge: a model rescaled per level reads
differently) along the paths the run actually took, free with every run (``10^-9``, ``ROUNDING``: what
rounding alone gives). It cannot show that ``eps`` is small: ratios above and below 1 at one step average
out in ``m_t``, and so do the finished particles of a run whose trajectories end at different steps (their
potential is 1: the bound stays valid, only weaker). SP-gSMC with a pool reads ``rho_t`` of the single kept
prefix from its ``K`` candidates; the MH correction reports the mean of its proposals' increments with the
root mean square of their standard errors, not the mean's own (smaller by the square root of the number of
proposals): each increment, the log of a mean, is biased low by about ``se^2 / 2``, a bias that averaging
over proposals does not shrink, so a margin that shrank with them read an exact twist as in error (5 of 10
runs of 1000 proposals of 16 candidates). Best-of-N and rejection take no guided steps and give no reading.

A step whose every potential was 0 (increment ``-inf``) gives no reading here; it is a collapse, reported
by ``SamplerResult.collapse_warnings``.

How far to trust the confidence level. ``z se_t`` is a large-sample (normal, delta-method) margin, and no
finite-sample margin computed from ``(l_t, se_t)`` alone can be valid: the potentials are non-negative and
unbounded, and for the mean of such a variable no confidence interval with an upper end exists at any sample
size (Bahadur and Savage, 1956); an increment below 0 is exactly a claim that the mean is small. Two things
make small runs read too high:

* the standard error is estimated from the particles' own draws (one per particle). A continuation that is
  rare under ``p`` but of large potential is usually missing from a small pool or particle set; then the
  increment is too low *and* its standard error too small. Where every particle drew the same potential
  (e.g. all wrote the same line) the standard error is 0 and the reading is taken at face value, as the
  samplers report 0 both for that and for an increment that is exact (the optimal proposal, exact
  SP-gSMC), and the two cannot be told apart here;
* SP-gSMC with a pool reads each ``rho_t`` from the ``K`` candidates of a single prefix, where SMC averages
  ``N`` particles spread over many prefixes.

Measured by ``bench/exp_online_coverage.py`` (``bench/results/exp_online_coverage.json``) on
``MarkovDFATask.random(3, 3, 5)`` tasks with ``twist(0.5)`` (200 tasks x 10 runs of 4 prompts,
``confidence=0.95``; 95% intervals by resampling the tasks, since a task's 10 runs share it: design effects
of 1.0 - 5.3), the share of runs whose ``eps_low`` exceeds the twist's exact ``eps``: SP-gSMC with a pool of
4: 39.6% [35.6, 43.8]; 8: 17.3% [14.2, 20.6] (in 173 of those 346 runs the offending reading had
``se = 0``); 32: 3.9% [2.2, 5.8]; 64: 1.6% [0.9, 2.4]; 256: 0.4% [0.1, 0.7]. SMC (multinomial resampling
at every step) with 8 particles: 6.6% [4.5, 8.9]; 32: 0.9% [0.2, 2.1]; 64: 0.4% [0.1, 0.9]. The false
readings gather on some tasks (SMC with 8 particles: 9 of the 200 tasks gave one in at least half their
runs). These twists leave slack: ``eps`` is a supremum over prefixes, larger than most ``|log m_t|``. With
none, the exact twist ``V*`` (``eps = 0``, so any ``eps_low > 0`` is false), runs of 256 read too high in
7.3% [6.1, 8.6] (SMC) and 10.9% [8.8, 13.1] (SP-gSMC, a pool of 256): these tasks' zero rewards make the
potentials heavy-tailed. Read ``eps_low`` as a lower bound at roughly the stated level for runs of a few
dozen particles (or candidates) or more on a reward model that is not exact; from a pool of 8 it is a point
reading with a rough margin.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import numpy.typing as npt

from ..models._config import real_number
from ..samplers.result import SamplerResult, plain
from .bellman import check_confidence, upper_normal_quantile

__all__ = ["OnlineBellman", "OnlineBellmanWarning", "online_bellman"]

FloatArray = npt.NDArray[np.float64]
ROLLOUT_SAMPLERS = frozenset({"best_of_n", "rejection"})  # no guided steps: no increments to read
# |l_t| within this of 0 is rounding, not a reading: an increment is a difference of log-values, and
# float64 log-values of magnitude up to about 10^6 carry errors below 10^-10 (an exact twist read 8.9e-16
# where every candidate's potential was the same, se = 0, and warned at eps = 0).
ROUNDING = 1e-9


class OnlineBellmanWarning(UserWarning):
    """A run's log Z increments put the reward model's Bellman error above the ``eps`` a user gave."""


@dataclass(frozen=True)
class OnlineBellman:
    """The Bellman-error reading of one or more runs (prompts stacked), from their log Z increments.

    Attributes:
        sampler: the sampler that produced the increments (``"+"``-joined when combined from several).
        increments: ``(B, steps)`` ``l_t = log sum_i W_{t-1,i} G_{t,i}``; 0 after a prompt finished.
        standard_errors: ``(B, steps)`` Monte Carlo standard errors of ``l_t`` (``inf`` where ``l_t = -inf``).
        confidence: joint level of the lower bounds, checked as
            ``tiltsmc.diagnostics.bellman.check_confidence`` checks it (in ``(0, 1)``,
            ``1 - confidence`` not rounding to 1), so that every bound has a finite quantile.

    Checked at construction (``check_reading``), each error naming the field: ``sampler`` a str
    (TypeError), ``increments`` and ``standard_errors`` arrays of real numbers (TypeError otherwise: not
    bools or strings), ``(B, steps)`` (ValueError for another shape or a ragged sequence) and of one shape,
    the increments finite or ``-inf`` and the standard errors ``>= 0`` or ``inf`` (ValueError: a NaN or
    ``+inf`` increment, or a negative or NaN standard error, would give a bound computed from nonsense). The
    reading holds float64 copies of the two arrays.
    """

    sampler: str
    increments: FloatArray
    standard_errors: FloatArray
    confidence: float = 0.95

    def __post_init__(self) -> None:
        object.__setattr__(self, "confidence", check_confidence(self.confidence))  # a plain float
        if not isinstance(self.sampler, str):
            raise TypeError(f"sampler: expected the sampler's name (a str), got {self.sampler!r:.60}")
        increments, errors = check_reading(self.increments, self.standard_errors)
        object.__setattr__(self, "increments", increments)  # frozen: the checked copies
        object.__setattr__(self, "standard_errors", errors)

    @classmethod
    def combine(cls, readings: Iterable[OnlineBellman]) -> OnlineBellman:
        """The readings of several batches (any iterable of ``OnlineBellman``; TypeError naming
        ``readings[i]`` for anything else) as one (prompts stacked, shorter runs padded with exact 0s); the
        lower bounds are then simultaneous over all of them."""
        if isinstance(readings, (str, bytes)) or not isinstance(readings, Iterable):
            raise TypeError(
                f"readings: expected a sequence of OnlineBellman readings, got {type(readings).__name__}"
            )
        readings = list(readings)
        for i, reading in enumerate(readings):
            if not isinstance(reading, OnlineBellman):
                raise TypeError(f"readings[{i}]: expected an OnlineBellman, got {type(reading).__name__}")
        if not readings:
            raise ValueError("readings: expected at least one reading")
        steps = max(r.increments.shape[1] for r in readings)

        def padded(array: FloatArray) -> FloatArray:
            return np.pad(array, ((0, 0), (0, steps - array.shape[1])))

        samplers = list(dict.fromkeys(r.sampler for r in readings))
        return cls(
            sampler="+".join(samplers),
            increments=np.concatenate([padded(r.increments) for r in readings]),
            standard_errors=np.concatenate([padded(r.standard_errors) for r in readings]),
            confidence=min(r.confidence for r in readings),
        )

    @property
    def readable(self) -> npt.NDArray[np.bool_]:
        """``(B, steps)``: the steps with a finite increment (a reading)."""
        return np.asarray(np.isfinite(self.increments), dtype=bool)

    @property
    def z(self) -> float:
        """Normal quantile of the bounds, Bonferroni over every readable step: two-sided, since a step's
        bound ``|log m_t| >= |l_t| - z se_t`` fails where ``l_t`` strays from ``log m_t`` by more than
        ``z se_t`` either way (both ways are such a failure where ``m_t = 1``, an exact twist's)."""
        count = max(int(np.count_nonzero(self.readable & (self.standard_errors > 0))), 1)
        return upper_normal_quantile((1.0 - self.confidence) / (2 * count))

    @property
    def per_step(self) -> FloatArray:
        """``(B, steps)`` point readings ``exp(|l_t|) - 1`` (``inf`` where ``l_t = -inf``)."""
        with np.errstate(over="ignore"):
            return np.asarray(np.expm1(np.abs(self.increments)), dtype=np.float64)

    @property
    def per_step_low(self) -> FloatArray:
        """``(B, steps)`` lower bounds ``exp(max(|l_t| - z se_t - ROUNDING, 0)) - 1`` on ``eps`` (0 where
        unreadable; ``ROUNDING = 1e-9`` leaves out what rounding alone gives)."""
        readable = self.readable
        margin = np.zeros_like(self.increments)
        errors = np.where(readable, self.standard_errors, 0.0)
        margin[readable] = np.maximum(
            np.abs(self.increments[readable]) - self.z * errors[readable] - ROUNDING, 0.0
        )
        with np.errstate(over="ignore"):
            return np.asarray(np.expm1(margin), dtype=np.float64)

    @property
    def eps_low(self) -> float:
        """The largest lower bound: ``eps`` is at least this, at the joint ``confidence``."""
        low = self.per_step_low
        return float(low.max()) if low.size else 0.0

    @property
    def eps_point(self) -> float:
        """The largest point reading over readable steps (biased upwards by noise; not a bound)."""
        point = np.where(self.readable, self.per_step, 0.0)
        return float(point.max()) if point.size else 0.0

    def where(self) -> Optional[tuple[int, int]]:
        """``(prompt, step)`` of [`eps_low`][tiltsmc.diagnostics.online.OnlineBellman.eps_low] (``step``
        1-based), or None with no positive lower bound."""
        low = self.per_step_low
        if not low.size or low.max() <= 0.0:
            return None
        b, t = np.unravel_index(int(np.argmax(low)), low.shape)
        return int(b), int(t) + 1

    def exceeds(self, eps: float) -> bool:
        """Whether the reading shows the Bellman error above ``eps`` (its lower bound is larger)."""
        return self.eps_low > check_eps(eps)

    def warnings(self, eps: Optional[float]) -> list[str]:
        """One message per prompt whose lower bound exceeds ``eps`` (none when ``eps`` is None)."""
        if eps is None:
            return []
        eps = check_eps(eps)
        low = self.per_step_low
        out = []
        for b in np.flatnonzero(low.max(axis=1) > eps) if low.size else []:
            t = int(np.argmax(low[b]))
            out.append(
                f"prompt {b}: the log Z increments put the reward model's Bellman error above eps = {eps:g}: "
                f"eps >= {low[b, t]:.4g} at step {t + 1} (increment {self.increments[b, t]:+.4g} "
                f"+- {self.standard_errors[b, t]:.2g}; {self.confidence:.0%} joint lower bound)"
            )
        return out

    def summary(self, eps: Optional[float] = None) -> str:
        """One line for a run's summary: the lower bound with where it was read, the point reading, and
        whether it exceeds ``eps``."""
        steps = self.increments.shape[1]
        if steps == 0 and set(self.sampler.split("+")) <= ROLLOUT_SAMPLERS:
            return f"Bellman error: no online reading ({self.sampler} takes no guided steps)"
        if not self.readable.any():  # every increment -inf (every potential 0), or no step at all
            return (
                "Bellman error: no online reading (every prompt collapsed or failed: no step has a finite "
                "log Z increment; see the result's collapsed and errors)"
            )
        where = self.where()
        at = f" (prompt {where[0]}, step {where[1]})" if where is not None else ""
        line = (
            f"Bellman error along the sampled paths: eps >= {self.eps_low:.4g}{at} "
            f"at {self.confidence:.0%} joint confidence; largest point reading {self.eps_point:.4g} "
            f"[{self.increments.shape[0]} prompt(s) x {steps} step(s), {self.sampler}]"
        )
        if eps is not None:
            verdict = "EXCEEDS" if self.exceeds(eps) else "within"
            line += f"; {verdict} eps = {check_eps(eps):g}"
        return line

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types only, strict JSON (``json.dumps(..., allow_nan=False)`` works), as
        [`SamplerResult.to_dict`][tiltsmc.samplers.result.SamplerResult.to_dict] writes the same arrays: a
        number that is not finite is None (``null``), standing for ``-inf`` in ``increments`` (every
        potential 0: no reading) and for ``+inf`` in ``standard_errors`` (no reading), ``per_step_low``,
        ``eps_low`` and ``eps_point`` (a bound or reading too large for a double)."""
        return {
            "sampler": self.sampler,
            "confidence": self.confidence,
            "eps_low": plain(self.eps_low),
            "eps_point": plain(self.eps_point),
            "increments": plain(self.increments),
            "standard_errors": plain(self.standard_errors),
            "per_step_low": plain(self.per_step_low),
        }


def check_eps(eps: Any) -> float:
    """``eps`` as a float ``>= 0``: a number (``real_number``: not a bool or a string; an int beyond the
    doubles reads as infinite), TypeError otherwise; ValueError for a negative one or NaN. ``-0.0`` reads
    as ``0.0``. The range of the ``eps`` that ``online_bellman`` and the readings' ``warnings``,
    ``exceeds`` and ``summary`` take, and of ``tiltsmc run --eps``: 0 assumes an exact twist (``V*``, any
    ``eps_low > 0`` warns), ``inf`` never warns."""
    try:
        value = real_number(eps, "eps")
    except TypeError:
        raise TypeError(f"eps: expected a number >= 0, got {eps!r:.60}") from None
    if not value >= 0.0:
        raise ValueError(f"eps: expected a number >= 0, got {eps!r:.60}")
    return value + 0.0  # -0.0 + 0.0 is 0.0


def check_reading(
    increments: Any, standard_errors: Any, fields: tuple[str, str] = ("increments", "standard_errors")
) -> tuple[FloatArray, FloatArray]:
    """Float64 copies of a reading's log Z ``increments`` and their ``standard_errors``, checked: arrays of
    real numbers (TypeError otherwise: bools, strings, objects), ``increments`` ``(B, steps)`` and
    ``standard_errors`` of its shape, every increment finite or ``-inf`` (no reading) and every standard
    error ``>= 0`` or ``inf`` (unknown) (ValueError otherwise, saying where: ``(prompt b, step t)``, ``t``
    1-based; a ragged sequence, rows of different lengths, is no ``(B, steps)`` array either). ``fields``
    names the two in the messages (``online_bellman`` names the result's fields)."""
    arrays = []
    for name, value in zip(fields, (increments, standard_errors)):
        try:
            array = np.asarray(value)
        except ValueError:  # numpy's "setting an array element with a sequence"
            raise ValueError(
                f"{name}: expected a (B, steps) array, got a ragged sequence (rows of different lengths)"
            ) from None
        if array.dtype.kind not in "iuf":
            raise TypeError(f"{name}: expected an array of real numbers, got dtype {array.dtype}")
        arrays.append(np.array(array, dtype=np.float64))
    values, errors = arrays
    if values.ndim != 2:
        raise ValueError(f"{fields[0]}: expected a (B, steps) array, got shape {values.shape}")
    if errors.shape != values.shape:
        raise ValueError(
            f"{fields[1]}: expected a (B, steps) array of the shape of {fields[0].split(': ')[-1]}, got "
            f"{errors.shape} and {values.shape}"
        )
    bad = np.isnan(values) | (values == np.inf)
    if bad.any():
        b, t = np.argwhere(bad)[0]
        what = "NaN" if np.isnan(values[b, t]) else "+inf"
        raise ValueError(
            f"{fields[0]}: expected log Z increments that are finite or -inf, got {what} at (prompt {b}, "
            f"step {t + 1})"
        )
    bad = ~(errors >= 0.0)  # NaN too
    if bad.any():
        b, t = np.argwhere(bad)[0]
        raise ValueError(
            f"{fields[1]}: expected standard errors >= 0 (inf where unknown), got {float(errors[b, t])!r} at "
            f"(prompt {b}, step {t + 1})"
        )
    return values, errors


def online_bellman(
    result: SamplerResult, eps: Optional[float] = None, *, confidence: float = 0.95
) -> OnlineBellman:
    """The online Bellman-error reading of a sampler's result (see the module docstring).

    ``eps``: the Bellman error the user assumes of the reward model; an
    [`OnlineBellmanWarning`][tiltsmc.diagnostics.online.OnlineBellmanWarning] is issued when the reading's
    lower bound exceeds it. ``confidence``: joint level of the lower bounds (Bonferroni over every readable
    step of every prompt): a number (TypeError otherwise) in (0, 1), not so close to 0 that
    ``1 - confidence`` rounds to 1 (ValueError otherwise). ``result``: a
    [`SamplerResult`][tiltsmc.SamplerResult] (TypeError otherwise), whose ``log_z_increments`` and
    ``log_z_increment_se`` are checked as [`OnlineBellman`][tiltsmc.diagnostics.online.OnlineBellman]
    checks its arrays (the message names the field: ``result: log_z_increments: ...``). Everything is
    checked before the reading is made.
    """
    if not isinstance(result, SamplerResult):
        raise TypeError(f"result: expected a SamplerResult, got {type(result).__name__}")
    level = check_confidence(confidence)
    if eps is not None:
        check_eps(eps)
    errors = result.log_z_increment_se
    if errors is None:  # a result built without them: no Monte Carlo error known
        errors = np.full(np.shape(result.log_z_increments), np.inf)
    # checked here to name the result's fields (OnlineBellman would name its own)
    increments, errors = check_reading(
        result.log_z_increments, errors, ("result: log_z_increments", "result: log_z_increment_se")
    )
    reading = OnlineBellman(
        sampler=result.sampler, increments=increments, standard_errors=errors, confidence=level
    )
    if eps is not None:
        for message in reading.warnings(eps):
            warnings.warn(message, OnlineBellmanWarning, stacklevel=2)
    return reading
