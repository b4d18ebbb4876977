"""tiltsmc's share of a serving step, in-process: one ``Lane`` at saturation, no HTTP, no other thread.

What ``bench_serve.py`` reads from ``/metrics`` (``engine.stats()``: the step time outside the models'
calls, as ``Compute`` times them) depends on the server's other threads, the load generator and the
machine; this isolates the lane. Requests (the demo's arithmetic problems, ``--particles`` each, seeded)
arrive ``--rate`` per step on average (a fixed fraction accumulated, as Poisson arrivals on average)
and join at the next step, as in the engine with every waiting request admitted, at most
``--inflight`` at once; after ``--warmup`` requests, ``--requests`` more are timed. Per step:

* wall time, and the models' share as ``Compute`` times it (``policy_seconds + reward_seconds``: their
  calls with their Python glue): tiltsmc's share is the rest, the figure of ``engine.stats()``;
* the time inside ONNX Runtime's ``session.run`` (every session): outside it, everything tiltsmc does,
  the models' glue included (a stricter share);
* the main thread's CPU time outside the models' calls: tiltsmc's own work, much less disturbed than wall
  time by other processes on the machine (it excludes waiting for a core);
* the part of tiltsmc's share spent joining batches (``Particles.concatenate``: the lane's state copied
  with the newcomers', a left-padded KV cache without its columns that are padding in every row; or,
  with a cache written in place, the newcomers written over the rows of requests that left,
  ``Particles.fill_rows``, or behind the batch's), with the bytes it writes. (Files written before
  ``fill_rows`` was counted here, ``lane_*_takeover_vm.json``, count ``concatenate`` alone.)

As the server's engine does, it keeps freed memory for reuse (``reuse_freed_memory``). Not a test; the
figures depend on the machine (its load average is printed and saved with them): JSON to
``bench/results/lane_<models>_<particles>p_vm.json`` (``--out``). Old and new code compare best run in turn.
``--compare-shared ROUNDS`` runs the same requests that many rounds, in turn with the runs' SMC steps shared
(one core call per particle count, as the engine does) and with one core call per request, and prints
tiltsmc's own time a step of each side by side (``lane_shared_<models>_<particles>p_vm.json``).

    python bench/bench_lane.py --models demo --particles 16 --rate 0.75 --inflight 6
    python bench/bench_lane.py --models fixtures --particles 4 --rate 1 --inflight 16
    python bench/bench_lane.py --models gqa --particles 4 --rate 1 --inflight 16 --requests 256 \\
        --cache-in-place off                 # and on: the KV cache written in place, joins in spare rows
    python bench/bench_lane.py --models demo --particles 4 --rate 2.5 --inflight 24 --requests 256 \\
        --compare-shared 4
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from _machine import machine_info
from _plot import RESULTS, write_json
from serve_baseline import FIXTURE_MAX_NEW_TOKENS, FIXTURES, load_models
from tiltsmc._memory import reuse_freed_memory
from tiltsmc.models import OnnxCausalLM, PolicyValue
from tiltsmc.models.particles import Particles
from tiltsmc.samplers._engine import Models
from tiltsmc.samplers.lane import Lane
from tiltsmc.samplers.result import Compute
from tiltsmc.samplers.sequential import smc_run
from tiltsmc.tasks import arithmetic

MODEL_CALLS = ("start", "propose", "log_value", "initial_log_value", "next_log_probs", "next_log_values")
MODEL_CALLS += ("append", "flush")


class Clocks:
    """Wall seconds inside ONNX Runtime's session calls, main-thread CPU seconds inside the models' calls,
    wall seconds joining batches and the bytes the joins wrote."""

    def __init__(self) -> None:
        self.session_wall = self.model_cpu = self.join_wall = 0.0
        self.join_bytes = 0
        self._depth = 0

    def install(self) -> None:
        for name in ("run", "run_with_iobinding"):  # the latter: a policy writing its cache in place
            self._time_session(name)
        for name in MODEL_CALLS:
            self._wrap(name)
        concatenate = Particles.concatenate

        def timed_join(parts: Any, **options: Any) -> Any:
            wall = time.perf_counter()
            joined = concatenate(parts, **options)
            self.join_wall += time.perf_counter() - wall
            arrays = [joined.tokens, joined.lengths, joined.finished, *joined.state.values()]
            self.join_bytes += sum(a.nbytes for a in arrays if isinstance(a, np.ndarray))
            for key, array in joined.state.items():  # joined into spare rows: the first part not copied
                first = parts[0].state.get(key)
                if isinstance(first, np.ndarray) and np.shares_memory(array, first):
                    self.join_bytes -= first.nbytes
            return joined

        Particles.concatenate = timed_join  # type: ignore[method-assign,assignment]
        fill_rows = Particles.fill_rows

        def timed_fill(particles: Particles, rows: Any, part: Particles) -> bool:
            wall = time.perf_counter()
            filled = fill_rows(particles, rows, part)
            self.join_wall += time.perf_counter() - wall
            if filled:
                arrays = [part.tokens, part.lengths, part.finished, *part.state.values()]
                self.join_bytes += sum(a.nbytes for a in arrays if isinstance(a, np.ndarray))
            return filled

        Particles.fill_rows = timed_fill  # type: ignore[method-assign]

    def _time_session(self, name: str) -> None:
        run = getattr(ort.InferenceSession, name)

        def timed_run(session: Any, *args: Any, **kwargs: Any) -> Any:
            wall = time.perf_counter()
            try:
                return run(session, *args, **kwargs)
            finally:
                self.session_wall += time.perf_counter() - wall

        setattr(ort.InferenceSession, name, timed_run)

    def _wrap(self, name: str) -> None:
        call = getattr(Models, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            self._depth += 1  # Models.reorder calls flush: count the outermost call only
            cpu = time.thread_time()
            try:
                return call(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.model_cpu += time.thread_time() - cpu

        setattr(Models, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models",
        choices=("demo", "demo-gqa", "fixtures", "gqa"),
        default="demo",
        help="demo: the demo's joint graph in the optimum layout (left-padded, its cache copied); demo-gqa: "
        "in the GroupQueryAttention layout (its cache written in place: what the demo loads on the CPU)",
    )
    parser.add_argument(
        "--cache-in-place",
        choices=("on", "off"),
        default="on",
        help="gqa (gqa-value-tiny and its value head, right-padded): its KV cache written in place, joins "
        "into spare rows; or copied at every call and join",
    )
    parser.add_argument("--particles", type=int, default=4)
    parser.add_argument("--rate", type=float, default=1.0, help="requests arriving per step, on average")
    parser.add_argument("--inflight", type=int, default=16, help="the most requests in flight")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/...)")
    parser.add_argument(
        "--compare-shared",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="instead: the same requests in ROUNDS rounds, in turn with the runs' SMC steps shared (one core "
        "call per particle count) and one core call per request, side by side",
    )
    args = parser.parse_args()

    clocks = Clocks()
    clocks.install()
    reuse_freed_memory()
    if args.models == "gqa":
        policy = OnnxCausalLM(
            FIXTURES / "gqa-value-tiny", max_new_tokens=FIXTURE_MAX_NEW_TOKENS, value_output="value",
            cache_in_place=args.cache_in_place == "on",
        )  # fmt: skip
        reward: Any = PolicyValue(policy, kind="logit")
    elif args.models.startswith("demo"):  # the demo's joint graph, in either layout
        policy, reward = arithmetic.load_models(gqa=args.models == "demo-gqa")
    else:
        policy, reward = load_models(args.models)
    max_new_tokens = 82 if args.models.startswith("demo") else FIXTURE_MAX_NEW_TOKENS
    prompts = [p.prompt for p in arithmetic.make_problems(8, args.warmup + args.requests, rng=0)]
    models = Models(policy, reward, Compute())
    lane = Lane(models, "guided")

    def drive(first: int, count: int, lane: Lane = lane) -> dict[str, float]:
        compute, before = models.compute, (clocks.session_wall, clocks.model_cpu, clocks.join_wall)
        join_bytes = clocks.join_bytes
        submitted = done = in_flight = steps = rows = 0
        credit, wall, cpu, model_wall = 1.0, 0.0, 0.0, 0.0
        while done < count:
            credit += args.rate
            while credit >= 1.0 and in_flight < args.inflight and submitted < count:
                k = first + submitted
                run = smc_run(
                    models, [prompts[k]], args.particles, "systematic", 0.5, "naive", k,
                    record_ancestry=False, max_steps=1_000_000, max_new_tokens=max_new_tokens,
                )  # fmt: skip
                run.decodes_texts = False  # as the engine's: texts decoded by the reader of the result
                lane.add(run)
                submitted, in_flight, credit = submitted + 1, in_flight + 1, credit - 1.0
            if not in_flight:
                continue
            models_before = compute.policy_seconds + compute.reward_seconds
            began, began_cpu = time.perf_counter(), time.thread_time()
            ended = lane.step()
            wall += time.perf_counter() - began
            cpu += time.thread_time() - began_cpu
            model_wall += compute.policy_seconds + compute.reward_seconds - models_before
            steps, rows = steps + 1, rows + lane.rows
            for _, error in ended:
                if error is not None:
                    raise error
                done, in_flight = done + 1, in_flight - 1
        return {
            "steps": steps,
            "rows": rows / steps,
            "wall": wall,
            "model_wall": model_wall,
            "session_wall": clocks.session_wall - before[0],
            "cpu": cpu,
            "model_cpu": clocks.model_cpu - before[1],
            "join_wall": clocks.join_wall - before[2],
            "join_bytes": clocks.join_bytes - join_bytes,
        }

    if args.compare_shared:
        compare_shared(args, drive, Lane(models, "guided"), _PerRequestLane(models, "guided"))
        return
    drive(0, args.warmup)
    machine = machine_info()
    load = os.getloadavg()[0]
    r = drive(args.warmup, args.requests)
    per_step = 1e3 / r["steps"]
    rest, outside_sessions = r["wall"] - r["model_wall"], r["wall"] - r["session_wall"]
    print(
        f"{args.models}, {args.particles} particles a request, {args.rate} arriving a step (at most "
        f"{args.inflight} in flight), {args.requests} requests: {r['steps']} steps of {r['rows']:.1f} rows\n"
        f"  a step {per_step * r['wall']:.2f} ms; the models' calls {per_step * r['model_wall']:.2f} ms; "
        f"tiltsmc's share {100 * rest / r['wall']:.1f}% ({per_step * rest:.3f} ms, as engine.stats)\n"
        f"  outside session calls {100 * outside_sessions / r['wall']:.1f}% "
        f"({per_step * outside_sessions:.3f} ms)\n"
        f"  main thread CPU a step {per_step * r['cpu']:.3f} ms, outside the models' calls "
        f"{per_step * (r['cpu'] - r['model_cpu']):.3f} ms\n"
        f"  joining batches {100 * r['join_wall'] / r['wall']:.1f}% of a step "
        f"({per_step * r['join_wall']:.3f} ms: {r['join_bytes'] / 1e6 / r['steps']:.2f} MB written a step, "
        f"{r['join_bytes'] / max(r['join_wall'], 1e-12) / 1e9:.1f} GB/s)\n"
        f"  load average {load:.2f} -> {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)"
    )
    record = {
        "benchmark": "lane",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine,
        "loadavg_after": os.getloadavg(),
        "steps": r["steps"],
        "rows_per_step": r["rows"],
        "step_ms": per_step * r["wall"],
        "models_ms": per_step * r["model_wall"],
        "tiltsmc_share": rest / r["wall"],
        "outside_sessions_share": outside_sessions / r["wall"],
        "main_thread_cpu_ms": per_step * r["cpu"],
        "main_thread_cpu_outside_models_ms": per_step * (r["cpu"] - r["model_cpu"]),
        "join_share": r["join_wall"] / r["wall"],
        "join_ms": per_step * r["join_wall"],
        "join_megabytes_per_step": r["join_bytes"] / 1e6 / r["steps"],
    }
    name = args.models + ("_copied" if args.models == "gqa" and args.cache_in_place == "off" else "")
    write_json(args.out or RESULTS / f"lane_{name}_{args.particles}p_vm.json", record)


class _PerRequestLane(Lane):
    """The lane as it was: each request's SMC step its own core call (no step shared between runs)."""

    def _shared_steps(self) -> dict[Any, Any]:
        return {}


def compare_shared(args: argparse.Namespace, drive: Any, shared: Lane, alone: Lane) -> None:
    """``--compare-shared``: tiltsmc's own time a step with the runs' SMC steps shared and one core call
    per request, the same requests, the two in turn for ``args.compare_shared`` rounds."""
    lanes = {"shared": shared, "per request": alone}
    for lane in lanes.values():
        drive(0, args.warmup, lane)
    machine, load = machine_info(), os.getloadavg()[0]
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in lanes}
    for r in range(args.compare_shared):
        for name in list(lanes)[:: 1 if r % 2 == 0 else -1]:
            run = drive(args.warmup, args.requests, lanes[name])
            per_step = 1e3 / run["steps"]
            rounds[name].append({
                "step_ms": per_step * run["wall"],
                "tiltsmc_ms": per_step * (run["wall"] - run["model_wall"]),
                "tiltsmc_share": (run["wall"] - run["model_wall"]) / run["wall"],
                "rows_per_step": run["rows"],
            })  # fmt: skip
    median = {name: {k: float(np.median([x[k] for x in rs])) for k in rs[0]} for name, rs in rounds.items()}
    ratio = median["per request"]["tiltsmc_ms"] / median["shared"]["tiltsmc_ms"]
    print(
        f"{args.models}, {args.particles} particles a request, {args.rate} arriving a step (at most "
        f"{args.inflight} in flight), {args.requests} requests, {args.compare_shared} rounds in turn "
        "(medians):"
    )
    for name, m in median.items():
        each = ", ".join(f"{x['tiltsmc_ms']:.3f}" for x in rounds[name])
        print(
            f"  {name:12s} step {m['step_ms']:.2f} ms, tiltsmc {m['tiltsmc_ms']:.3f} ms a step "
            f"({100 * m['tiltsmc_share']:.1f}%; rounds {each})"
        )
    print(f"  tiltsmc's own time, one call per request / shared: {ratio:.3f}x")
    print(f"  load average {load:.2f} -> {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    record = {
        "benchmark": "lane, shared SMC steps against one core call per request",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine,
        "loadavg_after": os.getloadavg(),
        "rounds": rounds,
        "medians": median,
        "tiltsmc_ratio_per_request_over_shared": ratio,
    }
    default = RESULTS / f"lane_shared_{args.models}_{args.particles}p_vm.json"
    write_json(args.out or default, record)


if __name__ == "__main__":
    main()
