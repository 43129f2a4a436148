"""The official ``openai`` client against a real uvicorn server: completions and chat, streamed
and not, greedy (equal to plain decoding) and seeded sampling (equal across streamed/not)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.services.inference.conftest import PROMPTS, LiveServer, Reference


@pytest.fixture(scope="module")
def oai(live_server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{live_server.base_url}/v1", api_key="unused", max_retries=0, timeout=60
    ) as client:
        yield client


@pytest.fixture(scope="module")
def model(oai: openai.OpenAI) -> str:
    models = oai.models.list().data
    assert len(models) == 1
    return models[0].id


def test_models_lists_the_target(model: str, live_server: LiveServer) -> None:
    assert model.endswith("tiny-target")


@pytest.mark.parametrize("method", ["eagle3", "ngram", "none"])
def test_completions_greedy_streamed_and_not(
    oai: openai.OpenAI, model: str, reference: Reference, method: str
) -> None:
    prompt, max_tokens = PROMPTS[1], 20
    extra = {"speculative": {"method": method}}
    done = oai.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=extra
    )
    expected = reference.greedy(reference.prompt_ids(prompt), max_tokens)
    assert done.object == "text_completion"
    assert done.id.startswith("cmpl-")
    assert done.model == model
    assert len(done.choices) == 1
    assert done.choices[0].text == reference.decode(expected)
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None
    assert done.usage.completion_tokens == len(expected)
    assert done.usage.prompt_tokens == len(reference.prompt_ids(prompt))
    extras = done.model_extra or {}
    assert (
        extras["drafter_version"] == {"eagle3": "random:0", "ngram": "ngram", "none": None}[method]
    )

    chunks = list(
        oai.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            extra_body=extra,
        )
    )
    assert all(chunk.object == "text_completion" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    assert "".join(chunk.choices[0].text for chunk in chunks) == done.choices[0].text
    assert [chunk.choices[0].finish_reason for chunk in chunks][-1] == "length"
    assert all(chunk.choices[0].finish_reason is None for chunk in chunks[:-1])


def test_completions_default_max_tokens_is_16(
    oai: openai.OpenAI, model: str, reference: Reference
) -> None:
    done = oai.completions.create(model=model, prompt=PROMPTS[0], temperature=0)
    expected = reference.greedy(reference.prompt_ids(PROMPTS[0]), 16)
    assert done.usage is not None and done.usage.completion_tokens == len(expected) == 16
    assert done.choices[0].text == reference.decode(expected)


def test_completions_accept_token_ids(oai: openai.OpenAI, model: str, reference: Reference) -> None:
    ids = reference.prompt_ids(PROMPTS[2])
    done = oai.completions.create(model=model, prompt=ids, max_tokens=10, temperature=0)
    assert done.choices[0].text == reference.decode(reference.greedy(ids, 10))


def test_chat_greedy_streamed_and_not(oai: openai.OpenAI, model: str, reference: Reference) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "write a poem about the sea"}
    ]
    done = oai.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
    plain = [{"role": "user", "content": "write a poem about the sea"}]
    expected = reference.greedy(reference.chat_ids(plain), 24)
    assert done.object == "chat.completion"
    assert done.id.startswith("chatcmpl-")
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == reference.decode(expected)
    assert done.usage is not None
    assert done.usage.prompt_tokens == len(reference.chat_ids(plain))
    assert (done.model_extra or {})["drafter_version"] == "random:0"

    stream = oai.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage == done.usage
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == done.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == done.choices[0].finish_reason and set(finishes[:-1]) == {None}


def test_chat_seeded_sampling_matches_between_stream_and_not(
    oai: openai.OpenAI, model: str
) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Simple is better than complex."}
    ]

    def create(stream: bool) -> Any:
        return oai.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=32,
            seed=7,
            temperature=1.0,
            top_p=0.9,
            stream=stream,
        )

    done, again = create(False), create(False)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in create(True))
    assert done.choices[0].message.content == again.choices[0].message.content == streamed


def test_chat_n_above_one_is_refused(oai: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as info:
        oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], n=2)
    body = info.value.body
    assert isinstance(body, dict)
    assert body["detail"][0]["loc"] == ["body", "n"]
    assert "n=2" in body["detail"][0]["msg"]
