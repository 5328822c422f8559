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
import re
from collections.abc import Callable
from typing import TypeVar

from tinyprop.config import LARGEST_SEED

T = TypeVar("T")


def _parsed(text: str, convert: Callable[[str], T], what: str, accept: Callable[[T], bool]) -> T:
    """``convert(text)`` when that works and ``accept`` takes the value; else the parser's error
    ``must be WHAT, got 'TEXT'``."""
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not accept(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (threads, epochs, batch sizes, sample counts)."""
    return _parsed(text, int, "a positive integer", lambda value: value >= 1)


MAX_THREADS = 1024  # torch starts that many threads at its first operation


def thread_count(text: str) -> int:
    """An integer in [1, 1024]: ``--threads 100000`` started 100,000 threads (12 s for one
    512 x 512 product, then each operation as slow), which looked like a hang."""
    return _parsed(
        text, int, f"an integer in [1, {MAX_THREADS}]", lambda value: 1 <= value <= MAX_THREADS
    )


MAX_EPOCHS = 10_000  # the suites train 1-50 epochs; 10^12 ran on as if the command hung


def epoch_count(text: str) -> int:
    """Epochs: an integer in [1, 10,000] (``--epochs 1000000000000`` was accepted and trained
    until it was killed)."""
    what = f"an integer in [1, {MAX_EPOCHS}]"
    return _parsed(text, int, what, lambda value: 1 <= value <= MAX_EPOCHS)


def pretrain_epoch_count(text: str) -> int:
    """Pretraining epochs: an integer in [0, 10,000] (0: no pretraining)."""
    what = f"an integer in [0, {MAX_EPOCHS}]"
    return _parsed(text, int, what, lambda value: 0 <= value <= MAX_EPOCHS)


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _parsed(text, int, "an integer >= 0", lambda value: value >= 0)


def seed(text: str) -> int:
    """A seed: an integer in [0, 2^31 - 1] (see :class:`tinyprop.TinyPropConfig`)."""
    what = f"an integer in [0, {LARGEST_SEED}]"
    return _parsed(text, int, what, lambda value: 0 <= value <= LARGEST_SEED)


def finite_float(text: str) -> float:
    """Any finite number (its range is checked where it is used, e.g. TinyPropConfig)."""
    return _parsed(text, float, "a finite number", math.isfinite)


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates)."""
    return _parsed(text, float, "a finite number > 0", lambda v: math.isfinite(v) and v > 0)


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (momentum, weight decay)."""
    return _parsed(text, float, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)


# a device's RAM as its datasheet gives it: kilobytes and megabytes of SRAM are powers of 1024
_BYTES = re.compile(r"(\d+)\s*(?:([KM])(?:I?B)?|B)?")
_BYTE_UNITS = {None: 1, "K": 1024, "M": 1024**2}


def byte_count(text: str) -> int:
    """A positive number of bytes: ``262144``, or with a unit as a datasheet writes it,
    ``256K`` / ``256KB`` / ``256KiB`` (x 1024), ``1M`` / ``1MB`` / ``1MiB`` (x 1024²)."""

    def convert(value: str) -> int | None:
        match = _BYTES.fullmatch(value.strip().upper())
        return None if match is None else int(match[1]) * _BYTE_UNITS[match[2]]

    return _parsed(text, convert, "a positive number of bytes (e.g. 262144 or 256K)",
                   lambda value: value is not None and value >= 1)  # fmt: skip
