"""Seeding: turn a SPEC 7 ``rng`` argument into the 64-bit keys of the core's Philox streams."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional, TypeVar, Union

import numpy as np
import numpy.typing as npt

T = TypeVar("T")
RNGLike = Union[None, int, np.integer, np.random.SeedSequence, np.random.BitGenerator, np.random.Generator]

# Bit generators whose raw output is a full 64-bit word (MT19937's is 32 bits).
_RAW_64_BITS = (np.random.PCG64, np.random.PCG64DXSM, np.random.Philox, np.random.SFC64)
_fresh_entropy = np.random.default_rng()


def _reseed_after_fork() -> None:
    """A forked child (a pre-forking server's worker, ``multiprocessing`` with fork) gets fresh entropy:
    otherwise every child would continue the parent's generator and draw the same keys."""
    global _fresh_entropy
    _fresh_entropy = np.random.default_rng()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed_after_fork)


def as_generator(rng: RNGLike) -> np.random.Generator:
    """Normalise ``rng`` with ``numpy.random.default_rng`` (a ``Generator`` is used as is)."""
    if isinstance(rng, (bool, np.bool_)):
        raise TypeError(
            "rng: expected None, an int, a SeedSequence, a BitGenerator or a Generator, got a bool"
        )
    try:
        return np.random.default_rng(rng)
    except (TypeError, ValueError) as error:
        raise type(error)(
            f"rng: expected None, an int, a SeedSequence, a BitGenerator or a Generator, got {rng!r}"
        ) from error


@functools.lru_cache(maxsize=4096)
def _key_of_seed(seed: int) -> int:
    return _draw(as_generator(seed))


def _draw(generator: np.random.Generator) -> int:
    bit_generator = generator.bit_generator
    if isinstance(bit_generator, _RAW_64_BITS):
        return int(bit_generator.random_raw())
    return int(generator.integers(0, 2**64, dtype=np.uint64))


def draw_key(rng: RNGLike) -> int:
    """One 64-bit key for a counter-based stream, drawn from ``rng``.

    A ``Generator`` or ``BitGenerator`` advances, so successive calls get fresh keys; an int seed always
    maps to the same key (memoised: seeding a generator costs more than a small kernel call); None
    draws from one generator seeded from OS entropy at import, and again in every forked child.
    """
    if rng is None:
        return _draw(_fresh_entropy)
    if isinstance(rng, np.random.Generator):
        return _draw(rng)
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, (bool, np.bool_)):
        if rng < 0:
            raise ValueError(f"rng: a seed must be non-negative, got {rng}")
        return _key_of_seed(int(rng))
    return _draw(as_generator(rng))


def _callers_bit_generator(rng: object) -> Optional[np.random.BitGenerator]:
    """The bit generator a key drawn from ``rng`` advances where it is the caller's own (a ``Generator``'s
    or a ``BitGenerator``); None for a seed, a ``SeedSequence`` or None (nothing of the caller's moves)."""
    if isinstance(rng, np.random.Generator):
        return rng.bit_generator
    if isinstance(rng, np.random.BitGenerator):
        return rng
    return None


# Bit generators that ``advance(-1)`` steps back over one raw output exactly (advancing only clears the
# buffered half of a 32-bit draw, which a raw draw leaves alone and ``_put_back`` keeps): numpy's default,
# PCG64, and PCG64DXSM. Others are restored from a copy of their state taken before the draw.
_STEPPED_BACK = (np.random.PCG64, np.random.PCG64DXSM)

_Saved = tuple[np.random.BitGenerator, Optional[Mapping[str, Any]]]


def _save(bit_generator: np.random.BitGenerator) -> _Saved:
    return bit_generator, (None if type(bit_generator) in _STEPPED_BACK else bit_generator.state)


def _put_back(saved: _Saved) -> None:
    """Undo the one key drawn after ``_save``."""
    bit_generator, state = saved
    if state is None:
        kept = dict(bit_generator.state)  # the buffered 32-bit half, which a raw draw leaves alone
        bit_generator.advance(-1)  # type: ignore[attr-defined]
        state = {**kept, "state": bit_generator.state["state"]}
    bit_generator.state = state


def keyed(rng: RNGLike, kernel: Callable[[int], T]) -> T:
    """``kernel(key)`` with one key drawn from ``rng`` (``draw_key``). Where ``kernel`` raises (a refused
    call), a caller's ``Generator`` or ``BitGenerator`` is put back where it was before the draw: a refused
    call leaves its inputs as they were."""
    bit_generator = _callers_bit_generator(rng)
    if bit_generator is None:  # nothing of the caller's moves
        return kernel(draw_key(rng))
    # KeyDraws' key and call written out: going through a KeyDraws costs about 0.5 us more a call
    saved = _save(bit_generator)
    key = draw_key(rng)
    try:
        return kernel(key)
    except Exception:
        _put_back(saved)
        raise


class KeyDraws:
    """The keys one call draws (from one generator, or from each run's of a ``RowStreams``), undone
    together where the call is refused (in reverse order: a generator given twice steps back twice)."""

    __slots__ = ("_saved",)

    def __init__(self) -> None:
        self._saved: list[_Saved] = []

    def key(self, rng: RNGLike) -> int:
        """``draw_key(rng)``, recorded to be undone where it moved a caller's generator."""
        bit_generator = _callers_bit_generator(rng)
        if bit_generator is None:
            return draw_key(rng)
        saved = _save(bit_generator)
        key = draw_key(rng)
        self._saved.append(saved)
        return key

    def call(self, kernel: Callable[..., T], *args: Any) -> T:
        """``kernel(*args)``; where it raises, the keys drawn so far are undone."""
        try:
            return kernel(*args)
        except Exception:
            while self._saved:
                _put_back(self._saved.pop())
            raise


def _key(key: object, g: int) -> int:
    """A given key of a ``RowStreams``: a Python or numpy integer (not a bool) in ``[0, 2**64)``."""
    if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, np.integer)):
        raise TypeError(f"keys[{g}]: expected a 64-bit key (an int), got {key!r}")
    value = int(key)
    if not 0 <= value < 2**64:
        raise ValueError(f"keys[{g}]: expected a 64-bit key in [0, 2**64), got {value}")
    return value


class RowStreams:
    """The random streams of a batch whose rows belong to independent runs (requests batched together).

    Rows ``bounds[g]:bounds[g + 1]`` (in the order of the batch's leading axis) belong to run ``g`` and
    draw from ``generators[g]`` exactly as that run's rows would alone, numbered from 0: a core kernel
    given a ``RowStreams`` as ``rng`` runs once per run with one key drawn from that run's generator
    (only where the run has a row to draw), and ``random`` splits its draws the same way. So a run's
    draws depend on its own seed and never on the other runs of the batch. ``keys``: each run's key,
    drawn already (a call repeated run by run after the batched call was refused draws the same).
    """

    __slots__ = ("_counters", "_one_row_each", "bounds", "generators", "keys")

    def __init__(
        self,
        generators: Sequence[np.random.Generator],
        bounds: Sequence[int],
        keys: Optional[Sequence[int]] = None,
    ) -> None:
        if (
            len(bounds) != len(generators) + 1
            or bounds[0] != 0
            or any(a > b for a, b in zip(bounds[:-1], bounds[1:]))
        ):
            raise ValueError(
                f"bounds: expected {len(generators) + 1} ascending row offsets from 0, got {bounds}"
            )
        if keys is not None and len(keys) != len(generators):
            raise ValueError(f"keys: expected one per generator ({len(generators)}), got {len(keys)}")
        self.generators = tuple(generators)
        self.bounds = tuple(int(b) for b in bounds)
        # every run has exactly one row (requests of one prompt, the usual case)
        self._one_row_each = self.bounds == tuple(range(len(self.bounds)))
        self.keys = None if keys is None else tuple(_key(key, g) for g, key in enumerate(keys))
        self._counters: Optional[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.uint64]]]
        self._counters = None

    @property
    def num_rows(self) -> int:
        return self.bounds[-1]

    def groups(self, rows: int, name: str = "rng") -> Iterator[tuple[slice, np.random.Generator]]:
        """``(rows of run g, run g's generator)`` for every run, after checking that ``rows`` agree."""
        if rows != self.num_rows:
            raise ValueError(f"{name}: RowStreams for {self.num_rows} rows, given {rows}")
        for g, generator in enumerate(self.generators):
            yield slice(self.bounds[g], self.bounds[g + 1]), generator

    def run_keys(self, draws: Optional[KeyDraws] = None) -> tuple[int, ...]:
        """One key per run for a kernel that draws from every run: ``keys`` where given, else one drawn
        from each generator (as each run's own call would draw it; recorded in ``draws``, if given, to be
        undone)."""
        if self.keys is not None:
            return self.keys
        draw = draw_key if draws is None else draws.key
        return tuple(draw(generator) for generator in self.generators)

    def row_streams(
        self, rows: int, draws: Optional[KeyDraws] = None
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
        """Each row's stream, ``(keys, counters)``: its run's key (``run_keys``, one drawn per run) and its
        index within the run, after checking that ``rows`` agree."""
        _, sizes, counters = self.row_counters(rows)
        keys = np.array(self.run_keys(draws), dtype=np.uint64)
        return (keys if self._one_row_each else np.repeat(keys, sizes)), counters

    def keyed(self, rows: int, kernel: Callable[[npt.NDArray[np.uint64], npt.NDArray[np.uint64]], T]) -> T:
        """``kernel(keys, counters)`` with the rows' streams (``row_streams``); where ``kernel`` raises (a
        refused call), the keys drawn for it are undone (see ``keyed``)."""
        draws = KeyDraws()
        return draws.call(kernel, *self.row_streams(rows, draws))

    def row_counters(
        self, rows: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.uint64]]:
        """``(starts, sizes, counters)``: each run's first row and row count, and each row's index within its
        run (its counter in the run's stream), after checking that ``rows`` agree (computed once)."""
        if rows != self.num_rows:
            raise ValueError(f"rng: RowStreams for {self.num_rows} rows, given {rows}")
        if self._counters is None and self._one_row_each:
            self._counters = (
                np.arange(rows, dtype=np.int64),
                np.ones(rows, np.int64),
                np.zeros(rows, np.uint64),
            )
        elif self._counters is None:
            bounds = np.array(self.bounds, dtype=np.int64)
            starts, sizes = bounds[:-1], np.diff(bounds)
            counters = (np.arange(rows, dtype=np.int64) - np.repeat(starts, sizes)).astype(np.uint64)
            self._counters = (starts, sizes, counters)
        return self._counters

    def random(self, size: Sequence[int]) -> npt.NDArray[np.float64]:
        """Uniform draws of shape ``size`` whose leading axis is the batch's rows: run ``g``'s rows come
        from ``generators[g].random`` (the draws it would make alone)."""
        shape = tuple(int(s) for s in size)
        out = np.empty(shape)
        for rows, generator in self.groups(shape[0] if shape else 0, "size"):
            out[rows] = generator.random((rows.stop - rows.start, *shape[1:]))
        return out
