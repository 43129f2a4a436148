"""Train-job specs (what ``POST /train-jobs`` carries) and the function the trainer runs for one.

A spec is validated with ``extra="forbid"``; its ``mode`` picks SFT (``pipeline.sft_pipeline``) or
Draft-OPD (``opd_pipeline`` with the rollouts done by the rollout workers, ``opd_job``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import redis
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from draftopd.training.opd import OPDConfig
from draftopd.training.opd_job import JobStatus, RedisRollouts
from draftopd.training.opd_pipeline import OPDPipelineConfig, opd_pipeline
from draftopd.training.pipeline import SFTPipelineConfig, sft_pipeline
from draftopd.training.sft import SFTConfig

logger = logging.getLogger(__name__)


class _Spec(BaseModel):
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


class SFTJobSpec(_Spec):
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


class DraftOPDJobSpec(_Spec):
    mode: Literal["draft_opd"] = "draft_opd"
    drafter: str = Field(description="Starting checkpoint directory (e.g. the SFT one).")
    opd: dict[str, Any] = Field(default_factory=dict, description="OPDConfig fields.")
    requests_per_step: int = Field(default=2, ge=1, description="Rollout requests per step.")
    rollout_timeout_s: float = Field(default=600.0, gt=0)

    @field_validator("opd")
    @classmethod
    def _check_opd(cls, value: dict[str, Any]) -> dict[str, Any]:
        return OPDConfig.from_dict(value).to_dict()


_SFT_ONLY = {"init_from", "max_new_tokens", "gen_batch_size", "temperature", "top_p"}
TrainJobSpec = Annotated[SFTJobSpec | DraftOPDJobSpec, Field(discriminator="mode")]
_SPEC: TypeAdapter[SFTJobSpec | DraftOPDJobSpec] = TypeAdapter(TrainJobSpec)


def _chain(
    first: Callable[[dict[str, Any]], None], second: Callable[[dict[str, Any]], None] | None
) -> Callable[[dict[str, Any]], None]:
    def both(line: dict[str, Any]) -> None:
        first(line)
        if second is not None:
            second(line)

    return both


def parse_spec(data: dict[str, Any]) -> SFTJobSpec | DraftOPDJobSpec:
    """Validate a job spec (raises pydantic.ValidationError with the field's name)."""
    return _SPEC.validate_python(data)


def run_train_job(
    job_id: str,
    data: dict[str, Any],
    client: redis.Redis,
    *,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) one job; its status, progress and tau go to ``JobStatus``; ``on_step``
    also gets every metrics line (the trainer renews its job lock there)."""
    spec = parse_spec(data)
    status = JobStatus(client)
    common = spec.model_dump(include=set(_Spec.model_fields))
    try:
        if isinstance(spec, SFTJobSpec):
            cfg = SFTPipelineConfig(
                **common,
                **spec.model_dump(include=_SFT_ONLY),
                sft=SFTConfig.from_dict(spec.sft),
                progress=False,
            )
            status.update(job_id, status="running", mode="sft", step=0)
            report = _chain(status.reporter(job_id, cfg.sft.total_steps), on_step)
            sft = sft_pipeline(cfg, on_step=report)
            checkpoint, step, tau = sft.checkpoint, sft.step, sft.tau
        else:
            opd_cfg = OPDConfig.from_dict(spec.opd)
            pipeline = OPDPipelineConfig(
                **common, drafter=spec.drafter, opd=opd_cfg, progress=False
            )
            status.update(job_id, status="running", mode="draft_opd", step=0)
            report = _chain(status.reporter(job_id, opd_cfg.total_steps), on_step)
            opd = opd_pipeline(
                pipeline,
                on_step=report,
                rollouts=lambda target: RedisRollouts(
                    client,
                    job_id,
                    Path(spec.out_dir),
                    opd_cfg,
                    requests_per_step=spec.requests_per_step,
                    timeout_s=spec.rollout_timeout_s,
                    consumer=f"trainer-{job_id}",
                ),
            )
            checkpoint, step, tau = opd.checkpoint, opd.step, opd.tau
    except Exception as err:
        status.update(job_id, status="failed", error=f"{type(err).__name__}: {err}")
        raise
    result = {"status": "succeeded", "step": step, "checkpoint": str(checkpoint), "tau": tau}
    status.update(job_id, **result, progress=1.0)
    return result


__all__ = ["DraftOPDJobSpec", "SFTJobSpec", "TrainJobSpec", "parse_spec", "run_train_job"]
