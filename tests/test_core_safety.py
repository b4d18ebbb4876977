"""Memory safety of the core kernels under hostile arguments (issue #16): arguments that share memory, another
thread rewriting the arguments during a call, refused calls that must leave every argument unchanged, and
log-probabilities of extreme logits.

The rule checked for aliasing: a call whose arguments overlap either refuses with a ``ValueError`` naming both
arguments, leaving memory as it was, or gives exactly what the same call on non-overlapping copies gives
(results and the final contents of every argument). Reproducers that crashed the process before the fix run
in a subprocess, so that a regression fails the test instead of killing pytest.
"""

from __future__ import annotations

import math
import pickle
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tiltsmc import _core, core
from tiltsmc._rng import RowStreams

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def run_isolated(code: str, timeout: float = 60.0) -> str:
    """Run ``code`` in a fresh interpreter; fail (not crash) if it dies, and return its standard output."""
    process = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout
    )
    assert process.returncode == 0, (
        f"exit status {process.returncode}\nstdout:\n{process.stdout}\nstderr:\n{process.stderr}"
    )
    return process.stdout


# --------------------------------------------------------------------------------------------------------
# The issue's reproducers (each crashed the process: bus error or segmentation fault)
# --------------------------------------------------------------------------------------------------------

REPRODUCERS = {
    "gather: out overlaps ancestors": (
        """
        buf = np.zeros(128, np.int64); anc = buf[:64].reshape(1, 64)
        out = buf.view(np.float64).reshape(1, 64, 2)
        core.gather(np.full((1, 64, 2), 1e300), anc, out=out)
        """,
        ("out", "ancestors"),
    ),
    "gather in place: ancestors a view of x": (
        """
        x = np.zeros((1, 64, 2), np.int64); anc = x.reshape(-1)[:64].reshape(1, 64); anc[:] = 63
        x[0, 63] = 10**15; core.gather(x, anc, out=x)
        """,
        ("ancestors", "x"),
    ),
    "reorder_in_place: ancestors a view of the array": (
        """
        x = np.zeros((1, 64, 2), np.int64); anc = x.reshape(-1)[:64].reshape(1, 64); anc[:] = 63
        x[0, 63] = 10**15; core.reorder_in_place([x], anc)
        """,
        ("ancestors", "arrays[0]"),
    ),
    "append_tokens: lengths a view of tokens": (
        """
        flat = np.zeros(8, np.int64); tokens = flat.reshape(2, 4); lengths = flat[2:4]; lengths[:] = [3, 2]
        core.append_tokens(tokens, lengths, np.zeros(2, bool), np.array([10**12, 7]), np.ones(2, bool),
                           np.array([-1]), 4)
        """,
        ("lengths", "tokens"),
    ),
}


@pytest.mark.parametrize("case", sorted(REPRODUCERS))
def test_issue_reproducers_refuse_naming_both_arguments(case: str) -> None:
    body, names = REPRODUCERS[case]
    code = (
        "import numpy as np\nfrom tiltsmc import core\ntry:\n"
        + textwrap.indent(textwrap.dedent(body), "    ")
        + "\nexcept ValueError as error:\n    print('refused:', error)\nelse:\n    print('accepted')\n"
    )
    output = run_isolated(code)
    assert output.startswith("refused: "), output
    for name in names:
        assert name in output, (name, output)


def test_gather_with_ancestors_rewritten_by_another_thread() -> None:
    """The issue's race: one thread toggles an ancestor between 0 and 10**13 while another gathers; the
    gather may succeed or refuse, never crash (it did within half a second)."""
    output = run_isolated(
        """
        import threading, time
        import numpy as np
        from tiltsmc import core
        x = np.zeros((1, 1 << 20)); anc = np.zeros((1, 1 << 20), np.int64); stop = False  # GIL released
        def mutate():
            while not stop:
                anc[0, -1] = 10**13; anc[0, -1] = 0
        thread = threading.Thread(target=mutate); thread.start()
        calls = refused = 0; end = time.monotonic() + 0.8
        try:
            while time.monotonic() < end:
                try:
                    core.gather(x, anc)
                except ValueError:
                    refused += 1
                calls += 1
        finally:
            stop = True; thread.join()
        print(calls, refused)
        """
    )
    calls, _ = map(int, output.split())
    assert calls > 0


# --------------------------------------------------------------------------------------------------------
# Every writing kernel, described once: how to make valid arguments, how to call it, what it writes
# --------------------------------------------------------------------------------------------------------

Args = dict[str, np.ndarray]


@dataclass(frozen=True)
class Kernel:
    make: Callable[[np.random.Generator], Args]  # valid arguments, every one its own array
    call: Callable[[Args], Any]
    written: frozenset[str]  # the arguments the call writes
    corrupt: Callable[[np.random.Generator, Args], None]  # makes the arguments invalid (the call must raise)


def _dims(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(1, 4)), int(rng.integers(1, 7))


def _make_gather(rng: np.random.Generator) -> Args:
    b, n = _dims(rng)
    m, k = int(rng.integers(1, 7)), int(rng.integers(1, 4))
    return {
        "x": rng.normal(size=(b, n, k)),
        "ancestors": rng.integers(0, n, (b, m)),
        "out": np.zeros((b, m, k)),
    }


def _make_in_place(rng: np.random.Generator) -> Args:
    b, n = _dims(rng)
    return {"x": rng.normal(size=(b, n, int(rng.integers(1, 12)))), "ancestors": rng.integers(0, n, (b, n))}


def _make_reorder(rng: np.random.Generator) -> Args:
    b, n = _dims(rng)
    return {
        "arrays[0]": rng.normal(size=(b, n, int(rng.integers(1, 12)))),
        "arrays[1]": rng.integers(-5, 5, (b, n)),
        "ancestors": rng.integers(0, n, (b, n)),
    }


def _bad_ancestors(rng: np.random.Generator, args: Args) -> None:
    flat = args["ancestors"].reshape(-1)
    flat[rng.integers(flat.size)] = rng.choice([-1, 10**12, -(2**63), args["ancestors"].shape[-1] + 3])


def _make_padded(rng: np.random.Generator) -> Args:
    """Two batches of (rows, 2 blocks, length, 3) float64, joined left-padded along their length."""
    rows = [int(rng.integers(0, 4)), int(rng.integers(1, 4))]
    lengths = [int(rng.integers(1, 6)), int(rng.integers(0, 6))]
    width = max(lengths[0] - 1, lengths[1])
    return {
        "parts[0]": rng.normal(size=(rows[0], 2, lengths[0], 3)),
        "parts[1]": rng.normal(size=(rows[1], 2, lengths[1], 3)),
        "out": np.zeros((sum(rows), 2, width, 3)),
    }


def _call_padded(a: Args) -> None:
    """The binding itself (``core.concatenate_padded`` allocates its own ``out``): part 0 skips a column,
    padded on the left, then on the right."""
    parts = [a["parts[0]"], a["parts[1]"]]
    for pad_end in (False, True):
        _core.concatenate_padded(parts, [p.shape[2] for p in parts], [1, 0], a["out"], 2, 3 * 8, pad_end)


def _bad_padded_out(rng: np.random.Generator, args: Args) -> None:
    shape = list(args["out"].shape)
    shape[int(rng.integers(0, 3))] += 1
    args["out"] = np.zeros(shape)


def _make_append(rng: np.random.Generator) -> Args:
    rows, capacity = int(rng.integers(1, 6)), int(rng.integers(2, 6))
    return {
        "tokens": rng.integers(0, 9, (rows, capacity)),
        "lengths": rng.integers(0, capacity - 1, rows),
        "finished": rng.random(rows) < 0.3,
        "new_tokens": rng.integers(0, 9, rows),
        "active": rng.random(rows) < 0.8,
        "stop_ids": rng.integers(0, 9, int(rng.integers(0, 3))),
    }


def _bad_lengths(rng: np.random.Generator, args: Args) -> None:
    r = int(rng.integers(args["lengths"].size))
    args["active"][r] = True
    args["lengths"][r] = rng.choice([-1, args["tokens"].shape[1], 10**12])


def _make_reweight(rng: np.random.Generator) -> Args:
    b, n = _dims(rng)
    log_w = rng.normal(size=(b, n))
    return {
        "log_w": log_w,
        "log_v": rng.normal(size=(b, n)),
        "log_v_prev": rng.normal(size=(b, n)),
        "live": rng.random((b, n)) < 0.7,
        "log_total": np.log(np.exp(log_w).sum(axis=1)),
        "log_z": rng.normal(size=b),
        "collapsed": np.zeros(b, bool),
        "increment_se": np.zeros(b),
    }


def _make_reweight_rows(rng: np.random.Generator) -> Args:
    """``smc_reweight``'s arguments with a threshold per row (rows of two runs: ``_reweight_rows``)."""
    args = _make_reweight(rng)
    args["ess_threshold"] = rng.random(args["log_w"].shape[0]) * 1.2
    return args


REWEIGHT_ARRAYS = ("log_w", "log_v", "log_v_prev", "live", "log_total", "log_z", "collapsed")


def _reweight_rows(a: Args) -> Any:
    """The rows of two runs in one call: per-row thresholds and schemes, each run's own stream."""
    rows = a["log_w"].shape[0]
    streams = RowStreams([np.random.default_rng(1), np.random.default_rng(2)], [0, rows // 2, rows])
    schemes = ["multinomial" if r < rows // 2 else "residual" for r in range(rows)]
    arrays = [a[name] for name in REWEIGHT_ARRAYS]
    return core.smc_reweight(
        *arrays,
        a["ess_threshold"],
        schemes,
        rng=streams,
        increment_se=a["increment_se"],
    )


def _bad_log_weight(rng: np.random.Generator, args: Args) -> None:
    name = str(rng.choice([key for key in ("log_w", "log_v", "log_v_prev") if key in args]))
    flat = args[name].reshape(-1)
    k = int(rng.integers(flat.size))
    flat[k] = rng.choice([np.nan, np.inf])
    if "live" in args:
        args["live"].reshape(-1)[k] = True


def _make_step(rng: np.random.Generator) -> Args:
    b, n = _dims(rng)
    return {"log_w": rng.normal(size=(b, n)) * 3}


def _make_decode(rng: np.random.Generator) -> Args:
    rows, width = int(rng.integers(1, 5)), int(rng.integers(0, 5))
    return {
        "mask": rng.integers(0, 2, (rows, width)),
        "still": rng.random(rows) < 0.5,
        "new_tokens": rng.integers(0, 9, rows),
    }


def _make_prefixes(rng: np.random.Generator) -> Args:
    b, n = _dims(rng)
    capacity = int(rng.integers(1, 5))
    prompt_lengths = rng.integers(0, 4, b)
    offsets = np.concatenate([[0], np.cumsum(prompt_lengths)]).astype(np.int64)
    return {
        "prompt_ids": rng.integers(0, 9, int(offsets[-1])),
        "prompt_offsets": offsets,
        "tokens": rng.integers(0, 9, (b, n, capacity)),
        "lengths": rng.integers(0, capacity + 1, (b, n)),
        "selected": rng.integers(0, b * n, int(rng.integers(1, 5))),
    }


def _bad_prefix_index(rng: np.random.Generator, args: Args) -> None:
    name = str(rng.choice(["lengths", "selected"]))
    flat = args[name].reshape(-1)
    flat[rng.integers(flat.size)] = rng.choice([-1, 10**12])


def _make_read(rng: np.random.Generator) -> Args:
    rows, width = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    return {"scores": rng.normal(size=(rows, width)), "columns": rng.integers(0, width, rows)}


def _bad_column(rng: np.random.Generator, args: Args) -> None:
    args["columns"][rng.integers(args["columns"].size)] = rng.choice([-1, args["scores"].shape[1], 10**12])


def _make_logits(rng: np.random.Generator) -> Args:
    rows, vocab = int(rng.integers(1, 5)), int(rng.integers(1, 8))
    return {"logits": rng.normal(size=(rows, vocab)) * 5, "where": rng.random(rows) < 0.7}


def _bad_logit(rng: np.random.Generator, args: Args) -> None:
    r = int(rng.integers(args["logits"].shape[0]))
    args["where"][r] = True
    args["logits"][r, rng.integers(args["logits"].shape[1])] = rng.choice([np.nan, np.inf])


KERNELS: dict[str, Kernel] = {
    "gather": Kernel(
        _make_gather,
        lambda a: core.gather(a["x"], a["ancestors"], out=a["out"]),
        frozenset({"out"}),
        _bad_ancestors,
    ),
    "gather_in_place": Kernel(
        _make_in_place,
        lambda a: core.gather(a["x"], a["ancestors"], out=a["x"]),
        frozenset({"x"}),
        _bad_ancestors,
    ),
    "reorder_in_place": Kernel(
        _make_reorder,
        lambda a: core.reorder_in_place([a["arrays[0]"], a["arrays[1]"]], a["ancestors"]),
        frozenset({"arrays[0]", "arrays[1]"}),
        _bad_ancestors,
    ),
    "concatenate_padded": Kernel(_make_padded, _call_padded, frozenset({"out"}), _bad_padded_out),
    "append_tokens": Kernel(
        _make_append,
        lambda a: core.append_tokens(
            a["tokens"], a["lengths"], a["finished"], a["new_tokens"], a["active"], a["stop_ids"], 4
        ),
        frozenset({"tokens", "lengths", "finished"}),
        _bad_lengths,
    ),
    "smc_reweight": Kernel(
        _make_reweight,
        lambda a: core.smc_reweight(
            *[a[name] for name in REWEIGHT_ARRAYS], 0.5, rng=7, increment_se=a["increment_se"]
        ),
        frozenset({"log_w", "log_v_prev", "log_total", "log_z", "collapsed", "increment_se"}),
        _bad_log_weight,
    ),
    "smc_reweight_rows": Kernel(
        _make_reweight_rows,
        _reweight_rows,
        frozenset({"log_w", "log_v_prev", "log_total", "log_z", "collapsed", "increment_se"}),
        _bad_log_weight,
    ),
    "smc_step": Kernel(
        _make_step,
        lambda a: core.smc_step(a["log_w"], 1.0, rng=7, survivors_stay=True),
        frozenset({"log_w"}),
        _bad_log_weight,
    ),
    "decode_inputs": Kernel(
        _make_decode,
        lambda a: core.decode_inputs(a["mask"], a["still"], a["new_tokens"], 0),
        frozenset(),
        lambda rng, a: None,
    ),
    "decode_inputs_right_padded": Kernel(
        _make_decode,
        lambda a: core.decode_inputs_right_padded(a["mask"], a["still"], a["new_tokens"], 0),
        frozenset(),
        lambda rng, a: None,
    ),
    "right_padded_prefixes": Kernel(
        _make_prefixes,
        lambda a: core.right_padded_prefixes(
            a["prompt_ids"], a["prompt_offsets"], a["tokens"], a["lengths"], a["selected"], 0, True
        ),
        frozenset(),
        _bad_prefix_index,
    ),
    "read_log_values": Kernel(
        _make_read,
        lambda a: core.read_log_values(a["scores"], a["scores"].shape[0], a["columns"]),
        frozenset(),
        _bad_column,
    ),
    "sample_logits": Kernel(
        _make_logits,
        lambda a: core.sample_logits(a["logits"], 0.7, 5, where=a["where"]),
        frozenset(),
        _bad_logit,
    ),
}


def outcome(kernel: Kernel, args: Args) -> tuple[Any, Optional[str]]:
    """(result, None) or (None, 'ErrorType: message') of the call."""
    try:
        return kernel.call(args), None
    except (ValueError, TypeError) as error:
        return None, f"{type(error).__name__}: {error}"


def same(a: Any, b: Any) -> bool:
    """Equal to the last bit (arrays: dtype, shape and bytes)."""
    if isinstance(a, tuple) or isinstance(b, tuple):
        return isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return bool(a == b)


def snapshot(args: Args) -> dict[str, bytes]:
    return {name: array.tobytes() for name, array in args.items()}


# --------------------------------------------------------------------------------------------------------
# Aliasing: random overlapping views between every pair of arguments
# --------------------------------------------------------------------------------------------------------

PAIRS = [
    (name, first, second)
    for name, kernel in KERNELS.items()
    for names in [list(kernel.make(np.random.default_rng(0)))]
    for i, first in enumerate(names)
    for second in names[i + 1 :]
]


def overlapping(
    first: np.ndarray, second: np.ndarray, shift: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views of one buffer with the shapes and dtypes of first and second, second starting `shift` bytes
    (a multiple of 8) after first; first's values written, then second's over them."""
    front = first.nbytes + second.nbytes + 16
    buffer = np.zeros(2 * front + first.nbytes + second.nbytes, np.uint8)
    start = front - front % 8
    one = buffer[start : start + first.nbytes].view(first.dtype).reshape(first.shape)
    two = buffer[start + shift : start + shift + second.nbytes].view(second.dtype).reshape(second.shape)
    one[...] = first
    two[...] = second
    return buffer, one, two


@SETTINGS
@given(case=st.sampled_from(PAIRS), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_overlapping_arguments_refused_or_same_as_copies(
    case: tuple[str, str, str], seed: int, data: Any
) -> None:
    name, first, second = case
    kernel = KERNELS[name]
    args = kernel.make(np.random.default_rng(seed))
    a, b = args[first], args[second]
    if a.nbytes == 0 or b.nbytes == 0:
        return
    low, high = -((b.nbytes - 1) // 8), (a.nbytes - 1) // 8  # every shift in between overlaps
    shift = 8 * data.draw(st.integers(low, high), label="shift / 8")
    buffer, one, two = overlapping(a, b, shift)
    assert np.shares_memory(one, two)
    aliased = dict(args, **{first: one, second: two})
    copies = {key: value.copy() for key, value in aliased.items()}  # the values the call sees, apart
    before = buffer.tobytes()
    result, error = outcome(kernel, aliased)
    if (
        error is not None
        and "ValueError" in error
        and first in error
        and second in error
        and ("shares memory" in error or "overlaps" in error)
    ):
        event("refused")
        assert buffer.tobytes() == before, "a refused call wrote to its arguments"
        return
    event("accepted")
    expected, expected_error = outcome(kernel, copies)
    assert error == expected_error
    assert same(result, expected)
    for key in aliased:
        assert same(aliased[key], copies[key]), f"{key} ends differently from the call on copies"


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_overlap_of_a_written_argument_is_refused(name: str) -> None:
    """Not left to chance: every written argument, made to overlap each other argument, is refused."""
    kernel = KERNELS[name]
    args = kernel.make(np.random.default_rng(5))
    for written in kernel.written:
        for other in args:
            if other == written or args[other].nbytes == 0:
                continue
            _, one, two = overlapping(args[written], args[other], 0)
            if other in kernel.written and one.nbytes == two.nbytes:
                continue  # the same memory twice: reorder_in_place reorders it once (its documented case)
            _, error = outcome(kernel, dict(args, **{written: one, other: two}))
            assert error is not None and error.startswith("ValueError"), (written, other, error)
            assert written in error and other in error, error


class _DevicePointer:
    """A CUDA array interface at a made-up address (never dereferenced: the refusals come first)."""

    def __init__(self, pointer: int, shape: tuple[int, ...], typestr: str) -> None:
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": typestr,
            "data": (pointer, False),
            "strides": None,
            "version": 3,
        }


class _FakeCuda:
    """Stands in for tiltsmc._cuda: every pointer on device 0, and gather calls counted (with whether each
    was in place)."""

    def __init__(self) -> None:
        self.gathers = 0
        self.in_place: list[bool] = []

    def pointer_device(self, pointer: int) -> int:
        return 0

    def gather(self, *args: Any) -> None:
        self.gathers += 1
        self.in_place.append(args[7])


def test_device_gather_refuses_ancestors_overlapping_its_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """The device path has the same rule: out (or x, in place) must not overlap the ancestors, which the GPU
    checks and then reads again while it writes."""
    from tiltsmc import _device

    fake = _FakeCuda()
    monkeypatch.setattr(_device, "require_cuda", lambda: fake)
    base = 1 << 20
    x = _DevicePointer(base, (1, 64, 2), "<f8")  # 1 KiB
    inside_x = _DevicePointer(base + 256, (1, 64), "<i8")
    apart = _DevicePointer(base + 4096, (1, 64), "<i8")
    out_over_apart = _DevicePointer(base + 4096 - 8, (1, 64, 2), "<f8")
    with pytest.raises(ValueError, match="ancestors: shares memory with x"):
        core.gather(x, inside_x, out=x)
    with pytest.raises(ValueError, match="out: shares memory with ancestors"):
        core.gather(x, apart, out=out_over_apart)
    assert fake.gathers == 0
    core.gather(x, apart, out=x)  # no overlap: handed to the kernel
    core.gather(x, apart, out=_DevicePointer(base + 8192, (1, 64, 2), "<f8"))
    assert fake.gathers == 2
    assert fake.in_place == [True, False]


def test_device_gather_of_an_empty_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty batch on the device gathers to an empty result, as on the host, though an empty x and its
    fresh output both report address 0 (as CuPy and PyTorch arrays of no bytes do). Through the real
    tiltsmc._cuda, which needs no device for it; the output is allocated by a stand-in."""
    from tiltsmc import _device

    cuda = pytest.importorskip("tiltsmc._cuda")
    monkeypatch.setattr(_device, "require_cuda", lambda: cuda)
    monkeypatch.setattr(
        _device,
        "empty_like_kind",
        lambda view, shape, dtype, stream: _DevicePointer(0, tuple(shape), np.dtype(dtype).str),
    )
    x = _DevicePointer(0, (0, 5, 3), "<f8")
    fewer = _DevicePointer(0, (0, 2), "<i8")
    assert core.gather(np.zeros((0, 5, 3)), np.zeros((0, 2), dtype=np.int64)).shape == (0, 2, 3)
    assert core.gather(x, fewer).__cuda_array_interface__["shape"] == (0, 2, 3)
    out = _DevicePointer(0, (0, 2, 3), "<f8")
    assert core.gather(x, fewer, out=out) is out
    assert core.gather(x, _DevicePointer(0, (0, 5), "<i8"), out=x) is x
    with pytest.raises(ValueError, match="out: in-place gather needs as many ancestors as particles"):
        core.gather(x, fewer, out=x)


def test_cuda_module_gather_refuses_overlaps_before_touching_the_device() -> None:
    """tiltsmc._cuda.gather called directly (pointers as integers) refuses the same overlaps, before any CUDA
    call: so this runs without a driver or a GPU, wherever the module is built."""
    cuda = pytest.importorskip("tiltsmc._cuda")
    base, rows, n, item = 1 << 20, 1, 64, 16
    cases = {
        (base, base + 256, base): "ancestors: shares memory with x, which is reordered in place",
        (base, base + 4096, base + 4096 - 8): "out: shares memory with ancestors",
        (base, base + 4096, base + 8): "out: overlaps x without being x itself",
    }
    for (x, ancestors, out), message in cases.items():
        with pytest.raises(ValueError, match=message):
            cuda.gather(x, rows, n, item, ancestors, n, out, x == out, 0, 0)
    with pytest.raises(ValueError, match="out: in-place gather needs out to be x"):
        cuda.gather(base, rows, n, item, base + 4096, n, base + 8192, True, 0, 0)
    with pytest.raises(ValueError, match="out: in-place gather needs as many ancestors as particles"):
        cuda.gather(base, rows, n, item, base + 4096, n - 1, base, True, 0, 0)


def test_cuda_module_gather_of_nothing_is_no_device_work() -> None:
    """No rows, or no ancestors per row: nothing to check or write, so tiltsmc._cuda.gather returns before
    any CUDA call (here, without a driver, a CUDA call would raise). Empty arrays may all sit at address 0:
    whether the gather is in place is the in_place argument, not x == out, so an empty x and its fresh
    output at 0 are not taken for an in-place gather with fewer ancestors than particles."""
    cuda = pytest.importorskip("tiltsmc._cuda")
    assert cuda.gather(0, 0, 5, 24, 12345, 2, 0, False, 0, 0) is None  # (0, 5, 3) float64 -> (0, 2, 3)
    assert cuda.gather(0, 0, 5, 24, 12345, 5, 0, True, 0, 0) is None  # in place
    assert cuda.gather(1 << 20, 3, 5, 24, 0, 0, 0, False, 0, 0) is None  # (3, 0) ancestors


# --------------------------------------------------------------------------------------------------------
# Refused calls leave every argument unchanged
# --------------------------------------------------------------------------------------------------------


@SETTINGS
@given(name=st.sampled_from(sorted(KERNELS)), seed=st.integers(0, 2**32 - 1))
def test_refused_call_leaves_arguments_unchanged(name: str, seed: int) -> None:
    kernel = KERNELS[name]
    rng = np.random.default_rng(seed)
    args = kernel.make(rng)
    if rng.random() < 0.8:
        kernel.corrupt(rng, args)
    before = snapshot(args)
    _, error = outcome(kernel, args)
    event("refused" if error else "accepted")
    if error is not None:
        assert snapshot(args) == before, f"refused ({error}) after writing to its arguments"


_NAN_ROW = np.array([[0.0, np.nan, 1.0]])

# Calls that draw a key from ``rng`` and are refused for their values (a NaN log-weight): the refusal comes
# from the core, after the key was drawn.
_REFUSED_DRAWING: dict[str, Callable[[Any], object]] = {
    "resample": lambda rng: core.resample(_NAN_ROW, "systematic", rng=rng),
    "resample multinomial": lambda rng: core.resample(_NAN_ROW, "multinomial", rng=rng),
    "pool_select": lambda rng: core.pool_select(_NAN_ROW, rng=rng),
    "sample_logits": lambda rng: core.sample_logits(_NAN_ROW, 1.0, rng=rng),
    "smc_step": lambda rng: core.smc_step(_NAN_ROW.copy(), 1.0, rng=rng),
    "mh_accept": lambda rng: core.mh_accept([0.0], [np.nan], rng=rng),
    "smc_reweight": lambda rng: core.smc_reweight(
        _NAN_ROW.copy(),
        np.zeros((1, 3)),
        np.zeros((1, 3)),
        np.ones((1, 3), bool),
        np.zeros(1),
        np.zeros(1),
        np.zeros(1, bool),
        0.5,
        rng=rng,
    ),
    "pool_select, RowStreams": lambda rng: core.pool_select(
        np.vstack([np.zeros((1, 3)), _NAN_ROW]), rng=RowStreams([rng, rng], [0, 1, 2])
    ),
    "sample_logits, RowStreams": lambda rng: core.sample_logits(
        np.vstack([np.zeros((1, 3)), _NAN_ROW]), 1.0, rng=RowStreams([rng, rng], [0, 1, 2])
    ),
    "smc_reweight, RowStreams": lambda rng: core.smc_reweight(
        np.vstack([np.zeros((1, 3)), _NAN_ROW]),
        np.zeros((2, 3)),
        np.zeros((2, 3)),
        np.ones((2, 3), bool),
        np.zeros(2),
        np.zeros(2),
        np.zeros(2, bool),
        0.5,
        rng=RowStreams([rng, rng], [0, 1, 2]),
    ),
}

# numpy's default bit generator with a 32-bit half buffered (its state's has_uint32), and the others
_BIT_GENERATORS: dict[str, Callable[[], np.random.BitGenerator]] = {
    "PCG64": lambda: np.random.PCG64(7),
    "PCG64 with a buffered 32-bit half": lambda: _with_half_buffered(np.random.PCG64(7)),
    "PCG64DXSM": lambda: _with_half_buffered(np.random.PCG64DXSM(7)),
    "Philox": lambda: _with_half_buffered(np.random.Philox(7)),
    "SFC64": lambda: np.random.SFC64(7),
    "MT19937": lambda: np.random.MT19937(7),
}


def _with_half_buffered(bit_generator: np.random.BitGenerator) -> np.random.BitGenerator:
    np.random.Generator(bit_generator).integers(0, 10, dtype=np.uint32)
    bit_generator.random_raw(3)  # Philox: a block partly used
    return bit_generator


@pytest.mark.parametrize("bit_generator", sorted(_BIT_GENERATORS))
@pytest.mark.parametrize("call", sorted(_REFUSED_DRAWING))
@pytest.mark.parametrize("given_as", ["Generator", "BitGenerator"])
def test_a_refused_call_leaves_a_callers_generator_where_it_was(
    call: str, bit_generator: str, given_as: str
) -> None:
    """A key drawn for a call the core refuses is undone: the caller's generator (a ``Generator`` or a
    ``BitGenerator``, of every kind numpy has) is in the state it was, and its next draws are the same."""
    bits = _BIT_GENERATORS[bit_generator]()
    rng = np.random.Generator(bits) if given_as == "Generator" else bits
    before = pickle.dumps(bits.state)  # MT19937's holds an array
    with pytest.raises(ValueError, match="NaN"):
        _REFUSED_DRAWING[call](rng)
    assert pickle.dumps(bits.state) == before
    untouched = _BIT_GENERATORS[bit_generator]()
    assert np.array_equal(
        np.random.Generator(bits).integers(0, 2**32, 5, dtype=np.uint32),
        np.random.Generator(untouched).integers(0, 2**32, 5, dtype=np.uint32),
    )


def test_an_accepted_call_still_draws_one_key() -> None:
    """The undo is only for refusals: an accepted call moves the generator by one key, as before."""
    rng, twin = np.random.default_rng(3), np.random.default_rng(3)
    core.resample(np.zeros(4), rng=rng)
    twin.bit_generator.random_raw()
    assert rng.bit_generator.state == twin.bit_generator.state


def test_smc_step_refuses_before_resetting_any_row() -> None:
    """The issue's example: row 1 is resampled (ESS below N), row 0 holds a NaN."""
    log_w = np.array([[np.nan, 0, 0, 0, 0], [0, 0, 0, 0, 3]])
    before = log_w.copy()
    with pytest.raises(ValueError, match="log_w: NaN at row 0, index 0"):
        core.smc_step(log_w, 1.0, rng=1)
    np.testing.assert_array_equal(log_w, before)


def test_smc_reweight_refuses_an_overflowing_update_before_writing() -> None:
    """log_v - log_v_prev overflows to +inf (and to NaN on a -inf log-weight): refused, nothing written."""
    for first_log_w in (0.0, -np.inf):
        args = _make_reweight(np.random.default_rng(3))
        args["log_w"][0, 0] = first_log_w
        args["log_v"][0, 0], args["log_v_prev"][0, 0], args["live"][0, 0] = 1e308, -1e308, True
        before = snapshot(args)
        with pytest.raises(ValueError, match=r"log_w: log_w \+ log_v - log_v_prev is not a log-weight"):
            KERNELS["smc_reweight"].call(args)
        assert snapshot(args) == before


# --------------------------------------------------------------------------------------------------------
# Another thread rewriting index arrays while the kernels run (GIL released: calls doing more than 8 MiB
# of work, kReleaseGilFromBytes in cpp/bindings/common.hpp): refusals, never a crash
# --------------------------------------------------------------------------------------------------------

CONCURRENT = """
import sys, threading, time
import numpy as np
from tiltsmc import core, _core

def hammer(label, array, index, values, call, seconds=0.25):
    if len(sys.argv) > 1 and label not in sys.argv[1:]:  # python -c CONCURRENT label...: those only
        return
    stop = []
    def mutate():
        while not stop:
            for value in values:
                array[index] = value
    thread = threading.Thread(target=mutate)
    thread.start()
    calls = refused = 0
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            try:
                call()
            except ValueError as error:
                assert str(error).split(":")[0] in NAMES, error
                refused += 1
            calls += 1
    finally:
        stop.append(True)
        thread.join()
    print(label, calls, refused)

NAMES = {"ancestors", "lengths", "columns", "selected", "logits", "logw", "log_w"}
n = 1 << 20  # every call below does more than 8 MiB of work: the kernels release the GIL
x = np.zeros((1, n)); anc = np.zeros((1, n), np.int64)
hammer("gather", anc, (0, -1), (10**13, 0, -5), lambda: core.gather(x, anc))
big = np.zeros((2, 64, 32768), np.float32); anc2 = np.zeros((2, 64), np.int64)
hammer("gather_in_place_large_items", anc2, (1, 5), (10**13, 3, -1), lambda: core.gather(big, anc2, out=big))
kv = [np.zeros((1, n, 2)), np.zeros((1, n), np.int8)]
hammer("reorder_in_place", anc, (0, n // 2), (10**13, 0), lambda: core.reorder_in_place(kv, anc))
rows_p = 1 << 16; kvp = np.zeros((1, rows_p, 2, 8, 4), np.float32)  # items of 256 bytes: 2 x 8 columns
anc_p = np.zeros((1, rows_p), np.int64); used_p = np.full((1, rows_p), 8, np.int64)
hammer("reorder_in_place used", used_p, (0, 0), (10**12, -10**12, 3),  # clamped where read
       lambda: _core.reorder_in_place([kvp], anc_p, False, used_p, [3]))
own = np.zeros((1, n), np.int64)
hammer("keep_survivors", own, (0, 7), (10**13, 0, -3), lambda: _core.keep_survivors(own))
rows = n
tokens = np.zeros((rows, 4), np.int64); lengths = np.zeros(rows, np.int64)
def append():
    lengths[:-1] = 0
    core.append_tokens(tokens, lengths, np.zeros(rows, bool), np.zeros(rows, np.int64), np.ones(rows, bool),
                       np.array([-1]), 4)
hammer("append_tokens", lengths, -1, (10**12, 0, -1), append)
scores = np.zeros((rows, 3)); columns = np.zeros(rows, np.int64)
hammer("read_log_values", columns, -1, (10**12, 1, -7), lambda: core.read_log_values(scores, rows, columns))
b, m = 128, 128
prefix_lengths = np.full((b, m), 16, np.int64); selected = np.arange(4 * b * m, dtype=np.int64) % (b * m)
offsets = np.arange(b + 1, dtype=np.int64); toks = np.zeros((b, m, 16), np.int64); ids = np.zeros(b, np.int64)
hammer("right_padded_prefixes lengths", prefix_lengths, (b - 1, m - 1), (10**12, 8, -1),
       lambda: core.right_padded_prefixes(ids, offsets, toks, prefix_lengths, selected))
hammer("right_padded_prefixes selected", selected, -1, (10**12, 0, -1),
       lambda: core.right_padded_prefixes(ids, offsets, toks, prefix_lengths, selected))
nw = 1 << 20; weights = np.random.default_rng(0).normal(size=(1, nw))
spots = (np.zeros(3, np.int64), np.array([0, nw // 2, nw - 1]))  # three weights rewritten at once
bad = (np.nan, np.inf, 1e308, -np.inf, 700.0, 0.0)
hammer("resample residual (weights)", weights, spots, bad, lambda: core.resample(weights, "residual"),
       seconds=0.4)
hammer("smc_step residual (weights)", weights, spots, bad,
       lambda: core.smc_step(weights, 1.0, "residual"), seconds=0.4)
logits = np.zeros((64, 32768)); where = np.ones(64, bool)
hammer("sample_logits where", where, -1, (False, True),
       lambda: core.sample_logits(logits, 0.5, 1, where=where))
"""


def test_kernels_with_index_arrays_rewritten_by_another_thread() -> None:
    """Each kernel that reads indices, called in a loop while another thread keeps rewriting one of them to
    values out of range and back (about 3 s in all, in a subprocess), and resampling while another thread
    writes NaN, +inf and huge values into the weights: each call succeeds or raises ValueError naming the
    argument, and never reads or writes out of bounds."""
    output = run_isolated(CONCURRENT, timeout=120)
    lines = output.splitlines()
    assert len(lines) == 12, output
    for line in lines:
        assert int(line.split()[-2]) > 0, line


# --------------------------------------------------------------------------------------------------------
# sample_logits: exact log-probabilities for any finite logits and temperature
# --------------------------------------------------------------------------------------------------------


def test_sample_logits_issue_example_is_exactly_zero() -> None:
    index, log_prob = core.sample_logits(np.array([0.0, 1e15]), rng=1)
    assert int(index) == 1 and float(log_prob) == 0.0 and math.copysign(1.0, float(log_prob)) == 1.0


def reference_log_prob(
    logits: np.ndarray, temperature: float, index: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """log softmax(logits / temperature)[index] per row in long double (whose range holds x / T for any
    float64 x and T, and whose 64-bit mantissa is 11 bits finer), and the scale of its rounding error."""
    s = logits.astype(np.longdouble) / np.longdouble(temperature)
    shift = s.max(axis=1, keepdims=True)
    terms = np.exp(s - shift)
    rows = np.arange(s.shape[0])
    d = s[rows, index] - shift[:, 0]
    others = terms.copy()
    others[rows, index] = 0
    log_sum = np.log(terms.sum(axis=1))
    expected = np.where(d == 0, -np.log1p(others.sum(axis=1)), d - log_sum)
    # The kernel works on float64 scores: their rounding (eps/2 of |s|) moves d by eps (|s_v| + |max s|).
    scale = (
        np.abs(s[rows, index]) + np.abs(shift[:, 0]) + logits.shape[1] * np.maximum(log_sum, np.abs(expected))
    )
    return expected, scale


FINITE_ANY = st.floats(allow_nan=False, allow_infinity=False, width=64)


@SETTINGS
@given(
    logits=hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 6)), elements=FINITE_ANY),
    temperature=st.one_of(
        st.floats(1e-300, 1e300), st.sampled_from([1.0, 1e-300, 5e-324, 1e300, 1.7976931348623157e308])
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_sample_logits_exact_for_any_finite_logits(logits: np.ndarray, temperature: float, seed: int) -> None:
    index, log_prob = core.sample_logits(logits, temperature, seed)
    assert np.all(log_prob <= 0.0), log_prob
    assert np.all((index >= 0) & (index < logits.shape[1]))
    expected, scale = reference_log_prob(logits, temperature, index)
    # Where the exact value lies below the float64 range, -inf is its rounding.
    representable = expected >= -np.finfo(np.float64).max
    assert np.all(log_prob[~representable] == -np.inf)
    eps = np.finfo(np.float64).eps
    error = np.abs(log_prob[representable].astype(np.longdouble) - expected[representable])
    assert np.all(error <= 4 * eps * scale[representable] + 1e-300), (log_prob, expected.astype(np.float64))


# --------------------------------------------------------------------------------------------------------
# A fuzzing pass's findings: what each call was handed, and what it must do with it
# --------------------------------------------------------------------------------------------------------


def test_reorder_in_place_refuses_python_objects_in_a_structured_dtype() -> None:
    """Objects inside a structured dtype's fields (kind 'V', not 'O') were copied as bytes, without their
    reference counts: the process crashed once the array was freed. Refused like plain object arrays."""
    output = run_isolated(
        """
        import gc
        import numpy as np
        from tiltsmc import core
        x = np.empty((1, 3), dtype=[("o", object), ("f", np.float64)])
        x["o"][0] = [object(), [1], "s" * 9]
        try:
            core.reorder_in_place([x], np.array([[0, 0, 0]]))
        except TypeError as error:
            print(error)
        del x
        gc.collect()
        """
    )
    assert output.startswith("arrays[0]: holds Python objects"), output


def test_smc_step_refuses_a_byte_swapped_array_it_could_not_reset() -> None:
    """A byte-swapped ``log_w`` was converted to a native copy by the binding, which was reset instead of
    the caller's array: refused, and left as it was."""
    log_w = np.zeros((1, 4), ">f8")
    log_w[0, 0] = 5.0
    before = log_w.copy()
    with pytest.raises(TypeError, match=r"^log_w: expected the machine's byte order"):
        core.smc_step(log_w, 1.0, rng=0)
    assert np.array_equal(log_w, before)


def test_keep_survivors_never_writes_the_callers_memory() -> None:
    """A subclass's array, a buffer or another view of the caller's memory is copied before it is
    rearranged (it was rearranged in place: ``np.asarray`` returns a view of them)."""

    class Tagged(np.ndarray):
        pass

    raw = np.array([[1, 1, 1, 0]])
    expected = np.array([[0, 1, 1, 1]])  # slot 0 is childless: particle 1's extra copy fills it
    for view in (raw.view(Tagged), memoryview(raw), raw[:, :]):
        arranged = core.keep_survivors(view)
        assert np.array_equal(arranged, expected) and np.array_equal(raw, [[1, 1, 1, 0]]), type(view)


def test_arrays_of_an_equivalent_dtype_are_taken() -> None:
    """An unpickled array (as multiprocessing or Ray hands one over) has its own dtype object, equal to
    numpy's: taken, with the same results (it was refused: "expected dtype int64, got int64")."""
    tokens, lengths = np.zeros((3, 4), np.int64), np.array([0, 1, 3])
    finished, new = np.array([False, False, True]), np.array([5, 6, 7])
    copies = [pickle.loads(pickle.dumps(a)) for a in (tokens, lengths, finished, new)]
    assert copies[1].dtype is not lengths.dtype and copies[1].dtype == lengths.dtype
    results = [
        core.append_tokens(*arrays, np.ones(3, bool), np.array([-1]), 4)
        for arrays in ((tokens, lengths, finished, new), copies)
    ]
    assert np.array_equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]
    assert np.array_equal(tokens, copies[0]) and np.array_equal(lengths, copies[1])
    mask = np.ones((2, 3), np.int64)
    plain = core.decode_inputs(mask, np.ones(2, bool), np.ones(2, np.int64), 0)
    unpickled = core.decode_inputs(
        pickle.loads(pickle.dumps(mask)), np.ones(2, bool), np.ones(2, np.int64), 0
    )
    assert all(np.array_equal(a, b) for a, b in zip(plain, unpickled))
    ancestors = np.array([[1, 1, 1, 0]])
    assert np.array_equal(
        core.keep_survivors(pickle.loads(pickle.dumps(ancestors))), core.keep_survivors(ancestors)
    )


def test_weights_rewritten_by_another_thread_never_give_out_of_range_answers() -> None:
    """Another thread writing NaN into one weight and back while the kernels read the row (the GIL
    released: 8 MiB of work): each call refuses (ValueError), or answers as a call on some weights would:
    ancestors in range, a selected index in range with a finite mean weight, an ESS in [1, N]. When the
    NaN was gone by the kernel's second look at the row, its figures were left unset: ancestors came
    back as whatever the output's memory held (heap addresses, -7), 29 calls of 1550."""
    output = run_isolated(
        """
        import threading, time
        import numpy as np
        from tiltsmc import core
        n = 1 << 20
        x = np.zeros((1, n)); stop = []
        def toggle():
            while not stop:
                x[0, 5] = np.nan; x[0, 5] = 0.0
        def check(call):
            np.full(2 * n, -7, np.int64)  # stale bytes where the output will be allocated
            try:
                return call()
            except ValueError:
                return None
        thread = threading.Thread(target=toggle); thread.start()
        bad = calls = 0
        try:
            end = time.monotonic() + 2.0
            while time.monotonic() < end:
                for scheme in ("systematic", "stratified", "multinomial", "residual"):
                    a = check(lambda: core.resample(x, scheme, rng=1))
                    bad += a is not None and not (a.min() >= 0 and a.max() < n)
                picked = check(lambda: core.pool_select(x, rng=1))
                bad += picked is not None and not (0 <= picked[0][0] < n and np.isfinite(picked[1][0]))
                normalised = check(lambda: core.log_normalize(x))
                bad += normalised is not None and not (1.0 <= normalised[2][0] <= n)
                calls += 6
        finally:
            stop.append(True); thread.join()
        print(calls, bad)
        """,
        timeout=120,
    )
    calls, bad = map(int, output.split())
    assert calls > 0 and bad == 0, output


def test_reorder_in_place_keeps_the_unused_columns_of_small_items() -> None:
    """With ``used`` and ``axes``, an item takes its ancestor's used columns and keeps its own after them,
    as documented, small items (64 bytes or less) too: they were copied whole."""
    for width in (4, 64):  # items of 32 and 512 bytes
        a = np.arange(3.0 * width).reshape(1, 3, width)
        before = a.copy()
        core.reorder_in_place([a], np.array([[1, 1, 2]]), used=np.array([[4, 1, 4]]), axes=[2])
        assert np.array_equal(a[0, 0, :1], before[0, 1, :1]) and np.array_equal(a[0, 0, 1:], before[0, 0, 1:])
        assert np.array_equal(a[0, 1:], before[0, 1:])


@pytest.mark.parametrize("threshold", ["0.5", True, None, [0.5, "x"], 1j])
def test_ess_threshold_must_be_real_numbers(threshold: Any) -> None:
    """A string, a bool or None is not a fraction (a string was read as its number, True as 1)."""
    log_w = np.zeros((2, 4))
    with pytest.raises(TypeError, match=r"^ess_threshold: expected a fraction"):
        core.smc_step(log_w, threshold, rng=0)
    with pytest.raises(TypeError, match=r"^ess_threshold: expected a fraction"):
        core.smc_reweight(
            log_w,
            np.zeros((2, 4)),
            np.zeros((2, 4)),
            np.ones((2, 4), bool),
            np.zeros(2),
            np.zeros(2),
            np.zeros(2, bool),
            threshold,
        )


def _token_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``append_tokens``' arrays for two trajectories of capacity 4, both active."""
    return (
        np.zeros((2, 4), np.int64),
        np.zeros(2, np.int64),
        np.zeros(2, bool),
        np.ones(2, np.int64),
        np.ones(2, bool),
        np.array([9]),
    )


def _decode(function: Callable[..., Any], pad: Any) -> Any:
    return function(np.ones((1, 2), np.int64), np.ones(1, bool), np.ones(1, np.int64), pad)


def _prefixes(pad: Any) -> Any:
    return core.right_padded_prefixes(
        np.arange(3), np.array([0, 3]), np.zeros((1, 2, 2), np.int64), np.ones((1, 2), np.int64), pad=pad
    )


INTEGER_ARGUMENTS: dict[str, Callable[[Any], Any]] = {
    "num": lambda value: core.resample(np.zeros(3), num=value, rng=0),
    "max_length": lambda value: core.append_tokens(*_token_arrays(), value),
    "pad": lambda value: _decode(core.decode_inputs, value),
    "pad (right-padded)": lambda value: _decode(core.decode_inputs_right_padded, value),
    "pad (prefixes)": _prefixes,
    "rows": lambda value: core.read_log_values(np.zeros(6), value),
}


@pytest.mark.parametrize(
    ("argument", "value", "error"),
    [
        ("num", 2**63, ValueError),
        ("num", 2**64, ValueError),
        ("max_length", 2**63, ValueError),
        ("max_length", True, TypeError),  # was read as 1
        ("max_length", 2.5, TypeError),
        ("pad", 2**64, ValueError),
        ("pad", 2.7, TypeError),  # was truncated to 2
        ("pad", True, TypeError),
        ("pad (right-padded)", 2.7, TypeError),
        ("pad (right-padded)", -(2**63) - 1, ValueError),
        ("pad (prefixes)", 2**64, ValueError),
        ("pad (prefixes)", 2.7, TypeError),
        ("rows", 2.7, TypeError),  # read 2 rows
        ("rows", True, TypeError),
        ("rows", 2**64, ValueError),
        ("rows", 0, ValueError),
    ],
)
def test_integer_arguments_refuse_bools_non_integers_and_values_beyond_int64_naming_themselves(
    argument: str, value: Any, error: type[Exception]
) -> None:
    """An int argument of the core given a float, a bool or an int beyond int64 is refused with its name
    (pybind11 said "incompatible function arguments" for 2**63 and more; 2.7 and True were truncated)."""
    name = argument.split()[0]
    with pytest.raises(error, match=rf"^{name}: "):
        INTEGER_ARGUMENTS[argument](value)


def test_a_refused_max_length_leaves_the_trajectories_as_they_were() -> None:
    arrays = _token_arrays()
    before = [a.copy() for a in arrays]
    with pytest.raises(TypeError, match=r"^max_length: "):
        core.append_tokens(*arrays, True)
    assert all(np.array_equal(a, b) for a, b in zip(arrays, before))


@pytest.mark.parametrize(
    ("temperature", "error"),
    [
        (np.complex128(1 + 1j), TypeError),
        (1j, TypeError),
        pytest.param(10**400, ValueError, id="10**400"),
        (0, ValueError),
    ],
)
def test_temperature_must_be_a_real_number_a_float_holds(temperature: Any, error: type[Exception]) -> None:
    """A complex temperature lost its imaginary part silently; an int beyond float64 raised an unnamed
    OverflowError; and a refused temperature drew from the generator first."""
    generator = np.random.default_rng(3)
    state = generator.bit_generator.state
    with pytest.raises(error, match=r"^temperature: "):
        core.sample_logits(np.zeros((2, 3)), temperature, generator)
    assert generator.bit_generator.state == state


def test_an_int_threshold_beyond_float64_is_a_fraction_above_one() -> None:
    """``ess_threshold=10**400`` raised an unnamed OverflowError: it resamples every row, as ``inf`` does;
    ``-10**400`` is refused as any negative fraction."""
    log_w = np.zeros((2, 3))
    log_w[:, 0] = 1.0
    assert core.smc_step(log_w.copy(), 10**400, rng=0)[1].all()
    with pytest.raises(ValueError, match=r"^ess_threshold: expected a fraction >= 0"):
        core.smc_step(log_w, -(10**400), rng=0)


@pytest.mark.parametrize(
    ("key", "error"), [(-1, ValueError), (2**64, ValueError), (1.5, TypeError), (True, TypeError)]
)
def test_row_streams_keys_must_be_64_bit_ints(key: Any, error: type[Exception]) -> None:
    """A key outside ``[0, 2**64)`` raised an unnamed OverflowError at the first call; 1.5 became 1."""
    with pytest.raises(error, match=r"^keys\[1\]: "):
        RowStreams([np.random.default_rng(0)] * 2, [0, 1, 2], keys=[7, key])
    largest: Any = np.uint64(2**64 - 1)  # a numpy integer is taken
    assert RowStreams([np.random.default_rng(0)], [0, 1], keys=[largest]).keys == (2**64 - 1,)


@pytest.mark.parametrize(
    ("options", "parts", "error", "message"),
    [
        ({"axis": 2.0}, None, TypeError, r"^axis: "),
        ({"axis": 2 + 0j}, None, TypeError, r"^axis: "),
        ({"axis": True}, None, TypeError, r"^axis: "),  # was read as axis 1
        ({"axis": 2, "skips": ["1", 0]}, None, TypeError, r"^skips\[0\]: "),
        ({"axis": 2, "skips": [1.5, 0]}, None, TypeError, r"^skips\[0\]: "),  # was truncated to 1
        ({"axis": 2, "skips": 5}, None, TypeError, r"^skips: "),
        ({"axis": 1}, [np.zeros((1, 2), "M8[s]"), np.zeros((1, 3), np.int64)], TypeError, r"^parts: dtypes"),
        ({"axis": 1}, [np.array([[b"\xff"]]), np.array([["a"]])], ValueError, r"^parts\[0\]: cannot be"),
    ],
)
def test_concatenate_padded_names_a_bad_axis_skips_or_dtypes(
    options: dict[str, Any], parts: Optional[list[np.ndarray]], error: type[Exception], message: str
) -> None:
    out = np.full((3, 2, 5), 7.0) if parts is None else None
    with pytest.raises(error, match=message):
        core.concatenate_padded(parts or [np.ones((1, 2, 3)), np.ones((2, 2, 5))], out=out, **options)
    assert out is None or (out == 7.0).all()


class _Shaped:
    """Not a numpy array, with a shape."""

    def __init__(self, shape: Any) -> None:
        self.shape = shape


@pytest.mark.parametrize(
    ("entry", "axis", "error", "message"),
    [
        (None, 2**70, ValueError, r"^axes\[0\]: "),  # RuntimeError: Unable to cast
        (None, -(2**70), ValueError, r"^axes\[0\]: "),
        (_Shaped(("a", "b")), None, TypeError, r"^arrays\[1\]: expected a shape of ints"),  # Unable to cast
        (_Shaped((1.0, 3.0)), None, TypeError, r"^arrays\[1\]: expected a shape of ints"),
        (_Shaped((2**70, 3)), None, ValueError, r"^arrays\[1\]: leading axes"),  # Unable to cast
        (_Shaped(None), None, TypeError, r"^arrays\[1\]: expected an array"),
        ([[0, 0, 0]], None, TypeError, r"^arrays\[1\]: expected an array"),  # AttributeError
    ],
)
def test_reorder_in_place_names_an_axis_or_shape_it_cannot_read(
    entry: Any, axis: Optional[int], error: type[Exception], message: str
) -> None:
    x = np.arange(24.0).reshape(1, 3, 4, 2)
    before = x.copy()
    options: dict[str, Any] = {"skip_unwritable": True}
    if axis is not None:
        options.update(used=np.ones((1, 3), np.int64), axes=[axis])
    with pytest.raises(error, match=message):
        core.reorder_in_place([x] if entry is None else [x, entry], np.array([[1, 1, 0]]), **options)
    assert np.array_equal(x, before)


def _reweight_arrays(log_total: float, log_z: float) -> dict[str, Any]:
    return {
        "log_w": np.zeros((2, 4)),
        "log_v": np.zeros((2, 4)),
        "log_v_prev": np.zeros((2, 4)),
        "live": np.ones((2, 4), bool),
        "log_total": np.array([math.log(4), log_total]),
        "log_z": np.array([0.0, log_z]),
        "collapsed": np.zeros(2, bool),
    }


@pytest.mark.parametrize(
    ("name", "value"),
    [("log_total", math.nan), ("log_total", math.inf), ("log_z", math.nan), ("log_z", math.inf)],
)
def test_smc_reweight_refuses_nan_or_plus_inf_in_log_total_or_log_z(name: str, value: float) -> None:
    """``log_total = NaN`` gave ``log_z = NaN`` and ``+inf`` gave ``-inf``, with no error: refused, naming
    the row, before anything is written or drawn."""
    arrays = _reweight_arrays(
        value if name == "log_total" else math.log(4), value if name == "log_z" else 0.0
    )
    before = {key: array.copy() for key, array in arrays.items()}
    generator = np.random.default_rng(4)
    state = generator.bit_generator.state
    with pytest.raises(ValueError, match=rf"^{name}: expected .* got {value} at row 1"):
        core.smc_reweight(**arrays, ess_threshold=0.5, rng=generator)
    assert all(np.array_equal(arrays[key], before[key], equal_nan=True) for key in arrays)
    assert generator.bit_generator.state == state


def test_smc_reweight_takes_minus_inf_log_total_and_log_z() -> None:
    """``-inf`` is a log-quantity (zero: a collapsed row's ``log_z``, a row of zero weight's total)."""
    arrays = _reweight_arrays(-math.inf, -math.inf)
    increment = core.smc_reweight(**arrays, ess_threshold=0.5, rng=0)[4]
    assert increment[0] == 0.0 and increment[1] == -math.inf and arrays["log_z"][1] == -math.inf


@pytest.mark.parametrize("kernel", ["pool_select", "sample_logits"])
def test_row_streams_give_one_dimensional_input_a_scalar_shape_as_a_plain_rng_does(kernel: str) -> None:
    """1-D input is one row: a plain rng returns shape () for it, a RowStreams returned shape (1,)."""
    logits = np.array([0.0, 1.0, 2.0])

    def call(x: np.ndarray, rng: Any) -> tuple[np.ndarray, np.ndarray]:
        if kernel == "pool_select":
            return core.pool_select(x, rng)
        return core.sample_logits(x, 1.0, rng)

    streams = RowStreams([np.random.default_rng(5)], [0, 1])
    index, value = call(logits, streams)
    plain_index, plain_value = call(logits, np.random.default_rng(5))
    assert index.shape == value.shape == plain_index.shape == () and index == plain_index
    assert value == plain_value
    rows = call(logits[None], RowStreams([np.random.default_rng(5)], [0, 1]))
    assert rows[0].shape == (1,) and rows[0][0] == index


# --------------------------------------------------------------------------------------------------------
# Found by review (session 38): lists emptied by another thread, an error path's read, sizes that wrap
# --------------------------------------------------------------------------------------------------------


def test_arrays_dropped_from_their_list_during_a_call_stay_alive_until_it_returns() -> None:
    """``reorder_in_place`` (the caller's own list) and ``concatenate_padded`` (a list handed to the core)
    keep each array alive while the kernel copies with the GIL released (64 MiB each): another thread
    that empties the list meanwhile frees nothing under the kernel, whose results are whole. The binding
    kept raw pointers only: the process died (segmentation fault) on every run.

    The other thread may also empty the list before the call reads it (Python 3.13 switched threads there
    in about one run in five, whatever the switch interval): the call then has nothing to do (no array
    reordered; ``concatenate_padded`` refuses the lengths of its empty list of parts), which tests
    nothing, so such a run is made again, up to 20 times (all 20 so: about 1e-14); a result that is
    neither whole nor untouched fails at once. The reordered array is also handed over with no other
    reference, five times, so that its memory would be freed mid-call (the process dying then)."""
    output = run_isolated(
        """
        import threading
        import numpy as np
        from tiltsmc import _core, core

        def during(call, items):
            started = threading.Event()
            def drop():
                started.wait()
                items.clear()  # once the call has released the GIL, or (now and then) before it starts
            thread = threading.Thread(target=drop); thread.start()
            started.set()
            try:
                return call()
            finally:
                thread.join()

        n, item = 64, 1 << 20
        ancestors = np.arange(n, dtype=np.int64)[::-1].copy().reshape(1, n)

        def reorder():  # True: whole; None: the list was emptied before the call read it
            kv = np.arange(n, dtype=np.uint8).repeat(item).reshape(1, n, item)
            arrays = [kv]
            first = kv[0, :, :1].copy()
            watched = [kv]  # the list handed over holds the only other reference
            del kv
            during(lambda: core.reorder_in_place(arrays, ancestors), arrays)
            if (watched[0][0, :, :1] == first).all():
                return None
            return bool((watched[0][0, :, :1] == first[::-1]).all())

        def concatenate():
            rows, length = 64, 1 << 20
            parts = [np.full((rows, length), 1, np.uint8), np.full((rows, length), 2, np.uint8)]
            out = np.zeros((2 * rows, length), np.uint8)
            try:
                during(lambda: _core.concatenate_padded(parts, [1, 1], [0, 0], out, 1, length, False), parts)
            except ValueError as error:
                if "expected one per part" in str(error):
                    return None
                raise
            return bool((out[:rows] == 1).all() and (out[rows:] == 2).all())

        def reorder_freed():  # the list holds the only reference: emptied mid-call, the array's 64 MiB (an
            # mapping of their own) would be unmapped under the kernel, had the binding not kept it alive
            arrays = [np.arange(n, dtype=np.uint8).repeat(item).reshape(1, n, item)]
            during(lambda: core.reorder_in_place(arrays, ancestors), arrays)
            return True

        for name, attempt in (("reorder", reorder), ("freed", reorder_freed), ("concatenate", concatenate)):
            for _ in range(20 if name != "freed" else 5):  # freed: as many times, whichever came first
                outcome = attempt()
                if outcome is not None and name != "freed":
                    break
            print(name, outcome)
        """,
        timeout=120,
    )
    assert output.split() == ["reorder", "True", "freed", "True", "concatenate", "True"], output


def test_smc_reweight_names_weights_changed_meanwhile_without_reading_before_its_arrays() -> None:
    """``smc_reweight`` with another thread flipping a row's scheme code to an unknown one and back while
    the kernel runs (the GIL released): a call that meets the unknown code says its input changed
    meanwhile, naming ``log_w``. That failure has no index, and the binding read ``log_w[-1]`` and
    ``log_v[-1]`` to find which input held a bad value: with a 0 there, it said "not a log-weight ... at
    row 0, index -1"."""
    output = run_isolated(
        """
        import threading, time
        import numpy as np
        from tiltsmc import _core

        rows, n = 2, 300_000  # rows * n * 33 bytes > 8 MiB: the GIL is released
        schemes = np.zeros(rows, np.uint8); stop = []
        def flip():
            while not stop:
                schemes[0] = 9; schemes[0] = 0  # 9 is no scheme's code
        def after_a_zero(fill):  # the float64 before the array is 0.0, a finite log-weight
            memory = np.zeros(rows * n + 1); memory[1:] = fill
            return memory[1:].reshape(rows, n)
        thread = threading.Thread(target=flip); thread.start()
        changed = wrong = 0
        end = time.monotonic() + 20
        try:
            while time.monotonic() < end and changed + wrong < 3:
                try:
                    _core.smc_reweight(
                        after_a_zero(0.0), after_a_zero(0.0), after_a_zero(0.0), np.ones((rows, n), bool),
                        np.full(rows, np.log(n)), np.zeros(rows), np.zeros(rows, bool), float(np.log(n)), 1.0,
                        0, 7, None, None, None, None, schemes,
                    )
                except ValueError as error:
                    message = str(error)
                    if message.startswith("log_w: changed by another thread during the call"):
                        changed += 1
                    elif not message.startswith("scheme"):  # checked before the kernel, GIL held
                        wrong += 1
                        print(message)
        finally:
            stop.append(True); thread.join()
        print(changed, wrong)
        """,
        timeout=120,
    )
    changed, wrong = map(int, output.splitlines()[-1].split())
    assert wrong == 0 and changed > 0, output


@pytest.mark.parametrize(
    "call",
    [
        "_core.gather(np.zeros(1), np.array([2**36], np.int64), np.zeros(1), 1, 2**61 + 1, 8)",
        "_core.gather(np.zeros(1), np.array([1], np.int64), np.zeros(1), 1, 2**61 + 1, 8)",
        "_core.concatenate_padded([np.zeros((1, 8), np.uint8)], [1], [0], np.zeros((1, 8), np.uint8), "
        "2**61 + 1, 8, False)",
        "_core.concatenate_padded([np.zeros((1, 0), np.uint8)], [0], [0], np.zeros((1, 8), np.uint8), "
        "2**61 + 1, 8, False)",  # no item to read: the padding written over 2**61 + 1 blocks
    ],
)
def test_sizes_whose_product_wraps_around_are_refused(call: str) -> None:
    """The core's byte-size checks on figures Python hands it (rows x particles x item size, and the
    like) are refused where the product does not fit in int64: it wrapped around to the arrays' 8 bytes
    and passed, and the kernel read or wrote far outside them (a segmentation fault, or 8 bytes past the
    array read silently)."""
    output = run_isolated(
        f"""
        import numpy as np
        from tiltsmc import _core
        try:
            {call}
        except ValueError as error:
            print(error)
        """
    )
    assert "byte size" in output, output


def test_smc_reweight_refuses_rows_without_particles_before_any_warning() -> None:
    """``N = 0``: the core's own error, with no numpy warning first (``log 0``, an error of its own
    where warnings are errors)."""
    import warnings

    empty = np.zeros((2, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"log_w: expected shape \(B, N\) with N >= 1"):
            core.smc_reweight(
                empty, empty, empty, np.ones((2, 0), bool), np.zeros(2), np.zeros(2), np.zeros(2, bool), 0.5
            )


def test_reorder_in_place_reads_a_copy_of_the_list_it_is_given() -> None:
    """An entry's ``shape`` (read for a skipped entry, inside the core's loop) that appends arrays to the
    caller's list changes nothing the call reads: it reorders what the list held when called. The loop
    read the caller's list, and indexed the axes (counted before it) past their end: a segmentation
    fault."""
    output = run_isolated(
        """
        import numpy as np
        from tiltsmc import core

        arrays = []

        class GrowsTheList:
            reads = 0

            @property
            def shape(self):
                GrowsTheList.reads += 1
                if GrowsTheList.reads == 2:  # the core's read (the first is core.py's own check)
                    arrays.extend(np.zeros((1, 2, 4)) for _ in range(64))
                return (1, 2, 4)

        kept = np.arange(8.0).reshape(1, 2, 4)
        arrays += [GrowsTheList(), kept]
        skipped = core.reorder_in_place(
            arrays, np.array([[1, 0]]), skip_unwritable=True, used=np.full((1, 2), 4), axes=[None, 2]
        )
        print(skipped, len(arrays), kept[0, 0].tolist())
        """
    )
    assert output.strip() == "[0] 66 [4.0, 5.0, 6.0, 7.0]", output


# --------------------------------------------------------------------------------------------------------
# The bindings called directly (tiltsmc._core): the checks that tiltsmc.core makes first are made there too
# --------------------------------------------------------------------------------------------------------


def test_core_gather_refuses_python_objects_in_x_or_out() -> None:
    """``_core.gather`` copied object arrays (and structured dtypes holding objects) as bytes: pointers
    without references of their own, a use after free once the source was freed. Refused naming the
    argument, as ``reorder_in_place`` and ``concatenate_padded`` refuse them; ``out`` left as it was."""
    output = run_isolated(
        """
        import sys
        import numpy as np
        from tiltsmc import _core

        ancestors = np.zeros((1, 3), np.int64)
        plain = np.zeros((1, 3, 1))
        for dtype in (object, [("o", object), ("f", np.float64)]):
            x = np.empty((1, 3), dtype=dtype)
            x[0, 0] = (object(), 1.0) if x.dtype.names else object()
            item = x[0, 0][0] if x.dtype.names else x[0, 0]
            count = sys.getrefcount(item)
            out = np.empty_like(x)  # None where it holds objects
            for args, name in (((x, out), "x"), ((x, plain), "x"), ((plain, out), "out")):
                try:
                    _core.gather(args[0], ancestors, args[1], 1, 3, x.dtype.itemsize)
                    print("accepted")
                except TypeError as error:
                    print(str(error).startswith(name + ": holds Python objects"))
            empty = out[0, 1][0] if out.dtype.names else out[0, 1]
            print(sys.getrefcount(item) == count, empty is None)
        """
    )
    assert output.split() == ["True"] * 10, output


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda a: np.asfortranarray(a), ValueError),
        (lambda a: a.astype(a.dtype.newbyteorder()), TypeError),
        (lambda a: a.astype(np.int64), TypeError),
        (lambda a: a.astype(np.float16), TypeError),
    ],
    ids=["fortran-order", "byte-swapped", "int64", "float16"],
)
def test_core_smc_step_never_resets_a_converted_copy_of_log_w(
    make: Callable[[np.ndarray], np.ndarray], error: type[Exception]
) -> None:
    """``_core.smc_step`` took ``log_w`` through a converting caster: an array it had to convert (another
    order, byte order or dtype) became a copy, which was reset, while the caller's array was left as it
    was and its rows reported resampled. Refused, naming ``log_w``, and left as it was."""
    log_w = make(np.full((3, 4), -50.0) + np.eye(3, 4) * 50.0)  # every row degenerate: all resampled
    before = log_w.copy()
    with pytest.raises(error, match=r"^log_w: "):
        _core.smc_step(log_w, 1.0, 2, 123, False)
    assert np.array_equal(log_w, before) and log_w.dtype == before.dtype


def test_core_smc_step_resets_the_callers_array() -> None:
    """The arrays ``_core.smc_step`` takes (C-contiguous, native float32 / float64) are reset in place."""
    for dtype in (np.float64, np.float32):
        log_w = (np.full((3, 4), -50.0) + np.eye(3, 4) * 50.0).astype(dtype)
        resampled = _core.smc_step(log_w, 1.0, 2, 123, False)[1]
        assert resampled.all() and not log_w.any()


def test_used_beyond_int64_is_refused_not_wrapped_around() -> None:
    """uint64 ``used`` values from 2**63 were cast to negative int64 ones: ``reorder_in_place`` then copied
    no column at all, and ``concatenate_padded`` reported a negative count the caller never gave."""
    huge = 2**64 - 1
    kv = np.arange(24, dtype=np.float32).reshape(1, 3, 1, 4, 2)
    before = kv.copy()
    with pytest.raises(ValueError, match=f"^used: expected values that fit in int64, got {huge}$"):
        core.reorder_in_place([kv], [[2, 2, 0]], used=np.full((1, 3), huge, np.uint64), axes=[3])
    assert np.array_equal(kv, before)
    out = np.zeros((2, 2))
    with pytest.raises(ValueError, match=f"^used: expected values that fit in int64, got {huge}$"):
        core.concatenate_padded(
            [np.ones((1, 2)), np.ones((1, 1))],
            axis=1,
            padding_side="right",
            used=np.array([huge, 1], np.uint64),
            out=out,
        )
    assert not out.any()
    # the largest int64 is a count like any other (clamped to the width)
    core.reorder_in_place([kv], [[2, 2, 0]], used=np.full((1, 3), 2**63 - 1, np.uint64), axes=[3])
    assert np.array_equal(kv, before[:, [2, 2, 0]])


def test_reorder_in_place_takes_no_pointer_before_the_python_code_it_runs() -> None:
    """With ``skip_unwritable``, the binding read a skipped entry's ``shape`` (Python code) after taking the
    data pointers of the arrays before it: a property that replaced such an array's buffer (``__setstate__``
    frees it) left the kernel writing freed memory, and the array itself not reordered. Every Python-level
    read is now made before any pointer is taken: the array's new buffer is reordered, nothing else
    written."""
    output = run_isolated(
        """
        import numpy as np
        from tiltsmc import _core

        B, N, W = 4, 8, 1 << 16
        big = np.random.default_rng(0).random((B, N, W))  # its own 16 MiB buffer
        fresh = np.random.default_rng(1).random((B, N, W))
        junk = []

        class ReplacesBig:
            @property
            def shape(self):
                big.__setstate__(fresh.__reduce__()[2])  # a new buffer, the old one freed
                junk.append(np.ones(B * N * W))  # may take the freed memory
                return (B, N, 1)

        ancestors = np.tile(np.arange(N)[::-1], (B, 1)).astype(np.int64)
        print(_core.reorder_in_place([big, ReplacesBig()], ancestors, True))
        print(np.array_equal(big, fresh[:, ::-1]), bool((junk[0] == 1).all()))

        class ShrinksBig:
            @property
            def shape(self):
                big.__setstate__(np.ones(3).__reduce__()[2])  # now (3,): no longer (B, N, ...)
                return (B, N, 1)

        big = np.zeros((B, N, W))
        try:
            _core.reorder_in_place([big, ShrinksBig()], ancestors, True)
        except ValueError as error:
            print(error)
        """
    )
    assert output.splitlines() == [
        "[1]",
        "True True",
        "arrays[0]: leading axes do not match the ancestors' (B, N)",
    ], output


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: _core.read_log_values(np.zeros((2, 0)), 2, None, 0), "scores: no score per row (width 0)"),
        (lambda: _core.read_log_values(np.zeros(4), 0, None, 0), "rows: expected at least one row, got 0"),
        (lambda: _core.log_normalize(np.zeros((2, 0)), False), "logw: rows must hold at least one particle"),
        (lambda: _core.row_statistics(np.zeros((2, 0))), "logw: rows must hold at least one particle"),
        (lambda: _core.resample(np.zeros((2, 0)), 0, 1, 0), "logw: rows must hold at least one particle"),
        (lambda: _core.pool_select(np.zeros((2, 0)), 0), "logw: rows must hold at least one particle"),
        (
            lambda: _core.sample_logits(np.zeros((2, 0)), 1.0, 0, None),
            "logits: rows must hold at least one logit",
        ),
        (
            lambda: _core.smc_step(np.zeros((2, 0)), 1.0, 0, 0, False),
            "log_w: rows must hold at least one particle",
        ),
        (
            lambda: _core.keep_survivors(np.zeros((2, 0), np.int64)),
            "ancestors: rows must hold at least one particle",
        ),
    ],
    ids=[
        "read_log_values-width",
        "read_log_values-rows",
        "log_normalize",
        "row_statistics",
        "resample",
        "pool_select",
        "sample_logits",
        "smc_step",
        "keep_survivors",
    ],
)
def test_core_refuses_rows_of_nothing_saying_so(call: Callable[[], Any], message: str) -> None:
    """Rows holding no item reached the kernels, whose refusal read "inconsistent sizes"; the bindings
    now say which argument and what is wrong with it."""
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        call()
