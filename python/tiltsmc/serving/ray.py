"""Scale out on Ray Serve: replicas of the engine behind one endpoint (the ``ray`` extra, ``ray[serve]``).

Each replica is a Ray actor that loads the models once, holds one [`Engine`][tiltsmc.Engine] and serves the
same FastAPI app as ``tiltsmc serve``
([`tiltsmc.serving.server.create_app`][tiltsmc.serving.server.create_app]) through Ray Serve's ingress, so the
HTTP API, its errors and its metrics are the same; every answer names its replica in the
``X-Tiltsmc-Instance`` header. Ray Serve routes each request to a replica with few requests ongoing, up to
``max_ongoing_requests`` each (by default the engine's ``max_queue``: a replica takes what its engine can
queue, and Ray queues the rest), starts a new replica when one dies (its requests in flight end with an error;
a request is idempotent given its seed, so a client may retry it), and with ``autoscaling`` adds and removes
replicas on the ongoing requests.

``tiltsmc serve --ray --replicas K ...`` starts a local Ray instance (or joins ``--address``), deploys,
and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

from .._options import positive_int_option, positive_real_option
from ..models._config import real_number
from .server import Settings, log_to_stderr, logger

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


@dataclass(frozen=True)
class ReplicaOptions:
    """What a replica needs: the model options of the command line (``tiltsmc serve``'s, as a dict) and
    the server's settings."""

    model_args: dict[str, Any]
    settings: Settings

    def __post_init__(self) -> None:
        """Checked as it is made, not in a replica once Ray has started: ``model_args`` a dict of option
        names (the command line's destinations), ``settings`` a ``Settings``; TypeError naming the field."""
        args = self.model_args
        if not isinstance(args, Mapping) or not all(isinstance(name, str) for name in args):
            raise TypeError(
                "model_args: expected a dict of tiltsmc serve's model options by name, got "
                f"{type(args).__name__} {args!r:.60}"
            )
        if not isinstance(self.settings, Settings):
            raise TypeError(
                f"settings: expected a tiltsmc.serving.server.Settings, got {type(self.settings).__name__}"
            )


class TiltsmcReplica:
    """One replica: the models, an engine and the HTTP app (Ray Serve builds the app after ``__init__``
    through ``__serve_build_asgi_app__``)."""

    def __init__(self, options: ReplicaOptions) -> None:
        from ray import serve

        from ..cli import _load_models

        policy, reward = _load_models(argparse.Namespace(**options.model_args))
        self.engine = options.settings.engine(policy, reward)
        replica = serve.get_replica_context().replica_id.unique_id
        self.instance = f"{replica}@{os.getpid()}"
        self.http_app = options.settings.app(self.engine, self.instance)  # not .app: the ingress has one

    def __serve_build_asgi_app__(self) -> Any:
        return self.http_app

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine has closed or failed is replaced."""
        stats = self.engine.stats()
        if stats["failed"] is not None:
            raise RuntimeError(f"replica {self.instance}: its engine failed: {stats['failed']}")
        if stats["closed"]:
            raise RuntimeError(f"replica {self.instance}: its engine is closed")


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
    if max_ongoing_requests is None:  # only None: 0 is refused, not read as the default
        ongoing = _count(settings.max_queue, "options: settings.max_queue", 1)
    else:
        ongoing = _count(max_ongoing_requests, "max_ongoing_requests", 1)
    deployment: dict[str, Any] = {
        "name": "tiltsmc",
        "ray_actor_options": actor_options,
        "max_ongoing_requests": ongoing,
        "graceful_shutdown_timeout_s": grace,
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
    up to ``max_ongoing_requests`` requests (default: the engine's ``max_queue``).

    Every argument is checked before Ray is imported: ``options`` a ``ReplicaOptions`` (its settings'
    ``grace`` and ``max_queue`` too), ``replicas`` None or an int >= 1,
    ``autoscaling`` None or a dict (see ``check_autoscaling``), ``num_cpus`` / ``num_gpus``
    finite numbers >= 0 (see ``check_resource``), ``max_ongoing_requests`` None or an int >= 1 (0 is
    refused, not read as the default); TypeError or ValueError naming the argument otherwise."""
    deployment = deployment_options(
        options, replicas=replicas, autoscaling=autoscaling, num_cpus=num_cpus, num_gpus=num_gpus,
        max_ongoing_requests=max_ongoing_requests,
    )  # fmt: skip
    import ray
    from ray import serve

    try:  # late-bound: each replica builds its app around its own engine (__serve_build_asgi_app__)
        ingress = serve.ingress()(TiltsmcReplica)
    except TypeError:  # before Ray 2.56 the ingress needs its app when the class is declared
        raise ImportError(
            f"--ray needs Ray Serve >= 2.56 (its late-bound ingress), got ray {ray.__version__}: "
            "pip install -U 'ray[serve]>=2.56.1' (Python >= 3.10)"
        ) from None
    return serve.deployment(**deployment)(ingress).bind(options)


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
    """Deploy on Ray Serve and serve until SIGTERM / SIGINT; then take the application down (and the
    local Ray instance, where this command started it). Bad options raise ValueError (before Ray starts),
    a missing ray extra ImportError, a failed deployment
    [`DeployFailed`][tiltsmc.serving.ray.DeployFailed]."""
    arguments = application_arguments(args)
    _check_application_arguments(options, arguments)
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ImportError("--ray needs the ray extra: pip install 'tiltsmc[ray,cpu]' (or ray,gpu)") from None
    started_here = args.address is None
    log_to_stderr()
    ray.init(
        address=args.address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs handlers of its own
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        application = build_application(options, **arguments)
        serve.run(application, name=APP_NAME, route_prefix="/")
        logger.info(json.dumps({"event": "listening", "host": args.host, "port": args.port, "ray": True}))
        stop.wait()
        logger.info(json.dumps({"event": "stopping", "ray": True}))
    except RuntimeError as error:  # a replica that could not start (its models, its options)
        raise DeployFailed(f"Ray Serve could not deploy: {error}") from None
    finally:
        _take_down(ray, serve, started_here)
    return 0


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
        deployment_options(options, **arguments)
    except (TypeError, ValueError) as error:
        message = str(error)
        for argument, option in _OPTION_OF.items():
            if message.startswith(f"{argument}:"):
                message = option + message[len(argument) :]
                break
        raise ValueError(message) from None


def _take_down(ray: Any, serve: Any, started_here: bool) -> None:
    """Take the application down, and the local Ray instance where this command started it. A step that
    fails is logged and the next one still runs: raised here, its error would replace the one that ended
    serving (seen on a loaded machine: a deployment's failure reported as the proxy that ``serve.shutdown``
    had just killed)."""
    steps: list[tuple[str, Callable[[], Any]]] = (
        [("serve.shutdown", serve.shutdown), ("ray.shutdown", ray.shutdown)]
        if started_here
        else [("serve.delete", lambda: serve.delete(APP_NAME))]
    )
    for name, step in steps:
        try:
            step()
        except Exception as error:
            logger.warning(json.dumps({"event": "ray_take_down_failed", "step": name, "error": repr(error)}))
