"""Deployment settings of the inference service (env prefix ``DRAFTOPD_INFERENCE_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal, cast

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from draftopd.wire.formats import parse_draft_tree, parse_random_ref
from services.inference.schemas import DRAFTER_METHODS, SpeculativeMethod


class InferenceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DRAFTOPD_INFERENCE_", extra="ignore")

    target: str = Field(
        default="smollm2", description="'smollm2', a local HF directory or a .gguf file."
    )
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    drafter: str | None = Field(
        default=None,
        description="drafter checkpoint dir (EAGLE-3 or DFlash), or 'random:SEED'; None = none.",
    )
    random_architecture: Literal["eagle3", "dflash"] = Field(
        default="eagle3", description="The family of a 'random:SEED' drafter."
    )
    default_method: SpeculativeMethod | None = Field(
        default=None,
        description="None: the served drafter's family (eagle3 or dflash) while one is loaded, "
        "else 'ngram'.",
    )
    num_draft_tokens: int = Field(default=4, ge=1, le=32, description="Default K per cycle.")
    draft_stop_below: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="End a cycle's drafts before the first slot (after the first) where the "
        "drafter's most likely token is below this probability (0 = always K). Never changes "
        "the output.",
    )
    lookup_first: int = Field(
        default=0,
        ge=0,
        le=32,
        description="Default N of n-gram lookup ahead of the drafter (eagle3/dflash): where the "
        "context repeats, up to N looked-up tokens are verified instead of drafts (0 = off).",
    )
    draft_tree: str | None = Field(
        default=None,
        description="Default eagle3 draft tree BRANCHxNODES[:MINPROB] (e.g. 3x10:0.05: depth K, "
        "3 children per expanded node, at most 10 nodes verified per cycle, none below path "
        "probability 0.05); unset = chain drafts. Never changes the output.",
    )
    draft_weights: Literal["auto", "bfloat16", "int8", "float32", "module"] = Field(
        default="auto",
        description="EAGLE-3 decode-time weights (docs/engine.md); auto = bfloat16 where the "
        "native kernel runs. Never changes the output, only acceptance.",
    )
    max_new_tokens_limit: int = Field(
        default=2048, ge=1, description="Largest max_new_tokens accepted."
    )
    max_concurrency: int = Field(default=1, ge=1, description="Generations running at once.")
    max_queued: int = Field(
        default=16,
        ge=0,
        description="Requests that may wait for a slot; one more gets 429 (Retry-After) at once "
        "instead of waiting without bound.",
    )
    retry_after_s: int = Field(
        default=1, ge=1, description="The Retry-After (seconds) of a 429 when the queue is full."
    )
    api_key: SecretStr | None = Field(
        default=None, description="If set, generation needs 'Authorization: Bearer <key>'."
    )
    served_model_name: str | None = Field(
        default=None, description="OpenAI model id; None = target."
    )
    torch_threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads; None: torch's default."
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8001, ge=0, le=65535)
    # -- following a registry alias (hot swap); registry_url None = the local `drafter` above --
    registry_url: str | None = Field(
        default=None, description="Registry to follow; None = serve `drafter` (no hot swap)."
    )
    registry_token: SecretStr | None = Field(
        default=None, description="Bearer token for the registry (when its reads are closed)."
    )
    drafter_name: str | None = Field(
        default=None, description="Registry drafter whose alias is served (with registry_url)."
    )
    drafter_alias: str = Field(default="production", description="The alias followed.")
    candidate_alias: str | None = Field(
        default="candidate",
        description="The canary alias followed beside drafter_alias: its version serves the "
        "alias's traffic share of drafter requests. Empty: no canary.",
    )
    live_report_s: float = Field(
        default=10.0,
        ge=0,
        description="Seconds between live-metric reports (tau, tokens/s per version) to the "
        "registry; 0: none. Only when following a registry drafter.",
    )
    alias_poll_s: float = Field(
        default=10.0, gt=0, description="Fallback polling period of the alias (seconds)."
    )
    redis_url: str | None = Field(
        default=None, description="Redis carrying the alias events; None = polling only."
    )
    # -- traffic capture (opt-in: prompts are user data; docs/traffic.md) --
    capture_rate: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Share of finished requests whose prompt is appended to the traffic stream "
        "(needs redis_url); 0 = off. Prompts go to that stream only, never to a log.",
    )
    capture_stream: str = Field(default="draftopd:traffic", description="The traffic stream.")
    capture_maxlen: int = Field(
        default=10_000, ge=1, description="Entries the traffic stream keeps (approximate)."
    )
    capture_retention_s: float = Field(
        default=7 * 24 * 3600.0, gt=0, description="Age after which captured prompts are trimmed."
    )
    artifact_cache_dir: Path | None = Field(
        default=None,
        description="Downloaded drafter versions; None = $DRAFTOPD_CACHE_DIR/drafters.",
    )

    @field_validator("drafter")
    @classmethod
    def _check_drafter(cls, value: str | None) -> str | None:
        if value is not None:
            parse_random_ref(value)  # a malformed random:SEED is refused at start-up
        return value or None

    @field_validator("draft_tree")
    @classmethod
    def _check_tree(cls, value: str | None) -> str | None:
        if value:
            parse_draft_tree(value)  # a malformed shape is refused at start-up
        return value or None

    @field_validator("registry_url", "drafter_name", "redis_url", "candidate_alias")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None

    @model_validator(mode="after")
    def _check_tree_and_floor(self) -> InferenceSettings:
        if self.draft_tree and self.draft_stop_below > 0:
            raise ValueError(
                "DRAFT_TREE and DRAFT_STOP_BELOW do not combine: give the tree its own floor "
                "(BRANCHxNODES:MINPROB)"
            )
        return self

    @model_validator(mode="after")
    def _check_drafter_source(self) -> InferenceSettings:
        if self.registry_url is not None:
            if self.drafter is not None:
                raise ValueError(
                    "set either drafter (a local checkpoint) or registry_url, not both"
                )
            if self.drafter_name is None:
                raise ValueError("registry_url needs drafter_name (the registry drafter to serve)")
        if self.capture_rate > 0 and self.redis_url is None:
            raise ValueError("capture_rate > 0 needs redis_url (the traffic stream's Redis)")
        if self.default_method in DRAFTER_METHODS and not self.has_drafter_source:
            raise ValueError(
                f"default_method {self.default_method!r} needs a drafter "
                "(set drafter or registry_url)"
            )
        return self

    @property
    def follows_registry(self) -> bool:
        return self.registry_url is not None

    @property
    def has_drafter_source(self) -> bool:
        return self.drafter is not None or self.registry_url is not None

    def default_method_for(self, drafter_architecture: str | None) -> SpeculativeMethod:
        """The method of a request that names none: the loaded drafter's family, else ngram,
        unless the operator chose one explicitly (a drafter method then gets a 409 until a
        drafter of that family is loaded)."""
        if self.default_method is not None:
            return self.default_method
        if drafter_architecture in DRAFTER_METHODS:
            return cast(SpeculativeMethod, drafter_architecture)
        return "ngram"

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.target


@lru_cache
def get_settings() -> InferenceSettings:
    """The process-wide settings, read from the environment once. Tests pass their own."""
    return InferenceSettings()
