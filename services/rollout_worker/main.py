"""The rollout worker service: the rollout loop in a background thread, plus /health and
/metrics (Prometheus: rollout tokens/s and tau)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import redis
import torch
from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from draftopd.models.target import load_target
from draftopd.wire.registry_client import RegistryClient, connect
from services.rollout_worker.settings import RolloutWorkerSettings, get_settings
from services.rollout_worker.worker import RolloutWorker


def create_app(settings: RolloutWorkerSettings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads is not None:
            torch.set_num_threads(settings.torch_threads)
        target = await anyio.to_thread.run_sync(
            lambda: load_target(settings.target, device=settings.device, dtype=settings.dtype)
        )
        registry = _registry_client(settings)
        worker = RolloutWorker(
            redis.Redis.from_url(settings.redis_url),
            target,
            consumer=settings.consumer,
            block_ms=settings.block_ms,
            claim_idle_ms=settings.claim_idle_ms,
            stream_maxlen=settings.stream_maxlen,
            max_attempts=settings.max_attempts,
            registry=registry,
            artifact_cache_dir=settings.artifact_cache_dir,
        )
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,), name="rollouts", daemon=True)
        thread.start()
        app.state.worker, app.state.thread = worker, thread
        yield
        stop.set()
        await anyio.to_thread.run_sync(thread.join, 30.0)
        if registry is not None:
            registry.close()

    app = FastAPI(
        title="draftopd rollout worker",
        version="0.1.0",
        summary="Target-assisted rollouts with the requested drafter version, recorded into "
        "Redis Streams for Draft-OPD.",
        lifespan=lifespan,
    )

    @app.get("/health", summary="Liveness: the rollout thread and Redis")
    def health(request: Request) -> dict[str, object]:
        worker: RolloutWorker = request.app.state.worker
        alive = request.app.state.thread.is_alive()
        try:
            redis_ok = bool(worker.client.ping())
        except redis.RedisError:
            redis_ok = False
        return {
            "status": "ok" if alive and redis_ok else "degraded",
            "consumer": worker.consumer,
            "drafter_version": worker.drafter_version,
            "redis": redis_ok,
            "requests": worker.stats.requests,
            "last_error": worker.stats.last_error,
        }

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def metrics(request: Request) -> Response:
        stats = request.app.state.worker.stats
        registry = CollectorRegistry()
        values = {
            "draftopd_rollout_requests": ("requests published", stats.requests),
            "draftopd_rollout_duplicate_requests": ("requests already published", stats.duplicates),
            "draftopd_rollout_failures": ("requests that failed", stats.failures),
            "draftopd_rollout_sequences": ("sequences rolled out", stats.sequences),
            "draftopd_rollout_tokens": ("response tokens rolled out", stats.tokens),
            "draftopd_rollout_tokens_per_second": ("tokens / busy seconds", stats.tokens_per_s),
            "draftopd_rollout_tau": ("acceptance length of the rollouts", stats.tau),
            "draftopd_rollout_drafter_loads": ("drafter versions loaded", stats.drafter_loads),
        }
        for name, (text, value) in values.items():
            Gauge(name, text, registry=registry).set(value)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _registry_client(settings: RolloutWorkerSettings) -> RegistryClient | None:
    """The client for 'registry://' drafter references; None without a registry_url."""
    return connect(settings.registry_url, settings.registry_token)
