"""The function the trainer runs for one train job (specs: ``draftopd.wire.job_specs``).

The spec's ``mode`` picks SFT (``sft_pipeline``) or Draft-OPD (``opd_pipeline`` with the rollouts
done by the rollout workers, ``services.trainer.rollouts``); each takes the spec's run section
and stage section as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import redis

from draftopd.training.opd.pipeline import opd_pipeline
from draftopd.training.opd.train import OPDResult
from draftopd.training.sft.pipeline import SFTPipelineResult, sft_pipeline
from draftopd.wire.job_specs import SFTJobSpec, parse_spec, total_steps
from draftopd.wire.registry_client import RegistryClient, resolve_drafter_ref
from draftopd.wire.traffic import parse_traffic_ref, snapshot
from services.trainer.report import JobCancelled, JobReport, RedisJobReport, RegistryJobReport
from services.trainer.rollouts import JobStatus, RedisRollouts

logger = logging.getLogger(__name__)

TRAFFIC_PROMPTS = "traffic_prompts.jsonl"  # a traffic-driven job's prompts, under its out_dir


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
    ``registry://NAME/VERSION``: they are fetched into ``<out_dir>/inputs``."""
    spec = parse_spec(data)
    out_dir = Path(spec.run.out_dir)
    report: JobReport = (
        RegistryJobReport(registry, job_id, out_dir)
        if registry is not None
        else RedisJobReport(JobStatus(client), job_id)
    )
    report_step = _chain(report.step, on_step)
    inputs = out_dir / "inputs"
    result: SFTPipelineResult | OPDResult
    try:
        report.started(spec.mode, total_steps(spec))
        if isinstance(spec, SFTJobSpec):
            sft = spec.sft
            if sft.init_from is not None:
                sft = replace(
                    sft, init_from=str(resolve_drafter_ref(sft.init_from, registry, inputs))
                )
            result = sft_pipeline(spec.run, sft, progress=False, on_step=report_step)
        else:
            opd = replace(
                spec.opd, drafter=str(resolve_drafter_ref(spec.opd.drafter, registry, inputs))
            )
            run = spec.run
            source = parse_traffic_ref(run.prompts)
            if source is not None:  # captured traffic: snapshot once, resume on the same file
                path = out_dir / TRAFFIC_PROMPTS
                count = snapshot(client, source, path)
                logger.info(
                    "job %s: %d distinct traffic prompts from %s", job_id, count, source.stream
                )
                run = replace(run, prompts=str(path))
            result = opd_pipeline(
                run,
                opd,
                progress=False,
                on_step=report_step,
                rollouts=lambda target: RedisRollouts(
                    client, job_id, out_dir, opd, consumer=f"trainer-{job_id}"
                ),
            )
    except JobCancelled as err:
        logger.info("%s", err)
        report.cancelled()
        return {"status": "cancelled"}
    except Exception as err:
        report.failed(f"{type(err).__name__}: {err}")
        raise
    summary = {"status": "succeeded", "step": result.step, "checkpoint": str(result.checkpoint),
               "tau": result.tau}  # fmt: skip
    report.finished(summary)
    return summary


__all__ = ["run_train_job"]
