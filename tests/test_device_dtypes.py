"""ONNX Runtime element types on the device (``tiltsmc._device``): each type's width is known, and a type
that is not in the table is refused, naming it, before anything reads the OrtValue's memory. These run
without a GPU, on stand-in OrtValues whose pointer is never dereferenced."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
from tiltsmc import _device, core


class OrtValue:
    """A stand-in for ``onnxruntime.OrtValue`` on a CUDA device (what tiltsmc reads of one: the class's name,
    ``device_name``, ``data_type``, ``shape``, ``data_ptr``); its pointer is 0, and reading it for a type
    that is refused is an error."""

    def __init__(self, element_type: str, shape: tuple[int, ...], refused: bool = False) -> None:
        self.element_type, self._shape, self.refused = element_type, list(shape), refused

    def device_name(self) -> str:
        return "Cuda"

    def data_type(self) -> str:
        return self.element_type

    def shape(self) -> list[int]:
        return self._shape

    def data_ptr(self) -> int:
        assert not self.refused, "the memory of an OrtValue of a refused type was read"
        return 0


# ONNX Runtime's element types that the table leaves out: packed 4-bit types (two elements a byte; read as
# one byte each, a gather would copy twice the buffer), complex (eight or sixteen bytes, not one), strings.
REFUSED = [
    "tensor(int4)",
    "tensor(uint4)",
    "tensor(float4e2m1)",
    "tensor(complex64)",
    "tensor(complex128)",
    "tensor(string)",
]


@pytest.mark.parametrize("element_type", REFUSED)
def test_an_element_type_not_in_the_table_is_refused(element_type: str) -> None:
    pattern = f"x: an OrtValue of element type {re.escape(element_type)} "
    with pytest.raises(TypeError, match=pattern + "is not supported"):
        _device.ort_dtype(element_type, "x")
    with pytest.raises(TypeError, match=pattern):
        _device.device_view(OrtValue(element_type, (2, 8), refused=True), "x")


@pytest.mark.parametrize("element_type", REFUSED)
def test_a_gather_of_a_refused_element_type_says_so_before_any_device_work(element_type: str) -> None:
    x = OrtValue(element_type, (2, 8, 4), refused=True)
    ancestors = OrtValue("tensor(int64)", (2, 8))
    with pytest.raises(TypeError, match=r"x: an OrtValue of element type .* is not supported"):
        core.gather(x, ancestors)


@pytest.mark.parametrize(
    ("element_type", "itemsize", "kind"),
    [
        ("tensor(float)", 4, "f"),
        ("tensor(double)", 8, "f"),
        ("tensor(float16)", 2, "f"),
        ("tensor(bfloat16)", 2, "V"),
        ("tensor(int64)", 8, "i"),
        ("tensor(int8)", 1, "i"),
        ("tensor(uint16)", 2, "u"),
        ("tensor(bool)", 1, "b"),
        ("tensor(float8e4m3fn)", 1, "V"),
        ("tensor(float8e5m2fnuz)", 1, "V"),
    ],
)
def test_element_types_in_the_table_have_their_width(element_type: str, itemsize: int, kind: str) -> None:
    dtype = _device.ort_dtype(element_type, "x")
    assert (dtype.itemsize, dtype.kind) == (itemsize, kind)
    view = _device.device_view(OrtValue(element_type, (3, 5)), "x")
    assert view.dtype == dtype and view.shape == (3, 5) and view.nbytes == 15 * itemsize


def test_every_table_entry_is_a_fixed_width_dtype() -> None:
    widths: dict[str, Any] = {name: np.dtype(typestr) for name, typestr in _device._ORT_DTYPES.items()}
    assert all(dtype.itemsize >= 1 for dtype in widths.values())
    assert not any(name in widths for name in REFUSED)
