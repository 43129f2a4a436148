"""Requests of the three generation APIs mapped to one ``GenerationSpec`` (torch-free).

Defaults that differ between the APIs are settled here:
- ``/generate``: greedy (``temperature=0``), ``max_new_tokens=128``;
- ``/v1/completions``: OpenAI's ``temperature=1`` and ``max_tokens=16``;
- ``/v1/chat/completions``: ``temperature=1``; ``max_completion_tokens`` or ``max_tokens``, else
  128 (as ``/generate``; OpenAI itself fills the context).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.inference.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    GenerateRequest,
    SpeculativeMethod,
    SpeculativeOptions,
)

GENERATE = "/generate"
COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"


@dataclass(frozen=True)
class GenerationSpec:
    """One request in engine terms. Exactly one of ``prompt``, ``prompt_ids``, ``messages``."""

    endpoint: str  # route path, the metrics label
    max_new_tokens: int
    max_tokens_field: str  # the request field that set max_new_tokens (named in errors)
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    method: SpeculativeMethod | None = None  # None: the server's default method
    num_draft_tokens: int | None = None  # None: the server's default K
    lookup_first: int | None = None  # None: the server's default
    draft_tree: str | None = None  # "BxN", "chain", or None: the server's default


def _messages(messages: list[ChatMessage] | None) -> list[dict[str, str]] | None:
    if messages is None:
        return None
    return [{"role": m.role, "content": m.text()} for m in messages]


def _options(options: SpeculativeOptions | None) -> SpeculativeOptions:
    return options if options is not None else SpeculativeOptions()


def _sampling(
    request: GenerateRequest | CompletionRequest | ChatCompletionRequest, *, top_k: int
) -> dict[str, Any]:
    """The sampling and speculation fields the three APIs share."""
    options = _options(request.speculative)
    return {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": top_k,
        "seed": request.seed,
        "stop": tuple(request.stop_strings()),
        "ignore_eos": request.ignore_eos,
        "method": options.method,
        "num_draft_tokens": options.num_draft_tokens,
        "lookup_first": options.lookup_first,
        "draft_tree": options.draft_tree,
    }


def from_generate(request: GenerateRequest) -> GenerationSpec:
    return GenerationSpec(
        endpoint=GENERATE,
        max_new_tokens=request.max_new_tokens,
        max_tokens_field="max_new_tokens",
        prompt=request.prompt,
        messages=_messages(request.messages),
        **_sampling(request, top_k=request.top_k),
    )


def from_completion(request: CompletionRequest) -> GenerationSpec:
    text = request.prompt if isinstance(request.prompt, str) else None
    ids = None if isinstance(request.prompt, str) else list(request.prompt)
    return GenerationSpec(
        endpoint=COMPLETIONS,
        max_new_tokens=request.max_tokens,
        max_tokens_field="max_tokens",
        prompt=text,
        prompt_ids=ids,
        **_sampling(request, top_k=request.effective_top_k),
    )


def from_chat(request: ChatCompletionRequest) -> GenerationSpec:
    field, max_new_tokens = request.max_new_tokens()
    return GenerationSpec(
        endpoint=CHAT_COMPLETIONS,
        max_new_tokens=max_new_tokens,
        max_tokens_field=field,
        messages=_messages(request.messages),
        **_sampling(request, top_k=request.effective_top_k),
    )
