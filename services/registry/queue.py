"""Enqueue train jobs for the trainer: a Celery client on the broker, no import of the trainer.

The message is ``draftopd.train(job_id, spec)`` on queue ``settings.train_queue`` with the job id
as the Celery task id. Publishing retries briefly; a broker that stays unreachable raises
``QueueUnavailableError`` (the route answers 503 and marks the job failed).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from kombu.exceptions import KombuError

from services.registry.errors import QueueUnavailableError

logger = logging.getLogger(__name__)
TASK_NAME = "draftopd.train"
_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.0, "interval_step": 0.5, "interval_max": 1.0}


class TrainQueue:
    def __init__(self, broker_url: str, queue: str) -> None:
        self.queue = queue
        self.app = Celery("draftopd-registry", broker=broker_url, set_as_current=False)
        self.app.conf.update(
            task_serializer="json",
            accept_content=["json"],
            broker_connection_timeout=5,
            broker_transport_options={"socket_connect_timeout": 5, "socket_timeout": 10},
        )

    def enqueue(self, job_id: str, spec: dict[str, Any]) -> None:
        try:
            self.app.send_task(
                TASK_NAME,
                args=[job_id, spec],
                queue=self.queue,
                task_id=job_id,
                retry=True,
                retry_policy=_RETRY_POLICY,
            )
        except (KombuError, OSError) as err:
            raise QueueUnavailableError(
                f"could not enqueue train job {job_id!r} on the Celery broker: {err}"
            ) from err
        logger.info("enqueued train job %s on queue %r", job_id, self.queue)

    def close(self) -> None:
        self.app.close()
