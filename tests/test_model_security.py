"""Loading a model runs no program and reads no file outside the model's folder."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from onnx_helpers import session_logits
from tiltsmc.models import OnnxCausalLM, OnnxRewardModel
from tiltsmc.models._ort import check_external_data, external_data_locations

FIXTURES = Path(__file__).parent / "fixtures" / "models"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX shell scripts as the fake programs")
def test_loading_models_runs_no_program_found_through_path(tmp_path: Path) -> None:
    """ctypes.util.find_library runs ldconfig, gcc, cc and ld found through PATH: fakes placed first on
    PATH record whether anything ran while both models load, CUDA is probed and a run samples."""
    fakes = tmp_path / "bin"
    fakes.mkdir()
    ran = tmp_path / "ran.txt"
    # what find_library runs (gcc, cc, ld, ldconfig, objdump), and others a probe might (platform's file,
    # uname; nvidia-smi, nvcc)
    programs = "gcc cc ld ldconfig x86_64-linux-gnu-gcc objdump nvidia-smi nvcc file uname lsb_release which"
    for name in programs.split():
        script = fakes / name
        script.write_text(f"#!/bin/sh\necho {name} >> '{ran}'\nexit 1\n")
        script.chmod(0o755)
    code = textwrap.dedent(
        f"""
        import numpy as np, tiltsmc
        from tiltsmc import core
        from tiltsmc.models import OnnxCausalLM, OnnxRewardModel
        from tiltsmc.models._ort import cuda_device_usable
        cuda_device_usable()
        core.cuda_available()
        policy = OnnxCausalLM({str(FIXTURES / "llama-tiny")!r}, max_new_tokens=2)
        reward = OnnxRewardModel({str(FIXTURES / "prm-tiny")!r}, kind="logit")
        tiltsmc.smc(policy, reward, ["ab"], num_particles=2, rng=np.random.default_rng(0))
        """
    )
    environment = {**os.environ, "PATH": f"{fakes}{os.pathsep}{os.environ.get('PATH', '')}"}
    completed = subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert not ran.exists(), f"programs ran while loading: {ran.read_text().split()}"


# -- external data ------------------------------------------------------------------------------------------
# Models whose weights lie in another file, built from the fixtures by rewriting the protobuf's wire format:
# each initializer's raw_data (TensorProto field 9) moves to a data file, replaced by external_data entries
# (field 13: location, offset, length) and data_location = EXTERNAL (field 14).


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position, shift = position + 1, shift + 7
        if byte < 0x80:
            return value, position


def _fields(data: bytes) -> list[tuple[int, int, bytes, bytes]]:
    """``(number, wire type, the field's bytes with its key, its payload)`` of a message's fields."""
    fields, position = [], 0
    while position < len(data):
        start = position
        key, position = _read_varint(data, position)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, end = _read_varint(data, position)
            payload = data[position:end]
        elif wire == 2:
            length, position = _read_varint(data, position)
            end = position + length
            payload = data[position:end]
        else:
            end = position + (8 if wire == 1 else 4)
            payload = data[position:end]
        fields.append((number, wire, data[start:end], payload))
        position = end
    return fields


def _message(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _entry(key: str, value: str) -> bytes:
    return _message(13, _message(1, key.encode()) + _message(2, value.encode()))


def _external_tensor(name: str, location: str) -> bytes:
    """A TensorProto (float, 1 element) whose data is at ``location``."""
    return (
        _varint(1 << 3) + _varint(1) + _varint(2 << 3) + _varint(1) + _message(8, name.encode())
        + _entry("location", location) + _varint(14 << 3) + _varint(1)
    )  # fmt: skip


def externalized(model: bytes, location: str) -> tuple[bytes, bytes]:
    """``(model, data)``: ``model`` with every initializer's raw data moved to ``data``, read at
    ``location``."""
    data = bytearray()
    rebuilt_model = b""
    for number, _, raw, payload in _fields(model):
        if number != 7:  # ModelProto.graph
            rebuilt_model += raw
            continue
        graph = b""
        for g_number, _, g_raw, g_payload in _fields(payload):
            if g_number != 5:  # GraphProto.initializer
                graph += g_raw
                continue
            tensor, raw_data = b"", None
            for t_number, _, t_raw, t_payload in _fields(g_payload):
                if t_number == 9:
                    raw_data = t_payload
                else:
                    tensor += t_raw
            if raw_data is not None:
                while len(data) % 64:
                    data.append(0)
                tensor += _entry("location", location) + _entry("offset", str(len(data)))
                tensor += _entry("length", str(len(raw_data))) + _varint(14 << 3) + _varint(1)
                data += raw_data
            graph += _message(5, tensor)
        rebuilt_model += _message(7, graph)
    return rebuilt_model, bytes(data)


def external_model(folder: Path, location: str, data_at: Path | None = None) -> tuple[Path, bytes]:
    """llama-tiny in ``folder`` with its weights read from ``location``; the data is written to ``data_at``
    (default: ``folder / location``). Returns the model file and the data."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        (folder / name).write_bytes((FIXTURES / "llama-tiny" / name).read_bytes())
    model, data = externalized((FIXTURES / "llama-tiny" / "model.onnx").read_bytes(), location)
    (folder / "model.onnx").write_bytes(model)
    target = data_at if data_at is not None else folder / location
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return folder / "model.onnx", data


def same_logits(policy: OnnxCausalLM) -> bool:
    reference = OnnxCausalLM(FIXTURES / "llama-tiny", max_new_tokens=2)
    ids = reference.encode_prompt("hello there")
    return bool(
        np.array_equal(
            session_logits(policy, ids, policy.kv_heads, policy.head_dim),
            session_logits(reference, ids, reference.kv_heads, reference.head_dim),
        )
    )


def test_external_data_in_the_folder_loads(tmp_path: Path) -> None:
    model, _ = external_model(tmp_path / "flat", "model.onnx_data")
    original = (FIXTURES / "llama-tiny" / "model.onnx").stat().st_size
    assert model.stat().st_size < 0.6 * original  # the weights really are elsewhere
    assert external_data_locations(model)[0][1] == "model.onnx_data"
    assert same_logits(OnnxCausalLM(model.parent, max_new_tokens=2))
    nested, _ = external_model(tmp_path / "nested", "weights/../weights/w.bin")
    assert same_logits(OnnxCausalLM(nested, max_new_tokens=2))


@pytest.mark.skipif(os.name != "posix", reason="symbolic links")
def test_the_hugging_face_cache_layout_loads(tmp_path: Path) -> None:
    """snapshots/<rev>/model.onnx -> ../../blobs/<hash>, its data likewise: the data lies beside the model
    file's target, not in the snapshot folder."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    built, data = external_model(tmp_path / "built", "model.onnx_data")
    blobs.mkdir()
    (blobs / "m").write_bytes(built.read_bytes())
    (blobs / "d").write_bytes(data)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json"):
        (snapshot / name).write_bytes((built.parent / name).read_bytes())
    (snapshot / "model.onnx").symlink_to("../../blobs/m")
    (snapshot / "model.onnx_data").symlink_to("../../blobs/d")
    assert same_logits(OnnxCausalLM(snapshot, max_new_tokens=2))


@pytest.mark.parametrize("how", ["parent", "absolute", "symlink", "memory"])
def test_external_data_outside_the_folder_is_refused(tmp_path: Path, how: str) -> None:
    """Each of these reads a real copy of the weights (ONNX Runtime 1.17 loads them without a word); the
    model is refused naming its file, the tensor and the location, before ONNX Runtime reads anything."""
    folder = tmp_path / "models" / "evil"
    secret = tmp_path / "secret.bin"
    if how == "parent":
        external_model(folder, "../../secret.bin", data_at=secret)
        expected = r"'\.\./\.\./secret\.bin': it resolves to .*secret\.bin, outside the model's folder"
    elif how == "absolute":
        external_model(folder, str(secret), data_at=secret)
        expected = "'.*secret.bin': an absolute path; external data must lie in the model's folder"
    elif how == "symlink":
        if os.name != "posix":
            pytest.skip("symbolic links")
        external_model(folder, "model.onnx_data", data_at=secret)
        (folder / "model.onnx_data").symlink_to(secret)
        expected = "'model.onnx_data': it resolves to .*secret.bin, outside the model's folder"
    else:
        external_model(folder, "*/_ORT_MEM_ADDR_/*", data_at=tmp_path / "unused.bin")
        expected = r"'\*/_ORT_MEM_ADDR_/\*': ONNX Runtime's in-memory tag, not a file"
    with pytest.raises(ValueError, match=rf"^path: model.onnx: tensor '.+' has external data at {expected}"):
        OnnxCausalLM(folder, max_new_tokens=2)
    with pytest.raises(ValueError, match="has external data at"):
        OnnxRewardModel(folder / "model.onnx", kind="logit")


def test_external_data_anywhere_in_the_model_is_found(tmp_path: Path) -> None:
    """Constants in node attributes, subgraphs (an If's branch), sparse initializers and functions."""
    constant = _message(5, _message(5, _external_tensor("in_attribute", "a.bin")))  # node.attribute.t
    branch = _message(6, _message(5, _external_tensor("in_subgraph", "b.bin")))  # attribute.g.initializer
    sparse = _message(15, _message(1, _external_tensor("sparse_values", "c.bin")))
    graph = _message(1, constant + _message(5, branch)) + sparse  # node(attribute t, attribute g)
    function = _message(25, _message(7, _message(5, _message(10, _external_tensor("in_function", "d.bin")))))
    model = tmp_path / "model.onnx"
    model.write_bytes(_varint(1 << 3) + _varint(8) + _message(7, graph) + function)
    found = sorted(external_data_locations(model))
    assert found == [
        ("in_attribute", "a.bin"),
        ("in_function", "d.bin"),
        ("in_subgraph", "b.bin"),
        ("sparse_values", "c.bin"),
    ]
    with pytest.raises(ValueError, match=r"tensor '.*' has external data at '.\.bin': No such file"):
        check_external_data(model)


def test_a_tensor_with_two_locations_is_refused(tmp_path: Path) -> None:
    """A harmless first location and a hostile second one (older ONNX Runtime versions read the last)."""
    tensor = _external_tensor("w", "w.bin") + _entry("location", "../../secret.bin")
    model = tmp_path / "model.onnx"
    model.write_bytes(_message(7, _message(5, tensor)))
    (tmp_path / "w.bin").write_bytes(b"\0" * 4)
    with pytest.raises(
        ValueError, match=r"not a valid ONNX model \(tensor 'w' has 2 external data locations"
    ):
        check_external_data(model)


def test_a_malformed_protobuf_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(_message(7, b"\x0a\xff\xff"))  # a graph whose node claims more bytes than there are
    with pytest.raises(ValueError, match=r"model.onnx is not a valid ONNX model \(malformed protobuf"):
        OnnxCausalLM(model)
    model.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty, not an ONNX model"):
        OnnxCausalLM(model)
