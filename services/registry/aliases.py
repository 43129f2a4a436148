"""Moving an alias: save it, then tell the subscribers (``events.AliasEvents``).

Both an explicit ``PUT /drafters/{name}/aliases/{alias}`` and a succeeded train job with
``promote_to`` move aliases through here, so every move publishes its event.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from services.registry import jobs, repository
from services.registry.events import AliasEvents
from services.registry.models import Drafter, TrainJob
from services.registry.schemas import AliasOut, TrainJobUpdate


def move_alias(
    session: Session,
    events: AliasEvents,
    drafter: Drafter,
    name: str,
    number: int,
    *,
    base_url: str,
    traffic: float | None = None,
    cause: str = "api",
    detail: dict[str, Any] | None = None,
) -> AliasOut:
    """Point ``name`` at version ``number`` with the traffic share ``traffic`` (404 if the
    drafter has no such version)."""
    version = repository.get_version(session, drafter, number)
    row = repository.set_alias(
        session, drafter, name, version, cause=cause, traffic=traffic, detail=detail
    )
    alias = AliasOut.from_row(row, base_url)
    events.publish(alias)
    return alias


def report_job(
    session: Session,
    events: AliasEvents,
    job: TrainJob,
    update: TrainJobUpdate,
    *,
    base_url: str,
) -> TrainJob:
    """Apply the trainer's report; on success, move the job's ``promote_to`` alias."""
    job = jobs.update_job(session, job, update)
    promoted = jobs.promote(session, job)
    if promoted is not None:
        events.publish(AliasOut.from_row(promoted, base_url))
    return job
