"""Argument types of the ``tinyprop`` commands: each parses and range-checks one value, so a
bad value stops the parser with a one-line message and exit code 2, never a traceback.

Example:
    >>> parser = argparse.ArgumentParser()
    >>> _ = parser.add_argument("--threads", type=positive_int)
    >>> parser.parse_args(["--threads", "2"]).threads
    2
"""

from __future__ import annotations

import argparse
import math

from tinyprop.config import LARGEST_SEED


def _integer(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def _finite(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (threads, epochs, batch sizes, sample counts)."""
    value = _integer(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _integer(text, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def seed(text: str) -> int:
    """A seed: an integer in [0, 2^31 - 1] (see :class:`tinyprop.TinyPropConfig`)."""
    what = f"an integer in [0, {LARGEST_SEED}]"
    value = _integer(text, what)
    if not 0 <= value <= LARGEST_SEED:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """Any finite number (its range is checked where it is used, e.g. TinyPropConfig)."""
    return _finite(text, "a finite number")


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates)."""
    value = _finite(text, "a finite number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (momentum, weight decay)."""
    value = _finite(text, "a finite number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value
