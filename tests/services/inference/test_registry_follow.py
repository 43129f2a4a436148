"""The inference service following a registry alias: a real registry (SQLite, uvicorn on a free
port), the real Redis for alias events, the tiny target. Swaps, the start without an alias,
polling without Redis, and bad artifacts refused while serving goes on with the old version."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from draftopd.models.checkpoint import random_drafter_for, save_drafter
from draftopd.models.target import load_target
from draftopd.models.tiny import build_tiny_target
from services.inference.main import create_app
from services.inference.settings import InferenceSettings
from tests.services.inference.conftest import PROMPTS, Reference, metric, metric_samples
from tests.services.inference.registry_setup import LiveRegistry, wait_for

MAX_NEW = 12


def _generate(client: TestClient, reference: Reference, prompt: str = PROMPTS[0]) -> str:
    """One greedy eagle3 request; checks it equals plain greedy; returns the drafter version."""
    body = {"prompt": prompt, "max_new_tokens": MAX_NEW, "speculative": {"method": "eagle3"}}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["token_ids"] == reference.greedy(reference.prompt_ids(prompt), MAX_NEW)
    version: str = data["drafter_version"]
    return version


def _served(client: TestClient) -> str | None:
    version: str | None = client.get("/drafter").json()["version"]
    return version


def test_follows_the_alias_with_events(
    registry: LiveRegistry,
    follow: Callable[..., InferenceSettings],
    reference: Reference,
    tmp_path: Path,
) -> None:
    name = registry.new_drafter()
    first = registry.upload_random(name, reference.target, seed=1, workdir=tmp_path, step=10)
    second = registry.upload_random(name, reference.target, seed=2, workdir=tmp_path)
    registry.client.put_alias(name, "production", 1)
    with TestClient(create_app(follow(name))) as client:
        info = client.get("/drafter").json()
        assert info["version"] == f"{name}@1" and info["provenance"] == {"step": 10}
        assert Path(info["path"]).name == f"v1-{str(first['sha256'])[:16]}"
        assert _generate(client, reference) == f"{name}@1"

        registry.client.put_alias(name, "production", 2)
        wait_for(lambda: _served(client) == f"{name}@2", timeout=20, what="the swap to v2")
        assert _generate(client, reference, PROMPTS[1]) == f"{name}@2"
        health = client.get("/health").json()
        assert health["drafter_version"] == f"{name}@2"
        assert health["default_method"] == "eagle3"
        follow_state = health["registry"]
        assert follow_state["drafter"] == name and follow_state["alias"] == "production"
        assert follow_state["alias_version"] == 2 and follow_state["in_sync"] is True
        assert follow_state["events"] is True and follow_state["swaps"] == 2
        assert follow_state["problem"] is None and follow_state["last_swap_error"] is None
        samples = metric_samples(client.get("/metrics").text)
        assert metric(samples, "draftopd_drafter_swaps_total", outcome="swapped") == 2
        assert metric(samples, "draftopd_spec_cycles_total", drafter_version=f"{name}@2") > 0
    assert client.app.state.follower.running is False  # type: ignore[attr-defined]
    assert second["version"] == 2


def test_starts_without_a_drafter_until_the_alias_exists(
    registry: LiveRegistry,
    follow: Callable[..., InferenceSettings],
    reference: Reference,
    tmp_path: Path,
) -> None:
    name = registry.new_drafter()
    with TestClient(create_app(follow(name))) as client:
        health = client.get("/health").json()
        assert health["drafter_version"] is None and health["default_method"] == "ngram"
        assert health["registry"]["in_sync"] is False
        assert health["registry"]["alias_version"] is None
        assert "does not exist (yet)" in health["registry"]["problem"]
        refused = client.post(
            "/generate", json={"prompt": "hi", "speculative": {"method": "eagle3"}}
        )
        assert refused.status_code == 409
        assert f"registry alias {name}/production" in refused.json()["detail"]
        default = client.post("/generate", json={"prompt": "hi", "max_new_tokens": 4}).json()
        assert default["speculative"]["method"] == "ngram"

        registry.upload_random(name, reference.target, seed=1, workdir=tmp_path)
        registry.client.put_alias(name, "production", 1)
        wait_for(lambda: _served(client) == f"{name}@1", timeout=20, what="the first load")
        assert client.get("/health").json()["default_method"] == "eagle3"
        assert _generate(client, reference) == f"{name}@1"


@pytest.mark.parametrize(
    "events_url", [None, "redis://127.0.0.1:1/0"], ids=["no-redis", "redis-down"]
)
def test_polling_alone_follows_the_alias(
    events_url: str | None,
    registry: LiveRegistry,
    follow: Callable[..., InferenceSettings],
    reference: Reference,
    tmp_path: Path,
) -> None:
    name = registry.new_drafter()
    for seed in (1, 2):
        registry.upload_random(name, reference.target, seed=seed, workdir=tmp_path)
    registry.client.put_alias(name, "production", 1)
    settings = follow(name, redis_url=events_url, alias_poll_s=0.2)
    with TestClient(create_app(settings)) as client:
        assert _served(client) == f"{name}@1"
        assert client.get("/health").json()["registry"]["events"] is False
        registry.client.put_alias(name, "production", 2)
        wait_for(lambda: _served(client) == f"{name}@2", timeout=20, what="the polled swap")
        assert _generate(client, reference) == f"{name}@2"


def test_an_unreachable_registry_leaves_the_service_up(
    make_settings: Callable[..., InferenceSettings], tmp_path: Path
) -> None:
    settings = make_settings(
        registry_url="http://127.0.0.1:1",
        drafter_name="d",
        alias_poll_s=0.1,
        artifact_cache_dir=tmp_path / "cache",
    )
    with TestClient(create_app(settings)) as client:
        _wait_for_polls_failing(client)
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["drafter_version"] is None
        assert health["registry"]["problem"].startswith("registry unreachable")
        assert health["registry"]["last_checked_at"] is None
        response = client.post("/generate", json={"prompt": "hi", "max_new_tokens": 4})
        assert response.status_code == 200
        assert response.json()["speculative"]["method"] == "ngram"


def _wait_for_polls_failing(client: TestClient) -> None:
    """Let the follower poll (and fail) a few times: it must keep running."""
    time.sleep(0.5)
    assert client.app.state.follower.running  # type: ignore[attr-defined]


def _other_target_version(registry: LiveRegistry, name: str, workdir: Path) -> dict[str, Any]:
    """Upload a drafter built for a different tiny target (other vocab and hidden size)."""
    other = load_target(str(build_tiny_target(workdir / "other", vocab_size=288, hidden_size=32)))
    return registry.upload_random(name, other, seed=5, workdir=workdir)


def _unloadable_version(
    registry: LiveRegistry, name: str, reference: Reference, workdir: Path
) -> dict[str, Any]:
    """Upload a checkpoint whose weights do not fit its config (a valid archive, unloadable)."""
    drafter = random_drafter_for(reference.target, seed=6)
    directory = save_drafter(drafter, workdir / "unloadable")
    meta = json.loads((directory / "config.json").read_text())
    meta["config"]["draft_vocab_size"] -= 10
    (directory / "config.json").write_text(json.dumps(meta))
    return registry.client.upload_version(name, directory)


@pytest.mark.parametrize("kind", ["tampered", "other_target", "unloadable"])
def test_a_bad_version_is_refused_and_serving_goes_on(
    kind: str,
    registry: LiveRegistry,
    follow: Callable[..., InferenceSettings],
    reference: Reference,
    tmp_path: Path,
) -> None:
    name = registry.new_drafter()
    registry.upload_random(name, reference.target, seed=1, workdir=tmp_path)
    if kind == "tampered":
        bad = registry.upload_random(name, reference.target, seed=2, workdir=tmp_path)
        registry.corrupt_stored(str(bad["sha256"]))
        expected = "refused .*@2: refusing .* v2: its sha256 is"
    elif kind == "other_target":
        bad = _other_target_version(registry, name, tmp_path)
        expected = "refused .*@2: drafter built for hidden=32, vocab=288"
    else:
        bad = _unloadable_version(registry, name, reference, tmp_path)
        expected = "refused .*@2: .*size mismatch"
    registry.client.put_alias(name, "production", 1)
    # fast polling: a refused version must not be tried again at every poll
    with TestClient(create_app(follow(name, alias_poll_s=0.1))) as client:
        assert _served(client) == f"{name}@1"
        registry.client.put_alias(name, "production", 2)
        wait_for(
            lambda: client.get("/health").json()["registry"]["last_swap_error"] is not None,
            timeout=20,
            what="the refusal",
        )
        for prompt in PROMPTS[:3]:  # no failed request, the old version serves them
            assert _generate(client, reference, prompt) == f"{name}@1"
        _wait_for_polls(client, 5)
        health = client.get("/health").json()
        _check_refusal(health, name, bad, expected)
        samples = metric_samples(client.get("/metrics").text)
        assert metric(samples, "draftopd_drafter_swaps_total", outcome="refused") == 1

        registry.client.put_alias(name, "production", 2)  # set again: tried once more
        wait_for(
            lambda: (
                metric(
                    metric_samples(client.get("/metrics").text),
                    "draftopd_drafter_swaps_total",
                    outcome="refused",
                )
                == 2
            ),
            timeout=20,
            what="the second refusal",
        )
        registry.client.put_alias(name, "production", 1)  # back to a good version
        wait_for(lambda: client.get("/health").json()["registry"]["in_sync"], timeout=20)
        health = client.get("/health").json()
        assert health["registry"]["problem"] is None and health["drafter_version"] == f"{name}@1"
        assert health["registry"]["last_swap_error"]["version"] == 2  # kept as history
    cached = list((tmp_path / "inference-cache" / name).glob("v2-*"))
    assert cached == [] if kind == "tampered" else len(cached) == 1  # only verified bytes kept


def _wait_for_polls(client: TestClient, count: int) -> None:
    """Wait until the follower has read the alias ``count`` more times."""
    seen: set[str] = set()

    def polled() -> bool:
        seen.add(client.get("/health").json()["registry"]["last_checked_at"])
        return len(seen) > count

    wait_for(polled, timeout=20, what=f"{count} alias reads")


def _check_refusal(health: dict[str, Any], name: str, bad: dict[str, Any], pattern: str) -> None:
    state = health["registry"]
    assert health["status"] == "ok" and health["drafter_version"] == f"{name}@1"
    assert state["alias_version"] == 2 and state["in_sync"] is False
    error = state["last_swap_error"]
    assert error["version"] == 2 and error["sha256"] == bad["sha256"]
    assert error["refused"] is True
    assert re.search(pattern, error["reason"], re.DOTALL), error["reason"]
    assert f"serving {name}@1" in state["problem"]


def test_registry_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "REGISTRY_URL": "http://registry:8003",
        "REGISTRY_TOKEN": "s3cret-registry-token",
        "DRAFTER_NAME": "smollm2-eagle3",
        "ALIAS_POLL_S": "2.5",
        "REDIS_URL": "redis://redis:6379/0",
        "ARTIFACT_CACHE_DIR": "/var/cache/drafters",
    }
    for key, value in env.items():
        monkeypatch.setenv(f"DRAFTOPD_INFERENCE_{key}", value)
    settings = InferenceSettings()
    assert settings.follows_registry and settings.drafter_name == "smollm2-eagle3"
    assert settings.drafter_alias == "production" and settings.alias_poll_s == 2.5
    assert settings.registry_token is not None and "s3cret" not in repr(settings)
    assert settings.artifact_cache_dir == Path("/var/cache/drafters")
    assert settings.default_method_for("eagle3") == "eagle3"  # the loaded version's family
    assert settings.default_method_for("dflash") == "dflash"
    assert settings.default_method_for(None) == "ngram"  # until a version is loaded
    assert InferenceSettings(default_method="eagle3").default_method_for(None) == "eagle3"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"registry_url": "http://r", "drafter_name": "d", "drafter": "random:0"}, "not both"),
        ({"registry_url": "http://r"}, "needs drafter_name"),
        ({"registry_url": "http://r", "drafter_name": "d", "alias_poll_s": 0}, "greater than 0"),
        ({"default_method": "eagle3"}, "set drafter or registry_url"),
    ],
)
def test_bad_registry_settings_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InferenceSettings(**overrides)
