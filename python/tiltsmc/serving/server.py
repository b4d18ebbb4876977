"""``tiltsmc serve``: the engine behind an OpenAI-compatible HTTP API (FastAPI on uvicorn; ``serve`` extra).

``POST /v1/chat/completions`` takes the OpenAI chat request (``messages``, rendered by the policy's chat
template into one prompt; ``max_completion_tokens`` or ``max_tokens``; the other fields as below) and
answers each choice as an assistant ``message``. ``POST /v1/completions`` takes the OpenAI completions
request (``model``, ``prompt`` as a string or a list, ``max_tokens``, ``n``, ``seed``, ``stream``;
``stop`` and OpenAI's sampling fields only at the values that leave the served law as it is, see
``NEUTRAL_FIELDS``: the policy's own stop strings, temperature and top-p) plus tiltsmc's fields
(``sampler``, ``particles``, ``ess_threshold``, ``resample``, ``proposal``, ``pool_size`` (a count, or
``"exact"``), ``mh_steps``, ``bound``), and answers in the OpenAI shape (``choices`` with ``text`` and
``finish_reason``, ``usage``) with one ``tiltsmc`` object: the sampler, and per choice (its ``index``,
``prompt_index`` and ``sample_index``) the log Z estimate, the normalised weights, the ESS trace, the
compute. Each choice is one request to the engine, seeded ``seed + i`` for
the ``i``-th choice (prompt-major), so ``seed = s`` for one prompt and one choice gives the result of
``tiltsmc.smc(..., rng=s)``; an SMC choice's text is one particle drawn by weight from its final
weighted particles. With ``stream: true`` the same answer comes as server-sent events, one chunk per
choice once every choice is done (an SMC answer is known only at the end: until the last step,
resampling may replace any particle), then ``data: [DONE]``; until then, a ``: keep-alive`` comment line
every ``STREAM_KEEPALIVE`` seconds. A streamed request is checked and admitted before its status is sent
(a 400 or 429 as without ``stream``); one that fails later ends its stream with OpenAI's error object.
``GET /v1/models`` lists the one model served. ``GET /health`` answers 200 while the engine takes
requests (503 closing, or failed); ``GET /metrics`` is the Prometheus text format. A choice's
``finish_reason`` is ``stop`` where it ended at the policy's EOS or one of its stop strings, else
``length``.

A request is held to the server's ``Limits`` (``tiltsmc serve --max-*``), a field it leaves out at the
default that would run: ``max_tokens`` (``max_completion_tokens``) left out is the policy's
``max_new_tokens`` and ``mh_steps`` MH's default, each lowered to the server's limit where past it (a
request that asks for more is refused).

Bad requests get a 400 whose ``error.param`` names the field (fields typed strictly: ``"2"`` or ``true``
is not a number), as do the engine's refusals and a request's own failures once admitted, named by the
request's fields (``particles``, ``prompt[k]``); a body sent as another type than JSON (``Content-Type``
other than ``application/json``, any charset, or a ``+json`` type; none is read as JSON) a 415; a body
not received ``--body-timeout`` seconds after its headers a 408 (``"code": "body_timeout"``);
a full queue a 429 with ``Retry-After``;
a request past its timeout a 504 (or its stream's last event: at most ``TIMEOUT_MARGIN`` seconds late,
inside a model call that overruns); a request the server cannot take or finish because it is closing a
503 with ``"code": "closed"`` (or its stream's last event); a request that fails for none of these
reasons, the server's own (a model call that raised for it alone, whatever the error's type, memory), a
500 of type ``server_error`` naming the error, logged with its traceback; with ``--api-key-env VAR``,
``/v1/*`` and ``/metrics`` need ``Authorization: Bearer <key>`` (401 otherwise). One JSON log line per
request (logger ``tiltsmc.server``), with the request's id (``X-Request-ID``, taken from the client or made
here) and, for a completion request, its outcome (``OUTCOMES``), as the ``tiltsmc_request_seconds``
histogram counts it.

On SIGTERM (``serve``) the server stops taking connections and the engine's drain begins at once: the
requests queued and in flight have the grace period (``--grace``) to finish; those it leaves unfinished
get the 503 ``closed`` (a stream its error event), at most ``TIMEOUT_MARGIN`` seconds past it even inside
a model call that overruns, before uvicorn's own wait (``SEND_MARGIN`` longer) would cut them.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations as objects, and
# the request model and Request are defined or imported inside create_app (the serve extra is optional).
import argparse
import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import inspect
import json
import logging
import math
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Callable, Literal, Optional, Union

import numpy as np

from .. import core
from .._options import real_option
from ..models._config import real_number
from ..samplers._engine import Models
from ..samplers.correction import options_not_read
from ..samplers.result import Compute, SamplerResult, plain, prompt_error_parts
from ..samplers.sequential import EXACT_FORM, OPTIMAL_FORM_NEEDS, PROPOSALS, optimal_form_option
from .engine import (
    ADAPTIVE_ROWS,
    MAX_BATCH_ROWS,
    MAX_CACHE_BYTES,
    MAX_QUEUE,
    MAX_WORKERS,
    RELEASE_MEMORY_AFTER,
    SAMPLERS,
    WORKERS,
    Engine,
    EngineClosed,
    Overloaded,
    _rows_option,
    sampler_defaults,
)

if TYPE_CHECKING:
    from fastapi.responses import JSONResponse

__all__ = ["ApiKeyDigest", "Limits", "Settings", "add_arguments", "create_app", "serve"]

logger = logging.getLogger("tiltsmc.server")

# The settings' defaults, for ``create_app``, ``Settings`` and ``tiltsmc serve`` alike (one set): the model
# name clients send, the seconds a request may take, and the seconds a closing server lets the requests in
# flight finish, which are the engine's own for ``Engine.close`` (read from its signature).
MODEL_NAME = "tiltsmc"
TIMEOUT = 60.0
GRACE: float = inspect.signature(Engine.close).parameters["timeout"].default
# The sampler a request that names none runs: the engine's (``Engine.submit``), the CLI's too.
DEFAULT_SAMPLER: str = inspect.signature(Engine.submit).parameters["sampler"].default

# tiltsmc's request fields, as the options of each sampler they set
SAMPLER_FIELDS: dict[str, dict[str, str]] = {
    "smc": {
        "particles": "num_particles",
        "ess_threshold": "ess_threshold",
        "resample": "resample",
        "proposal": "proposal",
    },
    "sp_gsmc": {"pool_size": "pool_size"},
    "mh": {
        "particles": "num_particles",
        "pool_size": "pool_size",
        "mh_steps": "steps",
        "ess_threshold": "ess_threshold",
        "resample": "resample",
    },
    "best_of_n": {"particles": "n"},
    "rejection": {"bound": "bound", "particles": "batch_size"},
}
# The choices of the request's fields, as the tuples the samplers check against (one list each); pydantic
# reads the Literal types at run time, mypy the strings they are.
if TYPE_CHECKING:
    SamplerName = str
    ResampleScheme = str
    ProposalName = str
    ExactForm = str
else:
    SamplerName = Literal[tuple(SAMPLERS)]
    ResampleScheme = Literal[core.SCHEMES]
    ProposalName = Literal[PROPOSALS]
    ExactForm = Literal[EXACT_FORM]
# The request fields of several types, as a refusal describes them
UNION_FIELDS = {
    "prompt": "a string or a non-empty list of strings (token ids are not taken: send text)",
    "stop": "a string or a list of strings",
    "content": 'a string, a list of text parts ({"type": "text", "text": ...}) or null (an assistant\'s)',
    "pool_size": f'an integer >= 1 or "{EXACT_FORM}" (each token drawn from the optimal proposal, '
    "with no pool)",
}
# The request's number fields, as a refusal of NaN or infinity describes them
NUMBER_FIELDS = {
    "ess_threshold": "a number in [0, 1]",
    "bound": "a finite number > 0 (a bound C >= sup r on the reward)",
}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

# Seconds a closing server waits past its grace period for a step still in progress (a model call cannot
# be cut short) before it exits without it.
SHUTDOWN_WAIT = 10.0

# Seconds that uvicorn's graceful shutdown (``serve``) waits for the handlers past the grace period and
# ``TIMEOUT_MARGIN``, by when the server has answered every request it could not finish: time for those
# answers to go out before uvicorn cancels what still runs (its plain-text 500, a stream cut short).
SEND_MARGIN = 2.0

# Seconds a client has to send a request's body once its headers are in (``--body-timeout``), then a 408:
# a body sent slowly (a byte at a time) held its connection and handler for as long as it liked; the
# largest body (``Limits.max_body_bytes``, 8 MiB) needs a client sending a few hundred kB/s.
BODY_TIMEOUT = 30.0

# Connections beyond what the engine can hold that ``serve`` lets uvicorn serve at once (its
# ``limit_concurrency``: ``max_queue + max_batch_rows + CONNECTION_HEADROOM``): room for ``/health``,
# ``/metrics``, ``/v1/models``, the requests being refused and clients' idle keep-alive connections.
CONNECTION_HEADROOM = 64

# Seconds between the comment lines (``: keep-alive``) a stream sends while its answer is computed: proxies
# and load balancers close a connection idle for 30 - 60 s by default, and an SMC answer comes whole at
# the end.
STREAM_KEEPALIVE = 15.0

# Seconds past a request's timeout that its answer waits for the engine, which checks the timeout between
# its steps, before the server answers the 504 itself (a model call that overruns cannot be cut short: its
# requests are cancelled, their rows freed once it returns).
TIMEOUT_MARGIN = 1.0

# A completion request's outcomes, by what its client was sent (a stream's by its last event): its log
# line's ``outcome`` and the ``tiltsmc_request_seconds`` histogram's label.
OUTCOMES = {
    "completed": "answered (200)",
    "refused": "the request's own fault, a 4xx other than 429: a bad or out-of-limit field, a prompt that "
    "failed once admitted, an unknown model, no API key, a body too large, not JSON or not sent in time "
    "(408)",
    "rejected": "the queue full (429)",
    "timed_out": "past its timeout (504)",
    "closed": "the server closing (503)",
    "cancelled": "the client left before its answer",
    "failed": "the server's own failure (500)",
}
_LAW = "the law the reward tilts is the policy's, set when the server starts"
# OpenAI's fields that would change the law sampled or ask for what this server does not return: each is
# taken at the value that changes nothing (what clients send by default) and refused otherwise, with the
# reason. Per field: whether a value is neutral (given the request and the served policy), and why not.
NEUTRAL_FIELDS: dict[str, tuple[Callable[[Any, Any, Any], bool], Callable[[Any], str]]] = {
    "temperature": (
        lambda value, body, policy: value == _policy_temperature(policy),
        lambda policy: (
            f"this server's policy samples at temperature {_policy_temperature(policy):g} "
            f"(tiltsmc serve --temperature); {_LAW}"
        ),
    ),
    "top_p": (
        lambda value, body, policy: value == _policy_top_p(policy),
        lambda policy: (
            f"this server's policy samples with top_p {_policy_top_p(policy):g} "
            f"(tiltsmc serve --top-p); {_LAW}"
        ),
    ),
    "stop": (
        lambda value, body, policy: _stop_set(value) == set(getattr(policy, "stop", ())),
        lambda policy: f"{_policy_stops(policy)}; {_LAW}",
    ),
    "frequency_penalty": (lambda value, body, policy: value == 0, lambda policy: f"only 0: {_LAW}"),
    "presence_penalty": (lambda value, body, policy: value == 0, lambda policy: f"only 0: {_LAW}"),
    "logit_bias": (lambda value, body, policy: not value, lambda policy: f"only empty: {_LAW}"),
    "logprobs": (
        lambda value, body, policy: value is False,
        lambda policy: "log-probabilities are not returned (the tiltsmc object has each choice's weights)",
    ),
    "top_logprobs": (
        lambda value, body, policy: value == 0,
        lambda policy: "log-probabilities are not returned (the tiltsmc object has each choice's weights)",
    ),
    "echo": (lambda value, body, policy: value is False, lambda policy: "the prompt is not echoed"),
    "suffix": (lambda value, body, policy: value == "", lambda policy: "insertion is not supported"),
    "best_of": (
        lambda value, body, policy: value == body.n,
        lambda policy: "only equal to n; for the best of several draws by reward, sampler: best_of_n",
    ),
    "response_format": (
        lambda value, body, policy: value == {"type": "text"},
        lambda policy: 'only {"type": "text"}: the answer is the policy\'s text',
    ),
}


def _stop_set(stop: Union[str, list[str]]) -> set[str]:
    return {stop} if isinstance(stop, str) and stop else {text for text in stop if text}


def _policy_stops(policy: Any) -> str:
    stops = list(getattr(policy, "stop", ()))
    if not stops:
        return "this server's policy has no stop strings (tiltsmc serve --stop): it ends at its EOS"
    return f"this server's policy stops at {stops!r} (tiltsmc serve --stop), else at its EOS"


def _policy_temperature(policy: Any) -> float:
    return float(getattr(policy, "temperature", 1.0))


def _policy_top_p(policy: Any) -> float:
    top_p = getattr(policy, "top_p", None)
    return 1.0 if top_p is None else float(top_p)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: prompt tokens, particles (any sampler's particle count, pool or
    ``n``), new tokens, choices per prompt, MH steps (each a further SMC or SP-gSMC run), prompts per
    request and the bytes of its body. A request that leaves a field out counts at the default that would
    run: its sampler's particle count (refused past ``max_particles``); the policy's ``max_new_tokens``
    and MH's default steps, each lowered to ``max_tokens`` or ``max_mh_steps`` where past it. Each field
    is a positive integer (``max_tokens`` None too): TypeError / ValueError naming it."""

    max_prompt_tokens: int = 4096
    max_particles: int = 256
    max_tokens: Optional[int] = None  # None: the policy's max_new_tokens
    max_n: int = 16
    max_mh_steps: int = 64
    max_prompts: int = 64
    # 64 prompts of 4096 tokens, even written as JSON's \uXXXX escapes, take well under this
    max_body_bytes: int = 8 << 20

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            name, value = field.name, getattr(self, field.name)
            if name == "max_tokens" and value is None:
                continue
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name}: expected a positive integer, got {value!r}")
            if value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")


class ClientGone(Exception):
    """The client disconnected before its answer was ready: its requests were cancelled."""


class RequestError(ValueError):
    """A request the server refuses: ``param`` names the field; ``headers`` go with the answer."""

    def __init__(
        self,
        param: Optional[str],
        message: str,
        status: int = 400,
        code: Optional[str] = None,
        headers: Optional[dict[str, str]] = None,
    ) -> None:
        super().__init__(message)
        self.param, self.status, self.code, self.headers = param, status, code, headers


def _error(
    status: int, message: str, kind: str, code: Optional[str] = None, headers: Optional[dict[str, str]] = None
) -> "JSONResponse":
    from fastapi.responses import JSONResponse

    return JSONResponse(_error_body(message, kind, None, code), status_code=status, headers=headers)


def _error_body(
    message: str, kind: str, param: Optional[str] = None, code: Optional[str] = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class ApiKeyDigest:
    """An API key kept as its SHA-256 digest only: a request is let in where the digest of its bearer
    token equals ``sha256`` (compared in constant time). What a replica on Ray Serve is handed in place of
    the key (``build_application``): Ray stores a deployment's arguments with the application, where
    whoever can reach the cluster can read them. A key is a secret of high entropy (a password would want
    a slow hash), so one SHA-256 is enough to keep it from being read back."""

    sha256: bytes = dataclasses.field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.sha256, bytes) or len(self.sha256) != hashlib.sha256().digest_size:
            raise ValueError("sha256: expected the 32 bytes of an API key's SHA-256 digest")

    @classmethod
    def of(cls, key: str, name: str = "api_key") -> "ApiKeyDigest":
        """The digest of ``key``, checked as an API key (``_check_api_key``; ValueError naming ``name``)."""
        if not key:
            raise ValueError(f"{name}: expected a non-empty key, or None for none")
        _check_api_key(key, name)
        return cls(hashlib.sha256(key.encode("ascii")).digest())

    def admits(self, token: str) -> bool:
        """Whether ``token`` (an ``Authorization: Bearer`` header's) is the key."""
        return hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self.sha256)


def _check_api_key(key: str, name: str) -> None:
    """An API key must be visible ASCII (``!`` to ``~``): it comes in an HTTP header, whose bytes clients
    send as ASCII (a non-ASCII key cannot be sent by most, and others encode it differently), and a
    space or a control character would not survive the header's parsing. ValueError naming ``name``."""
    if not all("!" <= character <= "~" for character in key):
        raise ValueError(
            f"{name}: an API key must be visible ASCII characters only (no spaces, control or non-ASCII "
            f"characters): it is sent in the Authorization header"
        )


def _missing_serve_extra(what: str) -> str:
    """The message of an ImportError where ``what`` (``tiltsmc serve``, ``create_app``) finds no serve
    extra installed: the install command, as ``tiltsmc serve`` says it."""
    return f"{what} needs the serve extra: pip install 'tiltsmc[serve,cpu]' (or serve,gpu)"


def require_serve_extra(what: str = "serve") -> None:
    """ImportError naming the serve extra (``_missing_serve_extra``) where one of its packages cannot be
    imported: checked before the models load, so a server that cannot start loads nothing."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import pydantic  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ImportError(_missing_serve_extra(what)) from None


def create_app(
    engine: Engine,
    *,
    model_name: str = MODEL_NAME,
    api_key: Union[str, ApiKeyDigest, None] = None,
    limits: Limits = Limits(),
    timeout: Optional[float] = TIMEOUT,
    close_timeout: float = GRACE,
    instance: Optional[str] = None,
    stream_keepalive: float = STREAM_KEEPALIVE,
    body_timeout: float = BODY_TIMEOUT,
) -> Any:
    """A FastAPI app serving ``engine`` (see the module docstring). On shutdown (its lifespan's end) it
    closes the engine, finishing what is in flight for up to ``close_timeout`` seconds, and waits
    ``SHUTDOWN_WAIT`` seconds more at most for a step still in progress (then logs it and lets the shutdown
    go on); a server that waits for its handlers before the lifespan ends begins that drain itself as its
    shutdown begins (``app.state.drain``, a ``_Drain``: ``serve`` does), so that the requests left
    unfinished are answered as the server closing (503) before it gives up on them. ``instance``
    (a replica's name, where several serve one endpoint) is sent in every answer's
    ``X-Tiltsmc-Instance`` header and in the ``tiltsmc_instance_info`` metric. A stream sends a comment
    line every ``stream_keepalive`` seconds until its answer is ready. A completion request's body must be
    in ``body_timeout`` seconds after its headers (``inf``: no limit), else a 408 (``_read_body``; once the
    server is closing, at the drain's deadline, the 503 ``closed``). Without the serve extra (FastAPI and
    the rest), an ImportError that says how to install it."""
    try:
        from fastapi import Depends, FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse, Response, StreamingResponse
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, Info, generate_latest
        from pydantic import BaseModel, ConfigDict, Field, ValidationError
        from starlette.exceptions import HTTPException as StarletteHTTPException
        from starlette.requests import ClientDisconnect
    except ImportError:
        raise ImportError(_missing_serve_extra("create_app")) from None

    _check_app_settings(api_key, limits, timeout, stream_keepalive, body_timeout)
    _check_grace(close_timeout, "close_timeout", finite=False)
    policy = engine.policy
    policy_limit = _policy_token_limit(policy)
    if limits.max_tokens is not None and not 1 <= limits.max_tokens <= policy_limit:
        raise ValueError(
            f"max_tokens: {limits.max_tokens} is not from 1 to the policy's max_new_tokens, {policy_limit} "
            f"(tiltsmc serve --max-tokens, --max-new-tokens)"
        )
    max_tokens_limit = limits.max_tokens or policy_limit
    longest_token = _longest_token(policy)
    # a tokenizer without a chat template fails every chat prompt (the CLI's chat prompts are refused so)
    chat_template = getattr(getattr(policy, "tokenizer", None), "chat_template", "") is not None
    optimal_proposal = Models(policy, engine.reward, Compute()).supports_optimal_proposal()

    # strict: a field of the wrong JSON type is refused (lax pydantic would read "2" or true as a number)
    class StreamOptions(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

        include_usage: bool = False

    class SamplingFields(BaseModel):
        """The fields /v1/completions and /v1/chat/completions share: OpenAI's and tiltsmc's."""

        model_config = ConfigDict(extra="forbid", strict=True)

        model: Optional[str] = None
        max_tokens: Optional[int] = Field(default=None, ge=1)
        n: int = Field(default=1, ge=1)
        seed: Optional[int] = Field(default=None, ge=0, lt=2**63)
        stop: Optional[Union[str, list[str]]] = None
        stream: bool = False
        stream_options: Optional[StreamOptions] = None
        user: Optional[str] = None
        temperature: Optional[float] = None
        top_p: Optional[float] = None
        frequency_penalty: Optional[float] = None
        presence_penalty: Optional[float] = None
        logit_bias: Optional[dict[str, float]] = None
        sampler: SamplerName = DEFAULT_SAMPLER
        particles: Optional[int] = Field(default=None, ge=1)
        # NaN and infinity refused as such (NUMBER_FIELDS), not as out of the range
        ess_threshold: Optional[float] = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
        resample: Optional[ResampleScheme] = None
        pool_size: Optional[Union[Annotated[int, Field(ge=1)], ExactForm]] = None
        proposal: Optional[ProposalName] = None
        mh_steps: Optional[int] = Field(default=None, ge=0)
        bound: Optional[float] = Field(default=None, gt=0.0, allow_inf_nan=False)

    class CompletionRequest(SamplingFields):
        prompt: Union[str, list[str]]
        logprobs: Optional[int] = None
        echo: Optional[bool] = None
        suffix: Optional[str] = None
        best_of: Optional[int] = None

    class ContentPart(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

        type: Literal["text"]
        text: str

    class ChatMessage(BaseModel):
        model_config = ConfigDict(extra="allow", strict=True)  # name, tool calls...: to the chat template

        role: str
        content: Union[str, list[ContentPart], None]

    class ChatCompletionRequest(SamplingFields):
        messages: list[ChatMessage] = Field(min_length=1)
        max_completion_tokens: Optional[int] = Field(default=None, ge=1)
        logprobs: Optional[bool] = None
        top_logprobs: Optional[int] = None
        response_format: Optional[dict[str, Any]] = None

    registry = CollectorRegistry()
    latency = Histogram(
        "tiltsmc_request_seconds",
        "Latency of completion requests (seconds), by outcome: "
        + "; ".join(f"{outcome}, {meaning}" for outcome, meaning in OUTCOMES.items()),
        ["outcome"],
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        registry=registry,
    )
    registry.register(_EngineCollector(engine))
    if instance is not None:
        Info("tiltsmc_instance", "The instance (replica) serving", registry=registry).info(
            {"instance": instance}
        )

    drain = _Drain(engine, close_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        if not await drain.finished():  # begun here unless the server began it as its shutdown began
            _log_stuck_step(close_timeout)

    # redirect_slashes off: a path with a trailing slash (/v1/completions/) is the JSON 404 (Starlette
    # answered a 307 built from the Host header, with an empty body, before the API key was checked)
    app = FastAPI(
        title="tiltsmc",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        redirect_slashes=False,
    )
    app.state.drain = drain

    key = api_key if not isinstance(api_key, str) else ApiKeyDigest.of(api_key)

    async def authorised(request: Request) -> None:
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not key.admits(token.strip()):
            raise RequestError(
                None, "a valid API key is needed: Authorization: Bearer <key>", 401, "invalid_api_key"
            )

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> JSONResponse:
        kind = "authentication_error" if error.status == 401 else "invalid_request_error"
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else error.headers
        return JSONResponse(
            _error_body(str(error), kind, error.param, error.code), status_code=error.status, headers=headers
        )

    @app.exception_handler(EngineClosed)
    async def closing(request: Request, error: EngineClosed) -> JSONResponse:
        # a body still coming at the drain's deadline (``_read_body``): the server closing
        request.state.detail["outcome"] = "closed"
        return _error(503, str(error), "unavailable_error", "closed", {"Connection": "close"})

    @app.exception_handler(ClientGone)
    async def gone(request: Request, error: ClientGone) -> JSONResponse:
        request.state.detail["outcome"] = "cancelled"
        return _error(499, "the client closed the request", "cancelled_error", "cancelled")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals (an unknown path, a body it cannot parse, one too large) in OpenAI's shape
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        code = "request_too_large" if error.status_code == 413 else None
        return JSONResponse(
            _error_body(str(error.detail), kind, None, code),
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        location = [str(part) for part in first.get("loc", ())]
        # the body's own element, which FastAPI's locations and ``validated``'s start with (a field may be
        # named "body" too)
        if location[:1] == ["body"]:
            location = location[1:]
        param = location[0] if location else None
        problem = first.get("msg", "invalid")
        if first.get("type") == "extra_forbidden":
            problem = "not a field of this API"
        if first.get("type") == "finite_number" and location == [param] and param in NUMBER_FIELDS:
            problem = f"expected {NUMBER_FIELDS[param]}, got {json.dumps(first.get('input'))}"  # NaN
        for k, part in enumerate(location[:-1]):
            # a field of several types that none took: pydantic names the first type tried after it
            # ("prompt.str"), which misleads; the field and the types it takes instead
            if part in UNION_FIELDS and not location[k + 1].isdigit():
                location, problem = location[: k + 1], f"expected {UNION_FIELDS[part]}"
                break
        where = ".".join(location)
        message = f"{where}: {problem}" if where else str(problem)
        return JSONResponse(_error_body(message, "invalid_request_error", param), status_code=400)

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: probes that read the status alone
    async def health() -> JSONResponse:
        stats = engine.stats()
        if stats["failed"] is not None:  # a worker's own error: every request fails (and is logged)
            return JSONResponse({"status": "failed", "error": stats["failed"]}, status_code=503)
        if stats["closed"]:
            return JSONResponse({"status": "closing"}, status_code=503)
        return JSONResponse({"status": "ok", "model": model_name})

    @app.get("/metrics", dependencies=[Depends(authorised)])
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "tiltsmc"}

    @app.get("/v1/models", dependencies=[Depends(authorised)])
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorised)])
    async def model(model_id: str) -> JSONResponse:
        if model_id != model_name:
            raise RequestError(
                "model", f"model: this server serves {model_name!r}, not {model_id!r}", 404, "model_not_found"
            )
        return JSONResponse(card)

    async def validated(request: Request, model: Any) -> Any:
        """The request's body as ``model``, once the key is checked (as FastAPI runs the dependencies before
        it reads the body). The completion routes are Starlette's own: pydantic reads the JSON bytes itself,
        where FastAPI's route would parse them in Python and then validate them through its dependency
        machinery, at a cost in the event loop's time that every request paid."""
        await authorised(request)
        _check_content_type(request.headers.get("content-type"), request.headers.get("content-encoding"))
        try:
            raw = await _read_body(request, body_timeout, drain)
        except ClientDisconnect:  # it left while sending its body: nobody to answer
            raise ClientGone from None
        try:
            return model.model_validate_json(raw)
        except ValidationError as error:  # answered as FastAPI's own refusals are (``invalid``)
            errors = [{**e, "loc": ("body", *e["loc"])} for e in error.errors(include_url=False)]
            raise RequestValidationError(errors) from None

    async def completions(request: Request) -> Response:
        body: CompletionRequest = await validated(request, CompletionRequest)
        prompts: list[Any] = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            request.state.detail.update(sampler=body.sampler, prompts=0, n=body.n, outcome="refused")
            raise RequestError("prompt", "prompt: expected a string or a non-empty list of strings")
        return await answer(body, request, prompts, chat=False)

    async def chat_completions(request: Request) -> Response:
        body: ChatCompletionRequest = await validated(request, ChatCompletionRequest)
        if not chat_template:
            request.state.detail.update(sampler=body.sampler, prompts=1, n=body.n, outcome="refused")
            raise RequestError(
                "messages",
                "messages: this server has no chat template (its policy's tokenizer has none): it takes chat "
                "requests once started with one, tiltsmc serve --chat-template FILE; send text prompts to "
                "/v1/completions",
            )
        if body.max_completion_tokens is not None:
            if body.max_tokens is not None and body.max_tokens != body.max_completion_tokens:
                request.state.detail.update(sampler=body.sampler, prompts=1, n=body.n, outcome="refused")
                raise RequestError(
                    "max_completion_tokens", "max_completion_tokens: differs from max_tokens; give one"
                )
            body.max_tokens = body.max_completion_tokens
        return await answer(body, request, [_chat_messages(body.messages)], chat=True)

    app.add_route("/v1/completions", completions, methods=["POST"])
    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])

    async def answer(body: Any, request: Request, prompts: list[Any], chat: bool) -> Response:
        request_id: str = request.state.request_id
        detail = request.state.detail
        detail.update(sampler=body.sampler, prompts=len(prompts), n=body.n, outcome="failed")
        futures: list[Any] = []
        try:
            options = _options(
                body, prompts, limits, max_tokens_limit, model_name, policy, engine.max_queue, chat,
                optimal_proposal,
            )  # fmt: skip
            param = "messages" if chat else "prompt"
            prompt_tokens, futures = await _submitted(
                lambda: (
                    _prompt_tokens(
                        policy, prompts, limits, param, longest_token, options.get("max_new_tokens")
                    ),
                    _submit(engine, prompts, body, options, timeout, chat),
                )
            )
            if body.stream:  # admitted: the answer streams from here on, kept alive while it is computed
                return StreamingResponse(
                    stream(body, request, futures, len(prompts), prompt_tokens, chat),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache"},
                )
            choices = await _collect(request, futures, body, timeout, drain)
            # in the try: the answer's finish reasons decode tokens, which may fail as its texts may
            answered = _response(
                request_id, model_name, body.sampler, len(prompts), prompt_tokens, choices, policy, chat
            )
        except RequestError:
            detail["outcome"] = "refused"
            raise
        except Overloaded as error:
            detail["outcome"] = "rejected"
            return _error(429, f"overloaded: {error}", "overloaded_error", "overloaded", {"Retry-After": "1"})
        except ClientGone:
            detail["outcome"] = "cancelled"
            return _error(499, "the client closed the request", "cancelled_error", "cancelled")
        except asyncio.CancelledError:
            detail["outcome"] = "cancelled"
            raise
        except Exception as error:
            failure = _failure(error, futures, body, chat)
            if failure is None:  # the server's own failure (a model call that raised for it, memory)
                detail["outcome"] = "failed"
                return JSONResponse(_server_error(error, request_id), status_code=500)
            detail["outcome"], status, error_body = failure
            return JSONResponse(error_body, status_code=status)
        detail["outcome"] = "completed"
        return JSONResponse(answered)

    async def stream(
        body: Any, request: Request, futures: list[Any], num_prompts: int, prompt_tokens: int, chat: bool
    ) -> AsyncIterator[str]:
        """A streamed answer: ``: keep-alive`` comment lines while the engine works, then the answer's
        chunks and ``data: [DONE]``; a request that fails now (its timeout, the server closing, its own
        fault, the server's failure: ``_failure``, ``_server_error``) ends with OpenAI's error object as the
        last event, since its status (200) is sent."""
        detail = request.state.detail
        try:
            waiting = _waiting(request, futures, stream_keepalive, timeout, drain)
            final: Optional[list[SamplerResult]] = None
            try:  # closed in any case, so that its requests are cancelled (contextlib.aclosing: 3.10+)
                async for results in waiting:
                    if results is None:
                        yield ": keep-alive\n\n"
                    final = results
            finally:
                await waiting.aclose()
            assert final is not None
            answered = _response(
                request.state.request_id,
                model_name,
                body.sampler,
                num_prompts,
                prompt_tokens,
                _picked(final, body),
                policy,
                chat,
            )
        except ClientGone:
            detail["outcome"] = "cancelled"
            return
        except asyncio.CancelledError:
            detail["outcome"] = "cancelled"
            raise
        except Exception as error:
            failure = _failure(error, futures, body, chat)
            if failure is None:
                detail["outcome"] = "failed"
                yield _event(_server_error(error, request.state.request_id))
            else:
                detail["outcome"], _, error_body = failure
                yield _event(error_body)
            return
        detail["outcome"] = "completed"
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        for event in _events(_chunks(answered, chat, include_usage)):
            yield event

    app.add_middleware(_BodyLimit, limit=limits.max_body_bytes)
    app.add_middleware(_RequestLog, latency=latency, instance=instance)  # outermost: logs the 413s too
    return app


def _check_content_type(value: Optional[str], encoding: Optional[str] = None) -> None:
    """A completion request's body is JSON: sent as ``application/json`` or a ``+json`` type, with any
    parameters (``charset=utf-8``: JSON is UTF-8 in any case), or with no ``Content-Type`` at all (read as
    JSON, as FastAPI reads a body model's), and not compressed (a ``Content-Encoding`` other than
    ``identity``: the server does not decompress bodies). Anything else is a 415 naming the header, before
    the body is read (a form body was refused as invalid JSON, a ``text/plain`` one read as JSON, a gzipped
    one "Invalid JSON")."""
    if encoding is not None and encoding.strip().lower() not in ("", "identity"):
        raise RequestError(
            None,
            f"Content-Encoding: {encoding[:100]!r} is not supported: send the body uncompressed",
            415,
            "unsupported_media_type",
            {"Accept-Encoding": "identity"},
        )
    if value is None or not value.strip():
        return
    kind, slash, subtype = value.split(";", 1)[0].strip().lower().partition("/")
    if kind == "application" and slash and (subtype == "json" or subtype.endswith("+json")):
        return
    hint = ""
    if f"{kind}/{subtype}" == "application/x-www-form-urlencoded":
        hint = " (what curl -d sends unless given -H 'Content-Type: application/json')"
    raise RequestError(
        None,
        f"Content-Type: expected application/json, got {value[:100]!r}{hint}",
        415,
        "unsupported_media_type",
        {"Accept": "application/json"},
    )


def _chat_messages(messages: Iterable[Any]) -> list[dict[str, Any]]:
    """A chat request's messages as the chat template takes them: dicts, checked and normalised as every
    chat prompt is, through the API and the CLI too (``models.chat.check_messages``: text parts joined
    into one ``content`` string; a ``None`` content, as an assistant's tool call has, stays None, another
    role's is refused); a refusal is a 400 naming ``messages``."""
    from ..models.chat import check_messages

    try:
        return check_messages([message.model_dump(exclude_none=False) for message in messages])
    except ValueError as error:
        raise RequestError("messages", f"messages: {error}") from None


def _options(
    body: Any,
    prompts: list[Any],
    limits: Limits,
    max_tokens_limit: int,
    model_name: str,
    policy: Any,
    max_queue: int,
    chat: bool = False,
    optimal_proposal: bool = False,
) -> dict[str, Any]:
    """The engine options of a request, checked against the server's limits and the engine's queue (400s
    naming the field); ``proposal: "optimal"`` and ``pool_size: "exact"`` only where the models can draw
    from the optimal proposal (``optimal_proposal``: a token-level policy and a twist head). A field left
    out counts at the default that would run: a particle count past ``max_particles`` is refused, the policy's
    ``max_new_tokens`` past ``max_tokens_limit`` and MH's steps past ``limits.max_mh_steps`` are lowered
    to the limit (``max_tokens`` is OpenAI's upper bound, left out by clients that take what the server
    gives; a request that asks for more is refused)."""
    if body.model is not None and body.model != model_name:
        raise RequestError(
            "model", f"model: this server serves {model_name!r}, not {body.model!r}", 404, "model_not_found"
        )
    for field, (neutral, reason) in NEUTRAL_FIELDS.items():
        value = getattr(body, field, None)
        if value is not None and not neutral(value, body, policy):
            raise RequestError(field, f"{field}: {value!r} is not supported: {reason(policy)}")
    if body.stream_options is not None and not body.stream:
        raise RequestError("stream_options", "stream_options: only with stream: true")
    if len(prompts) > limits.max_prompts:
        raise RequestError(
            "prompt", f"prompt: {len(prompts)} prompts, more than this server's {limits.max_prompts}"
        )
    if body.n > limits.max_n:
        raise RequestError("n", f"n: {body.n} choices, more than this server's {limits.max_n}")
    if len(prompts) * body.n > max_queue:  # each choice waits in the queue: these could never be let in
        field = "n" if body.n > 1 else "prompt"
        raise RequestError(
            field,
            f"{field}: {len(prompts)} prompt(s) x n = {body.n} are {len(prompts) * body.n} engine requests, "
            f"more than this server's queue holds ({max_queue}, tiltsmc serve --max-queue)",
        )
    tokens_field = _tokens_field(body, chat)
    if body.max_tokens is not None and body.max_tokens > max_tokens_limit:
        raise RequestError(
            tokens_field,
            f"{tokens_field}: {body.max_tokens} is more than this server's {max_tokens_limit}",
        )
    if body.mh_steps is not None and body.mh_steps > limits.max_mh_steps:
        raise RequestError(
            "mh_steps", f"mh_steps: {body.mh_steps} steps, more than this server's {limits.max_mh_steps}"
        )
    fields = SAMPLER_FIELDS[body.sampler]
    options: dict[str, Any] = {}
    for field in ("particles", "ess_threshold", "resample", "pool_size", "proposal", "mh_steps", "bound"):
        value = getattr(body, field)
        if value is None:
            continue
        if field not in fields:
            raise RequestError(field, f"{field}: not an option of sampler {body.sampler!r}")
        options[fields[field]] = None if field == "pool_size" and value == EXACT_FORM else value
    defaults = sampler_defaults(body.sampler)
    if body.sampler == "mh":  # an option of the proposal form it does not run would change nothing
        particles = options.get("num_particles", defaults["num_particles"])
        for option in options_not_read(options, particles):
            field = next(name for name, target in fields.items() if target == option)
            form = (
                "SMC runs (they take resample and ess_threshold)"
                if particles > 1
                else ("SP-gSMC runs (they take pool_size; resample and ess_threshold need particles >= 2)")
            )
            raise RequestError(
                field,
                f"{field}: not used by sampler 'mh' with {particles} particle(s): its proposals are {form}",
            )
    asked = optimal_form_option(options)
    if asked is not None and not optimal_proposal:
        value = EXACT_FORM if asked == "pool_size" else "optimal"
        raise RequestError(
            asked, f"{asked}: {value!r} needs {OPTIMAL_FORM_NEEDS}; this server's models have no twist head"
        )
    # the rows that would run, as the engine counts them (MH's pool only where it runs: one particle)
    rows = _rows_option(body.sampler, {**defaults, **options})
    count = options.get(rows, defaults.get(rows))
    if isinstance(count, int) and count > limits.max_particles:
        field = next((name for name, target in fields.items() if target == rows), rows)
        raise RequestError(
            field, f"{field}: {count} particles, more than this server's {limits.max_particles}"
        )
    if body.sampler == "rejection":  # one sample per choice, from at most 16 rounds of draws
        options.setdefault("batch_size", defaults["batch_size"])  # within the limit: checked above
        options.update(num_samples=1, max_tries=16 * options["batch_size"])
    if body.max_tokens is not None:
        options["max_new_tokens"] = body.max_tokens
    elif _policy_token_limit(policy) > max_tokens_limit:
        options["max_new_tokens"] = max_tokens_limit
    if body.sampler == "mh" and "steps" not in options and defaults["steps"] > limits.max_mh_steps:
        options["steps"] = limits.max_mh_steps
    return options


def _policy_token_limit(policy: Any) -> int:
    """The new tokens the policy generates at most when a request leaves ``max_tokens`` out (its
    ``max_new_tokens``; 2**30 for a policy without one)."""
    return int(getattr(policy, "max_new_tokens", 1 << 30))


def _prompt_tokens(
    policy: Any,
    prompts: list[Any],
    limits: Limits,
    param: str = "prompt",
    longest: Optional[int] = None,
    max_new_tokens: Optional[int] = None,
) -> int:
    """The prompts' tokens in all, each checked against the limit (a policy without ``encode_prompt``
    counts none) and, with the request's ``max_new_tokens``, against the model's context (a policy that
    takes it: ``start_takes_token_limits``); errors name ``param`` (``prompt``, or a chat request's
    ``messages``).

    With ``longest`` (``_longest_token``), a prompt of more than ``2 * max_prompt_tokens * longest``
    characters is refused before it is encoded: each token stands for at most ``longest`` of them (twice
    over for normalisers that merge characters), so it cannot fit, and encoding it would take seconds
    and hundreds of bytes a character."""
    encode = getattr(policy, "encode_prompt", None)
    if not callable(encode):
        return 0
    if max_new_tokens is not None and getattr(policy, "start_takes_token_limits", False) is True:
        encode = functools.partial(encode, max_new_tokens=max_new_tokens)
    total = 0
    for k, prompt in enumerate(prompts):
        where = "messages" if param == "messages" else f"prompt[{k}]"
        characters = _characters(prompt)
        if longest is not None and characters > 2 * limits.max_prompt_tokens * longest:
            raise RequestError(
                param,
                f"{where}: {characters} characters, more than this server's {limits.max_prompt_tokens} "
                f"tokens can hold",
            )
        try:
            length = len(encode(prompt))
        except Exception as error:
            raise RequestError(param, f"{where}: {error}") from error
        if length > limits.max_prompt_tokens:
            raise RequestError(
                param, f"{where}: {length} tokens, more than this server's {limits.max_prompt_tokens}"
            )
        total += length
    return total


def _characters(prompt: Any) -> int:
    """The characters of a prompt's text: a string's, or every string of a chat's messages (contents,
    roles, names, tool calls: what a chat template may write), 0 for others."""
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, dict):
        return sum(_characters(key) + _characters(value) for key, value in prompt.items())
    if isinstance(prompt, list):
        return sum(_characters(item) for item in prompt)
    return 0


def _longest_token(policy: Any) -> Optional[int]:
    """Characters of the longest entry of the policy's vocabulary, special tokens included (a token
    stands for at most that many characters of text: a byte-level entry has one character a byte), or
    None where the policy has no tokenizer with a vocabulary."""
    vocabulary = getattr(getattr(policy, "tokenizer", None), "vocabulary", None)
    if not callable(vocabulary):
        return None
    entries = vocabulary()
    return max(1, max((len(entry) for entry in entries), default=1))


def _failure(
    error: BaseException, futures: list[Any], body: Any, chat: bool
) -> Optional[tuple[str, int, dict[str, Any]]]:
    """A request that failed once admitted, as (outcome, HTTP status, OpenAI error body): past its timeout
    (504), the engine or the server closing (503), or the request's own fault (400, ``refused``): an
    error of the engine or the samplers that names what the request set (``_failure_message``: an option
    such as ``num_particles``, its prompt ``prompt k``, the sampler that gave no sample). None for any
    other error, the server's own (``_server_error``): a model call that raised for the request alone,
    whatever its type (numpy's ``ValueError`` for shapes that do not broadcast, a ``TypeError``), the
    policy's decode of its own tokens. The plain answer sends it as the status and error body, a stream as
    its last event."""
    if isinstance(error, TimeoutError):
        return "timed_out", 504, _error_body(str(error), "timeout_error", None, "timeout")
    if isinstance(error, EngineClosed):
        return "closed", 503, _error_body(str(error), "unavailable_error", None, "closed")
    if isinstance(error, (ValueError, TypeError)) and not isinstance(error, UnicodeError):
        message, field = _failure_message(error, futures, body, chat)
        if field is not None:
            return "refused", 400, _error_body(message, "invalid_request_error", field)
    return None


def _server_error(error: BaseException, request_id: str) -> dict[str, Any]:
    """The answer's body for a request that failed with an error neither its own nor foreseen (a model
    call that raised for it alone, memory, the runtime's own errors): OpenAI's ``server_error``, whose
    message names the error in a line (its type and the start of its text, no traceback); the error is
    logged here, once, at ERROR with its traceback and the request's id."""
    text = str(error).strip().splitlines()
    summary = type(error).__name__ + (f": {text[0][:200]}" if text else "")
    record = {"event": "request_failed", "id": request_id, "error": summary}
    logger.error(json.dumps(record), exc_info=(type(error), error, error.__traceback__))
    return _error_body(f"the server failed to answer the request: {summary}", "server_error")


def _submit(
    engine: Engine,
    prompts: list[Any],
    body: Any,
    options: dict[str, Any],
    timeout: Optional[float],
    chat: bool = False,
) -> list[Any]:
    """Every choice of every prompt as one engine request (``choice_seed``: ``seed + i`` for the ``i``-th,
    prompt-major); where one is refused (``Overloaded``; its options, as a 400 naming the request's field),
    those already submitted are cancelled."""
    futures: list[Any] = []
    try:
        for j, prompt in enumerate(prompts):
            for k in range(body.n):
                seed = None if body.seed is None else choice_seed(body.seed, j * body.n + k)
                futures.append(engine.submit(prompt, body.sampler, rng=seed, timeout=timeout, **options))
    except BaseException as error:
        for future in futures:
            future.cancel()
        if isinstance(error, (ValueError, TypeError)) and not isinstance(error, RequestError):
            message, param = _failure_message(error, [], body, chat, len(futures))
            raise RequestError(param, message) from error
        raise
    return futures


def choice_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th run (counted from 0) of a request or command seeded ``seed``: ``seed +
    index``, the server's for its choices (prompt-major) and ``tiltsmc run``'s for its prompts, so that one
    run seeded ``s`` is the sampler function's with ``rng=s`` whichever front end runs it."""
    return seed + index


def _tokens_field(body: Any, chat: bool) -> str:
    """The field a request set its token limit with: a chat request's ``max_completion_tokens`` where it
    sent that, else ``max_tokens``."""
    return "max_completion_tokens" if chat and body.max_completion_tokens is not None else "max_tokens"


def _failure_message(
    error: BaseException, futures: list[Any], body: Any, chat: bool, index: Optional[int] = None
) -> tuple[str, Optional[str]]:
    """A refusal or failure from the engine as the request's words: (message, the field it concerns).

    The library's errors start with the argument at fault (``num_particles: ...``, ``prompt 0: ...``):
    that becomes the request's field (``particles``, ``prompt[2]`` for the third prompt of a list); others
    name none. ``index``: the failed choice (prompt-major), else found among ``futures`` by its error."""
    message = str(error)
    if not isinstance(error, (ValueError, TypeError)):
        return message, None
    name, colon, rest = message.partition(":")
    if not colon:
        return message, None
    name = name.strip()
    fields = {option: field for field, option in SAMPLER_FIELDS[body.sampler].items()}
    fields.update(max_new_tokens=_tokens_field(body, chat), sampler="sampler")
    if name in fields:
        return f"{fields[name]}:{rest}", fields[name]
    prompt_error = prompt_error_parts(message)
    if prompt_error is not None:
        reason = prompt_error[1]
        if chat:
            return f"messages: {reason}", "messages"
        if index is None:
            done = [i for i, f in enumerate(futures) if f.done() and not f.cancelled()]
            index = next((i for i in done if futures[i].exception() is error), None)
        where = "prompt" if index is None else f"prompt[{index // body.n}]"
        return f"{where}: {reason}", "prompt"
    return message, None


async def _submitted(counted_and_submitted: Callable[[], tuple[int, list[Any]]]) -> tuple[int, list[Any]]:
    """The prompts' tokens counted and checked (``_prompt_tokens``), then their requests submitted
    (``_submit``), off the event loop in one trip to a worker thread (the tokenizer lets other threads run
    while it encodes: 64 long prompts took half a second; with ``max_cache_bytes`` the engine encodes each
    prompt again to count its cache); where the handler is cancelled meanwhile, the requests are
    cancelled once submitted."""
    submitting = asyncio.ensure_future(asyncio.to_thread(counted_and_submitted))
    try:
        return await asyncio.shield(submitting)
    except asyncio.CancelledError:

        def cancel_all(task: "asyncio.Future[tuple[int, list[Any]]]") -> None:
            if not task.cancelled() and task.exception() is None:
                for future in task.result()[1]:
                    future.cancel()

        submitting.add_done_callback(cancel_all)
        raise


class _Drain:
    """The engine's drain as the server closes: ``begin`` closes the engine in a thread of its own (the
    event loop goes on answering), letting the requests queued and in flight finish for ``grace`` seconds
    and waiting ``SHUTDOWN_WAIT`` seconds more at most for a step still in progress (``Engine.close``), and
    sets ``deadline``, the event loop's time ``TIMEOUT_MARGIN`` past the grace period: a request still
    waiting then ends with ``EngineClosed`` (``_waiting``), where the engine has not ended it (inside a
    model call that overruns). The app's lifespan awaits the drain (``finished``), beginning it where the
    server did not (one that waits for the handlers first, such as Ray Serve's replicas). Used from the
    app's event loop only."""

    def __init__(self, engine: Engine, grace: float) -> None:
        self.engine, self.grace = engine, grace
        self.deadline: Optional[float] = None  # once begun: the loop's time the unanswered requests end at
        self._began: Optional[asyncio.Future[None]] = None  # done once begun (``began``)
        self._closed: Optional[asyncio.Future[bool]] = None  # Engine.close's answer
        self.stuck = False  # a step still in progress SHUTDOWN_WAIT past the grace period (``finished``)

    def begin(self) -> None:
        """Begins the drain (once: a later call changes nothing), without waiting for it."""
        if self._closed is not None:
            return
        loop = asyncio.get_running_loop()
        if math.isfinite(self.grace):
            self.deadline = loop.time() + self.grace + TIMEOUT_MARGIN
        closed = self._closed = loop.create_future()
        grace, wait = self.grace, SHUTDOWN_WAIT

        def answer(outcome: Any, error: Optional[BaseException]) -> None:
            if not closed.done():
                if error is None:
                    closed.set_result(outcome)
                else:
                    closed.set_exception(error)

        def close() -> None:
            outcome, error = None, None
            try:
                outcome = self.engine.close(True, grace, wait=wait)
            except Exception as failure:  # handed to the lifespan, which raises it
                error = failure
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
                loop.call_soon_threadsafe(answer, outcome, error)

        # a daemon thread, not the loop's executor: a loop that ends (a forced exit) does not wait for it
        threading.Thread(target=close, name="tiltsmc-drain", daemon=True).start()
        began = self.began()
        if not began.done():
            began.set_result(None)

    def began(self) -> asyncio.Future[None]:
        """A future done once the drain has begun (``deadline`` set)."""
        if self._began is None:
            self._began = asyncio.get_running_loop().create_future()
            if self._closed is not None:
                self._began.set_result(None)
        return self._began

    async def finished(self) -> bool:
        """Begins the drain where it has not begun; ``Engine.close``'s answer once it is over: False where
        a step was still in progress ``SHUTDOWN_WAIT`` seconds past the grace period (``stuck`` then)."""
        self.begin()
        assert self._closed is not None
        closed = bool(await asyncio.shield(self._closed))
        self.stuck = not closed
        return closed

    def unfinished(self) -> EngineClosed:
        """The error of a request still unanswered at ``deadline``."""
        return EngineClosed(
            f"the server closed before the request finished: a model call ran past the grace period "
            f"({self.grace:g} s)"
        )


async def _waiting(
    request: Any,
    futures: list[Any],
    every: float,
    timeout: Optional[float] = None,
    drain: Optional[_Drain] = None,
) -> AsyncGenerator[Optional[list[SamplerResult]], None]:
    """The requests' results, once all are in (the first failure raised), after a ``None`` every
    ``every`` seconds until then. A client that disconnects (``ClientGone``), a failure, or the caller
    leaving early cancels the requests still running (their rows are freed at the next step).

    ``timeout``: the requests' own (the engine's, which it checks between its steps); ``TIMEOUT_MARGIN``
    seconds past it, ``TimeoutError`` is raised here (and the requests cancelled) even where the engine
    has not answered, inside a model call that overruns. ``drain``: the app's; once it has begun, at its
    ``deadline`` (``TIMEOUT_MARGIN`` past the grace period), ``EngineClosed`` is raised here so."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None or math.isinf(timeout) else loop.time() + timeout + TIMEOUT_MARGIN
    waiting = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
    gone = asyncio.ensure_future(_client_gone(request))
    began = None if drain is None else drain.began()
    try:
        while True:
            closes_at = None if drain is None else drain.deadline
            wait = _seconds_to_first(loop, deadline, closes_at, every=every)
            watched = {waiting, gone} if began is None or began.done() else {waiting, gone, began}
            done, _ = await asyncio.wait(watched, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            if waiting in done:
                break
            if gone in done:
                gone.exception()  # retrieved: a receive that failed is a client gone too
                raise ClientGone
            now = loop.time()
            if deadline is not None and now >= deadline:
                raise TimeoutError(
                    f"timeout: the request took more than {timeout:.3g} s (a model call ran past it)"
                )
            if drain is not None and closes_at is not None and now >= closes_at:
                raise drain.unfinished()
            if began is not None and began in done:
                continue  # the drain has begun: its deadline is waited for from now on
            yield None
        yield waiting.result()
    finally:
        gone.cancel()
        for future in futures:
            future.cancel()  # nothing for those done
        if not waiting.done():
            waiting.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.shield(waiting)  # retrieved, so asyncio does not log it as never retrieved


def _seconds_to_first(
    loop: asyncio.AbstractEventLoop, *ends: Optional[float], every: float = math.inf
) -> Optional[float]:
    """Seconds from now to the first of ``ends`` (the loop's times; None: none), at most ``every``; None
    where there is neither (wait without a limit)."""
    wait = None if math.isinf(every) else every
    for end in ends:
        if end is not None:
            left = max(end - loop.time(), 0.0)
            wait = left if wait is None else min(wait, left)
    return wait


async def _read_body(request: Any, seconds: float, drain: Optional[_Drain] = None) -> bytes:
    """The request's body, read within ``seconds`` of now (``inf``: no limit), else a 408 (``RequestError``,
    code ``body_timeout``: a body sent slowly held its handler and connection for as long as it liked);
    once ``drain`` has begun, at its ``deadline`` (``TIMEOUT_MARGIN`` past the grace period) the server
    closing instead (``EngineClosed``, the 503 ``closed``): a body still coming then held the exit until
    uvicorn cancelled its handler (a plain-text 500). Each answered with ``Connection: close``, the rest
    of the body unread. ``ClientDisconnect`` and the body limit's 413 go through as they come."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds if math.isfinite(seconds) else None
    reading = asyncio.ensure_future(request.body())
    began = None if drain is None else drain.began()
    try:
        while True:
            closes_at = None if drain is None else drain.deadline
            wait = _seconds_to_first(loop, deadline, closes_at)
            watched = {reading} if began is None or began.done() else {reading, began}
            done, _ = await asyncio.wait(watched, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            if reading in done:
                return bytes(reading.result())
            now = loop.time()
            if drain is not None and closes_at is not None and now >= closes_at:
                raise EngineClosed(
                    f"the server closed before the request's body was received (grace period "
                    f"{drain.grace:g} s)"
                )
            if deadline is not None and now >= deadline:
                raise RequestError(
                    None,
                    f"the request's body was not received within {seconds:g} s of its headers "
                    f"(tiltsmc serve --body-timeout)",
                    408,
                    "body_timeout",
                    {"Connection": "close"},
                )
    finally:
        if not reading.done():
            reading.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.shield(reading)  # retrieved, so asyncio does not log it as never retrieved


async def _client_gone(request: Any) -> None:
    """Returns once the client has disconnected (ASGI's ``http.disconnect``; the body has been read): a
    wait on the connection, where polling every waiting request cost the event loop about 15 us a poll
    (a full queue of 1024, polled every 50 ms, a third of a core)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(
    request: Any,
    futures: list[Any],
    body: Any,
    timeout: Optional[float] = None,
    drain: Optional[_Drain] = None,
) -> list[tuple[SamplerResult, int]]:
    """The requests' results (see ``_waiting``, ``timeout`` and ``drain`` included), each with the index
    of the trajectory it returns."""
    waiting = _waiting(request, futures, math.inf, timeout, drain)
    try:  # closed in any case, so that its requests are cancelled (contextlib.aclosing: 3.10+)
        async for results in waiting:
            if results is not None:
                return _picked(results, body)
    finally:
        await waiting.aclose()
    raise AssertionError("_waiting ended without results")  # pragma: no cover


def _picked(results: list[SamplerResult], body: Any) -> list[tuple[SamplerResult, int]]:
    """Each result with the index of the trajectory its choice returns (drawn with ``[seed + i, 1]``).
    A result with none (rejection sampling that accepted no draw) fails the request: an empty text is
    not a sample of the target."""
    picked = []
    for i, result in enumerate(results):
        if not len(result.samples[0]):
            tries = "" if result.tries is None else f" of {int(result.tries[0])} draws"
            raise ValueError(
                f"sampler: {body.sampler} accepted none{tries} for choice {i}; more particles (draws a "
                f"round), a bound nearer the rewards' largest, or another sampler"
            )
        seed = None if body.seed is None else [body.seed + i, 1]
        picked.append((result, _pick(result, seed)))
    return picked


def _pick(result: SamplerResult, seed: Any) -> int:
    """The trajectory a choice returns: one drawn by weight (SMC), else the sampler's one sample."""
    weights = result.log_weights[0]
    if len(weights) <= 1 or result.collapsed[0]:
        return 0
    index, _ = core.pool_select(np.asarray(weights), rng=np.random.default_rng(seed))
    return int(index)


def _response(
    request_id: str,
    model_name: str,
    sampler: str,
    num_prompts: int,
    prompt_tokens: int,
    choices: list[tuple[SamplerResult, int]],
    policy: Any,
    chat: bool = False,
) -> dict[str, Any]:
    """The OpenAI completion answer (``text_completion``), or with ``chat`` the chat completion answer
    (``chat.completion``: each choice's text as an assistant message)."""
    eos: frozenset[int] = frozenset(getattr(policy, "eos_token_ids", ()))
    out_choices, details = [], []
    completion_tokens = 0
    per_prompt = len(choices) // max(num_prompts, 1)
    for i, (result, index) in enumerate(choices):
        samples = result.samples[0]
        tokens = np.asarray(samples[index]) if len(samples) else np.zeros(0, dtype=np.int64)
        completion_tokens += int(tokens.size)
        texts = result.texts[0] if result.texts else []
        text = texts[index] if index < len(texts) else ""
        choice: dict[str, Any] = {"index": i}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice.update(logprobs=None, finish_reason=_finish_reason(tokens, policy, eos))
        out_choices.append(choice)
        detail: dict[str, Any] = {"index": i, "prompt_index": i // max(per_prompt, 1), "sample_index": index}
        for key in ("log_z", "log_weights", "ess", "resampled", "collapsed", "acceptance_rate", "tries"):
            value = getattr(result, key)
            if value is not None:  # its prompt's part, as SamplerResult.to_dict writes the field
                detail[key] = plain(value[0])
        detail["compute"] = result.compute.to_dict()
        details.append(detail)
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": out_choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "tiltsmc": {"sampler": sampler, "choices": details},
    }


def _finish_reason(tokens: np.ndarray, policy: Any, eos: frozenset[int]) -> str:
    """OpenAI's ``finish_reason`` of a trajectory: ``stop`` where it ended at an EOS token or at one of
    the policy's stop strings (its text, ``decode``, ends before it), else ``length`` (its token limit,
    or the sampler's step limit)."""
    if tokens.size and int(tokens[-1]) in eos:
        return "stop"
    stops = tuple(getattr(policy, "stop", ()) or ())
    tokenizer = getattr(policy, "tokenizer", None)
    if stops and tokens.size and tokenizer is not None:
        whole = tokenizer.decode(tokens)  # the first stop string in it ended the trajectory
        if any(stop in whole for stop in stops):
            return "stop"
    return "length"


def _chunks(answer: dict[str, Any], chat: bool, include_usage: bool) -> list[dict[str, Any]]:
    """An answer of ``_response`` as OpenAI's streamed chunks: each choice whole in one chunk (its text as
    the ``text``, or the chat ``delta``, with its ``finish_reason`` and its part of the ``tiltsmc`` object),
    then, with ``include_usage``, a chunk with no choices and the ``usage`` (``null`` in the others)."""
    head = {
        "id": answer["id"],
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": answer["created"],
        "model": answer["model"],
    }
    tiltsmc = answer["tiltsmc"]
    chunks = []
    for choice, detail in zip(answer["choices"], tiltsmc["choices"]):
        if chat:
            fields = dict(choice)
            index, message = fields.pop("index"), fields.pop("message")
            choice = {"index": index, "delta": message, **fields}
        chunk = {**head, "choices": [choice], "tiltsmc": {"sampler": tiltsmc["sampler"], "choices": [detail]}}
        if include_usage:
            chunk["usage"] = None
        chunks.append(chunk)
    if include_usage:
        chunks.append({**head, "choices": [], "usage": answer["usage"]})
    return chunks


def _events(chunks: list[dict[str, Any]]) -> Iterable[str]:
    """Server-sent events: each chunk as ``data: <JSON>``, then ``data: [DONE]``."""
    for chunk in chunks:
        yield _event(chunk)
    yield "data: [DONE]\n\n"


def _event(data: dict[str, Any]) -> str:
    """One server-sent event ``data: <JSON>`` (encoded as JSONResponse encodes)."""
    return f"data: {json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(',', ':'))}\n\n"


class _BodyLimit:
    """ASGI middleware: a request whose body is over ``limit`` bytes gets a 413 and is not read further
    (at once where its ``Content-Length`` says so; else when what it has sent passes the limit), so
    that one request cannot take the server's memory."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            refusal = _error(413, self._message(), "invalid_request_error", "request_too_large")
            await refusal(scope, receive, send)
            return
        received = 0

        async def limited() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # an HTTPException: FastAPI lets it through its body parsing to the app's handler
                    from starlette.exceptions import HTTPException

                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"the request body is over this server's {self.limit} bytes (tiltsmc serve --max-body-bytes)"


class _RequestLog:
    """ASGI middleware: gives every request an id (``X-Request-ID``: the client's if well-formed, else a
    new one), echoes it in the response, and logs one JSON line per request (what the handler put in
    ``request.state.detail`` included); a completion request's latency goes to the histogram by its
    outcome (``OUTCOMES``: the handler's, else the status sent's, ``_status_outcome``), which its line
    names too. An error that no handler answered (the app's own bug) is answered here, before any
    response was started, as the server's failure: the 500 ``server_error`` in OpenAI's shape, logged with
    its traceback (``_server_error``), the request's line with status 500, outcome ``failed`` (it went on
    to Starlette's plain-text 500, outside this middleware, and was logged as 499 ``cancelled``)."""

    def __init__(self, app: Any, latency: Any, instance: Optional[str] = None) -> None:
        self.app, self.latency = app, latency
        self.instance = None if instance is None else instance.encode("latin-1", "replace")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")
        if not _REQUEST_ID.match(request_id):
            request_id = uuid.uuid4().hex
        detail: dict[str, Any] = {}
        scope.setdefault("state", {}).update(request_id=request_id, detail=detail)
        status = [499]  # no response sent: the client went away
        started = [False]
        began = time.perf_counter()

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0], started[0] = message["status"], True
                headers = message.setdefault("headers", [])
                headers.append((b"x-request-id", request_id.encode()))
                if self.instance is not None:
                    headers.append((b"x-tiltsmc-instance", self.instance))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as error:
            detail["outcome"] = "failed"
            if started[0]:  # too late to answer: uvicorn cuts the response short
                raise
            from fastapi.responses import JSONResponse

            failed = JSONResponse(_server_error(error, request_id), status_code=500)
            await failed(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - began
            if scope["path"] in ("/v1/completions", "/v1/chat/completions"):
                detail["outcome"] = detail.get("outcome") or _status_outcome(status[0])
                self.latency.labels(detail["outcome"]).observe(seconds)
            record = {"event": "request", "id": request_id, "method": scope["method"], "path": scope["path"]}
            record.update(status=status[0], ms=round(1000 * seconds, 3), **detail)
            logger.info(json.dumps(record))


def _status_outcome(status: int) -> str:
    """The outcome (``OUTCOMES``) of a completion request whose handler named none, by the status sent: a
    request refused before its handler ran (a body too large, not JSON or not valid, no API key: 4xx), or
    one not answered (499: the client left)."""
    named = {429: "rejected", 499: "cancelled", 503: "closed", 504: "timed_out"}
    if status in named:
        return named[status]
    if status < 400:
        return "completed"
    return "refused" if status < 500 else "failed"


class _EngineCollector:
    """The engine's figures as Prometheus metrics, read at each scrape."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.engine.stats()
        requests = CounterMetricFamily("tiltsmc_requests", "Engine requests by outcome", labels=["outcome"])
        for outcome, count in stats["requests"].items():
            requests.add_metric([outcome], count)
        yield requests
        yield CounterMetricFamily(
            "tiltsmc_request_restarts",
            "Times requests ran again from their start after a model call failed for their batch",
            value=stats["restarts"],
        )
        yield GaugeMetricFamily(
            "tiltsmc_queue_depth", "Requests waiting for particle rows", value=stats["waiting"]
        )
        yield GaugeMetricFamily(
            "tiltsmc_requests_in_flight", "Requests being advanced", value=stats["in_flight"]
        )
        yield GaugeMetricFamily(
            "tiltsmc_rows_in_flight", "Particle rows in flight", value=stats["rows_in_flight"]
        )
        yield GaugeMetricFamily(
            "tiltsmc_cache_bytes_in_flight",
            "KV cache the requests in flight may reach, in bytes (counted where --max-cache-bytes bounds it)",
            value=stats["cache_bytes_in_flight"],
        )
        if stats["max_cache_bytes"] is not None:
            yield GaugeMetricFamily(
                "tiltsmc_max_cache_bytes",
                "The bound on the KV cache in flight, in bytes (--max-cache-bytes; auto: chosen at start)",
                value=stats["max_cache_bytes"],
            )
        yield GaugeMetricFamily(
            "tiltsmc_row_limit",
            "Particle rows the engine admits up to now (max_batch_rows, or the learned batch size below it; "
            "0 until one is measured: twice the oldest waiting request's rows are let in then)",
            value=stats["row_limit"],
        )
        by_worker = {
            name: GaugeMetricFamily(f"tiltsmc_worker_{name}", help_text, labels=["worker"])
            for name, help_text in (
                ("rows_in_flight", "Particle rows in flight in each engine worker's batch"),
                ("row_limit", "Particle rows each engine worker admits up to now"),
            )
        }
        for index, worker in enumerate(stats["workers"]):
            for name, family in by_worker.items():
                family.add_metric([str(index)], worker[name])
        yield from by_worker.values()
        yield GaugeMetricFamily(
            "tiltsmc_rows_per_policy_call",
            "Mean particle rows per policy call",
            value=stats["rows_per_policy_call"],
        )
        yield CounterMetricFamily("tiltsmc_steps", "Engine iterations", value=stats["steps"])
        seconds = CounterMetricFamily(
            "tiltsmc_step_seconds", "Time of the engine's steps, by part", labels=["part"]
        )
        for part in ("policy", "reward", "tiltsmc"):
            seconds.add_metric([part], stats[f"{part}_seconds"])
        yield seconds


# -- the command line -------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``tiltsmc serve`` beyond the models'."""
    from ..cli import _utf8_text  # here: the CLI imports this module (a cycle at import time)

    # UTF-8 text, as the CLI's other text options: a name of other bytes made every response fail (500), a
    # host the address lookup's idna codec refused without naming --host
    parser.add_argument(
        "--host", type=_utf8_text, default="127.0.0.1", help="address to bind (default: 127.0.0.1 only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument(
        "--model-name", type=_utf8_text, default=MODEL_NAME, help="the model name clients send"
    )
    parser.add_argument(
        "--api-key-env", default=None, metavar="VAR", help="require Bearer $VAR on /v1 and /metrics"
    )
    parser.add_argument(
        "--max-batch-rows", type=int, default=MAX_BATCH_ROWS, help="particles in flight at most"
    )
    parser.add_argument(
        "--adaptive-rows",
        choices=("on", "off"),
        default="on" if ADAPTIVE_ROWS else "off",
        help="admit only the rows that still make a step's rows cheaper, learned from the steps' times "
        "(off: up to --max-batch-rows)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=WORKERS,
        help="engine worker threads, each stepping its own batch; more than one gives each model "
        "cores / workers ONNX Runtime threads unless --threads says otherwise (default: %(default)s)",
    )
    parser.add_argument(
        "--max-queue", type=int, default=MAX_QUEUE, help="requests waiting at most (then 429)"
    )
    parser.add_argument(
        "--max-cache-bytes",
        type=_cache_bound_option,
        default=MAX_CACHE_BYTES,
        metavar="BYTES|auto|none",
        help="KV cache the requests in flight may reach at most, in bytes (particles x (prompt + max "
        "tokens) x the policy's bytes a token; more wait, a request over it alone is a 400); 'auto' "
        "(the default): a quarter of the memory available once the models are loaded; 'none': no bound, "
        "particle rows only",
    )
    parser.add_argument(
        "--timeout", type=float, default=TIMEOUT, help="seconds a request may take (then 504; inf: no limit)"
    )
    parser.add_argument("--grace", type=float, default=GRACE, help="seconds to finish requests on SIGTERM")
    parser.add_argument(
        "--stream-keepalive",
        type=float,
        default=STREAM_KEEPALIVE,
        metavar="SECONDS",
        help="seconds between the comment lines a stream sends until its answer is ready (proxies close "
        "idle connections; default: %(default)s)",
    )
    parser.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=Limits.max_prompt_tokens,
        help="prompt tokens at most (then 400)",
    )
    parser.add_argument(
        "--max-request-particles",
        type=int,
        default=Limits.max_particles,
        help="particles, pool size or n of one request at most (then 400)",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="max_tokens at most (then 400), and what a request without max_tokens gets (default: the "
        "policy's --max-new-tokens)",
    )
    parser.add_argument("--max-n", type=int, default=Limits.max_n, help="choices per prompt (n) at most")
    parser.add_argument(
        "--max-prompts",
        type=int,
        default=Limits.max_prompts,
        help="prompts in one request's list at most (then 400; default: %(default)s)",
    )
    parser.add_argument(
        "--max-mh-steps",
        type=int,
        default=Limits.max_mh_steps,
        help="mh_steps of one request at most (each a further run of its particles; then 400); a request "
        f"without mh_steps runs MH's default of {sampler_defaults('mh')['steps']} steps, or this many if "
        "fewer (default: %(default)s)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=Limits.max_body_bytes,
        help="bytes of a request's body at most (then 413; default: %(default)s)",
    )
    parser.add_argument(
        "--body-timeout",
        type=float,
        default=BODY_TIMEOUT,
        metavar="SECONDS",
        help="seconds a client has to send a request's body once its headers are in (then 408; inf: no "
        "limit; default: %(default)s)",
    )
    parser.add_argument(
        "--release-memory-after",
        type=_seconds_or_never,
        default=RELEASE_MEMORY_AFTER,
        metavar="SECONDS",
        help=f"idle seconds after a burst before memory goes back to the system, or 'never' "
        f"(default: {RELEASE_MEMORY_AFTER:g})",
    )


def _check_app_settings(
    api_key: Union[str, ApiKeyDigest, None],
    limits: Any,
    timeout: Optional[float],
    stream_keepalive: float,
    body_timeout: float = BODY_TIMEOUT,
) -> None:
    """The app's settings that ``create_app`` and ``Settings`` take (and so ``tiltsmc serve`` and Ray's
    replicas), checked alike: TypeError / ValueError naming the setting. ``api_key``: None, a non-empty
    key (``_check_api_key``; an empty one let any ``Authorization: Bearer`` through) or an
    ``ApiKeyDigest``; ``limits``: a
    ``Limits``; ``timeout``: None or seconds > 0 (one <= 0 failed every request with a 400 that blamed the
    client); ``stream_keepalive``: finite seconds > 0 (0 sent keep-alive lines without pause);
    ``body_timeout``: seconds > 0 (``inf``: no limit)."""
    if api_key is not None and not isinstance(api_key, ApiKeyDigest):
        if not isinstance(api_key, str):
            raise TypeError(
                f"api_key: expected a string, an ApiKeyDigest or None, got {type(api_key).__name__}"
            )
        ApiKeyDigest.of(api_key)
    if not isinstance(limits, Limits):
        raise TypeError(f"limits: expected a tiltsmc.serving.server.Limits, got {type(limits).__name__}")
    if timeout is not None and not real_number(timeout, "timeout") > 0:  # NaN too
        raise ValueError(f"timeout: expected a positive number of seconds or None, got {timeout!r}")
    if not 0 < real_number(stream_keepalive, "stream_keepalive") < math.inf:
        raise ValueError(
            f"stream_keepalive: expected a positive finite number of seconds, got {stream_keepalive!r}"
        )
    if not real_number(body_timeout, "body_timeout") > 0:  # NaN too
        raise ValueError(
            f"body_timeout: expected a positive number of seconds (inf: none), got {body_timeout!r}"
        )


def _check_grace(seconds: Any, name: str, finite: bool = True) -> None:
    """``name``, the seconds a closing server lets the requests in flight finish: a number >= 0, finite
    with ``finite`` (``serve`` has uvicorn wait for the handlers as long, and more); TypeError / ValueError
    naming it."""
    value = real_number(seconds, name)
    if not (0 <= value < math.inf if finite else value >= 0):  # NaN too
        bound = "a finite number of seconds >= 0" if finite else "a number of seconds >= 0"
        raise ValueError(f"{name}: expected {bound}, got {seconds!r}")


def _cache_bound_option(text: str) -> Union[int, str, None]:
    """``--max-cache-bytes``: ``auto``, ``none`` or a positive integer (of bytes)."""
    word = text.strip().lower()
    if word in ("auto", "none"):
        return None if word == "none" else "auto"
    try:
        value = int(word)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, 'auto' or 'none', got {text!r}")
    return value


def _seconds_or_never(text: str) -> Optional[float]:
    if text.strip().lower() == "never":
        return None
    return real_option(text, 0.0, math.inf, False, True, "seconds >= 0 or 'never'")


@dataclass(frozen=True)
class Settings:
    """What ``tiltsmc serve`` configures besides the models: the engine's admission limits and the app's
    settings (one replica's, on Ray Serve). The app's settings are checked as it is made, as
    ``create_app`` checks them (``api_key``, ``limits``, ``timeout``, ``stream_keepalive``,
    ``body_timeout``: TypeError / ValueError naming the field); ``grace`` when the app is made (``app``),
    or by Ray's ``deployment_options`` before Ray starts; the engine's when the engine is made
    (``engine``)."""

    model_name: str = MODEL_NAME
    api_key: Union[str, ApiKeyDigest, None] = dataclasses.field(default=None, repr=False)
    limits: Limits = Limits()
    timeout: Optional[float] = TIMEOUT
    grace: float = GRACE
    max_batch_rows: int = MAX_BATCH_ROWS
    max_queue: int = MAX_QUEUE
    release_memory_after: Optional[float] = RELEASE_MEMORY_AFTER
    adaptive_rows: bool = ADAPTIVE_ROWS
    workers: int = WORKERS
    max_cache_bytes: Union[int, Literal["auto"], None] = MAX_CACHE_BYTES
    stream_keepalive: float = STREAM_KEEPALIVE
    body_timeout: float = BODY_TIMEOUT

    def __post_init__(self) -> None:
        _check_app_settings(self.api_key, self.limits, self.timeout, self.stream_keepalive, self.body_timeout)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Settings":
        """The settings of the command line, checked (ValueError naming the option)."""
        api_key = None
        if args.api_key_env is not None:
            api_key = os.environ.get(args.api_key_env, "")
            if not api_key:
                raise ValueError(f"--api-key-env: ${args.api_key_env} is not set or empty")
            _check_api_key(api_key, f"--api-key-env: ${args.api_key_env}")
        for name in (
            "max_batch_rows", "max_queue", "max_prompt_tokens", "max_request_particles", "max_n", "workers",
            "max_body_bytes", "max_mh_steps", "max_prompts",
        ):  # fmt: skip
            value = getattr(args, name)
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer")
        if args.workers > MAX_WORKERS:
            raise ValueError(f"--workers: expected at most {MAX_WORKERS} worker threads")
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port: expected a port number from 0 to 65535, got {args.port}")
        if not args.host.strip():  # uvicorn listens on every interface for ""
            raise ValueError("--host: expected an address to bind (0.0.0.0 for every interface), got ''")
        if args.max_tokens is not None and args.max_tokens < 1:
            raise ValueError("--max-tokens: expected a positive integer (or leave it out: the policy's)")
        if not args.timeout > 0:
            raise ValueError("--timeout: expected a positive number of seconds")
        if not 0 <= args.grace < math.inf:
            raise ValueError("--grace: expected a finite number of seconds >= 0")
        if not 0 < args.stream_keepalive < math.inf:
            raise ValueError("--stream-keepalive: expected a positive number of seconds")
        if not args.body_timeout > 0:  # NaN too
            raise ValueError("--body-timeout: expected a positive number of seconds (inf: no limit)")
        limits = Limits(
            max_prompt_tokens=args.max_prompt_tokens,
            max_particles=args.max_request_particles,
            max_tokens=args.max_tokens,
            max_n=args.max_n,
            max_mh_steps=args.max_mh_steps,
            max_prompts=args.max_prompts,
            max_body_bytes=args.max_body_bytes,
        )
        return cls(
            args.model_name,
            api_key,
            limits,
            args.timeout,
            args.grace,
            args.max_batch_rows,
            args.max_queue,
            args.release_memory_after,
            args.adaptive_rows == "on",
            args.workers,
            args.max_cache_bytes,
            args.stream_keepalive,
            args.body_timeout,
        )

    def engine(self, policy: Any, reward: Any) -> Engine:
        # the server's process is the engine's: freed memory kept for reuse during bursts (see Engine)
        return Engine(
            policy,
            reward,
            max_batch_rows=self.max_batch_rows,
            max_queue=self.max_queue,
            release_memory_after=self.release_memory_after,
            keep_freed_memory=True,
            adaptive_rows=self.adaptive_rows,
            workers=self.workers,
            max_cache_bytes=self.max_cache_bytes,
        )

    def app(self, engine: Engine, instance: Optional[str] = None) -> Any:
        """The app serving ``engine`` with these settings (``create_app``); ``grace`` is its
        ``close_timeout`` (ValueError naming ``grace``: a finite number of seconds >= 0)."""
        _check_grace(self.grace, "grace")
        return create_app(
            engine,
            model_name=self.model_name,
            api_key=self.api_key,
            limits=self.limits,
            timeout=self.timeout,
            close_timeout=self.grace,
            instance=instance,
            stream_keepalive=self.stream_keepalive,
            body_timeout=self.body_timeout,
        )


def serve(args: argparse.Namespace, settings: Settings, policy: Any, reward: Any) -> int:
    """Run the server until SIGTERM / SIGINT: uvicorn's graceful shutdown, whose start begins the engine's
    drain (``_Drain``: the requests in flight have ``settings.grace`` seconds to finish, then end as the
    server closing, a 503 ``closed``), and which waits for the handlers ``TIMEOUT_MARGIN + SEND_MARGIN``
    seconds past the grace period (rounded up to whole seconds: uvicorn's), so that every answer goes out
    before it cancels what still runs.

    uvicorn serves ``connection_limit(settings)`` connections at once (its ``limit_concurrency``): a
    request that comes while as many connections are open, or as many requests run, gets uvicorn's own
    503 (plain text, ``Connection: close``; not logged here). It counts the connections it has accepted,
    idle ones included, but does not stop accepting them, nor time out one that has sent no request yet or
    only part of its headers, nor bound its headers' size (httptools): those are a reverse proxy's work."""
    require_serve_extra()
    import uvicorn

    engine = settings.engine(policy, reward)
    try:
        app = settings.app(engine)  # ValueError: settings the policy cannot meet (--max-tokens)
    except BaseException:
        engine.close(drain=False)
        raise
    log_to_stderr()
    try:
        listener = listening_socket(args.host, args.port)
    except BaseException:
        engine.close(drain=False)
        raise
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=math.ceil(settings.grace + TIMEOUT_MARGIN + SEND_MARGIN),
        limit_concurrency=connection_limit(settings),
    )
    drain: _Drain = app.state.drain

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, whose shutdown begins the engine's drain before it waits for the handlers
        (the app's lifespan, which would begin it, runs once they are done or cancelled)."""

        async def shutdown(self, sockets: Optional[list[socket.socket]] = None) -> None:
            drain.begin()
            await super().shutdown(sockets)

    listening = {
        "event": "listening",
        "host": args.host,
        "port": listener.getsockname()[1],  # the port bound (one the system chose for --port 0)
        "model": settings.model_name,
        "workers": settings.workers,
        "threads": args.threads,
    }
    logger.info(json.dumps(listening))
    try:
        # on a signal, re-raises it once shut down: the process ends there (SIGINT's KeyboardInterrupt
        # passes the finally below)
        DrainingServer(config).run(sockets=[listener])
    finally:
        # the workers stopped here where the drain has not (a second SIGINT forces the shutdown past its
        # end): once closed, the engine is no longer one that the interpreter's exit stops, and a worker
        # still inside a model call at exit aborts the process as the call returns (see Engine). Where the
        # drain found a step stuck, it has waited for it and logged it already.
        if drain.stuck:
            logging.shutdown()
            os._exit(1)
        if not engine.close(drain=False, timeout=None, wait=SHUTDOWN_WAIT):
            _log_stuck_step(settings.grace)
            logging.shutdown()
            os._exit(1)
    return 0


def connection_limit(settings: Settings) -> int:
    """The connections ``serve`` lets uvicorn serve at once: the requests the engine can hold (each
    request in flight holds a row at least, ``max_batch_rows``, and ``max_queue`` more wait) and
    ``CONNECTION_HEADROOM`` (``/health``, ``/metrics``, the requests being refused a 429, clients' idle
    keep-alive connections), so that a full queue is still the 429 (the JSON one, logged) for clients
    within that many."""
    return int(settings.max_queue) + int(settings.max_batch_rows) + CONNECTION_HEADROOM


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``port`` 0: one the system chooses), as uvicorn binds one
    (``SO_REUSEADDR``), bound before the server says it listens: an address in use or a host that does not
    resolve is a ValueError naming the option (uvicorn logged it after a "listening" line and exited with
    status 3)."""
    try:
        (family, kind, proto, _, address), *_ = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        raise ValueError(f"--host: cannot listen on {host!r}: {error.strerror or error}") from None
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
    except OSError as error:
        listener.close()
        raise ValueError(f"--port: cannot listen on {host}:{port}: {error.strerror or error}") from None
    listener.set_inheritable(True)
    return listener


def _log_stuck_step(grace: float) -> None:
    record = {"event": "shutdown", "stuck_step": True, "grace": grace, "wait": SHUTDOWN_WAIT}
    record["message"] = "a step was still in progress past the grace period; exiting without it"
    logger.warning(json.dumps(record))


def log_to_stderr() -> None:
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
