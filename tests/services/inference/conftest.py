"""Fixtures for the inference service: a tiny real target, apps over it, and a live server.

Everything is real: the target is a tiny random Llama with a trained BPE tokenizer and a chat
template (``build_tiny_target``), the drafter is a seeded random EAGLE-3 drafter, and the live
server is uvicorn on a free port in a background thread.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from draftopd.models.target import TargetModel, load_target
from draftopd.models.tiny import build_tiny_target
from draftopd.speculative.engine import DecodeEngine
from draftopd.speculative.sampling import SamplingParams
from services.inference.main import create_app
from services.inference.settings import InferenceSettings
from tests.servers import uvicorn_in_thread
from tests.services.inference.registry_setup import LiveRegistry, running_registry

PROMPTS = [
    "The quick brown fox",
    "Beautiful is better than",
    "def add(a, b):",
    "Speculative decoding lets a small draft model",
    "Readability counts.",
    "User: write a poem about the sea. Assistant:",
]


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_target(tmp_path_factory.mktemp("inference") / "tiny-target")


@pytest.fixture(scope="session")
def make_settings(tiny_target_dir: Path) -> Callable[..., InferenceSettings]:
    def make(**overrides: Any) -> InferenceSettings:
        values: dict[str, Any] = {"target": str(tiny_target_dir), "torch_threads": 1}
        values.update(overrides)
        return InferenceSettings(**values)

    return make


@dataclass
class Reference:
    """Plain greedy decoding on a separately loaded copy of the target: the expected outputs."""

    target: TargetModel

    @property
    def tokenizer(self) -> Any:
        return self.target.tokenizer

    def prompt_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        params = SamplingParams(max_new_tokens=max_new_tokens)
        # one intra-op thread, as the apps under test use: a tiny model gains nothing from more,
        # and on a busy machine OpenMP's spinning threads make it many times slower
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return DecodeEngine(self.target).generate(prompt_ids, params).token_ids
        finally:
            torch.set_num_threads(previous)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


@pytest.fixture(scope="session")
def reference(tiny_target_dir: Path) -> Reference:
    return Reference(load_target(str(tiny_target_dir)))


@pytest.fixture(scope="module")
def client(make_settings: Callable[..., InferenceSettings]) -> Iterator[TestClient]:
    """An app serving the random:0 EAGLE-3 drafter (default method eagle3), no API key."""
    with TestClient(create_app(make_settings(drafter="random:0"))) as test_client:
        yield test_client


@dataclass
class LiveServer:
    base_url: str
    server: uvicorn.Server


@pytest.fixture(scope="session")
def live_server(make_settings: Callable[..., InferenceSettings]) -> Iterator[LiveServer]:
    """uvicorn in a thread on a free port; two generations may run at once."""
    app = create_app(make_settings(drafter="random:0", max_concurrency=2))
    with uvicorn_in_thread(app, name="inference-uvicorn") as (url, server):
        yield LiveServer(base_url=url, server=server)


def metric_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text -> {(sample name, labels): value}."""
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def sse_events(lines: Iterator[str]) -> list[Any]:
    """Parse ``data:`` lines into JSON objects; the ``[DONE]`` sentinel is kept as a string."""
    events: list[Any] = []
    for line in lines:
        if not line.startswith("data: "):
            assert line == "", f"unexpected SSE line {line!r}"
            continue
        payload = line[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# -- a real registry that inference follows (test_registry_follow.py, test_canary.py) ----------


@pytest.fixture
def registry(tmp_path: Path, redis_url: str) -> Iterator[LiveRegistry]:
    with running_registry(tmp_path / "registry", redis_url) as live:
        yield live


@pytest.fixture
def follow(
    make_settings: Callable[..., InferenceSettings],
    registry: LiveRegistry,
    redis_url: str,
    tmp_path: Path,
) -> Callable[..., InferenceSettings]:
    """Inference settings that follow ``name``/production (events on, slow fallback polling)."""

    def make(name: str, **overrides: Any) -> InferenceSettings:
        values: dict[str, Any] = {
            "registry_url": registry.base_url,
            "drafter_name": name,
            "redis_url": redis_url,
            "alias_poll_s": 60.0,  # events must do the work unless a test polls faster
            "artifact_cache_dir": tmp_path / "inference-cache",
        }
        values.update(overrides)
        return make_settings(**values)

    return make
