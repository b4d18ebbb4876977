"""Reward graphs whose layout the options must fit, found by fuzzing: the output's layout (a score or class
vector per row or per position) is read from its declared shape, or from a probe at load where the shape
leaves it open, and a layout that fits neither the options nor any reading, outputs of other ranks or
types, and inputs of types tiltsmc cannot feed (int32 ids among them, as the policy's) are refused at
load naming the output or input. An empty prompt's value is 0 without touching the others', and
``token_map`` never looks up the reward model's own padding id. Test graphs are built from the fixtures
at test time."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
from tiltsmc.models import OnnxRewardModel, Particles
from tiltsmc.models import onnx_reward as onnx_reward_module

MODELS = Path(__file__).resolve().parent / "fixtures" / "models"
PRM, VALUE = MODELS / "prm-tiny", MODELS / "gpt2-value-tiny"
GPT2 = MODELS / "gpt2-tiny"
FLOAT, INT32, INT64, BOOL = 1, 6, 7, 9  # onnx.TensorProto's element types
# the one wording of a float-type refusal (_ort.float_type_error), after "is tensor(<its type>); "
FLOAT_TYPE = r"expected scores of a float type: tensor\(float\), tensor\(float16\) or tensor\(double\)"

# build(helper, graph, raw, out, const) adds the nodes that compute ``out`` from the fixture's output ``raw``
Build = Callable[[Any, Any, str, str, Callable[[str, Any], str]], None]


def rewritten(
    folder: Path,
    build: Optional[Build],
    shape: Any = None,
    *,
    fixture: Path = PRM,
    source: str = "logits",
    elem_type: int = FLOAT,
    inputs: Optional[dict[str, int]] = None,
    open_last: bool = False,
) -> Path:
    """A copy of ``fixture`` whose output ``source`` is rewritten by ``build`` and declared with ``shape``
    and ``elem_type``, and whose ``inputs`` are declared of the given element types (cast back inside).
    ``open_last``: the last axis reshaped to -1 at run time, so that ONNX Runtime cannot infer its size
    (it reports a size it infers in place of the declared name)."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    shutil.copytree(fixture, folder)
    model = onnx.load(folder / "model.onnx")
    graph = model.graph

    def const(name: str, value: Any) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    if build is not None:
        raw = source + "_raw"
        for node in graph.node:
            node.output[:] = [raw if name == source else name for name in node.output]
        old = next(out for out in graph.output if out.name == source)
        at = list(graph.output).index(old)
        graph.output.remove(old)
        built = source + "_built" if open_last else source
        build(helper, graph, raw, built, const)
        if open_last:
            leading = const("leading", np.array([len(shape) - 1], dtype=np.int64))
            graph.node.extend(
                [
                    helper.make_node("Shape", [built], ["built_shape"]),
                    helper.make_node(
                        "Slice", ["built_shape", const("zero", np.array([0])), leading], ["kept"]
                    ),
                    helper.make_node(
                        "Concat", ["kept", const("minus_one", np.array([-1]))], ["target"], axis=0
                    ),
                    helper.make_node("Reshape", [built, "target"], [source]),
                ]
            )
        graph.output.insert(at, helper.make_tensor_value_info(source, elem_type, shape))
    for name, element in (inputs or {}).items():
        declared = next(node for node in graph.input if node.name == name)
        declared.type.tensor_type.elem_type = element
        for node in graph.node:
            node.input[:] = [name + "_wide" if x == name else x for x in node.input]
        wide = INT64 if element in (INT32, FLOAT) else FLOAT
        graph.node.insert(0, helper.make_node("Cast", [name], [name + "_wide"], to=wide))
    onnx.save(model, folder / "model.onnx")
    return folder


def two_classes(helper: Any, graph: Any, raw: str, out: str, const: Callable[[str, Any], str]) -> None:
    """(batch, seq, 1) -> (batch, seq, 2): the scores ``[s, -s]`` at every position."""
    graph.node.append(helper.make_node("Neg", [raw], ["negated"]))
    graph.node.append(helper.make_node("Concat", [raw, "negated"], [out], axis=2))


def pooled_classes(helper: Any, graph: Any, raw: str, out: str, const: Callable[[str, Any], str]) -> None:
    """(batch, seq, 1) -> (batch, 2): ``[m, -m]`` with ``m`` the mean score over the positions (optimum's
    text-classification layout)."""
    axes = const("axes_1_2", np.array([1, 2], dtype=np.int64))
    graph.node.append(helper.make_node("ReduceMean", [raw, axes], ["mean"], keepdims=0))
    graph.node.append(helper.make_node("Unsqueeze", ["mean", const("axis_1", np.array([1]))], ["mean_1"]))
    graph.node.append(helper.make_node("Neg", ["mean_1"], ["negated"]))
    graph.node.append(helper.make_node("Concat", ["mean_1", "negated"], [out], axis=1))


def squeezed(helper: Any, graph: Any, raw: str, out: str, const: Callable[[str, Any], str]) -> None:
    """(batch, seq, 1) -> (batch, seq)."""
    graph.node.append(helper.make_node("Squeeze", [raw, const("axis_2", np.array([2]))], [out]))


def op(name: str, **attributes: Any) -> Build:
    def build(helper: Any, graph: Any, raw: str, out: str, const: Callable[[str, Any], str]) -> None:
        if name == "Unsqueeze":
            graph.node.append(helper.make_node(name, [raw, const("axis_0", np.array([0]))], [out]))
        elif name == "ReduceMean":
            axes = const("all_axes", np.array([0, 1, 2], dtype=np.int64))
            graph.node.append(helper.make_node(name, [raw, axes], [out], keepdims=0))
        else:
            graph.node.append(helper.make_node(name, [raw], [out], **attributes))

    return build


def prompts_particles(prompts: list[list[int]], count: int = 1) -> Particles:
    particles = Particles.empty([None] * len(prompts), count, 4)
    particles.prompt_tokens = [np.array(p, dtype=np.int64) for p in prompts]
    return particles


def session_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The ``input_ids`` shapes of every session call of reward models made from now on, at load too."""
    shapes: list[tuple[int, ...]] = []
    make = onnx_reward_module.make_session

    def counted(*args: Any, **kwargs: Any) -> Any:
        session = make(*args, **kwargs)
        run = session.run

        def recorded(outputs: Any, feeds: dict[str, np.ndarray], *more: Any, **options: Any) -> Any:
            shapes.append(tuple(feeds["input_ids"].shape))
            return run(outputs, feeds, *more, **options)

        session.run = recorded
        return session

    monkeypatch.setattr(onnx_reward_module, "make_session", counted)
    return shapes


# -- defect 1: a (batch, k) class axis and a (batch, seq) score axis told apart ---------------------------


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reward-graphs")
    return {
        "pooled": rewritten(root / "pooled", pooled_classes, ["batch_size", 2]),
        "pooled_dynamic": rewritten(
            root / "pooled_dynamic", pooled_classes, ["batch_size", "classes"], open_last=True
        ),
        "pooled_unnamed": rewritten(root / "pooled_unnamed", pooled_classes, [None, None], open_last=True),
        "two_per_position": rewritten(root / "two", two_classes, ["batch_size", "sequence_length", 2]),
        "two_dynamic": rewritten(
            root / "two_dynamic", two_classes, ["batch_size", "sequence_length", "k"], open_last=True
        ),
        "squeezed": rewritten(root / "squeezed", squeezed, ["batch_size", "sequence_length"]),
        "squeezed_dynamic": rewritten(root / "squeezed_dynamic", squeezed, ["batch_size", "length"]),
        "squeezed_unnamed": rewritten(root / "squeezed_unnamed", squeezed, [None, None]),
        "one_dynamic": rewritten(
            root / "one_dynamic", op("Identity"), ["batch_size", "sequence_length", "k"], open_last=True
        ),
    }


@pytest.mark.parametrize("name", ["pooled", "pooled_dynamic", "pooled_unnamed"])
@pytest.mark.parametrize("width", [2, 3])
def test_a_two_label_classifier_needs_label_at_load(
    graphs: dict[str, Path], name: str, width: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """optimum's text-classification layout (batch, 2) without label= is refused at load, whether its class
    axis is declared fixed or left open (probed); with label= it reads class k's log-softmax at any width,
    the 2-token prefixes included (they were read as one score per position, class 1 as log Vh)."""
    with pytest.raises(ValueError, match=r"output: 'logits' has 2 classes \(shape .*\); pass label="):
        OnnxRewardModel(graphs[name], kind="logit")
    calls = session_calls(monkeypatch)
    reward = OnnxRewardModel(graphs[name], kind="logit", label=1)
    assert len(calls) == (0 if name == "pooled" else 2)  # a class axis left open is probed at load
    assert not reward.per_position
    prompts = [[3, 5, 9][:width], [7, 9, 4][:width]]
    scores = OnnxRewardModel(PRM, kind="log_value").session.run(
        ["logits"], {"input_ids": np.array(prompts), "attention_mask": np.ones((2, width), dtype=np.int64)}
    )[0]
    mean = scores.astype(np.float64).mean(axis=(1, 2))
    expected = -mean - np.logaddexp(mean, -mean)  # log softmax([m, -m])[1]
    got = reward.initial_log_value(prompts_particles(prompts))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"label: 2 is not a class of 'logits' \(2 classes\)"):
        OnnxRewardModel(graphs[name], kind="logit", label=2)
    with pytest.raises(ValueError, match=r"classes: 5 is not a class of 'logits' \(2 classes\)"):
        OnnxRewardModel(graphs[name], kind="logit", label=1, classes=[1, 5])


@pytest.mark.parametrize("name", ["two_per_position", "two_dynamic"])
def test_classes_per_position_need_label_at_load(graphs: dict[str, Path], name: str) -> None:
    """(batch, seq, 2), its class axis fixed or open: refused without label=, label out of range refused at
    load; with label=1 it reads ``[s, -s]``'s class 1 at the last token of ragged prompts."""
    with pytest.raises(ValueError, match=r"output: 'logits' has 2 classes per position .*pass label="):
        OnnxRewardModel(graphs[name], kind="logit")
    with pytest.raises(ValueError, match=r"label: 3 is not a class of 'logits' \(2 classes\)"):
        OnnxRewardModel(graphs[name], kind="logit", label=3)
    reward = OnnxRewardModel(graphs[name], kind="logit", label=1)
    particles = prompts_particles([[3, 5, 9], [7]])
    score = OnnxRewardModel(PRM, kind="log_value").initial_log_value(particles)
    np.testing.assert_allclose(
        reward.initial_log_value(particles), -score - np.logaddexp(score, -score), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("name", ["squeezed", "squeezed_dynamic", "squeezed_unnamed", "one_dynamic"])
def test_one_score_per_position_declared_or_probed(
    graphs: dict[str, Path], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(batch, seq) and (batch, seq, k) read as prm-tiny's (batch, seq, 1), the sequence axis named as
    input_ids' (no session call at load) or not (two probe calls); label= on (batch, seq) is refused."""
    if name != "one_dynamic":  # it read position k's score as class k's logit
        with pytest.raises(
            ValueError, match=r"label: output 'logits' has one score a position .*no class axis"
        ):
            OnnxRewardModel(graphs[name], kind="logit", label=0)
    calls = session_calls(monkeypatch)
    reward = OnnxRewardModel(graphs[name], kind="logit")
    assert reward.per_position
    assert len(calls) == (0 if name == "squeezed" else 2)
    particles = prompts_particles([[3, 5, 9], [7], [1, 2]], count=2)
    particles.tokens[:, :, :2] = [[[4, 8], [6, 2]], [[9, 9], [3, 1]], [[5, 7], [2, 2]]]
    particles.lengths[:] = [[2, 1], [0, 2], [1, 2]]
    expected = OnnxRewardModel(PRM, kind="logit")
    np.testing.assert_array_equal(reward.initial_log_value(particles), expected.initial_log_value(particles))
    np.testing.assert_array_equal(reward.log_value(particles), expected.log_value(particles))


def test_prm_and_class_heads_load_without_a_session_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shapes named as input_ids' settle the layout: the fixtures load as before, without running."""
    calls = session_calls(monkeypatch)
    OnnxRewardModel(PRM, kind="logit")
    OnnxRewardModel(MODELS / "gpt2-tiny", kind="logit", label=3, kv_cache=False)
    assert calls == []


# -- defect 5: outputs of other ranks or types refused at load -------------------------------------------


@pytest.mark.parametrize(
    ("build", "shape", "elem_type", "message"),
    [
        (op("Unsqueeze"), [1, "batch_size", "sequence_length", 1], FLOAT, r"has shape \[1, 'batch_size'"),
        (op("ReduceMean"), [], FLOAT, r"\(declared \[\]\) gave shapes \[\] and \[\] for 2 rows"),
        (op("Transpose", perm=[1, 0, 2]), ["s", "b", 1], FLOAT, r"gave shapes \[3, 2, 1\] and \[5, 2, 1\]"),
        (op("Cast", to=INT64), ["batch_size", "sequence_length", 1], INT64, rf"int64\); {FLOAT_TYPE}"),
        (op("Cast", to=BOOL), ["batch_size", "sequence_length", 1], BOOL, rf"bool\); {FLOAT_TYPE}"),
    ],
    ids=["rank4", "rank0", "transposed", "int64", "bool"],
)
@pytest.mark.parametrize("kind", ["logit", "prob"])
def test_outputs_of_other_ranks_and_types_are_refused_at_load(
    tmp_path: Path, build: Build, shape: Any, elem_type: int, message: str, kind: str
) -> None:
    folder = rewritten(tmp_path / "graph", build, shape, elem_type=elem_type)
    with pytest.raises(ValueError, match=r"output: 'logits' .*" + message):
        OnnxRewardModel(folder, kind=kind)  # type: ignore[arg-type]


def test_a_float_type_is_checked_in_one_wording() -> None:
    """The KV cache inputs' and the scores' types are refused in one wording (``_ort.float_type_error``),
    naming the argument and the input or output."""
    from tiltsmc.models._ort import check_cache_input

    session = OnnxRewardModel(VALUE, output="value", kind="logit").session
    inputs = {node.name: node for node in session.get_inputs()}
    assert check_cache_input(Path("model.onnx"), inputs["past_key_values.0.key"]) is np.float32
    with pytest.raises(ValueError) as refused:
        check_cache_input(Path("model.onnx"), inputs["input_ids"])
    assert str(refused.value) == (
        "path: model.onnx: input input_ids is tensor(int64); expected a KV cache of a float type: "
        "tensor(float), tensor(float16) or tensor(double) (ONNX Runtime returns no other float type to "
        "Python)"
    )


def test_a_value_head_pooled_per_row_keeps_no_cache(tmp_path: Path) -> None:
    """A decoder's (batch, 1) value is read per row (re-encoded); kv_cache=True says why it keeps none."""

    def pooled(helper: Any, graph: Any, raw: str, out: str, const: Callable[[str, Any], str]) -> None:
        axes = const("axes_1", np.array([1], dtype=np.int64))
        graph.node.append(helper.make_node("ReduceMax", [raw, axes], ["top"], keepdims=0))
        graph.node.append(helper.make_node("Identity", ["top"], [out]))

    folder = rewritten(tmp_path / "value", pooled, ["batch_size", 1], fixture=VALUE, source="value")
    reward = OnnxRewardModel(folder, output="value", kind="logit")
    assert not reward.kv_cached
    with pytest.raises(ValueError, match=r"kv_cache: .*not one score per position"):
        OnnxRewardModel(folder, output="value", kind="logit", kv_cache=True)


# -- defect 4: input types ------------------------------------------------------------------------------


@pytest.mark.parametrize(("fixture", "options"), [(PRM, {}), (VALUE, {"output": "value"})])
def test_int32_inputs_are_refused_at_load_as_the_policy_refuses_them(
    tmp_path: Path, fixture: Path, options: dict[str, Any]
) -> None:
    """A graph declaring its ids, mask and positions int32 is refused at load naming the input (ONNX Runtime
    refused the int64 feeds at the first call, naming neither)."""
    names = ("input_ids", "attention_mask", "position_ids")
    declared = {node.name for node in OnnxRewardModel(fixture, **options).session.get_inputs()}
    folder = rewritten(
        tmp_path / "int32", None, fixture=fixture, inputs={n: INT32 for n in names if n in declared}
    )
    with pytest.raises(
        ValueError, match=r"path: model\.onnx: input \w+ is tensor\(int32\), but tiltsmc feeds"
    ):
        OnnxRewardModel(folder, kind="logit", **options)


def test_inputs_of_types_it_cannot_feed_are_refused_at_load(tmp_path: Path) -> None:
    folder = rewritten(tmp_path / "float-mask", None, inputs={"attention_mask": FLOAT})
    with pytest.raises(
        ValueError,
        match=r"path: model\.onnx: input attention_mask is tensor\(float\), but tiltsmc feeds it",
    ):
        OnnxRewardModel(folder, kind="logit")


# -- defect 2: an empty prompt's value is its own ---------------------------------------------------------


@pytest.mark.parametrize("kv_cache", [None, False])
def test_an_empty_prompt_leaves_the_others_values(kv_cache: Optional[bool]) -> None:
    """log Vh_0 of an empty prompt is 0 and every other prompt's is its value without it (it was 0 for
    the whole batch)."""
    reward = OnnxRewardModel(VALUE, output="value", kind="logit", kv_cache=kv_cache)
    assert reward.kv_cached == (kv_cache is None)
    alone = reward.initial_log_value(prompts_particles([[3, 5, 9], [4, 2]]))
    mixed = reward.initial_log_value(prompts_particles([[3, 5, 9], [], [4, 2]]))
    np.testing.assert_array_equal(mixed, [alone[0], 0.0, alone[1]])
    assert np.all(alone < 0)
    np.testing.assert_array_equal(reward.initial_log_value(prompts_particles([[], []])), [0.0, 0.0])


@pytest.mark.parametrize("kv_cache", [None, False])
def test_an_empty_prefix_is_zero_and_not_run(kv_cache: Optional[bool]) -> None:
    """An empty prefix (empty prompt, nothing generated) is 0, as log Vh_0, and is not run (its row was
    read at column -1: an error for the whole batch); the others as scored alone."""
    reward = OnnxRewardModel(VALUE, output="value", kind="logit", kv_cache=kv_cache)
    particles = prompts_particles([[3, 5, 9], []], count=3)
    particles.tokens[:, :, :2] = [[[4, 8], [6, 2], [1, 1]], [[9, 9], [3, 1], [5, 5]]]
    particles.lengths[:] = [[2, 0, 1], [0, 2, 1]]
    got = reward.log_value(particles)
    assert got[1, 0] == 0.0
    for b, i in [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2)]:
        assert particles.prompt_tokens is not None
        prefix = np.concatenate(
            [particles.prompt_tokens[b], particles.tokens[b, i, : particles.lengths[b, i]]]
        )
        np.testing.assert_allclose(got[b, i], reward._score([prefix])[0], rtol=0, atol=1e-6)


# -- defect 3: token_map and the reward model's padding id -----------------------------------------------


@pytest.mark.parametrize(("fixture", "options"), [(PRM, {}), (VALUE, {"output": "value"})])
def test_token_map_does_not_look_up_the_padding_id(fixture: Path, options: dict[str, Any]) -> None:
    """pad_token_id at or past the map's length: ragged prompts score as their mapped ids do without a map
    (an IndexError before), re-encoded and with the KV cache."""
    mapping = np.array([3, 4, 5, 6, 8, 9])
    for kv_cache in (None, False):
        mapped = OnnxRewardModel(
            fixture, kind="logit", token_map=mapping, pad_token_id=10, kv_cache=kv_cache, **options
        )
        plain = OnnxRewardModel(fixture, kind="logit", pad_token_id=10, kv_cache=kv_cache, **options)
        policy_ids = prompts_particles([[0, 1, 5], [2]], count=2)
        reward_ids = prompts_particles([[3, 4, 9], [5]], count=2)
        policy_ids.tokens[:, :, :2] = [[[1, 2], [3, 0]], [[4, 4], [5, 1]]]
        reward_ids.tokens[:] = mapping[policy_ids.tokens]
        for particles in (policy_ids, reward_ids):
            particles.lengths[:] = [[2, 1], [0, 2]]
        np.testing.assert_array_equal(
            mapped.initial_log_value(policy_ids), plain.initial_log_value(reward_ids)
        )
        np.testing.assert_array_equal(mapped.log_value(policy_ids), plain.log_value(reward_ids))


# -- position='delimiter' needs a score per position ------------------------------------------------------


def summed(helper: Any, graph: Any, raw: str, out: str, const: Callable[[str, Any], str]) -> None:
    """(batch, seq, 1) -> (batch, 1): the scores summed over the positions, one score a row."""
    axes = const("axes_1", np.array([1], dtype=np.int64))
    graph.node.append(helper.make_node("ReduceSum", [raw, axes], [out], keepdims=0))


@pytest.mark.parametrize(
    ("name", "options", "per_row"),
    [("summed", {}, "one score a row"), ("pooled", {"label": 0}, "one class vector a row")],
)
def test_position_delimiter_is_refused_for_one_score_a_row(
    graphs: dict[str, Path], tmp_path: Path, name: str, options: dict[str, Any], per_row: str
) -> None:
    """An output that scores each prefix whole has no delimiter's position to read: position='delimiter'
    is refused at load, naming position and the output (it was accepted, and every prefix scored whole)."""
    folder = rewritten(tmp_path / name, summed, ["batch_size", 1]) if name == "summed" else graphs[name]
    assert not OnnxRewardModel(folder, kind="logit", **options).per_position  # position='last' loads
    declared = r"\['batch_size', 1\]" if name == "summed" else r"\['batch_size', 2\]"
    with pytest.raises(
        ValueError,
        match=r"^position: 'delimiter' reads a prefix's score at its last step delimiter, but output "
        rf"'logits' of model\.onnx has {per_row} \(declared {declared}\), a score of the whole prefix; use "
        r"position='last'",
    ):
        OnnxRewardModel(folder, kind="logit", position="delimiter", delimiter_ids=[39], **options)


# -- delimiter_ids of any sequence or array of ints -------------------------------------------------------


@pytest.mark.parametrize(
    "given", [np.array([9, 5]), np.array([9, 5], dtype=np.int32), (9, 5), [9, 5], range(5, 10, 4)]
)
def test_delimiter_ids_may_be_any_sequence_or_array_of_ints(given: Any) -> None:
    """An array of ids is read as a list of them is (numpy's error on its truth value before); an empty
    one is refused as an empty list is."""
    reward = OnnxRewardModel(PRM, position="delimiter", delimiter_ids=given)
    np.testing.assert_array_equal(reward.delimiter_ids, [5, 9])
    with pytest.raises(ValueError, match=r"^delimiter_ids: position='delimiter' needs the token ids"):
        OnnxRewardModel(PRM, position="delimiter", delimiter_ids=np.array([], dtype=np.int64))


def test_a_bare_delimiter_id_is_one_id() -> None:
    """``delimiter_ids=5`` is the one id 5 (the policy's ``eos_token_id`` takes one id or a list too): it
    raised "'int' object is not iterable"; a value of another type is refused naming delimiter_ids."""
    reward = OnnxRewardModel(PRM, position="delimiter", delimiter_ids=5)
    np.testing.assert_array_equal(reward.delimiter_ids, [5])
    np.testing.assert_array_equal(
        OnnxRewardModel(PRM, position="delimiter", delimiter_ids=np.int64(5)).delimiter_ids, [5]
    )
    for bad in (5.0, "5", None, True, [5, None]):
        with pytest.raises(ValueError, match=r"^delimiter_ids: expected a token id in "):
            OnnxRewardModel(PRM, position="delimiter", delimiter_ids=[bad] if bad is None else bad)


@pytest.mark.parametrize(
    ("classes", "error", "match"),
    [
        ([47, 46.9], ValueError, r"^classes: expected class indices >= 0 \(integers\), got 46.9 in"),
        (["47", "46"], ValueError, r"^classes: expected class indices >= 0 \(integers\), got '47' in"),
        ([47, True], ValueError, r"^classes: expected class indices >= 0 \(integers\), got True in"),
        ([47, None], ValueError, r"^classes: expected class indices >= 0 \(integers\), got None in"),
        ([47, [46]], ValueError, r"^classes: expected class indices >= 0 \(integers\), got \[46\] in"),
        (5, TypeError, r"^classes: expected a sequence of class indices, got 5$"),
        (np.array([[47, 46]]), TypeError, r"^classes: expected a sequence of class indices"),
    ],
)
def test_each_class_is_checked_as_label_is(classes: Any, error: type, match: str) -> None:
    """A class index is an int, as ``label`` is: 46.9 was read as 46, "46" and True as 46 and 1, None
    failed inside int(), a bare int as "'int' object is not iterable"."""
    with pytest.raises(error, match=match):
        OnnxRewardModel(GPT2, kind="logit", label=47, classes=classes)
    for given in ([47, 46], (47, np.int64(46)), np.array([46, 47])):
        assert OnnxRewardModel(GPT2, kind="logit", label=47, classes=given).classes == [int(c) for c in given]


def test_output_is_a_name() -> None:
    """``output`` is the name of one of the graph's outputs: a list raised "unhashable type: 'list'"."""
    for output in (["logits"], 0, b"logits"):
        with pytest.raises(TypeError, match=r"^output: expected the name of an output of model.onnx \(a str"):
            OnnxRewardModel(PRM, output=output)  # type: ignore[arg-type]
    assert OnnxRewardModel(PRM, output="logits").output == "logits"


# -- the verifier's text ------------------------------------------------------------------------------------


@pytest.mark.parametrize("joint", [False, True])
def test_the_verifier_is_given_the_text_the_result_reports(joint: bool) -> None:
    """With stop strings a trajectory's text ends before its stop string (``OnnxCausalLM.decode``: the
    result's ``texts``); the verifier of a reward model, and of the policy's own value head, is given that
    text (it was given the tokens' whole decode: the stop string, and what follows it in the last token)."""
    import tiltsmc
    from tiltsmc.models import OnnxCausalLM, PolicyValue

    seen: set[str] = set()

    def verifier(prompt: Any, text: str) -> float:
        seen.add(text)
        return 1.0

    stop = ["5", "e"]
    if joint:
        policy = OnnxCausalLM(VALUE, max_new_tokens=6, stop=stop, value_output="value")
        reward: Any = PolicyValue(policy, kind="logit", verifier=verifier)
    else:
        policy = OnnxCausalLM(MODELS / "gpt2-tiny", max_new_tokens=6, stop=stop)
        reward = OnnxRewardModel(PRM, kind="logit", verifier=verifier)
    result = tiltsmc.smc(policy, reward, prompts=["ab", "c"], num_particles=16, rng=0)
    assert result.texts is not None and policy.tokenizer is not None
    samples = [sample for per_prompt in result.samples for sample in per_prompt]
    assert any(policy.tokenizer.decode(s) != policy.decode(s) for s in samples)  # some stopped
    assert {text for texts in result.texts for text in texts} <= seen
    assert not any(stop[0] in text or stop[1] in text for text in seen)


def test_a_reward_model_shared_by_two_policies_gives_each_verifier_call_its_own_policys_text() -> None:
    """Two engines with their own policies (one with stop strings) share one reward model: each
    trajectory is verified on the text its own policy reports (``Particles.text_decoder``). The reward
    model kept the policy last checked, so the first engine's texts were cut at the second's stop strings."""
    import tiltsmc
    from tiltsmc.models import OnnxCausalLM

    seen: set[str] = set()

    def verifier(prompt: Any, text: str) -> float:
        seen.add(text)
        return 1.0

    plain = OnnxCausalLM(MODELS / "gpt2-tiny", max_new_tokens=6)
    stopping = OnnxCausalLM(MODELS / "gpt2-tiny", max_new_tokens=6, stop=["5", "e"])
    reward = OnnxRewardModel(PRM, kind="logit", verifier=verifier)
    with tiltsmc.Engine(plain, reward) as first, tiltsmc.Engine(stopping, reward):
        result = first.submit("ab", "smc", num_particles=16, rng=0).result(timeout=60)
    assert result.texts is not None
    texts = set(result.texts[0])
    assert any("5" in text or "e" in text for text in texts)  # what the other policy would have cut
    assert texts <= seen
