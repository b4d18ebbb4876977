"""Admission: the scheduler's row budgets, and the batch size the engine learns from its steps' times
(tiltsmc.serving.scheduler)."""

from __future__ import annotations

import gc
import math
import threading
import weakref
from concurrent.futures import Future
from typing import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiltsmc.serving.scheduler import BatchSizer, Overloaded, Request, Scheduler, another_should_take


def _request(number: int, rows: int) -> Request:
    return Request(number, run=None, future=Future(), rows=rows)  # type: ignore[arg-type]


def _observe_buckets(sizer: BatchSizer, seconds: Callable[[int], float], buckets: range, steps: int) -> None:
    """``steps`` steps at the bottom row count of each bucket ``k`` (``2^k`` rows)."""
    for k in buckets:
        for _ in range(steps):
            sizer.observe(2**k, seconds(2**k))


def _knee(seconds: Callable[[int], float], buckets: range, tolerance: float) -> int:
    """The smallest bucket within ``tolerance`` of the lowest seconds per row, found by a plain scan."""
    per_row = {k: seconds(2**k) / 2**k for k in buckets}
    best = min(per_row.values())
    return next(k for k in buckets if per_row[k] <= (1 + tolerance) * best)


def test_the_limit_is_zero_until_a_bucket_has_enough_steps() -> None:
    """0 (the scheduler's exploring minimum only) while nothing is measured, and exploring."""
    sizer = BatchSizer(min_steps=8)
    assert (sizer.limit(), sizer.exploring) == (0, True)
    _observe_buckets(sizer, lambda rows: 1e-3 * rows, range(4, 5), steps=7)
    assert (sizer.limit(), sizer.exploring) == (0, True)
    sizer.observe(16, 16e-3)
    assert sizer.limit() == 64  # the only bucket measured is the knee so far: room for the next one


@pytest.mark.parametrize(
    ("name", "seconds"),
    [
        ("fixed part, then linear (a CPU)", lambda rows: 3e-3 + 0.33e-3 * rows),
        ("rows' cost growing faster than the rows", lambda rows: 3e-3 + 0.3e-3 * rows + 2e-6 * rows**2),
        ("no fixed part", lambda rows: 0.5e-3 * rows),
    ],
)
def test_the_limit_is_the_top_of_the_knee_bucket(name: str, seconds: Callable[[int], float]) -> None:
    """Where larger batches stop paying (within the tolerance of the best seconds per row), the limit is
    the top of the smallest bucket that gets there; the larger buckets stay measured but unused."""
    buckets = range(2, 11)
    sizer = BatchSizer(tolerance=0.1)
    _observe_buckets(sizer, seconds, buckets, steps=8)
    knee = _knee(seconds, buckets, 0.1)
    assert knee < max(buckets), name
    assert sizer.limit() == 2 ** (knee + 1), name


def test_the_limit_doubles_while_rows_keep_paying() -> None:
    """A step whose time hardly grows with its rows (a GPU's kernel launches): each bucket measured lets
    the batch reach the next one."""
    sizer = BatchSizer()
    for top in range(3, 12):
        _observe_buckets(sizer, lambda rows: 2e-3 + 1e-6 * rows, range(top, top + 1), steps=8)
        assert sizer.limit() == 2 ** (top + 2)


def test_a_bucket_not_seen_for_a_while_is_forgotten() -> None:
    """Old measurements expire, so the limit can grow again where the cost has changed."""
    sizer = BatchSizer(memory=50)
    _observe_buckets(sizer, lambda rows: 1e-3 * rows, range(2, 6), steps=8)
    assert set(sizer.measured()) == {2, 3, 4, 5}
    assert sizer.limit() == 8  # no fixed part: the smallest bucket is as good as any
    for _ in range(60):
        sizer.observe(4, 4e-3)
    assert set(sizer.measured()) == {2}
    assert sizer.limit() == 16


def test_steps_without_rows_or_time_are_not_counted() -> None:
    sizer = BatchSizer(min_steps=1)
    for rows, seconds in [(0, 1.0), (4, 0.0), (4, math.nan), (4, math.inf), (-3, 1.0)]:
        sizer.observe(rows, seconds)
    assert sizer.measured() == {}


def test_the_weighted_mean_starts_at_the_first_step_and_follows_the_newest() -> None:
    sizer = BatchSizer(min_steps=1, smoothing=0.25)
    sizer.observe(8, 8e-3)
    assert sizer.measured() == {3: pytest.approx(1e-3)}
    sizer.observe(8, 8 * 5e-3)
    assert sizer.measured() == {3: pytest.approx(1e-3 + 0.25 * (5e-3 - 1e-3))}


def test_exploring_until_a_larger_size_is_measured_worse() -> None:
    sizer = BatchSizer()
    assert sizer.exploring
    _observe_buckets(sizer, lambda rows: 3e-3 + 0.3e-3 * rows, range(2, 5), steps=8)
    assert sizer.exploring  # every larger size so far was cheaper per row
    _observe_buckets(sizer, lambda rows: 3e-3 + 0.3e-3 * rows + 2e-5 * rows**2, range(5, 9), steps=8)
    assert not sizer.exploring


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tolerance": -0.1}, "tolerance"),
        ({"smoothing": 0.0}, "smoothing"),
        ({"smoothing": 1.5}, "smoothing"),
        ({"min_steps": 0}, "min_steps"),
        ({"memory": 0}, "memory"),
        ({"memory": 2.5}, "memory"),
    ],
)
def test_bad_settings_are_refused(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchSizer(**options)  # type: ignore[arg-type]


def test_admission_stops_at_the_row_limit_but_never_starves_the_oldest() -> None:
    scheduler = Scheduler(max_queue=10, max_batch_rows=64)
    for number, rows in enumerate([16, 16, 16, 40]):
        scheduler.enqueue(_request(number, rows))
    assert [r.id for r in scheduler.admit(0, row_limit=32)] == [0, 1]
    assert scheduler.admit(32, row_limit=32) == []
    assert [r.id for r in scheduler.admit(16, row_limit=32)] == [2]
    # more rows than the limit, nothing in flight: the oldest still runs (alone)
    assert [r.id for r in scheduler.admit(0, row_limit=32)] == [3]


def test_while_exploring_a_large_request_does_not_run_alone() -> None:
    """A request larger than any batch measured so far: while the sizer is exploring, the limit is at
    least twice its rows, so the next one of its size joins it; with evidence against larger batches
    (not exploring) the limit stands and it runs alone."""
    for exploring, first in ((True, [0, 1]), (False, [0])):
        scheduler = Scheduler(max_queue=10, max_batch_rows=4096)
        for number in range(3):
            scheduler.enqueue(_request(number, 256))
        assert [r.id for r in scheduler.admit(0, row_limit=8, exploring=exploring)] == first


def test_the_row_limit_never_lifts_max_batch_rows() -> None:
    scheduler = Scheduler(max_queue=10, max_batch_rows=24)
    for number in range(3):
        scheduler.enqueue(_request(number, 16))
    assert [r.id for r in scheduler.admit(0, row_limit=4096, exploring=True)] == [0]
    assert scheduler.admit(16, row_limit=4096, exploring=True) == []
    assert len(scheduler) == 2


def test_max_batch_rows_bounds_every_workers_rows_together() -> None:
    """A worker with nothing in flight still waits while the engine's other workers hold the rows."""
    scheduler = Scheduler(max_queue=10, max_batch_rows=32)
    for number in range(3):
        scheduler.enqueue(_request(number, 16))
    assert scheduler.admit(0, engine_rows=24) == []
    assert [r.id for r in scheduler.admit(0, engine_rows=16)] == [0]
    assert [r.id for r in scheduler.admit(16, engine_rows=16)] == [1]
    assert scheduler.admit(0, engine_rows=32) == []
    assert len(scheduler) == 1


def test_a_worker_leaves_the_oldest_request_to_the_one_it_defers_to() -> None:
    """``defer`` sees the worker's rows as they grow: here another worker has 8 rows, so this one takes
    requests until it holds more than that, then stops (the rest stay queued, in order)."""
    scheduler = Scheduler(max_queue=10, max_batch_rows=4096)
    for number in range(4):
        scheduler.enqueue(_request(number, 4))
    asked: list[tuple[int, int]] = []

    def defer(rows: int, head: int) -> bool:
        asked.append((rows, head))
        return 8 < rows

    assert [r.id for r in scheduler.admit(0, defer=defer)] == [0, 1, 2]
    assert asked == [(0, 4), (4, 4), (8, 4), (12, 4)]
    assert len(scheduler) == 1


@settings(max_examples=300, deadline=None)
@given(
    workers=st.integers(1, 4),
    max_rows=st.integers(8, 64),
    sizes=st.lists(st.integers(1, 8), min_size=1, max_size=40),
    limits=st.lists(st.integers(1, 64), min_size=4, max_size=4),
    script=st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 100)), max_size=200),
)
def test_workers_admitting_in_turn_keep_every_bound_and_serve_everyone(
    workers: int, max_rows: int, sizes: list[int], limits: list[int], script: list[tuple[bool, int, int]]
) -> None:
    """Workers admit in any order (each under the engine's lock, as the engine does) and their requests
    finish in any order: the engine's rows never exceed ``max_batch_rows``, requests leave the queue in
    arrival order, a worker's own rows pass its row limit only for the one request it admits with nothing
    in flight, and once the requests in flight finish the queue always drains: nobody waits for good."""
    scheduler = Scheduler(max_queue=100, max_batch_rows=max_rows)
    for number, rows in enumerate(sizes):
        scheduler.enqueue(_request(number, rows))
    held: list[list[Request]] = [[] for _ in range(workers)]
    admitted: list[int] = []

    def rows_of(k: int) -> int:
        return sum(r.rows for r in held[k])

    def admit(k: int) -> None:
        others = [(rows_of(j), limits[j]) for j in range(workers) if j != k]
        before = rows_of(k)
        taken = scheduler.admit(
            before,
            limits[k],
            engine_rows=sum(rows_of(j) for j in range(workers)),
            defer=lambda rows, head: another_should_take(rows, head, others),
        )
        held[k].extend(taken)
        admitted.extend(r.id for r in taken)
        assert sum(rows_of(j) for j in range(workers)) <= max_rows
        assert not taken or rows_of(k) <= limits[k] or (before == 0 and len(taken) == 1)

    for finish, worker, pick in script:
        k = worker % workers
        if finish and held[k]:
            held[k].pop(pick % len(held[k]))  # a request in flight ends, freeing its rows
        else:
            admit(k)
    for _ in range(len(sizes) + 1):  # the rest: every request in flight ends, each worker looks again
        for k in range(workers):
            held[k].clear()
            admit(k)
    assert admitted == list(range(len(sizes))) and len(scheduler) == 0


def test_the_kv_cache_in_flight_stays_under_its_bound() -> None:
    """With ``max_cache_bytes``, the oldest waiting request is admitted only while the caches in flight
    (every worker's) and its own fit under it, in arrival order (a smaller one behind does not overtake);
    a request whose cache alone is over it is refused at once, naming the bound."""
    scheduler = Scheduler(max_queue=8, max_batch_rows=100, max_cache_bytes=1000)
    sizes = [400, 500, 300, 50]
    for number, size in enumerate(sizes):
        request = _request(number, rows=1)
        request.cache_bytes = size
        scheduler.enqueue(request)
    first = scheduler.admit(0, cache_bytes=0)
    assert [r.cache_bytes for r in first] == [400, 500]  # 300 more would pass 1000; 50 waits behind it
    assert scheduler.admit(2, cache_bytes=900) == []
    later = scheduler.admit(1, cache_bytes=500)  # the 400 left
    assert [r.cache_bytes for r in later] == [300, 50]
    too_big = _request(9, rows=1)
    too_big.cache_bytes = 1001
    with pytest.raises(ValueError, match=r"num_particles: .* 1001 bytes .* max_cache_bytes = 1000"):
        scheduler.enqueue(too_big)
    unbounded = Scheduler(max_queue=8, max_batch_rows=100)
    for number in range(3):
        request = _request(number, rows=1)
        request.cache_bytes = 10**12
        unbounded.enqueue(request)
    assert len(unbounded.admit(0, cache_bytes=10**15)) == 3


def test_cancelled_and_expired_requests_leave_the_queue_in_its_order() -> None:
    """``take_expired`` takes out the waiting requests whose future was cancelled (before or after they
    were queued) or whose deadline has passed, in the queue's order, each once; requests already admitted
    are never taken, cancelled or past their deadline, and the rest keep their order."""
    scheduler = Scheduler(max_queue=16, max_batch_rows=100)
    requests = [_request(number, rows=1) for number in range(8)]
    for number, deadline in ((0, 5.0), (2, 1.0), (4, 3.0), (6, 2.0)):
        requests[number].deadline = deadline
    for request in requests:
        scheduler.enqueue(request)
    assert scheduler.take_expired(0.5) == []
    admitted = scheduler.admit(0, row_limit=1)
    assert admitted == [requests[0]]  # its deadline passes in flight: the engine's to end, not the queue's
    assert requests[5].future.cancel() and requests[3].future.cancel()
    assert requests[3].cancelled and not requests[1].cancelled
    assert scheduler.take_expired(2.0) == [requests[2], requests[3], requests[5], requests[6]]
    assert scheduler.take_expired(2.0) == []
    assert requests[0].future.cancel()  # in flight: flagged for the engine, not taken from the queue
    assert requests[0].cancelled and scheduler.take_expired(10.0) == [requests[4]]
    assert scheduler.admit(0) == [requests[1], requests[7]]


def test_admitted_requests_are_not_held_for_their_deadlines() -> None:
    """Requests admitted long before their deadline are let go (their runs and results can be freed)
    while later requests come and go, not kept until the deadline passes; freed by their reference counts
    (the garbage collector off), so nothing the scheduler adds makes a cycle of a request and its future."""
    scheduler = Scheduler(max_queue=4, max_batch_rows=100)
    refs = []
    gc.disable()
    try:
        for number in range(1000):
            request = _request(number, rows=1)
            request.deadline = 1e9
            refs.append(weakref.ref(request))
            scheduler.enqueue(request)
            del request
            for admitted in scheduler.admit(0):
                admitted.future.set_result(None)  # its callbacks run: the engine has settled it
            del admitted
            scheduler.take_expired(0.0)
        assert sum(ref() is not None for ref in refs) <= 200
    finally:
        gc.enable()


@settings(max_examples=300, deadline=None)
@given(
    script=st.lists(
        st.tuples(st.sampled_from(("enqueue", "admit", "cancel", "expire")), st.integers(0, 60)), max_size=120
    )
)
def test_take_expired_agrees_with_a_scan_of_the_queue(script: list[tuple[str, int]]) -> None:
    """Any mix of requests queued (with or without deadlines), admitted, cancelled (waiting or in flight)
    and time passing: ``take_expired`` returns exactly what a scan of the queue would, the waiting
    requests cancelled or past their deadline in the queue's order, and the queue keeps the rest in
    order (what the scheduler did before it kept callbacks and a heap)."""
    scheduler = Scheduler(max_queue=1000, max_batch_rows=10**6)
    waiting: list[Request] = []  # the reference: the queue, in order
    made: list[Request] = []
    now = 0.0
    for number, (action, value) in enumerate(script):
        if action == "enqueue":
            request = _request(number, rows=1)
            request.deadline = None if value % 3 == 0 else now + value / 10
            scheduler.enqueue(request)
            waiting.append(request)
            made.append(request)
        elif action == "admit":
            admitted = scheduler.admit(0, row_limit=value % 4 + 1)
            assert admitted == waiting[: len(admitted)]
            del waiting[: len(admitted)]
        elif action == "cancel" and made:
            made[value % len(made)].future.cancel()
        else:
            now += value / 20
            expected = [r for r in waiting if r.future.cancelled() or r.expired(now)]
            assert scheduler.take_expired(now) == expected
            waiting = [r for r in waiting if r not in expected]
    assert scheduler.take_all() == waiting


def test_deadlines_of_waiting_requests_survive_dropping_those_admitted() -> None:
    """Once the deadlines of admitted requests outnumber the queue they are dropped all at once; the
    waiting requests' deadlines are kept, and they still expire."""
    scheduler = Scheduler(max_queue=200, max_batch_rows=10**6)
    requests = [_request(number, rows=1) for number in range(100)]
    for number, request in enumerate(requests):
        request.deadline = 10.0 + number
        scheduler.enqueue(request)
    assert len(scheduler.admit(0, row_limit=90)) == 90
    assert scheduler.take_expired(0.0) == []  # drops the 90 admitted ones' entries
    assert scheduler.take_expired(200.0) == requests[90:]


def test_cancelled_waiting_requests_leave_room_in_the_queue() -> None:
    """A waiting request whose future is cancelled counts neither against ``max_queue`` nor in ``len()``
    from then on, though it stays queued until it is taken out: a queue full with cancelled requests
    takes new ones, taking the cancelled out to make room (returned in order, for the engine to count),
    so it never holds more than ``max_queue``; one cancelled then taken out (``take_expired``,
    ``admit``, ``take_all``) is counted out once."""
    scheduler = Scheduler(max_queue=2, max_batch_rows=100)
    requests = [_request(number, rows=1) for number in range(6)]
    scheduler.enqueue(requests[0])
    scheduler.enqueue(requests[1])
    with pytest.raises(Overloaded, match="2 requests are waiting"):
        scheduler.enqueue(requests[2])
    assert requests[1].future.cancel()
    assert len(scheduler) == 1
    assert scheduler.enqueue(requests[2]) == [requests[1]]  # full: the cancelled one made room
    assert len(scheduler) == 2 and scheduler.waiting_and_cancelled() == (2, 0)
    assert requests[0].future.cancel() and requests[2].future.cancel()
    assert len(scheduler) == 0 and scheduler.waiting_and_cancelled() == (0, 2)
    assert scheduler.take_expired(0.0) == [requests[0], requests[2]]
    assert scheduler.waiting_and_cancelled() == (0, 0)
    assert scheduler.enqueue(requests[3]) == [] and scheduler.enqueue(requests[4]) == []
    with pytest.raises(Overloaded):
        scheduler.enqueue(requests[5])
    assert requests[3].future.cancel()
    assert scheduler.waiting_and_cancelled() == (1, 1)
    assert scheduler.admit(0, row_limit=1) == [requests[3]]  # admitted as it is: the engine drops it
    assert scheduler.waiting_and_cancelled() == (1, 0)
    assert requests[4].future.cancel() and scheduler.waiting_and_cancelled() == (0, 1)
    assert scheduler.enqueue(requests[5]) == []  # room without taking the cancelled one out
    assert scheduler.waiting_and_cancelled() == (1, 1)
    assert scheduler.take_all() == [requests[4], requests[5]] and scheduler.waiting_and_cancelled() == (0, 0)


@settings(max_examples=300, deadline=None)
@given(
    max_queue=st.integers(1, 5),
    script=st.lists(
        st.tuples(st.sampled_from(("enqueue", "admit", "cancel", "expire", "all")), st.integers(0, 60)),
        max_size=120,
    ),
)
def test_the_queue_counts_only_requests_not_cancelled(max_queue: int, script: list[tuple[str, int]]) -> None:
    """Any mix of requests queued, admitted, cancelled (waiting or in flight), past their deadline and
    taken out: ``len()`` is the waiting requests not cancelled, ``waiting_and_cancelled()`` those and the
    cancelled still queued; ``enqueue`` refuses exactly when ``max_queue`` requests not cancelled wait,
    and the queue never holds more than ``max_queue``; every request leaves the queue once, in order."""
    scheduler = Scheduler(max_queue=max_queue, max_batch_rows=10**6)
    waiting: list[Request] = []  # the reference: the queue, in order
    made: list[Request] = []
    left: list[Request] = []
    now = 0.0
    for number, (action, value) in enumerate(script):
        live = [r for r in waiting if not r.future.cancelled()]
        if action == "enqueue":
            request = _request(number, rows=1)
            request.deadline = None if value % 3 == 0 else now + value / 10
            if len(live) >= max_queue:
                with pytest.raises(Overloaded):
                    scheduler.enqueue(request)
                continue
            made_room = [r for r in waiting if r.future.cancelled()] if len(waiting) >= max_queue else []
            assert scheduler.enqueue(request) == made_room
            waiting = [r for r in waiting if r not in made_room] + [request]
            left.extend(made_room)
            made.append(request)
        elif action == "admit":
            admitted = scheduler.admit(0, row_limit=value % 4 + 1)
            assert admitted == waiting[: len(admitted)]
            del waiting[: len(admitted)]
            left.extend(admitted)
        elif action == "cancel" and made:
            made[value % len(made)].future.cancel()
        elif action == "expire":
            now += value / 20
            expected = [r for r in waiting if r.future.cancelled() or r.expired(now)]
            assert scheduler.take_expired(now) == expected
            waiting = [r for r in waiting if r not in expected]
            left.extend(expected)
        elif action == "all":
            assert scheduler.take_all() == waiting
            left.extend(waiting)
            waiting = []
        cancelled = sum(r.future.cancelled() for r in waiting)
        assert len(waiting) <= max_queue
        assert len(scheduler) == len(waiting) - cancelled
        assert scheduler.waiting_and_cancelled() == (len(waiting) - cancelled, cancelled)
    assert sorted(r.id for r in left + waiting) == [r.id for r in made]


def _cancel_at(request: Request, when: float) -> None:
    """Cancel ``request``'s future as the engine's futures do, noting ``when`` as its ``cancelled_at``."""
    request.future.cancelled_at = when  # type: ignore[attr-defined]
    assert request.future.cancel()


def test_requests_cancelled_past_their_deadline_count_as_timed_out() -> None:
    """A request whose future was cancelled at or past its deadline (``cancelled_at``) is timed out, one
    cancelled before it (or without a deadline, or a future that does not say when) cancelled;
    ``waiting_and_ended()`` counts those still queued by that outcome, and each stops counting as it is
    taken out (``take_expired``, ``enqueue``, ``admit``, ``take_all``)."""
    scheduler = Scheduler(max_queue=4, max_batch_rows=100)
    requests = [_request(number, rows=1) for number in range(7)]
    for request in requests[:4]:
        request.deadline = 5.0
        scheduler.enqueue(request)
    _cancel_at(requests[0], 5.0)  # at its deadline
    _cancel_at(requests[1], 4.0)  # before it
    _cancel_at(requests[2], 9.0)  # past it
    assert [r.cancelled_outcome() for r in requests[:3]] == ["timed_out", "cancelled", "timed_out"]
    assert scheduler.waiting_and_ended() == (1, {"cancelled": 1, "timed_out": 2, "closed": 0})
    assert scheduler.waiting_and_cancelled() == (1, 3)
    assert scheduler.take_expired(1.0) == requests[:3]
    assert scheduler.waiting_and_ended() == (1, {"cancelled": 0, "timed_out": 0, "closed": 0})

    for request in requests[4:]:
        scheduler.enqueue(request)  # deadline None
    _cancel_at(requests[4], 9.0)  # no deadline: cancelled
    assert requests[5].future.cancel()  # a future that does not note when: cancelled
    requests[6].deadline = 1.0
    _cancel_at(requests[6], 2.0)
    assert scheduler.waiting_and_ended() == (1, {"cancelled": 2, "timed_out": 1, "closed": 0})
    assert scheduler.admit(0, row_limit=2) == requests[3:5]
    assert scheduler.waiting_and_ended() == (0, {"cancelled": 1, "timed_out": 1, "closed": 0})
    refill = [_request(number, rows=1) for number in range(7, 10)]
    refill[0].deadline = 1.0
    assert [scheduler.enqueue(request) for request in refill[:2]] == [[], []]
    assert scheduler.enqueue(refill[2]) == requests[5:7]  # full: the cancelled make room
    assert scheduler.waiting_and_ended() == (3, {"cancelled": 0, "timed_out": 0, "closed": 0})
    _cancel_at(refill[0], 1.5)
    assert scheduler.waiting_and_ended() == (2, {"cancelled": 0, "timed_out": 1, "closed": 0})
    assert scheduler.take_all() == refill
    assert scheduler.waiting_and_ended() == (0, {"cancelled": 0, "timed_out": 0, "closed": 0})


@pytest.mark.parametrize("taking", ["take_all", "take_expired", "admit"])
def test_len_read_while_requests_are_taken_out_is_never_short(taking: str) -> None:
    """``len()`` read from another thread while a worker takes requests out of the queue (the engine's
    worker reads it so, without the engine's lock, while another worker may take some out) is the queue
    before or after, never in between: a request left the queue before its cancellation stopped counting,
    so a read in between counted too few, and below 0 ``len()`` raised ``ValueError`` (in a worker: the
    engine failed)."""
    scheduler = Scheduler(max_queue=8, max_batch_rows=100)
    requests = [_request(number, rows=1) for number in range(4)]
    for request in requests:
        scheduler.enqueue(request)
    for request in requests[:2]:
        assert request.future.cancel()
    expected = {"take_all": 0, "take_expired": 2, "admit": 1}[taking]
    inside, go_on = threading.Event(), threading.Event()
    left = scheduler._left

    def slow_left(request: Request) -> None:  # the worker paused as a request leaves
        inside.set()
        assert go_on.wait(10)
        left(request)

    scheduler._left = slow_left  # type: ignore[method-assign]
    take = {
        "take_all": scheduler.take_all,
        "take_expired": lambda: scheduler.take_expired(0.0),
        "admit": lambda: scheduler.admit(0, row_limit=3),
    }[taking]
    taker = threading.Thread(target=take)
    taker.start()
    seen: list[object] = []

    def read() -> None:
        try:
            seen.append(len(scheduler))
        except ValueError as error:
            seen.append(error)

    reader = threading.Thread(target=read)
    try:
        assert inside.wait(10)
        reader.start()
        reader.join(0.2)  # it waits for the take to end
    finally:
        go_on.set()
        taker.join(10)
    reader.join(10)
    assert seen == [expected]
    assert len(scheduler) == expected
