"""ONNX Runtime sessions: provider choice that prints nothing on CPU machines, threads, graph checks."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.metadata
import io
import itertools
import os
import re
import stat
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .._text import not_utf8, shown_as_bytes
from ._config import flag

__all__ = [
    "CACHE_INPUT",
    "FED_INPUTS",
    "FLOAT_TYPES",
    "MAX_THREADS",
    "check_cache_input",
    "check_external_data",
    "check_inputs",
    "cuda_device_usable",
    "external_data_locations",
    "float_type_error",
    "import_onnxruntime",
    "make_session",
    "picks_cuda",
    "runtime_version",
    "shrink_memory_arena",
]

# ONNX Runtime threads of a session at most (intra_op_num_threads, inter_op_num_threads, the CLI's --threads):
# ONNX Runtime starts every thread asked for at load: 5000 did not finish loading the tiny fixture, 100000
# exhausted the memory, and 2**31 reached its binding as a TypeError naming no argument.
MAX_THREADS = 1024
_THREAD_FIELDS = ("intra_op_num_threads", "inter_op_num_threads")


def thread_count(value: Any, name: str) -> Optional[int]:
    """A session's thread count ``value`` (``name``: the argument): None (ONNX Runtime's choice) or an int
    (not a bool) from 0 (ONNX Runtime's default) to ``MAX_THREADS``; TypeError for another type, ValueError
    for an int out of that range, both naming ``name``."""
    if value is None:
        return None
    wanted = f"expected an integer >= 0 (0: ONNX Runtime's default), got {value!r}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: {wanted}")
    if value < 0:
        raise ValueError(f"{name}: {wanted}")
    if value > MAX_THREADS:
        raise ValueError(
            f"{name}: expected at most {MAX_THREADS} threads, got {value} (ONNX Runtime starts every thread "
            "asked for when it loads the model)"
        )
    return int(value)


# What to install when no ONNX Runtime is: the extras of pyproject.toml, as optimum names them.
MISSING_RUNTIME = (
    "tiltsmc needs ONNX Runtime to run ONNX models and none is installed: install one build of it, "
    "pip install 'tiltsmc[cpu]' (onnxruntime) or 'tiltsmc[gpu]' (onnxruntime-gpu, for NVIDIA GPUs), "
    "not both"
)


def import_onnxruntime() -> Any:
    """The ``onnxruntime`` module, which the extras ``cpu`` and ``gpu`` install (the base install has
    none). Where neither is installed, an ImportError that says which extra to install; an ONNX Runtime
    that is installed but fails to import raises its own error."""
    try:
        import onnxruntime
    except ModuleNotFoundError as error:
        if error.name != "onnxruntime":
            raise
        raise ImportError(MISSING_RUNTIME, name="onnxruntime") from error
    return onnxruntime


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


def runtime_version() -> tuple[int, ...]:
    """ONNX Runtime's version as numbers, ``(1, 19, 2)``: the leading digits of its ``__version__``."""
    numbers = []
    for part in str(import_onnxruntime().__version__).split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers)


def picks_cuda(providers: Optional[Sequence[Any]] = None) -> bool:
    """Whether a session made with ``providers`` (None: ``make_session``'s choice) is asked to run on
    CUDA: a CUDA provider named, or none named and a usable device with ONNX Runtime's CUDA provider."""
    if providers is not None:
        return any("CUDA" in str(p if isinstance(p, str) else p[0]) for p in providers)
    usable, _ = cuda_device_usable()
    return usable and "CUDAExecutionProvider" in import_onnxruntime().get_available_providers()


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
            "both onnxruntime and onnxruntime-gpu are installed; they share one module and break each "
            "other (the GPU build loses its CUDA provider): pip uninstall -y onnxruntime onnxruntime-gpu, "
            "then install one of them: 'tiltsmc[gpu]' (onnxruntime-gpu) or 'tiltsmc[cpu]' (onnxruntime)",
            RuntimeWarning,
            stacklevel=3,
        )


@functools.lru_cache(maxsize=1)
def _preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from the ``nvidia-*`` wheels (pip's CUDA, as PyTorch and
    ``onnxruntime-gpu[cuda,cudnn]`` install it) so that the CUDA provider finds them without
    LD_LIBRARY_PATH; ONNX Runtime's own ``preload_dlls``, silenced: where they are missing, the provider
    falls back to the system's libraries or fails, and that is reported when the session is made."""
    ort = import_onnxruntime()

    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
        preload()


# Float32 matrix products in full float32: ONNX Runtime's CUDA provider otherwise rounds their inputs to
# TF32 (10-bit mantissa), and a cached decode then differs from a full recompute by ~1e-3 in the logits.
CUDA_DEFAULTS = {"use_tf32": "0"}


def _with_provider_options(
    providers: Sequence[Any], provider_options: Optional[Mapping[str, Mapping[str, Any]]]
) -> list[Any]:
    """Each provider with its options: tiltsmc's defaults for a bare ``"CUDAExecutionProvider"``
    (``CUDA_DEFAULTS``), a ``(name, options)`` pair's own, then ``provider_options[name]`` on top."""
    chosen = []
    for entry in providers:
        name, options = (entry, None) if isinstance(entry, str) else (entry[0], dict(entry[1]))
        if options is None:
            options = dict(CUDA_DEFAULTS) if name == "CUDAExecutionProvider" else {}
        options.update((provider_options or {}).get(name, {}))
        chosen.append((name, options) if options else name)
    return chosen


def _checked_provider_options(
    provider_options: Optional[Mapping[str, Mapping[str, Any]]], ort: Any
) -> Optional[dict[str, dict[str, str]]]:
    """``{provider name: {option: value}}`` with known provider names; values as the strings ONNX Runtime
    takes (ValueError / TypeError naming ``provider_options``)."""
    if provider_options is None:
        return None
    if not isinstance(provider_options, Mapping):
        raise TypeError(
            "provider_options: expected {provider name: {option: value}}, e.g. "
            f"{{'CUDAExecutionProvider': {{'device_id': 1}}}}, got {type(provider_options).__name__}"
        )
    checked: dict[str, dict[str, str]] = {}
    for name, options in provider_options.items():
        if name not in ort.get_all_providers():
            raise ValueError(f"provider_options: {name!r} is not a provider ONNX Runtime knows")
        if not isinstance(options, Mapping):
            raise TypeError(f"provider_options[{name!r}]: expected a dict of options, got {options!r}")
        checked[name] = {
            str(key): (str(int(value)) if isinstance(value, bool) else str(value))
            for key, value in options.items()
        }
    return checked


# SessionOptions fields that take an enum, by the names of their values (as ONNX Runtime's docs write them)
_ENUM_FIELDS = {
    "graph_optimization_level": (
        "GraphOptimizationLevel",
        {"disable_all": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
         "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"},
    ),
    "execution_mode": ("ExecutionMode", {"sequential": "ORT_SEQUENTIAL", "parallel": "ORT_PARALLEL"}),
}  # fmt: skip


def _session_option_value(ort: Any, name: str, value: Any) -> Any:
    """A dict entry of ``session_options`` as the SessionOptions field takes it: enum fields also by name
    (``"basic"``, ``"ORT_ENABLE_BASIC"``) or number."""
    if name not in _ENUM_FIELDS or not isinstance(value, (str, int)) or isinstance(value, bool):
        return value
    enum_name, names = _ENUM_FIELDS[name]
    enum = getattr(ort, enum_name)
    if isinstance(value, int):
        for member in enum.__members__.values():
            if int(member) == value:
                return member
    else:
        member_name = names.get(value.lower(), value.upper())
        if member_name in enum.__members__:
            return enum.__members__[member_name]
    raise ValueError(
        f"session_options: {name}: expected one of {', '.join(names)} (or the enum), got {value!r}"
    )


def _apply_session_options(ort: Any, options: Any, session_options: Mapping[str, Any]) -> None:
    """Set each ``{field: value}`` on ``options`` (an ``ort.SessionOptions``); ``config`` is a dict of
    session config entries (``add_session_config_entry``). ValueError naming a field it does not have or
    a value it refuses, TypeError for a key that is not a string; a thread field is checked as the thread
    arguments are (``thread_count``)."""
    for name, value in session_options.items():
        if not isinstance(name, str):
            raise TypeError(
                f"session_options: expected onnxruntime.SessionOptions field names (strings) as keys, got "
                f"{name!r:.60} (a {type(name).__name__})"
            )
        if name == "config":
            if not isinstance(value, Mapping):
                raise TypeError(f"session_options: config: expected a dict of config entries, got {value!r}")
            for key, entry in value.items():
                options.add_session_config_entry(str(key), str(entry))
            continue
        if name.startswith("_") or not hasattr(options, name) or callable(getattr(options, name)):
            fields = sorted(
                f for f in dir(options) if not f.startswith("_") and not callable(getattr(options, f))
            )
            raise ValueError(
                f"session_options: {name!r} is not a field of onnxruntime.SessionOptions (fields: "
                f"{', '.join(fields)}; 'config' for config entries)"
            )
        if name in _THREAD_FIELDS:
            # an int from 0 to MAX_THREADS (TypeError, ValueError); ONNX Runtime refuses None itself
            value = value if value is None else thread_count(value, f"session_options: {name}")
        value = _session_option_value(ort, name, value)  # its ValueError names the field
        try:
            setattr(options, name, value)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"session_options: {name}: cannot set {value!r}: {error}") from None


def _check_utf8_path(model_path: Path) -> None:
    """ValueError naming ``path`` where ``model_path`` is not UTF-8 text (bytes that Python keeps as lone
    surrogates, PEP 383): ONNX Runtime's binding takes the path as UTF-8 text, and refuses it with a raw
    "incompatible constructor arguments" error."""
    text = os.fspath(model_path)
    found = not_utf8(text)
    if found is not None:
        raise ValueError(
            f"path: {shown_as_bytes(text)} is not UTF-8 text ({found[1]}), which ONNX Runtime cannot open: "
            "rename it"
        )


def _check_set_once(
    session_options: Mapping[Any, Any], threads: Mapping[str, Optional[int]], memory_arena: bool
) -> None:
    """ValueError where a ``session_options`` field is also set by an explicit argument (its value would
    silently win over the argument's): a thread count given both ways, or ``enable_cpu_mem_arena`` with
    ``memory_arena=False``."""
    for name, count in threads.items():
        if count is not None and name in session_options:
            raise ValueError(
                f"session_options: {name!r} is also set by {name}={count}: set the threads one way"
            )
    if not memory_arena and "enable_cpu_mem_arena" in session_options:
        raise ValueError(
            "session_options: 'enable_cpu_mem_arena' is also set by memory_arena=False: set the arena one way"
        )


def make_session(
    model_path: Path,
    providers: Optional[Sequence[Any]] = None,
    *,
    intra_op_num_threads: Optional[int] = None,
    inter_op_num_threads: Optional[int] = None,
    require_gpu: bool = False,
    memory_arena: bool = True,
    session_options: Any = None,
    provider_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` on CUDA where a device is usable, else on the CPU.

    tiltsmc's session defaults: ``log_severity_level = 4`` (fatal only: errors reach the caller as
    exceptions), the config entry ``session.force_spinning_stop = 1`` (the pool threads stop spinning when
    a run ends, since the policy and the reward model take turns), the CPU memory arena on
    (``memory_arena``), threads as ``intra_op_num_threads`` / ``inter_op_num_threads`` say (None: ONNX
    Runtime's own choice); everything else is ONNX Runtime's default (graph optimisation level
    ``ORT_ENABLE_ALL``). ``session_options`` changes them: a dict of ``onnxruntime.SessionOptions``
    fields (``{"intra_op_num_threads": 2, "graph_optimization_level": "basic", "log_severity_level": 2,
    "enable_cpu_mem_arena": False}``, enum fields also by name; ``"config"``: a dict of session config
    entries), set after tiltsmc's defaults; or an ``onnxruntime.SessionOptions`` object, used as it is
    (tiltsmc's defaults are not applied to it, and the thread and arena arguments must be left at their
    defaults). ``provider_options``: ``{provider name: {option: value}}``, set on that provider wherever it
    is used (on CUDA over tiltsmc's ``use_tf32=0``).

    An explicit ``providers`` list is used as given, except that a bare ``"CUDAExecutionProvider"`` runs
    float32 in full precision (``use_tf32=0``; pass ``("CUDAExecutionProvider", {...})`` to choose other
    options). ``require_gpu`` raises instead of falling back. The session's threads stop spinning when a
    run ends, since the policy and the reward model take turns.

    A provider name this ONNX Runtime build does not have is refused (ValueError), as is a model whose
    external data lies outside its folder (``check_external_data``); a file ONNX Runtime cannot load
    raises ValueError naming it, with ONNX Runtime's reason.

    ``memory_arena=False`` turns ONNX Runtime's CPU memory arena off: each run's buffers are freed to the
    C heap when it ends, instead of staying in the arena at their peak size for the life of the session
    (a long-running service then returns to its idle size after a burst; see
    ``tiltsmc._memory.release_free_memory``).

    ``intra_op_num_threads`` and ``inter_op_num_threads`` (``thread_count``: None or an int from 0 to
    ``MAX_THREADS``), ``require_gpu`` and ``memory_arena`` (True or False) are checked before anything is
    loaded: TypeError for a wrong type, ValueError for a value out of range, naming the argument.
    A ``session_options`` dict that sets a field an explicit argument also sets (``intra_op_num_threads``
    or ``inter_op_num_threads`` given both ways, ``enable_cpu_mem_arena`` with ``memory_arena=False``) is
    refused (ValueError naming both), as its value would silently win.
    """
    require_gpu = flag(require_gpu, "require_gpu")
    memory_arena = flag(memory_arena, "memory_arena")
    _check_utf8_path(model_path)
    threads = {
        name: thread_count(value, name)
        for name, value in zip(_THREAD_FIELDS, (intra_op_num_threads, inter_op_num_threads))
    }
    if isinstance(session_options, Mapping):
        _check_set_once(session_options, threads, memory_arena)
    ort = import_onnxruntime()

    _warn_if_both_runtimes_installed()
    if providers is not None:
        # Without a driver and a device the CUDA provider cannot start, whether this ONNX Runtime build has
        # it or not (the CPU build of the "cpu" extra): ONNX Runtime would print its failure to load it (a
        # banner of several lines) and run on the CPU. Go to the CPU directly.
        drop = () if cuda_device_usable()[0] else ("CUDAExecutionProvider",)
        providers = _checked_providers(providers, ort, drop) or ["CPUExecutionProvider"]
    check_external_data(model_path)
    provider_options = _checked_provider_options(provider_options, ort)
    if session_options is not None and isinstance(session_options, ort.SessionOptions):
        given = [name for name, value in threads.items() if value is not None]
        if not memory_arena:
            given.append("memory_arena")
        if given:
            raise ValueError(
                f"session_options: a SessionOptions object is used as it is; set {', '.join(given)} on it "
                "(or pass session_options as a dict)"
            )
        return _make(ort, model_path, session_options, providers, require_gpu, provider_options)
    if session_options is not None and not isinstance(session_options, Mapping):
        raise TypeError(
            "session_options: expected an onnxruntime.SessionOptions or a dict of its fields, got "
            f"{type(session_options).__name__}"
        )
    options = ort.SessionOptions()
    # Fatal only: errors reach the caller as exceptions (printed too, they would make a second report), and
    # provider fallbacks are handled here.
    options.log_severity_level = 4
    # The policy and reward sessions run in turn: one's pool threads spinning after its run would take
    # the cores from the other (on 2 cores, steps of the fixtures were 20-40% slower with the spin).
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.enable_cpu_mem_arena = memory_arena
    for name, count in threads.items():
        if count is not None:
            setattr(options, name, count)
    if session_options:
        _apply_session_options(ort, options, session_options)
    return _make(ort, model_path, options, providers, require_gpu, provider_options)


def _make(
    ort: Any,
    model_path: Path,
    options: Any,
    providers: Optional[Sequence[Any]],
    require_gpu: bool,
    provider_options: Optional[Mapping[str, Mapping[str, Any]]],
) -> Any:
    """The session of ``make_session`` with these options: the providers given, else CUDA where it is
    usable, else the CPU."""
    if providers is not None:
        if picks_cuda(providers):
            _preload_cuda_libraries()
        session = _load(ort, model_path, options, _with_provider_options(providers, provider_options))
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
                providers=_with_provider_options(
                    ["CUDAExecutionProvider", "CPUExecutionProvider"], provider_options
                ),
            )
            if "CUDAExecutionProvider" in session.get_providers():
                return session
            reason = "ONNX Runtime could not start its CUDA provider"
        except Exception as error:  # the CUDA provider failed to load: retry on the CPU alone
            reason = f"ONNX Runtime's CUDA provider failed: {error}"
    elif usable:
        reason = (
            "this ONNX Runtime build has no CUDA provider "
            "(install tiltsmc[gpu], onnxruntime-gpu, in place of onnxruntime)"
        )
    if require_gpu:
        raise RuntimeError(f"require_gpu: no usable GPU for {model_path.name}: {reason}")
    return _load(ort, model_path, options, _with_provider_options(["CPUExecutionProvider"], provider_options))


_FEED_TYPES = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(bool)": np.bool_,
}


# What tiltsmc feeds a model's inputs, as optimum's exports declare them: name -> (ONNX element type, rank,
# the shape in words); past_key_values.{i}.key / .value: CACHE_INPUT.
FED_INPUTS = {
    "input_ids": ("tensor(int64)", 2, "(batch, sequence)"),
    "attention_mask": ("tensor(int64)", 2, "(batch, past + sequence)"),
    "position_ids": ("tensor(int64)", 2, "(batch, sequence)"),
    "use_cache_branch": ("tensor(bool)", 1, "(1,)"),
}
CACHE_INPUT = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
# The float element types numpy holds (ONNX Runtime hands no bfloat16 array to Python): a KV cache's, and
# the scores tiltsmc reads (logits, a value head's).
FLOAT_TYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


def float_type_error(found: str, subject: str, what: str) -> ValueError:
    """The refusal of an input or output whose element type ``found`` is not one of ``FLOAT_TYPES``, in
    the one wording of this check: ``"{subject} is {found}; expected {what} of a float type: ..."``
    (``subject`` names the argument and the input or output, ``what`` the values tiltsmc reads there)."""
    *others, last = FLOAT_TYPES
    return ValueError(
        f"{subject} is {found}; expected {what} of a float type: {', '.join(others)} or {last} "
        "(ONNX Runtime returns no other float type to Python)"
    )


def check_cache_input(model_path: Path, node: Any) -> Any:
    """The numpy dtype of a ``past_key_values.{i}.key / .value`` input (an ``onnxruntime.NodeArg``):
    ValueError naming the file and the input where it is not a float type numpy holds or not of rank 4,
    ``(batch, heads, past, head_dim)`` (a rank the graph leaves unknown is not checked)."""
    dtype = FLOAT_TYPES.get(node.type)
    if dtype is None:
        raise float_type_error(node.type, f"path: {model_path.name}: input {node.name}", "a KV cache")
    if node.shape and len(node.shape) != 4:
        raise ValueError(
            f"path: {model_path.name}: input {node.name} has shape {node.shape}; expected a KV cache "
            "(batch, heads, past, head_dim)"
        )
    return dtype


def check_inputs(model_path: Path, nodes: Sequence[Any]) -> None:
    """Refuse a graph with an input tiltsmc does not feed, or feeds with another element type or rank than
    the graph declares, at load: ValueError naming the file and the input (ONNX Runtime's own error, at
    the first run, names neither). ``nodes``: ``session.get_inputs()``, each of them required (an input
    with a default is an initializer, not listed). Fed: ``FED_INPUTS`` (int64 ids, mask and positions, a
    bool ``use_cache_branch``) and ``past_key_values.{i}.key / .value`` (``check_cache_input``, every
    layer of the first's type)."""
    unknown = [
        node.name for node in nodes if node.name not in FED_INPUTS and not CACHE_INPUT.match(node.name)
    ]
    if unknown:
        raise ValueError(
            f"path: {model_path.name} has inputs tiltsmc does not feed: {', '.join(unknown)} (it feeds "
            f"{', '.join(FED_INPUTS)} and past_key_values.{{i}}.key / .value; every input a graph lists is "
            "required)"
        )
    cache_type = None
    for node in nodes:
        if CACHE_INPUT.match(node.name):
            check_cache_input(model_path, node)
            if cache_type is not None and node.type != cache_type:
                raise ValueError(
                    f"path: {model_path.name}: input {node.name} is {node.type}, another layer's is "
                    f"{cache_type}; tiltsmc keeps every layer's KV cache in one type"
                )
            cache_type = node.type
            continue
        element, rank, words = FED_INPUTS[node.name]
        if node.type != element:
            raise ValueError(
                f"path: {model_path.name}: input {node.name} is {node.type}, but tiltsmc feeds it "
                f"{element} (as optimum's exports take it): export the model with {node.name} of that type"
            )
        if node.shape and len(node.shape) != rank:
            raise ValueError(
                f"path: {model_path.name}: input {node.name} has shape {node.shape}, but tiltsmc feeds it "
                f"{words}"
            )


def shrink_memory_arena(session: Any) -> bool:
    """Give ONNX Runtime's CPU memory arena back to the system: one run of the smallest input (one row of
    one token, empty ``past_key_values``, ones elsewhere) with the run option that frees the arena's unused
    regions when the run ends (``memory.enable_memory_arena_shrinkage``). Between bursts, nothing is in
    use: the arena returns to about its idle size, and keeps its speed for the next burst. Returns whether
    the session could be run so (a graph with inputs of other types is left alone)."""
    ort = import_onnxruntime()

    if "CPUExecutionProvider" not in session.get_providers():
        return False
    feeds: dict[str, np.ndarray] = {}
    for node in session.get_inputs():
        dtype = _FEED_TYPES.get(node.type)
        if dtype is None:
            return False
        shape = [dim if isinstance(dim, int) else 1 for dim in node.shape]
        if node.name.startswith("past_key_values") and len(shape) == 4:
            shape[2] = 0  # (batch, heads, past, head_dim): no past
        if node.name == "use_cache_branch":
            feeds[node.name] = np.zeros(shape, dtype=dtype)
        else:
            feeds[node.name] = (
                np.ones(shape, dtype=dtype) if dtype != np.bool_ else np.zeros(shape, dtype=dtype)
            )
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    try:
        session.run(None, feeds, options)
    except Exception:  # an input whose smallest form the graph refuses: nothing is freed, nothing breaks
        return False
    return True


def _load(ort: Any, model_path: Path, options: Any, providers: list[Any]) -> Any:
    """``ort.InferenceSession``; ONNX Runtime's own exceptions (a corrupt file, an operator or opset it
    does not support, a graph it rejects) become a ValueError naming the file."""
    try:
        return ort.InferenceSession(os.fspath(model_path), sess_options=options, providers=providers)
    except Exception as error:
        if not type(error).__module__.startswith("onnxruntime"):
            raise
        reason = " ".join(str(error).split())
        raise ValueError(f"path: ONNX Runtime cannot load {model_path}: {reason}") from error


def _checked_providers(providers: Sequence[Any], ort: Any, drop: Sequence[str] = ()) -> list[Any]:
    """``providers`` as a list, each a name or a ``(name, options)`` pair naming a provider of this ONNX
    Runtime build: ONNX Runtime itself only warns about another name and runs on the CPU. Entries named in
    ``drop`` are left out (after their form is checked), available or not."""
    if isinstance(providers, (str, bytes)):
        raise TypeError(f"providers: expected a list of provider names, got {providers!r}")
    chosen = list(providers)
    if not chosen:
        raise ValueError("providers: expected at least one provider (or None to choose automatically)")
    available = list(ort.get_available_providers())
    kept = []
    for entry in chosen:
        pair = isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[1], dict)
        name = entry[0] if pair else entry
        if not isinstance(name, str):
            raise TypeError(f"providers: expected a provider name or a (name, options) pair, got {entry!r}")
        if name in drop:
            continue
        if name not in available:
            known = name in ort.get_all_providers()
            raise ValueError(
                f"providers: {name!r} is "
                + ("not in this ONNX Runtime build" if known else "not a provider ONNX Runtime knows")
                + f"; available here: {', '.join(available)} (providers=None chooses automatically)"
            )
        kept.append(entry)
    return kept


# -- external data ----------------------------------------------------------------------------------------

# Which fields of which ONNX messages hold tensors, directly or inside graphs, nodes, attributes, functions
# (onnx.proto): {message: {field number: message of that field}}; "tensor" is a TensorProto.
_ONNX_MESSAGES: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},  # ModelProto
    "training": {1: "graph", 2: "graph"},  # TrainingInfoProto: initialization, algorithm
    "graph": {1: "node", 5: "tensor", 15: "sparse"},  # GraphProto: node, initializer, sparse_initializer
    "node": {5: "attribute"},  # NodeProto
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "function": {7: "node", 11: "attribute"},  # FunctionProto: node, attribute_proto
    "sparse": {1: "tensor", 2: "tensor"},  # SparseTensorProto: values, indices
    "tensor": {
        8: "name",
        13: "entry",
        14: "location_kind",
    },  # TensorProto: name, external_data, data_location
    "entry": {1: "key", 2: "value"},  # StringStringEntryProto
}


class _Malformed(Exception):
    pass


def _varint(data: Any, position: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if position >= end or shift > 63:
            raise _Malformed(position)
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position, shift = position + 1, shift + 7
        if byte < 0x80:
            return value, position


def _field_value(data: Any, wire: int, position: int, end: int) -> tuple[Any, int]:
    """The value of a field of wire type ``wire`` at ``position`` and the position after it: a varint's
    value, a length-delimited field's ``(start, end)``, None for fixed-size fields; groups are not values."""
    if wire == 0:
        return _varint(data, position, end)
    if wire == 1:
        return None, position + 8
    if wire == 2:
        length, position = _varint(data, position, end)
        return (position, position + length), position + length
    if wire == 5:
        return None, position + 4
    raise _Malformed(position)


def _fields(data: Any, start: int, end: int) -> Any:
    """``(field number, wire type, value)`` of a protobuf message's fields in ``data[start:end]``: a
    varint's value, a length-delimited field's ``(start, end)``, None for fixed-size fields and groups."""
    position = start
    while position < end:
        key, position = _varint(data, position, end)
        number, wire = key >> 3, key & 7
        value: Any = None
        if wire == 3:  # a (deprecated) group: skip to its end-group tag
            depth = 1
            while depth:
                key, position = _varint(data, position, end)
                inner = key & 7
                if inner in (3, 4):
                    depth += 1 if inner == 3 else -1
                else:
                    _, position = _field_value(data, inner, position, end)
                if position > end:
                    raise _Malformed(position)
        else:
            value, position = _field_value(data, wire, position, end)
        if position > end or number == 0:
            raise _Malformed(position)
        yield number, wire, value


def external_data_locations(model_path: Path) -> list[tuple[str, str]]:
    """``(tensor name, location)`` of every tensor of an ONNX file whose data lies in another file
    (``external_data`` with a ``location`` key, or ``data_location = EXTERNAL``; ``location`` '' when it
    has none), anywhere in the model: initializers, sparse initializers, constants in node attributes,
    subgraphs (``If`` / ``Loop`` bodies), functions and training graphs.

    Reads the protobuf's wire format directly (the ``onnx`` package is not needed) through a memory map,
    skipping the tensors' own data. ValueError if the file is not a well-formed protobuf.
    """
    import mmap

    found: list[tuple[str, str]] = []
    with open(model_path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise ValueError(f"path: {model_path} is empty, not an ONNX model")
        try:
            mapped: Any = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # a file system that cannot map files: read it
            mapped = contextlib.nullcontext(handle.read())
        with mapped as data:
            stack = [("model", 0, size)]
            try:
                while stack:
                    kind, start, end = stack.pop()
                    if kind == "tensor":
                        found.extend(_tensor_location(data, start, end))
                        continue
                    children = _ONNX_MESSAGES[kind]
                    for number, wire, value in _fields(data, start, end):
                        child = children.get(number)
                        if child is not None and wire == 2:
                            stack.append((child, *value))
            except _Malformed as error:
                what = error.args[1] if len(error.args) > 1 else "malformed protobuf"
                raise ValueError(
                    f"path: {model_path} is not a valid ONNX model ({what} near byte {error.args[0]})"
                ) from None
    return found


def _tensor_location(data: Any, start: int, end: int) -> list[tuple[str, str]]:
    """``[(name, location)]`` of a TensorProto with external data, else ``[]``. Two ``location`` entries
    are refused (``_Malformed``), as ONNX Runtime's recent versions do; older ones took the last."""
    name, locations, external = "", [], False
    for number, wire, value in _fields(data, start, end):
        if number == 8 and wire == 2:
            name = bytes(data[value[0] : value[1]]).decode("utf-8", "replace")
        elif number == 14 and wire == 0:
            external = value == 1
        elif number == 13 and wire == 2:
            key = entry = None
            for field, entry_wire, span in _fields(data, *value):
                if entry_wire == 2 and field in (1, 2):
                    text = bytes(data[span[0] : span[1]]).decode("utf-8", "replace")
                    key, entry = (text, entry) if field == 1 else (key, text)
            if key == "location":
                locations.append(entry or "")
    if len(locations) > 1:
        raise _Malformed(start, f"tensor {name!r} has {len(locations)} external data locations")
    if not locations and not external:
        return []
    return [(name, locations[0] if locations else "")]


def check_external_data(model_path: Path) -> None:
    """Refuse a model whose tensors' external data would be read from outside its folder.

    Every ``location`` must be a relative path that, symbolic links resolved, names a regular file inside
    the model's folder, or inside the folder of the model file's own target where the model file is a
    symbolic link (the Hugging Face cache links ``snapshots/<rev>/model.onnx`` and its data to
    ``blobs/``). Absolute paths, ``..`` out of the folder, symbolic links leading out of it and ONNX
    Runtime's in-memory address tag are refused with a ValueError naming the file, the tensor and the
    location. (ONNX Runtime added a check of its own at the end of 2025, microsoft/onnxruntime#26776;
    the versions before it, down to the 1.17 that tiltsmc accepts, read such files.)
    """
    folder = model_path.parent
    roots = {os.path.realpath(folder), os.path.dirname(os.path.realpath(model_path))}
    for tensor, location in external_data_locations(model_path):
        where = f"path: {model_path.name}: tensor {tensor!r} has external data at {location!r}"
        if not location or "\0" in location:
            raise ValueError(f"{where}: not a file name")
        if os.path.isabs(location) or location.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", location):
            raise ValueError(
                f"{where}: an absolute path; external data must lie in the model's folder {folder}"
            )
        if location.startswith("*") or "_ORT_MEM_ADDR_" in location:
            raise ValueError(f"{where}: ONNX Runtime's in-memory tag, not a file")
        resolved = os.path.realpath(os.path.join(folder, location))
        if not any(os.path.commonpath([resolved, root]) == root for root in roots):
            raise ValueError(
                f"{where}: it resolves to {resolved}, outside the model's folder {folder}; external data "
                "must lie in the model's folder"
            )
        try:
            info = os.stat(resolved)
        except OSError as error:
            raise ValueError(f"{where}: {error.strerror or error} ({resolved})") from None
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{where}: {resolved} is not a regular file")
