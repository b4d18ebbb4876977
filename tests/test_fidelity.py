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
from tiltsmc.tasks.exact_laws import (
    positive_reward_task,
    smc_output_law,
    sp_gsmc_laws,
    target_law,
    theorem_5_1_bound,
    total_variation,
)
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
        assert estimate.to_dict()["ratio_bound"] is None  # strict JSON: null stands for +inf


def test_ratio_bound_in_the_gauge_of_gauge_eps() -> None:
    # The example of docs/theory/tilted-target.md: Vh = r^(#ones) under a fair coin, r = 3. Potentials 1
    # and r, rho = (1 + r) / 2
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


# ----------------------------------------------------------------------------------------------------------
# 6. the online Bellman reading: log Z increments against tasks whose per-step ratios are known exactly


def _rescaled_v_star(task: MarkovDFATask, log_scale: np.ndarray) -> TableTwist:
    """``Vh_t = c_t V*_t`` (``c_T = 1``): every prefix has ``rho_t = c_t / c_{t-1}`` exactly."""
    tables = task.log_v_star()
    T = task.horizon
    return TableTwist(
        task, [float(tables[0]) + log_scale[0]] + [tables[t] + log_scale[t] for t in range(1, T + 1)]
    )


def _z_scores(result: Any, log_rho: np.ndarray) -> np.ndarray:
    increments, errors = result.log_z_increments, result.log_z_increment_se
    assert increments.shape == errors.shape
    return np.asarray((increments - log_rho[None, :]) / errors)


@pytest.mark.parametrize("resample", [("multinomial", 1.0), ("systematic", 0.5)])
def test_log_z_increments_read_the_exact_per_step_ratios(resample: tuple[str, float]) -> None:
    # c_t from U[-0.3, 0.3] in logs: rho_t = c_t / c_{t-1} at every prefix, so the conditional mean of each
    # increment is log rho_t whatever the particles; readings from 16 prompts x 12 steps of 256 particles
    # are then within 5 of their standard errors (192 readings: P(|Z| > 5) < 1e-4 in all), with a
    # first-order bias of -se^2/2 (se ~ 0.02 here).
    task = MarkovDFATask.random(3, 3, 12, rng=5, zero_reward_fraction=0.0)
    log_scale = np.append(np.random.default_rng(1).uniform(-0.3, 0.3, size=12), 0.0)
    log_rho = np.diff(log_scale)
    scheme, threshold = resample
    result = tiltsmc.smc(
        task.policy(), _rescaled_v_star(task, log_scale), prompts=[()] * 16, num_particles=256,
        resample=scheme, ess_threshold=threshold, rng=2,
    )  # fmt: skip
    assert np.all(result.log_z_increment_se > 0)
    assert np.max(np.abs(_z_scores(result, log_rho))) < 5.0
    reading = tiltsmc.diagnostics.online_bellman(result)
    exact_eps = float(np.max(np.expm1(np.abs(log_rho))))
    assert task.bellman_error(_rescaled_v_star(task, log_scale)).eps == pytest.approx(exact_eps, rel=1e-9)
    assert 0.0 < reading.eps_low <= exact_eps  # a lower bound, and an informative one
    np.testing.assert_allclose(reading.per_step.mean(axis=0), np.expm1(np.abs(log_rho)), atol=0.02)


def test_increments_of_the_optimal_proposal_and_of_sp_gsmc_are_exact() -> None:
    task = MarkovDFATask.random(3, 3, 10, rng=6, zero_reward_fraction=0.0)
    log_scale = np.append(np.random.default_rng(2).uniform(-0.5, 0.5, size=10), 0.0)
    log_rho = np.diff(log_scale)
    twist = _rescaled_v_star(task, log_scale)
    for result in (
        tiltsmc.smc(task.policy(), twist, prompts=[()] * 3, num_particles=8, proposal="optimal", rng=0),
        tiltsmc.sp_gsmc(task.policy(), twist, prompts=[()] * 3, pool_size=None, rng=0),
    ):
        np.testing.assert_allclose(result.log_z_increments, np.tile(log_rho, (3, 1)), atol=1e-12)
        assert np.all(result.log_z_increment_se == 0.0)
    # pool SP-gSMC reads rho_t of its one prefix from K candidates; MH averages its proposals
    pooled = tiltsmc.sp_gsmc(task.policy(), twist, prompts=[()] * 16, pool_size=64, rng=1)
    assert np.max(np.abs(_z_scores(pooled, log_rho))) < 5.0
    corrected = tiltsmc.mh(task.policy(), twist, prompts=[()] * 4, pool_size=64, steps=3, rng=3)
    assert corrected.log_z_increments.shape == (4, 10) and corrected.log_z_increment_se is not None
    assert np.max(np.abs(_z_scores(corrected, log_rho))) < 5.0
    assert tiltsmc.best_of_n(task.policy(), twist, n=4, rng=0).log_z_increments.shape == (1, 0)


def test_online_reading_warns_above_the_users_eps() -> None:
    T, log_q, log_c = 40, -2.0, math.log(0.5)
    rho = (1 + math.exp(log_q)) / 2 / math.exp(log_c)
    exact_eps = rho - 1  # 0.135 at every step
    result = tiltsmc.smc(
        _coin(T).policy(), ScaledCountTwist(T, log_q, log_c), prompts=[()] * 4, num_particles=512, rng=4
    )
    reading = tiltsmc.diagnostics.online_bellman(result)
    assert 0.0 < reading.eps_low <= exact_eps
    with pytest.warns(tiltsmc.diagnostics.OnlineBellmanWarning, match="above eps = 0.01"):
        tiltsmc.diagnostics.online_bellman(result, eps=0.01)
    tiltsmc.diagnostics.online_bellman(result, eps=0.5)  # no warning (warnings are errors here)
    line = reading.summary(eps=0.01)
    assert "eps >=" in line and "EXCEEDS eps = 0.01" in line and "4 prompt(s) x 40 step(s), smc" in line
    assert "within eps = 0.5" in reading.summary(eps=0.5)
    both = tiltsmc.diagnostics.OnlineBellman.combine([reading, reading])
    assert both.increments.shape == (8, 40) and both.z > reading.z and both.eps_low <= reading.eps_low
    best = tiltsmc.best_of_n(_coin(T).policy(), ScaledCountTwist(T, log_q, log_c), n=2, rng=0)
    assert "no online reading" in tiltsmc.diagnostics.online_bellman(best).summary()
    with pytest.raises(ValueError, match="eps"):
        reading.summary(eps=-1.0)
    with pytest.raises(ValueError, match="confidence"):
        tiltsmc.diagnostics.online_bellman(result, confidence=1.0)
    assert result.to_dict()["log_z_increment_se"][0][0] == pytest.approx(result.log_z_increment_se[0, 0])


# ----------------------------------------------------------------------------------------------------------
# 5. the theorems by enumeration: Theorem 4.3 (exact SP-gSMC) and Theorem 5.1 (naive SMC, one output)


def _count_agrees(count: int, probability: float, runs: int) -> bool:
    """A binomial count within 5 sd of its mean, plus 5 draws of slack for the rare cells where the normal
    approximation fails (a cell of probability 3e-7 seen once in 20,000 runs happens 0.7% of the time)."""
    mean = probability * runs
    return abs(count - mean) <= 5 * math.sqrt(mean * (1 - probability)) + 5


@pytest.mark.parametrize(("seed", "noise"), [(0, 0.05), (1, 0.2), (2, 0.5), (3, 1.0)])
def test_theorem_4_3_exact_sp_gsmc_is_within_2_t_eps_of_pi_t(seed: int, noise: float) -> None:
    # The law of exact SP-gSMC after t steps, q_t(s) = prod_k p(s_k|.) Vh_k / sum_w p(w|.) Vh_k(., w), against
    # pi_t ∝ p Vh_t, by enumeration of every prefix: TV <= 2 t eps (both laws are gauge-invariant, so the
    # gauge-minimised eps may be used too).
    task = MarkovDFATask.random(3, 3, 5, rng=seed, zero_reward_fraction=0.0)
    tables = task.twist_tables(noise, rng=seed + 10)
    report = task.bellman_error(tables)
    laws = sp_gsmc_laws(task, tables)  # per step t: (law of exact SP-gSMC's prefix, pi_t)
    for t, (law_t, pi_t) in enumerate(laws, start=1):
        tv = total_variation(law_t, pi_t)
        bound = 2 * t * min(report.eps, report.gauge_eps)
        assert tv <= bound + 1e-12, f"t={t}: TV {tv:.3g} > 2 t eps = {bound:.3g}"
    law = laws[-1][0]
    # the sampler draws from q_T: 20,000 independent runs, each sequence's frequency within 5 sd
    runs = 20_000
    result = tiltsmc.sp_gsmc(
        task.policy(), task.twist(noise, rng=seed + 10), prompts=[()] * runs, pool_size=None, rng=seed
    )
    drawn = np.stack([s[0] for s in result.samples])
    for sequence, q in law.items():
        assert _count_agrees(int(np.count_nonzero(np.all(drawn == sequence, axis=1))), q, runs), sequence


@pytest.mark.parametrize(("seed", "reward_low", "noise"), [(0, 0.95, 0.005), (1, 0.9, 0.02), (2, 0.5, 0.2)])
def test_theorem_5_1_bound_holds_for_the_exact_output_law(seed: int, reward_low: float, noise: float) -> None:
    # Naive proposal, multinomial resampling every step, one output particle: the exact law of the output
    # (enumerated) is within L^6 T (1+eps)^(6(T-1)) / (2N) of pi, with (L, eps) in the model's gauge or in
    # the one that minimises eps (the algorithm is gauge-invariant). The bound is known to be loose.
    task = positive_reward_task(seed, 2, 3, reward_low, concentration=30.0)
    tables = task.twist_tables(noise, rng=seed)
    report = task.bellman_error(tables)
    pi = target_law(task)
    for N in (1, 2, 3, 4):
        tv = total_variation(smc_output_law(task, tables, N), pi)
        bound = min(
            theorem_5_1_bound(report.ratio_bound, report.eps, task.horizon, N),
            theorem_5_1_bound(report.gauge_ratio_bound, report.gauge_eps, task.horizon, N),
        )
        assert tv <= bound, f"N={N}: TV {tv:.3g} > bound {bound:.3g}"
    if seed == 0:  # the bound is informative here (< 1) from N = 2
        assert bound < 1.0


def test_theorem_5_1_output_rule_is_a_sampler_option() -> None:
    # smc(resample="multinomial", ess_threshold=1.0, final_resample=1) draws from the enumerated law of
    # Theorem 5.1's algorithm: each sequence's count over 40,000 runs within 5 sd of its expectation. With
    # no guidance the last potential is r itself (rewards from 0.05 to 1), so the output law and a pick
    # that ignored the weights (TV checked > 0.05 by enumeration) are far apart.
    ones = np.array([[0, 1], [1, 2], [2, 3], [3, 3]])  # the DFA counts the ones
    task = MarkovDFATask([0.6, 0.4], [[0.7, 0.3], [0.4, 0.6]], ones, 0, [1.0, 0.3, 0.1, 0.05], 3)
    tables = list(task.unguided().tables)
    N, runs = 2, 40_000
    exact = smc_output_law(task, tables, N)
    flat = [*tables[:-1], np.zeros_like(tables[-1])]  # the same particles, the last pick uniform
    assert total_variation(exact, smc_output_law(task, flat, N)) > 0.05
    result = tiltsmc.smc(
        task.policy(), TableTwist(task, tables), prompts=[()] * runs, num_particles=N,
        resample="multinomial", ess_threshold=1.0, final_resample=1, rng=5,
    )  # fmt: skip
    assert all(s.shape == (1, 3) for s in result.samples)
    assert all(w.tolist() == [0.0] for w in result.log_weights)
    drawn = np.stack([s[0] for s in result.samples])
    for sequence, q in exact.items():
        assert _count_agrees(int(np.count_nonzero(np.all(drawn == sequence, axis=1))), q, runs), sequence


def test_final_resample_option() -> None:
    task = MarkovDFATask.random(3, 3, 4, rng=0, zero_reward_fraction=0.0)
    result = tiltsmc.smc(
        task.policy(), task.twist(0.3, rng=0), prompts=[()] * 3, num_particles=8, final_resample=5, rng=0
    )
    assert all(s.shape == (5, 4) for s in result.samples)
    np.testing.assert_allclose(np.stack(result.log_weights), -math.log(5))
    plain = tiltsmc.smc(task.policy(), task.twist(0.3, rng=0), prompts=[()] * 3, num_particles=8, rng=0)
    np.testing.assert_array_equal(
        result.log_z, plain.log_z
    )  # the steps draw the same; only the output differs
    needle = MarkovDFATask.needle(4, 10, rng=0)
    collapsed = tiltsmc.smc(needle.policy(), needle.unguided(), num_particles=4, final_resample=2, rng=0)
    assert collapsed.collapsed[0] and collapsed.samples[0].shape == (2, 10)
    assert np.all(collapsed.log_weights[0] == -np.inf)
    with pytest.raises(ValueError, match="final_resample"):
        tiltsmc.smc(task.policy(), task.twist(), num_particles=4, final_resample=0)
