"""Deployment settings of the registry (env prefix ``DRAFTOPD_REGISTRY_``).

Auth policy (one rule for every protected endpoint):

- a mutating endpoint needs ``Authorization: Bearer <api_token>``: 401 without the header, 403
  with a wrong token;
- with no ``api_token`` configured, mutating endpoints are refused with 403, unless
  ``allow_unauthenticated_writes`` is true (a trusted single-machine setup such as ``draftopd up``);
- reads are open while ``open_reads`` is true; otherwise they follow the same rule as writes;
- ``GET /health`` is always open.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.registry.policy import Policy

_POLICY = Policy()  # the policy's defaults: declared once, in policy.py

DEFAULT_DATA_DIR = Path.home() / ".cache" / "draftopd" / "registry"


class RegistrySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DRAFTOPD_REGISTRY_", extra="ignore")

    database_url: str = Field(
        default=f"sqlite:///{DEFAULT_DATA_DIR / 'registry.db'}",
        description="SQLAlchemy URL; postgresql:// URLs use the psycopg (v3) driver.",
    )
    artifact_dir: Path = Field(
        default=DEFAULT_DATA_DIR / "artifacts", description="Where LocalArtifactStore keeps files."
    )
    api_token: SecretStr | None = Field(
        default=None, description="Bearer token for mutating endpoints (and reads if not open)."
    )
    allow_unauthenticated_writes: bool = Field(
        default=False, description="With no api_token: accept writes without a token."
    )
    open_reads: bool = Field(default=True, description="False: reads need the token too.")
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0", description="Alias-change events (pub/sub)."
    )
    celery_broker_url: str | None = Field(
        default=None, description="Celery broker for train jobs; None = redis_url."
    )
    train_queue: str = Field(default="train", description="Celery queue the trainer consumes.")
    public_url: str | None = Field(
        default=None,
        description="Base URL clients reach the registry at (artifact links); None = the "
        "request's own base URL.",
    )
    max_artifact_bytes: int = Field(
        default=16 * 1024**3, ge=1, description="Largest artifact upload accepted (413 above)."
    )
    max_unpacked_artifact_bytes: int = Field(
        default=32 * 1024**3,
        ge=1,
        description="Largest unpacked size of an artifact's files (413 above: a gzip bomb is "
        "refused while it is read).",
    )
    policy_interval_s: float = Field(
        default=5.0,
        ge=0,
        description="Seconds between the controller's ticks (canary, guard, continual rounds); "
        "0 turns the controller off (e.g. on all replicas but one).",
    )
    policy_z: float = Field(default=_POLICY.z, gt=0, description="Confidence bound, in std errors.")
    canary_min_cycles: int = Field(
        default=_POLICY.canary_min_cycles,
        ge=1,
        description="Live cycles each side needs before a canary verdict.",
    )
    canary_max_cycles: int = Field(
        default=_POLICY.canary_max_cycles,
        ge=1,
        description="An inconclusive canary is discarded after this.",
    )
    canary_min_gain: float = Field(
        default=_POLICY.canary_min_gain,
        ge=0,
        description="Promote only when live tau is better by more than this.",
    )
    guard_window_s: float = Field(
        default=_POLICY.guard_window_s,
        ge=0,
        description="How long after a production swap the guard watches.",
    )
    guard_min_cycles: int = Field(
        default=_POLICY.guard_min_cycles,
        ge=1,
        description="Live cycles of the new version before the guard judges.",
    )
    guard_margin: float = Field(
        default=_POLICY.guard_margin,
        ge=0,
        lt=1,
        description="Roll back when live tau falls below 1 + (1 - margin) x (the previous "
        "version's live tau - 1): the new version lost more than this share of the gain.",
    )
    guard_lookback_s: float = Field(
        default=_POLICY.guard_lookback_s,
        gt=0,
        description="The previous version's live tau: this long before.",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8003, ge=0, le=65535)

    @model_validator(mode="after")
    def _default_broker(self) -> RegistrySettings:
        if self.celery_broker_url is None:
            self.celery_broker_url = self.redis_url
        return self

    @property
    def broker_url(self) -> str:
        return self.celery_broker_url or self.redis_url

    @property
    def policy(self) -> Policy:
        return Policy(
            z=self.policy_z,
            canary_min_cycles=self.canary_min_cycles,
            canary_max_cycles=self.canary_max_cycles,
            canary_min_gain=self.canary_min_gain,
            guard_window_s=self.guard_window_s,
            guard_min_cycles=self.guard_min_cycles,
            guard_margin=self.guard_margin,
            guard_lookback_s=self.guard_lookback_s,
        )


@lru_cache
def get_settings() -> RegistrySettings:
    """The process-wide settings, read from the environment once. Tests pass their own."""
    return RegistrySettings()
