"""One worker with every core against several workers of one core each, on a real model (issue #15).

The serving engine's ``workers`` option pays on a CPU where one session call of a small model keeps only
one core busy (``bench_overload.py --compare workers``). A larger model's calls use several cores, so
the default stays one worker. This measures that on SmolLM2-135M, as the policy + value graph of
``scripts/train_smollm2_value.py`` (``--value``, default ``$TILTSMC_SMOLLM2_VALUE``, else
``~/.cache/tiltsmc/smollm2-value``): an ``Engine`` with one worker and the models on ``--threads``
ONNX Runtime threads, against one with ``--threads`` workers and one thread each, on the same requests
(an SMC request of ``--particles`` particles, a short counting prompt through the chat template, seeded):
one request alone, and two submitted at once; medians of ``--repeats``. Not a test; JSON to
``bench/results/workers_real_vm.json``.

    python bench/bench_workers_real.py [--value DIR] [--threads 2] [--particles 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import tiltsmc
from _machine import model_run_record
from _plot import RESULTS, write_json
from tiltsmc.models import OnnxCausalLM
from tiltsmc.models.joint import PolicyValue

PROMPT = [{"role": "user", "content": "Count from 3 to 9, one number per line."}]


def default_value_dir() -> Path:
    if os.environ.get("TILTSMC_SMOLLM2_VALUE"):
        return Path(os.environ["TILTSMC_SMOLLM2_VALUE"])
    return Path.home() / ".cache" / "tiltsmc" / "smollm2-value"


def measure(folder: Path, workers: int, threads: int, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds of one request alone and of two submitted at once (medians), for one engine setting."""
    policy = OnnxCausalLM(
        folder, max_new_tokens=24, step="\n", value_output="value", intra_op_num_threads=threads
    )
    reward = PolicyValue(policy, kind="logit")
    lone, pairs = [], []
    with tiltsmc.Engine(policy, reward, workers=workers) as engine:
        engine.submit(PROMPT, num_particles=args.particles, rng=0).result()  # untimed: first shapes
        for k in range(args.repeats):
            began = time.perf_counter()
            engine.submit(PROMPT, num_particles=args.particles, rng=k).result()
            lone.append(time.perf_counter() - began)
            began = time.perf_counter()
            futures = [
                engine.submit(PROMPT, num_particles=args.particles, rng=100 + 2 * k + j) for j in (0, 1)
            ]
            for future in futures:
                future.result()
            pairs.append(time.perf_counter() - began)
    return {
        "workers": workers,
        "threads": threads,
        "lone_seconds": lone,
        "two_at_once_seconds": pairs,
        "lone_median": statistics.median(lone),
        "two_at_once_median": statistics.median(pairs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--value", type=Path, default=default_value_dir(), help="policy + value model folder")
    parser.add_argument("--threads", type=int, default=2, help="cores: the one worker's threads, the workers")
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "workers_real_vm.json")
    args = parser.parse_args()
    if not (args.value / "model.onnx").is_file():
        raise SystemExit(f"--value: no model.onnx in {args.value} (scripts/train_smollm2_value.py --out DIR)")
    began = time.perf_counter()
    one = measure(args.value, 1, args.threads, args)
    several = measure(args.value, args.threads, 1, args)
    for name, run in (("one worker", one), (f"{args.threads} workers", several)):
        print(
            f"{name:>10}, {run['threads']} ONNX Runtime thread(s) each: one request alone "
            f"{run['lone_median']:.2f} s, two at once {run['two_at_once_median']:.2f} s"
        )
    ratios = {
        "lone": several["lone_median"] / one["lone_median"],
        "two_at_once": several["two_at_once_median"] / one["two_at_once_median"],
    }
    print(
        f"{args.threads} workers / one: alone {ratios['lone']:.2f}x, two at once {ratios['two_at_once']:.2f}x"
    )
    write_json(
        args.out,
        model_run_record(
            "workers_real",
            args,
            one_worker=one,
            several_workers=several,
            several_over_one=ratios,
            seconds=time.perf_counter() - began,
        ),
    )


if __name__ == "__main__":
    main()
