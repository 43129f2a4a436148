"""Train-job specs: what ``POST /train-jobs`` carries (DESIGN.md §4). Torch-free, so the registry
validates specs without loading any model code.

A spec is strict (``extra="forbid"``): a misspelt field is an error that names it. ``mode`` picks
SFT or Draft-OPD; the ``sft`` / ``opd`` dicts are checked against ``SFTConfig`` / ``OPDConfig`` and
stored normalised (every field present), so a job can be rerun exactly from its stored spec.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from draftopd.training.configs import OPDConfig, SFTConfig


class JobSpecBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out_dir: str = Field(description="Run directory on the trainer (checkpoints, metrics).")
    target: str = "smollm2"
    prompts: str | None = Field(default=None, description="Prompts JSONL; None = the corpus.")
    skip: int = Field(default=0, ge=0)
    limit: int | None = Field(default=None, ge=1)
    heldout: int = Field(default=8, ge=0)
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    threads: int | None = Field(default=None, ge=1)


class SFTJobSpec(JobSpecBase):
    mode: Literal["sft"] = "sft"
    init_from: str | None = None
    max_new_tokens: int = Field(default=512, ge=1)
    gen_batch_size: int = Field(default=8, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    sft: dict[str, Any] = Field(default_factory=dict, description="SFTConfig fields.")

    @field_validator("sft")
    @classmethod
    def _check_sft(cls, value: dict[str, Any]) -> dict[str, Any]:
        return SFTConfig.from_dict(value).to_dict()


class DraftOPDJobSpec(JobSpecBase):
    mode: Literal["draft_opd"] = "draft_opd"
    drafter: str = Field(description="Starting checkpoint directory (e.g. the SFT one).")
    opd: dict[str, Any] = Field(default_factory=dict, description="OPDConfig fields.")
    requests_per_step: int = Field(default=2, ge=1, description="Rollout requests per step.")
    rollout_timeout_s: float = Field(default=600.0, gt=0)

    @field_validator("opd")
    @classmethod
    def _check_opd(cls, value: dict[str, Any]) -> dict[str, Any]:
        return OPDConfig.from_dict(value).to_dict()


TrainJobSpec = Annotated[SFTJobSpec | DraftOPDJobSpec, Field(discriminator="mode")]
_SPEC: TypeAdapter[SFTJobSpec | DraftOPDJobSpec] = TypeAdapter(TrainJobSpec)


def parse_spec(data: dict[str, Any]) -> SFTJobSpec | DraftOPDJobSpec:
    """Validate a job spec (raises pydantic.ValidationError with the field's name)."""
    return _SPEC.validate_python(data)


__all__ = ["DraftOPDJobSpec", "JobSpecBase", "SFTJobSpec", "TrainJobSpec", "parse_spec"]
