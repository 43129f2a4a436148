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

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from draftopd.wire.job_specs import total_steps
from services.registry import repository
from services.registry.errors import ConflictError, NotFoundError, QueueUnavailableError
from services.registry.models import Alias, Drafter, TrainJob
from services.registry.queue import TrainQueue
from services.registry.schemas import TrainJobCreate, TrainJobUpdate

_JOB_LOADS = (selectinload(TrainJob.drafter), selectinload(TrainJob.versions))


def create_job(session: Session, body: TrainJobCreate, drafter: Drafter) -> TrainJob:
    """Store a validated job as ``queued`` (the caller enqueues it)."""
    if body.base_version is not None:
        repository.get_version(session, drafter, body.base_version)  # 404 if unknown
    spec = body.spec
    job = TrainJob(
        id=str(uuid.uuid4()),
        mode=spec.mode,
        drafter_id=drafter.id,
        base_version=body.base_version,
        promote_to=body.promote_to,
        spec=spec.model_dump(mode="json"),
        status="queued",
        progress=0.0,
        total_steps=total_steps(spec),
        cancel_requested=False,
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


def _refuse_if_finished(job: TrainJob) -> None:
    if job.finished:
        raise ConflictError(f"train job {job.id!r} is already {job.status}; it cannot change")


def fail_job(session: Session, job: TrainJob, error: str) -> TrainJob:
    job.status, job.error = "failed", error
    session.commit()
    return get_job(session, job.id)


def update_job(session: Session, job: TrainJob, update: TrainJobUpdate) -> TrainJob:
    """Apply the trainer's report; fields left unset keep their values."""
    _refuse_if_finished(job)
    for field, value in update.model_dump(exclude_unset=True).items():
        setattr(job, field, value)
    if job.status == "succeeded":
        job.progress = 1.0
    session.commit()
    return get_job(session, job.id)


def cancel_job(session: Session, job: TrainJob) -> TrainJob:
    """Ask the trainer to stop; a queued job is cancelled at once. Idempotent on a cancelled
    job; 409 on one that succeeded or failed."""
    if job.status == "cancelled":
        return job
    _refuse_if_finished(job)
    job.cancel_requested = True
    if job.status == "queued":
        job.status = "cancelled"
    session.commit()
    return get_job(session, job.id)


def promote(session: Session, job: TrainJob) -> Alias | None:
    """Move the job's ``promote_to`` alias to its newest version once it has succeeded."""
    if job.status != "succeeded" or job.promote_to is None or not job.versions:
        return None
    return repository.set_alias(session, job.drafter, job.promote_to, job.versions[-1])


def submit_job(session: Session, queue: TrainQueue, body: TrainJobCreate) -> TrainJob:
    """Store the job and enqueue it; if the broker refuses, the job is marked failed and the
    ``QueueUnavailableError`` propagates (503)."""
    job = create_job(session, body, repository.get_drafter(session, body.drafter))
    try:
        queue.enqueue(job.id, job.spec)
    except QueueUnavailableError as err:
        fail_job(session, job, str(err))
        raise
    return job
