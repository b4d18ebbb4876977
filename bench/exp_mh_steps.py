#!/usr/bin/env python3
"""Accuracy of resampling-pool Metropolis-Hastings against the number of MH steps H (docs/theory/samplers.md).

A small random Markov-DFA task (V = 3, Q = 3, T = 4: 81 sequences, so ``pi ∝ p r`` is enumerated) and a
poor twist (``V*`` with log-values perturbed by U[-1, 1]). For pool sizes K = 2, 4 and H = 0, 1, 2, ..., 32,
``tiltsmc.mh`` runs B independent chains in one batched call; the total-variation distance between the
histogram of their final states and ``pi`` is measured. H = 0 is uncorrected SP-gSMC (cross-checked with a
direct ``sp_gsmc`` call). The noise floor is the mean TV of B exact draws (``task.sample_exact``). The claim
under test: TV contracts geometrically in H down to the floor. The fitted rate uses the points above twice
the floor; it is compared with the worst-case rate ``1 - 1/w*`` of independent MH, ``w* = sup Zh / Z`` over
pool runs, computed exactly by dynamic programming over the task's (token, automaton state) summaries.

Run ``python bench/exp_mh_steps.py [--quick] [--seed S] [--out DIR]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _plot
import tiltsmc
from tiltsmc.tasks import MarkovDFATask
from tiltsmc.tasks.models import TableTwist

NAME = "exp_mh_steps"
V, Q, T = 3, 3, 4
NOISE = 1.0
POOL_SIZES = (2, 4)
ABOVE_FLOOR = 3.0  # fit the contraction on the points with TV > ABOVE_FLOOR x floor


def log_sup_pool_estimate(task: MarkovDFATask, twist: TableTwist, K: int) -> float:
    """``log sup Zh`` over every run of SP-gSMC with a pool of K (all candidates possible under p).

    ``Zh = Vh_0 prod_t mean_k G_t^(k)``. Given the kept prefix s, the best step keeps a token c (with p > 0
    and G > 0) and fills the other K - 1 slots with the token of largest potential, so
    ``W_{t-1}(s) = max_c (G(s, c) + (K - 1) max_w G(s, w)) / K * W_t(s c)``, ``W_T = 1``, and
    ``sup Zh = Vh_0 W_0``. Computed over the (last token, automaton state) summaries in the log domain.
    """
    tables = twist.tables
    dfa = task.dfa

    def best(log_g: np.ndarray, log_p: np.ndarray, value_child: np.ndarray) -> float:
        possible = log_p > -np.inf
        g_max = np.max(np.where(possible, log_g, -np.inf))
        keep = possible & (log_g > -np.inf)
        mean = np.logaddexp(log_g, np.log(K - 1) + g_max) - np.log(K) if K > 1 else log_g
        return float(np.max(np.where(keep, mean + value_child, -np.inf)))

    w_next = np.zeros((V, Q))  # log W_T
    for t in range(T, 0, -1):
        level = np.asarray(tables[t])
        child = level[np.arange(V)[None, :], dfa]  # [q, c]: log Vh_t after appending c in state q
        value_child = w_next[np.arange(V)[None, :], dfa]  # [q, c]: log W_t after appending c in state q
        if t == 1:  # the empty prefix, in the start state, with log Vh_0 = tables[0]
            root = float(tables[0])
            q = task.start
            return root + best(child[q] - root, task.log_init, value_child[q])
        parent = np.asarray(tables[t - 1])
        log_p = task.log_trans_at(t - 1)  # [v, c]
        w_here = np.full((V, Q), -np.inf)
        for v in range(V):
            for q in range(Q):
                if parent[v, q] > -np.inf:
                    w_here[v, q] = best(child[q] - parent[v, q], log_p[v], value_child[q])
        w_next = w_here
    raise AssertionError("T >= 1")


def sequence_index(x: np.ndarray) -> np.ndarray:
    """Lexicographic index of each row of an (n, T) token array (the order of ``enumerate_sequences``)."""
    return (x * V ** np.arange(T - 1, -1, -1)).sum(axis=1)


def tv_of(x: np.ndarray, pi: np.ndarray) -> float:
    counts = np.bincount(sequence_index(x), minlength=pi.size)
    return 0.5 * float(np.abs(counts / x.shape[0] - pi).sum())


def main() -> None:
    args = _plot.parse_args(__doc__.splitlines()[0], default_seed=20240603)
    began = time.perf_counter()
    B = 4000 if args.quick else 20000
    repeats = 1 if args.quick else 3
    horizons_h = [0, 1, 2, 4, 8, 16] if args.quick else [0, 1, 2, 4, 8, 16, 32, 64]
    floor_repeats = 10 if args.quick else 30

    task = MarkovDFATask.random(V, Q, T, rng=[args.seed, 1])
    twist = task.twist(NOISE, rng=[args.seed, 2])
    policy = task.policy()
    sequences, log_p, log_r = task.enumerate_sequences()
    assert np.array_equal(sequence_index(sequences), np.arange(V**T))
    log_pi = log_p + log_r
    pi = np.exp(log_pi - np.logaddexp.reduce(log_pi))
    bellman = task.bellman_error(twist.tables)
    log_z = task.exact_log_z()

    floor_gen = np.random.default_rng([args.seed, 3])
    floor_tvs = np.array([tv_of(task.sample_exact(B, rng=floor_gen), pi) for _ in range(floor_repeats)])
    floor = float(floor_tvs.mean())

    results: dict[int, dict[str, Any]] = {}
    for K in POOL_SIZES:
        log_w_star = log_sup_pool_estimate(task, twist, K) - log_z
        w_star = float(np.exp(log_w_star))
        rows = []
        for H in horizons_h:
            tvs, acceptance, seconds = [], [], []
            for rep in range(repeats):
                gen = np.random.default_rng([args.seed, 4, K, H, rep])
                start = time.perf_counter()
                res = tiltsmc.mh(policy, twist, prompts=[()] * B, pool_size=K, steps=H, rng=gen)
                seconds.append(time.perf_counter() - start)
                x = np.stack([s[0] for s in res.samples])
                tvs.append(tv_of(x, pi))
                acceptance.append(float(np.nanmean(res.acceptance_rate)) if H else float("nan"))
            rows.append(
                {
                    "H": H,
                    "tv": tvs,
                    "tv_mean": float(np.mean(tvs)),
                    "tv_sd": float(np.std(tvs, ddof=1)) if repeats > 1 else None,
                    "acceptance_rate": float(np.mean(acceptance)) if H else None,
                    "seconds": float(np.sum(seconds)),
                    "above_floor": bool(np.mean(tvs) > ABOVE_FLOOR * floor),
                    "worst_case_bound": float(min(1.0, (1 - 1 / w_star) ** H)) if w_star >= 1 else None,
                }
            )
        direct = tiltsmc.sp_gsmc(policy, twist, prompts=[()] * B, pool_size=K, rng=[args.seed, 5, K])
        direct_tv = tv_of(np.stack([s[0] for s in direct.samples]), pi)
        max_seen = float(np.exp(np.max(direct.log_z) - log_z))
        assert max_seen <= w_star * (1 + 1e-9), (max_seen, w_star)
        used = [r for r in rows if r["above_floor"]]
        fit = _plot.linear_fit([r["H"] for r in used], np.log([r["tv_mean"] for r in used]))
        rate = float(np.exp(fit["slope"])) if fit else None
        reaches = next((r["H"] for r in rows if r["tv_mean"] <= 1.2 * floor), None)
        local = [
            {
                "from_H": a["H"],
                "to_H": b["H"],
                "rate": float((b["tv_mean"] / a["tv_mean"]) ** (1 / (b["H"] - a["H"]))),
                "both_above_floor": a["above_floor"] and b["above_floor"],
            }
            for a, b in zip(rows, rows[1:])
        ]
        results[K] = {
            "K": K,
            "rows": rows,
            "sp_gsmc_direct_tv": direct_tv,
            "max_observed_Zh_over_Z": max_seen,
            "w_star": w_star,
            "worst_case_rate": 1 - 1 / w_star,
            "fit_points_H": [r["H"] for r in used],
            "fit": fit,
            "rate": rate,
            "local_rates": local,
            "first_H_within_1.2x_floor": reaches,
        }

    print(
        f"MH steps vs accuracy: V={V}, Q={Q}, T={T} ({V**T} sequences), twist noise {NOISE} "
        f"(exact eps {bellman.eps:.3f}, gauge eps {bellman.gauge_eps:.3f}, L {bellman.ratio_bound:.2f}), "
        f"B={B} chains x {repeats} repeats"
    )
    print(f"noise floor: mean TV of {B} exact draws = {floor:.4f} (sd {floor_tvs.std(ddof=1):.4f})\n")
    table_rows = []
    for K, res in results.items():
        for r in res["rows"]:
            table_rows.append(
                [
                    K,
                    r["H"],
                    r["tv_mean"],
                    r["tv_sd"],
                    r["tv_mean"] / floor,
                    r["acceptance_rate"],
                    r["worst_case_bound"],
                    "fit" if r["above_floor"] else "",
                    r["seconds"],
                ]
            )
    text = _plot.table(
        ["K", "H", "TV", "sd", "TV/floor", "accept", "(1-1/w*)^H", "", "s"],
        table_rows,
        title="TV(final states, pi) against the number of MH steps (H=0: uncorrected SP-gSMC)",
    )
    summary_rows = [
        [
            K,
            res["sp_gsmc_direct_tv"],
            res["rows"][0]["tv_mean"],
            ",".join(map(str, res["fit_points_H"])) or "-",
            res["rate"],
            res["fit"]["r2"] if res["fit"] else None,
            " ".join(_plot.fmt(lr["rate"], 2) for lr in res["local_rates"] if lr["both_above_floor"]) or "-",
            res["w_star"],
            res["worst_case_rate"],
            res["first_H_within_1.2x_floor"],
        ]
        for K, res in results.items()
    ]
    text += "\n" + _plot.table(
        [
            "K",
            "TV sp_gsmc",
            "TV H=0",
            "fit on H",
            "rate/step",
            "R^2",
            "local rates (H pairs)",
            "w*=sup Zh/Z",
            "1-1/w*",
            "H to 1.2x floor",
        ],
        summary_rows,
        title=f"Geometric contraction fitted on the points with TV > {ABOVE_FLOOR:g} x floor",
    )
    verdicts = []
    for K, res in results.items():
        rows = res["rows"]
        final = rows[-1]["tv_mean"]
        if res["rate"] is None:
            verdicts.append(f"K={K}: fewer than two points above the floor; no contraction rate fitted")
            continue
        geometric = res["fit"]["r2"] >= 0.98 and res["rate"] < 1
        local = [lr["rate"] for lr in res["local_rates"] if lr["both_above_floor"]]
        reach = res["first_H_within_1.2x_floor"]
        shape = (
            "geometric contraction as claimed"
            if geometric
            else "contracting, but NOT at one geometric rate"
            if res["rate"] < 1
            else "NO contraction"
        )
        verdicts.append(
            f"K={K}: TV {rows[0]['tv_mean']:.3f} at H=0 -> {final:.4f} at H={rows[-1]['H']} "
            f"(floor {floor:.4f}); "
            f"fitted rate {res['rate']:.3f}/step (R^2 {res['fit']['r2']:.3f}) -> {shape}"
            + (f"; local rate {local[0]:.3f} -> {local[-1]:.3f}/step along H" if local else "")
            + (f"; within 1.2x floor from H={reach}" if reach is not None else "; never within 1.2x floor")
            + f"; worst-case IMH rate 1-1/w* = {res['worst_case_rate']:.4f} "
            + ("(measured faster)" if res["rate"] < res["worst_case_rate"] else "(measured NOT faster)")
        )
        if final > 1.5 * floor:
            verdicts.append(f"K={K}: the last point is still {final / floor:.1f}x the floor")
    print("\n".join(verdicts))

    record = _plot.header(NAME, args)
    record.update(
        {
            "parameters": {
                "V": V,
                "Q": Q,
                "T": T,
                "task": "MarkovDFATask.random(V, Q, T, rng=[seed, 1])",
                "twist_noise": NOISE,
                "chains_B": B,
                "repeats": repeats,
                "H_values": horizons_h,
                "pool_sizes": POOL_SIZES,
                "floor_repeats": floor_repeats,
                "fit_threshold_x_floor": ABOVE_FLOOR,
            },
            "task": {
                "exact_log_z": log_z,
                "bellman_eps": bellman.eps,
                "bellman_gauge_eps": bellman.gauge_eps,
                "ratio_bound": bellman.ratio_bound,
                "pi": pi,
            },
            "noise_floor": {"mean": floor, "sd": float(floor_tvs.std(ddof=1)), "tvs": floor_tvs},
            "results": {str(K): res for K, res in results.items()},
            "verdicts": verdicts,
            "printed_tables": text,
            "seconds": time.perf_counter() - began,
        }
    )
    _plot.write_json(args.out / f"{NAME}.json", record)
    plot(results, floor, float(floor_tvs.std(ddof=1)), B, args.out / f"{NAME}.png")
    print(f"total {time.perf_counter() - began:.1f} s")


def plot(results: dict[int, dict[str, Any]], floor: float, floor_sd: float, B: int, path: Path) -> None:
    plt = _plot.pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (K, res) in enumerate(results.items()):
        H = np.array([r["H"] for r in res["rows"]])
        tv = np.array([r["tv_mean"] for r in res["rows"]])
        sd = np.array([r["tv_sd"] or 0.0 for r in res["rows"]])
        ax.errorbar(H, tv, yerr=sd, fmt="o-", color=colors[i], capsize=3, label=f"K={K} pool MH")
        ax.plot([0], [res["sp_gsmc_direct_tv"]], "x", color=colors[i], ms=10, label=f"K={K} sp_gsmc (direct)")
        bound = [r["worst_case_bound"] for r in res["rows"]]
        ax.plot(H, bound, ":", color=colors[i], lw=1, label=f"K={K} worst-case IMH bound (1-1/w*)^H")
        if res["fit"]:
            hs = np.array(res["fit_points_H"], dtype=float)
            ax.plot(
                hs,
                np.exp(res["fit"]["intercept"] + res["fit"]["slope"] * hs),
                "--",
                color=colors[i],
                alpha=0.6,
                label=f"K={K} fit: rate {res['rate']:.3f}/step",
            )
    ax.axhline(floor, color="k", lw=1, label=f"noise floor: TV of {B} exact draws")
    ax.axhspan(floor - floor_sd, floor + floor_sd, color="k", alpha=0.1)
    ax.set_yscale("log")
    ax.set_xlabel("MH steps H")
    ax.set_ylabel("TV(histogram of final states, pi)")
    ax.set_title(f"pool-MH correction, V={V}, T={T}, twist noise {NOISE}", fontsize=10)
    ax.legend(fontsize=7)
    _plot.save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
