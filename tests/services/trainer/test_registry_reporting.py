"""A train job reporting to a live registry (SQLite, real HTTP, real Redis): its checkpoints become
versions with their held-out tau, progress and status are visible, promote_to moves the alias,
a cancel stops the job at its next step, and ``registry://`` references start a job from a
registered version."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from draftopd.wire.registry_client import RegistryClient
from services.trainer.jobs import run_train_job
from tests.services.registry.helpers import live_registry

DRAFTER = "tiny-eagle3"


@pytest.fixture
def registry(redis_url: str, tmp_path: Path) -> Iterator[RegistryClient]:
    with live_registry(redis_url, tmp_path, DRAFTER) as client:
        yield client


def _sft_spec(tmp_path: Path, target: Path, out: str, steps: int, **extra: Any) -> dict[str, Any]:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(10)))
    return {
        "mode": "sft",
        "out_dir": str(tmp_path / out),
        "target": str(target),
        "prompts": str(prompts),
        "heldout": 2,
        "max_new_tokens": 8,
        "threads": 1,
        "sft": {
            "total_steps": steps,
            "batch_size": 2,
            "ttt_steps": 2,
            "draft_vocab_size": 64,
            "eval_every": 2,
            "checkpoint_every": 2,
            "eval_max_new_tokens": 8,
        },
        **extra,
    }


def test_an_sft_job_registers_its_checkpoints_and_is_promoted(
    registry: RegistryClient, redis_url: str, tiny_target_dir: Path, tmp_path: Path
) -> None:
    spec = _sft_spec(tmp_path, tiny_target_dir, "run", steps=4)
    job = registry.create_train_job(DRAFTER, spec, promote_to="candidate")
    result = run_train_job(job["id"], spec, redis.Redis.from_url(redis_url), registry=registry)
    assert result["status"] == "succeeded" and result["step"] == 4

    done = registry.get_train_job(job["id"])
    assert (done["status"], done["progress"], done["step"]) == ("succeeded", 1.0, 4)
    assert done["tau"] == pytest.approx(result["tau"]) and done["produced_versions"] == [1, 2]
    versions = registry.list_versions(DRAFTER)
    assert [(v["version"], v["step"], v["job_id"]) for v in versions] == [
        (1, 2, job["id"]),
        (2, 4, job["id"]),
    ]
    assert versions[1]["parent_version"] == 1
    taus = [registry.list_metrics(DRAFTER, v)[0] for v in (1, 2)]
    assert [m["benchmark"] for m in taus] == ["heldout", "heldout"]
    assert taus[1]["tau"] == pytest.approx(result["tau"])
    assert registry.get_alias(DRAFTER, "candidate")["version"] == 2
    (event,) = registry.list_events(DRAFTER, alias="candidate")  # the promotion, and its cause
    assert (event["from_version"], event["to_version"]) == (None, 2)
    assert event["cause"] == f"train_job:{job['id']}"
    served = registry.download_version(DRAFTER, 2, tmp_path / "v2")
    assert sorted(p.name for p in served.iterdir()) == ["config.json", "model.safetensors"]

    # a continued SFT job that starts from the registered version
    more = _sft_spec(tmp_path, tiny_target_dir, "more", steps=2,
                     init_from=f"registry://{DRAFTER}/2")  # fmt: skip
    job2 = registry.create_train_job(DRAFTER, more, base_version=2)
    assert (
        run_train_job(job2["id"], more, redis.Redis.from_url(redis_url), registry=registry)[
            "status"
        ]
        == "succeeded"
    )
    assert registry.get_version(DRAFTER, 3)["parent_version"] == 2


def test_a_cancelled_job_stops_at_its_next_step(
    registry: RegistryClient, redis_url: str, tiny_target_dir: Path, tmp_path: Path
) -> None:
    spec = _sft_spec(tmp_path, tiny_target_dir, "run", steps=400)
    job = registry.create_train_job(DRAFTER, spec)
    result: dict[str, Any] = {}

    def trainer() -> None:
        result.update(run_train_job(job["id"], spec, redis.Redis.from_url(redis_url),
                                    registry=registry))  # fmt: skip

    thread = threading.Thread(target=trainer)
    thread.start()
    deadline = time.monotonic() + 120
    while (registry.get_train_job(job["id"])["step"] or 0) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    registry.cancel_train_job(job["id"])
    thread.join(timeout=120)
    assert result == {"status": "cancelled"}
    state = registry.get_train_job(job["id"])
    assert state["status"] == "cancelled" and 3 <= state["step"] < 400
    assert all(v["step"] <= state["step"] + 1 for v in registry.list_versions(DRAFTER))


def test_a_bad_registry_reference_fails_the_job_with_its_reason(
    registry: RegistryClient, redis_url: str, tiny_target_dir: Path, tmp_path: Path
) -> None:
    spec = _sft_spec(tmp_path, tiny_target_dir, "run", steps=2, init_from="registry://nope")
    job = registry.create_train_job(DRAFTER, spec)
    with pytest.raises(ValueError, match="expected 'registry://NAME/VERSION'"):
        run_train_job(job["id"], spec, redis.Redis.from_url(redis_url), registry=registry)
    failed = registry.get_train_job(job["id"])
    assert failed["status"] == "failed" and "registry://NAME/VERSION" in failed["error"]
