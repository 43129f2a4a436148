"""Reading config dataclasses back from JSON: unknown keys are an error, never ignored."""

from __future__ import annotations

from dataclasses import fields
from typing import Any


def known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``data``; raises ValueError naming any key that is not a field of ``cls``."""
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return dict(data)


__all__ = ["known_fields"]
