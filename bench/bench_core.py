#!/usr/bin/env python3
"""Benchmark of the ``tiltsmc.core`` kernels against numpy references, ``particles`` and ``numpy.copy``.

The numpy reference of the gathers is the strongest plain numpy form (fancy indexing or one flat ``np.take``
out of place; in place, only the rows that move); ``np.take_along_axis`` is timed beside it.

Run ``python bench/bench_core.py [--quick] [--threads N] [--out PATH] [--check]``; see bench/README.md.
Every figure is the median (and min) wall time per call over repeats chosen to fill ~0.2 s.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import re
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference as ref
from _machine import machine_info

try:
    from tiltsmc import core as ts
except ImportError as error:  # benchmark the references alone, and say so
    ts, TS_MISSING = None, f"tiltsmc.core is not importable ({error}); tiltsmc columns skipped"
else:
    TS_MISSING = ""
try:
    import particles.resampling as pr
except ImportError:
    pr, PR_MISSING = None, "particles is not installed (pip install particles==0.4); its columns are skipped"
else:
    PR_MISSING = ""

SEED = 20240521
SHAPES = [(1, 2**20), (4096, 64), (64, 4096), (1, 64)]
DTYPES = [np.float64, np.float32]
SCHEMES = ("systematic", "stratified", "multinomial", "residual")
BLOCK = (64, 16, 4096)  # gather bar: float32 block (B, N, D)
LOGIT_SHAPES = [(256, 64), (64, 32768)]  # sample_logits: (rows, vocabulary)
CACHE = (4, 64, 2, 40, 16)  # reorder_in_place: one KV cache tensor (B, N, heads, positions, head size)
IMPLS = ["tiltsmc", "numpy", "take_along_axis", "particles", "particles_W", "copy"]
HEADERS = ["tiltsmc", "numpy", "take_along_axis", "particles", "particles(W)", "copy"]
# Out-of-place gathers time both plain numpy forms; the row's "numpy" is the faster (named in "numpy_is").
GATHER_CANDIDATES = ("numpy_fancy", "numpy_flat_take")
MOVED_ONLY = "moved rows only, in place"  # b, m = nonzero(a != arange(N)); x[b, m] = x[b, a[b, m]]


# ---------------------------------------------------------------- timing


def _run(fn: Callable[[], object], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return time.perf_counter() - start


def measure(fn: Callable[[], object], budget: float) -> dict[str, float]:
    """Per-call seconds: median and min over repeats of ``number`` calls, ~``budget`` seconds in all."""
    fn()  # warm-up: numba compilation, page faults, caches
    number, sample = 1, _run(fn, 1)
    while sample < budget / 20:  # grow the batch of calls until one repeat takes ~budget/20
        number = max(2 * number, min(10 * number, int(number * budget / 20 / max(sample, 1e-9)) + 1))
        sample = _run(fn, number)
    samples = [sample] + [_run(fn, number) for _ in range(max(2, round(budget / sample) - 1))]
    per_call = [s / number for s in samples]
    return {
        "median": statistics.median(per_call),
        "min": min(per_call),
        "repeats": len(samples),
        "calls_per_repeat": number,
    }


# ---------------------------------------------------------------- particles, as a user would call it today


def particles_resample(scheme: str, logw: np.ndarray) -> np.ndarray:
    """A Python loop over rows: exp-normalise the log-weights, then resample (particles takes W)."""
    fn, out = getattr(pr, scheme), np.empty(logw.shape, dtype=np.int64)
    for b, row in enumerate(logw):
        out[b] = fn(pr.exp_and_normalise(row), row.shape[0])
    return out


def particles_resample_w(scheme: str, weights: np.ndarray) -> np.ndarray:
    """The same on pre-normalised weights W (exp-normalisation not timed)."""
    fn, out = getattr(pr, scheme), np.empty(weights.shape, dtype=np.int64)
    for b, row in enumerate(weights):
        out[b] = fn(row, row.shape[0])
    return out


# ---------------------------------------------------------------- cases


def mostly_identity(batch: int, n: int, moved: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted ancestors equal to the identity except ``moved`` rows per batch row, where a[p] = p - 1."""
    ancestors = np.tile(np.arange(n), (batch, 1))
    for row in ancestors:
        p = rng.choice(np.arange(1, n), size=moved, replace=False)
        row[p] = p - 1
    return ancestors


Case = tuple[str, tuple[int, ...], str, dict[str, Any]]


def cases(rng: np.random.Generator) -> list[Case]:
    """(kernel, shape, dtype, {implementation: zero-argument callable, or False to skip}) per table row."""
    out: list[Case] = []
    gen = np.random.default_rng(SEED + 1)  # the Generator every random kernel draws from
    use_ts = ts is not None
    p = functools.partial
    for shape in SHAPES:
        for dtype in DTYPES:
            logw = rng.standard_normal(shape).astype(dtype)
            copy, name = p(np.copy, logw), np.dtype(dtype).name
            out.append(
                (
                    "log_normalize",
                    shape,
                    name,
                    {
                        "tiltsmc": use_ts and p(ts.log_normalize, logw),
                        "numpy": p(ref.log_normalize, logw),
                        "copy": copy,
                    },
                )
            )
            # particles accumulates W in its own dtype (no bounds check): float64 only
            use_pr = pr is not None and dtype == np.float64
            weights = np.exp(logw - logw.max(axis=1, keepdims=True))
            weights /= weights.sum(axis=1, keepdims=True)
            for scheme in SCHEMES:
                out.append(
                    (
                        f"resample:{scheme}",
                        shape,
                        name,
                        {
                            "tiltsmc": use_ts and p(ts.resample, logw, scheme, rng=gen),
                            "numpy": p(ref.resample, logw, scheme, shape[1], gen),
                            "particles": use_pr and p(particles_resample, scheme, logw),
                            "particles_W": use_pr and p(particles_resample_w, scheme, weights),
                            "copy": copy,
                        },
                    )
                )
            out.append(
                (
                    "pool_select",
                    shape,
                    name,
                    {
                        "tiltsmc": use_ts and p(ts.pool_select, logw, rng=gen),
                        "numpy": p(ref.pool_select, logw, gen),
                        "copy": copy,
                    },
                )
            )
            if dtype == np.float64:  # gather the log-weights themselves, with resampler-like ancestors
                ancestors = ref.resample(logw, "systematic", shape[1], rng)
                out.append(
                    (
                        "gather",
                        shape,
                        name,
                        {
                            "tiltsmc": use_ts and p(ts.gather, logw, ancestors),
                            "numpy_fancy": p(ref.gather, logw, ancestors),
                            "numpy_flat_take": p(ref.gather_flat_take, logw, ancestors),
                            "take_along_axis": p(ref.gather_take_along_axis, logw, ancestors),
                            "copy": copy,
                        },
                    )
                )
    for batch in sorted({shape[0] for shape in SHAPES} | {2**20}):  # mh_accept works on (B,) log Z
        current, proposed = rng.standard_normal(batch), rng.standard_normal(batch)
        out.append(
            (
                "mh_accept",
                (batch,),
                "float64",
                {
                    "tiltsmc": use_ts and p(ts.mh_accept, current, proposed, rng=gen),
                    "numpy": p(ref.mh_accept, current, proposed, gen),
                    "copy": p(np.copy, current),
                },
            )
        )
    block = rng.standard_normal(BLOCK).astype(np.float32)
    ancestors = ref.resample(rng.standard_normal(BLOCK[:2]), "systematic", BLOCK[1], rng)
    out.append(
        (
            "gather",
            BLOCK,
            "float32",
            {
                "tiltsmc": use_ts and p(ts.gather, block, ancestors),
                "numpy_fancy": p(ref.gather, block, ancestors),
                "numpy_flat_take": p(ref.gather_flat_take, block, ancestors),
                "take_along_axis": p(ref.gather_take_along_axis, block, ancestors),
                "copy": p(np.copy, block),
            },
        )
    )
    # A language model's token step: (prompts x particles, vocabulary) logits, float32 as models give them.
    for shape in LOGIT_SHAPES:
        logits = (rng.standard_normal(shape) * 3).astype(np.float32)
        out.append(
            (
                "sample_logits,T=0.8",
                shape,
                "float32",
                {
                    "tiltsmc": use_ts and p(ts.sample_logits, logits, 0.8, rng=gen),
                    "numpy": p(ref.sample_logits, logits, 0.8, gen),
                    "copy": p(np.copy, logits),
                },
            )
        )
    # KV caches following resampling: 4 float32 arrays (B, N, heads, positions, head size), the
    # ancestors of a systematic step with survivors kept in their slots (only dead particles' slots move).
    # numpy moves only those slots' rows, in its own copies of the caches.
    caches = [rng.standard_normal(CACHE).astype(np.float32) for _ in range(4)]
    numpy_caches = [c.copy() for c in caches]
    survivors = ref.resample(rng.standard_normal(CACHE[:2]) * 1.5, "systematic", CACHE[1], rng)
    if use_ts:
        survivors = ts.keep_survivors(survivors)
    out.append(
        (
            "reorder_in_place:4 caches",
            CACHE,
            "float32",
            {
                "tiltsmc": use_ts and p(ts.reorder_in_place, caches, survivors),
                "numpy": p(ref.reorder_in_place, numpy_caches, survivors),
                "take_along_axis": lambda: [ref.gather_take_along_axis(c, survivors) for c in caches],
                "copy": lambda: [np.copy(c) for c in caches],
            },
        )
    )
    near = mostly_identity(BLOCK[0], BLOCK[1], 2, rng)
    in_place, numpy_in_place = block.copy(), block.copy()
    out.append(
        (
            "gather:in-place,2/16 moved",
            BLOCK,
            "float32",
            {
                "tiltsmc": use_ts and p(ts.gather, in_place, near, out=in_place),
                "numpy": p(ref.gather_in_place, numpy_in_place, near),
                "take_along_axis": p(ref.gather_take_along_axis, block, near),
                "copy": p(np.copy, block),
            },
        )
    )
    return out


# ---------------------------------------------------------------- bars


def find(rows: list[dict], kernel: str, shape: tuple[int, ...], dtype: str = "float64") -> dict:
    return next(r for r in rows if (r["kernel"], tuple(r["shape"]), r["dtype"]) == (kernel, shape, dtype))


def median(row: dict, impl: str) -> float | None:
    return row["times"][impl]["median"] if impl in row["times"] else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or denominator is None else numerator / denominator


def bar(
    text: str,
    numerator: float | None,
    denominator: float | None,
    op: str,
    threshold: float,
    beside: tuple[str, float | None, float | None] | None = None,
) -> dict:
    """A bar on ``numerator / denominator``; SKIP when a figure is missing. ``beside``: ``(label, numerator,
    denominator)`` of a ratio reported next to the bar (no threshold on it)."""
    value = ratio(numerator, denominator)
    ok = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
    out = {"bar": text, "value": value, "op": op, "threshold": threshold, "pass": ok}
    if beside is not None:
        out["beside"] = {"ratio": beside[0], "value": ratio(beside[1], beside[2])}
    return out


def bars(rows: list[dict]) -> list[dict]:
    big, wide, small = (1, 2**20), (4096, 64), (1, 64)
    sys_big, sys_wide = find(rows, "resample:systematic", big), find(rows, "resample:systematic", wide)
    lognorm = find(rows, "log_normalize", big)
    block = find(rows, "gather", BLOCK, "float32")
    block_ip = find(rows, "gather:in-place,2/16 moved", BLOCK, "float32")
    out = [
        bar(
            "(1,2^20) systematic: particles (+exp-normalise) / tiltsmc",
            median(sys_big, "particles"),
            median(sys_big, "tiltsmc"),
            ">=",
            10,
        ),
        bar(
            "(1,2^20) systematic: tiltsmc / numpy.copy(logw)",
            median(sys_big, "tiltsmc"),
            median(sys_big, "copy"),
            "<=",
            3,
        ),
        bar(
            "(4096,64) systematic: particles row loop (+exp-normalise) / one tiltsmc call",
            median(sys_wide, "particles"),
            median(sys_wide, "tiltsmc"),
            ">=",
            50,
        ),
        bar(
            "(1,2^20) log_normalize: tiltsmc / numpy.copy(logw)",
            median(lognorm, "tiltsmc"),
            median(lognorm, "copy"),
            "<=",
            3,
        ),
    ]
    for row in rows:  # every kernel at (1, 64); mh_accept's single row is (1,)
        if tuple(row["shape"]) in (small, (1,)):
            out.append(
                bar(
                    f"{small} {row['kernel']} {row['dtype']}: tiltsmc seconds per call / 3 us",
                    median(row, "tiltsmc"),
                    3e-6,
                    "<=",
                    1,
                )
            )
    # The gather bars were set against take_along_axis; the strongest numpy reference is reported beside.
    out += [
        bar(
            f"{BLOCK} float32 gather: take_along_axis / tiltsmc",
            median(block, "take_along_axis"),
            median(block, "tiltsmc"),
            ">=",
            1,
            beside=(
                f"strongest numpy ({block.get('numpy_is', 'numpy')}) / tiltsmc",
                median(block, "numpy"),
                median(block, "tiltsmc"),
            ),
        ),
        bar(
            f"{BLOCK} float32 gather out=x, 2/16 moved: take_along_axis / tiltsmc",
            median(block_ip, "take_along_axis"),
            median(block_ip, "tiltsmc"),
            ">=",
            3,
            beside=(
                "strongest numpy (moved rows only, in place) / tiltsmc",
                median(block_ip, "numpy"),
                median(block_ip, "tiltsmc"),
            ),
        ),
    ]
    return out


# ---------------------------------------------------------------- report


def fmt_us(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    us = seconds * 1e6
    return f"{us:,.0f}" if us >= 1000 else f"{us:.3g}"


def fmt_ratio(num: float | None, den: float | None) -> str:
    return "-" if num is None or den is None else f"{num / den:.3g}"


def print_table(rows: list[dict]) -> None:
    head = [
        "kernel",
        "shape",
        "dtype",
        *[f"{h} us" for h in HEADERS],
        "np/ts",
        "tak/ts",
        "pt/ts",
        "ptW/ts",
        "ts/copy",
    ]
    lines = []
    for r in rows:
        m = {impl: median(r, impl) for impl in IMPLS}
        lines.append(
            [
                r["kernel"],
                "x".join(map(str, r["shape"])),
                r["dtype"],
                *[fmt_us(m[i]) for i in IMPLS],
                fmt_ratio(m["numpy"], m["tiltsmc"]),
                fmt_ratio(m["take_along_axis"], m["tiltsmc"]),
                fmt_ratio(m["particles"], m["tiltsmc"]),
                fmt_ratio(m["particles_W"], m["tiltsmc"]),
                fmt_ratio(m["tiltsmc"], m["copy"]),
            ]
        )
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]
    for i, line in enumerate([head, *lines]):
        print("  ".join(c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def print_gather_references(rows: list[dict]) -> None:
    """Both ratios for the gathers: the strongest numpy reference and take_along_axis, over tiltsmc."""
    print("\ngathers, reference / tiltsmc (medians; above 1: tiltsmc is faster):")
    for r in rows:
        if "numpy_is" not in r:
            continue
        t = median(r, "tiltsmc")
        others = [
            n for n in (*GATHER_CANDIDATES, "take_along_axis") if n in r["times"] and n != r["numpy_is"]
        ]
        print(
            f"  {r['kernel']} {'x'.join(map(str, r['shape']))} {r['dtype']}: tiltsmc {fmt_us(t)} us; "
            f"strongest numpy = {r['numpy_is']}: {fmt_us(median(r, 'numpy'))} us, "
            f"{fmt_ratio(median(r, 'numpy'), t)}x; "
            + "; ".join(f"{n}: {fmt_us(median(r, n))} us, {fmt_ratio(median(r, n), t)}x" for n in others)
        )


def check() -> bool:
    """Sanity of the references (unbiased-looking, sorted, in range) and of tiltsmc's gather."""
    rng, ok = np.random.default_rng(SEED), True

    def report(name: str, passed: bool, detail: str = "") -> None:
        nonlocal ok
        ok &= bool(passed)
        print(f"{'ok  ' if passed else 'FAIL'} {name} {detail}")

    w = np.array([0.3, 0.0, 0.05, 0.15, 0.25, 0.01, 0.24, 0.0])  # two weights of zero
    with np.errstate(divide="ignore"):
        logw = np.log(w)
    rows = np.tile(logw, (20000, 1))
    normalised, log_mean_w, ess = ref.log_normalize(rows[:1])
    good = np.allclose(np.exp(normalised), w) and np.isclose(ess[0], 1 / np.sum(w**2))
    report("reference log_normalize", good and np.isclose(log_mean_w[0], np.log(w.mean())))
    resamplers = {"reference": lambda x, s, m: ref.resample(x, s, m, rng)}
    if ts is not None:
        resamplers["tiltsmc"] = lambda x, s, m: ts.resample(x, s, num=m, rng=rng)
    for who, fn in resamplers.items():
        for scheme in SCHEMES:
            for num in (8, 5):
                a = fn(rows, scheme, num)
                counts = np.stack([np.bincount(r, minlength=8) for r in a])
                sd = np.sqrt(np.maximum(num * w * (1 - w), 0.25) / len(rows))
                z = np.max(np.abs(counts.mean(axis=0) - num * w) / sd)
                good = (
                    a.shape == (len(rows), num)
                    and (np.diff(a, axis=1) >= 0).all()
                    and z < 6
                    and counts[:, w == 0].sum() == 0
                )
                if scheme == "systematic":
                    good &= bool(np.all(np.abs(counts - num * w) < 1))
                report(f"{who} resample {scheme} num={num}", good, f"(max |z| of mean counts {z:.2f})")
    index, _ = ref.pool_select(rows, rng)
    freq = np.bincount(index, minlength=8) / len(rows)
    z = np.max(np.abs(freq - w) / np.sqrt(w * (1 - w) / len(rows) + 1e-12))
    report("reference pool_select", z < 6, f"(max |z| {z:.2f})")
    d = np.log(0.3)
    rate = ref.mh_accept(np.zeros(100000), np.full(100000, d), rng).mean()
    edge = ref.mh_accept(np.array([-np.inf, -np.inf, 0.0]), np.array([-np.inf, 0.0, -np.inf]), rng)
    report(
        "reference mh_accept",
        abs(rate - 0.3) < 0.01 and edge.tolist() == [True, True, False],
        f"(rate {rate:.4f} for 0.3)",
    )
    gathers = []  # (shape, dtype, ancestors' kind, x, ancestors, take_along_axis's result)
    for shape, dtype in [((64, 16, 4096), np.float32), ((3, 7), np.float64), ((5, 9, 2, 3), np.int16)]:
        x = (rng.standard_normal(shape) * 100).astype(dtype)
        for name, anc in [
            ("random", rng.integers(0, shape[1], shape[:2])),
            ("sorted", np.sort(rng.integers(0, shape[1], shape[:2]), axis=1)),
            ("2 moved", mostly_identity(shape[0], shape[1], 2, rng)),
        ]:
            expected = np.take_along_axis(x, anc.reshape(anc.shape + (1,) * (x.ndim - 2)), axis=1)
            gathers.append((shape, np.dtype(dtype).name, name, x, anc, expected))
            moved = ref.gather_in_place(x.copy(), anc)
            good = all(
                np.array_equal(y, expected)
                for y in (
                    ref.gather(x, anc),
                    ref.gather_flat_take(x, anc),
                    ref.gather_take_along_axis(x, anc),
                    moved,
                )
            )
            report(f"reference gathers (fancy, flat take, in place moved only) == take_along_axis {shape} "
                   f"{np.dtype(dtype).name} {name}", good)  # fmt: skip
    caches = [rng.standard_normal(CACHE).astype(np.float32) for _ in range(4)]
    survivors = ref.resample(rng.standard_normal(CACHE[:2]) * 1.5, "systematic", CACHE[1], rng)
    if ts is not None:  # the benchmark's ancestors: survivors kept in their slots
        survivors = ts.keep_survivors(survivors)
    expected = [ref.gather_take_along_axis(c, survivors) for c in caches]
    moved = [c.copy() for c in caches]
    ref.reorder_in_place(moved, survivors)
    same = all(map(np.array_equal, moved, expected))
    report(f"reference reorder_in_place (moved rows only) == take_along_axis per array {CACHE}", same)
    if ts is None:
        print(TS_MISSING)
        return ok
    for shape, dtype, name, x, anc, expected in gathers:
        y, z = x.copy(), x.copy()
        ts.gather(y, anc, out=y)
        ref.gather_in_place(z, anc)
        good = np.array_equal(ts.gather(x, anc), expected) and np.array_equal(y, expected)
        report(f"tiltsmc gather == take_along_axis, out=x == numpy moved rows only {shape} {dtype} {name}",
               good and np.array_equal(y, z))  # fmt: skip
    ts.reorder_in_place(caches, survivors)
    same = all(map(np.array_equal, caches, moved))
    report(f"tiltsmc reorder_in_place == numpy moved rows only per array {CACHE}, survivors kept", same)
    logits = (rng.standard_normal((300, 50)) * 3).astype(np.float32)
    index, log_p = ts.sample_logits(logits, 0.8, rng=5)
    same_index, _ = ts.pool_select(logits.astype(np.float64) / 0.8, rng=5)
    scores = logits.astype(np.float64) / 0.8
    log_sum = np.log(np.sum(np.exp(scores - scores.max(axis=1, keepdims=True)), axis=1)) + scores.max(axis=1)
    good = np.array_equal(index, same_index) and np.allclose(log_p, scores[np.arange(300), index] - log_sum)
    report("tiltsmc sample_logits == pool_select on logits / T, log p = s_v - logsumexp(s)", good)
    caches = [rng.standard_normal((3, 9, 2, 5)).astype(np.float32), rng.integers(0, 9, (3, 9))]
    anc = ts.keep_survivors(rng.integers(0, 9, (3, 9)))
    expected = [ref.gather_take_along_axis(c, anc) for c in caches]
    moved = [c.copy() for c in caches]
    ref.reorder_in_place(moved, anc)
    ts.reorder_in_place(caches, anc)
    same = all(map(np.array_equal, caches, expected)) and all(map(np.array_equal, caches, moved))
    report("tiltsmc reorder_in_place == take_along_axis == numpy moved rows only, per array", same)
    return ok


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="~0.02 s per measurement instead of ~0.2 s")
    parser.add_argument("--threads", type=int, help="tiltsmc.core.set_num_threads(N) before timing")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/core_<hostname>.json)")
    parser.add_argument("--check", action="store_true", help="check references and gather; no timing")
    args = parser.parse_args(argv)
    for message in (TS_MISSING, PR_MISSING):
        if message:
            print(f"note: {message}")
    if args.check:
        return 0 if check() else 1
    if args.threads is not None and ts is not None:
        ts.set_num_threads(args.threads)
    budget = 0.02 if args.quick else 0.2
    np.random.seed(SEED)  # noqa: NPY002 (particles draws from numpy's global state)
    info = machine_info(
        particles=importlib.metadata.version("particles") if pr is not None else None,
    )
    print(
        f"{info['cpu_model']} ({info['cpus_usable']} usable cpus), numpy {info['numpy']}, particles "
        f"{info['particles']}, tiltsmc threads {info['tiltsmc_num_threads']}, budget {budget} s\n"
    )
    rows = []
    for kernel, shape, dtype, impls in cases(np.random.default_rng(SEED)):
        times = {name: measure(fn, budget) for name, fn in impls.items() if fn}
        row = {"kernel": kernel, "shape": list(shape), "dtype": dtype, "times": times}
        candidates = [name for name in GATHER_CANDIDATES if name in times]
        if candidates:  # out-of-place gather: the faster plain numpy form is the reference
            row["numpy_is"] = min(candidates, key=lambda name: times[name]["median"])
            times["numpy"] = dict(times[row["numpy_is"]])
        elif kernel in ("gather:in-place,2/16 moved", "reorder_in_place:4 caches"):
            row["numpy_is"] = MOVED_ONLY
        rows.append(row)
    print_table(rows)
    print_gather_references(rows)
    results = bars(rows)
    print("\nbars (medians):")
    for b in results:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[b["pass"]]
        value = "n/a" if b["value"] is None else f"{b['value']:.3g}"
        beside = ""
        if "beside" in b:
            other = b["beside"]["value"]
            beside = (
                f"; beside it, {b['beside']['ratio']} = {'n/a' if other is None else f'{other:.3g}'} (no bar)"
            )
        print(f"  {verdict}  {b['bar']} = {value} (need {b['op']} {b['threshold']:g}){beside}")
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "machine"
    out = args.out or Path(__file__).resolve().parent / "results" / f"core_{host}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    args_json = {"quick": args.quick, "threads": args.threads, "budget_s": budget, "seed": SEED}
    notes = [m for m in (TS_MISSING, PR_MISSING) if m]
    info["loadavg_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    out.write_text(
        json.dumps(
            {"machine": info, "args": args_json, "notes": notes, "results": rows, "bars": results}, indent=1
        )
        + "\n"
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
