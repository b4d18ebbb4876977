"""What every sampler returns: samples, normalised log-weights, the log Z estimate and diagnostics."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import numpy.typing as npt

__all__ = ["Compute", "SamplerResult"]


@dataclass
class Compute:
    """Compute spent, on one basis for every sampler (so samplers compare at equal budgets)."""

    policy_calls: int = 0
    policy_steps: int = 0  # particle-steps proposed (one step of one particle counts once)
    policy_tokens: int = 0  # tokens those steps appended (more than the steps where a step spans tokens)
    reward_calls: int = 0
    reward_evaluations: int = 0  # prefixes scored
    policy_seconds: float = 0.0
    reward_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def bookkeeping_seconds(self) -> float:
        """Weights, resampling, reordering and Python glue: everything but the models."""
        return max(self.total_seconds - self.policy_seconds - self.reward_seconds, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy_calls": self.policy_calls,
            "policy_steps": self.policy_steps,
            "policy_tokens": self.policy_tokens,
            "reward_calls": self.reward_calls,
            "reward_evaluations": self.reward_evaluations,
            "policy_seconds": self.policy_seconds,
            "reward_seconds": self.reward_seconds,
            "bookkeeping_seconds": self.bookkeeping_seconds,
            "total_seconds": self.total_seconds,
        }


class Timer:
    """Accumulates wall time into a Compute field: ``with timer("policy"): ...``."""

    def __init__(self, compute: Compute) -> None:
        self.compute = compute
        self._start = time.perf_counter()

    def finish(self) -> None:
        self.compute.total_seconds += time.perf_counter() - self._start


@dataclass
class SamplerResult:
    """Per prompt ``b``: ``samples[b]`` (``(N, T)`` for fixed-horizon tasks, else a list of sequences),
    ``log_weights[b]`` (``(N,)``, ``logsumexp = 0``), ``log_z[b]`` (estimate of ``log Z``), and diagnostics.

    Per step (arrays ``(B, steps)``): ``ess``, ``resampled``, ``unique_ancestors``, ``log_z_increments``
    (``log sum_i W_{t-1,i} G_{t,i}``; for ``mh`` the mean over its proposals) and ``log_z_increment_se``
    (their Monte Carlo standard errors, 0 where the increment is exact given the prefixes, ``inf`` where it
    is ``-inf``): an online reading of the reward model's Bellman error, see
    [`tiltsmc.diagnostics.online_bellman`][tiltsmc.diagnostics.online_bellman]. Samplers that take no guided
    steps (best-of-N, rejection) have no steps.
    ``collapsed[b]`` is True where every weight of prompt ``b`` became zero (then ``log_z[b] = -inf``).
    ``acceptance_rate`` (``mh``) and ``tries`` (``rejection``) are set by the samplers they belong to;
    ``ancestry`` (``(B, steps, N)``, when recorded) holds each step's ancestor indices.
    """

    sampler: str
    samples: list[Any]
    log_weights: list[npt.NDArray[np.float64]]
    log_z: npt.NDArray[np.float64]
    ess: npt.NDArray[np.float64]
    resampled: npt.NDArray[np.bool_]
    unique_ancestors: npt.NDArray[np.int64]
    log_z_increments: npt.NDArray[np.float64]
    collapsed: npt.NDArray[np.bool_]
    compute: Compute = field(default_factory=Compute)
    acceptance_rate: Optional[npt.NDArray[np.float64]] = None
    tries: Optional[npt.NDArray[np.int64]] = None
    ancestry: Optional[npt.NDArray[np.int64]] = None
    texts: Optional[list[list[str]]] = None
    errors: dict[int, str] = field(default_factory=dict)
    log_z_increment_se: Optional[npt.NDArray[np.float64]] = None

    @property
    def num_prompts(self) -> int:
        return len(self.samples)

    def weights(self, prompt: int) -> npt.NDArray[np.float64]:
        """Normalised weights of one prompt's samples."""
        return np.exp(self.log_weights[prompt])

    def weight_histogram(
        self, prompt: int, bins: int = 20
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """Histogram of one prompt's normalised weights, as ``numpy.histogram`` returns it (counts, edges)."""
        counts, edges = np.histogram(self.weights(prompt), bins=bins, range=(0.0, 1.0))
        return counts.astype(np.int64), edges

    def collapse_warnings(self) -> list[str]:
        return [
            f"prompt {b}: every particle weight became zero (particle collapse); log_z = -inf"
            for b in np.flatnonzero(self.collapsed)
        ]

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types only, ready for ``json.dumps``."""

        def plain(value: Any) -> Any:
            if isinstance(value, np.ndarray):
                return [plain(v) for v in value] if value.dtype == object else _finite(value.tolist())
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            if isinstance(value, (np.floating, float)):
                return _finite(float(value))
            if isinstance(value, np.integer):
                return int(value)
            if isinstance(value, np.bool_):
                return bool(value)
            return value

        record: dict[str, Any] = {
            "sampler": self.sampler,
            "samples": plain(self.samples),
            "log_weights": plain(self.log_weights),
            "log_z": plain(self.log_z),
            "ess": plain(self.ess),
            "resampled": plain(self.resampled),
            "unique_ancestors": plain(self.unique_ancestors),
            "log_z_increments": plain(self.log_z_increments),
            "collapsed": plain(self.collapsed),
            "compute": self.compute.to_dict(),
        }
        for name in ("log_z_increment_se", "acceptance_rate", "tries", "ancestry", "texts"):
            value = getattr(self, name)
            if value is not None:
                record[name] = plain(value)
        if self.errors:
            record["errors"] = {str(b): message for b, message in self.errors.items()}
        return record

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def _finite(value: Any) -> Any:
    """JSON has no infinities: -inf (a zero weight) becomes the string "-inf", likewise inf and nan
    (in lists and dict values too)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value
