"""The CUDA kernels: the same results as the CPU for the same seed, their own properties, and bad input.

Tests marked ``gpu`` need a usable device (``tiltsmc.core.cuda_available()``) and CuPy; elsewhere they are
skipped with the reason. The rest run everywhere: what ``cuda_available`` says, the package without its
CUDA module, and the argument checks that come before any device work (on stand-in device arrays).
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import types
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from tiltsmc import _device, core
from tiltsmc._rng import RowStreams

SCHEMES = ("multinomial", "stratified", "systematic", "residual")
FLOATS = (np.float32, np.float64)
NINF = -np.inf

AVAILABILITY = core.cuda_available()
try:
    import cupy

    CUPY_MISSING = ""
except ImportError as error:  # pragma: no cover - depends on the machine
    cupy = None
    CUPY_MISSING = f"CuPy is not installed ({error})"

SKIP_REASON = (
    f"no usable CUDA device: {AVAILABILITY.reason}" if not AVAILABILITY else CUPY_MISSING or "runs on a GPU"
)
gpu = [pytest.mark.gpu, pytest.mark.skipif(not AVAILABILITY or cupy is None, reason=SKIP_REASON)]


def on_gpu(test: Any) -> Any:
    for mark in gpu:
        test = mark(test)
    return test


# --------------------------------------------------------------------------------------------------------
# Everywhere: availability, the package without tiltsmc._cuda, checks before any device work
# --------------------------------------------------------------------------------------------------------


def test_cuda_available_is_a_flag_with_a_reason() -> None:
    state = core.cuda_available()
    assert isinstance(state, core.CudaAvailability)
    assert bool(state) is state.available
    assert isinstance(state.reason, str) and state.reason
    if not state:
        assert state.device_count == 0 or "code" in state.reason
    assert core.cuda_available() is state  # probed once


@pytest.fixture
def without_cuda_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Hide tiltsmc._cuda as if the package had been built without a CUDA compiler."""
    monkeypatch.setitem(sys.modules, "tiltsmc._cuda", None)
    monkeypatch.setattr(_device, "_cuda_module", None)
    monkeypatch.setattr(_device, "_cuda_import_error", None)
    _device.cuda_available.cache_clear()
    yield
    _device.cuda_available.cache_clear()


class StandIn:
    """An object with a CUDA array interface and no memory behind it (pointer 0): enough for the checks
    that come before a kernel runs, which must never dereference it."""

    def __init__(self, shape: tuple[int, ...], typestr: str = "<f8", strides: Any = None, device: int = 0):
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": typestr,
            "data": (0, False),
            "strides": strides,
            "version": 3,
        }
        self.device = device


def test_package_works_without_its_cuda_module(without_cuda_module: None) -> None:
    state = core.cuda_available()
    assert not state
    assert "built without CUDA" in state.reason
    logw = np.array([[0.0, -1.0, -1.0, NINF]])
    assert core.resample(logw, "systematic", rng=3).shape == (1, 4)
    with pytest.raises(RuntimeError, match="built without CUDA"):
        core.resample(StandIn((2, 4)), rng=3)


def test_import_without_cuda_module_in_a_fresh_process() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["tiltsmc._cuda"] = None
        import numpy as np
        import tiltsmc
        from tiltsmc import core
        state = core.cuda_available()
        assert not state and "built without CUDA" in state.reason, state
        print(core.resample(np.zeros(5), rng=1).tolist())
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[0, 1, 2, 3, 4]"


def test_host_arrays_never_touch_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("the CPU path must not load tiltsmc._cuda")

    monkeypatch.setattr(_device, "load_cuda", refuse)
    monkeypatch.setattr(_device, "require_cuda", refuse)
    logw = np.random.default_rng(0).normal(size=(3, 8))
    core.log_normalize(logw)
    core.row_statistics(logw)
    core.resample(logw, rng=1)
    core.pool_select(logw, rng=1)
    core.mh_accept(np.zeros(3), np.ones(3), rng=1)
    core.gather(logw, np.zeros((3, 8), dtype=np.int64))
    core.smc_step(logw.copy(), 0.5, rng=1)


def test_device_checks_before_any_device_work() -> None:
    with pytest.raises(ValueError, match=r"logw: device arrays must be C-contiguous"):
        core.resample(StandIn((4, 6), strides=(8, 32)))
    with pytest.raises(TypeError, match=r"logw: expected float32 or float64 .*float16"):
        core.log_normalize(StandIn((4, 6), "<f2"))
    with pytest.raises(TypeError, match=r"logw: expected float32 or float64"):
        core.pool_select(StandIn((4, 6), "<i8"))
    with pytest.raises(ValueError, match=r"logw: expected shape \(N,\) or \(B, N\)"):
        core.row_statistics(StandIn((2, 3, 4)))
    with pytest.raises(ValueError, match="at least one particle"):
        core.resample(StandIn((3, 0)))
    with pytest.raises(ValueError, match="scheme: expected one of"):
        core.resample(StandIn((3, 4)), scheme="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"ancestors: a host array, but x is on CUDA device 0"):
        core.gather(StandIn((2, 5, 3)), np.zeros((2, 5), dtype=np.int64))
    with pytest.raises(ValueError, match=r"x: a host array, but ancestors is on CUDA device 0"):
        core.gather(np.zeros((2, 5, 3)), StandIn((2, 5), "<i8"))
    with pytest.raises(ValueError, match=r"ancestors: on CUDA device 1, but x is on device 0"):
        core.gather(StandIn((2, 5, 3)), StandIn((2, 5), "<i8", device=1))
    with pytest.raises(TypeError, match="ancestors: expected int64"):
        core.gather(StandIn((2, 5, 3)), StandIn((2, 5), "<i4"))
    with pytest.raises(ValueError, match="log_z_proposed: a host array"):
        core.mh_accept(StandIn((3,)), np.zeros(3))
    with pytest.raises(TypeError, match="log_z_current: expected float64"):
        core.mh_accept(StandIn((3,), "<f4"), StandIn((3,), "<f4"))
    with pytest.raises(TypeError, match="log_w: expected a 2-D float32 or float64"):
        core.smc_step(StandIn((6,)), 0.5)  # type: ignore[arg-type]


class RecordingCuda:
    """Stands in for tiltsmc._cuda with no device behind it: buffers at made-up addresses, and the stream
    and device of every call recorded (nothing is dereferenced)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        module = self

        class DeviceBuffer:
            next_pointer = 1 << 20

            def __init__(self, nbytes: int, device: int, stream: int) -> None:
                self.ptr, self.nbytes = DeviceBuffer.next_pointer, nbytes
                self.device, self.stream = device, stream
                DeviceBuffer.next_pointer += max(nbytes, 1) + 256
                module.calls.append(("DeviceBuffer", device, stream))

        self.DeviceBuffer = DeviceBuffer

    def pointer_device(self, pointer: int) -> int:
        return 0

    def stream_device(self, stream: int) -> int:
        return 0

    def copy_device(self, target: int, source: int, nbytes: int, device: int, stream: int) -> None:
        self.calls.append(("copy_device", device, stream))

    def resample(self, *args: Any) -> None:
        self.calls.append(("resample", args[-2], args[-1]))

    def pool_select(self, *args: Any) -> None:
        self.calls.append(("pool_select", args[-2], args[-1]))


@pytest.fixture
def recording_cuda(monkeypatch: pytest.MonkeyPatch) -> RecordingCuda:
    fake = RecordingCuda()
    monkeypatch.setattr(_device, "require_cuda", lambda: fake)
    return fake


def test_device_pool_select_refuses_row_streams_before_any_work(recording_cuda: RecordingCuda) -> None:
    """The device kernel has one key for all rows: a RowStreams (each run's rows from its own generator) is
    refused, naming rng, before a key is drawn or anything is allocated or launched."""
    generators = [np.random.default_rng(1), np.random.default_rng(2)]
    states = [g.bit_generator.state for g in generators]
    streams = RowStreams(generators, [0, 1, 2])
    with pytest.raises(ValueError, match="rng: RowStreams are for host arrays"):
        core.pool_select(StandIn((2, 6)), rng=streams)
    assert recording_cuda.calls == []
    assert [g.bit_generator.state for g in generators] == states
    assert len(core.pool_select(np.zeros((2, 6)), rng=streams)[0]) == 2  # host arrays take it


def test_device_array_copies_and_exports_on_its_own_stream(recording_cuda: RecordingCuda) -> None:
    """A DeviceArray made on stream S (the outputs of a call with stream=S) is copied on S, after the work
    that writes it, and its CUDA array interface names S for consumers to wait on; the legacy default stream
    (handle 0) is 1 there (0 is not allowed)."""
    stream = 0x7F00_0000
    array = core.DeviceArray((2, 3), np.float64, 0, stream)
    recording_cuda.calls.clear()
    twins = [array.copy(), copy.deepcopy(array)]
    assert recording_cuda.calls == [("DeviceBuffer", 0, stream), ("copy_device", 0, stream)] * 2
    for shared in (array, array.reshape(3, 2), *twins):
        assert shared.__cuda_array_interface__["stream"] == stream
    assert core.DeviceArray((4,), np.float32, 0).__cuda_array_interface__["stream"] == 1
    assert core.DeviceArray((4,), np.float32, 0, 1).__cuda_array_interface__["stream"] == 1
    assert core.DeviceArray((4,), np.float32, 0, 2).__cuda_array_interface__["stream"] == 2
    recording_cuda.calls.clear()
    core.DeviceArray((0, 3), np.float64, 0, stream).copy()  # nothing to copy
    assert recording_cuda.calls == [("DeviceBuffer", 0, stream)] * 2


class FakeCupyArray:
    """Stands in for a CuPy array (its type's module is cupy) on a given device, at address 0."""

    def __init__(self, shape: tuple[int, ...], dtype: Any, device: int) -> None:
        self.device = types.SimpleNamespace(id=device)
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": np.dtype(dtype).str,
            "data": (0, False),
            "strides": None,
            "version": 3,
        }


FakeCupyArray.__module__ = "cupy._core.core"


def fake_cupy() -> types.ModuleType:
    """A stand-in for the cupy module: a current device, and a current stream per device (handle
    0x1000 + device), as CuPy keeps them."""
    cupy = types.ModuleType("cupy")
    current = [0]

    class Device:
        def __init__(self, device: int) -> None:
            self.id = device

        def __enter__(self) -> Device:
            self.previous, current[0] = current[0], self.id
            return self

        def __exit__(self, *exc: object) -> None:
            current[0] = self.previous

    stream_of_current = lambda: types.SimpleNamespace(ptr=0x1000 + current[0])  # noqa: E731
    cupy.cuda = types.SimpleNamespace(Device=Device, get_current_stream=stream_of_current)  # type: ignore[attr-defined]
    cupy.empty = lambda shape, dtype: FakeCupyArray(tuple(shape), dtype, current[0])  # type: ignore[attr-defined]
    return cupy


def test_default_stream_of_a_cupy_array_is_its_devices(
    recording_cuda: RecordingCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With stream=None a CuPy array runs on CuPy's current stream of the array's device, not of the
    current device (a stream of another device fails the launch)."""
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy())
    for device in (0, 1, 3):
        recording_cuda.calls.clear()
        core.resample(FakeCupyArray((2, 5), np.float64, device), rng=1)
        core.pool_select(FakeCupyArray((2, 5), np.float64, device), rng=1)
        stream = 0x1000 + device
        assert recording_cuda.calls == [("resample", device, stream), ("pool_select", device, stream)]


@pytest.mark.skipif(bool(AVAILABILITY), reason="a usable device is present")
def test_device_array_without_a_usable_device_says_why() -> None:
    with pytest.raises(RuntimeError, match="CUDA kernels are not usable"):
        core.resample(StandIn((2, 4)), rng=1)
    with pytest.raises(RuntimeError, match="CUDA kernels are not usable"):
        core.DeviceArray((3,), np.float64, 0)


# --------------------------------------------------------------------------------------------------------
# On a GPU
# --------------------------------------------------------------------------------------------------------


def dev(x: np.ndarray) -> Any:
    return cupy.asarray(x)


def host(a: Any) -> np.ndarray:
    if isinstance(a, core.DeviceArray):
        return a.get()
    if type(a).__module__.startswith("torch"):
        return np.asarray(a.cpu().numpy())
    return np.asarray(cupy.asnumpy(a))


def exact_log_weights(rng: np.random.Generator, shape: tuple[int, int], dtype: Any) -> np.ndarray:
    """Weights 0 and 1 (log-weights -inf and 0) or all equal: every cumulative sum is exact in any order."""
    logw = np.where(rng.random(shape) < 0.7, 0.0, NINF)
    rows = shape[0]
    logw[np.arange(rows), rng.integers(0, shape[1], rows)] = 0.0  # at least one positive weight per row
    logw[0] = 1.5  # a row of equal weights
    return logw.astype(dtype)


def random_log_weights(rng: np.random.Generator, shape: tuple[int, int], dtype: Any) -> np.ndarray:
    logw = rng.normal(size=shape) * 2.0
    logw[rng.random(shape) < 0.05] = NINF
    logw[:, 0] = 0.0
    return logw.astype(dtype)


def assert_valid_ancestors(ancestors: np.ndarray, logw: np.ndarray, num: int) -> None:
    a, lw = np.atleast_2d(ancestors), np.atleast_2d(logw)
    assert ancestors.dtype == np.int64
    assert a.shape == (lw.shape[0], num)
    assert np.all(a >= 0) and np.all(a < lw.shape[1])
    assert np.all(np.diff(a, axis=1) >= 0), "ancestors must be ascending within a row"
    assert np.all(np.take_along_axis(lw, a, axis=1) > NINF), "a weight-zero particle was chosen"


# Warp per row (N <= 1024), a block per row (<= 32768), many blocks per row (systematic, stratified).
SHAPES = [(1, 5), (300, 64), (7, 1000), (5, 3000), (2, 40000), (1, 2**20 + 17)]


@on_gpu
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_same_ancestors_as_cpu_on_exact_weights(scheme: str, dtype: Any, shape: tuple[int, int]) -> None:
    # a seed of its own per case, the same in every process (hash() of a str is salted per process)
    logw = exact_log_weights(np.random.default_rng(zlib.crc32(repr((scheme, shape)).encode())), shape, dtype)
    for num in (shape[1], shape[1] // 2 + 1, 2 * shape[1] + 3):
        expected = core.resample(logw, scheme, num, rng=11)
        got = host(core.resample(dev(logw), scheme, num, rng=11))
        assert_valid_ancestors(got, logw, num)
        if scheme in ("systematic", "stratified"):
            np.testing.assert_array_equal(got, expected)
        else:
            assert_same_up_to_rounding(got, expected, logw)


def assert_same_up_to_rounding(got: np.ndarray, expected: np.ndarray, logw: np.ndarray) -> None:
    """Multinomial and residual points are sums of exponential spacings scaled by their total, and residual
    weights m w_i - floor(m w_i) are not exact: summed in another order (a parallel scan), a point that
    lies within rounding of a boundary between two particles may fall on the other side. Such a point
    moves to the next positive particle, and it is rare: 1e-5 of the draws is far above the rate of
    ~N * 1e-16 per draw that rounding allows, and far below any real disagreement."""
    differ = np.argwhere(got != expected)
    assert len(differ) <= 1 + got.size // 100_000, f"{len(differ)} of {got.size} ancestors differ"
    for row, j in differ:
        low, high = sorted((int(got[row, j]), int(expected[row, j])))
        between = logw[row, low + 1 : high]
        assert not np.any(between > NINF), f"row {row} slot {j}: {got[row, j]} vs {expected[row, j]}"


@on_gpu
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [*SHAPES, (4096, 16), (1, 2**24)])
def test_nearly_same_ancestors_as_cpu_on_random_weights(
    scheme: str, dtype: Any, shape: tuple[int, int]
) -> None:
    logw = random_log_weights(np.random.default_rng(5), shape, dtype)
    expected = core.resample(logw, scheme, rng=7)
    got = host(core.resample(dev(logw), scheme, rng=7))
    assert_valid_ancestors(got, logw, shape[1])
    same = np.mean(got == expected)
    assert same >= 0.999, f"only {same:.5f} of the ancestors match the CPU's"


@on_gpu
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("num", [8, 5, 13])
def test_unbiased_and_scheme_properties(scheme: str, num: int) -> None:
    w = np.array([0.3, 0.0, 0.05, 0.15, 0.25, 0.01, 0.24, 0.0])
    with np.errstate(divide="ignore"):
        logw = np.tile(np.log(w), (40000, 1))
    a = host(core.resample(dev(logw), scheme, num, rng=np.random.default_rng(1)))
    assert_valid_ancestors(a, logw, num)
    counts = np.stack([np.bincount(r, minlength=8) for r in a])
    sd = np.sqrt(np.maximum(num * w * (1 - w), 0.25) / len(a))
    z = np.abs(counts.mean(axis=0) - num * w) / sd
    assert z.max() < 6, f"mean children {counts.mean(axis=0)} vs {num * w}"
    if scheme == "systematic":
        assert np.all(np.abs(counts - num * w) < 1)
    if scheme == "residual":
        assert np.all(counts >= np.floor(num * w))


@on_gpu
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_log_normalize_and_row_statistics_match_cpu(dtype: Any, shape: tuple[int, int]) -> None:
    logw = random_log_weights(np.random.default_rng(2), shape, dtype)
    if shape[0] > 1:
        logw[-1] = NINF  # a zero row, reported
    expected = core.log_normalize(logw, zero_rows="report")
    got = core.log_normalize(dev(logw), zero_rows="report")
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    assert host(got[0]).dtype == dtype
    for e, g in zip(expected, got):
        np.testing.assert_allclose(host(g), e, rtol=rtol, atol=rtol)
    for e, g in zip(core.row_statistics(logw), core.row_statistics(dev(logw))):
        np.testing.assert_allclose(host(g), e, rtol=1e-12 if dtype == np.float64 else 1e-6)
    one = core.log_normalize(dev(logw[0]))
    assert one[0].shape == (shape[1],) and one[1].shape == () and one[2].shape == ()
    if shape[0] > 1:
        with pytest.raises(ValueError, match=f"logw: every weight of row {shape[0] - 1} is zero"):
            core.log_normalize(dev(logw))


@on_gpu
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1, 1), (2000, 16), (50, 1000), (3, 70000)])
def test_pool_select_matches_cpu(dtype: Any, shape: tuple[int, int]) -> None:
    logw = random_log_weights(np.random.default_rng(3), shape, dtype)
    index, log_mean_w = core.pool_select(logw, rng=5)
    got_index, got_mean = core.pool_select(dev(logw), rng=5)
    assert np.mean(host(got_index) == index) >= 0.999
    np.testing.assert_allclose(host(got_mean), log_mean_w, rtol=1e-12 if dtype == np.float64 else 1e-6)
    chosen = np.take_along_axis(logw, host(got_index)[:, None], axis=1)
    assert np.all(chosen > NINF)


@on_gpu
def test_mh_accept_matches_cpu() -> None:
    rng = np.random.default_rng(4)
    current, proposed = rng.normal(size=20000), rng.normal(size=20000)
    current[:3], proposed[:3] = [NINF, NINF, 0.0], [NINF, 0.0, NINF]
    expected = core.mh_accept(current, proposed, rng=9)
    got = host(core.mh_accept(dev(current), dev(proposed), rng=9))
    assert got.dtype == np.bool_
    assert np.mean(got == expected) >= 0.9999
    assert got[:3].tolist() == [True, True, False]
    assert host(core.mh_accept(dev(np.float64(0.0)), dev(np.float64(1.0)), rng=1)).shape == ()
    bad = proposed.copy()
    bad[17] = np.nan
    with pytest.raises(ValueError, match="log_z_proposed: NaN at row 17"):
        core.mh_accept(dev(current), dev(bad), rng=1)


@on_gpu
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1024, 64), (64, 1000), (6, 3000), (2, 50000)])
@pytest.mark.parametrize("threshold", [0.5, 1.0])
def test_fused_step_matches_cpu(scheme: str, dtype: Any, shape: tuple[int, int], threshold: float) -> None:
    logw = random_log_weights(np.random.default_rng(6), shape, dtype)
    logw[1] = NINF  # collapsed: reported, never resampled
    cpu_w, gpu_w = logw.copy(), dev(logw)
    expected = core.smc_step(cpu_w, threshold, scheme, rng=21)
    got = [host(a) for a in core.smc_step(gpu_w, threshold, scheme, rng=21)]
    ancestors, resampled, log_mean_w, ess, unique = got
    np.testing.assert_array_equal(resampled, expected[1])
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(log_mean_w, expected[2], rtol=rtol)
    np.testing.assert_allclose(ess, expected[3], rtol=rtol)
    assert np.mean(ancestors == expected[0]) >= 0.999
    same_rows = np.all(ancestors == expected[0], axis=1)
    np.testing.assert_array_equal(unique[same_rows], expected[4][same_rows])
    np.testing.assert_array_equal(host(gpu_w), cpu_w)  # resampled rows reset to 0, others untouched
    assert not resampled[1] and log_mean_w[1] == NINF and ess[1] == 0.0
    np.testing.assert_array_equal(
        ancestors[~resampled], np.tile(np.arange(shape[1]), ((~resampled).sum(), 1))
    )
    for r in np.flatnonzero(resampled):
        assert_valid_ancestors(ancestors[r], logw[r], shape[1])


@on_gpu
def test_fused_step_without_check_does_not_raise_and_marks_bad_rows() -> None:
    logw = random_log_weights(np.random.default_rng(8), (16, 64), np.float64)
    logw[3, 5] = np.nan
    with pytest.raises(ValueError, match="log_w: NaN at row 3, index 5"):
        core.smc_step(dev(logw), 1.0, rng=1)
    gpu_w = dev(logw)
    ancestors, resampled, log_mean_w, ess, _ = core.smc_step(gpu_w, 1.0, rng=1, check=False)
    cupy.cuda.get_current_stream().synchronize()
    assert np.isnan(host(log_mean_w)[3]) and np.isnan(host(ess)[3]) and not host(resampled)[3]
    np.testing.assert_array_equal(host(ancestors)[3], np.arange(64))
    assert np.isnan(host(gpu_w)[3, 5])  # the bad row is left as it was
    assert host(resampled)[np.arange(16) != 3].all()


def test_refused_step_on_the_cpu_leaves_its_input_unchanged() -> None:
    logw = random_log_weights(np.random.default_rng(8), (16, 64), np.float64)
    logw[3, 5] = np.nan
    given = logw.copy()
    with pytest.raises(ValueError, match="log_w: NaN at row 3, index 5"):
        core.smc_step(given, 1.0, rng=1)
    np.testing.assert_array_equal(given, logw)  # no row reset: the input is checked before any write


@on_gpu
def test_refused_step_on_the_gpu_leaves_its_input_unchanged() -> None:
    logw = random_log_weights(np.random.default_rng(8), (16, 64), np.float64)
    logw[3, 5] = np.nan
    gpu_w = dev(logw)
    with pytest.raises(ValueError, match="log_w: NaN at row 3, index 5"):
        core.smc_step(gpu_w, 1.0, rng=1)
    got = host(gpu_w)
    changed = sorted({int(r) for r in np.argwhere(~((got == logw) | (np.isnan(got) & np.isnan(logw))))[:, 0]})
    assert not changed, f"rows {changed} of log_w were changed by a call that raised"


@on_gpu
@pytest.mark.parametrize(
    ("x_shape", "dtype", "one_row"),
    [
        ((3, 7), np.float64, False),
        ((5, 9, 2, 3), np.int16, False),
        ((4, 6, 3), np.uint8, False),  # 3-byte items
        ((2, 16, 4, 32, 16), np.float16, False),  # KV cache (B, N, heads, seq, head_dim)
        ((16, 4, 32, 16), np.float32, True),  # KV cache (N, heads, seq, head_dim), ancestors (N,)
        ((8, 40), np.int64, False),  # token buffers
        ((1000, 3), np.int32, True),
    ],
)
def test_gather_matches_numpy(x_shape: tuple[int, ...], dtype: Any, one_row: bool) -> None:
    rng = np.random.default_rng(10)
    x = (rng.normal(size=x_shape) * 100).astype(dtype)
    rows, n = (1, x_shape[0]) if one_row else x_shape[:2]
    candidates = {
        "random": rng.integers(0, n, (rows, n)),
        "sorted": np.sort(rng.integers(0, n, (rows, n)), axis=1),
        "identity": np.tile(np.arange(n), (rows, 1)),
        "cycle": np.tile(np.roll(np.arange(n), 1), (rows, 1)),
    }
    for name, ancestors in candidates.items():
        a = ancestors[0] if one_row else ancestors
        expected = (
            x[a] if one_row else np.take_along_axis(x, a.reshape(a.shape + (1,) * (x.ndim - 2)), axis=1)
        )
        got = host(core.gather(dev(x), dev(a)))
        np.testing.assert_array_equal(got, expected, err_msg=name)
        out = cupy.empty(expected.shape, dtype=dtype)
        assert core.gather(dev(x), dev(a), out=out) is out
        np.testing.assert_array_equal(host(out), expected, err_msg=name)
        in_place = dev(x)
        assert core.gather(in_place, dev(a), out=in_place) is in_place
        np.testing.assert_array_equal(host(in_place), expected, err_msg=f"{name}, in place")
    fewer = rng.integers(0, n, (rows, max(1, n // 2)))
    a = fewer[0] if one_row else fewer
    np.testing.assert_array_equal(host(core.gather(dev(x), dev(a))), reference_gather(x, a))


def reference_gather(x: np.ndarray, a: np.ndarray) -> np.ndarray:
    if a.ndim == 1:
        return x[a]
    return np.take_along_axis(x, a.reshape(a.shape + (1,) * (x.ndim - 2)), axis=1)


@on_gpu
def test_gather_bad_ancestors_raise_and_write_nothing() -> None:
    x = np.arange(2 * 6 * 4, dtype=np.float32).reshape(2, 6, 4)
    for bad, where in [(6, "row 1, index 2"), (-1, "row 1, index 2"), (2**40, "row 1, index 2")]:
        a = np.zeros((2, 6), dtype=np.int64)
        a[1, 2] = bad
        a[1, 4] = bad
        for in_place in (False, True):
            gx = dev(x)
            out = gx if in_place else cupy.full(x.shape, -7.0, dtype=np.float32)
            with pytest.raises(ValueError, match=f"ancestors: index out of range at {where}"):
                core.gather(gx, dev(a), out=out)
            np.testing.assert_array_equal(host(gx), x)
            if not in_place:
                assert np.all(host(out) == -7.0), "nothing is written when an ancestor is bad"
    # the process and the device are fine afterwards
    np.testing.assert_array_equal(
        host(core.gather(dev(x), dev(np.zeros((2, 6), dtype=np.int64))))[:, 3], x[:, [0]][:, 0]
    )


# Items of 256 units or more are copied one block per chunk of 1024 units (16 KiB of 16-byte units); these
# take several chunks per item, the last one short, and not a whole number of 256-unit loads.
@on_gpu
@pytest.mark.parametrize(
    "x_shape",
    [
        (2, 8, 5, 64, 65),  # float16 items of 41600 bytes: 16-byte units, chunks of 1024, 1024 and 552
        (3, 6, 3, 37, 101),  # 22422 bytes: 2-byte units (11211), ten chunks of 1024 and one of 971
    ],
)
def test_gather_of_items_of_several_chunks(x_shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(16)
    x = (rng.normal(size=x_shape) * 100).astype(np.float16)
    rows, n = x_shape[:2]
    candidates = {
        "random": rng.integers(0, n, (rows, n)),
        "sorted": np.sort(rng.integers(0, n, (rows, n)), axis=1),
        "identity": np.tile(np.arange(n), (rows, 1)),
        "cycle": np.tile(np.roll(np.arange(n), 1), (rows, 1)),  # every item saved before it is overwritten
        "one": np.zeros((rows, n), dtype=np.int64),
    }
    for name, a in candidates.items():
        expected = reference_gather(x, a)
        np.testing.assert_array_equal(host(core.gather(dev(x), dev(a))), expected, err_msg=name)
        in_place = dev(x)
        assert core.gather(in_place, dev(a), out=in_place) is in_place
        np.testing.assert_array_equal(host(in_place), expected, err_msg=f"{name}, in place")
    fewer = rng.integers(0, n, (rows, n // 2 + 1))
    np.testing.assert_array_equal(host(core.gather(dev(x), dev(fewer))), reference_gather(x, fewer))


@on_gpu
def test_gather_of_empty_batches_and_items() -> None:
    """Empty arrays report address 0 (CuPy, PyTorch, DeviceArray): an empty batch gathers to an empty
    result as on the host, and items of no bytes still have their ancestors checked."""
    x = np.zeros((0, 5, 3))
    for wrap in (lambda a: a, Foreign):
        got = core.gather(wrap(dev(x)), wrap(dev(np.zeros((0, 2), dtype=np.int64))))
        assert host(got).shape == (0, 2, 3) == core.gather(x, np.zeros((0, 2), dtype=np.int64)).shape
    empty = dev(x)
    assert core.gather(empty, dev(np.zeros((0, 5), dtype=np.int64)), out=empty) is empty
    out = cupy.empty((0, 2, 3))
    assert core.gather(dev(x), dev(np.zeros((0, 2), dtype=np.int64)), out=out) is out
    flat = np.zeros((2, 5, 0), dtype=np.float32)
    good = np.array([[0, 4], [1, 1]], dtype=np.int64)
    assert host(core.gather(dev(flat), dev(good))).shape == (2, 2, 0)
    bad = np.array([[0, 4], [1, 5]], dtype=np.int64)
    with pytest.raises(ValueError, match="ancestors: index out of range at row 1, index 1"):
        core.gather(flat, bad)  # the host's rule
    with pytest.raises(ValueError, match="ancestors: index out of range at row 1, index 1"):
        core.gather(dev(flat), dev(bad))
    bad_in_place = np.tile(np.arange(5), (2, 1))
    bad_in_place[1, 1] = -1
    gpu_flat = dev(flat)
    with pytest.raises(ValueError, match="ancestors: index out of range at row 1, index 1"):
        core.gather(gpu_flat, dev(bad_in_place), out=gpu_flat)


@on_gpu
def test_device_arrays_of_a_stream_copy_and_export_on_it() -> None:
    """Outputs of a call on a non-blocking stream S, not waited for (check=False): DeviceArray.copy and
    deepcopy copy them after the kernel (on S), and consumers of the CUDA array interface wait on S."""
    logw = random_log_weights(np.random.default_rng(17), (4096, 256), np.float64)
    expected = core.smc_step(logw.copy(), 1.0, "systematic", rng=5)
    stream = cupy.cuda.Stream(non_blocking=True)
    takes = (
        lambda a: a.copy().get(),
        lambda a: copy.deepcopy(a).get(),
        lambda a: cupy.asnumpy(cupy.asarray(a)),  # CuPy waits on the interface's stream
    )
    for take in takes:
        gpu_w = dev(logw)
        cupy.cuda.get_current_stream().synchronize()
        outputs = core.smc_step(Foreign(gpu_w), 1.0, "systematic", rng=5, stream=stream, check=False)
        assert all(isinstance(o, core.DeviceArray) for o in outputs)
        assert outputs[0].__cuda_array_interface__["stream"] == stream.ptr
        ancestors, _, log_mean_w, *_ = (take(o) for o in outputs)
        assert np.mean(ancestors == expected[0]) >= 0.999
        np.testing.assert_allclose(log_mean_w, expected[2], rtol=1e-12)
        stream.synchronize()
    on_default = core.resample(Foreign(dev(logw[:3])), rng=1)
    assert on_default.__cuda_array_interface__["stream"] == 1  # the legacy default stream
    np.testing.assert_array_equal(cupy.asnumpy(cupy.asarray(on_default.copy())), on_default.get())


@on_gpu
def test_bad_device_input_raises_clear_errors() -> None:
    logw = random_log_weights(np.random.default_rng(12), (4, 10), np.float64)
    nan, inf = logw.copy(), logw.copy()
    nan[2, 7], inf[1, 3] = np.nan, np.inf
    for kernel in (core.log_normalize, core.row_statistics):
        with pytest.raises(ValueError, match="logw: NaN at row 2, index 7"):
            kernel(dev(nan))
    with pytest.raises(ValueError, match=r"logw: \+inf at row 1, index 3"):
        core.resample(dev(inf), rng=1)
    with pytest.raises(ValueError, match="logw: NaN at row 2, index 7"):
        core.pool_select(dev(nan), rng=1)
    runs = RowStreams([np.random.default_rng(1), np.random.default_rng(2)], [0, 2, 4])
    with pytest.raises(ValueError, match="rng: RowStreams are for host arrays"):
        core.pool_select(dev(logw), rng=runs)
    zero = logw.copy()
    zero[3] = NINF
    with pytest.raises(ValueError, match="logw: every weight of row 3 is zero"):
        core.resample(dev(zero), rng=1)
    with pytest.raises(ValueError, match="device arrays must be C-contiguous"):
        core.resample(dev(np.zeros((4, 20)))[:, ::2], rng=1)
    with pytest.raises(ValueError, match="device arrays must be C-contiguous"):
        core.gather(dev(np.zeros((4, 10, 3)))[:, :, :2], dev(np.zeros((4, 10), dtype=np.int64)))
    with pytest.raises(TypeError, match="ancestors: expected int64"):
        core.gather(dev(np.zeros((4, 10))), dev(np.zeros((4, 10), dtype=np.int32)))
    buffer = dev(np.zeros(60))
    with pytest.raises(ValueError, match="out: overlaps x"):
        core.gather(
            buffer[:40].reshape(4, 10), dev(np.zeros((4, 10), dtype=np.int64)), out=buffer[20:].reshape(4, 10)
        )
    with pytest.raises(ValueError, match="log_w: must be C-contiguous and writeable"):
        read_only = core.DeviceArray((2, 3), np.float64, 0)
        core.smc_step(ReadOnly(read_only), 0.5)
    assert host(core.resample(dev(logw), rng=1)).shape == (4, 10)  # still working


class ReadOnly:
    """A device array seen through a read-only CUDA array interface."""

    def __init__(self, array: Any):
        interface = dict(array.__cuda_array_interface__)
        interface["data"] = (interface["data"][0], True)
        self.__cuda_array_interface__ = interface


class Foreign:
    """A device array from a library tiltsmc does not know: outputs come back as DeviceArray."""

    def __init__(self, array: Any):
        self.array = array
        self.__cuda_array_interface__ = array.__cuda_array_interface__


@on_gpu
def test_outputs_live_beside_the_input() -> None:
    logw = random_log_weights(np.random.default_rng(13), (3, 50), np.float32)
    gpu_logw = dev(logw)
    assert isinstance(core.resample(gpu_logw, rng=1), cupy.ndarray)
    foreign = core.resample(Foreign(gpu_logw), rng=1)
    assert isinstance(foreign, core.DeviceArray) and foreign.shape == (3, 50) and foreign.dtype == np.int64
    np.testing.assert_array_equal(foreign.get(), core.resample(logw, rng=1))
    np.testing.assert_array_equal(cupy.asnumpy(cupy.asarray(foreign)), foreign.get())  # zero-copy view
    normalised, log_mean_w, ess = core.log_normalize(Foreign(gpu_logw[0]))
    assert normalised.shape == (50,) and log_mean_w.shape == () and ess.shape == ()
    assert normalised.reshape(5, -1).shape == (5, 10)
    torch = pytest.importorskip("torch")
    tensor = torch.as_tensor(gpu_logw, device="cuda")
    out = core.resample(tensor, rng=1)
    assert isinstance(out, torch.Tensor) and out.is_cuda and out.dtype == torch.int64
    np.testing.assert_array_equal(out.cpu().numpy(), core.resample(logw, rng=1))


@on_gpu
def test_streams() -> None:
    logw = random_log_weights(np.random.default_rng(14), (500, 64), np.float64)
    expected = core.resample(logw, "stratified", rng=3)
    stream = cupy.cuda.Stream(non_blocking=True)
    gpu_logw = dev(logw)
    cupy.cuda.get_current_stream().synchronize()
    for given in (stream, stream.ptr):
        got = core.resample(gpu_logw, "stratified", rng=3, stream=given)
        stream.synchronize()
        np.testing.assert_array_equal(host(got), expected)
    with stream:  # the current CuPy stream is the default
        got = core.resample(gpu_logw, "stratified", rng=3)
        ancestors, *_ = core.smc_step(dev(logw), 1.0, "stratified", rng=3, check=False)
    stream.synchronize()
    np.testing.assert_array_equal(host(got), expected)
    np.testing.assert_array_equal(host(ancestors), expected)
    with pytest.raises(TypeError, match="stream: expected a CUDA stream"):
        core.resample(gpu_logw, stream="fast")  # type: ignore[arg-type]
    torch = pytest.importorskip("torch")
    torch_stream = torch.cuda.Stream()
    got = core.resample(torch.as_tensor(gpu_logw, device="cuda"), "stratified", rng=3, stream=torch_stream)
    torch_stream.synchronize()
    np.testing.assert_array_equal(got.cpu().numpy(), expected)


@on_gpu
def test_arrays_and_streams_of_another_device() -> None:
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA devices")
    with cupy.cuda.Device(1):
        other = cupy.zeros((2, 5), dtype=np.int64)
        other_stream = cupy.cuda.Stream()
    x = dev(np.zeros((2, 5, 3)))
    with pytest.raises(ValueError, match="ancestors: on CUDA device 1, but x is on device 0"):
        core.gather(x, other)
    with pytest.raises(ValueError, match="stream: belongs to CUDA device 1"):
        core.resample(dev(np.zeros((2, 5))), stream=other_stream)
    # stream=None: CuPy's current stream of the array's device, not that of the current device (0, whose
    # current stream here is one of its own: launched on device 1, it would fail)
    logw = random_log_weights(np.random.default_rng(18), (3, 40), np.float64)
    with cupy.cuda.Device(1):
        on_one = cupy.asarray(logw)
    with cupy.cuda.Stream(non_blocking=True):
        got = core.resample(on_one, "stratified", rng=2)
    assert got.device.id == 1
    np.testing.assert_array_equal(host(got), core.resample(logw, "stratified", rng=2))


@on_gpu
def test_ort_value_on_the_device() -> None:
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider here")
    logw = random_log_weights(np.random.default_rng(15), (4, 32), np.float32)
    try:
        value = ort.OrtValue.ortvalue_from_numpy(logw, "cuda", 0)
    except Exception as error:  # the GPU build on a machine its CUDA does not match
        pytest.skip(f"cannot place an OrtValue on the device: {error}")
    got = core.resample(value, rng=4)
    assert isinstance(got, core.DeviceArray)
    np.testing.assert_array_equal(got.get(), core.resample(logw, rng=4))
