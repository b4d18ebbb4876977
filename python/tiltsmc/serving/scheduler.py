"""Admission of requests into the engine: a bounded queue, a budget of particle rows in flight, and the
batch size past which rows stop paying for themselves."""

from __future__ import annotations

import collections
import heapq
import itertools
import math
import threading
import time
import weakref
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..models._config import real_number
from ..samplers._engine import check_count
from ..samplers.runs import Run

__all__ = ["BatchSizer", "EngineClosed", "Overloaded", "Request", "Scheduler", "another_should_take"]


# What a request whose future was cancelled counts as (Request.cancelled_outcome)
CANCELLED_OUTCOMES = ("cancelled", "timed_out", "closed")


class Overloaded(RuntimeError):
    """The engine's queue of waiting requests is full: the request was refused at once (retry later)."""


class EngineClosed(RuntimeError):
    """The engine is closed (or closing): it takes no new requests, and those it could not finish end
    with this error."""


@dataclass(eq=False)
class Request:
    """One request: its run, its future, the particle rows it holds in flight (set by its sampler's
    ``rows_option``; and the bytes of the KV cache they may reach, where the engine bounds them) and its
    deadline. ``cancelled``: its future was
    cancelled (set from the future's callback once it is queued, under the scheduler's lock: read without
    taking the future's lock); what the engine counts it as then is ``cancelled_outcome()``.
    ``restart``: where set, a fresh run of the request from its start."""

    id: int
    run: Run
    future: Future[Any]
    rows: int
    cache_bytes: int = 0
    rows_option: str = "num_particles"  # the sampler's option that sets ``rows``, named in refusals
    submitted: float = field(default_factory=time.perf_counter)
    deadline: Optional[float] = None
    admitted: Optional[float] = None
    cancelled: bool = False
    waiting: bool = field(default=False, repr=False)  # in the scheduler's queue
    # the end of the engine's grace period, once it closes (Engine.close; a later close may bring it forward)
    closes_at: Optional[float] = None
    # what it counts as once cancelled, fixed by the future's callback (Scheduler._done): cancelled_outcome
    ended_as: Optional[str] = field(default=None, repr=False)
    # a fresh run of the request, from its start (a seed's generator as at submit, a caller's where the
    # run left it: Engine._restart), to run again after a model call failed for its batch (None: it cannot)
    restart: Optional[Callable[[], Run]] = field(default=None, repr=False)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def cancelled_outcome(self) -> str:
        """The outcome a request whose future was cancelled counts as: ``"timed_out"`` where it was cancelled
        at or past its deadline, ``"closed"`` where at or past ``closes_at`` (the end of the engine's grace
        period), else ``"cancelled"``. A model call that overruns the deadline, or the grace period, holds
        the engine, which checks them between its steps: the HTTP server then answers the 504 (the 503) itself
        and cancels the request (``TIMEOUT_MARGIN`` past it), a timeout (the engine's close) all the same; a
        request cancelled before (its caller, a client gone) is cancelled. The time is the future's
        ``cancelled_at`` (the engine's futures note it before they turn cancelled, on ``deadline``'s clock,
        ``time.perf_counter``); a future without one counts as cancelled. The one rule for every count of
        the engine and the scheduler: once the future's callback has fixed it (``ended_as``), it gives the
        same answer at every call, whatever a later close does to ``closes_at``, so a request is counted
        alike wherever it leaves from (a counter never goes down)."""
        if self.ended_as is not None:
            return self.ended_as
        cancelled_at = getattr(self.future, "cancelled_at", None)
        if cancelled_at is None:
            return "cancelled"
        if self.expired(cancelled_at):
            return "timed_out"
        if self.closes_at is not None and cancelled_at >= self.closes_at:
            return "closed"
        return "cancelled"


class Scheduler:
    """Requests wait in arrival order; the oldest is admitted as soon as its rows fit under
    ``max_batch_rows`` with the rows already in flight (first come, first served: a large request at the
    head is not overtaken, so it never starves). ``enqueue`` refuses with
    [`Overloaded`][tiltsmc.serving.scheduler.Overloaded] past ``max_queue`` waiting requests; those whose
    future was cancelled count neither there nor in ``len()``, though they stay in the queue until
    ``take_expired`` (or ``enqueue``, to make room, or ``admit``) takes them out. Thread-safe:
    ``enqueue`` runs on the callers' threads, the rest on the engine's worker. Finding the waiting
    requests cancelled or past their deadline costs nothing per step where there are none, however long
    the queue: cancellations are noted by the futures' callbacks, deadlines kept in a heap.
    """

    def __init__(self, max_queue: int, max_batch_rows: int, max_cache_bytes: Optional[int] = None) -> None:
        self.max_queue = max_queue
        self.max_batch_rows = max_batch_rows
        self.max_cache_bytes = max_cache_bytes
        self._waiting: collections.deque[Request] = collections.deque()
        # a heap of the queued requests' deadlines (with their order of arrival: no two entries tie); the
        # entries of requests admitted since are dropped as they come up, or all at once where they are most
        self._deadlines: list[tuple[float, int, Request]] = []
        self._arrivals = itertools.count()
        self._cancelled: list[Request] = []  # requests whose future was cancelled since take_expired
        # the requests in _waiting whose future was cancelled, by the outcome they count as
        # (Request.cancelled_outcome)
        self._ended_waiting = dict.fromkeys(CANCELLED_OUTCOMES, 0)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """The requests waiting whose future was not cancelled. Read under the lock: a request taken out of
        the queue leaves it before its cancellation stops counting (``_left``), so a read in between, by
        a worker that does not hold the engine's lock while another takes requests out, counted too few
        (fewer than 0 after ``take_all``: ``len()`` raised ``ValueError``)."""
        with self._lock:
            return self._uncancelled()

    def _uncancelled(self) -> int:
        """The requests waiting whose future was not cancelled (under the lock)."""
        return len(self._waiting) - sum(self._ended_waiting.values())

    def waiting_and_cancelled(self) -> tuple[int, int]:
        """The requests waiting (``len()``) and those in the queue whose future was cancelled, read together
        (a cancellation moves a request from the one to the other)."""
        waiting, ended = self.waiting_and_ended()
        return waiting, sum(ended.values())

    def waiting_and_ended(self) -> tuple[int, dict[str, int]]:
        """``waiting_and_cancelled`` with the requests cancelled in the queue by the outcome the engine
        counts them as (``Request.cancelled_outcome``): ``{"cancelled": ..., "timed_out": ...,
        "closed": ...}``."""
        with self._lock:
            return self._uncancelled(), dict(self._ended_waiting)

    def close_at(self, closes_at: float) -> None:
        """The engine closes: ``closes_at`` (the end of its grace period) set on every waiting request."""
        with self._lock:
            for request in self._waiting:
                request.closes_at = closes_at

    def enqueue(self, request: Request) -> list[Request]:
        """Queue ``request``; ``Overloaded`` where ``max_queue`` requests wait already (those cancelled not
        counted), ``ValueError`` where it could never be admitted. Returns the cancelled requests taken out
        of the queue to make room (in its order; only where it holds ``max_queue`` requests, some of them
        cancelled), for the caller to count as ``take_expired``'s: the queue never holds more than
        ``max_queue`` requests, however many are cancelled before a worker takes them out."""
        if request.rows > self.max_batch_rows:
            raise ValueError(
                f"{request.rows_option}: the request needs {request.rows} particle rows, more than the "
                f"engine's max_batch_rows = {self.max_batch_rows}"
            )
        if self.max_cache_bytes is not None and request.cache_bytes > self.max_cache_bytes:
            raise ValueError(
                f"{request.rows_option}: the request's KV cache may reach {request.cache_bytes} bytes (its "
                f"particles x (prompt + max_new_tokens) tokens), over the engine's max_cache_bytes = "
                f"{self.max_cache_bytes}"
            )
        with self._lock:
            waiting = self._uncancelled()
            if waiting >= self.max_queue:
                raise Overloaded(f"{waiting} requests are waiting (max_queue = {self.max_queue})")
            taken = self._take_cancelled() if len(self._waiting) >= self.max_queue else []
            self._waiting.append(request)
            request.waiting = True
            if request.deadline is not None:
                heapq.heappush(self._deadlines, (request.deadline, next(self._arrivals), request))
        # outside the lock: a future cancelled already calls back at once; by a weak reference, so that the
        # request and its future hold no cycle (they are freed as soon as the engine and the caller let go)
        held = weakref.ref(request)
        request.future.add_done_callback(lambda future: self._done(held, future))
        return taken

    def _done(self, held: weakref.ref[Request], future: Future[Any]) -> None:
        """The future's callback (on the thread that ended it): a cancellation noted for the engine, and the
        request's place in the queue, if it waits, no longer counted."""
        request = held()
        if request is not None and future.cancelled():
            with self._lock:
                request.cancelled = True
                request.ended_as = request.cancelled_outcome()
                self._cancelled.append(request)
                if request.waiting:
                    self._ended_waiting[request.ended_as] += 1

    def _left(self, request: Request) -> None:
        """``request`` is out of the queue (under the lock)."""
        request.waiting = False
        if request.cancelled:
            self._ended_waiting[request.cancelled_outcome()] -= 1

    def _take_cancelled(self) -> list[Request]:
        """The waiting requests whose future was cancelled, taken out of the queue (under the lock)."""
        taken = [r for r in self._waiting if r.cancelled]
        if taken:
            self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
            for request in taken:
                self._left(request)
        return taken

    def admit(
        self,
        rows_in_flight: int,
        row_limit: Optional[int] = None,
        exploring: bool = False,
        *,
        engine_rows: Optional[int] = None,
        defer: Optional[Callable[[int, int], bool]] = None,
        cache_bytes: int = 0,
    ) -> list[Request]:
        """The waiting requests that fit now, oldest first, for a worker with ``rows_in_flight`` rows: the
        engine's rows (``engine_rows``, every worker's; default the worker's own) stay under
        ``max_batch_rows``, and the worker's under ``row_limit`` (a
        [`BatchSizer`][tiltsmc.serving.scheduler.BatchSizer]'s) unless it has nothing in flight (the
        oldest request always runs once the engine has its rows). While the sizer is ``exploring`` (no
        batch size measured worse than a smaller one) the limit is at least twice the oldest request's
        rows: a request larger than any batch measured so far does not run alone while the ones behind it
        wait. ``defer(rows, head)``: True where another worker should take the oldest request (of ``head``
        rows) rather than this one with ``rows`` in flight; admission stops there. Where the scheduler has
        ``max_cache_bytes``, the KV cache the engine's requests in flight may reach (``cache_bytes``, every
        worker's) stays under it too."""
        admitted: list[Request] = []
        total = rows_in_flight if engine_rows is None else engine_rows
        with self._lock:
            while self._waiting:
                head = self._waiting[0].rows
                if total + head > self.max_batch_rows:  # enqueue refused any over it: it runs once rows free
                    break
                head_bytes = self._waiting[0].cache_bytes
                if self.max_cache_bytes is not None and cache_bytes + head_bytes > self.max_cache_bytes:
                    break  # likewise: it runs once the caches in flight shrink
                limit = self.max_batch_rows if row_limit is None else row_limit
                if exploring:
                    limit = max(limit, 2 * head)
                if rows_in_flight and rows_in_flight + head > limit:
                    break
                if defer is not None and defer(rows_in_flight, head):
                    break
                request = self._waiting.popleft()
                self._left(request)  # cancelled since take_expired: the engine drops it at its next step
                rows_in_flight += request.rows
                total += request.rows
                cache_bytes += request.cache_bytes
                admitted.append(request)
        return admitted

    def take_expired(self, now: float) -> list[Request]:
        """Waiting requests whose future was cancelled or whose deadline passed, taken out of the queue (in
        its order)."""
        with self._lock:
            gone = {id(r): r for r in self._cancelled if r.waiting}
            self._cancelled.clear()
            deadlines = self._deadlines
            while deadlines and deadlines[0][0] <= now:  # those admitted meanwhile are dropped here
                request = heapq.heappop(deadlines)[2]
                if request.waiting:
                    gone[id(request)] = request
            if len(deadlines) > 2 * len(self._waiting) + 64:  # admitted requests are not held until then
                self._deadlines = [entry for entry in deadlines if entry[2].waiting]
                heapq.heapify(self._deadlines)
            if not gone:
                return []
            taken = [r for r in self._waiting if id(r) in gone]
            self._waiting = collections.deque(r for r in self._waiting if id(r) not in gone)
            for request in taken:
                self._left(request)
        return taken

    def take_all(self) -> list[Request]:
        """Every waiting request (cancelled or not), taken out of the queue in its order."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._deadlines, self._cancelled = [], []
            for request in waiting:
                self._left(request)
        return waiting


def another_should_take(rows: int, head: int, others: Iterable[tuple[int, int]]) -> bool:
    """Whether a worker with ``rows`` in flight should leave a request of ``head`` rows to another:
    one of ``others`` (each worker's rows in flight and row limit) has fewer rows and room for it (or
    nothing in flight). Requests so go to the worker with the fewest rows that can take them; a worker
    with nothing in flight never defers, so some worker always takes the oldest request once the engine
    has its rows."""
    return any(theirs < rows and (not theirs or theirs + head <= limit) for theirs, limit in others)


class BatchSizer:
    r"""The most rows worth having in flight, learned from the steps' times.

    A step over ``R`` rows costs ``t(R)``: a fixed part (session calls, kernel launches, tiltsmc's own
    work per step) and a part that grows with the rows (the models' arithmetic, a join's copy of the
    KV caches). Throughput is ``R / t(R)`` rows a second: it grows with ``R`` while the fixed part
    dominates and stops growing once the rows' own cost does; past that point more rows only lengthen
    every step (each request in flight waits longer for its tokens) and the caches a join copies. On a
    GPU the fixed part dominates up to large batches; on a CPU the knee can be a few dozen rows.

    Steps are grouped by their rows into buckets ``[2^k, 2^{k+1})``; each bucket keeps an exponentially
    weighted mean of its steps' seconds per row ``c_k`` (from its first step, weight ``smoothing`` on the
    newest), counted
    once it has ``min_steps`` steps and forgotten ``memory`` steps after its last. The knee is the
    smallest measured bucket ``k`` with ``c_k <= (1 + tolerance) min_j c_j``: bigger batches would gain
    at most ``tolerance`` in throughput. ``limit()`` is the top of the knee's bucket, ``2^{k+1}`` rows;
    where the knee is the largest bucket measured (rows have kept paying) it is the top of the next one,
    so that the batch may grow and that bucket be measured: the limit doubles as load reaches it. With
    nothing measured it is 0: the scheduler then lets in only its exploring minimum (twice the oldest
    waiting request's rows), so that a fresh engine hit by a burst grows its batch as it measures, as an
    engine that has served does, rather than admitting everything at once (on a CPU, whose step time
    grows with the rows, that held every request of the burst until the last).
    """

    def __init__(
        self, tolerance: float = 0.1, min_steps: int = 8, smoothing: float = 0.125, memory: int = 2000
    ) -> None:
        given = (tolerance, smoothing)
        tolerance, smoothing = real_number(tolerance, "tolerance"), real_number(smoothing, "smoothing")
        if not tolerance >= 0:
            raise ValueError(f"tolerance: expected a fraction >= 0, got {given[0]!r}")
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing: expected a weight in (0, 1], got {given[1]!r}")
        counts = []
        for name, count in (("min_steps", min_steps), ("memory", memory)):
            try:
                counts.append(check_count(count, name))  # numpy's ints too
            except (TypeError, ValueError):
                raise ValueError(f"{name}: expected a whole number of steps >= 1, got {count!r}") from None
        min_steps, memory = counts
        self.tolerance, self.min_steps, self.smoothing, self.memory = tolerance, min_steps, smoothing, memory
        self._cost: dict[int, float] = {}  # bucket -> seconds per row (exponentially weighted)
        self._steps: dict[int, int] = {}  # bucket -> steps seen
        self._last: dict[int, int] = {}  # bucket -> the step count when it was last seen
        self._count = 0

    def observe(self, rows: int, seconds: float) -> None:
        """One step over ``rows`` rows took ``seconds``."""
        self._count += 1
        if rows <= 0 or not seconds > 0 or not math.isfinite(seconds):
            return
        bucket = rows.bit_length() - 1
        if self._count - self._last.get(bucket, self._count) > self.memory:  # stale: start afresh
            self._steps[bucket] = 0
        per_row = seconds / rows
        seen = self._steps.get(bucket, 0)
        # started at the bucket's first step, often the one whose joins brought the batch to that size:
        # under overload joins come every step, and an estimate that keeps their cost at first held the
        # batch smaller and served more than a plain mean did (bench_overload.py, ad hoc A/B)
        self._cost[bucket] = (
            per_row if not seen else self._cost[bucket] + self.smoothing * (per_row - self._cost[bucket])
        )
        self._steps[bucket] = seen + 1
        self._last[bucket] = self._count

    def measured(self) -> dict[int, float]:
        """Seconds per row of every bucket counted now, by bucket ``k`` (rows ``[2^k, 2^{k+1})``)."""
        return {
            k: cost
            for k, cost in sorted(self._cost.items())
            if self._steps[k] >= self.min_steps and self._count - self._last[k] <= self.memory
        }

    def _knee(self) -> Optional[tuple[int, int]]:
        """The knee bucket and the largest bucket measured; None with nothing measured."""
        measured = self.measured()
        if not measured:
            return None
        best = min(measured.values())
        return min(k for k, cost in measured.items() if cost <= (1 + self.tolerance) * best), max(measured)

    @property
    def exploring(self) -> bool:
        """Whether no batch size has been measured worse than a smaller one yet (nothing measured, or the
        largest size measured is the best so far): the limit is then the next size to try, not a knee."""
        knee = self._knee()
        return knee is None or knee[0] == knee[1]

    def limit(self) -> int:
        """The most rows worth having in flight now (see the class docstring); 0: no measure yet."""
        knee = self._knee()
        if knee is None:
            return 0
        bucket, largest = knee
        return int(2 ** (bucket + (2 if bucket == largest else 1)))
