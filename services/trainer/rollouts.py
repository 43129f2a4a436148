"""The trainer's rollout source: ``train_opd`` with the rollouts done by the rollout workers over
Redis (docs/design.md §1).

Per step v (the drafter version = optimizer steps taken):
1. publish version v: its weights under ``<out_dir>/versions/v<v>`` (safetensors, atomic rename);
2. enqueue the step's rollout requests (once: a set remembers what was enqueued);
3. read the job's record stream with the consumer group ``trainer``: records of version v are kept,
   older ones beyond ``max_version_lag`` are dropped (and acknowledged as dropped);
4. ``OPDLearner.update``, then, in one MULTI/EXEC, acknowledge the records and journal their ids
   under step v.

Crash safety (no record lost, none counted twice): records stay pending until their update is
applied. A restarted job resumes from its newest checkpoint (step s); for the steps after s the
journal names the exact records that were used, so those updates are redone from the same records
(read back by id) before new rollouts start. Records pending for the interrupted step are read back
from the group's pending list.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from draftopd.models.checkpoint import save_drafter
from draftopd.models.drafter import Drafter
from draftopd.speculative.records import RolloutRecord, stream_key
from draftopd.training.configs import OPDConfig
from draftopd.wire.rollout_queue import RolloutRequest, dead_letters, enqueue, ensure_group

logger = logging.getLogger(__name__)

TRAINER_GROUP = "trainer"
VERSIONS_DIR = "versions"


def job_key(job_id: str, what: str) -> str:
    return f"draftopd:jobs:{job_id}:{what}"


@dataclass
class RedisRollouts:
    """A ``RolloutSource`` backed by the rollout workers."""

    client: redis.Redis
    job_id: str
    out_dir: Path
    cfg: OPDConfig  # requests_per_step and rollout_timeout_s are read here
    block_ms: int = 500
    consumer: str = "trainer"
    keep_versions: int = 2  # version directories kept behind the current one
    _pending_ids: list[str] = field(default_factory=list)
    counters: dict[str, int] = field(
        default_factory=lambda: {"consumed": 0, "dropped": 0, "replayed_from_journal": 0}
    )

    def __post_init__(self) -> None:
        ensure_group(self.client, stream_key(self.job_id), TRAINER_GROUP)

    # -- RolloutSource ----------------------------------------------------------------------------
    def records(
        self, step: int, drafter: Drafter, prompts: list[list[int]], seeds: list[int]
    ) -> list[RolloutRecord]:
        journaled = self.client.hget(job_key(self.job_id, "journal"), str(step))
        if journaled is not None:  # redo an update lost in a crash, from the same records
            ids = json.loads(journaled)
            self.counters["replayed_from_journal"] += len(ids)
            self._pending_ids = []
            return [self._read(entry_id) for entry_id in ids]
        path = self.publish_version(step, drafter)
        self._request(step, prompts, seeds, path)
        return self._collect(step, len(prompts))

    def applied(self, step: int) -> None:
        if not self._pending_ids:
            return  # a journaled step: already acknowledged
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(stream_key(self.job_id), TRAINER_GROUP, *self._pending_ids)
        pipe.hset(job_key(self.job_id, "journal"), str(step), json.dumps(self._pending_ids))
        pipe.execute()
        self.counters["consumed"] += len(self._pending_ids)
        self._pending_ids = []

    def checkpointed(self, step: int) -> None:
        """Old version directories go; the journal stays (a few bytes per record) as the audit
        trail of which records made which step."""
        for old in (self.out_dir / VERSIONS_DIR).glob("v*"):
            if int(old.name[1:]) < step - self.keep_versions:
                shutil.rmtree(old, ignore_errors=True)

    # -- helpers ----------------------------------------------------------------------------------
    def publish_version(self, step: int, drafter: Drafter) -> Path:
        # absolute: the rollout workers resolve it in their own working directory
        path = self.out_dir.resolve() / VERSIONS_DIR / f"v{step}"
        if not path.is_dir():
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            save_drafter(drafter, tmp, provenance={"kind": "draft_opd", "job": self.job_id})
            os.replace(tmp, path)
        self.client.set(job_key(self.job_id, "version"), step)
        return path

    def _request(self, step: int, prompts: list[list[int]], seeds: list[int], path: Path) -> None:
        requested = job_key(self.job_id, "requested")
        if self.client.sismember(requested, str(step)):
            return  # enqueued before a restart: its records are on the way or pending
        chunks = max(1, min(self.cfg.requests_per_step, len(prompts)))
        cfg = self.cfg
        requests = [
            RolloutRequest(
                job_id=self.job_id,
                request_id=f"s{step}-{i}",
                drafter_version=str(step),
                drafter_path=str(path),
                prompts=prompts[i::chunks],
                seeds=seeds[i::chunks],
                num_draft_tokens=cfg.num_draft_tokens,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                mode=cfg.rollout_mode,
                batch_size=cfg.rollout_batch_size,
            )
            for i in range(chunks)
        ]
        enqueue(self.client, requests, mark=(requested, str(step)))  # both or neither

    def _collect(self, step: int, expected: int) -> list[RolloutRecord]:
        """Records until ``expected`` of version ``step`` are in; records within the allowed lag
        are used too, older ones are dropped (acknowledged, never trained on)."""
        key = stream_key(self.job_id)
        kept: dict[tuple[str, int], tuple[str, RolloutRecord]] = {}
        current = 0
        dropped: list[str] = []
        deadline = time.monotonic() + self.cfg.rollout_timeout_s
        cursor = "0"  # first our own pending entries (from before a restart), then new ones
        while current < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"step {step}: {current} of {expected} rollouts after "
                    f"{self.cfg.rollout_timeout_s} s; are the rollout workers running?"
                )
            reply: Any = self.client.xreadgroup(
                TRAINER_GROUP,
                self.consumer,
                {key: cursor},
                count=64,
                block=None if cursor != ">" else self.block_ms,
            )
            entries = reply[0][1] if reply else []
            if cursor != ">" and not entries:
                cursor = ">"
                continue
            if not entries:
                self._check_dead_letters(step)
            for raw_id, fields in entries:
                entry_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
                if cursor != ">":
                    cursor = entry_id
                if not fields:
                    continue  # trimmed while pending
                record = RolloutRecord.from_fields(fields)
                version = int(record.drafter_version)
                if version > step or step - version > self.cfg.max_version_lag:
                    dropped.append(entry_id)
                    continue
                slot = (str(record.extra.get("request_id")), int(record.extra.get("index", 0)))
                if slot not in kept:
                    kept[slot] = (entry_id, record)
                    current += int(version == step)
        if dropped:
            self.client.xack(key, TRAINER_GROUP, *dropped)
            self.counters["dropped"] += len(dropped)
        order = sorted(kept)
        self._pending_ids = [kept[k][0] for k in order]
        return [kept[k][1] for k in order]

    def _check_dead_letters(self, step: int) -> None:
        """Fail the step at once when a worker gave up on one of its requests."""
        dead = dead_letters(self.client, self.job_id, f"s{step}-")
        if dead:
            raise RuntimeError(
                f"step {step}: rollout request {dead[0]['request_id']} failed on the rollout "
                f"workers: {dead[0].get('error', '?')}"
            )

    def _read(self, entry_id: str) -> RolloutRecord:
        found: Any = self.client.xrange(stream_key(self.job_id), entry_id, entry_id)
        if not found:
            raise RuntimeError(f"journaled record {entry_id} was trimmed from the stream")
        return RolloutRecord.from_fields(found[0][1])


class JobStatus:
    """Status and progress of train jobs in a Redis hash, until the registry holds them."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def update(self, job_id: str, **fields: Any) -> None:
        values = {k: json.dumps(v) for k, v in fields.items()}
        values["updated_at"] = json.dumps(time.time())
        self.client.hset(job_key(job_id, "status"), mapping=values)  # type: ignore[arg-type]

    def get(self, job_id: str) -> dict[str, Any]:
        raw: Any = self.client.hgetall(job_key(job_id, "status"))
        return {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}

    def reporter(self, job_id: str, total_steps: int) -> Callable[[dict[str, Any]], None]:
        def report(line: dict[str, Any]) -> None:
            fields: dict[str, Any] = {
                "status": "running",
                "step": line["step"],
                "total_steps": total_steps,
                "progress": line["step"] / total_steps,
                "loss": line.get("loss"),
            }
            if line.get("tau") is not None:
                fields["tau"] = line["tau"]
            self.update(job_id, **fields)

        return report


__all__ = ["TRAINER_GROUP", "VERSIONS_DIR", "JobStatus", "RedisRollouts", "job_key"]
