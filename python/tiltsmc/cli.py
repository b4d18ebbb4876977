"""``tiltsmc`` on the command line: ``tiltsmc run`` samples ONNX models with any sampler; ``tiltsmc serve``
serves them over HTTP (:mod:`tiltsmc.serving.server`); ``tiltsmc demo`` compares the samplers on the
bundled reasoning task (see :mod:`tiltsmc.demo`).

Results are JSON lines, one per prompt (samples, texts, log-weights, the log Z estimate, the ESS trace,
timings), written to standard output (no ``--json``, or ``--json -``) or to ``--json PATH``:

* a regular file (new, or one with a single link) is replaced atomically when the run has succeeded: the
  lines go to a temporary file beside it, renamed over it at the end, so a failed or interrupted run
  (Ctrl-C, SIGTERM, SIGHUP) leaves the old file untouched and no temporary file behind; an existing file
  keeps its permission bits (and, where allowed, its owner and group), a new one gets ``0666`` less the
  umask, and a symbolic link stays a link: the file it points to is replaced;
* a regular file with several hard links (or in a folder tiltsmc cannot write) is rewritten in place at
  the end of a successful run, so every link sees the new results;
* a FIFO, a character device (``/dev/null``, a terminal) or ``/dev/stdout`` / ``/dev/stderr`` /
  ``/dev/fd/N`` is written as a stream, batch by batch.

A directory, a missing or unwritable folder and an unwritable file are refused before any model is loaded.
A progress bar goes to standard error on a terminal; piped, the run is quiet apart from a summary line.
Every failure is one line ``tiltsmc: ...`` on standard error with exit status 2 (bad arguments, prompts
or model files) or 1 (the run or the output failed); the environment variable ``TILTSMC_TRACEBACK=1``
shows the traceback of an unexpected error instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any, NoReturn, Optional, TextIO

import numpy as np

from . import core
from .diagnostics import OnlineBellman, online_bellman
from .samplers.result import SamplerResult
from .serving.engine import SAMPLERS as SAMPLER_FUNCTIONS
from .serving.engine import sampler_defaults

SAMPLERS = ("smc", "sp-gsmc", "mh", "best-of-n", "rejection")


class Progress:
    """A one-line progress bar on a terminal; silent when the stream is not one."""

    def __init__(self, total: int, label: str, stream: TextIO = sys.stderr) -> None:
        self.total, self.label, self.stream = total, label, stream
        self.enabled = stream.isatty()
        self.started = time.perf_counter()
        self.update(0)

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * done / max(self.total, 1))
        elapsed = time.perf_counter() - self.started
        self.stream.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {elapsed:6.1f}s"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


class CliError(Exception):
    """A failure reported as one line ``tiltsmc: <message>`` with exit status ``code`` (2: bad input, 1: the
    run or its output failed)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class Signalled(BaseException):
    """SIGTERM or SIGHUP arrived: raised in the main thread so that cleanup runs, then the process ends by
    the same signal (see :func:`main`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


TERMINATING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise :class:`Signalled` (Python's default lets them end the process
    without running ``finally`` blocks, leaving temporary files behind). Only where they would end the
    process (a SIGHUP ignored under ``nohup`` stays ignored, a program's own handler stays), and only in
    the main thread, where Python delivers signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Optional[FrameType]) -> NoReturn:
        raise Signalled(signum)

    previous = {
        signum: signal.signal(signum, handler)
        for signum in TERMINATING_SIGNALS
        if signal.getsignal(signum) == signal.SIG_DFL
    }
    try:
        yield
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back while inside (a few system calls that must not be parted), so
    that their handlers run after it; a no-op where ``pthread_sigmask`` is missing or off the main thread."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, *TERMINATING_SIGNALS}
    previous = mask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, previous)


def _one_line(error: BaseException) -> str:
    """An exception's message on one line (ONNX Runtime's span several)."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


# -- --json: where results go ---------------------------------------------------------------------------

_FD_ALIAS = re.compile(r"^/(?:dev/fd|proc/self/fd)/(\d+)$")
_STD_ALIAS = {"/dev/stdout": 1, "/dev/stderr": 2}


class ResultOutput:
    """Where ``--json`` results go (see the module docstring): :meth:`open` it, :meth:`write` lines, then
    :meth:`commit` after a successful run or :meth:`discard` after a failed one (also after a failed
    :meth:`open`). Opened before the run, so that a bad location is refused before any model is loaded.
    Bad locations raise :class:`CliError` with status 2, write errors with status 1."""

    def __init__(self, spec: Optional[str]) -> None:
        self.spec = spec
        self.name = "standard output" if spec in (None, "-") else str(spec)
        self._stream: Optional[IO[str]] = None  # written batch by batch
        self._owned = False  # the stream is ours to close
        self._temporary: Optional[Path] = None  # atomic: the temporary file renamed over _target at the end
        self._target: Optional[Path] = None  # atomic or in place: the file finally written
        self._spool: Optional[IO[str]] = None  # in place: the lines, copied into _target at the end

    def open(self) -> None:
        """Check the location and open it (a temporary file beside a regular file)."""
        spec = self.spec
        if spec is None or spec == "-":
            self._stream = sys.stdout
            return
        if not spec:
            raise CliError("--json: expected a file name or '-' (standard output), got ''")
        alias = _STD_ALIAS.get(spec)
        match = _FD_ALIAS.match(spec)
        if alias is not None or match is not None:
            self._open_descriptor(alias if alias is not None else int(match.group(1)) if match else 1)
            return
        path = Path(spec)
        try:
            info: Optional[os.stat_result] = path.stat()  # through symbolic links
        except FileNotFoundError:
            info = None
        except OSError as error:
            raise CliError(f"--json: cannot write {spec}: {error.strerror or error}") from None
        if info is None:
            # new (or the target of a dangling symbolic link): created atomically in its folder
            target = Path(os.path.realpath(path))
            self._check_folder(target.parent, spec)
            self._open_atomic(target, None)
        elif stat.S_ISDIR(info.st_mode):
            raise CliError(f"--json: {spec} is a directory")
        elif stat.S_ISREG(info.st_mode):
            target = Path(os.path.realpath(path))
            if not os.access(target, os.W_OK):
                raise CliError(f"--json: {spec} is not writable (permission denied)")
            if info.st_nlink == 1 and os.access(target.parent, os.W_OK | os.X_OK):
                self._open_atomic(target, info)
            else:  # hard links (or a folder we cannot write): rewritten in place at the end
                import tempfile

                self._target = target
                self._spool = tempfile.TemporaryFile("w+", encoding="utf-8")  # nameless: nothing left behind
        else:  # FIFO, character or block device, socket: a stream, as a shell's > would
            try:
                self._stream = open(path, "w", encoding="utf-8")
            except OSError as error:
                raise CliError(f"--json: cannot open {spec}: {error.strerror or error}") from None
            self._owned = True

    @staticmethod
    def _check_folder(folder: Path, spec: str) -> None:
        if not folder.is_dir():
            raise CliError(f"--json: cannot create {spec}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise CliError(f"--json: cannot create {spec}: folder {folder} is not writable")

    def _open_descriptor(self, descriptor: int) -> None:
        try:
            self._stream = os.fdopen(os.dup(descriptor), "w", encoding="utf-8")
        except OSError as error:
            raise CliError(f"--json: cannot write {self.name}: {error.strerror or error}") from None
        self._owned = True

    def _open_atomic(self, target: Path, existing: Optional[os.stat_result]) -> None:
        """A new temporary file ``.NAME.tiltsmc-XXXXXXXX`` beside ``target``, with ``target``'s mode (a new
        file: ``0666`` less the umask, as the kernel applies it), its owner and group where allowed."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        for _ in range(100):
            candidate = target.with_name(f".{target.name}.tiltsmc-{os.urandom(4).hex()}")
            try:
                with signals_deferred():  # no signal between creating the file and recording its name
                    descriptor = os.open(candidate, flags, 0o600 if existing is not None else 0o666)
                    self._temporary, self._target = candidate, target
                break
            except FileExistsError:
                continue
            except OSError as error:
                raise CliError(f"--json: cannot write {self.name}: {error.strerror or error}") from None
        else:
            raise CliError(f"--json: cannot create a temporary file beside {target}")
        try:
            if existing is not None and hasattr(os, "fchown"):  # POSIX
                with contextlib.suppress(OSError):  # only root may give a file away; a group, its members
                    os.fchown(descriptor, existing.st_uid, existing.st_gid)
            if existing is not None:
                if hasattr(os, "fchmod"):
                    os.fchmod(descriptor, stat.S_IMODE(existing.st_mode))
                else:  # Windows before Python 3.13: the read-only bit
                    os.chmod(candidate, stat.S_IMODE(existing.st_mode))
            self._stream = os.fdopen(descriptor, "w", encoding="utf-8")
        except BaseException as error:
            os.close(descriptor)
            self.discard()
            if isinstance(error, OSError):
                raise CliError(f"--json: cannot write {self.name}: {error.strerror or error}") from None
            raise
        self._owned = True

    def _failed(self, error: OSError) -> CliError:
        if isinstance(error, BrokenPipeError):
            return CliError(f"--json: {self.name} was closed by its reader (broken pipe)", 1)
        return CliError(f"--json: cannot write {self.name}: {error.strerror or error}", 1)

    def write(self, lines: Sequence[str]) -> None:
        """Write one batch's lines (streams are flushed, so a reader sees each batch as it ends)."""
        handle = self._spool if self._spool is not None else self._stream
        assert handle is not None
        try:
            handle.writelines(lines)
            if handle is not self._spool and self._temporary is None:
                handle.flush()
        except OSError as error:
            raise self._failed(error) from None

    def commit(self) -> None:
        """The run succeeded: make its lines the file's content (rename, or copy in place)."""
        try:
            if self._spool is not None:
                assert self._target is not None
                self._spool.seek(0)
                # signals held back: an interruption would leave the file half rewritten
                with signals_deferred(), open(self._target, "r+", encoding="utf-8") as handle:
                    handle.truncate(0)
                    while chunk := self._spool.read(1 << 20):
                        handle.write(chunk)
                self._spool.close()
                self._spool = None
                return
            assert self._stream is not None
            self._stream.flush()
            if self._temporary is not None:
                os.fsync(self._stream.fileno())
            if self._owned:
                self._stream.close()
            if self._temporary is not None:
                assert self._target is not None
                with signals_deferred():
                    os.replace(self._temporary, self._target)
                    self._temporary = None
        except OSError as error:
            self.discard()
            raise self._failed(error) from None

    def discard(self) -> None:
        """The run failed: remove the temporary file (the target keeps its old content); close streams."""
        if self._stream is not None and self._owned:
            with contextlib.suppress(OSError):
                self._stream.close()
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        if self._temporary is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._temporary)
            self._temporary = None

    @property
    def where(self) -> str:
        return "" if self._stream is sys.stdout else f" to {self.name}"


# -- arguments --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line: ``tiltsmc: <problem> (see tiltsmc run --help)``, status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"tiltsmc: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


MAX_THREADS = 1024  # ONNX Runtime starts every thread asked for: 100000 exhausted the memory


def _thread_count(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_THREADS} threads, got {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _real(text: str, low: float, high: float, low_open: bool, high_open: bool, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if math.isnan(value) or not inside:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def _fraction(text: str) -> float:
    return _real(text, 0.0, 1.0, False, False, "a fraction in [0, 1]")


def _open_fraction(text: str) -> float:
    return _real(text, 0.0, 1.0, True, False, "a fraction in (0, 1]")


def _positive_real(text: str) -> float:
    return _real(text, 0.0, math.inf, True, True, "a finite number > 0")


def _non_negative_real(text: str) -> float:
    return _real(text, 0.0, math.inf, False, True, "a finite number >= 0")


def _id_list(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text}") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text}")
    return ids


def _step(text: str) -> str:
    r"""``token``, or a delimiter with backslash escapes (``\n``, ``\t``, ``\x0a``, ``\u00e9``, ``\\``)
    decoded; other characters are kept as they are (``é`` stays ``é``)."""
    if text == "token":
        return text
    try:
        # non-Latin-1 characters become \uXXXX escapes first, so that unicode_escape gives them back
        delimiter = text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as error:
        raise argparse.ArgumentTypeError(f"malformed escape in {text!r}: {error.reason}") from None
    if not delimiter:
        raise argparse.ArgumentTypeError("expected 'token' or a non-empty delimiter, got ''")
    return delimiter


def _add_model_arguments(parser: argparse.ArgumentParser, demo_models: bool = False) -> None:
    """The options that load the policy and the reward model (``run`` and ``serve``)."""
    if demo_models:
        models = parser.add_mutually_exclusive_group(required=True)
        models.add_argument("--policy", help="folder (or .onnx file) of the decoder LM")
        models.add_argument("--demo", action="store_true", help="the bundled arithmetic policy and PRM")
        parser.add_argument("--reward", help="folder (or .onnx file) of the reward model (with --policy)")
    else:
        parser.add_argument("--policy", required=True, help="folder (or .onnx file) of the decoder LM")
        parser.add_argument(
            "--reward",
            help="folder (or .onnx file) of the reward model (or --value-output: the policy's own)",
        )
    parser.add_argument("--max-new-tokens", type=_positive_int, default=32)
    parser.add_argument(
        "--step", type=_step, default="token", help="'token' or a delimiter ending each step, e.g. '\\n'"
    )
    parser.add_argument("--temperature", type=_positive_real, default=1.0)
    parser.add_argument("--top-k", type=_positive_int, default=None)
    parser.add_argument("--top-p", type=_open_fraction, default=None)
    parser.add_argument("--reward-kind", choices=("log_value", "prob", "logit"), default="logit")
    parser.add_argument("--reward-output", default=None, help="reward graph output to read (default: first)")
    parser.add_argument(
        "--value-output",
        default=None,
        help="the policy graph's value output, read as the reward: one model for both roles, one run a step",
    )
    parser.add_argument(
        "--reward-kv-cache",
        choices=("auto", "on", "off"),
        default="auto",
        help="a decoder reward model keeps a KV cache per particle (auto: where its graph has one)",
    )
    parser.add_argument(
        "--reward-position",
        choices=("last", "delimiter"),
        default="last",
        help="read per-position scores at the last token or at the last step delimiter",
    )
    parser.add_argument(
        "--reward-delimiters",
        type=_id_list,
        default=None,
        help="token ids ending a step, comma-separated (with --reward-position delimiter)",
    )
    parser.add_argument(
        "--reward-label",
        type=_count,
        default=None,
        help="the class whose probability is Vh, for an output with a class axis last",
    )
    parser.add_argument(
        "--reward-classes",
        type=_id_list,
        default=None,
        help="comma-separated classes the label's probability is normalised over (default: all)",
    )
    parser.add_argument(
        "--threads", type=_thread_count, default=None, help="threads for ONNX Runtime and the core"
    )
    parser.add_argument("--cpu", action="store_true", help="use the CPU even where a GPU is usable")
    parser.add_argument(
        "--memory-arena",
        choices=("on", "off"),
        default="on",
        help="ONNX Runtime's CPU memory arena ('off' frees each run's buffers: less memory between runs, "
        "about half the speed on large batches; serve shrinks the arena when idle either way)",
    )


def _load_models(args: argparse.Namespace) -> tuple[Any, Any]:
    """The policy and reward model the options name (OSError / ValueError / TypeError for what cannot load,
    a reward model whose vocabulary differs from the policy's included)."""
    from .models import OnnxCausalLM, OnnxRewardModel, PolicyValue

    providers = ["CPUExecutionProvider"] if args.cpu else None
    if getattr(args, "demo", False):
        from .tasks import arithmetic

        return arithmetic.load_models(
            intra_op_num_threads=args.threads, providers=providers, memory_arena=args.memory_arena == "on"
        )
    if (args.reward is None) == (args.value_output is None):
        raise ValueError(
            "--reward: give a reward model, or --value-output to read the policy's own value head"
        )
    policy = OnnxCausalLM(
        args.policy,
        max_new_tokens=args.max_new_tokens,
        step=args.step,  # escapes decoded by _step
        temperature=args.temperature,
        providers=providers,
        top_k=args.top_k,
        top_p=args.top_p,
        intra_op_num_threads=args.threads,
        memory_arena=args.memory_arena == "on",
        value_output=args.value_output,
    )
    if args.value_output is not None:
        return policy, PolicyValue(policy, kind=args.reward_kind)
    reward = OnnxRewardModel(
        args.reward,
        output=args.reward_output,
        kind=args.reward_kind,
        position=args.reward_position,
        delimiter_ids=args.reward_delimiters,
        label=args.reward_label,
        classes=args.reward_classes,
        providers=providers,
        intra_op_num_threads=args.threads,
        memory_arena=args.memory_arena == "on",
        kv_cache={"auto": None, "on": True, "off": False}[args.reward_kv_cache],
    )
    check_policy = getattr(reward, "check_policy", None)  # vocabularies: bad input, found before the run
    if callable(check_policy):
        check_policy(policy)
    return policy, reward


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tiltsmc", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="sample an ONNX policy guided by an ONNX reward model")
    prompts = run.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    prompts.add_argument("--prompts", help="a file of prompts, one per line")
    # Sampler options left out take the sampler's own defaults (those of tiltsmc.smc and the others, which
    # the engine and the server use too): one set of defaults.
    run.add_argument("--sampler", choices=SAMPLERS, default="smc")
    run.add_argument(
        "--particles",
        type=_positive_int,
        default=None,
        help=f"particles (smc: {_default('smc', 'num_particles')}) "
        f"or n (best-of-n: {_default('best_of_n', 'n')})",
    )
    run.add_argument(
        "--resample", choices=core.SCHEMES, default=None, help=f"({_default('smc', 'resample')})"
    )
    run.add_argument(
        "--ess-threshold", type=_fraction, default=None, help=f"({_default('smc', 'ess_threshold')})"
    )
    run.add_argument(
        "--pool-size",
        type=_positive_int,
        default=None,
        help=f"sp-gsmc / mh pool ({_default('mh', 'pool_size')})",
    )
    run.add_argument("--mh-steps", type=_count, default=None, help=f"({_default('mh', 'steps')})")
    run.add_argument(
        "--bound",
        type=_positive_real,
        default=None,
        help=f"rejection: a bound on the reward ({_default('rejection', 'bound')})",
    )
    run.add_argument(
        "--num-samples",
        type=_positive_int,
        default=None,
        help=f"rejection: samples per prompt ({_default('rejection', 'num_samples')})",
    )
    run.add_argument(
        "--max-tries",
        type=_positive_int,
        default=None,
        help=f"rejection: draws per prompt ({_default('rejection', 'max_tries')})",
    )
    run.add_argument(
        "--eps",
        type=_positive_real,
        default=None,
        help="the reward model's Bellman error you assume: warn when the run's online reading exceeds it",
    )
    run.add_argument("--batch-size", type=_positive_int, default=8, help="prompts per batched run")
    _add_model_arguments(run)
    run.add_argument("--seed", type=_count, default=0)
    run.add_argument(
        "--json", dest="json_path", default=None, help="write JSON lines here ('-' or default: stdout)"
    )

    serve = commands.add_parser(
        "serve",
        help="serve the models over HTTP (OpenAI-style /v1/completions, /health, /metrics)",
        description="Serve concurrent sampling requests with the continuous-batching engine, behind an "
        "OpenAI-compatible HTTP API (needs the serve extra). Binds 127.0.0.1 unless --host says otherwise.",
    )
    _add_model_arguments(serve, demo_models=True)
    from .serving import ray as serving_ray
    from .serving import server as serving_server

    serving_server.add_arguments(serve)
    serving_ray.add_arguments(serve)

    demo = commands.add_parser(
        "demo",
        help="guided SMC vs best-of-N on the bundled arithmetic task (table, plot, JSON)",
        description="Accuracy of best-of-N, SMC, SP-gSMC and SP-gSMC + MH at equal policy compute on the "
        "bundled arithmetic-chain task, guided by its learned process reward model and by a degraded one, "
        "and the reward models' Bellman error. Writes demo.txt, demo.json and demo.png to --out.",
    )
    demo.add_argument(
        "--levels",
        type=_positive_int,
        nargs="+",
        default=[4, 8, 12, 16],
        metavar="T",
        help="numbers of reasoning steps (1..16)",
    )
    demo.add_argument(
        "--budgets",
        type=_positive_int,
        nargs="+",
        default=[2, 4, 8],
        metavar="C",
        help="policy steps per reasoning step: best-of-N's N, SMC's particles, the pool size",
    )
    demo.add_argument("--problems", type=_positive_int, default=24, help="problems per level")
    demo.add_argument(
        "--noise",
        type=_non_negative_real,
        default=2.0,
        help="sd of the degraded reward model's log-value noise",
    )
    demo.add_argument("--seed", type=_count, default=0)
    demo.add_argument("--threads", type=_thread_count, default=None, help="ONNX Runtime threads")
    demo.add_argument("--out", default="tiltsmc-demo", help="output folder (created if needed)")
    return parser


def _read_prompts(args: argparse.Namespace) -> list[str]:
    """``--prompt`` values, or the non-blank lines of the ``--prompts`` file (UTF-8, lines end at LF)."""
    if args.prompt is not None:
        return list(args.prompt)
    path = Path(args.prompts)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise CliError(f"--prompts: {path} is a directory, not a file of prompts") from None
    except FileNotFoundError:
        raise CliError(f"--prompts: no such file: {path}") from None
    except OSError as error:
        raise CliError(f"--prompts: cannot read {path}: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise CliError(
            f"--prompts: {path} is not UTF-8 text (byte 0x{data[error.start]:02x} on line {line})"
        ) from None
    # Lines end at \n only: str.splitlines would also split a prompt at \x0b, \x1c or U+2028.
    lines = [line[:-1] if line.endswith("\r") else line for line in text.removeprefix("\ufeff").split("\n")]
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise CliError(f"--prompts: {path} holds no prompt")
    return prompts


# tiltsmc run's sampler options, as the sampler functions' parameters (per sampler)
_RUN_OPTIONS: dict[str, dict[str, str]] = {
    "smc": {"particles": "num_particles", "resample": "resample", "ess_threshold": "ess_threshold"},
    "sp-gsmc": {"pool_size": "pool_size"},
    "mh": {"pool_size": "pool_size", "mh_steps": "steps"},
    "best-of-n": {"particles": "n"},
    "rejection": {"bound": "bound", "num_samples": "num_samples", "max_tries": "max_tries"},
}
def _default(sampler: str, option: str) -> Any:
    """A sampler option's default, from the sampler function's signature (for help texts)."""
    return sampler_defaults(sampler)[option]


def _sample(
    args: argparse.Namespace, policy: Any, reward: Any, prompts: list[str], seed: Any
) -> SamplerResult:
    """One batch through the chosen sampler; the options not given keep the sampler's defaults."""
    options = {
        parameter: getattr(args, name)
        for name, parameter in _RUN_OPTIONS[args.sampler].items()
        if getattr(args, name) is not None
    }
    function = SAMPLER_FUNCTIONS[args.sampler.replace("-", "_")][0]  # one table: the engine's
    result: SamplerResult = function(policy, reward, prompts, rng=seed, **options)
    return result


def _records(result: SamplerResult, prompts: list[str], offset: int) -> list[dict[str, Any]]:
    whole = result.to_dict()
    records = []
    for b, prompt in enumerate(prompts):
        record: dict[str, Any] = {"prompt_index": offset + b, "prompt": prompt, "sampler": whole["sampler"]}
        for key in (
            "samples",
            "texts",
            "log_weights",
            "log_z",
            "ess",
            "resampled",
            "log_z_increments",
            "log_z_increment_se",
            "collapsed",
            "acceptance_rate",
            "tries",
        ):
            if key in whole:
                record[key] = whole[key][b]
        if str(b) in whole.get("errors", {}):
            record["error"] = whole["errors"][str(b)]
        record["compute"] = whole["compute"]  # for the whole batch this prompt ran in
        records.append(record)
    return records


def _load_models_or_fail(args: argparse.Namespace) -> tuple[Any, Any]:
    """:func:`_load_models`; bad files or options raise :class:`CliError` (status 2)."""
    try:
        return _load_models(args)
    except (OSError, ValueError, TypeError) as error:
        raise CliError(_one_line(error)) from None
    except RuntimeError as error:  # e.g. a GPU that ONNX Runtime cannot use
        raise CliError(_one_line(error), 1) from None


def run(args: argparse.Namespace) -> int:
    prompts = _read_prompts(args)
    output = ResultOutput(args.json_path)
    try:
        output.open()  # refused here, before any model is loaded, if it cannot be written
        if args.threads is not None:
            core.set_num_threads(args.threads)
        policy, reward = _load_models_or_fail(args)
        seed = np.random.default_rng(args.seed)
        progress = Progress(len(prompts), f"tiltsmc {args.sampler}")
        began = time.perf_counter()
        failed = 0
        readings = []
        try:
            for start in range(0, len(prompts), args.batch_size):
                batch = prompts[start : start + args.batch_size]
                try:
                    result = _sample(args, policy, reward, batch, seed)
                except Exception as error:  # ONNX Runtime's own errors, bad model outputs
                    if os.environ.get("TILTSMC_TRACEBACK"):
                        raise
                    raise CliError(
                        f"run failed on prompts {start}..{start + len(batch) - 1}: {_one_line(error)}", 1
                    ) from None
                readings.append(online_bellman(result))
                records = _records(result, batch, start)
                failed += sum("error" in record for record in records)
                output.write([json.dumps(record) + "\n" for record in records])
                progress.update(min(start + args.batch_size, len(prompts)))
        finally:
            progress.close()
        output.commit()
    except BaseException:
        output.discard()
        raise
    print(
        f"tiltsmc: {len(prompts)} prompt(s), {failed} failed, {time.perf_counter() - began:.2f}s"
        f"{output.where}",
        file=sys.stderr,
    )
    reading = OnlineBellman.combine(readings)
    print(f"tiltsmc: {reading.summary(eps=args.eps)}", file=sys.stderr)
    for message in reading.warnings(args.eps):
        print(f"tiltsmc: warning: {message}", file=sys.stderr)
    return 1 if failed == len(prompts) else 0


def serve(args: argparse.Namespace) -> int:
    from .serving import server as serving_server

    try:
        settings = serving_server.Settings.from_args(args)
    except ValueError as error:
        raise CliError(str(error)) from None
    if args.ray:  # the replicas load the models
        from .serving import ray as serving_ray

        options = serving_ray.ReplicaOptions(
            {name: getattr(args, name) for name in _model_option_names()}, settings
        )
        return serving_ray.serve_on_ray(args, options)
    if args.threads is not None:
        core.set_num_threads(args.threads)
    policy, reward = _load_models_or_fail(args)
    return serving_server.serve(args, settings, policy, reward)


def _model_option_names() -> list[str]:
    """The destinations of ``tiltsmc serve``'s model options (what a replica needs to load the models)."""
    parser = argparse.ArgumentParser(add_help=False)
    _add_model_arguments(parser, demo_models=True)
    return [action.dest for action in parser._actions]


def demo(args: argparse.Namespace) -> int:
    from . import demo as demo_module

    config = demo_module.DemoConfig(
        levels=tuple(args.levels),
        budgets=tuple(args.budgets),
        problems=args.problems,
        seed=args.seed,
        noise=args.noise,
        threads=args.threads,
    )
    out = Path(args.out)
    try:
        config.validate()
        demo_module.check_output_folder(out)
    except ValueError as error:
        raise CliError(f"demo: --{error}") from None
    if args.threads is not None:
        core.set_num_threads(args.threads)
    progress = Progress(1, "tiltsmc demo")

    def report(done: int, total: int) -> None:
        progress.total = total
        progress.update(done)

    try:
        record = demo_module.run_demo(config, progress=report)
    finally:
        progress.close()
    try:
        written = demo_module.write_outputs(record, out)
    except OSError as error:
        raise CliError(f"demo: cannot write to {out}: {error.strerror or error}", 1) from None
    print(demo_module.render_table(record))
    print(
        f"tiltsmc demo: {record['seconds']:.0f}s; wrote {', '.join(str(p) for p in written)}", file=sys.stderr
    )
    return 0


def _quiet_stdout() -> None:
    """Standard output's reader has gone: point it at /dev/null, so that Python's final flush does not
    report the broken pipe again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``tiltsmc`` command: returns the exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":  # a server: its own signal handling, no result file
            return serve(args)
        with signals_raise():
            return run(args) if args.command == "run" else demo(args)
    except CliError as error:
        if error.code == 1 and "broken pipe" in str(error):
            _quiet_stdout()
        print(f"tiltsmc: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        print("tiltsmc: interrupted; no result file written", file=sys.stderr)
        return 130
    except Signalled as signalled:
        name = signal.Signals(signalled.signum).name
        print(f"tiltsmc: stopped by {name}; no result file written", file=sys.stderr)
        if threading.current_thread() is threading.main_thread():  # end by the same signal, as expected
            signal.signal(signalled.signum, signal.SIG_DFL)
            os.kill(os.getpid(), signalled.signum)
        return 128 + signalled.signum
    except BrokenPipeError:
        _quiet_stdout()
        print("tiltsmc: standard output was closed by its reader (broken pipe)", file=sys.stderr)
        return 1
    except Exception as error:  # never a traceback, unless asked for
        if os.environ.get("TILTSMC_TRACEBACK"):
            raise
        print(f"tiltsmc: unexpected error: {type(error).__name__}: {_one_line(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
