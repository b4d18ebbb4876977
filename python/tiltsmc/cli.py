"""``tiltsmc`` on the command line: ``tiltsmc run`` samples ONNX models with any sampler; ``tiltsmc serve``
serves them over HTTP ([`tiltsmc.serving.server`][tiltsmc.serving.server]); ``tiltsmc demo`` compares the
samplers on the bundled reasoning task (see ``tiltsmc.demo``).

Results are JSON lines, one per prompt (samples, texts, log-weights, the log Z estimate, the ESS trace,
timings), written to standard output (no ``--json``, or ``--json -``) or to ``--json PATH``:

* a regular file (new, or one with a single link) is replaced atomically when the run has succeeded: the
  lines go to a temporary file beside it, renamed over it at the end, so a failed or interrupted run
  (Ctrl-C, SIGTERM, SIGHUP) leaves the old file untouched and no temporary file behind; an existing file
  keeps its permission bits (and, where allowed, its owner and group), a new one gets ``0666`` less the
  umask, and a symbolic link stays a link: the file it points to is replaced;
* a regular file with several hard links (or in a folder tiltsmc cannot write) is rewritten in place at
  the end of a successful run, so every link sees the new results; its space is reserved first
  (``posix_fallocate``), so that a full disk leaves it as it was, and where that cannot be done (a file
  system without it), a write that fails says that the file was partly rewritten;
* a FIFO, a character device (``/dev/null``, a terminal) or ``/dev/stdout`` / ``/dev/stderr`` /
  ``/dev/fd/N`` is written as a stream, batch by batch (a descriptor not open for writing, such as
  standard input, is refused).

A directory, a path ending in ``/``, a missing or unwritable folder and an unwritable file are refused
before any model is loaded. A signal that comes once the results are written (while the summary is logged)
still ends the process as it would, its last line saying that the run was done and where its results are.
Each line follows the JSON Schema shipped as ``tiltsmc/run.schema.json`` (``output_schema``): strict
JSON (a value that is not finite is ``null``), the run's configuration in every line, the prompt's own
compute. A per-step progress bar (``tqdm``) goes to standard error on a terminal, none when standard
error is not one or with ``--quiet``; logs go to standard error through the ``tiltsmc`` logger
(``--log-level``), the summary lines included.
Every failure is one line ``tiltsmc: ...`` on standard error with exit status 2 (bad arguments, prompts
or model files) or 1 (the run or the output failed); the environment variable ``TILTSMC_TRACEBACK=1``
shows the traceback of an unexpected error instead. A prompt that fails (the policy cannot start it, or a
model's output for it is unusable during the run, ONNX Runtime's errors included: a model call that
raises for a batch runs its prompts again in halves, to find whose it is) fails alone: its line
carries the ``error``, its reason goes to standard error (with its traceback under ``TILTSMC_TRACEBACK=1``,
where an exception ended it), the other prompts' lines are written, and the run fails (status 1) only
where every prompt failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import json
import logging
import math
import os
import re
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any, NoReturn, Optional, Union

import numpy as np

from . import core
from ._files import TERMINATING_SIGNALS, create_beside, reserve_space, signals_deferred
from ._options import int_option, positive_int_option, positive_real_option, real_option
from ._text import not_utf8, shown_as_bytes
from .diagnostics import OnlineBellman, online_bellman
from .diagnostics.online import check_eps
from .models._ort import MAX_THREADS
from .samplers._engine import Models
from .samplers.correction import options_not_read
from .samplers.lane import run_together
from .samplers.result import (
    Compute,
    SamplerResult,
    failed_result,
    finite_or_none,
    prompt_error,
    prompt_reason,
)
from .samplers.runs import Run
from .samplers.sequential import EXACT_FORM, OPTIMAL_FORM_NEEDS, PROPOSALS, optimal_form_option
from .serving.engine import SAMPLERS as SAMPLER_FUNCTIONS
from .serving.engine import sampler_defaults
from .serving.server import DEFAULT_SAMPLER, choice_seed

# the engine's samplers (SAMPLER_FUNCTIONS: the server's names), as the command line writes them
SAMPLERS = tuple(name.replace("_", "-") for name in SAMPLER_FUNCTIONS)


logger = logging.getLogger("tiltsmc.cli")


def _progress_enabled(args: argparse.Namespace) -> bool:
    """A progress bar only where a person watches: standard error a terminal, and no ``--quiet``."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def _bar_size() -> dict[str, Any]:
    """tqdm's size options: the terminal's, followed as it changes; 80 x 24 where the terminal reports no
    size (a fresh pseudo-terminal says 0 x 0, and tqdm would hide its bar as off the screen)."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):
        size = os.terminal_size((0, 0))
    if size.columns > 0 and size.lines > 0:
        return {"dynamic_ncols": True}
    return {"ncols": size.columns or 80, "nrows": size.lines or 24}


def _tqdm() -> Any:
    """``tqdm``'s bar class, its write lock a thread lock where none is set yet: tiltsmc's bars live in
    one process, and tqdm's own lock also takes a multiprocessing one, whose semaphore starts a resource
    tracker process (Python 3.14's reports it as leaked on standard error when a signal stops the run)."""
    from tqdm import tqdm

    if not hasattr(tqdm, "_lock"):
        tqdm.set_lock(threading.RLock())
    return tqdm


class StepProgress:
    """Per-step progress of a run on standard error (a ``tqdm`` bar, off where disabled).

    It counts steps of every prompt: a lane step of ``k`` prompts counts ``k``. The total is each prompt's
    most steps (``max_new_tokens`` per pass of the sampler), lowered by what a prompt leaves unused when it
    ends early, and raised by the steps a prompt had taken where it runs again from its start (they
    were work done), so the rate is real steps per second and the ETA an upper bound that tightens;
    unknown (no ETA) for rejection sampling, whose number of rounds is random.
    """

    def __init__(self, prompts: int, budget: Optional[int], label: str, enabled: bool) -> None:
        self.budget = budget
        self.bar = _tqdm()(
            total=None if budget is None else prompts * budget,
            desc=label,
            unit="step",
            file=sys.stderr,
            disable=not enabled,
            leave=True,
            **_bar_size(),
        )

    def advance(self, steps: int) -> None:
        self.bar.update(steps)

    def prompt_done(self, steps_taken: int) -> None:
        """A prompt ended after ``steps_taken`` steps: its unused budget leaves the total."""
        if self.budget is not None and self.bar.total is not None and not self.bar.disable:
            self.bar.total = max(self.bar.total - max(self.budget - steps_taken, 0), self.bar.n)
            self.bar.refresh()

    def restarted(self, steps_lost: int) -> None:
        """A prompt runs again from its start (its batch's model call failed) after ``steps_lost`` steps:
        they were taken and stay counted, so the work to do grows by as much."""
        if self.budget is not None and self.bar.total is not None and not self.bar.disable:
            self.bar.total += steps_lost
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


class _ProgressSafeHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A log handler that clears a progress bar on its stream before writing a line (no garbled lines)."""

    def emit(self, record: logging.LogRecord) -> None:
        with _tqdm().external_write_mode(file=self.stream):
            super().emit(record)


class _Formatter(logging.Formatter):
    """``tiltsmc: <message>``, with ``warning:`` / ``error:`` after ``tiltsmc:`` at those levels."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"tiltsmc: error: {message}"
        if record.levelno >= logging.WARNING:
            return f"tiltsmc: warning: {message}"
        return f"tiltsmc: {message}"


LOG_LEVELS = ("debug", "info", "warning", "error")


@contextlib.contextmanager
def _logging_to_stderr(args: argparse.Namespace) -> Iterator[None]:
    """While inside, the ``tiltsmc`` logger writes to standard error at ``--log-level`` (``--quiet``: warnings
    and errors only); the library itself only has a NullHandler."""
    level_name = getattr(args, "log_level", "info")
    if getattr(args, "quiet", False) and level_name in ("debug", "info"):
        level_name = "warning"
    root = logging.getLogger("tiltsmc")
    handler = _ProgressSafeHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    previous_level, previous_propagate = root.level, root.propagate
    root.addHandler(handler)
    root.setLevel(getattr(logging, level_name.upper()))
    root.propagate = False
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
        root.propagate = previous_propagate


class CliError(Exception):
    """A failure reported as one line ``tiltsmc: <message>`` with exit status ``code`` (2: bad input, 1: the
    run or its output failed)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class Signalled(BaseException):
    """SIGTERM or SIGHUP arrived: raised in the main thread so that cleanup runs, then the process ends by
    the same signal (see ``main``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# The terminating signals received inside signals_raise: a handler's exception can be lost (raised while a
# finalizer or a __del__ runs, Python prints it and goes on), so the run checks before it writes results.
_RECEIVED: list[int] = []


def raise_if_signalled() -> None:
    """Raise ``Signalled`` for a terminating signal received inside ``signals_raise`` whose exception was
    lost on the way (see ``_RECEIVED``)."""
    if _RECEIVED:
        raise Signalled(_RECEIVED[0])


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise ``Signalled`` (Python's default lets them end the process
    without running ``finally`` blocks, leaving temporary files behind). Only where they would end the
    process (a SIGHUP ignored under ``nohup`` stays ignored, a program's own handler stays), and only in
    the main thread, where Python delivers signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Optional[FrameType]) -> NoReturn:
        _RECEIVED.append(signum)
        raise Signalled(signum)

    _RECEIVED.clear()

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


def _tracebacks_wanted() -> bool:
    """``TILTSMC_TRACEBACK`` set to something other than empty, 0, false, no or off."""
    return os.environ.get("TILTSMC_TRACEBACK", "").strip().lower() not in ("", "0", "false", "no", "off")


def _traceback(error: BaseException) -> str:
    """An exception's traceback, as Python prints it (``TILTSMC_TRACEBACK``)."""
    import traceback

    return "".join(traceback.format_exception(type(error), error, error.__traceback__))


def _one_line(error: BaseException) -> str:
    """An exception's message on one line (ONNX Runtime's span several)."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


# -- --json: where results go ---------------------------------------------------------------------------

_FD_ALIAS = re.compile(r"^/(?:dev/fd|proc/self/fd)/(\d+)$")
_STD_ALIAS = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}
_STD_NAMES = {0: "standard input", 1: "standard output", 2: "standard error"}
# what an interrupted command leaves before it has written anything (ResultOutput.left, _left)
_NOTHING_LEFT = "no result file written"
# os.replace over the target fails so where the target is a mount point (a bind-mounted file) or on another
# file system: the lines are then copied over its content
_CANNOT_RENAME = {errno.EBUSY, errno.EXDEV}


def _open_for_writing(descriptor: int) -> bool:
    """Whether an open file descriptor takes writes (its access mode, where ``fcntl`` can read it)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: the first write reports it
        return True
    try:
        flags = fcntl.fcntl(descriptor, fcntl.F_GETFL)
    except OSError:  # pragma: no cover - the first write reports it
        return True
    return bool(flags & (os.O_WRONLY | os.O_RDWR))


class ResultOutput:
    """Where ``--json`` results go (see the module docstring): ``open`` it, ``write`` lines, then
    ``commit`` after a successful run or ``discard`` after a failed one (also after a failed
    ``open``). Opened before the run, so that a bad location is refused before any model is loaded.
    Bad locations raise ``CliError`` with status 2, write errors with status 1; so does a file the run reads
    (``reads``: ``(option, path)`` pairs, ``_files_read``), which the results would replace."""

    def __init__(self, spec: Optional[str], reads: Sequence[tuple[str, str]] = ()) -> None:
        self.spec = spec
        self.reads = reads
        self.name = "standard output" if spec in (None, "-") else str(spec)
        self._option = "" if spec is None else "--json: "  # write errors name --json where it was given
        self._stream: Optional[IO[str]] = None  # written batch by batch
        self._owned = False  # the stream is ours to close
        self._temporary: Optional[Path] = None  # atomic: the temporary file renamed over _target at the end
        self._target: Optional[Path] = None  # atomic or in place: the file finally written
        self._spool: Optional[IO[str]] = None  # in place: the lines, copied into _target at the end
        # on a stream (batch by batch): lines written, and lines of the batch being written (one store each,
        # so that a signal raised between any two bytecodes finds one state or the other)
        self._lines = (0, 0)
        self._count = 0  # lines handed to write, whatever the location
        self._committed = False  # commit has made the lines the location's content

    def open(self) -> None:
        """Check the location and open it (a temporary file beside a regular file)."""
        spec = self.spec
        if spec is None or spec == "-":
            if sys.stdout is None:  # started with it closed (>&-): the results would go nowhere
                raise CliError("--json: standard output is closed: give --json FILE")
            self._stream = sys.stdout
            return
        if not spec:
            raise CliError("--json: expected a file name or '-' (standard output), got ''")
        alias = _STD_ALIAS.get(spec)
        match = _FD_ALIAS.match(spec)
        if alias is not None or match is not None:
            self._open_descriptor(alias if alias is not None else int(match.group(1)) if match else 1)
            return
        if spec.endswith("/") or spec.endswith(os.sep):  # Path drops the slash: a file would be made there
            raise CliError(f"--json: {spec} names a folder; give a file name")
        path = Path(spec)
        try:
            info: Optional[os.stat_result] = path.stat()  # through symbolic links
        except FileNotFoundError:
            info = None
        except OSError as error:
            raise CliError(f"--json: cannot write {spec}: {error.strerror or error}") from None
        if info is not None:
            self._check_not_read(info)
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

    def _check_not_read(self, info: os.stat_result) -> None:
        """The location (``info``: its status) is none of the files the run reads (a model.onnx, a prompts
        file was overwritten, status 0)."""
        for option, path in self.reads:
            try:
                same = os.path.samestat(info, os.stat(path))
            except OSError:
                continue
            if same:
                raise CliError(
                    f"--json: {self.spec} is a file {option} reads ({path}): the results would replace it"
                )

    @staticmethod
    def _check_folder(folder: Path, spec: str) -> None:
        if not folder.is_dir():
            raise CliError(f"--json: cannot create {spec}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise CliError(f"--json: cannot create {spec}: folder {folder} is not writable")

    def _open_descriptor(self, descriptor: int) -> None:
        """A stream on a copy of ``descriptor`` (``/dev/fd/N``, ``/dev/stdout``), refused where it is not open
        for writing (``/dev/fd/0``, standard input: its first write failed, status 1 after the run)."""
        try:
            duplicate = os.dup(descriptor)
        except OSError as error:
            raise CliError(f"{self._option}cannot write {self.name}: {error.strerror or error}") from None
        if not _open_for_writing(duplicate):
            os.close(duplicate)
            which = _STD_NAMES.get(descriptor, f"descriptor {descriptor}")
            raise CliError(f"--json: {self.name} is {which}, which is not open for writing")
        self._stream = os.fdopen(duplicate, "w", encoding="utf-8")
        self._owned = True

    def _open_atomic(self, target: Path, existing: Optional[os.stat_result]) -> None:
        """A new temporary file ``.NAME.tiltsmc-XXXXXXXX`` beside ``target`` (``NAME`` cut where the file
        system would refuse so long a name: ``create_beside``), with ``target``'s mode (a new file: ``0666``
        less the umask, as the kernel applies it), its owner and group where allowed."""
        try:
            with signals_deferred():  # no signal between creating the file and recording its name
                descriptor, candidate = create_beside(target, 0o600 if existing is not None else 0o666)
                self._temporary, self._target = candidate, target
        except FileExistsError:
            raise CliError(f"--json: cannot create a temporary file beside {target}") from None
        except OSError as error:
            raise CliError(f"{self._option}cannot write {self.name}: {error.strerror or error}") from None
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
                raise CliError(f"{self._option}cannot write {self.name}: {error.strerror or error}") from None
            raise
        self._owned = True

    def _failed(self, error: OSError) -> CliError:
        if isinstance(error, BrokenPipeError):
            return CliError(f"{self._option}{self.name} was closed by its reader (broken pipe)", 1)
        return CliError(f"{self._option}cannot write {self.name}: {error.strerror or error}", 1)

    def write(self, lines: Sequence[str]) -> None:
        """Write one batch's lines (streams are flushed, so a reader sees each batch as it ends)."""
        handle = self._spool if self._spool is not None else self._stream
        assert handle is not None
        streaming = handle is not self._spool and self._temporary is None
        done = self._lines[0]
        try:
            if streaming:
                self._lines = (done, len(lines))
            handle.writelines(lines)
            if streaming:
                handle.flush()
                self._lines = (done + len(lines), 0)
            self._count += len(lines)
        except OSError as error:
            raise self._failed(error) from None

    def commit(self) -> None:
        """The run succeeded: make its lines the file's content (rename, or copy in place)."""
        try:
            if self._spool is not None:
                self._rewrite_in_place()
                return
            assert self._stream is not None
            self._stream.flush()
            if self._temporary is not None:
                os.fsync(self._stream.fileno())
            if self._owned:
                self._stream.close()
            if self._temporary is not None:
                assert self._target is not None
                with signals_deferred():  # a signal right after the rename finds it recorded
                    try:
                        os.replace(self._temporary, self._target)
                    except OSError as error:
                        if error.errno not in _CANNOT_RENAME:
                            raise
                        self._copy_temporary_in_place()
                        return
                    self._temporary = None
                    self._committed = True
            else:
                self._committed = True
        except OSError as error:
            self.discard()
            raise self._failed(error) from None

    def _copy_temporary_in_place(self) -> None:
        """The target cannot be renamed over (a bind mount, Docker's ``-v host.jsonl:/out.jsonl``: EBUSY;
        another file system: EXDEV): copy the temporary file's lines over the target's content instead
        (``_rewrite_in_place``), then remove the temporary file."""
        assert self._temporary is not None
        self._spool = open(self._temporary, encoding="utf-8")  # closed by _rewrite_in_place
        try:
            self._rewrite_in_place()
        finally:
            self.discard()  # the temporary file (and the spool, where the copy failed)

    def _rewrite_in_place(self) -> None:
        """Copy the spooled lines over the target's content (hard links: every link sees them), signals held
        back. The space is reserved first (``reserve_space``), so that a full disk, a quota or a size limit
        fails before the file is touched (``OSError``: it keeps its old content); where it cannot be reserved
        so, a write that fails midway raises ``CliError`` (status 1) saying the file was partly rewritten."""
        assert self._spool is not None and self._target is not None
        self._spool.flush()
        size = os.fstat(self._spool.fileno()).st_size
        # unbuffered: a write that fails raises where it is made, not again as the file closes
        with signals_deferred(), open(self._target, "r+b", buffering=0) as handle:
            reserved = reserve_space(handle.fileno(), size)  # OSError: the file as it was
            try:
                # over the old content from its start, then cut at the new end: a truncation first would
                # give the reserved space back
                with open(self._spool.fileno(), "rb", closefd=False) as lines:
                    lines.seek(0)
                    while chunk := lines.read(1 << 20):
                        rest = memoryview(chunk)
                        while rest:  # a write may take part of it
                            rest = rest[handle.write(rest) :]
                handle.truncate(size)
            except OSError as error:
                why = "" if reserved else " (its space could not be reserved beforehand)"
                raise CliError(
                    f"{self._option}cannot write {self.name}: {error.strerror or error}; the file was partly "
                    f"rewritten{why}: its old content is lost",
                    1,
                ) from None
            self._committed = True
        self._spool.close()
        self._spool = None

    def discard(self) -> None:
        """The run failed: remove the temporary file (the target keeps its old content); close streams."""
        if self._stream is not None and self._owned:
            with contextlib.suppress(OSError):
                self._stream.close()
        if self._spool is not None:
            with contextlib.suppress(OSError):  # its last lines cannot be flushed (a full disk): dropped
                self._spool.close()
            self._spool = None
        if self._temporary is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._temporary)
            self._temporary = None

    @property
    def stream(self) -> Optional[IO[str]]:
        """The stream written batch by batch, if any (not a temporary file or a spool)."""
        return self._stream if self._temporary is None else None

    @property
    def where(self) -> str:
        return "" if self._stream is sys.stdout else f" to {self.name}"

    def left(self) -> str:
        """What the run leaves, for its last line where it ends early: once ``commit`` has made the lines
        the location's content (a signal that comes while the summary is logged), all of them; before, a
        file is not written (an existing one keeps its content); a stream has the lines already written to
        it, or none, or, where it stopped while writing a batch (whose lines the reader may have got in
        part), their range."""
        if self._committed:
            return f"the run was done: {self._count} result line(s) written to {self.name}"
        if self._target is not None or self._stream is None:  # a file, or nothing opened yet
            return _NOTHING_LEFT
        done, writing = self._lines
        if writing:
            return (
                f"{done} to {done + writing} result line(s) written to {self.name} (stopped while writing a "
                "batch)"
            )
        if done:
            return f"{done} result line(s) already written to {self.name}"
        return f"nothing written to {self.name}"


# -- arguments --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line: ``tiltsmc: <problem> (see tiltsmc run --help)``, status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"tiltsmc: {message} (see {self.prog} --help)\n")

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        # "--option=--": the value "--", which argparse before Python 3.12 drops as the end of options,
        # handing the option [] past its type's check (--particles=-- reached the sampler as []); read as
        # the value it is, as later Pythons read it
        if arg_strings == ["--"] and action.nargs in (None, argparse.OPTIONAL):
            value = self._get_value(action, "--")
            self._check_value(action, value)
            return value
        return super()._get_values(action, arg_strings)


def _at_most(limit: int, what: str, minimum: int = 1) -> Callable[[str], int]:
    """An argparse type: an integer from ``minimum`` to ``limit`` (of ``what``, as its refusal says)."""

    def count(text: str) -> int:
        value = int_option(text, minimum)
        if value > limit:
            raise argparse.ArgumentTypeError(f"expected at most {limit} {what}, got {text}")
        return value

    return count


# --threads: ONNX Runtime's threads (and the core's), the models' bound (models._ort.MAX_THREADS)
_thread_count = _at_most(MAX_THREADS, "threads")
# Particles (or candidates, draws) of one prompt at most: each is a row of every model call, with its own
# KV cache; 10^20 overflowed numpy's array dimensions ("Maximum allowed dimension exceeded") and 10^9
# allocated 15 GB of the tiny fixture's caches before failing.
MAX_PARTICLES = 1 << 20
_particle_count = _at_most(MAX_PARTICLES, "particles")


def _eps_option(text: str) -> float:
    """``--eps``: a number as ``online_bellman`` takes its ``eps`` (``diagnostics.online.check_eps``: >= 0,
    0 for an exact twist, ``inf`` never warns)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    try:
        return check_eps(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}") from None


def _pool_size(text: str) -> Union[int, str]:
    """``--pool-size``: a number of candidates (``_particle_count``) or ``exact``, the sampler's
    ``pool_size=None`` (kept as the text until the options are read, so that it counts as given)."""
    if text == EXACT_FORM:
        return EXACT_FORM
    try:
        return _particle_count(text)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{error} (or {EXACT_FORM})") from None


# Rejection sampling's draws (and so samples) of one prompt at most: counted in int64, which 10^20 overflowed
# (status 1 after the models loaded, "Python int too large to convert to C long"); no run comes near 2^40.
MAX_DRAWS = 1 << 40
_try_count = _at_most(MAX_DRAWS, "draws")
_sample_count = _at_most(MAX_DRAWS, "samples")
# MH steps of one prompt at most (tiltsmc.mh takes any count >= 0): each is a further run of its particles
# whose estimate, log Z trace and decision stay in memory to the end and go into the prompt's line (its
# proposal_log_z and mh_accepted hold one entry a step), so steps are bounded as particles are; 10^20 ran
# until killed.
MAX_MH_STEPS = MAX_PARTICLES
_mh_step_count = _at_most(MAX_MH_STEPS, "steps", minimum=0)


def _count(text: str) -> int:
    return int_option(text, 0)


def _fraction(text: str) -> float:
    return real_option(text, 0.0, 1.0, False, False, "a fraction in [0, 1]")


def _open_fraction(text: str) -> float:
    return real_option(text, 0.0, 1.0, True, False, "a fraction in (0, 1]")


def _non_negative_real(text: str) -> float:
    return real_option(text, 0.0, math.inf, False, True, "a finite number >= 0")


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
    decoded; other characters are kept as they are (``é`` stays ``é``). Bytes that are not UTF-8 (which no
    generated text could match) are refused, naming the first (``_utf8_text``)."""
    if text == "token":
        return text
    delimiter = _unescaped(_utf8_text(text))
    if not delimiter:
        raise argparse.ArgumentTypeError("expected 'token' or a non-empty delimiter, got ''")
    return delimiter


def _stop_text(text: str) -> str:
    """A stop string, backslash escapes decoded and bytes that are not UTF-8 refused as ``--step``'s."""
    stop = _unescaped(_utf8_text(text))
    if not stop:
        raise argparse.ArgumentTypeError("expected a non-empty text, got ''")
    return stop


def _unescaped(text: str) -> str:
    """``text`` with its backslash escapes decoded; an escape that makes what no text holds (a lone
    surrogate, ``\\udcff``: no generated text could match it) is refused as a malformed one."""
    try:
        # non-Latin-1 characters become \uXXXX escapes first, so that unicode_escape gives them back
        decoded = text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as error:
        raise argparse.ArgumentTypeError(f"malformed escape in {text!r}: {error.reason}") from None
    try:
        decoded.encode("utf-8")
    except UnicodeEncodeError as error:
        character = f"U+{ord(decoded[error.start]):04X}"
        raise argparse.ArgumentTypeError(
            f"malformed escape in {text!r}: it makes {character}, a lone surrogate, which no text holds"
        ) from None
    return decoded


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
    # Every default is the model class's own (MODEL_OPTIONS): one set of defaults for the API, the CLI
    # and the server.
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int_option,
        default=_model_default("max_new_tokens"),
        help="tokens generated per sample at most",
    )
    parser.add_argument(
        "--step",
        type=_step,
        default=_model_default("step"),
        help="'token' or a delimiter ending each step, e.g. '\\n'",
    )
    parser.add_argument(
        "--temperature",
        type=positive_real_option,
        default=_model_default("temperature"),
        help="the policy's sampling temperature",
    )
    parser.add_argument(
        "--top-k",
        type=positive_int_option,
        default=_model_default("top_k"),
        help="sample from the k likeliest tokens (default: all)",
    )
    parser.add_argument(
        "--top-p",
        type=_open_fraction,
        default=_model_default("top_p"),
        help="nucleus sampling: the likeliest tokens of total probability p (default: all)",
    )
    parser.add_argument(
        "--stop",
        type=_stop_text,
        action="append",
        default=_model_default("stop"),
        metavar="TEXT",
        help="a text that ends a trajectory where it is generated (escapes as in --step; may be given "
        "several times); texts end before it",
    )
    parser.add_argument(
        "--prefill-tokens",
        type=positive_int_option,
        default=_model_default("prefill_tokens"),
        help="prompt tokens (rows x longest prompt) run through the policy in one call when prompts start "
        "(bounds the memory of its logits and attention; more take several calls, a longer prompt several "
        "pieces)",
    )
    parser.add_argument(
        "--step-rows-below",
        type=_fraction,
        default=_model_default("step_rows_below"),
        help="within a step of several tokens, run the policy on the rows still writing it once they are at "
        "most this fraction of the rows it runs on (their KV caches gathered; 0: every row every call)",
    )
    parser.add_argument(
        "--check-batching",
        choices=("on", "off"),
        default=_model_default("check_batching"),
        help="at load, refuse a policy whose rows' logits depend on their padding or on the other rows of "
        "their batch (attention reading lengths from the mask, dynamic int8 quantisation); 'off' runs it "
        "anyway, its samples then not following its law",
    )
    parser.add_argument(
        "--padding-side",
        choices=("left", "right"),
        default=_model_default("padding_side"),
        help="how the policy's rows of different lengths are padded: 'left' (optimum's exports) or 'right' "
        "(attention reading each row's length from the mask: GroupQueryAttention, onnxruntime-genai's "
        "builder); default: the first that passes the batching check at load",
    )
    parser.add_argument(
        "--cache-in-place",
        choices=("on", "off"),
        default=_model_default("cache_in_place"),
        help="a right-padded policy's KV cache written in place by its session (one array a layer, no "
        "copy a step); default: on where a step so run matches the plain run, tried at load",
    )
    parser.add_argument(
        "--reward-kind",
        choices=("log_value", "prob", "logit"),
        default=_model_default("reward_kind"),
        help="what the reward output is: log Vh, Vh in [0, 1], or a logit (Vh = sigmoid)",
    )
    parser.add_argument(
        "--reward-output",
        default=_model_default("reward_output"),
        help="reward graph output to read (default: first)",
    )
    parser.add_argument(
        "--value-output",
        default=_model_default("value_output"),
        help="the policy graph's value output, read as the reward: one model for both roles, one run a step "
        "(one score per position: PolicyValue; a row of vocabulary size per position, a token-level twist: "
        f"PolicyTwist, which also serves --pool-size {EXACT_FORM} and --proposal optimal)",
    )
    parser.add_argument(
        "--reward-kv-cache",
        choices=("on", "off"),
        default=_model_default("reward_kv_cache"),
        help="a decoder reward model keeps a KV cache per particle (default: where its graph has one)",
    )
    parser.add_argument(
        "--reward-position",
        choices=("last", "delimiter"),
        default=_model_default("reward_position"),
        help="read per-position scores at the last token or at the last step delimiter",
    )
    parser.add_argument(
        "--reward-delimiters",
        type=_id_list,
        default=_model_default("reward_delimiters"),
        help="token ids ending a step, comma-separated (with --reward-position delimiter)",
    )
    parser.add_argument(
        "--reward-label",
        type=_count,
        default=_model_default("reward_label"),
        help="the class whose probability is Vh, for an output with a class axis last",
    )
    parser.add_argument(
        "--reward-classes",
        type=_id_list,
        default=_model_default("reward_classes"),
        help="comma-separated classes the label's probability is normalised over (default: all)",
    )
    # None: each its own default, stated (the help shows no default for None)
    several = (
        "; with several --workers, the cores shared out between them; on Ray, a replica's CPUs so shared"
        if demo_models
        else ""
    )
    parser.add_argument(
        "--threads", type=_thread_count, default=_model_default("threads"),
        help="threads for ONNX Runtime and the core (default: ONNX Runtime's choice, one a core, and the "
        f"core's, the machine's hardware threads{several})",
    )  # fmt: skip
    parser.add_argument("--cpu", action="store_true", help="use the CPU even where a GPU is usable")
    parser.add_argument(
        "--memory-arena",
        choices=("on", "off"),
        default=_model_default("memory_arena"),
        help="ONNX Runtime's CPU memory arena ('off' frees each run's buffers: less memory between runs, "
        "about half the speed on large batches; serve shrinks the arena when idle either way)",
    )
    _add_tokenization_and_session_arguments(parser)


# -- tokenization, chat prompts and ONNX Runtime session options --------------------------------------

# The CLI's model options, as (class, parameter) of the model classes whose signature holds the default;
# on/off options stand for True/False.
MODEL_OPTIONS: dict[str, tuple[str, str]] = {
    "max_new_tokens": ("OnnxCausalLM", "max_new_tokens"),
    "step": ("OnnxCausalLM", "step"),
    "temperature": ("OnnxCausalLM", "temperature"),
    "top_k": ("OnnxCausalLM", "top_k"),
    "top_p": ("OnnxCausalLM", "top_p"),
    "stop": ("OnnxCausalLM", "stop"),
    "prefill_tokens": ("OnnxCausalLM", "prefill_tokens"),
    "step_rows_below": ("OnnxCausalLM", "step_rows_below"),
    "check_batching": ("OnnxCausalLM", "check_batching"),
    "padding_side": ("OnnxCausalLM", "padding_side"),
    "cache_in_place": ("OnnxCausalLM", "cache_in_place"),
    "add_special_tokens": ("OnnxCausalLM", "add_special_tokens"),
    "skip_special_tokens": ("OnnxCausalLM", "skip_special_tokens"),
    "threads": ("OnnxCausalLM", "intra_op_num_threads"),
    "memory_arena": ("OnnxCausalLM", "memory_arena"),
    "reward_kind": ("OnnxRewardModel", "kind"),
    "reward_output": ("OnnxRewardModel", "output"),
    "reward_position": ("OnnxRewardModel", "position"),
    "reward_delimiters": ("OnnxRewardModel", "delimiter_ids"),
    "reward_label": ("OnnxRewardModel", "label"),
    "reward_classes": ("OnnxRewardModel", "classes"),
    "reward_kv_cache": ("OnnxRewardModel", "kv_cache"),
    "value_output": ("OnnxCausalLM", "value_output"),
}


def _option_names(class_name: str, path_option: str) -> dict[str, str]:
    """A model class's argument names (as its errors name them) -> the CLI options that set them."""
    names = {
        parameter: f"--{option.replace('_', '-')}"
        for option, (owner, parameter) in MODEL_OPTIONS.items()
        if owner == class_name
    }
    names.update(
        path=path_option,
        intra_op_num_threads="--threads",
        memory_arena="--memory-arena",
        session_options="--session-option",
        provider_options="--provider-option",
    )
    return names


# The library's argument names in a model's load errors, per model kind, as the options the CLI user typed
# (_cli_names writes them in): the library's messages name its own arguments.
POLICY_OPTION_NAMES = {**_option_names("OnnxCausalLM", "--policy"), "chat_template": "--chat-template"}
REWARD_OPTION_NAMES = {**_option_names("OnnxRewardModel", "--reward"), "reward": "--reward"}
# PolicyValue / PolicyTwist, the reward read from the policy's value output
VALUE_OPTION_NAMES = {
    "kind": "--reward-kind",
    "policy": "--value-output",
    "step": "--step",
    "value_output": "--value-output",
}
# ``name=VALUE`` in a message (``pass check_batching=False``, ``position='delimiter'``, ``label=``)
_ARGUMENT = re.compile(r"(?<![\w-])(?P<name>[a-z_]+)=(?P<value>None or False|'[^']*'|True|False|None|-?\d+)?")
_ARGUMENT_VALUES = {"True": "on", "False": "off", "None": "left out", "None or False": "left out or off"}
# the attribute of a load error naming its model kind's argument names (set by _named_options)
_OPTION_NAMES_ATTRIBUTE = "_tiltsmc_option_names"


def _cli_names(message: str, names: dict[str, str], leading: bool = True) -> str:
    """``message`` with the library's argument names written as the CLI's options: the leading ``name:``
    (with ``leading``) and each ``name=VALUE`` (``True`` / ``False`` as ``on`` / ``off``)."""

    def argument(match: re.Match[str]) -> str:
        option = names.get(match["name"])
        value = match["value"]
        if option is None:
            return match[0]
        return option if value is None else f"{option} {_ARGUMENT_VALUES.get(value, value.strip(chr(39)))}"

    head, colon, rest = message.partition(": ")
    if leading and colon and head in names:
        message = f"{names[head]}: {rest}"
    return _ARGUMENT.sub(argument, message)


@contextlib.contextmanager
def _named_options(names: dict[str, str]) -> Iterator[None]:
    """While a model loads: an error raised carries ``names``, its model kind's argument names as CLI
    options, which ``_load_models_or_fail`` writes into its message (the error itself is unchanged)."""
    try:
        yield
    except Exception as error:
        if not hasattr(error, _OPTION_NAMES_ATTRIBUTE):
            with contextlib.suppress(AttributeError, TypeError):
                setattr(error, _OPTION_NAMES_ATTRIBUTE, names)
        raise


def _model_default(option: str) -> Any:
    """A model option's default, read from the model class's signature (True / False as 'on' / 'off')."""
    import inspect

    from . import models

    class_name, parameter = MODEL_OPTIONS[option]
    value = inspect.signature(getattr(models, class_name)).parameters[parameter].default
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


# The characters of an argument shown in its refusal at most (a --prompt can be long): those around the
# first bad byte beyond it.
_SHOWN_CHARACTERS = 60


def _utf8_text(text: str) -> str:
    """``text``, where it is UTF-8 text: an argument whose bytes are not reaches Python with each bad byte
    as a lone surrogate, which ONNX Runtime's binding refuses with a raw "incompatible function arguments"
    error, a prompt fails with, and JSON writes as an escape strict readers refuse; refused here
    (``ArgumentTypeError``) naming the first bad byte, as ``--prompts`` names one (and, in a text longer
    than ``_SHOWN_CHARACTERS``, its offset in bytes, the text shown around it)."""
    found = not_utf8(text)
    if found is None:
        return text
    start, bad = found
    shown = text
    if len(text) > _SHOWN_CHARACTERS:
        first, last = max(start - _SHOWN_CHARACTERS // 2, 0), start + _SHOWN_CHARACTERS // 2
        shown = f"{'...' if first else ''}{text[first:last]}{'...' if last < len(text) else ''}"
        bad += f" at byte {len(text[:start].encode('utf-8'))}"
    raise argparse.ArgumentTypeError(f"'{shown_as_bytes(shown)}' is not UTF-8 text ({bad})")


def _session_option(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` of ``--session-option``: the value as an int, a bool (true / false), or the text."""
    name, equals, value = _utf8_text(text).partition("=")
    if not equals or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    parsed: Any = value
    if value.lower() in ("true", "false"):
        parsed = value.lower() == "true"
    else:
        with contextlib.suppress(ValueError):
            parsed = int(value)
    return name.strip(), parsed


def _session_config(text: str) -> tuple[str, str]:
    """``NAME=VALUE`` of ``--session-config``: a session config entry (ONNX Runtime takes text)."""
    name, equals, value = _utf8_text(text).partition("=")
    if not equals or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value


def _provider_option(text: str) -> tuple[str, str, str]:
    """``PROVIDER:NAME=VALUE`` of ``--provider-option``."""
    provider, colon, rest = _utf8_text(text).partition(":")
    name, equals, value = rest.partition("=")
    if not colon or not equals or not provider or not name:
        raise argparse.ArgumentTypeError(f"expected PROVIDER:NAME=VALUE, got {text!r}")
    return provider, name, value


def _add_tokenization_and_session_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--add-special-tokens",
        choices=("on", "off"),
        default=_model_default("add_special_tokens"),
        help="encode text prompts with the special tokens the tokenizer's post-processor adds (a BOS), as "
        "Hugging Face does",
    )
    parser.add_argument(
        "--skip-special-tokens",
        choices=("on", "off"),
        default=_model_default("skip_special_tokens"),
        help="leave special tokens (EOS, padding) out of the texts",
    )
    parser.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a Jinja chat template file for chat prompts (default: the tokenizer folder's)",
    )
    parser.add_argument(
        "--session-option",
        type=_session_option,
        action="append",
        default=None,
        metavar="NAME=VALUE",
        help="an onnxruntime.SessionOptions field for both models, e.g. graph_optimization_level=basic, "
        "inter_op_num_threads=1, log_severity_level=2 (repeatable)",
    )
    parser.add_argument(
        "--session-config",
        type=_session_config,
        action="append",
        default=None,
        metavar="NAME=VALUE",
        help="an ONNX Runtime session config entry for both models (SessionOptions."
        "add_session_config_entry), e.g. session.intra_op.allow_spinning=0 (repeatable)",
    )
    parser.add_argument(
        "--provider-option",
        type=_provider_option,
        action="append",
        default=None,
        metavar="PROVIDER:NAME=VALUE",
        help="an execution provider option for both models, e.g. CUDAExecutionProvider:device_id=1 "
        "(repeatable)",
    )


def _session_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The ONNX Runtime options of ``--session-option`` / ``--session-config`` / ``--provider-option`` for
    both models."""
    provider_options: dict[str, dict[str, str]] = {}
    for provider, name, value in getattr(args, "provider_option", None) or ():
        provider_options.setdefault(provider, {})[name] = value
    session_options: dict[str, Any] = dict(getattr(args, "session_option", None) or ())
    config = dict(getattr(args, "session_config", None) or ())
    if config and "config" not in session_options:  # (--session-option config=... is refused as it is)
        session_options["config"] = config
    return {"session_options": session_options or None, "provider_options": provider_options or None}


def _chat_template(args: argparse.Namespace) -> Optional[str]:
    path = getattr(args, "chat_template", None)
    if path is None:
        return None
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_LINE_BYTES + 1)  # (a FIFO or /dev/zero: never read without end)
        if len(data) > MAX_LINE_BYTES:
            raise ValueError(f"longer than {MAX_LINE_BYTES} bytes: not a chat template")
        return data.decode("utf-8").removeprefix("\ufeff")  # a leading byte-order mark is not template text
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"--chat-template: cannot read {path}: {error}") from None


# The longest line of a --prompts or --messages file, in bytes: 64 MiB is over 16 million tokens at the 4
# bytes a token of English text (more where tokens are shorter), past the longest context of today's
# decoders (10 million tokens, Llama 4 Scout's), so a longer line could never be a prompt; reading on
# (--prompts /dev/zero, a file with no line end) took the memory until the system ran out.
MAX_LINE_BYTES = 64 << 20


def _open_lines(option: str, path: Path) -> contextlib.AbstractContextManager[IO[bytes]]:
    """A file of prompts opened for reading bytes; ``-`` is standard input (left open afterwards)."""
    if str(path) == "-":
        if sys.stdin is None:  # started with it closed (<&-)
            raise CliError(f"{option}: -: standard input is closed")
        return contextlib.nullcontext(sys.stdin.buffer)
    return open(path, "rb")


def _file_name(path: Path) -> str:
    """How messages name a file of prompts."""
    return "standard input" if str(path) == "-" else str(path)


def _read_lines(option: str, path: Path) -> list[str]:
    """The lines of a file of prompts (``--prompts``, ``--messages``; ``-`` reads standard input): UTF-8
    text, without a leading byte-order mark, lines ending at LF (a CR before it dropped; not at ``\\x0b``,
    ``\\x1c`` or U+2028, where ``str.splitlines`` would also split). Read a line at a time, at most
    ``MAX_LINE_BYTES`` each; a file that cannot be read, is not UTF-8 or holds a longer line raises
    ``CliError`` naming ``option``."""
    lines: list[str] = []
    name = _file_name(path)
    try:
        with _open_lines(option, path) as handle:
            while data := handle.readline(MAX_LINE_BYTES + 1):
                number = len(lines) + 1
                if len(data.rstrip(b"\n")) > MAX_LINE_BYTES:
                    raise CliError(
                        f"{option}: {name} line {number} is longer than {MAX_LINE_BYTES} bytes, past any "
                        "model's context: not a prompt"
                    )
                try:
                    line = data.decode("utf-8")
                except UnicodeDecodeError as error:
                    bad = data[error.start]
                    raise CliError(
                        f"{option}: {name} is not UTF-8 text (byte 0x{bad:02x} on line {number})"
                    ) from None
                lines.append(line.removesuffix("\n").removesuffix("\r"))
    except IsADirectoryError:
        raise CliError(f"{option}: {name} is a directory, not a file of prompts") from None
    except FileNotFoundError:
        raise CliError(f"{option}: no such file: {name}") from None
    except OSError as error:
        raise CliError(f"{option}: cannot read {name}: {error.strerror or error}") from None
    if lines:
        lines[0] = lines[0].removeprefix("\ufeff")
    return lines


def _read_messages(path_text: str) -> list[Any]:
    """The conversations of a ``--messages`` file: one JSON list of messages per non-blank line."""
    from .models.chat import check_messages

    path = Path(path_text)
    lines = _read_lines("--messages", path)
    name = _file_name(path)
    conversations = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            loaded = json.loads(line, parse_constant=_no_constant, parse_float=_finite_float)
            _check_no_surrogate(loaded)
            conversations.append(check_messages(loaded))
        except RecursionError:
            raise CliError(f"--messages: {name} line {number}: JSON nested too deep") from None
        except ValueError as error:
            raise CliError(f"--messages: {name} line {number}: {_one_line(error)}") from None
    if not conversations:
        raise CliError(f"--messages: {name} holds no conversation")
    return conversations


def _check_no_surrogate(value: Any) -> None:
    """ValueError where a string of ``value`` (a loaded JSON value: keys too) holds a lone surrogate, which a
    ``\\udXXX`` escape gives and no UTF-8 text holds (the prompt failed after the run, or the output line
    carried it as an escape strict readers refuse)."""
    strings = [value] if isinstance(value, str) else []
    if isinstance(value, dict):
        strings = list(value)
        for item in value.values():
            _check_no_surrogate(item)
    elif isinstance(value, list):
        for item in value:
            _check_no_surrogate(item)
    for text in strings:
        found = not_utf8(text)
        if found is not None:
            code = ord(text[found[0]])
            raise ValueError(f"\\u{code:04x} is a lone surrogate escape, not a character of text")


def _no_constant(name: str) -> Any:
    """``json.loads``' ``parse_constant``: NaN and Infinity are not JSON (Python's reader takes them, and
    the run's output line, which echoes the prompt, is strict JSON: the run failed after sampling)."""
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    """``json.loads``' ``parse_float``: a number past the range of doubles (``1e400``) reads as infinity,
    which the output cannot write either."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is past the range of double-precision numbers")
    return value


def _chat_prompts(args: argparse.Namespace, texts: list[str]) -> list[Any]:
    """With ``--chat``, each text prompt as one user message."""
    if not getattr(args, "chat", False):
        return list(texts)
    return [[{"role": "user", "content": text}] for text in texts]


def _load_models(args: argparse.Namespace) -> tuple[Any, Any]:
    """The policy and reward model the options name (OSError / ValueError / TypeError for what cannot load,
    a reward model whose vocabulary differs from the policy's included)."""
    from .models import OnnxCausalLM, OnnxRewardModel, PolicyTwist, PolicyValue

    providers = ["CPUExecutionProvider"] if args.cpu else None
    _check_model_options(args)
    if getattr(args, "demo", False):
        from .tasks import arithmetic

        return arithmetic.load_models(
            intra_op_num_threads=args.threads, providers=providers, memory_arena=args.memory_arena == "on"
        )
    session = _session_arguments(args)
    chat_template = _chat_template(args)
    with _named_options(POLICY_OPTION_NAMES):
        policy = OnnxCausalLM(
            args.policy,
            max_new_tokens=args.max_new_tokens,
            step=args.step,  # escapes decoded by _step
            temperature=args.temperature,
            providers=providers,
            top_k=args.top_k,
            top_p=args.top_p,
            stop=args.stop,
            prefill_tokens=args.prefill_tokens,
            step_rows_below=args.step_rows_below,
            check_batching=args.check_batching == "on",
            padding_side=args.padding_side,
            cache_in_place=None if args.cache_in_place is None else args.cache_in_place == "on",
            intra_op_num_threads=args.threads,
            memory_arena=args.memory_arena == "on",
            value_output=args.value_output,
            add_special_tokens=args.add_special_tokens == "on",
            skip_special_tokens=args.skip_special_tokens == "on",
            chat_template=chat_template,
            **session,
        )
    if args.value_output is not None:  # one graph: a value per position, or a twist row per position
        _check_providers_used(args, [policy])
        with _named_options(VALUE_OPTION_NAMES):
            if policy.twist_head:
                return policy, PolicyTwist(policy, kind=args.reward_kind)
            return policy, PolicyValue(policy, kind=args.reward_kind)
    with _named_options(REWARD_OPTION_NAMES):
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
            kv_cache={None: None, "on": True, "off": False}[args.reward_kv_cache],
            **session,
        )
    check_policy = getattr(reward, "check_policy", None)  # vocabularies: bad input, found before the run
    if callable(check_policy):
        with _named_options(REWARD_OPTION_NAMES):
            check_policy(policy)
    _check_providers_used(args, [policy, reward])
    return policy, reward


# The options of the reward model loaded by --reward: with --value-output there is none (the policy's own
# head is read, as --reward-kind says), and each would be dropped.
_REWARD_MODEL_OPTIONS = tuple(
    option
    for option, (owner, parameter) in MODEL_OPTIONS.items()
    if owner == "OnnxRewardModel" and parameter != "kind"
)


def _given(args: argparse.Namespace, options: Sequence[str]) -> list[str]:
    """Those of ``options`` (``MODEL_OPTIONS``, or others whose default is None) that ``args`` sets to
    other than their default, as ``--option`` names."""
    given = []
    for option in options:
        default = _model_default(option) if option in MODEL_OPTIONS else None
        if getattr(args, option, default) != default:
            given.append(f"--{option.replace('_', '-')}")
    return given


def _check_model_options(args: argparse.Namespace) -> None:
    """Refuse (ValueError naming the option, before any model loads) the model options that would have no
    effect: options are refused, never dropped."""
    if getattr(args, "demo", False):  # the bundled models fix their own settings
        fixed = [option for option in MODEL_OPTIONS if option not in ("threads", "memory_arena")]
        given = _given(
            args, ("reward", "session_option", "session_config", "provider_option", "chat_template", *fixed)
        )
        if given:
            raise ValueError(
                f"{given[0]}: not an option of the bundled --demo models (they fix their own; load the "
                "models with --policy / --reward to set it)"
            )
        return
    if (args.reward is None) == (args.value_output is None):
        raise ValueError(
            "--reward: give a reward model, or --value-output to read the policy's own value head"
        )
    unused = _given(args, _REWARD_MODEL_OPTIONS) if args.value_output is not None else []
    if unused:
        raise ValueError(
            f"{unused[0]}: an option of the reward model --reward loads; with --value-output the policy's "
            "own head is read (as --reward-kind says)"
        )
    if args.reward_delimiters is not None and args.reward_position != "delimiter":
        raise ValueError(
            "--reward-delimiters: read only with --reward-position delimiter (the reward is read at the "
            f"{args.reward_position} token here); give that too, or leave them out"
        )


def _check_providers_used(args: argparse.Namespace, models: Sequence[Any]) -> None:
    """``--provider-option`` for a provider none of the loaded ``models`` runs on would have no effect:
    refused (ValueError naming the option). Except CUDA's without ``--cpu``: the models run on CUDA where a
    GPU is usable and on the CPU otherwise, so that one command line serves both kinds of machine; where
    they fell back, a warning says that its options are not used."""
    given = dict.fromkeys(provider for provider, _, _ in getattr(args, "provider_option", None) or ())
    used = {
        name
        for model in models
        if getattr(model, "session", None) is not None
        for name in model.session.get_providers()
    }
    if not used:  # models of another kind: their own rules
        return
    for provider in given:
        if provider in used:
            continue
        runs_on = ", ".join(sorted(used))
        if provider == "CUDAExecutionProvider" and not args.cpu:
            logger.warning(
                "--provider-option: the models run on %s here (CUDA only where a GPU is usable), so the "
                "options of %s have no effect",
                runs_on,
                provider,
            )
            continue
        why = " (--cpu)" if args.cpu else ""
        raise ValueError(
            f"--provider-option: the models run on {runs_on}{why}, not on {provider}: its options would "
            "have no effect"
        )


DESCRIPTION = "Sequential Monte Carlo sampling of reward-tilted language-model distributions."
EPILOG = "See 'tiltsmc COMMAND --help' for a command's options."

RUN_DESCRIPTION = """\
Sample an ONNX decoder LM guided by an ONNX reward model with any sampler. Results are JSON lines, one
per prompt, to standard output or --json PATH (a file is replaced atomically when the run has
succeeded); their schema ships with tiltsmc (tiltsmc/run.schema.json; tiltsmc.cli.output_schema()).
Each line records the run's configuration (sampler options, seed, model paths, versions) and the
prompt's own compute. A progress bar goes to standard error on a terminal; logs go to standard error,
with each failed prompt's reason (also with --quiet). Exit status: 0 (done), 1 (the run or the output
failed, or every prompt failed: a --json file is then left as it was, unless the error says it was partly
rewritten), 2 (bad arguments, prompts or model files). Ctrl-C, SIGTERM and SIGHUP end the run as they
would; its last line says what it left (the results, where they were written before the signal came)."""


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's default shown (``(default: ...)``) where it has one that a
    user could pass. Sampler options whose default is the sampler function's say it in their help, from
    ``_default`` (the functions' signatures: one place for the API, the CLI and the server)."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        text = action.help or ""
        if (
            action.option_strings
            and "default" not in text
            and not any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS))
        ):
            text += " (default: %(default)s)"
        return text


def _version_text() -> str:
    from . import __version__

    return f"tiltsmc {__version__}"


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    """Progress and logging (``run`` and ``demo``)."""
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        help="the least severe log messages shown on standard error",
    )
    parser.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="no progress bar, and only warnings and errors on standard error",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tiltsmc", description=DESCRIPTION, epilog=EPILOG, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=_version_text())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    run = commands.add_parser(
        "run",
        help="sample an ONNX policy guided by an ONNX reward model (one JSON line per prompt)",
        description=RUN_DESCRIPTION,
        formatter_class=_HelpFormatter,
    )
    prompts = run.add_mutually_exclusive_group(required=True)
    prompts.add_argument(
        "--prompt", type=_utf8_text, action="append", help="a prompt (repeatable; UTF-8 text)"
    )
    prompts.add_argument(
        "--prompts",
        help=f"a file of prompts, one per line, - for standard input (UTF-8; blank lines skipped; a line of "
        f"{MAX_LINE_BYTES} bytes "
        f"at most: {MAX_LINE_BYTES >> 20} MiB, over 16 million tokens, past any model's context)",
    )
    prompts.add_argument(
        "--messages",
        metavar="FILE",
        help="a JSON-lines file of chat prompts (- for standard input), each line a list of messages "
        '[{"role": "user", "content": "..."}] rendered by the chat template (a line of '
        f"{MAX_LINE_BYTES} bytes at most)",
    )
    run.add_argument(
        "--chat", action="store_true", help="each --prompt / --prompts line is a user message (chat template)"
    )
    # Sampler options left out take the sampler's own defaults (those of tiltsmc.smc and the others, which
    # the engine and the server use too): one set of defaults.
    run.add_argument(
        "--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER.replace("_", "-"), help="the sampler"
    )
    # Each sampler takes the options of _RUN_OPTIONS (those the server takes, SAMPLER_FIELDS); another one
    # given is refused.
    run.add_argument(
        "--particles",
        type=_particle_count,
        default=None,
        help=f"smc / mh: particles per prompt (default: {_default('smc', 'num_particles')} / "
        f"{_default('mh', 'num_particles')}; mh with one is SP-gSMC + MH, with more SMC + MH); best-of-n: "
        f"draws per prompt (default: {_default('best_of_n', 'n')}); rejection: draws per round (default: "
        f"{_default('rejection', 'batch_size')}); at most {MAX_PARTICLES}",
    )
    run.add_argument(
        "--resample",
        choices=core.SCHEMES,
        default=None,
        help=f"smc / mh: resampling scheme (default: {_default('smc', 'resample')} / "
        f"{_default('mh', 'resample')})",
    )
    run.add_argument(
        "--ess-threshold",
        type=_fraction,
        default=None,
        help="smc / mh: resample when ESS < this fraction of the particles "
        f"(default: {_default('smc', 'ess_threshold')} / {_default('mh', 'ess_threshold')})",
    )
    run.add_argument(
        "--pool-size",
        type=_pool_size,
        default=None,
        help=f"sp-gsmc / mh: candidates per step (default: {_default('sp_gsmc', 'pool_size')} / "
        f"{_default('mh', 'pool_size')}), or {EXACT_FORM}: each token drawn from the optimal proposal "
        "q ∝ p Vh_t, with no pool (needs a token-level policy and a twist head: --value-output of a "
        "twist, or a reward model with next-token values)",
    )
    run.add_argument(
        "--proposal",
        choices=PROPOSALS,
        default=None,
        help=f"smc: draw each step from the policy (naive) or each token from the optimal proposal "
        f"q ∝ p Vh_t (optimal; needs a twist head, as --pool-size {EXACT_FORM}) (default: "
        f"{_default('smc', 'proposal')})",
    )
    run.add_argument(
        "--mh-steps",
        type=_mh_step_count,
        default=None,
        help=f"mh: moves of the Metropolis-Hastings chain, at most {MAX_MH_STEPS} "
        f"(default: {_default('mh', 'steps')})",
    )
    run.add_argument(
        "--bound",
        type=positive_real_option,
        default=None,
        help=f"rejection: a bound C >= sup r on the reward (default: {_default('rejection', 'bound')})",
    )
    run.add_argument(
        "--num-samples",
        type=_sample_count,
        default=None,
        help=f"rejection: samples per prompt, at most {MAX_DRAWS} "
        f"(default: {_default('rejection', 'num_samples')})",
    )
    run.add_argument(
        "--max-tries",
        type=_try_count,
        default=None,
        help=f"rejection: draws per prompt at most, up to {MAX_DRAWS} "
        f"(default: {_default('rejection', 'max_tries')})",
    )
    run.add_argument(
        "--eps",
        type=_eps_option,
        default=None,
        help="the reward model's Bellman error you assume, a number >= 0 (0: an exact twist): warn when the "
        "run's online reading exceeds it (default: no check)",
    )
    run.add_argument(
        "--batch-size",
        type=positive_int_option,
        default=8,
        help="prompts sampled together (one model call per step for all of them)",
    )
    _add_model_arguments(run)
    run.add_argument(
        "--seed",
        type=_count,
        default=0,
        help="seed of the run: prompt i (from 0) draws from seed + i, as the server's choice i does (one "
        "prompt with --seed s is the sampler function's run with rng=s)",
    )
    run.add_argument(
        "--json",
        dest="json_path",
        default=None,
        metavar="PATH",
        help="write the JSON lines here ('-': standard output) (default: standard output)",
    )
    _add_output_options(run)

    serve = commands.add_parser(
        "serve",
        formatter_class=_HelpFormatter,
        help="serve the models over HTTP (OpenAI-style /v1/completions, /v1/chat/completions, /health, "
        "/metrics)",
        description="Serve concurrent sampling requests with the continuous-batching engine, behind an "
        "OpenAI-compatible HTTP API (needs the serve extra). Binds 127.0.0.1 unless --host says otherwise.",
    )
    _add_model_arguments(serve, demo_models=True)
    from .serving import ray as serving_ray
    from .serving import server as serving_server

    serving_server.add_arguments(serve)
    serving_ray.add_arguments(serve)

    from .demo import DEFAULT_THREADS, MAX_NOISE, DemoConfig

    demo = commands.add_parser(
        "demo",
        formatter_class=_HelpFormatter,
        help="guided SMC vs best-of-N on the bundled arithmetic task (table, plot, JSON)",
        description="Accuracy of best-of-N, SMC, SP-gSMC and SP-gSMC + MH at equal policy compute on the "
        "bundled arithmetic-chain task, guided by its learned process reward model and by a degraded one, "
        "and the reward models' Bellman error. Writes demo.txt, demo.json and demo.png to --out.",
    )
    defaults = DemoConfig()  # the demo's defaults: one set, the Python API's
    demo.add_argument(
        "--levels",
        type=positive_int_option,
        nargs="+",
        default=list(defaults.levels),
        metavar="T",
        help="numbers of reasoning steps (1..16, each once)",
    )
    demo.add_argument(
        "--budgets",
        type=positive_int_option,
        nargs="+",
        default=list(defaults.budgets),
        metavar="C",
        help="policy steps per reasoning step: best-of-N's N, SMC's particles, the pool size (each once)",
    )
    demo.add_argument(
        "--problems", type=positive_int_option, default=defaults.problems, help="problems per level"
    )
    demo.add_argument(
        "--noise",
        type=_non_negative_real,
        default=defaults.noise,
        help=f"sd of the degraded reward model's log-value noise, at most {MAX_NOISE:g} (its values' ratios "
        "stay within double precision)",
    )
    demo.add_argument(
        "--seed", type=_count, default=defaults.seed, help="seed of the problems and the samplers"
    )
    demo.add_argument(
        "--threads",
        type=_thread_count,
        default=defaults.threads,
        help=f"ONNX Runtime threads (default: {DEFAULT_THREADS})",
    )
    demo.add_argument("--out", default="tiltsmc-demo", help="output folder (created if needed)")
    _add_output_options(demo)
    return parser


def _read_prompts(args: argparse.Namespace) -> list[Any]:
    """``--prompt`` values, or the non-blank lines of the ``--prompts`` file (UTF-8, lines end at LF), as
    user messages with ``--chat``; or the conversations of a ``--messages`` file."""
    chat = getattr(args, "messages", None) is not None or getattr(args, "chat", False)
    if getattr(args, "messages", None) is not None and getattr(args, "chat", False):
        raise CliError(
            "--chat: makes each --prompt / --prompts line a user message; --messages lines are chats"
        )
    if getattr(args, "chat_template", None) is not None and not chat:  # refused, never dropped
        raise CliError("--chat-template: only chat prompts use it (--chat, --messages)")
    if getattr(args, "messages", None) is not None:
        return _read_messages(args.messages)
    return _chat_prompts(args, _read_text_prompts(args))


def _read_text_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return list(args.prompt)
    path = Path(args.prompts)
    prompts = [line for line in _read_lines("--prompts", path) if line.strip()]
    if not prompts:
        raise CliError(f"--prompts: {_file_name(path)} holds no prompt")
    return prompts


# tiltsmc run's sampler options, as the sampler functions' parameters (per sampler): those the server takes
# (tiltsmc.serving.server.SAMPLER_FIELDS), and rejection's number of samples and draws, which the server
# fixes itself. Any other sampler option given is refused (_sampler_options).
_RUN_OPTIONS: dict[str, dict[str, str]] = {
    "smc": {
        "particles": "num_particles",
        "resample": "resample",
        "ess_threshold": "ess_threshold",
        "proposal": "proposal",
    },
    "sp-gsmc": {"pool_size": "pool_size"},
    "mh": {
        "particles": "num_particles",
        "pool_size": "pool_size",
        "mh_steps": "steps",
        "resample": "resample",
        "ess_threshold": "ess_threshold",
    },
    "best-of-n": {"particles": "n"},
    "rejection": {
        "bound": "bound",
        "particles": "batch_size",
        "num_samples": "num_samples",
        "max_tries": "max_tries",
    },
}
# the samplers without guided steps: no log Z increments, so no online Bellman reading (--eps is refused)
_UNGUIDED = ("best-of-n", "rejection")
# every sampler option of tiltsmc run (each None when not given)
_SAMPLER_OPTIONS = tuple(dict.fromkeys(option for options in _RUN_OPTIONS.values() for option in options))


def _default(sampler: str, option: str) -> Any:
    """A sampler option's default, from the sampler function's signature (for help texts)."""
    return sampler_defaults(sampler)[option]


def _prompt_rng(seed: int, index: int) -> np.random.Generator:
    """Prompt ``index``'s generator (``index`` counts from 0 across the whole input):
    ``default_rng(seed + index)``, the server's rule for its choices (``choice_seed``), so that one prompt
    seeded ``s`` is the sampler function's run with ``rng=s``, and a prompt's result depends on the seed and
    its place only, not on ``--batch-size`` or the other prompts (the models' arithmetic aside: a batched
    session call may round differently)."""
    return np.random.default_rng(choice_seed(seed, index))


def _sampler_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler function's options: its defaults, overridden by those given on the command line. An
    option given that the sampler does not take is refused (``CliError``), as the server refuses it."""
    name = args.sampler.replace("-", "_")
    taken = _RUN_OPTIONS[args.sampler]
    for option in _SAMPLER_OPTIONS:
        if getattr(args, option) is not None and option not in taken:
            accepted = ", ".join(f"--{each.replace('_', '-')}" for each in taken)
            raise CliError(
                f"--{option.replace('_', '-')}: not an option of --sampler {args.sampler} "
                f"(it takes {accepted})"
            )
    if getattr(args, "eps", None) is not None and args.sampler in _UNGUIDED:
        raise CliError(
            f"--eps: --sampler {args.sampler} takes no guided steps, so it gives no online Bellman reading "
            "to check --eps against (smc, sp-gsmc and mh do)"
        )
    given = {
        parameter: getattr(args, option)
        for option, parameter in _RUN_OPTIONS[args.sampler].items()
        if getattr(args, option) is not None
    }
    if given.get("pool_size") == EXACT_FORM:
        given["pool_size"] = None
    options = {**sampler_defaults(name), **given}
    if args.sampler == "mh":
        _check_mh_form(args, options["num_particles"])
    return options


def _check_mh_form(args: argparse.Namespace, particles: int) -> None:
    """mh's proposals are SP-gSMC runs with one particle, which read ``--pool-size``, and SMC runs with
    more, which read ``--resample`` and ``--ess-threshold`` (``samplers.correction.options_not_read``): an
    option of the other form, given, would have no effect, and is refused (``CliError``), as options are,
    never dropped."""
    given = [name for name in ("pool_size", "resample", "ess_threshold") if getattr(args, name) is not None]
    for option in options_not_read(given, particles):
        if option == "pool_size":
            raise CliError(
                f"--pool-size: not used by --sampler mh with --particles {particles} (its proposals are SMC "
                "runs, which take --resample and --ess-threshold; the pool is SP-gSMC's, with one particle)"
            )
        raise CliError(
            f"--{option.replace('_', '-')}: not used by --sampler mh with one particle (its "
            "proposals are SP-gSMC runs, which take --pool-size; SMC's resampling options need "
            "--particles 2 or more)"
        )


def _check_optimal_form(options: dict[str, Any], models: Models) -> None:
    """``--pool-size exact`` or ``--proposal optimal`` with models that cannot draw from the optimal
    proposal: refused (``CliError``) once the models are loaded, before any prompt runs (the sampler would
    fail every prompt alike)."""
    option = optimal_form_option(options)
    if option is not None and not models.supports_optimal_proposal():
        flag, value = ("--pool-size", EXACT_FORM) if option == "pool_size" else ("--proposal", "optimal")
        raise CliError(f"{flag}: {value} needs {OPTIMAL_FORM_NEEDS}")


def _step_budget(args: argparse.Namespace, options: dict[str, Any], policy: Any) -> Optional[int]:
    """The most steps one prompt can take (for the progress bar): ``max_new_tokens`` per pass; None where
    the number of passes is random (rejection)."""
    limit = options.get("max_new_tokens") or getattr(policy, "max_new_tokens", None)
    if not isinstance(limit, int) or args.sampler == "rejection":
        return None
    return limit * (int(options["steps"]) + 1 if args.sampler == "mh" else 1)


def _sample(
    args: argparse.Namespace,
    models: Models,
    options: dict[str, Any],
    prompts: list[Any],
    offset: int,
    progress: StepProgress,
) -> tuple[list[SamplerResult], dict[int, BaseException]]:
    """One run per prompt, batched in one ``tiltsmc.samplers.lane.Lane`` (one model call per step
    for all of them, as the serving engine does), so that each prompt gets its own result, seeded by
    ``_prompt_rng``, and its own share of the compute. A run alone gives exactly the sampler
    function's result for that prompt and generator. A run that fails (its model outputs, ONNX Runtime's
    errors) fails its prompt alone: its result is ``failed_result`` with the error (``prompt 0: ...``), and
    the exception is returned too, by index in the batch. Where a model call raises for the batch, its
    prompts run again from their start in halves (``run_together``'s ``again``), so that the one that
    makes it fail fails alone."""
    build = SAMPLER_FUNCTIONS[args.sampler.replace("-", "_")][1]  # one table: the engine's

    latest: dict[int, Run] = {}  # prompt i's last run: a failed prompt's compute is that run's

    steps = [0] * len(prompts)  # prompt i's steps in its latest run
    again: list[int] = []  # prompts run again from their start at the step not yet counted

    def prompt_run(i: int) -> Run:  # prompt i's run from its start (again where its batch's call failed)
        if i in latest:
            again.append(i)
        latest[i] = build(models, [prompts[i]], rng=_prompt_rng(args.seed, offset + i), **options)
        return latest[i]

    runs = [prompt_run(i) for i in range(len(prompts))]

    def on_step(stepped: list[int], ended: list[int]) -> None:
        for i in stepped:
            steps[i] += 1
        progress.advance(len(stepped))
        for i in again:  # the failed step included
            progress.restarted(steps[i])
            steps[i] = 0
        again.clear()
        for i in ended:
            progress.prompt_done(steps[i])

    results: list[SamplerResult] = []
    failures: dict[int, BaseException] = {}
    together = run_together(models, runs, on_step, return_errors=True, again=prompt_run)
    for i, result in enumerate(together):
        if isinstance(result, BaseException):
            failures[i] = result
            message = prompt_error(0, _one_line(result))  # a run per prompt
            result = failed_result(latest[i].sampler, {0: message}, latest[i].compute)
        results.append(result)
    return results, failures


def _batches_together(policy: Any, reward: Any) -> bool:
    """Whether prompts can share a lane (models that the serving engine can batch); else one at a time."""
    return all(getattr(model, "supports_engine", False) is True for model in (policy, reward))


def run_configuration(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    """The ``run`` object of every record: what produced it (see the output schema)."""
    from . import __version__

    try:
        import onnxruntime

        runtime: Optional[str] = str(onnxruntime.__version__)
    except ImportError:  # pragma: no cover - the models could not have loaded
        runtime = None
    models = {name: getattr(args, name) for name in _model_option_names() if hasattr(args, name)}
    for name in ("policy", "reward"):
        if models.get(name) is not None:
            models[name] = os.path.abspath(models[name])
    configuration: dict[str, Any] = finite_or_none(
        {
            "tiltsmc_version": __version__,
            "onnxruntime_version": runtime,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "sampler": args.sampler.replace("-", "_"),
            "options": options,
            "seed": args.seed,
            "batch_size": args.batch_size,
            "models": models,
        }
    )
    return configuration


def _record(result: SamplerResult, prompt: Any, index: int, run_info: dict[str, Any]) -> dict[str, Any]:
    """One prompt's line (its result holds that prompt only); the fields are those of the output schema."""
    whole = result.to_dict()
    record: dict[str, Any] = {"prompt_index": index, "prompt": prompt, "sampler": whole["sampler"]}
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
        "mh_accepted",
        "proposal_log_z",
        "log_rewards",
    ):
        if key in whole:
            record[key] = whole[key][0]
    best = result.best(0)
    record["best"] = best
    record["best_text"] = result.best_texts()[0]
    if "0" in whole.get("errors", {}):
        record["error"] = whole["errors"]["0"]
    record["compute"] = whole["compute"]  # this prompt's own share
    record["run"] = run_info
    return record


def output_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a ``tiltsmc run`` line, shipped as ``tiltsmc/run.schema.json``."""
    from importlib.resources import files

    schema: dict[str, Any] = json.loads(files("tiltsmc").joinpath("run.schema.json").read_text("utf-8"))
    return schema


def _load_models_or_fail(args: argparse.Namespace) -> tuple[Any, Any]:
    """``_load_models``; bad files or options raise ``CliError`` (status 2), whose message names the CLI's
    options where the library's names its own arguments (``path`` as ``--policy`` or ``--reward``)."""

    def message(error: Exception) -> str:
        return _cli_names(_one_line(error), getattr(error, _OPTION_NAMES_ATTRIBUTE, {}))

    try:
        return _load_models(args)
    except (OSError, ValueError, TypeError) as error:
        raise CliError(message(error)) from None
    except RuntimeError as error:  # e.g. a GPU that ONNX Runtime cannot use
        raise CliError(message(error), 1) from None
    except ImportError as error:  # no ONNX Runtime installed: the message names the extra to install
        raise CliError(message(error), 1) from None


def _chat_option(args: argparse.Namespace) -> Optional[str]:
    """The option that asks for chat prompts (``--messages``, ``--chat``), or None: text prompts."""
    if getattr(args, "messages", None) is not None:
        return "--messages"
    return "--chat" if getattr(args, "chat", False) else None


def _check_chat_renderer(args: argparse.Namespace) -> None:
    """Chat prompts are rendered with jinja2 (the chat extra): where it cannot be imported, refused before
    the models load (status 1, a missing dependency as ONNX Runtime's is), else each prompt would fail
    alone."""
    from .models.chat import _import_jinja2

    option = _chat_option(args)
    if option is None:
        return
    try:
        _import_jinja2()
    except ImportError as error:
        raise CliError(f"{option}: {_one_line(error)}", 1) from None


def _check_chat_template(args: argparse.Namespace, policy: Any) -> None:
    """Chat prompts (``--chat``, ``--messages``) need the policy's tokenizer to have a chat template:
    refused before the run where it has none (else each prompt would fail alone)."""
    option = _chat_option(args)
    if option is None:
        return
    tokenizer = getattr(policy, "tokenizer", None)
    if tokenizer is None:
        if hasattr(policy, "tokenizer"):  # a policy without one: token ids only
            raise CliError(f"{option}: chat prompts need a tokenizer, and the policy has none")
        return  # a policy of another kind: its own rules
    if getattr(tokenizer, "chat_template", "") is None:
        raise CliError(
            f"{option}: the policy's tokenizer ({getattr(tokenizer, 'source', args.policy)}) has no chat "
            "template (no chat_template in tokenizer_config.json, no chat_template.jinja beside it): give "
            "one with --chat-template FILE"
        )


def _prompt_error(index: int, error: str) -> str:
    """A failed prompt's line on standard error: its index in the whole input and the reason, the
    library's argument names as the CLI's options."""
    reason = prompt_reason(error)  # its prefix is the sampler's own index: 0, a run per prompt
    return f"prompt {index}: {_cli_names(reason, {**POLICY_OPTION_NAMES, **REWARD_OPTION_NAMES}, False)}"


def _files_read(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``(option, path)`` of the files a run reads: its prompts, its chat template, the files of a model's
    folder (or of the folder of its .onnx file)."""
    files = [
        (f"--{name.replace('_', '-')}", getattr(args, name))
        for name in ("prompts", "messages", "chat_template")
        if getattr(args, name, None)
    ]
    for name in ("policy", "reward"):
        given = getattr(args, name, None)
        if given:
            folder = Path(given) if Path(given).is_dir() else Path(given).parent
            with contextlib.suppress(OSError):
                files.extend((f"--{name}", entry.path) for entry in os.scandir(folder))
    return files


def run(args: argparse.Namespace) -> int:
    prompts = _read_prompts(args)
    options = _sampler_options(args)  # an option the sampler does not take: refused before anything runs
    _check_chat_renderer(args)
    output = ResultOutput(args.json_path, _files_read(args))
    _LEFT[:] = [output.left]  # an interruption from here on (the summary's logging too) says what it holds
    try:
        output.open()  # refused here, before any model is loaded, if it cannot be written
        if args.threads is not None:
            core.set_num_threads(args.threads)
        policy, reward = _load_models_or_fail(args)
        _check_chat_template(args, policy)
        run_info = run_configuration(args, options)
        models = Models(policy, reward, Compute())
        _check_optimal_form(options, models)
        batch_size = args.batch_size if _batches_together(policy, reward) else 1
        logger.debug("run configuration: %s", json.dumps(run_info))
        progress = StepProgress(
            len(prompts),
            _step_budget(args, options, policy),
            f"tiltsmc {args.sampler}",
            _progress_enabled(args),
        )
        began = time.perf_counter()
        failed = 0
        readings = []
        try:
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start : start + batch_size]
                # a prompt whose run failed (ONNX Runtime's own errors, bad model outputs) fails alone
                results, failures = _sample(args, models, options, batch, start, progress)
                records = []
                for i, (prompt, result) in enumerate(zip(batch, results)):
                    readings.append(online_bellman(result))
                    records.append(_record(result, prompt, start + i, run_info))
                for i, record in enumerate(records):  # each failed prompt's reason, --quiet or not (an error)
                    if "error" in record:
                        failed += 1
                        line = _prompt_error(record["prompt_index"], str(record["error"]))
                        failure = failures.get(i)
                        if failure is not None and failure.__traceback__ and _tracebacks_wanted():
                            line += "\n" + _traceback(failure).rstrip()
                        logger.error("%s", line)
                with _cleared_progress(output):
                    output.write([json.dumps(record, allow_nan=False) + "\n" for record in records])
                raise_if_signalled()
        finally:
            progress.close()
        raise_if_signalled()
        if failed == len(prompts):  # a failed run: an existing file keeps its old content
            raise CliError(f"all {len(prompts)} prompt(s) failed; {output.left()}", 1)
        output.commit()
    except BaseException:
        output.discard()
        raise
    logger.info(
        "%d prompt(s), %d failed, %.2fs%s", len(prompts), failed, time.perf_counter() - began, output.where
    )
    reading = OnlineBellman.combine(readings)
    logger.info("%s", reading.summary(eps=args.eps))
    for message in reading.warnings(args.eps):
        logger.warning("%s", message)
    return 0


def _cleared_progress(output: ResultOutput) -> contextlib.AbstractContextManager[Any]:
    """Lines written to a terminal (standard output, or a character device) clear the progress bar first,
    so that results and the bar never share a line."""
    stream = output.stream
    if stream is not None and stream.isatty():
        cleared: contextlib.AbstractContextManager[Any] = _tqdm().external_write_mode(file=stream)
        return cleared
    return contextlib.nullcontext()


def serve(args: argparse.Namespace) -> int:
    from .serving import ray as serving_ray
    from .serving import server as serving_server

    try:  # Ray options without --ray (or --target-ongoing without --autoscale): refused, never dropped
        serving_ray.check_options(args)
        _check_model_options(args)  # before Ray starts: its replicas load the models
        settings = serving_server.Settings.from_args(args)
    except ValueError as error:
        raise CliError(str(error)) from None
    # on Ray a replica's workers share the CPUs it reserves (finite: checked as parsed), not the machine's
    replica_cores = max(1, math.ceil(serving_ray.replica_cpus(args))) if args.ray else None
    args.threads = serve_threads(args.threads, settings.workers, replica_cores)
    if args.ray:  # the replicas load the models
        options = serving_ray.ReplicaOptions(
            {name: getattr(args, name) for name in _model_option_names()}, settings
        )
        try:
            return serving_ray.serve_on_ray(args, options)
        except ImportError as error:  # no Ray: a missing dependency, status 1 as in run and demo
            raise CliError(_one_line(error), 1) from None
        except ValueError as error:
            raise CliError(_one_line(error)) from None
        except serving_ray.DeployFailed as error:
            raise CliError(_one_line(error), 1) from None
    try:  # before the models load: a server that cannot start loads nothing
        serving_server.require_serve_extra()
    except ImportError as error:
        raise CliError(_one_line(error), 1) from None
    if args.threads is not None:
        core.set_num_threads(args.threads)
    with _logging_to_stderr(args):  # the models' warnings as they load (the server logs its own)
        policy, reward = _load_models_or_fail(args)
    try:
        return serving_server.serve(args, settings, policy, reward)
    except ImportError as error:
        raise CliError(_one_line(error), 1) from None
    except ValueError as error:  # settings the models cannot meet
        raise CliError(_one_line(error)) from None


def serve_threads(threads: Optional[int], workers: int, cores: Optional[int] = None) -> Optional[int]:
    """The ONNX Runtime (and core) threads of ``tiltsmc serve``'s models: ``--threads`` where given; else
    with several workers, whose session calls run side by side, the ``cores`` (default: those this
    process may use) shared out between them, at least one each; else None (ONNX Runtime's default, one a
    core)."""
    from .serving.engine import usable_cores

    if threads is not None or workers <= 1:
        return threads
    return max(1, (usable_cores() if cores is None else cores) // workers)


def serve_model_defaults() -> dict[str, Any]:
    """``tiltsmc serve``'s model options by destination (what a replica needs to load the models), each at
    its default as the command line has it (the model classes' own, ``MODEL_OPTIONS``): what a Ray
    replica's ``ReplicaOptions`` takes for the options it is not given."""
    parser = argparse.ArgumentParser(add_help=False)
    _add_model_arguments(parser, demo_models=True)
    return {action.dest: action.default for action in parser._actions}


def _model_option_names() -> list[str]:
    """The destinations of ``tiltsmc serve``'s model options (what a replica needs to load the models)."""
    return list(serve_model_defaults())


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
        if not args.out:  # Path("") is the current folder
            raise ValueError("out: expected a folder name, got ''")
        _check_demo_runtime()  # before the output folder is made
        demo_module.check_output_folder(out)
    except ValueError as error:
        raise CliError(f"demo: --{error}") from None
    if args.threads is not None:
        core.set_num_threads(args.threads)
    with _demo_progress(args) as report:
        record = demo_module.run_demo(config, progress=report)
    raise_if_signalled()
    written: list[Path] = []  # each file as it is in place

    def left() -> str:  # a signal from here on (the table and the summary's logging too) says which
        return f"the demo was done: wrote {', '.join(map(str, written))}" if written else _NOTHING_LEFT

    _LEFT[:] = [left]
    try:
        demo_module.write_outputs(record, out, written=written)
    except OSError as error:  # the file it names (a folder's error: the folder), and those replaced before
        replaced = f" ({', '.join(map(str, written))} replaced before)" if written else ""
        raise CliError(
            f"demo: cannot write {error.filename or out}: {error.strerror or error}{replaced}", 1
        ) from None
    print(demo_module.render_table(record))
    logger.info("demo: %.0fs; wrote %s", record["seconds"], ", ".join(str(p) for p in written))
    return 0


def _check_demo_runtime() -> None:
    """The demo runs its models on ONNX Runtime, which its extra brings: where none is installed, refused
    before it starts (status 1, as ``tiltsmc run`` refuses it), naming the demo's extra."""
    from .models._ort import import_onnxruntime

    try:
        import_onnxruntime()
    except ImportError as error:
        if error.name != "onnxruntime":  # pragma: no cover - one installed that fails to import: its error
            raise
        raise CliError(
            "demo needs ONNX Runtime and none is installed: pip install 'tiltsmc[demo]'", 1
        ) from None


@contextlib.contextmanager
def _demo_progress(args: argparse.Namespace, every: float = 10.0) -> Iterator[Any]:
    """The demo's progress (sampler runs done of all): a ``tqdm`` bar on a terminal; otherwise (piped,
    in a log file) an INFO line at most every ``every`` seconds and at the end, with the ETA."""
    bar = _tqdm()(
        desc="tiltsmc demo", unit="run", file=sys.stderr, disable=not _progress_enabled(args), **_bar_size()
    )
    began = time.perf_counter()
    last = [began]

    def report(done: int, total: int) -> None:
        if not bar.disable:
            bar.total = total
            bar.update(done - bar.n)
            return
        now = time.perf_counter()
        if done < total and now - last[0] < every:
            return
        last[0] = now
        elapsed = now - began
        eta = elapsed / done * (total - done) if done else math.nan
        logger.info("demo: %d/%d sampler runs, %.0fs elapsed, about %.0fs left", done, total, elapsed, eta)

    try:
        yield report
    finally:
        bar.close()


# Says what the command that main runs has left so far, for the last line of an interruption (Ctrl-C, a
# terminating signal), which can come at any point, after the results were written too (while the summary
# is logged): tiltsmc run's ResultOutput.left once its output exists, tiltsmc demo's files once written.
# Emptied by main as a command starts.
_LEFT: list[Callable[[], str]] = []


def _left() -> str:
    """What the interrupted command left (``_LEFT``): no result file, before it says otherwise."""
    return _LEFT[-1]() if _LEFT else _NOTHING_LEFT


def _quiet_stdout() -> None:
    """Standard output's reader has gone: point it at /dev/null, so that Python's final flush does not
    report the broken pipe again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``tiltsmc`` command: returns the exit status (see the module docstring)."""
    if sys.stderr is None:  # started with standard error closed (2>&-): its lines go nowhere, not to stdout
        sys.stderr = open(os.devnull, "w")  # for the rest of the process
    args = build_parser().parse_args(argv)
    _LEFT.clear()
    try:
        if args.command == "serve":  # a server: its own signal handling, no result file
            return serve(args)
        with signals_raise(), _logging_to_stderr(args):
            return run(args) if args.command == "run" else demo(args)
    except CliError as error:
        if error.code == 1 and "broken pipe" in str(error):
            _quiet_stdout()
        print(f"tiltsmc: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        print(f"tiltsmc: interrupted; {_left()}", file=sys.stderr)
        return 130
    except Signalled as signalled:
        name = signal.Signals(signalled.signum).name
        print(f"tiltsmc: stopped by {name}; {_left()}", file=sys.stderr)
        if threading.current_thread() is threading.main_thread():  # end by the same signal, as expected
            signal.signal(signalled.signum, signal.SIG_DFL)
            os.kill(os.getpid(), signalled.signum)
        return 128 + signalled.signum
    except BrokenPipeError:
        _quiet_stdout()
        # what was written, as after a signal (a demo that had written its files before the table)
        print(f"tiltsmc: standard output was closed by its reader (broken pipe); {_left()}", file=sys.stderr)
        return 1
    except Exception as error:  # never a traceback, unless asked for
        if _tracebacks_wanted():
            raise
        print(f"tiltsmc: unexpected error: {type(error).__name__}: {_one_line(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
