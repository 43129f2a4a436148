"""Traffic capture: a sampled share of finished requests goes to the traffic stream
(``draftopd.wire.traffic``). Off unless ``capture_rate`` > 0. A failure to capture never fails
or delays a request beyond Redis's socket timeout, and is logged without the prompt."""

from __future__ import annotations

import logging
import random
import time

import redis

from draftopd.speculative.engine import DecodeStats
from draftopd.wire.traffic import TrafficRecord, append
from services.inference.settings import InferenceSettings

logger = logging.getLogger(__name__)


class TrafficCapture:
    def __init__(self, settings: InferenceSettings, client: redis.Redis) -> None:
        self.settings = settings
        self.client = client
        self.random = random.Random()
        self.captured = 0
        self.failed = 0

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
        """Capture this finished request with probability ``capture_rate``; True if written."""
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
            return False
        self.captured += 1
        return True

    def close(self) -> None:
        self.client.close()


__all__ = ["TrafficCapture"]
