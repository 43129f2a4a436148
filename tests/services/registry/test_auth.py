"""The token policy: writes need the bearer token; reads are open unless open_reads is false."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.registry.main import create_app
from services.registry.settings import RegistrySettings
from tests.services.registry.helpers import AUTH, DRAFTER, checkpoint_tar, create_drafter, upload

JOB = "00000000-0000-0000-0000-000000000000"
WRITES: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/drafters", {"json": {"name": "x", "target_model": "t"}}),
    ("POST", f"/drafters/{DRAFTER}/versions", {"files": {"artifact": ("a.tar", b"x")}}),
    ("POST", f"/drafters/{DRAFTER}/versions/1/metrics", {"json": {"benchmark": "b", "tau": 1}}),
    ("PUT", f"/drafters/{DRAFTER}/aliases/production", {"json": {"version": 1}}),
    ("POST", "/train-jobs", {"json": {"drafter": DRAFTER, "spec": {"mode": "sft"}}}),
    ("POST", f"/train-jobs/{JOB}/cancel", {}),
    ("PATCH", f"/train-jobs/{JOB}", {"json": {"status": "running"}}),
]
READS = [
    "/drafters",
    f"/drafters/{DRAFTER}",
    f"/drafters/{DRAFTER}/versions",
    f"/drafters/{DRAFTER}/versions/1",
    f"/drafters/{DRAFTER}/versions/1/artifact",
    f"/drafters/{DRAFTER}/versions/1/metrics",
    f"/drafters/{DRAFTER}/aliases",
    f"/drafters/{DRAFTER}/aliases/production",
    "/train-jobs",
    f"/train-jobs/{JOB}",
]


@pytest.mark.parametrize(("method", "path", "kwargs"), WRITES)
def test_writes_need_the_token(
    client: TestClient, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    missing = client.request(method, path, **kwargs)
    assert missing.status_code == 401
    assert missing.json()["detail"] == "missing 'Authorization: Bearer <api_token>' header"
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = client.request(method, path, headers={"Authorization": "Bearer nope"}, **kwargs)
    assert wrong.status_code == 403
    assert wrong.json()["detail"] == "invalid API token"
    assert client.get("/drafters").json() == []  # nothing was written


def _seeded(client: TestClient) -> None:
    create_drafter(client)
    assert upload(client, DRAFTER, checkpoint_tar()).status_code == 201
    client.put(f"/drafters/{DRAFTER}/aliases/production", json={"version": 1}, headers=AUTH)


def test_reads_are_open_by_default(client: TestClient) -> None:
    _seeded(client)
    for path in READS:
        expected = 404 if path == f"/train-jobs/{JOB}" else 200  # an unknown job, but readable
        assert client.get(path).status_code == expected, path


def test_reads_need_the_token_when_not_open(
    make_settings: Callable[..., RegistrySettings],
) -> None:
    with TestClient(create_app(make_settings(open_reads=False))) as client:
        _seeded(client)
        for path in READS:
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers={"Authorization": "Bearer no"}).status_code == 403
        assert client.get("/drafters", headers=AUTH).json()[0]["name"] == DRAFTER
        assert client.get("/health").status_code == 200  # always open


def test_no_token_configured_refuses_writes(
    make_settings: Callable[..., RegistrySettings],
) -> None:
    with TestClient(create_app(make_settings(api_token=None))) as client:
        response = client.post("/drafters", json={"name": "x", "target_model": "t"}, headers=AUTH)
        assert response.status_code == 403
        assert "this registry has no api_token" in response.json()["detail"]
        assert client.get("/drafters").json() == []


def test_unauthenticated_writes_when_allowed(
    make_settings: Callable[..., RegistrySettings],
) -> None:
    settings = make_settings(api_token=None, allow_unauthenticated_writes=True)
    with TestClient(create_app(settings)) as client:
        response = client.post("/drafters", json={"name": "x", "target_model": "t"})
        assert response.status_code == 201
        assert [d["name"] for d in client.get("/drafters").json()] == ["x"]
