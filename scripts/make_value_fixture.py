#!/usr/bin/env python3
"""Build tests/fixtures/models/gpt2-value-tiny and gpt2-twist-tiny: gpt2-tiny's decoder with a value head,
or a token-level twist head, in the same graph.

The graph is ``gpt2-tiny/model.onnx`` (a ``text-generation-with-past`` export, KV cache inputs and
``present.*`` outputs) with one more output, ``value`` ``(batch, seq, 1)`` = ``h W + c``: a linear head
on the final hidden state ``h`` (the input of the LM head's MatMul), ``W`` ``(32, 1)`` and ``c`` drawn
from a seeded normal law (scale 0.5). Every other output is unchanged, so the folder serves as a policy
(``logits``), as a decoder reward model with a KV cache (``output="value"``: a value head on a decoder
trunk, exported as optimum lays out a decoder), and as both at once.

``gpt2-twist-tiny`` is the same with a twist head instead: one more output ``twist``
``(batch, seq, 64)`` = ``h W + c``, ``W`` ``(32, 64)`` and ``c`` ``(64,)`` from another seed (scale 0.5):
at each position the score of every one-token extension of the prefix ending there (read by
``tiltsmc.models.twist.PolicyTwist``). Needs onnx and numpy only (not a
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
TWIST_SEED = 20261205


def build(dest_name: str, output: str, width: int, seed: int) -> None:
    """gpt2-tiny with a linear head ``h W + c`` of ``width`` scores per position, output ``output``."""
    source, dest = MODELS / "gpt2-tiny", MODELS / dest_name
    model = onnx.load(str(source / "model.onnx"))
    graph = model.graph
    (head,) = [node for node in graph.node if "logits" in node.output]
    hidden = head.input[0]
    rng = np.random.default_rng(seed)
    weight = (0.5 * rng.standard_normal((32, width))).astype(np.float32)
    bias = (0.5 * rng.standard_normal(width)).astype(np.float32)
    name = f"{output}_head"
    graph.initializer.extend(
        [
            numpy_helper.from_array(weight, f"{name}.weight"),
            numpy_helper.from_array(bias, f"{name}.bias"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node(
                "MatMul", [hidden, f"{name}.weight"], [f"{name}/matmul"], name=f"/{name}/MatMul"
            ),
            helper.make_node("Add", [f"{name}/matmul", f"{name}.bias"], [output], name=f"/{name}/Add"),
        ]
    )
    graph.output.append(
        helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch_size", "sequence_length", width])
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


def main() -> None:
    build("gpt2-value-tiny", "value", 1, SEED)
    build("gpt2-twist-tiny", "twist", 64, TWIST_SEED)


if __name__ == "__main__":
    main()
