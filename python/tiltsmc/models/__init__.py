"""Model protocols and the particle batch they share with the samplers."""

from .particles import Particles
from .protocols import Policy, RewardModel, TokenPolicy, TwistModel

__all__ = ["Particles", "Policy", "RewardModel", "TokenPolicy", "TwistModel"]
