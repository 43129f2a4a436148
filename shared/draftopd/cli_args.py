"""Shared pieces of the ``draftopd`` command line: the error type and argparse value types."""

from __future__ import annotations

import argparse
from typing import Any

Subparsers = Any  # argparse's _SubParsersAction is private; it is only passed through


class CommandError(Exception):
    """A command could not do its job (port in use, a child died, ...): exit 1 with the message."""


def non_negative_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from err
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {number}")
    return number


def positive_int(value: str) -> int:
    number = non_negative_int(value)
    if number == 0:
        raise argparse.ArgumentTypeError("must be >= 1, got 0")
    return number


def float_arg(value: str) -> float:
    try:
        return float(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from err


def positive_float(value: str) -> float:
    number = float_arg(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def non_negative_float(value: str) -> float:
    number = float_arg(value)
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


__all__ = [
    "CommandError",
    "Subparsers",
    "float_arg",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "positive_int",
]
