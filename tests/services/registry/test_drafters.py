"""Drafters, versions, metrics and aliases through HTTP, on SQLite and Postgres."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi.testclient import TestClient

from services.registry.main import create_app
from services.registry.settings import RegistrySettings
from tests.services.registry.helpers import AUTH, DRAFTER, checkpoint_tar, create_drafter, upload


def test_health_reports_backend_and_revision(client: TestClient, db_url: str) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["database"] == ("sqlite" if db_url.startswith("sqlite") else "postgresql")
    assert body["schema_revision"] == "0003"


def test_create_get_and_list_drafters(client: TestClient) -> None:
    created = create_drafter(client, description="EAGLE-3 for SmolLM2")
    assert created["name"] == DRAFTER
    assert created["architecture"] == "eagle3"
    assert created["description"] == "EAGLE-3 for SmolLM2"
    assert created["latest_version"] is None
    assert created["aliases"] == {}
    assert created["created_at"].endswith("Z")
    create_drafter(client, "another", architecture="dflash")

    listed = client.get("/drafters").json()
    assert [d["name"] for d in listed] == ["another", DRAFTER]
    assert listed[0]["architecture"] == "dflash"
    assert client.get(f"/drafters/{DRAFTER}").json() == created


def test_duplicate_drafter_is_409(client: TestClient) -> None:
    create_drafter(client)
    response = client.post(
        "/drafters", json={"name": DRAFTER, "target_model": "other"}, headers=AUTH
    )
    assert response.status_code == 409
    assert response.json()["detail"] == f"drafter {DRAFTER!r} already exists"
    assert len(client.get("/drafters").json()) == 1


def test_invalid_drafter_fields_are_422_naming_the_field(client: TestClient) -> None:
    cases = {
        "name": {"name": "../etc", "target_model": "t"},
        "architecture": {"name": "ok", "target_model": "t", "architecture": "medusa"},
        "target_model": {"name": "ok"},
        "colour": {"name": "ok", "target_model": "t", "colour": "red"},
    }
    for field, body in cases.items():
        response = client.post("/drafters", json=body, headers=AUTH)
        assert response.status_code == 422, field
        assert response.json()["detail"][0]["loc"] == ["body", field]


def test_unknown_drafter_version_and_alias_are_404_with_messages(client: TestClient) -> None:
    assert client.get("/drafters/nope").json() == {"detail": "drafter 'nope' not found"}
    assert client.get("/drafters/nope").status_code == 404
    create_drafter(client)
    response = client.get(f"/drafters/{DRAFTER}/versions/3")
    assert response.status_code == 404
    assert response.json()["detail"] == f"drafter {DRAFTER!r} has no version 3"
    response = client.get(f"/drafters/{DRAFTER}/versions/3/artifact")
    assert response.status_code == 404
    response = client.get(f"/drafters/{DRAFTER}/aliases/production")
    assert response.status_code == 404
    assert response.json()["detail"] == f"drafter {DRAFTER!r} has no alias 'production'"
    response = client.put(
        f"/drafters/{DRAFTER}/aliases/production", json={"version": 1}, headers=AUTH
    )
    assert response.status_code == 404
    assert response.json()["detail"] == f"drafter {DRAFTER!r} has no version 1"


def test_versions_are_numbered_per_drafter(client: TestClient) -> None:
    create_drafter(client)
    create_drafter(client, "other")
    numbers = [upload(client, DRAFTER, checkpoint_tar(seed=i)).json()["version"] for i in range(3)]
    assert numbers == [1, 2, 3]
    assert upload(client, "other", checkpoint_tar(seed=9)).json()["version"] == 1

    listed = client.get(f"/drafters/{DRAFTER}/versions").json()
    assert [v["version"] for v in listed] == [1, 2, 3]
    expected = [hashlib.sha256(checkpoint_tar(seed=i)).hexdigest() for i in range(3)]
    assert [v["sha256"] for v in listed] == expected
    assert client.get(f"/drafters/{DRAFTER}").json()["latest_version"] == 3
    assert client.get("/drafters/other").json()["latest_version"] == 1


def test_version_records_parent_step_config_and_url(client: TestClient) -> None:
    create_drafter(client)
    upload(client, DRAFTER, checkpoint_tar(seed=0))
    response = upload(client, DRAFTER, checkpoint_tar(seed=1), parent_version=1, step=40)
    assert response.status_code == 201, response.text
    version = response.json()
    assert version["parent_version"] == 1
    assert version["step"] == 40
    assert version["job_id"] is None
    assert version["config"]["architecture"] == "eagle3"
    assert version["config"]["config"] == {"hidden_size": 8}
    assert version["size_bytes"] == len(checkpoint_tar(seed=1))
    assert version["artifact_url"] == f"http://testserver/drafters/{DRAFTER}/versions/2/artifact"
    assert client.get(f"/drafters/{DRAFTER}/versions/2").json() == version


def test_unknown_parent_version_is_404_and_stores_nothing(client: TestClient) -> None:
    create_drafter(client)
    response = upload(client, DRAFTER, checkpoint_tar(), parent_version=5)
    assert response.status_code == 404
    assert response.json()["detail"] == f"drafter {DRAFTER!r} has no version 5"
    assert client.get(f"/drafters/{DRAFTER}/versions").json() == []


def test_metrics_round_trip(client: TestClient) -> None:
    create_drafter(client)
    upload(client, DRAFTER, checkpoint_tar())
    url = f"/drafters/{DRAFTER}/versions/1/metrics"
    first = {"benchmark": "mt-bench", "temperature": 0.0, "tau": 1.42, "speedup": 1.1}
    second = {
        "benchmark": "heldout",
        "tau": 1.9,
        "tokens_per_s": 812.5,
        "hardware": "H100",
        "extra": {"num_prompts": 80},
    }
    for body in (first, second):
        response = client.post(url, json=body, headers=AUTH)
        assert response.status_code == 201, response.text
    listed = client.get(url).json()
    assert [m["benchmark"] for m in listed] == ["mt-bench", "heldout"]
    assert listed[0]["tau"] == 1.42 and listed[0]["speedup"] == 1.1
    assert listed[0]["tokens_per_s"] is None and listed[0]["hardware"] == ""
    assert listed[1]["extra"] == {"num_prompts": 80} and listed[1]["hardware"] == "H100"
    assert listed[1]["temperature"] == 0.0
    assert {m["version"] for m in listed} == {1} and {m["drafter"] for m in listed} == {DRAFTER}
    response = client.post(url, json={"benchmark": "x", "tau": -1}, headers=AUTH)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "tau"]
    assert client.get(f"/drafters/{DRAFTER}/versions/2/metrics").status_code == 404


def test_aliases_create_move_and_list(client: TestClient) -> None:
    create_drafter(client)
    shas = [upload(client, DRAFTER, checkpoint_tar(seed=i)).json()["sha256"] for i in range(2)]
    url = f"/drafters/{DRAFTER}/aliases"
    first = client.put(f"{url}/production", json={"version": 1}, headers=AUTH).json()
    assert first["version"] == 1 and first["sha256"] == shas[0]
    assert first["artifact_url"].endswith(f"/drafters/{DRAFTER}/versions/1/artifact")
    client.put(f"{url}/candidate", json={"version": 2}, headers=AUTH)
    moved = client.put(f"{url}/production", json={"version": 2}, headers=AUTH).json()
    assert moved["version"] == 2 and moved["sha256"] == shas[1]
    assert moved["updated_at"] >= first["updated_at"]
    assert client.get(f"{url}/production").json() == moved
    assert [(a["alias"], a["version"]) for a in client.get(url).json()] == [
        ("candidate", 2),
        ("production", 2),
    ]
    assert client.get(f"/drafters/{DRAFTER}").json()["aliases"] == {"candidate": 2, "production": 2}
    events = client.get(f"/drafters/{DRAFTER}/events").json()  # newest first, every move
    assert [(e["alias"], e["from_version"], e["to_version"], e["cause"]) for e in events] == [
        ("production", 1, 2, "api"),
        ("candidate", None, 2, "api"),
        ("production", None, 1, "api"),
    ]
    only = client.get(f"/drafters/{DRAFTER}/events", params={"alias": "candidate", "limit": 5})
    assert [e["to_version"] for e in only.json()] == [2]
    assert client.get(f"/drafters/{DRAFTER}/events", params={"limit": 0}).status_code == 422
    assert client.get("/drafters/nobody/events").status_code == 404


def test_alias_validation(client: TestClient) -> None:
    create_drafter(client)
    upload(client, DRAFTER, checkpoint_tar())
    url = f"/drafters/{DRAFTER}/aliases"
    response = client.put(f"{url}/-bad", json={"version": 1}, headers=AUTH)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["path", "alias"]
    response = client.put(f"{url}/production", json={"version": 0}, headers=AUTH)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "version"]


def test_openapi_documents_every_endpoint(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    expected = {
        "/health": {"get"},
        "/drafters": {"get", "post"},
        "/drafters/{name}": {"get"},
        "/drafters/{name}/versions": {"get", "post"},
        "/drafters/{name}/versions/{version}": {"get"},
        "/drafters/{name}/versions/{version}/artifact": {"get"},
        "/drafters/{name}/versions/{version}/metrics": {"get", "post"},
        "/drafters/{name}/aliases": {"get"},
        "/drafters/{name}/aliases/{alias}": {"get", "put"},
        "/drafters/{name}/events": {"get"},
        "/drafters/{name}/live-metrics": {"get"},
        "/drafters/{name}/versions/{version}/live-metrics": {"get", "post"},
        "/train-jobs": {"get", "post"},
        "/train-jobs/{job_id}": {"get", "patch"},
        "/train-jobs/{job_id}/cancel": {"post"},
    }
    assert {path: set(ops) for path, ops in paths.items()} == expected
    version_get = paths["/drafters/{name}/versions/{version}"]["get"]
    schema = version_get["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/VersionOut"}


def test_out_of_range_numbers_are_4xx_not_500(client: TestClient) -> None:
    create_drafter(client)
    upload(client, DRAFTER, checkpoint_tar())
    huge = 10**20
    for path in (f"versions/{huge}", f"versions/{2**40}/metrics", "versions/0/artifact"):
        response = client.get(f"/drafters/{DRAFTER}/{path}")
        assert response.status_code == 422, path
        assert response.json()["detail"][0]["loc"] == ["path", "version"]
    response = upload(client, DRAFTER, checkpoint_tar(seed=1), step=2**40)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "step"]
    alias = client.put(f"/drafters/{DRAFTER}/aliases/a", json={"version": huge}, headers=AUTH)
    assert alias.status_code == 422
    url = f"/drafters/{DRAFTER}/versions/1/metrics"
    nan = client.post(
        url,
        content='{"benchmark": "b", "tau": NaN}',
        headers={**AUTH, "content-type": "application/json"},
    )
    assert nan.status_code == 422
    assert nan.json()["detail"][0]["loc"] == ["body", "tau"]
    assert nan.json()["detail"][0]["input"] == "nan"
    nan_extra = client.post(
        url,
        content='{"benchmark": "b", "tau": 1.0, "extra": {"x": Infinity}}',
        headers={**AUTH, "content-type": "application/json"},
    )
    assert nan_extra.status_code == 422
    assert nan_extra.json()["detail"][0]["loc"] == ["body", "extra"]
    assert client.get(url).json() == []


def test_unreachable_database_is_503(redis_url: str, tmp_path: Path) -> None:
    settings = RegistrySettings(
        database_url="postgresql://postgres@127.0.0.1:5432/draftopd_registry_no_such_db",
        artifact_dir=tmp_path,
        redis_url=redis_url,
    )
    with TestClient(create_app(settings)) as client:
        for path in ("/health", "/drafters"):
            response = client.get(path)
            assert response.status_code == 503
            assert response.json() == {
                "detail": "the registry database is unavailable (OperationalError)"
            }


def test_health_of_an_unmigrated_database(redis_url: str, tmp_path: Path) -> None:
    settings = RegistrySettings(
        database_url=f"sqlite:///{tmp_path / 'blank.db'}",
        artifact_dir=tmp_path,
        redis_url=redis_url,
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/health").json()["schema_revision"] is None
