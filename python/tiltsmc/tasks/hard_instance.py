r"""The hard instance of the paper's lower bound, as a
[`MarkovDFATask`][tiltsmc.tasks.markov_dfa.MarkovDFATask] with its twist (``docs/theory/tilted-target.md``).

The construction (``T = 3m``, branching ``B``, ratio ``a > 1``):

* the base policy is uniform over the ``B^(2m)`` prefixes of length ``2m`` (tokens ``0..B-1``), then takes
  ``m`` deterministic steps (token 0);
* one prefix ``u`` of length ``2m`` is hidden (drawn uniformly);
* the approximate reward model is ``Vh_t = 1`` for ``t <= 2m``; for ``t = 2m + k`` (``k = 1..m``) it is
  ``a^k`` after ``u`` and ``a^-k`` after any other prefix, so ``r = Vh_T = a^m`` on ``u`` and ``a^-m``
  elsewhere.

Every potential ``G_t = Vh_t / Vh_{t-1}`` is 1 for ``t <= 2m`` and ``a`` or ``1/a`` afterwards, so the paper's
ratio bound is ``L = a`` and the Bellman error is exactly ``eps = a - 1`` (at step ``2m + 1`` the expected
ratio from a prefix is ``a`` or ``1/a``; at later steps too, the continuation being deterministic). The
twist carries no information about ``u`` before ``u`` has been written out, so a sampler must hit ``u``
among its prefixes: with ``B = a`` (the paper's choice) ``u`` holds

    pi(u) = a^-2m a^m / (a^-2m a^m + (1 - a^-2m) a^-m) = 1 / (2 - a^-2m)  (about one half)

of the target's mass, any sampler within TV 1/3 of ``pi`` needs ``Omega(a^(2m)) = Omega(a^(2T/3))``
queries, and the slope of ``log(queries)`` against ``T`` is ``2 ln a / 3 = 2 ln(1 + eps) / 3``. With
``B != a`` the cost of finding ``u`` is ``B``'s (slope ``2 ln B / 3``) and ``u``'s share of the target
differs: that is not the lower bound's rate.

Automaton states: ``k = 0..2m`` is "the first ``k`` tokens match ``u``" (``2m`` absorbs: ``u`` written out)
and ``2m + 1`` is the dead state (the prefix is not ``u``).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import numpy.typing as npt

from .. import _memory
from .._rng import RNGLike, as_generator
from ..models._config import real_number
from .markov_dfa import LogTables, MarkovDFATask, _as_index
from .models import TableTwist

__all__ = ["HardInstance", "hard_instance"]

_LOG_NORMAL = -math.log(sys.float_info.min)  # exp(-x) is a normal double for x up to this (about 708.4)


@dataclass(frozen=True, eq=False)
class HardInstance:
    """The hard instance: the task, its hard twist, the hidden prefix and the figures the bound predicts.

    Attributes:
        task: the [`MarkovDFATask`][tiltsmc.tasks.markov_dfa.MarkovDFATask] (``V = branching``, ``T = 3m``,
        time-varying transitions). twist: the twist ``Vh`` of the construction (``L = a``, ``eps = a - 1``).
        hidden_prefix: ``u``, the ``(2m,)`` int64 prefix that carries the reward ``a^m``.
        a: the ratio per step of the last ``m`` steps.
        m: a third of the horizon.
        branching: ``B``, the number of tokens (``a`` in the paper's construction).
    """

    task: MarkovDFATask
    twist: TableTwist
    hidden_prefix: npt.NDArray[np.int64]
    a: float
    m: int
    branching: int

    @property
    def horizon(self) -> int:
        """``T = 3m``."""
        return 3 * self.m

    @property
    def target_mass(self) -> float:
        """``pi(prefix = u) = B^-2m a^m / (B^-2m a^m + (1 - B^-2m) a^-m)``, which is ``1 / (2 - a^-2m)``
        when ``B = a``."""
        log_hit = -2 * self.m * math.log(self.branching)
        log_u = log_hit + self.m * math.log(self.a)
        log_rest = math.log1p(-math.exp(log_hit)) - self.m * math.log(self.a)
        x = log_rest - log_u  # 1 / (1 + e^x), without overflow where B >> a makes x large
        return 1.0 / (1.0 + math.exp(x)) if x <= 0.0 else math.exp(-x) / (1.0 + math.exp(-x))

    @property
    def lower_bound_rate(self) -> float:
        """``2 ln a / 3``: the slope in ``T`` of the log of the query lower bound ``a^(2T/3)``."""
        return 2.0 * math.log(self.a) / 3.0

    @property
    def search_rate(self) -> float:
        """``2 ln B / 3``: the slope in ``T`` of the log of the number of uniform prefixes needed to hit ``u``
        (equal to [`lower_bound_rate`][tiltsmc.tasks.hard_instance.HardInstance.lower_bound_rate] when ``B =
        a``)."""
        return 2.0 * math.log(self.branching) / 3.0

    def draws_to_hit(self, probability: float) -> float:
        """Independent uniform prefixes needed to see ``u`` with at least ``probability``:
        ``log(1 - probability) / log(1 - B^-2m)`` (real-valued; about ``B^(2m) ln(1/(1 - probability))``)."""
        prob = real_number(probability, "probability")  # "0.5" is refused, not read as 0.5
        if not 0.0 < prob < 1.0:
            raise ValueError(f"probability: expected a value in (0, 1), got {probability!r}")
        log_hit = -2 * self.m * math.log(self.branching)  # log B^-2m
        if log_hit > -40.0:
            return math.log1p(-prob) / math.log1p(-math.exp(log_hit))
        # log1p(-B^-2m) = -B^-2m to double precision (relative error below 1e-17): the quotient in logs, as
        # B^-2m may be subnormal or 0 and the count beyond the doubles (then inf)
        try:
            return math.exp(math.log(-math.log1p(-prob)) - log_hit)
        except OverflowError:
            return math.inf


def _hard_tables(m: int, a: float, branching: int, task: MarkovDFATask) -> LogTables:
    shape = (branching, task.num_states)
    matched, dead = 2 * m, 2 * m + 1
    tables: LogTables = [0.0]
    for t in range(1, 3 * m + 1):
        level = np.zeros(shape)
        if t > 2 * m:
            k = t - 2 * m
            level[:] = -k * math.log(a)  # every state but "u written out" (only `dead` is reachable)
            level[:, matched] = k * math.log(a)
        tables.append(level)
    assert dead == task.num_states - 1
    return tables


def _normal_rewards(a: float, m: int) -> bool:
    """Whether ``a^m`` and ``a^-m`` are both normal doubles (finite, not subnormal)."""
    if m > (_LOG_NORMAL + 1.0) / math.log(a):  # far out (an int-float comparison cannot overflow)
        return False
    try:
        high = a**m
    except OverflowError:
        return False
    return high < math.inf and a**-m >= sys.float_info.min


def _memory_needed(m: int, branching: int) -> tuple[int, int]:
    """Bytes that building the hard instance takes at its peak (measured: within about 20% below it), as
    ``(transitions, tables)``: the ``(T, B, B)`` transitions (stacked, the task's copy and its logs, and the
    checks' temporaries: four arrays of float64) and the twist's ``T + 1`` levels of ``(B, 2m + 2)``
    log-values (built, checked and stacked: three copies), ``T = 3m``."""
    horizon = 3 * m
    return 8 * 4 * horizon * branching**2, 8 * 3 * (horizon + 1) * branching * (2 * m + 2)


def _check_memory(m: int, branching: int, name_of_branching: str) -> None:
    """ValueError where the memory that building the instance needs (``_memory_needed``) is more than this
    process has (``tiltsmc._memory.available_memory``; not checked where that cannot be read),
    naming ``m`` or the argument that sets ``B`` (``name_of_branching``), whichever makes most of it."""
    transitions, tables = _memory_needed(m, branching)
    available = _memory.available_memory()
    if available is None or transitions + tables <= available:
        return
    name = name_of_branching if transitions >= tables else "m"
    raise ValueError(
        f"{name}: the hard instance with m = {m} and branching {branching} needs about "
        f"{_approximate(transitions + tables)} bytes of memory to build, more than the {available:.2g} "
        "available (its transitions are T x B x B and its twist T + 1 levels of B x (2m + 2), T = 3m)"
    )


def _approximate(count: int) -> str:
    """``count`` in two significant digits (``1.2e+15``), or its power of ten beyond the doubles."""
    return f"{count:.2g}" if count < 10**300 else f"1e+{int(count.bit_length() * math.log10(2))}"


def hard_instance(a: Any, m: Any, rng: RNGLike = None, *, branching: Optional[int] = None) -> HardInstance:
    """The paper's hard instance with ratio ``a``, horizon ``T = 3m`` and branching ``B = a``
    (``docs/theory/tilted-target.md``).

    Args:
        a: the ratio per step after ``2m`` (``L = a``, ``eps = a - 1``); an integer ``>= 2`` unless
            ``branching`` is given, else a finite real ``> 1``.
        m: ``>= 1``; the horizon is ``3m``. The rewards ``a^m`` and ``a^-m`` must be normal doubles:
            ``m ln a <= -ln(2.2e-308)``, about 708.4 (``m <= 1022`` for ``a = 2``); beyond that ValueError.
        rng: draws the hidden prefix ``u`` (anything ``numpy.random.default_rng`` accepts).
        branching: ``B``; default ``a`` (the paper's choice). Another ``B`` decouples the cost of finding
            ``u`` (rate ``2 ln B / 3``) from the bound's rate ``2 ln a / 3``.

    Raises:
        TypeError, ValueError: an argument of the wrong kind or value (the message names it). Building the
            instance takes about ``8 (12 m B^2 + 6 (3m + 1) B (m + 1))`` bytes (the transitions and the
            twist's tables); where that is more than the memory available, ValueError names ``m`` or the
            argument that sets ``B`` (``branching``, else ``a``), before ``rng`` is drawn from.
    """
    m_int = _as_index(m, "m")
    if m_int < 1:
        raise ValueError(f"m: expected m >= 1, got {m_int}")
    if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, float, np.integer, np.floating)):
        raise TypeError(f"a: expected a real number, got {type(a).__name__}")
    try:
        a_f = float(a)
    except OverflowError:
        raise ValueError("a: expected a finite ratio > 1, got an int beyond the range of doubles") from None
    if not (math.isfinite(a_f) and a_f > 1.0):
        raise ValueError(f"a: expected a finite ratio > 1, got {a!r}")
    # The rewards a^m and a^-m are the task's (natural-scale) accept_reward: both must be normal doubles
    # (no overflow to inf, no underflow to a subnormal or 0 that would change the task and its L).
    if not _normal_rewards(a_f, 1):
        raise ValueError(
            f"a: the rewards a^m and a^-m must be normal doubles: expected ln(a) <= {_LOG_NORMAL:.2f}, "
            f"got a = {a!r}"
        )
    if not _normal_rewards(a_f, m_int):
        largest = math.floor(_LOG_NORMAL / math.log(a_f))
        while not _normal_rewards(a_f, largest):
            largest -= 1
        while _normal_rewards(a_f, largest + 1):
            largest += 1
        raise ValueError(
            f"m: the rewards a^m and a^-m must be normal doubles: expected m * ln(a) <= {_LOG_NORMAL:.2f}, "
            f"i.e. m <= {largest} for a = {a_f:g}, got m = {m_int}"
        )
    if branching is None:
        if a_f != round(a_f):
            raise ValueError(f"a: the branching B = a must be an integer (got a = {a!r}); pass branching=")
        branching_int = round(a_f)
    else:
        branching_int = _as_index(branching, "branching")
        if branching_int < 2:
            raise ValueError(f"branching: expected B >= 2, got {branching_int}")
    _check_memory(m_int, branching_int, "a" if branching is None else "branching")
    B, T = branching_int, 3 * m_int
    u = as_generator(rng).integers(0, B, size=2 * m_int).astype(np.int64)
    matched, dead = 2 * m_int, 2 * m_int + 1
    dfa = np.full((2 * m_int + 2, B), dead, dtype=np.int64)
    dfa[np.arange(2 * m_int), u] = np.arange(1, 2 * m_int + 1)
    dfa[matched, :] = matched
    reward = np.full(2 * m_int + 2, a_f**-m_int)
    reward[matched] = a_f**m_int
    uniform = np.full((B, B), 1.0 / B)
    forced = np.zeros((B, B))
    forced[:, 0] = 1.0
    # trans[i - 1] is the law of x_i (0-indexed): uniform for i < 2m, token 0 afterwards; trans[T-1] unused
    trans = np.stack([uniform if i < 2 * m_int or i == T else forced for i in range(1, T + 1)])
    task = MarkovDFATask(np.full(B, 1.0 / B), trans, dfa, 0, reward, T)
    u.setflags(write=False)
    return HardInstance(
        task=task,
        twist=TableTwist(task, _hard_tables(m_int, a_f, B, task)),
        hidden_prefix=u,
        a=a_f,
        m=m_int,
        branching=B,
    )
