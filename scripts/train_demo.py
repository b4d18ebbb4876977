#!/usr/bin/env python3
"""Train and export the bundled demo models: an arithmetic-chain policy and its process reward model.

Stages (each reads the previous stage's output from ``--work``; ``all`` runs them in order):

1. ``policy``   a small Llama-style decoder (grouped-query attention, character tokenizer) trained on
   solutions written by a *noisy* solver: a line with a carry or borrow is wrong with probability
   ``P_ERROR_CARRY`` (mostly the forgotten carry, ``±10``), any other line with ``P_ERROR_PLAIN``
   (``±1``); a wrong value is carried on to the next line. The trained model imitates that solver
   (plus its own capacity errors), so it reasons imperfectly and its all-correct rate falls with ``T``.
2. ``rollouts`` the trained policy's own solutions, sampled exactly from ``softmax(logits)``, labelled by
   the exact verifier (``tiltsmc.tasks.arithmetic.verify``).
3. ``prm``      a Qwen2-style token classifier with one logit, trained by binary cross-entropy at every
   step boundary (the newline ending the prompt and each line) against the rollout's outcome: a Monte
   Carlo target whose conditional mean given the prefix is ``V*_t``, so the model is an approximate
   ``V*`` (``sigmoid(logit)``).
4. ``export``   both models through optimum's ONNX exporter (``text-generation-with-past`` for the policy,
   ``token-classification`` for the reward model; validated against PyTorch), with the tokenizer, into
   ``--out`` (default ``python/tiltsmc/tasks/arithmetic_models``), plus ``training.json`` (settings,
   versions, measured error rates).
5. ``joint``    (also run by ``export``) ``--out/joint``: the exported policy's graph with the PRM's head in
   it (output ``value``), built with onnx alone from the two exports (:func:`export_joint`), so the demo
   runs one trunk per step; ``python scripts/train_demo.py joint`` needs only onnx and numpy.
6. ``joint-gqa`` (also run by ``export``) ``--out/joint-gqa``: the same graph in ONNX Runtime's
   GroupQueryAttention layout (:func:`export_joint_gqa`; the trunk rewritten by
   ``scripts/make_gqa_llama.py``), rows right-padded and the KV cache written in place; onnx alone too.

Everything is seeded (``--seed``); on the CPU, with the same package versions, a rerun gives the same
models. It needs torch, transformers, optimum-onnx, onnx and tokenizers (none is a runtime dependency of
tiltsmc); use the throw-away environment described in scripts/make_fixtures.py::

    /tmp/fixenv/bin/python scripts/train_demo.py all            # about 25 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "python" / "tiltsmc" / "tasks" / "arithmetic_models"

# The task module needs only NumPy: load it by path, without importing tiltsmc (and its C++ core).
_spec = importlib.util.spec_from_file_location("arithmetic", REPO / "python/tiltsmc/tasks/arithmetic.py")
assert _spec is not None and _spec.loader is not None
task = importlib.util.module_from_spec(_spec)
sys.modules["arithmetic"] = task
_spec.loader.exec_module(task)

P_ERROR_CARRY = 0.4
P_ERROR_PLAIN = 0.05
P_FORGOT_CARRY = 0.7  # share of carry errors that drop the carry (±10); the rest are ±1 slips
MAX_POSITIONS = 256
TOKENS_PER_BATCH = 8192
PRM_LR = 0.05


# --------------------------------------------------------------------------- tokenizer and data


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(task.VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token a character
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<pad>", "<eos>", "<unk>"])
    return tok


def save_tokenizer(tok, path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    ).save_pretrained(path)


def carries(before: int, sign: str, digit: int) -> bool:
    units = before % 10
    return units + digit >= 10 if sign == "+" else units - digit < 0


def noisy_solution(problem, rng: np.random.Generator) -> str:
    """A solution by the noisy solver (see the module docstring); values are written modulo 100."""
    lines, value = [], problem.start
    for t, (sign, digit) in enumerate(problem.operations):
        right = (value + digit if sign == "+" else value - digit) % 100
        result = right
        if carries(value, sign, digit):
            if rng.random() < P_ERROR_CARRY:
                if rng.random() < P_FORGOT_CARRY:
                    result = (right + (-10 if sign == "+" else 10)) % 100
                else:
                    result = (right + int(rng.choice((-1, 1)))) % 100
        elif rng.random() < P_ERROR_PLAIN:
            result = (right + int(rng.choice((-1, 1)))) % 100
        lines.append(task.format_line(t, value, sign, digit, result))
        value = result
    return "\n".join(lines)


def encode(text: str) -> list[int]:
    index = {t: i for i, t in enumerate(task.VOCAB)}
    return [index[c] for c in text]


def policy_batch(rng: np.random.Generator):
    """Token ids and labels (prompt positions masked) of one batch; every problem in it has the same T."""
    import torch

    num_steps = int(rng.integers(1, task.MAX_STEPS + 1))
    length = len(task.make_problems(num_steps, 1, rng)[0].prompt) + 10 * num_steps
    size = max(8, TOKENS_PER_BATCH // length)
    ids, labels = [], []
    for problem in task.make_problems(num_steps, size, rng):
        prompt = encode(problem.prompt)
        solution = [*encode(noisy_solution(problem, rng)), task.EOS_ID]
        ids.append(prompt + solution)
        labels.append([-100] * len(prompt) + solution)
    return torch.tensor(ids), torch.tensor(labels)


# --------------------------------------------------------------------------- models


def policy_model():
    import transformers as tf

    config = tf.LlamaConfig(
        vocab_size=len(task.VOCAB),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=task.EOS_ID,
        eos_token_id=task.EOS_ID,
        pad_token_id=task.PAD_ID,
    )
    return tf.LlamaForCausalLM(config)


def prm_module(policy_dir: Path):
    """The reward model: the trained policy's decoder, frozen, and a learned logistic head.

    At each position the head reads the policy's last hidden state and two error features computed in
    the graph from the policy's own predictions: ``k`` = the number of generated tokens (after the
    prompt's newline) that differ from the policy's most likely token at that point, as ``log(1 + k)``
    and ``[k > 0]``. The policy knows the arithmetic (its most likely digit is the right one; it writes a
    wrong one by sampling its imitation of the noisy solver), so a written digit it would not have
    picked first marks a likely mistake. Only the head (hidden size + 2 weights and a bias) is trained,
    by binary cross-entropy against the rollouts' outcomes. A Qwen2 token classifier trained end to end
    on the same targets, from scratch or from the policy's weights, did not learn to spot a wrong line
    within a 2-core training budget; its values moved with the position only.
    """
    import torch
    from transformers import LlamaForCausalLM

    newline = task.VOCAB.index("\n")

    class Module(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.policy = LlamaForCausalLM.from_pretrained(policy_dir).eval()
            for parameter in self.policy.parameters():
                parameter.requires_grad_(False)
            self.head = torch.nn.Linear(self.policy.config.hidden_size + 2, 1)

        def features(self, input_ids, attention_mask):
            out = self.policy(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            hidden = out.hidden_states[-1]
            predicted = out.logits.argmax(-1)
            differs = (predicted[:, :-1] != input_ids[:, 1:]) & (attention_mask[:, 1:] > 0)
            differs = torch.cat([torch.zeros_like(differs[:, :1]), differs], dim=1)
            is_newline = input_ids == newline
            generated = (torch.cumsum(is_newline.long(), dim=1) - is_newline.long()) > 0
            count = torch.cumsum((differs & generated).float(), dim=1)
            return torch.cat([hidden, torch.log1p(count)[..., None], (count > 0).float()[..., None]], dim=-1)

        def forward(self, input_ids, attention_mask):
            return self.head(self.features(input_ids, attention_mask))  # (batch, seq, 1) logits

    return Module()


def schedule(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# --------------------------------------------------------------------------- stages


def train_policy(work: Path, seed: int, steps: int) -> None:
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 1])
    model = policy_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.98))
    began, smoothed = time.time(), None
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = schedule(step, steps, 3e-3)
        ids, labels = policy_batch(rng)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            print(f"policy step {step:5d}  loss {smoothed:.4f}  {time.time() - began:6.0f}s", flush=True)
    model.eval().save_pretrained(work / "policy")
    model.generation_config.save_pretrained(work / "policy")
    save_tokenizer(build_tokenizer(), work / "policy")


def sample_solutions(model, problems, rng_seed: int) -> list[str]:
    """The policy's own solutions, drawn exactly from softmax(logits) (no top-k/top-p), one per problem."""
    import torch

    torch.manual_seed(rng_seed)
    prompt = torch.tensor([encode(p.prompt) for p in problems])
    steps = problems[0].num_steps
    with torch.no_grad():
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            max_new_tokens=10 * steps + 2,
            eos_token_id=task.EOS_ID,
            pad_token_id=task.PAD_ID,
        )
    texts = []
    for row in out[:, prompt.shape[1] :].tolist():
        if task.EOS_ID in row:
            row = row[: row.index(task.EOS_ID)]
        texts.append("".join(task.VOCAB[i] for i in row if i >= 3))
    return texts


def line_errors(problem, text: str) -> tuple[int, int, bool]:
    """(wrong lines, lines checked, well formed): a line is wrong when its result is not its own
    ``before ± digit`` (so an earlier error is not counted twice)."""
    lines = text.split("\n")
    wrong, checked, formed = 0, 0, len(lines) == problem.num_steps
    for t, line in enumerate(lines[: problem.num_steps]):
        sign, digit = problem.operations[t]
        try:
            label, rest = line.split(":")
            before, result = int(rest[:2]), int(rest.split("=")[1])
            ok_form = label == task.LABELS[t] and rest[2] == sign and int(rest[3]) == digit
        except (ValueError, IndexError):
            formed = False
            continue
        formed &= ok_form
        checked += 1
        wrong += result != (before + digit if sign == "+" else before - digit) % 100
    return wrong, checked, formed


def evaluate_policy(work: Path, seed: int, per_level: int = 256) -> dict:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(work / "policy").eval()
    report = {}
    for steps in (1, 2, 4, 8, 12, 16):
        problems = task.make_problems(steps, per_level, np.random.default_rng([seed, 2, steps]))
        texts = sample_solutions(model, problems, seed + steps)
        checks = np.array([line_errors(p, x) for p, x in zip(problems, texts)])
        counts, formed = checks[:, :2], checks[:, 2].mean()
        correct = np.mean([task.verify(p, x) for p, x in zip(problems, texts)])
        expected = np.mean(
            [
                np.prod(
                    [
                        1 - (P_ERROR_CARRY if carries(v, s, d) else P_ERROR_PLAIN)
                        for v, (s, d) in zip(p.values, p.operations)
                    ]
                )
                for p in problems
            ]
        )
        report[str(steps)] = {
            "line_error_rate": float(counts[:, 0].sum() / max(1, counts[:, 1].sum())),
            "well_formed": float(formed),
            "all_correct": float(correct),
            "noisy_solver_all_correct": float(expected),
        }
        print(f"T={steps:2d}  {report[str(steps)]}", flush=True)
    return report


def make_rollouts(work: Path, seed: int, per_level: int) -> None:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(work / "policy").eval()
    records, began = [], time.time()
    for steps in range(1, task.MAX_STEPS + 1):
        rng = np.random.default_rng([seed, 3, steps])
        for chunk in range(0, per_level, 256):
            problems = task.make_problems(steps, min(256, per_level - chunk), rng)
            texts = sample_solutions(model, problems, seed * 1000 + steps * 100 + chunk // 256)
            for problem, text in zip(problems, texts):
                records.append({"prompt": problem.prompt, "text": text, "reward": task.verify(problem, text)})
        rate = np.mean([r["reward"] for r in records if r["prompt"].count(" ") == steps])
        print(
            f"rollouts T={steps:2d}: {per_level} solutions, {rate:.3f} correct  {time.time() - began:5.0f}s"
        )
    (work / "rollouts.json").write_text(json.dumps(records))


def prm_examples(records: list[dict]) -> list[tuple[list[int], list[int], float]]:
    """(ids, boundary positions, outcome): the boundaries are the newlines ending the prompt and each line."""
    newline = task.VOCAB.index("\n")
    examples = []
    for record in records:
        ids = encode(record["prompt"] + record["text"])
        boundaries = [i for i, token in enumerate(ids) if token == newline]
        examples.append((ids, boundaries, float(record["reward"])))
    return examples


def train_prm(work: Path, seed: int, steps: int) -> None:
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 4])
    examples = prm_examples(json.loads((work / "rollouts.json").read_text()))
    model = prm_module(work / "policy")
    # The backbone is frozen: compute every boundary's features once, then fit the head.
    features, targets = [], []
    began = time.time()
    by_length = sorted(examples, key=lambda e: len(e[0]))
    with torch.no_grad():
        for start in range(0, len(by_length), 256):
            items = by_length[start : start + 256]
            width = max(len(ids) for ids, _, _ in items)
            ids = torch.full((len(items), width), task.PAD_ID)
            mask = torch.zeros((len(items), width), dtype=torch.long)
            for row, (tokens, _, _) in enumerate(items):
                ids[row, : len(tokens)] = torch.tensor(tokens)
                mask[row, : len(tokens)] = 1
            values = model.features(ids, mask)
            for row, (_, boundaries, outcome) in enumerate(items):
                features.append(values[row, boundaries])
                targets.append(torch.full((len(boundaries),), outcome))
    print(f"prm features of {len(examples)} rollouts: {time.time() - began:.0f}s", flush=True)
    order = torch.from_numpy(rng.permutation(len(features)))
    held_out = set(order[:2000].tolist())
    train_x = torch.cat([f for i, f in enumerate(features) if i not in held_out])
    train_y = torch.cat([t for i, t in enumerate(targets) if i not in held_out])
    test_x = torch.cat([f for i, f in enumerate(features) if i in held_out])
    test_y = torch.cat([t for i, t in enumerate(targets) if i in held_out])
    optimizer = torch.optim.Adam(model.head.parameters(), lr=PRM_LR)
    for step in range(steps):  # full-batch: the head is a logistic regression
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model.head(train_x)[:, 0], train_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"prm step {step:5d}  loss {loss.item():.4f}", flush=True)
    with torch.no_grad():
        held = torch.nn.functional.binary_cross_entropy_with_logits(model.head(test_x)[:, 0], test_y).item()
        base = torch.nn.functional.binary_cross_entropy(
            torch.full_like(test_y, train_y.mean()), test_y
        ).item()
    print(f"prm held-out BCE {held:.4f} (a constant at the base rate: {base:.4f})")
    torch.save(model.head.state_dict(), work / "prm_head.pt")
    (work / "prm_eval.json").write_text(json.dumps({"held_out_bce": held, "base_rate_bce": base}))


def export_prm(work: Path, dest: Path) -> None:
    """The reward model as one ONNX graph: input_ids, attention_mask -> logits (batch, seq, 1)."""
    import torch

    model = prm_module(work / "policy")
    model.head.load_state_dict(torch.load(work / "prm_head.pt"))
    model.eval()
    ids = torch.tensor([encode("57 a+8 b-3\na:57+8=65\n"), encode("57 a+8 b-3\na:57+8=55\n")])
    mask = torch.ones_like(ids)
    dest.mkdir(parents=True)
    torch.onnx.export(
        model,
        (ids, mask),
        str(dest / "model.onnx"),
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"},
            "logits": {0: "batch", 1: "sequence"},
        },
        opset_version=17,
        dynamo=True,
    )
    import onnx
    import onnxruntime

    graph = onnx.load(str(dest / "model.onnx"))  # one self-contained file: weights inside the graph
    for extra in dest.glob("model.onnx*"):
        extra.unlink()
    onnx.save(graph, str(dest / "model.onnx"), save_as_external_data=False)
    session = onnxruntime.InferenceSession(str(dest / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(ids, mask).numpy()
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    assert np.allclose(got, expected, atol=1e-4), np.abs(got - expected).max()
    print(
        f"prm: ONNX matches PyTorch to {np.abs(got - expected).max():.2e}; "
        f"values {1 / (1 + np.exp(-got[:, -1, 0]))}"
    )
    (dest / "config.json").write_text(
        json.dumps(
            {"model_type": "tiltsmc-prm", "vocab_size": len(task.VOCAB), "pad_token_id": task.PAD_ID},
            indent=1,
        )
    )
    save_tokenizer(build_tokenizer(), dest)


def export(work: Path, out: Path, seed: int, report: dict) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from optimum.exporters.onnx import main_export

    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # the policy through optimum's exporter
        main_export(
            str(work / "policy"),
            tmp,
            task="text-generation-with-past",
            device="cpu",
            do_validation=True,
            library_name="transformers",
        )
        dest = out / "policy"
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir()
        for f in sorted(Path(tmp).iterdir()):
            shutil.copy2(f, dest / f.name)
    print(f"wrote {dest}: {', '.join(sorted(p.name for p in dest.iterdir()))}")
    if (out / "prm").exists():
        shutil.rmtree(out / "prm")
    export_prm(work, out / "prm")
    import importlib.metadata as md

    versions = {}
    for package in ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "tokenizers"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    (out / "training.json").write_text(
        json.dumps({"seed": seed, "versions": versions, **report}, indent=1) + "\n"
    )


def write_beside_policy(out: Path, name: str, model) -> None:
    """``model`` checked and saved as ``out/name/model.onnx``, with the policy's other files (tokenizer,
    configs) beside it."""
    import onnx

    onnx.checker.check_model(model)
    dest = out / name
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir()
    onnx.save(model, str(dest / "model.onnx"))
    for item in sorted((out / "policy").iterdir()):
        if item.name != "model.onnx":
            shutil.copy2(item, dest / item.name)
    print(f"wrote {dest}: {', '.join(sorted(p.name for p in dest.iterdir()))}")


def error_count(op, const, last, fed_f, constants):
    """The PRM's error count over a call's positions, as ONNX nodes (``op`` and ``const`` make them): from
    the state before the call, ``last`` ``(batch, 1, 3)`` = ``(k, the trunk's prediction, newline seen)``,
    and which positions are the row's own (``fed_f``, ``(batch, seq)``), ``differs_j = fed_j * [pred_{j-1}
    != token_j] * seen_{j-1}`` and ``k_j = k + sum_{i <= j} differs_i``. Returns the state's three parts
    (each ``(batch, 1)``), and ``k_j``, the trunk's predictions, whether a newline came before each
    position, and each position's newline (fed)."""
    from onnx import TensorProto

    zero, one, two, last_one, f0 = constants

    def component(k, name):
        ends = [const(f"k{k}", np.array([k], np.int64)), const(f"k{k}_end", np.array([k + 1], np.int64))]
        return op("Squeeze", [op("Slice", [last, *ends, two], name + "3"), two], name)

    count0, pred0, seen0 = component(0, "count0"), component(1, "pred0"), component(2, "seen0")
    preds = op(
        "Cast", [op("ArgMax", ["logits"], "argmax", axis=2, keepdims=0)], "preds", to=TensorProto.FLOAT
    )
    before = op(
        "Concat", [pred0, op("Slice", [preds, zero, last_one, one], "preds_head")], "pred_before", axis=1
    )
    tokens = op("Cast", ["input_ids"], "tokens", to=TensorProto.FLOAT)
    newline = op(
        "Equal", ["input_ids", const("newline_id", np.array(task.VOCAB.index("\n"), np.int64))], "is_nl"
    )
    newline = op("Mul", [op("Cast", [newline], "is_nl_f", to=TensorProto.FLOAT), fed_f], "newline_fed")
    earlier = op("CumSum", [newline, one], "newlines_before", exclusive=1)
    seen = op("Max", [seen0, op("Cast", [op("Greater", [earlier, f0], "any_before")], "seen_in",
                                to=TensorProto.FLOAT)], "seen")  # fmt: skip
    unpredicted = op("Not", [op("Equal", [before, tokens], "as_predicted")], "unpredicted")
    differs = op("Cast", [unpredicted], "differs_f", to=TensorProto.FLOAT)
    differs = op("Mul", [op("Mul", [fed_f, differs], "differs_fed"), seen], "differs")
    count = op("Add", [count0, op("CumSum", [differs, one], "differs_sum")], "count")
    return (count0, pred0, seen0), (count, preds, seen, newline)


def export_joint(out: Path) -> None:
    """``out/joint``: the exported policy's graph with the PRM's head in it, so one run a step gives the
    next-token logits and the PRM's logit of the prefix (output ``value``, ``(batch, seq, 1)``).

    Built from ``out/policy/model.onnx`` and the head's weights in ``out/prm/model.onnx`` (its ``(66, 1)``
    MatMul initializer and ``head.bias``) with onnx alone. The head reads the trunk's last hidden state (the
    LM head's input) and the error count ``k`` of :func:`prm_module`, a running sum over positions, which a
    cached decoder must carry from run to run: it rides in one more KV-cache layer,
    ``past_key_values.{L}.key`` / ``.value`` (the trunk's geometry; columns follow the attention mask as
    the others do), whose last column holds ``(k, the trunk's most likely next token, whether a newline
    has been seen)`` after every position. A fed position ``j`` then has ``differs_j = mask_j * [pred_{j-1}
    != token_j] * seen_{j-1}`` and ``k_j = k_{j-1} + differs_j``; a masked column (a particle sitting out)
    carries the state unchanged, so the last column always holds it. The values equal the separate PRM's
    (checked below and in tests/test_reward_cache.py)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    policy = onnx.load(str(out / "policy" / "model.onnx"))
    prm = onnx.load(str(out / "prm" / "model.onnx"))
    weights = {i.name: numpy_helper.to_array(i) for i in prm.graph.initializer}
    (head_weight,) = [a for a in weights.values() if a.shape == (66, 1)]
    graph = policy.graph
    (lm_head,) = [n for n in graph.node if "logits" in n.output]
    hidden = lm_head.input[0]
    layer = 1 + max(int(i.name.split(".")[1]) for i in graph.input if i.name.startswith("past_key_values."))
    past, present = f"past_key_values.{layer}", f"present.{layer}"
    (reference,) = [i for i in graph.input if i.name == "past_key_values.0.key"]
    heads = reference.type.tensor_type.shape.dim[1].dim_value
    head_dim = reference.type.tensor_type.shape.dim[3].dim_value
    for kind in ("key", "value"):
        entry = onnx.ValueInfoProto()
        entry.CopyFrom(reference)
        entry.name = f"{past}.{kind}"
        graph.input.append(entry)
    nodes = []

    def const(name, value):
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), "error_state/" + name))
        return "error_state/" + name

    def op(kind, inputs, name, **attributes):
        output = name if name in ("value", f"{present}.key", f"{present}.value") else "error_state/" + name
        nodes.append(helper.make_node(kind, inputs, [output], name="/error_state/" + name, **attributes))
        return output

    def ints(*values):
        return np.array(values, dtype=np.int64)

    zero, one, two, three = const("0", ints(0)), const("1", ints(1)), const("2", ints(2)), const("3", ints(3))
    last_one, end = const("-1", ints(-1)), const("end", ints(1 << 62))
    f0, f1 = const("f0", np.array(0.0, np.float32)), const("f1", np.array(1.0, np.float32))
    shape = op("Shape", ["input_ids"], "shape")
    width, batch = op("Slice", [shape, one, two], "width"), op("Slice", [shape, zero, one], "batch")
    mask_new = op("Slice", ["attention_mask", op("Neg", [width], "neg_width"), end, one], "mask_new")
    fed = op("Cast", [mask_new], "fed", to=TensorProto.BOOL)
    fed_f = op("Cast", [mask_new], "fed_f", to=TensorProto.FLOAT)
    # the state before these positions: the past's last column (zeros before any)
    state = op("Squeeze", [op("Slice", [f"{past}.key", zero, one, one], "head0"), one], "past_state")
    state = op("Slice", [state, zero, three, two], "past_state3")
    zeros = op("ConstantOfShape", [op("Concat", [batch, one, three], "zeros_shape", axis=0)], "zeros",
               value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))  # fmt: skip
    last = op("Slice", [op("Concat", [zeros, state], "states", axis=1), last_one, end, one], "last")
    (count0, pred0, seen0), (count, preds, seen, newline) = error_count(
        op, const, last, fed_f, (zero, one, two, last_one, f0)
    )
    columns = [
        op("Unsqueeze", [op("Where", [fed, value, previous], name), two], name + "_column")
        for value, previous, name in (
            (count, count0, "count_kept"),
            (preds, pred0, "pred_kept"),
            (op("Max", [seen, newline], "seen_after"), seen0, "seen_kept"),
        )
    ]
    padding = const("pad", ints(0, 0, 0, 0, 0, head_dim - 3))
    columns = op("Pad", [op("Concat", columns, "columns", axis=2), padding], "columns_padded")
    repeats = const("heads", ints(1, heads, 1, 1))
    columns = op("Tile", [op("Unsqueeze", [columns, one], "columns_head"), repeats], "columns_heads")
    op("Concat", [f"{past}.key", columns], f"{present}.key", axis=2)
    op("Concat", [f"{past}.value", columns], f"{present}.value", axis=2)
    log1p = op("Log", [op("Add", [count, f1], "count_plus_1")], "log1p")
    positive = op("Cast", [op("Greater", [count, f0], "count_positive")], "positive", to=TensorProto.FLOAT)
    log1p = op("Unsqueeze", [log1p, two], "log1p_feature")
    positive = op("Unsqueeze", [positive, two], "positive_feature")
    features = op("Concat", [hidden, log1p, positive], "features", axis=2)
    head = op("MatMul", [features, const("weight", head_weight.astype(np.float32))], "head")
    op("Add", [head, const("bias", weights["head.bias"].astype(np.float32))], "value")
    graph.node.extend(nodes)
    (present_reference,) = [o for o in graph.output if o.name == "present.0.key"]
    for kind in ("key", "value"):
        entry = onnx.ValueInfoProto()
        entry.CopyFrom(present_reference)
        entry.name = f"{present}.{kind}"
        graph.output.append(entry)
    graph.output.append(
        helper.make_tensor_value_info("value", TensorProto.FLOAT, ["batch_size", "sequence_length", 1])
    )
    write_beside_policy(out, "joint", policy)


def export_joint_gqa(out: Path) -> None:
    """``out/joint-gqa``: :func:`export_joint`'s graph in ONNX Runtime's GroupQueryAttention layout, rows
    right-padded and the KV cache writable in place (``OnnxCausalLM(cache_in_place=True)``).

    The trunk is ``out/policy`` rewritten by ``scripts/make_gqa_llama.py`` (the same weights). The error
    count ``k`` rides in one more cache layer, as in :func:`export_joint`, but written by a
    GroupQueryAttention node of its own (its keys and values are the state columns, its attention output
    unused), so the operator writes it at each row's own columns, in place like the others: after a row's
    ``j``-th token its column ``j`` holds ``(k, the trunk's most likely next token, whether a newline has
    been seen)``. A call of ``S`` positions reads the state before them at column ``L - S - 1`` (``L`` =
    the row's ones in the mask; none where that is negative: a prompt), and its position ``j`` is the row's
    own where ``j < min(L, S)`` (a right-padded prompt's padding is not). A row that sits out a step is fed
    padding at its next column, which the policy's mask does not keep: its state column there is written,
    then overwritten by its next token. The values equal :func:`export_joint`'s (checked below)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import make_gqa_llama

    config = json.loads((out / "policy" / "config.json").read_text())
    source = onnx.load(str(out / "policy" / "model.onnx"))
    trunk = make_gqa_llama.build(config, make_gqa_llama.weights_of(source, int(config["num_hidden_layers"])))
    prm = onnx.load(str(out / "prm" / "model.onnx"))
    weights = {i.name: numpy_helper.to_array(i) for i in prm.graph.initializer}
    (head_weight,) = [a for a in weights.values() if a.shape == (66, 1)]
    graph = trunk.graph
    layer = int(config["num_hidden_layers"])
    kv_heads = int(config["num_key_value_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"]))
    past, present = f"past_key_values.{layer}", f"present.{layer}"
    nodes = []

    def const(name, value):
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), "error_state/" + name))
        return "error_state/" + name

    def op(kind, inputs, name, outputs=None, domain="", **attributes):
        output = name if name == "value" else "error_state/" + name
        names = outputs or [output]
        nodes.append(helper.make_node(kind, inputs, names, name="/error_state/" + name, domain=domain,
                                      **attributes))  # fmt: skip
        return names[0]

    def ints(*values):
        return np.array(values, dtype=np.int64)

    zero, one, two, three = const("0", ints(0)), const("1", ints(1)), const("2", ints(2)), const("3", ints(3))
    last_one = const("-1", ints(-1))
    f0, f1 = const("f0", np.array(0.0, np.float32)), const("f1", np.array(1.0, np.float32))
    shape = op("Shape", ["input_ids"], "shape")
    width, batch = op("Slice", [shape, one, two], "width"), op("Slice", [shape, zero, one], "batch")
    lengths = "lengths"  # the trunk's ReduceSum of the mask, (batch,) int64
    # the position j of this call is the row's own where j < min(L, S)
    own = op("Min", [lengths, width], "own")
    positions = op("Range", [const("r0", np.array(0, np.int64)), op("Squeeze", [width], "width_scalar"),
                           const("r1", np.array(1, np.int64))], "positions")  # fmt: skip
    row_positions = op("Unsqueeze", [positions, zero], "positions_row")
    fed = op("Less", [row_positions, op("Unsqueeze", [own, one], "own_col")], "fed")
    fed_f = op("Cast", [fed], "fed_f", to=TensorProto.FLOAT)
    # the state before: column L - S - 1 of head 0 (a zero column put first: none before a prompt)
    bounds = [
        const("s_start", ints(0, 0, 0)),
        const("s_end", ints(1, 1 << 62, 3)),
        const("s_axes", ints(1, 2, 3)),
    ]
    state_columns = op("Slice", [f"{past}.key", *bounds], "state_columns")  # (B, 1, P, 3)
    padded = op("Pad", [state_columns, const("front", ints(0, 0, 1, 0, 0, 0, 0, 0))], "state_padded")
    index = op("Max", [op("Sub", [lengths, width], "l_minus_s"), zero], "state_index")
    index_shape = op("Concat", [batch, one, one, three], "index_shape", axis=0)
    index = op("Reshape", [index, const("idx_shape", ints(-1, 1, 1, 1))], "index4")
    index = op("Expand", [index, index_shape], "index_b")
    last = op("Reshape", [op("GatherElements", [padded, index], "state_gathered", axis=2),
                          const("state_shape", ints(-1, 1, 3))], "last")  # fmt: skip
    _, (count, preds, seen, newline) = error_count(op, const, last, fed_f, (zero, one, two, last_one, f0))
    state = [
        op("Unsqueeze", [value, two], name)
        for value, name in ((count, "count_column"), (preds, "pred_column"),
                            (op("Max", [seen, newline], "seen_after"), "seen_column"))
    ]  # fmt: skip
    padding = const("pad", ints(0, 0, 0, 0, 0, head_dim - 3))
    state = op("Pad", [op("Concat", state, "columns", axis=2), padding], "columns_padded")  # (B, S, head_dim)
    state = op(
        "Tile", [state, const("heads", ints(1, 1, kv_heads))], "columns_heads"
    )  # (B, S, kv * head_dim)
    query = op("Mul", [state, f0], "no_query")
    op("GroupQueryAttention",
       [query, state, state, f"{past}.key", f"{past}.value", "seqlens_k", "total_sequence_length"],
       "writer", outputs=["error_state/unused", f"{present}.key", f"{present}.value"], domain="com.microsoft",
       num_heads=kv_heads, kv_num_heads=kv_heads)  # fmt: skip
    log1p = op("Log", [op("Add", [count, f1], "count_plus_1")], "log1p")
    positive = op("Cast", [op("Greater", [count, f0], "count_positive")], "positive", to=TensorProto.FLOAT)
    log1p = op("Unsqueeze", [log1p, two], "log1p_feature")
    positive = op("Unsqueeze", [positive, two], "positive_feature")
    features = op("Concat", ["final_norm", log1p, positive], "features", axis=2)
    head = op("MatMul", [features, const("weight", head_weight.astype(np.float32))], "head")
    op("Add", [head, const("bias", weights["head.bias"].astype(np.float32))], "value")
    graph.node.extend(nodes)
    cache = ["batch_size", kv_heads, "past_sequence_length", head_dim]
    for kind in ("key", "value"):
        graph.input.append(helper.make_tensor_value_info(f"{past}.{kind}", TensorProto.FLOAT, cache))
        written = ["batch_size", kv_heads, "total_sequence_length", head_dim]
        graph.output.append(helper.make_tensor_value_info(f"{present}.{kind}", TensorProto.FLOAT, written))
    graph.output.append(
        helper.make_tensor_value_info("value", TensorProto.FLOAT, ["batch_size", "sequence_length", 1])
    )
    write_beside_policy(out, "joint-gqa", trunk)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "stage", choices=("policy", "evaluate", "rollouts", "prm", "export", "joint", "joint-gqa", "all")
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/tiltsmc-demo-train"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy-steps", type=int, default=2000)
    parser.add_argument("--prm-steps", type=int, default=2000)
    parser.add_argument("--rollouts-per-level", type=int, default=2048)
    args = parser.parse_args(argv)
    if args.stage == "joint":  # onnx alone: no training, no torch
        export_joint(args.out)
        return 0
    if args.stage == "joint-gqa":  # onnx alone
        export_joint_gqa(args.out)
        return 0
    import torch

    torch.use_deterministic_algorithms(True)
    args.work.mkdir(parents=True, exist_ok=True)
    report_file = args.work / "report.json"
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    stages = ["policy", "evaluate", "rollouts", "prm", "export"] if args.stage == "all" else [args.stage]
    for stage in stages:
        if stage == "policy":
            train_policy(args.work, args.seed, args.policy_steps)
            report["policy"] = {"steps": args.policy_steps}
        elif stage == "evaluate":
            report["policy_evaluation"] = evaluate_policy(args.work, args.seed)
        elif stage == "rollouts":
            make_rollouts(args.work, args.seed, args.rollouts_per_level)
            report["rollouts_per_level"] = args.rollouts_per_level
        elif stage == "prm":
            train_prm(args.work, args.seed, args.prm_steps)
            report["prm"] = {"steps": args.prm_steps, **json.loads((args.work / "prm_eval.json").read_text())}
        else:
            report["noise"] = {"carry": P_ERROR_CARRY, "plain": P_ERROR_PLAIN, "forgot_carry": P_FORGOT_CARRY}
            export(args.work, args.out, args.seed, report)
            export_joint(args.out)
            export_joint_gqa(args.out)
        report_file.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
