"""What samplers need from a base policy ``p`` and a reward model ``Vh`` (log domain, batched).

A policy grows a [`Particles`][tiltsmc.models.particles.Particles] batch one step at a time; a reward model
scores its prefixes. Samplers only ever call these methods, so an ONNX model, an exact test-bed task or a
user's own object can stand behind them. Neither resamples: samplers call ``Particles.reorder``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from .particles import Particles

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
