"""What samplers need from a base policy ``p`` and a reward model ``Vh`` (log domain, batched).

A policy grows a [`Particles`][tiltsmc.models.particles.Particles] batch one step at a time; a reward model
scores its prefixes. Samplers only ever call these methods, so an ONNX model, an exact test-bed task or a
user's own object can stand behind them. Neither resamples: samplers call ``Particles.reorder``.

The samplers tell which protocol an object implements with ``is_policy``, ``is_token_policy``,
``is_reward_model`` and ``is_twist_model``, not ``isinstance``: these find members as a call does
(``getattr``, so a wrapper that forwards them through ``__getattr__`` implements what it wraps), the same
on every Python. ``isinstance`` against a runtime-checkable protocol looks members up statically from
Python 3.12 on, and refused such a wrapper there that Python 3.11 accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from .particles import Particles

if TYPE_CHECKING:  # typing has TypeGuard from Python 3.10 on; the annotations are never evaluated
    from typing import TypeGuard

__all__ = ["Policy", "RewardModel", "TokenPolicy", "TwistModel"]

FloatArray = npt.NDArray[np.float64]


@runtime_checkable
class Policy(Protocol):
    """The base model ``p(s_t | s0, s_{1:t-1})``."""

    def start(self, prompts: Optional[Sequence[Any]], num_particles: int) -> Particles:
        """A batch of ``len(prompts)`` x ``num_particles`` empty trajectories (None: one empty prompt)."""
        ...

    def propose(self, particles: Particles, rng: np.random.Generator) -> FloatArray:
        """Draw ``s_t ~ p(. | prefix)`` for every unfinished particle and append it, in place.

        Returns ``log p(s_t | prefix)``, shape ``(B, N)``, exactly as sampled (0 for finished particles);
        sets ``particles.finished`` where the trajectory has ended. A prompt the policy cannot go on with
        (its model's output unusable for that prompt's particles alone) may fail on its own: its reason in
        ``particles.errors[b]`` and its particles finished; the samplers then report that prompt as failed
        (``prompt k: reason`` in the result's ``errors``, every weight zero) and the other prompts go on as
        they would have (a run, or a serving request, whose every prompt fails at once fails with it).
        """
        ...


@runtime_checkable
class TokenPolicy(Policy, Protocol):
    """A policy whose step is one token from a vocabulary of ``vocab_size``: enables the optimal proposal."""

    vocab_size: int

    def next_log_probs(self, particles: Particles) -> FloatArray:
        """``log p(v | prefix)`` for every token ``v``: shape ``(B, N, vocab_size)``. A prompt may fail on its
        own here as in ``propose`` (``particles.errors[b]``, its particles finished); the samplers fail a
        prompt so where an unfinished particle's row holds NaN, ``+inf`` or only ``-inf``, unless the policy
        has a class attribute ``log_probs_checked = True``, which promises that it never returns one."""
        ...

    def append(self, particles: Particles, tokens: npt.NDArray[np.int64]) -> None:
        """Extend every unfinished particle by the given token ``(B, N)`` and update ``finished``."""
        ...


@runtime_checkable
class RewardModel(Protocol):
    """The approximate value ``Vh_t``, in the log domain; ``Vh_T = r`` on finished trajectories.

    Log-values must be finite or ``-inf`` (``Vh >= 0``); the samplers check every ``log_value`` result for
    NaN and ``+inf`` unless the model has a class attribute ``log_values_checked = True``, which promises
    that it raises on those itself. Where ``initial_log_value`` or ``log_value`` raises for a batch, the
    samplers call it again on fewer rows (each run's, then each prompt's) to find the prompts at fault,
    which fail alone.
    """

    def initial_log_value(self, particles: Particles) -> FloatArray:
        """``log Vh_0`` at each prompt, shape ``(B,)`` (zeros where the model gives none: ``Vh_0 := 1``)."""
        ...

    def log_value(self, particles: Particles) -> FloatArray:
        """``log Vh_t`` of every current prefix, shape ``(B, N)``; ``log r`` for finished particles."""
        ...


@runtime_checkable
class TwistModel(RewardModel, Protocol):
    """A reward model with a twist head: ``log Vh`` of every one-token extension at once."""

    def next_log_values(self, particles: Particles) -> FloatArray:
        """``log Vh_{t+1}(prefix + v)`` for every token ``v``: shape ``(B, N, vocab_size)``."""
        ...


POLICY_METHODS = ("start", "propose")
TOKEN_POLICY_METHODS = (*POLICY_METHODS, "next_log_probs", "append")
TOKEN_POLICY_ATTRIBUTES = ("vocab_size",)
REWARD_MODEL_METHODS = ("initial_log_value", "log_value")
TWIST_MODEL_METHODS = (*REWARD_MODEL_METHODS, "next_log_values")


def _has_members(obj: Any, methods: Sequence[str], attributes: Sequence[str] = ()) -> bool:
    """Whether ``obj`` has each of ``methods``, callable, and each of ``attributes``, found by ``getattr``."""
    return all(callable(getattr(obj, name, None)) for name in methods) and all(
        hasattr(obj, name) for name in attributes
    )


def is_policy(obj: Any) -> TypeGuard[Policy]:
    """Whether ``obj`` implements [`Policy`][tiltsmc.models.protocols.Policy] (see the module's docstring)."""
    return _has_members(obj, POLICY_METHODS)


def is_token_policy(obj: Any) -> TypeGuard[TokenPolicy]:
    """Whether ``obj`` implements [`TokenPolicy`][tiltsmc.models.protocols.TokenPolicy]."""
    return _has_members(obj, TOKEN_POLICY_METHODS, TOKEN_POLICY_ATTRIBUTES)


def is_reward_model(obj: Any) -> TypeGuard[RewardModel]:
    """Whether ``obj`` implements [`RewardModel`][tiltsmc.models.protocols.RewardModel]."""
    return _has_members(obj, REWARD_MODEL_METHODS)


def is_twist_model(obj: Any) -> TypeGuard[TwistModel]:
    """Whether ``obj`` implements [`TwistModel`][tiltsmc.models.protocols.TwistModel]."""
    return _has_members(obj, TWIST_MODEL_METHODS)
