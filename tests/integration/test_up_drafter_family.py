"""`draftopd up --drafter-architecture dflash`: the drafter up creates for inference to follow is
a DFlash drafter in the registry (a real registry on SQLite, uvicorn on a free port), and an
existing drafter is left as it is."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from draftopd.stack.up import StackOptions, StackPlan, _ensure_drafter
from tests.services.inference.registry_setup import TOKEN, LiveRegistry, running_registry


@pytest.fixture
def registry(tmp_path: Path, redis_url: str) -> Iterator[LiveRegistry]:
    with running_registry(tmp_path / "registry", redis_url) as live:
        yield live


def _plan(registry: LiveRegistry, tmp_path: Path, name: str, architecture: str) -> StackPlan:
    url = urlsplit(registry.base_url)
    options = StackOptions(
        target="smollm2",
        data_dir=tmp_path / "stack",
        host=str(url.hostname),
        registry_port=int(url.port or 80),
        drafter_name=name,
        drafter_architecture=architecture,
    )
    return StackPlan(
        options=options, redis_url="", database_url="", token=TOKEN, embedded_redis=False
    )


def test_up_creates_the_drafter_of_the_chosen_family(
    registry: LiveRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _ensure_drafter(_plan(registry, tmp_path, "smollm2-dflash", "dflash"))
    created = registry.client.get_drafter("smollm2-dflash")
    assert created["architecture"] == "dflash" and created["target_model"] == "smollm2"
    _ensure_drafter(_plan(registry, tmp_path, "smollm2-dflash", "eagle3"))  # exists: kept
    assert registry.client.get_drafter("smollm2-dflash")["architecture"] == "dflash"
    assert "holds dflash versions, not eagle3" in caplog.text
