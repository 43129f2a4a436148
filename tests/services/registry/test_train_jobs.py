"""Train jobs: strict validation, storage, the Celery message in the real Redis broker,
the trainer's reports, cancellation and promotion."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from services.registry.main import create_app
from services.registry.settings import RegistrySettings
from tests.services.registry.helpers import (
    AUTH,
    DRAFTER,
    checkpoint_tar,
    create_drafter,
    next_events,
    upload,
)

SFT_SPEC: dict[str, Any] = {
    "mode": "sft",
    "run": {"out_dir": "/tmp/run-sft"},
    "sft": {"total_steps": 50},
}
OPD_SPEC: dict[str, Any] = {
    "mode": "draft_opd",
    "run": {"out_dir": "/tmp/run-opd"},
    "opd": {"drafter": "/tmp/run-sft/checkpoints/final", "total_steps": 20},
}


def submit(client: TestClient, spec: dict[str, Any], **fields: Any) -> Any:
    return client.post(
        "/train-jobs", json={"drafter": DRAFTER, "spec": spec, **fields}, headers=AUTH
    )


def broker_messages(redis_url: str, queue: str = "train") -> list[dict[str, Any]]:
    client = redis.Redis.from_url(redis_url)
    try:
        raw: list[bytes] = client.lrange(queue, 0, -1)  # type: ignore[assignment]
    finally:
        client.close()
    return [json.loads(item) for item in raw]


def task_of(message: dict[str, Any]) -> tuple[str, list[Any]]:
    """(task name, positional args) of a Celery protocol-2 message."""
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    return message["headers"]["task"], args


def test_post_stores_and_enqueues_the_job(client: TestClient, redis_url: str) -> None:
    create_drafter(client)
    response = submit(client, SFT_SPEC, promote_to="candidate")
    assert response.status_code == 201, response.text
    job = response.json()
    assert (job["mode"], job["drafter"], job["status"]) == ("sft", DRAFTER, "queued")
    assert (job["progress"], job["total_steps"], job["promote_to"]) == (0.0, 50, "candidate")
    assert job["cancel_requested"] is False and job["produced_versions"] == []
    # stored normalised: every field of the spec present, the sft config complete
    assert job["spec"]["run"]["out_dir"] == "/tmp/run-sft"
    assert job["spec"]["run"]["target"] == "smollm2"
    assert job["spec"]["sft"]["total_steps"] == 50 and "lr" in job["spec"]["sft"]

    messages = broker_messages(redis_url)
    assert len(messages) == 1
    name, args = task_of(messages[0])
    assert name == "draftopd.train"
    assert args == [job["id"], job["spec"]]
    assert messages[0]["headers"]["id"] == job["id"]
    assert client.get(f"/train-jobs/{job['id']}").json() == job


def test_draft_opd_job(client: TestClient, redis_url: str) -> None:
    create_drafter(client)
    upload(client, DRAFTER, checkpoint_tar())
    job = submit(client, OPD_SPEC, base_version=1).json()
    assert (job["mode"], job["total_steps"], job["base_version"]) == ("draft_opd", 20, 1)
    assert job["spec"]["opd"]["drafter"] == OPD_SPEC["opd"]["drafter"]
    assert task_of(broker_messages(redis_url)[0])[1][0] == job["id"]


def test_a_dflash_drafter_takes_dflash_jobs_and_refuses_other_families(
    client: TestClient, redis_url: str
) -> None:
    """The job's drafter family must be the registry drafter's: a fresh SFT drafter's
    ``drafter_type``, or the family of the registry drafter a job starts from (409 otherwise,
    and nothing is enqueued)."""
    create_drafter(client, "blocks", architecture="dflash")
    create_drafter(client)  # DRAFTER: eagle3
    dflash_sft = {**SFT_SPEC, "sft": {"total_steps": 5, "drafter_type": "dflash", "block_size": 16}}
    job = client.post(
        "/train-jobs", json={"drafter": "blocks", "spec": dflash_sft}, headers=AUTH
    ).json()
    assert job["drafter"] == "blocks" and job["spec"]["sft"]["drafter_type"] == "dflash"
    assert job["spec"]["sft"]["block_size"] == 16
    refused = submit(client, dflash_sft)  # into the eagle3 drafter
    assert refused.status_code == 409, refused.text
    assert "dflash" in refused.json()["detail"] and "eagle3" in refused.json()["detail"]
    plain = client.post("/train-jobs", json={"drafter": "blocks", "spec": SFT_SPEC}, headers=AUTH)
    assert plain.status_code == 409 and "sft.drafter_type" in plain.json()["detail"]
    opd_from_eagle3 = {**OPD_SPEC, "opd": {"drafter": f"registry://{DRAFTER}/1"}}
    crossed = client.post(
        "/train-jobs", json={"drafter": "blocks", "spec": opd_from_eagle3}, headers=AUTH
    )
    assert crossed.status_code == 409 and f"registry://{DRAFTER}/1" in crossed.json()["detail"]
    opd_from_blocks = {**OPD_SPEC, "opd": {"drafter": "registry://blocks/3"}}
    accepted = client.post(
        "/train-jobs", json={"drafter": "blocks", "spec": opd_from_blocks}, headers=AUTH
    )
    assert accepted.status_code == 201, accepted.text
    assert len(broker_messages(redis_url)) == 2  # the two accepted jobs only


def test_the_flat_spec_layout_of_earlier_releases_is_stored_sectioned(client: TestClient) -> None:
    create_drafter(client)
    flat = {"mode": "sft", "out_dir": "/tmp/flat", "max_new_tokens": 64, "sft": {"total_steps": 9}}
    job = submit(client, flat).json()
    assert job["spec"]["run"]["out_dir"] == "/tmp/flat" and job["total_steps"] == 9
    assert job["spec"]["sft"]["max_new_tokens"] == 64 and "out_dir" not in job["spec"]


@pytest.mark.parametrize(
    ("spec", "loc"),
    [
        ({**SFT_SPEC, "learning_rate": 1e-4}, ["body", "spec", "sft", "learning_rate"]),
        ({**OPD_SPEC, "sft": {}}, ["body", "spec", "draft_opd", "sft"]),
        ({"mode": "sft"}, ["body", "spec", "sft", "run", "out_dir"]),
        ({**SFT_SPEC, "run": {}}, ["body", "spec", "sft", "run", "out_dir"]),
        ({**SFT_SPEC, "sft": {"total_steps": 2.5}}, ["body", "spec", "sft", "sft", "total_steps"]),
        ({**SFT_SPEC, "mode": "rl"}, ["body", "spec"]),
    ],
)
def test_invalid_specs_are_422_naming_the_field(
    client: TestClient, redis_url: str, spec: dict[str, Any], loc: list[str]
) -> None:
    create_drafter(client)
    response = submit(client, spec)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == loc
    assert client.get("/train-jobs").json() == []
    assert broker_messages(redis_url) == []


def test_bad_nested_config_and_extra_request_field_are_422(client: TestClient) -> None:
    create_drafter(client)
    response = submit(client, {**SFT_SPEC, "sft": {"total_steps": 50, "warmup": 3}})
    assert response.status_code == 422
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", "spec", "sft", "sft", "warmup"]
    response = submit(client, SFT_SPEC, priority="high")
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "priority"]


def test_unknown_drafter_or_base_version_is_404(client: TestClient, redis_url: str) -> None:
    response = submit(client, SFT_SPEC)
    assert response.status_code == 404
    assert response.json()["detail"] == f"drafter {DRAFTER!r} not found"
    create_drafter(client)
    response = submit(client, SFT_SPEC, base_version=4)
    assert response.status_code == 404
    assert response.json()["detail"] == f"drafter {DRAFTER!r} has no version 4"
    assert broker_messages(redis_url) == []
    response = client.get("/train-jobs/not-a-job")
    assert response.status_code == 404
    assert response.json()["detail"] == "train job 'not-a-job' not found"


def test_broker_down_is_503_and_the_job_failed(
    make_settings: Callable[..., RegistrySettings],
) -> None:
    settings = make_settings(celery_broker_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings)) as client:
        create_drafter(client)
        response = submit(client, SFT_SPEC)
        assert response.status_code == 503
        assert "could not enqueue train job" in response.json()["detail"]
        (job,) = client.get("/train-jobs").json()
        assert job["status"] == "failed"
        assert "could not enqueue" in job["error"]


def test_trainer_reports_and_finished_jobs_stay_finished(client: TestClient) -> None:
    create_drafter(client)
    job_id = submit(client, SFT_SPEC).json()["id"]
    url = f"/train-jobs/{job_id}"
    report = {"status": "running", "step": 10, "progress": 0.2, "tau": 1.3}
    running = client.patch(url, json=report, headers=AUTH).json()
    assert {k: running[k] for k in report} == report
    tau_only = client.patch(url, json={"tau": 1.5}, headers=AUTH).json()
    assert (tau_only["step"], tau_only["tau"], tau_only["status"]) == (10, 1.5, "running")

    response = client.patch(url, json={"status": None}, headers=AUTH)
    assert response.status_code == 422
    response = client.patch(url, json={"progress": 1.5}, headers=AUTH)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "progress"]
    response = client.patch(url, json={"status": "queued"}, headers=AUTH)
    assert response.status_code == 422

    failed = client.patch(url, json={"status": "failed", "error": "OOM"}, headers=AUTH).json()
    assert (failed["status"], failed["error"]) == ("failed", "OOM")
    response = client.patch(url, json={"status": "running"}, headers=AUTH)
    assert response.status_code == 409
    assert response.json()["detail"] == f"train job {job_id!r} is already failed; it cannot change"
    assert client.post(f"{url}/cancel", headers=AUTH).status_code == 409


def test_cancel(client: TestClient) -> None:
    create_drafter(client)
    queued_id = submit(client, SFT_SPEC).json()["id"]
    cancelled = client.post(f"/train-jobs/{queued_id}/cancel", headers=AUTH).json()
    assert (cancelled["status"], cancelled["cancel_requested"]) == ("cancelled", True)
    again = client.post(f"/train-jobs/{queued_id}/cancel", headers=AUTH)
    assert again.status_code == 200 and again.json()["status"] == "cancelled"

    running_id = submit(client, SFT_SPEC).json()["id"]
    client.patch(f"/train-jobs/{running_id}", json={"status": "running"}, headers=AUTH)
    asked = client.post(f"/train-jobs/{running_id}/cancel", headers=AUTH).json()
    assert (asked["status"], asked["cancel_requested"]) == ("running", True)
    done = client.patch(f"/train-jobs/{running_id}", json={"status": "cancelled"}, headers=AUTH)
    assert done.json()["status"] == "cancelled"
    assert client.post("/train-jobs/nope/cancel", headers=AUTH).status_code == 404


def test_produced_versions_and_promotion(client: TestClient, subscriber: Any) -> None:
    create_drafter(client)
    job_id = submit(client, SFT_SPEC, promote_to="candidate").json()["id"]
    client.patch(f"/train-jobs/{job_id}", json={"status": "running"}, headers=AUTH)
    upload(client, DRAFTER, checkpoint_tar(seed=0))  # not from the job
    for step, seed in ((25, 1), (50, 2)):
        response = upload(client, DRAFTER, checkpoint_tar(seed=seed), job_id=job_id, step=step)
        assert response.json()["job_id"] == job_id
    assert client.get(f"/train-jobs/{job_id}").json()["produced_versions"] == [2, 3]

    done = client.patch(
        f"/train-jobs/{job_id}", json={"status": "succeeded", "tau": 2.0}, headers=AUTH
    )
    assert (done.json()["status"], done.json()["progress"]) == ("succeeded", 1.0)
    alias = client.get(f"/drafters/{DRAFTER}/aliases/candidate").json()
    assert alias["version"] == 3
    (event,) = next_events(subscriber, 1)
    assert event == alias


def test_version_from_another_drafters_job_is_400(client: TestClient) -> None:
    create_drafter(client)
    create_drafter(client, "other")
    job_id = client.post(
        "/train-jobs", json={"drafter": "other", "spec": SFT_SPEC}, headers=AUTH
    ).json()["id"]
    response = upload(client, DRAFTER, checkpoint_tar(), job_id=job_id)
    assert response.status_code == 400
    assert response.json()["detail"] == (
        f"train job {job_id!r} trains drafter 'other', not {DRAFTER!r}"
    )
    response = upload(client, DRAFTER, checkpoint_tar(), job_id="no-such-job")
    assert response.status_code == 404


def test_list_filters_and_order(client: TestClient) -> None:
    create_drafter(client)
    create_drafter(client, "other")
    first = submit(client, SFT_SPEC).json()["id"]
    second = submit(client, SFT_SPEC).json()["id"]
    third = client.post(
        "/train-jobs", json={"drafter": "other", "spec": SFT_SPEC}, headers=AUTH
    ).json()["id"]
    client.patch(f"/train-jobs/{second}", json={"status": "running"}, headers=AUTH)
    assert [j["id"] for j in client.get("/train-jobs").json()] == [third, second, first]
    assert [j["id"] for j in client.get("/train-jobs?status=running").json()] == [second]
    assert [j["id"] for j in client.get(f"/train-jobs?drafter={DRAFTER}").json()] == [second, first]
    assert [j["id"] for j in client.get("/train-jobs?limit=1&offset=1").json()] == [second]
    assert client.get("/train-jobs?status=sleeping").status_code == 422
