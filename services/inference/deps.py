"""FastAPI dependencies: the app's settings, service and metrics, and the API-key check."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

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


def require_api_key(
    settings: Annotated[InferenceSettings, Depends(get_app_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """401 without a bearer token, 403 with a wrong one; a no-op when no api_key is set."""
    if settings.api_key is None:
        return
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing 'Authorization: Bearer <api_key>' header",
            headers={"WWW-Authenticate": "Bearer"},
        )
    expected = settings.api_key.get_secret_value().encode()
    if not secrets.compare_digest(credentials.credentials.encode(), expected):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "invalid API key")


SettingsDep = Annotated[InferenceSettings, Depends(get_app_settings)]
ServiceDep = Annotated[InferenceService, Depends(get_service)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
