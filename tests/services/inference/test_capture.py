"""Traffic capture (opt-in) against the machine's real Redis: off writes nothing; on writes the
sampled prompts to the traffic stream and to no log; a Redis outage costs no request."""

from __future__ import annotations

import logging
import random
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from draftopd.wire.traffic import TRAFFIC_STREAM, TrafficRecord, append, read
from services.inference.main import create_app
from services.inference.settings import InferenceSettings
from tests.services.inference.conftest import Reference

SECRET = "zebra quartz 7781 my private question"  # must never reach a log


def _chat(client: TestClient, text: str, method: str = "eagle3") -> dict[str, Any]:
    body = {
        "messages": [{"role": "user", "content": text}],
        "max_new_tokens": 8,
        "speculative": {"method": method},
    }
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_capture_off_writes_nothing_to_redis(
    make_settings: Callable[..., InferenceSettings], redis_url: str
) -> None:
    store = redis.Redis.from_url(redis_url)
    with TestClient(create_app(make_settings(drafter="random:0", redis_url=redis_url))) as client:
        for i in range(3):
            _chat(client, f"{SECRET} {i}")
    assert store.dbsize() == 0


def test_capture_on_records_prompts_in_the_stream_and_in_no_log(
    make_settings: Callable[..., InferenceSettings],
    redis_url: str,
    reference: Reference,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    settings = make_settings(drafter="random:0", redis_url=redis_url, capture_rate=1.0)
    caplog.set_level(logging.DEBUG)  # every logger, every level
    with TestClient(create_app(settings)) as client:
        answers = [_chat(client, f"{SECRET} {i}", method) for i, method in
                   enumerate(("eagle3", "ngram", "none"))]  # fmt: skip
    entries = read(redis.Redis.from_url(redis_url), stream=TRAFFIC_STREAM)
    assert len(entries) == 3
    for i, ((_, record), answer) in enumerate(zip(entries, answers, strict=True)):
        messages = [{"role": "user", "content": f"{SECRET} {i}"}]
        assert record.prompt_ids == reference.chat_ids(messages)
        assert record.drafter_version == (answer["drafter_version"] or "")
        assert record.completion_tokens == len(answer["token_ids"])
        assert record.endpoint == "/generate"
    assert [r.method for _, r in entries] == ["eagle3", "ngram", "none"]
    assert entries[0][1].drafter_version.startswith("random:0")
    out, err = capfd.readouterr()
    for text in (caplog.text, out, err):
        assert SECRET not in text and "zebra" not in text


def test_sampling_rate_and_trimming(
    make_settings: Callable[..., InferenceSettings], redis_url: str
) -> None:
    settings = make_settings(drafter="random:0", redis_url=redis_url, capture_rate=0.5)
    with TestClient(create_app(settings)) as client:
        capture = client.app.state.service.capture  # type: ignore[attr-defined]
        capture.random = random.Random(0)
        for i in range(20):
            _chat(client, f"question {i}", "none")
    rng = random.Random(0)
    taken = sum(rng.random() < 0.5 for _ in range(20))
    store = redis.Redis.from_url(redis_url)
    assert store.xlen(TRAFFIC_STREAM) == taken and 0 < taken < 20
    record = TrafficRecord([1, 2, 3], "", "none", "/generate", 1.0, 3, 3, time.time())
    for _ in range(5):
        append(store, record, maxlen=4, retention_s=3600, stream="t")
    assert store.xlen("t") == 4
    store.xadd("old", record.to_fields(), id="1000-0")  # 1970: past any retention
    append(store, record, maxlen=100, retention_s=3600, stream="old")
    assert [e[0] for e in store.xrange("old")] != [b"1000-0"] and store.xlen("old") == 1


def test_a_redis_outage_costs_no_request(make_settings: Callable[..., InferenceSettings]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    settings = make_settings(redis_url=f"redis://127.0.0.1:{port}/0", capture_rate=1.0)
    with TestClient(create_app(settings)) as client:
        started = time.monotonic()
        assert _chat(client, SECRET, "ngram")["token_ids"]
        answered_s = time.monotonic() - started
        capture = client.app.state.service.capture  # type: ignore[attr-defined]
        assert capture.flush() and capture.failed == 1 and capture.captured == 0
    assert answered_s < 5  # the write happens off the request path


def test_capture_needs_redis(make_settings: Callable[..., InferenceSettings]) -> None:
    with pytest.raises(ValueError, match="redis_url"):
        make_settings(capture_rate=0.1)
    assert TrafficRecord.from_fields(
        TrafficRecord([5, 6], "v", "eagle3", "/generate", 1.5, 2, 3, 1.0).to_fields()
    ) == TrafficRecord([5, 6], "v", "eagle3", "/generate", 1.5, 2, 3, 1.0)
    with pytest.raises(ValueError, match="malformed"):
        TrafficRecord.from_fields({"prompt_ids": "[]"})
