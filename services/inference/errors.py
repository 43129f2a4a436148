"""Request errors raised below the routes; ``main.py`` maps each to its HTTP status."""

from __future__ import annotations

from typing import Any


class InvalidRequestError(ValueError):
    """A request field is invalid for this server (-> 422, shaped like FastAPI's own errors)."""

    def __init__(self, field: tuple[str | int, ...], message: str, value: Any = None) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.value = value

    def detail(self) -> list[dict[str, Any]]:
        return [
            {
                "type": "value_error",
                "loc": ["body", *self.field],
                "msg": self.message,
                "input": self.value,
            }
        ]


class DrafterUnavailableError(RuntimeError):
    """A drafter method (eagle3, dflash) was asked for but no drafter of that family is loaded
    (-> 409)."""


class ClientGoneError(RuntimeError):
    """The client disconnected before its (non-streamed) response was ready (-> 499)."""


class OverloadedError(RuntimeError):
    """Every generation slot is busy and the wait queue is full (-> 429 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
