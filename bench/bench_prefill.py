"""Starting prompts on a real model: the time and memory of ``OnnxCausalLM(prefill_tokens=...)`` (issue #15).

A prompt longer than ``prefill_tokens`` starts in pieces of that many positions (each a cached step over
the pieces before it), and a batch of prompts ``prefill_tokens // width`` rows a call. This measures both on
the converted SmolLM2-135M-Instruct (``--model``, default ``$TILTSMC_SMOLLM2``, else
``~/.cache/tiltsmc/smollm2``; ``scripts/get_smollm2.py``), each setting in a fresh process (its peak
resident memory its own): one long prompt (``--words`` repeats of a counting sentence, about 12 tokens
each; 260 make about 3,100 tokens), against the reference, the whole prompt in one call
(``prefill_tokens`` past its length), with the last position's logits compared; and ``--batch`` short
prompts (about 20 tokens) started together, best of three. Not a test; JSON to
``bench/results/prefill_vm.json`` (``--out``).

    python bench/bench_prefill.py [--model DIR] [--words 260] [--settings 2048,1024,512,256,128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _machine import model_run_record
from _plot import RESULTS, write_json

SENTENCE = "one apple, two apples, three apples, four apples. "

# Run in a fresh interpreter per setting: prints one JSON line.
MEASURE = """
import json, resource, sys, time
import numpy as np
from tiltsmc.models import OnnxCausalLM

folder, prefill, words, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
policy = OnnxCausalLM(folder, max_new_tokens=8, prefill_tokens=prefill, memory_arena=False)
long_prompt = "Count the apples: " + {sentence!r} * words
short = [f"Start with {{17 + k}}. Add {{k % 9 + 1}}, then subtract {{k % 5 + 2}}. Write one line per step."
         for k in range(batch)]
policy.start(short[:2], 1)  # the first shapes, untimed
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
began = time.perf_counter()
particles = policy.start([long_prompt], 1)
long_seconds = time.perf_counter() - began
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
batch_seconds = []
for _ in range(3):
    began = time.perf_counter()
    policy.start(short, 1)
    batch_seconds.append(time.perf_counter() - began)
print(json.dumps({{
    "prefill_tokens": prefill,
    "prompt_tokens": int(len(policy.encode_prompt(long_prompt))),
    "long_seconds": long_seconds,
    "peak_bytes": peak,
    "loaded_bytes": loaded,
    "batch_seconds": min(batch_seconds),
    "logits": particles.state["lm.logits"][0, 0].astype(float).tolist(),
}}))
"""


def default_model_dir() -> Path:
    if os.environ.get("TILTSMC_SMOLLM2"):
        return Path(os.environ["TILTSMC_SMOLLM2"])
    root = os.environ.get("TILTSMC_MODELS")
    return (Path(root) if root else Path.home() / ".cache" / "tiltsmc") / "smollm2"


def measure(folder: Path, prefill: int, args: argparse.Namespace) -> dict[str, Any]:
    code = MEASURE.format(sentence=SENTENCE)
    command = [sys.executable, "-c", code, str(folder), str(prefill), str(args.words), str(args.batch)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"prefill_tokens {prefill} failed:\n{done.stderr[-3000:]}")
    record: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model_dir(), help="converted SmolLM2 folder")
    parser.add_argument("--words", type=int, default=260, help="repeats of the sentence in the long prompt")
    parser.add_argument("--batch", type=int, default=64, help="short prompts started together")
    parser.add_argument("--settings", default="2048,1024,512,256,128", help="prefill_tokens to measure")
    parser.add_argument("--out", type=Path, default=RESULTS / "prefill_vm.json")
    args = parser.parse_args()
    if not (args.model / "model.onnx").is_file():
        raise SystemExit(f"--model: no model.onnx in {args.model} (scripts/get_smollm2.py --out DIR)")
    began = time.perf_counter()
    settings = [int(s) for s in args.settings.split(",")]
    reference = measure(args.model, 1 << 20, args)  # the whole prompt in one call
    runs = [measure(args.model, prefill, args) for prefill in settings]
    print(
        f"one prompt of {reference['prompt_tokens']} tokens, and {args.batch} short prompts together "
        f"(SmolLM2-135M, {args.model})"
    )
    print("prefill_tokens | long prompt: s (x one call) | peak RSS GB (x) | max |logit diff| | batch s (x)")
    rows = []
    for run in [reference, *runs]:
        difference = max(abs(a - b) for a, b in zip(run["logits"], reference["logits"]))
        row = {
            "prefill_tokens": run["prefill_tokens"],
            "long_seconds": run["long_seconds"],
            "long_ratio": run["long_seconds"] / reference["long_seconds"],
            "peak_bytes": run["peak_bytes"],
            "peak_ratio": run["peak_bytes"] / reference["peak_bytes"],
            "loaded_bytes": run["loaded_bytes"],
            "max_logit_difference": difference,
            "batch_seconds": run["batch_seconds"],
            "batch_ratio": run["batch_seconds"] / reference["batch_seconds"],
        }
        rows.append(row)
        name = "one call" if run is reference else str(run["prefill_tokens"])
        print(
            f"{name:>14} | {row['long_seconds']:7.2f} ({row['long_ratio']:.2f}x) | "
            f"{row['peak_bytes'] / 1e9:5.2f} ({row['peak_ratio']:.2f}x) | {difference:.2e} | "
            f"{row['batch_seconds']:.3f} ({row['batch_ratio']:.2f}x)"
        )
    write_json(
        args.out,
        model_run_record(
            "prefill",
            args,
            prompt_tokens=reference["prompt_tokens"],
            rows=rows,
            seconds=time.perf_counter() - began,
        ),
    )


if __name__ == "__main__":
    main()
