"""Tokenizers for ONNX models: a ``tokenizers.Tokenizer`` from a tokenizer.json, or none (token ids)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import numpy.typing as npt

__all__ = ["Tokenizer", "load_tokenizer"]


class Tokenizer:
    """Encodes prompts and decodes generated ids with the ``tokenizers`` library."""

    def __init__(self, inner: Any, source: str) -> None:
        self.inner = inner
        self.source = source

    @property
    def vocab_size(self) -> int:
        return int(self.inner.get_vocab_size(with_added_tokens=True))

    def vocabulary(self) -> dict[str, int]:
        return dict(self.inner.get_vocab(with_added_tokens=True))

    def encode(self, text: str) -> npt.NDArray[np.int64]:
        """Token ids of ``text``; ValueError for text that is not valid Unicode (a lone surrogate, as
        ``json.loads`` gives for a client's ``"\\ud800"``), which the tokenizer would refuse with a
        TypeError that does not say why."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"not valid Unicode text: {error.reason} {text[error.start]!r} at character {error.start}"
            ) from None
        return np.asarray(self.inner.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids: npt.ArrayLike) -> str:
        token_ids = np.asarray(ids, dtype=np.int64).reshape(-1).tolist()  # Python ints, in one call
        return str(self.inner.decode(token_ids, skip_special_tokens=False))

    def token_id(self, token: str) -> Optional[int]:
        value = self.inner.token_to_id(token)
        return None if value is None else int(value)


def load_tokenizer(
    tokenizer: Union[str, os.PathLike[str], Any, None], model_dir: Optional[Path]
) -> Optional[Tokenizer]:
    """``tokenizer``: a path to tokenizer.json (or its folder), a ``tokenizers.Tokenizer``, or None to look
    for tokenizer.json beside the model (returns None when there is none: prompts must be token ids)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        if (
            hasattr(tokenizer, "encode")
            and hasattr(tokenizer, "decode")
            and hasattr(tokenizer, "get_vocab_size")
        ):
            return Tokenizer(tokenizer, type(tokenizer).__name__)
        raise TypeError(
            f"tokenizer: expected a path or a tokenizers.Tokenizer, got {type(tokenizer).__name__}"
        )
    if tokenizer is None:
        if model_dir is None or not (model_dir / "tokenizer.json").is_file():
            return None
        path = model_dir / "tokenizer.json"
    else:
        path = Path(tokenizer)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer: no tokenizer file at {path}")
    from tokenizers import Tokenizer as HFTokenizer

    try:
        inner = HFTokenizer.from_file(os.fspath(path))
    except Exception as error:
        raise ValueError(f"tokenizer: {path} is not a valid tokenizer.json: {error}") from error
    return Tokenizer(inner, os.fspath(path))
