"""Traffic-driven Draft-OPD: inference captures served prompts into the real Redis, a draft_opd
job takes them as its prompts (distinct, newest held out), and a rollout worker re-runs them
with the job's own drafter versions."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import ValidationError

from draftopd.models.checkpoint import random_drafter_for, save_drafter
from draftopd.models.target import TargetModel
from draftopd.speculative.records import RolloutRecord, stream_key
from draftopd.wire.job_specs import parse_spec
from draftopd.wire.traffic import TRAFFIC_STREAM, TrafficSource, parse_traffic_ref, read
from services.inference.main import create_app
from services.inference.settings import InferenceSettings
from services.rollout_worker.worker import RolloutWorker
from services.trainer.jobs import TRAFFIC_PROMPTS, run_train_job
from services.trainer.rollouts import JobStatus


def _spec(tmp_path: Path, target_dir: Path, drafter: Path, prompts: Any) -> dict[str, Any]:
    return {
        "mode": "draft_opd",
        "run": {"out_dir": str(tmp_path / "run"), "target": str(target_dir), "prompts": prompts,
                "heldout": 2, "threads": 1},
        "opd": {"drafter": str(drafter), "total_steps": 2, "prompts_per_step": 3,
                "num_draft_tokens": 3, "max_new_tokens": 8, "eval_every": 0,
                "eval_max_new_tokens": 4, "checkpoint_every": 1, "requests_per_step": 1,
                "rollout_timeout_s": 60},
    }  # fmt: skip


def test_the_traffic_source_is_stored_as_a_reference() -> None:
    source = {"source": "traffic", "min_prompts": 4, "max_prompts": 100}
    run = {"out_dir": "o", "prompts": source}
    spec = parse_spec({"mode": "draft_opd", "run": run, "opd": {"drafter": "d"}})
    assert spec.run.prompts == "traffic://draftopd:traffic?min_prompts=4&max_prompts=100"
    assert parse_traffic_ref(spec.run.prompts) == TrafficSource(TRAFFIC_STREAM, 4, 100)
    assert parse_spec(spec.model_dump()).run.prompts == spec.run.prompts  # stored form re-parses
    for bad in ({"source": "kafka"}, {"source": "traffic", "min": 3},
                {"source": "traffic", "min_prompts": 0},
                {"source": "traffic", "min_prompts": 5, "max_prompts": 2}):  # fmt: skip
        with pytest.raises(ValidationError, match="prompts"):
            parse_spec({"mode": "draft_opd", "run": {"out_dir": "o", "prompts": bad},
                        "opd": {"drafter": "d"}})  # fmt: skip


def test_a_job_trains_on_captured_traffic(
    redis_url: str, tiny_target: TargetModel, tiny_target_dir: Path, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    settings = InferenceSettings(
        target=str(tiny_target_dir), drafter="random:0", redis_url=redis_url, capture_rate=1.0,
        torch_threads=1,
    )  # fmt: skip
    texts = [f"Tell me about topic {i}." for i in range(8)] + ["Tell me about topic 3."] * 2
    with TestClient(create_app(settings)) as http:
        for text in texts:
            body = {"messages": [{"role": "user", "content": text}], "max_new_tokens": 6}
            assert http.post("/generate", json=body).status_code == 200
    captured = read(client)
    assert len(captured) == 10
    drafter = save_drafter(
        random_drafter_for(tiny_target, seed=1, draft_vocab_size=200), tmp_path / "start"
    )
    spec = _spec(tmp_path, tiny_target_dir, drafter, {"source": "traffic", "min_prompts": 6})
    stop = threading.Event()
    worker = RolloutWorker(client, tiny_target, consumer="w", block_ms=50)
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        result = run_train_job("traffic-job", spec, client)
    finally:
        stop.set()
        thread.join(10)
    assert result["status"] == "succeeded" and result["step"] == 2
    lines = [json.loads(x) for x in (tmp_path / "run" / TRAFFIC_PROMPTS).read_text().splitlines()]
    distinct = []
    for _, record in captured:
        if record.prompt_ids not in distinct:
            distinct.append(record.prompt_ids)
    assert [x["prompt_ids"] for x in lines] == distinct and len(distinct) == 8
    heldout = distinct[-2:]  # the newest are held out, as the corpus's last prompts are
    records = [RolloutRecord.from_fields(f) for _, f in client.xrange(stream_key("traffic-job"))]
    assert len(records) == 2 * 3
    assert all(r.prompt_ids in distinct[:-2] and r.prompt_ids not in heldout for r in records)
    assert {r.drafter_version for r in records} == {"0", "1"}  # re-run by the job's versions


def test_too_little_traffic_fails_the_job_with_its_reason(
    redis_url: str, tiny_target: TargetModel, tiny_target_dir: Path, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    drafter = save_drafter(
        random_drafter_for(tiny_target, seed=1, draft_vocab_size=200), tmp_path / "start"
    )
    spec = _spec(tmp_path, tiny_target_dir, drafter, {"source": "traffic", "min_prompts": 3})
    with pytest.raises(ValueError, match="0 distinct prompts, 3 needed"):
        run_train_job("empty", spec, client)
    status = JobStatus(client).get("empty")
    assert status["status"] == "failed" and "capture" in status["error"]
