"""Rollout workers against the real Redis: requests shared without duplicates, exactly-once
publishing when a worker dies or is slow, drafter versions loaded on demand, /health, /metrics."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from draftopd.models.checkpoint import random_drafter_for, save_drafter
from draftopd.models.target import TargetModel
from draftopd.speculative.records import RolloutRecord, stream_key
from draftopd.training.configs import OPDConfig
from draftopd.training.opd.replay import anchor_plan
from draftopd.wire.rollout_queue import RolloutRequest, enqueue, next_request, publish
from services.rollout_worker.main import create_app
from services.rollout_worker.settings import RolloutWorkerSettings
from services.rollout_worker.worker import DEAD_LETTER_STREAM, RolloutWorker
from services.trainer.rollouts import RedisRollouts

JOB = "job-1"


@pytest.fixture(scope="module")
def drafter_dirs(tiny_target: TargetModel, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two drafter versions (different seeds) saved as checkpoints."""
    root = tmp_path_factory.mktemp("versions")
    dirs = []
    for seed in (0, 1):
        drafter = random_drafter_for(tiny_target, seed=seed, draft_vocab_size=200)
        dirs.append(save_drafter(drafter, root / f"v{seed}"))
    return dirs


def _request(i: int, path: Path, version: str = "0", prompts: int = 2) -> RolloutRequest:
    return RolloutRequest(
        job_id=JOB,
        request_id=f"r{i}",
        drafter_version=version,
        drafter_path=str(path),
        prompts=[[5 + i, 6 + j, 7, 8, 9] for j in range(prompts)],
        num_draft_tokens=3,
        max_new_tokens=12,
    )


def _records(client: redis.Redis) -> list[RolloutRecord]:
    return [RolloutRecord.from_fields(f) for _, f in client.xrange(stream_key(JOB))]


def _worker(client: redis.Redis, target: TargetModel, name: str, **kw: Any) -> RolloutWorker:
    return RolloutWorker(client, target, consumer=name, block_ms=50, **kw)


def test_two_workers_share_the_requests_without_duplicates(
    redis_url: str, tiny_target: TargetModel, drafter_dirs: list[Path]
) -> None:
    client = redis.Redis.from_url(redis_url)
    enqueue(client, [_request(i, drafter_dirs[0]) for i in range(8)])
    workers = [_worker(client, tiny_target, f"w{k}") for k in range(2)]
    stop = threading.Event()
    threads = [threading.Thread(target=w.run, args=(stop,)) for w in workers]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while len(_records(client)) < 16 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(10)

    records = _records(client)
    keys = sorted((r.extra["request_id"], r.extra["index"]) for r in records)
    assert keys == sorted((f"r{i}", j) for i in range(8) for j in range(2))  # each exactly once
    assert sum(w.stats.requests for w in workers) == 8
    assert client.xlen("draftopd:rollout-requests") == 0  # published requests are deleted
    for record in records:
        assert record.job_id == JOB and record.drafter_version == "0"
        assert anchor_plan(record).cycles  # replayable
    stats = workers[0].stats
    assert stats.tokens_per_s > 0 and 1.0 <= stats.tau <= 4.0


def test_a_dead_workers_request_is_reclaimed_and_published_once(
    redis_url: str, tiny_target: TargetModel, drafter_dirs: list[Path]
) -> None:
    client = redis.Redis.from_url(redis_url)
    enqueue(client, [_request(0, drafter_dirs[0])])
    taken = next_request(client, "dead", block_ms=10)
    assert taken is not None  # "dead" holds it and never publishes
    survivor = _worker(client, tiny_target, "alive", claim_idle_ms=200)
    assert survivor.run_once() is False  # not idle long enough: not reclaimed yet
    time.sleep(0.3)
    assert survivor.run_once() is True
    assert len(_records(client)) == 2 and survivor.stats.requests == 1
    # the dead worker comes back and publishes late: nothing is written twice
    entry_id, request = taken
    late = [r for r in _records(client)]
    assert publish(client, entry_id, request, late) is False
    assert len(_records(client)) == 2


def test_the_worker_loads_the_requested_version(
    redis_url: str, tiny_target: TargetModel, drafter_dirs: list[Path]
) -> None:
    client = redis.Redis.from_url(redis_url)
    enqueue(
        client,
        [
            _request(0, drafter_dirs[0], "0"),
            _request(1, drafter_dirs[0], "0"),
            _request(2, drafter_dirs[1], "1"),
        ],
    )
    worker = _worker(client, tiny_target, "w")
    while worker.run_once():
        pass
    assert worker.stats.drafter_loads == 2 and worker.drafter_version == "1"
    assert [r.drafter_version for r in _records(client)] == ["0"] * 4 + ["1"] * 2


def test_an_unloadable_drafter_fails_the_request_but_not_the_worker(
    redis_url: str, tiny_target: TargetModel, drafter_dirs: list[Path], tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    enqueue(client, [_request(0, tmp_path / "missing"), _request(1, drafter_dirs[0])])
    worker = _worker(client, tiny_target, "w")
    assert worker.run_once() and worker.run_once()
    assert worker.stats.failures == 1 and "missing" in (worker.stats.last_error or "")
    assert [r.extra["request_id"] for r in _records(client)] == ["r1", "r1"]


def test_a_request_that_keeps_failing_goes_to_the_dead_letters(
    redis_url: str, tiny_target: TargetModel, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    enqueue(client, [_request(0, tmp_path / "missing")])
    worker = _worker(client, tiny_target, "w", claim_idle_ms=1, max_attempts=3)
    for _ in range(3):
        time.sleep(0.01)
        assert worker.run_once()
    assert worker.stats.failures == 3 and worker.run_once() is False  # nothing left to retry
    dead = client.xrange(DEAD_LETTER_STREAM)
    assert len(dead) == 1 and dead[0][1][b"request_id"] == b"r0"
    assert b"missing" in dead[0][1][b"error"]
    assert client.xlen("draftopd:rollout-requests") == 0 and _records(client) == []


def test_a_batched_request_writes_the_engines_records(
    redis_url: str, tiny_target: TargetModel, drafter_dirs: list[Path]
) -> None:
    client = redis.Redis.from_url(redis_url)
    engine, batched = _request(0, drafter_dirs[0], prompts=3), _request(1, drafter_dirs[0])
    batched = RolloutRequest(**{**vars(batched), "prompts": engine.prompts, "mode": "batched"})
    sampled = RolloutRequest(**{**vars(batched), "request_id": "r2", "temperature": 1.0})
    enqueue(client, [engine, batched, sampled])
    worker = _worker(client, tiny_target, "w")
    while worker.run_once():
        pass
    records = _records(client)
    by_request = {r: [x for x in records if x.extra["request_id"] == r] for r in ("r0", "r1")}
    assert [len(v) for v in by_request.values()] == [3, 3]
    for a, b in zip(by_request["r0"], by_request["r1"], strict=True):
        assert a.response_ids == b.response_ids
        assert [(x.anchor, x.proposed, x.accepted, x.committed) for x in a.cycles] == [
            (y.anchor, y.proposed, y.accepted, y.committed) for y in b.cycles
        ]
    assert worker.stats.failures == 1 and "greedy only" in (worker.stats.last_error or "")


def test_requests_are_validated() -> None:
    with pytest.raises(ValueError, match="non-empty prompts"):
        RolloutRequest("j", "r", "0", "/x", prompts=[])
    with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
        RolloutRequest("j", "r", "0", "/x", prompts=[[1]], seeds=[1, 2])
    with pytest.raises(ValueError, match="rollout mode 'fast'"):
        RolloutRequest("j", "r", "0", "/x", prompts=[[1]], mode="fast")


def test_health_and_metrics(
    redis_url: str, tiny_target_dir: Path, drafter_dirs: list[Path]
) -> None:
    settings = RolloutWorkerSettings(
        redis_url=redis_url, target=str(tiny_target_dir), consumer="svc", block_ms=50
    )
    client = redis.Redis.from_url(redis_url)
    with TestClient(create_app(settings)) as http:
        enqueue(client, [_request(0, drafter_dirs[0])])
        deadline = time.monotonic() + 60
        while len(_records(client)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        health = http.get("/health").json()
        assert health["status"] == "ok" and health["redis"] is True
        assert health["consumer"] == "svc" and health["drafter_version"] == "0"
        assert health["requests"] == 1
        text = http.get("/metrics").text
        assert "draftopd_rollout_sequences 2.0" in text
        assert "draftopd_rollout_tokens_per_second" in text and "draftopd_rollout_tau" in text


def test_the_trainer_fails_a_step_whose_request_was_dead_lettered(
    redis_url: str, tiny_target: TargetModel, tmp_path: Path
) -> None:
    """The trainer does not wait out its timeout: a dead-lettered request fails the step with
    the worker's error."""
    client = redis.Redis.from_url(redis_url)
    cfg = OPDConfig(
        total_steps=1, prompts_per_step=2, num_draft_tokens=2, max_new_tokens=4,
        rollout_timeout_s=120,
    )  # fmt: skip
    rollouts = RedisRollouts(client, "job-dead", tmp_path, cfg, block_ms=20)
    drafter = random_drafter_for(tiny_target, seed=0, draft_vocab_size=200)
    failure: list[BaseException] = []

    def trainer() -> None:
        try:
            rollouts.records(0, drafter, [[5, 6, 7], [8, 9, 10]], [0, 1])
        except (RuntimeError, TimeoutError) as err:
            failure.append(err)

    thread = threading.Thread(target=trainer)
    thread.start()
    while client.xlen("draftopd:rollout-requests") == 0:
        time.sleep(0.01)
    (tmp_path / "versions" / "v0" / "model.safetensors").write_bytes(b"not safetensors")
    worker = _worker(client, tiny_target, "w", claim_idle_ms=1, max_attempts=2)
    started = time.monotonic()
    while thread.is_alive() and time.monotonic() - started < 60:
        worker.run_once()
        time.sleep(0.01)
    thread.join(timeout=5)
    assert len(failure) == 1 and isinstance(failure[0], RuntimeError)
    assert "rollout request s0-" in str(failure[0]) and "unreadable" in str(failure[0])


def test_versions_are_published_with_absolute_paths(
    redis_url: str, tiny_target: TargetModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job with a relative out_dir (the trainer's cwd) still names a path the rollout workers
    can open from their own working directory."""
    monkeypatch.chdir(tmp_path)
    client = redis.Redis.from_url(redis_url)
    cfg = OPDConfig(total_steps=1, prompts_per_step=1, num_draft_tokens=2, max_new_tokens=4)
    rollouts = RedisRollouts(client, "job-rel", Path("runs/rel"), cfg)
    drafter = random_drafter_for(tiny_target, seed=0, draft_vocab_size=200)
    path = rollouts.publish_version(0, drafter)
    rollouts._request(0, [[5, 6, 7]], [0], path)
    (_, fields), *_ = client.xrange("draftopd:rollout-requests")
    request = RolloutRequest.from_fields(fields)
    assert Path(request.drafter_path).is_absolute()
    assert Path(request.drafter_path) == tmp_path / "runs" / "rel" / "versions" / "v0"
    assert (Path(request.drafter_path) / "model.safetensors").is_file()


def test_a_trainer_killed_while_enqueueing_leaves_no_mark_without_requests(
    redis_url: str, tiny_target: TargetModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 'step v was requested' mark and the step's requests land together: a trainer that dies
    before its transaction reaches Redis leaves neither, so its successor enqueues them again
    instead of waiting for rollouts nobody was asked for."""
    client = redis.Redis.from_url(redis_url)
    cfg = OPDConfig(total_steps=1, prompts_per_step=2, num_draft_tokens=2, max_new_tokens=4)
    rollouts = RedisRollouts(client, "job-kill", tmp_path, cfg)
    path = rollouts.publish_version(
        0, random_drafter_for(tiny_target, seed=0, draft_vocab_size=200)
    )
    real_pipeline = client.pipeline

    def dying_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = real_pipeline(*args, **kwargs)

        def die(*_: Any, **__: Any) -> None:
            raise redis.ConnectionError("killed before EXEC")

        pipe.execute = die  # type: ignore[method-assign]
        return pipe

    monkeypatch.setattr(client, "pipeline", dying_pipeline)
    with pytest.raises(redis.ConnectionError):
        rollouts._request(0, [[5, 6, 7], [8, 9]], [0, 1], path)
    monkeypatch.undo()
    assert not client.sismember("draftopd:jobs:job-kill:requested", "0")
    assert client.xlen("draftopd:rollout-requests") == 0
    successor = RedisRollouts(client, "job-kill", tmp_path, cfg)
    successor._request(0, [[5, 6, 7], [8, 9]], [0, 1], path)
    successor._request(0, [[5, 6, 7], [8, 9]], [0, 1], path)  # once only
    assert client.sismember("draftopd:jobs:job-kill:requested", "0")
    assert client.xlen("draftopd:rollout-requests") == 2
