"""Model configuration checked when a model is loaded: the errors name the file (or argument) and field."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiltsmc.models import OnnxCausalLM, OnnxRewardModel
from tiltsmc.models.onnx_lm import cache_geometry

FIXTURES = Path(__file__).parent / "fixtures" / "models"
POLICY, REWARD = FIXTURES / "llama-tiny", FIXTURES / "prm-tiny"


@pytest.mark.parametrize(
    ("providers", "error", "message"),
    [
        (["CUDAExecutonProvider"], ValueError, "'CUDAExecutonProvider' is not a provider ONNX Runtime knows"),
        (["DmlExecutionProvider", "CPUExecutionProvider"], ValueError, "not in this ONNX Runtime build"),
        ("CPUExecutionProvider", TypeError, "expected a list of provider names"),
        ([], ValueError, "expected at least one provider"),
        ([("CPUExecutionProvider", "threads")], TypeError, "a provider name or a \\(name, options\\) pair"),
    ],
)
def test_unknown_providers_are_refused_not_replaced_by_the_cpu(
    providers: object, error: type[Exception], message: str
) -> None:
    """ONNX Runtime itself only warns (a banner, or a UserWarning) and runs on the CPU."""
    with pytest.raises(error, match=f"^providers: .*{message}"):
        OnnxCausalLM(POLICY, providers=providers)  # type: ignore[arg-type]
    with pytest.raises(error, match=f"^providers: .*{message}"):
        OnnxRewardModel(REWARD, providers=providers)  # type: ignore[arg-type]


def test_known_providers_load() -> None:
    policy = OnnxCausalLM(POLICY, providers=[("CPUExecutionProvider", {})])
    assert policy.session.get_providers() == ["CPUExecutionProvider"]
    reward = OnnxRewardModel(REWARD, providers=("CPUExecutionProvider",))
    assert reward.session.get_providers() == ["CPUExecutionProvider"]


def configured_copy(tmp_path: Path, name: str, file: str, **fields: object) -> Path:
    """A copy of fixture ``name`` in ``tmp_path`` with ``fields`` set in its ``file`` (a value of
    ``REMOVE`` deletes the field)."""
    folder = tmp_path / name
    if not folder.exists():
        shutil.copytree(FIXTURES / name, folder)
    path = folder / file
    values = json.loads(path.read_text())
    for key, value in fields.items():
        if value is REMOVE:
            values.pop(key, None)
        else:
            values[key] = value
    path.write_text(json.dumps(values))
    return folder


REMOVE = object()


@pytest.mark.parametrize(
    ("file", "fields", "message"),
    [
        (
            "generation_config.json",
            {"bos_token_id": -1},
            "bos_token_id: expected a token id in [0, 64), got -1",
        ),
        ("config.json", {"pad_token_id": "1"}, "pad_token_id: expected a token id in [0, 64), got '1'"),
        ("config.json", {"pad_token_id": 64}, "pad_token_id: expected a token id in [0, 64), got 64"),
        ("config.json", {"pad_token_id": 1.0}, "pad_token_id: expected a token id in [0, 64), got 1.0"),
        ("generation_config.json", {"eos_token_id": [0, 99]}, "eos_token_id: expected a token id in [0, 64)"),
        ("generation_config.json", {"eos_token_id": True}, "eos_token_id: expected a token id in [0, 64)"),
        ("config.json", {"max_position_embeddings": 0}, "max_position_embeddings: expected an integer >= 1"),
        ("config.json", {"max_position_embeddings": 4}, "max_position_embeddings: a context of 4 tokens"),
        ("config.json", {"vocab_size": "64"}, "vocab_size: expected an integer >= 1, got '64'"),
    ],
)
def test_bad_config_fields_are_refused_naming_file_and_field(
    tmp_path: Path, file: str, fields: dict[str, object], message: str
) -> None:
    folder = configured_copy(tmp_path, "llama-tiny", file, **fields)
    expected = "^" + re.escape(f"{folder / file}: {message}")
    with pytest.raises(ValueError, match=expected):
        OnnxCausalLM(folder, max_new_tokens=4)


def test_config_json_itself(tmp_path: Path) -> None:
    folder = configured_copy(tmp_path, "llama-tiny", "config.json")
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"^config.json: expected a JSON object in .*, got list"):
        OnnxCausalLM(folder)
    (folder / "config.json").write_bytes('{"model_type": "llamá"}'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"^config.json: cannot read"):
        OnnxCausalLM(folder)


def test_a_field_set_to_null_is_absent(tmp_path: Path) -> None:
    """``"pad_token_id": null`` (as transformers writes an unset field): the default, not an error."""
    folder = configured_copy(tmp_path, "llama-tiny", "config.json", pad_token_id=None, bos_token_id=None)
    configured_copy(tmp_path, "llama-tiny", "generation_config.json", bos_token_id=None, eos_token_id=[3, 5])
    policy = OnnxCausalLM(folder)
    assert policy.pad_token_id == 3 and policy.bos_token_id is None and policy.eos_token_ids == {3, 5}


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"bos_token_id": -1}, ValueError, "bos_token_id: expected a token id in [0, 64), got -1"),
        ({"pad_token_id": 64}, ValueError, "pad_token_id: expected a token id in [0, 64), got 64"),
        ({"eos_token_id": [2, "3"]}, ValueError, "eos_token_id: expected a token id in [0, 64), got '3'"),
        ({"max_length": 0}, ValueError, "max_length: expected an integer >= 1, got 0"),  # was ignored
        ({"max_length": 4}, ValueError, "max_length: a context of 4 tokens leaves no room"),
        ({"temperature": "1"}, TypeError, "temperature: expected a number, got '1'"),
        ({"top_p": "0.5"}, TypeError, "top_p: expected a number, got '0.5'"),
    ],
)
def test_bad_arguments_are_refused(
    arguments: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match="^" + re.escape(message)):
        OnnxCausalLM(POLICY, max_new_tokens=4, **arguments)  # type: ignore[arg-type]


def test_arguments_come_before_the_files(tmp_path: Path) -> None:
    folder = configured_copy(tmp_path, "llama-tiny", "config.json", pad_token_id=99)
    assert OnnxCausalLM(folder, pad_token_id=2).pad_token_id == 2
    assert OnnxCausalLM(POLICY, max_length=6, max_new_tokens=4).max_length == 6


@pytest.mark.parametrize(
    ("arguments", "fields", "message"),
    [
        ({"pad_token_id": 64}, {}, "pad_token_id: expected a token id in [0, 64), got 64"),
        ({"pad_token_id": "0"}, {}, "pad_token_id: expected a token id in [0, 64), got '0'"),
        ({"position": "delimiter", "delimiter_ids": [-1]}, {}, "delimiter_ids: expected a token id"),
        (
            {"position": "delimiter", "delimiter_ids": [64]},
            {},
            "delimiter_ids: expected a token id in [0, 64)",
        ),
        ({}, {"vocab_size": 0}, "config.json: vocab_size: expected an integer >= 1, got 0"),
    ],
)
def test_reward_model_configuration(
    tmp_path: Path, arguments: dict[str, object], fields: dict[str, object], message: str
) -> None:
    folder = configured_copy(tmp_path, "prm-tiny", "config.json", **fields)
    with pytest.raises(ValueError, match=re.escape(message)):
        OnnxRewardModel(folder, kind="logit", **arguments)  # type: ignore[arg-type]


def test_cache_geometry_from_config_fields() -> None:
    """Where the graph's cache dimensions are symbolic, config.json's fields give them: checked too."""
    past = SimpleNamespace(shape=["batch", "heads", "past", "head_dim"], type="tensor(float)")
    model = Path("/models/m/model.onnx")
    config = {"num_key_value_heads": 2, "num_attention_heads": 4, "hidden_size": 32}
    assert cache_geometry(past, config, model)[1:] == (2, 8)
    assert cache_geometry(past, {**config, "head_dim": 16}, model)[1:] == (2, 16)
    for field, value in (("num_key_value_heads", "2"), ("hidden_size", [32]), ("head_dim", 0)):
        with pytest.raises(
            ValueError, match=re.escape(f"/models/m/config.json: {field}: expected an integer")
        ):
            cache_geometry(past, {**config, field: value}, model)


@pytest.mark.parametrize(
    ("threads", "error"), [(-1, ValueError), ("2", TypeError), (1.5, TypeError), (True, TypeError)]
)
def test_thread_counts(threads: object, error: type) -> None:
    """A negative count is a wrong value (ValueError), a string, float or bool a wrong type (TypeError)."""
    with pytest.raises(error, match=r"^intra_op_num_threads: expected an integer >= 0"):
        OnnxCausalLM(POLICY, intra_op_num_threads=threads)  # type: ignore[arg-type]
    with pytest.raises(error, match=r"^inter_op_num_threads: expected an integer >= 0"):
        OnnxRewardModel(REWARD, inter_op_num_threads=threads)  # type: ignore[arg-type]


def test_cuda_asked_for_without_a_usable_device_falls_back_quietly(capfd: pytest.CaptureFixture[str]) -> None:
    """``providers=["CUDAExecutionProvider", "CPUExecutionProvider"]`` is ONNX Runtime's "CUDA where
    possible": on a machine without a usable CUDA device it runs on the CPU without ONNX Runtime's banner
    about the CUDA provider failing to load; ``require_gpu=True`` still refuses."""
    from tiltsmc.models._ort import cuda_device_usable

    usable, _ = cuda_device_usable()
    capfd.readouterr()
    for providers in (["CUDAExecutionProvider", "CPUExecutionProvider"], [("CUDAExecutionProvider", {})]):
        policy = OnnxCausalLM(POLICY, providers=providers)
        expected = "CUDAExecutionProvider" if usable else "CPUExecutionProvider"
        assert policy.session.get_providers()[0] == expected
    assert capfd.readouterr().err == ""
    if not usable:
        with pytest.raises(RuntimeError, match=r"require_gpu: model\.onnx runs on .*not on CUDA"):
            OnnxCausalLM(POLICY, providers=["CUDAExecutionProvider"], require_gpu=True)


def test_genai_config_gives_the_ids_and_context_the_other_configs_do_not(tmp_path: Path) -> None:
    """onnxruntime-genai's model builder writes model.onnx, the tokenizer files and genai_config.json (the
    EOS, BOS and padding ids and ``context_length`` in its ``model`` object), no config.json nor
    generation_config.json: those are read there (the policy had no EOS, no BOS and no context limit),
    after config.json's and generation_config.json's, and checked, the errors naming the field."""
    folder = tmp_path / "genai-out"
    shutil.copytree(FIXTURES / "demo-policy-gqa", folder)
    config, generation = (folder / "config.json").read_text(), (folder / "generation_config.json").read_text()
    (folder / "config.json").unlink()
    (folder / "generation_config.json").unlink()
    genai = folder / "genai_config.json"
    model = {"bos_token_id": 2, "eos_token_id": [3, 4], "pad_token_id": 5, "context_length": 100}
    model.update({"vocab_size": 35, "type": "llama", "decoder": {"filename": "model.onnx"}})
    genai.write_text(json.dumps({"model": model, "search": {"max_length": 100}}))
    policy = OnnxCausalLM(folder)
    assert policy.eos_token_ids == {3, 4} and policy.bos_token_id == 2
    assert policy.pad_token_id == 5 and policy.max_length == 100
    genai.write_text(json.dumps({"model": {**model, "eos_token_id": 6}}))
    assert OnnxCausalLM(folder).eos_token_ids == {6}
    (folder / "config.json").write_text(config)  # the Hugging Face configs come first
    (folder / "generation_config.json").write_text(generation)
    policy = OnnxCausalLM(folder)
    assert policy.eos_token_ids == {1} and policy.bos_token_id == 1
    assert policy.pad_token_id == 0 and policy.max_length == 256
    (folder / "config.json").unlink()
    (folder / "generation_config.json").unlink()
    for fields, message in [
        ({"eos_token_id": [3, 35]}, "model.eos_token_id: expected a token id in [0, 35), got 35"),
        ({"bos_token_id": "2"}, "model.bos_token_id: expected a token id in [0, 35), got '2'"),
        ({"context_length": 0}, "model.context_length: expected an integer >= 1, got 0"),
        ({"context_length": 64}, "model.context_length: a context of 64 tokens leaves no room"),
    ]:
        genai.write_text(json.dumps({"model": {**model, **fields}}))
        with pytest.raises(ValueError, match="^" + re.escape(f"{genai}: {message}")):
            OnnxCausalLM(folder)
    genai.write_text(json.dumps({"model": [model]}))
    with pytest.raises(
        ValueError, match="^" + re.escape(f"{genai}: model: expected a JSON object, got list")
    ):
        OnnxCausalLM(folder)
