"""Fidelity to the paper (issue 17): the Bellman estimator in the log domain at long horizons, the paper's
ratio bound L, its hard instance as a task, its theorems checked by enumeration, and the online reading of
the Bellman error from the log Z increments of any run.

Every reference here is exact (a dynamic programme, an enumeration or a closed form); tolerances on sampled
figures come from their sample sizes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import tiltsmc
from tiltsmc.models.particles import Particles
from tiltsmc.tasks import MarkovDFATask, hard_instance
from tiltsmc.tasks.models import TableTwist

# ----------------------------------------------------------------------------------------------------------
# 1-2. the sampled Bellman estimator in the log domain, at T >= 1000, without warnings


class ScaledCountTwist:
    r"""Under a fair coin over ``{0, 1}`` with ``r(x) = q^(#ones)``: ``log Vh_t = #ones(s_{1:t}) log q +
    (T - t) log c`` (``Vh_T = r``, ``Vh_0 = c^T``).

    Every prefix has ``rho_t = E_p[Vh_t] / Vh_{t-1} = ((1 + q) / 2) / c`` exactly, at every step, so
    ``eps = max(rho, 1/rho) - 1``, the gauge-minimised ``eps`` is 0, the potentials are ``1/c`` and ``q/c``
    (``L = max(1/c, c/q, ...)``), and ``c = (1 + q) / 2`` is ``V*``. With ``q = e^-2`` and ``T = 1000`` the
    values reach ``e^-1000``, far below the smallest double.
    """

    def __init__(self, horizon: int, log_q: float, log_c: float) -> None:
        self.horizon, self.log_q, self.log_c = horizon, log_q, log_c
        self.vocab_size = 2

    def initial_log_value(self, particles: Particles) -> Any:
        return np.full(particles.num_prompts, self.horizon * self.log_c)

    def log_value(self, particles: Particles) -> Any:
        ones = particles.tokens.sum(axis=-1)  # tokens past a particle's length are 0
        return ones * self.log_q + (self.horizon - particles.lengths) * self.log_c

    def next_log_values(self, particles: Particles) -> Any:
        here = self.log_value(particles)[..., None]
        return here - self.log_c + np.array([0.0, self.log_q])


def _coin(horizon: int) -> MarkovDFATask:
    return MarkovDFATask([0.5, 0.5], [[0.5, 0.5], [0.5, 0.5]], [[0, 0]], 0, [1.0], horizon)


def test_sampled_estimator_is_finite_and_right_on_the_needle_at_T_1200() -> None:
    # issue 17, item 1: with the exact V*, eps = 0; the linear-domain mean underflowed to eps = inf, and
    # -inf - -inf raised a RuntimeWarning (item 2; pytest runs with warnings as errors). With 64
    # continuations a live prefix loses all of them with probability 2^-64.
    needle = MarkovDFATask.needle(2, 1200, rng=0)
    assert needle.bellman_error(needle.twist()).eps == 0.0
    estimate = tiltsmc.diagnostics.bellman_error(
        needle.policy(), needle.twist(), num_prefixes=4, samples_per_prefix=64, method="sampled", rng=0
    )
    assert np.all(np.isfinite(estimate.per_step)) and np.isfinite(estimate.eps_high)
    assert estimate.eps_low == 0.0  # the interval holds the exact 0
    exact = tiltsmc.diagnostics.bellman_error(needle.policy(), needle.twist(), num_prefixes=4, rng=0)
    assert exact.method == "exact" and exact.eps == 0.0


@pytest.mark.parametrize("log_c", [math.log((1 + math.exp(-2.0)) / 2), math.log(0.5)])
def test_sampled_estimator_brackets_the_exact_eps_of_tiny_values(log_c: float) -> None:
    T, log_q = 1000, -2.0
    rho = (1 + math.exp(log_q)) / 2 / math.exp(log_c)
    exact_eps = max(rho, 1 / rho) - 1  # 0 for V*, 0.135 for c = 1/2
    task, twist = _coin(T), ScaledCountTwist(T, log_q, log_c)
    # 8 prefixes x 1000 steps, each ratio from 48 continuations: intervals at a joint 99% level
    estimate = tiltsmc.diagnostics.bellman_error(
        task.policy(), twist, num_prefixes=8, samples_per_prefix=48, method="sampled", confidence=0.99, rng=1
    )
    assert estimate.per_step.shape == (T,)
    assert np.all(estimate.per_step_low <= exact_eps + 1e-9)
    assert np.all(exact_eps <= estimate.per_step_high + 1e-9)
    exact = tiltsmc.diagnostics.bellman_error(task.policy(), twist, num_prefixes=8, method="exact", rng=1)
    np.testing.assert_allclose(exact.per_step, exact_eps, rtol=1e-9, atol=1e-9)
    assert exact.gauge_eps == pytest.approx(0.0, abs=1e-9)
    # potentials 1/c and q/c, each seen from every prefix with the exact method
    potentials = np.array([-log_c, log_q - log_c])
    assert exact.ratio_bound == pytest.approx(math.exp(np.abs(potentials).max()), rel=1e-9)
    gauge = potentials - math.log(rho)
    assert exact.gauge_ratio_bound == pytest.approx(math.exp(np.abs(gauge).max()), rel=1e-9)


# ----------------------------------------------------------------------------------------------------------
# 3. the paper's L: infinite once a reachable potential is 0; the finite figure beside it; its gauge


def test_ratio_bound_is_infinite_on_zero_potentials() -> None:
    needle = MarkovDFATask.needle(2, 8, rng=0)
    for twist, positive in ((needle.unguided(), 1.0), (needle.twist(), 2.0)):
        exact = needle.bellman_error(twist)
        assert exact.ratio_bound == math.inf and exact.gauge_ratio_bound == math.inf
        assert exact.positive_ratio_bound == pytest.approx(positive, rel=1e-12)
        estimate = tiltsmc.diagnostics.bellman_error(needle.policy(), twist, num_prefixes=64, rng=0)
        assert estimate.ratio_bound == math.inf and estimate.gauge_ratio_bound == math.inf
        assert estimate.positive_ratio_bound == pytest.approx(positive, rel=1e-12)
        assert estimate.to_dict()["ratio_bound"] == math.inf


def test_ratio_bound_in_the_gauge_of_gauge_eps() -> None:
    # DESIGN.md's example: Vh = r^(#ones) under a fair coin, r = 3. Potentials 1 and r, rho = (1 + r) / 2
    # at every step; the gauge divides every G by (1 + r) / 2: L = r in the model's gauge, (1 + r) / 2 in
    # the gauge where eps = 0 (Theorem 5.1's bound then reads L^6 T / (2N) with L = 2).
    r, T = 3.0, 5
    dfa = np.array([[q, min(q + 1, T)] for q in range(T + 1)])
    task = MarkovDFATask([0.5, 0.5], [[0.5, 0.5], [0.5, 0.5]], dfa, 0, r ** np.arange(T + 1), T)
    tables = [0.0] + [np.tile(np.arange(T + 1) * math.log(r), (2, 1)) for _ in range(T)]
    exact = task.bellman_error(tables)
    assert exact.ratio_bound == pytest.approx(r, rel=1e-12)
    assert exact.gauge_eps == pytest.approx(0.0, abs=1e-12)
    assert exact.gauge_ratio_bound == pytest.approx((1 + r) / 2, rel=1e-12)
    estimate = tiltsmc.diagnostics.bellman_error(
        task.policy(), TableTwist(task, tables), num_prefixes=32, rng=0
    )
    assert estimate.gauge_ratio_bound == pytest.approx((1 + r) / 2, rel=1e-12)


# ----------------------------------------------------------------------------------------------------------
# 4. the hard instance


@pytest.mark.parametrize(("a", "m"), [(2, 1), (2, 3), (3, 2), (4, 2)])
def test_hard_instance_has_the_papers_figures(a: int, m: int) -> None:
    hard = hard_instance(a, m, rng=a * 10 + m)
    task = hard.task
    assert task.horizon == 3 * m and task.vocab_size == a and hard.branching == a
    exact = task.bellman_error(hard.twist)
    assert exact.eps == pytest.approx(a - 1, rel=1e-12)  # Bellman error a - 1
    assert exact.ratio_bound == pytest.approx(a, rel=1e-12)  # L = a = 1 + eps
    np.testing.assert_allclose(exact.per_step[: 2 * m], 0.0, atol=1e-12)  # Vh = 1 for t <= 2m
    # by enumeration: p uniform on the first 2m tokens and deterministic afterwards, r = a^+-m, pi(u)
    sequences, log_p, log_r = task.enumerate_sequences()
    support = log_p > -np.inf
    assert np.count_nonzero(support) == a ** (2 * m)
    np.testing.assert_allclose(np.exp(log_p[support]), float(a) ** (-2 * m), rtol=1e-12)
    assert np.all(sequences[support][:, 2 * m :] == 0)
    on_u = np.all(sequences[:, : 2 * m] == hard.hidden_prefix, axis=1) & support
    np.testing.assert_allclose(np.exp(log_r[on_u]), float(a) ** m, rtol=1e-12)
    np.testing.assert_allclose(np.exp(log_r[support & ~on_u]), float(a) ** -m, rtol=1e-12)
    mass = np.exp(log_p + log_r - task.exact_log_z())
    assert hard.target_mass == pytest.approx(float(mass[on_u].sum()), rel=1e-12)
    assert hard.target_mass == pytest.approx(1 / (2 - float(a) ** (-2 * m)), rel=1e-12)
    assert hard.lower_bound_rate == hard.search_rate == pytest.approx(2 * math.log(a) / 3)
    assert hard.draws_to_hit(0.5) == pytest.approx(math.log(0.5) / math.log1p(-(float(a) ** (-2 * m))))


def test_hard_instance_with_another_branching_and_bad_arguments() -> None:
    hard = hard_instance(4.0, 2, rng=0, branching=2)
    assert hard.task.vocab_size == 2 and hard.a == 4.0
    assert hard.task.bellman_error(hard.twist).eps == pytest.approx(3.0, rel=1e-12)
    assert hard.search_rate == pytest.approx(2 * math.log(2) / 3) and hard.lower_bound_rate > hard.search_rate
    with pytest.raises(ValueError, match="a:"):
        hard_instance(1.0, 2)
    with pytest.raises(ValueError, match="a:"):
        hard_instance(2.5, 2)
    with pytest.raises(ValueError, match="m:"):
        hard_instance(2, 0)
    with pytest.raises(TypeError, match="m:"):
        hard_instance(2, 1.5)
    with pytest.raises(ValueError, match="branching:"):
        hard_instance(2.5, 2, branching=1)
    with pytest.raises(ValueError, match="probability"):
        hard.draws_to_hit(1.0)
