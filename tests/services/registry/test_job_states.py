"""Final job states are final, under concurrent reports (a live server, real threads, both
database backends): of many conflicting terminal reports exactly one wins, the others get 409."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx

from services.registry.main import create_app
from services.registry.settings import RegistrySettings
from tests.services.registry.helpers import AUTH, DRAFTER, live_server

REPORTS = 50
TRIALS = 5
SFT_SPEC = {"mode": "sft", "run": {"out_dir": "/tmp/race"}, "sft": {"total_steps": 5}}


def _race(http: httpx.Client, url: str) -> Counter[tuple[str, int]]:
    """REPORTS threads released at once, half reporting succeeded and half failed."""
    barrier = threading.Barrier(REPORTS)
    outcomes: Counter[tuple[str, int]] = Counter()
    lock = threading.Lock()

    def report(index: int) -> None:
        status = "succeeded" if index % 2 else "failed"
        barrier.wait()
        code = http.patch(url, json={"status": status, "error": None}, headers=AUTH).status_code
        with lock:
            outcomes[(status, code)] += 1

    threads = [threading.Thread(target=report, args=(i,)) for i in range(REPORTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return outcomes


def test_concurrent_terminal_reports_leave_exactly_one_winner(
    make_settings: Callable[..., RegistrySettings],
) -> None:
    with (
        live_server(create_app(make_settings())) as base,
        httpx.Client(
            base_url=base, timeout=60, limits=httpx.Limits(max_connections=REPORTS)
        ) as http,
    ):
        assert http.post("/drafters", json={"name": DRAFTER, "target_model": "t"},
                         headers=AUTH).status_code == 201  # fmt: skip
        for _ in range(TRIALS):
            job: dict[str, Any] = http.post(
                "/train-jobs", json={"drafter": DRAFTER, "spec": SFT_SPEC}, headers=AUTH
            ).json()
            url = f"/train-jobs/{job['id']}"
            assert http.patch(url, json={"status": "running"}, headers=AUTH).status_code == 200
            outcomes = _race(http, url)
            winners = {status: n for (status, code), n in outcomes.items() if code == 200}
            assert sum(outcomes.values()) == REPORTS
            assert sum(winners.values()) == 1, outcomes
            assert all(code in (200, 409) for _, code in outcomes), outcomes
            final = http.get(url).json()
            assert final["status"] == next(iter(winners))
            # and it stays that way
            assert http.patch(url, json={"status": "running"}, headers=AUTH).status_code == 409
            assert http.get(url).json()["status"] == final["status"]
