"""Scale out on Ray Serve: replicas of the engine behind one endpoint (the ``ray`` extra, ``ray[serve]``).

Each replica is a Ray actor that loads the models once, holds one [`Engine`][tiltsmc.Engine] and serves the
same FastAPI app as ``tiltsmc serve``
([`tiltsmc.serving.server.create_app`][tiltsmc.serving.server.create_app]) through Ray Serve's ingress, so the
HTTP API, its errors and its metrics are the same; every answer names its replica in the
``X-Tiltsmc-Instance`` header.

Ray Serve routes each request to a replica with few requests ongoing, up to ``max_ongoing_requests`` each:
by default what its engine can hold (``max_queue`` waiting, ``max_batch_rows`` running) and
``ONGOING_HEADROOM`` more, so that the engine's own admission decides (a full queue answered with its 429,
as by ``tiltsmc serve``) and ``/health`` and ``/metrics`` are never held behind long requests. Ray queues as
many more at most (``max_queued_requests``, in each of its proxies), where every replica is full or none
runs yet, and refuses the rest itself (see ``backpressure_options``); every request counts in that queue
until Ray has picked its replica, so a tighter bound refused bursts the engines had room for. Ray's proxy
ends a request ``TIMEOUT_MARGIN + SEND_MARGIN`` seconds past ``--timeout``, its wait in that queue
included (``proxy_request_timeout``), by when a replica has answered its 504. Ray Serve starts a new
replica when one dies (its requests in flight end with an error; a request is idempotent given its seed,
so a client may retry it), and with ``autoscaling`` adds and removes replicas on the ongoing requests.

Each replica runs its models on the CPU where it reserves no GPU (``--replica-gpus 0``: a GPU it did not
reserve is Ray's to give to another), with ``--threads`` threads (the core's and ONNX Runtime's), by
default its reserved CPUs shared out between its engine's workers (rounded up, at least one). It logs one
JSON line per request as ``tiltsmc serve`` does, on its standard error, which Ray keeps in its log folder
on the replica's node (``worker-*-PID.err``, PID the ``X-Tiltsmc-Instance`` header's end; the folder is in
the command's ``listening`` line as ``ray_logs``). An answer has one ``X-Request-ID``, Ray's proxy's: the
client's as sent, else one Ray made, by which the replica names the request (a client's id that tiltsmc
refuses is echoed as sent, the replica naming the request by one of its own). As its application is deleted
(SIGTERM) a replica begins its engine's drain, as ``tiltsmc serve`` does: the requests the grace period
does not let finish get the 503 ``closed``; a replica stopped alone (autoscaling down) still ends those
still running at ``graceful_shutdown_timeout_s`` with Ray's plain-text 500.

``tiltsmc serve --ray --replicas K ...`` starts a Ray instance of its own (or joins ``--address``),
deploys, and serves until SIGTERM or SIGINT (see [`serve_on_ray`][tiltsmc.serving.ray.serve_on_ray]).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any, Optional

from .._options import positive_int_option, positive_real_option
from ..models._config import real_number
from .server import (
    SEND_MARGIN,
    TIMEOUT_MARGIN,
    ApiKeyDigest,
    Settings,
    listening_socket,
    log_to_stderr,
    logger,
)

__all__ = [
    "ReplicaOptions",
    "TiltsmcReplica",
    "build_application",
    "check_autoscaling",
    "check_options",
    "check_resource",
    "deployment_options",
    "serve_on_ray",
]

APP_NAME = "tiltsmc"

# The defaults of build_application, which `tiltsmc serve --ray` takes for the options left out: one set.
REPLICAS = 1
REPLICA_CPUS = 1.0
REPLICA_GPUS = 0.0
# Ray counts resources in units of 1/10000 (ray._raylet.RESOURCE_UNIT_SCALING): a smaller positive
# quantity is refused by Ray ("cannot go beyond 0.0001"), after it has started.
RESOURCE_UNIT = 1e-4
# `tiltsmc serve`'s Ray options (their destinations): refused without --ray.
RAY_OPTIONS = ("replicas", "autoscale", "target_ongoing", "address", "replica_cpus", "replica_gpus")
# The signals that stop `tiltsmc serve --ray` (a second one while the application drains: at once).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Seconds between two looks at the application's status while it starts or is deleted (and at the signals).
POLL_INTERVAL_S = 0.5
# Seconds the replicas may take to start before the command says what it waits for, and again each time.
WAITING_REPORT_S = 10.0
# Seconds past the grace period the command waits for Ray Serve to delete the application on exit.
TAKE_DOWN_MARGIN_S = 30.0
# Seconds the command waits for a connection to --address before Ray is reached (see _check_address).
ADDRESS_TIMEOUT_S = 10.0
# Requests a replica takes past what its engine can hold (max_queue waiting, max_batch_rows running): room for
# /health, /metrics, /v1/models and the refusals answered while its engine is full.
ONGOING_HEADROOM = 64
# Seconds a client is told to wait (Retry-After) where Ray Serve refuses a request itself (see
# backpressure_options): as the engine's 429 says.
RETRY_AFTER_S = 1
# Seconds between a replica's looks at its application's status, to begin its engine's drain once the
# application is being deleted (see _RayReplica); Ray Serve's grace period for a replica is this longer.
DRAIN_POLL_S = 1.0
# ANSI escape sequences (colours): Ray colours the remote tracebacks in its errors.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


@dataclass(frozen=True)
class ReplicaOptions:
    """What a replica needs: the model options of the command line (``tiltsmc serve``'s, as a dict by
    destination: ``{"policy": ..., "reward": ...}``; those left out the replica takes at the command
    line's defaults, ``cli.serve_model_defaults``) and the server's settings."""

    model_args: dict[str, Any]
    settings: Settings

    def __post_init__(self) -> None:
        """Checked as it is made, not in a replica once Ray has started: ``model_args`` a dict of
        ``tiltsmc serve``'s model options by name (the command line's destinations, those of
        ``cli.serve_model_defaults``: another is refused, never dropped), ``settings`` a ``Settings``;
        TypeError naming the field (and the unknown options)."""
        from ..cli import serve_model_defaults  # here: the CLI imports this module

        args = self.model_args
        if not isinstance(args, Mapping) or not all(isinstance(name, str) for name in args):
            raise TypeError(
                "model_args: expected a dict of tiltsmc serve's model options by name, got "
                f"{type(args).__name__} {args!r:.60}"
            )
        defaults = serve_model_defaults()
        unknown = [name for name in args if name not in defaults]
        if unknown:
            raise TypeError(
                f"model_args: {', '.join(map(repr, unknown))}: not a model option of tiltsmc serve (its "
                f"options by destination: {', '.join(defaults)})"
            )
        if not isinstance(self.settings, Settings):
            raise TypeError(
                f"settings: expected a tiltsmc.serving.server.Settings, got {type(self.settings).__name__}"
            )

    def namespace(self) -> argparse.Namespace:
        """The model options as ``tiltsmc serve``'s parsed command line: ``model_args``, the options left
        out at the command line's defaults (``cli.serve_model_defaults``)."""
        from ..cli import serve_model_defaults  # here: the CLI imports this module

        return argparse.Namespace(**{**serve_model_defaults(), **self.model_args})


class TiltsmcReplica:
    """One replica: the models, an engine and the HTTP app (Ray Serve builds the app after ``__init__``
    through ``__serve_build_asgi_app__``). Models that cannot load, and settings they cannot meet, raise a
    ValueError with ``tiltsmc serve``'s message (its status 2; RuntimeError for its status 1), which the
    command reports as such (see ``_raise_deploy_failed``)."""

    def __init__(self, options: ReplicaOptions) -> None:
        from ray import serve

        from .. import core
        from ..cli import CliError, _load_models_or_fail

        log_to_stderr()  # one JSON line per request, as tiltsmc serve logs them: the replica's stderr
        args = options.namespace()  # the options left out at their defaults
        # refused as tiltsmc serve refuses them (its status 2): a ValueError, the CLI's message its last line
        try:
            if getattr(args, "threads", None) is not None:
                core.set_num_threads(args.threads)
            policy, reward = _load_models_or_fail(args)
        except CliError as error:
            raise (ValueError if error.code == 2 else RuntimeError)(str(error)) from None
        self.engine = options.settings.engine(policy, reward)
        replica = serve.get_replica_context().replica_id.unique_id
        self.instance = f"{replica}@{os.getpid()}"
        try:
            app = options.settings.app(self.engine, self.instance)
        except ValueError as error:  # settings the models cannot meet (--max-tokens)
            self.engine.close(drain=False)
            raise ValueError(" ".join(str(error).split())) from None
        context = serve.get_replica_context()
        app.add_middleware(_RayReplica, drain=app.state.drain, application=context.app_name)  # outermost
        self.http_app = app  # not .app: the ingress has one

    def __serve_build_asgi_app__(self) -> Any:
        return self.http_app

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine has closed or failed is replaced."""
        stats = self.engine.stats()
        if stats["failed"] is not None:
            raise RuntimeError(f"replica {self.instance}: its engine failed: {stats['failed']}")
        if stats["closed"]:
            raise RuntimeError(f"replica {self.instance}: its engine is closed")


class _RayReplica:
    """ASGI middleware of a replica (the outermost).

    It leaves out the ``X-Request-ID`` header of tiltsmc's answer, since Ray Serve's proxy adds its own, the
    request's (the client's, else one it made and handed to the replica, which names the request by it), so
    that an answer has one. A client's id that tiltsmc refuses (not 1 to 64 of ``A-Z a-z 0-9 . _ -``) is
    echoed by Ray as sent, while the replica names the request (its completion's id, its log line) by one of
    its own.

    From its first request on, it watches (every ``DRAIN_POLL_S``) for its application being deleted (the
    command's take-down), and then begins the engine's drain (``app.state.drain``), as ``tiltsmc serve``
    does on SIGTERM: Ray Serve waits for a replica's requests before its ASGI lifespan ends, where the drain
    would begin, and cuts those still running at ``graceful_shutdown_timeout_s`` (its bare 500), where the
    drain answers them the 503 ``closed`` at the end of the grace period."""

    def __init__(self, app: Any, drain: Any = None, application: Optional[str] = None) -> None:
        self.app, self.drain, self.application = app, drain, application
        self.watching: Optional[asyncio.Task[None]] = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.watching is None and self.drain is not None and self.application is not None:
            self.watching = asyncio.get_running_loop().create_task(self._watch(self.application))

        async def send_once(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers") or []
                message["headers"] = [(k, v) for k, v in headers if k.lower() != b"x-request-id"]
            await send(message)

        await self.app(scope, receive, send_once)

    async def _watch(self, name: str) -> None:
        """Begin the drain once the application ``name`` is being deleted (or gone)."""
        from ray import serve

        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(DRAIN_POLL_S)
            try:
                status = await loop.run_in_executor(None, serve.status)
            except Exception:  # the controller out of reach for now: asked again
                continue
            application = status.applications.get(name)
            if application is None or application.status == "DELETING":
                self.drain.begin()
                return


def replica_model_args(
    options: ReplicaOptions, num_cpus: float = REPLICA_CPUS, num_gpus: float = REPLICA_GPUS
) -> dict[str, Any]:
    """The model options a replica loads its models with: ``options.model_args`` where a replica reserves
    a GPU; with none (``num_gpus`` 0), ``cpu`` set, so that its models run on the CPU (a GPU it did not
    reserve is outside Ray's accounting). ``threads`` left out (None) is the CPUs it reserves, rounded up
    (at least 1), shared out between its engine's workers (at least one each)."""
    args = dict(options.model_args)
    if num_gpus == 0:
        args["cpu"] = True
    if args.get("threads") is None:
        workers = max(1, int(options.settings.workers))
        args["threads"] = max(1, max(1, math.ceil(num_cpus)) // workers)
    return args


def backpressure_options() -> dict[str, Any]:
    """Ray Serve's answer to a request it refuses itself, its queue full (``max_queued_requests``: every
    replica full, or none running yet): a 429 with ``Retry-After: RETRY_AFTER_S`` from Ray 2.58
    (``backpressure_config``); before, Ray's 503 with no ``Retry-After``. Either way its body is Ray's
    plain text ("Request dropped due to backpressure ..."), not OpenAI's error object."""
    try:
        from ray.serve.config import BackpressureConfig  # noqa: F401  # Ray >= 2.58
    except ImportError:
        return {}
    return {"backpressure_config": {"status_code": 429, "retry_after_s": RETRY_AFTER_S}}


def proxy_request_timeout(settings: Settings) -> Optional[float]:
    """Seconds Ray Serve's proxy lets a request take, from its arrival (its wait in Ray's queue included):
    ``TIMEOUT_MARGIN + SEND_MARGIN`` past the requests' ``timeout``, by when a replica has answered its 504
    (as ``tiltsmc serve``'s uvicorn waits); past it the proxy answers its own 408 in plain text. None for
    no timeout."""
    timeout = settings.timeout
    if timeout is None or not math.isfinite(timeout):
        return None
    return float(timeout) + TIMEOUT_MARGIN + SEND_MARGIN


def _count(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int (not a bool) >= ``minimum``; TypeError or ValueError naming ``name``."""
    from ..samplers._engine import check_count

    return check_count(value, name, minimum=minimum)


def check_resource(value: Any, name: str) -> float:
    """A replica's ``num_cpus`` / ``num_gpus``: a finite number >= 0, either 0 or at least Ray's unit of
    ``RESOURCE_UNIT`` (0.0001); TypeError or ValueError naming ``name`` otherwise."""
    what = f"a finite number >= 0 (0, or at least {RESOURCE_UNIT:g}: Ray's unit)"
    quantity = real_number(value, name)
    if not math.isfinite(quantity) or quantity < 0 or 0 < quantity < RESOURCE_UNIT:
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return quantity + 0.0  # -0.0 as 0.0


def check_autoscaling(autoscaling: Any) -> dict[str, Any]:
    """Ray Serve's ``autoscaling_config`` as a dict, its replica bounds and target checked (``min_replicas``
    an int >= 0, ``max_replicas`` an int >= 1 and >= ``min_replicas``, ``target_ongoing_requests`` a finite
    number > 0; its other fields are Ray Serve's to check); TypeError or ValueError naming
    ``autoscaling`` and the field otherwise."""
    if not isinstance(autoscaling, Mapping):
        raise TypeError(f"autoscaling: expected a dict (Ray Serve's autoscaling_config), got {autoscaling!r}")
    config = dict(autoscaling)
    if "min_replicas" in config:
        config["min_replicas"] = _count(config["min_replicas"], "autoscaling: min_replicas", 0)
    if "max_replicas" in config:
        config["max_replicas"] = _count(config["max_replicas"], "autoscaling: max_replicas", 1)
    low, high = config.get("min_replicas"), config.get("max_replicas")
    if low is not None and high is not None and low > high:
        raise ValueError(f"autoscaling: min_replicas ({low}) must be <= max_replicas ({high})")
    if "target_ongoing_requests" in config:  # None too: Ray Serve's field is a number
        target = config["target_ongoing_requests"]
        what = "a finite number > 0"
        value = real_number(target, "autoscaling: target_ongoing_requests")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"autoscaling: target_ongoing_requests: expected {what}, got {target!r}")
        config["target_ongoing_requests"] = value
    return config


def deployment_options(
    options: ReplicaOptions,
    *,
    replicas: Optional[int] = None,
    autoscaling: Optional[dict[str, Any]] = None,
    num_cpus: float = REPLICA_CPUS,
    num_gpus: float = REPLICA_GPUS,
    max_ongoing_requests: Optional[int] = None,
) -> dict[str, Any]:
    """Ray Serve's deployment options of ``build_application`` with these arguments, each checked (needs
    no Ray): see ``build_application``."""
    if not isinstance(options, ReplicaOptions):
        raise TypeError(f"options: expected a ReplicaOptions, got {type(options).__name__}")
    if autoscaling is not None and replicas is not None:
        raise ValueError(
            f"replicas: not with autoscaling, which sets the replicas between its min_replicas and "
            f"max_replicas; give one of them (got replicas={replicas!r})"
        )
    replicas = REPLICAS if replicas is None else _count(replicas, "replicas", 1)
    config = None if autoscaling is None else check_autoscaling(autoscaling)
    settings = options.settings
    grace = real_number(settings.grace, "options: settings.grace")
    if not (math.isfinite(grace) and grace >= 0):
        raise ValueError(f"options: settings.grace: expected a finite number of seconds >= 0, got {grace!r}")
    actor_options = {
        "num_cpus": check_resource(num_cpus, "num_cpus"),
        "num_gpus": check_resource(num_gpus, "num_gpus"),
    }
    queue = _count(settings.max_queue, "options: settings.max_queue", 1)
    rows = _count(settings.max_batch_rows, "options: settings.max_batch_rows", 1)
    if max_ongoing_requests is None:  # only None: 0 is refused, not read as the default
        ongoing = queue + rows + ONGOING_HEADROOM
    else:
        ongoing = _count(max_ongoing_requests, "max_ongoing_requests", 1)
    deployment: dict[str, Any] = {
        "name": "tiltsmc",
        "ray_actor_options": actor_options,
        "max_ongoing_requests": ongoing,
        "max_queued_requests": ongoing,  # see the module's docstring
        # as tiltsmc serve's uvicorn waits for its handlers, and the replica's look at the status
        "graceful_shutdown_timeout_s": grace + TIMEOUT_MARGIN + SEND_MARGIN + DRAIN_POLL_S,
    }
    if config is not None:
        deployment["autoscaling_config"] = config
    else:
        deployment["num_replicas"] = replicas
    return deployment


def build_application(
    options: ReplicaOptions,
    *,
    replicas: Optional[int] = None,
    autoscaling: Optional[dict[str, Any]] = None,
    num_cpus: float = REPLICA_CPUS,
    num_gpus: float = REPLICA_GPUS,
    max_ongoing_requests: Optional[int] = None,
) -> Any:
    """The Ray Serve application: ``replicas`` replicas (None: ``REPLICAS``), or Ray Serve's
    ``autoscaling_config`` (with which ``replicas`` is refused), each with ``num_cpus`` / ``num_gpus`` and
    up to ``max_ongoing_requests`` requests (default: what its engine holds, ``max_queue`` waiting and
    ``max_batch_rows`` running, plus ``ONGOING_HEADROOM``), Ray queueing as many more at most
    (``max_queued_requests``; see the module's docstring and ``backpressure_options``); each replica's
    models loaded with ``replica_model_args`` (on the CPU where it reserves no GPU).

    Every argument is checked before Ray is imported: ``options`` a ``ReplicaOptions`` (its settings'
    ``grace`` and ``max_queue`` too), ``replicas`` None or an int >= 1,
    ``autoscaling`` None or a dict (see ``check_autoscaling``), ``num_cpus`` / ``num_gpus``
    finite numbers >= 0 (see ``check_resource``), ``max_ongoing_requests`` None or an int >= 1 (0 is
    refused, not read as the default); TypeError or ValueError naming the argument otherwise.

    The replicas are handed the settings' API key as its digest only (``ApiKeyDigest``): Ray keeps a
    deployment's arguments with the application, readable by whoever can reach the cluster. Without Ray
    Serve (the ray extra; it needs Python >= 3.10), an ImportError that says how to get it."""
    deployment = deployment_options(
        options, replicas=replicas, autoscaling=autoscaling, num_cpus=num_cpus, num_gpus=num_gpus,
        max_ongoing_requests=max_ongoing_requests,
    )  # fmt: skip
    settings = options.settings
    key = settings.api_key
    if isinstance(key, str):
        settings = dataclasses.replace(settings, api_key=ApiKeyDigest.of(key))
    model_args = replica_model_args(
        options, deployment["ray_actor_options"]["num_cpus"], deployment["ray_actor_options"]["num_gpus"]
    )
    options = ReplicaOptions(model_args, settings)
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ImportError(_missing_ray("build_application")) from None

    try:  # late-bound: each replica builds its app around its own engine (__serve_build_asgi_app__)
        ingress = serve.ingress()(TiltsmcReplica)
    except TypeError:  # before Ray 2.56 the ingress needs its app when the class is declared
        raise ImportError(
            f"--ray needs Ray Serve >= 2.56 (its late-bound ingress), got ray {ray.__version__}: "
            "pip install -U 'ray[serve]>=2.56.1' (Python >= 3.10)"
        ) from None
    return serve.deployment(**deployment, **backpressure_options())(ingress).bind(options)


def _missing_ray(what: str, version: Optional[tuple[int, ...]] = None) -> str:
    """The message of an ImportError where ``what`` (``--ray``, ``build_application``) finds no Ray Serve,
    on Python ``version`` (default: this one's): the ray extra to install, as ``tiltsmc serve`` names its
    own; before Python 3.10, where that extra installs no Ray (the Ray Serve it needs, >= 2.56, has no
    release there), that Ray Serve needs a newer Python."""
    major, minor = (sys.version_info if version is None else version)[:2]
    if (major, minor) < (3, 10):
        return (
            f"{what} needs Ray Serve >= 2.56, which needs Python >= 3.10 (this is Python {major}.{minor}, "
            "where the ray extra installs no Ray): run it with Python 3.10 or newer"
        )
    return f"{what} needs the ray extra: pip install 'tiltsmc[ray,cpu]' (or ray,gpu)"


def autoscale_range(text: str) -> tuple[int, int]:
    """``--autoscale MIN:MAX``: integers with ``0 <= MIN <= MAX`` and ``MAX >= 1``."""
    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX, got {text!r}") from None
    if not 0 <= low <= high or high < 1:
        raise argparse.ArgumentTypeError(f"expected 0 <= MIN <= MAX, MAX >= 1, got {text}")
    return low, high


def _replica_resource(text: str) -> float:
    """``--replica-cpus`` / ``--replica-gpus``: what ``check_resource`` takes."""
    what = f"a finite number >= 0 (0, or at least {RESOURCE_UNIT:g}: Ray's unit)"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    try:
        return check_resource(value, "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``tiltsmc serve``'s Ray options, checked as they are parsed; each is refused without ``--ray``
    (``check_options``). Those left out take ``build_application``'s defaults."""
    group = parser.add_argument_group("Ray Serve (the ray extra; these options need --ray)")
    group.add_argument("--ray", action="store_true", help="serve replicas of the engine on Ray Serve")
    group.add_argument(
        "--replicas", type=positive_int_option, default=None, help=f"replicas (default: {REPLICAS})"
    )
    group.add_argument(
        "--autoscale",
        type=autoscale_range,
        default=None,
        metavar="MIN:MAX",
        help="autoscale between MIN and MAX replicas instead of --replicas",
    )
    group.add_argument(
        "--target-ongoing",
        type=positive_real_option,
        default=None,
        help="with --autoscale: ongoing requests per replica it aims at (default: Ray Serve's)",
    )
    group.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local one)")
    group.add_argument(
        "--replica-cpus",
        type=_replica_resource,
        default=None,
        help=f"CPUs each replica reserves (default: {REPLICA_CPUS:g})",
    )
    group.add_argument(
        "--replica-gpus",
        type=_replica_resource,
        default=None,
        help=f"GPUs each replica reserves (default: {REPLICA_GPUS:g})",
    )


def check_options(args: argparse.Namespace) -> None:
    """Refuse (ValueError naming the option) ``tiltsmc serve``'s Ray options given without ``--ray``,
    ``--target-ongoing`` without ``--autoscale`` and ``--replicas`` with it: options that would be dropped
    silently. Needs no Ray (``tiltsmc serve`` checks them before anything starts)."""
    given = [name for name in RAY_OPTIONS if getattr(args, name, None) is not None]
    if not getattr(args, "ray", False):
        if given:
            option = "--" + given[0].replace("_", "-")
            raise ValueError(f"{option}: an option of --ray (Ray Serve); give --ray too, or leave it out")
        return
    # a namespace built otherwise than by the parser may lack the options left out
    target_ongoing, autoscale = getattr(args, "target_ongoing", None), getattr(args, "autoscale", None)
    if target_ongoing is not None and autoscale is None:
        raise ValueError(
            "--target-ongoing: an option of --autoscale (the ongoing requests per replica it aims at); give "
            "--autoscale MIN:MAX too, or leave it out"
        )
    if getattr(args, "replicas", None) is not None and autoscale is not None:
        raise ValueError(
            "--replicas: not with --autoscale, which sets the replicas between MIN and MAX; give one of them"
        )


def replica_cpus(args: argparse.Namespace) -> float:
    """The CPUs each replica reserves: ``--replica-cpus``, else ``build_application``'s default."""
    value = getattr(args, "replica_cpus", None)
    return REPLICA_CPUS if value is None else float(value)


def application_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """``build_application``'s keyword arguments from ``tiltsmc serve --ray``'s options (checked by
    ``check_options``; an ``--autoscale`` given as the text ``MIN:MAX`` is parsed): those given only, so
    that the others take ``build_application``'s defaults."""
    check_options(args)
    arguments: dict[str, Any] = {}
    autoscale = getattr(args, "autoscale", None)
    if autoscale is not None:
        if isinstance(autoscale, str):
            try:
                autoscale = autoscale_range(autoscale)
            except argparse.ArgumentTypeError as error:
                raise ValueError(f"--autoscale: {error}") from None
        if not isinstance(autoscale, (tuple, list)) or len(autoscale) != 2:
            raise ValueError(f"--autoscale: expected MIN:MAX (or a pair of ints), got {autoscale!r}")
        low, high = autoscale
        arguments["autoscaling"] = {"min_replicas": low, "max_replicas": high}
        target_ongoing = getattr(args, "target_ongoing", None)
        if target_ongoing is not None:
            arguments["autoscaling"]["target_ongoing_requests"] = target_ongoing
    for option, argument in (
        ("replicas", "replicas"),
        ("replica_cpus", "num_cpus"),
        ("replica_gpus", "num_gpus"),
    ):
        if getattr(args, option, None) is not None:
            arguments[argument] = getattr(args, option)
    return arguments


class DeployFailed(RuntimeError):
    """Ray Serve could not deploy the application (a replica could not start: its models, its options)."""


def serve_on_ray(args: argparse.Namespace, options: ReplicaOptions) -> int:
    """Deploy on Ray Serve and serve until SIGTERM / SIGINT; then take the application down, its replicas
    finishing their requests in flight within the grace period while the proxy still answers, those left
    unfinished getting the 503 ``closed`` as from ``tiltsmc serve`` (and Serve and the Ray instance, where
    this command started them).

    Without ``--address`` the command starts a Ray instance of its own (never joining ``RAY_ADDRESS`` or a
    cluster started on the machine), after checking that ``--host`` / ``--port`` can be listened on
    (``--port 0`` is refused: Ray Serve would not say which port it took), its proxy ending a request
    ``TIMEOUT_MARGIN + SEND_MARGIN`` seconds past ``--timeout`` (``proxy_request_timeout``). With
    ``--address`` it joins that cluster, refuses a ``--port`` or ``--host`` other than those Serve already
    listens on there (and keeps that Serve's own request timeout, if any), and on exit deletes its own
    application only, leaving Serve and the cluster's other applications running. The variable of
    ``--api-key-env`` (read already, into ``options``) is taken out of the environment before Ray starts,
    so that the processes of a Ray instance started here do not inherit the key. A signal while the
    replicas start stops the command too; the wait for them is reported every so often with what holds them
    back (``waiting_for_replicas``).

    On a cluster joined, an ``--address`` where no Ray cluster answers, and an application named
    ``tiltsmc`` already there (another ``tiltsmc serve --ray``, which deploying would replace and the exit
    delete), are refused before deploying, that application left running.

    Bad options raise ValueError naming the option (before Ray starts, or before deploying for a Serve that
    listens elsewhere; a setting or model the replicas refuse, with their message, as ``tiltsmc serve``
    refuses it), a missing ray extra ImportError, a failed deployment
    [`DeployFailed`][tiltsmc.serving.ray.DeployFailed] with the last line of Ray's error (the deployment's,
    where the replicas failed)."""
    arguments = application_arguments(args)
    _check_application_arguments(options, arguments)
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ImportError(_missing_ray("--ray")) from None
    if args.port == 0:  # Ray Serve's proxy would take a port of its own choosing and not say which
        raise ValueError("--port: 0 (a port the system picks) is not taken with --ray; give a port")
    local = args.address is None
    if local:  # refused here, not in a Ray traceback once Ray has started
        listening_socket(args.host, args.port).close()
    else:  # refused here, not after Ray's minutes of retries
        _check_address(args.address)
    log_to_stderr()
    key_variable = getattr(args, "api_key_env", None)
    if key_variable is not None:  # read (Settings); not handed to the processes of the Ray instance started
        os.environ.pop(key_variable, None)
    stop, hurry = threading.Event(), threading.Event()

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        (hurry if stop.is_set() else stop).set()  # a second signal cuts the take-down's wait short

    previous_handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    serve_started = deployed = served = False
    try:
        _handle_signals(on_signal)
        try:
            ray.init(  # "local": a new instance, even where RAY_ADDRESS or a running cluster is in reach
                address="local" if local else args.address,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
        except ConnectionError as error:  # --address: no cluster found (auto), or none answered as Ray
            if local:
                raise
            message = _last_line(str(error), "no Ray cluster answered")
            raise ValueError(
                f"--address {args.address}: cannot join a Ray cluster there: {message}"
            ) from None
        _handle_signals(on_signal)  # again: ray.init installs a SIGTERM handler of its own
        if not stop.is_set():
            serve_started = True  # from here on Serve may run: shut down on exit, on the instance started
            http_options: dict[str, Any] = {"host": args.host, "port": args.port}
            request_timeout = proxy_request_timeout(options.settings)
            if request_timeout is not None:
                http_options["request_timeout_s"] = request_timeout
            serve.start(http_options=http_options)
            host, port = _serve_http_address(args.host, args.port)
            if port != args.port:
                raise ValueError(
                    f"--port: Ray Serve already runs on the cluster at --address {args.address}, listening "
                    f"on port {port}, and keeps it: give --port {port}"
                )
            if host != args.host:
                raise ValueError(
                    f"--host: Ray Serve already runs on the cluster at --address {args.address}, listening "
                    f"on host {host}, and keeps it: give --host {host}"
                )
            if not local:
                _refuse_a_running_application(serve, args.address)
            application = build_application(options, **arguments)
            deployed = True  # from here on the application may exist on the cluster: taken down on exit
            serve.run_many(
                [serve.RunTarget(application, name=APP_NAME, route_prefix="/")],
                wait_for_applications_running=False,
            )
            served = _wait_for_replicas(ray, serve, deployment_options(options, **arguments), stop)
            if served:
                listening = {"event": "listening", "host": host, "port": port, "ray": True}
                listening["ray_logs"] = _logs_folder(ray)
                logger.info(json.dumps(listening))
                stop.wait()
        logger.info(json.dumps({"event": "stopping", "ray": True}))
    except DeployFailed:
        raise
    except (RuntimeError, TimeoutError, ray.exceptions.RayError) as error:  # a replica, the proxy, ...
        message = _last_line(str(error), type(error).__name__)
        raise DeployFailed(f"Ray Serve could not deploy: {message}") from None
    finally:
        drain_within = options.settings.grace + TAKE_DOWN_MARGIN_S
        _take_down(
            ray, serve, local=local, serve_started=serve_started, deployed=deployed, served=served,
            drain_within=drain_within, hurry=hurry,
        )  # fmt: skip
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
    return 0


def _check_address(address: str) -> None:
    """Refuse (ValueError naming ``--address``) an address ``HOST:PORT`` (or ``ray://HOST:PORT``) where
    nothing accepts a connection within ``ADDRESS_TIMEOUT_S``, before Ray is reached: ``ray.init`` tries such
    an address for minutes (20 tries of about 41 s each with Ray 2.60's defaults, its warnings filling
    standard error) and then fails with a ConnectionError. Another form of address (``auto``) is Ray's to
    resolve; a port that accepts but is not Ray's is found out by ``ray.init``, after its tries."""
    target = address.split("://", 1)[-1]
    host, colon, port_text = target.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # an IPv6 address, [::1]:6379
    if not colon or not host or not port_text.isdigit():
        return
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"--address {address}: {port} is not a port (1 to 65535)")
    try:
        socket.create_connection((host, port), timeout=ADDRESS_TIMEOUT_S).close()
    except OSError as error:  # refused, unreachable, a host unknown, a timeout (whose strerror is None)
        reason = error.strerror or str(error) or type(error).__name__
        raise ValueError(
            f"--address {address}: no Ray cluster there (cannot connect to {host}:{port}: {reason}); give "
            "the address of a running cluster's head, or leave --address out to start a Ray instance"
        ) from None


def _refuse_a_running_application(serve: Any, address: str) -> None:
    """Refuse (ValueError naming ``--address`` and the application) a cluster joined where Ray Serve already
    has an application named ``APP_NAME``: most likely another ``tiltsmc serve --ray --address``, which
    deploying would replace silently (``serve.run_many`` redeploys an application of the same name), and
    which this command would then delete on exit. Checked before deploying, so that it is left running.
    (Two commands started at the same instant may both find none: Ray Serve has no "deploy unless there".)"""
    application = serve.status().applications.get(APP_NAME)
    if application is not None:
        status = getattr(application.status, "value", application.status)  # a str Enum
        raise ValueError(
            f"--address {address}: Ray Serve on this cluster already has an application named {APP_NAME!r} "
            f"(status {status}: another tiltsmc serve --ray?), which deploying would replace; stop it "
            "first, or deploy on another cluster"
        )


def _handle_signals(handler: Callable[[int, Optional[FrameType]], None]) -> None:
    """``handler`` for SIGTERM and SIGINT."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)


def _serve_http_address(host: str, port: int) -> tuple[str, int]:
    """The host and port Ray Serve's proxies listen on: a Serve instance already running on a cluster keeps
    its own, whatever ``serve.start`` asked (Ray only warns); ``host`` and ``port`` where this Ray does not
    say."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        if client is not None:
            return str(client.http_config.host), int(client.http_config.port)
    except (ImportError, AttributeError):  # pragma: no cover - a Ray that moved it
        pass
    return host, port


def _wait_for_replicas(ray: Any, serve: Any, deployment: dict[str, Any], stop: threading.Event) -> bool:
    """Wait until the application runs (True) or SIGTERM / SIGINT arrives (False), checking its status
    every ``POLL_INTERVAL_S``; DeployFailed with the last line of Ray Serve's message where it gave up.
    After ``WAITING_REPORT_S`` seconds, and every ``WAITING_REPORT_S`` more, logs a ``waiting_for_replicas``
    line saying what holds the replicas back."""
    started = time.monotonic()
    report_at = started + WAITING_REPORT_S
    while True:
        application = serve.status().applications.get(APP_NAME)
        status = "NOT_STARTED" if application is None else application.status  # a str Enum
        if status == "RUNNING":
            return True
        if status == "DEPLOY_FAILED":
            _raise_deploy_failed(application, deployment["name"])
        now = time.monotonic()
        if now >= report_at:
            logger.warning(json.dumps(_waiting_report(ray, application, deployment, now - started)))
            report_at = now + WAITING_REPORT_S
        if stop.wait(POLL_INTERVAL_S):
            return False


def _raise_deploy_failed(application: Any, name: str) -> None:
    """Raise why the application failed to deploy: the last line of its deployment's message (its replicas'
    error; the application's own says only "Failed to update the deployments"), else the application's. A
    replica's ValueError (settings or models it refuses, as ``tiltsmc serve`` refuses them with status 2)
    is a ValueError with its message; anything else DeployFailed."""
    states = getattr(application, "deployments", {}).get(name)
    message = _last_line(getattr(states, "message", "") or "", "")
    if not message:
        message = _last_line(getattr(application, "message", "") or "", "its status is DEPLOY_FAILED")
    kind, colon, text = message.partition(": ")
    if colon and kind.rsplit(".", 1)[-1] == "ValueError" and text:
        raise ValueError(text)
    raise DeployFailed(f"Ray Serve could not deploy: {message}")


def _logs_folder(ray: Any) -> Optional[str]:
    """The folder of this node's Ray logs (where a replica here writes its standard error), or None where
    this Ray does not say."""
    try:
        node = ray._private.worker._global_node
        return None if node is None else str(node.get_logs_dir_path())
    except AttributeError:  # pragma: no cover - a Ray that moved it
        return None


def _waiting_report(ray: Any, application: Any, deployment: dict[str, Any], waited: float) -> dict[str, Any]:
    """The ``waiting_for_replicas`` log record: the replicas running and wanted, and why the others are not
    running yet (a replica no node can hold; else Ray Serve's word; else starting)."""
    autoscaling = deployment.get("autoscaling_config")
    wanted = deployment["num_replicas"] if autoscaling is None else autoscaling.get("min_replicas", 1)
    states: Any = None if application is None else application.deployments.get(deployment["name"])
    running = 0 if not states else int(states.replica_states.get("RUNNING", 0))
    reason = _placement_problem(ray, deployment["ray_actor_options"])
    if reason is None and states and states.message:
        reason = "Ray Serve: " + " ".join(states.message.split())
    if reason is None:
        reason = "the replicas are starting (loading the models)"
    return {
        "event": "waiting_for_replicas",
        "ray": True,
        "running": running,
        "replicas": wanted,
        "seconds": round(waited),
        "message": f"waiting for {max(wanted - running, 0)} of {wanted} replicas: {reason}",
    }


def _placement_problem(ray: Any, actor_options: dict[str, float]) -> Optional[str]:
    """Why Ray cannot place a replica on any node of the cluster as it is (its CPUs and GPUs), or None
    where a node has what a replica reserves."""
    cpus, gpus = actor_options["num_cpus"], actor_options["num_gpus"]
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    if any(node.get("CPU", 0.0) >= cpus and node.get("GPU", 0.0) >= gpus for node in nodes):
        return None
    most_cpus = max((node.get("CPU", 0.0) for node in nodes), default=0.0)
    most_gpus = max((node.get("GPU", 0.0) for node in nodes), default=0.0)
    return (
        f"Ray cannot place a replica with {cpus:g} CPUs and {gpus:g} GPUs (--replica-cpus, --replica-gpus): "
        f"no node of the cluster has as many (at most {most_cpus:g} CPUs, {most_gpus:g} GPUs); give less, "
        "or add a node that has them"
    )


def _last_line(message: str, default: str) -> str:
    """The last line of an error message without its ANSI colour codes (Ray's carry the remote traceback,
    coloured, before the line that says what failed); ``default`` for an empty one."""
    lines = [line.strip() for line in _ANSI_ESCAPE.sub("", message).splitlines() if line.strip()]
    return lines[-1] if lines else default


# build_application's arguments as `tiltsmc serve --ray` names them
_OPTION_OF = {
    "replicas": "--replicas",
    "num_cpus": "--replica-cpus",
    "num_gpus": "--replica-gpus",
    "autoscaling: target_ongoing_requests": "--target-ongoing",
    "autoscaling": "--autoscale",  # its replica bounds (after --target-ongoing's, the longer name)
}


def _check_application_arguments(options: ReplicaOptions, arguments: dict[str, Any]) -> None:
    """``build_application``'s checks of ``arguments`` before Ray starts: ValueError naming the option
    (``tiltsmc serve``'s parser checked them already; a namespace built otherwise may hold anything)."""
    try:
        deployment = deployment_options(options, **arguments)
    except (TypeError, ValueError) as error:
        message = str(error)
        for argument, option in _OPTION_OF.items():
            if message.startswith(f"{argument}:"):
                message = option + message[len(argument) :]
                break
        raise ValueError(message) from None
    if deployment["ray_actor_options"]["num_gpus"] == 0:  # its models run on the CPU (replica_model_args)
        for provider, *_ in options.model_args.get("provider_option") or ():
            if provider != "CPUExecutionProvider":
                raise ValueError(
                    f"--provider-option: a replica that reserves no GPU (--replica-gpus 0, the default) runs "
                    f"its models on the CPU, not on {provider}: its options would have no effect; give "
                    "--replica-gpus, or leave the option out"
                )


def _take_down(
    ray: Any,
    serve: Any,
    *,
    local: bool,
    serve_started: bool,
    deployed: bool,
    served: bool,
    drain_within: float,
    hurry: threading.Event,
) -> None:
    """Take down what the command started. An application that served (``served``: announced as listening)
    is deleted first, its replicas finishing their requests in flight (up to the grace period) while the
    proxy still routes their answers; then, on the Ray instance the command started (``local``), Serve
    (where ``serve.start`` was called: ``serve.shutdown`` would start Ray to look for it otherwise) and
    Ray. On a cluster joined (``--address``) the command deletes its own application only (one that never
    ran without waiting: nothing is in flight) and disconnects, leaving Serve and the cluster's other
    applications running. On its own instance an application that never ran goes with Ray: Serve stops a
    replica still starting only after its grace period, ``serve.delete`` and ``serve.shutdown`` alike.

    A step that fails is logged and the next one still runs: raised here, its error would replace the one
    that ended serving (seen on a loaded machine: a deployment's failure reported as the proxy that
    ``serve.shutdown`` had just killed)."""
    starting = deployed and not served  # replicas may still be starting
    steps: list[tuple[str, Callable[[], Any]]] = []
    if deployed and not (local and starting):
        wait = drain_within if served else 0.0
        steps.append(("serve.delete", lambda: _delete_application(serve, wait, hurry)))
    if local and serve_started and not starting:
        steps.append(("serve.shutdown", serve.shutdown))
    steps.append(("ray.shutdown", ray.shutdown))  # on a cluster joined: this process's connection only
    for name, step in steps:
        try:
            step()
        except Exception as error:
            logger.warning(json.dumps({"event": "ray_take_down_failed", "step": name, "error": repr(error)}))


def _delete_application(serve: Any, within: float, hurry: threading.Event) -> None:
    """Delete tiltsmc's application and wait until Ray Serve has stopped its replicas (each after its
    requests in flight, within ``graceful_shutdown_timeout_s``: the grace period), ``within`` seconds at
    most (0: not at all), then TimeoutError; a second SIGTERM / SIGINT (``hurry``) stops the wait. Not
    ``serve.delete``'s own wait, which gives up after 60 s whatever the grace period."""
    serve.delete(APP_NAME, _blocking=False)
    if within <= 0:
        return
    deadline = time.monotonic() + within
    while APP_NAME in serve.status().applications:
        if hurry.wait(POLL_INTERVAL_S):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"Ray Serve did not delete the application {APP_NAME!r} within {within:g} s")
