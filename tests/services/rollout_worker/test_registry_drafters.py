"""Rollout requests that name a registry version (``registry://NAME/VERSION``): the worker fetches
it (sha256 checked) into its cache and rolls out with it. Real Redis, a real registry (SQLite,
uvicorn on a free port), the tiny target."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from draftopd.models.target import TargetModel
from draftopd.speculative.records import RolloutRecord, stream_key
from draftopd.wire.formats import RegistryRef, parse_registry_ref
from draftopd.wire.registry_client import RegistryClient
from draftopd.wire.rollout_queue import RolloutRequest, enqueue
from services.rollout_worker.main import create_app
from services.rollout_worker.settings import RolloutWorkerSettings
from services.rollout_worker.worker import RolloutWorker
from tests.services.inference.registry_setup import LiveRegistry, running_registry

JOB = "job-registry"


@pytest.fixture
def registry(tmp_path: Path, redis_url: str) -> Iterator[LiveRegistry]:
    with running_registry(tmp_path / "registry", redis_url) as live:
        yield live


@pytest.fixture
def reader(registry: LiveRegistry) -> Iterator[RegistryClient]:
    """A client without the token: the registry's reads are open."""
    with RegistryClient(registry.base_url) as client:
        yield client


def _request(i: int, path: str, version: str = "1") -> RolloutRequest:
    return RolloutRequest(
        job_id=JOB,
        request_id=f"r{i}",
        drafter_version=version,
        drafter_path=path,
        prompts=[[5, 6, 7, 8, 9], [9, 8, 7]],
        num_draft_tokens=3,
        max_new_tokens=12,
    )


def _records(client: redis.Redis) -> list[RolloutRecord]:
    entries: Any = client.xrange(stream_key(JOB))
    return [RolloutRecord.from_fields(f) for _, f in entries]


def _cycles(record: RolloutRecord) -> list[tuple[int, list[int], int, list[int]]]:
    return [(c.anchor, list(c.proposed), c.accepted, list(c.committed)) for c in record.cycles]


def test_a_registry_version_is_fetched_once_and_rolls_out_like_its_checkpoint(
    registry: LiveRegistry,
    reader: RegistryClient,
    redis_url: str,
    tiny_target: TargetModel,
    tmp_path: Path,
) -> None:
    name = registry.new_drafter()
    uploaded = registry.upload_random(name, tiny_target, seed=3, workdir=tmp_path)
    (checkpoint,) = tmp_path.glob(f"{name}-seed3-*")
    client = redis.Redis.from_url(redis_url)
    ref = f"registry://{name}/1"
    enqueue(client, [_request(0, ref), _request(1, ref), _request(2, str(checkpoint))])
    cache = tmp_path / "cache"
    worker = RolloutWorker(
        client, tiny_target, consumer="w", block_ms=50, registry=reader, artifact_cache_dir=cache
    )
    while worker.run_once():
        pass

    assert worker.stats.failures == 0 and worker.stats.requests == 3
    assert worker.stats.drafter_loads == 2  # the registry version once, then the local path
    (cached,) = (cache / name).iterdir()
    assert cached.name == f"v1-{str(uploaded['sha256'])[:16]}"
    assert (cached / "model.safetensors").read_bytes() == (
        checkpoint / "model.safetensors"
    ).read_bytes()
    by_request = {
        r: [x for x in _records(client) if x.extra["request_id"] == r] for r in ("r0", "r1", "r2")
    }
    assert [len(v) for v in by_request.values()] == [2, 2, 2]
    for fetched, local in zip(by_request["r0"], by_request["r2"], strict=True):
        assert fetched.drafter_version == "1"
        assert fetched.response_ids == local.response_ids
        assert _cycles(fetched) == _cycles(local)  # the same drafter made the same drafts


def test_a_tampered_registry_version_fails_the_request(
    registry: LiveRegistry,
    reader: RegistryClient,
    redis_url: str,
    tiny_target: TargetModel,
    tmp_path: Path,
) -> None:
    name = registry.new_drafter()
    uploaded = registry.upload_random(name, tiny_target, seed=3, workdir=tmp_path)
    registry.corrupt_stored(str(uploaded["sha256"]))
    client = redis.Redis.from_url(redis_url)
    enqueue(client, [_request(0, f"registry://{name}/1"), _request(1, f"registry://{name}/7")])
    cache = tmp_path / "cache"
    worker = RolloutWorker(
        client, tiny_target, consumer="w", block_ms=50, registry=reader, artifact_cache_dir=cache
    )
    assert worker.run_once()
    assert worker.stats.failures == 1 and "its sha256 is" in (worker.stats.last_error or "")
    assert worker.drafter is None and not list(cache.rglob("model.safetensors"))
    assert worker.run_once()  # an unknown version: the registry's 404
    assert worker.stats.failures == 2 and "-> 404" in (worker.stats.last_error or "")
    assert _records(client) == []


def test_a_registry_reference_needs_a_registry(
    redis_url: str, tiny_target: TargetModel, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    enqueue(client, [_request(0, "registry://some-drafter/2"), _request(1, "registry://bad")])
    worker = RolloutWorker(client, tiny_target, consumer="w", block_ms=50)
    assert worker.run_once()
    assert "needs a registry" in (worker.stats.last_error or "")
    assert "DRAFTOPD_ROLLOUT_REGISTRY_URL" in (worker.stats.last_error or "")
    assert worker.run_once()
    assert "expected 'registry://NAME/VERSION'" in (worker.stats.last_error or "")
    assert worker.stats.failures == 2


def test_parse_registry_ref() -> None:
    assert parse_registry_ref("registry://smollm2-eagle3/12") == RegistryRef("smollm2-eagle3", 12)
    assert parse_registry_ref("/checkpoints/step-3") is None
    assert parse_registry_ref("runs/registry/v1") is None
    for bad in ("registry://x", "registry://x/latest", "registry:///3", "registry://a/b/3"):
        with pytest.raises(ValueError, match="expected 'registry://NAME/VERSION'"):
            parse_registry_ref(bad)


def test_the_service_fetches_registry_versions(
    registry: LiveRegistry,
    redis_url: str,
    tiny_target: TargetModel,
    tiny_target_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = registry.new_drafter()
    registry.upload_random(name, tiny_target, seed=4, workdir=tmp_path)
    monkeypatch.setenv("DRAFTOPD_ROLLOUT_REGISTRY_URL", registry.base_url)
    monkeypatch.setenv("DRAFTOPD_ROLLOUT_REGISTRY_TOKEN", "hot-swap-token")
    monkeypatch.setenv("DRAFTOPD_ROLLOUT_ARTIFACT_CACHE_DIR", str(tmp_path / "svc-cache"))
    settings = RolloutWorkerSettings(
        redis_url=redis_url, target=str(tiny_target_dir), consumer="svc", block_ms=50
    )
    assert settings.registry_token is not None
    assert settings.registry_token.get_secret_value() == "hot-swap-token"
    client = redis.Redis.from_url(redis_url)
    with TestClient(create_app(settings)) as http:
        enqueue(client, [_request(0, f"registry://{name}/1", version="v1")])
        deadline = time.monotonic() + 60
        while len(_records(client)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        health = http.get("/health").json()
    assert health["drafter_version"] == "v1" and health["requests"] == 1
    assert health["last_error"] is None
    assert [r.drafter_version for r in _records(client)] == ["v1", "v1"]
    assert len(list((tmp_path / "svc-cache" / name).iterdir())) == 1


def test_fetch_version_serves_the_cache_without_downloading_again(
    registry: LiveRegistry, reader: RegistryClient, tiny_target: TargetModel, tmp_path: Path
) -> None:
    name = registry.new_drafter()
    uploaded = registry.upload_random(name, tiny_target, seed=3, workdir=tmp_path)
    first = reader.fetch_version(name, 1, tmp_path / "cache")
    registry.corrupt_stored(str(uploaded["sha256"]))  # a new download would now be refused
    assert reader.fetch_version(name, 1, tmp_path / "cache") == first
    with pytest.raises(ValueError, match="its sha256 is"):
        reader.fetch_version(name, 1, tmp_path / "other-cache")
    assert not (tmp_path / "other-cache" / name / first.name).exists()
