"""A decoder's KV cache kept in GPU memory for B prompts x N particles, following resampling where it lies.

The ``2L`` cache tensors (a key and a value per layer) live in one device buffer laid out
``(2L, B, N, heads, seq, head_dim)``: each tensor ``(B N, heads, seq, head_dim)`` is contiguous, as ONNX
Runtime reads ``past_key_values.*`` and writes ``present.*``, so the session is bound straight to slices
of the buffer. Reordering particles, ``cache[l, b, i] <- cache[l, b, a[b, i]]`` for every layer ``l``, is
then one [`tiltsmc.core.gather`][tiltsmc.core.gather] over ``2L B`` rows of ``N`` items with the ancestors
repeated per layer: one launch whatever the depth of the model.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _device, core

__all__ = ["DeviceKVCache"]


class DeviceKVCache:
    """``num_tensors`` cache tensors of ``(batch, particles, heads, length, head_dim)`` in one device buffer.

    ``shape`` is ``(batch, particles, num_tensors, heads, length, head_dim)`` (particles first, as every
    ``Particles.state`` entry); the memory is laid out tensor-major (see the module docstring).
    """

    def __init__(self, buffer: _device.DeviceArray) -> None:
        if buffer.ndim != 6:
            raise ValueError(f"buffer: expected (tensors, B, N, heads, seq, head_dim), got {buffer.shape}")
        self.buffer = buffer

    @classmethod
    def empty(
        cls, num_tensors: int, batch: int, particles: int, heads: int, length: int, head_dim: int,
        dtype: Any, device: int,
    ) -> DeviceKVCache:  # fmt: skip
        """Uninitialised, on ``device``; its allocation is complete when this returns (other libraries'
        streams may write to it at once)."""
        buffer = _device.DeviceArray((num_tensors, batch, particles, heads, length, head_dim), dtype, device)
        _device.require_cuda().synchronize(device, 0)
        return cls(buffer)

    @property
    def shape(self) -> tuple[int, ...]:
        tensors, batch, particles, heads, length, head_dim = self.buffer.shape
        return (batch, particles, tensors, heads, length, head_dim)

    @property
    def num_tensors(self) -> int:
        return int(self.buffer.shape[0])

    @property
    def length(self) -> int:
        return int(self.buffer.shape[4])

    @property
    def dtype(self) -> np.dtype:
        return self.buffer.dtype

    @property
    def device(self) -> int:
        return self.buffer.device

    def tensor(self, k: int) -> tuple[int, list[int]]:
        """Pointer and shape ``[B N, heads, seq, head_dim]`` of cache tensor ``k``, for an IO binding."""
        _, batch, particles, heads, length, head_dim = self.buffer.shape
        size = batch * particles * heads * length * head_dim
        return self.buffer.ptr + k * size * self.dtype.itemsize, [batch * particles, heads, length, head_dim]

    def _rows(self, ancestors: npt.NDArray[np.int64]) -> tuple[Any, Any]:
        """The buffer as ``(2L B, N, item)`` and the ancestors repeated per tensor, on the device."""
        tensors, batch, particles = self.buffer.shape[:3]
        item = math.prod(self.buffer.shape[3:])
        index = np.asarray(ancestors, dtype=np.int64)
        if index.ndim != 2 or index.shape[0] != batch:
            raise ValueError(f"ancestors: expected shape ({batch}, M), got {index.shape}")
        repeated = _device.to_device(np.tile(index, (tensors, 1)), self.device)
        return self.buffer.reshape(tensors * batch, particles, item), repeated

    def reorder(self, ancestors: npt.NDArray[np.int64]) -> None:
        """In place: particle ``i`` of prompt ``b`` takes the cache of particle ``ancestors[b, i]``."""
        rows, index = self._rows(ancestors)
        core.gather(rows, index, out=rows)

    def take(self, ancestors: npt.NDArray[np.int64]) -> DeviceKVCache:
        """A new cache of ``M`` particles per prompt: particle ``j`` copies particle ``ancestors[b, j]``."""
        rows, index = self._rows(ancestors)
        tensors, batch, _, heads, length, head_dim = self.buffer.shape
        taken: Any = core.gather(rows, index)
        count = int(np.shape(ancestors)[1])
        return DeviceKVCache(taken.reshape(tensors, batch, count, heads, length, head_dim))

    def get(self) -> np.ndarray:
        """A host copy in the logical layout ``shape``."""
        return np.ascontiguousarray(np.moveaxis(self.buffer.get(), 0, 2))

    def copy(self) -> DeviceKVCache:
        return DeviceKVCache(self.buffer.copy())

    def __deepcopy__(self, memo: dict[int, Any]) -> DeviceKVCache:
        return self.copy()

    def __repr__(self) -> str:
        return f"DeviceKVCache(shape={self.shape}, dtype={self.dtype}, device={self.device})"
