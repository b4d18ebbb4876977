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
    """The prompts, each an empty sequence: the task starts from an empty prefix (None, or a None prompt, is
    the empty prompt, as for the ONNX policies). Any other prompt raises ValueError naming it
    (``prompts: prompt b: ...``; ValueError as for a prompt an ONNX policy cannot encode)."""
    checked = check_prompts(prompts)
    if checked is None:
        return [()]
    if not checked:
        raise ValueError("prompts: expected at least one prompt, got an empty sequence")
    out: list[Any] = []
    for b, prompt in enumerate(checked):
        if prompt is None:  # no prompt (a lane starting several prompt-less runs at once passes None)
            out.append(())
            continue
        try:
            length = len(prompt)
        except TypeError:
            raise ValueError(
                f"prompts: prompt {b}: the Markov test-bed task starts from an empty prefix: expected an "
                f"empty sequence, got {type(prompt).__name__} {prompt!r:.40}"
            ) from None
        if length != 0:
            raise ValueError(
                f"prompts: prompt {b}: the Markov test-bed task starts from an empty prefix: got {length} "
                "tokens (pass empty prompts, one per independent run)"
            )
        out.append(prompt)
    return out


class MarkovPolicy:
    """``p(x_0) = init``, ``p(x_i | x_{i-1}) = P_i[x_{i-1}]``; finished after ``horizon`` tokens.

    Every particle is at its own position (its length), so batches started at different times can be
    joined (the serving engine does): ``supports_engine``.
    """

    token_level = True  # a step is one token
    supports_engine = True
    log_probs_checked = True  # the task's laws are checked distributions: a token can always be drawn

    def __init__(self, task: MarkovDFATask) -> None:
        self.task = task
        self.vocab_size = task.vocab_size
        first = np.broadcast_to(task.log_init, (task.vocab_size, task.vocab_size))
        # (horizon, V, V): row [t, previous token] is the law of token t (the previous token is ignored at 0)
        self._log_steps = np.stack([first] + [task.log_trans_at(i) for i in range(1, task.horizon)])

    def start(self, prompts: Optional[Sequence[Any]], num_particles: int) -> Particles:
        """``num_particles`` empty trajectories per prompt; a prompt that is not empty (or None) raises
        ValueError naming it."""
        return Particles.empty(_prompts(prompts), num_particles, self.task.horizon)

    def next_log_probs(self, particles: Particles) -> FloatArray:
        """The law of each particle's next token, ``(B, N, V)``, read at the particle's own length. A
        finished particle gets an arbitrary law (never drawn from), so a batch may mix finished and
        unfinished trajectories; ValueError (naming ``particles``) for an unfinished one that already
        has ``horizon`` tokens."""
        t = particles.lengths
        if ((t >= self.task.horizon) & ~particles.finished).any():
            raise ValueError(
                "particles: an unfinished trajectory already has the full horizon "
                f"({self.task.horizon} tokens): there is no next token to draw"
            )
        t = np.minimum(t, self.task.horizon - 1)  # finished particles: any law (never drawn from)
        previous = np.take_along_axis(particles.tokens, np.maximum(t - 1, 0)[..., None], axis=-1)[..., 0]
        log_probs: FloatArray = self._log_steps[t, previous]
        return log_probs

    def append(self, particles: Particles, tokens: npt.NDArray[np.int64]) -> None:
        b, i = np.nonzero(~particles.finished)
        particles.tokens[b, i, particles.lengths[b, i]] = tokens[b, i]
        particles.lengths[b, i] += 1
        particles.finished |= particles.lengths >= self.task.horizon

    def propose(self, particles: Particles, rng: np.random.Generator) -> FloatArray:
        log_probs = self.next_log_probs(particles)
        tokens = sample_categorical(log_probs, rng)
        self.append(particles, tokens)
        return np.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]


class TableTwist:
    """``log Vh_t(prefix) = tables[t][last token, DFA state]`` with ``tables[0] = log Vh_0``.

    ``tables`` has the layout of ``MarkovDFATask.log_v_star``, checked (and copied) at construction as
    ``MarkovDFATask.bellman_error`` checks it: ``T+1`` levels, ``tables[0]`` a real ``log Vh_0`` (finite or
    ``-inf``), ``tables[t]`` a ``(V, Q)`` array of log-values, each finite or ``-inf`` (TypeError or
    ValueError naming ``tables``).

    The DFA state of each particle is kept in ``particles.state["dfa"]`` and follows resampling; each
    particle is read at its own length (``supports_engine``).
    """

    supports_engine = True

    def __init__(self, task: MarkovDFATask, tables: Sequence[Union[float, npt.ArrayLike]]) -> None:
        from .markov_dfa import MarkovDFATask

        if not isinstance(task, MarkovDFATask):
            raise TypeError(f"task: expected a tiltsmc.tasks.MarkovDFATask, got {type(task).__name__}")
        # the checks of MarkovDFATask.bellman_error: T+1 levels, a real log Vh_0 (finite or -inf), then
        # (V, Q) arrays of log-values that are finite or -inf (TypeError / ValueError naming ``tables``)
        root, levels = task._check_tables(tables)
        self.task = task
        self.vocab_size = task.vocab_size
        self.tables: list[Union[float, FloatArray]] = [root, *levels]
        # (horizon + 1, V, Q): level 0 is the constant log Vh_0
        self._levels = np.stack([np.full(levels[0].shape, root), *levels])

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
        last = np.take_along_axis(particles.tokens, np.maximum(read - 1, 0)[..., None], axis=-1)[..., 0]
        values: FloatArray = self._levels[read, last, states]
        return values

    def next_log_values(self, particles: Particles) -> FloatArray:
        states, read = self._states(particles)
        following = self.task.dfa[states]  # (B, N, V): state after appending each token
        level = np.minimum(read + 1, self.task.horizon)[..., None]
        values: FloatArray = self._levels[level, np.arange(self.vocab_size), following]
        return values
