"""The trainer: a Celery worker on queue ``train`` (acks_late, prefetch 1) that runs train jobs.

Run it with ``celery -A services.trainer.celery_app worker -Q train --pool solo``. Submit a job with
``send_task("draftopd.train", args=[job_id, spec], queue="train")`` (the registry does).

A job runs under a Redis lock renewed at every step, so a task delivered twice (a worker that
died before acknowledging it) never runs beside a live copy of itself: the copy retries later,
and resumes from the job's checkpoint once the lock has expired.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import redis
import torch
from celery import Celery, Task
from celery.signals import worker_process_init

from draftopd.wire.formats import FINISHED_STATUSES
from draftopd.wire.registry_client import RegistryClient, connect
from services.trainer.jobs import run_train_job
from services.trainer.rollouts import job_key
from services.trainer.settings import get_settings

logger = logging.getLogger(__name__)
TASK_NAME = "draftopd.train"

settings = get_settings()
app = Celery("draftopd", broker=settings.redis_url)
app.conf.update(
    task_default_queue=settings.queue,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
)


@worker_process_init.connect
def _set_threads(**_: Any) -> None:
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)


def _registry() -> RegistryClient | None:
    return connect(settings.registry_url, settings.registry_token)


@app.task(name=TASK_NAME, bind=True, max_retries=None)
def train(self: Task, job_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    client = redis.Redis.from_url(settings.redis_url)
    lock = job_key(job_id, "lock")
    owner = f"{socket.gethostname()}-{os.getpid()}-{self.request.id}"
    if not client.set(lock, owner, nx=True, ex=settings.lock_ttl_s):
        logger.info("job %s is running elsewhere; retrying in %d s", job_id, settings.lock_ttl_s)
        raise self.retry(countdown=settings.lock_ttl_s)
    _set_threads()

    def renew(_: dict[str, Any]) -> None:
        client.set(lock, owner, xx=True, ex=settings.lock_ttl_s)

    registry = _registry()
    try:
        if registry is not None:
            status = registry.get_train_job(job_id)["status"]
            if (
                status in FINISHED_STATUSES
            ):  # e.g. cancelled while queued, or a redelivered finished job
                logger.info("job %s is %s; not running it", job_id, status)
                return {"status": status}
        return run_train_job(job_id, spec, client, on_step=renew, registry=registry)
    finally:
        if registry is not None:
            registry.close()
        if client.get(lock) == owner.encode():
            client.delete(lock)
