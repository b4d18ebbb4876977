r"""A multi-token step decoded on the rows still writing it: the others' KV caches set aside until it ends.

Within one ``propose`` of steps of several tokens, the rows fed real tokens only shrink: a particle that
has written its step, or whose trajectory has ended, is fed masked padding until the slowest row's step
ends, and a session call's work grows with its rows. Once the rows still fed are at most ``below`` of the
rows the session runs on, their caches are gathered into a smaller batch and the session runs on that
batch alone; the rows set aside keep the caches they had, of width ``w``. When the step ends, ``merge``
lays the caches back into one array of every row: a row set aside at width ``w`` gets its columns
``[0, w)`` and zeros after. Those columns are masked (the attention mask of a row not fed is 0 there, as
the policy writes it for every row at every call), so they weigh nothing in attention
(``exp(-inf) = 0``, times a finite value): the next call reads what it would have read had the row been
fed padding there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]


class FedRows:
    """The rows one step's session calls run on, and the caches of those set aside (see the module)."""

    def __init__(self, rows: int, below: float) -> None:
        self.rows = rows
        self.below = below
        self.index: Optional[IntArray] = None  # the session's rows (of the flat batch), ascending; None: all
        self.caches: list[np.ndarray] = []  # their caches (where index is set), (len(index), heads, w, dim)
        # the batches run before, newest last: their rows (None: all) and caches, as they were left
        self.set_aside: list[tuple[Optional[IntArray], list[np.ndarray]]] = []

    def session_rows(
        self, batch_caches: Sequence[np.ndarray], still: npt.NDArray[np.bool_]
    ) -> tuple[Optional[IntArray], Sequence[np.ndarray]]:
        """The rows the next session call runs on (None: every row) and their past caches.

        ``batch_caches``: every row's caches, ``(rows, heads, w, dim)`` each, as the policy holds them
        (read only while no row has been set aside); ``still``: the rows fed a real token by this call.
        Where these are at most ``below`` of the rows run so far, they are gathered (a copy of their
        caches) and the others set aside.
        """
        running = self.rows if self.index is None else len(self.index)
        going = np.flatnonzero(still.reshape(-1))
        if len(going) < running and len(going) <= self.below * running:
            source = list(batch_caches) if self.index is None else self.caches
            at = going if self.index is None else np.searchsorted(self.index, going)
            self.set_aside.append((self.index, source))
            self.index, self.caches = going, [cache[at] for cache in source]
        if self.index is None:
            return None, batch_caches
        return self.index, self.caches

    def keep(self, present: Sequence[np.ndarray]) -> None:
        """The caches the session call on ``index``'s rows returned."""
        self.caches = list(present)

    def merge(self) -> Optional[list[np.ndarray]]:
        """Every row's caches, ``(rows, heads, width, dim)`` each (the width of the last call's), or None
        where no row was set aside (the policy's own arrays hold them)."""
        if self.index is None:
            return None
        # the rows each batch run before holds and the one after it does not: set aside there
        parts: list[tuple[list[int], list[int], list[np.ndarray]]] = []
        after = self.index
        for index, caches in reversed(self.set_aside):
            rows = np.arange(self.rows, dtype=np.int64) if index is None else index
            left = np.flatnonzero(~np.isin(rows, after, assume_unique=True))
            parts.append((rows[left].tolist(), left.tolist(), caches))
            after = rows
        merged = []
        for k, last in enumerate(self.caches):
            out = np.empty((self.rows, *last.shape[1:]), dtype=last.dtype)
            out[self.index] = last
            for rows_left, at, caches in parts:
                source = caches[k]
                width = source.shape[2]
                for row, position in zip(rows_left, at):  # a row at a time: one copy, no gathered temporary
                    out[row, :, :width] = source[position]
                    out[row, :, width:] = 0
            merged.append(out)
        return merged
