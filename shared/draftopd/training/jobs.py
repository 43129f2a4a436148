"""The function the trainer runs for one train job (specs: ``draftopd.job_specs``).

The spec's ``mode`` picks SFT (``pipeline.sft_pipeline``) or Draft-OPD (``opd_pipeline`` with the
rollouts done by the rollout workers, ``opd_job``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from draftopd.job_specs import (
    DraftOPDJobSpec,
    JobSpecBase,
    SFTJobSpec,
    TrainJobSpec,
    parse_spec,
)
from draftopd.training.configs import OPDConfig, SFTConfig
from draftopd.training.opd_job import JobStatus, RedisRollouts
from draftopd.training.opd_pipeline import OPDPipelineConfig, opd_pipeline
from draftopd.training.pipeline import SFTPipelineConfig, sft_pipeline

logger = logging.getLogger(__name__)


_SFT_ONLY = {"init_from", "max_new_tokens", "gen_batch_size", "temperature", "top_p"}


def _chain(
    first: Callable[[dict[str, Any]], None], second: Callable[[dict[str, Any]], None] | None
) -> Callable[[dict[str, Any]], None]:
    def both(line: dict[str, Any]) -> None:
        first(line)
        if second is not None:
            second(line)

    return both


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
    common = spec.model_dump(include=set(JobSpecBase.model_fields))
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
