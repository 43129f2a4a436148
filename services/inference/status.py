"""What ``GET /health`` says about following a registry alias (torch-free wire models).

``InferenceHealth`` is the shared ``HealthResponse`` plus ``registry``: null for a local drafter,
else the alias follower's state, so a refused artifact (sha256 mismatch, another target,
unreadable) is visible while serving goes on with the old version.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from pydantic import BaseModel, Field

from services.inference.schemas import HealthResponse


class SwapError(BaseModel):
    """A registry version that could not be served."""

    version: int = Field(description="The registry version number that was not swapped in.")
    sha256: str = Field(description="The artifact sha256 the alias named.")
    reason: str = Field(description="Why: the error, naming the version and what was wrong.")
    refused: bool = Field(
        description="True: the artifact itself is bad (sha256 mismatch, built for another target, "
        "unreadable); it is not tried again until the alias is set again. False: a transient "
        "failure (registry unreachable), retried at the next poll or event."
    )
    at: datetime


class AliasFollowStatus(BaseModel):
    """The inference service following ``drafter``/``alias`` in the registry."""

    drafter: str
    alias: str
    alias_version: int | None = Field(
        description="The version the alias pointed at when last read; null if the alias does "
        "not exist (yet) or could not be read."
    )
    in_sync: bool = Field(description="The served drafter is the version the alias points at.")
    problem: str | None = Field(description="Why the service is not in sync; null when it is.")
    events: bool = Field(description="Subscribed to the alias events (Redis pub/sub) right now.")
    swaps: int = Field(description="Drafter swaps done since the service started.")
    last_checked_at: datetime | None = Field(description="Last successful read of the alias.")
    last_swap_error: SwapError | None = Field(
        description="The most recent version that could not be served (kept as history after "
        "the service is back in sync)."
    )


class InferenceHealth(HealthResponse):
    registry: AliasFollowStatus | None = Field(
        default=None, description="Registry alias following; null when serving a local drafter."
    )


class FollowStatusSource(Protocol):
    """Anything that reports an ``AliasFollowStatus`` (the alias follower)."""

    def status(self) -> AliasFollowStatus: ...
