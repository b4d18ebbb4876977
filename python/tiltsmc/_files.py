"""Files written whole: a temporary file beside the target, renamed over it once complete."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["create_beside"]


def create_beside(target: Path, mode: int = 0o666, suffix: str = "") -> tuple[int, Path]:
    """Create a new file ``.NAME.tiltsmc-XXXXXXXX`` + ``suffix`` in ``target``'s folder (a suffix for
    writers that read the format from it, as matplotlib does); returns its descriptor (open for writing)
    and path. ``mode`` less the umask, as the kernel applies it (``tempfile.mkstemp`` would
    make it ``0600``, unreadable by anyone else once renamed over the target). Raises OSError (e.g. a
    folder that cannot be written), FileExistsError after 100 names taken."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        candidate = target.with_name(f".{target.name}.tiltsmc-{os.urandom(4).hex()}{suffix}")
        try:
            return os.open(candidate, flags, mode), candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {target}: 100 names taken")
