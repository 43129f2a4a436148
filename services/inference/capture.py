"""Traffic capture: a sampled share of finished requests goes to the traffic stream
(``draftopd.wire.traffic``). Off unless ``capture_rate`` > 0.

The request path only samples and queues the record (``offer``); a daemon thread writes it to
Redis, so a slow or unreachable Redis never stalls the event loop. The queue is bounded
(``QUEUE_SIZE``): when Redis cannot keep up, further records are dropped and counted. A failure
to capture never fails a request, and is logged without the prompt."""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time

import redis

from draftopd.speculative.engine import DecodeStats
from draftopd.wire.traffic import TrafficRecord, append
from services.inference.settings import InferenceSettings

logger = logging.getLogger(__name__)
QUEUE_SIZE = 1000  # records waiting for the writer thread; more are dropped
_STOP = None  # the writer's stop sentinel


class TrafficCapture:
    def __init__(self, settings: InferenceSettings, client: redis.Redis) -> None:
        self.settings = settings
        self.client = client
        self.random = random.Random()
        self.captured = 0
        self.failed = 0
        self.dropped = 0
        self._queue: queue.Queue[TrafficRecord | None] = queue.Queue(QUEUE_SIZE)
        self._writer = threading.Thread(target=self._write_all, name="traffic-capture", daemon=True)
        self._writer.start()

    @classmethod
    def from_settings(cls, settings: InferenceSettings) -> TrafficCapture | None:
        if settings.capture_rate <= 0 or settings.redis_url is None:
            return None
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=1.0)
        return cls(settings, client)

    def offer(
        self,
        prompt_ids: list[int],
        stats: DecodeStats,
        *,
        drafter_version: str | None,
        method: str,
        endpoint: str,
        completion_tokens: int,
    ) -> bool:
        """Capture this finished request with probability ``capture_rate``; True if queued for
        the writer (never blocks)."""
        if self.random.random() >= self.settings.capture_rate:
            return False
        record = TrafficRecord(
            prompt_ids=list(prompt_ids),
            drafter_version=drafter_version or "",
            method=method,
            endpoint=endpoint,
            tau=float(stats.tau),
            cycles=int(stats.cycles),
            completion_tokens=completion_tokens,
            captured_at=time.time(),
        )
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            return False
        return True

    def _write_all(self) -> None:
        while (record := self._queue.get()) is not _STOP:
            try:
                append(
                    self.client,
                    record,
                    maxlen=self.settings.capture_maxlen,
                    retention_s=self.settings.capture_retention_s,
                    stream=self.settings.capture_stream,
                )
            except redis.RedisError as err:
                self.failed += 1
                logger.warning(
                    "traffic capture failed (%s); the request is unaffected", type(err).__name__
                )
            else:
                self.captured += 1
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued record was written or failed; False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to ``timeout``), then stop the writer."""
        self.flush(timeout)
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=timeout)
        self._writer.join(timeout)
        self.client.close()


__all__ = ["TrafficCapture"]
