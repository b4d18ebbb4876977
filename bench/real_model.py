"""A real pretrained model on a task with an exact verifier: SmolLM2-135M-Instruct on arithmetic chains.

The model is the ONNX export of ``scripts/get_smollm2.py`` (``--model``, default ``$TILTSMC_SMOLLM2``, else
``$TILTSMC_MODELS/smollm2``, else ``~/.cache/tiltsmc/smollm2``). Two measurements:

* decoding speed: a decode step (one new token for every row, KV cache of a chat prompt) at 1, 4 and 16
  rows, with ``--threads`` ONNX Runtime threads: the whole step as the samplers see it (drawing the token,
  the masks, the session call) and the session call alone, median of ``--timing-steps`` steps;
* the task (:mod:`tiltsmc.tasks.chat_arithmetic`, ``--size``, small by default): for each length ``T``
  in ``--levels``, ``--problems`` problems posed through the model's chat template, ``--samples``
  answers each drawn from the model itself (plain sampling of the base policy ``p`` at each of
  ``--temperatures``, no reward, one line per step),
  each checked line by line. Reported: the per-step error rate at step ``t`` (the hazard: wrong at ``t``
  given right before), pooled over steps, and the whole-answer error rate ``1 - E_p[r]``, each with its
  binomial standard error (answers to one problem are not independent: the standard error of the
  whole-answer rate is also given over problems, which accounts for that).

Prompts are chat messages, rendered by the policy with the model folder's chat template. JSON to
``bench/results/real_model_vm[_fp16|_int8].json``. The int8 variant's rows depend on their batch, so the
policy refuses it unless ``--check-batching off``.

With ``--value DIR`` (the policy + value graph of ``scripts/train_smollm2_value.py``) it runs the samplers'
comparison instead: ``tiltsmc demo``'s own (``tiltsmc.demo.run_demo``: best-of-N, SMC, SP-gSMC and
SP-gSMC + MH at equal policy steps per reasoning step, the same guided by a degraded copy of the value
model, and the Bellman error of both estimated from rollouts) on the counting chains asked through the
chat template, guided by the learned value head (``PolicyValue``: one session run a token gives the
next-token law and the value) with the exact verifier at the end, and judged by the verifier. Also the
time of a step split into policy, reward and tiltsmc (from each run's ``Compute``). JSON, PNG and the
table to ``bench/results/real_model_compare_vm.*``. Not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
from _machine import machine_info
from tiltsmc import demo
from tiltsmc.models import OnnxCausalLM, PolicyValue
from tiltsmc.samplers.result import finite_or_none
from tiltsmc.tasks import chat_arithmetic as task

RESULTS = Path(__file__).resolve().parent / "results"


def default_model_dir() -> Path:
    if os.environ.get("TILTSMC_SMOLLM2"):
        return Path(os.environ["TILTSMC_SMOLLM2"])
    root = os.environ.get("TILTSMC_MODELS")
    return (Path(root) if root else Path.home() / ".cache" / "tiltsmc") / "smollm2"


class SessionTimer:
    """Adds up the seconds inside ``session.run`` of a model, per call."""

    def __init__(self, model: OnnxCausalLM) -> None:
        self.calls: list[float] = []
        inner = model.session.run

        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.calls.append(time.perf_counter() - began)

        model.session.run = timed  # an instance attribute shadows the method


def measure_decoding(
    model_dir: Path, prompt: Any, rows: list[int], steps: int, threads: int, check_batching: bool = True
) -> list[dict]:
    """Median seconds of a decode step at each number of rows (one prompt, ``rows`` particles)."""
    policy = OnnxCausalLM(
        model_dir, max_new_tokens=steps + 2, intra_op_num_threads=threads, check_batching=check_batching
    )
    timer = SessionTimer(policy)
    results = []
    for count in rows:
        rng = np.random.default_rng(0)
        particles = policy.start([prompt], count)
        policy.propose(particles, rng)
        particles.flush()  # the first token's run: not a decode step of the measured kind
        step_times, session_times = [], []
        for _ in range(steps):
            timer.calls.clear()
            began = time.perf_counter()
            policy.propose(particles, rng)
            particles.flush()
            step_times.append(time.perf_counter() - began)
            session_times.append(sum(timer.calls))
            if particles.finished.all():
                break
        results.append(
            {
                "rows": count,
                "steps": len(step_times),
                "prompt_tokens": len(particles.prompt_tokens[0]) if particles.prompt_tokens else None,
                "step_ms_median": 1e3 * float(np.median(step_times)),
                "session_ms_median": 1e3 * float(np.median(session_times)),
                "step_ms_per_row": 1e3 * float(np.median(step_times)) / count,
            }
        )
        print(
            f"decode step, {count:3d} rows: {results[-1]['step_ms_median']:7.1f} ms "
            f"(session {results[-1]['session_ms_median']:.1f} ms)",
            flush=True,
        )
    del policy
    return results


def standard_error(successes: float, trials: int) -> Optional[float]:
    if trials == 0:
        return None
    rate = successes / trials
    return math.sqrt(max(rate * (1 - rate), 0.0) / trials)


def measure_task(args: argparse.Namespace, model_dir: Path, temperature: float) -> list[dict]:
    """Per-step and whole-answer error rates of plain sampling at each length in ``args.levels``."""
    records = []
    for num_steps in args.levels:
        policy = OnnxCausalLM(
            model_dir,
            max_new_tokens=args.tokens_per_step * num_steps + 8,
            step="\n",
            temperature=temperature,
            intra_op_num_threads=args.threads,
            check_batching=args.check_batching == "on",
        )
        problems = task.make_problems(num_steps, args.problems, rng=[args.seed, num_steps], size=args.size)
        prompts = [task.messages(p, args.size) for p in problems]  # chat messages: the model renders them
        rng = np.random.default_rng([args.seed, num_steps, 1])
        checks: list[list[task.Check]] = []
        examples: list[dict[str, Any]] = []
        truncated, tokens, began, policy_steps = 0, 0, time.perf_counter(), 0
        for first in range(0, len(problems), args.batch):
            batch = prompts[first : first + args.batch]
            particles = policy.start(batch, args.samples)
            while not particles.finished.all():
                policy.propose(particles, rng)
                policy_steps += 1
            for b in range(len(batch)):
                row = []
                for i in range(args.samples):
                    length = int(particles.lengths[b, i])
                    text = policy.decode(particles.tokens[b, i, :length])
                    tokens += length
                    truncated += int(length >= policy.max_new_tokens)
                    result = task.check(problems[first + b], text)
                    row.append(result)
                    if i == 0 and len(examples) < 3:
                        examples.append(
                            {
                                "problem": task.user_message(problems[first + b]),
                                "answer": text,
                                "right_steps": result.right_steps,
                                "complete": result.complete,
                            }
                        )
                checks.append(row)
        seconds = time.perf_counter() - began
        flat = [c for row in checks for c in row]
        at_risk = [sum(c.right_steps >= t - 1 for c in flat) for t in range(1, num_steps + 1)]
        errors = [sum(c.first_error == t for c in flat) for t in range(1, num_steps + 1)]
        right = sum(c.complete for c in flat)
        all_steps_right_but_end = sum(c.right_steps == num_steps and not c.complete for c in flat)
        per_problem = np.array([np.mean([c.complete for c in row]) for row in checks])
        record = {
            "T": num_steps,
            "temperature": temperature,
            "problems": len(problems),
            "samples_per_problem": args.samples,
            "answers": len(flat),
            "whole_answer_error": 1 - right / len(flat),
            "whole_answer_error_se_binomial": standard_error(right, len(flat)),
            "whole_answer_error_se_problems": float(per_problem.std(ddof=1) / math.sqrt(len(per_problem)))
            if len(per_problem) > 1
            else None,
            "per_step_error": sum(errors) / max(sum(at_risk), 1),
            "per_step_error_se": standard_error(sum(errors), sum(at_risk)),
            "hazard_by_step": [e / n if n else None for e, n in zip(errors, at_risk)],
            "at_risk_by_step": at_risk,
            "errors_by_step": errors,
            "steps_right_end_wrong": all_steps_right_but_end,
            "truncated": truncated,
            "tokens_generated": tokens,
            "policy_steps": policy_steps,
            "seconds": seconds,
            "examples": examples,
        }
        records.append(record)
        print(
            f"temperature {temperature}, T={num_steps:2d}: "
            f"whole-answer error {record['whole_answer_error']:.3f} "
            f"(se {record['whole_answer_error_se_binomial']:.3f}), "
            f"per-step error {record['per_step_error']:.3f} (se {record['per_step_error_se']:.3f}), hazards "
            f"{[None if h is None else round(h, 3) for h in record['hazard_by_step']]}, "
            f"{truncated} truncated, {seconds:.0f} s",
            flush=True,
        )
        del policy
    return records


def counting_task() -> demo.DemoTask:
    """The counting chains as ``run_demo``'s task: asked through the chat template, judged by ``verify``."""
    return demo.DemoTask(
        "chat_arithmetic (counting)",
        lambda level, count, rng: task.make_problems(level, count, rng=rng, size="counting"),
        lambda problem: task.messages(problem, "counting"),
        task.verify,
    )


def value_models(args: argparse.Namespace, level: int) -> tuple[OnnxCausalLM, PolicyValue]:
    """The policy + value folder ``--value`` as policy and reward, its length limit fitting ``level`` lines;
    the verifier ends each answer."""
    policy = OnnxCausalLM(
        args.value,
        max_new_tokens=args.tokens_per_step * level + 8,
        step="\n",
        temperature=args.temperature,
        value_output="value",
        intra_op_num_threads=args.threads,
    )
    return policy, PolicyValue(policy, kind="logit", verifier=task.verify_chat)


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """``run_demo`` on the counting chains with the learned value head (see the module docstring)."""
    config = demo.DemoConfig(
        levels=tuple(args.levels),
        budgets=tuple(args.budgets),
        problems=args.problems,
        seed=args.seed,
        noise=args.noise,
        bellman_prompts=args.bellman_prompts,
        bellman_prefixes=args.bellman_prefixes,
        bellman_samples=args.bellman_samples,
        threads=args.threads,
    )

    def progress(done: int, total: int) -> None:
        print(f"{done}/{total} runs, {time.perf_counter() - began:.0f} s", flush=True)

    began = time.perf_counter()
    record = demo.run_demo(config, lambda level: value_models(args, level), progress, task=counting_task())
    head = args.value / "value_head.json"
    record["value_model"] = (
        {k: v for k, v in json.loads(head.read_text()).items() if k != "head"} if head.is_file() else None
    )
    record["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return record


def step_split(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each sampler of the comparison at one ``T`` (the first of ``--levels``) and budget (the first of
    ``--budgets``) on ``--problems`` problems: its time split into the policy's calls, the reward's and
    tiltsmc's own (``Compute``), per policy step (one particle advanced one line)."""
    level, budget = args.levels[0], args.budgets[0]
    policy, reward = value_models(args, level)
    problems = task.make_problems(level, args.problems, rng=[args.seed, level], size="counting")
    prompts = [task.messages(p, "counting") for p in problems]
    rows = []
    for index, name in enumerate(demo.SAMPLERS):
        result = demo.run_sampler(
            name, policy, reward, prompts, budget, np.random.default_rng([args.seed, index])
        )
        assert result is not None
        compute, steps = result.compute, max(result.compute.policy_steps, 1)
        rows.append(
            {
                "sampler": name,
                "T": level,
                "budget": budget,
                "problems": len(problems),
                "policy_steps": compute.policy_steps,
                "policy_tokens": compute.policy_tokens,
                "policy_calls": compute.policy_calls,
                "seconds": compute.total_seconds,
                "policy_ms_per_step": 1e3 * compute.policy_seconds / steps,
                "reward_ms_per_step": 1e3 * compute.reward_seconds / steps,
                "tiltsmc_ms_per_step": 1e3 * compute.bookkeeping_seconds / steps,
                "tiltsmc_share": compute.bookkeeping_seconds / compute.total_seconds,
                "accuracy": float(demo.accuracy(result, problems, task.verify).mean()),
            }
        )
        row = rows[-1]
        print(
            f"{name}: {compute.policy_steps} policy steps in {compute.total_seconds:.1f} s; per step policy "
            f"{row['policy_ms_per_step']:.1f} ms, reward {row['reward_ms_per_step']:.2f} ms, tiltsmc "
            f"{row['tiltsmc_ms_per_step']:.2f} ms ({100 * row['tiltsmc_share']:.1f}%)",
            flush=True,
        )
        policy.release_memory()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=default_model_dir(), help="converted model folder")
    parser.add_argument(
        "--levels", type=int, nargs="*", default=[1, 2, 4, 8], help="lengths T (none: timing only)"
    )
    parser.add_argument("--problems", type=int, default=8, help="problems per length")
    parser.add_argument("--samples", type=int, default=4, help="answers sampled per problem")
    parser.add_argument("--batch", type=int, default=8, help="problems per batch (x samples rows)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--size", choices=sorted(task.SIZES), default="small", help="problem size")
    parser.add_argument("--tokens-per-step", type=int, default=16, help="token budget per line")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timing-rows", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--timing-steps", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--check-batching",
        choices=("on", "off"),
        default="on",
        help="'off' loads a variant whose rows depend on their batch (the int8 one), refused otherwise",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/...)")
    parser.add_argument(
        "--value", type=Path, default=None, help="policy + value folder: run the samplers' comparison"
    )
    parser.add_argument(
        "--budgets", type=int, nargs="+", default=[8], help="comparison: policy steps per step"
    )
    parser.add_argument("--temperature", type=float, default=0.7, help="comparison: the policy's temperature")
    parser.add_argument("--noise", type=float, default=2.0, help="comparison: the degraded model's noise sd")
    parser.add_argument("--bellman-prompts", type=int, default=2)
    parser.add_argument("--bellman-prefixes", type=int, default=8)
    parser.add_argument("--bellman-samples", type=int, default=8)
    parser.add_argument(
        "--split-only", action="store_true", help="comparison: only the time split of each sampler"
    )
    args = parser.parse_args()
    if args.value is not None:
        if not (args.value / "model.onnx").is_file():
            parser.error(f"--value: no model.onnx in {args.value} (scripts/train_smollm2_value.py --out DIR)")
        if args.split_only:
            split = {
                "benchmark": "real_model_split",
                "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "machine": machine_info(),
                "samplers": step_split(args),
                "machine_after": {"loadavg": os.getloadavg()},
            }
            out = args.out or RESULTS / "real_model_split_vm.json"
            out.write_text(json.dumps(finite_or_none(split), indent=1, allow_nan=False) + "\n")
            print(f"wrote {out}")
            return
        record = compare(args)
        record["machine_after"] = {"loadavg": os.getloadavg()}
        out = args.out or RESULTS / "real_model_compare_vm.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(finite_or_none(record), indent=1, allow_nan=False) + "\n")
        demo.plot(record, out.with_suffix(".png"))
        table = demo.render_table(record)
        out.with_suffix(".txt").write_text(table + "\n")
        print(table)
        print(f"wrote {out} (.png, .txt)")
        return
    model_dir = args.model
    if not (model_dir / "model.onnx").is_file():
        parser.error(f"--model: no model.onnx in {model_dir} (run scripts/get_smollm2.py --out {model_dir})")
    conversion = model_dir / "conversion.json"
    if not conversion.is_file() and (model_dir.parent / "conversion.json").is_file():
        conversion = model_dir.parent / "conversion.json"
    record: dict[str, Any] = {
        "benchmark": "real_model",
        "model": str(model_dir),
        "model_bytes": (model_dir / "model.onnx").stat().st_size,
        "conversion": json.loads(conversion.read_text()) if conversion.is_file() else None,
        "settings": {k: v for k, v in vars(args).items() if k not in ("model", "out")},
        "machine": machine_info(),
    }
    example_prompt = task.messages(task.make_problems(4, 1, rng=0, size=args.size)[0], args.size)
    record["example_prompt"] = example_prompt
    if args.timing_rows:
        record["decoding"] = measure_decoding(
            model_dir, example_prompt, args.timing_rows, args.timing_steps, args.threads,
            args.check_batching == "on",
        )  # fmt: skip
    record["task"] = [row for t in args.temperatures for row in measure_task(args, model_dir, t)]
    record["machine_after"] = {"loadavg": os.getloadavg()}
    variant = "" if model_dir.name == "smollm2" else f"_{model_dir.name}"  # e.g. the int8 subfolder
    out = args.out or RESULTS / f"real_model_vm{variant}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
