"""Wire models of the registry API (docs/design.md §4) and their construction from table rows."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from draftopd.training import configs
from draftopd.wire.job_specs import TrainJobSpec
from draftopd.wire.text import valid_text
from services.registry.models import Alias, AliasEvent, Drafter, Metric, TrainJob, Version

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
ALIAS_PATTERN = r"^[A-Za-z][A-Za-z0-9._-]{0,63}$"
Architecture = Literal["eagle3", "dflash"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
MAX_INT = configs.MAX_INT  # integer columns are 32-bit on Postgres


def artifact_url(base_url: str, drafter: str, version: int) -> str:
    return f"{base_url}/drafters/{drafter}/versions/{version}/artifact"


class _Request(BaseModel):
    """Every request model: unknown fields refused, finite numbers only, valid Unicode text."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        return valid_text(value)


class DrafterCreate(_Request):
    name: str = Field(
        pattern=NAME_PATTERN, description="Unique; letters, digits, '.', '_', '-' (<= 128)."
    )
    target_model: str = Field(min_length=1, max_length=512, description="Target id or path.")
    architecture: Architecture = "eagle3"
    description: str = Field(default="", max_length=4000)


class DrafterOut(BaseModel):
    name: str
    target_model: str
    architecture: str
    description: str
    created_at: datetime
    latest_version: int | None = Field(description="Highest version number; None: no versions.")
    aliases: dict[str, int] = Field(description="Alias name -> version number.")

    @classmethod
    def from_row(cls, row: Drafter) -> DrafterOut:
        return cls(
            name=row.name,
            target_model=row.target_model,
            architecture=row.architecture,
            description=row.description,
            created_at=row.created_at,
            latest_version=row.versions[-1].number if row.versions else None,
            aliases={alias.name: alias.version.number for alias in row.aliases},
        )


class VersionOut(BaseModel):
    drafter: str
    version: int = Field(description="1, 2, 3, ... per drafter.")
    sha256: str = Field(description="Hex sha256 of the artifact bytes.")
    size_bytes: int
    parent_version: int | None
    job_id: str | None = Field(description="The train job that produced it, if any.")
    step: int | None = Field(description="The job's optimizer step at this checkpoint.")
    config: dict[str, Any] = Field(description="The checkpoint's config.json.")
    artifact_url: str = Field(description="GET it for the tar archive.")
    created_at: datetime

    @classmethod
    def from_row(cls, row: Version, base_url: str) -> VersionOut:
        return cls(
            drafter=row.drafter.name,
            version=row.number,
            sha256=row.sha256,
            size_bytes=row.size_bytes,
            parent_version=row.parent.number if row.parent is not None else None,
            job_id=row.job_id,
            step=row.step,
            config=row.config,
            artifact_url=artifact_url(base_url, row.drafter.name, row.number),
            created_at=row.created_at,
        )


class MetricCreate(_Request):
    benchmark: str = Field(min_length=1, max_length=256, description="e.g. 'mt-bench'.")
    temperature: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    tau: float = Field(ge=0, allow_inf_nan=False, description="Committed tokens per cycle.")
    speedup: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="Baseline s / speculative s."
    )
    tokens_per_s: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    hardware: str = Field(default="", max_length=256)
    extra: dict[str, Any] = Field(default_factory=dict, description="Anything else (JSON).")

    @field_validator("extra")
    @classmethod
    def _strict_json(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(value, allow_nan=False)
        except ValueError as err:
            raise ValueError(f"extra must be plain JSON without NaN/Infinity ({err})") from err
        return value


class MetricOut(MetricCreate):
    model_config = ConfigDict(extra="ignore")

    id: int
    drafter: str
    version: int
    created_at: datetime

    @classmethod
    def from_row(cls, row: Metric) -> MetricOut:
        return cls(
            id=row.id,
            drafter=row.version.drafter.name,
            version=row.version.number,
            benchmark=row.benchmark,
            temperature=row.temperature,
            tau=row.tau,
            speedup=row.speedup,
            tokens_per_s=row.tokens_per_s,
            hardware=row.hardware,
            extra=row.extra,
            created_at=row.created_at,
        )


class AliasUpdate(_Request):
    version: int = Field(ge=1, le=MAX_INT, description="The version number the alias points to.")
    traffic: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="The share of requests inference routes to this alias (the canary; read from "
        "'candidate'). Refused on 'production', which serves the rest. None: no share.",
    )


class AliasOut(BaseModel):
    """An alias; also the JSON payload published on ``draftopd:aliases`` when it moves."""

    drafter: str
    alias: str
    version: int
    sha256: str
    artifact_url: str
    traffic: float | None = Field(default=None, description="Share of requests routed to it.")
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Alias, base_url: str) -> AliasOut:
        return cls(
            drafter=row.drafter.name,
            alias=row.name,
            version=row.version.number,
            sha256=row.version.sha256,
            artifact_url=artifact_url(base_url, row.drafter.name, row.version.number),
            traffic=row.traffic,
            updated_at=row.updated_at,
        )


class AliasEventOut(BaseModel):
    """One move of an alias (``GET /drafters/{name}/events``)."""

    drafter: str
    alias: str
    from_version: int | None = Field(description="None when the move created the alias.")
    to_version: int
    cause: str = Field(
        description="'api' (a PUT), 'train_job:<id>' (its promote_to), 'canary:promote', "
        "'canary:discard', 'guard:rollback', 'continual:<job id>'"
    )
    traffic: float | None = Field(default=None, description="The alias's share after the move.")
    detail: dict[str, Any] | None = Field(
        default=None, description="For an automatic move: the live figures it was decided on."
    )
    created_at: datetime

    @classmethod
    def from_row(cls, row: AliasEvent, drafter: str) -> AliasEventOut:
        return cls(
            drafter=drafter, alias=row.alias, from_version=row.from_version,
            to_version=row.to_version, cause=row.cause, traffic=row.traffic, detail=row.detail,
            created_at=row.created_at,
        )  # fmt: skip


class LiveReport(_Request):
    """Counters one inference instance observed for one version since its previous report."""

    instance: str = Field(
        min_length=1, max_length=128, description="The reporting instance (unique per process)."
    )
    seq: int = Field(
        ge=0, le=2**62, description="Report number of this instance; a repeat is ignored."
    )
    requests: int = Field(ge=0, le=MAX_INT)
    cycles: int = Field(ge=0, le=2**62, description="Verification cycles.")
    accepted: int = Field(ge=0, le=2**62, description="Sum over cycles of accepted drafts.")
    accepted_sq: int = Field(ge=0, le=2**62, description="Sum over cycles of accepted^2.")
    generated_tokens: int = Field(ge=0, le=2**62)
    decode_s: float = Field(ge=0, le=1e12, description="Decode seconds of those requests.")

    @model_validator(mode="after")
    def _consistent(self) -> LiveReport:
        if self.accepted_sq < self.accepted:
            raise ValueError("accepted_sq must be >= accepted (each cycle's accepted is >= 0)")
        return self


class LiveAck(BaseModel):
    stored: bool = Field(description="False: this (instance, seq) was stored before.")


class LiveOut(BaseModel):
    """A version's live figures over a window, summed over instances."""

    drafter: str
    version: int
    since: datetime | None = Field(description="Start of the window; None: all reports.")
    reports: int
    requests: int
    cycles: int
    tau: float | None = Field(description="Mean committed tokens per cycle (accepted + 1).")
    tau_stderr: float | None = Field(description="Standard error of tau (cycles as samples).")
    tokens_per_s: float | None = Field(description="Generated tokens / decode seconds.")
    last_report_at: datetime | None


class ContinualSchedule(_Request):
    """A continual Draft-OPD job's schedule (``POST /train-jobs`` with ``continual``)."""

    min_new_prompts: int = Field(
        ge=1, le=MAX_INT, description="Start a round once this many new prompts were captured."
    )
    traffic: float = Field(
        default=0.1, gt=0, le=1, description="The canary share of each round's version."
    )
    max_rounds: int | None = Field(
        default=None, ge=1, le=MAX_INT, description="Stop (succeeded) after this many rounds."
    )


class TrainJobCreate(_Request):
    drafter: str = Field(pattern=NAME_PATTERN, description="Produced versions belong to it.")
    spec: TrainJobSpec = Field(description="The trainer's job spec; 'mode' picks sft/draft_opd.")
    base_version: int | None = Field(
        default=None, ge=1, le=MAX_INT, description="The drafter version training starts from."
    )
    promote_to: str | None = Field(
        default=None,
        pattern=ALIAS_PATTERN,
        description="Alias moved to the job's last version when it succeeds.",
    )
    continual: ContinualSchedule | None = Field(
        default=None,
        description="Run as a continual job: a round each time enough new traffic prompts have "
        "arrived (draft_opd with traffic prompts only).",
    )

    @model_validator(mode="after")
    def _continual_needs_traffic(self) -> TrainJobCreate:
        if self.continual is None:
            return self
        prompts = self.spec.run.prompts or ""
        if self.spec.mode != "draft_opd" or not prompts.startswith("traffic://"):
            raise ValueError(
                "continual: needs a draft_opd spec whose run.prompts is a traffic source"
            )
        if self.promote_to is not None:
            raise ValueError("continual: promotion is the canary's; leave promote_to out")
        return self


class TrainJobUpdate(_Request):
    """What the trainer reports; unset fields stay as they are."""

    status: Literal["running", "succeeded", "failed", "cancelled"] | None = None
    progress: float | None = Field(default=None, ge=0, le=1)
    step: int | None = Field(default=None, ge=0, le=MAX_INT)
    total_steps: int | None = Field(default=None, ge=1, le=MAX_INT)
    tau: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    error: str | None = Field(default=None, max_length=20000)

    @model_validator(mode="after")
    def _no_null_status(self) -> TrainJobUpdate:
        for name in ("status", "progress"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null; leave it out to keep its value")
        return self


class TrainJobOut(BaseModel):
    id: str
    mode: str
    drafter: str
    status: JobStatus
    progress: float
    step: int | None
    total_steps: int | None
    tau: float | None = Field(description="Latest held-out tau.")
    error: str | None
    cancel_requested: bool
    base_version: int | None
    promote_to: str | None
    produced_versions: list[int] = Field(description="Version numbers this job registered.")
    continual: dict[str, Any] | None = Field(
        default=None, description="A continual job's schedule and state (round, phase, ...)."
    )
    parent_id: str | None = Field(default=None, description="The continual job of a round.")
    spec: dict[str, Any]
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: TrainJob) -> TrainJobOut:
        return cls(
            id=row.id,
            mode=row.mode,
            drafter=row.drafter.name,
            status=cast(JobStatus, row.status),  # a CHECK constraint holds it to JobStatus
            progress=row.progress,
            step=row.step,
            total_steps=row.total_steps,
            tau=row.tau,
            error=row.error,
            cancel_requested=row.cancel_requested,
            base_version=row.base_version,
            promote_to=row.promote_to,
            produced_versions=[version.number for version in row.versions],
            continual=row.continual,
            parent_id=row.parent_id,
            spec=row.spec,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


class HealthOut(BaseModel):
    status: Literal["ok"]
    database: str = Field(description="Backend name: 'postgresql' or 'sqlite'.")
    schema_revision: str | None = Field(description="Alembic revision; None: not migrated.")
