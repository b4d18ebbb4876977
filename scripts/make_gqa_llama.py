#!/usr/bin/env python3
"""Rewrite an optimum export of a Llama decoder into ONNX Runtime's GroupQueryAttention layout.

``python scripts/make_gqa_llama.py SOURCE DEST`` reads ``SOURCE/model.onnx`` (optimum's
``text-generation-with-past`` export of a Llama-architecture model: SmolLM2, the demo's policy) and its
``config.json``, and writes ``DEST/model.onnx``: the same weights in the graph onnxruntime-genai's model
builder writes, each layer's attention one ``com.microsoft.GroupQueryAttention`` node that applies the
rotary embedding itself and reads each row's length from the attention mask (``seqlens_k = sum(mask) - 1``,
``total_sequence_length`` = the mask's width). The other files of ``SOURCE`` (tokenizer, configs) are
copied. Such a graph runs right-padded in ``OnnxCausalLM`` and can keep its KV cache in place
(``cache_in_place``): the layout ``bench/bench_cache_in_place.py --model DEST`` measures against the same
graph returning a new cache each call.

Per layer, as Hugging Face's ``LlamaDecoderLayer``: RMS normalisation ``x / sqrt(mean(x^2) + eps) * w``,
the q, k, v projections, attention with the rotary embedding (``rope_theta``, halves rotated, not
interleaved) and ``1/sqrt(head_dim)`` scaling, the output projection and the residual; RMS normalisation,
``down(silu(gate(h)) * up(h))`` and the residual; then the final normalisation and the LM head. The
weights are found by the node names torch's exporter gives (``/model/layers.{i}/self_attn/q_proj/MatMul``,
``/model/layers.{i}/input_layernorm/Mul_1`` and so on). No
``position_ids`` input: the operator numbers positions from each row's length (right padding).

The new graph is checked against the source on a prompt and two cached steps (largest logit difference
printed; it fails above ``--tolerance`` of the largest logit). Needs onnx, numpy and onnxruntime (not
runtime dependencies of tiltsmc)::

    python3 -m venv /tmp/onnxenv && /tmp/onnxenv/bin/pip install onnx onnxruntime numpy
    /tmp/onnxenv/bin/python scripts/make_gqa_llama.py python/tiltsmc/tasks/arithmetic_models/policy \
        /tmp/demo-gqa
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # ONNX Runtime 1.14 and later load it (1.19, what Python 3.9 gets, loads at most 10)


def weights_of(model: onnx.ModelProto, layers: int) -> dict[str, np.ndarray]:
    """The decoder's weights by role: ``embed``, ``norm``, ``lm_head`` and ``{i}.{role}`` per layer; and
    ``value_head.weight`` / ``.bias`` where the graph has a value output read from the final normalised
    hidden state (``value = h W + b``, as ``scripts/train_smollm2_value.py`` adds it)."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    produced = {output: node for node in model.graph.node for output in node.output}

    def array(name: str) -> np.ndarray:
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        node = produced.get(name)
        if node is not None and node.op_type == "Transpose":  # a tied LM head: the embedding transposed
            return array(node.input[0]).T
        if node is not None and node.op_type == "Identity":  # equal initializers, shared by the exporter
            return array(node.input[0])
        raise ValueError(f"{name}: not an initializer, a transposed one or an identity of one")

    nodes = {node.name: node for node in model.graph.node}

    def matmul(node_name: str) -> np.ndarray:
        return array(nodes[node_name].input[1])

    def norm(module: str) -> np.ndarray:
        """The weight an RMS norm's last Mul scales by (its input that is no node's output: the exporter
        may give equal initializers as one, through ``Identity`` nodes)."""
        (weight,) = [name for name in nodes[f"/{module}/Mul_1"].input if not name.startswith("/")]
        return array(weight)

    found = {
        "embed": array(nodes["/model/embed_tokens/Gather"].input[0]),
        "norm": norm("model/norm"),
        "lm_head": matmul("/lm_head/MatMul"),
    }
    head = produced.get("value")
    if head is not None:  # Add(MatMul(final norm's output, W), b)
        product = produced.get(head.input[0])
        if head.op_type != "Add" or product is None or product.op_type != "MatMul":
            raise ValueError("value: not h W + b on the final hidden state; cannot rewrite it")
        if product.input[0] != nodes["/model/norm/Mul_1"].output[0]:
            raise ValueError("value: its MatMul does not read the final normalised hidden state")
        found["value_head.weight"] = array(product.input[1])
        found["value_head.bias"] = array(head.input[1])
    for i in range(layers):
        for role in ("q_proj", "k_proj", "v_proj", "o_proj"):
            found[f"{i}.{role}"] = matmul(f"/model/layers.{i}/self_attn/{role}/MatMul")
        for role in ("gate_proj", "up_proj", "down_proj"):
            found[f"{i}.{role}"] = matmul(f"/model/layers.{i}/mlp/{role}/MatMul")
        for role in ("input_layernorm", "post_attention_layernorm"):
            found[f"{i}.{role}"] = norm(f"model/layers.{i}/{role}")
    return found


def build(config: dict[str, Any], weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    layers = int(config["num_hidden_layers"])
    heads, kv_heads = int(config["num_attention_heads"]), int(config["num_key_value_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    eps = float(config["rms_norm_eps"])
    positions = int(config["max_position_embeddings"])
    theta = float(config.get("rope_theta", 10000.0))
    initializers: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def constant(name: str, value: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(
        kind: str, inputs: list[str], name: str, outputs: int = 1, domain: str = "", **attributes: Any
    ) -> Any:
        names = [name] if outputs == 1 else [f"{name}/{k}" for k in range(outputs)]
        nodes.append(helper.make_node(kind, inputs, names, name=name, domain=domain, **attributes))
        return names[0] if outputs == 1 else names

    def rms_norm(x: str, weight: str, name: str) -> str:
        square = op("Mul", [x, x], f"{name}/square")
        mean = op("ReduceMean", [square], f"{name}/mean", axes=[-1], keepdims=1)
        root = op("Sqrt", [op("Add", [mean, epsilon], f"{name}/plus_eps")], f"{name}/root")
        scale = op("Reciprocal", [root], f"{name}/inverse")
        return op("Mul", [op("Mul", [x, scale], f"{name}/normed"), weight], name)

    epsilon = constant("rms_eps", np.array(eps, np.float32))
    inverse = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(positions, dtype=np.float64), inverse)
    cos = constant("cos_cache", np.cos(angles).astype(np.float32))
    sin = constant("sin_cache", np.sin(angles).astype(np.float32))
    one = constant("one", np.array([1], np.int64))
    lengths = op("ReduceSum", ["attention_mask", one], "lengths", keepdims=0)
    seqlens = op("Cast", [op("Sub", [lengths, one], "lengths_minus_1")], "seqlens_k", to=TensorProto.INT32)
    shape = op("Shape", ["attention_mask"], "mask_shape")
    width = op("Gather", [shape, constant("axis1", np.array(1, np.int64))], "mask_width")
    total = op("Cast", [width], "total_sequence_length", to=TensorProto.INT32)

    x = op("Gather", [constant("embed", weights["embed"].astype(np.float32)), "input_ids"], "embedded")
    for i in range(layers):

        def w(role: str, i: int = i) -> str:
            return constant(f"layers.{i}.{role}", weights[f"{i}.{role}"].astype(np.float32))

        h = rms_norm(x, w("input_layernorm"), f"layers.{i}/input_norm")
        q, k, v = (
            op("MatMul", [h, w(role)], f"layers.{i}/{role}") for role in ("q_proj", "k_proj", "v_proj")
        )
        attended = op(
            "GroupQueryAttention",
            [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total, cos, sin],
            f"layers.{i}/attention",
            outputs=3,
            domain="com.microsoft",
            num_heads=heads,
            kv_num_heads=kv_heads,
            do_rotary=1,
            rotary_interleaved=0,
        )
        nodes[-1].output[1], nodes[-1].output[2] = f"present.{i}.key", f"present.{i}.value"
        x = op(
            "Add", [x, op("MatMul", [attended[0], w("o_proj")], f"layers.{i}/o_proj")], f"layers.{i}/attn_res"
        )
        h = rms_norm(x, w("post_attention_layernorm"), f"layers.{i}/post_norm")
        gate = op("MatMul", [h, w("gate_proj")], f"layers.{i}/gate")
        silu = op("Mul", [gate, op("Sigmoid", [gate], f"layers.{i}/sigmoid")], f"layers.{i}/silu")
        up = op("Mul", [silu, op("MatMul", [h, w("up_proj")], f"layers.{i}/up")], f"layers.{i}/gated")
        x = op("Add", [x, op("MatMul", [up, w("down_proj")], f"layers.{i}/down")], f"layers.{i}/mlp_res")
    normed = rms_norm(x, constant("norm", weights["norm"].astype(np.float32)), "final_norm")
    op("MatMul", [normed, constant("lm_head", weights["lm_head"].astype(np.float32))], "logits")
    if "value_head.weight" in weights:
        head = constant("value_head.weight", weights["value_head.weight"].astype(np.float32))
        value = op("MatMul", [normed, head], "value/matmul")
        op(
            "Add",
            [value, constant("value_head.bias", weights["value_head.bias"].astype(np.float32))],
            "value",
        )

    cache = ["batch_size", kv_heads, "past_sequence_length", head_dim]
    present = ["batch_size", kv_heads, "total_sequence_length", head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info(
            "attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]
        ),
    ]
    outputs = [
        helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["batch_size", "sequence_length", weights["lm_head"].shape[1]]
        )
    ]
    if "value_head.weight" in weights:
        value_shape = ["batch_size", "sequence_length", weights["value_head.weight"].shape[1]]
        outputs.append(helper.make_tensor_value_info("value", TensorProto.FLOAT, value_shape))
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, cache)
            )
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, present))
    graph = helper.make_graph(nodes, "llama_gqa", inputs, outputs, initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
        producer_name="tiltsmc scripts/make_gqa_llama.py",
    )
    model.ir_version = IR_VERSION  # onnx's default (14 with onnx 1.23) is newer than older runtimes load
    return model


def check(source: Path, dest: Path, config: dict[str, Any], tolerance: float) -> float:
    """The largest logit difference between the two graphs over a 6-token prompt and two cached steps
    (the value head's scores counted as logits), over the largest logit; raises above ``tolerance``."""
    import onnxruntime as ort

    layers, kv_heads = int(config["num_hidden_layers"]), int(config["num_key_value_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"]))
    vocab = int(config["vocab_size"])
    ids = (np.arange(8, dtype=np.int64) * 7 + 3) % vocab
    runs = []
    for path, with_positions in ((source, True), (dest, False)):
        session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
        past = {
            f"past_key_values.{i}.{kind}": np.zeros((1, kv_heads, 0, head_dim), np.float32)
            for i in range(layers)
            for kind in ("key", "value")
        }
        logits = []
        for start, stop in ((0, 6), (6, 7), (7, 8)):
            feeds: dict[str, Any] = {
                "input_ids": ids[None, start:stop],
                "attention_mask": np.ones((1, stop), np.int64),
            }
            if with_positions:
                feeds["position_ids"] = np.arange(start, stop, dtype=np.int64)[None]
            names = ["logits"] + [f"present.{name[len('past_key_values.') :]}" for name in past]
            heads = [node.name for node in session.get_outputs() if node.name == "value"]
            out = session.run(names + heads, {**feeds, **past})
            logits.append(np.concatenate([out[0][0], *(value[0] for value in out[len(names) :])], axis=-1))
            past = dict(zip(past, out[1 : len(names)]))
        runs.append(np.concatenate(logits))
    scale = float(np.abs(runs[0]).max())
    difference = float(np.abs(runs[0] - runs[1]).max()) / max(scale, 1.0)
    print(f"largest logit difference over the largest logit: {difference:.2e} (logits up to {scale:.3g})")
    if difference > tolerance:
        raise SystemExit(f"the rewritten graph differs from {source} by {difference:.3g} > {tolerance}")
    return difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a folder with optimum's model.onnx and config.json")
    parser.add_argument("dest", type=Path)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    config = json.loads((args.source / "config.json").read_text())
    if config.get("model_type") not in ("llama", None):
        raise SystemExit(f"{args.source}: model_type {config.get('model_type')!r}, not llama")
    if config.get("rope_scaling"):
        raise SystemExit(f"{args.source}: rope_scaling {config['rope_scaling']!r} is not rewritten")
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"]))
    if head_dim % 16:  # ONNX Runtime's CPU operator refuses other sizes with the rotary embedding in it
        raise SystemExit(f"{args.source}: head_dim {head_dim}: GroupQueryAttention needs a multiple of 16")
    source = onnx.load(str(args.source / "model.onnx"))
    model = build(config, weights_of(source, int(config["num_hidden_layers"])))
    args.dest.mkdir(parents=True, exist_ok=True)
    for item in sorted(args.source.iterdir()):
        if item.is_file() and not item.name.startswith("model.onnx"):
            shutil.copy2(item, args.dest / item.name)
    large = model.ByteSize() > 1_500_000_000
    onnx.save(model, str(args.dest / "model.onnx"), save_as_external_data=large, location="model.onnx.data")
    check(args.source, args.dest, config, args.tolerance)
    print(f"wrote {args.dest}")


if __name__ == "__main__":
    main()
