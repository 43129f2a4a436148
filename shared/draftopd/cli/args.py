"""Shared pieces of the ``draftopd`` command line: the error type and argparse value types."""

from __future__ import annotations

import argparse
import re
from argparse import SUPPRESS
from collections.abc import Callable
from dataclasses import MISSING, Field, fields, is_dataclass
from typing import Any, TypeVar

Subparsers = Any  # argparse's _SubParsersAction is private; it is only passed through
C = TypeVar("C")
T = TypeVar("T")


class CommandError(Exception):
    """A command could not do its job (port in use, a child died, ...): exit 1 with the message."""


def _parsed(value: str, kind: Callable[[str], T], what: str) -> T:
    try:
        return kind(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from err


def int_arg(value: str) -> int:
    return _parsed(value, int, "an integer")


def non_negative_int(value: str) -> int:
    number = int_arg(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {number}")
    return number


def positive_int(value: str) -> int:
    number = non_negative_int(value)
    if number == 0:
        raise argparse.ArgumentTypeError("must be >= 1, got 0")
    return number


def float_arg(value: str) -> float:
    return _parsed(value, float, "a number")


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


# -- flags generated from config dataclasses (training/configs.py) -------------------------------
_TYPES: dict[str, Callable[[str], Any]] = {
    "int": int_arg,
    "int | None": int_arg,
    "Int": int_arg,
    "Int | None": int_arg,
    "float": float_arg,
    "float | None": float_arg,
    "str": str,
    "str | None": str,
    "Text": str,
    "Text | None": str,
}


def add_config_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    title: str,
    only: tuple[str, ...] | None = None,
    required: tuple[str, ...] = (),
    defaults: bool = False,
) -> None:
    """One flag per field of the config dataclass ``cls`` (nested configs included), with the
    field's help and default; unset flags keep the class's defaults (with ``defaults`` the
    namespace holds them too). The values are checked by the
    class itself when ``config_from_args`` builds it (a bad one exits 2 naming the field)."""
    group = parser.add_argument_group(title)
    for item in fields(cls):
        if is_dataclass(item.default_factory):  # a nested config section
            add_config_flags(parser, item.default_factory, title=f"{title}: {item.name}")
            continue
        meta = item.metadata
        if not meta.get("cli", False) or (only is not None and item.name not in only):
            continue
        flag = _flag(item)
        default = None if item.default is MISSING else item.default
        shown = not (default is None or default is False or default == "")
        text = meta["help"] + (f" (default {default})" if shown else "")
        text = text.replace("%", "%%")
        if item.type == "bool":
            kept = default if defaults else SUPPRESS
            group.add_argument(  # --flag and --no-flag (a rerun or a row can switch it off)
                flag, dest=item.name, action=argparse.BooleanOptionalAction, default=kept, help=text
            )
            continue
        group.add_argument(
            flag,
            dest=item.name,
            type=_TYPES[str(item.type)],
            choices=meta["choices"],
            default=default if defaults else SUPPRESS,
            required=item.default is MISSING or item.name in required,
            metavar=flag[2:].upper().replace("-", "_"),
            help=text,
        )


def config_from_args(args: argparse.Namespace, cls: type[C], **fixed: Any) -> C:
    """The config dataclass ``cls`` from the flags the user gave (nested configs included) and
    the ``fixed`` values of fields that have no flag in this command."""
    values: dict[str, Any] = dict(fixed)
    for item in fields(cls):  # type: ignore[arg-type]
        if is_dataclass(item.default_factory):
            values[item.name] = config_from_args(args, item.default_factory)
        elif hasattr(args, item.name):
            values[item.name] = getattr(args, item.name)
    try:
        return cls(**values)
    except ValueError as err:  # name the flags of the fields the message names
        named = [_flag(f) for f in fields(cls) if re.search(rf"\b{f.name}\b", str(err))]  # type: ignore[arg-type]
        raise ValueError(f"{err} [{', '.join(named)}]" if named else str(err)) from err


def _flag(item: Field[Any]) -> str:
    return item.metadata.get("flag") or "--" + item.name.replace("_", "-")


__all__ = [
    "CommandError",
    "Subparsers",
    "add_config_flags",
    "config_from_args",
    "float_arg",
    "int_arg",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "positive_int",
]
