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
from draftopd.registry_client import RegistryClient
from draftopd.training.configs import OPDConfig, SFTConfig
from draftopd.training.job_report import (
    JobCancelled,
    JobReport,
    RedisJobReport,
    RegistryJobReport,
    resolve_checkpoint,
)
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
    registry: RegistryClient | None = None,
) -> dict[str, Any]:
    """Run (or resume) one job. Status, progress, tau and (with a registry) the produced versions
    go to the registry if one is given, else to ``JobStatus`` in Redis; ``on_step`` also gets
    every metrics line (the trainer renews its job lock there). Checkpoint references may be
    ``registry://NAME/VERSION``."""
    spec = parse_spec(data)
    report: JobReport = (
        RegistryJobReport(registry, job_id, spec.out_dir)
        if registry is not None
        else RedisJobReport(JobStatus(client), job_id)
    )
    inputs = Path(spec.out_dir) / "inputs"
    try:
        if isinstance(spec, SFTJobSpec):
            result = _run_sft(spec, report, on_step, registry, inputs)
        else:
            result = _run_opd(job_id, spec, client, report, on_step, registry, inputs)
    except JobCancelled as err:
        logger.info("%s", err)
        report.cancelled()
        return {"status": "cancelled"}
    except Exception as err:
        report.failed(f"{type(err).__name__}: {err}")
        raise
    report.finished(result)
    return result


def _run_sft(
    spec: SFTJobSpec,
    report: JobReport,
    on_step: Callable[[dict[str, Any]], None] | None,
    registry: RegistryClient | None,
    inputs: Path,
) -> dict[str, Any]:
    options = spec.model_dump(include=_SFT_ONLY)
    if spec.init_from is not None:
        options["init_from"] = resolve_checkpoint(spec.init_from, registry, inputs)
    cfg = SFTPipelineConfig(
        **spec.model_dump(include=set(JobSpecBase.model_fields)),
        **options,
        sft=SFTConfig.from_dict(spec.sft),
        progress=False,
    )
    report.started("sft", cfg.sft.total_steps)
    sft = sft_pipeline(cfg, on_step=_chain(report.step, on_step))
    return {"status": "succeeded", "step": sft.step, "checkpoint": str(sft.checkpoint),
            "tau": sft.tau}  # fmt: skip


def _run_opd(
    job_id: str,
    spec: DraftOPDJobSpec,
    client: redis.Redis,
    report: JobReport,
    on_step: Callable[[dict[str, Any]], None] | None,
    registry: RegistryClient | None,
    inputs: Path,
) -> dict[str, Any]:
    opd_cfg = OPDConfig.from_dict(spec.opd)
    pipeline = OPDPipelineConfig(
        **spec.model_dump(include=set(JobSpecBase.model_fields)),
        drafter=resolve_checkpoint(spec.drafter, registry, inputs),
        opd=opd_cfg,
        progress=False,
    )
    report.started("draft_opd", opd_cfg.total_steps)
    opd = opd_pipeline(
        pipeline,
        on_step=_chain(report.step, on_step),
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
    return {"status": "succeeded", "step": opd.step, "checkpoint": str(opd.checkpoint),
            "tau": opd.tau}  # fmt: skip


__all__ = ["DraftOPDJobSpec", "SFTJobSpec", "TrainJobSpec", "parse_spec", "run_train_job"]
