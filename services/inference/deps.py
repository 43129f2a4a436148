"""FastAPI dependencies: the app's settings, service and metrics, and the API-key check."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from draftopd.wire.asgi import Check, Refusal, bearer_token
from services.inference.metrics import ServiceMetrics
from services.inference.serving import InferenceService
from services.inference.settings import InferenceSettings

_bearer = HTTPBearer(auto_error=False, description="The server's api_key, when one is set.")


def get_app_settings(request: Request) -> InferenceSettings:
    settings: InferenceSettings = request.app.state.settings
    return settings


def get_service(request: Request) -> InferenceService:
    service: InferenceService | None = getattr(request.app.state, "service", None)
    if service is None:  # only between app creation and the end of the lifespan startup
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the model is still loading")
    return service


def get_metrics(request: Request) -> ServiceMetrics:
    metrics: ServiceMetrics = request.app.state.metrics
    return metrics


def api_key_refusal(settings: InferenceSettings, token: str | None) -> Refusal | None:
    """Why a request with bearer ``token`` may not generate (None: it may, or no api_key)."""
    if settings.api_key is None:
        return None
    if token is None:
        return Refusal(
            status.HTTP_401_UNAUTHORIZED,
            "missing 'Authorization: Bearer <api_key>' header",
            {"WWW-Authenticate": "Bearer"},
        )
    expected = settings.api_key.get_secret_value().encode()
    if not secrets.compare_digest(token.encode(), expected):
        return Refusal(status.HTTP_403_FORBIDDEN, "invalid API key")
    return None


def auth_first(settings: InferenceSettings) -> Check:
    """The check ``AuthFirst`` runs before any body is read: every POST (the generation routes)
    needs the api_key when one is set."""

    def check(method: str, path: str, authorization: str | None) -> Refusal | None:
        return api_key_refusal(settings, bearer_token(authorization)) if method == "POST" else None

    return check


def require_api_key(
    settings: Annotated[InferenceSettings, Depends(get_app_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """401 without a bearer token, 403 with a wrong one; a no-op when no api_key is set."""
    refusal = api_key_refusal(settings, None if credentials is None else credentials.credentials)
    if refusal is not None:
        raise HTTPException(refusal.status, refusal.detail, headers=refusal.headers or None)


SettingsDep = Annotated[InferenceSettings, Depends(get_app_settings)]
ServiceDep = Annotated[InferenceService, Depends(get_service)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
