"""Schemathesis against inference (live server, tiny target, the random:0 drafter): no server
error and responses that match the schema, on every route."""

from __future__ import annotations

from tests.fuzz import fuzz
from tests.services.inference.conftest import LiveServer


def test_fuzz_inference(live_server: LiveServer) -> None:
    report = fuzz(live_server.base_url, max_examples=25, seed_value=3)
    print(f"\ninference: {report.summary()}")
    assert report.failures == []
    assert report.server_errors == 0
    assert report.operations >= 7 and report.requests >= 60
