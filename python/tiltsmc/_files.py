"""Files written whole: a temporary file beside the target, renamed over it once complete (with the
signals that would part a few such system calls held back)."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, Optional

__all__ = ["TERMINATING_SIGNALS", "create_beside", "reserve_space", "signals_deferred"]

TERMINATING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
# The longest file name where the file system does not say (ext4, XFS, Btrfs, tmpfs and NTFS take 255).
NAME_MAX = 255
# posix_fallocate's errors that say the space cannot be reserved this way (no such call on the file system,
# or for this file), rather than that there is no room for it
_CANNOT_RESERVE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back while inside (a few system calls that must not be parted), so
    that their handlers run after it, each signal received once; a no-op off the main thread. Blocking
    them in the main thread (``pthread_sigmask``) is not enough where the process has other threads (ONNX
    Runtime's): the kernel gives the signal to one of those, and Python runs its handler in the main
    thread all the same, at once. So Python-level handlers (``signals_raise``'s, Ctrl-C's
    ``KeyboardInterrupt``) are replaced by one that records the signal, raised again on the way out; those
    of the operating system (``SIG_DFL``, ``SIG_IGN``) stay, the signals only blocked. An event loop's
    wakeup descriptor (``signal.set_wakeup_fd``: asyncio's signal handlers) is off meanwhile, so that the
    loop hears each signal once, when it is raised again. Every handler is put back even where one
    raises on the way (a signal's handler run as another is restored), and every signal received is raised
    again even where the handler of one before it raises (``KeyboardInterrupt``): the first error is raised
    after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def record(signum: int, frame: Optional[FrameType]) -> None:
        received.append(signum)

    signums = (signal.SIGINT, *TERMINATING_SIGNALS)
    mask = getattr(signal, "pthread_sigmask", None)
    replaced: dict[int, Any] = {}  # signal -> its handler before
    previous_mask: Optional[set[signal.Signals]] = None
    wakeup = -1
    try:
        wakeup = signal.set_wakeup_fd(-1)  # else the C handler tells the loop now, and again when raised
        for signum in signums:
            if callable(signal.getsignal(signum)):
                replaced[signum] = signal.signal(signum, record)
        if mask is not None:
            previous_mask = mask(signal.SIG_BLOCK, signums)
        yield
    finally:
        failure: Optional[BaseException] = None
        steps: list[Callable[[], Any]] = []
        if mask is not None and previous_mask is not None:
            steps.append(lambda: mask(signal.SIG_SETMASK, previous_mask))  # those pending come now, to record
        steps += [functools.partial(signal.signal, signum, handler) for signum, handler in replaced.items()]
        steps.append(lambda: signal.set_wakeup_fd(wakeup))
        for step in steps:
            try:
                step()
            except BaseException as error:  # a handler run meanwhile (KeyboardInterrupt): restore the rest
                failure = failure or error
        for signum in dict.fromkeys(received):  # to the handlers they would have had
            try:
                signal.raise_signal(signum)
            except BaseException as error:  # KeyboardInterrupt from SIGINT's: the signals after it still come
                failure = failure or error
        if failure is not None:
            raise failure


def _name_limit(folder: Path) -> int:
    """The longest file name ``folder``'s file system takes, in bytes (``NAME_MAX`` where it does not say)."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # Windows has no pathconf
        return NAME_MAX
    return limit if limit > 0 else NAME_MAX


def create_beside(target: Path, mode: int = 0o666, suffix: str = "") -> tuple[int, Path]:
    """Create a new file ``.NAME.tiltsmc-XXXXXXXX`` + ``suffix`` in ``target``'s folder (a suffix for
    writers that read the format from it, as matplotlib does); returns its descriptor (open for writing)
    and path. ``NAME`` is ``target``'s name, cut at a character's end where the whole name would be longer
    than the file system takes (a target name of 238 to 255 bytes). ``mode`` less the umask, as the kernel
    applies it (``tempfile.mkstemp`` would make it ``0600``, unreadable by anyone else once renamed over
    the target). Raises OSError (e.g. a folder that cannot be written), FileExistsError after 100 names
    taken."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    limit = _name_limit(target.parent)
    for _ in range(100):
        tag = f".tiltsmc-{os.urandom(4).hex()}{suffix}"
        name = target.name
        room = limit - len(os.fsencode(f".{tag}"))  # the bytes left for the target's name
        while name and len(os.fsencode(name)) > room:
            name = name[:-1]
        candidate = target.with_name(f".{name}{tag}")
        try:
            return os.open(candidate, flags, mode), candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {target}: 100 names taken")


def reserve_space(descriptor: int, size: int) -> bool:
    """Reserve the disk space of a file's first ``size`` bytes (``os.posix_fallocate``) before they are
    overwritten, so that a full disk, a quota or a file size limit fails here, the file unchanged (raises
    OSError: ENOSPC, EDQUOT, EFBIG). Returns False where the space cannot be reserved so (no
    ``posix_fallocate``, a file system without it): a later write may then still fail midway. A failed
    call that left the file longer (C libraries that emulate it by writing) is cut back to its length."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:
        return False
    if size <= 0:  # nothing to reserve (posix_fallocate refuses a length of 0)
        return True
    length = os.fstat(descriptor).st_size
    try:
        fallocate(descriptor, 0, size)
    except OSError as error:
        with contextlib.suppress(OSError):
            if os.fstat(descriptor).st_size != length:
                os.ftruncate(descriptor, length)
        if error.errno in _CANNOT_RESERVE:
            return False
        raise
    return True
