"""One default per option for the API, the CLI and the server (read from one place, checked here by
introspection so that a drift fails), and ONNX Runtime session / provider options passed through."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiltsmc
from tiltsmc import cli
from tiltsmc.models import OnnxCausalLM, OnnxRewardModel
from tiltsmc.models._ort import MAX_THREADS
from tiltsmc.serving.engine import SAMPLERS, sampler_defaults

FIXTURES = Path(__file__).parent / "fixtures" / "models"
LLAMA, PRM = FIXTURES / "llama-tiny", FIXTURES / "prm-tiny"


def subcommand(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub: argparse.ArgumentParser = commands.choices[name]
    return sub


def signature_default(class_name: str, parameter: str) -> Any:
    model = {"OnnxCausalLM": OnnxCausalLM, "OnnxRewardModel": OnnxRewardModel}[class_name]
    return inspect.signature(model).parameters[parameter].default


@pytest.mark.parametrize("command", ["run", "serve"])
def test_cli_model_defaults_are_the_model_classes(command: str) -> None:
    """Every model option of run and serve has the default of the class parameter it sets; every option
    that is not listed in cli.MODEL_OPTIONS is one that no model parameter stands behind."""
    actions = {a.dest: a for a in subcommand(command)._actions}
    for option, (class_name, parameter) in cli.MODEL_OPTIONS.items():
        expected = signature_default(class_name, parameter)
        default = actions[option].default
        if isinstance(expected, bool):
            default = {"on": True, "off": False}[default]
        assert default == expected, f"--{option.replace('_', '-')}: {default!r} != {class_name}.{parameter}"
    not_models = {"policy", "reward", "demo", "cpu", "chat_template", "session_option", "session_config"}
    not_models.add("provider_option")
    unmapped = set(cli._model_option_names()) - set(cli.MODEL_OPTIONS) - not_models - {"help"}
    assert not unmapped, f"model options without a class default: {unmapped}"


def test_shared_model_defaults_agree() -> None:
    """Parameters both ONNX models take have one default; the reward kind is the demo PRM's (a logit),
    which the README's example relies on."""
    for parameter in ("memory_arena", "intra_op_num_threads", "session_options", "provider_options",
                      "providers", "require_gpu"):  # fmt: skip
        assert signature_default("OnnxCausalLM", parameter) == signature_default("OnnxRewardModel", parameter)
    assert signature_default("OnnxRewardModel", "kind") == "logit"
    from tiltsmc.tasks import arithmetic

    assert arithmetic.load_models()[1].kind == signature_default("OnnxRewardModel", "kind")


def test_sampler_defaults_come_from_the_functions() -> None:
    """The CLI's sampler options and the server's request fields default to None (the function's default
    applies); the help texts quote the functions' defaults."""
    run = subcommand("run")
    actions = {a.dest: a for a in run._actions}
    for sampler, options in cli._RUN_OPTIONS.items():
        defaults = sampler_defaults(sampler.replace("-", "_"))
        for option, parameter in options.items():
            assert parameter in defaults, (sampler, parameter)
            assert actions[option].default is None
            if option != "particles":  # its help names two samplers
                assert str(defaults[parameter]) in (actions[option].help or ""), option
    assert (
        sampler_defaults("rejection")["max_tries"]
        == inspect.signature(tiltsmc.rejection).parameters["max_tries"].default
    )
    pytest.importorskip("fastapi")
    from tiltsmc.serving import server

    request_fields = ("particles", "ess_threshold", "resample", "pool_size", "proposal", "mh_steps", "bound")
    for fields in server.SAMPLER_FIELDS.values():
        for field, parameter in fields.items():
            assert any(parameter in sampler_defaults(s) for s in SAMPLERS)
            assert field in request_fields


# -- session options -----------------------------------------------------------------------------------


def test_tiltsmc_session_defaults() -> None:
    options = OnnxCausalLM(LLAMA).session.get_session_options()
    assert options.log_severity_level == 4 and options.enable_cpu_mem_arena
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"


def test_session_options_dict_takes_effect() -> None:
    import onnxruntime as ort

    chosen = {
        "intra_op_num_threads": 1,
        "inter_op_num_threads": 1,
        "graph_optimization_level": "basic",
        "log_severity_level": 3,
        "enable_cpu_mem_arena": False,
        "config": {"session.intra_op.allow_spinning": "0"},
    }
    for model in (OnnxCausalLM(LLAMA, session_options=chosen), OnnxRewardModel(PRM, session_options=chosen)):
        options = model.session.get_session_options()
        assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        assert options.log_severity_level == 3 and not options.enable_cpu_mem_arena
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"  # tiltsmc's, kept
    policy = OnnxCausalLM(LLAMA, session_options={"graph_optimization_level": 0}, max_new_tokens=3)
    assert policy.session.get_session_options().graph_optimization_level == (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    assert not tiltsmc.smc(policy, OnnxRewardModel(PRM), prompts=["a"], num_particles=2, rng=0).errors


def test_session_options_object_is_used_as_it_is() -> None:
    import onnxruntime as ort

    mine = ort.SessionOptions()
    mine.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    mine.intra_op_num_threads = 1
    options = OnnxRewardModel(PRM, session_options=mine).session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    assert options.intra_op_num_threads == 1 and options.log_severity_level == mine.log_severity_level
    with pytest.raises(ValueError, match="set intra_op_num_threads on it"):
        OnnxRewardModel(PRM, session_options=mine, intra_op_num_threads=2)


@pytest.mark.parametrize(
    ("arguments", "options", "match"),
    [
        (
            {"intra_op_num_threads": 1},
            {"intra_op_num_threads": 2},
            r"^session_options: 'intra_op_num_threads' is also set by intra_op_num_threads=1: set the "
            "threads",
        ),
        (
            {"inter_op_num_threads": 1},
            {"inter_op_num_threads": 1},
            r"^session_options: 'inter_op_num_threads' is also set by inter_op_num_threads=1",
        ),
        (
            {"memory_arena": False},
            {"enable_cpu_mem_arena": True},
            r"^session_options: 'enable_cpu_mem_arena' is also set by memory_arena=False: set the arena",
        ),
    ],
)
def test_a_field_set_both_ways_is_refused(
    arguments: dict[str, Any], options: dict[str, Any], match: str
) -> None:
    """The dict's value silently won over the explicit argument (which a run's record gave)."""
    with pytest.raises(ValueError, match=match):
        OnnxCausalLM(LLAMA, session_options=options, **arguments)
    with pytest.raises(ValueError, match=match):
        OnnxRewardModel(PRM, session_options=options, **arguments)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--threads", "1", "--session-option", "intra_op_num_threads=2"],
            "tiltsmc: --session-option: 'intra_op_num_threads' is also set by --threads 1: set the threads "
            "one way",
        ),
        (
            ["--memory-arena", "off", "--session-option", "enable_cpu_mem_arena=true"],
            "tiltsmc: --session-option: 'enable_cpu_mem_arena' is also set by --memory-arena off: set the "
            "arena one way",
        ),
    ],
)
def test_the_cli_refuses_a_session_option_an_option_also_sets(
    argv: list[str], message: str, capfd: pytest.CaptureFixture[str]
) -> None:
    base = ["run", "--policy", str(LLAMA), "--reward", str(PRM), "--max-new-tokens", "2", "--prompt", "hi"]
    assert cli.main([*base, "--particles", "2", "-q", *argv]) == 2
    assert capfd.readouterr().err == message + "\n"


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (
            {"intra_op_threads": 1},
            ValueError,
            "'intra_op_threads' is not a field of onnxruntime.SessionOptions",
        ),
        ({"graph_optimization_level": "fastest"}, ValueError, "graph_optimization_level: expected one of"),
        ({"intra_op_num_threads": "two"}, TypeError, "^session_options: intra_op_num_threads: expected"),
        ({"config": 3}, TypeError, "config: expected a dict"),
        ([("intra_op_num_threads", 1)], TypeError, "session_options: expected an onnxruntime.SessionOptions"),
    ],
)
def test_bad_session_options_are_named(options: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        OnnxCausalLM(LLAMA, session_options=options)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({1: 2}, TypeError, r"^session_options: expected onnxruntime.SessionOptions field names \(strings\)"),
        ({"intra_op_num_threads": -3}, ValueError, r"^session_options: intra_op_num_threads: expected an"),
        ({"inter_op_num_threads": True}, TypeError, r"^session_options: inter_op_num_threads: expected an"),
        ({"intra_op_num_threads": 2.0}, TypeError, r"^session_options: intra_op_num_threads: expected an"),
        (
            {"graph_optimization_level": 7},
            ValueError,
            r"^session_options: graph_optimization_level: expected one of disable_all, basic, extended, "
            r"layout, all \(or the enum\), got 7$",
        ),
    ],
)
def test_session_options_are_checked_as_the_arguments_are(options: Any, error: type, match: str) -> None:
    """A key that is not a string is named (AttributeError on ``startswith`` before); a thread field is
    checked in full as ``intra_op_num_threads=`` is (-3 and True were set); an enum field's message names it
    once (it was wrapped in its own "cannot set")."""
    for model, path in ((OnnxCausalLM, LLAMA), (OnnxRewardModel, PRM)):
        with pytest.raises(error, match=match):
            model(path, session_options=options)
    assert OnnxRewardModel(PRM, session_options={"intra_op_num_threads": np.int64(1)}).session


# -- require_gpu and the thread counts are checked --------------------------------------------------------


@pytest.mark.parametrize("value", ["false", "no", "True", 0.0, 1, 0, None, [], float("nan")])
def test_require_gpu_is_true_or_false(value: Any) -> None:
    """``require_gpu`` is a flag like the others: ``"false"`` and nan were read as True (a GPU demanded),
    None, 0 and [] as False."""
    for model, path in ((OnnxCausalLM, LLAMA), (OnnxRewardModel, PRM)):
        with pytest.raises(TypeError, match=r"^require_gpu: expected True or False, got "):
            model(path, require_gpu=value)
    assert OnnxRewardModel(PRM, require_gpu=np.False_).session.get_providers()  # numpy's bool is one


@pytest.mark.parametrize("parameter", ["intra_op_num_threads", "inter_op_num_threads"])
@pytest.mark.parametrize("threads", [MAX_THREADS + 1, 2**31, 2**70, np.uint64(2**64 - 1)])
def test_thread_counts_past_the_bound_are_refused(parameter: str, threads: Any) -> None:
    """One bound (``models._ort.MAX_THREADS``) for the models' thread counts and the CLI's ``--threads``:
    ONNX Runtime starts every thread asked for (5000 did not finish loading, 2**31 reached its binding as
    a TypeError naming nothing)."""
    for model, path in ((OnnxCausalLM, LLAMA), (OnnxRewardModel, PRM)):
        with pytest.raises(ValueError, match=rf"^{parameter}: expected at most {MAX_THREADS} threads, got "):
            model(path, **{parameter: threads})
        with pytest.raises(
            ValueError, match=rf"^session_options: {parameter}: expected at most {MAX_THREADS}"
        ):
            model(path, session_options={parameter: threads})
    assert cli.MAX_THREADS is MAX_THREADS
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(
            ["run", "--policy", "p", "--reward", "r", "--threads", str(MAX_THREADS + 1)]
        )


def test_provider_options() -> None:
    with pytest.raises(ValueError, match="provider_options: 'FastExecutionProvider' is not a provider"):
        OnnxCausalLM(LLAMA, provider_options={"FastExecutionProvider": {}})
    with pytest.raises(TypeError, match=r"provider_options\['CPUExecutionProvider'\]: expected a dict"):
        OnnxCausalLM(LLAMA, provider_options={"CPUExecutionProvider": 1})  # type: ignore[dict-item]
    # CUDA's options where CUDA is not used are not applied; the CPU provider takes its own
    policy = OnnxCausalLM(
        LLAMA,
        providers=["CPUExecutionProvider"],
        provider_options={"CUDAExecutionProvider": {"device_id": 0}, "CPUExecutionProvider": {}},
    )
    assert policy.session.get_providers() == ["CPUExecutionProvider"]


def test_cli_session_options(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    argv = ["run", "--policy", str(LLAMA), "--reward", str(PRM), "--prompt", "a", "--particles", "2",
            "--max-new-tokens", "3", "--json", str(out)]  # fmt: skip
    args = cli.build_parser().parse_args(
        [*argv, "--session-option", "graph_optimization_level=basic", "--session-option",
         "inter_op_num_threads=1", "--provider-option",
         "CPUExecutionProvider:arena_extend_strategy=kSameAsRequested", "--session-config",
         "session.intra_op.allow_spinning=0", "--session-config", "session.disable_prepacking=1"]
    )  # fmt: skip
    import onnxruntime as ort

    policy, reward = cli._load_models(args)
    for model in (policy, reward):
        options = model.session.get_session_options()
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        assert options.inter_op_num_threads == 1
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert options.get_session_config_entry("session.disable_prepacking") == "1"
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"  # tiltsmc's, kept
    assert cli.main([*argv, "--session-option", "no_such_field=1"]) == 2
    assert cli.main([*argv, "--session-option", "graph_optimization_level=basic"]) == 0
    assert cli.main([*argv, "--session-config", "session.intra_op.allow_spinning=0"]) == 0
    # the entry reaches ONNX Runtime, which then reads the .onnx file as its own format and refuses it
    assert cli.main([*argv, "--session-config", "session.load_model_format=ORT"]) == 2


def _cuda_unusable() -> str:
    import onnxruntime as ort
    from tiltsmc.models._ort import cuda_device_usable

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this ONNX Runtime has no CUDA provider"
    usable, reason = cuda_device_usable()
    return "" if usable else f"no usable CUDA device: {reason}"


@pytest.mark.gpu
@pytest.mark.skipif(bool(_cuda_unusable()), reason=_cuda_unusable() or "runs on a GPU")
def test_cuda_provider_options_take_effect() -> None:
    """tiltsmc's use_tf32=0 on CUDA, and provider_options over it, read back from the session."""
    default = OnnxCausalLM(LLAMA, require_gpu=True).session.get_provider_options()["CUDAExecutionProvider"]
    assert default["use_tf32"] == "0"
    chosen = OnnxRewardModel(
        PRM, require_gpu=True, provider_options={"CUDAExecutionProvider": {"use_tf32": True, "device_id": 0}}
    ).session.get_provider_options()["CUDAExecutionProvider"]
    assert chosen["use_tf32"] == "1" and chosen["device_id"] == "0"
