"""``tiltsmc`` on the command line: ``tiltsmc run`` samples ONNX models with any sampler; ``tiltsmc serve``
serves them over HTTP (:mod:`tiltsmc.serving.server`); ``tiltsmc demo`` compares the samplers on the
bundled reasoning task (see :mod:`tiltsmc.demo`).

Results are JSON lines, one per prompt (samples, texts, log-weights, the log Z estimate, the ESS trace,
timings), written to ``--json`` atomically (a temporary file renamed at the end, so an interrupted run
leaves nothing half-written) or to standard output. A progress bar goes to standard error on a
terminal; piped, the run is quiet apart from a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, TextIO

import numpy as np

from . import core
from .samplers import best_of_n, mh, rejection, smc, sp_gsmc
from .samplers.result import SamplerResult

SAMPLERS = ("smc", "sp-gsmc", "mh", "best-of-n", "rejection")


class Progress:
    """A one-line progress bar on a terminal; silent when the stream is not one."""

    def __init__(self, total: int, label: str, stream: TextIO = sys.stderr) -> None:
        self.total, self.label, self.stream = total, label, stream
        self.enabled = stream.isatty()
        self.started = time.perf_counter()
        self.update(0)

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * done / max(self.total, 1))
        elapsed = time.perf_counter() - self.started
        self.stream.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {elapsed:6.1f}s"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _id_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text}") from None


def _add_model_arguments(parser: argparse.ArgumentParser, demo_models: bool = False) -> None:
    """The options that load the policy and the reward model (``run`` and ``serve``)."""
    if demo_models:
        models = parser.add_mutually_exclusive_group(required=True)
        models.add_argument("--policy", help="folder (or .onnx file) of the decoder LM")
        models.add_argument("--demo", action="store_true", help="the bundled arithmetic policy and PRM")
        parser.add_argument("--reward", help="folder (or .onnx file) of the reward model (with --policy)")
    else:
        parser.add_argument("--policy", required=True, help="folder (or .onnx file) of the decoder LM")
        parser.add_argument("--reward", required=True, help="folder (or .onnx file) of the reward model")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=32)
    parser.add_argument("--step", default="token", help="'token' or a delimiter ending each step, e.g. '\\n'")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=_positive_int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--reward-kind", choices=("log_value", "prob", "logit"), default="logit")
    parser.add_argument("--reward-output", default=None, help="reward graph output to read (default: first)")
    parser.add_argument(
        "--reward-position",
        choices=("last", "delimiter"),
        default="last",
        help="read per-position scores at the last token or at the last step delimiter",
    )
    parser.add_argument(
        "--reward-delimiters",
        type=_id_list,
        default=None,
        help="token ids ending a step, comma-separated (with --reward-position delimiter)",
    )
    parser.add_argument(
        "--reward-label",
        type=int,
        default=None,
        help="the class whose probability is Vh, for an output with a class axis last",
    )
    parser.add_argument(
        "--reward-classes",
        type=_id_list,
        default=None,
        help="comma-separated classes the label's probability is normalised over (default: all)",
    )
    parser.add_argument(
        "--threads", type=_positive_int, default=None, help="threads for ONNX Runtime and the core"
    )
    parser.add_argument("--cpu", action="store_true", help="use the CPU even where a GPU is usable")


def _load_models(args: argparse.Namespace) -> tuple[Any, Any]:
    """The policy and reward model the options name (OSError / ValueError for what cannot load)."""
    from .models import OnnxCausalLM, OnnxRewardModel

    providers = ["CPUExecutionProvider"] if args.cpu else None
    if getattr(args, "demo", False):
        from .tasks import arithmetic

        return arithmetic.load_models(intra_op_num_threads=args.threads, providers=providers)
    if args.reward is None:
        raise ValueError("--reward: a reward model is needed with --policy")
    step: Any = args.step.encode().decode("unicode_escape") if args.step != "token" else "token"
    policy = OnnxCausalLM(
        args.policy,
        max_new_tokens=args.max_new_tokens,
        step=step,
        temperature=args.temperature,
        providers=providers,
        top_k=args.top_k,
        top_p=args.top_p,
        intra_op_num_threads=args.threads,
    )
    reward = OnnxRewardModel(
        args.reward,
        output=args.reward_output,
        kind=args.reward_kind,
        position=args.reward_position,
        delimiter_ids=args.reward_delimiters,
        label=args.reward_label,
        classes=args.reward_classes,
        providers=providers,
        intra_op_num_threads=args.threads,
    )
    return policy, reward


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiltsmc", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="sample an ONNX policy guided by an ONNX reward model")
    prompts = run.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    prompts.add_argument("--prompts", help="a file of prompts, one per line")
    run.add_argument("--sampler", choices=SAMPLERS, default="smc")
    run.add_argument(
        "--particles", type=_positive_int, default=16, help="particles (smc, mh PIMH) or n (best-of-n)"
    )
    run.add_argument("--resample", choices=core.SCHEMES, default="systematic")
    run.add_argument("--ess-threshold", type=float, default=0.5)
    run.add_argument("--pool-size", type=_positive_int, default=8, help="sp-gsmc / mh resampling pool")
    run.add_argument("--mh-steps", type=int, default=4)
    run.add_argument("--bound", type=float, default=1.0, help="rejection: an upper bound on the reward")
    run.add_argument("--num-samples", type=_positive_int, default=1, help="rejection: samples per prompt")
    run.add_argument("--max-tries", type=_positive_int, default=10_000, help="rejection: draws per prompt")
    run.add_argument("--batch-size", type=_positive_int, default=8, help="prompts per batched run")
    _add_model_arguments(run)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--json", dest="json_path", default=None, help="write JSON lines here (default: stdout)")

    serve = commands.add_parser(
        "serve",
        help="serve the models over HTTP (OpenAI-style /v1/completions, /health, /metrics)",
        description="Serve concurrent sampling requests with the continuous-batching engine, behind an "
        "OpenAI-compatible HTTP API (needs the serve extra). Binds 127.0.0.1 unless --host says otherwise.",
    )
    _add_model_arguments(serve, demo_models=True)
    from .serving import server as serving_server

    serving_server.add_arguments(serve)

    demo = commands.add_parser(
        "demo",
        help="guided SMC vs best-of-N on the bundled arithmetic task (table, plot, JSON)",
        description="Accuracy of best-of-N, SMC, SP-gSMC and SP-gSMC + MH at equal policy compute on the "
        "bundled arithmetic-chain task, guided by its learned process reward model and by a degraded one, "
        "and the reward models' Bellman error. Writes demo.txt, demo.json and demo.png to --out.",
    )
    demo.add_argument(
        "--levels",
        type=_positive_int,
        nargs="+",
        default=[4, 8, 12, 16],
        metavar="T",
        help="numbers of reasoning steps (1..16)",
    )
    demo.add_argument(
        "--budgets",
        type=_positive_int,
        nargs="+",
        default=[2, 4, 8],
        metavar="C",
        help="policy steps per reasoning step: best-of-N's N, SMC's particles, the pool size",
    )
    demo.add_argument("--problems", type=_positive_int, default=24, help="problems per level")
    demo.add_argument(
        "--noise", type=float, default=2.0, help="sd of the degraded reward model's log-value noise"
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=_positive_int, default=None, help="ONNX Runtime threads")
    demo.add_argument("--out", default="tiltsmc-demo", help="output folder (created if needed)")
    return parser


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return list(args.prompt)
    path = Path(args.prompts)
    if not path.is_file():
        raise SystemExit(f"tiltsmc: --prompts: no such file: {path}")
    lines = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise SystemExit(f"tiltsmc: --prompts: {path} holds no prompt")
    return prompts


def _sample(
    args: argparse.Namespace, policy: Any, reward: Any, prompts: list[str], seed: Any
) -> SamplerResult:
    if args.sampler == "smc":
        return smc(
            policy,
            reward,
            prompts,
            num_particles=args.particles,
            resample=args.resample,
            ess_threshold=args.ess_threshold,
            rng=seed,
        )
    if args.sampler == "sp-gsmc":
        return sp_gsmc(policy, reward, prompts, pool_size=args.pool_size, rng=seed)
    if args.sampler == "mh":
        return mh(policy, reward, prompts, pool_size=args.pool_size, steps=args.mh_steps, rng=seed)
    if args.sampler == "best-of-n":
        return best_of_n(policy, reward, prompts, n=args.particles, rng=seed)
    return rejection(
        policy,
        reward,
        prompts,
        bound=args.bound,
        num_samples=args.num_samples,
        max_tries=args.max_tries,
        rng=seed,
    )


def _records(result: SamplerResult, prompts: list[str], offset: int) -> list[dict[str, Any]]:
    whole = result.to_dict()
    records = []
    for b, prompt in enumerate(prompts):
        record: dict[str, Any] = {"prompt_index": offset + b, "prompt": prompt, "sampler": whole["sampler"]}
        for key in (
            "samples",
            "texts",
            "log_weights",
            "log_z",
            "ess",
            "resampled",
            "collapsed",
            "acceptance_rate",
            "tries",
        ):
            if key in whole:
                record[key] = whole[key][b]
        if str(b) in whole.get("errors", {}):
            record["error"] = whole["errors"][str(b)]
        record["compute"] = whole["compute"]  # for the whole batch this prompt ran in
        records.append(record)
    return records


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        core.set_num_threads(args.threads)
    try:
        policy, reward = _load_models(args)
    except (OSError, ValueError) as error:
        print(f"tiltsmc: {error}", file=sys.stderr)
        return 2
    prompts = _read_prompts(args)
    seed = np.random.default_rng(args.seed)
    target: Optional[Path] = Path(args.json_path) if args.json_path else None
    if target is not None and not target.parent.exists():
        print(f"tiltsmc: --json: folder {target.parent} does not exist", file=sys.stderr)
        return 2
    handle, temporary = (None, None)
    if target is not None:
        descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        handle = os.fdopen(descriptor, "w", encoding="utf-8")
    out = handle if handle is not None else sys.stdout
    progress = Progress(len(prompts), f"tiltsmc {args.sampler}")
    began = time.perf_counter()
    failed = 0
    try:
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start : start + args.batch_size]
            result = _sample(args, policy, reward, batch, seed)
            for record in _records(result, batch, start):
                failed += "error" in record
                out.write(json.dumps(record) + "\n")
            progress.update(min(start + args.batch_size, len(prompts)))
        progress.close()
        if handle is not None:
            handle.close()
            os.replace(temporary, target)  # type: ignore[arg-type]
    except BaseException:
        progress.close()
        if handle is not None:
            handle.close()
            os.unlink(temporary)  # type: ignore[arg-type]
        raise
    where = f" to {target}" if target is not None else ""
    print(
        f"tiltsmc: {len(prompts)} prompt(s), {failed} failed, {time.perf_counter() - began:.2f}s{where}",
        file=sys.stderr,
    )
    return 1 if failed == len(prompts) else 0


def serve(args: argparse.Namespace) -> int:
    from .serving import server as serving_server

    if args.threads is not None:
        core.set_num_threads(args.threads)
    try:
        policy, reward = _load_models(args)
    except (OSError, ValueError) as error:
        print(f"tiltsmc: {error}", file=sys.stderr)
        return 2
    return serving_server.serve(args, policy, reward)


def demo(args: argparse.Namespace) -> int:
    from . import demo as demo_module

    config = demo_module.DemoConfig(
        levels=tuple(args.levels),
        budgets=tuple(args.budgets),
        problems=args.problems,
        seed=args.seed,
        noise=args.noise,
        threads=args.threads,
    )
    out = Path(args.out)
    try:
        config.validate()
        demo_module.check_output_folder(out)
    except ValueError as error:
        print(f"tiltsmc demo: --{error}", file=sys.stderr)
        return 2
    if args.threads is not None:
        core.set_num_threads(args.threads)
    progress = Progress(1, "tiltsmc demo")

    def report(done: int, total: int) -> None:
        progress.total = total
        progress.update(done)

    try:
        record = demo_module.run_demo(config, progress=report)
    finally:
        progress.close()
    written = demo_module.write_outputs(record, out)
    print(demo_module.render_table(record))
    print(
        f"tiltsmc demo: {record['seconds']:.0f}s; wrote {', '.join(str(p) for p in written)}", file=sys.stderr
    )
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return run(args)
        if args.command == "demo":
            return demo(args)
        if args.command == "serve":
            return serve(args)
    except KeyboardInterrupt:
        print("tiltsmc: interrupted; no result file written", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
