"""HTTP routes of the inference service (docs/design.md §4). Thin: validate, call the service,
return.

Generation endpoints (``/generate``, ``/v1/completions``, ``/v1/chat/completions``) need the API
key when one is configured; ``/health``, ``/metrics``, ``/drafter`` and ``/v1/models`` are open.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask

from services.inference import responses, specs
from services.inference.deps import MetricsDep, ServiceDep, require_api_key
from services.inference.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DrafterInfo,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    ModelList,
)
from services.inference.serving import PreparedGeneration
from services.inference.status import InferenceHealth

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing bearer token (only when the server has an api_key)."},
    403: {"description": "Wrong bearer token."},
    409: {
        "description": "speculative.method 'eagle3' or 'dflash' but no drafter of that family "
        "is loaded."
    },
    429: {"description": "Every slot busy and the wait queue full; retry after Retry-After s."},
    422: {"description": "Invalid field; detail[].loc names it."},
}
# With stream=true: server-sent events. The schema describes one event as an SSE parser reads it
# (Open API before 3.2: a text/event-stream schema describes each event): its data is the JSON of
# one chunk, and the stream's last data is [DONE].
_SSE_DOC = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "properties": {
                "event": {"type": "string"},
                "data": {"type": "string", "description": "One chunk as JSON, or [DONE]."},
            },
            "required": ["data"],
        }
    }
}

router = APIRouter()
generation = APIRouter(dependencies=[Depends(require_api_key)], responses=_ERRORS)


def _sse(events: Any, prepared: PreparedGeneration) -> StreamingResponse:
    """The SSE response; its background task frees the request's admission even when the
    client left before the stream started (the stream's own ``finally`` then never runs)."""
    return StreamingResponse(
        events,
        media_type=responses.SSE_MEDIA_TYPE,
        headers=responses.SSE_HEADERS,
        background=BackgroundTask(prepared.admission.release),
    )


@generation.post(
    "/generate",
    response_model=GenerateResponse,
    responses={200: {"content": _SSE_DOC, "description": "JSON, or SSE when stream=true."}},
    summary="Generate with speculative decoding (native API)",
)
async def generate(body: GenerateRequest, request: Request, service: ServiceDep) -> Any:
    """Greedy by default. ``speculative.method`` picks the proposer (default: the served
    drafter's family, eagle3 or dflash, when one is loaded, else ngram); the output is the
    target's own either way. With ``stream=true``: SSE, one ``{"type": "delta"}`` event per
    decode cycle, then ``{"type": "final", ...}`` with the full response and stats, then
    ``data: [DONE]``."""
    prepared = service.prepare(specs.from_generate(body))
    if body.stream:
        events = service.stream(prepared, is_disconnected=request.is_disconnected)
        return _sse(responses.generate_events(events), prepared)
    outcome = await service.generate(prepared, is_disconnected=request.is_disconnected)
    return responses.generate_response(outcome)


@generation.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={200: {"content": _SSE_DOC, "description": "JSON, or SSE when stream=true."}},
    summary="OpenAI-compatible text completion",
)
async def completions(body: CompletionRequest, request: Request, service: ServiceDep) -> Any:
    """OpenAI defaults (``temperature=1``, ``max_tokens=16``); ``prompt`` is text or token ids.
    Extensions: ``speculative``, ``top_k``, ``ignore_eos``; responses add ``drafter_version``."""
    prepared = service.prepare(specs.from_completion(body))
    meta = responses.OpenAIMeta.new("cmpl", service.settings.model_name)
    if body.stream:
        events = service.stream(prepared, is_disconnected=request.is_disconnected)
        return _sse(
            responses.completion_events(
                events,
                meta,
                drafter_version=prepared.drafter_version,
                include_usage=body.include_usage,
            ),
            prepared,
        )
    outcome = await service.generate(prepared, is_disconnected=request.is_disconnected)
    return responses.completion_response(outcome, meta)


@generation.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={200: {"content": _SSE_DOC, "description": "JSON, or SSE when stream=true."}},
    summary="OpenAI-compatible chat completion",
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, service: ServiceDep
) -> Any:
    """Messages go through the target's chat template. ``max_tokens`` defaults to 128.
    Extensions: ``speculative``, ``top_k``, ``ignore_eos``; responses add ``drafter_version``."""
    prepared = service.prepare(specs.from_chat(body))
    meta = responses.OpenAIMeta.new("chatcmpl", service.settings.model_name)
    if body.stream:
        events = service.stream(prepared, is_disconnected=request.is_disconnected)
        return _sse(
            responses.chat_events(
                events,
                meta,
                drafter_version=prepared.drafter_version,
                include_usage=body.include_usage,
            ),
            prepared,
        )
    outcome = await service.generate(prepared, is_disconnected=request.is_disconnected)
    return responses.chat_response(outcome, meta)


@router.get("/v1/models", response_model=ModelList, summary="The served model (OpenAI format)")
def models(service: ServiceDep) -> ModelList:
    return ModelList(data=[ModelCard(id=service.settings.model_name, created=service.started_at)])


@router.get("/health", response_model=InferenceHealth, summary="Liveness and what is served")
def health(service: ServiceDep) -> InferenceHealth:
    """``registry`` (when following a registry alias) shows whether the served drafter is the
    version the alias names and the last version refused or failed, with the reason."""
    return service.health()


@router.get("/drafter", response_model=DrafterInfo, summary="The drafter being served")
def drafter(service: ServiceDep) -> DrafterInfo:
    return service.drafter_info()


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
    summary="Prometheus metrics",
)
def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
