"""Benchmark of serving (issue #15): tiltsmc's engine against one ``tiltsmc.smc`` call per request, under
open-loop Poisson load over real HTTP on 127.0.0.1.

Two servers, each in its own process, loaded with the same models and sent the same requests:

* **engine**: ``tiltsmc serve`` (``--engine-server cli``, the default), whose requests join one running
  batch step by step: one policy and one reward session call per step for every request in flight. With
  ``--engine-server app``, ``bench/serve_baseline.py --engine`` instead (the same app as the baseline,
  its handler awaiting ``tiltsmc.Engine.generate``).
* **baseline**: ``bench/serve_baseline.py``, what a user writes today: a FastAPI ``def`` handler (run in
  FastAPI's thread pool) calling ``tiltsmc.smc`` on one shared model pair once per request.

Configurations: the demo's arithmetic policy and process reward model (``--models demo``, the main one)
and the test fixtures gpt2-tiny + prm-tiny (16 new tokens); requests of 4 and 16 particles; prompts are
arithmetic problems of the demo's horizon (T = 8 operations); request ``k`` has seed ``k``. Both servers'
sessions have ONNX Runtime's CPU memory arena on (``--memory-arena``, as ``tiltsmc serve``'s own default;
off, large batched calls were about half as fast).

For each configuration and particle count:

1. **Lone requests, in this process**: ``engine.submit(...).result()`` against a direct ``tiltsmc.smc``
   call, interleaved, on the same prompts and seeds (the bar: the engine's median within 10%). Then the
   engine at saturation in this process, with nothing beside it on the cores: ``--saturation-in-flight``
   (64) requests always in it, each answered one replaced at once, for ``--saturation-seconds`` (10);
   its share of a step, steps, rows and throughput from ``Engine.stats`` between a third of the way in
   and the end (printed beside the share bar; the bar itself is read over HTTP, step 5).
2. **Lone requests over HTTP** to each server (interleaved); the baseline's median ``L`` is the reference
   of the p99 target, ``p99 <= --target-factor x L`` (default 5x; one target for both systems), and
   sets the ladder of offered rates, ``--rates`` multiples of ``1 / L``.
3. **Load levels**: at each offered (nominal) rate, Poisson arrivals for ``--duration`` seconds (6),
   whatever the rate: a level's requests are not capped short of ``--level-cap`` (5000, a bound on the
   client's and the servers' memory and connections; a rate that would send more ends the ladders, and
   its sustained rates are then lower bounds). Every level of one particle count, both systems', ladder
   and refinement, scales one set of seeded standard exponential gaps to its rate (common random
   numbers): a higher rate's schedule is a lower one's compressed in time, with more arrivals, so the
   schedules rise with the nominal rate and both systems meet the same bursts; request ``k`` is the
   same at every level. Each request's send time is fixed in advance and never waits for earlier
   responses (open loop); its latency runs from that scheduled time to its response, so a client that
   falls behind counts against the server, not in its favour. Per level: the offered rate sent ((n - 1)
   / the window from its first scheduled send to its last), the completed rate ((responses - 1) / the
   time from the first response to the last: the same count over the responses), throughput (completed
   requests / time from the first scheduled send to the last response, for the rate-by-rate
   comparison), p50 / p90 / p99 latency over every request of the level (interpolated percentiles; no
   warm-up discarded: the servers are warm from untimed requests and the levels before, and a burst in
   the first second is load like any other), errors, and for the engine, from ``/metrics``, rows per
   policy call and tiltsmc's share of a step's time; for the baseline, the same from the responses'
   ``compute`` (each call's own time, which includes waiting for the GIL and the cores while other
   calls run). A level **passes** where it has no errors, p99 within the target and a completed rate of
   at least 0.95x the rate sent (it kept up; the idle start and the drain bias that ratio low by about
   (last response's latency - first's) / the window, 0 - 2% at 6 s). A system's ladder stops after two
   levels in a row failed (saturated).
4. **Sustained rate**: the highest nominal rate such that it and every lower level, ladder and
   refinement together, passed: the first failure ends it, and a pass above a failure does not count.
   Where no level failed it is a lower bound (``sustained_is_lower_bound``), and a ratio with a lower
   bound on one side is marked so (``>=``, ``<=``); a bar is then met or missed only where the bound
   settles it, else left open. The ladder's rungs are 25 - 100% apart, too coarse to compare two
   systems by: after it, each system's sustained rate is bisected (``--refine`` levels each, default 3,
   the systems in turn) between its ladder's first failure and the rate below it, at geometric middles:
   three levels narrow a rung to an eighth of its ratio. Near the knee a level's p99 depends on its
   bursts (a queue that builds up drains slowly when a step's cost grows with its rows), so the
   bisection locates the knee of this schedule, not a guaranteed rate. The offered rate sent at the
   sustained level is recorded beside the nominal one. ``--recompute FILE...`` runs nothing: it judges
   the levels recorded in results files, older versions' too, by these rules and prints the sustained
   rates and ratios beside the recorded ones (``recompute``).
5. **The engine at saturation over HTTP**: Poisson arrivals at ``--saturation-factor`` (1.5) times the
   most it completed (in any level, or in process at saturation: a ladder stopped by its p99 target can
   leave the engine far below its capacity), for ``--saturation-seconds``; its counters read a third of
   the way into the arrivals and at the last one, saturated where requests wait at both reads (the
   highest ladder level is not always: some runs' engine kept up there with a small batch). Then the
   requests still unanswered are abandoned, their connections closed (the server cancels them).

The load generator is aiohttp, each request on its own connection: httpx's ``AsyncClient`` took about
3 ms of CPU a request on the cores the servers share, and 15 ms with a few hundred in flight, against
about 1 ms (a scratch measurement on the 2-core Xeon VM, in ``bench/SERVING.md``).

The bars (issue #15), as ratios measured in this one run: the engine sustains >= 2x the baseline's rate
with 4-particle requests on the demo's models, >= 1.2x with 16; it is never below the baseline at any
offered load (throughput >= 0.95x and p99 <= 1.1x the baseline's at every rate both ran, margins for
noise); lone requests within 10% of a direct call; tiltsmc's share of a step at saturation (step 5's
window) <= 5%. Prints a table, writes ``bench/results/serve_<host>.json`` and a PNG of
latency against offered load. Not a test. The client runs on the same cores as the servers (the same
cost for both). On 2 cores a run took about 5 minutes with ``--models demo``, 3.5 with the fixtures,
while a level stopped at 120 requests (1 - 3 s at the engine's high rates); with every level lasting
``--duration``, expect a minute or two more (not yet timed).

    python bench/bench_serve.py                 # both configurations, 4 and 16 particles
    python bench/bench_serve.py --quick         # smoke run: demo, 4 particles, short levels
    python bench/bench_serve.py --recompute bench/results/serve_vm.json   # old results, these rules
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import gc
import itertools
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
from _machine import machine_info
from _plot import write_json

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CONFIGS: dict[str, dict[str, Any]] = {
    # max_tokens as each server's policy allows: the demo's policy ends each solution at EOS within 82
    "demo": {"label": "demo's arithmetic models", "max_tokens": 82},
    "fixtures": {"label": "fixtures gpt2-tiny + prm-tiny", "max_tokens": 16},
}
SYSTEMS = ("baseline", "engine")
NEVER_BELOW_MARGINS = {"throughput": 0.95, "p99": 1.10}
BOUND_WORDS = {
    "lower": "a lower bound (no engine level failed)",
    "upper": "an upper bound (no baseline level failed)",
    "unknown": "no level of either system failed",
}
KEEP_UP = 0.95  # a level passes only where its completed rate is at least this x the offered rate sent


# -- servers ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command(
    system: str,
    models: str,
    port: int,
    engine_server: str,
    arena: str,
    engine_options: Sequence[str] = (),
    baseline_options: Sequence[str] = (),
) -> list[str]:
    """The command line of a system's server; ``engine_options`` go to ``tiltsmc serve``,
    ``baseline_options`` to ``serve_baseline.py`` as the baseline."""
    common = ["--memory-arena", arena, "--host", "127.0.0.1", "--port", str(port)]
    if system == "baseline" or engine_server == "app":
        extra = ["--engine"] if system == "engine" else list(baseline_options)
        return [sys.executable, str(HERE / "serve_baseline.py"), "--models", models, *extra, *common]
    from serve_baseline import FIXTURE_MAX_NEW_TOKENS, FIXTURES

    entry = [sys.executable, "-m", "tiltsmc.cli", "serve"]
    common += engine_options
    if models == "demo":
        return [*entry, "--demo", *common]
    return [
        *entry,
        "--policy",
        str(FIXTURES / "gpt2-tiny"),
        "--reward",
        str(FIXTURES / "prm-tiny"),
        "--reward-kind",
        "logit",
        "--max-new-tokens",
        str(FIXTURE_MAX_NEW_TOKENS),
        *common,
    ]


class Server:
    """A server in a subprocess on 127.0.0.1, ready once ``GET /health`` answers 200; SIGTERM at exit."""

    def __init__(self, system: str, command: list[str], port: int, log_dir: Path) -> None:
        self.system, self.command, self.port = system, command, port
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{system}_{port}.log"
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.pid = 0
        self.started_seconds = 0.0

    def __enter__(self) -> Server:
        import httpx

        began = time.perf_counter()
        self._log = self.log_path.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=HERE.parent
        )
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.system} server exited at start:\n{self.log_tail()}")
            try:
                if httpx.get(self.base + "/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - began > 120:
                self.__exit__()
                raise RuntimeError(f"{self.system} server not ready after 120 s:\n{self.log_tail()}")
            time.sleep(0.2)
        self.started_seconds = time.perf_counter() - began
        self.pid = self.process.pid
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# -- the engine's figures -------------------------------------------------------------------------------


def engine_counters(base: str, engine_server: str) -> dict[str, float]:
    """Cumulative steps, policy calls, rows, step seconds by part and completed requests, and the requests
    waiting and in flight and the row limit now, from ``/metrics`` (``tiltsmc serve``) or ``/stats``
    (the bench app). Rows = mean rows per policy call x policy calls."""
    import httpx

    if engine_server == "app":
        return stats_counters(httpx.get(base + "/stats", timeout=10).json())
    samples = metrics_samples(base)
    steps = samples.get("tiltsmc_steps", 0.0)
    calls = samples.get("tiltsmc_policy_calls", steps)  # one policy call per step (one kind of sampler)
    return {
        "steps": steps,
        "policy_calls": calls,
        "rows": samples.get("tiltsmc_rows_per_policy_call", 0.0) * calls,
        "policy": samples.get("tiltsmc_step_seconds:policy", 0.0),
        "reward": samples.get("tiltsmc_step_seconds:reward", 0.0),
        "tiltsmc": samples.get("tiltsmc_step_seconds:tiltsmc", 0.0),
        "completed": samples.get("tiltsmc_requests:completed", 0.0),
        "waiting": samples.get("tiltsmc_queue_depth", 0.0),
        "in_flight": samples.get("tiltsmc_requests_in_flight", 0.0),
        "row_limit": samples.get("tiltsmc_row_limit", 0.0),
    }


def stats_counters(stats: dict[str, Any]) -> dict[str, float]:
    """``engine_counters`` from ``Engine.stats()`` (the bench app's ``/stats``, or an engine in this
    process)."""
    calls = float(stats["policy_calls"])
    return {
        "steps": float(stats["steps"]),
        "policy_calls": calls,
        "rows": stats["rows_per_policy_call"] * calls,
        "policy": stats["policy_seconds"],
        "reward": stats["reward_seconds"],
        "tiltsmc": stats["tiltsmc_seconds"],
        "completed": float(stats["requests"].get("completed", 0)),
        "waiting": float(stats["waiting"]),
        "in_flight": float(stats["in_flight"]),
        "row_limit": float(stats["row_limit"]),
    }


def metrics_samples(base: str) -> dict[str, float]:
    """Every sample of ``tiltsmc serve``'s ``/metrics``: by name (a counter's without ``_total``), then
    its labels' values after a colon (``tiltsmc_step_seconds:policy``, ``tiltsmc_requests:completed``)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base + "/metrics", timeout=10).text
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removesuffix("_total")
            labels = ",".join(sample.labels.values())
            samples[f"{name}:{labels}" if labels else name] = float(sample.value)
    return samples


def engine_level_figures(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    d = {key: after[key] - before[key] for key in after}
    step_seconds = d["policy"] + d["reward"] + d["tiltsmc"]
    return {
        "steps": round(d["steps"]),
        "rows_per_policy_call": d["rows"] / d["policy_calls"] if d["policy_calls"] > 0 else None,
        "ms_per_step": 1e3 * step_seconds / d["steps"] if d["steps"] > 0 else None,
        "tiltsmc_share": d["tiltsmc"] / step_seconds if step_seconds > 0 else None,
        "policy_seconds": d["policy"],
        "reward_seconds": d["reward"],
        "tiltsmc_seconds": d["tiltsmc"],
    }


def baseline_level_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    computes = [r["compute"] for r in records if r.get("compute")]
    calls = sum(c["policy_calls"] for c in computes)
    total = sum(c["total_seconds"] for c in computes)
    return {
        "rows_per_policy_call": sum(c["policy_steps"] for c in computes) / calls if calls else None,
        "tiltsmc_share": sum(c["bookkeeping_seconds"] for c in computes) / total if total else None,
    }


# -- the load generator ---------------------------------------------------------------------------------


def poisson_offsets(
    rate: float, seconds: float, fewest: int, most: int, rng: np.random.Generator
) -> np.ndarray:
    """Poisson arrival times (seconds from the start, the first at once): those within ``seconds``, at
    least ``fewest`` (the window then runs longer) and at most ``most``. (The schedules of
    ``bench_overload.py``, ``bench_serve_threads.py`` and ``bench_cold_start.py``, and of this script's
    saturation reading; its load levels use ``unit_gaps`` and ``level_offsets``.)"""
    gaps = rng.exponential(1.0 / rate, size=most)
    offsets = np.cumsum(gaps) - gaps[0]
    count = int(np.searchsorted(offsets, seconds))
    return offsets[: min(max(count, fewest), most)]


def arrival_offsets(rate: float, args: argparse.Namespace, rng: np.random.Generator) -> np.ndarray:
    """A level of ``bench_overload.py`` or ``bench_serve_threads.py`` (``poisson_offsets``): within
    ``--duration``, at least ``--min-requests`` and at most ``--max-requests``."""
    return poisson_offsets(rate, args.duration, args.min_requests, args.max_requests, rng)


def unit_gaps(seed: int, particles: int, cap: int) -> np.ndarray:
    """The standard exponential gaps (mean 1) that every load level of one particle count shares, both
    systems', ladder and refinement alike (common random numbers): ``level_offsets`` scales them to a
    level's rate, so a higher rate's schedule is the lower one's compressed in time, with more arrivals.
    ``cap`` (``--level-cap``) of them: the most arrivals a level can have (a bound on the client's and
    the servers' memory, not a level's length)."""
    return np.random.default_rng([seed, particles, 3000]).standard_exponential(cap)


def level_offsets(rate: float, seconds: float, gaps: np.ndarray) -> tuple[np.ndarray, bool]:
    """A level's arrival times at ``rate`` (Poisson): ``gaps`` / ``rate`` added up, the first at once,
    those before ``seconds`` (the same arrival window at every rate). Also whether ``gaps`` ran out
    first (the level would need more than ``--level-cap`` arrivals: it is then not run)."""
    offsets = (np.cumsum(gaps) - gaps[0]) / rate
    count = int(np.searchsorted(offsets, seconds))
    return offsets[: max(count, 1)], count >= len(gaps)


def request_body(prompt: str, seed: int, particles: int, models: str) -> dict[str, Any]:
    return {
        "model": "tiltsmc",
        "prompt": prompt,
        "max_tokens": CONFIGS[models]["max_tokens"],
        "seed": seed,
        "sampler": "smc",
        "particles": particles,
    }


async def _send(
    bodies: list[dict[str, Any]],
    offsets: np.ndarray,
    base: str,
    timeout: float,
    during: Optional[Callable[[float], Awaitable[Any]]] = None,
) -> tuple[list[dict[str, Any]], float, Any]:
    """Each request sent at its scheduled time on its own connection (aiohttp: httpx's ``AsyncClient``
    took about 3 ms of this process's CPU a request here, and 15 ms past a few hundred in flight, on the
    cores the servers use; encode/httpx#3215). With ``during``, ``during(start)`` runs beside the sends
    (``start`` on the event loop's clock); once it returns, requests still unanswered are abandoned (their
    connections closed: the server cancels them) and recorded as such. Returns the records, ``start``
    and what ``during`` returned."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)  # as many connections as requests in flight
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(base_url=base, connector=connector, timeout=client_timeout) as client:
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.05

        async def one(body: dict[str, Any], offset: float) -> dict[str, Any]:
            scheduled = start + offset
            record: dict[str, Any] = {}
            try:
                await asyncio.sleep(max(scheduled - loop.time(), 0.0))
                record["send_lag"] = loop.time() - scheduled
                async with client.post("/v1/completions", json=body) as response:
                    record["status"] = response.status
                    if response.status == 200:
                        answer = await response.json()
                        record["compute"] = answer["tiltsmc"]["choices"][0].get("compute")
                    else:
                        record["error"] = (await response.text())[:300]
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                record["status"], record["error"] = type(error).__name__, str(error)[:300]
            except asyncio.CancelledError:
                record["status"] = record["error"] = "abandoned"
            record["done"] = loop.time() - start
            record["latency"] = loop.time() - scheduled
            return record

        tasks = [asyncio.ensure_future(one(b, float(o))) for b, o in zip(bodies, offsets)]
        returned = None
        if during is not None:
            returned = await during(start)
            for task in tasks:
                task.cancel()
        records = await asyncio.gather(*tasks)
    return list(records), start, returned


def run_level(
    bodies: list[dict[str, Any]], offsets: np.ndarray, base: str, timeout: float
) -> list[dict[str, Any]]:
    records, _, _ = asyncio.run(_send(bodies, offsets, base, timeout))
    return records


def summarise(records: list[dict[str, Any]], offsets: np.ndarray, rate: float) -> dict[str, Any]:
    ok = [r for r in records if r["status"] == 200]
    failed = [r for r in records if r["status"] != 200]
    latencies = np.array([r["latency"] for r in ok])
    last = max((r["done"] for r in ok), default=float("nan"))
    window = float(offsets[-1] - offsets[0]) if len(offsets) else 0.0
    out: dict[str, Any] = {
        "offered_rate": rate,
        "requests": len(records),
        "arrival_window_seconds": window,
        # the schedule actually sent (the nominal rate's Poisson draw): (n - 1) / its window
        "offered_rate_sent": (len(offsets) - 1) / window if window > 0 else float("nan"),
        "completed": len(ok),
        "errors": len(records) - len(ok),
        "error_examples": sorted({f"{r['status']}: {r.get('error', '')[:120]}" for r in failed})[:3],
        "throughput": len(ok) / last if ok and last > 0 else 0.0,
        "completed_rate": completed_rate([r["done"] for r in ok]),
        "max_send_lag_seconds": max(r["send_lag"] for r in records),
    }
    for q in (50, 90, 99):
        out[f"p{q}"] = float(np.percentile(latencies, q)) if len(ok) else float("inf")
    out["mean"] = float(latencies.mean()) if len(ok) else float("inf")
    out["latencies"] = [round(float(x), 4) for x in latencies]
    return out


def completed_rate(done: Sequence[float]) -> float:
    """Responses per second as the offered rate is counted over the arrivals: (responses - 1) / the time
    from the first response to the last (nan with fewer than two). A server that keeps up answers at
    the rate it is sent; the idle start and the drain after the last arrival shift both ends of the
    window by a latency, and bias it low by about (the last response's latency - the first's) / the
    arrival window (0 - 2% in the committed runs' 6 s levels); one that falls behind answers at its
    capacity."""
    if len(done) < 2 or max(done) <= min(done):
        return float("nan")
    return (len(done) - 1) / (max(done) - min(done))


def judge(level: dict[str, Any], target_seconds: float) -> dict[str, Any]:
    """A level's verdict, in place: ``within_target`` (no errors and p99 <= the target), ``keeps_up``
    (completed rate >= ``KEEP_UP`` x the offered rate sent) and ``passed`` (both)."""
    level["within_target"] = bool(level["errors"] == 0 and level["p99"] <= target_seconds)
    sent, done = level["offered_rate_sent"], level["completed_rate"]
    if math.isfinite(sent) and math.isfinite(done):
        level["keeps_up"] = bool(done >= KEEP_UP * sent)
    else:  # one request, or one answered: no rate to compare
        level["keeps_up"] = level["completed"] == level["requests"]
    level["passed"] = level["within_target"] and level["keeps_up"]
    return level


def lone_over_http(base: str, bodies: list[dict[str, Any]]) -> list[float]:
    """Latencies of requests sent one at a time."""
    import httpx

    latencies = []
    with httpx.Client(base_url=base, timeout=120) as client:
        for body in bodies:
            began = time.perf_counter()
            response = client.post("/v1/completions", json=body)
            elapsed = time.perf_counter() - began
            if response.status_code != 200:
                raise RuntimeError(f"lone request failed: {response.status_code} {response.text[:300]}")
            latencies.append(elapsed)
    return latencies


# -- the parts of a run ---------------------------------------------------------------------------------


def lone_in_process(
    models: str,
    prompts: list[str],
    particles_list: list[int],
    repeats: int,
    memory_arena: bool,
    in_flight: int = 64,
    saturation_seconds: float = 0.0,
) -> dict[int, Any]:
    """Per particle count: the engine with one request in flight against a direct ``tiltsmc.smc`` call,
    interleaved (after one untimed call of each), same prompts and seeds; and whether they agree bitwise.
    With ``saturation_seconds``, then the engine at saturation in this process (``saturation_in_process``,
    ``in_flight`` requests)."""
    import tiltsmc
    from serve_baseline import load_models

    policy, reward = load_models(models, memory_arena=memory_arena)
    max_new_tokens = CONFIGS[models]["max_tokens"]  # as the requests over HTTP ask
    out = {}
    with tiltsmc.Engine(policy, reward) as engine:
        for particles in particles_list:
            direct, engine_times, identical = [], [], 0
            for k in range(repeats + 1):
                options = {"num_particles": particles, "rng": k, "max_new_tokens": max_new_tokens}
                first_direct = k % 2 == 0
                for order in (0, 1):
                    began = time.perf_counter()
                    if (order == 0) == first_direct:
                        alone = tiltsmc.smc(policy, reward, prompts=[prompts[k]], **options)
                        seconds, target = time.perf_counter() - began, direct
                    else:
                        served = engine.submit(prompts[k], "smc", **options).result()
                        seconds, target = time.perf_counter() - began, engine_times
                    if k > 0:
                        target.append(seconds)
                if k > 0:
                    identical += bool(np.array_equal(alone.log_z, served.log_z))
            out[particles] = {
                "direct_seconds": direct,
                "engine_seconds": engine_times,
                "direct_median": float(np.median(direct)),
                "engine_median": float(np.median(engine_times)),
                "engine_over_direct": float(np.median(engine_times) / np.median(direct)),
                # each repeat's two calls ran back to back: their ratio does not see the host's speed drift
                # from repeat to repeat (a second reading, not the bar's)
                "engine_over_direct_paired": float(np.median(np.divide(engine_times, direct))),
                "identical_log_z": f"{identical}/{repeats}",
            }
        if saturation_seconds > 0:  # built as tiltsmc serve builds it (freed memory kept for reuse)
            with tiltsmc.Engine(policy, reward, keep_freed_memory=True) as engine:
                for particles in particles_list:
                    out[particles]["saturation"] = saturation_in_process(
                        engine, prompts, particles, in_flight, saturation_seconds, max_new_tokens
                    )
    del policy, reward, engine
    gc.collect()
    return out


def saturation_in_process(
    engine: Any, prompts: list[str], particles: int, in_flight: int, seconds: float, max_new_tokens: int
) -> dict[str, Any]:
    """The engine at saturation with nothing beside it: ``in_flight`` requests always in it (each one
    answered replaced at once, from this process: no HTTP layer, no load generator on its cores), for
    ``seconds``; its figures (``Engine.stats``) between a third of the way in (the batch grown) and the
    end."""
    sent = itertools.count()

    def submit() -> Any:
        k = next(sent)
        prompt = prompts[k % len(prompts)]
        return engine.submit(prompt, "smc", num_particles=particles, rng=k, max_new_tokens=max_new_tokens)

    began = time.perf_counter()
    pending = {submit() for _ in range(in_flight)}
    first: Optional[tuple[dict[str, float], int, float]] = None
    completed = 0
    while time.perf_counter() - began < seconds:
        if first is None and time.perf_counter() - began >= seconds / 3:
            first = (stats_counters(engine.stats()), completed, time.perf_counter())
        done, pending = concurrent.futures.wait(pending, timeout=0.05, return_when="FIRST_COMPLETED")
        for future in done:
            future.result()  # a failure is the benchmark's
        completed += len(done)
        pending |= {submit() for _ in done}
    last, ended = stats_counters(engine.stats()), time.perf_counter()
    for future in pending:
        future.cancel()
    concurrent.futures.wait(pending)
    assert first is not None
    before, completed_before, started = first
    return {
        "in_flight": in_flight,
        "window_seconds": ended - started,
        "throughput": (completed - completed_before) / (ended - started),
        **engine_level_figures(before, last),
    }


def saturation_over_http(
    server: Server,
    particles: int,
    models: str,
    prompts: list[str],
    rate: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The engine at saturation over HTTP: Poisson arrivals at ``rate`` (above what it completes) for
    ``--saturation-seconds``; its figures from two reads of its counters, a third of the way into the
    arrivals (the queue built up) and at the last arrival. ``saturated``: requests waiting at both
    reads, so the engine had work for every step between them. Then the requests still unanswered
    are abandoned (the server cancels them) and the server left to empty."""
    rng = np.random.default_rng([args.seed, particles, 2000])
    most = int(2 * rate * args.saturation_seconds) + 10  # room for twice the expected arrivals
    offsets = poisson_offsets(rate, args.saturation_seconds, 2, most, rng)
    bodies = [request_body(prompts[k % len(prompts)], k, particles, models) for k in range(len(offsets))]

    async def reads(start: float) -> list[tuple[dict[str, float], float]]:
        loop, out = asyncio.get_running_loop(), []
        for at in (offsets[-1] / 3, offsets[-1]):
            await asyncio.sleep(max(start + at - loop.time(), 0.0))
            counters = await asyncio.to_thread(engine_counters, server.base, args.engine_server)
            out.append((counters, loop.time()))
        return out

    records, _, window = asyncio.run(_send(bodies, offsets, server.base, args.request_timeout, reads))
    (before, began), (after, ended) = window
    idle_by = time.perf_counter() + args.request_timeout
    while True:  # the abandoned requests leave at the engine's next step
        now = engine_counters(server.base, args.engine_server)
        if now["waiting"] + now["in_flight"] == 0 or time.perf_counter() > idle_by:
            break
        time.sleep(0.2)
    answered = [r for r in records if r["status"] == 200]
    out = {
        "offered_rate": rate,
        "arrival_seconds": float(offsets[-1]),
        "requests": len(records),
        "answered": len(answered),
        "errors": sum(r["status"] not in (200, "abandoned") for r in records),
        "window_seconds": ended - began,
        "throughput": (after["completed"] - before["completed"]) / (ended - began),
        "waiting_at_reads": [before["waiting"], after["waiting"]],
        "in_flight_at_reads": [before["in_flight"], after["in_flight"]],
        "row_limit_at_reads": [before["row_limit"], after["row_limit"]],  # the engine's learned batch size
        "saturated": before["waiting"] > 0 and after["waiting"] > 0,
        "idle_after": now["waiting"] + now["in_flight"] == 0,
        **engine_level_figures(before, after),
    }
    share = out["tiltsmc_share"]
    print(
        f"    engine   {particles:>2}p saturation over HTTP, {rate:.2f} req/s offered: "
        f"{out['throughput']:.2f} req/s done, {out['steps']} steps of {fmt(out['ms_per_step'], '.1f')} ms, "
        f"{fmt(out['rows_per_policy_call'], '.1f')} rows/call, tiltsmc "
        f"{fmt(None if share is None else 100 * share, '.1f')}%, waiting {before['waiting']:.0f} -> "
        f"{after['waiting']:.0f}, row limit {before['row_limit']:.0f} -> {after['row_limit']:.0f}"
        + ("" if out["saturated"] else "  (not saturated)"),
        flush=True,
    )
    time.sleep(args.pause)
    return out


def run_config(
    models: str,
    args: argparse.Namespace,
    prompts: list[str],
    plans: dict[int, dict[str, Any]],
    log_dir: Path,
) -> dict[str, dict[int, dict[str, Any]]]:
    """Both servers of a configuration, up together; for each particle count the lone requests, then
    the ladder of rates. The systems take turns (lone requests interleaved, levels in alternating order)
    so that a slower hour on the shared machine weighs on both alike."""
    out: dict[str, dict[int, dict[str, Any]]] = {system: {} for system in SYSTEMS}
    engine_options = ["--workers", str(args.engine_workers)] if args.engine_workers != 1 else []
    if args.engine_threads is not None:
        engine_options += ["--threads", str(args.engine_threads)]
    threads = args.baseline_threads
    baseline_options = [] if threads is None else ["--threads", str(threads)]
    with contextlib.ExitStack() as stack:
        servers = {}
        for system in SYSTEMS:
            port = free_port()
            command = server_command(
                system, models, port, args.engine_server, args.memory_arena, engine_options, baseline_options
            )
            servers[system] = stack.enter_context(Server(system, command, port, log_dir))
            ready = servers[system].started_seconds
            print(f"  {system}: {' '.join(command[1:])} (ready in {ready:.1f} s)", flush=True)
        for particles, plan in plans.items():
            warmup = [request_body(prompts[0], 0, particles, models)] * 2
            for system in SYSTEMS:
                lone_over_http(servers[system].base, warmup)  # untimed: first calls at these shapes
            lone: dict[str, list[float]] = {system: [] for system in SYSTEMS}
            for k in range(1, args.lone_repeats + 1):  # the prompts and seeds of lone_in_process
                order = SYSTEMS if k % 2 else SYSTEMS[::-1]
                for system in order:
                    body = request_body(prompts[k], k, particles, models)
                    lone[system] += lone_over_http(servers[system].base, [body])
            for system in SYSTEMS:
                out[system][particles] = {
                    "lone_http_seconds": lone[system],
                    "lone_http_median": float(np.median(lone[system])),
                    "levels": [],
                    "refined": [],
                }
            reference = out["baseline"][particles]["lone_http_median"]
            plan["target_seconds"] = args.target_factor * reference
            plan["rates"] = [round(m / reference, 2) for m in plan["multipliers"]]
            print(
                f"  {particles} particles, lone over HTTP: baseline {1e3 * reference:.1f} ms, engine "
                f"{1e3 * out['engine'][particles]['lone_http_median']:.1f} ms; target "
                f"{plan['target_seconds']:.3f} s; rates {plan['rates']}",
                flush=True,
            )

            # one set of arrival gaps for every level of these requests, scaled to each level's rate
            gaps = unit_gaps(args.seed, particles, args.level_cap)
            fails = dict.fromkeys(SYSTEMS, 0)
            for index, rate in enumerate(plan["rates"]):
                offsets, capped = level_offsets(rate, args.duration, gaps)
                if capped:  # a level's length never shrinks to fit the cap: the ladder ends here
                    print(
                        f"    {rate:.2f} req/s would send more than --level-cap {args.level_cap} requests "
                        f"in {args.duration:g} s: the ladders end here",
                        flush=True,
                    )
                    for system in SYSTEMS:
                        out[system][particles]["ladder_capped_at"] = rate
                    break
                for system in SYSTEMS if index % 2 == 0 else SYSTEMS[::-1]:
                    if fails[system] >= 2:
                        continue
                    level = judged_level(  # the same schedule for both systems
                        servers[system], rate, offsets, particles, models, prompts, plan, args
                    )
                    fails[system] = 0 if level["passed"] else fails[system] + 1
                    out[system][particles]["levels"].append(level)
                if min(fails.values()) >= 2:
                    break
            # each system's sustained rate between its last pass below its first failure and that failure:
            # bisection, the systems in turn
            spans = {system: bracket(out[system][particles]["levels"]) for system in SYSTEMS}
            for step in range(args.refine):
                for system in SYSTEMS if step % 2 == 0 else SYSTEMS[::-1]:
                    span = spans[system]
                    if span is None:
                        continue
                    low, high = span
                    rate = round(math.sqrt(low * high), 2)  # the rungs are ratios apart: a geometric middle
                    if not low < rate < high:
                        continue
                    offsets, _ = level_offsets(rate, args.duration, gaps)  # fewer than at ``high``
                    level = judged_level(
                        servers[system], rate, offsets, particles, models, prompts, plan, args
                    )
                    level["refinement"] = step + 1
                    out[system][particles]["refined"].append(level)
                    spans[system] = (rate, high) if level["passed"] else (low, rate)
            engine_levels = out["engine"][particles]["levels"] + out["engine"][particles]["refined"]
            if args.saturation_seconds > 0 and engine_levels:
                # offered past the most the engine completed, in a level or in process at saturation (a
                # ladder that stopped at its p99 target can have left the engine far from its capacity)
                most = max([lv["throughput"] for lv in engine_levels] + [plan["in_process_throughput"]])
                rate = round(args.saturation_factor * most, 2)
                out["engine"][particles]["saturation"] = saturation_over_http(
                    servers["engine"], particles, models, prompts, rate, args
                )
    return out


def judged_level(
    server: Server,
    rate: float,
    offsets: np.ndarray,
    particles: int,
    models: str,
    prompts: list[str],
    plan: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One load level on ``server`` (arrivals at ``offsets``, request ``k`` the same at every level),
    judged (``judge``)."""
    bodies = [request_body(prompts[k], k, particles, models) for k in range(len(offsets))]
    level = run_one_level(server.system, server.base, server.pid, bodies, offsets, rate, args)
    judge(level, plan["target_seconds"])
    print("    " + level_line(server.system, particles, level), flush=True)
    time.sleep(args.pause)
    return level


def bracket(levels: list[dict[str, Any]]) -> Optional[tuple[float, float]]:
    """The ladder's first failed rate and the rate run below it (passed), between which the sustained
    rate lies: the bisection refines there and nowhere else (a pass above a failure does not count).
    None when no level failed (the sustained rate is then a lower bound) or the lowest rate failed."""
    ordered = sorted(levels, key=lambda lv: lv["offered_rate"])
    for index, level in enumerate(ordered):
        if not level["passed"]:
            return (ordered[index - 1]["offered_rate"], level["offered_rate"]) if index else None
    return None


def process_counters(pid: int) -> tuple[float, float]:
    """User + system CPU seconds of a process so far, and its page faults (minor + major): Linux /proc;
    nan elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan"), float("nan")
    cpu_seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return cpu_seconds, float(int(fields[7]) + int(fields[9]))


def run_one_level(
    system: str,
    base: str,
    pid: int,
    bodies: list[dict[str, Any]],
    offsets: np.ndarray,
    rate: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    before = engine_counters(base, args.engine_server) if system == "engine" else None
    (server_cpu, faults), client_cpu, wall = process_counters(pid), time.process_time(), time.perf_counter()
    records = run_level(bodies, offsets, base, args.request_timeout)
    wall = time.perf_counter() - wall
    level = summarise(records, offsets, rate)
    # cores busy over the level: the server process (all its threads) and this client
    server_cpu_after, faults_after = process_counters(pid)
    level["server_cpu_cores"] = (server_cpu_after - server_cpu) / wall
    # pages the server touched for the first time (or again, after giving them back): a level that takes
    # it to a new memory peak pays for the growth
    level["server_page_faults"] = faults_after - faults
    level["client_cpu_cores"] = (time.process_time() - client_cpu) / wall
    level["loadavg_1min_after"] = os.getloadavg()[0]  # the machine is shared: how busy it was
    if before is not None:
        level.update(engine_level_figures(before, engine_counters(base, args.engine_server)))
    else:
        level.update(baseline_level_figures(records))
    return level


def level_line(system: str, particles: int, level: dict[str, Any]) -> str:
    share = level.get("tiltsmc_share")
    rows = level.get("rows_per_policy_call")
    return (
        f"{system:<8} {particles:>2}p {level['offered_rate']:6.2f} req/s: {level['completed']:>3}/"
        f"{level['requests']:<3} done, {level['throughput']:6.2f} req/s, p50 {level['p50']:6.3f} "
        f"p90 {level['p90']:6.3f} p99 {level['p99']:6.3f} s"
        + (f", {rows:5.1f} rows/call" if rows is not None else "")
        + (f", tiltsmc {100 * share:4.1f}%" if share is not None else "")
        + f", cores: server {level['server_cpu_cores']:.2f} client {level['client_cpu_cores']:.2f}"
        + f", faults {level['server_page_faults']:.0f}"
        + verdict_mark(level)
    )


def verdict_mark(level: dict[str, Any]) -> str:
    """Why a level failed, in a few words (empty where it passed, or where nothing judged it)."""
    marks = [] if level["within_target"] else ["over target"]
    if not level.get("keeps_up", True):
        marks.append(
            f"fell behind: {level['completed_rate']:.2f} done of {level['offered_rate_sent']:.2f} sent req/s"
        )
    return f"  ({'; '.join(marks)})" if marks else ""


def sustained_level(
    levels: list[dict[str, Any]],
) -> tuple[Optional[dict[str, Any]], bool, Optional[dict[str, Any]]]:
    """The sustained level: the highest such that it and every level below it (by nominal rate, ladder
    and refinement together) passed (``judge``); the first failure ends the search, whatever passed
    above it. Returns it (None if the lowest level failed), whether its rate is only a lower bound (no
    level failed: the system was not taken to its limit), and the first failed level."""
    best = None
    for level in sorted(levels, key=lambda lv: lv["offered_rate"]):
        if not level["passed"]:
            return best, False, level
        best = level
    return best, best is not None, None


def sustained(levels: list[dict[str, Any]]) -> float:
    """The sustained rate (``sustained_level``'s nominal rate; 0.0 if the lowest level failed)."""
    return float(sustained_summary(levels)["sustained_rate"])


def sustained_summary(levels: list[dict[str, Any]]) -> dict[str, Any]:
    """``sustained_level`` as the JSON records it: the nominal rate, the rate its schedule sent, whether
    it is a lower bound, and the first failure's nominal rate."""
    best, lower_bound, failure = sustained_level(levels)
    return {
        "sustained_rate": best["offered_rate"] if best else 0.0,
        "sustained_offered_rate_sent": best["offered_rate_sent"] if best else 0.0,
        "sustained_is_lower_bound": lower_bound,
        "first_failure_rate": failure["offered_rate"] if failure else None,
    }


def sustained_ratio(engine: dict[str, Any], baseline: dict[str, Any]) -> tuple[Optional[float], str]:
    """Engine / baseline sustained rates (``sustained_summary``s) and what the ratio is: ``exact``,
    ``lower`` (a lower bound: the engine's rate is one), ``upper`` (the baseline's is) or ``unknown``
    (both are)."""
    e, b = engine["sustained_rate"], baseline["sustained_rate"]
    ratio = e / b if b > 0 else (None if e == 0 else float("inf"))
    lower_e, lower_b = engine["sustained_is_lower_bound"], baseline["sustained_is_lower_bound"]
    bound = "unknown" if lower_e and lower_b else "lower" if lower_e else "upper" if lower_b else "exact"
    return ratio, bound


def ratio_text(ratio: Optional[float], bound: str) -> str:
    """A ratio with its kind: ``>= 4.52x`` for a lower bound, ``<= 0.80x`` an upper, ``?`` unknown."""
    sign = {"exact": "", "lower": ">= ", "upper": "<= ", "unknown": "? "}[bound]
    if ratio is not None and math.isinf(ratio):
        return f"{sign}inf (the baseline's sustained rate 0)"
    return f"{sign}{fmt(ratio, '.2f')}x"


def ratio_verdict(ratio: Optional[float], bound: str, bar: float) -> Optional[bool]:
    """Whether a sustained ratio meets ``bar``: None (undecided) where one side's rate is a lower bound
    and the ratio's bound points away from the verdict (a lower bound under the bar, an upper bound
    over it, or both rates lower bounds)."""
    if ratio is None:
        return False
    if ratio >= bar:
        return True if bound in ("exact", "lower") else None
    return False if bound in ("exact", "upper") else None


def compare(baseline: dict[str, Any], engine: dict[str, Any]) -> dict[str, Any]:
    """Per offered rate both ran: engine / baseline; and whether the engine is never below the baseline."""
    by_rate_b = {lv["offered_rate"]: lv for lv in baseline["levels"]}
    by_rate_e = {lv["offered_rate"]: lv for lv in engine["levels"]}
    rows, never_below = [], True
    for rate in sorted(set(by_rate_b) | set(by_rate_e)):
        b, e = by_rate_b.get(rate), by_rate_e.get(rate)
        row: dict[str, Any] = {"offered_rate": rate}
        if b is not None and e is not None:
            row["throughput"] = e["throughput"] / b["throughput"] if b["throughput"] else float("inf")
            row["p50"] = e["p50"] / b["p50"]
            row["p99"] = e["p99"] / b["p99"]
            row["engine_not_below"] = bool(
                e["errors"] <= b["errors"]
                and row["throughput"] >= NEVER_BELOW_MARGINS["throughput"]
                and row["p99"] <= NEVER_BELOW_MARGINS["p99"]
            )
        else:
            # only one system ran this rate: the other had stopped, saturated, two levels before
            row["engine_not_below"] = e is not None
        never_below &= row["engine_not_below"]
        rows.append(row)
    return {"by_rate": rows, "never_below": never_below}


def saturation_text(saturation: Optional[dict[str, Any]]) -> str:
    """``saturation_in_process``'s figures in a few words (empty where it did not run)."""
    if saturation is None:
        return ""
    share = saturation["tiltsmc_share"]
    return (
        f"; in process, {saturation['in_flight']} requests always in flight: "
        f"{fmt(None if share is None else 100 * share, '.1f')}% tiltsmc ({saturation['steps']:.0f} steps of "
        f"{fmt(saturation['ms_per_step'], '.1f')} ms, "
        f"{fmt(saturation['rows_per_policy_call'], '.1f')} rows a call, {saturation['throughput']:.1f} req/s)"
    )


def fmt(value: Optional[float], spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-".rjust(len(format(0.0, spec)))
    return format(value, spec)


def print_table(result: dict[str, Any]) -> None:
    for block in result["runs"]:
        models, particles = block["models"], block["particles"]
        lone = block["lone_in_process"]
        print(
            f"\n{CONFIGS[models]['label']}, {particles} particles per request, T = {block['horizon']}: "
            f"lone request in-process: direct smc {1e3 * lone['direct_median']:.1f} ms, engine "
            f"{1e3 * lone['engine_median']:.1f} ms ({lone['engine_over_direct']:.3f}x; per pair "
            f"{lone['engine_over_direct_paired']:.3f}x); over HTTP: "
            f"baseline {1e3 * block['baseline']['lone_http_median']:.1f} ms, engine "
            f"{1e3 * block['engine']['lone_http_median']:.1f} ms; p99 target {block['target_seconds']:.3f} s"
        )
        columns = f"{'done':>9} {'err':>3} {'req/s':>6} {'p50':>6} {'p90':>6} {'p99':>7} "
        columns += f"{'rows':>5} {'tsmc':>5} {'cpu':>4}"
        print(
            f"{'':>8} {'':>7} | {'baseline':<{len(columns)}} | {'engine':<{len(columns)}} | engine/baseline"
        )
        print(f"{'offered':>8} {'sent':>7} | {columns} | {columns} | {'req/s':>6} {'p50':>5} {'p99':>5}")
        b_levels = {lv["offered_rate"]: lv for lv in block["baseline"]["levels"]}
        e_levels = {lv["offered_rate"]: lv for lv in block["engine"]["levels"]}
        for row in block["comparison"]["by_rate"]:
            rate = row["offered_rate"]
            sent = (b_levels.get(rate) or e_levels.get(rate) or {}).get("offered_rate_sent")
            cells = [f"{rate:8.2f} {fmt(sent, '7.2f')}"]  # the same schedule for both systems
            for lv in (b_levels.get(rate), e_levels.get(rate)):
                if lv is None:
                    cells.append(f"{'(saturated before: not run)':<{len(columns)}}")
                    continue
                share = lv.get("tiltsmc_share")
                cells.append(
                    f"{lv['completed']:>4}/{lv['requests']:<4} {lv['errors']:>3} {lv['throughput']:6.2f} "
                    f"{lv['p50']:6.3f} {lv['p90']:6.3f} {lv['p99']:6.3f}{'' if lv['passed'] else '*'} "
                    f"{fmt(lv.get('rows_per_policy_call'), '5.1f')} "
                    f"{fmt(None if share is None else 100 * share, '4.1f')}% "
                    f"{fmt(lv.get('server_cpu_cores'), '4.2f')}"
                )
            if "throughput" in row:
                cells.append(f"{row['throughput']:5.2f}x {row['p50']:5.2f} {row['p99']:5.2f}")
            else:
                cells.append("-")
            print(" | ".join(cells))
        for system in SYSTEMS:
            refined = block[system]["refined"]
            if refined:
                steps = ", ".join(
                    f"{lv['offered_rate']:.2f} (p99 {lv['p99']:.3f}{'' if lv['passed'] else '*'})"
                    for lv in refined
                )
                print(f"{'':>8}   {system} refined: {steps}")
        parts = []
        for system in SYSTEMS:
            figures = block[system]
            parts.append(
                f"{system} {'>= ' if figures['sustained_is_lower_bound'] else ''}"
                f"{figures['sustained_rate']:.2f} req/s ({figures['sustained_offered_rate_sent']:.2f} sent"
                + (
                    f"; first failure {figures['first_failure_rate']:.2f}"
                    if figures["first_failure_rate"] is not None
                    else "; none failed: a lower bound"
                )
                + ")"
            )
        print(
            f"{'':>8}   sustained (every level up to it: p99 <= {block['target_seconds']:.3f} s, no errors, "
            f"completed >= {KEEP_UP}x sent): {', '.join(parts)}; engine / baseline "
            f"{ratio_text(block['sustained_ratio'], block['sustained_ratio_bound'])} "
            f"({fmt(block.get('sustained_ratio_sent'), '.2f')}x of the rates sent)\n"
            f"{'':>8}   * = failed (over the target, or completed < {KEEP_UP}x sent); rows = rows per policy "
            "call; tsmc = tiltsmc's share of a step; cpu = cores the server used"
        )
    print()
    for bar in result["bars"]:
        verdict = {True: "PASS", False: "FAIL", None: "OPEN"}[bar["pass"]]
        print(f"{verdict}  {bar['what']}: {bar['measured']} (bar {bar['bar']})")


def bars(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    minimum = {4: 2.0, 16: 1.2}
    for block in result["runs"]:
        name = f"{block['models']}, {block['particles']} particles"
        if block["models"] == "demo" and block["particles"] in minimum:
            bar = minimum[block["particles"]]
            ratio, bound = block["sustained_ratio"], block["sustained_ratio_bound"]
            rates = " vs ".join(
                f"{'>= ' if block[s]['sustained_is_lower_bound'] else ''}{block[s]['sustained_rate']:.2f}"
                for s in ("engine", "baseline")
            )
            verdict = ratio_verdict(ratio, bound, bar)
            out.append(
                {
                    "what": f"{name}: sustained rate engine / baseline at p99 <= "
                    f"{block['target_seconds']:.3f} s",
                    "measured": f"{ratio_text(ratio, bound)} ({rates} req/s)"
                    + ("" if bound == "exact" else f"; {BOUND_WORDS[bound]}")
                    + ("" if verdict is not None else ": undecided"),
                    "bar": f">= {bar}x",
                    "pass": verdict,
                }
            )
        worst = [r for r in block["comparison"]["by_rate"] if not r["engine_not_below"]]
        out.append(
            {
                "what": f"{name}: engine never below the baseline (throughput >= "
                f"{NEVER_BELOW_MARGINS['throughput']}x, p99 <= {NEVER_BELOW_MARGINS['p99']}x at every rate)",
                "measured": "at every rate"
                if not worst
                else "below at " + ", ".join(f"{r['offered_rate']:.2f} req/s" for r in worst),
                "bar": "never below",
                "pass": not worst,
            }
        )
        lone = block["lone_in_process"]
        out.append(
            {
                "what": f"{name}: one request in flight, engine / direct tiltsmc.smc (in-process medians)",
                "measured": f"{lone['engine_over_direct']:.3f}x ({1e3 * lone['engine_median']:.1f} vs "
                f"{1e3 * lone['direct_median']:.1f} ms; log_z identical {lone['identical_log_z']})",
                "bar": "<= 1.10x",
                "pass": lone["engine_over_direct"] <= 1.10,
            }
        )
        out.append(share_bar(name, block))
    return out


def share_bar(name: str, block: dict[str, Any]) -> dict[str, Any]:
    """tiltsmc's share of an engine step at saturation: read over HTTP in ``saturation_over_http``'s
    window (which must have had requests waiting at both ends), else at the engine's highest level;
    the in-process reading beside it."""
    reading = block["engine"].get("saturation")
    if reading is not None:
        where = (
            f"over HTTP, {reading['offered_rate']:.2f} req/s offered, {reading['throughput']:.2f} done, "
            f"waiting {reading['waiting_at_reads'][0]:.0f} -> {reading['waiting_at_reads'][1]:.0f}"
            + ("" if reading["saturated"] else ": not saturated")
        )
    else:
        reading = block["engine"]["levels"][-1] if block["engine"]["levels"] else {}
        where = (
            f"its highest level, {reading.get('offered_rate', 0):.2f} req/s offered, "
            f"{reading.get('throughput', 0):.2f} done"
        )
    share = reading.get("tiltsmc_share")
    return {
        "what": f"{name}: tiltsmc's share of an engine step at saturation ({where})",
        "measured": f"{fmt(None if share is None else 100 * share, '.1f')}% "
        f"({fmt(reading.get('ms_per_step'), '.1f')} ms steps, "
        f"{fmt(reading.get('rows_per_policy_call'), '.1f')} rows per call)"
        + saturation_text(block["lone_in_process"].get("saturation")),
        "bar": "<= 5%",
        "pass": share is not None and share <= 0.05 and reading.get("saturated", True),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = result["runs"]
    models_list = list(dict.fromkeys(b["models"] for b in blocks))
    particles_list = list(dict.fromkeys(b["particles"] for b in blocks))
    fig, axes = plt.subplots(
        len(models_list),
        len(particles_list),
        figsize=(5.2 * len(particles_list), 3.8 * len(models_list)),
        squeeze=False,
    )
    colours = {"baseline": "tab:blue", "engine": "tab:orange"}
    names = {
        "baseline": "smc per request (FastAPI threads)",
        "engine": "tiltsmc serve (engine)"
        if result["args"]["engine_server"] == "cli"
        else "engine (bench app, generate)",
    }
    for block in blocks:
        ax = axes[models_list.index(block["models"])][particles_list.index(block["particles"])]
        for system in SYSTEMS:
            levels = block[system]["levels"] + block[system]["refined"]
            levels.sort(key=lambda lv: lv["offered_rate"])
            rates = [lv["offered_rate"] for lv in levels]
            colour = colours[system]
            ax.plot(rates, [lv["p99"] for lv in levels], "o-", color=colour, label=f"{names[system]} p99")
            p50 = [lv["p50"] for lv in levels]
            ax.plot(rates, p50, "s--", color=colour, alpha=0.6, ms=4, label=f"{names[system]} p50")
        ax.axhline(block["target_seconds"], color="grey", ls=":", lw=1, label="p99 target (5x lone)")
        ax.set_yscale("log")
        ax.set_xlabel("offered load (requests/s, Poisson)")
        ax.set_ylabel("latency (s)")
        ax.set_title(f"{CONFIGS[block['models']]['label']}, {block['particles']} particles", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    machine = result["machine"]
    fig.suptitle(
        f"tiltsmc serve vs tiltsmc.smc per request, T = {result['args']['horizon']}; "
        f"{machine['cpus_usable']} cores, {machine['cpu_model']}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# -- results recorded before: the same rules applied -------------------------------------------------


def rejudged(level: dict[str, Any], block: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    """A copy of a recorded level judged by ``judge``. A results file from before the levels recorded
    ``offered_rate_sent`` and ``completed_rate`` (each level then its own Poisson draw, at most
    --max-requests arrivals): the rate sent from its requests and arrival window; the completed rate from
    its arrival times, drawn again as that version drew them (``poisson_offsets`` seeded ``[seed,
    particles, ladder index]``, or ``1000 + step`` for a refinement), kept only where the draw gives the
    recorded requests and window, plus its latencies (all answered, in order). Where it cannot be drawn
    again (or a request failed), the recorded throughput stands in for it (biased low by the drain after
    the last arrival: it counts from the first send to the last response); ``completed_rate_source``
    says which."""
    level = dict(level)
    if "offered_rate_sent" not in level:
        window, count = level["arrival_window_seconds"], level["requests"]
        level["offered_rate_sent"] = (count - 1) / window if window > 0 else float("nan")
    if "completed_rate" not in level:
        level["completed_rate"], level["completed_rate_source"] = level["throughput"], "throughput"
        if "refinement" in level:
            key = 1000 + level["refinement"] - 1
        else:
            key = block["rates"].index(level["offered_rate"])
        if "min_requests" in args and "max_requests" in args:
            rng = np.random.default_rng([args["seed"], block["particles"], key])
            offsets = poisson_offsets(
                level["offered_rate"], args["duration"], args["min_requests"], args["max_requests"], rng
            )
            drawn = (
                len(offsets) == level["requests"]
                and abs(float(offsets[-1]) - level["arrival_window_seconds"]) < 1e-6
            )
            latencies = level.get("latencies", [])
            if drawn and level["errors"] == 0 and len(latencies) == len(offsets):
                done = offsets + np.asarray(latencies)  # latencies rounded to 0.1 ms
                level["completed_rate"] = completed_rate(done.tolist())
                level["completed_rate_source"] = "schedule drawn again"
    else:
        level.setdefault("completed_rate_source", "recorded")
    for key in ("offered_rate_sent", "completed_rate", "p99"):
        if isinstance(level[key], str):  # write_json's "inf" / "nan"
            level[key] = float(level[key])
    return judge(level, block["target_seconds"])


def short_window(level: dict[str, Any], args: dict[str, Any]) -> bool:
    """Whether a recorded level stopped at --max-requests well before --duration (the versions that had
    that cap): its p99 is that of a shorter window, where a growing queue has less time to show."""
    most = args.get("max_requests")
    return bool(
        most is not None
        and level["requests"] >= most
        and level["arrival_window_seconds"] < 0.9 * args["duration"]
    )


def recompute(path: Path) -> list[dict[str, Any]]:
    """The sustained rates and ratios of a results file (``bench_serve.py``'s JSON, any version) by this
    version's rules (``rejudged``, ``sustained_summary``, ``sustained_ratio``) from its recorded levels,
    printed beside the ratios it recorded; returned as rows. It judges the levels that ran: it cannot
    lengthen a level that stopped at --max-requests (at high rates 1 - 3 s rather than --duration),
    give the levels common arrivals, or run the bisection the new rule would have run (between the
    first failure and the rate below it): there, the new sustained rate is the highest level that ran
    below the first failure."""
    import json

    result = json.loads(Path(path).read_text())
    if not isinstance(result.get("runs"), list) or "args" not in result:  # bench_serve_ray.py's, say
        print(f"\n{path} ({result.get('command', '')}): not a bench_serve.py results file, left out")
        return []
    args = result["args"]
    rows = []
    print(f"\n{path} ({result.get('command', '')})")
    print(
        f"  {'models':<8} {'p':>2} | {'recorded: baseline':>18} {'engine':>7} {'ratio':>6} | "
        f"{'now: baseline (sent)':>22} {'engine (sent)':>24} {'ratio':>9} {'of sent':>7} | "
        f"{'whole windows: baseline':>22} {'engine':>24} {'ratio':>9} | first failure b / e; levels judged "
        "otherwise; completed rate from"
    )
    for block in result["runs"]:
        new: dict[str, Any] = {}
        full: dict[str, Any] = {}  # the levels that ran the whole window only
        changed, sources = [], set()
        for system in SYSTEMS:
            levels = [
                rejudged(lv, block, args) for lv in block[system]["levels"] + block[system].get("refined", [])
            ]
            new[system] = sustained_summary(levels)
            ordered = sorted(levels, key=lambda lv: lv["offered_rate"])
            short = [lv["offered_rate"] for lv in ordered if short_window(lv, args)]
            full[system] = sustained_summary(
                [lv for lv in ordered if not short or lv["offered_rate"] < short[0]]
            )
            if short and full[system]["first_failure_rate"] is None:  # the levels from the first short
                full[system]["sustained_is_lower_bound"] = True  # one on do not count: a lower bound
            full[system]["first_short_rate"] = short[0] if short else None
            for level, recorded in zip(levels, block[system]["levels"] + block[system].get("refined", [])):
                sources.add(level["completed_rate_source"])
                if level["passed"] != recorded.get("passed", recorded["within_target"]):
                    changed.append(
                        f"{system[0]} {level['offered_rate']:.2f}{verdict_mark(level) or ' passed'}"
                    )
        ratio, bound = sustained_ratio(new["engine"], new["baseline"])
        full_ratio, full_bound = sustained_ratio(full["engine"], full["baseline"])
        b_sent, e_sent = (new[system]["sustained_offered_rate_sent"] for system in SYSTEMS)
        row = {
            "file": str(path),
            "models": block["models"],
            "particles": block["particles"],
            "recorded": {
                "baseline": block["baseline"]["sustained_rate"],
                "engine": block["engine"]["sustained_rate"],
                "ratio": block["sustained_ratio"],
            },
            "now": {
                **{system: new[system] for system in SYSTEMS},
                "ratio": ratio,
                "ratio_bound": bound,
                "ratio_sent": e_sent / b_sent if b_sent > 0 else None,
            },
            "full_window_only": {
                **{system: full[system] for system in SYSTEMS},
                "ratio": full_ratio,
                "ratio_bound": full_bound,
            },
            "levels_judged_otherwise": changed,
            "completed_rate_from": sorted(sources),
        }
        rows.append(row)

        def rate(figures: dict[str, Any]) -> str:
            low = ">=" if figures["sustained_is_lower_bound"] else "  "
            return f"{low}{figures['sustained_rate']:7.2f} ({figures['sustained_offered_rate_sent']:6.2f})"

        failures = " / ".join(fmt(new[system]["first_failure_rate"], ".2f").strip() for system in SYSTEMS)
        recorded_ratio = block["sustained_ratio"]
        recorded_ratio = float(recorded_ratio) if recorded_ratio is not None else None
        print(
            f"  {block['models']:<8} {block['particles']:>2} | {block['baseline']['sustained_rate']:18.2f} "
            f"{block['engine']['sustained_rate']:7.2f} {fmt(recorded_ratio, '5.2f')}x | "
            f"{rate(new['baseline']):>22} {rate(new['engine']):>24} {ratio_text(ratio, bound):>9} "
            f"{fmt(row['now']['ratio_sent'], '6.2f')}x | {rate(full['baseline']):>22} "
            f"{rate(full['engine']):>24} {ratio_text(full_ratio, full_bound):>9} | {failures}; "
            f"{'; '.join(changed) if changed else 'none'}; {', '.join(sorted(sources))}"
        )
    return rows


def add_load_arguments(parser: argparse.ArgumentParser, fixed_duration: bool = False) -> None:
    """The open-loop load's options (levels, target, lone requests), shared with bench_serve_ray.py and
    bench_overload.py. ``fixed_duration`` (this script's and bench_serve_ray.py's levels: ``unit_gaps``,
    ``level_offsets``): every level lasts ``--duration``, up to ``--level-cap`` arrivals; else
    (bench_overload.py's, ``arrival_offsets``) ``--min-requests`` and ``--max-requests`` bound them."""
    parser.add_argument("--duration", type=float, default=6.0, help="arrival window of a level (s)")
    if fixed_duration:
        parser.add_argument(
            "--level-cap",
            type=int,
            default=5000,
            help="the most requests a level may send (a bound on memory and connections, not on its "
            "length: a rate that needs more within --duration ends the ladder, its sustained rate then "
            "a lower bound)",
        )
    else:
        parser.add_argument("--min-requests", type=int, default=40)
        parser.add_argument("--max-requests", type=int, default=120)
    parser.add_argument("--target-factor", type=float, default=5.0, help="p99 target / lone latency")
    parser.add_argument("--lone-repeats", type=int, default=15)
    parser.add_argument("--request-timeout", type=float, default=120.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,fixtures", help="comma-separated: demo, fixtures")
    parser.add_argument("--particles", default="4,16", help="comma-separated particles per request")
    parser.add_argument("--horizon", type=int, default=8, help="operations per arithmetic problem (T)")
    parser.add_argument(
        "--rates",
        default="0.25,0.5,0.75,1,1.25,1.5,2,2.5,3,4,5,6,8",
        help="offered rates, multiples of 1 / (the baseline's median lone-request latency over HTTP)",
    )
    add_load_arguments(parser, fixed_duration=True)
    parser.add_argument("--pause", type=float, default=0.5, help="seconds between levels")
    parser.add_argument(
        "--refine", type=int, default=3, help="bisection levels per system between its ladder's rungs"
    )
    parser.add_argument("--engine-server", choices=("cli", "app"), default="cli")
    parser.add_argument(
        "--engine-workers",
        type=int,
        default=1,
        help="tiltsmc serve --workers (each worker steps its own batch; its models get cores / workers "
        "ONNX Runtime threads)",
    )
    parser.add_argument(
        "--engine-threads",
        type=int,
        default=None,
        help="tiltsmc serve --threads: each model's ONNX Runtime intra-op threads (default: tiltsmc serve's, "
        "the cores shared out between the workers)",
    )
    parser.add_argument(
        "--baseline-threads",
        type=int,
        default=None,
        help="the baseline's ONNX Runtime intra-op threads a session (default: ONNX Runtime's, one a core)",
    )
    parser.add_argument(
        "--memory-arena",
        choices=("on", "off"),
        default="on",
        help="ONNX Runtime's CPU memory arena, the same for both servers (passed to tiltsmc serve)",
    )
    parser.add_argument(
        "--saturation-seconds",
        type=float,
        default=10.0,
        help="seconds of each saturation reading, in process and over HTTP (0: none; the share bar is "
        "then read at the engine's highest level)",
    )
    parser.add_argument(
        "--saturation-factor",
        type=float,
        default=1.5,
        help="the saturation reading over HTTP offers this times the most the engine completed (in a level, "
        "or in process at saturation)",
    )
    parser.add_argument(
        "--saturation-in-flight",
        type=int,
        default=64,
        help="requests always in flight in the in-process saturation reading",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: demo, 4 particles, short levels")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default bench/results/serve_<host>)"
    )
    parser.add_argument(
        "--recompute",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="run nothing: judge the levels recorded in these results files (older formats too) by this "
        "version's rules and print their sustained rates and ratios beside the recorded ones",
    )
    args = parser.parse_args()
    if args.recompute:
        for path in args.recompute:
            recompute(path)
        return
    if args.quick:
        args.models, args.particles, args.rates = "demo", "4", "1,3"
        args.duration, args.lone_repeats = 2.0, 3
        args.refine, args.saturation_seconds = 1, min(args.saturation_seconds, 3.0)
    sys.path.insert(0, str(HERE))
    from tiltsmc.tasks import arithmetic

    models_list = [m for m in args.models.split(",") if m]
    particles_list = [int(p) for p in args.particles.split(",")]
    multipliers = [float(m) for m in args.rates.split(",")]
    count = max(args.level_cap, args.lone_repeats + 2)
    prompts = [p.prompt for p in arithmetic.make_problems(args.horizon, count, rng=args.seed)]
    began = time.perf_counter()
    load_before = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as log_dir:
        for models in models_list:
            print(f"{CONFIGS[models]['label']}: lone requests in-process", flush=True)
            arena = args.memory_arena == "on"
            lone = lone_in_process(
                models,
                prompts,
                particles_list,
                args.lone_repeats,
                arena,
                args.saturation_in_flight,
                args.saturation_seconds,
            )
            plans: dict[int, dict[str, Any]] = {}
            for particles in particles_list:
                saturation = lone[particles].get("saturation") or {}
                plans[particles] = {
                    "multipliers": multipliers,
                    "in_process_throughput": saturation.get("throughput", 0.0),
                }
                print(
                    f"  {particles} particles: direct {1e3 * lone[particles]['direct_median']:.1f} ms, "
                    f"engine {1e3 * lone[particles]['engine_median']:.1f} ms"
                    + saturation_text(lone[particles].get("saturation")),
                    flush=True,
                )
            systems = run_config(models, args, prompts, plans, Path(log_dir))
            for particles in particles_list:
                block: dict[str, Any] = {
                    "models": models,
                    "particles": particles,
                    "horizon": args.horizon,
                    "max_tokens": CONFIGS[models]["max_tokens"],
                    "rates": plans[particles]["rates"],
                    "target_seconds": plans[particles]["target_seconds"],
                    "lone_in_process": lone[particles],
                }
                for system in SYSTEMS:
                    block[system] = systems[system][particles]
                    levels = block[system]["levels"] + block[system]["refined"]
                    block[system].update(sustained_summary(levels))
                ratio, bound = sustained_ratio(block["engine"], block["baseline"])
                block["sustained_ratio"], block["sustained_ratio_bound"] = ratio, bound
                b, e = (block[system]["sustained_offered_rate_sent"] for system in SYSTEMS)
                block["sustained_ratio_sent"] = e / b if b > 0 else None  # of the rates the schedules sent
                block["comparison"] = compare(block["baseline"], block["engine"])
                runs.append(block)
    import onnxruntime

    result: dict[str, Any] = {
        "machine": machine_info(
            onnxruntime=onnxruntime.__version__,
            loadavg_before=load_before,
            engine_server=args.engine_server,
        ),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "definitions": {
            "p99_target": f"p99 <= {args.target_factor} x the baseline's median lone-request latency over "
            "HTTP (same configuration and particles; one target for both systems)",
            "level": f"--duration ({args.duration:g} s) of Poisson arrivals at every rate (no cap on a "
            f"level's requests short of --level-cap ({args.level_cap}), a bound on memory: a rate needing "
            "more ends the ladders, ladder_capped_at); one set of seeded standard exponential gaps per "
            "particle count, scaled to each level's rate, for both systems, ladder and refinement (common "
            "random numbers: a higher rate's schedule is a lower one's compressed, with more arrivals); "
            "request k the same at every level",
            "offered_rate": "a level's nominal rate (the Poisson intensity); offered_rate_sent: (n - 1) / "
            "the window from its first scheduled send to its last, of the schedule actually sent",
            "completed_rate": "(responses - 1) / the time from the first response to the last",
            "passed": "no errors, p99 <= the target (within_target) and completed_rate >= "
            f"{KEEP_UP} x offered_rate_sent (keeps_up); every request's latency counts (no warm-up "
            "discarded)",
            "sustained_rate": "the highest nominal rate such that it and every lower level (ladder and "
            "refinement, by nominal rate) passed: the first failure ends it, a pass above a failure "
            "does not count; sustained_offered_rate_sent: that level's offered_rate_sent; 0 if the lowest "
            "level failed",
            "sustained_is_lower_bound": "no level failed (the ladder ran out of rates or reached "
            "--level-cap): the system's sustained rate is at least sustained_rate",
            "sustained_ratio": "engine / baseline sustained_rate (nominal); sustained_ratio_bound: exact, "
            "lower (the engine's rate a lower bound), upper (the baseline's) or unknown (both); a bar is "
            "met or missed only where the bound allows it, else undecided (pass null); "
            "sustained_ratio_sent: the same of sustained_offered_rate_sent",
            "server_page_faults": "the server process's minor + major page faults during a level",
            "refinement": "--refine levels per system bisecting (geometric middles) between its ladder's "
            "first failure and the rate below it (passed), and nowhere else; the levels enter the "
            "sustained rate, not the rate-by-rate comparison",
            "throughput": "completed requests / seconds from the first scheduled send to the last response",
            "latency": "from a request's scheduled send time (fixed in advance, open loop) to its response",
            "rates": "multiples (--rates) of 1 / the baseline's median lone-request latency over HTTP",
            "ladder": "a system's levels stop after two in a row failed (saturated)",
            "never_below": "at every rate both ran: engine throughput >= "
            f"{NEVER_BELOW_MARGINS['throughput']}x and p99 <= {NEVER_BELOW_MARGINS['p99']}x the "
            "baseline's, errors no more",
            "saturation": "engine.saturation: Poisson arrivals over HTTP at --saturation-factor x the "
            "engine's highest throughput (in a level, or in process at saturation), for "
            "--saturation-seconds; its counters read a third of the way into the arrivals and at the last "
            "(saturated: requests waiting at both reads); then the requests unanswered abandoned",
            "saturation_in_process": "lone_in_process.saturation: --saturation-in-flight requests always "
            "in an in-process engine (each answered one replaced at once) for --saturation-seconds; "
            "Engine.stats between a third of the way in and the end",
            "tiltsmc_share": "engine: tiltsmc's seconds / step seconds over the level, from /metrics; "
            "baseline: bookkeeping / total seconds of the responses' compute (each call's own wall time)",
        },
        "runs": runs,
        "seconds": time.perf_counter() - began,
    }
    result["bars"] = bars(result)
    print_table(result)
    print(f"\n{result['seconds']:.0f} s; load average before {load_before}, after {os.getloadavg()}")
    out = args.out or RESULTS / f"serve_{socket.gethostname()}.json"
    write_json(out, result)
    plot(result, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
