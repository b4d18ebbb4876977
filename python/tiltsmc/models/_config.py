"""Values read from a model's config.json / generation_config.json (or onnxruntime-genai's
genai_config.json) or given as arguments, checked at load: every error names where the value came from
(``/path/config.json: bos_token_id`` or ``bos_token_id``) and what is wrong with it."""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np

__all__ = [
    "Source",
    "file_problem",
    "optional_file",
    "positive_int",
    "real_number",
    "section",
    "token_id",
    "token_ids",
]


class Source:
    """Where a value comes from: a JSON file (its path) or an argument (None). ``prefix``: where ``values``
    lie in the file (``"model."``: its ``model`` object), written before a field's name."""

    def __init__(self, path: Optional[Path], values: Mapping[str, Any], prefix: str = "") -> None:
        self.path = path
        self.values = values
        self.prefix = prefix

    def get(self, field: str) -> Any:
        """The field's value; None where it is missing or ``null`` (as the Hugging Face configs write it)."""
        return self.values.get(field)

    def name(self, field: str) -> str:
        return field if self.path is None else f"{self.path}: {self.prefix}{field}"


def section(path: Path, values: Mapping[str, Any], key: str) -> Source:
    """The JSON object ``values[key]`` of the file at ``path`` as a Source whose fields are named
    ``key.field`` (onnxruntime-genai's genai_config.json keeps the model's under ``model``): empty where
    ``key`` is missing or ``null``; ValueError naming the file and key where it is not an object."""
    inner = values.get(key)
    if inner is None:
        inner = {}
    elif not isinstance(inner, Mapping):
        raise ValueError(f"{path}: {key}: expected a JSON object, got {type(inner).__name__}")
    return Source(path, inner, prefix=f"{key}.")


def first(sources: list[tuple[Source, str]]) -> tuple[Any, str]:
    """The first of ``(source, field)`` that is set, and its name for error messages (else None, '')."""
    for source, field in sources:
        value = source.get(field)
        if value is not None:
            return value, source.name(field)
    return None, ""


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def token_id(value: Any, where: str, vocab_size: int) -> int:
    """A token id in ``[0, vocab_size)``: an int (not a bool, a float, a string)."""
    if not _is_int(value) or not 0 <= int(value) < vocab_size:
        raise ValueError(f"{where}: expected a token id in [0, {vocab_size}), got {value!r}")
    return int(value)


def token_ids(value: Any, where: str, vocab_size: int) -> frozenset[int]:
    """One token id or a list of them (an empty list: none)."""
    if isinstance(value, (list, tuple, set, frozenset)):
        return frozenset(token_id(v, where, vocab_size) for v in value)
    if isinstance(value, np.ndarray) and value.ndim == 1:
        return frozenset(token_id(v, where, vocab_size) for v in value.tolist())
    return frozenset([token_id(value, where, vocab_size)])


def positive_int(value: Any, where: str) -> int:
    """An int >= 1."""
    if not _is_int(value) or int(value) < 1:
        raise ValueError(f"{where}: expected an integer >= 1, got {value!r}")
    return int(value)


def real_number(value: Any, where: str) -> float:
    """A real number (an int or a float, not a bool or a string that looks like one), as a float
    (``as_float``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{where}: expected a number, got {value!r}")
    return as_float(value)


def as_float(value: Any) -> float:
    """``float(value)``, an int past the range of doubles read as ``+inf`` or ``-inf`` (``float`` raises
    OverflowError, which named no argument), so that the caller's range check names it."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def flag(value: Any, where: str) -> bool:
    """A bool (numpy's too), not any object Python would read as true or false."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where}: expected True or False, got {value!r}")
    return bool(value)


def file_problem(path: Path) -> str:
    """What keeps ``path`` from being read as a file: ``"does not exist"``, ``"is a directory"``, ``"is a
    broken symbolic link (to X)"``, ``"is not a regular file"`` (a socket, a FIFO, a device), ``"is not a
    valid path (a NUL byte)"``; ``""`` for a regular file (symbolic links followed)."""
    try:
        mode = os.stat(path).st_mode
    except ValueError:  # os.stat's "embedded null byte", which named no path
        return "is not a valid path (a NUL byte)"
    except OSError as error:
        if os.path.islink(path):
            return f"is a broken symbolic link (to {os.readlink(path)})"
        return "does not exist" if isinstance(error, FileNotFoundError) else f"cannot be read: {error}"
    if stat.S_ISREG(mode):
        return ""
    return "is a directory" if stat.S_ISDIR(mode) else "is not a regular file"


def optional_file(path: Path, where: str) -> bool:
    """Whether a file a model folder may hold is there: True for a regular file, False where nothing of
    that name is; ValueError naming ``where`` (``config.json``) where something else is (a directory, a
    broken symbolic link), which would otherwise be taken silently as no file."""
    problem = file_problem(path)
    if not problem:
        return True
    if problem == "does not exist":
        return False
    raise ValueError(f"{where}: {path} {problem}, not a file")
