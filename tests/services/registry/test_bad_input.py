"""Bad input gets a clear 4xx and loses nothing: the repros of the fuzzing report, each followed
by every list and get endpoint still answering 200 (no half-written row breaks a later read)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.services.registry.helpers import (
    AUTH,
    DRAFTER,
    checkpoint_files,
    checkpoint_tar,
    create_drafter,
    tar_bytes,
    upload,
)
from tests.services.registry.test_train_jobs import broker_messages

SFT: dict[str, Any] = {"mode": "sft", "run": {"out_dir": "/tmp/bad"}, "sft": {"total_steps": 5}}


def assert_every_read_answers(client: TestClient) -> dict[str, int]:
    """GET every list and every item the registry holds; all must be 200. Returns counts."""
    counts = {"drafters": 0, "versions": 0, "jobs": 0}
    drafters = client.get("/drafters")
    assert drafters.status_code == 200, drafters.text
    for drafter in drafters.json():
        name = drafter["name"]
        assert client.get(f"/drafters/{name}").status_code == 200
        versions = client.get(f"/drafters/{name}/versions")
        assert versions.status_code == 200, versions.text
        for version in versions.json():
            base = f"/drafters/{name}/versions/{version['version']}"
            for url in (base, f"{base}/metrics", f"{base}/artifact"):
                assert client.get(url).status_code == 200, url
            counts["versions"] += 1
        counts["drafters"] += 1
    jobs = client.get("/train-jobs")
    assert jobs.status_code == 200, jobs.text
    for job in jobs.json():
        assert client.get(f"/train-jobs/{job['id']}").status_code == 200
        counts["jobs"] += 1
    return counts


def _raw_post(client: TestClient, url: str, body: str, **headers: str) -> Any:
    return client.post(url, content=body.encode(), headers={"content-type": "application/json",
                                                             **headers})  # fmt: skip


@pytest.mark.parametrize(
    "sft",
    [
        '{"total_steps": "abc"}', '{"total_steps": null}', '{"total_steps": [1]}',
        '{"total_steps": 1e30}', '{"lr": "x"}', '{"betas": 5}', '{"total_steps": 2.5}',
        '{"total_steps": Infinity}', '{"total_steps": 1e300}', '{"total_steps": true}',
        '{"betas": [0.9, 0.95, 0.99]}', '{"lr": NaN}', '{"temperature": Infinity}',
        '{"total_steps": 2147483648}',
    ],
)  # fmt: skip
def test_bad_train_job_specs_are_422_and_leave_nothing(
    client: TestClient, redis_url: str, sft: str
) -> None:
    create_drafter(client)
    body = '{"drafter": "%s", "spec": {"mode": "sft", "run": {"out_dir": "/tmp/x"}, "sft": %s}}'
    response = _raw_post(client, "/train-jobs", body % (DRAFTER, sft), **AUTH)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][:4] == ["body", "spec", "sft", "sft"]
    assert broker_messages(redis_url) == []
    assert assert_every_read_answers(client)["jobs"] == 0


def test_huge_offset_is_422(client: TestClient) -> None:
    response = client.get("/train-jobs", params={"offset": 2**63})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "offset"]
    assert client.get("/train-jobs", params={"offset": 2**31 - 1}).json() == []


@pytest.mark.parametrize(
    ("url", "body"),
    [
        ("/drafters", '{"name": "d1", "target_model": "t", "description": "x\\ud800"}'),
        ("/drafters", '{"name": "d1", "target_model": "t\\udfff"}'),
        ("/train-jobs", '{"drafter": "smollm2-eagle3", "spec": {"mode": "sft", "run": '
                        '{"out_dir": "/tmp/\\ud800"}}}'),
    ],
)  # fmt: skip
def test_lone_surrogates_are_422_with_an_encodable_body(
    client: TestClient, url: str, body: str
) -> None:
    create_drafter(client)
    response = _raw_post(client, url, body, **AUTH)
    assert response.status_code == 422, response.text
    assert "valid Unicode" in response.text
    assert assert_every_read_answers(client) == {"drafters": 1, "versions": 0, "jobs": 0}


def _with_config(config: bytes) -> bytes:
    files = checkpoint_files()
    files["config.json"] = config
    return tar_bytes(files)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (b'{"architecture": "eagle3", "x": "\\ud800"}', "not valid Unicode"),
        (b'{"architecture": "eagle3", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "deeper"),
        (b'{"architecture": "eagle3", "x": ' + b"7" * 5000 + b"}", "not valid JSON"),
        (b'{"architecture": "eagle3", "x": NaN}', "NaN"),
    ],
)
def test_bad_config_json_is_400_and_stores_nothing(
    client: TestClient, config: bytes, message: str
) -> None:
    create_drafter(client)
    response = upload(client, DRAFTER, _with_config(config))
    assert response.status_code == 400, response.text
    assert message in response.json()["detail"]
    assert assert_every_read_answers(client) == {"drafters": 1, "versions": 0, "jobs": 0}
    assert upload(client, DRAFTER, checkpoint_tar()).json()["version"] == 1  # nothing burnt


def test_a_deeply_nested_safetensors_header_is_400(client: TestClient) -> None:
    create_drafter(client)
    header = b'{"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    weights = len(header).to_bytes(8, "little") + header
    files = {**checkpoint_files(), "model.safetensors": weights}
    response = upload(client, DRAFTER, tar_bytes(files))
    assert response.status_code == 400 and "deeper" in response.json()["detail"]
    assert assert_every_read_answers(client)["versions"] == 0


def test_no_token_is_401_before_the_body_is_read(client: TestClient) -> None:
    for url in ("/drafters", "/train-jobs", f"/drafters/{DRAFTER}/versions"):
        response = _raw_post(client, url, "{not json")
        assert response.status_code == 401, (url, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
    response = client.patch("/train-jobs/nope", content=b"[", headers={"Authorization": "Bearer x"})
    assert response.status_code == 403
    response = client.put(f"/drafters/{DRAFTER}/aliases/production", content=b"{")
    assert response.status_code == 401


def test_well_formed_input_still_works(client: TestClient) -> None:
    create_drafter(client, description="unicode is fine: τ ≥ 1 ✓")
    assert upload(client, DRAFTER, checkpoint_tar()).status_code == 201
    job = client.post("/train-jobs", json={"drafter": DRAFTER, "spec": SFT}, headers=AUTH)
    assert job.status_code == 201, job.text
    assert assert_every_read_answers(client) == {"drafters": 1, "versions": 1, "jobs": 1}
    assert json.loads(client.get(f"/drafters/{DRAFTER}").text)["description"].endswith("✓")
