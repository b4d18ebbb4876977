"""The particle batch that policies grow, reward models score and samplers reorder."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import numpy.typing as npt

from .. import _device, core
from .device_cache import DeviceKVCache

__all__ = ["Particles"]


@dataclass
class Particles:
    """``B`` prompts x ``N`` particles, with every per-particle array laid out ``(B, N, ...)``.

    ``tokens[b, i, :lengths[b, i]]`` are the tokens generated so far (prompt excluded); ``finished`` marks
    absorbed particles (never extended again). ``prompt_tokens[b]`` holds prompt ``b``'s token ids where
    the policy tokenises prompts; ``errors[b]`` says why prompt ``b`` could not run (its particles start
    finished and the samplers report it as failed, while the other prompts go on). Models keep any further
    per-particle state (DFA states, KV caches, attention masks) in ``state`` under their own keys (the SMC
    sampler its ``log Vh_{t-1}`` under ``"smc.log_value"``), with the same leading ``(B, N)`` axes, so that
    :meth:`reorder` carries it through resampling without the models ever resampling themselves. Work a
    model can postpone (its session run on the tokens just appended) waits in :meth:`defer` until the
    state is next needed. A state array may live in CUDA device memory: it is then reordered
    where it lies, with the ancestors copied to its device once per call; a
    :class:`~tiltsmc.models.device_cache.DeviceKVCache` reorders all its layers in one gather.
    """

    prompts: list[Any]
    tokens: npt.NDArray[np.int64]
    lengths: npt.NDArray[np.int64]
    finished: npt.NDArray[np.bool_]
    state: dict[str, Any] = field(default_factory=dict)
    prompt_tokens: Optional[list[npt.NDArray[np.int64]]] = None
    errors: dict[int, str] = field(default_factory=dict)
    _pending: list[Callable[[], None]] = field(default_factory=list, init=False, repr=False, compare=False)

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
        in order, at the next :meth:`flush`, which :meth:`reorder` and :meth:`take` call first and a model
        calls before it reads its state. Work that is never needed (after a sampler's last step) never runs.
        """
        self._pending.append(work)

    def flush(self) -> None:
        """Run the deferred work (see :meth:`defer`)."""
        while self._pending:
            self._pending.pop(0)()

    def __deepcopy__(self, memo: dict[int, Any]) -> Particles:
        """A deep copy of the state with the deferred work done (it refers to the models, which are not
        copied)."""
        self.flush()
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        for item in dataclasses.fields(self):
            setattr(copied, item.name, copy.deepcopy(getattr(self, item.name), memo))
        return copied

    def reorder(self, ancestors: npt.NDArray[np.int64]) -> None:
        """Particle ``i`` of prompt ``b`` becomes a copy of particle ``ancestors[b, i]`` (in place).

        Deferred work runs first. Host arrays are reordered in one core call
        (:func:`tiltsmc.core.reorder_in_place`); device arrays where they lie; arrays that cannot be written
        in place are replaced by reordered copies."""
        self.flush()
        own = [self.tokens, self.lengths, self.finished]
        arrays = [*own, *self.state.values()]
        try:  # one call checks every array's leading axes and every index before it writes
            skipped = core.reorder_in_place(arrays, ancestors, skip_unwritable=True)
        except ValueError:
            self._check_leading_axes()  # names the state entry, where one is at fault
            raise
        if not skipped:
            return
        names = list(self.state)
        on_device: dict[int, Any] = {}
        for k in skipped:  # device arrays, and host arrays that cannot be written in place
            name = names[k - len(own)]
            self.state[name] = _follow(self.state[name], ancestors, on_device, in_place=True)

    def _check_leading_axes(self) -> None:
        for name, array in self.state.items():
            if tuple(array.shape[:2]) != self.lengths.shape:
                raise ValueError(
                    f"Particles.state[{name!r}]: leading axes {tuple(array.shape[:2])} are not (B, N) = "
                    f"{self.lengths.shape}"
                )

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
        )

    def sequences(self, prompt: int) -> list[npt.NDArray[np.int64]]:
        """The generated steps of every particle of one prompt, each trimmed to its length."""
        return [self.tokens[prompt, i, : self.lengths[prompt, i]].copy() for i in range(self.num_particles)]


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
