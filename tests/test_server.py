"""``tiltsmc serve``: the real server in a subprocess on 127.0.0.1, real HTTP requests."""

from __future__ import annotations

import concurrent.futures
import contextlib
import gzip
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

import tiltsmc  # noqa: E402
from stuck_policy import SCRIPT_HEAD  # noqa: E402
from tiltsmc.models import OnnxCausalLM, OnnxRewardModel  # noqa: E402
from tiltsmc.serving.engine import usable_cores  # noqa: E402
from tiltsmc.tasks import MarkovDFATask, arithmetic  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "models"
FIXTURE_MODELS = [
    "--policy", str(FIXTURES / "gpt2-tiny"), "--reward", str(FIXTURES / "prm-tiny"), "--max-new-tokens", "6",
]  # fmt: skip


class Server:
    """``tiltsmc serve`` in a subprocess on a free port of 127.0.0.1; stderr (its log) kept in a file. With
    ``script`` (``_serving_script``: models the command line cannot load), that script instead, given the
    port."""

    def __init__(
        self, tmp_path: Path, *args: str, env: Optional[dict[str, str]] = None, script: Optional[str] = None
    ) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"server-{self.port}.log"
        self._log = self.log_path.open("w")
        command = [sys.executable, "-m", "tiltsmc.cli", "serve", *args, "--port", str(self.port)]
        if script is not None:
            script_path = tmp_path / f"server-{self.port}.py"
            script_path.write_text(script)
            command = [sys.executable, str(script_path), str(self.port), *args]
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server exited: {self.log()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the server did not come up: {self.log()}")

    def post(self, body: Any, **kwargs: Any) -> Any:
        return httpx.post(
            f"{self.url}/v1/completions", json=body, timeout=kwargs.pop("timeout", 60), **kwargs
        )

    def metrics(self) -> str:
        return str(httpx.get(f"{self.url}/metrics", timeout=10).text)

    def metric(self, name: str) -> float:
        match = re.search(rf"^{re.escape(name)} (\S+)$", self.metrics(), re.MULTILINE)
        assert match, f"{name} not in /metrics"
        return float(match.group(1))

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


CHAT_TEMPLATE = FIXTURES / "chat-tiny" / "chat_template.jinja"  # ChatML


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(
        tmp_path_factory.mktemp("serve"), *FIXTURE_MODELS, "--max-request-particles", "64",
        "--max-prompts", "8", "--chat-template", str(CHAT_TEMPLATE),
    )  # fmt: skip
    yield running
    running.stop()


@pytest.fixture(scope="module")
def offline_models() -> tuple[OnnxCausalLM, OnnxRewardModel]:
    return OnnxCausalLM(FIXTURES / "gpt2-tiny", max_new_tokens=6), OnnxRewardModel(
        FIXTURES / "prm-tiny", kind="logit"
    )


def test_completion_is_the_offline_run(server: Server, offline_models: Any) -> None:
    """One prompt, one choice, a seed: the OpenAI-shaped answer carries the offline run's result."""
    response = server.post(
        {"model": "tiltsmc", "prompt": "hello there", "seed": 7, "particles": 8, "max_tokens": 5}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == "tiltsmc"
    assert response.headers["x-request-id"] and body["id"] == f"cmpl-{response.headers['x-request-id']}"
    (choice,) = body["choices"]
    detail = body["tiltsmc"]["choices"][0]
    offline = tiltsmc.smc(*offline_models, prompts=["hello there"], num_particles=8, rng=7, max_new_tokens=5)
    record = offline.to_dict()
    assert detail["log_z"] == record["log_z"][0]
    assert detail["log_weights"] == record["log_weights"][0]
    assert detail["ess"] == record["ess"][0]
    assert choice["text"] == offline.texts[0][detail["sample_index"]]  # type: ignore[index]
    tokens = offline.samples[0][detail["sample_index"]]
    ended_by_eos = len(tokens) > 0 and int(tokens[-1]) in offline_models[0].eos_token_ids
    assert choice["finish_reason"] == ("stop" if ended_by_eos else "length")
    usage = body["usage"]
    prompt_tokens = len(offline_models[0].encode_prompt("hello there"))
    assert usage["prompt_tokens"] == prompt_tokens
    assert usage["total_tokens"] == prompt_tokens + usage["completion_tokens"]


def test_every_sampler_and_several_choices(server: Server) -> None:
    for sampler, extra in [
        ("smc", {"particles": 4, "resample": "multinomial", "ess_threshold": 1.0}),
        ("sp_gsmc", {"pool_size": 3}),
        ("mh", {"pool_size": 2, "mh_steps": 2}),
        ("best_of_n", {"particles": 3}),
        ("rejection", {"bound": 1.0, "particles": 8}),
    ]:
        body = {"prompt": ["a", "the quick"], "n": 2, "seed": 1, "sampler": sampler, **extra}
        response = server.post(body)
        assert response.status_code == 200, (sampler, response.text)
        answer = response.json()
        assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
        assert [d["prompt_index"] for d in answer["tiltsmc"]["choices"]] == [0, 0, 1, 1]
        assert answer["tiltsmc"]["sampler"] == sampler
        # seeded: a request alone in the engine gives the same text again, bitwise (four requests batched
        # may be batched otherwise the second time, as the scheduler's row limit moves: their results
        # then agree up to the rounding of batched session calls, which can change a draw)
        alone = {**body, "prompt": "the quick", "n": 1}
        texts = [server.post(alone).json()["choices"][0]["text"] for _ in range(2)]
        assert texts[0] == texts[1]


def test_concurrent_clients(server: Server) -> None:
    """24 clients at once, 48 engine requests: each client gets its own answer (its ``n`` choices, each
    with its particle count: no two clients ask for the same pair) drawn with its own seeds, as the same
    request alone, up to the rounding of batched model calls (docs/guide/serving.md): that can change a
    draw, so texts are compared in number, not each."""
    bodies = [
        {"prompt": f"prompt {k}", "seed": k, "particles": 1 + k % 8, "n": 1 + k // 8} for k in range(24)
    ]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(server.post, bodies))
    assert [r.status_code for r in responses] == [200] * 24, [r.text for r in responses]
    alone = [server.post(body).json() for body in bodies]
    same = 0
    for body, response, single in zip(bodies, responses, alone):
        together = response.json()
        assert [c["index"] for c in together["choices"]] == list(range(body["n"]))
        counts = [len(detail["log_weights"]) for detail in together["tiltsmc"]["choices"]]
        assert counts == [body["particles"]] * body["n"], (body, counts)
        assert together["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]
        same += sum(a["text"] == b["text"] for a, b in zip(together["choices"], single["choices"]))
    # Batched calls round differently from a row alone by about 1e-6 of the largest logit on float32
    # graphs (onnx_lm.BATCHING_TOLERANCE's note), about 1e-5 on these fixtures' logits of at most ~8. A
    # draw changes only where its uniform falls that near one of its 63 cumulative-probability boundaries
    # (a resampling draw: one of its <= 7): a chance below 1e-3 per draw, so below 0.1 for a choice of
    # at most 8 particles x 6 tokens, each step's resampling included. Half of 48 choices changed by
    # rounding then has a chance below C(48, 24) 0.1^24 < 1e-10; requests drawing with one another's
    # seeds (or answered with one another's results) would agree by coincidence only.
    assert same >= 24, f"{same} of 48 choices have the text of the same request alone"


@pytest.mark.parametrize(
    ("body", "param", "status"),
    [
        ({}, "prompt", 400),
        ({"prompt": 3}, "prompt", 400),
        ({"prompt": []}, "prompt", 400),
        ({"prompt": "hi", "particles": 0}, "particles", 400),
        ({"prompt": "hi", "particles": 65}, "particles", 400),
        ({"prompt": "hi", "particles": "many"}, "particles", 400),
        ({"prompt": "hi", "max_tokens": 7}, "max_tokens", 400),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens", 400),
        ({"prompt": "hi", "n": 17}, "n", 400),
        ({"prompt": "hi", "seed": -1}, "seed", 400),
        ({"prompt": "hi", "ess_threshold": 2}, "ess_threshold", 400),
        ({"prompt": "hi", "resample": "bogus"}, "resample", 400),
        ({"prompt": "hi", "sampler": "beam"}, "sampler", 400),
        ({"prompt": "hi", "pool_size": 3}, "pool_size", 400),
        ({"prompt": "hi", "sampler": "sp_gsmc", "particles": 3}, "particles", 400),
        ({"prompt": "hi", "temperature": 0.5}, "temperature", 400),
        ({"prompt": "hi", "temperature": 0}, "temperature", 400),
        ({"prompt": "hi", "top_p": 0.9}, "top_p", 400),
        ({"prompt": "hi", "frequency_penalty": 0.5}, "frequency_penalty", 400),
        ({"prompt": "hi", "presence_penalty": -1}, "presence_penalty", 400),
        ({"prompt": "hi", "logit_bias": {"3": -100}}, "logit_bias", 400),
        ({"prompt": "hi", "logprobs": 1}, "logprobs", 400),
        ({"prompt": "hi", "echo": True}, "echo", 400),
        ({"prompt": "hi", "suffix": "end"}, "suffix", 400),
        ({"prompt": "hi", "n": 2, "best_of": 3}, "best_of", 400),
        ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options", 400),
        ({"prompt": "hi", "stream": True, "stream_options": {"chunked": True}}, "stream_options", 400),
        ({"prompt": "hi", "stop": ["\n"]}, "stop", 400),
        ({"prompt": "hi", "model": "gpt-4"}, "model", 404),
        ({"prompt": "word " * 1100}, "prompt", 400),
        # a field of the wrong JSON type is refused, not read as another type
        ({"prompt": "hi", "particles": True}, "particles", 400),
        ({"prompt": "hi", "n": "2"}, "n", 400),
        ({"prompt": "hi", "n": 2.0}, "n", 400),
        ({"prompt": "hi", "max_tokens": "4"}, "max_tokens", 400),
        ({"prompt": "hi", "stream": "yes"}, "stream", 400),
        ({"prompt": "hi", "seed": False}, "seed", 400),
        ({"prompt": "hi", "ess_threshold": True}, "ess_threshold", 400),
        ({"prompt": "hi", "temperature": "1"}, "temperature", 400),
        ({"prompt": [1, 2, 3]}, "prompt", 400),
        ({"prompt": "hi", "stop": [1]}, "stop", 400),
        ({"prompt": "hi", "sampler": "mh", "mh_steps": 65}, "mh_steps", 400),  # --max-mh-steps, 64
        # an option of the MH form the request does not run (it would change nothing), as the CLI refuses it
        ({"prompt": "hi", "sampler": "mh", "particles": 4, "pool_size": 2}, "pool_size", 400),
        ({"prompt": "hi", "sampler": "mh", "resample": "multinomial"}, "resample", 400),
        ({"prompt": "hi", "sampler": "mh", "particles": 1, "ess_threshold": 0.5}, "ess_threshold", 400),
        ({"prompt": ["hi"] * 9}, "prompt", 400),  # --max-prompts 8
        # rejection's particles left out count at its default, 256 draws a round (one set of defaults)
        ({"prompt": "hi", "sampler": "rejection"}, "particles", 400),
    ],
)
def test_bad_requests_name_the_field(server: Server, body: dict[str, Any], param: str, status: int) -> None:
    response = server.post(body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"]
    assert f"{param}.str" not in error["message"]  # a field of several types is named alone


def test_a_field_of_several_types_says_which_it_takes(server: Server) -> None:
    """A value that none of a field's types takes is refused with the types the field takes, where
    pydantic would name the first type it tried (``prompt.str: Input should be a valid string``)."""
    cases = [
        (
            "/v1/completions",
            {"prompt": [1, 2, 3]},
            "prompt: expected a string or a non-empty list of strings",
        ),
        ("/v1/completions", {"prompt": "hi", "stop": [1]}, "stop: expected a string or a list of strings"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
            "messages.0.content: expected a string, a list of text parts",
        ),
    ]
    for path, body, message in cases:
        response = httpx.post(f"{server.url}{path}", json=body, timeout=60)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["message"].startswith(message), response.text


def test_a_field_named_body_is_named_as_any_other(server: Server) -> None:
    """A refused field is named whatever its name, ``body`` too: FastAPI's own ``body`` element (the
    request's body) was taken out of every error's location, so that a field ``body`` became "not a field
    of this API" with no ``param``, and a key ``body`` inside a field went unnamed."""
    cases = [
        ({"prompt": "hi", "body": 1}, "body", "body: not a field of this API"),
        (
            {"prompt": "hi", "stream": True, "stream_options": {"body": True}},
            "stream_options",
            "stream_options.body: not a field of this API",
        ),
        ({"prompt": "hi", "logit_bias": {"body": "x"}}, "logit_bias", "logit_bias.body: Input should be a"),
    ]
    for body, param, message in cases:
        response = server.post(body)
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == param, response.text
        assert error["message"].startswith(message), response.text


def test_chat_refusals_name_the_field_the_client_sent(server: Server) -> None:
    """``max_completion_tokens`` over the limit is named as sent; a user's message needs its text (null
    content is an assistant's tool call); a huge role is refused by its size before it is rendered and
    encoded, as a huge content is."""
    url = f"{server.url}/v1/chat/completions"
    hello = [{"role": "user", "content": "hello"}]
    over = httpx.post(url, json={"messages": hello, "max_completion_tokens": 7}, timeout=60)
    error = over.json()["error"]
    assert over.status_code == 400 and error["param"] == "max_completion_tokens", over.text
    assert error["message"].startswith("max_completion_tokens: 7 is more than this server's 6")
    null = httpx.post(url, json={"messages": [{"role": "user", "content": None}]}, timeout=60)
    assert null.status_code == 400 and null.json()["error"]["param"] == "messages", null.text
    assert null.json()["error"]["message"].startswith(
        "messages: message 0: content: None (JSON null) is only for an assistant's message (a tool call); "
        "a 'user' message needs its text"
    )
    tool_call = [{"role": "system", "content": "s"}, {"role": "assistant", "content": None}]
    assert httpx.post(url, json={"messages": tool_call, "seed": 1}, timeout=60).status_code == 200
    began = time.monotonic()
    huge = httpx.post(url, json={"messages": [{"role": "x" * 3_000_000, "content": "hi"}]}, timeout=60)
    assert huge.status_code == 400 and huge.json()["error"]["param"] == "messages", huge.text
    assert re.match(r"messages: 300\d{4} characters, more than", huge.json()["error"]["message"]), huge.text
    assert time.monotonic() - began < 5  # encoding it took 13.5 s (and 3 GB) on the 2-core VM


def test_refused_openai_fields_say_why(server: Server) -> None:
    """A field that would change the law sampled names the policy's own value; the others say what the
    server does instead."""
    cases = {
        "temperature": ({"temperature": 0.7}, "temperature 1 (tiltsmc serve --temperature)"),
        "top_p": ({"top_p": 0.5}, "top_p 1 (tiltsmc serve --top-p)"),
        "best_of": ({"best_of": 4}, "sampler: best_of_n"),
        "logprobs": ({"logprobs": 2}, "tiltsmc object"),
    }
    for field, (extra, reason) in cases.items():
        response = server.post({"prompt": "hi", **extra})
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == field, response.text
        assert reason in error["message"], error["message"]
    chat = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
        timeout=60,
    )
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "response_format", chat.text


def test_openai_fields_at_their_defaults_change_nothing(server: Server) -> None:
    """What OpenAI clients send by default is taken, and the answer is the one without those fields."""
    bare = {"prompt": "hello", "seed": 11, "n": 2, "particles": 4, "max_tokens": 4}
    defaults = {
        "temperature": 1, "top_p": 1.0, "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {},
        "logprobs": None, "echo": False, "suffix": "", "best_of": 2, "user": "someone", "stream": False,
    }  # fmt: skip
    plain, with_defaults = server.post(bare), server.post({**bare, **defaults})
    assert plain.status_code == with_defaults.status_code == 200, with_defaults.text
    assert with_defaults.json()["choices"] == plain.json()["choices"]
    assert _results(with_defaults.json()["tiltsmc"]["choices"]) == _results(
        plain.json()["tiltsmc"]["choices"]
    )
    chat = {"messages": [{"role": "user", "content": "hello"}], "seed": 5, "max_completion_tokens": 3}
    chat_defaults = {"logprobs": False, "top_logprobs": 0, "response_format": {"type": "text"}, "top_p": 1}
    answers = [
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
        for body in (chat, {**chat, **chat_defaults})
    ]
    assert [a.status_code for a in answers] == [200, 200], answers[1].text
    assert answers[0].json()["choices"] == answers[1].json()["choices"]


def _results(details: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-choice ``tiltsmc`` details without their compute (timings differ between two requests)."""
    return [{k: v for k, v in detail.items() if k != "compute"} for detail in details]


def _events(response: Any) -> list[Any]:
    """The ``data:`` payloads of a server-sent event stream, JSON decoded but for the final ``[DONE]``."""
    assert response.headers["content-type"].startswith("text/event-stream"), response.headers
    events = [block for block in response.text.split("\n\n") if block and not block.startswith(":")]
    assert all(block.startswith("data: ") for block in events), response.text
    payloads = [block[len("data: ") :] for block in events]
    assert payloads[-1] == "[DONE]"
    return [json.loads(payload) for payload in payloads[:-1]]


def _stream_error(response: Any) -> dict[str, Any]:
    """The error object that ends a stream which failed once its status (200) was sent: its one ``data:``
    event, ``{"error": ...}`` (no ``[DONE]``)."""
    assert response.status_code == 200, response.text
    blocks = [block for block in response.text.split("\n\n") if block.startswith("data: ")]
    assert len(blocks) == 1, response.text
    event = json.loads(blocks[0][len("data: ") :])
    assert list(event) == ["error"], response.text
    return dict(event["error"])


def test_stream_sends_the_answer_as_events(server: Server) -> None:
    """``stream: true``: one chunk per choice carrying what the plain answer has, then the usage when
    asked, then [DONE]; the same for chat, whose chunks carry an assistant delta."""
    body = {"prompt": ["hello", "there"], "seed": 3, "n": 2, "particles": 4, "max_tokens": 4}
    plain = server.post(body).json()
    streamed = server.post({**body, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.status_code == 200, streamed.text
    chunks = _events(streamed)
    assert len(chunks) == 5 and chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    assert {c["id"] for c in chunks} == {f"cmpl-{streamed.headers['x-request-id']}"}
    assert all(c["object"] == "text_completion" and c["model"] == "tiltsmc" for c in chunks)
    assert [c["choices"][0] for c in chunks[:-1]] == plain["choices"]
    assert _results([c["tiltsmc"]["choices"][0] for c in chunks[:-1]]) == _results(
        plain["tiltsmc"]["choices"]
    )
    assert all(c["usage"] is None for c in chunks[:-1])
    without_usage = _events(server.post({**body, "stream": True}))
    assert [c["choices"][0] for c in without_usage] == plain["choices"]
    assert all("usage" not in c for c in without_usage)

    chat = {"messages": [{"role": "user", "content": "hi"}], "seed": 2, "n": 2, "max_tokens": 3}
    plain_chat = httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=60).json()
    streamed_chat = httpx.post(f"{server.url}/v1/chat/completions", json={**chat, "stream": True}, timeout=60)
    chat_chunks = _events(streamed_chat)
    assert all(c["object"] == "chat.completion.chunk" for c in chat_chunks)
    deltas = [(c["choices"][0]["index"], c["choices"][0]["delta"]) for c in chat_chunks]
    assert deltas == [(c["index"], c["message"]) for c in plain_chat["choices"]]
    assert [c["choices"][0]["finish_reason"] for c in chat_chunks] == [
        c["finish_reason"] for c in plain_chat["choices"]
    ]
    # a refused streaming request is a plain JSON error, as without stream
    refused = server.post({"prompt": "hi", "particles": 0, "stream": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "particles"


def test_a_stream_is_kept_alive_until_its_answer_and_a_client_leaving_it_frees_its_rows(
    tmp_path: Path,
) -> None:
    """Admitted, a stream starts at once and sends a ``: keep-alive`` comment every ``--stream-keepalive``
    seconds until its answer, which is then the plain answer's; a client that closes the stream during
    the keep-alives cancels its request (its rows freed, visible in /metrics)."""
    keeping = Server(tmp_path, "--demo", "--stream-keepalive", "0.01")
    try:
        body = {"prompt": "57 a+8 b-3", "particles": 256, "seed": 4}
        plain = keeping.post(body).json()
        with httpx.stream(
            "POST", f"{keeping.url}/v1/completions", json={**body, "stream": True}, timeout=60
        ) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            blocks = "".join(r.iter_text()).split("\n\n")
        first = next(i for i, block in enumerate(blocks) if block.startswith("data: "))
        assert first >= 1 and all(block == ": keep-alive" for block in blocks[:first]), blocks[: first + 1]
        assert blocks[-2:] == ["data: [DONE]", ""]  # the answer, whole, after the keep-alives
        chunks = [json.loads(block[len("data: ") :]) for block in blocks[first:-2]]
        assert [c["choices"][0] for c in chunks] == plain["choices"]

        before = keeping.metric('tiltsmc_requests_total{outcome="cancelled"}')
        with httpx.stream(
            "POST", f"{keeping.url}/v1/completions", json={**body, "stream": True}, timeout=60
        ) as r:
            assert next(r.iter_lines()) == ": keep-alive"  # the request is in the engine: leave now
        deadline = time.monotonic() + 30
        while keeping.metric('tiltsmc_requests_total{outcome="cancelled"}') < before + 1:
            assert time.monotonic() < deadline, keeping.metrics()
            time.sleep(0.05)
        assert keeping.metric("tiltsmc_rows_in_flight") == 0
        assert '"outcome": "cancelled"' in keeping.log()
    finally:
        keeping.stop()


def test_models_are_listed(server: Server) -> None:
    listed = httpx.get(f"{server.url}/v1/models", timeout=10)
    assert listed.status_code == 200
    (card,) = listed.json()["data"]
    assert listed.json()["object"] == "list"
    assert card["id"] == "tiltsmc" and card["object"] == "model" and isinstance(card["created"], int)
    assert httpx.get(f"{server.url}/v1/models/tiltsmc", timeout=10).json() == card
    missing = httpx.get(f"{server.url}/v1/models/gpt-4", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_a_body_over_the_limit_is_not_read(server: Server) -> None:
    """413 in OpenAI's shape, whether the body's length is declared or it comes in chunks; the server
    goes on."""
    limit = 8 << 20  # Limits.max_body_bytes
    declared = server.post({"prompt": "x" * (limit + 1)})
    assert declared.status_code == 413, declared.text
    assert declared.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(9):
            yield b"x" * (1 << 20)
        yield b'"}'

    chunked = httpx.post(
        f"{server.url}/v1/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert "content-length" not in chunked.request.headers
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    assert server.post({"prompt": "hi", "seed": 0}).status_code == 200


def test_a_prompt_too_long_to_fit_is_refused_before_it_is_encoded(server: Server) -> None:
    """Millions of characters under the body limit: refused by their count (encoding them would hold
    the server for seconds), naming the field."""
    response = server.post({"prompt": ["fine", "word " * 1_000_000]})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "prompt", response.text
    assert error["message"].startswith("prompt[1]: 5000000 characters"), error["message"]
    chat = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "x" * 2_000_000}]},
        timeout=60,
    )
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages", chat.text
    assert "characters" in chat.json()["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path", "content", "status"),
    [
        ("POST", "/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),
        ("POST", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400),
        ("POST", "/v1/completions", b'{"prompt": "hi", "seed": 1' + b"0" * 5000 + b"}", 400),
        ("GET", "/v1/completions", b"", 405),
        ("POST", "/v1/nothing", b"{}", 404),
    ],
    ids=["nesting", "not-utf8", "long-integer", "wrong-method", "unknown-path"],
)
def test_every_refusal_has_openai_shape(
    server: Server, method: str, path: str, content: bytes, status: int
) -> None:
    """Bodies the JSON parser refuses (nesting past the recursion limit, bytes that are not UTF-8, an
    integer too long to read), a wrong method and an unknown path: OpenAI's error object, not FastAPI's."""
    response = httpx.request(
        method, f"{server.url}{path}", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"], error


def test_malformed_json(server: Server) -> None:
    response = httpx.post(
        f"{server.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "error" in response.json()


def test_a_body_sent_as_another_type_than_json_is_a_415(server: Server) -> None:
    """A completion body whose Content-Type is not JSON is refused with a 415 in OpenAI's shape, naming
    the header, with ``Accept: application/json`` (it was read as JSON whatever its type: ``text/plain``
    was served, a form body refused as invalid JSON), and so is a compressed one (``Content-Encoding``:
    the server does not decompress; it was "Invalid JSON"); JSON with any charset, a ``+json`` type, or no
    Content-Type at all is read, the same answer."""
    bodies = {
        "/v1/completions": {"prompt": "hi", "seed": 1, "particles": 2},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "seed": 1, "particles": 2},
    }
    for path, body in bodies.items():
        url, content = f"{server.url}{path}", json.dumps(body).encode()
        for content_type in (
            "text/plain", "text/plain; charset=utf-8", "multipart/form-data; boundary=x", "application/xml",
            "json", "application/jsonp",
        ):  # fmt: skip
            for streamed in (False, True):  # refused before it is admitted, as a stream's other refusals
                sent = json.dumps({**body, "stream": streamed}).encode()
                refused = httpx.post(url, content=sent, headers={"content-type": content_type}, timeout=60)
                assert refused.status_code == 415, (path, content_type, refused.text)
                assert refused.headers["accept"] == "application/json"
                assert refused.json()["error"] == {
                    "message": f"Content-Type: expected application/json, got {content_type!r}",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "unsupported_media_type",
                }
        gzipped = httpx.post(
            url, content=gzip.compress(content), headers={"content-encoding": "gzip"}, timeout=60
        )
        assert gzipped.status_code == 415 and gzipped.headers["accept-encoding"] == "identity"
        assert gzipped.json()["error"]["message"] == (
            "Content-Encoding: 'gzip' is not supported: send the body uncompressed"
        )
        form = httpx.post(url, data={"prompt": "hi"}, timeout=60)  # what curl -d sends without -H
        assert form.status_code == 415, form.text
        assert "curl -d" in form.json()["error"]["message"], form.text
        answers = [
            httpx.post(url, content=content, headers=headers, timeout=60)
            for headers in (
                {"content-type": "application/json"},
                {"content-type": "application/json; charset=utf-8"},
                {"content-type": "Application/JSON;charset=UTF-8"},
                {"content-type": "application/vnd.tiltsmc+json"},
                {},  # httpx sends no Content-Type with content= alone
                {"content-type": "application/json", "content-encoding": "identity"},
            )
        ]
        assert "content-type" not in answers[-2].request.headers
        assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
        assert all(a.json()["choices"] == answers[0].json()["choices"] for a in answers)


def test_failures_after_the_checks_name_the_field(tmp_path: Path) -> None:
    """What the engine refuses at ``submit`` and what fails once admitted are named by the request's own
    field: the option that asked for the rows (a 400 counted as refused), the prompt of a list that
    failed (its index), the sampler that gave no sample (rejection with none of its draws accepted: an
    empty text is not a sample), in the plain answer and at a stream's end. The latency histogram counts
    each of these, and the requests refused before their checks (a body not valid, or not JSON), as
    ``refused``, as their log lines say (they were ``http_400``, ``http_415``, and ``failed`` once admitted,
    the label of the server's own failures)."""
    demo = Server(tmp_path, "--demo", "--max-batch-rows", "64")
    problem = arithmetic.make_problems(2, 1, rng=0)[0].prompt
    try:
        for sampler, field in (("smc", "particles"), ("sp_gsmc", "pool_size"), ("best_of_n", "particles")):
            size = {field: 65}
            refused = demo.post({"prompt": problem, "sampler": sampler, **size})
            error = refused.json()["error"]
            assert refused.status_code == 400 and error["param"] == field, refused.text
            assert error["message"] == (
                f"{field}: the request needs 65 particle rows, more than the engine's max_batch_rows = 64"
            )
        assert demo.metric('tiltsmc_request_seconds_count{outcome="refused"}') == 3
        failed = demo.post({"prompt": [problem, "no problem"], "seed": 1, "particles": 4})
        error = failed.json()["error"]
        assert failed.status_code == 400 and error["param"] == "prompt", failed.text
        assert error["message"].startswith("prompt[1]: "), error["message"]
        none = {"prompt": problem, "sampler": "rejection", "max_tokens": 4, "seed": 3, "particles": 4}
        empty = demo.post(none)
        error = empty.json()["error"]
        assert empty.status_code == 400 and error["param"] == "sampler", empty.text
        assert error["message"].startswith("sampler: rejection accepted none of 64 draws for choice 0")
        streamed = demo.post({**none, "stream": True}).text.split("\n\n")
        events = [json.loads(block[len("data: ") :]) for block in streamed if block.startswith("data: ")]
        assert events == [{"error": error}]  # the stream's status was sent: its last event says why
        accepted = demo.post({**none, "max_tokens": None})
        assert accepted.status_code == 200 and accepted.json()["choices"][0]["text"], accepted.text
        assert demo.post({"prompt": 3}).status_code == 400
        not_json = httpx.post(
            f"{demo.url}/v1/completions", content=b"hi", headers={"content-type": "text/plain"}, timeout=60
        )
        assert not_json.status_code == 415

        def counts(server: Server) -> dict[str, float]:
            pattern = r'^tiltsmc_request_seconds_count\{outcome="(\w+)"\} (\S+)$'
            return {outcome: float(n) for outcome, n in re.findall(pattern, server.metrics(), re.MULTILINE)}

        # a request is counted (and logged) once its answer has gone out: the last one may be a moment late
        _wait_for_metrics(demo, lambda s: sum(counts(s).values()) >= 9)
        # 3 refused at submit, the failed prompt, the rejection's (plain and streamed), the two bodies
        assert counts(demo) == {"refused": 8, "completed": 1}
        lines = [
            json.loads(line) for line in demo.log().splitlines() if line.startswith('{"event": "request"')
        ]
        completions = [line["outcome"] for line in lines if line["path"] == "/v1/completions"]
        assert sorted(completions) == ["completed"] + ["refused"] * 8, completions
    finally:
        demo.stop()


def test_a_client_leaving_while_it_sends_its_body_is_no_error(server: Server) -> None:
    """A body cut short by the client leaving is not an error of the server (uvicorn logged a traceback
    for each): logged as a request the client cancelled."""
    with socket.create_connection(("127.0.0.1", server.port)) as client:
        client.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"prompt":'
        )
    deadline = time.monotonic() + 10
    while '"status": 499' not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    # the request is logged before its exception goes on to uvicorn: another request served, and a pause
    assert server.post({"prompt": "still here", "particles": 2}).status_code == 200
    time.sleep(0.5)
    assert "Traceback" not in server.log() and "ClientDisconnect" not in server.log()


def test_health_says_when_the_engine_has_failed() -> None:
    """An engine whose worker failed (a bug in the engine itself: every request fails) is not healthy:
    ``/health`` answers 503 with ``failed`` and the error (it said ``ok``), which load balancers and Ray
    Serve's health check act on. The app on a real uvicorn server on 127.0.0.1, in this process, to hold
    the engine."""
    import uvicorn
    from test_engine import BuggyForThree
    from tiltsmc.serving.server import create_app

    task = MarkovDFATask.random(4, 3, 6, rng=0)
    engine = tiltsmc.Engine(BuggyForThree(task.policy()), task.twist(noise=0.4, rng=1))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}/health"
        assert httpx.get(url, timeout=10).json()["status"] == "ok"
        with pytest.raises(tiltsmc.serving.EngineClosed):
            engine.submit((), "smc", num_particles=3, rng=0).result(timeout=30)  # breaks the engine
        failed = httpx.get(url, timeout=10)
        assert failed.status_code == 503 and failed.json()["status"] == "failed", failed.text
        assert "EngineBug" in failed.json()["error"]
    finally:
        server.should_exit = True
        thread.join(30)
        engine.close()


def test_a_prompt_fits_the_context_with_the_requests_max_tokens(server: Server) -> None:
    """A prompt counts the request's ``max_tokens`` against the model's context, not the server's
    ``--max-new-tokens`` (123 tokens + 5 fit gpt2-tiny's 128, + 6 do not): OpenAI's rule."""
    long_prompt = "ab " * 41
    fits = server.post({"prompt": long_prompt, "max_tokens": 5, "particles": 2, "seed": 0})
    assert fits.status_code == 200, fits.text
    assert fits.json()["usage"]["prompt_tokens"] == 123
    refused = server.post({"prompt": long_prompt, "particles": 2, "seed": 0})
    error = refused.json()["error"]
    assert refused.status_code == 400 and error["param"] == "prompt", refused.text
    assert "123 prompt tokens + max_new_tokens 6 exceed the model's context of 128" in error["message"]


def test_prompt_the_policy_cannot_take_fails_alone(server: Server) -> None:
    """A prompt past the model's context with its max_tokens fails with the reason; the others go on."""
    bodies = [
        {"prompt": "ok", "seed": 1},
        {"prompt": "word " * 1000, "seed": 2},
        {"prompt": "fine", "seed": 3},
    ]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(server.post, bodies))
    assert [r.status_code for r in responses] == [200, 400, 200]
    assert "context" in responses[1].json()["error"]["message"]


def test_health_and_metrics(server: Server) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok", "model": "tiltsmc"}
    head = httpx.head(f"{server.url}/health")  # a probe that reads the status alone (it was a 405)
    assert (head.status_code, head.content) == (200, b"")
    server.post({"prompt": "hi", "seed": 0, "particles": 4})
    text = server.metrics()
    for name in (
        'tiltsmc_requests_total{outcome="completed"}',
        "tiltsmc_queue_depth",
        "tiltsmc_rows_in_flight",
        "tiltsmc_row_limit",
        "tiltsmc_rows_per_policy_call",
        'tiltsmc_step_seconds_total{part="policy"}',
        'tiltsmc_step_seconds_total{part="reward"}',
        'tiltsmc_step_seconds_total{part="tiltsmc"}',
        'tiltsmc_request_seconds_bucket{le="0.5",outcome="completed"}',
        'tiltsmc_worker_rows_in_flight{worker="0"}',
        'tiltsmc_worker_row_limit{worker="0"}',
        "tiltsmc_cache_bytes_in_flight",
        "tiltsmc_max_cache_bytes",  # auto, the default: the fixtures' policy says its cache's size
        "tiltsmc_request_restarts_total",
    ):
        assert name in text, name
    assert server.metric("tiltsmc_request_restarts_total") == 0
    assert 'worker="1"' not in text  # one worker unless --workers says more
    assert server.metric('tiltsmc_requests_total{outcome="completed"}') >= 1
    # the row limit is learned from the steps' times (0 until a batch size has 8 steps measured): the
    # server's first request alone may not have taken that many
    for seed in range(1, 20):
        if server.metric("tiltsmc_row_limit") >= 1:
            break
        server.post({"prompt": "hi", "seed": seed, "particles": 4})
    assert 1 <= server.metric("tiltsmc_row_limit") <= 4096  # the default max_batch_rows, or learned below
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    requests = [
        line for line in lines if line.get("event") == "request" and line["path"] == "/v1/completions"
    ]
    assert requests and all({"id", "status", "ms"} <= set(line) for line in requests)


def test_openai_client_works_unchanged(server: Server) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    completion = client.completions.create(
        model="tiltsmc", prompt="hello", max_tokens=4, seed=3, n=2, extra_body={"particles": 4}
    )
    assert len(completion.choices) == 2 and all(isinstance(c.text, str) for c in completion.choices)
    assert completion.usage is not None and completion.usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiltsmc", prompt="hello", extra_body={"particles": 0})
    streamed = client.completions.create(
        model="tiltsmc", prompt="hello", max_tokens=4, seed=3, n=2, stream=True, extra_body={"particles": 4}
    )
    texts = {chunk.choices[0].index: chunk.choices[0].text for chunk in streamed}
    assert texts == {c.index: c.text for c in completion.choices}
    assert [m.id for m in client.models.list()] == ["tiltsmc"]
    assert client.models.retrieve("tiltsmc").id == "tiltsmc"


def test_chat_completion_is_the_offline_run(server: Server) -> None:
    """/v1/chat/completions: the messages rendered by the chat template are the prompt of the offline run
    with the same seed; the answer is OpenAI's chat shape."""
    pytest.importorskip("jinja2")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    request = {"messages": messages, "seed": 7, "particles": 8, "max_completion_tokens": 5}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=request, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"] == f"chatcmpl-{response.headers['x-request-id']}"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    policy = OnnxCausalLM(FIXTURES / "gpt2-tiny", max_new_tokens=6, chat_template=CHAT_TEMPLATE.read_text())
    offline = tiltsmc.smc(
        policy, OnnxRewardModel(FIXTURES / "prm-tiny"), prompts=[messages], num_particles=8, rng=7,
        max_new_tokens=5,
    )  # fmt: skip
    detail = body["tiltsmc"]["choices"][0]
    assert detail["log_z"] == offline.to_dict()["log_z"][0]
    assert choice["message"]["content"] == offline.texts[0][detail["sample_index"]]  # type: ignore[index]
    assert body["usage"]["prompt_tokens"] == len(policy.encode_prompt(messages))
    # text parts are joined; a template's refusal and a bad message are 400s naming messages
    parts = [{"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}]
    joined = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": parts, "seed": 7}, timeout=60)
    plain = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hello"}], "seed": 7},
        timeout=60,
    )
    assert joined.status_code == plain.status_code == 200
    assert joined.json()["choices"] == plain.json()["choices"]
    for bad in ([{"role": "tool", "content": "x"}], [], [{"content": "x"}]):
        refused = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": bad}, timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages", refused.text


def test_openai_chat_client(server: Server) -> None:
    openai = pytest.importorskip("openai")
    pytest.importorskip("jinja2")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    request: dict[str, Any] = {
        "model": "tiltsmc", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "seed": 3,
        "n": 2, "extra_body": {"particles": 4, "sampler": "smc"},
    }  # fmt: skip
    completion = client.chat.completions.create(**request)
    assert completion.object == "chat.completion" and len(completion.choices) == 2
    for choice in completion.choices:
        assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert completion.usage is not None and completion.usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="tiltsmc", messages=[{"role": "user", "content": "a"}], extra_body={"particles": 0}
        )
    streamed = client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
    contents: dict[int, str] = {}
    usage = None
    for chunk in streamed:
        for streamed_choice in chunk.choices:
            contents[streamed_choice.index] = contents.get(streamed_choice.index, "") + (
                streamed_choice.delta.content or ""
            )
        usage = chunk.usage or usage
    assert contents == {c.index: c.message.content for c in completion.choices}
    assert usage is not None and usage.total_tokens == completion.usage.total_tokens


POOL_SIZE_TYPES = 'pool_size: expected an integer >= 1 or "exact"'


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"sampler": "sp_gsmc", "pool_size": "exact"}, "pool_size", "pool_size: 'exact' needs a token-level"),
        ({"sampler": "mh", "pool_size": "exact"}, "pool_size", "pool_size: 'exact' needs a token-level"),
        ({"sampler": "smc", "proposal": "optimal"}, "proposal", "proposal: 'optimal' needs a token-level"),
        ({"sampler": "smc", "pool_size": "exact"}, "pool_size", "pool_size: not an option of sampler 'smc'"),
        ({"sampler": "sp_gsmc", "proposal": "naive"}, "proposal", "proposal: not an option of sampler"),
        ({"sampler": "mh", "pool_size": "exact", "particles": 2}, "pool_size", "pool_size: not used by"),
        ({"sampler": "sp_gsmc", "pool_size": "8"}, "pool_size", POOL_SIZE_TYPES),
        ({"sampler": "sp_gsmc", "pool_size": 0}, "pool_size", POOL_SIZE_TYPES),
        ({"sampler": "smc", "proposal": "best"}, "proposal", "proposal: "),
    ],
)  # fmt: skip
def test_the_optimal_forms_are_refused_without_a_twist_head_and_checked(
    server: Server, fields: dict[str, Any], param: str, message: str
) -> None:
    """``pool_size: "exact"`` and ``proposal: "optimal"`` need a twist head, which the fixture's reward
    model has not: a 400 naming the field, as for any option a request's sampler cannot take."""
    response = server.post({"prompt": "hi", "max_tokens": 2, **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(message), error
    if "needs" in message:
        assert "twist head (next_log_values)" in error["message"]


def test_the_optimal_proposal_and_exact_sp_gsmc_are_the_offline_runs(tmp_path: Path) -> None:
    """On a policy with a twist head (``--value-output twist``), ``pool_size: "exact"`` runs SP-gSMC's
    exact form and MH's proposals so, ``proposal: "optimal"`` SMC's optimal proposal: each choice the
    offline function's result for its seed (the API's ``pool_size=None``, ``proposal="optimal"``)."""
    from tiltsmc.models import PolicyTwist

    twist_model = FIXTURES / "gpt2-twist-tiny"
    serving = Server(
        tmp_path, "--policy", str(twist_model), "--value-output", "twist", "--reward-kind", "logit",
        "--max-new-tokens", "3", "--top-k", "3",
    )  # fmt: skip
    try:
        policy = OnnxCausalLM(twist_model, value_output="twist", max_new_tokens=3, top_k=3)
        twist = PolicyTwist(policy, kind="logit")
        for fields, sampler, options in (
            ({"sampler": "sp_gsmc", "pool_size": "exact"}, tiltsmc.sp_gsmc, {"pool_size": None}),
            ({"sampler": "mh", "pool_size": "exact", "mh_steps": 2}, tiltsmc.mh,
             {"pool_size": None, "steps": 2}),
            ({"sampler": "smc", "proposal": "optimal", "particles": 4}, tiltsmc.smc,
             {"proposal": "optimal", "num_particles": 4}),
        ):  # fmt: skip
            response = serving.post({"prompt": "10", "seed": 5, **fields})
            assert response.status_code == 200, response.text
            detail = response.json()["tiltsmc"]["choices"][0]
            offline = sampler(policy, twist, ["10"], rng=5, **options).to_dict()
            assert detail["log_z"] == offline["log_z"][0], fields
            assert detail["log_weights"] == offline["log_weights"][0], fields
    finally:
        serving.stop()


def test_stop_strings_are_the_policys_own(tmp_path: Path) -> None:
    """``tiltsmc serve --stop``: every answer ends before the policy's stop strings, as the offline run's;
    a request's ``stop`` is taken where it names the same strings and refused, saying which, otherwise."""
    stopping = Server(tmp_path, *FIXTURE_MODELS, "--stop", "5", "--stop", "e")
    try:
        body = {"prompt": "hello", "seed": 4, "particles": 8}
        plain = stopping.post(body)
        assert plain.status_code == 200, plain.text
        for stop in (["e", "5"], ["5", "e", "5"]):
            same = stopping.post({**body, "stop": stop})
            assert same.status_code == 200 and same.json()["choices"] == plain.json()["choices"], same.text
        for stop in ("5", ["5", "x"], []):
            refused = stopping.post({**body, "stop": stop})
            error = refused.json()["error"]
            assert refused.status_code == 400 and error["param"] == "stop", refused.text
            assert "['5', 'e'] (tiltsmc serve --stop)" in error["message"]
        policy = OnnxCausalLM(FIXTURES / "gpt2-tiny", max_new_tokens=6, stop=["5", "e"])
        offline = tiltsmc.smc(
            policy, OnnxRewardModel(FIXTURES / "prm-tiny"), prompts=["hello"], num_particles=8, rng=4
        )
        (choice,) = plain.json()["choices"]
        detail = plain.json()["tiltsmc"]["choices"][0]
        assert offline.texts is not None
        assert choice["text"] == offline.texts[0][detail["sample_index"]]
        assert all("5" not in text and "e" not in text for text in offline.texts[0])
        assert policy.tokenizer is not None
        whole = [policy.tokenizer.decode(tokens) for tokens in offline.samples[0]]
        assert any("5" in text or "e" in text for text in whole)  # some trajectories were cut
        # a choice cut at a stop string finished by "stop", as one ending at EOS; else by "length"
        reward = OnnxRewardModel(FIXTURES / "prm-tiny")
        reasons: list[str] = []
        for seed in range(8):
            answer = stopping.post({"prompt": "hello", "seed": seed, "particles": 4}).json()
            (choice,) = answer["choices"]
            index = answer["tiltsmc"]["choices"][0]["sample_index"]
            offline_run = tiltsmc.smc(policy, reward, prompts=["hello"], num_particles=4, rng=seed)
            tokens = offline_run.samples[0][index]
            text = policy.tokenizer.decode(tokens)
            by_eos = int(tokens[-1]) in policy.eos_token_ids
            by_string = "5" in text or "e" in text
            assert choice["finish_reason"] == ("stop" if by_eos or by_string else "length"), (answer, text)
            reasons.append("string" if by_string and not by_eos else choice["finish_reason"])
        assert "string" in reasons, reasons  # answers cut at a stop string among them
    finally:
        stopping.stop()


def test_max_cache_bytes_bounds_what_requests_hold(tmp_path: Path) -> None:
    """``--max-cache-bytes``: a request whose particles' KV cache alone would pass it is a 400 naming the
    bound; smaller ones are served, those past it waiting for the cache in flight to shrink."""
    policy = OnnxCausalLM(FIXTURES / "gpt2-tiny", max_new_tokens=6)
    per_particle = (len(policy.encode_prompt("hello")) + 6) * policy.cache_bytes_per_token
    bounded = Server(tmp_path, *FIXTURE_MODELS, "--max-cache-bytes", str(8 * per_particle))
    try:
        assert bounded.post({"prompt": "hello", "particles": 8, "seed": 0}).status_code == 200
        refused = bounded.post({"prompt": "hello", "particles": 9, "seed": 0})
        assert refused.status_code == 400 and "max_cache_bytes" in refused.json()["error"]["message"]
        bodies = [{"prompt": "hello", "particles": 4, "seed": k} for k in range(8)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(bounded.post, bodies))
        assert [a.status_code for a in answers] == [200] * 8
        assert bounded.metric("tiltsmc_max_cache_bytes") == 8 * per_particle
    finally:
        bounded.stop()


def test_api_key(tmp_path: Path) -> None:
    secured = Server(
        tmp_path, *FIXTURE_MODELS, "--api-key-env", "TILTSMC_TEST_KEY", env={"TILTSMC_TEST_KEY": "s3cret"}
    )
    try:
        body = {"prompt": "hi", "particles": 2}
        assert secured.post(body).status_code == 401
        wrong = secured.post(body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert secured.post(body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        for path in ("/v1/completions", "/v1/chat/completions"):  # the key is checked before the body
            refused = httpx.post(f"{secured.url}{path}", content=b"{not json")
            assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
            chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            assert httpx.post(f"{secured.url}{path}", json=chat).status_code == 401
        assert httpx.get(f"{secured.url}/health").status_code == 200
        assert httpx.get(f"{secured.url}/metrics").status_code == 401
        assert httpx.get(f"{secured.url}/v1/models").status_code == 401
        assert httpx.get(f"{secured.url}/v1/models/tiltsmc").status_code == 401
        assert (
            httpx.get(f"{secured.url}/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        )
    finally:
        secured.stop()
    missing = subprocess.run(
        [sys.executable, "-m", "tiltsmc.cli", "serve", *FIXTURE_MODELS, "--api-key-env", "TILTSMC_UNSET_KEY"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "TILTSMC_UNSET_KEY"},
    )
    assert missing.returncode == 2 and "TILTSMC_UNSET_KEY is not set" in missing.stderr


@pytest.mark.parametrize(
    ("arguments", "env", "message"),
    [
        (
            ["--api-key-env", "KEY"],
            {"KEY": "s3cret-k\u00e9y"},
            "--api-key-env: $KEY: an API key must",
        ),
        (["--api-key-env", "KEY"], {"KEY": "two words"}, "--api-key-env: $KEY: an API key must"),
        (["--port", "99999"], {}, "--port: expected a port number from 0 to 65535"),
        (["--port", "-1"], {}, "--port: expected a port number from 0 to 65535"),
        (["--grace", "inf"], {}, "--grace: expected a finite number of seconds"),
        (["--max-tokens", "-5"], {}, "--max-tokens: expected a positive integer"),
        (["--max-tokens", "0"], {}, "--max-tokens: expected a positive integer"),
        (["--max-tokens", "7"], {}, "max_tokens: 7 is not from 1 to the policy's max_new_tokens, 6"),
        (["--max-mh-steps", "0"], {}, "--max-mh-steps: expected a positive integer"),
        (["--max-prompts", "0"], {}, "--max-prompts: expected a positive integer"),
        (["--max-queue", "0"], {}, "--max-queue: expected a positive integer"),
        (["--host", ""], {}, "--host: expected an address to bind (0.0.0.0 for every interface), got ''"),
        (["--workers=--"], {}, "argument --workers: invalid int value: '--'"),
        # not UTF-8 (POSIX arguments are bytes): every response failed (500); the idna codec's error
        (["--model-name", os.fsdecode(b"m\xff")], {}, "--model-name: 'm\\xff' is not UTF-8 text (byte 0xff)"),
        (["--host", os.fsdecode(b"h\xff")], {}, "--host: 'h\\xff' is not UTF-8 text (byte 0xff)"),
    ],
)
def test_server_options_are_checked_before_it_starts(
    arguments: list[str], env: dict[str, str], message: str
) -> None:
    """Options that could not work are refused at once, naming the option (exit status 2): a key that
    a client cannot send as it is compared, a port out of range (99999 listened on 34463), a grace
    period no integer holds, a token limit no request could meet, a queue no request could wait in."""
    refused = subprocess.run(
        [sys.executable, "-m", "tiltsmc.cli", "serve", *FIXTURE_MODELS, *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_port_it_cannot_listen_on_is_refused_before_it_says_it_listens(server: Server) -> None:
    """The socket is bound before the "listening" line: a port in use, or a host that does not resolve,
    is one line naming the option, exit status 2 (uvicorn logged its own error after a "listening" line
    and exited with status 3); with --port 0 the line gives the port the system chose (it said 0)."""
    for arguments, message in [
        (["--port", str(server.port)], f"tiltsmc: --port: cannot listen on 127.0.0.1:{server.port}: "),
        (["--host", "no-such-host.invalid", "--port", "0"], "tiltsmc: --host: cannot listen on "),
    ]:
        refused = subprocess.run(
            [sys.executable, "-m", "tiltsmc.cli", "serve", *FIXTURE_MODELS, *arguments],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 2 and refused.stderr.startswith(message), refused.stderr
        assert "listening" not in refused.stderr and "Traceback" not in refused.stderr
    process = subprocess.Popen(
        [sys.executable, "-m", "tiltsmc.cli", "serve", *FIXTURE_MODELS, "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        listening = json.loads(process.stderr.readline())
        assert listening["event"] == "listening" and listening["port"] > 0
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{listening['port']}/health", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert health.status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)


# The bundled models with a 16-step problem: a request of 64 particles takes tenths of a second to seconds.
LONG_REQUEST = {"prompt": arithmetic.make_problems(16, 1, rng=0)[0].prompt, "particles": 64, "seed": 1}


def _duration(server: Server, body: dict[str, Any]) -> float:
    """Seconds one request takes alone on this server (the tests' timings scale with the machine)."""
    began = time.monotonic()
    assert server.post(body).status_code == 200
    return time.monotonic() - began


def test_overload_and_disconnect(tmp_path: Path) -> None:
    """A full queue answers 429 with Retry-After; a client that goes away frees its rows."""
    slow = Server(
        tmp_path, "--demo", "--max-batch-rows", "64", "--max-queue", "1", "--timeout", "20", "--grace", "20"
    )
    try:
        body = LONG_REQUEST
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(slow.post, [body] * 6))
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
        rejected = next(r for r in responses if r.status_code == 429)
        assert rejected.headers["retry-after"] == "1" and rejected.json()["error"]["code"] == "overloaded"
        # more choices than the queue holds could never all wait: a 400, not a 429 to retry for ever
        never = slow.post({**body, "n": 2})
        assert never.status_code == 400 and never.json()["error"]["param"] == "n", never.text
        assert "(1, tiltsmc serve --max-queue)" in never.json()["error"]["message"]

        lone = _duration(slow, body)
        with pytest.raises(httpx.ReadTimeout):  # the client goes away mid-request (a quarter of the way)
            slow.post(body, timeout=lone / 4)
        deadline = time.monotonic() + 20
        while slow.metric('tiltsmc_requests_total{outcome="cancelled"}') < 1:
            assert time.monotonic() < deadline, slow.metrics()
            time.sleep(0.1)
        assert slow.metric("tiltsmc_rows_in_flight") == 0
    finally:
        slow.stop()


def test_sigterm_lets_requests_in_flight_finish(tmp_path: Path) -> None:
    """Two requests in flight, one in each of two workers' batches: both finish, then the process exits."""
    draining = Server(tmp_path, "--demo", "--grace", "20", "--workers", "2")
    try:
        lone = _duration(draining, LONG_REQUEST)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            in_flight = [pool.submit(draining.post, LONG_REQUEST) for _ in range(2)]
            # one in each worker's batch (a request goes to the worker with fewer rows), both in flight
            # at once: read until both are seen (not after a fixed share of one's time: on a busy machine
            # the second was once not admitted yet), or one has ended
            deadline = time.monotonic() + 30 + 4 * lone
            while True:
                rows = [draining.metric(f'tiltsmc_worker_rows_in_flight{{worker="{k}"}}') for k in (0, 1)]
                if min(rows) > 0 or any(f.done() for f in in_flight) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert rows[0] == rows[1] > 0, rows
            began = time.monotonic()
            draining.process.send_signal(signal.SIGTERM)
            finished = [f.result() for f in in_flight]
        draining.process.wait(25)
        assert time.monotonic() - began < 25
        assert [r.status_code for r in finished] == [200, 200]
        # uvicorn ends by re-raising the signal once it has shut down gracefully
        assert draining.process.returncode in (0, -signal.SIGTERM)
        assert "Traceback" not in draining.log()
        # the two workers' session calls run side by side: each model gets half the cores
        listening = next(json.loads(line) for line in draining.log().splitlines() if '"listening"' in line)
        assert (listening["workers"], listening["threads"]) == (2, max(1, usable_cores() // 2))
    finally:
        draining.stop()


SERVE_A_STEP_THAT_NEVER_ENDS = (
    SCRIPT_HEAD
    + """
import argparse

import tiltsmc.serving.server as server

server.SHUTDOWN_WAIT = 1.0
args = argparse.Namespace(host="127.0.0.1", port=int(sys.argv[1]), threads=None)
settings = server.Settings(grace=1.0)
sys.exit(server.serve(args, settings, Stuck(announce=True), TASK.twist(noise=0.4, rng=1)))
"""
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_exits_past_the_grace_period_even_inside_a_long_step(tmp_path: Path, signum: int) -> None:
    """A step that outlasts the grace period (a model call cannot be cut short): the server still exits,
    ``SHUTDOWN_WAIT`` after the drain, and logs why once (it waited for the step for ever; on SIGINT it
    then waited ``SHUTDOWN_WAIT`` again and logged it twice)."""
    script = tmp_path / "stuck_server.py"
    script.write_text(SERVE_A_STEP_THAT_NEVER_ENDS)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "stuck.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, str(script), str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            # its answer, if any, is not the point: the connection may close first
            pool.submit(httpx.post, f"{url}/v1/completions", json={"prompt": "x", "particles": 2}, timeout=60)
            while "inside the step" not in log.read_text():
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            began = time.monotonic()
            process.send_signal(signum)
            process.wait(30)  # the drain, begun at the signal: grace 1 s, then SHUTDOWN_WAIT 1 s
            assert time.monotonic() - began < 20
        assert process.returncode in (1, -signum), log.read_text()
        assert log.read_text().count('"stuck_step": true') == 1, log.read_text()
        assert "terminate called" not in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_timeout_is_a_504(tmp_path: Path) -> None:
    """A 504; a stream, whose status is sent once it is admitted, ends with OpenAI's error object instead
    (the ``openai`` client raises it), without ``[DONE]``."""
    hurried = Server(tmp_path, "--demo", "--timeout", "0.001")
    try:
        response = hurried.post({"prompt": "57 a+8 b-3", "particles": 8})
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        streamed = hurried.post({"prompt": "57 a+8 b-3", "particles": 8, "stream": True})
        error = _stream_error(streamed)
        assert error["code"] == "timeout" and error["type"] == "timeout_error"
        assert hurried.metric('tiltsmc_request_seconds_count{outcome="timed_out"}') == 2
        openai = pytest.importorskip("openai")
        client = openai.OpenAI(base_url=f"{hurried.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIError, match=r"timeout|timed out"):
            for _ in client.completions.create(model="tiltsmc", prompt="57 a+8 b-3", stream=True):
                pass
    finally:
        hurried.stop()


class _Connection:
    """An ASGI request whose ``receive`` blocks until the client leaves (``leave``), counting its calls."""

    def __init__(self) -> None:
        import asyncio

        self.left = asyncio.Event()
        self.receives = 0

    async def receive(self) -> dict[str, str]:
        self.receives += 1
        await self.left.wait()
        return {"type": "http.disconnect"}


def test_waiting_for_answers_waits_on_the_connection_instead_of_polling_it() -> None:
    """``_waiting``: the answers once every request is done, ``None`` every ``every`` seconds until
    then, one ``receive`` in all (no polling); a client that leaves ends it with ``ClientGone`` and
    cancels the requests still running."""
    import asyncio

    from tiltsmc.serving.server import ClientGone, _waiting

    async def answered() -> tuple[list[Any], int]:
        connection, future = _Connection(), concurrent.futures.Future()
        asyncio.get_running_loop().call_later(0.25, future.set_result, "answer")
        seen = [item async for item in _waiting(connection, [future], 0.04)]
        return seen, connection.receives

    seen, receives = asyncio.run(answered())
    assert seen[-1] == ["answer"] and len(seen) >= 3 and all(item is None for item in seen[:-1])
    assert receives == 1

    async def left() -> tuple[bool, bool]:
        connection = _Connection()
        futures = [concurrent.futures.Future(), concurrent.futures.Future()]
        futures[0].set_result("done")
        asyncio.get_running_loop().call_later(0.1, connection.left.set)
        with pytest.raises(ClientGone):
            async for _ in _waiting(connection, futures, math.inf):
                pass
        return futures[1].cancelled(), connection.receives == 1

    assert asyncio.run(left()) == (True, True)


def test_a_servers_answer_has_each_fields_part_as_to_dict_writes_it() -> None:
    """The server's ``tiltsmc`` detail of a choice reads each field's first prompt as ``to_dict`` writes
    it, non-finite values (a zero weight, a collapsed prompt's estimate) as null."""
    from tiltsmc.serving.server import _response

    task = MarkovDFATask.random(4, 3, 5, rng=0)
    result = tiltsmc.smc(task.policy(), task.twist(noise=0.4, rng=1), num_particles=4, rng=3)
    result.log_z[0] = -math.inf
    result.log_weights[0][1] = -math.inf
    result.collapsed[0] = True
    answer = _response("id", "m", "smc", 1, 0, [(result, 0)], task.policy())
    detail = answer["tiltsmc"]["choices"][0]
    record = result.to_dict()
    for key in ("log_z", "log_weights", "ess", "resampled", "collapsed"):
        assert detail[key] == record[key][0], key
    assert detail["log_z"] is None and detail["log_weights"][1] is None and detail["collapsed"] is True
    assert detail["compute"] == record["compute"]
    json.dumps(answer, allow_nan=False)


def _serving_script(models: str, settings: str = "") -> str:
    """A script for ``Server(script=...)``: ``server.serve`` with ``Settings(<settings>)`` on the port given,
    serving the ``policy`` and ``reward`` that the code ``models`` makes (this folder's modules importable:
    ``Stuck``, ``TASK`` imported), its log lines led by their level (``INFO {...}``, ``ERROR {...}``)."""
    return (
        SCRIPT_HEAD
        + f"""
import argparse
import logging

import tiltsmc.serving.server as server

handler = logging.StreamHandler(sys.stderr)
handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
server.logger.addHandler(handler)
server.logger.setLevel(logging.INFO)
server.logger.propagate = False
{models}
args = argparse.Namespace(host="127.0.0.1", port=int(sys.argv[1]), threads=None)
sys.exit(server.serve(args, server.Settings({settings}), policy, reward))
"""
    )


def _completion_lines(server: Server, count: int) -> list[dict[str, Any]]:
    """The log lines of a ``_serving_script`` server's completion requests, JSON decoded, once there are
    ``count`` (a line is written once its answer is sent)."""
    deadline = time.monotonic() + 10
    while True:
        lines = [line for line in _request_lines(server.log()) if line["path"] == "/v1/completions"]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def _request_lines(log: str) -> list[dict[str, Any]]:
    """The request log lines of a ``_serving_script`` server's log, JSON decoded."""
    return [
        json.loads(line[len("INFO ") :])
        for line in log.splitlines()
        if line.startswith('INFO {"event": "request"')
    ]


def test_a_field_left_out_counts_at_its_default_within_the_limits(tmp_path: Path) -> None:
    """``--max-tokens 3`` below the policy's ``--max-new-tokens 6``, ``--max-mh-steps 4`` below MH's 8 steps:
    a request that leaves ``max_tokens`` (``max_completion_tokens``) or ``mh_steps`` out runs at the limit,
    as the same request sending it (it ran 6 tokens and 8 steps: only the fields sent were checked), since
    OpenAI's ``max_tokens`` is an upper bound that clients leave out; one that asks for more is refused."""
    limited = Server(
        tmp_path,
        *FIXTURE_MODELS,
        "--max-tokens",
        "3",
        "--max-mh-steps",
        "4",
        "--chat-template",
        str(CHAT_TEMPLATE),
    )
    try:
        body = {"prompt": "hi", "particles": 4, "n": 4, "seed": 0}
        left_out, sent = limited.post(body), limited.post({**body, "max_tokens": 3})
        assert left_out.status_code == sent.status_code == 200, left_out.text
        assert left_out.json()["choices"] == sent.json()["choices"]
        assert _results(left_out.json()["tiltsmc"]["choices"]) == _results(sent.json()["tiltsmc"]["choices"])
        assert left_out.json()["usage"]["completion_tokens"] <= 4 * 3
        chat = {"messages": [{"role": "user", "content": "hi"}], "particles": 4, "n": 2, "seed": 1}
        chat_answers = [
            httpx.post(f"{limited.url}/v1/chat/completions", json=request, timeout=60).json()
            for request in (chat, {**chat, "max_completion_tokens": 3})
        ]
        assert chat_answers[0]["choices"] == chat_answers[1]["choices"]
        assert _results(chat_answers[0]["tiltsmc"]["choices"]) == _results(
            chat_answers[1]["tiltsmc"]["choices"]
        )

        mh = {"prompt": "hi", "sampler": "mh", "pool_size": 2, "seed": 0}
        mh_left_out, mh_sent = limited.post(mh), limited.post({**mh, "mh_steps": 4})
        assert mh_left_out.status_code == mh_sent.status_code == 200, mh_left_out.text
        left_detail, sent_detail = (
            mh_left_out.json()["tiltsmc"]["choices"][0],
            mh_sent.json()["tiltsmc"]["choices"][0],
        )
        assert _results([left_detail]) == _results([sent_detail])
        assert left_detail["compute"]["policy_steps"] == sent_detail["compute"]["policy_steps"]

        for more, field, message in (
            ({"max_tokens": 4}, "max_tokens", "max_tokens: 4 is more than this server's 3"),
            ({"sampler": "mh", "mh_steps": 5}, "mh_steps", "mh_steps: 5 steps, more than this server's 4"),
        ):
            refused = limited.post({"prompt": "hi", **more})
            error = refused.json()["error"]
            assert refused.status_code == 400 and (error["param"], error["message"]) == (field, message)
    finally:
        limited.stop()


def _raises_for_one_prompt(raising: str) -> str:
    """The code of a ``_serving_script``'s models: the fixtures' policy, whose calls for a batch holding
    the prompt ``abcde`` run the statement ``raising`` (``RefusesText``)."""
    return f"""
import numpy as np
from poisoned_policy import RefusesText
from tiltsmc.models import OnnxCausalLM, OnnxRewardModel


class Raises(RefusesText):
    def refuse(self, particles):
        if self.text in particles.prompts:
            {raising}


policy = Raises(OnnxCausalLM({str(FIXTURES / "gpt2-tiny")!r}, max_new_tokens=4), "abcde")
reward = OnnxRewardModel({str(FIXTURES / "prm-tiny")!r}, kind="logit")
"""


@pytest.mark.parametrize(
    ("raising", "summary"),
    [
        ('raise RuntimeError("cannot take abcde")', "RuntimeError: cannot take abcde"),
        (  # a model wrapper's bug
            "np.ones((2, 7)) + np.ones((2, 8))",
            "ValueError: operands could not be broadcast together with shapes (2,7) (2,8)",
        ),
        ("len(None)", "TypeError: object of type 'NoneType' has no len()"),
    ],
    ids=["RuntimeError", "ValueError", "TypeError"],
)
def test_a_request_failing_with_the_servers_own_error_is_a_500_in_openais_shape(
    tmp_path: Path, raising: str, summary: str
) -> None:
    """A model call that raises for one request alone, whatever the error's type (not a refusal of the
    request's values, which names what the request set: the server's error): a 500 of OpenAI's
    ``server_error`` naming the error in a line, no traceback (a RuntimeError was Starlette's plain-text
    "Internal Server Error", logged as status 499; a ValueError or a TypeError a 400
    ``invalid_request_error`` blaming the request, not logged); a stream ends with that error as its last
    event, without ``[DONE]`` (it was cut short); each logged once at ERROR with its traceback, the
    request's line with status 500 (a stream's 200: sent before) and outcome failed."""
    failing = Server(tmp_path, script=_serving_script(_raises_for_one_prompt(raising)))
    try:
        expected = {
            "message": f"the server failed to answer the request: {summary}",
            "type": "server_error",
            "param": None,
            "code": None,
        }
        for prompt in ("abcde", ["fine", "abcde"]):  # alone, and beside a prompt that succeeds
            failed = failing.post({"prompt": prompt, "particles": 2, "seed": 1})
            assert failed.status_code == 500 and failed.headers["content-type"] == "application/json"
            assert failed.json() == {"error": expected}, failed.text
        streamed = failing.post({"prompt": "abcde", "particles": 2, "seed": 1, "stream": True})
        assert streamed.status_code == 200, streamed.text
        blocks = [block for block in streamed.text.split("\n\n") if block]
        assert blocks == [f"data: {json.dumps({'error': expected}, separators=(',', ':'))}"], streamed.text
        assert failing.post({"prompt": "fine", "particles": 2, "seed": 1}).status_code == 200
        completions = _completion_lines(failing, 4)
        log = failing.log()
        assert [(line["status"], line["outcome"]) for line in completions] == [
            (500, "failed"), (500, "failed"), (200, "failed"), (200, "completed"),
        ]  # fmt: skip
        failures = [line for line in log.splitlines() if line.startswith('ERROR {"event": "request_failed"')]
        assert len(failures) == 3 and log.count("Traceback (most recent call last)") == 3, log
        assert all(json.loads(line[len("ERROR ") :])["error"] == summary for line in failures)
        assert "Exception in ASGI application" not in log
    finally:
        failing.stop()


def test_a_model_call_past_the_timeout_is_a_504_all_the_same(tmp_path: Path) -> None:
    """A model call that never returns (``Stuck``): the engine checks a request's timeout between its
    steps, so the server answers the 504 itself ``TIMEOUT_MARGIN`` (1 s) past ``timeout`` (there was no
    answer at all), and a stream ends with the timeout's error event, both logged as timed out."""
    stuck = Server(
        tmp_path,
        script=_serving_script("policy, reward = Stuck(), TASK.twist(noise=0.4, rng=1)", "timeout=1.0"),
    )
    try:
        body = {"prompt": "x", "particles": 2}
        began = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            # waiting less than a keep-alive's 15 s: without the server's own timer, neither is answered
            plain = pool.submit(stuck.post, body, timeout=8)
            streaming = pool.submit(stuck.post, {**body, "stream": True}, timeout=8)
            answered, streamed = plain.result(), streaming.result()
        assert time.monotonic() - began < 8
        error = answered.json()["error"]
        assert answered.status_code == 504 and (error["type"], error["code"]) == ("timeout_error", "timeout")
        assert error["message"] == "timeout: the request took more than 1 s (a model call ran past it)"
        assert _stream_error(streamed) == error
        lines = _completion_lines(stuck, 2)
        assert sorted((line["status"], line["outcome"]) for line in lines) == [
            (200, "timed_out"),
            (504, "timed_out"),
        ]
    finally:
        stuck.process.kill()
        stuck.stop()


def _slow_models(seconds: float) -> str:
    """The code of a ``_serving_script``'s models: ``Stuck``'s policy, but each ``propose`` returns after
    ``seconds`` (a model call that takes that long, then goes on)."""
    return f"""
import time


class Slow(Stuck):
    def propose(self, particles, rng):
        time.sleep({seconds!r})
        return self.policy.propose(particles, rng)


policy, reward = Slow(), TASK.twist(noise=0.4, rng=1)
"""


def _wait_for_metrics(server: Server, condition: Any, seconds: float = 30.0) -> None:
    """Until ``condition(server)`` holds (its metrics read afresh each time)."""
    deadline = time.monotonic() + seconds
    while not condition(server):
        assert time.monotonic() < deadline, server.metrics()
        time.sleep(0.05)


def test_a_504_the_server_answers_itself_counts_as_timed_out(tmp_path: Path) -> None:
    """A model call that overruns the timeout, then returns (3 s against ``timeout=1.0``): the server
    answers the 504 itself ``TIMEOUT_MARGIN`` past it, cancelling the engine's requests, which the
    engine then counts, and ``tiltsmc_requests_total`` shows, as ``timed_out`` (they counted as
    cancelled: the metric missed every timeout of a model call that overran); a client that leaves
    before the timeout still counts as ``cancelled``."""
    slow = Server(tmp_path, script=_serving_script(_slow_models(3.0), "timeout=1.0"))
    try:
        body = {"prompt": "x", "particles": 2}
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            plain = pool.submit(slow.post, body, timeout=8)
            streaming = pool.submit(slow.post, {**body, "stream": True}, timeout=8)
            leaving = pool.submit(slow.post, body, timeout=0.3)  # gone well before its timeout
            answered, streamed = plain.result(), streaming.result()
            with pytest.raises(httpx.ReadTimeout):
                leaving.result()
        assert answered.status_code == 504 and answered.json()["error"]["code"] == "timeout", answered.text
        assert streamed.status_code == 200 and '"code":"timeout"' in streamed.text, streamed.text
        _wait_for_metrics(  # once the model call has returned, the engine takes them out
            slow, lambda s: s.metric("tiltsmc_requests_in_flight") + s.metric("tiltsmc_queue_depth") == 0
        )
        assert slow.metric('tiltsmc_requests_total{outcome="timed_out"}') == 2, slow.metrics()
        assert slow.metric('tiltsmc_requests_total{outcome="cancelled"}') == 1, slow.metrics()
        assert slow.metric('tiltsmc_requests_total{outcome="submitted"}') == 3
        assert slow.metric('tiltsmc_request_seconds_count{outcome="timed_out"}') == 2
    finally:
        slow.stop()


def _gated_models(gate: Path) -> str:
    """The code of a ``_serving_script``'s models: ``Stuck``'s policy, but each ``propose`` waits while the
    file ``gate`` exists, then goes on (the test holds the engine inside a step)."""
    return f"""
import os
import time


class Gated(Stuck):
    def propose(self, particles, rng):
        while os.path.exists({str(gate)!r}):
            time.sleep(0.01)
        return self.policy.propose(particles, rng)


policy, reward = Gated(), TASK.twist(noise=0.4, rng=1)
"""


def test_choices_the_queue_has_no_room_for_are_a_429_and_free_what_was_queued(tmp_path: Path) -> None:
    """``n = 2`` with room in the queue for one choice: a 429, the choice already queued cancelled at
    once (out of the queue's depth, counted ``cancelled``, the refused one ``rejected``), and the queue
    whole again for the next requests: a request of ``n = 2`` that fills it waits and is served."""
    gate = tmp_path / "gate"
    gate.touch()
    held = Server(
        tmp_path,
        script=_serving_script(_gated_models(gate), "max_batch_rows=2, max_queue=2, adaptive_rows=False"),
    )
    try:
        body = {"prompt": "x", "particles": 2}  # all the rows: one request in flight at a time
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(held.post, body)
            _wait_for_metrics(held, lambda s: s.metric("tiltsmc_requests_in_flight") == 1)
            second = pool.submit(held.post, body)
            _wait_for_metrics(held, lambda s: s.metric("tiltsmc_queue_depth") == 1)
            refused = held.post({**body, "n": 2})
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "overloaded"
            assert held.metric("tiltsmc_queue_depth") == 1
            assert held.metric('tiltsmc_requests_total{outcome="cancelled"}') == 1
            assert held.metric('tiltsmc_requests_total{outcome="rejected"}') == 1
            gate.unlink()
            assert [first.result().status_code, second.result().status_code] == [200, 200]
        gate.touch()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            holder = pool.submit(held.post, body)
            _wait_for_metrics(held, lambda s: s.metric("tiltsmc_requests_in_flight") == 1)
            both = pool.submit(held.post, {**body, "n": 2})  # the queue's two places
            _wait_for_metrics(held, lambda s: s.metric("tiltsmc_queue_depth") == 2)
            gate.unlink()
            assert holder.result().status_code == 200
            assert both.result().status_code == 200 and len(both.result().json()["choices"]) == 2
        _wait_for_metrics(
            held, lambda s: s.metric("tiltsmc_requests_in_flight") + s.metric("tiltsmc_queue_depth") == 0
        )
        for outcome, count in (("submitted", 6), ("completed", 5), ("cancelled", 1), ("rejected", 1)):
            assert held.metric(f'tiltsmc_requests_total{{outcome="{outcome}"}}') == count, held.metrics()
        assert held.metric("tiltsmc_rows_in_flight") == 0
    finally:
        gate.unlink(missing_ok=True)
        held.stop()


def test_sigterm_answers_what_the_grace_period_leaves_unfinished_as_closing(tmp_path: Path) -> None:
    """SIGTERM with two requests, one streamed, held inside a model call past the grace period: the
    engine's drain begins with the shutdown, and ``TIMEOUT_MARGIN`` past the grace period (the model call
    still running) the plain request gets the 503 ``closed`` in OpenAI's shape, the stream that error as
    its last event, whole; each logged as sent, with outcome ``closed``. uvicorn's own wait, shorter than
    the drain (which began only after it), cancelled them first: a plain-text 500 logged as 499
    ``cancelled``, a stream cut short."""
    from tiltsmc.serving.server import TIMEOUT_MARGIN

    grace = 1.0
    gate = tmp_path / "gate"
    gate.touch()
    # the step never ends: the drain waits for it 1 s past the grace period (SHUTDOWN_WAIT), not 10
    models = _gated_models(gate) + "server.SHUTDOWN_WAIT = 1.0\n"
    closing = Server(tmp_path, script=_serving_script(models, f"grace={grace}, stream_keepalive=0.2"))
    try:
        body = {"prompt": "x", "particles": 2}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            plain = pool.submit(closing.post, body)
            streaming = pool.submit(closing.post, {**body, "stream": True})
            _wait_for_metrics(  # one inside the model call, the other queued behind it
                closing,
                lambda s: s.metric("tiltsmc_requests_in_flight") + s.metric("tiltsmc_queue_depth") == 2,
            )
            began = time.monotonic()
            closing.process.send_signal(signal.SIGTERM)
            answered, streamed = plain.result(), streaming.result()
        assert time.monotonic() - began >= grace + TIMEOUT_MARGIN  # no answer before then: there was time
        closing.process.wait(30)
        assert answered.status_code == 503, answered.text
        assert answered.headers["content-type"] == "application/json"
        error = answered.json()["error"]
        assert (error["type"], error["code"], error["param"]) == ("unavailable_error", "closed", None)
        assert error["message"] == (
            "the server closed before the request finished: a model call ran past the grace period (1 s)"
        )
        assert streamed.text.startswith(": keep-alive"), streamed.text
        assert _stream_error(streamed) == error
        lines = _completion_lines(closing, 2)
        assert sorted((line["status"], line["outcome"]) for line in lines) == [
            (200, "closed"),
            (503, "closed"),
        ]
        log = closing.log()
        assert "Exception in ASGI application" not in log and "timeout graceful shutdown" not in log, log
    finally:
        gate.unlink(missing_ok=True)
        closing.stop()


def test_sigterm_lets_a_request_finish_within_a_fractional_grace_period(tmp_path: Path) -> None:
    """``grace=2.99``: a request held inside a model call until 2.2 s after SIGTERM finishes within the
    grace period and is answered 200 (uvicorn waited the grace period's whole seconds alone, 2 s, then
    cancelled the handler: a plain-text 500)."""
    grace = 2.99  # the most time to finish after the gate opens (0.79 s) that old uvicorn wait still cuts
    gate = tmp_path / "gate"
    gate.touch()
    held = Server(tmp_path, script=_serving_script(_gated_models(gate), f"grace={grace}"))
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(held.post, {"prompt": "x", "particles": 2})
            _wait_for_metrics(held, lambda s: s.metric("tiltsmc_requests_in_flight") == 1)
            held.process.send_signal(signal.SIGTERM)
            time.sleep(math.floor(grace) + 0.2)
            gate.unlink()
            answered = answer.result()
        assert answered.status_code == 200 and len(answered.json()["choices"]) == 1, answered.text
        held.process.wait(30)
        lines = _completion_lines(held, 1)
        assert [(line["status"], line["outcome"]) for line in lines] == [(200, "completed")]
    finally:
        gate.unlink(missing_ok=True)
        held.stop()


def test_a_chat_request_to_a_server_without_a_chat_template_names_the_option_that_gives_one(
    tmp_path: Path,
) -> None:
    """The demo's tokenizer has no chat template: a chat request, streamed or not, is a 400 naming
    ``messages`` that says the server has none and names ``tiltsmc serve --chat-template`` (it named the
    tokenizer's path on the server and the library's ``chat_template=``)."""
    demo = Server(tmp_path, "--demo")
    try:
        for stream in (False, True):
            body = {"messages": [{"role": "user", "content": "57 a+8"}], "stream": stream}
            refused = httpx.post(f"{demo.url}/v1/chat/completions", json=body, timeout=60)
            error = refused.json()["error"]
            assert refused.status_code == 400 and error["param"] == "messages", refused.text
            assert error["message"] == (
                "messages: this server has no chat template (its policy's tokenizer has none): it takes "
                "chat requests once started with one, tiltsmc serve --chat-template FILE; send text "
                "prompts to /v1/completions"
            )
        assert demo.post({"prompt": "57 a+8 b-3\n", "particles": 2}).status_code == 200
    finally:
        demo.stop()


def test_settings_the_command_line_refuses_are_refused_by_create_app_and_settings() -> None:
    """``create_app`` and ``Settings`` (what Ray's replicas are built from) check their settings as the
    command line does (it alone did): an empty API key (it let any ``Authorization: Bearer`` through), a
    timeout <= 0 (every request a 400 blaming the client), a keep-alive of 0 (a stream's loop without
    pause), a drain time < 0 (or an infinite grace: uvicorn waits whole seconds past it), limits < 1;
    TypeError / ValueError naming the setting. The command line's own messages, naming its options, are as
    they were."""
    import argparse

    import numpy as np
    from tiltsmc.serving.server import ApiKeyDigest, Limits, Settings, add_arguments, create_app

    task = MarkovDFATask.random(4, 3, 6, rng=0)
    engine = tiltsmc.Engine(task.policy(), task.twist(noise=0.4, rng=1))
    refused: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"api_key": ""}, ValueError, r"^api_key: expected a non-empty key, or None for none$"),
        ({"api_key": b"key"}, TypeError, r"^api_key: expected a string, an ApiKeyDigest or None, got bytes$"),
        ({"api_key": "two words"}, ValueError, r"^api_key: an API key must be visible ASCII"),
        (
            {"timeout": -1.0},
            ValueError,
            r"^timeout: expected a positive number of seconds or None, got -1.0$",
        ),
        ({"timeout": 0}, ValueError, r"^timeout: expected a positive number of seconds or None, got 0$"),
        ({"timeout": math.nan}, ValueError, r"^timeout: expected a positive number of seconds or None"),
        ({"timeout": "5"}, TypeError, r"^timeout: expected a number, got '5'$"),
        ({"stream_keepalive": 0.0}, ValueError, r"^stream_keepalive: expected a positive finite number"),
        (
            {"stream_keepalive": math.inf},
            ValueError,
            r"^stream_keepalive: expected a positive finite number",
        ),
        (
            {"limits": {"max_n": 2}},
            TypeError,
            r"^limits: expected a tiltsmc.serving.server.Limits, got dict$",
        ),
    ]
    try:
        for settings, error, message in refused:
            with pytest.raises(error, match=message):
                create_app(engine, **settings)
            with pytest.raises(error, match=message):
                Settings(**settings)
        for close_timeout in (-1.0, math.nan):
            with pytest.raises(ValueError, match=r"^close_timeout: expected a number of seconds >= 0, got"):
                create_app(engine, close_timeout=close_timeout)
        with pytest.raises(ValueError, match=r"^grace: expected a finite number of seconds >= 0, got inf$"):
            Settings(grace=math.inf).app(engine)
        for name in (
            "max_prompt_tokens", "max_particles", "max_tokens", "max_n", "max_mh_steps", "max_prompts",
            "max_body_bytes",
        ):  # fmt: skip
            with pytest.raises(ValueError, match=rf"^{name}: expected a positive integer, got 0$"):
                Limits(**{name: 0})
            with pytest.raises(TypeError, match=rf"^{name}: expected a positive integer, got True$"):
                Limits(**{name: True})
        create_app(engine, api_key="k3y", timeout=None, close_timeout=0.0, stream_keepalive=0.5)
        create_app(engine, api_key=ApiKeyDigest.of("k3y"))  # what a replica on Ray is handed
        for digest in (b"", b"k3y", "00" * 32):
            with pytest.raises(ValueError, match=r"^sha256: expected the 32 bytes of an API key's SHA-256"):
                ApiKeyDigest(digest)  # type: ignore[arg-type]
        create_app(engine, timeout=math.inf, close_timeout=math.inf)  # no limit
        Settings(api_key="k3y", timeout=math.inf, limits=Limits(max_tokens=np.int64(3)))  # type: ignore[arg-type]

        parser = argparse.ArgumentParser()
        add_arguments(parser)
        for arguments, message in [
            (["--timeout", "0"], "--timeout: expected a positive number of seconds"),
            (["--stream-keepalive", "0"], "--stream-keepalive: expected a positive number of seconds"),
            (["--grace", "-1"], "--grace: expected a finite number of seconds >= 0"),
            (["--max-n", "0"], "--max-n: expected a positive integer"),
            (
                ["--max-tokens", "0"],
                "--max-tokens: expected a positive integer (or leave it out: the policy's)",
            ),
        ]:
            with pytest.raises(ValueError) as cli_refused:
                Settings.from_args(parser.parse_args(arguments))
            assert str(cli_refused.value) == message
    finally:
        engine.close()


CANNOT_DECODE = f"""
from tiltsmc.models import OnnxCausalLM, OnnxRewardModel

class CannotDecode(OnnxCausalLM):
    def decode(self, ids):
        raise UnicodeDecodeError("utf-8", b"\\xff", 0, 1, "invalid start byte")

policy = CannotDecode({str(FIXTURES / "gpt2-tiny")!r}, max_new_tokens=4)
reward = OnnxRewardModel({str(FIXTURES / "prm-tiny")!r}, kind="logit")
"""


# The texts decode, but the tokenizer's decode of a whole trajectory, which the answer's finish_reason reads
# where the policy has stop strings, raises.
CANNOT_DECODE_FOR_THE_FINISH_REASON = f"""
from tiltsmc.models import OnnxCausalLM, OnnxRewardModel

class Undecodable:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def decode(self, ids):
        raise UnicodeDecodeError("utf-8", b"\\xff", 0, 1, "invalid start byte")

class DecodesItsTexts(OnnxCausalLM):
    def decode(self, ids):
        return self.tokenizer.tokenizer.decode(ids)

policy = DecodesItsTexts({str(FIXTURES / "gpt2-tiny")!r}, max_new_tokens=4, stop=["zzz"])
policy.tokenizer = Undecodable(policy.tokenizer)
reward = OnnxRewardModel({str(FIXTURES / "prm-tiny")!r}, kind="logit")
"""


@pytest.mark.parametrize(
    "models", [CANNOT_DECODE, CANNOT_DECODE_FOR_THE_FINISH_REASON], ids=["texts", "finish"]
)
def test_a_policy_that_cannot_decode_its_tokens_is_the_servers_failure(tmp_path: Path, models: str) -> None:
    """The policy's decode raising UnicodeDecodeError (a ValueError) for the texts of a finished request,
    or for the finish reason of its answer, is the server's failure, a 500 ``server_error`` (a stream's last
    event), not a 400 blaming the request, logged as ``failed`` (the finish reason's: Starlette's plain
    500, or a cut stream, logged as ``completed``)."""
    failing = Server(tmp_path, script=_serving_script(models))
    try:
        for stream in (False, True):
            answer = failing.post({"prompt": "ab", "particles": 2, "seed": 1, "stream": stream})
            if stream:
                error = _stream_error(answer)
            else:
                assert answer.status_code == 500, answer.text
                error = answer.json()["error"]
            assert error["type"] == "server_error" and "UnicodeDecodeError" in error["message"], error
        lines = _completion_lines(failing, 2)
        assert [(line["status"], line["outcome"]) for line in lines] == [(500, "failed"), (200, "failed")]
    finally:
        failing.stop()


@contextlib.contextmanager
def _in_process(
    chat: bool = False, **settings: Any
) -> Iterator[tuple[Any, OnnxCausalLM, OnnxRewardModel, Any]]:
    """The app of ``Settings(**settings)`` in this process (FastAPI's ``TestClient``, its lifespan run: the
    engine closed at the end), serving the fixture's models as ``server`` does (``chat``: with its chat
    template); the client, the models and the engine."""
    from fastapi.testclient import TestClient
    from tiltsmc.serving.server import Settings

    template = CHAT_TEMPLATE.read_text() if chat else None
    policy = OnnxCausalLM(FIXTURES / "gpt2-tiny", max_new_tokens=6, chat_template=template)
    reward = OnnxRewardModel(FIXTURES / "prm-tiny", kind="logit")
    configured = Settings(**settings)
    engine = configured.engine(policy, reward)
    with TestClient(configured.app(engine)) as client:
        yield client, policy, reward, engine


def test_mh_with_several_particles_is_held_to_the_limit_on_the_rows_it_runs() -> None:
    """``--max-request-particles 8``: a request is held to the limit on the option that sets the rows it
    would run (the engine's ``_rows_option``): MH with particles >= 2 runs SMC proposals, whose pool is not
    used, so its default pool of 16 is not counted (every PIMH request was refused, blaming a pool_size
    the client could not even send); MH with one particle is held to its pool, the other samplers to
    their own counts, sent or at their defaults."""
    from tiltsmc.serving.server import Limits

    with _in_process(limits=Limits(max_particles=8)) as (client, policy, reward, _):
        pimh = {"prompt": "ab", "sampler": "mh", "particles": 2, "mh_steps": 1, "seed": 3}
        answer = client.post("/v1/completions", json=pimh)
        assert answer.status_code == 200, answer.text
        offline = tiltsmc.mh(policy, reward, ["ab"], num_particles=2, steps=1, rng=3)
        assert answer.json()["tiltsmc"]["choices"][0]["log_z"] == offline.to_dict()["log_z"][0]
        assert client.post("/v1/completions", json={**pimh, "particles": 8}).status_code == 200
        refused = [
            ({**pimh, "particles": 9}, "particles", 9),
            ({"prompt": "ab", "sampler": "mh", "mh_steps": 1}, "pool_size", 16),  # one particle: its pool
            ({"prompt": "ab", "sampler": "sp_gsmc"}, "pool_size", 16),
            ({"prompt": "ab"}, "particles", 64),
            ({"prompt": "ab", "sampler": "best_of_n"}, "particles", 16),
            ({"prompt": "ab", "sampler": "rejection"}, "particles", 256),
        ]
        for body, param, count in refused:
            response = client.post("/v1/completions", json=body)
            error = response.json()["error"]
            assert response.status_code == 400, response.text
            assert (error["param"], error["message"]) == (
                param,
                f"{param}: {count} particles, more than this server's 8",
            )
        one = {"prompt": "ab", "sampler": "mh", "mh_steps": 1, "pool_size": 8, "seed": 0}
        assert client.post("/v1/completions", json=one).status_code == 200


def test_nan_and_infinity_are_refused_as_not_numbers_of_the_fields_range() -> None:
    """A NaN ``ess_threshold`` was refused as "Input should be less than or equal to 1"; NaN and infinity
    are named as such, with the range the field takes. (A pydantic whose JSON parser takes no ``NaN`` token,
    2.0 at the lowest versions, refuses the body as invalid JSON instead: a 400 all the same.)"""
    import pydantic

    try:
        pydantic.TypeAdapter(float).validate_json("NaN")
    except pydantic.ValidationError:
        parses_nan = False
    else:
        parses_nan = True
    with _in_process() as (client, *_):
        cases = [
            ({"ess_threshold": float("nan")}, "ess_threshold: expected a number in [0, 1], got NaN"),
            ({"ess_threshold": float("inf")}, "ess_threshold: expected a number in [0, 1], got Infinity"),
            (
                {"sampler": "rejection", "bound": float("nan")},
                "bound: expected a finite number > 0 (a bound C >= sup r on the reward), got NaN",
            ),
        ]
        for fields, message in cases:
            body = json.dumps({"prompt": "ab", "particles": 2, **fields})  # NaN as Python's JSON writes it
            response = client.post(
                "/v1/completions", content=body, headers={"Content-Type": "application/json"}
            )
            assert response.status_code == 400, response.text
            if not parses_nan:
                assert response.json()["error"]["message"].startswith("Invalid JSON"), response.text
                continue
            assert response.json()["error"]["message"] == message
            assert response.json()["error"]["param"] == message.partition(":")[0]


def test_chat_text_parts_are_the_same_prompt_through_the_api_and_the_server() -> None:
    """OpenAI's text parts (``[{"type": "text", "text": ...}]``) are one prompt whichever front end takes
    them: the server joined them, the API (``Engine.submit``, ``tiltsmc.smc``) rendered the list's Python
    repr, a different prompt. Now one check joins them for all (``models.chat.check_messages``): the same
    tokens, and with the same seed the same run."""
    pytest.importorskip("jinja2")
    parts = [{"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}]
    plain = [{"role": "user", "content": "hello"}]
    with _in_process(chat=True) as (client, policy, reward, engine):
        assert list(policy.encode_prompt(parts)) == list(policy.encode_prompt(plain))
        request = {"messages": parts, "particles": 4, "seed": 5}
        answer = client.post("/v1/chat/completions", json=request)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["prompt_tokens"] == len(policy.encode_prompt(parts))
        offline = tiltsmc.smc(policy, reward, [parts], num_particles=4, rng=5)
        assert answer.json()["tiltsmc"]["choices"][0]["log_z"] == offline.to_dict()["log_z"][0]
        submitted = engine.submit(parts, num_particles=4, rng=5).result(60)
        assert submitted.to_dict()["log_z"] == offline.to_dict()["log_z"]
