"""Edge cases of the shared helpers: signals held back and raised again (``_files.signals_deferred``),
model paths holding a NUL byte (``models._config.file_problem``), rows no token can be drawn from
(``models.sampling.sample_categorical``), the verifier calls of a twist's initial value
(``models.twist.PolicyTwist``) and the memory a process's cgroups leave it (``_memory._cgroup_room``)."""

from __future__ import annotations

import collections
import os
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
from tiltsmc import _memory
from tiltsmc._files import signals_deferred
from tiltsmc._numeric import logsumexp
from tiltsmc.models import OnnxCausalLM, OnnxRewardModel, PolicyTwist
from tiltsmc.models._config import file_problem, optional_file
from tiltsmc.models.particles import Particles
from tiltsmc.models.sampling import sample_categorical

MODELS = Path(__file__).parent / "fixtures" / "models"
TWIST = MODELS / "gpt2-twist-tiny"

posix_signals = pytest.mark.skipif(
    not hasattr(signal, "SIGHUP") or not hasattr(signal, "pthread_sigmask"), reason="POSIX signals"
)


@pytest.fixture
def recorded_signals() -> Iterator[list[int]]:
    """SIGTERM and SIGHUP recorded by handlers of this process, SIGINT raising KeyboardInterrupt (Python's
    own handler); the handlers before put back after."""
    seen: list[int] = []
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    signal.signal(signal.SIGHUP, lambda signum, frame: seen.append(signum))
    try:
        yield seen
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def arrived(
    seen: list[int],
    expected: Sequence[int],
    raised: tuple[type[BaseException], ...] = (),
    within: float = 10.0,
) -> collections.Counter[int]:
    """The signals ``seen``, once each of ``expected`` has been (``within`` seconds at most). A signal this
    process sends itself while its main thread blocks it goes to another thread (pytest's runs ONNX
    Runtime's), whose C handler may run after the block has ended on a busy machine (seen in CI: SIGTERM
    a few milliseconds late); Python then runs the handler put back, once, all the same (its error, one of
    ``raised``, comes out of the wait here). The tests also wait a moment inside the block, so that a
    SIGINT's KeyboardInterrupt comes out of it."""
    deadline = time.monotonic() + within
    wanted = collections.Counter(expected)
    while any(seen.count(signum) < count for signum, count in wanted.items()) and time.monotonic() < deadline:
        try:
            time.sleep(0.01)
        except raised:
            pass
    return collections.Counter(seen)


@posix_signals
@pytest.mark.parametrize(
    "sent",
    [("SIGINT", "SIGTERM"), ("SIGTERM", "SIGINT"), ("SIGHUP", "SIGINT", "SIGTERM"), ("SIGINT", "SIGHUP")],
)
def test_every_signal_held_back_is_raised_though_sigint_raises(
    sent: tuple[str, ...], recorded_signals: list[int]
) -> None:
    """SIGINT's KeyboardInterrupt, raised again on the way out, stops none of the signals received with it
    (whatever the order they came in): each other one reaches its handler once, then KeyboardInterrupt
    comes out of the block (SIGTERM and SIGHUP after it were lost)."""
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            for name in sent:
                os.kill(os.getpid(), getattr(signal, name))
            time.sleep(0.1)  # their handlers run meanwhile, where the block did not hold them back
            assert recorded_signals == []  # held back
    others = [getattr(signal, name) for name in sent if name != "SIGINT"]
    assert arrived(recorded_signals, others) == collections.Counter(others)


@posix_signals
def test_every_signal_held_back_is_raised_though_each_handler_raises(recorded_signals: list[int]) -> None:
    """Handlers that raise (Ctrl-C's KeyboardInterrupt, the CLI's ``Signalled``) each run, whatever the
    order the signals are recorded in (the kernel's: to the main thread, by number once unblocked; to
    another thread, as sent); the first one's error comes out of the block."""

    class Stop(BaseException):
        pass

    def stop(signum: int, frame: Any) -> None:
        recorded_signals.append(signum)
        raise Stop

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    with pytest.raises((KeyboardInterrupt, Stop)):
        with signals_deferred():
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                os.kill(os.getpid(), signum)
            time.sleep(0.1)
    expected = [signal.SIGTERM, signal.SIGHUP]
    assert arrived(recorded_signals, expected, raised=(Stop,)) == collections.Counter(expected)


@pytest.mark.parametrize("model", [OnnxCausalLM, OnnxRewardModel])
@pytest.mark.parametrize("path", ["foo\x00bar", str(MODELS / "gpt2-tiny" / "mo\x00del.onnx")])
def test_a_model_path_with_a_nul_byte_is_refused_naming_the_argument(model: Any, path: str) -> None:
    """os.stat's bare "embedded null byte" said neither the argument nor the path."""
    with pytest.raises(ValueError, match=r"^path: .* is not a valid path \(a NUL byte\), not a folder"):
        model(path)


def test_a_file_path_with_a_nul_byte_is_not_a_valid_path() -> None:
    assert file_problem(Path("a\x00b")) == "is not a valid path (a NUL byte)"
    with pytest.raises(ValueError, match=r"^config.json: a\x00b/config.json is not a valid path"):
        optional_file(Path("a\x00b") / "config.json", "config.json")


def test_a_tokenizer_path_with_a_nul_byte_is_refused_naming_the_argument() -> None:
    with pytest.raises(ValueError, match=r"^tokenizer: x\x00y is not a valid path \(a NUL byte\)"):
        OnnxCausalLM(MODELS / "gpt2-tiny", tokenizer="x\x00y")


@pytest.mark.parametrize(
    ("row", "what"),
    [
        ([0.0, np.nan, 0.0], "NaN"),
        ([np.nan] * 3, "NaN"),
        ([-np.inf] * 3, "only -inf"),
        ([0.0, 0.0, np.inf], r"\+inf"),
        ([-np.inf, np.inf, np.nan], "NaN"),
    ],
)
def test_a_row_no_token_can_be_drawn_from_is_refused_before_any_draw(row: list[float], what: str) -> None:
    """Such a row gave token 0 (or the +inf's neighbour) silently; refused, naming the row, the generator
    not moved."""
    rng = np.random.default_rng(7)
    before = rng.bit_generator.state
    log_probs = np.array([[0.0, -1.0, -np.inf], row, [0.0] * 3])
    with pytest.raises(ValueError, match=rf"^log_probs\[1\]: the row holds {what} \(no token can be drawn"):
        sample_categorical(log_probs, rng)
    assert rng.bit_generator.state == before
    with pytest.raises(ValueError, match=rf"^log_probs\[0, 1\]: the row holds {what}"):
        sample_categorical(log_probs[None], rng)
    with pytest.raises(ValueError, match=rf"^log_probs: the row holds {what}"):
        sample_categorical(np.array(row), rng)
    assert rng.bit_generator.state == before


def test_rows_of_no_entries_are_refused_and_no_rows_draw_nothing() -> None:
    rng = np.random.default_rng(7)
    before = rng.bit_generator.state
    with pytest.raises(
        ValueError, match=r"^log_probs: expected at least one entry per row, got shape \(2, 0\)"
    ):
        sample_categorical(np.zeros((2, 0)), rng)
    with pytest.raises(ValueError, match=r"^log_probs: expected rows along a last axis, got a scalar"):
        sample_categorical(np.float64(0.0), rng)
    for shape in [(0, 0), (0, 5), (3, 0, 0)]:
        drawn = sample_categorical(np.zeros(shape), rng)
        assert drawn.shape == shape[:-1] and drawn.dtype == np.int64
    assert rng.bit_generator.state == before


def test_usable_rows_still_draw_from_their_law() -> None:
    """-inf entries never drawn; the draws follow the rows' law (a fixed seed)."""
    rng = np.random.default_rng(11)
    inf = np.inf
    log_probs = np.array([[-inf, np.log(0.25), np.log(0.75), -inf], [0.0, -inf, -inf, -inf]])
    drawn = np.stack([sample_categorical(log_probs, rng) for _ in range(4000)])
    assert set(drawn[:, 0].tolist()) == {1, 2} and set(drawn[:, 1].tolist()) == {0}
    assert abs(np.mean(drawn[:, 0] == 2) - 0.75) < 0.03


class CountingVerifier:
    """A verifier whose reward depends on the text, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, prompt: Any, text: str) -> float:
        self.calls += 1
        return (sum(map(ord, text)) % 7 + 1) / 8


def test_a_twists_initial_value_verifies_one_particle_a_prompt() -> None:
    """At the length limit every extension is verified: ``vocab`` calls a prompt for ``log Vh_0``, not a
    particle (8 particles made 8 times the calls); the values are the old computation's, bit for bit, and
    ``log_value`` of the empty prefixes is ``log Vh_0`` at the same cost."""
    policy = OnnxCausalLM(TWIST, value_output="twist", max_new_tokens=1)
    verifier = CountingVerifier()
    twist = PolicyTwist(policy, kind="logit", verifier=verifier)
    particles = policy.start(["10", "7 8"], 8)
    log_v0 = twist.initial_log_value(particles)
    assert verifier.calls == 2 * policy.vocab_size
    verifier.calls = 0
    assert np.array_equal(twist.log_value(particles), np.repeat(log_v0[:, None], 8, axis=1))
    assert verifier.calls == 2 * policy.vocab_size
    log_p = np.asarray(policy.next_log_probs(particles), dtype=np.float64)[:, 0]
    old = logsumexp(log_p + twist.next_log_values(particles)[:, 0])
    assert np.array_equal(log_v0, old)
    assert np.isfinite(log_v0).all()


def test_a_twists_log_value_verifies_only_the_prompts_with_empty_prefixes() -> None:
    """A batch joining a newcomer (empty prefixes) to a run at its length limit (as the engine joins them):
    ``log_value`` computes ``log Vh_0`` for the newcomer alone (one EOS extension verified, not the
    running prompt's ``3 x vocab`` extensions), with the values as before."""
    policy = OnnxCausalLM(TWIST, value_output="twist", max_new_tokens=2)
    verifier = CountingVerifier()
    twist = PolicyTwist(policy, kind="logit", verifier=verifier)
    running = policy.start(["10"], 3)
    policy.append(running, np.array([[5, 6, 7]]))
    newcomer = policy.start(["7 8"], 3)
    joined = Particles.concatenate([running, newcomer])
    expected_running = twist.log_value(running)
    expected_newcomer = twist.initial_log_value(newcomer)
    verifier.calls = 0
    values = twist.log_value(joined)
    assert verifier.calls == len(policy.eos_token_ids)
    assert np.array_equal(values[0], expected_running[0])
    assert np.array_equal(values[1], np.repeat(expected_newcomer, 3))


def write(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def room(root: Path, membership: Optional[str]) -> Optional[int]:
    cgroup = root / "self_cgroup"
    if membership is not None:
        cgroup.write_text(membership)
    return _memory._cgroup_room(str(root / "sys"), str(cgroup))


def test_cgroup_v2_reads_the_process_own_cgroup_and_its_ancestors(tmp_path: Path) -> None:
    """v2: the root cgroup (no memory.max) said nothing of the limit of the process's own cgroup; its
    working set leaves out the inactive page cache; an ancestor's tighter room wins."""
    sys_root = tmp_path / "sys"
    write(sys_root, {"cgroup.controllers": "cpu memory\n"})
    write(
        sys_root / "a",
        {
            "memory.max": "10000\n",
            "memory.current": "6000\n",
            "memory.stat": "anon 2000\nfile 3500\nactive_file 500\ninactive_file 3000\n",
        },
    )
    write(
        sys_root / "a" / "b",
        {"memory.max": "max\n", "memory.current": "5000\n", "memory.stat": "anon 2000\ninactive_file 2000\n"},
    )
    assert room(tmp_path, "0::/a/b\n") == 10000 - (6000 - 3000)
    (sys_root / "a" / "b" / "memory.max").write_text("4000\n")
    assert room(tmp_path, "0::/a/b\n") == 4000 - (5000 - 2000)
    (sys_root / "a" / "b" / "memory.max").write_text("20000\n")
    assert room(tmp_path, "0::/a/b\n") == 7000  # the parent's
    (sys_root / "a" / "memory.stat").write_text("inactive_file 7000\n")  # more than its usage: none used
    assert room(tmp_path, "0::/a\n") == 10000
    (sys_root / "a" / "memory.stat").unlink()  # no statistics: its usage as it is
    assert room(tmp_path, "0::/a\n") == 4000
    assert room(tmp_path, "0::/\n") is None  # the root: no limit
    assert room(tmp_path, "0::/gone\n") is None  # not under this mount: the root's


def test_cgroup_v2_inside_a_namespace_or_a_mounted_container_reads_the_mount(tmp_path: Path) -> None:
    """A cgroup namespace says ``/`` (or ``/..`` for a cgroup outside it); a container's cgroup mounted at
    the root is named by a path not under it: the mount's own files are the process's."""
    sys_root = tmp_path / "sys"
    write(
        sys_root, {"memory.max": "8000\n", "memory.current": "1000\n", "memory.stat": "inactive_file 600\n"}
    )
    for membership in ["0::/\n", "0::/../outside\n", "0::/docker/abc\n"]:
        assert room(tmp_path, membership) == 8000 - 400
    assert _memory._cgroup_room(str(sys_root), str(tmp_path / "absent")) == 7600


def test_cgroup_v1_reads_the_memory_controllers_cgroup(tmp_path: Path) -> None:
    """v1 (with v2 mounted beside it, without the memory controller): the memory controller's line names
    the cgroup (alone or with other controllers); its usage less ``total_inactive_file`` (its
    descendants' too, as its usage counts them)."""
    memory = tmp_path / "sys" / "memory"
    unlimited = f"{(2**63 - 1) // 4096 * 4096}\n"
    write(tmp_path / "sys" / "unified", {"cgroup.controllers": ""})
    write(memory, {"memory.limit_in_bytes": unlimited, "memory.usage_in_bytes": "900000\n"})
    write(
        memory / "process_api" / "id",
        {
            "memory.limit_in_bytes": "8000\n",
            "memory.usage_in_bytes": "6000\n",
            "memory.stat": "cache 2000\ninactive_file 100\ntotal_cache 2000\ntotal_inactive_file 1500\n",
        },
    )
    membership = "5:devices:/\n4:memory:/process_api/id\n1:cpu:/\n0::/\n"
    assert room(tmp_path, membership) == 8000 - (6000 - 1500)
    assert room(tmp_path, "3:cpuacct,memory:/process_api/id\n0::/\n") == 3500
    write(memory / "process_api", {"memory.limit_in_bytes": "5000\n", "memory.usage_in_bytes": "4000\n"})
    assert room(tmp_path, membership) == 1000
    assert room(tmp_path, "4:memory:/\n") is None  # the top: no limit
