"""Train-job specs: what ``POST /train-jobs`` carries (docs/design.md §4). Torch-free, so the
registry validates specs without loading any model code.

A spec is ``mode`` plus a run section and the section of its mode, made of the config classes of
``training/configs.py`` (their one declaration)::

    {"mode": "sft",       "run": RunConfig, "sft": SFTConfig}
    {"mode": "draft_opd", "run": RunConfig, "opd": OPDConfig}

A ``draft_opd`` job may take ``run.prompts`` from captured traffic:
``{"source": "traffic", "stream": ..., "min_prompts": N, "max_prompts": M}``, stored as
``traffic://STREAM?min_prompts=N&max_prompts=M`` (``draftopd.wire.traffic``).

Specs are strict: a misspelt field anywhere is an error that names it. They are stored
normalised (every field present), so a job can be rerun exactly from its stored spec.

The flat layout of earlier releases (run fields and the SFT data fields at the top level,
``drafter``/``requests_per_step``/``rollout_timeout_s`` beside ``opd``, the loss fields flat in
``opd``) is still accepted and normalised to the sections.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from draftopd.training.configs import OPDConfig, RunConfig, SFTConfig
from draftopd.wire.traffic import TrafficSource, parse_traffic_ref

_RUN_FIELDS = frozenset(f.name for f in fields(RunConfig))


def _lift(data: Any, section: str, into_section: frozenset[str]) -> Any:
    """Move flat (earlier-release) keys into their sections; anything else is left to fail."""
    if not isinstance(data, dict) or "run" in data:
        return data
    values = dict(data)
    run = {k: values.pop(k) for k in list(values) if k in _RUN_FIELDS}
    stage = values.get(section)
    moved = {k: values.pop(k) for k in list(values) if k in into_section}
    if moved and (stage is None or isinstance(stage, dict)):
        values[section] = {**moved, **(stage or {})}
    return {**values, "run": run}


class SFTJobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["sft"] = "sft"
    run: RunConfig = Field(description="Where the run lives, its target, prompts and device.")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="The SFT stage's settings.")

    @model_validator(mode="before")
    @classmethod
    def _flat_layout(cls, data: Any) -> Any:
        sft_data = frozenset(
            {"init_from", "max_new_tokens", "gen_batch_size", "temperature", "top_p"}
        )
        return _lift(data, "sft", sft_data)

    @model_validator(mode="after")
    def _no_traffic(self) -> SFTJobSpec:
        if parse_traffic_ref(self.run.prompts) is not None:
            raise ValueError(
                "run.prompts: captured traffic is a prompt source for draft_opd jobs only (SFT "
                "needs target-written responses: give it a prompt file or the corpus)"
            )
        return self


class DraftOPDJobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["draft_opd"] = "draft_opd"
    run: RunConfig = Field(description="Where the run lives, its target, prompts and device.")
    opd: OPDConfig = Field(description="Draft-OPD settings; 'drafter' is the starting checkpoint.")

    @model_validator(mode="before")
    @classmethod
    def _flat_layout(cls, data: Any) -> Any:
        lifted = _lift(
            data, "opd", frozenset({"drafter", "requests_per_step", "rollout_timeout_s"})
        )
        if isinstance(lifted, dict) and isinstance(lifted.get("opd"), dict):
            lifted["opd"] = OPDConfig.normalise(dict(lifted["opd"]))
        run = lifted.get("run") if isinstance(lifted, dict) else None
        if isinstance(run, dict) and isinstance(run.get("prompts"), dict):
            # captured traffic (draftopd.wire.traffic), stored as its traffic:// reference
            source = TrafficSource.from_spec(run["prompts"])
            lifted["run"] = {**run, "prompts": source.to_ref()}
        return lifted

    @model_validator(mode="after")
    def _needs_a_drafter(self) -> DraftOPDJobSpec:
        if not self.opd.drafter:
            raise ValueError("opd.drafter: the starting checkpoint is required")
        parse_traffic_ref(self.run.prompts)  # a malformed traffic:// reference fails here
        return self


TrainJobSpec = Annotated[SFTJobSpec | DraftOPDJobSpec, Field(discriminator="mode")]
_SPEC: TypeAdapter[SFTJobSpec | DraftOPDJobSpec] = TypeAdapter(TrainJobSpec)


def parse_spec(data: dict[str, Any]) -> SFTJobSpec | DraftOPDJobSpec:
    """Validate a job spec (raises pydantic.ValidationError with the field's name)."""
    return _SPEC.validate_python(data)


def total_steps(spec: SFTJobSpec | DraftOPDJobSpec) -> int:
    """The optimizer steps the job will take."""
    return spec.sft.total_steps if isinstance(spec, SFTJobSpec) else spec.opd.total_steps


__all__ = ["DraftOPDJobSpec", "SFTJobSpec", "TrainJobSpec", "parse_spec", "total_steps"]
