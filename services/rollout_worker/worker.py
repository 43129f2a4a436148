"""The rollout loop: take a request, make sure the drafter version is loaded, roll out with
recording on, publish the records (``draftopd.wire.rollout_queue``).

A request's ``drafter_path`` is a local checkpoint directory or a registry version,
``registry://NAME/VERSION``: the worker fetches that into its artifact cache (sha256 checked by
``RegistryClient.fetch_version``; a cached version is not downloaded again) and loads it. A
registry that is unreachable, an unknown version or a refused artifact fails the request like an
unreadable checkpoint does (retried, then dead-lettered)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import redis

from draftopd.models.checkpoint import load_drafter
from draftopd.models.drafter import Drafter
from draftopd.models.target import TargetModel, default_cache_dir
from draftopd.training.opd.rollouts import make_rollouts
from draftopd.wire.formats import parse_registry_ref
from draftopd.wire.registry_client import RegistryClient, RegistryError, resolve_drafter_ref
from draftopd.wire.rollout_queue import DEAD_LETTER_STREAM, RolloutRequest, next_request, publish

logger = logging.getLogger(__name__)

FAILURES_KEY = "draftopd:rollout-requests:failures"  # entry id -> failed attempts


@dataclass
class WorkerStats:
    requests: int = 0
    duplicates: int = 0  # requests another worker had already published
    failures: int = 0
    sequences: int = 0
    tokens: int = 0
    cycles: int = 0
    busy_s: float = 0.0
    drafter_loads: int = 0
    last_error: str | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.busy_s if self.busy_s > 0 else 0.0

    @property
    def tau(self) -> float:
        return self.tokens / self.cycles if self.cycles else 0.0


class RolloutWorker:
    def __init__(
        self,
        client: redis.Redis,
        target: TargetModel,
        *,
        consumer: str,
        block_ms: int = 1000,
        claim_idle_ms: int = 60_000,
        stream_maxlen: int = 10_000,
        max_attempts: int = 3,
        registry: RegistryClient | None = None,
        artifact_cache_dir: Path | None = None,
    ) -> None:
        self.client, self.target, self.consumer = client, target, consumer
        self.block_ms, self.claim_idle_ms, self.stream_maxlen = (
            block_ms, claim_idle_ms, stream_maxlen,
        )  # fmt: skip
        self.max_attempts = max_attempts
        self.registry = registry
        self.cache_dir = artifact_cache_dir or default_cache_dir() / "drafters"
        self.stats = WorkerStats()
        self.drafter: Drafter | None = None
        self.drafter_key: tuple[str, str] | None = None  # (path, version) held
        self._lock = threading.Lock()

    @property
    def drafter_version(self) -> str | None:
        return None if self.drafter_key is None else self.drafter_key[1]

    def _drafter_for(self, request: RolloutRequest) -> Drafter:
        ref = request.drafter_path
        key = (ref, request.drafter_version)
        if self.drafter is None or self.drafter_key != key:
            if self.registry is None and parse_registry_ref(ref) is not None:
                raise ValueError(
                    f"drafter {ref} needs a registry: this worker has none "
                    "(set DRAFTOPD_ROLLOUT_REGISTRY_URL)"
                )
            directory = resolve_drafter_ref(ref, self.registry, self.cache_dir)
            self.drafter = load_drafter(directory, self.target).eval()
            self.drafter_key = key
            self.stats.drafter_loads += 1
            logger.info("loaded drafter version %s from %s", key[1], directory)
        return self.drafter

    def run_once(self) -> bool:
        """Serve one request if there is one; True when a request was handled."""
        got = next_request(
            self.client, self.consumer, block_ms=self.block_ms, claim_idle_ms=self.claim_idle_ms
        )
        if got is None:
            return False
        entry_id, request = got
        t0 = time.perf_counter()
        try:
            drafter = self._drafter_for(request)
            records = make_rollouts(
                self.target,
                drafter,
                request.prompts,
                num_draft_tokens=request.num_draft_tokens,
                max_new_tokens=request.max_new_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                seeds=request.seeds,
                job_id=request.job_id,
                drafter_version=request.drafter_version,
                mode=request.mode,
                batch_size=request.batch_size,
            )
        except (OSError, ValueError, RegistryError, httpx.HTTPError) as err:
            # unreadable, incompatible or unfetchable drafter; bad prompts
            self._failed(entry_id, request, err)
            return True
        records = [
            replace(
                r,
                extra={"request_id": request.request_id, "index": i, "worker": self.consumer},
            )
            for i, r in enumerate(records)
        ]
        written = publish(self.client, entry_id, request, records, maxlen=self.stream_maxlen)
        with self._lock:
            self.stats.busy_s += time.perf_counter() - t0
            if not written:
                self.stats.duplicates += 1
                return True
            self.stats.requests += 1
            self.stats.sequences += len(records)
            self.stats.tokens += sum(len(r.response_ids) for r in records)
            self.stats.cycles += sum(len(r.cycles) for r in records)
        return True

    def _failed(self, entry_id: str, request: RolloutRequest, err: Exception) -> None:
        """Leave the request pending (retried after claim_idle_ms) until it has failed
        ``max_attempts`` times; then move it to the dead-letter stream with the error."""
        self.stats.failures += 1
        self.stats.last_error = f"request {request.request_id}: {err}"
        attempts = int(self.client.hincrby(FAILURES_KEY, entry_id, 1))
        logger.error("rollout request %s failed (%d): %s", request.request_id, attempts, err)
        if attempts < self.max_attempts:
            return
        if publish(self.client, entry_id, request, []):  # acknowledged and deleted, no records
            self.client.xadd(
                DEAD_LETTER_STREAM,
                {"job_id": request.job_id, "request_id": request.request_id, "error": str(err)},
            )
        self.client.hdel(FAILURES_KEY, entry_id)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.run_once()
            except redis.RedisError as err:
                self.stats.last_error = f"redis: {err}"
                logger.warning("redis error, retrying in 1 s: %s", err)
                stop.wait(1.0)
