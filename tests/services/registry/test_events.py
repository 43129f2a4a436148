"""Alias changes are published on the Redis channel ``draftopd:aliases`` (real Redis)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
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

UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"


def test_alias_put_publishes_the_change(client: TestClient, subscriber: Any) -> None:
    create_drafter(client)
    shas = [upload(client, DRAFTER, checkpoint_tar(seed=i)).json()["sha256"] for i in range(2)]
    url = f"/drafters/{DRAFTER}/aliases/production"
    first = client.put(url, json={"version": 1}, headers=AUTH).json()
    second = client.put(url, json={"version": 2}, headers=AUTH).json()

    events = next_events(subscriber, 2)
    assert events == [first, second]
    assert [e["version"] for e in events] == [1, 2]
    assert [e["sha256"] for e in events] == shas
    assert events[1]["alias"] == "production"
    assert events[1]["artifact_url"] == f"http://testserver/drafters/{DRAFTER}/versions/2/artifact"


def test_public_url_is_used_for_artifact_links(
    make_settings: Callable[..., RegistrySettings], subscriber: Any
) -> None:
    settings = make_settings(public_url="https://registry.example.org/")
    with TestClient(create_app(settings)) as client:
        create_drafter(client)
        upload(client, DRAFTER, checkpoint_tar())
        client.put(f"/drafters/{DRAFTER}/aliases/candidate", json={"version": 1}, headers=AUTH)
    (event,) = next_events(subscriber, 1)
    assert event["artifact_url"] == (
        f"https://registry.example.org/drafters/{DRAFTER}/versions/1/artifact"
    )


def test_alias_put_succeeds_when_redis_is_down(
    make_settings: Callable[..., RegistrySettings], caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(redis_url=UNREACHABLE_REDIS)
    with TestClient(create_app(settings)) as client:
        create_drafter(client)
        upload(client, DRAFTER, checkpoint_tar())
        with caplog.at_level(logging.WARNING, logger="services.registry.events"):
            response = client.put(
                f"/drafters/{DRAFTER}/aliases/production", json={"version": 1}, headers=AUTH
            )
        assert response.status_code == 200
        assert client.get(f"/drafters/{DRAFTER}/aliases/production").json()["version"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert (
        f"alias {DRAFTER}/production -> v1 saved, but the event was not published" in (warnings[0])
    )
