"""Number types for command-line options (argparse ``type=`` callables), shared by ``tiltsmc``'s own
options and those ``tiltsmc serve`` takes from ``tiltsmc.serving``."""

from __future__ import annotations

import argparse
import math


def real_option(text: str, low: float, high: float, low_open: bool, high_open: bool, what: str) -> float:
    """``text`` as a float within ``low`` .. ``high`` (each end open or closed); otherwise an
    ``ArgumentTypeError`` saying ``expected {what}``, which argparse reports with the option's name."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if math.isnan(value) or not inside:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def int_option(text: str, minimum: int) -> int:
    """``text`` as an integer >= ``minimum``; otherwise an ``ArgumentTypeError`` (argparse names the
    option)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text}")
    return value


def positive_int_option(text: str) -> int:
    """``text`` as an integer >= 1 (``int_option``)."""
    return int_option(text, 1)


def positive_real_option(text: str) -> float:
    """``text`` as a finite number > 0 (``real_option``)."""
    return real_option(text, 0.0, math.inf, True, True, "a finite number > 0")
