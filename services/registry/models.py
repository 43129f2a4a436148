"""The registry's tables as SQLAlchemy 2 typed models (the schema is created by the migrations).

- ``drafters``: one row per drafter line (unique ``name``).
- ``versions``: numbered 1, 2, 3, ... per drafter (unique ``(drafter_id, number)``); the artifact
  location, its sha256 and size, the parent version, and the train job and step that made it.
  ``versions.job_id`` is the job -> produced versions link (no separate link table: a version is
  produced by at most one job).
- ``metrics``: benchmark results attached to a version.
- ``aliases``: a named pointer (``production``, ``candidate``, ...) per drafter to one version.
- ``train_jobs``: a train job with its strict spec (JSON), status and progress. ``base_version``
  is a version *number* of the job's drafter (checked on creation; a plain column, so the
  versions <-> train_jobs foreign keys do not form a cycle). A continual job carries its schedule
  and state in ``continual``; its rounds are jobs whose ``parent_id`` names it.
- ``alias_events``: every move of an alias, with its cause and, for automatic moves, the evidence.
- ``live_metrics``: counters reported by inference instances per served version (deltas).

Every timestamp is stored and returned in UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from draftopd.wire.formats import FINISHED_STATUSES, JOB_STATUSES

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
JOB_MODES = ("sft", "draft_opd")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite drops the offset when storing)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware one")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Drafter(Base):
    __tablename__ = "drafters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    target_model: Mapped[str] = mapped_column(String(512))
    architecture: Mapped[str] = mapped_column(String(32))
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    versions: Mapped[list[Version]] = relationship(
        back_populates="drafter", order_by="Version.number"
    )
    aliases: Mapped[list[Alias]] = relationship(back_populates="drafter", order_by="Alias.name")


class Version(Base):
    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("drafter_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    drafter_id: Mapped[int] = mapped_column(ForeignKey("drafters.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    artifact_uri: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("versions.id", ondelete="SET NULL"), nullable=True
    )
    job_id: Mapped[str | None] = mapped_column(
        ForeignKey("train_jobs.id", ondelete="SET NULL"), nullable=True, index=True
    )
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    drafter: Mapped[Drafter] = relationship(back_populates="versions")
    parent: Mapped[Version | None] = relationship(remote_side=[id])


class Metric(Base):
    __tablename__ = "metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(
        ForeignKey("versions.id", ondelete="CASCADE"), index=True
    )
    benchmark: Mapped[str] = mapped_column(String(256))
    temperature: Mapped[float] = mapped_column(Float)
    tau: Mapped[float] = mapped_column(Float)
    speedup: Mapped[float | None] = mapped_column(Float, nullable=True)
    tokens_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    hardware: Mapped[str] = mapped_column(String(256), default="")
    extra: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    version: Mapped[Version] = relationship()


class Alias(Base):
    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("drafter_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    drafter_id: Mapped[int] = mapped_column(ForeignKey("drafters.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"))
    traffic: Mapped[float | None] = mapped_column(Float, nullable=True)  # the canary's share
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    drafter: Mapped[Drafter] = relationship(back_populates="aliases")
    version: Mapped[Version] = relationship()


class AliasEvent(Base):
    """One move of an alias: the registry's history of what served when, and why."""

    __tablename__ = "alias_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    drafter_id: Mapped[int] = mapped_column(
        ForeignKey("drafters.id", ondelete="CASCADE"), index=True
    )
    alias: Mapped[str] = mapped_column(String(64))
    from_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    to_version: Mapped[int] = mapped_column(Integer)
    cause: Mapped[str] = mapped_column(String(256))  # "api", "train_job:<id>", "canary:promote"
    traffic: Mapped[float | None] = mapped_column(Float, nullable=True)  # the share after it
    detail: Mapped[dict[str, Any] | None] = mapped_column(  # the evidence
        JSON(none_as_null=True), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class LiveMetric(Base):
    """One report of an inference instance for one version: counters since its previous report.

    ``accepted`` and ``accepted_sq`` are the sums over cycles of the accepted drafts and of their
    squares, so the registry has the mean and the variance of the per-cycle τ (accepted + 1)."""

    __tablename__ = "live_metrics"
    __table_args__ = (
        UniqueConstraint("version_id", "instance", "seq"),
        Index("ix_live_metrics_version_id_created_at", "version_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"))
    instance: Mapped[str] = mapped_column(String(128))
    seq: Mapped[int] = mapped_column(BigInteger)
    requests: Mapped[int] = mapped_column(Integer)
    cycles: Mapped[int] = mapped_column(BigInteger)
    accepted: Mapped[int] = mapped_column(BigInteger)
    accepted_sq: Mapped[int] = mapped_column(BigInteger)
    generated_tokens: Mapped[int] = mapped_column(BigInteger)
    decode_s: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class TrainJob(Base):
    __tablename__ = "train_jobs"
    __table_args__ = (
        CheckConstraint(_in("mode", JOB_MODES), name="mode"),
        CheckConstraint(_in("status", JOB_STATUSES), name="status"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    mode: Mapped[str] = mapped_column(String(16))
    drafter_id: Mapped[int] = mapped_column(
        ForeignKey("drafters.id", ondelete="CASCADE"), index=True
    )
    base_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    promote_to: Mapped[str | None] = mapped_column(String(64), nullable=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tau: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    continual: Mapped[dict[str, Any] | None] = mapped_column(  # None is SQL NULL, not JSON null
        JSON(none_as_null=True), nullable=True
    )
    parent_id: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    drafter: Mapped[Drafter] = relationship()
    versions: Mapped[list[Version]] = relationship(
        order_by="Version.number", foreign_keys="Version.job_id", viewonly=True
    )

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES
