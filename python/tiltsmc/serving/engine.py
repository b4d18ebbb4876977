"""The serving engine: concurrent requests batched step by step (continuous batching for particle methods).

Requests arrive on any thread ([`Engine.submit`][tiltsmc.serving.engine.Engine.submit], or ``await``
[`Engine.generate`][tiltsmc.serving.engine.Engine.generate]) and wait in the ``Scheduler`` until their
particles fit under ``max_batch_rows``. A worker thread repeats one iteration: admit what fits (their
prompts are encoded then), drop what was cancelled or timed out, then advance every request it holds by one
step — for each kind of step one ``Lane``, whose step is one ``propose`` and one ``log_value`` (one policy
and one reward session call) over the particles of every request in it, then each request's reweighting
and resampling. One worker (the default) holds every request in flight; with ``workers=W`` each of ``W``
threads holds its own batch, the requests going to the worker with the fewest rows that has room for
them (on a CPU whose cores one session call of a small model cannot keep busy, two half-size batches
stepped side by side serve more than one). A request leaves as soon as its particles have all finished,
and its future gets the same [`SamplerResult`][tiltsmc.SamplerResult] that the offline function returns for
one prompt: the offline samplers and the engine run the same runs (``tiltsmc.samplers.runs``).

Each request draws from its own generator (its ``rng``) in the same order as alone, so a request with a
seed gives the same result whatever else is in flight (up to the rounding of batched session calls), and
exactly the offline function's result when it is alone.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import copy
import functools
import inspect
import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future, InvalidStateError
from typing import Any, Literal, Optional, Union

import numpy as np

from .._memory import available_memory, release_free_memory, reuse_freed_memory
from .._rng import as_generator
from ..models._config import flag, real_number
from ..models.protocols import Policy, RewardModel
from ..samplers import baselines, correction, sequential
from ..samplers._engine import Models, check_count
from ..samplers.lane import KINDS, Lane, lanes_in_halves, log_restart
from ..samplers.result import Compute, SamplerResult
from ..samplers.runs import Run, decode_texts
from .scheduler import BatchSizer, EngineClosed, Overloaded, Request, Scheduler, another_should_take

__all__ = ["SAMPLERS", "Engine", "EngineClosed", "Overloaded", "sampler_defaults"]

logger = logging.getLogger("tiltsmc.engine")

# The engine's defaults, which tiltsmc serve and its Ray replicas take too.
MAX_BATCH_ROWS = 4096
MAX_QUEUE = 1024
RELEASE_MEMORY_AFTER = 30.0  # seconds idle after work before memory is given back (see Engine)
ADAPTIVE_ROWS = True  # below max_batch_rows, only the rows that still make a step's rows cheaper
WORKERS = 1  # worker threads, each stepping its own batch
# the KV cache in flight at most: "auto" (CACHE_MEMORY_SHARE of the memory available as the engine starts,
# for a policy that says its cache's size), a number of bytes, or None (no bound: rows only)
MAX_CACHE_BYTES: Union[int, Literal["auto"], None] = "auto"
CACHE_MEMORY_SHARE = 0.25  # a step holds the cache about three times: past, present, and a join's copy
MAX_WORKERS = 256

# Engines not yet closed, stopped at interpreter exit (see _close_open_engines), and how long exit waits
# for their workers to stop.
_OPEN_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()
EXIT_WAIT = 10.0


def _cache_bound(bound: Any, policy: Any) -> Optional[int]:
    """``max_cache_bytes`` checked: None, a positive integer, or ``"auto"``: ``CACHE_MEMORY_SHARE`` of the
    memory available now (the models loaded) where the policy can count its KV cache, else None (rows
    only), as where the memory cannot be read. A number for a policy that cannot count its cache is
    refused with the reason."""
    if bound is None:
        return None
    why = _uncountable_cache(policy)
    if isinstance(bound, str):
        if bound != "auto":
            raise ValueError(f"max_cache_bytes: expected a positive integer, 'auto' or None, got {bound!r}")
        if why is not None or policy.cache_bytes_per_token == 0:
            return None
        available = available_memory()
        return None if available is None else max(1, int(CACHE_MEMORY_SHARE * available))
    count = check_count(bound, "max_cache_bytes")
    if why is not None:
        raise ValueError(f"max_cache_bytes: {why}")
    return count


def _uncountable_cache(policy: Any) -> Optional[str]:
    """Why the engine cannot count what a request's KV cache may reach with this policy (None: it can):
    it needs the policy's ``cache_bytes_per_token`` (an int >= 0, numpy's too), ``encode_prompt`` and
    ``max_new_tokens`` (an int >= 1: the tokens a request adds where it sets no limit of its own)."""
    size = getattr(policy, "cache_bytes_per_token", None)
    try:
        check_count(size, "cache_bytes_per_token", minimum=0)
    except (TypeError, ValueError):
        return (
            "the policy does not say what its KV cache takes a token (cache_bytes_per_token), so its "
            f"cache cannot be bounded: got {size!r}"
        )
    if not callable(getattr(policy, "encode_prompt", None)):
        return "the policy cannot count a prompt's tokens (encode_prompt)"
    limit = getattr(policy, "max_new_tokens", None)
    try:
        check_count(limit, "max_new_tokens")
    except (TypeError, ValueError):
        return (
            "the policy does not say how many tokens a request may add (max_new_tokens, an int >= 1), so "
            f"its cache cannot be bounded: got {limit!r}"
        )
    return None


def _join(threads: list[threading.Thread], wait: Optional[float]) -> list[str]:
    """Wait up to ``wait`` seconds in all (None: as long as it takes) for ``threads`` to end; the names of
    those still running."""
    deadline = None if wait is None else time.monotonic() + wait
    for thread in threads:
        thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    return [thread.name for thread in threads if thread.is_alive()]


def _close_open_engines() -> None:
    """At interpreter exit, close every engine still open, without draining (its requests end with
    ``EngineClosed``), waiting up to ``EXIT_WAIT`` seconds in all for the workers to stop. They are daemon
    threads: left running, one inside a model call when the interpreter finalises is stopped by Python as
    it returns, unwinding through the native frames, which aborts the process ("terminate called without
    an active exception", exit status 134) instead of letting it exit with its own status. ``atexit`` runs
    before that, while the workers still run. A worker whose model call has not returned by then is left
    to the interpreter (logged), so that a call that never returns cannot hold the exit."""
    threads = [thread for engine in list(_OPEN_ENGINES) for thread in engine._stop(drain=False, timeout=None)]
    stuck = _join(threads, EXIT_WAIT)
    if stuck:
        logger.warning(
            "at exit: %s still inside a step after %g s, left to the interpreter", ", ".join(stuck), EXIT_WAIT
        )


atexit.register(_close_open_engines)

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


def _as_submitted(prompt: Any) -> Any:
    """The prompt as it was at ``submit``: a copy of a list or array the caller may change or reuse while
    the request waits (the request is run, and its KV cache counted, on what was submitted); a string as
    it is."""
    if isinstance(prompt, np.ndarray):
        return prompt.copy()
    if isinstance(prompt, (list, tuple)):
        if any(isinstance(item, (Mapping, list, tuple, np.ndarray)) for item in prompt):
            return copy.deepcopy(prompt)  # chat messages (their contents may be lists of parts)
        return list(prompt) if isinstance(prompt, list) else prompt  # token ids
    return prompt


def _rows_option(sampler: str, options: dict[str, Any]) -> str:
    """The option that sets a request's particle rows (named where the engine refuses them)."""
    if sampler == "mh":
        return "num_particles" if options["num_particles"] > 1 else "pool_size"
    if sampler == "smc" and (options.get("final_resample") or 0) > options["num_particles"]:
        return "final_resample"  # its draws at the end are the most rows the request holds
    return {"smc": "num_particles", "sp_gsmc": "pool_size", "best_of_n": "n", "rejection": "batch_size"}[
        sampler
    ]


def sampler_defaults(sampler: str) -> dict[str, Any]:
    """The options of a sampler and their defaults, read from its offline function's signature."""
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {', '.join(SAMPLERS)}, got {sampler!r}")
    return dict(_signature_defaults(sampler))


@functools.cache
def _signature_defaults(sampler: str) -> tuple[tuple[str, Any], ...]:
    # read once per sampler: inspect.signature, per request, was a tenth of the server's event loop's work
    parameters = inspect.signature(SAMPLERS[sampler][0]).parameters
    return tuple((name, p.default) for name, p in parameters.items() if name not in _NOT_OPTIONS)


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


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the system says, else every core)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def _oversubscribed(models: tuple[Any, ...], workers: int) -> Optional[str]:
    """With several workers, what would ask for more threads than cores at once: a model whose ONNX Runtime
    session runs each call on ``t`` intra-op threads (0: one a core), ``workers x t`` of them side by side."""
    if workers <= 1:
        return None
    cores = usable_cores()
    for model in models:
        session = getattr(model, "session", None)
        options = getattr(session, "get_session_options", None)
        if not callable(options):
            continue
        threads = int(options().intra_op_num_threads) or cores
        if workers * threads > cores:
            return (
                f"workers: {workers} workers' calls of {type(model).__name__}, each on {threads} ONNX "
                f"Runtime threads, would share {cores} cores: load the models with intra_op_num_threads="
                f"{max(1, cores // workers)} (tiltsmc serve --workers does)"
            )
    return None


class _ResultFuture(Future[SamplerResult]):
    """A request's future, whose result's texts are decoded at its first read (``result()`` or
    ``exception()``), on the reading thread: the engine's worker leaves them to it (``Run.decodes_texts``
    off), so that decoding the requests that end does not hold up the step of every request in flight. An
    ``await`` of ``Engine.generate`` reads it on the event loop's thread. Where decoding raises (a policy's
    ``decode``), every read after gets that error: ``result()`` raises it and ``exception()`` returns it, as
    for a request that failed; asyncio copies a future's outcome by ``exception()`` then ``result()`` inside
    a callback of its loop, and an ``await`` whose ``result()`` raised there never returned. Cancelled, it
    tells the waiters of ``concurrent.futures.wait`` and ``as_completed`` at once, as an executor does when
    it takes a cancelled future (``set_running_or_notify_cancel``; even where a done-callback raised a
    ``BaseException`` out of ``cancel()``): no executor takes these, and they waited for ever.
    ``cancelled_at``: the ``time.perf_counter()`` (the clock of ``Request.deadline``) of the cancel that
    cancelled it, noted before it turns cancelled (so whoever sees it cancelled sees when): a request
    cancelled past its deadline counts as timed out (``Request.cancelled_outcome``)."""

    def __init__(self, policy: Any) -> None:
        super().__init__()
        self._policy = policy
        self._decoding = threading.Lock()
        self._decoded = False
        self._decode_error: Optional[Exception] = None  # what decoding the texts raised
        self._notified = False  # set_running_or_notify_cancel called (once: again, it raises)
        self.cancelled_at: Optional[float] = None

    def cancel(self) -> bool:
        with self._condition:  # not across super().cancel(): its done-callbacks run without the lock
            if self.cancelled_at is None and not self.done():  # the first cancel that may succeed
                self.cancelled_at = time.perf_counter()
        try:
            return super().cancel()  # runs the done-callbacks, which may raise past it
        finally:
            with self._condition:  # reentrant: set_running_or_notify_cancel takes it too
                if not self._notified and self.cancelled():
                    self._notified = True
                    self.set_running_or_notify_cancel()

    def result(self, timeout: Optional[float] = None) -> SamplerResult:
        result = super().result(timeout)
        error = self._decode(result)
        if error is None:
            return result
        try:
            raise error
        finally:
            del self, error  # the traceback holds this frame: no cycle through the future (as Future's own)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        error = super().exception(timeout)
        if error is not None:
            return error
        return self._decode(super().result(0))

    def _decode(self, result: SamplerResult) -> Optional[Exception]:
        """The texts of ``result`` decoded, once (by the first reader; the others wait for it); what that
        raised, None where it did not."""
        if not self._decoded:
            with self._decoding:
                if not self._decoded:
                    if result.texts is None:
                        try:
                            result.texts = decode_texts(self._policy, result.samples)
                        except Exception as error:
                            self._decode_error = error
                    self._decoded = True
        return self._decode_error


class _Worker:
    """One worker thread's part of the engine: its lanes (one per kind of step), the requests in them, the
    models' time of its calls (its own ``Compute``: the lanes charge each call's time by difference, which
    another thread's calls must not enter), and the batch size it has learned."""

    def __init__(
        self, index: int, policy: Policy, reward: RewardModel, max_rows: int, adaptive: bool
    ) -> None:
        self.index = index
        self.models = Models(policy, reward, Compute())
        self.lanes = {kind: Lane(self.models, kind) for kind in KINDS}
        # lanes of requests that run again from their start, a half of a batch whose model call failed each
        self.retrying: list[Lane] = []
        self.retried_calls = self.retried_rows = 0  # the policy calls of retrying lanes gone, and their rows
        # by id(run): changed by this worker only, under the engine's lock (other threads read it)
        self.in_flight: dict[int, Request] = {}
        self.sizer = BatchSizer() if adaptive else None
        # the rows the scheduler may fill for it (learning: 0 until a batch size is measured, the scheduler's
        # exploring minimum then admitting)
        self.row_limit = 0 if adaptive else max_rows
        self.seconds_per_row: dict[int, float] = {}  # what row_limit was chosen from, by rows (a snapshot)
        self.exploring = True  # no batch size measured worse than a smaller one yet
        # the steps' time and model work, added up at each step's end (under the engine's lock), so that
        # a read between steps sees the parts of the same steps: the models' own counters move call by
        # call, and a read in the middle of a long step would count its model time but not the step
        self.steps = 0
        self.step_seconds = 0.0
        self.policy_seconds = 0.0
        self.reward_seconds = 0.0
        self.policy_calls = 0
        self.reward_calls = 0
        self.calls_served = self.rows_served = 0  # the lanes' policy calls, and the rows they served
        self.seen = -1  # the engine's event count when it last looked at the queue
        self.thread: Optional[threading.Thread] = None

    @property
    def rows(self) -> int:
        """The particle rows of its requests in flight (read under the engine's lock elsewhere)."""
        return sum(request.rows for request in self.in_flight.values())

    @property
    def cache_bytes(self) -> int:
        """The KV cache its requests in flight may reach (where the engine bounds it; else 0)."""
        return sum(request.cache_bytes for request in self.in_flight.values())

    def policy_rows(self) -> tuple[int, int]:
        """Policy calls made by its lanes, and the rows they served."""
        lanes = self.all_lanes()
        calls = self.retried_calls + sum(lane.policy_calls for lane in lanes)
        return calls, self.retried_rows + sum(lane.policy_rows for lane in lanes)

    def all_lanes(self) -> list[Lane]:
        """Its lanes by kind, then those of requests that run again (``retrying``)."""
        return [*self.lanes.values(), *self.retrying]

    def prune_retrying(self) -> None:
        """Retrying lanes whose requests have all ended go (their policy calls kept in the counts)."""
        if any(not len(lane) for lane in self.retrying):
            for lane in self.retrying:
                if not len(lane):
                    self.retried_calls += lane.policy_calls
                    self.retried_rows += lane.policy_rows
            self.retrying = [lane for lane in self.retrying if len(lane)]


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
    least two of the oldest waiting request's size are let in: a fresh engine starts there, its limit 0
    until a batch size is measured); it is in ``stats()["row_limit"]``, with
    the seconds per row it was chosen from in ``stats()["seconds_per_row"]`` (by the bottom row count of
    each size).
    ``max_cache_bytes``: the most KV cache the requests in flight may reach, for a policy that says its
    ``cache_bytes_per_token`` (``OnnxCausalLM`` does). A request counts its rows x (its prompt's tokens +
    its ``max_new_tokens``) x that; it waits while the caches in flight would pass the bound, and one over
    it alone is refused at ``submit`` (``ValueError``). With long prompts this, not the rows, is what
    fills memory (46 KB a token a particle for SmolLM2-135M). The default, ``"auto"``, is a quarter of the
    memory available when the engine starts (the models loaded; a container's limit counts), since a
    step holds the cache about three times over (its past, its present, a join's copy); for a policy that
    cannot say its cache's size, no bound. None: no bound (rows only); ``stats()["max_cache_bytes"]``
    has the bound chosen.
    ``max_queue``: the most requests waiting for rows, past which
    [`submit`][tiltsmc.serving.engine.Engine.submit] raises [`Overloaded`][tiltsmc.serving.engine.Overloaded];
    ``timeout``: the default per-request timeout in seconds (None: none). The worker threads start at once;
    [`close`][tiltsmc.serving.engine.Engine.close] (or leaving a ``with`` block) stops them; an engine
    still open when the interpreter exits is closed then, without draining (waiting up to ``EXIT_WAIT``,
    10 s, for the steps in progress).

    ``workers``: worker threads (default 1), each with its own batch, lanes and learned row limit, all
    sharing the models (ONNX Runtime runs one session's calls from several threads at once) and
    ``max_batch_rows``. A request goes to the worker with the fewest rows in flight that has room for it,
    in arrival order. One worker makes one policy and one reward call a step for every request; on a GPU
    that is what pays. On a CPU, a small model's session call keeps one core busy whatever its threads (on
    the demo's models a second intra-op thread made a call slower): ``W`` workers, each model given
    ``cores / W`` intra-op threads (``tiltsmc serve --workers`` does that), step ``W`` batches side by side.

    ``release_memory_after``: once the engine has been idle that many seconds after work, the models' memory
    pools shrink (their ``release_memory()``, where they have one: ONNX Runtime's arena for the ONNX models)
    and the freed heap goes back to the system (``release_free_memory``), so a long-running service returns to
    about its idle size after a burst (None: never); ``submit`` and ``stats`` do not wait for it, the
    requests submitted meanwhile wait in the queue until it is done, and a ``release_memory()`` that raises
    is logged (a warning the first time) while the engine serves on. Memory given back is not free to take
    again: the next burst faults every page in afresh, and on a virtual machine whose host reclaims the
    pages its guest frees (a balloon with free page reporting) each page is also the host's to fault in
    again, tens of times the cost of touching memory kept (``bench/bench_refault.py``); so the default
    waits ``RELEASE_MEMORY_AFTER`` (30 s): traffic that pauses for less keeps its memory.

    ``keep_freed_memory=True`` (glibc; what ``tiltsmc serve`` and its Ray replicas do, whose process is the
    engine's) keeps freed memory in the C heap for the next arrays instead of every large array being
    mapped afresh, whose page faults cost about ten times the copy that fills it (a join's KV cache, a
    step's logits); the idle release gives it back. It changes malloc for the whole process
    (``tiltsmc._memory.reuse_freed_memory``: ``mallopt`` thresholds, and one malloc arena for the
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
        workers: int = WORKERS,
        max_cache_bytes: Union[int, Literal["auto"], None] = MAX_CACHE_BYTES,
    ) -> None:
        self._models = Models(policy, reward, Compute())  # the runs' checks; the workers count their calls
        problems = [p for p in (_missing_support(policy, "policy"), _missing_support(reward, "reward")) if p]
        if problems:
            raise TypeError("; ".join(problems))
        self.max_batch_rows = check_count(max_batch_rows, "max_batch_rows")
        self.max_queue = check_count(max_queue, "max_queue")
        self.default_timeout = _check_timeout(timeout)
        self.max_cache_bytes = _cache_bound(max_cache_bytes, policy)
        self._cache_bytes_per_token = (
            0 if self.max_cache_bytes is None else int(policy.cache_bytes_per_token)  # type: ignore[attr-defined]
        )
        self._scheduler = Scheduler(self.max_queue, self.max_batch_rows, self.max_cache_bytes)
        self.adaptive_rows = flag(adaptive_rows, "adaptive_rows")
        self.workers = check_count(workers, "workers")
        if self.workers > MAX_WORKERS:
            raise ValueError(f"workers: expected at most {MAX_WORKERS} worker threads, got {self.workers}")
        crowded = _oversubscribed((policy, reward), self.workers)
        if crowded is not None:  # they contend for the cores: slower than fewer threads each, not wrong
            logger.warning(crowded)
        self._workers = [
            _Worker(k, policy, reward, self.max_batch_rows, adaptive_rows) for k in range(self.workers)
        ]
        self._ids = itertools.count(1)
        self._wake = threading.Condition()
        self._events = 0  # requests queued and rows freed: what may let an idle worker admit
        self._closing = False
        self._drain_deadline: Optional[float] = None
        self._broken: Optional[BaseException] = None
        self._counts = {
            "submitted": 0,
            "completed": 0,
            "failed": 0,
            "cancelled": 0,
            "timed_out": 0,
            "closed": 0,
            "rejected": 0,
        }
        self._restarts = 0  # requests run again from their start after a model call failed for their batch
        self._worked = False  # steps taken since the memory was last released
        self._releasing = False  # a worker is giving memory back (outside the lock): no worker admits
        self._release_failures: set[tuple[str, type]] = set()  # (what, error type) logged as a warning
        self.release_memory_after = _seconds(release_memory_after, "release_memory_after")
        # freed blocks reused during a burst, given back once idle
        if flag(keep_freed_memory, "keep_freed_memory"):
            reuse_freed_memory()
        _OPEN_ENGINES.add(self)
        for worker in self._workers:
            name = "tiltsmc-engine" if self.workers == 1 else f"tiltsmc-engine-{worker.index}"
            worker.thread = threading.Thread(target=self._serve, args=(worker,), name=name, daemon=True)
            worker.thread.start()

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
        prompt = _as_submitted(prompt)
        generator = as_generator(rng)
        # A seed's generator is the request's own: a restart draws from its state at submit again, as the
        # offline function with that seed does. A caller's Generator or BitGenerator is one stream, maybe
        # handed to other requests or drawn from after: a restart goes on drawing from it.
        own = not isinstance(rng, (np.random.Generator, np.random.BitGenerator))
        start = _generator_state(generator) if own else None
        factory, settings = SAMPLERS[sampler][1], {**defaults, **options}
        run = factory(self._models, [prompt], rng=generator, **settings)
        run.decodes_texts = False  # the future decodes them as they are read
        future: Future[SamplerResult] = _ResultFuture(self.policy)
        request = Request(
            next(self._ids),
            run,
            future,
            run.rows_per_prompt,
            self._cache_bytes(prompt, run),
            rows_option=_rows_option(sampler, settings),
            restart=functools.partial(self._restart, factory, prompt, generator, start, settings),
        )
        if deadline_after is not None:
            request.deadline = request.submitted + deadline_after
        with self._wake:
            if self._closing or self._broken is not None:
                raise EngineClosed(
                    "the engine is closed" if self._broken is None else f"the engine failed: {self._broken!r}"
                )
            try:
                made_room = self._scheduler.enqueue(request)  # cancelled requests taken out for it
            except Overloaded:
                self._counts["rejected"] += 1
                raise
            for cancelled in made_room:
                self._counts[cancelled.cancelled_outcome()] += 1
            self._counts["submitted"] += 1
            self._events += 1
            self._wake.notify_all()
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
        the steps so far split into the policy's, the reward model's and tiltsmc's own (summed over the
        workers; each worker's own figures in ``"workers"``); ``"restarts"``: the times requests ran again
        from their start after a model call raised for their batch (``_restart_halves``). The split, the
        model calls and the rows per policy call are added up at the end of each step: two reads always
        cover the same whole steps in every part (a step in progress is in none). The counts add up at
        every read: ``submitted`` is the sum of the outcomes (``completed``, ``failed``, ``cancelled``,
        ``timed_out``, ``closed``: ended unfinished by ``close`` at the end of its grace period, or cancelled
        past its end, see ``Request.cancelled_outcome``; ``rejected`` requests are not submitted),
        ``waiting`` and ``in_flight``. A request cancelled while it waits is ``cancelled`` at once (no
        longer ``waiting``); one cancelled in flight, or past its deadline, once its worker takes it out, at
        its next step. A request cancelled at or past its deadline counts as ``timed_out``
        (``Request.cancelled_outcome``: the HTTP server's own 504, for a model call that overran the
        deadline), at or past the end of a close's grace period as ``closed`` (its 503)."""
        with self._wake:
            counts = dict(self._counts)
            waiting, ended_waiting = self._scheduler.waiting_and_ended()
            for outcome, count in ended_waiting.items():
                counts[outcome] += count
            restarts = self._restarts
            workers: list[dict[str, Any]] = [
                {
                    "in_flight": len(w.in_flight),
                    "rows_in_flight": w.rows,
                    "row_limit": w.row_limit,
                    "seconds_per_row": dict(w.seconds_per_row),
                    "steps": w.steps,
                    "step_seconds": w.step_seconds,
                }
                for w in self._workers
            ]
            cache_bytes = sum(w.cache_bytes for w in self._workers)  # in_flight changes under the lock
            # the completed steps' parts (see _Worker), read together
            policy_seconds = sum(w.policy_seconds for w in self._workers)
            reward_seconds = sum(w.reward_seconds for w in self._workers)
            policy_calls = sum(w.policy_calls for w in self._workers)
            reward_calls = sum(w.reward_calls for w in self._workers)
            calls = sum(w.calls_served for w in self._workers)
            rows = sum(w.rows_served for w in self._workers)
        seconds = sum(float(w["step_seconds"]) for w in workers)
        return {
            "waiting": waiting,
            "in_flight": sum(int(w["in_flight"]) for w in workers),
            "rows_in_flight": sum(int(w["rows_in_flight"]) for w in workers),
            "max_batch_rows": self.max_batch_rows,
            "cache_bytes_in_flight": cache_bytes,
            "max_cache_bytes": self.max_cache_bytes,
            "row_limit": min(sum(int(w["row_limit"]) for w in workers), self.max_batch_rows),
            "seconds_per_row": _mean_by_rows([w["seconds_per_row"] for w in workers]),
            "steps": sum(int(w["steps"]) for w in workers),
            "rows_per_policy_call": rows / calls if calls else 0.0,
            "policy_calls": policy_calls,
            "reward_calls": reward_calls,
            "step_seconds": seconds,
            "policy_seconds": policy_seconds,
            "reward_seconds": reward_seconds,
            "tiltsmc_seconds": max(seconds - policy_seconds - reward_seconds, 0.0),
            "requests": counts,
            "restarts": restarts,
            "closed": self._closing,
            "failed": None if self._broken is None else repr(self._broken),
            "workers": workers,
        }

    def close(
        self, drain: bool = True, timeout: Optional[float] = 30.0, *, wait: Optional[float] = None
    ) -> bool:
        """Stop taking requests; with ``drain``, finish those queued and in flight for up to ``timeout``
        seconds (None: as long as they take); then end the rest with
        [`EngineClosed`][tiltsmc.serving.engine.EngineClosed]. Returns once the workers have stopped (True),
        or at once where called on a worker's own thread (a future's done-callback). Called again, it never
        gives the requests longer than an earlier call did (the drain ends then, or sooner where this call's
        ``timeout`` ends first). A worker stops at the end of the step it is in, which ``close`` cannot cut
        short: with ``wait``, it returns after ``wait`` seconds past the drain's ``timeout`` (from now
        without one), False where a worker is still inside a step (a model call that takes that long),
        instead of waiting for ever. Bad arguments raise before anything is stopped."""
        drain = flag(drain, "drain")
        timeout, wait = _seconds(timeout, "timeout"), _seconds(wait, "wait")
        threads = self._stop(drain, timeout)
        if threading.current_thread() in threads:  # from a worker (a future's callback): it must go on
            return False
        if wait is not None and drain and timeout is not None:
            wait = min(wait + timeout, threading.TIMEOUT_MAX)
        return not _join(threads, wait)

    def _cache_bytes(self, prompt: Any, run: Any) -> int:
        """The KV cache a request may reach, where the engine bounds it (else 0): its particle rows x (its
        prompt's tokens + its new tokens at most) x the policy's cache bytes a token. A prompt the policy
        cannot encode counts no tokens: it fails alone at its start."""
        if self.max_cache_bytes is None:
            return 0
        try:
            if getattr(self.policy, "start_takes_token_limits", False) is True:  # its context check counts it
                encoded = self.policy.encode_prompt(prompt, run.max_new_tokens)  # type: ignore[attr-defined]
            else:
                encoded = self.policy.encode_prompt(prompt)  # type: ignore[attr-defined]
            prompt_tokens = len(encoded)
        except Exception:
            prompt_tokens = 0
        new_tokens = run.max_new_tokens or int(getattr(self.policy, "max_new_tokens", 0))
        return int(run.rows_per_prompt * (prompt_tokens + new_tokens) * self._cache_bytes_per_token)

    def _stop(self, drain: bool, timeout: Optional[float]) -> list[threading.Thread]:
        """``close`` without waiting: the workers are told to stop; returns their threads. A close after
        another keeps the earlier end of the drain where it comes first (a ``with`` block's exit after
        ``close(drain=False)`` does not let the requests drain again), and brings it forward otherwise."""
        with self._wake:
            now = time.perf_counter()
            deadline = now if not drain else (None if timeout is None else now + timeout)
            if not self._closing or (
                deadline is not None and (self._drain_deadline is None or deadline < self._drain_deadline)
            ):
                self._drain_deadline = deadline
                if deadline is not None:  # what a request cancelled from then on counts as (closed)
                    self._scheduler.close_at(deadline)
                    for worker in self._workers:
                        for request in worker.in_flight.values():
                            request.closes_at = deadline
            self._closing = True
            self._wake.notify_all()
        _OPEN_ENGINES.discard(self)
        return [worker.thread for worker in self._workers if worker.thread is not None]

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the workers -----------------------------------------------------------------------------------

    def _serve(self, worker: _Worker) -> None:
        try:
            while self._iterate(worker):
                pass
        except BaseException as error:  # a bug in the engine itself: fail everything, never hang a future
            logger.exception("an engine worker failed; every request ends with its error")
            with self._wake:
                if self._broken is None:
                    self._broken = error
                self._wake.notify_all()  # the other workers end theirs and stop
            self._end_all(worker, EngineClosed(f"the engine failed: {error!r}"))

    def _waits(self, worker: _Worker, now: float) -> bool:
        """Whether ``worker`` has nothing to do now: nothing in flight, and nothing it could admit that it
        has not looked at (the queue empty, or unchanged since it found nothing that fits)."""
        if self._broken is not None or worker.in_flight:
            return False
        if self._releasing:
            return True  # no step while a worker gives memory back (another worker's is idle too)
        if self._closing and (
            not len(self._scheduler) or (self._drain_deadline is not None and now >= self._drain_deadline)
        ):
            return False  # done, or the grace period is over: the worker ends what is left and stops
        return not len(self._scheduler) or self._events == worker.seen

    def _iterate(self, worker: _Worker) -> bool:
        """One iteration of ``worker``; False once it should stop (the engine closed and nothing left, or
        broken)."""
        with self._wake:
            while self._waits(worker, time.perf_counter()):
                wait = self.release_memory_after if self._worked and not self._closing else None
                if self._closing and self._drain_deadline is not None:
                    wait = max(self._drain_deadline - time.perf_counter(), 0.0)
                if self._releasing:
                    wait = None  # told when it is done
                if not self._wake.wait(wait) and self._worked and self._all_idle():
                    # idle that long after work: the burst is over; the models' arenas and the freed heap
                    # go back to the system (not at once: traffic that pauses briefly keeps its memory);
                    # once, by the first worker to find it so
                    self._worked = False
                    self._release_memory()
            closing, deadline, broken = self._closing, self._drain_deadline, self._broken
            worker.seen = self._events
        now = time.perf_counter()
        if broken is not None:  # another worker failed: end this one's requests
            self._end_all(worker, EngineClosed(f"the engine failed: {broken!r}"))
            return False
        if closing and deadline is not None and now >= deadline:
            self._end_all(worker, EngineClosed("the engine closed before the request finished"), "closed")
            return False
        gone = self._out_of_lanes(worker, now)
        with self._wake:  # under the lock: the workers' rows in flight cannot change meanwhile
            timed_out = self._take_ended(worker, gone, now)
            admitted: list[Request] = []
            if not self._releasing:  # else it left the wait before another worker began giving memory back
                admitted = self._scheduler.admit(
                    worker.rows,
                    worker.row_limit,
                    worker.exploring,
                    engine_rows=sum(w.rows for w in self._workers),
                    cache_bytes=sum(w.cache_bytes for w in self._workers),
                    defer=None if self.workers == 1 else lambda rows, head: self._defers(worker, rows, head),
                )
            for request in admitted:
                request.admitted = now
                worker.in_flight[id(request.run)] = request
        for request, timeout_error in timed_out:  # outside the lock: their futures' callbacks run here
            self._settle(request, timeout_error)
        for request in admitted:
            worker.lanes[request.run.kind].add(request.run)
        if not worker.in_flight:
            return not (closing and not len(self._scheduler))
        self._worked = True
        compute = worker.models.compute
        before = (compute.policy_seconds, compute.reward_seconds, compute.policy_calls, compute.reward_calls)
        began = time.perf_counter()
        calls_before, rows_before = worker.policy_rows()
        for lane in worker.all_lanes():
            if len(lane):
                try:
                    ended = lane.step()
                except Exception as failure:  # the lane's own bookkeeping failed: its requests end with it
                    logger.exception("a lane step failed")
                    ended = [(run, failure) for run in lane.runs()]
                    lane.remove(lane.runs())
                failed: list[tuple[Run, Optional[BaseException]]] = []
                for run, error in ended:
                    if id(run) in lane.failed_together:
                        failed.append((run, error))
                    else:
                        self._finish(worker, run, error)
                if failed:
                    self._restart_halves(worker, failed)
        worker.prune_retrying()
        seconds = time.perf_counter() - began
        calls_after, rows_after = worker.policy_rows()
        if worker.sizer is not None:  # the rows the step's policy calls served, and what the step took
            worker.sizer.observe(rows_after - rows_before, seconds)
            row_limit = min(worker.sizer.limit(), self.max_batch_rows)
            if row_limit != worker.row_limit:
                measured = {2**k: cost for k, cost in worker.sizer.measured().items()}
                logger.debug("worker %d: row limit %d -> %d (seconds per row: %s)", worker.index,
                             worker.row_limit, row_limit, measured)  # fmt: skip
                with self._wake:
                    worker.seconds_per_row = measured
            worker.row_limit = row_limit
            worker.exploring = worker.sizer.exploring
        with self._wake:
            worker.steps += 1
            worker.step_seconds += seconds
            worker.policy_seconds += compute.policy_seconds - before[0]
            worker.reward_seconds += compute.reward_seconds - before[1]
            worker.policy_calls += compute.policy_calls - before[2]
            worker.reward_calls += compute.reward_calls - before[3]
            worker.rows_served += rows_after - rows_before
            worker.calls_served += calls_after - calls_before
        return True

    def _defers(self, worker: _Worker, rows: int, head: int) -> bool:
        """Whether another worker should take a request of ``head`` rows that ``worker`` (with ``rows``
        in flight) could (``another_should_take``)."""
        others = [(other.rows, other.row_limit) for other in self._workers if other is not worker]
        return another_should_take(rows, head, others)

    def _all_idle(self) -> bool:
        return not len(self._scheduler) and not any(w.in_flight for w in self._workers)

    def _release_memory(self) -> None:
        """Give memory back (``_give_memory_back``), called under the lock by the worker that found every
        worker idle: the lock is let go meanwhile, so that ``submit`` and ``stats`` do not wait for it (the
        freed heap's trim can take a while), and no worker admits until it is done, so that no step runs
        beside the models' shrinking (their ``release_memory()`` is called with nothing in flight, as ever);
        requests submitted meanwhile wait in the queue."""
        self._releasing = True
        self._wake.release()  # held once: by _iterate
        try:
            self._give_memory_back()
        finally:
            self._wake.acquire()
            self._releasing = False
            self._wake.notify_all()

    def _give_memory_back(self) -> None:
        """The models' memory pools shrink (their ``release_memory()``, where they have one) and the freed
        heap goes back to the system (``release_free_memory``). One of them that raises leaves its memory
        kept, and the engine goes on serving: it is logged as a warning the first time it raises that type
        of error, at debug level after (not at every idle period)."""
        releases: list[tuple[str, Any]] = [
            (f"the {role}'s release_memory()", getattr(model, "release_memory", None))
            for role, model in (("policy", self._models.policy), ("reward model", self._models.reward))
        ]
        releases.append(("release_free_memory()", release_free_memory))
        for what, release in releases:
            if not callable(release):
                continue
            try:
                release()
            except Exception as error:
                cause = (what, type(error))
                seen = cause in self._release_failures
                self._release_failures.add(cause)
                logger.log(
                    logging.DEBUG if seen else logging.WARNING,
                    "giving memory back while idle: %s raised %r; its memory is kept and the engine goes on"
                    + ("" if seen else " (this error of it is logged at debug level from now on)"),
                    what,
                    error,
                )

    def _out_of_lanes(self, worker: _Worker, now: float) -> list[Request]:
        """``worker``'s requests in flight cancelled or past their deadline, taken out of its lanes (one
        compaction of each lane's particles); still in flight until ``_take_ended`` takes and counts them."""
        gone = [r for r in worker.in_flight.values() if r.cancelled or r.expired(now)]
        if gone:
            for kind, lane in worker.lanes.items():
                lane.remove([r.run for r in gone if r.run.kind == kind])
            for lane in worker.retrying:
                lane.remove([r.run for r in gone])
        return gone

    def _take(self, worker: _Worker, request: Request) -> None:
        """Out of ``worker``'s requests in flight (under the lock): its rows are free for any worker."""
        del worker.in_flight[id(request.run)]
        self._events += 1
        if self.workers > 1:
            self._wake.notify_all()

    def _take_ended(
        self, worker: _Worker, gone: list[Request], now: float
    ) -> list[tuple[Request, BaseException]]:
        """Under the lock: the waiting requests cancelled or past their deadline taken out of the queue, and
        ``gone`` (``worker``'s in flight so, out of its lanes) out of its requests, each counted as it
        leaves (``stats()`` never sees a request that is neither waiting, in flight nor counted; one
        cancelled as ``Request.cancelled_outcome`` says); returns those past their deadline and not
        cancelled, each with the ``TimeoutError`` its future is to get once the lock is let go. A waiting
        request taken out wakes the idle workers: the one behind it may fit now, and the worker it fits
        goes to may be another (``_defers``)."""
        expired = self._scheduler.take_expired(now)
        if not expired and not gone:
            return []
        if expired:
            self._events += 1
            if self.workers > 1:
                self._wake.notify_all()
        for request in gone:
            self._take(worker, request)
        timed_out: list[tuple[Request, BaseException]] = []
        for request in (*expired, *gone):
            if request.future.cancelled():
                self._counts[request.cancelled_outcome()] += 1
            else:
                self._counts["timed_out"] += 1
                waited = now - request.submitted
                timed_out.append(
                    (request, TimeoutError(f"timeout: the request took more than {waited:.3g} s"))
                )
        return timed_out

    def _restart(
        self,
        factory: Callable[..., Run],
        prompt: Any,
        generator: np.random.Generator,
        start: Any,
        settings: dict[str, Any],
    ) -> Run:
        """A request's run afresh. With ``start`` (the state at ``submit`` of the generator a seed made), it
        draws from a copy of that generator set back to it: what the offline function gives for the
        seed. Without (a caller's generator), it draws from the caller's generator where the run that
        failed left it, as a call made again would: never set back, so two requests handed one generator,
        or the caller's own later draws, never reuse each other's numbers."""
        if start is not None:
            generator = copy.deepcopy(generator)
            generator.bit_generator.state = start
        run = factory(self._models, [prompt], rng=generator, **settings)
        run.decodes_texts = False
        return run

    def _restart_halves(self, worker: _Worker, failed: list[tuple[Run, Optional[BaseException]]]) -> None:
        """Runs that a model call failing for their batch ended (``Lane.failed_together``, each with the
        error): their requests run again from their start, in two lanes of half the batch each
        (``lanes_in_halves``), instead of ending with the error. A half that fails so again is halved in turn,
        down to a request alone, whose failure is its own (a prompt, options or draws the model cannot
        take): one request failing every call it is in costs the others their steps so far, each at most
        ``log2`` of the batch's requests times, and a batch that failed for another cause (memory that a
        smaller call finds) its requests their steps so far, not their results. A request with a seed so
        gives what it gives in any batch, alone exactly the offline function's result (``_restart``)."""
        restarted: list[Run] = []
        for run, error in failed:
            with self._wake:
                request = worker.in_flight.get(id(run))
            if request is None or request.restart is None or request.future.cancelled():
                self._finish(worker, run, error)  # cancelled: counted so
                continue
            try:
                fresh = request.restart()
            except Exception:  # it cannot be built again: the request ends with the batch's error
                logger.exception("request %d cannot run again", request.id)
                self._finish(worker, run, error)
                continue
            with self._wake:
                del worker.in_flight[id(run)]
                worker.in_flight[id(fresh)] = request
                request.run = fresh
                self._restarts += 1
            restarted.append(fresh)
        if restarted:
            lanes = lanes_in_halves(worker.models, restarted)
            log_restart(failed, lanes, "requests")
            worker.retrying.extend(lanes)

    def _finish(self, worker: _Worker, run: Run, error: Optional[BaseException]) -> None:
        result = run.result
        if error is None and result is not None and result.errors:
            error = ValueError(next(iter(result.errors.values())))
        with self._wake:  # taken out and counted under the lock once
            request = worker.in_flight.get(id(run))
            if request is None:
                return
            self._take(worker, request)
            cancelled = request.future.cancelled()  # by its caller during this step (or the server's timer)
            if cancelled:
                self._counts[request.cancelled_outcome()] += 1
            else:
                self._counts["failed" if error is not None else "completed"] += 1
        if cancelled:
            return
        if error is not None:
            self._settle(request, error)
            return
        assert result is not None
        result.compute.total_seconds = time.perf_counter() - request.submitted
        self._settle(request, None, result)

    def _settle(self, request: Request, error: Optional[BaseException], result: Any = None) -> None:
        """The request's future gets its result or ``error``. Its done-callbacks run here, on the worker:
        ``concurrent.futures`` logs an ``Exception`` they raise, and a ``BaseException`` (a callback's
        ``sys.exit()`` or ``KeyboardInterrupt``) is logged here too, so that a caller's callback cannot end
        the worker and every other request with it."""
        try:
            if error is not None:
                request.future.set_exception(error)
            else:
                request.future.set_result(result)
        except InvalidStateError:  # cancelled by its caller in the meantime
            pass
        except BaseException:  # a caller's done-callback, not the engine
            logger.exception("a done-callback of a request raised; the engine goes on")

    def _end_all(self, worker: _Worker, error: BaseException, outcome: str = "failed") -> None:
        """End the waiting requests and ``worker``'s in flight with ``error``: taken out and counted under
        the lock (as ``outcome``: ``failed`` where the engine failed, ``closed`` where its grace period
        ended; where their future was cancelled, as ``Request.cancelled_outcome`` says), their futures
        settled after."""
        with self._wake:
            in_flight = list(worker.in_flight.values())
            for request in in_flight:
                self._take(worker, request)
            failed = []
            for request in (*self._scheduler.take_all(), *in_flight):
                if request.future.cancelled():
                    self._counts[request.cancelled_outcome()] += 1
                else:
                    self._counts[outcome] += 1
                    failed.append(request)
        for request in failed:
            self._settle(request, error)
        for lane in worker.all_lanes():
            with contextlib.suppress(Exception):  # after a failure of the worker its lanes may be broken
                lane.remove(lane.runs())


def _generator_state(generator: np.random.Generator) -> Any:
    """The state of ``generator``'s bit generator, to set it back to (None where it has none to give).
    numpy's bit generators build it afresh at each read (their arrays included): a copy, which the
    generator's later draws leave as it is."""
    try:
        return generator.bit_generator.state
    except Exception:
        return None


def _mean_by_rows(tables: list[dict[int, float]]) -> dict[int, float]:
    """Seconds per row by batch size, averaged over the workers that measured each size."""
    sizes = sorted({size for table in tables for size in table})
    return {
        size: sum(t[size] for t in tables if size in t) / sum(size in t for t in tables) for size in sizes
    }


def _check_timeout(timeout: Any) -> Optional[float]:
    return _seconds(timeout, "timeout", positive=True)


def _seconds(value: Any, name: str, positive: bool = False) -> Optional[float]:
    """``value`` as seconds to wait: a real number (numpy's too, not a bool) >= 0 (> 0 with
    ``positive``), or None; infinity, or more than ``threading.TIMEOUT_MAX`` (about 292 years, the most a
    wait takes), is None: no limit. TypeError / ValueError naming ``name``."""
    if value is None:
        return None
    seconds = real_number(value, name)
    if not (seconds > 0 if positive else seconds >= 0):  # NaN too
        bound = ">" if positive else ">="
        raise ValueError(f"{name}: expected a number of seconds {bound} 0 or None, got {value!r}")
    return None if seconds >= threading.TIMEOUT_MAX else seconds
