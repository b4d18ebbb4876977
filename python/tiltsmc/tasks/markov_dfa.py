r"""Exact test-bed task: a Markov base policy with a reward computed by a finite automaton (DFA).

The model
---------
Tokens are ``0..V-1``; a trajectory is ``x = (x_0, ..., x_{T-1})`` (0-indexed positions). The base policy is
a (possibly time-varying) Markov chain:

    p(x) = init[x_0] * prod_{i=1}^{T-1} P_i[x_{i-1}, x_i],   P_i = trans      (homogeneous, (V, V))
                                                             P_i = trans[i-1] (time-varying, (T, V, V))

so ``trans[T-1]`` of a time-varying chain is never used (it is validated like the other rows, nothing more).
A deterministic automaton with states ``0..Q-1``, transition table ``dfa[q, v]`` and start state ``start``
reads the tokens: ``q_0 = start`` and ``q_{t} = dfa[q_{t-1}, x_{t-1}]`` is its state after a prefix of
length ``t``.
The reward is a function of the final state, ``r(x) = accept_reward[q_T] >= 0``.

Target and optimal twist (``docs/theory/tilted-target.md``): ``pi(x) = p(x) r(x) / Z`` with
``Z = E_p[r]``, and ``V*_t(x_{0:t}) = E_p[r | x_{0:t}]`` for a prefix ``x_{0:t} = (x_0, ..., x_{t-1})``
of length ``t``. Because the chain is Markov and the automaton deterministic, the future of a prefix depends
only on the triple ``(t, v, q) = (length, last token, automaton state)``, so ``V*_t`` is a ``(V, Q)`` table
and satisfies the Bellman recursion, solved backwards in the log domain:

    V*_T(v, q)   = accept_reward[q]
    V*_t(v, q)   = sum_w P_t[v, w] V*_{t+1}(w, dfa[q, w])             (1 <= t <= T-1)
    V*_0 = Z     = sum_w init[w]  V*_1(w, dfa[start, w])

Forward, ``alpha_t(v, q) = P_p(x_{t-1} = v, q_t = q)`` is the law of the summary of a prefix of length ``t``;
``(t, v, q)`` is *reachable* when ``alpha_t(v, q) > 0``. The exact marginals of the target are
``pi(x_i = v) = sum_q alpha_{i+1}(v, q) V*_{i+1}(v, q) / Z``.

Everything is stored as natural logarithms; ``-inf`` is a zero. Sums are stable log-sum-exps, so ``Z`` far
below the smallest double (e.g. a needle of length 2000) is still exact to rounding.

Approximate twists and their Bellman error
------------------------------------------
A *twist table* ``Vh`` has the layout of
[`MarkovDFATask.log_v_star`][tiltsmc.tasks.markov_dfa.MarkovDFATask.log_v_star]: ``tables[0]`` is ``log Vh_0``
(a float) and ``tables[t]`` (``t = 1..T``) is a ``(V, Q)`` array of ``log Vh_t(v, q)``. The Bellman error
(``docs/theory/tilted-target.md``) is evaluated exactly by
[`MarkovDFATask.bellman_error`][tiltsmc.tasks.markov_dfa.MarkovDFATask.bellman_error] (see
[`BellmanError`][tiltsmc.tasks.markov_dfa.BellmanError]).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import numpy.typing as npt

from .. import _memory
from .._numeric import logsumexp
from .._rng import RNGLike, as_generator

if TYPE_CHECKING:
    from .models import MarkovPolicy, TableTwist

__all__ = ["BellmanError", "MarkovDFATask"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
LogTables = list[Union[float, FloatArray]]
"""``[log Vh_0 (float), log Vh_1 (V, Q), ..., log Vh_T (V, Q)]``."""

_PROB_TOL = 1e-9
_MAX_ENUMERATE = 2**20
_CHUNK_ELEMENTS = 1 << 21  # bound on the temporaries of the chunked log-sum-exps
_MAX_NOISE = 1e300  # twist_tables: larger perturbations overflow the arithmetic of the log-values


# ----------------------------------------------------------------------------------------------------------
# helpers


def _as_index(value: Any, name: str) -> int:
    """An integer argument (Python or NumPy integer, not a bool)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected an integer, got a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__}") from None


def _as_bool(value: Any, name: str) -> bool:
    """A flag: a bool (Python or NumPy), not a string or a number read as one."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r:.40}")
    return bool(value)


def _as_real_array(value: Any, name: str) -> FloatArray:
    """A float64 copy of an array of real numbers (integers or floats; not bool, complex or objects)."""
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as error:  # ragged nested sequences
        raise TypeError(f"{name}: expected an array of real numbers ({error})") from None
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"{name}: expected an array of real numbers, got dtype {arr.dtype}")
    return np.array(arr, dtype=np.float64, copy=True)


def _as_real(value: Any, name: str) -> float:
    """A real scalar (not a bool)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a real number, got a bool")
    arr = _as_real_array(value, name)
    if arr.size != 1:
        raise ValueError(f"{name}: expected a scalar, got shape {arr.shape}")
    return float(arr.reshape(()))


def _table_bytes(V: int, Q: int, T: int) -> int:
    """Bytes the exact tables of a task take at the least: ``T + 1`` levels of ``V x Q`` float64 (``log V*``,
    ``log alpha``), each in a slot of a list."""
    return 8 * (T + 1) * (V * Q + 1)


def _check_task_fits(
    V: int, Q: int, T: int, trans_size: int, tables: bool, arguments: dict[str, int]
) -> None:
    """Refuse (ValueError, ``tiltsmc._memory.check_fits``) to build a task whose own arrays cannot possibly be
    allocated: its transitions (``trans_size`` values) and their logs (float64), its ``Q x V`` automaton
    (int64), and with ``tables`` its exact tables (``_table_bytes``: ``exact_log_z``). The message names the
    largest of ``arguments`` (the constructor's size arguments, by name)."""
    needed = 8 * (2 * trans_size + Q * V) + (_table_bytes(V, Q, T) if tables else 0)
    name = max(arguments, key=lambda argument: arguments[argument])
    _memory.check_fits(name, needed, f"the arrays of a task with V = {V}, Q = {Q} and T = {T}")


def _check_probabilities(arr: FloatArray, name: str) -> None:
    """Entries finite and >= 0, every vector along the last axis summing to 1 within ``_PROB_TOL``."""
    if np.isnan(arr).any():
        raise ValueError(f"{name}: probabilities contain NaN")
    if np.isinf(arr).any():
        raise ValueError(f"{name}: probabilities contain infinite values")
    if (arr < 0).any():
        where = tuple(int(i) for i in np.argwhere(arr < 0)[0])
        raise ValueError(f"{name}: negative probability {arr[where]!r} at index {where}")
    sums = arr.sum(axis=-1)
    bad = np.abs(sums - 1.0) > _PROB_TOL
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0]) if sums.ndim else ()
        what = f"row {where if len(where) > 1 else where[0]}" if where else "the vector"
        raise ValueError(
            f"{name}: probabilities must sum to 1 (within {_PROB_TOL:g}); {what} sums to {sums[where]!r}"
        )


def _log(arr: FloatArray) -> FloatArray:
    """``log`` with ``log 0 = -inf`` and no warning."""
    with np.errstate(divide="ignore"):
        return np.log(arr)


def _readonly(arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
    arr.setflags(write=False)
    return arr


def _exp(x: float) -> float:
    """``exp(x)``, ``inf`` where it overflows (``math.exp`` raises OverflowError there)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _potential_range(log_g: FloatArray) -> tuple[float, float, bool]:
    """``(max, min)`` of the *positive* potentials (``log G > -inf``) and whether some potential is 0.

    The zeros are kept apart: a zero must make ``L`` infinite without hiding the smallest positive
    potential (which ``positive_ratio_bound`` and ``gauge_ratio_bound`` are made of). ``(-inf, inf)``
    when no potential is positive, so that ``max >= min`` says some is.
    """
    positive = log_g[log_g > -np.inf]
    zero = bool(positive.size < log_g.size)
    if not positive.size:
        return -math.inf, math.inf, zero
    return float(positive.max()), float(positive.min()), zero


# ----------------------------------------------------------------------------------------------------------
# Bellman error report


@dataclass(frozen=True, eq=False)
class BellmanError:
    r"""Exact Bellman error of a twist ``Vh`` on a [`MarkovDFATask`][tiltsmc.tasks.markov_dfa.MarkovDFATask]
    (``docs/theory/tilted-target.md``).

    For a step ``t = 1..T`` and a prefix ``s`` of length ``t-1`` that is *reachable* (``p(s) > 0``) and has
    ``Vh_{t-1}(s) > 0``, let ``rho_t(s) = E_{x_{t-1} ~ p(.|s)}[Vh_t(s, x_{t-1})] / Vh_{t-1}(s)`` (for
    ``t = 1`` the only prefix is the empty one, with ``Vh_0 = exp(tables[0])``). Prefixes with
    ``Vh_{t-1} = 0`` are not constrained (a particle there already has weight zero). Over the set ``S_t`` of
    those prefixes:

    Attributes:
        eps: ``max_t eps_t``.
        per_step: ``eps_t = exp(log_per_step[t-1]) - 1``, the smallest ``eps >= 0`` with
            ``1/(1+eps) <= rho_t(s) <= 1+eps`` on ``S_t``; ``0`` when ``S_t`` is empty and ``inf`` when some
            ``rho_t(s) = 0``. Shape ``(T,)``.
        log_per_step: ``sup_{s in S_t} |log rho_t(s)|``, shape ``(T,)``.
        gauge_eps: ``max_t gauge_per_step``.
        gauge_per_step: the smallest ``eps_t`` over rescalings ``Vh_t -> c_t Vh_t`` by positive constants
            (``c_T = 1``). A rescaling shifts every ``log rho_t`` by ``log c_t - log c_{t-1}``, and these
            shifts are free for each ``t``, so the minimum is ``exp((hi_t - lo_t) / 2) - 1`` with ``hi_t`` and
            ``lo_t`` the max and min of ``log rho_t`` over ``S_t``. No sampler's output depends on the gauge;
            this is the figure that predicts sampler behaviour. Shape ``(T,)``.
        ratio_bound: the paper's ``L`` (its Assumption 3.1: ``1/L <= G_t <= L`` on every reachable path), in
            the model's own gauge: the smallest ``L >= 1`` with ``1/L <= G_t(s, w) <= L`` for every reachable
            transition (``s in S_t``, ``p(w|s) > 0``) of the potential ``G_t = Vh_t(s, w) / Vh_{t-1}(s)``.
            ``inf`` as soon as one of these potentials is 0 (a 0/1 verifier, or a twist that rules a
            reachable continuation out); ``1.0`` when there are none. Prefixes with ``Vh_{t-1} = 0`` carry
            no potential (as for ``eps``): they are reached only through a zero potential, which already
            makes ``L`` infinite, or from ``Vh_0 = 0``, where nothing is constrained.
        positive_ratio_bound: the same maximum of ``max(G, 1/G)`` over the *positive* potentials only
            (``1.0`` when none): finite where ``L`` is infinite, it bounds the spread of the weights of
            the particles that survive; it is not the paper's ``L``.
        gauge_ratio_bound: ``L`` in the gauge that minimises ``eps``: each ``log G_t`` shifted by
            ``-(hi_t + lo_t) / 2`` (the rescaling behind ``gauge_per_step``), so that ``(gauge_ratio_bound,
            gauge_eps)`` describe one and the same rescaled twist and can be put together into a bound such
            as Theorem 5.1's ``L^6 T (1+eps)^(6(T-1)) / (2N)``. ``inf`` where ``L`` is.
    """

    eps: float
    per_step: FloatArray
    log_per_step: FloatArray
    gauge_eps: float
    gauge_per_step: FloatArray
    ratio_bound: float
    positive_ratio_bound: float
    gauge_ratio_bound: float


# ----------------------------------------------------------------------------------------------------------
# the task


class MarkovDFATask:
    r"""Markov base policy over ``V`` tokens, reward ``accept_reward[final DFA state]``; exact by DP.

    Args:
        init: ``(V,)`` law of ``x_0`` (non-negative, summing to 1 within ``1e-9``).
        trans: ``(V, V)`` transition matrix (rows sum to 1), used for every position; or ``(T, V, V)``, where
            the law of ``x_i`` given ``x_{i-1}`` is ``trans[i-1]`` (``i = 1..T-1``; ``trans[T-1]`` is unused).
        dfa: ``(Q, V)`` integer table of automaton transitions, entries in ``[0, Q)``.
        start: start state of the automaton, in ``[0, Q)``.
        accept_reward: ``(Q,)`` finite non-negative rewards; ``r(x) = accept_reward[q_T]``. A reward that is
            zero on every reachable final state is allowed (then ``Z = 0``,
            [`exact_log_z`][tiltsmc.tasks.markov_dfa.MarkovDFATask.exact_log_z] is ``-inf``).
        horizon: ``T >= 1``, the number of tokens.

    Raises:
        TypeError: an argument of the wrong kind (a non-numeric array; a non-integer ``dfa``, ``start`` or
            ``horizon``).
        ValueError: a bad shape or value; the message names the argument.

    The cost of the dynamic programs is ``O(T V^2 Q)`` time and ``O(T V Q)`` memory; results are cached.
    """

    def __init__(
        self,
        init: npt.ArrayLike,
        trans: npt.ArrayLike,
        dfa: npt.ArrayLike,
        start: int,
        accept_reward: npt.ArrayLike,
        horizon: int,
    ) -> None:
        T = _as_index(horizon, "horizon")
        if T < 1:
            raise ValueError(f"horizon: expected T >= 1, got {T}")

        init_arr = _as_real_array(init, "init")
        if init_arr.ndim != 1 or init_arr.shape[0] == 0:
            raise ValueError(
                f"init: expected a non-empty 1-D array of shape (V,), got shape {init_arr.shape}"
            )
        _check_probabilities(init_arr, "init")
        V = init_arr.shape[0]

        trans_arr = _as_real_array(trans, "trans")
        if trans_arr.ndim == 2:
            if trans_arr.shape != (V, V):
                raise ValueError(
                    f"trans: expected shape (V, V) = {(V, V)} (V from init), got {trans_arr.shape}"
                )
        elif trans_arr.ndim == 3:
            if trans_arr.shape != (T, V, V):
                raise ValueError(
                    f"trans: a time-varying chain needs shape (T, V, V) = {(T, V, V)} (trans[T-1] unused), "
                    f"got {trans_arr.shape}"
                )
        else:
            raise ValueError(f"trans: expected shape (V, V) or (T, V, V), got {trans_arr.shape}")
        _check_probabilities(trans_arr, "trans")

        dfa_raw = np.asarray(dfa)
        if not np.issubdtype(dfa_raw.dtype, np.integer):
            raise TypeError(f"dfa: expected an integer array, got dtype {dfa_raw.dtype}")
        if dfa_raw.ndim != 2 or dfa_raw.shape[0] == 0 or dfa_raw.shape[1] != V:
            raise ValueError(f"dfa: expected shape (Q, V) with Q >= 1 and V = {V}, got {dfa_raw.shape}")
        Q = dfa_raw.shape[0]
        if (dfa_raw < 0).any() or (dfa_raw >= Q).any():
            bad = tuple(int(i) for i in np.argwhere((dfa_raw < 0) | (dfa_raw >= Q))[0])
            raise ValueError(f"dfa: entries must lie in [0, Q) = [0, {Q}); dfa{list(bad)} = {dfa_raw[bad]}")
        dfa_arr = dfa_raw.astype(np.int64)

        start_int = _as_index(start, "start")
        if not 0 <= start_int < Q:
            raise ValueError(f"start: expected a state in [0, Q) = [0, {Q}), got {start_int}")

        reward = _as_real_array(accept_reward, "accept_reward")
        if reward.shape != (Q,):
            raise ValueError(f"accept_reward: expected shape (Q,) = ({Q},), got {reward.shape}")
        if np.isnan(reward).any():
            raise ValueError("accept_reward: contains NaN")
        if np.isinf(reward).any():
            raise ValueError("accept_reward: contains infinite values")
        if (reward < 0).any():
            raise ValueError(f"accept_reward: rewards must be >= 0, got minimum {reward.min()!r}")

        self._V, self._Q, self._T = int(V), int(Q), T
        self._init = _readonly(init_arr)
        self._trans = _readonly(trans_arr)
        self._dfa = _readonly(dfa_arr)
        self._start = start_int
        self._reward = _readonly(reward)
        self._log_init_arr = _readonly(_log(init_arr))
        self._log_trans_arr = _readonly(_log(trans_arr))
        self._log_reward_arr = _readonly(_log(reward))
        self._vstar: LogTables | None = None
        self._forward: list[FloatArray] | None = None

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        """``V``, the number of tokens."""
        return self._V

    @property
    def num_states(self) -> int:
        """``Q``, the number of automaton states."""
        return self._Q

    @property
    def horizon(self) -> int:
        """``T``, the number of tokens in a trajectory."""
        return self._T

    @property
    def start(self) -> int:
        """The automaton's start state."""
        return self._start

    @property
    def init(self) -> FloatArray:
        """``(V,)`` law of ``x_0`` (read-only)."""
        return self._init

    @property
    def trans(self) -> FloatArray:
        """The transition probabilities as given, ``(V, V)`` or ``(T, V, V)`` (read-only)."""
        return self._trans

    @property
    def time_varying(self) -> bool:
        """Whether ``trans`` was given per position, shape ``(T, V, V)``."""
        return self._trans.ndim == 3

    @property
    def dfa(self) -> IntArray:
        """``(Q, V)`` automaton transitions (read-only)."""
        return self._dfa

    @property
    def accept_reward(self) -> FloatArray:
        """``(Q,)`` reward of each final state (read-only)."""
        return self._reward

    @property
    def log_init(self) -> FloatArray:
        """``(V,)`` ``log init`` (``-inf`` for impossible first tokens; read-only)."""
        return self._log_init_arr

    @property
    def log_reward(self) -> FloatArray:
        """``(Q,)`` ``log accept_reward`` (``-inf`` for zero reward; read-only)."""
        return self._log_reward_arr

    def log_trans_at(self, i: int) -> FloatArray:
        """``(V, V)`` log-probabilities ``log P(x_i = w | x_{i-1} = v)`` for a position ``1 <= i <= T-1``."""
        i = _as_index(i, "i")
        if not 1 <= i <= self._T - 1:
            raise ValueError(f"i: expected a position 1 <= i <= T-1 = {self._T - 1}, got {i}")
        return self._log_trans(i)

    def _log_trans(self, i: int) -> FloatArray:
        return self._log_trans_arr[i - 1] if self._log_trans_arr.ndim == 3 else self._log_trans_arr

    # ------------------------------------------------------------------ dynamic programs

    def _gather_next(self, nxt: FloatArray) -> FloatArray:
        """``M[q, w] = nxt[w, dfa[q, w]]``: the value of appending token ``w`` in state ``q``; (Q, V)."""
        return np.asarray(nxt[np.arange(self._V)[None, :], self._dfa], dtype=np.float64)

    def _backup_root(self, nxt: FloatArray) -> float:
        """``log sum_w init[w] exp(nxt[w, dfa[start, w]])``: level 1's expectation given the empty prefix."""
        return float(logsumexp(self._log_init_arr + self._gather_next(nxt)[self._start]))

    def _backup(self, t: int, nxt: FloatArray) -> FloatArray:
        """``log E_p[exp(nxt) | prefix of length t with summary (v, q)]``, ``1 <= t <= T-1``. Shape (V, Q).

        ``out[v, q] = logsumexp_w(log P_t[v, w] + nxt[w, dfa[q, w]])``, chunked over ``v``.
        """
        V, Q = self._V, self._Q
        gathered = self._gather_next(nxt)
        log_p = self._log_trans(t)
        out = np.empty((V, Q))
        step = max(1, _CHUNK_ELEMENTS // (Q * V))
        for v0 in range(0, V, step):
            out[v0 : v0 + step] = logsumexp(log_p[v0 : v0 + step, None, :] + gathered[None, :, :])
        return out

    def _check_tables_fit(self) -> None:
        """Refuse (ValueError naming ``horizon``) exact tables that cannot possibly be allocated: ``T + 1``
        levels of ``V x Q`` (``_table_bytes``; a list of 10^12 levels raised an empty MemoryError)."""
        V, Q, T = self._V, self._Q, self._T
        _memory.check_fits(
            "horizon", _table_bytes(V, Q, T), f"the exact tables (T + 1 levels of V x Q = {V} x {Q}, T = {T})"
        )

    def _vstar_tables(self) -> LogTables:
        if self._vstar is None:
            self._check_tables_fit()
            V, T = self._V, self._T
            tables: LogTables = [0.0] * (T + 1)
            level = _readonly(np.array(np.broadcast_to(self._log_reward_arr, (V, self._Q))))
            tables[T] = level
            for t in range(T - 1, 0, -1):
                level = _readonly(self._backup(t, level))
                tables[t] = level
            tables[0] = self._backup_root(level)
            self._vstar = tables
        return self._vstar

    def _forward_tables(self) -> list[FloatArray]:
        """``[alpha_1, ..., alpha_T]``: ``alpha_t[v, q] = log P_p(x_{t-1} = v, q_t = q)``."""
        if self._forward is None:
            self._check_tables_fit()
            V, Q = self._V, self._Q
            w_index = np.tile(np.arange(V), Q)  # matches the (Q, V) ravel order of dfa
            alpha = np.full((V, Q), -np.inf)
            alpha[np.arange(V), self._dfa[self._start]] = self._log_init_arr
            out = [_readonly(alpha)]
            step = max(1, _CHUNK_ELEMENTS // (V * V))
            for t in range(1, self._T):
                log_p_t = self._log_trans(t).T  # [w, v]
                prev_t = alpha.T  # [q, v]
                into = np.empty((Q, V))  # into[q, w] = logsumexp_v(alpha[v, q] + log P_t[v, w])
                for q0 in range(0, Q, step):
                    into[q0 : q0 + step] = logsumexp(prev_t[q0 : q0 + step, None, :] + log_p_t[None, :, :])
                alpha = np.full((V, Q), -np.inf)
                np.logaddexp.at(alpha, (w_index, self._dfa.ravel()), into.ravel())
                out.append(_readonly(alpha))
            self._forward = out
        return self._forward

    # ------------------------------------------------------------------ exact quantities

    def log_v_star(self) -> LogTables:
        r"""The optimal twist in the log domain.

        Returns:
            ``tables`` of length ``T+1``: ``tables[0] = log Z = log V*_0`` (a float) and, for ``t = 1..T``,
            ``tables[t][v, q] = log V*_t`` for a prefix of length ``t`` whose last token is ``v`` and whose
            automaton state after reading it is ``q``; ``tables[T][v, q] = log accept_reward[q]``. Entries of
            unreachable ``(v, q)`` are the value of the same recursion (``V*_t`` depends only on
            ``(t, v, q)``).
            The arrays are fresh copies.
        """
        tables = self._vstar_tables()
        return [tables[0]] + [np.array(level) for level in tables[1:]]

    def log_forward(self) -> list[FloatArray]:
        """``[alpha_1, ..., alpha_T]`` with ``alpha_t[v, q] = log P_p(x_{t-1} = v, q_t = q)`` (fresh copies).

        ``(t, v, q)`` is reachable iff ``alpha_t[v, q] > -inf``.
        """
        return [np.array(a) for a in self._forward_tables()]

    def exact_log_z(self) -> float:
        """``log Z = log E_p[r]`` (``-inf`` when the reward is zero on every reachable final state)."""
        return float(self._vstar_tables()[0])

    def exact_marginals(self) -> FloatArray:
        r"""``(T, V)`` array ``pi(x_i = v) = sum_q alpha_{i+1}(v, q) V*_{i+1}(v, q) / Z``; rows sum to 1.

        Raises:
            ValueError: if ``Z = 0`` (the target is undefined).
        """
        log_z = self.exact_log_z()
        if log_z == -np.inf:
            raise ValueError("the target is undefined: Z = E_p[r] = 0")
        vstar, alpha = self._vstar_tables(), self._forward_tables()
        out = np.empty((self._T, self._V))
        for i in range(self._T):
            out[i] = np.exp(logsumexp(alpha[i] + vstar[i + 1], axis=1) - log_z)
        return out

    def twist_tables(self, noise: float = 0.0, rng: RNGLike = None) -> LogTables:
        r"""A twist with a controlled Bellman error: ``log Vh_t = log V*_t + u_t``, ``u_t ~ U[-noise,noise]``.

        The perturbations are independent per ``(t, v, q)`` for ``t = 1..T-1`` and one draw for ``tables[0]``;
        the last level is exact (``Vh_T = r``) and zeros stay zeros. Since ``E_p[Vh_t]/Vh_{t-1}`` then lies in
        ``[exp(-2 noise), exp(2 noise)]``, its Bellman error is at most ``exp(2 noise) - 1`` (and at most
        ``exp(noise) - 1`` at the last step). At ``noise = 0`` this is
        [`log_v_star`][tiltsmc.tasks.markov_dfa.MarkovDFATask.log_v_star] and ``rng`` is unused.

        Args:
            noise: half-width of the perturbation of the log-values, in ``[0, 1e300]`` (beyond that the
                draw and the differences of the perturbed log-values overflow).
            rng: anything ``numpy.random.default_rng`` accepts (SPEC 7).
        """
        noise_f = _as_real(noise, "noise")
        if not 0.0 <= noise_f <= _MAX_NOISE:  # NaN too
            raise ValueError(
                f"noise: expected a finite value in [0, {_MAX_NOISE:g}] (larger perturbations overflow the "
                f"arithmetic of the log-values), got {noise_f!r}"
            )
        tables = self.log_v_star()
        if noise_f == 0.0:
            return tables
        gen = as_generator(rng)
        tables[0] = float(tables[0]) + float(gen.uniform(-noise_f, noise_f))
        for t in range(1, self._T):
            level = np.asarray(tables[t])
            tables[t] = level + gen.uniform(-noise_f, noise_f, size=level.shape)
        return tables

    # ------------------------------------------------------------------ Bellman error

    def _check_tables(self, tables: Sequence[npt.ArrayLike]) -> tuple[float, list[FloatArray]]:
        T, shape = self._T, (self._V, self._Q)
        if isinstance(tables, (str, bytes)) or not isinstance(tables, Sequence):
            raise TypeError(
                f"tables: expected a sequence of T+1 = {T + 1} levels, got {type(tables).__name__}"
            )
        if len(tables) != T + 1:
            raise ValueError(f"tables: expected T+1 = {T + 1} levels, got {len(tables)}")
        root = _as_real(tables[0], "tables[0]")
        if math.isnan(root) or root == math.inf:
            raise ValueError(f"tables[0]: log Vh_0 must be finite or -inf, got {root!r}")
        levels: list[FloatArray] = []
        for t in range(1, T + 1):
            level = _as_real_array(tables[t], f"tables[{t}]")
            if level.shape != shape:
                raise ValueError(f"tables[{t}]: expected shape (V, Q) = {shape}, got {level.shape}")
            if np.isnan(level).any() or (level == np.inf).any():
                raise ValueError(f"tables[{t}]: log-values must be finite or -inf (found NaN or +inf)")
            levels.append(level)
        return root, levels

    def bellman_error(self, tables: Union[TableTwist, Sequence[npt.ArrayLike]]) -> BellmanError:
        r"""Exact Bellman error of a twist: a [`twist`][tiltsmc.tasks.markov_dfa.MarkovDFATask.twist] model or
        its ``tables`` (layout of [`log_v_star`][tiltsmc.tasks.markov_dfa.MarkovDFATask.log_v_star]). Returns
        a [`BellmanError`][tiltsmc.tasks.markov_dfa.BellmanError].

        For ``t = 1..T`` and every reachable summary ``(v, q)`` of a prefix of length ``t-1`` with
        ``Vh_{t-1}(v, q) > 0``,
        ``log rho_t = logsumexp_w(log P[v, w] + log Vh_t(w, dfa[q, w])) - log Vh_{t-1}(v, q)`` (for ``t = 1``
        the empty prefix, with ``init`` and ``log Vh_0 = tables[0]``). ``tables[T]`` is used as given (it
        should be ``log r`` for the potentials to telescope to ``r / Vh_0``). Exact ``V*`` gives 0.
        """
        from .models import TableTwist

        if isinstance(tables, TableTwist):
            if tables.task is not self:
                raise ValueError("tables: this twist belongs to another task")
            tables = tables.tables
        root, levels = self._check_tables(tables)
        T = self._T
        alpha = self._forward_tables()
        log_eps = np.zeros(T)
        gauge_log = np.zeros(T)
        # per step: the largest and smallest log G_t over reachable transitions with G_t > 0 (a zero potential
        # only sets zero_potential), and the gauge shift -(hi + lo) / 2 of log rho_t that minimises eps_t
        g_high, g_low, shift = np.zeros(T), np.zeros(T), np.zeros(T)
        zero_potential = False

        for t in range(1, T + 1):
            nxt = levels[t - 1]
            gathered = self._gather_next(nxt)
            if t == 1:
                if root == -np.inf:
                    continue
                d = np.array([self._backup_root(nxt) - root])
                children = gathered[self._start][self._log_init_arr > -np.inf]
                high, low, zero = _potential_range(children - root)
            else:
                parent = levels[t - 2]
                valid = (alpha[t - 2] > -np.inf) & (parent > -np.inf)
                if not valid.any():
                    continue
                d = self._backup(t - 1, nxt)[valid] - parent[valid]
                high, low, zero = self._log_potential_range(t - 1, parent, valid, gathered)
            zero_potential |= zero
            if high >= low:  # some positive potential
                g_high[t - 1], g_low[t - 1] = high, low
            if not np.isfinite(d).all():  # some rho_t = 0
                log_eps[t - 1] = gauge_log[t - 1] = np.inf
            else:
                log_eps[t - 1] = float(np.max(np.abs(d)))
                gauge_log[t - 1] = 0.5 * float(np.max(d) - np.min(d))
                shift[t - 1] = -0.5 * float(np.max(d) + np.min(d))

        with np.errstate(over="ignore"):  # an |log rho| beyond ~709 is an infinite eps, as it should be
            per_step = np.expm1(log_eps)
            gauge_per_step = np.expm1(gauge_log)
        log_positive = float(np.max(np.maximum(g_high, -g_low)))
        log_gauge = float(np.max(np.maximum(g_high + shift, -(g_low + shift))))
        return BellmanError(
            eps=float(np.max(per_step)),
            per_step=_readonly(per_step),
            log_per_step=_readonly(log_eps),
            gauge_eps=float(np.max(gauge_per_step)),
            gauge_per_step=_readonly(gauge_per_step),
            ratio_bound=math.inf if zero_potential else _exp(max(log_positive, 0.0)),
            positive_ratio_bound=_exp(max(log_positive, 0.0)),
            gauge_ratio_bound=math.inf if zero_potential else _exp(max(log_gauge, 0.0)),
        )

    def _log_potential_range(
        self, t: int, parent: FloatArray, valid: BoolArray, gathered: FloatArray
    ) -> tuple[float, float, bool]:
        """``_potential_range`` of the ``log G`` of every reachable transition (``p > 0``) from the valid
        prefixes of length ``t``, chunked over ``v``."""
        V, Q = self._V, self._Q
        possible = self._log_trans(t) > -np.inf  # [v, w]
        parent_safe = np.where(valid, parent, 0.0)
        high, low, zero = -np.inf, np.inf, False
        step = max(1, _CHUNK_ELEMENTS // (Q * V))
        for v0 in range(0, V, step):
            sl = slice(v0, v0 + step)
            mask = valid[sl, :, None] & possible[sl, None, :]
            if mask.any():
                chunk_high, chunk_low, chunk_zero = _potential_range(
                    (gathered[None, :, :] - parent_safe[sl, :, None])[mask]
                )
                high, low, zero = max(high, chunk_high), min(low, chunk_low), zero or chunk_zero
        return high, low, zero

    # ------------------------------------------------------------------ sampling and enumeration

    def policy(self, *, allow_token_limits: bool = False) -> MarkovPolicy:
        """The base Markov chain as a token policy for the samplers: it reads this task's own arrays
        (nothing is allocated per position, whatever the horizon), and its trajectories have exactly
        ``horizon`` tokens: a sampler's ``max_new_tokens`` other than the horizon is refused, unless
        ``allow_token_limits`` (for tests of the engine's mechanics: the sampler then targets another law
        than the task's; see ``tiltsmc.tasks.models.MarkovPolicy``)."""
        from .models import MarkovPolicy

        return MarkovPolicy(self, allow_token_limits=allow_token_limits)

    def twist(self, noise: float = 0.0, rng: RNGLike = None) -> TableTwist:
        """A twist model: exact ``V*`` at ``noise = 0``, else
        [`twist_tables`][tiltsmc.tasks.markov_dfa.MarkovDFATask.twist_tables] ``(noise, rng)``."""
        from .models import TableTwist

        return TableTwist(self, self.twist_tables(noise, rng))

    def unguided(self) -> TableTwist:
        """No guidance: ``Vh_t = 1`` for ``t < T`` and ``Vh_T = r`` (plain importance weighting by ``r``).

        Its tables are ``T + 1`` levels of ``V x Q``: where they cannot possibly be allocated, ValueError
        naming ``horizon`` (as for the exact tables), before any is built."""
        from .models import TableTwist

        self._check_tables_fit()
        shape = (self.vocab_size, self.num_states)
        levels: LogTables = [0.0] + [np.zeros(shape) for _ in range(self.horizon - 1)]
        levels.append(np.broadcast_to(self.log_reward, shape).copy())
        return TableTwist(self, levels)

    def sample_exact(self, num: int, rng: RNGLike = None) -> IntArray:
        r"""``(num, T)`` int64 array of independent exact draws from ``pi ∝ p r``.

        Forward sampling with the optimal twist: ``x_i ~ p(x_i | x_{i-1}) V*_{i+1}(x_i, q_{i+1}) / V*_i`` (the
        Gumbel-max trick on the unnormalised log-probabilities, so zero-probability tokens are never drawn).

        Raises:
            ValueError: if ``num < 0`` or ``Z = 0``, or the draws cannot possibly be held in memory (their
                ``(num, T)`` tokens and a step's ``(num, V)`` noise, 8 bytes each: more than the memory
                available), naming ``num``, before anything is drawn.
        """
        n = _as_index(num, "num")
        if n < 0:
            raise ValueError(f"num: expected num >= 0, got {n}")
        # the (num, T) draws and a step's (num, V) Gumbel noise, int64 and float64
        _memory.check_fits(
            "num", 8 * n * (self._T + self._V), f"{n} draws of T = {self._T} tokens (V = {self._V})"
        )
        if self.exact_log_z() == -np.inf:
            raise ValueError("cannot sample the target: Z = E_p[r] = 0")
        gen = as_generator(rng)
        vstar = self._vstar_tables()
        out = np.empty((n, self._T), dtype=np.int64)
        if n == 0:
            return out
        gathered = self._gather_next(np.asarray(vstar[1]))
        logits = np.broadcast_to(self._log_init_arr + gathered[self._start], (n, self._V))
        x = np.argmax(logits + gen.gumbel(size=(n, self._V)), axis=1)
        q = self._dfa[self._start, x]
        out[:, 0] = x
        for i in range(1, self._T):
            gathered = self._gather_next(np.asarray(vstar[i + 1]))
            logits = self._log_trans(i)[x] + gathered[q]
            x = np.argmax(logits + gen.gumbel(size=(n, self._V)), axis=1)
            q = self._dfa[q, x]
            out[:, i] = x
        return out

    def _check_sequences(self, sequences: npt.ArrayLike) -> IntArray:
        seq = np.asarray(sequences)
        if not np.issubdtype(seq.dtype, np.integer):
            raise TypeError(f"sequences: expected an integer array, got dtype {seq.dtype}")
        if seq.ndim != 2 or seq.shape[1] != self._T:
            raise ValueError(f"sequences: expected shape (n, T) with T = {self._T}, got {seq.shape}")
        if seq.size and ((seq < 0).any() or (seq >= self._V).any()):
            raise ValueError(f"sequences: tokens must lie in [0, V) = [0, {self._V})")
        return seq.astype(np.int64, copy=False)

    def final_states(self, sequences: npt.ArrayLike) -> IntArray:
        """``(n,)`` automaton state ``q_T`` after reading each row of the ``(n, T)`` array ``sequences``."""
        seq = self._check_sequences(sequences)
        q = np.full(seq.shape[0], self._start, dtype=np.int64)
        for i in range(self._T):
            q = self._dfa[q, seq[:, i]]
        return q

    def sequence_log_prob(self, sequences: npt.ArrayLike) -> FloatArray:
        """``(n,)`` ``log p(x)`` of each row of the ``(n, T)`` array ``sequences``."""
        seq = self._check_sequences(sequences)
        out = np.array(self._log_init_arr[seq[:, 0]], dtype=np.float64)
        for i in range(1, self._T):
            out += self._log_trans(i)[seq[:, i - 1], seq[:, i]]
        return out

    def sequence_log_reward(self, sequences: npt.ArrayLike) -> FloatArray:
        """``(n,)`` ``log r(x)`` of each row of the ``(n, T)`` array ``sequences``."""
        return np.array(self._log_reward_arr[self.final_states(sequences)], dtype=np.float64)

    def enumerate_sequences(self) -> tuple[IntArray, FloatArray, FloatArray]:
        """Every trajectory, for brute-force checks on tiny tasks.

        Returns:
            ``(sequences, log_p, log_r)``: the ``(V**T, T)`` int64 array of all sequences in lexicographic
            order, and their ``log p`` and ``log r``, each ``(V**T,)``.

        Raises:
            ValueError: if ``V**T > 2**20``.
        """
        V, T = self._V, self._T
        count = V**T
        if count > _MAX_ENUMERATE:
            raise ValueError(f"enumerate_sequences: V**T = {V}**{T} exceeds the limit 2**20")
        index = np.arange(count, dtype=np.int64)
        powers = V ** np.arange(T - 1, -1, -1, dtype=np.int64)
        sequences = (index[:, None] // powers[None, :]) % V
        return sequences, self.sequence_log_prob(sequences), self.sequence_log_reward(sequences)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def needle(cls, V: int, T: int, rng: RNGLike = None, reward: float = 1.0) -> MarkovDFATask:
        """One hidden target string of length ``T`` under a uniform policy on ``V`` tokens: Z = reward V**-T.

        The target is drawn uniformly from ``rng``. The automaton has ``T + 2`` states: ``k = 0..T`` is "the
        first ``k`` tokens match the target" and ``T + 1`` is a dead state; ``accept_reward`` is ``reward`` on
        state ``T`` and 0 elsewhere. Unguided sampling needs about ``V**T`` draws to see a positive reward.

        A size whose arrays cannot possibly be held in memory (its ``V x V`` transitions and their logs, its
        ``(T + 2) x V`` automaton: more than the memory available) is refused (ValueError naming ``V`` or
        ``T``, the larger) before anything is drawn.
        """
        V = _as_index(V, "V")
        T = _as_index(T, "T")
        if V < 1:
            raise ValueError(f"V: expected V >= 1, got {V}")
        if T < 1:
            raise ValueError(f"T: expected T >= 1, got {T}")
        reward_f = _as_real(reward, "reward")
        if not (math.isfinite(reward_f) and reward_f >= 0):
            raise ValueError(f"reward: expected a finite value >= 0, got {reward_f!r}")
        _check_task_fits(V, T + 2, T, V * V, False, {"V": V, "T": T})
        target = as_generator(rng).integers(0, V, size=T)
        dead = T + 1
        dfa = np.full((T + 2, V), dead, dtype=np.int64)
        dfa[np.arange(T), target] = np.arange(1, T + 1)
        accept = np.zeros(T + 2)
        accept[T] = reward_f
        uniform = np.full(V, 1.0 / V)
        return cls(uniform, np.tile(uniform, (V, 1)), dfa, 0, accept, T)

    @classmethod
    def random(
        cls,
        V: int,
        Q: int,
        T: int,
        rng: RNGLike = None,
        *,
        time_varying: bool = False,
        concentration: float = 1.0,
        zero_trans_fraction: float = 0.0,
        zero_reward_fraction: float = 0.3,
        ensure_positive: bool = True,
    ) -> MarkovDFATask:
        """A random dense instance for tests.

        ``init`` and the rows of ``trans`` are Dirichlet(``concentration``) draws, of which each entry is then
        zeroed with probability ``zero_trans_fraction`` (keeping the largest entry of each row) and the row
        renormalised; ``trans`` is ``(T, V, V)`` when ``time_varying``. The automaton is uniform on ``[0, Q)``
        (table and start state). Rewards are uniform on ``[0, 1)``, each zeroed with probability
        ``zero_reward_fraction``; with ``ensure_positive`` one reachable final state is given a reward in
        ``[0.5, 1)`` when none has a positive one, so ``Z > 0``.

        A size whose arrays cannot possibly be held in memory (the transitions and their logs, the automaton,
        and with ``ensure_positive`` the ``T + 1`` exact tables of ``V x Q`` that ``exact_log_z`` builds:
        more than the memory available) is refused (ValueError naming the largest of ``V``, ``Q`` and ``T``)
        before anything is drawn.
        """
        V, Q, T = _as_index(V, "V"), _as_index(Q, "Q"), _as_index(T, "T")
        varying = _as_bool(time_varying, "time_varying")
        positive = _as_bool(ensure_positive, "ensure_positive")
        for name, value in (("V", V), ("Q", Q), ("T", T)):
            if value < 1:
                raise ValueError(f"{name}: expected {name} >= 1, got {value}")
        alpha = _as_real(concentration, "concentration")
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"concentration: expected a finite value > 0, got {alpha!r}")
        fractions: dict[str, float] = {}
        for name, fraction in (
            ("zero_trans_fraction", zero_trans_fraction),
            ("zero_reward_fraction", zero_reward_fraction),
        ):
            f = _as_real(fraction, name)
            if not 0.0 <= f <= 1.0:
                raise ValueError(f"{name}: expected a value in [0, 1], got {f!r}")
            fractions[name] = f
        trans_size = (T if varying else 1) * V * V
        _check_task_fits(V, Q, T, trans_size, positive, {"V": V, "Q": Q, "T": T})
        gen = as_generator(rng)

        def rows(shape: tuple[int, ...]) -> FloatArray:
            probs = gen.dirichlet(np.full(V, alpha), size=shape)
            keep = gen.random(probs.shape) >= fractions["zero_trans_fraction"]
            keep |= np.arange(V) == np.argmax(probs, axis=-1)[..., None]
            probs = np.where(keep, probs, 0.0)
            return np.asarray(probs / probs.sum(axis=-1, keepdims=True), dtype=np.float64)

        init = rows(())
        trans = rows((T, V) if varying else (V,))
        dfa = gen.integers(0, Q, size=(Q, V))
        start = int(gen.integers(0, Q))
        reward = gen.random(Q) * (gen.random(Q) >= fractions["zero_reward_fraction"])
        task = cls(init, trans, dfa, start, reward, T)
        if positive and task.exact_log_z() == -np.inf:
            final = np.flatnonzero((task._forward_tables()[-1] > -np.inf).any(axis=0))
            reward[int(gen.choice(final))] = gen.uniform(0.5, 1.0)
            task = cls(init, trans, dfa, start, reward, T)
        return task

    def __repr__(self) -> str:
        kind = "time-varying" if self.time_varying else "homogeneous"
        return f"MarkovDFATask(V={self._V}, Q={self._Q}, T={self._T}, {kind})"
