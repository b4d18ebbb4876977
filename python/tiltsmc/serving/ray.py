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
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from .server import Settings, log_to_stderr, logger

__all__ = ["ReplicaOptions", "TiltsmcReplica", "build_application", "serve_on_ray"]

APP_NAME = "tiltsmc"


@dataclass(frozen=True)
class ReplicaOptions:
    """What a replica needs: the model options of the command line (``tiltsmc serve``'s, as a dict) and
    the server's settings."""

    model_args: dict[str, Any]
    settings: Settings


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


def build_application(
    options: ReplicaOptions,
    *,
    replicas: int = 1,
    autoscaling: Optional[dict[str, Any]] = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    max_ongoing_requests: Optional[int] = None,
) -> Any:
    """The Ray Serve application: ``replicas`` replicas (or Ray Serve's ``autoscaling_config``), each
    with ``num_cpus`` / ``num_gpus`` and up to ``max_ongoing_requests`` requests (default: the engine's
    ``max_queue``)."""
    import ray
    from ray import serve

    deployment_options: dict[str, Any] = {
        "name": "tiltsmc",
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "max_ongoing_requests": max_ongoing_requests or options.settings.max_queue,
        "graceful_shutdown_timeout_s": options.settings.grace,
    }
    if autoscaling is not None:
        deployment_options["autoscaling_config"] = autoscaling
    else:
        deployment_options["num_replicas"] = replicas
    try:  # late-bound: each replica builds its app around its own engine (__serve_build_asgi_app__)
        ingress = serve.ingress()(TiltsmcReplica)
    except TypeError:  # before Ray 2.56 the ingress needs its app when the class is declared
        raise ImportError(
            f"--ray needs Ray Serve >= 2.56 (its late-bound ingress), got ray {ray.__version__}: "
            "pip install -U 'ray[serve]>=2.56.1' (Python >= 3.10)"
        ) from None
    return serve.deployment(**deployment_options)(ingress).bind(options)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``tiltsmc serve``'s Ray options."""
    group = parser.add_argument_group("Ray Serve (the ray extra)")
    group.add_argument("--ray", action="store_true", help="serve replicas of the engine on Ray Serve")
    group.add_argument("--replicas", type=int, default=1, help="replicas (with --ray)")
    group.add_argument(
        "--autoscale", default=None, metavar="MIN:MAX", help="autoscale between MIN and MAX replicas instead"
    )
    group.add_argument(
        "--target-ongoing", type=float, default=None, help="autoscaling: ongoing requests per replica"
    )
    group.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local one)")
    group.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs each replica reserves")
    group.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs each replica reserves")


class DeployFailed(RuntimeError):
    """Ray Serve could not deploy the application (a replica could not start: its models, its options)."""


def serve_on_ray(args: argparse.Namespace, options: ReplicaOptions) -> int:
    """Deploy on Ray Serve and serve until SIGTERM / SIGINT; then take the application down (and the
    local Ray instance, where this command started it). Bad options raise ValueError, a missing ray extra
    ImportError, a failed deployment [`DeployFailed`][tiltsmc.serving.ray.DeployFailed]."""
    autoscaling = None
    if args.autoscale is not None:
        try:
            low, high = (int(part) for part in args.autoscale.split(":"))
        except ValueError:
            raise ValueError(f"--autoscale: expected MIN:MAX, got {args.autoscale!r}") from None
        if not 0 <= low <= high or high < 1:
            raise ValueError(f"--autoscale: expected 0 <= MIN <= MAX, MAX >= 1, got {args.autoscale}")
        autoscaling = {"min_replicas": low, "max_replicas": high}
        if args.target_ongoing is not None:
            autoscaling["target_ongoing_requests"] = args.target_ongoing
    elif args.replicas < 1:
        raise ValueError("--replicas: expected an integer >= 1")
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
        application = build_application(
            options,
            replicas=args.replicas,
            autoscaling=autoscaling,
            num_cpus=args.replica_cpus,
            num_gpus=args.replica_gpus,
        )
        serve.run(application, name=APP_NAME, route_prefix="/")
        logger.info(json.dumps({"event": "listening", "host": args.host, "port": args.port, "ray": True}))
        stop.wait()
        logger.info(json.dumps({"event": "stopping", "ray": True}))
    except RuntimeError as error:  # a replica that could not start (its models, its options)
        raise DeployFailed(f"Ray Serve could not deploy: {error}") from None
    finally:
        _take_down(ray, serve, started_here)
    return 0


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
