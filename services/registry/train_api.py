"""HTTP routes for train jobs (docs/design.md §4). ``POST /train-jobs`` stores a strict job spec and
enqueues ``draftopd.train(job_id, spec)`` for the trainer; the trainer reports back through
``PATCH /train-jobs/{id}`` and registers checkpoints as versions with the job's id.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, status

from services.registry import aliases, jobs
from services.registry.api import AUTH_ERRORS
from services.registry.deps import (
    BaseUrlDep,
    EventsDep,
    JobDep,
    QueueDep,
    SessionDep,
    require_read,
    require_write,
)
from services.registry.schemas import (
    MAX_INT,
    NAME_PATTERN,
    JobStatus,
    TrainJobCreate,
    TrainJobOut,
    TrainJobUpdate,
)

JOB_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "Unknown train job."}}
FINISHED: dict[int | str, dict[str, Any]] = {409: {"description": "The job has finished."}}

reads = APIRouter(dependencies=[Depends(require_read)], responses=AUTH_ERRORS, tags=["train jobs"])
writes = APIRouter(
    dependencies=[Depends(require_write)], responses=AUTH_ERRORS, tags=["train jobs"]
)


@writes.post(
    "/train-jobs",
    response_model=TrainJobOut,
    status_code=status.HTTP_201_CREATED,
    responses={
        404: {"description": "Unknown drafter or base_version."},
        503: {"description": "The Celery broker is unreachable (the job is marked failed)."},
    },
    summary="Submit a train job (sft or draft_opd)",
)
def create_train_job(body: TrainJobCreate, session: SessionDep, queue: QueueDep) -> TrainJobOut:
    """``spec`` is the trainer's strict job spec (unknown fields are refused); ``mode`` picks
    SFT or Draft-OPD. The job is stored as ``queued`` and sent to the trainer's queue."""
    return TrainJobOut.from_row(jobs.submit_job(session, queue, body))


@reads.get("/train-jobs", response_model=list[TrainJobOut], summary="Train jobs, newest first")
def list_train_jobs(
    session: SessionDep,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    drafter: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
) -> list[TrainJobOut]:
    rows = jobs.list_jobs(session, status=status_, drafter=drafter, limit=limit, offset=offset)
    return [TrainJobOut.from_row(row) for row in rows]


@reads.get(
    "/train-jobs/{job_id}",
    response_model=TrainJobOut,
    responses=JOB_NOT_FOUND,
    summary="A train job: status, progress, latest tau, produced versions, error",
)
def get_train_job(job: JobDep) -> TrainJobOut:
    return TrainJobOut.from_row(job)


@writes.post(
    "/train-jobs/{job_id}/cancel",
    response_model=TrainJobOut,
    responses={**JOB_NOT_FOUND, **FINISHED},
    summary="Cancel a train job",
)
def cancel_train_job(job: JobDep, session: SessionDep) -> TrainJobOut:
    """A queued job is cancelled at once; a running one gets ``cancel_requested`` and keeps its
    status until the trainer reports ``cancelled``."""
    return TrainJobOut.from_row(jobs.cancel_job(session, job))


@writes.patch(
    "/train-jobs/{job_id}",
    response_model=TrainJobOut,
    responses={**JOB_NOT_FOUND, **FINISHED},
    summary="Report a job's status and progress (the trainer)",
)
def update_train_job(
    job: JobDep, body: TrainJobUpdate, session: SessionDep, events: EventsDep, base_url: BaseUrlDep
) -> TrainJobOut:
    """Fields left out keep their values. ``succeeded`` sets progress to 1 and moves the
    job's ``promote_to`` alias to its newest version (publishing the alias event)."""
    return TrainJobOut.from_row(aliases.report_job(session, events, job, body, base_url=base_url))
