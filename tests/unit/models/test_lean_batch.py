"""Batched greedy decoding with continuous batching equals one-sequence greedy decoding."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from draftopd.models.lean_batch import batched_greedy
from draftopd.models.lean_llama import LeanLlama


def _one_by_one(lean: LeanLlama, prompt: list[int], max_new: int, eos: frozenset[int]) -> list[int]:
    cache = lean.new_cache(capacity=8)
    logits, _ = lean.forward(torch.tensor(prompt), cache, last_logits_only=True)
    out: list[int] = []
    while True:
        token = int(logits[-1].argmax())
        out.append(token)
        if token in eos or len(out) >= max_new:
            return out
        logits, _ = lean.forward(torch.tensor([token]), cache)


@pytest.mark.parametrize("kernel", ["torch", "native"])
@pytest.mark.parametrize("slots", [1, 3, 16])
def test_continuous_batching_gives_each_prompt_its_own_greedy_text(
    tiny_target: Any, kernel: str, slots: int
) -> None:
    generator = torch.Generator().manual_seed(1)
    lengths = [1, 7, 3, 12, 2, 9, 5, 4]
    prompts = [
        torch.randint(0, tiny_target.vocab_size, (n,), generator=generator).tolist()
        for n in lengths
    ]
    lean = LeanLlama(tiny_target.model, kernel=kernel)
    # an EOS that greedy text reaches for some prompts: the most frequent first token
    firsts = [_one_by_one(lean, p, 1, frozenset())[0] for p in prompts]
    eos = frozenset({max(set(firsts), key=firsts.count)})
    want = [_one_by_one(lean, p, 24, eos) for p in prompts]
    done: list[int] = []
    got = batched_greedy(
        lean, prompts, max_new_tokens=24, slots=slots, eos=eos, on_done=done.append
    )
    assert got == want
    assert sorted(done) == list(range(len(prompts)))
    assert any(len(x) < 24 for x in got) and any(len(x) == 24 for x in got)


def test_bad_arguments(tiny_target: Any) -> None:
    lean = LeanLlama(tiny_target.model, kernel="torch")
    assert batched_greedy(lean, [], max_new_tokens=4, slots=2) == []
    with pytest.raises(ValueError, match="at least one token"):
        batched_greedy(lean, [[1], []], max_new_tokens=4, slots=2)
    with pytest.raises(ValueError, match="positive"):
        batched_greedy(lean, [[1]], max_new_tokens=0, slots=2)
