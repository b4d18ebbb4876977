"""A long run of ``tiltsmc serve`` under mixed traffic: does its memory stay flat, does it end every request?

One server on 127.0.0.1 (``bench_serve.py``'s configurations: the fixtures by default, or the demo's
models), sent ``--rounds`` rounds of ``--requests`` requests, ``--concurrency`` at a time: every sampler
(``smc`` most, ``sp_gsmc``, ``best_of_n``, ``mh``) with 2 - 16 particles, some with two prompts, some
malformed (a 400 each), and some whose client hangs up after a few milliseconds (the engine then drops
them at its next step). After each round, once the engine reports nothing in flight: the server's
resident memory (``VmRSS``), and the requests, rows and queue ``/metrics`` still counts (all must be 0).
Every ``--idle-every`` rounds the server idles past ``--release-memory-after`` (the engine then gives ONNX
Runtime's arena and the freed heap back) and its memory is read again.

The reading: the least-squares slope of the idle readings after the first, in kilobytes per request (a
leak of one buffer per request shows as its size; what a long-running service keeps for good), and of
the busy readings after the first quarter (they follow the largest batches met so far: they rise in
steps, the heap and ONNX Runtime's arena keeping what the peak took until the next idle release), with
ONNX Runtime's memory arena on and off (``--memory-arena on,off``, the default, runs both, one server
after the other, on the same requests). Not a test.
JSON to ``bench/results/soak_<host>.json``.

    python bench/bench_soak.py                            # fixtures, 2 workers, 40 x 400 requests
    python bench/bench_soak.py --models demo --rounds 20 --requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
from _machine import git_commit, machine_info
from _plot import write_json
from bench_serve import CONFIGS, RESULTS, Server, free_port, metrics_samples, server_command

SAMPLERS = ("smc", "smc", "smc", "sp_gsmc", "best_of_n", "mh")
PARTICLES = (2, 4, 8, 16)


def request_body(rng: random.Random, prompts: list[str], k: int, max_tokens: int) -> dict[str, Any]:
    """Request ``k`` of the mix: 8% with no particles, 4% an unknown sampler (each a 400), 4% with two
    prompts, the rest one prompt with a sampler and particle count drawn from the mix."""
    body: dict[str, Any] = {"prompt": prompts[k % len(prompts)], "seed": k, "max_tokens": max_tokens}
    kind = rng.random()
    if kind < 0.08:
        body["particles"] = 0
    elif kind < 0.12:
        body["sampler"] = "no-such-sampler"
    elif kind < 0.16:
        body.update(prompt=[prompts[k % len(prompts)], prompts[(k + 1) % len(prompts)]], particles=4)
    else:
        body["sampler"] = sampler = rng.choice(SAMPLERS)
        count = rng.choice(PARTICLES)
        if sampler == "sp_gsmc":
            body["pool_size"] = count
        elif sampler == "mh":
            body.update(pool_size=count, mh_steps=1)
        else:
            body["particles"] = count
    return body


async def send_round(
    base: str, bodies: list[dict[str, Any]], hang_up: list[bool], concurrency: int
) -> list[str]:
    """Each request's outcome: its status code, or ``hung up`` (the client gave up after 3 ms)."""
    import httpx

    gate = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, body: dict[str, Any], early: bool) -> str:
        async with gate:
            try:
                response = await client.post(
                    f"{base}/v1/completions", json=body, timeout=0.003 if early else 120
                )
            except httpx.TimeoutException:
                return "hung up" if early else "timed out"
            return str(response.status_code)

    limits = httpx.Limits(max_connections=2 * concurrency)
    async with httpx.AsyncClient(limits=limits) as client:
        return list(await asyncio.gather(*(one(client, b, h) for b, h in zip(bodies, hang_up))))


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def in_flight(base: str) -> dict[str, float]:
    """``tiltsmc_requests_in_flight``, ``tiltsmc_rows_in_flight``, ``tiltsmc_queue_depth`` and the engine's
    requests by outcome, from ``/metrics``."""
    samples = metrics_samples(base)
    out = {
        name: samples[name]
        for name in ("tiltsmc_requests_in_flight", "tiltsmc_rows_in_flight", "tiltsmc_queue_depth")
    }
    for name, value in samples.items():
        if name.startswith("tiltsmc_requests:"):
            out[name.removeprefix("tiltsmc_requests:")] = value
    return out


def settled(base: str, within: float = 30.0) -> dict[str, float]:
    """``in_flight`` once nothing is in flight or queued (the engine drops hung-up requests at its next
    step), or as it is after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        now = in_flight(base)
        busy = now["tiltsmc_requests_in_flight"] + now["tiltsmc_rows_in_flight"] + now["tiltsmc_queue_depth"]
        if busy == 0 or time.monotonic() > deadline:
            return now
        time.sleep(0.1)


def slope_kb_per_request(points: list[tuple[int, float]], requests: int) -> Optional[float]:
    """Least-squares slope of resident megabytes against rounds (``(round, MB)`` points), in kilobytes per
    request (None with fewer than two points: no slope to read)."""
    if len(points) < 2:
        return None
    x, y = np.array(points, dtype=float).T
    return float(np.polyfit(x, y, 1)[0] * 1024 / requests)


def slope_text(slope: Optional[float], readings: str) -> str:
    return f"{slope:+.3f} KB a request" if slope is not None else f"none: fewer than two {readings}"


def soak(arena: str, args: argparse.Namespace, prompts: list[str], log_dir: Path) -> dict[str, Any]:
    max_tokens = CONFIGS[args.models]["max_tokens"]
    port = free_port()
    options = ["--workers", str(args.workers), "--release-memory-after", str(args.release_memory_after)]
    command = server_command("engine", args.models, port, "cli", arena, engine_options=options)
    rng = random.Random(args.seed)
    rounds: list[dict[str, Any]] = []
    with Server(f"engine-arena-{arena}", command, port, log_dir) as server:
        loaded = resident_mb(server.pid)
        began = time.perf_counter()
        for index in range(args.rounds):
            first = index * args.requests
            bodies = [request_body(rng, prompts, first + k, max_tokens) for k in range(args.requests)]
            hang_up = [rng.random() < args.hang_up for _ in bodies]
            outcomes = asyncio.run(send_round(server.base, bodies, hang_up, args.concurrency))
            after = settled(server.base)
            counts = {o: outcomes.count(o) for o in sorted(set(outcomes))}
            record = {
                "round": index,
                "seconds": time.perf_counter() - began,
                "resident_mb": resident_mb(server.pid),
                "outcomes": counts,
                "requests_in_flight": after["tiltsmc_requests_in_flight"],
                "rows_in_flight": after["tiltsmc_rows_in_flight"],
                "queue_depth": after["tiltsmc_queue_depth"],
            }
            if (index + 1) % args.idle_every == 0:  # idle past the release: memory kept for good
                time.sleep(args.release_memory_after + 3)
                record["idle_resident_mb"] = resident_mb(server.pid)
            rounds.append(record)
            print(
                f"  arena {arena:3} round {index:3d} {record['seconds']:6.0f} s resident "
                f"{record['resident_mb']:7.1f} MB in flight {record['requests_in_flight']:.0f} requests "
                f"{record['rows_in_flight']:.0f} rows  {counts}",
                flush=True,
            )
        engine_counts = {k: v for k, v in settled(server.base).items() if not k.startswith("tiltsmc_")}
    idle = [(r["round"], r["idle_resident_mb"]) for r in rounds if "idle_resident_mb" in r]
    return {
        "memory_arena": arena,
        "resident_mb_loaded": loaded,
        "resident_mb_after_first_round": rounds[0]["resident_mb"],
        "resident_mb_last_round": rounds[-1]["resident_mb"],
        "idle_resident_mb": [mb for _, mb in idle],
        "slope_kb_per_request": slope_kb_per_request(
            [(r["round"], r["resident_mb"]) for r in rounds[len(rounds) // 4 :]], args.requests
        ),
        "idle_slope_kb_per_request": slope_kb_per_request(idle[1:], args.requests),
        "ever_left_in_flight": any(
            r["requests_in_flight"] or r["rows_in_flight"] or r["queue_depth"] for r in rounds
        ),
        "engine_requests_by_outcome": engine_counts,
        "rounds": rounds,
    }


def idle_text(run: dict[str, Any], every: int) -> str:
    """The idle readings of a run and their slope after the first, or why there are none."""
    readings = run["idle_resident_mb"]
    if not readings:
        return f"no idle reading (one every {every} rounds: --idle-every)"
    slope = slope_text(run["idle_slope_kb_per_request"], "idle readings after the first")
    return f"idle {' '.join(f'{mb:.1f}' for mb in readings)} MB (slope after the first: {slope})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", choices=("fixtures", "demo"), default="fixtures")
    parser.add_argument("--workers", type=int, default=2, help="tiltsmc serve --workers")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--requests", type=int, default=400, help="requests a round")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight from the client")
    parser.add_argument("--hang-up", type=float, default=0.05, help="share of requests the client abandons")
    parser.add_argument("--memory-arena", default="on,off", help="ONNX Runtime's arena: on, off or on,off")
    parser.add_argument("--release-memory-after", type=float, default=5.0, help="the server's option")
    parser.add_argument("--idle-every", type=int, default=10, help="rounds between idle readings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/...)")
    args = parser.parse_args()
    from tiltsmc.tasks import arithmetic

    prompts = [p.prompt for p in arithmetic.make_problems(8, 64, rng=args.seed)]
    arenas = args.memory_arena.split(",")
    runs = []
    with tempfile.TemporaryDirectory() as log_dir:
        for arena in arenas:
            runs.append(soak(arena, args, prompts, Path(log_dir)))
    total = args.rounds * args.requests
    print(
        f"\n{args.models}, {args.workers} workers, {total} requests a server ({args.concurrency} at a time):"
    )
    for run in runs:
        print(
            f"  arena {run['memory_arena']:3}: resident {run['resident_mb_loaded']:.1f} MB loaded, "
            f"{run['resident_mb_after_first_round']:.1f} after round 1, {run['resident_mb_last_round']:.1f} "
            f"after the last (slope after the first quarter: "
            f"{slope_text(run['slope_kb_per_request'], 'rounds')}); {idle_text(run, args.idle_every)}; "
            "anything left in flight after a round: "
            f"{'yes' if run['ever_left_in_flight'] else 'no'}; "
            f"engine outcomes {run['engine_requests_by_outcome']}"
        )
    machine = machine_info()
    out = args.out or RESULTS / f"soak_{machine['hostname']}.json"
    write_json(
        out,
        {
            "machine": machine,
            "command": " ".join(["python", "bench/bench_soak.py", *sys.argv[1:]]),
            "git_commit": git_commit(),
            "args": vars(args) | {"out": str(out)},
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
