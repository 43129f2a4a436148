"""Bounded admission: with every slot busy and the wait queue full, a request gets 429 with
Retry-After at once; places are freed by finished, cancelled and never-started streams alike."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from services.inference.main import create_app
from services.inference.settings import InferenceSettings
from tests.servers import uvicorn_in_thread
from tests.services.inference.conftest import metric_samples

LONG = {"prompt": "The quick brown fox", "max_new_tokens": 400, "ignore_eos": True,
        "stream": True, "speculative": {"method": "none"}}  # fmt: skip
SHORT = {"prompt": "hi", "max_new_tokens": 2}


@pytest.fixture
def server(
    make_settings: Callable[..., InferenceSettings],
) -> Iterator[tuple[str, threading.Event]]:
    """A live server whose decode cycles wait for ``gate``: the test decides when the running
    request may proceed, so the slot is busy for as long as the test needs."""
    settings = make_settings(max_concurrency=1, max_queued=1, retry_after_s=3)
    app = create_app(settings)
    gate = threading.Event()
    with uvicorn_in_thread(app, name="admission-uvicorn") as (url, _):
        service = app.state.service
        next_cycle = service._next_cycle

        def gated(cycles: Any) -> Any:
            gate.wait(timeout=60)
            return next_cycle(cycles)

        service._next_cycle = gated
        yield url, gate
        gate.set()


def _metric(http: httpx.Client, name: str) -> float:
    return metric_samples(http.get("/metrics").text).get((name, frozenset()), 0.0)


def _until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_full_queue_is_429_and_every_place_comes_back(
    server: tuple[str, threading.Event],
) -> None:
    server_url, gate = server
    with httpx.Client(base_url=server_url, timeout=120) as http, \
            httpx.Client(base_url=server_url, timeout=120) as other:  # fmt: skip
        with http.stream("POST", "/generate", json=LONG) as running:
            assert running.status_code == 200
            _until(lambda: _metric(http, "draftopd_requests_in_flight") == 1)  # the slot is taken
            waiting = other.send(other.build_request("POST", "/generate", json=LONG), stream=True)
            _until(lambda: _metric(http, "draftopd_queue_depth") == 1)
            refused = httpx.post(f"{server_url}/generate", json=SHORT, timeout=30)
            assert refused.status_code == 429, refused.text
            assert refused.headers["retry-after"] == "3"
            assert "generation slots are busy" in refused.json()["detail"]
            assert _metric(http, "draftopd_requests_rejected_total") == 1
            waiting.close()  # leaves before its stream started: its place must come back
            _until(lambda: _metric(http, "draftopd_queue_depth") == 0)
            streamed = {**SHORT, "stream": True}
            queued = other.send(
                other.build_request("POST", "/generate", json=streamed), stream=True
            )
            _until(lambda: _metric(http, "draftopd_queue_depth") == 1)  # admitted, not refused
            gate.set()  # decoding may go on: the long stream is then closed (cancelled)
        assert queued.status_code == 200
        assert b"[DONE]" in queued.read()
        queued.close()
        _until(lambda: _metric(http, "draftopd_requests_in_flight") == 0)
        assert _metric(http, "draftopd_queue_depth") == 0
        assert http.post("/generate", json=SHORT).status_code == 200
        assert _metric(http, "draftopd_requests_rejected_total") == 1
