"""The serving engine: requests batched step by step give what the offline samplers give, fail alone, and
never hang (tiltsmc.Engine; tiltsmc.serving)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import tiltsmc
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx_helpers import policy_with_logits_added_after
from poisoned_policy import Poison, RefusesPoison
from stuck_policy import SCRIPT_HEAD
from test_samplers import _assert_replicates_match, _replicate_estimates, assert_unbiased, tilted
from tiltsmc.models import OnnxCausalLM, OnnxRewardModel, Particles
from tiltsmc.serving import EngineClosed, Overloaded, sampler_defaults
from tiltsmc.tasks import MarkovDFATask, arithmetic

FIXTURES = Path(__file__).parent / "fixtures" / "models"
OFFLINE: dict[str, Callable[..., Any]] = {
    "smc": tiltsmc.smc,
    "sp_gsmc": tiltsmc.sp_gsmc,
    "mh": tiltsmc.mh,
    "best_of_n": tiltsmc.best_of_n,
    "rejection": tiltsmc.rejection,
}

# (sampler, options) covering every sampler and every kind of step
MARKOV_REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("smc", {"num_particles": 16, "resample": "systematic", "ess_threshold": 0.5}),
    ("smc", {"num_particles": 8, "resample": "multinomial", "ess_threshold": 1.0}),
    ("smc", {"num_particles": 12, "resample": "residual", "ess_threshold": 0.7}),
    ("smc", {"num_particles": 5, "resample": "stratified", "ess_threshold": 0.0}),
    ("smc", {"num_particles": 8, "proposal": "optimal"}),
    ("smc", {"num_particles": 6, "record_ancestry": True}),
    ("sp_gsmc", {"pool_size": 4}),
    ("sp_gsmc", {"pool_size": None}),
    ("mh", {"pool_size": 4, "steps": 3}),
    ("mh", {"pool_size": None, "steps": 2}),
    ("mh", {"num_particles": 6, "pool_size": None, "steps": 2}),
    ("best_of_n", {"n": 6}),
    ("rejection", {"bound": 1.0, "num_samples": 2, "batch_size": 8}),
]


def same_result(a: tiltsmc.SamplerResult, b: tiltsmc.SamplerResult) -> bool:
    """Equal in everything but the time and counts of compute."""
    left, right = a.to_dict(), b.to_dict()
    left.pop("compute")
    right.pop("compute")
    return bool(left == right)


@pytest.fixture(scope="module")
def task() -> MarkovDFATask:
    return MarkovDFATask.random(4, 3, 6, rng=0)


@pytest.fixture(scope="module")
def models(task: MarkovDFATask) -> tuple[Any, Any]:
    return task.policy(), task.twist(noise=0.4, rng=1)


# ----------------------------------------------------------------------------------------------------------
# the same results as the offline samplers


@pytest.mark.parametrize(("sampler", "options"), MARKOV_REQUESTS)
def test_lone_request_is_the_offline_result(
    models: tuple[Any, Any], sampler: str, options: dict[str, Any]
) -> None:
    policy, twist = models
    with tiltsmc.Engine(policy, twist) as engine:
        served = engine.submit((), sampler, rng=5, **options).result(timeout=30)
    offline = OFFLINE[sampler](policy, twist, prompts=[()], rng=5, **options)
    assert same_result(served, offline)


@pytest.mark.parametrize("workers", [1, 3])
def test_batched_requests_each_give_their_seeds_result(models: tuple[Any, Any], workers: int) -> None:
    """Many requests of every sampler in flight together, submitted from several threads: each gets
    exactly the offline result of its own seed (its draws never depend on the others), in one batch or
    spread over three workers' batches (every worker stepped; the engine's figures add theirs up). Every
    waiting request that fits joins (``adaptive_rows=False``): a fresh engine's learned limit lets the
    batch grow only as it measures (its own tests), which on requests this short left some runs' batches
    at 15 rows a call."""
    policy, twist = models
    jobs = [(seed, *MARKOV_REQUESTS[seed % len(MARKOV_REQUESTS)]) for seed in range(78)]
    with tiltsmc.Engine(policy, twist, max_batch_rows=96, workers=workers, adaptive_rows=False) as engine:
        assert engine.workers == workers

        def submit_some(part: list[tuple[int, str, dict[str, Any]]]) -> list[Any]:
            return [engine.submit((), sampler, rng=seed, **options) for seed, sampler, options in part]

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [f for chunk in pool.map(submit_some, [jobs[k::4] for k in range(4)]) for f in chunk]
        results = [f.result(timeout=60) for f in futures]
        stats = engine.stats()
    order = [job for k in range(4) for job in jobs[k::4]]
    for (seed, sampler, options), served in zip(order, results):
        offline = OFFLINE[sampler](policy, twist, prompts=[()], rng=seed, **options)
        assert same_result(served, offline), (seed, sampler, options)
    assert stats["requests"]["completed"] == len(jobs) and stats["rows_in_flight"] == 0
    if workers == 1:  # more rows a call than the largest request has: requests shared the model calls
        assert stats["rows_per_policy_call"] > 16
    each = stats["workers"]
    assert len(each) == workers and all(w["steps"] > 0 for w in each), each
    assert stats["steps"] == sum(w["steps"] for w in each)
    assert stats["step_seconds"] == pytest.approx(sum(w["step_seconds"] for w in each))


@pytest.mark.parametrize("workers", [1, 3])
def test_concurrent_requests_are_exact_in_distribution(workers: int) -> None:
    """32 concurrent SMC requests (joining while others run, different particle counts; in one batch or
    spread over three workers' batches) as replicates: their weighted marginals match the enumerated
    target and their Zh are unbiased for Z. The requests take smc's defaults (systematic resampling below
    ESS = N / 2); the twist is noisy enough (1.5) that every run resamples at step 3 (ESS / N ~ 0.45) and
    at no other step (ESS / N >= 0.8), so the default scheme is checked against the target (with noise 0.5
    ESS / N stayed above 0.6 and nothing was ever resampled)."""
    task = tilted(MarkovDFATask.random(3, 4, 5, rng=3))
    policy, twist = task.policy(), task.twist(1.5, rng=10)
    counts = [2000, 3000] * 16
    with tiltsmc.Engine(policy, twist, workers=workers) as engine:
        futures = [engine.submit((), "smc", num_particles=n, rng=100 + k) for k, n in enumerate(counts)]
        results = [f.result(timeout=120) for f in futures]
    resampled = np.concatenate([r.resampled[:, :-1] for r in results])  # (32, T - 1)
    assert resampled.any(axis=1).all() and not resampled.all(axis=1).any(), resampled.mean(axis=0)
    estimates = np.concatenate(
        [_replicate_estimates(r, lambda s: np.eye(task.vocab_size)[s]) for r in results]
    )  # (32, T, V)
    _assert_replicates_match(estimates, task.exact_marginals(), min(counts), "engine marginals")
    assert_unbiased(np.concatenate([r.log_z for r in results]), task.exact_log_z(), "engine log_z")


@pytest.fixture(scope="module")
def onnx_models() -> tuple[OnnxCausalLM, OnnxRewardModel]:
    return (
        OnnxCausalLM(FIXTURES / "gpt2-tiny", max_new_tokens=6),
        OnnxRewardModel(FIXTURES / "prm-tiny", kind="logit"),
    )


ONNX_PROMPTS = ["hello there", "a", "the quick brown fox jumps", "ok"]


@pytest.mark.parametrize(
    ("sampler", "options"),
    [
        ("smc", {"num_particles": 8, "ess_threshold": 0.7}),
        ("sp_gsmc", {"pool_size": 4}),
        ("mh", {"pool_size": 3, "steps": 2}),
        ("best_of_n", {"n": 4}),
    ],
)
def test_onnx_lone_request_is_the_offline_result(
    onnx_models: tuple[OnnxCausalLM, OnnxRewardModel], sampler: str, options: dict[str, Any]
) -> None:
    policy, reward = onnx_models
    with tiltsmc.Engine(policy, reward) as engine:
        for prompt in ONNX_PROMPTS[:2]:
            served = engine.submit(prompt, sampler, rng=11, **options).result(timeout=30)
            offline = OFFLINE[sampler](policy, reward, prompts=[prompt], rng=11, **options)
            assert same_result(served, offline)
            assert served.texts is not None


def test_texts_are_decoded_by_the_thread_that_reads_the_result(
    onnx_models: tuple[OnnxCausalLM, OnnxRewardModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker leaves a request's texts to the first read of its future (on the reader's thread, an
    event loop's for ``generate``), so that decoding does not hold up the step of the requests in
    flight; the texts read are the offline function's."""
    policy, reward = onnx_models
    decoded_on: list[str] = []
    decode = policy.decode

    def recording_decode(ids: Any) -> str:
        decoded_on.append(threading.current_thread().name)
        return decode(ids)

    monkeypatch.setattr(policy, "decode", recording_decode)
    with tiltsmc.Engine(policy, reward) as engine:
        future = engine.submit(ONNX_PROMPTS[0], "smc", num_particles=4, rng=3)
        while not future.done():
            time.sleep(0.001)
        assert decoded_on == []  # done, not read yet
        served = future.result()
        assert future.result() is served and len(decoded_on) == 4  # once, on this thread
        assert set(decoded_on) == {threading.current_thread().name}
        decoded_on.clear()

        async def read() -> tiltsmc.SamplerResult:
            return await engine.generate(ONNX_PROMPTS[0], "smc", num_particles=4, rng=3)

        awaited = asyncio.run(read())
        assert len(decoded_on) == 4 and "tiltsmc-engine" not in decoded_on
    monkeypatch.undo()
    offline = tiltsmc.smc(policy, reward, prompts=[ONNX_PROMPTS[0]], num_particles=4, rng=3)
    assert served.texts == awaited.texts == offline.texts and offline.texts is not None


@pytest.mark.parametrize("padded", ["left", "right"])
def test_onnx_requests_joining_a_running_batch(
    onnx_models: tuple[OnnxCausalLM, OnnxRewardModel], padded: str
) -> None:
    """Ragged prompts join a batch whose KV cache is longer (padding) and leave it (trimming): each
    request's samples are those it draws alone, its log Z the same up to the rounding of batched calls.
    Left: an optimum export; right: attention that reads each row's length from the mask (gqa-tiny),
    its cache written in place by the session (joins into spare rows: tests/test_right_padding.py)."""
    policy, reward = onnx_models
    if padded == "right":
        policy = OnnxCausalLM(FIXTURES / "gqa-tiny", max_new_tokens=6)
        assert policy.padding_side == "right" and policy.cache_in_place
    jobs = [
        (prompt, n, seed) for seed, (prompt, n) in enumerate(zip(ONNX_PROMPTS * 3, [8, 4, 16, 2, 6, 3] * 2))
    ]
    with tiltsmc.Engine(policy, reward) as engine:
        futures = []
        for prompt, n, seed in jobs:
            futures.append(engine.submit(prompt, "smc", num_particles=n, rng=seed))
            time.sleep(0.002)  # some join mid-run, some together
        served = [f.result(timeout=60) for f in futures]
        assert engine.stats()["rows_in_flight"] == 0
    for (prompt, n, seed), result in zip(jobs, served):
        offline = tiltsmc.smc(policy, reward, prompts=[prompt], num_particles=n, rng=seed)
        assert result.texts == offline.texts, (prompt, n, seed)
        np.testing.assert_allclose(result.log_z, offline.log_z, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(result.log_weights[0], offline.log_weights[0], rtol=1e-4, atol=1e-5)


def test_demo_models_serve(tmp_path: Path) -> None:
    policy, reward = arithmetic.load_models()
    problems = arithmetic.make_problems(3, 4, rng=2)
    with tiltsmc.Engine(policy, reward) as engine:
        futures = [engine.submit(p.prompt, "smc", num_particles=4, rng=k) for k, p in enumerate(problems)]
        results = [f.result(timeout=60) for f in futures]
    for k, (problem, result) in enumerate(zip(problems, results)):
        offline = tiltsmc.smc(policy, reward, prompts=[problem.prompt], num_particles=4, rng=k)
        assert result.texts == offline.texts


# ----------------------------------------------------------------------------------------------------------
# admission, timeouts, cancellation, closing


class Gated:
    """A real policy whose ``propose`` waits for ``gate`` (to hold the worker inside a step)."""

    token_level = True
    supports_engine = True

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.vocab_size = inner.vocab_size
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def start(self, prompts: Any, num_particles: int) -> Particles:
        particles: Particles = self.inner.start(prompts, num_particles)
        return particles

    def propose(self, particles: Particles, rng: Any) -> Any:
        self.entered.set()
        assert self.gate.wait(20), "the test never opened the gate"
        return self.inner.propose(particles, rng)


def _close_as_the_gate_opens(engine: tiltsmc.Engine, gated: Gated, **options: Any) -> bool:
    """``engine.close(**options)`` while ``gated``'s gate opens 0.2 s later, letting the worker held in a
    step finish it; what ``close`` returns."""
    opener = threading.Timer(0.2, gated.gate.set)
    opener.start()
    try:
        return engine.close(**options)
    finally:
        opener.join()


def test_overload_and_row_budget(models: tuple[Any, Any]) -> None:
    policy, twist = models
    gated = Gated(policy)
    gated.gate.clear()
    with tiltsmc.Engine(gated, twist, max_batch_rows=16, max_queue=2) as engine:
        first = engine.submit((), "smc", num_particles=16, rng=0)
        assert gated.entered.wait(10)  # in flight, holding all 16 rows
        waiting = [engine.submit((), "smc", num_particles=8, rng=k) for k in (1, 2)]
        assert engine.stats()["waiting"] == 2
        with pytest.raises(Overloaded, match="max_queue = 2"):
            engine.submit((), "smc", num_particles=8, rng=3)
        with pytest.raises(ValueError, match="max_batch_rows = 16"):
            engine.submit((), "smc", num_particles=17)
        gated.gate.set()
        results = [f.result(timeout=30) for f in [first, *waiting]]
        stats = engine.stats()
    assert all(r.samples[0].shape == (n, 6) for r, n in zip(results, (16, 8, 8)))
    assert stats["requests"]["rejected"] == 1
    assert stats["requests"]["completed"] == 3


class RowsSeen(Gated):
    """A gated policy that records the rows of every ``propose``."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.rows: list[int] = []

    def propose(self, particles: Particles, rng: Any) -> Any:
        self.rows.append(int(particles.lengths.size))
        return super().propose(particles, rng)


def _wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_the_engine_admits_up_to_the_row_limit_it_learned(models: tuple[Any, Any]) -> None:
    """One 4-particle request at a time: once eight steps of 4 rows are measured the batch may grow to
    the next bucket only (16 rows). A burst of 32 rows then runs 16 at a time until steps of 16 rows
    are measured in turn; with ``adaptive_rows=False`` every row fits at once (``max_batch_rows``)."""
    policy, twist = models
    for adaptive, limit in ((True, 16), (False, 96)):
        seen = RowsSeen(policy)
        with tiltsmc.Engine(seen, twist, max_batch_rows=96, adaptive_rows=adaptive) as engine:
            assert engine.stats()["row_limit"] == (0 if adaptive else 96)  # nothing measured yet
            seed = 0
            while len(seen.rows) < 8:  # alone, so every step has 4 rows
                engine.submit((), "smc", num_particles=4, rng=seed).result(timeout=30)
                seed += 1
            assert _wait_for(lambda: engine.stats()["row_limit"] == limit)  # noqa: B023
            learned = engine.stats()["seconds_per_row"]
            assert (set(learned), all(v > 0 for v in learned.values())) == (
                ({4}, True) if adaptive else (set(), True)
            )
            seen.gate.clear()
            seen.entered.clear()
            first = engine.submit((), "smc", num_particles=4, rng=100)
            assert seen.entered.wait(10)  # the worker holds one request's step
            burst = [engine.submit((), "smc", num_particles=4, rng=101 + k) for k in range(8)]
            before = len(seen.rows)
            seen.gate.set()
            for future in [first, *burst]:
                future.result(timeout=30)
        after_burst = seen.rows[before : before + 8]
        assert max(after_burst) == (16 if adaptive else 36), (adaptive, after_burst)
    with pytest.raises(TypeError, match="adaptive_rows"):
        tiltsmc.Engine(policy, twist, adaptive_rows="yes")  # type: ignore[arg-type]


def test_a_fresh_engine_grows_its_batch_as_it_measures(models: tuple[Any, Any]) -> None:
    """A burst on a fresh engine: with nothing measured it lets in twice the oldest request's rows (8),
    and more only once eight steps of that size are measured (then up to 32); with
    ``adaptive_rows=False`` the whole burst at once. Every result is the request's alone."""
    policy, twist = models
    alone = [tiltsmc.smc(policy, twist, [()], num_particles=4, rng=k) for k in range(10)]
    for adaptive in (True, False):
        seen = RowsSeen(policy)
        seen.gate.clear()
        with tiltsmc.Engine(seen, twist, max_batch_rows=96, adaptive_rows=adaptive) as engine:
            first = engine.submit((), "smc", num_particles=4, rng=0)
            assert seen.entered.wait(10)  # the worker holds the first request's first step
            burst = [engine.submit((), "smc", num_particles=4, rng=k) for k in range(1, 10)]
            before = len(seen.rows)
            seen.gate.set()
            results = [future.result(timeout=30) for future in [first, *burst]]
        after = seen.rows[before:]
        if adaptive:
            assert after[:8] == [8] * 8 and max(after) == 32, after
        else:
            assert after[0] == 40, after
        for result, expected in zip(results, alone):
            np.testing.assert_array_equal(result.samples[0], expected.samples[0])
            np.testing.assert_array_equal(result.log_z, expected.log_z)


@pytest.mark.parametrize("workers", [1, 2])
def test_timeout_and_cancellation_free_rows(models: tuple[Any, Any], workers: int) -> None:
    policy, twist = models
    gated = Gated(policy)
    gated.gate.clear()
    with tiltsmc.Engine(gated, twist, workers=workers) as engine:
        slow = engine.submit((), "smc", num_particles=32, rng=0, timeout=0.05)
        cancelled = engine.submit((), "smc", num_particles=32, rng=1)
        kept = engine.submit((), "smc", num_particles=32, rng=2)
        assert gated.entered.wait(10)
        time.sleep(0.1)
        assert cancelled.cancel()
        gated.gate.set()
        with pytest.raises(TimeoutError, match="timeout"):
            slow.result(timeout=30)
        result = kept.result(timeout=30)
        for _ in range(200):  # the worker counts the cancellation at its next step boundary
            stats = engine.stats()
            if stats["requests"]["cancelled"]:
                break
            time.sleep(0.01)
    assert same_result(result, tiltsmc.smc(policy, twist, prompts=[()], num_particles=32, rng=2))
    assert stats["requests"]["cancelled"] == 1
    assert stats["requests"]["timed_out"] == 1
    assert stats["rows_in_flight"] == 0


def test_cancelled_requests_are_done_for_wait_and_as_completed(models: tuple[Any, Any]) -> None:
    """``concurrent.futures.wait`` and ``as_completed`` return cancelled requests (waiting or in flight) at
    once, as executors' cancelled futures: they waited for ever where nothing told their waiters; a second
    cancel of the same future, from another thread too, changes nothing."""
    policy, twist = models
    gated = Gated(policy)
    gated.gate.clear()
    with tiltsmc.Engine(gated, twist, max_batch_rows=32) as engine:
        in_flight = engine.submit((), "smc", num_particles=32, rng=0)
        waiting = [engine.submit((), "smc", num_particles=32, rng=k) for k in (1, 2)]
        kept = engine.submit((), "smc", num_particles=4, rng=3)
        assert gated.entered.wait(10)
        threads = [threading.Thread(target=future.cancel) for future in (in_flight, *waiting, in_flight)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        done, pending = concurrent.futures.wait([in_flight, *waiting], timeout=5)
        assert not pending and all(future.cancelled() for future in done)
        assert set(concurrent.futures.as_completed([in_flight, *waiting], timeout=5)) == done
        assert in_flight.cancel() and not in_flight.running()
        gated.gate.set()
        assert concurrent.futures.wait([kept], timeout=30).done == {kept}
        assert kept.result().samples[0].shape[0] == 4


@pytest.mark.parametrize("workers", [1, 2])
def test_close_drains_or_ends_requests(models: tuple[Any, Any], workers: int) -> None:
    policy, twist = models
    before = set(threading.enumerate())
    engine = tiltsmc.Engine(policy, twist, workers=workers, max_batch_rows=128)
    started = set(threading.enumerate()) - before
    assert len(started) == workers
    futures = [engine.submit((), "smc", num_particles=64, rng=k) for k in range(6)]
    engine.close(drain=True)
    assert all(f.result(timeout=0).samples[0].shape == (64, 6) for f in futures)
    assert not any(thread.is_alive() for thread in started)  # every worker has stopped
    with pytest.raises(EngineClosed):
        engine.submit((), "smc")

    gated = Gated(policy)
    gated.gate.clear()
    engine = tiltsmc.Engine(gated, twist, workers=workers)
    stuck = engine.submit((), "smc", num_particles=8)
    assert gated.entered.wait(10)
    closer = threading.Thread(target=engine.close, kwargs={"drain": True, "timeout": 0.05})
    closer.start()
    time.sleep(0.1)
    gated.gate.set()  # the step in progress ends, then the grace period is over
    closer.join(10)
    assert not closer.is_alive()
    with pytest.raises(EngineClosed, match="closed before the request finished"):
        stuck.result(timeout=10)


def test_generate_with_asyncio(models: tuple[Any, Any]) -> None:
    policy, twist = models
    gated = Gated(policy)

    async def main(engine: tiltsmc.Engine) -> tuple[list[tiltsmc.SamplerResult], bool]:
        results = await asyncio.gather(
            *(engine.generate((), "smc", num_particles=8, rng=k) for k in range(5))
        )
        gated.gate.clear()
        gated.entered.clear()
        task = asyncio.ensure_future(engine.generate((), "smc", num_particles=8, rng=9))
        while not gated.entered.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.sleep(0.05)  # the cancellation reaches the engine's future
        gated.gate.set()
        try:
            await task
        except asyncio.CancelledError:
            return list(results), True
        return list(results), False

    with tiltsmc.Engine(gated, twist) as engine:
        results, cancelled = asyncio.run(main(engine))
        for _ in range(200):
            if engine.stats()["requests"]["cancelled"]:
                break
            time.sleep(0.01)
        assert engine.stats()["requests"]["cancelled"] == 1
    assert cancelled
    for k, result in enumerate(results):
        assert same_result(result, tiltsmc.smc(policy, twist, prompts=[()], num_particles=8, rng=k))


# ----------------------------------------------------------------------------------------------------------
# bad input and faults fail alone


def test_bad_options_are_refused_at_submit(models: tuple[Any, Any]) -> None:
    policy, twist = models
    with tiltsmc.Engine(policy, twist) as engine:
        with pytest.raises(ValueError, match="sampler"):
            engine.submit((), "beam")
        with pytest.raises(TypeError, match="particles: not an option of smc"):
            engine.submit((), "smc", particles=4)
        with pytest.raises(ValueError, match="num_particles"):
            engine.submit((), "smc", num_particles=0)
        with pytest.raises(ValueError, match="ess_threshold"):
            engine.submit((), "smc", ess_threshold=float("nan"))
        with pytest.raises(ValueError, match="resample"):
            engine.submit((), "smc", resample="bogus")
        with pytest.raises(ValueError, match="timeout"):
            engine.submit((), "smc", timeout=-1)
        with pytest.raises(TypeError, match="rng"):
            engine.submit((), "smc", rng=True)
        assert engine.stats()["requests"]["submitted"] == 0
        assert engine.submit((), "smc", num_particles=4, rng=0).result(timeout=10).samples[0].shape == (4, 6)
    with pytest.raises(ValueError, match="release_memory_after"):
        tiltsmc.Engine(policy, twist, release_memory_after=-1.0)
    with pytest.raises(ValueError, match="release_memory_after"):
        tiltsmc.Engine(policy, twist, release_memory_after=float("nan"))
    for wrong in ("5", True):
        with pytest.raises(TypeError, match="release_memory_after"):
            tiltsmc.Engine(policy, twist, release_memory_after=wrong)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="keep_freed_memory"):
        tiltsmc.Engine(policy, twist, keep_freed_memory="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_queue"):
        tiltsmc.Engine(policy, twist, max_queue=0)  # no request could ever wait for its rows


def test_waits_past_what_a_thread_can_wait_mean_no_limit(models: tuple[Any, Any]) -> None:
    """Seconds over ``threading.TIMEOUT_MAX`` (infinity too) mean no limit: an engine that waits that
    long before giving memory back keeps serving after its first idle spell (such a wait raised
    OverflowError inside the worker, which broke the engine), and ``close`` and ``submit`` take them;
    numpy's numbers are seconds too, and a refused ``close`` leaves the engine open."""
    policy, twist = models
    for never in (1e10, float("inf")):
        with tiltsmc.Engine(policy, twist, release_memory_after=never) as engine:
            assert engine.release_memory_after is None
            first = engine.submit((), "smc", num_particles=4, rng=0).result(timeout=10)
            deadline = time.monotonic() + 10
            while engine.stats()["in_flight"] or engine.stats()["waiting"]:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.1)  # the worker now idle, waiting for work or for the time to give memory back
            again = engine.submit((), "smc", num_particles=4, rng=0, timeout=np.float32(1e10))
            assert np.array_equal(again.result(timeout=10).samples[0], first.samples[0])
            assert engine.stats()["failed"] is None
            for wrong, kind in (("x", TypeError), (float("nan"), ValueError), (-1, ValueError)):
                with pytest.raises(kind, match="timeout"):
                    engine.close(timeout=wrong)
            with pytest.raises(TypeError, match="drain"):
                engine.close(drain="yes")  # type: ignore[arg-type]
            assert not engine.stats()["closed"]
            assert engine.close(timeout=np.int64(10), wait=1e10)


def test_refusals_name_the_option_the_request_set(
    models: tuple[Any, Any], onnx_models: tuple[OnnxCausalLM, OnnxRewardModel]
) -> None:
    """Rows over ``max_batch_rows`` are refused naming the sampler's option that asked for them, and a
    ``max_new_tokens`` past the policy's limit at ``submit``, as the offline function refuses it."""
    policy, twist = models
    with tiltsmc.Engine(policy, twist, max_batch_rows=8) as engine:
        for sampler, options, option in (
            ("smc", {"num_particles": 9}, "num_particles"),
            ("sp_gsmc", {"pool_size": 9}, "pool_size"),
            ("mh", {"pool_size": 9}, "pool_size"),
            ("mh", {"num_particles": 9}, "num_particles"),
            ("best_of_n", {"n": 9}, "n"),
            ("rejection", {}, "batch_size"),  # its default, 256 draws a round
        ):
            with pytest.raises(ValueError, match=rf"^{option}: the request needs \d+ particle rows"):
                engine.submit((), sampler, rng=0, **options)
    onnx_policy, onnx_reward = onnx_models
    with pytest.raises(ValueError, match="max_new_tokens: 7 is more than the policy's limit of 6"):
        tiltsmc.smc(onnx_policy, onnx_reward, prompts=["hi"], num_particles=2, max_new_tokens=7)
    with tiltsmc.Engine(onnx_policy, onnx_reward) as engine:
        with pytest.raises(ValueError, match="max_new_tokens: 7 is more than the policy's limit of 6"):
            engine.submit("hi", "smc", num_particles=2, max_new_tokens=7)
        assert engine.stats()["requests"]["submitted"] == 0


def test_options_and_defaults_are_the_offline_functions() -> None:
    defaults = sampler_defaults("smc")
    assert defaults["num_particles"] == 64 and defaults["resample"] == "systematic"
    assert sampler_defaults("mh")["steps"] == 8


def test_models_without_engine_support_are_refused(models: tuple[Any, Any]) -> None:
    policy, twist = models

    class Plain:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def start(self, prompts: Any, num_particles: int) -> Any:
            return self.inner.start(prompts, num_particles)

        def propose(self, particles: Any, rng: Any) -> Any:
            return self.inner.propose(particles, rng)

    with pytest.raises(TypeError, match=r"policy: Plain cannot be batched by the engine.*supports_engine"):
        tiltsmc.Engine(Plain(policy), twist)
    assert tiltsmc.smc(Plain(policy), twist, num_particles=4, rng=0).samples[0].shape == (4, 6)


class PoisonedReward:
    """A real twist whose values are NaN on the particles of prompts that are ``Poison``."""

    supports_engine = True

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def initial_log_value(self, particles: Particles) -> Any:
        return self.inner.initial_log_value(particles)

    def log_value(self, particles: Particles) -> Any:
        values = np.array(self.inner.log_value(particles))
        poisoned = np.array([isinstance(p, Poison) for p in particles.prompts])
        values[poisoned] = np.nan
        return values


def test_nan_from_the_reward_model_fails_only_its_request(models: tuple[Any, Any]) -> None:
    policy, twist = models
    gated = Gated(policy)
    gated.gate.clear()
    with tiltsmc.Engine(gated, PoisonedReward(twist)) as engine:
        futures = [engine.submit((), "smc", num_particles=8, rng=k) for k in range(3)]
        futures.insert(1, engine.submit(Poison(), "smc", num_particles=8, rng=7))
        assert gated.entered.wait(10)
        time.sleep(0.05)  # the other three join the first one's batch at its next step
        gated.gate.set()
        with pytest.raises(ValueError, match="NaN"):
            futures[1].result(timeout=30)
        results = [f.result(timeout=30) for k, f in enumerate(futures) if k != 1]
        follow_up = engine.submit((), "smc", num_particles=8, rng=5).result(timeout=30)
    for k, result in enumerate(results):
        assert same_result(result, tiltsmc.smc(policy, twist, prompts=[()], num_particles=8, rng=k))
    assert same_result(follow_up, tiltsmc.smc(policy, twist, prompts=[()], num_particles=8, rng=5))


def test_bad_prompt_fails_only_its_request(onnx_models: tuple[OnnxCausalLM, OnnxRewardModel]) -> None:
    policy, reward = onnx_models
    too_long = "word " * 200  # past the fixture's context with max_new_tokens
    with tiltsmc.Engine(policy, reward) as engine:
        futures = [engine.submit(p, "smc", num_particles=4, rng=1) for p in ("hello", too_long, "ok")]
        with pytest.raises(ValueError, match="exceed the model's context"):
            futures[1].result(timeout=30)
        good = [futures[0].result(timeout=30), futures[2].result(timeout=30)]
        assert engine.stats()["requests"] == {
            "submitted": 3, "completed": 2, "failed": 1, "cancelled": 0, "timed_out": 0, "closed": 0,
            "rejected": 0,
        }  # fmt: skip
    assert [r.texts is not None and len(r.texts[0]) == 4 for r in good] == [True, True]


class Exploding:
    """A real policy whose ``propose`` raises once, for the whole batch."""

    token_level = True
    supports_engine = True

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.armed = threading.Event()

    def start(self, prompts: Any, num_particles: int) -> Particles:
        particles: Particles = self.inner.start(prompts, num_particles)
        return particles

    def propose(self, particles: Particles, rng: Any) -> Any:
        if self.armed.is_set():
            self.armed.clear()
            raise RuntimeError("session failed")
        return self.inner.propose(particles, rng)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_model_call_ends_its_batch_and_the_engine_goes_on(
    models: tuple[Any, Any], workers: int
) -> None:
    policy, twist = models
    exploding = Exploding(policy)
    exploding.armed.set()
    with tiltsmc.Engine(exploding, twist, workers=workers) as engine:
        with pytest.raises(RuntimeError, match="session failed"):
            engine.submit((), "smc", num_particles=8, rng=0).result(timeout=30)
        after = engine.submit((), "smc", num_particles=8, rng=1).result(timeout=30)
        assert engine.stats()["requests"]["failed"] == 1
        assert engine.stats()["restarts"] == 0  # its call was its own: the error is its own
    assert same_result(after, tiltsmc.smc(policy, twist, prompts=[()], num_particles=8, rng=1))


class Held(tuple):  # type: ignore[type-arg]
    """An empty prompt whose steps wait for ``HeldRefusesPoison.gate``."""


class HeldRefusesPoison(RefusesPoison):
    """``RefusesPoison`` whose ``propose`` waits for ``gate`` on a batch holding a prompt of type ``held``
    (:class:`Held` by default: to hold the worker inside a step while requests queue)."""

    def __init__(self, inner: Any, held: type = Held) -> None:
        super().__init__(inner)
        self.held = held
        self.gate = threading.Event()
        self.entered = threading.Event()

    def propose(self, particles: Particles, rng: Any) -> Any:
        if any(isinstance(prompt, self.held) for prompt in particles.prompts):
            self.entered.set()
            assert self.gate.wait(20), "the test never opened the gate"
        return super().propose(particles, rng)


@pytest.mark.parametrize(("sampler", "options"), MARKOV_REQUESTS)
def test_every_sampler_finds_the_request_its_batch_call_fails_for(
    models: tuple[Any, Any], sampler: str, options: dict[str, Any]
) -> None:
    """Every sampler's requests, batched with one whose prompt the policy refuses (its ``propose`` or, in
    the optimal proposal's and exact SP-gSMC's lanes, ``next_log_probs`` raising for the batch): that
    request fails alone with the policy's error, and the others (and the request holding the worker
    while they queued) get exactly their offline results."""
    policy, twist = models
    held = HeldRefusesPoison(policy)
    with tiltsmc.Engine(held, twist, adaptive_rows=False) as engine:
        holder = engine.submit(Held(), "smc", num_particles=4, rng=99)
        assert held.entered.wait(10)  # the worker inside the holder's first step: the others queue
        futures = {seed: engine.submit((), sampler, rng=seed, **options) for seed in (1, 2, 3)}
        poisoned = engine.submit(Poison(), sampler, rng=4, **options)
        held.gate.set()
        with pytest.raises(RuntimeError, match="cannot take a poisoned prompt"):
            poisoned.result(timeout=60)
        results = {seed: future.result(timeout=60) for seed, future in futures.items()}
        assert same_result(
            holder.result(timeout=60), tiltsmc.smc(policy, twist, prompts=[()], num_particles=4, rng=99)
        )
        stats = engine.stats()
    assert stats["restarts"] >= 2  # at least the poisoned request's last half
    assert stats["requests"]["failed"] == 1 and stats["requests"]["completed"] == 4
    for seed, result in results.items():
        assert same_result(result, OFFLINE[sampler](policy, twist, prompts=[()], rng=seed, **options))


class FailsOverRows(RefusesPoison):
    """A real policy whose ``propose`` raises for a batch of more than ``limit`` rows (memory that a
    smaller call finds)."""

    def __init__(self, inner: Any, limit: int) -> None:
        super().__init__(inner)
        self.limit = limit

    def propose(self, particles: Particles, rng: Any) -> Any:
        if particles.lengths.size > self.limit:
            raise RuntimeError(f"out of memory for {particles.lengths.size} rows")
        return self.inner.propose(particles, rng)


def test_a_request_that_fails_its_batch_call_fails_alone(models: tuple[Any, Any]) -> None:
    """A policy call that raises for a batch of several requests (one of them the cause) does not end them
    all with its error: they run again from their start in halves, and a half that fails again in halves
    of it, so the one that causes it fails alone with the policy's error and the others get exactly
    their offline results (their generators as at submit)."""
    policy, twist = models
    gated = Gated(RefusesPoison(policy))
    gated.gate.clear()
    with tiltsmc.Engine(gated, twist, adaptive_rows=False) as engine:
        futures = [engine.submit((), "smc", num_particles=8, rng=0)]
        assert gated.entered.wait(10)  # the first request inside its first step: the others join at the next
        futures += [engine.submit((), "smc", num_particles=8, rng=k) for k in (1, 2)]
        poisoned = engine.submit(Poison(), "smc", num_particles=8, rng=7)
        gated.gate.set()
        with pytest.raises(RuntimeError, match="cannot take a poisoned prompt"):
            poisoned.result(timeout=30)
        results = [future.result(timeout=30) for future in futures]
        follow_up = engine.submit((), "sp_gsmc", rng=5).result(timeout=30)
        stats = engine.stats()
    assert stats["restarts"] == 4 + 2  # the batch, then the half with the poisoned request
    assert stats["requests"]["completed"] == 4 and stats["requests"]["failed"] == 1
    for k, result in enumerate(results):
        assert same_result(result, tiltsmc.smc(policy, twist, prompts=[()], num_particles=8, rng=k))
    assert same_result(follow_up, tiltsmc.sp_gsmc(policy, twist, prompts=[()], rng=5))


def _state_text(generator: np.random.Generator) -> str:
    return json.dumps(generator.bit_generator.state, default=lambda array: array.tolist(), sort_keys=True)


class DefersWork(Gated):
    """``Gated`` whose ``propose`` leaves work deferred to the next flush (as a decoder's session run on
    the tokens it appended), work that raises once ``failing`` is set: with no resampling, the next flush
    is the join of a newcomer (``Lane._join``)."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.failing = False

    def propose(self, particles: Particles, rng: Any) -> Any:
        proposed = super().propose(particles, rng)

        def work() -> None:
            if self.failing:
                raise RuntimeError("the deferred session run failed")

        particles.defer(work)
        return proposed


def test_a_join_that_fails_ends_or_restarts_every_request_it_concerns(models: tuple[Any, Any]) -> None:
    """A failure while newcomers join the batch (the policy's deferred work, run at the join, raising)
    is the batch's: the requests in it and the newcomer run again in halves, and each completes with its
    offline result (the newcomer was lost: its future never ended, its rows stayed counted)."""
    policy, twist = models
    deferring = DefersWork(policy)
    deferring.gate.clear()
    with tiltsmc.Engine(deferring, twist, adaptive_rows=False) as engine:
        first = engine.submit((), "smc", num_particles=4, rng=1, ess_threshold=0.0)
        assert deferring.entered.wait(10)
        deferring.failing = True
        second = engine.submit((), "smc", num_particles=4, rng=2, ess_threshold=0.0)
        deferring.gate.set()
        results = [future.result(timeout=30) for future in (first, second)]
        stats = engine.stats()
    assert stats["restarts"] == 2 and stats["requests"]["completed"] == 2
    assert stats["in_flight"] == 0 and stats["rows_in_flight"] == 0
    for seed, result in zip((1, 2), results):  # alone, no flush: the deferred work never runs
        offline = tiltsmc.smc(policy, twist, prompts=[()], num_particles=4, rng=seed, ess_threshold=0.0)
        assert same_result(result, offline)


@pytest.mark.parametrize(
    "bits", [None, np.random.PCG64, np.random.MT19937, np.random.Philox, np.random.SFC64]
)
def test_a_batch_too_large_for_the_model_is_served_request_by_request(
    models: tuple[Any, Any], bits: Any
) -> None:
    """A policy call that fails for the batch's size: its requests run again in halves until a half fits
    (3 requests of 8 rows, at most 8 rows a call: 2 + 1, then 1 + 1) and each completes. Seeded by an int,
    each gives its offline result (a restart draws from the seed's generator as it was at submit). Given
    a caller's generator of each of numpy's bit generators, a restart goes on drawing from it where the
    run that failed left it, as a call made again would: the caller's generator ends past where the
    first run left it, never set back."""
    policy, twist = models
    gated = Gated(FailsOverRows(policy, limit=8))
    gated.gate.clear()

    def seed(k: int) -> Any:
        return 3 + k if bits is None else np.random.Generator(bits(3 + k))

    generators = [seed(k) for k in range(3)]
    with tiltsmc.Engine(gated, twist, adaptive_rows=False) as engine:
        futures = [engine.submit((), "smc", num_particles=8, rng=generators[0])]
        assert gated.entered.wait(10)
        futures += [engine.submit((), "smc", num_particles=8, rng=g) for g in generators[1:]]
        gated.gate.set()
        results = [future.result(timeout=30) for future in futures]
        assert engine.stats()["restarts"] == 3 + 2
        assert engine.stats()["requests"]["completed"] == 3
    alone = [tiltsmc.smc(policy, twist, prompts=[()], num_particles=8, rng=seed(k)) for k in range(3)]
    if bits is None:
        assert all(same_result(result, offline) for result, offline in zip(results, alone))
    else:  # the first request drew in its first step, alone: its restart drew on from there
        assert not same_result(results[0], alone[0])
        whole = seed(0)  # its draws: past a whole run's
        tiltsmc.smc(policy, twist, prompts=[()], num_particles=8, rng=whole)
        assert _state_text(generators[0]) not in (_state_text(seed(0)), _state_text(whole))


@pytest.mark.parametrize("kind", ["Generator", "BitGenerator"])
def test_requests_handed_one_generator_draw_apart_after_a_restart(models: tuple[Any, Any], kind: str) -> None:
    """Requests handed one caller's generator (or bit generator) draw from it as one stream, also when a
    poisoned request in their batch makes them run again: their samples differ, as without the restart
    (a restart drawing from a copy of the generator as it was at submit gave every one the same
    samples: none of them had drawn yet at submit)."""
    policy, twist = models

    def samples(poisoned: bool) -> tuple[list[str], int]:
        held = HeldRefusesPoison(policy)
        shared: Any = np.random.default_rng(5) if kind == "Generator" else np.random.PCG64(5)
        with tiltsmc.Engine(held, twist, adaptive_rows=False) as engine:
            futures = [engine.submit(Held(), "smc", num_particles=4, rng=shared)]
            assert held.entered.wait(10)
            futures += [engine.submit((), "smc", num_particles=4, rng=shared) for _ in range(3)]
            if poisoned:
                futures.append(engine.submit(Poison(), "smc", num_particles=4, rng=shared))
            held.gate.set()
            drawn = [json.dumps(f.result(timeout=30).to_dict()["samples"]) for f in futures[:4]]
            return drawn, engine.stats()["restarts"]

    drawn, restarts = samples(poisoned=False)
    assert restarts == 0 and len(set(drawn)) == 4
    drawn, restarts = samples(poisoned=True)
    assert restarts > 0 and len(set(drawn)) == 4, (restarts, drawn)


class HoldsAlone(FailsOverRows):
    """``FailsOverRows`` whose ``propose`` waits for ``gate`` once the batch has failed (its requests then
    run alone)."""

    def __init__(self, inner: Any, limit: int) -> None:
        super().__init__(inner, limit)
        self.failed = False
        self.gate = threading.Event()
        self.entered = threading.Event()

    def propose(self, particles: Particles, rng: Any) -> Any:
        if particles.lengths.size > self.limit:
            self.failed = True
        elif self.failed:
            self.entered.set()
            assert self.gate.wait(20), "the test never opened the gate"
        return super().propose(particles, rng)


def test_a_request_running_again_alone_can_be_cancelled(models: tuple[Any, Any]) -> None:
    """A request cancelled while it runs again (alone: a batch of two halved) leaves at the next step, its
    rows freed; the other completes."""
    policy, twist = models
    holds = HoldsAlone(policy, limit=8)
    gated = Gated(holds)
    gated.gate.clear()
    with tiltsmc.Engine(gated, twist, adaptive_rows=False) as engine:
        first = engine.submit((), "smc", num_particles=8, rng=0)
        assert gated.entered.wait(10)
        second = engine.submit((), "smc", num_particles=8, rng=1)
        gated.gate.set()
        assert holds.entered.wait(10)  # the first runs alone, the second waits in its own lane
        assert engine.stats()["restarts"] == 2
        assert second.cancel()
        holds.gate.set()
        result = first.result(timeout=30)
        deadline = time.monotonic() + 10
        while engine.stats()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = engine.stats()
    assert same_result(result, tiltsmc.smc(policy, twist, prompts=[()], num_particles=8, rng=0))
    assert (stats["in_flight"], stats["rows_in_flight"]) == (0, 0)
    assert stats["requests"]["cancelled"] == 1 and stats["requests"]["completed"] == 1


def test_requests_with_their_own_max_new_tokens(onnx_models: tuple[OnnxCausalLM, OnnxRewardModel]) -> None:
    """Requests with different token limits in flight together: each trajectory ends at its request's
    limit (the fixture never ends earlier on this seed, or at its EOS), as the offline call with it does."""
    policy, reward = onnx_models
    limits = [2, 6, 3, 5]
    with tiltsmc.Engine(policy, reward) as engine:
        futures = [
            engine.submit("hello", "smc", num_particles=4, rng=k, max_new_tokens=m)
            for k, m in enumerate(limits)
        ]
        results = [f.result(timeout=30) for f in futures]
    for k, (limit, result) in enumerate(zip(limits, results)):
        lengths = [len(s) for s in result.samples[0]]
        assert max(lengths) <= limit
        offline = tiltsmc.smc(policy, reward, prompts=["hello"], num_particles=4, rng=k, max_new_tokens=limit)
        assert result.texts == offline.texts
    task = MarkovDFATask.random(3, 2, 6, rng=4)
    short = tiltsmc.smc(
        task.policy(allow_token_limits=True), task.twist(), num_particles=4, rng=0, max_new_tokens=3
    )
    assert short.samples[0].shape == (4, 3)
    with pytest.raises(ValueError, match="max_new_tokens: the Markov test-bed task's trajectories"):
        tiltsmc.smc(task.policy(), task.twist(), num_particles=4, max_new_tokens=3)  # cut short: refused
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiltsmc.smc(task.policy(), task.twist(), num_particles=4, max_new_tokens=0)


# ----------------------------------------------------------------------------------------------------------
# several workers


def test_workers_share_max_batch_rows_and_take_the_least_loaded(models: tuple[Any, Any]) -> None:
    """``max_batch_rows`` bounds every worker's rows together: with one worker's batch holding all 16,
    a request waits although the other worker is idle. A request goes to the worker with fewer rows."""
    policy, twist = models
    gated = Gated(policy)
    gated.gate.clear()
    with tiltsmc.Engine(gated, twist, max_batch_rows=16, workers=2) as engine:
        first = engine.submit((), "smc", num_particles=16, rng=0)
        assert gated.entered.wait(10)  # one worker holds all 16 rows inside a step
        waiting = engine.submit((), "smc", num_particles=4, rng=1)
        time.sleep(0.1)
        stats = engine.stats()
        assert (stats["waiting"], stats["rows_in_flight"]) == (1, 16)
        assert sorted(w["rows_in_flight"] for w in stats["workers"]) == [0, 16]
        gated.gate.set()
        assert same_result(
            first.result(timeout=30), tiltsmc.smc(policy, twist, prompts=[()], num_particles=16, rng=0)
        )
        assert same_result(
            waiting.result(timeout=30), tiltsmc.smc(policy, twist, prompts=[()], num_particles=4, rng=1)
        )

    gated.gate.clear()
    gated.entered.clear()
    with tiltsmc.Engine(gated, twist, max_batch_rows=64, workers=2) as engine:
        first = engine.submit((), "smc", num_particles=8, rng=0)
        assert gated.entered.wait(10)  # held by one worker
        second = engine.submit((), "smc", num_particles=8, rng=1)
        assert _wait_for(lambda: engine.stats()["in_flight"] == 2)
        assert sorted(w["rows_in_flight"] for w in engine.stats()["workers"]) == [8, 8]
        gated.gate.set()
        first.result(timeout=30)
        second.result(timeout=30)


@pytest.mark.parametrize(
    ("workers", "error", "message"),
    [(0, ValueError, "workers: must be >= 1"), (True, TypeError, "workers: expected an int"),
     (257, ValueError, "at most 256 worker threads")],
)  # fmt: skip
def test_bad_worker_counts_are_refused(
    models: tuple[Any, Any], workers: Any, error: type[Exception], message: str
) -> None:
    policy, twist = models
    before = threading.active_count()
    with pytest.raises(error, match=message):
        tiltsmc.Engine(policy, twist, workers=workers)
    assert threading.active_count() == before  # no thread left behind


def test_workers_warn_when_their_models_threads_would_crowd_the_cores(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two workers on models whose sessions take a thread a core each would ask for twice the cores: the
    engine says so (and what to load them with); with one thread a model on two or more cores it does
    not."""
    from tiltsmc.serving.engine import usable_cores

    cores = usable_cores()
    for threads, crowded in ((None, True), (1, 2 > cores)):
        policy, reward = arithmetic.load_models(intra_op_num_threads=threads)
        caplog.clear()
        with caplog.at_level("WARNING", logger="tiltsmc.engine"):
            tiltsmc.Engine(policy, reward, workers=2).close()
        warned = [r.getMessage() for r in caplog.records if "ONNX Runtime threads" in r.getMessage()]
        assert bool(warned) == crowded, (threads, warned)
        if crowded:
            assert f"intra_op_num_threads={max(1, cores // 2)}" in warned[0]
    with caplog.at_level("WARNING", logger="tiltsmc.engine"):
        caplog.clear()
        tiltsmc.Engine(*arithmetic.load_models(), workers=1).close()
    assert not caplog.records


class EngineBug(BaseException):
    """Not an ``Exception``: what the engine's own code could raise past its lanes' handlers (a bug)."""


class BuggyForThree(Gated):
    """A gated policy that raises ``EngineBug`` on a batch of exactly 3 rows."""

    def propose(self, particles: Particles, rng: Any) -> Any:
        if particles.lengths.size == 3:
            raise EngineBug("a bug")
        return super().propose(particles, rng)


def test_a_failed_worker_ends_every_request_and_the_other_workers(models: tuple[Any, Any]) -> None:
    """A worker that fails (a bug in the engine, not a model error) breaks the engine: its requests, the
    queue's and the other workers' end with ``EngineClosed`` naming the failure, every worker stops and
    ``submit`` refuses; no future hangs."""
    policy, twist = models
    buggy = BuggyForThree(policy)
    buggy.gate.clear()
    before = set(threading.enumerate())
    engine = tiltsmc.Engine(buggy, twist, workers=2)
    workers = set(threading.enumerate()) - before
    held = engine.submit((), "smc", num_particles=8, rng=0)
    assert buggy.entered.wait(10)  # one worker holds it inside a step
    failing = engine.submit((), "smc", num_particles=3, rng=1)  # the other worker takes it, and fails
    with pytest.raises(EngineClosed, match="the engine failed: EngineBug"):
        failing.result(timeout=30)
    buggy.gate.set()
    with pytest.raises(EngineClosed, match="the engine failed: EngineBug"):
        held.result(timeout=30)
    with pytest.raises(EngineClosed, match="the engine failed"):
        engine.submit((), "smc", num_particles=4)
    assert "EngineBug" in engine.stats()["failed"]  # what /health and Ray's health check read
    engine.close()
    assert not any(thread.is_alive() for thread in workers)


class Releasing(Gated):
    """A gated policy that counts the engine's ``release_memory()`` calls."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.released = 0

    def release_memory(self) -> bool:
        self.released += 1
        return True


@pytest.mark.parametrize("workers", [1, 3])
def test_memory_is_released_once_when_every_worker_is_idle(models: tuple[Any, Any], workers: int) -> None:
    """After a burst, once the engine has been idle ``release_memory_after`` seconds, the models' memory
    is released once (not once per worker), and not again until there has been work."""
    policy, twist = models
    releasing = Releasing(policy)
    with tiltsmc.Engine(releasing, twist, workers=workers, release_memory_after=0.05) as engine:
        futures = [engine.submit((), "smc", num_particles=8, rng=k) for k in range(2 * workers)]
        for future in futures:
            future.result(timeout=30)
        assert _wait_for(lambda: releasing.released >= 1)
        time.sleep(0.3)  # several more idle periods: nothing new to give back
        assert releasing.released == 1
        engine.submit((), "smc", num_particles=8, rng=99).result(timeout=30)
        assert _wait_for(lambda: releasing.released >= 2)
        time.sleep(0.3)
        assert releasing.released == 2


class GatedForThree(Gated):
    """A policy whose ``propose`` waits for ``gate`` on a batch of exactly 3 rows only."""

    def propose(self, particles: Particles, rng: Any) -> Any:
        if particles.lengths.size == 3:
            self.entered.set()
            assert self.gate.wait(20), "the test never opened the gate"
        return self.inner.propose(particles, rng)


def test_close_from_a_future_callback_returns_and_the_engine_drains(models: tuple[Any, Any]) -> None:
    """``close()`` called on a worker's thread (a future's done-callback) returns at once rather than
    waiting for the other workers (which could wait on the rows this one holds); the engine still drains."""
    policy, twist = models
    gated = GatedForThree(policy)
    gated.gate.clear()
    engine = tiltsmc.Engine(gated, twist, workers=2)
    held = engine.submit((), "smc", num_particles=3, rng=0)
    assert gated.entered.wait(10)  # one worker is inside a step of it
    closed = threading.Event()

    def close_engine(_: Any) -> None:
        engine.close(drain=True, timeout=None)
        closed.set()

    quick = engine.submit((), "smc", num_particles=4, rng=1)  # the other worker runs it
    quick.add_done_callback(close_engine)
    assert closed.wait(10), "close() from the callback waited for the other worker"
    assert not held.done()
    gated.gate.set()
    assert same_result(
        held.result(timeout=30), tiltsmc.smc(policy, twist, prompts=[()], num_particles=3, rng=0)
    )
    assert same_result(
        quick.result(timeout=30), tiltsmc.smc(policy, twist, prompts=[()], num_particles=4, rng=1)
    )
    engine.close()


def run_script(tmp_path: Path, source: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``source`` run as a script in its own interpreter, its output captured."""
    script = tmp_path / "script.py"
    script.write_text(source)
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout
    )


EXIT_WITH_REQUESTS_IN_FLIGHT = """
import sys
import threading
import time
import tiltsmc
from tiltsmc.tasks import arithmetic

policy, reward = arithmetic.load_models()
engine = tiltsmc.Engine(policy, reward, workers=int(sys.argv[1]))  # never closed by the script
prompts = [problem.prompt for problem in arithmetic.make_problems(8, 24, rng=0)]
engine.submit(prompts[0], num_particles=16, rng=0).result()
futures = [engine.submit(prompt, num_particles=16, rng=k) for k, prompt in enumerate(prompts)]
printing = threading.Lock()  # two workers' callbacks at once would interleave their lines


def report(future):
    with printing:
        print(type(future.exception()).__name__, flush=True)


for future in futures:
    future.add_done_callback(report)
time.sleep(0.3)  # the worker is inside the batch's steps
raise SystemExit(3)  # with requests in flight
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_a_script_that_exits_with_requests_in_flight_exits_with_its_own_status(
    tmp_path: Path, workers: int
) -> None:
    """An engine left open at interpreter exit is closed then (its requests end with ``EngineClosed``):
    its worker threads, stopped by the interpreter inside a model call, used to abort the process."""
    done = run_script(tmp_path, EXIT_WITH_REQUESTS_IN_FLIGHT, str(workers), timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "terminate called" not in done.stderr
    outcomes = done.stdout.split()
    assert "EngineClosed" in outcomes, done.stdout  # requests still in flight at exit
    assert set(outcomes) <= {"NoneType", "EngineClosed"}, done.stdout


EXIT_WITH_A_STEP_THAT_NEVER_RETURNS = (
    SCRIPT_HEAD
    + """
import logging
import tiltsmc
import tiltsmc.serving.engine

logging.basicConfig()
tiltsmc.serving.engine.EXIT_WAIT = 0.5
stuck = Stuck()
engine = tiltsmc.Engine(stuck, TASK.twist(noise=0.4, rng=1))
engine.submit((), "smc", num_particles=4)
stuck.entered.wait(30)
print("exiting", flush=True)
raise SystemExit(5)
"""
)


def test_exit_does_not_wait_for_ever_on_a_step_that_never_returns(tmp_path: Path) -> None:
    """The close at exit waits ``EXIT_WAIT`` seconds for the workers, then leaves them (logged)."""
    began = time.perf_counter()
    done = run_script(tmp_path, EXIT_WITH_A_STEP_THAT_NEVER_RETURNS, timeout=60)
    assert done.returncode == 5, done.stderr[-2000:]
    assert done.stdout.strip() == "exiting"
    assert "still inside a step after 0.5 s" in done.stderr
    assert time.perf_counter() - began < 30


def test_close_waits_a_bounded_time_for_a_step_in_progress() -> None:
    """``close(wait=)`` returns False once ``wait`` seconds have passed with a worker still inside a step
    (a model call cannot be cut short), True where the workers stop in time; its request ends either way."""
    task = MarkovDFATask.random(4, 3, 6, rng=0)
    policy = task.policy()
    entered, release = threading.Event(), threading.Event()

    class Slow:
        token_level = True
        supports_engine = True
        vocab_size = policy.vocab_size

        def start(self, prompts: Any, num_particles: int) -> Particles:
            return policy.start(prompts, num_particles)

        def propose(self, particles: Particles, rng: Any) -> Any:
            entered.set()
            release.wait(60)
            return policy.propose(particles, rng)

    engine = tiltsmc.Engine(Slow(), task.twist(noise=0.4, rng=1))
    future = engine.submit((), "smc", num_particles=4)
    assert entered.wait(30)
    began = time.perf_counter()
    assert engine.close(drain=False, wait=0.3) is False
    assert 0.3 <= time.perf_counter() - began < 5
    release.set()
    assert engine.close(drain=False, wait=30) is True
    assert isinstance(future.exception(timeout=30), EngineClosed)
    with tiltsmc.Engine(task.policy(), task.twist(noise=0.4, rng=1)) as quick:
        quick.submit((), "smc", num_particles=4).result(timeout=30)
        assert quick.close(wait=30) is True


def test_max_cache_bytes_auto_is_a_share_of_the_memory_available(monkeypatch: pytest.MonkeyPatch) -> None:
    """``"auto"`` (the default): ``CACHE_MEMORY_SHARE`` of what ``available_memory`` reads, for a policy
    that says its cache's size; no bound for one that cannot (it is not refused, unlike a number), nor
    where the memory cannot be read. Other strings are refused naming the argument."""
    from tiltsmc.serving import engine as engine_module

    monkeypatch.setattr(engine_module, "available_memory", lambda: 8_000_000_001)
    policy = OnnxCausalLM(FIXTURES / "gpt2-tiny", max_new_tokens=4)
    reward = OnnxRewardModel(FIXTURES / "prm-tiny", kind="logit")
    with tiltsmc.Engine(policy, reward) as engine:
        assert (
            engine.max_cache_bytes == int(engine_module.CACHE_MEMORY_SHARE * 8_000_000_001) == 2_000_000_000
        )
        assert engine.stats()["max_cache_bytes"] == 2_000_000_000
    task = MarkovDFATask.random(4, 3, 6, rng=0)
    with tiltsmc.Engine(task.policy(), task.twist(noise=0.4, rng=1)) as engine:  # no cache_bytes_per_token
        assert engine.max_cache_bytes is None
    monkeypatch.setattr(engine_module, "available_memory", lambda: None)
    with tiltsmc.Engine(policy, reward, max_cache_bytes="auto") as engine:
        assert engine.max_cache_bytes is None
    with pytest.raises(ValueError, match="max_cache_bytes: expected a positive integer, 'auto' or None"):
        tiltsmc.Engine(policy, reward, max_cache_bytes="lots")  # type: ignore[arg-type]


class GatedReward:
    """A real reward model whose ``log_value`` waits for ``gate`` (to hold the worker inside a step, after
    its policy call)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def log_value(self, particles: Particles) -> Any:
        self.entered.set()
        assert self.gate.wait(20), "the test never opened the gate"
        return self.inner.log_value(particles)


class SlowPolicy(Gated):
    """A real policy whose ``propose`` takes at least 0.1 s."""

    def propose(self, particles: Particles, rng: Any) -> Any:
        time.sleep(0.1)
        return super().propose(particles, rng)


def test_stats_split_covers_whole_steps(models: tuple[Any, Any]) -> None:
    """``stats()`` read in the middle of a step, after its policy call: the split counts only completed
    steps in every part (the policy's 0.1 s of the step in progress is not in ``policy_seconds`` while
    the step is not in ``step_seconds``: a read there once put tiltsmc's share of a window of long steps
    far off, either way); once the steps have ended, every part is there."""
    policy, twist = models
    reward = GatedReward(twist)
    with tiltsmc.Engine(SlowPolicy(policy), reward) as engine:
        future = engine.submit((), "smc", num_particles=4, rng=0)
        assert reward.entered.wait(10)  # the first step's policy call done, its reward call waiting
        during = engine.stats()
        reward.gate.set()
        future.result(timeout=30)
        after = engine.stats()
    assert during["steps"] == during["policy_calls"] == during["reward_calls"] == 0
    assert during["step_seconds"] == during["policy_seconds"] == during["reward_seconds"] == 0.0
    assert during["rows_per_policy_call"] == 0.0
    assert after["steps"] >= 1 and after["policy_calls"] >= 1 and after["policy_seconds"] >= 0.1
    parts = after["policy_seconds"] + after["reward_seconds"] + after["tiltsmc_seconds"]
    assert parts == pytest.approx(after["step_seconds"], rel=1e-12)
    assert after["policy_seconds"] + after["reward_seconds"] <= after["step_seconds"]
    assert after["rows_per_policy_call"] == 4.0


def test_stats_read_from_another_thread_while_requests_come_and_go() -> None:
    """``stats()`` from a thread of its own while the worker admits and ends requests, the interpreter
    switching threads as often as it can: never an error (the requests in flight, and the KV cache they
    may reach, are read under the engine's lock; Python 3.9 once raised "dictionary changed size during
    iteration" here)."""
    policy = OnnxCausalLM(FIXTURES / "gpt2-tiny", max_new_tokens=4)
    reward = OnnxRewardModel(FIXTURES / "prm-tiny")
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with tiltsmc.Engine(policy, reward, max_cache_bytes=10**9) as engine:
            errors: list[BaseException] = []
            stop = threading.Event()

            def read() -> None:
                while not stop.is_set():
                    try:
                        engine.stats()
                    except Exception as error:  # any: the test reports it
                        errors.append(error)
                        return

            reader = threading.Thread(target=read)
            reader.start()
            futures = [engine.submit("hello there", num_particles=2, rng=k) for k in range(160)]
            for future in futures:
                future.result()
            stop.set()
            reader.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors


def test_the_kv_cache_in_flight_stays_under_max_cache_bytes() -> None:
    """``max_cache_bytes``: requests are admitted while the KV cache their particles may reach (rows x
    (prompt + max_new_tokens) tokens x the policy's bytes a token) fits, the rest wait; a request over it
    alone is refused at submit; results are those of the offline runs; a policy that cannot say its
    cache's size is refused."""
    policy = OnnxCausalLM(FIXTURES / "gpt2-tiny", max_new_tokens=12)
    reward = OnnxRewardModel(FIXTURES / "prm-tiny")
    one = 8 * (len(policy.encode_prompt("hello there")) + 12) * policy.cache_bytes_per_token
    assert policy.cache_bytes_per_token == 2 * policy.num_layers * policy.kv_heads * policy.head_dim * 4
    with tiltsmc.Engine(policy, reward, max_cache_bytes=2 * one) as engine:
        futures = [engine.submit("hello there", num_particles=8, rng=k) for k in range(6)]
        seen, waited = 0, 0
        while not all(f.done() for f in futures):
            stats = engine.stats()
            seen, waited = max(seen, stats["cache_bytes_in_flight"]), max(waited, stats["waiting"])
        assert 0 < seen <= 2 * one and engine.stats()["max_cache_bytes"] == 2 * one
        assert waited > 0  # six submitted at once, two admitted at a time
        with pytest.raises(ValueError, match="max_cache_bytes"):
            engine.submit("hello there", num_particles=24)
        for k, future in enumerate(futures):
            offline = tiltsmc.smc(policy, reward, ["hello there"], num_particles=8, rng=k)
            assert float(future.result().log_z[0]) == pytest.approx(float(offline.log_z[0]), rel=1e-6)
    task = MarkovDFATask.random(3, 2, 4, rng=0)
    with pytest.raises(ValueError, match="cache_bytes_per_token"):
        tiltsmc.Engine(task.policy(), task.twist(noise=0.1, rng=0), max_cache_bytes=1000)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("top_k", [None, 5])
def test_a_prompt_whose_logits_no_token_can_be_drawn_from_fails_alone(
    tmp_path: Path, value: float, top_k: Any
) -> None:
    """Logits of NaN, +inf or all -inf on one request's rows end that request with its reason (prompt 0:
    logits ...); the request batched with it gets what it gets alone (it failed with the same error:
    the policy's draw raised for the whole batch). Offline, that prompt fails alone, in the result's
    errors (the whole call raised, naming it), and a call whose every prompt fails raises, naming the
    first."""
    policy = OnnxCausalLM(
        policy_with_logits_added_after(FIXTURES / "llama-tiny", 7, value, tmp_path / "policy"),
        max_new_tokens=4,
        top_k=top_k,
    )
    reward = OnnxRewardModel(FIXTURES / "prm-tiny")
    what = {"nan": "NaN", "inf": "+inf", "-inf": "only -inf"}[str(value)]
    with tiltsmc.Engine(policy, reward) as engine:
        alone = engine.submit([3, 5], "smc", num_particles=4, rng=11).result(timeout=60)
        good = engine.submit([3, 5], "smc", num_particles=4, rng=11)
        bad = engine.submit([3, 7], "smc", num_particles=4, rng=12)
        with pytest.raises(
            ValueError, match=re.escape(f"prompt 0: logits: model.onnx returned {what} for this")
        ):
            bad.result(timeout=60)
        result = good.result(timeout=60)
    assert [s.tolist() for s in result.samples[0]] == [s.tolist() for s in alone.samples[0]]
    assert result.log_z[0] == pytest.approx(alone.log_z[0], rel=1e-6)
    offline = tiltsmc.smc(policy, reward, prompts=[[3, 5], [3, 7]], num_particles=4, rng=0)
    assert list(offline.errors) == [1]
    assert offline.errors[1].startswith(f"prompt 1: logits: model.onnx returned {what} for this")
    assert offline.collapsed.tolist() == [False, True] and offline.log_z[1] == -np.inf
    assert np.isfinite(offline.log_z[0]) and offline.weights(0).sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=re.escape(f"prompt 0: logits: model.onnx returned {what} for this")):
        tiltsmc.smc(policy, reward, prompts=[[3, 7]], num_particles=4, rng=0)


@pytest.mark.parametrize("raised", [KeyboardInterrupt, SystemExit])
def test_a_done_callback_raising_a_base_exception_leaves_the_engine_serving(
    raised: type[BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    """Done-callbacks run on the worker: one that raises ``KeyboardInterrupt`` or ``SystemExit`` (which
    ``concurrent.futures`` does not catch) is logged, and the other requests and later ones are served (it
    reached the worker's last resort: every request ended with EngineClosed, and submit refused)."""
    task = MarkovDFATask.random(3, 2, 4, rng=0)

    def callback(_: Any) -> None:
        raise raised

    with caplog.at_level("ERROR", logger="tiltsmc.engine"):
        with tiltsmc.Engine(task.policy(), task.twist(noise=0.1, rng=0), max_batch_rows=8) as engine:
            first = engine.submit((), "smc", num_particles=4, rng=0)
            first.add_done_callback(callback)
            others = [engine.submit((), "smc", num_particles=4, rng=k) for k in range(1, 4)]
            for k, future in enumerate(others, start=1):
                expected = tiltsmc.smc(task.policy(), task.twist(noise=0.1, rng=0), [()], 4, rng=k)
                assert future.result(timeout=60).log_z.tolist() == expected.log_z.tolist()
            assert first.result(timeout=60).log_z.size == 1
            assert engine.submit((), "smc", num_particles=4, rng=9).result(timeout=60).log_z.size == 1
            stats = engine.stats()
            assert stats["failed"] is None and stats["requests"]["completed"] == 5
    assert any("done-callback" in record.getMessage() for record in caplog.records)


def test_final_resample_draws_count_as_the_requests_rows() -> None:
    """``final_resample = M`` draws ``M`` trajectories at the end, held at once as rows of tokens: a request
    whose ``M`` is more than the engine's ``max_batch_rows`` is refused at submit naming it (it was taken,
    and ``M = 10**7`` held 888 MB on the worker; ``2**63`` failed after the run naming ``num``), and ``M``
    up to the limit is served as offline."""
    task = MarkovDFATask.random(3, 2, 4, rng=0)
    policy, twist = task.policy(), task.twist(noise=0.1, rng=0)
    with tiltsmc.Engine(policy, twist, max_batch_rows=8) as engine:
        for draws in (9, 10**7):
            with pytest.raises(ValueError, match=f"^final_resample: the request needs {draws} particle rows"):
                engine.submit((), "smc", num_particles=4, final_resample=draws, rng=0)
        # more than any memory: refused as the offline call refuses it, when the run is made
        refused = rf"^final_resample: 1 prompt\(s\) x {2**63} samples \(16 bytes each\) need at least"
        with pytest.raises(ValueError, match=refused):
            engine.submit((), "smc", num_particles=4, final_resample=2**63, rng=0)
        served = engine.submit((), "smc", num_particles=4, final_resample=8, rng=0).result(timeout=60)
    offline = tiltsmc.smc(policy, twist, [()], num_particles=4, final_resample=8, rng=0)
    assert [s.tolist() for s in served.samples[0]] == [s.tolist() for s in offline.samples[0]]


def test_a_prompt_changed_after_submit_runs_as_submitted() -> None:
    """The engine runs what was submitted: a list or array of ids, or chat messages, that the caller changes
    while the request waits (behind a request that holds every row) runs as it was (it ran as changed, its
    KV cache counted on the old prompt)."""
    policy = OnnxCausalLM(FIXTURES / "llama-tiny", tokenizer=FIXTURES / "chat-tiny", max_new_tokens=4)
    reward = OnnxRewardModel(FIXTURES / "prm-tiny", tokenizer=FIXTURES / "chat-tiny")
    for prompt, changed in [
        ([5, 6, 7], lambda p: p.__setitem__(slice(None), [9] * 20)),
        (np.array([5, 6, 7]), lambda p: p.__setitem__(slice(None), 9)),
        ([{"role": "user", "content": "ab"}], lambda p: p[0].__setitem__("content", "zz zz")),
    ]:
        alone = tiltsmc.smc(policy, reward, [copy.deepcopy(prompt)], num_particles=2, rng=0)
        with tiltsmc.Engine(policy, reward, max_batch_rows=2) as engine:
            engine.submit([1, 2], "smc", num_particles=2, rng=0)  # holds every row: the next one waits
            future = engine.submit(prompt, "smc", num_particles=2, rng=0)
            changed(prompt)
            result = future.result(timeout=60)
        assert [s.tolist() for s in result.samples[0]] == [s.tolist() for s in alone.samples[0]]


def test_options_past_their_types_range_are_refused_at_submit_naming_them(models: tuple[Any, Any]) -> None:
    """Values the option's checks did not foresee (found by fuzzing): ints past the range of doubles (an
    unnamed OverflowError), a count past int64 (taken, then failing inside the run), a sampler that is not
    a string (TypeError: unhashable), a flag that is a string (read as true); numpy's bools are bools. A
    timeout past the range of doubles means no limit, as one past TIMEOUT_MAX does."""
    with tiltsmc.Engine(*models) as engine:
        refused: list[tuple[Callable[[], Any], type[Exception], str]] = [
            (
                lambda: engine.submit((), "smc", ess_threshold=10**400),
                ValueError,
                "^ess_threshold: expected a",
            ),
            (lambda: engine.submit((), "rejection", bound=10**400), ValueError, r"^bound: .*, got 1000"),
            (
                lambda: engine.submit((), "rejection", max_tries=2**63),
                ValueError,
                r"^max_tries: must be <= 2?",
            ),
            (lambda: engine.submit((), ["smc"]), ValueError, r"^sampler: expected one of .*, got \['smc'\]"),
            (
                lambda: engine.submit((), "smc", record_ancestry="False"),
                TypeError,
                "^record_ancestry: expected",
            ),
        ]
        for call, kind, message in refused:
            with pytest.raises(kind, match=message):
                call()
        served = engine.submit((), "smc", num_particles=2, record_ancestry=np.True_, timeout=10**400, rng=0)
        assert served.result(timeout=60).ancestry is not None
    engine = tiltsmc.Engine(*models, adaptive_rows=np.False_, keep_freed_memory=np.False_)
    assert engine.close(drain=np.True_, timeout=10**400)


class Faulty(HeldRefusesPoison):
    """``HeldRefusesPoison`` that also raises for a batch of more than ``limit`` rows (memory that a smaller
    call finds)."""

    def __init__(self, inner: Any, limit: int) -> None:
        super().__init__(inner)
        self.limit = limit

    def refuse(self, particles: Particles) -> None:
        if particles.lengths.size > self.limit:
            raise RuntimeError(f"out of memory for {particles.lengths.size} rows")
        super().refuse(particles)


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(
    jobs=st.lists(
        st.tuples(
            st.integers(0, len(MARKOV_REQUESTS) - 1), st.booleans(), st.sampled_from(["keep", "cancel"])
        ),
        min_size=1,
        max_size=10,
    ),
    limit=st.sampled_from([16, 40, 10**6]),
    workers=st.integers(1, 2),
)
def test_failing_batches_cancellations_and_workers_never_lose_or_mix_a_request(
    jobs: list[tuple[int, bool, str]], limit: int, workers: int
) -> None:
    """Requests of every sampler queued together (behind a request holding the worker), some with a
    prompt the policy refuses, some cancelled at once, to a policy that also fails for batches over
    ``limit`` rows, on one or two workers: every future ends; a refused prompt's request fails with the
    policy's error, every other request that was not cancelled gets exactly its offline result; the
    counts add up and the rows are freed."""
    task = MarkovDFATask.random(4, 3, 6, rng=0)
    policy, twist = task.policy(), task.twist(noise=0.4, rng=1)
    faulty = Faulty(policy, limit)
    futures = []
    with tiltsmc.Engine(faulty, twist, workers=workers, adaptive_rows=False) as engine:
        holder = engine.submit(Held(), "smc", num_particles=4, rng=99)
        assert faulty.entered.wait(10)
        for seed, (which, poisoned, fate) in enumerate(jobs):
            sampler, options = MARKOV_REQUESTS[which]
            future = engine.submit(Poison() if poisoned else (), sampler, rng=seed, **options)
            cancelled = fate == "cancel" and future.cancel()
            futures.append((seed, sampler, options, poisoned, cancelled, future))
        faulty.gate.set()
        expected = tiltsmc.smc(policy, twist, prompts=[()], num_particles=4, rng=99)
        assert same_result(holder.result(timeout=60), expected)
        for seed, sampler, options, poisoned, cancelled, future in futures:
            if cancelled:
                assert future.cancelled()
            elif poisoned:
                with pytest.raises(RuntimeError, match="cannot take a poisoned prompt"):
                    future.result(timeout=60)
            else:
                expected = OFFLINE[sampler](policy, twist, prompts=[()], rng=seed, **options)
                assert same_result(future.result(timeout=60), expected)
        deadline = time.monotonic() + 10  # a request cancelled while it waits is counted once it is seen
        while True:
            stats = engine.stats()
            counts = stats["requests"]
            if counts["completed"] + counts["failed"] + counts["cancelled"] == len(jobs) + 1:
                break
            assert time.monotonic() < deadline, f"requests never ended: {stats}"
            time.sleep(0.01)
    assert counts["submitted"] == len(jobs) + 1  # and the holder
    assert counts["cancelled"] == sum(cancelled for *_, cancelled, _ in futures)
    assert counts["failed"] == sum(poisoned and not cancelled for *_, poisoned, cancelled, _ in futures)
    assert (stats["in_flight"], stats["rows_in_flight"], stats["waiting"]) == (0, 0, 0)


def test_the_restart_warning_counts_only_the_requests_that_run_again(
    models: tuple[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A request cancelled during the step whose batch call fails does not run again, and the warning
    says how many of the batch do (it said "they run again" of all 4, and halves of 2 and 1 followed)."""
    policy, twist = models
    held = HeldRefusesPoison(policy)
    poisoned_waits = HeldRefusesPoison(held, held=Poison)  # waits inside the step that raises for Poison
    with (
        caplog.at_level("WARNING", logger="tiltsmc.lane"),
        tiltsmc.Engine(poisoned_waits, twist, adaptive_rows=False) as engine,
    ):
        holder = engine.submit(Held(), "smc", num_particles=4, rng=99)
        assert held.entered.wait(10)  # the worker inside the holder's first step: the others queue
        cancelled, kept = (engine.submit((), "smc", num_particles=4, rng=k) for k in (1, 2))
        poisoned = engine.submit(Poison(), "smc", num_particles=4, rng=3)
        held.gate.set()
        assert poisoned_waits.entered.wait(10)  # all four in the step whose call fails
        assert cancelled.cancel()
        poisoned_waits.gate.set()
        with pytest.raises(RuntimeError, match="cannot take a poisoned prompt"):
            poisoned.result(timeout=30)
        assert same_result(
            kept.result(timeout=30), tiltsmc.smc(policy, twist, prompts=[()], num_particles=4, rng=2)
        )
        holder.result(timeout=30)
        stats = engine.stats()
    assert stats["requests"]["cancelled"] == 1 and stats["requests"]["completed"] == 2
    warnings = [
        record.getMessage() for record in caplog.records if "failed for a batch" in record.getMessage()
    ]
    assert warnings[0] == (
        "a model call failed for a batch of 4 requests (RuntimeError: this policy cannot take a poisoned "
        "prompt): 3 of them run again from their start, in halves of 2 and 1"
    ), warnings


# ----------------------------------------------------------------------------------------------------------
# futures, wake-ups, closing and counts


class DecodeFails(Gated):
    """A gated policy with a tokenizer whose ``decode`` raises (bytes that are not UTF-8)."""

    tokenizer = object()

    def decode(self, tokens: Any) -> str:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")


def test_a_decode_that_raises_fails_the_read_and_the_await(models: tuple[Any, Any]) -> None:
    """The texts are decoded at the first read of a request's result: where the policy's ``decode``
    raises, ``result()`` raises its error at every read, ``exception()`` returns the same error, and
    ``await engine.generate()`` raises it too (asyncio copies a future's outcome by ``exception()``, then
    ``result()`` inside a callback of its loop: the await never returned, the request long done)."""
    policy, twist = models
    with tiltsmc.Engine(DecodeFails(policy), twist) as engine:

        async def awaited() -> tiltsmc.SamplerResult:
            return await asyncio.wait_for(engine.generate((), "smc", num_particles=4, rng=0), 20)

        with pytest.raises(UnicodeDecodeError):
            asyncio.run(awaited())
        future = engine.submit((), "smc", num_particles=4, rng=0)
        with pytest.raises(UnicodeDecodeError) as raised:
            future.result(timeout=30)
        assert future.exception() is raised.value
        with pytest.raises(UnicodeDecodeError) as again:
            future.result()
        assert again.value is raised.value
        assert engine.stats()["requests"]["completed"] == 2  # the engine served both


class HeldStepByStep(Gated):
    """A gated policy whose every step of a batch holding a :class:`Held` prompt waits for one release of
    ``steps`` (a semaphore); other batches run freely."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.steps = threading.Semaphore(0)

    def propose(self, particles: Particles, rng: Any) -> Any:
        if any(isinstance(prompt, Held) for prompt in particles.prompts):
            self.entered.set()
            assert self.steps.acquire(timeout=30), "the test never let the step go"
        return self.inner.propose(particles, rng)


@pytest.mark.parametrize("leaves_by", ["cancel", "timeout"])
def test_an_idle_worker_takes_what_the_head_leaving_the_queue_lets_fit(
    models: tuple[Any, Any], leaves_by: str
) -> None:
    """Two workers, one holding a 6-row request (of 8 rows in all) step by step, the other idle; a 4-row
    request waits at the head of the queue (6 + 4 > 8), a 2-row one behind it. Once the head leaves
    (cancelled, or past its deadline), the 2-row request fits: the busy worker, which takes the head out
    at its next step, leaves it to the idle one (fewer rows), and wakes it. The idle worker slept on,
    and the 2-row request waited until the busy worker's request had ended."""
    policy, twist = models
    held = HeldStepByStep(policy)
    with tiltsmc.Engine(held, twist, max_batch_rows=8, adaptive_rows=False, workers=2) as engine:
        holder = engine.submit(Held(), "smc", num_particles=6, rng=0)
        try:
            assert held.entered.wait(10)  # one worker inside the holder's first step
            head = engine.submit(
                (), "smc", num_particles=4, rng=1, timeout=0.2 if leaves_by == "timeout" else None
            )
            behind = engine.submit((), "smc", num_particles=2, rng=2)
            time.sleep(0.3)  # the idle worker has looked at the queue (and the head's deadline passed)
            if leaves_by == "cancel":
                assert head.cancel()
            held.steps.release()  # one step: the holder's worker takes the head out, then steps again
            served = behind.result(timeout=15)  # while the holder's worker waits inside its next step
        finally:
            for _ in range(100):  # the holder's other steps
                held.steps.release()
        assert same_result(served, tiltsmc.smc(policy, twist, prompts=[()], num_particles=2, rng=2))
        assert same_result(
            holder.result(timeout=30), tiltsmc.smc(policy, twist, prompts=[()], num_particles=6, rng=0)
        )
        if leaves_by == "cancel":
            assert head.cancelled()
        else:
            with pytest.raises(TimeoutError, match="timeout"):
                head.result(timeout=10)


@pytest.mark.parametrize(
    "first", [{"drain": False}, {"drain": True, "timeout": 0.05}], ids=["no-drain", "short-drain"]
)
def test_a_later_close_never_gives_the_requests_longer(
    models: tuple[Any, Any], first: dict[str, Any]
) -> None:
    """``close(drain=False)``, or with a short ``timeout``, returning at once (``wait=0``) while a step is
    in progress, then ``close()`` (what leaving a ``with`` block does): the requests end with
    ``EngineClosed`` once the step ends, as after the first close alone (the second close set its own 30 s
    drain, and they completed). A later close that ends the drain sooner brings it forward."""
    policy, twist = models
    gated = Gated(policy)
    gated.gate.clear()
    engine = tiltsmc.Engine(gated, twist)
    futures = [engine.submit((), "smc", num_particles=4, rng=k) for k in range(3)]
    assert gated.entered.wait(10)
    assert engine.close(**first, wait=0) is False  # the worker is inside a step
    time.sleep(0.1)  # past the short drain's end
    assert _close_as_the_gate_opens(engine, gated) is True
    for future in futures:
        with pytest.raises(EngineClosed, match="closed before the request finished"):
            future.result(timeout=10)

    gated = Gated(policy)
    gated.gate.clear()
    engine = tiltsmc.Engine(gated, twist)
    future = engine.submit((), "smc", num_particles=4, rng=0)
    assert gated.entered.wait(10)
    assert engine.close(drain=True, timeout=None, wait=0) is False
    assert _close_as_the_gate_opens(engine, gated, drain=False) is True
    with pytest.raises(EngineClosed, match="closed before the request finished"):
        future.result(timeout=10)


def test_the_counts_add_up_at_every_read_while_requests_end_every_way(models: tuple[Any, Any]) -> None:
    """``stats()`` read over and over from a thread of its own while two workers serve requests that
    complete, time out (waiting and in flight), are cancelled (waiting and in flight) and end at a close
    that does not drain, many with slow done-callbacks: at every read ``submitted`` is the sum of the
    outcomes, ``waiting`` and ``in_flight``. Requests were taken out of the queue or a worker's batch
    before they were counted, one by one between their callbacks, and ``waiting`` was read after the
    lock was let go: reads in between found requests nowhere."""
    policy, twist = models
    gated = Gated(policy)
    gated.gate.clear()
    engine = tiltsmc.Engine(gated, twist, max_batch_rows=16, workers=2, adaptive_rows=False)
    unaccounted: list[dict[str, Any]] = []
    reads = 0
    stop = threading.Event()

    def read() -> None:
        nonlocal reads
        while not stop.is_set():
            stats = engine.stats()
            counts = stats["requests"]
            ended = sum(
                counts[outcome] for outcome in ("completed", "failed", "cancelled", "timed_out", "closed")
            )
            if counts["submitted"] != ended + stats["waiting"] + stats["in_flight"]:
                unaccounted.append(stats)
            reads += 1

    def slowly(_: Any) -> None:
        time.sleep(0.02)  # a slow done-callback: what kept a request out of the counts for longer

    def submit(rows: int, seed: int, timeout: Any = None, callback: Any = slowly) -> Any:
        future = engine.submit((), "smc", num_particles=rows, rng=seed, timeout=timeout)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    reader = threading.Thread(target=read)
    reader.start()
    try:
        held = [submit(8, 0, timeout=0.3), submit(8, 1)]  # a worker each, inside their first steps
        assert _wait_for(lambda: engine.stats()["in_flight"] == 2)
        timing_out = [submit(4, 2 + k, timeout=0.3) for k in range(6)]  # they time out waiting
        cancelled = [submit(4, 10 + k) for k in range(3)]
        assert all(future.cancel() for future in cancelled)
        time.sleep(0.4)  # past the deadlines
        assert held[1].cancel()  # in flight
        gated.gate.set()
        for future in [held[0], *timing_out]:
            with pytest.raises(TimeoutError, match="timeout"):
                future.result(timeout=30)

        def client(seed: int) -> None:  # load: requests completing, timing out and cancelled
            rng = np.random.default_rng(seed)
            for k in range(25):
                timeout = [None, None, 0.005, 0.05][int(rng.integers(4))]
                future = submit(int(rng.integers(2, 9)), 100 * seed + k, timeout, callback=None)
                if rng.random() < 0.25:
                    time.sleep(float(rng.random()) * 0.01)
                    future.cancel()

        clients = [threading.Thread(target=client, args=(seed,)) for seed in range(3)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        assert _wait_for(lambda: engine.stats()["in_flight"] + engine.stats()["waiting"] == 0, 60)

        gated.gate.clear()
        gated.entered.clear()
        last = [submit(8, 1000), submit(8, 1001)]
        assert gated.entered.wait(10)
        queued = [submit(4, 1002 + k) for k in range(4)]
        _close_as_the_gate_opens(engine, gated, drain=False)  # ends those in flight and those queued
        for future in [*last, *queued]:
            with pytest.raises(EngineClosed):
                future.result(timeout=10)
    finally:
        stop.set()
        reader.join()
        gated.gate.set()
        engine.close()
    assert reads > 100 and not unaccounted, unaccounted[:3]
    counts = engine.stats()["requests"]
    assert counts["submitted"] == sum(
        counts[o] for o in ("completed", "failed", "cancelled", "timed_out", "closed")
    )
    assert counts["closed"] == 6 and counts["timed_out"] >= 7 and counts["cancelled"] >= 4
    assert counts["failed"] == 0


class ReleaseFails(Releasing):
    """A gated policy whose ``release_memory()`` raises (its calls counted in ``released``)."""

    def release_memory(self) -> bool:
        super().release_memory()
        raise RuntimeError("the arena could not shrink")


def test_a_release_memory_that_raises_is_logged_once_and_the_engine_serves_on(
    models: tuple[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A model's ``release_memory()`` raising at each idle release keeps its memory: the engine serves on
    (it broke for good, every later request refused), and the warning is logged once, not at every idle
    period (the later ones at debug level)."""
    policy, twist = models
    releasing = ReleaseFails(policy)
    with (
        caplog.at_level("DEBUG", logger="tiltsmc.engine"),
        tiltsmc.Engine(releasing, twist, release_memory_after=0.05) as engine,
    ):
        for k in range(3):  # three bursts, each followed by an idle release that raises
            served = engine.submit((), "smc", num_particles=4, rng=k).result(timeout=30)
            assert same_result(served, tiltsmc.smc(policy, twist, prompts=[()], num_particles=4, rng=k))
            assert _wait_for(lambda: releasing.released > k)  # noqa: B023
        stats = engine.stats()
    assert stats["failed"] is None and stats["requests"]["completed"] == 3
    logged = [record for record in caplog.records if "could not shrink" in record.getMessage()]
    assert [record.levelname for record in logged] == ["WARNING", "DEBUG", "DEBUG"], logged
    assert "the policy's release_memory()" in logged[0].getMessage()


class ReleaseWaits(Gated):
    """A gated policy whose ``release_memory()`` waits for ``release_gate``, and which notes a ``propose``
    made while a release is in progress."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.release_gate = threading.Event()
        self.releasing = threading.Event()
        self.stepped_while_releasing = False

    def release_memory(self) -> bool:
        self.releasing.set()
        assert self.release_gate.wait(20), "the test never let the release go"
        self.releasing.clear()
        return True

    def propose(self, particles: Particles, rng: Any) -> Any:
        if self.releasing.is_set():
            self.stepped_while_releasing = True
        return super().propose(particles, rng)


def test_stats_and_submit_do_not_wait_for_memory_being_given_back(models: tuple[Any, Any]) -> None:
    """While a worker gives memory back (a model's ``release_memory()`` in progress), ``stats()`` and
    ``submit()`` return at once (they waited for it: the engine's lock was held), and no step runs beside
    it: a request submitted meanwhile, with an idle worker to take it, waits until it is done, then is
    served."""
    policy, twist = models
    slow = ReleaseWaits(policy)
    with tiltsmc.Engine(slow, twist, workers=2, release_memory_after=0.05) as engine:
        engine.submit((), "smc", num_particles=4, rng=0).result(timeout=30)
        assert slow.releasing.wait(10)
        answered: list[Any] = []

        def ask() -> None:
            answered.append(engine.stats())
            answered.append(engine.submit((), "smc", num_particles=4, rng=1))

        asking = threading.Thread(target=ask)
        asking.start()
        try:
            asking.join(10)
            assert len(answered) == 2, "stats() or submit() waited for the release"
            time.sleep(0.2)
            assert not answered[1].done()  # no worker admits while the release runs
        finally:
            slow.release_gate.set()
            asking.join()
        served = answered[1].result(timeout=30)
    assert same_result(served, tiltsmc.smc(policy, twist, prompts=[()], num_particles=4, rng=1))
    assert not slow.stepped_while_releasing


def test_a_cancel_whose_done_callback_raises_a_base_exception_still_tells_the_waiters(
    models: tuple[Any, Any],
) -> None:
    """``future.cancel()`` runs the done-callbacks; where one raises ``KeyboardInterrupt`` it comes out
    of ``cancel()``, and the waiters of ``concurrent.futures.wait`` and ``as_completed`` are told all the
    same (the future stayed cancelled but not notified, and they waited for ever); the engine counts it
    cancelled and serves on."""
    policy, twist = models
    gated = Gated(policy)
    gated.gate.clear()
    with tiltsmc.Engine(gated, twist) as engine:
        holder = engine.submit((), "smc", num_particles=4, rng=0)
        assert gated.entered.wait(10)
        waiting = engine.submit((), "smc", num_particles=4, rng=1)

        def interrupt(_: Any) -> None:
            raise KeyboardInterrupt

        waiting.add_done_callback(interrupt)
        with pytest.raises(KeyboardInterrupt):
            waiting.cancel()
        assert waiting.cancelled()
        assert concurrent.futures.wait([waiting], timeout=5).done == {waiting}
        assert list(concurrent.futures.as_completed([waiting], timeout=5)) == [waiting]
        assert waiting.cancel()  # again: nothing more happens
        gated.gate.set()
        assert same_result(
            holder.result(timeout=30), tiltsmc.smc(policy, twist, prompts=[()], num_particles=4, rng=0)
        )
        assert engine.stats()["requests"]["cancelled"] == 1


def test_cancelled_waiting_requests_leave_their_places_in_the_queue_at_once(models: tuple[Any, Any]) -> None:
    """A full queue (``max_queue``) whose waiting requests are cancelled takes as many new ones at once,
    while the worker is still inside its step (they kept their places until its next step); ``stats()``
    counts them cancelled, no longer waiting, from the cancel on."""
    policy, twist = models
    gated = Gated(policy)
    gated.gate.clear()
    with tiltsmc.Engine(gated, twist, max_batch_rows=4, max_queue=2) as engine:
        holder = engine.submit((), "smc", num_particles=4, rng=0)
        assert gated.entered.wait(10)
        cancelled = [engine.submit((), "smc", num_particles=4, rng=k) for k in (1, 2)]
        with pytest.raises(Overloaded, match="max_queue = 2"):
            engine.submit((), "smc", num_particles=4, rng=3)
        assert all(future.cancel() for future in cancelled)
        stats = engine.stats()
        assert (stats["waiting"], stats["requests"]["cancelled"]) == (0, 2)
        later = [engine.submit((), "smc", num_particles=4, rng=k) for k in (3, 4)]
        with pytest.raises(Overloaded, match="2 requests are waiting"):
            engine.submit((), "smc", num_particles=4, rng=5)
        assert engine.stats()["waiting"] == 2
        gated.gate.set()
        results = [future.result(timeout=30) for future in (holder, *later)]
        stats = engine.stats()
    for result, seed in zip(results, (0, 3, 4)):
        assert same_result(result, tiltsmc.smc(policy, twist, prompts=[()], num_particles=4, rng=seed))
    assert stats["requests"] == {
        "submitted": 5,
        "completed": 3,
        "failed": 0,
        "cancelled": 2,
        "timed_out": 0,
        "closed": 0,
        "rejected": 2,
    }


def test_requests_cancelled_before_a_close_that_ends_them_count_as_cancelled(models: tuple[Any, Any]) -> None:
    """A close without draining ends the requests waiting and in flight with ``EngineClosed``, counted
    ``closed`` (they counted as failed, as the engine's own failures do); those their caller had cancelled
    (in flight, or waiting) count as ``cancelled``, as they would have at the next step (they counted as
    failed)."""
    policy, twist = models
    gated = Gated(policy)
    gated.gate.clear()
    engine = tiltsmc.Engine(gated, twist, max_batch_rows=8)
    in_flight = engine.submit((), "smc", num_particles=4, rng=0)
    assert gated.entered.wait(10)
    waiting = [engine.submit((), "smc", num_particles=4, rng=k) for k in (1, 2)]
    assert in_flight.cancel() and waiting[0].cancel()
    assert _close_as_the_gate_opens(engine, gated, drain=False) is True
    with pytest.raises(EngineClosed, match="closed before the request finished"):
        waiting[1].result(timeout=10)
    assert engine.stats()["requests"] == {
        "submitted": 3,
        "completed": 0,
        "failed": 0,
        "cancelled": 2,
        "timed_out": 0,
        "closed": 1,
        "rejected": 0,
    }


def test_a_request_cancelled_past_the_grace_period_counts_as_closed(models: tuple[Any, Any]) -> None:
    """Requests still in flight (inside a model call) or waiting when the close's grace period ends,
    cancelled then (as the HTTP server does, answering them 503 ``closed``), count as ``closed``, as those
    the engine ends at that point; those cancelled before the grace period ends are ``cancelled``. Counted
    ``cancelled`` before; and a waiting one counted ``cancelled`` while queued, then ``closed`` once taken
    out, took a counter down (Prometheus reads that as a reset): each count only ever grows."""
    policy, twist = models
    for cancel_late in (True, False):
        gated = Gated(policy)
        gated.gate.clear()
        engine = tiltsmc.Engine(gated, twist, max_batch_rows=4, adaptive_rows=False)
        in_flight = engine.submit((), "smc", num_particles=4, rng=0)
        assert gated.entered.wait(10)
        waiting = engine.submit((), "smc", num_particles=4, rng=1)  # no rows left: it waits
        grace = 0.05 if cancel_late else 60.0
        closer = threading.Thread(target=engine.close, kwargs={"drain": True, "timeout": grace})
        closer.start()
        time.sleep(grace + 0.1 if cancel_late else 0.1)  # past the grace period's end, or well inside it
        assert in_flight.cancel() and waiting.cancel()
        while_held = _counts_add_up(engine)
        gated.gate.set()  # the step in progress ends
        closer.join(30)
        assert not closer.is_alive()
        counts = _counts_add_up(engine)
        assert all(counts[outcome] >= while_held[outcome] for outcome in counts), (while_held, counts)
        assert (counts["closed"], counts["cancelled"]) == ((2, 0) if cancel_late else (0, 2)), counts


def _counts_add_up(engine: tiltsmc.Engine) -> dict[str, int]:
    """``stats()["requests"]``, checked to add up: ``submitted`` is the outcomes, ``waiting`` and
    ``in_flight``."""
    stats = engine.stats()
    counts: dict[str, int] = stats["requests"]
    ended = sum(counts[outcome] for outcome in ("completed", "failed", "cancelled", "timed_out", "closed"))
    assert counts["submitted"] == ended + stats["waiting"] + stats["in_flight"], stats
    return counts


def test_requests_cancelled_past_their_deadline_count_as_timed_out(models: tuple[Any, Any]) -> None:
    """A request whose future is cancelled at or past its deadline (the HTTP server's own 504, for a model
    call that overran it) counts as ``timed_out``, wherever the engine counts it: waiting (at once),
    taken out to make room in a full queue, in flight at the next step; one cancelled before its deadline
    still counts as ``cancelled`` (they all counted as cancelled, and the engine's timeouts missed every
    one the server answered)."""
    policy, twist = models
    gated = Gated(policy)
    gated.gate.clear()
    with tiltsmc.Engine(gated, twist, max_batch_rows=4, max_queue=2, adaptive_rows=False) as engine:
        in_flight = engine.submit((), "smc", num_particles=4, rng=0, timeout=0.2)
        assert gated.entered.wait(10)
        waiting = engine.submit((), "smc", num_particles=4, rng=1, timeout=0.2)
        early = engine.submit((), "smc", num_particles=4, rng=2, timeout=60)
        try:
            time.sleep(0.3)  # past the deadlines, the worker inside its step: the server's timer cancels them
            assert in_flight.cancel() and waiting.cancel() and early.cancel()
            counts = _counts_add_up(engine)
            assert (counts["timed_out"], counts["cancelled"]) == (1, 1)  # the waiting ones, at once
            later = engine.submit((), "smc", num_particles=4, rng=3)  # the two cancelled make room for it
            counts = _counts_add_up(engine)
            assert (counts["timed_out"], counts["cancelled"]) == (1, 1)
        finally:
            gated.gate.set()
        assert same_result(
            later.result(timeout=30), tiltsmc.smc(policy, twist, prompts=[()], num_particles=4, rng=3)
        )
        assert _wait_for(lambda: engine.stats()["in_flight"] == 0)
        assert _counts_add_up(engine) == {
            "submitted": 4,
            "completed": 1,
            "failed": 0,
            "cancelled": 1,
            "timed_out": 2,
            "closed": 0,
            "rejected": 0,
        }


class GatedFails(Gated):
    """A gated policy whose ``propose`` raises, once the gate opens, while ``fails`` is set."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.fails = threading.Event()

    def propose(self, particles: Particles, rng: Any) -> Any:
        proposed = super().propose(particles, rng)
        if self.fails.is_set():
            raise RuntimeError("session failed")
        return proposed


def test_requests_cancelled_past_their_deadline_count_as_timed_out_as_their_step_or_a_close_ends_them(
    models: tuple[Any, Any],
) -> None:
    """A request cancelled past its deadline during the step that ends it (here its model call failing)
    counts as ``timed_out``, as do those a close without draining ends (waiting and in flight); the
    waiting one counts so from its cancel on."""
    policy, twist = models
    gated = GatedFails(policy)
    gated.gate.clear()
    gated.fails.set()
    engine = tiltsmc.Engine(gated, twist, max_batch_rows=4, adaptive_rows=False)
    try:
        failing = engine.submit((), "smc", num_particles=4, rng=0, timeout=0.2)
        assert gated.entered.wait(10)
        time.sleep(0.3)
        assert failing.cancel()
        gated.gate.set()  # its step ends it with the model call's error: it was cancelled past its deadline
        assert _wait_for(lambda: engine.stats()["in_flight"] == 0)
        assert _counts_add_up(engine)["timed_out"] == 1

        gated.fails.clear()
        gated.gate.clear()
        gated.entered.clear()
        in_flight = engine.submit((), "smc", num_particles=4, rng=1, timeout=0.2)
        assert gated.entered.wait(10)
        waiting = engine.submit((), "smc", num_particles=4, rng=2, timeout=0.2)
        time.sleep(0.3)
        assert in_flight.cancel() and waiting.cancel()
        assert _counts_add_up(engine)["timed_out"] == 2
        assert _close_as_the_gate_opens(engine, gated, drain=False) is True
    finally:
        gated.gate.set()
        engine.close()
    assert _counts_add_up(engine) == {
        "submitted": 3,
        "completed": 0,
        "failed": 0,
        "cancelled": 0,
        "timed_out": 3,
        "closed": 0,
        "rejected": 0,
    }


def test_a_future_notes_when_a_cancel_cancelled_it(models: tuple[Any, Any]) -> None:
    """``cancelled_at`` is the time of the cancel that cancelled the future (on the deadlines' clock),
    kept by a later cancel; a cancel that cannot cancel (the request ended) notes nothing."""
    policy, twist = models
    gated = Gated(policy)
    gated.gate.clear()
    with tiltsmc.Engine(gated, twist) as engine:
        cancelled = engine.submit((), "smc", num_particles=4, rng=0)
        before = time.perf_counter()
        assert cancelled.cancel()
        at = getattr(cancelled, "cancelled_at", None)
        assert at is not None and before <= at <= time.perf_counter()
        assert cancelled.cancel() and getattr(cancelled, "cancelled_at", None) == at
        gated.gate.set()
        done = engine.submit((), "smc", num_particles=4, rng=1)
        done.result(timeout=30)
        assert not done.cancel() and getattr(done, "cancelled_at", 0.0) is None
