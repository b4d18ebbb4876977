"""A fresh engine hit by a burst (issue #15): how its admission grows the batch, against the rule it had.

Each run is a new process with a new ``tiltsmc.Engine`` on the demo's models (in process, no HTTP), sent
one workload the moment it is up: ``burst`` (``--burst`` 4-particle requests submitted at once, a queue
that built up while the service started) and ``flood`` (seeded Poisson arrivals at ``--rate`` for
``--seconds``, 4 particles; and at ``--rate-16`` with 16 particles). Variants, in turn within each round:

* ``shipped``: the engine as it is: with nothing measured its learned row limit is 0, so only the
  scheduler's exploring minimum (twice the oldest waiting request's rows) is let in, and the batch grows
  as steps of each size are measured;
* ``admit-all-cold`` (the reference): the rule before, emulated here: with nothing measured no limit
  below ``max_batch_rows`` (4096), so the first admissions take the whole queue;
* ``fixed-rows``: ``adaptive_rows=False`` (every waiting request that fits under ``max_batch_rows``).

Per run: latency from each request's send to its result (p50, p90, max, mean), makespan (first send to
last result) and throughput (requests / makespan), the most requests in flight at once (sampled every
50 ms). Ratios against the reference are per round (the same requests, seconds apart), then their
median. Not a test. JSON to ``bench/results/cold_start_<host>.json``.

    python bench/bench_cold_start.py            # 3 rounds, about 6 minutes on 2 cores
    python bench/bench_cold_start.py --quick    # 1 round, small workloads
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from _machine import git_commit, machine_info
from _plot import table, write_json
from bench_serve import RESULTS, poisson_offsets

VARIANTS = ("admit-all-cold", "shipped", "fixed-rows")
REFERENCE = "admit-all-cold"


def workloads(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    return {
        "burst 4p": {"particles": 4, "count": args.burst, "rate": None, "seconds": None},
        "flood 4p": {"particles": 4, "count": None, "rate": args.rate, "seconds": args.seconds},
        "flood 16p": {"particles": 16, "count": None, "rate": args.rate_16, "seconds": args.seconds},
    }


def send_times(load: dict[str, Any], seed: int) -> np.ndarray:
    """Each request's send offset in seconds: all at once (a burst), or seeded Poisson arrivals."""
    if load["rate"] is None:
        return np.zeros(int(load["count"]))
    count = int(load["rate"] * load["seconds"])  # exactly rate x seconds arrivals, however long they take
    return poisson_offsets(load["rate"], math.inf, count, count, np.random.default_rng(seed))


def one_run(variant: str, load: dict[str, Any], seed: int) -> dict[str, Any]:
    """One fresh engine in this process, one workload: its figures."""
    from tiltsmc.serving import engine as engine_module
    from tiltsmc.serving import scheduler
    from tiltsmc.tasks import arithmetic

    if variant == "admit-all-cold":

        class AdmitAllCold(scheduler.BatchSizer):
            def limit(self) -> int:
                return engine_module.MAX_BATCH_ROWS if self._knee() is None else super().limit()

        engine_module.BatchSizer = AdmitAllCold  # type: ignore[misc]
    policy, reward = arithmetic.load_models(memory_arena=True)
    prompts = [problem.prompt for problem in arithmetic.make_problems(8, 200, rng=seed)]
    offsets = send_times(load, seed)
    engine = engine_module.Engine(
        policy, reward, keep_freed_memory=True, adaptive_rows=variant != "fixed-rows"
    )
    if variant == "admit-all-cold":  # its workers started at max_batch_rows too
        for worker in engine._workers:
            worker.row_limit = engine.max_batch_rows
    done: dict[int, float] = {}
    sent: dict[int, float] = {}
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], int(engine.stats()["in_flight"]))
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    futures = []
    began = time.perf_counter()
    for k, offset in enumerate(offsets):
        wait = began + offset - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        sent[k] = time.perf_counter()
        future = engine.submit(
            prompts[k % len(prompts)], "smc", num_particles=load["particles"], rng=k, max_new_tokens=82
        )
        future.add_done_callback(lambda _, k=k: done.__setitem__(k, time.perf_counter()))
        futures.append(future)
    for future in futures:
        future.result()
    stop.set()
    stats = engine.stats()
    engine.close(drain=False)
    latency = np.array([done[k] - sent[k] for k in sent])
    makespan = max(done.values()) - began
    return {
        "requests": len(latency),
        "p50": float(np.percentile(latency, 50)),
        "p90": float(np.percentile(latency, 90)),
        "max": float(latency.max()),
        "mean": float(latency.mean()),
        "makespan": makespan,
        "throughput": len(latency) / makespan,
        "peak_in_flight": peak[0],
        "steps": int(stats["steps"]),
        "row_limit_at_end": int(stats["row_limit"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the variants in turn in each")
    parser.add_argument("--burst", type=int, default=400, help="requests of the burst, sent at once")
    parser.add_argument("--rate", type=float, default=150.0, help="the 4-particle flood's rate (req/s)")
    parser.add_argument("--rate-16", type=float, default=40.0, help="the 16-particle flood's rate (req/s)")
    parser.add_argument("--seconds", type=float, default=8.0, help="each flood's length (s)")
    parser.add_argument("--quick", action="store_true", help="one round of small workloads")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/...)")
    parser.add_argument("--one", nargs=3, metavar=("VARIANT", "WORKLOAD", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.burst, args.rate, args.rate_16, args.seconds = 1, 60, 60.0, 15.0, 2.0
    loads = workloads(args)
    if args.one:  # a child: one run, its figures as one JSON line
        variant, name, seed = args.one
        print(json.dumps(one_run(variant, loads[name], int(seed))))
        return
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {name: {v: [] for v in VARIANTS} for name in loads}
    for round_index in range(args.rounds):
        for name in loads:
            for variant in VARIANTS:
                child = [sys.executable, __file__, *sys.argv[1:], "--one", variant, name, str(round_index)]
                output = subprocess.run(child, capture_output=True, text=True, check=True).stdout
                figures = json.loads(output.strip().splitlines()[-1])
                runs[name][variant].append(figures)
                print(
                    f"round {round_index} {name:>9} {variant:>14}: p50 {figures['p50']:.2f} p90 "
                    f"{figures['p90']:.2f} max {figures['max']:.2f} mean {figures['mean']:.2f} s, "
                    f"{figures['throughput']:.1f} req/s, peak in flight {figures['peak_in_flight']}",
                    flush=True,
                )
    summary: dict[str, dict[str, dict[str, float]]] = {}
    rows = []
    for name, by_variant in runs.items():
        summary[name] = {}
        for variant, figures in by_variant.items():
            medians = {key: statistics.median(f[key] for f in figures) for key in figures[0]}
            ratios = {  # per round against the reference, then the median
                key: statistics.median(f[key] / ref[key] for f, ref in zip(figures, by_variant[REFERENCE]))
                for key in ("p50", "p90", "max", "mean", "throughput")
            }
            summary[name][variant] = {**medians, **{f"{key}_ratio": value for key, value in ratios.items()}}
            rows.append([
                name, variant, medians["p50"], medians["p90"], medians["max"], medians["mean"],
                medians["throughput"], medians["peak_in_flight"], ratios["mean"], ratios["p90"],
                ratios["throughput"],
            ])  # fmt: skip
    headers = ["workload", "variant", "p50 s", "p90 s", "max s", "mean s", "req/s", "peak", "mean x",
               "p90 x", "req/s x"]  # fmt: skip
    text = table(
        headers, rows, title=f"medians of {args.rounds} round(s); x = per-round ratio to {REFERENCE}"
    )
    out = args.out or RESULTS / f"cold_start_{socket.gethostname()}.json"
    write_json(
        out,
        {
            "experiment": "cold_start",
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "machine": machine_info(),
            "commit": git_commit(),
            "settings": {"rounds": args.rounds, "workloads": loads, "variants": list(VARIANTS)},
            "reference": REFERENCE,
            "runs": runs,
            "summary": summary,
            "table": text,
        },
    )


if __name__ == "__main__":
    main()
