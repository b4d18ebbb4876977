"""The test-bed task as models: its Markov chain as a token policy, twist tables as a twist model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import numpy.typing as npt

from ..models.particles import Particles
from ..models.prompts import check_prompts
from ..models.sampling import sample_categorical

if TYPE_CHECKING:
    from .markov_dfa import MarkovDFATask

__all__ = ["MarkovPolicy", "TableTwist"]

FloatArray = npt.NDArray[np.float64]


def _prompts(prompts: Optional[Sequence[Any]]) -> list[Any]:
    checked = check_prompts(prompts)
    if checked is None:
        return [()]
    prompts = checked
    if not prompts:
        raise ValueError("prompts: expected at least one prompt, got an empty sequence")
    for b, prompt in enumerate(prompts):
        if len(prompt) != 0:
            raise ValueError(
                f"prompts: the Markov test-bed task starts from an empty prefix; prompt {b} has "
                f"{len(prompt)} tokens (pass empty prompts, one per independent run)"
            )
    return prompts


class MarkovPolicy:
    """``p(x_0) = init``, ``p(x_i | x_{i-1}) = P_i[x_{i-1}]``; finished after ``horizon`` tokens."""

    token_level = True  # a step is one token

    def __init__(self, task: MarkovDFATask) -> None:
        self.task = task
        self.vocab_size = task.vocab_size
        self._log_steps = [task.log_init] + [task.log_trans_at(i) for i in range(1, task.horizon)]

    def start(self, prompts: Optional[Sequence[Any]], num_particles: int) -> Particles:
        return Particles.empty(_prompts(prompts), num_particles, self.task.horizon)

    def _position(self, particles: Particles) -> int:
        # All particles of a fixed-horizon task move together: one position for the whole batch.
        return int(particles.lengths.flat[0]) if particles.lengths.size else 0

    def next_log_probs(self, particles: Particles) -> FloatArray:
        t = self._position(particles)
        if t >= self.task.horizon:
            raise ValueError("particles: every trajectory already has the full horizon")
        if t == 0:
            return np.broadcast_to(self._log_steps[0], (*particles.lengths.shape, self.vocab_size))
        return self._log_steps[t][particles.tokens[:, :, t - 1]]

    def append(self, particles: Particles, tokens: npt.NDArray[np.int64]) -> None:
        t = self._position(particles)
        live = ~particles.finished
        particles.tokens[:, :, t] = np.where(live, tokens, particles.tokens[:, :, t])
        particles.lengths[live] = t + 1
        if t + 1 >= self.task.horizon:
            particles.finished[:] = True

    def propose(self, particles: Particles, rng: np.random.Generator) -> FloatArray:
        log_probs = self.next_log_probs(particles)
        tokens = sample_categorical(log_probs, rng)
        self.append(particles, tokens)
        return np.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]


class TableTwist:
    """``log Vh_t(prefix) = tables[t][last token, DFA state]`` with ``tables[0] = log Vh_0``.

    The DFA state of each particle is kept in ``particles.state["dfa"]`` and follows resampling.
    """

    def __init__(self, task: MarkovDFATask, tables: Sequence[Union[float, npt.ArrayLike]]) -> None:
        self.task = task
        self.vocab_size = task.vocab_size
        self.tables: list[Union[float, FloatArray]] = [float(np.asarray(tables[0]))]
        self.tables += [np.asarray(t, dtype=np.float64) for t in tables[1:]]
        if len(self.tables) != task.horizon + 1:
            raise ValueError(f"tables: expected {task.horizon + 1} levels, got {len(self.tables)}")

    def _states(self, particles: Particles) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
        """DFA state after each prefix, advanced over the tokens appended since the last call.

        Kept as one ``(B, N, 2)`` array ``[state, tokens read]`` in ``particles.state["dfa"]``: one reorder
        per resampling step instead of two.
        """
        if "dfa" not in particles.state:
            dfa = np.zeros((*particles.lengths.shape, 2), dtype=np.int32)  # 8-byte items move fastest
            dfa[..., 0] = self.task.start
            particles.state["dfa"] = dfa
        dfa = particles.state["dfa"]
        states, read = dfa[..., 0], dfa[..., 1]
        while True:
            behind = read < particles.lengths
            if not behind.any():
                return states, read
            b, i = np.nonzero(behind)
            token = particles.tokens[b, i, read[b, i]]
            states[b, i] = self.task.dfa[states[b, i], token]
            read[b, i] += 1

    def initial_log_value(self, particles: Particles) -> FloatArray:
        return np.full(particles.num_prompts, self.tables[0])

    def log_value(self, particles: Particles) -> FloatArray:
        states, read = self._states(particles)
        t = int(read.flat[0]) if read.size else 0
        if t == 0:
            return np.full(read.shape, self.tables[0])
        last = particles.tokens[:, :, t - 1]
        level = self.tables[t]
        assert isinstance(level, np.ndarray)
        return level[last, states]

    def next_log_values(self, particles: Particles) -> FloatArray:
        states, read = self._states(particles)
        t = int(read.flat[0]) if read.size else 0
        level = self.tables[t + 1]
        assert isinstance(level, np.ndarray)
        following = self.task.dfa[states]  # (B, N, V): state after appending each token
        return level[np.arange(self.vocab_size), following]
