"""Arrays in CUDA device memory, as [`tiltsmc.core`][tiltsmc.core] sees them: recognising them, reading their
pointer, shape and dtype, resolving a ``stream=`` argument, and allocating outputs beside them.

Nothing here imports CuPy, PyTorch or ONNX Runtime: an array's own module is used only when the array
comes from it (and so is already imported). The compiled ``tiltsmc._cuda`` is loaded on first use.
"""

from __future__ import annotations

import functools
import importlib
import math
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple, Optional

import numpy as np

__all__ = ["CudaAvailability", "DeviceArray", "cuda_available", "is_device_array", "to_device"]

_ORT_DTYPES = {
    "tensor(float)": "<f4",
    "tensor(double)": "<f8",
    "tensor(float16)": "<f2",
    "tensor(bfloat16)": "<V2",
    "tensor(int64)": "<i8",
    "tensor(int32)": "<i4",
    "tensor(int16)": "<i2",
    "tensor(int8)": "|i1",
    "tensor(uint64)": "<u8",
    "tensor(uint32)": "<u4",
    "tensor(uint16)": "<u2",
    "tensor(uint8)": "|u1",
    "tensor(bool)": "|b1",
    "tensor(float8e4m3fn)": "|V1",
    "tensor(float8e4m3fnuz)": "|V1",
    "tensor(float8e5m2)": "|V1",
    "tensor(float8e5m2fnuz)": "|V1",
}

_cuda_module: Optional[ModuleType] = None
_cuda_import_error: Optional[str] = None


def load_cuda() -> Optional[ModuleType]:
    """``tiltsmc._cuda``, or None (with the reason kept) when it is not built or does not load."""
    global _cuda_module, _cuda_import_error
    if _cuda_module is None and _cuda_import_error is None:
        try:
            _cuda_module = importlib.import_module("tiltsmc._cuda")
        except ImportError as error:
            _cuda_import_error = str(error)
    return _cuda_module


@dataclass(frozen=True)
class CudaAvailability:
    """Whether the CUDA kernels can run here, and why not. True in a boolean context when they can.

    ``reason`` says what was found (devices, driver and runtime versions) or what is missing: the module
    (a build without a CUDA compiler), the driver, a device, or code for the device's architecture.
    """

    available: bool
    reason: str
    device_count: int = 0

    def __bool__(self) -> bool:
        return self.available


@functools.lru_cache(maxsize=1)
def cuda_available() -> CudaAvailability:
    """Whether the device kernels are usable in this process (probed once: driver, devices, code for them)."""
    module = load_cuda()
    if module is None:
        return CudaAvailability(
            False,
            "tiltsmc was built without CUDA (tiltsmc._cuda is missing: "
            f"{_cuda_import_error}); rebuild with nvcc on PATH or with -C cmake.define.TILTSMC_CUDA=ON",
        )
    usable, reason, count = module.probe()
    return CudaAvailability(bool(usable), str(reason), int(count))


def require_cuda() -> ModuleType:
    """``tiltsmc._cuda`` when the kernels can run, else RuntimeError with the reason."""
    state = cuda_available()
    module = load_cuda()
    if not state or module is None:
        raise RuntimeError(f"a device array was given but the CUDA kernels are not usable: {state.reason}")
    return module


def is_device_array(x: Any) -> bool:
    """True for objects with ``__cuda_array_interface__`` and for ONNX Runtime OrtValues on a CUDA device."""
    if hasattr(x, "__cuda_array_interface__"):
        return True
    return type(x).__name__ == "OrtValue" and str(x.device_name()).lower() == "cuda"


class DeviceView(NamedTuple):
    """What the kernels need to know of a device array."""

    pointer: int
    shape: tuple[int, ...]
    dtype: np.dtype
    device: int
    readonly: bool
    kind: str  # "cupy", "torch" or "other": the library that outputs are allocated with
    obj: Any

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _module_kind(x: Any) -> str:
    root = type(x).__module__.split(".", 1)[0]
    return root if root in ("cupy", "torch") else "other"


def ort_dtype(element_type: str, name: str) -> np.dtype:
    """The NumPy dtype of an OrtValue's element type (``"tensor(float)"``): one of ``_ORT_DTYPES`` (types
    NumPy lacks, bfloat16 and float8, as raw bytes of their width). Any other type is refused, TypeError
    naming it, before anything reads the memory: a width guessed wrong would copy the wrong number of bytes
    (packed 4-bit types such as ``tensor(int4)`` hold two elements a byte; complex64 takes eight)."""
    typestr = _ORT_DTYPES.get(element_type)
    if typestr is None:
        supported = ", ".join(sorted(_ORT_DTYPES))
        raise TypeError(
            f"{name}: an OrtValue of element type {element_type} is not supported on the device "
            f"(supported: {supported})"
        )
    return np.dtype(typestr)


def device_view(x: Any, name: str) -> DeviceView:
    """Read a device array's pointer, shape, dtype and device; refuse what the kernels cannot take."""
    if type(x).__name__ == "OrtValue":
        dtype = ort_dtype(str(x.data_type()), name)
        shape = tuple(int(d) for d in x.shape())
        pointer = int(x.data_ptr())
        return DeviceView(pointer, shape, dtype, _device_of(x, pointer, "other"), False, "other", x)
    interface = x.__cuda_array_interface__
    pointer, readonly = interface["data"]
    shape = tuple(int(d) for d in interface["shape"])
    dtype = np.dtype(interface["typestr"])
    if interface.get("mask") is not None:
        raise ValueError(f"{name}: masked device arrays are not supported")
    strides = interface.get("strides")
    if strides is not None and math.prod(shape) > 1:
        expected, step = [], dtype.itemsize
        for extent in reversed(shape):
            expected.append(step)
            step *= extent
        if any(e > 1 and s != c for e, s, c in zip(shape, strides, reversed(expected))):
            raise ValueError(
                f"{name}: device arrays must be C-contiguous (got strides {tuple(strides)} for shape "
                f"{shape}); make a contiguous copy first"
            )
    kind = _module_kind(x)
    device = _device_of(x, int(pointer), kind)
    return DeviceView(int(pointer), shape, dtype, device, bool(readonly), kind, x)


def _device_of(x: Any, pointer: int, kind: str) -> int:
    if kind == "cupy":
        return int(x.device.id)
    if kind == "torch":
        return int(x.device.index)
    if pointer:
        device = int(require_cuda().pointer_device(pointer))
        if device >= 0:
            return device
    return int(getattr(x, "device", 0)) if isinstance(getattr(x, "device", 0), int) else 0


def same_device(views: list[tuple[str, DeviceView]]) -> int:
    """The one device of all views, else ValueError naming the argument that differs."""
    first_name, first = views[0]
    for name, view in views[1:]:
        if view.device != first.device:
            raise ValueError(
                f"{name}: on CUDA device {view.device}, but {first_name} is on device {first.device}; "
                "arrays of one call must live on one device"
            )
    return first.device


def stream_handle(stream: Any, view: DeviceView) -> int:
    """The ``cudaStream_t`` (as an int) for ``stream``: None means the array library's current stream
    (CuPy, PyTorch) or the legacy default stream; also an int handle, a CuPy or PyTorch stream, or any
    object with ``__cuda_stream__``. A stream of another device than the arrays' is refused."""
    module = require_cuda()
    if stream is None:
        if view.kind == "cupy":  # CuPy's current stream is per device: the arrays' device's
            cupy = sys.modules["cupy"]
            with cupy.cuda.Device(view.device):
                return int(cupy.cuda.get_current_stream().ptr)
        if view.kind == "torch":
            return int(sys.modules["torch"].cuda.current_stream(view.device).cuda_stream)
        return 0
    if isinstance(stream, (bool, np.bool_)):
        raise TypeError("stream: expected a CUDA stream, got a bool")
    if isinstance(stream, (int, np.integer)):
        handle = int(stream)
    elif hasattr(stream, "cuda_stream"):  # torch.cuda.Stream
        handle = int(stream.cuda_stream)
    elif hasattr(stream, "ptr"):  # cupy.cuda.Stream
        handle = int(stream.ptr)
    elif hasattr(stream, "__cuda_stream__"):  # the CUDA Python stream protocol: (version, handle)
        protocol = stream.__cuda_stream__
        handle = int((protocol() if callable(protocol) else protocol)[1])
    else:
        raise TypeError(f"stream: expected a CUDA stream (handle, CuPy or PyTorch stream), got {stream!r}")
    if handle < 0:
        raise ValueError(f"stream: invalid handle {handle}")
    if handle not in (0, 1, 2):
        stream_device = int(module.stream_device(handle))
        if stream_device != view.device:
            raise ValueError(
                f"stream: belongs to CUDA device {stream_device}, but the arrays are on device {view.device}"
            )
    return handle


class DeviceArray:
    """A C-contiguous array in CUDA device memory owned by tiltsmc: what the device kernels return when
    the input is neither a CuPy array nor a PyTorch tensor (e.g. an ONNX Runtime OrtValue).

    It exposes ``__cuda_array_interface__``, so ``cupy.asarray``, ``torch.as_tensor`` and Numba take it
    without a copy, and [`get`][tiltsmc._device.DeviceArray.get] copies it to a NumPy array. Its memory comes
    from the device's stream-ordered pool on the stream of the call that made it, and is given back on that
    stream. That stream is the interface's ``"stream"`` (version 3: consumers synchronise on it before
    reading; ``1``, the legacy default stream, for handle 0), and [`copy`][tiltsmc._device.DeviceArray.copy]
    and ``get`` run on it, after the work that writes the array.
    """

    __slots__ = ("__weakref__", "_buffer", "_offset", "dtype", "shape")
    shape: tuple[int, ...]
    dtype: np.dtype
    _buffer: Any
    _offset: int

    def __init__(self, shape: tuple[int, ...], dtype: Any, device: int, stream: int = 0) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self._buffer = require_cuda().DeviceBuffer(
            math.prod(self.shape) * self.dtype.itemsize, device, stream
        )
        self._offset = 0

    @property
    def device(self) -> int:
        return int(self._buffer.device)

    @property
    def ptr(self) -> int:
        return int(self._buffer.ptr) + self._offset

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        # "stream": where consumers synchronise before reading (the spec disallows 0 for the legacy default
        # stream, which is 1 there; 2, the per-thread default stream, and real handles are as they are).
        handle = int(self._buffer.stream)
        return {
            "shape": self.shape,
            "typestr": self.dtype.str,
            "data": (self.ptr if self.size else 0, False),
            "strides": None,
            "stream": handle if handle else 1,
            "version": 3,
        }

    def reshape(self, *shape: Any) -> DeviceArray:
        """A view of the same memory with another shape (``-1`` allowed once)."""
        dims = [int(d) for d in (shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape)]
        if dims.count(-1) == 1:
            known = math.prod(d for d in dims if d != -1)
            dims[dims.index(-1)] = self.size // known if known else 0
        new_shape = tuple(dims)
        if math.prod(new_shape) != self.size or any(d < 0 for d in new_shape):
            raise ValueError(f"cannot reshape a DeviceArray of shape {self.shape} to {tuple(shape)}")
        view = DeviceArray.__new__(DeviceArray)
        view.shape, view.dtype, view._buffer, view._offset = new_shape, self.dtype, self._buffer, self._offset
        return view

    def copy(self) -> DeviceArray:
        """A new array on the same device and stream with the same contents: copied on that stream, after
        the work queued there that writes this array (waits for the copy)."""
        stream = int(self._buffer.stream)
        result = DeviceArray(self.shape, self.dtype, self.device, stream)
        if self.nbytes:
            require_cuda().copy_device(result.ptr, self.ptr, self.nbytes, self.device, stream)
        return result

    def __deepcopy__(self, memo: dict[int, Any]) -> DeviceArray:
        return self.copy()

    def get(self) -> np.ndarray:
        """A NumPy copy (waits for the stream the array was made on)."""
        host = np.empty(self.shape, dtype=self.dtype)
        if host.nbytes:
            require_cuda().copy_bytes(
                host.ctypes.data, self.ptr, host.nbytes, True, self.device, int(self._buffer.stream)
            )
        return host

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d DeviceArray")
        return self.shape[0]

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, device={self.device})"


def to_device(host: Any, device: int, stream: int = 0) -> DeviceArray:
    """A copy of a host array in ``device``'s memory (C order; returns once the copy is done)."""
    source = np.ascontiguousarray(host)
    result = DeviceArray(source.shape, source.dtype, device, stream)
    if source.nbytes:
        require_cuda().copy_bytes(result.ptr, source.ctypes.data, source.nbytes, False, device, stream)
    return result


def empty_like_kind(view: DeviceView, shape: tuple[int, ...], dtype: Any, stream: int) -> Any:
    """An uninitialised C-contiguous array on ``view``'s device, from the library ``view`` came from."""
    dtype = np.dtype(dtype)
    if view.kind == "cupy":
        cupy = sys.modules["cupy"]
        with cupy.cuda.Device(view.device):
            return cupy.empty(shape, dtype=dtype)
    if view.kind == "torch":
        torch = sys.modules["torch"]
        torch_dtype = getattr(torch, {"b": "bool"}.get(dtype.kind, str(dtype)))
        return torch.empty(shape, dtype=torch_dtype, device=f"cuda:{view.device}")
    return DeviceArray(shape, dtype, view.device, stream)
