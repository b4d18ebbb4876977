r"""``tiltsmc demo``: guided SMC against best-of-N on the bundled arithmetic-chain task.

For problems with ``T`` steps (:mod:`tiltsmc.tasks.arithmetic`), the bundled policy solves a problem with
probability ``Z = E_p[r]``, which falls geometrically with ``T``. Every sampler gets the same budget of
``C`` policy steps per reasoning step (``C T`` per problem):

* best-of-N with ``N = C``: ``N`` independent solutions; it picks the highest reward, and at the end the
  reward is the exact verifier, so it succeeds when one of its ``N`` draws is right (``1 - (1 - Z)^N``);
* SMC with ``N = C`` particles, potentials ``G_t = Vh_t / Vh_{t-1}`` from the learned process reward
  model, systematic resampling when the ESS falls below ``N / 2``;
* SP-gSMC with a resampling pool of ``K = C``;
* SP-gSMC + MH: ``H = 3`` Metropolis-Hastings proposals, each an SP-gSMC run with ``K = C / 4``.

Accuracy is the probability that the sampler's output is a right solution: for SMC the weighted share of
right particles (the chance that a draw from its output is right), for the others whether their one
sample is right; 0 where a run collapsed. The same is measured for SMC and SP-gSMC guided by a
deliberately degraded reward model (:class:`NoisyReward`), and the Bellman error of both reward models is
estimated from rollouts (:func:`tiltsmc.diagnostics.bellman_error`). The paper's claim: when the reward
model's Bellman error is small, guided SMC needs compute polynomial in ``T`` where best-of-N needs
``~1/Z``, exponential in ``T`` — so the gain of SMC over best-of-N grows with ``T``.

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
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any, Callable, Optional

import numpy as np
import numpy.typing as npt

from ._files import create_beside
from .diagnostics import bellman_error
from .models.particles import Particles
from .models.protocols import RewardModel
from .samplers import SamplerResult, best_of_n, mh, smc, sp_gsmc
from .samplers.result import finite_or_none
from .tasks import arithmetic

logger = logging.getLogger("tiltsmc.demo")

__all__ = ["DemoConfig", "NoisyReward", "render_table", "run_demo", "write_outputs"]

SAMPLERS = ("best-of-n", "smc", "sp-gsmc", "sp-gsmc+mh")
DEGRADED_SAMPLERS = ("smc", "sp-gsmc")
MH_STEPS = 3
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs: ``problems`` per difficulty in ``levels`` (``T``), each sampler at every
    ``budgets`` value ``C`` (policy steps per reasoning step), the degraded model's ``noise`` (sd of its
    log-value perturbation) and the Bellman-error estimate's ``bellman_prompts`` x ``bellman_prefixes``
    rollouts with ``bellman_samples`` continuations each."""

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
        """Raise ValueError naming the option and the problem."""
        if not self.levels or any(not 1 <= t <= arithmetic.MAX_STEPS for t in self.levels):
            raise ValueError(f"levels: expected step counts in 1..{arithmetic.MAX_STEPS}, got {self.levels}")
        if not self.budgets or any(c < 1 or c > 4096 for c in self.budgets):
            raise ValueError(f"budgets: expected budgets in 1..4096, got {self.budgets}")
        if not 1 <= self.problems <= 100_000:
            raise ValueError(f"problems: expected 1..100000, got {self.problems}")
        if not (np.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"noise: expected a finite sd >= 0, got {self.noise}")
        for name in ("bellman_prompts", "bellman_prefixes", "bellman_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads: expected an int >= 1, got {self.threads}")


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
        return self._normal.inv_cdf(uniform)

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


def accuracy(result: SamplerResult, problems: Sequence[arithmetic.Problem]) -> FloatArray:
    """Per problem: the probability that a draw from the sampler's output is a right solution."""
    texts = result.texts
    if texts is None:
        raise ValueError("result: the policy has no tokenizer, so solutions cannot be checked")
    scores = np.zeros(len(problems))
    for b, problem in enumerate(problems):
        if result.collapsed[b] or b in result.errors:
            continue
        right = np.array([arithmetic.verify(problem, text) for text in texts[b]])
        scores[b] = float(np.sum(result.weights(b) * right))
    return scores


def _run_sampler(
    name: str, policy: Any, reward: Any, prompts: list[str], budget: int, rng: np.random.Generator
) -> Optional[SamplerResult]:
    if name == "best-of-n":
        return best_of_n(policy, reward, prompts, n=budget, rng=rng)
    if name == "smc":
        return smc(policy, reward, prompts, num_particles=budget, ess_threshold=0.5, rng=rng)
    if name == "sp-gsmc":
        return sp_gsmc(policy, reward, prompts, pool_size=budget, rng=rng)
    pool = budget // (MH_STEPS + 1)
    if pool < 1:
        return None  # MH with H proposals needs C >= H + 1 for equal compute
    return mh(policy, reward, prompts, pool_size=pool, steps=MH_STEPS, rng=rng)


def run_demo(
    config: DemoConfig,
    models: Optional[tuple[Any, Any]] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> dict[str, Any]:
    """Run every sampler on every level and budget, and the Bellman-error estimates; returns the record
    that :func:`write_outputs` saves (plain JSON types)."""
    config.validate()
    began = time.perf_counter()
    if models is None:
        models = arithmetic.load_models(intra_op_num_threads=config.threads)
    policy, reward = models
    degraded = NoisyReward(reward, config.noise, seed=config.seed)
    runs_per_level = len(config.budgets) * (len(SAMPLERS) + len(DEGRADED_SAMPLERS)) + 2
    total, done = runs_per_level * len(config.levels), 0

    def advance() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    rows: list[dict[str, Any]] = []
    bellman: dict[str, Any] = {}
    base_rates: dict[str, Any] = {}
    for level in config.levels:
        problems = arithmetic.make_problems(level, config.problems, rng=[config.seed, level])
        prompts = [problem.prompt for problem in problems]
        z_estimates = []
        for budget in config.budgets:
            for guide, names in (("learned", SAMPLERS), ("degraded", DEGRADED_SAMPLERS)):
                for name in names:
                    rng = np.random.default_rng(
                        [config.seed, level, budget, SAMPLERS.index(name), len(guide)]
                    )
                    result = _run_sampler(
                        name, policy, reward if guide == "learned" else degraded, prompts, budget, rng
                    )
                    advance()
                    if result is None:
                        continue
                    scores = accuracy(result, problems)
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
            advance()
    return {
        "config": asdict(config),
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
    import onnxruntime

    from . import __version__

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
        "mean / max step: Vh-weighted mean of |E_p[Vh_t] / Vh_{t-1} - 1| (averaged over steps / worst step);"
    )
    lines.append(
        "sup: the worst visited prefix (inf where a prefix the model still rates > 0 cannot be completed)."
    )
    return "\n".join(lines)


def _number(value: Any) -> str:
    return value if isinstance(value, str) else f"{float(value):.3g}"


def plot(record: dict[str, Any], path: Path) -> None:
    """Accuracy against policy steps per problem, one panel per T, one curve per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = record["config"]
    levels = config["levels"]
    figure, axes = plt.subplots(1, len(levels) + 1, figsize=(4.2 * (len(levels) + 1), 3.8))
    styles = {
        ("best-of-n", "learned"): ("best-of-N", "k", "-"),
        ("smc", "learned"): ("SMC", "C0", "-"),
        ("sp-gsmc", "learned"): ("SP-gSMC", "C1", "-"),
        ("sp-gsmc+mh", "learned"): ("SP-gSMC + MH", "C2", "-"),
        ("smc", "degraded"): ("SMC, degraded PRM", "C0", ":"),
        ("sp-gsmc", "degraded"): ("SP-gSMC, degraded PRM", "C1", ":"),
    }
    for axis, level in zip(axes, levels):
        for (name, guide), (label, color, line) in styles.items():
            points = sorted(
                (row["policy_steps_per_problem"], row["accuracy"])
                for row in record["results"]
                if row["steps"] == level and row["sampler"] == name and row["reward_model"] == guide
            )
            if points:
                x, y = zip(*points)
                axis.plot(x, y, line, color=color, marker="o", markersize=3, label=label)
        z = record["single_sample_accuracy"][str(level)]
        axis.set_title(f"T = {level} steps (one sample right: {z:.2f})", fontsize=9)
        axis.set_xscale("log", base=2)
        axis.set_ylim(-0.02, 1.02)
        axis.set_xlabel("policy steps per problem")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7, loc="lower right")
    axis = axes[-1]
    for guide, color in (("learned", "C0"), ("degraded", "C3")):
        means = [
            np.mean(np.asarray(record["bellman_error"][str(level)][guide]["average_per_step"], dtype=float))
            for level in levels
        ]
        axis.plot(levels, means, "o-", color=color, label=f"{guide} reward model")
    axis.set_xlabel("T")
    axis.set_ylabel("mean Bellman error per step")
    axis.set_yscale("log")
    axis.set_title("Bellman error (Vh-weighted mean)", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.suptitle(
        f"tiltsmc demo: guided SMC vs best-of-N at equal policy compute ({record['machine']['cpu']})",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def check_output_folder(out: Path) -> None:
    """Create ``out`` if needed and make sure a file can be written there (raise ValueError if not)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".tiltsmc-write-test-"):
            pass
    except OSError as error:
        raise ValueError(f"out: cannot write to {out}: {error.strerror or error}") from None


def write_outputs(record: dict[str, Any], out: Path) -> list[Path]:
    """``demo.json``, ``demo.txt`` (the table) and ``demo.png`` (when matplotlib is installed) in ``out``,
    each written to a temporary file first and renamed, so an interruption leaves no half-written file."""
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
    try:
        for name, write in contents.items():
            # 0666 less the umask, as a new file; the suffix tells matplotlib the format
            descriptor, temporary = create_beside(out / name, suffix=Path(name).suffix)
            os.close(descriptor)
            staged.append((temporary, out / name))
            write(temporary)
        for staged_file, final in staged:
            os.replace(staged_file, final)
    finally:
        for staged_file, _ in staged:
            if staged_file.exists():
                staged_file.unlink()
    return [final for _, final in staged]
