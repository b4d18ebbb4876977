"""tiltsmc: Sequential Monte Carlo sampling of reward-tilted distributions, with a C++ core."""

from __future__ import annotations

from . import core

__version__ = "0.1.0"

__all__ = ["__version__", "core"]
