#!/usr/bin/env python3
"""How often the online Bellman reading's lower bound claims too much (docs/guide/bellman-diagnostics.md).

``tiltsmc.diagnostics.online_bellman(result)`` turns a run's log Z increments into ``eps_low``, a lower bound
on the reward model's Bellman error ``eps`` at a joint confidence (95% here). On random test-bed tasks
(``MarkovDFATask.random(3, 3, 5)``) with the twist ``twist(0.5)`` (``V*`` with log-values perturbed by
U[-0.5, 0.5]), whose exact ``eps`` the task computes, every run whose ``eps_low`` exceeds that ``eps`` is a
false claim; the stated level allows at most 5% of runs. Measured for SP-gSMC with pools of 4 - 256 and SMC
(multinomial resampling at every step) with 8 - 64 particles, each run 4 prompts, with Wilson 95% intervals;
and with the exact twist ``V*`` (``eps = 0``: any ``eps_low > 0`` is false), where the bound has no slack.
Beside each share, from the same runs: the share with the one-sided quantile the reading used before
(``z`` at ``(1 - confidence) / n``, not ``/ 2n``), the reference the fix is measured against.

Run ``python bench/exp_online_coverage.py [--quick] [--seed S] [--out DIR]``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _plot
import tiltsmc
from tiltsmc.diagnostics.bellman import upper_normal_quantile
from tiltsmc.tasks import MarkovDFATask

NAME = "exp_online_coverage"
V, Q, T = 3, 3, 5
PROMPTS = 4
CONFIDENCE = 0.95
# (sampler, pool size or particles, twist noise: 0 is V* itself)
CONFIGURATIONS: list[tuple[str, int, float]] = [
    *[("sp_gsmc", K, 0.5) for K in (4, 8, 32, 64, 256)],
    *[("smc", N, 0.5) for N in (8, 32, 64)],
    ("sp_gsmc", 256, 0.0),
    ("smc", 256, 0.0),
]


def run_sampler(sampler: str, size: int, task: MarkovDFATask, twist: Any, rng: Any) -> Any:
    prompts = [()] * PROMPTS
    if sampler == "sp_gsmc":
        return tiltsmc.sp_gsmc(task.policy(), twist, prompts=prompts, pool_size=size, rng=rng)
    return tiltsmc.smc(
        task.policy(), twist, prompts=prompts, num_particles=size, resample="multinomial",
        ess_threshold=1.0, rng=rng,
    )  # fmt: skip


def one_sided_low(increments: np.ndarray, errors: np.ndarray) -> float:
    """``eps_low`` as the reading gave it with a one-sided quantile (the reference)."""
    readable = np.isfinite(increments)
    count = max(int(np.count_nonzero(readable & (errors > 0))), 1)
    z = upper_normal_quantile((1.0 - CONFIDENCE) / count)
    margins = np.where(readable, np.maximum(np.abs(increments) - z * errors, 0.0), 0.0)
    return float(np.expm1(margins.max())) if margins.size else 0.0


def wilson(hits: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(centre - half, 0.0), min(centre + half, 1.0)


def measure(sampler: str, size: int, noise: float, tasks: int, runs: int, seed: int) -> dict[str, Any]:
    false_claims = false_claims_one_sided = 0
    zero_se_offending = 0  # false claims whose largest bound came from a reading with se = 0
    began = time.perf_counter()
    for k in range(tasks):
        task = MarkovDFATask.random(V, Q, T, rng=[seed, k])
        twist = task.twist(noise, rng=[seed, k, 1])
        eps = task.bellman_error(twist).eps
        for r in range(runs):
            result = run_sampler(sampler, size, task, twist, [seed, k, r, size, sampler == "smc"])
            reading = tiltsmc.diagnostics.online_bellman(result, confidence=CONFIDENCE)
            if reading.eps_low > eps:
                false_claims += 1
                where = np.unravel_index(np.argmax(reading.per_step_low), reading.per_step_low.shape)
                zero_se_offending += bool(reading.standard_errors[where] == 0)
            false_claims_one_sided += one_sided_low(reading.increments, reading.standard_errors) > eps
    n = tasks * runs
    return {
        "sampler": sampler,
        "size": size,
        "twist_noise": noise,
        "runs": n,
        "false_claims": false_claims,
        "share": false_claims / n,
        "wilson_95": wilson(false_claims, n),
        "false_claims_with_zero_se": zero_se_offending,
        "one_sided_false_claims": false_claims_one_sided,
        "one_sided_share": false_claims_one_sided / n,
        "one_sided_wilson_95": wilson(false_claims_one_sided, n),
        "seconds": time.perf_counter() - began,
    }


def percent(share: float, interval: tuple[float, float]) -> str:
    return f"{100 * share:.1f}% [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def main() -> None:
    args = _plot.parse_args(__doc__.splitlines()[0], default_seed=20261207)
    began = time.perf_counter()
    tasks, runs = (40, 5) if args.quick else (200, 10)
    rows = []
    for sampler, size, noise in CONFIGURATIONS:
        row = measure(sampler, size, noise, tasks, runs, args.seed)
        rows.append(row)
        print(f"{sampler} {size} twist({noise}): {percent(row['share'], row['wilson_95'])} "
              f"(one-sided: {percent(row['one_sided_share'], row['one_sided_wilson_95'])}), "
              f"{row['seconds']:.1f} s", flush=True)  # fmt: skip
    stated = 1.0 - CONFIDENCE
    names: dict[str, Callable[[int], str]] = {
        "sp_gsmc": lambda K: f"sp_gsmc pool_size={K}",
        "smc": lambda N: f"smc num_particles={N}",
    }

    def label(row: dict[str, Any]) -> str:
        return names[row["sampler"]](row["size"]) + ("" if row["twist_noise"] else ", twist V*")

    text = _plot.table(
        ["sampler", "runs", "eps_low > eps", "of those se=0", "one-sided z (before)", "stated"],
        [
            [
                label(r),
                r["runs"],
                percent(r["share"], r["wilson_95"]),
                r["false_claims_with_zero_se"],
                percent(r["one_sided_share"], r["one_sided_wilson_95"]),
                f"<= {100 * stated:.0f}%",
            ]
            for r in rows
        ],
        title=f"Runs of {PROMPTS} prompts whose 95% eps_low exceeds the exact eps "
        f"(MarkovDFATask.random({V}, {Q}, {T}), twist(0.5) unless V*; {tasks} tasks x {runs} runs)",
    )
    print(text)
    within = [r for r in rows if r["wilson_95"][0] <= stated]
    verdict = (
        f"{len(within)} of {len(rows)} configurations consistent with the stated {100 * stated:.0f}% "
        "(Wilson interval reaching it); "
        + ", ".join(f"{label(r)} above it" for r in rows if r["wilson_95"][0] > stated)
    ).rstrip("; ")
    print(verdict)
    record = _plot.header(NAME, args)
    record.update(
        {
            "parameters": {
                "task": f"MarkovDFATask.random({V}, {Q}, {T}, rng=[seed, k])",
                "twist": "task.twist(noise, rng=[seed, k, 1]), noise 0.5, or 0 (V*)",
                "tasks": tasks,
                "runs_per_task": runs,
                "prompts_per_run": PROMPTS,
                "confidence": CONFIDENCE,
            },
            "rows": rows,
            "verdict": verdict,
            "printed_table": text,
            "seconds": time.perf_counter() - began,
        }
    )
    _plot.write_json(args.out / f"{NAME}.json", record)


if __name__ == "__main__":
    main()
