"""Samplers of the reward-tilted distribution ``pi ∝ p r``, model-agnostic and batched
(``docs/theory/samplers.md``).

``sequential``: SMC and single-particle guided SMC; ``correction``: the resampling-pool MH / PIMH
correction; ``baselines``: rejection sampling and best-of-N.
"""

from .baselines import best_of_n, rejection
from .correction import mh
from .result import Compute, SamplerResult
from .sequential import smc, sp_gsmc

__all__ = ["Compute", "SamplerResult", "best_of_n", "mh", "rejection", "smc", "sp_gsmc"]
