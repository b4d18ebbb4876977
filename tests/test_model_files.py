"""A policy folder whose files or graph are not what tiltsmc reads is refused at load, naming the file or
the graph's input / output and what is wrong (never an error deep in numpy or ONNX Runtime at the first
step, never a silent wrong result); a prompt whose token ids lie past the logits fails alone. The altered
models are built at test time from the llama-tiny fixture with the ``onnx`` package."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from tiltsmc.models import OnnxCausalLM
from tiltsmc.models.tokenizer import load_tokenizer

pytest.importorskip("onnxruntime")

FIXTURES = Path(__file__).parent / "fixtures" / "models"
LLAMA, CHAT = FIXTURES / "llama-tiny", FIXTURES / "chat-tiny"
VOCAB = 64


def _onnx() -> Any:
    return pytest.importorskip("onnx")


def _copy(tmp_path: Path, name: str = "llama-tiny") -> Path:
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    return folder


def _edit_graph(folder: Path, edit: Callable[[Any, Any], None]) -> Path:
    """``edit(graph, onnx)`` applied to the folder's model.onnx."""
    onnx = _onnx()
    model = onnx.load(folder / "model.onnx")
    edit(model.graph, onnx)
    onnx.save(model, folder / "model.onnx")
    return folder


def _edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data), encoding="utf-8")


def _new_logits(
    build: Callable[[Any, Any, str], None], elem_type: Any = None, shape: Any = "same"
) -> Callable[[Any, Any], None]:
    """An edit that renames the graph's ``logits`` to ``logits_raw`` and lets ``build(graph, onnx, raw)``
    compute a new ``logits`` output of ``elem_type`` (default: the old one's) and ``shape`` (None: left
    undeclared)."""

    def edit(graph: Any, onnx: Any) -> None:
        old = next(output for output in graph.output if output.name == "logits")
        for node in graph.node:
            node.output[:] = ["logits_raw" if name == "logits" else name for name in node.output]
        dims = [d.dim_param or d.dim_value for d in old.type.tensor_type.shape.dim]
        kind = old.type.tensor_type.elem_type if elem_type is None else elem_type
        index = list(graph.output).index(old)
        graph.output.remove(old)
        build(graph, onnx, "logits_raw")
        graph.output.insert(
            index, onnx.helper.make_tensor_value_info("logits", kind, dims if shape == "same" else shape)
        )

    return edit


def _constant(graph: Any, onnx: Any, name: str, value: Any) -> str:
    graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value), name))
    return name


def _last_position_only(graph: Any, onnx: Any, raw: str) -> None:
    index = _constant(graph, onnx, "last", np.array(-1, dtype=np.int64))
    graph.node.append(onnx.helper.make_node("Gather", [raw, index], ["logits"], axis=1))


def _one_more_axis(graph: Any, onnx: Any, raw: str) -> None:
    axes = _constant(graph, onnx, "axes", np.array([1], dtype=np.int64))
    graph.node.append(onnx.helper.make_node("Unsqueeze", [raw, axes], ["logits"]))


def _last_position_or_all(graph: Any, onnx: Any, raw: str) -> None:
    """``logits`` of rank 2 (the last position) where the mask has a one, else of rank 3: shape inference
    cannot tell the rank, so only a run shows it."""
    make, tensor = onnx.helper.make_node, onnx.TensorProto
    zero = _constant(graph, onnx, "zero", np.array(0, dtype=np.int64))
    graph.node.append(make("ReduceSum", ["attention_mask"], ["ones"], keepdims=0))
    graph.node.append(make("Greater", ["ones", zero], ["any_one"]))
    last = onnx.numpy_helper.from_array(np.array(-1, dtype=np.int64), "last")
    rank_2 = onnx.helper.make_graph(
        [make("Constant", [], ["last"], value=last), make("Gather", [raw, "last"], ["out"], axis=1)],
        "rank_2", [], [onnx.helper.make_tensor_value_info("out", tensor.FLOAT, None)],
    )  # fmt: skip
    rank_3 = onnx.helper.make_graph(
        [make("Identity", [raw], ["out"])], "rank_3", [],
        [onnx.helper.make_tensor_value_info("out", tensor.FLOAT, None)],
    )  # fmt: skip
    graph.node.append(make("If", ["any_one"], ["logits"], then_branch=rank_2, else_branch=rank_3))


def _cast(to: Any) -> Callable[[Any, Any, str], None]:
    def build(graph: Any, onnx: Any, raw: str) -> None:
        graph.node.append(onnx.helper.make_node("Cast", [raw], ["logits"], to=to))

    return build


# -- the logits (defects 2 and 9) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "match"),
    [
        (
            "rank 2",
            r"path: model\.onnx: its logits output has shape \['batch_size', 64\]; expected \(batch, ",
        ),
        ("rank 2, undeclared", r"logits have shape \(1, 64\) for one 2-token prompt.*expected \(batch, seq"),
        ("rank 4", r"its logits output has shape \['batch_size', 1, 'sequence_length', 64\]; expected"),
        ("int64", r"path: model\.onnx: its logits output is tensor\(int64\); expected logits of a float"),
        ("bool", r"its logits output is tensor\(bool\); expected logits of a float type"),
    ],
    ids=["rank-2", "rank-2-undeclared", "rank-4", "int64", "bool"],
)
def test_logits_that_are_not_float_batch_sequence_vocabulary_are_refused_at_load(
    tmp_path: Path, case: str, match: str
) -> None:
    tensor = _onnx().TensorProto
    edit = {
        "rank 2": _new_logits(_last_position_only, shape=["batch_size", VOCAB]),
        "rank 2, undeclared": _new_logits(_last_position_or_all, shape=None),
        "rank 4": _new_logits(_one_more_axis, shape=["batch_size", 1, "sequence_length", VOCAB]),
        "int64": _new_logits(_cast(tensor.INT64), elem_type=tensor.INT64),
        "bool": _new_logits(_cast(tensor.BOOL), elem_type=tensor.BOOL),
    }[case]
    folder = _edit_graph(_copy(tmp_path), edit)
    for check_batching in (True, False):
        with pytest.raises(ValueError, match=match):
            OnnxCausalLM(folder, check_batching=check_batching)


def test_float16_logits_still_load(tmp_path: Path) -> None:
    tensor = _onnx().TensorProto
    folder = _edit_graph(_copy(tmp_path), _new_logits(_cast(tensor.FLOAT16), elem_type=tensor.FLOAT16))
    policy = OnnxCausalLM(folder, max_new_tokens=2)
    particles = policy.start(["ab"], 2)
    policy.propose(particles, np.random.default_rng(0))
    assert policy.vocab_size == VOCAB and not particles.errors


# -- the vocabulary (defects 1 and 5) -----------------------------------------------------------------------


def _dynamic_vocabulary(graph: Any, onnx: Any) -> None:
    output = next(output for output in graph.output if output.name == "logits")
    output.type.tensor_type.shape.dim[2].dim_param = "vocab"


def test_config_vocab_size_is_checked_against_the_logits_the_graph_returns(tmp_path: Path) -> None:
    folder = _edit_graph(_copy(tmp_path), _dynamic_vocabulary)
    assert OnnxCausalLM(folder).vocab_size == VOCAB  # read from the logits
    (folder / "tokenizer.json").unlink()
    for vocab in (32, 65):
        _edit_json(folder / "config.json", vocab_size=vocab)
        with pytest.raises(
            ValueError, match=rf"config\.json: vocab_size: {vocab}, but model\.onnx returns 64 logits"
        ):
            OnnxCausalLM(folder, check_batching=False)


def _tokenizer_with(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = folder / "tokenizer.json"
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    edit(tokenizer)
    path.write_text(json.dumps(tokenizer), encoding="utf-8")


def _post_processor_bos(tokenizer: dict[str, Any]) -> None:
    tokenizer["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1000], "tokens": ["<s>"]}},
    }


def _letter_z_at_1000(tokenizer: dict[str, Any]) -> None:
    tokenizer["model"]["vocab"]["z"] = 1000  # a hole at z's id: still 64 tokens


def test_a_tokenizer_whose_ids_pass_the_logits_is_refused_at_load(tmp_path: Path) -> None:
    """Its post-processor's BOS, which every text prompt gets, past the logits."""
    folder = _copy(tmp_path)
    _tokenizer_with(folder, _post_processor_bos)
    with pytest.raises(
        ValueError, match=r"tokenizer: the special token '<s>' its post-processor adds has the id 1000, but"
    ):
        OnnxCausalLM(folder)
    OnnxCausalLM(folder, add_special_tokens=False)  # then never added


def test_text_and_chat_prompts_whose_ids_pass_the_logits_fail_alone(tmp_path: Path) -> None:
    """A tokenizer whose vocabulary has a hole ('z' at id 1000, still 64 tokens) loads; a prompt with a
    'z' fails alone with the reason, the others start (ONNX Runtime's Gather failed the whole batch)."""
    pytest.importorskip("jinja2")
    folder = _copy(tmp_path)
    _tokenizer_with(folder, _letter_z_at_1000)
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    policy = OnnxCausalLM(folder, max_new_tokens=2, chat_template=template)
    with pytest.raises(ValueError, match=r"token id 1000 \('z'\), outside the model's vocabulary \[0, 64\)"):
        policy.encode_prompt("az")
    chat = [{"role": "user", "content": "zz"}]
    particles = policy.start(["ab", "az", [3, 4], chat], 2)
    assert sorted(particles.errors) == [1, 3]
    assert "token id 1000" in particles.errors[1] and "token id 1000" in particles.errors[3]
    assert particles.finished[[1, 3]].all() and not particles.finished[[0, 2]].any()
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 64\), got 64"):
        policy.encode_prompt([3, 64])


# -- the KV cache (defect 4) --------------------------------------------------------------------------------


def _dynamic_heads(outputs_too: bool) -> Callable[[Any, Any], None]:
    def edit(graph: Any, onnx: Any) -> None:
        for value in [*graph.input, *(graph.output if outputs_too else [])]:
            if value.name.startswith(("past_key_values", "present")):
                value.type.tensor_type.shape.dim[1].dim_param = "heads"

    return edit


@pytest.mark.parametrize("outputs_too", [False, True], ids=["present-declared", "present-dynamic"])
def test_cache_heads_from_config_json_are_checked_against_the_graph(
    tmp_path: Path, outputs_too: bool
) -> None:
    """The graph's head axis dynamic and config.json without num_key_value_heads: num_attention_heads (4)
    is not the cache's 2 heads. Refused naming the field and the graph's shape (it loaded, then failed at
    the first step)."""
    folder = _edit_graph(_copy(tmp_path), _dynamic_heads(outputs_too))
    assert OnnxCausalLM(folder).kv_heads == 2  # num_key_value_heads
    _edit_json(folder / "config.json", num_key_value_heads=None)
    with pytest.raises(
        ValueError,
        match=r"config\.json: num_attention_heads gives the KV cache 4 heads a layer, but model\.onnx's "
        r"present\.0\.key .*2 heads a layer; the graph declares past_key_values\.0\.key "
        r"\['batch_size', 'heads', .*set num_key_value_heads to 2 in config\.json",
    ):
        OnnxCausalLM(folder, check_batching=False)


def test_cache_head_size_from_config_json_is_checked(tmp_path: Path) -> None:
    def dynamic_head_size(graph: Any, onnx: Any) -> None:
        for value in [*graph.input, *graph.output]:
            if value.name.startswith(("past_key_values", "present")):
                value.type.tensor_type.shape.dim[3].dim_param = "head_dim"

    folder = _edit_graph(_copy(tmp_path), dynamic_head_size)
    _edit_json(folder / "config.json", head_dim=None, hidden_size=64)  # 64 / 4 heads: 16, not 8
    with pytest.raises(
        ValueError,
        match=r"config\.json: hidden_size / num_attention_heads gives the KV cache heads of size 16, but "
        r"model\.onnx's present\.0\.key has shape \(1, 2, 2, 8\) for one 2-token prompt \(heads of size 8; "
        r"the graph declares past_key_values\.0\.key .*set head_dim to 8 in config\.json",
    ):
        OnnxCausalLM(folder)


# -- the inputs (defects 6 and 7) ---------------------------------------------------------------------------


def test_an_input_of_another_type_is_refused_naming_it(tmp_path: Path) -> None:
    """An int32 attention_mask: ONNX Runtime's InvalidArgument named neither the file nor the input."""

    def int32_mask(graph: Any, onnx: Any) -> None:
        mask = next(value for value in graph.input if value.name == "attention_mask")
        mask.type.tensor_type.elem_type = onnx.TensorProto.INT32
        for node in graph.node:
            node.input[:] = ["mask64" if name == "attention_mask" else name for name in node.input]
        cast = onnx.helper.make_node("Cast", ["attention_mask"], ["mask64"], to=onnx.TensorProto.INT64)
        graph.node.insert(0, cast)

    folder = _edit_graph(_copy(tmp_path), int32_mask)
    with pytest.raises(
        ValueError,
        match=r"path: model\.onnx: input attention_mask is tensor\(int32\), but tiltsmc feeds it "
        r"tensor\(int64\)",
    ):
        OnnxCausalLM(folder)


def test_an_input_tiltsmc_does_not_feed_is_refused_naming_it(tmp_path: Path) -> None:
    def token_types(graph: Any, onnx: Any) -> None:
        graph.input.append(
            onnx.helper.make_tensor_value_info("token_type_ids", onnx.TensorProto.INT64, ["batch", "seq"])
        )
        graph.node.append(onnx.helper.make_node("Identity", ["token_type_ids"], ["token_types_out"]))
        graph.output.append(
            onnx.helper.make_tensor_value_info("token_types_out", onnx.TensorProto.INT64, ["batch", "seq"])
        )

    folder = _edit_graph(_copy(tmp_path), token_types)
    for check_batching in (True, False):
        with pytest.raises(
            ValueError, match=r"path: model\.onnx has inputs tiltsmc does not feed: token_type_ids"
        ):
            OnnxCausalLM(folder, check_batching=check_batching)


def test_a_graph_without_position_ids_is_refused_naming_them(tmp_path: Path) -> None:
    """Positions numbered by the graph from the past's length (as old exports do): a padded row's are
    shifted. The message blamed GroupQueryAttention or int8 quantisation."""

    def positions_from_lengths(graph: Any, onnx: Any) -> None:
        graph.input.remove(next(value for value in graph.input if value.name == "position_ids"))

        def constant(name: str, value: Any) -> str:
            return _constant(graph, onnx, name, np.array(value, dtype=np.int64))

        make = onnx.helper.make_node
        nodes = [
            make("Shape", ["input_ids"], ["ids_shape"]),
            make("Shape", ["attention_mask"], ["mask_shape"]),
            make("Gather", ["ids_shape", constant("one", 1)], ["new"]),
            make("Gather", ["mask_shape", constant("one_b", 1)], ["total"]),
            make("Sub", ["total", "new"], ["past"]),
            make("Range", ["past", "total", constant("step", 1)], ["range"]),
            make("Unsqueeze", ["range", constant("axis", [0])], ["row"]),
            make("Gather", ["ids_shape", constant("zero", [0])], ["rows"]),
            make("Concat", ["rows", constant("ones", [1])], ["tiles"], axis=0),
            make("Tile", ["row", "tiles"], ["position_ids"]),
        ]
        for node in reversed(nodes):
            graph.node.insert(0, node)

    folder = _edit_graph(_copy(tmp_path), positions_from_lengths)
    with pytest.raises(ValueError, match=r"It has no position_ids input, so it numbers each row's positions"):
        OnnxCausalLM(folder)


# -- a value head (defect 3) --------------------------------------------------------------------------------


def test_a_pooled_value_output_is_refused_at_load(tmp_path: Path) -> None:
    """A value head of one score a row, (batch, 1), passed the check of its shape, and start() then died
    in numpy (IndexError)."""

    def pooled_value(graph: Any, onnx: Any) -> None:
        make = onnx.helper.make_node
        axes = _constant(graph, onnx, "axes", np.array([1, 2], dtype=np.int64))
        graph.node.append(make("ReduceMean", ["logits", axes], ["pooled"], keepdims=0))
        one = _constant(graph, onnx, "one", np.array([1], dtype=np.int64))
        graph.node.append(make("Unsqueeze", ["pooled", one], ["value"]))
        shape = ["batch_size", 1]
        graph.output.append(onnx.helper.make_tensor_value_info("value", onnx.TensorProto.FLOAT, shape))

    folder = _edit_graph(_copy(tmp_path), pooled_value)
    with pytest.raises(
        ValueError,
        match=r"value_output: 'value' gives shape \(1, 1\) for one 2-token prompt .*a pooled score",
    ):
        OnnxCausalLM(folder, value_output="value")
    OnnxCausalLM(folder)  # the output is not read unless asked for


# -- chat_template= (defect 8) ------------------------------------------------------------------------------


def test_chat_template_argument_is_checked_at_construction(tmp_path: Path) -> None:
    pytest.importorskip("jinja2")
    with pytest.raises(ValueError, match=r"chat_template: not a valid Jinja template"):
        OnnxCausalLM(LLAMA, tokenizer=CHAT, chat_template="{% for %}")
    template_file = tmp_path / "template.jinja"
    template_file.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"chat_template: expected the template's text, got the path of a file"
    ):
        OnnxCausalLM(LLAMA, tokenizer=CHAT, chat_template=str(template_file))
    with pytest.raises(ValueError, match=r"has no Jinja markup .*: a file's path\? pass the template's text"):
        OnnxCausalLM(LLAMA, tokenizer=CHAT, chat_template="/no/such/template.jinja")
    with pytest.raises(ValueError, match=r"chat_template: .* has no Jinja markup"):
        load_tokenizer(None, CHAT, chat_template="you are a helpful assistant")
    policy = OnnxCausalLM(LLAMA, tokenizer=CHAT, chat_template=template_file.read_text(encoding="utf-8"))
    assert policy.encode_prompt([{"role": "user", "content": "ab"}]).tolist() == [3, 4]


# -- the folder's files (defect 9) --------------------------------------------------------------------------


def test_a_model_file_that_is_not_a_file_is_named_with_what_it_is(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    (folder / "model.onnx").unlink()
    (folder / "model.onnx").mkdir()
    with pytest.raises(ValueError, match=r"path: .*model\.onnx is a directory, not an ONNX model file"):
        OnnxCausalLM(folder)
    if sys.platform != "win32":
        (folder / "model.onnx").rmdir()
        os.symlink(tmp_path / "nowhere.onnx", folder / "model.onnx")
        with pytest.raises(ValueError, match=r"model\.onnx is a broken symbolic link \(to .*nowhere\.onnx\)"):
            OnnxCausalLM(folder)
        with pytest.raises(ValueError, match=r"is a broken symbolic link .*not a folder or an \.onnx file"):
            OnnxCausalLM(folder / "model.onnx")


@pytest.mark.parametrize(
    "name", ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
)
def test_a_config_file_that_is_a_directory_is_refused_not_ignored(tmp_path: Path, name: str) -> None:
    folder = _copy(tmp_path)
    (folder / name).unlink()
    (folder / name).mkdir()
    with pytest.raises(ValueError, match=rf"{re.escape(name)} is a directory, not a file"):
        OnnxCausalLM(folder)


def test_decoding_a_negative_id_is_a_value_error() -> None:
    policy = OnnxCausalLM(LLAMA, check_batching=False)
    for ids in ([-1], [3, 1 << 40]):
        with pytest.raises(ValueError, match=r"decode: expected token ids in \[0, 2\*\*32\), got"):
            policy.decode(ids)
    assert policy.tokenizer is not None
    with pytest.raises(ValueError, match=r"decode: expected token ids in \[0, 2\*\*32\), got -3"):
        policy.tokenizer.decode_batch([[3, 4], [5, -3]])
    assert policy.decode([3, 4]) == "ab"
