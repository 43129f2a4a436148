"""Inference: bad numbers and text are a 422 that can always be encoded, never a 500, and the
service keeps answering; the api_key is checked before the body is read."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.inference.main import create_app
from services.inference.settings import InferenceSettings
from tests.services.inference.conftest import Reference

MESSAGES = '[{"role": "user", "content": "hi"}]'
BAD_BODIES = [
    ("/generate", '{"prompt": "a", "temperature": NaN}', "temperature"),
    ("/generate", '{"prompt": "a", "temperature": Infinity}', "temperature"),
    ("/generate", '{"prompt": "a", "temperature": 0.7, "top_p": NaN}', "top_p"),
    ("/generate", '{"prompt": "a", "temperature": 0.7, "seed": 18446744073709551616}', "seed"),
    ("/generate", '{"prompt": "a", "temperature": 0.7, "seed": 18446744073709551616, '
                  '"stream": true}', "seed"),
    ("/generate", '{"prompt": "a", "seed": -1}', "seed"),
    ("/generate", '{"prompt": "a", "top_k": 99999999999}', "top_k"),
    ("/generate", '{"prompt": "a\\ud800b"}', "prompt"),
    ("/generate", '{"messages": [{"role": "user", "content": "x\\udc00"}]}', "messages"),
    ("/v1/completions", '{"prompt": "a", "presence_penalty": NaN}', "presence_penalty"),
    ("/v1/completions", '{"prompt": "a", "logit_bias": {"1": NaN}}', "logit_bias"),
    ("/v1/chat/completions", f'{{"messages": {MESSAGES}, "temperature": NaN}}', "temperature"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud83d"}]}',
     "messages"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "field"), BAD_BODIES)
def test_bad_numbers_and_text_are_422(client: TestClient, path: str, body: str, field: str) -> None:
    response = client.post(
        path, content=body.encode(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert field in str(response.json()["detail"][0]["loc"])
    assert client.get("/health").status_code == 200
    ok = client.post("/generate", json={"prompt": "a", "max_new_tokens": 2})
    assert ok.status_code == 200


def test_a_tiny_top_p_samples_the_top_token(client: TestClient, reference: Reference) -> None:
    """top_p = 1e-300 rounds to 0 in float32: the nucleus keeps the most likely token, so the
    output is the greedy one."""
    body = {"prompt": "The quick brown fox", "max_new_tokens": 6, "temperature": 0.8,
            "top_p": 1e-300, "seed": 3, "speculative": {"method": "none"}}  # fmt: skip
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    expected = reference.greedy(reference.prompt_ids("The quick brown fox"), 6)
    assert response.json()["token_ids"] == expected


@pytest.fixture(scope="module")
def secured(make_settings: Callable[..., InferenceSettings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(api_key="k"))) as test_client:
        yield test_client


@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/v1/chat/completions"])
def test_no_key_is_401_before_the_body_is_read(secured: TestClient, path: str) -> None:
    headers: dict[str, Any] = {"content-type": "application/json"}
    response = secured.post(path, content=b"{not json", headers=headers)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    response = secured.post(path, content=b"{", headers={**headers, "Authorization": "Bearer x"})
    assert response.status_code == 403
    response = secured.post(path, content=b"{", headers={**headers, "Authorization": "Bearer k"})
    assert response.status_code == 422  # with the key, the body is read and refused
