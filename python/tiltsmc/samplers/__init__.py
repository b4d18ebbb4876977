"""Samplers of the reward-tilted distribution ``pi ∝ p r`` (DESIGN.md §1), model-agnostic and batched."""

from .mh import mh
from .result import Compute, SamplerResult
from .simple import best_of_n, rejection
from .smc import smc, sp_gsmc

__all__ = ["Compute", "SamplerResult", "best_of_n", "mh", "rejection", "smc", "sp_gsmc"]
