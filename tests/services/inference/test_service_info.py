"""Auth, /health, /drafter (random and checkpoint drafters), /metrics, settings."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from draftopd.models.checkpoint import random_drafter_for, save_drafter
from services.inference.main import create_app
from services.inference.settings import InferenceSettings, get_settings
from tests.services.inference.conftest import PROMPTS, Reference, metric, metric_samples

API_KEY = "s3cret-key"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def secured(make_settings: Callable[..., InferenceSettings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(api_key=API_KEY))) as test_client:
        yield test_client


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate", {"prompt": "hi", "max_new_tokens": 3}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 3}),
        ("/v1/chat/completions", CHAT),
    ],
)
def test_generation_needs_the_api_key(secured: TestClient, path: str, body: dict) -> None:
    missing = secured.post(path, json=body)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "Authorization" in missing.json()["detail"]
    wrong = secured.post(path, json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403
    basic = secured.post(path, json=body, headers={"Authorization": f"Basic {API_KEY}"})
    assert basic.status_code == 401
    ok = secured.post(path, json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200, ok.text


def test_auth_comes_before_body_validation(secured: TestClient) -> None:
    assert secured.post("/generate", json={"prompt": ""}).status_code == 401


def test_reads_stay_open_with_an_api_key(secured: TestClient) -> None:
    health = secured.get("/health")
    assert health.status_code == 200
    assert health.json()["drafter_version"] is None
    assert health.json()["default_method"] == "ngram"
    drafter = secured.get("/drafter").json()
    assert drafter["version"] is None and drafter["default_method"] == "ngram"
    assert secured.get("/metrics").status_code == 200
    assert secured.get("/v1/models").status_code == 200


def test_health(client: TestClient, tiny_target_dir: Path) -> None:
    assert client.get("/health").json() == {
        "status": "ok",
        "target": str(tiny_target_dir),
        "device": "cpu",
        "dtype": "float32",
        "drafter_version": "random:0",
        "default_method": "eagle3",
        "num_draft_tokens": 4,
        "registry": None,  # a local drafter: no registry alias followed
    }


def test_drafter_random(client: TestClient, tiny_target_dir: Path) -> None:
    info = client.get("/drafter").json()
    assert info == {
        "version": "random:0",
        "architecture": "eagle3",
        "target": str(tiny_target_dir),
        "path": None,
        "draft_vocab_size": 320,
        "num_draft_tokens": 4,
        "default_method": "eagle3",
        "provenance": {},
    }


@pytest.mark.parametrize("declared", ["opd-v7", None])
def test_drafter_checkpoint_version(
    tmp_path: Path,
    reference: Reference,
    make_settings: Callable[..., InferenceSettings],
    declared: str | None,
) -> None:
    provenance = {"version": declared, "step": 3} if declared else {"step": 3}
    checkpoint = save_drafter(
        random_drafter_for(reference.target, seed=3), tmp_path / "ckpt", provenance=provenance
    )
    digest = hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()
    expected_version = declared or f"sha256:{digest[:12]}"
    settings = make_settings(drafter=str(checkpoint), num_draft_tokens=3)
    with TestClient(create_app(settings)) as test_client:
        info = test_client.get("/drafter").json()
        assert info["version"] == expected_version
        assert info["path"] == str(checkpoint)
        assert info["provenance"] == provenance
        assert info["num_draft_tokens"] == 3
        data = test_client.post("/generate", json={"prompt": PROMPTS[5], "max_new_tokens": 12})
        assert data.json()["drafter_version"] == expected_version
        assert data.json()["speculative"]["num_draft_tokens"] == 3
        assert data.json()["token_ids"] == reference.greedy(reference.prompt_ids(PROMPTS[5]), 12)


def test_metrics_move_with_a_request(client: TestClient) -> None:
    before = metric_samples(client.get("/metrics").text)
    body = {"prompt": PROMPTS[0] * 2, "max_new_tokens": 20, "speculative": {"method": "eagle3"}}
    data = client.post("/generate", json=body).json()
    ngram = client.post("/generate", json={**body, "speculative": {"method": "ngram"}}).json()
    after = metric_samples(client.get("/metrics").text)

    def moved(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    for version, response in (("random:0", data), ("ngram", ngram)):
        spec = response["speculative"]
        assert moved("draftopd_spec_drafts_total", drafter_version=version) == spec["drafts"]
        assert (
            moved("draftopd_spec_draft_tokens_total", drafter_version=version)
            == spec["draft_tokens"]
        )
        assert (
            moved("draftopd_spec_accepted_tokens_total", drafter_version=version)
            == spec["accepted_tokens"]
        )
        assert moved("draftopd_spec_cycles_total", drafter_version=version) == spec["cycles"]
        assert moved("draftopd_generated_tokens_total", drafter_version=version) == 20
        for position, accepted in enumerate(spec["accepted_by_position"], start=1):
            assert (
                moved(
                    "draftopd_spec_accepted_by_position_total",
                    drafter_version=version,
                    position=str(position),
                )
                == accepted
            )
    assert data["speculative"]["drafts"] > 0 and ngram["speculative"]["draft_tokens"] > 0
    assert ngram["speculative"]["accepted_tokens"] > 0  # the repeated prompt gives lookups
    assert moved("draftopd_request_latency_seconds_count", endpoint="/generate") == 2
    assert moved("draftopd_requests_total", endpoint="/generate", outcome="finished") == 2
    assert metric(after, "draftopd_request_latency_seconds_sum", endpoint="/generate") > 0
    assert metric(after, "draftopd_requests_in_flight") == 0


def test_openapi_documents_every_endpoint(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/generate",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/health",
        "/metrics",
        "/drafter",
    ):
        assert path in paths


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRAFTOPD_INFERENCE_TARGET", "/models/x")
    monkeypatch.setenv("DRAFTOPD_INFERENCE_DRAFTER", "random:3")
    monkeypatch.setenv("DRAFTOPD_INFERENCE_MAX_CONCURRENCY", "2")
    monkeypatch.setenv("DRAFTOPD_INFERENCE_API_KEY", "k")
    settings = InferenceSettings()
    assert settings.target == "/models/x"
    assert settings.has_drafter_source and settings.random_architecture == "eagle3"
    assert settings.default_method_for("eagle3") == "eagle3"
    assert settings.max_concurrency == 2
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "k"
    assert "k" not in repr(settings.api_key)
    monkeypatch.delenv("DRAFTOPD_INFERENCE_DRAFTER")
    assert not InferenceSettings().has_drafter_source
    assert InferenceSettings().default_method_for(None) == "ngram"
    get_settings.cache_clear()
    try:
        assert get_settings() is get_settings()
        assert get_settings().target == "/models/x"
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize(
    "overrides",
    [{"drafter": "random:x"}, {"default_method": "eagle3"}, {"num_draft_tokens": 0}],
)
def test_bad_settings_are_refused(overrides: dict) -> None:
    with pytest.raises(ValueError):
        InferenceSettings(**overrides)
