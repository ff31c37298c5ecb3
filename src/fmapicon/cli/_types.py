"""argparse ``type=`` validators shared by the subcommands and the benchmarks.

Each takes the option's text and returns the parsed value, or raises
``argparse.ArgumentTypeError`` with a message that names what was expected, so that a bad
option fails at parsing with ``fmapicon CMD: error: argument --X: ...`` and nothing runs.
(The leading underscore keeps this module out of the subcommand discovery.)
"""

from __future__ import annotations

import argparse
import math
import os
import re


def _number(kind, text: str, expected: str):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def at_least(minimum: int):
    """A validator of integers >= ``minimum``."""

    def check(text: str) -> int:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        value = _number(int, text, expected)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return check


positive_int = at_least(1)
non_negative_int = at_least(0)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _number(float, text, "a positive number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    value = _number(float, text, "a finite number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def int_list(minimum: int = 1):
    """A validator of comma-separated integers >= ``minimum``, e.g. ``64,120``."""
    each = at_least(minimum)

    def check(text: str) -> list[int]:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers >= {minimum}, got {text!r}")
        return [each(part) for part in parts]

    return check


def device_name(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether it exists is checked when it is used)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def existing_folder(text: str) -> str:
    """A folder that exists."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder")
    return text


def training_source(text: str) -> str:
    """A training source of ``fmapicon.data.pairs``: an existing path, ``synth`` or ``synth:k=v,...``."""
    if text != "synth" and not text.startswith("synth:") and not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text!r} does not exist (give video files, frame folders or 'synth')")
    return text


def plain_text(doc: str | None) -> str | None:
    """A module docstring as a help text: reStructuredText's ``literal`` marks dropped."""
    return doc.replace("``", "") if doc else doc
