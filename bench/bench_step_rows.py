"""A multi-token step decoded on the rows still writing it, against every row every call, on a real model.

Within a step (a line of text) the particles write lines of different lengths: one that has written its
line, or whose answer has ended, is fed masked padding until the longest line of the batch is done, and on a
CPU a session call's work grows with its rows. ``OnnxCausalLM(step_rows_below=f)`` runs the session on the
rows still writing the step once they are at most ``f`` of the rows it runs on (their KV caches gathered,
the others' set aside until the step ends). This measures SmolLM2-135M-Instruct with its value head (the
policy + value graph of ``scripts/train_smollm2_value.py``: ``--value``, default
``$TILTSMC_SMOLLM2_VALUE``, else ``~/.cache/tiltsmc/smollm2-value``) on the counting chains of
``tiltsmc.tasks.chat_arithmetic`` asked through its chat template, the default fraction against 0 (every
row), the two in turn for ``--rounds`` rounds, each round the same seeds:

* offline: one ``tiltsmc.smc`` call of ``--prompts`` prompts x ``--particles`` particles;
* serving: ``--requests`` SMC requests of ``--request-particles`` particles through an ``Engine`` (one
  worker), submitted at once, so that up to its row limit they share its steps.

For each: wall seconds, the policy's seconds (``Compute``), the rows of the policy's decoding calls, and
whether the samples were the same tokens with and without (they should be: the rows set aside are masked).
Not a test; JSON to ``bench/results/step_rows_real_vm.json``.

    python bench/bench_step_rows.py [--value DIR] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import tiltsmc
from _machine import model_run_record
from _plot import RESULTS, write_json
from bench_workers_real import default_value_dir
from tiltsmc.models import OnnxCausalLM
from tiltsmc.models.joint import PolicyValue
from tiltsmc.tasks import chat_arithmetic as task


class DecodeRows:
    """The rows of each decoding call (one position) of a policy's session."""

    def __init__(self, policy: OnnxCausalLM) -> None:
        self.rows: list[int] = []
        run = policy.session.run

        def counting(names: Any, feeds: dict[str, Any], *args: Any) -> Any:
            if feeds["input_ids"].shape[1] == 1:
                self.rows.append(int(feeds["input_ids"].shape[0]))
            return run(names, feeds, *args)

        policy.session.run = counting  # type: ignore[method-assign]


def same_samples(a: Any, b: Any) -> bool:
    return len(a.samples) == len(b.samples) and all(
        len(x) == len(y) and all(np.array_equal(u, v) for u, v in zip(x, y))
        for x, y in zip(a.samples, b.samples)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--value", type=Path, default=default_value_dir(), help="policy + value model folder")
    parser.add_argument("--level", type=int, default=4, help="lines of each counting chain (T)")
    parser.add_argument("--prompts", type=int, default=4, help="offline: prompts of the one sampler call")
    parser.add_argument("--particles", type=int, default=8, help="offline: particles a prompt")
    parser.add_argument("--requests", type=int, default=8, help="serving: requests submitted at once")
    parser.add_argument("--request-particles", type=int, default=4, help="serving: particles a request")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime's intra-op threads")
    parser.add_argument("--out", type=Path, default=RESULTS / "step_rows_real_vm.json")
    args = parser.parse_args()
    if not (args.value / "model.onnx").is_file():
        raise SystemExit(f"--value: no model.onnx in {args.value} (scripts/train_smollm2_value.py --out DIR)")
    default = OnnxCausalLM.__init__.__kwdefaults__["step_rows_below"]  # type: ignore[index]
    settings = {"every row": 0.0, f"rows still writing (below {default})": default}
    problems = task.make_problems(
        args.level, max(args.prompts, args.requests), rng=[0, args.level], size="counting"
    )
    prompts = [task.messages(problem, "counting") for problem in problems]
    models = {}
    for name, below in settings.items():
        policy = OnnxCausalLM(
            args.value, max_new_tokens=12 * args.level + 8, step="\n", value_output="value",
            intra_op_num_threads=args.threads, step_rows_below=below,
        )  # fmt: skip
        models[name] = (
            policy,
            PolicyValue(policy, kind="logit", verifier=task.verify_chat),
            DecodeRows(policy),
        )

    def offline(name: str, seed: int) -> tuple[dict[str, float], list[Any]]:
        policy, reward, rows = models[name]
        rows.rows.clear()
        began = time.perf_counter()
        result = tiltsmc.smc(policy, reward, prompts[: args.prompts], num_particles=args.particles, rng=seed)
        wall = time.perf_counter() - began
        figures = {"seconds": wall, "policy_seconds": result.compute.policy_seconds}
        return {**figures, "calls": len(rows.rows), "rows_per_call": float(np.mean(rows.rows))}, [result]

    def serving(name: str, seed: int) -> tuple[dict[str, float], list[Any]]:
        policy, reward, rows = models[name]
        rows.rows.clear()
        with tiltsmc.Engine(policy, reward) as engine:
            began = time.perf_counter()
            futures = [
                engine.submit(prompt, num_particles=args.request_particles, rng=seed * 1000 + k)
                for k, prompt in enumerate(prompts[: args.requests])
            ]
            results = [future.result() for future in futures]
            wall = time.perf_counter() - began
        policy_seconds = sum(result.compute.policy_seconds for result in results)
        figures = {"seconds": wall, "policy_seconds": policy_seconds}
        return {**figures, "calls": len(rows.rows), "rows_per_call": float(np.mean(rows.rows))}, results

    began = time.perf_counter()
    record: dict[str, Any] = {}
    for label, measure in (("offline", offline), ("serving", serving)):
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
        same = []
        for r in range(args.rounds):
            outputs = {}
            for name in list(settings)[:: 1 if r % 2 == 0 else -1]:
                figures, outputs[name] = measure(name, r)
                runs[name].append(figures)
            first, second = outputs.values()
            same.append(all(same_samples(a, b) for a, b in zip(first, second)))
        medians = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in runs.items()}
        every, fewer = medians.values()
        ratio = every["seconds"] / fewer["seconds"]
        print(f"{label} ({args.rounds} rounds in turn, medians):")
        for name, m in medians.items():
            print(
                f"  {name:32s} {m['seconds']:7.2f} s (policy {m['policy_seconds']:.2f} s), "
                f"{m['calls']:.0f} decoding calls of {m['rows_per_call']:.1f} rows"
            )
        rounds = f"{sum(same)} of {len(same)} rounds"
        print(f"  every row / rows still writing: {ratio:.2f}x; the same samples in {rounds}")
        record[label] = {"rounds": runs, "medians": medians, "speedup": ratio, "same_samples": same}
    write_json(
        args.out, model_run_record("step_rows_real", args, **record, seconds=time.perf_counter() - began)
    )


if __name__ == "__main__":
    main()
