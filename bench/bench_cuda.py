#!/usr/bin/env python3
"""GPU benchmark of the ``tiltsmc.core`` CUDA kernels against PyTorch, CuPy and a device-to-device copy.

Run ``python bench/bench_cuda.py [--quick] [--out PATH] [--no-profiler]`` on a machine with a usable GPU,
CuPy and (for its columns and the kernel timer) PyTorch; it exits with a message where no GPU is usable.
Everything runs in one process on one GPU, on one non-default stream, seeded. Two figures per call:

* ``gpu``: the device time of the call's kernels, memsets and copies, summed from the PyTorch profiler's
  CUDA activity records (CUPTI), so the host's share (Python, launches, tiltsmc's wait for its input
  check) is left out: "GPU time".
* ``events``: CUDA events around a batch of calls enqueued behind a spinning kernel, so the GPU never
  waits for the host between them where the calls do not wait for the GPU themselves (tiltsmc's
  ``smc_step(check=False)``, PyTorch, CuPy); for calls that wait (tiltsmc's checked kernels) it includes
  that wait. Used for the bars when the profiler is unavailable.

Bars (issue #5), computed from one run: ``(1, 2^24)`` systematic resampling and ``log_normalize`` at
>= 50% of the copy's bandwidth (bytes read and written once, per second, over the copy's); the fused
SMC step at ``(1024, 64)`` <= 10 us per step and >= 5x faster than the PyTorch equivalent; ``gather`` of
KV blocks >= 70% of the copy's bandwidth. The JSON goes to ``bench/results/cuda_<device>.json``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info

SEED = 20240521
BIG = (1, 2**24)
STEP = (1024, 64)
KV_BLOCKS = [(64, 16, 1024, 64), (8, 16, 8, 512, 128)]  # (N, heads, seq, head_dim), (B, N, heads, seq, dim)
SCHEMES = ("systematic", "stratified", "multinomial", "residual")


def fail(message: str) -> NoReturn:
    print(f"bench_cuda: {message}", file=sys.stderr)
    raise SystemExit(2)


try:
    from tiltsmc import core as ts
except ImportError as error:
    fail(f"tiltsmc is not importable ({error})")
cp: Any = None  # CuPy and PyTorch, imported by main() once a GPU is known to be usable
torch: Any = None


def import_array_libraries() -> None:
    global cp, torch
    try:
        import cupy
    except ImportError as error:
        fail(f"CuPy is needed for device arrays and CUDA events ({error})")
    cp = cupy
    try:
        import torch as torch_module
    except ImportError:
        torch_module = None
    torch = torch_module


SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
    const long long start = clock64();
    while (clock64() - start < cycles) {}
}
"""


# ---------------------------------------------------------------- timing


class Timer:
    """GPU time per call of a callable that enqueues work on ``stream`` (see the module docstring)."""

    def __init__(self, stream: Any, quick: bool, profiler: bool) -> None:
        self.stream = stream
        self.calls = 10 if quick else 40
        self.repeats = 3 if quick else 5
        self.profiler = profiler and torch is not None
        self.spin = cp.RawKernel(SPIN, "spin")
        self.clock_khz = cp.cuda.Device().attributes.get("ClockRate", 2_000_000)

    def _spin(self, milliseconds: float) -> None:
        self.spin((1,), (1,), (np.int64(milliseconds * self.clock_khz),))  # on the current stream

    def events(self, fn: Callable[[], object], calls: int) -> float:
        start, end = cp.cuda.Event(), cp.cuda.Event()
        self._spin(30.0)  # the host enqueues the calls meanwhile
        start.record(self.stream)
        for _ in range(calls):
            fn()
        end.record(self.stream)
        end.synchronize()
        return cp.cuda.get_elapsed_time(start, end) * 1e-3 / calls

    def kernels(self, fn: Callable[[], object], calls: int) -> Optional[float]:
        """Summed device activity per call from the PyTorch profiler, or None if it records nothing."""
        from torch.profiler import ProfilerActivity, profile

        self.stream.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            self.stream.synchronize()
        total_us = 0.0
        for event in prof.events():
            if str(getattr(event, "device_type", "")).endswith("CUDA"):
                total_us += event.time_range.elapsed_us()
        return total_us * 1e-6 / calls if total_us > 0 else None

    def measure(self, fn: Callable[[], object], big: bool) -> dict[str, Any]:
        calls = max(2, self.calls // 8) if big else self.calls
        for _ in range(2):
            fn()
        self.stream.synchronize()
        events = [self.events(fn, calls) for _ in range(self.repeats)]
        result: dict[str, Any] = {"events_median": statistics.median(events), "events_min": min(events)}
        if self.profiler:
            result["gpu"] = self.kernels(fn, calls)
        result["calls"] = calls
        return result


def seconds(figures: dict[str, Any]) -> float:
    """The figure the bars use: profiler GPU time where recorded, else the events' median."""
    gpu = figures.get("gpu")
    return float(gpu) if gpu else float(figures["events_median"])


# ---------------------------------------------------------------- the baselines


def device_copy(x: Any) -> Any:
    """The memory-bound reference: one cudaMemcpy device to device of x's bytes (an elementwise copy
    kernel moves 2-byte float16 items far below the memory's bandwidth)."""
    out = cp.empty_like(x)
    cp.cuda.runtime.memcpyAsync(
        out.data.ptr,
        x.data.ptr,
        x.nbytes,
        cp.cuda.runtime.memcpyDeviceToDevice,
        cp.cuda.get_current_stream().ptr,
    )
    return out


def torch_log_normalize(x: Any) -> tuple[Any, Any, Any]:
    lse = torch.logsumexp(x, dim=1, keepdim=True)
    w = torch.exp(x - lse)
    return x - lse, lse[:, 0] - math.log(x.shape[1]), 1.0 / (w * w).sum(dim=1)


def cupy_log_normalize(x: Any) -> tuple[Any, Any, Any]:
    top = x.max(axis=1, keepdims=True)
    shifted = cp.exp(x - top)
    total = shifted.sum(axis=1, keepdims=True)
    lse = top + cp.log(total)
    w = shifted / total
    return x - lse, lse[:, 0] - math.log(x.shape[1]), 1.0 / (w * w).sum(axis=1)


def torch_systematic(x: Any, generator: Any) -> Any:
    """searchsorted of (j + u) / m on the normalised cumulative sum, one u per row."""
    rows, n = x.shape
    c = torch.cumsum(torch.softmax(x, dim=1), dim=1)
    u = torch.rand((rows, 1), device=x.device, dtype=x.dtype, generator=generator)
    points = (torch.arange(n, device=x.device, dtype=x.dtype) + u) / n
    return torch.searchsorted(c, points).clamp_(max=n - 1)


def torch_multinomial(x: Any, generator: Any) -> Any:
    return torch.multinomial(torch.softmax(x, dim=1), x.shape[1], replacement=True, generator=generator)


def cupy_systematic(x: Any, rng: Any) -> Any:
    rows, n = x.shape
    w = cp.exp(x - x.max(axis=1, keepdims=True))
    c = cp.cumsum(w, axis=1)
    c /= c[:, -1:]
    points = (cp.arange(n, dtype=x.dtype) + rng.random((rows, 1), dtype=x.dtype)) / n
    if rows == 1:
        return cp.minimum(cp.searchsorted(c[0], points[0]), n - 1)[None]
    offsets = cp.arange(rows, dtype=x.dtype)[:, None]  # rows laid end to end: one searchsorted
    flat = cp.searchsorted((c + 2 * offsets).ravel(), (points + 2 * offsets).ravel()).reshape(rows, n)
    return cp.minimum(flat - n * cp.arange(rows)[:, None], n - 1)


def torch_smc_step(x: Any, threshold: float, generator: Any) -> tuple[Any, ...]:
    """The fused step's work in PyTorch: statistics, the decision, systematic ancestors, the reset."""
    rows, n = x.shape
    lse = torch.logsumexp(x, dim=1, keepdim=True)
    w = torch.exp(x - lse)
    ess = 1.0 / (w * w).sum(dim=1)
    log_mean_w = lse[:, 0] - math.log(n)
    resample = (ess < threshold * n) | (threshold >= 1.0)
    c = torch.cumsum(w, dim=1)
    u = torch.rand((rows, 1), device=x.device, dtype=x.dtype, generator=generator)
    points = (torch.arange(n, device=x.device, dtype=x.dtype) + u) / n
    drawn = torch.searchsorted(c, points).clamp_(max=n - 1)
    identity = torch.arange(n, device=x.device).expand(rows, n)
    ancestors = torch.where(resample[:, None], drawn, identity)
    x.masked_fill_(resample[:, None], 0.0)
    return ancestors, resample, log_mean_w, ess


def cupy_smc_step(x: Any, threshold: float, rng: Any) -> tuple[Any, ...]:
    n = x.shape[1]
    _, log_mean_w, ess = cupy_log_normalize(x)
    resample = (ess < threshold * n) | (threshold >= 1.0)
    drawn = cupy_systematic(x, rng)
    ancestors = cp.where(resample[:, None], drawn, cp.arange(n)[None, :])
    x[resample] = 0.0
    return ancestors, resample, log_mean_w, ess


# ---------------------------------------------------------------- cases


Case = dict[str, Any]


def cases(quick: bool) -> list[Case]:
    """Each case: kernel, shape, dtype, bytes (read once + written once), {implementation: callable}."""
    rng = np.random.default_rng(SEED)
    gen = np.random.default_rng(SEED + 1)
    crng = cp.random.default_rng(SEED + 2)
    tgen = torch.Generator(device="cuda").manual_seed(SEED) if torch is not None else None
    out: list[Case] = []

    def as_torch(a: Any) -> Any:
        return torch.as_tensor(a, device="cuda") if torch is not None else None

    for dtype in (np.float64, np.float32):
        x = cp.asarray(rng.standard_normal(BIG).astype(dtype))
        tx = as_torch(x)
        n, item = BIG[1], np.dtype(dtype).itemsize
        name = np.dtype(dtype).name
        copy = {"copy": lambda x=x: device_copy(x)}
        impls: dict[str, Any] = {
            "tiltsmc": lambda x=x: ts.log_normalize(x),
            "cupy": lambda x=x: cupy_log_normalize(x),
        }
        if torch is not None:
            impls["torch"] = lambda tx=tx: torch_log_normalize(tx)
        out.append(case("log_normalize", BIG, name, 2 * n * item + 16, {**impls, **copy}, big=True))
        for scheme in SCHEMES if dtype == np.float64 and not quick else ("systematic",):
            impls = {"tiltsmc": lambda x=x, s=scheme: ts.resample(x, s, rng=gen)}
            if scheme == "systematic":
                impls["cupy:searchsorted"] = lambda x=x: cupy_systematic(x, crng)
                if torch is not None:
                    impls["torch:searchsorted"] = lambda tx=tx: torch_systematic(tx, tgen)
            if scheme == "multinomial" and torch is not None:
                impls["torch:multinomial"] = lambda tx=tx: torch_multinomial(tx, tgen)
            out.append(case(f"resample:{scheme}", BIG, name, n * item + n * 8, {**impls, **copy}, big=True))
    for dtype in (np.float64, np.float32):
        base = rng.standard_normal(STEP).astype(dtype)
        x, name = cp.asarray(base), np.dtype(dtype).name
        tx = as_torch(cp.asarray(base))
        cx = cp.asarray(base)
        rows, n = STEP
        item = np.dtype(dtype).itemsize
        impls = {
            "tiltsmc": lambda x=x: ts.smc_step(x, 1.0, "systematic", rng=gen, check=False),
            "tiltsmc:checked": lambda x=x: ts.smc_step(x, 1.0, "systematic", rng=gen),
            "cupy": lambda cx=cx: cupy_smc_step(cx, 1.0, crng),
            "copy": lambda x=x: device_copy(x),
        }
        if torch is not None:
            impls["torch"] = lambda tx=tx: torch_smc_step(tx, 1.0, tgen)
        step_bytes = rows * n * (2 * item + 8) + rows * 33
        out.append(case("smc_step:systematic,threshold=1", STEP, name, step_bytes, impls, big=False))
    for shape in KV_BLOCKS:
        one_row = len(shape) == 4
        x = cp.asarray(rng.standard_normal(shape).astype(np.float16))
        rows, n = (1, shape[0]) if one_row else shape[:2]
        logw = rng.standard_normal((rows, n))
        ancestors = ts.resample(logw, "systematic", rng=gen)
        a = cp.asarray(ancestors[0] if one_row else ancestors)
        near = np.tile(np.arange(n), (rows, 1))
        near[:, 1:3] = 0  # 2 of N items move (ancestors stay ascending)
        a_near = cp.asarray(near[0] if one_row else near)
        in_place = x.copy()
        tx, ta = as_torch(x), as_torch(a)
        impls = {
            "tiltsmc": lambda x=x, a=a: ts.gather(x, a),
            "tiltsmc:in-place,2 moved": lambda y=in_place, a=a_near: ts.gather(y, a, out=y),
            "cupy:take": lambda x=x, a=a: (
                cp.take(x, a, axis=0) if x.ndim == 4 else x[cp.arange(x.shape[0])[:, None], a]
            ),
            "copy": lambda x=x: device_copy(x),
        }
        if torch is not None:
            impls["torch:index"] = lambda tx=tx, ta=ta: (
                tx.index_select(0, ta)
                if tx.dim() == 4
                else tx[torch.arange(tx.shape[0], device="cuda")[:, None], ta]
            )
        out.append(case("gather:kv", shape, "float16", 2 * x.nbytes, impls, big=True))
    return out


def case(
    kernel: str, shape: tuple[int, ...], dtype: str, nbytes: int, impls: dict[str, Any], big: bool
) -> Case:
    return {
        "kernel": kernel,
        "shape": list(shape),
        "dtype": dtype,
        "bytes": nbytes,
        "impls": impls,
        "big": big,
    }


# ---------------------------------------------------------------- bars and report


def find(rows: list[dict[str, Any]], kernel: str, shape: tuple[int, ...], dtype: str) -> dict[str, Any]:
    return next(r for r in rows if (r["kernel"], tuple(r["shape"]), r["dtype"]) == (kernel, shape, dtype))


def bar(text: str, value: Optional[float], op: str, threshold: float) -> dict[str, Any]:
    ok = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
    return {"bar": text, "value": value, "op": op, "threshold": threshold, "pass": ok}


def bandwidth_ratio(row: dict[str, Any], impl: str) -> Optional[float]:
    """(bytes the kernel must move / its time) over (2 x input bytes / the copy's time)."""
    times = row["times"]
    if impl not in times or "copy" not in times or "input_bytes" not in row:
        return None
    copy_bandwidth = 2 * row["input_bytes"] / seconds(times["copy"])
    return row["bytes"] / seconds(times[impl]) / copy_bandwidth


def bars(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for dtype in ("float64", "float32"):
        for kernel in ("resample:systematic", "log_normalize"):
            row = find(rows, kernel, BIG, dtype)
            out.append(
                bar(
                    f"{BIG} {kernel} {dtype}: bandwidth / copy bandwidth",
                    bandwidth_ratio(row, "tiltsmc"),
                    ">=",
                    0.5,
                )
            )
        times = find(rows, "smc_step:systematic,threshold=1", STEP, dtype)["times"]
        ours = seconds(times["tiltsmc"]) if "tiltsmc" in times else None
        theirs = seconds(times["torch"]) if "torch" in times else None
        out.append(bar(f"{STEP} fused step {dtype}: us per step (GPU)", ours and ours * 1e6, "<=", 10))
        speedup = None if ours is None or theirs is None else theirs / ours
        out.append(bar(f"{STEP} fused step {dtype}: torch / tiltsmc", speedup, ">=", 5))
    for shape in KV_BLOCKS:
        row = find(rows, "gather:kv", shape, "float16")
        out.append(
            bar(
                f"{shape} float16 gather: bandwidth / copy bandwidth",
                bandwidth_ratio(row, "tiltsmc"),
                ">=",
                0.7,
            )
        )
    return out


def fmt_us(value: Optional[float]) -> str:
    if value is None:
        return "-"
    us = value * 1e6
    return f"{us:,.0f}" if us >= 1000 else f"{us:.3g}"


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ["kernel", "shape", "dtype", "implementation", "gpu us", "events us", "vs tiltsmc", "GB/s"]
    lines = []
    for r in rows:
        ours = seconds(r["times"]["tiltsmc"]) if "tiltsmc" in r["times"] else float("nan")
        for impl, t in r["times"].items():
            s = seconds(t)
            moved = 2 * r["input_bytes"] if impl == "copy" else r["bytes"]
            lines.append(
                [
                    r["kernel"],
                    "x".join(map(str, r["shape"])),
                    r["dtype"],
                    impl,
                    fmt_us(t.get("gpu")),
                    fmt_us(t["events_median"]),
                    f"{s / ours:.3g}",
                    f"{moved / s / 1e9:.0f}",
                ]
            )
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]
    for i, line in enumerate([head, *lines]):
        print("  ".join(c.ljust(w) if j < 4 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def device_description() -> dict[str, Any]:
    properties = cp.cuda.runtime.getDeviceProperties(0)
    name = properties["name"].decode() if isinstance(properties["name"], bytes) else str(properties["name"])
    return {
        "gpu": name,
        "gpu_compute_capability": f"{properties['major']}.{properties['minor']}",
        "gpu_memory_bytes": int(properties["totalGlobalMem"]),
        "gpu_multiprocessors": int(properties["multiProcessorCount"]),
        "cuda_driver": cp.cuda.runtime.driverGetVersion(),
        "cuda_runtime_cupy": cp.cuda.runtime.runtimeGetVersion(),
        "cupy": cp.__version__,
        "torch": torch.__version__ if torch is not None else None,
        "tiltsmc_cuda": str(ts.cuda_available().reason),
        "tiltsmc_cuda_module": getattr(sys.modules.get("tiltsmc._cuda"), "__file__", None),
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer calls and repeats; systematic only at 2^24"
    )
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/cuda_<device>.json)")
    parser.add_argument("--no-profiler", action="store_true", help="CUDA events only (no PyTorch profiler)")
    args = parser.parse_args(argv)
    state = ts.cuda_available()
    if not state:
        fail(f"no usable GPU: {state.reason}")
    import_array_libraries()
    started = time.perf_counter()
    device = device_description()
    info = machine_info(**device)
    print(f"{device['gpu']} (cc {device['gpu_compute_capability']}), cupy {device['cupy']}, ", end="")
    print(f"torch {device['torch']}")
    if torch is None:
        print("note: PyTorch is not installed: its columns are skipped and the events timer is used")
    stream = cp.cuda.Stream(non_blocking=True)
    timer = Timer(stream, args.quick, not args.no_profiler)
    rows = []
    with stream:
        torch_stream = torch.cuda.ExternalStream(stream.ptr) if torch is not None else None
        context = torch.cuda.stream(torch_stream) if torch is not None else None
        if context is not None:
            context.__enter__()
        try:
            for c in cases(args.quick):
                times, errors = {}, {}
                for impl, fn in c["impls"].items():
                    label = f"  {c['kernel']} {c['shape']} {c['dtype']} {impl}"
                    try:
                        times[impl] = timer.measure(fn, c["big"])
                    except Exception as error:  # a baseline that cannot run here: recorded, not fatal
                        errors[impl] = f"{type(error).__name__}: {error}"
                        print(f"{label}: FAILED {errors[impl]}")
                        stream.synchronize()
                        continue
                    print(f"{label}: {fmt_us(seconds(times[impl]))} us")
                element = np.dtype(c["dtype"]).itemsize
                rows.append(
                    {
                        "kernel": c["kernel"],
                        "shape": c["shape"],
                        "dtype": c["dtype"],
                        "bytes": c["bytes"],
                        "input_bytes": math.prod(c["shape"]) * element,
                        "times": times,
                        "errors": errors,
                    }
                )
        finally:
            if context is not None:
                context.__exit__(None, None, None)
    print()
    print_table(rows)
    results = bars(rows)
    print("\nbars:")
    for b in results:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[b["pass"]]
        value = "n/a" if b["value"] is None else f"{b['value']:.3g}"
        print(f"  {verdict}  {b['bar']} = {value} (need {b['op']} {b['threshold']:g})")
    slug = re.sub(r"[^a-z0-9]+", "_", device["gpu"].lower()).strip("_") or "gpu"
    out = args.out or Path(__file__).resolve().parent / "results" / f"cuda_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    arguments = {"quick": args.quick, "profiler": timer.profiler, "seed": SEED, "calls": timer.calls}
    payload = {
        "machine": info,
        "args": arguments,
        "timing": __doc__.split("Bars")[0].strip() if __doc__ else "",
        "results": rows,
        "bars": results,
        "seconds": time.perf_counter() - started,
        "tiltsmc_version": importlib.metadata.version("tiltsmc"),
    }
    out.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"\nwrote {out} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
