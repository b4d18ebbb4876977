"""The Bellman-error estimator against the exact dynamic programme of the test-bed task."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from statistics import NormalDist
from typing import Any, Optional

import numpy as np
import pytest
import tiltsmc
from tiltsmc._numeric import logsumexp
from tiltsmc.diagnostics.bellman import upper_t_quantile
from tiltsmc.diagnostics.online import ROUNDING
from tiltsmc.models.particles import Particles
from tiltsmc.tasks import MarkovDFATask
from tiltsmc.tasks.models import MarkovPolicy, TableTwist


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
    # a point, less ROUNDING in log at its lower end (rounding alone must not read as an error)
    assert estimate.eps_high == estimate.eps
    assert estimate.eps_low == pytest.approx(math.expm1(math.log1p(estimate.eps) - ROUNDING), rel=1e-12)


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
        # 1 - 1e-17 rounds to 1: a one-sided quantile at it would be -inf (it crashed in NormalDist)
        (
            {"confidence": 1e-17},
            ValueError,
            r"^confidence: expected a level in \(0, 1\), got 1e-17, too close",
        ),
        ({"policy": None}, TypeError, "^policy: NoneType does not implement start"),
        ({"reward": None}, TypeError, "^reward: NoneType does not implement"),
        ({"max_steps": 0}, ValueError, "^max_steps: must be >= 1, got 0"),
        ({"max_steps": -2}, ValueError, "^max_steps: must be >= 1"),
        ({"max_steps": 2.0}, TypeError, "^max_steps: expected an int"),
        # an array's `in` asked for its truth value ("truth value of an array ... is ambiguous")
        (
            {"method": np.array(["exact", "sampled"])},
            TypeError,
            r"^method: expected 'auto', 'exact' or 'sampled', got array\(\['exact', 'sampled'\]",
        ),
        (
            {"method": ["exact"]},
            TypeError,
            r"^method: expected 'auto', 'exact' or 'sampled', got \['exact'\]",
        ),
        # numpy's allocator: a MemoryError naming nothing (2**40) or "array is too big" (2**62)
        (
            {"num_prefixes": 2**40},
            ValueError,
            r"^num_prefixes: 1 prompt\(s\) x 1099511627776 prefixes \(16 bytes each\) need at least "
            r"1\.8e\+13 bytes of memory, more than ",
        ),
        ({"num_prefixes": 2**62}, ValueError, r"^num_prefixes: 1 prompt\(s\) x 4611686018427387904 prefixes"),
        # 2**31 to 2**40 a MemoryError naming nothing; 2**62 crashed the interpreter (below)
        (
            {"method": "sampled", "samples_per_prefix": 2**36},
            ValueError,
            r"^samples_per_prefix: 1 prompt\(s\) x 8 prefixes x 68719476736 continuations "
            r"\(16 bytes each\) need at least 8\.8e\+12 bytes of memory, more than ",
        ),
        ({"method": "sampled", "samples_per_prefix": 2**40}, ValueError, "^samples_per_prefix: "),
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


def test_continuations_past_numpys_largest_array_are_refused_not_a_crash() -> None:
    """``samples_per_prefix=2**62`` (4 prefixes) reached ``np.repeat``, which crashed the interpreter
    (SIGSEGV): run in a child process, so that a crash fails this test alone. Refused naming the argument,
    whether or not the memory available can be read."""
    code = """
import numpy as np
from tiltsmc import _memory
from tiltsmc.diagnostics import bellman_error
from tiltsmc.tasks import MarkovDFATask
task = MarkovDFATask.random(3, 3, 4, rng=0)
policy, twist = task.policy(), task.twist(noise=0.3, rng=1)
for available in (_memory.available_memory, lambda: None):
    _memory.available_memory = available
    generator = np.random.default_rng(0)
    state = generator.bit_generator.state
    try:
        bellman_error(
            policy, twist, num_prefixes=4, samples_per_prefix=2**62, method="sampled", rng=generator
        )
    except ValueError as error:
        print(error)
    assert generator.bit_generator.state == state
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout
    for line in lines:
        assert line.startswith(
            "samples_per_prefix: 1 prompt(s) x 4 prefixes x 4611686018427387904 continuations "
            "(16 bytes each) need at least 3e+20 bytes of memory, more than "
        ), line
    assert lines[1].endswith("more than any array can hold (9.2e+18)")


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


# ----------------------------------------------------------------------------------------------------------
# Defects of the fuzzing pass (s33): log-values, intervals, failed prompts, confidence edges, strict JSON


class _BrokenTwist:
    """The noisy twist of ``task``, but ``log Vh`` of prompt 1's prefixes of length 2 is ``bad`` (or the root
    value of every prompt, with ``root=True``; or the twist head's values, with ``head=True``)."""

    def __init__(self, twist: TableTwist, bad: float, root: bool = False, head: bool = False) -> None:
        self.twist, self.bad, self.root, self.head = twist, bad, root, head

    def initial_log_value(self, particles: Particles) -> Any:
        values = np.array(self.twist.initial_log_value(particles), dtype=float)
        if self.root:
            values[:] = self.bad
        return values

    def log_value(self, particles: Particles) -> Any:
        values = np.array(self.twist.log_value(particles), dtype=float)
        if not self.root and not self.head:
            values[1][particles.lengths[1] == 2] = self.bad
        return values

    def next_log_values(self, particles: Particles) -> Any:
        values = np.array(self.twist.next_log_values(particles), dtype=float)
        if self.head:
            values[1][particles.lengths[1] == 1] = self.bad  # log Vh_2 of every next token
        return values


@pytest.mark.parametrize(
    ("method", "bad", "where", "what"),
    [
        *[(method, math.nan, {}, "log_value returned NaN") for method in ("exact", "sampled")],
        *[(method, math.inf, {}, r"log_value returned \+inf") for method in ("exact", "sampled")],
        *[
            (method, math.nan, {"root": True}, "initial_log_value returned NaN")
            for method in ("exact", "sampled")
        ],
        ("exact", math.nan, {"head": True}, "next_log_values returned NaN"),  # the sampled method has no head
    ],
)
def test_nan_or_infinite_log_values_are_refused_as_the_samplers_refuse_them(
    task: MarkovDFATask, method: str, bad: float, where: dict[str, bool], what: str
) -> None:
    # NaN read as eps = 0 (a NaN root skipped step 1), NaN at step 2 gave eps = nan and +inf eps = inf
    reward = _BrokenTwist(task.twist(0.3, rng=1), bad, **where)
    prompt, step = (0, 0) if where.get("root") else (1, 2)
    checked = rf"^reward: {what} \(log-values must be finite or -inf: r >= 0\)"
    with pytest.raises(ValueError, match=rf"{checked}, first at prompt {prompt}, step {step}$"):
        tiltsmc.diagnostics.bellman_error(
            task.policy(),
            reward,
            prompts=[(), ()],
            num_prefixes=16,
            samples_per_prefix=4,
            method=method,
            rng=0,
        )  # type: ignore[arg-type]
    # the samplers' own wording (they do not say where)
    proposal = "optimal" if where.get("head") else "naive"
    with pytest.raises(ValueError, match=rf"{checked}$"):
        tiltsmc.smc(task.policy(), reward, prompts=[(), ()], num_particles=16, proposal=proposal, rng=0)


def test_one_continuation_per_prefix_gives_an_infinite_interval(task: MarkovDFATask) -> None:
    # One value per prefix has no sample sd: the interval of each |log rho| is [0, inf], and so is the
    # supremum's (it was [1.507, 1.507], zero width, excluding the exact 0.570).
    tables = task.twist_tables(0.4, rng=5)
    exact = task.bellman_error(tables)
    estimate = tiltsmc.diagnostics.bellman_error(
        task.policy(), TableTwist(task, tables), num_prefixes=200, samples_per_prefix=1, method="sampled",
        confidence=0.99, rng=0,
    )  # fmt: skip
    assert np.all(np.isfinite(estimate.per_step)) and estimate.eps > exact.eps  # the noisy point estimate
    np.testing.assert_array_equal(estimate.per_step_low, 0.0)
    np.testing.assert_array_equal(estimate.per_step_high, math.inf)
    assert estimate.eps_low == 0.0 <= exact.eps <= estimate.eps_high == math.inf


def test_sampled_continuations_all_of_value_zero_leave_the_lower_end_finite() -> None:
    # A prefix whose 3 sampled continuations all have value 0 reads rho = 0 (eps_t = inf, the point), but its
    # true continuations do not all have value 0: its interval is [0, inf], so the step's lower end comes
    # from the other prefixes (it was inf, excluding the finite exact eps).
    task = MarkovDFATask.random(3, 3, 4, rng=4, zero_reward_fraction=0.5)
    twist = task.twist(0.2, rng=1)
    exact = task.bellman_error(twist)
    assert math.isfinite(exact.eps)
    estimate = tiltsmc.diagnostics.bellman_error(
        task.policy(), twist, num_prefixes=100, samples_per_prefix=3, method="sampled", rng=0
    )
    assert estimate.per_step[-1] == math.inf and estimate.eps == math.inf  # some prefix read rho = 0
    assert estimate.per_step_high[-1] == math.inf
    assert np.all(estimate.per_step_low <= exact.per_step + 1e-12)
    assert math.isfinite(estimate.eps_low) and estimate.eps_low <= exact.eps <= estimate.eps_high
    # with the exact method the zero is exact: a prefix of positive value whose true continuations all have
    # value 0 (the unguided twist of a needle) has eps_t = inf at both ends
    needle = MarkovDFATask.needle(2, 4, rng=0)
    exact_zero = tiltsmc.diagnostics.bellman_error(needle.policy(), needle.unguided(), num_prefixes=16, rng=0)
    assert exact_zero.method == "exact" and exact_zero.eps_low == exact_zero.eps == math.inf


def _binomial_upper(count: int, rate: float, probability: float = 1e-3) -> int:
    """The smallest ``k`` with ``P(Binomial(count, rate) > k) <= probability``."""
    total = 0.0
    for k in range(count + 1):
        total += math.comb(count, k) * rate**k * (1 - rate) ** (count - k)
        if 1.0 - total <= probability:
            return k
    return count


def test_sampled_intervals_from_two_continuations_cover_the_exact_eps() -> None:
    # With M = 2 continuations the sd is estimated from two values: the interval uses Student's t with one
    # degree of freedom. Each run's eps_low <= eps holds with probability >= 95% (if every visited prefix's
    # interval holds, the visited supremum, which is <= the exact eps, is >= eps_low), so over 60 runs the
    # misses are at most Binomial(60, 0.05), > 9 with probability < 1e-3. (The normal quantile missed in 25%
    # of such runs: 15 expected.)
    runs, misses = 60, 0
    for seed in range(runs):
        task = MarkovDFATask.random(3, 3, 4, rng=seed, zero_reward_fraction=0.5 if seed % 2 else 0.0)
        twist = task.twist(0.3, rng=seed + 1)
        estimate = tiltsmc.diagnostics.bellman_error(
            task.policy(), twist, num_prefixes=200, samples_per_prefix=2, method="sampled", rng=seed
        )
        misses += estimate.eps_low > task.bellman_error(twist).eps + 1e-12
    assert misses <= _binomial_upper(runs, 0.05) == 9


def test_student_t_quantile_against_closed_forms() -> None:
    for tail in (0.4, 0.025, 1e-6, 3e-12, 1e-20):
        # one degree of freedom: Cauchy, t = 1 / tan(pi tail); two: t = (1 - 2p) / sqrt(2 p (1 - p))
        assert upper_t_quantile(tail, 1) == pytest.approx(1.0 / math.tan(math.pi * tail), rel=1e-10)
        two = (1.0 - 2.0 * tail) / math.sqrt(2.0 * tail * (1.0 - tail))
        assert upper_t_quantile(tail, 2) == pytest.approx(two, rel=1e-10)
        upper = 1.0 - tail  # its tail 1 - upper is tail rounded near 1: compare with that tail's quantile
        assert upper_t_quantile(upper, 2) == -upper_t_quantile(1.0 - upper, 2)
        # many degrees of freedom: the normal quantile (the t excess is about (z^3 + z) / (4 df))
        z = -NormalDist().inv_cdf(tail)
        assert upper_t_quantile(tail, 10**7) == pytest.approx(z, rel=1e-5)
    assert upper_t_quantile(0.025, 7) == pytest.approx(2.364624, abs=1e-6)  # the textbook table
    assert upper_t_quantile(0.5, 3) == 0.0 and upper_t_quantile(0.1, 0) == math.inf


class _FailingPolicy(MarkovPolicy):
    """The task's policy, which cannot start the prompts in ``failing`` (as an ONNX policy refuses a prompt
    too long for its context: their particles start finished, ``particles.errors`` says why)."""

    def __init__(self, task: MarkovDFATask, failing: tuple[int, ...]) -> None:
        super().__init__(task)
        self.failing = failing

    def start(self, prompts: Any, num_particles: int) -> Particles:
        particles = super().start(prompts, num_particles)
        for b in self.failing:
            particles.errors[b] = f"prompt {b}: too long for the context"
            particles.finished[b] = True
        return particles


@pytest.mark.parametrize("method", ["exact", "sampled"])
def test_a_prompt_the_policy_could_not_start_is_reported(task: MarkovDFATask, method: str) -> None:
    twist = task.twist(0.3, rng=1)
    policy = _FailingPolicy(task, (1,))
    result = tiltsmc.smc(policy, twist, prompts=[(), ()], num_particles=4, rng=0)
    assert result.errors == {1: "prompt 1: too long for the context"}  # how a sampler reports it
    estimate = tiltsmc.diagnostics.bellman_error(
        policy, twist, prompts=[(), ()], num_prefixes=32, samples_per_prefix=4, method=method, rng=0
    )
    assert estimate.errors == result.errors and estimate.eps > 0
    assert estimate.to_dict()["errors"] == {"1": "prompt 1: too long for the context"}
    assert "errors" not in tiltsmc.diagnostics.bellman_error(task.policy(), twist, num_prefixes=8).to_dict()
    with pytest.raises(ValueError, match=r"^prompts: the policy could not start any of the 2 prompt\(s\)"):
        tiltsmc.diagnostics.bellman_error(
            _FailingPolicy(task, (0, 1)), twist, prompts=[(), ()], method=method
        )


def test_confidence_levels_next_to_0_and_1(task: MarkovDFATask) -> None:
    # 1 - 1e-16 is accepted and works everywhere (it crashed in NormalDist after all rollouts, and in
    # online_bellman's eps_low); the smallest accepted level works with one reading (1e-17 crashed there,
    # and is now refused up front)
    policy, twist = task.policy(), task.twist(0.3, rng=1)
    near_one = 1 - 1e-16
    for method in ("exact", "sampled"):
        estimate = tiltsmc.diagnostics.bellman_error(
            policy, twist, num_prefixes=4, samples_per_prefix=3, method=method, confidence=near_one, rng=0
        )  # type: ignore[arg-type]
        assert 0.0 <= estimate.eps_low <= estimate.eps <= estimate.eps_high
    result = tiltsmc.smc(policy, twist, num_particles=8, rng=0)
    reading = tiltsmc.diagnostics.online_bellman(result, confidence=near_one)
    assert 0.0 <= reading.eps_low <= reading.eps_point and math.isfinite(reading.z)
    one_step = MarkovDFATask.random(3, 3, 1, rng=0)
    single = tiltsmc.smc(one_step.policy(), one_step.twist(0.3, rng=1), num_particles=8, rng=0)
    smallest = math.nextafter(2.0**-54, 1.0)
    assert 1.0 - smallest < 1.0
    low = tiltsmc.diagnostics.online_bellman(single, confidence=smallest)
    # two-sided: z >= 0 at any level (a one-sided z was negative below 0.5, a bound above the point reading)
    assert 0.0 <= low.z < 1e-12 and low.eps_low <= low.eps_point and "eps >=" in low.summary()
    for level in (1e-17, 2.0**-54, 0.0, 1.0):
        with pytest.raises(ValueError, match=r"^confidence: expected a level in \(0, 1\)"):
            tiltsmc.diagnostics.online_bellman(single, confidence=level)
        with pytest.raises(ValueError, match=r"^confidence: expected a level in \(0, 1\)"):
            tiltsmc.diagnostics.OnlineBellman("smc", low.increments, low.standard_errors, confidence=level)


def test_online_bellman_refuses_what_is_not_a_result() -> None:
    with pytest.raises(TypeError, match=r"^result: expected a SamplerResult, got NoneType"):
        tiltsmc.diagnostics.online_bellman(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^standard_errors: expected a \(B, steps\) array"):
        tiltsmc.diagnostics.OnlineBellman("smc", np.zeros((2, 3)), np.zeros((2, 2)))


def test_to_dict_is_strict_json_as_a_sampler_result() -> None:
    # Infinite values were written as Infinity (not JSON) by BellmanEstimate and as "-inf" strings by
    # OnlineBellman; a SamplerResult writes null.
    zero = MarkovDFATask.random(3, 3, 3, zero_reward_fraction=1.0, ensure_positive=False, rng=0)
    estimate = tiltsmc.diagnostics.bellman_error(zero.policy(), zero.unguided(), num_prefixes=8, rng=0)
    assert estimate.eps == estimate.ratio_bound == math.inf
    record = json.loads(json.dumps(estimate.to_dict(), allow_nan=False))
    assert record["eps"] is None and record["ratio_bound"] is None and record["eps_interval"] == [None, None]
    assert record["per_step"] == [None if math.isinf(v) else v for v in estimate.per_step]
    result = tiltsmc.smc(zero.policy(), zero.twist(), num_particles=4, rng=0)
    reading = tiltsmc.diagnostics.online_bellman(result).to_dict()
    assert json.loads(json.dumps(reading, allow_nan=False)) == reading
    assert reading["increments"] == result.to_dict()["log_z_increments"] == [[None, None, None]]
    assert reading["standard_errors"] == result.to_dict()["log_z_increment_se"] == [[None, None, None]]
    assert reading["per_step_low"] == [[0.0, 0.0, 0.0]] and reading["eps_low"] == 0.0


@pytest.mark.slow
def test_the_online_lower_bound_holds_at_its_stated_confidence_for_an_exact_twist() -> None:
    """With ``V*`` as the twist (``eps = 0``), ``eps_low > 0`` is a false claim. Over 2000 runs of 4
    prompts x 4 steps x 256 particles its share stays within 5 binomial standard deviations of
    ``1 - confidence``, either way: a step's bound fails where ``l_t`` strays from ``log m_t = 0`` by more
    than ``z se_t`` either way, so ``z`` is two-sided (the one-sided quantile made false claims 10.5% of
    the time, twice the 5% stated). The lower end holds too: Bonferroni over the 16 readings (independent
    prompts, martingale differences along a run) is nearly exact, ``1 - (1 - 0.05/16)^16 = 4.88%``, so a
    share far below 5% means margins too wide (standard errors 1.5x too large: 0.05%; measured 5.65% as
    they are, 25.9% at 0.8x)."""
    task = MarkovDFATask.random(3, 3, 4, rng=11, zero_reward_fraction=0.0)
    twist = task.twist()
    assert task.bellman_error(twist).eps == 0.0
    runs, false_claims = 2000, 0
    for seed in range(runs):
        result = tiltsmc.smc(
            task.policy(), twist, prompts=[()] * 4, num_particles=256, resample="multinomial",
            ess_threshold=1.0, rng=seed,
        )  # fmt: skip
        false_claims += tiltsmc.diagnostics.online_bellman(result).eps_low > 0
    # 5 binomial sd of 2000 runs at 5%: [2.56%, 7.44%]; P(false failure) ~ 6e-7 at a true 5% (1e-6 at the
    # Bonferroni 4.88%: 4.8 sd above the lower end)
    stated, z_sigma = 0.05, 5.0
    margin = z_sigma * math.sqrt(stated * (1 - stated) / runs)
    assert abs(false_claims / runs - stated) <= margin, false_claims


def test_sampled_intervals_do_not_depend_on_the_scale_of_a_branchs_values() -> None:
    """Two absorbing branches chosen by the first token, the second's reward 1, 1e-2 or 1e-6 times the
    first's, and the same noisy twist: ``log rho`` is the same at every step after the first, so are its
    sampled intervals (the same draws), and the exact ``eps`` lies in each. The sd floor was in the values'
    units: the small branch's prefixes got margins 10^2 - 10^6 times too wide (``eps_high`` 117 and inf).
    At the last step every continuation of a prefix has its branch's reward (the automaton's states are
    absorbing): no spread to read, so that step's interval is ``[0, inf]`` (it was a point, which only this
    twist's constant values made right), and the others stay finite."""
    dfa = np.array([[1, 2], [1, 1], [2, 2]])
    highs = []
    for low in (1.0, 1e-2, 1e-6):
        task = MarkovDFATask([0.5, 0.5], [[0.5, 0.5], [0.5, 0.5]], dfa, 0, [0.0, 1.0, low], 4)
        tables = task.twist_tables(0.3, rng=0)
        exact = task.bellman_error(tables).eps
        estimate = tiltsmc.diagnostics.bellman_error(
            task.policy(), TableTwist(task, tables), num_prefixes=200, samples_per_prefix=64,
            method="sampled", rng=1,
        )  # fmt: skip
        assert estimate.eps_low <= exact <= estimate.eps_high, (low, estimate)
        assert np.all(np.isfinite(estimate.per_step_high[:-1])) and estimate.per_step_high[-1] == np.inf
        highs.append(estimate.per_step_high[1:])
    np.testing.assert_allclose(highs[1], highs[0], rtol=1e-9)
    np.testing.assert_allclose(highs[2], highs[0], rtol=1e-9)


# ----------------------------------------------------------------------------------------------------------
# Review of the estimator (s34): steps with no spread to read, and prompts weighted or gauged together


def test_a_step_whose_sampled_continuations_all_agree_has_no_finite_interval() -> None:
    """At the last step the 2 continuations of each of the 4 prefixes agreed, so the step's pooled relative
    sd was 0 and its interval the point 2.10: ``eps_low = 2.10`` against the exact ``eps = 0.49``. Draws that
    agree cannot tell a step whose values are constant from one whose spread they missed: the step has no
    finite standard error, its interval is ``[0, inf]``, as with one continuation, the point estimate
    standing. Over 100 tasks (1 and 4 prefixes, ``M = 2``) a run's ``eps_low`` exceeds the exact ``eps``
    only if one of its simultaneous 95% intervals misses (the visited supremum is at most ``eps``): at most
    Binomial(100, 0.05) runs, > 13 with probability < 1e-3 (with the zero-width steps: 33 runs; now 0)."""
    task = MarkovDFATask.random(3, 3, 4, rng=2, zero_reward_fraction=0.0)
    twist = task.twist(0.3, rng=3)
    exact = task.bellman_error(twist)
    estimate = tiltsmc.diagnostics.bellman_error(
        task.policy(), twist, num_prefixes=4, samples_per_prefix=2, method="sampled", rng=2
    )
    assert estimate.per_step[-1] > 2.0 > exact.per_step[-1]  # the noisy point estimate, as it was
    assert estimate.per_step_low[-1] == 0.0 and estimate.per_step_high[-1] == math.inf
    assert np.all(estimate.per_step_low <= exact.per_step + 1e-12)
    assert estimate.eps_low <= exact.eps <= estimate.eps_high
    runs, misses = 100, 0
    for seed in range(runs):
        task = MarkovDFATask.random(3, 3, 4, rng=seed, zero_reward_fraction=0.5 if seed % 2 else 0.0)
        twist = task.twist(0.3, rng=seed + 1)
        estimate = tiltsmc.diagnostics.bellman_error(
            task.policy(), twist, num_prefixes=1 + 3 * (seed % 4 >= 2), samples_per_prefix=2,
            method="sampled", rng=seed,
        )  # fmt: skip
        misses += estimate.eps_low > task.bellman_error(twist).eps + 1e-12
    assert misses <= _binomial_upper(runs, 0.05) == 13, misses


class _PerPrompt:
    """Prompt 0 read by ``first``, prompt 1 by ``second`` (two reward models of one task, twist heads
    included): how a model may scale its prompts' values differently."""

    def __init__(self, first: TableTwist, second: TableTwist) -> None:
        self.first, self.second = first, second

    def _mixed(self, name: str, particles: Particles) -> Any:
        values = np.array(getattr(self.first, name)(particles), dtype=float)
        values[1] = np.array(getattr(self.second, name)(particles), dtype=float)[1]
        return values

    def initial_log_value(self, particles: Particles) -> Any:
        return self._mixed("initial_log_value", particles)

    def log_value(self, particles: Particles) -> Any:
        return self._mixed("log_value", particles)

    def next_log_values(self, particles: Particles) -> Any:
        return self._mixed("next_log_values", particles)


def _rescaled(task: MarkovDFATask, tables: Any, log_scale: Any) -> TableTwist:
    """The twist ``log Vh_t = tables[t] + log_scale[t]``, ``t = 0..T``: each level rescaled by a constant."""
    return TableTwist(task, [np.asarray(tables[t]) + log_scale[t] for t in range(task.horizon + 1)])


class _Recorder(MarkovPolicy):
    """The task's policy, recording at each step of the rollouts (the particles ``start`` returned) the
    scored prefixes (unfinished, ``Vh_{t-1} > 0``), their ``log Vh_{t-1}`` and their exact ``log rho_t``
    (from the twist head): what ``bellman_error``'s exact method reads."""

    def __init__(self, task: MarkovDFATask, reward: Any) -> None:
        super().__init__(task)
        self.reward = reward
        self.rollouts: Optional[Particles] = None
        self.steps: list[tuple[Any, Any, Any]] = []

    def start(self, prompts: Any, num_particles: int) -> Particles:
        self.rollouts, self.steps = super().start(prompts, num_particles), []
        return self.rollouts

    def propose(self, particles: Particles, rng: Any) -> None:
        if particles is self.rollouts:
            if particles.lengths.max() == 0:
                log_prev = np.asarray(self.reward.initial_log_value(particles), float)[:, None]
                log_prev = np.repeat(log_prev, particles.lengths.shape[1], axis=1)
            else:
                log_prev = np.asarray(self.reward.log_value(particles), float)
            log_mean = logsumexp(self.next_log_probs(particles) + self.reward.next_log_values(particles))
            scored = ~particles.finished & (log_prev > -np.inf)
            self.steps.append(
                (scored, log_prev, np.where(scored, log_mean - np.where(scored, log_prev, 0), 0))
            )
        super().propose(particles, rng)


def test_average_error_weighs_each_prompt_alike_whatever_its_scale() -> None:
    """Rescaling one prompt's ``Vh`` by a constant changes no ``rho`` and no sampler's output, so it leaves
    ``average_per_step`` as it is: per prompt, the ``Vh_{t-1}``-weighted mean of ``|rho_t - 1|`` over its
    prefixes (the twisted prefix law is one per prompt), then the mean over the prompts. The weights were
    normalised over all prompts together: ``average_eps`` 0.30, 0.033 and 0.69 for prompt 1 scaled by
    ``e^0``, ``e^-20`` and ``e^20`` (the prompt of larger values took all the weight)."""
    task = MarkovDFATask.random(3, 3, 4, rng=11, zero_reward_fraction=0.0)
    star, noisy = task.log_v_star(), task.twist_tables(0.8, rng=3)
    ones = np.ones(task.horizon + 1)
    averages = []
    for method in ("sampled", "exact"):
        for shift in (0.0, -20.0, 20.0):
            reward = _PerPrompt(TableTwist(task, star), _rescaled(task, noisy, shift * ones))
            policy = _Recorder(task, reward)
            estimate = tiltsmc.diagnostics.bellman_error(
                policy, reward, prompts=[(), ()], num_prefixes=100, samples_per_prefix=8, method=method,
                rng=0,
            )  # type: ignore[arg-type]  # fmt: skip
            averages.append(estimate.average_per_step)
            if method == "exact":  # the definition, from the recorded prefixes
                expected = []
                for scored, log_prev, log_rho in policy.steps:
                    per_prompt = []
                    for b in range(2):
                        weights = np.exp(log_prev[b][scored[b]] - log_prev[b][scored[b]].max())
                        deviation = np.abs(np.exp(log_rho[b][scored[b]]) - 1.0)
                        per_prompt.append(np.sum(weights * deviation) / np.sum(weights))
                    expected.append(np.mean(per_prompt))
                np.testing.assert_allclose(estimate.average_per_step, expected, rtol=1e-12, atol=1e-14)
    for sampled in averages[1:3]:
        np.testing.assert_allclose(sampled, averages[0], rtol=1e-12, atol=1e-14)
    for exact in averages[4:]:
        np.testing.assert_allclose(exact, averages[3], rtol=1e-12, atol=1e-14)
    assert np.all(averages[3] > 0.01)  # prompt 1's noise shows at every step
    # one prompt: the Vh_{t-1}-weighted mean over its prefixes, as before
    reward = TableTwist(task, noisy)
    policy = _Recorder(task, reward)
    estimate = tiltsmc.diagnostics.bellman_error(policy, reward, num_prefixes=100, method="exact", rng=1)
    expected = []
    for scored, log_prev, log_rho in policy.steps:
        weights = np.exp(log_prev[scored] - log_prev[scored].max())
        expected.append(np.sum(weights * np.abs(np.exp(log_rho[scored]) - 1.0)) / np.sum(weights))
    np.testing.assert_allclose(estimate.average_per_step, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["exact", "sampled"])
def test_the_gauge_is_chosen_per_prompt(method: str) -> None:
    """Each prompt's particles are weighted among themselves, so rescaling a prompt's level ``t`` alone
    changes no sampler's output: the gauge's shift of ``log rho_t`` is per prompt. Prompt 0 read by ``V*``,
    prompt 1 by ``V*`` rescaled per level: each is gauge-exact, and so is the pair (``gauge_eps`` 0, it was
    0.649 with one shift for both prompts); with sampled continuations the pair reads as ``V*`` on both
    prompts (the same draws: prompt 1's ``log rho_t`` moved by a constant). Prompt 1's shifted potentials
    are ``V*``'s, so ``gauge_ratio_bound`` is ``V*``'s too."""
    task = MarkovDFATask.random(3, 3, 4, rng=11, zero_reward_fraction=0.0)
    star = task.log_v_star()
    levels = [0.0, 0.5, -0.5, 0.5, 0.0]  # log c_t, t = 0..T: Vh_T = r stays exact
    estimates = {}
    for name, second in (("star", TableTwist(task, star)), ("scaled", _rescaled(task, star, levels))):
        estimates[name] = tiltsmc.diagnostics.bellman_error(
            task.policy(), _PerPrompt(TableTwist(task, star), second), prompts=[(), ()], num_prefixes=64,
            samples_per_prefix=8, method=method, rng=0,
        )  # type: ignore[arg-type]  # fmt: skip
    together, alone = estimates["scaled"], estimates["star"]
    assert together.eps > 0.6  # e^0.5 - 1: prompt 1's levels are off by constants
    np.testing.assert_allclose(together.gauge_per_step, alone.gauge_per_step, rtol=1e-9, atol=1e-9)
    assert together.gauge_ratio_bound == pytest.approx(alone.gauge_ratio_bound, rel=1e-9)
    if method == "exact":
        assert alone.eps < 1e-9 and together.gauge_eps < 1e-9
        # V*'s own gauge is the identity (its log rho are all 0): L in the gauge is V*'s own
        assert together.gauge_ratio_bound == pytest.approx(alone.positive_ratio_bound, rel=1e-9)
    else:
        assert together.gauge_eps == pytest.approx(alone.gauge_eps, rel=1e-9) and alone.gauge_eps > 0
