#!/usr/bin/env python3
"""Build (and check) the tiny random-weight ONNX model fixtures under tests/fixtures/models/.

Four fixtures, each in the exact on-disk layout of a Hugging Face ``optimum`` ONNX export:

* ``gpt2-tiny``  GPT2LMHeadModel, exported as ``text-generation-with-past`` (decoder with KV cache).
* ``gpt2-merged-tiny`` the same GPT-2 (same config, seed and weights) in the *merged* decoder layout:
  one ``decoder_model_merged.onnx`` with a boolean ``use_cache_branch`` input (shape (1,)) that picks
  the no-cache branch (False, first call, empty past) or the cached branch (True). This is what
  optimum wrote up to 1.13 (later 1.x with ``legacy=True``); optimum-onnx 0.1 no longer exposes it,
  so the export restores the decoder / decoder-with-past split (see ``_merged_decoder_export``).
* ``llama-tiny`` LlamaForCausalLM with grouped-query attention (4 query heads, 2 KV heads),
  exported as ``text-generation-with-past``.
* ``prm-tiny``   Qwen2ForTokenClassification with one label: a per-position reward head,
  exported as ``token-classification``; ``logits`` has shape (batch, seq, 1).

All share one character-level ``tokenizer.json`` (64 tokens, id 0 ``<|endoftext|>`` is BOS/EOS,
id 1 ``<pad>``, id 2 ``<unk>``). See tests/fixtures/models/README.md for inputs and outputs.

Checking the committed fixtures needs only numpy and onnxruntime (tokenizers optional)::

    python scripts/make_fixtures.py --verify

Regenerating them needs torch, transformers, optimum-onnx, onnx, onnxruntime and tokenizers.
Do it in a throw-away virtual environment so the project's own Python is left alone::

    python3 -m venv /tmp/fixenv && . /tmp/fixenv/bin/activate
    pip install torch==2.13.0 optimum-onnx==0.1.0 onnxruntime tokenizers accelerate
    # (optimum-onnx 0.1.0 pulls optimum 2.1.0, transformers 4.57.x and onnx; accelerate lets
    #  optimum deduplicate GPT-2's tied weights, as in the committed export)
    python scripts/make_fixtures.py            # writes tests/fixtures/models/*
    python scripts/make_fixtures.py --verify   # checks them
    python scripts/make_fixtures.py --only gpt2-merged-tiny   # just one

Generation is deterministic (fixed seeds, CPU, fp32): re-running it with the same package
versions gives byte-identical .onnx files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "fixtures" / "models"

SEED = 20240607
# Larger than the usual 0.02 so that logits vary by O(1) and cache/recompute checks mean something.
INIT_RANGE = 0.3
MAX_POS = 128

SPECIAL_TOKENS = ["<|endoftext|>", "<pad>", "<unk>"]
EOS_ID, PAD_ID, UNK_ID = 0, 1, 2
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 ") + list(".,!?'\"-+*/=():;\n") + list("<>[]#%&_")
VOCAB = SPECIAL_TOKENS + CHARS
VOCAB_SIZE = len(VOCAB)  # 64

FIXTURES = ("gpt2-tiny", "llama-tiny", "prm-tiny", "gpt2-merged-tiny")
# optimum task, layers, and for the decoders KV heads and head dim of the past_key_values tensors;
# "file": the ONNX file kept (default model.onnx); "merged": exported as decoder_model_merged.onnx;
# "same_as": a fixture built from the same torch model (verify checks both give the same outputs)
SPECS = {
    "gpt2-tiny": {"task": "text-generation-with-past", "layers": 2, "kv_heads": 2, "head_dim": 16},
    "llama-tiny": {"task": "text-generation-with-past", "layers": 2, "kv_heads": 2, "head_dim": 8},
    "prm-tiny": {"task": "token-classification", "layers": 2},
    "gpt2-merged-tiny": {
        "task": "text-generation-with-past",
        "layers": 2,
        "kv_heads": 2,
        "head_dim": 16,
        "file": "decoder_model_merged.onnx",
        "merged": True,
        "same_as": "gpt2-tiny",
    },
}


def model_file(out: Path, name: str) -> Path:
    return out / name / SPECS[name].get("file", "model.onnx")


# --------------------------------------------------------------------------- generation


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    assert VOCAB_SIZE == 64 and len(set(VOCAB)) == VOCAB_SIZE
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # one token per character (newline included); unknown characters map to <unk>
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def save_tokenizer(tok, path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MAX_POS,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(path)


def build_model(name: str):
    import torch
    import transformers as tf

    common = dict(bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, initializer_range=INIT_RANGE)
    # Llama and Qwen2 fixtures: the same grouped-query decoder sizes
    gqa_decoder = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POS,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        **common,
    )
    if name in ("gpt2-tiny", "gpt2-merged-tiny"):  # the same config, seed and so weights
        cfg = tf.GPT2Config(
            vocab_size=VOCAB_SIZE, n_positions=MAX_POS, n_embd=32, n_layer=2, n_head=2, n_inner=64, **common
        )
        cls = tf.GPT2LMHeadModel
    elif name == "llama-tiny":
        cfg = tf.LlamaConfig(**gqa_decoder)
        cls = tf.LlamaForCausalLM
    elif name == "prm-tiny":
        cfg = tf.Qwen2Config(num_labels=1, id2label={0: "reward"}, label2id={"reward": 0}, **gqa_decoder)
        cls = tf.Qwen2ForTokenClassification
    else:
        raise ValueError(name)
    torch.manual_seed(SEED)
    model = cls(cfg).eval()
    if name == "prm-tiny":
        # random norm weights too, so the head is not trivially symmetric
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


@contextlib.contextmanager
def _merged_decoder_export(enabled: bool):
    """Make ``main_export`` write the merged decoder (``decoder_model_merged.onnx``, ``use_cache_branch``).

    optimum up to 1.13 (later 1.x with ``legacy=True``) exported a decoder-only model as two graphs,
    ``decoder_model.onnx`` (no past inputs, but ``present.*`` outputs) and ``decoder_with_past_model.onnx``,
    and its post-processing merged them into one graph whose ``If`` node on ``use_cache_branch`` picks the
    branch. optimum-onnx 0.1 exports only the with-past graph, but ``TextDecoderOnnxConfig`` still
    merges (``post_process_exported_models``) and validates both branches against PyTorch when it is
    handed the two sub-models: this restores the two-sub-model split of optimum 1.x for one export.
    """
    if not enabled:
        yield
        return
    import optimum.exporters.utils as exporter_utils
    from optimum.exporters.onnx.constants import ONNX_DECODER_NAME, ONNX_DECODER_WITH_PAST_NAME

    def split(model, config):
        assert config.use_past, "the merged layout needs a -with-past task"
        kwargs = dict(task=config.task, int_dtype=config.int_dtype, float_dtype=config.float_dtype)
        return {
            ONNX_DECODER_NAME: (
                model,
                config.__class__(model.config, use_past=True, use_past_in_inputs=False, **kwargs),
            ),
            ONNX_DECODER_WITH_PAST_NAME: (
                model,
                config.__class__(model.config, use_past=True, use_past_in_inputs=True, **kwargs),
            ),
        }

    original = exporter_utils.get_decoder_models_for_export
    exporter_utils.get_decoder_models_for_export = split
    try:
        yield
    finally:
        exporter_utils.get_decoder_models_for_export = original


def generate(out: Path, names) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from optimum.exporters.onnx import main_export
    from optimum.utils import logging as optimum_logging

    optimum_logging.set_verbosity_info()  # shows optimum's validation against PyTorch

    torch.use_deterministic_algorithms(True)
    tok = build_tokenizer()
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "src"
            model = build_model(name)
            model.save_pretrained(src)
            if model.can_generate():
                model.generation_config.save_pretrained(src)
            save_tokenizer(tok, src)
            exp = Path(tmp) / "onnx"
            torch.manual_seed(SEED)
            with _merged_decoder_export(SPECS[name].get("merged", False)):
                main_export(
                    str(src),
                    str(exp),
                    task=SPECS[name]["task"],
                    device="cpu",
                    do_validation=True,
                    library_name="transformers",
                )
            keep = SPECS[name].get("file", "model.onnx")
            _check_single_file(exp / keep)
            dest = out / name
            if dest.exists():
                shutil.rmtree(dest)
            dest.mkdir(parents=True)
            for f in sorted(exp.iterdir()):
                # the merged export also leaves decoder_model.onnx and decoder_with_past_model.onnx
                if f.suffix == ".onnx" and f.name != keep:
                    continue
                shutil.copy2(f, dest / f.name)
        print(f"wrote {dest}: {', '.join(sorted(p.name for p in dest.iterdir()))}")
    write_manifest(out)


def _check_single_file(path: Path) -> None:
    """The ONNX file holds all its weights (no external data file to ship alongside)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    m = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in _get_all_tensors(m) if uses_external_data(t)]
    assert not external, f"{path.name}: weights stored outside the file: {external[:5]}"


def write_manifest(out: Path) -> None:
    import importlib.metadata as md

    import onnx

    info = {}
    for pkg in ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "tokenizers"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    models = {}
    for name in FIXTURES:
        p = model_file(out, name)
        if not p.exists():
            continue
        m = onnx.load(str(p))
        models[name] = {
            **({"file": p.name} if p.name != "model.onnx" else {}),
            "opset": max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
            "producer": f"{m.producer_name} {m.producer_version}",
            "inputs": [_io(v) for v in m.graph.input],
            "outputs": [_io(v) for v in m.graph.output],
        }
    (out / "manifest.json").write_text(
        json.dumps({"seed": SEED, "versions": info, "models": models}, indent=1) + "\n"
    )


def _io(v):
    from onnx import TensorProto

    t = v.type.tensor_type
    dims = ", ".join(d.dim_param if d.dim_param else str(d.dim_value) for d in t.shape.dim)
    return f"{v.name}: {TensorProto.DataType.Name(t.elem_type).lower()} ({dims})"


# --------------------------------------------------------------------------- verification


def _sess(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _encode(texts, out: Path):
    """Token ids for texts (character level); via the tokenizers library when it is installed."""
    import numpy as np

    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(out / "gpt2-tiny" / "tokenizer.json"))
        ids = [tok.encode(t).ids for t in texts]
        assert tok.get_vocab_size() == VOCAB_SIZE
        assert tok.token_to_id("<|endoftext|>") == EOS_ID
        assert tok.decode(ids[0]) == texts[0].lower()
    except ImportError:
        index = {c: i for i, c in enumerate(VOCAB)}
        ids = [[index.get(c, UNK_ID) for c in t.lower()] for t in texts]
    return [np.asarray(i, dtype=np.int64) for i in ids]


def _left_pad(seqs):
    import numpy as np

    n = max(len(s) for s in seqs)
    ids = np.full((len(seqs), n), PAD_ID, dtype=np.int64)
    mask = np.zeros((len(seqs), n), dtype=np.int64)
    for b, s in enumerate(seqs):
        ids[b, n - len(s) :] = s
        mask[b, n - len(s) :] = 1
    return ids, mask


def _positions(mask):
    import numpy as np

    pos = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)  # what transformers' generate() uses


def _run_decoder(sess, spec, ids, mask, past=None):
    """One decoder call; ``past`` None means an empty cache (past_seq = 0).

    A merged decoder gets ``use_cache_branch`` False with the empty cache, True with a real one.
    """
    import numpy as np

    names = {i.name for i in sess.get_inputs()}
    b = ids.shape[0]
    feed = {"input_ids": ids, "attention_mask": mask}
    if "use_cache_branch" in names:
        feed["use_cache_branch"] = np.array([past is not None])
    if "position_ids" in names:
        feed["position_ids"] = _positions(mask)[:, -ids.shape[1] :]
    for i in range(spec["layers"]):
        for kv in ("key", "value"):
            if past is None:
                arr = np.zeros((b, spec["kv_heads"], 0, spec["head_dim"]), dtype=np.float32)
            else:
                arr = past[f"present.{i}.{kv}"]
            feed[f"past_key_values.{i}.{kv}"] = arr
    outs = sess.run(None, feed)
    return dict(zip([o.name for o in sess.get_outputs()], outs))


def verify_decoder(out: Path, name: str, tol: float) -> float:
    import numpy as np

    spec = SPECS[name]
    sess = _sess(model_file(out, name))
    cfg = json.loads((out / name / "config.json").read_text())
    gen = json.loads((out / name / "generation_config.json").read_text())
    assert cfg["vocab_size"] == VOCAB_SIZE and cfg["eos_token_id"] == EOS_ID and gen["eos_token_id"] == EOS_ID
    ins = [i.name for i in sess.get_inputs()]
    outs = [o.name for o in sess.get_outputs()]
    pkv = [f"past_key_values.{i}.{kv}" for i in range(spec["layers"]) for kv in ("key", "value")]
    prs = [f"present.{i}.{kv}" for i in range(spec["layers"]) for kv in ("key", "value")]
    # optimum orders them input_ids, past_key_values.*, attention_mask, position_ids; match by name
    # (the merged decoder: input_ids, attention_mask, position_ids, past_key_values.*, use_cache_branch)
    flag = ["use_cache_branch"] if spec.get("merged") else []
    assert sorted(ins) == sorted(["input_ids", "attention_mask", "position_ids", *pkv, *flag]), ins
    assert outs == ["logits", *prs], outs
    for i in sess.get_inputs():
        if i.name == "use_cache_branch":
            assert i.type == "tensor(bool)" and i.shape == [1], (i.name, i.type, i.shape)
            continue
        assert i.type == ("tensor(float)" if i.name.startswith("past_") else "tensor(int64)"), (
            i.name,
            i.type,
        )

    worst = 0.0
    texts = ["The cat sat on", "2+2=4, so 3*3="]
    seqs = _encode(texts, out)
    ids, mask = _left_pad(seqs)  # row 0 is left-padded
    b, n = ids.shape
    # 1) prompt with an empty cache
    r1 = _run_decoder(sess, spec, ids, mask)
    assert r1["logits"].shape == (b, n, VOCAB_SIZE), r1["logits"].shape
    assert r1["present.0.key"].shape == (b, spec["kv_heads"], n, spec["head_dim"])
    # 2) three cached single-token steps (greedy), each checked against a full recompute
    past, all_ids, all_mask = r1, ids, mask
    for step in range(3):
        nxt = past["logits"][:, -1].argmax(-1).astype(np.int64)[:, None]
        all_ids = np.concatenate([all_ids, nxt], axis=1)
        all_mask = np.concatenate([all_mask, np.ones((b, 1), np.int64)], axis=1)
        cached = _run_decoder(sess, spec, nxt, all_mask, past)
        full = _run_decoder(sess, spec, all_ids, all_mask)
        assert cached["logits"].shape == (b, 1, VOCAB_SIZE)
        d = float(np.abs(cached["logits"][:, 0] - full["logits"][:, -1]).max())
        for k in prs:
            assert cached[k].shape == (b, spec["kv_heads"], n + step + 1, spec["head_dim"])
            d = max(d, float(np.abs(cached[k] - full[k]).max()))
        worst = max(worst, d)
        past = cached
    # 3) a multi-token chunk on top of a cache (speculative / extend style)
    chunk = np.array([[3, 4, 5], [6, 7, 8]], dtype=np.int64)
    m2 = np.concatenate([mask, np.ones((b, 3), np.int64)], axis=1)
    cached = _run_decoder(sess, spec, chunk, m2, r1)
    full = _run_decoder(sess, spec, np.concatenate([ids, chunk], axis=1), m2)
    worst = max(worst, float(np.abs(cached["logits"] - full["logits"][:, -3:]).max()))
    # 4) the padded row equals the same prompt run alone without padding
    alone = _run_decoder(sess, spec, seqs[0][None], np.ones((1, len(seqs[0])), np.int64))
    worst = max(worst, float(np.abs(alone["logits"][0] - r1["logits"][0, n - len(seqs[0]) :]).max()))
    spread = float(r1["logits"][1].std())
    assert worst <= tol, f"{name}: cached vs recomputed differ by {worst:.3g} > {tol}"
    print(f"{name}: OK  max|cached - recomputed| = {worst:.2e}  (logit std {spread:.2f})")
    same_as = spec.get("same_as")
    if same_as and model_file(out, same_as).exists():
        # built from the same torch model: both graphs give the same logits and cache
        other = _sess(model_file(out, same_as))
        o1 = _run_decoder(other, SPECS[same_as], ids, mask)
        oc = _run_decoder(other, SPECS[same_as], chunk, m2, o1)
        diff = max(
            max(float(np.abs(r1[k] - o1[k]).max()) for k in ["logits", *prs]),
            float(np.abs(cached["logits"] - oc["logits"]).max()),
        )
        assert diff <= tol, f"{name}: differs from {same_as} by {diff:.3g} > {tol}"
        print(f"{name}: OK  max|{name} - {same_as}| = {diff:.2e}  (no-cache call and a cached chunk)")
        worst = max(worst, diff)
    return worst


def verify_prm(out: Path, tol: float) -> float:
    import numpy as np

    name = "prm-tiny"
    sess = _sess(out / name / "model.onnx")
    cfg = json.loads((out / name / "config.json").read_text())
    assert cfg["vocab_size"] == VOCAB_SIZE and cfg["eos_token_id"] == EOS_ID
    ins = [i.name for i in sess.get_inputs()]
    outs = [o.name for o in sess.get_outputs()]
    assert ins == ["input_ids", "attention_mask"], ins
    assert outs == ["logits"], outs
    texts = ["step 1: 2+2=4\nstep 2: 4*3=12\n", "x=3\n"]
    seqs = _encode(texts, out)
    # right padding: scores at real positions must not depend on the padding
    n = max(len(s) for s in seqs)
    ids = np.full((2, n), PAD_ID, dtype=np.int64)
    mask = np.zeros((2, n), dtype=np.int64)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = s
        mask[b, : len(s)] = 1
    logits = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    assert logits.shape == (2, n, 1) and logits.dtype == np.float32, logits.shape
    worst = 0.0
    for b, s in enumerate(seqs):
        alone = sess.run(None, {"input_ids": s[None], "attention_mask": np.ones((1, len(s)), np.int64)})[0]
        worst = max(worst, float(np.abs(alone[0, :, 0] - logits[b, : len(s), 0]).max()))
        # causal: the score of a prefix equals the score at that position of the whole sequence
        k = len(s) // 2
        pre = sess.run(None, {"input_ids": s[None, :k], "attention_mask": np.ones((1, k), np.int64)})[0]
        worst = max(worst, float(np.abs(pre[0, :, 0] - alone[0, :k, 0]).max()))
    spread = float(logits[0, :, 0].std())
    assert worst <= tol, f"{name}: padded/prefix scores differ by {worst:.3g} > {tol}"
    print(f"{name}: OK  max|prefix/padded - alone| = {worst:.2e}  (score std {spread:.2f})")
    return worst


def verify(out: Path, names, tol: float) -> None:
    import numpy as np
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}, numpy {np.__version__}")
    total = 0
    for name in names:
        d = out / name
        sizes = {p.name: p.stat().st_size for p in sorted(d.iterdir())}
        total += sum(sizes.values())
        print(f"{name}: " + ", ".join(f"{k} {v:,} B" for k, v in sizes.items()))
        if name == "prm-tiny":
            verify_prm(out, tol)
        else:
            verify_decoder(out, name, tol)
    print(f"total {total:,} B")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixture folder (default: %(default)s)")
    ap.add_argument(
        "--only", default=",".join(FIXTURES), help="comma-separated subset of " + ", ".join(FIXTURES)
    )
    ap.add_argument(
        "--verify", action="store_true", help="check existing fixtures with onnxruntime; build nothing"
    )
    ap.add_argument(
        "--tol", type=float, default=1e-4, help="max abs difference allowed (default: %(default)s)"
    )
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    bad = [n for n in names if n not in FIXTURES]
    if bad:
        ap.error(f"unknown fixture(s): {bad}")
    if not args.verify:
        generate(args.out, names)
    verify(args.out, names, args.tol)
    return 0


if __name__ == "__main__":
    sys.exit(main())
