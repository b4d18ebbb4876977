"""Shared by the ONNX model tests: logits recomputed from scratch straight from a policy's session, the
check that cached decoding gives them, and host copies of ``Particles.state`` entries."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
from tiltsmc.models import OnnxCausalLM, Particles


def with_initializer_set(model_bytes: bytes, name: str, value: float) -> bytes:
    """A copy of a serialized ONNX model with every float32 of initializer ``name`` set to ``value``.

    Edits the initializer's ``raw_data`` bytes in place (same length, so the protobuf stays valid):
    a ``TensorProto`` stores ``name`` (field 8) and then ``raw_data`` (field 9) as length-delimited fields.
    """
    encoded = name.encode()
    marker = bytes([0x42, len(encoded)]) + encoded + b"\x4a"  # name = <name>, then raw_data's tag
    start = model_bytes.find(marker)
    if start < 0 or model_bytes.find(marker, start + 1) >= 0:
        raise ValueError(f"initializer {name!r} with raw_data not found exactly once")
    position, length, shift = start + len(marker), 0, 0
    while True:  # the raw_data length, a varint
        byte = model_bytes[position]
        length |= (byte & 0x7F) << shift
        position, shift = position + 1, shift + 7
        if byte < 0x80:
            break
    edited = bytearray(model_bytes)
    edited[position : position + length] = np.full(length // 4, value, dtype="<f4").tobytes()
    return bytes(edited)


def on_host(array: Any) -> np.ndarray:
    """A state array as numpy (a KV cache kept on the GPU is copied to the host)."""
    return array if isinstance(array, np.ndarray) else array.get()


def assert_float32_close(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Equal up to float32 sums taken in another order (batches of other shapes block the matmuls
    differently): up to 64 units in the last place of the array's scale (its largest finite value, or 1)."""
    scale = max(1.0, float(np.abs(expected[np.isfinite(expected)]).max(initial=0.0)))
    atol = 64 * float(np.finfo(np.float32).eps) * scale
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=atol, err_msg=what)


def assert_state_follows(before: Particles, after: Particles, ancestors: np.ndarray) -> None:
    """Every state entry of ``after`` is ``before``'s reordered by ``ancestors`` (``(B, N)``)."""
    before.flush()
    after.flush()
    rows = np.arange(ancestors.shape[0])[:, None]
    for name, array in before.state.items():
        np.testing.assert_array_equal(
            on_host(after.state[name]), on_host(array)[rows, ancestors], err_msg=name
        )


def session_logits(policy: OnnxCausalLM, ids: Any, kv_heads: int, head_dim: int) -> np.ndarray:
    """Logits ``(rows, seq, vocab)`` of unpadded rows of equal length, straight from ``policy.session``: no
    cache (past tensors ``(rows, kv_heads, 0, head_dim)``), all-ones mask, ``position_ids = arange`` and
    ``use_cache_branch = [False]`` where the graph takes them. Every input of the graph must be fed."""
    ids = np.atleast_2d(np.asarray(ids, dtype=np.int64))
    rows, length = ids.shape
    inputs = {node.name for node in policy.session.get_inputs()}
    feeds: dict[str, np.ndarray] = {
        "input_ids": ids,
        "attention_mask": np.ones((rows, length), dtype=np.int64),
    }
    if "position_ids" in inputs:
        feeds["position_ids"] = np.broadcast_to(np.arange(length, dtype=np.int64), (rows, length)).copy()
    if "use_cache_branch" in inputs:
        feeds["use_cache_branch"] = np.array([False])
    for name in inputs:
        if name.startswith("past_key_values."):
            feeds[name] = np.zeros((rows, kv_heads, 0, head_dim), dtype=np.float32)
    assert set(feeds) == inputs
    (logits,) = policy.session.run(["logits"], feeds)
    return np.asarray(logits, dtype=np.float64)


def full_sequence(particles: Particles, b: int, i: int) -> np.ndarray:
    """Prompt ``b``'s tokens followed by particle ``(b, i)``'s generated tokens."""
    assert particles.prompt_tokens is not None
    generated = particles.tokens[b, i, : particles.lengths[b, i]]
    return np.concatenate([particles.prompt_tokens[b], generated])


def assert_cache_matches_recompute(
    policy: OnnxCausalLM, particles: Particles, kv_heads: int, head_dim: int
) -> int:
    """Every unfinished particle's next-token logits equal a full recompute without cache (1e-4); returns
    how many particles were checked."""
    particles.flush()  # the session run the policy deferred
    checked = 0
    for b, i in zip(*np.nonzero(~particles.finished)):
        expected = session_logits(policy, full_sequence(particles, b, i), kv_heads, head_dim)[0, -1]
        np.testing.assert_allclose(
            particles.state["lm.logits"][b, i], expected, atol=1e-4, rtol=0, err_msg=f"particle ({b}, {i})"
        )
        checked += 1
    return checked


def policy_with_logits_added_after(fixture: Path, token: int, value: float, folder: Path) -> Path:
    """A copy of the decoder ``fixture`` in ``folder`` with ``value`` added to every logit at the positions
    whose input token is ``token`` (NaN, +inf or -inf logits for the prompts that hold or draw it, the
    fixture's own for the others); edited with onnx (skipped without it)."""
    import pytest

    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    shutil.copytree(fixture, folder)
    model = onnx.load(folder / "model.onnx")
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["logits_raw" if name == "logits" else name for name in node.output]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(token, dtype=np.int64), "bad_token"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "last_axis"),
            numpy_helper.from_array(np.array(value, dtype=np.float32), "bad_value"),
            numpy_helper.from_array(np.array(0, dtype=np.float32), "no_change"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Equal", ["input_ids", "bad_token"], ["is_bad"]),
            helper.make_node("Unsqueeze", ["is_bad", "last_axis"], ["is_bad_3d"]),
            helper.make_node("Where", ["is_bad_3d", "bad_value", "no_change"], ["change"]),
            helper.make_node("Add", ["logits_raw", "change"], ["logits"]),
        ]
    )
    onnx.save(model, folder / "model.onnx")
    return folder
