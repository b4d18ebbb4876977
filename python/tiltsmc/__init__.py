"""tiltsmc: Sequential Monte Carlo sampling of reward-tilted distributions, with a C++ core."""

from __future__ import annotations

from . import core, diagnostics, models, tasks
from .samplers import Compute, SamplerResult, best_of_n, mh, rejection, smc, sp_gsmc
from .serving import Engine, EngineClosed, Overloaded

__version__ = "0.1.0"

__all__ = [
    "Compute",
    "Engine",
    "EngineClosed",
    "Overloaded",
    "SamplerResult",
    "__version__",
    "best_of_n",
    "core",
    "diagnostics",
    "mh",
    "models",
    "rejection",
    "smc",
    "sp_gsmc",
    "tasks",
]
