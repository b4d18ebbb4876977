#!/usr/bin/env python3
"""Build tests/fixtures/models/int8-tiny: gpt2-tiny with dynamic int8 quantisation, a decoder whose rows
depend on their batch whichever side they are padded on.

ONNX Runtime's ``quantize_dynamic`` stores the weights of gpt2-tiny's MatMuls as int8 and quantises their
inputs at run time with ``DynamicQuantizeLinear``, whose scale is the largest activation of the whole
tensor: a row's logits then move with the other rows of its batch and with its own padding, left or
right. The fixture for ``OnnxCausalLM``'s ``check_batching`` refusing a graph on both sides. The tokenizer,
config and generation files are gpt2-tiny's. Needs onnx and onnxruntime (not runtime dependencies of
tiltsmc's tests for this; use a throw-away environment)::

    python3 -m venv /tmp/onnxenv && /tmp/onnxenv/bin/pip install onnx onnxruntime numpy
    /tmp/onnxenv/bin/python scripts/make_int8_fixture.py

onnx 1.23.2 and onnxruntime 1.32.0 give the committed file byte for byte.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from onnxruntime.quantization import QuantType, quantize_dynamic

MODELS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "models"
FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
FILES += ("special_tokens_map.json",)


def main() -> None:
    source, dest = MODELS / "gpt2-tiny", MODELS / "int8-tiny"
    dest.mkdir(exist_ok=True)
    quantize_dynamic(source / "model.onnx", dest / "model.onnx", weight_type=QuantType.QInt8)
    for name in FILES:
        shutil.copyfile(source / name, dest / name)
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
