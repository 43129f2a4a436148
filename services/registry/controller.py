"""The registry's controller: one daemon thread that, every ``policy_interval_s``, applies the
live-τ policy (``policy.py``: canary verdicts, the rollback guard) and advances continual jobs
(``continual.py``). It runs in the registry process, which owns the aliases; run it on one
replica only (``policy_interval_s = 0`` on the others). A failing tick is logged and retried at
the next one.
"""

from __future__ import annotations

import logging
import threading

import redis
from sqlalchemy.orm import Session, sessionmaker

from services.registry.continual import ContinualRunner
from services.registry.events import AliasEvents
from services.registry.policy import LivePolicy
from services.registry.queue import TrainQueue
from services.registry.settings import RegistrySettings

logger = logging.getLogger(__name__)


class Controller:
    def __init__(
        self,
        settings: RegistrySettings,
        sessions: sessionmaker[Session],
        events: AliasEvents,
        queue: TrainQueue,
    ) -> None:
        base_url = settings.public_url or f"http://{settings.host}:{settings.port}"
        self.interval_s = settings.policy_interval_s
        self.sessions = sessions
        self.policy = LivePolicy(settings.policy, events, base_url)
        self.redis = redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=2.0, socket_timeout=5.0
        )
        self.continual = ContinualRunner(queue, events, self.redis, base_url)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ticks = 0

    def start(self) -> None:
        if self.interval_s <= 0:
            logger.info("controller off (policy_interval_s = 0)")
            return
        self._thread = threading.Thread(target=self._run, name="registry-controller", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.redis.close()

    def tick(self) -> list[str]:
        """One pass; returns the causes of the alias moves the policy made."""
        with self.sessions() as session:
            moves = self.policy.run_once(session)
        with self.sessions() as session:
            self.continual.run_once(session)
        self.ticks += 1
        return moves

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception:  # the database or Redis may be down for a while
                logger.exception("controller tick failed; retrying in %ss", self.interval_s)
