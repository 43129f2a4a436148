"""``LookupFirstProposer``: n-gram lookup where the context repeats, the drafter elsewhere.

Greedy losslessness is in test_lossless_greedy.py and the sampling distribution in
test_lossless_sampling.py; this file checks what is particular to the combination: both sides
really propose, and the drafter, which skips the lookup cycles, drafts exactly what a drafter
that had been fed every cycle would draft.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from draftopd.speculative.engine import DecodeEngine
from draftopd.speculative.proposers import LookupFirstProposer, NgramProposer, Proposal
from draftopd.speculative.sampling import SamplingParams

PROMPT = "def add(a, b):\n    return a + b\n\ndef add(a, b):"


class Spy:
    """Wraps a drafter proposer and keeps (context, proposal) of each cycle it drafted."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.needs_features = inner.needs_features
        self.calls: list[tuple[list[int], int, list[int]]] = []

    def start(self, prompt_ids: list[int], features: torch.Tensor | None) -> None:
        self.inner.start(prompt_ids, features)

    def commit(self, committed: list[int], features: torch.Tensor | None) -> None:
        self.inner.commit(committed, features)

    def propose(self, context: list[int], k: int, params: Any, generator: Any) -> Proposal:
        proposal = self.inner.propose(context, k, params, generator)
        self.calls.append((list(context), k, list(proposal.tokens)))
        return proposal


def _features(target: Any, ids: list[int]) -> torch.Tensor:
    """The target features of ids[:-1], as the engine's prefill hands them to a proposer."""
    cache = target.new_decode_cache()
    out = target.forward(torch.tensor([ids[:-1]]), cache, want_features=True)
    return out.features[0]


@pytest.mark.parametrize("family", ["eagle3", "dflash"])
def test_the_drafter_drafts_as_if_it_had_seen_every_cycle(
    tiny_target: Any, tiny_drafter: Any, tiny_dflash: Any, family: str
) -> None:
    drafter = tiny_drafter if family == "eagle3" else tiny_dflash
    ids = list(tiny_target.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    spy = Spy(drafter.proposer(weights="float32"))
    proposer = LookupFirstProposer(spy, lookup_tokens=5, drafter_tokens=3)
    engine = DecodeEngine(tiny_target, num_draft_tokens=proposer.num_draft_tokens)
    params = SamplingParams(max_new_tokens=64, ignore_eos=True)
    out = engine.generate(ids, params, proposer=proposer)
    assert out.token_ids == engine.generate(ids, params).token_ids
    # both sides proposed, and some drafter cycles came after lookup cycles
    assert proposer.lookup_cycles >= 3 and proposer.drafter_cycles >= 3
    assert len(spy.calls) == proposer.drafter_cycles
    late = [call for call in spy.calls if len(call[0]) > len(ids) + 8]
    assert late
    for context, k, tokens in late:
        fresh = drafter.proposer(weights="float32")
        fresh.start(context, _features(tiny_target, context))
        expected = fresh.propose(context, k, params, None).tokens
        assert tokens == expected, (len(context), tokens, expected)


def test_lookup_cycles_propose_the_ngram_continuation(tiny_target: Any, tiny_drafter: Any) -> None:
    proposer = LookupFirstProposer(tiny_drafter.proposer(), lookup_tokens=4, drafter_tokens=2)
    context = [5, 6, 7, 8, 9, 5, 6]
    params = SamplingParams(max_new_tokens=8)
    assert proposer.propose(context, 7, params, None).tokens == NgramProposer().lookup(context, 4)
    assert proposer.lookup_cycles == 1 and proposer.drafter_cycles == 0
    assert proposer.num_draft_tokens == 4
    with pytest.raises(ValueError, match="lookup_tokens >= 1"):
        LookupFirstProposer(tiny_drafter.proposer(), lookup_tokens=0, drafter_tokens=2)
