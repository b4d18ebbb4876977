"""Tests of the exact test-bed task ``tiltsmc.tasks.markov_dfa`` against brute-force enumeration.

The brute-force references below are written from the raw parameters (``init``, ``trans``, ``dfa``,
``start``, ``accept_reward``) with plain Python loops over every sequence, independently of the dynamic
programs under test.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

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
