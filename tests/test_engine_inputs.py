"""Bad input to the engine's options and misbehaving user-written models: a clear error naming the
argument or the model, the other requests untouched, no hang (tiltsmc.Engine, the samplers' Models,
tiltsmc.serving.ray's checks that need no running Ray)."""

from __future__ import annotations

import argparse
import math
import re
import threading
from typing import Any, Callable, Optional

import numpy as np
import pytest
import tiltsmc
from tiltsmc.models import Particles
from tiltsmc.serving.scheduler import BatchSizer
from tiltsmc.tasks import MarkovDFATask

TASK = MarkovDFATask.random(4, 3, 6, rng=0)
POLICY, TWIST = TASK.policy(), TASK.twist(noise=0.4, rng=1)


def same_result(a: tiltsmc.SamplerResult, b: tiltsmc.SamplerResult) -> bool:
    """Equal in everything but the time and counts of compute."""
    left, right = a.to_dict(), b.to_dict()
    left.pop("compute")
    right.pop("compute")
    return bool(left == right)


class Bad(tuple):  # type: ignore[type-arg]
    """An empty prompt on which the policies below misbehave."""


Start = Callable[[Any, Optional[list[Any]], int], Any]


class Misbehaving:
    """The task's policy (a token policy), but ``start`` is ``bad_start`` where a :class:`Bad` prompt is in
    the batch (the others started as the task's); ``propose`` waits for ``gate``."""

    token_level = True
    supports_engine = True

    def __init__(self, bad_start: Optional[Start] = None) -> None:
        self.inner = POLICY
        self.vocab_size = POLICY.vocab_size
        self.bad_start = bad_start
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def start(self, prompts: Optional[list[Any]], num_particles: int) -> Any:
        if self.bad_start is not None and prompts is not None and any(isinstance(p, Bad) for p in prompts):
            plain = [None if p is None else () for p in prompts]
            return self.bad_start(self.inner, plain, num_particles)
        return self.inner.start(prompts, num_particles)

    def propose(self, particles: Particles, rng: Any) -> Any:
        self.entered.set()
        assert self.gate.wait(20), "the test never opened the gate"
        return self.inner.propose(particles, rng)

    def next_log_probs(self, particles: Particles) -> Any:
        return self.inner.next_log_probs(particles)

    def append(self, particles: Particles, tokens: Any) -> None:
        self.inner.append(particles, tokens)


def _with(change: Callable[[Particles], None]) -> Start:
    def start(inner: Any, prompts: Optional[list[Any]], count: int) -> Particles:
        particles: Particles = inner.start(prompts, count)
        change(particles)
        return particles

    return start


def _set(name: str, value: Callable[[Particles], Any]) -> Callable[[Particles], None]:
    return lambda particles: setattr(particles, name, value(particles))


BAD_STARTS: list[tuple[str, Start, str]] = [
    ("none", lambda inner, prompts, count: None, r"^policy: start returned NoneType, expected Particles"),
    (
        "a prompt too many",
        lambda inner, prompts, count: inner.start([*prompts, ()], count),
        r"^policy: start returned Particles.tokens int64 of shape \(\d, 4, 6\)",
    ),
    (
        "a particle too many",
        lambda inner, prompts, count: inner.start(prompts, count + 1),
        r"^policy: start returned Particles.tokens int64 of shape \(\d, 5, 6\)",
    ),
    (
        "lengths as floats",
        _with(_set("lengths", lambda p: p.lengths.astype(np.float64))),
        r"^policy: start returned Particles.lengths float64",
    ),
    (
        "finished flattened",
        _with(_set("finished", lambda p: p.finished.reshape(-1))),
        r"^policy: start returned Particles.finished bool of shape",
    ),
    (
        "negative lengths",
        _with(lambda p: p.lengths.fill(-1)),
        r"^policy: start returned Particles.lengths from -1 to -1, expected each in \[0, 6\]",
    ),
    (
        "no room for a step",
        lambda inner, prompts, count: Particles.empty(prompts, count, 0),
        r"^policy: start returned unfinished particles whose token buffer \(capacity 0\) is full",
    ),
    (
        "errors of a prompt that is not there",
        _with(lambda p: p.errors.update({5: "no"})),
        r"^policy: start returned Particles.errors for prompt 5, expected prompts in \[0, \d\)",
    ),
    (
        "errors keyed by text",
        _with(lambda p: p.errors.update({"a": "no"})),
        r"^policy: start returned Particles.errors keyed by 'a'",
    ),
    (
        "prompts of another length",
        _with(_set("prompts", lambda p: [*p.prompts, ()])),
        r"^policy: start returned Particles.prompts of \d entries, expected a list of \d",
    ),
]


@pytest.mark.parametrize(
    ("start", "message"), [case[1:] for case in BAD_STARTS], ids=[c[0] for c in BAD_STARTS]
)
@pytest.mark.parametrize("sampler", ["smc", "sp_gsmc", "best_of_n"])
def test_a_start_that_returns_no_proper_batch_is_refused_naming_the_policy(
    start: Start, message: str, sampler: str
) -> None:
    # it raised AttributeError / IndexError / numpy's broadcasting errors, or ran on silently (a prompt too
    # many: an extra prompt's samples in the result; negative lengths: tokens written at the buffer's end)
    options = {"smc": {"num_particles": 4}, "sp_gsmc": {"pool_size": 4}, "best_of_n": {"n": 4}}[sampler]
    offline = {"smc": tiltsmc.smc, "sp_gsmc": tiltsmc.sp_gsmc, "best_of_n": tiltsmc.best_of_n}[sampler]
    with pytest.raises((TypeError, ValueError), match=message):
        offline(Misbehaving(start), TWIST, prompts=[Bad(), ()], rng=0, **options)


def _gated_engine_run(policy: Misbehaving, bad: Any, healthy: int = 3) -> tuple[Any, list[Any]]:
    """A request of ``bad`` submitted with ``healthy`` others while the engine is inside a step of a first
    request, so that all of them start together at its next step (one policy start); every request's
    outcome (its result, or its exception), the bad one's first, and the engine still serving after."""
    policy.gate.clear()
    with tiltsmc.Engine(policy, TWIST, timeout=30) as live:
        first = live.submit((), "smc", num_particles=4, rng=100)
        assert policy.entered.wait(10)
        futures = [live.submit(bad, "smc", num_particles=4, rng=0)]
        futures += [live.submit((), "smc", num_particles=4, rng=k) for k in range(1, healthy + 1)]
        policy.gate.set()
        outcomes = []
        for future in futures:
            try:
                outcomes.append(future.result(timeout=30))
            except Exception as error:
                outcomes.append(error)
        assert first.result(timeout=30).samples[0].shape == (4, 6)
        after = live.submit((), "smc", num_particles=4, rng=7).result(timeout=30)
        assert live.stats()["failed"] is None
    assert same_result(after, tiltsmc.smc(POLICY, TWIST, prompts=[()], num_particles=4, rng=7))
    return outcomes[0], outcomes[1:]


@pytest.mark.parametrize(
    ("start", "message"),
    [case[1:] for case in BAD_STARTS if case[0] != "none"],
    ids=[c[0] for c in BAD_STARTS if c[0] != "none"],
)
def test_a_request_whose_start_misbehaves_fails_alone_in_the_engine(start: Start, message: str) -> None:
    # the requests started with it failed with its error (lengths as floats, no room, negative lengths:
    # IndexError from the model) or never finished (a prompt too many: the lane's rows no longer matched
    # its runs, and they waited out their timeout)
    bad, healthy = _gated_engine_run(Misbehaving(start), Bad())
    assert isinstance(bad, (TypeError, ValueError)), bad
    assert re.search(message, str(bad)), bad
    for k, result in enumerate(healthy, 1):
        assert isinstance(result, tiltsmc.SamplerResult), result
        assert same_result(result, tiltsmc.smc(POLICY, TWIST, prompts=[()], num_particles=4, rng=k))


def _state(value: Callable[[Particles], Any]) -> Start:
    return _with(lambda particles: particles.state.update({"model.x": value(particles)}))


@pytest.mark.parametrize(
    ("start", "error", "message"),
    [
        (_state(lambda p: [0] * p.lengths.size), TypeError, r"^Particles.state\['model.x'\]: list cannot be"),
        (
            _state(lambda p: np.zeros(3)),
            ValueError,
            r"^Particles.state\['model.x'\]: leading axes \(3,\) are not \(B, N\) = \(1, 4\)",
        ),
    ],
)
def test_a_state_entry_that_cannot_join_names_its_key_and_fails_alone(
    start: Start, error: type[Exception], message: str
) -> None:
    # "list in Particles.state cannot be reshaped" / "cannot reshape array of size 3 into shape (4,1)",
    # and the requests started with it never finished: their runs had joined the lane before the failure
    bad, healthy = _gated_engine_run(Misbehaving(start), Bad())
    assert isinstance(bad, error) and re.search(message, str(bad)), bad
    for k, result in enumerate(healthy, 1):
        assert isinstance(result, tiltsmc.SamplerResult), result
        assert same_result(result, tiltsmc.smc(POLICY, TWIST, prompts=[()], num_particles=4, rng=k))


def _failing_deferred_work(inner: Any, prompts: Optional[list[Any]], count: int) -> Particles:
    particles: Particles = inner.start(prompts, count)

    def fail() -> None:
        raise RuntimeError("the session failed on a prompt")

    particles.defer(fail)
    return particles


def test_deferred_start_work_that_fails_leaves_the_requests_started_with_it_running() -> None:
    # the lane counted the group's runs as joining before the batch failed, then again when each started
    # alone: the healthy requests started with the bad one never finished (they waited out their timeout)
    bad, healthy = _gated_engine_run(Misbehaving(_failing_deferred_work), Bad())
    assert isinstance(bad, RuntimeError) and str(bad) == "the session failed on a prompt"
    for k, result in enumerate(healthy, 1):
        assert isinstance(result, tiltsmc.SamplerResult), result
        assert same_result(result, tiltsmc.smc(POLICY, TWIST, prompts=[()], num_particles=4, rng=k))


class Replacing(Misbehaving):
    """``propose`` (or ``append``) replaces ``finished`` by an int array, or ``propose`` returns text."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def propose(self, particles: Particles, rng: Any) -> Any:
        log_p = self.inner.propose(particles, rng)
        if self.what == "propose":
            particles.finished = particles.finished.astype(np.int64)
        return "x" if self.what == "text" else log_p

    def append(self, particles: Particles, tokens: Any) -> None:
        self.inner.append(particles, tokens)
        if self.what == "append":
            particles.finished = particles.finished.astype(np.int8)


@pytest.mark.parametrize(
    ("what", "proposal", "message"),
    [
        (
            "propose",
            "naive",
            r"^policy: propose left Particles.finished int64 of shape \(4, 1\), expected bools",
        ),
        (
            "append",
            "optimal",
            r"^policy: append left Particles.finished int8 of shape \(4, 1\), expected bools",
        ),
        ("text", "naive", r"^policy: propose returned str 'x', expected the log-probabilities"),
    ],
)
def test_a_policy_that_breaks_the_batch_during_a_step_is_named(
    what: str, proposal: str, message: str
) -> None:
    # "TypeError: live: expected dtype bool, got int64" (the core's argument), "could not convert string to
    # float: 'x'"
    with pytest.raises(ValueError, match=message):
        tiltsmc.smc(Replacing(what), TWIST, prompts=[()], num_particles=4, proposal=proposal, rng=0)


class OtherVocabulary:
    """The task's twist, its ``next_log_values`` (or the policy's ``next_log_probs``) cut to 2 tokens."""

    supports_engine = True

    def initial_log_value(self, particles: Particles) -> Any:
        return TWIST.initial_log_value(particles)

    def log_value(self, particles: Particles) -> Any:
        return TWIST.log_value(particles)

    def next_log_values(self, particles: Particles) -> Any:
        return TWIST.next_log_values(particles)[..., :2]


class OtherVocabularyPolicy(Misbehaving):
    def next_log_probs(self, particles: Particles) -> Any:
        return self.inner.next_log_probs(particles)[..., :2]


@pytest.mark.parametrize("sampler", ["smc", "sp_gsmc"])
def test_per_token_outputs_of_another_vocabulary_are_named(sampler: str) -> None:
    # numpy's "operands could not be broadcast together with shapes (1,1,4) (1,1,2)"
    def run(policy: Any, reward: Any) -> Any:
        if sampler == "smc":
            return tiltsmc.smc(policy, reward, prompts=[()], num_particles=1, proposal="optimal", rng=0)
        return tiltsmc.sp_gsmc(policy, reward, prompts=[()], pool_size=None, rng=0)

    expected = r"expected \(B, N, vocab_size\) = \(1, 1, 4\)"
    with pytest.raises(ValueError, match=rf"^reward: next_log_values returned shape \(1, 1, 2\), {expected}"):
        run(Misbehaving(), OtherVocabulary())
    with pytest.raises(ValueError, match=rf"^policy: next_log_probs returned shape \(1, 1, 2\), {expected}"):
        run(OtherVocabularyPolicy(), TWIST)


class Countable(Misbehaving):
    """A policy that says its cache's size, but (``max_new_tokens`` None) not the tokens a request adds."""

    def __init__(self, max_new_tokens: Any, cache_bytes_per_token: Any = 8) -> None:
        super().__init__()
        self.max_new_tokens = max_new_tokens
        self.cache_bytes_per_token = cache_bytes_per_token

    def encode_prompt(self, prompt: Any, *limits: Any) -> Any:
        return np.zeros(len(prompt), dtype=np.int64)


def test_a_cache_bound_needs_a_policy_that_says_its_token_limit() -> None:
    # every submit raised "int() argument must be ... not 'NoneType'", naming nothing; a numpy int of
    # bytes a token was read as no size at all
    with pytest.raises(
        ValueError, match=r"^max_cache_bytes: the policy does not say how many tokens a request"
    ):
        tiltsmc.Engine(Countable(None), TWIST, max_cache_bytes=10**6)
    with tiltsmc.Engine(Countable(None), TWIST) as engine:  # "auto": no bound for such a policy
        assert engine.stats()["max_cache_bytes"] is None
        result = engine.submit((), "smc", num_particles=4, rng=0).result(timeout=30)
    assert same_result(result, tiltsmc.smc(POLICY, TWIST, prompts=[()], num_particles=4, rng=0))
    with tiltsmc.Engine(Countable(6, np.int64(8)), TWIST, max_cache_bytes=4 * 6 * 8) as engine:
        assert engine.stats()["max_cache_bytes"] == 192
        assert engine.submit((), "smc", num_particles=4, rng=0).result(timeout=30).samples[0].shape == (4, 6)
        with pytest.raises(ValueError, match=r"^num_particles: the request's KV cache may reach 240 bytes"):
            engine.submit((), "smc", num_particles=5, rng=0)


def test_batch_sizer_settings_are_checked_naming_them() -> None:
    # "'>=' not supported between instances of 'str' and 'int'"; numpy's ints were refused as steps
    for options in ({"tolerance": "0.1"}, {"tolerance": None}, {"smoothing": "x"}, {"tolerance": True}):
        (name,) = options
        with pytest.raises(TypeError, match=rf"^{name}: expected a number"):
            BatchSizer(**options)  # type: ignore[arg-type]
    sizer = BatchSizer(tolerance=np.float32(0.25), min_steps=np.int64(2), memory=np.int32(10))  # type: ignore[arg-type]
    assert (sizer.min_steps, sizer.memory) == (2, 10) and type(sizer.min_steps) is int


# ----------------------------------------------------------------------------------------------------------
# tiltsmc.serving.ray's checks (no Ray is started)


def test_replica_options_are_checked_as_they_are_made() -> None:
    # AttributeError ('NoneType' object has no attribute 'max_queue') at deployment_options, or a replica
    # failing once Ray had started (argparse.Namespace(**model_args) with keys that are not names)
    from tiltsmc.serving.ray import ReplicaOptions
    from tiltsmc.serving.server import Settings

    for model_args in (None, [], {1: 2}):
        with pytest.raises(TypeError, match=r"^model_args: expected a dict of tiltsmc serve's model options"):
            ReplicaOptions(model_args, Settings())  # type: ignore[arg-type]
    for settings in (None, {}):
        with pytest.raises(TypeError, match=r"^settings: expected a tiltsmc.serving.server.Settings"):
            ReplicaOptions({}, settings)  # type: ignore[arg-type]


def test_deployment_options_refuse_what_ray_would_drop_or_refuse_after_it_started() -> None:
    from tiltsmc.serving.ray import ReplicaOptions, check_autoscaling, deployment_options
    from tiltsmc.serving.server import Settings

    options = ReplicaOptions({}, Settings())
    autoscaling = {"min_replicas": 1, "max_replicas": 2}
    # replicas was dropped silently with autoscaling (tiltsmc serve refuses --replicas with --autoscale)
    for replicas in (3, 1):  # 1, the default, was taken as left out
        with pytest.raises(ValueError, match=r"^replicas: not with autoscaling"):
            deployment_options(options, replicas=replicas, autoscaling=autoscaling)
    resources = deployment_options(options, num_cpus=-0.0, num_gpus=-0.0)["ray_actor_options"]
    assert [math.copysign(1.0, resources[name]) for name in ("num_cpus", "num_gpus")] == [1.0, 1.0]
    assert "num_replicas" not in deployment_options(options, autoscaling=autoscaling)
    assert deployment_options(options)["num_replicas"] == 1
    assert deployment_options(options, replicas=np.int64(2))["num_replicas"] == 2  # type: ignore[arg-type]
    # the settings' grace went to Ray as it was; max_queue 0 was blamed on max_ongoing_requests
    for grace, error in ((-1.0, ValueError), (float("nan"), ValueError), ("5", TypeError)):
        with pytest.raises(error, match=r"^options: settings.grace: expected"):
            deployment_options(ReplicaOptions({}, Settings(grace=grace)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^options: settings.max_queue: must be >= 1, got 0"):
        deployment_options(ReplicaOptions({}, Settings(max_queue=0)))
    # a target of None went to Ray Serve, whose field is a number
    with pytest.raises(
        TypeError, match=r"^autoscaling: target_ongoing_requests: expected a number, got None"
    ):
        check_autoscaling({"target_ongoing_requests": None})


def test_ray_arguments_from_a_namespace_of_ones_own_are_checked_naming_the_options() -> None:
    # ValueError "too many values to unpack", TypeError "cannot unpack non-iterable int object", an
    # AttributeError for a namespace without the options left out, and "autoscaling: min_replicas (3) must
    # be <= max_replicas (1)" for --autoscale
    from tiltsmc.serving.ray import ReplicaOptions, application_arguments, check_options, serve_on_ray
    from tiltsmc.serving.server import Settings

    base = {"ray": True, "replicas": None, "autoscale": None, "target_ongoing": None, "address": None,
            "replica_cpus": None, "replica_gpus": None, "host": "127.0.0.1", "port": 0}  # fmt: skip
    for autoscale in ([1, 2, 3], 5):
        with pytest.raises(ValueError, match=r"^--autoscale: expected MIN:MAX \(or a pair of ints\), got"):
            application_arguments(argparse.Namespace(**{**base, "autoscale": autoscale}))
    check_options(argparse.Namespace(ray=True))
    assert application_arguments(argparse.Namespace(ray=True)) == {}
    with pytest.raises(ValueError, match=r"^--autoscale: min_replicas \(3\) must be <= max_replicas \(1\)"):
        serve_on_ray(argparse.Namespace(**{**base, "autoscale": (3, 1)}), ReplicaOptions({}, Settings()))
