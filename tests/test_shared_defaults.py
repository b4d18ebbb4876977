"""One set of defaults for the API, the CLI and the server: the sampler options a request or a command
runs with when it leaves them out (the server's documented exceptions listed), the server's settings (the
``serve`` command line, ``Settings()`` and ``create_app``), the demo's options (``DemoConfig()``) and the
model options a Ray replica takes for those it is not given (``tiltsmc serve``'s). Checked by
introspection, so that a drift fails."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import tiltsmc
from tiltsmc import cli, core
from tiltsmc.samplers.sequential import EXACT_FORM, PROPOSALS
from tiltsmc.serving import engine as serving_engine
from tiltsmc.serving.engine import Engine, sampler_defaults

FIXTURES = Path(__file__).parent / "fixtures" / "models"
POLICY, REWARD = FIXTURES / "llama-tiny", FIXTURES / "prm-tiny"

pytest.importorskip("fastapi")
pytest.importorskip("pydantic")

from tiltsmc.serving import server  # noqa: E402
from tiltsmc.serving.server import Limits, Settings, create_app  # noqa: E402


def _subcommand(name: str) -> argparse.ArgumentParser:
    commands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    sub: argparse.ArgumentParser = commands.choices[name]
    return sub


# -- the sampler options a request leaves out ---------------------------------------------------------

# What the server runs otherwise than the sampler function's defaults, for a request that leaves the
# option out (README, "The HTTP server"): rejection draws from at most 16 rounds of its batch (the
# function's max_tries is 100000 draws, too long for a request); its one sample per choice (num_samples 1,
# which a request cannot change) is the function's default.
SERVER_EXCEPTIONS: dict[str, Any] = {
    "rejection": lambda defaults: {"max_tries": 16 * defaults["batch_size"]},
}


def _request(sampler: str) -> Any:
    """A request's body (as the server's request model reads it) naming ``sampler`` and nothing else."""
    fields = dict.fromkeys(
        ["model", "max_tokens", "stream_options", "particles", "ess_threshold", "resample", "pool_size",
         "proposal", "mh_steps", "bound", *server.NEUTRAL_FIELDS]
    )  # fmt: skip
    return types.SimpleNamespace(**fields, sampler=sampler, n=1, stream=False)


@pytest.mark.parametrize("sampler", list(serving_engine.SAMPLERS))
def test_a_sampler_option_left_out_runs_at_the_functions_default_through_every_front_end(
    sampler: str,
) -> None:
    """A request to the server, ``tiltsmc run`` and the Python API that leave every sampler option out run
    with the sampler function's defaults, but for the server's documented exceptions (``SERVER_EXCEPTIONS``),
    under the default limits and a policy within them."""
    function = getattr(tiltsmc, sampler)
    api = {
        name: parameter.default
        for name, parameter in inspect.signature(function).parameters.items()
        if name not in ("policy", "reward", "prompts", "rng")
    }
    assert sampler_defaults(sampler) == api

    args = _subcommand("run").parse_args(
        ["--policy", "p", "--prompt", "x", "--sampler", sampler.replace("_", "-")]
    )
    assert cli._sampler_options(args) == api

    policy = types.SimpleNamespace(max_new_tokens=64)  # within the default limits (no max_tokens limit)
    options = server._options(
        _request(sampler), ["x"], Limits(), 64, server.MODEL_NAME, policy, serving_engine.MAX_QUEUE
    )
    ran = {**sampler_defaults(sampler), **options}  # as Engine.submit fills them
    exceptions = SERVER_EXCEPTIONS.get(sampler, lambda defaults: {})(api)
    assert {name: value for name, value in ran.items() if api[name] != value} == exceptions
    assert ran == {**api, **exceptions}
    if sampler == "rejection":  # fixed by the server, at the function's default
        assert options["num_samples"] == api["num_samples"] == 1


# -- the server's settings ----------------------------------------------------------------------------


def test_the_serve_command_settings_and_create_app_share_their_defaults() -> None:
    """``tiltsmc serve``'s defaults are ``Settings()``'s, whose app settings are ``create_app``'s and whose
    engine settings ``Engine``'s (but ``keep_freed_memory``, which a server sets); the model name, the
    timeout and the grace period are written once (``MODEL_NAME``, ``TIMEOUT``, ``GRACE``: the engine's own
    ``close`` timeout)."""
    args = _subcommand("serve").parse_args(["--demo"])
    assert Settings.from_args(args) == Settings()
    settings = Settings()
    assert (settings.model_name, settings.timeout, settings.grace) == (
        server.MODEL_NAME,
        server.TIMEOUT,
        server.GRACE,
    )
    assert server.GRACE == inspect.signature(Engine.close).parameters["timeout"].default
    app = {name: p.default for name, p in inspect.signature(create_app).parameters.items()}
    assert (
        app["model_name"],
        app["timeout"],
        app["close_timeout"],
        app["limits"],
        app["stream_keepalive"],
    ) == (
        settings.model_name,
        settings.timeout,
        settings.grace,
        settings.limits,
        settings.stream_keepalive,
    )
    assert app["api_key"] is settings.api_key is None
    assert settings.limits == Limits()
    engine = {name: p.default for name, p in inspect.signature(Engine).parameters.items()}
    for field in ("max_batch_rows", "max_queue", "release_memory_after", "adaptive_rows", "workers",
                  "max_cache_bytes"):  # fmt: skip
        assert getattr(settings, field) == engine[field], field


def test_the_samplers_and_their_choices_are_the_shared_tuples() -> None:
    """The default sampler is ``Engine.submit``'s for the CLI and the server; the request's choices of
    sampler, resampling scheme, proposal and exact form are the tuples the samplers check against, and
    the CLI's samplers the engine's."""
    submit = inspect.signature(Engine.submit).parameters["sampler"].default
    assert server.DEFAULT_SAMPLER == submit
    assert _subcommand("run").get_default("sampler") == submit.replace("_", "-")
    assert typing.get_args(server.SamplerName) == tuple(serving_engine.SAMPLERS)
    assert cli.SAMPLERS == tuple(name.replace("_", "-") for name in serving_engine.SAMPLERS)
    assert typing.get_args(server.ResampleScheme) == core.SCHEMES
    assert typing.get_args(server.ProposalName) == PROPOSALS
    assert typing.get_args(server.ExactForm) == (EXACT_FORM,)


# -- the demo -----------------------------------------------------------------------------------------

DEMO_OPTIONS = ("levels", "budgets", "problems", "seed", "noise", "threads")


def _demo_defaults(args: argparse.Namespace) -> dict[str, Any]:
    return {name: tuple(v) if isinstance(v := getattr(args, name), list) else v for name in DEMO_OPTIONS}


def test_the_demo_commands_defaults_are_demo_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    """``tiltsmc demo``'s options default to ``DemoConfig()``'s fields, read from it (a changed default
    reaches the command line), and ``--threads`` says ``DEFAULT_THREADS`` (it said "1" whatever that was)."""
    from tiltsmc import demo

    config = demo.DemoConfig()
    assert _demo_defaults(_subcommand("demo").parse_args([])) == {
        name: getattr(config, name) for name in DEMO_OPTIONS
    }
    changed = {"levels": (2, 3), "budgets": (4,), "problems": 5, "seed": 6, "noise": 0.5, "threads": 3}
    monkeypatch.setattr(demo, "DemoConfig", functools.partial(demo.DemoConfig, **changed))
    monkeypatch.setattr(demo, "DEFAULT_THREADS", 7)
    parser = _subcommand("demo")
    assert _demo_defaults(parser.parse_args([])) == changed
    threads = next(action for action in parser._actions if action.dest == "threads")
    assert "(default: 7)" in (threads.help or "")
    assert set(DEMO_OPTIONS) <= {field.name for field in dataclasses.fields(config)}


# -- a Ray replica's model options --------------------------------------------------------------------


@pytest.fixture
def server_logger() -> Any:
    """The server's logger as it was (a replica logs to stderr: ``log_to_stderr``), restored."""
    logger = server.logger
    state = (list(logger.handlers), logger.level, logger.propagate)
    yield logger
    logger.handlers[:] = state[0]
    logger.setLevel(state[1])
    logger.propagate = state[2]


def test_a_replica_takes_the_model_options_left_out_at_the_serve_commands_defaults(
    monkeypatch: pytest.MonkeyPatch, server_logger: Any
) -> None:
    """``ReplicaOptions({"policy": P, "reward": R}, Settings())``, the README's Python use: the replica
    loads its models with ``tiltsmc serve``'s defaults for the options left out (it failed at start with
    "'Namespace' object has no attribute" one of them: 'cpu', 'value_output'), and serves the API's run.
    Checked without Ray:
    ``ray.serve`` replaced by its replica context."""
    from tiltsmc.models import OnnxCausalLM, OnnxRewardModel
    from tiltsmc.serving.ray import ReplicaOptions, TiltsmcReplica

    context = types.SimpleNamespace(replica_id=types.SimpleNamespace(unique_id="r1"), app_name="tiltsmc")
    serve = types.SimpleNamespace(get_replica_context=lambda: context)
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(serve=serve))
    monkeypatch.setitem(sys.modules, "ray.serve", serve)
    options = ReplicaOptions({"policy": str(POLICY), "reward": str(REWARD), "threads": 1}, Settings())
    replica = TiltsmcReplica(options)
    try:
        assert replica.instance == f"r1@{os.getpid()}" and replica.http_app is not None
        result = replica.engine.submit("ab", num_particles=2, rng=1, max_new_tokens=3).result(60)
        replica.check_health()
    finally:
        replica.engine.close(drain=False)
    parsed = _subcommand("serve").parse_args(
        ["--policy", str(POLICY), "--reward", str(REWARD), "--threads", "1"]
    )
    namespace = options.namespace()  # what the replica loaded its models with
    assert vars(namespace) == {name: getattr(parsed, name) for name in cli.serve_model_defaults()}
    expected = tiltsmc.smc(
        OnnxCausalLM(POLICY), OnnxRewardModel(REWARD), ["ab"], num_particles=2, rng=1, max_new_tokens=3
    )
    assert result.to_dict()["log_z"] == expected.to_dict()["log_z"]


def test_a_model_option_a_replica_does_not_take_is_refused_naming_it() -> None:
    """A key of ``model_args`` that is not one of ``tiltsmc serve``'s model options (a misspelling) is
    refused as the options are made, naming it (it was dropped silently, the option's default used)."""
    from tiltsmc.serving.ray import ReplicaOptions

    with pytest.raises(
        TypeError, match=r"^model_args: 'valu_output', 'port': not a model option of tiltsmc serve"
    ):
        ReplicaOptions({"policy": "p", "valu_output": "v", "port": 1}, Settings())
    assert ReplicaOptions({}, Settings()).namespace().policy is None  # every option at its default
