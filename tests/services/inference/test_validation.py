"""Bad input gets a 4xx that names the field; never a 500."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.inference.main import create_app
from services.inference.settings import InferenceSettings

LIMIT = 64


@pytest.fixture(scope="module")
def limited(make_settings: Callable[..., InferenceSettings]) -> Iterator[TestClient]:
    """No drafter, max_new_tokens_limit=64."""
    settings = make_settings(max_new_tokens_limit=LIMIT)
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def _locs(response: Any) -> list[list[Any]]:
    return [error["loc"] for error in response.json()["detail"]]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": "hi", "max_new_tokens": -3}, "max_new_tokens"),
        ({"prompt": "hi", "max_new_tokens": LIMIT + 1}, "max_new_tokens"),
        ({"prompt": "hi", "temperature": -0.5}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "hi", "top_k": -1}, "top_k"),
        ({"prompt": "hi", "speculative": {"method": "medusa"}}, "method"),
        ({"prompt": "hi", "speculative": {"num_draft_tokens": 0}}, "num_draft_tokens"),
        ({"prompt": "hi", "stop": ["ok", ""]}, "stop"),
        ({"prompt": "hi", "max_tokens": 5}, "max_tokens"),  # /generate is strict
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ],
)
def test_generate_rejects_bad_fields(limited: TestClient, body: dict[str, Any], field: str) -> None:
    response = limited.post("/generate", json=body)
    assert response.status_code == 422, response.text
    assert any(field in loc for loc in _locs(response)), response.text


@pytest.mark.parametrize(
    "body", [{}, {"prompt": "hi", "messages": [{"role": "user", "content": "x"}]}]
)
def test_generate_needs_exactly_one_of_prompt_and_messages(
    limited: TestClient, body: dict[str, Any]
) -> None:
    response = limited.post("/generate", json=body)
    assert response.status_code == 422
    assert "'prompt'" in response.text and "'messages'" in response.text


def test_limit_error_names_the_limit(limited: TestClient) -> None:
    response = limited.post("/generate", json={"prompt": "hi", "max_new_tokens": 1000})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "max_new_tokens"]
    assert str(LIMIT) in error["msg"] and error["input"] == 1000


def test_eagle3_without_a_drafter_is_a_conflict(limited: TestClient) -> None:
    body = {"prompt": "hi", "max_new_tokens": 4, "speculative": {"method": "eagle3"}}
    response = limited.post("/generate", json=body)
    assert response.status_code == 409
    assert "eagle3" in response.json()["detail"] and "drafter" in response.json()["detail"]
    chat = {
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 4,
        "speculative": {"method": "eagle3"},
    }
    assert limited.post("/v1/chat/completions", json=chat).status_code == 409


def test_no_drafter_defaults_to_ngram(limited: TestClient) -> None:
    data = limited.post("/generate", json={"prompt": "hi", "max_new_tokens": 4}).json()
    assert data["speculative"]["method"] == "ngram"
    assert data["drafter_version"] == "ngram"


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/completions", {"prompt": "hi", "n": 2}, "n"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": LIMIT + 1}, "max_tokens"),
        ("/v1/completions", {"prompt": ""}, "prompt"),
        ("/v1/completions", {"prompt": [1, 2, 999999]}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "echo": True}, "echo"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 2}, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 3}, "n"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": LIMIT + 1},
            "max_completion_tokens",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "presence_penalty": 0.5},
            "presence_penalty",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "top_p": 0},
            "top_p",
        ),
    ],
)
def test_openai_endpoints_reject_bad_fields(
    limited: TestClient, path: str, body: dict[str, Any], field: str
) -> None:
    response = limited.post(path, json={"model": "any", **body})
    assert response.status_code == 422, response.text
    assert any(field in loc for loc in _locs(response)), response.text


def test_malformed_json_is_422(limited: TestClient) -> None:
    response = limited.post(
        "/generate", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422


def test_prompt_beyond_the_context_is_422(limited: TestClient) -> None:
    ids = [5] * 2047  # the tiny target's context is 2048 positions
    response = limited.post("/v1/completions", json={"prompt": ids, "max_tokens": 8})
    assert response.status_code == 422
    assert _locs(response) == [["body", "max_tokens"]]
