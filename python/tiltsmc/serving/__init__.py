"""Serving: the engine that batches concurrent requests step by step, its admission, and (with the
``serve`` extra) the HTTP server."""

from .engine import SAMPLERS, Engine, sampler_defaults
from .scheduler import EngineClosed, Overloaded

__all__ = ["SAMPLERS", "Engine", "EngineClosed", "Overloaded", "sampler_defaults"]
