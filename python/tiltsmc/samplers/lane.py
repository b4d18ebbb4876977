"""Runs batched together: one batch of particles advanced one step at a time for every run it holds.

A ``Lane`` holds the runs (``tiltsmc.samplers.runs``) of one kind of step. Its particles are one
[`Particles`][tiltsmc.models.particles.Particles] batch laid out ``(rows, 1)``: every particle its own prompt
entry, each run's particles a contiguous range of rows (prompt-major, as in the run's own ``(B, N)``
batch). Per step it makes one call of each model method for all of them (one ``propose`` and one
``log_value`` for a guided lane), hands each run a ``(B, N)`` view of its rows to update its weights,
and resamples every run that asks in one reorder. Runs join at a step boundary (their batch started by
the policy, and concatenated) and leave when their particles have all finished.

An offline sampler is one run in a lane of its own (``run_alone``); the serving engine keeps a lane
of each kind with every request in flight.

One bad request or prompt fails alone. Where a model's output is unusable for some prompts only (policy
logits no token can be drawn from, which the policy reports in ``Particles.errors``; a reward model call
that raises, made again run by run and then prompt by prompt to find the prompts at fault), those prompts
fail alone (``Run.fail_prompt``: their particles finished, the run's other prompts untouched), unless the
call failed for every prompt of a run: then the run fails with the error (a broken model, not a bad
prompt; a run of one prompt, such as a serving request, fails with it as before).
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
import time
from collections.abc import Sequence
from typing import Any, Callable, Optional, TypeVar, cast

import numpy as np
import numpy.typing as npt

from .._rng import RowStreams
from ..models.particles import MAX_NEW_TOKENS, Particles
from ..models.protocols import TokenPolicy
from ._engine import FloatArray, Models, failed_prompts
from .result import prompt_error
from .runs import LOG_V_PREV, PoolRun, Run, SharedStep, SMCRun, pool_together, reweigh_together

__all__ = [
    "KINDS",
    "Lane",
    "RunFailed",
    "halves",
    "lanes_in_halves",
    "log_restart",
    "run_alone",
    "run_together",
]

KINDS = ("guided", "twist", "rollout")
# The padding columns no row of the batch uses any more (its longest runs left) are dropped once they are
# this share of a padded state entry's width, where that copies the entry (a KV cache padded on the left;
# a join's copy drops them sooner); masks alone are trimmed at once (Particles.trim_padding).
TRIM_PADDING_FROM = 0.5
logger = logging.getLogger("tiltsmc.lane")

Ended = list[tuple[Run, Optional[BaseException]]]


class _Member:
    """A run in the lane: its rows, the shape of its batch and its last view of them."""

    __slots__ = ("batch", "count", "run", "skipped", "slot", "start", "stop", "view", "viewed")

    def __init__(self, run: Run, batch: int, count: int) -> None:
        self.run, self.batch, self.count = run, batch, count
        self.start = self.stop = 0
        self.slot = -1  # its row of the lane's _Ledger, once it joins
        self.view: Optional[Particles] = None
        self.viewed: tuple[Any, ...] = ()  # what self.view was made from
        # prompts of its batch that failed in the reward model: their rows are not scored again
        self.skipped: Optional[set[int]] = None

    def rows(self, prompt: int) -> tuple[int, int]:
        """The lane rows of prompt ``prompt`` of the run's batch."""
        first = self.start + prompt * self.count
        return first, first + self.count

    def scored_rows(self) -> npt.NDArray[np.int64]:
        """The member's rows but those of its ``skipped`` prompts."""
        skipped = self.skipped or ()
        kept = [np.arange(*self.rows(b)) for b in range(self.batch) if b not in skipped]
        return np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)


def _view(particles: Particles, member: _Member) -> Particles:
    """Rows ``member.start:member.stop`` of a ``(rows, 1)`` batch as the run's ``(B, N)`` batch (views).

    Runs read the particles' tokens and their own state (``LOG_V_PREV``), never the models' state, which
    the view leaves out (a decoder's KV cache is a dozen arrays: reshaping them for every run at every
    step was most of the lane's own time per run). The view is made again only where one of the arrays
    it shows, or the member's rows, changed since the last (the view keeps those arrays alive, so an
    identity seen again is the same array)."""
    start, stop, batch, count = member.start, member.stop, member.batch, member.count
    state = particles.state
    made_from = (
        particles.tokens,
        particles.lengths,
        particles.finished,
        state.get(LOG_V_PREV),
        particles.prompts,
        particles.prompt_tokens,
        start,
        stop,
    )
    seen = member.viewed
    if member.view is not None and all(a is b for a, b in zip(made_from, seen)):
        return member.view

    def rows(array: np.ndarray) -> np.ndarray:
        return array[start:stop].reshape(batch, count, *array.shape[2:])

    view = Particles(
        prompts=particles.prompts[start:stop:count],
        tokens=rows(particles.tokens),
        lengths=rows(particles.lengths),
        finished=rows(particles.finished),
        state={LOG_V_PREV: rows(state[LOG_V_PREV])},
        prompt_tokens=None if particles.prompt_tokens is None else particles.prompt_tokens[start:stop:count],
        text_decoder=particles.text_decoder,
    )
    member.view, member.viewed = view, made_from
    return view


class Lane:
    """Runs of one ``kind`` (``"guided"``, ``"twist"`` or ``"rollout"``) advanced together.

    ``step()`` admits the runs waiting for a batch, advances every run by one step and returns the runs
    that ended (each with None, or the exception that ended it alone). A failure confined to one prompt
    (its model outputs) fails that prompt only (see the module docstring), one confined to one run (its
    arguments, its values) ends that run only; a model call that fails for the whole batch ends every run
    in it, and where these were several, ``failed_together`` holds them (by ``id``) until the next step:
    the call cannot tell whose rows made it fail, so a caller may run them again in ``halves``, and
    those of a half that fails again in halves of it, to find whose it is (the serving engine and
    ``run_together`` do). An exception that is not an ``Exception`` (``KeyboardInterrupt``) leaves the
    lane as such a failure does, empty but for the runs waiting, and propagates: the runs it held are the
    caller's to end. ``compute`` adds up every model call of the lane.
    """

    def __init__(self, models: Models, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        self.models = models
        self.kind = kind
        self.members: list[_Member] = []
        self.waiting: list[Run] = []
        self.particles: Optional[Particles] = None
        self.compute = models.compute
        self._joining: list[_Member] = []  # started this step, join with their batch
        self._ended: list[_Member] = []  # ended this step, leave once every run has been updated
        self.policy_calls = 0  # policy steps taken (propose, or next_log_probs), and the rows they served
        self.policy_rows = 0
        self._starts = self._stops = np.zeros(0, dtype=np.int64)  # the members' rows (kept by _renumber)
        # _finished_rows, until the members' rows or the finished flags change (a model call, _renumber)
        self._counted: Optional[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]] = None
        self._holes: list[tuple[int, int]] = []  # rows of runs that left, until newcomers or _pack take them
        self._ledger = _Ledger()  # the members' shares of the model calls, until they leave
        self._streams: Optional[RowStreams] = None  # the members' random streams (kept by _renumber)
        self._slots: tuple[int, ...] = ()  # the members' slots in the ledger (kept by _renumber)
        # by particle count: the last shared SMC step, its runs and what carries over from it (cleared by
        # _renumber)
        self._shared: dict[int, SharedStep] = {}
        self._skipping = 0  # members with prompts the reward model failed on (their rows left unscored)
        self._failed_rows: list[tuple[int, int]] = []  # rows of the prompts that failed during this step
        self.failed_together: frozenset[int] = frozenset()  # runs a failure of the last step's batch ended

    @property
    def rows(self) -> int:
        """The rows the runs in the lane hold (the rows of runs that left are free at once, though the
        batch keeps them until newcomers take them or the next step takes them out)."""
        return int((self._stops - self._starts).sum())

    def _batch_rows(self) -> int:
        return 0 if self.particles is None else int(self.particles.lengths.shape[0])

    def __len__(self) -> int:
        return len(self.members) + len(self.waiting)

    def runs(self) -> list[Run]:
        return [member.run for member in self.members] + list(self.waiting)

    def add(self, run: Run) -> None:
        """Queue a run: it joins at the next step."""
        if run.kind != self.kind:
            raise ValueError(f"run: a {run.kind} run cannot step in a {self.kind} lane")
        run.policy = self.models.policy
        self.waiting.append(run)

    def remove(self, runs: Sequence[Run]) -> None:
        """Take runs out (cancelled, timed out): their rows are freed at once."""
        gone = {id(run) for run in runs}
        self.waiting = [run for run in self.waiting if id(run) not in gone]
        self._drop([member for member in self.members if id(member.run) in gone])

    # -- one step --------------------------------------------------------------------------------------

    def step(self) -> Ended:
        ended: Ended = []
        if self._failed_rows:
            self._failed_rows = []
        self.failed_together = frozenset()
        members, waiting = list(self.members), list(self.waiting)  # each ends or goes on, whatever fails
        try:
            joined = self._admit(ended)
            if joined:  # a newcomer may start finished (a prompt that failed); the others were settled
                self._settle(ended)
            if self.members:
                self._pack()  # no model call runs on the rows of a run that left
                if self.kind == "guided":
                    self._guided_step(ended)
                elif self.kind == "twist":
                    self._twist_step(ended)
                else:
                    self._rollout_step(ended)
                self._settle(ended)
        except BaseException as error:  # a failure of the whole batch: every run in it ends with it
            self._fail_together(error, ended, members, waiting)
            if not isinstance(error, Exception):  # KeyboardInterrupt: the lane is left empty, not half-joined
                raise
        return ended

    def _fail_together(
        self, error: BaseException, ended: Ended, members: list[_Member], waiting: list[Run]
    ) -> None:
        """A failure of the batch (a model call, or a join of newcomers): every run of the lane at the
        step's start (``members``' and the newcomers', ``waiting``) that has not ended yet, nor gone back
        to waiting for another batch during the step (its rows were in no call since), ends with
        ``error``, and the lane is left empty but for those waiting; where the runs ending are several,
        ``failed_together`` names them. Every member's share of the model calls so far goes to its run
        (``members``; newcomers that took a share, in ``_joining``)."""
        done = {id(run) for run, _ in ended} | {id(run) for run in self.waiting}  # _admit emptied waiting
        failing = [run for run in (*(member.run for member in members), *waiting) if id(run) not in done]
        if len(failing) > 1:  # the caller runs them again or ends them: it says which (log_restart)
            logger.debug("a model call failed for a batch of %d runs", len(failing), exc_info=True)
            self.failed_together = frozenset(id(run) for run in failing)
        ended.extend((run, error) for run in failing)
        for member in {id(m): m for m in (*members, *self.members, *self._joining)}.values():
            if member.slot >= 0:
                self._ledger.settle(member.slot, member.run.compute)
                member.slot = -1
        self.members, self.particles, self._holes, self._joining, self._ended = [], None, [], [], []
        self._skipping = 0
        self._renumber()

    def _count_step(self) -> Particles:
        particles = self._particles()
        self.policy_calls += 1
        self.policy_rows += self._batch_rows()
        return particles

    def _guided_step(self, ended: Ended) -> None:
        particles = self._count_step()
        groups = self._shared_steps()
        together = {id(member) for group in groups.values() for member in group}
        for member in self.members:
            if id(member) not in together:
                member.run.before_step(_view(particles, member))
        live = ~particles.finished if groups else None  # the particles this step extends
        self._propose(particles, ended)  # a run it ends leaves the groups (_reweigh_together: _active)
        self._end_at_limits(particles)
        log_v = self._log_values(ended)
        if live is not None:
            for start, stop in self._failed_rows:  # prompts that failed: not reweighed
                live[start:stop] = False
        outcomes = {} if live is None else self._reweigh_together(groups, log_v, live)
        self._update(
            ended,
            lambda member, view: member.run.reweigh(
                view, log_v[member.start : member.stop].reshape(member.batch, member.count)
            ),
            outcomes,
        )

    def _shared_steps(self) -> dict[tuple[str, int], list[_Member]]:
        """The members whose SMC step (``"smc"``) or pool step (``"pool"``) is taken together with at least
        one other run's of the same particle count, by kind and count: one core call for each."""
        groups: dict[tuple[str, int], list[_Member]] = {}
        for member in self.members:
            if member.run.smc_reweighing() is not None:
                groups.setdefault(("smc", member.count), []).append(member)
            elif member.run.pool_reweighing() is not None:
                groups.setdefault(("pool", member.count), []).append(member)
        return {key: group for key, group in groups.items() if len(group) > 1}

    def _reweigh_together(
        self, groups: dict[tuple[str, int], list[_Member]], log_v: FloatArray, live: npt.NDArray[np.bool_]
    ) -> dict[int, Any]:
        """``reweigh_together`` or ``pool_together`` for each group's members still running (by ``id``: what
        each run's step returns or raises). A group that is every member in the lane's order steps on the
        lane's own arrays; another on copies of its rows, ``log Vh`` written back after."""
        particles = self._particles()
        log_v_prev = particles.state[LOG_V_PREV]
        finished_rows, rows = self._finished_rows()
        ended = (finished_rows == rows).tolist()  # by member: its trajectories have all finished
        done: Optional[dict[int, bool]] = None
        outcomes: dict[int, Any] = {}
        for (kind, count), all_of_group in groups.items():
            group = self._active(all_of_group)
            if not group:
                continue
            # the group's rows, (P, count): the lane's own arrays where the group is the whole lane
            whole = len(group) == len(self.members) and log_v_prev.flags.c_contiguous
            index = None if whole else np.concatenate([np.arange(m.start, m.stop) for m in group])
            if whole:  # the members, in order
                flags = ended
            else:
                done = done or dict(zip(map(id, self.members), ended))
                flags = [done[id(member)] for member in group]
            group_log_v, group_live = _group_rows(log_v, index, count), _group_rows(live, index, count)
            results: list[Any]
            # every member of a group has its step (_shared_steps)
            if kind == "pool":
                pools = cast("list[PoolRun]", [m.run.pool_reweighing() for m in group])
                results = pool_together(pools, group_log_v, group_live, flags)
            else:
                runs = cast("list[SMCRun]", [m.run.smc_reweighing() for m in group])
                prev = _group_rows(log_v_prev, index, count)
                rows_done = None  # by prompt, where a run has several: a prompt's last step is its own
                if any(member.batch > 1 for member in group):
                    rows_done = _group_rows(particles.finished, index, count).all(axis=1)
                results = reweigh_together(
                    runs, group_log_v, prev, group_live, flags, self._shared_step(count, runs), rows_done
                )
                if index is not None:  # written back: the core updated a copy
                    log_v_prev.reshape(-1)[index] = prev.reshape(-1)
            outcomes.update(zip(map(id, group), results))
        return outcomes

    def _shared_step(self, count: int, runs: list[Any]) -> SharedStep:
        """The ``SharedStep`` of the SMC step of ``count`` particles, made again only where the runs are not
        those of the last step (members joined or left, or one ended during the step)."""
        last = self._shared.get(count)
        if last is None or not last.of(runs):
            last = self._shared[count] = SharedStep(runs)
        return last

    def _twist_step(self, ended: Ended) -> None:
        particles = self._count_step()
        groups = self._shared_steps()
        for member in self.members:
            member.run.before_step(_view(particles, member))
        next_log_values = self._reward_values(ended, "next_log_values")
        log_p: FloatArray = self._policy_call(particles, lambda: self.models.next_log_probs(particles), ended)
        tokens = np.zeros(particles.lengths.shape, dtype=np.int64)
        for member in self._active():
            rows = slice(member.start, member.stop)
            shape = (member.batch, member.count, -1)
            try:
                chosen = member.run.choose(
                    _view(particles, member), log_p[rows].reshape(shape), next_log_values[rows].reshape(shape)
                )
            except Exception as error:
                self._end_alone(member, error, ended)
                continue
            tokens[rows] = chosen.reshape(-1, 1)
        self._charge(lambda: self.models.append(particles, tokens))
        self._end_at_limits(particles)
        outcomes: dict[int, Any] = {}
        if groups:  # the optimal proposal's weights run by run, then one SMC step (no potential) a count
            log_v = np.zeros(self._batch_rows())
            for member in self._active([member for group in groups.values() for member in group]):
                smc = member.run.smc_reweighing()
                if smc is None:
                    continue
                try:
                    weighed = smc.optimal_weights(_view(particles, member))
                except Exception as error:
                    self._end_alone(member, error, ended)
                    continue
                log_v[member.start : member.stop] = weighed.reshape(-1)
            outcomes = self._reweigh_together(groups, log_v, np.zeros(self._batch_rows(), dtype=bool))
        self._update(ended, lambda member, view: member.run.after_append(view), outcomes)

    def _rollout_step(self, ended: Ended) -> None:
        particles = self._count_step()
        self._propose(particles, ended)
        self._end_at_limits(particles)
        for member in self._active():
            try:
                member.run.check_steps(_view(particles, member))
            except Exception as error:
                self._end_alone(member, error, ended)

    def _update(
        self,
        ended: Ended,
        update: Callable[[_Member, Particles], Optional[npt.NDArray[np.int64]]],
        outcomes: Optional[dict[int, Any]] = None,
    ) -> None:
        """Each run's own update of its rows (or its outcome already there: by the member's ``id``, the
        ancestors or the exception); one reorder for every run that resamples."""
        particles = self._particles()
        ancestors: Optional[npt.NDArray[np.int64]] = None
        for member in self._active():
            try:
                if outcomes and id(member) in outcomes:
                    local = outcomes[id(member)]
                    if isinstance(local, Exception):
                        raise local
                else:
                    local = update(member, _view(particles, member))
            except Exception as error:
                self._end_alone(member, error, ended)
                continue
            if local is None:
                continue
            if ancestors is None:
                ancestors = np.arange(self._batch_rows(), dtype=np.int64)
            offsets = member.start + np.arange(member.batch, dtype=np.int64)[:, None] * member.count
            ancestors[member.start : member.stop] = (offsets + local).reshape(-1)
        if ancestors is not None:
            # counted again: a finished particle's offspring may replace unfinished ones (a pool's chosen
            # candidate fills it), and a run whose rows have all finished so ends at this step
            self._charge(lambda: self.models.reorder(particles, ancestors[None, :], across_prompts=True))
        self._drop_ended()

    def _propose(self, particles: Particles, ended: Ended) -> None:
        """The policy's ``propose`` for every row (``_policy_call``)."""
        self._policy_call(particles, lambda: self.models.propose(particles, self._rng()), ended)

    def _policy_call(self, particles: Particles, call: Callable[[], Any], ended: Ended) -> Any:
        """A policy call for every row (``propose``, ``next_log_probs``), charged by live rows; a prompt the
        policy failed during the call (a new entry in ``particles.errors``, its particles finished: logits
        no token can be drawn from) fails alone (``_policy_failures``), and the others go on."""
        errors_before = len(particles.errors)
        result = self._charge(call, live=True)
        if len(particles.errors) != errors_before:
            self._policy_failures(particles, ended)
        return result

    def _policy_failures(self, particles: Particles, ended: Ended) -> None:
        """The prompts with a new entry in ``particles.errors`` (by row: the policy failed some of their
        particles, the others' draws unchanged) fail, each run's by ``_fail_prompts``."""
        failing: dict[int, tuple[_Member, dict[int, str]]] = {}
        active = {id(member) for member in self._active()}
        for row, reason in particles.errors.items():
            k = int(np.searchsorted(self._stops, row, side="right"))
            if k == len(self.members) or id(self.members[k]) not in active or self.members[k].start > row:
                continue
            member = self.members[k]
            prompt = (row - member.start) // member.count
            if member.run.has_failed(prompt):  # failed before (at its start, or in an earlier call)
                continue
            failing.setdefault(id(member), (member, {}))[1].setdefault(prompt, reason)
        for member, reasons in failing.values():
            self._fail_prompts(member, reasons, None, ended)

    def _fail_prompts(
        self,
        member: _Member,
        reasons: dict[int, str],
        error: Optional[BaseException],
        ended: Ended,
        skip: bool = False,
    ) -> None:
        """Prompts ``reasons`` of ``member``'s batch (by prompt: why) failed in one model call (``error``, if
        it raised). Where the call failed for every prompt of the run (none had failed before), the run
        fails with ``error`` (else ``prompt k: reason`` of the first): the model is at fault, not a prompt.
        Otherwise each fails alone (``_fail_prompt``); ``skip``: the reward model does not score its rows
        again (they failed there)."""
        run = member.run
        new = sorted(b for b in reasons if run.prompt_index(b) not in run.errors)
        if not run.errors and len(new) == run.num_prompts:
            first = new[0]
            failure = error or ValueError(prompt_error(run.prompt_index(first), reasons[first]))
            self._end_alone(member, failure, ended)
            return
        for prompt, reason in reasons.items():
            self._fail_prompt(member, prompt, reason, skip)

    def _fail_prompt(self, member: _Member, prompt: int, reason: str, skip: bool) -> None:
        """Prompt ``prompt`` of ``member``'s batch fails alone: its particles finish (no model call extends
        them again), and its run reports it (``Run.fail_prompt``)."""
        start, stop = member.rows(prompt)
        self._particles().finished[start:stop] = True
        self._counted = None
        self._failed_rows.append((start, stop))
        if skip:
            if member.skipped is None:
                member.skipped = set()
                self._skipping += 1
            member.skipped.add(prompt)
        member.run.fail_prompt(prompt, prompt_error(member.run.prompt_index(prompt), reason))

    def _log_values(self, ended: Ended, members: Optional[list[_Member]] = None) -> FloatArray:
        """``log Vh_t`` of every row, or of ``members``' rows (``_reward_values`` of ``log_value``)."""
        return self._reward_values(ended, "log_value", members)

    def _reward_values(
        self, ended: Ended, method: str, members: Optional[list[_Member]] = None
    ) -> FloatArray:
        """The reward model's ``method`` (``log_value``: ``log Vh_t`` a row; ``next_log_values``: ``log Vh``
        of every one-token extension, the optimal proposal's) of every row, or of ``members``' rows alone
        (the others ``-inf``; the call charged to them: a rollout lane scores the runs that finished, not
        the others' partial trajectories). Where the call fails for the batch, each run is scored alone,
        and a run that fails alone prompt by prompt: the prompts whose rows fail fail alone
        (``_fail_prompts``: a reward model's NaN on one prompt's prefixes), the run with them where every
        one of its prompts does. Rows of prompts that failed so are not scored again (``-inf``).
        """
        particles = self._particles()
        score: Callable[[Particles], FloatArray] = getattr(self.models, method)
        error: Optional[BaseException] = None
        chosen = self.members if members is None or len(members) == len(self.members) else members
        if not self._skipping and chosen is self.members:  # the usual case: one call for every row
            try:
                values: FloatArray = self._charge(lambda: score(particles))
                return values
            except Exception as batch_error:
                error = batch_error
        shape = particles.lengths.shape
        if method == "next_log_values":  # a lane of the optimal proposal: a token policy's vocabulary
            shape = (*shape, cast(TokenPolicy, self.models.policy).vocab_size)
        values = np.full(shape, -np.inf)
        self._flush(particles)  # before the copies of rows (Particles.select), as the policy's time
        if error is None:  # rows left unscored, or the chosen runs': the others in one call
            rows = np.concatenate([member.scored_rows() for member in chosen])
            try:
                values[rows] = self._scored(particles, rows, score, chosen)
                return values
            except Exception as batch_error:
                error = batch_error
        if len(chosen) > 1 or chosen[0].batch > 1:
            logger.warning("%s failed for the batch (%s); scoring each run alone", method, error)
        for member in self._active(chosen):
            if len(chosen) == 1:  # the call was this run's alone
                run_error = error
            else:
                rows = member.scored_rows()
                try:
                    values[rows] = self._scored(particles, rows, score, [member])
                    continue
                except Exception as failure:
                    run_error = failure
            self._score_prompts(member, run_error, values, ended, score)
        return values

    def _score_prompts(
        self,
        member: _Member,
        error: BaseException,
        values: FloatArray,
        ended: Ended,
        score: Callable[[Particles], FloatArray],
    ) -> None:
        """``member``'s run failed alone in the reward model's ``score`` (``error``): each of its prompts
        scored alone, into ``values``; those that fail fail (``_fail_prompts``)."""
        particles = self._particles()
        reasons: dict[int, str] = {}
        if member.batch == 1:
            reasons[0] = str(error)
        else:
            for prompt in range(member.batch):
                if member.skipped is not None and prompt in member.skipped:
                    continue
                rows = np.arange(*member.rows(prompt))
                try:
                    values[rows] = self._scored(particles, rows, score, [member])
                except Exception as failure:
                    reasons[prompt] = str(failure)
        if reasons:
            self._fail_prompts(member, reasons, error, ended, skip=True)

    def _scored(
        self,
        particles: Particles,
        rows: npt.NDArray[np.int64],
        score: Callable[[Particles], FloatArray],
        members: Sequence[_Member],
    ) -> FloatArray:
        """``score`` of rows ``rows`` (``members``' rows, charged to them) alone (a copy of them),
        ``(len(rows), 1, ...)``; what the model keeps in their state (its cache) written back where the rows'
        layout allows (``Particles.fill_rows``)."""
        part = particles.select(rows)
        values: FloatArray = self._charge(lambda: score(part), members=members)
        particles.fill_rows(rows, part)
        return values

    # -- joining and leaving ---------------------------------------------------------------------------

    def _admit(self, ended: Ended) -> bool:
        """Start a batch for every waiting run that wants one, one policy start per particle count; whether
        any joined."""
        if not self.waiting:
            return False
        waiting, self.waiting = self.waiting, []
        groups: dict[int, list[tuple[Run, Optional[list[Any]]]]] = {}
        for run in waiting:
            try:
                wanted = run.wants()
            except Exception as error:
                ended.append((run, error))
                continue
            if wanted is None:  # done without another batch (rejection with nothing left to draw)
                ended.append((run, None))
                continue
            prompts, count = wanted
            groups.setdefault(count, []).append((run, prompts))
        parts: list[Particles] = []
        for count, group in groups.items():
            try:
                parts.append(self._start_group(count, group))
            except Exception as error:
                if len(group) == 1:
                    ended.append((group[0][0], error))
                    continue
                for run, prompts in group:  # find the run at fault: start each alone
                    try:
                        parts.append(self._start_group(count, [(run, prompts)]))
                    except Exception as run_error:
                        ended.append((run, run_error))
        if parts:
            self._join(parts)
        return bool(parts)

    def _start_group(self, count: int, group: list[tuple[Run, Optional[list[Any]]]]) -> Particles:
        """One policy start for the group's prompts; each run begins on its rows. The batch comes back
        one particle per prompt entry, ready to join."""
        runs = [run for run, _ in group]
        if len(group) == 1:
            prompts = group[0][1]
        else:
            prompts = [prompt for _, run_prompts in group for prompt in (run_prompts or [None])]
        token_limits = None
        if any(run.max_new_tokens is not None for run in runs):  # each prompt's: its run's
            token_limits = [run.max_new_tokens for run, run_prompts in group for _ in run_prompts or [None]]
        part: Particles = self._charge(lambda: self.models.start(prompts, count, token_limits), runs=runs)
        try:
            log_v0 = self._charge(lambda: self.models.initial_log_value(part), runs=runs)
        except Exception as error:
            if len(group) > 1 or runs[0].num_prompts == 1:  # several runs: _admit starts each alone
                raise
            log_v0 = self._initial_by_prompt(part, runs[0], error)
        batches = [part.num_prompts] if len(group) == 1 else [len(p or [None]) for _, p in group]
        capacity = part.tokens.shape[2]
        limits = np.full(part.lengths.shape, capacity, dtype=np.int64)
        offsets = [0, *itertools.accumulate(batches)]  # Python ints: slicing with numpy's costs more
        for run, start, stop in zip(runs, offsets[:-1], offsets[1:]):
            if run.max_new_tokens is not None:
                if run.max_new_tokens > capacity:
                    raise ValueError(
                        f"max_new_tokens: {run.max_new_tokens} is more than the policy's limit of {capacity}"
                    )
                limits[start:stop] = run.max_new_tokens
        failed = failed_prompts(part)
        log_v_prev = np.zeros(part.lengths.shape)
        members = []
        for run, start, stop in zip(runs, offsets[:-1], offsets[1:]):
            # "prompt k: ..." by the run's own index (the policy numbered the group's prompts)
            errors = {
                b - start: prompt_error(run.prompt_index(b - start), m)
                for b, m in part.errors.items()
                if start <= b < stop
            }
            log_v_prev[start:stop] = run.begin(log_v0[start:stop], failed[start:stop], errors)
            members.append(_Member(run, stop - start, count))
        part.state[LOG_V_PREV] = log_v_prev
        part.state[MAX_NEW_TOKENS] = limits
        joined = part.one_per_prompt()  # may raise (the policy's deferred work): the runs have not joined
        self._joining.extend(members)
        return joined

    def _initial_by_prompt(self, part: Particles, run: Run, error: BaseException) -> FloatArray:
        """``log Vh_0`` of the prompts of ``run``'s batch ``part`` where the reward model failed for the
        batch (``error``): each prompt scored alone; those that fail then fail as prompts the policy could
        not start do (``part.errors``, their particles finished), unless every prompt of the run does (the
        run fails with ``error``)."""
        values = np.zeros(part.num_prompts)
        reasons: dict[int, str] = {}
        for prompt in range(part.num_prompts):
            if prompt in part.errors:  # the policy could not start it: nothing to score
                continue
            alone = functools.partial(self.models.initial_log_value, part.select([prompt]))
            try:
                values[prompt] = self._charge(alone, runs=[run])[0]
            except Exception as failure:
                reasons[prompt] = str(failure)
        if not part.errors and not run.errors and len(reasons) == run.num_prompts:
            raise error
        for prompt, reason in reasons.items():
            part.errors[prompt] = reason  # numbered as the run's own below (_start_group)
            part.finished[prompt] = True
        return values

    def _join(self, parts: list[Particles]) -> None:
        """The newcomers' batches (``parts``, their runs in ``_joining``) into the lane, one of two ways
        by what it costs the batch to drop the padding columns no row uses any more
        (``Particles.trims_by_copying``). Where that copies the batch's padded state (a KV cache padded on
        the left), the rows the runs hold and the newcomers' are copied into one new batch, which drops
        those columns (``Particles.concatenate``). Else each newcomer's rows are written over rows that
        runs have left where they fit (``Particles.fill_rows``: the batch not copied; the runs started
        together in one write where all fit), the rows still free are packed out, and the other newcomers
        join behind the batch's rows (into the spare rows of a KV cache written in place)."""
        joining = self._joining  # emptied once they are members (on a failure, _fail_together settles them)
        for member in joining:
            member.slot = self._ledger.take()
        placed: list[tuple[Particles, list[tuple[_Member, int]]]] = []  # each part, its runs' first rows
        members = iter(joining)
        for part in parts:
            first, runs = 0, []
            while first < part.num_prompts:
                member = next(members)
                runs.append((member, first))
                first += member.batch * member.count
            placed.append((part, runs))
        behind: list[tuple[list[_Member], Particles]] = []  # batches to join behind, with their runs
        lane, given_up = self.particles, True
        if lane is not None:
            self._flush(lane)
            if lane.trims_by_copying():  # views of the rows held, all copied (none given up to the join)
                held = _adjacent(self.members)
                behind = [(block, lane.view_rows(block[0].start, block[-1].stop)) for block in held]
                self.members, self._holes, self.particles, given_up = [], [], None, False
            else:
                for part, runs in placed:
                    behind.extend(self._fill_holes(lane, part, runs))
                self._pack()
                self._particles().trim_padding(TRIM_PADDING_FROM)  # the rows taken over may have been longer
                placed = []
        for part, runs in placed:  # each part whole, its runs' rows in order
            behind.append(([member for member, _ in runs], part))
        if behind:
            first = self._batch_rows()
            batches = [batch for _, batch in behind]
            if self.particles is not None:
                batches.insert(0, self.particles)
            joined = batches[0] if len(batches) == 1 else Particles.concatenate(batches, reuse_first=given_up)
            self.particles = joined
            for runs_behind, _ in behind:
                for member in runs_behind:
                    member.start, first = first, first + member.batch * member.count
                    member.stop = first
                    self.members.append(member)
        self._joining = []
        self._renumber()

    def _fill_holes(
        self, lane: Particles, part: Particles, runs: list[tuple[_Member, int]]
    ) -> list[tuple[list[_Member], Particles]]:
        """Write each of ``part``'s runs over free rows of the lane's batch where they fit
        (``Particles.fill_rows``), each into the first free range that holds it: where every run fits, in
        one write of the part, else run by run. Returns the runs that did not fit, in blocks of runs whose
        rows follow one another in ``part``, with those rows (a view; the part itself where none fit): to
        join behind the batch's rows."""
        holes = list(self._holes)
        starts = []
        for member, _ in runs:
            size = member.batch * member.count
            start = _first_fit(holes, size)
            if start is None:
                break
            starts.append(start)
            holes = _taken(holes, start, size)
        if len(starts) == len(runs):
            sizes = [member.batch * member.count for member, _ in runs]
            where: Any = starts[0]  # rows in a row (one run, most often): written as slices, not gathers
            if any(start + size != after for start, size, after in zip(starts, sizes, starts[1:])):
                where = np.concatenate([np.arange(start, start + size) for start, size in zip(starts, sizes)])
            if lane.fill_rows(where, part):
                self._holes = holes
                for start, (member, _) in zip(starts, runs):
                    member.start, member.stop = start, start + member.batch * member.count
                    self.members.append(member)
                return []
        left: list[tuple[list[_Member], int, int]] = []  # blocks of runs that did not fit: their rows
        for member, first in runs:
            size = member.batch * member.count
            start = _first_fit(self._holes, size)
            if start is not None and lane.fill_rows(start, _rows_of(part, first, first + size)):
                self._holes = _taken(self._holes, start, size)
                member.start, member.stop = start, start + size
                self.members.append(member)
            elif left and left[-1][2] == first:
                left[-1][0].append(member)
                left[-1] = (left[-1][0], left[-1][1], first + size)
            else:
                left.append(([member], first, first + size))
        return [(members, _rows_of(part, first, stop)) for members, first, stop in left]

    def _pack(self) -> None:
        """The rows runs have left taken out of the batch: the runs after them moved into their place
        (``_packing``: runs from the end where they fit, the fewest rows copied), the batch cut there
        (``Particles.packed``: in place, the batch not copied), and the padding columns no row uses any
        more dropped (``TRIM_PADDING_FROM``)."""
        if not self._holes:
            return
        self._holes = []
        members = sorted(self.members, key=lambda member: member.start)
        starts = _packing([(member.start, member.stop) for member in members])
        order = sorted(range(len(members)), key=starts.__getitem__)
        sizes = np.array([members[k].stop - members[k].start for k in order], dtype=np.int64)
        shifts = np.array([members[k].start - starts[k] for k in order], dtype=np.int64)
        sources = np.arange(int(sizes.sum()), dtype=np.int64) + np.repeat(shifts, sizes)  # each run's rows
        particles = self._particles()
        self._flush(particles)
        self.particles = particles.packed(sources)
        self.particles.trim_padding(TRIM_PADDING_FROM)  # the runs that left may have been the longest
        first = 0
        for k in order:
            member = members[k]
            member.start, first = first, first + (member.stop - member.start)
            member.stop = first
        self._renumber()

    def _renumber(self) -> None:
        """The members in the order of their rows, and their rows as arrays."""
        self.members.sort(key=lambda member: member.start)
        self._streams = None
        self._slots = tuple(member.slot for member in self.members)
        self._shared.clear()
        self._counted = None
        self._starts = np.array([m.start for m in self.members], dtype=np.int64)
        self._stops = np.array([m.stop for m in self.members], dtype=np.int64)

    def _settle(self, ended: Ended) -> None:
        """Runs whose particles have all finished end (a rollout run after its one reward call); a run
        that wants another batch goes back to waiting."""
        if self.particles is None:
            return
        particles = self.particles
        finished_rows, rows = self._finished_rows()
        full = finished_rows == rows
        if not full.any():  # most steps: no run has ended
            return
        done = [member for member, ended in zip(self.members, full.tolist()) if ended]
        ending = self._active(done)
        if self.kind == "rollout" and ending:  # the finished runs' rows alone: the others' are partial
            log_r = self._log_values(ended, ending)
            ending = self._active(ending)  # not those the scoring ended (a NaN reward): they have ended
        for member in ending:
            view = _view(particles, member)
            try:
                if self.kind == "rollout":
                    member.run.end_rollout(
                        view, log_r[member.start : member.stop].reshape(member.batch, member.count)
                    )
                else:
                    member.run.end(view)
            except Exception as error:
                self._end_alone(member, error, ended)
                continue
            self._ended.append(member)
            if member.run.result is not None:
                ended.append((member.run, None))
            else:
                self.waiting.append(member.run)
        self._drop_ended()

    def _active(self, members: Optional[list[_Member]] = None) -> list[_Member]:
        """The members (default: all) that have not ended during this step."""
        return [m for m in (self.members if members is None else members) if m not in self._ended]

    def _end_alone(self, member: _Member, error: BaseException, ended: Ended) -> None:
        """A run fails on its own; its rows leave at the end of the update (others' views stay valid). A
        run ends once: one that has ended already is left as it is."""
        if member in self._ended:
            return
        ended.append((member.run, error))
        self._ended.append(member)

    def _drop_ended(self) -> None:
        if self._ended:
            leaving, self._ended = self._ended, []
            self._drop(leaving)

    def _drop(self, leaving: Sequence[_Member]) -> None:
        """The runs leave; their rows stay in the batch as free rows until newcomers take them or
        ``_pack`` takes them out (before the next model call)."""
        if not leaving:
            return
        gone = {id(member) for member in leaving}
        kept = []
        for member in self.members:
            if id(member) in gone:
                self._ledger.settle(member.slot, member.run.compute)
                member.slot = -1
                self._holes.append((member.start, member.stop))
                if member.skipped is not None:
                    self._skipping -= 1
            else:
                kept.append(member)
        if not kept:
            self.members, self.particles, self._holes = [], None, []
            self._renumber()
            return
        self._holes.sort()
        self.members = kept
        self._renumber()

    def _particles(self) -> Particles:
        assert self.particles is not None
        return self.particles

    # -- randomness and accounting ---------------------------------------------------------------------

    def _rng(self) -> Any:
        """One run: its own generator (what the sampler alone would pass); several: their RowStreams."""
        if len(self.members) == 1:
            return self.members[0].run.generator
        if self._streams is None:  # until the members change (their keys are drawn at each call)
            bounds = [0] + [member.stop for member in self.members]
            self._streams = RowStreams([member.run.generator for member in self.members], bounds)
        return self._streams

    def _charge(
        self,
        call: Callable[[], Any],
        live: bool = False,
        runs: Optional[list[Run]] = None,
        members: Optional[Sequence[_Member]] = None,
    ) -> Any:
        """Make one model call for every run, and charge each run its share (by rows, or live rows: those
        not finished before the call), in the lane's ledger until the run leaves; with ``members``, a call
        on their rows alone, charged to them by rows. With ``runs`` (a group starting, not in the lane yet),
        the call is theirs, charged to them at once in equal shares. Every call may finish rows: they are
        counted again after it."""
        members_now = self.members
        weights = None
        if runs is None and members is not None and len(members) < len(members_now):
            paying = {id(member) for member in members}
            weights = np.array(
                [m.stop - m.start if id(m) in paying else 0 for m in members_now], dtype=np.int64
            )
        elif runs is None and live and len(members_now) > 1:
            finished_rows, rows = self._finished_rows()
            weights = rows - finished_rows
        compute = self.compute
        before = _read_fields(compute)
        try:
            return call()
        finally:
            self._counted = None
            deltas = [after - b for after, b in zip(_read_fields(compute), before)]
            if any(deltas):
                if runs is None:
                    slots = self._slots
                    if len(slots) != len(members_now):  # members joined since _renumber (their slots last)
                        slots = tuple(member.slot for member in members_now)
                    self._ledger.record(slots, deltas, weights)
                else:
                    self._ledger.settle_now(deltas, [run.compute for run in runs])

    def _flush(self, particles: Particles) -> None:
        """The policy's deferred work on ``particles``, where there is any, timed as its own."""
        if particles.deferred:
            self._charge(lambda: self.models.flush(particles))

    def _finished_rows(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Per member, its finished rows and its rows (one pass over the batch, not one per member; counted
        again only after a model call or a change of the members' rows)."""
        if self._counted is None:
            finished = self._particles().finished.reshape(-1)
            counted = np.zeros(finished.size + 1, dtype=np.int64)
            np.add.accumulate(finished, dtype=np.int64, out=counted[1:])
            self._counted = counted[self._stops] - counted[self._starts], self._stops - self._starts
        return self._counted

    def _end_at_limits(self, particles: Particles) -> None:
        _end_at_limits(particles)
        self._counted = None


def _rows_of(part: Particles, start: int, stop: int) -> Particles:
    """Rows ``start:stop`` of ``part``: the part itself where they are all its rows, else a view."""
    return part if start == 0 and stop == part.num_prompts else part.view_rows(start, stop)


def _first_fit(holes: list[tuple[int, int]], rows: int) -> Optional[int]:
    """The first row of the first free range of at least ``rows`` rows, or None."""
    return next((start for start, stop in holes if stop - start >= rows), None)


def _taken(holes: list[tuple[int, int]], start: int, rows: int) -> list[tuple[int, int]]:
    """Free row ranges after ``rows`` rows from ``start`` (the first rows of one of them) are taken."""
    return [
        (begin + rows, stop) if begin == start else (begin, stop)
        for begin, stop in holes
        if not (begin == start and stop - begin == rows)
    ]


def _adjacent(members: list[_Member]) -> list[list[_Member]]:
    """The members (in the order of their rows) in groups whose rows follow one another."""
    groups: list[list[_Member]] = []
    for member in members:
        if groups and groups[-1][-1].stop == member.start:
            groups[-1].append(member)
        else:
            groups.append([member])
    return groups


def _packing(ranges: list[tuple[int, int]]) -> list[int]:
    """New first rows for disjoint row ranges (sorted) so that they fill rows ``0:total`` (their rows in
    all): each range lying wholly past ``total``, from the last, moves into the first free rows before
    ``total`` that hold it; then, where ranges still leave rows free before ``total``, all of them move
    forward in order. Moving the last runs into the rows the first left copies their rows alone, where
    moving everything forward would copy every run behind the free rows."""
    if not ranges:
        return []
    total = sum(stop - start for start, stop in ranges)
    starts = [start for start, _ in ranges]
    free: list[list[int]] = []  # free rows before total: [start, stop)
    row = 0
    for start, stop in ranges:
        if start >= total:
            break
        if start > row:
            free.append([row, start])
        row = max(row, stop)
    if row < total:
        free.append([row, total])
    for k in range(len(ranges) - 1, -1, -1):
        start, stop = ranges[k]
        if start < total:
            break
        gap = next((g for g in free if g[1] - g[0] >= stop - start), None)
        if gap is None:
            break
        starts[k], gap[0] = gap[0], gap[0] + stop - start
    placed = sorted((start, start + stop - first) for start, (first, stop) in zip(starts, ranges))
    tiled = all(a[1] == b[0] for a, b in zip(placed[:-1], placed[1:])) and placed[0][0] == 0
    if tiled:
        return starts
    order = sorted(range(len(ranges)), key=starts.__getitem__)
    row = 0
    for k in order:
        starts[k], row = row, row + ranges[k][1] - ranges[k][0]
    return starts


def _group_rows(array: Any, index: Optional[npt.NDArray[np.int64]], count: int) -> Any:
    """A lane array's rows ``index`` (None: all, as a view) laid out ``(prompts, count)``."""
    flat = array.reshape(-1)
    return (flat if index is None else flat[index]).reshape(-1, count)


def _end_at_limits(particles: Particles) -> None:
    """Trajectories at their run's ``max_new_tokens`` end (for policies that do not end them there
    themselves)."""
    np.logical_or(
        particles.finished, particles.lengths >= particles.state[MAX_NEW_TOKENS], out=particles.finished
    )


_CALLS = ("policy_calls", "reward_calls")  # charged in full to every run the call served
_COUNTS = ("policy_steps", "policy_tokens", "reward_evaluations")  # split by weight, rounded
_SECONDS = ("policy_seconds", "reward_seconds")  # split by weight
_FIELDS = (*_CALLS, *_COUNTS, *_SECONDS)
_read_fields = operator.attrgetter(*_FIELDS)  # a Compute's _FIELDS as a tuple, in one call


class _Ledger:
    """The lane's model calls charged to its members (by ``slot``), by ``_FIELDS``, added to the member's
    run's ``compute`` when it leaves. A call's calls count in full for every member it served; its counts
    and seconds are split in proportion to each member's ``weights`` (rows; equal where none or all
    zero). Most calls serve every member in equal shares: those add each member's share to one running
    total, ``everyone``, and a member is charged its growth between joining and leaving (a call costs
    the same whatever the members). A call by weight, or to some members only, is split into those
    members' own charges at once. Counts are rounded once, as the member leaves."""

    def __init__(self) -> None:
        self.everyone = [0.0] * len(_FIELDS)  # per member: every equal-shares call to every member
        self._own: list[list[float]] = []  # by slot: the member's shares of the other calls
        self._joined: list[list[float]] = []  # by slot: ``everyone`` when the member joined
        self._free: list[int] = []
        self.held = 0  # slots taken and not settled

    def take(self) -> int:
        """A slot for a member joining (charged nothing yet)."""
        if self.held == 0:  # no one to charge: the running total starts again (its sums stay small)
            self.everyone = [0.0] * len(_FIELDS)
        if self._free:
            slot = self._free.pop()
        else:
            slot = len(self._own)
            self._own.append([])
            self._joined.append([])
        self._own[slot] = [0.0] * len(_FIELDS)
        self._joined[slot] = list(self.everyone)
        self.held += 1
        return slot

    def record(
        self, slots: tuple[int, ...], deltas: list[Any], weights: Optional[npt.NDArray[np.int64]]
    ) -> None:
        """One call's ``deltas`` (by ``_FIELDS``), charged to the members in ``slots``."""
        total = 0 if weights is None else int(weights.sum())
        parts = _parts(deltas, 1.0 / (total or len(slots)))
        if not total and len(slots) == self.held:  # slots are distinct: every member, in equal shares
            _add_parts(self.everyone, parts)
            return
        shares = weights.tolist() if total and weights is not None else [1] * len(slots)
        own = self._own
        for slot, share in zip(slots, shares):
            _add_parts(own[slot], parts, share)

    def settle_now(self, deltas: list[Any], computes: list[Any]) -> None:
        """One call's ``deltas`` charged at once in equal shares to ``computes`` (runs with no slot yet)."""
        split = [0.0] * len(_FIELDS)
        _add_parts(split, _parts(deltas, 1.0 / len(computes)))
        for compute in computes:
            _add_to(compute, split)

    def settle(self, slot: int, compute: Any) -> None:
        """The member in ``slot`` leaves: its charges added to ``compute``, and the slot freed."""
        joined = self._joined[slot]
        _add_to(compute, [own + now - then for own, now, then in zip(self._own[slot], self.everyone, joined)])
        self._free.append(slot)
        self.held -= 1


_Parts = tuple[list[tuple[int, Any]], list[tuple[int, float]]]


def _parts(deltas: Sequence[Any], scale: float) -> _Parts:
    """A call's non-zero ``deltas`` (by ``_FIELDS`` index): its calls, charged in full to every member it
    served, and the rest times ``scale`` (one member's share per unit of weight)."""
    calls = len(_CALLS)
    return (
        [(k, delta) for k, delta in enumerate(deltas[:calls]) if delta],
        [(k, delta * scale) for k, delta in enumerate(deltas[calls:], calls) if delta],
    )


def _add_parts(into: list[float], parts: _Parts, weight: float = 1.0) -> None:
    """A call's ``_parts`` into a member's charges: the calls in full, the rest times its ``weight``."""
    full, split = parts
    for k, delta in full:
        into[k] += delta
    if weight:
        for k, part in split:
            into[k] += part * weight


def _add_to(compute: Any, values: list[Any]) -> None:
    """``values`` (by ``_FIELDS``) added to a run's ``Compute``, calls and counts rounded to whole numbers."""
    for name, value in zip(_FIELDS, values):
        if value:
            setattr(compute, name, getattr(compute, name) + (value if name in _SECONDS else round(value)))


class RunFailed(Exception):
    """Run ``index`` of ``run_together`` raised ``error``."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(index, error)
        self.index, self.error = index, error


T = TypeVar("T")


def halves(items: Sequence[T]) -> list[list[T]]:
    """``items`` in two halves, in order (the first the larger; one item: itself alone): how the runs of a
    batch whose model call failed run again (``Lane.failed_together``). A half that fails again is
    halved in turn, so a run that fails every call it is in is found after at most ``ceil(log2(n))``
    rounds, and the runs with it lose their steps that often at most; where the batch's size was the
    cause, the halves find a size the model takes."""
    middle = (len(items) + 1) // 2
    return [list(part) for part in (items[:middle], items[middle:]) if part]


def log_restart(
    failed: Sequence[tuple[Any, Optional[BaseException]]], lanes: Sequence[Lane], what: str
) -> None:
    """The warning that the ``failed`` runs (with the error that ended them; ``what`` they are: runs,
    requests) run again from their start in ``lanes`` (``lanes_in_halves``): all of them, or those still
    wanted (the engine's requests not cancelled meanwhile)."""
    error = next((error for _, error in failed if error is not None), None)
    again = sum(len(lane) for lane in lanes)
    who = "they" if again == len(failed) else f"{again} of them"
    logger.warning(
        "a model call failed for a batch of %d %s (%s): %s run again from their start, in halves of %s",
        len(failed), what, f"{type(error).__name__}: {error}" if error is not None else "no error", who,
        " and ".join(str(len(lane)) for lane in lanes),
    )  # fmt: skip


def lanes_in_halves(models: Models, runs: Sequence[Run]) -> list[Lane]:
    """A lane for each of the ``halves`` of ``runs`` (fresh runs of one kind, in order): the lanes in which
    the runs of a batch whose model call failed run again."""
    lanes = []
    for half in halves(runs):
        lane = Lane(models, half[0].kind)
        for run in half:
            lane.add(run)
        lanes.append(lane)
    return lanes


def run_together(
    models: Models,
    runs: Sequence[Run],
    on_step: Optional[Callable[[list[int], list[int]], None]] = None,
    *,
    return_errors: bool = False,
    again: Optional[Callable[[int], Run]] = None,
) -> list[Any]:
    """Advance ``runs`` (of one kind) in one lane, one step each per call of the models, until every one
    has ended; their results in order, each with its own ``compute.total_seconds`` (from the start).
    ``on_step(stepped, ended)``: after each step, the indices of the runs it advanced and of those it
    ended. The first run to fail raises ``RunFailed`` with its index; with ``return_errors``, a run that
    fails has the exception that ended it in place of its result, and the others go on. ``again(i)``: a
    fresh run ``i`` from its start; given, the runs that a model call failing for their batch ended
    (``Lane.failed_together``) run again, in ``halves`` (each in a lane of its own), until what fails
    is a run alone: its own failure."""
    lanes = [Lane(models, runs[0].kind)]
    for run in runs:
        lanes[0].add(run)
    index = {id(run): i for i, run in enumerate(runs)}
    results: dict[int, Any] = {}
    began = time.perf_counter()
    while len(results) < len(runs):
        stepped = [index[id(run)] for lane in lanes for run in lane.runs()]
        ended = []
        for lane in list(lanes):
            failed: list[tuple[int, Optional[BaseException]]] = []
            for ended_run, error in lane.step():
                i = index.pop(id(ended_run))
                if again is not None and id(ended_run) in lane.failed_together:
                    failed.append((i, error))
                    continue
                if error is not None and not return_errors:
                    raise RunFailed(i, error)
                ended_run.compute.total_seconds = time.perf_counter() - began
                if error is None:
                    assert ended_run.result is not None
                results[i] = ended_run.result if error is None else error
                ended.append(i)
            if failed:
                assert again is not None  # runs fail together only where it is given
                fresh = [again(i) for i, _ in failed]
                index.update((id(run), i) for run, (i, _) in zip(fresh, failed))
                halved = lanes_in_halves(models, fresh)
                log_restart(failed, halved, "runs")
                lanes.extend(halved)
        lanes = [lane for lane in lanes if len(lane)]
        if on_step is not None:
            on_step(stepped, ended)
    return [results[i] for i in range(len(runs))]


def run_alone(models: Models, run: Run) -> Any:
    """Advance one run in a lane of its own until it ends; its result, or the exception that ended it."""
    try:
        return run_together(models, [run])[0]
    except RunFailed as failure:
        raise failure.error from None
