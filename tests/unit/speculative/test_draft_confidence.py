"""``stop_below``: a drafter ends a cycle's drafts at the first doubtful one (after the first).

Greedy losslessness at every floor, drafts that are prefixes of the unconstrained ones from the
same state, and draft lengths that really vary with the floor. The sampling distribution is in
test_lossless_sampling.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from draftopd.models.families import family
from draftopd.speculative.engine import DecodeEngine
from draftopd.speculative.sampling import SamplingParams

PROMPTS = ["Speculative decoding lets a small draft model", "def add(a, b):"]
FLOORS = [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0]
K = 5


@pytest.fixture(scope="module", params=["eagle3", "dflash"])
def peaked(tiny_target: Any, request: pytest.FixtureRequest) -> Any:
    """A random drafter with a large init: peaked distributions, confidences spread over (0, 1)
    (the default init is near uniform over the tiny vocabulary)."""
    kind = family(request.param)
    cfg = kind.config_for_target(
        tiny_target.config,
        feature_layers=tiny_target.feature_layers,
        draft_vocab_size=tiny_target.vocab_size,
    )
    drafter = kind.random(cfg, seed=5, std=0.3)
    drafter.set_draft_vocab(torch.arange(tiny_target.vocab_size))
    drafter.attach_embedding(tiny_target.embed_tokens)
    return drafter.eval()


def test_greedy_output_is_plain_at_every_floor(tiny_target: Any, peaked: Any) -> None:
    drafter, family = peaked, peaked.cfg.architecture
    engine = DecodeEngine(tiny_target, num_draft_tokens=K)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    per_floor: list[float] = []
    for text in PROMPTS:
        ids = list(tiny_target.tokenizer(text, add_special_tokens=False)["input_ids"])
        plain = engine.generate(ids, params).token_ids
        for floor in FLOORS:
            out = engine.generate(ids, params, proposer=drafter.proposer(stop_below=floor))
            assert out.token_ids == plain, (family, floor, text)
            if text == PROMPTS[0]:
                per_floor.append(out.stats.draft_tokens / out.stats.drafts)
    assert per_floor[0] == pytest.approx(K, abs=0.3)  # off: K drafts a cycle (the cap aside)
    assert per_floor[-1] == 1.0  # a floor of 1: only the first draft
    assert sum(1.0 < mean < per_floor[0] - 0.1 for mean in per_floor[1:-1]) >= 2  # it varies
    assert per_floor == sorted(per_floor, reverse=True)  # a higher floor never drafts more


def test_drafts_are_a_prefix_of_the_unconstrained_ones(tiny_target: Any, peaked: Any) -> None:
    drafter, family = peaked, peaked.cfg.architecture
    params = SamplingParams(max_new_tokens=8)
    for text in PROMPTS:
        ids = list(tiny_target.tokenizer(text, add_special_tokens=False)["input_ids"])
        cache = tiny_target.new_decode_cache()
        features = tiny_target.forward(
            torch.tensor([ids[:-1]]), cache, want_features=True
        ).features[0]
        full = None
        for floor in FLOORS:
            proposer = drafter.proposer(stop_below=floor, weights="float32")
            proposer.start(ids, features)
            tokens = proposer.propose(ids, K, params, None).tokens
            full = tokens if full is None else full
            assert len(tokens) >= 1 and tokens == full[: len(tokens)], (family, floor)


def test_the_floor_is_checked(tiny_drafter: Any) -> None:
    with pytest.raises(ValueError, match="stop_below"):
        tiny_drafter.proposer(stop_below=1.5)
