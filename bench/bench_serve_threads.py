"""ONNX Runtime threads for ``tiltsmc serve``: the server at its default threads against ``--threads N``,
over real HTTP on 127.0.0.1, on the demo's models or a model of your own.

Why: a server's event loop (HTTP, JSON, tokenizing) and its engine worker share the cores. A session
with a second intra-op thread runs each call's operators on two cores; where a call's operators are
tiny (the demo's 90 k-parameter policy) that thread's start and wait cost more than they save, and
under load it competes with the event loop. Where the operators are large (a 135 M-parameter model) it
halves a step. This measures both sides on the same machine, so that ``--threads`` is chosen from
figures, not guessed.

Each setting (``--settings``: ``default`` for no ``--threads``, or a thread count) gets its own
``tiltsmc serve`` process in turn, ``--rounds`` times (a slower hour weighs on every setting alike).
Per server: ``--lone`` requests one at a time (the median latency, the first two untimed), then one
open-loop level (Poisson arrivals, seeded: the same schedule and requests for every setting) at each
``--rates`` multiple of ``1 / L``, ``L`` the default setting's median lone latency in the first round;
per level the throughput, p50 / p99 latency, the step time and tiltsmc's share of it from
``/metrics``. The summary gives each setting's medians over the rounds and their ratios to the
default's (the reference, measured in the same run).

Models: ``--models demo`` (the bundled arithmetic policy and process reward model; arithmetic problems
of the demo's horizon, 82 tokens at most) or ``--policy DIR`` with the ``tiltsmc serve`` options after
``--`` (e.g. SmolLM2 with a value head: ``--policy DIR -- --value-output value --step '\\n'``;
``--max-tokens`` new tokens per request, prompts "What is a + b?").

Not a test: the figures depend on the machine (recorded with them). JSON to ``--out``::

    python bench/bench_serve_threads.py --models demo --out bench/results/serve_threads_demo_vm.json
    python bench/bench_serve_threads.py --policy /work/models/smollm2-value-gqa --max-tokens 24 \\
        --rates 1,2 --out bench/results/serve_threads_smollm2_vm.json -- --value-output value --step '\\n'
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _machine import machine_info
from _plot import RESULTS, write_json
from bench_serve import (
    Server,
    arrival_offsets,
    engine_counters,
    engine_level_figures,
    free_port,
    lone_over_http,
    run_level,
    summarise,
)

DEMO_MAX_TOKENS = 82  # the demo's policy ends each solution at EOS within this many tokens


def serve_command(args: argparse.Namespace, setting: str, port: int) -> list[str]:
    """``tiltsmc serve`` for one setting (``default``: no ``--threads``)."""
    command = [sys.executable, "-m", "tiltsmc.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--demo"] if args.policy is None else ["--policy", str(args.policy), *args.serve_options]
    return command + ([] if setting == "default" else ["--threads", setting])


def request_bodies(args: argparse.Namespace, count: int) -> list[dict[str, Any]]:
    """Request ``k``: prompt ``k``, seed ``k``, ``--particles`` particles, SMC."""
    if args.policy is None:
        from tiltsmc.tasks import arithmetic

        prompts = [p.prompt for p in arithmetic.make_problems(8, count, rng=args.seed)]
        max_tokens = DEMO_MAX_TOKENS
    else:
        rng = np.random.default_rng(args.seed)
        prompts = [f"What is {a} + {b}?" for a, b in rng.integers(10, 100, size=(count, 2)).tolist()]
        max_tokens = args.max_tokens
    return [
        {"prompt": p, "max_tokens": max_tokens, "seed": k, "sampler": "smc", "particles": args.particles}
        for k, p in enumerate(prompts)
    ]


def one_server(
    args: argparse.Namespace,
    setting: str,
    bodies: list[dict[str, Any]],
    levels: list[tuple[float, np.ndarray]],
    log_dir: Path,
) -> dict[str, Any]:
    """The lone requests, then each level, against a fresh server of ``setting``; ``levels`` empty: set
    from this server's lone latency first (``plan_levels``)."""
    port = free_port()
    with Server(f"threads_{setting}", serve_command(args, setting, port), port, log_dir) as server:
        lone = lone_over_http(server.base, bodies[: args.lone + 2])[2:]
        out: dict[str, Any] = {"lone_seconds": lone, "lone_median": float(np.median(lone)), "levels": []}
        if not levels:
            levels.extend(plan_levels(args, out["lone_median"]))
        first = args.lone + 2
        for rate, offsets in levels:
            level_bodies = bodies[first : first + len(offsets)]
            first += len(offsets)
            before = engine_counters(server.base, "cli")
            records = run_level(level_bodies, offsets, server.base, args.request_timeout)
            level = summarise(records, offsets, rate)
            level.update(engine_level_figures(before, engine_counters(server.base, "cli")))
            out["levels"].append(level)
    return out


def plan_levels(args: argparse.Namespace, lone_seconds: float) -> list[tuple[float, np.ndarray]]:
    """Each level's rate (a ``--rates`` multiple of ``1 / lone_seconds``) and Poisson arrival times
    (bench_serve's ``arrival_offsets``: within ``--duration``, at least ``--min-requests``, at most
    ``--max-requests``)."""
    rng = np.random.default_rng(args.seed)
    rates = [float(m) / lone_seconds for m in args.rates.split(",") if m]
    return [(rate, arrival_offsets(rate, args, rng)) for rate in rates]


def summary(runs: dict[str, list[dict[str, Any]]], settings: list[str]) -> dict[str, Any]:
    """Each setting's medians over the rounds, and their ratios to the default's."""

    def medians(setting: str) -> dict[str, Any]:
        rounds = runs[setting]
        figures: dict[str, Any] = {"lone_median": statistics.median(r["lone_median"] for r in rounds)}
        figures["levels"] = [
            {
                "offered_rate": rounds[0]["levels"][k]["offered_rate"],
                **{
                    key: statistics.median(r["levels"][k][key] for r in rounds)
                    for key in (
                        "throughput",
                        "p50",
                        "p99",
                        "ms_per_step",
                        "tiltsmc_share",
                        "rows_per_policy_call",
                    )
                },
            }
            for k in range(len(rounds[0]["levels"]))
        ]
        return figures

    out = {setting: medians(setting) for setting in settings}
    reference = out["default"]
    for setting in settings:
        if setting == "default":
            continue
        mine = out[setting]
        mine["lone_over_default"] = mine["lone_median"] / reference["lone_median"]
        for level, ref in zip(mine["levels"], reference["levels"]):
            level["throughput_over_default"] = level["throughput"] / ref["throughput"]
            level["p99_over_default"] = level["p99"] / ref["p99"]
    return out


def server_text(result: dict[str, Any]) -> str:
    levels = [
        f"{lv['offered_rate']:.2f} req/s: {lv['throughput']:.2f} done/s, p99 {lv['p99']:.3f} s, step "
        f"{lv['ms_per_step'] or 0:.1f} ms, tiltsmc {100 * (lv['tiltsmc_share'] or 0):.1f}%"
        for lv in result["levels"]
    ]
    return "; ".join([f"lone {1e3 * result['lone_median']:.1f} ms", *levels])


def ratio_text(medians: dict[str, Any]) -> str:
    levels = [
        f"{lv['offered_rate']:.2f} req/s: throughput {lv['throughput_over_default']:.3f}x, "
        f"p99 {lv['p99_over_default']:.3f}x"
        for lv in medians["levels"]
    ]
    return "; ".join([f"lone {medians['lone_over_default']:.3f}x", *levels])


def main() -> None:
    argv = sys.argv[1:]
    serve_options = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--models", choices=("demo",), default="demo")
    source.add_argument("--policy", type=Path, default=None, help="a policy folder for tiltsmc serve")
    parser.add_argument("--max-tokens", type=int, default=24, help="new tokens a request (with --policy)")
    parser.add_argument("--settings", default="default,1", help="comma-separated: default or a thread count")
    parser.add_argument("--particles", type=int, default=4)
    parser.add_argument("--lone", type=int, default=15, help="lone requests timed per server")
    parser.add_argument(
        "--rates", default="2,4", help="levels' rates, multiples of 1 / the default's lone latency"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="arrival window of a level (s)")
    parser.add_argument("--min-requests", type=int, default=2, help="requests a level at least")
    parser.add_argument("--max-requests", type=int, default=400, help="requests a level at most")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_threads_vm.json")
    args = parser.parse_args(argv)
    args.serve_options = serve_options
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    for setting in settings:
        if setting != "default" and not (setting.isdigit() and int(setting) > 0):
            parser.error(f"--settings: expected 'default' or a thread count, got {setting!r}")
    if "default" not in settings:
        settings.insert(0, "default")
    settings.sort(key=lambda s: s != "default")  # the reference first in each round
    bodies = request_bodies(args, args.lone + 2 + args.max_requests * len(args.rates.split(",")))
    runs: dict[str, list[dict[str, Any]]] = {setting: [] for setting in settings}
    levels: list[tuple[float, np.ndarray]] = []
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_serve_threads_") as log_dir:
        for round_ in range(args.rounds):
            for setting in settings:  # the default first: its first lone latency sets the rates
                result = one_server(args, setting, bodies, levels, Path(log_dir))
                runs[setting].append(result)
                print(f"round {round_ + 1} threads {setting:>7}: {server_text(result)}", flush=True)
    medians = summary(runs, settings)
    for setting in settings[1:]:
        print(
            f"threads {setting} / default, medians over {args.rounds} rounds: {ratio_text(medians[setting])}"
        )
    write_json(
        args.out,
        {
            "machine": machine_info(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "definitions": {
                "reference": "the default setting (tiltsmc serve without --threads), run in the same rounds",
                "lone_median": "median latency of requests sent one at a time over HTTP",
                "rates": "--rates multiples of 1 / the default's median lone latency in the first round",
                "latency": "from a request's scheduled send time (open loop) to its response",
                "tiltsmc_share": "tiltsmc's seconds / step seconds over the level, from /metrics",
            },
            "runs": runs,
            "medians": medians,
            "seconds": time.perf_counter() - began,
        },
    )


if __name__ == "__main__":
    main()
