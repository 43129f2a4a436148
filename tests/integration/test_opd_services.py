"""Draft-OPD across real processes: a Celery trainer (not eager) and two rollout-worker services,
over the machine's real Redis, on a tiny target. The trainer is SIGKILLed mid-job and a new one
resumes it.

Checked: every record is written once and consumed exactly once (the journal of each step names
its records, the steps partition the stream, nothing stays pending); each step's records were made
with that step's drafter version; both workers took requests; the killed job finishes.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from draftopd.models.checkpoint import random_drafter_for, save_drafter
from draftopd.models.target import TargetModel
from draftopd.speculative.records import RolloutRecord, stream_key
from services.trainer.rollouts import TRAINER_GROUP, JobStatus, job_key
from tests.processes import (
    celery_argv,
    free_port,
    log_tails,
    service_env,
    spawn,
    uvicorn_argv,
    wait_until,
)

JOB = "opd-it"
STEPS, PROMPTS_PER_STEP = 8, 4


def _env(redis_url: str, **extra: str) -> dict[str, str]:
    env = service_env(**extra)
    env.update(DRAFTOPD_TRAINER_REDIS_URL=redis_url, DRAFTOPD_ROLLOUT_REDIS_URL=redis_url)
    return env


def _celery(redis_url: str, log: Path) -> subprocess.Popen[bytes]:
    env = _env(
        redis_url,
        DRAFTOPD_TRAINER_VISIBILITY_TIMEOUT_S="4",
        DRAFTOPD_TRAINER_LOCK_TTL_S="3",
        DRAFTOPD_TRAINER_TORCH_THREADS="1",
    )
    return spawn(celery_argv(), env, log)


@pytest.fixture
def workers(
    redis_url: str, tiny_target_dir: Path, tmp_path: Path
) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = []
    for name in ("w1", "w2"):
        env = _env(
            redis_url,
            DRAFTOPD_ROLLOUT_TARGET=str(tiny_target_dir),
            DRAFTOPD_ROLLOUT_CONSUMER=name,
            DRAFTOPD_ROLLOUT_BLOCK_MS="100",
            DRAFTOPD_ROLLOUT_TORCH_THREADS="1",
        )
        argv = uvicorn_argv("services.rollout_worker.main:create_app", free_port())
        procs.append(spawn(argv, env, tmp_path / f"{name}.log"))
    yield procs
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(20)


def _wait(predicate: Any, timeout: float, what: str, logs: list[Path]) -> None:
    wait_until(predicate, timeout, what, logs)


def test_draft_opd_job_with_celery_and_two_rollout_workers_survives_sigkill(
    redis_url: str,
    tiny_target: TargetModel,
    tiny_target_dir: Path,
    workers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    from celery import Celery

    client = redis.Redis.from_url(redis_url)
    start = save_drafter(
        random_drafter_for(tiny_target, seed=0, draft_vocab_size=200), tmp_path / "start"
    )
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": f"p{i}", "prompt": f"Tell me about thing number {i}."} for i in range(30)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "mode": "draft_opd",
        "out_dir": str(tmp_path / "run"),
        "target": str(tiny_target_dir),
        "drafter": str(start),
        "prompts": str(prompts),
        "heldout": 2,
        "threads": 1,
        "requests_per_step": 2,
        "rollout_timeout_s": 120,
        "opd": {
            "total_steps": STEPS,
            "prompts_per_step": PROMPTS_PER_STEP,
            "num_draft_tokens": 3,
            "max_new_tokens": 16,
            "lr": 1e-3,
            "eval_every": 0,
            "eval_max_new_tokens": 8,
            "checkpoint_every": 1,
        },
    }
    logs = [tmp_path / "celery-1.log", tmp_path / "celery-2.log", tmp_path / "w1.log"]
    status = JobStatus(client)
    first = _celery(redis_url, logs[0])
    try:
        sender = Celery("draftopd", broker=redis_url)
        sender.send_task("draftopd.train", args=[JOB, spec], queue="train")
        _wait(lambda: status.get(JOB).get("step", 0) >= 2, 240, "step 2", logs)
        first.send_signal(signal.SIGKILL)  # mid-job: no goodbye, the task is not acknowledged
        first.wait(10)
        killed_at = status.get(JOB)["step"]
        assert status.get(JOB)["status"] == "running" and killed_at < STEPS
        second = _celery(redis_url, logs[1])
        try:
            _wait(lambda: status.get(JOB).get("status") in ("succeeded", "failed"), 240,
                  "the resumed job to finish", logs)  # fmt: skip
        finally:
            second.terminate()
            second.wait(20)
    finally:
        if first.poll() is None:
            first.kill()
    final = status.get(JOB)
    if final["status"] != "succeeded":
        pytest.fail(f"job ended {final['status']}: {final.get('error')}\n{log_tails(logs, 4000)}")
    assert final["step"] == STEPS and final["progress"] == 1.0

    entries = client.xrange(stream_key(JOB))
    records = {e[0].decode(): RolloutRecord.from_fields(e[1]) for e in entries}
    journal = {int(k): json.loads(v) for k, v in client.hgetall(job_key(JOB, "journal")).items()}
    assert sorted(journal) == list(range(STEPS))
    used = [entry_id for step in range(STEPS) for entry_id in journal[step]]
    # written once, consumed exactly once: the steps partition the stream
    assert len(used) == len(set(used)) == len(records) == STEPS * PROMPTS_PER_STEP
    assert set(used) == set(records)
    assert client.xpending(stream_key(JOB), TRAINER_GROUP)["pending"] == 0
    for step, ids in journal.items():  # every step trained on rollouts of its own version
        assert {records[i].drafter_version for i in ids} == {str(step)}
    assert {r.extra["worker"] for r in records.values()} == {"w1", "w2"}  # shared work
    keys = [(r.extra["request_id"], r.extra["index"]) for r in records.values()]
    assert len(keys) == len(set(keys))

    metrics = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in metrics] == list(range(STEPS + 1))
    assert all(x["parity_rejected"] in (None, 1.0) or x["parity_rejected"] >= 0.99
               for x in metrics[1:])  # fmt: skip
    assert "resumed Draft-OPD" in logs[1].read_text()
