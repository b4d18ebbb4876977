r"""A process reward model or value model exported to ONNX, read as ``log Vh`` of each prefix.

The graph takes ``input_ids`` and ``attention_mask`` (and ``position_ids`` where it has that input) for
the prefix prompt + generated steps, and returns one score per row (``(batch,)`` or ``(batch, 1)``) or per
position (``(batch, seq)`` or ``(batch, seq, 1)``), read at the last real token (``position="last"``) or,
for a process reward model scoring steps at their delimiter, at the last step delimiter of the generated
text (``position="delimiter"`` with ``delimiter_ids``; the last prompt token before the first delimiter, the
last token once the trajectory is finished).
``kind`` says what the score is: ``"log_value"`` (``log Vh`` itself), ``"prob"`` (``Vh`` in [0, 1]) or
``"logit"`` (``Vh = sigmoid(score)``). On finished trajectories the terminal reward ``r`` is the model's
value unless a ``verifier(prompt, text) -> r >= 0`` is given. Prefixes are scored in one batched call per
step, and only those that changed since they were last scored (values follow resampling in
``Particles.state``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import numpy as np
import numpy.typing as npt

from ._ort import make_session
from .onnx_lm import read_json, resolve_model_file
from .particles import Particles
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["OnnxRewardModel"]

FloatArray = npt.NDArray[np.float64]
KINDS = ("log_value", "prob", "logit")


def _select(array: np.ndarray, rows: Optional[npt.NDArray[np.int64]]) -> np.ndarray:
    """``array[b, i]`` for the pairs ``rows``, or every entry in order (flattened) for None."""
    return array.reshape(-1) if rows is None else array[rows[:, 0], rows[:, 1]]


@dataclass(frozen=True)
class _PromptLayout:
    """Where a batch's reward prefixes start: the prompts' ``lengths (B,)`` and ``groups`` of equally long
    prompts, each ``(members, ids)``: a slice or index array over prompts and their tokens
    ``(len(members), length)``. ``prompts`` are the arrays it was built from (None: no prompt tokens)."""

    prompts: Optional[tuple[npt.NDArray[np.int64], ...]]
    lengths: npt.NDArray[np.int64]
    groups: list[tuple[Union[slice, npt.NDArray[np.intp]], npt.NDArray[np.int64]]]

    @classmethod
    def of(cls, prompts: Optional[Sequence[npt.NDArray[np.int64]]], num_prompts: int) -> _PromptLayout:
        arrays = [np.zeros(0, dtype=np.int64)] * num_prompts if prompts is None else list(prompts)
        lengths = np.array([len(ids) for ids in arrays], dtype=np.int64)
        groups: list[tuple[Union[slice, npt.NDArray[np.intp]], npt.NDArray[np.int64]]] = []
        for length in np.unique(lengths):
            members = np.flatnonzero(lengths == length)
            ids = np.array([arrays[b] for b in members], dtype=np.int64).reshape(len(members), int(length))
            consecutive = members[-1] - members[0] + 1 == len(members)  # then a slice: no index copy
            groups.append((slice(int(members[0]), int(members[-1]) + 1) if consecutive else members, ids))
        return cls(None if prompts is None else tuple(prompts), lengths, groups)

    def fits(self, prompts: Optional[Sequence[npt.NDArray[np.int64]]], num_prompts: int) -> bool:
        """Whether it was built from these very prompt arrays (the same objects)."""
        if prompts is None or self.prompts is None:
            return prompts is None and self.prompts is None and len(self.lengths) == num_prompts
        return len(prompts) == len(self.prompts) and all(a is b for a, b in zip(prompts, self.prompts))


class OnnxRewardModel:
    """``log Vh`` from an ONNX scoring model (see the module docstring)."""

    def __init__(
        self,
        path: Union[str, os.PathLike[str]],
        output: Optional[str] = None,
        kind: Literal["log_value", "prob", "logit"] = "log_value",
        position: Literal["last", "delimiter"] = "last",
        *,
        tokenizer: Any = None,
        verifier: Optional[Callable[[Any, str], float]] = None,
        token_map: Optional[npt.ArrayLike] = None,
        providers: Optional[Sequence[Any]] = None,
        intra_op_num_threads: Optional[int] = None,
        inter_op_num_threads: Optional[int] = None,
        require_gpu: bool = False,
        pad_token_id: int = 0,
        delimiter_ids: Optional[Sequence[int]] = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        if position not in ("last", "delimiter"):
            raise ValueError(f"position: expected 'last' or 'delimiter', got {position!r}")
        if position == "delimiter" and not delimiter_ids:
            raise ValueError("delimiter_ids: position='delimiter' needs the token ids that end a step")
        self.position = position
        self.delimiter_ids = np.array(sorted({int(i) for i in delimiter_ids or ()}), dtype=np.int64)
        self.kind = kind
        self.model_file, model_dir = resolve_model_file(path)
        self.config = read_json(model_dir / "config.json")
        self.tokenizer: Optional[Tokenizer] = load_tokenizer(tokenizer, model_dir)
        self.verifier = verifier
        self.pad_token_id = int(pad_token_id)
        self._layout: Optional[_PromptLayout] = None  # the last batch's prompts, see _prompt_layout
        self._ones_buffer = np.ones(0, dtype=np.int64)  # attention masks of unpadded batches, see _ones
        self.session = make_session(
            self.model_file,
            providers,
            intra_op_num_threads=intra_op_num_threads,
            inter_op_num_threads=inter_op_num_threads,
            require_gpu=require_gpu,
        )
        inputs = [node.name for node in self.session.get_inputs()]
        outputs = [node.name for node in self.session.get_outputs()]
        missing = [name for name in ("input_ids", "attention_mask") if name not in inputs]
        unsupported = [name for name in inputs if name not in ("input_ids", "attention_mask", "position_ids")]
        if missing or unsupported:
            raise ValueError(
                f"path: {self.model_file} needs inputs input_ids and attention_mask (optionally "
                f"position_ids): missing {missing or 'none'}, unexpected {unsupported or 'none'}; inputs "
                f"found: {', '.join(inputs)}"
            )
        self.has_position_ids = "position_ids" in inputs
        if output is None:
            output = outputs[0]
        elif output not in outputs:
            raise ValueError(
                f"output: {output!r} is not an output of {self.model_file.name}: found {outputs}"
            )
        self.output = output
        self.vocab_size = self.config.get("vocab_size") or (
            self.tokenizer.vocab_size if self.tokenizer is not None else None
        )
        self.token_map = None
        if token_map is not None:
            mapping = np.asarray(token_map)
            if mapping.ndim != 1 or mapping.dtype.kind not in "iu":
                raise ValueError(f"token_map: expected a 1-D array of token ids, got shape {mapping.shape}")
            upper = self.vocab_size if self.vocab_size is not None else np.iinfo(np.int64).max
            if mapping.size and (mapping.min() < 0 or mapping.max() >= upper):
                raise ValueError(f"token_map: ids must lie in [0, {upper}) of the reward model's vocabulary")
            self.token_map = mapping.astype(np.int64)

    def check_policy(self, policy: Any) -> None:
        """Refuse a policy whose vocabulary differs from this model's, unless a ``token_map`` is given."""
        if self.token_map is not None:
            if self.token_map.ndim != 1 or self.token_map.size < int(getattr(policy, "vocab_size", 0)):
                raise ValueError("token_map: expected one reward-model id per policy token id")
            return
        theirs = getattr(policy, "tokenizer", None)
        if self.tokenizer is not None and theirs is not None:
            if self.tokenizer.vocabulary() != theirs.vocabulary():
                raise ValueError(
                    "reward: the reward model's tokenizer differs from the policy's (vocabulary sizes "
                    f"{self.tokenizer.vocab_size} and {theirs.vocab_size}); pass token_map= to translate ids"
                )
        elif self.vocab_size is not None and getattr(policy, "vocab_size", None) not in (
            None,
            self.vocab_size,
        ):
            raise ValueError(
                f"reward: vocabulary size {self.vocab_size} differs from the policy's {policy.vocab_size}; "
                "pass token_map= to translate ids"
            )

    # -- scoring --------------------------------------------------------------------------------------------

    def _score(self, sequences: list[npt.NDArray[np.int64]]) -> FloatArray:
        """``log Vh`` of each token sequence, in one session call (right padding, read at the last token)."""
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        ids = np.full((len(sequences), int(lengths.max())), self.pad_token_id, dtype=np.int64)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = sequence
        return self._score_padded(ids, lengths)

    def _score_padded(
        self,
        ids: npt.NDArray[np.int64],
        lengths: npt.NDArray[np.int64],
        read_at: Optional[npt.NDArray[np.int64]] = None,
    ) -> FloatArray:
        """``log Vh`` of right-padded rows ``ids[r, :lengths[r]]``, read at ``read_at[r]`` (default: the last
        token) where the model scores every position."""
        rows, width = ids.shape
        full = rows > 0 and int(lengths.min()) == width  # no padding (the usual step): simpler feeds
        if full:
            mask = self._ones(rows * width).reshape(rows, width)
            if self.token_map is not None:
                ids = self.token_map[ids]
        else:
            valid = np.arange(width) < lengths[:, None]
            mask = valid.astype(np.int64)
            if self.token_map is not None:
                ids = np.where(valid, self.token_map[ids], self.pad_token_id)
        feeds: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if self.has_position_ids:  # right padding: 0, 1, ..., length - 1, then length - 1 repeated
            feeds["position_ids"] = np.minimum(np.arange(width), np.maximum(lengths - 1, 0)[:, None])
        (raw,) = self.session.run([self.output], feeds)
        raw = np.asarray(raw)
        if raw.ndim == 3 and raw.shape[2] == 1:
            raw = raw[..., 0]
        if raw.ndim == 2 and raw.shape[1] == 1 and width != 1:
            raw = raw[:, 0]
        if raw.ndim == 2:  # one score per position: only the read ones are converted
            if full and read_at is None:
                raw = raw[:, width - 1]
            else:
                raw = raw[np.arange(rows), lengths - 1 if read_at is None else read_at]
        if raw.shape != (len(ids),):
            raise ValueError(
                f"output: {self.output!r} has shape {raw.shape}; expected (batch,) or (batch, seq)"
            )
        top = raw.max() if raw.size else 0.0
        if top != top:  # the maximum is NaN exactly when some score is
            raise ValueError(
                f"reward: {self.model_file.name} returned NaN for {int(np.isnan(raw).sum())} prefix(es)"
            )
        # log sigmoid(x) = -log(1 + exp(-x)), computed in place on a float64 -x
        logit = self.kind == "logit"
        scores = np.negative(raw, dtype=np.float64) if logit else raw.astype(np.float64)
        if logit:
            np.logaddexp(0.0, scores, out=scores)
            np.negative(scores, out=scores)
        if self.kind == "prob":
            if (scores < 0).any() or (scores > 1).any():
                raise ValueError("reward: kind='prob' but the model returned values outside [0, 1]")
            with np.errstate(divide="ignore"):
                logs: FloatArray = np.log(scores)
            return logs
        return scores

    def _ones(self, size: int) -> npt.NDArray[np.int64]:
        """``size`` int64 ones, a view of one buffer kept across calls (the session only reads masks)."""
        if self._ones_buffer.size < size:
            self._ones_buffer = np.ones(max(size, 2 * self._ones_buffer.size), dtype=np.int64)
            self._ones_buffer.flags.writeable = False
        return self._ones_buffer[:size]

    @staticmethod
    def _prompt(particles: Particles, b: int) -> npt.NDArray[np.int64]:
        if particles.prompt_tokens is None:
            return np.zeros(0, dtype=np.int64)
        return particles.prompt_tokens[b]

    def initial_log_value(self, particles: Particles) -> FloatArray:
        """``log Vh_0``: the model's value of each prompt."""
        sequences = [self._prompt(particles, b) for b in range(particles.num_prompts)]
        if any(len(s) == 0 for s in sequences):
            return np.zeros(particles.num_prompts)
        return self._score(sequences)

    def log_value(self, particles: Particles) -> FloatArray:
        values: Optional[FloatArray] = particles.state.get("rm.log_value")
        scored: Optional[npt.NDArray[np.int64]] = particles.state.get("rm.scored_length")
        stale: Optional[npt.NDArray[np.bool_]] = None  # None: every prefix
        if values is not None and scored is not None:
            stale = scored != particles.lengths
            if not stale.any():
                return values.copy()
            if stale.all():  # the usual step: every particle has moved
                stale = None
        values, scored = self._rescore(particles, values, scored, stale)
        particles.state["rm.log_value"] = values
        particles.state["rm.scored_length"] = scored
        return values.copy()  # the stored array follows resampling in place

    def _rescore(
        self,
        particles: Particles,
        values: Optional[FloatArray],
        scored: Optional[npt.NDArray[np.int64]],
        stale: Optional[npt.NDArray[np.bool_]],
    ) -> tuple[FloatArray, npt.NDArray[np.int64]]:
        """``log Vh`` of the ``stale`` prefixes (None: all) scored in one session call, merged into
        ``values``; and the lengths the values were scored at."""
        batch, count = particles.lengths.shape
        rows = None if stale is None else np.argwhere(stale)
        ids, lengths = self._prefixes(particles, rows)
        read_at = None
        if self.position == "delimiter":
            read_at = self._last_delimiter(particles, rows, ids, lengths)
        fresh = self._score_padded(ids, lengths, read_at)
        if self.verifier is not None:
            for k in np.flatnonzero(_select(particles.finished, rows)):
                b, i = divmod(int(k), count) if rows is None else rows[k]
                fresh[k] = self._verify(particles, b, i)
        if stale is None or values is None or scored is None:
            return fresh.reshape(batch, count), particles.lengths.copy()
        merged = values.copy()
        merged[stale] = fresh
        return merged, np.where(stale, particles.lengths, scored)

    def _prefixes(
        self, particles: Particles, rows: Optional[npt.NDArray[np.int64]] = None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Prompt + generated tokens of the particles ``rows`` (pairs ``(b, i)``; None: all, in order),
        right-padded; and their lengths.

        Built for every particle with two slice copies per group of equally long prompts (one group in
        the usual batch), then the rows taken: in the usual step every particle has moved, and slices cost
        less than indexing token by token."""
        batch, count = particles.lengths.shape
        layout = self._prompt_layout(particles)
        lengths = layout.lengths[:, None] + particles.lengths
        longest = int(lengths.max())
        ids = np.empty((batch, count, longest), dtype=np.int64)
        for members, prompt_ids in layout.groups:
            start = prompt_ids.shape[1]
            generated = int(particles.lengths[members].max())
            ids[members, :, :start] = prompt_ids[:, None, :]
            ids[members, :, start : start + generated] = particles.tokens[members, :, :generated]
        if int(lengths.min()) != longest:  # rows of equal length are written in full
            ids[np.arange(ids.shape[2]) >= lengths[..., None]] = self.pad_token_id
        all_ids, all_lengths = ids.reshape(batch * count, -1), lengths.reshape(-1)
        if rows is None:
            return all_ids, all_lengths
        selected = rows[:, 0] * count + rows[:, 1]
        row_lengths = all_lengths[selected]
        return np.ascontiguousarray(all_ids[selected, : int(row_lengths.max())]), row_lengths

    def _prompt_layout(self, particles: Particles) -> _PromptLayout:
        """The batch's :class:`_PromptLayout`, built again only when its prompts change (a new run)."""
        layout = self._layout
        if layout is None or not layout.fits(particles.prompt_tokens, particles.num_prompts):
            layout = self._layout = _PromptLayout.of(particles.prompt_tokens, particles.num_prompts)
        return layout

    def _last_delimiter(
        self,
        particles: Particles,
        rows: Optional[npt.NDArray[np.int64]],
        ids: npt.NDArray[np.int64],
        lengths: npt.NDArray[np.int64],
    ) -> npt.NDArray[np.int64]:
        """Per row (``rows`` as in :meth:`_prefixes`): the last delimiter among the generated tokens (else
        the last prompt token); the last token for finished trajectories."""
        prompt_lengths = lengths - _select(particles.lengths, rows)
        columns = np.arange(ids.shape[1])
        generated = (columns >= prompt_lengths[:, None]) & (columns < lengths[:, None])
        is_delimiter = generated & np.isin(ids, self.delimiter_ids)
        last = np.where(is_delimiter, columns, -1).max(axis=1)
        read_at = np.where(last >= 0, last, np.maximum(prompt_lengths - 1, 0))
        return np.where(_select(particles.finished, rows), lengths - 1, read_at)

    def _verify(self, particles: Particles, b: int, i: int) -> float:
        assert self.verifier is not None
        generated = particles.tokens[b, i, : particles.lengths[b, i]]
        text: Any = self.tokenizer.decode(generated) if self.tokenizer is not None else generated
        reward = float(self.verifier(particles.prompts[b], text))
        if not (reward >= 0.0) or reward == np.inf:
            raise ValueError(f"verifier: returned {reward!r} for prompt {b}; rewards must be finite and >= 0")
        return float(np.log(reward)) if reward > 0 else -np.inf
