"""``setting()``: a config dataclass field that carries its own help text and flag.

Config classes (``training/configs.py``, ``bench.BenchConfig``) declare each setting once with it;
the command line generates its flags from those fields (``cli/args.add_config_flags``) and the
resume check reads which fields may change (``resumable``).
"""

from __future__ import annotations

from dataclasses import MISSING, field
from typing import Any


def setting(
    default: Any = MISSING,
    help: str = "",
    *,
    flag: str | None = None,  # the `draftopd train` flag; None = --field-name
    choices: tuple[str, ...] | None = None,
    cli: bool = True,  # False: no flag (a setting of the trainer service or a tuple)
    resumable: bool = False,  # may change when a run resumes (no effect on weights or data order)
) -> Any:
    """A dataclass field with the metadata the CLI and the resume check read."""
    meta = {"help": help, "flag": flag, "choices": choices, "cli": cli, "resumable": resumable}
    return field(default=default, metadata=meta)


__all__ = ["setting"]
