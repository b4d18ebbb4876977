"""Engine variants against each other and the baseline on the same schedules (issue #15): overload, and
workers.

Servers on 127.0.0.1, each in its own process, loaded with the same models (``bench_serve.py``'s
configurations). ``--compare rows`` (the default): ``engine`` is ``tiltsmc serve`` as shipped
(``--adaptive-rows on``: past the batch size where a step's rows stop getting cheaper, requests wait in
the queue), ``engine-fixed-rows`` the same with ``--adaptive-rows off`` (every waiting request joins
while it fits under ``--max-batch-rows``, 4096), ``baseline`` one ``tiltsmc.smc`` call per request
(``serve_baseline.py``). ``--compare workers``: ``engine`` (one worker, ONNX Runtime's threads) and
``engine-2-workers`` (``--workers 2``: two batches stepped side by side, one ONNX Runtime thread each on
two cores), ``baseline`` and ``baseline-1-thread`` (its sessions with one intra-op thread, as the
two-worker engine's). The baseline's median lone-request latency over HTTP ``L`` (the faster
baseline's) sets the rates (``--multiples`` of ``1 / L``); at each rate every system gets the same
seeded open-loop Poisson schedule (``bench_serve.py``'s levels: at least ``--min-requests``, at most
``--max-requests``), the systems in turn, for ``--rounds`` rounds. Per system and level: throughput,
p50 / p99 latency, and for the engines rows per policy call and tiltsmc's share of a step (from
``/metrics``); the server's page faults. Ratios are per round (the same schedule, minutes
apart), then their median. Not a test. JSON to ``bench/results/overload_<host>.json``.

    python bench/bench_overload.py                       # demo's models, 16 particles, 1x and 3x
    python bench/bench_overload.py --particles 4 --multiples 1,4
    python bench/bench_overload.py --compare workers --multiples 0.5,1,2,3 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _machine import git_commit, machine_info
from _plot import write_json
from bench_serve import (
    CONFIGS,
    HERE,
    RESULTS,
    Server,
    add_load_arguments,
    arrival_offsets,
    free_port,
    level_line,
    lone_over_http,
    request_body,
    run_one_level,
    server_command,
)

# name -> (bench_serve's system, options of tiltsmc serve or serve_baseline.py); the ratios reported
COMPARISONS: dict[str, tuple[dict[str, tuple[str, tuple[str, ...]]], tuple[tuple[str, str], ...]]] = {
    "rows": (
        {
            "baseline": ("baseline", ()),
            "engine": ("engine", ("--adaptive-rows", "on")),
            "engine-fixed-rows": ("engine", ("--adaptive-rows", "off")),
        },
        (("engine", "baseline"), ("engine", "engine-fixed-rows"), ("engine-fixed-rows", "baseline")),
    ),
    "workers": (
        {
            "baseline": ("baseline", ()),
            "baseline-1-thread": ("baseline", ("--threads", "1")),
            "engine": ("engine", ()),
            "engine-2-workers": ("engine", ("--workers", "2")),
        },
        (
            ("engine-2-workers", "engine"),
            ("engine-2-workers", "baseline"),
            ("engine-2-workers", "baseline-1-thread"),
            ("engine", "baseline-1-thread"),
            ("engine", "baseline"),
            ("baseline-1-thread", "baseline"),
        ),
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", choices=tuple(CONFIGS), default="demo")
    parser.add_argument("--particles", type=int, default=16)
    parser.add_argument("--horizon", type=int, default=8, help="operations per arithmetic problem (T)")
    parser.add_argument(
        "--multiples", default="1,3", help="rates, multiples of 1 / the baseline's lone latency"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--compare",
        choices=tuple(COMPARISONS),
        default="rows",
        help="rows: the engine with and without its learned row limit, and the baseline; workers: the "
        "engine with one and two workers, the baseline with ONNX Runtime's threads and with one",
    )
    add_load_arguments(parser)
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between levels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/...)")
    args = parser.parse_args()
    args.engine_server = "cli"  # run_one_level reads the engines' figures from tiltsmc serve's /metrics
    systems, ratios = COMPARISONS[args.compare]
    sys.path.insert(0, str(HERE))
    from tiltsmc.tasks import arithmetic

    multiples = [float(m) for m in args.multiples.split(",")]
    prompts = [p.prompt for p in arithmetic.make_problems(args.horizon, args.max_requests, rng=args.seed)]
    began, load_before = time.perf_counter(), os.getloadavg()
    levels: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
    with tempfile.TemporaryDirectory(prefix="bench_overload_") as log_dir, contextlib.ExitStack() as stack:
        servers = {}
        for name, (system, options) in systems.items():
            port = free_port()
            engine_options, baseline_options = (options, ()) if system == "engine" else ((), options)
            command = server_command(system, args.models, port, "cli", "on", engine_options, baseline_options)
            servers[name] = stack.enter_context(Server(system, command, port, Path(log_dir)))
            print(f"{name}: {' '.join(command[1:])}", flush=True)
        warmup = [request_body(prompts[0], 0, args.particles, args.models)] * 2
        lone: dict[str, list[float]] = {name: [] for name in systems}
        for name in systems:
            lone_over_http(servers[name].base, warmup)  # untimed: first calls at these shapes
        for k in range(1, args.lone_repeats + 1):
            for name in systems:
                body = request_body(prompts[k], k, args.particles, args.models)
                lone[name] += lone_over_http(servers[name].base, [body])
        # the faster baseline's (one slowed by the other servers' threads would set rates too low)
        medians = {name: float(np.median(times)) for name, times in lone.items()}
        reference = min(medians[name] for name, (system, _) in systems.items() if system == "baseline")
        rates = [round(m / reference, 2) for m in multiples]
        print(
            "lone over HTTP: "
            + ", ".join(f"{name} {1e3 * median:.1f} ms" for name, median in medians.items())
            + f"; rates {rates}",
            flush=True,
        )
        names = list(systems)
        for round_ in range(args.rounds):
            for index, rate in enumerate(rates):
                offsets = arrival_offsets(rate, args, np.random.default_rng([args.seed, index]))
                bodies = [
                    request_body(prompts[k], k, args.particles, args.models) for k in range(len(offsets))
                ]
                shift = (round_ + index) % len(names)  # each system first in turn
                for name in names[shift:] + names[:shift]:
                    server = servers[name]
                    level = run_one_level(server.system, server.base, server.pid, bodies, offsets, rate, args)
                    level["round"], level["multiple"] = round_, multiples[index]
                    level["within_target"] = True  # no target here: level_line prints no mark
                    levels[name].append(level)
                    print(f"  round {round_} {name:<17} " + level_line(server.system, args.particles, level))
                    time.sleep(args.pause)
    summary = []
    for index, rate in enumerate(rates):
        row: dict[str, Any] = {"offered_rate": rate, "multiple": multiples[index]}
        for name in systems:
            runs = [lv for lv in levels[name] if lv["offered_rate"] == rate]
            row[name] = {
                key: float(np.median([lv[key] for lv in runs]))
                for key in ("throughput", "p50", "p99", "rows_per_policy_call", "tiltsmc_share")
                if all(lv.get(key) is not None for lv in runs)
            }
        for top, bottom in ratios:
            paired = zip(
                [lv for lv in levels[top] if lv["offered_rate"] == rate],
                [lv for lv in levels[bottom] if lv["offered_rate"] == rate],
            )
            per_round = [(a["throughput"] / b["throughput"], a["p99"] / b["p99"]) for a, b in paired]
            row[f"{top}_over_{bottom}"] = {
                "throughput_per_round": [t for t, _ in per_round],
                "p99_per_round": [p for _, p in per_round],
                "throughput": float(np.median([t for t, _ in per_round])),
                "p99": float(np.median([p for _, p in per_round])),
            }
        summary.append(row)
    print(
        f"\n{CONFIGS[args.models]['label']}, {args.particles} particles per request, T = {args.horizon}; "
        f"medians of {args.rounds} rounds"
    )
    for row in summary:
        print(f"  {row['offered_rate']:.2f} req/s offered ({row['multiple']:g} / lone latency):")
        for name in systems:
            figures = row[name]
            share = figures.get("tiltsmc_share")
            rows = figures.get("rows_per_policy_call")
            print(
                f"    {name:<17} {figures['throughput']:6.2f} req/s done, p50 {figures['p50']:6.3f} s, "
                f"p99 {figures['p99']:6.3f} s"
                + ("" if rows is None else f", {rows:6.1f} rows per call")
                + ("" if share is None else f", tiltsmc {100 * share:4.1f}%")
            )
        for top, bottom in ratios:
            ratio = row[f"{top}_over_{bottom}"]
            print(
                f"    {top} / {bottom}: throughput {ratio['throughput']:.2f}x, p99 {ratio['p99']:.2f}x "
                f"(per round {', '.join(f'{t:.2f}' for t in ratio['throughput_per_round'])})"
            )
    import onnxruntime

    result = {
        "benchmark": "overload",
        "machine": machine_info(
            onnxruntime=onnxruntime.__version__, loadavg_before=load_before, git_commit=git_commit()
        ),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "lone_http_seconds": lone,
        "reference_seconds": reference,
        "levels": levels,
        "summary": summary,
        "seconds": time.perf_counter() - began,
        "loadavg_after": os.getloadavg(),
    }
    print(f"\n{result['seconds']:.0f} s; load average before {load_before}, after {os.getloadavg()}")
    write_json(args.out or RESULTS / f"overload_{socket.gethostname()}.json", result)


if __name__ == "__main__":
    main()
