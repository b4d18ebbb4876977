#!/usr/bin/env python3
"""Build tests/fixtures/models/gpt2-value-tiny: gpt2-tiny's decoder with a value head in the same graph.

The graph is ``gpt2-tiny/model.onnx`` (a ``text-generation-with-past`` export, KV cache inputs and
``present.*`` outputs) with one more output, ``value`` ``(batch, seq, 1)`` = ``h W + c``: a linear head
on the final hidden state ``h`` (the input of the LM head's MatMul), ``W`` ``(32, 1)`` and ``c`` drawn
from a seeded normal law (scale 0.5). Every other output is unchanged, so the folder serves as a policy
(``logits``), as a decoder reward model with a KV cache (``output="value"``: a value head on a decoder
trunk, exported as optimum lays out a decoder), and as both at once. Needs onnx and numpy only (not a
runtime dependency of tiltsmc; use a throw-away environment)::

    python3 -m venv /tmp/onnxenv && /tmp/onnxenv/bin/pip install onnx numpy
    /tmp/onnxenv/bin/python scripts/make_value_fixture.py

The same onnx version gives byte-identical files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MODELS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "models"
SEED = 20261204


def main() -> None:
    source, dest = MODELS / "gpt2-tiny", MODELS / "gpt2-value-tiny"
    model = onnx.load(str(source / "model.onnx"))
    graph = model.graph
    (head,) = [node for node in graph.node if "logits" in node.output]
    hidden = head.input[0]
    rng = np.random.default_rng(SEED)
    weight = (0.5 * rng.standard_normal((32, 1))).astype(np.float32)
    bias = (0.5 * rng.standard_normal(1)).astype(np.float32)
    graph.initializer.extend(
        [
            numpy_helper.from_array(weight, "value_head.weight"),
            numpy_helper.from_array(bias, "value_head.bias"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node(
                "MatMul", [hidden, "value_head.weight"], ["value_head/matmul"], name="/value_head/MatMul"
            ),
            helper.make_node(
                "Add", ["value_head/matmul", "value_head.bias"], ["value"], name="/value_head/Add"
            ),
        ]
    )
    graph.output.append(
        helper.make_tensor_value_info("value", TensorProto.FLOAT, ["batch_size", "sequence_length", 1])
    )
    onnx.checker.check_model(model)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir()
    for item in sorted(source.iterdir()):
        if item.name != "model.onnx":
            shutil.copy2(item, dest / item.name)
    onnx.save(model, str(dest / "model.onnx"))
    print(f"wrote {dest}: {', '.join(sorted(p.name for p in dest.iterdir()))}")


if __name__ == "__main__":
    main()
