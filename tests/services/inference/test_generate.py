"""POST /generate: lossless greedy outputs for every method, chat prompts, stop strings, SSE."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from draftopd.models.checkpoint import random_drafter_for
from services.inference.drafters import ServedDrafter
from services.inference.main import create_app
from services.inference.settings import InferenceSettings
from tests.services.inference.conftest import PROMPTS, Reference, sse_events

MAX_NEW = 24


@pytest.mark.parametrize("method", ["eagle3", "ngram", "none"])
@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_greedy_equals_plain_decoding(
    client: TestClient, reference: Reference, method: str, prompt: str
) -> None:
    body = {"prompt": prompt, "max_new_tokens": MAX_NEW, "speculative": {"method": method}}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    prompt_ids = reference.prompt_ids(prompt)
    expected = reference.greedy(prompt_ids, MAX_NEW)
    assert data["token_ids"] == expected
    assert data["text"] == reference.decode(expected)
    assert data["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": len(expected),
        "total_tokens": len(prompt_ids) + len(expected),
    }
    assert data["finish_reason"] == ("length" if len(expected) == MAX_NEW else "stop")
    spec = data["speculative"]
    assert spec["method"] == method
    assert data["drafter_version"] == {"eagle3": "random:0", "ngram": "ngram", "none": None}[method]
    assert spec["tokens_per_s"] > 0
    if data["finish_reason"] == "length":  # nothing cut: every committed token is output
        # each cycle commits its accepted drafts + 1 bonus; tau = committed / cycles
        assert spec["cycles"] + spec["accepted_tokens"] == len(expected)
        assert spec["tau"] == pytest.approx(len(expected) / spec["cycles"])
    if method == "none":
        assert spec["num_draft_tokens"] == 0
        assert spec["draft_tokens"] == 0 and spec["accepted_by_position"] == []
    else:
        assert spec["num_draft_tokens"] == 4
        assert sum(spec["accepted_by_position"]) == spec["accepted_tokens"]


def test_default_method_is_eagle3_with_a_drafter(client: TestClient, reference: Reference) -> None:
    data = client.post("/generate", json={"prompt": PROMPTS[3], "max_new_tokens": 8}).json()
    assert data["speculative"]["method"] == "eagle3"
    assert data["drafter_version"] == "random:0"
    assert data["token_ids"] == reference.greedy(reference.prompt_ids(PROMPTS[3]), 8)


def test_num_draft_tokens_per_request(client: TestClient, reference: Reference) -> None:
    prompt = PROMPTS[0] + " " + PROMPTS[0]
    body = {
        "prompt": prompt,
        "max_new_tokens": 16,
        "speculative": {"method": "ngram", "num_draft_tokens": 2},
    }
    data = client.post("/generate", json=body).json()
    assert data["speculative"]["num_draft_tokens"] == 2
    assert len(data["speculative"]["accepted_by_position"]) == 2
    assert data["token_ids"] == reference.greedy(reference.prompt_ids(prompt), 16)


def test_lookup_first_per_request(client: TestClient, reference: Reference) -> None:
    """n-gram lookup ahead of the drafter: the output stays plain greedy's, some cycles came
    from the lookup, and a method without a drafter refuses the option with a 422."""
    prompt = PROMPTS[0] + " " + PROMPTS[0]
    body = {
        "prompt": prompt,
        "max_new_tokens": 32,
        "speculative": {"method": "eagle3", "num_draft_tokens": 2, "lookup_first": 5},
    }
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["token_ids"] == reference.greedy(reference.prompt_ids(prompt), 32)
    spec = data["speculative"]
    assert spec["lookup_first"] == 5 and 0 < spec["lookup_cycles"] < spec["cycles"]
    assert len(spec["accepted_by_position"]) == 5  # lookup cycles propose up to 5 tokens
    body["speculative"] = {"method": "ngram", "lookup_first": 3}
    refused = client.post("/generate", json=body)
    assert refused.status_code == 422, refused.text
    assert "lookup_first" in refused.text
    plain = client.post("/generate", json={"prompt": prompt, "max_new_tokens": 8}).json()
    assert plain["speculative"]["lookup_first"] == 0  # the server's default: off
    assert plain["speculative"]["lookup_cycles"] == 0


def test_draft_tree_per_request_and_by_default(
    client: TestClient,
    reference: Reference,
    make_settings: Callable[..., InferenceSettings],
) -> None:
    """An eagle3 draft tree per request (and as the server's default): output stays plain
    greedy's, every cycle verified a tree; other methods and bad shapes get a 422."""
    prompt = PROMPTS[1]
    expected = reference.greedy(reference.prompt_ids(prompt), MAX_NEW)
    body: dict[str, Any] = {
        "prompt": prompt,
        "max_new_tokens": MAX_NEW,
        "speculative": {"method": "eagle3", "num_draft_tokens": 3, "draft_tree": "3x8"},
    }
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["token_ids"] == expected
    spec = data["speculative"]
    assert spec["draft_tree"] == "3x8" and spec["tree_cycles"] == spec["cycles"] - 1
    assert spec["draft_tokens"] > 3 * spec["drafts"]  # more nodes per cycle than a chain has
    for bad, where in (
        ({"method": "ngram", "draft_tree": "3x8"}, "method 'ngram'"),
        ({"method": "eagle3", "draft_tree": "3,8"}, "BRANCHxNODES"),
        ({"method": "eagle3", "draft_tree": "0x8"}, "BRANCHxNODES"),
    ):
        refused = client.post("/generate", json={**body, "speculative": bad})
        assert refused.status_code == 422, refused.text
        assert where in refused.text and "draft_tree" in refused.text
    settings = make_settings(drafter="random:0", draft_tree="2x5")
    with TestClient(create_app(settings)) as server:
        default = server.post("/generate", json={"prompt": prompt, "max_new_tokens": MAX_NEW})
        body["speculative"] = {"draft_tree": "chain"}
        chain = server.post("/generate", json=body)
    assert default.json()["token_ids"] == expected and chain.json()["token_ids"] == expected
    assert default.json()["speculative"]["draft_tree"] == "2x5"
    assert chain.json()["speculative"]["draft_tree"] is None
    assert chain.json()["speculative"]["tree_cycles"] == 0
    with pytest.raises(ValueError, match="BRANCHxNODES"):
        make_settings(drafter="random:0", draft_tree="2x")
    with pytest.raises(ValueError, match="do not combine"):
        make_settings(drafter="random:0", draft_tree="2x5", draft_stop_below=0.3)


def test_messages_use_the_chat_template(client: TestClient, reference: Reference) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "write a poem about the sea"},
    ]
    body = {"messages": messages, "max_new_tokens": MAX_NEW, "speculative": {"method": "ngram"}}
    data = client.post("/generate", json=body).json()
    prompt_ids = reference.chat_ids(messages)
    assert data["usage"]["prompt_tokens"] == len(prompt_ids)
    assert data["token_ids"] == reference.greedy(prompt_ids, MAX_NEW)


def test_stop_string_cuts_the_text(client: TestClient, reference: Reference) -> None:
    prompt = PROMPTS[1]
    full = reference.decode(reference.greedy(reference.prompt_ids(prompt), MAX_NEW))
    stop = full[6:9]
    assert len(stop) == 3
    body = {"prompt": prompt, "max_new_tokens": MAX_NEW, "stop": [stop, "never-there"]}
    data = client.post("/generate", json=body).json()
    assert data["finish_reason"] == "stop"
    assert data["text"] == full[: full.index(stop)]
    assert stop not in data["text"]


def test_seeded_sampling_is_reproducible(client: TestClient) -> None:
    body = {
        "prompt": PROMPTS[0],
        "max_new_tokens": 16,
        "temperature": 0.9,
        "top_p": 0.95,
        "top_k": 50,
        "seed": 1234,
    }
    first = client.post("/generate", json=body).json()
    second = client.post("/generate", json=body).json()
    assert first["token_ids"] == second["token_ids"]
    assert len(first["token_ids"]) >= 1


def _stream(client: TestClient, body: dict[str, Any]) -> list[Any]:
    with client.stream("POST", "/generate", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return sse_events(response.iter_lines())


@pytest.mark.parametrize("method", ["eagle3", "ngram"])
def test_sse_deltas_add_up_to_the_final_event(
    client: TestClient, reference: Reference, method: str
) -> None:
    body = {"prompt": PROMPTS[2], "max_new_tokens": 40, "speculative": {"method": method}}
    events = _stream(client, body)
    assert events[-1] == "[DONE]"
    final = events[-2]
    deltas = events[:-2]
    assert final["type"] == "final"
    assert all(event["type"] == "delta" for event in deltas)
    assert "".join(event["text"] for event in deltas) == final["text"]
    assert [t for event in deltas for t in event["token_ids"]] == final["token_ids"]
    # one event per decode cycle (plus at most a text-only flush at the end)
    assert sum(1 for event in deltas if event["token_ids"]) == final["speculative"]["cycles"]
    expected = reference.greedy(reference.prompt_ids(PROMPTS[2]), 40)
    assert final["token_ids"] == expected
    assert final["drafter_version"] == ("random:0" if method == "eagle3" else "ngram")
    assert final["usage"]["completion_tokens"] == len(expected)
    plain = client.post("/generate", json=body).json()
    assert {k: plain[k] for k in ("text", "token_ids", "finish_reason")} == {
        k: final[k] for k in ("text", "token_ids", "finish_reason")
    }


def test_sse_with_a_stop_string(client: TestClient, reference: Reference) -> None:
    full = reference.decode(reference.greedy(reference.prompt_ids(PROMPTS[0]), MAX_NEW))
    stop = full[10:12]
    events = _stream(client, {"prompt": PROMPTS[0], "max_new_tokens": MAX_NEW, "stop": stop})
    final, deltas = events[-2], events[:-2]
    assert final["finish_reason"] == "stop"
    assert final["text"] == full[: full.index(stop)]
    assert "".join(event["text"] for event in deltas) == final["text"]


def test_a_running_request_keeps_its_drafter_across_a_swap(
    client: TestClient, reference: Reference
) -> None:
    service = client.app.state.service  # type: ignore[attr-defined]
    original = service.drafter
    body = {"prompt": PROMPTS[4], "max_new_tokens": 30, "stream": True}
    swapped = ServedDrafter(
        drafter=random_drafter_for(service.target, seed=5),
        version="random:5",
        path=None,
        provenance={},
    )
    try:
        with client.stream("POST", "/generate", json=body) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert '"type":"delta"' in first
            service.swap_drafter(swapped)
            events = sse_events(lines)
        assert events[-2]["drafter_version"] == "random:0"
        after = client.post("/generate", json={**body, "stream": False}).json()
        assert after["drafter_version"] == "random:5"
        assert client.get("/drafter").json()["version"] == "random:5"
        assert after["token_ids"] == events[-2]["token_ids"]  # lossless under either drafter
        assert after["token_ids"] == reference.greedy(reference.prompt_ids(PROMPTS[4]), 30)
    finally:
        service.swap_drafter(original)


@pytest.mark.parametrize("weights", ["int8", "module"])
def test_draft_weights_setting_keeps_the_output(
    make_settings: Callable[..., InferenceSettings], reference: Reference, weights: str
) -> None:
    """DRAFT_WEIGHTS picks the drafter's decode-time precision; greedy output stays the
    target's (the default, bfloat16, is what the other tests here serve)."""
    settings = make_settings(drafter="random:0", draft_weights=weights)
    with TestClient(create_app(settings)) as weighted:
        body = {"prompt": PROMPTS[0], "max_new_tokens": MAX_NEW}
        data = weighted.post("/generate", json=body).json()
    assert data["speculative"]["method"] == "eagle3"
    assert data["token_ids"] == reference.greedy(reference.prompt_ids(PROMPTS[0]), MAX_NEW)
    with pytest.raises(ValueError, match="draft_weights"):
        make_settings(drafter="random:0", draft_weights="fp8")


def test_server_defaults_for_the_floor_and_the_lookup(
    make_settings: Callable[..., InferenceSettings], reference: Reference
) -> None:
    """DRAFT_STOP_BELOW = 1 keeps only each cycle's first draft; LOOKUP_FIRST puts n-gram
    lookup ahead of the drafter by default. Greedy output stays the target's."""
    prompt = PROMPTS[0] + " " + PROMPTS[0]
    settings = make_settings(drafter="random:0", draft_stop_below=1.0, lookup_first=4)
    expected = reference.greedy(reference.prompt_ids(prompt), MAX_NEW)
    with TestClient(create_app(settings)) as server:
        body: dict[str, Any] = {"prompt": prompt, "max_new_tokens": MAX_NEW}
        default = server.post("/generate", json=body).json()
        body["speculative"] = {"lookup_first": 0}
        alone = server.post("/generate", json=body).json()
    assert default["token_ids"] == expected and alone["token_ids"] == expected
    spec = default["speculative"]
    assert spec["lookup_first"] == 4 and spec["lookup_cycles"] > 0
    assert spec["drafts"] > spec["lookup_cycles"]  # the drafter drafted the other cycles
    spec = alone["speculative"]
    assert spec["lookup_first"] == 0 and spec["lookup_cycles"] == 0
    assert spec["draft_tokens"] == spec["drafts"]  # the floor of 1 kept one draft a cycle
    with pytest.raises(ValueError, match="draft_stop_below"):
        make_settings(drafter="random:0", draft_stop_below=1.5)
