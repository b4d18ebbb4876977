#!/usr/bin/env python3
"""How often the online Bellman reading's lower bound claims too much (docs/guide/bellman-diagnostics.md).

``tiltsmc.diagnostics.online_bellman(result)`` turns a run's log Z increments into ``eps_low``, a lower bound
on the reward model's Bellman error ``eps`` at a joint confidence (95% here). On random test-bed tasks
(``MarkovDFATask.random(3, 3, 5)``) with the twist ``twist(0.5)`` (``V*`` with log-values perturbed by
U[-0.5, 0.5]), whose exact ``eps`` the task computes, every run whose ``eps_low`` exceeds that ``eps`` is a
false claim; the stated level allows at most 5% of runs. Measured for SP-gSMC with pools of 4 - 256 and SMC
(multinomial resampling at every step) with 8 - 64 particles, each run 4 prompts; and with the exact twist
``V*`` (``eps = 0``: any ``eps_low > 0`` is false), where the bound has no slack. Beside each share, from the
same runs: the share with the one-sided quantile the reading used before (``z`` at ``(1 - confidence) / n``,
not ``/ 2n``), the reference the fix is measured against.

The runs of a task share its task and its twist, so they are not independent: the 95% intervals are
task-level (cluster) bootstrap percentile intervals (the tasks resampled with replacement, each with all its
runs; seeded), and the verdict is read on them. The Wilson interval, which treats every run as independent,
is kept beside for comparison, with each configuration's design effect (the share's variance between tasks
over the binomial variance of independent runs) and how the false claims spread over the tasks.

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
BOOTSTRAP = 20000  # resamples of the tasks for the cluster intervals
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


def cluster_interval(per_task: np.ndarray, runs: int, resamples: np.ndarray) -> tuple[float, float]:
    """95% percentile interval of the share of false claims, bootstrapping tasks: ``resamples`` holds rows
    of task indices drawn with replacement, and each drawn task brings all its ``runs`` runs."""
    shares = per_task[resamples].sum(axis=1) / (per_task.size * runs)
    low, high = np.percentile(shares, [2.5, 97.5])
    return float(low), float(high)


def design_effect(per_task: np.ndarray, runs: int) -> float | None:
    """The share's variance estimated between tasks over the binomial ``p (1 - p) / n`` of independent runs
    (1: the runs of a task behave as independent; None where no run, or every run, claimed too much)."""
    n = per_task.size * runs
    p = per_task.sum() / n
    if p in (0.0, 1.0):
        return None
    return float(np.var(per_task / runs, ddof=1) / per_task.size / (p * (1 - p) / n))


def measure(sampler: str, size: int, noise: float, tasks: int, runs: int, seed: int) -> dict[str, Any]:
    per_task = np.zeros(tasks, dtype=np.int64)  # false claims of each task's runs
    per_task_one_sided = np.zeros(tasks, dtype=np.int64)
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
                per_task[k] += 1
                where = np.unravel_index(np.argmax(reading.per_step_low), reading.per_step_low.shape)
                zero_se_offending += bool(reading.standard_errors[where] == 0)
            per_task_one_sided[k] += one_sided_low(reading.increments, reading.standard_errors) > eps
    n = tasks * runs
    false_claims, false_claims_one_sided = int(per_task.sum()), int(per_task_one_sided.sum())
    # The same resampled tasks for both readings; drawn from the seed alone (the hits draw nothing from it).
    resamples = np.random.default_rng([seed, 1]).integers(0, tasks, (BOOTSTRAP, tasks))
    half = math.ceil(runs / 2)
    return {
        "sampler": sampler,
        "size": size,
        "twist_noise": noise,
        "runs": n,
        "tasks": tasks,
        "runs_per_task": runs,
        "false_claims": false_claims,
        "share": false_claims / n,
        "cluster_95": cluster_interval(per_task, runs, resamples),
        "wilson_95": wilson(false_claims, n),
        "design_effect": design_effect(per_task, runs),
        "tasks_with_false_claim": int(np.count_nonzero(per_task)),
        "half_of_runs": half,
        "tasks_with_half_or_more": int(np.count_nonzero(per_task >= half)),
        "most_in_a_task": int(per_task.max()),
        "per_task_histogram": np.bincount(per_task, minlength=runs + 1),  # tasks with 0, 1, ... runs
        "per_task_false_claims": per_task,
        "false_claims_with_zero_se": zero_se_offending,
        "one_sided_false_claims": false_claims_one_sided,
        "one_sided_share": false_claims_one_sided / n,
        "one_sided_cluster_95": cluster_interval(per_task_one_sided, runs, resamples),
        "one_sided_wilson_95": wilson(false_claims_one_sided, n),
        "one_sided_design_effect": design_effect(per_task_one_sided, runs),
        "one_sided_per_task_false_claims": per_task_one_sided,
        "seconds": time.perf_counter() - began,
    }


def percent(share: float, interval: tuple[float, float]) -> str:
    return f"{100 * share:.1f}% [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def bracket(interval: tuple[float, float]) -> str:
    return f"[{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def deff(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    args = _plot.parse_args(__doc__.splitlines()[0], default_seed=20261207)
    began = time.perf_counter()
    tasks, runs = (40, 5) if args.quick else (200, 10)
    rows = []
    for sampler, size, noise in CONFIGURATIONS:
        row = measure(sampler, size, noise, tasks, runs, args.seed)
        rows.append(row)
        print(f"{sampler} {size} twist({noise}): {percent(row['share'], row['cluster_95'])} by tasks "
              f"(Wilson {bracket(row['wilson_95'])}, design effect {deff(row['design_effect'])}, "
              f"{row['tasks_with_half_or_more']} of {tasks} tasks with >= {row['half_of_runs']} of {runs}) "
              f"(one-sided: {percent(row['one_sided_share'], row['one_sided_cluster_95'])}), "
              f"{row['seconds']:.1f} s", flush=True)  # fmt: skip
    stated = 1.0 - CONFIDENCE
    names: dict[str, Callable[[int], str]] = {
        "sp_gsmc": lambda K: f"sp_gsmc pool_size={K}",
        "smc": lambda N: f"smc num_particles={N}",
    }

    def label(row: dict[str, Any]) -> str:
        return names[row["sampler"]](row["size"]) + ("" if row["twist_noise"] else ", twist V*")

    half = math.ceil(runs / 2)
    text = _plot.table(
        [
            "sampler",
            "runs",
            "eps_low > eps [by tasks]",
            "Wilson (iid runs)",
            "deff",
            "tasks >= 1",
            f"tasks >= {half}/{runs}",
            "most/task",
            "of those se=0",
            "one-sided z (before) [by tasks]",
            "stated",
        ],
        [
            [
                label(r),
                r["runs"],
                percent(r["share"], r["cluster_95"]),
                bracket(r["wilson_95"]),
                deff(r["design_effect"]),
                r["tasks_with_false_claim"],
                r["tasks_with_half_or_more"],
                r["most_in_a_task"],
                r["false_claims_with_zero_se"],
                percent(r["one_sided_share"], r["one_sided_cluster_95"]),
                f"<= {100 * stated:.0f}%",
            ]
            for r in rows
        ],
        title=f"Runs of {PROMPTS} prompts whose 95% eps_low exceeds the exact eps "
        f"(MarkovDFATask.random({V}, {Q}, {T}), twist(0.5) unless V*; {tasks} tasks x {runs} runs; "
        f"95% task-bootstrap intervals, {BOOTSTRAP} resamples; deff: design effect)",
    )  # table() prints it
    within = [r for r in rows if r["cluster_95"][0] <= stated]
    verdict = (
        f"{len(within)} of {len(rows)} configurations consistent with the stated {100 * stated:.0f}% "
        "(task-bootstrap interval reaching it); "
        + ", ".join(f"{label(r)} above it" for r in rows if r["cluster_95"][0] > stated)
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
                "interval": f"task-level bootstrap percentile, {BOOTSTRAP} resamples of the {tasks} tasks "
                "(each with all its runs), numpy.random.default_rng([seed, 1]); Wilson (runs as independent) "
                "kept beside",
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
