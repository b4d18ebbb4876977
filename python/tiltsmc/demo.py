r"""``tiltsmc demo``: guided SMC against best-of-N on the bundled arithmetic-chain task.

For problems with ``T`` steps ([`tiltsmc.tasks.arithmetic`][tiltsmc.tasks.arithmetic]), the bundled policy
solves a problem with probability ``Z = E_p[r]``, which falls geometrically with ``T``. Every sampler gets the
same budget of ``C`` policy steps per reasoning step (``C T`` per problem):

* best-of-N with ``N = C``: ``N`` independent solutions; it picks the highest reward, and at the end the
  reward is the exact verifier, so it succeeds when one of its ``N`` draws is right (``1 - (1 - Z)^N``);
* SMC with ``N = C`` particles, potentials ``G_t = Vh_t / Vh_{t-1}`` from the learned process reward
  model, systematic resampling when the ESS falls below ``N / 2``;
* SP-gSMC with a resampling pool of ``K = C``;
* SP-gSMC + MH: ``H = 3`` Metropolis-Hastings proposals, each an SP-gSMC run with ``K = C / 4``.

Accuracy is the probability that the sampler's output is a right solution: for SMC the weighted share of
right particles (the chance that a draw from its output is right), for the others whether their one
sample is right; 0 where a run collapsed. The same is measured for SMC and SP-gSMC guided by a
deliberately degraded reward model (``NoisyReward``), and the Bellman error of both reward models is
estimated from rollouts ([`tiltsmc.diagnostics.bellman_error`][tiltsmc.diagnostics.bellman_error]). The
paper's claim: when the reward model's Bellman error is small, guided SMC needs compute polynomial in ``T``
where best-of-N needs ``~1/Z``, exponential in ``T`` — so the gain of SMC over best-of-N grows with ``T``.

``demo.json`` is strict JSON: numbers stay numbers, and a value that is not finite is ``null`` (``-inf``
in log-quantities such as ``log_z``, ``+inf`` in bounds and standard errors, NaN where undefined), as in
``tiltsmc run``'s output. The files get the usual mode of a new file (``0666`` less the umask).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import stat
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import NormalDist
from typing import Any, Callable, Optional, Union

import numpy as np
import numpy.typing as npt

from ._files import create_beside, signals_deferred
from .diagnostics import bellman_error
from .models._config import _is_int
from .models._ort import MAX_THREADS
from .models.particles import Particles
from .models.protocols import RewardModel
from .samplers import SamplerResult, best_of_n, mh, smc, sp_gsmc
from .samplers.result import finite_or_none
from .tasks import arithmetic

logger = logging.getLogger("tiltsmc.demo")

__all__ = [
    "ARITHMETIC",
    "SAMPLERS",
    "DemoConfig",
    "DemoTask",
    "NoisyReward",
    "accuracy",
    "render_table",
    "run_demo",
    "run_sampler",
    "write_outputs",
]

SAMPLERS = ("best-of-n", "smc", "sp-gsmc", "sp-gsmc+mh")
# the files write_outputs writes in its folder (demo.png where matplotlib is installed)
OUTPUT_FILES = ("demo.json", "demo.txt", "demo.png")
# ONNX Runtime's and the core's threads when none are asked for. The models are tiny (a step is a few
# milliseconds of small matrix products), so a second thread mostly waits at each operator's barrier,
# and on a core shared with other work it waits for a descheduled thread: one thread was faster.
DEFAULT_THREADS = 1
DEGRADED_SAMPLERS = ("smc", "sp-gsmc")
MH_STEPS = 3
# The degraded model's noise sd at most. NoisyReward's z(x) lies in [-9.16, 8.21] (the normal quantiles of
# its hash's smallest and largest uniform), so a ratio exp(noise * (z_t - z_{t-1})) of two of its values,
# which the Bellman estimate takes, is at most exp(17.37 noise): at 32, exp(556), leaving a factor exp(154)
# for the learned model's own ratio below the largest double, exp(709.78). Larger sds overflowed there
# (numpy's RuntimeWarnings, from about 300) and, further on, rounded the learned log-values away (the
# degraded SMC's accuracy was off by 1e-3 at 1e15, above 1 at 1e300).
MAX_NOISE = 32.0
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs: ``problems`` per difficulty in ``levels`` (``T``), each sampler at every
    ``budgets`` value ``C`` (policy steps per reasoning step), the degraded model's ``noise`` (sd of its
    log-value perturbation) and the Bellman-error estimate's ``bellman_prompts`` x ``bellman_prefixes``
    rollouts with ``bellman_samples`` continuations each (the first ``bellman_prompts`` problems of a
    level, all of them where there are fewer: ``run_demo`` records the number used); ``threads``: ONNX
    Runtime's intra-op threads (None: ``DEFAULT_THREADS``, one)."""

    levels: tuple[int, ...] = (4, 8, 12, 16)
    budgets: tuple[int, ...] = (2, 4, 8)
    problems: int = 24
    seed: int = 0
    noise: float = 2.0
    bellman_prompts: int = 4
    bellman_prefixes: int = 8
    bellman_samples: int = 8
    threads: Optional[int] = None

    def validate(self) -> None:
        """Raise ValueError naming the option and the problem: ``levels`` (1..16 steps) and ``budgets``
        (1..4096) non-empty sequences of distinct ints, ``problems`` an int in 1..100000, ``seed`` an
        int >= 0, the ``bellman_*`` counts ints >= 1, ``threads`` None or an int in 1..1024 and ``noise`` a
        finite number in [0, 32]. An int may be a numpy integer, not a bool (nor a float, even a whole
        one)."""
        for name, high in (("levels", arithmetic.MAX_STEPS), ("budgets", 4096)):
            values = getattr(self, name)
            wanted = f"{name}: expected a non-empty sequence of ints in 1..{high}"
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
                raise ValueError(f"{wanted}, got {values!r}")
            for value in values:
                if not _is_int(value) or not 1 <= value <= high:
                    raise ValueError(f"{wanted}, got {value!r} in {values!r}")
            # each would be run (and tabled) once more
            twice = sorted({value for value in values if values.count(value) > 1})
            if twice:
                raise ValueError(f"{name}: expected distinct values, got {values} ({twice[0]} twice)")
        _check_int("problems", self.problems, 1, arithmetic.MAX_PROBLEMS)
        _check_int("seed", self.seed, 0)
        if (
            isinstance(self.noise, (bool, np.bool_))
            or not isinstance(self.noise, (int, float, np.integer, np.floating))
            or not 0 <= self.noise <= MAX_NOISE  # NaN fails the comparison, an int past the doubles too
        ):
            raise ValueError(f"noise: expected a finite sd in [0, {MAX_NOISE:g}], got {self.noise!r}")
        for name in ("bellman_prompts", "bellman_prefixes", "bellman_samples"):
            _check_int(name, getattr(self, name), 1)
        if self.threads is not None:
            _check_int("threads", self.threads, 1, MAX_THREADS)


def _plain(config: DemoConfig) -> DemoConfig:
    """A valid ``config`` with Python numbers for numpy ones: they go to the record, and demo.json's
    encoder takes no numpy integer (nor a float32)."""
    return replace(
        config,
        levels=tuple(int(t) for t in config.levels),
        budgets=tuple(int(c) for c in config.budgets),
        problems=int(config.problems),
        seed=int(config.seed),
        noise=float(config.noise),
        bellman_prompts=int(config.bellman_prompts),
        bellman_prefixes=int(config.bellman_prefixes),
        bellman_samples=int(config.bellman_samples),
        threads=None if config.threads is None else int(config.threads),
    )


def _check_int(name: str, value: Any, low: int, high: Optional[int] = None) -> None:
    """ValueError naming ``name`` unless ``value`` is an int (not a bool) in ``low..high``."""
    if not _is_int(value) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name}: expected an int {bounds}, got {value!r}")


@dataclass(frozen=True)
class DemoTask:
    """The problems the comparison runs on: ``make_problems(T, count, rng)``, each problem's ``prompt``,
    and the exact ``verify(problem, text) -> r`` that judges the outputs (and ends the reward models'
    runs, where they take it). ``ARITHMETIC`` is the bundled task; ``bench/real_model.py`` runs the same
    comparison with a chat model's task."""

    name: str
    make_problems: Callable[[int, int, Any], list[Any]]
    prompt: Callable[[Any], Any]
    verify: Callable[[Any, str], float]


ARITHMETIC = DemoTask(
    "arithmetic",
    lambda level, count, rng: arithmetic.make_problems(level, count, rng=rng),
    lambda problem: problem.prompt,
    arithmetic.verify,
)


class NoisyReward:
    r"""A deliberately degraded reward model: ``log Vh'(x) = log Vh(x) + noise * z(x)`` before the end.

    ``z(x)`` is a standard normal that is a fixed function of the prefix's tokens (a keyed hash), so
    ``Vh'`` is a genuine, deterministic reward model, only a worse one; finished trajectories keep the
    exact terminal reward ``r``, so every sampler still targets the same ``pi``. Noise multiplies the
    Bellman error: ``E_p[Vh'_t] / Vh'_{t-1}`` picks up a factor ``exp(noise * (z_t - z_{t-1}))``.
    """

    def __init__(self, reward: RewardModel, noise: float, seed: int = 0) -> None:
        self.reward = reward
        self.noise = float(noise)
        self.key = hashlib.blake2b(str(seed).encode(), digest_size=16).digest()
        self._normal = NormalDist()

    def check_policy(self, policy: Any) -> None:
        check = getattr(self.reward, "check_policy", None)
        if callable(check):
            check(policy)

    def _z(self, tokens: npt.NDArray[np.int64]) -> float:
        digest = hashlib.blake2b(np.ascontiguousarray(tokens, dtype=np.int64).tobytes(), key=self.key)
        uniform = (int.from_bytes(digest.digest()[:8], "little") + 0.5) / 2.0**64
        # the top 2^10 of the 2^64 draws round to 1.0, which inv_cdf refuses: the largest double below 1
        return self._normal.inv_cdf(min(uniform, 1.0 - 2.0**-53))

    def initial_log_value(self, particles: Particles) -> FloatArray:
        values = np.asarray(self.reward.initial_log_value(particles), dtype=np.float64).copy()
        if particles.prompt_tokens is not None:
            for b in range(particles.num_prompts):
                values[b] += self.noise * self._z(particles.prompt_tokens[b])
        return values

    def log_value(self, particles: Particles) -> FloatArray:
        values = np.asarray(self.reward.log_value(particles), dtype=np.float64).copy()
        for b, i in np.argwhere(~particles.finished & (values > -np.inf)):
            prefix = particles.tokens[b, i, : particles.lengths[b, i]]
            if particles.prompt_tokens is not None:
                prefix = np.concatenate([particles.prompt_tokens[b], prefix])
            values[b, i] += self.noise * self._z(prefix)
        return values


def accuracy(
    result: SamplerResult,
    problems: Sequence[Any],
    verify: Callable[[Any, str], float] = arithmetic.verify,
) -> FloatArray:
    """Per problem: the probability that a draw from the sampler's output is a right solution
    (``verify(problem, text)``: 1 right, 0 wrong; the bundled task's verifier by default)."""
    texts = result.texts
    if texts is None:
        raise ValueError("result: the policy has no tokenizer, so solutions cannot be checked")
    scores = np.zeros(len(problems))
    for b, problem in enumerate(problems):
        if result.collapsed[b] or b in result.errors:
            continue
        right = np.array([verify(problem, text) for text in texts[b]])
        scores[b] = float(np.sum(result.weights(b) * right))
    return scores


def run_sampler(
    name: str, policy: Any, reward: Any, prompts: Sequence[Any], budget: int, rng: np.random.Generator
) -> Optional[SamplerResult]:
    """Run sampler ``name`` (one of ``SAMPLERS``) at a budget of ``budget`` policy steps per reasoning step
    (see the module docstring); None where the budget cannot be met (MH needs ``budget >= MH_STEPS + 1``)."""
    if name == "best-of-n":
        return best_of_n(policy, reward, prompts, n=budget, rng=rng)
    if name == "smc":
        return smc(policy, reward, prompts, num_particles=budget, ess_threshold=0.5, rng=rng)
    if name == "sp-gsmc":
        return sp_gsmc(policy, reward, prompts, pool_size=budget, rng=rng)
    if name != "sp-gsmc+mh":
        raise ValueError(f"name: expected one of {', '.join(SAMPLERS)}, got {name!r}")
    pool = budget // (MH_STEPS + 1)
    if pool < 1:
        return None  # MH with H proposals needs C >= H + 1 for equal compute
    return mh(policy, reward, prompts, pool_size=pool, steps=MH_STEPS, rng=rng)


def _release_memory(*models: Any) -> None:
    """Give the models' ONNX Runtime arenas back after a run (each keeps its buffers at the largest batch
    it has seen; the next run, of another shape, would otherwise grow the process further)."""
    for model in models:
        release = getattr(model, "release_memory", None)
        if callable(release):
            release()


def run_demo(
    config: DemoConfig,
    models: Union[tuple[Any, Any], Callable[[int], tuple[Any, Any]], None] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    task: DemoTask = ARITHMETIC,
) -> dict[str, Any]:
    """Run every sampler on every level and budget, and the Bellman-error estimates; returns the record
    that ``write_outputs`` saves (plain JSON types): its ``config`` is ``config``'s fields, with
    ``bellman_prompts`` the number of problems the Bellman estimates used (at most ``problems``).
    ``models``: the policy and reward model, or a function of ``T`` giving them (e.g. a policy whose length
    limit fits ``T`` lines); the bundled ones by default. ``task``: the problems (the bundled arithmetic
    chains by default)."""
    config.validate()
    config = _plain(config)
    began = time.perf_counter()
    threads = DEFAULT_THREADS if config.threads is None else config.threads
    if models is None:
        models = arithmetic.load_models(intra_op_num_threads=threads)
    models_for = models if callable(models) else (lambda level, pair=models: pair)
    runs_per_level = len(config.budgets) * (len(SAMPLERS) + len(DEGRADED_SAMPLERS)) + 2
    total, done = runs_per_level * len(config.levels), 0

    def advance() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    rows: list[dict[str, Any]] = []
    bellman: dict[str, Any] = {}
    bellman_used = 0  # problems of a level in the Bellman estimates (fewer than asked where it has fewer)
    base_rates: dict[str, Any] = {}
    for level in config.levels:
        policy, reward = models_for(level)
        degraded = NoisyReward(reward, config.noise, seed=config.seed)
        problems = task.make_problems(level, config.problems, [config.seed, level])
        prompts = [task.prompt(problem) for problem in problems]
        z_estimates = []
        for budget in config.budgets:
            for guide, names in (("learned", SAMPLERS), ("degraded", DEGRADED_SAMPLERS)):
                for name in names:
                    rng = np.random.default_rng(
                        [config.seed, level, budget, SAMPLERS.index(name), len(guide)]
                    )
                    result = run_sampler(
                        name, policy, reward if guide == "learned" else degraded, prompts, budget, rng
                    )
                    _release_memory(policy, reward)
                    advance()
                    if result is None:
                        continue
                    scores = accuracy(result, problems, task.verify)
                    if name == "best-of-n":
                        z_estimates.append(np.exp(result.log_z))
                    rows.append(
                        {
                            "steps": level,
                            "budget": budget,
                            "sampler": name,
                            "reward_model": guide,
                            "accuracy": float(scores.mean()),
                            "standard_error": float(scores.std(ddof=1) / np.sqrt(len(scores)))
                            if len(scores) > 1
                            else None,
                            "policy_steps_per_problem": result.compute.policy_steps / len(problems),
                            "policy_tokens_per_problem": result.compute.policy_tokens / len(problems),
                            "seconds": result.compute.total_seconds,
                            # the time split: the models' calls (with their glue) and tiltsmc's own
                            "policy_seconds": result.compute.policy_seconds,
                            "reward_seconds": result.compute.reward_seconds,
                            "tiltsmc_seconds": result.compute.bookkeeping_seconds,
                            "acceptance_rate": None
                            if result.acceptance_rate is None
                            else float(np.nanmean(result.acceptance_rate)),
                        }
                    )
        # One policy sample's chance of a right solution: the best-of-N runs' unbiased estimates of Z.
        z = np.mean(np.concatenate(z_estimates)) if z_estimates else float("nan")
        base_rates[str(level)] = float(z)
        bellman[str(level)] = {}
        bellman_prompts = prompts[: config.bellman_prompts]
        bellman_used = max(bellman_used, len(bellman_prompts))
        for guide, model in (("learned", reward), ("degraded", degraded)):
            estimate = bellman_error(
                policy,
                model,
                bellman_prompts,
                num_prefixes=config.bellman_prefixes,
                samples_per_prefix=config.bellman_samples,
                rng=np.random.default_rng([config.seed, level, 99, len(guide)]),
                method="sampled",
            )
            bellman[str(level)][guide] = estimate.to_dict()  # non-finite values: null in demo.json
            _release_memory(policy, reward)
            advance()
    return {
        "task": task.name,
        "config": {**asdict(config), "bellman_prompts": bellman_used},
        "machine": _machine(),
        "seconds": time.perf_counter() - began,
        "single_sample_accuracy": base_rates,
        "results": rows,
        "bellman_error": bellman,
    }


def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from . import __version__
    from .models._ort import import_onnxruntime

    onnxruntime = import_onnxruntime()

    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": onnxruntime.__version__,
        "tiltsmc": __version__,
    }


def _lookup(record: dict[str, Any], level: int, budget: int, sampler: str, guide: str) -> Optional[float]:
    for row in record["results"]:
        if (row["steps"], row["budget"], row["sampler"], row["reward_model"]) == (
            level,
            budget,
            sampler,
            guide,
        ):
            return float(row["accuracy"])
    return None


def render_table(record: dict[str, Any]) -> str:
    """The accuracy table (one block per T) and the Bellman errors, as plain text."""
    config = record["config"]
    lines = [
        f"Accuracy on {config['problems']} problems per T (share of right solutions returned); C = policy "
        "steps per reasoning step, the same for every sampler.",
        "",
    ]
    header = f"{'T':>3} {'C':>4} {'steps':>6} | {'best-of-N':>9} {'SMC':>6} {'SP-gSMC':>8} {'+MH':>6} |"
    header += f" {'SMC*':>6} {'SP-gSMC*':>8}"
    lines += [header, "-" * len(header)]
    for level in config["levels"]:
        for budget in config["budgets"]:
            cells = []
            for name in SAMPLERS:
                value = _lookup(record, level, budget, name, "learned")
                cells.append("-" if value is None else f"{value:.2f}")
            for name in DEGRADED_SAMPLERS:
                value = _lookup(record, level, budget, name, "degraded")
                cells.append("-" if value is None else f"{value:.2f}")
            lines.append(
                f"{level:>3} {budget:>4} {level * budget:>6} | {cells[0]:>9} {cells[1]:>6} {cells[2]:>8} "
                f"{cells[3]:>6} | {cells[4]:>6} {cells[5]:>8}"
            )
        z = record["single_sample_accuracy"][str(level)]
        lines.append(f"{'':>3} one policy sample is right with probability {z:.3f} (best-of-N's estimate)")
    lines += [
        "* guided by the degraded reward model (log-values + noise, sd "
        f"{config['noise']:g}); +MH = SP-gSMC with {MH_STEPS} Metropolis-Hastings proposals, pool C/4.",
        "",
        "Bellman error of the reward models (sampled: "
        f"{config['bellman_prompts']} problems x {config['bellman_prefixes']} rollouts x "
        f"{config['bellman_samples']} continuations per step):",
        f"{'T':>3} | {'learned: mean':>13} {'max step':>9} {'sup':>8} | {'degraded: mean':>14} "
        f"{'max step':>9} {'sup':>8}",
    ]
    for level in config["levels"]:
        cells = []
        for guide in ("learned", "degraded"):
            estimate = record["bellman_error"][str(level)][guide]
            average = np.asarray(estimate["average_per_step"], dtype=float)
            cells += [f"{average.mean():.3f}", f"{average.max():.3f}", _number(estimate["eps"])]
        lines.append(
            f"{level:>3} | {cells[0]:>13} {cells[1]:>9} {cells[2]:>8} | {cells[3]:>14} {cells[4]:>9} "
            f"{cells[5]:>8}"
        )
    lines.append(
        "mean / max step: Vh-weighted mean of |E_p[Vh_t] / Vh_{t-1} - 1| per problem, then over problems"
    )
    lines.append("(averaged over steps / worst step);")
    lines.append(
        "sup: the worst visited prefix (inf where a prefix the model still rates > 0 cannot be completed)."
    )
    return "\n".join(lines)


def _number(value: Any) -> str:
    if value is None:  # strict JSON's null: +inf in a BellmanEstimate's dict
        return "inf"
    return value if isinstance(value, str) else f"{float(value):.3g}"


# Each curve's look: label, colour, line style, marker. The degraded model's curves share their sampler's
# colour and marker with a dashed line; points are offset a little along x so that equal accuracies at one
# budget stay visible side by side.
PLOT_STYLES: dict[tuple[str, str], tuple[str, str, str, str]] = {
    ("best-of-n", "learned"): ("best-of-N", "black", "-", "s"),
    ("smc", "learned"): ("SMC", "tab:blue", "-", "o"),
    ("sp-gsmc", "learned"): ("SP-gSMC", "tab:orange", "-", "^"),
    ("sp-gsmc+mh", "learned"): ("SP-gSMC + MH", "tab:green", "-", "D"),
    ("smc", "degraded"): ("SMC, degraded PRM", "tab:blue", "--", "o"),
    ("sp-gsmc", "degraded"): ("SP-gSMC, degraded PRM", "tab:orange", "--", "^"),
}


def plot(record: dict[str, Any], path: Path) -> None:
    """Accuracy against policy steps per problem, one panel per T, one curve per sampler, with error bars
    of one standard error (the spread of the per-problem scores over the problems, each cell's own); and
    the reward models' Bellman error against T. Two rows deep, so that it stays legible at screen width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    config = record["config"]
    levels = list(config["levels"])
    panels = len(levels) + 1
    columns = min(3, panels)
    rows = -(-panels // columns)
    with plt.rc_context({"font.size": 11, "axes.titlesize": 12, "legend.fontsize": 10}):
        figure, grid = plt.subplots(rows, columns, figsize=(4.3 * columns, 3.7 * rows + 0.6), squeeze=False)
        axes = list(grid.flat)
        offsets = np.linspace(-0.06, 0.06, len(PLOT_STYLES))  # in log2 units of the x axis
        for axis, level in zip(axes, levels):
            ticks: set[float] = set()
            for offset, ((name, guide), (label, color, line, marker)) in zip(offsets, PLOT_STYLES.items()):
                points = sorted(
                    (level * row["budget"], row["accuracy"], row.get("standard_error") or 0.0)
                    for row in record["results"]
                    if row["steps"] == level and row["sampler"] == name and row["reward_model"] == guide
                )
                if not points:
                    continue
                x, y, error = (np.asarray(v, dtype=float) for v in zip(*points))
                ticks.update(x.tolist())
                axis.errorbar(
                    x * 2.0**offset, y, yerr=error, linestyle=line, color=color, marker=marker,
                    markersize=5, capsize=2.5, linewidth=1.4, elinewidth=1.0, label=label,
                )  # fmt: skip
            z = record["single_sample_accuracy"][str(level)]
            axis.set_title(f"T = {level} steps (one sample right: {z:.2f})")
            axis.set_xscale("log", base=2)
            axis.xaxis.set_major_locator(FixedLocator(sorted(ticks)))
            axis.xaxis.set_minor_locator(NullLocator())
            axis.set_xticklabels([f"{tick:g}" for tick in sorted(ticks)])
            axis.set_ylim(-0.05, 1.05)
            axis.set_xlabel("policy steps per problem (C T)")
            axis.set_ylabel("accuracy")
            axis.grid(alpha=0.3)
        axis = axes[len(levels)]
        for guide, color, marker in (("learned", "tab:blue", "o"), ("degraded", "tab:red", "s")):
            means = [
                np.mean(np.asarray(record["bellman_error"][str(level)][guide]["average_per_step"], float))
                for level in levels
            ]
            axis.plot(levels, means, marker=marker, color=color, label=f"{guide} reward model")
        axis.set_xlabel("T (reasoning steps)")
        axis.set_xticks(levels)
        axis.set_ylabel("mean Bellman error per step")
        axis.set_yscale("log")
        axis.yaxis.set_major_locator(FixedLocator([0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]))
        axis.yaxis.set_major_formatter(ScalarFormatter())
        axis.yaxis.set_minor_locator(NullLocator())
        axis.set_title("Bellman error (Vh-weighted mean)")
        axis.grid(alpha=0.3)
        axis.legend(loc="best")
        for axis in axes[panels:]:
            axis.axis("off")
        handles, labels = axes[0].get_legend_handles_labels()
        figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), frameon=False)
        task = record.get("task", ARITHMETIC.name)
        figure.suptitle(
            f"{'tiltsmc demo' if task == ARITHMETIC.name else task}: guided SMC vs best-of-N at equal policy "
            f"compute, {config['problems']} problems per T, error bars +-1 s.e. ({record['machine']['cpu']})"
        )
        figure.tight_layout(rect=(0, 0.06, 1, 1))
        figure.savefig(path, dpi=100)
        plt.close(figure)


def check_output_folder(out: Path) -> None:
    """Create ``out`` if needed and make sure a file can be written there, and that none of ``OUTPUT_FILES``
    there is a folder: the results could not be renamed over it, and after the run the files before it
    would have been replaced, the others not (raise ValueError if so). Anything else there, a symbolic link
    included (whatever it names), is replaced by the rename."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".tiltsmc-write-test-"):
            pass
    except OSError as error:
        raise ValueError(f"out: cannot write to {out}: {error.strerror or error}") from None
    for name in OUTPUT_FILES:
        path = out / name
        try:
            info = path.lstat()  # the entry itself: rename replaces a link, not what it names
        except FileNotFoundError:
            continue
        except OSError as error:
            raise ValueError(f"out: cannot replace {path}: {error.strerror or error}") from None
        if stat.S_ISDIR(info.st_mode):
            raise ValueError(f"out: {path} is a folder, which the demo's results cannot replace")


def write_outputs(record: dict[str, Any], out: Path, written: Optional[list[Path]] = None) -> list[Path]:
    """``demo.json``, ``demo.txt`` (the table) and ``demo.png`` (when matplotlib is installed) in ``out``,
    each written to a temporary file first, then all renamed with signals held back: an interruption leaves
    no half-written file, and the files all old or all new (a rename that fails, over a folder made since
    ``check_output_folder``, leaves those before it replaced). Returns their paths, also appended to
    ``written`` (where given) each as it is in place, for a caller that a signal stops right after. An
    OSError names the file it could not write (``filename``; the folder for a folder's error)."""
    out.mkdir(parents=True, exist_ok=True)
    contents: dict[str, Callable[[Path], object]] = {
        "demo.json": lambda p: p.write_text(
            json.dumps(finite_or_none(record), indent=1, allow_nan=False) + "\n", encoding="utf-8"
        ),
        "demo.txt": lambda p: p.write_text(render_table(record) + "\n", encoding="utf-8"),
    }
    try:
        import matplotlib  # noqa: F401

        contents["demo.png"] = lambda p: plot(record, p)
    except ImportError:
        logger.warning("demo: matplotlib is not installed, so no plot (pip install 'tiltsmc[demo]')")
    staged: list[tuple[Path, Path]] = []
    final = out
    try:
        for name, write in contents.items():
            final = out / name
            # 0666 less the umask, as a new file; the suffix tells matplotlib the format
            with signals_deferred():  # no signal between creating the file and recording its name
                descriptor, temporary = create_beside(final, suffix=Path(name).suffix)
                staged.append((temporary, final))
                os.close(descriptor)
            write(temporary)
        with signals_deferred():
            for staged_file, final in staged:
                os.replace(staged_file, final)
                if written is not None:
                    written.append(final)
    except OSError as error:
        raise OSError(error.errno, error.strerror or str(error), str(final)) from error
    finally:
        for staged_file, _ in staged:
            if staged_file.exists():
                staged_file.unlink()
    return [final for _, final in staged]
