"""Wire models of the inference API (docs/design.md §4). Torch-free: pydantic only.

Two request families share one set of sampling fields:
- ``/generate``: the native API. Strict (``extra="forbid"``), greedy by default.
- ``/v1/completions`` and ``/v1/chat/completions``: OpenAI-compatible. Unknown fields are ignored
  (as vLLM does), the defaults are OpenAI's (``temperature=1``), and features the engine does not
  have (``n > 1``, logprobs, echo, penalties) are refused with a 422 rather than silently ignored.

Every response names the drafter version that produced it (``drafter_version``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from draftopd.wire.formats import parse_draft_tree
from draftopd.wire.text import valid_text

DEFAULT_MAX_NEW_TOKENS = 128  # /generate and chat completions without max_tokens
OPENAI_COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 16
MAX_DRAFT_TOKENS = 32

SpeculativeMethod = Literal["eagle3", "dflash", "ngram", "none"]
DRAFTER_METHODS = ("eagle3", "dflash")  # the methods that run the served drafter (its family)
ChatRole = Literal["system", "developer", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length"]


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit signed seed


class _Request(BaseModel):
    """Every request model: finite numbers only and valid Unicode text (each model keeps its own
    rule for unknown fields)."""

    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        return valid_text(value)


class SpeculativeOptions(_Request):
    """Per-request choice of the proposer. Omitted fields take the server's defaults."""

    model_config = ConfigDict(extra="forbid")

    method: SpeculativeMethod | None = Field(
        default=None,
        description="eagle3 or dflash (the served drafter, which must be of that family), "
        "ngram (prompt lookup) or none.",
    )
    num_draft_tokens: int | None = Field(
        default=None, ge=1, le=MAX_DRAFT_TOKENS, description="Draft tokens per cycle (K)."
    )
    lookup_first: int | None = Field(
        default=None,
        ge=0,
        le=MAX_DRAFT_TOKENS,
        description="eagle3/dflash only: where the context repeats, propose up to N tokens by "
        "n-gram lookup instead of the drafter (0 = off; null = the server's default).",
    )
    draft_tree: str | None = Field(
        default=None,
        description="eagle3 only: draft a dynamic tree BRANCHxNODES[:MINPROB] of depth K (e.g. "
        "'3x10' or '3x10:0.05') instead of a chain, or 'chain' (null = the server's default). "
        "Never changes the output.",
    )

    @field_validator("draft_tree")
    @classmethod
    def _tree_shape(cls, value: str | None) -> str | None:
        if value is None or value == "chain":
            return value
        parse_draft_tree(value)  # a ValueError becomes a 422 naming the field
        return value


class TextPart(_Request):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(_Request):
    role: ChatRole
    content: str | list[TextPart] = Field(description="A string, or a list of text parts.")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


def _stop_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else list(value)
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    if any(not s for s in stops):
        raise ValueError("stop strings must not be empty")
    return stops


class _Sampling(_Request):
    """Sampling fields shared by every generation request."""

    temperature: float = Field(default=0.0, ge=0.0, description="0 means greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus mass in (0, 1].")
    top_k: int = Field(
        default=0, ge=0, le=2**31 - 1, description="Keep the k most likely tokens; 0 disables."
    )
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, description="Seed of the request's generator (sampling)."
    )
    stop: str | list[str] | None = Field(
        default=None, description="Stop strings (text ends before)."
    )
    stream: bool = Field(
        default=False, description="Stream server-sent events, one per decode cycle."
    )
    ignore_eos: bool = Field(default=False, description="Keep generating past EOS (benchmarks).")
    speculative: SpeculativeOptions | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        _stop_list(value)
        return value

    def stop_strings(self) -> list[str]:
        return _stop_list(self.stop)


# -- /generate --------------------------------------------------------------------------------
class GenerateRequest(_Sampling):
    """Native generation request: exactly one of ``prompt`` and ``messages``."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(
        default=None, min_length=1, description="Plain text, tokenized as is."
    )
    messages: list[ChatMessage] | None = Field(
        default=None, min_length=1, description="Chat messages (the target's chat template)."
    )
    max_new_tokens: int = Field(
        default=DEFAULT_MAX_NEW_TOKENS, ge=1, description="Hard cap on generated tokens."
    )

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SpeculativeStats(BaseModel):
    method: SpeculativeMethod
    num_draft_tokens: int = Field(description="K asked per cycle (0 for method none).")
    lookup_first: int = Field(
        default=0, description="N of n-gram lookup ahead of the drafter (0 = the drafter alone)."
    )
    lookup_cycles: int = Field(default=0, description="Cycles whose drafts came from the lookup.")
    draft_tree: str | None = Field(
        default=None, description="The draft tree's BRANCHxNODES (null: chain drafts)."
    )
    tree_cycles: int = Field(
        default=0, description="Cycles that verified a draft tree (by position = by depth there)."
    )
    tau: float = Field(description="Committed tokens / verification cycles, bonus included.")
    cycles: int
    drafts: int = Field(description="Cycles that proposed at least one token.")
    draft_tokens: int
    accepted_tokens: int
    accepted_by_position: list[int] = Field(description="Index j-1: drafts accepted at slot j.")
    tokens_per_s: float = Field(description="Output tokens / decode seconds (prefill excluded).")
    prefill_s: float
    decode_s: float


class GenerateResponse(BaseModel):
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage
    drafter_version: str | None = Field(
        description="The EAGLE-3 drafter version, 'ngram', or null for plain decoding."
    )
    speculative: SpeculativeStats


class GenerateStreamDelta(BaseModel):
    """One SSE event per decode cycle."""

    type: Literal["delta"] = "delta"
    text: str
    token_ids: list[int]


class GenerateStreamFinal(GenerateResponse):
    """The last SSE event before ``[DONE]``: the full response, stats included."""

    type: Literal["final"] = "final"


# -- OpenAI-compatible ------------------------------------------------------------------------
class StreamOptions(_Request):
    include_usage: bool = False


class _OpenAIRequest(_Sampling):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float = Field(
        default=1.0, ge=0.0, description="OpenAI's default is 1.0; 0 is greedy."
    )
    top_k: int = Field(default=0, ge=-1, description="vLLM extension; 0 or -1 disables.")
    n: int = Field(default=1, description="Only 1 is supported.")
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"only n=1 is supported, got n={value}")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("penalties are not supported (speculative decoding is lossless)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @property
    def effective_top_k(self) -> int:
        return max(self.top_k, 0)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_OpenAIRequest):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[int], Field(min_length=1)] = Field(
        description="Text, or a list of token ids."
    )
    max_tokens: int = Field(default=OPENAI_COMPLETIONS_MAX_TOKENS, ge=1)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("logprobs are not supported")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return value


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(
        default=None, ge=1, description=f"Defaults to {DEFAULT_MAX_NEW_TOKENS} (as /generate)."
    )
    max_completion_tokens: int | None = Field(
        default=None, ge=1, description="Wins over max_tokens."
    )
    logprobs: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    def max_new_tokens(self) -> tuple[str, int]:
        """(field name, value) of the effective output cap."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        if self.max_tokens is not None:
            return "max_tokens", self.max_tokens
        return "max_tokens", DEFAULT_MAX_NEW_TOKENS


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    drafter_version: str | None
    speculative: SpeculativeStats | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    drafter_version: str | None
    speculative: SpeculativeStats | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    drafter_version: str | None
    speculative: SpeculativeStats | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "draftopd"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- service info -----------------------------------------------------------------------------
class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    target: str
    device: str
    dtype: str
    drafter_version: str | None
    default_method: SpeculativeMethod
    num_draft_tokens: int


class DrafterInfo(BaseModel):
    """The drafter being served (EAGLE-3 or DFlash); every field but ``num_draft_tokens`` is null
    if none."""

    version: str | None
    architecture: str | None
    target: str | None = Field(description="The target the drafter was built for.")
    path: str | None = Field(description="Checkpoint directory (null for a random drafter).")
    draft_vocab_size: int | None
    num_draft_tokens: int
    default_method: SpeculativeMethod
    provenance: dict[str, Any] | None = None


__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatMessage",
    "CompletionRequest",
    "CompletionResponse",
    "DrafterInfo",
    "GenerateRequest",
    "GenerateResponse",
    "GenerateStreamDelta",
    "GenerateStreamFinal",
    "HealthResponse",
    "ModelList",
    "SpeculativeOptions",
    "SpeculativeStats",
    "Usage",
]
