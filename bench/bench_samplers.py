#!/usr/bin/env python3
"""Per-step time of one SMC run, split into policy, reward and bookkeeping, against the bare core.

Run ``python bench/bench_samplers.py [--quick] [--prompts 1024] [--particles 64] [--horizon 64] [--vocab 16]
[--states 4] [--runs R] [--threads N] [--profile] [--out PATH]``.

The task is ``MarkovDFATask.random(V, Q, T, rng=0)`` with the twist ``task.twist(noise=0.3, rng=1)``, and
``tiltsmc.smc(policy, twist, prompts=[()] * B, num_particles=N, ess_threshold=...)`` is run ``R`` times at
``ess_threshold=0.5`` and at ``1.0`` (resample every step), alternately. ``result.compute`` splits each run
into policy, reward and bookkeeping seconds (bookkeeping = total - policy - reward: weights, resampling,
reordering, Python glue, and the end of the run: samples, normalised weights, the result); each is divided
by the run's number of steps, and the table shows the median (and min) over the runs.

The reference, timed in the same process (half of its repeats before the SMC runs, half after), is one bare
``tiltsmc.core.resample(logw (B, N), "systematic")`` plus one in-place
``tiltsmc.core.gather(tokens (B, N, T) int64, ancestors, out=tokens)`` with the ancestors of that resample.
To make those ancestors realistic, ``logw`` is Gaussian with the spread that gives the ESS the SMC run
actually sees before resampling (``ESS / N = exp(-sigma**2)`` for Gaussian log-weights); the script also
reports the reference with standard-normal ``logw`` (as bench_core.py uses) and the gather with the
ancestors recorded by a real run. The bar: bookkeeping per step <= 2 x reference (median over repeats).

``--profile`` then profiles one run per threshold with the model calls taken off the clock (the policy and
the twist are wrapped so that a clock stops while they run), so every figure is bookkeeping: cProfile's top
entries by cumulative and by own time, and the lines of tiltsmc's own files (samplers, models, core
wrappers) by inclusive time, from a line tracer.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import linecache
import math
import os
import pstats
import re
import socket
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import tiltsmc
from _machine import load_average, machine_info
from tiltsmc import core
from tiltsmc.tasks import MarkovDFATask

SEED = 20240521
THRESHOLDS = (0.5, 1.0)
BAR = 2.0
TOP = 15


# ---------------------------------------------------------------- machine (as bench_core.py, copied)


def run_smc(
    policy: Any, reward: Any, args: argparse.Namespace, threshold: float, seed: int, record: bool = False
) -> tuple[dict[str, Any], tiltsmc.SamplerResult]:
    result = tiltsmc.smc(
        policy,
        reward,
        prompts=[()] * args.prompts,
        num_particles=args.particles,
        resample="systematic",
        ess_threshold=threshold,
        rng=seed,
        record_ancestry=record,
    )
    steps = int(result.ess.shape[1])
    record_ = {
        "ess_threshold": threshold,
        "seed": seed,
        "steps": steps,
        "steps_with_resampling": int(result.resampled.any(axis=0).sum()),
        "resampled_row_fraction": float(result.resampled.mean()),
        "median_ess_fraction": float(np.median(result.ess) / args.particles),
        "compute": result.compute.to_dict(),
    }
    return record_, result


PARTS = ("policy", "reward", "bookkeeping", "total")


def summarise_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and min over runs of each part's seconds per step."""
    out: dict[str, Any] = {"runs": len(runs), "steps": runs[0]["steps"]}
    for part in PARTS:
        per_step = [r["compute"][f"{part}_seconds"] / r["steps"] for r in runs]
        out[f"{part}_per_step_s"] = {"median": statistics.median(per_step), "min": min(per_step)}
    out["steps_with_resampling"] = statistics.median(r["steps_with_resampling"] for r in runs)
    out["resampled_row_fraction"] = statistics.median(r["resampled_row_fraction"] for r in runs)
    return out


# ---------------------------------------------------------------- the reference: bare resample + gather


def time_reference(
    gen: np.random.Generator, tokens: np.ndarray, sigma: float, repeats: int
) -> dict[str, list[float]]:
    """Per repeat: a fresh Gaussian ``logw`` (untimed), then one timed resample and one timed in-place
    gather of ``tokens`` with its ancestors (the buffer keeps evolving, as the SMC run's does)."""
    batch, n = tokens.shape[:2]
    identity = np.arange(n)
    out: dict[str, list[float]] = {"resample": [], "gather": [], "sum": [], "moved_fraction": []}
    for _ in range(repeats):
        logw = sigma * gen.standard_normal((batch, n))
        began = time.perf_counter()
        ancestors = core.resample(logw, "systematic", rng=gen)
        resampled = time.perf_counter()
        core.gather(tokens, ancestors, out=tokens)
        gathered = time.perf_counter()
        out["resample"].append(resampled - began)
        out["gather"].append(gathered - resampled)
        out["sum"].append(gathered - began)
        out["moved_fraction"].append(float(np.mean(ancestors != identity)))
    return out


def time_recorded_gather(tokens: np.ndarray, ancestry: list[np.ndarray], repeats: int) -> list[float]:
    """In-place gather of ``tokens`` with the ancestors a real run drew, cycling through its steps."""
    times = []
    for k in range(repeats):
        ancestors = ancestry[k % len(ancestry)]
        began = time.perf_counter()
        core.gather(tokens, ancestors, out=tokens)
        times.append(time.perf_counter() - began)
    return times


def stats_of(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "repeats": len(samples)}


# ---------------------------------------------------------------- profiling the bookkeeping only


class ModelClock:
    """``perf_counter`` that stops while a model runs: a profiler on this clock sees only bookkeeping."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.paused_at: Optional[float] = None

    def __call__(self) -> float:
        now = self.paused_at if self.paused_at is not None else time.perf_counter()
        return now - self.offset

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.paused_at = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.offset += time.perf_counter() - self.paused_at
            self.paused_at = None


class PausedPolicy:
    """The token policy, its calls off the clock."""

    def __init__(self, inner: Any, clock: ModelClock) -> None:
        self.inner, self.clock, self.vocab_size = inner, clock, inner.vocab_size

    def start(self, prompts: Any, num_particles: int) -> Any:
        return self.clock.call(self.inner.start, prompts, num_particles)

    def propose(self, particles: Any, rng: np.random.Generator) -> Any:
        return self.clock.call(self.inner.propose, particles, rng)

    def next_log_probs(self, particles: Any) -> Any:
        return self.clock.call(self.inner.next_log_probs, particles)

    def append(self, particles: Any, tokens: Any) -> Any:
        return self.clock.call(self.inner.append, particles, tokens)


class PausedTwist:
    """The twist model, its calls off the clock."""

    def __init__(self, inner: Any, clock: ModelClock) -> None:
        self.inner, self.clock = inner, clock

    def initial_log_value(self, particles: Any) -> Any:
        return self.clock.call(self.inner.initial_log_value, particles)

    def log_value(self, particles: Any) -> Any:
        return self.clock.call(self.inner.log_value, particles)

    def next_log_values(self, particles: Any) -> Any:
        return self.clock.call(self.inner.next_log_values, particles)


def _short(filename: str) -> str:
    for anchor in ("/tiltsmc/", "/numpy/"):
        if anchor in filename:
            return anchor[1:] + filename.rsplit(anchor, 1)[1]
    return os.path.basename(filename)


def _func_name(func: tuple[str, int, str]) -> str:
    filename, line, name = func
    return name if filename == "~" else f"{_short(filename)}:{line}({name})"


def cprofile_entries(stats: pstats.Stats, key: str, steps: int) -> list[dict[str, Any]]:
    """The top entries by ``key`` ("cumtime" or "tottime"), this script's own frames left out."""
    here = os.path.abspath(__file__)
    rows = []
    for func, (primitive, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        if os.path.abspath(func[0]) == here:
            continue
        ncalls = str(calls) if calls == primitive else f"{calls}/{primitive}"
        rows.append(
            {"function": _func_name(func), "ncalls": ncalls, "tottime_s": tottime, "cumtime_s": cumtime}
        )
    rows.sort(key=lambda r: r[f"{key}_s"], reverse=True)
    for r in rows:
        r["tottime_ms_per_step"] = 1e3 * r["tottime_s"] / steps
        r["cumtime_ms_per_step"] = 1e3 * r["cumtime_s"] / steps
    return rows[:TOP]


def line_profile(run: Callable[[], Any], clock: ModelClock, roots: list[str]) -> dict[tuple[str, int], list]:
    """Inclusive time (on ``clock``) and hits of every line run in a file under one of ``roots``."""
    totals: dict[tuple[str, int], list] = defaultdict(lambda: [0.0, 0, ""])

    def global_trace(frame: Any, event: str, arg: Any) -> Any:
        filename = frame.f_code.co_filename
        if event != "call" or not filename.startswith(tuple(roots)):
            return None
        state = [frame.f_lineno, clock()]

        def local_trace(frame: Any, event: str, arg: Any) -> Any:
            now = clock()
            entry = totals[(filename, state[0])]
            entry[0] += now - state[1]
            entry[2] = frame.f_code.co_name if not entry[2] else entry[2]
            if event == "line":
                state[0] = frame.f_lineno
                totals[(filename, state[0])][1] += 1
            state[1] = clock()  # the tracer's own time stays out of this frame's lines
            return local_trace

        return local_trace

    sys.settrace(global_trace)
    try:
        run()
    finally:
        sys.settrace(None)
    return totals


def profile_threshold(
    policy: Any, reward: Any, args: argparse.Namespace, threshold: float, unprofiled_s: float
) -> dict[str, Any]:
    package = os.path.dirname(os.path.abspath(tiltsmc.__file__))
    roots = [
        os.path.join(package, "samplers") + os.sep,
        os.path.join(package, "models") + os.sep,
        os.path.join(package, "core.py"),
        os.path.join(package, "_rng.py"),
    ]
    clock = ModelClock()
    paused_policy, paused_twist = PausedPolicy(policy, clock), PausedTwist(reward, clock)

    def one_run() -> dict[str, Any]:
        return run_smc(paused_policy, paused_twist, args, threshold, SEED)[0]

    profiler = cProfile.Profile(clock)
    profiler.enable()
    record = one_run()
    profiler.disable()
    stats = pstats.Stats(profiler)
    steps = record["steps"]
    profiled_s = stats.total_tt  # type: ignore[attr-defined]
    lines = line_profile(one_run, clock, roots)
    smc_file = os.path.join(package, "samplers")
    traced_s = sum(v[0] for (f, _), v in lines.items() if v[2] == "smc" and f.startswith(smc_file))
    line_rows = []
    for (filename, lineno), (seconds, hits, function) in lines.items():
        line_rows.append(
            {
                "line": f"{_short(filename)}:{lineno}",
                "function": function,
                "ms_per_step": 1e3 * seconds / steps,
                "hits_per_step": hits / steps,
                "source": linecache.getline(filename, lineno).strip(),
            }
        )
    line_rows.sort(key=lambda r: r["ms_per_step"], reverse=True)
    return {
        "ess_threshold": threshold,
        "steps": steps,
        "bookkeeping_unprofiled_ms_per_step": 1e3 * unprofiled_s,
        "bookkeeping_cprofile_ms_per_step": 1e3 * profiled_s / steps,
        "bookkeeping_line_traced_ms_per_step": 1e3 * traced_s / steps,
        "cprofile_cumulative": cprofile_entries(stats, "cumtime", steps),
        "cprofile_tottime": cprofile_entries(stats, "tottime", steps),
        "lines_inclusive": line_rows[:25],
    }


def print_profile(p: dict[str, Any]) -> None:
    print(
        f"\n==== profile, ess_threshold={p['ess_threshold']}: bookkeeping only (model calls off the clock); "
        f"ms per step: unprofiled {p['bookkeeping_unprofiled_ms_per_step']:.3f}, under cProfile "
        f"{p['bookkeeping_cprofile_ms_per_step']:.3f}, under the line tracer "
        f"{p['bookkeeping_line_traced_ms_per_step']:.3f}"
    )
    for key, title in (("cprofile_cumulative", "cumulative"), ("cprofile_tottime", "own time")):
        print(f"\ncProfile, top {TOP} by {title} (ms per step):")
        print(f"  {'ncalls':>10} {'tottime':>9} {'cumtime':>9}  function")
        for r in p[key]:
            print(
                f"  {r['ncalls']:>10} {r['tottime_ms_per_step']:>9.3f} {r['cumtime_ms_per_step']:>9.3f}  "
                f"{r['function']}"
            )
    print("\nlines of tiltsmc's bookkeeping path, by inclusive time (a call's line includes its callees'):")
    print(f"  {'ms/step':>8} {'hits/step':>9}  {'line':<34} {'function':<18} source")
    for r in p["lines_inclusive"]:
        print(
            f"  {r['ms_per_step']:>8.3f} {r['hits_per_step']:>9.2f}  {r['line']:<34} {r['function']:<18} "
            f"{r['source'][:70]}"
        )


# ---------------------------------------------------------------- report


def ms(seconds: float) -> str:
    return f"{1e3 * seconds:.3f}"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 runs per threshold and 20 reference repeats")
    parser.add_argument("--prompts", type=int, default=1024, help="B (default 1024)")
    parser.add_argument("--particles", type=int, default=64, help="N (default 64)")
    parser.add_argument("--horizon", type=int, default=64, help="T (default 64)")
    parser.add_argument("--vocab", type=int, default=16, help="V (default 16)")
    parser.add_argument("--states", type=int, default=4, help="Q, DFA states (default 4)")
    parser.add_argument("--noise", type=float, default=0.3, help="twist noise (default 0.3)")
    parser.add_argument("--runs", type=int, help="SMC runs per threshold (default 5, --quick 2)")
    parser.add_argument("--repeats", type=int, help="reference repeats (default 100, --quick 20)")
    parser.add_argument("--threads", type=int, help="tiltsmc.core.set_num_threads(N) before timing")
    parser.add_argument("--profile", action="store_true", help="then profile the bookkeeping path")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/samplers_<hostname>.json)")
    args = parser.parse_args(argv)
    runs = args.runs or (2 if args.quick else 5)
    repeats = args.repeats or (20 if args.quick else 100)
    if args.threads is not None:
        core.set_num_threads(args.threads)
    info = machine_info()
    print(
        f"{info['cpu_model']} ({info['cpus_usable']} usable cpus), numpy {info['numpy']}, tiltsmc threads "
        f"{info['tiltsmc_num_threads']}, load {info['loadavg']}"
    )
    task = MarkovDFATask.random(args.vocab, Q=args.states, T=args.horizon, rng=0)
    policy, twist = task.policy(), task.twist(noise=args.noise, rng=1)
    shape = (args.prompts, args.particles)
    print(f"{task!r}, twist noise {args.noise}, {args.prompts} prompts x {args.particles} particles")
    print(f"{runs} SMC runs per ess_threshold, {repeats} repeats of the reference\n")

    # Warm-up, and the ancestors and the ESS a real resampling step sees.
    warm, warm_result = run_smc(policy, twist, args, 1.0, SEED - 1, record=True)
    assert warm_result.ancestry is not None
    ess_fraction = float(np.median(warm_result.ess[warm_result.resampled]) / args.particles)
    sigma = math.sqrt(max(-math.log(ess_fraction), 0.0))
    identity = np.arange(args.particles)
    ancestry = [
        np.ascontiguousarray(warm_result.ancestry[:, k, :])
        for k in range(warm_result.ancestry.shape[1])
        if warm_result.resampled[:, k].any()
    ]
    recorded_moved = float(np.mean([np.mean(a != identity) for a in ancestry]))
    del warm_result

    gen = np.random.default_rng(SEED)
    tokens = gen.integers(0, args.vocab, size=(*shape, args.horizon), dtype=np.int64)
    half = max(repeats // 2, 1)
    ref_before = {
        "matched": time_reference(gen, tokens, sigma, half),
        "standard_normal": time_reference(gen, tokens, 1.0, half),
    }
    recorded_before = time_recorded_gather(tokens, ancestry, half)

    records: dict[float, list[dict[str, Any]]] = {t: [] for t in THRESHOLDS}
    for k in range(runs):
        for threshold in THRESHOLDS:
            records[threshold].append(run_smc(policy, twist, args, threshold, SEED + k)[0])

    ref_after = {
        "matched": time_reference(gen, tokens, sigma, repeats - half),
        "standard_normal": time_reference(gen, tokens, 1.0, repeats - half),
    }
    recorded_after = time_recorded_gather(tokens, ancestry, repeats - half)
    loadavg_after = load_average()

    reference: dict[str, Any] = {}
    for name in ("matched", "standard_normal"):
        entry: dict[str, Any] = {"sigma": sigma if name == "matched" else 1.0}
        for part in ("resample", "gather", "sum"):
            entry[f"{part}_s"] = stats_of(ref_before[name][part] + ref_after[name][part])
        entry["sum_s"]["median_before"] = statistics.median(ref_before[name]["sum"])
        entry["sum_s"]["median_after"] = statistics.median(ref_after[name]["sum"])
        entry["moved_fraction"] = statistics.mean(
            ref_before[name]["moved_fraction"] + ref_after[name]["moved_fraction"]
        )
        reference[name] = entry
    reference["recorded_gather_s"] = stats_of(recorded_before + recorded_after)
    reference["recorded_moved_fraction"] = recorded_moved
    reference["run_ess_fraction_at_resampling"] = ess_fraction
    ref_s = reference["matched"]["sum_s"]["median"]
    ref_normal_s = reference["standard_normal"]["sum_s"]["median"]

    summaries = {t: summarise_runs(records[t]) for t in THRESHOLDS}
    head = [
        "ess_threshold",
        "steps",
        "resampling steps",
        "policy",
        "reward",
        "bookkeeping",
        "(min)",
        "total",
        "bk/ref",
        "bk/ref(N(0,1))",
        "bar",
    ]
    table, bars = [], []
    for threshold, s in summaries.items():
        bk = s["bookkeeping_per_step_s"]["median"]
        ratio, ratio_normal = bk / ref_s, bk / ref_normal_s
        verdict = "PASS" if ratio <= BAR else "FAIL"
        bars.append(
            {
                "bar": f"ess_threshold={threshold}: bookkeeping per step / (bare resample + token gather)",
                "value": ratio,
                "op": "<=",
                "threshold": BAR,
                "pass": ratio <= BAR,
                "value_with_standard_normal_logw": ratio_normal,
            }
        )
        table.append(
            [
                f"{threshold}",
                str(s["steps"]),
                f"{s['steps_with_resampling']:g}",
                ms(s["policy_per_step_s"]["median"]),
                ms(s["reward_per_step_s"]["median"]),
                ms(bk),
                ms(s["bookkeeping_per_step_s"]["min"]),
                ms(s["total_per_step_s"]["median"]),
                f"{ratio:.2f}",
                f"{ratio_normal:.2f}",
                verdict,
            ]
        )
    print("per step, ms (median over runs):")
    widths = [max(len(row[i]) for row in [head, *table]) for i in range(len(head))]
    for i, row in enumerate([head, *table]):
        print("  " + "  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))
    m, n = reference["matched"], reference["standard_normal"]
    print(f"\nreference, ms (median of {repeats} repeats, half before the SMC runs, half after):")
    print(
        f"  resample {ms(m['resample_s']['median'])} + in-place gather of the "
        f"{args.prompts}x{args.particles}x{args.horizon} int64 tokens {ms(m['gather_s']['median'])} "
        f"= {ms(ref_s)} "
        f"(before the runs {ms(m['sum_s']['median_before'])}, after {ms(m['sum_s']['median_after'])})"
    )
    print(
        f"  logw ~ N(0, {sigma:.3f}^2): ESS/N = {ess_fraction:.3f} as the run's resampling steps see it; "
        f"{m['moved_fraction']:.0%} of the particles move (in the run: {recorded_moved:.0%})"
    )
    print(f"  gather with the ancestors recorded in a run: {ms(reference['recorded_gather_s']['median'])}")
    print(
        f"  logw ~ N(0, 1) instead: resample {ms(n['resample_s']['median'])} + gather "
        f"{ms(n['gather_s']['median'])} = {ms(ref_normal_s)} ({n['moved_fraction']:.0%} move)"
    )
    for b in bars:
        print(f"  {'PASS' if b['pass'] else 'FAIL'}  {b['bar']} = {b['value']:.2f} (need <= {BAR:g})")

    profiles = []
    if args.profile:
        for threshold in THRESHOLDS:
            unprofiled = summaries[threshold]["bookkeeping_per_step_s"]["median"]
            profiles.append(profile_threshold(policy, twist, args, threshold, unprofiled))
            print_profile(profiles[-1])

    info["loadavg_after"] = loadavg_after
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "machine"
    out = args.out or Path(__file__).resolve().parent / "results" / f"samplers_{host}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    args_json = {
        "quick": args.quick,
        "prompts": args.prompts,
        "particles": args.particles,
        "horizon": args.horizon,
        "vocab": args.vocab,
        "states": args.states,
        "noise": args.noise,
        "runs": runs,
        "repeats": repeats,
        "threads": args.threads,
        "seed": SEED,
        "task": repr(task),
        "resample": "systematic",
    }
    out.write_text(
        json.dumps(
            {
                "machine": info,
                "args": args_json,
                "warm_up_run": warm,
                "runs": {str(t): records[t] for t in THRESHOLDS},
                "per_step": {str(t): summaries[t] for t in THRESHOLDS},
                "reference": reference,
                "bars": bars,
                "profile": profiles,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
