"""The inference side of the canary (issue #17): a real registry (SQLite, uvicorn in a thread),
the real Redis for alias events, the tiny target. The candidate alias's traffic share routes
requests to its version, every output stays plain greedy, the share follows the alias (0 ends
it), /metrics carries live tau per version, and live reports reach the registry."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from draftopd.speculative.engine import DecodeStats
from services.inference.live import LiveCounters, run_counts
from services.inference.main import create_app
from services.inference.settings import InferenceSettings
from tests.services.inference.conftest import PROMPTS, Reference, metric, metric_samples
from tests.services.inference.registry_setup import TOKEN, LiveRegistry, wait_for

MAX_NEW = 12


@pytest.fixture
def canary_settings(follow: Callable[..., InferenceSettings]) -> Callable[..., InferenceSettings]:
    """Following production and the candidate, reporting live metrics every 0.2 s."""

    def make(name: str, **overrides: Any) -> InferenceSettings:
        return follow(name, registry_token=TOKEN, live_report_s=0.2, **overrides)

    return make


def _versions(client: TestClient, reference: Reference, count: int) -> list[str]:
    served = []
    for turn in range(count):
        prompt = PROMPTS[turn % len(PROMPTS)]
        response = client.post("/generate", json={"prompt": prompt, "max_new_tokens": MAX_NEW})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["token_ids"] == reference.greedy(reference.prompt_ids(prompt), MAX_NEW)
        served.append(body["drafter_version"])
    return served


def test_the_candidate_serves_its_share_and_the_share_follows_the_alias(
    registry: LiveRegistry,
    canary_settings: Callable[..., InferenceSettings],
    reference: Reference,
    tmp_path: Path,
) -> None:
    name = registry.new_drafter()
    for seed in (1, 2):
        registry.upload_random(name, reference.target, seed=seed, workdir=tmp_path)
    registry.client.put_alias(name, "production", 1)
    registry.client.put_alias(name, "candidate", 2, traffic=0.5)
    with TestClient(create_app(canary_settings(name))) as client:
        served = _versions(client, reference, 40)
        assert {f"{name}@1", f"{name}@2"} == set(served)
        share = served.count(f"{name}@2") / len(served)
        assert 0.2 < share < 0.8  # a 50% coin over 40 requests (fails with p < 0.01)
        metrics = metric_samples(client.get("/metrics").text)
        assert metric(metrics, "draftopd_canary_traffic_share") == 0.5
        for version in (1, 2):
            tau = metric(metrics, "draftopd_live_tau", drafter_version=f"{name}@{version}")
            assert tau >= 1.0

        registry.client.put_alias(name, "candidate", 2, traffic=1.0)
        wait_for(
            lambda: client.app.state.service.canary.traffic == 1.0, timeout=10, what="share 1.0"
        )
        assert set(_versions(client, reference, 6)) == {f"{name}@2"}

        registry.client.put_alias(name, "candidate", 2, traffic=0.0)
        wait_for(lambda: client.app.state.service.canary is None, timeout=10, what="the canary end")
        assert set(_versions(client, reference, 6)) == {f"{name}@1"}
        final = metric_samples(client.get("/metrics").text)
        assert metric(final, "draftopd_canary_traffic_share") == 0.0

        def reported() -> bool:
            return sum(row["requests"] for row in registry.client.list_live(name)) >= 52

        wait_for(reported, timeout=10, what="the live reports")
    live = {row["version"]: row for row in registry.client.list_live(name)}
    assert live[1]["requests"] + live[2]["requests"] == 52  # every request counted once
    assert live[1]["tau"] >= 1.0 and live[1]["tokens_per_s"] > 0


def test_no_candidate_alias_is_no_canary_and_no_problem(
    registry: LiveRegistry,
    canary_settings: Callable[..., InferenceSettings],
    reference: Reference,
    tmp_path: Path,
) -> None:
    name = registry.new_drafter()
    registry.upload_random(name, reference.target, seed=1, workdir=tmp_path)
    registry.client.put_alias(name, "production", 1)
    with TestClient(create_app(canary_settings(name))) as client:
        assert set(_versions(client, reference, 3)) == {f"{name}@1"}
        health = client.get("/health").json()
        assert health["registry"]["in_sync"] is True and health["registry"]["problem"] is None
        assert client.app.state.canary.status().problem is None


def test_live_counters_keep_the_squares_of_accepted_drafts() -> None:
    stats = DecodeStats()
    for proposed, accepted in ((4, 0), (4, 3), (4, 4), (2, 1), (0, 0)):
        stats.add(proposed, accepted)
    tally = run_counts(stats, generated_tokens=13)
    assert (tally.cycles, tally.accepted) == (5, 8)
    assert tally.accepted_sq == 0 + 9 + 16 + 1 + 0
    counters = LiveCounters("d")
    counters.add("d@3", stats, 13)
    counters.add("d@3", stats, 13)
    counters.add("ngram", stats, 13)  # not a registry version: not reported
    counters.add("other@3", stats, 13)
    taken = counters.take()
    assert list(taken) == [3] and taken[3].requests == 2 and taken[3].accepted_sq == 52
    assert counters.take() == {}
