"""Seeding: turn a SPEC 7 ``rng`` argument into the 64-bit keys of the core's Philox streams."""

from __future__ import annotations

import functools
from typing import Union

import numpy as np

RNGLike = Union[None, int, np.integer, np.random.SeedSequence, np.random.BitGenerator, np.random.Generator]

# Bit generators whose raw output is a full 64-bit word (MT19937's is 32 bits).
_RAW_64_BITS = (np.random.PCG64, np.random.PCG64DXSM, np.random.Philox, np.random.SFC64)
_fresh_entropy = np.random.default_rng()


def as_generator(rng: RNGLike) -> np.random.Generator:
    """Normalise ``rng`` with :func:`numpy.random.default_rng` (a ``Generator`` is used as is)."""
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
    draws from one generator seeded from OS entropy at import.
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
