"""Deployment settings of a rollout worker (env prefix ``DRAFTOPD_ROLLOUT_``)."""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class RolloutWorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DRAFTOPD_ROLLOUT_", extra="ignore")

    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Queue and records.")
    target: str = Field(default="smollm2", description="'smollm2', an HF directory or a .gguf.")
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    consumer: str = Field(
        default_factory=_default_consumer, description="Name in the consumer group (unique)."
    )
    block_ms: int = Field(default=1000, ge=1, description="Wait per queue poll.")
    claim_idle_ms: int = Field(
        default=60_000, ge=1, description="Reclaim a request whose worker has been quiet this long."
    )
    stream_maxlen: int = Field(default=10_000, ge=1, description="Records kept per job stream.")
    max_attempts: int = Field(
        default=3, ge=1, description="Failed attempts before a request goes to the dead letters."
    )
    torch_threads: int | None = Field(default=None, ge=1)
    registry_url: str | None = Field(
        default=None, description="Registry for 'registry://NAME/VERSION' drafter references."
    )
    registry_token: SecretStr | None = Field(
        default=None, description="Bearer token for the registry (when its reads are closed)."
    )
    artifact_cache_dir: Path | None = Field(
        default=None,
        description="Downloaded drafter versions; None = $DRAFTOPD_CACHE_DIR/drafters.",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8002, ge=0, le=65535)


@lru_cache
def get_settings() -> RolloutWorkerSettings:
    return RolloutWorkerSettings()
