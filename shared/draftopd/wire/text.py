"""Text and numbers that JSON on the wire can carry, checked in one place for both services.

A JSON string may spell a lone UTF-16 surrogate (``"\\ud800"``); Python decodes it to a ``str``
that cannot be encoded as UTF-8, so it must be refused at the boundary (a 422 naming the field)
before it reaches a tokenizer, a database or a response. ``json_safe`` makes any value encodable
(for error bodies that echo the input): non-finite floats become their string form and lone
surrogates their escaped form.
"""

from __future__ import annotations

import math
from typing import Any


def is_valid_unicode(text: str) -> bool:
    """False when ``text`` holds a lone surrogate (it could not be written as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def invalid_text_path(value: Any, where: str = "") -> str | None:
    """The path (``a.b[2]``) of the first string in ``value`` that is not valid Unicode, keys
    included; None when every string is valid."""
    if isinstance(value, str):
        return None if is_valid_unicode(value) else (where or "value")
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and not is_valid_unicode(key):
                return f"{where}.<key>" if where else "<key>"
            found = invalid_text_path(item, f"{where}.{key}" if where else str(key))
            if found is not None:
                return found
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = invalid_text_path(item, f"{where}[{index}]")
            if found is not None:
                return found
    return None


def decoded(value: Any) -> str:
    """A Redis reply as text: bytes decoded as UTF-8, anything else through ``str``."""
    return value.decode() if isinstance(value, bytes) else str(value)


def valid_text(value: Any) -> Any:
    """``value`` unchanged, or a ValueError naming where it holds a lone surrogate (for the
    services' request models, as a pydantic "before" validator of every field)."""
    where = invalid_text_path(value)
    if where is not None:
        raise ValueError(f"text must be valid Unicode (a lone surrogate at {where})")
    return value


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as strings ('nan', 'inf') and lone surrogates escaped
    (backslash form), so that ``json.dumps(...).encode('utf-8')`` cannot fail."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return (
            value if is_valid_unicode(value) else value.encode("utf-8", "backslashreplace").decode()
        )
    if isinstance(value, dict):
        return {json_safe(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


__all__ = ["decoded", "invalid_text_path", "is_valid_unicode", "json_safe", "valid_text"]
