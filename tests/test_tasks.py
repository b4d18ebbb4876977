"""Tests of the exact test-bed task ``tiltsmc.tasks.markov_dfa`` against brute-force enumeration.

The brute-force references below are written from the raw parameters (``init``, ``trans``, ``dfa``,
``start``, ``accept_reward``) with plain Python loops over every sequence, independently of the dynamic
programs under test.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

try:
    from tiltsmc.tasks.markov_dfa import BellmanError, MarkovDFATask
except ImportError:  # the compiled core is not built yet: load the pure-NumPy module on its own
    _PATH = Path(__file__).resolve().parents[1] / "python" / "tiltsmc" / "tasks" / "markov_dfa.py"
    _SPEC = importlib.util.spec_from_file_location("_tiltsmc_markov_dfa_standalone", _PATH)
    assert _SPEC is not None and _SPEC.loader is not None
    _MODULE = importlib.util.module_from_spec(_SPEC)
    sys.modules[_SPEC.name] = _MODULE
    _SPEC.loader.exec_module(_MODULE)
    BellmanError = _MODULE.BellmanError
    MarkovDFATask = _MODULE.MarkovDFATask


# ----------------------------------------------------------------------------------------------------------
# brute force from the raw parameters


def _step_matrix(task: Any, i: int) -> np.ndarray:
    """Transition matrix for the law of x_i given x_{i-1} (i >= 1), read from the raw ``trans``."""
    trans = np.asarray(task.trans)
    return trans if trans.ndim == 2 else trans[i - 1]


def _run(dfa: np.ndarray, q: int, tokens: tuple[int, ...]) -> int:
    for v in tokens:
        q = int(dfa[q, v])
    return q


def _prefix_prob(task: Any, prefix: tuple[int, ...]) -> float:
    if not prefix:
        return 1.0
    prob = float(task.init[prefix[0]])
    for i in range(1, len(prefix)):
        prob *= float(_step_matrix(task, i)[prefix[i - 1], prefix[i]])
    return prob


def brute_sequences(task: Any) -> tuple[list[tuple[int, ...]], np.ndarray, np.ndarray]:
    """Every sequence (lexicographic), with p(x) and r(x) in the natural scale."""
    V, T = task.vocab_size, task.horizon
    seqs = list(itertools.product(range(V), repeat=T))
    p = np.array([_prefix_prob(task, s) for s in seqs])
    r = np.array([float(task.accept_reward[_run(task.dfa, task.start, s)]) for s in seqs])
    return seqs, p, r


def brute_v_star(task: Any) -> list[Any]:
    """V*_t(v, q) = E_p[r | last token v, state q at length t], by summing over every continuation."""
    V, Q, T = task.vocab_size, task.num_states, task.horizon
    _, p, r = brute_sequences(task)
    tables: list[Any] = [float(np.sum(p * r))]
    for t in range(1, T + 1):
        level = np.zeros((V, Q))
        for v, q in itertools.product(range(V), range(Q)):
            total = 0.0
            for cont in itertools.product(range(V), repeat=T - t):
                prob, prev = 1.0, v
                for j, w in enumerate(cont):
                    prob *= float(_step_matrix(task, t + j)[prev, w])
                    prev = w
                total += prob * float(task.accept_reward[_run(task.dfa, q, cont)])
            level[v, q] = total
        tables.append(level)
    return tables


def brute_bellman(task: Any, log_tables: list[Any]) -> dict[str, Any]:
    """eps_t, the gauge-minimised eps_t and L, by visiting every reachable prefix (natural scale).

    ``ratio_bound`` is the paper's L (inf once a reachable potential from a prefix of positive value is 0),
    ``positive_ratio_bound`` the bound over positive potentials only, ``gauge_ratio_bound`` L after each
    level's potentials are divided by sqrt(hi_t lo_t) (the rescaling that minimises eps_t)."""
    V, T = task.vocab_size, task.horizon
    vh = [math.exp(float(log_tables[0]))] + [np.exp(np.asarray(lv)) for lv in log_tables[1:]]

    def value(prefix: tuple[int, ...]) -> float:
        if not prefix:
            return vh[0]
        return float(vh[len(prefix)][prefix[-1], _run(task.dfa, task.start, prefix)])

    per_step, gauge, max_g, max_gauge_g, zero = np.zeros(T), np.zeros(T), 1.0, 1.0, False
    for t in range(1, T + 1):
        ratios, potentials = [], []
        for prefix in itertools.product(range(V), repeat=t - 1):
            if _prefix_prob(task, prefix) == 0.0 or value(prefix) == 0.0:
                continue
            probs = task.init if t == 1 else _step_matrix(task, t - 1)[prefix[-1]]
            expect = 0.0
            for w in range(V):
                child = value((*prefix, w))
                expect += float(probs[w]) * child
                if probs[w] > 0:
                    g = child / value(prefix)
                    zero |= g == 0.0
                    if g > 0:
                        max_g = max(max_g, g, 1.0 / g)
                        potentials.append(g)
            ratios.append(expect / value(prefix))
        if not ratios:
            continue
        lo, hi = min(ratios), max(ratios)
        if lo == 0.0:
            per_step[t - 1] = gauge[t - 1] = math.inf
        else:
            per_step[t - 1] = max(hi, 1.0 / lo) - 1.0
            gauge[t - 1] = math.exp(0.5 * (math.log(hi) - math.log(lo))) - 1.0
            scale = math.sqrt(hi * lo)
            for g in potentials:
                max_gauge_g = max(max_gauge_g, g / scale, scale / g)
    return {
        "per_step": per_step,
        "gauge": gauge,
        "ratio_bound": math.inf if zero else max_g,
        "positive_ratio_bound": max_g,
        "gauge_ratio_bound": math.inf if zero else max_gauge_g,
    }


def assert_log_equal(log_values: Any, natural: Any, rtol: float = 1e-10) -> None:
    """``log_values`` is the log of ``natural``: same zeros (-inf), close elsewhere."""
    log_values, natural = np.asarray(log_values, dtype=float), np.asarray(natural, dtype=float)
    assert log_values.shape == natural.shape
    assert not np.isnan(log_values).any()
    np.testing.assert_array_equal(log_values == -np.inf, natural == 0.0)
    pos = natural > 0
    np.testing.assert_allclose(np.exp(log_values[pos]), natural[pos], rtol=rtol, atol=0)


# ----------------------------------------------------------------------------------------------------------
# tasks


def explicit_task() -> Any:
    """Zeros everywhere: an impossible first token, an absorbing token, unreachable (v, q), zero rewards."""
    init = [0.6, 0.4, 0.0]
    trans = [[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]]
    dfa = [[0, 1, 2], [1, 0, 2], [2, 2, 2]]  # parity of ones in states 0/1; state 2 = "a 2 was read"
    return MarkovDFATask(init, trans, dfa, 0, [1.0, 0.0, 0.25], 4)


# (V, Q, T, time_varying, zero_trans_fraction, zero_reward_fraction, seed)
RANDOM_CASES = [
    (2, 2, 1, False, 0.0, 0.3, 0),
    (3, 2, 1, True, 0.3, 0.5, 1),
    (2, 3, 2, True, 0.0, 0.3, 2),
    (3, 2, 3, False, 0.3, 0.5, 3),
    (3, 4, 4, True, 0.3, 0.5, 4),
    (2, 4, 6, False, 0.2, 0.5, 5),
    (3, 3, 5, True, 0.0, 0.3, 6),
    (2, 2, 6, True, 0.4, 0.5, 7),
    (3, 4, 6, False, 0.3, 0.5, 8),
]


def make_task(case: Any) -> Any:
    if case == "explicit":
        return explicit_task()
    V, Q, T, tv, zt, zr, seed = case
    return MarkovDFATask.random(
        V, Q, T, rng=seed, time_varying=tv, zero_trans_fraction=zt, zero_reward_fraction=zr
    )


CASES = ["explicit", *RANDOM_CASES]


def _case_id(case: Any) -> str:
    return case if isinstance(case, str) else "V{}Q{}T{}{}-z{}-r{}-s{}".format(*case)


@pytest.fixture(params=CASES, ids=[_case_id(c) for c in CASES])
def task(request: pytest.FixtureRequest) -> Any:
    return make_task(request.param)


def test_cases_exercise_zeros() -> None:
    """The cases include zero rewards, zero transitions and unreachable (t, v, q) (so the tests bite)."""
    tasks = [make_task(c) for c in CASES]
    assert any((t.accept_reward == 0).any() for t in tasks)
    assert any((np.asarray(t.trans) == 0).any() for t in tasks)
    assert any(t.time_varying for t in tasks) and any(not t.time_varying for t in tasks)
    assert any(any((a == -np.inf).any() for a in t.log_forward()) for t in tasks)
    assert all(t.exact_log_z() > -np.inf for t in tasks)


# ----------------------------------------------------------------------------------------------------------
# exact quantities against brute force


def test_log_v_star_matches_brute_force(task: Any) -> None:
    tables = task.log_v_star()
    expected = brute_v_star(task)
    assert len(tables) == task.horizon + 1
    assert isinstance(tables[0], float)
    assert_log_equal(tables[0], expected[0])
    for t in range(1, task.horizon + 1):
        assert tables[t].shape == (task.vocab_size, task.num_states)
        assert_log_equal(tables[t], expected[t])
    np.testing.assert_array_equal(tables[-1], np.broadcast_to(task.log_reward, tables[-1].shape))


def test_bellman_identity(task: Any) -> None:
    """V*_{t-1}(v, q) = sum_w P[v, w] V*_t(w, dfa[q, w]) and Z = sum_w init[w] V*_1(w, dfa[start, w])."""
    vstar = [math.exp(task.log_v_star()[0])] + [np.exp(a) for a in task.log_v_star()[1:]]
    dfa = np.asarray(task.dfa)
    root = sum(task.init[w] * vstar[1][w, dfa[task.start, w]] for w in range(task.vocab_size))
    assert root == pytest.approx(vstar[0], rel=1e-12)
    for t in range(2, task.horizon + 1):
        P = _step_matrix(task, t - 1)
        for v, q in itertools.product(range(task.vocab_size), range(task.num_states)):
            backed = sum(P[v, w] * vstar[t][w, dfa[q, w]] for w in range(task.vocab_size))
            assert backed == pytest.approx(vstar[t - 1][v, q], rel=1e-12, abs=1e-300)


def test_log_z_marginals_and_enumeration(task: Any) -> None:
    seqs_ref, p, r = brute_sequences(task)
    z = float(np.sum(p * r))
    assert task.exact_log_z() == pytest.approx(math.log(z), rel=1e-12, abs=1e-12)

    seqs, log_p, log_r = task.enumerate_sequences()
    assert seqs.dtype == np.int64 and seqs.shape == (task.vocab_size**task.horizon, task.horizon)
    np.testing.assert_array_equal(seqs, np.array(seqs_ref, dtype=np.int64))
    assert_log_equal(log_p, p, rtol=1e-12)
    assert_log_equal(log_r, r, rtol=1e-12)

    pi = p * r / z
    expected = np.zeros((task.horizon, task.vocab_size))
    for s, w in zip(seqs_ref, pi):
        for i, v in enumerate(s):
            expected[i, v] += w
    marginals = task.exact_marginals()
    assert marginals.shape == (task.horizon, task.vocab_size)
    np.testing.assert_allclose(marginals, expected, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(marginals.sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_log_forward_is_reachability(task: Any) -> None:
    """alpha_t(v, q) = P_p(x_{t-1} = v, q_t = q), by brute force over prefixes."""
    V, Q = task.vocab_size, task.num_states
    alpha = task.log_forward()
    assert len(alpha) == task.horizon
    for t in range(1, task.horizon + 1):
        expected = np.zeros((V, Q))
        for prefix in itertools.product(range(V), repeat=t):
            expected[prefix[-1], _run(task.dfa, task.start, prefix)] += _prefix_prob(task, prefix)
        assert_log_equal(alpha[t - 1], expected)


# ----------------------------------------------------------------------------------------------------------
# Bellman error


@pytest.mark.parametrize("noise", [0.0, 0.05, 0.4])
def test_bellman_error_matches_brute_force(task: Any, noise: float) -> None:
    tables = task.twist_tables(noise, rng=123)
    report = task.bellman_error(tables)
    expected = brute_bellman(task, tables)
    assert isinstance(report, BellmanError)
    T = task.horizon
    for name in ("per_step", "log_per_step", "gauge_per_step"):
        assert getattr(report, name).shape == (T,)
    np.testing.assert_allclose(report.per_step, expected["per_step"], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(report.gauge_per_step, expected["gauge"], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(report.log_per_step, np.log1p(report.per_step), rtol=1e-12, atol=1e-15)
    assert report.eps == pytest.approx(float(np.max(expected["per_step"])), rel=1e-9, abs=1e-9)
    assert report.gauge_eps == pytest.approx(float(np.max(expected["gauge"])), rel=1e-9, abs=1e-9)
    for name in ("ratio_bound", "positive_ratio_bound", "gauge_ratio_bound"):
        assert getattr(report, name) == pytest.approx(expected[name], rel=1e-9), name


def test_exact_tables_have_zero_bellman_error(task: Any) -> None:
    report = task.bellman_error(task.log_v_star())
    assert report.eps <= 1e-9
    assert report.gauge_eps <= 1e-9
    assert np.all(report.log_per_step <= 1e-9)
    assert report.ratio_bound >= 1.0


@pytest.mark.parametrize("noise", [0.01, 0.1, 0.5])
def test_perturbed_tables_bellman_error_bounds(task: Any, noise: float) -> None:
    report = task.bellman_error(task.twist_tables(noise, rng=7))
    assert report.eps > 0
    assert report.eps <= math.expm1(2 * noise) + 1e-12
    assert np.all(report.log_per_step <= 2 * noise + 1e-12)
    assert report.per_step[-1] <= math.expm1(noise) + 1e-12  # Vh_T = r is exact
    assert report.gauge_eps <= report.eps + 1e-15
    assert np.all(report.gauge_per_step <= report.per_step + 1e-15)
    assert report.ratio_bound >= task.bellman_error(task.log_v_star()).ratio_bound * math.exp(-noise) - 1e-12


def test_gauge_is_invariant_under_level_rescaling(task: Any) -> None:
    """Vh_t -> c_t Vh_t (t < T) changes eps but not the gauge-minimised eps."""
    tables = task.twist_tables(0.2, rng=3)
    # log c_t for t < T (log c_T = 0): log rho_t moves by log c_t - log c_{t-1}, here >= 1 in absolute value,
    # which exceeds every |log rho_t| <= 2 * 0.2, so eps must grow
    shifts = np.cumsum(np.random.default_rng(0).uniform(1.0, 2.0, size=task.horizon))
    moved = [float(tables[0]) + shifts[0]] + [tables[t] + shifts[t] for t in range(1, task.horizon)]
    moved.append(tables[-1])
    a, b = task.bellman_error(tables), task.bellman_error(moved)
    np.testing.assert_allclose(a.gauge_per_step, b.gauge_per_step, rtol=1e-9, atol=1e-12)
    assert b.eps > a.eps


def test_design_example_r_to_the_number_of_ones() -> None:
    """docs/theory/tilted-target.md: Vh = r^(#ones) under a fair coin has eps = (r-1)/2 yet gauge-minimised
    eps = 0."""
    r, T = 3.0, 5
    dfa = np.array([[q, min(q + 1, T)] for q in range(T + 1)])  # state = number of ones read
    task = MarkovDFATask([0.5, 0.5], [[0.5, 0.5], [0.5, 0.5]], dfa, 0, r ** np.arange(T + 1), T)
    tables = [0.0] + [np.tile(np.arange(T + 1) * math.log(r), (2, 1)) for _ in range(T)]
    report = task.bellman_error(tables)
    np.testing.assert_allclose(report.per_step, (r - 1) / 2, rtol=1e-12)
    assert report.eps == pytest.approx((r - 1) / 2, rel=1e-12)
    assert report.gauge_eps == pytest.approx(0.0, abs=1e-12)
    assert report.ratio_bound == pytest.approx(r, rel=1e-12)
    assert task.exact_log_z() == pytest.approx(T * math.log((1 + r) / 2), rel=1e-12)


def test_bellman_error_infinite_and_vacuous_cases() -> None:
    # all rewards zero: Z = 0, V* = 0 everywhere, no constrained prefix at all
    task = MarkovDFATask([0.5, 0.5], [[0.5, 0.5], [0.5, 0.5]], [[0, 1], [1, 0]], 0, [0.0, 0.0], 3)
    assert task.exact_log_z() == -np.inf
    exact = task.bellman_error(task.log_v_star())
    assert exact.eps == 0.0 and exact.gauge_eps == 0.0 and exact.ratio_bound == 1.0
    # a positive Vh_0 whose children all have Vh_1 = 0: rho_1 = 0, eps = inf
    tables = task.log_v_star()
    tables[0] = 0.0
    report = task.bellman_error(tables)
    assert report.per_step[0] == np.inf and report.eps == np.inf and report.gauge_eps == np.inf
    assert np.all(report.per_step[1:] == 0.0)
    with pytest.raises(ValueError, match="Z = E_p"):
        task.exact_marginals()
    with pytest.raises(ValueError, match="Z = E_p"):
        task.sample_exact(3, rng=0)


# ----------------------------------------------------------------------------------------------------------
# twist tables


def test_twist_tables(task: Any) -> None:
    exact = task.log_v_star()
    zero = task.twist_tables(0.0)
    assert zero[0] == exact[0]
    for a, b in zip(zero[1:], exact[1:]):
        np.testing.assert_array_equal(a, b)

    noise = 0.3
    a, b = task.twist_tables(noise, rng=5), task.twist_tables(noise, rng=np.random.default_rng(5))
    c = task.twist_tables(noise, rng=6)
    assert a[0] == b[0] and a[0] != c[0]
    assert abs(a[0] - exact[0]) <= noise
    np.testing.assert_array_equal(a[-1], exact[-1])  # Vh_T = r
    for t in range(1, task.horizon):
        np.testing.assert_array_equal(a[t], b[t])
        np.testing.assert_array_equal(a[t] == -np.inf, exact[t] == -np.inf)
        finite = exact[t] > -np.inf
        assert np.all(np.abs(a[t][finite] - exact[t][finite]) <= noise)
        if finite.sum() > 1:
            assert np.any(a[t][finite] != exact[t][finite])


# ----------------------------------------------------------------------------------------------------------
# exact sampling


def test_sample_exact_marginals() -> None:
    """Histogram of 20000 draws against exact_marginals, each cell within 5 binomial standard deviations."""
    task = MarkovDFATask.random(3, 4, 5, rng=11, time_varying=True, zero_trans_fraction=0.3)
    n = 20000
    draws = task.sample_exact(n, rng=2024)
    assert draws.shape == (n, task.horizon) and draws.dtype == np.int64
    assert np.all(task.sequence_log_prob(draws) > -np.inf)
    assert np.all(task.sequence_log_reward(draws) > -np.inf)
    pi = task.exact_marginals()
    counts = np.stack([np.bincount(draws[:, i], minlength=task.vocab_size) for i in range(task.horizon)])
    sigma = np.sqrt(n * pi * (1 - pi))
    assert np.all(np.abs(counts - n * pi) <= 5 * sigma + 1e-9)


def test_sample_exact_joint_law() -> None:
    """Histogram over all 3**4 sequences of 20000 draws against pi = p r / Z (5 binomial sigmas per cell)."""
    task = explicit_task()
    seqs, log_p, log_r = task.enumerate_sequences()
    pi = np.exp(log_p + log_r - task.exact_log_z())
    assert pi.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.any(pi == 0)
    n = 20000
    draws = task.sample_exact(n, rng=99)
    index = draws @ (task.vocab_size ** np.arange(task.horizon - 1, -1, -1))
    counts = np.bincount(index, minlength=len(seqs))
    assert np.all(counts[pi == 0] == 0)
    assert np.all(np.abs(counts - n * pi) <= 5 * np.sqrt(n * pi * (1 - pi)) + 1e-9)


def test_sample_exact_reproducible_and_empty(task: Any) -> None:
    np.testing.assert_array_equal(task.sample_exact(50, rng=1), task.sample_exact(50, rng=1))
    assert task.sample_exact(0, rng=1).shape == (0, task.horizon)


# ----------------------------------------------------------------------------------------------------------
# needle


@pytest.mark.parametrize(("V", "T"), [(2, 1), (2, 5), (3, 4), (5, 2)])
def test_needle(V: int, T: int) -> None:
    task = MarkovDFATask.needle(V, T, rng=V * 10 + T)
    assert task.num_states == T + 2
    assert task.exact_log_z() == pytest.approx(-T * math.log(V), rel=1e-12)
    seqs, log_p, log_r = task.enumerate_sequences()
    hits = np.flatnonzero(log_r > -np.inf)
    assert hits.size == 1
    target = seqs[hits[0]]
    np.testing.assert_allclose(log_p, -T * math.log(V), rtol=1e-12)
    np.testing.assert_array_equal(task.sample_exact(5, rng=0), np.tile(target, (5, 1)))
    marginals = task.exact_marginals()
    np.testing.assert_allclose(marginals, np.eye(V)[target], rtol=0, atol=1e-12)
    assert task.bellman_error(task.log_v_star()).eps <= 1e-12


def test_needle_reward_and_long_horizon() -> None:
    task = MarkovDFATask.needle(2, 400, rng=0, reward=2.5)
    assert task.exact_log_z() == pytest.approx(math.log(2.5) - 400 * math.log(2), rel=1e-12)
    assert task.bellman_error(task.log_v_star()).eps <= 1e-9
    assert MarkovDFATask.needle(4, 3, rng=np.random.default_rng(1)).exact_log_z() == pytest.approx(
        -3 * math.log(4)
    )


# ----------------------------------------------------------------------------------------------------------
# API details


def test_properties_and_log_trans_at() -> None:
    rng = np.random.default_rng(0)
    trans = rng.dirichlet(np.ones(3), size=(4, 3))
    task = MarkovDFATask([0.2, 0.3, 0.5], trans, [[0, 1, 1], [1, 0, 0]], 1, [0.0, 1.0], 4)
    assert (task.vocab_size, task.num_states, task.horizon, task.start) == (3, 2, 4, 1)
    assert task.time_varying
    np.testing.assert_allclose(task.log_init, np.log([0.2, 0.3, 0.5]))
    np.testing.assert_allclose(task.log_reward, [-np.inf, 0.0])
    for i in range(1, 4):
        np.testing.assert_allclose(task.log_trans_at(i), np.log(trans[i - 1]))
    for bad in (0, 4):
        with pytest.raises(ValueError, match="i: "):
            task.log_trans_at(bad)
    homogeneous = MarkovDFATask([1.0, 0.0], [[0.0, 1.0], [1.0, 0.0]], [[0, 0]], 0, [1.0], 3)
    assert not homogeneous.time_varying
    np.testing.assert_array_equal(homogeneous.log_trans_at(2), [[-np.inf, 0.0], [0.0, -np.inf]])
    with pytest.raises(ValueError):
        task.init[0] = 1.0  # read-only views
    assert "V=3" in repr(task)


def test_trans_last_slice_is_unused() -> None:
    base = np.full((3, 2, 2), 0.5)
    other = base.copy()
    other[-1] = [[1.0, 0.0], [0.0, 1.0]]
    args = ([0.5, 0.5], [[0, 1], [1, 1]], 0, [0.2, 1.0], 3)
    a = MarkovDFATask(args[0], base, *args[1:])
    b = MarkovDFATask(args[0], other, *args[1:])
    assert a.exact_log_z() == b.exact_log_z()


def test_random_ensure_positive() -> None:
    for seed in range(20):
        task = MarkovDFATask.random(2, 3, 3, rng=seed, zero_reward_fraction=1.0, zero_trans_fraction=0.5)
        assert task.exact_log_z() > -np.inf
        assert np.count_nonzero(task.accept_reward) == 1
    task = MarkovDFATask.random(2, 3, 3, rng=0, zero_reward_fraction=1.0, ensure_positive=False)
    assert task.exact_log_z() == -np.inf


def test_enumerate_refuses_large_tasks() -> None:
    with pytest.raises(ValueError, match="2\\*\\*20"):
        MarkovDFATask.needle(2, 21, rng=0).enumerate_sequences()
    assert MarkovDFATask.needle(2, 20, rng=0).horizon == 20


def test_package_reexports() -> None:
    try:
        tasks = importlib.import_module("tiltsmc.tasks")
    except ImportError as error:
        pytest.skip(f"tiltsmc (with its compiled core) is not importable: {error}")
    assert tasks.MarkovDFATask is MarkovDFATask and tasks.BellmanError is BellmanError


# ----------------------------------------------------------------------------------------------------------
# validation

GOOD: dict[str, Any] = {
    "init": [0.5, 0.5],
    "trans": [[0.5, 0.5], [0.25, 0.75]],
    "dfa": [[0, 1], [1, 0]],
    "start": 0,
    "accept_reward": [1.0, 0.0],
    "horizon": 3,
}

BAD_ARGUMENTS = [
    ("init", [0.5, -0.5, 1.0], ValueError, "init: negative"),
    ("init", [np.nan, 1.0], ValueError, "init: .*NaN"),
    ("init", [np.inf, 1.0], ValueError, "init: .*infinite"),
    ("init", [0.5, 0.4], ValueError, "init: .*sum to 1"),
    ("init", [[0.5, 0.5]], ValueError, "init: .*1-D"),
    ("init", [], ValueError, "init: .*non-empty"),
    ("init", ["a", "b"], TypeError, "init: .*real"),
    ("init", [True, False], TypeError, "init: .*real"),
    ("trans", [[0.5, 0.5], [0.3, 0.3]], ValueError, "trans: .*sum to 1.*row 1"),
    ("trans", [[1.5, -0.5], [0.5, 0.5]], ValueError, "trans: negative"),
    ("trans", [[np.nan, 1.0], [0.5, 0.5]], ValueError, "trans: .*NaN"),
    ("trans", [[1.0, 0.0, 0.0]] * 3, ValueError, r"trans: expected shape \(V, V\)"),
    ("trans", np.full((2, 2, 2), 0.5), ValueError, r"trans: .*\(T, V, V\)"),
    ("trans", [0.5, 0.5], ValueError, "trans: expected shape"),
    ("dfa", [[0, 2], [1, 0]], ValueError, r"dfa: entries must lie in \[0, Q\)"),
    ("dfa", [[0, -1], [1, 0]], ValueError, "dfa: entries"),
    ("dfa", [[0.0, 1.0], [1.0, 0.0]], TypeError, "dfa: expected an integer"),
    ("dfa", [[0, 1, 1], [1, 0, 0]], ValueError, r"dfa: expected shape \(Q, V\)"),
    ("dfa", [0, 1], ValueError, r"dfa: expected shape \(Q, V\)"),
    ("start", 2, ValueError, r"start: expected a state in \[0, Q\)"),
    ("start", -1, ValueError, "start: "),
    ("start", 0.0, TypeError, "start: expected an integer"),
    ("start", True, TypeError, "start: .*bool"),
    ("accept_reward", [1.0, -1.0], ValueError, "accept_reward: .*>= 0"),
    ("accept_reward", [1.0, np.nan], ValueError, "accept_reward: .*NaN"),
    ("accept_reward", [1.0, np.inf], ValueError, "accept_reward: .*infinite"),
    ("accept_reward", [1.0, 0.0, 0.0], ValueError, r"accept_reward: expected shape \(Q,\)"),
    ("accept_reward", ["x", "y"], TypeError, "accept_reward: "),
    ("horizon", 0, ValueError, "horizon: expected T >= 1"),
    ("horizon", 2.5, TypeError, "horizon: expected an integer"),
]


def test_good_arguments_are_accepted() -> None:
    task = MarkovDFATask(**GOOD)
    assert task.exact_log_z() < 0
    # integer-typed probabilities and NumPy integer scalars are fine; sums within 1e-9 too
    MarkovDFATask([1, 0], [[1, 0], [0, 1]], np.array([[0, 1], [1, 0]], dtype=np.int8), np.int64(1), [1, 2], 1)
    MarkovDFATask([0.5 + 4e-10, 0.5], GOOD["trans"], GOOD["dfa"], 0, GOOD["accept_reward"], 2)


@pytest.mark.parametrize(("name", "value", "error", "match"), BAD_ARGUMENTS)
def test_bad_arguments(name: str, value: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        MarkovDFATask(**{**GOOD, name: value})


def test_sizes_that_cannot_be_held_in_memory_are_refused_before_any_draw(monkeypatch: Any) -> None:
    """numpy's MemoryError naming nothing: needle(10**7, 2) and random(10**7, 2, 2) (728 TiB of transitions),
    random(2, 2, 10**12) (an empty one, after the generator was drawn from: ensure_positive's exact tables),
    sample_exact(10**13); and the exact tables of a task built with a horizon they cannot fit."""
    from tiltsmc import _memory

    task = MarkovDFATask.random(3, 3, 4, rng=0)
    message = "need at least [^ ]+ bytes of memory, more than "
    cases = [
        (lambda g: MarkovDFATask.needle(10**7, 2, rng=g), r"^V: the arrays of a task with V = 10000000, "
         r"Q = 4 and T = 2 need at least 1\.6e\+15 bytes of memory, more than the [^ ]+ available$"),
        (lambda g: MarkovDFATask.needle(2, 10**12, rng=g), rf"^T: the arrays of a task with .*{message}"),
        (lambda g: MarkovDFATask.random(10**7, 2, 2, rng=g), rf"^V: .* {message}"),
        (lambda g: MarkovDFATask.random(2, 10**12, 2, rng=g), rf"^Q: .* {message}"),
        (lambda g: MarkovDFATask.random(2, 2, 10**12, rng=g), r"^T: the arrays of a task with V = 2, "
         rf"Q = 2 and T = 1000000000000 {message}"),
        (lambda g: task.sample_exact(10**13, rng=g), r"^num: 10000000000000 draws of T = 4 tokens \(V = 3\) "
         rf"{message}"),
    ]  # fmt: skip
    for call, match in cases:
        generator = np.random.default_rng(0)
        state = generator.bit_generator.state
        with pytest.raises(ValueError, match=match):
            call(generator)
        assert generator.bit_generator.state == state
    long = MarkovDFATask(**{**GOOD, "horizon": 10**12})  # its arrays are small: built
    tables = r"^horizon: the exact tables \(T \+ 1 levels of V x Q = 2 x 2, T = 1000000000000\) need at least"
    for reader in (long.exact_log_z, long.log_forward, long.log_v_star):
        with pytest.raises(ValueError, match=tables):
            reader()
    # the bound is the memory available (numpy's largest array where that cannot be read)
    monkeypatch.setattr(_memory, "available_memory", lambda: 2**20)
    with pytest.raises(ValueError, match=r"^V: .* more than the 1e\+06 available$"):
        MarkovDFATask.needle(300, 2, rng=0)  # two 300 x 300 tables of float64: 1.4 MB
    assert MarkovDFATask.needle(100, 2, rng=0).vocab_size == 100
    monkeypatch.setattr(_memory, "available_memory", lambda: None)
    with pytest.raises(ValueError, match=r"^V: .* more than any array can hold"):
        MarkovDFATask.random(2**31, 2, 2, rng=0)


def test_bad_method_arguments() -> None:
    task = MarkovDFATask(**GOOD)
    tables = task.log_v_star()
    with pytest.raises(ValueError, match="noise: "):
        task.twist_tables(-0.1)
    with pytest.raises(ValueError, match="noise: "):
        task.twist_tables(np.inf)
    with pytest.raises(TypeError, match="rng: "):
        task.twist_tables(0.1, rng="seed")
    with pytest.raises(TypeError, match=r"rng: .*bool"):
        task.sample_exact(2, rng=True)
    with pytest.raises(ValueError, match="num: "):
        task.sample_exact(-1)
    with pytest.raises(TypeError, match="num: "):
        task.sample_exact(2.0)
    with pytest.raises(ValueError, match=r"tables: expected T\+1"):
        task.bellman_error(tables[:-1])
    with pytest.raises(TypeError, match="tables: "):
        task.bellman_error(5)
    with pytest.raises(ValueError, match=r"tables\[2\]: expected shape"):
        task.bellman_error([*tables[:2], np.zeros((3, 2)), tables[3]])
    with pytest.raises(ValueError, match=r"tables\[1\]: .*NaN"):
        task.bellman_error([tables[0], np.full((2, 2), np.nan), *tables[2:]])
    with pytest.raises(ValueError, match=r"tables\[3\]: .*\+inf"):
        task.bellman_error([*tables[:3], np.full((2, 2), np.inf)])
    with pytest.raises(ValueError, match=r"tables\[0\]: "):
        task.bellman_error([np.nan, *tables[1:]])
    with pytest.raises(ValueError, match="sequences: "):
        task.sequence_log_prob([[0, 1]])
    with pytest.raises(ValueError, match="sequences: "):
        task.sequence_log_prob([[0, 1, 2]])
    with pytest.raises(TypeError, match="sequences: "):
        task.final_states([[0.0, 1.0, 0.0]])
    with pytest.raises(ValueError, match="V: "):
        MarkovDFATask.needle(0, 3)
    with pytest.raises(ValueError, match="T: "):
        MarkovDFATask.needle(2, 0)
    with pytest.raises(ValueError, match=r"^reward: "):
        MarkovDFATask.needle(2, 3, reward=-1.0)
    with pytest.raises(ValueError, match="Q: "):
        MarkovDFATask.random(2, 0, 3)
    with pytest.raises(ValueError, match="concentration: "):
        MarkovDFATask.random(2, 2, 3, concentration=0.0)
    with pytest.raises(ValueError, match="zero_trans_fraction: "):
        MarkovDFATask.random(2, 2, 3, zero_trans_fraction=1.5)


# ----------------------------------------------------------------------------------------------------------
# the Bellman quantities with zero potentials; the other tasks' argument checks


def _tiltsmc() -> Any:
    """The installed package (its diagnostics, TableTwist and the other tasks), or a skip."""
    try:
        return importlib.import_module("tiltsmc")
    except ImportError as error:
        pytest.skip(f"tiltsmc (with its compiled core) is not importable: {error}")


BELLMAN_FIELDS = ("per_step", "log_per_step", "gauge_per_step")
BELLMAN_SCALARS = ("eps", "gauge_eps", "ratio_bound", "positive_ratio_bound", "gauge_ratio_bound")


def assert_same_bellman(report: Any, expected: Any) -> None:
    """Every field of a Bellman report equal (to rounding) to another's: the task's exact DP against
    ``tiltsmc.diagnostics.bellman_error``'s exact method."""
    for name in BELLMAN_FIELDS:
        np.testing.assert_allclose(
            getattr(report, name), getattr(expected, name), rtol=1e-9, atol=1e-12, err_msg=name
        )
    for name in BELLMAN_SCALARS:
        assert getattr(report, name) == pytest.approx(getattr(expected, name), rel=1e-9, abs=1e-12), name


def _zeroed(tables: list[Any], fraction: float, seed: int) -> list[Any]:
    """``tables`` with a ``fraction`` of the entries of levels ``1..T-1`` set to ``-inf`` (zero values)."""
    gen = np.random.default_rng(seed)
    out = [tables[0]]
    for level in tables[1:-1]:
        out.append(np.where(gen.random(np.shape(level)) < fraction, -np.inf, level))
    return [*out, tables[-1]]


def test_positive_ratio_bound_keeps_the_smallest_positive_potential() -> None:
    """Potentials 2, 0.25 and 0 at step 2: L = inf, and the positive bound is max(2, 1/0.25) = 4 (the
    zero must not hide the smallest positive potential)."""
    uniform = np.full(3, 1 / 3)
    dfa = np.tile(np.arange(3), (3, 1))  # state = last token
    task = MarkovDFATask(uniform, np.tile(uniform, (3, 1)), dfa, 0, [2.0, 0.25, 0.0], 2)
    tables = [0.0, np.zeros((3, 3)), np.tile(task.log_reward, (3, 1))]  # Vh_1 = 1, Vh_2 = r
    report = task.bellman_error(tables)
    assert report.positive_ratio_bound == pytest.approx(4.0, rel=1e-12)
    assert report.ratio_bound == math.inf and report.gauge_ratio_bound == math.inf
    expected = brute_bellman(task, tables)
    for name in ("ratio_bound", "positive_ratio_bound", "gauge_ratio_bound"):
        assert getattr(report, name) == pytest.approx(expected[name], rel=1e-12), name


@pytest.mark.parametrize("kind", ["unguided", "zeroed"])
def test_bellman_error_with_zero_potentials_matches_brute_force(task: Any, kind: str) -> None:
    """As test_bellman_error_matches_brute_force, for twists whose zeros are not V*'s: the unguided twist
    (Vh_T = r has zeros where Vh_{T-1} = 1) and perturbed tables with entries set to zero."""
    T, shape = task.horizon, (task.vocab_size, task.num_states)
    if kind == "unguided":
        tables = [0.0] + [np.zeros(shape) for _ in range(T - 1)] + [np.tile(task.log_reward, (shape[0], 1))]
    else:
        tables = _zeroed(task.twist_tables(0.3, rng=9), 0.3, seed=T)
    report = task.bellman_error(tables)
    expected = brute_bellman(task, tables)
    np.testing.assert_allclose(report.per_step, expected["per_step"], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(report.gauge_per_step, expected["gauge"], rtol=1e-9, atol=1e-9)
    for name in ("ratio_bound", "positive_ratio_bound", "gauge_ratio_bound"):
        assert getattr(report, name) == pytest.approx(expected[name], rel=1e-9), name


# (T, time_varying, seed) of MarkovDFATask.random(3, 3, T, concentration=5, zero_trans_fraction=0.3,
# zero_reward_fraction=0.4): each has zero transitions and zero rewards, and every reachable summary of a
# prefix of length 1..T-1 has probability >= 0.02, so 1000 rollouts visit all of them (a miss < 1e-8)
DIAGNOSTICS_CASES = [(4, True, 0), (4, False, 2), (3, True, 6), (4, False, 8), (3, True, 9), (3, True, 16)]


@pytest.mark.parametrize(("T", "time_varying", "seed"), DIAGNOSTICS_CASES)
def test_bellman_error_equals_the_diagnostics_exact_method(T: int, time_varying: bool, seed: int) -> None:
    """Every field of MarkovDFATask.bellman_error against tiltsmc.diagnostics.bellman_error (exact method)
    on random tasks with zero transitions and zero rewards, for twists with zero potentials."""
    tiltsmc = _tiltsmc()
    from tiltsmc.tasks.models import TableTwist

    task = MarkovDFATask.random(
        3, 3, T, rng=seed, time_varying=time_varying, concentration=5.0, zero_trans_fraction=0.3,
        zero_reward_fraction=0.4,
    )  # fmt: skip
    assert (np.asarray(task.trans) == 0).any() and (task.accept_reward == 0).any()
    reachable = [np.exp(a[a > -np.inf]).min() for a in task.log_forward()[:-1]]
    assert min(reachable, default=1.0) >= 0.02
    twists = {
        "unguided": task.unguided(),
        "noisy": task.twist(0.4, rng=seed),
        "zeroed": TableTwist(task, _zeroed(task.twist_tables(0.4, rng=seed), 0.25, seed)),
        "zeroed V*": TableTwist(task, _zeroed(task.log_v_star(), 0.25, seed + 1)),
    }
    for name, twist in twists.items():
        report = task.bellman_error(twist)
        estimate = tiltsmc.diagnostics.bellman_error(
            task.policy(), twist, num_prefixes=1000, rng=seed, method="exact"
        )
        try:
            assert_same_bellman(report, estimate)
        except AssertionError as error:
            raise AssertionError(f"twist {name}: {error}") from None


def test_bellman_error_of_huge_log_ratios_is_infinite_not_an_overflow() -> None:
    task = MarkovDFATask.random(3, 3, 4, rng=0)
    report = task.bellman_error(task.twist_tables(600.0, rng=1))  # |log rho| and |log G| up to 1200
    assert report.eps == math.inf and report.positive_ratio_bound == math.inf
    assert np.all(np.isfinite(report.log_per_step))


def test_table_twist_checks_its_tables_as_bellman_error_does() -> None:
    from tiltsmc.tasks.models import TableTwist

    _tiltsmc()
    task = MarkovDFATask.random(3, 3, 4, rng=11)
    tables = task.log_v_star()
    bad: list[tuple[Any, type[Exception], str]] = [
        ([0.0] + [np.zeros((2, 2))] * 4, ValueError, r"^tables\[1\]: expected shape \(V, Q\)"),
        (tables[:-1], ValueError, r"^tables: expected T\+1"),
        ([math.nan, *tables[1:]], ValueError, r"^tables\[0\]: "),
        ([*tables[:2], np.full((3, 3), math.nan), *tables[3:]], ValueError, r"^tables\[2\]: .*NaN"),
        ([*tables[:4], np.full((3, 3), math.inf)], ValueError, r"^tables\[4\]: .*\+inf"),
        ([*tables[:3], np.zeros((3, 3, 1)), tables[4]], ValueError, r"^tables\[3\]: expected shape"),
        ([*tables[:1], [["a"] * 3] * 3, *tables[2:]], TypeError, r"^tables\[1\]: "),
        (5, TypeError, "^tables: "),
    ]
    for value, error, match in bad:
        with pytest.raises(error, match=match):
            TableTwist(task, value)
    with pytest.raises(TypeError, match=r"^task: "):
        TableTwist(None, tables)  # type: ignore[arg-type]
    given = [tables[0], *(np.array(level) for level in tables[1:])]
    twist = TableTwist(task, given)
    given[1][:] = 0.0  # the twist holds copies
    np.testing.assert_array_equal(twist.tables[1], tables[1])
    assert task.bellman_error(twist).eps <= 1e-9


def test_twist_noise_beyond_the_doubles_is_refused() -> None:
    task = MarkovDFATask.random(3, 3, 4, rng=11)
    for noise in (1e308, 1.7e308, math.nan):
        with pytest.raises(ValueError, match=r"^noise: "):
            task.twist_tables(noise, rng=0)
    with pytest.raises(ValueError, match=r"^noise: "):
        task.twist(1e308, rng=0)
    tables = task.twist_tables(1e300, rng=0)  # the largest allowed: finite log-values
    assert all(np.all(np.abs(np.asarray(level)[np.asarray(level) > -np.inf]) <= 1e301) for level in tables)


def test_random_flags_must_be_bools() -> None:
    with pytest.raises(TypeError, match=r"^time_varying: expected a bool"):
        MarkovDFATask.random(3, 2, 3, rng=0, time_varying="no")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^ensure_positive: expected a bool"):
        MarkovDFATask.random(3, 2, 3, rng=0, ensure_positive=1)  # type: ignore[arg-type]
    assert MarkovDFATask.random(3, 2, 3, rng=0, time_varying=np.bool_(True)).time_varying


def test_hard_instance_refuses_rewards_beyond_the_doubles() -> None:
    from tiltsmc.tasks import hard_instance

    _tiltsmc()
    with pytest.raises(ValueError, match=r"^m: .*m <= 1022 for a = 2\b"):
        hard_instance(2, 1100, rng=0)
    with pytest.raises(ValueError, match=r"^m: .*m <= 1 for a = 1e\+155"):
        hard_instance(1e155, 2, rng=0, branching=2)
    with pytest.raises(ValueError, match=r"^a: "):
        hard_instance(1e308, 1, rng=0, branching=2)
    with pytest.raises(ValueError, match=r"^a: "):
        hard_instance(10**400, 1, rng=0, branching=2)
    with pytest.raises(ValueError, match=r"^m: "):
        hard_instance(2, 10**400, rng=0)
    # a^m = 2^1023 is finite but a^-m = 2^-1023 subnormal: refused; 2^1012 and 2^-1012 are normal
    with pytest.raises(ValueError, match=r"^m: .*m <= 92 for a = 2048"):
        hard_instance(2.0**11, 93, rng=0, branching=2)
    hard = hard_instance(2.0**11, 92, rng=0, branching=2)
    assert hard.task.accept_reward.min() == 2.0**-1012 and hard.task.accept_reward.max() == 2.0**1012


def test_hard_instance_figures_do_not_overflow() -> None:
    from tiltsmc.tasks import hard_instance

    _tiltsmc()
    # B = 10 >> a: u's share of the target is about (a/B)^(2m), e^-713.5 (old: OverflowError)
    m, a, B = 155, 1.001, 10
    hard = hard_instance(a, m, rng=0, branching=B)
    x = 2 * m * (math.log(B) - math.log(a)) + math.log1p(-(B ** (-2.0 * m)))
    assert hard.target_mass == pytest.approx(math.exp(-x), rel=1e-9)
    assert hard.target_mass > 0.0
    small = hard_instance(2, 1, rng=0)
    for bad in ("0.5", None, True):
        with pytest.raises(TypeError, match=r"^probability: "):
            small.draws_to_hit(bad)  # type: ignore[arg-type]
    for bad_value in (0.0, 1.0, math.nan):
        with pytest.raises(ValueError, match=r"^probability: "):
            small.draws_to_hit(bad_value)
    # B^-2m far below the doubles: the count in logs, B^2m ln 2 (finite) or inf
    assert hard_instance(2, 500, rng=0).draws_to_hit(0.5) == pytest.approx(2.0**1000 * math.log(2), rel=1e-12)
    assert hard_instance(2, 600, rng=0).draws_to_hit(0.5) == math.inf


def test_theorem_bound_beyond_the_doubles_is_infinite() -> None:
    from tiltsmc.tasks.exact_laws import theorem_5_1_bound

    _tiltsmc()
    assert theorem_5_1_bound(1e60, 0.0, 2, 10) == math.inf
    assert theorem_5_1_bound(2.0, 0.5, 600, 10) == math.inf
    assert theorem_5_1_bound(2.0, 0.5, 2, 10) == pytest.approx(2.0**6 * 2 * 1.5**6 / 20)


# arithmetic chains

ARITHMETIC_BAD_CALLS: list[tuple[str, Any, type[Exception], str]] = [
    ("make_problems", ((3, 1), {"max_value": 150, "start": (100, 140)}), ValueError, r"^max_value: .*\.\.99"),
    ("make_problems", ((3, 1), {"max_operand": 15}), ValueError, r"^max_operand: .*1\.\.9"),
    ("make_problems", ((3, 1), {"max_operand": "3"}), TypeError, "^max_operand: "),
    ("make_problems", ((3, 1), {"max_value": 9.5}), TypeError, "^max_value: "),
    ("make_problems", ((3, 1), {"start": (5.7, 9.2)}), TypeError, "^start: "),
    ("make_problems", ((3, 1), {"start": (5,)}), ValueError, "^start: "),
    ("make_problems", ((3, 1), {"start": 5}), TypeError, "^start: "),
    ("make_problems", ((3, 1), {"start": (True, 9)}), TypeError, "^start: "),
    ("make_problems", ((3, 1), {"start": (50, 9)}), ValueError, "^start: "),
    ("make_problems", ((3, "2"), {}), TypeError, "^count: "),
    ("make_problems", ((3, 2.0), {}), TypeError, "^count: "),
    ("make_problems", ((3, 1), {"rng": "seed"}), TypeError, "^rng: "),
    ("verify", ((None, "x"), {}), TypeError, "^prompt: "),
    ("verify", (("12 a+3\n", None), {}), TypeError, "^text: "),
    (
        "verify",
        (("10 " + " ".join(f"{c}+1" for c in "abcdefghijklmnopq") + "\n", ""), {}),
        ValueError,
        "^prompt: ",
    ),
    ("verify", (("1\u00b2 a+1\n", ""), {}), ValueError, "^prompt: "),
    ("verify", (("12 a+\u00b2\n", ""), {}), ValueError, "^prompt: "),
    ("parse_answer", ((None,), {}), TypeError, "^text: "),
    ("format_line", ((16, 10, "+", 1, 11), {}), ValueError, "^index: "),
]


@pytest.mark.parametrize(("function", "arguments", "error", "match"), ARITHMETIC_BAD_CALLS)
def test_arithmetic_bad_arguments(function: str, arguments: Any, error: type[Exception], match: str) -> None:
    _tiltsmc()
    from tiltsmc.tasks import arithmetic

    args, kwargs = arguments
    with pytest.raises(error, match=match):
        getattr(arithmetic, function)(*args, **kwargs)


def test_arithmetic_unreadable_prompts_fail_alike() -> None:
    """A prompt of more than MAX_STEPS operations is refused as any other unreadable prompt (ValueError
    naming ``prompt``; an IndexError before), so a server answers it as it answers ``"hello\\n"``."""
    _tiltsmc()
    from tiltsmc.tasks import arithmetic

    long = "10 " + " ".join(f"{label}+1" for label in "abcdefghijklmnopq") + "\n"
    for prompt in ("hello\n", long):
        with pytest.raises(ValueError, match=r"^prompt: not an arithmetic-chain prompt"):
            arithmetic.verify(prompt, "")
    with pytest.raises(ValueError, match=r"^operations: "):
        _ = arithmetic.Problem(10, (("+", 1),) * 17).prompt


def test_arithmetic_problems_always_verify_with_their_own_answer() -> None:
    _tiltsmc()
    from tiltsmc.tasks import arithmetic

    settings: list[dict[str, Any]] = [
        {},
        {"start": (0, 99), "max_value": 99, "max_operand": 9},
        {"start": (np.int64(0), np.int64(9)), "max_value": np.int64(9), "max_operand": np.int64(9)},
        {"start": [1, 1], "max_value": 1, "max_operand": 1},
    ]
    for kwargs in settings:
        for problem in arithmetic.make_problems(arithmetic.MAX_STEPS, 30, rng=1, **kwargs):
            assert arithmetic.verify(problem.prompt, problem.solution()) == 1.0
            assert arithmetic.parse_answer(problem.solution()) == problem.answer


def test_chat_arithmetic_bad_arguments() -> None:
    _tiltsmc()
    from tiltsmc.tasks import chat_arithmetic as ca
    from tiltsmc.tasks.arithmetic import Problem

    problem = ca.make_problems(2, 1, rng=0)[0]
    with pytest.raises(ValueError, match=r"^size: expected one of"):
        ca.examples(3, "huge")
    with pytest.raises(ValueError, match=r"^size: expected one of"):
        ca.messages(problem, "huge")
    with pytest.raises(TypeError, match=r"^size: "):
        ca.make_problems(2, 1, size=["small"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^size: "):
        ca.examples(2, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^problem: "):
        ca.messages(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^problem: "):
        ca.user_message("Start with 5.")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^problem: "):
        ca.user_message(Problem(5, ()))
    with pytest.raises(TypeError, match=r"^count: "):
        ca.make_problems(2, "1", size="counting")  # type: ignore[arg-type]
    for times in (0, 1, 17, 10**9):
        with pytest.raises(ValueError, match=r"^question: "):
            ca.problem_of(f"Start with 5. Add 2, {times} times. Write one line per step")
    chain = ", then ".join(["add 1"] * 17)
    with pytest.raises(ValueError, match=r"^question: "):
        ca.problem_of(f"Start with 5. {chain[0].upper()}{chain[1:]}. Work it out")
    with pytest.raises(ValueError, match=r"^question: "):
        ca.problem_of("Start with " + "9" * 5000 + ". Add 2, 3 times. Write one")
    assert ca.problem_of(ca.user_message(Problem(5, (("+", 2),) * 16))) == Problem(5, (("+", 2),) * 16)


def test_arithmetic_verify_names_prompt_for_a_problem_of_too_many_operations() -> None:
    """A ``Problem`` of more than MAX_STEPS operations is refused as a prompt string of as many is
    (ValueError naming ``prompt``, the argument passed; ``index: ...`` of a helper before)."""
    _tiltsmc()
    from tiltsmc.tasks import arithmetic

    with pytest.raises(ValueError, match=r"^prompt: .*17 operations \(at most 16"):
        arithmetic.verify(arithmetic.Problem(50, (("+", 1),) * 17), "x")
    longest = arithmetic.Problem(50, (("+", 1),) * arithmetic.MAX_STEPS)
    assert arithmetic.verify(longest, longest.solution()) == 1.0
    assert arithmetic.verify(longest, "x") == 0.0


def test_arithmetic_verify_refuses_a_problem_its_prompt_cannot_write() -> None:
    """A ``Problem`` is verified only when it is one of the task's prompts, as a str prompt is: no
    operations (whose empty solution scored an empty answer 1.0, whatever the start), a start outside
    0..99, or an operation that is not ``+``/``-`` a digit are refused (ValueError naming ``prompt``)."""
    _tiltsmc()
    from tiltsmc.tasks import arithmetic

    with pytest.raises(ValueError, match=r"^prompt: .*no operations"):
        arithmetic.verify(arithmetic.Problem(5, ()), "")
    with pytest.raises(ValueError, match=r"^prompt: "):
        arithmetic.verify("05\n", "")
    for problem in (
        arithmetic.Problem(100, (("+", 1),)),
        arithmetic.Problem(-1, (("+", 1),)),
        arithmetic.Problem(5, (("*", 1),)),
        arithmetic.Problem(5, (("+", 10),)),
    ):
        with pytest.raises(ValueError, match=r"^prompt: not a problem of this task"):
            arithmetic.verify(problem, problem.solution())
    smallest = arithmetic.Problem(0, (("-", 0),))
    assert arithmetic.verify(smallest, smallest.solution()) == 1.0
    assert arithmetic.verify(smallest, "") == 0.0


# chat arithmetic: a line is right when it is the line solution() writes, up to spaces

CHAT_PROBLEM_SIZES = ("small", "two-digit", "counting")
# check as it read lines before they were compared as text: each number converted with int()
_LINE_READ_AS_INTS = re.compile(r"^\s*(\d+)\s*([+-])\s*(\d+)\s*=\s*(-?\d+)\s*$")


def _check_reading_ints(problem: Any, text: str) -> tuple[int, bool]:
    """``(right_steps, complete)`` of ``chat_arithmetic.check`` as it was when it read each number with
    ``int`` (and gave no operand a ``-``). On an answer whose numbers are all written as ``str`` writes
    an int, to a problem whose running values are all >= 0 (every problem ``make_problems`` makes), the
    reading as text must give the same verdict."""
    from tiltsmc.tasks import chat_arithmetic as ca

    lines = [line for line in ca._strip_end(text).split("\n") if line.strip()]
    values = problem.values
    right = 0
    for t, (sign, digit) in enumerate(problem.operations):
        if t >= len(lines):
            break
        match = _LINE_READ_AS_INTS.match(lines[t])
        if match is None:
            break
        if (int(match[1]), match[2], int(match[3]), int(match[4])) != (values[t], sign, digit, values[t + 1]):
            break
        right += 1
    return right, right == problem.num_steps and len(lines) == problem.num_steps


def _chat_verdict(problem: Any, text: str) -> tuple[int, bool]:
    from tiltsmc.tasks import chat_arithmetic as ca

    checked = ca.check(problem, text)
    assert ca.verify(problem, text) == float(checked.complete)
    return checked.right_steps, checked.complete


# the ways a line of a well-formed answer is written: spaces around its parts vary, numbers are plain ints
CHAT_LINE_LAYOUTS = ("{} {} {} = {}", "{}{}{}={}", "  {} {}  {} =  {}  ", "{}\t{} {}= {}\r")


def _corrupted_answers(problem: Any) -> list[str]:
    """Well-formed answers to ``problem``: its solution, written with other spacing, blank lines and end
    tokens, and with one line corrupted (every number off by one or replaced, the sign flipped), dropped,
    repeated, cut short, or followed by text. Every number is written as ``str`` writes an int."""
    from tiltsmc.tasks import chat_arithmetic as ca

    values = problem.values
    steps = [(values[t], sign, digit, values[t + 1]) for t, (sign, digit) in enumerate(problem.operations)]
    lines = [ca.step_line(*step) for step in steps]
    answers = ["\n".join(lines), "\n".join(lines) + "\n", "\n\n" + "\n\n".join(lines) + "\n<|im_end|>"]
    answers += ["\n".join(layout.format(*step) for step in steps) for layout in CHAT_LINE_LAYOUTS]
    answers += ["\n".join(lines) + end for end in ("<|im_end|>", "<eos>\n", "\nThe answer is 71", " 71")]
    for t, (before, sign, digit, after) in enumerate(steps):
        flipped = "-" if sign == "+" else "+"
        wrong_lines = [
            ca.step_line(before + 1, sign, digit, after),
            ca.step_line(before, sign, digit + 1, after),
            ca.step_line(before, sign, digit, after - 1),
            ca.step_line(before, flipped, digit, after),
            ca.step_line(-before, sign, digit, after),
            ca.step_line(before, sign, digit, -after),
            ca.step_line(10**40 + before, sign, digit, after),
            ca.step_line(before, sign, digit, 10**40 + after),
            f"{before} {sign} {digit} =",
            f"{before} {sign} {digit} = {after}.",
            f"{before} {sign} {digit} = {after} {after}",
        ]
        for wrong in wrong_lines:
            answers.append("\n".join([*lines[:t], wrong, *lines[t + 1 :]]))
        answers.append("\n".join(lines[:t] + lines[t + 1 :]))
        answers.append("\n".join([*lines[: t + 1], lines[t], *lines[t + 1 :]]))
        answers.append("\n".join(lines[: t + 1]))
    return answers


def test_chat_arithmetic_verdicts_on_well_formed_answers_are_unchanged() -> None:
    """Every problem ``make_problems`` makes (each size, 1..16 steps): its solution and its corrupted
    solutions get the verdict of reading the numbers as ints, so comparing the lines as text changed
    no well-formed answer's reward."""
    _tiltsmc()
    from tiltsmc.tasks import chat_arithmetic as ca

    for size in CHAT_PROBLEM_SIZES:
        for num_steps in range(1, 17):
            for problem in ca.make_problems(num_steps, 3, rng=[num_steps, 7], size=size):
                assert _chat_verdict(problem, ca.solution(problem)) == (num_steps, True)
                for answer in _corrupted_answers(problem):
                    assert _chat_verdict(problem, answer) == _check_reading_ints(problem, answer), answer


@st.composite
def _chat_problem_and_well_formed_answer(draw: Any) -> tuple[Any, str]:
    """A problem of ``make_problems`` and an answer of lines ``a ± d = c`` (or other text) whose numbers
    are near the right ones or anywhere, each written as ``str`` writes an int."""
    from tiltsmc.tasks import chat_arithmetic as ca

    size = draw(st.sampled_from(CHAT_PROBLEM_SIZES))
    num_steps = draw(st.integers(1, 16))
    (problem,) = ca.make_problems(num_steps, 1, rng=draw(st.integers(0, 2**32 - 1)), size=size)
    values = problem.values

    def number(right: int) -> int:
        """Mostly the right number, else one off it, its negative, or any int."""
        if draw(st.integers(0, 39)) > 0:
            return right
        return draw(st.one_of(st.sampled_from((right + 1, right - 1, -right)), st.integers()))

    lines = []
    length = num_steps if draw(st.booleans()) else draw(st.integers(0, num_steps + 2))
    for t in range(length):
        if t < num_steps and draw(st.integers(0, 39)) > 0:
            sign, digit = problem.operations[t]
            before, after = values[t], values[t + 1]
        else:
            sign, digit, before, after = draw(st.sampled_from("+-")), 1, 0, 0
        layout = draw(st.sampled_from(CHAT_LINE_LAYOUTS))
        sign = sign if draw(st.integers(0, 39)) > 0 else draw(st.sampled_from("+-"))
        line = layout.format(number(before), sign, number(digit), number(after))
        lines.append(line if draw(st.integers(0, 39)) > 0 else draw(st.text(max_size=8)))
    end = draw(st.sampled_from(("", "\n", "<|im_end|>", "\n\n<eos>", "\nDone.")))
    return problem, "\n".join(lines) + end


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(_chat_problem_and_well_formed_answer())
def test_chat_arithmetic_verdicts_on_random_well_formed_answers_are_unchanged(drawn: tuple[Any, str]) -> None:
    _tiltsmc()
    problem, answer = drawn
    assert _chat_verdict(problem, answer) == _check_reading_ints(problem, answer)


def test_chat_arithmetic_verifier_never_raises_on_long_numbers() -> None:
    """A number of thousands of digits in an answer (past ``int``'s 4300-digit limit for a str) is a wrong
    line, read as text: a verifier returns 0 for a wrong answer, never raises (it ran ``int`` on it)."""
    _tiltsmc()
    from tiltsmc.tasks import chat_arithmetic as ca
    from tiltsmc.tasks.arithmetic import Problem

    problem = Problem(57, (("+", 8), ("-", 3)))
    long = "6" * 5000
    for answer in (
        long + " + 8 = 65\n65 - 3 = 62",
        "57 + " + long + " = 65\n65 - 3 = 62",
        "57 + 8 = " + long,
        "57 + 8 = 65\n65 - 3 = -" + long,
        "57 + 8 = 65\n-" + long + " - 3 = 62",
    ):
        assert ca.verify(problem, answer) == 0.0
        assert ca.right_so_far(problem, answer) == 0.0
        assert ca.right_so_far(problem, answer, ended=True) == 0.0
        assert ca.verify_chat(ca.messages(problem), answer) == 0.0
    assert ca.check(problem, "57 + 8 = 65\n65 - 3 = " + long).right_steps == 1


def _chat_answers() -> Any:
    """Answers of up to 6 lines, each a right line, any text, or a line ``a ± d = c`` whose numbers are
    right ones, near ones, runs of digits (ASCII or other scripts', some past ``int``'s 4300-digit limit)
    or any text; then an end (an end token, text)."""
    runs = st.builds(
        lambda sign, digit, count: sign + digit * count,
        st.sampled_from(("", "", "-")),
        st.sampled_from("109\u0665\uff15"),
        st.one_of(st.integers(1, 6), st.integers(4290, 6000)),
    )
    symbols = "0123456789+-= \n\t\r\u00a0\u0665\uff15\u00b2"
    numbers = st.one_of(
        st.sampled_from(("57", "8", "65", "3", "62", "2", "5", "-3", "1", "-2", "0", "-0", "057")),
        runs,
        st.text(alphabet=symbols, max_size=6),
    )
    step_lines = st.builds("{} {} {} = {}".format, numbers, st.sampled_from("+-"), numbers, numbers)
    right_lines = st.sampled_from(("57 + 8 = 65", "65 - 3 = 62", "2 - 5 = -3", "-3 + 1 = -2"))
    lines = st.one_of(step_lines, right_lines, st.text(alphabet=symbols, max_size=30), st.text(max_size=30))
    ends = st.one_of(st.sampled_from(("", "\n", "<|im_end|>", "\n<eos>")), st.text(max_size=8))
    return st.builds(lambda body, end: "\n".join(body) + end, st.lists(lines, max_size=6), ends)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(_chat_answers(), st.booleans())
def test_chat_arithmetic_verifier_never_raises_on_any_text(text: str, below_zero: bool) -> None:
    """No str makes the verifier (or ``check``, ``right_so_far``, ``verify_chat``) raise: each returns a
    verdict."""
    _tiltsmc()
    from tiltsmc.tasks import chat_arithmetic as ca
    from tiltsmc.tasks.arithmetic import Problem

    problem = Problem(2, (("-", 5), ("+", 1))) if below_zero else Problem(57, (("+", 8), ("-", 3)))
    checked = ca.check(problem, text)
    assert 0 <= checked.right_steps <= problem.num_steps
    assert ca.verify(problem, text) in (0.0, 1.0)
    assert ca.right_so_far(problem, text) in (0.0, 1.0)
    assert ca.right_so_far(problem, text, ended=True) in (0.0, 1.0)
    assert ca.verify_chat(ca.messages(problem), text) == ca.verify(problem, text)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.text(), st.booleans())
def test_chat_arithmetic_verifier_returns_a_verdict_for_arbitrary_text(text: str, below_zero: bool) -> None:
    """Any text at all (hypothesis' ``text``) gets a verdict of 0.0 or 1.0."""
    _tiltsmc()
    from tiltsmc.tasks import chat_arithmetic as ca
    from tiltsmc.tasks.arithmetic import Problem

    problem = Problem(2, (("-", 5), ("+", 1))) if below_zero else Problem(57, (("+", 8), ("-", 3)))
    assert ca.verify(problem, text) in (0.0, 1.0)
    assert ca.right_so_far(problem, text) in (0.0, 1.0)


def test_chat_arithmetic_spaces_are_ascii_spaces_tabs_and_carriage_returns() -> None:
    """ "Up to spaces" means ASCII space, tab and carriage return (a ``"\\r\\n"`` line end), around a
    line's parts, in blank lines and at the end; a no-break, ideographic or other Unicode space makes a
    line wrong (``\\s`` took them) and the answer incomplete."""
    _tiltsmc()
    from tiltsmc.tasks import chat_arithmetic as ca
    from tiltsmc.tasks.arithmetic import Problem

    problem = Problem(57, (("+", 8), ("-", 3)))
    assert ca.verify(problem, "57\t+ 8 =\t65\r\n \t\r\n65 - 3 = 62\r\n\t") == 1.0
    for space in ("\u00a0", "\u3000", "\u2003", "\x0b", "\x0c", "\x1c", "\u0085"):
        assert ca.verify(problem, f"57{space}+ 8 = 65\n65 - 3 = 62") == 0.0, repr(space)
        assert ca.check(problem, f"57 + 8 = 65\n65 - 3 = 62{space}").right_steps == 1, repr(space)
        assert ca.verify(problem, f"57 + 8 = 65\n{space}\n65 - 3 = 62") == 0.0, repr(space)
        assert ca.verify(problem, f"57 + 8 = 65\n65 - 3 = 62\n{space}") == 0.0, repr(space)
        assert ca.right_so_far(problem, f"57 + 8 = 65\n{space}") == 0.0, repr(space)


def test_chat_arithmetic_refuses_numbers_solution_does_not_write() -> None:
    """A line is right only with its numbers written as ``solution`` writes them (ASCII digits, as
    ``tiltsmc.tasks.arithmetic`` reads them; no leading zeros; no ``-0``), up to spaces."""
    _tiltsmc()
    from tiltsmc.tasks import chat_arithmetic as ca
    from tiltsmc.tasks.arithmetic import Problem

    problem = Problem(57, (("+", 8), ("-", 3), ("+", 9)))
    rest = "\n65 - 3 = 62\n62 + 9 = 71"
    assert ca.verify(problem, "57 + 8 = 65" + rest) == 1.0
    assert ca.verify(problem, " 57+8 =65 " + rest) == 1.0
    for first_line in (
        "057 + 8 = 65",
        "57 + 08 = 65",
        "57 + 8 = 065",
        "057 + 08 = 065",
        "\uff15\uff17 + 8 = 65",  # fullwidth digits
        "\u0665\u0667 + 8 = 65",  # Arabic-Indic digits
        "57 + \u0668 = 65",
        "57 + 8 = \u0666\u0665",
        "+57 + 8 = 65",
        "57 + +8 = 65",
        "57 + -8 = 49",
    ):
        assert ca.verify(problem, first_line + rest) == 0.0, first_line
        assert ca.check(problem, first_line + rest).right_steps == 0, first_line
    to_zero = Problem(5, (("-", 5), ("+", 3)))
    assert ca.verify(to_zero, "5 - 5 = 0\n0 + 3 = 3") == 1.0
    assert ca.verify(to_zero, "5 - 5 = -0\n0 + 3 = 3") == 0.0
    assert ca.check(to_zero, "5 - 5 = 0\n-0 + 3 = 3").right_steps == 1
    assert ca.check(to_zero, "5 - 5 = 0\n00 + 3 = 3").right_steps == 1


def test_chat_arithmetic_chains_below_zero_verify() -> None:
    """A chain whose running value goes below 0 (``problem_of`` reads such a question; ``make_problems``
    makes none) verifies with its own solution: a line's first operand may be negative."""
    _tiltsmc()
    from tiltsmc.tasks import chat_arithmetic as ca
    from tiltsmc.tasks.arithmetic import Problem

    problem = Problem(2, (("-", 5), ("+", 1), ("-", 4)))
    assert ca.problem_of(ca.user_message(problem)) == problem
    answer = ca.solution(problem)
    assert answer == "2 - 5 = -3\n-3 + 1 = -2\n-2 - 4 = -6"
    assert ca.verify(problem, answer) == 1.0
    assert ca.verify(problem, " -3 +1 = -2 ".join(["2 - 5 = -3\n", "\n-2 - 4 = -6"])) == 1.0
    assert ca.verify_chat(ca.messages(problem), answer) == 1.0
    assert ca.right_so_far(problem, "2 - 5 = -3\n-3 + 1 = -2\n") == 1.0
    assert ca.check(problem, "2 - 5 = -3\n3 + 1 = -2").right_steps == 1  # the "-" of -3 dropped
    assert ca.check(problem, "2 - 5 = 3\n").right_steps == 0
    assert ca.check(problem, "2 - 5 = -3\n-3 + 1 = -2\n-2 - 4 = 6").right_steps == 2


# the Markov test-bed's models


def test_markov_policy_reads_a_batch_mixing_finished_and_unfinished_trajectories() -> None:
    """The serving engine joins batches started at different times (``supports_engine``): a batch with
    finished full-horizon trajectories beside unfinished ones gets each unfinished one's next law and
    extends only those; an unfinished trajectory of the full horizon is still refused."""
    _tiltsmc()
    from tiltsmc.models.particles import Particles

    task = MarkovDFATask.random(3, 2, 3, rng=0)
    policy = task.policy()
    rng = np.random.default_rng(0)
    done = Particles.empty([(), ()], 2, task.horizon)
    for _ in range(task.horizon):
        policy.propose(done, rng)
    started = Particles.empty([()], 2, task.horizon)
    policy.propose(started, rng)
    joined = Particles(
        prompts=[(), ()],
        tokens=np.concatenate([done.tokens[:1], started.tokens]),
        lengths=np.concatenate([done.lengths[:1], started.lengths]),
        finished=np.concatenate([done.finished[:1], started.finished]),
    )
    log_probs = policy.next_log_probs(joined)
    assert log_probs.shape == (2, 2, task.vocab_size)
    for i in range(2):
        previous = joined.tokens[1, i, 0]
        np.testing.assert_allclose(log_probs[1, i], task.log_trans_at(1)[previous])
    policy.propose(joined, rng)
    assert joined.lengths.tolist() == [[3, 3], [2, 2]]
    np.testing.assert_array_equal(joined.tokens[0], done.tokens[0])

    overfull = Particles.empty([()], 2, task.horizon)
    overfull.lengths[:] = [[task.horizon, 1]]
    with pytest.raises(ValueError, match=r"^particles: .*full horizon"):
        policy.next_log_probs(overfull)


def test_markov_policy_refuses_token_limits_other_than_the_horizon() -> None:
    """A sampler's ``max_new_tokens`` below the horizon ended the trajectories there and scored them with
    the twist's level at that length as if it were the reward: rejection on ``needle(2, 4)`` with the
    unguided twist returned 2-token prefixes and ``log Z = 0`` (exactly ``-4 ln 2``). The policy takes the
    samplers' token limits and refuses any other than the horizon (ValueError naming ``max_new_tokens``)
    before anything is drawn; the horizon itself (or None) is the run without a limit, bitwise."""
    tiltsmc = _tiltsmc()
    task = MarkovDFATask.needle(2, 4, rng=0)
    policy, unguided, twist = task.policy(), task.unguided(), task.twist()
    calls: dict[str, Any] = {
        "smc": lambda **kw: tiltsmc.smc(policy, twist, num_particles=8, rng=0, **kw),
        "rejection": lambda **kw: tiltsmc.rejection(policy, unguided, bound=1.0, num_samples=2, rng=0, **kw),
        "best_of_n": lambda **kw: tiltsmc.best_of_n(policy, twist, n=4, rng=0, **kw),
        "sp_gsmc": lambda **kw: tiltsmc.sp_gsmc(policy, twist, pool_size=4, rng=0, **kw),
    }
    for name, call in calls.items():
        for limit in (1, 2, 3, 5):
            with pytest.raises(
                ValueError, match=rf"^max_new_tokens: .*horizon = 4 tokens.*got a limit of {limit}"
            ):
                call(max_new_tokens=limit)
        full, plain = call(max_new_tokens=4), call()
        np.testing.assert_array_equal(full.log_z, plain.log_z, err_msg=name)
        np.testing.assert_array_equal(full.samples[0], plain.samples[0], err_msg=name)
        assert np.shape(plain.samples[0])[-1] == 4
    with tiltsmc.Engine(policy, twist) as engine:
        short = engine.submit((), "smc", num_particles=4, rng=0, max_new_tokens=2)
        whole = engine.submit((), "smc", num_particles=4, rng=0, max_new_tokens=4)
        with pytest.raises(ValueError, match=r"^max_new_tokens: "):
            short.result(timeout=30)
        assert np.shape(whole.result(timeout=30).samples[0]) == (4, 4)
    # the policy's own start: one limit per prompt, each None or the horizon
    assert policy.start_takes_token_limits is True
    assert policy.start([(), None], 3, max_new_tokens=[None, 4]).tokens.shape == (2, 3, 4)
    for limits, match in (
        ([2], "got a limit of 2"),
        ([4, 4], r"one per prompt \(1\), got 2"),
        ([True], "True"),
    ):
        with pytest.raises(ValueError, match=rf"^max_new_tokens: .*{match}"):
            policy.start([()], 3, max_new_tokens=limits)
    # the opt-in for tests of the engine's mechanics: the trajectories end at the limit
    short = tiltsmc.smc(task.policy(allow_token_limits=True), twist, num_particles=4, rng=0, max_new_tokens=2)
    assert np.shape(short.samples[0]) == (4, 2)
    with pytest.raises(TypeError, match=r"^allow_token_limits: expected a bool"):
        task.policy(allow_token_limits=1)  # type: ignore[arg-type]


def test_table_twist_refuses_a_policy_of_another_chain() -> None:
    """A twist of one task with another task's policy gave a wrong ``log Z`` without a word (horizons 3 and
    5), or numpy's IndexError (another vocabulary). The samplers' ``check_policy`` hook refuses a policy of
    another Markov chain (ValueError naming ``reward``); a task with the same chain and another reward, or
    a time-varying copy of a homogeneous chain, is the same chain, and a wrapper that says neither its task
    nor its vocabulary is taken as it comes."""
    tiltsmc = _tiltsmc()
    a = MarkovDFATask.random(2, 2, 3, rng=1, zero_reward_fraction=0)
    longer = MarkovDFATask(a.init, a.trans, a.dfa, a.start, a.accept_reward * 0 + 0.5, 5)
    wider = MarkovDFATask.random(3, 2, 3, rng=1)
    other_init = MarkovDFATask([0.25, 0.75], a.trans, a.dfa, a.start, a.accept_reward, 3)
    other_trans = MarkovDFATask(a.init, a.trans[::-1], a.dfa, a.start, a.accept_reward, 3)
    cases = [
        (a.policy(), longer.twist(), "horizon 3, not 5"),
        (a.policy(), wider.twist(), "vocab_size 2, not 3"),
        (MarkovDFATask.random(3, 2, 5, rng=1).policy(), a.twist(), "vocab_size 3, not 2"),
        (other_init.policy(), a.twist(), "another init"),
        (other_trans.policy(), a.twist(), "other transitions"),
    ]
    for policy, twist, difference in cases:
        with pytest.raises(
            ValueError, match=rf"^reward: the twist is of .*another Markov chain \({difference}\)"
        ):
            tiltsmc.smc(policy, twist, num_particles=10, rng=0)
        with pytest.raises(ValueError, match=r"^reward: "):
            twist.check_policy(policy)
    same_chain = MarkovDFATask(a.init, a.trans, a.dfa, a.start, a.accept_reward * 2.0, 3)
    tiled = MarkovDFATask(a.init, np.tile(a.trans, (3, 1, 1)), a.dfa, a.start, a.accept_reward, 3)
    assert tiled.time_varying
    for policy in (a.policy(), same_chain.policy(), tiled.policy()):
        a.twist().check_policy(policy)
    result = tiltsmc.smc(same_chain.policy(), a.twist(), num_particles=10, rng=0)
    np.testing.assert_array_equal(
        result.log_z, tiltsmc.smc(a.policy(), a.twist(), num_particles=10, rng=0).log_z
    )

    class Wrapper:  # a user's wrapper of the task's policy that tells neither its task nor its vocabulary
        token_level = True

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def start(self, prompts: Any, num_particles: int) -> Any:
            return self.inner.start(prompts, num_particles)

        def propose(self, particles: Any, rng: Any) -> Any:
            return self.inner.propose(particles, rng)

    a.twist().check_policy(Wrapper(a.policy()))
    told = Wrapper(wider.policy())
    told.vocab_size = 3  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"^reward: this twist's task has vocab_size 2, the policy 3"):
        a.twist().check_policy(told)
    with pytest.raises(ValueError, match=r"^reward: "):
        tiltsmc.smc(told, a.twist(), num_particles=4, rng=0)


def test_policy_and_unguided_allocate_nothing_per_position_or_refuse_the_horizon(monkeypatch: Any) -> None:
    """``policy()`` stacked T copies of the transitions (a horizon of 10**10 grew to 8.5 GB;
    ``needle(2000, 2000).policy()`` raised numpy's MemoryError for a (2000, 2000, 2000) array): it reads
    the task's own arrays now, the laws bitwise the same. ``unguided()`` built its T + 1 levels without the
    memory check the exact tables have: ValueError naming ``horizon`` now, before any is built."""
    import tracemalloc

    from tiltsmc import _memory

    _tiltsmc()
    from tiltsmc.models.particles import Particles

    homogeneous = MarkovDFATask([0.5, 0.5], [[0.5, 0.5], [0.5, 0.5]], [[0, 0]], 0, [1.0], 10**5)
    varying = MarkovDFATask.random(20, 2, 400, rng=0, time_varying=True)  # 400 x 20 x 20 transitions
    for task in (homogeneous, varying):
        tracemalloc.start()
        try:
            task.policy()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 100_000, (task, peak)
    # the laws are the task's, bitwise, at every position (time-varying and homogeneous, T = 1 too)
    single = MarkovDFATask.random(3, 2, 1, rng=2, time_varying=True)
    for task in (
        MarkovDFATask.random(3, 2, 5, rng=2),
        MarkovDFATask.random(3, 2, 5, rng=2, time_varying=True),
        single,
    ):
        policy, T = task.policy(), task.horizon
        particles = Particles.empty([(), ()], 6, T)
        rng = np.random.default_rng(3)
        particles.tokens[:] = rng.integers(0, 3, size=particles.tokens.shape)
        particles.lengths[:] = rng.integers(0, T, size=particles.lengths.shape)
        particles.lengths[0, 0] = 0
        log_probs = policy.next_log_probs(particles)
        for b, i in itertools.product(range(2), range(6)):
            t = int(particles.lengths[b, i])
            expected = task.log_init if t == 0 else task.log_trans_at(t)[particles.tokens[b, i, t - 1]]
            np.testing.assert_array_equal(log_probs[b, i], expected)
    # unguided's T + 1 levels of V x Q = 2 x 1 for T = 10**5: 2.4 MB, more than the 1 MB "available"
    monkeypatch.setattr(_memory, "available_memory", lambda: 2**20)
    with pytest.raises(ValueError, match=r"^horizon: the exact tables .*T = 100000\) need at least"):
        homogeneous.unguided()
    homogeneous.policy()  # nothing to refuse
    monkeypatch.undo()
    small = MarkovDFATask.random(2, 2, 3, rng=0)
    assert small.unguided().tables[0] == 0.0


def test_table_twist_tables_are_read_only_views_of_what_the_samplers_read() -> None:
    """``TableTwist.tables`` was a writable list while the samplers read a private stacked copy: editing it
    changed ``bellman_error(twist)`` and not ``smc``. It is now a tuple of read-only views of that one
    array (the hard instance's twist too)."""
    tiltsmc = _tiltsmc()
    from tiltsmc.tasks import hard_instance

    task = MarkovDFATask.random(2, 2, 3, rng=1, zero_reward_fraction=0)
    for twist in (task.twist(), task.unguided(), hard_instance(2, 2, rng=0).twist):
        assert isinstance(twist.tables, tuple)
        assert len(twist.tables) == twist.task.horizon + 1
        for t, level in enumerate(twist.tables[1:], start=1):
            assert isinstance(level, np.ndarray)
            assert not level.flags.writeable
            assert np.shares_memory(level, twist._levels)
            np.testing.assert_array_equal(level, twist._levels[t])
            with pytest.raises(ValueError, match="read-only"):
                level[...] = 0.0
            with pytest.raises(ValueError):
                level.setflags(write=True)
    twist = task.twist()
    again = type(twist)(task, twist.tables)
    assert_same_bellman(task.bellman_error(twist), task.bellman_error(again))
    np.testing.assert_array_equal(
        tiltsmc.smc(task.policy(), twist, num_particles=64, rng=0).log_z,
        tiltsmc.smc(task.policy(), again, num_particles=64, rng=0).log_z,
    )


def test_arithmetic_parse_answer_drops_a_trailing_eos_as_verify_does() -> None:
    """``verify`` dropped a trailing ``<eos>`` (text decoded with special tokens) and ``parse_answer`` did
    not: a solution that verified parsed as None."""
    _tiltsmc()
    from tiltsmc.tasks import arithmetic

    problem = arithmetic.make_problems(2, 1, rng=0)[0]
    solution = problem.solution()
    for text in (solution, solution + "<eos>", solution + "\n<eos>", solution + "\n", "\n\n" + solution):
        assert arithmetic.verify(problem.prompt, text) == 1.0
        assert arithmetic.parse_answer(text) == problem.answer, text
    assert arithmetic.parse_answer("<eos>") is None
    assert arithmetic.parse_answer("a:10+1=11<eos><eos>") is None  # one end token, as verify drops one
    assert arithmetic.verify(problem.prompt, solution + "<eos><eos>") == 0.0


def test_arithmetic_verify_refuses_running_values_outside_the_task() -> None:
    """A problem whose running value leaves 0..99 is not one of this task's (its solutions write two
    digits): ``Problem(95, (("+", 9),))`` verified ``"a:95+9=104"`` as 1.0. ValueError naming ``prompt``,
    for a ``Problem`` and for a str prompt alike."""
    _tiltsmc()
    from tiltsmc.tasks import arithmetic

    cases: list[tuple[Any, str, str]] = [
        (arithmetic.Problem(95, (("+", 9),)), "a:95+9=104", "after operation 1 is 104"),
        ("95 a+9\n", "a:95+9=104", "after operation 1 is 104"),
        (arithmetic.Problem(3, (("-", 5),)), "a:03-5=-2", "after operation 1 is -2"),
        ("50 a+9 b+9 c+9 d+9 e+9 f+9\n", "", "after operation 6 is 104"),
    ]
    for prompt, text, match in cases:
        with pytest.raises(
            ValueError, match=rf"^prompt: not a problem of this task: .*{match}, outside 0\.\.99"
        ):
            arithmetic.verify(prompt, text)
    edge = arithmetic.Problem(90, (("+", 9), ("-", 9), ("-", 9)))
    assert arithmetic.verify(edge, edge.solution()) == 1.0
    assert arithmetic.verify("00 a+9\n", "a:00+9=09") == 1.0


def test_arithmetic_make_problems_count_is_bounded() -> None:
    """``make_problems`` took any count (10**9 problems ran for hours): it is bounded by ``MAX_PROBLEMS``
    (100,000, the demo's cap), ValueError naming ``count``; ``chat_arithmetic.make_problems`` shares the
    check."""
    _tiltsmc()
    from tiltsmc.tasks import arithmetic
    from tiltsmc.tasks import chat_arithmetic as ca

    for count in (100_001, 10**9):
        with pytest.raises(ValueError, match=rf"^count: expected an int in 1\.\.100000, got {count}"):
            arithmetic.make_problems(1, count, rng=0)
        with pytest.raises(ValueError, match=r"^count: "):
            ca.make_problems(1, count, rng=0)
    assert arithmetic.MAX_PROBLEMS == 100_000
    assert len(arithmetic.make_problems(1, 3, rng=0)) == 3
