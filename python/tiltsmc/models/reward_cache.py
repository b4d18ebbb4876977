r"""A reward model's own KV cache per particle: each call feeds only the tokens appended since the last.

A scoring graph exported as a decoder with a cache (``past_key_values.{i}.key`` / ``.value`` inputs and
``present.{i}.*`` outputs, the optimum ``text-generation-with-past`` layout, plain or merged with
``use_cache_branch``; a causal LM read through ``label=``, or a decoder trunk with a value or
classification head exported the same way) gives at position ``t`` a score that depends on tokens
``0..t`` only. So instead of re-encoding prompt + steps at every step (``O(T^2)`` a run), the prompt is
run once per prompt (left-padded), its cache copied to the prompt's particles, and each later call runs
only the tokens each particle appended since its previous call: row ``r`` is fed ``k_r >= 0`` new tokens,
right-padded (masked) to the batch's longest ``W``, with the cache of everything before. Row ``r``'s
positions continue from the number of real tokens it has seen (its mask's ones), so left padding and
masked columns never shift them, and the scores read at a fed column equal those of re-encoding the
whole prefix (up to the rounding of a different summation order).

Kept in ``Particles.state`` (leading ``(B, N)`` axes, so resampling reorders them with the policy's cache
in the same ``tiltsmc.models.particles.Particles.reorder``), under keys of the model's serial
number: every ``present`` tensor ``(B, N, kv_heads, L, head_dim)`` and the mask ``(B, N, L)``, registered
in ``Particles.aligned`` (batches join by left padding and are trimmed when the longest leave); the number
of generated tokens fed so far; ``log Vh`` read at each particle's last token and at its last step
delimiter (before any: its last prompt token). The value of a prefix is the first, or with
``position="delimiter"`` the second (the first once the trajectory is finished), as the re-encoding
reader gives it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import numpy.typing as npt

from .particles import Particles, mask_lengths, padded

if TYPE_CHECKING:
    from .onnx_reward import OnnxRewardModel

__all__ = ["KVCachedScorer"]

FloatArray = npt.NDArray[np.float64]
# raw output, its (rows, width), the column read in each row -> log Vh of each row
Reader = Callable[[np.ndarray, tuple[int, int], npt.NDArray[np.int64]], FloatArray]


@dataclass(frozen=True)
class _Layer:
    """One cache tensor: the graph's input and output names, its state key, and its geometry."""

    past: str
    present: str
    key: str
    heads: int
    head_size: int


class KVCachedScorer:
    """The cached path of ``tiltsmc.models.onnx_reward.OnnxRewardModel`` (see the module docstring).

    ``layers``: ``(past name, dtype, KV heads, head size)`` of every cache input; ``prefix``: the state
    key prefix of the reward model's entries."""

    def __init__(self, model: OnnxRewardModel, layers: list[tuple[str, Any, int, int]], prefix: str) -> None:
        self.model = model
        tail = len("past_key_values")  # ".{i}.key" / ".{i}.value" follows
        self.layers = [
            _Layer(past, "present" + past[tail:], f"{prefix}.cache{past[tail:]}", heads, head_size)
            for past, _, heads, head_size in layers
        ]
        self.mask_key = f"{prefix}.mask"
        self.fed_key = f"{prefix}.fed"
        self.last_key = f"{prefix}.at_last"
        self.delimiter_key = f"{prefix}.at_delimiter"
        self.keys = [layer.key for layer in self.layers] + [
            self.mask_key, self.fed_key, self.last_key, self.delimiter_key
        ]  # fmt: skip
        self.outputs = [model.output] + [layer.present for layer in self.layers]
        self._usable_for: tuple[Optional[list[npt.NDArray[np.int64]]], bool] = (None, False)

    def usable(self, particles: Particles) -> bool:
        """Whether every prompt has tokens (an empty prompt has no position to read ``Vh_0`` at: such
        batches are re-encoded). Answered again only for another list of prompts: a serving batch holds
        one entry per particle, and the scorer is asked twice a step."""
        prompts = particles.prompt_tokens
        if prompts is None:
            return False
        seen, answer = self._usable_for  # one read: another thread may ask about its own batch meanwhile
        if prompts is not seen:
            answer = all(len(ids) > 0 for ids in prompts)
            self._usable_for = (prompts, answer)
        return answer

    def has_state(self, particles: Particles) -> bool:
        return all(key in particles.state for key in self.keys)

    # -- the session ------------------------------------------------------------------------------------

    def _run(
        self,
        ids: npt.NDArray[np.int64],
        mask: npt.NDArray[np.int64],
        positions: npt.NDArray[np.int64],
        past: Optional[list[np.ndarray]],
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One session call: ``ids`` ``(rows, width)`` after ``past`` (None: an empty cache) with the
        ``mask`` of past and new columns; the raw scores and the new cache tensors."""
        feeds = self.model.session_feeds(ids, mask, positions, past)
        raw, *present = self.model.run_session(self.outputs, feeds)
        return np.asarray(raw), present

    # -- state ------------------------------------------------------------------------------------------

    def start(self, particles: Particles, read: Reader) -> FloatArray:
        """Run every prompt once (left-padded, one row a prompt) and give each particle its prompt's cache,
        with nothing generated fed yet; returns ``log Vh_0`` of each prompt ``(B,)``."""
        prompts = particles.prompt_tokens
        assert prompts is not None
        batch, count = particles.lengths.shape
        ids, mask, positions = padded(prompts, self.model.pad_token_id)
        width = ids.shape[1]
        raw, present = self._run(ids, mask, positions, None)
        at_prompt = read(raw, (batch, width), np.full(batch, width - 1, dtype=np.int64))

        def repeat(a: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(np.broadcast_to(a[:, None], (batch, count, *a.shape[1:])))

        state = particles.state
        for layer, tensor in zip(self.layers, present):
            state[layer.key] = repeat(tensor)
            particles.aligned[layer.key] = (3, self.mask_key)
        state[self.mask_key] = repeat(mask)
        particles.aligned[self.mask_key] = (2, self.mask_key)
        state[self.fed_key] = np.zeros((batch, count), dtype=np.int64)
        state[self.last_key] = repeat(at_prompt)
        state[self.delimiter_key] = repeat(at_prompt)
        return at_prompt

    def advance(self, particles: Particles, read: Reader) -> FloatArray:
        """Feed every particle the tokens it generated since its last call (starting its cache from the
        prompts first where it has none) and return ``log Vh`` of every prefix ``(B, N)`` by ``position``.
        """
        state = particles.state
        if not self.has_state(particles):
            self.start(particles, read)
        batch, count = particles.lengths.shape
        rows = batch * count
        fed = state[self.fed_key]
        new = (particles.lengths - fed).reshape(rows)
        if new.min() < 0:
            raise ValueError("reward: a particle has fewer tokens than its reward cache was fed")
        width = int(new.max()) if rows else 0
        if width > 0:
            self._feed(particles, new, width, read)
        at_last: FloatArray = state[self.last_key]
        if self.model.position == "last":
            return at_last.copy()
        return np.where(particles.finished, at_last, state[self.delimiter_key])

    def _feed(self, particles: Particles, new: npt.NDArray[np.int64], width: int, read: Reader) -> None:
        """One session call: row ``r`` fed its ``new[r]`` unfed tokens, right-padded to ``width``."""
        state = particles.state
        batch, count = particles.lengths.shape
        rows = batch * count
        columns = np.arange(width)
        real = columns[None, :] < new[:, None]  # (rows, width): the fed tokens, then padding
        start = state[self.fed_key].reshape(rows)
        tokens = particles.tokens.reshape(rows, -1)
        take = np.minimum(start[:, None] + columns[None, :], tokens.shape[1] - 1)
        ids = np.where(real, np.take_along_axis(tokens, take, axis=1), self.model.pad_token_id)
        old_mask = state[self.mask_key].reshape(rows, -1)
        seen = mask_lengths(old_mask)  # real tokens so far: the next position
        positions = seen[:, None] + np.minimum(columns[None, :], np.maximum(new - 1, 0)[:, None])
        mask = np.concatenate([old_mask, real.astype(np.int64)], axis=1)
        past = [state[layer.key].reshape(rows, layer.heads, -1, layer.head_size) for layer in self.layers]
        raw, present = self._run(ids, mask, positions, past)
        moved = new > 0
        last_column = np.maximum(new - 1, 0)
        at_last = state[self.last_key].reshape(rows)
        at_last = np.where(moved, read(raw, (rows, width), last_column), at_last)
        at_delimiter = state[self.delimiter_key].reshape(rows)
        if self.model.position == "delimiter":
            is_delimiter = real & np.isin(ids, self.model.policy_delimiter_ids)
            found = np.where(is_delimiter, columns[None, :], -1).max(axis=1)
            if (found >= 0).any():
                scores = read(raw, (rows, width), np.maximum(found, 0))
                at_delimiter = np.where(found >= 0, scores, at_delimiter)
        for layer, tensor in zip(self.layers, present):
            state[layer.key] = tensor.reshape(batch, count, *tensor.shape[1:])
        state[self.mask_key] = mask.reshape(batch, count, -1)
        state[self.fed_key] = particles.lengths.copy()
        state[self.last_key] = at_last.reshape(batch, count)
        state[self.delimiter_key] = at_delimiter.reshape(batch, count)
