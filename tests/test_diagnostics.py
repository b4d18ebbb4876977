"""The Bellman-error estimator against the exact dynamic programme of the test-bed task."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tiltsmc
from tiltsmc.tasks import MarkovDFATask
from tiltsmc.tasks.models import TableTwist


@pytest.fixture(scope="module")
def task() -> MarkovDFATask:
    # V=3, Q=3, T=4: at most 9 (token, state) summaries per level, so 3000 rollouts visit every
    # reachable prefix summary (the rarest has probability well above 1e-2 for this seed).
    return MarkovDFATask.random(3, 3, 4, rng=11, zero_reward_fraction=0.0)


def test_exact_method_equals_the_dynamic_programme(task: MarkovDFATask) -> None:
    tables = task.twist_tables(0.4, rng=5)
    exact = task.bellman_error(tables)
    estimate = tiltsmc.diagnostics.bellman_error(
        task.policy(), TableTwist(task, tables), num_prefixes=3000, rng=1
    )
    assert estimate.method == "exact"
    np.testing.assert_allclose(estimate.per_step, exact.per_step, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(estimate.gauge_per_step, exact.gauge_per_step, rtol=1e-9, atol=1e-12)
    assert estimate.eps == pytest.approx(exact.eps, rel=1e-9)
    assert estimate.ratio_bound == pytest.approx(exact.ratio_bound, rel=1e-9)
    assert estimate.eps_low == estimate.eps == estimate.eps_high


def test_exact_twist_has_zero_error(task: MarkovDFATask) -> None:
    estimate = tiltsmc.diagnostics.bellman_error(task.policy(), task.twist(), num_prefixes=500, rng=2)
    assert estimate.eps < 1e-9


def test_few_prefixes_never_overstate_the_exact_supremum(task: MarkovDFATask) -> None:
    tables = task.twist_tables(0.4, rng=5)
    exact = task.bellman_error(tables)
    estimate = tiltsmc.diagnostics.bellman_error(
        task.policy(), TableTwist(task, tables), num_prefixes=3, rng=3
    )
    assert np.all(estimate.per_step <= exact.per_step + 1e-12)


def test_sampled_method_brackets_the_exact_value(task: MarkovDFATask) -> None:
    # Each visited prefix's ratio is estimated from 400 continuations with normal intervals (delta method
    # on the log) at a joint 99% level (Bonferroni over all of them); with every summary visited, the
    # exact supremum lies in [max of lower ends, max of upper ends] unless an interval misses (<= 1%).
    tables = task.twist_tables(0.4, rng=5)
    exact = task.bellman_error(tables)
    estimate = tiltsmc.diagnostics.bellman_error(
        task.policy(),
        TableTwist(task, tables),
        num_prefixes=200,
        samples_per_prefix=400,
        method="sampled",
        confidence=0.99,
        rng=4,
    )
    assert estimate.method == "sampled" and estimate.samples_per_prefix == 400
    assert np.all(estimate.per_step_low <= exact.per_step + 1e-12)
    assert np.all(exact.per_step <= estimate.per_step_high + 1e-12)
    assert estimate.eps_low <= exact.eps <= estimate.eps_high


def test_bad_arguments(task: MarkovDFATask) -> None:
    with pytest.raises(ValueError, match="num_prefixes"):
        tiltsmc.diagnostics.bellman_error(task.policy(), task.twist(), num_prefixes=0)
    with pytest.raises(ValueError, match="method"):
        tiltsmc.diagnostics.bellman_error(task.policy(), task.twist(), method="guess")  # type: ignore[arg-type]

    class ValueOnly:
        def __init__(self, twist: TableTwist) -> None:
            self.twist = twist

        def initial_log_value(self, particles):  # type: ignore[no-untyped-def]
            return self.twist.initial_log_value(particles)

        def log_value(self, particles):  # type: ignore[no-untyped-def]
            return self.twist.log_value(particles)

    with pytest.raises(ValueError, match="twist head"):
        tiltsmc.diagnostics.bellman_error(task.policy(), ValueOnly(task.twist()), method="exact")
    estimate = tiltsmc.diagnostics.bellman_error(
        task.policy(), ValueOnly(task.twist()), num_prefixes=50, samples_per_prefix=20, rng=0
    )
    assert estimate.method == "sampled"
    assert estimate.to_dict()["method"] == "sampled"


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        ({"confidence": "0.5"}, TypeError, "^confidence: expected a number, got '0.5'"),
        ({"confidence": None}, TypeError, "^confidence: expected a number, got None"),
        ({"confidence": "abc"}, TypeError, "^confidence: "),
        ({"confidence": 1.0}, ValueError, r"^confidence: expected a level in \(0, 1\)"),
        ({"policy": None}, TypeError, "^policy: NoneType does not implement start"),
        ({"reward": None}, TypeError, "^reward: NoneType does not implement"),
        ({"max_steps": 0}, ValueError, "^max_steps: must be >= 1, got 0"),
        ({"max_steps": -2}, ValueError, "^max_steps: must be >= 1"),
        ({"max_steps": 2.0}, TypeError, "^max_steps: expected an int"),
    ],
)
def test_bad_arguments_are_refused_before_any_rollout(
    task: MarkovDFATask, arguments: dict[str, Any], error: type, match: str
) -> None:
    generator = np.random.default_rng(0)
    state = generator.bit_generator.state
    call = {"policy": task.policy(), "reward": task.twist(0.3, rng=1), "num_prefixes": 8, **arguments}
    with pytest.raises(error, match=match):
        tiltsmc.diagnostics.bellman_error(rng=generator, **call)
    assert generator.bit_generator.state == state


def test_max_steps_short_of_the_horizon_raises_as_smc_does(task: MarkovDFATask) -> None:
    policy, twist = task.policy(), task.twist(0.3, rng=1)
    message = f"^max_steps: trajectories still unfinished after {task.horizon - 1} steps"
    with pytest.raises(RuntimeError, match=message):
        tiltsmc.smc(policy, twist, num_particles=8, max_steps=task.horizon - 1, rng=0)
    with pytest.raises(RuntimeError, match=message):
        tiltsmc.diagnostics.bellman_error(policy, twist, num_prefixes=8, max_steps=task.horizon - 1, rng=0)
    whole = tiltsmc.diagnostics.bellman_error(policy, twist, num_prefixes=8, max_steps=task.horizon, rng=0)
    assert whole.per_step.shape == (task.horizon,) and whole.eps > 0


def test_online_reading_of_collapsed_runs_says_they_collapsed() -> None:
    zero = MarkovDFATask.random(3, 3, 4, zero_reward_fraction=1.0, ensure_positive=False, rng=0)
    for result in (
        tiltsmc.smc(zero.policy(), zero.twist(), prompts=[()] * 2, num_particles=4, rng=0),
        tiltsmc.sp_gsmc(zero.policy(), zero.twist(), pool_size=2, rng=0),
        tiltsmc.mh(zero.policy(), zero.twist(), pool_size=None, steps=1, rng=0),
    ):
        assert result.collapsed.all() and result.log_z_increments.shape[1] > 0
        line = tiltsmc.diagnostics.online_bellman(result).summary()
        assert "every prompt collapsed or failed" in line and "takes no guided steps" not in line
    best = tiltsmc.best_of_n(zero.policy(), zero.twist(), n=2, rng=0)
    assert "best_of_n takes no guided steps" in tiltsmc.diagnostics.online_bellman(best).summary()


def test_result_weight_histogram_and_collapse_warnings(task: MarkovDFATask) -> None:
    result = tiltsmc.smc(task.policy(), task.twist(0.3, rng=1), prompts=[()] * 2, num_particles=50, rng=0)
    counts, edges = result.weight_histogram(0, bins=10)
    assert counts.sum() == 50 and edges[0] == 0.0 and edges[-1] == 1.0
    assert result.collapse_warnings() == []
    needle = MarkovDFATask.needle(4, 10, rng=0)
    collapsed = tiltsmc.smc(needle.policy(), needle.unguided(), num_particles=4, rng=0)
    assert collapsed.collapsed[0]
    assert "collapse" in collapsed.collapse_warnings()[0]


def test_task_bellman_error_takes_the_twist_model(task: MarkovDFATask) -> None:
    twist = task.twist(0.3, rng=2)
    from_model, from_tables = task.bellman_error(twist), task.bellman_error(twist.tables)
    assert from_model.eps == from_tables.eps and from_model.eps > 0
    np.testing.assert_array_equal(from_model.per_step, from_tables.per_step)
    other = MarkovDFATask.random(3, 3, 4, rng=12)
    with pytest.raises(ValueError, match="another task"):
        other.bellman_error(twist)


def test_compute_counts_tokens_as_well_as_steps(task: MarkovDFATask) -> None:
    result = tiltsmc.smc(task.policy(), task.twist(), prompts=[()] * 3, num_particles=5, rng=0)
    assert result.compute.policy_tokens == result.compute.policy_steps == 3 * 5 * task.horizon
    optimal = tiltsmc.smc(task.policy(), task.twist(), num_particles=5, proposal="optimal", rng=0)
    assert optimal.compute.policy_tokens == 5 * task.horizon


def test_average_error_of_a_rescaled_exact_twist_is_the_level_ratio(task: MarkovDFATask) -> None:
    # Vh_t = c_t V*_t (c_0 = 1; the last level is r itself): every prefix has rho_t = c_t / c_{t-1}
    # exactly, so the weighted mean of |rho_t - 1| is |c_t / c_{t-1} - 1| whatever prefixes are visited.
    tables = task.log_v_star()
    scale = np.array([0.0, 0.3, -0.2, 0.5, 0.0])  # log c_t for t = 0..T (T = 4)
    rescaled = [tables[0]] + [np.asarray(tables[t]) + scale[t] for t in range(1, 5)]
    estimate = tiltsmc.diagnostics.bellman_error(
        task.policy(), TableTwist(task, rescaled), num_prefixes=50, rng=6, method="exact"
    )
    expected = np.abs(np.exp(np.diff(scale)) - 1.0)
    np.testing.assert_allclose(estimate.average_per_step, expected, rtol=1e-9)
    assert estimate.average_eps == pytest.approx(expected.max(), rel=1e-9)
    assert estimate.to_dict()["average_per_step"] == list(estimate.average_per_step)
