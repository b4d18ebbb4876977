"""The particle batch that policies grow, reward models score and samplers reorder."""

from __future__ import annotations

import copy
import dataclasses
import functools
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import numpy.typing as npt

from .. import _device, core
from .device_cache import DeviceKVCache

__all__ = ["MAX_NEW_TOKENS", "Particles"]

# Particles.state key of the most tokens each trajectory may have (a request's max_new_tokens), where a
# sampler sets one; a policy ends a trajectory there as at its own max_new_tokens.
MAX_NEW_TOKENS = "max_new_tokens"


@dataclass
class Particles:
    """``B`` prompts x ``N`` particles, with every per-particle array laid out ``(B, N, ...)``.

    ``tokens[b, i, :lengths[b, i]]`` are the tokens generated so far (prompt excluded); ``finished`` marks
    absorbed particles (never extended again). ``prompt_tokens[b]`` holds prompt ``b``'s token ids where
    the policy tokenises prompts; ``errors[b]`` says why prompt ``b`` could not run (its particles start
    finished and the samplers report it as failed, while the other prompts go on). Models keep any further
    per-particle state (DFA states, KV caches, attention masks) in ``state`` under their own keys (the SMC
    sampler its ``log Vh_{t-1}`` under ``"smc.log_value"``), with the same leading ``(B, N)`` axes, so that
    [`reorder`][tiltsmc.models.particles.Particles.reorder] carries it through resampling without the models
    ever resampling themselves. Work a model can postpone (its session run on the tokens just appended) waits
    in [`defer`][tiltsmc.models.particles.Particles.defer] until the state is next needed. ``aligned`` names
    the state entries that hold a padded sequence (a decoder's KV cache and attention mask):
    ``aligned[key] = (axis, mask_key)``, where the columns along ``axis`` whose entry in the ``mask_key``
    array (``(B, N, length)``) is 0 are padding, so batches with sequences of different lengths can be joined
    by padding ([`concatenate`][tiltsmc.models.particles.Particles.concatenate]) and trimmed when the
    longest leave ([`select`][tiltsmc.models.particles.Particles.select]). The padding is on the left (every
    sequence ends at the last column) unless the mask key is in ``right_padded`` (every sequence starts at
    the first column: attention that reads each row's length from its mask). Entries in ``in_place`` are
    arrays a model writes where they lie (a KV cache whose session writes each row's new keys at the row's
    length): their columns past the mask are the model's room to write, so they are never trimmed, and
    [`concatenate`][tiltsmc.models.particles.Particles.concatenate] writes a later part's rows into spare
    rows behind the first part's where it has them, instead of copying the first part; no column past a
    row's length is ever read, so what lies there is unspecified. A serving lane also writes a newcomer over
    the rows of a run that left ([`fill_rows`][tiltsmc.models.particles.Particles.fill_rows]) and moves rows
    to the front of the batch's memory ([`packed`][tiltsmc.models.particles.Particles.packed]), without
    copying the batch. A state array may
    live in CUDA device memory: it is then reordered where it lies, with the ancestors copied to its device
    once per call; a ``DeviceKVCache`` reorders all its layers in one gather.
    """

    prompts: list[Any]
    tokens: npt.NDArray[np.int64]
    lengths: npt.NDArray[np.int64]
    finished: npt.NDArray[np.bool_]
    state: dict[str, Any] = field(default_factory=dict)
    prompt_tokens: Optional[list[npt.NDArray[np.int64]]] = None
    errors: dict[int, str] = field(default_factory=dict)
    aligned: dict[str, tuple[int, str]] = field(default_factory=dict)
    right_padded: set[str] = field(default_factory=set)
    in_place: set[str] = field(default_factory=set)
    # what decodes these particles' tokens into the texts the results report (the policy that started
    # them, OnnxCausalLM.start: its decode ends a text before its stop strings); None: their token ids
    text_decoder: Any = field(default=None, repr=False, compare=False)
    _pending: list[Callable[[], None]] = field(default_factory=list, init=False, repr=False, compare=False)
    _failure: Optional[BaseException] = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def empty(cls, prompts: Sequence[Any], num_particles: int, capacity: int) -> Particles:
        """A batch with no steps yet and room for ``capacity`` tokens per particle."""
        batch = len(prompts)
        return cls(
            prompts=list(prompts),
            tokens=np.zeros((batch, num_particles, capacity), dtype=np.int64),
            lengths=np.zeros((batch, num_particles), dtype=np.int64),
            finished=np.zeros((batch, num_particles), dtype=bool),
        )

    @property
    def num_prompts(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_particles(self) -> int:
        return int(self.tokens.shape[1])

    def defer(self, work: Callable[[], None]) -> None:
        """Register model work that can wait (a decoder's session run on the tokens just appended): it runs,
        in order, at the next [`flush`][tiltsmc.models.particles.Particles.flush], which
        [`reorder`][tiltsmc.models.particles.Particles.reorder] and
        [`take`][tiltsmc.models.particles.Particles.take] call first and a model calls before it reads its
        state. Work that is never needed (after a sampler's last step) never runs.
        """
        self._pending.append(work)

    @property
    def deferred(self) -> bool:
        """Whether deferred work waits for the next ``flush`` (or failed: the next ``flush`` raises)."""
        return bool(self._pending) or self._failure is not None

    def flush(self) -> None:
        """Run the deferred work (see [`defer`][tiltsmc.models.particles.Particles.defer]).

        Where a work raises, its error propagates and the batch is unusable: the state the work would
        have written (a decoder's logits and caches) is stale beside the tokens already appended, so this
        and every later ``flush`` (every read of the state, every copy or reorder of the batch) raise a
        RuntimeError saying so, from the work's error. Discard the batch."""
        if self._failure is not None:
            raise RuntimeError(
                "particles: unusable after deferred model work failed "
                f"({type(self._failure).__name__}: {self._failure}); discard them"
            ) from self._failure
        while self._pending:
            work = self._pending.pop(0)
            try:
                work()
            except BaseException as error:
                self._failure = error
                self._pending.clear()
                raise

    def __deepcopy__(self, memo: dict[int, Any]) -> Particles:
        """A deep copy of the state with the deferred work done (it refers to the models, which are not
        copied)."""
        self.flush()
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)  # the decoder is a model: shared, not copied
            setattr(copied, item.name, value if item.name == "text_decoder" else copy.deepcopy(value, memo))
        return copied

    def reorder(self, ancestors: npt.NDArray[np.int64], *, across_prompts: bool = False) -> None:
        """Particle ``i`` of prompt ``b`` becomes a copy of particle ``ancestors[b, i]`` (in place).

        With ``across_prompts=True``, ``ancestors`` is ``(1, B * N)``: particle ``k`` of the flattened
        batch becomes a copy of particle ``ancestors[0, k]`` (the batches of
        [`one_per_prompt`][tiltsmc.models.particles.Particles.one_per_prompt]). Deferred work runs first. Host
        arrays are reordered in one core call
        ([`tiltsmc.core.reorder_in_place`][tiltsmc.core.reorder_in_place]); device arrays where they lie;
        arrays that cannot be written in place are replaced by reordered copies. Of an ``in_place`` entry
        (right-padded), a particle takes only the columns its ancestor's mask counts: no other is read."""
        self.flush()
        prefixes = self._prefixes()
        if not across_prompts:
            self.state.update(
                _reorder(self.tokens, self.lengths, self.finished, self.state, ancestors, prefixes)
            )
            return
        total = self.lengths.size
        for name, array in self.state.items():
            if isinstance(array, np.ndarray) and not array.flags.c_contiguous:
                self.state[name] = np.ascontiguousarray(array)
        views = {name: array.reshape(1, total, *array.shape[2:]) for name, array in self.state.items()}
        flat = (
            self.tokens.reshape(1, total, -1),
            self.lengths.reshape(1, total),
            self.finished.reshape(1, total),
        )
        for name, array in _reorder(*flat, views, ancestors, prefixes).items():  # replaced by copies
            self.state[name] = array.reshape(self.state[name].shape)

    def _prefixes(self) -> dict[str, tuple[int, str]]:
        """The ``in_place`` entries whose rows are read only up to their length, by ``aligned``: the
        right-padded ones whose mask is a host array here."""
        return {
            key: self.aligned[key]
            for key in self.in_place
            if key in self.aligned
            and self.aligned[key][1] in self.right_padded
            and type(self.state.get(self.aligned[key][1])) is np.ndarray
        }

    def take(self, ancestors: npt.NDArray[np.int64]) -> Particles:
        """A new batch: particle ``j`` of prompt ``b`` copies particle ``ancestors[b, j]`` (any count)."""
        self.flush()
        on_device: dict[int, Any] = {}
        state = {
            name: _follow(array, ancestors, on_device, in_place=False) for name, array in self.state.items()
        }
        return Particles(
            prompts=list(self.prompts),
            tokens=core.gather(self.tokens, ancestors),
            lengths=core.gather(self.lengths, ancestors),
            finished=core.gather(self.finished, ancestors),
            state=state,
            prompt_tokens=self.prompt_tokens,
            errors=dict(self.errors),
            aligned=dict(self.aligned),
            right_padded=set(self.right_padded),
            in_place=set(self.in_place),
            text_decoder=self.text_decoder,
        )

    @classmethod
    def concatenate(cls, parts: Sequence[Particles], *, reuse_first: bool = False) -> Particles:
        """One batch of the parts' prompts, in order (the parts are left as they were).

        Every part must have the same particle count. Token buffers of different capacities are
        right-padded; ``aligned`` entries of different lengths are padded with zeros on their side (the
        mask's zeros mark the padding), each part's columns on that side that are padding in all its rows
        left out (so the joined batch has no such column). A state entry that some part
        lacks (state a model creates lazily, such as a reward model's cached scores) is dropped: the model
        creates it again for the whole batch at its next call. Any other difference between the parts'
        state entries is an error naming the entry.

        The arrays are new, but for ``in_place`` entries: these are made with spare rows (half as many
        again), and where the first part's array ends where the rows taken of its memory end (nothing
        joined behind it since), the other parts' rows are written there, as wide as the first part's,
        and the result is a view of the same memory (only the newcomers copied). Of an ``in_place`` entry,
        a particle's columns past those its (host) mask counts are not copied: the model reads none. The
        joined batch and the first part then share those rows, as after
        [`view_rows`][tiltsmc.models.particles.Particles.view_rows]: use the joined batch in its place.

        ``reuse_first``: the first part is given up (a serving lane's batch, which the joined batch
        replaces; nothing reads it or a view of its memory afterwards). Where too few spare rows are left
        behind its ``in_place`` rows but the rows before them are free (left by the batch's earlier rows
        that have gone), its rows are moved to the front of their memory to make room, a copy within memory
        already in use, instead of into new memory. Every part is checked before anything is moved.
        """
        if not parts:
            raise ValueError("parts: expected at least one batch to concatenate")
        count = parts[0].num_particles
        for part in parts:
            part.flush()
            if part.num_particles != count:
                raise ValueError(
                    f"parts: batches of {part.num_particles} and {count} particles a prompt cannot be joined"
                )
        aligned: dict[str, tuple[int, str]] = {}
        right_padded: set[str] = set()
        in_place: set[str] = set()
        for part in parts:
            aligned.update(part.aligned)
            right_padded |= part.right_padded
            in_place |= part.in_place
        capacity = max(part.tokens.shape[2] for part in parts)
        tokens = np.zeros((sum(p.num_prompts for p in parts), count, capacity), dtype=np.int64)
        offset = 0
        errors: dict[int, str] = {}
        for part in parts:
            tokens[offset : offset + part.num_prompts, :, : part.tokens.shape[2]] = part.tokens
            errors.update((offset + b, message) for b, message in part.errors.items())
            offset += part.num_prompts
        with_prompts = [p.prompt_tokens is not None for p in parts]
        if any(with_prompts) and not all(with_prompts):
            raise ValueError("parts: some batches have prompt tokens and others not (different policies?)")
        # each part's columns that are padding in all its rows (left by view_rows) go in the copy
        skips = {
            mask_key: [_unused(part.state.get(mask_key), mask_key in right_padded) for part in parts]
            for mask_key in {mask for _, mask in aligned.values()}
        }
        state: dict[str, Any] = {}
        written_in_place: dict[str, tuple[list[np.ndarray], int, bool]] = {}
        for key in parts[0].state:
            if all(key in part.state for part in parts):
                alignment = aligned.get(key)
                arrays = [part.state[key] for part in parts]
                if key in in_place and alignment is not None and alignment[1] in right_padded:
                    # joined last, once every entry is known to join: they may move the first part's rows
                    fits = _in_place_fits(key, arrays, alignment[0])
                    written_in_place[key] = (arrays, alignment[0], fits)
                    state[key] = None
                    continue
                state[key] = _joined_state(
                    key,
                    arrays,
                    alignment,
                    None if alignment is None else skips[alignment[1]],
                    alignment is not None and alignment[1] in right_padded,
                )
        used: dict[str, Optional[npt.NDArray[np.int64]]] = {}  # by mask: each row's length, where needed

        def rows_used(mask_key: str) -> Optional[npt.NDArray[np.int64]]:
            if mask_key not in used:
                used[mask_key] = _rows_used(parts, mask_key)
            return used[mask_key]

        for key, (arrays, axis, fits) in written_in_place.items():
            state[key] = _joined_in_place(
                arrays, axis, fits, reuse_first, functools.partial(rows_used, aligned[key][1])
            )
        return cls(
            prompts=[prompt for part in parts for prompt in part.prompts],
            tokens=tokens,
            lengths=np.concatenate([part.lengths for part in parts]),
            finished=np.concatenate([part.finished for part in parts]),
            state=state,
            prompt_tokens=(
                [ids for part in parts for ids in part.prompt_tokens]  # type: ignore[union-attr]
                if all(with_prompts)
                else None
            ),
            errors=errors,
            aligned=aligned,
            right_padded=right_padded,
            in_place=in_place,
            # the parts of one batch come from one policy: the first part's decoder is theirs
            text_decoder=next((part.text_decoder for part in parts if part.text_decoder is not None), None),
        )

    def select(self, prompts: npt.ArrayLike) -> Particles:
        """A new batch of the given prompts (indices along the prompt axis, in that order, negative ones
        counted from the end; a prompt may be selected more than once), every array copied; each selected
        prompt keeps its error (``errors``) at every position it is selected at. ``aligned`` entries lose
        the columns on their padding side that are padding in every selected row."""
        self.flush()
        index = np.asarray(prompts, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < -self.num_prompts or index.max() >= self.num_prompts):
            count = self.num_prompts
            raise IndexError(f"prompts: indices must lie in [-{count}, {count}), got {index.tolist()}")
        index = np.where(index < 0, index + self.num_prompts, index)
        errors = {k: self.errors[b] for k, b in enumerate(index.tolist()) if b in self.errors}
        return Particles(
            prompts=[self.prompts[b] for b in index],
            tokens=self.tokens[index],
            lengths=self.lengths[index],
            finished=self.finished[index],
            state=self._state_rows(index, trim_from=0.0),
            prompt_tokens=None if self.prompt_tokens is None else [self.prompt_tokens[b] for b in index],
            errors=errors,
            aligned=dict(self.aligned),
            right_padded=set(self.right_padded),
            in_place=set(self.in_place),
            text_decoder=self.text_decoder,
        )

    def view_rows(self, start: int, stop: int) -> Particles:
        """The batch of prompts ``start:stop`` as views of this batch's arrays (deferred work done first):
        what [`select`][tiltsmc.models.particles.Particles.select] gives for a range of prompts, without
        copying. The two batches then share their memory (use the new one in place of this one). ``aligned``
        entries keep their columns that became padding in every row unless these are at least half their
        width (then they are trimmed, which copies them): a run leaving costs no copy, and the next
        [`concatenate`][tiltsmc.models.particles.Particles.concatenate] trims them in the copy it makes."""
        self.flush()
        if not 0 <= start <= stop <= self.num_prompts:
            raise IndexError(
                f"start, stop: expected 0 <= start <= stop <= {self.num_prompts}, got {start}, {stop}"
            )
        return Particles(
            prompts=self.prompts[start:stop],
            tokens=self.tokens[start:stop],
            lengths=self.lengths[start:stop],
            finished=self.finished[start:stop],
            state=self._state_rows(slice(start, stop), trim_from=0.5),
            prompt_tokens=None if self.prompt_tokens is None else self.prompt_tokens[start:stop],
            errors={b - start: m for b, m in self.errors.items() if start <= b < stop},
            aligned=dict(self.aligned),
            right_padded=set(self.right_padded),
            in_place=set(self.in_place),
            text_decoder=self.text_decoder,
        )

    def fill_rows(self, rows: Union[int, npt.ArrayLike], part: Particles) -> bool:
        """Write ``part``'s prompts over this batch's prompts ``rows`` (their tokens, state, prompt, prompt
        tokens and errors), in place: a batch's rows that runs have left, taken by newcomers without
        copying the batch. ``rows``: the first of ``part.num_prompts`` rows in a row (an int), or one
        distinct row for each of the part's prompts, in its order. Returns False, having written nothing,
        where the part does not fit in place: a wider token buffer or ``aligned`` entry (after leaving out
        its columns that are padding in all its rows, as ``concatenate`` does), another particle count,
        state laid out otherwise, or an array that is not a writeable C-contiguous host array. ``aligned``
        entries narrower than the batch's are padded with zeros on their padding side, but ``in_place``
        ones, whose columns past the part's are left as they were (the model reads none past a row's
        length). A state entry the part lacks is dropped from the batch (as by ``concatenate``: the model
        creates it again for the whole batch).
        """
        if not isinstance(part, Particles):
            raise TypeError(f"part: expected Particles, got {type(part).__name__}")
        where: Any
        if isinstance(rows, (int, np.integer)) and not isinstance(rows, bool):
            start, stop = int(rows), int(rows) + part.num_prompts
            if not 0 <= start <= stop <= self.num_prompts:
                raise IndexError(
                    f"rows: rows {start}:{stop} do not lie in the batch's {self.num_prompts} prompts"
                )
            where, targets = slice(start, stop), list(range(start, stop))
        else:
            where = np.asarray(rows)
            if where.dtype.kind not in "iu" or where.shape != (part.num_prompts,):
                raise ValueError(
                    f"rows: expected a first row, or {part.num_prompts} row indices (one per prompt of the "
                    f"part), got {where.dtype} of shape {where.shape}"
                )
            targets = where.tolist()
            if targets and not 0 <= min(targets) <= max(targets) < self.num_prompts:
                raise IndexError(f"rows: {targets} do not lie in the batch's {self.num_prompts} prompts")
            if len(set(targets)) != len(targets):
                raise ValueError(f"rows: each row at most once, got {targets}")
        self.flush()
        part.flush()
        same_layout = (
            part.num_particles == self.num_particles
            and part.aligned == self.aligned
            and part.right_padded == self.right_padded
            and part.in_place == self.in_place
            and (part.prompt_tokens is None) == (self.prompt_tokens is None)
            and part.tokens.shape[2] <= self.tokens.shape[2]
        )
        if not same_layout:
            return False
        writes: list[tuple[str, np.ndarray, np.ndarray, Optional[tuple[int, int, bool]]]] = []
        skips = {
            mask: _unused(part.state.get(mask), mask in self.right_padded)
            for mask in {mask for _, mask in self.aligned.values()}
        }
        for key, array in self.state.items():
            if key not in part.state:
                continue
            source = part.state[key]
            if not (
                type(array) is np.ndarray
                and type(source) is np.ndarray
                and array.flags.c_contiguous
                and array.flags.writeable
                and source.dtype == array.dtype
                and source.ndim == array.ndim
            ):
                return False
            alignment = self.aligned.get(key)
            if alignment is None:
                if source.shape[1:] != array.shape[1:]:
                    return False
                writes.append((key, array, source, None))
                continue
            axis, mask = alignment
            skip = 0 if key in self.in_place else min(skips[mask], source.shape[axis])
            inner = source.shape[1:axis] + source.shape[axis + 1 :]
            if inner != array.shape[1:axis] + array.shape[axis + 1 :]:
                return False
            if source.shape[axis] - skip > array.shape[axis]:
                return False
            writes.append((key, array, source, (axis, skip, mask in self.right_padded)))
        self.tokens[where] = 0
        self.tokens[where, :, : part.tokens.shape[2]] = part.tokens
        self.lengths[where] = part.lengths
        self.finished[where] = part.finished
        for key, array, source, padding in writes:
            if padding is None:
                array[where] = source
            elif key in self.in_place:  # its own columns: the model reads none past a row's length
                _write_own_columns(array, where, source, padding[0])
            elif isinstance(where, slice):
                _write_padded(array[where], source, *padding)
            else:  # rows here and there: padded into one block, then written to them
                block = np.empty((len(targets), *array.shape[1:]), dtype=array.dtype)
                _write_padded(block, source, *padding)
                array[where] = block
        for key in [key for key in self.state if key not in part.state]:
            del self.state[key]
        for k, row in enumerate(targets):
            self.prompts[row] = part.prompts[k]
        if self.prompt_tokens is not None and part.prompt_tokens is not None:
            for k, row in enumerate(targets):
                self.prompt_tokens[row] = part.prompt_tokens[k]
        taken = set(targets)
        self.errors = {b: m for b, m in self.errors.items() if b not in taken}
        self.errors.update((targets[b], message) for b, message in part.errors.items())
        return True

    def packed(self, prompts: npt.ArrayLike) -> Particles:
        """The batch of ``prompts`` (indices along the prompt axis, each at most once, in that order),
        what [`select`][tiltsmc.models.particles.Particles.select] gives, made by moving them to the front
        of this batch's memory (only the prompts not already in their place are copied, by the in-place
        reorder) and cutting there, instead of copying the batch: this batch is given up (its arrays are
        overwritten; use the new one in its place). ``in_place`` entries free the rows after the cut for
        later joins (``concatenate`` writes newcomers there)."""
        index = np.asarray(prompts, dtype=np.int64).reshape(-1)
        count = self.num_prompts
        if index.size and (index.min() < 0 or index.max() >= count):
            raise IndexError(f"prompts: indices must lie in [0, {count}), got {index.tolist()}")
        seen = np.zeros(count, dtype=bool)
        seen[index] = True
        if np.count_nonzero(seen) != index.size:  # O(n), where np.unique sorts
            raise ValueError(f"prompts: each prompt at most once, got {index.tolist()}")
        self.flush()
        kept = index.size
        if not np.array_equal(index, np.arange(kept)):
            n = self.num_particles
            ancestors = np.arange(count * n, dtype=np.int64)
            ancestors[: kept * n] = (index[:, None] * n + np.arange(n)).reshape(-1)
            self.reorder(ancestors[None, :], across_prompts=True)
            positions = index.tolist()
            self.prompts[:kept] = [self.prompts[b] for b in positions]
            if self.prompt_tokens is not None:
                self.prompt_tokens[:kept] = [self.prompt_tokens[b] for b in positions]
            where = {b: k for k, b in enumerate(positions)}
            self.errors = {where[b]: m for b, m in self.errors.items() if b in where}
        cut = self.view_rows(0, kept)
        for key in self.in_place:
            array = self.state.get(key)
            if type(array) is np.ndarray and cut.state.get(key) is not None:
                cut.state[key] = _SPARE_ROWS.cut(array, kept)
        return cut

    def trims_by_copying(self) -> bool:
        """Whether dropping padding columns copies more than masks: an ``aligned`` entry that is neither a
        mask nor ``in_place`` (a KV cache padded on the left, or copied at every step)."""
        masks = {mask for _, mask in self.aligned.values()}
        return any(key not in masks and key not in self.in_place for key in self.aligned)

    def trim_padding(self, at_least: float = 0.0) -> None:
        """Drop the columns of ``aligned`` entries (but those ``in_place``) that are padding in every row,
        where they are at least ``at_least`` of the entries' width (the entries are copied without them),
        or where the mask itself is the only entry to copy (its other entries in place): any such column.
        A batch whose rows are taken over by others (``fill_rows``) keeps columns no row uses; a decoder's
        attention pays for every column it is given."""
        self.flush()
        self._check_host_state()
        state = dict(self.state)
        if self._trim_columns(state, at_least):  # else the state stays as it is
            self.state = state

    def _check_host_state(self) -> None:
        """Every state entry a host array (rows are selected and columns trimmed with numpy)."""
        for key, array in self.state.items():
            if not isinstance(array, np.ndarray):
                raise TypeError(f"Particles.state[{key!r}]: {type(array).__name__} cannot be selected from")

    def _state_rows(self, rows: Any, trim_from: float) -> dict[str, Any]:
        """Every state array at ``rows`` along the prompt axis (an index array: copies; a slice: views),
        trimmed as by ``_trim_columns``."""
        self._check_host_state()
        state = {key: array[rows] for key, array in self.state.items()}
        self._trim_columns(state, trim_from)
        return state

    def _trim_columns(self, state: dict[str, Any], trim_from: float) -> bool:
        """In ``state`` (this batch's entries, or their rows), the ``aligned`` entries of a mask lose the
        columns on their padding side that are padding in every row where these are at least ``trim_from``
        of its width, or where the mask is the only one to lose them (which copies them), but for those
        ``in_place``; whether any did."""
        trimmed = False
        for mask_key in {mask for _, mask in self.aligned.values()}:
            if mask_key not in state or not state[mask_key].size:
                continue
            on_right = mask_key in self.right_padded
            unused = _unused(state[mask_key], on_right)
            width = state[mask_key].shape[-1]
            copied = [k for k, (_, m) in self.aligned.items() if m == mask_key and k not in self.in_place]
            if unused and (unused >= trim_from * width or copied == [mask_key]):
                kept = slice(0, width - unused) if on_right else slice(unused, None)
                for key, (axis, mask) in self.aligned.items():
                    if mask == mask_key and key in state and key not in self.in_place:
                        state[key] = np.ascontiguousarray(state[key][(slice(None),) * axis + (kept,)])
                        trimmed = True
        return trimmed

    def one_per_prompt(self) -> Particles:
        """The same particles with leading axes ``(B * N, 1)``: every particle its own prompt entry (its
        prompt repeated), views of the same memory (deferred work done first). Batches of runs with
        different particle counts can then be joined, and
        [`reorder`][tiltsmc.models.particles.Particles.reorder] with ``across_prompts=True``
        moves particles within each run's range of entries."""
        self.flush()
        total, each = self.lengths.size, self.num_particles

        def view(array: Any, name: str) -> Any:
            if not isinstance(array, np.ndarray):
                raise TypeError(f"{name}: {type(array).__name__} cannot be reshaped")
            if array.shape[:2] != self.lengths.shape:
                raise ValueError(
                    f"{name}: leading axes {array.shape[:2]} are not (B, N) = {self.lengths.shape}"
                )
            return np.ascontiguousarray(array).reshape(total, 1, *array.shape[2:])

        return Particles(
            prompts=[prompt for prompt in self.prompts for _ in range(each)],
            tokens=view(self.tokens, "Particles.tokens"),
            lengths=view(self.lengths, "Particles.lengths"),
            finished=view(self.finished, "Particles.finished"),
            state={key: view(array, f"Particles.state[{key!r}]") for key, array in self.state.items()},
            prompt_tokens=(
                None
                if self.prompt_tokens is None
                else [ids for ids in self.prompt_tokens for _ in range(each)]
            ),
            errors={
                b * each + i: message
                for b, message in sorted(self.errors.items())
                if 0 <= b < len(self.prompts)
                for i in range(each)
            },
            aligned=dict(self.aligned),
            right_padded=set(self.right_padded),
            in_place=set(self.in_place),
            text_decoder=self.text_decoder,
        )

    def sequences(self, prompt: int) -> list[npt.NDArray[np.int64]]:
        """The generated steps of every particle of one prompt, each trimmed to its length."""
        return [self.tokens[prompt, i, : self.lengths[prompt, i]].copy() for i in range(self.num_particles)]


def _unused(mask: Any, on_right: bool) -> int:
    """How many columns of a ``(B, N, length)`` mask are padding (0) in every row, counted from its first
    column (``on_right`` false) or from its last; 0 for a mask that is absent or not a host array (nothing
    is trimmed)."""
    if not isinstance(mask, np.ndarray) or mask.ndim < 1 or not mask.shape[-1]:
        return 0
    columns = mask.reshape(-1, mask.shape[-1])
    if columns[:, -1 if on_right else 0].any():  # the common case: no such padding
        return 0
    used = np.flatnonzero(columns.any(axis=0))
    if not used.size:
        return int(mask.shape[-1])
    return int(mask.shape[-1] - 1 - used[-1]) if on_right else int(used[0])


def _joined_state(
    key: str,
    arrays: list[Any],
    alignment: Optional[tuple[int, str]],
    unused: Optional[list[int]] = None,
    on_right: bool = False,
) -> np.ndarray:
    """One state entry of [`Particles.concatenate`][tiltsmc.models.particles.Particles.concatenate]: the
    parts' arrays one after the other along the prompt axis, aligned ones without the ``unused[k]``
    columns on their padding side (padding in all of part ``k``'s rows) and padded with zeros to the
    longest, on the left or (``on_right``) the right (one core call,
    [`tiltsmc.core.concatenate_padded`][tiltsmc.core.concatenate_padded], split over threads for the
    large ones: a KV cache); the others, a few numbers a particle, by ``np.concatenate``."""
    for array in arrays:
        if not isinstance(array, np.ndarray):
            raise TypeError(f"Particles.state[{key!r}]: {type(array).__name__} cannot be concatenated")
    axis = None if alignment is None else alignment[0]
    skips = None
    if axis is not None:
        if any(array.ndim <= axis for array in arrays):
            shapes = [a.shape for a in arrays]
            raise ValueError(f"Particles.state[{key!r}]: shapes {shapes} have no axis {axis}")
        skips = [min(skip, array.shape[axis]) for skip, array in zip(unused or [0] * len(arrays), arrays)]
    try:
        if axis is None:
            return np.concatenate(arrays)
        return core.concatenate_padded(arrays, axis, skips, "right" if on_right else "left")
    except ValueError as error:
        raise ValueError(
            f"Particles.state[{key!r}]: shapes {[a.shape for a in arrays]} differ beyond the (B, N) axes"
        ) from error


class _SpareRows:
    """The arrays made with spare rows (by ``id``, with a weak reference: an id reused by another array
    is not theirs) and, for each, how many of its rows are taken: rows behind a batch's may be written
    only while no later join has taken them."""

    def __init__(self) -> None:
        self._taken: dict[int, tuple[weakref.ref[np.ndarray], int]] = {}
        self._lock = threading.Lock()  # lanes of several workers join at once

    def make(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        """An array of ``shape``, not initialised, that is the first rows of one with half as many again
        (not initialised either: a join writes its parts' own columns there; an ``in_place`` entry's
        columns past a row's length are never read)."""
        rows = int(shape[0])
        owner = np.empty((rows + rows // 2 + 1, *shape[1:]), dtype=dtype)
        key = id(owner)
        with self._lock:
            self._taken[key] = (weakref.ref(owner), rows)
        weakref.finalize(owner, self._forget, key)
        return owner[:rows]

    def has_spare_rows(self, array: np.ndarray) -> bool:
        """Whether ``array`` is a view of an array made here (its rows may have spare rows behind)."""
        owner = array.base
        if not isinstance(owner, np.ndarray):
            return False
        with self._lock:
            entry = self._taken.get(id(owner))
        return entry is not None and entry[0]() is owner

    def _forget(self, key: int) -> None:
        with self._lock:
            entry = self._taken.get(key)
            if entry is not None and entry[0]() is None:
                del self._taken[key]

    def behind(
        self, array: np.ndarray, rows: int, move: bool = False
    ) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """The ``rows`` rows right behind ``array``'s in the spare rows of the array it is a view of, now
        taken, and ``array``'s rows with them (views); None where it is no such view, another join took
        the rows behind it, or too few are left.

        With ``move`` (the caller gives ``array`` up), where too few are left but the memory's rows before
        ``array``'s make room (rows taken by earlier joins, whose batches have left: ``array`` ends where
        the rows taken end, so no later batch holds them), ``array``'s rows are first moved to the front of
        the memory; the views are then of the rows there."""
        placed = self._last_taken(array)
        if placed is None:
            return None
        owner, offset, end = placed
        moved_from = None
        with self._lock:
            if not self._still_last(owner, end):
                return None
            if end + rows > owner.shape[0]:
                if not move or not offset or array.shape[0] + rows > owner.shape[0]:
                    return None
                moved_from, offset, end = offset, 0, array.shape[0]
            self._taken[id(owner)] = (self._taken[id(owner)][0], end + rows)
        if moved_from is not None:
            _move_to_front(owner, moved_from, end)
        return owner[end : end + rows], owner[offset : end + rows]

    def cut(self, array: np.ndarray, rows: int) -> np.ndarray:
        """``array``'s first ``rows`` rows (a view), the rest of its rows free for later joins where it
        ends where the rows taken of its memory end (the caller gives those rows up)."""
        placed = self._last_taken(array)
        if placed is not None:
            owner, offset, end = placed
            with self._lock:
                if self._still_last(owner, end):
                    self._taken[id(owner)] = (self._taken[id(owner)][0], offset + rows)
        return array[:rows]

    def _last_taken(self, array: np.ndarray) -> Optional[tuple[np.ndarray, int, int]]:
        """The array ``array`` is a view of (made here), and the rows of it ``array`` starts and ends at;
        None where it is no whole-row view of such an array."""
        owner = array.base
        if not isinstance(owner, np.ndarray) or not array.flags.c_contiguous or not owner.flags.c_contiguous:
            return None
        row_bytes = array.strides[0] if array.ndim else 0
        if row_bytes <= 0 or array.shape[1:] != owner.shape[1:] or array.dtype != owner.dtype:
            return None
        offset, rest = divmod(array.ctypes.data - owner.ctypes.data, row_bytes)
        return None if rest else (owner, offset, offset + array.shape[0])

    def _still_last(self, owner: np.ndarray, end: int) -> bool:
        """Whether ``owner`` is registered here and its rows taken end at ``end`` (call with the lock)."""
        entry = self._taken.get(id(owner))
        return entry is not None and entry[0]() is owner and entry[1] == end


def _move_to_front(owner: np.ndarray, start: int, count: int) -> None:
    """Rows ``start:start + count`` of ``owner`` copied to rows ``0:count`` (``start > 0``), in blocks of
    ``start`` rows taken in order: a block's rows are read before any block writes over them, and no block
    overlaps its own target (numpy would copy an overlapping one through a temporary)."""
    for first in range(0, count, start):
        last = min(first + start, count)
        owner[first:last] = owner[start + first : start + last]


_SPARE_ROWS = _SpareRows()


def widened(array: np.ndarray, width: int, axis: int) -> np.ndarray:
    """A copy of ``array`` ``width`` wide along ``axis`` (at least its width), its entries at the start and
    the columns after not initialised (an ``in_place`` KV cache, whose session reads no column past a
    row's length); made with spare rows where ``array`` has them (a batch that joins others keeps room
    for them: see [`Particles.concatenate`][tiltsmc.models.particles.Particles.concatenate])."""
    shape = list(array.shape)
    old, shape[axis] = shape[axis], width
    spare = _SPARE_ROWS.has_spare_rows(array)
    grown = _SPARE_ROWS.make(shape, array.dtype) if spare else np.empty(shape, array.dtype)
    grown[(*(slice(None),) * axis, slice(0, old))] = array
    return grown


def _write_own_columns(target: np.ndarray, rows: Any, source: np.ndarray, axis: int) -> None:
    """``source`` into ``target``'s ``rows``, its own columns along ``axis`` only (an ``in_place`` entry:
    the columns after are never read, so they are left as they were)."""
    target[(rows, *(slice(None),) * (axis - 1), slice(0, source.shape[axis]))] = source


def _write_padded(out: np.ndarray, source: np.ndarray, axis: int, skip: int, on_right: bool) -> None:
    """``source`` without its ``skip`` columns of padding along ``axis`` written into ``out`` (as many rows,
    at least as wide, the same dtype), against the padding's far side, ``out``'s other columns zero:
    ``core.concatenate_padded`` of one part, for ``fill_rows``, which has checked the shapes (a numpy
    write: the core's checks of its arguments cost more than the copy of these few rows)."""
    kept, width = source.shape[axis] - skip, out.shape[axis]
    lead = (slice(None),) * axis
    if on_right:
        out[(*lead, slice(0, kept))] = source[(*lead, slice(0, kept))]
        out[(*lead, slice(kept, width))] = 0
    else:
        out[(*lead, slice(width - kept, width))] = source[(*lead, slice(skip, skip + kept))]
        out[(*lead, slice(0, width - kept))] = 0


def _in_place_fits(key: str, arrays: list[Any], axis: int) -> bool:
    """Whether the parts of an ``in_place`` state entry (right-padded along ``axis``) can be written behind
    the first's rows: the first's shape but for the rows, at most its width, the same dtype. Parts that
    cannot be joined at all are refused, naming the entry."""
    for array in arrays:
        if not isinstance(array, np.ndarray):
            raise TypeError(f"Particles.state[{key!r}]: {type(array).__name__} cannot be concatenated")
    shapes = [array.shape for array in arrays]
    if any(array.ndim <= axis for array in arrays):
        raise ValueError(f"Particles.state[{key!r}]: shapes {shapes} have no axis {axis}")
    inner = [shape[1:axis] + shape[axis + 1 :] for shape in shapes]
    if any(other != inner[0] for other in inner):
        raise ValueError(f"Particles.state[{key!r}]: shapes {shapes} differ beyond the (B, N) axes")
    first = arrays[0]
    return all(a.dtype == first.dtype and a.shape[axis] <= first.shape[axis] for a in arrays[1:])


def _joined_in_place(
    arrays: list[np.ndarray],
    axis: int,
    fits: bool,
    reuse_first: bool,
    used: Callable[[], Optional[npt.NDArray[np.int64]]],
) -> np.ndarray:
    """An ``in_place`` state entry of
    [`Particles.concatenate`][tiltsmc.models.particles.Particles.concatenate], right-padded along ``axis``
    (checked by ``_in_place_fits``): the later parts' own columns written into the spare rows behind the
    first's, where it has them (``reuse_first``: or once its rows are moved to the front of their
    memory), and a view of its memory returned (the first part's rows not copied); else every part copied
    into a new array with spare rows, as wide as the widest part (nothing trimmed), each particle's
    columns that its mask counts alone where ``used()`` gives them (``_rows_used``). The columns past
    those are left as they were: the model reads no column past a row's length."""
    first, rest = arrays[0], arrays[1:]
    added = sum(array.shape[0] for array in rest)
    behind = _SPARE_ROWS.behind(first, added, move=reuse_first) if fits else None
    if behind is not None:
        target, joined = behind
        start = 0
        for array in rest:
            _write_own_columns(target, slice(start, start + array.shape[0]), array, axis)
            start += array.shape[0]
        return joined
    shape = list(first.shape)
    shape[0] = sum(array.shape[0] for array in arrays)
    shape[axis] = max(array.shape[axis] for array in arrays)
    out = _SPARE_ROWS.make(shape, np.result_type(*arrays))
    lengths = used()
    if lengths is None:
        return core.concatenate_padded(arrays, axis, padding_side="right", out=out)
    # a particle a row: (B * N, ...), so that each row copies as many columns as its own mask counts
    particles = [array.reshape(-1, *array.shape[2:]) for array in arrays]
    core.concatenate_padded(
        particles, axis - 1, padding_side="right", out=out.reshape(-1, *shape[2:]), used=lengths
    )
    return out


def _rows_used(parts: Sequence[Particles], mask_key: str) -> Optional[npt.NDArray[np.int64]]:
    """Each particle's length by its right-padded mask ``mask_key`` (``mask_lengths``), the parts' one after
    the other (``(B * N,)``); None where a part's mask is not a host ``(B, N, length)`` array."""
    counts = []
    for part in parts:
        mask = part.state.get(mask_key)
        if type(mask) is not np.ndarray or mask.ndim != 3 or mask.shape[:2] != part.lengths.shape:
            return None
        counts.append(mask_lengths(mask).reshape(-1))
    return np.concatenate(counts)


def _reorder(
    tokens: np.ndarray,
    lengths: np.ndarray,
    finished: np.ndarray,
    state: dict[str, Any],
    ancestors: npt.NDArray[np.int64],
    prefixes: Optional[dict[str, tuple[int, str]]] = None,
) -> dict[str, Any]:
    """``Particles.reorder`` of these arrays (leading axes ``lengths.shape``): host arrays in one core call
    that checks every array's leading axes and every index before it writes; the state entries it cannot
    write in place (device arrays, arrays not C-contiguous and writeable) reordered where they lie or
    copied, returned by name to replace them. ``prefixes`` (entry -> ``(axis, mask)``): entries of which a
    particle takes only the columns along ``axis`` that its ancestor's mask counts (those of one mask:
    the first named)."""
    used = axes = None
    mask_key = next(iter(prefixes.values()))[1] if prefixes else None
    mask = state.get(mask_key) if mask_key is not None else None
    if prefixes and isinstance(mask, np.ndarray) and mask.ndim == 3 and mask.shape[:2] == lengths.shape:
        used = mask_lengths(mask)  # before the mask is reordered
        axes = [None, None, None] + [
            prefixes[name][0] if prefixes.get(name, (0, None))[1] == mask_key else None for name in state
        ]
    try:
        arrays = [tokens, lengths, finished, *state.values()]
        skipped = core.reorder_in_place(arrays, ancestors, skip_unwritable=True, used=used, axes=axes)
    except ValueError:
        for name, array in state.items():  # names the state entry, where one is at fault
            if tuple(array.shape[:2]) != lengths.shape:
                raise ValueError(
                    f"Particles.state[{name!r}]: leading axes {tuple(array.shape[:2])} are not (B, N) = "
                    f"{lengths.shape}"
                ) from None
        raise
    names = list(state)
    on_device: dict[int, Any] = {}
    return {names[k - 3]: _follow(state[names[k - 3]], ancestors, on_device, in_place=True) for k in skipped}


def _follow(array: Any, ancestors: npt.NDArray[np.int64], uploaded: dict[int, Any], in_place: bool) -> Any:
    """One state entry reordered by ``ancestors``: in place where it can be (host arrays that are
    C-contiguous and writeable, device arrays, a DeviceKVCache), else a new array."""
    if isinstance(array, DeviceKVCache):
        if not in_place:
            return array.take(ancestors)
        array.reorder(ancestors)
        return array
    if type(array) is not np.ndarray and _device.is_device_array(array):
        return core.gather(array, _ancestors_on(array, ancestors, uploaded), out=array if in_place else None)
    if in_place and array.flags.c_contiguous and array.flags.writeable:
        return core.gather(array, ancestors, out=array)
    return core.gather(array, ancestors)


def _ancestors_on(array: Any, ancestors: npt.NDArray[np.int64], uploaded: dict[int, Any]) -> Any:
    """``ancestors`` (int64) on the CUDA device of ``array``, copied there once per device and call."""
    device = _device.device_view(array, "Particles.state").device
    if device not in uploaded:
        uploaded[device] = _device.to_device(np.asarray(ancestors, dtype=np.int64), device)
    return uploaded[device]


def mask_lengths(mask: np.ndarray) -> npt.NDArray[np.int64]:
    """The ones of each row of an attention mask (its 0 / 1 entries summed along the last axis): a
    right-padded row's length. ``np.count_nonzero`` with an axis compares, then sums, in about three
    times the time (on the serving lane's path at every resampling)."""
    lengths: npt.NDArray[np.int64] = np.add.reduce(mask, axis=-1, dtype=np.int64)
    return lengths


def padded(
    sequences: Sequence[npt.NDArray[np.int64]], pad_id: int, side: str = "left"
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Token sequences as one batch, as a decoder's first call over prompts takes them: ``input_ids`` and
    ``attention_mask`` ``(B, width)``, every sequence ending at the last column (``side="left"``, the
    padding before it) or starting at the first (``"right"``: attention that reads each row's length from
    its mask, ``sum(mask) - 1``, ONNX Runtime's ``GroupQueryAttention``), and ``position_ids`` counting each
    row's real tokens from 0 (0 on the padding)."""
    batch, width = len(sequences), max(len(ids) for ids in sequences)
    ids = np.full((batch, width), pad_id, dtype=np.int64)
    mask = np.zeros((batch, width), dtype=np.int64)
    for b, sequence in enumerate(sequences):
        columns = slice(0, len(sequence)) if side == "right" else slice(width - len(sequence), width)
        ids[b, columns] = sequence
        mask[b, columns] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0) * mask
    return ids, mask, positions
