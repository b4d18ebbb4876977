"""The lane's own bookkeeping when runs join and leave: what it copies, and whose time it counts."""

from __future__ import annotations

import time

import numpy as np
from tiltsmc.samplers._engine import Models
from tiltsmc.samplers.lane import Lane, run_alone
from tiltsmc.samplers.result import Compute, SamplerResult
from tiltsmc.samplers.runs import Run, SMCRun
from tiltsmc.samplers.sequential import smc_run
from tiltsmc.tasks import MarkovDFATask


def _models() -> Models:
    task = MarkovDFATask.random(4, 3, 6, rng=0)
    return Models(task.policy(), task.twist(noise=0.4, rng=1), Compute())


def _run(models: Models, seed: int, max_new_tokens: int, ess_threshold: float = 0.5) -> SMCRun:
    return smc_run(
        models, None, 4, "systematic", ess_threshold, "naive", seed, record_ancestry=False, max_steps=100,
        max_new_tokens=max_new_tokens,
    )  # fmt: skip


def test_the_oldest_run_leaves_without_a_copy_and_results_are_each_runs_own() -> None:
    models = _models()
    lane = Lane(models, "guided")
    runs = [_run(models, seed, limit) for seed, limit in ((1, 2), (2, 5), (3, 5))]
    for run in runs:
        lane.add(run)
    ended: list[Run] = []
    tokens_before = None
    while len(ended) < len(runs):
        if lane.particles is not None:
            tokens_before = lane.particles.tokens
        for done, error in lane.step():
            assert error is None
            ended.append(done)
            if done is runs[0]:  # the first to join, at the front of the batch, leaves alone: views
                assert lane.particles is not None and tokens_before is not None
                assert lane.rows == 8 and np.shares_memory(lane.particles.tokens, tokens_before)
    assert ended[0] is runs[0]
    for seed, limit, run in zip((1, 2, 3), (2, 5, 5), runs):
        alone = run_alone(models, _run(models, seed, limit))
        together = run.result
        assert isinstance(alone, SamplerResult) and together is not None
        assert [s.tolist() for s in alone.samples] == [s.tolist() for s in together.samples]
        np.testing.assert_array_equal(alone.log_z, together.log_z)


def test_deferred_work_run_at_a_leave_is_the_policys_time() -> None:
    """The policy's postponed work (a decoder's session run) that a leaving run's rows force is timed as
    the policy's and shared by the runs, not counted as tiltsmc's own time."""
    models = _models()
    lane = Lane(models, "guided")
    runs = [_run(models, 1, 2, ess_threshold=0.0), _run(models, 2, 5, ess_threshold=0.0)]  # no resampling
    for run in runs:
        lane.add(run)
    lane.step()  # both join and take their first step
    assert lane.particles is not None
    lane.particles.defer(lambda: time.sleep(0.2))
    before = models.compute.policy_seconds
    shares = [run.compute.policy_seconds for run in runs]
    ended = lane.step()  # the first run ends: its rows leave, which runs the deferred work first
    assert [run for run, _ in ended] == [runs[0]]
    assert models.compute.policy_seconds - before >= 0.2
    for run, share in zip(runs, shares):
        assert run.compute.policy_seconds - share >= 0.1
