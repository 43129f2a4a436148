"""Hot swap under load: a real registry (SQLite, uvicorn on a free port) holds two versions of a
tiny drafter (EAGLE-3, and in a second run DFlash); a real inference service (uvicorn on a free
port) follows the alias ``production`` through the real Redis's alias events. Eight clients stream
greedy ``/generate`` requests in a loop while the test flips ``production`` between the two
versions 20 times.

Checked: no request fails; every output (the streamed deltas and the final event) is token for
token plain greedy decoding of its prompt; every response names one of the two versions, and
both served; after the last flip, new requests name the final version within 2 s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from draftopd.models.target import TargetModel
from draftopd.speculative.engine import DecodeEngine
from draftopd.speculative.sampling import SamplingParams
from services.inference.main import create_app
from services.inference.settings import InferenceSettings
from tests.services.inference.conftest import sse_events
from tests.services.inference.registry_setup import LiveRegistry, running_registry, wait_for
from tests.services.registry.helpers import live_server

CLIENTS, FLIPS, PAUSE_S = 8, 20, 0.3
MAX_NEW = 24
PROMPTS = [
    "The quick brown fox",
    "Beautiful is better than",
    "def add(a, b):",
    "Speculative decoding lets a small draft model",
    "Readability counts.",
    "User: write a poem about the sea. Assistant:",
    "Flat is better than nested.",
    "Errors should never pass silently.",
]


@dataclass
class Tally:
    """What the client threads saw (appended under the GIL: list.append is atomic)."""

    versions: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


@pytest.fixture
def registry(tmp_path: Path, redis_url: str) -> Iterator[LiveRegistry]:
    with running_registry(tmp_path / "registry", redis_url) as live:
        yield live


def _greedy(target: TargetModel, prompt: str) -> tuple[list[int], list[int]]:
    """(prompt ids, plain greedy continuation) computed by the engine with no proposer."""
    tokenizer: Any = target.tokenizer
    ids = list(tokenizer(prompt)["input_ids"])
    return ids, DecodeEngine(target).generate(ids, SamplingParams(max_new_tokens=MAX_NEW)).token_ids


def _stream_once(http: httpx.Client, prompt: str, method: str) -> dict[str, Any]:
    """One streaming greedy request with the served drafter's family as the method; returns
    the final event plus the joined deltas."""
    body = {
        "prompt": prompt,
        "max_new_tokens": MAX_NEW,
        "stream": True,
        "speculative": {"method": method},
    }
    with http.stream("POST", "/generate", json=body) as response:
        if response.status_code != 200:
            response.read()
            raise AssertionError(f"HTTP {response.status_code}: {response.text}")
        events = sse_events(response.iter_lines())
    if not events or events[-1] != "[DONE]" or events[-2].get("type") != "final":
        raise AssertionError(f"truncated stream: {events[-2:]}")
    final: dict[str, Any] = events[-2]
    final["streamed_ids"] = [i for e in events[:-2] for i in e["token_ids"]]
    return final


def _client_loop(
    base_url: str,
    index: int,
    references: dict[str, list[int]],
    stop: threading.Event,
    tally: Tally,
    method: str,
) -> None:
    with httpx.Client(base_url=base_url, timeout=60) as http:
        turn = index
        while not stop.is_set():
            prompt = PROMPTS[turn % len(PROMPTS)]
            turn += 1
            try:
                final = _stream_once(http, prompt, method)
            except (httpx.HTTPError, AssertionError, ValueError) as err:
                tally.failures.append(f"client {index}, {prompt!r}: {err!r}")
                continue
            expected = references[prompt]
            if final["token_ids"] != expected or final["streamed_ids"] != expected:
                tally.failures.append(f"client {index}, {prompt!r}: not plain greedy")
            tally.versions.append(final["drafter_version"])


def _final_version_delay(http: httpx.Client, final: str, flipped_at: float) -> float:
    """Seconds from the flip to the first new request (its sending) that reports ``final``."""
    body = {"prompt": PROMPTS[0], "max_new_tokens": 1}  # the served family's method
    while (sent_at := time.monotonic()) - flipped_at < 30:
        if http.post("/generate", json=body).json()["drafter_version"] == final:
            return sent_at - flipped_at
        time.sleep(0.02)
    return float("inf")


def _flip(registry: LiveRegistry, http: httpx.Client, name: str, tally: Tally) -> float:
    """Flip ``production`` 20 times under load; returns how long the last flip took to serve."""
    wait_for(lambda: len(tally.versions) >= CLIENTS, timeout=30, what="the first responses")
    for flip in range(FLIPS - 1):
        registry.client.put_alias(name, "production", 2 if flip % 2 == 0 else 1)
        time.sleep(PAUSE_S)
    wait_for(
        lambda: http.get("/drafter").json()["version"] == f"{name}@2",
        timeout=10,
        what="v2 served before the last flip",
    )
    registry.client.put_alias(name, "production", 1)  # flip 20: a real change
    return _final_version_delay(http, f"{name}@1", time.monotonic())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("architecture", ["eagle3", "dflash"])
def test_flipping_the_alias_under_load_loses_nothing(
    registry: LiveRegistry,
    tiny_target: TargetModel,
    tiny_target_dir: Path,
    redis_url: str,
    tmp_path: Path,
    architecture: str,
) -> None:
    name = registry.new_drafter(architecture=architecture)
    for seed in (1, 2):
        registry.upload_random(
            name, tiny_target, seed=seed, workdir=tmp_path, architecture=architecture
        )
    registry.client.put_alias(name, "production", 1)
    versions = {f"{name}@1", f"{name}@2"}
    references = {prompt: _greedy(tiny_target, prompt)[1] for prompt in PROMPTS}
    settings = InferenceSettings(
        target=str(tiny_target_dir),
        torch_threads=1,
        max_concurrency=CLIENTS + 1,  # the probe after the last flip does not queue
        registry_url=registry.base_url,
        drafter_name=name,
        redis_url=redis_url,
        alias_poll_s=60.0,  # the events must carry the swaps
        artifact_cache_dir=tmp_path / "cache",
    )
    tally, stop = Tally(), threading.Event()
    with live_server(create_app(settings)) as base_url, httpx.Client(base_url=base_url) as http:
        assert http.get("/drafter").json()["version"] == f"{name}@1"
        clients = [
            threading.Thread(
                target=_client_loop,
                args=(base_url, i, references, stop, tally, architecture),
            )
            for i in range(CLIENTS)
        ]
        for thread in clients:
            thread.start()
        try:
            delay = _flip(registry, http, name, tally)
            time.sleep(PAUSE_S)
        finally:  # stop the clients even when a wait above failed
            stop.set()
            for thread in clients:
                thread.join(timeout=60)
        health = http.get("/health").json()

    assert tally.failures == []
    assert len(tally.versions) > 2 * CLIENTS
    assert set(tally.versions) == versions  # both versions served responses, nothing else
    assert delay < 2.0, f"the final version took {delay:.2f} s to serve"
    assert health["drafter_version"] == f"{name}@1" and health["registry"]["in_sync"] is True
    assert health["registry"]["last_swap_error"] is None
    assert health["registry"]["swaps"] >= 3  # the first load, v2, and back to v1 at least
