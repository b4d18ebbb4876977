"""``OnnxCausalLM`` on inputs at the edge of what it takes: graphs whose inputs tiltsmc cannot feed (refused
at load, naming the file and the input), stop strings split by tokens without text, temperatures far
below 1, and text prompts the tokenizer encodes to nothing. Each on the small fixtures, or copies of them
edited with the ``onnx`` package."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from tiltsmc.models import OnnxCausalLM
from tiltsmc.models.onnx_lm import log_softmax

FIXTURES = Path(__file__).parent / "fixtures" / "models"
GPT2 = FIXTURES / "gpt2-tiny"
LLAMA = FIXTURES / "llama-tiny"  # two layers; it declares every output's vocabulary, heads and head size
VOCAB = 64


def edited(folder: Path, edit: Callable[[Any], None], fixture: Path = LLAMA) -> Path:
    """A copy of ``fixture`` in ``folder`` whose graph ``edit`` changed (skipped without onnx)."""
    onnx = pytest.importorskip("onnx")
    shutil.copytree(fixture, folder)
    model = onnx.load(folder / "model.onnx")
    edit(model)
    onnx.save(model, folder / "model.onnx")
    return folder


def fixed(names: Callable[[str], bool], axis: int, size: int) -> Callable[[Any], None]:
    """An edit declaring ``size`` on ``axis`` of the graph's inputs and outputs that ``names`` picks."""

    def edit(model: Any) -> None:
        for value in [*model.graph.input, *model.graph.output]:
            if names(value.name):
                value.type.tensor_type.shape.dim[axis].dim_value = size

    return edit


# -- A. inputs tiltsmc cannot feed -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["key", "value"])
def test_a_layer_without_its_past_key_or_value_input_is_refused_naming_it(tmp_path: Path, kind: str) -> None:
    """A graph whose layer 1 reads its past key (or value) from the other input of the pair: loaded, its
    missing input is listed with the outputs that are, not ONNX Runtime's "Invalid input name" at the
    first run."""
    gone, kept = f"past_key_values.1.{kind}", f"past_key_values.1.{'value' if kind == 'key' else 'key'}"

    def drop(model: Any) -> None:
        inputs = [value for value in model.graph.input if value.name != gone]
        del model.graph.input[:]
        model.graph.input.extend(inputs)
        for node in model.graph.node:
            node.input[:] = [kept if name == gone else name for name in node.input]

    folder = edited(tmp_path / "llama-one-past", drop)
    for check_batching in (True, False):
        with pytest.raises(
            ValueError,
            match=rf"model\.onnx is not a decoder with KV cache in the optimum layout: missing "
            rf"{gone.replace('.', '[.]')}; inputs found: ",
        ):
            OnnxCausalLM(folder, check_batching=check_batching)


@pytest.mark.parametrize(
    ("names", "axis", "size", "named", "what"),
    [
        pytest.param(lambda name: True, 0, 1, "input_ids", "batch", id="batch"),
        pytest.param(lambda name: name.startswith("past_key_values"), 2, 16, "past_key_values.0.key",
                     "past length", id="past"),
        pytest.param(lambda name: name in ("input_ids", "position_ids"), 1, 1, "input_ids", "sequence",
                     id="sequence"),
        pytest.param(lambda name: name == "attention_mask", 1, 8, "attention_mask", "sequence",
                     id="mask"),
        pytest.param(lambda name: name == "position_ids", 0, 2, "position_ids", "batch",
                     id="positions-batch"),
    ],
)  # fmt: skip
def test_a_fixed_size_on_an_axis_tiltsmc_varies_is_refused_at_load(
    tmp_path: Path, names: Callable[[str], bool], axis: int, size: int, named: str, what: str
) -> None:
    """A graph exported with a fixed batch, past length or sequence: refused at load, with or without the
    batching check, naming the file, the input and the axis (before, ONNX Runtime's "Got invalid
    dimensions" at the batching check or the first start, naming neither)."""
    folder = edited(tmp_path / "llama-fixed", fixed(names, axis, size))
    for check_batching in (True, False):
        with pytest.raises(
            ValueError,
            match=rf"^path: model\.onnx: input {named.replace('.', '[.]')} has shape .*, a fixed size {size} "
            rf"on axis {axis}, its {what} .*export the model with that axis dynamic",
        ):
            OnnxCausalLM(folder, check_batching=check_batching)


def test_an_onnx_runtime_error_in_the_batching_check_names_the_file(tmp_path: Path) -> None:
    """A graph whose logits go through a Reshape to one row of two positions: its declared shapes pass,
    but the batching check's batch of two prompts fails in ONNX Runtime, reported as a ValueError naming
    the file and what was fed."""

    def one_row(model: Any) -> None:
        from onnx import helper, numpy_helper

        graph = model.graph
        for node in graph.node:
            node.output[:] = ["logits_raw" if name == "logits" else name for name in node.output]
        graph.initializer.append(numpy_helper.from_array(np.array([1, 2, VOCAB], dtype=np.int64), "one_row"))
        graph.node.append(helper.make_node("Reshape", ["logits_raw", "one_row"], ["logits"]))

    folder = edited(tmp_path / "llama-one-row", one_row)
    with pytest.raises(
        ValueError,
        match=r"^path: model\.onnx fails on the batching check \(padding_side='left': two prompts .*\): "
        r"\[ONNXRuntimeError\]",
    ) as raised:
        OnnxCausalLM(folder)
    assert type(raised.value.__cause__).__module__.startswith("onnxruntime")


# -- B. stop strings split by tokens without text --------------------------------------------------------


@pytest.mark.parametrize("padding", [8, 40])
def test_a_stop_string_split_by_special_tokens_ends_the_trajectory(padding: int) -> None:
    """ "a", ``padding`` <pad> tokens (special: decoded to nothing), "b": the text is "ab", so the trajectory
    ends at "b" with the stop string "ab" however many pads lie between (the window of 8 tokens held "b"
    alone); decoded with its special tokens, the text holds no "ab", and it goes on."""
    policy = OnnxCausalLM(GPT2, max_new_tokens=60, stop=["ab"])
    a, pad, b, c = (policy.tokenizer.token_id(text) for text in ("a", "<pad>", "b", "c"))  # type: ignore[union-attr]
    tokens = [a] + [pad] * padding + [b, c]
    particles = policy.start(["hello"], 1)
    for token in tokens:
        if particles.finished[0, 0]:
            break
        policy.append(particles, np.array([[token]]))
    assert particles.finished[0, 0] and particles.lengths[0, 0] == padding + 2
    assert policy.decode(particles.tokens[0, 0, : padding + 2]) == ""
    kept = OnnxCausalLM(GPT2, max_new_tokens=60, stop=["ab"], skip_special_tokens=False)
    particles = kept.start(["hello"], 1)
    for token in tokens:
        kept.append(particles, np.array([[token]]))
    assert not particles.finished[0, 0] and particles.lengths[0, 0] == len(tokens)


# -- C. temperatures far below 1 -------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-30, 1e-45, 1e-300])
@pytest.mark.parametrize("options", [{}, {"top_k": 5}, {"top_p": 0.9}], ids=["plain", "top_k", "top_p"])
def test_a_tiny_temperature_gives_the_most_likely_token(temperature: float, options: dict[str, Any]) -> None:
    """Logits divided by a temperature of 1e-45 pass float32's range (1e-300 is 0 in float32): the law is
    then its limit, the most likely token with probability 1 (no NaN, no error), drawn as such: before,
    NaN log-probabilities, and an internal error with top-k or top-p."""
    policy = OnnxCausalLM(GPT2, max_new_tokens=4, temperature=temperature, **options)
    particles = policy.start(["hello", "the cat"], 3)
    logits = particles.state["lm.logits"].astype(np.float64)
    log_p = policy.next_log_probs(particles)
    best = logits.argmax(axis=-1)
    assert (logits == logits.max(axis=-1, keepdims=True)).sum(axis=-1).max() == 1  # no tie
    assert not np.isnan(log_p).any()
    one_hot = np.zeros(log_p.shape)
    np.put_along_axis(one_hot, best[..., None], 1.0, axis=-1)
    np.testing.assert_array_equal(np.exp(log_p), one_hot)  # the others' log p: -inf, or below -1e29
    np.testing.assert_array_equal(np.take_along_axis(log_p, best[..., None], axis=-1), 0.0)
    drawn = policy.propose(particles, np.random.default_rng(0))
    assert not particles.errors
    np.testing.assert_array_equal(drawn, 0.0)
    np.testing.assert_array_equal(particles.tokens[:, :, 0], best)


@pytest.mark.parametrize("temperature", [0.7, 1e-3, 3.0, 1e30])
def test_an_ordinary_temperature_is_the_float32_quotient_as_before(temperature: float) -> None:
    """Where the quotients fit, the law is computed as it always was: ``log_softmax(logits /
    temperature)`` with the logits' float32 quotient, bit for bit."""
    policy = OnnxCausalLM(GPT2, max_new_tokens=4, temperature=temperature)
    particles = policy.start(["hello", "the cat"], 2)
    logits = particles.state["lm.logits"]
    assert logits.dtype == np.float32
    np.testing.assert_array_equal(policy.next_log_probs(particles), log_softmax(logits / temperature))


# -- E. text prompts encoded to nothing ------------------------------------------------------------------


def test_a_text_prompt_encoded_to_no_tokens_fails_alone(tmp_path: Path) -> None:
    """A BPE tokenizer without an unk_token drops the characters it has no token for: "{}" encodes to no
    ids, and is refused naming it (it ran as the empty prompt, unconditioned), in ``start`` for that
    prompt alone; the empty prompt is still the BOS token alone."""
    folder = tmp_path / "gpt2-no-unk"
    shutil.copytree(GPT2, folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    tokenizer["model"] = {"type": "BPE", "vocab": vocab, "merges": [], "unk_token": None, "dropout": None,
                          "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
                          "byte_fallback": False}  # fmt: skip
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    policy = OnnxCausalLM(folder, max_new_tokens=4)
    assert policy.tokenizer is not None and policy.tokenizer.encode("{}").size == 0
    message = r"the tokenizer gave no tokens for the text prompt '\{\}'"
    with pytest.raises(ValueError, match=message):
        policy.encode_prompt("{}")
    assert policy.encode_prompt("").tolist() == [policy.bos_token_id]
    particles = policy.start(["{}", "", "ab"], 2)
    assert list(particles.errors) == [0] and particles.errors[0].startswith("prompt 0: the tokenizer gave no")
    assert particles.finished[0].all() and not particles.finished[1:].any()
    assert [ids.tolist() for ids in particles.prompt_tokens[1:]] == [[policy.bos_token_id], [3, 4]]
