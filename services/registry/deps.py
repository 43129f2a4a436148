"""FastAPI dependencies: settings, a database session, the store, events and queue, the token
checks (policy in ``settings.py``), and lookups that 404 (via ``NotFoundError``)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from draftopd.wire.asgi import Check, Refusal, bearer_token
from services.registry import jobs, repository
from services.registry.events import AliasEvents
from services.registry.models import Drafter, TrainJob, Version
from services.registry.queue import TrainQueue
from services.registry.schemas import MAX_INT
from services.registry.settings import RegistrySettings
from services.registry.storage import ArtifactStore

_bearer = HTTPBearer(auto_error=False, description="The registry's api_token.")


def get_app_settings(request: Request) -> RegistrySettings:
    settings: RegistrySettings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    factory: sessionmaker[Session] = request.app.state.sessions
    with factory() as session:
        yield session


def get_store(request: Request) -> ArtifactStore:
    store: ArtifactStore = request.app.state.store
    return store


def get_events(request: Request) -> AliasEvents:
    events: AliasEvents = request.app.state.events
    return events


def get_queue(request: Request) -> TrainQueue:
    queue: TrainQueue = request.app.state.queue
    return queue


def get_base_url(request: Request) -> str:
    """Where clients reach this registry: ``public_url`` or the request's own base URL."""
    settings = get_app_settings(request)
    return (settings.public_url or str(request.base_url)).rstrip("/")


SettingsDep = Annotated[RegistrySettings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
CredentialsDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def token_refusal(settings: RegistrySettings, token: str | None) -> Refusal | None:
    """Why a request with bearer ``token`` may not write (None: it may)."""
    if settings.api_token is None:
        if settings.allow_unauthenticated_writes:
            return None
        return Refusal(
            status.HTTP_403_FORBIDDEN,
            "this registry has no api_token: set DRAFTOPD_REGISTRY_API_TOKEN (or "
            "DRAFTOPD_REGISTRY_ALLOW_UNAUTHENTICATED_WRITES=true on a trusted machine)",
        )
    if token is None:
        return Refusal(
            status.HTTP_401_UNAUTHORIZED,
            "missing 'Authorization: Bearer <api_token>' header",
            {"WWW-Authenticate": "Bearer"},
        )
    expected = settings.api_token.get_secret_value().encode()
    if not secrets.compare_digest(token.encode(), expected):
        return Refusal(status.HTTP_403_FORBIDDEN, "invalid API token")
    return None


def auth_first(settings: RegistrySettings) -> Check:
    """The check ``AuthFirst`` runs before any body is read: every write needs the token (reads
    carry no body; ``require_read`` checks them)."""

    def check(method: str, path: str, authorization: str | None) -> Refusal | None:
        if method in WRITE_METHODS:
            return token_refusal(settings, bearer_token(authorization))
        return None

    return check


def _check_token(
    settings: RegistrySettings, credentials: HTTPAuthorizationCredentials | None
) -> None:
    refusal = token_refusal(settings, None if credentials is None else credentials.credentials)
    if refusal is not None:
        raise HTTPException(refusal.status, refusal.detail, headers=refusal.headers or None)


def require_write(settings: SettingsDep, credentials: CredentialsDep) -> None:
    """Mutating endpoints: the bearer token (401 missing, 403 wrong or none configured)."""
    _check_token(settings, credentials)


def require_read(settings: SettingsDep, credentials: CredentialsDep) -> None:
    """Reads: open while ``open_reads``; otherwise the same check as writes."""
    if not settings.open_reads:
        _check_token(settings, credentials)


def get_drafter(
    name: Annotated[str, Path(description="Drafter name.")], session: SessionDep
) -> Drafter:
    return repository.get_drafter(session, name)


DrafterDep = Annotated[Drafter, Depends(get_drafter)]


def get_version(
    drafter: DrafterDep,
    version: Annotated[int, Path(ge=1, le=MAX_INT, description="Version number (1, 2, ...).")],
    session: SessionDep,
) -> Version:
    return repository.get_version(session, drafter, version)


def get_job(
    job_id: Annotated[str, Path(description="Train job id.")], session: SessionDep
) -> TrainJob:
    return jobs.get_job(session, job_id)


StoreDep = Annotated[ArtifactStore, Depends(get_store)]
EventsDep = Annotated[AliasEvents, Depends(get_events)]
QueueDep = Annotated[TrainQueue, Depends(get_queue)]
BaseUrlDep = Annotated[str, Depends(get_base_url)]
VersionDep = Annotated[Version, Depends(get_version)]
JobDep = Annotated[TrainJob, Depends(get_job)]
