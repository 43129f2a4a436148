"""The registry's side of the live loop (issue #17), on SQLite and Postgres: the candidate's
traffic share, live reports and their sums, the policy's verdicts applied by the controller
(promote, discard, wait; the guard's rollback), and continual jobs' validation and cancelling.
The controller's thread is off (``policy_interval_s=0``); tests call ``tick()`` themselves."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from services.registry.live import LiveStats
from services.registry.main import create_app
from services.registry.models import TrainJob
from services.registry.policy import Policy, judge_canary, judge_swap
from services.registry.settings import RegistrySettings
from tests.services.registry.helpers import AUTH, DRAFTER, checkpoint_tar, create_drafter, upload

_seq = iter(range(1, 10**6))


@pytest.fixture
def app_client(make_settings: Callable[..., RegistrySettings]) -> Iterator[TestClient]:
    settings = make_settings(
        policy_interval_s=0, canary_min_cycles=100, guard_min_cycles=50, canary_max_cycles=5000
    )
    with TestClient(create_app(settings)) as test_client:
        create_drafter(test_client)
        for seed in range(3):
            upload(test_client, DRAFTER, checkpoint_tar(seed=seed))
        yield test_client


def _put(client: TestClient, alias: str, version: int, **body: Any) -> Any:
    return client.put(
        f"/drafters/{DRAFTER}/aliases/{alias}", json={"version": version, **body}, headers=AUTH
    )


def _report(
    client: TestClient, version: int, *, cycles: int, ones: int, twos: int, instance: str = "i1"
) -> Any:
    """``cycles`` cycles, of which ``ones`` accepted 1 draft and ``twos`` accepted 2."""
    body = {
        "instance": instance, "seq": next(_seq), "requests": max(cycles // 10, 1),
        "cycles": cycles, "accepted": ones + 2 * twos, "accepted_sq": ones + 4 * twos,
        "generated_tokens": cycles + ones + 2 * twos, "decode_s": cycles / 100,
    }  # fmt: skip
    return client.post(
        f"/drafters/{DRAFTER}/versions/{version}/live-metrics", json=body, headers=AUTH
    )


def _tick(client: TestClient) -> list[str]:
    moves: list[str] = client.app.state.controller.tick()  # type: ignore[attr-defined]
    return moves


def _events(client: TestClient) -> list[tuple[str, int | None, int, str, float | None]]:
    rows = client.get(f"/drafters/{DRAFTER}/events").json()
    return [
        (e["alias"], e["from_version"], e["to_version"], e["cause"], e["traffic"])
        for e in reversed(rows)
    ]


def test_the_candidate_takes_a_traffic_share_and_production_refuses_one(
    app_client: TestClient,
) -> None:
    response = _put(app_client, "candidate", 2, traffic=0.25)
    assert response.status_code == 200 and response.json()["traffic"] == 0.25
    got = app_client.get(f"/drafters/{DRAFTER}/aliases/candidate").json()
    assert got["traffic"] == 0.25
    assert _events(app_client) == [("candidate", None, 2, "api", 0.25)]
    refused = _put(app_client, "production", 1, traffic=0.5)
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"] == ["body", "traffic"]
    for bad in (1.5, -0.1, "half"):
        response = _put(app_client, "candidate", 2, traffic=bad)
        assert response.status_code == 422 and response.json()["detail"][0]["loc"][-1] == "traffic"
    assert _put(app_client, "candidate", 2).json()["traffic"] is None  # no share: not a canary


def test_live_reports_add_up_and_a_repeated_report_counts_once(app_client: TestClient) -> None:
    body = {
        "instance": "a", "seq": 1, "requests": 2, "cycles": 10, "accepted": 10,
        "accepted_sq": 20, "generated_tokens": 20, "decode_s": 0.5,
    }  # fmt: skip
    url = f"/drafters/{DRAFTER}/versions/1/live-metrics"
    assert app_client.post(url, json=body, headers=AUTH).json() == {"stored": True}
    assert app_client.post(url, json=body, headers=AUTH).json() == {"stored": False}
    other = {**body, "instance": "b", "accepted": 0, "accepted_sq": 0, "generated_tokens": 10}
    assert app_client.post(url, json=other, headers=AUTH).json() == {"stored": True}
    live = app_client.get(url).json()
    # 20 cycles: mean accepted 10/20, mean square 20/20, so the variance is 1 - 0.25 = 0.75
    assert (live["reports"], live["requests"], live["cycles"]) == (2, 4, 20)
    assert live["tau"] == pytest.approx(1.5)
    assert live["tau_stderr"] == pytest.approx((0.75 / 20) ** 0.5)
    assert live["tokens_per_s"] == pytest.approx(30 / 1.0)
    everything = app_client.get(f"/drafters/{DRAFTER}/live-metrics").json()
    assert [row["version"] for row in everything] == [1]  # versions with reports only
    later = app_client.get(url, params={"since": "2999-01-01T00:00:00"}).json()
    assert later["cycles"] == 0 and later["tau"] is None


def test_bad_live_reports_are_4xx_and_store_nothing(app_client: TestClient) -> None:
    url = f"/drafters/{DRAFTER}/versions/1/live-metrics"
    good = {
        "instance": "a", "seq": 1, "requests": 1, "cycles": 4, "accepted": 4,
        "accepted_sq": 4, "generated_tokens": 8, "decode_s": 0.1,
    }  # fmt: skip
    assert app_client.post(url, json=good).status_code == 401
    for field, value in (("accepted_sq", 3), ("cycles", -1), ("decode_s", "nan"), ("seq", None)):
        response = app_client.post(url, json={**good, field: value}, headers=AUTH)
        assert response.status_code == 422, (field, response.text)
    missing = f"/drafters/{DRAFTER}/versions/9/live-metrics"
    assert app_client.post(missing, json=good, headers=AUTH).status_code == 404
    assert app_client.get(url).json()["reports"] == 0


def test_a_better_candidate_is_promoted_once_both_sides_have_enough_cycles(
    app_client: TestClient,
) -> None:
    _put(app_client, "production", 1)
    _put(app_client, "candidate", 2, traffic=0.5)
    _report(app_client, 1, cycles=200, ones=40, twos=0)  # tau 1.2
    _report(app_client, 2, cycles=60, ones=30, twos=30)  # tau 2.5, but too few cycles
    assert _tick(app_client) == []
    _report(app_client, 2, cycles=60, ones=30, twos=30)
    assert _tick(app_client) == ["canary:promote"]
    assert app_client.get(f"/drafters/{DRAFTER}/aliases/production").json()["version"] == 2
    assert app_client.get(f"/drafters/{DRAFTER}/aliases/candidate").json()["traffic"] == 0.0
    events = app_client.get(f"/drafters/{DRAFTER}/events").json()
    assert [e["cause"] for e in events[:2]] == ["canary:promote", "canary:promote"]
    detail = events[0]["detail"]
    assert detail["candidate_tau"] == pytest.approx(2.5)
    assert detail["production_tau"] == pytest.approx(1.2)
    assert detail["candidate_cycles"] == 120 and detail["reason"].startswith("live tau better")
    assert _tick(app_client) == []  # the canary is over; the guard sees a good swap


def test_a_worse_candidate_is_discarded_and_production_stays(app_client: TestClient) -> None:
    _put(app_client, "production", 1)
    _put(app_client, "candidate", 2, traffic=0.1)
    _report(app_client, 1, cycles=300, ones=150, twos=150)  # tau 2.5
    _report(app_client, 2, cycles=300, ones=30, twos=0)  # tau 1.1
    assert _tick(app_client) == ["canary:discard"]
    assert app_client.get(f"/drafters/{DRAFTER}/aliases/production").json()["version"] == 1
    assert _events(app_client)[-1] == ("candidate", 2, 2, "canary:discard", 0.0)


def test_an_inconclusive_canary_waits_then_is_discarded_after_max_cycles(
    app_client: TestClient,
) -> None:
    _put(app_client, "production", 1)
    _put(app_client, "candidate", 2, traffic=0.5)
    _report(app_client, 1, cycles=2000, ones=1000, twos=0)
    _report(app_client, 2, cycles=2000, ones=1000, twos=0)  # the same tau
    assert _tick(app_client) == []
    _report(app_client, 2, cycles=3000, ones=1500, twos=0)
    assert _tick(app_client) == ["canary:discard"]
    reason = app_client.get(f"/drafters/{DRAFTER}/events").json()[0]["detail"]["reason"]
    assert reason.startswith("inconclusive after 5000 cycles")


def test_the_guard_rolls_back_a_swap_whose_live_tau_collapses(app_client: TestClient) -> None:
    _put(app_client, "production", 1)
    _report(app_client, 1, cycles=300, ones=150, twos=150)  # tau 2.5 before the swap
    _put(app_client, "production", 3)
    _report(app_client, 3, cycles=30, ones=0, twos=0)
    assert _tick(app_client) == []  # too few cycles yet
    _report(app_client, 3, cycles=30, ones=0, twos=0)  # tau 1.0 on 60 cycles
    assert _tick(app_client) == ["guard:rollback"]
    assert app_client.get(f"/drafters/{DRAFTER}/aliases/production").json()["version"] == 1
    event = app_client.get(f"/drafters/{DRAFTER}/events").json()[0]
    assert (event["from_version"], event["to_version"], event["cause"]) == (3, 1, "guard:rollback")
    assert event["detail"]["new_tau"] == 1.0 and event["detail"]["rolled_back_version"] == 3
    _report(app_client, 1, cycles=100, ones=50, twos=50)
    assert _tick(app_client) == []  # a rollback is not itself guarded


def test_the_guard_keeps_a_good_swap_and_judges_nothing_without_a_baseline(
    app_client: TestClient,
) -> None:
    _put(app_client, "production", 1)
    _put(app_client, "production", 2)  # v1 served nothing: no baseline
    _report(app_client, 2, cycles=300, ones=0, twos=0)
    assert _tick(app_client) == []
    _report(app_client, 2, cycles=300, ones=150, twos=150)
    _put(app_client, "production", 3)
    _report(app_client, 3, cycles=300, ones=140, twos=150)  # a little lower, within the margin
    assert _tick(app_client) == []
    assert app_client.get(f"/drafters/{DRAFTER}/aliases/production").json()["version"] == 3


def _stats(cycles: int, mean: float, variance: float) -> LiveStats:
    accepted = round(mean * cycles)
    return LiveStats(
        reports=1, cycles=cycles, accepted=accepted,
        accepted_sq=round((variance + mean * mean) * cycles),
    )  # fmt: skip


def test_the_verdicts_follow_the_confidence_bound() -> None:
    policy = Policy(z=2.0, canary_min_cycles=100, canary_max_cycles=10_000)
    close = judge_canary(_stats(400, 1.05, 1.0), _stats(400, 1.0, 1.0), policy)
    assert close.action == "wait"  # 0.05 better, but the bound is 2*sqrt(2/400) = 0.14
    clear = judge_canary(_stats(4000, 1.2, 1.0), _stats(4000, 1.0, 1.0), policy)
    assert clear.action == "promote" and clear.detail["bound"] == pytest.approx(0.0447, abs=1e-3)
    gain = Policy(z=2.0, canary_min_cycles=100, canary_min_gain=0.3)
    assert judge_canary(_stats(4000, 1.2, 1.0), _stats(4000, 1.0, 1.0), gain).action == "wait"
    guard = Policy(z=2.0, guard_min_cycles=50, guard_margin=0.1)
    assert judge_swap(_stats(60, 0.0, 0.0), _stats(500, 1.5, 0.5), guard).action == "rollback"
    assert judge_swap(_stats(60, 1.3, 0.5), _stats(500, 1.5, 0.5), guard).action == "keep"
    assert judge_swap(_stats(20, 0.0, 0.0), _stats(500, 1.5, 0.5), guard).action == "wait"
    assert judge_swap(_stats(60, 0.0, 0.0), _stats(20, 1.5, 0.5), guard).action == "keep"
    # the margin is on the gain: a lost drafter after a weak one (tau 1.07 -> 1.00) is caught
    weak = judge_swap(_stats(2000, 0.0, 0.0), _stats(5000, 0.07, 0.07), Policy())
    assert weak.action == "rollback" and weak.detail["floor"] == pytest.approx(1.035)
    assert judge_swap(_stats(2000, 0.05, 0.05), _stats(5000, 0.07, 0.07), Policy()).action == "keep"


def _opd_spec(prompts: str) -> dict[str, Any]:
    return {
        "mode": "draft_opd",
        "run": {"out_dir": "/tmp/continual", "target": "tiny", "prompts": prompts},
        "opd": {"drafter": f"registry://{DRAFTER}/1", "total_steps": 2},
    }


def test_a_continual_job_needs_traffic_prompts_and_is_stored_not_queued(
    app_client: TestClient,
) -> None:
    traffic = {"source": "traffic", "min_prompts": 4}
    body: dict[str, Any] = {
        "drafter": DRAFTER, "spec": _opd_spec(traffic),  # type: ignore[arg-type]
        "continual": {"min_new_prompts": 4, "traffic": 0.5},
    }  # fmt: skip
    for bad in (
        {**body, "spec": _opd_spec("prompts.jsonl")},
        {**body, "promote_to": "production"},
        {**body, "continual": {"min_new_prompts": 0}},
        {**body, "continual": {"min_new_prompts": 4, "traffic": 0}},
    ):
        assert app_client.post("/train-jobs", json=bad, headers=AUTH).status_code == 422
    job = app_client.post("/train-jobs", json=body, headers=AUTH).json()
    assert job["status"] == "running" and job["continual"]["state"]["phase"] == "waiting"
    assert job["continual"]["schedule"] == {
        "min_new_prompts": 4, "traffic": 0.5, "max_rounds": None,
    }  # fmt: skip
    _tick(app_client)  # no traffic, no production: nothing starts
    assert app_client.get("/train-jobs").json()[0]["id"] == job["id"]  # no round job
    plain = {"drafter": DRAFTER, "spec": _opd_spec("prompts.jsonl")}
    assert app_client.post("/train-jobs", json=plain, headers=AUTH).status_code == 201
    with app_client.app.state.sessions() as session:  # type: ignore[attr-defined]
        continual = session.scalars(select(TrainJob.id).where(TrainJob.continual.is_not(None)))
        assert list(continual) == [job["id"]]  # a job without a schedule stores SQL NULL
    app_client.post(f"/train-jobs/{job['id']}/cancel", headers=AUTH)
    _tick(app_client)
    assert app_client.get(f"/train-jobs/{job['id']}").json()["status"] == "cancelled"
