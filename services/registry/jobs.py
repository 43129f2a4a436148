"""SQL for train jobs: creation, the trainer's status reports, cancellation and promotion.

Status moves ``queued -> running -> succeeded | failed | cancelled``; a finished job never
changes again (409). Cancelling sets ``cancel_requested`` for the trainer to check between steps
and answer by reporting ``cancelled``; a job still queued is cancelled at once (its Celery message
stays in the queue: the trainer should skip a job it finds already cancelled).

Produced versions are linked through ``versions.job_id`` (set when the trainer uploads a
checkpoint with its job id); there is no separate link table.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, selectinload

from draftopd.wire.formats import parse_registry_ref
from draftopd.wire.job_specs import SFTJobSpec, total_steps
from services.registry import repository
from services.registry.errors import ConflictError, NotFoundError, QueueUnavailableError
from services.registry.models import Alias, Drafter, TrainJob, utcnow
from services.registry.queue import TrainQueue
from services.registry.schemas import TrainJobCreate, TrainJobUpdate

WAITING = "waiting"  # a continual job's first phase (continual.py)


def continual_state(schedule: dict[str, Any]) -> dict[str, Any]:
    """A new continual job's ``continual`` column: its schedule, round 0 waiting for traffic."""
    return {
        "schedule": schedule,
        "state": {"round": 0, "phase": WAITING, "stream_id": None, "job": None, "version": None},
        "history": [],
    }


_JOB_LOADS = (selectinload(TrainJob.drafter), selectinload(TrainJob.versions))


def _job_family(session: Session, spec: Any) -> tuple[str, str] | None:
    """(family, where it comes from) of the drafter a job will train, where the registry can
    tell: a fresh SFT drafter's ``drafter_type``, or the drafter a registry reference names.
    None for a local checkpoint path (its upload is checked when the job registers it)."""
    ref = spec.sft.init_from if isinstance(spec, SFTJobSpec) else spec.opd.drafter
    if ref is None:
        return spec.sft.drafter_type, "sft.drafter_type"
    try:
        parsed = parse_registry_ref(ref)
        if parsed is None:
            return None
        return repository.get_drafter(session, parsed.name).architecture, ref
    except (ValueError, NotFoundError):  # a bad reference fails the job with its reason
        return None


def create_job(
    session: Session, body: TrainJobCreate, drafter: Drafter, *, parent_id: str | None = None
) -> TrainJob:
    """Store a validated job as ``queued`` (the caller enqueues it), or a continual job as
    ``running`` (the registry's controller runs its rounds: ``continual.py``). A job whose
    drafter is of another family than the registry drafter it registers versions under is a
    conflict."""
    if body.base_version is not None:
        repository.get_version(session, drafter, body.base_version)  # 404 if unknown
    spec = body.spec
    family = _job_family(session, spec)
    if family is not None and family[0] != drafter.architecture:
        raise ConflictError(
            f"the job trains a {family[0]} drafter ({family[1]}) but drafter {drafter.name!r} "
            f"holds {drafter.architecture} versions"
        )
    job = TrainJob(
        id=str(uuid.uuid4()),
        mode=spec.mode,
        drafter_id=drafter.id,
        base_version=body.base_version,
        promote_to=body.promote_to,
        spec=spec.model_dump(mode="json"),
        status="queued" if body.continual is None else "running",
        progress=0.0,
        total_steps=total_steps(spec),
        cancel_requested=False,
        continual=None if body.continual is None else continual_state(body.continual.model_dump()),
        parent_id=parent_id,
    )
    session.add(job)
    session.commit()
    return get_job(session, job.id)


def find_job(session: Session, job_id: str) -> TrainJob | None:
    return session.scalars(
        select(TrainJob).where(TrainJob.id == job_id).options(*_JOB_LOADS)
    ).one_or_none()


def get_job(session: Session, job_id: str) -> TrainJob:
    job = find_job(session, job_id)
    if job is None:
        raise NotFoundError(f"train job {job_id!r} not found")
    return job


def list_jobs(
    session: Session,
    *,
    status: str | None = None,
    drafter: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[TrainJob]:
    """Newest first."""
    query = select(TrainJob).options(*_JOB_LOADS)
    if status is not None:
        query = query.where(TrainJob.status == status)
    if drafter is not None:
        query = query.join(TrainJob.drafter).where(Drafter.name == drafter)
    query = query.order_by(TrainJob.created_at.desc(), TrainJob.id).limit(limit).offset(offset)
    return list(session.scalars(query))


# The job state machine: the statuses a job may move to from each status. A finished job
# (succeeded, failed, cancelled) moves nowhere. Every change is a compare-and-set UPDATE whose
# WHERE clause names the statuses the change may start from, so of two concurrent reports only
# the first that the database applies can finish a job; the other matches no row and gets 409.
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "succeeded", "failed", "cancelled"}),
    "running": frozenset({"running", "succeeded", "failed", "cancelled"}),
}


def _sources(target: str | None) -> list[str]:
    """The statuses a change to ``target`` may start from (None: a report that keeps it)."""
    return [s for s, allowed in TRANSITIONS.items() if target is None or target in allowed]


def _compare_and_set(
    session: Session, job_id: str, sources: list[str], values: dict[str, Any]
) -> bool:
    """Apply ``values`` if the job's status is one of ``sources``; True if it did. One UPDATE
    statement: the database decides between concurrent writers."""
    result = session.execute(
        update(TrainJob)
        .where(TrainJob.id == job_id, TrainJob.status.in_(sources))
        .values(**values, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return bool(getattr(result, "rowcount", 0))


def _refused(session: Session, job_id: str, target: str | None) -> ConflictError:
    session.expire_all()
    job = get_job(session, job_id)
    if job.finished:
        return ConflictError(f"train job {job_id!r} is already {job.status}; it cannot change")
    return ConflictError(f"train job {job_id!r} is {job.status}; it cannot move to {target}")


def fail_job(session: Session, job: TrainJob, error: str) -> TrainJob:
    failed = {"status": "failed", "error": error}
    if not _compare_and_set(session, job.id, _sources("failed"), failed):
        raise _refused(session, job.id, "failed")
    session.expire_all()
    return get_job(session, job.id)


def update_job(session: Session, job: TrainJob, update: TrainJobUpdate) -> TrainJob:
    """Apply the trainer's report; fields left unset keep their values. 409 when the job's
    status does not allow it (a finished job stays finished)."""
    values = update.model_dump(exclude_unset=True)
    target = values.get("status")
    if target == "succeeded":
        values["progress"] = 1.0
    if not _compare_and_set(session, job.id, _sources(target), values):
        raise _refused(session, job.id, target)
    session.expire_all()
    return get_job(session, job.id)


def cancel_job(session: Session, job: TrainJob) -> TrainJob:
    """Ask the trainer to stop; a queued job is cancelled at once. Idempotent on a cancelled
    job; 409 on one that succeeded or failed."""
    cancelled = {"status": "cancelled", "cancel_requested": True}
    if not (
        _compare_and_set(session, job.id, ["queued"], cancelled)
        or _compare_and_set(session, job.id, ["running"], {"cancel_requested": True})
    ):
        session.expire_all()
        if get_job(session, job.id).status != "cancelled":  # idempotent on a cancelled job
            raise _refused(session, job.id, "cancelled")
    session.expire_all()
    return get_job(session, job.id)


def promote(session: Session, job: TrainJob) -> Alias | None:
    """Move the job's ``promote_to`` alias to its newest version once it has succeeded."""
    if job.status != "succeeded" or job.promote_to is None or not job.versions:
        return None
    return repository.set_alias(
        session, job.drafter, job.promote_to, job.versions[-1], cause=f"train_job:{job.id}"
    )


def submit_job(session: Session, queue: TrainQueue, body: TrainJobCreate) -> TrainJob:
    """Store the job and enqueue it (a continual job is only stored); if the broker refuses,
    the job is marked failed and the ``QueueUnavailableError`` propagates (503)."""
    job = create_job(session, body, repository.get_drafter(session, body.drafter))
    if job.continual is not None:
        return job  # not the trainer's: the controller submits its rounds
    try:
        queue.enqueue(job.id, job.spec)
    except QueueUnavailableError as err:
        fail_job(session, job, str(err))
        raise
    return job
