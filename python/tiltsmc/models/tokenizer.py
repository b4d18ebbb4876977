"""Tokenizers for ONNX models: a ``tokenizers.Tokenizer`` from a tokenizer.json, or none (token ids).

Text is encoded and decoded as Hugging Face's ``transformers`` does by default: ``encode`` runs the
tokenizer's own post-processor (``add_special_tokens=True``: a BOS, or whatever its tokenizer.json's
``post_processor`` adds), ``decode`` leaves special tokens out (``skip_special_tokens=True``); both can
be turned off. Chat messages are rendered with the chat template of the tokenizer's folder
(``tiltsmc.models.chat``) and encoded without adding special tokens again: the template writes them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import numpy.typing as npt
import tokenizers

from . import chat
from ._config import file_problem, flag, optional_file

logger = logging.getLogger(__name__)

__all__ = ["Tokenizer", "load_tokenizer"]


class Tokenizer:
    """Encodes prompts and decodes generated ids with the ``tokenizers`` library.

    ``add_special_tokens``: ``encode`` adds what the tokenizer's post-processor adds (a BOS for most
    models); ``skip_special_tokens``: ``decode`` leaves special tokens (``<|endoftext|>``, ``<pad>``)
    out. ``chat_template`` (a Jinja template, from tokenizer_config.json or chat_template.jinja) and
    ``special_tokens`` (``bos_token``, ``eos_token``, ... as tokenizer_config.json names them) render chat
    messages (``encode_chat``).
    """

    def __init__(
        self,
        inner: Any,
        source: str,
        *,
        add_special_tokens: bool = True,
        skip_special_tokens: bool = True,
        chat_template: Optional[str] = None,
        special_tokens: Optional[Mapping[str, Any]] = None,
    ) -> None:
        self.inner = inner
        self.source = source
        self.add_special_tokens = flag(add_special_tokens, "add_special_tokens")
        self.skip_special_tokens = flag(skip_special_tokens, "skip_special_tokens")
        if chat_template is not None and not isinstance(chat_template, str):
            raise TypeError(
                f"chat_template: expected a Jinja template string, got {type(chat_template).__name__}"
            )
        self.chat_template = chat_template
        self.special_tokens: dict[str, Any] = dict(special_tokens or {})

    def with_options(
        self,
        add_special_tokens: Optional[bool] = None,
        skip_special_tokens: Optional[bool] = None,
        chat_template: Optional[str] = None,
    ) -> Tokenizer:
        """A copy with these options changed (None: kept); the ``tokenizers`` object is shared."""
        return Tokenizer(
            self.inner,
            self.source,
            add_special_tokens=self.add_special_tokens if add_special_tokens is None else add_special_tokens,
            skip_special_tokens=(
                self.skip_special_tokens if skip_special_tokens is None else skip_special_tokens
            ),
            chat_template=self.chat_template if chat_template is None else chat_template,
            special_tokens=self.special_tokens,
        )

    @property
    def vocab_size(self) -> int:
        return int(self.inner.get_vocab_size(with_added_tokens=True))

    def vocabulary(self) -> dict[str, int]:
        return dict(self.inner.get_vocab(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: Optional[bool] = None) -> npt.NDArray[np.int64]:
        """Token ids of ``text``, with the special tokens the post-processor adds unless
        ``add_special_tokens`` (default: the tokenizer's setting) is False.

        ValueError for text that is not valid Unicode (a lone surrogate, as ``json.loads`` gives for a
        client's ``"\\ud800"``), which the tokenizer would refuse with a TypeError that does not say why."""
        if not isinstance(text, str):
            raise TypeError(f"encode: expected a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"not valid Unicode text: {error.reason} {text[error.start]!r} at character {error.start}"
            ) from None
        add = self.add_special_tokens if add_special_tokens is None else add_special_tokens
        if isinstance(self.inner, tokenizers.Tokenizer):
            # encode_batch, not encode: the same ids, but it lets other threads run while it works (encode
            # holds the GIL, and a long prompt stalled a server's event loop and its engine for as long)
            (encoding,) = self.inner.encode_batch([text], add_special_tokens=bool(add))
        else:  # a tokenizer object of the user's own: its encode
            encoding = self.inner.encode(text, add_special_tokens=bool(add))
        return np.asarray(encoding.ids, dtype=np.int64)

    def decode(self, ids: npt.ArrayLike, skip_special_tokens: Optional[bool] = None) -> str:
        """The text of ``ids``, special tokens left out unless ``skip_special_tokens`` (default: the
        tokenizer's setting) is False. An id the tokenizer does not have decodes to nothing; a negative
        one is a ValueError."""
        given = np.asarray(ids)
        if given.size and given.dtype.kind not in "iu":  # a float (or bool) id was truncated to an int
            raise ValueError(f"decode: expected integer token ids, got {given.dtype} ones")
        try:
            token_ids = given.astype(np.int64).reshape(-1).tolist()  # Python ints, in one call
            return str(self.inner.decode(token_ids, skip_special_tokens=self._skip(skip_special_tokens)))
        except OverflowError:  # the tokenizers library's ids are unsigned 32-bit
            raise ValueError(f"decode: expected token ids in [0, 2**32), got {_outside_u32(ids)}") from None

    def decode_batch(self, ids: Sequence[list[int]], skip_special_tokens: Optional[bool] = None) -> list[str]:
        """``decode`` of each list of token ids, in one call of the tokenizer where it has one."""
        skip = self._skip(skip_special_tokens)
        try:
            if not isinstance(self.inner, tokenizers.Tokenizer):  # a tokenizer object of the user's own
                return [str(self.inner.decode(list(each), skip_special_tokens=skip)) for each in ids]
            return [str(text) for text in self.inner.decode_batch(list(ids), skip_special_tokens=skip)]
        except OverflowError:
            found = next((bad for bad in map(_outside_u32, ids) if bad is not None), None)
            raise ValueError(f"decode: expected token ids in [0, 2**32), got {found}") from None

    def largest_id(self) -> tuple[int, str]:
        """The largest token id every text is encoded with or may be, and what gives it: a special token the
        post-processor adds (where ``add_special_tokens``), else the vocabulary's size less one (the
        ``tokenizers`` library numbers added tokens after the vocabulary; a vocabulary whose ids leave gaps
        may hold larger ones, which ``OnnxCausalLM.encode_prompt`` refuses prompt by prompt). Read without
        listing the vocabulary (tens of milliseconds for large ones)."""
        inner = self.inner
        largest, what = self.vocab_size - 1, f"its {self.vocab_size} tokens"
        if not isinstance(inner, tokenizers.Tokenizer):
            return largest, what
        if self.add_special_tokens:  # what every text prompt gets (a BOS, ...)
            encoding = inner.encode("", add_special_tokens=True)
            for token_id, token in zip(encoding.ids, encoding.tokens):
                if token_id > largest:
                    largest, what = int(token_id), f"the special token {token!r} its post-processor adds"
        return largest, what

    def _skip(self, skip_special_tokens: Optional[bool]) -> bool:
        if skip_special_tokens is None:
            return self.skip_special_tokens
        return flag(skip_special_tokens, "skip_special_tokens")

    def token_text(self, token_id: int) -> Optional[str]:
        """The token of ``token_id`` as the vocabulary writes it (None where it has no such id, or the
        tokenizer object cannot say)."""
        to_token = getattr(self.inner, "id_to_token", None)
        if to_token is None or not 0 <= token_id < 1 << 32:
            return None
        value = to_token(int(token_id))
        return None if value is None else str(value)

    def token_id(self, token: str) -> Optional[int]:
        value = self.inner.token_to_id(token)
        return None if value is None else int(value)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """``messages`` rendered by the chat template (``tiltsmc.models.chat.render_chat_template``)."""
        if self.chat_template is None:
            raise ValueError(
                f"a chat prompt needs a chat template, and the tokenizer {self.source} has none (no "
                "chat_template in tokenizer_config.json, no chat_template.jinja beside it): pass "
                "chat_template= or a text prompt"
            )
        return chat.render_chat_template(
            self.chat_template, messages, self.special_tokens, add_generation_prompt=add_generation_prompt
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> npt.NDArray[np.int64]:
        """Token ids of the rendered chat: the template writes the special tokens it wants, so none are
        added again (as ``transformers``' ``apply_chat_template(tokenize=True)``)."""
        return self.encode(
            self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False
        )


def _outside_u32(ids: Any) -> Optional[Any]:
    """The first of ``ids`` (a sequence, nested or not) outside ``[0, 2**32)``, else None."""
    for value in np.asarray(ids, dtype=object).reshape(-1).tolist():
        if isinstance(value, (int, np.integer)) and not 0 <= int(value) < 1 << 32:
            return value
    return None


def load_tokenizer(
    tokenizer: Union[str, os.PathLike[str], Any, None],
    model_dir: Optional[Path],
    *,
    add_special_tokens: bool = True,
    skip_special_tokens: bool = True,
    chat_template: Optional[str] = None,
) -> Optional[Tokenizer]:
    """``tokenizer``: a path to tokenizer.json (or its folder), a ``tokenizers.Tokenizer``, a
    ``Tokenizer``, or None to look for tokenizer.json beside the model (returns None when there is
    none: prompts must be token ids). The chat template and special tokens come from the tokenizer's
    folder (the model's for a ``tokenizers.Tokenizer``): ``chat_template.jinja``, else
    ``tokenizer_config.json``'s ``chat_template``; ``chat_template=`` overrides them. The options apply to
    a ``Tokenizer`` too (a copy). A ``chat_template`` given is checked here (``chat.check_chat_template``):
    a Jinja syntax error, or a file's path in place of its text, fails at load, not at the first chat
    prompt."""
    if chat_template is not None:
        chat.check_chat_template(chat_template)
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.with_options(add_special_tokens, skip_special_tokens, chat_template)
    options: dict[str, Any] = {
        "add_special_tokens": add_special_tokens,
        "skip_special_tokens": skip_special_tokens,
    }
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        if (
            hasattr(tokenizer, "encode")
            and hasattr(tokenizer, "decode")
            and hasattr(tokenizer, "get_vocab_size")
        ):
            template, special = _folder_template(model_dir, chat_template)
            return Tokenizer(
                tokenizer, type(tokenizer).__name__, chat_template=chat_template or template,
                special_tokens=special, **options,
            )  # fmt: skip
        raise TypeError(
            f"tokenizer: expected a path or a tokenizers.Tokenizer, got {type(tokenizer).__name__}"
        )
    if tokenizer is None:
        if model_dir is None or not optional_file(model_dir / "tokenizer.json", "tokenizer"):
            return None
        path = model_dir / "tokenizer.json"
    else:
        path = Path(tokenizer)
        if path.is_dir():
            path = path / "tokenizer.json"
        problem = file_problem(path)
        if problem == "does not exist":
            raise FileNotFoundError(f"tokenizer: no tokenizer file at {path}")
        if problem:
            raise ValueError(f"tokenizer: {path} {problem}, not a tokenizer file")
    from tokenizers import Tokenizer as HFTokenizer

    try:
        # from its bytes: from_file takes the path as UTF-8 text, which a path of other bytes is not
        inner = HFTokenizer.from_buffer(path.read_bytes())
    except OSError as error:
        raise ValueError(f"tokenizer: cannot read {path}: {error.strerror or error}") from error
    except Exception as error:
        raise ValueError(f"tokenizer: {path} is not a valid tokenizer.json: {error}") from error
    template, special = _folder_template(path.parent, chat_template)
    return Tokenizer(
        inner, os.fspath(path), chat_template=chat_template or template, special_tokens=special, **options
    )


def _folder_template(folder: Optional[Path], given: Optional[str]) -> tuple[Optional[str], dict[str, Any]]:
    """``chat.read_tokenizer_config(folder)``; where its template is the one used (no ``chat_template=``
    ``given``) and does not compile, a warning says so at load, naming the folder: the model still loads,
    for text prompts, and each chat prompt fails with the syntax error (a server's chat clients would
    otherwise be the first to learn of it)."""
    template, special = chat.read_tokenizer_config(folder)
    if given is None and template is not None:
        problem = chat.template_problem(template)
        if problem is not None:
            logger.warning(
                "the chat template of %s (chat_template.jinja or tokenizer_config.json) does not compile, "
                "so chat prompts will fail: %s; pass chat_template= (--chat-template FILE) to replace it",
                folder,
                problem,
            )
    return template, special
