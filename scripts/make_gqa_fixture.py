#!/usr/bin/env python3
"""Build tests/fixtures/models/gqa-tiny: a decoder whose attention is ONNX Runtime's GroupQueryAttention,
fed as onnxruntime-genai's model builder feeds it; and gqa-value-tiny, the same graph with a value head.

The interface is the optimum layout ``OnnxCausalLM`` reads (``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.{i}.key/.value`` in; ``logits``, ``present.{i}.key/.value`` out), but
each layer's attention is one ``com.microsoft.GroupQueryAttention`` node whose per-row lengths come from
the mask, as the builder computes them: ``seqlens_k = sum(attention_mask) - 1`` and
``total_sequence_length`` = the mask's width. The operator reads a row's tokens as its first ``seqlens_k
+ 1`` positions (right padding) and writes a step's keys and values there, so a left-padded row, or one
fed masked padding, is computed wrongly: the fixture for ``OnnxCausalLM``'s ``check_batching`` and its
right padding. ``gqa-value-tiny`` adds one output, ``value`` (batch, seq, 1) = ``h W + c`` on the final
hidden state ``h`` (the LM head's input), ``W`` and ``c`` drawn after every other weight (scale 0.5), so its
other outputs are gqa-tiny's: a policy and value model in one right-padded graph.

Two layers of width 32 (two heads of 16, two KV heads), learned token and position embeddings, pre-layer
normalisation, no MLP; weights from a seeded normal law (scale 0.3). The tokenizer and generation files
are gpt2-tiny's. Needs onnx and numpy only (not a runtime dependency of tiltsmc; use a throw-away
environment)::

    python3 -m venv /tmp/onnxenv && /tmp/onnxenv/bin/pip install onnx numpy
    /tmp/onnxenv/bin/python scripts/make_gqa_fixture.py

The same onnx version gives byte-identical files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MODELS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "models"
SEED = 20261205
LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB, POSITIONS = 2, 2, 2, 16, 64, 128
WIDTH = HEADS * HEAD_DIM


def build(value_head: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(SEED)
    weights: list[onnx.TensorProto] = []

    def weight(name: str, shape: tuple[int, ...], scale: float = 0.3) -> str:
        weights.append(numpy_helper.from_array((scale * rng.standard_normal(shape)).astype(np.float32), name))
        return name

    def constant(name: str, value: np.ndarray) -> str:
        weights.append(numpy_helper.from_array(value, name))
        return name

    batch, cache = "batch_size", ["batch_size", KV_HEADS, "past_sequence_length", HEAD_DIM]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [batch, "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, [batch, "sequence_length"]),
    ]
    present = ["batch_size", KV_HEADS, "total_sequence_length", HEAD_DIM]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, "sequence_length", VOCAB])]
    for i in range(LAYERS):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, cache)
            )
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, present))
    one = constant("one", np.array([1], dtype=np.int64))
    nodes = [
        # the lengths as onnxruntime-genai's builder computes them from the mask
        helper.make_node("ReduceSum", ["attention_mask", one], ["mask_sum"], keepdims=0),
        helper.make_node("Sub", ["mask_sum", one], ["last_index"]),
        helper.make_node("Cast", ["last_index"], ["seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
        helper.make_node("Gather", ["mask_shape", one], ["mask_width"], axis=0),
        helper.make_node("Cast", ["mask_width"], ["total_sequence_length"], to=TensorProto.INT32),
        helper.make_node("Gather", [weight("embed_tokens", (VOCAB, WIDTH)), "input_ids"], ["tokens"]),
        helper.make_node(
            "Gather", [weight("embed_positions", (POSITIONS, WIDTH)), "position_ids"], ["places"]
        ),
        helper.make_node("Add", ["tokens", "places"], ["hidden.0"]),
    ]
    ones = constant("norm.weight", np.ones(WIDTH, dtype=np.float32))
    zeros = constant("norm.bias", np.zeros(WIDTH, dtype=np.float32))
    for i in range(LAYERS):
        x, h = f"hidden.{i}", f"layers.{i}.normed"
        nodes.append(helper.make_node("LayerNormalization", [x, ones, zeros], [h], axis=-1))
        for name in ("q", "k", "v"):
            nodes.append(
                helper.make_node(
                    "MatMul", [h, weight(f"layers.{i}.{name}.weight", (WIDTH, WIDTH))], [f"layers.{i}.{name}"]
                )
            )
        nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [f"layers.{i}.q", f"layers.{i}.k", f"layers.{i}.v", f"past_key_values.{i}.key",
                 f"past_key_values.{i}.value", "seqlens_k", "total_sequence_length"],
                [f"layers.{i}.attention", f"present.{i}.key", f"present.{i}.value"],
                domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS,
            )
        )  # fmt: skip
        nodes.append(
            helper.make_node(
                "MatMul",
                [f"layers.{i}.attention", weight(f"layers.{i}.o.weight", (WIDTH, WIDTH))],
                [f"layers.{i}.out"],
            )
        )
        nodes.append(helper.make_node("Add", [x, f"layers.{i}.out"], [f"hidden.{i + 1}"]))
    nodes.append(
        helper.make_node("LayerNormalization", [f"hidden.{LAYERS}", ones, zeros], ["final"], axis=-1)
    )
    nodes.append(helper.make_node("MatMul", ["final", weight("lm_head.weight", (WIDTH, VOCAB))], ["logits"]))
    if value_head:  # after every other weight: the graph's other outputs are gqa-tiny's
        nodes.append(
            helper.make_node("MatMul", ["final", weight("value.weight", (WIDTH, 1), 0.5)], ["score"])
        )
        nodes.append(helper.make_node("Add", ["score", weight("value.bias", (1,), 0.5)], ["value"]))
        outputs.append(
            helper.make_tensor_value_info("value", TensorProto.FLOAT, [batch, "sequence_length", 1])
        )
    name = "gqa-value-tiny" if value_head else "gqa-tiny"
    graph = helper.make_graph(nodes, name, inputs, outputs, weights)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        producer_name="tiltsmc scripts/make_gqa_fixture.py",
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main() -> None:
    for value_head in (False, True):
        write(MODELS / ("gqa-value-tiny" if value_head else "gqa-tiny"), value_head)


def write(dest: Path, value_head: bool) -> None:
    source = MODELS / "gpt2-tiny"
    dest.mkdir(exist_ok=True)
    onnx.save(build(value_head), str(dest / "model.onnx"))
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ):
        shutil.copyfile(source / name, dest / name)
    config = {
        "architectures": ["GroupQueryAttention decoder (scripts/make_gqa_fixture.py)"],
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 1,
        "hidden_size": WIDTH,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": LAYERS,
        "max_position_embeddings": POSITIONS,
        "vocab_size": VOCAB,
    }
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
