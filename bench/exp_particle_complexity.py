#!/usr/bin/env python3
"""Particle complexity of SMC against the horizon T, with and without guidance (docs/theory/).

For each task and guidance setting, the smallest particle count N is searched (doubling from 1, then
geometric bisection) such that SMC (naive proposal, systematic resampling at ESS < N/2) meets
  * the hit criterion: the target string is among the final particles with positive weight in >= 90% of runs;
  * the TV criterion: the mean over runs of max_i TV(weighted marginal of x_i, exact marginal) <= 0.1 (a
    collapsed run counts as TV 1).
Each N is judged from R replicate runs of one batched call (``prompts=[()] * R``), stopped early once 99%
intervals (Wilson for the hit rate, normal for the mean TV) put both criteria clearly on one side.

Part A, needle tasks (``MarkovDFATask.needle(V=2, T)``, one accepted string): twists ``V*`` perturbed with
noise c/T (c = 1), ``V*`` perturbed with constant noise 0.5, and no guidance. Part B, the paper's hard
instance (``tiltsmc.tasks.hard_instance(a, m)``, docs/theory/tilted-target.md: T = 3m, branching B = a,
hidden prefix u of length 2m, m deterministic steps, r = a^m on u and a^-m elsewhere) for a = 2, 3, 4: the
same three settings plus the hard twist (``Vh = 1`` for t <= 2m, then multiplied by a or 1/a per step: L = a,
eps = a - 1). Part C, the same construction with B = 2 and a = 4 (what this script ran before issue 17): the
cost of finding u is then B's, not the bound's.

The paper's claims (it has no experiments of its own; these are its claims, tested): polynomial cost for
eps = O(1/T); for the hard twist of constant eps = a - 1, a number of queries exponential in T at the lower
bound's rate: log N against T with slope 2 ln a / 3 = 2 ln(1 + eps) / 3 (0.46, 0.73, 0.92 for a = 2, 3, 4).
Without guidance on the needle: ln 2 = 0.69 (i.i.d. search for one string of 2^T).

Run ``python bench/exp_particle_complexity.py [--quick] [--seed S] [--out DIR]``.
"""

from __future__ import annotations

import math
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _plot
import tiltsmc
from tiltsmc.tasks import MarkovDFATask, hard_instance
from tiltsmc.tasks.models import TableTwist

NAME = "exp_particle_complexity"
HIT_LEVEL = 0.9
TV_LEVEL = 0.1
Z99 = 2.5758
MIN_REPLICATES = 20
MIN_PASS_REPLICATES = 60
PARTICLE_BUDGET = 2**18  # replicates x particles per smc call (memory bound)
C_NOISE = 1.0
CONST_NOISE = 0.5
HARD_A = (2, 3, 4)  # B = a: the paper's construction
DECOUPLED = (2, 4.0)  # (B, a): the construction this script used before issue 17


@dataclass
class Config:
    needle_T: list[int]
    hard_m: list[int]
    cap: int
    hard_cap: int
    max_replicates: int
    bisect_steps: int
    large_N: int  # from here on, fewer replicates and bisection steps (cost control)
    max_replicates_large: int
    bisect_steps_large: int

    def replicates(self, N: int) -> int:
        return self.max_replicates if N < self.large_N else self.max_replicates_large


FULL = Config(
    needle_T=[4, 6, 8, 10, 12, 14, 16, 24, 32, 48, 64],
    hard_m=[1, 2, 3, 4, 5, 6, 7, 8, 10, 12],
    cap=2**16,
    hard_cap=2**14,
    max_replicates=200,
    bisect_steps=2,
    large_N=4096,
    max_replicates_large=100,
    bisect_steps_large=1,
)
QUICK = Config(
    needle_T=[4, 8, 12, 16, 32, 64],
    hard_m=[1, 2, 3, 4, 6, 8],
    cap=2**11,
    hard_cap=2**10,
    max_replicates=60,
    bisect_steps=0,
    large_N=2**11,
    max_replicates_large=60,
    bisect_steps_large=0,
)


# ---------------------------------------------------------------------------------------------- tasks


# ---------------------------------------------------------------------------------------------- runs


def run_replicates(
    task: MarkovDFATask,
    twist: TableTwist,
    target: np.ndarray,
    marginals: np.ndarray,
    N: int,
    R: int,
    gen: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """R independent SMC runs with N particles: per run, whether the target was hit, and max_i TV."""
    policy = task.policy()
    hits, tvs = [], []
    per_call = max(1, min(R, PARTICLE_BUDGET // N))
    done = 0
    while done < R:
        r = min(per_call, R - done)
        res = tiltsmc.smc(
            policy,
            twist,
            prompts=[()] * r,
            num_particles=N,
            resample="systematic",
            ess_threshold=0.5,
            proposal="naive",
            rng=gen,
        )
        x = np.stack(res.samples)  # (r, N, T)
        with np.errstate(invalid="ignore"):
            w = np.exp(np.stack(res.log_weights))
        w = np.where(res.collapsed[:, None] | ~np.isfinite(w), 0.0, w)
        on_target = np.all(x == target, axis=2)
        hits.append(np.any(on_target & (w > 0), axis=1))
        tv = np.zeros((r, task.horizon))
        for v in range(task.vocab_size):
            weighted = np.einsum("rn,rnt->rt", w, (x == v).astype(np.float64))
            tv += 0.5 * np.abs(weighted - marginals[None, :, v])
        tvs.append(np.where(res.collapsed, 1.0, tv.max(axis=1)))
        done += r
    return np.concatenate(hits), np.concatenate(tvs)


def wilson(k: int, n: int, z: float = Z99) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluate(
    task: MarkovDFATask,
    twist: TableTwist,
    target: np.ndarray,
    marginals: np.ndarray,
    N: int,
    max_replicates: int,
    gen: np.random.Generator,
) -> dict[str, Any]:
    """Hit rate and mean max-TV at N, from up to ``max_replicates`` runs with sequential early stopping."""
    hits = np.zeros(0, dtype=bool)
    tvs = np.zeros(0)
    while hits.size < max_replicates:
        chunk = MIN_REPLICATES if hits.size < MIN_PASS_REPLICATES else 2 * MIN_REPLICATES
        h, tv = run_replicates(task, twist, target, marginals, N, min(chunk, max_replicates - hits.size), gen)
        hits, tvs = np.concatenate([hits, h]), np.concatenate([tvs, tv])
        n = hits.size
        lo, hi = wilson(int(hits.sum()), n)
        half = Z99 * float(tvs.std(ddof=1)) / math.sqrt(n)
        mean = float(tvs.mean())
        enough = n >= MIN_PASS_REPLICATES
        hit_clear = hi < HIT_LEVEL or (lo > HIT_LEVEL and enough)
        tv_clear = mean - half > TV_LEVEL or (mean + half < TV_LEVEL and enough)
        if hit_clear and tv_clear:
            break
    n = hits.size
    return {
        "N": N,
        "replicates": n,
        "hit_rate": float(hits.mean()),
        "hit_interval99": wilson(int(hits.sum()), n),
        "hit_pass": bool(hits.mean() >= HIT_LEVEL),
        "mean_tv": float(tvs.mean()),
        "tv_se": float(tvs.std(ddof=1) / math.sqrt(n)),
        "tv_pass": bool(tvs.mean() <= TV_LEVEL + 1e-9),  # rounding: a hit run's TV is 0 up to ~1e-16
        "particle_steps": int(n) * N * task.horizon,
    }


def search(evaluate_at: Callable[[int], dict[str, Any]], cap: int, config: Config) -> dict[str, Any]:
    """Smallest N (per criterion) by doubling from 1 up to ``cap``, then geometric bisection."""
    trace: dict[int, dict[str, Any]] = {}

    def at(N: int) -> dict[str, Any]:
        if N not in trace:
            trace[N] = evaluate_at(N)
        return trace[N]

    criteria = ("hit", "tv")
    first_pass: dict[str, int | None] = dict.fromkeys(criteria)
    last_fail = dict.fromkeys(criteria, 0)
    N = 1
    while N <= cap and any(first_pass[c] is None for c in criteria):
        result = at(N)
        for c in criteria:
            if first_pass[c] is None:
                if result[f"{c}_pass"]:
                    first_pass[c] = N
                else:
                    last_fail[c] = N
        N *= 2
    out: dict[str, Any] = {}
    for c in criteria:
        hi = first_pass[c]
        if hi is None:
            out[c] = None
            continue
        lo = last_fail[c]
        for _ in range(config.bisect_steps if hi <= config.large_N else config.bisect_steps_large):
            if lo == 0 or hi - lo <= 1:
                break
            mid = round(math.sqrt(lo * hi))
            mid = min(max(mid, lo + 1), hi - 1)
            if at(mid)[f"{c}_pass"]:
                hi = mid
            else:
                lo = mid
        out[c] = hi
    out["trace"] = [trace[k] for k in sorted(trace)]
    out["particle_steps"] = sum(r["particle_steps"] for r in trace.values())
    return out


# ---------------------------------------------------------------------------------------------- experiment


def run_part(
    part: str,
    horizons: list[int],
    make: Callable[[int, np.random.Generator], tuple[MarkovDFATask, dict[str, TableTwist], float]],
    cap: int,
    config: Config,
    seed: int,
) -> dict[str, Any]:
    """For every horizon and setting: exact eps of the twist and the smallest N of both criteria."""
    rows: list[dict[str, Any]] = []
    exceeded: dict[str, int] = {}
    for T in horizons:
        task, twists, p_target = make(T, np.random.default_rng([seed, zlib.crc32(part.encode()), T]))
        marginals = task.exact_marginals()
        target = np.argmax(marginals, axis=1)
        for s_index, (setting, twist) in enumerate(twists.items()):
            report = task.bellman_error(twist.tables)
            row: dict[str, Any] = {
                "part": part,
                "T": T,
                "setting": setting,
                "eps": report.eps,
                "gauge_eps": report.gauge_eps,
                "ratio_bound": report.ratio_bound,
                "target_mass": float(
                    np.exp(
                        task.sequence_log_prob(target[None])[0]
                        + task.sequence_log_reward(target[None])[0]
                        - task.exact_log_z()
                    )
                ),
                "analytic_unguided_hit_N": math.ceil(math.log(1 - HIT_LEVEL) / math.log1p(-p_target)),
            }
            if setting in exceeded:
                row.update({"hit": None, "tv": None, "skipped": f"exceeded the cap at T={exceeded[setting]}"})
                rows.append(row)
                continue
            gen = np.random.default_rng([seed, zlib.crc32(part.encode()), T, s_index])
            began = time.perf_counter()
            found = search(
                lambda N, task=task, twist=twist, target=target, marginals=marginals, gen=gen: evaluate(
                    task, twist, target, marginals, N, config.replicates(N), gen
                ),
                cap,
                config,
            )
            row.update(found)
            row["seconds"] = time.perf_counter() - began
            row["skipped"] = None
            if found["hit"] is None and found["tv"] is None:
                exceeded[setting] = T
            rows.append(row)
            print(
                f"  {part} T={T:3d} {setting:28s} N_hit={_plot.fmt(found['hit'] or f'>{cap}'):>7s} "
                f"N_tv={_plot.fmt(found['tv'] or f'>{cap}'):>7s}  ({row['seconds']:.1f} s)",
                flush=True,
            )
    return {"rows": rows, "cap": cap}


def needle_case(T: int, rng: np.random.Generator) -> tuple[MarkovDFATask, dict[str, TableTwist], float]:
    task = MarkovDFATask.needle(2, T, rng=rng)
    twists = {
        f"V* noise c/T (c={C_NOISE:g})": task.twist(C_NOISE / T, rng=rng),
        f"V* noise const {CONST_NOISE:g}": task.twist(CONST_NOISE, rng=rng),
        "unguided": task.unguided(),
    }
    return task, twists, 2.0**-T


def hard_case(
    a: float, branching: int | None, settings: tuple[str, ...]
) -> Callable[[int, np.random.Generator], tuple[MarkovDFATask, dict[str, TableTwist], float]]:
    """The hard instance ``tiltsmc.tasks.hard_instance(a, T // 3, branching=...)`` with its settings."""

    def make(T: int, rng: np.random.Generator) -> tuple[MarkovDFATask, dict[str, TableTwist], float]:
        hard = hard_instance(a, T // 3, rng=rng, branching=branching)
        task = hard.task
        twists = {
            f"V* noise c/T (c={C_NOISE:g})": task.twist(C_NOISE / T, rng=rng),
            f"V* noise const {CONST_NOISE:g}": task.twist(CONST_NOISE, rng=rng),
            f"hard twist (eps=a-1={hard.a - 1:g})": hard.twist,
            "unguided": task.unguided(),
        }
        return (
            task,
            {k: v for k, v in twists.items() if any(k.startswith(p) for p in settings)},
            float(hard.branching ** (-2 * hard.m)),
        )

    return make


def fits(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (part, setting, criterion): fits of log N against log T (power) and against T (exponential)."""
    out: dict[str, Any] = {}
    keys = sorted({(r["part"], r["setting"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for part, setting in keys:
        mine = [r for r in rows if r["part"] == part and r["setting"] == setting]
        for crit in ("hit", "tv"):
            points = [(r["T"], r[crit]) for r in mine if r.get(crit)]
            beyond = [r["T"] for r in mine if not r.get(crit)]
            T = np.array([p[0] for p in points], dtype=float)
            N = np.array([p[1] for p in points], dtype=float)
            power = _plot.linear_fit(np.log(T), np.log(N)) if len(points) >= 2 else None
            expo = _plot.linear_fit(T, np.log(N)) if len(points) >= 2 else None
            if power and expo:
                better = "polynomial" if power["r2"] >= expo["r2"] else "exponential"
            else:
                better = "n/a"
            out[f"{part} | {setting} | {crit}"] = {
                "part": part,
                "setting": setting,
                "criterion": crit,
                "points": len(points),
                "T_beyond_cap": beyond,
                "power_fit": power,
                "degree": power["slope"] if power else None,
                "exponential_fit": expo,
                "rate_per_step": expo["slope"] if expo else None,
                "better_fit": better,
                "N_growth_first_to_last": float(N[-1] / N[0]) if len(points) >= 2 else None,
            }
    return out


def part_parameters(part: str) -> tuple[int, float] | None:
    """``(B, a)`` of a hard-instance part, read from its label ``"... B=2 a=4"`` (None on the needle)."""
    if part.startswith("A"):
        return None
    fields = dict(item.split("=") for item in part.split() if "=" in item)
    return int(fields["B"]), float(fields["a"])


def expected_rate(part: str, setting: str) -> tuple[float | None, str]:
    """The slope of log N against T that the paper's claim predicts, and what it is.

    Needle, unguided: ln 2 (i.i.d. search for one string among 2^T). Hard instance, hard twist: the lower
    bound's 2 ln a / 3 (= 2 ln(1 + eps) / 3); the claim concerns B = a, and with B != a the search for u
    costs 2 ln B / 3 instead. Unguided on the hard instance: the same search for u (2 ln B / 3), though its
    eps (a^m - 1) is not constant."""
    parameters = part_parameters(part)
    if parameters is None:
        return (math.log(2), "ln 2 (search among 2^T)") if setting == "unguided" else (None, "")
    B, a = parameters
    if setting.startswith("hard twist"):
        if B == a:
            return 2 * math.log(a) / 3, f"2 ln a / 3 (lower bound, a = {a:g})"
        return 2 * math.log(
            B
        ) / 3, f"2 ln B / 3 (search, B = {B}; the bound's 2 ln a / 3 = {2 * math.log(a) / 3:.3f})"
    if setting == "unguided":
        return 2 * math.log(B) / 3, f"2 ln B / 3 (search, B = {B})"
    return None, ""


def verdicts(fitted: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """Plain-language comparison with the paper's claims (hit criterion; the TV one is in the tables)."""
    out = []
    for f in fitted.values():
        if f["criterion"] != "hit":
            continue
        label = f"{f['part']} / {f['setting']}"
        mine = [r for r in rows if r["part"] == f["part"] and r["setting"] == f["setting"]]
        found = [(r["T"], r["hit"]) for r in mine if r.get("hit")]
        power, expo = f["power_fit"], f["exponential_fit"]
        fit_text = (
            f"fits: degree {_plot.fmt(f['degree'])} (R^2 {_plot.fmt(power['r2'] if power else None)}), "
            f"rate {_plot.fmt(f['rate_per_step'])}/step (R^2 {_plot.fmt(expo['r2'] if expo else None)})"
        )
        expected, what = expected_rate(f["part"], f["setting"])
        if expected is not None:
            rate = f["rate_per_step"] or 0.0
            exponential = f["better_fit"] == "exponential" or bool(f["T_beyond_cap"])
            beyond = min(f["T_beyond_cap"]) if f["T_beyond_cap"] else "-"
            close = abs(rate - expected) <= 0.25 * expected
            out.append(
                f"{label}: "
                + ("exponential at the predicted rate" if exponential and close else "claim NOT reproduced")
                + f" - rate {_plot.fmt(rate)}/step vs {_plot.fmt(expected)} = {what}; {f['points']} points; "
                f"better fit {f['better_fit']}; beyond the cap from T={beyond}; {fit_text}"
            )
        elif f["T_beyond_cap"]:
            out.append(
                f"{label}: exceeded the cap at T={min(f['T_beyond_cap'])}: claim NOT reproduced; {fit_text}"
            )
        else:
            Ns = [n for _, n in found]
            flat = (power is None or power["r2"] < 0.5) and (expo is None or expo["r2"] < 0.5)
            tail = "; N nearly flat: neither fit is meaningful" if flat else f"; better {f['better_fit']}"
            out.append(
                f"{label}: polynomial (or slower) as claimed - N in [{min(Ns)}, {max(Ns)}] for T in "
                f"[{found[0][0]}, {found[-1][0]}]; {fit_text}{tail}"
            )
        if f["setting"].startswith("V* noise const"):
            gauge = max(r["gauge_eps"] for r in mine)
            out.append(
                f"{label}: the paper's exponential lower bound for constant eps is a worst case (the hard "
                "twist); V* perturbed by bounded noise stays within exp(+-noise) of V* at every level, so "
                f"its errors do not compound (max gauge eps here {_plot.fmt(gauge)}) and guidance stays cheap"
            )
    return out


def plot(parts: dict[str, Any], path: Path) -> None:
    """Top row: log-log axes (power laws are lines); bottom row: log N against T (exponentials are lines)."""
    plt = _plot.pyplot()
    fig, axes = plt.subplots(2, len(parts), figsize=(5.0 * len(parts), 9.0), squeeze=False)
    markers = {"hit": "o-", "tv": "s--"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for column, (part, data) in enumerate(parts.items()):
        settings = list(dict.fromkeys(r["setting"] for r in data["rows"]))
        for row, log_x in ((0, True), (1, False)):
            ax = axes[row][column]
            for i, setting in enumerate(settings):
                mine = [r for r in data["rows"] if r["setting"] == setting]
                for crit in ("hit", "tv"):
                    pts = [(r["T"], r[crit]) for r in mine if r.get(crit)]
                    if pts:
                        ax.plot(
                            *zip(*pts),
                            markers[crit],
                            color=colors[i],
                            alpha=1.0 if crit == "hit" else 0.6,
                            label=f"{setting} [{crit}]",
                        )
                over = [r["T"] for r in mine if not r.get("hit")]
                if over:
                    ax.plot(over, [data["cap"] * 1.5 * 1.25**i] * len(over), "^", color=colors[i], mfc="none")
            ref = sorted({r["T"]: r["analytic_unguided_hit_N"] for r in data["rows"]}.items())
            ref = [(T, n) for T, n in ref if n <= 4 * data["cap"]]
            ax.plot(*zip(*ref), "k:", lw=1, label="analytic N, i.i.d. draws from p (hit)")
            ax.axhline(data["cap"], color="grey", lw=0.8, ls=":")
            if log_x:
                ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_xlabel("horizon T" + (" (log scale)" if log_x else ""))
            ax.set_ylabel(f"smallest N (cap {data['cap']}; triangles: beyond the cap)")
            ax.set_title(part + (" - log-log" if log_x else " - log N vs T"), fontsize=10)
            ax.legend(fontsize=6.5)
    _plot.save_figure(fig, path)
    plt.close(fig)


def main() -> None:
    args = _plot.parse_args(__doc__.splitlines()[0], default_seed=20240602)
    config = QUICK if args.quick else FULL
    began = time.perf_counter()
    print("Part A: needle, V=2")
    needle = run_part("A: needle V=2", config.needle_T, needle_case, config.cap, config, args.seed)
    parts = {needle["rows"][0]["part"]: needle}
    for a in HARD_A:
        label = f"B: hard instance B={a} a={a}"
        print(f"Part {label} (tiltsmc.tasks.hard_instance, T=3m)")
        parts[label] = run_part(
            label, [3 * m for m in config.hard_m], hard_case(a, None, ("V*", "hard", "unguided")),
            config.hard_cap, config, args.seed,
        )  # fmt: skip
    B, a = DECOUPLED
    label = f"C: decoupled B={B} a={a:g}"
    print(f"Part {label} (the construction used before issue 17)")
    parts[label] = run_part(
        label, [3 * m for m in config.hard_m], hard_case(a, B, ("hard",)), config.hard_cap, config, args.seed
    )
    rows = [row for data in parts.values() for row in data["rows"]]
    fitted = fits(rows)
    print()
    text = ""
    for part, data in parts.items():
        table_rows = []
        for r in data["rows"]:
            cap = f">{data['cap']}" + (" (skip)" if r["skipped"] else "")
            table_rows.append(
                [
                    r["setting"],
                    r["T"],
                    r["eps"],
                    r["gauge_eps"],
                    r["hit"] or cap,
                    r["tv"] or cap,
                    r["analytic_unguided_hit_N"],
                    r.get("particle_steps"),
                    r.get("seconds"),
                ]
            )
        text += (
            _plot.table(
                [
                    "setting",
                    "T",
                    "eps",
                    "gauge eps",
                    "N hit>=0.9",
                    "N TV<=0.1",
                    "N iid-p hit",
                    "part.-steps",
                    "s",
                ],
                table_rows,
                title=f"{part}: smallest N (eps: exact Bellman error of the twist; 'N iid-p hit': analytic "
                "N for unguided i.i.d. draws)",
            )
            + "\n"
        )
    fit_rows = [
        [
            f["part"].split(":")[0]
            + (" " + f["part"].split(":")[1].split(" ", 3)[-1] if part_parameters(f["part"]) else ""),
            f["setting"],
            f["criterion"],
            f["points"],
            f["degree"],
            f["power_fit"]["r2"] if f["power_fit"] else None,
            f["rate_per_step"],
            f["exponential_fit"]["r2"] if f["exponential_fit"] else None,
            f["better_fit"],
            ",".join(map(str, f["T_beyond_cap"])) or "-",
        ]
        for f in fitted.values()
    ]
    text += _plot.table(
        [
            "part",
            "setting",
            "crit",
            "pts",
            "degree (logN~logT)",
            "R^2",
            "rate (logN~T)",
            "R^2",
            "better",
            "T beyond cap",
        ],
        fit_rows,
        title="Fits of the smallest N against T",
    )
    claims = verdicts(fitted, rows)
    claims.append(
        "A: on a needle every run's max-TV is 0 (all positive weight on the needle) or 1 (collapsed), so "
        "'mean TV <= 0.1' is the event 'hit rate >= 0.9': the two criteria coincide there by construction; "
        "on the hard instance (r > 0 everywhere) the TV criterion is informative"
    )
    claims.append(
        f"hit rates are estimated from <= {config.max_replicates} runs ({config.max_replicates_large} from "
        f"N >= {config.large_N}), so single entries can pass or fail by sampling noise (s.e. ~0.02-0.03)"
    )
    print("\n".join(claims))
    record = _plot.header(NAME, args)
    record.update(
        {
            "parameters": {
                "config": dict(config.__dict__),
                "hit_level": HIT_LEVEL,
                "tv_level": TV_LEVEL,
                "min_replicates": MIN_REPLICATES,
                "min_replicates_to_pass": MIN_PASS_REPLICATES,
                "early_stop_z": Z99,
                "particle_budget_per_call": PARTICLE_BUDGET,
                "c_noise": C_NOISE,
                "const_noise": CONST_NOISE,
                "hard_a": list(HARD_A),
                "decoupled_B_a": list(DECOUPLED),
                "smc": {"resample": "systematic", "ess_threshold": 0.5, "proposal": "naive"},
            },
            "rows": rows,
            "fits": fitted,
            "verdicts": claims,
            "printed_tables": text,
            "total_particle_steps": int(sum(r.get("particle_steps") or 0 for r in rows)),
            "seconds": time.perf_counter() - began,
        }
    )
    _plot.write_json(args.out / f"{NAME}.json", record)
    plot(parts, args.out / f"{NAME}.png")
    print(f"total {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
