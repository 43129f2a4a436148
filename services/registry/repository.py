"""SQL for drafters, versions, metrics and aliases. Each writing function commits its own unit of
work; lookups raise ``NotFoundError`` naming what is missing.

Version numbers: the next number is ``max(number) + 1`` for the drafter, read under a row lock on
the drafter (``SELECT ... FOR UPDATE`` on Postgres; SQLite serialises writers itself). If two
writers still collide, the unique ``(drafter_id, number)`` constraint rejects one and it retries.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from services.registry.errors import ConflictError, NotFoundError
from services.registry.models import Alias, AliasEvent, Drafter, Metric, TrainJob, Version, utcnow
from services.registry.schemas import DrafterCreate, MetricCreate
from services.registry.storage import StoredArtifact

NUMBERING_ATTEMPTS = 5

_DRAFTER_LOADS = (
    selectinload(Drafter.versions),
    selectinload(Drafter.aliases).selectinload(Alias.version),
)


def find_drafter(session: Session, name: str) -> Drafter | None:
    return session.scalars(
        select(Drafter).where(Drafter.name == name).options(*_DRAFTER_LOADS)
    ).one_or_none()


def get_drafter(session: Session, name: str) -> Drafter:
    drafter = find_drafter(session, name)
    if drafter is None:
        raise NotFoundError(f"drafter {name!r} not found")
    return drafter


def list_drafters(session: Session) -> list[Drafter]:
    return list(session.scalars(select(Drafter).order_by(Drafter.name).options(*_DRAFTER_LOADS)))


def create_drafter(session: Session, body: DrafterCreate) -> Drafter:
    drafter = Drafter(**body.model_dump())
    session.add(drafter)
    try:
        session.commit()
    except IntegrityError as err:
        session.rollback()
        raise ConflictError(f"drafter {body.name!r} already exists") from err
    return get_drafter(session, body.name)


def get_version(session: Session, drafter: Drafter, number: int) -> Version:
    version = session.scalars(
        select(Version).where(Version.drafter_id == drafter.id, Version.number == number)
    ).one_or_none()
    if version is None:
        raise NotFoundError(f"drafter {drafter.name!r} has no version {number}")
    return version


def list_versions(session: Session, drafter: Drafter) -> list[Version]:
    return list(
        session.scalars(
            select(Version).where(Version.drafter_id == drafter.id).order_by(Version.number)
        )
    )


def _next_number(session: Session, drafter: Drafter) -> int:
    session.execute(select(Drafter.id).where(Drafter.id == drafter.id).with_for_update())
    latest = session.scalar(
        select(func.max(Version.number)).where(Version.drafter_id == drafter.id)
    )
    return (latest or 0) + 1


def add_version(
    session: Session,
    drafter: Drafter,
    stored: StoredArtifact,
    *,
    config: dict[str, Any],
    parent: Version | None = None,
    job: TrainJob | None = None,
    step: int | None = None,
) -> Version:
    """Register a stored artifact as the drafter's next version."""
    for attempt in range(NUMBERING_ATTEMPTS):
        version = Version(
            drafter_id=drafter.id,
            number=_next_number(session, drafter),
            artifact_uri=stored.uri,
            sha256=stored.sha256,
            size_bytes=stored.size_bytes,
            parent_id=parent.id if parent is not None else None,
            job_id=job.id if job is not None else None,
            step=step,
            config=config,
        )
        session.add(version)
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            if attempt == NUMBERING_ATTEMPTS - 1:
                raise
            continue
        return version
    raise AssertionError("unreachable: the loop returns or raises")


def add_metric(session: Session, version: Version, body: MetricCreate) -> Metric:
    metric = Metric(version_id=version.id, **body.model_dump())
    session.add(metric)
    session.commit()
    return metric


def list_metrics(session: Session, version: Version) -> list[Metric]:
    return list(
        session.scalars(select(Metric).where(Metric.version_id == version.id).order_by(Metric.id))
    )


def find_alias(session: Session, drafter: Drafter, name: str) -> Alias | None:
    return session.scalars(
        select(Alias).where(Alias.drafter_id == drafter.id, Alias.name == name)
    ).one_or_none()


def get_alias(session: Session, drafter: Drafter, name: str) -> Alias:
    alias = find_alias(session, drafter, name)
    if alias is None:
        raise NotFoundError(f"drafter {drafter.name!r} has no alias {name!r}")
    return alias


def list_aliases(session: Session, drafter: Drafter) -> list[Alias]:
    return list(
        session.scalars(select(Alias).where(Alias.drafter_id == drafter.id).order_by(Alias.name))
    )


def set_alias(
    session: Session,
    drafter: Drafter,
    name: str,
    version: Version,
    *,
    cause: str = "api",
    traffic: float | None = None,
    detail: dict[str, Any] | None = None,
) -> Alias:
    """Create the alias or move it to ``version`` with the traffic share ``traffic`` (a
    concurrent creation is retried as a move), recording the move as an ``AliasEvent`` (with
    ``detail``, the evidence of an automatic move) in the same commit."""
    for attempt in range(2):
        alias = find_alias(session, drafter, name)
        previous = None if alias is None else alias.version.number
        if alias is None:
            alias = Alias(drafter_id=drafter.id, name=name)
            session.add(alias)
        alias.version_id = version.id
        alias.traffic = traffic
        alias.updated_at = utcnow()
        session.add(
            AliasEvent(
                drafter_id=drafter.id, alias=name, from_version=previous,
                to_version=version.number, cause=cause[:256], traffic=traffic, detail=detail,
            )
        )  # fmt: skip
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            if attempt == 1:
                raise
            continue
        session.refresh(alias)
        return alias
    raise AssertionError("unreachable: the loop returns or raises")


def list_alias_events(
    session: Session, drafter: Drafter, *, alias: str | None = None, limit: int = 100
) -> list[AliasEvent]:
    """A drafter's alias moves, newest first."""
    query = select(AliasEvent).where(AliasEvent.drafter_id == drafter.id)
    if alias is not None:
        query = query.where(AliasEvent.alias == alias)
    return list(session.scalars(query.order_by(AliasEvent.id.desc()).limit(limit)))
