"""Where a train job reports: its status, progress, tau, and the versions it produces.

- ``RedisJobReport``: a Redis hash (``opd_job.JobStatus``), for a trainer without a registry.
- ``RegistryJobReport``: the registry (docs/design.md §4) over HTTP. Every checkpoint the run writes
  becomes a drafter version (weights and config only; the optimizer state stays with the run), its
  held-out tau is posted as a metric, and progress goes to ``PATCH /train-jobs/{id}``. A cancel
  requested there stops the job at its next step (``JobCancelled``); when the job succeeds the
  registry moves the job's ``promote_to`` alias.

Checkpoints are registered when the next step is reported (a run logs a step, then saves its
checkpoint) and once more when the job ends, so each one is registered exactly once, in order.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

from draftopd.training.run import CHECKPOINT_DIR, METRICS_FILE, STATE_FILE, read_metrics
from draftopd.wire.formats import CONFIG_FILE, WEIGHTS_FILE
from draftopd.wire.registry_client import RegistryClient
from services.trainer.rollouts import JobStatus

logger = logging.getLogger(__name__)


class JobCancelled(Exception):
    """The job was cancelled through the registry; raised from the step callback."""


class JobReport(Protocol):
    def started(self, mode: str, total_steps: int) -> None: ...

    def step(self, line: dict[str, Any]) -> None: ...  # may raise JobCancelled

    def finished(self, result: dict[str, Any]) -> None: ...

    def failed(self, error: str) -> None: ...

    def cancelled(self) -> None: ...


class RedisJobReport:
    def __init__(self, status: JobStatus, job_id: str) -> None:
        self.status, self.job_id, self.total_steps = status, job_id, 1

    def started(self, mode: str, total_steps: int) -> None:
        self.total_steps = total_steps
        self.status.update(self.job_id, status="running", mode=mode, step=0)

    def step(self, line: dict[str, Any]) -> None:
        self.status.reporter(self.job_id, self.total_steps)(line)

    def finished(self, result: dict[str, Any]) -> None:
        self.status.update(self.job_id, **result, progress=1.0)

    def failed(self, error: str) -> None:
        self.status.update(self.job_id, status="failed", error=error)

    def cancelled(self) -> None:
        self.status.update(self.job_id, status="cancelled")


class RegistryJobReport:
    """Reports to the registry; registers the run's checkpoints in ``out_dir`` as versions."""

    def __init__(self, client: RegistryClient, job_id: str, out_dir: str | Path) -> None:
        self.client, self.job_id, self.out_dir = client, job_id, Path(out_dir)
        job = client.get_train_job(job_id)
        self.drafter: str = job["drafter"]
        self.parent: int | None = job.get("base_version")
        self.registered: set[int] = set()
        self.total_steps = 1

    def started(self, mode: str, total_steps: int) -> None:
        self.total_steps = total_steps
        self.client.update_train_job(
            self.job_id, status="running", step=0, total_steps=total_steps, progress=0.0
        )

    def step(self, line: dict[str, Any]) -> None:
        self.register_checkpoints()
        fields: dict[str, Any] = {"step": line["step"], "progress": line["step"] / self.total_steps}
        if line.get("tau") is not None:
            fields["tau"] = line["tau"]
        job = self.client.update_train_job(self.job_id, **fields)
        if job.get("cancel_requested"):
            raise JobCancelled(f"job {self.job_id} was cancelled at step {line['step']}")

    def finished(self, result: dict[str, Any]) -> None:
        self.register_checkpoints()
        fields: dict[str, Any] = {"status": "succeeded", "step": result["step"], "progress": 1.0}
        if result.get("tau") is not None:
            fields["tau"] = result["tau"]
        self.client.update_train_job(self.job_id, **fields)

    def failed(self, error: str) -> None:
        self.client.update_train_job(self.job_id, status="failed", error=error)

    def cancelled(self) -> None:
        self.register_checkpoints()
        self.client.update_train_job(self.job_id, status="cancelled")

    def register_checkpoints(self) -> None:
        """Upload every complete checkpoint not registered yet, oldest first."""
        root = self.out_dir / CHECKPOINT_DIR
        done = sorted(root.glob("step-*/" + STATE_FILE)) if root.is_dir() else []
        taus = _taus(self.out_dir / METRICS_FILE)
        for state_file in done:
            step = int(json.loads(state_file.read_text())["step"])
            if step in self.registered:
                continue
            version = self._upload(state_file.parent, step)
            tau = taus.get(step)
            if tau is not None:
                self.client.post_metrics(self.drafter, version, benchmark="heldout", tau=tau)
            self.registered.add(step)
            self.parent = version

    def _upload(self, checkpoint: Path, step: int) -> int:
        with tempfile.TemporaryDirectory(prefix="draftopd-version-") as tmp:
            for name in (WEIGHTS_FILE, CONFIG_FILE):
                shutil.copy2(checkpoint / name, Path(tmp) / name)
            record = self.client.upload_version(
                self.drafter, tmp, parent_version=self.parent, job_id=self.job_id, step=step
            )
        logger.info("job %s: step %d registered as %s v%s", self.job_id, step, self.drafter,
                    record["version"])  # fmt: skip
        return int(record["version"])


def _taus(metrics: Path) -> dict[int, float | None]:
    lines = read_metrics(metrics) if metrics.is_file() else []
    return {int(x["step"]): x.get("tau") for x in lines}


__all__ = [
    "JobCancelled",
    "JobReport",
    "RedisJobReport",
    "RegistryJobReport",
]
