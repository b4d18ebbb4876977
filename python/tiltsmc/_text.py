"""Text that reached Python from the operating system's bytes (arguments, paths): a byte that is not UTF-8
is kept as the lone surrogate U+DC00 + the byte (PEP 383), which no UTF-8 text holds."""

from __future__ import annotations

from typing import Optional

__all__ = ["not_utf8", "shown_as_bytes"]


def not_utf8(text: str) -> Optional[tuple[int, str]]:
    """None where ``text`` is UTF-8 text; else the index of its first character UTF-8 cannot encode and
    what it is: ``byte 0xNN`` for an undecodable byte kept as a surrogate, else ``character U+XXXX``."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as error:
        start = error.start
    code = ord(text[start])
    return start, f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X}"


def shown_as_bytes(text: str) -> str:
    """``text`` with each undecodable byte kept as a surrogate written back as ``\\xNN``."""
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else c for c in text)
