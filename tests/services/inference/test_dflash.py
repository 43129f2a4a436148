"""The inference service serving a DFlash block drafter: method "dflash" is lossless, is the
default while a DFlash drafter is served, and a method of another family is a clear 409."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from draftopd.models.checkpoint import random_drafter_for, save_drafter
from draftopd.models.target import load_target
from services.inference.main import create_app
from services.inference.settings import InferenceSettings
from tests.services.inference.conftest import PROMPTS, Reference

MAX_NEW = 24


@pytest.fixture(scope="module")
def dflash_client(make_settings: Callable[..., InferenceSettings]) -> Iterator[TestClient]:
    """An app serving a random:0 DFlash drafter, no API key."""
    settings = make_settings(drafter="random:0", random_architecture="dflash")
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.mark.parametrize("method", ["dflash", None])
@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_dflash_greedy_equals_plain_decoding(
    dflash_client: TestClient, reference: Reference, method: str | None, prompt: str
) -> None:
    body: dict[str, object] = {"prompt": prompt, "max_new_tokens": MAX_NEW}
    if method is not None:
        body["speculative"] = {"method": method, "num_draft_tokens": 7}
    response = dflash_client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["token_ids"] == reference.greedy(reference.prompt_ids(prompt), MAX_NEW)
    assert data["speculative"]["method"] == "dflash"  # the default follows the served family
    assert data["drafter_version"] == "random:0"
    assert data["speculative"]["cycles"] >= 1


def test_drafter_endpoint_reports_the_family(dflash_client: TestClient) -> None:
    info = dflash_client.get("/drafter").json()
    assert info["architecture"] == "dflash" and info["default_method"] == "dflash"
    assert dflash_client.get("/health").json()["default_method"] == "dflash"


def test_a_method_of_another_family_is_a_conflict(dflash_client: TestClient) -> None:
    body = {"prompt": "hi", "max_new_tokens": 4, "speculative": {"method": "eagle3"}}
    response = dflash_client.post("/generate", json=body)
    assert response.status_code == 409
    detail = response.json()["detail"]
    assert "'eagle3'" in detail and "dflash" in detail and "random:0" in detail


def test_a_dflash_checkpoint_is_served(
    make_settings: Callable[..., InferenceSettings],
    tiny_target_dir: Path,
    reference: Reference,
    tmp_path: Path,
) -> None:
    target = load_target(str(tiny_target_dir))
    drafter = random_drafter_for(target, seed=3, architecture="dflash", block_size=4)
    path = save_drafter(drafter, tmp_path / "dflash-b4")
    with TestClient(create_app(make_settings(drafter=str(path)))) as client:
        info = client.get("/drafter").json()
        assert info["architecture"] == "dflash" and info["path"] == str(path)
        prompt = PROMPTS[3]
        body = {"prompt": prompt, "max_new_tokens": MAX_NEW}
        data = client.post("/generate", json=body).json()
        assert data["token_ids"] == reference.greedy(reference.prompt_ids(prompt), MAX_NEW)
        assert data["speculative"]["method"] == "dflash"


def test_the_random_family_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="random_architecture"):
        InferenceSettings(drafter="random:0", random_architecture="medusa")  # type: ignore[arg-type]
