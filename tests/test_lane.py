"""The lane's own bookkeeping when runs join and leave: what it copies, and whose time it counts."""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import pytest
from poisoned_policy import Poison, RefusesPoison
from tiltsmc import core
from tiltsmc._rng import RowStreams
from tiltsmc.models.particles import Particles
from tiltsmc.samplers._engine import Models
from tiltsmc.samplers.baselines import best_of_n_run, rejection_run
from tiltsmc.samplers.correction import mh_run
from tiltsmc.samplers.lane import Lane, _Ledger, _packing, halves, run_alone, run_together
from tiltsmc.samplers.result import Compute, SamplerResult
from tiltsmc.samplers.runs import Run, SharedStep, SMCRun, Trace, reweigh_together
from tiltsmc.samplers.sequential import smc_run, sp_gsmc_run
from tiltsmc.tasks import MarkovDFATask


def _models() -> Models:
    task = MarkovDFATask.random(4, 3, 6, rng=0)
    # runs of different lengths: cut short, each scored by the twist where it stops
    return Models(task.policy(allow_token_limits=True), task.twist(noise=0.4, rng=1), Compute())


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
    left_at = None  # the step the first run left at, and the batch's tokens then
    moved_in = False
    while len(ended) < len(runs):
        if lane.particles is not None:
            tokens_before = lane.particles.tokens
        for done, error in lane.step():
            assert error is None
            ended.append(done)
        if left_at is not None and left_at[0] == lane.policy_calls - 1:
            # the next step took its rows out: the runs behind moved in, views of the same memory
            assert lane.particles is not None and lane.particles.num_prompts == 8
            assert np.shares_memory(lane.particles.tokens, left_at[1])
            moved_in = True
        if ended == [runs[0]] and left_at is None:
            # the first to join, at the front of the batch, left alone: its rows free, nothing copied
            assert lane.particles is not None and tokens_before is not None and lane.rows == 8
            assert np.shares_memory(lane.particles.tokens, tokens_before)
            left_at = (lane.policy_calls, lane.particles.tokens)
    assert moved_in
    assert ended[0] is runs[0]
    for seed, limit, run in zip((1, 2, 3), (2, 5, 5), runs):
        alone = run_alone(models, _run(models, seed, limit))
        together = run.result
        assert isinstance(alone, SamplerResult) and together is not None
        assert [s.tolist() for s in alone.samples] == [s.tolist() for s in together.samples]
        np.testing.assert_array_equal(alone.log_z, together.log_z)


def test_the_ledger_splits_each_call_by_weight_and_rounds_counts_once_as_a_member_leaves() -> None:
    """Calls recorded for a set of members are charged in proportion to their weights (equal where none,
    or all zero), calls in full; a member's counts are rounded once, as it leaves, and its slot is free
    for the next, charged nothing of it."""
    ledger = _Ledger()
    a, b, c = ledger.take(), ledger.take(), ledger.take()
    # fields: policy_calls, reward_calls, policy_steps, policy_tokens, reward_evaluations, seconds x 2
    ledger.record((a, b), [1, 0, 10, 10, 0, 0.3, 0.0], np.array([3, 1]))
    ledger.record((a, b), [0, 1, 0, 0, 8, 0.0, 0.2], None)
    ledger.record((a, b), [1, 0, 5, 5, 0, 0.1, 0.0], np.array([0, 0]))
    ledger.record((c,), [1, 0, 5, 5, 0, 0.05, 0.0], None)
    got = {slot: Compute() for slot in (a, b, c)}
    ledger.settle(a, got[a])
    assert (got[a].policy_calls, got[a].reward_calls) == (2, 1)
    assert got[a].policy_steps == got[a].policy_tokens == round(7.5 + 2.5) and got[a].reward_evaluations == 4
    assert got[a].policy_seconds == pytest.approx(0.225 + 0.05)
    assert got[a].reward_seconds == pytest.approx(0.1)
    ledger.record((b,), [1, 0, 3, 3, 0, 0.01, 0.0], None)  # b alone after a left
    ledger.settle(b, got[b])
    ledger.settle(c, got[c])
    assert (got[b].policy_calls, got[b].reward_evaluations) == (3, 4)
    assert got[b].policy_steps == round(2.5 + 2.5 + 3)
    assert got[b].policy_seconds == pytest.approx(0.075 + 0.05 + 0.01)
    assert (got[c].policy_calls, got[c].policy_steps, got[c].policy_seconds) == (1, 5, pytest.approx(0.05))
    slots = [ledger.take() for _ in range(20)]  # the three freed first, then new ones
    assert len(set(slots)) == 20 and {a, b, c} <= set(slots)
    for slot in slots:  # a slot taken again is charged nothing of what its last member was
        fresh = Compute()
        ledger.settle(slot, fresh)
        assert fresh == Compute()


@pytest.mark.parametrize("start, stop", [(2, 3), (1, 4), (0, 6)])
def test_a_trace_stacks_each_fields_rows_of_the_run_step_by_step(start: int, stop: int) -> None:
    """``Trace.stacked``: field ``k``'s ``(batch, steps)`` array holds the run's rows of each recorded call's
    output ``k``, in order, with the field's dtype (a run of one row by its own path)."""
    rng = np.random.default_rng(0)
    trace = Trace()
    calls = []
    for _ in range(5):  # each call's outputs cover six rows (several runs stepped together)
        outputs = tuple(rng.normal(size=6).astype(dtype) for _, dtype in Trace.FIELDS)
        calls.append(outputs)
        trace.record(outputs, start, stop)
    stacked = trace.stacked(stop - start)
    for k, (name, dtype) in enumerate(Trace.FIELDS):
        want = np.stack([outputs[k][start:stop] for outputs in calls], axis=1)
        assert stacked[name].dtype == dtype and stacked[name].flags.c_contiguous
        np.testing.assert_array_equal(stacked[name], want)
    assert Trace().stacked(2)["ess"].shape == (2, 0)


@pytest.mark.parametrize("start, stop", [(2, 3), (1, 4)])
def test_a_long_trace_reads_its_rows_out_and_lets_the_shared_arrays_go(start: int, stop: int) -> None:
    """Past ``CHUNK`` steps the run's rows are read out and the calls' whole outputs (all the runs stepped
    together's rows) are no longer held: a long run kept every step's arrays alive. ``stacked`` is the
    same."""
    import gc
    import weakref

    rng = np.random.default_rng(1)
    trace, calls, watched = Trace(), [], []
    for _ in range(2 * Trace.CHUNK + 5):
        outputs = tuple(rng.normal(size=300).astype(dtype) for _, dtype in Trace.FIELDS)
        calls.append(tuple(output[start:stop].copy() for output in outputs))
        watched.append(weakref.ref(outputs[0]))
        trace.record(outputs, start, stop)
        del outputs
    gc.collect()
    assert sum(ref() is not None for ref in watched) == 5  # the steps since the last read-out
    stacked = trace.stacked(stop - start)
    for k, (name, dtype) in enumerate(Trace.FIELDS):
        want = np.stack([rows[k] for rows in calls], axis=1)
        assert stacked[name].dtype == dtype and stacked[name].flags.c_contiguous
        np.testing.assert_array_equal(stacked[name], want)


@pytest.mark.parametrize("seed", range(5))
def test_the_ledger_charges_each_member_what_a_call_by_call_split_would(seed: int) -> None:
    """Members join and leave between calls made to every member or to some (a lane joining newcomers),
    in equal shares or by weight: each leaving member gets exactly what splitting every call among the
    members it served gives (seconds to rounding error, counts after rounding once)."""
    rng = np.random.default_rng(seed)
    ledger = _Ledger()
    held: list[int] = []
    owed: dict[int, np.ndarray] = {}  # the call-by-call reference, by slot
    for _ in range(300):
        action = rng.random()
        if action < 0.15 or not held:
            slot = ledger.take()
            held.append(slot)
            owed[slot] = np.zeros(7)
        elif action < 0.27:
            slot = held.pop(int(rng.integers(len(held))))
            got = Compute()
            ledger.settle(slot, got)
            want = owed.pop(slot)
            assert (got.policy_calls, got.reward_calls) == (round(want[0]), round(want[1]))
            counts = (got.policy_steps, got.policy_tokens, got.reward_evaluations)
            assert counts == tuple(round(x) for x in want[2:5])
            assert (got.policy_seconds, got.reward_seconds) == pytest.approx(tuple(want[5:]), abs=1e-9)
        else:
            some = rng.random() < 0.2 and len(held) > 1
            slots = tuple(held[: int(rng.integers(1, len(held)))] if some else held)
            deltas = [1, 0, *rng.integers(0, 9, size=3).tolist(), *rng.random(2).tolist()]
            weights = rng.integers(0, 4, size=len(slots)) if rng.random() < 0.5 else None
            ledger.record(slots, deltas, weights)
            total = 0 if weights is None else int(weights.sum())
            shares = weights / total if total else np.full(len(slots), 1.0 / len(slots))
            for slot, share in zip(slots, shares):
                owed[slot] += [*deltas[:2], *(share * np.array(deltas[2:], dtype=float))]


def test_deferred_work_run_at_a_leave_is_the_policys_time() -> None:
    """The policy's postponed work (a decoder's session run) that a leaving run's rows force, when the
    next step takes them out of the batch, is timed as the policy's and charged to the runs still there,
    not counted as tiltsmc's own time."""
    models = _models()
    lane = Lane(models, "guided")
    runs = [_run(models, 1, 2, ess_threshold=0.0), _run(models, 2, 5, ess_threshold=0.0)]  # no resampling
    for run in runs:
        lane.add(run)
    lane.step()  # both join and take their first step
    ended = lane.step()  # the first run ends: its rows are free, left in the batch until the next step
    assert [run for run, _ in ended] == [runs[0]] and lane.rows == 4
    assert lane.particles is not None and lane.particles.num_prompts == 8
    lane.particles.defer(lambda: time.sleep(0.2))
    before = models.compute.policy_seconds
    shares = [run.compute.policy_seconds for run in runs]
    lane.step()  # the rows taken out, which runs the deferred work first
    assert lane.particles is not None and lane.particles.num_prompts == 4
    assert models.compute.policy_seconds - before >= 0.2
    while len(lane):  # a run's share is added to its compute as it leaves
        lane.step()
    assert runs[1].compute.policy_seconds - shares[1] >= 0.2
    assert runs[0].compute.policy_seconds == shares[0]


def test_smc_runs_of_one_particle_count_reweigh_in_one_core_call_each_as_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every step, the SMC runs with the same particle count (their own schemes, thresholds and seeds, an
    MH correction's proposal among them) are reweighted in one core call, and the SP-gSMC pools of one
    size (an MH correction's among them) drawn in one; a run with another count steps alone. Each result
    is bit for bit the run's alone."""
    models = _models()

    def runs() -> list[Run]:
        made: list[Run] = [
            smc_run(models, None, 4, scheme, threshold, "naive", seed, record_ancestry=True, max_steps=100)
            for scheme, threshold, seed in (
                ("systematic", 0.5, 1),
                ("multinomial", 1.0, 2),
                ("residual", 0.8, 3),
            )
        ]
        made.append(_run(models, 4, 6))  # shorter: leaves while the others go on
        made.append(
            smc_run(models, None, 6, "stratified", 0.9, "naive", 5, record_ancestry=False, max_steps=100)
        )
        made += [sp_gsmc_run(models, None, 6, seed, max_steps=100) for seed in (6, 8)]
        made.append(
            mh_run(models, None, None, 2, 4, 7, resample="systematic", ess_threshold=0.7, max_steps=100)
        )
        made.append(mh_run(models, None, 6, 2, 1, 9, resample="systematic", ess_threshold=0.0, max_steps=100))
        return made

    calls, pools = _counted(monkeypatch, "smc_reweight"), _counted(monkeypatch, "pool_select")

    def check(step_calls: list[tuple[int, bool]], step_pools: list[tuple[int, bool]]) -> None:
        assert sorted(step_calls) == [(1, False), (5, True)], step_calls  # the four-particle ones together
        # the three pools of six in one call (an MH run's end picks its SMC sample with its own)
        assert [c for c in step_pools if c[1]] == [(3, True)], step_pools

    batched = runs()
    assert _steps_of_every_run(Lane(models, "guided"), batched, [calls, pools], check) >= 2
    monkeypatch.undo()
    _assert_each_as_alone(models, batched, runs())


def test_optimal_proposal_runs_resample_in_one_core_call_each_as_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The twisted lane: SMC with the optimal proposal (its own schemes and seeds), exact SP-gSMC and an MH
    correction over it each take their weight update alone, then one core call per particle count
    resamples them; each result is bit for bit the run's alone."""
    models = _models()

    def runs() -> list[Run]:
        made: list[Run] = [
            smc_run(models, None, 4, scheme, 0.9, "optimal", seed, record_ancestry=False, max_steps=100)
            for scheme, seed in (("systematic", 1), ("multinomial", 2), ("stratified", 3))
        ]
        made += [sp_gsmc_run(models, None, None, seed, max_steps=100) for seed in (4, 5)]
        made.append(
            mh_run(models, None, None, 1, 1, 6, resample="systematic", ess_threshold=0.0, max_steps=100)
        )
        return made

    calls = _counted(monkeypatch, "smc_reweight")

    def check(step_calls: list[tuple[int, bool]]) -> None:  # the runs of four particles, then those of one
        assert sorted(step_calls) == [(3, True), (3, True)], step_calls

    batched = runs()
    assert _steps_of_every_run(Lane(models, "twist"), batched, [calls], check) >= 2
    monkeypatch.undo()
    _assert_each_as_alone(models, batched, runs())


def _steps_of_every_run(
    lane: Lane, runs: list[Run], logs: list[list[tuple[int, bool]]], check: Callable[..., None]
) -> int:
    """Step ``runs`` in ``lane`` until all have ended, none failing; after each step in which every run
    stepped, ``check`` the entries the step added to each of ``logs``. Returns how many steps it checked."""
    for run in runs:
        lane.add(run)
    ended = checked = 0
    while ended < len(runs):
        marks, stepping = [len(log) for log in logs], len(lane.members)
        for _, error in lane.step():
            assert error is None
            ended += 1
        if stepping == len(runs):
            check(*(log[mark:] for log, mark in zip(logs, marks)))
            checked += 1
    return checked


def _counted(monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple[int, bool]]:
    """The calls of ``core.<name>`` from now on: the rows of its first argument, and whether its ``rng``
    was a ``RowStreams`` (a call shared by several runs)."""
    calls: list[tuple[int, bool]] = []
    original = getattr(core, name)

    def counted(array: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        shared = any(isinstance(a, RowStreams) for a in (*args, *kwargs.values()))
        calls.append((array.shape[0], shared))
        return original(array, *args, **kwargs)

    monkeypatch.setattr(core, name, counted)
    return calls


def _assert_each_as_alone(models: Models, batched: list[Run], fresh: list[Run]) -> None:
    """Each run's result is the one its twin (``fresh``) gives in a lane of its own, bit for bit."""
    for run, alone in zip(batched, fresh):
        got, want = run.result, run_alone(models, alone)
        assert isinstance(got, SamplerResult) and isinstance(want, SamplerResult)
        left, right = got.to_dict(), want.to_dict()
        left.pop("compute")
        right.pop("compute")
        assert left == right, type(run).__name__


def _stepped(seed: int, log_v0: np.ndarray) -> SMCRun:
    run = SMCRun(None, 3, "systematic", 1.0, "naive", np.random.default_rng(seed), 10)
    run.begin(log_v0, np.zeros(len(log_v0), bool), {})
    return run


@pytest.mark.parametrize("kind", ["guided", "twist", "rollout"])
def test_the_finished_counts_kept_between_model_calls_are_always_the_rows_counts(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Lane._finished_rows`` is kept until a model call or a change of rows: wherever the lane reads it
    (weights of a call, the shared step's flags, the runs that end), it equals a count of the batch's
    finished rows at that moment, with runs of every sampler joining at different steps, ending at
    different lengths and joining again (an MH correction's proposals, rejection's rounds)."""
    models = _models()
    proposal = "optimal" if kind == "twist" else "naive"
    reads = []
    original = Lane._finished_rows

    def checked(lane: Lane) -> tuple[np.ndarray, np.ndarray]:
        kept = original(lane)
        finished = lane._particles().finished.reshape(-1)
        fresh = [int(finished[m.start : m.stop].sum()) for m in lane.members]
        assert kept[0].tolist() == fresh and kept[1].tolist() == [m.stop - m.start for m in lane.members]
        reads.append(len(fresh))
        return kept

    monkeypatch.setattr(Lane, "_finished_rows", checked)
    lane = Lane(models, kind)

    def made(seed: int) -> list[Run]:
        if kind == "rollout":
            return [
                best_of_n_run(models, None, 4, seed, max_steps=100, max_new_tokens=3 + seed % 4),
                rejection_run(models, None, 1.0, 2, 8, seed, batch_size=3, max_steps=100),
            ]
        runs: list[Run] = [
            smc_run(models, None, 4, "systematic", 0.7, proposal, seed, record_ancestry=False, max_steps=100,
                    max_new_tokens=2 + seed % 5),
            sp_gsmc_run(models, None, None if kind == "twist" else 4, seed, max_steps=100),
            mh_run(models, None, None if kind == "twist" else 3, 2, 1 if kind == "twist" else 2, seed,
                   resample="systematic", ess_threshold=0.5, max_steps=100),
        ]  # fmt: skip
        return runs

    ended = added = 0
    for step in range(60):
        if step % 3 == 0 and step < 30:  # newcomers at every third step, while others run
            for run in made(step):
                lane.add(run)
                added += 1
        for _, error in lane.step():
            assert error is None
            ended += 1
        if ended == added and step >= 30:
            break
    assert ended == added and len(reads) > 20


def test_runs_whose_resampling_finishes_every_row_end_at_that_step_batched_as_alone() -> None:
    """A pool's chosen candidate fills the pool, and resampling copies a finished particle over unfinished
    ones: a run whose rows have all finished so ends at that step, batched as alone. The lane kept its
    finished counts across the reorder, so a run batched with another (whose counts the shared step had
    read) took one more step with no live row, drawing an extra key: an MH request's result then differed
    from the same request alone (seed 0 of this test: another text and log Z)."""
    from pathlib import Path

    from tiltsmc.models import OnnxCausalLM, OnnxRewardModel
    from tiltsmc.samplers.lane import run_together

    fixtures = Path(__file__).parent / "fixtures" / "models"
    policy = OnnxCausalLM(fixtures / "llama-tiny", tokenizer=fixtures / "chat-tiny", max_new_tokens=6,
                          eos_token_id=[0, 63])  # fmt: skip
    reward = OnnxRewardModel(fixtures / "prm-tiny", tokenizer=fixtures / "chat-tiny")
    models = Models(policy, reward, Compute())
    for seed in (0, 12, 18):

        def made(rng: int) -> Run:
            return mh_run(models, [[5, 6, 7]], 3, 2, 1, rng, resample="systematic", ess_threshold=0.5,
                          max_steps=100)  # fmt: skip

        alone = run_alone(models, made(seed))
        together = run_together(models, [made(1000 + seed), made(seed)])[1]
        assert together.texts == alone.texts, seed
        np.testing.assert_array_equal(together.log_z, alone.log_z)
        np.testing.assert_array_equal(together.proposal_log_z, alone.proposal_log_z)


def test_a_run_whose_weights_overflow_fails_alone_when_runs_reweigh_together() -> None:
    """One core call for three runs, the second's update overflowing (log Vh_t - log Vh_{t-1} = +inf): the
    call is refused, and each run then steps alone with the key it drew: the second fails (its weights as
    they were), the others end as their own calls would have left them."""
    log_v = np.zeros((3, 3))
    log_v[1] = 1e308
    log_v_prev = np.zeros((3, 3))
    log_v_prev[1] = -1e308
    live = np.ones((3, 3), bool)
    runs = [_stepped(seed, np.zeros(1)) for seed in (1, 2, 3)]
    outcomes = reweigh_together(runs, log_v, log_v_prev, live, [False] * 3)
    assert isinstance(outcomes[1], ValueError) and "not a log-weight" in str(outcomes[1])
    np.testing.assert_array_equal(runs[1].log_w, np.zeros((1, 3)))
    for k in (0, 2):
        alone = _stepped(k + 1, np.zeros(1))
        want = alone._step(log_v[k : k + 1], np.zeros((1, 3)), live[k : k + 1], False, alone.generator)
        got = outcomes[k]
        assert not isinstance(got, Exception)
        np.testing.assert_array_equal(got if got is not None else -1, want if want is not None else -1)
        np.testing.assert_array_equal(runs[k].log_w, alone.log_w)
        np.testing.assert_array_equal(runs[k].log_z, alone.log_z)
        assert runs[k].generator.bit_generator.state == alone.generator.bit_generator.state


def test_a_shared_step_carries_the_runs_arrays_over_and_reads_replaced_ones_afresh() -> None:
    """Runs stepped together step after step through one ``SharedStep`` (the arrays of the last step reused)
    end exactly as runs stepped through a fresh one at every step (their arrays copied together each time),
    also where a run's arrays are replaced between steps (its new ones read, not the step's)."""
    rng = np.random.default_rng(5)
    steps = [rng.normal(size=(3, 3)) for _ in range(6)]
    kept = [_stepped(seed, np.zeros(1)) for seed in (1, 2, 3)]
    fresh = [_stepped(seed, np.zeros(1)) for seed in (1, 2, 3)]
    shared = SharedStep(kept)
    prev_kept, prev_fresh = np.zeros((3, 3)), np.zeros((3, 3))
    for t, log_v in enumerate(steps):
        if t == 3:  # a run's weights replaced by new arrays between steps, on both sides alike
            for runs in (kept, fresh):
                runs[1].log_w = runs[1].log_w + np.array([[0.0, -2.0, 1.0]])
                runs[1].log_total = np.logaddexp.reduce(runs[1].log_w, axis=1)
        live = np.ones((3, 3), bool)
        got = reweigh_together(kept, log_v, prev_kept, live, [False] * 3, shared)
        want = reweigh_together(fresh, log_v, prev_fresh, live, [False] * 3)
        for a, b in zip(got, want):
            assert (a is None) == (b is None)
            if a is not None:
                np.testing.assert_array_equal(a, b)
        for a, b in zip(kept, fresh):
            for name in ("log_w", "log_total", "log_z", "collapsed"):
                np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        np.testing.assert_array_equal(prev_kept, prev_fresh)
    with pytest.raises(ValueError, match="shared: a SharedStep of other runs"):
        reweigh_together(fresh, steps[0], prev_fresh, np.ones((3, 3), bool), [False] * 3, shared)


def test_the_runs_compute_adds_up_to_the_lanes() -> None:
    """Every model call's compute is charged to the runs it served: the seconds and counts split by rows
    (their sums are the lane's totals, the counts to rounding), each call counted in full by every run."""
    models = _models()
    lane = Lane(models, "guided")
    runs = [_run(models, seed, limit) for seed, limit in ((1, 3), (2, 6), (3, 6), (4, 4))]
    for run in runs:
        lane.add(run)
    while len(lane):
        for _, error in lane.step():
            assert error is None
    total = models.compute
    assert sum(r.compute.policy_seconds for r in runs) == pytest.approx(total.policy_seconds, rel=1e-9)
    assert sum(r.compute.reward_seconds for r in runs) == pytest.approx(total.reward_seconds, rel=1e-9)
    steps = sum(r.compute.policy_steps for r in runs)
    assert abs(steps - total.policy_steps) <= len(runs) * 4, (steps, total.policy_steps)
    assert all(0 < r.compute.policy_calls <= total.policy_calls for r in runs)
    assert max(r.compute.policy_calls for r in runs) > min(
        r.compute.policy_calls for r in runs
    )  # who stayed longer


@pytest.mark.parametrize(
    ("ranges", "starts"),
    [
        ([(4, 8), (8, 12), (12, 16)], [4, 8, 0]),  # the front left: the last run moves there
        ([(0, 4), (8, 12), (12, 16)], [0, 8, 4]),  # a hole in the middle: the last run moves into it
        ([(0, 4), (4, 8)], [0, 4]),  # the end left: nothing moves
        ([(3, 4), (4, 5), (8, 10)], [3, 2, 0]),  # the last two fill the free rows before the first
        ([(2, 4), (6, 12)], [0, 2]),  # a run part past the end: the runs move forward in order
        ([(0, 2), (6, 14), (14, 16)], [0, 4, 2]),  # the last moved in, the rows still free closed up
    ],
)
def test_packing_moves_the_fewest_rows_it_can(ranges: list[tuple[int, int]], starts: list[int]) -> None:
    placed = _packing(ranges)
    assert placed == starts
    total = sum(stop - start for start, stop in ranges)
    rows = sorted(
        row for (start, stop), first in zip(ranges, placed) for row in range(first, first + stop - start)
    )
    assert rows == list(range(total))  # the runs tile the rows they hold


def test_newcomers_take_over_the_rows_of_runs_that_left() -> None:
    """A run that leaves frees its rows at once; a newcomer of as many rows joins into them at the next
    step (the batch's arrays written where they lie, its size the same), and every result is the run's
    own, as alone."""
    models = _models()
    lane = Lane(models, "guided")
    first = [_run(models, seed, limit) for seed, limit in ((1, 2), (2, 6))]
    for run in first:
        lane.add(run)
    while not any(run.result is not None for run in first):
        lane.step()
    assert lane.particles is not None and lane.rows == 4 and lane.particles.num_prompts == 8
    tokens = lane.particles.tokens
    newcomer = _run(models, 3, 3)
    lane.add(newcomer)
    lane.step()
    assert lane.particles.tokens is tokens and lane.particles.num_prompts == 8 and lane.rows == 8
    assert [(m.start, m.stop) for m in lane.members] == [(0, 4), (4, 8)]
    assert lane.members[0].run is newcomer
    while newcomer.result is None or first[1].result is None:
        lane.step()
    for seed, limit, run in ((1, 2, first[0]), (2, 6, first[1]), (3, 3, newcomer)):
        alone = run_alone(models, _run(models, seed, limit))
        assert run.result is not None
        assert [s.tolist() for s in alone.samples] == [s.tolist() for s in run.result.samples]
        np.testing.assert_array_equal(alone.log_z, run.result.log_z)


def test_newcomers_that_do_not_fit_the_free_rows_join_behind_in_blocks_of_their_own_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Newcomers started together: the one that fits a free range takes it over, and those that do not
    join behind the batch in blocks of rows that follow one another in their start (one part for each
    block, not one for each run); every result is the run's own, as alone."""
    models = _models()
    lane = Lane(models, "guided")

    def run(seed: int, prompts: int, limit: int) -> SMCRun:
        return smc_run(
            models, [()] * prompts, 4, "systematic", 0.5, "naive", seed, record_ancestry=False, max_steps=100,
            max_new_tokens=limit,
        )  # fmt: skip

    first = [run(1, 1, 2), run(2, 1, 6)]
    for each in first:
        lane.add(each)
    while first[0].result is None:
        lane.step()
    assert lane.rows == 4 and lane._holes == [(0, 4)]
    # one start of four runs: 8 rows (too many), 4 (fits the free rows), 8 and 4 (no free rows left)
    newcomers = [run(3, 2, 3), run(4, 1, 4), run(5, 2, 5), run(6, 1, 3)]
    for each in newcomers:
        lane.add(each)
    joined: list[int] = []
    concatenate = Particles.concatenate.__func__  # type: ignore[attr-defined]

    def counted(cls: Any, parts: Any, **options: Any) -> Particles:
        joined.append(len(parts))
        return concatenate(cls, parts, **options)  # type: ignore[no-any-return]

    monkeypatch.setattr(Particles, "concatenate", classmethod(counted))
    lane.step()
    assert joined == [3]  # the batch, then the first newcomer's rows, then the last two's in one block
    rows = {id(member.run): (member.start, member.stop) for member in lane.members}
    assert rows[id(newcomers[1])] == (0, 4)  # the free rows, taken over
    assert [rows[id(each)] for each in (first[1], newcomers[0], newcomers[2], newcomers[3])] == [
        (4, 8), (8, 16), (16, 24), (24, 28)
    ]  # fmt: skip
    monkeypatch.undo()
    while any(each.result is None for each in [first[1], *newcomers]):
        lane.step()
    for seed, prompts, limit, each in [
        (2, 1, 6, first[1]), (3, 2, 3, newcomers[0]), (4, 1, 4, newcomers[1]), (5, 2, 5, newcomers[2]),
        (6, 1, 3, newcomers[3]),
    ]:  # fmt: skip
        alone = run_alone(models, run(seed, prompts, limit))
        assert each.result is not None
        assert [s.tolist() for s in alone.samples] == [s.tolist() for s in each.result.samples]
        np.testing.assert_array_equal(alone.log_z, each.result.log_z)


def test_runs_a_batch_call_failed_for_run_again_in_halves_and_only_the_cause_fails() -> None:
    """``run_together(again=...)``, the CLI's batches: a policy call that raises for the batch ends its
    runs with ``failed_together`` set; they run again from their start (``again``) in halves, and a half
    that fails again in halves of it, so the run that causes it fails alone with the policy's error and
    the others give exactly their results alone. Without ``again`` every run of the batch ends with the
    error; a lone run's failure is its own."""
    task = MarkovDFATask.random(4, 3, 6, rng=0)
    models = Models(RefusesPoison(task.policy()), task.twist(noise=0.4, rng=1), Compute())
    prompts: list[Any] = [(), Poison(), ()]

    def build(i: int) -> Run:
        return smc_run(
            models, [prompts[i]], 4, "systematic", 0.5, "naive", 10 + i, record_ancestry=False, max_steps=100
        )

    built: list[int] = []

    def again(i: int) -> Run:
        built.append(i)
        return build(i)

    results = run_together(models, [build(i) for i in range(3)], return_errors=True, again=again)
    assert built == [0, 1, 2, 0, 1]  # the batch in halves [0, 1] and [2], then [0, 1] in halves
    assert isinstance(results[1], RuntimeError) and "poisoned" in str(results[1])
    for i in (0, 2):
        alone = run_alone(models, build(i))
        assert isinstance(results[i], SamplerResult) and isinstance(alone, SamplerResult)
        assert [s.tolist() for s in results[i].samples] == [s.tolist() for s in alone.samples]
        np.testing.assert_array_equal(results[i].log_z, alone.log_z)
    without = run_together(models, [build(i) for i in range(3)], return_errors=True)
    assert all(isinstance(r, RuntimeError) for r in without)
    lane = Lane(models, "guided")
    lane.add(build(1))
    assert [type(error) for _, error in lane.step()] == [RuntimeError]
    assert lane.failed_together == frozenset()


class StartsPoisonFinished(RefusesPoison):
    """``RefusesPoison`` whose ``Poison`` prompts start finished (as a prompt the policy could not start)
    and whose ``propose`` raises for any batch once ``failing`` is set."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.failing = False

    def start(self, prompts: Any, num_particles: int) -> Particles:
        particles = super().start(prompts, num_particles)
        particles.finished[[isinstance(prompt, Poison) for prompt in particles.prompts]] = True
        return particles

    def propose(self, particles: Particles, rng: Any) -> Any:
        if self.failing:
            raise RuntimeError("the batch's call failed")
        return super().propose(particles, rng)


def test_a_run_back_to_waiting_is_not_in_the_batch_call_that_fails() -> None:
    """A rejection run whose rows start finished ends its round as it joins and goes back to waiting for
    another; the batch's call that then fails was the other run's alone: that one fails alone (not in
    ``failed_together``), and the waiting run goes on at the next step, ending once (it ended with the
    error and ran again: ``run_together`` then failed on a run it had counted out, a KeyError)."""
    task = MarkovDFATask.random(4, 3, 6, rng=0)
    policy = StartsPoisonFinished(task.policy())
    models = Models(policy, task.twist(noise=0.4, rng=1), Compute())

    def build(prompt: Any, seed: int) -> Run:
        return rejection_run(models, [prompt], 1.0, 2, 8, seed, batch_size=3, max_steps=100)

    lane = Lane(models, "rollout")
    running, back = build((), 1), build(Poison(), 2)
    lane.add(running)
    assert lane.step() == []
    lane.add(back)
    policy.failing = True
    ended = lane.step()
    assert [(run, type(error)) for run, error in ended] == [(running, RuntimeError)]
    assert lane.failed_together == frozenset() and lane.waiting == [back]
    policy.failing = False
    while len(lane):
        ended += lane.step()
    assert [run for run, _ in ended] == [running, back] and ended[1][1] is None
    flaky = {"calls": 0}

    def fails_once(particles: Particles, rng: Any) -> Any:
        flaky["calls"] += 1
        if flaky["calls"] == 1:
            raise RuntimeError("the batch's call failed once")
        return RefusesPoison.propose(policy, particles, rng)

    policy.propose = fails_once  # type: ignore[method-assign]
    prompts = [(), Poison()]
    results = run_together(
        models,
        [build(p, k) for k, p in enumerate(prompts)],
        return_errors=True,
        again=lambda k: build(prompts[k], k),
    )
    assert isinstance(results[0], RuntimeError) and isinstance(results[1], SamplerResult)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 8, 9])
def test_halves_split_in_order_down_to_one(n: int) -> None:
    """Halving a failed batch again and again ends at single runs in ceil(log2(n)) rounds, every run in
    exactly one part at each round, in order."""
    parts = [list(range(n))] if n else []
    rounds = 0
    while any(len(part) > 1 for part in parts):
        parts = [half for part in parts for half in (halves(part) if len(part) > 1 else [part])]
        rounds += 1
        assert [i for part in parts for i in part] == list(range(n))
    assert rounds == (math.ceil(math.log2(n)) if n > 1 else 0)
    assert halves([7]) == [[7]] and halves([]) == []


class InterruptsAtFlush(RefusesPoison):
    """A real token policy (``RefusesPoison``'s, given no poisoned prompt) whose ``propose`` leaves work
    deferred to the next flush (as a decoder's session run on the tokens it appended), work that raises
    ``KeyboardInterrupt`` once ``interrupt`` is set: with no resampling, the next flush is a newcomer's
    join."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.interrupt = False

    def propose(self, particles: Particles, rng: Any) -> Any:
        proposed = super().propose(particles, rng)

        def work() -> None:
            if self.interrupt:
                self.interrupt = False
                raise KeyboardInterrupt

        particles.defer(work)
        return proposed


def test_an_interrupt_during_a_join_leaves_the_lane_empty_and_usable() -> None:
    """A ``KeyboardInterrupt`` raised while a newcomer joins propagates and leaves the lane as a failure
    does: no runs in it and no newcomer half-joined, so a run added afterwards gives exactly its result
    alone (the interrupted newcomer stayed listed as joining, and the next join placed the next run's
    rows as its)."""
    task = MarkovDFATask.random(4, 3, 6, rng=0)
    policy = InterruptsAtFlush(task.policy())
    models = Models(policy, task.twist(noise=0.4, rng=1), Compute())
    lane = Lane(models, "guided")
    lane.add(_run(models, 1, 5, ess_threshold=0.0))
    lane.step()
    lane.add(_run(models, 2, 5, ess_threshold=0.0))
    policy.interrupt = True
    with pytest.raises(KeyboardInterrupt):
        lane.step()
    assert len(lane) == 0 and lane.rows == 0 and lane.particles is None
    later = _run(models, 3, 5, ess_threshold=0.0)
    lane.add(later)
    ended: list[Any] = []
    while len(lane):
        ended += lane.step()
    assert ended == [(later, None)]
    alone = run_alone(models, _run(models, 3, 5, ess_threshold=0.0))
    assert isinstance(alone, SamplerResult) and later.result is not None
    assert [s.tolist() for s in alone.samples] == [s.tolist() for s in later.result.samples]
    np.testing.assert_array_equal(alone.log_z, later.result.log_z)


class CoinFlips:
    """A policy of fair bits whose prompt is its horizon (an int): prompts of different horizons finish
    at different steps, each at its own."""

    def start(self, prompts: Any, num_particles: int) -> Particles:
        particles = Particles.empty(list(prompts), num_particles, max(prompts))
        particles.state["horizon"] = np.repeat(np.array(prompts, dtype=np.int64)[:, None], num_particles, 1)
        return particles

    def propose(self, particles: Particles, rng: np.random.Generator) -> Any:
        live = ~particles.finished
        b, i = np.nonzero(live)
        bits = (rng.random(particles.lengths.shape) < 0.5).astype(np.int64)  # rng: a RowStreams in a lane
        particles.tokens[b, i, particles.lengths[b, i]] = bits[b, i]
        particles.lengths[b, i] += 1
        particles.finished |= particles.lengths >= particles.state["horizon"]
        return np.where(live, math.log(0.5), 0.0)


class OnesDoubled:
    """``log Vh = (ones so far) log 2``: the target ``pi(x) ∝ 2^(ones in x)`` on fair bits."""

    def initial_log_value(self, particles: Particles) -> Any:
        return np.zeros(particles.num_prompts)

    def log_value(self, particles: Particles) -> Any:
        written = np.arange(particles.tokens.shape[2]) < particles.lengths[..., None]
        return (particles.tokens * written).sum(-1) * math.log(2.0)


@pytest.mark.parametrize("together", [False, True])
def test_a_prompt_never_resamples_after_its_last_step_while_others_of_its_run_go_on(together: bool) -> None:
    """A run of prompts of horizons 3 and 12 (``ess_threshold=1``: a resampling at every step it may):
    the first prompt resamples at none of the steps after its own last, alone and with another run in a
    shared step (``reweigh_together``), so its final sample stays weighted as alone. It resampled at
    every later step of the other prompt (pure drift: its weighted sample degenerated)."""
    models = Models(CoinFlips(), OnesDoubled(), Compute())

    def run(seed: int) -> SMCRun:
        return smc_run(
            models, [3, 12], 8, "multinomial", 1.0, "naive", seed, record_ancestry=False, max_steps=100
        )

    runs = [run(1), run(2)] if together else [run(1)]
    results = run_together(models, runs)
    for result in results:
        assert result.resampled is not None
        assert result.resampled[0][2:].sum() == 0 and result.resampled[1][2:11].all()
        assert result.resampled[0][:2].all()  # up to its last step it resampled as the other did


class _FinishedOnly:
    """The task's twist as an outcome reward: it scores finished trajectories only (a verifier would refuse
    a partial one) and counts the rows it is asked to score."""

    supports_engine = True

    def __init__(self, twist: Any) -> None:
        self.twist, self.rows = twist, 0

    def initial_log_value(self, particles: Particles) -> Any:
        return self.twist.initial_log_value(particles)

    def log_value(self, particles: Particles) -> Any:
        self.rows += particles.finished.size
        if not particles.finished.all():
            raise ValueError("reward: cannot score an unfinished trajectory")
        return self.twist.log_value(particles)


@pytest.mark.parametrize("sampler", ["best_of_n", "rejection"])
def test_a_rollout_lane_scores_the_runs_that_finished_and_no_others(sampler: str) -> None:
    """Rollout runs are scored once, at their end: with runs joining a step apart (each finishing a step
    after the one before), the reward model scores each run's rows when it finishes, never the partial
    trajectories of the runs still going (they were scored, and an outcome reward that refuses them failed
    every run but the last), and each run's result is the one it gets alone."""
    task = MarkovDFATask.random(3, 3, 4, rng=0)
    reward = _FinishedOnly(task.twist(noise=0.4, rng=1))
    models = Models(task.policy(), reward, Compute())

    def make(seed: int, on: Models) -> Run:
        if sampler == "best_of_n":
            return best_of_n_run(on, [()], 4, seed, max_steps=100)
        return rejection_run(on, [()], 2.0, 1, 64, seed, batch_size=4, max_steps=100)

    runs = [make(seed, models) for seed in range(6)]
    lane = Lane(models, "rollout")
    waiting, done = list(runs), {}
    while len(done) < len(runs):
        if waiting:
            lane.add(waiting.pop(0))
        for run, error in lane.step():
            assert error is None, error
            done[id(run)] = run
    assert reward.rows == sum(int(run.compute.reward_evaluations) for run in runs)
    for seed, run in enumerate(runs):
        alone = _FinishedOnly(task.twist(noise=0.4, rng=1))
        expected = run_alone(
            Models(task.policy(), alone, Compute()), make(seed, Models(task.policy(), alone, Compute()))
        )
        assert run.result is not None
        assert np.array_equal(run.result.log_weights[0], expected.log_weights[0])
        assert np.array_equal(run.result.samples[0], expected.samples[0])


class _NaNPrompt(tuple):  # type: ignore[type-arg]
    """A prompt of the exact task on whose rows ``_NaNFor`` returns NaN."""


class _NaNFor:
    """The twist, NaN on the rows of ``_NaNPrompt`` prompts (a reward model failing one request)."""

    def __init__(self, twist: Any) -> None:
        self.twist = twist

    def initial_log_value(self, particles: Particles) -> Any:
        return self.twist.initial_log_value(particles)

    def log_value(self, particles: Particles) -> Any:
        values = np.array(self.twist.log_value(particles), dtype=np.float64)
        values[[isinstance(prompt, _NaNPrompt) for prompt in particles.prompts]] = np.nan
        return values


@pytest.mark.parametrize("sampler", ["best_of_n", "rejection"])
def test_a_rollout_run_whose_reward_is_nan_ends_once_and_leaves_the_lane(sampler: str) -> None:
    """A rollout run whose finished rows the reward scores NaN fails alone, once, and leaves the lane: it
    was handled again as if scored (a rejection run went back to waiting, stepped on with no request
    behind it, past the engine's row limit; a best-of-N run was reported ended twice, and
    ``run_together`` raised a KeyError). The other runs get what they get alone."""
    task = MarkovDFATask.random(4, 3, 6, rng=0)

    def models() -> Models:
        return Models(task.policy(), _NaNFor(task.twist(noise=0.4, rng=1)), Compute())

    def make(prompt: Any, seed: int, on: Models) -> Run:
        if sampler == "best_of_n":
            return best_of_n_run(on, [prompt], 4, seed, max_steps=100)
        return rejection_run(on, [prompt], 2.0, 1, 10**6, seed, batch_size=4, max_steps=100)

    prompts: list[Any] = [(), _NaNPrompt(), (), ()]
    shared = models()
    lane = Lane(shared, "rollout")
    runs = [make(prompt, seed, shared) for seed, prompt in enumerate(prompts)]
    for run in runs:
        lane.add(run)
    ends: dict[int, list[Any]] = {}
    for _ in range(200):
        for run, error in lane.step():
            ends.setdefault(id(run), []).append(error)
        if len(ends) == len(runs) and not len(lane):
            break
    assert len(lane) == 0 and lane.rows == 0, "a run is still in the lane"
    assert all(len(errors) == 1 for errors in ends.values()), ends
    assert "NaN" in str(ends[id(runs[1])][0])
    for seed, (prompt, run) in enumerate(zip(prompts, runs)):
        if seed == 1:
            continue
        assert ends[id(run)] == [None]
        expected = run_alone(models(), make(prompt, seed, models()))
        assert run.result is not None
        assert np.array_equal(run.result.log_weights[0], expected.log_weights[0])
    fresh = models()
    together = run_together(
        fresh, [make(prompt, seed, fresh) for seed, prompt in enumerate(prompts)], return_errors=True
    )
    assert isinstance(together[1], ValueError) and "NaN" in str(together[1])
    assert all(isinstance(result, SamplerResult) for k, result in enumerate(together) if k != 1)
