"""``tiltsmc serve --ray``: two replicas of the engine on a real local Ray instance (started and stopped
by the test through the command), real HTTP on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

import tiltsmc  # noqa: E402
from tiltsmc.tasks import arithmetic  # noqa: E402

PROMPT = arithmetic.make_problems(4, 1, rng=3)[0].prompt
# The shared server's API key (tiltsmc serve --api-key-env), which its replicas are handed as a digest
API_KEY = "ray-test-key-7d41"
AUTHORISED = {"Authorization": f"Bearer {API_KEY}"}
# 256 particles: about as long as 64 took with the separate policy and PRM
LONG = {"prompt": arithmetic.make_problems(16, 1, rng=0)[0].prompt, "particles": 256, "seed": 1}
# The shared server's --max-queue and --max-batch-rows: small, so that an overload is reached with a few
# dozen requests (two of LONG's run at once)
SHARED_QUEUE = 8
SHARED_ROWS = 512


# Ports Ray's own processes listen on by default (GCS, dashboard, client server, dashboard agent, and its
# workers' range): a free port found by the test must not be one of them, or Ray may take it first (seen
# in CI: "Failed to bind to address '127.0.0.1:52365'", the dashboard agent's default port).
RAY_DEFAULT_PORTS = frozenset({6379, 8265, 10001, 52365, 52366})
RAY_WORKER_PORTS = range(10002, 20000)


def free_port() -> int:
    """A port free now on 127.0.0.1 that none of Ray's processes takes by default."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port not in RAY_DEFAULT_PORTS and port not in RAY_WORKER_PORTS:
            return port


def session_processes(session: int) -> list[int]:
    """The processes of session ``session`` still running (zombies left out): Linux's ``/proc``, the session
    being the sixth field of ``/proc/PID/stat`` (after the command's name in parentheses, which may hold
    anything)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        fields = stat.rpartition(")")[2].split()  # state, ppid, pgrp, session, ...
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(int(entry))
    return found


def end_session(process: subprocess.Popen[Any], within: float = 120) -> int:
    """Stop a command started in a session of its own (``start_new_session``) and what it started: SIGTERM,
    ``within`` seconds for it to exit, then SIGKILL to every process of its session still running (a hung
    command's, and those of the Ray instance it started, whatever their process group: Ray's workers
    each have one of their own). Only those: never ``ray stop``, which stops every Ray instance of the
    user on the machine, those of other tests and processes included. Returns the command's exit
    status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(within)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + 30
    while left := session_processes(process.pid):  # a hung command's, or a Ray left behind by one
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert time.monotonic() < deadline, f"processes of session {process.pid} still running: {left}"
        time.sleep(0.1)
    return process.wait()


class RayServer:
    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / "ray-serve.log"
        self._log = self.log_path.open("w")
        command = [
            sys.executable, "-m", "tiltsmc.cli", "serve", "--ray", "--demo", "--replicas", "2",
            "--replica-cpus", "0.5", "--port", str(self.port), "--max-request-particles", "256",
            "--workers", "2", "--max-queue", str(SHARED_QUEUE),
            "--max-batch-rows", str(SHARED_ROWS),
            "--grace", "300",  # the SIGTERM test's long requests drain whole on a loaded machine
            "--api-key-env", "TILTSMC_TEST_KEY",
        ]  # fmt: skip
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TILTSMC_TEST_KEY": API_KEY}
        self.process = subprocess.Popen(  # a session of its own: its Ray instance's processes, see stop
            command, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the command exited: {self.log()}"
            if len(self.instances(4)) == 2:
                return
            time.sleep(1)
        raise AssertionError(f"two replicas did not come up: {self.log()}")

    def post(self, body: Any, timeout: float = 120, stream: bool = False) -> Any:
        return httpx.post(
            f"{self.url}/v1/completions", json={**body, "stream": True} if stream else body,
            headers=AUTHORISED, timeout=timeout,
        )  # fmt: skip

    def get(self, path: str) -> Any:
        return httpx.get(f"{self.url}{path}", headers=AUTHORISED, timeout=30)

    def instances(self, tries: int) -> set[str]:
        """The replicas that answered ``tries`` small requests, sent four at a time: Ray Serve routes a
        request to the less loaded of two replicas, so requests in flight together spread, where requests
        sent one after another may all go to one replica (seen in CI: 8 in a row to the same one)."""

        def ask(_: int) -> str | None:
            try:
                response = self.post({"prompt": PROMPT, "particles": 2, "seed": 0}, timeout=30)
            except httpx.TransportError:
                return None
            return response.headers["x-tiltsmc-instance"] if response.status_code == 200 else None

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            return {instance for instance in pool.map(ask, range(tries)) if instance is not None}

    def both_instances(self, within: float = 60) -> set[str]:
        """The two replicas, asked until both have answered (``within`` seconds at most)."""
        deadline = time.monotonic() + within
        seen: set[str] = set()
        while len(seen) < 2:
            assert time.monotonic() < deadline, f"only {seen} answered: {self.log()}"
            seen |= self.instances(8)
        return seen

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def record(self, event: str) -> dict[str, Any]:
        """The command's first JSON log record of ``event``."""
        for line in self.log().splitlines():
            if line.startswith("{") and f'"event": "{event}"' in line:
                return dict(json.loads(line))
        raise AssertionError(f"no {event!r} record: {self.log()}")

    def stop(self) -> int:
        """SIGTERM, and the command's exit status; a command hung past 120 s is killed with its Ray instance
        (``end_session``)."""
        status = end_session(self.process, within=120)
        self._log.close()
        return status


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayServer]:
    server = RayServer(tmp_path_factory.mktemp("ray"))
    yield server
    assert server.stop() == 0, server.log()


def test_requests_spread_over_replicas_and_match_the_offline_run(ray_server: RayServer) -> None:
    bodies = [{"prompt": PROMPT, "seed": k % 3, "particles": 8} for k in range(12)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(ray_server.post, bodies))
    assert [r.status_code for r in responses] == [200] * 12
    assert len({r.headers["x-tiltsmc-instance"] for r in responses}) == 2  # both replicas served
    policy, reward = arithmetic.load_models()
    for body, response in zip(bodies, responses):
        offline = tiltsmc.smc(policy, reward, prompts=[PROMPT], num_particles=8, rng=body["seed"]).to_dict()
        detail = response.json()["tiltsmc"]["choices"][0]
        # the same seed gives the same run on either replica, batched or not (up to batched rounding)
        assert float(detail["log_z"]) == pytest.approx(float(offline["log_z"][0]), rel=1e-6)
        weights = [-math.inf if w is None else w for w in detail["log_weights"]]  # null: a zero weight
        offline_weights = [-math.inf if w is None else w for w in offline["log_weights"][0]]
        assert weights == pytest.approx(offline_weights, rel=1e-6, abs=1e-9)
    metrics = ray_server.get("/metrics").text
    assert "tiltsmc_instance_info{instance=" in metrics and "tiltsmc_requests_total" in metrics
    assert 'tiltsmc_worker_rows_in_flight{worker="1"}' in metrics  # each replica's engine has two workers


def test_bad_request_is_the_same_4xx_as_tiltsmc_serve(ray_server: RayServer) -> None:
    """A bad request's 400, and the API key's 401, through Ray Serve's proxy (the replicas hold the key's
    digest only: the right key is let in, see the other tests)."""
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {API_KEY}x"}):
        refused = httpx.post(f"{ray_server.url}/v1/completions", json={"prompt": PROMPT}, headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{ray_server.url}/metrics", timeout=30).status_code == 401
    response = ray_server.post({"prompt": PROMPT, "particles": 0})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "particles"
    response = ray_server.post({"prompt": PROMPT, "pool_size": 3})
    assert response.status_code == 400 and response.json()["error"]["message"].startswith("pool_size:")


def test_an_overload_is_the_engines_429_at_once_and_health_answers_meanwhile(ray_server: RayServer) -> None:
    """More requests than the replicas' engines hold: those past their queues get the engine's 429 (with
    ``Retry-After``) at once, as from ``tiltsmc serve``, the others are served, and ``/health`` and
    ``/metrics`` answer at once meanwhile (Ray Serve's ``max_ongoing_requests`` was the engine's
    ``max_queue``: a replica never let its engine's queue fill, so nothing was refused, the rest waited in
    Ray's unbounded queue, past ``--timeout`` into 504s, and ``/health`` waited behind them)."""
    body = {**LONG, "particles": 64}
    count = 2 * (SHARED_QUEUE + SHARED_ROWS // 64) + 8  # past both engines' queues and what they run at once

    def post(seed: int) -> tuple[Any, float]:
        began = time.monotonic()
        response = ray_server.post({**body, "seed": seed})
        return response, time.monotonic() - began

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        posted = [pool.submit(post, seed) for seed in range(count)]
        time.sleep(1.0)
        for path in ("/health", "/metrics"):
            began = time.monotonic()
            assert ray_server.get(path).status_code == 200
            assert time.monotonic() - began < 5, path
        outcomes = [future.result() for future in posted]
    codes = [response.status_code for response, _ in outcomes]
    assert set(codes) == {200, 429}, codes
    for response, seconds in outcomes:
        if response.status_code == 429:  # the engine's (Ray's own has a text body)
            assert response.text.startswith('{"error"'), response.text
            assert response.json()["error"]["code"] == "overloaded" and response.headers["retry-after"] == "1"
            assert seconds < 10, seconds  # refused as it came, not after a wait


def test_one_request_id_names_the_request_and_its_log_line(ray_server: RayServer) -> None:
    """An answer through Ray Serve has one ``X-Request-ID`` (Ray's proxy added its own to tiltsmc's), the
    completion's id; and the replica logs the request's JSON line, as ``tiltsmc serve`` does, on its
    standard error in Ray's log folder (``worker-*-PID.err``, the folder named by the ``listening`` line),
    where it was lost."""
    for sent in ({"X-Request-ID": "ray-test-id-1"}, {}):
        response = httpx.post(
            f"{ray_server.url}/v1/completions", json={"prompt": PROMPT, "particles": 2, "seed": 0},
            headers={**AUTHORISED, **sent}, timeout=60,
        )  # fmt: skip
        assert response.status_code == 200, response.text
        ids = response.headers.get_list("x-request-id")
        assert len(ids) == 1 and response.json()["id"] == f"cmpl-{ids[0]}", ids
        if sent:
            assert ids == ["ray-test-id-1"]
    folder = Path(ray_server.record("listening")["ray_logs"])
    pid = int(response.headers["x-tiltsmc-instance"].split("@")[1])
    deadline = time.monotonic() + 30
    while True:
        logged = [
            json.loads(line)
            for path in folder.glob(f"worker-*-{pid}.err")
            for line in path.read_text().splitlines()
            if line.startswith('{"event": "request"')
        ]
        if any(record["id"] == ids[0] for record in logged):
            break
        assert time.monotonic() < deadline, (list(folder.glob(f"worker-*-{pid}.err")), logged[-3:])
        time.sleep(0.5)
    record = next(record for record in logged if record["id"] == ids[0])
    assert record["status"] == 200 and record["outcome"] == "completed"


def test_the_api_key_is_not_in_the_environment_of_the_replicas(ray_server: RayServer) -> None:
    """``--api-key-env``'s variable is read, then left out of the environment the Ray instance's processes
    inherit (every replica's held the key)."""
    instances = ray_server.both_instances()
    for instance in instances:
        environ = Path(f"/proc/{instance.split('@')[1]}/environ").read_bytes().split(b"\0")
        assert not any(entry.startswith(b"TILTSMC_TEST_KEY=") for entry in environ), instance
        assert not any(API_KEY.encode() in entry for entry in environ), instance


def test_streaming_and_the_model_list_come_through_the_ingress(ray_server: RayServer) -> None:
    """Server-sent events pass Ray Serve's proxy whole: the streamed choice is the plain answer's."""
    body = {"prompt": PROMPT, "seed": 4, "particles": 4}
    plain = ray_server.post(body).json()
    streamed = ray_server.post(body, stream=True)
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    events = [block.removeprefix("data: ") for block in streamed.text.split("\n\n") if block]
    assert events[-1] == "[DONE]" and len(events) == 2, streamed.text
    assert json.loads(events[0])["choices"] == plain["choices"]
    models = ray_server.get("/v1/models").json()
    assert [card["id"] for card in models["data"]] == ["tiltsmc"]


def test_a_killed_replica_is_replaced_and_the_other_keeps_serving(ray_server: RayServer) -> None:
    before = ray_server.both_instances()
    victim = sorted(before)[0]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        in_flight = [pool.submit(ray_server.post, LONG) for _ in range(6)]  # ~3 s each, 3 per replica
        time.sleep(0.5)
        os.kill(int(victim.split("@")[1]), signal.SIGKILL)
        served = set()
        # The other replica keeps serving meanwhile (a request the proxy had already routed to the dead one
        # may fail, or wait until Ray declares the replica dead: retried, as a client may, since a request
        # is idempotent given its seed; seen waiting over 60 s on a machine busy with other work).
        for _ in range(10):
            try:
                answer = ray_server.post({"prompt": PROMPT, "particles": 2, "seed": 0}, timeout=60)
            except httpx.TimeoutException:
                continue
            if answer.status_code == 200:
                served.add(answer.headers["x-tiltsmc-instance"])
                break
        outcomes = [f.result() for f in in_flight]  # none hangs (the client would time out)
    assert served and victim not in served
    codes = [r.status_code for r in outcomes]
    assert set(codes) <= {200, 500}, codes  # those on the killed replica: Ray's 500, with a body
    assert all(r.text for r in outcomes if r.status_code == 500)
    assert all(r.headers["x-tiltsmc-instance"] != victim for r in outcomes if r.status_code == 200)
    deadline = time.monotonic() + 180
    while True:  # Ray Serve starts a replica in the killed one's place
        now = ray_server.instances(6)
        if len(now) == 2 and victim not in now:
            break
        assert time.monotonic() < deadline, f"no replacement replica: {now}"
        time.sleep(2)


def test_a_failed_take_down_does_not_hide_why_serving_ended(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The deployment's own error (here Serve's proxy failing to start) is raised though ``serve.shutdown``
    then fails too (logged), and the local Ray instance is still shut down."""
    import ray
    from ray import serve
    from tiltsmc.cli import build_parser
    from tiltsmc.serving.ray import DeployFailed, ReplicaOptions, serve_on_ray
    from tiltsmc.serving.server import Settings

    calls: list[str] = []

    def fail(what: str, error: Exception) -> Any:
        def call(*args: Any, **kwargs: Any) -> None:
            calls.append(what)
            raise error

        return call

    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append("ray.init"))
    monkeypatch.setattr(serve, "start", fail("serve.start", RuntimeError("the proxy could not start")))
    monkeypatch.setattr(serve, "shutdown", fail("serve.shutdown", ValueError("the proxy actor died")))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("ray.shutdown"))
    args = build_parser().parse_args(
        ["serve", "--ray", "--demo", "--replicas", "1", "--port", str(free_port())]
    )
    with pytest.raises(DeployFailed, match="the proxy could not start"):
        serve_on_ray(args, ReplicaOptions({}, Settings()))
    assert calls == ["ray.init", "serve.start", "serve.shutdown", "ray.shutdown"]
    logged = [json.loads(line) for line in capsys.readouterr().err.splitlines() if "take_down" in line]
    assert logged == [
        {
            "event": "ray_take_down_failed",
            "step": "serve.shutdown",
            "error": "ValueError('the proxy actor died')",
        }
    ]


def test_a_ray_without_the_late_bound_ingress_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before Ray 2.56, ``serve.ingress`` needs its app when the class is declared: ``--ray`` says which
    Ray it needs (an ImportError, as for a missing extra) instead of failing inside Ray."""
    from ray import serve
    from tiltsmc.serving.ray import ReplicaOptions, build_application
    from tiltsmc.serving.server import Settings

    def old_ingress(app: Any) -> Any:  # Ray 2.55's signature: the app is required
        raise AssertionError("not reached")

    monkeypatch.setattr(serve, "ingress", old_ingress)
    with pytest.raises(ImportError, match=r"Ray Serve >= 2\.56 .* got ray \d"):
        build_application(ReplicaOptions({}, Settings()))


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        ({"replicas": 0}, ValueError, "^replicas: must be >= 1, got 0"),
        ({"replicas": True}, TypeError, "^replicas: expected an int, got True"),
        ({"replicas": 2.0}, TypeError, "^replicas: expected an int, got 2.0"),
        ({"num_cpus": -1}, ValueError, r"^num_cpus: expected a finite number >= 0 \(0, or at least 0.0001"),
        ({"num_cpus": math.nan}, ValueError, "^num_cpus: expected a finite number >= 0"),
        ({"num_cpus": 1e-5}, ValueError, "^num_cpus: expected a finite number >= 0"),
        ({"num_cpus": "1"}, TypeError, "^num_cpus: expected a number, got"),
        ({"num_cpus": True}, TypeError, "^num_cpus: expected a number, got"),
        ({"num_gpus": math.inf}, ValueError, "^num_gpus: expected a finite number >= 0"),
        ({"num_gpus": None}, TypeError, "^num_gpus: expected a number, got"),
        # 0 was read as "the default" (max_queue) silently
        ({"max_ongoing_requests": 0}, ValueError, "^max_ongoing_requests: must be >= 1, got 0"),
        ({"max_ongoing_requests": -2}, ValueError, "^max_ongoing_requests: must be >= 1, got -2"),
        ({"max_ongoing_requests": 8.0}, TypeError, "^max_ongoing_requests: expected an int, got 8.0"),
        ({"autoscaling": "1:4"}, TypeError, "^autoscaling: expected a dict"),
        (
            {"autoscaling": {"min_replicas": 3, "max_replicas": 1}},
            ValueError,
            r"^autoscaling: min_replicas \(3\)",
        ),
        ({"autoscaling": {"max_replicas": 0}}, ValueError, "^autoscaling: max_replicas: must be >= 1, got 0"),
        ({"autoscaling": {"min_replicas": -1}}, ValueError, "^autoscaling: min_replicas: must be >= 0"),
        (
            {"autoscaling": {"target_ongoing_requests": 0}},
            ValueError,
            "^autoscaling: target_ongoing_requests: ",
        ),
        ({"autoscaling": {"target_ongoing_requests": math.nan}}, ValueError, "^autoscaling: target_ongoing_"),
        (
            {"autoscaling": {"target_ongoing_requests": "8"}},
            TypeError,
            "^autoscaling: target_ongoing_requests",
        ),
    ],
)
def test_build_application_checks_its_arguments_before_ray(
    arguments: dict[str, Any], error: type, match: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each argument is checked by ``build_application`` itself, naming it, before Ray is reached (Ray's own
    pydantic errors surfaced, and ``max_ongoing_requests=0`` became the engine's ``max_queue``)."""
    from ray import serve
    from tiltsmc.serving.ray import ReplicaOptions, build_application
    from tiltsmc.serving.server import Settings

    def reached(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("Ray Serve was reached")

    monkeypatch.setattr(serve, "ingress", reached)
    monkeypatch.setattr(serve, "deployment", reached)
    with pytest.raises(error, match=match):
        build_application(ReplicaOptions({}, Settings()), **arguments)
    with pytest.raises(TypeError, match=r"^options: expected a ReplicaOptions, got dict"):
        build_application({}, **arguments)  # type: ignore[arg-type]


def test_build_applications_deployment_options() -> None:
    """What ``build_application`` deploys: its defaults (those ``tiltsmc serve --ray`` takes), and the
    arguments given (a zero reservation is Ray's to take)."""
    import numpy as np
    from tiltsmc.serving.ray import DRAIN_POLL_S, ONGOING_HEADROOM, ReplicaOptions, deployment_options
    from tiltsmc.serving.server import SEND_MARGIN, TIMEOUT_MARGIN, Settings

    settings = Settings()
    default = deployment_options(ReplicaOptions({}, settings))
    # the engine's admission decides (its queue and its rows), with room for /health and /metrics; Ray queues
    # as many more at most (it queued without bound)
    holds = settings.max_queue + settings.max_batch_rows
    assert default["num_replicas"] == 1 and default["max_ongoing_requests"] == holds + ONGOING_HEADROOM
    assert default["max_queued_requests"] == holds + ONGOING_HEADROOM
    margins = TIMEOUT_MARGIN + SEND_MARGIN + DRAIN_POLL_S  # as uvicorn waits, and a look at the status
    assert default["graceful_shutdown_timeout_s"] == settings.grace + margins
    assert default["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    autoscaling = {"min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 4, "upscale_delay_s": 1.0}
    given = deployment_options(
        ReplicaOptions({}, settings), num_cpus=np.float32(0.5), num_gpus=0, max_ongoing_requests=np.int64(3),
        autoscaling=autoscaling,
    )  # fmt: skip
    assert autoscaling["target_ongoing_requests"] == 4  # the dict given is left as it was
    assert given["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert given["max_ongoing_requests"] == given["max_queued_requests"] == 3 and "num_replicas" not in given
    assert given["autoscaling_config"] == {
        "min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 4.0, "upscale_delay_s": 1.0,
    }  # fmt: skip


def test_the_replicas_are_handed_the_api_keys_digest_not_the_key() -> None:
    """Ray keeps a deployment's arguments with the application, where whoever reaches the cluster can
    read them: the application ``build_application`` makes holds the key's SHA-256 digest, never the key
    (it held the ``Settings`` as given), and the options given are left as they were."""
    import hashlib

    from ray import cloudpickle
    from tiltsmc.serving.ray import ReplicaOptions, build_application
    from tiltsmc.serving.server import ApiKeyDigest, Settings

    key = "tiltsmc-test-key-9f3b2c"
    options = ReplicaOptions({}, Settings(api_key=key))
    held = cloudpickle.dumps(build_application(options))
    assert key.encode() not in held
    assert hashlib.sha256(key.encode()).digest() in held
    assert options.settings.api_key == key
    digest = ApiKeyDigest.of(key)
    assert digest.sha256 in cloudpickle.dumps(build_application(ReplicaOptions({}, Settings(api_key=digest))))
    assert key not in repr(options) and key not in str(Settings(api_key=key))


def test_serve_on_ray_checks_a_namespace_of_its_own_before_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """A namespace not from the parser (a caller of serve_on_ray) is checked too, naming the options, before
    ``ray.init``."""
    import argparse

    import ray
    from tiltsmc.serving.ray import ReplicaOptions, serve_on_ray
    from tiltsmc.serving.server import Settings

    monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail("Ray started"))
    base = {"ray": True, "replicas": None, "autoscale": None, "target_ongoing": None, "address": None,
            "replica_cpus": None, "replica_gpus": None, "host": "127.0.0.1", "port": 0}  # fmt: skip
    for changes, message in [
        ({"replica_cpus": -1.0}, "^--replica-cpus: expected a finite number >= 0"),
        ({"replicas": 0}, "^--replicas: must be >= 1, got 0"),
        ({"autoscale": "2"}, "^--autoscale: expected MIN:MAX, got '2'"),
        ({"autoscale": (1, 2), "target_ongoing": -1.0}, "^--target-ongoing: expected a finite number > 0"),
        ({"target_ongoing": 3.0}, "^--target-ongoing: an option of --autoscale"),
    ]:
        with pytest.raises(ValueError, match=message):
            serve_on_ray(argparse.Namespace(**{**base, **changes}), ReplicaOptions({}, Settings()))


# -- taking down, other clusters, signals while deploying, errors -------------------------------------------


def test_sigterm_lets_the_requests_in_flight_finish(ray_server: RayServer) -> None:
    """SIGTERM deletes the application first, its replicas finishing their requests in flight while Ray
    Serve's proxy still answers, and only then stops Serve (``serve.shutdown`` at once killed the proxy:
    "Server disconnected without sending a response"). The requests stream, so that SIGTERM is sent once
    each is in flight: a streamed answer's headers come once a replica's engine has admitted it (sent
    0.5 s after they were, two of six had not reached the proxy on a busy CI machine, and got its 404 for
    an application being deleted). The last test of the shared server: it stops it."""
    admitted = threading.Semaphore(0)

    def streamed(body: Any) -> tuple[Any, str, float]:
        try:
            with httpx.stream(
                "POST", f"{ray_server.url}/v1/completions", json={**body, "stream": True},
                headers=AUTHORISED, timeout=120,
            ) as response:  # fmt: skip
                admitted.release()
                text = response.read().decode()
            return response.status_code, text, time.monotonic()
        except httpx.TransportError as error:
            admitted.release()
            return repr(error), "", time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        in_flight = [pool.submit(streamed, LONG) for _ in range(6)]  # ~3 s each, 3 per replica
        for _ in in_flight:
            assert admitted.acquire(timeout=120), ray_server.log()
        signalled = time.monotonic()
        ray_server.process.send_signal(signal.SIGTERM)
        outcomes = [f.result() for f in in_flight]
    assert [status for status, _, _ in outcomes] == [200] * 6
    for _, text, _ in outcomes:  # each answer whole: its choice, then the end of the stream
        events = [block.removeprefix("data: ") for block in text.split("\n\n") if block.strip()]
        assert events[-1] == "[DONE]" and "choices" in json.loads(events[-2]), text
    assert all(at > signalled for _, _, at in outcomes)  # they were in flight when SIGTERM came
    assert ray_server.process.wait(120) == 0, ray_server.log()
    assert '"event": "stopping"' in ray_server.log()


class ServeCommand:
    """``tiltsmc serve --ray --demo ARGUMENTS`` in a session of its own (the processes of the Ray instance
    it starts die with it), its output in ``log_path``; what is left of its session killed on leaving."""

    def __init__(self, arguments: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = log_path.open("w")
        command = [sys.executable, "-m", "tiltsmc.cli", "serve", "--ray", "--demo", *arguments]
        environment = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=environment, start_new_session=True
        )

    def __enter__(self) -> ServeCommand:
        return self

    def __exit__(self, *exc_info: object) -> None:
        end_session(self.process, within=0)  # SIGKILL to what is left of its session, Ray's workers included
        self._log.close()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def record(self, event: str) -> dict[str, Any] | None:
        """The first JSON log record of ``event``, or None."""
        for line in self.log().splitlines():
            if line.startswith("{") and f'"event": "{event}"' in line:
                return dict(json.loads(line))
        return None

    def wait_for(self, event: str, within: float) -> dict[str, Any] | None:
        """The first record of ``event`` once logged, or None where the command exits first."""
        deadline = time.monotonic() + within
        while (record := self.record(event)) is None:
            if self.process.poll() is not None:
                return self.record(event)
            assert time.monotonic() < deadline, f"no {event!r} within {within} s: {self.log()}"
            time.sleep(0.5)
        return record

    def stop(self, signum: int = signal.SIGTERM, within: float = 120) -> int:
        """Send ``signum`` and wait for the command's exit status (``within`` seconds at most)."""
        self.process.send_signal(signum)
        try:
            return self.process.wait(within)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {within} s after signal {signum}: {self.log()}") from None

    def session_left(self) -> bool:
        """Whether a process of the command's session (its Ray instance's) still runs."""
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        return True


# A command hung (SIGTERM ignored) with a child in a process group of its own, as Ray's workers are: the
# child says its pid once it has one.
HUNG_SCRIPT = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = (
    "import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); os.setpgrp(); "
    "print(os.getpid(), flush=True); time.sleep(600)"
)
subprocess.Popen([sys.executable, "-c", child])
time.sleep(600)
"""


def test_a_hung_command_is_killed_with_its_session_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test's way to stop a command past its SIGTERM (``RayServer.stop``, ``ServeCommand``) kills every
    process of the command's session, in any process group, and nothing else: it fell back to ``ray stop
    --force`` (here recorded, not run), which stops every Ray instance of the user on the machine, other
    tests' included, and left the command's own processes in a group of their own running."""
    run: list[Any] = []
    monkeypatch.setattr(subprocess, "run", lambda command, *args, **kwargs: run.append(command))
    sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
    bystander = subprocess.Popen(sleep, start_new_session=True)  # another test's processes
    command = subprocess.Popen(
        [sys.executable, "-c", HUNG_SCRIPT], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert command.stdout is not None
        ready, _, _ = select.select([command.stdout], [], [], 60)
        assert ready, "the hung command's child did not start"
        child = int(command.stdout.readline())
        assert os.getsid(child) == command.pid and os.getpgid(child) == child  # a group of its own
        started = time.monotonic()
        assert end_session(command, within=1) == -signal.SIGKILL
        assert time.monotonic() - started < 30
        assert session_processes(command.pid) == []  # the child too
        assert bystander.poll() is None  # left running
        assert not any("stop" in map(str, ran) for ran in run), run  # no `ray stop`
    finally:
        for pid in session_processes(command.pid):
            os.kill(pid, signal.SIGKILL)
        command.wait()
        bystander.kill()
        bystander.wait()
        if command.stdout is not None:
            command.stdout.close()


# A Ray cluster of another owner: its own Serve on a port given, with an application "other" at /other.
HOLDER_SCRIPT = """
import json, sys
import ray
from ray import serve

ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[1])})

@serve.deployment(ray_actor_options={"num_cpus": 0})
def other(request):
    return "other"

serve.run(other.bind(), name="other", route_prefix="/other")
print(json.dumps({"address": ray.get_runtime_context().gcs_address}), flush=True)
sys.stdin.read()  # until the test closes it
serve.shutdown()
ray.shutdown()
"""


class OtherCluster:
    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLDER_SCRIPT, str(self.port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, start_new_session=True,
        )  # fmt: skip
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 240)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise AssertionError(f"the other cluster did not start: {log_path.read_text()}")
        self.address = str(json.loads(line)["address"])
        # what a driver given its address needs to join it: Ray's token authentication, on by default for a
        # local instance (its token in ~/.ray/auth_token), is used with an address only when asked
        self.env = {"RAY_AUTH_MODE": "token"}

    def other_answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/other", timeout=30).text == "other"
        except httpx.TransportError:
            return False

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()  # the script shuts its Serve and Ray down
        try:
            self.process.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        assert self.process.stdout is not None
        self.process.stdout.close()
        self._log.close()


@pytest.fixture(scope="module")
def other_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OtherCluster]:
    cluster = OtherCluster(tmp_path_factory.mktemp("other") / "other-cluster.log")
    yield cluster
    cluster.close()


@pytest.mark.ray_cluster
def test_a_port_other_than_the_one_serve_listens_on_in_a_joined_cluster_is_refused(
    other_cluster: OtherCluster, tmp_path: Path
) -> None:
    """Ray Serve already running on the cluster of ``--address`` keeps its port (Ray only warns): the command
    refused, before deploying, instead of saying it listened on ``--port``."""
    port = free_port()
    arguments = ["--address", other_cluster.address, "--replica-cpus", "0.5", "--port", str(port)]
    with ServeCommand(arguments, tmp_path / "serve.log", other_cluster.env) as command:
        assert command.wait_for("listening", within=240) is None, command.log()
        assert command.process.returncode == 2
        assert command.log().splitlines()[-1] == (
            f"tiltsmc: --port: Ray Serve already runs on the cluster at --address {other_cluster.address}, "
            f"listening on port {other_cluster.port}, and keeps it: give --port {other_cluster.port}"
        )
    assert other_cluster.other_answers()


@pytest.mark.ray_cluster
def test_on_a_joined_cluster_only_its_own_application_is_taken_down(
    other_cluster: OtherCluster, tmp_path: Path
) -> None:
    """With ``--address`` the command deploys beside the cluster's other applications, and on SIGTERM deletes
    its own only: Serve and the others keep running."""
    arguments = [
        "--address",
        other_cluster.address,
        "--replica-cpus",
        "0.5",
        "--port",
        str(other_cluster.port),
    ]
    with ServeCommand(arguments, tmp_path / "serve.log", other_cluster.env) as command:
        listening = command.wait_for("listening", within=240)
        assert listening is not None and listening["port"] == other_cluster.port, command.log()
        models = httpx.get(f"{other_cluster.url}/v1/models", timeout=30)
        assert models.status_code == 200 and models.json()["data"][0]["id"] == "tiltsmc"
        assert command.stop() == 0, command.log()
    assert other_cluster.other_answers()
    assert httpx.get(f"{other_cluster.url}/v1/models", timeout=30).status_code == 404  # its app is gone


@pytest.mark.ray_cluster
def test_a_second_command_on_a_cluster_where_tiltsmc_runs_is_refused_and_the_first_keeps_serving(
    other_cluster: OtherCluster, tmp_path: Path
) -> None:
    """A second ``tiltsmc serve --ray --address`` on a cluster where tiltsmc's application already runs:
    refused before deploying, naming the application and ``--address`` (``serve.run_many`` replaced the
    first command's application silently, and the second command's exit deleted it); the first keeps
    serving, from the same replica, and takes its application down on SIGTERM as before."""
    address = other_cluster.address
    arguments = ["--address", address, "--replica-cpus", "0.5", "--port", str(other_cluster.port)]
    body = {"prompt": PROMPT, "particles": 2, "seed": 0}
    with ServeCommand(arguments, tmp_path / "first.log", other_cluster.env) as first:
        assert first.wait_for("listening", within=240) is not None, first.log()
        before = httpx.post(f"{other_cluster.url}/v1/completions", json=body, timeout=60)
        assert before.status_code == 200, before.text
        with ServeCommand(arguments, tmp_path / "second.log", other_cluster.env) as second:
            assert second.wait_for("listening", within=240) is None, second.log()
            assert second.process.returncode == 2, second.log()
            assert second.log().splitlines()[-1] == (
                f"tiltsmc: --address {address}: Ray Serve on this cluster already has an application named "
                "'tiltsmc' (status RUNNING: another tiltsmc serve --ray?), which deploying would replace; "
                "stop it first, or deploy on another cluster"
            )
        after = httpx.post(f"{other_cluster.url}/v1/completions", json=body, timeout=60)
        assert after.status_code == 200 and after.json()["choices"] == before.json()["choices"], after.text
        assert after.headers["x-tiltsmc-instance"] == before.headers["x-tiltsmc-instance"]  # not redeployed
        assert first.process.poll() is None, first.log()
        assert first.stop() == 0, first.log()
    assert other_cluster.other_answers()
    assert httpx.get(f"{other_cluster.url}/v1/models", timeout=30).status_code == 404  # its app is gone


@pytest.mark.ray_cluster
def test_without_address_a_ray_instance_of_its_own_is_started(
    other_cluster: OtherCluster, tmp_path: Path
) -> None:
    """Without ``--address`` the command starts a Ray instance of its own even where another is in reach
    (``RAY_ADDRESS``, as in a Ray job): ``ray.init()`` joined it, served on the other's Serve port while
    saying ``--port``, and on SIGTERM shut down the other's Serve and every application on it."""
    port = free_port()
    env = {**other_cluster.env, "RAY_ADDRESS": other_cluster.address}
    with ServeCommand(["--replica-cpus", "0.5", "--port", str(port)], tmp_path / "serve.log", env) as command:
        listening = command.wait_for("listening", within=240)
        assert listening is not None and listening["port"] == port, command.log()
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).status_code == 200
        elsewhere = httpx.get(f"{other_cluster.url}/v1/models", timeout=30)
        assert elsewhere.status_code == 404  # not deployed on the other cluster
        assert command.stop() == 0, command.log()
    assert other_cluster.other_answers()


@pytest.mark.ray_cluster
def test_a_replica_that_cannot_be_placed_is_reported_and_a_signal_still_stops_the_command(
    tmp_path: Path,
) -> None:
    """Replicas Ray cannot place (more CPUs than any node has): the command says so while it waits, and
    SIGINT (SIGTERM alike) stops it there, within the grace period, its Ray instance gone with it (the
    signal was only read once ``serve.run`` returned, which it never did)."""
    arguments = ["--replica-cpus", "64", "--port", str(free_port()), "--grace", "20"]
    with ServeCommand(arguments, tmp_path / "serve.log") as command:
        waiting = command.wait_for("waiting_for_replicas", within=180)
        assert waiting is not None, command.log()
        assert waiting["running"] == 0 and waiting["replicas"] == 1
        assert waiting["message"].startswith(
            "waiting for 1 of 1 replicas: Ray cannot place a replica with 64 CPUs and 0 GPUs "
            "(--replica-cpus, --replica-gpus): no node of the cluster has as many"
        ), waiting
        signalled = time.monotonic()
        assert command.stop(signal.SIGINT, within=60) == 0, command.log()
        assert time.monotonic() - signalled < 20, command.log()
        assert command.record("listening") is None and command.record("stopping") is not None
        deadline = time.monotonic() + 10
        while command.session_left():  # Ray's processes end with the command
            assert time.monotonic() < deadline, subprocess.run(
                ["ps", "-o", "pid,cmd", "-s", str(command.process.pid)], capture_output=True, text=True
            ).stdout
            time.sleep(0.5)


@pytest.mark.ray_cluster
def test_a_request_still_running_at_the_end_of_the_grace_period_gets_the_503_closed(tmp_path: Path) -> None:
    """SIGTERM: a request the grace period does not let finish gets ``tiltsmc serve``'s 503 ``closed`` (the
    replica begins its engine's drain as its application is deleted), not Ray's bare-text 500 when Ray Serve
    stopped the replica at its ``graceful_shutdown_timeout_s``; the command exits 0."""
    port = free_port()
    arguments = ["--grace", "1", "--timeout", "300", "--max-request-particles", "2048", "--max-n", "4",
                 "--replica-cpus", "0.5", "--port", str(port)]  # fmt: skip
    body = {**LONG, "particles": 2048, "n": 4}  # four runs of 2048 rows: far longer than the grace period
    with ServeCommand(arguments, tmp_path / "serve.log") as command:
        assert command.wait_for("listening", within=240) is not None, command.log()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            url = f"http://127.0.0.1:{port}/v1/completions"
            posted = pool.submit(httpx.post, url, json=body, timeout=120)
            time.sleep(2)
            assert not posted.done(), posted.result().text
            signalled = time.monotonic()
            assert command.stop(within=120) == 0, command.log()
            response = posted.result()
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "closed"
        assert time.monotonic() - signalled < 60


def test_a_port_in_use_is_refused_as_tiltsmc_serve_refuses_it_before_ray_starts() -> None:
    """``--port`` taken by another process: the same one-line refusal and status 2 as ``tiltsmc serve``,
    before Ray starts (Ray's proxy failed to bind once it had: a coloured traceback on one line, status 1)."""
    command = [sys.executable, "-m", "tiltsmc.cli", "serve", "--demo"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        on_ray = subprocess.run(
            [*command, "--ray", "--port", port], capture_output=True, text=True, env=env, timeout=180
        )
        plain = subprocess.run(
            [*command, "--port", port], capture_output=True, text=True, env=env, timeout=180
        )
    assert (on_ray.returncode, plain.returncode) == (2, 2), (on_ray.stderr, plain.stderr)
    assert on_ray.stderr.startswith(f"tiltsmc: --port: cannot listen on 127.0.0.1:{port}: "), on_ray.stderr
    assert on_ray.stderr.splitlines() == plain.stderr.splitlines()[-1:]  # one line: Ray never started


def test_an_address_where_no_ray_cluster_is_is_refused_at_once() -> None:
    """``--address`` where nothing listens: one line naming it, status 2, before Ray is reached and within
    seconds (``ray.init`` tried it for about 14 minutes, 20 tries of 41 s with Ray 2.60's defaults, its
    warnings on standard error, and a ConnectionError then ended the command as an unexpected error)."""
    closed = f"127.0.0.1:{free_port()}"  # free: nothing listens there
    command = [sys.executable, "-m", "tiltsmc.cli", "serve", "--ray", "--demo", "--address", closed,
               "--port", str(free_port())]  # fmt: skip
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert time.monotonic() - started < 60, result.stderr
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"tiltsmc: --address {closed}: no Ray cluster there (cannot connect to {closed}: Connection "
        "refused); give the address of a running cluster's head, or leave --address out to start a Ray "
        "instance"
    ]


def test_an_address_ray_cannot_join_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ray.init``'s ConnectionError for ``--address`` (``auto`` where no cluster runs, or a port that
    accepts but is not Ray's): a ValueError naming ``--address`` with Ray's reason, before Serve is reached
    (it ended the command as an unexpected error)."""
    import ray
    from ray import serve
    from tiltsmc.cli import build_parser
    from tiltsmc.serving.ray import ReplicaOptions, serve_on_ray
    from tiltsmc.serving.server import Settings

    def refused(**kwargs: Any) -> None:
        raise ConnectionError("Could not find any running Ray instance. Please give its address.")

    monkeypatch.setattr(ray, "init", refused)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(serve, "start", lambda **kwargs: pytest.fail("Serve started"))
    args = build_parser().parse_args(["serve", "--ray", "--demo", "--address", "auto", "--port", "8000"])
    with pytest.raises(ValueError) as raised:
        serve_on_ray(args, ReplicaOptions({}, Settings()))
    assert str(raised.value) == (
        "--address auto: cannot join a Ray cluster there: Could not find any running Ray instance. Please "
        "give its address."
    )


RAY_ERROR = (
    "\x1b[36mray::ProxyActor.ready()\x1b[39m (pid=10690, ip=192.0.2.2, actor_id=5683a7d5)\n"
    '  File "/venv/lib/python3.11/site-packages/ray/serve/_private/proxy.py", line 1810, in ready\n'
    "    raise e from None\n"
    "RuntimeError: Failed to bind to address '127.0.0.1:8000'.\n"
)
REPLICA_ERROR = (
    "The deployment failed to start 3 times in a row. See controller logs for details. Error:\n"
    "\x1b[36mray::ServeReplica:tiltsmc:tiltsmc.initialize_and_get_metadata()\x1b[39m (pid=1)\n"
    "  ...\n"
    "FileNotFoundError: [Errno 2] No such file or directory: 'policy/model.onnx'"
)


@pytest.mark.parametrize(
    ("failing", "expected"),
    [
        ("serve.start", "RuntimeError: Failed to bind to address '127.0.0.1:8000'."),
        ("replicas", "FileNotFoundError: [Errno 2] No such file or directory: 'policy/model.onnx'"),
    ],
    ids=["proxy", "replicas"],
)
def test_a_deploy_error_is_its_last_line_without_colours(
    failing: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray's error (its remote traceback, coloured) reduced to the line that says what failed: Serve's
    proxy failing to start, or replicas failing to (Ray Serve's status ``DEPLOY_FAILED``). The signal
    handlers are those of before."""
    import ray
    import ray.serve.context
    from ray import serve
    from tiltsmc.cli import build_parser
    from tiltsmc.serving.ray import DeployFailed, ReplicaOptions, serve_on_ray
    from tiltsmc.serving.server import Settings

    def refused(error: Exception) -> Any:
        def call(*args: Any, **kwargs: Any) -> None:
            raise error

        return call

    def serve_started(**kwargs: Any) -> None:
        if failing == "serve.start":
            raise RuntimeError(RAY_ERROR)

    port = free_port()
    serve_client = SimpleNamespace(http_config=SimpleNamespace(host="127.0.0.1", port=port))
    # as Ray Serve 2.60 reports a replica's failure: the replicas' error in the deployment's message, the
    # application's saying only that it failed (which was all the command said)
    deployment = SimpleNamespace(status="DEPLOY_FAILED", message=REPLICA_ERROR, replica_states={})
    failed = SimpleNamespace(
        status="DEPLOY_FAILED", message="Failed to update the deployments ['tiltsmc'].",
        deployments={"tiltsmc": deployment},
    )  # fmt: skip
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(serve, "start", serve_started)
    monkeypatch.setattr(ray.serve.context, "_get_global_client", lambda: serve_client)
    monkeypatch.setattr(serve, "run_many", lambda *args, **kwargs: None)
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications={"tiltsmc": failed}))
    # as Ray Serve's own wait for the replicas (serve.run) reports them
    monkeypatch.setattr(
        serve, "run", refused(RuntimeError(f"Deploying application tiltsmc failed: {REPLICA_ERROR}"))
    )
    monkeypatch.setattr(serve, "delete", lambda *args, **kwargs: None)
    monkeypatch.setattr(serve, "shutdown", lambda: None)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    args = build_parser().parse_args(["serve", "--ray", "--demo", "--port", str(port)])
    with pytest.raises(DeployFailed) as raised:
        serve_on_ray(args, ReplicaOptions({}, Settings()))
    assert str(raised.value) == f"Ray Serve could not deploy: {expected}"
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers


def mock_serve(
    monkeypatch: pytest.MonkeyPatch,
    applications: dict[str, Any],
    *,
    serve_host: str = "127.0.0.1",
    serve_port: int | None = None,
    stop: bool = False,
) -> dict[str, Any]:
    """Ray and Ray Serve mocked for ``serve_on_ray``: ``serve.status()`` answers ``applications``, Serve
    listens on ``serve_host`` / ``serve_port`` (None: the port asked); with ``stop``, a SIGTERM soon after
    deploying (the command's handler installed by then). What the command asked is recorded in the dict
    returned (``http_options``, ``environ_at_init``)."""
    import ray
    import ray.serve.context
    import tiltsmc.serving.ray as serving_ray
    from ray import serve

    seen: dict[str, Any] = {}

    def init(**kwargs: Any) -> None:
        seen["environ_at_init"] = dict(os.environ)

    def start(http_options: dict[str, Any]) -> None:
        seen["http_options"] = http_options
        port = http_options["port"] if serve_port is None else serve_port
        seen["client"] = SimpleNamespace(http_config=SimpleNamespace(host=serve_host, port=port))

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(serve, "start", start)
    monkeypatch.setattr(ray.serve.context, "_get_global_client", lambda: seen.get("client"))

    def run_many(*args: Any, **kwargs: Any) -> None:
        if stop:
            seen["stopper"] = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
            seen["stopper"].start()

    monkeypatch.setattr(serve, "run_many", run_many)
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications=applications))
    monkeypatch.setattr(serve, "delete", lambda name, **kwargs: applications.pop(name, None))
    monkeypatch.setattr(serve, "shutdown", lambda: None)
    monkeypatch.setattr(serving_ray, "_check_address", lambda address: None)
    return seen


def test_a_setting_the_replicas_refuse_is_named_with_status_2_as_tiltsmc_serve_names_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replica's ValueError (a setting its models cannot meet, as ``tiltsmc serve`` refuses it with status
    2): a ValueError with its message, not "Ray Serve could not deploy: Failed to update the deployments"
    (status 1)."""
    from tiltsmc.cli import build_parser
    from tiltsmc.serving.ray import ReplicaOptions, serve_on_ray
    from tiltsmc.serving.server import Settings

    refusal = "max_tokens: 100000 is not from 1 to the policy's max_new_tokens, 162 (tiltsmc serve ...)"
    message = REPLICA_ERROR.rpartition("\n")[0] + f"\nValueError: {refusal}"
    deployment = SimpleNamespace(status="DEPLOY_FAILED", message=message, replica_states={})
    failed = SimpleNamespace(
        status="DEPLOY_FAILED", message="Failed to update the deployments ['tiltsmc'].",
        deployments={"tiltsmc": deployment},
    )  # fmt: skip
    mock_serve(monkeypatch, {"tiltsmc": failed})
    args = build_parser().parse_args(["serve", "--ray", "--demo", "--port", str(free_port())])
    with pytest.raises(ValueError) as raised:
        serve_on_ray(args, ReplicaOptions({}, Settings()))
    assert str(raised.value) == refusal


@pytest.mark.ray_cluster
def test_a_setting_the_replicas_refuse_ends_the_command_as_it_ends_tiltsmc_serve(tmp_path: Path) -> None:
    """``--max-tokens`` past the demo policy's: refused by the replicas as the plain server refuses it, the
    same last line and status 2 (it was status 1 and "Ray Serve could not deploy: Failed to update the
    deployments ['tiltsmc']")."""
    command = [sys.executable, "-m", "tiltsmc.cli", "serve", "--demo", "--max-tokens", "100000"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    plain = subprocess.run(
        [*command, "--port", str(free_port())], capture_output=True, text=True, env=env, timeout=180
    )
    arguments = ["--max-tokens", "100000", "--port", str(free_port())]
    with ServeCommand(arguments, tmp_path / "serve.log") as on_ray:
        try:
            status = on_ray.process.wait(300)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the command still runs: {on_ray.log()}") from None
        assert (status, plain.returncode) == (2, 2), (on_ray.log(), plain.stderr)
        assert on_ray.log().splitlines()[-1] == plain.stderr.splitlines()[-1], on_ray.log()
        assert plain.stderr.splitlines()[-1].startswith("tiltsmc: max_tokens: 100000 ")


def test_the_proxy_times_requests_out_past_timeout_and_its_margins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Serve's proxy ends a request ``TIMEOUT_MARGIN + SEND_MARGIN`` past ``--timeout`` (by when a
    replica has answered its 504), as uvicorn waits for the plain server's: it had no timeout, a request
    waiting in Ray's queue waited for ever; none for ``--timeout inf``."""
    from tiltsmc.cli import build_parser
    from tiltsmc.serving.ray import ReplicaOptions, serve_on_ray
    from tiltsmc.serving.server import SEND_MARGIN, TIMEOUT_MARGIN, Settings

    running = SimpleNamespace(status="RUNNING", message="", deployments={})
    for timeout, expected in (("5", 5 + TIMEOUT_MARGIN + SEND_MARGIN), ("inf", None)):
        seen = mock_serve(monkeypatch, {"tiltsmc": running}, stop=True)  # deleted on SIGTERM
        args = build_parser().parse_args(
            ["serve", "--ray", "--demo", "--port", str(free_port()), "--timeout", timeout]
        )
        assert serve_on_ray(args, ReplicaOptions({}, Settings.from_args(args))) == 0
        seen["stopper"].join()
        assert seen["http_options"].get("request_timeout_s") == expected


def test_the_api_key_variable_is_gone_from_the_environment_before_ray_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--api-key-env``'s variable, once read, is left out of the environment that ``ray.init``'s local
    instance hands every process it starts (each replica held the key)."""
    from tiltsmc.cli import build_parser
    from tiltsmc.serving.ray import ReplicaOptions, serve_on_ray
    from tiltsmc.serving.server import Settings

    monkeypatch.setenv("TILTSMC_RAY_TEST_KEY", "a-key-for-the-test-1")
    failed = SimpleNamespace(status="DEPLOY_FAILED", message="no replicas", deployments={})
    seen = mock_serve(monkeypatch, {"tiltsmc": failed})
    args = build_parser().parse_args(
        ["serve", "--ray", "--demo", "--port", str(free_port()), "--api-key-env", "TILTSMC_RAY_TEST_KEY"]
    )
    settings = Settings.from_args(args)
    assert settings.api_key == "a-key-for-the-test-1"
    with pytest.raises(RuntimeError, match="no replicas"):
        serve_on_ray(args, ReplicaOptions({}, settings))
    assert "TILTSMC_RAY_TEST_KEY" not in seen["environ_at_init"]
    assert not any("a-key-for-the-test-1" in value for value in seen["environ_at_init"].values())


def test_a_host_other_than_the_one_serve_listens_on_in_a_joined_cluster_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ray Serve already running on a cluster joined keeps its host as it keeps its port: a differing
    ``--host`` refused, naming it, before deploying (it was dropped silently)."""
    from tiltsmc.cli import build_parser
    from tiltsmc.serving.ray import ReplicaOptions, serve_on_ray
    from tiltsmc.serving.server import Settings

    mock_serve(monkeypatch, {}, serve_host="0.0.0.0")
    monkeypatch.setattr("ray.serve.run_many", lambda *args, **kwargs: pytest.fail("deployed"))
    port = str(free_port())
    args = build_parser().parse_args(
        ["serve", "--ray", "--demo", "--address", "192.0.2.1:6379", "--port", port, "--host", "127.0.0.1"]
    )
    with pytest.raises(ValueError) as raised:
        serve_on_ray(args, ReplicaOptions({}, Settings()))
    assert str(raised.value) == (
        "--host: Ray Serve already runs on the cluster at --address 192.0.2.1:6379, listening on host "
        "0.0.0.0, and keeps it: give --host 0.0.0.0"
    )


def test_provider_options_for_a_gpu_are_refused_where_the_replicas_reserve_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replica that reserves no GPU runs its models on the CPU: ``--provider-option`` for another provider
    is refused before Ray starts, naming ``--replica-gpus``, as options that would have no effect."""
    import ray
    from tiltsmc.cli import build_parser
    from tiltsmc.serving.ray import ReplicaOptions, serve_on_ray
    from tiltsmc.serving.server import Settings

    monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail("Ray started"))
    args = build_parser().parse_args(["serve", "--ray", "--policy", "p", "--reward", "r", "--port", "8000"])
    cuda = {"provider_option": [("CUDAExecutionProvider", "device_id", "1")]}
    refused = r"^--provider-option: a replica that reserves no GPU \(--replica-gpus 0, the default\) runs"
    with pytest.raises(ValueError, match=refused):
        serve_on_ray(args, ReplicaOptions(cuda, Settings()))


def test_a_replica_without_a_gpu_runs_on_the_cpu_with_its_cpus_as_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replica reserving no GPU loads its models on the CPU (they picked CUDA where a GPU was usable,
    outside Ray's accounting); ``--threads`` sets its core's and ONNX Runtime's threads (it set neither
    in a replica), and without it the CPUs it reserves, rounded up, shared between its workers."""
    import argparse

    import tiltsmc.cli
    from ray import serve
    from tiltsmc import core
    from tiltsmc.serving.ray import ReplicaOptions, TiltsmcReplica, build_application, replica_model_args
    from tiltsmc.serving.server import Settings

    settings = Settings()
    given = {"threads": None, "cpu": False, "demo": True}
    on_cpus = replica_model_args(ReplicaOptions(given, settings), 1.5, 0.0)
    assert on_cpus == {**given, "cpu": True, "threads": 2}
    assert replica_model_args(ReplicaOptions(given, settings), 0.0, 1.0) == {**given, "threads": 1}
    four_workers = ReplicaOptions(given, Settings(workers=4))
    assert replica_model_args(four_workers, 8.0, 0.5) == {**given, "threads": 2}
    assert replica_model_args(ReplicaOptions({**given, "threads": 3}, settings), 8.0, 0.0)["threads"] == 3

    loaded: list[argparse.Namespace] = []
    threads: list[int] = []

    class Loaded(Exception):
        pass

    def load(args: argparse.Namespace) -> Any:
        loaded.append(args)
        raise Loaded

    monkeypatch.setattr(tiltsmc.cli, "_load_models_or_fail", load)
    monkeypatch.setattr(core, "set_num_threads", threads.append)
    monkeypatch.setattr(serve, "get_replica_context", lambda: pytest.fail("not reached"))
    application = build_application(ReplicaOptions(given, settings), num_cpus=1.5)
    handed = application._bound_deployment.init_args[0]  # what each replica is handed
    with pytest.raises(Loaded):
        TiltsmcReplica(handed)
    assert loaded[0].cpu is True and loaded[0].threads == 2 and threads == [2]
