"""The registry service's app factory (the control plane: drafters, versions, aliases, jobs).

Run it with ``python -m services.registry.main`` (host and port from the settings) or
``uvicorn services.registry.main:create_app --factory``. Migrate the database first
(``python -m services.registry.migrate`` or ``alembic upgrade head``): the app never creates
tables. Nothing connects at import time or in ``create_app``; the first request does.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError

from draftopd.wire.asgi import AuthFirst
from draftopd.wire.text import json_safe
from services.registry import api, train_api
from services.registry.controller import Controller
from services.registry.db import make_engine, make_session_factory
from services.registry.deps import auth_first
from services.registry.errors import (
    ArtifactTooLargeError,
    ConflictError,
    InvalidArtifactError,
    NotFoundError,
    QueueUnavailableError,
)
from services.registry.events import AliasEvents
from services.registry.queue import TrainQueue
from services.registry.settings import RegistrySettings, get_settings
from services.registry.storage import LocalArtifactStore

logger = logging.getLogger(__name__)

_STATUS_OF: dict[type[Exception], int] = {
    NotFoundError: status.HTTP_404_NOT_FOUND,
    ConflictError: status.HTTP_409_CONFLICT,
    InvalidArtifactError: status.HTTP_400_BAD_REQUEST,
    ArtifactTooLargeError: status.HTTP_413_CONTENT_TOO_LARGE,
    QueueUnavailableError: status.HTTP_503_SERVICE_UNAVAILABLE,
}


def create_app(settings: RegistrySettings | None = None) -> FastAPI:
    """Build the app; ``settings`` defaults to ``get_settings()`` (the environment)."""
    settings = settings or get_settings()
    engine = make_engine(settings.database_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        controller = Controller(settings, app.state.sessions, app.state.events, app.state.queue)
        controller.start()
        app.state.controller = controller
        yield
        controller.stop()
        app.state.events.close()
        app.state.queue.close()
        engine.dispose()

    app = FastAPI(
        title="draftopd registry",
        version="0.1.0",
        summary="Drafters, versioned artifacts (sha256), benchmark metrics, aliases that "
        "inference follows, and train jobs for the trainer.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.sessions = make_session_factory(engine)
    app.state.store = LocalArtifactStore(settings.artifact_dir)
    app.state.events = AliasEvents(settings.redis_url)
    app.state.queue = TrainQueue(settings.broker_url, settings.train_queue)
    for router in (api.router, api.reads, api.writes, train_api.reads, train_api.writes):
        app.include_router(router)
    _add_error_handlers(app)
    app.add_middleware(AuthFirst, check=auth_first(settings))  # the token before the body
    return app


def _add_error_handlers(app: FastAPI) -> None:
    async def registry_error(request: Request, exc: Exception) -> JSONResponse:
        code = next(code for kind, code in _STATUS_OF.items() if isinstance(exc, kind))
        return JSONResponse({"detail": str(exc)}, code)

    for kind in _STATUS_OF:
        app.add_exception_handler(kind, registry_error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422, made safe to encode whatever the input held (NaN, lone surrogates)."""
        detail = json_safe(jsonable_encoder(exc.errors()))
        return JSONResponse({"detail": detail}, status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(OperationalError)
    async def database_down(request: Request, exc: OperationalError) -> JSONResponse:
        logger.warning("database error on %s: %s", request.url.path, exc.orig)
        return JSONResponse(
            {"detail": f"the registry database is unavailable ({type(exc.orig).__name__})"},
            status.HTTP_503_SERVICE_UNAVAILABLE,
        )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = get_settings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port)


if __name__ == "__main__":
    main()
