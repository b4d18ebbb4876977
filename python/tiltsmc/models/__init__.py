"""Model protocols, the particle batch they share with the samplers, and ONNX Runtime models.

ONNX Runtime itself is imported only when an ONNX model is built.
"""

from .joint import PolicyValue
from .onnx_lm import OnnxCausalLM
from .onnx_reward import OnnxRewardModel
from .particles import Particles
from .protocols import Policy, RewardModel, TokenPolicy, TwistModel
from .twist import PolicyTwist

__all__ = [
    "OnnxCausalLM",
    "OnnxRewardModel",
    "Particles",
    "Policy",
    "PolicyTwist",
    "PolicyValue",
    "RewardModel",
    "TokenPolicy",
    "TwistModel",
]
