"""ONNX Runtime sessions: provider choice that prints nothing on CPU machines, threads, graph checks."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.metadata
import io
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

__all__ = ["cuda_device_usable", "make_session"]


# The CUDA driver's file names, as the driver installs them (no GPU driver exists for macOS).
_DRIVER_NAMES = {"linux": ("libcuda.so.1", "libcuda.so"), "win32": ("nvcuda.dll",), "darwin": ()}


@functools.lru_cache(maxsize=1)
def cuda_device_usable() -> tuple[bool, str]:
    """Whether a CUDA device can really be used (driver present, initialised, at least one device).

    Asked of the driver library directly, so a machine without a GPU never sees ONNX Runtime's
    provider-loading errors. Returns ``(usable, reason)``. The library is opened by its names alone (the
    dynamic loader searches its cache, ``LD_LIBRARY_PATH`` and the system folders): no program is run
    (``ctypes.util.find_library`` runs ``ldconfig``, ``gcc`` and ``ld`` found through ``PATH``).
    """
    driver = None
    for name in _DRIVER_NAMES.get(sys.platform, _DRIVER_NAMES["linux"]):
        try:
            driver = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if driver is None:
        return False, "no CUDA driver library (libcuda) found"
    try:
        if driver.cuInit(0) != 0:
            return False, "the CUDA driver failed to initialise (cuInit)"
        count = ctypes.c_int(0)
        if driver.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
            return False, "the CUDA driver reports no device"
    except AttributeError:
        return False, "the CUDA driver library lacks cuInit/cuDeviceGetCount"
    return True, f"{count.value} CUDA device(s)"


def _warn_if_both_runtimes_installed() -> None:
    installed = set()
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            importlib.metadata.version(name)
            installed.add(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    if len(installed) == 2:
        warnings.warn(
            "both onnxruntime and onnxruntime-gpu are installed; they share one module and the GPU build "
            "breaks: uninstall both, then install only onnxruntime-gpu",
            RuntimeWarning,
            stacklevel=3,
        )


@functools.lru_cache(maxsize=1)
def _preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from the ``nvidia-*`` wheels (pip's CUDA, as PyTorch and
    ``onnxruntime-gpu[cuda,cudnn]`` install it) so that the CUDA provider finds them without
    LD_LIBRARY_PATH; ONNX Runtime's own ``preload_dlls``, silenced: where they are missing, the provider
    falls back to the system's libraries or fails, and that is reported when the session is made."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
        preload()


# Float32 matrix products in full float32: ONNX Runtime's CUDA provider otherwise rounds their inputs to
# TF32 (10-bit mantissa), and a cached decode then differs from a full recompute by ~1e-3 in the logits.
CUDA_DEFAULTS = {"use_tf32": "0"}


def _with_cuda_defaults(providers: Sequence[Any]) -> list[Any]:
    """A bare ``"CUDAExecutionProvider"`` gets tiltsmc's defaults; a ``(name, options)`` pair is kept."""
    return [(p, dict(CUDA_DEFAULTS)) if p == "CUDAExecutionProvider" else p for p in providers]


def make_session(
    model_path: Path,
    providers: Optional[Sequence[Any]] = None,
    *,
    intra_op_num_threads: Optional[int] = None,
    inter_op_num_threads: Optional[int] = None,
    require_gpu: bool = False,
) -> Any:
    """An ``onnxruntime.InferenceSession`` on CUDA where a device is usable, else on the CPU.

    An explicit ``providers`` list is used as given, except that a bare ``"CUDAExecutionProvider"`` runs
    float32 in full precision (``use_tf32=0``; pass ``("CUDAExecutionProvider", {...})`` to choose other
    options). ``require_gpu`` raises instead of falling back. The session's threads stop spinning when a
    run ends, since the policy and the reward model take turns.
    """
    import onnxruntime as ort

    _warn_if_both_runtimes_installed()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: provider fallbacks are handled here
    # The policy and reward sessions run in turn: one's pool threads spinning after its run would take
    # the cores from the other (on 2 cores, steps of the fixtures were 20-40% slower with the spin).
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if intra_op_num_threads is not None:
        options.intra_op_num_threads = int(intra_op_num_threads)
    if inter_op_num_threads is not None:
        options.inter_op_num_threads = int(inter_op_num_threads)
    if providers is not None:
        if any("CUDA" in str(p if isinstance(p, str) else p[0]) for p in providers):
            _preload_cuda_libraries()
        session = ort.InferenceSession(
            os.fspath(model_path), sess_options=options, providers=_with_cuda_defaults(providers)
        )
        if require_gpu and "CUDAExecutionProvider" not in session.get_providers():
            raise RuntimeError(
                f"require_gpu: {model_path.name} runs on {session.get_providers()}, not on CUDA "
                f"({cuda_device_usable()[1]})"
            )
        return session
    usable, reason = cuda_device_usable()
    if usable and "CUDAExecutionProvider" in ort.get_available_providers():
        _preload_cuda_libraries()
        try:
            session = ort.InferenceSession(
                os.fspath(model_path),
                sess_options=options,
                providers=_with_cuda_defaults(["CUDAExecutionProvider", "CPUExecutionProvider"]),
            )
            if "CUDAExecutionProvider" in session.get_providers():
                return session
            reason = "ONNX Runtime could not start its CUDA provider"
        except Exception as error:  # the CUDA provider failed to load: retry on the CPU alone
            reason = f"ONNX Runtime's CUDA provider failed: {error}"
    elif usable:
        reason = "this ONNX Runtime build has no CUDA provider (install onnxruntime-gpu)"
    if require_gpu:
        raise RuntimeError(f"require_gpu: no usable GPU for {model_path.name}: {reason}")
    return ort.InferenceSession(
        os.fspath(model_path), sess_options=options, providers=["CPUExecutionProvider"]
    )
