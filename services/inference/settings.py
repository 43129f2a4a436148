"""Deployment settings of the inference service (env prefix ``DRAFTOPD_INFERENCE_``)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

RANDOM_DRAFTER_PREFIX = "random:"


class InferenceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DRAFTOPD_INFERENCE_", extra="ignore")

    target: str = Field(
        default="smollm2", description="'smollm2', a local HF directory or a .gguf file."
    )
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    drafter: str | None = Field(
        default=None, description="EAGLE-3 checkpoint dir, or 'random:SEED'; None = no drafter."
    )
    default_method: Literal["eagle3", "ngram", "none"] | None = Field(
        default=None, description="None: 'eagle3' if a drafter is configured, else 'ngram'."
    )
    num_draft_tokens: int = Field(default=4, ge=1, le=32, description="Default K per cycle.")
    max_new_tokens_limit: int = Field(
        default=2048, ge=1, description="Largest max_new_tokens accepted."
    )
    max_concurrency: int = Field(default=1, ge=1, description="Generations running at once.")
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

    @field_validator("drafter")
    @classmethod
    def _check_drafter(cls, value: str | None) -> str | None:
        if value is not None and value.startswith(RANDOM_DRAFTER_PREFIX):
            seed = value[len(RANDOM_DRAFTER_PREFIX) :]
            if not seed.isdigit():
                raise ValueError(f"drafter {value!r}: expected 'random:SEED' with an integer SEED")
        return value or None

    @model_validator(mode="after")
    def _check_method(self) -> InferenceSettings:
        if self.default_method == "eagle3" and self.drafter is None:
            raise ValueError("default_method 'eagle3' needs a drafter (set drafter)")
        return self

    @property
    def resolved_default_method(self) -> Literal["eagle3", "ngram", "none"]:
        if self.default_method is not None:
            return self.default_method
        return "eagle3" if self.drafter is not None else "ngram"

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.target


@lru_cache
def get_settings() -> InferenceSettings:
    """The process-wide settings, read from the environment once. Tests pass their own."""
    return InferenceSettings()
