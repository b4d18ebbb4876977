"""The ``prompts`` argument of the policies and samplers: a sequence of prompts, never one bare string."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

__all__ = ["check_prompts"]


def check_prompts(prompts: Optional[Iterable[Any]]) -> Optional[list[Any]]:
    """``prompts`` as a list (None stays None: one unconditioned prompt).

    A ``str`` (or ``bytes``) is refused with a TypeError rather than read as one prompt per character:
    ``prompts="hello"`` would otherwise run five one-letter prompts. Pass ``["hello"]`` for one prompt.
    Anything else that is not iterable is refused too. The elements themselves are checked by the policy,
    prompt by prompt (a bad one fails alone, in ``result.errors``).
    """
    if prompts is None:
        return None
    if isinstance(prompts, (str, bytes, bytearray, memoryview)):
        raise TypeError(
            f"prompts: expected a list of prompts, got a {type(prompts).__name__} ({prompts!r:.40}); "
            "pass a list, e.g. [prompt] for one prompt"
        )
    try:
        return list(prompts)
    except TypeError:
        raise TypeError(
            f"prompts: expected a list of prompts (texts or token-id sequences), got {type(prompts).__name__}"
        ) from None
