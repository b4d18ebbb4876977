"""Benchmark of scale-out (issue #20): ``tiltsmc serve --ray`` with 1 and with 2 replicas of the engine,
under the same open-loop Poisson load over HTTP on 127.0.0.1 as ``bench_serve.py`` (whose load generator,
requests and statistics it uses).

For each replica count K: a local Ray instance started by the command (``--replica-cpus`` each), lone
requests over HTTP, then levels of increasing offered rate (multiples of 1 / the one-replica lone latency
L) until two levels in a row fail. Every level lasts ``--duration`` seconds whatever its rate, its arrivals
one set of seeded standard exponential gaps scaled to the rate (the same for every level and both K), and
passes where it has no errors, p99 within the target (``--target-factor`` x L, one target for both) and
its completed rate at least 0.95x the rate its schedule sent (``bench_serve.judge``). The sustained rate
is the highest offered rate such that it and every lower level passed (``bench_serve.sustained_level``;
a lower bound where no level failed, and the scaling then a bound too); its ratio K = 2 over K = 1 is the
scaling, and the sustained rate per replica the sizing rule. On this 2-core machine the two replicas
share the two cores with each other, with ONNX Runtime's threads and with the client: the scaling is
bounded by the cores, not by the engine. Prints a table, writes ``bench/results/serve_ray_<host>.json``.
Not a test. A run took about 3 - 5 minutes on 2 cores when a level stopped at 120 requests; its levels
at high rates now last the whole ``--duration``.

    python bench/bench_serve_ray.py                  # the demo's models, 4 particles per request
    python bench/bench_serve_ray.py --particles 16
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _machine import machine_info
from _plot import write_json
from bench_serve import (
    RESULTS,
    Server,
    add_load_arguments,
    free_port,
    judge,
    level_offsets,
    lone_over_http,
    ratio_text,
    request_body,
    run_level,
    summarise,
    sustained_ratio,
    sustained_summary,
    unit_gaps,
    verdict_mark,
)


class RayServer(Server):
    """``tiltsmc serve --ray --replicas K --demo`` in a subprocess; ready once K replicas have answered
    (stopped as :class:`bench_serve.Server` stops its servers: SIGTERM, which takes Ray down)."""

    def __init__(self, replicas: int, args: argparse.Namespace, log_dir: Path) -> None:
        port = free_port()
        command = [
            sys.executable, "-m", "tiltsmc.cli", "serve", "--ray", "--demo", "--replicas", str(replicas),
            "--replica-cpus", str(args.replica_cpus), "--port", str(port),
        ]  # fmt: skip
        super().__init__(f"ray{replicas}", command, port, log_dir)
        self.replicas = replicas

    def __enter__(self) -> RayServer:
        import httpx

        self._log = self.log_path.open("wb")
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        began, seen = time.perf_counter(), set()
        probe = request_body("57 a+8 b-3\n", 0, 2, "demo")
        while len(seen) < self.replicas:
            if self.process.poll() is not None or time.perf_counter() - began > 240:
                self.__exit__()
                raise RuntimeError(
                    f"Ray Serve with {self.replicas} replicas did not come up: {self.log_path}"
                )
            try:
                answer = httpx.post(self.base + "/v1/completions", json=probe, timeout=30)
                if answer.status_code == 200:
                    seen.add(answer.headers["x-tiltsmc-instance"])
            except httpx.HTTPError:
                time.sleep(1)
        self.started_seconds = time.perf_counter() - began
        return self


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=4, help="particles per request")
    parser.add_argument("--horizon", type=int, default=8, help="operations per arithmetic problem (T)")
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs each replica reserves")
    parser.add_argument(
        "--rates", default="0.5,1,1.5,2,3,4,6,8,12,16", help="offered rates, multiples of 1 / lone latency"
    )
    add_load_arguments(parser, fixed_duration=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    from tiltsmc.tasks import arithmetic

    began = time.perf_counter()
    prompts = [p.prompt for p in arithmetic.make_problems(args.horizon, args.level_cap + 1, rng=args.seed)]
    gaps = unit_gaps(args.seed, args.particles, args.level_cap)  # every level's arrivals, scaled to its rate
    log_dir = Path(tempfile.mkdtemp(prefix="tiltsmc-serve-ray-"))  # the servers' logs
    runs: dict[int, dict[str, Any]] = {}
    target = rates = None
    for replicas in (1, 2):
        with RayServer(replicas, args, log_dir) as server:
            print(f"{replicas} replica(s): ready in {server.started_seconds:.0f} s", flush=True)
            lone_over_http(server.base, [request_body(prompts[0], 0, args.particles, "demo")] * 2)  # warm
            bodies = [
                request_body(prompts[k], k, args.particles, "demo") for k in range(1, args.lone_repeats + 1)
            ]
            lone = lone_over_http(server.base, bodies)
            if target is None:  # the one-replica lone latency sets the target and the rates for both
                reference = float(np.median(lone))
                target = args.target_factor * reference
                rates = [round(float(m) / reference, 2) for m in args.rates.split(",")]
                print(
                    f"  lone {1e3 * reference:.1f} ms; p99 target {target:.3f} s; rates {rates}", flush=True
                )
            levels, over = [], 0
            for rate in rates or []:
                offsets, capped = level_offsets(rate, args.duration, gaps)
                if capped:
                    print(f"  {rate:7.2f} req/s: more than --level-cap requests, the ladder ends", flush=True)
                    break
                level_bodies = [
                    request_body(prompts[k], k, args.particles, "demo") for k in range(len(offsets))
                ]
                level = summarise(
                    run_level(level_bodies, offsets, server.base, args.request_timeout), offsets, rate
                )
                judge(level, target)
                levels.append(level)
                print(
                    f"  {rate:7.2f} req/s offered: {level['completed']}/{level['requests']} done, "
                    f"{level['throughput']:6.2f} req/s, p50 {level['p50']:.3f} p99 {level['p99']:.3f} s"
                    + verdict_mark(level),
                    flush=True,
                )
                over = 0 if level["passed"] else over + 1
                if over >= 2:
                    break
            runs[replicas] = {
                "lone_http_seconds": lone,
                "lone_http_median": float(np.median(lone)),
                "levels": levels,
                **sustained_summary(levels),
            }
            runs[replicas]["sustained"] = runs[replicas]["sustained_rate"]
    one, two = runs[1]["sustained"], runs[2]["sustained"]
    # a ladder with no failed level gives a lower bound: on one side, the scaling is a bound too
    scaling, bound = sustained_ratio(runs[2], runs[1])
    lower = {k: ">= " if runs[k]["sustained_is_lower_bound"] else "" for k in (1, 2)}
    print(
        f"\nsustained at p99 <= {target:.3f} s ({args.particles} particles, demo's models): "
        f"1 replica {lower[1]}{one:.2f} req/s, 2 replicas {lower[2]}{two:.2f} req/s "
        f"({ratio_text(scaling, bound)}); per replica: {one:.2f} and {two / 2:.2f} req/s"
    )
    record = {
        "machine": machine_info(),
        "command": " ".join(sys.argv),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "p99_target_seconds": target,
        "runs": {str(k): v for k, v in runs.items()},
        "sustained_per_replica": {"1": one, "2": two / 2},
        "scaling_2_over_1": scaling,
        "scaling_bound": bound,
        "seconds": time.perf_counter() - began,
    }
    path = args.out / f"serve_ray_{record['machine'].get('hostname', 'host')}_{args.particles}p.json"
    write_json(path, record)


if __name__ == "__main__":
    main()
