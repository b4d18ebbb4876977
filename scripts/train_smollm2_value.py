#!/usr/bin/env python3
r"""A value model for SmolLM2-135M-Instruct, learned from its own rollouts, exported in the policy's graph.

The converted model (``scripts/get_smollm2.py``) on ``tiltsmc.tasks.chat_arithmetic``'s counting chains,
one line a step. What it does:

1. **Features.** A copy of ``model.onnx`` with the final hidden state ``h`` (the input of the LM head's
   MatMul, after the last norm) as one more output, loaded as the policy; a hook on its session keeps
   ``h`` at every token the session is fed.
2. **Rollouts.** Plain sampling of ``p`` (``--temperature``, steps = lines) on ``--problems`` problems of
   each length in ``--levels`` x ``--samples`` answers, and on ``--held-out`` other problems of each length
   (all of them distinct: ``split_problems``). A particle's prefix is scored where a step ends
   (the token that ends a line) and at its last token (end of turn, or the length limit).
3. **Targets.** Each scored prefix gets its verified label ``y``: 1 when every line so far is exactly
   the right line of the chain (and, at the end, when the answer is complete: ``verify``), else 0. ``y``
   is a Monte Carlo target of ``P(prefix right | h)``: a prefix is worth ``E_p[r | prefix] = P(right
   so far) x P(the rest right | right so far)``, and the second factor is (nearly) one constant per step,
   a gauge that SMC's normalised weights do not see; at the end ``y = r`` exactly.
4. **Head.** Logistic regression ``P(y = 1 | h) = sigmoid(h w + c)`` fitted by Newton's method with an
   L2 penalty chosen by cross-validation over the training problems (split by problem, never by prefix:
   ``cross_validation_folds``); reported: the held-out problems' log loss, accuracy and AUC against the
   constant predictor.
5. **Export.** ``model.onnx`` plus one output ``value`` ``(batch, seq, 1) = h w + c`` (a logit: read it
   with ``kind="logit"``), in ``--out`` with the tokenizer and config files: one folder for both roles,
   ``OnnxCausalLM(out, value_output="value")`` and ``tiltsmc.models.PolicyValue`` (one trunk per step).
   ``value_head.json`` has the head, the data and the held-out figures.

Needs ``onnx`` beside ``tiltsmc[cpu]`` (onnx is not a dependency of tiltsmc: a throw-away venv is fine).
Takes ~10-30 minutes on 2 CPU cores with the defaults. Example::

    python scripts/train_smollm2_value.py --model ~/.cache/tiltsmc/smollm2 \
        --out ~/.cache/tiltsmc/smollm2-value
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
from tiltsmc.models import OnnxCausalLM
from tiltsmc.tasks import chat_arithmetic as task

HIDDEN = "tiltsmc_hidden"
VALUE = "value"


def default_model_dir() -> Path:
    if os.environ.get("TILTSMC_SMOLLM2"):
        return Path(os.environ["TILTSMC_SMOLLM2"])
    root = os.environ.get("TILTSMC_MODELS")
    return (Path(root) if root else Path.home() / ".cache" / "tiltsmc") / "smollm2"


def with_head(source: Path, dest: Path, weight: np.ndarray, bias: float, hidden_output: bool) -> None:
    """``source``'s folder copied to ``dest`` with a ``value`` output ``h w + c`` ``(batch, seq, 1)``
    (and ``h`` itself as an output where ``hidden_output``)."""
    import onnx  # here: the rest of the script (its rollouts, the head's fit) runs without it
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(source / "model.onnx"))
    graph = model.graph
    (lm_head,) = [node for node in graph.node if "logits" in node.output]
    hidden = lm_head.input[0]
    graph.initializer.extend(
        [
            numpy_helper.from_array(weight.astype(np.float32).reshape(-1, 1), "value_head.weight"),
            numpy_helper.from_array(np.array([bias], dtype=np.float32), "value_head.bias"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node(
                "MatMul", [hidden, "value_head.weight"], ["value_head/matmul"], name="/value_head/MatMul"
            ),
            helper.make_node(
                "Add", ["value_head/matmul", "value_head.bias"], [VALUE], name="/value_head/Add"
            ),
        ]
    )
    graph.output.append(
        helper.make_tensor_value_info(VALUE, TensorProto.FLOAT, ["batch_size", "sequence_length", 1])
    )
    if hidden_output:
        width = weight.size
        graph.node.append(helper.make_node("Identity", [hidden], [HIDDEN], name="/tiltsmc_hidden/Identity"))
        graph.output.append(
            helper.make_tensor_value_info(HIDDEN, TensorProto.FLOAT, ["batch_size", "sequence_length", width])
        )
    dest.mkdir(parents=True, exist_ok=True)
    for item in sorted(source.iterdir()):
        if item.is_file() and item.name not in ("model.onnx", "model.onnx_data", "value_head.json"):
            shutil.copy2(item, dest / item.name)
    onnx.save(model, str(dest / "model.onnx"))


class HiddenRecorder:
    """Keeps ``h`` of every real token fed to the policy's session, row by row, in feeding order."""

    def __init__(self, policy: OnnxCausalLM) -> None:
        self.rows: list[list[np.ndarray]] = []
        self.prompt_ends: list[np.ndarray] = []
        inner = policy.session.run

        def run(names: list[str], feeds: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            results = inner([*names, HIDDEN], feeds, *args, **kwargs)
            hidden = results.pop()
            ids = feeds["input_ids"]
            if ids.shape[1] > 1:  # a prompt batch: its last position scores the empty answer
                self.prompt_ends.extend(np.array(hidden[:, -1, :], dtype=np.float32))
            else:
                real = feeds["attention_mask"][:, -1] == 1
                if not self.rows:
                    self.rows = [[] for _ in range(ids.shape[0])]
                elif len(self.rows) != ids.shape[0]:
                    raise RuntimeError(
                        f"the session ran on {ids.shape[0]} rows of {len(self.rows)}: the recorder needs "
                        "every row fed at every call (OnnxCausalLM(..., step_rows_below=0))"
                    )
                for row in np.nonzero(real)[0]:
                    self.rows[row].append(np.array(hidden[row, 0], dtype=np.float32))
            return results

        policy.session.run = run  # an instance attribute shadows the method

    def reset(self) -> None:
        self.rows, self.prompt_ends = [], []


def recording_policy(
    hidden_dir: Path, max_new_tokens: int, temperature: float, threads: int
) -> tuple[OnnxCausalLM, HiddenRecorder]:
    """The policy the rollouts sample (steps are lines), its session's hidden states recorded."""
    policy = OnnxCausalLM(
        hidden_dir,
        max_new_tokens=max_new_tokens,
        step="\n",
        temperature=temperature,
        value_output=VALUE,  # fed every row's last token too, so the end is scored
        intra_op_num_threads=threads,
        step_rows_below=0,  # every row fed at every call: the recorder reads the session's rows as the batch
    )
    return policy, HiddenRecorder(policy)


# A counting chain is its start and its operand (added T times): the distinct chains of one length.
_START, _END = task.SIZES["counting"]["start"]
COUNTING_CHAINS = (_END - _START + 1) * task.SIZES["counting"]["max_operand"]
FOLDS = 4  # the cross-validation's


def distinct_problems(num_steps: int, count: int, seed: int) -> list[task.Problem]:
    """The first ``count`` distinct counting chains of ``num_steps`` steps in the stream of chains seeded by
    ``(seed, num_steps)`` (a chain drawn again is skipped); ``count`` is at most ``COUNTING_CHAINS``."""
    if not 1 <= count <= COUNTING_CHAINS:
        raise ValueError(f"count: expected 1..{COUNTING_CHAINS} distinct chains of a length, got {count}")
    draws = 4 * count
    while True:  # the stream's first draws are the same whatever its length
        stream = task.make_problems(num_steps, draws, rng=[seed, num_steps], size="counting")
        found = list(dict.fromkeys(stream))
        if len(found) >= count:
            return found[:count]
        draws *= 2


def split_problems(
    levels: list[int], problems: int, held_out: int, seed: int
) -> tuple[dict[int, list[task.Problem]], dict[int, list[task.Problem]]]:
    """For each ``T`` in ``levels``, ``problems`` training and ``held_out`` held-out counting chains: all
    distinct, none in both (the first distinct chains of one stream, training first)."""
    train, held = {}, {}
    for num_steps in levels:
        chains = distinct_problems(num_steps, problems + held_out, seed)
        train[num_steps], held[num_steps] = chains[:problems], chains[problems:]
    return train, held


def cross_validation_folds(
    problems: list[task.Problem], groups: np.ndarray, folds: int = FOLDS
) -> np.ndarray:
    """The fold of each prefix, ``groups[i]`` being the index of its problem in ``problems``: the ``k``-th
    distinct problem is in fold ``k % folds``, and a problem's prefixes all in its fold, whatever its
    index."""
    fold_of: dict[task.Problem, int] = {}
    for problem in problems:
        fold_of.setdefault(problem, len(fold_of) % folds)
    return np.array([fold_of[problems[g]] for g in groups], dtype=np.int64)


def rollouts(
    args: argparse.Namespace, hidden_dir: Path, problems_by_level: dict[int, list[task.Problem]], stream: int
) -> dict[str, Any]:
    """Features ``X``, labels ``y``, the problem index (in ``problems_by_level``'s problems, level after
    level: ``problems``) and step of each scored prefix; the samples are seeded by ``(args.seed, T,
    stream)``."""
    levels = list(problems_by_level)
    policy, recorder = recording_policy(hidden_dir, 12 * max(levels) + 8, args.temperature, args.threads)
    assert policy.tokenizer is not None
    features, labels, groups, steps = [], [], [], []
    answers: dict[int, list[int]] = {}  # by T: answers sampled, answers right (plain sampling's Z)
    group = 0
    for num_steps, problems in problems_by_level.items():
        rng = np.random.default_rng([args.seed, num_steps, stream])
        for first in range(0, len(problems), args.batch):
            began = time.perf_counter()
            batch = problems[first : first + args.batch]
            recorder.reset()
            particles = policy.start([task.messages(p, "counting") for p in batch], args.samples)
            while not particles.finished.all():
                policy.propose(particles, rng)
            particles.flush()
            right = 0
            for b, problem in enumerate(batch):
                features.append(recorder.prompt_ends[b])
                labels.append(1.0)
                groups.append(group + b)
                steps.append(0)
                for i in range(args.samples):
                    row = b * args.samples + i
                    length = int(particles.lengths[b, i])
                    tokens = particles.tokens[b, i, :length]
                    fed = recorder.rows[row]
                    if len(fed) != length:
                        raise RuntimeError(f"row {row}: {len(fed)} fed tokens recorded for {length} tokens")
                    lines = 0
                    for j in range(length):
                        piece = policy.tokenizer.decode(tokens[j : j + 1], skip_special_tokens=False)
                        ended = j == length - 1
                        if not (piece.endswith("\n") or ended):
                            continue
                        text = policy.decode(tokens[: j + 1])
                        lines += piece.endswith("\n")
                        features.append(fed[j])
                        labels.append(task.right_so_far(problem, text, ended))
                        groups.append(group + b)
                        steps.append(lines)
                    right += int(task.verify(problem, policy.decode(tokens)))
            group += len(batch)
            counts = answers.setdefault(num_steps, [0, 0])
            counts[0] += len(batch) * args.samples
            counts[1] += right
            print(
                f"T={num_steps}: problems {first + 1}-{first + len(batch)}, "
                f"{len(batch) * args.samples} answers, "
                f"{right} right, {len(labels)} prefixes so far, {time.perf_counter() - began:.0f} s",
                flush=True,
            )
    return {
        "X": np.array(features, dtype=np.float64),
        "y": np.array(labels),
        "group": np.array(groups),
        "step": np.array(steps),
        "problems": [problem for problems in problems_by_level.values() for problem in problems],
        "answers": {t: {"answers": n, "right": r, "rate": r / n} for t, (n, r) in answers.items()},
    }


def fit_logistic(X: np.ndarray, y: np.ndarray, penalty: float, iterations: int = 50) -> np.ndarray:
    """Newton's method, with step halving, for ``min_theta sum log-loss + penalty/2 |w|^2`` (the intercept
    unpenalised); ``X`` has a column of ones last. Returns ``theta = (w, c)``."""
    ridge = np.full(X.shape[1], penalty)
    ridge[-1] = 0.0

    def objective(theta: np.ndarray) -> float:
        z = X @ theta
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(ridge * theta**2))

    theta = np.zeros(X.shape[1])
    current = objective(theta)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(X @ theta)))
        gradient = X.T @ (p - y) + ridge * theta
        hessian = (X * (p * (1 - p))[:, None]).T @ X + np.diag(ridge) + 1e-9 * np.eye(X.shape[1])
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        while scale > 1e-6 and objective(theta - scale * step) > current:
            scale /= 2
        theta = theta - scale * step
        previous, current = current, objective(theta)
        if previous - current < 1e-10 * max(abs(current), 1.0):
            break
    return theta


def scores(y: np.ndarray, z: np.ndarray) -> dict[str, float]:
    """Log loss (nats), accuracy at 1/2 and the AUC (rank statistic) of logits ``z`` for labels ``y``."""
    log_p = -np.logaddexp(0.0, -z)
    log_q = -np.logaddexp(0.0, z)
    loss = float(-np.mean(y * log_p + (1 - y) * log_q))
    order = np.argsort(z, kind="stable")
    ranks = np.empty(len(z))
    ranks[order] = np.arange(1, len(z) + 1)
    positives = y == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    auc = (
        (ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
        if n_pos and n_neg
        else float("nan")
    )
    return {"log_loss": loss, "accuracy": float(np.mean((z > 0) == positives)), "auc": float(auc)}


MAX_THREADS = 1024  # as tiltsmc's CLI: ONNX Runtime starts every thread asked for


def _integer(minimum: int, maximum: Optional[int] = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``minimum..maximum`` (argparse names the option in its refusal)."""
    bounds = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {bounds}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected an integer {bounds}, got {text}")
        return value

    return parse


def _real(minimum: float, open_low: bool) -> Callable[[str], float]:
    """An argparse type: a finite number > ``minimum`` (``open_low``) or >= ``minimum``."""
    what = f"a finite number {'>' if open_low else '>='} {minimum:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (open_low and value == minimum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The script's options, each checked as it is parsed (``check_arguments`` checks the folders)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=default_model_dir(), help="converted model folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the policy + value graph")
    parser.add_argument(
        "--levels",
        type=_integer(1, task.MAX_COUNTING_STEPS),
        nargs="+",
        default=[2, 4, 6, 8],
        help=f"chain lengths T (1 to {task.MAX_COUNTING_STEPS})",
    )
    parser.add_argument("--problems", type=_integer(1), default=24, help="training problems per length")
    parser.add_argument("--held-out", type=_integer(1), default=8, help="held-out problems per length")
    parser.add_argument("--samples", type=_integer(1), default=8, help="rollouts per problem")
    parser.add_argument("--batch", type=_integer(1), default=8, help="problems per batch (x samples rows)")
    parser.add_argument(
        "--temperature", type=_real(0.0, True), default=0.7, help="the policy's sampling temperature"
    )
    parser.add_argument(
        "--penalties",
        type=_real(0.0, False),
        nargs="+",
        default=[0.1, 1.0, 3.0, 10.0, 30.0, 100.0],
        help="L2 penalties the cross-validation chooses from",
    )
    parser.add_argument("--threads", type=_integer(1, MAX_THREADS), default=2)
    parser.add_argument("--seed", type=_integer(0), default=1)
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The checks argparse's types cannot make, before any work (the rollouts take 10-30 minutes, and the
    head is written at the end): ``--model`` holds ``model.onnx`` and a ``config.json`` with the hidden
    size (returned), ``--out`` can be written and is not ``--model``, and ``--problems`` plus ``--held-out``
    distinct chains of a length exist. Refusals go to ``parser.error`` (status 2), naming the option."""
    if args.problems + args.held_out > COUNTING_CHAINS:
        parser.error(
            f"--problems, --held-out: {args.problems} + {args.held_out} distinct problems of a length asked "
            f"for, there are {COUNTING_CHAINS} counting chains of each length"
        )
    if not (args.model / "model.onnx").is_file():
        parser.error(f"--model: no model.onnx in {args.model} (scripts/get_smollm2.py --out DIR)")
    try:
        width = json.loads((args.model / "config.json").read_text())["hidden_size"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        parser.error(f"--model: cannot read the hidden size from {args.model / 'config.json'}: {error!r}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        parser.error(f"--model: config.json's hidden_size must be an integer >= 1, got {width!r}")
    out = args.out
    if out.exists() and not out.is_dir():
        parser.error(f"--out: {out} exists and is not a folder")
    if out.exists() and out.resolve() == args.model.resolve():
        parser.error(f"--out: {out} is the --model folder; the head goes to a folder of its own")
    existing = out
    while not existing.exists():  # the folder is created at the end, with its missing parents
        existing = existing.parent if existing.parent != existing else Path(".")
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"--out: cannot create or write {out} ({existing} is not a writable folder)")
    return width


def main(argv: Optional[list[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    width = check_arguments(parser, args)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="smollm2-hidden-") as scratch:
        hidden_dir = Path(scratch)
        with_head(args.model, hidden_dir, np.zeros(width), 0.0, hidden_output=True)
        train_problems, held_problems = split_problems(args.levels, args.problems, args.held_out, args.seed)
        train = rollouts(args, hidden_dir, train_problems, 1)
        held = rollouts(args, hidden_dir, held_problems, 2)
    ones = np.ones((len(train["y"]), 1))
    mean, sd = train["X"].mean(0), train["X"].std(0) + 1e-6
    X = np.hstack([(train["X"] - mean) / sd, ones])
    X_held = np.hstack([(held["X"] - mean) / sd, np.ones((len(held["y"]), 1))])
    folds = cross_validation_folds(train["problems"], train["group"])
    chosen, best = args.penalties[0], np.inf
    for penalty in args.penalties:
        loss = 0.0
        for k in range(FOLDS):
            if not np.any(folds == k):
                continue
            theta = fit_logistic(X[folds != k], train["y"][folds != k], penalty)
            loss += scores(train["y"][folds == k], X[folds == k] @ theta)["log_loss"] * np.sum(folds == k)
        print(f"penalty {penalty:g}: cross-validated log loss {loss / len(folds):.4f}", flush=True)
        if loss < best:
            chosen, best = penalty, loss
    theta = fit_logistic(X, train["y"], chosen)
    weight = theta[:-1] / sd
    bias = float(theta[-1] - np.dot(theta[:-1], mean / sd))
    base_rate = float(np.clip(train["y"].mean(), 1e-6, 1 - 1e-6))
    held_scores = scores(held["y"], X_held @ theta)
    constant = scores(held["y"], np.full(len(held["y"]), np.log(base_rate / (1 - base_rate))))
    by_step = {}
    for t in np.unique(held["step"]):
        mask = held["step"] == t
        by_step[int(t)] = {
            "prefixes": int(mask.sum()),
            "right": float(held["y"][mask].mean()),
            **scores(held["y"][mask], X_held[mask] @ theta),
        }
    print(f"held out: {held_scores} (constant {constant})", flush=True)
    with_head(args.model, args.out, weight, bias, hidden_output=False)
    report = {
        "model": str(args.model),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "hidden_size": width,
        "penalty": chosen,
        "train": {
            "answers_by_T": train["answers"],
            "prefixes": len(train["y"]),
            "right": float(train["y"].mean()),
            "problems": len(set(train["problems"])),
        },
        "held_out": {
            "answers_by_T": held["answers"],
            "prefixes": len(held["y"]),
            "problems": len(set(held["problems"])),
            "right": float(held["y"].mean()),
            **held_scores,
            "constant": constant,
            "by_step": by_step,
        },
        "seconds": time.perf_counter() - began,
        "head": {"weight": weight.tolist(), "bias": bias, "output": VALUE, "kind": "logit"},
    }
    (args.out / "value_head.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out} in {report['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
