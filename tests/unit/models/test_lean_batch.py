"""Batched greedy decoding with continuous batching equals one-sequence greedy decoding."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from draftopd.models.lean_batch import batched_greedy, batched_sample
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


def test_a_repeated_prompt_reuses_its_prefill_and_decodes_the_same(tiny_target: Any) -> None:
    """Prompts given more than once are prefilled once (their K/V copied into later slots); the
    text must equal decoding each one alone."""
    lean = LeanLlama(tiny_target.model, kernel="torch")
    prompts = [[5, 9, 14, 3], [7, 7, 2], [5, 9, 14, 3], [5, 9, 14, 3], [7, 7, 2]]
    want = [_one_by_one(lean, p, 10, frozenset()) for p in prompts]
    assert batched_greedy(lean, prompts, max_new_tokens=10, slots=2) == want


def test_sampling_is_seeded_and_draws_from_the_model_distribution(tiny_target: Any) -> None:
    lean = LeanLlama(tiny_target.model, kernel="torch")
    prompt = [5, 9, 14, 3]
    n = 3000

    def draw(seed: int, top_p: float = 1.0) -> list[list[int]]:
        generator = torch.Generator().manual_seed(seed)
        return batched_sample(
            lean, [prompt] * n, max_new_tokens=1, slots=64, temperature=1.3, top_p=top_p,
            generator=generator,
        )  # fmt: skip

    first = draw(0)
    assert first == draw(0) and first != draw(1)
    cache = lean.new_cache(capacity=8)
    logits, _ = lean.forward(torch.tensor(prompt), cache, last_logits_only=True)
    probs = torch.softmax(logits[-1].float() / 1.3, -1)
    counts = torch.bincount(torch.tensor([x[0] for x in first]), minlength=probs.numel()).float()
    total_variation = 0.5 * (counts / n - probs).abs().sum()
    assert total_variation < 0.15, total_variation  # 3000 draws over ~320 tokens: ~0.07 expected
    # nucleus: only the smallest head of the ranking with mass >= top_p is ever drawn
    ranked, order = probs.sort(descending=True)
    head = int((ranked.cumsum(0) - ranked < 0.5).sum())
    drawn = {x[0] for x in draw(2, top_p=0.5)}
    assert drawn <= set(order[:head].tolist()) and len(drawn) == head


def test_nucleus_cut_is_exact_past_the_ranked_head() -> None:
    """Rows whose top NUCLEUS_HEAD tokens hold less than top_p are ranked in full."""
    from draftopd.models import lean_batch

    probs = torch.full((2, 3000), 1 / 3000)
    probs[0] = torch.softmax(torch.linspace(10, 0, 3000), -1)  # peaked: head suffices
    generator = torch.Generator().manual_seed(0)
    picks = torch.stack([lean_batch._nucleus(probs, 0.9, generator) for _ in range(400)])
    assert int(picks[:, 1].max()) > lean_batch.NUCLEUS_HEAD  # the flat row reaches past the head
    cut = int((probs[0].cumsum(0) - probs[0] < 0.9).sum())
    assert int(picks[:, 0].max()) < cut
