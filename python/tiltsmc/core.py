"""Batched particle-weight kernels: thin, typed wrappers over the C++ core ``tiltsmc._core``.

Every kernel works on ``B`` independent rows of ``N`` particles. Log-weights are unnormalised natural
logarithms of non-negative weights: ``-inf`` is weight zero; NaN and ``+inf`` are input errors. With
``w_i = exp(logw_i) / sum_j exp(logw_j)`` the normalised weights of a row:

* ``log_mean_w = logsumexp(logw) - log N`` (the log of the mean unnormalised weight),
* ``ess = 1 / sum_i w_i**2`` (between 1 and N),
* a resampling scheme draws ``M`` ancestors with ``E[#children of i] = M w_i``.

Randomness is counter-based (Philox4x32-10). Each call draws one 64-bit key from ``rng`` (anything
``numpy.random.default_rng`` accepts); row ``b`` uses the stream keyed by that key with counter ``b``,
so results depend on the seed only, never on the thread count, and rows are independent.

Device arrays. Every kernel also runs on an NVIDIA GPU when its array argument lives there: anything with
``__cuda_array_interface__`` (CuPy arrays, PyTorch CUDA tensors, Numba device arrays,
[`DeviceArray`][tiltsmc.core.DeviceArray]) or an ONNX Runtime ``OrtValue`` on a CUDA device. Outputs are then
device arrays on the same device (CuPy arrays for CuPy input, PyTorch tensors for PyTorch input,
[`DeviceArray`][tiltsmc.core.DeviceArray] otherwise), computed on ``stream`` (default: the input library's
current stream, else the legacy default stream). The GPU draws from the same Philox streams as the CPU, so for
the same ``rng`` it returns the same ancestors, except where a uniform falls within rounding of a
cumulative-weight boundary (the sums are formed in another order). Device arrays must be C-contiguous and all
on one device; input errors raise the same exceptions as on the CPU (which needs one wait for the stream per
call; [`smc_step`][tiltsmc.core.smc_step] can skip it). Whether the GPU kernels are usable here, and why not:
[`cuda_available`][tiltsmc.core.cuda_available]. This build's own GPU module, ``tiltsmc._cuda``, is optional:
without it (or a driver, or a device) everything works on the CPU.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal, Optional, Union

import numpy as np
import numpy.typing as npt

from . import _core, _device
from ._device import CudaAvailability, DeviceArray, cuda_available
from ._rng import KeyDraws, RNGLike, RowStreams, keyed

__all__ = [
    "SCHEMES",
    "SCORE_KINDS",
    "CudaAvailability",
    "DeviceArray",
    "RowStreams",
    "append_tokens",
    "concatenate_padded",
    "cuda_available",
    "decode_inputs",
    "gather",
    "get_num_threads",
    "keep_survivors",
    "log_normalize",
    "mh_accept",
    "pool_select",
    "read_log_values",
    "reorder_in_place",
    "resample",
    "right_padded_prefixes",
    "row_statistics",
    "sample_logits",
    "set_num_threads",
    "smc_reweight",
    "smc_step",
]

Scheme = Literal["multinomial", "stratified", "systematic", "residual"]
SCHEMES: tuple[str, ...] = ("multinomial", "stratified", "systematic", "residual")
_SCHEME_CODES = {name: code for code, name in enumerate(SCHEMES)}  # the core's Scheme enum

FloatArray = npt.NDArray[np.floating]
# Builtin dtypes are singletons: identity tests are the cheapest checks of the common case.
_FLOAT64, _FLOAT32, _INT64 = np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.int64)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1  # the range of the core's integer arguments
_INT32_MAX = 2**31 - 1  # the range of the core's thread count


def _as_log_weights(logw: npt.ArrayLike, name: str = "logw") -> tuple[np.ndarray, bool]:
    """Validate log-weights: float32/float64, 1-D or 2-D, non-empty rows; returns a C-contiguous 2-D view.

    Lossless conversions only: float16 becomes float32 and non-contiguous input is copied; integer,
    boolean, complex and object input is refused.
    """
    if (
        type(logw) is np.ndarray
        and (logw.dtype is _FLOAT64 or logw.dtype is _FLOAT32)
        and logw.ndim == 2
        and logw.shape[1]
        and logw.flags.c_contiguous
    ):
        return logw, False  # the usual call, with the fewest checks: a model's step runs on cold caches
    array = logw if type(logw) is np.ndarray else np.asarray(logw)
    kind = array.dtype.char  # comparing characters is much cheaper than comparing dtypes
    if kind == "e":
        array = array.astype(np.float32)
    elif kind not in "fd":
        raise TypeError(f"{name}: expected float32 or float64 log-weights, got dtype {array.dtype}")
    elif not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))  # byte-swapped input: lossless conversion
    ndim = array.ndim
    if ndim != 1 and ndim != 2:
        raise ValueError(f"{name}: expected shape (N,) or (B, N), got {ndim}-D shape {array.shape}")
    rows = array.reshape(1, -1) if ndim == 1 else array
    if rows.shape[1] == 0:
        raise ValueError(f"{name}: rows must hold at least one particle, got shape {array.shape}")
    if not rows.flags.c_contiguous:
        rows = np.ascontiguousarray(rows)
    return rows, ndim == 1


def log_normalize(
    logw: npt.ArrayLike, *, zero_rows: Literal["raise", "report"] = "raise", stream: Any = None
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Normalise log-weights row by row.

    Returns ``(logw - logsumexp(logw), logsumexp(logw) - log N, 1 / sum(w**2))``; the first has the
    input's dtype and shape, the other two are float64 of shape ``(B,)`` (scalars' arrays of shape ``()``
    for 1-D input). A row whose weights are all zero (all ``-inf``) raises ``ValueError`` unless
    ``zero_rows="report"``, which returns it as normalised ``-inf``, ``log_mean_w = -inf`` and ``ess = 0``.
    """
    if zero_rows not in ("raise", "report"):
        raise ValueError(f"zero_rows: expected 'raise' or 'report', got {zero_rows!r}")
    if type(logw) is not np.ndarray and _device.is_device_array(logw):
        return _log_normalize_device(logw, zero_rows == "report", True, stream)
    rows, one_row = _as_log_weights(logw)
    normalised, log_mean_w, ess = _core.log_normalize(rows, zero_rows == "report")
    if one_row:
        return normalised[0], log_mean_w[0, ...], ess[0, ...]
    return normalised, log_mean_w, ess


def row_statistics(logw: npt.ArrayLike, *, stream: Any = None) -> tuple[FloatArray, FloatArray]:
    """``(log_mean_w, ess)`` per row, as [`log_normalize`][tiltsmc.core.log_normalize] gives them (all-zero
    rows: ``-inf``, 0),
    without the normalised copy: what a sampler needs at each step."""
    if type(logw) is not np.ndarray and _device.is_device_array(logw):
        _, log_mean_w, ess = _log_normalize_device(logw, True, False, stream)
        return log_mean_w, ess
    rows, one_row = _as_log_weights(logw)
    log_mean_w, ess = _core.row_statistics(rows)
    if one_row:
        return log_mean_w[0, ...], ess[0, ...]
    return log_mean_w, ess


def smc_step(
    log_w: np.ndarray,
    ess_threshold: float,
    scheme: Scheme = "systematic",
    rng: RNGLike = None,
    *,
    survivors_stay: bool = False,
    stream: Any = None,
    check: bool = True,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_], FloatArray, FloatArray, npt.NDArray[np.int64]]:
    """One SMC bookkeeping step for a ``(B, N)`` C-contiguous float32/float64 array, in one pass.

    Per row: ``log_mean_w`` and ``ess`` as [`log_normalize`][tiltsmc.core.log_normalize] gives them; rows with
    ``ess < ess_threshold * N`` (every row at ``ess_threshold >= 1``) are resampled with ``scheme`` (the
    same draws as [`resample`][tiltsmc.core.resample] with the same ``rng``) and their log-weights reset to 0
    **in place**; the others keep the identity. Rows of zero weight are reported (``ess = 0``), never
    resampled. Returns ``(ancestors (B, N), resampled (B,), log_mean_w, ess, unique_ancestors)``. With
    ``survivors_stay`` (host arrays only) a resampled row's ancestors come arranged as
    [`keep_survivors`][tiltsmc.core.keep_survivors] arranges them (same draws, same offspring counts,
    survivors in their own slots).

    On a device array the whole step is one kernel launch, and its outputs stay on the device. With
    ``check=False`` (device arrays only) the call does not wait for the GPU at all: input errors are then
    not raised, and a row holding a NaN or ``+inf`` log-weight comes back with ``log_mean_w = ess = NaN``,
    the identity and its weights untouched.
    """
    if type(log_w) is not np.ndarray and _device.is_device_array(log_w):
        if survivors_stay:
            raise ValueError("survivors_stay: only for host arrays (call keep_survivors on the ancestors)")
        return _smc_step_device(log_w, ess_threshold, scheme, rng, stream, check)  # type: ignore[no-any-return]
    if not isinstance(log_w, np.ndarray) or log_w.ndim != 2 or log_w.dtype.char not in "fd":
        raise TypeError("log_w: expected a 2-D float32 or float64 numpy array")
    if not log_w.dtype.isnative:  # the core would reset a converted copy, not log_w
        raise TypeError(
            f"log_w: expected the machine's byte order (it is reset in place), got {log_w.dtype.str}"
        )
    if not log_w.flags.c_contiguous or not log_w.flags.writeable:
        raise ValueError("log_w: must be C-contiguous and writeable (resampled rows are reset in place)")
    if log_w.shape[1] == 0:
        raise ValueError(f"log_w: rows must hold at least one particle, got shape {log_w.shape}")
    code, threshold = _step_arguments(scheme, ess_threshold)
    stepped = keyed(rng, lambda key: _core.smc_step(log_w, threshold, code, key, bool(survivors_stay)))
    return tuple(stepped)  # type: ignore[return-value]


def smc_reweight(
    log_w: npt.NDArray[np.float64],
    log_v: npt.NDArray[np.float64],
    log_v_prev: npt.NDArray[np.float64],
    live: npt.NDArray[np.bool_],
    log_total: npt.NDArray[np.float64],
    log_z: npt.NDArray[np.float64],
    collapsed: npt.NDArray[np.bool_],
    ess_threshold: Union[float, npt.ArrayLike],
    scheme: Union[Scheme, Sequence[Scheme]] = "systematic",
    rng: Union[RNGLike, RowStreams] = None,
    *,
    increment_se: Optional[npt.NDArray[np.float64]] = None,
) -> tuple[
    npt.NDArray[np.int64],
    npt.NDArray[np.bool_],
    npt.NDArray[np.float64],
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
]:
    r"""One step of SMC with the ratio potentials ``G_t = Vh_t / Vh_{t-1}``, in one call (host, float64).

    With ``(B, N)`` arrays ``log_w``, ``log_v = log Vh_t``, ``log_v_prev = log Vh_{t-1}`` and ``live`` (the
    particles this step extended), and ``(B,)`` arrays ``log_total = logsumexp(log_w)`` per row, ``log_z``
    and ``collapsed``, all updated in place:

    * ``log_w += log_v - log_v_prev`` and ``log_v_prev = log_v`` on live particles (a particle with
      ``log_v_prev = -inf`` already has weight zero and keeps it);
    * [`smc_step`][tiltsmc.core.smc_step] with ``survivors_stay=True`` (ESS, adaptive resampling, reset of
    resampled rows);
    * ``log Zh += log sum_i W_{t-1,i} G_{t,i} = logsumexp(log_w) - log_total``, then ``log_total`` is
      ``log N`` on resampled rows and ``logsumexp(log_w)`` elsewhere, and ``collapsed`` is set where ESS is 0.

    Returns ``(ancestors, resampled, ess, unique_ancestors, log_z_increment)``. With ``increment_se`` (a
    ``(B,)`` float64 array) each row's increment ``l = log sum_i W_{t-1,i} G_{t,i}`` also gets its standard
    error (delta method), written there:

    ``sd(l) ~ sqrt(sum_i (W_{t-1,i} G_{t,i} / e^l - W_{t-1,i})^2)``,

    the distance between the normalised weights before and after the potentials: given the particles before
    the step, ``sum_i W_i G_i`` estimates ``sum_i W_i E_p[G | prefix_i]`` with variance
    ``sum_i W_i^2 Var_p(G | prefix_i)``, estimated by each particle's one draw against the weighted mean
    (an overestimate by the spread of the ``E_p[G | prefix_i]``). ``inf`` where ``l = -inf`` (every
    potential 0: no reading), 0 in a row without live particles (no potential applied). NaN or ``+inf`` in
    ``log_w``, or in ``log_v`` / ``log_v_prev`` of a live particle, raises before anything is written (and
    so does NaN or ``+inf`` in ``log_total`` or ``log_z``: log-quantities, ``-inf`` where zero).

    Rows of independent runs (requests batched together) step in one call as each run's own call would
    step them: ``ess_threshold`` may be a ``(B,)`` array and ``scheme`` a sequence of ``B`` names (each
    row's own), and ``rng`` a ``RowStreams`` (each run's rows draw from one key drawn from its generator,
    numbered from 0, as in [`pool_select`][tiltsmc.core.pool_select]; or from the keys it was given).
    """
    rows = log_w.shape[0] if isinstance(log_w, np.ndarray) and log_w.ndim == 2 else 0
    n = log_w.shape[1] if isinstance(log_w, np.ndarray) and log_w.ndim == 2 else 0
    log_n = _log_count(n) if n > 0 else 0.0  # no particles: the core refuses the rows
    schemes: Optional[npt.NDArray[np.uint8]] = None
    if isinstance(scheme, str) or not isinstance(scheme, Sequence):
        code = _scheme_code(scheme)
    else:
        code, schemes = 0, np.array([_scheme_code(name) for name in scheme], dtype=np.uint8)
        if schemes.size != rows:
            raise ValueError(f"scheme: expected a name, or one per row of log_w ({rows}), got {schemes.size}")
    thresholds: Optional[npt.NDArray[np.float64]] = None
    if np.ndim(ess_threshold) == 0:
        threshold = _threshold(ess_threshold)  # type: ignore[arg-type]
    else:
        threshold, thresholds = 0.0, _row_thresholds(ess_threshold, rows)
    _check_log_values(log_total, "log_total", "logsumexp(log_w) of each row")
    _check_log_values(log_z, "log_z", "each row's log Zh so far")

    def step(key: int, keys: Optional[np.ndarray], counters: Optional[np.ndarray]) -> Any:
        return _core.smc_reweight(
            log_w, log_v, log_v_prev, live, log_total, log_z, collapsed, log_n, threshold, code, key,
            increment_se, keys, counters, thresholds, schemes,
        )  # fmt: skip

    if isinstance(rng, RowStreams):
        stepped = rng.keyed(rows, lambda keys, counters: step(0, keys, counters))
    else:
        stepped = keyed(rng, lambda key: step(key, None, None))
    ancestors, resampled, ess, unique, increment = stepped
    return ancestors, resampled, ess, unique, increment


def _check_log_values(values: object, name: str, holds: str) -> None:
    """Refuse NaN and ``+inf`` in a ``(B,)`` float64 array of log-quantities (finite, or ``-inf`` for zero: a
    collapsed row's), one vectorised pass; its type, dtype and shape are the core's to check."""
    # the maximum is NaN where one is NaN, +inf where one is +inf (cheaper than an elementwise test)
    if (
        isinstance(values, np.ndarray)
        and values.dtype.kind == "f"
        and values.size
        and not values.max() < math.inf
    ):
        at = np.flatnonzero(~(values.reshape(-1) < math.inf))[0]
        raise ValueError(
            f"{name}: expected {holds}, finite or -inf, got {values.reshape(-1)[at]} at row {at}"
        )


def _row_thresholds(ess_threshold: Any, rows: int) -> npt.NDArray[np.float64]:
    """Per-row ESS thresholds as a float64 ``(rows,)`` array, each a fraction >= 0."""
    try:
        if np.asarray(ess_threshold).dtype.kind not in "iuf":  # strings and booleans are not fractions
            raise TypeError
        thresholds = np.ascontiguousarray(ess_threshold, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(
            f"ess_threshold: expected a fraction >= 0 or one per row, got {ess_threshold!r}"
        ) from None
    if thresholds.shape != (rows,):
        raise ValueError(
            f"ess_threshold: expected a fraction or one per row of log_w ({rows}), got shape "
            f"{thresholds.shape}"
        )
    if not np.all(thresholds >= 0.0):
        raise ValueError(f"ess_threshold: expected fractions >= 0, got {thresholds.tolist()}")
    return thresholds


def _scheme_code(scheme: object) -> int:
    code = _SCHEME_CODES.get(scheme) if isinstance(scheme, str) else None
    if code is None:
        raise ValueError(f"scheme: expected one of {', '.join(SCHEMES)}, got {scheme!r}")
    return code


def _step_arguments(scheme: object, ess_threshold: float) -> tuple[int, float]:
    return _scheme_code(scheme), _threshold(ess_threshold)


def _threshold(ess_threshold: float) -> float:
    if isinstance(ess_threshold, (bool, np.bool_)) or not isinstance(ess_threshold, numbers.Real):
        raise TypeError(f"ess_threshold: expected a fraction >= 0 (a real number), got {ess_threshold!r}")
    try:
        threshold = float(ess_threshold)
    except OverflowError:  # an int beyond float64: above 1 (every row), or below 0
        threshold = math.inf if ess_threshold > 0 else -math.inf
    if not threshold >= 0.0:
        raise ValueError(f"ess_threshold: expected a fraction >= 0, got {ess_threshold!r}")
    return threshold


def resample(
    logw: npt.ArrayLike,
    scheme: Scheme = "systematic",
    num: Optional[int] = None,
    rng: RNGLike = None,
    *,
    stream: Any = None,
) -> npt.NDArray[np.int64]:
    """Draw ``num`` (default ``N``) ancestor indices per row, ascending within a row.

    All schemes are unbiased, ``E[#children of i] = num * w_i``; ``systematic`` gives every particle
    ``floor`` or ``ceil`` of ``num * w_i`` children, ``stratified`` likewise for particles whose cumulative
    weight interval spans the strata it touches, ``residual`` at least ``floor(num * w_i)``; ``multinomial``
    draws ``num`` independent indices (sorted uniforms from normalised exponential spacings, O(N + num)).
    Particles of weight zero are never chosen.
    """
    code = _SCHEME_CODES.get(scheme) if isinstance(scheme, str) else None
    if code is None:
        raise ValueError(f"scheme: expected one of {', '.join(SCHEMES)}, got {scheme!r}")
    if type(logw) is not np.ndarray and _device.is_device_array(logw):
        return _resample_device(logw, code, num, rng, stream)  # type: ignore[no-any-return]
    rows, one_row = _as_log_weights(logw)
    num = _as_num(num, rows.shape[1])
    ancestors = keyed(rng, lambda key: _core.resample(rows, code, num, key))
    return ancestors[0] if one_row else ancestors


def _as_num(num: Optional[int], default: int) -> int:
    if num is None:
        return default
    return _as_int(num, "num", "a positive int", 1)


def _as_int(value: object, name: str, expected: str, minimum: int = _INT64_MIN) -> int:
    """An integer argument of the core (an int64): a Python or numpy integer, not a bool (nor a float, even
    an integral one), in ``[minimum, 2**63)``."""
    if type(value) is int:
        number = value
    elif isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected {expected}, got {value!r}")
    else:
        number = int(value)
    if not minimum <= number <= _INT64_MAX:
        if number < minimum and minimum != _INT64_MIN:
            raise ValueError(f"{name}: must be >= {minimum}, got {number}")
        raise ValueError(f"{name}: out of the int64 range [-2**63, 2**63), got {number}")
    return number


def pool_select(
    logw: npt.ArrayLike, rng: Union[RNGLike, RowStreams] = None, *, stream: Any = None
) -> tuple[npt.NDArray[np.int64], FloatArray]:
    """Pick one index per row with probability ``w_i``, and return it with the row's ``log_mean_w``.

    This is the resampling-pool step of single-particle guided SMC: all ``K`` offspring go to one
    ancestor drawn by weight, and the estimate of ``Z`` is multiplied by the mean pool weight.
    With a ``RowStreams`` as ``rng`` (rows of independent runs batched together), each
    run's rows are drawn with a key from its own generator, as they would be alone. That is for host
    arrays only: the device kernel draws every row from one key, so a device ``logw`` with a
    ``RowStreams`` raises ``ValueError`` before anything is drawn or launched (call it once per run).
    """
    if type(logw) is not np.ndarray and _device.is_device_array(logw):
        if isinstance(rng, RowStreams):
            raise ValueError(
                "rng: RowStreams are for host arrays; the device kernel draws every row from one key "
                "(pass an int or a Generator, or call pool_select once per run)"
            )
        return _pool_select_device(logw, rng, stream)  # type: ignore[no-any-return]
    rows, one_row = _as_log_weights(logw)
    if isinstance(rng, RowStreams):  # one call: each run's rows from a key of its own, numbered from 0
        index, log_mean_w = rng.keyed(
            rows.shape[0], lambda keys, counters: _core.pool_select(rows, 0, keys, counters)
        )
    else:
        index, log_mean_w = keyed(rng, lambda key: _core.pool_select(rows, key))
    if one_row:
        return index[0, ...], log_mean_w[0, ...]
    return index, log_mean_w


def sample_logits(
    logits: npt.ArrayLike,
    temperature: float = 1.0,
    rng: Union[RNGLike, RowStreams] = None,
    *,
    where: Optional[npt.NDArray[np.bool_]] = None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """One draw per row from ``softmax(logits / temperature)``, and its log-probability.

    ``logits`` is float32 or float64, ``(V,)`` or ``(B, V)``. Per row, with the scores
    ``s = logits / temperature`` in float64, index ``v`` is drawn with probability
    ``exp(s_v) / sum_u exp(s_u)`` (the draw of [`pool_select`][tiltsmc.core.pool_select] on ``s``: same
    ``rng``, same index) and returned with ``log p(v) = s_v - log sum_u exp(s_u)``, computed as
    ``(s_v - max s) - log sum_u exp(s_u - max s)``: never positive, and to the last bits where ``p(v)`` is
    near 1 (``-log1p`` of the other terms' sum, summed apart). Finite logits whose scores overflow (a
    temperature far below 1) are drawn from ``(logits - max logits) / temperature``, the same law. Logits
    of ``-inf`` are never drawn; NaN, ``+inf`` or a row of ``-inf`` raise ``ValueError``. This is a
    language model's token step in one call, with no float64 copy of the logits. ``where`` (a bool array
    of one entry per row) draws only the rows it marks; the others get index 0 and log-probability 0 and
    their logits are not read (the other rows' draws are the same as without it). With a
    ``RowStreams`` as ``rng``, each run's rows are drawn as they would be alone (see
    [`pool_select`][tiltsmc.core.pool_select]).
    """
    rows, one_row = _as_log_weights(logits, "logits")
    if type(temperature) is float:
        scale = temperature
    elif isinstance(temperature, (bool, np.bool_)) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature: expected a number > 0 (a real number), got {temperature!r}")
    else:
        try:
            scale = float(temperature)
        except OverflowError:  # an int beyond float64
            raise ValueError(
                "temperature: must be a finite number > 0, got an int too large for a float"
            ) from None
    if not 0.0 < scale < math.inf:  # checked before rng draws: a refused call leaves it as it was
        raise ValueError(f"temperature: must be a finite number > 0, got {temperature!r}")
    if isinstance(rng, RowStreams):
        index, log_prob = _sample_logits_per_run(rows, scale, rng, where)
    else:
        index, log_prob = keyed(rng, lambda key: _core.sample_logits(rows, scale, key, where))
    if one_row:
        return index[0, ...], log_prob[0, ...]
    return index, log_prob


def _sample_logits_per_run(
    rows: np.ndarray, temperature: float, rng: RowStreams, where: Optional[npt.NDArray[np.bool_]]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """[`sample_logits`][tiltsmc.core.sample_logits] with each run's rows drawn from its own generator: one
    core call, row ``r`` of run ``g`` from the stream (a key drawn from ``generators[g]``, ``r``'s index
    within the run), as the run's own call would draw it. A run with no row to draw draws no key, as it
    would make no call alone."""
    count = rows.shape[0]
    if where is not None:
        where = np.ascontiguousarray(where)
        if where.dtype != np.bool_ or where.size != count:
            raise ValueError(
                f"where: expected one bool per row of logits ({count}), got {where.dtype} {where.shape}"
            )
        where = where.reshape(count)
    starts, sizes, counters = rng.row_counters(count)
    if where is None:
        drawing = [True] * len(sizes)
    else:  # the runs with a row to draw: one cumulative count, not one reduction per run
        counted = np.zeros(count + 1, dtype=np.int64)
        np.cumsum(where, out=counted[1:])
        drawing = (counted[starts + sizes] > counted[starts]).tolist()
    draws = KeyDraws()
    keys = np.repeat(
        np.array([draws.key(g) if draw else 0 for g, draw in zip(rng.generators, drawing)], dtype=np.uint64),
        sizes,
    )
    index, log_prob = draws.call(_core.sample_logits, rows, temperature, 0, where, keys, counters)
    return index, log_prob


@functools.lru_cache(maxsize=64)
def _log_count(n: int) -> float:
    """``log n`` as numpy computes it (its log and the C library's differ in the last bit for a few n)."""
    return float(np.log(n))


def _as_log_z(value: npt.ArrayLike, name: str) -> np.ndarray:
    """A scalar or ``(B,)`` of float64 log-values (ints and narrower floats converted)."""
    array = value if type(value) is np.ndarray else np.asarray(value)
    if array.dtype != np.float64:
        if array.dtype.kind not in "iuf":
            raise TypeError(f"{name}: expected float log-values, got dtype {array.dtype}")
        array = array.astype(np.float64)
    if array.ndim > 1:
        raise ValueError(f"{name}: expected a scalar or shape (B,), got shape {array.shape}")
    return array


def mh_accept(
    log_z_current: npt.ArrayLike, log_z_proposed: npt.ArrayLike, rng: RNGLike = None, *, stream: Any = None
) -> npt.NDArray[np.bool_]:
    """Metropolis-Hastings acceptance per row: ``u < exp(log_z_proposed - log_z_current)``, ``u ~ U[0, 1)``.

    Conventions: a current state of weight zero (``-inf``) is always left; otherwise a proposal of
    weight zero is always rejected. NaN and ``+inf`` are errors. Returns the inputs' shape.
    """
    if _either_on_device(log_z_current, log_z_proposed):
        return _mh_accept_device(log_z_current, log_z_proposed, rng, stream)  # type: ignore[no-any-return]
    current = _as_log_z(log_z_current, "log_z_current")
    proposed = _as_log_z(log_z_proposed, "log_z_proposed")
    if current.shape != proposed.shape:
        raise ValueError(
            f"log_z_proposed: shape {proposed.shape} does not match log_z_current's {current.shape}"
        )
    if current.size == 0:
        raise ValueError("log_z_current: expected at least one row, got an empty array")
    flat_current = np.ascontiguousarray(current.reshape(-1))
    flat_proposed = np.ascontiguousarray(proposed.reshape(-1))
    accept = keyed(rng, lambda key: _core.mh_accept(flat_current, flat_proposed, key))
    return accept.reshape(current.shape)


def gather(
    x: npt.ArrayLike, ancestors: npt.ArrayLike, out: Optional[np.ndarray] = None, *, stream: Any = None
) -> np.ndarray:
    """Reorder particles: ``out[b, m] = x[b, ancestors[b, m]]`` (or ``out[m] = x[ancestors[m]]`` for 1-D).

    ``x`` has shape ``(B, N, ...)`` with ``ancestors`` ``(B, M)``, or ``(N, ...)`` with ``ancestors``
    ``(M,)``; any dtype without Python objects and any trailing shape. ``out=x`` reorders in place
    (needs ``M == N`` and a C-contiguous, writeable ``x``): rows whose ancestor is themselves are not
    touched, so near-identity ancestries copy little. Every index is checked before anything is written.

    On the device (``x``, ``ancestors`` and ``out`` all device arrays, ``ancestors`` int64) the same holds:
    the indices are checked on the GPU before any write, and ``out=x`` copies only the items whose ancestor
    is not themselves, saving first those another item still reads (KV caches of shape
    ``(B, N, heads, seq, head_dim)`` or ``(N, heads, seq, head_dim)`` reorder in place).
    """
    if _either_on_device(x, ancestors) or (
        out is not None and type(out) is not np.ndarray and _device.is_device_array(out)
    ):
        return _gather_device(x, ancestors, out, stream)  # type: ignore[no-any-return]
    index = _as_ancestors(ancestors)
    if index.ndim not in (1, 2):
        raise ValueError(f"ancestors: expected shape (M,) or (B, M), got shape {index.shape}")
    in_place = out is not None and out is x
    if in_place:
        if not isinstance(x, np.ndarray):
            raise TypeError(
                f"out: in-place gather (out=x) needs x to be a numpy array, got {type(x).__name__}"
            )
        source = x
        if not source.flags.c_contiguous or not source.flags.writeable:
            raise ValueError("out: in-place gather (out=x) needs a C-contiguous, writeable x")
    elif type(x) is np.ndarray and x.flags.c_contiguous:
        source = x
    else:
        source = np.ascontiguousarray(x)
    if source.dtype.hasobject:
        raise TypeError(f"x: dtype {source.dtype} holds Python objects, which gather cannot copy")
    one_row = index.ndim == 1
    if source.ndim < index.ndim:
        raise ValueError(
            f"x: expected at least {index.ndim} dimensions to match ancestors of shape {index.shape}, "
            f"got shape {source.shape}"
        )
    index2 = index.reshape(1, -1) if one_row else index
    source3 = source.reshape((1, *source.shape)) if one_row else source
    batch, num_particles = source3.shape[0], source3.shape[1]
    if index2.shape[0] != batch:
        raise ValueError(f"ancestors: {index2.shape[0]} rows do not match x's {batch} rows")
    if num_particles == 0:
        raise ValueError(f"x: rows must hold at least one particle, got shape {source.shape}")
    trailing = source3.shape[2:]
    out_shape = (*((batch,) if not one_row else ()), index2.shape[1], *trailing)
    row_bytes = source.dtype.itemsize * math.prod(trailing)
    if in_place:
        if index2.shape[1] != num_particles:
            raise ValueError(
                f"out: in-place gather needs as many ancestors as particles, got {index2.shape[1]} and "
                f"{num_particles}"
            )
        target = source
    elif out is None:
        target = np.empty(out_shape, dtype=source.dtype)
    else:
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out: expected a numpy array, got {type(out).__name__}")
        if out.shape != out_shape or out.dtype != source.dtype:
            raise ValueError(
                f"out: expected shape {out_shape} and dtype {source.dtype}, got {out.shape} and {out.dtype}"
            )
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("out: must be C-contiguous and writeable")
        if np.may_share_memory(out, source) and np.shares_memory(out, source):
            raise ValueError("out: overlaps x without being x itself; pass out=x to reorder in place")
        target = out
    if row_bytes == 0 or index2.shape[1] == 0 or batch == 0:
        # Nothing to copy, but the ancestors are still checked.
        if index2.size and (index2.min() < 0 or index2.max() >= num_particles):
            b, m = np.argwhere((index2 < 0) | (index2 >= num_particles))[0]
            raise ValueError(f"ancestors: index out of range at row {b}, index {m}")
        return target
    _core.gather(source, index2, target, batch, num_particles, row_bytes)
    return target


def concatenate_padded(
    parts: Sequence[npt.ArrayLike],
    axis: Optional[int] = None,
    skips: Optional[Sequence[int]] = None,
    padding_side: Literal["left", "right"] = "left",
    out: Optional[np.ndarray] = None,
    used: Optional[npt.ArrayLike] = None,
) -> np.ndarray:
    """Join arrays along their first axis, padding ``axis`` to a common width (one core call).

    Without ``axis`` this is ``np.concatenate(parts)``. With ``axis`` (not the first), the parts may differ
    in length along it. Left padding (the default): part ``k`` keeps its entries ``skips[k]:`` along
    ``axis`` (default: all), they end at the last column of the result, and the columns before them are
    zero. Right padding: it keeps its entries ``:length - skips[k]``, they start at the first column, and
    the columns after them are zero. The result's width is the longest kept length. That is how batches of
    sequences of different lengths join (a decoder's KV cache ``(B, N, heads, length, head_dim)`` with
    ``axis=3``, its attention mask with ``axis=2``; ``skips`` leave out columns that are padding in all of
    a part's rows). The parts must agree on every other axis; their dtypes are promoted as
    ``np.concatenate`` does. Large copies are split over the core's threads. ``out``: the array to write
    (C-contiguous and writeable, of the parts' rows in all and the promoted dtype, at least the longest
    kept length wide along ``axis``: the columns past it padding too), returned.

    ``used`` (right padding only; one count per row of the result's first axis, each at least 0): row ``i``
    takes only the first ``min(used[i], kept)`` of its part's kept columns along ``axis``, and its columns
    after are left as they were in ``out`` (not initialised where ``out`` is not given): batches of KV
    caches written in place, whose rows read no column past their length, join by copying those columns
    alone.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
    arrays = [np.asarray(part) for part in parts]
    if not arrays:
        raise ValueError("parts: expected at least one array")
    for k, array in enumerate(arrays):
        if array.ndim < 1:
            raise ValueError(f"parts[{k}]: expected at least one axis, got a scalar")
        if array.dtype.hasobject:
            raise TypeError(f"parts[{k}]: dtype {array.dtype} holds Python objects, which cannot be copied")
        if array.ndim != arrays[0].ndim:
            raise ValueError(f"parts[{k}]: {array.ndim} axes, parts[0] has {arrays[0].ndim}")
    ndim = arrays[0].ndim
    if axis is not None:
        if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"axis: expected None or an axis (an int), got {axis!r}")
        if not -ndim <= axis < ndim or axis % ndim == 0:
            raise ValueError(f"axis: expected an axis of the {ndim} other than the first, got {axis}")
        axis = int(axis) % ndim
    if skips is None:
        skips = [0] * len(arrays)
    else:
        if not isinstance(skips, (Sequence, np.ndarray)) or isinstance(skips, str):
            raise TypeError(f"skips: expected one int per part, got {type(skips).__name__}")
        if len(skips) != len(arrays):
            raise ValueError(f"skips: expected one per part ({len(arrays)}), got {len(skips)}")
        for k, skip in enumerate(skips):
            if isinstance(skip, (bool, np.bool_)) or not isinstance(skip, (int, np.integer)):
                raise TypeError(f"skips[{k}]: expected an int, got {skip!r}")
        if axis is None and any(skips):
            raise ValueError("skips: need an axis to skip along")
    counts = None
    if used is not None:
        if axis is None or padding_side != "right":
            raise ValueError("used: only with an axis and padding_side='right'")
        counts = np.asarray(used)
        if counts.dtype.kind not in "iu":
            raise TypeError(f"used: expected integers, got {counts.dtype}")
        rows = sum(a.shape[0] for a in arrays)
        if counts.shape != (rows,):
            raise ValueError(f"used: expected shape ({rows},) (a count per row), got {counts.shape}")
        if counts.size and int(counts.min()) < 0:
            raise ValueError(f"used: expected counts >= 0, got {int(counts.min())}")
        _check_int64_range(counts, "used")
        counts = np.array(counts, dtype=np.int64)  # a copy: never memory the call writes
    try:
        dtype = np.result_type(*arrays)
    except TypeError as error:  # numpy's DTypePromotionError: no dtype holds them all
        dtypes = ", ".join(str(a.dtype) for a in arrays)
        raise TypeError(f"parts: dtypes {dtypes} have no common dtype to join them in ({error})") from None
    inner = [list(a.shape[1:]) for a in arrays]
    lengths = [1 if axis is None else a.shape[axis] for a in arrays]
    for k, (array, skip) in enumerate(zip(arrays, skips)):
        if not 0 <= skip <= lengths[k]:
            raise ValueError(f"skips[{k}]: expected 0 <= skip <= {lengths[k]}, got {skip}")
        if axis is not None:
            inner[k][axis - 1] = 0
        if inner[k] != inner[0]:
            raise ValueError(
                f"parts[{k}]: shape {array.shape} differs from parts[0]'s {arrays[0].shape} beyond the "
                f"first axis{'' if axis is None else f' and axis {axis}'}"
            )
    width = max(length - skip for length, skip in zip(lengths, skips))
    shape = list(arrays[0].shape)
    shape[0] = sum(a.shape[0] for a in arrays)
    if out is None:
        if axis is not None:
            shape[axis] = width
        out = np.empty(shape, dtype=dtype)
    else:
        if not isinstance(out, np.ndarray) or out.dtype != dtype:
            found = getattr(out, "dtype", out)
            raise TypeError(f"out: expected a numpy array of dtype {dtype}, got {found!r}")
        if axis is not None:
            shape[axis] = out.shape[axis] if out.ndim == ndim and out.shape[axis] >= width else width
        if list(out.shape) != shape:
            raise ValueError(
                f"out: expected shape {tuple(shape)} (at least {width} wide on axis {axis}), got {out.shape}"
            )
    trailing = shape[1:] if axis is None else shape[axis + 1 :]
    blocks = 1 if axis is None else math.prod(shape[1:axis])
    item_bytes = dtype.itemsize * math.prod(trailing)
    sources = []
    for k, a in enumerate(arrays):
        if a.dtype != dtype or not a.flags.c_contiguous:
            try:
                a = np.ascontiguousarray(a, dtype=dtype)
            except ValueError as error:  # bytes that are not ASCII, as str
                raise ValueError(
                    f"parts[{k}]: cannot be converted to the joined dtype {dtype} ({error})"
                ) from None
        sources.append(a)
    skipped, right = [int(skip) for skip in skips], padding_side == "right"
    _core.concatenate_padded(sources, lengths, skipped, out, blocks, item_bytes, right, counts)
    return out


def _check_int64_range(values: np.ndarray, name: str) -> None:
    """Refuse integers the core's int64 cannot hold (uint64 values from 2**63), which a cast would wrap
    around to negative ones."""
    if values.dtype.kind == "u" and values.size and int(values.max()) > _INT64_MAX:
        raise ValueError(f"{name}: expected values that fit in int64, got {int(values.max())}")


def _as_ancestors(ancestors: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """``ancestors`` as a C-contiguous int64 array (a copy only where it is not one already); integer
    dtypes only, and no uint64 value beyond int64."""
    if type(ancestors) is np.ndarray and ancestors.dtype is _INT64 and ancestors.flags.c_contiguous:
        return ancestors  # the usual call (see _as_log_weights)
    index = ancestors if type(ancestors) is np.ndarray else np.asarray(ancestors)
    if index.dtype.kind not in "iu":
        raise TypeError(f"ancestors: expected an integer array, got dtype {index.dtype}")
    if index.dtype == np.uint64 and index.size and int(index.max()) > np.iinfo(np.int64).max:
        raise ValueError("ancestors: index out of range (larger than int64)")
    if index.dtype != np.int64 or not index.flags.c_contiguous:
        index = np.ascontiguousarray(index, dtype=np.int64)
    return index


def _ancestor_rows(ancestors: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """``_as_ancestors`` for a ``(B, N)`` array with at least one particle per row."""
    index = _as_ancestors(ancestors)
    if index.ndim != 2:
        raise ValueError(f"ancestors: expected shape (B, N), got shape {index.shape}")
    if index.shape[1] == 0:
        raise ValueError(f"ancestors: rows must hold at least one particle, got shape {index.shape}")
    return index


def reorder_in_place(
    arrays: Sequence[Any],
    ancestors: npt.ArrayLike,
    *,
    skip_unwritable: bool = False,
    used: Optional[npt.ArrayLike] = None,
    axes: Optional[Sequence[Optional[int]]] = None,
) -> list[int]:
    """``gather(x, ancestors, out=x)`` for every ``x`` in ``arrays``, in one call.

    Each array has shape ``(B, N, ...)`` (any dtype without Python objects, any trailing shape) and is
    C-contiguous and writeable; ``ancestors`` is ``(B, N)``. Rows whose ancestor is themselves are not
    touched. An array listed twice (the same memory) is reordered once; arrays that overlap otherwise are
    refused. Every array and every index is checked before anything is written. With ``skip_unwritable``,
    entries that are not numpy arrays (their ``shape``'s leading axes still checked), or not C-contiguous and
    writeable, are left alone instead of refused: returns their positions in ``arrays`` (else ``[]``).

    ``axes`` (one per array: None, or an axis after the leading two) with ``used`` (``(B, N)`` integers)
    marks arrays holding a right-padded sequence along that axis of which each item reads only its first
    ``used`` columns (a KV cache written in place: no column past a row's length is read): item ``j`` then
    takes the first ``used[a_j]`` columns of its ancestor ``a_j`` (clamped to the axis' width), its columns
    after left as they were, instead of the whole item.
    """
    index = _ancestor_rows(ancestors)
    if type(arrays) is not list:
        if isinstance(arrays, np.ndarray) or not isinstance(arrays, Sequence):
            raise TypeError(f"arrays: expected a sequence of numpy arrays, got {type(arrays).__name__}")
        arrays = list(arrays)
    if (used is None) != (axes is None):
        raise ValueError("used, axes: give both (the items' lengths, each array's sequence axis) or neither")
    if skip_unwritable:
        for k, entry in enumerate(arrays):
            if not isinstance(entry, np.ndarray):
                _check_leading_axes(entry, k, index.shape)
    if axes is None:
        return _core.reorder_in_place(arrays, index, bool(skip_unwritable))
    axis_list = list(axes)
    if len(axis_list) != len(arrays):
        raise ValueError(f"axes: expected one per array ({len(arrays)}), got {len(axis_list)}")
    for k, axis in enumerate(axis_list):
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, (int, np.integer))):
            raise TypeError(f"axes[{k}]: expected None or an axis (an int), got {axis!r}")
        if axis is not None and not 2 <= axis <= _INT64_MAX:  # the core checks it against the array's axes
            raise ValueError(
                f"axes[{k}]: expected an axis after the leading (B, N) of arrays[{k}], got {axis}"
            )
    lengths = np.asarray(used)
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"used: expected integers, got {lengths.dtype}")
    _check_int64_range(lengths, "used")
    lengths = np.array(lengths, dtype=np.int64, order="C")  # a copy: never memory the call writes
    axis_ints = [None if axis is None else int(axis) for axis in axis_list]
    return _core.reorder_in_place(arrays, index, bool(skip_unwritable), lengths, axis_ints)


def _check_leading_axes(entry: object, k: int, expected: tuple[int, ...]) -> None:
    """An entry of ``reorder_in_place``'s arrays that it leaves alone (``skip_unwritable``): its ``shape``
    must hold ints and begin with the ancestors' ``(B, N)``."""
    name = f"arrays[{k}]"
    try:
        shape = tuple(entry.shape)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        raise TypeError(f"{name}: expected an array (with a shape), got {type(entry).__name__}") from None
    if any(isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)) for d in shape):
        raise TypeError(f"{name}: expected a shape of ints, got {shape!r}")
    if shape[:2] != expected:
        raise ValueError(f"{name}: leading axes do not match the ancestors' (B, N)")


def keep_survivors(ancestors: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """The same offspring counts as ``ancestors`` ``(B, N)``, with every surviving particle in its own slot.

    Particles are exchangeable after resampling, so any arrangement of a row's ancestors gives the same
    particle system. Here particle ``i`` with ``c_i >= 1`` children keeps slot ``i`` (``a_i = i``) and
    its ``c_i - 1`` extra copies fill the childless slots, both in ascending order; an in-place
    [`gather`][tiltsmc.core.gather] by the result then moves only the childless slots (``N - unique`` rows)
    instead of nearly all of them. Returns a new array; ``ancestors`` is left as it is.
    """
    index = _ancestor_rows(ancestors)
    # a converted array is already a new one; ancestors itself, or a view of its memory (a subclass's,
    # a buffer's), is copied
    arranged = index if index is not ancestors and index.base is None else index.copy()
    _core.keep_survivors(arranged)
    return arranged


def set_num_threads(num_threads: int) -> None:
    """Set how many threads large kernel calls may use (results never depend on it)."""
    threads = _as_int(num_threads, "num_threads", "a positive int", 1)
    if threads > _INT32_MAX:  # the core counts threads in an int
        raise ValueError(f"num_threads: must be < 2**31, got {threads}")
    _core.set_num_threads(threads)


def get_num_threads() -> int:
    """How many threads large kernel calls may use (default: the machine's hardware threads)."""
    return int(_core.get_num_threads())


# --------------------------------------------------------------------------------------------------------
# Token sequences: the ONNX models' per-step bookkeeping, one core call each (host arrays; the core checks
# every dtype, layout and size, and names the argument it refuses)
# --------------------------------------------------------------------------------------------------------

SCORE_KINDS: tuple[str, ...] = ("log_value", "prob", "logit")  # the core's ScoreKind enum


def append_tokens(
    tokens: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
    finished: npt.NDArray[np.bool_],
    new_tokens: npt.NDArray[np.int64],
    active: npt.NDArray[np.bool_],
    stop_ids: npt.NDArray[np.int64],
    max_length: int,
) -> tuple[npt.NDArray[np.bool_], int]:
    """Grow every ``active`` trajectory by one token, in place: ``tokens[..., lengths] = new_tokens``,
    ``lengths += 1``, and ``finished`` set where a trajectory reaches ``max_length`` tokens or its new token
    is one of ``stop_ids``.

    ``tokens`` is ``lengths.shape + (capacity,)``; ``finished``, ``new_tokens`` and ``active`` have
    ``lengths``' size; all C-contiguous (int64, bool). An active trajectory already ``min(capacity,
    max_length)`` long is an error, raised before anything is written. Returns ``(still, count)``: the
    trajectories active and not finished afterwards (``lengths``' shape) and how many there are.
    """
    limit = _as_int(max_length, "max_length", "a token count >= 1 (an int)", 1)
    still, count = _core.append_tokens(tokens, lengths, finished, new_tokens, active, stop_ids, limit)
    return still, int(count)


def decode_inputs(
    mask: npt.NDArray[np.int64], still: npt.NDArray[np.bool_], new_tokens: npt.NDArray[np.int64], pad: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The inputs of one cached decoding step for a left-padded batch with attention ``mask`` ``(rows,
    width)`` so far: ``(input_ids, attention_mask, position_ids)`` of shapes ``(rows, 1)``, ``(rows, width +
    1)``, ``(rows, 1)``.

    Row ``r`` is fed ``new_tokens[r]`` where ``still[r]``, else ``pad`` (masked: the row sits out); its mask
    gains ``still[r]``; its position is the number of ones (nonzero entries) in ``mask[r]``, so left padding
    and masked steps never shift positions.
    """
    pad_id = _as_int(pad, "pad", "a token id (an int)")
    input_ids, attention_mask, position_ids = _core.decode_inputs(mask, still, new_tokens, pad_id)
    return input_ids, attention_mask, position_ids


def decode_inputs_right_padded(
    mask: npt.NDArray[np.int64], still: npt.NDArray[np.bool_], new_tokens: npt.NDArray[np.int64], pad: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """[`decode_inputs`][tiltsmc.core.decode_inputs] for a right-padded batch (attention that reads each
    row's length from its mask, such as ONNX Runtime's ``GroupQueryAttention``): ``(input_ids,
    attention_mask, position_ids, next_mask)``, the masks ``(rows, width + 1)``.

    With ``length[r]`` the number of nonzero entries of ``mask[r]``: row ``r`` is fed ``new_tokens[r]``
    where ``still[r]``, else ``pad``; the session's ``attention_mask`` is one on the row's first
    ``length[r] + 1`` columns (the graph writes the row's next column whether or not it is fed), the mask
    kept after the step (``next_mask``) on its first ``length[r] + still[r]``; the position is
    ``length[r]``.
    """
    pad_id = _as_int(pad, "pad", "a token id (an int)")
    ids, feed_mask, positions, next_mask = _core.decode_inputs_right_padded(mask, still, new_tokens, pad_id)
    return ids, feed_mask, positions, next_mask


def right_padded_prefixes(
    prompt_ids: npt.NDArray[np.int64],
    prompt_offsets: npt.NDArray[np.int64],
    tokens: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
    selected: Optional[npt.NDArray[np.int64]] = None,
    pad: int = 0,
    with_positions: bool = False,
) -> tuple[
    npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], Optional[npt.NDArray[np.int64]]
]:
    """A scoring model's batch: each particle's prompt followed by its generated tokens, right-padded.

    Prompt ``b`` is ``prompt_ids[prompt_offsets[b]:prompt_offsets[b + 1]]``; particle ``p = b * N + i`` of
    ``tokens`` ``(B, N, capacity)`` has generated ``tokens[b, i, :lengths[b, i]]``. Row ``r`` of the batch is
    particle ``selected[r]`` (default: every particle in order). Returns ``(ids, attention_mask, last,
    position_ids)``: ``(rows, width)`` ids padded with ``pad`` to the longest row, its mask (1 on tokens),
    each row's last token index, and (``with_positions``) position ids ``0 .. length - 1`` continued with
    ``length - 1`` over the padding, else None.
    """
    pad_id = _as_int(pad, "pad", "a token id (an int)")
    ids, mask, last, positions = _core.right_padded_prefixes(
        prompt_ids, prompt_offsets, tokens, lengths, selected, pad_id, bool(with_positions)
    )
    return ids, mask, last, positions


def read_log_values(
    scores: np.ndarray,
    rows: int,
    columns: Optional[npt.NDArray[np.int64]] = None,
    kind: Literal["log_value", "prob", "logit"] = "log_value",
) -> npt.NDArray[np.float64]:
    """``log Vh`` per row from a scoring model's output ``scores`` (C-contiguous float32 / float64, read as
    ``rows`` rows of ``scores.size // rows`` scores), each row read at ``columns[r]`` (default: its last).

    ``kind``: ``"log_value"`` takes the score, ``"prob"`` its log (scores must lie in [0, 1]), ``"logit"``
    ``log sigmoid(s) = -log(1 + exp(-s))`` (bit for bit numpy's ``-logaddexp(0, -s)``). Every value returned
    is finite or ``-inf``: NaN scores, and ``+inf`` read as a log-value, raise ``ValueError`` naming the row.
    """
    code = _SCORE_KIND_CODES.get(kind) if isinstance(kind, str) else None
    if code is None:
        raise ValueError(f"kind: expected one of {', '.join(SCORE_KINDS)}, got {kind!r}")
    count = _as_int(rows, "rows", "a row count >= 1 (an int)", 1)
    return _core.read_log_values(scores, count, columns, code)


_SCORE_KIND_CODES = {name: code for code, name in enumerate(SCORE_KINDS)}


# --------------------------------------------------------------------------------------------------------
# Device arrays: the same checks as above, then tiltsmc._cuda on raw pointers
# --------------------------------------------------------------------------------------------------------


def _either_on_device(a: object, b: object) -> bool:
    return (type(a) is not np.ndarray and _device.is_device_array(a)) or (
        type(b) is not np.ndarray and _device.is_device_array(b)
    )


def _device_argument(
    value: object, name: str, other: str, other_view: Optional[_device.DeviceView] = None
) -> Any:
    """The DeviceView of ``value``, refusing a host array beside a device one (naming both arguments)."""
    if not _device.is_device_array(value):
        where = f"CUDA device {other_view.device}" if other_view is not None else "a CUDA device"
        raise ValueError(
            f"{name}: a host array, but {other} is on {where}; pass both on one device "
            "(copy with cupy.asarray / torch.as_tensor, or .get() / .cpu())"
        )
    return _device.device_view(value, name)


def _pointer(array: Any) -> int:
    return int(array.__cuda_array_interface__["data"][0])


def _device_log_weights(logw: object, name: str) -> tuple[_device.DeviceView, int, int, bool]:
    """The checks of ``_as_log_weights`` for a device array (which is never converted or copied)."""
    view = _device.device_view(logw, name)
    kind = view.dtype.char
    if kind not in "fd" or not view.dtype.isnative:
        hint = " (convert float16 to float32 first)" if kind == "e" else ""
        raise TypeError(f"{name}: expected float32 or float64 log-weights, got dtype {view.dtype}{hint}")
    ndim = len(view.shape)
    if ndim != 1 and ndim != 2:
        raise ValueError(f"{name}: expected shape (N,) or (B, N), got {ndim}-D shape {view.shape}")
    rows, n = (1, view.shape[0]) if ndim == 1 else view.shape
    if n == 0:
        raise ValueError(f"{name}: rows must hold at least one particle, got shape {view.shape}")
    return view, rows, n, ndim == 1


def _log_normalize_device(
    logw: object, allow_zero_rows: bool, normalised: bool, stream: Any
) -> tuple[Any, Any, Any]:
    view, rows, n, one_row = _device_log_weights(logw, "logw")
    cuda = _device.require_cuda()
    handle = _device.stream_handle(stream, view)
    out = _device.empty_like_kind(view, (rows, n), view.dtype, handle) if normalised else None
    log_mean_w = _device.empty_like_kind(view, (rows,), np.float64, handle)
    ess = _device.empty_like_kind(view, (rows,), np.float64, handle)
    cuda.log_normalize(
        view.pointer,
        rows,
        n,
        view.dtype.char == "d",
        allow_zero_rows,
        _pointer(out) if out is not None else 0,
        _pointer(log_mean_w),
        _pointer(ess),
        view.device,
        handle,
    )
    if one_row:
        return (out.reshape(n) if out is not None else None), log_mean_w.reshape(()), ess.reshape(())
    return out, log_mean_w, ess


def _smc_step_device(
    log_w: object, ess_threshold: float, scheme: object, rng: RNGLike, stream: Any, check: bool
) -> Any:
    view = _device.device_view(log_w, "log_w")
    if len(view.shape) != 2 or view.dtype.char not in "fd" or not view.dtype.isnative:
        raise TypeError("log_w: expected a 2-D float32 or float64 array")
    if view.readonly:
        raise ValueError("log_w: must be C-contiguous and writeable (resampled rows are reset in place)")
    rows, n = view.shape
    if n == 0:
        raise ValueError(f"log_w: rows must hold at least one particle, got shape {view.shape}")
    code, threshold = _step_arguments(scheme, ess_threshold)
    cuda = _device.require_cuda()
    handle = _device.stream_handle(stream, view)
    ancestors = _device.empty_like_kind(view, (rows, n), np.int64, handle)
    resampled = _device.empty_like_kind(view, (rows,), np.bool_, handle)
    log_mean_w = _device.empty_like_kind(view, (rows,), np.float64, handle)
    ess = _device.empty_like_kind(view, (rows,), np.float64, handle)
    unique = _device.empty_like_kind(view, (rows,), np.int64, handle)
    keyed(
        rng,
        lambda key: cuda.smc_step(
            view.pointer,
            rows,
            n,
            view.dtype.char == "d",
            threshold,
            code,
            key,
            _pointer(ancestors),
            _pointer(resampled),
            _pointer(log_mean_w),
            _pointer(ess),
            _pointer(unique),
            view.device,
            handle,
            bool(check),
        ),
    )
    return ancestors, resampled, log_mean_w, ess, unique


def _resample_device(logw: object, code: int, num: Optional[int], rng: RNGLike, stream: Any) -> Any:
    view, rows, n, one_row = _device_log_weights(logw, "logw")
    num = _as_num(num, n)
    cuda = _device.require_cuda()
    handle = _device.stream_handle(stream, view)
    ancestors = _device.empty_like_kind(view, (rows, num), np.int64, handle)
    keyed(
        rng,
        lambda key: cuda.resample(
            view.pointer,
            rows,
            n,
            view.dtype.char == "d",
            code,
            num,
            key,
            _pointer(ancestors),
            view.device,
            handle,
        ),
    )
    return ancestors.reshape(num) if one_row else ancestors


def _pool_select_device(logw: object, rng: RNGLike, stream: Any) -> Any:
    view, rows, n, one_row = _device_log_weights(logw, "logw")
    cuda = _device.require_cuda()
    handle = _device.stream_handle(stream, view)
    index = _device.empty_like_kind(view, (rows,), np.int64, handle)
    log_mean_w = _device.empty_like_kind(view, (rows,), np.float64, handle)
    keyed(
        rng,
        lambda key: cuda.pool_select(
            view.pointer,
            rows,
            n,
            view.dtype.char == "d",
            key,
            _pointer(index),
            _pointer(log_mean_w),
            view.device,
            handle,
        ),
    )
    if one_row:
        return index.reshape(()), log_mean_w.reshape(())
    return index, log_mean_w


def _mh_accept_device(log_z_current: object, log_z_proposed: object, rng: RNGLike, stream: Any) -> Any:
    if _device.is_device_array(log_z_current):
        current = _device.device_view(log_z_current, "log_z_current")
        proposed = _device_argument(log_z_proposed, "log_z_proposed", "log_z_current", current)
    else:
        proposed = _device.device_view(log_z_proposed, "log_z_proposed")
        current = _device_argument(log_z_current, "log_z_current", "log_z_proposed", proposed)
    device = _device.same_device([("log_z_current", current), ("log_z_proposed", proposed)])
    for name, view in (("log_z_current", current), ("log_z_proposed", proposed)):
        if view.dtype != np.float64:
            raise TypeError(f"{name}: expected float64 log-values on the device, got dtype {view.dtype}")
        if len(view.shape) > 1:
            raise ValueError(f"{name}: expected a scalar or shape (B,), got shape {view.shape}")
    if current.shape != proposed.shape:
        raise ValueError(
            f"log_z_proposed: shape {proposed.shape} does not match log_z_current's {current.shape}"
        )
    rows = math.prod(current.shape)
    if rows == 0:
        raise ValueError("log_z_current: expected at least one row, got an empty array")
    cuda = _device.require_cuda()
    handle = _device.stream_handle(stream, current)
    accept = _device.empty_like_kind(current, current.shape, np.bool_, handle)
    keyed(
        rng,
        lambda key: cuda.mh_accept(
            current.pointer, proposed.pointer, rows, key, _pointer(accept), device, handle
        ),
    )
    return accept


def _device_overlap(a: _device.DeviceView, b: _device.DeviceView) -> bool:
    """Whether two C-contiguous device arrays share memory (their byte ranges overlap)."""
    if not (a.nbytes and b.nbytes):
        return False
    return a.pointer < b.pointer + b.nbytes and b.pointer < a.pointer + a.nbytes


def _gather_device(x: object, ancestors: object, out: object, stream: Any) -> Any:
    if _device.is_device_array(x):
        source = _device.device_view(x, "x")
        index = _device_argument(ancestors, "ancestors", "x", source)
    else:
        index = _device.device_view(ancestors, "ancestors")
        source = _device_argument(x, "x", "ancestors", index)
    views = [("x", source), ("ancestors", index)]
    in_place = out is not None and out is x
    target = None
    if out is not None and not in_place:
        target = _device_argument(out, "out", "x", source)
        views.append(("out", target))
    device = _device.same_device(views)
    if index.dtype != np.int64:
        raise TypeError(
            f"ancestors: expected int64 indices on the device, got dtype {index.dtype} (convert with .astype)"
        )
    if len(index.shape) not in (1, 2):
        raise ValueError(f"ancestors: expected shape (M,) or (B, M), got shape {index.shape}")
    one_row = len(index.shape) == 1
    if len(source.shape) < len(index.shape):
        raise ValueError(
            f"x: expected at least {len(index.shape)} dimensions to match ancestors of shape {index.shape}, "
            f"got shape {source.shape}"
        )
    index_rows, num = (1, index.shape[0]) if one_row else index.shape
    shape3 = (1, *source.shape) if one_row else source.shape
    batch, num_particles, trailing = shape3[0], shape3[1], shape3[2:]
    if index_rows != batch:
        raise ValueError(f"ancestors: {index_rows} rows do not match x's {batch} rows")
    if num_particles == 0:
        raise ValueError(f"x: rows must hold at least one particle, got shape {source.shape}")
    out_shape = (*((batch,) if not one_row else ()), num, *trailing)
    row_bytes = source.dtype.itemsize * math.prod(trailing)
    handle = _device.stream_handle(stream, source)
    cuda = _device.require_cuda()
    if in_place:
        if num != num_particles:
            raise ValueError(
                f"out: in-place gather needs as many ancestors as particles, got {num} and {num_particles}"
            )
        if source.readonly:
            raise ValueError("out: in-place gather (out=x) needs a C-contiguous, writeable x")
        result, target_pointer = x, source.pointer
    elif target is None:
        result = _device.empty_like_kind(source, out_shape, source.dtype, handle)
        target_pointer = _pointer(result)
    else:
        if target.shape != out_shape or target.dtype != source.dtype:
            raise ValueError(
                f"out: expected shape {out_shape} and dtype {source.dtype}, "
                f"got {target.shape} and {target.dtype}"
            )
        if target.readonly:
            raise ValueError("out: must be C-contiguous and writeable")
        if (
            target.nbytes
            and source.nbytes
            and (
                target.pointer < source.pointer + source.nbytes
                and source.pointer < target.pointer + target.nbytes
            )
        ):
            raise ValueError("out: overlaps x without being x itself; pass out=x to reorder in place")
        result, target_pointer = out, target.pointer
    written = source if in_place else target
    if written is not None and _device_overlap(index, written):
        raise ValueError(
            "ancestors: shares memory with x, which is reordered in place (pass a copy)"
            if in_place
            else "out: shares memory with ancestors (pass separate arrays)"
        )
    # in_place said outright: an empty x and its fresh output may both report address 0
    cuda.gather(
        source.pointer,
        batch,
        num_particles,
        row_bytes,
        index.pointer,
        num,
        target_pointer,
        in_place,
        device,
        handle,
    )
    return result
