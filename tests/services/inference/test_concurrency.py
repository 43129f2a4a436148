"""Concurrent requests on a real server, and a client that disconnects mid-stream."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.services.inference.conftest import (
    PROMPTS,
    LiveServer,
    Reference,
    metric,
    metric_samples,
)

METHODS = ["eagle3", "ngram", "none"]


@pytest.fixture(scope="module")
def http(live_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.base_url, timeout=60) as client:
        yield client


def test_six_concurrent_greedy_requests(live_server: LiveServer, reference: Reference) -> None:
    jobs = [(PROMPTS[i], METHODS[i % 3], 16 + 4 * i) for i in range(6)]

    def call(job: tuple[str, str, int]) -> dict:
        prompt, method, max_new = job
        body = {"prompt": prompt, "max_new_tokens": max_new, "speculative": {"method": method}}
        with httpx.Client(base_url=live_server.base_url, timeout=120) as client:
            response = client.post("/generate", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(call, jobs))
    for (prompt, method, max_new), data in zip(jobs, results, strict=True):
        assert data["speculative"]["method"] == method
        assert data["token_ids"] == reference.greedy(reference.prompt_ids(prompt), max_new)


def test_serialized_with_concurrency_one(
    make_settings: Callable[..., object], reference: Reference
) -> None:
    """max_concurrency=1 (the default): simultaneous requests queue and all come out right."""
    from services.inference.main import create_app

    with TestClient(create_app(make_settings(drafter="random:0"))) as client:  # type: ignore[arg-type]

        def call(i: int) -> dict:
            body = {"prompt": PROMPTS[i], "max_new_tokens": 12}
            return client.post("/generate", json=body).json()

        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(call, range(4)))
    for i, data in enumerate(results):
        assert data["token_ids"] == reference.greedy(reference.prompt_ids(PROMPTS[i]), 12)


def _wait_for(condition: Callable[[], bool], seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_disconnect_stops_the_generation(http: httpx.Client, live_server: LiveServer) -> None:
    limit = 2000
    body = {
        "prompt": PROMPTS[0],
        "max_new_tokens": limit,
        "ignore_eos": True,
        "stream": True,
        "speculative": {"method": "none"},
    }
    before = metric_samples(http.get("/metrics").text)

    def cancelled() -> float:
        samples = metric_samples(http.get("/metrics").text)
        return metric(
            samples, "draftopd_requests_total", endpoint="/generate", outcome="cancelled"
        ) - metric(before, "draftopd_requests_total", endpoint="/generate", outcome="cancelled")

    with (
        httpx.Client(base_url=live_server.base_url, timeout=60) as client,
        client.stream("POST", "/generate", json=body) as response,
    ):
        assert response.status_code == 200
        received = 0
        for line in response.iter_lines():
            received += line.startswith("data: ")
            if received == 3:
                break
    # the connection is closed: the server notices between cycles and stops decoding
    assert _wait_for(lambda: cancelled() == 1), "the server did not stop the generation"
    after = metric_samples(http.get("/metrics").text)
    generated = metric(after, "draftopd_generated_tokens_total", drafter_version="none") - metric(
        before, "draftopd_generated_tokens_total", drafter_version="none"
    )
    assert 3 <= generated < limit, generated
    print(f"generated {generated} of {limit} tokens before the disconnect was noticed")
    assert metric(after, "draftopd_requests_in_flight") == 0
    # the slot is free again: a new request completes
    done = http.post("/generate", json={"prompt": "hi", "max_new_tokens": 4})
    assert done.status_code == 200 and len(done.json()["token_ids"]) >= 1


def test_disconnect_while_waiting_for_a_json_response(
    http: httpx.Client, live_server: LiveServer
) -> None:
    body = {
        "prompt": PROMPTS[1],
        "max_tokens": 2000,
        "ignore_eos": True,
        "speculative": {"method": "none"},
    }
    before = metric_samples(http.get("/metrics").text)

    def moved(name: str, **labels: str) -> float:
        samples = metric_samples(http.get("/metrics").text)
        return metric(samples, name, **labels) - metric(before, name, **labels)

    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{live_server.base_url}/v1/completions", json=body, timeout=0.3)
    assert _wait_for(
        lambda: (
            moved("draftopd_requests_total", endpoint="/v1/completions", outcome="cancelled") == 1
        )
    ), "the server did not stop the generation"
    assert moved("draftopd_generated_tokens_total", drafter_version="none") < 2000
