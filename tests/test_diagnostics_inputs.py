"""Adversarial input to the Bellman diagnostics, the test-bed tasks and ``SamplerResult``'s readers.

Every case here was a defect of a fuzzing pass: a crash with an unrelated exception (OverflowError,
AttributeError, MemoryError, numpy's own errors), a silently wrong number (NaN, a bound computed from
nonsense), a prompt that failed without being reported, or a message that blamed the wrong argument. Bad
input now gets a clear error naming the argument, and a refused call changes nothing."""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import pytest
import tiltsmc
from tiltsmc.diagnostics import OnlineBellman, bellman_error, online_bellman
from tiltsmc.models.particles import Particles
from tiltsmc.samplers.result import SamplerResult, failed_result
from tiltsmc.tasks import MarkovDFATask, hard_instance
from tiltsmc.tasks.models import MarkovPolicy, TableTwist


@pytest.fixture(scope="module")
def task() -> MarkovDFATask:
    return MarkovDFATask.random(3, 3, 4, rng=11, zero_reward_fraction=0.0)


@pytest.fixture(scope="module")
def result(task: MarkovDFATask) -> SamplerResult:
    return tiltsmc.smc(task.policy(), task.twist(0.3, rng=1), prompts=[(), ()], num_particles=8, rng=0)


# ----------------------------------------------------------------------------------------------------------
# online_bellman and OnlineBellman


@pytest.mark.parametrize("eps", [10**400, -(10**400)])
def test_eps_beyond_the_doubles_is_read_as_infinite_not_an_overflow(result: SamplerResult, eps: int) -> None:
    # OverflowError: int too large to convert to float (no argument named)
    reading = online_bellman(result)
    if eps > 0:
        assert not reading.exceeds(eps) and reading.warnings(eps) == []
        assert online_bellman(result, eps=eps).eps_low == reading.eps_low
        assert "within eps = inf" in reading.summary(eps)
    else:
        with pytest.raises(ValueError, match=r"^eps: expected a number >= 0, got -1000"):
            reading.exceeds(eps)
        with pytest.raises(ValueError, match=r"^eps: expected a number >= 0"):
            online_bellman(result, eps=eps)


def test_negative_zero_eps_reads_as_zero(result: SamplerResult) -> None:
    assert online_bellman(result).summary(-0.0).endswith(" eps = 0")  # was "eps = -0"


@pytest.mark.parametrize(
    ("increments", "standard_errors", "error", "match"),
    [
        # NaN or +inf increments read as "every prompt collapsed", negative or NaN standard errors gave a
        # bound above the point reading or eps_low = nan
        ([[0.5, math.nan]], [[0.1, 0.1]], ValueError, r"^increments: expected log Z increments that are "
         r"finite or -inf, got NaN at \(prompt 0, step 2\)"),
        ([[math.inf]], [[0.1]], ValueError, r"^increments: .* got \+inf at \(prompt 0, step 1\)"),
        ([[0.5]], [[-1.0]], ValueError, r"^standard_errors: expected standard errors >= 0 \(inf where "
         r"unknown\), got -1\.0 at \(prompt 0, step 1\)"),
        ([[0.5]], [[math.nan]], ValueError, r"^standard_errors: .* got nan at \(prompt 0, step 1\)"),
        # lists crashed in per_step_low (TypeError from a list index), strings in isfinite
        ([["a"]], [["b"]], TypeError, r"^increments: expected an array of real numbers, got dtype <U1"),
        ([[0.5]], [[True]], TypeError, r"^standard_errors: expected an array of real numbers, got dtype b"),
        ([[0.5]], None, TypeError, r"^standard_errors: expected an array of real numbers, got dtype object"),
        ([0.5, 0.2], [0.1, 0.1], ValueError, r"^increments: expected a \(B, steps\) array, got shape \(2,\)"),
        # ragged rows: numpy's "setting an array element with a sequence", naming no field
        ([[0.1, 0.2], [0.1]], [[0.1, 0.1], [0.1]], ValueError,
         r"^increments: expected a \(B, steps\) array, got a ragged sequence \(rows of different lengths\)$"),
        ([[0.1, 0.2], [0.1, 0.3]], [[0.1], [0.1, 0.1]], ValueError,
         r"^standard_errors: expected a \(B, steps\) array, got a ragged sequence"),
        ([[1, 2]], [[0.1, 0.2]], None, ""),  # ints are real numbers
    ],
)  # fmt: skip
def test_online_reading_refuses_nonsense_arrays(
    increments: Any, standard_errors: Any, error: Any, match: str
) -> None:
    if error is None:
        reading = OnlineBellman("smc", increments, standard_errors)
        assert reading.increments.dtype == np.float64 and reading.eps_low >= 0.0
        return
    with pytest.raises(error, match=match):
        OnlineBellman("smc", increments, standard_errors)


def test_online_reading_holds_its_own_arrays() -> None:
    increments, errors = np.array([[0.5, -np.inf]]), np.array([[0.1, np.inf]])
    reading = OnlineBellman("smc", increments, errors)
    increments[0, 0] = 5.0  # the caller's array changes afterwards: the reading does not
    assert reading.increments[0, 0] == 0.5 and reading.eps_point == pytest.approx(math.expm1(0.5))
    reading = OnlineBellman("smc", [[0.5, 0.1]], [[0.1, 0.1]])  # a list: read as an array
    assert reading.per_step_low.shape == (1, 2) and reading.where() == (0, 1)


def test_online_reading_of_a_malformed_result_names_its_field(result: SamplerResult) -> None:
    import dataclasses

    nan = dataclasses.replace(result, log_z_increments=np.full(result.log_z_increments.shape, np.nan))
    with pytest.raises(ValueError, match=r"^result: log_z_increments: expected log Z increments that are"):
        online_bellman(nan)
    bad_se = dataclasses.replace(result, log_z_increment_se=np.zeros((2, 1)))
    with pytest.raises(ValueError, match=r"^result: log_z_increment_se: expected a \(B, steps\) array of the "
                       r"shape of log_z_increments, got \(2, 1\) and \(2, 4\)"):  # fmt: skip
        online_bellman(bad_se)


@pytest.mark.parametrize(
    ("sampler", "error", "match"),
    [
        (None, TypeError, r"^sampler: expected the sampler's name \(a str\), got None"),
        (["smc"], TypeError, r"^sampler: expected the sampler's name \(a str\), got \['smc'\]"),
    ],
)
def test_online_reading_sampler_must_be_a_name(sampler: Any, error: type, match: str) -> None:
    # summary() crashed (AttributeError: 'NoneType' object has no attribute 'split') or printed None
    with pytest.raises(error, match=match):
        OnlineBellman(sampler, np.zeros((1, 0)), np.zeros((1, 0)))


def test_combine_refuses_what_is_not_a_reading(result: SamplerResult) -> None:
    reading = online_bellman(result)
    # AttributeError for None or a str; a generator was consumed by the emptiness check, then
    # "need at least one array to concatenate"
    for readings, match in (
        ([reading, None], r"^readings\[1\]: expected an OnlineBellman, got NoneType"),
        ("ab", r"^readings: expected a sequence of OnlineBellman readings, got str"),
        (None, r"^readings: expected a sequence of OnlineBellman readings, got NoneType"),
    ):
        with pytest.raises(TypeError, match=match):
            OnlineBellman.combine(readings)  # type: ignore[arg-type]
    combined = OnlineBellman.combine(r for r in (reading, reading))  # any iterable of readings
    assert combined.increments.shape == (4, 4)
    with pytest.raises(ValueError, match=r"^readings: expected at least one reading"):
        OnlineBellman.combine(iter([]))


def test_online_reading_of_failed_runs(result: SamplerResult) -> None:
    failed = failed_result("smc", {0: "prompt 0: boom", 1: "prompt 1: boom"})
    reading = online_bellman(failed, eps=0.1)
    assert reading.eps_low == 0.0 and "every prompt collapsed or failed" in reading.summary()
    assert reading.to_dict()["increments"] == [[], []]


# ----------------------------------------------------------------------------------------------------------
# bellman_error: models that return nonsense, prompts that fail during the rollouts


class _Twist:
    """``twist``'s values, passed through ``change`` (one of its methods' outputs)."""

    def __init__(self, twist: TableTwist, method: str, change: Callable[[Any], Any]) -> None:
        self.twist, self.method, self.change = twist, method, change

    def _out(self, method: str, values: Any) -> Any:
        return self.change(values) if method == self.method else values

    def initial_log_value(self, particles: Particles) -> Any:
        return self._out("initial_log_value", self.twist.initial_log_value(particles))

    def log_value(self, particles: Particles) -> Any:
        return self._out("log_value", self.twist.log_value(particles))

    def next_log_values(self, particles: Particles) -> Any:
        return self._out("next_log_values", self.twist.next_log_values(particles))


@pytest.mark.parametrize("method", ["exact", "sampled"])
@pytest.mark.parametrize(
    ("change", "dtype"),
    [
        (lambda v: np.asarray(v).astype(str), "<U"),  # read as numbers (float("-0.3")): a silent parse
        (lambda v: np.asarray(v) + 0j, "complex128"),  # the imaginary part dropped with a warning
        (lambda v: np.zeros(np.shape(v), dtype=bool), "bool"),  # True read as log Vh = 1
        (lambda v: np.array([None] * np.size(v), dtype=object).reshape(np.shape(v)), "object"),
    ],
)
def test_log_values_that_are_not_real_numbers_are_refused(
    task: MarkovDFATask, method: str, change: Callable[[Any], Any], dtype: str
) -> None:
    for where in ("initial_log_value", "log_value"):
        reward = _Twist(task.twist(0.3, rng=1), where, change)
        with pytest.raises(ValueError, match=rf"^reward: {where} returned an array of dtype {dtype}"):
            bellman_error(task.policy(), reward, num_prefixes=4, samples_per_prefix=2, method=method, rng=0)
        # the samplers read a model's output through the same check (samplers._engine.model_output)
        with pytest.raises(ValueError, match=rf"reward: {where} returned an array of dtype {dtype}"):
            tiltsmc.smc(task.policy(), reward, prompts=[()], num_particles=4, rng=0)


class _Policy(MarkovPolicy):
    """The task's policy, its log-probabilities unchecked (``log_probs_checked`` False) and changed by
    ``change`` for prompt ``prompt`` at prefixes of length ``at``; or failing that prompt in ``propose``
    there (``fail``), as an ONNX policy fails a prompt whose context runs out."""

    log_probs_checked = False

    def __init__(
        self, task: MarkovDFATask, prompt: int, at: int, change: Any = None, fail: str = "", only: str = ""
    ) -> None:
        super().__init__(task)
        self.prompt, self.at, self.change, self.fail, self.only = prompt, at, change, fail, only
        self.rollout: Particles | None = None
        self.proposing = False  # propose draws from the unchanged law (the policy's own business)

    def start(self, prompts: Any, num_particles: int) -> Particles:
        self.rollout = super().start(prompts, num_particles)
        return self.rollout

    def next_log_probs(self, particles: Particles) -> Any:
        log_p = np.array(super().next_log_probs(particles))
        if self.change is not None and not self.proposing:
            rows = particles.lengths[self.prompt] == self.at
            log_p[self.prompt][rows] = self.change(log_p[self.prompt][rows])
        return log_p

    def propose(self, particles: Particles, rng: np.random.Generator) -> Any:
        which = "rollout" if particles is self.rollout else "continuations"
        b = self.prompt
        if self.fail and self.only in ("", which) and np.any(particles.lengths[b] == self.at):
            particles.errors[b] = f"prompt {b}: {self.fail}"
            particles.finished[b] = True
        self.proposing = True
        try:
            return super().propose(particles, rng)
        finally:
            self.proposing = False


@pytest.mark.parametrize(
    ("change", "what"),
    [
        (lambda row: row * np.nan, "NaN"),
        (lambda row: row + np.inf, r"\+inf"),
        (lambda row: row - np.inf, "only -inf"),
    ],
)
def test_policy_log_probs_without_a_law_fail_their_prompt(
    task: MarkovDFATask, change: Any, what: str
) -> None:
    # the exact method read NaN rows as eps = nan, +inf rows as eps = inf, silently
    policy = _Policy(task, prompt=1, at=2, change=change)
    twist = task.twist(0.3, rng=1)
    estimate = bellman_error(policy, twist, prompts=[(), ()], num_prefixes=16, method="exact", rng=0)
    assert list(estimate.errors) == [1]
    # as a sampler words it (fail_prompts_with_bad_log_probs, then prompt_error)
    reason = (
        f"prompt 1: policy: next_log_probs returned {what.replace(chr(92), '')} for this prompt's particles"
    )
    assert estimate.errors[1] == f"{reason} (no token can be drawn from them)"
    assert math.isfinite(estimate.eps) and estimate.eps <= task.bellman_error(twist).eps + 1e-12


def test_policy_log_probs_of_the_wrong_vocabulary_blame_the_policy(task: MarkovDFATask) -> None:
    # the reward model's twist head was blamed: "reward: next_log_values returned shape (1, 4, 3), expected
    # (1, 4, 2)"
    policy = _Policy(task, prompt=0, at=-1)
    policy.next_log_probs = lambda particles: MarkovPolicy.next_log_probs(policy, particles)[..., :2]  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=r"^policy: next_log_probs returned shape \(1, 4, 2\), expected "
                       r"\(B, N, vocab_size\) = \(1, 4, 3\)"):  # fmt: skip
        bellman_error(policy, task.twist(0.3, rng=1), num_prefixes=4, method="exact", rng=0)


@pytest.mark.parametrize(("method", "only"), [("exact", ""), ("sampled", ""), ("sampled", "continuations")])
def test_a_prompt_the_policy_fails_during_the_rollouts_is_reported(
    task: MarkovDFATask, method: str, only: str
) -> None:
    # it was not reported, and its continuations that never took their step read rho = 1
    twist = task.twist(0.3, rng=1)
    policy = _Policy(task, prompt=1, at=2, fail="the context is full", only=only)
    estimate = bellman_error(
        policy, twist, prompts=[(), ()], num_prefixes=32, samples_per_prefix=4, method=method, rng=0
    )  # type: ignore[arg-type]
    assert estimate.errors == {1: "prompt 1: the context is full"}
    assert estimate.to_dict()["errors"] == {"1": "prompt 1: the context is full"}
    assert math.isfinite(estimate.eps) and estimate.num_prefixes == 32
    every = _Policy(task, prompt=0, at=2, fail="the context is full", only=only)
    message = (
        r"^prompts: the policy failed every one of the 1 prompt\(s\) during the rollouts, so the later steps "
        r"were never observed; prompt 0: the context is full"
    )
    with pytest.raises(ValueError, match=message):
        bellman_error(every, twist, num_prefixes=8, samples_per_prefix=2, method=method, rng=0)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["exact", "sampled"])
def test_log_values_whose_ratios_overflow_give_no_nan(task: MarkovDFATask, method: str) -> None:
    # log Vh_0 = 1.7e308 and log Vh_t = -1.7e308: log rho_1 overflows to -inf; the gauge read
    # (-inf) - (-inf) = nan at step 1
    huge = _Twist(task.twist(0.3, rng=1), "initial_log_value", lambda v: np.full(np.shape(v), 1.7e308))
    low = _Twist(huge, "log_value", lambda v: np.where(np.asarray(v) > -np.inf, -1.7e308, v))
    low.next_log_values = lambda p: np.where(  # type: ignore[method-assign]
        np.asarray(huge.next_log_values(p)) > -np.inf, -1.7e308, -np.inf
    )
    with np.errstate(all="raise"):  # no overflow warning either
        estimate = bellman_error(
            task.policy(), low, num_prefixes=8, samples_per_prefix=2, method=method, rng=0
        )  # type: ignore[arg-type]
    fields = [estimate.eps, estimate.eps_low, estimate.eps_high, estimate.gauge_eps, estimate.ratio_bound]
    arrays = [estimate.per_step, estimate.gauge_per_step, estimate.per_step_low, estimate.per_step_high]
    assert not any(math.isnan(value) for value in fields)
    assert not any(np.isnan(array).any() for array in arrays)
    assert estimate.eps == estimate.gauge_eps == math.inf


# ----------------------------------------------------------------------------------------------------------
# the tasks: sizes that need more memory than there is


def test_hard_instance_that_needs_more_memory_than_there_is_is_refused(monkeypatch: Any) -> None:
    from tiltsmc import _memory

    # m = 10^6 (B = 2, a = 1.0001) allocated T levels of B x (2m + 2) values each: 96 TB, killed by the
    # kernel; B = 10^6 an array of 3 B^2 values, MemoryError naming no argument
    monkeypatch.setattr(_memory, "available_memory", lambda: 8 * 2**30)
    message = (
        r"^m: the hard instance with m = 1000000 and branching 2 needs about 2.9e\+14 bytes of memory to "
        r"build, more than the 8.6e\+09 available"
    )
    with pytest.raises(ValueError, match=message):
        hard_instance(1.0001, 10**6, rng=0, branching=2)
    with pytest.raises(ValueError, match=r"^branching: the hard instance with m = 1 and branching 1000000 "):
        hard_instance(2, 1, rng=0, branching=10**6)
    with pytest.raises(ValueError, match=r"^a: the hard instance with m = 1 and branching 10000 "):
        hard_instance(10**4, 1, rng=0)
    assert hard_instance(2, 300, rng=0).task.horizon == 900  # 90 MB
    monkeypatch.setattr(_memory, "available_memory", lambda: None)  # unknown: not checked
    assert hard_instance(2, 2, rng=0).m == 2


# ----------------------------------------------------------------------------------------------------------
# SamplerResult.weight_histogram: a number of bins beyond the memory


def test_weight_histogram_with_more_bins_than_memory_is_refused(
    result: SamplerResult, monkeypatch: Any
) -> None:
    from tiltsmc import _memory

    # MemoryError (bins = 10^9) or numpy's "Maximum allowed size exceeded" (10^30), naming no argument
    monkeypatch.setattr(_memory, "available_memory", lambda: 2**30)
    for bins in (10**9, 10**30, np.uint64(2**64 - 1)):
        with pytest.raises(
            ValueError,
            match=r"^bins: \d+ bins need about .* bytes of memory, more than the 1.1e\+09 available",
        ):
            result.weight_histogram(0, bins=bins)
    counts, edges = result.weight_histogram(0, bins=1000)
    assert counts.sum() == 8 and edges.shape == (1001,)


def test_reading_keeps_its_confidence_as_a_plain_float() -> None:
    """A numpy level is checked and kept as a float: ``to_dict`` promises plain Python types (a float32
    level failed ``json.dumps``, and ``z`` was computed in float32)."""
    import json

    reading = OnlineBellman("smc", np.zeros((1, 2)), np.zeros((1, 2)), confidence=np.float32(0.95))
    assert type(reading.confidence) is float
    assert json.loads(json.dumps(reading.to_dict(), allow_nan=False))["confidence"] == reading.confidence
    assert type(OnlineBellman.combine([reading, reading]).confidence) is float
