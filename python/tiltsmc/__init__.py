"""tiltsmc: Sequential Monte Carlo sampling of reward-tilted distributions, with a C++ core."""

from __future__ import annotations

import logging

from . import core, diagnostics, models, tasks
from .samplers import Compute, SamplerResult, best_of_n, mh, rejection, smc, sp_gsmc
from .serving import Engine, EngineClosed, Overloaded

__version__ = "0.1.0"

# The library logs to the "tiltsmc" logger and never configures it: the application (the tiltsmc command
# does, see tiltsmc.cli) chooses handlers and levels.
logging.getLogger("tiltsmc").addHandler(logging.NullHandler())

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
