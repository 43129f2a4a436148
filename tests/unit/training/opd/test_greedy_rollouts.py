"""Batched greedy rollouts must write the records the engine writes (make_rollouts at T=0)."""

from __future__ import annotations

import pytest
import torch

from draftopd.models.checkpoint import random_drafter_for
from draftopd.models.drafter import Drafter
from draftopd.models.target import TargetModel
from draftopd.speculative.engine import DecodeEngine
from draftopd.speculative.records import RolloutRecord
from draftopd.speculative.sampling import SamplingParams
from draftopd.training.opd.greedy_rollouts import (
    batched_greedy_rollouts,
    greedy_continuations,
    walk_cycles,
)
from draftopd.training.opd.replay import anchor_plan
from draftopd.training.opd.rollouts import make_rollouts

A, B, C, D, E, X, Y, EOS = 50, 51, 52, 53, 54, 60, 61, 2


def test_walk_cycles_follows_the_engine_rules() -> None:
    response = [A, B, C, D, E, X]
    drafts = [[A, X, Y], [9, 9, 9], [C, D, Y], [9, 9, 9], [9, 9, 9], [9, 9, 9]]
    cycles = walk_cycles(response, drafts, num_draft_tokens=3, max_new_tokens=5, eos=frozenset())
    assert [(c.anchor, c.proposed, c.accepted, c.committed) for c in cycles] == [
        (-1, [A, X, Y], 1, [A, B]),  # accepts A, correction B
        (1, [C, D], 2, [C, D, E]),  # k = min(3, 5 - 2 - 1) = 2: all accepted, bonus E
    ]


def test_walk_cycles_stops_at_eos_inside_a_cycle_and_at_the_budget() -> None:
    response = [A, EOS, C, D, E]
    drafts = [[A, EOS, C]] + [[9, 9, 9]] * 4
    cycles = walk_cycles(
        response, drafts, num_draft_tokens=3, max_new_tokens=5, eos=frozenset({EOS})
    )
    assert [(c.proposed, c.accepted, c.committed) for c in cycles] == [
        ([A, EOS, C], 3, [A, EOS, C, D])
    ]
    wrong = [[9, 9, 9]] * 5
    cycles = walk_cycles(response[:3], wrong, num_draft_tokens=3, max_new_tokens=2, eos=frozenset())
    assert [(c.proposed, c.committed) for c in cycles] == [([9], [A]), ([], [EOS])]


def _prompts(target: TargetModel, lengths: list[int], seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randint(4, target.vocab_size, (n,), generator=generator).tolist() for n in lengths
    ]


def _assert_same_records(ours: list[RolloutRecord], engine: list[RolloutRecord]) -> None:
    assert len(ours) == len(engine)
    for a, b in zip(ours, engine, strict=True):
        assert a.prompt_ids == b.prompt_ids
        assert a.response_ids == b.response_ids
        assert a.output_len == b.output_len
        assert a.sampling == b.sampling
        assert [(c.anchor, c.proposed, c.accepted, c.committed) for c in a.cycles] == [
            (c.anchor, c.proposed, c.accepted, c.committed) for c in b.cycles
        ]
        for ca, cb in zip(a.cycles, b.cycles, strict=True):
            torch.testing.assert_close(
                torch.tensor(ca.rejected_teacher_logprobs),
                torch.tensor(cb.rejected_teacher_logprobs),
                atol=1e-4,
                rtol=1e-4,
            )
        anchor_plan(a)  # a consistent record for the replay


@pytest.mark.parametrize("num_draft_tokens", [1, 4])
def test_batched_greedy_rollouts_equal_the_engine_records(
    sharp_target: TargetModel, half_trained_drafter: Drafter, num_draft_tokens: int
) -> None:
    prompts = _prompts(sharp_target, [6, 3, 9, 6, 2], seed=5)
    kwargs = {"num_draft_tokens": num_draft_tokens, "max_new_tokens": 24, "drafter_version": "7"}
    ours = batched_greedy_rollouts(
        sharp_target, half_trained_drafter, prompts, batch_size=3, **kwargs
    )
    engine = make_rollouts(sharp_target, half_trained_drafter, prompts, **kwargs)
    _assert_same_records(ours, engine)
    cycles = [c for r in ours for c in r.cycles]
    # both streams are exercised: accepted drafts, and cycles with 2+ rejected (branch) slots
    assert sum(c.accepted for c in cycles) > 10
    assert num_draft_tokens == 1 or sum(len(c.proposed) - c.accepted >= 2 for c in cycles) > 5


def test_batched_greedy_rollouts_with_a_random_drafter_and_eos(sharp_target: TargetModel) -> None:
    """A random drafter rejects almost everything, so every cycle has a long rejected branch. The
    EOS row of the LM head is set to 1.01x the row of a token the target writes, so EOS becomes
    the greedy choice wherever that token was and some rollouts stop early."""
    drafter = random_drafter_for(sharp_target, seed=3)
    prompts = _prompts(sharp_target, [5, 7, 4], seed=11)
    texts = greedy_continuations(sharp_target, prompts, max_new_tokens=16, batch_size=3)
    eos = min(sharp_target.eos_token_ids)
    trigger = texts[0][5]
    lm_head = sharp_target.model.lm_head.weight
    saved = lm_head.detach().clone()
    try:
        with torch.no_grad():
            lm_head[eos] = saved[trigger] * 1.01
        kwargs = {"num_draft_tokens": 3, "max_new_tokens": 16}
        ours = batched_greedy_rollouts(sharp_target, drafter, prompts, batch_size=2, **kwargs)
        engine = make_rollouts(sharp_target, drafter, prompts, **kwargs)
    finally:
        with torch.no_grad():
            lm_head.copy_(saved)
    _assert_same_records(ours, engine)
    assert any(r.output_len < 16 and r.response_ids[r.output_len - 1] == eos for r in ours)
    assert sum(len(c.proposed) - c.accepted >= 2 for r in ours for c in r.cycles) > 5


@pytest.mark.parametrize("step", ["lean", "hf"])
def test_greedy_continuations_ignore_eos_and_keep_the_requested_length(
    sharp_target: TargetModel, step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both paths (continuous batching on the lean step, padded batches on the HF model) give
    the same text as one prompt alone, and as each other."""
    monkeypatch.setattr(sharp_target, "step", step)
    prompts = _prompts(sharp_target, [4, 8, 6], seed=2)
    texts = greedy_continuations(sharp_target, prompts, max_new_tokens=12, batch_size=2)
    assert [len(t) for t in texts] == [12, 12, 12]
    alone = greedy_continuations(sharp_target, prompts[1:2], max_new_tokens=12, batch_size=1)
    assert texts[1] == alone[0]  # batching does not change the greedy text
    engine = DecodeEngine(sharp_target)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    assert texts == [engine.generate(p, params).token_ids for p in prompts]
