"""Admission of requests into the engine: a bounded queue and a budget of particle rows in flight."""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Optional

from ..samplers.runs import Run

__all__ = ["EngineClosed", "Overloaded", "Request", "Scheduler"]


class Overloaded(RuntimeError):
    """The engine's queue of waiting requests is full: the request was refused at once (retry later)."""


class EngineClosed(RuntimeError):
    """The engine is closed (or closing): it takes no new requests, and those it could not finish end
    with this error."""


@dataclass(eq=False)
class Request:
    """One request: its run, its future, the particle rows it holds in flight and its deadline."""

    id: int
    run: Run
    future: Future[Any]
    rows: int
    submitted: float = field(default_factory=time.perf_counter)
    deadline: Optional[float] = None
    admitted: Optional[float] = None

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


class Scheduler:
    """Requests wait in arrival order; the oldest is admitted as soon as its rows fit under
    ``max_batch_rows`` with the rows already in flight (first come, first served: a large request at the
    head is not overtaken, so it never starves). ``enqueue`` refuses with
    [`Overloaded`][tiltsmc.serving.scheduler.Overloaded] past ``max_queue`` waiting requests. Thread-safe:
    ``enqueue`` runs on the callers' threads, the rest on the engine's worker.
    """

    def __init__(self, max_queue: int, max_batch_rows: int) -> None:
        self.max_queue = max_queue
        self.max_batch_rows = max_batch_rows
        self._waiting: collections.deque[Request] = collections.deque()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._waiting)

    def enqueue(self, request: Request) -> None:
        if request.rows > self.max_batch_rows:
            raise ValueError(
                f"num_particles: the request needs {request.rows} particle rows, more than the engine's "
                f"max_batch_rows = {self.max_batch_rows}"
            )
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(f"{len(self._waiting)} requests are waiting (max_queue = {self.max_queue})")
            self._waiting.append(request)

    def admit(self, rows_in_flight: int) -> list[Request]:
        """The waiting requests that fit now, oldest first."""
        admitted: list[Request] = []
        with self._lock:
            while self._waiting and rows_in_flight + self._waiting[0].rows <= self.max_batch_rows:
                request = self._waiting.popleft()
                rows_in_flight += request.rows
                admitted.append(request)
        return admitted

    def take_expired(self, now: float) -> list[Request]:
        """Waiting requests whose future was cancelled or whose deadline passed, taken out of the queue."""
        with self._lock:
            gone = [r for r in self._waiting if r.future.cancelled() or r.expired(now)]
            if gone:
                self._waiting = collections.deque(r for r in self._waiting if r not in gone)
        return gone

    def take_all(self) -> list[Request]:
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        return waiting
