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
