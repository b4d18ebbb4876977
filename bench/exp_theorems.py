#!/usr/bin/env python3
"""The paper's theorems against exact answers: how close the samplers get, and how loose the bounds are.

Theorem 4.3 (exact SP-gSMC): the law ``q_t`` of its trajectory after ``t`` steps is within TV ``2 t eps`` of
``pi_t ∝ p Vh_t``. Both laws are enumerated over every prefix of random small Markov-DFA tasks (V = 3,
Q = 3, T = 6) with twists ``V* x exp(U[-noise, noise])``, so the measured TV is exact; ``eps`` is the exact
Bellman error (the gauge-minimised one: both laws are invariant under rescaling a level).

Theorem 5.1 (naive proposal, multinomial resampling at every step, one output particle drawn by weight):
TV of the output's law to ``pi`` at most ``L^6 T (1+eps)^(6(T-1)) / (2N)``, with ``(L, eps)`` of one gauge
(the model's own, or the one that minimises eps: the smaller bound is reported). The output law is
enumerated exactly over the particle system for N <= 4 (V = 2, T = 3); for larger N it is estimated from
``tiltsmc.smc(..., resample="multinomial", ess_threshold=1.0, final_resample=1)`` runs, whose plug-in TV is
biased upwards by about ``0.5 sqrt(K / R)`` (K sequences, R runs; reported as the noise floor).

The online reading (item 6 of the issue): on a twist ``Vh_t = c_t V*_t`` every prefix has
``rho_t = c_t / c_{t-1}`` exactly, so the per-step Bellman error is known; the log Z increments of SMC runs
read it (point readings and the 95% joint lower bound of ``tiltsmc.diagnostics.online_bellman``).

The enumerators are written from the raw task parameters, as in tests/test_fidelity.py (which checks the
same bounds on fewer cases). Run ``python bench/exp_theorems.py [--quick] [--seed S] [--out DIR]``.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _plot
import tiltsmc
from tiltsmc.tasks import MarkovDFATask
from tiltsmc.tasks.models import TableTwist

NAME = "exp_theorems"
NOISES_43 = (0.02, 0.1, 0.3, 1.0)
CASES_51 = ((0.95, 0.005), (0.9, 0.02), (0.5, 0.2), (0.1, 1.0))  # (reward floor, twist noise)


# ---------------------------------------------------------------------------------------------- exact laws


def value(task: MarkovDFATask, tables: list[Any], prefix: tuple[int, ...]) -> float:
    """``Vh_t(prefix)`` in the natural scale from the raw DFA (``t = len(prefix)``)."""
    if not prefix:
        return math.exp(float(tables[0]))
    q = task.start
    for v in prefix:
        q = int(task.dfa[q, v])
    return math.exp(float(np.asarray(tables[len(prefix)])[prefix[-1], q]))


def step_probs(task: MarkovDFATask, prefix: tuple[int, ...]) -> np.ndarray:
    if not prefix:
        return np.asarray(task.init, dtype=float)
    trans = np.asarray(task.trans)
    return np.asarray((trans if trans.ndim == 2 else trans[len(prefix) - 1])[prefix[-1]], dtype=float)


def tv(first: dict[Any, float], second: dict[Any, float]) -> float:
    return 0.5 * sum(abs(first.get(k, 0.0) - second.get(k, 0.0)) for k in set(first) | set(second))


def sp_gsmc_laws(task: MarkovDFATask, tables: list[Any]) -> list[tuple[dict[Any, float], dict[Any, float]]]:
    """Per step t: (law of exact SP-gSMC's prefix, pi_t ∝ p Vh_t), both over every prefix of length t."""
    out = []
    law: dict[tuple[int, ...], float] = {(): 1.0}
    for t in range(1, task.horizon + 1):
        nxt: dict[tuple[int, ...], float] = {}
        for prefix, mass in law.items():
            probs = step_probs(task, prefix)
            joint = np.array([probs[w] * value(task, tables, (*prefix, w)) for w in range(task.vocab_size)])
            for w in np.flatnonzero(joint > 0):
                nxt[(*prefix, int(w))] = mass * joint[w] / joint.sum()
        law = nxt
        target = {
            s: math.prod(step_probs(task, s[:k])[s[k]] for k in range(t)) * value(task, tables, s)
            for s in itertools.product(range(task.vocab_size), repeat=t)
        }
        total = sum(target.values())
        out.append((law, {s: v / total for s, v in target.items()}))
    return out


def smc_output_law(task: MarkovDFATask, tables: list[Any], N: int) -> dict[tuple[int, ...], float]:
    """Exact law of Theorem 5.1's algorithm (multinomial resampling of N at every step t < T, one particle
    drawn by weight at T), by enumeration of the particle system as multisets."""
    T = task.horizon
    states: dict[tuple[tuple[int, ...], ...], float] = {((),) * N: 1.0}
    output: dict[tuple[int, ...], float] = {}
    for t in range(1, T + 1):
        nxt: dict[tuple[tuple[int, ...], ...], float] = {}
        for particles, mass in states.items():
            options = []
            for prefix in particles:
                probs = step_probs(task, prefix)
                options.append([(int(w), float(probs[w])) for w in np.flatnonzero(probs > 0)])
            for choice in itertools.product(*options):
                prob = mass * math.prod(p for _, p in choice)
                children = [(*prefix, w) for prefix, (w, _) in zip(particles, choice)]
                weights = np.array([value(task, tables, c) / value(task, tables, c[:-1]) for c in children])
                share: Counter[tuple[int, ...]] = Counter()
                for child, weight in zip(children, weights / weights.sum()):
                    share[child] += float(weight)
                if t == T:
                    for child, w in share.items():
                        output[child] = output.get(child, 0.0) + prob * w
                    continue
                distinct = list(share)
                for counts in itertools.product(range(N + 1), repeat=len(distinct)):
                    if sum(counts) != N:
                        continue
                    ways = math.factorial(N) / math.prod(math.factorial(c) for c in counts)
                    p_counts = ways * math.prod(share[d] ** c for d, c in zip(distinct, counts))
                    key = tuple(sorted(d for d, c in zip(distinct, counts) for _ in range(c)))
                    nxt[key] = nxt.get(key, 0.0) + prob * p_counts
        states = nxt
    return output


def target(task: MarkovDFATask) -> dict[tuple[int, ...], float]:
    sequences, log_p, log_r = task.enumerate_sequences()
    mass = np.exp(log_p + log_r - task.exact_log_z())
    return {tuple(int(v) for v in s): float(m) for s, m in zip(sequences, mass) if m > 0}


def bound_51(L: float, eps: float, T: int, N: int) -> float:
    return L**6 * T * (1 + eps) ** (6 * (T - 1)) / (2 * N)


def positive_task(seed: int, V: int, T: int, reward_low: float) -> MarkovDFATask:
    gen = np.random.default_rng(seed)
    task = MarkovDFATask.random(V, 3, T, rng=gen, concentration=30.0, zero_reward_fraction=0.0)
    reward = reward_low + (1 - reward_low) * gen.random(3)
    return MarkovDFATask(task.init, task.trans, task.dfa, task.start, reward, T)


# ---------------------------------------------------------------------------------------------- parts


def theorem_43(seed: int, tasks: int) -> list[dict[str, Any]]:
    rows = []
    for k, noise in itertools.product(range(tasks), NOISES_43):
        task = MarkovDFATask.random(3, 3, 6, rng=[seed, k], zero_reward_fraction=0.0)
        tables = task.twist_tables(noise, rng=[seed, k, 1])
        report = task.bellman_error(tables)
        for t, (law, pi_t) in enumerate(sp_gsmc_laws(task, tables), start=1):
            measured = tv(law, pi_t)
            rows.append(
                {
                    "task": k,
                    "noise": noise,
                    "t": t,
                    "eps": report.eps,
                    "gauge_eps": report.gauge_eps,
                    "tv": measured,
                    "bound": 2 * t * report.gauge_eps,
                    "bound_model_gauge": 2 * t * report.eps,
                    "holds": measured <= 2 * t * report.gauge_eps + 1e-12,
                }
            )
    return rows


def theorem_51(
    seed: int, exact_N: tuple[int, ...], sampled_N: tuple[int, ...], runs: int
) -> list[dict[str, Any]]:
    rows = []
    for k, (reward_low, noise) in enumerate(CASES_51):
        task = positive_task(seed + k, 2, 3, reward_low)
        tables = task.twist_tables(noise, rng=seed + k)
        report = task.bellman_error(tables)
        pi = target(task)
        common = {
            "case": k,
            "reward_low": reward_low,
            "noise": noise,
            "L": report.ratio_bound,
            "eps": report.eps,
            "gauge_L": report.gauge_ratio_bound,
            "gauge_eps": report.gauge_eps,
        }
        for N in exact_N + sampled_N:
            bound = min(
                bound_51(report.ratio_bound, report.eps, task.horizon, N),
                bound_51(report.gauge_ratio_bound, report.gauge_eps, task.horizon, N),
            )
            if N in exact_N:
                measured, floor, method = tv(smc_output_law(task, tables, N), pi), 0.0, "enumerated"
            else:
                result = tiltsmc.smc(
                    task.policy(), TableTwist(task, tables), prompts=[()] * runs, num_particles=N,
                    resample="multinomial", ess_threshold=1.0, final_resample=1, rng=[seed, k, N],
                )  # fmt: skip
                drawn = np.stack([s[0] for s in result.samples])
                keys, counts = np.unique(drawn, axis=0, return_counts=True)
                empirical = {tuple(int(v) for v in key): c / runs for key, c in zip(keys, counts)}
                measured, method = tv(empirical, pi), f"{runs} runs (plug-in)"
                floor = 0.5 * math.sqrt(len(pi) / runs)
            row = {"N": N, "tv": measured, "noise_floor": floor, "method": method, "bound": bound}
            rows.append({**common, **row, "holds": measured <= bound})
    return rows


def online_reading(seed: int, prompts: int, particles: int) -> dict[str, Any]:
    # concentration 0.3: peaked transitions, so that V* (and every potential) varies with the prefix
    task = MarkovDFATask.random(3, 3, 24, rng=seed, zero_reward_fraction=0.0, concentration=0.3)
    gen = np.random.default_rng(seed + 1)
    log_scale = np.append(gen.uniform(-0.3, 0.3, size=task.horizon), 0.0)  # log c_t, c_T = 1
    tables = task.log_v_star()
    twist = TableTwist(
        task, [float(tables[0]) + log_scale[0]] + [tables[t] + log_scale[t] for t in range(1, 25)]
    )
    exact = task.bellman_error(twist)
    result = tiltsmc.smc(task.policy(), twist, prompts=[()] * prompts, num_particles=particles, rng=seed)
    reading = tiltsmc.diagnostics.online_bellman(result)
    log_rho = np.diff(log_scale)
    noisy = result.log_z_increment_se > 0  # where every potential is equal the increment is exact
    z = (result.log_z_increments - log_rho[None, :])[noisy] / result.log_z_increment_se[noisy]
    exact_steps = np.abs(result.log_z_increments - log_rho[None, :])[~noisy]
    return {
        "task": "MarkovDFATask.random(3, 3, 24, concentration=0.3), Vh_t = c_t V*_t, log c_t ~ U[-0.3, 0.3]",
        "readings_with_zero_se": int(np.count_nonzero(~noisy)),
        "largest_error_where_se_is_zero": float(exact_steps.max()) if exact_steps.size else 0.0,
        "prompts": prompts,
        "particles": particles,
        "exact_per_step": exact.per_step,
        "exact_eps": exact.eps,
        "reading_point_mean_over_prompts": reading.per_step.mean(axis=0),
        "reading_low_max_over_prompts": reading.per_step_low.max(axis=0),
        "eps_low": reading.eps_low,
        "eps_point": reading.eps_point,
        "z_mean": float(z.mean()),
        "z_sd": float(z.std()),
        "z_max_abs": float(np.abs(z).max()),
        "summary_line": reading.summary(eps=0.1),
    }


def plot(
    rows43: list[dict[str, Any]], rows51: list[dict[str, Any]], online: dict[str, Any], path: Path
) -> None:
    plt = _plot.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17.0, 5.0))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ax = axes[0]
    for i, noise in enumerate(NOISES_43):
        mine = [r for r in rows43 if r["noise"] == noise and r["task"] == 0]
        positive = [r for r in mine if r["tv"] > 0]  # TV = 0 at t = 1: q_1 = pi_1 exactly
        ax.plot(
            [r["t"] for r in positive],
            [r["tv"] for r in positive],
            "o-",
            color=colors[i],
            label=f"TV, noise {noise:g}",
        )
        ax.plot(
            [r["t"] for r in mine],
            [r["bound"] for r in mine],
            ":",
            color=colors[i],
            label=f"2 t eps, noise {noise:g}",
        )
    ax.set_yscale("log")
    ax.set_xlabel("step t")
    ax.set_ylabel("TV(law of exact SP-gSMC, pi_t)")
    ax.set_title("Theorem 4.3 (task 0; exact enumeration; TV = 0 at t = 1)", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[1]
    for i, case in enumerate(sorted({r["case"] for r in rows51})):
        mine = [r for r in rows51 if r["case"] == case]
        label = f"floor {mine[0]['reward_low']:g}, noise {mine[0]['noise']:g}"
        ax.plot([r["N"] for r in mine], [r["tv"] for r in mine], "o-", color=colors[i], label=f"TV ({label})")
        ax.plot([r["N"] for r in mine], [r["bound"] for r in mine], ":", color=colors[i], label="bound")
    floors = sorted({(r["N"], r["noise_floor"]) for r in rows51 if r["noise_floor"] > 0})
    if floors:
        ax.plot(*zip(*floors), "k--", lw=0.8, label="plug-in noise floor")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("particles N (<= 4 enumerated, above: sampled)")
    ax.set_ylabel("TV(output particle, pi)")
    ax.set_title("Theorem 5.1: L^6 T (1+eps)^(6(T-1)) / (2N)", fontsize=10)
    ax.legend(fontsize=6)
    ax = axes[2]
    steps = np.arange(1, len(online["exact_per_step"]) + 1)
    ax.plot(steps, online["exact_per_step"], "k-", label="exact eps_t")
    ax.plot(steps, online["reading_point_mean_over_prompts"], "o", label="point reading, mean over prompts")
    ax.plot(
        steps, online["reading_low_max_over_prompts"], "v", label="95% joint lower bound, max over prompts"
    )
    ax.set_xlabel("step t")
    ax.set_ylabel("Bellman error")
    ax.set_title(f"online reading from log Z increments (N = {online['particles']})", fontsize=10)
    ax.legend(fontsize=7)
    _plot.save_figure(fig, path)
    plt.close(fig)


def main() -> None:
    args = _plot.parse_args(__doc__.splitlines()[0], default_seed=20261204)
    began = time.perf_counter()
    tasks = 1 if args.quick else 3
    rows43 = theorem_43(args.seed, tasks)
    table43 = [
        [r["task"], r["noise"], r["t"], r["gauge_eps"], r["tv"], r["bound"], r["tv"] / r["bound"], r["holds"]]
        for r in rows43
    ]
    text = _plot.table(
        ["task", "noise", "t", "gauge eps", "TV", "2 t eps", "TV / bound", "holds"],
        table43,
        title="Theorem 4.3: exact SP-gSMC's law at step t against pi_t (both enumerated)",
    )
    sampled_N = () if args.quick else (8, 16, 64)
    rows51 = theorem_51(args.seed, (1, 2, 3, 4), sampled_N, 2_000 if args.quick else 200_000)
    columns = ["case", "reward_low", "noise", "L", "eps", "gauge_L", "gauge_eps", "N", "tv", "noise_floor"]
    text += "\n" + _plot.table(
        [
            "case",
            "floor",
            "noise",
            "L",
            "eps",
            "gauge L",
            "gauge eps",
            "N",
            "TV",
            "noise floor",
            "bound",
            "holds",
        ],
        [[r[c] for c in columns] + [r["bound"], r["holds"]] for r in rows51],
        title="Theorem 5.1: the output particle's law against pi (N <= 4 enumerated; above, sampled)",
    )
    online = online_reading(args.seed, 8 if args.quick else 32, 256)
    print(online["summary_line"])
    print(
        f"online reading: exact eps {online['exact_eps']:.4f}, lower bound {online['eps_low']:.4f}, "
        f"largest point reading {online['eps_point']:.4f}; z-scores of the increments: "
        f"mean {online['z_mean']:+.3f}, sd {online['z_sd']:.3f}, max |z| {online['z_max_abs']:.2f}"
    )
    informative = [r["tv"] / r["bound"] for r in rows51 if r["bound"] < 1]
    verdicts = [
        f"Theorem 4.3: TV <= 2 t eps held in {sum(r['holds'] for r in rows43)} of {len(rows43)} "
        f"(task, noise, t); largest TV / bound {max(r['tv'] / r['bound'] for r in rows43):.3f}",
        f"Theorem 5.1: the bound held in {sum(r['holds'] for r in rows51)} of {len(rows51)} (case, N); it is "
        f"below 1 in {len(informative)} of them; largest TV / bound there: "
        f"{max(informative, default=float('nan')):.3g}",
        f"online reading: lower bound {online['eps_low']:.4f} <= exact eps {online['exact_eps']:.4f}: "
        f"{online['eps_low'] <= online['exact_eps']}",
    ]
    print("\n".join(verdicts))
    record = _plot.header(NAME, args)
    record.update(
        {
            "parameters": {"noises_4_3": list(NOISES_43), "cases_5_1": [list(c) for c in CASES_51]},
            "theorem_4_3": rows43,
            "theorem_5_1": rows51,
            "online_reading": online,
            "verdicts": verdicts,
            "printed_tables": text,
            "seconds": time.perf_counter() - began,
        }
    )
    _plot.write_json(args.out / f"{NAME}.json", record)
    plot(rows43, rows51, online, args.out / f"{NAME}.png")
    print(f"total {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
