"""Deployment settings of the trainer (env prefix ``DRAFTOPD_TRAINER_``)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class TrainerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DRAFTOPD_TRAINER_", extra="ignore")

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0", description="Celery broker, rollout queue, records."
    )
    queue: str = Field(default="train", description="Celery queue the trainer consumes.")
    visibility_timeout_s: int = Field(
        default=3600,
        ge=1,
        description="A task unacknowledged this long (its worker died) is delivered again.",
    )
    lock_ttl_s: int = Field(
        default=120, ge=1, description="A job's run lock expires this long after its last step."
    )
    torch_threads: int | None = Field(default=None, ge=1)
    registry_url: str | None = Field(
        default=None,
        description="Registry base URL: jobs report there and register their checkpoints as "
        "versions. None: status goes to a Redis hash (draftopd:jobs:<id>:status).",
    )
    registry_token: SecretStr | None = Field(
        default=None, description="Bearer token for the registry's write endpoints."
    )


@lru_cache
def get_settings() -> TrainerSettings:
    return TrainerSettings()
