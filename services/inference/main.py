"""The inference service's app factory. Models load in the lifespan, never at import time.

Run it with ``python -m services.inference.main`` (host and port from the settings) or
``uvicorn services.inference.main:create_app --factory``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
import uvicorn
from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from draftopd.wire.asgi import AuthFirst
from draftopd.wire.registry_client import connect
from draftopd.wire.text import json_safe
from services.inference.api import generation, router
from services.inference.deps import auth_first
from services.inference.errors import (
    ClientGoneError,
    DrafterUnavailableError,
    InvalidRequestError,
    OverloadedError,
)
from services.inference.follower import AliasFollower, CandidateFollower
from services.inference.live import LiveCounters, LiveReporter
from services.inference.metrics import ServiceMetrics
from services.inference.serving import InferenceService, set_torch_threads
from services.inference.settings import InferenceSettings, get_settings

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left; nobody reads the body


def create_app(settings: InferenceSettings | None = None) -> FastAPI:
    """Build the app; ``settings`` defaults to ``get_settings()`` (the environment)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        set_torch_threads(settings.torch_threads)
        service = await anyio.to_thread.run_sync(InferenceService.load, settings, app.state.metrics)
        follower = AliasFollower(service, settings) if settings.follows_registry else None
        canary = (
            CandidateFollower(service, settings)
            if settings.follows_registry and settings.candidate_alias
            else None
        )
        reporter = _live_reporter(service, settings)
        if follower is not None:  # the first load happens before the first request
            service.follower = follower
            await anyio.to_thread.run_sync(follower.start)
        if canary is not None:
            await anyio.to_thread.run_sync(canary.start)
        if reporter is not None:
            reporter.start()
        app.state.service, app.state.follower = service, follower
        app.state.canary, app.state.reporter = canary, reporter
        try:
            yield
        finally:
            app.state.service = None
            for part in (canary, follower, reporter):
                if part is not None:
                    await anyio.to_thread.run_sync(part.stop)
            if service.capture is not None:
                service.capture.close()

    app = FastAPI(
        title="draftopd inference",
        version="0.1.0",
        summary="Speculative decoding (EAGLE-3 or DFlash drafter, n-gram or plain) behind native "
        "and OpenAI-compatible APIs. Every response names the drafter version that made it.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = ServiceMetrics()
    app.state.service = None
    app.state.follower = None
    app.include_router(generation)
    app.include_router(router)
    _add_error_handlers(app)
    app.add_middleware(AuthFirst, check=auth_first(settings))  # the api_key before the body
    return app


def _live_reporter(service: InferenceService, settings: InferenceSettings) -> LiveReporter | None:
    """Live metrics go to the registry while a registry drafter is followed."""
    if not settings.follows_registry or settings.live_report_s <= 0:
        return None
    assert settings.registry_url is not None and settings.drafter_name is not None
    client = connect(settings.registry_url, settings.registry_token, timeout=10.0)
    service.live = LiveCounters(settings.drafter_name)
    return LiveReporter(service.live, client, settings.drafter_name, settings.live_report_s)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422, made safe to encode whatever the input held (NaN, lone surrogates)."""
        detail = json_safe(jsonable_encoder(exc.errors()))
        return JSONResponse({"detail": detail}, status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(InvalidRequestError)
    async def invalid_request(request: Request, exc: InvalidRequestError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail()}, status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(OverloadedError)
    async def overloaded(request: Request, exc: OverloadedError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)}
        return JSONResponse({"detail": str(exc)}, status.HTTP_429_TOO_MANY_REQUESTS, headers)

    @app.exception_handler(DrafterUnavailableError)
    async def no_drafter(request: Request, exc: DrafterUnavailableError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status.HTTP_409_CONFLICT)

    @app.exception_handler(ClientGoneError)
    async def client_gone(request: Request, exc: ClientGoneError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, CLIENT_CLOSED_REQUEST)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = get_settings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port)


if __name__ == "__main__":
    main()
