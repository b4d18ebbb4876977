"""``tiltsmc serve``'s connections: a body sent slowly, or still coming at SIGTERM; more connections than the
server serves at once; a path with a trailing slash; an error no handler answers. The real server in a
subprocess on 127.0.0.1 (``test_server.Server``), real sockets."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

import tiltsmc  # noqa: E402
from test_server import FIXTURE_MODELS, Server  # noqa: E402
from tiltsmc.tasks import MarkovDFATask  # noqa: E402

HEAD = (
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n"
)
BODY = b'{"prompt": "a", "particles": 2}'


def _answer(client: socket.socket, seconds: float) -> tuple[int, dict[str, str], bytes]:
    """The HTTP answer read from ``client`` until the server closes it (at most ``seconds``): its status,
    headers (lower-case names) and body."""
    client.settimeout(seconds)
    data = b""
    with contextlib.suppress(socket.timeout, ConnectionResetError):
        while chunk := client.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), data
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


def _completion_lines(server: Server) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for line in server.log().splitlines()
        if line.startswith('{"event": "request"') and '"/v1/completions"' in line
    ]


def test_a_body_still_coming_at_sigterm_is_answered_as_the_server_closing(tmp_path: Path) -> None:
    """SIGTERM while a client is still sending its body: at the drain's deadline (``TIMEOUT_MARGIN`` past
    the grace period), as every request left unfinished, the 503 ``closed`` in OpenAI's shape, logged as
    sent (503, ``closed``), and the process exits then. The body's read was not watched by the drain:
    the exit waited for uvicorn's own wait (``SEND_MARGIN`` longer), which cancelled the handler: a
    plain-text 500, logged as 499 ``cancelled``."""
    from tiltsmc.serving.server import SEND_MARGIN, TIMEOUT_MARGIN

    grace = 1.0
    closing = Server(tmp_path, *FIXTURE_MODELS, "--grace", str(grace))
    try:
        with socket.create_connection(("127.0.0.1", closing.port)) as client:
            client.sendall(HEAD % len(BODY) + BODY[:10])  # the rest never comes
            time.sleep(0.5)  # the handler reads the body
            began = time.monotonic()
            closing.process.send_signal(signal.SIGTERM)
            status, headers, body = _answer(client, 20)
            answered = time.monotonic() - began
        closing.process.wait(20)
        exited = time.monotonic() - began
        assert status == 503 and headers["content-type"] == "application/json", (status, body)
        error = json.loads(body)["error"]
        assert (error["type"], error["code"], error["param"]) == ("unavailable_error", "closed", None)
        assert error["message"] == (
            "the server closed before the request's body was received (grace period 1 s)"
        )
        assert grace + TIMEOUT_MARGIN - 0.1 <= answered < grace + TIMEOUT_MARGIN + SEND_MARGIN - 0.5
        assert exited < grace + TIMEOUT_MARGIN + SEND_MARGIN - 0.5, exited  # not uvicorn's wait
        assert [(line["status"], line["outcome"]) for line in _completion_lines(closing)] == [(503, "closed")]
        assert "Traceback" not in closing.log() and "graceful shutdown" not in closing.log()
    finally:
        closing.stop()


def test_a_body_sent_too_slowly_is_a_408(tmp_path: Path) -> None:
    """``--body-timeout 1``: a body coming a byte every 0.2 s is a 408 in OpenAI's shape once 1 s has
    passed since its headers, with ``Connection: close``, logged as ``refused`` (it was read for as long
    as the client took: 6 s for a byte every 0.5 s); a body sent at once is answered as ever."""
    seconds = 1.0
    hurried = Server(tmp_path, *FIXTURE_MODELS, "--body-timeout", str(seconds))
    try:
        with socket.create_connection(("127.0.0.1", hurried.port)) as client:
            began = time.monotonic()
            client.sendall(HEAD % len(BODY))
            sent = 0
            with contextlib.suppress(OSError):  # the server answers and closes before the body is in
                while sent < len(BODY) and time.monotonic() - began < 3 * seconds:
                    client.sendall(BODY[sent : sent + 1])
                    sent += 1
                    time.sleep(0.2)
            status, headers, body = _answer(client, 10)
            answered = time.monotonic() - began
        assert sent < len(BODY), "the whole body went out before the timeout"
        assert status == 408 and headers["content-type"] == "application/json", (status, body)
        assert headers["connection"] == "close"
        error = json.loads(body)["error"]
        assert (error["type"], error["code"], error["param"]) == (
            "invalid_request_error",
            "body_timeout",
            None,
        )
        assert error["message"] == (
            "the request's body was not received within 1 s of its headers (tiltsmc serve --body-timeout)"
        )
        assert seconds <= answered < seconds + 1.5, answered
        assert hurried.post({"prompt": "a", "particles": 2}).status_code == 200
        deadline = time.monotonic() + 10
        while len(_completion_lines(hurried)) < 2:
            assert time.monotonic() < deadline, hurried.log()
            time.sleep(0.05)
        lines = _completion_lines(hurried)
        assert [(line["status"], line["outcome"]) for line in lines] == [(408, "refused"), (200, "completed")]
        assert "Traceback" not in hurried.log()
    finally:
        hurried.stop()


def test_connections_past_the_limit_get_a_503(tmp_path: Path) -> None:
    """uvicorn serves ``max_queue + max_batch_rows + CONNECTION_HEADROOM`` connections at once
    (``connection_limit``): with that many open, idle ones included, a request gets its 503 (there was no
    limit: connections that sent nothing were held for ever, as many as came); once they close, requests
    are served again."""
    from tiltsmc.serving.server import Settings, connection_limit

    limit = connection_limit(Settings(max_queue=1, max_batch_rows=8))
    small = Server(tmp_path, *FIXTURE_MODELS, "--max-queue", "1", "--max-batch-rows", "8")
    idle: list[socket.socket] = []
    try:
        idle = [socket.create_connection(("127.0.0.1", small.port)) for _ in range(limit)]
        deadline = time.monotonic() + 10
        while True:  # once the server has accepted them all
            refused = httpx.get(f"{small.url}/health", timeout=10)
            if refused.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert refused.status_code == 503, refused.text
        for connection in idle:
            connection.close()
        deadline = time.monotonic() + 10
        while httpx.get(f"{small.url}/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert small.post({"prompt": "a", "particles": 2}).status_code == 200
    finally:
        for connection in idle:
            connection.close()
        small.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(
        tmp_path_factory.mktemp("serve"), *FIXTURE_MODELS, "--api-key-env", "KEY", env={"KEY": "k"}
    )
    yield running
    running.stop()


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/v1/completions/"),
        ("POST", "/v1/chat/completions/"),
        ("GET", "/health/"),
        ("GET", "/metrics/"),
        ("GET", "/v1/models/"),
    ],
)
def test_a_path_with_a_trailing_slash_is_the_json_404(server: Server, method: str, path: str) -> None:
    """A path with a trailing slash is not the route's: the 404 in OpenAI's shape (Starlette answered a
    307 to the path without it, its Location built from the Host header, with an empty body, before the
    API key was checked); ``/v1/models/`` is the model route's, naming no model served. The path without
    it is the route's, as ever."""
    key = {"Authorization": "Bearer k"}
    body: dict[str, Any] = {"prompt": "a", "particles": 2}
    if "chat" in path:
        body = {"messages": [{"role": "user", "content": "a"}]}
    answered = httpx.request(
        method, f"{server.url}{path}", json=body, headers={**key, "Host": "elsewhere"}, timeout=10
    )
    assert answered.status_code == 404 and "location" not in answered.headers, answered.headers
    error = answered.json()["error"]
    assert error["type"] == "invalid_request_error", error
    if path == "/v1/models/":
        assert error["code"] == "model_not_found", error
    without = httpx.request(method, f"{server.url}{path}", json=body, timeout=10)
    assert without.status_code == (401 if path == "/v1/models/" else 404), without.text
    assert without.json()["error"]["type"] in ("invalid_request_error", "authentication_error")
    route = httpx.request(method, f"{server.url}{path.rstrip('/')}", json=body, headers=key, timeout=60)
    # the fixture's policy has no chat template: the route refuses the request itself, naming messages
    assert route.status_code == (400 if "chat" in path else 200), route.text
    assert "chat" not in path or route.json()["error"]["param"] == "messages"


def test_an_error_no_handler_answers_is_a_json_500_logged_as_failed() -> None:
    """An error that no handler answers (a bug of the app's: here the engine's figures failing, and the
    connection failing as the body is read) is the 500 ``server_error`` in OpenAI's shape, logged with its
    traceback, its request's line with status 500 and outcome ``failed`` (Starlette's plain-text 500 went
    out, logged as 499 ``cancelled``). The app on a real uvicorn server on 127.0.0.1, in this process."""
    import uvicorn
    from tiltsmc.serving.server import create_app

    task = MarkovDFATask.random(4, 3, 6, rng=0)
    engine = tiltsmc.Engine(task.policy(), task.twist(noise=0.4, rng=1))

    def broken_stats() -> Any:
        raise RuntimeError("the figures failed")

    engine.stats = broken_stats  # type: ignore[method-assign]
    app = create_app(engine)

    async def failing_receive(scope: Any, receive: Any, send: Any) -> None:
        async def broken() -> Any:
            raise RuntimeError("the connection failed")

        await app(scope, broken if scope["path"] == "/v1/completions" else receive, send)

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("tiltsmc.server")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uvicorn_server = uvicorn.Server(
        uvicorn.Config(failing_receive, host="127.0.0.1", port=port, log_level="critical", lifespan="off")
    )
    thread = threading.Thread(target=uvicorn_server.run)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not uvicorn_server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}"
        health = httpx.get(f"{url}/health", timeout=10)
        completion = httpx.post(f"{url}/v1/completions", json={"prompt": "a"}, timeout=10)
        for answered, error in ((health, "RuntimeError: the figures failed"),
                                (completion, "RuntimeError: the connection failed")):  # fmt: skip
            assert answered.status_code == 500, answered.text
            assert answered.headers["content-type"] == "application/json", answered.text
            assert answered.json()["error"] == {
                "message": f"the server failed to answer the request: {error}",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        # a request's line is logged once its answer has gone out: it may come just after the client has it
        wait_until = time.monotonic() + 10
        while sum(r.startswith('{"event": "request"') for r in records) < 2 and time.monotonic() < wait_until:
            time.sleep(0.02)
        lines = [json.loads(r) for r in records if r.startswith('{"event": "request"')]
        assert [(line["path"], line["status"], line.get("outcome")) for line in lines] == [
            ("/health", 500, "failed"),
            ("/v1/completions", 500, "failed"),
        ]
        failures = [json.loads(r) for r in records if r.startswith('{"event": "request_failed"')]
        assert [f["id"] for f in failures] == [line["id"] for line in lines]
    finally:
        uvicorn_server.should_exit = True
        thread.join(30)
        logger.removeHandler(handler)
        logger.setLevel(level)
        engine.close()


def test_the_body_timeout_is_a_setting_of_the_command_line_settings_and_create_app() -> None:
    """``--body-timeout``, ``Settings.body_timeout`` and ``create_app(body_timeout=)`` share one default
    (``BODY_TIMEOUT``) and refuse what could not work (0 or less, NaN: every body a 408) naming the option
    or the setting; ``inf`` is no limit."""
    import argparse
    import inspect

    from tiltsmc import cli
    from tiltsmc.serving.server import BODY_TIMEOUT, Settings, create_app

    commands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    serve = commands.choices["serve"]
    assert serve.parse_args(["--demo"]).body_timeout == Settings().body_timeout == BODY_TIMEOUT
    assert inspect.signature(create_app).parameters["body_timeout"].default == BODY_TIMEOUT
    assert Settings.from_args(serve.parse_args(["--demo", "--body-timeout", "inf"])).body_timeout == float(
        "inf"
    )
    for text in ("0", "-1", "nan"):
        with pytest.raises(ValueError, match=r"^--body-timeout: expected a positive number of seconds"):
            Settings.from_args(serve.parse_args(["--demo", "--body-timeout", text]))
    for value in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"^body_timeout: expected a positive number of seconds"):
            Settings(body_timeout=value)
    with pytest.raises(TypeError, match=r"^body_timeout"):
        Settings(body_timeout="30")  # type: ignore[arg-type]
    task = MarkovDFATask.random(4, 3, 6, rng=0)
    engine = tiltsmc.Engine(task.policy(), task.twist(noise=0.4, rng=1))
    try:
        with pytest.raises(ValueError, match=r"^body_timeout: expected a positive number of seconds"):
            create_app(engine, body_timeout=0)
    finally:
        engine.close()
