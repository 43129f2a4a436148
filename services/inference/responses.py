"""Response bodies and server-sent events for the three generation APIs (torch-free).

The serving core yields ``Delta`` objects (one per decode cycle) and then one ``Outcome``; this
module turns those into the native ``/generate`` wire format or OpenAI's.

SSE framing: every event is ``data: <json>\\n\\n`` and every stream ends with ``data: [DONE]``.
- ``/generate``: ``{"type": "delta", "text", "token_ids"}`` per cycle, then
  ``{"type": "final", ...the full GenerateResponse}``.
- ``/v1/completions``: ``text_completion`` chunks, the last with ``finish_reason`` (and the
  ``speculative`` stats extension); with ``stream_options.include_usage`` one more chunk with
  empty ``choices`` and the ``usage``, as OpenAI does.
- ``/v1/chat/completions``: ``chat.completion.chunk``; the first carries ``delta.role``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel

from services.inference.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionResponse,
    FinishReason,
    GenerateResponse,
    GenerateStreamDelta,
    GenerateStreamFinal,
    SpeculativeStats,
    Usage,
)

if TYPE_CHECKING:
    from draftopd.speculative.engine import Delta

SSE_MEDIA_TYPE = "text/event-stream"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE_EVENT = "data: [DONE]\n\n"


@dataclass(frozen=True)
class Outcome:
    """A finished generation, in wire terms."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage
    drafter_version: str | None
    speculative: SpeculativeStats


@dataclass(frozen=True)
class OpenAIMeta:
    """The id, creation time and model name every OpenAI response and chunk repeats."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, model: str) -> OpenAIMeta:
        return cls(id=f"{prefix}-{uuid.uuid4().hex}", created=int(time.time()), model=model)


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


# -- /generate --------------------------------------------------------------------------------
def generate_response(outcome: Outcome) -> GenerateResponse:
    return GenerateResponse(
        text=outcome.text,
        token_ids=outcome.token_ids,
        finish_reason=outcome.finish_reason,
        usage=outcome.usage,
        drafter_version=outcome.drafter_version,
        speculative=outcome.speculative,
    )


async def generate_events(events: AsyncIterator[Delta | Outcome]) -> AsyncIterator[str]:
    async for event in events:
        if isinstance(event, Outcome):
            final = generate_response(event).model_dump()
            yield sse(GenerateStreamFinal(**final))
        else:
            yield sse(GenerateStreamDelta(text=event.text, token_ids=list(event.token_ids)))
    yield DONE_EVENT


# -- /v1/completions --------------------------------------------------------------------------
def completion_response(outcome: Outcome, meta: OpenAIMeta) -> CompletionResponse:
    return CompletionResponse(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        choices=[CompletionChoice(text=outcome.text, finish_reason=outcome.finish_reason)],
        usage=outcome.usage,
        drafter_version=outcome.drafter_version,
        speculative=outcome.speculative,
    )


async def completion_events(
    events: AsyncIterator[Delta | Outcome],
    meta: OpenAIMeta,
    *,
    drafter_version: str | None,
    include_usage: bool,
) -> AsyncIterator[str]:
    def chunk(text: str, outcome: Outcome | None = None) -> CompletionResponse:
        return CompletionResponse(
            id=meta.id,
            created=meta.created,
            model=meta.model,
            choices=[
                CompletionChoice(
                    text=text, finish_reason=outcome.finish_reason if outcome else None
                )
            ],
            drafter_version=drafter_version,
            speculative=outcome.speculative if outcome else None,
        )

    async for event in events:
        if isinstance(event, Outcome):
            yield sse(chunk("", event))
            if include_usage:
                yield sse(
                    CompletionResponse(
                        id=meta.id,
                        created=meta.created,
                        model=meta.model,
                        choices=[],
                        usage=event.usage,
                        drafter_version=drafter_version,
                    )
                )
        elif event.text:
            yield sse(chunk(event.text))
    yield DONE_EVENT


# -- /v1/chat/completions ---------------------------------------------------------------------
def chat_response(outcome: Outcome, meta: OpenAIMeta) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        choices=[
            ChatChoice(
                message=AssistantMessage(content=outcome.text),
                finish_reason=outcome.finish_reason,
            )
        ],
        usage=outcome.usage,
        drafter_version=outcome.drafter_version,
        speculative=outcome.speculative,
    )


async def chat_events(
    events: AsyncIterator[Delta | Outcome],
    meta: OpenAIMeta,
    *,
    drafter_version: str | None,
    include_usage: bool,
) -> AsyncIterator[str]:
    def chunk(
        delta: ChatDelta, outcome: Outcome | None = None, *, usage_only: bool = False
    ) -> ChatCompletionChunk:
        choices = (
            []
            if usage_only
            else [
                ChatChunkChoice(
                    delta=delta, finish_reason=outcome.finish_reason if outcome else None
                )
            ]
        )
        return ChatCompletionChunk(
            id=meta.id,
            created=meta.created,
            model=meta.model,
            choices=choices,
            usage=outcome.usage if usage_only and outcome else None,
            drafter_version=drafter_version,
            speculative=outcome.speculative if outcome and not usage_only else None,
        )

    yield sse(chunk(ChatDelta(role="assistant", content="")))
    async for event in events:
        if isinstance(event, Outcome):
            yield sse(chunk(ChatDelta(), event))
            if include_usage:
                yield sse(chunk(ChatDelta(), event, usage_only=True))
        elif event.text:
            yield sse(chunk(ChatDelta(content=event.text)))
    yield DONE_EVENT
