"""The serving engine: concurrent requests batched step by step (continuous batching for particle methods).

Requests arrive on any thread ([`Engine.submit`][tiltsmc.serving.engine.Engine.submit], or ``await``
[`Engine.generate`][tiltsmc.serving.engine.Engine.generate]) and wait in the ``Scheduler`` until their
particles fit under ``max_batch_rows``. One worker thread owns the models and repeats one iteration: admit
what fits (their prompts are encoded then), drop what was cancelled or timed out, then advance every request
in flight by one step — for each kind of step one ``Lane``, whose step is one ``propose`` and one
``log_value`` (one policy and one reward session call) over the particles of every request in it, then
each request's reweighting and resampling. A request leaves as soon as its particles have all finished,
and its future gets the same [`SamplerResult`][tiltsmc.SamplerResult] that the offline function returns for
one prompt: the offline samplers and the engine run the same runs (``tiltsmc.samplers.runs``).

Each request draws from its own generator (its ``rng``) in the same order as alone, so a request with a
seed gives the same result whatever else is in flight (up to the rounding of batched session calls), and
exactly the offline function's result when it is alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any, Optional

from ..models.protocols import Policy, RewardModel
from ..samplers import baselines, correction, sequential
from ..samplers._engine import Models, check_count
from ..samplers.lane import KINDS, Lane
from ..samplers.result import Compute, SamplerResult
from ..samplers.runs import Run
from ._memory import release_free_memory, reuse_freed_memory
from .scheduler import BatchSizer, EngineClosed, Overloaded, Request, Scheduler

__all__ = ["SAMPLERS", "Engine", "EngineClosed", "Overloaded", "sampler_defaults"]

logger = logging.getLogger("tiltsmc.engine")

# The engine's defaults, which tiltsmc serve and its Ray replicas take too.
MAX_BATCH_ROWS = 4096
MAX_QUEUE = 1024
RELEASE_MEMORY_AFTER = 30.0  # seconds idle after work before memory is given back (see Engine)
ADAPTIVE_ROWS = True  # below max_batch_rows, only the rows that still make a step's rows cheaper

# Each sampler: the offline function (its signature holds the defaults, shared by the API, the CLI and the
# server) and the builder of its run.
SAMPLERS: dict[str, tuple[Callable[..., SamplerResult], Callable[..., Run]]] = {
    "smc": (sequential.smc, sequential.smc_run),
    "sp_gsmc": (sequential.sp_gsmc, sequential.sp_gsmc_run),
    "mh": (correction.mh, correction.mh_run),
    "best_of_n": (baselines.best_of_n, baselines.best_of_n_run),
    "rejection": (baselines.rejection, baselines.rejection_run),
}
_NOT_OPTIONS = ("policy", "reward", "prompts", "rng")


def sampler_defaults(sampler: str) -> dict[str, Any]:
    """The options of a sampler and their defaults, read from its offline function's signature."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {', '.join(SAMPLERS)}, got {sampler!r}")
    parameters = inspect.signature(SAMPLERS[sampler][0]).parameters
    return {name: p.default for name, p in parameters.items() if name not in _NOT_OPTIONS}


def _missing_support(model: Any, role: str) -> Optional[str]:
    support = getattr(model, "supports_engine", None)
    if support is True:
        return None
    reason = getattr(model, "engine_unsupported_reason", None)
    return (
        f"{role}: {type(model).__name__} cannot be batched by the engine"
        + (f" ({reason})" if reason else "")
        + ": a model for the engine sets supports_engine = True, promising that its results for a particle "
        "never depend on the other particles of the batch, that its per-particle state joins along the "
        "prompt axis (sequences of different lengths declared in Particles.aligned), and (a policy) that it "
        "draws through tiltsmc.core kernels or rng.random with the rng it is given. It still works offline."
    )


class Engine:
    """Serve sampler requests concurrently on one policy and reward model (see the module docstring).

    ``max_batch_rows``: the most particles in flight at once (a request needs ``num_particles`` rows, or
    its pool / ``n`` / ``batch_size``). With ``adaptive_rows`` (the default), fewer: the engine learns
    from its steps' times the batch size past which more rows no longer make each row's step cheaper
    ([`BatchSizer`][tiltsmc.serving.scheduler.BatchSizer]: within 10% of the best seconds per row seen)
    and admits up to it, the rest waiting in the queue; so a burst past what the machine serves queues
    instead of growing every step (on a CPU, a step's time grows with its rows, and a join copies every
    row's KV cache: admitting everything made the engine slower the more it was overloaded). The limit
    doubles as load reaches it while rows keep paying (and until a larger batch has measured worse, at
    least two of the oldest waiting request's size are let in); it is in ``stats()["row_limit"]``, with
    the seconds per row it was chosen from in ``stats()["seconds_per_row"]`` (by the bottom row count of
    each size).
    ``max_queue``: the most requests waiting for rows, past which
    [`submit`][tiltsmc.serving.engine.Engine.submit] raises [`Overloaded`][tiltsmc.serving.engine.Overloaded];
    ``timeout``: the default per-request timeout in seconds (None: none). The worker thread starts at once;
    [`close`][tiltsmc.serving.engine.Engine.close] (or leaving a ``with`` block) stops it.
    ``release_memory_after``: once the engine has been idle that many seconds after work, the models' memory
    pools shrink (their ``release_memory()``, where they have one: ONNX Runtime's arena for the ONNX models)
    and the freed heap goes back to the system (``release_free_memory``), so a long-running service returns to
    about its idle size after a burst (None: never). Memory given back is not free to take again: the next
    burst faults every page in afresh, and on a virtual machine whose host reclaims the pages its guest
    frees (a balloon with free page reporting) each page is also the host's to fault in again, tens of
    times the cost of touching memory kept (``bench/bench_refault.py``); so the default waits
    ``RELEASE_MEMORY_AFTER`` (30 s): traffic that pauses for less keeps its memory.

    ``keep_freed_memory=True`` (glibc; what ``tiltsmc serve`` and its Ray replicas do, whose process is the
    engine's) keeps freed memory in the C heap for the next arrays instead of every large array being
    mapped afresh, whose page faults cost about ten times the copy that fills it (a join's KV cache, a
    step's logits); the idle release gives it back. It changes malloc for the whole process
    (``tiltsmc.serving._memory.reuse_freed_memory``: ``mallopt`` thresholds, and one malloc arena for the
    threads started from then on), so a library engine leaves it off unless asked.
    """

    def __init__(
        self,
        policy: Policy,
        reward: RewardModel,
        *,
        max_batch_rows: int = MAX_BATCH_ROWS,
        max_queue: int = MAX_QUEUE,
        timeout: Optional[float] = None,
        release_memory_after: Optional[float] = RELEASE_MEMORY_AFTER,
        keep_freed_memory: bool = False,
        adaptive_rows: bool = ADAPTIVE_ROWS,
    ) -> None:
        self._models = Models(policy, reward, Compute())
        problems = [p for p in (_missing_support(policy, "policy"), _missing_support(reward, "reward")) if p]
        if problems:
            raise TypeError("; ".join(problems))
        self.max_batch_rows = check_count(max_batch_rows, "max_batch_rows")
        self.max_queue = check_count(max_queue, "max_queue", minimum=0)
        self.default_timeout = _check_timeout(timeout)
        self._scheduler = Scheduler(self.max_queue, self.max_batch_rows)
        if not isinstance(adaptive_rows, bool):
            raise TypeError(f"adaptive_rows: expected a bool, got {type(adaptive_rows).__name__}")
        self.adaptive_rows = adaptive_rows
        self._sizer = BatchSizer() if adaptive_rows else None
        self._row_limit = self.max_batch_rows  # the rows the scheduler may fill (the worker's, read by stats)
        self._seconds_per_row: dict[int, float] = {}  # what it was chosen from, by rows (a snapshot)
        self._exploring = True  # no batch size measured worse than a smaller one yet
        self._lanes = {kind: Lane(self._models, kind) for kind in KINDS}
        # by id(run): changed by the worker only, under the lock (stats() reads it from other threads)
        self._in_flight: dict[int, Request] = {}
        self._ids = itertools.count(1)
        self._wake = threading.Condition()
        self._closing = False
        self._drain_deadline: Optional[float] = None
        self._broken: Optional[BaseException] = None
        self._counts = {
            "submitted": 0,
            "completed": 0,
            "failed": 0,
            "cancelled": 0,
            "timed_out": 0,
            "rejected": 0,
        }
        self._steps = 0
        self._step_seconds = 0.0
        self._worked = False  # steps taken since the memory was last released
        if release_memory_after is not None and not release_memory_after >= 0:
            raise ValueError(
                f"release_memory_after: expected seconds >= 0 or None, got {release_memory_after!r}"
            )
        self.release_memory_after = release_memory_after
        if not isinstance(keep_freed_memory, bool):
            raise TypeError(f"keep_freed_memory: expected a bool, got {type(keep_freed_memory).__name__}")
        if keep_freed_memory:  # freed blocks reused during a burst, given back once idle
            reuse_freed_memory()
        self._worker = threading.Thread(target=self._serve, name="tiltsmc-engine", daemon=True)
        self._worker.start()

    # -- the public API --------------------------------------------------------------------------------

    @property
    def policy(self) -> Policy:
        return self._models.policy

    @property
    def reward(self) -> RewardModel:
        return self._models.reward

    def submit(
        self,
        prompt: Any,
        sampler: str = "smc",
        *,
        rng: Any = None,
        timeout: Optional[float] = None,
        **options: Any,
    ) -> Future[SamplerResult]:
        """Queue one prompt for ``sampler`` with its options (those of the offline function, with the same
        defaults); returns a ``concurrent.futures.Future`` of its [`SamplerResult`][tiltsmc.SamplerResult].

        Bad options raise here (``TypeError`` / ``ValueError`` naming the option); a full queue raises
        [`Overloaded`][tiltsmc.serving.engine.Overloaded]; a closed engine
        [`EngineClosed`][tiltsmc.serving.engine.EngineClosed]. ``future.cancel()`` takes the request out at
        the next step; past ``timeout`` seconds (default: the engine's) it ends with ``TimeoutError``. A
        prompt the policy cannot encode ends the future with ``ValueError``.
        """
        defaults = sampler_defaults(sampler)
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise TypeError(
                f"{', '.join(unknown)}: not an option of {sampler} (options: {', '.join(defaults)})"
            )
        deadline_after = _check_timeout(timeout) if timeout is not None else self.default_timeout
        run = SAMPLERS[sampler][1](self._models, [prompt], rng=rng, **{**defaults, **options})
        future: Future[SamplerResult] = Future()
        request = Request(next(self._ids), run, future, run.rows_per_prompt)
        if deadline_after is not None:
            request.deadline = request.submitted + deadline_after
        with self._wake:
            if self._closing or self._broken is not None:
                raise EngineClosed(
                    "the engine is closed" if self._broken is None else f"the engine failed: {self._broken!r}"
                )
            try:
                self._scheduler.enqueue(request)
            except Overloaded:
                self._counts["rejected"] += 1
                raise
            self._counts["submitted"] += 1
            self._wake.notify()
        return future

    async def generate(
        self,
        prompt: Any,
        sampler: str = "smc",
        *,
        rng: Any = None,
        timeout: Optional[float] = None,
        **options: Any,
    ) -> SamplerResult:
        """[`submit`][tiltsmc.serving.engine.Engine.submit] for asyncio: cancelling the awaiting task cancels
        the request."""
        return await asyncio.wrap_future(self.submit(prompt, sampler, rng=rng, timeout=timeout, **options))

    def stats(self) -> dict[str, Any]:
        """Requests waiting and in flight, particle rows in flight, counts by outcome, and the time of
        the steps so far split into the policy's, the reward model's and tiltsmc's own."""
        compute = self._models.compute
        with self._wake:
            counts = dict(self._counts)
            steps, seconds = self._steps, self._step_seconds
            in_flight = list(self._in_flight.values())
        model_seconds = compute.policy_seconds + compute.reward_seconds
        lane_calls = sum(lane.policy_calls for lane in self._lanes.values())
        lane_rows = sum(lane.policy_rows for lane in self._lanes.values())
        return {
            "waiting": len(self._scheduler),
            "in_flight": len(in_flight),
            "rows_in_flight": sum(r.rows for r in in_flight),
            "max_batch_rows": self.max_batch_rows,
            "row_limit": self._row_limit,
            "seconds_per_row": dict(self._seconds_per_row),
            "steps": steps,
            "rows_per_policy_call": lane_rows / lane_calls if lane_calls else 0.0,
            "policy_calls": compute.policy_calls,
            "reward_calls": compute.reward_calls,
            "step_seconds": seconds,
            "policy_seconds": compute.policy_seconds,
            "reward_seconds": compute.reward_seconds,
            "tiltsmc_seconds": max(seconds - model_seconds, 0.0),
            "requests": counts,
            "closed": self._closing,
        }

    def close(self, drain: bool = True, timeout: Optional[float] = 30.0) -> None:
        """Stop taking requests; with ``drain``, finish those queued and in flight for up to ``timeout``
        seconds (None: as long as they take); then end the rest with
        [`EngineClosed`][tiltsmc.serving.engine.EngineClosed]."""
        with self._wake:
            self._closing = True
            now = time.perf_counter()
            self._drain_deadline = now if not drain else (None if timeout is None else now + timeout)
            self._wake.notify()
        if threading.current_thread() is not self._worker:
            self._worker.join()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the worker ------------------------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            while self._iterate():
                pass
        except BaseException as error:  # a bug in the engine itself: fail everything, never hang a future
            logger.exception("the engine's worker failed; every request ends with its error")
            with self._wake:
                self._broken = error
            self._end_all(EngineClosed(f"the engine failed: {error!r}"))

    def _iterate(self) -> bool:
        """One iteration; False once the engine has closed and nothing is left."""
        with self._wake:
            while self._idle():
                wait = self.release_memory_after if self._worked else None
                if not self._wake.wait(wait) and self._idle():
                    # idle that long after work: the burst is over; the models' arenas and the freed heap
                    # go back to the system (not at once: traffic that pauses briefly keeps its memory)
                    self._worked = False
                    self._release_memory()
            closing, deadline = self._closing, self._drain_deadline
        now = time.perf_counter()
        if closing and deadline is not None and now >= deadline:
            self._end_all(EngineClosed("the engine closed before the request finished"))
            return False
        for request in self._scheduler.take_expired(now):
            self._end_waiting(request, now)
        self._drop_cancelled(now)
        rows = sum(r.rows for r in self._in_flight.values())
        for request in self._scheduler.admit(rows, self._row_limit, self._exploring):
            request.admitted = now
            with self._wake:
                self._in_flight[id(request.run)] = request
            self._lanes[request.run.kind].add(request.run)
        if not self._in_flight:
            return not (closing and not len(self._scheduler))
        self._worked = True
        began = time.perf_counter()
        rows_before = sum(lane.policy_rows for lane in self._lanes.values())
        for lane in self._lanes.values():
            if len(lane):
                try:
                    ended = lane.step()
                except Exception as failure:  # the lane's own bookkeeping failed: its requests end with it
                    logger.exception("a lane step failed")
                    ended = [(run, failure) for run in lane.runs()]
                    lane.remove(lane.runs())
                for run, error in ended:
                    self._finish(run, error)
        seconds = time.perf_counter() - began
        if self._sizer is not None:  # the rows the step's policy calls served, and what the step took
            self._sizer.observe(sum(lane.policy_rows for lane in self._lanes.values()) - rows_before, seconds)
            limit = self._sizer.limit()
            row_limit = self.max_batch_rows if limit is None else min(limit, self.max_batch_rows)
            if row_limit != self._row_limit:
                self._seconds_per_row = {2**k: cost for k, cost in self._sizer.measured().items()}
                logger.debug("row limit %d -> %d (seconds per row: %s)", self._row_limit, row_limit,
                             self._seconds_per_row)  # fmt: skip
            self._row_limit = row_limit
            self._exploring = self._sizer.exploring
        with self._wake:
            self._steps += 1
            self._step_seconds += seconds
        return True

    def _release_memory(self) -> None:
        for model in (self._models.policy, self._models.reward):
            shrink = getattr(model, "release_memory", None)
            if callable(shrink):
                shrink()
        release_free_memory()

    def _idle(self) -> bool:
        return not self._closing and not self._in_flight and not len(self._scheduler)

    def _drop_cancelled(self, now: float) -> None:
        gone = [r for r in self._in_flight.values() if r.future.cancelled() or r.expired(now)]
        if not gone:
            return
        for kind, lane in self._lanes.items():  # one compaction of each lane's particles
            lane.remove([r.run for r in gone if r.run.kind == kind])
        with self._wake:
            for request in gone:
                del self._in_flight[id(request.run)]
        for request in gone:
            self._end_waiting(request, now)

    def _end_waiting(self, request: Request, now: float) -> None:
        """A request cancelled by its caller, or past its deadline."""
        if request.future.cancelled():
            self._count("cancelled")
            return
        self._count("timed_out")
        waited = now - request.submitted
        self._settle(request, TimeoutError(f"timeout: the request took more than {waited:.3g} s"))

    def _finish(self, run: Run, error: Optional[BaseException]) -> None:
        with self._wake:
            request = self._in_flight.pop(id(run), None)
        if request is None:
            return
        if request.future.cancelled():  # cancelled by its caller during this step
            self._count("cancelled")
            return
        result = run.result
        if error is None and result is not None and result.errors:
            error = ValueError(next(iter(result.errors.values())))
        if error is not None:
            self._count("failed")
            self._settle(request, error)
            return
        assert result is not None
        result.compute.total_seconds = time.perf_counter() - request.submitted
        self._count("completed")
        self._settle(request, None, result)

    def _settle(self, request: Request, error: Optional[BaseException], result: Any = None) -> None:
        try:
            if error is not None:
                request.future.set_exception(error)
            else:
                request.future.set_result(result)
        except InvalidStateError:  # cancelled by its caller in the meantime
            pass

    def _end_all(self, error: BaseException) -> None:
        for request in self._scheduler.take_all():
            self._count("failed")
            self._settle(request, error)
        with self._wake:
            in_flight = list(self._in_flight.values())
            self._in_flight.clear()
        for request in in_flight:
            self._count("failed")
            self._settle(request, error)
        for lane in self._lanes.values():
            with contextlib.suppress(Exception):  # after a failure of the worker its lanes may be broken
                lane.remove(lane.runs())

    def _count(self, outcome: str) -> None:
        with self._wake:
            self._counts[outcome] += 1


def _check_timeout(timeout: Any) -> Optional[float]:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout: expected a number of seconds > 0 or None, got {timeout!r}")
    return float(timeout)
