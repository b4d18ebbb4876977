"""``bellman_error``: rounding read as a Bellman error, the exact method on a policy whose step is several
tokens, and prompts whose intervals depended on the other prompts of the batch."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import tiltsmc
from tiltsmc.models.particles import Particles
from tiltsmc.tasks import MarkovDFATask
from tiltsmc.tasks.models import MarkovPolicy, TableTwist


@pytest.mark.parametrize("seed", [19, 38, 68, 72, 155])
def test_the_exact_value_function_has_no_sampled_lower_bound_above_zero(seed: int) -> None:
    """``V*`` (``twist(0.0)``) has ``eps = 0``, so ``eps_low > 0`` is a false claim. On these tasks every
    continuation of a prefix has the same value of ``V*``, mathematically; in floating point they differ in
    their last bits, and that relative sd (about 1e-16) counted as spread: the rule "every continuation
    agreed: ``[0, inf]``" never fired, the intervals shrank to about 1e-16, and a ``|log rho|`` of 4e-16,
    pure rounding, gave ``eps_low`` above 0 (3.0e-16 on task 19; 7 of the 18 false ``eps_low > 0`` of
    200 such tasks were rounding alone). A relative spread below ``ROUNDING`` is now no spread (these
    steps' intervals are ``[0, inf]``) and every lower end is taken ``ROUNDING`` below ``|log rho|``. A
    noisy twist of the same task still shows ``eps_low > 0``."""
    task = MarkovDFATask.random(3, 3, 5, rng=seed, zero_reward_fraction=0.0)
    policy = task.policy()
    estimate = tiltsmc.diagnostics.bellman_error(
        policy, task.twist(0.0), num_prefixes=200, samples_per_prefix=32, method="sampled", rng=seed
    )
    assert estimate.eps < 1e-12  # the point reads rounding only
    assert estimate.eps_low == 0.0, estimate
    np.testing.assert_array_equal(estimate.per_step_low, 0.0)
    np.testing.assert_array_equal(estimate.per_step_high, math.inf)  # no spread to read at any step
    noisy = task.twist(0.5, rng=seed)
    wrong = tiltsmc.diagnostics.bellman_error(
        policy, noisy, num_prefixes=200, samples_per_prefix=32, method="sampled", rng=seed
    )
    assert 0.0 < wrong.eps_low <= task.bellman_error(noisy).eps <= wrong.eps_high


def _rounded_v_star(task: MarkovDFATask, rng: int) -> TableTwist:
    """``V*``'s tables with each finite log-value moved by up to 4 units in the last place: what computing
    them in another order gives."""
    generator = np.random.default_rng(rng)
    root, *levels = task.log_v_star()
    moved = []
    for level in levels:
        level = np.asarray(level, dtype=float)
        ulps = generator.integers(-4, 5, size=level.shape)
        moved.append(np.where(np.isfinite(level), level + ulps * np.spacing(np.abs(level)), level))
    return TableTwist(task, [root, *moved])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_exact_method_reads_rounding_as_no_error(seed: int) -> None:
    """The exact method's interval was the point ``|log rho|``: ``V*`` whose log-values are rounded
    differently (a few units in the last place) read ``|log rho|`` up to 9e-16 and so ``eps_low = 8.9e-16``
    where the exact ``eps`` is 0. Its lower end is now ``ROUNDING`` below the point (the point and the upper
    end as they were); a twist with a real error keeps ``eps_low`` within 1e-9 (in log) of its ``eps``."""
    task = MarkovDFATask.random(3, 3, 5, rng=seed, zero_reward_fraction=0.0)
    policy = task.policy()
    estimate = tiltsmc.diagnostics.bellman_error(
        policy, _rounded_v_star(task, seed), num_prefixes=200, rng=seed
    )
    assert estimate.method == "exact"
    assert 0.0 < estimate.eps < 1e-12  # the rounding, as computed
    assert estimate.eps_low == 0.0 and estimate.eps_high == estimate.eps
    np.testing.assert_array_equal(estimate.per_step_low, 0.0)
    noisy = task.twist(0.3, rng=seed)
    wrong = tiltsmc.diagnostics.bellman_error(policy, noisy, num_prefixes=200, rng=seed)
    assert wrong.method == "exact" and wrong.eps_high == wrong.eps <= task.bellman_error(noisy).eps + 1e-12
    assert 0.0 < wrong.eps_low < wrong.eps
    assert math.log1p(wrong.eps) - math.log1p(wrong.eps_low) == pytest.approx(1e-9, rel=1e-3)


class _TwoTokenSteps:
    """The test-bed chain with a step of two tokens (``token_level = False``): still a token policy
    (``next_log_probs``, ``append``), whose next-token law is that of the first token of a step only."""

    token_level = False

    def __init__(self, policy: MarkovPolicy) -> None:
        self.policy = policy
        self.vocab_size = policy.vocab_size

    def start(self, prompts: Any, num_particles: int) -> Particles:
        return self.policy.start(prompts, num_particles)

    def next_log_probs(self, particles: Particles) -> Any:
        return self.policy.next_log_probs(particles)

    def append(self, particles: Particles, tokens: Any) -> None:
        self.policy.append(particles, tokens)

    def propose(self, particles: Particles, rng: np.random.Generator) -> Any:
        first = self.policy.propose(particles, rng)
        return first + self.policy.propose(particles, rng)


def test_the_exact_method_needs_a_step_of_one_token() -> None:
    """The exact method sums ``p(v|.) Vh_t(., v)`` over one next token, while a rollout step of this policy
    appends two: ``method="auto"`` took it (it checked for a token policy and a twist head only, not
    ``token_level`` as the samplers' optimal proposal does) and read the sum over the first token against
    the two-token step (per-step ``eps`` 0.44, 0.31, 0.72 on this task where 512 sampled continuations read
    0.14, 0.81, 0.64). ``"exact"`` is now refused, naming ``method``, and ``"auto"`` takes the sampled
    method, with its intervals."""
    task = MarkovDFATask.random(3, 3, 6, rng=0, zero_reward_fraction=0.0)
    policy, twist = _TwoTokenSteps(task.policy()), task.twist(0.5, rng=1)
    with pytest.raises(ValueError, match=r"^method: 'exact' .*token_level"):
        tiltsmc.diagnostics.bellman_error(policy, twist, num_prefixes=16, method="exact", rng=0)
    auto = tiltsmc.diagnostics.bellman_error(policy, twist, num_prefixes=64, samples_per_prefix=16, rng=0)
    sampled = tiltsmc.diagnostics.bellman_error(
        policy, twist, num_prefixes=64, samples_per_prefix=16, method="sampled", rng=0
    )
    assert auto.method == "sampled" and auto.samples_per_prefix == 16 and auto.per_step.shape == (3,)
    assert auto.to_dict() == sampled.to_dict()
    assert np.all(auto.per_step_low <= auto.per_step) and np.all(auto.per_step <= auto.per_step_high)
    # the same chain with a step of one token still gets the exact method
    assert tiltsmc.diagnostics.bellman_error(task.policy(), twist, num_prefixes=16, rng=0).method == "exact"


class _ConstantRatioOnPromptZero:
    """Prompt 0: ``log Vh_t = t`` whatever the tokens (every continuation of a prefix has the same value,
    ``|log rho| = 1`` at every step); the other prompts: ``V*`` of the task. No twist head: sampled."""

    def __init__(self, twist: TableTwist) -> None:
        self.twist = twist

    def initial_log_value(self, particles: Particles) -> Any:
        values = np.array(self.twist.initial_log_value(particles), dtype=float)
        values[0] = 0.0
        return values

    def log_value(self, particles: Particles) -> Any:
        values = np.array(self.twist.log_value(particles), dtype=float)
        values[0] = particles.lengths[0].astype(float)
        return values


def test_a_prompts_intervals_do_not_depend_on_the_other_prompts() -> None:
    """The relative-sd floor and the "no spread at this step" rule were pooled over every prompt of the
    batch: alone, prompt 0 (whose continuations all agree) has intervals ``[0, inf]`` at every step; beside
    a prompt with spread it borrowed that prompt's pooled sd and read ``|log rho| = 1`` as a point with a
    narrow margin (``per_step_low`` 0.7 - 1.6, ``per_step_high`` 1.9 - 3.3). They are pooled per prompt
    now, as everything else here is: the batch's intervals, the envelope of its prompts', keep prompt 0's
    ``[0, inf]``. Prompt 1 (``V*``, ``eps = 0``) has lower ends 0 with these seeds: the batch's are prompt
    0's."""
    task = MarkovDFATask.random(3, 3, 4, rng=0, zero_reward_fraction=0.0)
    reward = _ConstantRatioOnPromptZero(task.twist(0.0))
    policy = task.policy()
    alone = tiltsmc.diagnostics.bellman_error(
        policy, reward, prompts=[()], num_prefixes=32, samples_per_prefix=8, rng=0
    )
    assert alone.method == "sampled" and alone.eps == pytest.approx(math.e - 1.0, rel=1e-12)
    np.testing.assert_array_equal(alone.per_step_low, 0.0)
    np.testing.assert_array_equal(alone.per_step_high, math.inf)
    for seed in (0, 1, 2):
        batch = tiltsmc.diagnostics.bellman_error(
            policy, reward, prompts=[(), ()], num_prefixes=32, samples_per_prefix=8, rng=seed
        )
        assert batch.eps == pytest.approx(math.e - 1.0, rel=1e-12)  # prompt 0's point, as alone
        np.testing.assert_array_equal(batch.per_step_high, alone.per_step_high)
        np.testing.assert_array_equal(batch.per_step_low, alone.per_step_low)
